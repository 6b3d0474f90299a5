//! The client side of the peer transport.
//!
//! [`PeerPool`] keeps, per peer address, one framed connection for the Raft routes (see
//! [`framed`]) and one HTTP/2 connection for every other route (and for the Raft routes of a peer
//! that does not speak the framed protocol), each multiplexing every request to that peer. A
//! connection that fails is dropped and the next request dials again; there is no retry loop
//! here. openraft decides when to retry, and backs off after `Unreachable`.
//!
//! Error mapping, for openraft:
//! - dialing, TLS, a refused connection, or a framed request that was never written (its
//!   connection had already ended) -> `Unreachable` (openraft backs off before retrying);
//! - no answer within `RPCOption::hard_ttl` -> `Timeout`;
//! - a connection that broke after the request was sent -> `Network`;
//! - the remote Raft's own error -> `RemoteError`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::RPCTypes;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::framed::{self, FramedConn};
use super::MAX_BODY;
use crate::codec::{decode, encode};
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// Why a call to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The peer could not be reached; the request was not sent.
    #[error("peer {addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// No answer in time; the request may or may not have been processed.
    #[error("peer {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    /// The connection broke after the request was sent, or the answer was not understood.
    #[error("peer {addr}: {reason}")]
    Network { addr: String, reason: String },
}

/// How long a peer that refused the framed protocol is only called over HTTP/2 before it is
/// offered the framed protocol again.
pub const RECHECK_FRAMED: Duration = Duration::from_secs(300);

/// Whether `addr` refused the framed protocol less than [`RECHECK_FRAMED`] before `now`; an
/// older refusal is forgotten.
fn still_http_only(
    http_only: &mut HashMap<String, std::time::Instant>,
    addr: &str,
    now: std::time::Instant,
) -> bool {
    match http_only.get(addr) {
        Some(since) if now.saturating_duration_since(*since) < RECHECK_FRAMED => true,
        Some(_) => {
            http_only.remove(addr);
            false
        }
        None => false,
    }
}

/// One pooled HTTP/2 connection per peer address, and one framed connection for the Raft routes.
pub struct PeerPool {
    connector: TlsConnector,
    conns: Mutex<HashMap<String, SendRequest<Full<Bytes>>>>,
    /// Dials with ALPN [`framed::ALPN`] only.
    framed_connector: TlsConnector,
    framed: Mutex<HashMap<String, Arc<FramedConn>>>,
    /// Peers that refused the framed protocol (an older eden), and when: their Raft routes go
    /// over HTTP/2 until [`RECHECK_FRAMED`] has passed (the peer may have been upgraded).
    http_only: Mutex<HashMap<String, std::time::Instant>>,
    /// Per Raft peer: failed RPCs and heartbeat round trips (see [`PeerPool::peer_stats`]).
    stats: Mutex<BTreeMap<NodeId, PeerStats>>,
    /// Told the peer address whenever a Raft RPC finds a peer unreachable or times out: the
    /// failure detector takes it as evidence (see [`PeerPool::on_raft_failure`]).
    raft_failure: Mutex<Option<RaftFailureHook>>,
}

/// See [`PeerPool::on_raft_failure`].
pub type RaftFailureHook = Arc<dyn Fn(&str) + Send + Sync>;

impl PeerPool {
    /// A pool that dials peers with `tls` (a client config with this node's certificate and the
    /// cluster CA as the only root). HTTP/2 connections ask for ALPN `h2`, framed ones for
    /// [`framed::ALPN`] only.
    pub fn new(tls: Arc<rustls::ClientConfig>) -> PeerPool {
        let mut config = (*tls).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let mut framed_config = (*tls).clone();
        framed_config.alpn_protocols = vec![framed::ALPN.to_vec()];
        PeerPool {
            connector: TlsConnector::from(Arc::new(config)),
            conns: Mutex::new(HashMap::new()),
            framed_connector: TlsConnector::from(Arc::new(framed_config)),
            framed: Mutex::new(HashMap::new()),
            http_only: Mutex::new(HashMap::new()),
            stats: Mutex::new(BTreeMap::new()),
            raft_failure: Mutex::new(None),
        }
    }

    /// Failed Raft RPCs and heartbeat round trips per peer this node sent to, by Raft id.
    pub fn peer_stats(&self) -> Vec<(NodeId, PeerStats)> {
        lock(&self.stats)
            .iter()
            .map(|(id, s)| (*id, s.clone()))
            .collect()
    }

    fn record(&self, target: NodeId, f: impl FnOnce(&mut PeerStats)) {
        f(lock(&self.stats).entry(target).or_default());
    }

    /// Calls `hook(peer_addr)` each time a Raft RPC (append, vote, snapshot) to that peer is
    /// unreachable or times out. Replaces any earlier hook.
    pub fn on_raft_failure(&self, hook: RaftFailureHook) {
        *self.raft_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    fn raft_failed(&self, addr: &str) {
        let hook = self
            .raft_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook(addr);
        }
    }

    fn cached(&self, addr: &str) -> Option<SendRequest<Full<Bytes>>> {
        live(&self.conns, addr, |c| c.is_closed())
    }

    fn forget(&self, addr: &str) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
    }

    async fn dial(&self, addr: &str) -> Result<SendRequest<Full<Bytes>>, CallError> {
        let unreachable = |reason: String| CallError::Unreachable {
            addr: addr.to_string(),
            reason,
        };
        let tls = match connect(&self.connector, addr).await {
            Ok(t) => t,
            Err(Dial::Failed(reason)) => return Err(unreachable(reason)),
            Err(Dial::Handshake(e)) => return Err(unreachable(format!("TLS handshake: {e}"))),
        };
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .adaptive_window(true)
            .max_frame_size(1 << 20)
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(format!("HTTP/2 handshake: {e}")))?;
        let peer = addr.to_string();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer, "peer connection closed: {e}");
            }
        });
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_string(), sender.clone());
        Ok(sender)
    }

    /// POSTs `body` to `path` on the peer at `addr` and returns the response body. The whole
    /// call, dialing included, is bounded by `timeout`. Raft routes (`/raft/...`) go over the
    /// framed protocol, every other route over HTTP/2.
    pub async fn call(
        &self,
        addr: &str,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        if path.starts_with("/raft/") && self.may_speak_framed(addr) {
            let started = tokio::time::Instant::now();
            match self.call_framed(addr, path, &body, timeout).await {
                Err(FramedError::NotSpoken) => {
                    tracing::info!(
                        peer = addr,
                        "peer does not speak {}; using HTTP/2",
                        "eden-raft/1"
                    );
                    lock(&self.http_only).insert(addr.to_string(), std::time::Instant::now());
                    // The fallback gets what is left of the caller's time.
                    let left = timeout.saturating_sub(started.elapsed());
                    return self.call_http2(addr, path, body, left).await;
                }
                Err(FramedError::Call(e)) => return Err(e),
                Ok(bytes) => return Ok(bytes),
            }
        }
        self.call_http2(addr, path, body, timeout).await
    }

    /// False while `addr` is known to refuse the framed protocol (for [`RECHECK_FRAMED`]).
    fn may_speak_framed(&self, addr: &str) -> bool {
        !still_http_only(&mut lock(&self.http_only), addr, std::time::Instant::now())
    }

    /// [`PeerPool::call`] over HTTP/2 whatever the route, as to a peer that does not speak the
    /// framed protocol.
    pub async fn call_http2(
        &self,
        addr: &str,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        match tokio::time::timeout(timeout, self.call_inner(addr, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout {
                addr: addr.to_string(),
                timeout,
            }),
        }
    }

    /// Whether calls to the Raft routes of `addr` currently go over an open framed connection
    /// (rather than HTTP/2, or no connection yet).
    pub fn speaks_framed(&self, addr: &str) -> bool {
        lock(&self.framed).get(addr).is_some_and(|c| !c.is_closed())
    }

    fn cached_framed(&self, addr: &str) -> Option<Arc<FramedConn>> {
        live(&self.framed, addr, |c| c.is_closed())
    }

    /// Drops `conn` from the pool, unless another call already replaced it.
    fn forget_framed(&self, addr: &str, conn: &Arc<FramedConn>) {
        let mut conns = lock(&self.framed);
        if conns.get(addr).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            conns.remove(addr);
        }
    }

    async fn dial_framed(&self, addr: &str) -> Result<Arc<FramedConn>, FramedError> {
        let unreachable = |reason: String| {
            FramedError::Call(CallError::Unreachable {
                addr: addr.to_string(),
                reason,
            })
        };
        let tls = match connect(&self.framed_connector, addr).await {
            Ok(t) => t,
            Err(Dial::Failed(reason)) => return Err(unreachable(reason)),
            Err(Dial::Handshake(e)) => {
                let refused = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(|e| {
                        *e == rustls::Error::AlertReceived(
                            rustls::AlertDescription::NoApplicationProtocol,
                        )
                    });
                return Err(if refused {
                    FramedError::NotSpoken
                } else {
                    unreachable(format!("TLS handshake: {e}"))
                });
            }
        };
        if tls.get_ref().1.alpn_protocol() != Some(framed::ALPN) {
            return Err(FramedError::NotSpoken);
        }
        let conn = Arc::new(FramedConn::start(tls, addr.to_string()));
        lock(&self.framed).insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    async fn call_framed(
        &self,
        addr: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, FramedError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || {
            FramedError::Call(CallError::Timeout {
                addr: addr.to_string(),
                timeout,
            })
        };
        let conn = match self.cached_framed(addr) {
            Some(c) => c,
            None => tokio::time::timeout_at(deadline, self.dial_framed(addr))
                .await
                .map_err(|_| timed_out())??,
        };
        let read_before = conn.frames_read();
        let (status, bytes) = match tokio::time::timeout_at(deadline, conn.call(path, body)).await {
            Err(_) => {
                // Nothing at all came back while waiting: the connection may be dead without
                // knowing it (a cut link). The next call dials again.
                if conn.frames_read() == read_before {
                    self.forget_framed(addr, &conn);
                }
                return Err(timed_out());
            }
            Ok(Err(framed::CallFailed::NotSent(reason))) => {
                // Nothing reached the peer: safe to try again (a forwarded write retries).
                if conn.is_closed() {
                    self.forget_framed(addr, &conn);
                }
                return Err(FramedError::Call(CallError::Unreachable {
                    addr: addr.to_string(),
                    reason,
                }));
            }
            Ok(Err(framed::CallFailed::Lost(reason))) => {
                self.forget_framed(addr, &conn);
                return Err(FramedError::Call(CallError::Network {
                    addr: addr.to_string(),
                    reason,
                }));
            }
            Ok(Ok(answer)) => answer,
        };
        if status != 200 {
            let status = StatusCode::from_u16(status)
                .map(|s| s.to_string())
                .unwrap_or_else(|_| status.to_string());
            return Err(FramedError::Call(CallError::Network {
                addr: addr.to_string(),
                reason: format!(
                    "{path} answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            }));
        }
        Ok(bytes)
    }

    async fn call_inner(&self, addr: &str, path: &str, body: Vec<u8>) -> Result<Bytes, CallError> {
        let mut sender = match self.cached(addr) {
            Some(s) => s,
            None => self.dial(addr).await?,
        };
        let network = |reason: String| CallError::Network {
            addr: addr.to_string(),
            reason,
        };
        if let Err(e) = sender.ready().await {
            self.forget(addr);
            return Err(CallError::Unreachable {
                addr: addr.to_string(),
                reason: format!("connection lost: {e}"),
            });
        }
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("https://{addr}{path}"))
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| network(format!("building request: {e}")))?;
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.forget(addr);
                return Err(network(format!("request failed: {e}")));
            }
        };
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| network(format!("reading response: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(network(format!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        Ok(bytes)
    }

    /// [`PeerPool::call`] with bincode request and `Result<T, E>` response.
    pub(crate) async fn rpc<Req: Serialize, T: DeserializeOwned, E: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Result<T, E>, CallError> {
        let body = encode(req).map_err(|e| CallError::Network {
            addr: addr.to_string(),
            reason: e,
        })?;
        let bytes = self.call(addr, path, body, timeout).await?;
        decode(&bytes).map_err(|e| CallError::Network {
            addr: addr.to_string(),
            reason: format!("{path} response: {e}"),
        })
    }
}

/// The pooled connection to `addr`, unless it has closed (then it is dropped from the pool).
fn live<C: Clone>(
    pool: &Mutex<HashMap<String, C>>,
    addr: &str,
    is_closed: impl Fn(&C) -> bool,
) -> Option<C> {
    let mut conns = lock(pool);
    match conns.get(addr) {
        Some(c) if !is_closed(c) => Some(c.clone()),
        Some(_) => {
            conns.remove(addr);
            None
        }
        None => None,
    }
}

enum Dial {
    /// No TLS session started: a bad name or no TCP connection.
    Failed(String),
    Handshake(std::io::Error),
}

/// Connects to `addr` over TCP (no Nagle delay) and runs the TLS handshake; the host part of
/// `addr` is the server name.
async fn connect(
    connector: &TlsConnector,
    addr: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Dial> {
    let host = host_of(addr);
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| Dial::Failed(format!("{host:?} is not a valid TLS server name: {e}")))?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| Dial::Failed(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    super::keep_alive(&tcp);
    connector.connect(name, tcp).await.map_err(Dial::Handshake)
}

/// Upper bounds (seconds) of the heartbeat round-trip buckets: 0.1 ms doubling to 0.8192 s,
/// as etcd buckets `etcd_network_peer_round_trip_time_seconds`.
pub const RTT_BUCKETS: [f64; 14] = [
    0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.1024, 0.2048,
    0.4096, 0.8192,
];

/// What one node saw of one peer's Raft RPCs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerStats {
    /// Raft RPCs to the peer that failed: unreachable, timed out or broken off.
    pub sent_failures: u64,
    /// Heartbeat round trips (appends without entries, so no fsync on the peer) per
    /// [`RTT_BUCKETS`] bucket (not cumulative), then those above the last bound.
    pub rtt_buckets: [u64; 15],
    pub rtt_count: u64,
    pub rtt_sum_seconds: f64,
    /// The largest append sent, in about how many bytes its commands take
    /// ([`eden_storage::Command::approx_len`]); the log reader keeps it near
    /// [`MAX_APPEND_BYTES`].
    pub largest_append: usize,
}

impl PeerStats {
    fn round_trip(&mut self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = RTT_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(RTT_BUCKETS.len());
        self.rtt_buckets[i] += 1;
        self.rtt_count += 1;
        self.rtt_sum_seconds += secs;
    }
}

/// How a framed call failed.
enum FramedError {
    /// The peer does not offer the framed protocol; use HTTP/2.
    NotSpoken,
    Call(CallError),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(addr: &str) -> &str {
    let host = match addr.rfind(':') {
        Some(i) => &addr[..i],
        None => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// openraft's network factory: a [`PeerNetwork`] per target, all sharing one [`PeerPool`].
#[derive(Clone)]
pub struct NetworkFactory {
    pool: Arc<PeerPool>,
}

impl NetworkFactory {
    pub fn new(pool: Arc<PeerPool>) -> NetworkFactory {
        NetworkFactory { pool }
    }
}

/// The connection to one peer, as openraft uses it.
pub struct PeerNetwork {
    pool: Arc<PeerPool>,
    target: NodeId,
    node: NodeInfo,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerNetwork {
        PeerNetwork {
            pool: self.pool.clone(),
            target,
            node: node.clone(),
        }
    }
}

impl PeerNetwork {
    async fn send<Req, Resp, E>(
        &self,
        path: &str,
        action: RPCTypes,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let r = self
            .pool
            .rpc::<Req, Resp, RaftError<NodeId, E>>(
                &self.node.peer_addr,
                path,
                req,
                option.hard_ttl(),
            )
            .await;
        match r {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                remote,
            ))),
            Err(e @ CallError::Unreachable { .. }) => {
                self.pool.record(self.target, |s| s.sent_failures += 1);
                self.pool.raft_failed(&self.node.peer_addr);
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(CallError::Timeout { timeout, .. }) => {
                self.pool.record(self.target, |s| s.sent_failures += 1);
                self.pool.raft_failed(&self.node.peer_addr);
                Err(RPCError::Timeout(Timeout {
                    action,
                    // The local id is not known here; openraft only displays it.
                    id: self.target,
                    target: self.target,
                    timeout,
                }))
            }
            Err(e) => {
                self.pool.record(self.target, |s| s.sent_failures += 1);
                Err(RPCError::Network(NetworkError::new(&e)))
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        let heartbeat = rpc.entries.is_empty();
        if !heartbeat {
            let bytes: usize = rpc.entries.iter().map(entry_bytes).sum();
            self.pool.record(self.target, |s| {
                s.largest_append = s.largest_append.max(bytes)
            });
        }
        let started = std::time::Instant::now();
        let answer = self
            .send(super::APPEND, RPCTypes::AppendEntries, &rpc, &option)
            .await;
        if heartbeat && answer.is_ok() {
            let took = started.elapsed();
            self.pool.record(self.target, |s| s.round_trip(took));
        }
        answer
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(super::SNAPSHOT, RPCTypes::InstallSnapshot, &rpc, &option)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.send(super::VOTE, RPCTypes::Vote, &rpc, &option).await
    }
}

/// The most bytes of log records one append carries (the log reader stops there:
/// `LogReader::limited_get_log_entries`). openraft 0.9 gives every append the heartbeat interval
/// (100 ms) to be answered, large or not, and retries one that takes longer as it was: a
/// follower catching up on large values must get them in calls small enough to be sent, written
/// and fsynced in that time, or it never catches up and, hearing no leader meanwhile, calls
/// elections.
pub const MAX_APPEND_BYTES: usize = 4 << 20;

/// About how many bytes `e` takes in an append.
fn entry_bytes(e: &openraft::Entry<TypeConfig>) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(b) => b.0.iter().map(|c| c.approx_len()).sum::<usize>() + 32,
        _ => 256,
    }
}

#[cfg(test)]
mod tests {
    use super::{host_of, still_http_only, RECHECK_FRAMED};

    #[test]
    fn a_peer_that_refused_the_framed_protocol_is_offered_it_again_later() {
        let t0 = std::time::Instant::now();
        let mut map = std::collections::HashMap::from([("a:1".to_string(), t0)]);
        assert!(still_http_only(&mut map, "a:1", t0));
        assert!(still_http_only(
            &mut map,
            "a:1",
            t0 + RECHECK_FRAMED - std::time::Duration::from_secs(1)
        ));
        assert!(!still_http_only(&mut map, "b:1", t0));
        assert!(!still_http_only(&mut map, "a:1", t0 + RECHECK_FRAMED));
        assert!(map.is_empty(), "the old refusal is forgotten");
    }

    #[test]
    fn host_of_splits_ipv4_ipv6_and_names() {
        assert_eq!(host_of("127.0.0.1:2380"), "127.0.0.1");
        assert_eq!(host_of("[::1]:2380"), "::1");
        assert_eq!(host_of("node-a.example:2380"), "node-a.example");
    }
}
