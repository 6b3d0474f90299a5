//! The role controller: keeps the datastore at its desired shape on its own.
//!
//! It runs on every datastore node and acts only while that node is the Raft leader, so a new
//! leader simply carries on. It keeps no state of its own between ticks: each tick it reads the
//! membership (Raft metrics), the health of every member ([`Health`]) and the desired shape
//! (`/eden/cluster/config`), and makes **at most one** membership change. A change the old
//! leader left half done is therefore finished or redone by the next leader's first ticks.
//!
//! ## Decisions, in order of priority
//! 0. A joint membership (a change whose leader died between its two steps): finish it to its
//!    target voter set before anything else.
//! 1. A voter dead for `failover_after` and a healthy standby (learner): promote the most
//!    caught-up standby. (The dead voter is still a voter: the cluster briefly has one voter
//!    more, so the new voter joins while the old quorum still holds.)
//! 2. A voter dead for `failover_after` and more voters than desired: remove the dead voter.
//! 3. Fewer voters than desired and a healthy, caught-up standby: promote it.
//! 4. More live voters than wanted (the config was lowered): demote the most lagging
//!    non-leader voter to a standby.
//! 5. A standby dead for `failover_after`: remove it (its place goes to a live node).
//! 6. Fewer healthy standbys than `standbys` (or none while a voter seat needs filling), and an
//!    eligible agent (a datastore-capable node outside Raft, see [`View::eligible`]) that answers
//!    a ping: admit it as a standby. It keeps its raft id and its log (it was a member before,
//!    or it joined and was retired at once), and catches up by log or snapshot.
//! 7. More healthy standbys than `standbys`, with every voter seat filled and no voter dead:
//!    retire the most lagging standby to an eligible agent (it leaves Raft; the node stops
//!    serving the etcd API and its agent reaches the members instead, see
//!    `serve::follow_membership`).
//!
//! It never removes a voter while that would leave fewer voters than desired, and never
//! targets two voters (a cluster of two is less available than one). Every change is recorded
//! as an event under `/eden/events/`, with what it did and why.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eden_raft::{NodeId, NodeInfo, PeerPool, RaftNode};
use serde::{Deserialize, Serialize};

/// Where the desired shape lives in the KV.
pub const CONFIG_KEY: &str = "/eden/cluster/config";
/// Prefix of the controller's event records.
pub const EVENTS_PREFIX: &str = "/eden/events/";
/// Where the leader publishes every member's health, as its prober sees it (JSON
/// [`HealthReport`]); written only when a state changes.
pub const HEALTH_KEY: &str = "/eden/cluster/health";

/// The peer route a node answers to show it is alive.
pub const PING_PATH: &str = "/eden/ping";
/// How often the controller looks.
const TICK: Duration = Duration::from_millis(250);

/// The desired shape of the datastore (`/eden/cluster/config`, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Voters wanted: 1, 3 or 5.
    pub voters: usize,
    /// Standbys (caught-up learners) wanted.
    pub standbys: usize,
    /// How long a voter must be unreachable before it is replaced, in milliseconds.
    pub failover_after_ms: u64,
    /// Public keys whose signatures on extension modules the cluster trusts (read by the
    /// agents and `eden module`, see `modules::ext::TrustedKeys::from_cluster_config`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub module_keys: Vec<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            voters: 3,
            standbys: 1,
            failover_after_ms: 3000,
            module_keys: Vec::new(),
        }
    }
}

impl ClusterConfig {
    /// Reads the config from the local replica; the default if absent or unreadable (a bad
    /// value is logged, never acted on).
    pub fn load(node: &RaftNode) -> ClusterConfig {
        let req = eden_storage::RangeRequest {
            key: CONFIG_KEY.as_bytes().to_vec(),
            ..Default::default()
        };
        let Ok(resp) = node.store().range(&req) else {
            return ClusterConfig::default();
        };
        let Some(kv) = resp.kvs.first() else {
            return ClusterConfig::default();
        };
        match serde_json::from_slice::<ClusterConfig>(&kv.value) {
            Ok(c) if [1, 3, 5].contains(&c.voters) => c,
            Ok(c) => {
                tracing::warn!(voters = c.voters, "{CONFIG_KEY}: voters must be 1, 3 or 5");
                ClusterConfig::default()
            }
            Err(e) => {
                tracing::warn!("{CONFIG_KEY} is not a valid cluster config: {e}");
                ClusterConfig::default()
            }
        }
    }

    fn failover_after(&self) -> Duration {
        Duration::from_millis(self.failover_after_ms)
    }
}

/// What the controller knows about members' health.
pub trait Health: Send + Sync {
    /// How long `id` has been considered dead, or `None` if it is alive (or unknown yet).
    fn dead_for(&self, id: NodeId, info: &NodeInfo) -> Option<Duration>;
    /// `id` left the membership: if it is admitted again, its health starts afresh.
    fn forget(&self, id: NodeId);
}

/// Several detectors at once: a member is as dead as the most certain of them says. Gossip
/// (SWIM, indirect probes) sees every member from everywhere; the leader's own prober also
/// covers members gossip has not met yet, and links that only the leader has lost.
pub struct AnyOf(pub Vec<Arc<dyn Health>>);

impl Health for AnyOf {
    fn dead_for(&self, id: NodeId, info: &NodeInfo) -> Option<Duration> {
        self.0.iter().filter_map(|h| h.dead_for(id, info)).max()
    }

    fn forget(&self, id: NodeId) {
        for h in &self.0 {
            h.forget(id);
        }
    }
}

/// A direct prober: pings every member's peer port and counts how long each has failed.
///
/// This is the leader's own evidence (as Raft replication errors are); it runs on every node
/// so a new leader has a view at once.
pub struct Prober {
    node: Arc<RaftNode>,
    pool: Arc<PeerPool>,
    /// Members whose latest probes failed: since when, and the latest failure.
    failing: Mutex<BTreeMap<NodeId, Streak>>,
    period: Mutex<Duration>,
    /// On the leader: each member's matched log index at the last round. Replication that moved
    /// on is evidence of life too (a member that was removed and admitted again catches up).
    matched: Mutex<BTreeMap<NodeId, Option<u64>>>,
}

/// Consecutive failed probes of one member.
#[derive(Debug, Clone, Copy)]
struct Streak {
    since: Instant,
    last: Instant,
}

/// A failure this long after the previous one starts a new streak: probes of that member
/// stopped in between (it left the membership, and may have come back since).
fn streak_gap(period: Duration) -> Duration {
    period * 3
}

impl Prober {
    pub fn new(node: Arc<RaftNode>) -> Arc<Prober> {
        let pool = node.peer_pool().clone();
        Arc::new(Prober {
            node,
            pool,
            failing: Mutex::new(BTreeMap::new()),
            period: Mutex::new(Duration::from_millis(500)),
            matched: Mutex::new(BTreeMap::new()),
        })
    }

    /// Probes every member every `period` until the task is aborted.
    pub async fn run(self: Arc<Self>, period: Duration) {
        *self.period.lock().unwrap_or_else(|p| p.into_inner()) = period;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let m = self.node.metrics();
            let replicated: Vec<NodeId> = {
                let mut last = self.matched.lock().unwrap_or_else(|p| p.into_inner());
                let moved = m
                    .replication
                    .iter()
                    .filter(|(id, p)| last.get(id).is_some_and(|prev| *prev != p.matched_index))
                    .map(|(id, _)| *id)
                    .collect();
                *last = m
                    .replication
                    .iter()
                    .map(|(id, p)| (*id, p.matched_index))
                    .collect();
                moved
            };
            let members: Vec<(NodeId, NodeInfo)> = m
                .voters
                .into_iter()
                .chain(m.learners)
                .filter(|(id, _)| *id != self.node.id())
                .collect();
            let probes = members.into_iter().map(|(id, info)| {
                let pool = self.pool.clone();
                async move {
                    let ok = pool
                        .call(&info.peer_addr, PING_PATH, Vec::new(), period.max(TICK))
                        .await
                        .is_ok();
                    (id, ok)
                }
            });
            let mut results = Vec::new();
            for p in probes.map(tokio::spawn).collect::<Vec<_>>() {
                if let Ok(r) = p.await {
                    results.push(r);
                }
            }
            let now = Instant::now();
            let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
            // A node that left the membership starts afresh if it is admitted again, and so
            // does one whose replication moved on since the last round.
            failing.retain(|id, _| results.iter().any(|(r, _)| r == id));
            for id in &replicated {
                failing.remove(id);
            }
            for (id, ok) in results {
                if ok {
                    failing.remove(&id);
                    continue;
                }
                match failing.get_mut(&id) {
                    Some(s) if now.duration_since(s.last) <= streak_gap(period) => s.last = now,
                    _ => {
                        failing.insert(
                            id,
                            Streak {
                                since: now,
                                last: now,
                            },
                        );
                    }
                }
            }
        }
    }
}

impl Health for Prober {
    fn forget(&self, id: NodeId) {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn dead_for(&self, id: NodeId, _info: &NodeInfo) -> Option<Duration> {
        let period = *self.period.lock().unwrap_or_else(|p| p.into_inner());
        let failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        let s = failing.get(&id)?;
        // Only a streak that is still going counts.
        (s.last.elapsed() <= streak_gap(period)).then(|| s.since.elapsed())
    }
}

/// A member's health as the leader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Alive,
    /// Unreachable for less than `failover_after`.
    Suspect,
    /// Unreachable for `failover_after` or longer.
    Dead,
}

/// The value of [`HEALTH_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The leader that wrote it.
    pub leader: NodeId,
    /// Health by Raft id (as a decimal string, for JSON).
    pub members: BTreeMap<String, HealthState>,
}

fn health_report(view: &View, config: &ClusterConfig) -> HealthReport {
    let members = view
        .voters
        .keys()
        .chain(view.learners.keys())
        .map(|id| {
            let state = match view.dead_for.get(id) {
                None => HealthState::Alive,
                Some(d) if *d < config.failover_after() => HealthState::Suspect,
                Some(_) => HealthState::Dead,
            };
            (id.to_string(), state)
        })
        .collect();
    HealthReport {
        leader: view.leader,
        members,
    }
}

/// One membership change the controller decided on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Decision {
    /// The membership is joint: a change was cut short between its two steps (its leader died
    /// or lost leadership). It is completed before anything else is decided.
    Finish { voters: Vec<NodeId>, reason: String },
    Promote {
        id: NodeId,
        name: String,
        reason: String,
    },
    Remove {
        id: NodeId,
        name: String,
        reason: String,
    },
    /// A live voter becomes a standby: the config asks for fewer voters.
    Demote {
        id: NodeId,
        name: String,
        reason: String,
    },
    /// An eligible agent becomes a standby (a Raft learner).
    Admit {
        id: NodeId,
        name: String,
        #[serde(skip)]
        info: NodeInfo,
        reason: String,
    },
    /// A standby leaves Raft and becomes an eligible agent: more standbys than wanted.
    Retire {
        id: NodeId,
        name: String,
        reason: String,
    },
}

/// What one tick sees: the inputs of [`decide`].
#[derive(Debug, Clone)]
pub struct View {
    pub leader: NodeId,
    pub voters: BTreeMap<NodeId, NodeInfo>,
    pub learners: BTreeMap<NodeId, NodeInfo>,
    /// Entries each member is behind the leader (leader's view).
    pub lag: BTreeMap<NodeId, u64>,
    /// How long each dead member has been dead.
    pub dead_for: BTreeMap<NodeId, Duration>,
    /// Eligible agents: nodes registered with `datastore: auto` and a raft id that are not
    /// members, minus those that lately failed to answer a ping.
    pub eligible: BTreeMap<NodeId, NodeInfo>,
    /// The voter set a joint membership is moving to (`voters` then holds both sets).
    pub joint: Option<BTreeSet<NodeId>>,
}

/// Most entries a standby may be behind to be promoted to fill a missing voter seat (a
/// replacement for a dead voter is promoted however far behind: it catches up as a voter).
const PROMOTE_MAX_LAG: u64 = 1000;

/// The controller's rule: at most one change for this view. Pure, so it is tested directly.
pub fn decide(view: &View, config: &ClusterConfig) -> Option<Decision> {
    if let Some(target) = &view.joint {
        let names: Vec<&str> = target
            .iter()
            .filter_map(|id| view.voters.get(id).map(|i| i.name.as_str()))
            .collect();
        return Some(Decision::Finish {
            voters: target.iter().copied().collect(),
            reason: format!(
                "the membership is joint (a change was cut short, e.g. by its leader's death); \
                 completing it to the voters {}",
                names.join(", ")
            ),
        });
    }
    let after = config.failover_after();
    let dead = |id: &NodeId| view.dead_for.get(id).is_some_and(|d| *d >= after);
    let lag = |id: &NodeId| view.lag.get(id).copied().unwrap_or(u64::MAX);
    let name = |info: &NodeInfo| info.name.clone();
    let best_standby = view
        .learners
        .iter()
        .filter(|(id, _)| !view.dead_for.contains_key(id))
        .min_by_key(|(id, _)| (lag(id), **id));
    // A desired size never below the voters we can have; never 2.
    let members = view.voters.len() + view.learners.len();
    let mut want = config.voters.min(members);
    if want == 2 {
        want = 1;
    }
    let dead_voter = view
        .voters
        .iter()
        .filter(|(id, _)| **id != view.leader)
        .find(|(id, _)| dead(id));
    if let Some((dead_id, dead_info)) = dead_voter {
        let live_voters = view.voters.keys().filter(|id| !dead(id)).count();
        if live_voters < want {
            if let Some((sid, sinfo)) = best_standby {
                return Some(Decision::Promote {
                    id: *sid,
                    name: name(sinfo),
                    reason: format!(
                        "voter {} ({dead_id}) unreachable for {:?}; {} is the most caught-up \
                         standby",
                        dead_info.name, view.dead_for[dead_id], sinfo.name
                    ),
                });
            }
        } else if view.voters.len() > want {
            return Some(Decision::Remove {
                id: *dead_id,
                name: name(dead_info),
                reason: format!(
                    "voter {} ({dead_id}) unreachable for {:?}; {live_voters} live voters remain",
                    dead_info.name, view.dead_for[dead_id]
                ),
            });
        }
    }
    if view.voters.len() < want {
        if let Some((sid, sinfo)) = best_standby.filter(|(id, _)| lag(id) <= PROMOTE_MAX_LAG) {
            return Some(Decision::Promote {
                id: *sid,
                name: name(sinfo),
                reason: format!(
                    "{} voters, {want} wanted; {} is the most caught-up standby",
                    view.voters.len(),
                    sinfo.name
                ),
            });
        }
    }
    // More live voters than wanted (the config asks for fewer): the most lagging non-leader
    // voter becomes a standby. Never while a voter is dead: replacing it comes first.
    if view.voters.len() > want && !view.voters.keys().any(|id| view.dead_for.contains_key(id)) {
        if let Some((id, info)) = view
            .voters
            .iter()
            .filter(|(id, _)| **id != view.leader)
            .max_by_key(|(id, _)| (lag(id), **id))
        {
            return Some(Decision::Demote {
                id: *id,
                name: name(info),
                reason: format!(
                    "{} voters, {want} wanted; {} becomes a standby",
                    view.voters.len(),
                    info.name
                ),
            });
        }
    }
    if let Some((id, info)) = view.learners.iter().find(|(id, _)| dead(id)) {
        return Some(Decision::Remove {
            id: *id,
            name: name(info),
            reason: format!(
                "standby {} ({id}) unreachable for {:?}",
                info.name, view.dead_for[id]
            ),
        });
    }
    // Standbys: learners not dead count toward the wanted number (a suspect one is not
    // replaced before `failover_after`); only those without any suspicion may be retired or
    // promoted.
    let standing = view.learners.keys().filter(|id| !dead(id)).count();
    let healthy: Vec<NodeId> = view
        .learners
        .keys()
        .filter(|id| !view.dead_for.contains_key(id))
        .copied()
        .collect();
    let voter_missing = view.voters.len() < config.voters || dead_voter.is_some();
    let short = standing < config.standbys || (healthy.is_empty() && voter_missing);
    if short {
        if let Some((id, info)) = view.eligible.iter().min_by_key(|(id, i)| (&i.name, **id)) {
            return Some(Decision::Admit {
                id: *id,
                name: name(info),
                info: info.clone(),
                reason: format!(
                    "{} healthy standbys, {} wanted{}; {} is an eligible agent",
                    healthy.len(),
                    config.standbys,
                    if voter_missing {
                        ", and a voter seat needs filling"
                    } else {
                        ""
                    },
                    info.name
                ),
            });
        }
    }
    let voters_settled = view.voters.len() >= config.voters
        && !view.voters.keys().any(|id| view.dead_for.contains_key(id));
    if healthy.len() > config.standbys && voters_settled {
        if let Some(id) = healthy.iter().max_by_key(|id| (lag(id), **id)) {
            let info = &view.learners[id];
            return Some(Decision::Retire {
                id: *id,
                name: name(info),
                reason: format!(
                    "{} healthy standbys, {} wanted; {} becomes an eligible agent",
                    healthy.len(),
                    config.standbys,
                    info.name
                ),
            });
        }
    }
    None
}

/// Runs the controller until aborted. Acts only while `node` leads.
pub async fn run(node: Arc<RaftNode>, health: Arc<dyn Health>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published: Option<HealthReport> = None;
    // Eligible agents that did not answer a ping lately or failed an admission, and until when
    // they are left out.
    let mut unreachable: BTreeMap<NodeId, Instant> = BTreeMap::new();
    loop {
        tick.tick().await;
        if !node.is_leader() {
            published = None;
            continue;
        }
        let m = node.metrics();
        let config = ClusterConfig::load(&node);
        let mut dead_for = BTreeMap::new();
        for (id, info) in m.voters.iter().chain(m.learners.iter()) {
            if *id == node.id() {
                continue;
            }
            if let Some(d) = health.dead_for(*id, info) {
                dead_for.insert(*id, d);
            }
        }
        let now = Instant::now();
        unreachable.retain(|_, until: &mut Instant| *until > now);
        let eligible = eligible_agents(&node)
            .into_iter()
            .filter(|(id, _)| {
                !m.voters.contains_key(id)
                    && !m.learners.contains_key(id)
                    && !unreachable.contains_key(id)
            })
            .collect();
        let view = View {
            leader: node.id(),
            lag: m.replication.iter().map(|(id, p)| (*id, p.lag)).collect(),
            voters: m.voters,
            learners: m.learners,
            dead_for,
            eligible,
            joint: m.joint_target,
        };
        let report = health_report(&view, &config);
        if published.as_ref() != Some(&report) {
            let cmd = eden_storage::Command::Put(eden_storage::PutRequest {
                key: HEALTH_KEY.as_bytes().to_vec(),
                value: serde_json::to_vec(&report).unwrap_or_default(),
                ..Default::default()
            });
            match node.write(cmd).await {
                Ok(_) => published = Some(report),
                Err(e) => tracing::warn!("publishing member health failed: {e}"),
            }
        }
        // Only an eligible agent that answers is admitted (adding waits until it has caught
        // up); one that does not is left out for a moment and the next one is tried at once,
        // so a dead node listed first does not hold up a live one.
        let mut view = view;
        let decision = loop {
            let Some(decision) = decide(&view, &config) else {
                break None;
            };
            let Decision::Admit { id, info, .. } = &decision else {
                break Some(decision);
            };
            let ping = node
                .peer_pool()
                .call(
                    &info.peer_addr,
                    PING_PATH,
                    Vec::new(),
                    Duration::from_secs(1),
                )
                .await;
            match ping {
                Ok(_) => break Some(decision),
                Err(e) => {
                    tracing::info!(node = %info.name, "eligible agent does not answer a ping: {e}");
                    unreachable.insert(*id, Instant::now() + SILENT_FOR);
                    view.eligible.remove(id);
                }
            }
        };
        let Some(decision) = decision else {
            continue;
        };
        tracing::info!(?decision, "role controller");
        let result = match &decision {
            Decision::Finish { voters, .. } => {
                node.finish_change(voters.iter().copied().collect()).await
            }
            Decision::Promote { id, .. } => node.promote(*id).await,
            Decision::Remove { id, .. } | Decision::Retire { id, .. } => node.remove(*id).await,
            Decision::Demote { id, .. } => node.demote(*id).await,
            Decision::Admit { id, info, .. } => node.add_learner(*id, info.clone()).await,
        };
        if let (Decision::Retire { id, .. }, Ok(())) = (&decision, &result) {
            // Tell it at once, so it does not serve its replica (no longer kept current) until
            // its own next look at the membership.
            let addr = view.learners.get(id).map(|i| i.peer_addr.clone());
            if let Some(addr) = addr {
                let notice = node
                    .peer_pool()
                    .call(
                        &addr,
                        super::join::RETIRED,
                        b"{}".to_vec(),
                        Duration::from_secs(1),
                    )
                    .await;
                if let Err(e) = notice {
                    tracing::info!(%addr, "retire notice not delivered (it will find out): {e}");
                }
            }
        }
        match (&decision, &result) {
            (Decision::Remove { id, .. } | Decision::Retire { id, .. }, Ok(())) => {
                health.forget(*id)
            }
            (Decision::Admit { id, .. }, Err(_)) => {
                unreachable.insert(*id, Instant::now() + FAILED_FOR);
            }
            _ => {}
        }
        let outcome = match &result {
            Ok(()) => "done".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        if let Err(e) = &result {
            tracing::warn!(
                ?decision,
                "role controller change failed, will look again: {e}"
            );
        }
        record(&node, &decision, &outcome).await;
    }
}

/// How long an eligible agent that did not answer a ping is left out (short: a restarted node
/// answers within moments, and a dead one refuses at once).
const SILENT_FOR: Duration = Duration::from_secs(2);
/// How long an eligible agent whose admission failed is left out.
const FAILED_FOR: Duration = Duration::from_secs(10);

/// The datastore-capable nodes registered under `/eden/nodes/` (from the local replica, which
/// on the leader is current): raft id and address for each. Members are among them; the caller
/// filters them out.
fn eligible_agents(node: &RaftNode) -> BTreeMap<NodeId, NodeInfo> {
    use crate::agent::records::{NodeRecord, NODES};
    let req = eden_storage::RangeRequest {
        key: NODES.as_bytes().to_vec(),
        range_end: crate::agent::kv::prefix_end(NODES.as_bytes()),
        ..Default::default()
    };
    let Ok(resp) = node.store().range(&req) else {
        return BTreeMap::new();
    };
    resp.kvs
        .iter()
        .filter(|kv| !kv.key[NODES.len()..].contains(&b'/'))
        .filter_map(|kv| serde_json::from_slice::<NodeRecord>(&kv.value).ok())
        .filter(|r| r.datastore == "auto" && r.raft_id != 0 && !r.peer_addr.is_empty())
        .map(|r| {
            (
                r.raft_id,
                NodeInfo {
                    name: r.name,
                    peer_addr: r.peer_addr,
                    client_addr: r.client_addr,
                },
            )
        })
        .collect()
}

/// Writes the decision as an event (`/eden/events/<unix ms>-controller`).
async fn record(node: &Arc<RaftNode>, decision: &Decision, outcome: &str) {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut event = serde_json::to_value(decision).unwrap_or_default();
    if let Some(o) = event.as_object_mut() {
        o.insert("actor".into(), "role-controller".into());
        o.insert("leader".into(), node.id().into());
        o.insert("outcome".into(), outcome.into());
        o.insert("unix_ms".into(), (ms as u64).into());
    }
    let cmd = eden_storage::Command::Put(eden_storage::PutRequest {
        key: format!("{EVENTS_PREFIX}{ms:013}-controller").into_bytes(),
        value: event.to_string().into_bytes(),
        ..Default::default()
    });
    if let Err(e) = node.write(cmd).await {
        tracing::warn!("recording a role controller event failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            peer_addr: format!("{name}:2380"),
            client_addr: format!("{name}:2379"),
        }
    }

    fn view(voters: &[u64], learners: &[u64]) -> View {
        View {
            leader: voters[0],
            voters: voters
                .iter()
                .map(|i| (*i, info(&format!("n{i}"))))
                .collect(),
            learners: learners
                .iter()
                .map(|i| (*i, info(&format!("n{i}"))))
                .collect(),
            lag: voters.iter().chain(learners).map(|i| (*i, 0)).collect(),
            dead_for: BTreeMap::new(),
            eligible: BTreeMap::new(),
            joint: None,
        }
    }

    const DEAD: Duration = Duration::from_secs(10);

    #[test]
    fn a_joint_membership_left_by_a_dead_leader_is_finished_first() {
        let config = ClusterConfig::default();
        // The old leader promoted 4 in place of the dead 2 and died before the second step:
        // the new leader (1) sees both sets, and a dead voter too. Finishing comes first.
        let mut v = view(&[1, 2, 3, 4], &[]);
        v.joint = Some(BTreeSet::from([1, 2, 3, 4]));
        v.dead_for.insert(2, DEAD);
        match decide(&v, &config) {
            Some(Decision::Finish { voters, reason }) => {
                assert_eq!(voters, [1, 2, 3, 4]);
                assert!(reason.contains("n1, n2, n3, n4"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Once it is uniform, the dead voter's removal (the rest of the takeover) follows.
        v.joint = None;
        assert!(matches!(
            decide(&v, &config),
            Some(Decision::Remove { id: 2, .. })
        ));
    }

    #[test]
    fn a_dead_voter_is_replaced_by_the_most_caught_up_standby_then_removed() {
        let config = ClusterConfig::default();
        let mut v = view(&[1, 2, 3], &[4, 5]);
        v.lag.insert(4, 50);
        v.lag.insert(5, 3);
        v.dead_for.insert(2, DEAD);
        assert!(matches!(
            decide(&v, &config),
            Some(Decision::Promote { id: 5, .. })
        ));
        // After the promotion: four voters, the dead one goes.
        let mut v = view(&[1, 2, 3, 5], &[4]);
        v.dead_for.insert(2, DEAD);
        assert!(matches!(
            decide(&v, &config),
            Some(Decision::Remove { id: 2, .. })
        ));
        // Then nothing more to do.
        let v = view(&[1, 3, 5], &[4]);
        assert_eq!(decide(&v, &config), None);
    }

    #[test]
    fn nothing_happens_before_failover_after() {
        let config = ClusterConfig::default();
        let mut v = view(&[1, 2, 3], &[4]);
        v.dead_for.insert(2, Duration::from_millis(2999));
        assert_eq!(decide(&v, &config), None);
    }

    #[test]
    fn a_dead_voter_without_a_standby_stays_when_removing_it_would_shrink_below_the_target() {
        let config = ClusterConfig::default();
        let mut v = view(&[1, 2, 3], &[]);
        v.dead_for.insert(3, DEAD);
        assert_eq!(decide(&v, &config), None);
    }

    #[test]
    fn standbys_are_promoted_up_to_the_target_but_never_to_two_voters() {
        let config = ClusterConfig::default();
        // One voter and one standby: two voters would be worse than one.
        assert_eq!(decide(&view(&[1], &[2]), &config), None);
        // One voter and two standbys: grow to three, one change at a time.
        assert!(matches!(
            decide(&view(&[1], &[2, 3]), &config),
            Some(Decision::Promote { .. })
        ));
        // Far behind: not promoted to fill a seat yet.
        let mut v = view(&[1, 2], &[3]);
        v.lag.insert(3, PROMOTE_MAX_LAG + 1);
        assert_eq!(decide(&v, &config), None);
        // At the target: nothing.
        assert_eq!(decide(&view(&[1, 2, 3], &[4]), &config), None);
    }

    #[test]
    fn a_lower_voter_target_demotes_voters_one_at_a_time_but_never_the_leader() {
        let config = ClusterConfig {
            voters: 1,
            standbys: 2,
            ..ClusterConfig::default()
        };
        let mut v = view(&[1, 2, 3], &[]);
        v.lag.insert(3, 7);
        assert!(matches!(
            decide(&v, &config),
            Some(Decision::Demote { id: 3, .. })
        ));
        assert!(matches!(
            decide(&view(&[1, 2], &[3]), &config),
            Some(Decision::Demote { id: 2, .. })
        ));
        assert_eq!(decide(&view(&[1], &[2, 3]), &config), None);
        // With a dead voter, replacing it comes before any demotion.
        let mut v = view(&[1, 2, 3], &[4]);
        v.dead_for.insert(2, DEAD);
        assert!(!matches!(
            decide(&v, &ClusterConfig::default()),
            Some(Decision::Demote { .. })
        ));
    }

    #[test]
    fn standbys_are_kept_at_the_wanted_count_from_eligible_agents() {
        let config = ClusterConfig::default();
        // Two healthy standbys, one wanted: the most lagging leaves Raft.
        let mut v = view(&[1, 2, 3], &[4, 5]);
        v.lag.insert(4, 9);
        assert!(matches!(
            decide(&v, &config),
            Some(Decision::Retire { id: 4, .. })
        ));
        // Not while a voter seat is open or a voter is suspect.
        let mut v = view(&[1, 2], &[4, 5]);
        v.lag.insert(4, PROMOTE_MAX_LAG + 1);
        v.lag.insert(5, PROMOTE_MAX_LAG + 1);
        assert_eq!(decide(&v, &config), None);
        let mut v = view(&[1, 2, 3], &[4, 5]);
        v.dead_for.insert(2, Duration::from_millis(100));
        assert_eq!(decide(&v, &config), None);
        // No standby: an eligible agent is admitted, the first by name.
        let mut v = view(&[1, 2, 3], &[]);
        v.eligible.insert(7, info("n7"));
        v.eligible.insert(6, info("n6"));
        assert!(matches!(
            decide(&v, &config),
            Some(Decision::Admit { id: 6, .. })
        ));
        // A dead voter and no standby: admitting one comes first, so it can be promoted.
        let mut v = view(&[1, 2, 3], &[]);
        v.dead_for.insert(3, DEAD);
        v.eligible.insert(6, info("n6"));
        assert!(matches!(
            decide(&v, &config),
            Some(Decision::Admit { id: 6, .. })
        ));
        // Enough standbys: eligible agents stay agents.
        let mut v = view(&[1, 2, 3], &[4]);
        v.eligible.insert(6, info("n6"));
        assert_eq!(decide(&v, &config), None);
        // A suspect standby is not replaced before it is dead (then rule 5 removes it first).
        let mut v = view(&[1, 2, 3], &[4]);
        v.dead_for.insert(4, Duration::from_millis(100));
        v.eligible.insert(6, info("n6"));
        assert_eq!(decide(&v, &config), None);
        v.dead_for.insert(4, DEAD);
        assert!(matches!(
            decide(&v, &config),
            Some(Decision::Remove { id: 4, .. })
        ));
        let mut v = view(&[1, 2, 3], &[]);
        v.eligible.insert(6, info("n6"));
        v.dead_for.insert(1, DEAD); // the leader's own entry is ignored; still one to admit
        assert!(matches!(
            decide(&v, &config),
            Some(Decision::Admit { id: 6, .. })
        ));
    }

    #[test]
    fn a_dead_standby_is_removed_and_the_leader_is_never_targeted() {
        let config = ClusterConfig::default();
        let mut v = view(&[1, 2, 3], &[4]);
        v.dead_for.insert(4, DEAD);
        assert!(matches!(
            decide(&v, &config),
            Some(Decision::Remove { id: 4, .. })
        ));
        let mut v = view(&[1, 2, 3], &[4]);
        v.dead_for.insert(1, DEAD); // the leader's own entry: ignored
        assert_eq!(decide(&v, &config), None);
    }
}
