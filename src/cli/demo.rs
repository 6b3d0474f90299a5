//! `eden demo`: a five-node cluster on loopback, a cluster-wide apply, a killed leader, and the
//! takeover, live.
//!
//! It runs the real thing: `eden serve` processes (this binary) in a temporary directory, the
//! etcd API as the client, `SIGKILL` for the leader. First it adds an agent-only node and
//! applies the sample states of `examples/demo/` to all six nodes through the cluster (a token
//! made on n3 reaches every node through the datastore). Then, while a client keeps writing,
//! it kills the leader and prints the cluster's shape as it changes (who leads, voters,
//! standbys), then a summary with the measured times and a check that no acknowledged write
//! was lost.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use tonic::transport::Channel;

use crate::error::{Error, Result};
use crate::etcd::pb::etcdserverpb as pb;

/// Start a local cluster, apply states through it, kill its leader, and watch it carry on.
///
/// Starts NODES `eden serve` processes on loopback in a temporary directory (3 voters, 1
/// standby, the rest eligible agents that hold no replica) and an agent-only node, applies the sample states of examples/demo to all of
/// them through the cluster (a token made on n3 is handed to every node), writes keys, kills
/// the leader with SIGKILL while a client keeps writing, and
/// prints the election, the promotion of the standby, the removal of the dead voter and the
/// admission of an eligible agent as the new standby as they happen. Ends with the measured times and a check that no acknowledged write was lost, then
/// stops the nodes and removes the directory (unless --keep).
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Nodes to start (3 voters, 1 standby, the rest eligible agents).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(4..=9))]
    pub nodes: u64,
    /// Keep the data directory (and print where it is).
    #[arg(long)]
    pub keep: bool,
}

struct DemoNode {
    name: String,
    peer: String,
    client: String,
    child: Option<Child>,
}

impl Drop for DemoNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl DemoNode {
    fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }
}

fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Unavailable(format!("no free loopback port: {e}")))?;
    Ok(l.local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?
        .to_string())
}

async fn channel(endpoint: &str) -> Option<Channel> {
    super::client::connect(
        endpoint,
        None,
        Duration::from_millis(500),
        Duration::from_secs(5),
    )
    .await
    .ok()
}

async fn status(endpoint: &str) -> Option<pb::StatusResponse> {
    let ch = channel(endpoint).await?;
    pb::maintenance_client::MaintenanceClient::new(ch)
        .status(pb::StatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// The process behind `endpoint` is up: it answers Status, or refuses it because it is an
/// eligible agent outside Raft (which serves no etcd API).
async fn up(endpoint: &str) -> bool {
    let Some(ch) = channel(endpoint).await else {
        return false;
    };
    match pb::maintenance_client::MaintenanceClient::new(ch)
        .status(pb::StatusRequest {})
        .await
    {
        Ok(_) => true,
        Err(e) => e.message().contains("not a datastore member"),
    }
}

/// The first node that answers as a Raft member, other than `not`.
async fn member_endpoint(nodes: &[DemoNode], not: Option<usize>) -> Option<String> {
    for (i, n) in nodes.iter().enumerate() {
        if Some(i) != not && n.child.is_some() && status(&n.endpoint()).await.is_some() {
            return Some(n.endpoint());
        }
    }
    None
}

async fn members(endpoint: &str) -> Option<Vec<pb::Member>> {
    let ch = channel(endpoint).await?;
    pb::cluster_client::ClusterClient::new(ch)
        .member_list(pb::MemberListRequest::default())
        .await
        .ok()
        .map(|r| r.into_inner().members)
}

async fn put(endpoint: &str, key: &str, value: &str) -> bool {
    let Some(ch) = channel(endpoint).await else {
        return false;
    };
    pb::kv_client::KvClient::new(ch)
        .put(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
        .is_ok()
}

/// The cluster's shape as one line: leader, voters, standbys (by name).
fn shape_line(members: &[pb::Member], leader: u64) -> (String, usize, usize) {
    let name_of = |id: u64| {
        members
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| "none".into())
    };
    let voters: Vec<String> = members
        .iter()
        .filter(|m| !m.is_learner)
        .map(|m| m.name.clone())
        .collect();
    let standbys: Vec<String> = members
        .iter()
        .filter(|m| m.is_learner)
        .map(|m| m.name.clone())
        .collect();
    (
        format!(
            "leader {:<4} voters [{}]  standbys [{}]",
            if leader == 0 {
                "none".to_string()
            } else {
                name_of(leader)
            },
            voters.join(" "),
            standbys.join(" ")
        ),
        voters.len(),
        standbys.len(),
    )
}

fn spawn(exe: &Path, dir: &Path, node: &mut DemoNode, join: Option<(&str, &str)>) -> Result<()> {
    let log = std::fs::File::create(dir.join(format!("{}.log", node.name)))
        .map_err(|e| Error::Unavailable(format!("creating the demo log: {e}")))?;
    let err = log
        .try_clone()
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .args(["--name", &node.name, "--peer-addr", &node.peer])
        .args(["--client-addr", &node.client, "--client-plaintext"])
        .arg("--data-dir")
        .arg(dir.join(&node.name))
        .env("EDEN_LOG", "warn")
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err));
    match join {
        None => cmd.arg("--init"),
        Some((via, token)) => cmd.args(["--join", via, "--token", token]),
    };
    node.child = Some(
        cmd.spawn()
            .map_err(|e| Error::Unavailable(format!("starting {}: {e}", exe.display())))?,
    );
    Ok(())
}

async fn wait_ready(node: &mut DemoNode, dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(c) = node.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                let log = std::fs::read_to_string(dir.join(format!("{}.log", node.name)))
                    .unwrap_or_default();
                return Err(Error::Unavailable(format!(
                    "{} exited with {st}:\n{log}",
                    node.name
                )));
            }
        }
        if up(&node.endpoint()).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Unavailable(format!(
                "{} did not start within 60 s",
                node.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_demo(args: &DemoArgs, dir: &Path) -> Result<()> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Internal(format!("cannot find this program: {e}")))?;
    let mut nodes = Vec::new();
    for i in 1..=args.nodes {
        nodes.push(DemoNode {
            name: format!("n{i}"),
            peer: free_addr()?,
            client: free_addr()?,
            child: None,
        });
    }
    let t0 = Instant::now();
    println!("starting {} eden nodes in {}", args.nodes, dir.display());
    spawn(&exe, dir, &mut nodes[0], None)?;
    wait_ready(&mut nodes[0], dir).await?;
    let token = std::fs::read_to_string(dir.join("n1/admin/join-token"))
        .map_err(|e| Error::Unavailable(format!("reading the join token: {e}")))?;
    let via = nodes[0].peer.clone();
    for node in nodes.iter_mut().skip(1) {
        spawn(&exe, dir, node, Some((&via, token.trim())))?;
        wait_ready(node, dir).await?;
        println!("  {} joined", node.name);
    }
    // One standby is wanted (`standbys` in /eden/cluster/config); nodes beyond 3 voters and
    // that standby are eligible agents.
    let want_standbys = nodes.len().saturating_sub(3).min(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let observer = member_endpoint(&nodes, None)
            .await
            .unwrap_or_else(|| nodes[0].endpoint());
        let m = members(&observer).await.unwrap_or_default();
        let leader = status(&observer).await.map(|s| s.leader).unwrap_or(0);
        let (line, v, s) = shape_line(&m, leader);
        if v == 3 && s == want_standbys {
            println!(
                "cluster ready after {:.1} s: {line}",
                t0.elapsed().as_secs_f64()
            );
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Unavailable(format!(
                "the cluster did not reach 3 voters within 60 s: {line}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    cluster_apply(&exe, dir, &nodes, &via, token.trim()).await?;

    // A client that keeps writing, round robin over the live nodes.
    let targets = Arc::new(Mutex::new(
        nodes.iter().map(|n| n.endpoint()).collect::<Vec<_>>(),
    ));
    let acked = Arc::new(Mutex::new(Vec::<(String, Instant)>::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (targets, acked, failed, stop) =
            (targets.clone(), acked.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ep = {
                    let t = targets.lock().unwrap_or_else(|p| p.into_inner());
                    t[(n as usize) % t.len()].clone()
                };
                let key = format!("demo/{n:06}");
                if put(&ep, &key, "x").await {
                    acked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((key, Instant::now()));
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                n += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = acked.lock().unwrap_or_else(|p| p.into_inner()).len();
    println!("a client is writing: {before} writes acknowledged in the first second");

    // Kill the leader.
    let first = member_endpoint(&nodes, None)
        .await
        .ok_or_else(|| Error::Unavailable("no datastore node answers".into()))?;
    let st = status(&first)
        .await
        .ok_or_else(|| Error::Unavailable("the datastore stopped answering".into()))?;
    let m = members(&first).await.unwrap_or_default();
    let leader_name = m
        .iter()
        .find(|m| m.id == st.leader)
        .map(|m| m.name.clone())
        .ok_or_else(|| Error::Unavailable("no leader".into()))?;
    let li = nodes
        .iter()
        .position(|n| n.name == leader_name)
        .ok_or_else(|| Error::Internal("the leader is not one of the demo nodes".into()))?;
    targets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|e| *e != nodes[li].endpoint());
    let killed = Instant::now();
    if let Some(mut c) = nodes[li].child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    println!("\nkill -9 the leader {leader_name}\n");
    let observer = member_endpoint(&nodes, Some(li))
        .await
        .ok_or_else(|| Error::Unavailable("no other datastore node answers".into()))?;
    let mut last_line = String::new();
    let mut elected = None;
    let mut restored = None;
    let deadline = killed + Duration::from_secs(60);
    while restored.is_none() && Instant::now() < deadline {
        let m = members(&observer).await.unwrap_or_default();
        let leader = status(&observer).await.map(|s| s.leader).unwrap_or(0);
        let (line, v, s) = shape_line(&m, leader);
        if elected.is_none() && leader != 0 && leader != st.leader {
            elected = Some(killed.elapsed());
        }
        let dead_gone = !m.iter().any(|m| m.id == st.leader);
        // With an eligible agent, it becomes the new standby; without one, none is left.
        let standbys_after = if nodes.len() > 4 {
            want_standbys
        } else {
            want_standbys.saturating_sub(1)
        };
        if dead_gone && v == 3 && s == standbys_after {
            restored = Some(killed.elapsed());
        }
        if line != last_line {
            let n = acked.lock().unwrap_or_else(|p| p.into_inner()).len();
            println!(
                "  +{:>5.2} s  {line}  ({n} writes acknowledged)",
                killed.elapsed().as_secs_f64()
            );
            last_line = line;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let acked = std::mem::take(&mut *acked.lock().unwrap_or_else(|p| p.into_inner()));
    let first_write = acked
        .iter()
        .find(|(_, at)| *at > killed)
        .map(|(_, at)| *at - killed);

    // Every acknowledged write must be there.
    let ch = channel(&observer)
        .await
        .ok_or_else(|| Error::Unavailable("the observer stopped answering".into()))?;
    let mut kv = pb::kv_client::KvClient::new(ch);
    let all = kv
        .range(pb::RangeRequest {
            key: b"demo/".to_vec(),
            range_end: b"demo0".to_vec(),
            keys_only: true,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Unavailable(format!("reading the keys back: {}", e.message())))?
        .into_inner();
    let present: std::collections::BTreeSet<Vec<u8>> = all.kvs.into_iter().map(|k| k.key).collect();
    let lost = acked
        .iter()
        .filter(|(k, _)| !present.contains(k.as_bytes()))
        .count();

    let secs = |d: Option<Duration>| {
        d.map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| "not within 60 s".into())
    };
    println!("\nsummary");
    println!("  new leader elected after       {}", secs(elected));
    println!("  first write acknowledged after {}", secs(first_write));
    println!("  3 voters again (dead one out)  {}", secs(restored));
    println!(
        "  writes acknowledged            {} ({} attempts failed during the takeover)",
        acked.len(),
        failed.load(Ordering::Relaxed)
    );
    println!("  acknowledged writes lost       {lost}");

    for n in nodes.iter_mut() {
        if let Some(mut c) = n.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
    if lost > 0 || restored.is_none() {
        return Err(Error::Internal(format!(
            "the takeover did not complete cleanly ({lost} writes lost); logs are in {}",
            dir.display()
        )));
    }
    Ok(())
}

pub fn run(args: DemoArgs) -> Result<i32> {
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "eden-demo-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Unavailable(format!("creating {}: {e}", dir.display())))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
    let result = rt.block_on(run_demo(&args, &dir));
    if args.keep || result.is_err() {
        println!("data and logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result.map(|()| 0)
}

/// The sample states of `examples/demo/`, built into the binary.
const EXAMPLES: &[(&str, &str)] = &[
    ("top.sls", include_str!("../../examples/demo/top.sls")),
    ("motd.sls", include_str!("../../examples/demo/motd.sls")),
    ("token.sls", include_str!("../../examples/demo/token.sls")),
];

/// Adds an agent-only node, applies the sample states to every node through the cluster, and
/// checks the token made on n3 reached every node.
async fn cluster_apply(
    exe: &Path,
    dir: &Path,
    nodes: &[DemoNode],
    via: &str,
    token: &str,
) -> Result<()> {
    let log = std::fs::File::create(dir.join("a1.log"))
        .map_err(|e| Error::Unavailable(format!("creating the demo log: {e}")))?;
    let err = log
        .try_clone()
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    let agent = Command::new(exe)
        .arg("serve")
        .args([
            "--name",
            "a1",
            "--datastore",
            "never",
            "--labels",
            "role=web",
        ])
        .arg("--data-dir")
        .arg(dir.join("a1"))
        .args(["--join", via, "--token", token])
        .env("EDEN_LOG", "warn")
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| Error::Unavailable(format!("starting {}: {e}", exe.display())))?;
    // Stopped with the others: it is a node like them.
    let mut agent = DemoNode {
        name: "a1".into(),
        peer: String::new(),
        client: String::new(),
        child: Some(agent),
    };
    let urls: Vec<String> = nodes.iter().map(|n| n.endpoint()).collect();
    let kv = crate::agent::kv::Kv::new(&urls, None)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let want = nodes.len() + 1;
    loop {
        let all = crate::agent::controller::nodes(&kv).await?;
        if all.values().filter(|v| v.alive).count() == want {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Unavailable(format!(
                "only {} of {want} agents registered within 60 s",
                all.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("  a1 joined as an agent-only node (label role=web)");

    let states = dir.join("states");
    let out = dir.join("out");
    let mut files = std::collections::BTreeMap::new();
    for (name, text) in EXAMPLES {
        files.insert(name.to_string(), text.as_bytes().to_vec());
    }
    files.insert(
        "vars/common.yaml".into(),
        format!("out: {}\n", out.display()).into_bytes(),
    );
    for (name, bytes) in &files {
        let p = states.join(name);
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(p, bytes);
    }
    println!(
        "\neden apply {} --target '*'   (examples/demo: a motd from each node's facts, and a \
         token made on n3 handed to every node)",
        states.display()
    );
    let started = Instant::now();
    let (id, rev) = super::runs::submit(
        &kv,
        super::runs::Submission {
            kind: "apply".into(),
            files,
            source: crate::agent::records::Source {
                kind: "path".into(),
                name: "examples/demo".into(),
                url: String::new(),
                refname: String::new(),
                commit: String::new(),
                files: Default::default(),
            },
            sls: vec![],
            target: "*".into(),
            mode: "ansible".into(),
            test: false,
            jobs: 8,
            wait_secs: 60,
        },
    )
    .await?;
    let status = super::runs::follow(&kv, &id, rev, false).await?;
    let results = super::runs::results(&kv, &id).await?;
    let tally = super::runs::tally(&results);
    println!(
        "run {id}: {} in {:.2} s on {} nodes: {} ok, {} changed, {} failed, {} skipped",
        status.state,
        started.elapsed().as_secs_f64(),
        status.nodes.len(),
        tally["ok"],
        tally["changed"],
        tally["failed"],
        tally["skipped"]
    );
    let made = std::fs::read_to_string(out.join("n3/token")).unwrap_or_default();
    let mut names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    names.push("a1".into());
    let got = names
        .iter()
        .filter(|n| {
            std::fs::read_to_string(out.join(n).join("token"))
                .ok()
                .as_deref()
                == Some(made.as_str())
        })
        .count();
    println!(
        "token made on n3 ({}...) found on {got} of {} nodes",
        made.get(..8).unwrap_or(""),
        names.len()
    );
    if let Some(mut c) = agent.child.take() {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    if status.state != "done" || made.is_empty() || got != names.len() {
        return Err(Error::Internal(format!(
            "the cluster apply did not complete as expected: {} ({})",
            status.state, status.comment
        )));
    }
    Ok(())
}
