//! A network partition, with real network namespaces: four `eden serve` nodes (3 voters and a
//! standby), each in its own namespace with two links: one for peer traffic (Raft, join,
//! probes) and one for clients. Cutting a node's peer link isolates it from the cluster while
//! the test can still talk to it as a client. Isolating the leader: the minority side (the old
//! leader alone) serves no linearizable write or read, and the majority elects a leader,
//! promotes the standby and removes the isolated voter.
//!
//! Needs root (to create namespaces), as `scripts/test` and CI run.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eden::etcd::pb::etcdserverpb as pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two bridges (peer and client networks) and one namespace per node; removed on drop.
struct Net {
    tag: u32,
    nodes: u32,
}

impl Net {
    fn new(nodes: u32) -> Net {
        let tag = std::process::id() % 200 + 20;
        let net = Net { tag, nodes };
        net.teardown();
        for br in [net.bridge('p'), net.bridge('c')] {
            sh(&["ip", "link", "add", &br, "type", "bridge"]);
            sh(&["ip", "link", "set", &br, "up"]);
        }
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.78.{tag}.1/24"),
            "dev",
            &net.bridge('c'),
        ]);
        for i in 1..=nodes {
            let ns = net.ns(i);
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
            for (kind, subnet) in [('p', 77), ('c', 78)] {
                let (outer, inner) = (net.veth(kind, i, 'o'), net.veth(kind, i, 'i'));
                sh(&[
                    "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ]);
                sh(&["ip", "link", "set", &outer, "master", &net.bridge(kind)]);
                sh(&["ip", "link", "set", &outer, "up"]);
                sh(&["ip", "link", "set", &inner, "netns", &ns]);
                let addr = format!("10.{subnet}.{tag}.{}/24", 10 + i);
                sh(&[
                    "ip", "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &inner,
                ]);
                sh(&[
                    "ip", "netns", "exec", &ns, "ip", "link", "set", &inner, "up",
                ]);
            }
        }
        net
    }

    fn bridge(&self, kind: char) -> String {
        format!("eb{kind}{}", self.tag)
    }
    fn ns(&self, i: u32) -> String {
        format!("eden{}n{i}", self.tag)
    }
    fn veth(&self, kind: char, i: u32, side: char) -> String {
        format!("e{kind}{}{i}{side}", self.tag)
    }
    fn peer_addr(&self, i: u32) -> String {
        format!("10.77.{}.{}:2380", self.tag, 10 + i)
    }
    fn client_addr(&self, i: u32) -> String {
        format!("10.78.{}.{}:2379", self.tag, 10 + i)
    }

    /// Cuts node `i` off the peer network (its client link stays up).
    fn isolate(&self, i: u32) {
        sh(&["ip", "link", "set", &self.veth('p', i, 'o'), "down"]);
    }

    fn teardown(&self) {
        for i in 1..=self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .output();
            for kind in ['p', 'c'] {
                let _ = Command::new("ip")
                    .args(["link", "del", &self.veth(kind, i, 'o')])
                    .output();
            }
        }
        for kind in ['p', 'c'] {
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge(kind)])
                .output();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(net: &Net, root: &std::path::Path, i: u32, join: Option<&str>) -> Proc {
    let log = std::fs::File::create(root.join(format!("n{i}.log"))).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &net.ns(i)])
        .arg(env!("CARGO_BIN_EXE_eden"))
        .args(["serve", "--name", &format!("n{i}")])
        .arg("--data-dir")
        .arg(root.join(format!("n{i}")))
        .args([
            "--peer-addr",
            &net.peer_addr(i),
            "--client-addr",
            &net.client_addr(i),
        ])
        .env("EDEN_LOG", "info,openraft=warn,sled=warn")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log));
    match join {
        None => cmd.arg("--init"),
        Some(token) => cmd.args(["--join", &net.peer_addr(1), "--token", token]),
    };
    Proc(cmd.spawn().unwrap())
}

struct Client {
    tls: ClientTlsConfig,
}

impl Client {
    fn new(admin: &std::path::Path) -> Client {
        let read = |f: &str| std::fs::read(admin.join(f)).unwrap();
        Client {
            tls: ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read("ca.crt")))
                .identity(Identity::from_pem(read("admin.crt"), read("admin.key"))),
        }
    }

    async fn channel(&self, addr: &str) -> Option<Channel> {
        Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(self.tls.clone())
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(3))
            .connect()
            .await
            .ok()
    }

    async fn status(&self, addr: &str) -> Option<pb::StatusResponse> {
        let ch = self.channel(addr).await?;
        pb::maintenance_client::MaintenanceClient::new(ch)
            .status(pb::StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// `GET /metrics` over the same TLS connection the gRPC calls use.
    async fn metrics(&self, addr: &str) -> Option<String> {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let ch = self.channel(addr).await?;
        let req = http::Request::get(format!("https://{addr}/metrics"))
            .body(tonic::body::Body::empty())
            .ok()?;
        let resp = ch.oneshot(req).await.ok()?;
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        String::from_utf8(bytes.to_vec()).ok()
    }

    async fn shape(&self, addr: &str) -> Option<(Vec<u64>, Vec<u64>)> {
        let ch = self.channel(addr).await?;
        let m = pb::cluster_client::ClusterClient::new(ch)
            .member_list(pb::MemberListRequest::default())
            .await
            .ok()?
            .into_inner()
            .members;
        Some((
            m.iter().filter(|m| !m.is_learner).map(|m| m.id).collect(),
            m.iter().filter(|m| m.is_learner).map(|m| m.id).collect(),
        ))
    }

    async fn put(&self, addr: &str, key: &str) -> Result<i64, String> {
        let ch = self.channel(addr).await.ok_or("cannot connect")?;
        pb::kv_client::KvClient::new(ch)
            .put(pb::PutRequest {
                key: key.into(),
                value: b"v".to_vec(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().header.unwrap().revision)
            .map_err(|e| e.to_string())
    }

    async fn get(&self, addr: &str, key: &str, serializable: bool) -> Result<usize, String> {
        let ch = self.channel(addr).await.ok_or("cannot connect")?;
        pb::kv_client::KvClient::new(ch)
            .range(pb::RangeRequest {
                key: key.into(),
                serializable,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().kvs.len())
            .map_err(|e| e.to_string())
    }
}

/// Waits up to 60 s for `f` to give a value; on failure, prints the nodes' logs from `logs`.
async fn eventually<T>(logs: &Path, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            for i in 1..=4 {
                let log =
                    std::fs::read_to_string(logs.join(format!("n{i}.log"))).unwrap_or_default();
                eprintln!("---- n{i}.log\n{log}");
            }
        }
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_serves_nothing_linearizable_and_the_majority_replaces_it() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root for network namespaces (scripts/test runs as root)"
    );
    let net = Net::new(4);
    let root = tempfile::tempdir().unwrap();
    let mut procs = vec![serve(&net, root.path(), 1, None)];
    let token_file = root.path().join("n1/admin/join-token");
    let token = eventually(root.path(), "n1 writes its join token", async || {
        std::fs::read_to_string(&token_file).ok()
    })
    .await;
    let client = Client::new(&root.path().join("n1/admin"));
    for i in 2..=4 {
        procs.push(serve(&net, root.path(), i, Some(token.trim())));
        let addr = net.client_addr(i);
        eventually(root.path(), "a joined node serves", async || {
            client.status(&addr).await
        })
        .await;
    }
    let c1 = net.client_addr(1);
    eventually(root.path(), "3 voters and 1 standby", async || {
        let (v, l) = client.shape(&c1).await?;
        (v.len() == 3 && l.len() == 1).then_some(())
    })
    .await;
    client.put(&c1, "before").await.unwrap();

    // Find the leader and cut it off the peer network.
    let leader = client.status(&c1).await.unwrap().leader;
    let mut li = 0;
    for i in 1..=4 {
        let st = client.status(&net.client_addr(i)).await.unwrap();
        if st.header.unwrap().member_id == leader {
            li = i;
        }
    }
    assert_ne!(li, 0, "no node is the leader {leader:x}");
    net.isolate(li);
    let isolated = net.client_addr(li);
    let majority = net.client_addr(if li == 1 { 2 } else { 1 });

    // The majority elects a leader, promotes the standby and removes the isolated voter.
    let started = Instant::now();
    eventually(
        root.path(),
        "the majority replaces the isolated voter",
        async || {
            let (v, l) = client.shape(&majority).await?;
            (v.len() == 3 && l.is_empty() && !v.contains(&leader)).then_some(())
        },
    )
    .await;
    eprintln!("isolated voter replaced after {:?}", started.elapsed());
    client.put(&majority, "after").await.unwrap();

    // The minority side serves no linearizable write or read.
    assert!(
        client.put(&isolated, "minority").await.is_err(),
        "the isolated node acknowledged a write"
    );
    assert!(
        client.get(&isolated, "before", false).await.is_err(),
        "the isolated node served a linearizable read"
    );
    // It may still answer a serializable read from its own (stale) replica.
    assert_eq!(client.get(&isolated, "after", true).await, Ok(0));
    // Its metrics stop calling it the leader, as an isolated etcd leader steps down (openraft
    // keeps the role; eden counts it only while a quorum answers).
    eventually(root.path(), "the isolated node's /metrics", async || {
        let text = client.metrics(&isolated).await?;
        (text.contains("\netcd_server_is_leader 0\n")
            && text.contains("\netcd_server_has_leader 0\n"))
        .then_some(())
    })
    .await;
    // So does Status (what `etcdctl endpoint status` shows).
    let st = client.status(&isolated).await.unwrap();
    assert_eq!(st.leader, 0, "{st:?}");
    assert!(
        st.errors.iter().any(|e| e == "etcdserver: no leader"),
        "{st:?}"
    );
    // And the write the minority was sent is not visible on the majority side (read
    // linearizably; on a loaded machine a read-index round may time out once, and a client
    // retries).
    let seen = eventually(
        root.path(),
        "a linearizable read on the majority",
        async || client.get(&majority, "minority", false).await.ok(),
    )
    .await;
    assert_eq!(seen, 0, "the minority's write reached the majority");
    drop(procs);
}
