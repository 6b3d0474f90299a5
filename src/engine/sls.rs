//! SLS files: rendered YAML -> the "high data" of one run, with Salt's include, extend,
//! requisite-in and auto-order rules.
//!
//! What this module owns:
//! - Both declaration forms, `ID: {mod.fun: [args]}` and `ID: {mod: [fun, args]}` (also
//!   `ID: mod.fun`), normalised into [`Entry`] / [`Block`] / [`Item`] in declaration order.
//! - `include:` (relative `.x` includes too), loaded depth first, each SLS once. Like Salt, the
//!   states of an included SLS get their auto-order numbers before the states of the SLS that
//!   includes it, so they run first unless requisites say otherwise.
//! - Auto-order: every state without `order:` gets the next number from 10000 up, in render order
//!   (Salt's `state_auto_order`).
//! - `extend:`, the `_in` requisites and `use`/`use_in`, merged the way Salt's
//!   `reconcile_extend` merges them: requisite lists grow, other arguments are replaced.
//!
//! Errors name the file, the line (and column where YAML reports one), the state ID and what was
//! expected. This module does no ordering; see `compile`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value};
use serde_yaml::Value as Yaml;

use super::render::{render, Context};
use crate::error::{Error, Result};
use crate::modules::SourceTree;

/// One item of a state's argument list: the function name or one `key: value`.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Fun(String),
    Arg(String, Value),
}

/// One module's declaration under a state ID.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub module: String,
    pub items: Vec<Item>,
}

impl Block {
    pub fn arg(&self, key: &str) -> Option<&Value> {
        self.items.iter().find_map(|i| match i {
            Item::Arg(k, v) if k == key => Some(v),
            _ => None,
        })
    }
    pub fn function(&self) -> Option<&str> {
        self.items.iter().find_map(|i| match i {
            Item::Fun(f) => Some(f.as_str()),
            _ => None,
        })
    }
}

/// One state ID with its declarations.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    pub sls: String,
    /// The SLS file, relative to the tree, for messages.
    pub file: String,
    /// 1-based line of the ID in the rendered file (0 when unknown).
    pub line: usize,
    /// The SLS files that included this one, nearest first.
    pub included_from: Vec<String>,
    pub blocks: Vec<Block>,
}

impl Entry {
    pub fn at(&self) -> String {
        if self.line > 0 {
            format!("{}:{}:1", self.file, self.line)
        } else {
            self.file.clone()
        }
    }
}

/// The merged states of a run, in Salt's high-data order.
#[derive(Debug, Clone, Default)]
pub struct High {
    pub entries: Vec<Entry>,
}

impl High {
    pub fn position(&self, id: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.id == id)
    }
}

/// Requisite keywords, whose lists are merged rather than replaced by `extend`.
pub const REQUISITES: &[&str] = &[
    "require",
    "require_any",
    "watch",
    "watch_any",
    "prereq",
    "onfail",
    "onfail_any",
    "onfail_all",
    "onchanges",
    "onchanges_any",
    "use",
    "require_in",
    "watch_in",
    "onfail_in",
    "onchanges_in",
    "prereq_in",
    "use_in",
];

/// One parsed SLS file.
#[derive(Debug, Default)]
pub struct SlsDoc {
    pub include: Vec<String>,
    pub extend: Vec<Entry>,
    pub entries: Vec<Entry>,
}

fn yaml_to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(*b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64().map(Value::from).unwrap_or(Value::Null)
            }
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Sequence(s) => Value::Array(s.iter().map(yaml_to_json).collect()),
        Yaml::Mapping(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (key_string(k), yaml_to_json(v)))
                .collect::<Map<_, _>>(),
        ),
        Yaml::Tagged(t) => yaml_to_json(&t.value),
    }
}

fn key_string(k: &Yaml) -> String {
    match k {
        Yaml::String(s) => s.clone(),
        Yaml::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Null => "None".into(),
        other => yaml_to_json(other).to_string(),
    }
}

/// Lines of the top-level keys in the rendered text (YAML gives no positions for keys), found
/// in one pass: a line that starts at column 0 with `key:`, `"key":` or `'key':`.
fn top_level_lines(text: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with([' ', '\t', '-', '#']) || line.is_empty() {
            continue;
        }
        let key = if let Some(q) = line.strip_prefix(['"', '\'']) {
            let quote = line.as_bytes()[0] as char;
            q.find(quote).map(|end| &q[..end])
        } else {
            line.rfind(':').map(|end| line[..end].trim_end())
        };
        if let Some(k) = key {
            out.entry(k.to_string()).or_insert(i + 1);
        }
    }
    out
}

/// Parses one rendered SLS.
pub fn parse(file: &str, sls: &str, text: &str) -> Result<SlsDoc> {
    let root: Yaml = serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("{file}:{}:{}", l.line(), l.column()))
            .unwrap_or_else(|| file.to_string());
        Error::InvalidInput(format!("{at}: not valid YAML after rendering: {e}"))
    })?;
    let mut doc = SlsDoc::default();
    let lines = top_level_lines(text);
    let map = match root {
        Yaml::Null => return Ok(doc),
        Yaml::Mapping(m) => m,
        other => {
            return Err(Error::InvalidInput(format!(
                "{file}:1:1: an SLS must be a mapping of state IDs to declarations, not {}",
                kind(&other)
            )))
        }
    };
    for (k, v) in &map {
        let key = key_string(k);
        let line = lines.get(&key).copied().unwrap_or(0);
        let at = if line > 0 {
            format!("{file}:{line}:1")
        } else {
            file.to_string()
        };
        match key.as_str() {
            "include" => {
                let Yaml::Sequence(items) = v else {
                    return Err(Error::InvalidInput(format!(
                        "{at}: include must be a list of SLS names, not {}",
                        kind(v)
                    )));
                };
                for item in items {
                    match item {
                        Yaml::String(s) => doc.include.push(s.clone()),
                        Yaml::Mapping(m) if m.len() == 1 => doc
                            .include
                            .push(key_string(m.keys().next().expect("one key"))),
                        other => {
                            return Err(Error::InvalidInput(format!(
                                "{at}: include lists SLS names; {} is not one",
                                yaml_to_json(other)
                            )))
                        }
                    }
                }
            }
            "extend" => {
                let Yaml::Mapping(m) = v else {
                    return Err(Error::InvalidInput(format!(
                        "{at}: extend must map state IDs to declarations, not {}",
                        kind(v)
                    )));
                };
                for (id, body) in m {
                    let id = key_string(id);
                    doc.extend
                        .push(parse_entry(file, sls, &id, locate_nested(text, &id), body)?);
                }
            }
            "exclude" => {
                return Err(Error::InvalidInput(format!(
                    "{at}: exclude is not supported by eden yet; remove it or the states it names"
                )))
            }
            id if id.starts_with("__") => {}
            id => doc.entries.push(parse_entry(file, sls, id, line, v)?),
        }
    }
    Ok(doc)
}

fn locate_nested(text: &str, key: &str) -> usize {
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.strip_prefix(key)
            .is_some_and(|r| r.trim_start().starts_with(':'))
        {
            return i + 1;
        }
    }
    0
}

fn kind(y: &Yaml) -> &'static str {
    match y {
        Yaml::Null => "nothing",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a list",
        Yaml::Mapping(_) => "a mapping",
        Yaml::Tagged(_) => "a tagged value",
    }
}

fn parse_entry(file: &str, sls: &str, id: &str, line: usize, body: &Yaml) -> Result<Entry> {
    let mut entry = Entry {
        id: id.to_string(),
        sls: sls.to_string(),
        file: file.to_string(),
        line,
        included_from: Vec::new(),
        blocks: Vec::new(),
    };
    let at = entry.at();
    let expected = "expected `module.function:` followed by a list of `- key: value` arguments";
    let decls: Vec<(String, Yaml)> = match body {
        Yaml::String(s) if s.contains('.') => vec![(s.clone(), Yaml::Null)],
        Yaml::Mapping(m) => m.iter().map(|(k, v)| (key_string(k), v.clone())).collect(),
        other => {
            return Err(Error::InvalidInput(format!(
                "{at}: state {id:?} is {}; {expected}",
                kind(other)
            )))
        }
    };
    for (key, value) in decls {
        if key.starts_with("__") {
            continue;
        }
        let (module, fun) = match key.split_once('.') {
            Some((m, f)) => (m.to_string(), Some(f.to_string())),
            None => (key.clone(), None),
        };
        let mut items = Vec::new();
        match &value {
            Yaml::Null => {}
            Yaml::Sequence(seq) => {
                for item in seq {
                    match item {
                        Yaml::String(f) => items.push(Item::Fun(f.clone())),
                        Yaml::Mapping(m) if m.len() == 1 => {
                            let (k, v) = m.iter().next().expect("one key");
                            items.push(Item::Arg(key_string(k), yaml_to_json(v)));
                        }
                        Yaml::Mapping(m) => {
                            let keys: Vec<String> = m.keys().map(key_string).collect();
                            return Err(Error::InvalidInput(format!(
                                "{at}: in state {id:?} ({key}), one list item holds {} keys \
                                 ({}); each argument must be its own `- key: value` item \
                                 (check the indentation)",
                                keys.len(),
                                keys.join(", ")
                            )));
                        }
                        other => {
                            return Err(Error::InvalidInput(format!(
                                "{at}: in state {id:?} ({key}), an argument is {}; {expected}",
                                kind(other)
                            )))
                        }
                    }
                }
            }
            other => {
                return Err(Error::InvalidInput(format!(
                    "{at}: in state {id:?}, {key} is given {}; {expected}",
                    kind(other)
                )))
            }
        }
        if let Some(f) = fun {
            items.push(Item::Fun(f));
        }
        let funs: Vec<&str> = items
            .iter()
            .filter_map(|i| match i {
                Item::Fun(f) => Some(f.as_str()),
                _ => None,
            })
            .collect();
        if funs.len() > 1 {
            return Err(Error::InvalidInput(format!(
                "{at}: state {id:?} declares {module}.{} and {module}.{}; one function per \
                 module per ID (give the second its own ID)",
                funs[0], funs[1]
            )));
        }
        if let Some(block) = entry.blocks.iter_mut().find(|b| b.module == module) {
            block.items.extend(items);
        } else {
            entry.blocks.push(Block { module, items });
        }
    }
    if entry.blocks.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{at}: state {id:?} declares nothing; {expected}"
        )));
    }
    Ok(entry)
}

/// Loads SLS files the way Salt's highstate renders them.
pub struct Loader<'a> {
    tree: Arc<dyn SourceTree>,
    ctx: &'a Context,
    iorder: i64,
    mods: HashSet<String>,
    extends: Vec<Entry>,
}

impl<'a> Loader<'a> {
    pub fn new(tree: Arc<dyn SourceTree>, ctx: &'a Context) -> Self {
        Loader {
            tree,
            ctx,
            iorder: 10000,
            mods: HashSet::new(),
            extends: Vec::new(),
        }
    }

    /// Loads the named SLS files (and what they include) into one high data, then applies
    /// `extend`, the `_in` requisites and `use`.
    pub fn load(mut self, sls_names: &[String]) -> Result<High> {
        let mut high = High::default();
        for sls in sls_names {
            if self.mods.contains(sls) {
                continue;
            }
            let state = self.render_state(sls)?;
            merge(&mut high.entries, state)?;
        }
        let extends = std::mem::take(&mut self.extends);
        reconcile_extend(&mut high, extends, false)?;
        requisite_in(&mut high)?;
        Ok(high)
    }

    /// Finds `a.b` as `a/b.sls` or `a/b/init.sls`.
    fn read_sls(&self, sls: &str) -> Result<(String, String)> {
        let base = sls.replace('.', "/");
        for file in [format!("{base}.sls"), format!("{base}/init.sls")] {
            match self.tree.read(&file) {
                Ok(bytes) => {
                    let text = String::from_utf8(bytes).map_err(|_| {
                        Error::InvalidInput(format!("{file}: an SLS file must be UTF-8 text"))
                    })?;
                    return Ok((file, text));
                }
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::NotFound(format!(
            "no SLS {sls:?} in the state tree: neither {base}.sls nor {base}/init.sls exists"
        )))
    }

    fn render_state(&mut self, sls: &str) -> Result<Vec<Entry>> {
        self.mods.insert(sls.to_string());
        let (file, source) = self.read_sls(sls)?;
        let text = render(self.tree.clone(), &file, &source, self.ctx)?;
        let doc = parse(&file, sls, &text)?;
        let mut state = doc.entries;
        for inc in &doc.include {
            let target = resolve_include(sls, &file, inc)
                .map_err(|e| Error::InvalidInput(format!("{file}: include {inc:?}: {e}")))?;
            if self.mods.contains(&target) {
                continue;
            }
            let mut nstate = self.render_state(&target).map_err(|e| match e {
                Error::NotFound(m) => {
                    Error::NotFound(format!("{file}: include {inc:?} cannot be loaded: {m}"))
                }
                other => other,
            })?;
            for e in &mut nstate {
                e.included_from.push(sls.to_string());
            }
            merge(&mut state, nstate)?;
        }
        self.extends.extend(doc.extend);
        for entry in &mut state {
            for block in &mut entry.blocks {
                if block.arg("order").is_none() {
                    block
                        .items
                        .push(Item::Arg("order".into(), Value::from(self.iorder)));
                    self.iorder += 1;
                }
            }
        }
        Ok(state)
    }
}

/// `.x` is relative to the SLS's package; each further dot climbs one level.
fn resolve_include(sls: &str, file: &str, inc: &str) -> std::result::Result<String, String> {
    if !inc.starts_with('.') {
        return Ok(inc.to_string());
    }
    let rest = inc.trim_start_matches('.');
    let levels = inc.len() - rest.len();
    let mut comps: Vec<&str> = sls.split('.').collect();
    if file.ends_with("/init.sls") {
        comps.push("init");
    }
    if levels > comps.len() {
        return Err(format!(
            "relative include goes above the top of the tree from {sls}"
        ));
    }
    comps.truncate(comps.len() - levels);
    comps.push(rest);
    Ok(comps.join("."))
}

/// Python's `dict.update` with Salt's conflict check: an ID from another SLS is an error.
fn merge(into: &mut Vec<Entry>, from: Vec<Entry>) -> Result<()> {
    for e in from {
        if let Some(pos) = into.iter().position(|x| x.id == e.id) {
            if into[pos].sls != e.sls {
                return Err(Error::InvalidInput(format!(
                    "Detected conflicting IDs, SLS IDs need to be globally unique. The \
                     conflicting ID is {:?} and is found in SLS {:?} ({}) and SLS {:?} ({})",
                    e.id,
                    into[pos].sls,
                    into[pos].at(),
                    e.sls,
                    e.at()
                )));
            }
            into[pos] = e;
        } else {
            into.push(e);
        }
    }
    Ok(())
}

/// Finds the entry an extension or `_in` names: by ID with that module, else by `name`.
fn find_target(high: &High, name: &str, module: &str) -> Option<usize> {
    if let Some(p) = high.position(name) {
        if high.entries[p].blocks.iter().any(|b| b.module == module) {
            return Some(p);
        }
    }
    let hits: Vec<usize> = high
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            e.blocks
                .iter()
                .any(|b| b.module == module && b.arg("name").and_then(Value::as_str) == Some(name))
        })
        .map(|(i, _)| i)
        .collect();
    (hits.len() == 1).then(|| hits[0])
}

/// Salt's `reconcile_extend`: requisite lists are extended, other arguments replaced, a new
/// module block appended.
fn reconcile_extend(high: &mut High, extends: Vec<Entry>, from_requisites: bool) -> Result<()> {
    for ext in extends {
        let module = ext.blocks[0].module.clone();
        let Some(target) = high
            .position(&ext.id)
            .filter(|p| high.entries[*p].blocks.iter().any(|b| b.module == module))
            .or_else(|| find_target(high, &ext.id, &module))
        else {
            if from_requisites {
                return Err(Error::InvalidInput(format!(
                    "{}: a requisite in SLS {:?} names {} {:?}, which is not a state ID or \
                     name in this run (missing include or mistyped ID?)",
                    ext.at(),
                    ext.sls,
                    module,
                    ext.id
                )));
            }
            return Err(Error::InvalidInput(format!(
                "{}: Cannot extend ID {:?} in SLS {:?}: it is not part of the high state. \
                 Add an include of the SLS that defines it, or fix the ID",
                ext.at(),
                ext.id,
                ext.sls
            )));
        };
        for block in ext.blocks {
            let entry = &mut high.entries[target];
            let Some(tb) = entry.blocks.iter_mut().find(|b| b.module == block.module) else {
                entry.blocks.push(block);
                continue;
            };
            for item in block.items {
                match item {
                    Item::Fun(f) => {
                        if let Some(slot) = tb.items.iter_mut().find(|i| matches!(i, Item::Fun(_)))
                        {
                            *slot = Item::Fun(f);
                        } else {
                            tb.items.push(Item::Fun(f));
                        }
                    }
                    Item::Arg(k, v) => {
                        let slot = tb
                            .items
                            .iter_mut()
                            .find(|i| matches!(i, Item::Arg(ek, _) if *ek == k));
                        match slot {
                            Some(Item::Arg(_, existing)) if REQUISITES.contains(&k.as_str()) => {
                                let mut list = as_list(std::mem::take(existing));
                                list.extend(as_list(v));
                                *existing = Value::Array(list);
                            }
                            Some(slot) => *slot = Item::Arg(k, v),
                            None => tb.items.push(Item::Arg(k, v)),
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

pub fn as_list(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

/// A requisite reference as `(key, value)`: `"x"` is `("id", "x")`; `{file: x}` is
/// `("file", "x")`; `{file.managed: x}` is trimmed to `("file", "x")`.
pub fn req_ref(v: &Value) -> Option<(String, Value)> {
    match v {
        Value::String(s) => Some(("id".into(), Value::String(s.clone()))),
        Value::Object(m) => m.iter().next().map(|(k, v)| {
            let k = k.split('.').next().unwrap_or(k).to_string();
            (k, v.clone())
        }),
        _ => None,
    }
}

/// Salt's `requisite_in`: turns `X_in` on a state into `X` on the states it names, and `use`
/// into copied arguments.
fn requisite_in(high: &mut High) -> Result<()> {
    const REQ_IN: &[&str] = &[
        "require_in",
        "watch_in",
        "onfail_in",
        "onchanges_in",
        "use",
        "use_in",
        "prereq_in",
    ];
    let mut extend: Vec<Entry> = Vec::new();
    let add = |extend: &mut Vec<Entry>, target: &str, module: &str, item: Item, src: &Entry| {
        let pos = extend.iter().position(|e| e.id == target);
        let e = match pos {
            Some(p) => &mut extend[p],
            None => {
                extend.push(Entry {
                    id: target.to_string(),
                    sls: src.sls.clone(),
                    file: src.file.clone(),
                    line: src.line,
                    included_from: Vec::new(),
                    blocks: Vec::new(),
                });
                extend.last_mut().expect("just pushed")
            }
        };
        let b = match e.blocks.iter().position(|b| b.module == module) {
            Some(p) => &mut e.blocks[p],
            None => {
                e.blocks.push(Block {
                    module: module.to_string(),
                    items: Vec::new(),
                });
                e.blocks.last_mut().expect("just pushed")
            }
        };
        if let Item::Arg(k, v) = &item {
            if REQUISITES.contains(&k.as_str()) {
                if let Some(Item::Arg(_, Value::Array(list))) = b
                    .items
                    .iter_mut()
                    .find(|i| matches!(i, Item::Arg(ek, _) if ek == k))
                {
                    list.extend(as_list(v.clone()));
                    return;
                }
            }
        }
        b.items.push(item);
    };
    for entry in &high.entries {
        for block in &entry.blocks {
            for item in &block.items {
                let Item::Arg(key, value) = item else {
                    continue;
                };
                if !REQ_IN.contains(&key.as_str()) {
                    continue;
                }
                let rkey = key.split('_').next().unwrap_or(key);
                let refs: Vec<Value> = match value {
                    Value::Object(m) => m
                        .iter()
                        .map(|(k, v)| Value::Object(Map::from_iter([(k.clone(), v.clone())])))
                        .collect(),
                    other => as_list(other.clone()),
                };
                for r in refs {
                    let Some((pstate, pname)) = req_ref(&r) else {
                        return Err(Error::InvalidInput(format!(
                            "{}: in state {:?}, {key} lists {r}; expected `- module: ID`, \
                             `- ID` or `- sls: NAME`",
                            entry.at(),
                            entry.id
                        )));
                    };
                    let pname = match pname {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    // The (ID, module) pairs this reference names.
                    let hinges: Vec<(String, String)> = if pstate == "sls" {
                        high.entries
                            .iter()
                            .filter(|e| e.sls == pname)
                            .flat_map(|e| e.blocks.iter().map(|b| (e.id.clone(), b.module.clone())))
                            .collect()
                    } else if pstate == "id" {
                        match high.position(&pname) {
                            Some(p) => {
                                vec![(pname.clone(), high.entries[p].blocks[0].module.clone())]
                            }
                            None => high
                                .entries
                                .iter()
                                .flat_map(|e| {
                                    e.blocks
                                        .iter()
                                        .filter(|b| {
                                            b.arg("name").and_then(Value::as_str) == Some(&pname)
                                        })
                                        .map(|b| (e.id.clone(), b.module.clone()))
                                })
                                .collect(),
                        }
                    } else {
                        vec![(pname.clone(), pstate.clone())]
                    };
                    if hinges.is_empty() {
                        return Err(Error::InvalidInput(format!(
                            "{}: in state {:?}, {key} names {pstate}: {pname:?}, which is not a \
                             state in this run",
                            entry.at(),
                            entry.id
                        )));
                    }
                    for (name, module) in hinges {
                        match key.as_str() {
                            "use" | "use_in" => {
                                let (from, to_id, to_mod) = if key == "use" {
                                    (
                                        find_target(high, &name, &module),
                                        entry.id.clone(),
                                        block.module.clone(),
                                    )
                                } else {
                                    let t = find_target(high, &name, &module);
                                    (
                                        Some(high.position(&entry.id).expect("own entry")),
                                        t.map(|p| high.entries[p].id.clone())
                                            .unwrap_or(name.clone()),
                                        module.clone(),
                                    )
                                };
                                let Some(from) = from else {
                                    return Err(Error::InvalidInput(format!(
                                        "{}: in state {:?}, {key} names {module}: {name:?}, \
                                         which is not a state in this run",
                                        entry.at(),
                                        entry.id
                                    )));
                                };
                                let from_block = if key == "use" {
                                    high.entries[from]
                                        .blocks
                                        .iter()
                                        .find(|b| b.module == module)
                                } else {
                                    Some(block)
                                };
                                let to_block = high.position(&to_id).and_then(|p| {
                                    high.entries[p].blocks.iter().find(|b| b.module == to_mod)
                                });
                                let Some(from_block) = from_block else {
                                    continue;
                                };
                                for it in &from_block.items {
                                    let Item::Arg(k, _) = it else { continue };
                                    if k == "name"
                                        || k == "names"
                                        || REQUISITES.contains(&k.as_str())
                                        || [
                                            "require",
                                            "watch",
                                            "prereq",
                                            "onfail",
                                            "onchanges",
                                            "onfail_stop",
                                        ]
                                        .contains(&k.as_str())
                                        || to_block.is_some_and(|tb| tb.arg(k).is_some())
                                    {
                                        continue;
                                    }
                                    add(&mut extend, &to_id, &to_mod, it.clone(), entry);
                                }
                            }
                            _ => {
                                let mut m = Map::new();
                                m.insert(block.module.clone(), Value::String(entry.id.clone()));
                                add(
                                    &mut extend,
                                    &name,
                                    &module,
                                    Item::Arg(
                                        rkey.to_string(),
                                        Value::Array(vec![Value::Object(m)]),
                                    ),
                                    entry,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    reconcile_extend(high, extend, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_parse_to_the_same_block() {
        let a = parse("a.sls", "a", "x:\n  test.nop:\n    - name: y\n").unwrap();
        let b = parse("a.sls", "a", "x:\n  test:\n    - nop\n    - name: y\n").unwrap();
        assert_eq!(a.entries[0].blocks[0].function(), Some("nop"));
        assert_eq!(b.entries[0].blocks[0].function(), Some("nop"));
        assert_eq!(
            a.entries[0].blocks[0].arg("name"),
            b.entries[0].blocks[0].arg("name")
        );
        let c = parse("a.sls", "a", "x: test.nop\n").unwrap();
        assert_eq!(c.entries[0].blocks[0].function(), Some("nop"));
    }

    #[test]
    fn errors_point_at_file_line_and_id() {
        let e = parse(
            "web.sls",
            "web",
            "a:\n  test.nop: []\nb:\n  test.nop:\n    - name: x\n      comment: y\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("web.sls:3:1: in state \"b\""), "{e}");
        assert!(e.contains("own `- key: value` item"), "{e}");
        let e = parse("web.sls", "web", "a:\n  - b\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("web.sls:1:1: state \"a\" is a list"), "{e}");
        let e = parse("web.sls", "web", "a: [\n").unwrap_err().to_string();
        assert!(e.starts_with("web.sls:2:1: not valid YAML"), "{e}");
    }

    #[test]
    fn relative_includes() {
        assert_eq!(resolve_include("a.b", "a/b.sls", ".c").unwrap(), "a.c");
        assert_eq!(
            resolve_include("a.b", "a/b/init.sls", ".c").unwrap(),
            "a.b.c"
        );
        assert_eq!(resolve_include("a.b", "a/b.sls", "..c").unwrap(), "c");
        assert!(resolve_include("a", "a.sls", "..c").is_err());
    }
}
