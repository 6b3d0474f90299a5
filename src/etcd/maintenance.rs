//! The Maintenance service: Status, Hash, HashKV, Snapshot (streamed), Alarm, Defragment,
//! MoveLeader.
//!
//! Status reports this node's view: `leader` (only a leader a quorum has answered lately:
//! `RaftNode::confirmed_leader`; else 0 and `etcdserver: no leader` in `errors`) and `raftTerm`
//! from Raft metrics, `raftIndex` the last log index, `raftAppliedIndex` the applied one,
//! `dbSize` the size of the store's data file.
//! Alarms are etcd's: a put, txn or lease grant that would take this node's data file past
//! `--quota-backend-bytes` raises a NOSPACE alarm for this member through Raft and is refused
//! with `etcdserver: mvcc: database space exceeded`; while any member's NOSPACE alarm is up,
//! every replica refuses puts, txns with puts and lease grants (`mvcc::Keyspace::capped`).
//! Reads, deletes and compaction go on. Defragment rewrites this node's data file with only
//! its live data (`Store::defragment`), so after compacting, defragmenting and disarming
//! (`etcdctl alarm disarm`) writes go through again.
//!
//! The corruption check ([`run_corruption_check`]) is etcd's too: the leader compares every
//! member's hash of its history with its own at the same revision and raises a CORRUPT alarm
//! for a member that differs; while it is up, every replica refuses every change with
//! `etcdserver: corrupt cluster`. The snapshot is eden's store export (`EDENSNAP`), not a bbolt
//! file: it restores into eden, not into etcd.

use std::pin::Pin;
use std::sync::Arc;

use eden_storage as st;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::errors::ApiError;
use super::pb::etcdserverpb as pb;
use super::{Backend, ETCD_VERSION};

/// etcd's default `--quota-backend-bytes`: 2 GiB.
pub const DEFAULT_QUOTA_BYTES: i64 = 2 << 30;
/// etcd's estimates of what a key's metadata and a lease cost in the store (`quota.go`).
const KV_OVERHEAD: i64 = 256;
const LEASE_OVERHEAD: i64 = 64;

/// What a request adds to the store, as etcd's quota estimates it: a put its key and value
/// and [`KV_OVERHEAD`]; a txn the larger of its two branches' own puts (not nested txns'); a
/// lease grant [`LEASE_OVERHEAD`].
pub enum Cost<'a> {
    Put(&'a pb::PutRequest),
    Txn(&'a pb::TxnRequest),
    LeaseGrant,
}

impl Cost<'_> {
    fn bytes(&self) -> i64 {
        let put = |p: &pb::PutRequest| KV_OVERHEAD + p.key.len() as i64 + p.value.len() as i64;
        let branch = |ops: &[pb::RequestOp]| -> i64 {
            ops.iter()
                .map(|op| match &op.request {
                    Some(pb::request_op::Request::RequestPut(p)) => put(p),
                    _ => 0,
                })
                .sum()
        };
        match self {
            Cost::Put(p) => put(p),
            Cost::Txn(t) => branch(&t.success).max(branch(&t.failure)),
            Cost::LeaseGrant => LEASE_OVERHEAD,
        }
    }
}

fn alarm_name(a: st::AlarmType) -> &'static str {
    match a {
        st::AlarmType::None => "NONE",
        st::AlarmType::NoSpace => "NOSPACE",
        st::AlarmType::Corrupt => "CORRUPT",
    }
}

fn alarm_to_pb(a: st::AlarmMember) -> pb::AlarmMember {
    pb::AlarmMember {
        member_id: a.member,
        alarm: a.alarm.number(),
    }
}

/// Peer route: this member's HashKV at a revision (a JSON revision in, [`HashAnswer`] out).
pub const HASHKV_PATH: &str = "/etcd/hashkv";
/// How long the leader waits for a member's hash.
const HASH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the initial check waits for the membership loaded from disk to be published.
const MEMBERSHIP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A member's answer to [`HASHKV_PATH`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HashAnswer {
    hash: u32,
    compact_revision: i64,
}

/// Snapshot bytes per streamed message.
const SNAPSHOT_CHUNK: usize = 32 * 1024;

pub struct MaintenanceService {
    backend: Arc<Backend>,
}

impl MaintenanceService {
    pub fn new(backend: Arc<Backend>) -> MaintenanceService {
        MaintenanceService { backend }
    }
}

impl Backend {
    /// Serves [`HASHKV_PATH`]: the hash of this replica's history at the asked revision. A
    /// member that has not applied that revision yet answers with an error.
    pub(super) async fn hashkv_peer(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let rev: i64 = serde_json::from_slice(body)
            .map_err(|e| format!("{HASHKV_PATH}: the body must be a revision: {e}"))?;
        let (hash, compact_revision) = self
            .hash_off_runtime(rev)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::to_vec(&HashAnswer {
            hash,
            compact_revision,
        })
        .map_err(|e| e.to_string())
    }

    /// `Store::hash_kv` on a blocking thread: it reads the whole retained history.
    async fn hash_off_runtime(&self, rev: i64) -> Result<(u32, i64), ApiError> {
        let store = self.node.store().clone();
        tokio::task::spawn_blocking(move || store.hash_kv(rev))
            .await
            .map_err(|e| ApiError::Internal(format!("hashing the store failed: {e}")))?
            .map_err(ApiError::from)
    }

    /// Every other member's hash of its history at `rev`, for those that answer. A member
    /// that is down, has not applied `rev` yet or compacted past it gives none.
    async fn member_hashes(&self, rev: i64) -> Result<Vec<(u64, String, HashAnswer)>, ApiError> {
        let m = self.node.metrics();
        let body = serde_json::to_vec(&rev).map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut answers = Vec::new();
        for (id, info) in m.voters.iter().chain(m.learners.iter()) {
            if *id == self.node.id() {
                continue;
            }
            let answer = self
                .node
                .peer_pool()
                .call(&info.peer_addr, HASHKV_PATH, body.clone(), HASH_TIMEOUT)
                .await;
            match answer.map(|b| serde_json::from_slice::<HashAnswer>(&b)) {
                Ok(Ok(a)) => answers.push((*id, info.name.clone(), a)),
                Ok(Err(e)) => {
                    tracing::warn!(member = id, "corruption check: unreadable answer: {e}")
                }
                Err(e) => tracing::debug!(member = id, "corruption check: no hash at {rev}: {e}"),
            }
        }
        Ok(answers)
    }

    /// etcd's corruption check, run by the leader: hash its own history at its current
    /// revision, ask every other member for its hash at the same revision, and raise a CORRUPT
    /// alarm for each member whose history differs while its compacted revision is the same
    /// (a member that lags, or compacted differently, cannot be compared and is skipped).
    /// Returns the members found to differ.
    pub async fn check_corruption(&self) -> Result<Vec<u64>, ApiError> {
        if !self.node.is_leader() {
            return Ok(Vec::new());
        }
        let rev = self.node.store().revision();
        let (hash, compacted) = self.hash_off_runtime(rev).await?;
        let mut differ = Vec::new();
        for (id, _, answer) in self.member_hashes(rev).await? {
            if answer.compact_revision == compacted && answer.hash != hash {
                tracing::error!(
                    member = id,
                    revision = rev,
                    leader_hash = hash,
                    member_hash = answer.hash,
                    "corruption check: the member's history differs from the leader's; raising \
                     a CORRUPT alarm (every change is refused until the member is rebuilt and \
                     the alarm disarmed)"
                );
                differ.push(id);
            }
        }
        for id in &differ {
            self.node
                .write(st::Command::Alarm {
                    activate: true,
                    member: *id,
                    alarm: st::AlarmType::Corrupt,
                })
                .await?;
        }
        Ok(differ)
    }

    /// etcd's `--experimental-initial-corrupt-check`, run by a member before it serves: its
    /// own history's hash as it was on disk, taken before Raft started
    /// ([`eden_raft::RaftNode::hash_at_start`], so what Raft applied since cannot change it),
    /// against every other member's at the same revision (the others have it if they went on
    /// without this member). Returns how many members could be compared; an error names the first member
    /// whose history differs while the compacted revision is the same, and the member must not
    /// serve.
    pub async fn check_initial_hashkv(&self) -> Result<usize, String> {
        let (rev, hash, compacted) = match self.node.hash_at_start() {
            // An empty store (a new member): nothing to compare yet.
            None if self.node.revision_at_start() <= 1 => return Ok(0),
            None => {
                return Err(
                    "the node was started without hashing its store (hash_at_start); \
                            cannot run the initial corruption check"
                        .into(),
                )
            }
            Some(Err(e)) => return Err(format!("this member's store: {e}")),
            Some(Ok(h)) => (h.revision, h.hash, h.compacted),
        };
        // Right after start, Raft may not have published the membership it loaded yet; with
        // no members listed there would be nobody to compare with.
        let deadline = tokio::time::Instant::now() + MEMBERSHIP_WAIT;
        while self.node.metrics().voters.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let answers = self.member_hashes(rev).await.map_err(|e| e.to_string())?;
        let mut compared = 0;
        for (id, name, answer) in answers {
            if answer.compact_revision != compacted {
                continue;
            }
            compared += 1;
            if answer.hash != hash {
                return Err(format!(
                    "the initial corruption check found this member's data different from \
                     member {name} ({id:x}) at revision {rev} (hash {hash} here, {} there): \
                     this member's store may be damaged, so it does not serve. Move its data \
                     dir away (keep it for diagnosis) and start it again with --join and a \
                     token: it joins under a new raft id and copies the store",
                    answer.hash
                ));
            }
        }
        Ok(compared)
    }

    /// etcd's quota check, before a write is proposed: if `cost` would take this node's data
    /// file to its quota, raise this member's NOSPACE alarm and refuse the write.
    pub async fn check_quota(&self, cost: Cost<'_>) -> Result<(), ApiError> {
        let quota = self.quota_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if quota < 0 {
            return Ok(());
        }
        let store = self.node.store();
        let size = store.size_bytes() as i64;
        if size.saturating_add(cost.bytes()) < quota {
            return Ok(());
        }
        let mine = st::AlarmMember {
            member: self.node.id(),
            alarm: st::AlarmType::NoSpace,
        };
        // Raised already: refuse without proposing it again for every refused write.
        if store.alarms().contains(&mine) {
            return Err(st::Error::NoSpace.into());
        }
        tracing::warn!(
            size,
            quota,
            "the store reached --quota-backend-bytes: raising a NOSPACE alarm; writes are \
             refused until history is compacted, the store defragmented and the alarm disarmed"
        );
        let raise = st::Command::Alarm {
            activate: true,
            member: mine.member,
            alarm: mine.alarm,
        };
        if let Err(e) = self.node.write(raise).await {
            tracing::warn!("raising the NOSPACE alarm: {e}");
        }
        Err(st::Error::NoSpace.into())
    }

    /// etcd's Alarm: GET lists the raised alarms (of one type, or all for NONE) from this
    /// replica; ACTIVATE and DEACTIVATE go through Raft and answer with what they changed.
    /// etcd 3.4 sends these responses without a header, and so does eden.
    pub async fn alarm(&self, r: pb::AlarmRequest) -> Result<pb::AlarmResponse, ApiError> {
        let alarm = st::AlarmType::from_number(r.alarm)
            .ok_or_else(|| ApiError::InvalidInput(format!("unknown alarm type {}", r.alarm)))?;
        use pb::alarm_request::AlarmAction;
        let activate = match AlarmAction::try_from(r.action) {
            Ok(AlarmAction::Get) => {
                let alarms = self
                    .node
                    .store()
                    .alarms()
                    .into_iter()
                    .filter(|a| alarm == st::AlarmType::None || a.alarm == alarm)
                    .map(alarm_to_pb)
                    .collect();
                return Ok(pb::AlarmResponse {
                    header: None,
                    alarms,
                });
            }
            Ok(AlarmAction::Activate) => true,
            Ok(AlarmAction::Deactivate) => false,
            Err(_) => {
                return Err(ApiError::InvalidInput(format!(
                    "unknown alarm action {}",
                    r.action
                )))
            }
        };
        let applied = self
            .node
            .write(st::Command::Alarm {
                activate,
                member: r.member_id,
                alarm,
            })
            .await?;
        match applied.response {
            st::CommandResponse::Alarm(changed) => Ok(pb::AlarmResponse {
                header: None,
                alarms: changed.into_iter().map(alarm_to_pb).collect(),
            }),
            other => Err(super::kv::unexpected("alarm", &other)),
        }
    }

    pub fn status(&self) -> pb::StatusResponse {
        let m = self.node.metrics();
        let size = self.node.store().size_bytes() as i64;
        // A leader no quorum has answered lately is not reported (`confirmed_leader`).
        let leader = self.node.confirmed_leader();
        let mut errors = Vec::new();
        if leader.is_none() {
            errors.push("etcdserver: no leader".to_string());
        }
        // etcd lists each raised alarm in the text form of its AlarmMember message.
        for a in self.node.store().alarms() {
            errors.push(format!(
                "memberID:{} alarm:{} ",
                a.member,
                alarm_name(a.alarm)
            ));
        }
        pb::StatusResponse {
            header: self.header_now(),
            version: ETCD_VERSION.to_string(),
            db_size: size,
            leader: leader.unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.term,
            raft_applied_index: m.applied_index.unwrap_or(0),
            errors,
            db_size_in_use: size,
            is_learner: m.learners.contains_key(&self.node.id()),
        }
    }

    pub fn hash_kv(&self, revision: i64) -> Result<pb::HashKvResponse, ApiError> {
        let store = self.node.store();
        let current = store.revision();
        let (hash, compact_revision) = store.hash_kv(revision)?;
        Ok(pb::HashKvResponse {
            header: self.header(current),
            hash,
            compact_revision,
        })
    }
}

/// Runs [`Backend::check_corruption`] every `period` while this node leads.
pub async fn run_corruption_check(backend: Arc<Backend>, period: std::time::Duration) {
    // A floor, so a tiny period neither panics nor hashes the store nonstop.
    let period = period.max(std::time::Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match backend.check_corruption().await {
            Ok(differ) if differ.is_empty() => {
                if backend.node.is_leader() {
                    tracing::info!(
                        "corruption check: every member that answered agrees with the leader"
                    );
                }
            }
            Ok(differ) => {
                tracing::error!(members = ?differ, "corruption check: CORRUPT alarm raised")
            }
            Err(e) => tracing::warn!("corruption check failed (tried again at the next one): {e}"),
        }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        req: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        Ok(Response::new(self.backend.alarm(req.into_inner()).await?))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.backend.status()))
    }

    async fn defragment(
        &self,
        _req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        let store = self.backend.node.store().clone();
        tokio::task::spawn_blocking(move || store.defragment())
            .await
            .map_err(|e| ApiError::Internal(format!("defragment task failed: {e}")))?
            .map_err(ApiError::from)?;
        // etcd 3.4 answers without a header.
        Ok(Response::new(pb::DefragmentResponse { header: None }))
    }

    async fn hash(
        &self,
        _req: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        let r = self.backend.hash_kv(0)?;
        Ok(Response::new(pb::HashResponse {
            header: r.header,
            hash: r.hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        Ok(Response::new(
            self.backend.hash_kv(req.into_inner().revision)?,
        ))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        _req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let store = self.backend.node.store().clone();
        let bytes = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            store.export_snapshot(&mut buf).map(|()| buf)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("snapshot export task failed: {e}")))?
        .map_err(ApiError::from)?;
        let total = bytes.len();
        let chunks: Vec<Result<pb::SnapshotResponse, Status>> = bytes
            .chunks(SNAPSHOT_CHUNK)
            .scan(total, |remaining, chunk| {
                *remaining -= chunk.len();
                // etcd 3.4 sends its snapshot chunks without a header.
                Some(Ok(pb::SnapshotResponse {
                    header: None,
                    remaining_bytes: *remaining as u64,
                    blob: chunk.to_vec(),
                }))
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        let target = req.into_inner().target_id;
        if !self.backend.members().iter().any(|m| m.id == target) {
            return Err(ApiError::MemberNotFound.into());
        }
        Err(ApiError::Unsupported(format!(
            "eden does not transfer Raft leadership on request (target {target:x}); the role \
             controller chooses the leader"
        ))
        .into())
    }
}
