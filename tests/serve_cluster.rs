//! `eden serve` as real processes on loopback: a cluster formed with --init and --join, the
//! leader killed with SIGKILL, a follower that catches up from a snapshot, a peer with a
//! certificate from another CA, joins with bad tokens, and set-ups refused for a dir in use, a
//! dir of another cluster or of someone else, a port taken and plain etcd off loopback.
//!
//! The nodes serve the etcd API in plaintext on loopback (`--client-plaintext`) so the test can
//! drive them with the generated etcd clients; one test also runs etcdctl over TLS with the
//! admin credentials from `DATA/admin/`.

mod serve_common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serve_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_survive_a_killed_leader_and_it_catches_up() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path(), &[]).await;

    // Every node serves the API; a write through one is visible on all.
    let rev = put_retrying(&nodes[1].endpoint(), "before", "1").await;
    assert!(rev >= 2, "first write got revision {rev}");
    for n in &nodes {
        wait_local_value(n, "before", "1").await;
    }
    // The members know each other's URLs.
    let m = members(&nodes[2].endpoint()).await;
    let mut names: Vec<_> = m.iter().map(|m| m.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["n1", "n2", "n3"]);
    for member in &m {
        let node = nodes.iter().find(|n| n.name == member.name).unwrap();
        assert_eq!(member.peer_ur_ls, [format!("https://{}", node.peer)]);
        // The test nodes serve plaintext etcd (--client-plaintext): the URL says so.
        assert_eq!(member.client_ur_ls, [node.endpoint()]);
    }

    // Kill the leader with SIGKILL.
    let mut ids = Vec::new();
    for n in nodes.iter_mut() {
        ids.push(n.ready().await.header.unwrap().member_id);
    }
    let leader = nodes[0].ready().await.leader;
    let li = leader_index(&nodes, leader, &ids);
    nodes[li].kill9();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != li).collect();

    // Writes go on through either survivor once a new leader is elected.
    for i in 0..20 {
        let via = &nodes[survivors[i % 2]];
        put_retrying(&via.endpoint(), &format!("after/{i:02}"), &i.to_string()).await;
    }
    let new_leader = nodes[survivors[0]].ready().await.leader;
    assert_ne!(
        new_leader, leader,
        "the killed node is still reported as leader"
    );
    assert!(ids.contains(&new_leader));

    // The killed node restarts from its data dir and catches up.
    nodes[li].restart(&[]);
    nodes[li].ready().await;
    wait_local_value(&nodes[li], "after/19", "19").await;
    wait_local_value(&nodes[li], "before", "1").await;
    // And it takes writes again (forwarded to the new leader).
    put_retrying(&nodes[li].endpoint(), "rejoined", "yes").await;
    for n in &nodes {
        wait_local_value(n, "rejoined", "yes").await;
    }
    // All three reach the same revision (the role controller may still be writing member
    // health, so they are compared until they agree, not once).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut revisions = Vec::new();
        for n in nodes.iter_mut() {
            revisions.push(n.ready().await.header.unwrap().revision);
        }
        if revisions.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revisions still differ 30 s after catch-up: {revisions:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGTERM stops every node cleanly.
    for n in nodes.iter_mut() {
        n.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_follower_catches_up_from_a_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let extra = ["--snapshot-count", "50"];
    let mut nodes = three_nodes(root.path(), &extra).await;
    let mut ids = Vec::new();
    for n in nodes.iter_mut() {
        ids.push(n.ready().await.header.unwrap().member_id);
    }
    let leader = nodes[0].ready().await.leader;
    let li = leader_index(&nodes, leader, &ids);
    let fi = (li + 1) % 3;
    let writer = (li + 2) % 3;
    assert!(
        !nodes[fi].log_text().contains("installed snapshot"),
        "the follower installed a snapshot before it lagged"
    );
    nodes[fi].terminate();

    // 300 writes: six snapshots' worth, and far more than the 5 entries of log kept behind one.
    for i in 0..300 {
        put_retrying(
            &nodes[writer].endpoint(),
            &format!("lag/{i:03}"),
            &i.to_string(),
        )
        .await;
    }
    nodes[fi].restart(&extra);
    nodes[fi].ready().await;
    wait_local_value(&nodes[fi], "lag/299", "299").await;
    wait_local_value(&nodes[fi], "lag/000", "0").await;
    let log = nodes[fi].log_text();
    assert!(
        log.contains("installed snapshot"),
        "the follower caught up without installing a snapshot:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_with_a_wrong_secret_or_ca_are_refused_and_change_nothing() {
    let root = tempfile::tempdir().unwrap();
    let mut n1 = Node::new(root.path(), "n1");
    n1.create(None, &[]);
    n1.ready().await;
    let token = n1.token();
    let (prefix, _secret) = token.rsplit_once(':').unwrap();
    let wrong_secret = format!("{prefix}:{}", "A".repeat(43));
    let wrong_ca = format!(
        "eden1:{}:{}",
        "0".repeat(64),
        token.rsplit(':').next().unwrap()
    );

    for (case, bad, expect) in [
        ("wrong secret", wrong_secret.as_str(), "token"),
        ("wrong CA hash", wrong_ca.as_str(), "CA"),
    ] {
        let mut n2 = Node::new(root.path(), "n2");
        let out = n2
            .command()
            .args(["--name", "n2", "--peer-addr", &n2.peer])
            .args(["--client-addr", &n2.client, "--client-plaintext"])
            .args(["--join", &n1.peer, "--token", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{case}: the join succeeded");
        assert!(
            stderr.contains(expect),
            "{case}: the error does not mention {expect:?}: {stderr}"
        );
        assert!(
            !n2.dir.exists(),
            "{case}: the refused join left {} behind",
            n2.dir.display()
        );
        n2.child = None;
    }
    // The cluster still has one member, and n1 still serves.
    let m = members(&n1.endpoint()).await;
    assert_eq!(m.len(), 1, "{m:?}");
    put_retrying(&n1.endpoint(), "still", "here").await;
}

/// Raw TLS to `addr` presenting `cert`/`key`; returns what the server answered to an HTTP/1.1
/// request (empty if the connection was refused or closed without an answer).
async fn probe_peer_port(addr: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem) {
        roots.add(c).unwrap();
    }
    let chain = certs(cert_pem);
    let key = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap()
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = match connector.connect(name, tcp).await {
        Ok(t) => t,
        Err(_) => return String::new(),
    };
    let req = format!(
        "POST /etcd/lease/remaining HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 1\r\n\
         connection: close\r\n\r\n1"
    );
    if tls.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

fn certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let mut ours = Node::new(root.path(), "ours");
    ours.create(None, &[]);
    ours.ready().await;
    let mut other = Node::new(root.path(), "other");
    other.create(None, &[]);
    other.ready().await;
    let read = |n: &Node, f: &str| std::fs::read_to_string(n.dir.join(f)).unwrap();
    let ca = read(&ours, "tls/ca.crt");

    // Control: a certificate of this cluster's CA reaches the route (which then answers).
    let answer = probe_peer_port(
        &ours.peer,
        &ca,
        &read(&ours, "tls/node.crt"),
        &read(&ours, "tls/node.key"),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "a node certificate of this cluster was not served: {answer:?}"
    );
    // A node certificate of another cluster is refused before any route answers.
    let answer = probe_peer_port(
        &ours.peer,
        &ca,
        &read(&other, "tls/node.crt"),
        &read(&other, "tls/node.key"),
    )
    .await;
    assert!(
        !answer.contains("HTTP/"),
        "a certificate from another CA got an HTTP answer: {answer:?}"
    );
    // The server logs the refusal after the client has seen its handshake fail: allow it a
    // moment on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ours.log_text().contains("peer TLS handshake refused") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ours.log_text().contains("peer TLS handshake refused"),
        "the node did not log the refused handshake:\n{}",
        ours.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_over_tls_with_the_admin_credentials() {
    let root = tempfile::tempdir().unwrap();
    let mut n1 = Node::new(root.path(), "n1");
    // This node serves TLS on its client port (no --client-plaintext).
    let mut cmd = n1.command();
    cmd.args(["--name", "n1", "--peer-addr", &n1.peer]).args([
        "--client-addr",
        &n1.client,
        "--init",
    ]);
    n1.spawn(cmd);
    let admin = n1.dir.join("admin");
    let etcdctl = |args: &[&str]| {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=https://{}", n1.client))
            .arg(format!("--cacert={}", admin.join("ca.crt").display()))
            .arg(format!("--cert={}", admin.join("admin.crt").display()))
            .arg(format!("--key={}", admin.join("admin.key").display()))
            .args(args)
            .output()
            .expect("etcdctl is installed (scripts/test installs etcd-client)")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = etcdctl(&["put", "tls-key", "tls-value"]);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "etcdctl put over TLS kept failing: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            n1.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = etcdctl(&["get", "tls-key", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "tls-value");
    // Plaintext is not served on a TLS client port.
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints=http://{}", n1.client),
            "--dial-timeout=2s",
            "--command-timeout=3s",
            "get",
            "tls-key",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a plaintext client was served");
}

/// Runs `eden serve` with `args` to completion; it must fail, and say `expect`.
fn refused(case: &str, args: &[&str], expect: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_eden"))
        .arg("serve")
        .args(args)
        .env("EDEN_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{case}: it started:\n{stderr}");
    assert!(
        stderr.contains(expect),
        "{case}: the error does not say {expect:?}:\n{stderr}"
    );
}

fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
        .collect();
    names.sort();
    names
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_setups_are_refused_with_a_clear_error_and_change_nothing() {
    let root = tempfile::tempdir().unwrap();
    let mut n1 = Node::new(root.path(), "n1");
    n1.create(None, &[]);
    n1.ready().await;
    let token = n1.token();
    let n1_dir = n1.dir.to_str().unwrap().to_string();
    let fresh = root.path().join("fresh");
    let fresh_dir = fresh.to_str().unwrap();
    let free = free_addr();

    // The data dir of a running node.
    refused(
        "dir in use",
        &["--data-dir", &n1_dir],
        "in use by another eden process",
    );
    // A port another process holds: nothing is written, the new dir is not left behind.
    for (case, peer, client) in [
        ("peer port taken", n1.peer.as_str(), free.as_str()),
        ("client port taken", free.as_str(), n1.client.as_str()),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_eden"))
            .args(["serve", "--data-dir", fresh_dir, "--name", "x", "--init"])
            .args([
                "--peer-addr",
                peer,
                "--client-addr",
                client,
                "--client-plaintext",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{case}: it started");
        assert!(
            stderr.contains("cannot listen") && (stderr.contains(peer) || stderr.contains(client)),
            "{case}: {stderr}"
        );
        assert!(!fresh.exists(), "{case}: left {} behind", fresh.display());
    }
    // Plain etcd on a non-loopback address.
    refused(
        "plaintext off loopback",
        &[
            "--data-dir",
            fresh_dir,
            "--name",
            "x",
            "--init",
            "--peer-addr",
            "127.0.0.1:0",
            "--client-addr",
            "0.0.0.0:0",
            "--client-plaintext",
        ],
        "only allowed on a loopback --client-addr",
    );
    assert!(
        !fresh.exists(),
        "plaintext off loopback: left the dir behind"
    );

    n1.terminate();
    let before = listing(&n1.dir);
    // A dir that already belongs to a cluster is neither re-created nor joined elsewhere.
    refused(
        "init over a cluster's dir",
        &["--data-dir", &n1_dir, "--name", "n1", "--init"],
        "already holds node \"n1\"",
    );
    refused(
        "join with a cluster's dir",
        &[
            "--data-dir",
            &n1_dir,
            "--name",
            "n1",
            "--join",
            &n1.peer,
            "--token",
            &token,
        ],
        "already holds node \"n1\"",
    );
    assert_eq!(listing(&n1.dir), before, "a refused start changed n1's dir");
    // A dir that holds someone else's files.
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join("notes.txt"), "mine\n").unwrap();
    refused(
        "foreign dir",
        &[
            "--data-dir",
            fresh_dir,
            "--name",
            "x",
            "--init",
            "--peer-addr",
            "127.0.0.1:0",
            "--client-addr",
            "127.0.0.1:0",
            "--client-plaintext",
        ],
        "not an eden data dir",
    );
    assert_eq!(listing(&fresh), vec!["notes.txt".to_string()]);
    // n1 still restarts from its dir and serves.
    n1.restart(&[]);
    n1.ready().await;
    put_retrying(&n1.endpoint(), "still", "here").await;
}

/// A serializable read of `key` at `rev` on one node: Ok(value) or the error's message.
async fn local_get_at(endpoint: &str, key: &str, rev: i64) -> Result<Option<Vec<u8>>, String> {
    let ch = channel(endpoint).await.map_err(|e| e.to_string())?;
    Kv::new(ch)
        .range(eden::etcd::pb::etcdserverpb::RangeRequest {
            key: key.into(),
            revision: rev,
            serializable: true,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().kvs.into_iter().next().map(|kv| kv.value))
        .map_err(|e| e.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_compacts_history_and_checks_the_replicas_agree() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_nodes(
        root.path(),
        &[
            "--auto-compaction-retention",
            "3s",
            "--experimental-corrupt-check-time",
            "1s",
        ],
    )
    .await;
    let ep = nodes[0].endpoint();
    let first = put_retrying(&ep, "/hist/k", "v0").await;
    let mut last = first;
    for i in 1..20 {
        last = put(&ep, "/hist/k", &format!("v{i}")).await.unwrap();
    }
    assert!(last > first, "revisions {first}..{last}");
    // Until the retention has passed, nothing of it is forgotten.
    assert_eq!(
        local_get_at(&ep, "/hist/k", first)
            .await
            .unwrap()
            .as_deref(),
        Some(&b"v0"[..])
    );
    // Checks run every 0.3 s; the revision seen once 3 s have passed is compacted away on
    // every replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in &nodes {
        loop {
            match local_get_at(&n.endpoint(), "/hist/k", first).await {
                Err(e) if e == "etcdserver: mvcc: required revision has been compacted" => break,
                other => assert!(
                    Instant::now() < deadline,
                    "{} still serves revision {first} 30 s later: {other:?}\n{}",
                    n.name,
                    nodes[0].log_text()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The newest value is never compacted away, and history newer than the window stays.
    let recent = put(&ep, "/hist/k", "newest").await.unwrap();
    for n in &nodes {
        wait_local_value(n, "/hist/k", "newest").await;
        assert_eq!(
            local_get_at(&n.endpoint(), "/hist/k", recent)
                .await
                .unwrap()
                .as_deref(),
            Some(&b"newest"[..]),
            "{}",
            n.name
        );
    }
    let log: String = nodes.iter().map(|n| n.log_text()).collect();
    assert!(
        log.contains("auto-compaction: compacted history up to revision"),
        "no compaction logged:\n{log}"
    );
    // The corruption check ran alongside and found the replicas alike.
    assert!(
        log.contains("corruption check: every member that answered agrees"),
        "no corruption check logged:\n{log}"
    );
    assert!(!log.contains("CORRUPT alarm"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_writes_past_its_quota_backend_bytes() {
    let root = tempfile::tempdir().unwrap();
    let mut n1 = Node::new(root.path(), "n1");
    n1.create(None, &["--quota-backend-bytes", "2097152"]);
    n1.ready().await;
    let ep = n1.endpoint();
    let big = "x".repeat(100 * 1024);
    let mut refused = None;
    for i in 0..60 {
        let key = format!("/big/{i}");
        let r = if i == 0 {
            Ok(put_retrying(&ep, &key, &big).await)
        } else {
            put(&ep, &key, &big).await
        };
        if let Err(e) = r {
            refused = Some((i, e));
            break;
        }
    }
    let (i, e) = refused.expect("60 puts of 100 KiB went past a 2 MiB quota");
    assert!(
        e.contains("etcdserver: mvcc: database space exceeded"),
        "{e}"
    );
    assert!((10..=21).contains(&i), "refused after {i} puts of 100 KiB");
    assert!(
        n1.log_text().contains("raising a NOSPACE alarm"),
        "{}",
        n1.log_text()
    );
    // `eden cluster status` names the alarm, in JSON and in text.
    let status = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_eden"));
        cmd.args(["cluster", "status", "--endpoints", &ep]);
        if json {
            cmd.args(["--output", "json"]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let st: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(st["alarms"][0]["member"], "n1", "{st}");
    assert_eq!(st["alarms"][0]["alarm"], "NOSPACE", "{st}");
    assert_eq!(st["alarms"].as_array().unwrap().len(), 1, "{st}");
    let text = status(false);
    assert!(text.contains("alarm NOSPACE on n1"), "{text}");
}

/// `--experimental-initial-corrupt-check`: a member whose store agrees with the others starts;
/// one whose store was changed behind Raft's back does not, and says which member differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_corrupt_check_keeps_a_diverged_member_from_serving() {
    use eden_storage::{Command, PutRequest};
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path(), &[]).await;
    for i in 0..5 {
        put_retrying(&nodes[0].endpoint(), &format!("k{i}"), "v").await;
    }
    for n in &nodes {
        wait_local_value(n, "k4", "v").await;
    }
    const FLAG: &str = "--experimental-initial-corrupt-check";

    // A healthy member passes and serves.
    nodes[2].terminate();
    nodes[2].restart(&[FLAG]);
    nodes[2].ready().await;
    let log = nodes[2].log_text();
    let line = log
        .lines()
        .find(|l| l.contains("initial corruption check: this member's store agrees"))
        .unwrap_or_else(|| panic!("no check in:\n{log}"));
    // The log may color field names: drop the escape sequences first.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    assert!(plain.contains("members=2"), "both others compared: {plain}");

    // Change its store offline, as a storage bug would, and let the others pass the revision
    // the bad write took.
    nodes[2].terminate();
    let store = eden_storage::Store::open(&nodes[2].dir.join("raft").join("state")).unwrap();
    store
        .apply(
            &[Command::Put(PutRequest {
                key: b"k1".to_vec(),
                value: b"not what the others have".to_vec(),
                ..Default::default()
            })],
            &[],
        )
        .unwrap();
    drop(store);
    for i in 0..3 {
        put_retrying(&nodes[0].endpoint(), &format!("after{i}"), "v").await;
    }
    nodes[2].restart(&[FLAG]);
    let mut child = nodes[2].child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the diverged member still runs after 60 s:\n{}",
            nodes[2].log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = nodes[2].log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(
            "the initial corruption check found this member's data different from member n"
        ) && log.contains("--join"),
        "{log}"
    );
    // The others never stopped serving.
    put_retrying(&nodes[0].endpoint(), "still", "served").await;
}
