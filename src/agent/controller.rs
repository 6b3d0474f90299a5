//! The run controller. It runs on every datastore node and acts only while that node is the
//! Raft leader, so exactly one acts at a time; everything it knows is in the KV, so a new
//! leader's controller picks up where the old one stopped ([`lead`] starts by reading every
//! unfinished run).
//!
//! For each run it:
//! 1. resolves the target expression against `/eden/nodes/` ([`nodes`], [`resolve`]) and writes,
//!    in one transaction guarded on the status not existing yet, the run's status (`running`,
//!    with its node list) and one assignment per live node; a node that matches but is down is
//!    marked `lost` at once;
//! 2. marks a node `lost` when its alive key (attached to its agent's lease) has been gone for
//!    [`LOST_AFTER`] while it still runs ([`check_lost`]);
//! 3. writes the final status (`done`, or `failed` if any node failed or was lost) once every
//!    node has ended ([`advance`]).
//!
//! Every write is a transaction guarded on what it read, so a deposed leader that still runs
//! for a moment cannot undo its successor's work.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::kv::{self, Kv};
use super::records::*;
use super::target;
use crate::error::{Error, Result};
use crate::etcd::pb::etcdserverpb::TxnRequest;
use eden_raft::RaftNode;

/// How long a running node's alive key must stay gone before the node is reported lost (on top
/// of the alive lease's TTL).
pub const LOST_AFTER: Duration = Duration::from_secs(1);

/// One node as the KV describes it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub record: Option<NodeRecord>,
    pub facts: Map<String, Value>,
    pub alive: bool,
}

impl NodeView {
    pub fn labels(&self) -> Map<String, Value> {
        self.record
            .as_ref()
            .map(|r| {
                r.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Every node under `/eden/nodes/`.
pub async fn nodes(kv: &Kv) -> Result<BTreeMap<String, NodeView>> {
    let (kvs, _) = kv.list(NODES).await?;
    let mut out: BTreeMap<String, NodeView> = BTreeMap::new();
    for item in kvs {
        let key = String::from_utf8_lossy(&item.key).into_owned();
        let rest = &key[NODES.len()..];
        let mut parts = rest.splitn(2, '/');
        let name = parts.next().unwrap_or_default().to_string();
        let sub = parts.next();
        let view = out.entry(name).or_insert(NodeView {
            record: None,
            facts: Map::new(),
            alive: false,
        });
        match sub {
            None => view.record = serde_json::from_slice(&item.value).ok(),
            Some("facts") => view.facts = serde_json::from_slice(&item.value).unwrap_or_default(),
            Some("alive") => view.alive = true,
            _ => {}
        }
    }
    out.retain(|_, v| v.record.is_some());
    Ok(out)
}

/// The names `expr` selects, sorted.
pub fn resolve(expr: &str, nodes: &BTreeMap<String, NodeView>) -> Result<Vec<String>> {
    let e = target::parse(expr)?;
    Ok(nodes
        .iter()
        .filter(|(name, v)| e.matches(name, &v.labels(), &v.facts))
        .map(|(n, _)| n.clone())
        .collect())
}

/// Runs the controller while this node leads, forever.
pub async fn run(node: Arc<RaftNode>, kv: Kv) {
    loop {
        while !node.is_leader() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let term = node.metrics().term;
        let still_leader = {
            let node = node.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if !node.is_leader() || node.metrics().term != term {
                        return;
                    }
                }
            }
        };
        tokio::select! {
            r = lead(&kv) => {
                if let Err(e) = r {
                    tracing::warn!("run controller: {e}; starting over");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            _ = still_leader => tracing::info!("run controller: no longer the leader"),
        }
    }
}

/// Per-run memory of the controller: when each running node's alive key was first seen gone.
#[derive(Default)]
struct Tracking {
    missing_since: HashMap<String, Instant>,
}

async fn lead(kv: &Kv) -> Result<()> {
    // Events are kept for a day, as the agents' are.
    let lease = kv.grant(super::EVENT_TTL).await?;
    EVENT_LEASE.store(lease, std::sync::atomic::Ordering::Relaxed);
    let (keys, rev) = kv
        .range(crate::etcd::pb::etcdserverpb::RangeRequest {
            key: RUNS.as_bytes().to_vec(),
            range_end: kv::prefix_end(RUNS.as_bytes()),
            keys_only: true,
            ..Default::default()
        })
        .await
        .map(|r| {
            let rev = r.header.map(|h| h.revision).unwrap_or(0);
            (r.kvs, rev)
        })?;
    let mut active: BTreeMap<String, Tracking> = BTreeMap::new();
    for k in keys {
        if let RunKey::Request(run) = parse_run_key(&k.key) {
            active.insert(run, Tracking::default());
        }
    }
    tracing::info!(runs = active.len(), "run controller: leading");
    let runs: Vec<String> = active.keys().cloned().collect();
    for run in runs {
        if advance(kv, &run, active.get_mut(&run)).await? {
            active.remove(&run);
        }
    }
    let mut watch = kv.watch(RUNS, rev + 1);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            batch = watch.recv() => {
                let Some(batch) = batch else {
                    return Err(Error::Unavailable("the runs watch ended".into()));
                };
                let mut touched: Vec<String> = Vec::new();
                for ev in batch? {
                    if !ev.put {
                        continue;
                    }
                    match parse_run_key(&ev.kv.key) {
                        RunKey::Request(run) => {
                            active.entry(run.clone()).or_default();
                            touched.push(run);
                        }
                        RunKey::NodeStatus(run, _) if active.contains_key(&run) => touched.push(run),
                        _ => {}
                    }
                }
                touched.dedup();
                for run in touched {
                    if advance(kv, &run, active.get_mut(&run)).await? {
                        active.remove(&run);
                    }
                }
            }
            _ = tick.tick() => {
                let runs: Vec<String> = active.keys().cloned().collect();
                for run in runs {
                    if advance(kv, &run, active.get_mut(&run)).await? {
                        active.remove(&run);
                    }
                }
            }
        }
    }
}

/// Moves one run along. True when the run has ended.
async fn advance(kv: &Kv, run: &str, tracking: Option<&mut Tracking>) -> Result<bool> {
    let Some(req_kv) = kv.get(&request_key(run)).await? else {
        return Ok(true);
    };
    let status_kv = kv.get(&run_status_key(run)).await?;
    let Some(status_kv) = status_kv else {
        let req: RunRequest = match serde_json::from_slice(&req_kv.value) {
            Ok(r) => r,
            Err(e) => {
                let status = RunStatus {
                    state: "failed".into(),
                    nodes: vec![],
                    comment: format!("the run request is not valid: {e}"),
                    summary: Value::Null,
                    updated_ms: now_ms(),
                };
                kv.create(&run_status_key(run), serde_json::to_vec(&status)?, 0)
                    .await?;
                return Ok(true);
            }
        };
        start(kv, &req).await?;
        return Ok(false);
    };
    let status: RunStatus = serde_json::from_slice(&status_kv.value)
        .map_err(|e| Error::InvalidData(format!("run {run}: bad status: {e}")))?;
    if status.is_final() {
        return Ok(true);
    }
    let mut tracking_default = Tracking::default();
    let tracking = tracking.unwrap_or(&mut tracking_default);
    let mut states: BTreeMap<String, Option<(NodeStatus, i64)>> = BTreeMap::new();
    for n in &status.nodes {
        let s = kv.get(&node_status_key(run, n)).await?;
        states.insert(
            n.clone(),
            match s {
                Some(s) => Some((serde_json::from_slice(&s.value)?, s.mod_revision)),
                None => None,
            },
        );
    }
    // Lost: running (or not yet started) nodes whose alive key is gone.
    for (n, s) in states.iter_mut() {
        if s.as_ref().is_some_and(|(s, _)| s.is_final()) {
            tracking.missing_since.remove(n);
            continue;
        }
        let alive = kv.get(&alive_key(n)).await?.is_some();
        if alive {
            tracking.missing_since.remove(n);
            continue;
        }
        let since = *tracking
            .missing_since
            .entry(n.clone())
            .or_insert_with(Instant::now);
        if since.elapsed() < LOST_AFTER {
            continue;
        }
        let lost = NodeStatus {
            state: "lost".into(),
            comment: format!(
                "node {n} stopped answering during the run (its alive key expired); its steps \
                 may be half done"
            ),
            total: s.as_ref().map(|(s, _)| s.total).unwrap_or(0),
            summary: s
                .as_ref()
                .map(|(s, _)| s.summary.clone())
                .unwrap_or(Value::Null),
            updated_ms: now_ms(),
        };
        let key = node_status_key(run, n);
        let guard = match s {
            Some((_, rev)) => kv::unchanged_since(&key, *rev),
            None => kv::absent(&key),
        };
        let r = kv
            .txn(TxnRequest {
                compare: vec![guard],
                success: vec![
                    kv::put_op(&key, serde_json::to_vec(&lost)?, 0),
                    event_op("node.lost", run, n, &lost.comment)?,
                ],
                failure: vec![],
            })
            .await?;
        if r.succeeded {
            tracing::warn!(%run, node = %n, "node lost during the run");
            *s = Some((lost, 0));
        }
    }
    if states
        .values()
        .all(|s| s.as_ref().is_some_and(|(s, _)| s.is_final()))
    {
        finish(kv, run, &status, status_kv.mod_revision, &states).await?;
        return Ok(true);
    }
    Ok(false)
}

fn event_op(
    kind: &str,
    run: &str,
    node: &str,
    comment: &str,
) -> Result<crate::etcd::pb::etcdserverpb::RequestOp> {
    let e = Event {
        time_ms: now_ms(),
        node: node.to_string(),
        kind: kind.into(),
        run: run.into(),
        step: String::new(),
        result: None,
        comment: comment.into(),
    };
    Ok(kv::put_op(
        event_key("controller", next_seq()),
        serde_json::to_vec(&e)?,
        EVENT_LEASE.load(std::sync::atomic::Ordering::Relaxed),
    ))
}

/// The lease the controller's events are attached to while it leads (0 until granted).
static EVENT_LEASE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

fn next_seq() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Resolves the targets and writes the status and the assignments.
async fn start(kv: &Kv, req: &RunRequest) -> Result<()> {
    let all = nodes(kv).await?;
    let status_key = run_status_key(&req.id);
    let targets = match resolve(&req.target, &all) {
        Ok(t) => t,
        Err(e) => {
            let status = RunStatus {
                state: "failed".into(),
                nodes: vec![],
                comment: format!("bad target {:?}: {e}", req.target),
                summary: Value::Null,
                updated_ms: now_ms(),
            };
            kv.create(&status_key, serde_json::to_vec(&status)?, 0)
                .await?;
            return Ok(());
        }
    };
    if targets.is_empty() {
        let status = RunStatus {
            state: "failed".into(),
            nodes: vec![],
            comment: format!(
                "target {:?} matched no node (known nodes: {}); check it with `eden apply \
                 --target EXPR --dry-targets`",
                req.target,
                all.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            summary: Value::Null,
            updated_ms: now_ms(),
        };
        kv.create(&status_key, serde_json::to_vec(&status)?, 0)
            .await?;
        return Ok(());
    }
    let status = RunStatus {
        state: "running".into(),
        nodes: targets.clone(),
        comment: String::new(),
        summary: Value::Null,
        updated_ms: now_ms(),
    };
    let mut ops = vec![kv::put_op(&status_key, serde_json::to_vec(&status)?, 0)];
    for n in &targets {
        if all.get(n).is_some_and(|v| v.alive) {
            ops.push(kv::put_op(
                assigned_key(n, &req.id),
                json!({"run": req.id}).to_string().into_bytes(),
                0,
            ));
        } else {
            let lost = NodeStatus {
                state: "lost".into(),
                comment: format!("node {n} matched the target but was down when the run started"),
                total: 0,
                summary: Value::Null,
                updated_ms: now_ms(),
            };
            ops.push(kv::put_op(
                node_status_key(&req.id, n),
                serde_json::to_vec(&lost)?,
                0,
            ));
        }
    }
    ops.push(event_op(
        "run.assigned",
        &req.id,
        "controller",
        &format!("{} node(s): {}", targets.len(), targets.join(", ")),
    )?);
    // Large fleets: the status and the first assignments go together; the rest follow.
    let mut chunks = ops.chunks(120);
    let first = chunks.next().unwrap_or(&[]).to_vec();
    let r = kv
        .txn(TxnRequest {
            compare: vec![kv::absent(&status_key)],
            success: first,
            failure: vec![],
        })
        .await?;
    if !r.succeeded {
        return Ok(());
    }
    for chunk in chunks {
        kv.txn(TxnRequest {
            compare: vec![],
            success: chunk.to_vec(),
            failure: vec![],
        })
        .await?;
    }
    tracing::info!(run = %req.id, nodes = targets.len(), "run assigned");
    Ok(())
}

async fn finish(
    kv: &Kv,
    run: &str,
    status: &RunStatus,
    status_rev: i64,
    states: &BTreeMap<String, Option<(NodeStatus, i64)>>,
) -> Result<()> {
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    let (mut steps, mut failed_steps, mut changed) = (0u64, 0u64, 0u64);
    for (s, _) in states.values().flatten() {
        *by_state.entry(s.state.clone()).or_default() += 1;
        steps += s.summary["total"].as_u64().unwrap_or(0);
        failed_steps += s.summary["failed"].as_u64().unwrap_or(0);
        changed += s.summary["changed"].as_u64().unwrap_or(0);
    }
    let ok = by_state.keys().all(|k| k == "done");
    let final_status = RunStatus {
        state: if ok { "done" } else { "failed" }.into(),
        nodes: status.nodes.clone(),
        comment: by_state
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        summary: json!({
            "nodes": by_state,
            "steps": steps,
            "failed": failed_steps,
            "changed": changed,
        }),
        updated_ms: now_ms(),
    };
    let key = run_status_key(run);
    kv.txn(TxnRequest {
        compare: vec![kv::unchanged_since(&key, status_rev)],
        success: vec![
            kv::put_op(&key, serde_json::to_vec(&final_status)?, 0),
            event_op("run.finished", run, "controller", &final_status.comment)?,
        ],
        failure: vec![],
    })
    .await?;
    Ok(())
}
