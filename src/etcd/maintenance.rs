//! The Maintenance service: Status, Hash, HashKV, Snapshot (streamed), Alarm, Defragment,
//! MoveLeader.
//!
//! Status reports this node's view: `leader` and `raftTerm` from Raft metrics, `raftIndex` the
//! last log index, `raftAppliedIndex` the applied one, `dbSize` the size of the store's data file.
//! Alarms are etcd's: a put, txn or lease grant that would take this node's data file past
//! `--quota-backend-bytes` raises a NOSPACE alarm for this member through Raft and is refused
//! with `etcdserver: mvcc: database space exceeded`; while any member's NOSPACE alarm is up,
//! every replica refuses puts, txns with puts and lease grants (`mvcc::Keyspace::capped`).
//! Reads, deletes and compaction go on. Defragment rewrites this node's data file with only
//! its live data (`Store::defragment`), so after compacting, defragmenting and disarming
//! (`etcdctl alarm disarm`) writes go through again. The snapshot is eden's store export (`EDENSNAP`), not a bbolt
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
    /// etcd's quota check, before a write is proposed: if `cost` would take this node's data
    /// file to its quota, raise this member's NOSPACE alarm and refuse the write.
    pub async fn check_quota(&self, cost: Cost<'_>) -> Result<(), ApiError> {
        let quota = self.quota_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if quota < 0 {
            return Ok(());
        }
        let size = self.node.store().size_bytes() as i64;
        if size.saturating_add(cost.bytes()) < quota {
            return Ok(());
        }
        tracing::warn!(
            size,
            quota,
            "the store reached --quota-backend-bytes: raising a NOSPACE alarm; writes are \
             refused until history is compacted, the store defragmented and the alarm disarmed"
        );
        let raise = st::Command::Alarm {
            activate: true,
            member: self.node.id(),
            alarm: st::AlarmType::NoSpace,
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
        let mut errors = Vec::new();
        if m.leader.is_none() {
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
            leader: m.leader.unwrap_or(0),
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
        let header = self.backend.header_now();
        let total = bytes.len();
        let chunks: Vec<Result<pb::SnapshotResponse, Status>> = bytes
            .chunks(SNAPSHOT_CHUNK)
            .scan(total, |remaining, chunk| {
                *remaining -= chunk.len();
                Some(Ok(pb::SnapshotResponse {
                    header,
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
