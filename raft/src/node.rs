//! [`RaftNode`]: the one handle the rest of eden uses for the replicated store.
//!
//! ## What it offers
//! - [`RaftNode::write`]: a command, committed by a quorum and applied; forwarded to the leader
//!   when this node is not it, and batched with other writes by the leader's proposer.
//! - [`RaftNode::linearizable_read`]: after it returns, reading [`RaftNode::store`] is
//!   linearizable. The leader confirms its leadership with a quorum (`get_read_log_id`); a
//!   follower asks the leader for that read index, then waits until it has applied it.
//! - [`RaftNode::store`]: serializable (possibly stale) local reads.
//! - [`RaftNode::subscribe`]: the events of each applied revision, in order.
//! - membership changes (forwarded to the leader too), [`RaftNode::metrics`],
//!   [`RaftNode::shutdown`].
//!
//! ## Retries
//! A request is retried on another leader only when it certainly did not take effect: the
//! receiver said it is not the leader, or the leader could not be reached at all. A request that
//! was sent and then lost (a timeout, a connection dropped mid-way) fails with `Unavailable`
//! saying the outcome is unknown; retrying it blindly could apply a write twice.
//!
//! ## Data dir
//! `DIR/raft-log` (the log, segment files), `DIR/state` (the eden-storage store), `DIR/snapshots`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eden_storage::{Applied, Command, Store};
use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, Fatal, InitializeError, RaftError,
};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, WireError};
use crate::log_store::LogStore;
use crate::proposer::{self, Proposal};
use crate::state_machine::{EventFeed, StateMachine};
use crate::transport::client::CallError;
use crate::transport::{self, NetworkFactory, PeerPool};
use crate::types::{LogId, NodeId, NodeInfo, Raft};

/// Pause before asking again after "not the leader" or an unreachable leader.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// A membership change, as forwarded to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add a node as a learner and wait until it has caught up.
    AddLearner { id: NodeId, info: NodeInfo },
    /// Make a learner a voter.
    Promote { id: NodeId },
    /// Make a voter a learner (it stays in the cluster, caught up).
    Demote { id: NodeId },
    /// Remove a voter or a learner from the cluster.
    Remove { id: NodeId },
    /// Replace the voter set (every id must already be a member).
    SetVoters { voters: BTreeSet<NodeId> },
    /// Finish a joint membership: make `voters` (its target set) the whole voter set. Voters
    /// that leave stay as learners.
    Finish { voters: BTreeSet<NodeId> },
}

/// How to start a node.
#[derive(Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    pub info: NodeInfo,
    pub data_dir: PathBuf,
    /// Client side of the peer transport: this node's certificate, the cluster CA as root.
    pub client_tls: Arc<rustls::ClientConfig>,
    /// openraft tuning; [`default_raft_config`] unless you need otherwise.
    pub raft: openraft::Config,
    /// Bound on a write or a linearizable read, forwarding and waiting for a leader included.
    pub request_timeout: Duration,
    /// Bound on a membership change (adding a learner waits for it to catch up).
    pub membership_timeout: Duration,
    /// Hash the store as it is on disk, before Raft starts applying (see
    /// [`RaftNode::hash_at_start`]); for an initial corruption check.
    pub hash_at_start: bool,
}

impl NodeConfig {
    pub fn new(
        id: NodeId,
        info: NodeInfo,
        data_dir: PathBuf,
        client_tls: Arc<rustls::ClientConfig>,
    ) -> NodeConfig {
        NodeConfig {
            id,
            info,
            data_dir,
            client_tls,
            raft: default_raft_config(),
            request_timeout: Duration::from_secs(10),
            membership_timeout: Duration::from_secs(60),
            hash_at_start: false,
        }
    }
}

/// eden's openraft settings. Heartbeats go every 100 ms. A follower that knew a leader calls an
/// election after the leader lease (`election_timeout_max`, 0.7 s) plus its own randomized
/// timeout (0.4-0.7 s) without one, so after 1.1-1.4 s of silence: at least ten heartbeats
/// missed in a row. Snapshots are taken every 10 000 entries and sent in 1 MiB chunks, each with
/// 10 s to arrive, so a slow link still gets them through.
pub fn default_raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "eden".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 700,
        install_snapshot_timeout: 10_000,
        snapshot_max_chunk_size: 1 << 20,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 1000,
        purge_batch_size: 256,
        max_payload_entries: 256,
        ..Default::default()
    }
}

/// A node's role as Raft sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRole {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

/// A peer's replication progress, as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerProgress {
    /// Highest log index known to be on the peer.
    pub matched_index: Option<u64>,
    /// Entries the peer is behind the leader's last log index.
    pub lag: u64,
}

/// A point-in-time view of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMetrics {
    pub id: NodeId,
    pub role: RaftRole,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub voters: BTreeMap<NodeId, NodeInfo>,
    pub learners: BTreeMap<NodeId, NodeInfo>,
    /// The log index of the membership these voters and learners come from (0 before any).
    pub membership_index: u64,
    /// When the membership is joint (a change between its two steps, or one whose leader died
    /// between them), the voter set it is moving to. `voters` then holds both sets.
    pub joint_target: Option<BTreeSet<NodeId>>,
    /// Per-peer progress; only on the leader, empty elsewhere.
    pub replication: BTreeMap<NodeId, PeerProgress>,
}

/// The replicated store of one node.
pub struct RaftNode {
    id: NodeId,
    info: NodeInfo,
    raft: Raft,
    sm: StateMachine,
    pool: Arc<PeerPool>,
    proposals: mpsc::Sender<Proposal>,
    proposer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    flusher: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    request_timeout: Duration,
    membership_timeout: Duration,
    /// Linearizable reads waiting for the next read-index round (see [`RaftNode::read_index`]).
    reads: Mutex<ReadRounds>,
    /// Writes a follower is about to forward to the leader (see [`RaftNode::write`]).
    forwards: Mutex<ForwardRounds>,
    /// Whether this node may call elections (see [`RaftNode::hold_elections`] and
    /// [`RaftNode::snapshot_chunk_arrived`]).
    campaign: Arc<Mutex<Campaign>>,
    /// The store's revision when it was opened, before Raft applied anything.
    revision_at_start: i64,
    hash_at_start: Option<Result<StartHash, String>>,
    /// See [`RaftNode::proposals`].
    committed_index: Arc<AtomicU64>,
    pending_writes: AtomicU64,
    failed_writes: AtomicU64,
}

struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Write counters of one node, in etcd's terms (see [`RaftNode::proposals`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProposalCounts {
    /// The committed log index this node knows.
    pub committed: u64,
    /// Writes this node's callers are waiting for now.
    pub pending: u64,
    /// Writes through this node whose entry did not commit (leader lost, stopped, timed out),
    /// since it started. A write the store refused (an applied entry) is not counted.
    pub failed: u64,
}

/// What the host knows of this node's place in the membership, as far as elections go (see
/// [`RaftNode::hold_elections`]). Raft never tells a removed node it was removed, so the host
/// asks the members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ElectionHold {
    /// Nothing holds elections back: a voter, or nobody to ask.
    #[default]
    None,
    /// Outside the membership. A removed voter restarted from its log still counts itself a
    /// voter, and the terms its elections raise would depose the leader when it is admitted
    /// again.
    Outside,
    /// Admitted as a learner by the membership at this log index, which the node's own log
    /// may not hold yet: until it does, that log may still list the node as a voter of an older
    /// membership, and its election timer ran out long ago, so an election called before the
    /// leader's first entries arrive would raise its term past the leader's and depose it. The
    /// hold lifts itself once the node's membership is at least this new (Raft then keeps a
    /// learner from campaigning on its own).
    UntilMembership(u64),
}

/// What holds this node's elections back.
#[derive(Default)]
struct Campaign {
    /// The host's hold.
    hold: ElectionHold,
    /// A task waits for the node's membership to reach an `UntilMembership` hold.
    watching: bool,
    /// A snapshot is streaming in from the leader until at least then (each chunk extends
    /// it). openraft 0.9 receives chunks outside its core, so they do not reset the election
    /// timer, and no heartbeat comes while the leader streams: a transfer longer than the
    /// election timeout would make the node campaign, depose the leader and restart the
    /// transfer, over and over. While it is set, a task waits to lift it.
    receiving_until: Option<Instant>,
}

impl Campaign {
    /// Whether the hold still holds, given the node's own membership index.
    fn held(&self, membership_index: u64) -> bool {
        match self.hold {
            ElectionHold::None => false,
            ElectionHold::Outside => true,
            ElectionHold::UntilMembership(i) => membership_index < i,
        }
    }

    fn apply(&self, raft: &Raft) {
        let index = membership_index(&raft.metrics().borrow());
        raft.runtime_config()
            .elect(!self.held(index) && self.receiving_until.is_none());
    }
}

/// The log index of the membership a node's metrics show (0 before any).
fn membership_index(m: &openraft::RaftMetrics<NodeId, NodeInfo>) -> u64 {
    m.membership_config.log_id().map_or(0, |l| l.index)
}

/// How long after a snapshot chunk this node still calls no elections.
const SNAPSHOT_QUIET: Duration = Duration::from_secs(2);

/// Writes waiting to be forwarded, and whether a forwarding task is running.
#[derive(Default)]
struct ForwardRounds {
    running: bool,
    waiting: Vec<Forward>,
}

/// One write waiting to be forwarded: the command, its caller, and when to give up.
struct Forward {
    cmd: Command,
    reply: oneshot::Sender<Result<Applied, Error>>,
    deadline: Instant,
}

/// Marks a refusal because another membership change is in progress (retried).
const IN_PROGRESS: &str = "membership change in progress: ";

/// See [`RaftNode::hash_at_start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartHash {
    pub revision: i64,
    pub hash: u32,
    /// The compacted revision the hash was taken with (members compare hashes only when theirs
    /// is the same).
    pub compacted: i64,
}

/// Most writes forwarded in one call.
const MAX_FORWARD_BATCH: usize = 1024;

/// How many of the waiting forwards (given their sizes, oldest first) go in one call: at most
/// [`MAX_FORWARD_BATCH`] and [`proposer::MAX_BATCH_BYTES`] of commands, and at least one.
fn forward_batch_len(sizes: impl Iterator<Item = usize>) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for len in sizes.take(MAX_FORWARD_BATCH) {
        if n > 0 && bytes + len > proposer::MAX_BATCH_BYTES {
            break;
        }
        bytes += len;
        n += 1;
    }
    n
}

/// The reads waiting for a read index, and whether a round task is running.
#[derive(Default)]
struct ReadRounds {
    running: bool,
    waiting: Vec<oneshot::Sender<Result<(), Error>>>,
}

fn fatal_error(e: &Fatal<NodeId>) -> WireError {
    match e {
        Fatal::Stopped => WireError::Unavailable("this node is shutting down".into()),
        Fatal::StorageError(s) => WireError::Io(s.to_string()),
        other => WireError::Internal(other.to_string()),
    }
}

impl RaftNode {
    /// Opens the data dir and starts Raft. A fresh node is not part of any cluster until
    /// [`RaftNode::initialize`] (first node) or a leader's `add_learner` (joining node); a node
    /// restarting from its data dir resumes where it stopped. Serve peers with
    /// [`transport::PeerServer::serve`].
    pub async fn start(config: NodeConfig) -> Result<Arc<RaftNode>, Error> {
        std::fs::create_dir_all(&config.data_dir)?;
        let log = LogStore::open(&config.data_dir.join("raft-log"))?;
        let flusher = log.flusher_handle();
        let committed_index = log.committed_index();
        let store = Store::open(&config.data_dir.join("state")).map_err(|e| {
            Error::Io(format!(
                "cannot open the store in {}: {e}",
                config.data_dir.join("state").display()
            ))
        })?;
        if let Some(entries) = store.converted_from_sled() {
            tracing::info!(
                entries,
                "converted the store from the sled layout of earlier builds"
            );
        }
        let revision_at_start = store.revision();
        let hash_at_start = (config.hash_at_start && revision_at_start > 1).then(|| {
            store
                .hash_kv(revision_at_start)
                .map(|(hash, compacted)| StartHash {
                    revision: revision_at_start,
                    hash,
                    compacted,
                })
                .map_err(|e| format!("cannot hash the store at revision {revision_at_start}: {e}"))
        });
        let cut = store.recovery();
        if cut.cut_nonzero {
            tracing::warn!(
                bytes = cut.cut_bytes,
                "the store's data file ended in a damaged batch, which was cut; the Raft log \
                 re-applies it"
            );
        } else if cut.cut_bytes > 0 {
            tracing::info!(
                bytes = cut.cut_bytes,
                "cut the unwritten end of the store's data file; the Raft log re-applies it"
            );
        }
        let sm = StateMachine::new(Arc::new(store), &config.data_dir.join("snapshots"))?;
        let raft_config = config
            .raft
            .clone()
            .validate()
            .map_err(|e| Error::InvalidInput(format!("Raft settings: {e}")))?;
        let pool = Arc::new(PeerPool::new(config.client_tls.clone()));
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            NetworkFactory::new(pool.clone()),
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| Error::from(fatal_error(&e)))?;
        let (tx, rx) = mpsc::channel(proposer::MAX_BATCH * 4);
        let proposer = tokio::spawn(proposer::run(raft.clone(), rx));
        Ok(Arc::new(RaftNode {
            id: config.id,
            info: config.info,
            raft,
            sm,
            pool,
            proposals: tx,
            proposer: Mutex::new(Some(proposer)),
            flusher,
            request_timeout: config.request_timeout,
            membership_timeout: config.membership_timeout,
            reads: Mutex::new(ReadRounds::default()),
            forwards: Mutex::new(ForwardRounds::default()),
            campaign: Arc::new(Mutex::new(Campaign::default())),
            revision_at_start,
            hash_at_start,
            committed_index,
            pending_writes: AtomicU64::new(0),
            failed_writes: AtomicU64::new(0),
        }))
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// The openraft handle, for what this type does not wrap.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The local replica: serializable reads (possibly behind the leader).
    pub fn store(&self) -> &Arc<Store> {
        self.sm.store()
    }

    /// Events of every revision applied from now on, in revision order.
    pub fn subscribe(&self) -> EventFeed {
        self.sm.subscribe()
    }

    /// The peer pool this node dials peers with (the cluster layer may reuse it).
    pub fn peer_pool(&self) -> &Arc<PeerPool> {
        &self.pool
    }

    /// Makes this node the first member of a new cluster, with `members` as the voters
    /// (usually just this node). Refused if the node already has state.
    pub async fn initialize(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<(), Error> {
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => Err(Error::InvalidInput(
                format!("this node already belongs to a cluster: {e}"),
            )),
            Err(RaftError::APIError(e)) => Err(Error::InvalidInput(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(fatal_error(&f).into()),
        }
    }

    // These two run on every write: they look at the metrics in place, since a clone copies the
    // whole membership and replication state.
    pub fn is_leader(&self) -> bool {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// The current leader, if one is known, with its node info.
    pub fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        let id = m.current_leader?;
        let info = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, info))
    }

    /// The leader as this node can vouch for it: another node it follows, or itself only if
    /// a quorum answered it within twice the election timeout. openraft 0.9 has no
    /// check-quorum, so a leader cut off from the others keeps its role; this does not count
    /// it (etcd's leader steps down in that case).
    pub fn confirmed_leader(&self) -> Option<NodeId> {
        let m = self.raft.metrics();
        let m = m.borrow();
        match m.current_leader {
            Some(l) if l == self.id => {
                let limit = 2 * self.raft.config().election_timeout_max;
                m.millis_since_quorum_ack
                    .filter(|ms| *ms <= limit)
                    .map(|_| l)
            }
            other => other,
        }
    }

    pub fn metrics(&self) -> NodeMetrics {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voter_ids: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut voters = BTreeMap::new();
        let mut learners = BTreeMap::new();
        for (id, info) in membership.nodes() {
            if voter_ids.contains(id) {
                voters.insert(*id, info.clone());
            } else {
                learners.insert(*id, info.clone());
            }
        }
        let last = m.last_log_index.unwrap_or(0);
        let replication = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, matched)| {
                        let matched_index = matched.map(|l| l.index);
                        let lag = last.saturating_sub(matched_index.unwrap_or(0));
                        (*id, PeerProgress { matched_index, lag })
                    })
                    .collect()
            })
            .unwrap_or_default();
        NodeMetrics {
            id: m.id,
            role: match m.state {
                ServerState::Leader => RaftRole::Leader,
                ServerState::Follower => RaftRole::Follower,
                ServerState::Candidate => RaftRole::Candidate,
                ServerState::Learner => RaftRole::Learner,
                ServerState::Shutdown => RaftRole::Shutdown,
            },
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters,
            learners,
            membership_index: membership_index(&m),
            joint_target: {
                let configs = membership.get_joint_config();
                (configs.len() > 1).then(|| configs[configs.len() - 1].clone())
            },
            replication,
        }
    }

    /// Waits up to `timeout` for a known leader.
    async fn wait_leader(&self, timeout: Duration) -> Result<(NodeId, NodeInfo), Error> {
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if rx.borrow().state == ServerState::Shutdown {
                return Err(Error::Unavailable("this node is shutting down".into()));
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::Unavailable("this node is shutting down".into())),
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "no leader known after {timeout:?}; is a quorum of voters up?"
                    )))
                }
            }
        }
    }

    /// Runs `local` if this node leads, else forwards `req` to the leader's `path`; retries
    /// while the answer is "not the leader" or the leader is unreachable.
    async fn on_leader<Req, T, F, Fut>(
        &self,
        what: &str,
        path: &str,
        req: Req,
        timeout: Duration,
        local: F,
    ) -> Result<T, Error>
    where
        Req: Serialize + Clone,
        T: DeserializeOwned,
        F: Fn(Req) -> Fut,
        Fut: Future<Output = Result<T, WireError>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Unavailable(format!(
                    "{what}: no leader took it within {timeout:?}"
                )));
            }
            let (leader, info) = self.wait_leader(remaining).await?;
            let outcome = if leader == self.id {
                // A leader cut off from its quorum keeps its role (openraft 0.9 has no
                // check-quorum), so its proposal would wait for ever: answer as etcd does when
                // a request does not commit in time. The entry may still commit later.
                match tokio::time::timeout(remaining, local(req.clone())).await {
                    Ok(outcome) => outcome,
                    Err(_) => return Err(Error::Unavailable("request timed out".into())),
                }
            } else {
                match self
                    .pool
                    .rpc::<Req, T, WireError>(&info.peer_addr, path, &req, remaining)
                    .await
                {
                    Ok(r) => r,
                    Err(CallError::Unreachable { .. }) => Err(WireError::NotLeader(None)),
                    Err(e) => {
                        return Err(Error::Unavailable(format!(
                            "{what} forwarded to the leader {} ({}): {e}; the outcome is unknown",
                            info.name, leader
                        )))
                    }
                }
            };
            match outcome {
                Err(WireError::NotLeader(_)) => tokio::time::sleep(RETRY_PAUSE).await,
                other => return other.map_err(Error::from),
            }
        }
    }

    /// Commits `cmd` through Raft and returns its result. Store refusals come back as
    /// [`Error::Store`] with etcd's message.
    pub async fn write(self: &Arc<Self>, cmd: Command) -> Result<Applied, Error> {
        self.pending_writes.fetch_add(1, Ordering::Relaxed);
        // Also when the caller gives up (its future is dropped).
        let _pending = Decrement(&self.pending_writes);
        let result = self.write_anywhere(cmd).await;
        if matches!(result, Err(ref e) if !matches!(e, Error::Store(_))) {
            self.failed_writes.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// The store's revision as it was on disk when this node started, before Raft applied
    /// anything (what etcd's initial corruption check hashes).
    pub fn revision_at_start(&self) -> i64 {
        self.revision_at_start
    }

    /// With [`NodeConfig::hash_at_start`]: the store's history hash at the revision it had on
    /// disk, taken before Raft applied anything this run (entries it then applies, a compaction
    /// or a snapshot from the leader, cannot change it). `None` when not asked for or when the
    /// store was empty.
    pub fn hash_at_start(&self) -> Option<&Result<StartHash, String>> {
        self.hash_at_start.as_ref()
    }

    /// The committed index, the writes waiting and the writes that failed to commit.
    pub fn proposals(&self) -> ProposalCounts {
        ProposalCounts {
            committed: self.committed_index.load(Ordering::Relaxed),
            pending: self.pending_writes.load(Ordering::Relaxed),
            failed: self.failed_writes.load(Ordering::Relaxed),
        }
    }

    async fn write_anywhere(self: &Arc<Self>, cmd: Command) -> Result<Applied, Error> {
        if self.is_leader() {
            return self
                .on_leader(
                    "write",
                    transport::server_paths::FORWARD_WRITE,
                    cmd,
                    self.request_timeout,
                    |c| self.write_as_leader(c),
                )
                .await;
        }
        self.forward_write(cmd).await
    }

    /// On a follower, concurrent writes travel to the leader together: a caller joins the
    /// waiting list, and one task sends everything waiting in one call (the leader's proposer
    /// then batches them into one entry). Under load this turns one peer call per write into
    /// one per round trip.
    async fn forward_write(self: &Arc<Self>, cmd: Command) -> Result<Applied, Error> {
        let (tx, rx) = oneshot::channel();
        let start_task = {
            let mut fw = self.forwards.lock().unwrap_or_else(|p| p.into_inner());
            fw.waiting.push(Forward {
                cmd,
                reply: tx,
                deadline: Instant::now() + self.request_timeout,
            });
            !std::mem::replace(&mut fw.running, true)
        };
        if start_task {
            let node = self.clone();
            tokio::spawn(async move { node.forward_rounds().await });
        }
        rx.await.map_err(|_| {
            Error::Unavailable(
                "this node stopped before the leader answered; the outcome is unknown".into(),
            )
        })?
    }

    async fn forward_rounds(self: Arc<Self>) {
        loop {
            let waiting = {
                let mut fw = self.forwards.lock().unwrap_or_else(|p| p.into_inner());
                if fw.waiting.is_empty() {
                    fw.running = false;
                    return;
                }
                let n = forward_batch_len(fw.waiting.iter().map(|f| f.cmd.approx_len()));
                fw.waiting.drain(..n).collect::<Vec<_>>()
            };
            let cmds: Vec<Command> = waiting.iter().map(|f| f.cmd.clone()).collect();
            let n = cmds.len();
            let node: &RaftNode = &self;
            let outcome: Result<Vec<Result<Applied, WireError>>, Error> = node
                .on_leader(
                    "write",
                    transport::server_paths::FORWARD_WRITES,
                    cmds,
                    self.request_timeout,
                    |c| async move { Ok(node.write_many_as_leader(c).await) },
                )
                .await;
            let mut retry = Vec::new();
            match outcome {
                Ok(results) if results.len() == n => {
                    for (f, r) in waiting.into_iter().zip(results) {
                        match r {
                            // Leadership moved while this entry was proposed: it was not
                            // applied, so it goes to the next round (and the new leader),
                            // until its deadline; then the caller hears what etcd says.
                            Err(WireError::NotLeader(_)) if Instant::now() < f.deadline => {
                                retry.push(f)
                            }
                            Err(WireError::NotLeader(_)) => {
                                let _ = f
                                    .reply
                                    .send(Err(Error::Unavailable("leader changed".into())));
                            }
                            other => {
                                let _ = f.reply.send(other.map_err(Error::from));
                            }
                        }
                    }
                }
                Ok(results) => {
                    let e = Error::Internal(format!(
                        "the leader answered {} of {n} forwarded writes",
                        results.len()
                    ));
                    for f in waiting {
                        let _ = f.reply.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for f in waiting {
                        let _ = f.reply.send(Err(e.clone()));
                    }
                }
            }
            if !retry.is_empty() {
                tokio::time::sleep(RETRY_PAUSE).await;
                let mut fw = self.forwards.lock().unwrap_or_else(|p| p.into_inner());
                retry.append(&mut fw.waiting);
                fw.waiting = retry;
            }
        }
    }

    /// Proposes every command through the local proposer at once (so they share entries) and
    /// answers each, in order.
    pub(crate) async fn write_many_as_leader(
        &self,
        cmds: Vec<Command>,
    ) -> Vec<Result<Applied, WireError>> {
        let mut pending = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let (tx, rx) = oneshot::channel();
            let sent = self
                .proposals
                .send(Proposal { cmd, reply: tx })
                .await
                .is_ok();
            pending.push(sent.then_some(rx));
        }
        let mut out = Vec::with_capacity(pending.len());
        for rx in pending {
            out.push(match rx {
                None => Err(WireError::Unavailable("this node is shutting down".into())),
                Some(rx) => rx.await.unwrap_or_else(|_| {
                    Err(WireError::Unavailable(
                        "this node stopped before the write committed; the outcome is unknown"
                            .into(),
                    ))
                }),
            });
        }
        out
    }

    /// Proposes through the local proposer; `NotLeader` if this node does not lead.
    pub(crate) async fn write_as_leader(&self, cmd: Command) -> Result<Applied, WireError> {
        let (tx, rx) = oneshot::channel();
        if self
            .proposals
            .send(Proposal { cmd, reply: tx })
            .await
            .is_err()
        {
            return Err(WireError::Unavailable("this node is shutting down".into()));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(WireError::Unavailable(
                "this node stopped before the write committed; the outcome is unknown".into(),
            )),
        }
    }

    /// Returns once reading the local store is linearizable: it then reflects every write that
    /// completed before this call began.
    pub async fn linearizable_read(self: &Arc<Self>) -> Result<(), Error> {
        self.read_index().await
    }

    /// Waits for a read index obtained **after** this call began, shared with every concurrent
    /// caller, and for this node to apply up to it.
    ///
    /// Confirming leadership costs a heartbeat round to a quorum (and, on a follower, a call to
    /// the leader), so concurrent reads share rounds, as etcd's read-index loop does: a caller
    /// joins the waiting list; one task takes the whole list, asks for one read index, and
    /// answers everyone on it. A round only serves callers that were waiting when it started,
    /// so each gets a read index confirmed after its read began. The task runs while callers
    /// keep arriving and then ends; a caller that goes away does not stop it. Callers are
    /// answered once this node has applied up to the round's read index, checked (or waited
    /// for) once per round rather than once per caller.
    async fn read_index(self: &Arc<Self>) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        let start_task = {
            let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
            reads.waiting.push(tx);
            !std::mem::replace(&mut reads.running, true)
        };
        if start_task {
            let node = self.clone();
            tokio::spawn(async move { node.read_rounds().await });
        }
        rx.await.map_err(|_| {
            Error::Unavailable("this node stopped before the read index was known".into())
        })?
    }

    async fn read_rounds(self: Arc<Self>) {
        loop {
            let waiting = {
                let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
                if reads.waiting.is_empty() {
                    reads.running = false;
                    return;
                }
                std::mem::take(&mut reads.waiting)
            };
            let started = Instant::now();
            let result: Result<Option<LogId>, Error> = self
                .on_leader(
                    "linearizable read",
                    transport::server_paths::FORWARD_READ_INDEX,
                    (),
                    self.request_timeout,
                    |()| self.read_index_as_leader(),
                )
                .await;
            let answer = match result {
                Ok(Some(read)) if !self.applied_at_least(read.index) => {
                    // Wait in a task of its own, so the next round can start meanwhile.
                    let node = self.clone();
                    tokio::spawn(async move {
                        let answer = node.wait_applied(read, started).await;
                        for w in waiting {
                            let _ = w.send(answer.clone());
                        }
                    });
                    continue;
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            for w in waiting {
                let _ = w.send(answer.clone());
            }
        }
    }

    fn applied_at_least(&self, index: u64) -> bool {
        let metrics = self.raft.metrics();
        let applied = metrics.borrow().last_applied;
        applied.is_some_and(|l| l.index >= index)
    }

    /// Waits until this node has applied `read`, within the request timeout from `started`.
    async fn wait_applied(&self, read: LogId, started: Instant) -> Result<(), Error> {
        let remaining = self.request_timeout.saturating_sub(started.elapsed());
        self.raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(read.index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|e| {
                Error::Unavailable(format!(
                    "this node did not apply up to the read index {} in time: {e}",
                    read.index
                ))
            })
    }

    /// The leader's read index, after confirming leadership with a quorum.
    pub(crate) async fn read_index_as_leader(&self) -> Result<Option<LogId>, WireError> {
        match self.raft.get_read_log_id().await {
            Ok((read_log_id, _applied)) => Ok(read_log_id),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(WireError::NotLeader(f.leader_id))
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => Err(
                WireError::Unavailable(format!("the leader cannot reach a quorum: {e}")),
            ),
            Err(RaftError::Fatal(f)) => Err(fatal_error(&f)),
        }
    }

    /// Adds `id` as a learner and waits until it has caught up with the leader.
    pub async fn add_learner(&self, id: NodeId, info: NodeInfo) -> Result<(), Error> {
        self.change_membership(MembershipChange::AddLearner { id, info })
            .await
    }

    /// Makes the learner `id` a voter.
    pub async fn promote(&self, id: NodeId) -> Result<(), Error> {
        self.change_membership(MembershipChange::Promote { id })
            .await
    }

    /// Makes voter `id` a learner.
    pub async fn demote(&self, id: NodeId) -> Result<(), Error> {
        self.change_membership(MembershipChange::Demote { id })
            .await
    }

    /// Removes `id` (voter or learner) from the cluster.
    pub async fn remove(&self, id: NodeId) -> Result<(), Error> {
        self.change_membership(MembershipChange::Remove { id })
            .await
    }

    /// Holds this node's elections back, or lets it call them again (see [`ElectionHold`]).
    /// An `UntilMembership` hold lifts itself as soon as the node's own log holds that
    /// membership.
    pub fn hold_elections(&self, hold: ElectionHold) {
        let mut c = self.campaign.lock().unwrap_or_else(|p| p.into_inner());
        if c.hold == hold {
            return;
        }
        c.hold = hold;
        c.apply(&self.raft);
        if !matches!(hold, ElectionHold::UntilMembership(_)) || c.watching {
            return;
        }
        c.watching = true;
        let (campaign, raft) = (self.campaign.clone(), self.raft.clone());
        tokio::spawn(async move {
            let mut metrics = raft.metrics();
            loop {
                {
                    let mut c = campaign.lock().unwrap_or_else(|p| p.into_inner());
                    let index = membership_index(&metrics.borrow_and_update());
                    // Done once the hold has lifted or is no longer one that waits (whoever
                    // changed it applied it).
                    if !matches!(c.hold, ElectionHold::UntilMembership(_)) || !c.held(index) {
                        c.watching = false;
                        c.apply(&raft);
                        return;
                    }
                }
                if metrics.changed().await.is_err() {
                    return; // shut down
                }
            }
        });
    }

    /// Whether the host's hold keeps this node from calling elections right now.
    pub fn elections_held(&self) -> bool {
        let c = self.campaign.lock().unwrap_or_else(|p| p.into_inner());
        c.held(membership_index(&self.raft.metrics().borrow()))
    }

    /// A snapshot chunk came from the leader: no elections until [`SNAPSHOT_QUIET`] after the
    /// last one.
    pub(crate) fn snapshot_chunk_arrived(&self) {
        let mut c = self.campaign.lock().unwrap_or_else(|p| p.into_inner());
        if c.receiving_until
            .replace(Instant::now() + SNAPSHOT_QUIET)
            .is_some()
        {
            return; // already quiet, and a task is waiting to lift it
        }
        c.apply(&self.raft);
        let (campaign, raft) = (self.campaign.clone(), self.raft.clone());
        tokio::spawn(async move {
            loop {
                let until = {
                    let mut c = campaign.lock().unwrap_or_else(|p| p.into_inner());
                    match c.receiving_until {
                        Some(t) if t > Instant::now() => t,
                        _ => {
                            c.receiving_until = None;
                            c.apply(&raft);
                            return;
                        }
                    }
                };
                tokio::time::sleep_until(until.into()).await;
            }
        });
    }

    /// Completes a joint membership on its way to `voters`.
    pub async fn finish_change(&self, voters: BTreeSet<NodeId>) -> Result<(), Error> {
        self.change_membership(MembershipChange::Finish { voters })
            .await
    }

    /// Applies a membership change on the leader, wherever it is.
    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), Error> {
        self.on_leader(
            "membership change",
            transport::server_paths::FORWARD_MEMBERSHIP,
            change,
            self.membership_timeout,
            |c| self.change_as_leader(c),
        )
        .await
    }

    pub(crate) async fn change_as_leader(&self, change: MembershipChange) -> Result<(), WireError> {
        // Membership changes are one at a time: one that finds another in progress waits for
        // it (bounded by the membership timeout) instead of failing.
        let deadline = Instant::now() + self.membership_timeout;
        loop {
            match self.try_change_as_leader(change.clone()).await {
                Err(WireError::InvalidInput(m))
                    if m.starts_with(IN_PROGRESS) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(WireError::InvalidInput(m)) if m.starts_with(IN_PROGRESS) => {
                    return Err(WireError::Unavailable(
                        m.trim_start_matches(IN_PROGRESS).to_string(),
                    ))
                }
                other => return other,
            }
        }
    }

    async fn try_change_as_leader(&self, change: MembershipChange) -> Result<(), WireError> {
        let r = match change {
            MembershipChange::AddLearner { id, info } => {
                self.raft.add_learner(id, info, true).await
            }
            MembershipChange::Promote { id } => {
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
            }
            MembershipChange::Demote { id } => {
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), true)
                    .await
            }
            MembershipChange::Remove { id } => {
                let is_voter = self
                    .raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == id);
                let change = if is_voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                };
                self.raft.change_membership(change, false).await
            }
            MembershipChange::SetVoters { voters } => {
                self.raft.change_membership(voters, false).await
            }
            MembershipChange::Finish { voters } => self.raft.change_membership(voters, true).await,
        };
        match r {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WireError::NotLeader(f.leader_id))
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(e),
            ))) => Err(WireError::InvalidInput(format!("{IN_PROGRESS}{e}"))),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(WireError::InvalidInput(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(fatal_error(&f)),
        }
    }

    /// Stops Raft and the proposer, and waits until the data dir is released (the log's
    /// flusher thread has ended). Pending writes fail with `Unavailable`.
    pub async fn shutdown(&self) -> Result<(), Error> {
        if let Some(p) = self
            .proposer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            p.abort();
        }
        self.raft
            .shutdown()
            .await
            .map_err(|e| Error::Internal(format!("Raft did not stop cleanly: {e}")))?;
        let flusher = self
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = flusher {
            let joined = tokio::task::spawn_blocking(move || h.join());
            if tokio::time::timeout(Duration::from_secs(10), joined)
                .await
                .is_err()
            {
                tracing::warn!("the Raft log flusher did not stop within 10 s");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_batches_stop_at_the_count_or_the_bytes_but_take_at_least_one() {
        assert_eq!(forward_batch_len(std::iter::empty()), 0);
        assert_eq!(forward_batch_len([10; 5].into_iter()), 5);
        assert_eq!(
            forward_batch_len(std::iter::repeat_n(10, MAX_FORWARD_BATCH + 7)),
            MAX_FORWARD_BATCH
        );
        let mib = 1 << 20;
        // Two 1 MiB writes fill a batch; the third waits for the next call.
        assert_eq!(forward_batch_len([mib; 12].into_iter()), 2);
        // One write larger than a batch still goes, alone.
        assert_eq!(forward_batch_len([20 * mib, 10].into_iter()), 1);
    }
}
