//! The engine's [`Coordinator`] for a cluster run, on the KV:
//!
//! - `${{ nodes.N.steps.ID.FIELD }}` waits, through a watch on `/eden/runs/<run>/nodes/N/`,
//!   for N's result of step ID (or N's end, which is an error: N finished without it).
//! - `target_limit: K`: once every targeted node has published its plan (or ended), the
//!   first K node names, in sorted order, of the nodes whose plan has the step run it; the
//!   others skip it with a comment naming them. Every node computes the same choice.
//! - `serialize: K`: K slot keys `/eden/runs/<run>/slots/<step>/<0..K>`, each taken with a
//!   create-if-absent transaction and attached to the holder's alive lease, so a node that
//!   dies frees its slot. A node that finds every slot taken waits on a watch for one to go.
//! - `sync: true`: after the step, a node waits until every node whose plan has the step has
//!   recorded a result for it, or has ended (finished, failed or lost).
//!
//! Every wait is bounded by the run's `wait_secs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use tokio::runtime::Handle;

use super::kv::{self, Kv};
use super::records::*;
use crate::engine::refs::StepRef;
use crate::engine::{Admission, Coordinator, Plan, PlanStep, StepResult};
use crate::error::{Error, Result};

pub struct KvCoordinator {
    kv: Kv,
    handle: Handle,
    run: String,
    me: String,
    lease: i64,
    wait: Duration,
    /// step id -> the slot key this node holds for it.
    slots: Mutex<HashMap<String, String>>,
    /// Published plans: node -> the step ids in its plan (None: the node ended without one).
    plans: Mutex<BTreeMap<String, Option<BTreeSet<String>>>>,
}

impl KvCoordinator {
    pub fn new(
        kv: Kv,
        handle: Handle,
        run: String,
        me: String,
        lease: i64,
        wait: Duration,
    ) -> KvCoordinator {
        KvCoordinator {
            kv,
            handle,
            run,
            me,
            lease,
            wait,
            slots: Mutex::new(HashMap::new()),
            plans: Mutex::new(BTreeMap::new()),
        }
    }

    fn timeout(&self, what: &str) -> Error {
        Error::Unavailable(format!(
            "{what}: still waiting after {}s (the run's wait limit)",
            self.wait.as_secs()
        ))
    }

    /// Calls `check` until it returns `Some`, re-checking after every change under `prefix`.
    async fn wait_for<T, F, Fut>(&self, what: &str, prefix: &str, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(Option<T>, i64)>>,
    {
        let deadline = tokio::time::Instant::now() + self.wait;
        let (first, rev) = check().await?;
        if let Some(v) = first {
            return Ok(v);
        }
        let mut watch = self.kv.watch(prefix, rev + 1);
        loop {
            match tokio::time::timeout_at(deadline, watch.recv()).await {
                Err(_) => return Err(self.timeout(what)),
                Ok(None) => return Err(Error::Unavailable(format!("{what}: the watch ended"))),
                Ok(Some(batch)) => {
                    batch?;
                }
            }
            if let (Some(v), _) = check().await? {
                return Ok(v);
            }
        }
    }

    async fn targets(&self) -> Result<Vec<String>> {
        let s = self
            .kv
            .get(&run_status_key(&self.run))
            .await?
            .ok_or_else(|| Error::NotFound(format!("run {} has no status", self.run)))?;
        let s: RunStatus = serde_json::from_slice(&s.value)?;
        Ok(s.nodes)
    }

    /// Node -> the step ids of its plan, for every targeted node; waits until each has
    /// published a plan or ended.
    async fn all_plans(&self) -> Result<BTreeMap<String, Option<BTreeSet<String>>>> {
        let nodes = self.targets().await?;
        let prefix = run_nodes_prefix(&self.run);
        self.wait_for("waiting for every node's plan", &prefix, || async {
            let mut rev = 0;
            for n in &nodes {
                if self
                    .plans
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(n)
                {
                    continue;
                }
                let (kvs, r) = self.kv.list(&format!("{prefix}{n}/plan")).await?;
                rev = rev.max(r);
                if let Some(p) = kvs.into_iter().next() {
                    let ids = serde_json::from_slice::<Plan>(&p.value)
                        .ok()
                        .map(|p| p.steps.into_iter().map(|s| s.id).collect());
                    self.plans
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(n.clone(), ids);
                    continue;
                }
                if let Some(s) = self.kv.get(&node_status_key(&self.run, n)).await? {
                    let s: NodeStatus = serde_json::from_slice(&s.value)?;
                    if s.is_final() {
                        self.plans
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(n.clone(), None);
                        continue;
                    }
                }
                return Ok((None, rev));
            }
            Ok((
                Some(self.plans.lock().unwrap_or_else(|e| e.into_inner()).clone()),
                rev,
            ))
        })
        .await
    }

    /// The nodes whose plan has `step`, sorted.
    async fn participants(&self, step: &str) -> Result<Vec<String>> {
        Ok(self
            .all_plans()
            .await?
            .into_iter()
            .filter(|(_, ids)| ids.as_ref().is_some_and(|s| s.contains(step)))
            .map(|(n, _)| n)
            .collect())
    }

    async fn node_ended(&self, node: &str) -> Result<Option<NodeStatus>> {
        match self.kv.get(&node_status_key(&self.run, node)).await? {
            Some(s) => {
                let s: NodeStatus = serde_json::from_slice(&s.value)?;
                Ok(s.is_final().then_some(s))
            }
            None => Ok(None),
        }
    }

    async fn remote_result(&self, node: &str, step: &str) -> Result<StepResult> {
        let nodes = self.targets().await?;
        if !nodes.iter().any(|n| n == node) {
            return Err(Error::NotFound(format!(
                "node {node:?} is not part of this run (its nodes: {})",
                nodes.join(", ")
            )));
        }
        let what = format!("waiting for step {step:?} on node {node}");
        let prefix = format!("{}{node}/", run_nodes_prefix(&self.run));
        self.wait_for(&what, &prefix, || async {
            let key = step_key(&self.run, node, step);
            let (kvs, rev) = self.kv.list(&key).await?;
            if let Some(kv_) = kvs.into_iter().find(|k| k.key == key.as_bytes()) {
                let r: StepResult = serde_json::from_slice(&kv_.value)?;
                return Ok((Some(r), rev));
            }
            if let Some(s) = self.node_ended(node).await? {
                return Err(Error::NotFound(format!(
                    "node {node} ended ({}) without a result for step {step:?}{}",
                    s.state,
                    if s.comment.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", s.comment)
                    }
                )));
            }
            Ok((None, rev))
        })
        .await
    }

    async fn take_slot(&self, step: &PlanStep, k: u32) -> Result<()> {
        let prefix = slots_prefix(&self.run, &step.id);
        let what = format!("waiting for a serialize slot for {}", step.id);
        let key = self
            .wait_for(&what, &prefix, || async {
                let mut rev = 0;
                for i in 0..k {
                    let key = format!("{prefix}{i}");
                    let r = self
                        .kv
                        .txn(crate::etcd::pb::etcdserverpb::TxnRequest {
                            compare: vec![kv::absent(&key)],
                            success: vec![kv::put_op(
                                &key,
                                self.me.as_bytes().to_vec(),
                                self.lease,
                            )],
                            failure: vec![],
                        })
                        .await?;
                    rev = r.header.map(|h| h.revision).unwrap_or(rev);
                    if r.succeeded {
                        return Ok((Some(key), rev));
                    }
                }
                Ok((None, rev))
            })
            .await?;
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(step.id.clone(), key);
        Ok(())
    }

    async fn barrier(&self, step: &str) -> Result<()> {
        let nodes = self.participants(step).await?;
        let what = format!("waiting for every node to finish {step:?} (sync)");
        let prefix = run_nodes_prefix(&self.run);
        self.wait_for(&what, &prefix, || async {
            let mut rev = 0;
            for n in &nodes {
                let key = step_key(&self.run, n, step);
                let (kvs, r) = self.kv.list(&key).await?;
                rev = rev.max(r);
                if kvs.iter().any(|k| k.key == key.as_bytes()) {
                    continue;
                }
                if self.node_ended(n).await?.is_some() {
                    continue;
                }
                return Ok((None, rev));
            }
            Ok((Some(()), rev))
        })
        .await
    }
}

/// The field a reference names, from a recorded result (as the engine reads local ones).
fn field(r: &StepRef, res: &StepResult) -> Result<Value> {
    let node = r.node.as_deref().unwrap_or("?");
    let full = format!("nodes.{node}.steps.{}.{}", r.step, r.path.join("."));
    let mut v = match r.path[0].as_str() {
        "result" => res.result.map(Value::Bool).unwrap_or(Value::Null),
        "changes" => res.changes.clone(),
        "comment" => Value::String(res.comment.clone()),
        "name" => Value::String(res.name.clone()),
        "id" => Value::String(res.id.clone()),
        "duration_ms" => Value::from(res.duration_ms),
        other => match res.outputs.get(other) {
            Some(v) => v.clone(),
            None if res.result == Some(false) => {
                return Err(Error::InvalidInput(format!(
                    "{full} is not available: the step failed on {node}: {}",
                    res.comment
                )))
            }
            None => {
                return Err(Error::InvalidInput(format!(
                    "{full} is not available: {} has no output {other:?} on {node} ({})",
                    r.step, res.comment
                )))
            }
        },
    };
    for key in &r.path[1..] {
        v = match &v {
            Value::Object(m) => m.get(key).cloned(),
            Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i).cloned()),
            _ => None,
        }
        .ok_or_else(|| Error::InvalidInput(format!("{full}: no key {key:?} in {v}")))?;
    }
    Ok(v)
}

impl Coordinator for KvCoordinator {
    fn remote(&self, r: &StepRef) -> Result<Value> {
        let node = r
            .node
            .as_deref()
            .ok_or_else(|| Error::Internal("remote() called for a local reference".into()))?;
        let res = self.handle.block_on(self.remote_result(node, &r.step))?;
        field(r, &res)
    }

    fn enter(&self, step: &PlanStep) -> Result<Admission> {
        self.handle.block_on(async {
            if let Some(k) = step.target_limit {
                let chosen: Vec<String> = self
                    .participants(&step.id)
                    .await?
                    .into_iter()
                    .take(k as usize)
                    .collect();
                if !chosen.contains(&self.me) {
                    return Ok(Admission::Skip(format!(
                        "target_limit {k}: runs on {} only",
                        chosen.join(", ")
                    )));
                }
            }
            if let Some(k) = step.serialize {
                self.take_slot(step, k.max(1)).await?;
            }
            Ok(Admission::Run)
        })
    }

    fn leave(&self, step: &PlanStep, result: &StepResult) -> Result<()> {
        self.handle.block_on(async {
            let slot = self
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&step.id);
            if let Some(key) = slot {
                if let Err(e) = self.kv.delete(&key).await {
                    tracing::warn!(%key, "releasing a serialize slot: {e}");
                }
            }
            if step.sync {
                // The step's own result must be visible to the others before waiting on them.
                let key = step_key(&self.run, &self.me, &step.id);
                if let Ok(v) = serde_json::to_vec(result) {
                    let _ = self.kv.put(&key, v, 0).await;
                }
                self.barrier(&step.id).await?;
            }
            Ok(())
        })
    }
}
