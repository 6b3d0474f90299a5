//! Joining a node to the cluster, over the peer port.
//!
//! ## The exchange
//! 1. The joining node parses its token (`eden1:<CA sha256>:<secret>`), makes a key pair and a
//!    CSR ([`pki::new_key_and_csr`]), and `POST /join`s a [`JoinRequest`] to any datastore node,
//!    over TLS with [`pki::pinned_client_config`]: the connection only completes if the server
//!    shows a CA with the pinned hash and a certificate that CA signed. Nothing is written on
//!    the joining side before this succeeds.
//! 2. The serving node ([`JoinService::join`]) checks the secret against the SHA-256 it keeps (a
//!    wrong secret gets 403 and changes nothing), checks the name is free, picks a new random
//!    raft id (ids are never reused), and signs the CSR's public key with the names it chooses
//!    itself. The [`JoinGrant`] carries the certificate, the CA, and for datastore-eligible nodes
//!    the CA key and the secret's hash (so they can admit nodes in turn).
//! 3. The joining node writes its TLS files, starts Raft (empty) and its peer listener, and then
//!    `POST /join/admit`s with its new certificate (mutual TLS). The serving node adds it as a
//!    learner (a standby; openraft waits until it has caught up). Membership changes are
//!    forwarded to the leader by `RaftNode`. Whether it becomes a voter is the role
//!    controller's decision (`controller.rs`).
//! 4. The joining node records `node.json`: from then on it restarts with `--data-dir` alone.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use eden_raft::{Fallback, NodeInfo, PeerCertificate, RaftNode};

use super::pki::{self, ClusterCa};
use crate::error::{Error, Result};

pub const JOIN: &str = "/join";
pub const ADMIT: &str = "/join/admit";
/// The membership as the answering member sees it ([`MemberList`]); for cluster nodes only.
pub const MEMBERS: &str = "/join/members";

/// Sent by the leader to a node it just retired from Raft: stop serving the etcd API now
/// (`serve::follow_membership` then confirms with [`MEMBERS`] and moves the agent's endpoints).
pub const RETIRED: &str = "/join/retired";

/// The answer of [`MEMBERS`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemberList {
    pub voters: Vec<(u64, NodeInfo)>,
    pub learners: Vec<(u64, NodeInfo)>,
    /// The log index of this membership, so an asker can tell a view older than its own.
    #[serde(default)]
    pub membership_index: u64,
}

impl MemberList {
    pub fn contains(&self, id: u64) -> bool {
        self.voters
            .iter()
            .chain(&self.learners)
            .any(|(i, _)| *i == id)
    }
}

/// Largest join request body.
const MAX_JOIN_BODY: usize = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub secret: String,
    pub name: String,
    pub csr_pem: String,
    pub peer_addr: String,
    pub client_addr: String,
    /// May this node hold the datastore (voter or standby)?
    pub datastore: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinGrant {
    pub raft_id: u64,
    pub cluster_id: u64,
    pub cluster_name: String,
    pub cert_pem: String,
    pub ca_pem: String,
    /// For datastore-eligible nodes: the CA key and the join secret's hash, so that they can
    /// admit nodes when the node that created the cluster is gone.
    pub ca_key_pem: Option<String>,
    pub secret_sha256: Option<String>,
    /// The client URLs of the datastore nodes: where an agent-only node reaches the etcd API.
    #[serde(default)]
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdmitRequest {
    pub raft_id: u64,
    pub info: NodeInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Admitted {
    pub voter: bool,
}

/// An error body: `{"error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ErrorBody {
    error: String,
}

/// The serving side: answers `/join` and `/join/admit` on the peer port, and hands the etcd
/// layer's peer routes (`/etcd/...`, lease clock forwarding) to [`crate::etcd::Backend`].
pub struct JoinService {
    pub ca: Arc<ClusterCa>,
    pub secret_sha256: String,
    pub cluster_id: u64,
    pub cluster_name: String,
    pub node: Arc<RaftNode>,
    pub etcd: Arc<crate::etcd::Backend>,
    /// Failure detection; answers `/gossip`.
    pub gossip: Arc<super::gossip::Gossip>,
    /// This node serves its client port without TLS (loopback only): agent-only nodes that
    /// join through it are told `http://` endpoints (a cluster's nodes are set up alike).
    pub client_plaintext: bool,
}

/// The host part of `host:port` (IPv6 in brackets allowed).
pub fn host_of(addr: &str) -> String {
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return sa.ip().to_string();
    }
    match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => addr.to_string(),
    }
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn refuse(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    json_response(status, &ErrorBody { error: msg.into() })
}

impl JoinService {
    /// The peer server's fallback handler.
    pub fn fallback(self: Arc<Self>) -> Fallback {
        Arc::new(move |req: Request<Incoming>| {
            let svc = self.clone();
            Box::pin(async move { svc.route(req).await })
        })
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if path.starts_with("/etcd/") {
            return self.etcd.peer_route(req).await;
        }
        if path == super::gossip::GOSSIP_PATH {
            return self.gossip.serve_request(req).await;
        }
        if req.method() != Method::POST {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes POST"));
        }
        let cert = req.extensions().get::<PeerCertificate>().cloned();
        let body = match Limited::new(req.into_body(), MAX_JOIN_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("reading {path}: {e}")),
        };
        match path.as_str() {
            super::controller::PING_PATH => {
                if cert.is_none() {
                    return refuse(StatusCode::FORBIDDEN, "ping is for cluster members");
                }
                json_response(StatusCode::OK, &"pong")
            }
            RETIRED => {
                if cert.is_none() {
                    return refuse(
                        StatusCode::FORBIDDEN,
                        "the retire notice is for cluster nodes",
                    );
                }
                if self.node.is_leader() {
                    return refuse(StatusCode::CONFLICT, "the leader is not retired");
                }
                tracing::info!(
                    "the leader retired this node from Raft: the etcd API stops serving"
                );
                self.etcd.set_serving(false);
                json_response(StatusCode::OK, &"ok")
            }
            MEMBERS => {
                if cert.is_none() {
                    return refuse(
                        StatusCode::FORBIDDEN,
                        "the member list is for cluster nodes",
                    );
                }
                if !self.etcd.is_serving() {
                    return refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "this node is outside the datastore membership; its view is stale",
                    );
                }
                let m = self.node.metrics();
                json_response(
                    StatusCode::OK,
                    &MemberList {
                        voters: m.voters.into_iter().collect(),
                        learners: m.learners.into_iter().collect(),
                        membership_index: m.membership_index,
                    },
                )
            }
            JOIN => match serde_json::from_slice::<JoinRequest>(&body) {
                Ok(r) => match self.join(r).await {
                    Ok(grant) => json_response(StatusCode::OK, &grant),
                    Err((status, msg)) => refuse(status, msg),
                },
                Err(e) => refuse(StatusCode::BAD_REQUEST, format!("join request: {e}")),
            },
            ADMIT => {
                if cert.is_none() {
                    return refuse(
                        StatusCode::FORBIDDEN,
                        "/join/admit needs the node certificate that /join issued",
                    );
                }
                match serde_json::from_slice::<AdmitRequest>(&body) {
                    Ok(r) => match self.admit(r).await {
                        Ok(a) => json_response(StatusCode::OK, &a),
                        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                    },
                    Err(e) => refuse(StatusCode::BAD_REQUEST, format!("admit request: {e}")),
                }
            }
            _ => refuse(StatusCode::NOT_FOUND, format!("no route {path}")),
        }
    }

    /// Step 2 of the exchange. Checks everything before it signs anything.
    pub async fn join(
        &self,
        req: JoinRequest,
    ) -> std::result::Result<JoinGrant, (StatusCode, String)> {
        if !pki::secret_matches(&req.secret, &self.secret_sha256) {
            tracing::warn!(name = %req.name, "join refused: wrong token secret");
            return Err((
                StatusCode::FORBIDDEN,
                "the join token's secret is wrong for this cluster; get the current token with \
                 `eden cluster token` (or DATA/admin/join-token on the first node)"
                    .into(),
            ));
        }
        validate_name(&req.name).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        let metrics = self.node.metrics();
        if let Some((id, _)) = metrics
            .voters
            .iter()
            .chain(metrics.learners.iter())
            .find(|(_, info)| info.name == req.name)
        {
            return Err((
                StatusCode::CONFLICT,
                format!(
                    "a node named {:?} is already a member (raft id {id}); pick another --name, \
                     or restart that node from its own data dir. If its data is lost, join \
                     again once the role controller has removed the dead member (after \
                     failover-after), or remove it first with `etcdctl member remove {id:x}`",
                    req.name
                ),
            ));
        }
        let raft_id =
            pki::random_id().map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let hosts = vec![host_of(&req.peer_addr), host_of(&req.client_addr)];
        let cert_pem = self
            .ca
            .sign_node_csr(&req.csr_pem, &req.name, &hosts)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        tracing::info!(name = %req.name, raft_id, "join granted; certificate issued");
        Ok(JoinGrant {
            raft_id,
            cluster_id: self.cluster_id,
            cluster_name: self.cluster_name.clone(),
            cert_pem,
            ca_pem: self.ca.cert_pem().to_string(),
            ca_key_pem: req.datastore.then(|| self.ca.key_pem().to_string()),
            secret_sha256: req.datastore.then(|| self.secret_sha256.clone()),
            endpoints: metrics
                .voters
                .values()
                .chain(metrics.learners.values())
                .map(|i| {
                    let scheme = if self.client_plaintext {
                        "http"
                    } else {
                        "https"
                    };
                    format!("{scheme}://{}", i.client_addr)
                })
                .collect(),
        })
    }

    /// Step 3: adds the node as a learner, then promotes it while voters are short.
    pub async fn admit(&self, req: AdmitRequest) -> Result<Admitted> {
        // Idempotent: a joining node that retries after a lost answer is already a member.
        let m = self.node.metrics();
        if m.voters.contains_key(&req.raft_id) {
            return Ok(Admitted { voter: true });
        }
        if m.learners.contains_key(&req.raft_id) {
            return Ok(Admitted { voter: false });
        }
        tracing::info!(id = req.raft_id, node = %req.info, "adding learner");
        self.node
            .add_learner(req.raft_id, req.info.clone())
            .await
            .map_err(|e| {
                Error::Unavailable(format!("adding {} as a learner: {e}", req.info.name))
            })?;
        // The role controller decides whether and when it becomes a voter.
        Ok(Admitted { voter: false })
    }
}

/// Node names become certificate names and KV keys: keep them to DNS-label characters.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "bad node name {name:?}: use 1-63 letters, digits, '-', '_' or '.', not starting \
             with '-' or '.'"
        )))
    }
}

/// POSTs `body` as JSON to `https://addr/path` over HTTP/1.1 and decodes the JSON answer.
/// A non-200 answer becomes an error carrying the server's message.
pub async fn post_json<Req: Serialize, Resp: serde::de::DeserializeOwned>(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    body: &Req,
    timeout: Duration,
) -> Result<Resp> {
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| Error::Unavailable(format!("cannot connect to {addr}: {e}")))?;
        let name = rustls::pki_types::ServerName::try_from(host_of(addr))
            .map_err(|e| Error::InvalidInput(format!("bad address {addr}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| Error::Unavailable(format!("TLS with {addr}: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Error::Unavailable(format!("HTTP with {addr}: {e}")))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(hyper::header::HOST, addr)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))
            .map_err(|e| Error::Internal(format!("request {path}: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Error::Unavailable(format!("{path} on {addr}: {e}")))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| Error::Unavailable(format!("{path} on {addr}: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(match status {
                StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST | StatusCode::CONFLICT => {
                    Error::InvalidInput(format!("{addr} refused: {msg}"))
                }
                _ => Error::Unavailable(format!("{addr} answered {status}: {msg}")),
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::InvalidData(format!("{path} answer from {addr}: {e}")))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| Error::Unavailable(format!("{path} on {addr}: no answer in {timeout:?}")))?
}
