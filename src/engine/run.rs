//! Run: executes a [`Plan`] and returns one [`StepResult`] per state.
//!
//! Requisite semantics are Salt's (`State._check_requisites`), evaluated when a step's
//! requisites have all finished:
//! - `require`/`watch`: a failed (`False`) requisite fails the step without running it, with
//!   the comment "One or more requisite failed: SLS.ID". `_any` forms fail only if all failed.
//! - `watch`: if a watched state changed, the step runs and, if it changed nothing itself, its
//!   module's watch action runs (Salt's `mod_watch`).
//! - `onchanges`: runs only if some requisite reported changes (a failed one counts as none).
//! - `onfail`: runs only if some requisite failed; `onfail_all` only if all of them failed.
//! - `prereq`: the target first runs in test mode (the prereq check); the prerequiring state
//!   runs only if that would change something ("No changes detected" otherwise), then the
//!   target runs for real.
//! - A state that did not run because of `onchanges`/`onfail`/`prereq` has result `True` and
//!   does not fail its dependents (as in Salt).
//!
//! `${{ steps.ID.FIELD }}` references are substituted just before the step runs.
//!
//! `ansible` mode runs entries one at a time in plan order. `justdoit` and `genius` start every
//! entry whose requisites have finished, at most `jobs` at a time; the decision to run or skip
//! is made on the scheduling thread (it only reads finished results), module calls run on
//! worker threads. `run_num` is the order in which results were recorded.
//!
//! Cross-node orchestration (a cluster run gives [`RunOptions::coordinator`]):
//! - A step with `serialize: N`, `sync: true` or `target_limit: N` that would run asks
//!   [`Coordinator::enter`] first. `Skip(comment)` records it as succeeded, unchanged, not run;
//!   an error fails it with the error as comment (and `leave` is not called). After its result
//!   is recorded (the observer has seen it), [`Coordinator::leave`] is called, and only when
//!   that returns may its dependents start: so `sync` holds back the steps that require the
//!   synced step. In `ansible` mode that is every later step; in the parallel modes, as always,
//!   only requisites order steps, so independent steps are not held back.
//! - `${{ nodes.NODE.steps.ID.FIELD }}` comes from [`Coordinator::remote`] just before the step
//!   runs; a failed lookup fails that step only, with a comment naming the node, step and why.
//!   Such a reference adds no requisite (the step is on another node).
//! - The blocking calls (`enter`, `remote`, `leave`) run on worker threads in the parallel
//!   modes and take no `jobs` slot, so independent steps keep starting and finishing.
//!
//! Without a coordinator (a local run) this node is the whole run: `serialize`, `sync` and
//! `target_limit` hold trivially and are not acted on, and a `${{ nodes... }}` reference fails
//! its step (the compiler already rejects it unless the plan was compiled for a cluster).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::compile::{Dep, Mode, Plan, PlanStep, ReqKind};
use super::coord::{Admission, Coordinator};
use super::refs::{find_refs, substitute, StepRef};
use crate::error::{Error, Result};
use crate::modules::{Call, Outcome, Registry, SourceTree};

/// The result of one state, as `eden apply --output json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub id: String,
    pub name: String,
    /// `module.function`.
    pub function: String,
    pub sls: String,
    /// `true` success, `false` failure, `null` would change (test mode).
    pub result: Option<bool>,
    pub changes: Value,
    pub comment: String,
    pub duration_ms: f64,
    /// 0-based order in which results were recorded on this node.
    pub run_num: usize,
    pub outputs: Map<String, Value>,
    /// False when the step was decided without running (a requisite failed, nothing changed).
    #[serde(default = "yes")]
    pub ran: bool,
}

fn yes() -> bool {
    true
}

/// How to run a plan.
#[derive(Clone)]
pub struct RunOptions {
    /// Dry run: modules report what would change and change nothing.
    pub test: bool,
    /// The most module calls running at once in the parallel modes.
    pub jobs: usize,
    /// The other nodes of a cluster run. `None` for a local run: this node is the only one,
    /// so `serialize`, `sync` and `target_limit` hold trivially and are not acted on, and a
    /// `${{ nodes.N... }}` reference fails its step.
    pub coordinator: Option<Arc<dyn Coordinator>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            test: false,
            jobs: 8,
            coordinator: None,
        }
    }
}

impl fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunOptions")
            .field("test", &self.test)
            .field("jobs", &self.jobs)
            .field(
                "coordinator",
                &self.coordinator.as_ref().map(|_| "dyn Coordinator"),
            )
            .finish()
    }
}

/// Live progress. Called on the scheduling thread.
pub trait Observer: Sync {
    fn started(&self, _step: &PlanStep) {}
    fn finished(&self, _result: &StepResult, _done: usize, _total: usize) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

#[derive(Debug, Clone)]
struct Res {
    result: Option<bool>,
    changes: Value,
    comment: String,
    outputs: Map<String, Value>,
    duration_ms: f64,
    ran: bool,
    /// Module calls made: 2 when the watch action followed the normal call. Salt gives each
    /// call a run number, so the second one is the step's.
    calls: usize,
}

impl Res {
    fn not_run(result: bool, comment: String) -> Res {
        Res {
            result: Some(result),
            changes: Value::Object(Map::new()),
            comment,
            outputs: Map::new(),
            duration_ms: 0.0,
            ran: false,
            calls: 1,
        }
    }
    fn has_changes(&self) -> bool {
        match &self.changes {
            Value::Null => false,
            Value::Object(m) => !m.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::String(s) => !s.is_empty(),
            Value::Bool(b) => *b,
            _ => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Unmet,
    Fail,
    Pre,
    Onfail,
    Onchanges,
    Change,
    Met,
}

/// What the scheduler decided for one entry.
enum Action {
    /// Already decided (a prereq check recorded it).
    Skip,
    /// Record this result without calling the module. For a check entry, `also_target`
    /// records it as the target's result too.
    Record(Res),
    /// Call the module. `watch` holds the changed watched states when the watch action may
    /// follow.
    Call {
        test: bool,
        watch: Option<Vec<String>>,
    },
}

struct Runner<'a> {
    plan: &'a Plan,
    registry: &'a Registry,
    tree: &'a dyn SourceTree,
    opts: &'a RunOptions,
    /// Per plan entry: for a check entry Salt's `pre`, otherwise Salt's `running`.
    slots: Vec<Option<Res>>,
    run_nums: Vec<Option<usize>>,
    next_run_num: usize,
    /// Results of normal steps recorded so far: the `done` count given to the observer.
    recorded: usize,
}

/// This node's referenced values for one step, or why each is not available.
type LocalValues = Vec<(StepRef, Result<Value>)>;

impl<'a> Runner<'a> {
    /// The result a dependency of kind `kind` on entry `e` reads.
    fn dep_result(&self, d: &Dep) -> Option<&Res> {
        self.slots[d.step].as_ref()
    }

    /// Salt's `_check_requisites`.
    fn status(&self, step: &PlanStep) -> Status {
        let mut kinds: Vec<ReqKind> = Vec::new();
        for d in &step.deps {
            if !kinds.contains(&d.kind) {
                kinds.push(d.kind);
            }
        }
        let mut fun: BTreeSet<&'static str> = BTreeSet::new();
        for kind in kinds {
            let base = match kind {
                ReqKind::Onfail | ReqKind::OnfailAny | ReqKind::OnfailAll => "onfail",
                ReqKind::Onchanges | ReqKind::OnchangesAny => "onchanges",
                ReqKind::Watch | ReqKind::WatchAny => "watch",
                ReqKind::Prereq => "prereq",
                ReqKind::Require | ReqKind::RequireAny => "require",
            };
            let mut st: BTreeSet<&'static str> = BTreeSet::new();
            for d in step.deps.iter().filter(|d| d.kind == kind) {
                let Some(r) = self.dep_result(d) else {
                    st.insert("unmet");
                    continue;
                };
                match base {
                    "onfail" => {
                        if r.result == Some(true) {
                            st.insert("onfail");
                            continue;
                        }
                    }
                    "onchanges" => {
                        if r.result == Some(false) || !r.has_changes() {
                            st.insert("onchanges");
                        } else {
                            st.insert("onchangesmet");
                        }
                        continue;
                    }
                    _ => {
                        if r.result == Some(false) {
                            st.insert("fail");
                            continue;
                        }
                    }
                }
                if base == "watch" && r.has_changes() {
                    st.insert("change");
                    continue;
                }
                if base == "prereq" {
                    st.insert(if r.result.is_none() { "premet" } else { "pre" });
                } else if r.ran {
                    st.insert("met");
                }
            }
            let name = kind.as_str();
            if name.ends_with("_any") || kind == ReqKind::Onfail {
                if st.contains("met") || st.contains("change") {
                    st.remove("fail");
                }
                if st.contains("onchangesmet") {
                    st.remove("onchanges");
                    st.remove("fail");
                }
                if st.contains("onfail") && st.contains("met") {
                    st.remove("onfail");
                }
            }
            if name.ends_with("_all") && st.contains("onfail") {
                st.remove("met");
            }
            fun.extend(st);
        }
        if fun.contains("unmet") {
            Status::Unmet
        } else if fun.contains("fail") {
            Status::Fail
        } else if fun.contains("pre") {
            if fun.contains("premet") {
                Status::Met
            } else {
                Status::Pre
            }
        } else if fun.contains("onfail") && !fun.contains("onchangesmet") {
            Status::Onfail
        } else if fun.contains("onchanges") && !fun.contains("onchangesmet") {
            Status::Onchanges
        } else if fun.contains("change") {
            Status::Change
        } else if fun.contains("onfail") {
            Status::Onfail
        } else {
            Status::Met
        }
    }

    /// The index of the normal entry a dependency's result belongs to, for messages.
    fn owner(&self, entry: usize) -> usize {
        self.plan.steps[entry].prereq_check_of.unwrap_or(entry)
    }

    fn failed_requisites(&self, step: &PlanStep) -> String {
        let mut failed = BTreeSet::new();
        for d in &step.deps {
            let owner = self.owner(d.step);
            // Salt prefers the prereq-check result of a requisite when there is one.
            let r = self.plan.steps[owner]
                .prereq_check
                .and_then(|c| self.slots[c].as_ref())
                .or(self.slots[owner].as_ref());
            if r.is_some_and(|r| r.result == Some(false)) {
                let s = &self.plan.steps[owner];
                failed.insert(format!("{}.{}", s.sls, s.id));
            }
        }
        format!(
            "One or more requisite failed: {}",
            failed.into_iter().collect::<Vec<_>>().join(", ")
        )
    }

    fn decide(&self, i: usize) -> Action {
        let step = &self.plan.steps[i];
        let target = step.prereq_check_of;
        let decided = match target {
            Some(t) => self.slots[t].is_some(),
            None => self.slots[i].is_some(),
        };
        if decided {
            return Action::Skip;
        }
        let test = self.opts.test || target.is_some();
        match self.status(step) {
            Status::Met => Action::Call { test, watch: None },
            Status::Change if target.is_none() => {
                let changed = step
                    .deps
                    .iter()
                    .filter(|d| d.kind == ReqKind::Watch)
                    .filter(|d| self.slots[d.step].as_ref().is_some_and(Res::has_changes))
                    .map(|d| {
                        let s = &self.plan.steps[d.step];
                        format!("{}: {}", s.module, s.id)
                    })
                    .collect();
                Action::Call {
                    test,
                    watch: Some(changed),
                }
            }
            Status::Change => Action::Call { test, watch: None },
            Status::Fail => {
                if let Some(pre) = step.prereq_check.and_then(|c| self.slots[c].as_ref()) {
                    let mut r = pre.clone();
                    r.changes = Value::Object(Map::new());
                    Action::Record(r)
                } else {
                    Action::Record(Res::not_run(false, self.failed_requisites(step)))
                }
            }
            Status::Pre => Action::Record(Res::not_run(true, "No changes detected".into())),
            Status::Onfail => Action::Record(Res::not_run(
                true,
                "State was not run because onfail req did not change".into(),
            )),
            Status::Onchanges => Action::Record(Res::not_run(
                true,
                "State was not run because none of the onchanges reqs changed".into(),
            )),
            Status::Unmet => Action::Record(Res::not_run(
                false,
                format!(
                    "eden bug: {} was scheduled before its requisites finished",
                    step.id
                ),
            )),
        }
    }

    /// The value of `${{ steps.ID.FIELD... }}` from results so far.
    fn lookup(&self, r: &StepRef) -> Result<Value> {
        let full = format!("steps.{}.{}", r.step, r.path.join("."));
        let idx = self
            .plan
            .steps
            .iter()
            .position(|s| s.id == r.step && !s.is_check())
            .ok_or_else(|| Error::InvalidInput(format!("{full}: no step {:?}", r.step)))?;
        let Some(res) = self.slots[idx].as_ref() else {
            return Err(Error::InvalidInput(format!(
                "{full}: {} has not run",
                r.step
            )));
        };
        let s = &self.plan.steps[idx];
        let field = r.path[0].as_str();
        let mut v = match field {
            "result" => res.result.map(Value::Bool).unwrap_or(Value::Null),
            "changes" => res.changes.clone(),
            "comment" => Value::String(res.comment.clone()),
            "name" => Value::String(s.name.clone()),
            "id" => Value::String(s.id.clone()),
            "duration_ms" => Value::from(res.duration_ms),
            other => match res.outputs.get(other) {
                Some(v) => v.clone(),
                None => {
                    return Err(Error::InvalidInput(format!(
                        "{full} is not available: {} did not run ({})",
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

    /// The values of the step's `${{ steps.ID... }}` references (this node's), read from the
    /// results so far on the scheduling thread. References to other nodes are left to
    /// [`resolve_args`], which may block.
    fn local_values(&self, i: usize) -> Result<LocalValues> {
        let step = &self.plan.steps[i];
        if !step.has_refs {
            return Ok(Vec::new());
        }
        let mut out: LocalValues = Vec::new();
        for r in find_refs(&Value::Object(step.args.clone()))? {
            if r.node.is_some() || out.iter().any(|(k, _)| *k == r) {
                continue;
            }
            // In a dry run the referenced step did not really run, so its outputs are unknown:
            // the dry run goes on with a placeholder that says so.
            let v = match self.lookup(&r) {
                Err(_) if self.opts.test => Ok(Value::String(format!(
                    "<steps.{}.{}: known after {} runs>",
                    r.step,
                    r.path.join("."),
                    r.step
                ))),
                other => other,
            };
            out.push((r, v));
        }
        Ok(out)
    }

    /// Records a result; a normal step's result gets its run number and goes to the observer.
    fn record(&mut self, i: usize, res: Res, observer: &dyn Observer) {
        let step = &self.plan.steps[i];
        match step.prereq_check_of {
            Some(_) if res.ran => {
                // A prereq check that ran is only Salt's `pre` entry: no run number.
                self.slots[i] = Some(res);
            }
            Some(t) => {
                self.slots[i] = Some(res.clone());
                self.assign(t, res, observer);
            }
            None => self.assign(i, res, observer),
        }
    }

    fn assign(&mut self, i: usize, res: Res, observer: &dyn Observer) {
        self.next_run_num += res.calls.saturating_sub(1);
        self.run_nums[i] = Some(self.next_run_num);
        self.next_run_num += 1;
        self.recorded += 1;
        self.slots[i] = Some(res);
        let r = self.result_of(i);
        observer.finished(&r, self.recorded, self.total());
    }

    /// A step that finished here but whose `leave` failed (a `sync` barrier that gave up):
    /// its result becomes a failure, published again, so the steps that require it do not
    /// run and the run's summary counts it.
    fn fail_after(&mut self, i: usize, e: &Error, observer: &dyn Observer) {
        let res = self.slots[i].as_mut().expect("recorded before leave");
        res.result = Some(false);
        res.comment = if res.comment.is_empty() {
            e.to_string()
        } else {
            format!("{}; then {e}", res.comment)
        };
        let r = self.result_of(i);
        observer.finished(&r, self.recorded, self.total());
    }

    fn total(&self) -> usize {
        self.plan.steps.iter().filter(|s| !s.is_check()).count()
    }

    fn result_of(&self, i: usize) -> StepResult {
        let s = &self.plan.steps[i];
        let r = self.slots[i].as_ref().expect("recorded");
        StepResult {
            id: s.id.clone(),
            name: s.name.clone(),
            function: s.function_name(),
            sls: s.sls.clone(),
            result: r.result,
            changes: r.changes.clone(),
            comment: r.comment.clone(),
            duration_ms: r.duration_ms,
            run_num: self.run_nums[i].expect("recorded"),
            outputs: r.outputs.clone(),
            ran: r.ran,
        }
    }
}

/// Calls a module function (and its watch action when `watch` says so). Errors become failed
/// results whose comment is the message.
fn call_module(
    registry: &Registry,
    tree: &dyn SourceTree,
    step: &PlanStep,
    args: Result<Map<String, Value>>,
    test: bool,
    watch: Option<Vec<String>>,
) -> Res {
    let start = Instant::now();
    let mut calls = 1;
    let outcome = (|| -> Result<Outcome> {
        let args = args?;
        let module = registry
            .get(&step.module)
            .ok_or_else(|| Error::NotFound(format!("module {} is not loaded", step.module)))?;
        let mut call = Call {
            id: &step.id,
            function: &step.function,
            args: &args,
            test,
            tree,
            changed_watches: &[],
        };
        let out = module.call(&call)?;
        match &watch {
            Some(changed) if !out.has_changes() => {
                call.changed_watches = changed;
                calls = 2;
                module.watch(&call)
            }
            _ => Ok(out),
        }
    })();
    let duration_ms = (start.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    match outcome {
        Ok(o) => Res {
            result: o.result,
            changes: if o.changes.is_null() {
                Value::Object(Map::new())
            } else {
                o.changes
            },
            comment: o.comment,
            outputs: o.outputs,
            duration_ms,
            ran: true,
            calls,
        },
        Err(e) => Res {
            result: Some(false),
            changes: Value::Object(Map::new()),
            comment: e.to_string(),
            outputs: Map::new(),
            duration_ms,
            ran: true,
            calls,
        },
    }
}

/// The module arguments of `step` with every reference substituted: this node's from
/// `locals`, other nodes' through the coordinator (which may block until the other node has
/// recorded the step). Runs on a worker thread in the parallel modes.
fn resolve_args(
    step: &PlanStep,
    locals: &Result<LocalValues>,
    coordinator: Option<&dyn Coordinator>,
    test: bool,
) -> Result<Map<String, Value>> {
    if !step.has_refs {
        return Ok(step.args.clone());
    }
    let locals = locals.as_ref().map_err(Clone::clone)?;
    let lookup = |r: &StepRef| -> Result<Value> {
        match &r.node {
            None => locals
                .iter()
                .find(|(k, _)| k == r)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| {
                    Err(Error::Internal(format!(
                        "eden bug: steps.{} was not looked up",
                        r.step
                    )))
                }),
            Some(node) => remote_value(r, node, coordinator, test),
        }
    };
    match substitute(&Value::Object(step.args.clone()), &lookup)? {
        Value::Object(m) => Ok(m),
        _ => Err(Error::Internal(
            "substituted arguments are not a map".into(),
        )),
    }
}

/// `${{ nodes.NODE.steps.ID.FIELD }}` through the coordinator.
fn remote_value(
    r: &StepRef,
    node: &str,
    coordinator: Option<&dyn Coordinator>,
    test: bool,
) -> Result<Value> {
    let full = format!("nodes.{node}.steps.{}.{}", r.step, r.path.join("."));
    let Some(c) = coordinator else {
        return Err(Error::InvalidInput(format!(
            "${{{{ {full} }}}} refers to step {:?} on node {node:?}; only a cluster run (eden \
             apply --target ...) can resolve it, and this run has no other nodes",
            r.step
        )));
    };
    match c.remote(r) {
        Ok(v) => Ok(v),
        Err(_) if test => Ok(Value::String(format!(
            "<{full}: known after {} runs on {node}>",
            r.step
        ))),
        Err(e) => Err(Error::Unavailable(format!(
            "${{{{ {full} }}}}: step {:?} on node {node:?} gave no value: {e}",
            r.step
        ))),
    }
}

/// True when running `step` may block on other nodes: it has cross-node run options or
/// refers to another node's step, and there is a coordinator to ask.
fn waits_on_others(step: &PlanStep, coordinator: Option<&dyn Coordinator>) -> bool {
    coordinator.is_some() && (step.coordinated() || refers_to_other_nodes(step))
}

fn refers_to_other_nodes(step: &PlanStep) -> bool {
    step.has_refs
        && find_refs(&Value::Object(step.args.clone()))
            .map(|refs| refs.iter().any(|r| r.node.is_some()))
            .unwrap_or(false)
}

/// The admission step of a step about to run: asks the coordinator when the step has
/// cross-node run options, then resolves the arguments if it is to run. `Err` fails the step.
/// Blocks; runs on a worker thread in the parallel modes.
fn admit(
    step: &PlanStep,
    locals: &Result<LocalValues>,
    coordinator: Option<&dyn Coordinator>,
    test: bool,
) -> Admitted {
    let gate = coordinator.filter(|_| step.coordinated());
    match gate.map(|c| c.enter(step)) {
        None | Some(Ok(Admission::Run)) => Admitted::Run {
            args: resolve_args(step, locals, coordinator, test),
            entered: gate.is_some(),
        },
        Some(Ok(Admission::Skip(comment))) => Admitted::Skip(comment),
        Some(Err(e)) => Admitted::Refused(e),
    }
}

/// What [`admit`] decided.
enum Admitted {
    /// Call the module with these arguments (an `Err` fails the step). `entered`: the
    /// coordinator admitted it, so it must hear `leave` afterwards.
    Run {
        args: Result<Map<String, Value>>,
        entered: bool,
    },
    /// The coordinator said not to run it here; it must hear `leave` afterwards.
    Skip(String),
    /// `enter` failed: the step fails with this error, and `leave` is not called.
    Refused(Error),
}

/// Runs a plan. Results come back in `run_num` order.
///
/// With a coordinator ([`RunOptions::coordinator`]), a step with `serialize`, `sync` or
/// `target_limit` calls [`Coordinator::enter`] once its requisites are met and it would run,
/// and [`Coordinator::leave`] after its result is recorded (so the observer has seen it); its
/// dependents start only after `leave` returned. `${{ nodes.N... }}` values come from
/// [`Coordinator::remote`] just before the step runs. In the parallel modes these blocking
/// calls are made on worker threads and do not take a `jobs` slot, so independent steps keep
/// running meanwhile; in `ansible` mode they are made in turn, like everything else.
pub fn run(
    plan: &Plan,
    registry: &Registry,
    tree: &dyn SourceTree,
    opts: &RunOptions,
    observer: &dyn Observer,
) -> Vec<StepResult> {
    let n = plan.steps.len();
    let mut runner = Runner {
        plan,
        registry,
        tree,
        opts,
        slots: vec![None; n],
        run_nums: vec![None; n],
        next_run_num: 0,
        recorded: 0,
    };
    if plan.mode == Mode::Ansible || opts.jobs <= 1 {
        for i in 0..n {
            run_one_inline(&mut runner, i, observer);
        }
    } else {
        run_parallel(&mut runner, observer);
    }
    let mut out: Vec<StepResult> = (0..n)
        .filter(|&i| runner.run_nums[i].is_some())
        .map(|i| runner.result_of(i))
        .collect();
    out.sort_by_key(|r| r.run_num);
    out
}

fn run_one_inline(runner: &mut Runner, i: usize, observer: &dyn Observer) {
    let coordinator = runner.opts.coordinator.as_deref();
    match runner.decide(i) {
        Action::Skip => {}
        Action::Record(res) => runner.record(i, res, observer),
        Action::Call { test, watch } => {
            let plan = runner.plan;
            let step = &plan.steps[i];
            let locals = runner.local_values(i);
            let (res, entered) = match admit(step, &locals, coordinator, test) {
                Admitted::Run { args, entered } => {
                    observer.started(step);
                    let res = call_module(runner.registry, runner.tree, step, args, test, watch);
                    (res, entered)
                }
                Admitted::Skip(comment) => (Res::not_run(true, comment), true),
                Admitted::Refused(e) => (Res::not_run(false, e.to_string()), false),
            };
            runner.record(i, res, observer);
            if let (true, Some(c)) = (entered, coordinator) {
                if let Err(e) = c.leave(step, &runner.result_of(i)) {
                    runner.fail_after(i, &e, observer);
                }
            }
        }
    }
}

/// What a worker thread reports to the scheduling thread.
enum Event {
    /// [`admit`] finished for entry `i`.
    Admitted(usize, Admitted),
    /// The module call of entry `i` finished.
    Called(usize, Res),
    /// [`Coordinator::leave`] returned for entry `i`: its dependents may start.
    /// With the error if it failed (see [`Coordinator::leave`]).
    Left(usize, Option<Error>),
}

/// Runs `work` on a worker thread and always tells the scheduling thread (`event` gets `None`
/// if `work` panicked), so a panic cannot leave the run waiting forever; the panic is then
/// passed on, and the thread scope raises it again when the run ends.
fn report<T>(
    tx: &mpsc::Sender<Event>,
    work: impl FnOnce() -> T,
    event: impl FnOnce(Option<T>) -> Event,
) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(v) => {
            let _ = tx.send(event(Some(v)));
        }
        Err(panic) => {
            let _ = tx.send(event(None));
            std::panic::resume_unwind(panic);
        }
    }
}

/// A step admitted to run, waiting for a `jobs` slot.
struct ReadyCall {
    args: Result<Map<String, Value>>,
    test: bool,
    watch: Option<Vec<String>>,
}

fn run_parallel(runner: &mut Runner, observer: &dyn Observer) {
    let plan = runner.plan;
    let n = plan.steps.len();
    let jobs = runner.opts.jobs.max(1);
    let coordinator = runner.opts.coordinator.as_deref();
    // `finished`: dependents may start (for a coordinated step, after `leave` returned).
    let mut finished = vec![false; n];
    let mut started = vec![false; n];
    // Per entry: the call mode decided for it, kept while `admit` runs on a worker.
    let mut pending: Vec<Option<(bool, Option<Vec<String>>)>> = vec![None; n];
    let mut entered = vec![false; n];
    // Admitted steps waiting for a slot, lowest plan index first.
    let mut queue: BTreeMap<usize, ReadyCall> = BTreeMap::new();
    let mut in_flight = 0usize;
    let mut finished_count = 0usize;
    let (tx, rx) = mpsc::channel::<Event>();
    let registry = runner.registry;
    let tree = runner.tree;
    std::thread::scope(|scope| {
        let spawn_call = |i: usize, call: ReadyCall, in_flight: &mut usize| {
            let step = &plan.steps[i];
            observer.started(step);
            *in_flight += 1;
            let tx = tx.clone();
            scope.spawn(move || {
                report(
                    &tx,
                    || call_module(registry, tree, step, call.args, call.test, call.watch),
                    |res| {
                        let res = res.unwrap_or_else(|| {
                            Res::not_run(false, format!("eden bug: {} panicked", step.module))
                        });
                        Event::Called(i, res)
                    },
                )
            });
        };
        let spawn_leave = |i: usize, result: StepResult| {
            let step = &plan.steps[i];
            let c = coordinator.expect("only a coordinator admits steps");
            let tx = tx.clone();
            scope.spawn(move || {
                report(
                    &tx,
                    || c.leave(step, &result),
                    |r| {
                        let r = r.unwrap_or_else(|| {
                            Err(Error::Internal("eden bug: leaving a step panicked".into()))
                        });
                        Event::Left(i, r.err())
                    },
                )
            });
        };
        while finished_count < n {
            let mut progressed = true;
            while progressed {
                progressed = false;
                // Admitted steps first: they were ready before anything decided now.
                while in_flight < jobs {
                    let Some((i, call)) = queue.pop_first() else {
                        break;
                    };
                    spawn_call(i, call, &mut in_flight);
                    progressed = true;
                }
                // Then everything newly ready, lowest plan index first, up to the pool size.
                for i in 0..n {
                    if started[i] || in_flight >= jobs {
                        continue;
                    }
                    if !plan.steps[i].deps.iter().all(|d| finished[d.step]) {
                        continue;
                    }
                    started[i] = true;
                    progressed = true;
                    match runner.decide(i) {
                        Action::Skip => {
                            finished[i] = true;
                            finished_count += 1;
                        }
                        Action::Record(res) => {
                            runner.record(i, res, observer);
                            finished[i] = true;
                            finished_count += 1;
                        }
                        Action::Call { test, watch } => {
                            let step = &plan.steps[i];
                            let locals = runner.local_values(i);
                            if waits_on_others(step, coordinator) {
                                pending[i] = Some((test, watch));
                                let tx = tx.clone();
                                scope.spawn(move || {
                                    report(
                                        &tx,
                                        || admit(step, &locals, coordinator, test),
                                        |a| {
                                            let a = a.unwrap_or_else(|| {
                                                Admitted::Refused(Error::Internal(
                                                    "the coordinator panicked".into(),
                                                ))
                                            });
                                            Event::Admitted(i, a)
                                        },
                                    )
                                });
                            } else {
                                let args = resolve_args(step, &locals, coordinator, test);
                                let call = ReadyCall { args, test, watch };
                                spawn_call(i, call, &mut in_flight);
                            }
                        }
                    }
                }
            }
            if finished_count >= n {
                break;
            }
            let Ok(event) = rx.recv() else { break };
            match event {
                Event::Admitted(i, admitted) => {
                    let (test, watch) = pending[i].take().expect("admitted steps are pending");
                    match admitted {
                        Admitted::Run { args, entered: e } => {
                            entered[i] = e;
                            queue.insert(i, ReadyCall { args, test, watch });
                        }
                        Admitted::Skip(comment) => {
                            runner.record(i, Res::not_run(true, comment), observer);
                            entered[i] = true;
                            spawn_leave(i, runner.result_of(i));
                        }
                        Admitted::Refused(e) => {
                            runner.record(i, Res::not_run(false, e.to_string()), observer);
                            finished[i] = true;
                            finished_count += 1;
                        }
                    }
                }
                Event::Called(i, res) => {
                    in_flight -= 1;
                    runner.record(i, res, observer);
                    if entered[i] {
                        spawn_leave(i, runner.result_of(i));
                    } else {
                        finished[i] = true;
                        finished_count += 1;
                    }
                }
                Event::Left(i, failed) => {
                    if let Some(e) = failed {
                        runner.fail_after(i, &e, observer);
                    }
                    finished[i] = true;
                    finished_count += 1;
                }
            }
        }
    });
}
