//! The three ordering modes: property tests on random requisite graphs, proof that justdoit
//! overlaps independent steps, and the genius rewrites.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use eden::engine::{self, Context, Mode, Quiet, RunOptions};
use eden::error::{Error, Result};
use eden::modules::{test::Test, Args, Call, EmptyTree, Module, Outcome, Registry, SourceTree};
use proptest::prelude::*;

/// A tree held in memory, for generated SLS.
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

/// Behaves like `test` and logs when each call starts and ends, on one logical clock.
struct Recorder {
    clock: AtomicUsize,
    /// (id, start, end, test mode)
    log: Mutex<Vec<(String, usize, usize, bool)>>,
}
impl Module for Recorder {
    fn name(&self) -> &'static str {
        "rec"
    }
    fn functions(&self) -> &'static [&'static str] {
        Test.functions()
    }
    fn validate(&self, function: &str, args: &Args) -> Result<()> {
        Test.validate(function, args)
    }
    fn outputs(&self, _f: &str) -> &'static [&'static str] {
        &[]
    }
    fn call(&self, call: &Call) -> Result<Outcome> {
        let start = self.clock.fetch_add(1, Ordering::SeqCst);
        std::thread::yield_now();
        let out = Test.call(call);
        let end = self.clock.fetch_add(1, Ordering::SeqCst);
        self.log
            .lock()
            .unwrap()
            .push((call.id.to_string(), start, end, call.test));
        out
    }
}

const KINDS: &[&str] = &[
    "require",
    "watch",
    "onchanges",
    "onfail",
    "require_any",
    "watch_any",
    "onchanges_any",
    "onfail_any",
    "onfail_all",
    "prereq",
];
const PREREQ: usize = 9;
const FUNS: &[&str] = &[
    "succeed_with_changes",
    "succeed_without_changes",
    "fail_without_changes",
    "fail_with_changes",
];

/// A random DAG: step i may require steps before it, with random kinds and functions.
fn dag() -> impl Strategy<Value = Vec<(usize, Vec<(usize, usize)>)>> {
    (2usize..12).prop_flat_map(|n| {
        proptest::collection::vec(
            (
                0..FUNS.len(),
                proptest::collection::vec((0usize..64, 0..KINDS.len()), 0..4),
            ),
            n,
        )
        .prop_map(|steps| {
            steps
                .into_iter()
                .enumerate()
                .map(|(i, (f, deps))| {
                    let deps = if i == 0 {
                        Vec::new()
                    } else {
                        let mut d: Vec<(usize, usize)> =
                            deps.into_iter().map(|(j, k)| (j % i, k)).collect();
                        d.sort();
                        d.dedup_by_key(|x| x.0);
                        d
                    };
                    (f, deps)
                })
                .collect()
        })
    })
}

fn sls_of(steps: &[(usize, Vec<(usize, usize)>)]) -> String {
    // Declared in reverse so that definition order alone would be wrong.
    let mut text = String::new();
    for (i, (f, deps)) in steps.iter().enumerate().rev() {
        text.push_str(&format!("s{i}:\n  rec.{}:\n", FUNS[*f]));
        // One list per kind: like Salt, a repeated key replaces the earlier one.
        for (k, kind) in KINDS.iter().enumerate() {
            let of_kind: Vec<usize> = deps.iter().filter(|d| d.1 == k).map(|d| d.0).collect();
            if of_kind.is_empty() {
                continue;
            }
            text.push_str(&format!("    - {kind}:\n"));
            for j in of_kind {
                text.push_str(&format!("      - rec: s{j}\n"));
            }
        }
        if deps.is_empty() {
            text.push_str("    - comment: Success!\n");
        }
    }
    text
}

type Run = (
    Vec<eden::engine::StepResult>,
    Vec<(String, usize, usize, bool)>,
);

/// Runs the SLS in `mode`; `None` when it does not compile because prereqs closed a cycle.
fn run_mode(text: &str, mode: Mode) -> Option<Run> {
    let rec = Arc::new(Recorder {
        clock: AtomicUsize::new(0),
        log: Mutex::new(Vec::new()),
    });
    let mut reg = Registry::builtin();
    reg.register(rec.clone());
    let tree = Arc::new(MemTree(vec![("g.sls".into(), text.to_string())]));
    let plan = match engine::plan(tree.clone(), &["g".into()], &Context::default(), &reg, mode) {
        Ok(p) => p,
        Err(e) if e.to_string().contains("Recursive requisites") => return None,
        Err(e) => panic!("{e}\n{text}"),
    };
    let opts = RunOptions {
        test: false,
        jobs: 4,
        ..RunOptions::default()
    };
    let results = engine::run::run(&plan, &reg, tree.as_ref(), &opts, &Quiet);
    let log = rec.log.lock().unwrap().clone();
    Some((results, log))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// In every mode, a step that ran started after each of its requisites finished, every step
    /// has a result recorded after its requisites' results, and the three modes agree on
    /// every result.
    #[test]
    fn every_mode_respects_every_requisite(steps in dag()) {
        let text = sls_of(&steps);
        let mut per_mode = Vec::new();
        for mode in [Mode::Ansible, Mode::Justdoit, Mode::Genius] {
            let Some((results, log)) = run_mode(&text, mode) else {
                // A prereq can close a cycle; compiling must then fail in every mode.
                prop_assert!(run_mode(&text, Mode::Ansible).is_none());
                return Ok(());
            };
            prop_assert_eq!(results.len(), steps.len());
            let run_num = |id: &str| results.iter().find(|r| r.id == id).unwrap().run_num;
            for (i, (_, deps)) in steps.iter().enumerate() {
                let me = format!("s{i}");
                for (j, k) in deps {
                    let dep = format!("s{j}");
                    if *k == PREREQ {
                        // `me` prereqs `dep`: when `dep` really runs, `me` was decided first.
                        let real = |id: &str| log.iter().find(|e| e.0 == id && !e.3).cloned();
                        if let Some(d) = real(&dep) {
                            prop_assert!(run_num(&me) < run_num(&dep), "{mode}: prereq {me} after {dep}\n{text}");
                            if let Some(m) = real(&me) {
                                prop_assert!(m.2 < d.1, "{mode}: {dep} started before its prereq {me} ended\n{text}");
                            }
                        }
                        continue;
                    }
                    prop_assert!(run_num(&dep) < run_num(&me), "{mode}: {me} recorded before its requisite {dep}\n{text}");
                    let real = |id: &str| log.iter().find(|e| e.0 == id && !e.3);
                    if let (Some(a), Some(b)) = (real(&dep), real(&me)) {
                        prop_assert!(a.2 < b.1, "{mode}: {me} started before {dep} finished\n{text}");
                    }
                }
            }
            let mut by_id: Vec<(String, Option<bool>, String)> =
                results.iter().map(|r| (r.id.clone(), r.result, r.comment.clone())).collect();
            by_id.sort();
            per_mode.push(by_id);
        }
        prop_assert_eq!(&per_mode[0], &per_mode[1], "justdoit differs from ansible\n{}", text);
        prop_assert_eq!(&per_mode[0], &per_mode[2], "genius differs from ansible\n{}", text);
    }
}

/// Holds each call until `want` calls are inside at once (or a generous deadline passes), and
/// remembers the most that were ever inside together.
struct Gate {
    want: usize,
    state: Mutex<(usize, usize)>,
    cv: Condvar,
}
impl Module for Gate {
    fn name(&self) -> &'static str {
        "gate"
    }
    fn functions(&self) -> &'static [&'static str] {
        &["wait"]
    }
    fn validate(&self, _f: &str, _a: &Args) -> Result<()> {
        Ok(())
    }
    fn outputs(&self, _f: &str) -> &'static [&'static str] {
        &[]
    }
    fn call(&self, _call: &Call) -> Result<Outcome> {
        let mut g = self.state.lock().unwrap();
        g.0 += 1;
        g.1 = g.1.max(g.0);
        self.cv.notify_all();
        // The deadline only stops a broken scheduler from hanging the test; the assertion is
        // on how many calls overlapped, not on time.
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(20), |g| g.1 < self.want)
            .unwrap();
        g.0 -= 1;
        Ok(Outcome::ok("passed the gate"))
    }
}

fn gate_run(mode: Mode, want: usize, jobs: usize) -> usize {
    let gate = Arc::new(Gate {
        want,
        state: Mutex::new((0, 0)),
        cv: Condvar::new(),
    });
    let mut reg = Registry::builtin();
    reg.register(gate.clone());
    let text = "a:\n  gate.wait: []\nb:\n  gate.wait: []\nc:\n  gate.wait: []\nd:\n  gate.wait: []\nafter:\n  test.nop:\n    - require:\n      - gate: a\n";
    let tree = Arc::new(MemTree(vec![("g.sls".into(), text.into())]));
    let plan = engine::plan(tree.clone(), &["g".into()], &Context::default(), &reg, mode).unwrap();
    let results = engine::run::run(
        &plan,
        &reg,
        tree.as_ref(),
        &RunOptions {
            test: false,
            jobs,
            ..RunOptions::default()
        },
        &Quiet,
    );
    assert_eq!(results.len(), 5);
    assert!(
        results.iter().all(|r| r.result == Some(true)),
        "{results:?}"
    );
    let max = gate.state.lock().unwrap().1;
    max
}

#[test]
fn justdoit_runs_independent_steps_at_once() {
    assert_eq!(
        gate_run(Mode::Justdoit, 4, 8),
        4,
        "four independent steps should overlap"
    );
    assert_eq!(gate_run(Mode::Genius, 4, 8), 4);
}

#[test]
fn the_pool_bounds_parallelism_and_ansible_is_serial() {
    assert_eq!(gate_run(Mode::Justdoit, 2, 2), 2);
    assert_eq!(gate_run(Mode::Ansible, 1, 8), 1);
}

/// Stands in for the PackageKit-backed modules, which live elsewhere: genius rewrites are plan
/// logic and only need the names.
struct FakePkg(&'static str, &'static [&'static str]);
impl Module for FakePkg {
    fn name(&self) -> &'static str {
        self.0
    }
    fn functions(&self) -> &'static [&'static str] {
        self.1
    }
    fn validate(&self, _f: &str, _a: &Args) -> Result<()> {
        Ok(())
    }
    fn outputs(&self, _f: &str) -> &'static [&'static str] {
        &[]
    }
    fn call(&self, call: &Call) -> Result<Outcome> {
        Ok(Outcome::ok(format!(
            "{} {:?}",
            call.function,
            call.args.get("pkgs")
        )))
    }
}

fn genius_plan(text: &str) -> eden::engine::Plan {
    let mut reg = Registry::builtin();
    reg.register(Arc::new(FakePkg(
        "pkg",
        &["installed", "removed", "latest"],
    )));
    reg.register(Arc::new(FakePkg("pkgrepo", &["managed"])));
    let tree = Arc::new(MemTree(vec![("g.sls".into(), text.into())]));
    engine::plan(tree, &["g".into()], &Context::default(), &reg, Mode::Genius).unwrap()
}

#[test]
fn genius_orders_repos_and_dirs_and_aggregates_respecting_requisites() {
    let plan = genius_plan(
        "nginx:\n  pkg.installed: []\ncurl:\n  pkg.installed: []\nplugin:\n  pkg.installed:\n    - require:\n      - pkg: nginx\n\
         repo:\n  pkgrepo.managed:\n    - name: deb http://example/ stable main\n\
         /srv/www/index.html:\n  file.managed:\n    - contents: hi\n/srv/www:\n  file.directory: []\n",
    );
    let pos = |id: &str| plan.steps.iter().position(|s| s.id == id);
    let kinds: Vec<&str> = plan.rewrites.iter().map(|r| r.kind.as_str()).collect();
    assert!(kinds.contains(&"pkgrepo-before-pkg"), "{kinds:?}");
    assert!(kinds.contains(&"parent-dir-before-file"), "{kinds:?}");
    assert!(kinds.contains(&"pkg-aggregate"), "{kinds:?}");
    // nginx and curl become one transaction; plugin requires nginx, so it stays apart and after.
    let agg = plan
        .rewrites
        .iter()
        .find(|r| r.kind == "pkg-aggregate")
        .unwrap();
    assert_eq!(agg.steps, vec!["nginx", "curl"]);
    assert!(pos("curl").is_none());
    let nginx = &plan.steps[pos("nginx").unwrap()];
    assert_eq!(nginx.args["pkgs"], serde_json::json!(["nginx", "curl"]));
    assert!(pos("repo").unwrap() < pos("nginx").unwrap());
    assert!(pos("nginx").unwrap() < pos("plugin").unwrap());
    assert!(plan.steps[pos("plugin").unwrap()]
        .deps
        .iter()
        .any(|d| plan.steps[d.step].id == "nginx"));
    assert!(pos("/srv/www").unwrap() < pos("/srv/www/index.html").unwrap());
    for r in &plan.rewrites {
        assert!(!r.reason.is_empty());
    }
}

#[test]
fn genius_dedupes_identical_steps_and_keeps_their_dependents_waiting() {
    let plan = genius_plan(
        "one:\n  cmd.run:\n    - name: /bin/true\ntwo:\n  cmd.run:\n    - name: /bin/true\nafter:\n  test.nop:\n    - require:\n      - cmd: two\n",
    );
    assert!(plan.steps.iter().all(|s| s.id != "two"));
    let after = plan.steps.iter().find(|s| s.id == "after").unwrap();
    assert_eq!(plan.steps[after.deps[0].step].id, "one");
    assert_eq!(plan.rewrites[0].kind, "dedupe");
}

#[test]
fn genius_never_aggregates_across_a_requisite_chain() {
    // a -> b (via an intermediate test step) -> c: no two installs may merge.
    let plan = genius_plan(
        "a:\n  pkg.installed: []\nmid:\n  test.nop:\n    - require:\n      - pkg: a\nb:\n  pkg.installed:\n    - require:\n      - test: mid\n",
    );
    assert!(
        plan.rewrites.iter().all(|r| r.kind != "pkg-aggregate"),
        "{:?}",
        plan.rewrites
    );
    let _ = EmptyTree;
}

#[test]
fn genius_aggregation_keeps_pinned_versions_and_refresh() {
    let plan = genius_plan(
        "nginx:\n  pkg.installed:\n    - version: 1.22.1-9\ncurl:\n  pkg.installed:\n    - refresh: true\n",
    );
    let nginx = plan.steps.iter().find(|s| s.id == "nginx").unwrap();
    assert_eq!(
        nginx.args["pkgs"],
        serde_json::json!([{"nginx": "1.22.1-9"}, "curl"])
    );
    assert!(nginx.args.get("version").is_none(), "{:?}", nginx.args);
    assert_eq!(nginx.args["refresh"], serde_json::json!(true));
}

#[test]
fn genius_merges_only_steps_whose_requisites_and_watchers_stay_the_same() {
    // a and b differ in their requisites (b waits for a check); c is watched through
    // onchanges; d is named by a step reference. None of them may be merged with another.
    let plan = genius_plan(
        "check:\n  test.nop: []\n\
         a:\n  pkg.installed: []\n\
         b:\n  pkg.installed:\n    - onfail:\n      - test: check\n\
         c:\n  pkg.installed: []\n\
         restart:\n  test.nop:\n    - onchanges:\n      - pkg: c\n\
         d:\n  pkg.installed: []\n\
         show:\n  test.nop:\n    - name: \"${{ steps.d.comment }}\"\n\
         e:\n  pkg.installed: []\n",
    );
    let ids: Vec<&str> = plan.steps.iter().map(|s| s.id.as_str()).collect();
    for id in ["a", "b", "c", "d", "restart", "show"] {
        assert!(ids.contains(&id), "{id} was merged away: {ids:?}");
    }
    // a and e have the same (no) requisites and nothing watches them: one transaction.
    let agg: Vec<&Vec<String>> = plan
        .rewrites
        .iter()
        .filter(|r| r.kind == "pkg-aggregate")
        .map(|r| &r.steps)
        .collect();
    assert_eq!(
        agg,
        vec![&vec!["a".to_string(), "e".to_string()]],
        "{:?}",
        plan.rewrites
    );
    let restart = plan.steps.iter().find(|s| s.id == "restart").unwrap();
    assert_eq!(plan.steps[restart.deps[0].step].id, "c");
}
