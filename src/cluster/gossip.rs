//! gossip: SWIM failure detection over the peer port.
//!
//! Every node runs one [`Gossip`]. It tells the role controller, `eden cluster status` and
//! anyone else who asks how each member of the cluster is doing: [`State::Alive`],
//! [`State::Suspect`] or [`State::Dead`], and since when ([`Gossip::health`],
//! [`Gossip::dead_for`]). Every node sees every other node's health, because SWIM piggybacks
//! membership updates on its own messages.
//!
//! ## The protocol (foca does it; this module only carries it)
//!
//! The SWIM protocol itself is the `foca` crate's, in the manner of hashicorp/memberlist:
//! 1. every `probe_period`, ping one member (round robin over a shuffled list);
//! 2. no ack within `probe_timeout`: ask a few other members to ping it for us (indirect probe),
//!    so one broken link does not make a healthy member look dead;
//! 3. still no ack by the end of the period: the member is **Suspect**, and the suspicion is
//!    gossiped; a live member that hears it refutes it by raising its incarnation;
//! 4. not refuted within `suspect_to_dead`: the member is **Dead**, and that is gossiped too.
//!
//! A member's identity is its [`Member`] plus a *generation*: the wall-clock milliseconds when
//! the process started, raised by one each time the member finds the cluster declared it dead
//! (foca's `Identity::renew`). Two identities with the same `peer_addr` are the same member;
//! the higher generation wins, so a restarted node (same name, same address) replaces its dead
//! former self at once instead of waiting for the cluster to forget it.
//!
//! ## Transport
//!
//! foca sends datagrams and forgets them. Here each foca message becomes one `POST /gossip` on
//! the peer port (HTTP/2, mutual TLS with the cluster CA, over the pooled connections of
//! [`PeerPool`]), sent from its own task with a short timeout; the answer is an empty 200 and
//! carries nothing. A message that cannot be delivered is simply lost, which SWIM expects. The
//! receiving side is [`Gossip::serve_request`] (or [`Gossip::handle`] with the bare body),
//! which the peer server's fallback routes [`GOSSIP_PATH`] to. It refuses callers without a
//! client certificate the cluster CA signed.
//!
//! The [`Transport`] trait is the seam between the protocol and the network: production uses
//! [`PeerTransport`]; tests wrap it to drop messages on chosen links, or replace it with an
//! in-memory network under tokio's paused clock.
//!
//! ## Time
//!
//! foca never reads a clock. It asks for timer events ("probe again in 250 ms"); each becomes a
//! task that sleeps with `tokio::time::sleep` and hands the event back. So under
//! `tokio::time::pause` the whole protocol runs on virtual time.
//!
//! ## Evidence from Raft
//!
//! [`Gossip::report_unreachable`] lets the Raft leader's replication errors count: the member
//! becomes Suspect at once (gossiped, so it can refute if it is in fact alive) and is declared
//! Dead after `suspect_to_dead` unless it refutes.
//!
//! ## Wiring (what `eden serve` does with it)
//!
//! 1. `Gossip::start(Member { name, raft_id, peer_addr }, pool, seeds, GossipConfig::default())`
//!    once the node knows its name and peer address; `seeds` are the peer addresses of the node
//!    it joined through and of the members it knows. A pool of its own keeps gossip off the
//!    HTTP/2 connections that carry Raft snapshots, whose bulk could delay a probe's ack.
//! 2. The peer server's fallback sends [`GOSSIP_PATH`] to [`Gossip::serve_request`].
//! 3. The Raft leader's failed appends go to [`Gossip::report_unreachable`].
//! 4. When the node's Raft id changes, [`Gossip::set_raft_id`].
//! 5. The role controller reads it through its `controller::Health` trait (implemented here:
//!    `controller::run(node, gossip.clone())`), or [`Gossip::health`] / [`Gossip::dead_for`]
//!    directly, and [`Gossip::forget`]s a node it removed for good.
//! 6. On shutdown, [`Gossip::leave`].
//!
//! ## What this module does not do
//!
//! It decides nothing about roles, Raft membership or failover: it only reports health. It does
//! not persist anything; a restarted node learns the cluster again from its seeds. It does not
//! authenticate *which* node sent a message beyond "holds a certificate from the cluster CA".

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::num::{NonZeroU8, NonZeroUsize};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use eden_raft::{NodeId, NodeInfo, PeerCertificate, PeerPool};
use foca::{
    AccumulatingRuntime, Foca, NoCustomBroadcast, OwnedNotification, PeriodicParams, PostcardCodec,
    Runtime, Timer, TimerToken,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The peer-port path that carries gossip messages.
pub const GOSSIP_PATH: &str = "/gossip";

/// How long one gossip POST, dialing included, may take before it is abandoned.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest gossip message produced and accepted. Over HTTP/2 there is no MTU to respect, so it
/// is large enough for a full membership feed of a few hundred nodes.
const MAX_MESSAGE: usize = 64 << 10;

/// Who a node is, as gossip tells it to the others.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The node's name (`--name`), unique in the cluster; [`Gossip::health`] is keyed by it.
    pub name: String,
    /// Its Raft node id, 0 for a node that is not (yet) in Raft.
    pub raft_id: u64,
    /// Its peer address `host:port`, exactly as other nodes dial it.
    pub peer_addr: String,
}

/// A member's health as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum State {
    /// Answers probes, directly or through others.
    Alive,
    /// Missed a probe cycle (or the Raft leader could not reach it); Dead unless it refutes
    /// within `suspect_to_dead`. Still counts as a member.
    Suspect,
    /// Declared dead by the cluster, or left on purpose.
    Dead,
}

/// One entry of [`Gossip::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub member: Member,
    /// The identity generation: higher means a later process (or a later rejoin) of this name.
    pub generation: u64,
    pub state: State,
    /// When this node first saw `state` for this generation.
    pub since: Instant,
    /// When this node stopped seeing the member Alive (first Suspect, or Dead if it learned
    /// that first); `None` while Alive. Kept across Suspect -> Dead, so "unreachable for
    /// `failover-after`" can count from the first missed probe, not from the verdict.
    pub unreachable_since: Option<Instant>,
}

/// Tuning. The defaults suit loopback and a LAN: a killed node is declared dead by every other
/// node about 1.5 s after it dies (up to a few probe periods until someone probes it, one period
/// for the probe to fail, then `suspect_to_dead`, then a gossip round), well under the cluster's
/// default `failover-after` of 3 s. Failure detection is a trade: shorter periods find deaths
/// sooner and suspect live-but-slow nodes more often (they refute, at the cost of a few
/// messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipConfig {
    /// How often this node probes one member.
    pub probe_period: Duration,
    /// How long to wait for a direct ack before asking others to probe (must be less than
    /// `probe_period`; the rest of the period is for the indirect probes). Also bounds each
    /// message's POST.
    pub probe_timeout: Duration,
    /// How long a Suspect member has to refute before it is declared Dead.
    pub suspect_to_dead: Duration,
    /// How many members to ask for an indirect probe.
    pub indirect_probes: usize,
}

impl Default for GossipConfig {
    fn default() -> GossipConfig {
        GossipConfig {
            probe_period: Duration::from_millis(250),
            probe_timeout: Duration::from_millis(100),
            suspect_to_dead: Duration::from_millis(800),
            indirect_probes: 3,
        }
    }
}

impl GossipConfig {
    /// Checks the relations foca relies on; the error names the bad value.
    pub fn validate(&self) -> Result<()> {
        if self.probe_timeout.is_zero() || self.probe_period.is_zero() {
            return Err(Error::InvalidInput(format!(
                "gossip probe period ({:?}) and probe timeout ({:?}) must be more than zero",
                self.probe_period, self.probe_timeout
            )));
        }
        if self.probe_timeout >= self.probe_period {
            return Err(Error::InvalidInput(format!(
                "gossip probe timeout ({:?}) must be less than the probe period ({:?}); the \
                 rest of the period is for indirect probes",
                self.probe_timeout, self.probe_period
            )));
        }
        if self.suspect_to_dead.is_zero() {
            return Err(Error::InvalidInput(
                "gossip suspect-to-dead timeout must be more than zero".into(),
            ));
        }
        if self.indirect_probes == 0 {
            return Err(Error::InvalidInput(
                "gossip needs at least 1 indirect probe".into(),
            ));
        }
        Ok(())
    }

    fn foca(&self) -> foca::Config {
        foca::Config {
            probe_period: self.probe_period,
            probe_rtt: self.probe_timeout,
            num_indirect_probes: NonZeroUsize::new(self.indirect_probes.max(1))
                .unwrap_or(NonZeroUsize::MIN),
            // Enough re-sends to reach every member of a cluster of a few dozen (memberlist's
            // retransmit multiplier 4 times log10(n+1), rounded up).
            max_transmissions: NonZeroU8::new(8).unwrap_or(NonZeroU8::MIN),
            suspect_to_down_after: self.suspect_to_dead,
            // Renewable identities mean a down identity never blocks a rejoin; forgetting after
            // a day only bounds memory.
            remove_down_after: Some(Duration::from_secs(24 * 3600)),
            max_packet_size: NonZeroUsize::new(MAX_MESSAGE).unwrap_or(NonZeroUsize::MIN),
            // Tell a member that was declared dead, so it renews and rejoins at once.
            notify_down_members: true,
            // Ask one member for its member list now and then, so every node learns every
            // other even if a join announcement was lost.
            periodic_announce: Some(PeriodicParams {
                frequency: self.probe_period * 10,
                num_members: NonZeroUsize::MIN,
            }),
            // Knock on dead members' doors, so a healed partition merges again.
            periodic_announce_to_down_members: Some(PeriodicParams {
                frequency: self.probe_period * 10,
                num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
            }),
            // Spread news (suspicions, deaths) faster than the probe cycle alone would.
            periodic_gossip: Some(PeriodicParams {
                frequency: (self.probe_period / 2).max(Duration::from_millis(1)),
                num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
            }),
        }
    }
}

/// A boxed send future; see [`Transport`].
pub type SendFuture = Pin<Box<dyn Future<Output = std::result::Result<(), String>> + Send>>;

/// How gossip messages reach other nodes.
///
/// Contract: `send` must not block; the future it returns delivers `body` to the
/// [`GOSSIP_PATH`] handler of the node at `peer_addr` at most once, and resolves when that is
/// done or has failed (an error is a reason for the logs, nothing more). Messages may be lost,
/// delayed or reordered; SWIM copes with all three. [`Gossip`] spawns the future, except on
/// [`Gossip::leave`], which awaits its goodbyes.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, peer_addr: &str, body: Bytes) -> SendFuture;
}

/// The production [`Transport`]: `POST /gossip` over the peer pool (HTTP/2, mutual TLS).
pub struct PeerTransport {
    pool: Arc<PeerPool>,
    timeout: Duration,
}

impl PeerTransport {
    /// Each POST, dialing included, is abandoned after `timeout`.
    pub fn new(pool: Arc<PeerPool>, timeout: Duration) -> PeerTransport {
        PeerTransport { pool, timeout }
    }
}

impl Transport for PeerTransport {
    fn send(&self, peer_addr: &str, body: Bytes) -> SendFuture {
        let pool = self.pool.clone();
        let addr = peer_addr.to_string();
        let timeout = self.timeout;
        Box::pin(async move {
            pool.call(&addr, GOSSIP_PATH, body.to_vec(), timeout)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}

/// foca's view of a member: who it is, and which process of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NodeIdentity {
    member: Member,
    generation: u64,
}

impl foca::Identity for NodeIdentity {
    /// Identities at the same peer address are the same member; only one of them is kept.
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(NodeIdentity {
            member: self.member.clone(),
            generation: self.generation.saturating_add(1),
        })
    }

    fn addr(&self) -> String {
        self.member.peer_addr.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // The later process wins; the rest only makes the choice deterministic.
        (self.generation, &self.member.name, self.member.raft_id)
            > (
                adversary.generation,
                &adversary.member.name,
                adversary.member.raft_id,
            )
    }
}

type Swim = Foca<NodeIdentity, PostcardCodec, SmallRng, NoCustomBroadcast>;

/// Everything foca touches, behind one lock. A std mutex, not a tokio one: every critical
/// section is short, synchronous foca work, never held across an await.
struct Inner {
    foca: Swim,
    runtime: AccumulatingRuntime<NodeIdentity>,
    health: BTreeMap<String, Health>,
    /// The timer token foca uses now, learned from the timers it schedules; needed to schedule
    /// our own suspect-to-dead timer in `report_unreachable`.
    token: TimerToken,
    seeds: BTreeSet<String>,
    /// When each peer address was last suspected on Raft's word: at most once per
    /// `suspect_to_dead`, so a burst of replication errors schedules one timer, not hundreds,
    /// and a member that refutes is not re-suspected in a tight loop.
    reported: HashMap<String, Instant>,
    /// Names dropped by `forget`, with the generation dropped: foca still remembers that
    /// identity as down, and only a later generation may bring the name back.
    forgotten: BTreeMap<String, u64>,
}

/// What one interaction with foca asked us to do once the lock is released.
#[derive(Default)]
struct Effects {
    sends: Vec<(String, Bytes)>,
    timers: Vec<(Duration, Timer<NodeIdentity>)>,
}

/// The failure detector of one node. See the module docs.
pub struct Gossip {
    /// This node's peer address; fixed for the life of the detector (the rest of its
    /// [`Member`] record lives in foca's identity and may change, see [`Gossip::set_raft_id`]).
    peer_addr: String,
    config: GossipConfig,
    transport: Arc<dyn Transport>,
    inner: Mutex<Inner>,
    /// Set by [`Gossip::leave`]: no more sends, timers or incoming messages.
    stopped: AtomicBool,
    this: Weak<Gossip>,
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
}

/// The current instant, from tokio's clock so that a paused test clock governs `since` too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn state_of(s: foca::State) -> State {
    match s {
        foca::State::Alive => State::Alive,
        foca::State::Suspect => State::Suspect,
        foca::State::Down => State::Dead,
    }
}

/// Folds one member record into the health map: a record of an older generation than the
/// entry for that name is stale and ignored; a new generation, member or state restarts `since`.
fn fold_health(
    health: &mut BTreeMap<String, Health>,
    member: &Member,
    generation: u64,
    state: State,
    now: Instant,
) {
    let unreachable_since = match health.get(&member.name) {
        Some(h) if h.generation > generation => return,
        Some(h) if h.generation == generation && h.state == state && &h.member == member => return,
        _ if state == State::Alive => None,
        Some(h) if h.generation == generation => h.unreachable_since.or(Some(now)),
        _ => Some(now),
    };
    health.insert(
        member.name.clone(),
        Health {
            member: member.clone(),
            generation,
            state,
            since: now,
            unreachable_since,
        },
    );
}

impl Gossip {
    /// Starts gossiping as `me` over the peer pool, joining through `seeds` (peer addresses,
    /// spelled exactly as those nodes advertise their `peer_addr`). Spawns its tasks on the
    /// current tokio runtime; they end when the returned `Arc` and its clones are dropped, or
    /// after [`Gossip::leave`]. An empty `seeds` is fine for the first node: the others find it.
    /// Must be called inside a tokio runtime (it spawns).
    pub fn start(
        me: Member,
        pool: Arc<PeerPool>,
        seeds: Vec<String>,
        config: GossipConfig,
    ) -> Result<Arc<Gossip>> {
        // A message may arrive late (SWIM copes), but a POST abandoned while its connection is
        // still being set up never gets one: the bound covers a TLS dial on a slow link.
        let transport = Arc::new(PeerTransport::new(pool, SEND_TIMEOUT));
        Gossip::start_with_transport(me, transport, seeds, config)
    }

    /// [`Gossip::start`] over any [`Transport`].
    pub fn start_with_transport(
        me: Member,
        transport: Arc<dyn Transport>,
        seeds: Vec<String>,
        config: GossipConfig,
    ) -> Result<Arc<Gossip>> {
        config.validate()?;
        let generation = now_millis();
        let identity = NodeIdentity {
            member: me.clone(),
            generation,
        };
        let seed = crate::cluster::pki::random_id()?;
        let foca = Foca::new(
            identity,
            config.foca(),
            SmallRng::seed_from_u64(seed),
            PostcardCodec,
        );
        let mut health = BTreeMap::new();
        fold_health(&mut health, &me, generation, State::Alive, now());
        let seeds: BTreeSet<String> = seeds.into_iter().filter(|s| *s != me.peer_addr).collect();
        let gossip = Arc::new_cyclic(|this| Gossip {
            peer_addr: me.peer_addr,
            config,
            transport,
            inner: Mutex::new(Inner {
                foca,
                runtime: AccumulatingRuntime::new(),
                health,
                token: TimerToken::default(),
                seeds,
                reported: HashMap::new(),
                forgotten: BTreeMap::new(),
            }),
            stopped: AtomicBool::new(false),
            this: this.clone(),
        });
        gossip.announce_to_seeds();
        tokio::spawn(rejoin_loop(Arc::downgrade(&gossip)));
        Ok(gossip)
    }

    /// This node's member record as gossip currently tells it.
    pub fn me(&self) -> Member {
        self.lock().foca.identity().member.clone()
    }

    /// Changes the Raft id this node advertises (an agent admitted as a learner, a node
    /// re-admitted under a new id). The node takes a new generation, so every view replaces
    /// the old record instead of keeping two.
    pub fn set_raft_id(&self, raft_id: u64) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let r = self.with_foca(|foca, rt| {
            let current = foca.identity().clone();
            if current.member.raft_id == raft_id {
                return Ok(());
            }
            let renewed = NodeIdentity {
                member: Member {
                    raft_id,
                    ..current.member
                },
                generation: current.generation.saturating_add(1),
            };
            foca.change_identity(renewed, rt)
        });
        if let Err(e) = r {
            tracing::warn!(raft_id, "gossip: advertising the new raft id: {e}");
        }
    }

    /// The settings this detector runs with.
    pub fn config(&self) -> &GossipConfig {
        &self.config
    }

    /// Takes one gossip message (the body of a `POST /gossip`). An undecodable message is an
    /// `InvalidInput` error; everything else (a message for a former identity, one from a dead
    /// member) is absorbed as SWIM prescribes.
    pub fn handle(&self, body: Bytes) -> Result<()> {
        if self.stopped.load(Ordering::Acquire) {
            return Ok(());
        }
        let r = self.with_foca(|foca, rt| foca.handle_data(&body, rt));
        match r {
            Ok(()) => Ok(()),
            Err(e @ (foca::Error::MalformedPacket | foca::Error::DataTooBig))
            | Err(e @ foca::Error::Decode(_)) => Err(Error::InvalidInput(format!(
                "gossip message of {} bytes: {e}",
                body.len()
            ))),
            Err(e) => {
                tracing::debug!("gossip message ignored: {e}");
                Ok(())
            }
        }
    }

    /// The whole `/gossip` route for the peer server's fallback: POST only, a client certificate
    /// from the cluster CA required (the peer server puts a verified one in the request's
    /// extensions as [`PeerCertificate`]), then [`Gossip::handle`]. Answers 200 with an empty
    /// body, or a plain-text error.
    pub async fn serve_request(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::POST {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "/gossip takes POST");
        }
        if req.extensions().get::<PeerCertificate>().is_none() {
            return plain(
                StatusCode::FORBIDDEN,
                "/gossip needs a client certificate signed by the cluster CA",
            );
        }
        let body = match Limited::new(req.into_body(), MAX_MESSAGE + 1024)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("reading /gossip body (at most {MAX_MESSAGE} bytes): {e}"),
                )
            }
        };
        match self.handle(body) {
            Ok(()) => plain(StatusCode::OK, ""),
            Err(e) => plain(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }

    /// Every member this node has heard of, itself included, by name.
    pub fn health(&self) -> BTreeMap<String, Health> {
        self.lock().health.clone()
    }

    /// How long `name` has been Dead in this node's view; `None` if it is not known or not dead.
    pub fn dead_for(&self, name: &str) -> Option<Duration> {
        let inner = self.lock();
        let h = inner.health.get(name)?;
        (h.state == State::Dead).then(|| now().saturating_duration_since(h.since))
    }

    /// How long `name` has been out of reach (Suspect or Dead without being Alive in between)
    /// in this node's view; `None` if it is not known or Alive. A Suspect member may still
    /// refute: pair this with [`State::Dead`] before acting on it.
    pub fn unreachable_for(&self, name: &str) -> Option<Duration> {
        let inner = self.lock();
        let since = inner.health.get(name)?.unreachable_since?;
        Some(now().saturating_duration_since(since))
    }

    /// Evidence from outside SWIM (the Raft leader could not replicate to `peer_addr`): the
    /// member there becomes Suspect now, the suspicion is gossiped, and it is declared Dead
    /// after `suspect_to_dead` unless it refutes it, which a live member does as soon as it
    /// hears. Reports about one address count once per `suspect_to_dead` (a failing leader
    /// reports on every retry). Addresses of no live member are ignored.
    pub fn report_unreachable(&self, peer_addr: &str) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let after = self.config.suspect_to_dead;
        let effects = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let Some(target) = inner
                .foca
                .iter_members()
                .filter(|m| m.id().member.peer_addr == peer_addr)
                .max_by_key(|m| m.id().generation)
                .cloned()
            else {
                return;
            };
            let now = now();
            if let Some(last) = inner.reported.get(peer_addr) {
                if now.saturating_duration_since(*last) < after {
                    return;
                }
            }
            inner.reported.insert(peer_addr.to_string(), now);
            tracing::info!(
                member = %target.id().member.name,
                peer_addr,
                "Raft cannot reach this member: suspecting it"
            );
            let suspect = foca::Member::new(
                target.id().clone(),
                target.incarnation(),
                foca::State::Suspect,
            );
            if let Err(e) =
                inner
                    .foca
                    .apply_many(std::iter::once(suspect), true, &mut inner.runtime)
            {
                tracing::debug!("suspecting {peer_addr}: {e}");
            }
            let timer = Timer::ChangeSuspectToDown {
                member_id: target.id().clone(),
                incarnation: target.incarnation(),
                token: inner.token,
            };
            inner.runtime.submit_after(timer, after);
            self.settle(inner)
        };
        self.dispatch(effects);
    }

    /// Drops a Dead member from [`Gossip::health`] (the role controller calls this once it has
    /// removed the node for good). Returns whether it was there and dead; live members stay.
    /// If the node comes back, it reappears as soon as it is heard from.
    pub fn forget(&self, name: &str) -> bool {
        let mut inner = self.lock();
        match inner.health.get(name) {
            Some(h) if h.state == State::Dead && name != inner.foca.identity().member.name => {
                let generation = h.generation;
                inner.health.remove(name);
                inner.forgotten.insert(name.to_string(), generation);
                true
            }
            _ => false,
        }
    }

    /// Adds a peer address to announce to (now, and whenever this node knows no live member).
    pub fn add_seed(&self, peer_addr: &str) {
        if peer_addr == self.peer_addr {
            return;
        }
        self.lock().seeds.insert(peer_addr.to_string());
        self.announce_to(peer_addr);
    }

    /// Leaves the cluster on purpose: tells a few members this node is going (waiting at most
    /// one probe timeout for that to be delivered), then stops. The others mark it Dead at
    /// once instead of after a suspicion timeout.
    pub async fn leave(&self) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let effects = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            if let Err(e) = inner.foca.leave_cluster(&mut inner.runtime) {
                tracing::debug!("gossip leave: {e}");
            }
            let effects = self.settle(inner);
            let me = inner.foca.identity().clone();
            fold_health(
                &mut inner.health,
                &me.member,
                me.generation,
                State::Dead,
                now(),
            );
            effects
        };
        self.stopped.store(true, Ordering::Release);
        let goodbyes: Vec<_> = effects
            .sends
            .into_iter()
            .map(|(to, body)| self.transport.send(&to, body))
            .collect();
        let all = async {
            for g in goodbyes {
                let _ = g.await;
            }
        };
        let _ = tokio::time::timeout(self.config.probe_timeout, all).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic under the lock leaves foca's state as consistent as any lost packet would.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one foca interaction and carries out what it asked for.
    fn with_foca<R>(
        &self,
        f: impl FnOnce(&mut Swim, &mut AccumulatingRuntime<NodeIdentity>) -> R,
    ) -> R {
        let (r, effects) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let r = f(&mut inner.foca, &mut inner.runtime);
            (r, self.settle(inner))
        };
        self.dispatch(effects);
        r
    }

    /// Drains foca's runtime and brings the health map up to date. Called with the lock held
    /// after every interaction with foca.
    fn settle(&self, inner: &mut Inner) -> Effects {
        let mut effects = Effects::default();
        while let Some((to, body)) = inner.runtime.to_send() {
            effects.sends.push((to.member.peer_addr, body));
        }
        while let Some((after, timer)) = inner.runtime.to_schedule() {
            match &timer {
                Timer::ProbeRandomMember(t)
                | Timer::PeriodicAnnounce(t)
                | Timer::PeriodicAnnounceDown(t)
                | Timer::PeriodicGossip(t)
                | Timer::SendIndirectProbe { token: t, .. } => inner.token = *t,
                Timer::ChangeSuspectToDown { .. } | Timer::RemoveDown(_) => {}
            }
            effects.timers.push((after, timer));
        }
        while let Some(n) = inner.runtime.to_notify() {
            match n {
                OwnedNotification::MemberUp(id) => {
                    tracing::info!(member = %id.member.name, generation = id.generation, "gossip: member up")
                }
                OwnedNotification::MemberDown(id) => {
                    tracing::warn!(member = %id.member.name, generation = id.generation, "gossip: member dead")
                }
                OwnedNotification::Rename(old, new) => tracing::info!(
                    member = %new.member.name,
                    old_generation = old.generation,
                    generation = new.generation,
                    "gossip: member has a new generation (restarted, or a new raft id)"
                ),
                OwnedNotification::Rejoin(id) => tracing::warn!(
                    generation = id.generation,
                    "gossip: the cluster declared this node dead; rejoined with a new generation"
                ),
                OwnedNotification::Active => tracing::debug!("gossip: joined"),
                OwnedNotification::Idle => {
                    tracing::debug!("gossip: no live member known; announcing to seeds")
                }
                OwnedNotification::Defunct => {
                    tracing::warn!("gossip: this node was declared dead")
                }
            }
        }
        let now = now();
        let me = inner.foca.identity().clone();
        if !self.stopped.load(Ordering::Acquire) {
            fold_health(
                &mut inner.health,
                &me.member,
                me.generation,
                State::Alive,
                now,
            );
        }
        for m in inner.foca.iter_membership_state() {
            let id = m.id();
            if id.member.name == me.member.name && id.generation <= me.generation {
                // A former process of this node, or a stale rumour about it.
                continue;
            }
            match inner.forgotten.get(&id.member.name) {
                Some(&g) if id.generation <= g => continue,
                Some(_) => {
                    inner.forgotten.remove(&id.member.name);
                }
                None => {}
            }
            fold_health(
                &mut inner.health,
                &id.member,
                id.generation,
                state_of(m.state()),
                now,
            );
        }
        effects
    }

    /// Sends the messages and schedules the timers, outside the lock.
    fn dispatch(&self, effects: Effects) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        for (to, body) in effects.sends {
            let send = self.transport.send(&to, body);
            tokio::spawn(async move {
                if let Err(e) = send.await {
                    tracing::trace!(peer = %to, "gossip message lost: {e}");
                }
            });
        }
        for (after, timer) in effects.timers {
            let this = self.this.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if let Some(gossip) = this.upgrade() {
                    gossip.fire(timer);
                }
            });
        }
    }

    fn fire(&self, timer: Timer<NodeIdentity>) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.with_foca(|foca, rt| foca.handle_timer(timer, rt)) {
            tracing::debug!("gossip timer: {e}");
        }
    }

    fn announce_to(&self, peer_addr: &str) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        // Whoever listens at `peer_addr` accepts an announcement addressed to any identity with
        // that address, so the name and generation here do not matter.
        let dst = NodeIdentity {
            member: Member {
                name: String::new(),
                raft_id: 0,
                peer_addr: peer_addr.to_string(),
            },
            generation: 0,
        };
        if let Err(e) = self.with_foca(|foca, rt| foca.announce(dst, rt)) {
            tracing::debug!(peer_addr, "gossip announce: {e}");
        }
    }

    fn announce_to_seeds(&self) {
        let seeds: Vec<String> = self.lock().seeds.iter().cloned().collect();
        for s in seeds {
            self.announce_to(&s);
        }
    }
}

/// Until the node knows a live member, announce to the seeds every few probe periods: the
/// seeds may start after us, or the whole cluster may have restarted.
async fn rejoin_loop(this: Weak<Gossip>) {
    loop {
        let period = match this.upgrade() {
            Some(g) => g.config.probe_period * 3,
            None => return,
        };
        tokio::time::sleep(period).await;
        let Some(g) = this.upgrade() else { return };
        if g.stopped.load(Ordering::Acquire) {
            return;
        }
        let lonely = g.lock().foca.num_members() == 0;
        if lonely {
            g.announce_to_seeds();
        }
    }
}

/// The role controller's view of health, so `controller::run` can take a `Gossip` where it
/// takes the direct `Prober`. Members are matched by name (the controller passes the
/// member's `NodeInfo`).
impl crate::cluster::controller::Health for Gossip {
    /// A member counts as dead only once gossip has declared it Dead; the duration runs from
    /// the first missed probe ([`Health::unreachable_since`]), as the prober's does, so
    /// `failover-after` is not added on top of the detection time.
    fn dead_for(&self, _id: NodeId, info: &NodeInfo) -> Option<Duration> {
        let inner = self.lock();
        let h = inner.health.get(&info.name)?;
        if h.state != State::Dead {
            return None;
        }
        let since = h.unreachable_since.unwrap_or(h.since);
        Some(now().saturating_duration_since(since))
    }

    /// Forgets a Dead member advertising Raft id `id`. A node admitted again comes back as a
    /// new generation, which starts afresh anyway.
    fn forget(&self, id: NodeId) {
        let name = {
            let inner = self.lock();
            inner
                .health
                .values()
                .find(|h| h.member.raft_id == id && id != 0)
                .map(|h| h.member.name.clone())
        };
        if let Some(name) = name {
            Gossip::forget(self, &name);
        }
    }
}

fn plain(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(msg.into())));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    //! The protocol on an in-memory network under tokio's paused clock: deterministic enough to
    //! assert on virtual time, fast enough to run many probe periods.

    use std::collections::HashSet;

    use super::*;

    /// Nodes by peer address, and links that drop every message (from, to).
    #[derive(Default)]
    struct MemNet {
        nodes: Mutex<HashMap<String, Weak<Gossip>>>,
        cut: Mutex<HashSet<(String, String)>>,
    }

    struct MemTransport {
        net: Arc<MemNet>,
        from: String,
    }

    impl Transport for MemTransport {
        fn send(&self, peer_addr: &str, body: Bytes) -> SendFuture {
            let cut = self
                .net
                .cut
                .lock()
                .unwrap()
                .contains(&(self.from.clone(), peer_addr.to_string()));
            let target = self
                .net
                .nodes
                .lock()
                .unwrap()
                .get(peer_addr)
                .and_then(Weak::upgrade);
            let addr = peer_addr.to_string();
            Box::pin(async move {
                match target {
                    _ if cut => Err(format!("link to {addr} is cut")),
                    Some(g) => g.handle(body).map_err(|e| e.to_string()),
                    None => Err(format!("nobody at {addr}")),
                }
            })
        }
    }

    fn member(i: usize) -> Member {
        Member {
            name: format!("n{i}"),
            raft_id: i as u64,
            peer_addr: format!("10.0.0.{i}:2380"),
        }
    }

    fn start(net: &Arc<MemNet>, i: usize, config: &GossipConfig) -> Arc<Gossip> {
        let me = member(i);
        let transport = Arc::new(MemTransport {
            net: net.clone(),
            from: me.peer_addr.clone(),
        });
        let seeds = vec![member(0).peer_addr];
        let g = Gossip::start_with_transport(me.clone(), transport, seeds, config.clone()).unwrap();
        net.nodes
            .lock()
            .unwrap()
            .insert(me.peer_addr, Arc::downgrade(&g));
        g
    }

    /// `n` members seeded with the first, once every one knows every other.
    async fn converged(n: usize, config: GossipConfig) -> (Arc<MemNet>, Vec<Arc<Gossip>>) {
        let net = Arc::new(MemNet::default());
        let nodes: Vec<_> = (0..n).map(|i| start(&net, i, &config)).collect();
        // Generous: with slow probing, discovery waits for periodic gossip.
        until(Duration::from_secs(120), "convergence", || {
            nodes.iter().all(|g| g.health().len() == n)
        })
        .await;
        (net, nodes)
    }

    fn state(g: &Gossip, name: &str) -> Option<State> {
        g.health().get(name).map(|h| h.state)
    }

    fn all_see(nodes: &[Arc<Gossip>], name: &str, want: State) -> bool {
        nodes.iter().all(|g| state(g, name) == Some(want))
    }

    /// Advances virtual time in small steps until `cond` holds; returns the virtual time taken.
    async fn until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
        let start = tokio::time::Instant::now();
        while !cond() {
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn members_converge_to_alive() {
        let net = Arc::new(MemNet::default());
        let nodes: Vec<_> = (0..5)
            .map(|i| start(&net, i, &GossipConfig::default()))
            .collect();
        until(Duration::from_secs(10), "5 members see 5 alive", || {
            nodes.iter().all(|g| {
                let h = g.health();
                h.len() == 5 && h.values().all(|h| h.state == State::Alive)
            })
        })
        .await;
        // And they stay alive over many probe periods.
        tokio::time::sleep(Duration::from_secs(30)).await;
        for g in &nodes {
            assert!(g.health().values().all(|h| h.state == State::Alive));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn killed_member_turns_suspect_then_dead_everywhere() {
        let (_net, mut nodes) = converged(5, GossipConfig::default()).await;
        let victim = nodes.remove(3);
        drop(victim);
        let mut saw_suspect = false;
        let took = until(Duration::from_secs(10), "n3 dead everywhere", || {
            saw_suspect |= nodes.iter().any(|g| state(g, "n3") == Some(State::Suspect));
            all_see(&nodes, "n3", State::Dead)
        })
        .await;
        assert!(saw_suspect, "n3 went dead without being suspect first");
        for g in &nodes {
            assert!(g.unreachable_for("n3").unwrap() >= g.dead_for("n3").unwrap());
            assert_eq!(g.unreachable_for("n1"), None);
        }
        println!("virtual time from kill to dead on all 4 survivors: {took:?}");
        for g in &nodes {
            assert!(g.dead_for("n3").is_some());
            assert_eq!(g.dead_for("n1"), None);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(nodes[0].dead_for("n3").unwrap() >= Duration::from_secs(2));
        assert!(!nodes[0].forget("n1"), "a live member is not forgotten");
        assert!(nodes[0].forget("n3"));
        assert!(!nodes[0].health().contains_key("n3"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !nodes[0].health().contains_key("n3"),
            "n3 came back from gossip"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn indirect_probes_keep_a_member_alive_across_a_broken_link() {
        let (net, nodes) = converged(4, GossipConfig::default()).await;
        {
            let mut cut = net.cut.lock().unwrap();
            cut.insert((member(1).peer_addr, member(2).peer_addr));
            cut.insert((member(2).peer_addr, member(1).peer_addr));
        }
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Not even suspect: the indirect probes answer within the probe period. (Without
            // them the suspicion would at best be refuted later, visible here.)
            assert_eq!(state(&nodes[1], "n2"), Some(State::Alive));
            assert_eq!(state(&nodes[2], "n1"), Some(State::Alive));
        }
        assert!(all_see(&nodes, "n1", State::Alive) && all_see(&nodes, "n2", State::Alive));
        // Control: with every path to n2 cut, the same detector does declare it dead.
        {
            let mut cut = net.cut.lock().unwrap();
            for i in [0, 3] {
                cut.insert((member(i).peer_addr, member(2).peer_addr));
                cut.insert((member(2).peer_addr, member(i).peer_addr));
            }
        }
        until(Duration::from_secs(10), "isolated n2 dead", || {
            [0, 1, 3]
                .iter()
                .all(|&i| state(&nodes[i], "n2") == Some(State::Dead))
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn restarted_member_is_alive_again_with_a_new_generation() {
        let (net, mut nodes) = converged(4, GossipConfig::default()).await;
        let old_generation = nodes[0].health()["n2"].generation;
        drop(nodes.remove(2));
        until(Duration::from_secs(10), "n2 dead", || {
            all_see(&nodes, "n2", State::Dead)
        })
        .await;
        // One view forgot n2 meanwhile; it must come back there too.
        assert!(nodes[1].forget("n2"));
        tokio::time::sleep(Duration::from_millis(5)).await;
        nodes.push(start(&net, 2, &GossipConfig::default()));
        until(Duration::from_secs(10), "n2 alive again", || {
            all_see(&nodes, "n2", State::Alive)
        })
        .await;
        for g in &nodes {
            assert!(g.health()["n2"].generation > old_generation);
            assert_eq!(g.dead_for("n2"), None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn raft_evidence_kills_a_silent_member_fast_and_a_live_one_refutes() {
        let config = GossipConfig {
            // So slow that probing alone would take far longer than the bound below.
            probe_period: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(1),
            suspect_to_dead: Duration::from_millis(500),
            indirect_probes: 3,
        };
        let (net, nodes) = converged(3, config).await;
        // A live member hears the suspicion and refutes it.
        nodes[0].report_unreachable(&member(1).peer_addr);
        assert_eq!(state(&nodes[0], "n1"), Some(State::Suspect));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(state(&nodes[0], "n1"), Some(State::Alive));
        // A silent one is dead after suspect_to_dead, long before a probe would notice.
        net.nodes.lock().unwrap().remove(&member(2).peer_addr);
        nodes[0].report_unreachable(&member(2).peer_addr);
        let took = until(Duration::from_secs(5), "n2 dead on Raft's word", || {
            state(&nodes[0], "n2") == Some(State::Dead)
        })
        .await;
        assert!(took < Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn new_raft_id_replaces_the_record_everywhere() {
        let (_net, nodes) = converged(3, GossipConfig::default()).await;
        let before = nodes[0].health()["n1"].generation;
        nodes[1].set_raft_id(42);
        assert_eq!(nodes[1].me().raft_id, 42);
        until(
            Duration::from_secs(5),
            "everyone sees n1 as raft 42",
            || {
                nodes.iter().all(|g| {
                    let h = &g.health()["n1"];
                    assert_ne!(h.state, State::Dead, "n1 went dead while changing its id");
                    h.member.raft_id == 42 && h.state == State::Alive && h.generation > before
                })
            },
        )
        .await;
        assert_eq!(nodes[0].health().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn controller_sees_dead_members_through_the_health_trait() {
        use crate::cluster::controller::Health as ControllerHealth;
        let (_net, mut nodes) = converged(4, GossipConfig::default()).await;
        let info = |i: usize| NodeInfo {
            name: format!("n{i}"),
            peer_addr: member(i).peer_addr,
            client_addr: String::new(),
        };
        assert_eq!(ControllerHealth::dead_for(&*nodes[0], 1, &info(1)), None);
        drop(nodes.remove(3));
        until(
            Duration::from_secs(10),
            "n3 dead for the controller",
            || ControllerHealth::dead_for(&*nodes[0], 3, &info(3)).is_some(),
        )
        .await;
        // Counted from the first missed probe, not from the verdict.
        let dead = ControllerHealth::dead_for(&*nodes[0], 3, &info(3)).unwrap();
        assert!(dead >= nodes[0].dead_for("n3").unwrap());
        assert_eq!(ControllerHealth::dead_for(&*nodes[0], 1, &info(1)), None);
        ControllerHealth::forget(&*nodes[0], 3);
        assert!(!nodes[0].health().contains_key("n3"));
        ControllerHealth::forget(&*nodes[0], 1);
        assert!(nodes[0].health().contains_key("n1"), "a live member stays");
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_member_is_dead_at_once() {
        let (_net, nodes) = converged(3, GossipConfig::default()).await;
        nodes[2].leave().await;
        assert_eq!(state(&nodes[2], "n2"), Some(State::Dead));
        until(Duration::from_secs(3), "n2 dead after leaving", || {
            all_see(&nodes[..2], "n2", State::Dead)
        })
        .await;
    }

    #[test]
    fn later_generation_wins_and_stale_records_are_ignored() {
        use foca::Identity;
        let a = NodeIdentity {
            member: member(1),
            generation: 5,
        };
        let b = a.renew().unwrap();
        assert!(b.win_addr_conflict(&a) && !a.win_addr_conflict(&b));
        let mut health = BTreeMap::new();
        let t0 = Instant::now();
        fold_health(&mut health, &b.member, b.generation, State::Alive, t0);
        fold_health(&mut health, &a.member, a.generation, State::Dead, t0);
        assert_eq!(health["n1"].state, State::Alive);
        assert_eq!(health["n1"].generation, 6);
        let t1 = t0 + Duration::from_secs(1);
        fold_health(&mut health, &b.member, b.generation, State::Alive, t1);
        assert_eq!(health["n1"].since, t0, "same state keeps its since");
        fold_health(&mut health, &b.member, b.generation, State::Suspect, t1);
        assert_eq!(
            (health["n1"].state, health["n1"].since),
            (State::Suspect, t1)
        );
        assert_eq!(health["n1"].unreachable_since, Some(t1));
        let t2 = t1 + Duration::from_secs(1);
        fold_health(&mut health, &b.member, b.generation, State::Dead, t2);
        assert_eq!(health["n1"].since, t2);
        assert_eq!(
            health["n1"].unreachable_since,
            Some(t1),
            "kept from the suspicion"
        );
        let c = b.renew().unwrap();
        fold_health(&mut health, &c.member, c.generation, State::Alive, t2);
        assert_eq!(health["n1"].unreachable_since, None);
    }

    #[test]
    fn config_validation_names_the_bad_value() {
        let bad = GossipConfig {
            probe_timeout: Duration::from_millis(500),
            probe_period: Duration::from_millis(300),
            ..GossipConfig::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("500ms") && e.contains("300ms"), "{e}");
        assert!(GossipConfig::default().validate().is_ok());
    }
}
