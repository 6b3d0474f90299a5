//! Gossip failure detection over real mutual TLS on loopback.
//!
//! Each member is a `Gossip` behind the real peer server (`eden_raft::PeerServer`, in front of
//! an idle, uninitialized Raft node), whose fallback routes `/gossip` to
//! `Gossip::serve_request`, as `eden serve` does. Messages travel over `PeerPool`, as in
//! production. Certificates come from eden's own PKI (`cluster::pki`).
//!
//! Time is real here (TLS over sockets does not run on tokio's paused clock), so bounds are
//! generous and measured figures are printed; the protocol's timing on virtual time is tested
//! in `src/cluster/gossip.rs`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eden::cluster::gossip::{
    Gossip, GossipConfig, Member, PeerTransport, SendFuture, State, Transport, GOSSIP_PATH,
};
use eden::cluster::pki::{self, ClusterCa};
use eden_raft::{Fallback, NodeConfig, NodeInfo, PeerPool, PeerServer, RaftNode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The peer server's fallback as `eden serve` wires it for gossip: `/gossip` to the detector.
fn gossip_fallback(gossip: Arc<Gossip>) -> Fallback {
    Arc::new(move |req: Request<Incoming>| {
        let gossip = gossip.clone();
        Box::pin(async move {
            if req.uri().path() == GOSSIP_PATH {
                gossip.serve_request(req).await
            } else {
                let mut r = Response::new(Full::new(Bytes::from("no such route")));
                *r.status_mut() = StatusCode::NOT_FOUND;
                r
            }
        })
    })
}

/// Drops every message to the addresses in `blocked`; counts what it dropped.
struct FaultyTransport {
    inner: PeerTransport,
    blocked: Mutex<HashSet<String>>,
    dropped: AtomicUsize,
}

impl Transport for FaultyTransport {
    fn send(&self, peer_addr: &str, body: Bytes) -> SendFuture {
        if self.blocked.lock().unwrap().contains(peer_addr) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            let addr = peer_addr.to_string();
            return Box::pin(async move { Err(format!("test fault: link to {addr} cut")) });
        }
        self.inner.send(peer_addr, body)
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    ca: ClusterCa,
    config: GossipConfig,
    faulty: bool,
}

struct Node {
    name: String,
    addr: String,
    gossip: Arc<Gossip>,
    transport: Option<Arc<FaultyTransport>>,
    raft: Arc<RaftNode>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
}

impl Cluster {
    fn new(config: GossipConfig, faulty: bool) -> Cluster {
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            ca: ClusterCa::create("gossip-test").unwrap(),
            config,
            faulty,
        }
    }

    /// Starts member `name` on `addr` (`127.0.0.1:0` for a fresh port), seeded with `seeds`.
    async fn start(&self, name: &str, addr: &str, seeds: Vec<String>) -> Node {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let identity = self
            .ca
            .issue_node(name, &["127.0.0.1".to_string()])
            .unwrap();
        let server_tls = pki::server_config(self.ca.cert_pem(), &identity, true).unwrap();
        let client_tls = pki::client_config(self.ca.cert_pem(), &identity).unwrap();
        let pool = Arc::new(PeerPool::new(client_tls.clone()));
        let info = NodeInfo {
            name: name.to_string(),
            peer_addr: addr.clone(),
            client_addr: "127.0.0.1:0".to_string(),
        };
        let data = tempfile::tempdir_in(self.dir.path()).unwrap().keep();
        let raft = RaftNode::start(NodeConfig::new(1, info, data, client_tls))
            .await
            .unwrap();
        let me = Member {
            name: name.to_string(),
            raft_id: 0,
            peer_addr: addr.clone(),
        };
        let (gossip, transport) = if self.faulty {
            let t = Arc::new(FaultyTransport {
                inner: PeerTransport::new(pool, self.config.probe_timeout),
                blocked: Mutex::new(HashSet::new()),
                dropped: AtomicUsize::new(0),
            });
            let g =
                Gossip::start_with_transport(me, t.clone(), seeds, self.config.clone()).unwrap();
            (g, Some(t))
        } else {
            let g = Gossip::start(me, pool, seeds, self.config.clone()).unwrap();
            (g, None)
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(PeerServer::serve(
            listener,
            server_tls,
            raft.clone(),
            Some(gossip_fallback(gossip.clone())),
            async {
                let _ = stopped.await;
            },
        ));
        let server = tokio::spawn(async move { server.await.unwrap().unwrap() });
        Node {
            name: name.to_string(),
            addr,
            gossip,
            transport,
            raft,
            stop,
            server,
        }
    }

    /// `n` members, all seeded with the first.
    async fn start_n(&self, n: usize) -> Vec<Node> {
        let mut nodes = vec![self.start("n0", "127.0.0.1:0", vec![]).await];
        let seed = nodes[0].addr.clone();
        for i in 1..n {
            nodes.push(
                self.start(&format!("n{i}"), "127.0.0.1:0", vec![seed.clone()])
                    .await,
            );
        }
        nodes
    }
}

impl Node {
    /// Kills the member without a goodbye: its peer server and every connection to it go, its
    /// gossip is dropped.
    async fn kill(self) -> (String, String) {
        let _ = self.stop.send(());
        self.server.await.unwrap();
        self.raft.shutdown().await.unwrap();
        (self.name, self.addr)
    }
}

fn state(node: &Node, name: &str) -> Option<State> {
    node.gossip.health().get(name).map(|h| h.state)
}

fn all_alive(nodes: &[Node], n: usize) -> bool {
    nodes.iter().all(|node| {
        let h = node.gossip.health();
        h.len() == n && h.values().all(|h| h.state == State::Alive)
    })
}

/// Polls `cond` every 10 ms until it holds; panics after `limit`. Returns the time taken.
async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

const BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_converge_to_all_alive() {
    let cluster = Cluster::new(GossipConfig::default(), false);
    let nodes = cluster.start_n(5).await;
    let took = wait_for(BOUND, "5 members all alive in every view", || {
        all_alive(&nodes, 5)
    })
    .await;
    println!("5 members converged to all-Alive in {took:?}");
    // Every view names every member with its address.
    for node in &nodes {
        let h = node.gossip.health();
        for other in &nodes {
            assert_eq!(h[&other.name].member.peer_addr, other.addr);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_member_is_seen_suspect_then_dead_by_all() {
    let cluster = Cluster::new(GossipConfig::default(), false);
    let mut nodes = cluster.start_n(5).await;
    wait_for(BOUND, "convergence", || all_alive(&nodes, 5)).await;
    let (victim, _) = nodes.remove(2).kill().await;
    let start = Instant::now();
    let mut first_suspect = None;
    let mut first_dead = None;
    let all_dead = wait_for(BOUND, "victim dead in every survivor's view", || {
        let states: Vec<_> = nodes.iter().map(|n| state(n, &victim)).collect();
        if first_suspect.is_none() && states.contains(&Some(State::Suspect)) {
            first_suspect = Some(start.elapsed());
        }
        if first_dead.is_none() && states.contains(&Some(State::Dead)) {
            first_dead = Some(start.elapsed());
        }
        states.iter().all(|s| *s == Some(State::Dead))
    })
    .await;
    println!(
        "kill -> first Suspect {first_suspect:?}, first Dead {first_dead:?}, Dead on all 4 \
         survivors {all_dead:?}"
    );
    assert!(
        first_suspect.is_some(),
        "the victim was never seen Suspect before Dead"
    );
    for node in &nodes {
        assert!(node.gossip.dead_for(&victim).is_some());
    }
    // The survivors are all still members (a loaded machine may make one briefly Suspect; it
    // refutes).
    wait_for(BOUND, "survivors alive in every survivor's view", || {
        nodes.iter().all(|n| {
            nodes
                .iter()
                .all(|other| state(n, &other.name) == Some(State::Alive))
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indirect_probes_keep_a_member_alive_across_a_cut_link() {
    // Slower than the default so that a loaded machine does not eat the indirect round trip.
    let config = GossipConfig {
        probe_period: Duration::from_millis(1000),
        probe_timeout: Duration::from_millis(300),
        suspect_to_dead: Duration::from_millis(1500),
        indirect_probes: 3,
    };
    let cluster = Cluster::new(config, true);
    let nodes = cluster.start_n(4).await;
    wait_for(BOUND, "convergence", || all_alive(&nodes, 4)).await;
    let (a, b) = (&nodes[1], &nodes[2]);
    let (ta, tb) = (a.transport.as_ref().unwrap(), b.transport.as_ref().unwrap());
    ta.blocked.lock().unwrap().insert(b.addr.clone());
    tb.blocked.lock().unwrap().insert(a.addr.clone());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(12) {
        assert_eq!(state(a, &b.name), Some(State::Alive), "A's view of B");
        assert_eq!(state(b, &a.name), Some(State::Alive), "B's view of A");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped = ta.dropped.load(Ordering::Relaxed) + tb.dropped.load(Ordering::Relaxed);
    println!("A<->B cut for 12 s: {dropped} messages dropped, both stayed Alive throughout");
    assert!(
        dropped > 0,
        "the cut link was never used: the test proved nothing"
    );
    // Control: cut B off from everyone, and the same detector declares it dead.
    for n in [&nodes[0], &nodes[3]] {
        n.transport
            .as_ref()
            .unwrap()
            .blocked
            .lock()
            .unwrap()
            .insert(b.addr.clone());
        tb.blocked.lock().unwrap().insert(n.addr.clone());
    }
    let took = wait_for(BOUND * 2, "isolated B dead in every other view", || {
        [0, 1, 3]
            .iter()
            .all(|&i| state(&nodes[i], &b.name) == Some(State::Dead))
    })
    .await;
    println!("isolated B declared dead by the other 3 in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_member_is_alive_again_under_a_new_generation() {
    let cluster = Cluster::new(GossipConfig::default(), false);
    let mut nodes = cluster.start_n(4).await;
    wait_for(BOUND, "convergence", || all_alive(&nodes, 4)).await;
    let seed = nodes[0].addr.clone();
    let old_generation = nodes[0].gossip.health()["n3"].generation;
    let (name, addr) = nodes.remove(3).kill().await;
    wait_for(BOUND, "n3 dead everywhere", || {
        nodes.iter().all(|n| state(n, &name) == Some(State::Dead))
    })
    .await;
    // Same name, same address, new process.
    nodes.push(cluster.start(&name, &addr, vec![seed]).await);
    let took = wait_for(BOUND, "n3 alive again everywhere", || all_alive(&nodes, 4)).await;
    println!("restarted n3 seen Alive by all in {took:?}");
    for node in &nodes {
        let h = &node.gossip.health()[&name];
        assert!(h.generation > old_generation, "{} sees {h:?}", node.name);
        assert_eq!(node.gossip.dead_for(&name), None);
    }
}

/// POSTs a body that is no gossip message; returns the error it must cause.
async fn post_junk(pool: &PeerPool, addr: &str) -> String {
    pool.call(addr, GOSSIP_PATH, b"junk".to_vec(), Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_route_refuses_a_caller_without_a_cluster_certificate() {
    let cluster = Cluster::new(GossipConfig::default(), false);
    let nodes = cluster.start_n(1).await;
    // Trusts the cluster CA (pinned by hash) but presents no client certificate.
    let tls = pki::pinned_client_config(&cluster.ca.fingerprint()).unwrap();
    let pool = PeerPool::new(tls);
    let err = post_junk(&pool, &nodes[0].addr).await;
    assert!(
        err.contains("403") && err.contains("client certificate"),
        "{err}"
    );
    // With a certificate, an undecodable body is a 400 that says what was wrong.
    let identity = cluster
        .ca
        .issue_node("probe", &["127.0.0.1".to_string()])
        .unwrap();
    let pool = PeerPool::new(pki::client_config(cluster.ca.cert_pem(), &identity).unwrap());
    let err = post_junk(&pool, &nodes[0].addr).await;
    assert!(
        err.contains("400") && err.contains("gossip message"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_that_leaves_is_dead_everywhere_without_a_suspicion() {
    // A suspicion would take 30 s here, so a quick Dead can only come from the goodbye.
    let config = GossipConfig {
        suspect_to_dead: Duration::from_secs(30),
        ..GossipConfig::default()
    };
    let cluster = Cluster::new(config, false);
    let mut nodes = cluster.start_n(3).await;
    wait_for(BOUND, "convergence", || all_alive(&nodes, 3)).await;
    let leaving = nodes.remove(2);
    leaving.gossip.leave().await;
    let took = wait_for(BOUND, "the leaver dead in both other views", || {
        nodes
            .iter()
            .all(|n| state(n, &leaving.name) == Some(State::Dead))
    })
    .await;
    println!("leave -> Dead on both others in {took:?}");
    leaving.kill().await;
}
