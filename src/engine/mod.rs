//! engine: the state language, Salt-compatible. Pure: no network, no datastore; the only side
//! effects are the module calls made by [`run::run`].
//!
//! The pipeline, one module per stage:
//! 1. [`render`]: each `*.sls` goes through Jinja (minijinja) with `node`, `vars` and `eden` in
//!    the context. `${{ steps... }}` is kept for run time.
//! 2. [`sls`]: the rendered YAML is parsed (both Salt forms), `include:`d files are loaded,
//!    `extend:`, `_in` requisites and `use` are merged, and auto-order numbers are given: the
//!    "high data".
//! 3. [`compile`]: high data becomes one chunk per state, requisites become a graph, and the
//!    graph is sorted exactly as Salt sorts it (so `ansible` mode matches `__run_num__`).
//!    Modules, arguments and step references are checked here, before anything runs.
//! 4. [`genius`]: in `genius` mode, explained rewrites of the plan.
//! 5. [`run`]: the plan runs one step at a time (`ansible`) or in a bounded parallel pool
//!    (`justdoit`, `genius`), with Salt's requisite semantics, and yields [`run::StepResult`]s.
//!
//! What the engine does not do: fetch state trees (callers give a [`SourceTree`]), talk to
//! other nodes, or print anything. A cluster run compiles with `eden.local: false` in the
//! [`Context`] (otherwise `${{ nodes.N... }}` is a compile error) and hands [`run::run`] a
//! [`Coordinator`] ([`coord`]): the engine asks it for other nodes' step values and before and
//! after steps with cross-node run options (`serialize`, `sync`, `target_limit`).

use std::sync::Arc;

use serde_json::Value;

pub mod compile;
pub mod coord;
pub mod genius;
pub mod refs;
pub mod render;
pub mod run;
pub mod sls;
pub mod tree;

pub use compile::{CompileOptions, Mode, Plan, PlanStep, Rewrite};
pub use coord::{Admission, Coordinator};
pub use render::{Context, NodeInfo};
pub use run::{Observer, Quiet, RunOptions, StepResult};

use crate::error::{Error, Result};
use crate::modules::{Registry, SourceTree};

/// Renders and parses the named SLS files (and their includes) into high data.
pub fn load(tree: Arc<dyn SourceTree>, sls: &[String], ctx: &Context) -> Result<sls::High> {
    sls::Loader::new(tree, ctx).load(sls)
}

/// Renders, parses and compiles the named SLS files into a plan for `mode`. With no SLS names,
/// `top.sls` chooses them for `ctx.node`. `${{ nodes.N.steps... }}` references compile only
/// when `ctx.eden["local"]` is `false`: a cluster run's agent says so, and its coordinator
/// resolves them. Absent or `true` (`eden apply --local`), they are an error.
pub fn plan(
    tree: Arc<dyn SourceTree>,
    sls: &[String],
    ctx: &Context,
    registry: &Registry,
    mode: Mode,
) -> Result<Plan> {
    let names = if sls.is_empty() {
        top(tree.clone(), ctx)?
    } else {
        sls.to_vec()
    };
    let high = load(tree, &names, ctx)?;
    let opts = compile::CompileOptions {
        remote_refs: ctx.eden.get("local").and_then(Value::as_bool) == Some(false),
    };
    let mut plan = compile::compile_with(&high, registry, mode, opts)?;
    if mode == Mode::Genius {
        genius::rewrite(&mut plan);
    }
    Ok(plan)
}

/// The SLS names `top.sls` assigns to this node, in order. Targets are globs on the node name,
/// or `key:value` globs on facts and labels with `- match: grain`.
pub fn top(tree: Arc<dyn SourceTree>, ctx: &Context) -> Result<Vec<String>> {
    let source = match tree.read("top.sls") {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(Error::NotFound(_)) => {
            return Err(Error::InvalidInput(
                "no SLS named and no top.sls in the state tree; name the SLS files to apply \
                 (eden apply --local PATH SLS...) or add a top.sls"
                    .into(),
            ))
        }
        Err(e) => return Err(e),
    };
    let text = render::render(tree, "top.sls", &source, ctx)?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("top.sls:{}:{}", l.line(), l.column()))
            .unwrap_or_else(|| "top.sls".into());
        Error::InvalidInput(format!("{at}: not valid YAML: {e}"))
    })?;
    let json: Value =
        serde_json::to_value(&doc).map_err(|e| Error::InvalidInput(format!("top.sls: {e}")))?;
    let mut out: Vec<String> = Vec::new();
    let Some(envs) = json.as_object() else {
        return Err(Error::InvalidInput(
            "top.sls: expected `base:` mapping targets to lists of SLS names".into(),
        ));
    };
    let Some(base) = envs.get("base").and_then(Value::as_object) else {
        return Err(Error::InvalidInput(
            "top.sls: expected a `base:` environment mapping targets to SLS lists".into(),
        ));
    };
    for (target, list) in base {
        let items = list.as_array().cloned().unwrap_or_default();
        let matcher = items
            .iter()
            .find_map(|i| i.get("match").and_then(Value::as_str))
            .unwrap_or("glob");
        let hit = match matcher {
            "glob" => compile::fnmatch(&ctx.node.name, target),
            "grain" | "label" => {
                let (k, pat) = target.split_once(':').unwrap_or((target.as_str(), "*"));
                ctx.node
                    .facts
                    .get(k)
                    .or_else(|| ctx.node.labels.get(k))
                    .map(|v| match v {
                        Value::String(s) => compile::fnmatch(s, pat),
                        other => compile::fnmatch(&other.to_string(), pat),
                    })
                    .unwrap_or(false)
            }
            other => {
                return Err(Error::InvalidInput(format!(
                    "top.sls: target {target:?} uses match: {other}; eden supports glob and grain"
                )))
            }
        };
        if !hit {
            continue;
        }
        for i in items {
            if let Value::String(s) = i {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
    }
    Ok(out)
}
