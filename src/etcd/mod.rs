//! The etcd v3 API on every datastore node: gRPC (KV, Watch, Lease, Cluster, Maintenance, and
//! the server-side Lock and Election recipes), the JSON gateway and `/metrics`, on one client
//! port, over TLS or (loopback only) plaintext.
//!
//! ## What this module owns
//! - The wire: protos in `proto/` with etcd's field numbers, compiled by protox in `build.rs`
//!   into [`pb`]. etcd clients (etcdctl, clientv3, `etcd-client`) work unchanged.
//! - Thin handlers, one file per service: validate → call [`eden_raft::RaftNode`] → map the
//!   error through [`errors`] (the one table) → fill the header ([`Backend::header`]).
//! - Lease deadlines ([`lease::LeaseKeeper`]): the clock lives here, never in storage. Only the
//!   leader expires leases, by replicating `Command::LeaseRevoke`.
//!
//! ## The data path of `etcdctl put k v`
//! 1. [`serve`] accepts the TCP connection, completes TLS (ALPN `h2`), and hyper hands the
//!    HTTP/2 request to the router: `/etcdserverpb.*` paths go to tonic, `/v3/*`, `/version`
//!    and `/health` to [`gateway`].
//! 2. [`kv::KvService::put`] converts the protobuf into `eden_storage::PutRequest` and calls
//!    `RaftNode::write(Command::Put)`, which forwards to the leader if needed; the proposer
//!    batches it with concurrent writes into one Raft entry.
//! 3. The entry is appended and fsynced on a quorum, then `StateMachine::apply` runs
//!    `Store::apply` on every replica and publishes the revision's events on the feed.
//! 4. The handler gets the `Applied { revision, .. }` and answers with the header
//!    (cluster_id, member_id, revision, raft_term). [`watch`] sessions on every node wake on the
//!    feed and stream the new events from their local store.
//!
//! ## What it does not do
//! No auth service (etcd's users and roles): access control is the client certificate.
//! No storage semantics: those are `eden_storage`'s, shared with the tests and fuzzers.

pub mod authority;
pub mod cluster;
pub mod election;
pub mod errors;
pub mod gateway;
mod hpack;
pub mod kv;
pub mod lease;
pub mod limits;
pub mod lock;
pub mod maintenance;
pub mod metrics;
pub mod watch;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use authority::AuthorityFix;
use axum::response::IntoResponse;
use eden_raft::RaftNode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use errors::ApiError;

/// Generated protobuf types, servers and clients (etcd's packages `etcdserverpb` and `mvccpb`).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}

use pb::etcdserverpb::ResponseHeader;

/// The etcd server version eden reports (Status, `/version`). Clients gate features on it; eden
/// implements the 3.4 API.
pub const ETCD_VERSION: &str = "3.4.23";
/// The cluster version reported by `/version`.
pub const ETCD_CLUSTER_VERSION: &str = "3.4.0";

/// What the etcd services share: the node, the cluster identity, the lease clock.
pub struct Backend {
    node: Arc<RaftNode>,
    cluster_id: u64,
    leases: lease::LeaseKeeper,
    keeper_running: AtomicBool,
    /// False while this node is not a Raft member (the role controller retired it to an
    /// eligible agent): its replica no longer follows the cluster, so every request is refused
    /// as Unavailable and open watch streams end, and etcd clients go to another endpoint.
    serving: tokio::sync::watch::Sender<bool>,
    /// Whether the client port serves TLS (set by [`serve`]): MemberList's client URLs take
    /// its scheme, so clients that sync their endpoints from it (the Go client's
    /// `AutoSyncInterval`, for one) dial what the nodes serve. A cluster's nodes share it.
    client_tls: AtomicBool,
    /// `--quota-backend-bytes`: writes that would take this node's data file past it raise a
    /// NOSPACE alarm and are refused (`maintenance::Backend::check_quota`). Negative: no quota.
    quota_bytes: std::sync::atomic::AtomicI64,
    /// Leader changes seen while serving (`metrics::count_leader_changes`).
    leader_changes: std::sync::atomic::AtomicU64,
    /// gRPC calls per method and status (`metrics::count_grpc`).
    grpc: Arc<metrics::GrpcCounts>,
    /// etcd's `--experimental-watch-progress-notify-interval`, in milliseconds: how often a
    /// caught-up watch created with `progress_notify` is told the current revision.
    progress_notify_ms: std::sync::atomic::AtomicU64,
}

impl Backend {
    /// `cluster_id` goes into every response header; use a stable value derived from the
    /// cluster (for example the first 8 bytes of the CA certificate's SHA-256).
    pub fn new(node: Arc<RaftNode>, cluster_id: u64) -> Arc<Backend> {
        Arc::new(Backend {
            node,
            cluster_id,
            leases: lease::LeaseKeeper::default(),
            keeper_running: AtomicBool::new(false),
            serving: tokio::sync::watch::Sender::new(true),
            client_tls: AtomicBool::new(true),
            quota_bytes: std::sync::atomic::AtomicI64::new(maintenance::DEFAULT_QUOTA_BYTES),
            leader_changes: std::sync::atomic::AtomicU64::new(0),
            grpc: Arc::default(),
            progress_notify_ms: std::sync::atomic::AtomicU64::new(
                watch::DEFAULT_PROGRESS_NOTIFY.as_millis() as u64,
            ),
        })
    }

    /// Sets etcd's `--experimental-watch-progress-notify-interval` (default 10 minutes) for
    /// watch streams opened from now on. Zero is taken as one millisecond.
    pub fn set_watch_progress_notify_interval(&self, every: Duration) {
        let ms = (every.as_millis() as u64).max(1);
        self.progress_notify_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn watch_progress_notify_interval(&self) -> Duration {
        Duration::from_millis(self.progress_notify_ms.load(Ordering::Relaxed))
    }

    /// Sets the store quota as etcd's `--quota-backend-bytes` reads it: 0 is the default
    /// (2 GiB), a negative value turns the quota off.
    pub fn set_quota_bytes(&self, bytes: i64) {
        let bytes = if bytes == 0 {
            maintenance::DEFAULT_QUOTA_BYTES
        } else {
            bytes
        };
        self.quota_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Whether this node serves the etcd API: false while it is not a Raft member.
    pub fn set_serving(&self, serving: bool) {
        self.serving.send_replace(serving);
    }

    /// `https` or `http`: what this node's client port serves.
    pub fn client_scheme(&self) -> &'static str {
        if self.client_tls.load(Ordering::Relaxed) {
            "https"
        } else {
            "http"
        }
    }

    pub fn is_serving(&self) -> bool {
        *self.serving.borrow()
    }

    /// Completes once this node stops serving (at once if it does not serve now).
    pub async fn stopped_serving(&self) {
        let mut rx = self.serving.subscribe();
        let _ = rx.wait_for(|serving| !*serving).await;
    }

    pub fn node(&self) -> &Arc<RaftNode> {
        &self.node
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// A response header at `revision`, with this node's id and the current Raft term.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let raft_term = self.node.raft().metrics().borrow().current_term;
        Some(ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.node.id(),
            revision,
            raft_term,
        })
    }

    /// A header at the local store's current revision.
    pub fn header_now(&self) -> Option<ResponseHeader> {
        self.header(self.node.store().revision())
    }
}

/// Largest body accepted on the etcd peer routes.
const MAX_PEER_BODY: usize = 4096;

impl Backend {
    /// Serves the etcd layer's routes on the peer port (`/etcd/...`: lease clock forwarding and
    /// the corruption check's hashes).
    /// Only cluster members may call them: the request must carry a peer certificate.
    pub async fn peer_route(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
        use http_body_util::BodyExt;
        let reply = |status: hyper::StatusCode, body: Vec<u8>| {
            let mut resp =
                hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
            *resp.status_mut() = status;
            resp
        };
        let path = req.uri().path().to_string();
        if req
            .extensions()
            .get::<eden_raft::PeerCertificate>()
            .is_none()
        {
            let msg = format!("{path} is for cluster members: present a node certificate");
            return reply(hyper::StatusCode::FORBIDDEN, msg.into_bytes());
        }
        let body = match http_body_util::Limited::new(req.into_body(), MAX_PEER_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let msg = format!("reading {path}: {e}");
                return reply(hyper::StatusCode::BAD_REQUEST, msg.into_bytes());
            }
        };
        match self.peer_request(&path, &body).await {
            Some(Ok(answer)) => reply(hyper::StatusCode::OK, answer),
            Some(Err(e)) => reply(hyper::StatusCode::SERVICE_UNAVAILABLE, e.into_bytes()),
            None => reply(
                hyper::StatusCode::NOT_FOUND,
                format!("no route {path}").into_bytes(),
            ),
        }
    }

    /// The etcd layer's peer routes: the corruption check's hash, and the lease clock. `None`
    /// for any other path.
    async fn peer_request(&self, path: &str, body: &[u8]) -> Option<Result<Vec<u8>, String>> {
        if path == maintenance::HASHKV_PATH {
            return Some(self.hashkv_peer(body).await);
        }
        self.lease_peer_request(path, body).await
    }

    /// The peer server fallback for a node that serves only the etcd layer's peer routes (no
    /// join service): test harnesses and embedded uses.
    pub fn peer_fallback(self: Arc<Self>) -> eden_raft::Fallback {
        Arc::new(move |req| {
            let backend = self.clone();
            Box::pin(async move { backend.peer_route(req).await })
        })
    }
}

/// What a node outside Raft answers every etcd request with (as Unavailable).
pub const NOT_SERVING: &str = "eden: this node is not a datastore member now (an eligible \
                               agent); use the endpoint of a voter or standby, as `eden \
                               cluster status` lists them";

/// The router for one client port: the five gRPC services plus the JSON gateway, all refused
/// with [`NOT_SERVING`] while the node is outside Raft.
pub fn router(backend: Arc<Backend>) -> axum::Router {
    use pb::etcdserverpb::{
        cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
        maintenance_server::MaintenanceServer, watch_server::WatchServer,
    };
    const MAX: usize = limits::MAX_RECV_BYTES;
    let routes = tonic::service::Routes::new(
        KvServer::new(kv::KvService::new(backend.clone())).max_decoding_message_size(MAX),
    )
    .add_service(
        WatchServer::new(watch::WatchService::new(backend.clone())).max_decoding_message_size(MAX),
    )
    .add_service(
        LeaseServer::new(lease::LeaseService::new(backend.clone())).max_decoding_message_size(MAX),
    )
    .add_service(
        ClusterServer::new(cluster::ClusterService::new(backend.clone()))
            .max_decoding_message_size(MAX),
    )
    .add_service(
        pb::v3lockpb::lock_server::LockServer::new(lock::LockService::new(backend.clone()))
            .max_decoding_message_size(MAX),
    )
    .add_service(
        pb::v3electionpb::election_server::ElectionServer::new(election::ElectionService::new(
            backend.clone(),
        ))
        .max_decoding_message_size(MAX),
    )
    .add_service(
        MaintenanceServer::new(maintenance::MaintenanceService::new(backend.clone()))
            .max_decoding_message_size(MAX),
    );
    let gate = backend.clone();
    let grpc = backend.grpc.clone();
    routes
        .into_axum_router()
        .merge(gateway::router(backend))
        // An oversized message is refused in grpc-go's words (see `limits`).
        .layer(axum::middleware::map_response(
            |mut resp: axum::response::Response| async move {
                limits::grpc_go_words(resp.headers_mut());
                resp
            },
        ))
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let serving = gate.is_serving();
                async move {
                    if serving {
                        return next.run(req).await;
                    }
                    let msg = NOT_SERVING;
                    let grpc = req
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    if grpc {
                        tonic::Status::unavailable(msg).into_http()
                    } else {
                        let body = serde_json::json!({"error": msg, "code": 14}).to_string();
                        (
                            http::StatusCode::SERVICE_UNAVAILABLE,
                            [(http::header::CONTENT_TYPE, "application/json")],
                            body,
                        )
                            .into_response()
                    }
                }
            },
        ))
        // Outermost, so calls refused while not serving are counted too.
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                metrics::count_grpc(grpc.clone(), req, next)
            },
        ))
}

/// Serves the etcd v3 API (gRPC and the JSON gateway) on `listener` until `shutdown` completes.
///
/// - `tls`: the client-port TLS config (with a client-certificate verifier for the cluster CA).
///   ALPN `h2` and `http/1.1` are added if it has none. `None` serves plaintext; the caller
///   must allow that only on a loopback address (DESIGN §9, `--client-plaintext`).
/// - Also runs the lease keeper (expiry on the leader) and the leader-change counter of
///   `/metrics` while it serves; several `serve` calls on one [`Backend`] share them.
///
/// On shutdown it stops accepting and drops open connections (watch streams end).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    backend: Arc<Backend>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    backend.client_tls.store(tls.is_some(), Ordering::Relaxed);
    let router = router(backend.clone());
    let keeper = if backend.keeper_running.swap(true, Ordering::SeqCst) {
        None
    } else {
        Some((
            tokio::spawn(lease::run_keeper(backend.clone())),
            tokio::spawn(metrics::count_leader_changes(backend.clone())),
        ))
    };
    let acceptor = tls.map(|config| {
        let mut config = (*config).clone();
        if config.alpn_protocols.is_empty() {
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        }
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("etcd client port: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let router = router.clone();
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    if let Err(e) = serve_connection(tcp, acceptor, router).await {
                        tracing::debug!("etcd client connection from {peer} ended: {e}");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
    if let Some((k, leaders)) = keeper {
        k.abort();
        leaders.abort();
        backend.keeper_running.store(false, Ordering::SeqCst);
    }
    Ok(())
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    router: axum::Router,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let service = hyper_util::service::TowerToHyperService::new(router);
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    match acceptor {
        Some(acceptor) => {
            let stream = acceptor.accept(tcp).await?;
            builder
                .serve_connection_with_upgrades(TokioIo::new(AuthorityFix::new(stream)), service)
                .await
        }
        None => {
            builder
                .serve_connection_with_upgrades(TokioIo::new(AuthorityFix::new(tcp)), service)
                .await
        }
    }
}
