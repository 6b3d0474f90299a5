//! Compile: high data -> low chunks -> requisite graph -> the ordered [`Plan`].
//!
//! The order is Salt's, computed the way Salt 3007+ computes it (`salt.utils.requisite`), so a
//! plan run one step at a time (`ansible` mode) matches Salt's `__run_num__`:
//! 1. Each state becomes a chunk; `names:` expands to one chunk per name. `name` defaults to the
//!    ID.
//! 2. `cap` is 100 above the largest integer `order`. `order: first` is 0, `last` is
//!    `cap + 1000000`, a negative N is `cap + 1000000 + N`, no order at all is `cap`.
//! 3. Each requisite is an edge from the required chunk to the dependent. `prereq` adds a
//!    *prereq check* node (the target run in test mode) that the prerequiring state waits for,
//!    and makes the target wait for the prerequiring state.
//! 4. Kahn's topological sort, always taking the ready node with the smallest key: the lower of
//!    its own order and the order of the states that depend on it, then its own order, then
//!    `module + name + function`, then the node tag.
//!
//! A cycle is an error naming every state on it. An unknown requisite target, module, function or
//! `${{ steps.ID.FIELD }}` is an error before anything runs. `${{ nodes.N.steps.ID.FIELD }}` is
//! an error too unless [`CompileOptions::remote_refs`] says the plan is for a cluster run.
//!
//! The cross-node run options `serialize: N`, `sync: true` and `target_limit: N` are engine
//! keys like `order`: read here into [`PlanStep`] (a bad value is an error naming the state,
//! its `file:line` and the value), never passed to the module, and acted on by `run` through
//! the run's coordinator. This module is pure: no I/O.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::refs::{find_refs, StepRef};
use super::sls::{as_list, req_ref, High, Item};
use crate::error::{Error, Result};
use crate::modules::{Args, Registry};

/// How a plan is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One step at a time, in Salt's order.
    #[default]
    Ansible,
    /// Every step whose requisites are met runs at once, in a bounded pool.
    Justdoit,
    /// Explained rewrites over the graph, then parallel.
    Genius,
}

impl FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ansible" => Ok(Mode::Ansible),
            "justdoit" => Ok(Mode::Justdoit),
            "genius" => Ok(Mode::Genius),
            other => Err(Error::InvalidInput(format!(
                "unknown mode {other:?}; use ansible, justdoit or genius"
            ))),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Ansible => "ansible",
            Mode::Justdoit => "justdoit",
            Mode::Genius => "genius",
        })
    }
}

/// A requisite kind, in Salt's precedence order (the order matters for step 4 above).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReqKind {
    Onfail,
    OnfailAny,
    OnfailAll,
    Require,
    RequireAny,
    Onchanges,
    OnchangesAny,
    Watch,
    WatchAny,
    Prereq,
}

impl ReqKind {
    /// The order in which Salt reads a state's requisites.
    pub const DECLARED: [ReqKind; 10] = [
        ReqKind::Require,
        ReqKind::RequireAny,
        ReqKind::Watch,
        ReqKind::WatchAny,
        ReqKind::Prereq,
        ReqKind::Onfail,
        ReqKind::OnfailAny,
        ReqKind::OnfailAll,
        ReqKind::Onchanges,
        ReqKind::OnchangesAny,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReqKind::Onfail => "onfail",
            ReqKind::OnfailAny => "onfail_any",
            ReqKind::OnfailAll => "onfail_all",
            ReqKind::Require => "require",
            ReqKind::RequireAny => "require_any",
            ReqKind::Onchanges => "onchanges",
            ReqKind::OnchangesAny => "onchanges_any",
            ReqKind::Watch => "watch",
            ReqKind::WatchAny => "watch_any",
            ReqKind::Prereq => "prereq",
        }
    }

    fn weight(self) -> u8 {
        self as u8
    }
}

/// One requisite of a step: the plan entry it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dep {
    pub kind: ReqKind,
    pub step: usize,
}

/// One entry of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanStep {
    pub id: String,
    pub name: String,
    pub module: String,
    pub function: String,
    pub sls: String,
    /// Where the state is declared, `file:line:col`.
    pub at: String,
    /// The module's arguments (`name` included; requisites and `order` removed).
    pub args: Args,
    /// What this entry waits for, in Salt's order.
    pub deps: Vec<Dep>,
    /// `Some(i)`: this entry is the prereq check of entry `i`: it runs `i` in test mode.
    pub prereq_check_of: Option<usize>,
    /// For a normal step, the index of its prereq check entry.
    pub prereq_check: Option<usize>,
    /// True when `args` hold `${{ ... }}` references.
    pub has_refs: bool,
    /// `serialize: N`: at most N nodes run this step at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serialize: Option<u32>,
    /// `sync: true`: every targeted node finishes this step before any node runs a step that
    /// requires it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub sync: bool,
    /// `target_limit: N`: only N of the targeted nodes run this step (Ansible's `run_once` is
    /// `target_limit: 1`); the others record it as skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_limit: Option<u32>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl PlanStep {
    pub fn function_name(&self) -> String {
        format!("{}.{}", self.module, self.function)
    }
    pub fn is_check(&self) -> bool {
        self.prereq_check_of.is_some()
    }
    /// True when the step has cross-node run options (`serialize`, `sync`, `target_limit`), so
    /// a cluster run asks its [`Coordinator`](super::coord::Coordinator) before and after it.
    /// A prereq check entry (a test-mode probe) never does.
    pub fn coordinated(&self) -> bool {
        !self.is_check() && (self.serialize.is_some() || self.sync || self.target_limit.is_some())
    }
    /// The run options as written in SLS, e.g. `serialize: 1, sync: true`, for plan listings.
    pub fn run_options(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(n) = self.serialize {
            parts.push(format!("serialize: {n}"));
        }
        if self.sync {
            parts.push("sync: true".to_string());
        }
        if let Some(n) = self.target_limit {
            parts.push(format!("target_limit: {n}"));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// A genius-mode rewrite and why it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rewrite {
    pub kind: String,
    pub steps: Vec<String>,
    pub reason: String,
}

/// A compiled, ordered plan. Entries are in the order `ansible` mode runs them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub mode: Mode,
    pub steps: Vec<PlanStep>,
    pub rewrites: Vec<Rewrite>,
}

/// Keys the engine reads itself and never passes to a module.
const ENGINE_KEYS: &[&str] = &[
    "order",
    "names",
    "fun",
    "state",
    "parallel",
    "aggregate",
    "fire_event",
    "reload_modules",
    "onfail_stop",
    "serialize",
    "sync",
    "target_limit",
];

/// Fields every step has, besides its module's outputs.
pub const BASE_FIELDS: &[&str] = &["result", "changes", "comment", "name", "id", "duration_ms"];

#[derive(Debug, Clone)]
struct Chunk {
    id: String,
    name: String,
    module: String,
    function: String,
    sls: String,
    included_from: Vec<String>,
    at: String,
    args: Vec<(String, Value)>,
    name_order: u32,
    prereq_flag: bool,
}

impl Chunk {
    fn get(&self, key: &str) -> Option<&Value> {
        self.args.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    fn set(&mut self, key: &str, v: Value) {
        match self.args.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = v,
            None => self.args.push((key.to_string(), v)),
        }
    }
    fn tag(&self) -> String {
        format!(
            "{}_|-{}_|-{}_|-{}",
            self.module, self.id, self.name, self.function
        )
    }
    fn label(&self) -> String {
        format!("{}{}{}", self.module, self.name, self.function)
    }
    fn describe(&self) -> String {
        if self.id == self.name {
            format!("{} (SLS {}, {})", self.id, self.sls, self.at)
        } else {
            format!(
                "{} [name {}] (SLS {}, {})",
                self.id, self.name, self.sls, self.at
            )
        }
    }
}

/// Salt's `compile_high_data`: one chunk per (ID, module, name).
fn chunks_of(high: &High) -> Result<Vec<Chunk>> {
    let mut chunks = Vec::new();
    for entry in &high.entries {
        for block in &entry.blocks {
            let Some(function) = block.function() else {
                return Err(Error::InvalidInput(format!(
                    "{}: state {:?} names module {} but no function; write {}.FUNCTION",
                    entry.at(),
                    entry.id,
                    block.module,
                    block.module
                )));
            };
            let mut base = Chunk {
                id: entry.id.clone(),
                name: entry.id.clone(),
                module: block.module.clone(),
                function: function.to_string(),
                sls: entry.sls.clone(),
                included_from: entry.included_from.clone(),
                at: entry.at(),
                args: Vec::new(),
                name_order: 0,
                prereq_flag: false,
            };
            let mut names: Vec<Value> = Vec::new();
            for item in &block.items {
                let Item::Arg(k, v) = item else { continue };
                match k.as_str() {
                    "names" => {
                        for n in as_list(v.clone()) {
                            if !names.contains(&n) {
                                names.push(n);
                            }
                        }
                    }
                    "state" => {}
                    "name" => match v {
                        Value::String(s) => base.name = s.clone(),
                        Value::Number(_) | Value::Bool(_) => base.name = v.to_string(),
                        _ => base.name = entry.id.clone(),
                    },
                    _ => base.set(k, v.clone()),
                }
            }
            if names.is_empty() {
                chunks.push(base);
                continue;
            }
            for (i, n) in names.into_iter().enumerate() {
                let mut live = base.clone();
                match n {
                    Value::String(s) => live.name = s,
                    Value::Object(m) if m.len() == 1 => {
                        let (k, v) = m.into_iter().next().expect("one key");
                        live.name = k;
                        for item in as_list(v) {
                            if let Value::Object(args) = item {
                                for (ak, av) in args {
                                    live.set(&ak, av);
                                }
                            }
                        }
                    }
                    other => live.name = other.to_string(),
                }
                live.name_order = i as u32 + 1;
                chunks.push(live);
            }
        }
    }
    Ok(chunks)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Chunk(usize),
    Check(usize),
}

/// A directed multigraph that keeps insertion order, as Salt's does: the order edges were
/// added decides ties in the ordering, so it must be reproduced exactly.
#[derive(Default)]
struct Graph {
    nodes: Vec<Node>,
    tags: Vec<String>,
    by_tag: HashMap<String, usize>,
    out: Vec<Vec<(usize, Vec<ReqKind>)>>,
    inn: Vec<Vec<(usize, Vec<ReqKind>)>>,
}

impl Graph {
    fn add_node(&mut self, node: Node, tag: String) -> usize {
        if let Some(&i) = self.by_tag.get(&tag) {
            return i;
        }
        let i = self.nodes.len();
        self.nodes.push(node);
        self.by_tag.insert(tag.clone(), i);
        self.tags.push(tag);
        self.out.push(Vec::new());
        self.inn.push(Vec::new());
        i
    }

    fn add_edge(&mut self, from: usize, to: usize, kind: ReqKind) {
        fn put(list: &mut Vec<(usize, Vec<ReqKind>)>, other: usize, kind: ReqKind) {
            match list.iter_mut().find(|(o, _)| *o == other) {
                Some((_, kinds)) => {
                    if !kinds.contains(&kind) {
                        kinds.push(kind)
                    }
                }
                None => list.push((other, vec![kind])),
            }
        }
        put(&mut self.out[from], to, kind);
        put(&mut self.inn[to], from, kind);
    }

    /// One cycle, as the nodes along it, found by depth-first search.
    fn find_cycle(&self) -> Vec<(usize, usize, ReqKind)> {
        #[derive(Clone, Copy, PartialEq)]
        enum Color {
            White,
            Gray,
            Black,
        }
        let n = self.nodes.len();
        let mut color = vec![Color::White; n];
        let mut parent: Vec<Option<(usize, ReqKind)>> = vec![None; n];
        for start in 0..n {
            if color[start] != Color::White {
                continue;
            }
            // Iterative DFS: (node, next edge index, next key index).
            let mut stack = vec![(start, 0usize, 0usize)];
            color[start] = Color::Gray;
            while let Some(&mut (node, ref mut ei, ref mut ki)) = stack.last_mut() {
                if *ei >= self.out[node].len() {
                    color[node] = Color::Black;
                    stack.pop();
                    continue;
                }
                let (target, kinds) = &self.out[node][*ei];
                let kind = kinds[*ki];
                *ki += 1;
                if *ki >= kinds.len() {
                    *ei += 1;
                    *ki = 0;
                }
                let target = *target;
                match color[target] {
                    Color::Gray => {
                        let mut cycle = vec![(node, target, kind)];
                        let mut cur = node;
                        while cur != target {
                            let (prev, k) = parent[cur].expect("gray nodes have parents");
                            cycle.push((prev, cur, k));
                            cur = prev;
                        }
                        cycle.reverse();
                        return cycle;
                    }
                    Color::White => {
                        parent[target] = Some((node, kind));
                        color[target] = Color::Gray;
                        stack.push((target, 0, 0));
                    }
                    Color::Black => {}
                }
            }
        }
        Vec::new()
    }
}

/// Python's `fnmatch` for requisite globs: `*`, `?` and `[...]`.
pub fn fnmatch(name: &str, pattern: &str) -> bool {
    fn go(n: &[char], p: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&n[i..], &p[1..])),
            Some('?') => !n.is_empty() && go(&n[1..], &p[1..]),
            Some('[') => {
                let Some(close) = p.iter().skip(2).position(|c| *c == ']').map(|i| i + 2) else {
                    return n.first() == Some(&'[') && go(&n[1..], &p[1..]);
                };
                let Some(&c) = n.first() else { return false };
                let (neg, set) = match p[1] {
                    '!' => (true, &p[2..close]),
                    _ => (false, &p[1..close]),
                };
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        hit |= set[i] <= c && c <= set[i + 2];
                        i += 3;
                    } else {
                        hit |= set[i] == c;
                        i += 1;
                    }
                }
                hit != neg && go(&n[1..], &p[close + 1..])
            }
            Some(c) => n.first() == Some(c) && go(&n[1..], &p[1..]),
        }
    }
    let n: Vec<char> = name.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    go(&n, &p)
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', ']'])
}

struct Builder {
    chunks: Vec<Chunk>,
    graph: Graph,
    lookup: Vec<((String, String), Vec<usize>)>,
    lookup_idx: HashMap<(String, String), usize>,
    sls_nodes: Vec<(String, Vec<usize>)>,
    /// Per chunk: its order value, normalised in place like Salt's chunk dict.
    order: Vec<Value>,
}

impl Builder {
    fn lookup_add(&mut self, key: (String, String), node: usize) {
        let i = match self.lookup_idx.get(&key) {
            Some(&i) => i,
            None => {
                self.lookup.push((key.clone(), Vec::new()));
                self.lookup_idx.insert(key, self.lookup.len() - 1);
                self.lookup.len() - 1
            }
        };
        if !self.lookup[i].1.contains(&node) {
            self.lookup[i].1.push(node);
        }
    }

    fn sls_add(&mut self, sls: &str, node: usize) {
        match self.sls_nodes.iter_mut().find(|(s, _)| s == sls) {
            Some((_, v)) => {
                if !v.contains(&node) {
                    v.push(node)
                }
            }
            None => self.sls_nodes.push((sls.to_string(), vec![node])),
        }
    }

    fn check_tag(&self, node: usize) -> String {
        format!("{}_|-__prereq_test__", self.graph.tags[node])
    }

    fn chunk_of(&self, node: usize) -> usize {
        match self.graph.nodes[node] {
            Node::Chunk(c) | Node::Check(c) => c,
        }
    }

    fn add_prereq(&mut self, node: usize, req: usize) {
        let req_chunk = self.chunk_of(req);
        self.chunks[req_chunk].prereq_flag = true;
        let check_tag = self.check_tag(req);
        let check = match self.graph.by_tag.get(&check_tag) {
            Some(&c) => c,
            None => {
                let c = self.graph.add_node(Node::Check(req_chunk), check_tag);
                let inn = self.graph.inn[req].clone();
                for (dep, kinds) in inn {
                    for k in kinds {
                        if k != ReqKind::Prereq {
                            self.graph.add_edge(dep, c, k);
                        }
                    }
                }
                c
            }
        };
        self.graph.add_edge(check, node, ReqKind::Prereq);
        self.graph.add_edge(node, req, ReqKind::Require);
        if let Some(&own_check) = self.graph.by_tag.get(&self.check_tag(node)) {
            self.graph.add_edge(check, own_check, ReqKind::Prereq);
        }
    }

    fn add_reqs(&mut self, node: usize, has_check: bool, kind: ReqKind, reqs: &[usize]) {
        for &req in reqs {
            if kind == ReqKind::Prereq {
                self.add_prereq(node, req);
            } else {
                if has_check {
                    if let Some(&check) = self.graph.by_tag.get(&self.check_tag(node)) {
                        self.graph.add_edge(req, check, kind);
                    }
                }
                self.graph.add_edge(req, node, kind);
            }
        }
    }

    fn add_dependency(&mut self, ci: usize, kind: ReqKind, key: &str, val: &str) -> bool {
        let node = ci; // chunk nodes are added first, so chunk i is node i
        let has_check = self.chunks[ci].prereq_flag;
        let mut found = false;
        if key == "sls" {
            let hits: Vec<Vec<usize>> = self
                .sls_nodes
                .iter()
                .filter(|(s, _)| {
                    if is_glob(val) {
                        fnmatch(s, val)
                    } else {
                        s == val
                    }
                })
                .map(|(_, n)| n.clone())
                .collect();
            for reqs in hits {
                found = true;
                self.add_reqs(node, has_check, kind, &reqs);
            }
        } else if is_glob(val) {
            let hits: Vec<Vec<usize>> = self
                .lookup
                .iter()
                .filter(|((state, name), _)| state == key && fnmatch(name, val))
                .map(|(_, n)| n.clone())
                .collect();
            for reqs in hits {
                found = true;
                self.add_reqs(node, has_check, kind, &reqs);
            }
        } else if let Some(&i) = self.lookup_idx.get(&(key.to_string(), val.to_string())) {
            found = true;
            let reqs = self.lookup[i].1.clone();
            self.add_reqs(node, has_check, kind, &reqs);
        }
        found
    }

    /// Salt's `_get_chunk_order`: (effective order, own order).
    fn chunk_order(&mut self, cap: f64, node: usize) -> (f64, f64) {
        let normal = |v: &Value| -> Option<f64> {
            match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) if s == "last" => Some(cap + 1_000_000.0),
                Value::String(s) if s == "first" => Some(0.0),
                _ => None,
            }
        };
        let c = self.chunk_of(node);
        let mut order = normal(&self.order[c]).unwrap_or(cap);
        if !self.order[c].is_number() {
            self.order[c] = Value::from(order);
        }
        let name_order = std::mem::take(&mut self.chunks[c].name_order);
        if name_order > 0 {
            order += f64::from(name_order) / 10000.0;
            self.order[c] = Value::from(order);
        }
        if order < 0.0 {
            order += cap + 1_000_000.0;
            self.order[c] = Value::from(order);
        }
        let own = self.order[c].as_f64().unwrap_or(order);
        let mut child_min = f64::INFINITY;
        let mut req_order: i16 = -1;
        let out = self.graph.out[node].clone();
        for (child, kinds) in out {
            for kind in kinds {
                if req_order <= i16::from(kind.weight()) {
                    req_order = i16::from(kind.weight());
                    let cc = self.chunk_of(child);
                    let child_order = match normal(&self.order[cc]) {
                        Some(o) => o,
                        None => cap,
                    };
                    if !self.order[cc].is_number() {
                        self.order[cc] = Value::from(child_order);
                    }
                    child_min = child_min.min(child_order);
                }
            }
        }
        (order.min(child_min), own)
    }
}

#[derive(PartialEq)]
struct Key(f64, f64, String, String);
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0
            .total_cmp(&o.0)
            .then(self.1.total_cmp(&o.1))
            .then_with(|| self.2.cmp(&o.2))
            .then_with(|| self.3.cmp(&o.3))
    }
}

/// What a compile allows beyond a plain local run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompileOptions {
    /// Accept `${{ nodes.NODE.steps.ID.FIELD }}`: the plan is for a cluster run, whose
    /// coordinator resolves them. Without it such a reference is a compile error.
    pub remote_refs: bool,
}

/// Compiles high data into a plan in Salt's order, checking modules, arguments and step
/// references against `registry`. References to other nodes are rejected (a local run).
pub fn compile(high: &High, registry: &Registry, mode: Mode) -> Result<Plan> {
    compile_with(high, registry, mode, CompileOptions::default())
}

/// [`compile`] with options; a cluster run sets [`CompileOptions::remote_refs`].
pub fn compile_with(
    high: &High,
    registry: &Registry,
    mode: Mode,
    opts: CompileOptions,
) -> Result<Plan> {
    let mut chunks = chunks_of(high)?;
    add_ref_requires(&mut chunks, registry, opts)?;
    let mut b = Builder {
        order: chunks
            .iter()
            .map(|c| c.get("order").cloned().unwrap_or(Value::Null))
            .collect(),
        chunks,
        graph: Graph::default(),
        lookup: Vec::new(),
        lookup_idx: HashMap::new(),
        sls_nodes: Vec::new(),
    };
    for i in 0..b.chunks.len() {
        let c = &b.chunks[i];
        let (tag, module, name, id, sls, inc) = (
            c.tag(),
            c.module.clone(),
            c.name.clone(),
            c.id.clone(),
            c.sls.clone(),
            c.included_from.clone(),
        );
        let node = b.graph.add_node(Node::Chunk(i), tag.clone());
        if node != i {
            return Err(Error::InvalidInput(format!(
                "{}: state {id:?} is declared twice with the same module, name and function ({tag})",
                b.chunks[i].at
            )));
        }
        b.lookup_add((module.clone(), name.clone()), node);
        b.lookup_add((module, id.clone()), node);
        b.lookup_add(("id".into(), id), node);
        b.lookup_add(("id".into(), name), node);
        b.sls_add(&sls, node);
        for s in inc {
            b.sls_add(&s, node);
        }
    }
    let mut cap = 1.0f64;
    let mut errors = Vec::new();
    for i in 0..b.chunks.len() {
        let mut failed = false;
        for kind in ReqKind::DECLARED {
            let Some(list) = b.chunks[i].get(kind.as_str()).cloned() else {
                continue;
            };
            for r in as_list(list) {
                let c = &b.chunks[i];
                let Some((key, val)) = req_ref(&r) else {
                    errors.push(format!(
                        "{}: in state {:?}, {} lists {r}; expected `- module: ID`, `- ID` or \
                         `- sls: NAME`",
                        c.at,
                        c.id,
                        kind.as_str()
                    ));
                    failed = true;
                    continue;
                };
                let val = match val {
                    Value::Null => continue,
                    Value::String(s) => s,
                    _ => {
                        errors.push(format!(
                            "{}: Requisite [{}: {key}] in state [{}] in SLS [{}] must have a \
                             string as the value",
                            c.at,
                            kind.as_str(),
                            c.name,
                            c.sls
                        ));
                        failed = true;
                        continue;
                    }
                };
                if !b.add_dependency(i, kind, &key, &val) {
                    let c = &b.chunks[i];
                    errors.push(format!(
                        "{}: Referenced state does not exist for requisite [{}: ({key}: {val})] \
                         in state [{}] in SLS [{}]",
                        c.at,
                        kind.as_str(),
                        c.name,
                        c.sls
                    ));
                    failed = true;
                }
            }
        }
        if !failed {
            if let Some(Value::Number(n)) = b.chunks[i].get("order") {
                if let Some(o) = n.as_i64() {
                    let o = o as f64;
                    if o > cap - 1.0 && o > 0.0 {
                        cap = o + 100.0;
                    }
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(Error::InvalidInput(errors.join("\n")));
    }

    // Kahn's algorithm with Salt's key.
    let n = b.graph.nodes.len();
    let mut indegree: Vec<usize> = (0..n)
        .map(|i| b.graph.inn[i].iter().map(|(_, k)| k.len()).sum())
        .collect();
    let mut heap = BinaryHeap::new();
    let key_of = |b: &mut Builder, node: usize| {
        let (o1, o2) = b.chunk_order(cap, node);
        let c = b.chunk_of(node);
        Reverse((
            Key(o1, o2, b.chunks[c].label(), b.graph.tags[node].clone()),
            node,
        ))
    };
    for (node, &deg) in indegree.iter().enumerate() {
        if deg == 0 {
            let k = key_of(&mut b, node);
            heap.push(k);
        }
    }
    let mut topo = Vec::with_capacity(n);
    while let Some(Reverse((_, node))) = heap.pop() {
        topo.push(node);
        let out = b.graph.out[node].clone();
        for (t, kinds) in out {
            indegree[t] -= kinds.len();
            if indegree[t] == 0 {
                let k = key_of(&mut b, t);
                heap.push(k);
            }
        }
    }
    if topo.len() != n {
        let cycle = b.graph.find_cycle();
        let mut names: Vec<String> = Vec::new();
        let mut links = Vec::new();
        for (from, to, kind) in &cycle {
            let (fc, tc) = (b.chunk_of(*from), b.chunk_of(*to));
            names.push(b.chunks[tc].describe());
            links.push(format!(
                "{} {} {}",
                b.chunks[tc].id,
                kind.as_str(),
                b.chunks[fc].id
            ));
        }
        return Err(Error::InvalidInput(format!(
            "Recursive requisites were found: the states {} form a cycle ({}); remove one of \
             these requisites",
            names.join(", "),
            links.join(", ")
        )));
    }

    let mut position = vec![0usize; n];
    for (p, &node) in topo.iter().enumerate() {
        position[node] = p;
    }
    let mut steps = Vec::with_capacity(n);
    for &node in &topo {
        let c = &b.chunks[b.chunk_of(node)];
        let run = run_options(c)?;
        let args = module_args(c);
        let module = registry.get(&c.module).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{}: state {:?} uses module {:?}, which eden does not have; it has {}",
                c.at,
                c.id,
                c.module,
                registry.names().collect::<Vec<_>>().join(", ")
            ))
        })?;
        module
            .validate(&c.function, &args)
            .map_err(|e| Error::InvalidInput(format!("{}: state {:?}: {e}", c.at, c.id)))?;
        let deps = b.graph.inn[node]
            .iter()
            .flat_map(|(src, kinds)| {
                kinds.iter().map(|k| Dep {
                    kind: *k,
                    step: position[*src],
                })
            })
            .collect();
        let (prereq_check_of, prereq_check) = match b.graph.nodes[node] {
            Node::Check(ci) => (Some(position[ci]), None),
            Node::Chunk(_) => (
                None,
                b.graph
                    .by_tag
                    .get(&b.check_tag(node))
                    .map(|&cn| position[cn]),
            ),
        };
        let has_refs = !find_refs(&Value::Object(args.clone()))?.is_empty();
        steps.push(PlanStep {
            id: c.id.clone(),
            name: c.name.clone(),
            module: c.module.clone(),
            function: c.function.clone(),
            sls: c.sls.clone(),
            at: c.at.clone(),
            args,
            deps,
            prereq_check_of,
            prereq_check,
            has_refs,
            serialize: run.serialize,
            sync: run.sync,
            target_limit: run.target_limit,
        });
    }
    Ok(Plan {
        mode,
        steps,
        rewrites: Vec::new(),
    })
}

/// A state's cross-node run options, as read from its SLS.
#[derive(Debug, Default, PartialEq, Eq)]
struct RunOpts {
    serialize: Option<u32>,
    sync: bool,
    target_limit: Option<u32>,
}

/// Salt keywords eden accepts in the SLS but does not act on would silently change what a tree
/// does (a `listen` that never restarts a service, a `failhard` that does not stop the run),
/// so they are refused, each with what to write instead.
const UNSUPPORTED_KEYS: &[(&str, &str)] = &[
    (
        "listen",
        "use `watch` (the watch action then runs right after the watched state, not at the end)",
    ),
    (
        "listen_in",
        "use `watch_in` (the watch action then runs right after the watched state, not at the end)",
    ),
    (
        "failhard",
        "remove it, and make the states that must not run after a failure `require` this one",
    ),
];

/// Reads `serialize: N`, `sync: BOOL` and `target_limit: N`; a bad value is an error naming
/// the state, where it is declared and the value. A keyword eden does not implement is refused
/// here too (see [`UNSUPPORTED_KEYS`]).
fn run_options(c: &Chunk) -> Result<RunOpts> {
    for (key, instead) in UNSUPPORTED_KEYS {
        if c.get(key).is_some() {
            return Err(Error::InvalidInput(format!(
                "{}: state {:?}: `{key}` is not supported by eden; {instead}",
                c.at, c.id
            )));
        }
    }
    let count = |key: &str, meaning: &str| -> Result<Option<u32>> {
        let Some(v) = c.get(key) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(n) if n >= 1 && n <= u64::from(u32::MAX) => Ok(Some(n as u32)),
            _ => Err(Error::InvalidInput(format!(
                "{}: state {:?}: `{key}: {v}` is not a positive whole number; write \
                 `{key}: N` with N at least 1 ({meaning})",
                c.at, c.id
            ))),
        }
    };
    let serialize = count("serialize", "at most N nodes run the step at once")?;
    let target_limit = count("target_limit", "only N of the targeted nodes run the step")?;
    let sync = match c.get("sync") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(Error::InvalidInput(format!(
                "{}: state {:?}: `sync: {v}` is not true or false; write `sync: true` to make \
                 every node finish the step before any node goes past it",
                c.at, c.id
            )))
        }
    };
    Ok(RunOpts {
        serialize,
        sync,
        target_limit,
    })
}

fn module_args(c: &Chunk) -> Args {
    let mut args = Map::new();
    args.insert("name".into(), Value::String(c.name.clone()));
    for (k, v) in &c.args {
        let k = k.as_str();
        if ENGINE_KEYS.contains(&k)
            || super::sls::REQUISITES.contains(&k)
            || k.starts_with("__")
            || k == "name"
        {
            continue;
        }
        args.insert(k.to_string(), v.clone());
    }
    args
}

/// `${{ steps.ID.FIELD }}` in a state's arguments: check the step and field exist, and add an
/// implicit `require` on the step.
fn add_ref_requires(chunks: &mut [Chunk], registry: &Registry, opts: CompileOptions) -> Result<()> {
    let ids: HashMap<String, Vec<usize>> =
        chunks
            .iter()
            .enumerate()
            .fold(HashMap::new(), |mut m, (i, c)| {
                m.entry(c.id.clone()).or_default().push(i);
                m
            });
    for i in 0..chunks.len() {
        let args = Value::Object(module_args(&chunks[i]));
        let refs = find_refs(&args).map_err(|e| {
            Error::InvalidInput(format!("{}: state {:?}: {e}", chunks[i].at, chunks[i].id))
        })?;
        let mut required: Vec<String> = Vec::new();
        for r in refs {
            check_ref(&r, &chunks[i], chunks, &ids, registry, opts)?;
            // A step on another node is waited for through the coordinator, not a requisite.
            if r.node.is_none() && !required.contains(&r.step) {
                required.push(r.step.clone());
            }
        }
        if required.is_empty() {
            continue;
        }
        let mut list = as_list(chunks[i].get("require").cloned().unwrap_or(Value::Null));
        for step in required {
            list.push(Value::Object(Map::from_iter([(
                "id".to_string(),
                Value::String(step),
            )])));
        }
        chunks[i].set("require", Value::Array(list));
    }
    Ok(())
}

fn check_ref(
    r: &StepRef,
    me: &Chunk,
    chunks: &[Chunk],
    ids: &HashMap<String, Vec<usize>>,
    registry: &Registry,
    opts: CompileOptions,
) -> Result<()> {
    let at = format!("{}: state {:?}", me.at, me.id);
    if let Some(node) = &r.node {
        // The other node compiles its own plan; its steps and fields are checked there, and
        // the coordinator reports a missing one when this step runs.
        if opts.remote_refs {
            return Ok(());
        }
        return Err(Error::InvalidInput(format!(
            "{at}: ${{{{ nodes.{node}.steps.{}.{} }}}} refers to step {:?} on node {node:?}; \
             only a cluster run (eden apply --target ...) can resolve it, not a --local run",
            r.step,
            r.path.join("."),
            r.step
        )));
    }
    let Some(targets) = ids.get(&r.step) else {
        let mut known: Vec<&str> = ids.keys().map(String::as_str).collect();
        known.sort();
        return Err(Error::InvalidInput(format!(
            "{at}: ${{{{ steps.{}.{} }}}} names no step; the state IDs are {}",
            r.step,
            r.path.join("."),
            known.join(", ")
        )));
    };
    if r.step == me.id {
        return Err(Error::InvalidInput(format!(
            "{at}: ${{{{ steps.{}... }}}} refers to the state itself; a step can only read \
             the outputs of steps before it",
            r.step
        )));
    }
    let field = r.path.first().map(String::as_str).unwrap_or("");
    for &t in targets {
        let target = &chunks[t];
        let outputs = registry
            .get(&target.module)
            .map(|m| m.outputs(&target.function))
            .unwrap_or(&[]);
        if !BASE_FIELDS.contains(&field) && !outputs.contains(&field) {
            let mut all: Vec<&str> = BASE_FIELDS.to_vec();
            all.extend_from_slice(outputs);
            return Err(Error::InvalidInput(format!(
                "{at}: ${{{{ steps.{}.{} }}}}: {}.{} has no field {field:?}; it has {}",
                r.step,
                r.path.join("."),
                target.module,
                target.function,
                all.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnmatch_like_python() {
        assert!(fnmatch("web_conf", "web_*"));
        assert!(fnmatch("a1", "a?"));
        assert!(fnmatch("b", "[abc]"));
        assert!(!fnmatch("d", "[abc]"));
        assert!(fnmatch("d", "[!abc]"));
        assert!(fnmatch("x5", "x[0-9]"));
        assert!(!fnmatch("web", "web_*"));
    }
}
