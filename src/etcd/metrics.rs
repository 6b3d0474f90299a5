//! `GET /metrics` on the client port: Prometheus text with etcd's metric names and types, so
//! dashboards and alerts written for etcd read eden unchanged.
//!
//! What is served (every name and type is etcd 3.4's; `tests/etcd_gateway.rs` checks them
//! against a real etcd):
//!
//! - leadership: `etcd_server_has_leader`, `etcd_server_is_leader`,
//!   `etcd_server_leader_changes_seen_total` (counted by [`count_leader_changes`]);
//! - identity: `etcd_server_id{server_id}`, `etcd_server_version{server_version}`;
//! - progress: `etcd_server_proposals_applied_total` (the applied log index),
//!   `etcd_server_proposals_committed_total` (the committed index),
//!   `etcd_debugging_mvcc_current_revision`, `etcd_debugging_mvcc_compact_revision`;
//! - writes through this member: `etcd_server_proposals_pending` and
//!   `etcd_server_proposals_failed_total` (from `RaftNode::proposals`);
//! - gRPC calls per method: `grpc_server_started_total` and `grpc_server_handled_total` by
//!   status code (counted by the [`count_grpc`] middleware);
//! - space: `etcd_mvcc_db_total_size_in_bytes`, `etcd_mvcc_db_total_size_in_use_in_bytes`
//!   (both the data file's size), `etcd_server_quota_backend_bytes`;
//! - disk: `etcd_disk_wal_fsync_duration_seconds`, the Raft log's fsync latencies;
//! - peers (once there is one): `etcd_network_peer_sent_failures_total{To}` (failed Raft RPCs)
//!   and `etcd_network_peer_round_trip_time_seconds{To}` (heartbeat round trips), from
//!   `PeerPool::peer_stats`;
//! - the process: `process_resident_memory_bytes`, `process_cpu_seconds_total`,
//!   `process_open_fds`, from `/proc/self`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::Backend;

/// Counts leader changes this node sees (a different leader than the last one known),
/// while it serves. It watches Raft's server metrics, which change with the role, vote and
/// leader only, not with every applied entry.
pub async fn count_leader_changes(backend: Arc<Backend>) {
    let mut rx = backend.node.raft().server_metrics();
    let mut last = None;
    loop {
        let leader = rx.borrow_and_update().current_leader;
        if leader.is_some() && leader != last {
            backend.leader_changes.fetch_add(1, Ordering::Relaxed);
            last = leader;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

struct Text(String);

impl Text {
    fn metric(&mut self, name: &str, kind: &str, help: &str, lines: &[(String, f64)]) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (labels, value) in lines {
            let _ = writeln!(self.0, "{name}{labels} {value}");
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.metric(name, "gauge", help, &[(String::new(), value)]);
    }
}

/// The resident set in bytes, the CPU seconds and the open descriptors of this process.
fn process_figures() -> (Option<f64>, Option<f64>, Option<f64>) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kb| kb * 1024.0)
        });
    // utime and stime are fields 14 and 15 of /proc/self/stat, in clock ticks (100 per
    // second on Linux); the command name before them may hold spaces, so count from its ')'.
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        });
    let fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as f64);
    (rss, cpu, fds)
}

/// A histogram's sample lines: cumulative `_bucket`s for `bounds` (`within[i]` counts the
/// samples in bucket `i` alone), `+Inf`, `_sum` and `_count`, each with `labels` (`a="b"`, or
/// empty) first.
fn histogram(
    labels: &str,
    bounds: &[f64],
    within: &[u64],
    count: u64,
    sum: f64,
) -> Vec<(String, f64)> {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut lines = Vec::new();
    let mut cumulative = 0;
    for (bound, n) in bounds.iter().zip(within) {
        cumulative += n;
        lines.push((
            format!("_bucket{{{labels}{sep}le=\"{bound}\"}}"),
            cumulative as f64,
        ));
    }
    // Buckets and count may be read one by one while samples go on: `+Inf` is never shown
    // below the last bucket.
    let count = count.max(cumulative);
    lines.push((format!("_bucket{{{labels}{sep}le=\"+Inf\"}}"), count as f64));
    let braces = |l: &str| {
        if l.is_empty() {
            String::new()
        } else {
            format!("{{{l}}}")
        }
    };
    lines.push((format!("_sum{}", braces(labels)), sum));
    lines.push((format!("_count{}", braces(labels)), count as f64));
    lines
}

/// The whole `/metrics` page.
pub fn render(backend: &Backend) -> String {
    let m = backend.node.metrics();
    let store = backend.node.store();
    let mut t = Text(String::new());
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    // A leader that has not heard from a quorum lately is not counted (`confirmed_leader`).
    let leader = backend.node.confirmed_leader();
    t.gauge(
        "etcd_server_has_leader",
        "1 if this member knows a leader, else 0.",
        flag(leader.is_some()),
    );
    t.gauge(
        "etcd_server_is_leader",
        "1 if this member is the leader, else 0.",
        flag(leader == Some(backend.node.id())),
    );
    t.metric(
        "etcd_server_leader_changes_seen_total",
        "counter",
        "Leader changes this member has seen since it started.",
        &[(
            String::new(),
            backend.leader_changes.load(Ordering::Relaxed) as f64,
        )],
    );
    t.metric(
        "etcd_server_id",
        "gauge",
        "This member's id in hex, as the server_id label.",
        &[(format!("{{server_id=\"{:x}\"}}", backend.node.id()), 1.0)],
    );
    t.metric(
        "etcd_server_version",
        "gauge",
        "The etcd API version served, as the server_version label.",
        &[(
            format!("{{server_version=\"{}\"}}", super::ETCD_VERSION),
            1.0,
        )],
    );
    t.gauge(
        "etcd_server_proposals_applied_total",
        "The Raft log index this member has applied.",
        m.applied_index.unwrap_or(0) as f64,
    );
    let proposals = backend.node.proposals();
    t.gauge(
        "etcd_server_proposals_committed_total",
        "The Raft log index this member knows to be committed.",
        proposals.committed as f64,
    );
    t.gauge(
        "etcd_server_proposals_pending",
        "Writes through this member waiting to be applied.",
        proposals.pending as f64,
    );
    t.metric(
        "etcd_server_proposals_failed_total",
        "counter",
        "Writes through this member whose entry did not commit (leader lost, stopped, timed out).",
        &[(String::new(), proposals.failed as f64)],
    );
    t.gauge(
        "etcd_debugging_mvcc_current_revision",
        "The store's current revision.",
        store.revision() as f64,
    );
    t.gauge(
        "etcd_debugging_mvcc_compact_revision",
        "The revision of the store's last compaction.",
        store.compact_revision() as f64,
    );
    let size = store.size_bytes() as f64;
    t.gauge(
        "etcd_mvcc_db_total_size_in_bytes",
        "Bytes of the store's data file.",
        size,
    );
    t.gauge(
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "Bytes of the store's data file (eden does not tell live from garbage here).",
        size,
    );
    t.gauge(
        "etcd_server_quota_backend_bytes",
        "The store quota in bytes (--quota-backend-bytes; negative: none).",
        backend.quota_bytes.load(Ordering::Relaxed) as f64,
    );
    let h = eden_raft::log_store::fsync_histogram();
    t.metric(
        "etcd_disk_wal_fsync_duration_seconds",
        "histogram",
        "Latencies of the Raft log's fsyncs in this process.",
        &histogram(
            "",
            &eden_raft::log_store::FSYNC_BUCKETS,
            &h.buckets,
            h.count,
            h.sum_seconds,
        ),
    );
    let peers = backend.node.peer_pool().peer_stats();
    // Like etcd's, these families appear once there is a peer to report.
    if !peers.is_empty() {
        let to = |id: u64| format!("To=\"{id:x}\"");
        t.metric(
            "etcd_network_peer_sent_failures_total",
            "counter",
            "Raft messages to each peer that failed (unreachable, timed out or broken off).",
            &peers
                .iter()
                .map(|(id, p)| (format!("{{{}}}", to(*id)), p.sent_failures as f64))
                .collect::<Vec<_>>(),
        );
        let mut lines = Vec::new();
        for (id, p) in &peers {
            lines.extend(histogram(
                &to(*id),
                &eden_raft::transport::RTT_BUCKETS,
                &p.rtt_buckets[..eden_raft::transport::RTT_BUCKETS.len()],
                p.rtt_count,
                p.rtt_sum_seconds,
            ));
        }
        t.metric(
            "etcd_network_peer_round_trip_time_seconds",
            "histogram",
            "Round trips of Raft heartbeats to each peer.",
            &lines,
        );
    }
    let (rss, cpu, fds) = process_figures();
    if let Some(v) = rss {
        t.gauge(
            "process_resident_memory_bytes",
            "Resident memory in bytes.",
            v,
        );
    }
    if let Some(v) = cpu {
        t.metric(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU seconds.",
            &[(String::new(), v)],
        );
    }
    if let Some(v) = fds {
        t.gauge("process_open_fds", "Open file descriptors.", v);
    }
    backend.grpc.render(&mut t);
    t.0
}

/// gRPC requests per method, counted as etcd counts them (`grpc_server_started_total`,
/// `grpc_server_handled_total`) by [`count_grpc`].
#[derive(Default)]
pub struct GrpcCounts {
    /// Per method, by its index in [`METHODS`].
    methods: Mutex<BTreeMap<usize, MethodCounts>>,
}

#[derive(Default)]
struct MethodCounts {
    started: u64,
    /// Per status code name.
    handled: BTreeMap<&'static str, u64>,
}

/// Every gRPC method served: service, method and the grpc_type label.
const METHODS: &[(&str, &str, &str)] = &[
    (KV, "Range", UNARY),
    (KV, "Put", UNARY),
    (KV, "DeleteRange", UNARY),
    (KV, "Txn", UNARY),
    (KV, "Compact", UNARY),
    ("etcdserverpb.Watch", "Watch", BIDI),
    (LEASE, "LeaseGrant", UNARY),
    (LEASE, "LeaseRevoke", UNARY),
    (LEASE, "LeaseKeepAlive", BIDI),
    (LEASE, "LeaseTimeToLive", UNARY),
    (LEASE, "LeaseLeases", UNARY),
    (CLUSTER, "MemberAdd", UNARY),
    (CLUSTER, "MemberRemove", UNARY),
    (CLUSTER, "MemberUpdate", UNARY),
    (CLUSTER, "MemberList", UNARY),
    (CLUSTER, "MemberPromote", UNARY),
    (MAINTENANCE, "Alarm", UNARY),
    (MAINTENANCE, "Status", UNARY),
    (MAINTENANCE, "Defragment", UNARY),
    (MAINTENANCE, "Hash", UNARY),
    (MAINTENANCE, "HashKV", UNARY),
    (MAINTENANCE, "Snapshot", SERVER_STREAM),
    (MAINTENANCE, "MoveLeader", UNARY),
    ("v3lockpb.Lock", "Lock", UNARY),
    ("v3lockpb.Lock", "Unlock", UNARY),
    (ELECTION, "Campaign", UNARY),
    (ELECTION, "Proclaim", UNARY),
    (ELECTION, "Leader", UNARY),
    (ELECTION, "Observe", SERVER_STREAM),
    (ELECTION, "Resign", UNARY),
];
const KV: &str = "etcdserverpb.KV";
const LEASE: &str = "etcdserverpb.Lease";
const CLUSTER: &str = "etcdserverpb.Cluster";
const MAINTENANCE: &str = "etcdserverpb.Maintenance";
const ELECTION: &str = "v3electionpb.Election";
const UNARY: &str = "unary";
const BIDI: &str = "bidi_stream";
const SERVER_STREAM: &str = "server_stream";

/// gRPC's status code names, by number.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

fn code_in(headers: &http::HeaderMap) -> Option<&'static str> {
    let n: usize = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(CODES.get(n).copied().unwrap_or("Unknown"))
}

impl GrpcCounts {
    fn started(&self, method: usize) {
        lock(&self.methods).entry(method).or_default().started += 1;
    }

    fn handled(&self, method: usize, code: &'static str) {
        *lock(&self.methods)
            .entry(method)
            .or_default()
            .handled
            .entry(code)
            .or_default() += 1;
    }

    fn render(&self, t: &mut Text) {
        let methods = lock(&self.methods);
        let labels = |i: usize| {
            let (service, method, kind) = METHODS[i];
            format!("grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{kind}\"")
        };
        let started = (0..METHODS.len())
            .map(|i| {
                let n = methods.get(&i).map_or(0, |m| m.started);
                (format!("{{{}}}", labels(i)), n as f64)
            })
            .collect::<Vec<_>>();
        t.metric(
            "grpc_server_started_total",
            "counter",
            "gRPC calls begun on this member, per method.",
            &started,
        );
        let mut handled = Vec::new();
        for i in 0..METHODS.len() {
            let codes = methods.get(&i).map(|m| &m.handled);
            let ok = codes.and_then(|c| c.get("OK")).copied().unwrap_or(0);
            handled.push((format!("{{grpc_code=\"OK\",{}}}", labels(i)), ok as f64));
            for (code, n) in codes.into_iter().flatten() {
                if *code != "OK" {
                    handled.push((format!("{{grpc_code=\"{code}\",{}}}", labels(i)), *n as f64));
                }
            }
        }
        t.metric(
            "grpc_server_handled_total",
            "counter",
            "gRPC calls finished on this member, per method and status code.",
            &handled,
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The [`METHODS`] index of a gRPC path (`/service/method`).
fn method_index(path: &str) -> Option<usize> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    METHODS.iter().position(|m| m.0 == service && m.1 == method)
}

/// Middleware: counts each gRPC call to a served method when it starts, and again with its
/// status code when it ends: the code of the trailers, or of a trailers-only answer, or
/// `Canceled` when the client went away first (the answer's body was dropped unfinished).
pub async fn count_grpc(
    counts: Arc<GrpcCounts>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Some(method) = method_index(req.uri().path()) else {
        return next.run(req).await;
    };
    counts.started(method);
    let resp = next.run(req).await;
    let early = code_in(resp.headers());
    let (parts, body) = resp.into_parts();
    let body = Counted {
        body,
        counts,
        method,
        early,
        counted: false,
    };
    axum::response::Response::from_parts(parts, axum::body::Body::new(body))
}

/// An answer's body that counts the call as handled when it ends.
struct Counted {
    body: axum::body::Body,
    counts: Arc<GrpcCounts>,
    method: usize,
    /// The code of a trailers-only answer (in its headers).
    early: Option<&'static str>,
    counted: bool,
}

impl Counted {
    fn count(&mut self, code: &'static str) {
        if !self.counted {
            self.counted = true;
            self.counts.handled(self.method, code);
        }
    }
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(code_in) {
                    self.count(code);
                }
            }
            std::task::Poll::Ready(Some(Err(_))) => self.count("Unknown"),
            std::task::Poll::Ready(None) => {
                let code = self.early.unwrap_or("Unknown");
                self.count(code);
            }
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let code = self.early.unwrap_or("Canceled");
        self.count(code);
    }
}
