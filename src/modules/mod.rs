//! modules: the functions that change a server, one file per module.
//!
//! Every module implements [`Module`]. The engine knows nothing about what a module does; it only
//! validates arguments at compile time ([`Module::validate`]), asks which outputs a function
//! publishes ([`Module::outputs`], so `${{ steps.ID.field }}` can be checked before anything runs),
//! and calls it ([`Module::call`]), or its watch action ([`Module::watch`]) when a `watch`
//! requisite saw changes.
//!
//! Contract for every module function:
//! - **Idempotent.** Calling it twice in a row changes nothing the second time and reports no
//!   changes.
//! - **Honest.** `changes` is empty exactly when nothing was (or, with `test`, would be) changed.
//! - **Test mode changes nothing.** With `call.test`, report what would change with
//!   `result: None` (Salt's convention) and touch nothing.
//! - **Bad input is an `Err`**, never a panic and never a partial change. The engine turns it
//!   into a failed step whose comment is the error message.
//!
//! Modules never touch the datastore; files that travel with the states come through
//! [`SourceTree`], and a caller that reads extension modules from the store hands their bytes in
//! ([`ext::ModuleSource::Datastore`]). Two modules talk to local services: `pkg` and `pkgrepo`
//! to PackageKit on the system D-Bus. The one network access is [`fetch`], an https GET of an
//! extension module declared by URL, whose bytes are then checked against their signature.
//!
//! The built-ins: [`cmd`], [`file`](mod@file), [`pkg`], [`pkgrepo`], [`test`](mod@test); extension modules are
//! [`ext`]. Reference pages: `docs/modules/*.md` (also `eden doc MODULE`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub mod cmd;
pub mod ext;
pub mod fetch;
pub mod file;
pub mod pkg;
pub mod pkgrepo;
pub mod test;

/// A step's arguments after rendering, `name` included. Keys are Salt's argument names.
pub type Args = Map<String, Value>;

/// Files that travel with the states: the state tree (a local path, blobs from the datastore, or
/// a git commit). Paths are relative to the tree root; `salt://` and `eden://` prefixes are
/// stripped by the caller.
pub trait SourceTree: Send + Sync {
    fn read(&self, path: &str) -> Result<Vec<u8>>;
}

/// A tree with no files, for callers that have none.
pub struct EmptyTree;

impl SourceTree for EmptyTree {
    fn read(&self, path: &str) -> Result<Vec<u8>> {
        Err(Error::NotFound(format!(
            "no state tree file {path:?}: this run has no state tree"
        )))
    }
}

/// One invocation of a module function.
pub struct Call<'a> {
    /// The state ID, for messages.
    pub id: &'a str,
    /// The function name without the module, e.g. `run` for `cmd.run`.
    pub function: &'a str,
    /// All arguments, `name` included.
    pub args: &'a Args,
    /// Dry run: report, change nothing.
    pub test: bool,
    /// Files that travel with the states.
    pub tree: &'a dyn SourceTree,
    /// For a watch action: the watched states that reported changes, as `module: id`.
    pub changed_watches: &'a [String],
}

impl Call<'_> {
    /// The `name` argument, which the engine always sets (it defaults to the state ID).
    pub fn name(&self) -> &str {
        self.args
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(self.id)
    }
}

/// What a module function did (or, in test mode, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// `Some(true)` success, `Some(false)` failure, `None` "would change" in test mode.
    pub result: Option<bool>,
    /// What changed; an empty object when nothing did.
    pub changes: Value,
    pub comment: String,
    /// Named values later steps can use as `${{ steps.ID.<name> }}`.
    pub outputs: Map<String, Value>,
}

impl Outcome {
    pub fn ok(comment: impl Into<String>) -> Self {
        Outcome {
            result: Some(true),
            changes: Value::Object(Map::new()),
            comment: comment.into(),
            outputs: Map::new(),
        }
    }
    pub fn failed(comment: impl Into<String>) -> Self {
        Outcome {
            result: Some(false),
            changes: Value::Object(Map::new()),
            comment: comment.into(),
            outputs: Map::new(),
        }
    }
    /// True when `changes` holds anything.
    pub fn has_changes(&self) -> bool {
        match &self.changes {
            Value::Null => false,
            Value::Object(m) => !m.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::String(s) => !s.is_empty(),
            _ => true,
        }
    }
}

/// A module: a named set of functions.
pub trait Module: Send + Sync {
    /// The module name used in SLS, e.g. `cmd`.
    fn name(&self) -> &'static str;
    /// The functions it offers, e.g. `["run"]`.
    fn functions(&self) -> &'static [&'static str];
    /// Checks a function's arguments without side effects. Called when a plan is compiled, so
    /// an unknown function or a missing or mistyped argument fails before anything runs.
    /// Arguments that contain `${{ ... }}` are not yet known and are given as strings.
    fn validate(&self, function: &str, args: &Args) -> Result<()>;
    /// The outputs a function publishes besides `result`, `changes` and `comment`, which every
    /// step has. Used to reject `${{ steps.ID.unknown }}` at compile time.
    fn outputs(&self, function: &str) -> &'static [&'static str];
    /// Runs the function.
    fn call(&self, call: &Call) -> Result<Outcome>;
    /// Salt's `mod_watch`: what to do when a `watch` requisite reported changes. The default
    /// runs the function again as usual.
    fn watch(&self, call: &Call) -> Result<Outcome> {
        self.call(call)
    }
}

/// Rejects an argument `function` does not take, naming the ones it does. Shared by the
/// built-in modules' `validate`.
pub fn check_args(module: &str, function: &str, args: &Args, known: &[&str]) -> Result<()> {
    match args.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(key) => Err(Error::InvalidInput(format!(
            "{module}.{function} does not take the argument {key:?}; it takes {}",
            known.join(", ")
        ))),
    }
}

/// The modules a run can use, by name.
#[derive(Clone, Default)]
pub struct Registry {
    modules: BTreeMap<&'static str, Arc<dyn Module>>,
}

impl Registry {
    /// The built-in modules.
    pub fn builtin() -> Self {
        let mut r = Registry::default();
        r.register(Arc::new(test::Test));
        r.register(Arc::new(cmd::Cmd));
        r.register(Arc::new(file::File));
        r.register(Arc::new(pkg::Pkg::packagekit()));
        r.register(Arc::new(pkgrepo::PkgRepo::packagekit()));
        r
    }

    pub fn register(&mut self, module: Arc<dyn Module>) {
        self.modules.insert(module.name(), module);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Module>> {
        self.modules.get(name)
    }

    /// Names in sorted order, for messages and docs.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.modules.keys().copied()
    }
}
