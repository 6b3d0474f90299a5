//! `eden plan`: print the ordered plan for states without running anything. In genius mode it
//! also prints each rewrite with its reason.

use std::io::Write;

use super::apply::Selection;
use crate::engine::Plan;
use crate::error::Result;

/// `eden plan` arguments: the same selection as `eden apply`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub selection: Selection,
}

/// Writes a plan for people: one numbered line per step, its requisites under it.
pub fn print_plan(w: &mut dyn Write, node: &str, plan: &Plan) -> std::io::Result<()> {
    let steps = plan.steps.iter().filter(|s| !s.is_check()).count();
    writeln!(w, "Plan for {node}: {steps} steps, mode {}", plan.mode)?;
    let width = plan.steps.len().to_string().len();
    for (i, s) in plan.steps.iter().enumerate() {
        match s.prereq_check_of {
            Some(t) => writeln!(
                w,
                "{:>width$}. (prereq check) {} {} in test mode, for step {}",
                i + 1,
                s.function_name(),
                s.id,
                t + 1
            )?,
            None => {
                let name = if s.name != s.id {
                    format!(" name={}", s.name)
                } else {
                    String::new()
                };
                writeln!(
                    w,
                    "{:>width$}. {} {}{name}  [{}]",
                    i + 1,
                    s.function_name(),
                    s.id,
                    s.at
                )?
            }
        }
        if let Some(run) = s.run_options() {
            writeln!(w, "{:width$}    run: {run}", "")?;
        }
        for d in &s.deps {
            let t = &plan.steps[d.step];
            let what = if t.is_check() { " (prereq check)" } else { "" };
            writeln!(
                w,
                "{:width$}    {}: {} (step {}){what}",
                "",
                d.kind.as_str(),
                t.id,
                d.step + 1
            )?;
        }
    }
    if !plan.rewrites.is_empty() {
        writeln!(w, "\nRewrites ({}):", plan.rewrites.len())?;
        for r in &plan.rewrites {
            writeln!(w, "  - {} [{}]: {}", r.kind, r.steps.join(", "), r.reason)?;
        }
    }
    Ok(())
}

pub fn run(args: PlanArgs) -> Result<i32> {
    let registry = args.selection.registry()?;
    let json_out = args.selection.json()?;
    let (_tree, ctx, plan) = args.selection.load_local(&registry, false)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json_out {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({"nodes": {ctx.node.name.clone(): plan}}),
        )?;
        writeln!(out)?;
    } else {
        print_plan(&mut out, &ctx.node.name, &plan)?;
    }
    Ok(0)
}
