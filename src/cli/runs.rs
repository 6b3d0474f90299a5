//! Cluster runs from the command line: `eden apply --target`, `eden run`, `eden runs`,
//! `eden events` and `eden repo`. The CLI is only an etcd client (see `crate::agent`):
//!
//! 1. [`submit`] uploads the state tree's files as blobs and writes the run request;
//! 2. [`follow`] watches `/eden/runs/<id>/` and shows each node's progress as its steps finish
//!    (a progress bar per node on a terminal, one line per step otherwise), until the run
//!    controller writes the final status;
//! 3. [`report`] reads every node's results and prints them (highstate style, or the JSON of
//!    the CLI contract) with a summary of nodes x steps by ok, changed, failed and skipped.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use crate::agent::controller;
use crate::agent::kv::Kv;
use crate::agent::records::*;
use crate::agent::{adhoc_tree, blobs};
use crate::engine::StepResult;
use crate::error::{Error, Result};

/// How to reach the cluster.
#[derive(Args, Debug, Clone, Default)]
pub struct RemoteArgs {
    /// etcd endpoints of the cluster, comma-separated (default https://127.0.0.1:2379).
    #[arg(long, env = "EDEN_ENDPOINTS", value_name = "URLS")]
    pub endpoints: Option<String>,
    /// Directory with ca.crt, admin.crt and admin.key (a node's DATA/admin).
    #[arg(long, env = "EDEN_CREDS", value_name = "DIR")]
    pub creds: Option<PathBuf>,
    /// A datastore node's data dir on this machine: its client address and DATA/admin.
    #[arg(long, value_name = "DIR", conflicts_with = "endpoints")]
    pub data_dir: Option<PathBuf>,
}

impl RemoteArgs {
    pub fn kv(&self) -> Result<Kv> {
        let (raw, creds) = match &self.data_dir {
            Some(dir) => {
                let path = dir.join("node.json");
                let node: crate::cluster::datadir::NodeFile =
                    serde_json::from_slice(&std::fs::read(&path).map_err(|e| {
                        Error::InvalidInput(format!("cannot read {}: {e}", path.display()))
                    })?)
                    .map_err(|e| Error::InvalidData(format!("{}: {e}", path.display())))?;
                let scheme = if node.client_plaintext {
                    "http"
                } else {
                    "https"
                };
                (
                    format!("{scheme}://{}", node.client_addr),
                    self.creds.clone().or_else(|| Some(dir.join("admin"))),
                )
            }
            None => (
                self.endpoints
                    .clone()
                    .unwrap_or_else(|| "https://127.0.0.1:2379".into()),
                self.creds.clone(),
            ),
        };
        let urls: Vec<String> = raw
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| super::client::url(s.trim(), creds.is_some()))
            .collect();
        let tls = if urls.iter().any(|u| u.starts_with("https://")) {
            let dir = creds.ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{} needs client credentials: give --creds DIR (with ca.crt, admin.crt, \
                     admin.key; a node's DATA/admin), set EDEN_CREDS, or give --data-dir",
                    urls.join(",")
                ))
            })?;
            Some(super::client::tls(
                &dir.join("ca.crt"),
                Some((&dir.join("admin.crt"), &dir.join("admin.key"))),
            )?)
        } else {
            None
        };
        Kv::new(&urls, tls.as_ref())
    }
}

pub fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(f)
}

fn who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "?".into());
    format!("{user}@{}", super::apply::hostname())
}

/// What to run where, for [`submit`].
pub struct Submission {
    pub kind: String,
    pub files: BTreeMap<String, Vec<u8>>,
    pub source: Source,
    pub sls: Vec<String>,
    pub target: String,
    pub mode: String,
    pub test: bool,
    pub jobs: usize,
    pub wait_secs: u64,
}

/// Uploads the files and writes the request. Returns the run id and the request's revision.
pub async fn submit(kv: &Kv, mut sub: Submission) -> Result<(String, i64)> {
    // Checked here so a typo fails before anything is written.
    crate::agent::target::parse(&sub.target)?;
    sub.source.files = blobs::upload(kv, &sub.files).await?;
    let id = new_run_id();
    let req = RunRequest {
        id: id.clone(),
        who: who(),
        created_ms: now_ms(),
        kind: sub.kind,
        source: sub.source,
        sls: sub.sls,
        target: sub.target,
        mode: sub.mode,
        test: sub.test,
        jobs: sub.jobs,
        wait_secs: sub.wait_secs,
    };
    let r = kv
        .txn(crate::etcd::pb::etcdserverpb::TxnRequest {
            compare: vec![crate::agent::kv::absent(request_key(&id))],
            success: vec![crate::agent::kv::put_op(
                request_key(&id),
                serde_json::to_vec(&req)?,
                0,
            )],
            failure: vec![],
        })
        .await?;
    if !r.succeeded {
        return Err(Error::Internal(format!("run id {id} exists already")));
    }
    Ok((id, r.header.map(|h| h.revision).unwrap_or(0)))
}

/// Live view of a run while it goes.
trait View {
    fn nodes(&mut self, nodes: &[String]);
    fn plan(&mut self, node: &str, total: usize);
    fn step(&mut self, node: &str, r: &StepResult);
    fn node_done(&mut self, node: &str, s: &NodeStatus);
    fn finish(&mut self);
}

fn mark(r: &StepResult) -> &'static str {
    match (r.result, r.ran, has_changes(&r.changes)) {
        (Some(false), _, _) => "FAIL",
        (None, _, _) => "TEST",
        (Some(true), false, _) => "skip",
        (Some(true), true, true) => "chg ",
        (Some(true), true, false) => "ok  ",
    }
}

fn has_changes(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

/// One line per event, for logs and pipes.
struct Lines {
    totals: BTreeMap<String, usize>,
    done: BTreeMap<String, usize>,
}

impl View for Lines {
    fn nodes(&mut self, nodes: &[String]) {
        eprintln!("targets: {}", nodes.join(", "));
    }
    fn plan(&mut self, node: &str, total: usize) {
        self.totals.insert(node.into(), total);
    }
    fn step(&mut self, node: &str, r: &StepResult) {
        let d = self.done.entry(node.into()).or_default();
        *d += 1;
        let total = self.totals.get(node).copied().unwrap_or(0);
        eprintln!(
            "{node}: [{d}/{total}] {} {} ({}) {:.1} ms",
            mark(r),
            r.id,
            r.function,
            r.duration_ms
        );
    }
    fn node_done(&mut self, node: &str, s: &NodeStatus) {
        let extra = if s.comment.is_empty() {
            String::new()
        } else {
            format!(": {}", s.comment)
        };
        eprintln!("{node}: {}{extra}", s.state);
    }
    fn finish(&mut self) {}
}

/// A progress bar per node.
struct Bars {
    multi: indicatif::MultiProgress,
    bars: BTreeMap<String, indicatif::ProgressBar>,
}

impl Bars {
    fn bar(&mut self, node: &str) -> indicatif::ProgressBar {
        if let Some(b) = self.bars.get(node) {
            return b.clone();
        }
        // No bar until the plan says how many steps there are (an empty length draws full).
        let style = indicatif::ProgressStyle::with_template("{prefix:>12.bold} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let b = self.multi.add(indicatif::ProgressBar::new(0));
        b.set_style(style);
        b.set_prefix(node.to_string());
        b.set_message("waiting for its plan");
        self.bars.insert(node.into(), b.clone());
        b
    }
}

impl View for Bars {
    fn nodes(&mut self, nodes: &[String]) {
        for n in nodes {
            self.bar(n);
        }
    }
    fn plan(&mut self, node: &str, total: usize) {
        let b = self.bar(node);
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>12.bold} [{bar:30.cyan/blue}] {pos:>3}/{len:3} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        b.set_style(style);
        b.set_length(total as u64);
        b.set_message("running");
    }
    fn step(&mut self, node: &str, r: &StepResult) {
        let b = self.bar(node);
        b.inc(1);
        b.set_message(format!("{} {}", mark(r).trim(), r.id));
    }
    fn node_done(&mut self, node: &str, s: &NodeStatus) {
        let b = self.bar(node);
        let msg = if s.comment.is_empty() {
            s.state.clone()
        } else {
            format!("{}: {}", s.state, s.comment.lines().next().unwrap_or(""))
        };
        b.finish_with_message(msg);
    }
    fn finish(&mut self) {
        for b in self.bars.values() {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}

struct Quiet;
impl View for Quiet {
    fn nodes(&mut self, _: &[String]) {}
    fn plan(&mut self, _: &str, _: usize) {}
    fn step(&mut self, _: &str, _: &StepResult) {}
    fn node_done(&mut self, _: &str, _: &NodeStatus) {}
    fn finish(&mut self) {}
}

/// Watches the run until its final status; shows progress on stderr unless `quiet`.
pub async fn follow(kv: &Kv, run: &str, from_rev: i64, quiet: bool) -> Result<RunStatus> {
    let mut view: Box<dyn View> = if quiet {
        Box::new(Quiet)
    } else if std::io::stderr().is_terminal() {
        Box::new(Bars {
            multi: indicatif::MultiProgress::new(),
            bars: BTreeMap::new(),
        })
    } else {
        Box::new(Lines {
            totals: BTreeMap::new(),
            done: BTreeMap::new(),
        })
    };
    let prefix = run_prefix(run);
    // What happened before the watch starts is read first, then the watch goes on from there.
    let (existing, rev) = kv.list(&prefix).await?;
    let mut watch = kv.watch(&prefix, rev.max(from_rev) + 1);
    let mut pending: Vec<crate::agent::kv::Event> = existing
        .into_iter()
        .map(|kv_| crate::agent::kv::Event { put: true, kv: kv_ })
        .collect();
    let mut announced = false;
    let mut waiting_note = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        for ev in pending.drain(..) {
            if !ev.put {
                continue;
            }
            match parse_run_key(&ev.kv.key) {
                RunKey::Status(_) => {
                    let s: RunStatus = serde_json::from_slice(&ev.kv.value)?;
                    if !announced && !s.nodes.is_empty() {
                        view.nodes(&s.nodes);
                        announced = true;
                    }
                    if s.is_final() {
                        view.finish();
                        return Ok(s);
                    }
                }
                RunKey::Plan(_, node) => {
                    if let Ok(p) = serde_json::from_slice::<crate::engine::Plan>(&ev.kv.value) {
                        view.plan(&node, p.steps.iter().filter(|s| !s.is_check()).count());
                    }
                }
                RunKey::Step(_, node, _) => {
                    if let Ok(r) = serde_json::from_slice::<StepResult>(&ev.kv.value) {
                        view.step(&node, &r);
                    }
                }
                RunKey::NodeStatus(_, node) => {
                    let s: NodeStatus = serde_json::from_slice(&ev.kv.value)?;
                    if s.is_final() {
                        view.node_done(&node, &s);
                    }
                }
                _ => {}
            }
        }
        tokio::select! {
            batch = watch.recv() => {
                let Some(batch) = batch else {
                    return Err(Error::Unavailable(format!("the watch on run {run} ended")));
                };
                pending = batch?;
            }
            _ = tokio::time::sleep_until(waiting_note), if !announced => {
                eprintln!(
                    "run {run}: still waiting for the run controller to assign it (is there a \
                     Raft leader? see `eden cluster status`)"
                );
                waiting_note += Duration::from_secs(3600);
            }
        }
    }
}

/// Every node's results, in run_num order.
pub async fn results(kv: &Kv, run: &str) -> Result<BTreeMap<String, Vec<StepResult>>> {
    let (kvs, _) = kv.list(&run_nodes_prefix(run)).await?;
    let mut out: BTreeMap<String, Vec<StepResult>> = BTreeMap::new();
    for item in kvs {
        if let RunKey::Step(_, node, _) = parse_run_key(&item.key) {
            if let Ok(r) = serde_json::from_slice::<StepResult>(&item.value) {
                out.entry(node).or_default().push(r);
            }
        }
    }
    for v in out.values_mut() {
        v.sort_by_key(|r| r.run_num);
    }
    Ok(out)
}

/// Node statuses of a run.
pub async fn node_statuses(
    kv: &Kv,
    run: &str,
    nodes: &[String],
) -> Result<BTreeMap<String, Option<NodeStatus>>> {
    let mut out = BTreeMap::new();
    for n in nodes {
        let s = kv.get(&node_status_key(run, n)).await?;
        out.insert(
            n.clone(),
            s.and_then(|s| serde_json::from_slice::<NodeStatus>(&s.value).ok()),
        );
    }
    Ok(out)
}

/// Counts of nodes x steps by outcome.
pub fn tally(results: &BTreeMap<String, Vec<StepResult>>) -> Value {
    let (mut ok, mut changed, mut failed, mut skipped) = (0, 0, 0, 0);
    for r in results.values().flatten() {
        match (r.result, r.ran, has_changes(&r.changes)) {
            (Some(false), _, _) => failed += 1,
            (Some(true), false, _) => skipped += 1,
            (_, _, true) => changed += 1,
            _ => ok += 1,
        }
    }
    json!({"ok": ok, "changed": changed, "failed": failed, "skipped": skipped,
           "steps": ok + changed + failed + skipped})
}

/// Prints the outcome and returns the exit code.
pub async fn report(kv: &Kv, run: &str, status: &RunStatus, json_out: bool) -> Result<i32> {
    let results = results(kv, run).await?;
    let statuses = node_statuses(kv, run, &status.nodes).await?;
    let mut summary = tally(&results);
    let node_states: Map<String, Value> = statuses
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                json!({
                    "state": s.as_ref().map(|s| s.state.as_str()).unwrap_or("unknown"),
                    "comment": s.as_ref().map(|s| s.comment.as_str()).unwrap_or(""),
                }),
            )
        })
        .collect();
    summary["nodes"] = json!(status.nodes.len());
    summary["state"] = json!(status.state);
    let failed = status.state != "done" || summary["failed"].as_u64().unwrap_or(0) > 0;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json_out {
        let nodes: Map<String, Value> = status
            .nodes
            .iter()
            .map(|n| {
                let steps: Vec<Value> = results
                    .get(n)
                    .map(|rs| rs.iter().map(step_json).collect())
                    .unwrap_or_default();
                (n.clone(), Value::Array(steps))
            })
            .collect();
        let doc = json!({
            "run": run,
            "state": status.state,
            "comment": status.comment,
            "nodes": nodes,
            "node_status": node_states,
            "summary": summary,
        });
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        for n in &status.nodes {
            let rs = results.get(n).cloned().unwrap_or_default();
            let s = statuses.get(n).cloned().flatten();
            let node_sum = s
                .as_ref()
                .map(|s| s.summary.clone())
                .filter(|v| !v.is_null())
                .unwrap_or_else(|| {
                    super::apply::summary(&rs, 0.0, crate::engine::Mode::Ansible, false)
                });
            super::apply::print_human(&mut out, n, &rs, &node_sum)?;
            if let Some(s) = s.filter(|s| s.state != "done") {
                writeln!(out, "Node state: {}: {}", s.state, s.comment)?;
            }
            writeln!(out)?;
        }
        writeln!(out, "Run {run}: {} ({})", status.state, status.comment)?;
        writeln!(
            out,
            "{} node(s) x steps: {} ok, {} changed, {} failed, {} skipped",
            status.nodes.len(),
            summary["ok"],
            summary["changed"],
            summary["failed"],
            summary["skipped"]
        )?;
        if status.nodes.is_empty() {
            writeln!(out, "{}", status.comment)?;
        }
    }
    Ok(if failed { 1 } else { 0 })
}

fn step_json(r: &StepResult) -> Value {
    json!({
        "id": r.id, "name": r.name, "function": r.function, "sls": r.sls,
        "result": r.result, "changes": r.changes, "comment": r.comment,
        "duration_ms": r.duration_ms, "run_num": r.run_num, "outputs": r.outputs,
    })
}

/// `eden apply --target` / `--repo`: a cluster run of a state tree.
pub fn apply_cluster(args: &super::apply::ApplyArgs) -> Result<i32> {
    let sel = &args.selection;
    let json_out = sel.json()?;
    let target = sel.target.clone().ok_or_else(|| {
        Error::InvalidInput("cluster runs need --target EXPR (for example --target '*')".into())
    })?;
    if args.dry_targets {
        return block_on(async {
            let kv = args.remote.kv()?;
            let nodes = controller::nodes(&kv).await?;
            let hit = controller::resolve(&target, &nodes)?;
            if json_out {
                println!("{}", json!({"target": target, "nodes": hit}));
            } else {
                for n in &hit {
                    let alive = nodes.get(n).is_some_and(|v| v.alive);
                    println!("{n}{}", if alive { "" } else { " (down)" });
                }
                eprintln!("{} of {} node(s) match {target:?}", hit.len(), nodes.len());
            }
            Ok(if hit.is_empty() { 1 } else { 0 })
        });
    }
    let mode: crate::engine::Mode = sel.mode()?;
    block_on(async {
        let kv = args.remote.kv()?;
        if sel.node_name.is_some() {
            return Err(Error::InvalidInput(
                "--node-name is for --local runs: in a cluster run every node renders with its \
                 own name"
                    .into(),
            ));
        }
        // With --repo there is no PATH: the first positional word is an SLS name.
        let mut sls = sel.sls.clone();
        let (mut files, source) = match (&sel.path, &sel.repo) {
            (path, Some(spec)) => {
                if let Some(first) = path {
                    sls.insert(0, first.display().to_string());
                }
                repo_files(&kv, spec).await?
            }
            (Some(path), None) => {
                let files = blobs::read_dir_tree(path)?;
                let source = Source {
                    kind: "path".into(),
                    name: path.display().to_string(),
                    url: String::new(),
                    refname: String::new(),
                    commit: String::new(),
                    files: BTreeMap::new(),
                };
                (files, source)
            }
            (None, None) => {
                return Err(Error::InvalidInput(
                    "what should run? give a state tree PATH or --repo NAME[@REF] \
                     (eden apply PATH [SLS...] --target EXPR)"
                        .into(),
                ))
            }
        };
        // --vars files travel with the tree; every node merges them last.
        if !sel.vars.is_empty() {
            let mut merged = Value::Object(Map::new());
            for f in &sel.vars {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| Error::NotFound(format!("vars file {}: {e}", f.display())))?;
                let v: Value = serde_yaml::from_str(&text).map_err(|e| {
                    Error::InvalidInput(format!("vars file {}: not valid YAML: {e}", f.display()))
                })?;
                super::apply::merge_deep(&mut merged, v);
            }
            files.insert(
                crate::agent::CLI_VARS.into(),
                serde_yaml::to_string(&merged)
                    .map_err(|e| Error::Internal(e.to_string()))?
                    .into_bytes(),
            );
        }
        let sub = Submission {
            kind: "apply".into(),
            files,
            source,
            sls,
            target,
            mode: mode.to_string(),
            test: args.test,
            jobs: args.jobs.max(1),
            wait_secs: args.wait_secs,
        };
        run_and_report(&kv, sub, json_out).await
    })
}

async fn run_and_report(kv: &Kv, sub: Submission, json_out: bool) -> Result<i32> {
    let (id, rev) = submit(kv, sub).await?;
    if !json_out {
        eprintln!("run {id} submitted");
    }
    let status = follow(kv, &id, rev, json_out).await?;
    report(kv, &id, &status, json_out).await
}

/// The files of `NAME[@REF]` from the repository registered with `eden repo add`.
async fn repo_files(kv: &Kv, spec: &str) -> Result<(BTreeMap<String, Vec<u8>>, Source)> {
    let (name, refname) = crate::sources::parse_repo_arg(spec)?;
    let rec = kv.get(&repo_key(&name)).await?.ok_or_else(|| {
        Error::NotFound(format!(
            "no repository {name:?}; register it with `eden repo add {name} URL [--ref REF]`"
        ))
    })?;
    let rec: RepoRecord = serde_json::from_slice(&rec.value)
        .map_err(|e| Error::InvalidData(format!("{}: {e}", repo_key(&name))))?;
    let refname = refname.unwrap_or_else(|| rec.refname.clone());
    let cache = crate::sources::git::default_cache_dir();
    let url = rec.url.clone();
    let r = refname.clone();
    let checkout =
        tokio::task::spawn_blocking(move || crate::sources::git::fetch(&url, &r, &cache))
            .await
            .map_err(|e| Error::Internal(format!("git task: {e}")))??;
    eprintln!(
        "repo {name}: {} at {refname} is commit {}",
        rec.url, checkout.commit
    );
    let source = Source {
        kind: "repo".into(),
        name,
        url: rec.url,
        refname,
        commit: checkout.commit.clone(),
        files: BTreeMap::new(),
    };
    Ok((checkout.files, source))
}

/// A repository URL as stored: a local path becomes absolute, so every later `--repo` finds
/// it whatever the current directory.
fn absolute_url(url: &str) -> Result<String> {
    if url.contains("://") {
        return Ok(url.to_string());
    }
    let p = PathBuf::from(url);
    let abs = if p.is_absolute() {
        p
    } else {
        std::env::current_dir()?.join(p)
    };
    Ok(abs.display().to_string())
}

/// `eden run`: one module function on the targeted nodes, like `salt '*' cmd.run ...`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    eden run --target '*' cmd.run 'uptime'\n  \
    eden run --target 'role=web and not web-3' pkg.installed name=nginx\n  \
    eden run --target db-1 file.managed /etc/motd contents='hello' --test")]
pub struct RunArgs {
    /// Which nodes: name globs (web-*), key=value on labels and facts, lists (a,b), and/or/not.
    #[arg(long)]
    pub target: String,
    /// MODULE.FUNCTION, e.g. cmd.run or file.managed.
    pub function: String,
    /// Arguments: the first one without `=` is `name`; the others are key=value (values are
    /// YAML: numbers, true/false, [lists]).
    pub args: Vec<String>,
    /// Report what would change and change nothing.
    #[arg(long)]
    pub test: bool,
    /// human or json.
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    pub output: String,
    /// Seconds to wait for another node (cross-node values, sync).
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

pub fn run_adhoc(args: RunArgs) -> Result<i32> {
    let (module, function) = args.function.split_once('.').ok_or_else(|| {
        Error::InvalidInput(format!(
            "{:?} is not MODULE.FUNCTION (for example cmd.run or file.managed)",
            args.function
        ))
    })?;
    if module.is_empty() || function.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{:?} is not MODULE.FUNCTION",
            args.function
        )));
    }
    let mut fargs = Map::new();
    for a in &args.args {
        match a.split_once('=') {
            Some((k, v)) if !k.is_empty() && !k.contains(' ') => {
                let v: Value = serde_yaml::from_str(v).unwrap_or(Value::String(v.to_string()));
                fargs.insert(k.to_string(), v);
            }
            _ if !fargs.contains_key("name") => {
                fargs.insert("name".into(), Value::String(a.clone()));
            }
            _ => {
                return Err(Error::InvalidInput(format!(
                    "argument {a:?}: only the first argument may be given without key=; \
                     write it as key=value"
                )))
            }
        }
    }
    let json_out = args.output == "json";
    let files = adhoc_tree(&args.function, &fargs);
    let sub = Submission {
        kind: "run".into(),
        files,
        source: Source {
            kind: "inline".into(),
            name: args.function.clone(),
            url: String::new(),
            refname: String::new(),
            commit: String::new(),
            files: BTreeMap::new(),
        },
        sls: vec!["run".into()],
        target: args.target.clone(),
        mode: "ansible".into(),
        test: args.test,
        jobs: 1,
        wait_secs: args.wait_secs,
    };
    block_on(async move {
        let kv = args.remote.kv()?;
        run_and_report(&kv, sub, json_out).await
    })
}

/// `eden runs list|show ID`.
#[derive(Args, Debug)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub command: RunsCommand,
}

#[derive(Subcommand, Debug)]
pub enum RunsCommand {
    /// The runs the cluster remembers, newest last.
    List {
        /// human or json.
        #[arg(long, default_value = "human", value_parser = ["human", "json"])]
        output: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// One run's request, status and every node's results.
    Show {
        /// The run id (from `eden runs list`).
        id: String,
        /// human or json.
        #[arg(long, default_value = "human", value_parser = ["human", "json"])]
        output: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

pub fn runs(args: RunsArgs) -> Result<i32> {
    match args.command {
        RunsCommand::List { output, remote } => block_on(async move {
            let kv = remote.kv()?;
            let (kvs, _) = kv.list(RUNS).await?;
            let mut rows: BTreeMap<String, (Option<RunRequest>, Option<RunStatus>)> =
                BTreeMap::new();
            for item in kvs {
                match parse_run_key(&item.key) {
                    RunKey::Request(id) => {
                        rows.entry(id).or_default().0 = serde_json::from_slice(&item.value).ok()
                    }
                    RunKey::Status(id) => {
                        rows.entry(id).or_default().1 = serde_json::from_slice(&item.value).ok()
                    }
                    _ => {}
                }
            }
            if output == "json" {
                let list: Vec<Value> = rows
                    .iter()
                    .map(|(id, (req, st))| json!({"id": id, "request": req, "status": st}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<22} {:<8} {:<7} {:<20} WHAT",
                    "RUN", "STATE", "KIND", "TARGET"
                );
                for (id, (req, st)) in &rows {
                    let state = st.as_ref().map(|s| s.state.as_str()).unwrap_or("pending");
                    let (kind, target, what) = req
                        .as_ref()
                        .map(|r| {
                            let what = match r.source.kind.as_str() {
                                "repo" => format!(
                                    "{}@{} ({})",
                                    r.source.name,
                                    r.source.refname,
                                    &r.source.commit[..r.source.commit.len().min(12)]
                                ),
                                _ => r.source.name.clone(),
                            };
                            (r.kind.clone(), r.target.clone(), what)
                        })
                        .unwrap_or_default();
                    println!("{id:<22} {state:<8} {kind:<7} {target:<20} {what}");
                }
            }
            Ok(0)
        }),
        RunsCommand::Show { id, output, remote } => block_on(async move {
            let kv = remote.kv()?;
            let status = kv.get(&run_status_key(&id)).await?;
            let status: RunStatus = match status {
                Some(s) => serde_json::from_slice(&s.value)?,
                None => {
                    if kv.get(&request_key(&id)).await?.is_none() {
                        return Err(Error::NotFound(format!(
                            "no run {id:?}; list them with `eden runs list`"
                        )));
                    }
                    RunStatus {
                        state: "pending".into(),
                        nodes: vec![],
                        comment: "not assigned yet".into(),
                        summary: Value::Null,
                        updated_ms: 0,
                    }
                }
            };
            report(&kv, &id, &status, output == "json").await
        }),
    }
}

/// `eden events [--follow]`.
#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Keep printing new events as they happen.
    #[arg(long, short)]
    pub follow: bool,
    /// Only this run's events.
    #[arg(long)]
    pub run: Option<String>,
    /// human or json (one JSON object per line).
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    pub output: String,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

fn print_event(e: &Value, json_out: bool, run: Option<&str>) {
    if let Some(r) = run {
        if e["run"].as_str() != Some(r) {
            return;
        }
    }
    if json_out {
        println!("{e}");
        return;
    }
    let ms = e["time_ms"].as_u64().unwrap_or(0);
    let secs = ms / 1000;
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        ms % 1000
    );
    let result = match e["result"].as_bool() {
        Some(true) => " ok",
        Some(false) => " FAILED",
        None => "",
    };
    let step = e["step"].as_str().filter(|s| !s.is_empty());
    println!(
        "{time} {:<12} {:<14} {}{}{} {}",
        e["node"].as_str().unwrap_or("?"),
        e["kind"].as_str().unwrap_or("?"),
        e["run"].as_str().unwrap_or(""),
        step.map(|s| format!(" {s}")).unwrap_or_default(),
        result,
        e["comment"].as_str().unwrap_or("")
    );
}

pub fn events(args: EventsArgs) -> Result<i32> {
    let json_out = args.output == "json";
    block_on(async move {
        let kv = args.remote.kv()?;
        let (kvs, rev) = kv.list(EVENTS).await?;
        for item in kvs {
            let v: Value = serde_json::from_slice(&item.value).unwrap_or(Value::Null);
            print_event(&v, json_out, args.run.as_deref());
        }
        if !args.follow {
            return Ok(0);
        }
        let _ = std::io::stdout().flush();
        let mut watch = kv.watch(EVENTS, rev + 1);
        while let Some(batch) = watch.recv().await {
            for ev in batch? {
                if ev.put {
                    let v: Value = serde_json::from_slice(&ev.kv.value).unwrap_or(Value::Null);
                    print_event(&v, json_out, args.run.as_deref());
                }
            }
            let _ = std::io::stdout().flush();
        }
        Ok(0)
    })
}

/// `eden repo add|list`.
#[derive(Args, Debug)]
pub struct RepoArgs {
    #[command(subcommand)]
    pub command: RepoCommand,
}

#[derive(Subcommand, Debug)]
pub enum RepoCommand {
    /// Register a git repository of states: `eden apply --repo NAME[@REF]` then runs it.
    Add {
        /// A short name for it.
        name: String,
        /// file:///path, /path or git://host/repo (https:// and ssh:// are not in this build).
        url: String,
        /// The branch, tag or commit used when `--repo NAME` names none.
        #[arg(long = "ref", default_value = "HEAD")]
        refname: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// The registered repositories.
    List {
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

pub fn repo(args: RepoArgs) -> Result<i32> {
    match args.command {
        RepoCommand::Add {
            name,
            url,
            refname,
            remote,
        } => {
            crate::cluster::join::validate_name(&name)?;
            let url = absolute_url(&url)?;
            block_on(async move {
                let kv = remote.kv()?;
                // Checked now, so a wrong URL or ref fails here rather than in a run.
                let cache = crate::sources::git::default_cache_dir();
                let (u, r) = (url.clone(), refname.clone());
                let c =
                    tokio::task::spawn_blocking(move || crate::sources::git::fetch(&u, &r, &cache))
                        .await
                        .map_err(|e| Error::Internal(format!("git task: {e}")))??;
                let rec = RepoRecord {
                    name: name.clone(),
                    url,
                    refname,
                };
                kv.put(&repo_key(&name), serde_json::to_vec(&rec)?, 0)
                    .await?;
                println!(
                    "repo {name}: {} ({} at {} is {}, {} files)",
                    rec.url,
                    name,
                    rec.refname,
                    c.commit,
                    c.files.len()
                );
                Ok(0)
            })
        }
        RepoCommand::List { remote } => block_on(async move {
            let kv = remote.kv()?;
            let (kvs, _) = kv.list(REPOS).await?;
            for item in kvs {
                if let Ok(r) = serde_json::from_slice::<RepoRecord>(&item.value) {
                    println!("{:<16} {:<40} {}", r.name, r.url, r.refname);
                }
            }
            Ok(0)
        }),
    }
}
