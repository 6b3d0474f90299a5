//! Cross-node orchestration in the engine: `serialize`, `sync`, `target_limit` and
//! `${{ nodes.N.steps.ID.FIELD }}`, with several nodes simulated as threads in this process.
//!
//! Each node is a thread that compiles its own plan (with its own node name in the Jinja
//! context) and runs it with the real engine and the real `cmd` and `test` modules. The nodes
//! share one in-memory [`Cluster`], which plays the datastore: every node's observer publishes
//! its step results to it, and each node's [`NodeCoord`] answers the engine's `remote`,
//! `enter` and `leave` from it, blocking on a condition variable as a watch would.
//!
//! Intervals are taken from the commands themselves (`date +%s%N` before and after), and the
//! tests assert on their order only. Some commands sleep briefly: not to measure anything, but
//! so that an engine that ignored the options would visibly overlap the nodes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::Duration;

use eden::engine::run::run;
use eden::engine::{
    self, refs::StepRef, Admission, Context, Coordinator, Mode, NodeInfo, Observer, PlanStep,
    Quiet, RunOptions, StepResult,
};
use eden::error::{Error, Result};
use eden::modules::{Registry, SourceTree};
use serde_json::{json, Map, Value};

/// A state tree held in memory.
struct MemTree(Vec<(String, String)>);
impl SourceTree for MemTree {
    fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.0
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, t)| t.clone().into_bytes())
            .ok_or_else(|| Error::NotFound(path.to_string()))
    }
}

fn tree(sls: &str) -> Arc<MemTree> {
    Arc::new(MemTree(vec![("orch.sls".into(), sls.to_string())]))
}

/// A safety net so a broken engine fails a test instead of hanging it. Never reached when
/// things work; nothing is asserted about how long anything takes.
const GIVE_UP: Duration = Duration::from_secs(30);

#[derive(Default)]
struct ClusterState {
    /// (node, step id) -> result, as each node's observer published it.
    results: HashMap<(String, String), StepResult>,
    /// step id -> nodes inside the step's `serialize` section now.
    inside: HashMap<String, usize>,
    /// step id -> the most nodes ever inside it at once.
    max_inside: HashMap<String, usize>,
    /// step id -> nodes `target_limit` chose, in the order they asked.
    chosen: HashMap<String, Vec<String>>,
    /// Every enter and leave, in order: (node, step id, "enter" | "leave").
    log: Vec<(String, String, &'static str)>,
    /// Steps whose remote lookups are held until released (see `hold_remote`).
    held: HashMap<String, bool>,
}

/// The run as all nodes see it: one shared state and one condition variable for every change.
struct Cluster {
    nodes: Vec<String>,
    state: Mutex<ClusterState>,
    changed: Condvar,
}

impl Cluster {
    fn new(nodes: &[&str]) -> Arc<Cluster> {
        Arc::new(Cluster {
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            state: Mutex::new(ClusterState::default()),
            changed: Condvar::new(),
        })
    }

    /// Waits until `done` holds for the state, or gives up with `why`.
    fn wait_for(
        &self,
        mut done: impl FnMut(&mut ClusterState) -> bool,
        why: impl Fn() -> String,
    ) -> Result<std::sync::MutexGuard<'_, ClusterState>> {
        let guard = self.state.lock().unwrap();
        let (guard, timeout) = self
            .changed
            .wait_timeout_while(guard, GIVE_UP, |s| !done(s))
            .unwrap();
        if timeout.timed_out() {
            return Err(Error::Unavailable(why()));
        }
        Ok(guard)
    }

    fn publish(&self, node: &str, result: &StepResult) {
        let mut s = self.state.lock().unwrap();
        s.results
            .insert((node.to_string(), result.id.clone()), result.clone());
        self.changed.notify_all();
    }

    /// Holds remote lookups of step `id` until `release(id)`.
    fn hold_remote(&self, id: &str) {
        self.state.lock().unwrap().held.insert(id.into(), true);
    }
}

/// One node's handle on the cluster: what `RunOptions::coordinator` gets.
struct NodeCoord {
    node: String,
    cluster: Arc<Cluster>,
}

impl Coordinator for NodeCoord {
    fn remote(&self, r: &StepRef) -> Result<Value> {
        let node = r.node.clone().expect("remote refs name a node");
        if !self.cluster.nodes.contains(&node) {
            return Err(Error::NotFound(format!("node {node:?} is not in this run")));
        }
        let key = (node.clone(), r.step.clone());
        let s = self.cluster.wait_for(
            |s| s.results.contains_key(&key) && !s.held.get(&r.step).copied().unwrap_or(false),
            || format!("step {} on {node} was not recorded", r.step),
        )?;
        let result = &s.results[&key];
        if result.result != Some(true) {
            return Err(Error::Unavailable(format!(
                "step {} failed on {node}: {}",
                r.step, result.comment
            )));
        }
        result
            .outputs
            .get(&r.path[0])
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("step {} has no {}", r.step, r.path[0])))
    }

    fn enter(&self, step: &PlanStep) -> Result<Admission> {
        let mut s = self.cluster.state.lock().unwrap();
        s.log.push((self.node.clone(), step.id.clone(), "enter"));
        if let Some(n) = step.target_limit {
            let chosen = s.chosen.entry(step.id.clone()).or_default();
            if chosen.len() >= n as usize {
                return Ok(Admission::Skip(format!(
                    "target_limit: {n}: runs on {} only",
                    chosen.join(", ")
                )));
            }
            chosen.push(self.node.clone());
        }
        if let Some(n) = step.serialize {
            drop(s);
            let id = step.id.clone();
            let mut s = self.cluster.wait_for(
                |s| s.inside.get(&id).copied().unwrap_or(0) < n as usize,
                || format!("no serialize slot for {id}"),
            )?;
            let inside = s.inside.entry(id.clone()).or_default();
            *inside += 1;
            let now = *inside;
            let max = s.max_inside.entry(id).or_default();
            *max = (*max).max(now);
        }
        Ok(Admission::Run)
    }

    fn leave(&self, step: &PlanStep, result: &StepResult) -> Result<()> {
        let mut s = self.cluster.state.lock().unwrap();
        s.log.push((self.node.clone(), step.id.clone(), "leave"));
        // The engine recorded (and so published) the result before leaving.
        assert_eq!(
            s.results.get(&(self.node.clone(), step.id.clone())),
            Some(result),
            "leave came before the observer saw the result"
        );
        if step.serialize.is_some() && result.ran {
            *s.inside.get_mut(&step.id).expect("entered") -= 1;
        }
        self.cluster.changed.notify_all();
        drop(s);
        if step.sync {
            let id = step.id.clone();
            let nodes = self.cluster.nodes.clone();
            drop(self.cluster.wait_for(
                |s| {
                    nodes
                        .iter()
                        .all(|n| s.results.contains_key(&(n.clone(), id.clone())))
                },
                || format!("not every node finished {id}"),
            )?);
        }
        Ok(())
    }
}

/// A node's observer: publishes every result to the cluster, as an agent writes it to the KV.
struct Publisher {
    node: String,
    cluster: Arc<Cluster>,
    /// (run_num, done, total) of every result, in the order the observer saw them.
    seen: Mutex<Vec<(usize, usize, usize)>>,
}
impl Observer for Publisher {
    fn finished(&self, result: &StepResult, done: usize, total: usize) {
        self.seen
            .lock()
            .unwrap()
            .push((result.run_num, done, total));
        self.cluster.publish(&self.node, result);
    }
}

/// The Jinja context of a cluster run on `node`.
fn cluster_ctx(node: &str) -> Context {
    let mut eden = Map::new();
    eden.insert("local".into(), json!(false));
    Context {
        node: NodeInfo {
            name: node.into(),
            ..NodeInfo::default()
        },
        eden,
        ..Context::default()
    }
}

/// `sls` compiled for a cluster run on `node`.
fn cluster_plan(tree: &Arc<MemTree>, node: &str, mode: Mode) -> engine::Plan {
    let reg = Registry::builtin();
    engine::plan(
        tree.clone(),
        &["orch".into()],
        &cluster_ctx(node),
        &reg,
        mode,
    )
    .unwrap_or_else(|e| panic!("plan on {node}: {e}"))
}

/// Run options for `node` of `cluster`: its coordinator handle.
fn node_opts(cluster: &Arc<Cluster>, node: &str) -> RunOptions {
    RunOptions {
        coordinator: Some(Arc::new(NodeCoord {
            node: node.to_string(),
            cluster: cluster.clone(),
        })),
        ..RunOptions::default()
    }
}

/// A result as another node would have published it.
fn published(
    id: &str,
    function: &str,
    result: bool,
    comment: &str,
    stdout: Option<&str>,
) -> StepResult {
    StepResult {
        id: id.into(),
        name: id.into(),
        function: function.into(),
        sls: "orch".into(),
        result: Some(result),
        changes: json!({}),
        comment: comment.into(),
        duration_ms: 0.0,
        run_num: 0,
        outputs: stdout
            .map(|o| Map::from_iter([("stdout".into(), json!(o))]))
            .unwrap_or_default(),
        ran: true,
    }
}

/// Runs `sls` in justdoit mode on node `a` of `cluster` alone, reporting to `observer`.
fn run_on_a(
    cluster: &Arc<Cluster>,
    sls: &str,
    observer: &dyn Observer,
) -> (engine::Plan, Vec<StepResult>) {
    let tree = tree(sls);
    let plan = cluster_plan(&tree, "a", Mode::Justdoit);
    let reg = Registry::builtin();
    let results = run(
        &plan,
        &reg,
        tree.as_ref(),
        &node_opts(cluster, "a"),
        observer,
    );
    (plan, results)
}

/// Runs `sls` on every node of `cluster` at once (each node a thread with its own plan and
/// coordinator handle). Returns each node's results by step ID.
fn run_cluster(
    cluster: &Arc<Cluster>,
    sls: &str,
    mode: Mode,
) -> BTreeMap<String, BTreeMap<String, StepResult>> {
    let tree = tree(sls);
    let start = Barrier::new(cluster.nodes.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = cluster
            .nodes
            .iter()
            .map(|node| {
                let (tree, start) = (tree.clone(), &start);
                scope.spawn(move || {
                    let reg = Registry::builtin();
                    let plan = cluster_plan(&tree, node, mode);
                    let opts = node_opts(cluster, node);
                    let observer = Publisher {
                        node: node.clone(),
                        cluster: cluster.clone(),
                        seen: Mutex::new(Vec::new()),
                    };
                    start.wait();
                    let results = run(&plan, &reg, tree.as_ref(), &opts, &observer);
                    // Run numbers and the progress count stay right while steps wait on
                    // other nodes: one result per step, numbered in the order recorded.
                    let total = results.len();
                    let want: Vec<_> = (0..total).map(|k| (k, k + 1, total)).collect();
                    assert_eq!(*observer.seen.lock().unwrap(), want, "{node}");
                    let by_id = results.into_iter().map(|r| (r.id.clone(), r)).collect();
                    (node.clone(), by_id)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The nanosecond timestamps a command printed, one per line.
fn stamps(r: &StepResult) -> Vec<u128> {
    let out = r.outputs["stdout"].as_str().unwrap_or_default();
    out.lines()
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{}: not a time: {l:?}", r.id))
        })
        .collect()
}

fn ok(r: &StepResult) {
    assert_eq!(r.result, Some(true), "{} failed: {}", r.id, r.comment);
}

#[test]
fn serialize_one_runs_the_step_on_one_node_at_a_time() {
    for mode in [Mode::Ansible, Mode::Justdoit] {
        let cluster = Cluster::new(&["n1", "n2", "n3"]);
        let sls = r#"
critical:
  cmd.run:
    - name: date +%s%N; sleep 0.1; date +%s%N
    - serialize: 1
"#;
        let results = run_cluster(&cluster, sls, mode);
        let mut intervals: Vec<(u128, u128)> = results
            .values()
            .map(|steps| {
                ok(&steps["critical"]);
                let t = stamps(&steps["critical"]);
                (t[0], t[1])
            })
            .collect();
        assert_eq!(intervals.len(), 3);
        intervals.sort();
        for w in intervals.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "{mode}: two nodes ran the serialized step at once: {intervals:?}"
            );
        }
        let s = cluster.state.lock().unwrap();
        assert_eq!(s.max_inside["critical"], 1);
        let enters = s.log.iter().filter(|e| e.2 == "enter").count();
        let leaves = s.log.iter().filter(|e| e.2 == "leave").count();
        assert_eq!((enters, leaves), (3, 3), "{:?}", s.log);
    }
}

#[test]
fn serialize_two_lets_two_nodes_in() {
    let cluster = Cluster::new(&["n1", "n2", "n3", "n4"]);
    let sls = r#"
rolling:
  cmd.run:
    - name: sleep 0.1
    - serialize: 2
"#;
    let results = run_cluster(&cluster, sls, Mode::Justdoit);
    for steps in results.values() {
        ok(&steps["rolling"]);
    }
    let s = cluster.state.lock().unwrap();
    assert!(s.max_inside["rolling"] <= 2, "{:?}", s.max_inside);
}

#[test]
fn sync_holds_every_node_until_all_finished_the_step() {
    // Each node sleeps a different time in `migrate`; none may start `after` before the
    // slowest has finished `migrate`. In justdoit mode `after` requires `migrate`; an
    // independent step is not held back there.
    for mode in [Mode::Ansible, Mode::Justdoit] {
        let cluster = Cluster::new(&["n1", "n2", "n3"]);
        let sls = r#"
migrate:
  cmd.run:
    - name: sleep 0.{{ node.name[1:] }}; date +%s%N
    - sync: true
after:
  cmd.run:
    - name: date +%s%N
    - require:
      - cmd: migrate
"#;
        let results = run_cluster(&cluster, sls, mode);
        // The one timestamp step `id` printed, on every node.
        let printed = |id: &str| -> Vec<u128> {
            results
                .values()
                .map(|steps| {
                    ok(&steps[id]);
                    stamps(&steps[id])[0]
                })
                .collect()
        };
        let last_migrate_end = *printed("migrate").iter().max().unwrap();
        let first_after = *printed("after").iter().min().unwrap();
        assert!(
            last_migrate_end <= first_after,
            "{mode}: a node went past the synced step before every node finished it \
             ({last_migrate_end} > {first_after})"
        );
    }
}

#[test]
fn target_limit_one_runs_on_exactly_one_node() {
    let cluster = Cluster::new(&["n1", "n2", "n3"]);
    let sls = r#"
once:
  cmd.run:
    - name: echo ran on {{ node.name }}
    - target_limit: 1
everywhere:
  cmd.run:
    - name: echo {{ node.name }}
    - require:
      - cmd: once
"#;
    let results = run_cluster(&cluster, sls, Mode::Ansible);
    let chosen = cluster.state.lock().unwrap().chosen["once"].clone();
    assert_eq!(chosen.len(), 1);
    let mut ran = Vec::new();
    for (node, steps) in &results {
        let once = &steps["once"];
        assert_eq!(once.result, Some(true), "{node}: {}", once.comment);
        if once.ran {
            assert_eq!(once.outputs["stdout"], json!(format!("ran on {node}")));
            ran.push(node.clone());
        } else {
            assert_eq!(
                once.comment,
                format!("target_limit: 1: runs on {} only", chosen[0])
            );
            assert_eq!(once.changes, json!({}));
            assert!(once.outputs.is_empty());
        }
        // A skipped step does not fail its dependents.
        ok(&steps["everywhere"]);
        assert_eq!(steps["everywhere"].outputs["stdout"], json!(node));
    }
    assert_eq!(ran, chosen);
}

#[test]
fn a_value_made_on_one_node_reaches_another() {
    for mode in [Mode::Ansible, Mode::Justdoit] {
        let cluster = Cluster::new(&["a", "b"]);
        let sls = r#"
{% if node.name == "b" %}
gen:
  cmd.run:
    - name: sleep 0.1; echo token-$((6 * 7))
{% else %}
use:
  cmd.run:
    - name: echo "got ${{ nodes.b.steps.gen.stdout }}"
{% endif %}
"#;
        let results = run_cluster(&cluster, sls, mode);
        ok(&results["b"]["gen"]);
        let used = &results["a"]["use"];
        ok(used);
        assert_eq!(used.outputs["stdout"], json!("got token-42"), "{mode}");
    }
}

#[test]
fn a_failed_remote_lookup_fails_only_that_step() {
    let cluster = Cluster::new(&["a", "b"]);
    let sls = r#"
{% if node.name == "a" %}
first:
  test.succeed_without_changes
bad:
  cmd.run:
    - name: echo ${{ nodes.nosuch.steps.gen.stdout }}
independent:
  test.succeed_without_changes
dependent:
  test.succeed_without_changes:
    - require:
      - cmd: bad
{% else %}
idle:
  test.succeed_without_changes
{% endif %}
"#;
    let results = run_cluster(&cluster, sls, Mode::Justdoit);
    let a = &results["a"];
    let bad = &a["bad"];
    assert_eq!(bad.result, Some(false));
    assert!(
        bad.comment.contains("nodes.nosuch.steps.gen.stdout")
            && bad.comment.contains("node \"nosuch\" is not in this run"),
        "{}",
        bad.comment
    );
    ok(&a["first"]);
    ok(&a["independent"]);
    assert_eq!(a["dependent"].result, Some(false));
    assert_eq!(
        a["dependent"].comment,
        "One or more requisite failed: orch.bad"
    );
    ok(&results["b"]["idle"]);
}

/// Node `a` alone, with a coordinator whose `remote` answers only after `a`'s own `free` step
/// has been recorded: the run finishes only if waiting for the value did not stop `free`.
#[test]
fn justdoit_keeps_running_independent_steps_while_one_waits_on_another_node() {
    let cluster = Cluster::new(&["a", "b"]);
    // `b`'s value is there from the start, but held until `free` finishes on `a`.
    cluster.publish("b", &published("gen", "cmd.run", true, "", Some("tok")));
    cluster.hold_remote("gen");
    let sls = r#"
waiting:
  cmd.run:
    - name: echo ${{ nodes.b.steps.gen.stdout }}
free:
  cmd.run:
    - name: echo free
"#;
    struct ReleaseAfterFree(Arc<Cluster>);
    impl Observer for ReleaseAfterFree {
        fn finished(&self, r: &StepResult, _done: usize, _total: usize) {
            if r.id == "free" {
                let mut s = self.0.state.lock().unwrap();
                s.held.insert("gen".into(), false);
                self.0.changed.notify_all();
            }
        }
    }
    let (plan, results) = run_on_a(&cluster, sls, &ReleaseAfterFree(cluster.clone()));
    // `waiting` is first in the plan, so a scheduler that blocked on it would never get to
    // `free`, and the remote lookup would give up.
    assert_eq!(plan.steps[0].id, "waiting");
    let ids: Vec<&str> = results.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["free", "waiting"]);
    for r in &results {
        ok(r);
    }
    assert_eq!(results[1].outputs["stdout"], json!("tok"));
    assert_eq!(results[1].run_num, 1);
}

/// The same with a `serialize` slot held by another node: `enter` blocks, `free` finishes.
#[test]
fn justdoit_keeps_running_independent_steps_while_one_waits_to_enter() {
    let cluster = Cluster::new(&["a", "b"]);
    // Node b holds the only slot until a's `free` has finished.
    cluster
        .state
        .lock()
        .unwrap()
        .inside
        .insert("gated".into(), 1);
    struct FreeSlotAfterFree(Arc<Cluster>);
    impl Observer for FreeSlotAfterFree {
        fn finished(&self, r: &StepResult, done: usize, total: usize) {
            assert!(done <= total);
            self.0.publish("a", r);
            if r.id == "free" {
                *self
                    .0
                    .state
                    .lock()
                    .unwrap()
                    .inside
                    .get_mut("gated")
                    .unwrap() -= 1;
                self.0.changed.notify_all();
            }
        }
    }
    let sls = r#"
gated:
  cmd.run:
    - name: echo gated
    - serialize: 1
free:
  cmd.run:
    - name: echo free
"#;
    let (_, results) = run_on_a(&cluster, sls, &FreeSlotAfterFree(cluster.clone()));
    let ids: Vec<&str> = results.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["free", "gated"]);
    for r in &results {
        ok(r);
    }
}

/// A coordinator that refuses every step: `enter` errors fail the step, nothing else.
#[test]
fn an_enter_error_fails_the_step_with_its_message() {
    struct Refuse;
    impl Coordinator for Refuse {
        fn remote(&self, _r: &StepRef) -> Result<Value> {
            unreachable!("no remote refs here")
        }
        fn enter(&self, step: &PlanStep) -> Result<Admission> {
            Err(Error::Unavailable(format!(
                "the datastore did not answer for {}",
                step.id
            )))
        }
        fn leave(&self, _step: &PlanStep, _result: &StepResult) -> Result<()> {
            panic!("leave after a failed enter");
        }
    }
    let sls = r#"
gated:
  cmd.run:
    - name: echo gated
    - sync: true
plain:
  cmd.run:
    - name: echo plain
"#;
    for (_, by) in on_node_a(sls, Arc::new(Refuse)) {
        assert_eq!(by["gated"].result, Some(false));
        assert!(!by["gated"].ran);
        assert_eq!(
            by["gated"].comment,
            "the datastore did not answer for gated"
        );
        ok(&by["plain"]);
    }
}

/// Runs `sls` as node "a" with `coordinator`, sequentially (ansible) and in parallel
/// (justdoit): each mode's results by step id.
fn on_node_a(
    sls: &str,
    coordinator: Arc<dyn Coordinator>,
) -> Vec<(Mode, HashMap<String, StepResult>)> {
    let reg = Registry::builtin();
    let tree = tree(sls);
    [Mode::Ansible, Mode::Justdoit]
        .into_iter()
        .map(|mode| {
            let plan = cluster_plan(&tree, "a", mode);
            let opts = RunOptions {
                coordinator: Some(coordinator.clone()),
                ..RunOptions::default()
            };
            let results = run(&plan, &reg, tree.as_ref(), &opts, &Quiet);
            (
                mode,
                results.into_iter().map(|r| (r.id.clone(), r)).collect(),
            )
        })
        .collect()
}

/// A `sync` barrier that gives up (`leave` errors) fails the step it closes, after the fact,
/// and what requires that step does not run; other steps do.
#[test]
fn a_sync_barrier_that_gives_up_fails_the_step_and_holds_its_dependents() {
    struct GiveUp;
    impl Coordinator for GiveUp {
        fn remote(&self, _r: &StepRef) -> Result<Value> {
            unreachable!("no remote refs here")
        }
        fn enter(&self, _step: &PlanStep) -> Result<Admission> {
            Ok(Admission::Run)
        }
        fn leave(&self, step: &PlanStep, _result: &StepResult) -> Result<()> {
            Err(Error::Unavailable(format!(
                "waiting for every node to finish {:?} (sync): still waiting after 1s",
                step.id
            )))
        }
    }
    let sls = r#"
gated:
  cmd.run:
    - name: echo gated
    - sync: true
needs:
  cmd.run:
    - name: echo needs
    - require:
      - cmd: gated
plain:
  cmd.run:
    - name: echo plain
"#;
    for (mode, by) in on_node_a(sls, Arc::new(GiveUp)) {
        assert_eq!(by["gated"].result, Some(false), "{mode:?}");
        assert!(by["gated"].ran, "{mode:?}: the command itself ran");
        assert!(
            by["gated"].comment.ends_with(
                "; then waiting for every node to finish \"gated\" (sync): still waiting after 1s"
            ),
            "{mode:?}: {}",
            by["gated"].comment
        );
        assert_eq!(by["needs"].result, Some(false), "{mode:?}");
        assert!(!by["needs"].ran, "{mode:?}");
        ok(&by["plain"]);
    }
}

#[test]
fn a_dry_run_goes_on_when_a_remote_value_is_not_there() {
    let cluster = Cluster::new(&["a", "b"]);
    let sls = r#"
{% if node.name == "a" %}
use:
  cmd.run:
    - name: echo ${{ nodes.b.steps.gen.stdout }}
{% else %}
gen:
  test.fail_without_changes
{% endif %}
"#;
    let reg = Registry::builtin();
    let tree = tree(sls);
    let plan = cluster_plan(&tree, "a", Mode::Ansible);
    // Node b's step failed, so the value is not there; a dry run shows a placeholder.
    cluster.publish(
        "b",
        &published("gen", "test.fail_without_changes", false, "Failure!", None),
    );
    let coordinator: Arc<dyn Coordinator> = Arc::new(NodeCoord {
        node: "a".into(),
        cluster: cluster.clone(),
    });
    let dry = RunOptions {
        test: true,
        coordinator: Some(coordinator.clone()),
        ..RunOptions::default()
    };
    let results = run(&plan, &reg, tree.as_ref(), &dry, &Quiet);
    assert_eq!(results[0].result, None, "{}", results[0].comment);
    assert_eq!(
        results[0].changes,
        json!({"cmd": "echo <nodes.b.steps.gen.stdout: known after gen runs on b>"})
    );
    // For real, the step fails and says why.
    let real = RunOptions {
        coordinator: Some(coordinator),
        ..RunOptions::default()
    };
    let results = run(&plan, &reg, tree.as_ref(), &real, &Quiet);
    assert_eq!(results[0].result, Some(false));
    assert_eq!(
        results[0].comment,
        "${{ nodes.b.steps.gen.stdout }}: step \"gen\" on node \"b\" gave no value: step gen \
         failed on b: Failure!"
    );
}

/// A coordinator that panics must not leave a parallel run waiting forever: the panic reaches
/// the caller of `run`.
#[test]
fn a_panicking_coordinator_fails_the_run_instead_of_hanging_it() {
    struct Broken;
    impl Coordinator for Broken {
        fn remote(&self, _r: &StepRef) -> Result<Value> {
            panic!("remote is broken")
        }
        fn enter(&self, _step: &PlanStep) -> Result<Admission> {
            Ok(Admission::Run)
        }
        fn leave(&self, _step: &PlanStep, _result: &StepResult) -> Result<()> {
            panic!("leave is broken")
        }
    }
    for sls in [
        "gated:\n  test.nop:\n    - sync: true\nafter:\n  test.nop:\n    - require:\n      - test: gated\n",
        "use:\n  cmd.run:\n    - name: echo ${{ nodes.b.steps.gen.stdout }}\n",
    ] {
        let tree = tree(sls);
        let plan = cluster_plan(&tree, "a", Mode::Justdoit);
        let opts = RunOptions {
            coordinator: Some(Arc::new(Broken)),
            ..RunOptions::default()
        };
        // On its own thread, so a hang fails the test instead of stalling it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let reg = Registry::builtin();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&plan, &reg, tree.as_ref(), &opts, &Quiet)
            }));
            let _ = tx.send(outcome.is_err());
        });
        let panicked = rx.recv_timeout(GIVE_UP).expect("the run hung");
        assert!(panicked, "{sls}");
    }
}

// ---- without a coordinator -------------------------------------------------------------

fn plan_local(sls: &str) -> Result<engine::Plan> {
    let reg = Registry::builtin();
    engine::plan(
        tree(sls),
        &["orch".into()],
        &Context::default(),
        &reg,
        Mode::Ansible,
    )
}

#[test]
fn run_options_are_engine_keys_and_no_ops_locally() {
    let sls = r#"
step:
  test.succeed_with_changes:
    - serialize: 2
    - sync: true
    - target_limit: 1
other:
  test.succeed_without_changes:
    - sync: false
"#;
    let plan = plan_local(sls).unwrap();
    let step = &plan.steps[0];
    assert_eq!(
        (step.serialize, step.sync, step.target_limit),
        (Some(2), true, Some(1))
    );
    assert_eq!(
        step.run_options().as_deref(),
        Some("serialize: 2, sync: true, target_limit: 1")
    );
    for key in ["serialize", "sync", "target_limit"] {
        assert!(!step.args.contains_key(key), "{key} reached the module");
    }
    assert!(!plan.steps[1].sync && plan.steps[1].run_options().is_none());
    // `eden plan` lists them under the step.
    let mut text = Vec::new();
    eden::cli::plan::print_plan(&mut text, "n1", &plan).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("1. test.succeed_with_changes step  [orch.sls:2:1]\n     run: serialize: 2, sync: true, target_limit: 1\n"),
        "{text}"
    );
    // A local run is one node: the options hold trivially and the step runs.
    let reg = Registry::builtin();
    let results = run(
        &plan,
        &reg,
        &eden::modules::EmptyTree,
        &RunOptions::default(),
        &Quiet,
    );
    assert!(results.iter().all(|r| r.result == Some(true) && r.ran));
    // Old plans (without the fields) still deserialize, and unset fields are not written.
    let mut v = serde_json::to_value(&plan).unwrap();
    assert!(v["steps"][1].get("serialize").is_none());
    for key in ["serialize", "sync", "target_limit"] {
        v["steps"][0].as_object_mut().unwrap().remove(key);
    }
    let old: engine::Plan = serde_json::from_value(v).unwrap();
    assert_eq!((old.steps[0].serialize, old.steps[0].sync), (None, false));
    let again: engine::Plan = serde_json::from_value(serde_json::to_value(&plan).unwrap()).unwrap();
    assert_eq!(again, plan);
}

#[test]
fn genius_does_not_merge_steps_with_run_options() {
    let sls = r#"
a:
  cmd.run:
    - name: echo same
b:
  cmd.run:
    - name: echo same
c:
  cmd.run:
    - name: echo same
    - serialize: 1
"#;
    let reg = Registry::builtin();
    let plan = engine::plan(
        tree(sls),
        &["orch".into()],
        &Context::default(),
        &reg,
        Mode::Genius,
    )
    .unwrap();
    let ids: Vec<&str> = plan.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["a", "c"], "{:?}", plan.rewrites);
    assert_eq!(plan.rewrites.len(), 1);
}

#[test]
fn bad_run_option_values_name_the_state_place_and_value() {
    let cases = [
        (
            "serialize: 0",
            "`serialize: 0` is not a positive whole number",
        ),
        (
            "serialize: many",
            "`serialize: \"many\"` is not a positive whole number",
        ),
        (
            "serialize: -1",
            "`serialize: -1` is not a positive whole number",
        ),
        (
            "serialize: 1.5",
            "`serialize: 1.5` is not a positive whole number",
        ),
        (
            "target_limit: 0",
            "`target_limit: 0` is not a positive whole number",
        ),
        (
            "target_limit: [1]",
            "`target_limit: [1]` is not a positive whole number",
        ),
        ("sync: maybe", "`sync: \"maybe\"` is not true or false"),
        ("sync: 1", "`sync: 1` is not true or false"),
    ];
    for (line, want) in cases {
        let sls = format!("fine:\n  test.nop\n\nrollout:\n  test.nop:\n    - {line}\n");
        let err = plan_local(&sls).expect_err(line).to_string();
        assert!(
            err.starts_with("orch.sls:4:1: state \"rollout\": "),
            "{line}: {err}"
        );
        assert!(err.contains(want), "{line}: {err}");
    }
}

#[test]
fn other_node_refs_need_a_cluster_run() {
    let sls = r#"
use:
  cmd.run:
    - name: echo ${{ nodes.db1.steps.token.stdout }}
"#;
    // Compiled for a local run (no `eden.local`, or `true` as `eden apply --local` sets it):
    // an error naming the reference and the way out.
    let mut local = Context::default();
    local.eden.insert("local".into(), json!(true));
    let reg = Registry::builtin();
    let as_apply_local = engine::plan(tree(sls), &["orch".into()], &local, &reg, Mode::Ansible);
    for err in [plan_local(sls).unwrap_err(), as_apply_local.unwrap_err()] {
        let err = err.to_string();
        assert!(
            err.contains("nodes.db1.steps.token.stdout")
                && err.contains("only a cluster run (eden apply --target ...)"),
            "{err}"
        );
    }
    // Compiled for a cluster: no implicit requisite (the step is elsewhere) ...
    let reg = Registry::builtin();
    let plan = engine::plan(
        tree(sls),
        &["orch".into()],
        &cluster_ctx("a"),
        &reg,
        Mode::Ansible,
    )
    .unwrap();
    assert!(plan.steps[0].deps.is_empty());
    // ... and run without a coordinator, the step fails saying why.
    let results = run(
        &plan,
        &reg,
        &eden::modules::EmptyTree,
        &RunOptions::default(),
        &Quiet,
    );
    assert_eq!(results[0].result, Some(false));
    assert!(
        results[0].comment.contains(
            "${{ nodes.db1.steps.token.stdout }} refers to step \"token\" on node \"db1\""
        ),
        "{}",
        results[0].comment
    );
    // A local reference to a missing step is still checked.
    let bad = "use:\n  cmd.run:\n    - name: echo ${{ steps.nope.stdout }}\n";
    assert!(plan_local(bad)
        .unwrap_err()
        .to_string()
        .contains("names no step"));
}
