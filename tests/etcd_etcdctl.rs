//! etcdctl 3.4 (the real binary) against a 3-node eden cluster over TLS with client
//! certificates, using the admin credentials layout of `DATA/admin/`.

mod etcd_common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use etcd_common::EdenCluster;

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "etcdctl failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&stdout(out)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_kv_txn_compact_over_tls_on_every_node() {
    let c = EdenCluster::start(3, true).await;
    let (e1, e2, e3) = (c.endpoint(0), c.endpoint(1), c.endpoint(2));

    assert_eq!(stdout(&c.etcdctl(&e1, &["put", "foo", "bar"])), "OK\n");
    // Linearizable read on a follower sees the write made through another node.
    assert_eq!(stdout(&c.etcdctl(&e2, &["get", "foo"])), "foo\nbar\n");
    // A serializable read is served by the follower's replica: current or not yet applied.
    let local = stdout(&c.etcdctl(
        &e3,
        &["get", "foo", "--consistency=s", "--print-value-only"],
    ));
    assert!(local == "bar\n" || local.is_empty(), "{local:?}");
    stdout(&c.etcdctl(&e3, &["put", "foo2", "baz"]));
    let got = json(&c.etcdctl(&e1, &["get", "foo", "--prefix", "-w", "json"]));
    assert_eq!(got["count"], 2);
    assert_eq!(got["header"]["revision"], 3);
    assert_eq!(got["kvs"][0]["create_revision"], 2);
    assert_eq!(got["kvs"][1]["mod_revision"], 3);

    // txn: compare succeeds, success branch runs.
    let mut txn = Command::new("/usr/bin/etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={e2}"))
        .arg(format!("--cacert={}", c.creds.join("ca.crt").display()))
        .arg(format!("--cert={}", c.creds.join("admin.crt").display()))
        .arg(format!("--key={}", c.creds.join("admin.key").display()))
        .args(["txn", "--interactive=false"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    txn.stdin
        .take()
        .unwrap()
        .write_all(b"value(\"foo\") = \"bar\"\n\nput foo qux\n\nput foo nope\n\n")
        .unwrap();
    let out = txn.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "SUCCESS\n\nOK\n");
    assert_eq!(
        stdout(&c.etcdctl(&e1, &["get", "foo", "--print-value-only"])),
        "qux\n"
    );

    assert_eq!(stdout(&c.etcdctl(&e3, &["del", "foo2"])), "1\n");
    assert_eq!(stdout(&c.etcdctl(&e3, &["del", "nothing"])), "0\n");

    // compact, then reading the old revision fails with etcd's message.
    assert_eq!(
        stdout(&c.etcdctl(&e1, &["compact", "4"])),
        "compacted revision 4\n"
    );
    let old = c.etcdctl(&e2, &["get", "foo", "--rev=2"]);
    assert!(!old.status.success());
    assert!(
        String::from_utf8_lossy(&old.stderr)
            .contains("etcdserver: mvcc: required revision has been compacted"),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );
    let future = c.etcdctl(&e2, &["get", "foo", "--rev=99"]);
    assert!(String::from_utf8_lossy(&future.stderr)
        .contains("etcdserver: mvcc: required revision is a future revision"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_watch_lease_members_status() {
    let c = EdenCluster::start(3, true).await;
    let (e1, e3) = (c.endpoint(0), c.endpoint(2));

    // watch on a follower, write on the leader.
    let mut watch = Command::new("/usr/bin/etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={e3}"))
        .arg(format!("--cacert={}", c.creds.join("ca.crt").display()))
        .arg(format!("--cert={}", c.creds.join("admin.crt").display()))
        .arg(format!("--key={}", c.creds.join("admin.key").display()))
        .args(["watch", "w", "--prefix", "--prev-kv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    // The watch is registered once etcdctl connected; keep writing until it reports.
    let writer = {
        let c_creds = c.creds.clone();
        let e1 = e1.clone();
        std::thread::spawn(move || {
            for i in 0..3 {
                std::thread::sleep(std::time::Duration::from_millis(700));
                Command::new("/usr/bin/etcdctl")
                    .env("ETCDCTL_API", "3")
                    .arg(format!("--endpoints={e1}"))
                    .arg(format!("--cacert={}", c_creds.join("ca.crt").display()))
                    .arg(format!("--cert={}", c_creds.join("admin.crt").display()))
                    .arg(format!("--key={}", c_creds.join("admin.key").display()))
                    .args(["put", "w1", &format!("v{i}")])
                    .output()
                    .unwrap();
            }
        })
    };
    let first: Vec<String> = (0..3).map(|_| lines.next().unwrap().unwrap()).collect();
    assert_eq!(first[0], "PUT");
    assert_eq!(first[1], "w1");
    assert!(first[2].starts_with('v'), "{first:?}");
    let _ = watch.kill();
    let _ = watch.wait();
    writer.join().unwrap();

    // lease grant, attach, keep-alive once, time-to-live with keys, revoke.
    let granted = stdout(&c.etcdctl(&e1, &["lease", "grant", "60"]));
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    assert!(granted.ends_with("granted with TTL(60s)\n"), "{granted}");
    stdout(&c.etcdctl(&e1, &["put", "leased", "x", &format!("--lease={id}")]));
    let ka = stdout(&c.etcdctl(&e1, &["lease", "keep-alive", "--once", &id]));
    assert!(ka.contains("keepalived with TTL(60)"), "{ka}");
    let ttl = stdout(&c.etcdctl(&e1, &["lease", "timetolive", &id, "--keys"]));
    assert!(ttl.contains("granted with TTL(60s)"), "{ttl}");
    assert!(ttl.contains("attached keys([leased])"), "{ttl}");
    let list = stdout(&c.etcdctl(&e3, &["lease", "list"]));
    assert!(list.contains(&id), "{list}");
    stdout(&c.etcdctl(&e1, &["lease", "revoke", &id]));
    assert_eq!(stdout(&c.etcdctl(&e3, &["get", "leased"])), "");
    let gone = c.etcdctl(&e1, &["lease", "revoke", &id]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("etcdserver: requested lease not found"));

    // member list: three voters with their URLs.
    let members = json(&c.etcdctl(&e1, &["member", "list", "-w", "json"]));
    let members = members["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for (i, m) in members.iter().enumerate() {
        assert_eq!(m["ID"], i as u64 + 1);
        assert_eq!(m["name"], format!("node{}", i + 1));
        assert_eq!(m["clientURLs"][0], c.endpoint(i));
        assert!(m.get("isLearner").is_none());
    }

    // Membership changes eden's roles do not allow give etcd's errors, or say what to do.
    let peer = members[0]["peerURLs"][0].as_str().unwrap().to_string();
    for (args, expect) in [
        (
            vec!["member", "remove", "ffff"],
            "etcdserver: member not found",
        ),
        (
            vec!["member", "promote", "1"],
            "etcdserver: can only promote a learner member",
        ),
        (
            vec!["member", "add", "x", &format!("--peer-urls={peer}")],
            "etcdserver: Peer URLs already exists",
        ),
        (
            vec!["member", "add", "x", "--peer-urls=https://127.0.0.1:9"],
            "eden serve --join",
        ),
        (
            vec!["member", "update", "2", "--peer-urls=https://127.0.0.1:9"],
            "restart that node",
        ),
        (
            vec![
                "member",
                "update",
                "ffff",
                "--peer-urls=https://127.0.0.1:9",
            ],
            "etcdserver: member not found",
        ),
    ] {
        let out = c.etcdctl(&e1, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
    let after = json(&c.etcdctl(&e1, &["member", "list", "-w", "json"]));
    assert_eq!(after["members"].as_array().unwrap().len(), 3, "{after}");

    // endpoint status on every node agrees on the leader.
    let status = json(&c.etcdctl(&c.endpoints(), &["endpoint", "status", "-w", "json"]));
    let status = status.as_array().unwrap();
    assert_eq!(status.len(), 3);
    let leaders: Vec<u64> = status
        .iter()
        .map(|s| s["Status"]["leader"].as_u64().unwrap())
        .collect();
    assert_eq!(leaders, vec![1, 1, 1]);
    assert_eq!(status[0]["Status"]["version"], eden::etcd::ETCD_VERSION);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_without_client_certificate_is_refused() {
    let c = EdenCluster::start(1, true).await;
    let out = Command::new("/usr/bin/etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", c.endpoint(0)))
        .arg(format!("--cacert={}", c.creds.join("ca.crt").display()))
        .args(["--dial-timeout=2s", "--command-timeout=3s", "put", "a", "b"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(stdout(&c.etcdctl(&c.endpoint(0), &["get", "a"])), "");
    c.stop().await;
}

/// etcdctl 3.4 dials `endpoint status` and `endpoint hashkv` with the endpoint URL itself as the
/// HTTP/2 `:authority` (`http://127.0.0.1:PORT`), which hyper alone would reset with
/// PROTOCOL_ERROR. Over plaintext, with URL endpoints, both must work on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_endpoint_status_and_hashkv_with_url_endpoints_over_plaintext() {
    let c = EdenCluster::start(3, false).await;
    assert!(c.endpoint(0).starts_with("http://"));
    stdout(&c.etcdctl(&c.endpoint(0), &["put", "k", "v"]));
    let status = json(&c.etcdctl(&c.endpoints(), &["endpoint", "status", "-w", "json"]));
    let status = status.as_array().unwrap();
    assert_eq!(status.len(), 3, "{status:?}");
    for s in status {
        assert_eq!(s["Status"]["leader"].as_u64(), Some(1), "{s}");
        assert!(
            s["Endpoint"].as_str().unwrap().starts_with("http://"),
            "{s}"
        );
    }
    // Wait until every replica applied the put, then their hashes agree.
    etcd_common::wait_for(
        || {
            let out = c.etcdctl(&c.endpoints(), &["endpoint", "status", "-w", "json"]);
            let v = json(&out);
            let applied: Vec<u64> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["Status"]["raftAppliedIndex"].as_u64().unwrap_or(0))
                .collect();
            applied.iter().all(|a| *a == applied[0])
        },
        "every replica applied the same index",
    )
    .await;
    let hashes = json(&c.etcdctl(&c.endpoints(), &["endpoint", "hashkv", "-w", "json"]));
    let hashes: Vec<u64> = hashes
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["HashKV"]["hash"].as_u64().unwrap())
        .collect();
    assert_eq!(hashes.len(), 3);
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    c.stop().await;
}

/// The operator's way out of a full store, with etcdctl: a put past the quota is refused on a
/// follower, `alarm list` names the member, and compact, `defrag` on every node and
/// `alarm disarm` let writes through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_alarm_list_defrag_and_disarm_after_the_quota_is_reached() {
    const QUOTA: i64 = 2 << 20;
    let c = EdenCluster::start(3, true).await;
    for n in &c.nodes {
        n.backend.set_quota_bytes(QUOTA);
    }
    let e2 = c.endpoint(1);
    let big = "x".repeat(100 * 1024);
    let mut refused = None;
    for i in 0..60 {
        let out = c.etcdctl(&e2, &["put", &format!("big/{i:02}"), &big]);
        if !out.status.success() {
            refused = Some(String::from_utf8_lossy(&out.stderr).to_string());
            break;
        }
    }
    let refused = refused.expect("60 puts of 100 KiB did not reach a 2 MiB quota");
    assert!(
        refused.contains("etcdserver: mvcc: database space exceeded"),
        "{refused}"
    );
    let member = c.nodes[1].id;
    assert_eq!(
        stdout(&c.etcdctl(&e2, &["alarm", "list"])),
        format!("memberID:{member} alarm:NOSPACE \n")
    );
    // Every node refuses writes while the alarm is up; reads go on. A big write refused on
    // the full node does not propose the alarm again.
    let log_before = c.nodes[1].node.metrics().last_log_index.unwrap();
    for i in 0..3 {
        let out = c.etcdctl(&c.endpoint(i), &["put", "small", "v"]);
        assert!(!out.status.success(), "node {i} took a put under the alarm");
        stdout(&c.etcdctl(&c.endpoint(i), &["get", "big/00", "--keys-only"]));
        let out = c.etcdctl(&e2, &["put", "big/again", &big]);
        assert!(!out.status.success(), "the full node took a big put");
    }
    let log_after = c.nodes[1].node.metrics().last_log_index.unwrap();
    assert!(
        log_after - log_before <= 3,
        "refused writes grew the log from {log_before} to {log_after}"
    );
    stdout(&c.etcdctl(&e2, &["del", "big/", "--prefix"]));
    let rev = json(&c.etcdctl(&e2, &["get", "x", "-w", "json"]))["header"]["revision"]
        .as_i64()
        .unwrap();
    stdout(&c.etcdctl(&e2, &["compact", &rev.to_string(), "--physical"]));
    let defrag = stdout(&c.etcdctl(&c.endpoints(), &["defrag"]));
    assert_eq!(defrag.lines().count(), 3, "{defrag}");
    let disarmed = stdout(&c.etcdctl(&e2, &["alarm", "disarm"]));
    assert_eq!(disarmed, format!("memberID:{member} alarm:NOSPACE \n"));
    assert_eq!(stdout(&c.etcdctl(&e2, &["alarm", "list"])), "");
    assert_eq!(stdout(&c.etcdctl(&e2, &["put", "small", "v"])), "OK\n");
    c.stop().await;
}

/// The corruption check: replicas that agree raise nothing (also after a compaction), and once one follower's store is changed behind Raft's back the leader's
/// check names it, raises a CORRUPT alarm, and the cluster refuses changes until it is
/// disarmed. The periodic runner raises the same alarm on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_corruption_check_raises_a_corrupt_alarm_for_a_diverged_member() {
    use eden_storage::{Command, CompactionRequest, PutRequest};
    let c = EdenCluster::start(3, true).await;
    let e1 = c.endpoint(0);
    for i in 0..20 {
        stdout(&c.etcdctl(&e1, &["put", &format!("k{i}"), "v"]));
    }
    let leader = c.nodes[0].backend.clone();
    assert!(c.nodes[0].node.is_leader());
    let rev = c.nodes[0].node.store().revision();
    c.nodes[0]
        .node
        .write(Command::Compact(CompactionRequest {
            revision: rev - 5,
            physical: false,
        }))
        .await
        .unwrap();
    assert_eq!(leader.check_corruption().await.unwrap(), Vec::<u64>::new());
    assert_eq!(stdout(&c.etcdctl(&e1, &["alarm", "list"])), "");

    // A short lease with a key, granted before the alarm: it must not expire while the alarm
    // is up (every revoke would be refused), and must once it is disarmed.
    let granted = stdout(&c.etcdctl(&e1, &["lease", "grant", "2"]));
    let lease = granted.split_whitespace().nth(1).unwrap().to_string();
    stdout(&c.etcdctl(&e1, &["put", "leased", "v", "--lease", &lease]));

    // Change node 3's replica directly, as a storage bug would.
    let victim = c.nodes[2].id;
    c.nodes[2]
        .node
        .store()
        .apply(
            &[Command::Put(PutRequest {
                key: b"k3".to_vec(),
                value: b"not what the others have".to_vec(),
                ..Default::default()
            })],
            &[],
        )
        .unwrap();
    // The leader's revision must reach the one the bad write took on node 3.
    stdout(&c.etcdctl(&e1, &["put", "after", "v"]));
    let mut found = Vec::new();
    for _ in 0..50 {
        found = leader.check_corruption().await.unwrap();
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(found, vec![victim]);
    assert_eq!(
        stdout(&c.etcdctl(&e1, &["alarm", "list"])),
        format!("memberID:{victim} alarm:CORRUPT \n")
    );
    for i in 0..3 {
        let out = c.etcdctl(&c.endpoint(i), &["put", "x", "v"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("etcdserver: corrupt cluster"),
            "node {i}: {err}"
        );
        stdout(&c.etcdctl(&c.endpoint(i), &["get", "k1"]));
    }
    let log_before = c.nodes[0].node.metrics().last_log_index.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Nor does the leader keep proposing revokes that would be refused.
    let log_after = c.nodes[0].node.metrics().last_log_index.unwrap();
    assert!(
        log_after - log_before < 3,
        "the log grew from {log_before} to {log_after} under the alarm"
    );
    assert_eq!(
        stdout(&c.etcdctl(&e1, &["get", "leased", "--print-value-only"])),
        "v\n",
        "the lease expired under the CORRUPT alarm"
    );
    // Its deadline has passed: a keep-alive does not bring it back (etcd answers TTL 0, which
    // etcdctl reports as "requested lease not found").
    let kept = c.etcdctl(&e1, &["lease", "keep-alive", "--once", &lease]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&kept.stdout),
        String::from_utf8_lossy(&kept.stderr)
    );
    assert!(
        !kept.status.success() && said.contains("etcdserver: requested lease not found"),
        "{said}"
    );
    stdout(&c.etcdctl(&e1, &["alarm", "disarm"]));
    let mut expired = false;
    for _ in 0..50 {
        if stdout(&c.etcdctl(&e1, &["get", "leased"])).is_empty() {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expired, "the lease did not expire after the disarm");
    assert_eq!(stdout(&c.etcdctl(&e1, &["put", "x", "v"])), "OK\n");

    // The periodic runner finds it again by itself.
    let runner = tokio::spawn(eden::etcd::maintenance::run_corruption_check(
        leader.clone(),
        Duration::from_millis(200),
    ));
    let mut raised = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if stdout(&c.etcdctl(&e1, &["alarm", "list"])).contains("alarm:CORRUPT") {
            raised = true;
            break;
        }
    }
    runner.abort();
    assert!(raised, "the periodic check raised no alarm");
    c.stop().await;
}
