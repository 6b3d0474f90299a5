//! Datastore takeover with real processes: five `eden serve` nodes (3 voters, 1 standby and an
//! eligible agent, as `standbys: 1` asks). The
//! leader, then a follower voter, is killed with SIGKILL while a client writes; each time the
//! role controller promotes a standby and removes the dead voter, the cluster is back to three
//! voters, and no acknowledged write is lost.

mod serve_common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eden::etcd::pb::etcdserverpb::StatusResponse;
use serve_common::*;

/// Writes `w/<n>` keys through the endpoints in `targets` until stopped, from a few clients at
/// once (so one write stuck on a dead node does not hold up the rest); records what was
/// acknowledged, when it was sent and when it was acknowledged.
struct Writer {
    targets: Arc<Mutex<Vec<String>>>,
    acked: Arc<Mutex<Vec<(String, Instant, Instant)>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Concurrent clients of a [`Writer`].
const WRITERS: usize = 4;

impl Writer {
    fn start(targets: Vec<String>) -> Writer {
        let targets = Arc::new(Mutex::new(targets));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tasks = (0..WRITERS)
            .map(|_| {
                let (targets, acked, stop, next) =
                    (targets.clone(), acked.clone(), stop.clone(), next.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let ep = {
                            let t = targets.lock().unwrap();
                            t[(n as usize) % t.len()].clone()
                        };
                        let key = format!("w/{n:06}");
                        let sent = Instant::now();
                        if put(&ep, &key, "x").await.is_ok() {
                            acked.lock().unwrap().push((key, sent, Instant::now()));
                        } else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                })
            })
            .collect();
        Writer {
            targets,
            acked,
            stop,
            tasks,
        }
    }

    /// The keys acknowledged so far.
    fn acked_keys(&self) -> Vec<String> {
        let acked = self.acked.lock().unwrap();
        acked.iter().map(|(k, _, _)| k.clone()).collect()
    }

    fn avoid(&self, endpoint: &str) {
        self.targets.lock().unwrap().retain(|e| e != endpoint);
    }

    fn include(&self, endpoint: &str) {
        self.targets.lock().unwrap().push(endpoint.to_string());
    }

    /// How long after `t` the first write sent after `t` was acknowledged (a write sent
    /// before it may have been committed before it, so it proves nothing).
    fn first_ack_after(&self, t: Instant) -> Option<Duration> {
        self.acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, sent, _)| *sent > t)
            .map(|(_, _, at)| *at - t)
            .min()
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let acked = self.acked.lock().unwrap();
        acked.iter().map(|(k, _, _)| k.clone()).collect()
    }
}

/// The role controller's events, oldest first.
async fn events(endpoint: &str) -> Vec<String> {
    let ch = channel(endpoint).await.unwrap();
    Kv::new(ch)
        .range(eden::etcd::pb::etcdserverpb::RangeRequest {
            key: b"/eden/events/".to_vec(),
            range_end: b"/eden/events0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.value).to_string())
        .collect()
}

/// The `w/` keys `endpoint` holds and their values: read linearizably, or from its own replica
/// (`serializable`); retried while it has no leader.
async fn written(endpoint: &str, serializable: bool) -> HashMap<String, Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = async {
            let ch = channel(endpoint).await.map_err(|e| e.to_string())?;
            Kv::new(ch)
                .max_decoding_message_size(usize::MAX)
                .range(eden::etcd::pb::etcdserverpb::RangeRequest {
                    key: b"w/".to_vec(),
                    range_end: b"w0".to_vec(),
                    serializable,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match got {
            Ok(r) => {
                return r
                    .into_inner()
                    .kvs
                    .into_iter()
                    .map(|kv| (String::from_utf8_lossy(&kv.key).to_string(), kv.value))
                    .collect()
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "reading w/ through {endpoint}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// `eden cluster status --output json` against `endpoint`.
fn cluster_status(endpoint: &str) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eden"))
        .args([
            "cluster",
            "status",
            "--endpoints",
            endpoint,
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "eden cluster status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The membership as `endpoint` reports it: (voter ids, learner ids), or None if unreachable.
async fn shape(endpoint: &str) -> Option<(Vec<u64>, Vec<u64>)> {
    let ch = channel(endpoint).await.ok()?;
    let m = eden::etcd::pb::etcdserverpb::cluster_client::ClusterClient::new(ch)
        .member_list(eden::etcd::pb::etcdserverpb::MemberListRequest::default())
        .await
        .ok()?
        .into_inner()
        .members;
    let voters = m.iter().filter(|m| !m.is_learner).map(|m| m.id).collect();
    let learners = m.iter().filter(|m| m.is_learner).map(|m| m.id).collect();
    Some((voters, learners))
}

/// Where a wait looks: one endpoint, or whichever running node is the most current member at
/// each look (a member picked once may be retired to an eligible agent during the wait, and
/// then refuses).
#[derive(Clone, Copy)]
enum Via<'a> {
    One(&'a str),
    Best(&'a [Node]),
}

impl Via<'_> {
    async fn endpoint(self) -> String {
        match self {
            Via::One(e) => e.to_string(),
            Via::Best(nodes) => member_endpoint(nodes, None).await.1,
        }
    }
}

/// Waits until `at` reports `voters` voters and `learners` learners, none of them `gone`.
async fn wait_shape(at: Via<'_>, voters: usize, learners: usize, gone: &[u64]) -> Duration {
    wait_membership(at, Some(learners), voters, gone).await
}

/// Waits until `at` reports `voters` voters (and, if given, `learners` learners), none of
/// them `gone`; returns how long that took.
async fn wait_membership(
    at: Via<'_>,
    learners: Option<usize>,
    voters: usize,
    gone: &[u64],
) -> Duration {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let mut last = None;
    loop {
        if let Some((v, l)) = shape(&at.endpoint().await).await {
            let ok = v.len() == voters
                && learners.is_none_or(|n| l.len() == n)
                && !v.iter().chain(&l).any(|id| gone.contains(id));
            if ok {
                return start.elapsed();
            }
            last = Some((v, l));
        }
        assert!(
            Instant::now() < deadline,
            "no {voters} voters + {learners:?} standbys without {gone:x?} within 60 s; last \
             seen {last:x?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Which node a round kills.
#[derive(Debug, Clone, Copy)]
enum Victim {
    Leader,
    FollowerVoter,
    Standby,
}

fn p50(xs: &mut [Duration]) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// Rounds per victim kind: `EDEN_TAKEOVER_ROUNDS`, else 20.
fn rounds() -> usize {
    std::env::var("EDEN_TAKEOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_nodes_survive_killed_leaders_voters_and_standbys_and_lose_no_write() {
    let root = tempfile::tempdir().unwrap();
    let mut root = root;
    // EDEN_TAKEOVER_KEEP=1 keeps the data dirs and node logs for a look afterwards.
    let keep = std::env::var("EDEN_TAKEOVER_KEEP").is_ok();
    if keep {
        eprintln!("data dirs and logs kept in {}", root.path().display());
        root.disable_cleanup(true);
    }
    let mut nodes: Vec<Node> = Vec::new();
    let mut n1 = Node::new(root.path(), "n1");
    n1.create(None, &[]);
    n1.ready().await;
    let token = n1.token();
    let via = n1.peer.clone();
    nodes.push(n1);
    for i in 2..=5 {
        let mut n = Node::new(root.path(), &format!("n{i}"));
        n.create(Some((&via, &token)), &[]);
        n.ready().await;
        nodes.push(n);
    }
    // Five datastore-capable nodes, one standby wanted: 3 voters, 1 standby, 1 eligible agent.
    wait_shape(Via::Best(&nodes), 3, 1, &[]).await;
    let st = wait_status(Via::Best(&nodes), 5).await;
    let ids: Vec<u64> = nodes
        .iter()
        .map(|n| {
            st["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == n.name.as_str())
                .unwrap_or_else(|| panic!("{} is not in {st:#}", n.name))["raft_id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let writer = Writer::start(nodes.iter().map(|n| n.endpoint()).collect());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut first_write: Vec<(Victim, Duration)> = Vec::new();
    let mut replaced: Vec<(Victim, Duration)> = Vec::new();
    let mut voter_replaced: Vec<(Victim, Duration)> = Vec::new();
    for round in 0..rounds() {
        for kind in [Victim::Leader, Victim::FollowerVoter, Victim::Standby] {
            let (voters, learners, before) = look(&nodes).await;
            let (leader, term) = (before.leader, before.raft_term);
            let victim_id = match kind {
                Victim::Leader => leader,
                Victim::FollowerVoter => *voters.iter().find(|id| **id != leader).unwrap(),
                Victim::Standby => learners[0],
            };
            let vi = leader_index(&nodes, victim_id, &ids);
            let oi = member_endpoint(&nodes, Some(vi)).await.0;
            writer.avoid(&nodes[vi].endpoint());
            let killed_at = Instant::now();
            let killed_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis();
            nodes[vi].kill9();
            // Back to 3 voters and 1 standby, without the dead node: the eligible agent is
            // admitted as the new standby when the old one was promoted or died.
            // A replacement voter: three voters again, none of them the dead node.
            let voter_back = wait_membership(Via::Best(&nodes), None, 3, &[victim_id]).await;
            wait_shape(Via::Best(&nodes), 3, 1, &[victim_id]).await;
            let took = killed_at.elapsed();
            // Not a speed check: the controller must not act on a member that has been
            // unreachable for less than failover-after (3 s by default).
            if took < Duration::from_secs(3) {
                panic!(
                    "round {round} {kind:?}: {victim_id} was replaced {took:?} after it died, \
                     before failover-after; shape before: {voters:?} {learners:?}; now {:?}; \
                     events: {:#?}\nvictim log:\n{}",
                    shape(&nodes[oi].endpoint()).await,
                    events(&nodes[oi].endpoint()).await,
                    nodes[vi].log_text()
                );
            }
            replaced.push((kind, took));
            if !matches!(kind, Victim::Standby) {
                voter_replaced.push((kind, voter_back));
            }
            if let Some(w) = writer.first_ack_after(killed_at) {
                first_write.push((kind, w));
            } else {
                // Wait for the first write to land (it must, within a few seconds).
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    if let Some(w) = writer.first_ack_after(killed_at) {
                        first_write.push((kind, w));
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "round {round} {kind:?}: no write"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            // `eden cluster status` agrees (a standby just admitted serves its etcd API a
            // moment after the membership shows it, so this is polled briefly).
            let agreed = Instant::now() + Duration::from_secs(10);
            loop {
                let st = cluster_status(&nodes[oi].endpoint());
                let members = st["nodes"].as_array().cloned().unwrap_or_default();
                let count = |role: &str| members.iter().filter(|m| m["role"] == role).count();
                // Every member is healthy; the killed node, if listed, is an agent now.
                let ok = (count("voter"), count("standby")) == (3, 1)
                    && members
                        .iter()
                        .filter(|m| m["role"] != "agent")
                        .all(|m| m["health"] == "alive" && m["healthy"] == true)
                    && members
                        .iter()
                        .filter(|m| m["raft_id"] == victim_id)
                        .all(|m| m["role"] == "agent")
                    && members.iter().filter(|m| m["leader"] == true).count() == 1;
                if ok {
                    break;
                }
                assert!(Instant::now() < agreed, "round {round} {kind:?}: {st:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // The killed node restarts from its data dir and is admitted again (as a standby,
            // and then the controller keeps one standby: one of the two becomes an eligible
            // agent again).
            let agreed_at = killed_at.elapsed();
            nodes[vi].restart(&[]);
            nodes[vi].ready().await;
            let up_at = killed_at.elapsed();
            wait_shape(Via::Best(&nodes), 3, 1, &[]).await;
            wait_status(Via::Best(&nodes), 5).await;
            // The observer may just have been retired to an eligible agent (the controller
            // keeps one standby of the two): look through a current member from here on.
            let oi = member_endpoint(&nodes, None).await.0;
            // Killing a follower or a standby, replacing it and admitting the restarted node
            // again must not cost the leader its place: a restarted removed voter that called
            // elections (outside the membership, or readmitted before the leader's entries
            // reached it) would depose the leader once admitted.
            if !matches!(kind, Victim::Leader) {
                let (_, _, now) = look(&nodes).await;
                assert_eq!(
                    (now.leader, now.raft_term),
                    (leader, term),
                    "round {round} {kind:?}: leader {leader:x} of term {term} was not killed, \
                     yet there was an election (now leader {:x}, term {}); the node that \
                     campaigned may be an earlier round's victim, so every node's log:\n{}",
                    now.leader,
                    now.raft_term,
                    nodes
                        .iter()
                        .map(|n| format!("==> {}\n{}", n.name, n.log_text()))
                        .collect::<String>()
                );
            }
            writer.include(&nodes[vi].endpoint());
            // After each round, every write acknowledged so far is there (a linearizable
            // read through a member).
            let acked = writer.acked_keys();
            let present = written(&nodes[oi].endpoint(), false).await;
            let lost: Vec<&String> = acked.iter().filter(|k| !present.contains_key(*k)).collect();
            assert!(
                lost.is_empty(),
                "round {round} {kind:?}: {} acknowledged writes are gone, e.g. {:?}",
                lost.len(),
                &lost[..lost.len().min(5)]
            );
            eprintln!(
                "round {round} {kind:?} ({} killed at unix ms {killed_unix_ms}): first write \
                 after {:?}, 3 voters after {voter_back:?}, \
                 3 voters + 1 standby after {took:?}, status agreed at {agreed_at:?}, restarted \
                 at {up_at:?}, round took {:?}",
                nodes[vi].name,
                first_write.last().unwrap().1,
                killed_at.elapsed()
            );
        }
    }
    for kind in [Victim::Leader, Victim::FollowerVoter, Victim::Standby] {
        let pick = |xs: &[(Victim, Duration)]| -> Vec<Duration> {
            xs.iter()
                .filter(|(k, _)| std::mem::discriminant(k) == std::mem::discriminant(&kind))
                .map(|(_, d)| *d)
                .collect()
        };
        let (mut w, mut r, mut v) = (pick(&first_write), pick(&replaced), pick(&voter_replaced));
        let voter = if v.is_empty() {
            String::new()
        } else {
            format!(
                "; replacement voter p50 {:?} max {:?}",
                p50(&mut v),
                v.last().unwrap()
            )
        };
        eprintln!(
            "{kind:?} killed x{}: first write p50 {:?} max {:?}{voter}; back to 3 voters + 1 \
             standby p50 {:?} max {:?}",
            w.len(),
            p50(&mut w),
            w.last().unwrap(),
            p50(&mut r),
            r.last().unwrap()
        );
    }

    // No acknowledged write is lost, on any node.
    let acked = writer.finish().await;
    eprintln!("{} writes acknowledged", acked.len());
    assert!(
        acked.len() > 10,
        "only {} writes were acknowledged",
        acked.len()
    );
    // Every member holds every acknowledged write (the eligible agent holds no replica).
    let (voters, learners, _) = look(&nodes).await;
    let members: Vec<&Node> = voters
        .iter()
        .chain(&learners)
        .map(|id| &nodes[leader_index(&nodes, *id, &ids)])
        .collect();
    assert_eq!(members.len(), 4);
    for (i, n) in members.iter().enumerate() {
        put_retrying(&n.endpoint(), &format!("barrier/{i}"), "b").await;
        for m in &members {
            wait_local_value(m, &format!("barrier/{i}"), "b").await;
        }
    }
    for n in &members {
        let held = written(&n.endpoint(), true).await;
        for key in &acked {
            assert_eq!(
                held.get(key).map(|v| &v[..]),
                Some(&b"x"[..]),
                "{} lost the acknowledged write {key}",
                n.name
            );
        }
    }
    // The controller recorded what it did and why.
    let observer = member_endpoint(&nodes, None).await.1;
    let ch = channel(&observer).await.unwrap();
    let events = Kv::new(ch)
        .range(eden::etcd::pb::etcdserverpb::RangeRequest {
            key: b"/eden/events/".to_vec(),
            range_end: b"/eden/events0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .kvs;
    let texts: Vec<String> = events
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.value).to_string())
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("\"remove\"") && t.contains("unreachable")),
        "no event records the removal of a dead member: {texts:#?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("\"promote\"") && t.contains("unreachable")),
        "no event records a promotion with its reason: {texts:#?}"
    );
    for action in ["\"admit\"", "\"retire\""] {
        assert!(
            texts
                .iter()
                .any(|t| t.contains(action) && t.contains("eligible agent")),
            "no event records an {action} of an eligible agent: {texts:#?}"
        );
    }
}

/// The running node (other than `not`) whose etcd API serves and whose replica is the most
/// current (highest applied index), so its view of the membership is not one a node just
/// retired still holds: its index and endpoint.
async fn member_endpoint(nodes: &[Node], not: Option<usize>) -> (usize, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut best: Option<(u64, usize)> = None;
        for (i, n) in nodes.iter().enumerate() {
            if Some(i) == not || n.child.is_none() {
                continue;
            }
            if let Ok(s) = status(&n.endpoint()).await {
                if best.is_none_or(|(a, _)| s.raft_applied_index > a) {
                    best = Some((s.raft_applied_index, i));
                }
            }
        }
        if let Some((_, i)) = best {
            return (i, nodes[i].endpoint());
        }
        assert!(Instant::now() < deadline, "no member answers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The membership and status through the most current member, looked at again while the
/// member picked stops answering (it may just have been retired to an eligible agent, as a
/// client would find, and move on).
async fn look(nodes: &[Node]) -> (Vec<u64>, Vec<u64>, StatusResponse) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let observer = member_endpoint(nodes, None).await.1;
        if let Some((voters, learners)) = shape(&observer).await {
            match status(&observer).await {
                Ok(st) => return (voters, learners, st),
                Err(e) => eprintln!("status through {observer}: {e}; looking again"),
            }
        }
        assert!(Instant::now() < deadline, "no member answered for 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `eden cluster status` through `at` lists `nodes` nodes, all healthy: 3
/// voters, 1 standby and the rest agents.
async fn wait_status(at: Via<'_>, nodes: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = cluster_status(&at.endpoint().await);
        let rows = st["nodes"].as_array().cloned().unwrap_or_default();
        let count = |role: &str| rows.iter().filter(|m| m["role"] == role).count();
        if rows.len() == nodes
            && (count("voter"), count("standby"), count("agent")) == (3, 1, nodes - 4)
            && rows.iter().all(|m| m["healthy"] == true)
        {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "cluster status did not show {nodes} healthy nodes (3 voters, 1 standby) within \
             60 s: {st:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[test]
fn eden_demo_runs_a_takeover_and_loses_nothing() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eden"))
        .args(["demo", "--nodes", "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "eden demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("kill -9 the leader"), "{stdout}");
    // The cluster-wide apply of examples/demo, with the token handed from n3 to every node.
    // --nodes 4, plus the agent-only node.
    assert!(
        stdout.contains("on 5 nodes: ") && stdout.contains(" 0 failed"),
        "{stdout}"
    );
    assert!(stdout.contains("found on 5 of 5 nodes"), "{stdout}");
    assert!(
        stdout.contains("acknowledged writes lost       0"),
        "{stdout}"
    );
    assert!(stdout.contains("3 voters again"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_recover_rebuilds_a_one_voter_cluster_from_a_survivor() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path(), &[]).await;
    for i in 0..20 {
        put_retrying(&nodes[0].endpoint(), &format!("r/{i:02}"), "kept").await;
    }
    let mut ids = Vec::new();
    for n in nodes.iter_mut() {
        ids.push(n.ready().await.header.unwrap().member_id);
    }
    // Two of three voters are lost for good.
    let survivor = 2;
    wait_local_value(&nodes[survivor], "r/19", "kept").await;
    nodes[0].kill9();
    nodes[1].kill9();
    let refused = tokio::time::timeout(
        Duration::from_secs(3),
        put(&nodes[survivor].endpoint(), "r/lonely", "x"),
    )
    .await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "a write succeeded without a quorum"
    );
    nodes[survivor].terminate();

    let recover = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_eden"))
            .args(["cluster", "recover", "--data-dir"])
            .arg(&nodes[survivor].dir)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = recover(&[]);
    assert_eq!(out.status.code(), Some(2), "recover ran without --yes");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    let out = recover(&["--yes", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["old_voters"].as_array().unwrap().len(),
        3,
        "{report}"
    );
    assert!(report["last_log"][0].as_u64().unwrap() > 20, "{report}");

    nodes[survivor].restart(&[]);
    nodes[survivor].ready().await;
    let rev = put_retrying(&nodes[survivor].endpoint(), "r/after", "yes").await;
    assert!(rev > 20);
    for i in 0..20 {
        assert_eq!(
            local_get(&nodes[survivor].endpoint(), &format!("r/{i:02}"))
                .await
                .as_deref(),
            Some(&b"kept"[..])
        );
    }
    let (voters, learners) = shape(&nodes[survivor].endpoint()).await.unwrap();
    assert_eq!(voters, [ids[survivor]]);
    assert!(learners.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_the_voter_target_at_runtime_turns_voters_into_standbys() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_nodes(root.path(), &[]).await;
    let ep = nodes[0].endpoint();
    wait_shape(Via::One(&ep), 3, 0, &[]).await;
    put_retrying(
        &ep,
        "/eden/cluster/config",
        r#"{"voters": 1, "standbys": 2, "failover_after_ms": 3000}"#,
    )
    .await;
    wait_shape(Via::One(&ep), 1, 2, &[]).await;
    // Back to three: the standbys are promoted again.
    put_retrying(&ep, "/eden/cluster/config", r#"{"voters": 3}"#).await;
    wait_shape(Via::One(&ep), 3, 0, &[]).await;
    put_retrying(&ep, "after", "ok").await;
    let texts = events(&ep).await;
    assert!(
        texts.iter().filter(|t| t.contains("\"demote\"")).count() == 2,
        "{texts:#?}"
    );
}

/// A node whose data dir is lost is never admitted under its old raft id: joining again under
/// the same name is refused while the old id is a member, and once the controller has removed
/// the dead member, the node joins with a new id and becomes the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_rejoins_under_a_new_id_never_its_old_one() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path(), &[]).await;
    let token = nodes[0].token();
    let via = nodes[0].peer.clone();
    let mut n4 = Node::new(root.path(), "n4");
    n4.create(Some((&via, &token)), &[]);
    n4.ready().await;
    let ep = nodes[0].endpoint();
    wait_shape(Via::One(&ep), 3, 1, &[]).await;
    let old_id = shape(&ep).await.unwrap().1[0];
    put_retrying(&ep, "before", "1").await;

    // The standby's server dies and its disk is replaced.
    n4.kill9();
    std::fs::remove_dir_all(&n4.dir).unwrap();

    // Joining again at once: the old id is still a member, so the name is taken.
    n4.create(Some((&via, &token)), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = n4.child.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "a join under a member's name was not refused:\n{}",
            n4.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    n4.child = None;
    assert!(!status.success());
    let log = n4.log_text();
    assert!(
        log.contains("already a member")
            && log.contains(&old_id.to_string())
            && log.contains("member remove"),
        "the refusal does not name the member: {log}"
    );

    // The controller removes the dead standby (failover-after), then the same name joins
    // under a fresh id.
    wait_shape(Via::One(&ep), 3, 0, &[old_id]).await;
    if n4.dir.exists() {
        std::fs::remove_dir_all(&n4.dir).unwrap();
    }
    n4.create(Some((&via, &token)), &[]);
    n4.ready().await;
    wait_shape(Via::One(&ep), 3, 1, &[old_id]).await;
    let (voters, learners) = shape(&ep).await.unwrap();
    let new_id = learners[0];
    assert_ne!(new_id, old_id);
    assert!(!voters.contains(&old_id));
    wait_local_value(&n4, "before", "1").await;
    let st = cluster_status(&ep);
    let row = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "n4")
        .cloned()
        .unwrap_or_else(|| panic!("n4 is not listed: {st:#}"));
    assert_eq!(row["raft_id"], new_id, "{st:#}");
    assert_eq!(row["role"], "standby", "{st:#}");
    drop(nodes.drain(..));
}
