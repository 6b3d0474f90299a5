//! `eden serve`: bring a node up from its data dir, creating or joining a cluster first if asked.
//!
//! ## Order of work (each step can refuse; nothing is left half-done)
//! 1. [`serve`] locks the data dir ([`DataDir::lock`]); a dir in use is refused.
//! 2. It decides what to do from the dir and the flags: a dir holding a node restarts it (and
//!    refuses `--init`/`--join`: that dir belongs to a cluster already); an empty dir needs
//!    `--init` or `--join`.
//! 3. It binds the peer and client listeners before writing anything, so a port already taken
//!    is refused with nothing written.
//! 4. `--init` ([`init`]) makes the CA, the node and admin certificates and the join token;
//!    `--join` ([`join`]) runs the exchange in `join.rs`. Both write `node.json` last and remove
//!    what they wrote if a later step fails.
//! 5. It starts Raft ([`RaftNode::start`]), the peer server (Raft routes + join routes) and the
//!    etcd API on the client port, then the node's agent and the run controller (both through
//!    this node's own etcd API; see `crate::agent`), waits for the shutdown signal (SIGTERM or
//!    Ctrl-C), and stops them in reverse order.
//!
//! A `--datastore never` node ([`join_agent`], [`serve_agent`]) binds nothing and starts no
//! Raft: it joins for a certificate and the datastore nodes' client URLs, then runs only its
//! agent against them.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use eden_raft::{ElectionHold, NodeConfig, NodeInfo, PeerPool, PeerServer, RaftNode};

use tonic::transport::{Certificate, ClientTlsConfig, Identity as TlsIdentity};

use super::datadir::{DataDir, NodeFile};
use super::gossip::{Gossip, GossipConfig, Member};
use super::join::{self, AdmitRequest, Admitted, JoinGrant, JoinRequest, JoinService};
use super::pki::{self, ClusterCa, Identity, JoinToken};
use crate::agent::kv::Kv;
use crate::agent::records::NodeRecord;
use crate::agent::Agent;
use crate::error::{Error, Result};

/// How often the leader's own prober pings every other member's peer port.
const PROBE_PERIOD: Duration = Duration::from_millis(500);

/// Default peer and client addresses (etcd's ports).
pub const DEFAULT_PEER_ADDR: &str = "127.0.0.1:2380";
pub const DEFAULT_CLIENT_ADDR: &str = "127.0.0.1:2379";

/// What `eden serve` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub name: Option<String>,
    pub data_dir: PathBuf,
    pub peer_addr: Option<String>,
    pub client_addr: Option<String>,
    pub init: bool,
    pub join: Option<String>,
    pub token: Option<String>,
    /// `auto` or `never`.
    pub datastore: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub client_plaintext: bool,
    /// Raft entries between snapshots; 0 means eden's default (10 000).
    pub snapshot_count: u64,
    /// What history the leader compacts away (default: keep one hour).
    pub compaction: super::compactor::Policy,
    /// etcd's `--quota-backend-bytes`: 0 is 2 GiB, negative is no quota.
    pub quota_backend_bytes: i64,
    /// How often the leader compares the members' stores; `None`: never.
    pub corrupt_check: Option<Duration>,
    /// Compare this member's store with the others' before serving (refuse to start if one
    /// differs).
    pub initial_corrupt_check: bool,
    /// etcd's `--experimental-watch-progress-notify-interval`.
    pub watch_progress_notify: Duration,
}

/// What to do with the data dir.
enum Mode {
    Restart,
    Init,
    Join { via: String, token: String },
}

/// Serves until `shutdown` resolves. Returns after a clean stop.
pub async fn serve(opts: ServeOptions, shutdown: impl Future<Output = ()>) -> Result<()> {
    let existed = opts.data_dir.exists();
    let lock_existed = opts.data_dir.join("lock").exists();
    let dir = DataDir::lock(&opts.data_dir)?;
    let remove_dir = |dir: DataDir| {
        // Called only when `dir` holds nothing but the lock: a refused setup leaves the dir as
        // it found it (gone if this call created it).
        drop(dir);
        if existed {
            let _ = std::fs::remove_file(opts.data_dir.join("lock"));
        } else {
            let _ = std::fs::remove_dir_all(&opts.data_dir);
        }
    };
    let (mut file, listeners, mode) = match prepare(&dir, &opts).await {
        Ok(x) => x,
        Err(e) => {
            if dir.is_empty().unwrap_or(false) {
                remove_dir(dir);
            } else if !lock_existed {
                // Someone else's files: leave them exactly as they were.
                drop(dir);
                let _ = std::fs::remove_file(opts.data_dir.join("lock"));
            }
            return Err(e);
        }
    };
    let Some((peer, client)) = listeners else {
        // An agent-only node: no Raft, no ports; the agent reaches the etcd API of the
        // datastore nodes.
        if let Mode::Join { via, token } = &mode {
            if let Err(e) = join_agent(&dir, &mut file, via, token).await {
                dir.discard_setup();
                remove_dir(dir);
                return Err(e);
            }
        }
        return serve_agent(dir, file, shutdown).await;
    };
    let started = match mode {
        // A node the controller removed while it was down is an eligible agent now: the
        // controller admits it again (with its id and intact log) when a standby is wanted.
        Mode::Restart => {
            let tls = load_tls(&dir)?;
            let started = start(
                &dir,
                &file,
                &tls,
                peer,
                opts.snapshot_count,
                opts.initial_corrupt_check,
            )
            .await?;
            // No elections until `follow_membership` has had its first look: a voter removed
            // while it was down still finds itself a voter in its own log, and an election it
            // called before learning otherwise (the first look can take longer than the
            // election timeout on a busy machine) would raise its term and depose the leader
            // once it is admitted again. `follow_membership` lifts this: once the members list
            // it as a voter, or its own log holds their membership, or nobody answers at all.
            started.node.hold_elections(ElectionHold::Outside);
            started
        }
        Mode::Init | Mode::Join { .. } => {
            let set_up = match &mode {
                Mode::Join { via, token } => {
                    join(&dir, &mut file, peer, via, token, opts.snapshot_count).await
                }
                _ => init(&dir, &mut file, peer, opts.snapshot_count).await,
            };
            match set_up {
                Ok(s) => s,
                Err(e) => {
                    dir.discard_setup();
                    remove_dir(dir);
                    return Err(e);
                }
            }
        }
    };
    started.etcd.set_quota_bytes(opts.quota_backend_bytes);
    started
        .etcd
        .set_watch_progress_notify_interval(opts.watch_progress_notify);
    let checks = Checks {
        compaction: opts.compaction,
        corrupt_check: opts.corrupt_check,
        initial_corrupt_check: opts.initial_corrupt_check,
    };
    serve_until(dir, file, started, client, checks, shutdown).await
}

/// Steps 2-3: the node's record (ids still 0 for a new node), its bound listeners, and what
/// to do.
async fn prepare(
    dir: &DataDir,
    opts: &ServeOptions,
) -> Result<(NodeFile, Option<(TcpListener, TcpListener)>, Mode)> {
    if let Some(existing) = dir.node()? {
        if opts.init || opts.join.is_some() {
            return Err(Error::InvalidInput(format!(
                "the data dir {} already holds node {:?} of cluster {:?} ({:016x}); restart it \
                 with `eden serve --data-dir {}`, or use an empty --data-dir to {} another",
                dir.path().display(),
                existing.name,
                existing.cluster_name,
                existing.cluster_id,
                dir.path().display(),
                if opts.init { "create" } else { "join" },
            )));
        }
        if existing.datastore == "never" {
            return Ok((existing, None, Mode::Restart));
        }
        let (peer, client) = bind(&existing.peer_addr, &existing.client_addr).await?;
        return Ok((existing, Some((peer, client)), Mode::Restart));
    }
    if !dir.is_empty()? {
        return Err(Error::InvalidInput(format!(
            "the data dir {} holds files but no node (no node.json); it is not an eden data dir \
             or its setup did not finish: move its files away or use an empty --data-dir",
            dir.path().display()
        )));
    }
    let mode =
        match (opts.init, &opts.join, &opts.token) {
            (true, None, _) => Mode::Init,
            (false, Some(via), Some(token)) => Mode::Join {
                via: via.clone(),
                token: token.clone(),
            },
            (false, Some(_), None) => return Err(Error::InvalidInput(
                "--join needs --token (printed by `eden serve --init`, or `eden cluster token`)"
                    .into(),
            )),
            (true, Some(_), _) => {
                return Err(Error::InvalidInput(
                    "--init and --join exclude each other: --init starts a new cluster".into(),
                ))
            }
            (false, None, _) => {
                return Err(Error::InvalidInput(format!(
                    "the data dir {} holds no node yet: start a new cluster with --init, or join \
                 one with --join HOST:PORT --token TOKEN",
                    dir.path().display()
                )))
            }
        };
    if let Mode::Join { token, .. } = &mode {
        JoinToken::parse(token)?;
    }
    let name = opts.name.clone().ok_or_else(|| {
        Error::InvalidInput("--name is needed to create or join a cluster".into())
    })?;
    join::validate_name(&name)?;
    let datastore = match opts.datastore.as_deref().unwrap_or("auto") {
        "auto" => true,
        "never" => false,
        other => {
            return Err(Error::InvalidInput(format!(
                "--datastore {other:?}: use auto (may hold the datastore) or never (agent only)"
            )))
        }
    };
    if !datastore {
        if opts.init {
            return Err(Error::InvalidInput(
                "--init with --datastore never: the node that creates a cluster holds its \
                 datastore; create it with --datastore auto, then join agent-only nodes to it"
                    .into(),
            ));
        }
        let file = NodeFile {
            name,
            raft_id: 0,
            cluster_id: 0,
            cluster_name: String::new(),
            peer_addr: String::new(),
            client_addr: String::new(),
            client_plaintext: false,
            datastore: "never".into(),
            labels: opts.labels.clone(),
            endpoints: vec![],
        };
        return Ok((file, None, mode));
    }
    let peer_addr = opts
        .peer_addr
        .clone()
        .unwrap_or_else(|| DEFAULT_PEER_ADDR.into());
    let client_addr = opts
        .client_addr
        .clone()
        .unwrap_or_else(|| DEFAULT_CLIENT_ADDR.into());
    if opts.client_plaintext && !is_loopback(&client_addr) {
        return Err(Error::InvalidInput(format!(
            "--client-plaintext serves the etcd API without TLS and is only allowed on a \
             loopback --client-addr (127.0.0.1 or [::1]), not {client_addr}"
        )));
    }
    let (peer, client) = bind(&peer_addr, &client_addr).await?;
    // Record the ports actually bound (":0" picks one).
    let peer_addr = peer.local_addr()?.to_string();
    let client_addr = client.local_addr()?.to_string();
    let file = NodeFile {
        name,
        raft_id: 0,
        cluster_id: 0,
        cluster_name: String::new(),
        peer_addr,
        client_addr,
        client_plaintext: opts.client_plaintext,
        datastore: "auto".into(),
        labels: opts.labels.clone(),
        endpoints: vec![],
    };
    Ok((file, Some((peer, client)), mode))
}

fn is_loopback(addr: &str) -> bool {
    let host = join::host_of(addr);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

async fn bind(peer_addr: &str, client_addr: &str) -> Result<(TcpListener, TcpListener)> {
    let peer = TcpListener::bind(peer_addr).await.map_err(|e| {
        Error::Unavailable(format!(
            "cannot listen on the peer address {peer_addr}: {e}; is another eden or etcd \
             running there? pick another --peer-addr"
        ))
    })?;
    let client = TcpListener::bind(client_addr).await.map_err(|e| {
        Error::Unavailable(format!(
            "cannot listen on the client address {client_addr}: {e}; is another eden or etcd \
             running there? pick another --client-addr"
        ))
    })?;
    Ok((peer, client))
}

/// TLS material a running node needs.
struct NodeTls {
    ca: Arc<ClusterCa>,
    identity: Identity,
    secret_sha256: String,
}

fn load_tls(dir: &DataDir) -> Result<NodeTls> {
    let ca_pem = dir.read("tls/ca.crt")?;
    let ca_key = dir.read("tls/ca.key")?;
    Ok(NodeTls {
        ca: Arc::new(ClusterCa::from_pem(&ca_pem, &ca_key)?),
        identity: Identity {
            cert_pem: dir.read("tls/node.crt")?,
            key_pem: dir.read("tls/node.key")?,
        },
        secret_sha256: dir.read("tls/join.sha256")?.trim().to_string(),
    })
}

fn node_info(file: &NodeFile) -> NodeInfo {
    NodeInfo {
        name: file.name.clone(),
        peer_addr: file.peer_addr.clone(),
        client_addr: file.client_addr.clone(),
    }
}

fn node_config(
    dir: &DataDir,
    file: &NodeFile,
    tls: &NodeTls,
    snapshot_count: u64,
    hash_at_start: bool,
) -> Result<NodeConfig> {
    let mut config = NodeConfig::new(
        file.raft_id,
        node_info(file),
        dir.raft(),
        pki::client_config(tls.ca.cert_pem(), &tls.identity)?,
    );
    config.hash_at_start = hash_at_start;
    if snapshot_count > 0 {
        // Keep a tenth of a snapshot's worth of log behind it, for followers that are only
        // a little behind.
        config.raft.snapshot_policy =
            eden_raft::openraft::SnapshotPolicy::LogsSinceLast(snapshot_count);
        config.raft.max_in_snapshot_log_to_keep = snapshot_count / 10;
    }
    Ok(config)
}

/// A started Raft node with its peer server.
struct Started {
    node: Arc<RaftNode>,
    /// The etcd API's shared state; the peer port's lease routes use it too.
    etcd: Arc<crate::etcd::Backend>,
    /// TLS for the etcd client port: the node certificate, clients must present one signed by
    /// the cluster CA (for example `DATA/admin/admin.crt`).
    client_tls: Arc<rustls::ServerConfig>,
    /// TLS for calls to other nodes' peer ports (the node certificate, the cluster CA).
    peer_client_tls: Arc<rustls::ClientConfig>,
    peer_stop: tokio::sync::oneshot::Sender<()>,
    peer_task: tokio::task::JoinHandle<std::result::Result<(), eden_raft::Error>>,
    /// SWIM failure detection over the peer port; leaves the cluster on stop.
    gossip: Arc<Gossip>,
    /// The gossip seeder and the role controller; aborted on stop.
    background: Vec<tokio::task::JoinHandle<()>>,
}

async fn start(
    dir: &DataDir,
    file: &NodeFile,
    tls: &NodeTls,
    peer: TcpListener,
    snapshot_count: u64,
    hash_at_start: bool,
) -> Result<Started> {
    let node = RaftNode::start(node_config(dir, file, tls, snapshot_count, hash_at_start)?)
        .await
        .map_err(|e| Error::Unavailable(format!("starting Raft: {e}")))?;
    let etcd = crate::etcd::Backend::new(node.clone(), file.cluster_id);
    let peer_client_tls = pki::client_config(tls.ca.cert_pem(), &tls.identity)?;
    // Gossip gets its own connections, so snapshot traffic on Raft's cannot delay its acks.
    let gossip = Gossip::start(
        Member {
            name: file.name.clone(),
            raft_id: file.raft_id,
            peer_addr: file.peer_addr.clone(),
        },
        Arc::new(PeerPool::new(peer_client_tls.clone())),
        member_peers(&node),
        GossipConfig::default(),
    )?;
    // The leader's failed appends are evidence for gossip too.
    let weak = Arc::downgrade(&gossip);
    node.peer_pool()
        .on_raft_failure(Arc::new(move |addr: &str| {
            if let Some(g) = weak.upgrade() {
                g.report_unreachable(addr);
            }
        }));
    let service = Arc::new(JoinService {
        gossip: gossip.clone(),
        etcd: etcd.clone(),
        ca: tls.ca.clone(),
        secret_sha256: tls.secret_sha256.clone(),
        cluster_id: file.cluster_id,
        cluster_name: file.cluster_name.clone(),
        node: node.clone(),
        client_plaintext: file.client_plaintext,
    });
    let server_tls = pki::server_config(tls.ca.cert_pem(), &tls.identity, true)?;
    let client_tls = pki::server_config(tls.ca.cert_pem(), &tls.identity, false)?;
    let (peer_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let peer_task = tokio::spawn(PeerServer::serve(
        peer,
        server_tls,
        node.clone(),
        Some(service.fallback()),
        async {
            let _ = stopped.await;
        },
    ));
    let prober = super::controller::Prober::new(node.clone());
    let health = Arc::new(super::controller::AnyOf(vec![
        gossip.clone(),
        prober.clone(),
    ]));
    let background = vec![
        tokio::spawn(seed_gossip(node.clone(), gossip.clone())),
        tokio::spawn(prober.run(PROBE_PERIOD)),
        tokio::spawn(super::controller::run(node.clone(), health)),
    ];
    Ok(Started {
        gossip,
        background,
        node,
        etcd,
        client_tls,
        peer_client_tls,
        peer_stop,
        peer_task,
    })
}

impl Started {
    async fn stop(self) {
        for task in &self.background {
            task.abort();
        }
        self.gossip.leave().await;
        let _ = self.peer_stop.send(());
        let _ = self.peer_task.await;
        if let Err(e) = self.node.shutdown().await {
            tracing::warn!("Raft shutdown: {e}");
        }
    }
}

/// The peer addresses of the other members this node knows of.
fn member_peers(node: &RaftNode) -> Vec<String> {
    let m = node.metrics();
    let me = node.info().peer_addr.clone();
    m.voters
        .values()
        .chain(m.learners.values())
        .map(|i| i.peer_addr.clone())
        .filter(|a| *a != me)
        .collect()
}

/// Keeps gossip's seeds in step with the Raft membership: a member gossip has not heard of
/// (a node that just joined, or this node's first contacts after joining) is announced to.
async fn seed_gossip(node: Arc<RaftNode>, gossip: Arc<Gossip>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let known: std::collections::BTreeSet<String> = gossip
            .health()
            .values()
            .map(|h| h.member.peer_addr.clone())
            .collect();
        for addr in member_peers(&node) {
            if !known.contains(&addr) {
                gossip.add_seed(&addr);
            }
        }
    }
}

/// `--init`: a new cluster with this node as its only voter.
async fn init(
    dir: &DataDir,
    file: &mut NodeFile,
    peer: TcpListener,
    snapshot_count: u64,
) -> Result<Started> {
    file.raft_id = pki::random_id()?;
    file.cluster_id = pki::random_id()?;
    file.cluster_name = file.name.clone();
    let ca = ClusterCa::create(&file.cluster_name)?;
    let hosts = vec![
        join::host_of(&file.peer_addr),
        join::host_of(&file.client_addr),
    ];
    let identity = ca.issue_node(&file.name, &hosts)?;
    let admin = ca.issue_client("admin")?;
    let token = JoinToken::generate(&ca.fingerprint())?;
    dir.write("tls/ca.crt", ca.cert_pem().as_bytes(), false)?;
    dir.write("tls/ca.key", ca.key_pem().as_bytes(), true)?;
    dir.write("tls/node.crt", identity.cert_pem.as_bytes(), false)?;
    dir.write("tls/node.key", identity.key_pem.as_bytes(), true)?;
    dir.write("tls/join.sha256", token.secret_sha256().as_bytes(), true)?;
    dir.write("admin/ca.crt", ca.cert_pem().as_bytes(), false)?;
    dir.write("admin/admin.crt", admin.cert_pem.as_bytes(), false)?;
    dir.write("admin/admin.key", admin.key_pem.as_bytes(), true)?;
    dir.write("admin/join-token", format!("{token}\n").as_bytes(), true)?;
    let tls = load_tls(dir)?;
    // A new member has no store of its own to check.
    let started = start(dir, file, &tls, peer, snapshot_count, false).await?;
    let members = BTreeMap::from([(file.raft_id, node_info(file))]);
    if let Err(e) = started.node.initialize(members).await {
        started.stop().await;
        return Err(e.into());
    }
    dir.commit_node(file)?;
    println!(
        "created cluster {:?} ({:016x})",
        file.cluster_name, file.cluster_id
    );
    println!(
        "join token (also in {}):",
        dir.admin().join("join-token").display()
    );
    println!("{token}");
    println!(
        "admin credentials for etcdctl: {}/{{ca.crt,admin.crt,admin.key}}",
        dir.admin().display()
    );
    Ok(started)
}

/// `--join`: the joining side of the exchange in `join.rs`.
async fn join(
    dir: &DataDir,
    file: &mut NodeFile,
    peer: TcpListener,
    via: &str,
    token: &str,
    snapshot_count: u64,
) -> Result<Started> {
    let token = JoinToken::parse(token)?;
    let (key_pem, csr_pem) = pki::new_key_and_csr(&file.name)?;
    let request = JoinRequest {
        secret: token.secret.clone(),
        name: file.name.clone(),
        csr_pem,
        peer_addr: file.peer_addr.clone(),
        client_addr: file.client_addr.clone(),
        datastore: true,
    };
    let grant: JoinGrant = join::post_json(
        via,
        pki::pinned_client_config(&token.ca_sha256)?,
        join::JOIN,
        &request,
        Duration::from_secs(30),
    )
    .await?;
    if pki::sha256_hex(pki::cert_der_from_pem(&grant.ca_pem, "CA certificate")?.as_ref())
        != token.ca_sha256
    {
        return Err(Error::InvalidData(format!(
            "{via} sent a CA that does not match the token's hash; refusing to join"
        )));
    }
    let (Some(ca_key), Some(secret_sha256)) = (grant.ca_key_pem, grant.secret_sha256) else {
        return Err(Error::InvalidData(format!(
            "{via} did not send the CA key a datastore node needs"
        )));
    };
    file.raft_id = grant.raft_id;
    file.cluster_id = grant.cluster_id;
    file.cluster_name = grant.cluster_name.clone();
    dir.write("tls/ca.crt", grant.ca_pem.as_bytes(), false)?;
    dir.write("tls/ca.key", ca_key.as_bytes(), true)?;
    dir.write("tls/node.crt", grant.cert_pem.as_bytes(), false)?;
    dir.write("tls/node.key", key_pem.as_bytes(), true)?;
    dir.write("tls/join.sha256", secret_sha256.as_bytes(), true)?;
    let tls = load_tls(dir)?;
    // A new member has no store of its own to check.
    let started = start(dir, file, &tls, peer, snapshot_count, false).await?;
    let admitted: Result<Admitted> = join::post_json(
        via,
        pki::client_config(tls.ca.cert_pem(), &tls.identity)?,
        join::ADMIT,
        &AdmitRequest {
            raft_id: file.raft_id,
            info: node_info(file),
        },
        Duration::from_secs(120),
    )
    .await;
    match admitted {
        Ok(a) => {
            dir.commit_node(file)?;
            println!(
                "joined cluster {:?} ({:016x}) as {} with raft id {}",
                file.cluster_name,
                file.cluster_id,
                if a.voter {
                    "a voter"
                } else {
                    "a standby (the role controller promotes it when a voter is needed)"
                },
                file.raft_id
            );
            Ok(started)
        }
        Err(e) => {
            started.stop().await;
            Err(e)
        }
    }
}

/// The leader's periodic upkeep of the store.
struct Checks {
    compaction: super::compactor::Policy,
    corrupt_check: Option<Duration>,
    initial_corrupt_check: bool,
}

async fn serve_until(
    dir: DataDir,
    file: NodeFile,
    started: Started,
    client: TcpListener,
    checks: Checks,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    tracing::info!(
        name = %file.name,
        raft_id = file.raft_id,
        peer = %file.peer_addr,
        client = %file.client_addr,
        "serving"
    );
    let backend = started.etcd.clone();
    if checks.initial_corrupt_check {
        match backend.check_initial_hashkv().await {
            Ok(compared) => tracing::info!(
                members = compared,
                "initial corruption check: this member's store agrees with the members compared"
            ),
            Err(e) => {
                started.stop().await;
                return Err(Error::InvalidData(e));
            }
        }
    }
    let tls = if file.client_plaintext {
        None
    } else {
        Some(started.client_tls.clone())
    };
    let (client_stop, client_stopped) = tokio::sync::oneshot::channel::<()>();
    let client_task = tokio::spawn(crate::etcd::serve(client, tls, backend, async {
        let _ = client_stopped.await;
    }));
    // The agent and the run controller reach the store through this node's own etcd API.
    let scheme = if file.client_plaintext {
        "http"
    } else {
        "https"
    };
    let kv = Kv::new(
        &[format!("{scheme}://{}", file.client_addr)],
        (!file.client_plaintext)
            .then(|| agent_tls(&dir))
            .transpose()?
            .as_ref(),
    )?;
    let agent = Agent::new(node_record(&file), kv.clone());
    let agent_task = tokio::spawn(agent.clone().run());
    let controller_task = tokio::spawn(crate::agent::controller::run(
        started.node.clone(),
        kv.clone(),
    ));
    let membership_task = tokio::spawn(follow_membership(
        started.node.clone(),
        started.etcd.clone(),
        kv.clone(),
        started.gossip.clone(),
        started.peer_client_tls.clone(),
        !file.client_plaintext,
    ));
    let compactor_task = tokio::spawn(super::compactor::run(
        started.node.clone(),
        checks.compaction,
    ));
    let corrupt_task = checks.corrupt_check.map(|period| {
        tokio::spawn(crate::etcd::maintenance::run_corruption_check(
            started.etcd.clone(),
            period,
        ))
    });
    shutdown.await;
    tracing::info!("shutting down");
    agent_task.abort();
    controller_task.abort();
    membership_task.abort();
    compactor_task.abort();
    if let Some(t) = corrupt_task {
        t.abort();
    }
    leave_agent(&kv, &agent).await;
    let _ = client_stop.send(());
    if let Ok(Err(e)) = client_task.await {
        tracing::warn!("etcd client port: {e}");
    }
    started.stop().await;
    drop(dir);
    Ok(())
}

/// What holds a node's elections back, given the members' newest answer (see
/// `follow_membership` and [`ElectionHold`]): nothing for a voter of the members' membership;
/// for a learner, its own log holding that membership (before, the log may list it as a voter
/// of an older one); outside the membership, everything.
fn election_hold(list: &join::MemberList, me: u64) -> ElectionHold {
    if list.voters.iter().any(|(id, _)| *id == me) {
        ElectionHold::None
    } else if list.contains(me) {
        ElectionHold::UntilMembership(list.membership_index)
    } else {
        ElectionHold::Outside
    }
}

/// How long `follow_membership` waits for more answers once one has come.
const MEMBERS_GRACE: Duration = Duration::from_millis(200);

/// Keeps a datastore node's etcd API and agent right when the role controller moves it out of
/// Raft (retires it to an eligible agent) or back in (admits it as a standby).
///
/// A node outside the membership is never told so by Raft (the leader simply stops
/// replicating to it), and its replica then falls behind for good. So every 2 s (300 ms while
/// outside, or readmitted and not yet caught up) it asks the nodes it knows of for the
/// membership ([`join::MEMBERS`]): while it is not in it, its etcd API refuses requests as
/// Unavailable (etcd clients move to another endpoint) and its agent reaches the members' etcd
/// API instead of its own; once admitted again, both come back. It also decides whether the
/// node may call elections ([`RaftNode::hold_elections`]).
async fn follow_membership(
    node: Arc<RaftNode>,
    etcd: Arc<crate::etcd::Backend>,
    kv: Kv,
    gossip: Arc<Gossip>,
    tls: Arc<rustls::ClientConfig>,
    https: bool,
) {
    let own = vec![crate::cli::client::url(&node.info().client_addr, https)];
    let me = node.id();
    let mut known: Vec<String> = Vec::new();
    let mut first = true;
    let mut answered = false;
    let mut catching_up = false;
    loop {
        // The first look is at once (a node restarted after it was removed must not serve its
        // old replica); outside Raft it looks more often, so an admission brings the etcd API
        // back soon.
        if !std::mem::take(&mut first) {
            let pause = if etcd.is_serving() && !catching_up {
                2000
            } else {
                300
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        // A leader is a member, except one restarted from an old log that still believes it
        // leads: until a member has answered once, even a leader asks.
        if node.is_leader() && answered {
            if !etcd.is_serving() {
                etcd.set_serving(true);
            }
            continue;
        }
        // Ask every node this node knows of: its own (possibly stale or, just after joining,
        // empty) view, those the last answer named, and those gossip has heard from. The
        // newest answer wins; one older than this node's own view (a peer that lags) is not
        // taken, and a node outside Raft does not answer (its view is stale).
        let mut peers = member_peers(&node);
        let gossiped = gossip.health().into_values().map(|h| h.member.peer_addr);
        for p in known.iter().cloned().chain(gossiped) {
            if p != node.info().peer_addr && !peers.contains(&p) {
                peers.push(p);
            }
        }
        let view = node.metrics();
        // Nobody to ask and no membership of its own yet: the log is still loading (a node
        // restarted a moment ago), or a node that just joined has received none. That is not
        // a look that found nobody (which lets a lone survivor campaign): ask again shortly.
        if peers.is_empty() && view.voters.is_empty() {
            first = true;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let own_index = view.membership_index;
        let mut asks = tokio::task::JoinSet::new();
        for peer in peers {
            let tls = tls.clone();
            asks.spawn(async move {
                join::post_json::<_, join::MemberList>(
                    &peer,
                    tls,
                    join::MEMBERS,
                    &(),
                    Duration::from_secs(2),
                )
                .await
            });
        }
        // A peer that is slow to answer must not hold up the first look (a restarted node
        // decides soon whether it may campaign): once one answer is in, the others get
        // `MEMBERS_GRACE` more.
        let mut answer: Option<join::MemberList> = None;
        let mut until: Option<tokio::time::Instant> = None;
        loop {
            let next = match until {
                None => asks.join_next().await,
                Some(t) => match tokio::time::timeout_at(t, asks.join_next()).await {
                    Ok(r) => r,
                    Err(_) => break,
                },
            };
            let Some(r) = next else { break };
            if let Ok(Ok(list)) = r {
                let newer = answer
                    .as_ref()
                    .is_none_or(|a| list.membership_index > a.membership_index);
                if list.membership_index >= own_index && newer {
                    answer = Some(list);
                    until.get_or_insert(tokio::time::Instant::now() + MEMBERS_GRACE);
                }
            }
        }
        asks.abort_all();
        let Some(list) = answer else {
            // Nobody else answers: a one-node cluster, or a leader whose peers are all down.
            // Until someone has answered, nothing says this node is outside: it may campaign,
            // once its own log is loaded (which may still list it as a voter).
            if !answered && !view.voters.is_empty() {
                node.hold_elections(ElectionHold::None);
            }
            answered |= node.is_leader();
            continue;
        };
        answered = true;
        let member = list.contains(me);
        let others: Vec<&NodeInfo> = list
            .voters
            .iter()
            .chain(&list.learners)
            .filter(|(id, _)| *id != me)
            .map(|(_, i)| i)
            .collect();
        known = others.iter().map(|i| i.peer_addr.clone()).collect();
        // Outside Raft the node must not campaign, nor as a learner whose own log does not
        // hold the membership that admitted it yet (see `ElectionHold`).
        node.hold_elections(election_hold(&list, me));
        // Looked at again soon while the leader's entries are still on their way.
        catching_up = member && node.elections_held();
        if member != etcd.is_serving() {
            tracing::info!(
                member,
                "{}",
                if member {
                    "a datastore member again: serving the etcd API"
                } else {
                    "not a datastore member: the etcd API refuses requests, the agent uses the \
                     members' endpoints"
                }
            );
            etcd.set_serving(member);
        }
        let urls: Vec<String> = if member {
            own.clone()
        } else {
            others
                .iter()
                .map(|i| crate::cli::client::url(&i.client_addr, https))
                .collect()
        };
        if urls.is_empty() {
            continue;
        }
        if let Err(e) = kv.set_endpoints(&urls) {
            tracing::warn!("updating the agent's endpoints: {e}");
        }
    }
}

/// The node's row in `/eden/nodes/`.
fn node_record(file: &NodeFile) -> NodeRecord {
    NodeRecord {
        name: file.name.clone(),
        peer_addr: file.peer_addr.clone(),
        client_addr: file.client_addr.clone(),
        datastore: file.datastore.clone(),
        labels: file.labels.clone(),
        raft_id: file.raft_id,
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// TLS for this node's own etcd client: the cluster CA and the node certificate.
fn agent_tls(dir: &DataDir) -> Result<ClientTlsConfig> {
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(dir.read("tls/ca.crt")?))
        .identity(TlsIdentity::from_pem(
            dir.read("tls/node.crt")?,
            dir.read("tls/node.key")?,
        )))
}

/// A clean stop: the alive key goes now rather than when its lease runs out, so a run does
/// not wait for this node.
async fn leave_agent(kv: &Kv, agent: &Agent) {
    let lease = agent.lease();
    if lease != 0 {
        let _ = tokio::time::timeout(Duration::from_secs(2), kv.revoke(lease)).await;
    }
}

/// `--join` with `--datastore never`: the node gets a certificate and the datastore nodes'
/// addresses, and is not added to Raft.
async fn join_agent(dir: &DataDir, file: &mut NodeFile, via: &str, token: &str) -> Result<()> {
    let token = JoinToken::parse(token)?;
    let (key_pem, csr_pem) = pki::new_key_and_csr(&file.name)?;
    let request = JoinRequest {
        secret: token.secret.clone(),
        name: file.name.clone(),
        csr_pem,
        // An agent-only node serves nothing; its certificate is only a client's.
        peer_addr: "localhost:0".into(),
        client_addr: "localhost:0".into(),
        datastore: false,
    };
    let grant: JoinGrant = join::post_json(
        via,
        pki::pinned_client_config(&token.ca_sha256)?,
        join::JOIN,
        &request,
        Duration::from_secs(30),
    )
    .await?;
    if pki::sha256_hex(pki::cert_der_from_pem(&grant.ca_pem, "CA certificate")?.as_ref())
        != token.ca_sha256
    {
        return Err(Error::InvalidData(format!(
            "{via} sent a CA that does not match the token's hash; refusing to join"
        )));
    }
    if grant.endpoints.is_empty() {
        return Err(Error::InvalidData(format!(
            "{via} named no datastore node to reach; is it an eden node of this version?"
        )));
    }
    file.cluster_id = grant.cluster_id;
    file.cluster_name = grant.cluster_name.clone();
    file.endpoints = grant.endpoints.clone();
    dir.write("tls/ca.crt", grant.ca_pem.as_bytes(), false)?;
    dir.write("tls/node.crt", grant.cert_pem.as_bytes(), false)?;
    dir.write("tls/node.key", key_pem.as_bytes(), true)?;
    dir.commit_node(file)?;
    println!(
        "joined cluster {:?} ({:016x}) as an agent-only node; datastore at {}",
        file.cluster_name,
        file.cluster_id,
        file.endpoints.join(", ")
    );
    Ok(())
}

/// An agent-only node: the agent loop against the datastore nodes' etcd API, until shutdown.
async fn serve_agent(
    dir: DataDir,
    file: NodeFile,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let urls: Vec<String> = file
        .endpoints
        .iter()
        .map(|a| crate::cli::client::url(a, true))
        .collect();
    let kv = Kv::new(&urls, Some(&agent_tls(&dir)?))?;
    tracing::info!(name = %file.name, endpoints = %urls.join(","), "serving as an agent-only node");
    let agent = Agent::new(node_record(&file), kv.clone());
    let task = tokio::spawn(agent.clone().run());
    let dir = Arc::new(dir);
    let follow = tokio::spawn(follow_datastore(kv.clone(), dir.clone(), file));
    shutdown.await;
    tracing::info!("shutting down");
    task.abort();
    follow.abort();
    leave_agent(&kv, &agent).await;
    drop(dir);
    Ok(())
}

/// Keeps an agent-only node's endpoints on the live datastore nodes: the role controller
/// replaces dead voters with other nodes, so the nodes it joined through may all be gone one
/// day. Every few seconds the client URLs of the datastore nodes whose agents are alive become
/// the endpoints, and `node.json` remembers them for a restart.
async fn follow_datastore(kv: Kv, dir: Arc<DataDir>, mut file: NodeFile) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(all) = crate::agent::controller::nodes(&kv).await else {
            continue;
        };
        let tls = kv.endpoints().iter().any(|u| u.starts_with("https://"));
        let urls: Vec<String> = all
            .values()
            .filter(|v| v.alive)
            .filter_map(|v| v.record.as_ref())
            .filter(|r| r.datastore != "never" && !r.client_addr.is_empty())
            .map(|r| crate::cli::client::url(&r.client_addr, tls))
            .collect();
        match kv.set_endpoints(&urls) {
            Ok(true) => {
                tracing::info!(endpoints = %urls.join(","), "datastore endpoints changed");
                file.endpoints = urls;
                if let Err(e) = dir.commit_node(&file) {
                    tracing::warn!("remembering the datastore endpoints: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("updating the datastore endpoints: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(n: u64) -> NodeInfo {
        NodeInfo {
            name: format!("n{n}"),
            peer_addr: format!("127.0.0.1:{}", 7000 + n),
            client_addr: format!("127.0.0.1:{}", 8000 + n),
        }
    }

    fn list(voters: &[u64], learners: &[u64], index: u64) -> join::MemberList {
        join::MemberList {
            voters: voters.iter().map(|n| (*n, info(*n))).collect(),
            learners: learners.iter().map(|n| (*n, info(*n))).collect(),
            membership_index: index,
        }
    }

    #[test]
    fn the_hold_follows_the_members_answer() {
        let members = list(&[1, 2, 4], &[3, 5], 900);
        assert_eq!(election_hold(&members, 2), ElectionHold::None);
        // Readmitted as a learner: held until its log holds the membership of index 900.
        assert_eq!(
            election_hold(&members, 3),
            ElectionHold::UntilMembership(900)
        );
        assert_eq!(election_hold(&members, 6), ElectionHold::Outside);
    }
}
