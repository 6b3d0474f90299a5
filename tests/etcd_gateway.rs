//! The JSON gateway against etcd 3.4's own: the same HTTP requests to a fresh etcd and a fresh
//! eden, compared as JSON after masking what legitimately differs (cluster and member ids,
//! Raft terms).

mod etcd_common;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use etcd_common::{EdenCluster, RealEtcd};

/// An HTTP/1.1 connection to `endpoint` (http://host:port).
async fn connect(endpoint: &str) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let addr = endpoint.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// A unary call: the status and the body parsed as JSON.
async fn call(endpoint: &str, method: Method, path: &str, body: &str) -> (u16, Value) {
    let mut sender = connect(endpoint).await;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{path}: the body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, value)
}

/// A streaming call: the first `n` JSON lines of the answer.
async fn stream(endpoint: &str, path: &str, body: &str, n: usize) -> Vec<Value> {
    let mut sender = connect(endpoint).await;
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    while lines.len() < n {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap_or_else(|_| panic!("{path}: no line {} within 10 s", lines.len() + 1));
        let Some(frame) = frame else { break };
        if let Ok(data) = frame.unwrap().into_data() {
            buf.extend_from_slice(&data);
        }
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            if !line.iter().all(|b| b.is_ascii_whitespace()) {
                lines.push(serde_json::from_slice(&line).unwrap());
            }
        }
    }
    lines
}

/// Replaces the values of fields that differ between any two clusters.
fn mask(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if matches!(k.as_str(), "cluster_id" | "member_id" | "raft_term") {
                    *val = Value::String("_".into());
                } else {
                    mask(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask),
        _ => {}
    }
}

const B64_FOO: &str = "Zm9v"; // "foo"
const B64_BAR: &str = "YmFy"; // "bar"
const B64_FOP: &str = "Zm9w"; // "fop", the end of prefix "foo"

/// The scripted unary calls: (name, path, body).
fn unary_script() -> Vec<(&'static str, &'static str, String)> {
    vec![
        (
            "put",
            "/v3/kv/put",
            format!(r#"{{"key":"{B64_FOO}","value":"{B64_BAR}"}}"#),
        ),
        (
            "put prev_kv",
            "/v3/kv/put",
            format!(r#"{{"key":"{B64_FOO}","value":"{B64_FOO}","prev_kv":true}}"#),
        ),
        ("range", "/v3/kv/range", format!(r#"{{"key":"{B64_FOO}"}}"#)),
        (
            "range prefix count_only (json names)",
            "/v3/kv/range",
            format!(r#"{{"key":"{B64_FOO}","rangeEnd":"{B64_FOP}","countOnly":true}}"#),
        ),
        (
            "range missing",
            "/v3/kv/range",
            r#"{"key":"bm9uZQ=="}"#.to_string(),
        ),
        (
            "range future revision",
            "/v3/kv/range",
            format!(r#"{{"key":"{B64_FOO}","revision":"100"}}"#),
        ),
        (
            "txn compare value",
            "/v3/kv/txn",
            format!(
                r#"{{"compare":[{{"key":"{B64_FOO}","result":"EQUAL","target":"VALUE","value":"{B64_FOO}"}}],
                   "success":[{{"request_range":{{"key":"{B64_FOO}"}}}}],
                   "failure":[{{"request_put":{{"key":"{B64_FOO}","value":"{B64_BAR}"}}}}]}}"#
            ),
        ),
        (
            "txn duplicate key",
            "/v3/kv/txn",
            format!(
                r#"{{"success":[{{"request_put":{{"key":"{B64_FOO}","value":"{B64_BAR}"}}}},
                               {{"request_put":{{"key":"{B64_FOO}","value":"{B64_BAR}"}}}}]}}"#
            ),
        ),
        (
            "delete prev_kv",
            "/v3/kv/deleterange",
            format!(r#"{{"key":"{B64_FOO}","prev_kv":true}}"#),
        ),
        (
            "compact",
            "/v3/kv/compaction",
            r#"{"revision":"2"}"#.to_string(),
        ),
        (
            "range compacted revision",
            "/v3/kv/range",
            format!(r#"{{"key":"{B64_FOO}","revision":1}}"#),
        ),
        (
            "lease grant",
            "/v3/lease/grant",
            r#"{"TTL":30,"ID":77}"#.to_string(),
        ),
        (
            "lease grant again",
            "/v3/lease/grant",
            r#"{"TTL":30,"ID":77}"#.to_string(),
        ),
        (
            "put with lease",
            "/v3/kv/put",
            format!(r#"{{"key":"{B64_BAR}","value":"{B64_BAR}","lease":"77"}}"#),
        ),
        (
            "lock",
            "/v3/lock/lock",
            format!(r#"{{"name":"{B64_FOO}","lease":"77"}}"#),
        ),
        (
            "election leader of none",
            "/v3/election/leader",
            format!(r#"{{"name":"{B64_BAR}"}}"#),
        ),
        (
            "campaign",
            "/v3/election/campaign",
            format!(r#"{{"name":"{B64_BAR}","lease":"77","value":"{B64_FOO}"}}"#),
        ),
        (
            "election leader",
            "/v3/election/leader",
            format!(r#"{{"name":"{B64_BAR}"}}"#),
        ),
        (
            // "foo/4d": the lock's key, lease 77 in hex.
            "unlock",
            "/v3/lock/unlock",
            r#"{"key":"Zm9vLzRk"}"#.to_string(),
        ),
        ("lease leases", "/v3/lease/leases", "{}".to_string()),
        (
            "lease leases (kv path)",
            "/v3/kv/lease/leases",
            "{}".to_string(),
        ),
        (
            "lease revoke",
            "/v3/lease/revoke",
            r#"{"ID":77}"#.to_string(),
        ),
        (
            "lease revoke unknown",
            "/v3/kv/lease/revoke",
            r#"{"ID":77}"#.to_string(),
        ),
        (
            "lease time to live unknown",
            "/v3/lease/timetolive",
            r#"{"ID":77,"keys":true}"#.to_string(),
        ),
        ("bad json", "/v3/kv/range", r#"{"key": "#.to_string()),
        (
            "unknown field",
            "/v3/kv/range",
            r#"{"nokey": 1}"#.to_string(),
        ),
    ]
}

async fn run_unary(endpoint: &str) -> Vec<(String, u16, Value)> {
    let mut out = Vec::new();
    for (name, path, body) in unary_script() {
        let (status, mut value) = call(endpoint, Method::POST, path, &body).await;
        mask(&mut value);
        out.push((name.to_string(), status, value));
    }
    for path in ["/version", "/health"] {
        let (status, value) = call(endpoint, Method::GET, path, "").await;
        out.push((format!("GET {path}"), status, value));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_unary_calls_match_etcd() {
    let etcd = RealEtcd::start().await;
    let eden = EdenCluster::start(1, false).await;
    let reference = run_unary(&etcd.endpoint).await;
    let ours = run_unary(&eden.endpoint(0)).await;
    let mut diffs = Vec::new();
    for (r, o) in reference.iter().zip(&ours) {
        // etcd's JSON decoding errors are Go's; eden's are serde's. The status and the code
        // must match; the wording of a syntax error need not.
        let (mut rv, mut ov) = (r.2.clone(), o.2.clone());
        if r.0 == "bad json" || r.0 == "unknown field" {
            for v in [&mut rv, &mut ov] {
                if let Some(m) = v.as_object_mut() {
                    m.remove("error");
                    m.remove("message");
                }
            }
        }
        if r.1 != o.1 || rv != ov {
            diffs.push(format!(
                "{}:\n  etcd: {} {}\n  eden: {} {}",
                r.0, r.1, r.2, o.1, o.2
            ));
        }
    }
    assert_eq!(reference.len(), ours.len());
    assert!(
        diffs.is_empty(),
        "the gateway differs from etcd 3.4 in {} calls:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    eden.stop().await;
}

async fn run_streams(endpoint: &str) -> Vec<Value> {
    let mut out = Vec::new();
    call(
        endpoint,
        Method::POST,
        "/v3/kv/put",
        &format!(r#"{{"key":"{B64_FOO}","value":"{B64_BAR}"}}"#),
    )
    .await;
    call(
        endpoint,
        Method::POST,
        "/v3/kv/put",
        &format!(r#"{{"key":"{B64_FOO}","value":"{B64_FOO}"}}"#),
    )
    .await;
    // A watch from revision 2 replays both puts after the created response.
    let mut lines = stream(
        endpoint,
        "/v3/watch",
        &format!(r#"{{"create_request":{{"key":"{B64_FOO}","start_revision":2,"prev_kv":true}}}}"#),
        2,
    )
    .await;
    out.append(&mut lines);
    call(
        endpoint,
        Method::POST,
        "/v3/lease/grant",
        r#"{"TTL":30,"ID":5}"#,
    )
    .await;
    let mut lines = stream(endpoint, "/v3/lease/keepalive", r#"{"ID":5}"#, 1).await;
    out.append(&mut lines);
    // Observe streams the election's leader, after a campaign on the lease.
    call(
        endpoint,
        Method::POST,
        "/v3/election/campaign",
        &format!(r#"{{"name":"{B64_BAR}","lease":"5","value":"{B64_FOO}"}}"#),
    )
    .await;
    let body = format!(r#"{{"name":"{B64_BAR}"}}"#);
    let mut lines = stream(endpoint, "/v3/election/observe", &body, 1).await;
    out.append(&mut lines);
    for v in out.iter_mut() {
        mask(v);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_streams_match_etcd() {
    let etcd = RealEtcd::start().await;
    let eden = EdenCluster::start(1, false).await;
    let reference = run_streams(&etcd.endpoint).await;
    let ours = run_streams(&eden.endpoint(0)).await;
    assert_eq!(reference.len(), 4, "etcd answered {reference:?}");
    assert_eq!(
        reference, ours,
        "watch/keepalive/observe lines differ:\n etcd: {reference:?}\n eden: {ours:?}"
    );
    // A snapshot's bytes are each store's own; its lines have etcd's fields.
    let fields = |v: &Value| {
        let mut k: Vec<String> = v["result"].as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let etcd_snap = stream(&etcd.endpoint, "/v3/maintenance/snapshot", "{}", 1).await;
    let eden_snap = stream(&eden.endpoint(0), "/v3/maintenance/snapshot", "{}", 1).await;
    assert_eq!(
        fields(&etcd_snap[0]),
        fields(&eden_snap[0]),
        "{eden_snap:?}"
    );
    eden.stop().await;
}

/// `GET /metrics` as text, and its metrics: name -> (type, sample lines).
async fn metrics(endpoint: &str) -> (String, std::collections::BTreeMap<String, String>) {
    let mut sender = connect(endpoint).await;
    let req = Request::builder()
        .method(Method::GET)
        .uri("/metrics")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let types = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect();
    (text, types)
}

/// The value of the sample line that starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"))
}

/// Every metric eden serves exists in etcd 3.4's `/metrics` with the same type, and the values
/// say what they should.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_have_etcds_names_and_types() {
    let etcd = RealEtcd::start().await;
    let eden = EdenCluster::start(1, false).await;
    let ep = eden.endpoint(0);
    let (_, rev) = call(
        &ep,
        Method::POST,
        "/v3/kv/put",
        r#"{"key":"bQ==","value":"dg=="}"#,
    )
    .await;
    let (etcd_text, etcd_types) = metrics(&etcd.endpoint).await;
    let (text, types) = metrics(&ep).await;
    assert!(types.len() >= 15, "{text}");
    for (name, kind) in &types {
        assert_eq!(
            etcd_types.get(name),
            Some(kind),
            "{name} ({kind}) is not in etcd's /metrics with that type"
        );
    }
    assert_eq!(sample(&text, "etcd_server_has_leader "), 1.0);
    assert_eq!(sample(&text, "etcd_server_is_leader "), 1.0);
    assert!(sample(&text, "etcd_server_leader_changes_seen_total ") >= 1.0);
    assert_eq!(
        sample(&text, "etcd_server_version{server_version=\"3.4.23\"}"),
        1.0
    );
    let id = format!("etcd_server_id{{server_id=\"{:x}\"}}", eden.nodes[0].id);
    assert_eq!(sample(&text, &id), 1.0);
    let revision: f64 = rev["header"]["revision"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        sample(&text, "etcd_debugging_mvcc_current_revision "),
        revision
    );
    // The same default quota as etcd's.
    assert_eq!(
        sample(&text, "etcd_server_quota_backend_bytes "),
        sample(&etcd_text, "etcd_server_quota_backend_bytes ")
    );
    let fsyncs = sample(&text, "etcd_disk_wal_fsync_duration_seconds_count ");
    assert!(fsyncs >= 1.0, "{text}");
    assert_eq!(
        sample(
            &text,
            "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        fsyncs
    );
    assert!(sample(&text, "etcd_mvcc_db_total_size_in_bytes ") > 0.0);
    assert!(sample(&text, "process_resident_memory_bytes ") > 1e6);
    eden.stop().await;
}

/// The same gRPC calls move the per-method counters of eden and etcd 3.4 alike, and the write
/// counters say what they should.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_and_write_metrics_count_like_etcds() {
    use eden::etcd::pb::etcdserverpb as pb;
    let etcd = RealEtcd::start().await;
    let eden = EdenCluster::start(1, false).await;
    let series = [
        ("started", "Put", "unary", ""),
        ("started", "Range", "unary", ""),
        ("started", "LeaseRevoke", "unary", ""),
        ("started", "Watch", "bidi_stream", ""),
        ("handled", "Put", "unary", "OK"),
        ("handled", "Put", "unary", "NotFound"),
        ("handled", "Range", "unary", "OK"),
        ("handled", "Range", "unary", "OutOfRange"),
        ("handled", "LeaseRevoke", "unary", "NotFound"),
    ];
    let line = |(kind, method, grpc_type, code): (&str, &str, &str, &str)| {
        let service = match method {
            "Watch" => "etcdserverpb.Watch",
            "LeaseRevoke" => "etcdserverpb.Lease",
            _ => "etcdserverpb.KV",
        };
        let code = if code.is_empty() {
            String::new()
        } else {
            format!("grpc_code=\"{code}\",")
        };
        format!(
            "grpc_server_{kind}_total{{{code}grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{grpc_type}\"}} "
        )
    };
    // A series not shown yet counts as 0 (etcd shows every code, eden the ones seen).
    let value = |text: &str, prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
    };
    let mut deltas = Vec::new();
    for ep in [etcd.endpoint.clone(), eden.endpoint(0)] {
        let (before, _) = metrics(&ep).await;
        let channel = tonic::transport::Channel::from_shared(ep.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut kv = pb::kv_client::KvClient::new(channel.clone());
        for i in 0..3 {
            kv.put(pb::PutRequest {
                key: format!("m{i}").into_bytes(),
                value: b"v".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        // Refused by the store: an applied write, not a failed one.
        let no_lease = kv
            .put(pb::PutRequest {
                key: b"m9".to_vec(),
                lease: 999,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(no_lease.code(), tonic::Code::NotFound, "{no_lease}");
        kv.range(pb::RangeRequest {
            key: b"m0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        let future = kv
            .range(pb::RangeRequest {
                key: b"m0".to_vec(),
                revision: 1_000_000,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(future.code(), tonic::Code::OutOfRange, "{future}");
        let unknown = pb::lease_client::LeaseClient::new(channel.clone())
            .lease_revoke(pb::LeaseRevokeRequest { id: 12345 })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");
        // A watch stream the client drops (both sides).
        {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                    pb::WatchCreateRequest {
                        key: b"m0".to_vec(),
                        ..Default::default()
                    },
                )),
            })
            .await
            .unwrap();
            let mut stream = pb::watch_client::WatchClient::new(channel.clone())
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            assert!(stream.message().await.unwrap().unwrap().created);
        }
        let (after, _) = metrics(&ep).await;
        deltas.push(
            series
                .iter()
                .map(|s| value(&after, &line(*s)) - value(&before, &line(*s)))
                .collect::<Vec<_>>(),
        );
        if ep == eden.endpoint(0) {
            assert!(
                value(&after, "etcd_server_proposals_committed_total ")
                    - value(&before, "etcd_server_proposals_committed_total ")
                    >= 3.0,
                "{after}"
            );
            assert_eq!(value(&after, "etcd_server_proposals_pending "), 0.0);
            assert_eq!(value(&after, "etcd_server_proposals_failed_total "), 0.0);
            // The dropped watch stream ends as Canceled.
            let canceled = line(("handled", "Watch", "bidi_stream", "Canceled"));
            let mut seen = value(&after, &canceled);
            for _ in 0..50 {
                if seen == 1.0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                seen = value(&metrics(&ep).await.0, &canceled);
            }
            assert_eq!(seen, 1.0, "{canceled}");
        }
    }
    assert_eq!(deltas[1], vec![4.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0]);
    assert_eq!(
        deltas[0], deltas[1],
        "etcd's counts, then eden's: {series:?}"
    );
    eden.stop().await;
}

/// With peers, `/metrics` has etcd's per-peer families: heartbeat round trips to each
/// follower, and failed Raft messages to one that stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_metrics_report_round_trips_and_failures() {
    let mut eden = EdenCluster::start(3, false).await;
    let mut leader = None;
    for _ in 0..100 {
        leader = eden.nodes.iter().position(|n| n.node.is_leader());
        if leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = leader.expect("a leader");
    let ep = eden.endpoint(leader);
    let followers: Vec<u64> = eden
        .nodes
        .iter()
        .filter(|n| !n.node.is_leader())
        .map(|n| n.id)
        .collect();
    assert_eq!(followers.len(), 2);
    let count = |text: &str, id: u64| {
        let prefix = format!("etcd_network_peer_round_trip_time_seconds_count{{To=\"{id:x}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    let mut text = String::new();
    for _ in 0..100 {
        text = metrics(&ep).await.0;
        if followers.iter().all(|f| count(&text, *f) > 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for f in &followers {
        assert!(
            count(&text, *f) > 0.0,
            "no heartbeat round trips to {f:x}:\n{text}"
        );
        let inf = format!(
            "etcd_network_peer_round_trip_time_seconds_bucket{{To=\"{f:x}\",le=\"+Inf\"}} "
        );
        assert_eq!(sample(&text, &inf), count(&text, *f));
    }
    let (_, types) = metrics(&ep).await;
    assert_eq!(
        types
            .get("etcd_network_peer_round_trip_time_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    assert_eq!(
        types
            .get("etcd_network_peer_sent_failures_total")
            .map(String::as_str),
        Some("counter")
    );
    let gone = followers[0];
    let failures = format!("etcd_network_peer_sent_failures_total{{To=\"{gone:x}\"}} ");
    assert_eq!(sample(&text, &failures), 0.0);

    // Stop one follower: the leader's messages to it start failing.
    let i = eden.nodes.iter().position(|n| n.id == gone).unwrap();
    eden.nodes.remove(i).stop().await;
    let other = format!(
        "etcd_network_peer_sent_failures_total{{To=\"{:x}\"}} ",
        followers[1]
    );
    let mut seen = (0.0, 0.0);
    for _ in 0..100 {
        let text = metrics(&ep).await.0;
        seen = (sample(&text, &failures), sample(&text, &other));
        if seen.0 >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Counted against the stopped follower, not the one still running.
    assert!(seen.0 >= 3.0 && seen.1 < seen.0, "{seen:?}");
    eden.stop().await;
}
