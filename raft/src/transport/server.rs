//! The server side of the peer transport.
//!
//! [`PeerServer::serve`] accepts TLS connections (HTTP/2, and HTTP/1.1 for the fallback's
//! clients) and routes each request:
//! - `/raft/...` needs a client certificate verified by the cluster CA. The server config may
//!   make client certificates optional (so a joining node without one can reach `/join`); a Raft
//!   route without one is refused with 403 and never reaches Raft.
//! - everything else goes to the caller's [`Fallback`], with the verified [`PeerCertificate`]
//!   (if any) and the [`RemoteAddr`] in the request extensions; 404 without a fallback.
//!
//! Handlers are thin: decode, call the [`RaftNode`], encode.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::MAX_BODY;
use crate::codec::{decode, encode};
use crate::node::{MembershipChange, RaftNode};
use crate::types::{NodeId, TypeConfig};

/// The leaf certificate a peer presented, verified against the cluster CA by rustls.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub CertificateDer<'static>);

/// The remote socket address of the connection.
#[derive(Debug, Clone, Copy)]
pub struct RemoteAddr(pub SocketAddr);

/// A handler for every non-Raft path (join, gossip).
pub type Fallback = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// The peer listener.
pub struct PeerServer;

fn plain(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(msg.into())));
    *resp.status_mut() = status;
    resp
}

impl PeerServer {
    /// Serves peers on `listener` until `shutdown` resolves. `tls` should verify client
    /// certificates against the cluster CA (optionally: then only Raft routes demand one). ALPN
    /// `h2`, `http/1.1` and the framed protocol's `eden-raft/1` are offered.
    pub async fn serve(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        node: Arc<RaftNode>,
        fallback: Option<Fallback>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), crate::Error> {
        let mut config = (*tls).clone();
        config.alpn_protocols = vec![
            b"h2".to_vec(),
            b"http/1.1".to_vec(),
            super::framed::ALPN.to_vec(),
        ];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let mut shutdown = std::pin::pin!(shutdown);
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (tcp, remote) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving the others.
                        tracing::warn!("peer listener accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            super::keep_alive(&tcp);
            let acceptor = acceptor.clone();
            let node = node.clone();
            let fallback = fallback.clone();
            conns.spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::info!(%remote, "peer TLS handshake refused: {e}");
                        return;
                    }
                };
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| PeerCertificate(c.clone().into_owned()));
                if tls.get_ref().1.alpn_protocol() == Some(super::framed::ALPN) {
                    // Only the Raft routes are framed, and they need a member's certificate:
                    // a client without one (a joining node may connect without) gets nothing
                    // read or queued for it.
                    if cert.is_none() {
                        tracing::info!(
                            %remote,
                            "peer chose the framed protocol without a client certificate; closed"
                        );
                        return;
                    }
                    super::framed::serve(tls, remote, move |path: String, body: Bytes| {
                        let node = node.clone();
                        async move {
                            let (status, body) = raft_route(&path, &body, node).await;
                            (status.as_u16(), body)
                        }
                    })
                    .await;
                    return;
                }
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let node = node.clone();
                    let fallback = fallback.clone();
                    let cert = cert.clone();
                    async move {
                        req.extensions_mut().insert(RemoteAddr(remote));
                        if let Some(c) = &cert {
                            req.extensions_mut().insert(c.clone());
                        }
                        Ok::<_, std::convert::Infallible>(
                            route(req, cert.is_some(), node, fallback).await,
                        )
                    }
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http2()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .adaptive_window(true)
                    .max_frame_size(1 << 20)
                    .max_concurrent_streams(1024);
                if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                    tracing::debug!(%remote, "peer connection ended: {e}");
                }
            });
            // Reap finished connections so the set does not grow.
            while conns.try_join_next().is_some() {}
        }
        conns.shutdown().await;
        Ok(())
    }
}

async fn route(
    req: Request<Incoming>,
    verified_peer: bool,
    node: Arc<RaftNode>,
    fallback: Option<Fallback>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if !path.starts_with("/raft/") {
        return match fallback {
            Some(f) => f(req).await,
            None => plain(StatusCode::NOT_FOUND, format!("no handler for {path}")),
        };
    }
    if !verified_peer {
        let (status, body) = refuse_anonymous(&path);
        return answer(status, body);
    }
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes POST"));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("reading {path} body: {e}")),
    };
    let (status, body) = raft_route(&path, &body, node).await;
    answer(status, body)
}

fn answer(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp
}

fn refuse_anonymous(path: &str) -> (StatusCode, Bytes) {
    (
        StatusCode::FORBIDDEN,
        Bytes::from(format!(
            "{path} needs a client certificate signed by the cluster CA"
        )),
    )
}

/// Answers one Raft route (over HTTP/2 or the framed protocol) for a verified peer.
async fn raft_route(path: &str, body: &[u8], node: Arc<RaftNode>) -> (StatusCode, Bytes) {
    match path {
        super::APPEND => {
            handle(path, body, |r: AppendEntriesRequest<TypeConfig>| async move {
                node.raft().append_entries(r).await
            })
            .await
        }
        super::VOTE => {
            handle(path, body, |r: VoteRequest<NodeId>| async move {
                node.raft().vote(r).await
            })
            .await
        }
        super::SNAPSHOT => {
            handle(path, body, |r: InstallSnapshotRequest<TypeConfig>| async move {
                node.snapshot_chunk_arrived();
                node.raft().install_snapshot(r).await
            })
            .await
        }
        super::FORWARD_WRITE => {
            handle(path, body, |cmd: eden_storage::Command| async move {
                node.write_as_leader(cmd).await
            })
            .await
        }
        super::FORWARD_WRITES => {
            handle(path, body, |cmds: Vec<eden_storage::Command>| async move {
                Ok::<_, crate::error::WireError>(node.write_many_as_leader(cmds).await)
            })
            .await
        }
        super::FORWARD_READ_INDEX => {
            handle(path, body, |(): ()| async move { node.read_index_as_leader().await }).await
        }
        super::FORWARD_MEMBERSHIP => {
            handle(path, body, |c: MembershipChange| async move {
                node.change_as_leader(c).await
            })
            .await
        }
        _ => (
            StatusCode::NOT_FOUND,
            Bytes::from(format!("no Raft route {path}")),
        ),
    }
}

async fn handle<Req, T, E, F, Fut>(path: &str, body: &[u8], f: F) -> (StatusCode, Bytes)
where
    Req: DeserializeOwned,
    T: Serialize,
    E: Serialize,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let req: Req = match decode(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Bytes::from(format!("{path} body: {e}")),
            )
        }
    };
    let result = f(req).await;
    match encode(&result) {
        Ok(bytes) => (StatusCode::OK, Bytes::from(bytes)),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Bytes::from(format!("{path} response: {e}")),
        ),
    }
}
