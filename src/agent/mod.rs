//! agent: what runs states on a node during a cluster run, and the leader's run controller.
//!
//! Everything goes through the etcd API ([`kv::Kv`]), with the key layout of [`records`]:
//!
//! 1. The CLI stores the state tree as blobs ([`blobs::upload`]) and writes
//!    `/eden/runs/<id>/request` (`cli::runs::submit`).
//! 2. The run controller on the Raft leader ([`controller::run`]) sees the request through a
//!    watch, resolves the target expression ([`target`]) against every node's record, facts and
//!    liveness, and writes the run's status with its node list and one assignment per node
//!    (`/eden/nodes/<node>/assigned/<id>`), in one transaction.
//! 3. Each node's agent ([`Agent::run`]) watches its own assignments. For a new one it reads
//!    the request and the blobs ([`blobs::BlobTree`]), renders and compiles the plan with its
//!    own facts ([`Agent::execute`]), publishes the plan, runs it (the engine on a blocking
//!    thread, with a [`coord::KvCoordinator`] for cross-node values and step gates), and
//!    writes each step's result and an event as the step finishes, then its node status.
//! 4. The controller sees node statuses and writes the run's final status. A node whose alive
//!    key (attached to its agent's lease) disappears while it runs is marked `lost`, so the run
//!    ends instead of waiting forever. A new leader's controller resumes from the KV.
//! 5. The CLI follows `/eden/runs/<id>/` with a watch and prints progress and a summary.

pub mod blobs;
pub mod controller;
pub mod coord;
pub mod facts;
pub mod kv;
pub mod records;
pub mod target;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::engine::{self, Context, Mode, NodeInfo, RunOptions, StepResult};
use crate::error::{Error, Result};
use crate::modules::{Registry, SourceTree};
use kv::Kv;
use records::*;

/// The agent's lease: its alive key and `serialize` slots go when it stops renewing.
pub const ALIVE_TTL: i64 = 6;
/// How often the lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// Events are kept for a day.
pub const EVENT_TTL: i64 = 24 * 3600;

/// One node's agent.
pub struct Agent {
    pub record: NodeRecord,
    kv: Kv,
    /// The alive lease; 0 until granted.
    lease: AtomicU64,
    event_lease: AtomicU64,
    seq: AtomicU64,
    /// Runs being executed here.
    active: Mutex<BTreeSet<String>>,
}

impl Agent {
    pub fn new(record: NodeRecord, kv: Kv) -> Arc<Agent> {
        Arc::new(Agent {
            record,
            kv,
            lease: AtomicU64::new(0),
            event_lease: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            active: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Relaxed) as i64
    }

    /// Registers the node, keeps its lease alive, and runs every assignment, until the task is
    /// aborted.
    pub async fn run(self: Arc<Self>) {
        loop {
            match self.clone().register().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!("agent: registering {}: {e}; retrying", self.name());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        tokio::spawn(self.clone().keep_alive());
        loop {
            if let Err(e) = self.clone().follow_assignments().await {
                tracing::warn!("agent {}: following assignments: {e}", self.name());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    async fn register(self: Arc<Self>) -> Result<()> {
        let lease = self.kv.grant(ALIVE_TTL).await?;
        self.lease.store(lease as u64, Ordering::Relaxed);
        let event_lease = self.kv.grant(EVENT_TTL).await?;
        self.event_lease
            .store(event_lease as u64, Ordering::Relaxed);
        let facts = facts::gather(&self.record);
        self.kv
            .put(&node_key(self.name()), serde_json::to_vec(&self.record)?, 0)
            .await?;
        self.kv
            .put(&facts_key(self.name()), serde_json::to_vec(&facts)?, 0)
            .await?;
        self.kv
            .put(
                &alive_key(self.name()),
                json!({"since_ms": now_ms()}).to_string(),
                lease,
            )
            .await?;
        tracing::info!(node = %self.name(), "agent registered");
        Ok(())
    }

    /// Renews the alive lease; a lease that expired anyway (a long pause, a lost quorum) is
    /// replaced and the alive key written again.
    async fn keep_alive(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RENEW_EVERY);
        let mut renewals = 0u64;
        loop {
            tick.tick().await;
            let lease = self.lease();
            match self.kv.keep_alive_once(lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(node = %self.name(), "alive lease expired; registering again");
                    if let Err(e) = self.clone().register().await {
                        tracing::warn!("agent: registering again: {e}");
                    }
                }
                Err(e) => tracing::debug!("agent: renewing the alive lease: {e}"),
            }
            renewals += 1;
            // Renew the event lease now and then, so events stay for EVENT_TTL after the last.
            if renewals.is_multiple_of(600) {
                if let Ok(l) = self.kv.grant(EVENT_TTL).await {
                    self.event_lease.store(l as u64, Ordering::Relaxed);
                }
            }
        }
    }

    async fn follow_assignments(self: Arc<Self>) -> Result<()> {
        let prefix = assigned_prefix(self.name());
        let (existing, rev) = self.kv.list(&prefix).await?;
        for kv_ in existing {
            self.clone().assigned(&kv_.key);
        }
        let mut watch = self.kv.watch(&prefix, rev + 1);
        while let Some(batch) = watch.recv().await {
            for ev in batch? {
                if ev.put {
                    self.clone().assigned(&ev.kv.key);
                }
            }
        }
        Ok(())
    }

    fn assigned(self: Arc<Self>, key: &[u8]) {
        let key = String::from_utf8_lossy(key);
        let Some(run) = key.rsplit('/').next().map(str::to_string) else {
            return;
        };
        if !self
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(run.clone())
        {
            return;
        }
        tokio::spawn(async move {
            if let Err(e) = self.clone().execute(&run).await {
                tracing::warn!(node = %self.name(), %run, "run failed on this node: {e}");
                let _ = self
                    .finish(
                        &run,
                        NodeStatus {
                            state: "failed".into(),
                            comment: e.to_string(),
                            total: 0,
                            summary: Value::Null,
                            updated_ms: now_ms(),
                        },
                    )
                    .await;
            }
        });
    }

    /// Records an event (best effort: a run does not fail because its event was not written).
    pub async fn event(
        &self,
        kind: &str,
        run: &str,
        step: &str,
        result: Option<bool>,
        comment: &str,
    ) {
        let e = Event {
            time_ms: now_ms(),
            node: self.name().to_string(),
            kind: kind.into(),
            run: run.into(),
            step: step.into(),
            result,
            comment: comment.into(),
        };
        let key = event_key(self.name(), self.seq.fetch_add(1, Ordering::Relaxed));
        let lease = self.event_lease.load(Ordering::Relaxed) as i64;
        if let Ok(v) = serde_json::to_vec(&e) {
            if let Err(err) = self.kv.put(&key, v, lease).await {
                tracing::debug!("writing event {key}: {err}");
            }
        }
    }

    async fn finish(&self, run: &str, status: NodeStatus) -> Result<()> {
        let kind = "run.finished";
        let comment = if status.comment.is_empty() {
            format!("{}", status.summary)
        } else {
            status.comment.clone()
        };
        self.kv
            .put(
                &node_status_key(run, self.name()),
                serde_json::to_vec(&status)?,
                0,
            )
            .await?;
        self.event(kind, run, "", Some(status.state == "done"), &comment)
            .await;
        // The assignment only triggers the run; the status says how it ended.
        self.kv.delete(&assigned_key(self.name(), run)).await?;
        Ok(())
    }

    /// Runs one assignment on this node, start to end.
    pub async fn execute(self: Arc<Self>, run: &str) -> Result<()> {
        let me = self.name().to_string();
        if let Some(s) = self.kv.get(&node_status_key(run, &me)).await? {
            let status: NodeStatus = serde_json::from_slice(&s.value)?;
            if status.is_final() {
                return Ok(());
            }
            // Running, but not by this process: the node restarted during the run.
            return self
                .finish(
                    run,
                    NodeStatus {
                        state: "failed".into(),
                        comment: "the node restarted during the run; its steps may be half \
                                  done: apply again"
                            .into(),
                        total: status.total,
                        summary: status.summary,
                        updated_ms: now_ms(),
                    },
                )
                .await;
        }
        let req = self
            .kv
            .get(&request_key(run))
            .await?
            .ok_or_else(|| Error::NotFound(format!("run {run} has no request")))?;
        let req: RunRequest = serde_json::from_slice(&req.value)
            .map_err(|e| Error::InvalidData(format!("run {run}: bad request: {e}")))?;
        let mode: Mode = req.mode.parse()?;
        let tree = Arc::new(blobs::BlobTree::fetch(&self.kv, &req.source).await?);
        let facts_kv = self.kv.get(&facts_key(&me)).await?;
        let facts: Map<String, Value> = facts_kv
            .and_then(|f| serde_json::from_slice(&f.value).ok())
            .unwrap_or_default();
        let labels: Map<String, Value> = self
            .record
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let vars = vars_from_tree(tree.as_ref(), &me)?;
        let mut eden = Map::new();
        eden.insert("mode".into(), json!(mode.to_string()));
        eden.insert("test".into(), json!(req.test));
        eden.insert("local".into(), json!(false));
        eden.insert("cluster".into(), json!(true));
        eden.insert("run".into(), json!(run));
        let ctx = Context {
            node: NodeInfo {
                name: me.clone(),
                labels,
                facts,
            },
            vars,
            eden,
        };
        // Extension modules travel in the tree (`_modules/`), verified before every call
        // against the keys the cluster trusts (`module_keys` in /eden/cluster/config).
        let trusted = match self.kv.get(crate::modules::ext::CLUSTER_CONFIG).await? {
            Some(c) => serde_json::from_slice::<Value>(&c.value)
                .ok()
                .map(|v| crate::modules::ext::TrustedKeys::from_cluster_config(&v))
                .transpose()?
                .unwrap_or_default(),
            None => crate::modules::ext::TrustedKeys::default(),
        };
        let trusted = Arc::new(trusted);
        let mut registry = Registry::builtin();
        crate::modules::ext::register_modules_in(
            &mut registry,
            tree.as_ref(),
            tree.paths().cloned().collect::<Vec<_>>().into_iter(),
            trusted.clone(),
        )?;
        self.register_stored_modules(&mut registry, trusted).await?;
        let sls = req.sls.clone();
        let plan = {
            let tree = tree.clone();
            let registry = registry.clone();
            tokio::task::spawn_blocking(move || {
                engine::plan(tree as Arc<dyn SourceTree>, &sls, &ctx, &registry, mode)
            })
            .await
            .map_err(|e| Error::Internal(format!("plan task: {e}")))?
        };
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                self.kv
                    .put(
                        &plan_key(run, &me),
                        json!({"error": e.to_string()}).to_string(),
                        0,
                    )
                    .await?;
                return self
                    .finish(
                        run,
                        NodeStatus {
                            state: "failed".into(),
                            comment: format!("the states do not compile here: {e}"),
                            total: 0,
                            summary: Value::Null,
                            updated_ms: now_ms(),
                        },
                    )
                    .await;
            }
        };
        // `source: kv:///KEY` reads a key of the datastore: read now, for the whole run.
        for step in &plan.steps {
            let Some(Value::String(src)) = step.args.get("source") else {
                continue;
            };
            if let Some(key) = src.strip_prefix("kv://") {
                if let Some(v) = self.kv.get(key).await? {
                    tree.add_key(key, v.value);
                }
            }
        }
        let total = plan.steps.iter().filter(|s| !s.is_check()).count();
        self.kv
            .txn(crate::etcd::pb::etcdserverpb::TxnRequest {
                compare: vec![],
                success: vec![
                    kv::put_op(plan_key(run, &me), serde_json::to_vec(&plan)?, 0),
                    kv::put_op(
                        node_status_key(run, &me),
                        serde_json::to_vec(&NodeStatus {
                            state: "running".into(),
                            comment: String::new(),
                            total,
                            summary: Value::Null,
                            updated_ms: now_ms(),
                        })?,
                        0,
                    ),
                ],
                failure: vec![],
            })
            .await?;
        self.event("run.started", run, "", None, &format!("{total} steps"))
            .await;

        // Results go from the engine's thread to a writer task, which batches them: the first
        // batch goes out at once, later ones at most every RESULT_INTERVAL, and the plan's last
        // step ends the wait. Every batch is one txn, so one Raft entry on every datastore node.
        let (tx, mut rx) = mpsc::unbounded_channel::<(StepResult, bool)>();
        let writer = {
            let agent = self.clone();
            let run = run.to_string();
            tokio::spawn(async move {
                let mut next = tokio::time::Instant::now();
                while let Some((first, mut last)) = rx.recv().await {
                    let mut batch = vec![first];
                    while !last {
                        tokio::select! {
                            _ = tokio::time::sleep_until(next) => break,
                            more = rx.recv() => match more {
                                Some((r, l)) => {
                                    batch.push(r);
                                    last = l;
                                }
                                None => break,
                            },
                        }
                    }
                    while let Ok((more, _)) = rx.try_recv() {
                        batch.push(more);
                    }
                    next = tokio::time::Instant::now() + RESULT_INTERVAL;
                    agent.write_results(&run, &batch).await;
                }
            })
        };
        let coordinator = Arc::new(coord::KvCoordinator::new(
            self.kv.clone(),
            tokio::runtime::Handle::current(),
            run.to_string(),
            me.clone(),
            self.lease(),
            Duration::from_secs(req.wait_secs),
        ));
        let opts = RunOptions {
            test: req.test,
            jobs: req.jobs.max(1),
            coordinator: Some(coordinator),
        };
        let started = std::time::Instant::now();
        let results = {
            let tree = tree.clone();
            let plan = plan.clone();
            tokio::task::spawn_blocking(move || {
                let observer = Forward(Mutex::new(tx));
                engine::run::run(&plan, &registry, tree.as_ref(), &opts, &observer)
            })
            .await
            .map_err(|e| Error::Internal(format!("run task: {e}")))?
        };
        let _ = writer.await;
        let total_ms = started.elapsed().as_secs_f64() * 1000.0;
        let summary = crate::cli::apply::summary(&results, total_ms, mode, req.test);
        let failed = summary["failed"].as_u64().unwrap_or(0) > 0;
        self.finish(
            run,
            NodeStatus {
                state: if failed { "failed" } else { "done" }.into(),
                comment: String::new(),
                total,
                summary,
                updated_ms: now_ms(),
            },
        )
        .await
    }

    /// Registers the modules stored with `eden module add` (`/eden/modules/<name>`); a tree
    /// module of the same name wins. Each is verified before every call, like the tree's.
    async fn register_stored_modules(
        &self,
        registry: &mut Registry,
        trusted: Arc<crate::modules::ext::TrustedKeys>,
    ) -> Result<()> {
        use crate::modules::ext::{ExtModule, ModuleRecord, MODULES_PREFIX};
        let (records, _) = self.kv.list(MODULES_PREFIX).await?;
        for item in records {
            let key = String::from_utf8_lossy(&item.key).into_owned();
            let name = key[MODULES_PREFIX.len()..].to_string();
            if name.contains('/') || registry.get(&name).is_some() {
                continue;
            }
            let registered = async {
                let rec = ModuleRecord::parse(&item.value, &name)?;
                let blob = match rec.blob_key() {
                    Some(k) => self.kv.get(&k).await?.map(|kv| kv.value),
                    None => None,
                };
                let outputs = rec.signature.outputs.clone();
                let source = rec.into_source(blob)?;
                ExtModule::new(&name, source, trusted.clone(), &outputs)
            }
            .await;
            match registered {
                Ok(m) => registry.register(Arc::new(m)),
                Err(e) => tracing::warn!(module = %name, "stored module not offered: {e}"),
            }
        }
        Ok(())
    }

    async fn write_results(&self, run: &str, batch: &[StepResult]) {
        let me = self.name();
        let lease = self.event_lease.load(Ordering::Relaxed) as i64;
        let mut ops = Vec::new();
        for r in batch {
            let Ok(v) = serde_json::to_vec(r) else {
                continue;
            };
            ops.push(kv::put_op(step_key(run, me, &r.id), v, 0));
            let e = Event {
                time_ms: now_ms(),
                node: me.to_string(),
                kind: "step.finished".into(),
                run: run.into(),
                step: r.id.clone(),
                result: r.result,
                comment: r.comment.lines().next().unwrap_or("").to_string(),
            };
            if let Ok(v) = serde_json::to_vec(&e) {
                ops.push(kv::put_op(
                    event_key(me, self.seq.fetch_add(1, Ordering::Relaxed)),
                    v,
                    lease,
                ));
            }
        }
        // A txn holds at most 128 operations.
        for chunk in ops.chunks(128) {
            let req = crate::etcd::pb::etcdserverpb::TxnRequest {
                compare: vec![],
                success: chunk.to_vec(),
                failure: vec![],
            };
            if let Err(e) = self.kv.txn(req).await {
                tracing::warn!(%run, "writing step results: {e}");
            }
        }
    }
}

/// How long a node's agent gathers step results before writing the next batch. Fewer, larger
/// batches cost the datastore nodes less per step (one Raft entry, fsync and apply per batch);
/// the CLI's progress and other nodes waiting on a step see it at most this much later.
const RESULT_INTERVAL: Duration = Duration::from_millis(50);

/// Sends each finished step to the writer task, marking the plan's last one.
struct Forward(Mutex<mpsc::UnboundedSender<(StepResult, bool)>>);

impl engine::Observer for Forward {
    fn finished(&self, r: &StepResult, done: usize, total: usize) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((r.clone(), done >= total));
    }
}

/// Where `eden apply --vars FILE...` puts the merged files in a cluster run's tree (a
/// dot-directory, which a local tree never uploads).
pub const CLI_VARS: &str = ".eden/vars.yaml";

/// Variables for a node from any state tree: `vars/common.yaml`, then `vars/nodes/NAME.yaml`,
/// then the `--vars` files ([`CLI_VARS`]); maps merge deeply, later files win.
pub fn vars_from_tree(tree: &dyn SourceTree, node: &str) -> Result<Value> {
    let mut vars = Value::Object(Map::new());
    for path in [
        "vars/common.yaml".to_string(),
        format!("vars/nodes/{node}.yaml"),
        CLI_VARS.to_string(),
    ] {
        let text = match tree.read(&path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(Error::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let v: Value = serde_yaml::from_str(&text)
            .map_err(|e| Error::InvalidInput(format!("vars file {path}: not valid YAML: {e}")))?;
        crate::cli::apply::merge_deep(&mut vars, v);
    }
    Ok(vars)
}

/// A one-state tree for `eden run MODULE.FUNCTION args`: the step is named `run`.
pub fn adhoc_tree(
    function: &str,
    args: &Map<String, Value>,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut list: Vec<Value> = Vec::new();
    for (k, v) in args {
        list.push(json!({ k.clone(): v.clone() }));
    }
    let sls = json!({ "run": { function: list } });
    let text = serde_yaml::to_string(&sls).unwrap_or_default();
    std::collections::BTreeMap::from([("run.sls".to_string(), text.into_bytes())])
}
