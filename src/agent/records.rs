//! The control plane's keys and the JSON records stored under them (DESIGN §4). Every writer
//! and reader of `/eden/nodes/`, `/eden/blobs/`, `/eden/repos/` and `/eden/runs/` goes through
//! these names and types, so the layout is written down once.
//!
//! ```text
//! /eden/nodes/<node>                        NodeRecord (the node's agent writes it at start)
//! /eden/nodes/<node>/facts                  facts JSON (os, kernel, hostname, fqdn, ips, ...)
//! /eden/nodes/<node>/alive                  attached to the agent's lease: gone = node down
//! /eden/nodes/<node>/assigned/<run>         an assignment: the run controller wrote it
//! /eden/blobs/<sha256>                      file contents, content-addressed
//! /eden/repos/<name>                        RepoRecord
//! /eden/runs/<run>/request                  RunRequest (the CLI writes it)
//! /eden/runs/<run>/status                   RunStatus (the run controller)
//! /eden/runs/<run>/nodes/<node>/plan        the node's compiled plan (its agent)
//! /eden/runs/<run>/nodes/<node>/status      NodeStatus (its agent; `lost` by the controller)
//! /eden/runs/<run>/nodes/<node>/steps/<id>  StepResult of one step (its agent)
//! /eden/runs/<run>/slots/<step>/<k>         `serialize` slots, attached to holders' leases
//! /eden/events/<time>-<node>-<seq>          Event, attached to a retention lease
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const NODES: &str = "/eden/nodes/";
pub const BLOBS: &str = "/eden/blobs/";
pub const REPOS: &str = "/eden/repos/";
pub const RUNS: &str = "/eden/runs/";
pub const EVENTS: &str = "/eden/events/";

pub fn node_key(node: &str) -> String {
    format!("{NODES}{node}")
}
pub fn facts_key(node: &str) -> String {
    format!("{NODES}{node}/facts")
}
pub fn alive_key(node: &str) -> String {
    format!("{NODES}{node}/alive")
}
pub fn assigned_prefix(node: &str) -> String {
    format!("{NODES}{node}/assigned/")
}
pub fn assigned_key(node: &str, run: &str) -> String {
    format!("{NODES}{node}/assigned/{run}")
}
pub fn blob_key(sha: &str) -> String {
    format!("{BLOBS}{sha}")
}
pub fn repo_key(name: &str) -> String {
    format!("{REPOS}{name}")
}
pub fn run_prefix(run: &str) -> String {
    format!("{RUNS}{run}/")
}
pub fn request_key(run: &str) -> String {
    format!("{RUNS}{run}/request")
}
pub fn run_status_key(run: &str) -> String {
    format!("{RUNS}{run}/status")
}
pub fn run_nodes_prefix(run: &str) -> String {
    format!("{RUNS}{run}/nodes/")
}
pub fn plan_key(run: &str, node: &str) -> String {
    format!("{RUNS}{run}/nodes/{node}/plan")
}
pub fn node_status_key(run: &str, node: &str) -> String {
    format!("{RUNS}{run}/nodes/{node}/status")
}
pub fn steps_prefix(run: &str, node: &str) -> String {
    format!("{RUNS}{run}/nodes/{node}/steps/")
}
pub fn step_key(run: &str, node: &str, step: &str) -> String {
    format!("{RUNS}{run}/nodes/{node}/steps/{}", escape(step))
}
pub fn slots_prefix(run: &str, step: &str) -> String {
    format!("{RUNS}{run}/slots/{}/", escape(step))
}

/// Step IDs are often paths: `/` and `%` are escaped so that an ID is one key segment.
pub fn escape(id: &str) -> String {
    id.replace('%', "%25").replace('/', "%2F")
}

pub fn unescape(seg: &str) -> String {
    seg.replace("%2F", "/").replace("%25", "%")
}

/// Which part of a run a key under `/eden/runs/` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunKey {
    Request(String),
    Status(String),
    Plan(String, String),
    NodeStatus(String, String),
    Step(String, String, String),
    Other,
}

pub fn parse_run_key(key: &[u8]) -> RunKey {
    let Ok(key) = std::str::from_utf8(key) else {
        return RunKey::Other;
    };
    let Some(rest) = key.strip_prefix(RUNS) else {
        return RunKey::Other;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [run, "request"] => RunKey::Request(run.to_string()),
        [run, "status"] => RunKey::Status(run.to_string()),
        [run, "nodes", node, "plan"] => RunKey::Plan(run.to_string(), node.to_string()),
        [run, "nodes", node, "status"] => RunKey::NodeStatus(run.to_string(), node.to_string()),
        [run, "nodes", node, "steps", step] => {
            RunKey::Step(run.to_string(), node.to_string(), unescape(step))
        }
        _ => RunKey::Other,
    }
}

/// `/eden/nodes/<name>`: who a node is and how to reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub peer_addr: String,
    pub client_addr: String,
    /// `auto` (may hold the datastore) or `never` (agent only).
    pub datastore: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// 0 for an agent-only node.
    #[serde(default)]
    pub raft_id: u64,
    /// The eden version the node runs.
    #[serde(default)]
    pub version: String,
}

/// `/eden/repos/<name>`: a git state source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepoRecord {
    pub name: String,
    pub url: String,
    /// The ref used when `--repo NAME` names none.
    #[serde(rename = "ref")]
    pub refname: String,
}

/// Where a run's states come from. Files are always listed by content hash; the blobs are in
/// `/eden/blobs/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// `path` (a local directory the CLI uploaded), `repo` (git), or `inline` (`eden run`).
    pub kind: String,
    /// The local path or the repository name.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub url: String,
    #[serde(default, rename = "ref")]
    pub refname: String,
    /// The commit the ref resolved to, once, for every node of the run.
    #[serde(default)]
    pub commit: String,
    /// path -> sha256 of the contents.
    pub files: BTreeMap<String, String>,
}

/// `/eden/runs/<id>/request`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRequest {
    pub id: String,
    /// Who asked: user@host of the CLI.
    pub who: String,
    pub created_ms: u64,
    /// `apply` or `run`.
    pub kind: String,
    pub source: Source,
    /// SLS names; empty means top.sls decides per node.
    #[serde(default)]
    pub sls: Vec<String>,
    pub target: String,
    pub mode: String,
    #[serde(default)]
    pub test: bool,
    #[serde(default = "default_jobs")]
    pub jobs: usize,
    /// Seconds a node may be silent (its alive key gone) before it is reported lost, and the
    /// longest a cross-node reference waits.
    #[serde(default = "default_wait")]
    pub wait_secs: u64,
}

fn default_jobs() -> usize {
    8
}
fn default_wait() -> u64 {
    300
}

/// `/eden/runs/<id>/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// `pending`, `running`, `done` or `failed`.
    pub state: String,
    /// The targeted nodes, once resolved.
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub summary: Value,
    #[serde(default)]
    pub updated_ms: u64,
}

impl RunStatus {
    pub fn is_final(&self) -> bool {
        matches!(self.state.as_str(), "done" | "failed")
    }
}

/// `/eden/runs/<id>/nodes/<node>/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// `running`, `done`, `failed` (a step failed or the plan did not compile) or `lost`.
    pub state: String,
    #[serde(default)]
    pub comment: String,
    /// Steps in the plan.
    #[serde(default)]
    pub total: usize,
    #[serde(default)]
    pub summary: Value,
    #[serde(default)]
    pub updated_ms: u64,
}

impl NodeStatus {
    pub fn is_final(&self) -> bool {
        matches!(self.state.as_str(), "done" | "failed" | "lost")
    }
}

/// `/eden/events/...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time_ms: u64,
    pub node: String,
    /// `run.assigned`, `run.started`, `step.finished`, `run.finished`, `node.lost`, ...
    pub kind: String,
    #[serde(default)]
    pub run: String,
    #[serde(default)]
    pub step: String,
    #[serde(default)]
    pub result: Option<bool>,
    #[serde(default)]
    pub comment: String,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An event key that sorts by time: `/eden/events/<ms, 13 digits>-<node>-<seq>`.
pub fn event_key(node: &str, seq: u64) -> String {
    format!("{EVENTS}{:013}-{node}-{seq:08}", now_ms())
}

/// A new run id: time-ordered, unique enough across CLIs (millis plus random bits).
pub fn new_run_id() -> String {
    let mut b = [0u8; 3];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    format!("{:013}-{:02x}{:02x}{:02x}", now_ms(), b[0], b[1], b[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_keys_round_trip_step_ids_with_slashes() {
        let k = step_key("r1", "web-1", "/etc/app%1.conf");
        assert_eq!(k, "/eden/runs/r1/nodes/web-1/steps/%2Fetc%2Fapp%251.conf");
        assert_eq!(
            parse_run_key(k.as_bytes()),
            RunKey::Step("r1".into(), "web-1".into(), "/etc/app%1.conf".into())
        );
        assert_eq!(
            parse_run_key(b"/eden/runs/r1/nodes/a/status"),
            RunKey::NodeStatus("r1".into(), "a".into())
        );
        assert_eq!(
            parse_run_key(b"/eden/runs/r1/request"),
            RunKey::Request("r1".into())
        );
        assert_eq!(parse_run_key(b"/eden/runs/r1/slots/x/0"), RunKey::Other);
    }

    #[test]
    fn run_ids_sort_by_time() {
        let a = new_run_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_run_id();
        assert!(a < b, "{a} < {b}");
    }
}
