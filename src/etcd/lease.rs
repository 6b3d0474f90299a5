//! The Lease service (Grant, Revoke, KeepAlive stream, TimeToLive, Leases) and the lease clock.
//!
//! The store knows each lease's granted TTL and its keys, never a deadline: time stays out of
//! the replicated state. Deadlines live in [`LeaseKeeper`], in memory on each node:
//! - Grant and KeepAlive set `deadline = now + ttl` on the node that served them.
//! - [`run_keeper`] acts only on the Raft leader. When it expires a lease it replicates
//!   `Command::LeaseRevoke`, so every replica deletes the lease's keys at the same revision.
//! - When a node becomes leader it extends every lease to `now + ttl`, as etcd's lessor
//!   `Promote` does, so a leader change never expires a lease early.
//! - TTLs below etcd's minimum (3/2 of the election timeout, rounded up: 2 s) are raised to it.
//!
//! - The leader's clock is the one that counts. A follower forwards KeepAlive and the remaining
//!   TTL of TimeToLive to the leader over the peer link ([`RENEW_PATH`], [`REMAINING_PATH`],
//!   served by [`Backend::lease_peer_request`]), as etcd forwards them.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eden_storage as st;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::errors::ApiError;
use super::kv::unexpected;
use super::pb::etcdserverpb as pb;
use super::Backend;

/// etcd's minimum lease TTL with its default election timeout, in seconds.
pub const MIN_LEASE_TTL: i64 = 2;
/// How often the leader looks for expired leases.
const KEEPER_TICK: Duration = Duration::from_millis(250);

/// Peer route (on the leader): renew a lease's deadline; answers the granted TTL, 0 if unknown.
pub const RENEW_PATH: &str = "/etcd/lease/renew";
/// Peer route (on the leader): seconds left on a lease; -1 if unknown.
pub const REMAINING_PATH: &str = "/etcd/lease/remaining";
/// How long a lease request may take to reach a leader, retries through a leader change
/// included: etcd's request timeout (5 s plus two default election timeouts).
const LEASE_REQUEST_TIMEOUT: Duration = Duration::from_secs(7);
/// Pause between attempts while no leader answers (etcd's throttle).
const LEASE_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Lease deadlines on this node. A std mutex: held only for map operations, never across an
/// await.
#[derive(Default)]
pub struct LeaseKeeper {
    deadlines: Mutex<HashMap<st::LeaseId, Instant>>,
    /// True while the deadlines belong to this node's current leadership: set by the keeper
    /// once it has (re)started every clock as leader, cleared when the node stops leading.
    current: std::sync::atomic::AtomicBool,
}

impl LeaseKeeper {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<st::LeaseId, Instant>> {
        self.deadlines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refresh(&self, id: st::LeaseId, ttl: i64) {
        self.lock()
            .insert(id, Instant::now() + Duration::from_secs(ttl.max(0) as u64));
    }

    fn forget(&self, id: st::LeaseId) {
        self.lock().remove(&id);
    }

    /// Whether `id`'s deadline has passed (and the keeper has yet to revoke it).
    fn expired(&self, id: st::LeaseId) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.current.load(Relaxed) && self.lock().get(&id).is_some_and(|d| *d <= Instant::now())
    }

    /// Seconds left before `id` expires, if this node has a deadline for it.
    fn remaining(&self, id: st::LeaseId) -> Option<i64> {
        let deadline = *self.lock().get(&id)?;
        Some(deadline.saturating_duration_since(Instant::now()).as_secs() as i64)
    }
}

/// Expires leases while this node leads. Runs until aborted (by [`super::serve`]).
pub async fn run_keeper(backend: Arc<Backend>) {
    let mut was_leader = false;
    let mut held = false;
    let mut tick = tokio::time::interval(KEEPER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !backend.node.is_leader() {
            was_leader = false;
            backend
                .leases
                .current
                .store(false, std::sync::atomic::Ordering::Relaxed);
            // Only the leader's deadlines count, and a new leader starts them afresh: drop
            // what grants through this node left, or they would pile up here.
            backend.leases.lock().clear();
            continue;
        }
        // Under a CORRUPT alarm every revoke would be refused: leases wait for the disarm
        // rather than filling the log with refused commands.
        let corrupt = backend
            .node
            .store()
            .alarms()
            .iter()
            .any(|a| a.alarm == st::AlarmType::Corrupt);
        if corrupt != held {
            held = corrupt;
            if corrupt {
                tracing::warn!("a CORRUPT alarm is up: no lease expires until it is disarmed");
            }
        }
        if corrupt {
            continue;
        }
        let leases = backend.node.store().lease_ttls();
        let now = Instant::now();
        let expired: Vec<st::LeaseId> = {
            let mut deadlines = backend.leases.lock();
            if !was_leader {
                // Newly elected: every lease gets its full TTL again (etcd's Promote).
                deadlines.clear();
            }
            let live: HashMap<st::LeaseId, i64> = leases.into_iter().collect();
            deadlines.retain(|id, _| live.contains_key(id));
            for (id, ttl) in &live {
                deadlines
                    .entry(*id)
                    .or_insert_with(|| now + Duration::from_secs((*ttl).max(0) as u64));
            }
            let mut expired: Vec<_> = deadlines
                .iter()
                .filter(|(_, deadline)| **deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            expired.sort_unstable();
            expired
        };
        was_leader = true;
        backend
            .leases
            .current
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for id in expired {
            match backend.node.write(st::Command::LeaseRevoke { id }).await {
                Ok(_) | Err(eden_raft::Error::Store(st::Error::LeaseNotFound)) => {
                    backend.leases.forget(id)
                }
                Err(e) => tracing::warn!("expiring lease {id:x} failed, will retry: {e}"),
            }
        }
    }
}

impl Backend {
    pub async fn lease_grant(
        &self,
        r: pb::LeaseGrantRequest,
    ) -> Result<pb::LeaseGrantResponse, ApiError> {
        self.check_quota(super::maintenance::Cost::LeaseGrant)
            .await?;
        let ttl = r.ttl.max(MIN_LEASE_TTL);
        let applied = self
            .node
            .write(st::Command::LeaseGrant { id: r.id, ttl })
            .await?;
        match applied.response {
            st::CommandResponse::LeaseGrant { id, ttl } => {
                self.leases.refresh(id, ttl);
                Ok(pb::LeaseGrantResponse {
                    header: self.header(applied.revision),
                    id,
                    ttl,
                    error: String::new(),
                })
            }
            other => Err(unexpected("lease grant", &other)),
        }
    }

    pub async fn lease_revoke(
        &self,
        r: pb::LeaseRevokeRequest,
    ) -> Result<pb::LeaseRevokeResponse, ApiError> {
        let applied = self
            .node
            .write(st::Command::LeaseRevoke { id: r.id })
            .await?;
        self.leases.forget(r.id);
        Ok(pb::LeaseRevokeResponse {
            header: self.header(applied.revision),
        })
    }

    /// On the leader: restart `id`'s clock. The granted TTL, or 0 if there is no such lease
    /// or it has expired already (as etcd, an expired lease is not brought back: the keeper
    /// revokes it).
    fn renew_local(&self, id: st::LeaseId) -> i64 {
        match self.node.store().lease(id) {
            Some(_) if self.leases.expired(id) => 0,
            Some(l) => {
                self.leases.refresh(id, l.ttl);
                l.ttl
            }
            None => 0,
        }
    }

    /// On the leader: seconds left on `id`, or -1 if there is no such lease.
    fn remaining_local(&self, id: st::LeaseId) -> i64 {
        match self.node.store().lease(id) {
            Some(l) => self.leases.remaining(id).unwrap_or(l.ttl),
            None => -1,
        }
    }

    /// Runs a lease clock request on the leader: here if this node leads, else over the peer
    /// link. Whichever node answers first confirms its leadership with a linearizable read.
    /// As etcd's `LeaseRenew`, a forward that fails (the leader just went) is tried again,
    /// with whichever node leads then, until [`LEASE_REQUEST_TIMEOUT`]; then `etcdserver:
    /// request timed out`.
    async fn on_leader(&self, path: &str, id: st::LeaseId) -> Result<i64, ApiError> {
        let deadline = tokio::time::Instant::now() + LEASE_REQUEST_TIMEOUT;
        let body = serde_json::to_vec(&id).map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut last_error = String::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                tracing::debug!(path, "lease request timed out; last error: {last_error}");
                return Err(ApiError::Unavailable(
                    "etcdserver: request timed out".into(),
                ));
            }
            // A follower that knows the leader forwards at once (the leader confirms its own
            // leadership); otherwise a linearizable read waits for a leader, or confirms this
            // one.
            let forward_now = matches!(self.node.leader(), Some((l, _)) if l != self.node.id());
            if !forward_now {
                match tokio::time::timeout(left, self.node.linearizable_read()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        last_error = e.to_string();
                        tokio::time::sleep(LEASE_RETRY_PAUSE.min(left)).await;
                        continue;
                    }
                    Err(_) => continue,
                }
            }
            let addr = match self.node.leader() {
                Some((leader, _)) if leader == self.node.id() => {
                    return Ok(self.local_lease_request(path, id));
                }
                Some((_, info)) => info.peer_addr,
                None => {
                    last_error = "no leader".into();
                    tokio::time::sleep(LEASE_RETRY_PAUSE.min(left)).await;
                    continue;
                }
            };
            match self
                .node
                .peer_pool()
                .call(&addr, path, body.clone(), left)
                .await
            {
                Ok(answer) => {
                    return serde_json::from_slice(&answer).map_err(|e| {
                        ApiError::Internal(format!(
                            "the leader's answer to {path} is not a number: {e}"
                        ))
                    })
                }
                Err(e) => {
                    last_error = e.to_string();
                    tokio::time::sleep(LEASE_RETRY_PAUSE.min(left)).await;
                }
            }
        }
    }

    fn local_lease_request(&self, path: &str, id: st::LeaseId) -> i64 {
        if path == RENEW_PATH {
            self.renew_local(id)
        } else {
            self.remaining_local(id)
        }
    }

    /// Serves the lease routes of the peer port (a JSON lease id in, a JSON number out).
    /// `None` if `path` is not one of them. Refuses when this node is no longer the leader, so
    /// a stale follower view never renews on the wrong clock.
    pub async fn lease_peer_request(
        &self,
        path: &str,
        body: &[u8],
    ) -> Option<Result<Vec<u8>, String>> {
        if path != RENEW_PATH && path != REMAINING_PATH {
            return None;
        }
        let id: st::LeaseId = match serde_json::from_slice(body) {
            Ok(id) => id,
            Err(e) => return Some(Err(format!("{path}: the body must be a lease id: {e}"))),
        };
        if let Err(e) = self.node.linearizable_read().await {
            return Some(Err(format!("{path}: {e}")));
        }
        if !self.node.is_leader() {
            return Some(Err(format!("{path}: this node is not the leader")));
        }
        let answer = self.local_lease_request(path, id);
        Some(serde_json::to_vec(&answer).map_err(|e| e.to_string()))
    }

    /// One keep-alive: the lease's TTL, or TTL 0 if it does not exist (etcd answers so rather
    /// than failing the stream).
    pub async fn lease_keep_alive(
        &self,
        r: pb::LeaseKeepAliveRequest,
    ) -> Result<pb::LeaseKeepAliveResponse, ApiError> {
        let ttl = self.on_leader(RENEW_PATH, r.id).await?;
        Ok(pb::LeaseKeepAliveResponse {
            header: self.header_now(),
            id: r.id,
            ttl,
        })
    }

    pub async fn lease_time_to_live(
        &self,
        r: pb::LeaseTimeToLiveRequest,
    ) -> Result<pb::LeaseTimeToLiveResponse, ApiError> {
        let remaining = self.on_leader(REMAINING_PATH, r.id).await?;
        if !self.node.is_leader() {
            // The granted TTL and the keys come from this replica: bring it up to date.
            self.node.linearizable_read().await?;
        }
        let header = self.header_now();
        Ok(match self.node.store().lease(r.id) {
            // etcd answers an unknown lease with TTL -1, not an error.
            None => pb::LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: -1,
                ..Default::default()
            },
            Some(l) => pb::LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: remaining.max(0),
                granted_ttl: l.ttl,
                keys: if r.keys { l.keys } else { Vec::new() },
            },
        })
    }

    pub async fn lease_leases(&self) -> Result<pb::LeaseLeasesResponse, ApiError> {
        self.node.linearizable_read().await?;
        // etcd lists leases by expiry, soonest first. Leases this node has no clock for (a
        // follower that never served them) sort by their TTL after the clocked ones.
        let mut leases: Vec<(Option<Instant>, i64, st::LeaseId)> = {
            let deadlines = self.leases.lock();
            self.node
                .store()
                .leases()
                .into_iter()
                .map(|l| (deadlines.get(&l.id).copied(), l.ttl, l.id))
                .collect()
        };
        leases.sort_by_key(|(deadline, ttl, id)| (deadline.is_none(), *deadline, *ttl, *id));
        Ok(pb::LeaseLeasesResponse {
            header: self.header_now(),
            leases: leases
                .into_iter()
                .map(|(_, _, id)| pb::LeaseStatus { id })
                .collect(),
        })
    }
}

pub struct LeaseService {
    backend: Arc<Backend>,
}

impl LeaseService {
    pub fn new(backend: Arc<Backend>) -> LeaseService {
        LeaseService { backend }
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        Ok(Response::new(
            self.backend.lease_grant(req.into_inner()).await?,
        ))
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        Ok(Response::new(
            self.backend.lease_revoke(req.into_inner()).await?,
        ))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut requests = req.into_inner();
        let backend = self.backend.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(next) = requests.next().await {
                let resp = match next {
                    Ok(r) => backend.lease_keep_alive(r).await.map_err(Status::from),
                    // A message that could not be read (too large) ends the stream with its
                    // status, as etcd's does.
                    Err(status) => Err(super::limits::grpc_go_status(&status).unwrap_or(status)),
                };
                let failed = resp.is_err();
                if tx.send(resp).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        Ok(Response::new(
            self.backend.lease_time_to_live(req.into_inner()).await?,
        ))
    }

    async fn lease_leases(
        &self,
        _req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        Ok(Response::new(self.backend.lease_leases().await?))
    }
}
