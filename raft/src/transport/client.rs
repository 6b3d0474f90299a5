//! The client side of the peer transport.
//!
//! [`PeerPool`] keeps one HTTP/2 connection per peer address and multiplexes every request to
//! that peer over it. A connection that fails is dropped and the next request dials again; there
//! is no retry loop here. openraft decides when to retry, and backs off after `Unreachable`.
//!
//! Error mapping, for openraft:
//! - dialing, TLS or a refused connection -> `Unreachable` (openraft backs off before retrying);
//! - no answer within `RPCOption::hard_ttl` -> `Timeout`;
//! - a connection that broke after the request was sent -> `Network`;
//! - the remote Raft's own error -> `RemoteError`.

use std::collections::HashMap;
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

/// One pooled HTTP/2 connection per peer address.
pub struct PeerPool {
    connector: TlsConnector,
    conns: Mutex<HashMap<String, SendRequest<Full<Bytes>>>>,
    /// Told the peer address whenever a Raft RPC finds a peer unreachable or times out: the
    /// failure detector takes it as evidence (see [`PeerPool::on_raft_failure`]).
    raft_failure: Mutex<Option<RaftFailureHook>>,
}

/// See [`PeerPool::on_raft_failure`].
pub type RaftFailureHook = Arc<dyn Fn(&str) + Send + Sync>;

impl PeerPool {
    /// A pool that dials peers with `tls` (a client config with this node's certificate and the
    /// cluster CA as the only root). ALPN is set to `h2`.
    pub fn new(tls: Arc<rustls::ClientConfig>) -> PeerPool {
        let mut config = (*tls).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        PeerPool {
            connector: TlsConnector::from(Arc::new(config)),
            conns: Mutex::new(HashMap::new()),
            raft_failure: Mutex::new(None),
        }
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
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        match conns.get(addr) {
            Some(c) if !c.is_closed() => Some(c.clone()),
            Some(_) => {
                conns.remove(addr);
                None
            }
            None => None,
        }
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
        let host = host_of(addr);
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| unreachable(format!("{host:?} is not a valid TLS server name: {e}")))?;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(format!("TLS handshake: {e}")))?;
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
    /// call, dialing included, is bounded by `timeout`.
    pub async fn call(
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
                self.pool.raft_failed(&self.node.peer_addr);
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(CallError::Timeout { timeout, .. }) => {
                self.pool.raft_failed(&self.node.peer_addr);
                Err(RPCError::Timeout(Timeout {
                    action,
                    // The local id is not known here; openraft only displays it.
                    id: self.target,
                    target: self.target,
                    timeout,
                }))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.send(super::APPEND, RPCTypes::AppendEntries, &rpc, &option)
            .await
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

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_splits_ipv4_ipv6_and_names() {
        assert_eq!(host_of("127.0.0.1:2380"), "127.0.0.1");
        assert_eq!(host_of("[::1]:2380"), "::1");
        assert_eq!(host_of("node-a.example:2380"), "node-a.example");
    }
}
