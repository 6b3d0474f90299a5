//! In-process clusters over real mutual TLS on loopback: replication, failover, restart,
//! snapshot catch-up, batching, and the refusal of foreign certificates.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use eden_raft::{ElectionHold, Error, RaftRole};
use eden_storage::{Command, CommandResponse, EventKind, PutRequest};
use openraft::SnapshotPolicy;

fn leader_index(nodes: &[TestNode]) -> usize {
    nodes
        .iter()
        .position(|n| n.node.is_leader())
        .expect("a leader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_survive_leader_loss_and_the_old_leader_catches_up() {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(&ca, root.path(), 3, no_tuning).await;

    let m = nodes[0].node.metrics();
    assert_eq!(
        m.voters.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2, 3])
    );
    assert!(m.learners.is_empty());

    // Writes through every node, followers forwarding to the leader.
    let mut feed = nodes[2].node.subscribe();
    let mut last_rev = 0;
    for (i, n) in nodes.iter().enumerate() {
        let applied = n
            .node
            .write(put(&format!("k{i}"), &format!("v{i}")))
            .await
            .unwrap();
        assert!(applied.revision > last_rev, "revisions grow");
        last_rev = applied.revision;
    }
    // A store refusal comes back with etcd's exact message, through forwarding too.
    let follower = nodes.iter().find(|n| !n.node.is_leader()).unwrap();
    let refused = follower
        .node
        .write(put_keeping_a_missing_value())
        .await
        .unwrap_err();
    assert_eq!(refused.to_string(), "etcdserver: key not found");
    assert!(matches!(
        refused,
        Error::Store(eden_storage::Error::KeyNotFound)
    ));

    // Linearizable read on a follower sees every completed write.
    nodes[2].node.linearizable_read().await.unwrap();
    for i in 0..3 {
        assert_eq!(
            local_get(&nodes[2].node, &format!("k{i}")),
            Some(format!("v{i}").into_bytes())
        );
    }
    // The event feed delivered the three puts in revision order.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let rev = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("event in time")
            .unwrap();
        assert_eq!(rev.events.len(), 1);
        assert_eq!(rev.events[0].kind, EventKind::Put);
        seen.push((rev.revision, rev.events[0].kv.key.clone()));
    }
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(
        seen.iter().map(|s| s.1.clone()).collect::<Vec<_>>(),
        vec![b"k0".to_vec(), b"k1".to_vec(), b"k2".to_vec()]
    );

    // Stop the leader; the others elect a new one and keep taking writes.
    let old = nodes.remove(leader_index(&nodes));
    let (old_id, old_addr, old_dir) = (old.id, old.addr.clone(), old.dir.clone());
    old.stop().await;
    wait_for(|| nodes.iter().any(|n| n.node.is_leader()), "a new leader").await;
    for i in 3..10 {
        nodes[i % 2]
            .node
            .write(put(&format!("k{i}"), &format!("v{i}")))
            .await
            .unwrap();
    }
    let new_leader = &nodes[leader_index(&nodes)];
    assert_ne!(new_leader.id, old_id);
    let lag = new_leader.node.metrics().replication[&old_id].lag;
    assert!(lag > 0, "the stopped node is reported behind");

    // The old leader restarts from its data dir and catches up.
    let back = TestNode::start(&ca, old_id, &old_dir, &old_addr, no_tuning).await;
    caught_up(&back.node).await;
    for i in 0..10 {
        assert_eq!(
            local_get(&back.node, &format!("k{i}")),
            Some(format!("v{i}").into_bytes()),
            "k{i} on the restarted node"
        );
    }
    assert_ne!(back.node.metrics().role, RaftRole::Learner);
    nodes.push(back);
    for n in nodes {
        n.stop().await;
    }
}

/// A linearizable read on a node that just restarted: it may first believe it still leads (its
/// stored vote) or call an election before it hears from the leader, and a client retries
/// then. Retried for up to 30 s; the last error is the failure.
async fn caught_up(node: &std::sync::Arc<eden_raft::RaftNode>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match node.linearizable_read().await {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("linearizable read on the restarted node: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the restarted node never served a linearizable read: {e}"),
        }
    }
}

fn snapshot_often(c: &mut eden_raft::NodeConfig) {
    c.raft.snapshot_policy = SnapshotPolicy::LogsSinceLast(20);
    c.raft.max_in_snapshot_log_to_keep = 0;
    c.raft.purge_batch_size = 1;
    c.raft.snapshot_max_chunk_size = 1024;
}

fn snapshot_often_in_tiny_chunks(c: &mut eden_raft::NodeConfig) {
    snapshot_often(c);
    c.raft.snapshot_max_chunk_size = 256;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_purged_log_catches_up_by_snapshot() {
    catch_up_by_snapshot(snapshot_often).await;
}

/// A snapshot sent in so many chunks that the transfer outlasts the election timeout: the
/// follower must not call an election meanwhile (no heartbeat reaches it while it receives),
/// which would depose the leader and start the transfer over, again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_transfer_longer_than_the_election_timeout_lands_without_an_election() {
    let took = catch_up_by_snapshot(snapshot_often_in_tiny_chunks).await;
    eprintln!("the snapshot in 256-byte chunks took {took:?}");
}

/// Stops a follower, writes past the purged log, restarts it and checks it caught up by
/// snapshot (in the chunks `tuning` sets) with no election: how long the catch-up took.
async fn catch_up_by_snapshot(tuning: Tune) -> Duration {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(&ca, root.path(), 3, tuning).await;
    nodes[0].node.write(put("before", "x")).await.unwrap();

    let lagging = nodes.remove(2);
    let (id, addr, dir) = (lagging.id, lagging.addr.clone(), lagging.dir.clone());
    // The write is committed once two nodes have it; the third may not have reported it yet.
    wait_for(
        || {
            local_get(&lagging.node, "before").is_some()
                && lagging.node.metrics().last_log_index.is_some()
        },
        "the third node to apply the first write",
    )
    .await;
    let behind = lagging.node.metrics().last_log_index.unwrap();
    lagging.stop().await;

    // Enough sequential writes for several snapshots, with a value big enough to need many
    // chunks.
    let big = "x".repeat(4096);
    for i in 0..60 {
        nodes[0]
            .node
            .write(put(&format!("key{i:03}"), &big))
            .await
            .unwrap();
    }
    let leader = &nodes[leader_index(&nodes)];
    wait_for(
        || leader.node.metrics().purged_index.unwrap_or(0) > behind,
        "the leader to purge past the stopped follower",
    )
    .await;
    let term = leader.node.metrics().term;

    let started = std::time::Instant::now();
    let back = TestNode::start(&ca, id, &dir, &addr, tuning).await;
    caught_up(&back.node).await;
    let took = started.elapsed();
    let m = back.node.metrics();
    assert!(
        m.snapshot_index.unwrap_or(0) > behind,
        "caught up by snapshot: {m:?}"
    );
    assert_eq!(
        (leader.node.is_leader(), leader.node.metrics().term),
        (true, term),
        "an election happened while the follower caught up ({took:?})"
    );
    for i in 0..60 {
        assert_eq!(
            local_get(&back.node, &format!("key{i:03}")).as_deref(),
            Some(big.as_bytes())
        );
    }
    assert_eq!(local_get(&back.node, "before"), Some(b"x".to_vec()));
    // The state after the snapshot is consistent with the leader's, revisions included.
    assert_eq!(back.node.store().revision(), leader.node.store().revision());
    nodes.push(back);
    for n in nodes {
        n.stop().await;
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_batched_into_few_entries() {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(&ca, root.path(), 3, no_tuning).await;
    let leader = nodes[leader_index(&nodes)].node.clone();
    let before = leader.metrics().last_log_index.unwrap();
    let rev_before = leader.store().revision();

    const WRITES: usize = 256;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..WRITES {
        let n = leader.clone();
        tasks.spawn(async move { n.write(put(&format!("c{i}"), "v")).await });
    }
    let mut revisions = BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        let applied = r.unwrap().unwrap();
        assert!(matches!(applied.response, CommandResponse::Put(_)));
        revisions.insert(applied.revision);
    }
    assert_eq!(revisions.len(), WRITES, "every write got its own revision");
    assert_eq!(leader.store().revision(), rev_before + WRITES as i64);
    let entries = leader.metrics().last_log_index.unwrap() - before;
    assert!(
        entries * 8 <= WRITES as u64,
        "{WRITES} concurrent writes took {entries} log entries; batching should need far fewer"
    );
    for n in nodes {
        n.stop().await;
    }
}

/// Linearizable reads on a follower, while the leader keeps writing: each read sees every write
/// the leader had acknowledged before the read began. A follower learns of a commit only after
/// the leader, so its reads often have to wait for their own node to apply the read index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_reads_see_every_write_acknowledged_before_them() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(&ca, root.path(), 3, no_tuning).await;
    let leader = nodes[leader_index(&nodes)].node.clone();
    let follower = nodes.iter().find(|n| !n.node.is_leader()).unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (leader, acked) = (leader.clone(), acked.clone());
        tokio::spawn(async move {
            for i in 1..=400u64 {
                leader.write(put("counter", &i.to_string())).await.unwrap();
                acked.store(i, Ordering::SeqCst);
            }
        })
    };
    let counter = || {
        local_get(&follower.node, "counter")
            .map_or(0, |v| String::from_utf8(v).unwrap().parse::<u64>().unwrap())
    };
    let (mut reads, mut ahead) = (0, 0);
    while !writer.is_finished() {
        let before = acked.load(Ordering::SeqCst);
        let stale = counter();
        follower.node.linearizable_read().await.unwrap();
        let seen = counter();
        assert!(
            seen >= before,
            "read {reads} saw counter {seen}, but the leader had acknowledged {before} before it"
        );
        reads += 1;
        if stale < before {
            ahead += 1;
        }
    }
    writer.await.unwrap();
    // The check above only means something if the follower's store was often behind when a
    // read began, so that the read had to wait.
    assert!(
        ahead >= 10,
        "{reads} reads, {ahead} began with the follower behind the leader's acknowledgements"
    );
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_through_a_follower_are_forwarded_together() {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(&ca, root.path(), 3, no_tuning).await;
    let li = leader_index(&nodes);
    let leader = nodes[li].node.clone();
    let follower = nodes[(li + 1) % 3].node.clone();
    let before = leader.metrics().last_log_index.unwrap();

    const WRITES: usize = 256;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..WRITES {
        let n = follower.clone();
        tasks.spawn(async move {
            let key = format!("f{i}");
            (key.clone(), n.write(put(&key, &i.to_string())).await)
        });
    }
    let mut answered = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (key, applied) = r.unwrap();
        answered.push((key, applied.unwrap().revision));
    }
    // Each caller got the revision of its own write: the answers are not mixed up.
    follower.linearizable_read().await.unwrap();
    for (key, revision) in &answered {
        let kv = follower
            .store()
            .range(&eden_storage::RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })
            .unwrap()
            .kvs
            .remove(0);
        assert_eq!(
            kv.mod_revision, *revision,
            "{key} answered the wrong revision"
        );
    }
    let distinct: BTreeSet<i64> = answered.iter().map(|(_, r)| *r).collect();
    assert_eq!(distinct.len(), WRITES);
    let entries = leader.metrics().last_log_index.unwrap() - before;
    assert!(
        entries * 8 <= WRITES as u64,
        "{WRITES} concurrent writes through a follower took {entries} log entries"
    );
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_certificate_from_the_cluster_ca_are_refused() {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(&ca, root.path(), 1, no_tuning).await;
    let addr = nodes[0].addr.clone();
    let term = nodes[0].node.metrics().term;
    let vote = openraft::raft::VoteRequest::<u64> {
        vote: openraft::Vote::new(term + 5, 99),
        last_log_id: None,
    };
    let body = bincode::serde::encode_to_vec(&vote, bincode::config::standard()).unwrap();
    let timeout = Duration::from_secs(5);

    // Control: a certificate from the cluster CA gets an answer.
    let good = eden_raft::PeerPool::new(ca.node_tls("node7").client);
    good.call(&addr, "/raft/read-nothing", body.clone(), timeout)
        .await
        .expect_err("unknown route is refused");
    let forward = good
        .call(
            &addr,
            eden_raft::transport::server_paths::FORWARD_READ_INDEX,
            bincode::serde::encode_to_vec((), bincode::config::standard()).unwrap(),
            timeout,
        )
        .await
        .expect("a cluster peer is served");
    assert!(!forward.is_empty());

    // A certificate from another CA (while trusting the cluster CA) is refused at the handshake.
    let other = TestCa::new("other-ca");
    let foreign = eden_raft::PeerPool::new(std::sync::Arc::new(client_config(
        ca.roots(),
        Some(other.issue("intruder")),
    )));
    let err = foreign
        .call(&addr, "/raft/vote", body.clone(), timeout)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            eden_raft::transport::client::CallError::Unreachable { .. }
                | eden_raft::transport::client::CallError::Network { .. }
        ),
        "{err}"
    );

    // No certificate at all: TLS is accepted (for /join) but the Raft routes are not. Over the
    // framed protocol the connection is closed before anything is read; over HTTP/2 the answer
    // is a 403 that says why.
    let anonymous = eden_raft::PeerPool::new(std::sync::Arc::new(client_config(ca.roots(), None)));
    let err = anonymous
        .call(&addr, "/raft/vote", body.clone(), timeout)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            eden_raft::transport::client::CallError::Network { .. }
                | eden_raft::transport::client::CallError::Unreachable { .. }
        ),
        "{err}"
    );
    let err = anonymous
        .call_http2(&addr, "/raft/vote", body, timeout)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");

    // Neither vote reached Raft: the term is unchanged and node 1 still leads.
    let m = nodes[0].node.metrics();
    assert_eq!(m.term, term);
    assert_eq!(m.role, RaftRole::Leader);
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_routes_use_the_framed_protocol_and_fall_back_to_http2() {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(&ca, root.path(), 1, no_tuning).await;
    let addr = nodes[0].addr.clone();
    let timeout = Duration::from_secs(5);
    let unit = bincode::serde::encode_to_vec((), bincode::config::standard()).unwrap();
    let read_index = eden_raft::transport::server_paths::FORWARD_READ_INDEX;

    let pool = eden_raft::PeerPool::new(ca.node_tls("node7").client);
    assert!(!pool.speaks_framed(&addr));
    pool.call(&addr, read_index, unit.clone(), timeout)
        .await
        .expect("a cluster peer is served");
    assert!(pool.speaks_framed(&addr), "the Raft route went over HTTP/2");

    // A peer that offers only HTTP/2 (an eden from before the framed protocol) gets the same
    // call over HTTP/2.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let old_addr = listener.local_addr().unwrap().to_string();
    let mut server = (*ca.node_tls("old").server).clone();
    server.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                    let body = format!("http2 {}", req.uri().path());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(body)),
                    ))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
            });
        }
    });
    for _ in 0..2 {
        let answer = pool
            .call(&old_addr, read_index, unit.clone(), timeout)
            .await
            .expect("the HTTP/2-only peer is served");
        assert_eq!(&answer[..], format!("http2 {read_index}").as_bytes());
        assert!(!pool.speaks_framed(&old_addr));
    }
    for n in nodes {
        n.stop().await;
    }
}

/// A put that keeps the value of a key that does not exist: the store refuses it.
fn put_keeping_a_missing_value() -> Command {
    Command::Put(PutRequest {
        key: b"missing".to_vec(),
        ignore_value: true,
        ..Default::default()
    })
}

/// Writes `key` through `node`, retrying for up to 30 s while the cluster elects a leader.
async fn write_retrying(node: &std::sync::Arc<eden_raft::RaftNode>, key: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match node.write(put(key, "1")).await {
            Ok(_) => return,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("write {key}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("write {key} never succeeded: {e}"),
        }
    }
}

/// A leader that dies between the two entries of a membership change leaves the cluster in a
/// joint configuration, which Raft itself never finishes. The next leader reports it
/// (`NodeMetrics::joint_target`, which the role controller turns into `Decision::Finish`),
/// and `finish_change` completes it, losing no write and dropping no voter by surprise.
///
/// Made deterministic by stopping the nodes the new half needs: voters 1, 2, 3 and learner 4;
/// with 2 and 4 down, leader 1 proposes voters {1, 2, 4}. The joint entry reaches node 3 but
/// cannot commit (the new half has only node 1), and then node 1 dies. Node 3, the only one
/// holding the joint entry, is the only one that can win an election once 2 and 4 are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joint_membership_left_by_a_dead_leader_is_reported_and_finished() {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(&ca, root.path(), 3, no_tuning).await;
    assert!(nodes[0].node.is_leader());
    let n4 = TestNode::start(&ca, 4, &root.path().join("n4"), "127.0.0.1:0", no_tuning).await;
    nodes[0]
        .node
        .add_learner(4, n4.node.info().clone())
        .await
        .unwrap();
    nodes[0].node.write(put("before", "1")).await.unwrap();
    wait_for(
        || local_get(&n4.node, "before").is_some(),
        "the learner to apply",
    )
    .await;

    let n3 = nodes.pop().unwrap();
    let n2 = nodes.pop().unwrap();
    let n1 = nodes.pop().unwrap();
    let (addr2, dir2, addr4, dir4) = (
        n2.addr.clone(),
        n2.dir.clone(),
        n4.addr.clone(),
        n4.dir.clone(),
    );
    n2.stop().await;
    n4.stop().await;
    let new_voters = BTreeSet::from([1, 2, 4]);
    let change = {
        let leader = n1.node.clone();
        let voters = new_voters.clone();
        tokio::spawn(async move {
            leader
                .change_membership(eden_raft::MembershipChange::SetVoters { voters })
                .await
        })
    };
    wait_for(
        || n3.node.metrics().joint_target.as_ref() == Some(&new_voters),
        "node 3 to hold the joint entry",
    )
    .await;
    n1.stop().await;
    let stuck = change.await.unwrap();
    assert!(
        stuck.is_err(),
        "the change cannot have completed: {stuck:?}"
    );

    let n2 = TestNode::start(&ca, 2, &dir2, &addr2, no_tuning).await;
    let n4 = TestNode::start(&ca, 4, &dir4, &addr4, no_tuning).await;
    wait_for(|| n3.node.is_leader(), "node 3 to lead").await;
    // The new leader sees the half-done change and what it was heading for.
    caught_up(&n3.node).await;
    let m = n3.node.metrics();
    assert_eq!(m.joint_target.as_ref(), Some(&new_voters), "{m:?}");

    n3.node.finish_change(new_voters.clone()).await.unwrap();
    let m = n3.node.metrics();
    assert_eq!(m.joint_target, None, "{m:?}");
    assert_eq!(
        m.voters.keys().copied().collect::<BTreeSet<_>>(),
        new_voters
    );
    // The voter that left stays, as a learner.
    assert_eq!(m.learners.keys().copied().collect::<Vec<_>>(), [3]);
    // Node 1 is dead but still a voter: 2 and 4 are a majority, and writes go on.
    write_retrying(&n3.node, "after").await;
    for n in [&n2, &n4] {
        wait_for(
            || local_get(&n.node, "before").is_some() && local_get(&n.node, "after").is_some(),
            "every write on the new voters",
        )
        .await;
    }
    for n in [n2, n3, n4] {
        n.stop().await;
    }
}

/// A voter removed while it was down, restarted from its log and admitted again as a learner,
/// must not call elections before the leader's entries reach it: its log still lists it as a
/// voter and its election timer ran out long ago, so its term would rise past the leader's and
/// depose the leader once they talk. `ElectionHold::UntilMembership` keeps it quiet, and lifts
/// itself once its log holds the membership that admitted it, after which the node campaigns
/// again when it is a voter.
///
/// Made deterministic by addresses: node 3 restarts on a new port the leader does not know,
/// and the leader admits it at its old one, where nothing listens. Then a second peer server
/// for the same node opens on the old port and the entries get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readmitted_learner_calls_no_election_before_the_leaders_entries_arrive() {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(&ca, root.path(), 3, no_tuning).await;
    let n1 = nodes.remove(0);
    assert!(n1.node.is_leader());
    n1.node.write(put("before", "1")).await.unwrap();
    wait_for(
        || nodes.iter().all(|n| local_get(&n.node, "before").is_some()),
        "every node to apply",
    )
    .await;
    let n3 = nodes.pop().unwrap();
    let (old_addr, dir3) = (n3.addr.clone(), n3.dir.clone());
    n3.stop().await;
    n1.node.remove(3).await.unwrap();
    let term = n1.node.metrics().term;

    // Restarted from its log, which still lists it as a voter; held as the host holds a node
    // restarted from its data dir until it has asked the members.
    let n3 = TestNode::start(&ca, 3, &dir3, "127.0.0.1:0", no_tuning).await;
    n3.node.hold_elections(ElectionHold::Outside);
    wait_for(
        || n3.node.metrics().voters.contains_key(&3),
        "node 3 to load its log, which lists it as a voter",
    )
    .await;
    let admit = {
        let (leader, info) = (n1.node.clone(), info(3, &old_addr));
        tokio::spawn(async move { leader.add_learner(3, info).await })
    };
    wait_for(
        || n1.node.metrics().learners.contains_key(&3),
        "the leader to admit node 3",
    )
    .await;
    let admitted_at = n1.node.metrics().membership_index;
    // What the members' answer gives a learner it admitted.
    n3.node
        .hold_elections(ElectionHold::UntilMembership(admitted_at));
    // Longer than the longest election timeout (1.4 s) with nothing from the leader.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m3 = n3.node.metrics();
    assert_eq!(m3.term, term, "node 3 campaigned while held: {m3:?}");
    assert!(m3.voters.contains_key(&3), "{m3:?}");
    assert!(n3.node.elections_held());

    // The old port opens: the leader's entries arrive and the hold lifts itself.
    let listener = tokio::net::TcpListener::bind(&old_addr).await.unwrap();
    let server = {
        let (tls, node) = (ca.node_tls("node3"), n3.node.clone());
        tokio::spawn(async move {
            eden_raft::PeerServer::serve(listener, tls.server, node, None, std::future::pending())
                .await
        })
    };
    admit.await.unwrap().unwrap();
    wait_for(|| !n3.node.elections_held(), "the hold to lift").await;
    let m3 = n3.node.metrics();
    assert!(m3.membership_index >= admitted_at, "{m3:?}");
    assert!(
        m3.learners.contains_key(&3) && !m3.voters.contains_key(&3),
        "{m3:?}"
    );
    assert_eq!(local_get(&n3.node, "before").as_deref(), Some(&b"1"[..]));
    n1.node.write(put("after", "2")).await.unwrap();
    wait_for(
        || local_get(&n3.node, "after").is_some(),
        "node 3 to apply a new write",
    )
    .await;
    // The leader kept its place all along.
    let m1 = n1.node.metrics();
    assert!(n1.node.is_leader());
    assert_eq!(m1.term, term, "{m1:?}");

    // Lifted means Raft may campaign again, not just that the hold reads as lifted: promoted
    // to voter, with the leader gone and node 2 held, node 3 is the only one that can win.
    n1.node.promote(3).await.unwrap();
    wait_for(
        || n3.node.metrics().voters.contains_key(&3),
        "node 3 to see itself a voter",
    )
    .await;
    let n2 = nodes.pop().unwrap();
    n2.node.hold_elections(ElectionHold::Outside);
    n1.stop().await;
    wait_for(|| n3.node.is_leader(), "node 3 to win an election").await;
    server.abort();
    for n in [n2, n3] {
        n.stop().await;
    }
}

fn two_second_requests(c: &mut eden_raft::NodeConfig) {
    c.request_timeout = Duration::from_secs(2);
}

/// `RaftNode::proposals`: the committed index follows writes, a store refusal is not a failed
/// write, and a write a leader cut off from its quorum cannot commit is answered "request timed
/// out" after the request timeout (as etcd answers), counted as pending meanwhile and as failed
/// after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_counters_and_a_write_that_cannot_commit() {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(&ca, root.path(), 3, two_second_requests).await;
    let l = leader_index(&nodes);
    let leader = nodes[l].node.clone();
    let applied = leader.write(put("a", "1")).await.unwrap();
    let counts = leader.proposals();
    assert!(counts.committed >= 1, "{counts:?}");
    assert_eq!((counts.pending, counts.failed), (0, 0));
    let refused = leader
        .write(put_keeping_a_missing_value())
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::Store(_)), "{refused}");
    assert_eq!(leader.proposals().failed, 0, "a refusal is not a failure");
    assert!(applied.revision > 0);

    // Stop both followers: the leader keeps its role but cannot commit.
    let leader_node = nodes.remove(l);
    for n in nodes {
        n.stop().await;
    }
    let started = std::time::Instant::now();
    let write = {
        let leader = leader.clone();
        tokio::spawn(async move { leader.write(put("b", "2")).await })
    };
    wait_for(
        || leader.proposals().pending == 1,
        "the write to be pending",
    )
    .await;
    let err = tokio::time::timeout(Duration::from_secs(15), write)
        .await
        .expect("the write is answered")
        .unwrap()
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.to_string(), "unavailable: request timed out");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    let counts = leader.proposals();
    assert_eq!((counts.pending, counts.failed), (0, 1), "{counts:?}");
    leader_node.stop().await;
}

/// A write whose caller timed out while it still waited in the proposer's queue (behind a batch
/// that could not commit) is dropped there: once the quorum is back, the stuck batch commits
/// and the timed-out write is never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_timed_out_while_queued_is_never_proposed() {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(&ca, root.path(), 3, two_second_requests).await;
    let l = leader_index(&nodes);
    let leader_node = nodes.remove(l);
    let leader = leader_node.node.clone();
    leader.write(put("a", "1")).await.unwrap();
    let term = leader.metrics().term;

    let mut stopped = Vec::new();
    for n in nodes {
        stopped.push(n.stop_keeping_place().await);
    }
    // "b" is proposed and cannot commit; "c" waits in the queue behind it.
    let b = {
        let leader = leader.clone();
        tokio::spawn(async move { leader.write(put("b", "2")).await })
    };
    wait_for(|| leader.proposals().pending == 1, "b to be pending").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = {
        let leader = leader.clone();
        tokio::spawn(async move { leader.write(put("c", "3")).await })
    };
    for (name, w) in [("b", b), ("c", c)] {
        let err = w.await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "unavailable: request timed out", "{name}");
    }

    let mut back = Vec::new();
    for (id, dir, addr) in stopped {
        back.push(TestNode::start(&ca, id, &dir, &addr, two_second_requests).await);
    }
    wait_for(
        || local_get(&leader, "b").is_some(),
        "the stuck write to commit once the followers are back",
    )
    .await;
    assert_eq!(
        (leader.is_leader(), leader.metrics().term),
        (true, term),
        "the leader changed, so the queue was not what decided"
    );
    // A later write commits, so the proposer has taken everything queued before it.
    leader.write(put("d", "4")).await.unwrap();
    assert_eq!(
        local_get(&leader, "c"),
        None,
        "the timed-out write was applied"
    );
    for n in back {
        n.stop().await;
    }
    leader_node.stop().await;
}

fn hash_at_start(c: &mut eden_raft::NodeConfig) {
    c.hash_at_start = true;
}

/// `NodeConfig::hash_at_start` hashes the store as it was on disk before Raft applied anything:
/// a member that comes back after the others compacted past its revision still has the hash
/// of its own history at that revision (its store, once caught up, can no longer give it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_hash_is_taken_before_raft_applies_what_the_member_missed() {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(&ca, root.path(), 3, no_tuning).await;
    assert_eq!(nodes[0].node.hash_at_start(), None, "not asked for");
    for i in 0..5 {
        nodes[0]
            .node
            .write(put(&format!("k{i}"), &i.to_string()))
            .await
            .unwrap();
    }
    let l = leader_index(&nodes);
    let f = (l + 1) % 3;
    let follower = nodes.remove(f);
    follower.node.linearizable_read().await.unwrap();
    let rev = follower.node.store().revision();
    let (hash, compacted) = follower.node.store().hash_kv(rev).unwrap();
    let (id, dir, addr) = follower.stop_keeping_place().await;

    let leader = nodes
        .iter()
        .find(|n| n.node.is_leader())
        .unwrap()
        .node
        .clone();
    for i in 0..5 {
        leader.write(put(&format!("k{i}"), "later")).await.unwrap();
    }
    let now = leader.store().revision();
    leader
        .write(Command::Compact(eden_storage::CompactionRequest {
            revision: now,
            physical: true,
        }))
        .await
        .unwrap();

    let back = TestNode::start(&ca, id, &dir, &addr, hash_at_start).await;
    assert_eq!(back.node.revision_at_start(), rev);
    caught_up(&back.node).await;
    wait_for(
        || back.node.store().hash_kv(rev).is_err(),
        "the member to apply the compaction",
    )
    .await;
    assert_eq!(
        back.node.hash_at_start(),
        Some(&Ok(eden_raft::StartHash {
            revision: rev,
            hash,
            compacted,
        }))
    );
    back.stop().await;
    for n in nodes {
        n.stop().await;
    }
}

/// A follower that missed more than an append may carry (`MAX_APPEND_BYTES` of large values)
/// catches up in several appends, each within the cap (the log reader stops there), not in one
/// call too large to answer in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_catches_up_on_more_large_values_than_one_append_carries() {
    let ca = TestCa::new("cluster-ca");
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(&ca, root.path(), 3, no_tuning).await;
    let l = leader_index(&nodes);
    let f = (l + 1) % 3;
    let follower = nodes.remove(f);
    let (id, dir, addr) = follower.stop_keeping_place().await;
    let leader = nodes
        .iter()
        .find(|n| n.node.is_leader())
        .unwrap()
        .node
        .clone();
    let value = "v".repeat(1 << 20);
    let count = eden_raft::transport::client::MAX_APPEND_BYTES / (1 << 20) + 8;
    for i in 0..count {
        leader
            .write(put(&format!("big{i:03}"), &value))
            .await
            .unwrap();
    }
    let back = TestNode::start(&ca, id, &dir, &addr, no_tuning).await;
    caught_up(&back.node).await;
    let last = format!("big{:03}", count - 1);
    wait_for(
        || local_get(&back.node, &last).is_some(),
        "the follower to apply the last large value",
    )
    .await;
    assert_eq!(
        local_get(&back.node, "big000").map(|v| v.len()),
        Some(1 << 20)
    );
    let largest = leader
        .peer_pool()
        .peer_stats()
        .into_iter()
        .find(|(peer, _)| *peer == id)
        .map(|(_, s)| s.largest_append)
        .unwrap_or(0);
    let cap = eden_raft::transport::client::MAX_APPEND_BYTES;
    assert!(
        largest > 0 && largest <= cap,
        "the largest append carried {largest} bytes (cap {cap})"
    );
    back.stop().await;
    for n in nodes {
        n.stop().await;
    }
}
