//! Test support: real `eden serve` processes on loopback, driven through the etcd API.
#![allow(dead_code)]

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eden::etcd::pb::etcdserverpb as pb;
use tonic::transport::Channel;

pub type Kv = pb::kv_client::KvClient<Channel>;

/// A loopback address with a port that was free a moment ago. The port is drawn at random
/// below the kernel's ephemeral range (32768 and up here), where the outgoing connections of
/// the tests running beside this one take their local ports: a port the kernel handed out
/// for `:0` could be taken by such a connection before the node binds it.
///
/// A port is never handed out twice in one test process (the nodes of a test bind theirs only
/// when they start).
pub fn free_addr() -> String {
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.contains(&port) {
            continue;
        }
        if let Ok(l) = StdListener::bind(("127.0.0.1", port)) {
            given.push(port);
            return l.local_addr().unwrap().to_string();
        }
    }
    panic!("no free loopback port in 20000-31999");
}

/// One `eden serve` process. Killed (SIGKILL) when dropped.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub peer: String,
    pub client: String,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub restarts: usize,
}

impl Node {
    pub fn new(root: &Path, name: &str) -> Node {
        Node {
            name: name.to_string(),
            dir: root.join(name),
            peer: free_addr(),
            client: free_addr(),
            log: root.join(format!("{name}.log")),
            child: None,
            restarts: 0,
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_eden"));
        cmd.arg("serve").arg("--data-dir").arg(&self.dir);
        // EDEN_TEST_LOG overrides the nodes' log filter, e.g. "info,openraft=debug".
        let filter = std::env::var("EDEN_TEST_LOG");
        cmd.env(
            "EDEN_LOG",
            filter.as_deref().unwrap_or("info,openraft=warn,sled=warn"),
        );
        cmd
    }

    pub fn spawn(&mut self, mut cmd: Command) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = cmd
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Starts a new node: `--init`, or `--join VIA --token T`.
    pub fn create(&mut self, join: Option<(&str, &str)>, extra: &[&str]) {
        let mut cmd = self.command();
        cmd.args(["--name", &self.name, "--peer-addr", &self.peer])
            .args(["--client-addr", &self.client, "--client-plaintext"])
            .args(extra);
        match join {
            None => cmd.arg("--init"),
            Some((via, token)) => cmd.args(["--join", via, "--token", token]),
        };
        self.spawn(cmd);
    }

    /// Restarts from the data dir alone.
    pub fn restart(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        self.restarts += 1;
        let mut cmd = self.command();
        cmd.args(extra);
        self.spawn(cmd);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) {
        let mut c = self.child.take().expect("node is running");
        let pid = c.id().to_string();
        let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{} exited with {status} after SIGTERM:\n{}",
                    self.name,
                    self.log_text()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within 20 s of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin/join-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Waits until the client port answers Status, and returns it. A node outside Raft (an
    /// eligible agent) refuses Status as Unavailable: it is up all the same, and this returns
    /// an empty response (no header).
    pub async fn ready(&mut self) -> pb::StatusResponse {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().unwrap() {
                    panic!("{} exited with {status}:\n{}", self.name, self.log_text());
                }
            }
            match status(&self.endpoint()).await {
                Ok(s) => return s,
                Err(e) if e.contains("not a datastore member") => {
                    return pb::StatusResponse::default()
                }
                Err(_) => {}
            }
            assert!(
                Instant::now() < deadline,
                "{} did not serve within 60 s:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn channel(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(endpoint.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .connect()
        .await
}

pub async fn status(endpoint: &str) -> Result<pb::StatusResponse, String> {
    let ch = channel(endpoint).await.map_err(|e| e.to_string())?;
    pb::maintenance_client::MaintenanceClient::new(ch)
        .status(pb::StatusRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|e| e.to_string())
}

pub async fn members(endpoint: &str) -> Vec<pb::Member> {
    let ch = channel(endpoint).await.unwrap();
    pb::cluster_client::ClusterClient::new(ch)
        .member_list(pb::MemberListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .members
}

pub async fn put(endpoint: &str, key: &str, value: &str) -> Result<i64, String> {
    let ch = channel(endpoint).await.map_err(|e| e.to_string())?;
    Kv::new(ch)
        .put(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().header.unwrap().revision)
        .map_err(|e| e.to_string())
}

/// A put that retries while the cluster elects a leader; gives up after 30 s.
pub async fn put_retrying(endpoint: &str, key: &str, value: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match put(endpoint, key, value).await {
            Ok(rev) => return rev,
            Err(e) if Instant::now() < deadline => {
                eprintln!("put {key} via {endpoint}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("put {key} via {endpoint} kept failing for 30 s: {e}"),
        }
    }
}

/// The local replica's value of `key` (a serializable read: what this node has applied).
pub async fn local_get(endpoint: &str, key: &str) -> Option<Vec<u8>> {
    let ch = channel(endpoint).await.ok()?;
    let resp = Kv::new(ch)
        .range(pb::RangeRequest {
            key: key.into(),
            serializable: true,
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    resp.kvs.into_iter().next().map(|kv| kv.value)
}

pub async fn wait_local_value(node: &Node, key: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if local_get(&node.endpoint(), key).await.as_deref() == Some(want.as_bytes()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not apply {key}={want} within 60 s:\n{}",
            node.name,
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the cluster has `n` voters and no learners, as `node` reports it.
pub async fn wait_voters(node: &Node, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = members(&node.endpoint()).await;
        if m.len() == n && m.iter().all(|m| !m.is_learner) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cluster did not reach {n} voters within 60 s: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Three nodes: n1 --init, n2 joins through n1, n3 joins through n2 (a follower).
pub async fn three_nodes(root: &Path, extra: &[&str]) -> Vec<Node> {
    let mut n1 = Node::new(root, "n1");
    n1.create(None, extra);
    n1.ready().await;
    let token = n1.token();
    let mut n2 = Node::new(root, "n2");
    n2.create(Some((&n1.peer.clone(), &token)), extra);
    n2.ready().await;
    let mut n3 = Node::new(root, "n3");
    n3.create(Some((&n2.peer.clone(), &token)), extra);
    n3.ready().await;
    wait_voters(&n1, 3).await;
    vec![n1, n2, n3]
}

pub fn leader_index(nodes: &[Node], leader_id: u64, ids: &[u64]) -> usize {
    let i = ids.iter().position(|id| *id == leader_id);
    i.unwrap_or_else(|| {
        panic!(
            "leader {leader_id:x} is not one of {ids:x?} ({})",
            nodes.len()
        )
    })
}
