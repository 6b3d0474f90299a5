//! `eden apply`: apply states. With `--local`, to this machine, with no cluster (like
//! `salt-call --local`).
//!
//! The local path, step by step:
//! 1. [`Selection::load_local`] opens the state tree ([`LocalTree`]), gathers this machine's
//!    facts ([`local_facts`]) and its variables ([`load_vars`]) into the Jinja [`Context`].
//! 2. [`engine::plan`] renders, parses and compiles the plan for the chosen mode.
//! 3. [`engine::run::run`] runs it; [`Progress`] prints each step to stderr as it finishes.
//! 4. The results are printed as a Salt-style highstate summary ([`print_human`]) or as the
//!    JSON of the CLI contract ([`to_json`]). The exit code is 1 when a step failed.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Args;
use serde_json::{json, Map, Value};

use crate::engine::{self, tree::LocalTree, Context, Mode, NodeInfo, Plan, RunOptions, StepResult};
use crate::error::{Error, Result};
use crate::modules::Registry;

/// Which states, for which node, in which mode: shared by `apply` and `plan`.
#[derive(Args, Debug, Clone)]
pub struct Selection {
    /// The state tree: a directory holding `*.sls` files (and `top.sls`, `vars/`). Not given
    /// with --repo (the words are then all SLS names).
    pub path: Option<PathBuf>,
    /// SLS names to apply (e.g. `web` or `web.nginx`). None: `top.sls` decides.
    pub sls: Vec<String>,
    /// Cluster runs: the nodes to run on. Name globs (web-*), key=value on labels and facts,
    /// lists (web-1,web-2), and/or/not with parentheses: 'role=db and not db-3'.
    #[arg(long)]
    pub target: Option<String>,
    /// A state source registered with `eden repo add`, optionally at a ref (cluster runs).
    #[arg(long)]
    pub repo: Option<String>,
    /// ansible: one step at a time in Salt's order; justdoit: parallel, requisites only;
    /// genius: explained rewrites, then parallel.
    #[arg(long, default_value = "ansible")]
    pub mode: String,
    /// Apply to this machine, without a cluster.
    #[arg(long)]
    pub local: bool,
    /// human or json.
    #[arg(long, default_value = "human")]
    pub output: String,
    /// Extra variables files (YAML), merged over the tree's `vars/` (in cluster runs they are
    /// sent with the tree and apply to every node).
    #[arg(long = "vars", value_name = "FILE")]
    pub vars: Vec<PathBuf>,
    /// --local only: the node name templates see (default: this host's name).
    #[arg(long)]
    pub node_name: Option<String>,
}

/// `eden apply` arguments.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    eden apply --local ./states web              # this machine, like salt-call --local\n  \
    eden apply ./states --target '*'             # every node; top.sls picks the SLS\n  \
    eden apply ./states web --target 'role=web and dc=eu' --mode justdoit\n  \
    eden apply --repo site@v1.2 web --target 'web-*' --test\n  \
    eden apply ./states --target 'db-*' --dry-targets   # which nodes would run\n\n\
    Cluster runs need the cluster's address and credentials: --endpoints URL --creds DIR\n\
    (or EDEN_ENDPOINTS / EDEN_CREDS), or --data-dir of a datastore node on this machine.")]
pub struct ApplyArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// Dry run: report what would change, with diffs, and change nothing.
    #[arg(long)]
    pub test: bool,
    /// The most steps running at once in justdoit and genius modes.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Cluster runs: list the nodes --target selects, and run nothing.
    #[arg(long)]
    pub dry_targets: bool,
    /// Cluster runs: seconds a step may wait for another node (cross-node values, sync,
    /// serialize).
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
    #[command(flatten)]
    pub remote: super::runs::RemoteArgs,
}

impl Selection {
    pub fn mode(&self) -> Result<Mode> {
        self.mode.parse()
    }

    pub fn json(&self) -> Result<bool> {
        match self.output.as_str() {
            "human" => Ok(false),
            "json" => Ok(true),
            other => Err(Error::InvalidInput(format!(
                "unknown output {other:?}; use human or json"
            ))),
        }
    }

    /// The tree, context and plan for `--local`.
    /// The modules a run can call: the built-ins, plus the signed extension modules in the
    /// tree's `_modules/` for a local run (verified before every call against
    /// `EDEN_MODULE_KEYS` or /etc/eden/module-keys).
    pub fn registry(&self) -> Result<Registry> {
        match (&self.path, self.local) {
            (Some(path), true) => crate::modules::ext::registry_for_local_tree(path),
            _ => Ok(Registry::builtin()),
        }
    }

    pub fn load_local(
        &self,
        registry: &Registry,
        test: bool,
    ) -> Result<(Arc<LocalTree>, Context, Plan)> {
        if !self.local {
            return Err(Error::InvalidInput(
                "this works on a local state tree: add --local (cluster runs plan on each node)"
                    .into(),
            ));
        }
        if self.repo.is_some() || self.target.is_some() {
            return Err(Error::InvalidInput(
                "--repo and --target are for cluster runs; with --local give a PATH".into(),
            ));
        }
        let mode = self.mode()?;
        let path = self.path.clone().ok_or_else(|| {
            Error::InvalidInput(
                "--local needs the state tree PATH: eden apply --local PATH [SLS...]".into(),
            )
        })?;
        let tree = Arc::new(LocalTree::new(path)?);
        let name = self.node_name.clone().unwrap_or_else(hostname);
        let facts = local_facts(&name);
        let vars = load_vars(&tree, &name, &self.vars)?;
        let mut eden = Map::new();
        eden.insert("mode".into(), json!(mode.to_string()));
        eden.insert("test".into(), json!(test));
        eden.insert("local".into(), json!(true));
        let ctx = Context {
            node: NodeInfo {
                name,
                labels: Map::new(),
                facts,
            },
            vars,
            eden,
        };
        let plan = engine::plan(tree.clone(), &self.sls, &ctx, registry, mode)?;
        Ok((tree, ctx, plan))
    }
}

/// This host's name, from the kernel.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The facts templates see as `node.facts` (and `grains`).
pub fn local_facts(name: &str) -> Map<String, Value> {
    let mut f = Map::new();
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    f.insert("hostname".into(), json!(name));
    f.insert("id".into(), json!(name));
    if let Some(k) = read("/proc/sys/kernel/osrelease") {
        f.insert("kernelrelease".into(), json!(k));
    }
    f.insert("kernel".into(), json!("Linux"));
    if let Some(osr) = read("/etc/os-release") {
        for line in osr.lines() {
            if let Some((k, v)) = line.split_once('=') {
                let v = v.trim_matches('"');
                match k {
                    "ID" => {
                        f.insert("os".into(), json!(v));
                    }
                    "VERSION_ID" => {
                        f.insert("osrelease".into(), json!(v));
                    }
                    "VERSION_CODENAME" => {
                        f.insert("oscodename".into(), json!(v));
                    }
                    _ => {}
                }
            }
        }
    }
    f.insert(
        "num_cpus".into(),
        json!(std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)),
    );
    if let Some(mem) = read("/proc/meminfo").and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
    }) {
        f.insert("mem_total".into(), json!(mem / 1024));
    }
    f
}

/// Variables for a node, like Salt pillar or hiera: `vars/common.yaml`, then
/// `vars/nodes/NAME.yaml`, then each `--vars FILE`; later files win, maps merge deeply.
pub fn load_vars(tree: &LocalTree, name: &str, extra: &[PathBuf]) -> Result<Value> {
    let mut files: Vec<PathBuf> = vec![
        tree.root().join("vars/common.yaml"),
        tree.root().join(format!("vars/nodes/{name}.yaml")),
    ];
    files.retain(|p| p.is_file());
    files.extend(extra.iter().cloned());
    let mut vars = Value::Object(Map::new());
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Error::NotFound(format!("vars file {}: {e}", file.display())))?;
        let v: Value = serde_yaml::from_str(&text).map_err(|e| {
            Error::InvalidInput(format!("vars file {}: not valid YAML: {e}", file.display()))
        })?;
        merge_deep(&mut vars, v);
    }
    Ok(vars)
}

pub fn merge_deep(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(slot) => merge_deep(slot, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Prints one line per finished step on stderr while the run goes on.
pub struct Progress {
    pub enabled: bool,
    out: Mutex<std::io::Stderr>,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        Progress {
            enabled,
            out: Mutex::new(std::io::stderr()),
        }
    }
}

impl engine::Observer for Progress {
    fn finished(&self, r: &StepResult, done: usize, total: usize) {
        if !self.enabled {
            return;
        }
        let mark = match (r.result, r.ran, has_changes(&r.changes)) {
            (Some(false), _, _) => "FAIL",
            (None, _, _) => "TEST",
            (Some(true), false, _) => "skip",
            (Some(true), true, true) => "chg ",
            (Some(true), true, false) => "ok  ",
        };
        let width = total.to_string().len();
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "[{done:>width$}/{total}] {mark} {} ({}) {:.1} ms",
            r.id, r.function, r.duration_ms
        );
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

/// Totals of a run, as `summary` in the JSON output.
pub fn summary(results: &[StepResult], total_ms: f64, mode: Mode, test: bool) -> Value {
    let failed = results.iter().filter(|r| r.result == Some(false)).count();
    let changed = results
        .iter()
        .filter(|r| r.result != Some(false) && has_changes(&r.changes))
        .count();
    json!({
        "total": results.len(),
        "succeeded": results.len() - failed,
        "failed": failed,
        "changed": changed,
        "duration_ms": (total_ms * 1000.0).round() / 1000.0,
        "mode": mode.to_string(),
        "test": test,
    })
}

/// The JSON of the CLI contract: `{"run", "nodes": {NAME: [STEP...]}, "summary"}`.
pub fn to_json(run: &str, node: &str, results: &[StepResult], summary: Value) -> Value {
    let steps: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({
                "id": r.id, "name": r.name, "function": r.function, "sls": r.sls,
                "result": r.result, "changes": r.changes, "comment": r.comment,
                "duration_ms": r.duration_ms, "run_num": r.run_num, "outputs": r.outputs,
            })
        })
        .collect();
    json!({"run": run, "nodes": {node: steps}, "summary": summary})
}

fn indent_yaml(v: &Value, pad: usize) -> String {
    let text = serde_yaml::to_string(v).unwrap_or_else(|_| v.to_string());
    text.lines().map(|l| format!("{:pad$}{l}\n", "")).collect()
}

/// A highstate-style report, like `salt-call state.apply`.
pub fn print_human(
    w: &mut dyn Write,
    node: &str,
    results: &[StepResult],
    summary: &Value,
) -> std::io::Result<()> {
    let color = std::io::stdout().is_terminal();
    let paint = |code: &str, s: &str| {
        if color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    };
    writeln!(w, "{node}:")?;
    for r in results {
        let code = match r.result {
            Some(false) => "31",
            None => "33",
            Some(true) if has_changes(&r.changes) => "36",
            Some(true) => "32",
        };
        let result = match r.result {
            Some(true) => "True",
            Some(false) => "False",
            None => "None",
        };
        let mut block = String::new();
        block.push_str("----------\n");
        block.push_str(&format!("          ID: {}\n", r.id));
        block.push_str(&format!("    Function: {}\n", r.function));
        block.push_str(&format!("        Name: {}\n", r.name));
        block.push_str(&format!("      Result: {result}\n"));
        let mut lines = r.comment.lines();
        block.push_str(&format!("     Comment: {}\n", lines.next().unwrap_or("")));
        for l in lines {
            block.push_str(&format!("              {l}\n"));
        }
        block.push_str(&format!("    Duration: {:.3} ms\n", r.duration_ms));
        if has_changes(&r.changes) {
            block.push_str("     Changes:\n");
            // A diff reads best as the text it is.
            match r.changes.get("diff").and_then(Value::as_str) {
                Some(diff) if diff.contains('\n') => {
                    let mut rest = r.changes.clone();
                    if let Some(m) = rest.as_object_mut() {
                        m.remove("diff");
                    }
                    block.push_str("              diff:\n");
                    for l in diff.lines() {
                        block.push_str(&format!("                  {l}\n"));
                    }
                    if has_changes(&rest) {
                        block.push_str(&indent_yaml(&rest, 14));
                    }
                }
                _ => block.push_str(&indent_yaml(&r.changes, 14)),
            }
        } else {
            block.push_str("     Changes:\n");
        }
        write!(w, "{}", paint(code, &block))?;
    }
    let failed = summary["failed"].as_u64().unwrap_or(0);
    writeln!(w, "\nSummary for {node}")?;
    writeln!(w, "------------")?;
    writeln!(
        w,
        "{}",
        paint(
            "32",
            &format!(
                "Succeeded: {} (changed={})",
                summary["succeeded"], summary["changed"]
            )
        )
    )?;
    let failed_line = format!("Failed:    {failed}");
    writeln!(
        w,
        "{}",
        if failed > 0 {
            paint("31", &failed_line)
        } else {
            failed_line
        }
    )?;
    writeln!(w, "------------")?;
    writeln!(w, "Total states run: {:>5}", summary["total"])?;
    writeln!(
        w,
        "Total run time: {:>10.3} ms",
        summary["duration_ms"].as_f64().unwrap_or(0.0)
    )?;
    Ok(())
}

/// Runs `eden apply`. Returns the exit code: 0 when every step succeeded, 1 otherwise.
pub fn run(args: ApplyArgs) -> Result<i32> {
    if !args.selection.local {
        if args.selection.target.is_none() {
            return Err(Error::InvalidInput(
                "say where to apply: --target EXPR for nodes of the cluster (for example \
                 --target '*' or --target role=web), or use --local to apply to this machine"
                    .into(),
            ));
        }
        return super::runs::apply_cluster(&args);
    }
    let registry = args.selection.registry()?;
    let json_out = args.selection.json()?;
    let (tree, ctx, plan) = args.selection.load_local(&registry, args.test)?;
    let opts = RunOptions {
        test: args.test,
        jobs: args.jobs.max(1),
        ..RunOptions::default()
    };
    let progress = Progress::new(!json_out);
    let start = Instant::now();
    let results = engine::run::run(&plan, &registry, tree.as_ref(), &opts, &progress);
    let total_ms = start.elapsed().as_secs_f64() * 1000.0;
    let sum = summary(&results, total_ms, plan.mode, args.test);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json_out {
        let run_id = format!(
            "local-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        );
        serde_json::to_writer_pretty(
            &mut out,
            &to_json(&run_id, &ctx.node.name, &results, sum.clone()),
        )?;
        writeln!(out)?;
    } else {
        if progress.enabled {
            eprintln!();
        }
        print_human(&mut out, &ctx.node.name, &results, &sum)?;
    }
    Ok(if sum["failed"].as_u64().unwrap_or(0) > 0 {
        1
    } else {
        0
    })
}
