//! cli: the `eden` command line. One file per command; this file only dispatches.
//!
//! Client commands reach the cluster only through the etcd API, so they work against any
//! datastore node.

use clap::{Parser, Subcommand};

pub mod apply;
pub mod bench;
pub mod client;
pub mod cluster;
pub mod demo;
pub mod doc;
pub mod module;
pub mod plan;
pub mod runs;
pub mod serve;

use crate::error::Result;

#[derive(Parser, Debug)]
#[command(
    name = "eden",
    version,
    about = "Configuration management for fleets of servers, in one binary."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node: a voter or standby of the datastore serving the etcd API, or an agent only.
    Serve(serve::ServeArgs),
    /// Apply states to the nodes --target selects (or to this machine with --local).
    Apply(apply::ApplyArgs),
    /// Run one module function on the targeted nodes (like `salt '*' cmd.run`).
    Run(runs::RunArgs),
    /// Past and running cluster runs: `list`, `show ID`.
    Runs(runs::RunsArgs),
    /// What happened in the cluster: runs, steps, lost nodes, role changes.
    Events(runs::EventsArgs),
    /// Git repositories of states: `add NAME URL [--ref REF]`, `list`.
    Repo(runs::RepoArgs),
    /// Print the ordered plan for states without running them.
    Plan(plan::PlanArgs),
    /// The reference page of a module: arguments, outputs, examples.
    Doc(doc::DocArgs),
    /// Signed extension modules: keygen, sign, verify, add.
    Module(module::ModuleArgs),
    /// Start a 5-node cluster on loopback, apply states through it, show a live failover.
    Demo(demo::DemoArgs),
    /// Inspect and repair the cluster: `status`, `recover`.
    Cluster(cluster::ClusterArgs),
    /// Load an etcd v3 endpoint (eden or etcd) and report throughput and latency.
    Bench(bench::BenchArgs),
}

/// Runs the parsed command and returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Apply(args) => apply::run(args),
        Command::Run(args) => runs::run_adhoc(args),
        Command::Runs(args) => runs::runs(args),
        Command::Events(args) => runs::events(args),
        Command::Repo(args) => runs::repo(args),
        Command::Plan(args) => plan::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Module(args) => module::run(args),
        Command::Doc(args) => doc::run(args),
    }
}
