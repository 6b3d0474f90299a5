//! `eden bench` (the real binary) against an eden cluster: every operation completes with no
//! errors and the JSON report adds up; a closed endpoint gives a clear error.

mod etcd_common;

use std::process::Command;

use etcd_common::EdenCluster;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_eden"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_every_operation_against_a_cluster() {
    let eden = EdenCluster::start(3, false).await;
    let endpoints = eden.endpoints();
    for op in ["put", "get", "serializable-get", "txn"] {
        let out = bench(&[
            op,
            "--endpoints",
            &endpoints,
            "--clients",
            "8",
            "--conns",
            "3",
            "--total",
            "300",
            "--output",
            "json",
        ]);
        assert!(
            out.status.success(),
            "{op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["op"], op);
        assert_eq!(report["ok"], 300, "{op}: {report}");
        assert_eq!(report["errors"], 0, "{op}: {report}");
        let p50 = report["p50_ms"].as_f64().unwrap();
        let p99 = report["p99_ms"].as_f64().unwrap();
        let max = report["max_ms"].as_f64().unwrap();
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{op}: {report}");
        assert!(report["ops_per_sec"].as_f64().unwrap() > 0.0);
    }
    // The puts landed: 300 puts and 300 txn puts over a key space of 1000.
    let mut kv = eden::etcd::pb::etcdserverpb::kv_client::KvClient::connect(eden.endpoint(0))
        .await
        .unwrap();
    let all = kv
        .range(eden::etcd::pb::etcdserverpb::RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.count, 300, "keys written by put and txn");
    eden.stop().await;
}

#[test]
fn bench_names_an_endpoint_it_cannot_reach() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = bench(&[
        "put",
        "--endpoints",
        &format!("127.0.0.1:{port}"),
        "--total",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")),
        "the error does not name the endpoint: {err}"
    );
}
