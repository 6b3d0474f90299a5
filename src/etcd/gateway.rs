//! The JSON gateway on the client port, as etcd's grpc-gateway serves it: `POST /v3/kv/range`,
//! `/v3/kv/put`, `/v3/watch`, … with a JSON body, plus `GET /version` and `GET /health`, so
//! curl and gateway clients work without a gRPC library.
//!
//! ## How a request is served
//! 1. [`router`] maps the path to a gRPC method (the table is etcd's `google.api.http`
//!    annotations).
//! 2. [`decode`] reads the JSON body into the request message through its descriptor (built by
//!    `build.rs` from the same protos tonic uses), then into the prost type. Field names may be
//!    the proto names (`range_end`) or their JSON names (`rangeEnd`); bytes are base64; 64-bit
//!    integers may be strings or numbers.
//! 3. The handler calls the gRPC service itself (the same `impl` tonic dispatches to), so the
//!    gateway cannot drift from gRPC semantics.
//! 4. [`encode`] writes the response as etcd does (grpc-gateway's `JSONPb{OrigName: true}`):
//!    proto field names, default values left out, 64-bit integers as strings, bytes as
//!    base64, enums by name.
//!
//! Errors come back as `{"error": msg, "code": grpc_code, "message": msg}` with the HTTP status
//! grpc-gateway maps the gRPC code to. Streams (`/v3/watch`, `/v3/lease/keepalive`,
//! `/v3/maintenance/snapshot`) answer newline-delimited `{"result": ...}` objects; the request
//! body holds one or more JSON requests.

use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use tokio_stream::{Stream, StreamExt};
use tonic::Code;

use super::pb::etcdserverpb as pb;
use super::pb::v3electionpb as electionpb;
use super::pb::v3lockpb as lockpb;
use super::{cluster, election, kv, lease, lock, maintenance, Backend};
use electionpb::election_server::Election;
use lockpb::lock_server::Lock;
use pb::cluster_server::Cluster;
use pb::kv_server::Kv;
use pb::lease_server::Lease;
use pb::maintenance_server::Maintenance;

/// The descriptors of the etcd protos, encoded by `build.rs`.
fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let bytes = include_bytes!(concat!(env!("OUT_DIR"), "/etcd_descriptor.bin"));
        DescriptorPool::decode(bytes.as_slice())
            .expect("build.rs wrote a valid descriptor set for the etcd protos")
    })
}

fn descriptor(name: &str) -> MessageDescriptor {
    pool()
        .get_message_by_name(name)
        .unwrap_or_else(|| panic!("the etcd protos declare no message {name}"))
}

/// The HTTP status grpc-gateway answers for a gRPC code.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("a static status and header make a valid response")
}

/// grpc-gateway's error body.
fn error_response(code: Code, message: &str) -> Response {
    let body = serde_json::json!({
        "error": message,
        "code": code as i32,
        "message": message,
    });
    json_response(http_status(code), body.to_string().into_bytes())
}

/// A refused request: rendered by [`error_response`] at the edge.
type Refusal = (Code, String);

/// The JSON values in a request body (an empty body is one empty request).
fn json_values(body: &[u8]) -> Result<Vec<serde_json::Value>, Refusal> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(vec![serde_json::Value::Object(Default::default())]);
    }
    serde_json::Deserializer::from_slice(body)
        .into_iter::<serde_json::Value>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (Code::InvalidArgument, e.to_string()))
}

/// One JSON value into the prost request type named `name` (e.g. `etcdserverpb.RangeRequest`).
fn decode<T: prost::Message + Default>(name: &str, value: serde_json::Value) -> Result<T, Refusal> {
    let dynamic = DynamicMessage::deserialize(descriptor(name), value)
        .map_err(|e| (Code::InvalidArgument, e.to_string()))?;
    dynamic
        .transcode_to::<T>()
        .map_err(|e| (Code::InvalidArgument, e.to_string()))
}

/// A prost message as etcd's gateway writes it.
fn encode<T: prost::Message>(name: &str, msg: &T) -> serde_json::Value {
    let dynamic = DynamicMessage::decode(descriptor(name), msg.encode_to_vec().as_slice())
        .expect("a message encoded from its own type decodes with its descriptor");
    let options = SerializeOptions::new().use_proto_field_name(true);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .expect("serializing a message into a JSON value cannot fail")
}

/// Exactly one request in the body.
fn single<T: prost::Message + Default>(name: &str, body: &[u8]) -> Result<T, Refusal> {
    let mut values = json_values(body)?;
    if values.len() != 1 {
        return Err((
            Code::InvalidArgument,
            format!("expected one JSON {name} in the body, got {}", values.len()),
        ));
    }
    decode(name, values.remove(0))
}

fn reply<T: prost::Message>(name: &str, r: Result<tonic::Response<T>, tonic::Status>) -> Response {
    match r {
        Ok(resp) => json_response(
            StatusCode::OK,
            encode(name, &resp.into_inner()).to_string().into_bytes(),
        ),
        Err(status) => error_response(status.code(), status.message()),
    }
}

/// A streamed answer: one `{"result": ...}` or `{"error": ...}` object per line.
fn stream_response<S>(stream: S) -> Response
where
    S: Stream<Item = Result<serde_json::Value, tonic::Status>> + Send + 'static,
{
    let lines = stream.map(|item| {
        let line = match item {
            Ok(value) => serde_json::json!({ "result": value }),
            Err(status) => serde_json::json!({ "error": {
                "grpc_code": status.code() as i32,
                "http_code": http_status(status.code()).as_u16(),
                "message": status.message(),
                "http_status": http_status(status.code())
                    .canonical_reason()
                    .unwrap_or_default(),
            }}),
        };
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(bytes))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(lines))
        .expect("a static status and header make a valid response")
}

/// The gRPC services the gateway calls.
#[derive(Clone)]
struct Services {
    backend: Arc<Backend>,
    kv: Arc<kv::KvService>,
    lease: Arc<lease::LeaseService>,
    cluster: Arc<cluster::ClusterService>,
    maintenance: Arc<maintenance::MaintenanceService>,
    lock: Arc<lock::LockService>,
    election: Arc<election::ElectionService>,
}

/// `unary!(service, Trait::method, RequestType, "Request", "Response")`: a POST route that
/// decodes the JSON request, calls the gRPC method and encodes its answer.
/// `unary!(package: ...)` does the same for messages of another proto package.
macro_rules! unary {
    ($svc:ident, $method:path, $req:ty, $req_name:literal, $resp_name:literal) => {
        unary!(package: "etcdserverpb.", $svc, $method, $req, $req_name, $resp_name)
    };
    (
        package: $pkg:literal,
        $svc:ident,
        $method:path,
        $req:ty,
        $req_name:literal,
        $resp_name:literal
    ) => {
        post(|State(s): State<Services>, body: Bytes| async move {
            let req: $req = match single(concat!($pkg, $req_name), &body) {
                Ok(r) => r,
                Err((code, msg)) => return error_response(code, &msg),
            };
            reply(
                concat!($pkg, $resp_name),
                $method(&*s.$svc, tonic::Request::new(req)).await,
            )
        })
    };
}

/// The gateway's routes; merged into the client port's router by [`super::router`].
pub fn router(backend: Arc<Backend>) -> axum::Router {
    let services = Services {
        kv: Arc::new(kv::KvService::new(backend.clone())),
        lease: Arc::new(lease::LeaseService::new(backend.clone())),
        cluster: Arc::new(cluster::ClusterService::new(backend.clone())),
        maintenance: Arc::new(maintenance::MaintenanceService::new(backend.clone())),
        lock: Arc::new(lock::LockService::new(backend.clone())),
        election: Arc::new(election::ElectionService::new(backend.clone())),
        backend,
    };
    let lease_revoke = unary!(
        lease,
        Lease::lease_revoke,
        pb::LeaseRevokeRequest,
        "LeaseRevokeRequest",
        "LeaseRevokeResponse"
    );
    let lease_ttl = unary!(
        lease,
        Lease::lease_time_to_live,
        pb::LeaseTimeToLiveRequest,
        "LeaseTimeToLiveRequest",
        "LeaseTimeToLiveResponse"
    );
    let lease_leases = unary!(
        lease,
        Lease::lease_leases,
        pb::LeaseLeasesRequest,
        "LeaseLeasesRequest",
        "LeaseLeasesResponse"
    );
    axum::Router::new()
        .route(
            "/v3/kv/range",
            unary!(
                kv,
                Kv::range,
                pb::RangeRequest,
                "RangeRequest",
                "RangeResponse"
            ),
        )
        .route(
            "/v3/kv/put",
            unary!(kv, Kv::put, pb::PutRequest, "PutRequest", "PutResponse"),
        )
        .route(
            "/v3/kv/deleterange",
            unary!(
                kv,
                Kv::delete_range,
                pb::DeleteRangeRequest,
                "DeleteRangeRequest",
                "DeleteRangeResponse"
            ),
        )
        .route(
            "/v3/kv/txn",
            unary!(kv, Kv::txn, pb::TxnRequest, "TxnRequest", "TxnResponse"),
        )
        .route(
            "/v3/kv/compaction",
            unary!(
                kv,
                Kv::compact,
                pb::CompactionRequest,
                "CompactionRequest",
                "CompactionResponse"
            ),
        )
        .route("/v3/watch", post(watch))
        .route(
            "/v3/lease/grant",
            unary!(
                lease,
                Lease::lease_grant,
                pb::LeaseGrantRequest,
                "LeaseGrantRequest",
                "LeaseGrantResponse"
            ),
        )
        .route("/v3/lease/revoke", lease_revoke.clone())
        .route("/v3/kv/lease/revoke", lease_revoke)
        .route("/v3/lease/timetolive", lease_ttl.clone())
        .route("/v3/kv/lease/timetolive", lease_ttl)
        .route("/v3/lease/leases", lease_leases.clone())
        .route("/v3/kv/lease/leases", lease_leases)
        .route("/v3/lease/keepalive", post(keep_alive))
        .route(
            "/v3/cluster/member/add",
            unary!(
                cluster,
                Cluster::member_add,
                pb::MemberAddRequest,
                "MemberAddRequest",
                "MemberAddResponse"
            ),
        )
        .route(
            "/v3/cluster/member/remove",
            unary!(
                cluster,
                Cluster::member_remove,
                pb::MemberRemoveRequest,
                "MemberRemoveRequest",
                "MemberRemoveResponse"
            ),
        )
        .route(
            "/v3/cluster/member/update",
            unary!(
                cluster,
                Cluster::member_update,
                pb::MemberUpdateRequest,
                "MemberUpdateRequest",
                "MemberUpdateResponse"
            ),
        )
        .route(
            "/v3/cluster/member/list",
            unary!(
                cluster,
                Cluster::member_list,
                pb::MemberListRequest,
                "MemberListRequest",
                "MemberListResponse"
            ),
        )
        .route(
            "/v3/cluster/member/promote",
            unary!(
                cluster,
                Cluster::member_promote,
                pb::MemberPromoteRequest,
                "MemberPromoteRequest",
                "MemberPromoteResponse"
            ),
        )
        .route(
            "/v3/maintenance/alarm",
            unary!(
                maintenance,
                Maintenance::alarm,
                pb::AlarmRequest,
                "AlarmRequest",
                "AlarmResponse"
            ),
        )
        .route(
            "/v3/maintenance/status",
            unary!(
                maintenance,
                Maintenance::status,
                pb::StatusRequest,
                "StatusRequest",
                "StatusResponse"
            ),
        )
        .route(
            "/v3/maintenance/defragment",
            unary!(
                maintenance,
                Maintenance::defragment,
                pb::DefragmentRequest,
                "DefragmentRequest",
                "DefragmentResponse"
            ),
        )
        .route(
            "/v3/maintenance/hash",
            unary!(
                maintenance,
                Maintenance::hash,
                pb::HashRequest,
                "HashRequest",
                "HashResponse"
            ),
        )
        .route(
            "/v3/maintenance/transfer-leadership",
            unary!(
                maintenance,
                Maintenance::move_leader,
                pb::MoveLeaderRequest,
                "MoveLeaderRequest",
                "MoveLeaderResponse"
            ),
        )
        .route("/v3/maintenance/snapshot", post(snapshot))
        .route(
            "/v3/lock/lock",
            unary!(
                package: "v3lockpb.",
                lock,
                Lock::lock,
                lockpb::LockRequest,
                "LockRequest",
                "LockResponse"
            ),
        )
        .route(
            "/v3/lock/unlock",
            unary!(
                package: "v3lockpb.",
                lock,
                Lock::unlock,
                lockpb::UnlockRequest,
                "UnlockRequest",
                "UnlockResponse"
            ),
        )
        .route(
            "/v3/election/campaign",
            unary!(
                package: "v3electionpb.",
                election,
                Election::campaign,
                electionpb::CampaignRequest,
                "CampaignRequest",
                "CampaignResponse"
            ),
        )
        .route(
            "/v3/election/proclaim",
            unary!(
                package: "v3electionpb.",
                election,
                Election::proclaim,
                electionpb::ProclaimRequest,
                "ProclaimRequest",
                "ProclaimResponse"
            ),
        )
        .route(
            "/v3/election/leader",
            unary!(
                package: "v3electionpb.",
                election,
                Election::leader,
                electionpb::LeaderRequest,
                "LeaderRequest",
                "LeaderResponse"
            ),
        )
        .route(
            "/v3/election/resign",
            unary!(
                package: "v3electionpb.",
                election,
                Election::resign,
                electionpb::ResignRequest,
                "ResignRequest",
                "ResignResponse"
            ),
        )
        .route("/v3/election/observe", post(observe))
        .route("/version", get(version))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(services)
}

/// `POST /v3/watch`: the body's requests open a watch session; its responses stream back
/// until the client goes away (as in etcd, the end of the request body does not end watches).
async fn watch(State(s): State<Services>, body: Bytes) -> Response {
    let values = match json_values(&body) {
        Ok(v) => v,
        Err((code, msg)) => return error_response(code, &msg),
    };
    let mut requests = Vec::with_capacity(values.len());
    for value in values {
        match decode::<pb::WatchRequest>("etcdserverpb.WatchRequest", value) {
            Ok(r) => requests.push(Ok(r)),
            Err((code, msg)) => return error_response(code, &msg),
        }
    }
    let requests = tokio_stream::iter(requests).chain(tokio_stream::pending());
    let responses = super::watch::start_session(s.backend.clone(), Box::pin(requests));
    stream_response(responses.map(|r| r.map(|m| encode("etcdserverpb.WatchResponse", &m))))
}

/// `POST /v3/election/observe`: the leader's key and its changes, one line each, until the
/// client goes away.
async fn observe(State(s): State<Services>, body: Bytes) -> Response {
    let req: electionpb::LeaderRequest = match single("v3electionpb.LeaderRequest", &body) {
        Ok(r) => r,
        Err((code, msg)) => return error_response(code, &msg),
    };
    streamed(
        "v3electionpb.LeaderResponse",
        Election::observe(&*s.election, tonic::Request::new(req)).await,
    )
}

/// A server-streaming call's answer: one line per message, or the call's error.
fn streamed<M, S>(name: &'static str, r: Result<tonic::Response<S>, tonic::Status>) -> Response
where
    M: prost::Message,
    S: Stream<Item = Result<M, tonic::Status>> + Send + 'static,
{
    match r {
        Ok(stream) => stream_response(
            stream
                .into_inner()
                .map(move |r| r.map(|m| encode(name, &m))),
        ),
        Err(status) => error_response(status.code(), status.message()),
    }
}

/// `POST /v3/lease/keepalive`: one answer per request in the body, then the stream ends.
async fn keep_alive(State(s): State<Services>, body: Bytes) -> Response {
    let values = match json_values(&body) {
        Ok(v) => v,
        Err((code, msg)) => return error_response(code, &msg),
    };
    let mut requests = Vec::with_capacity(values.len());
    for value in values {
        match decode::<pb::LeaseKeepAliveRequest>("etcdserverpb.LeaseKeepAliveRequest", value) {
            Ok(r) => requests.push(r),
            Err((code, msg)) => return error_response(code, &msg),
        }
    }
    let backend = s.backend.clone();
    let answers = tokio_stream::iter(requests).then(move |r| {
        let backend = backend.clone();
        async move {
            backend
                .lease_keep_alive(r)
                .await
                .map(|m| encode("etcdserverpb.LeaseKeepAliveResponse", &m))
                .map_err(tonic::Status::from)
        }
    });
    stream_response(answers)
}

/// `POST /v3/maintenance/snapshot`: the snapshot in base64 chunks.
async fn snapshot(State(s): State<Services>, body: Bytes) -> Response {
    let req: pb::SnapshotRequest = match single("etcdserverpb.SnapshotRequest", &body) {
        Ok(r) => r,
        Err((code, msg)) => return error_response(code, &msg),
    };
    streamed(
        "etcdserverpb.SnapshotResponse",
        Maintenance::snapshot(&*s.maintenance, tonic::Request::new(req)).await,
    )
}

/// `GET /version`: the etcd server and cluster versions eden speaks.
async fn version() -> Response {
    let body = serde_json::json!({
        "etcdserver": super::ETCD_VERSION,
        "etcdcluster": super::ETCD_CLUSTER_VERSION,
    });
    json_response(StatusCode::OK, body.to_string().into_bytes())
}

/// `GET /metrics`: Prometheus text (`metrics::render`).
async fn metrics(State(s): State<Services>) -> Response {
    let mut resp = Response::new(axum::body::Body::from(super::metrics::render(&s.backend)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// `GET /health`: healthy when this node can do a linearizable read (a leader and a quorum).
async fn health(State(s): State<Services>) -> Response {
    match s.backend.node().linearizable_read().await {
        Ok(()) => json_response(StatusCode::OK, br#"{"health":"true"}"#.to_vec()),
        Err(e) => {
            tracing::info!("health check failed: {e}");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                br#"{"health":"false"}"#.to_vec(),
            )
        }
    }
}
