//! `pkg`: packages, like Salt's `pkg.installed`, `pkg.removed` and `pkg.latest` states, done
//! through **PackageKit over D-Bus** (never by running `apt-get`, `dnf` or `pkcon`).
//!
//! One call is one PackageKit conversation:
//! 1. optionally `RefreshCache` (`refresh: True`);
//! 2. `Resolve` every wanted name in one transaction, which tells what is installed (and at which
//!    version) and what is available;
//! 3. [`plan`], a pure function, decides what must change;
//! 4. one `InstallPackages` (or `RemovePackages`) transaction for **all** the packages of the
//!    call, so `pkgs: [a, b, c]` is one package-manager run. The engine's genius mode relies on
//!    this: it merges independent `pkg.installed` steps into one step with a `pkgs:` list.
//!
//! `changes` follows Salt: `{name: {"old": "1.0-1", "new": "1.1-1"}}`, with `""` for "not
//! installed". Packages pulled in as dependencies are listed too. In test mode nothing is
//! installed; the transaction is run with PackageKit's `SIMULATE` flag, so `changes` lists the
//! dependencies that would come along, and the result is `None`.
//!
//! Arguments: `name`, `pkgs` (a list of names, or of `{name: version}` maps, as in Salt),
//! `version` (exact, a glob such as `2.10*`, or comparisons such as `>=1.2,<2`), `refresh`.
//! A name may carry an architecture (`hello:amd64`). What PackageKit can do is the seam
//! [`PackageBackend`]; [`PackageKit`] is the real one.
//!
//! Not done: `hold`, `skip_verify`, `install_recommends`, `sources`, `fromrepo`, `reinstall`,
//! `normalize`, `purge` (`pkg.purged`), `pkg.uptodate`, `pkg.downloaded`, a time limit on a
//! PackageKit transaction. Removal never removes packages that depend on the removed ones
//! (PackageKit `allow_deps=false`): such a removal fails and names them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use super::{Args, Call, Module, Outcome};
use crate::error::{Error, Result};

/// A PackageKit package id, `name;version;arch;data`. `data` is the repository for an available
/// package and starts with `installed` (or `auto:`/`manual:` on apt) for an installed one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PackageId {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub data: String,
}

impl PackageId {
    pub fn parse(id: &str) -> Result<PackageId> {
        let parts: Vec<&str> = id.split(';').collect();
        if parts.len() != 4 || parts[0].is_empty() {
            return Err(Error::InvalidData(format!(
                "PackageKit sent the package id {id:?}, which is not name;version;arch;data"
            )));
        }
        Ok(PackageId {
            name: parts[0].into(),
            version: parts[1].into(),
            arch: parts[2].into(),
            data: parts[3].into(),
        })
    }

    pub fn id(&self) -> String {
        format!("{};{};{};{}", self.name, self.version, self.arch, self.data)
    }
}

/// PackageKit's `PkInfoEnum` values that matter here.
pub mod info {
    pub const INSTALLED: u32 = 1;
    pub const AVAILABLE: u32 = 2;
    pub const UPDATING: u32 = 11;
    pub const INSTALLING: u32 = 12;
    pub const REMOVING: u32 = 13;
    pub const REINSTALLING: u32 = 19;
    pub const DOWNGRADING: u32 = 20;
}

/// One `Package` signal: what PackageKit says about a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageInfo {
    pub info: u32,
    pub id: PackageId,
}

/// What the pkg module needs from a package manager. Every method is one PackageKit
/// transaction. `simulate` asks what would happen and changes nothing.
pub trait PackageBackend: Send + Sync {
    fn refresh(&self) -> Result<()>;
    /// Installed and available packages of these names.
    fn resolve(&self, names: &[String]) -> Result<Vec<PackageInfo>>;
    /// Installs (or upgrades/downgrades to) exactly these ids; returns what it touched.
    fn install(&self, ids: &[PackageId], simulate: bool) -> Result<Vec<PackageInfo>>;
    fn remove(&self, ids: &[PackageId], simulate: bool) -> Result<Vec<PackageInfo>>;
}

/// One package a state asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub name: String,
    pub arch: Option<String>,
    pub version: Option<String>,
}

/// What [`plan`] decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PkgPlan {
    /// Ids to install or remove, in one transaction.
    pub ids: Vec<PackageId>,
    /// name -> (old version, new version) expected for the wanted packages.
    pub expect: BTreeMap<String, (String, String)>,
    /// Wanted packages that are already as asked.
    pub ok: Vec<String>,
    /// Problems that make the step fail (unknown package, version not available).
    pub errors: Vec<String>,
}

/// The functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Installed,
    Latest,
    Removed,
}

/// The machine's architecture as Debian and RPM name it, for choosing among resolved packages.
fn native_arches() -> &'static [&'static str] {
    match std::env::consts::ARCH {
        "x86_64" => &["amd64", "x86_64", "all", "noarch"],
        "aarch64" => &["arm64", "aarch64", "all", "noarch"],
        "x86" => &["i386", "i686", "all", "noarch"],
        _ => &["all", "noarch"],
    }
}

/// Whether version `have` satisfies `want`: an exact version (the epoch may be left out), a glob
/// (`2.10*`), or Salt's comparisons (`>=1.2`, `<2`, `!=1.3-1`, several joined by commas).
pub fn version_matches(have: &str, want: &str) -> bool {
    let want = want.trim();
    if want.contains(',') {
        return want.split(',').all(|w| version_matches(have, w));
    }
    // Without an epoch in `want`, compare `have` without its epoch too.
    let have_cmp = |w: &str| -> &str {
        match have.split_once(':') {
            Some((_, v)) if !w.contains(':') => v,
            _ => have,
        }
    };
    for op in [">=", "<=", "==", "!=", ">", "<", "="] {
        if let Some(v) = want.strip_prefix(op) {
            let v = v.trim();
            let ord = compare_versions(have_cmp(v), v);
            return match op {
                ">=" => ord.is_ge(),
                "<=" => ord.is_le(),
                ">" => ord.is_gt(),
                "<" => ord.is_lt(),
                "!=" => ord.is_ne(),
                _ => ord.is_eq(),
            };
        }
    }
    if want.contains('*') || want.contains('?') {
        crate::engine::compile::fnmatch(have, want)
    } else {
        have == want || have_cmp(want) == want
    }
}

/// Decides what to do, from what PackageKit resolved. Pure.
pub fn plan(action: Action, wants: &[Want], resolved: &[PackageInfo]) -> PkgPlan {
    let mut out = PkgPlan::default();
    let arches = native_arches();
    for want in wants {
        let arch_ok = |p: &PackageId| match &want.arch {
            Some(a) => &p.arch == a,
            None => arches.contains(&p.arch.as_str()),
        };
        let of_name: Vec<&PackageInfo> = resolved
            .iter()
            .filter(|p| p.id.name == want.name && arch_ok(&p.id))
            .collect();
        let installed = of_name
            .iter()
            .find(|p| p.info == info::INSTALLED || p.id.data.starts_with("installed"))
            .map(|p| &p.id);
        let mut available: Vec<&PackageId> = of_name
            .iter()
            .filter(|p| p.info != info::INSTALLED && !p.id.data.starts_with("installed"))
            .map(|p| &p.id)
            .collect();
        available.sort_by(|a, b| compare_versions(&b.version, &a.version));
        let old = installed.map(|p| p.version.clone()).unwrap_or_default();
        match action {
            Action::Removed => match installed {
                Some(p)
                    if want
                        .version
                        .as_deref()
                        .is_none_or(|v| version_matches(&p.version, v)) =>
                {
                    out.ids.push(p.clone());
                    out.expect
                        .insert(want.name.clone(), (p.version.clone(), String::new()));
                }
                _ => out.ok.push(want.name.clone()),
            },
            Action::Installed | Action::Latest => {
                let good_installed = match (installed, &want.version, action) {
                    (Some(p), Some(v), _) => version_matches(&p.version, v),
                    (Some(p), None, Action::Latest) => available
                        .first()
                        .is_none_or(|a| compare_versions(&a.version, &p.version).is_le()),
                    (Some(_), None, _) => true,
                    (None, _, _) => false,
                };
                if good_installed {
                    out.ok.push(want.name.clone());
                    continue;
                }
                let pick = match &want.version {
                    Some(v) => available.iter().find(|a| version_matches(&a.version, v)),
                    None => available.first(),
                };
                match pick {
                    Some(p) => {
                        out.ids.push((*p).clone());
                        out.expect
                            .insert(want.name.clone(), (old, p.version.clone()));
                    }
                    None if of_name.is_empty() => out.errors.push(format!(
                        "no package {} is known to the package manager (check the name, \
                         or set refresh: True after adding its repository)",
                        display_want(want)
                    )),
                    None => {
                        let mut versions: Vec<&str> =
                            of_name.iter().map(|p| p.id.version.as_str()).collect();
                        versions.dedup();
                        out.errors.push(format!(
                            "version {} of {} is not available; available: {}",
                            want.version.as_deref().unwrap_or("(newest)"),
                            want.name,
                            versions.join(", ")
                        ))
                    }
                }
            }
        }
    }
    out
}

fn display_want(w: &Want) -> String {
    match &w.arch {
        Some(a) => format!("{}:{a}", w.name),
        None => w.name.clone(),
    }
}

/// Compares package versions as dpkg does (epoch, upstream version, revision; `~` sorts before
/// everything, letters before other symbols). RPM versions compare closely enough for choosing
/// the newest of a few candidates.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.chars().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
            _ => (0, v),
        };
        let (upstream, revision) = match rest.rfind('-') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        (epoch, upstream, revision)
    }
    fn order(c: Option<char>) -> i32 {
        match c {
            None => 0,
            Some('~') => -1,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(c) => c as i32 + 256,
        }
    }
    fn part(a: &str, b: &str) -> std::cmp::Ordering {
        let (mut a, mut b) = (a, b);
        loop {
            if a.is_empty() && b.is_empty() {
                return std::cmp::Ordering::Equal;
            }
            // Non-digit prefix.
            let an = a.find(|c: char| c.is_ascii_digit()).unwrap_or(a.len());
            let bn = b.find(|c: char| c.is_ascii_digit()).unwrap_or(b.len());
            let (mut ac, mut bc) = (a[..an].chars(), b[..bn].chars());
            loop {
                let (x, y) = (ac.next(), bc.next());
                if x.is_none() && y.is_none() {
                    break;
                }
                let o = order(x).cmp(&order(y));
                if o.is_ne() {
                    return o;
                }
            }
            a = &a[an..];
            b = &b[bn..];
            let ad = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
            let bd = b.find(|c: char| !c.is_ascii_digit()).unwrap_or(b.len());
            let x: u128 = a[..ad].parse().unwrap_or(0);
            let y: u128 = b[..bd].parse().unwrap_or(0);
            if x != y {
                return x.cmp(&y);
            }
            a = &a[ad..];
            b = &b[bd..];
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| part(ua, ub))
        .then_with(|| part(ra, rb))
}

/// The packages a call asks for: `pkgs` if given (names, or `{name: version}` maps), else
/// `name` with `version`.
pub fn wants(args: &Args, name: &str) -> Result<Vec<Want>> {
    let split_arch = |n: &str| -> (String, Option<String>) {
        match n.split_once(':') {
            Some((n, a)) if !a.is_empty() => (n.to_string(), Some(a.to_string())),
            _ => (n.to_string(), None),
        }
    };
    let version_of = |v: &Value| -> Result<Option<String>> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) if s.is_empty() => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            Value::Number(n) => Ok(Some(n.to_string())),
            other => Err(Error::InvalidInput(format!(
                "pkg: version must be a string such as \"2.10-3\", not {other}"
            ))),
        }
    };
    let mut out = Vec::new();
    match args.get("pkgs") {
        None | Some(Value::Null) => {
            let (n, arch) = split_arch(name);
            let version = args.get("version").map(version_of).transpose()?.flatten();
            out.push(Want {
                name: n,
                arch,
                version,
            });
        }
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(s) => {
                        let (n, arch) = split_arch(s);
                        out.push(Want {
                            name: n,
                            arch,
                            version: None,
                        });
                    }
                    Value::Object(m) if m.len() == 1 => {
                        let (k, v) = m.iter().next().expect("one entry");
                        let (n, arch) = split_arch(k);
                        out.push(Want {
                            name: n,
                            arch,
                            version: version_of(v)?,
                        });
                    }
                    other => {
                        return Err(Error::InvalidInput(format!(
                            "pkg: pkgs entries are names or {{name: version}} maps, not {other}"
                        )))
                    }
                }
            }
        }
        Some(other) => {
            return Err(Error::InvalidInput(format!(
                "pkg: pkgs must be a list of package names, not {other}"
            )))
        }
    }
    for w in &out {
        if w.name.is_empty() || w.name.contains(|c: char| c.is_whitespace() || c == ';') {
            return Err(Error::InvalidInput(format!(
                "pkg: {:?} is not a package name",
                w.name
            )));
        }
    }
    Ok(out)
}

pub const ARGS: &[&str] = &["name", "pkgs", "version", "refresh"];

/// A backend made on first use, so building a registry never needs a D-Bus.
pub struct LazyBackend(Mutex<Option<Arc<dyn PackageBackend>>>);

impl LazyBackend {
    /// PackageKit on the system bus, connected on first use.
    pub fn packagekit() -> Self {
        LazyBackend(Mutex::new(None))
    }

    pub fn with(backend: Arc<dyn PackageBackend>) -> Self {
        LazyBackend(Mutex::new(Some(backend)))
    }

    /// Forgets a connection that failed (for example after the D-Bus daemon restarted), so the
    /// next call connects again.
    pub fn reset(&self) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *slot = None;
    }

    pub fn get(&self) -> Result<Arc<dyn PackageBackend>> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = slot.as_ref() {
            return Ok(b.clone());
        }
        let b: Arc<dyn PackageBackend> = Arc::new(PackageKit::connect()?);
        *slot = Some(b.clone());
        Ok(b)
    }
}

/// The `pkg` module.
pub struct Pkg {
    backend: LazyBackend,
}

impl Pkg {
    /// The real module: PackageKit on the system bus.
    pub fn packagekit() -> Self {
        Pkg {
            backend: LazyBackend::packagekit(),
        }
    }

    /// A module over another backend (tests, or another package system).
    pub fn with_backend(backend: Arc<dyn PackageBackend>) -> Self {
        Pkg {
            backend: LazyBackend::with(backend),
        }
    }
}

impl Module for Pkg {
    fn name(&self) -> &'static str {
        "pkg"
    }
    fn functions(&self) -> &'static [&'static str] {
        &["installed", "removed", "latest"]
    }
    fn validate(&self, function: &str, args: &Args) -> Result<()> {
        if !self.functions().contains(&function) {
            return Err(Error::InvalidInput(format!(
                "pkg.{function} is not a function; pkg has installed, removed, latest"
            )));
        }
        super::check_args("pkg", function, args, ARGS)?;
        let name = args.get("name").and_then(Value::as_str).unwrap_or("x");
        if !name.contains("${{") {
            wants(args, name)?;
        }
        Ok(())
    }
    fn outputs(&self, _function: &str) -> &'static [&'static str] {
        &["versions"]
    }
    fn call(&self, call: &Call) -> Result<Outcome> {
        let action = match call.function {
            "installed" => Action::Installed,
            "latest" => Action::Latest,
            "removed" => Action::Removed,
            other => {
                return Err(Error::InvalidInput(format!(
                    "pkg.{other} is not a function; pkg has installed, removed, latest"
                )))
            }
        };
        let wants = wants(call.args, call.name())?;
        let refresh = call
            .args
            .get("refresh")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let result = run(&*self.backend.get()?, action, &wants, refresh, call.test);
        if matches!(result, Err(Error::Unavailable(_))) {
            self.backend.reset();
        }
        result
    }
}

/// One pkg call against a backend: resolve, plan, one transaction, check. This is also the
/// aggregated call: give it the packages of several states.
pub fn run(
    backend: &dyn PackageBackend,
    action: Action,
    wants: &[Want],
    refresh: bool,
    test: bool,
) -> Result<Outcome> {
    if refresh && !test {
        backend.refresh()?;
    }
    let names: Vec<String> = {
        let mut n: Vec<String> = wants.iter().map(|w| w.name.clone()).collect();
        n.sort();
        n.dedup();
        n
    };
    let resolved = backend.resolve(&names)?;
    let plan = plan(action, wants, &resolved);
    let all: Vec<String> = wants.iter().map(display_want).collect();
    if !plan.errors.is_empty() {
        return Ok(Outcome::failed(plan.errors.join("; ")));
    }
    let mut versions = Map::new();
    for p in resolved.iter().filter(|p| p.info == info::INSTALLED) {
        versions.insert(p.id.name.clone(), json!(p.id.version));
    }
    if plan.ids.is_empty() {
        let mut out = Outcome::ok(match action {
            Action::Removed => format!(
                "All specified packages are already absent: {}",
                all.join(", ")
            ),
            Action::Installed => format!(
                "All specified packages are already installed: {}",
                all.join(", ")
            ),
            Action::Latest => format!("All specified packages are up to date: {}", all.join(", ")),
        });
        out.outputs
            .insert("versions".into(), Value::Object(versions));
        return Ok(out);
    }
    let targets: Vec<String> = plan.ids.iter().map(|p| p.name.clone()).collect();
    let touched = match action {
        Action::Removed => backend.remove(&plan.ids, test),
        _ => backend.install(&plan.ids, test),
    };
    let touched = match touched {
        Ok(t) => t,
        Err(e) => {
            return Ok(Outcome::failed(format!(
                "The package transaction for {} failed: {e}",
                targets.join(", ")
            )))
        }
    };
    let mut changes = Map::new();
    for (name, (old, new)) in &plan.expect {
        changes.insert(name.clone(), json!({"old": old, "new": new}));
    }
    // Dependencies the transaction brought along (or would).
    let old_of: BTreeMap<&str, &str> = resolved
        .iter()
        .filter(|p| p.info == info::INSTALLED)
        .map(|p| (p.id.name.as_str(), p.id.version.as_str()))
        .collect();
    for t in &touched {
        if changes.contains_key(&t.id.name) {
            continue;
        }
        let entry = match t.info {
            info::INSTALLING | info::UPDATING | info::REINSTALLING | info::DOWNGRADING => {
                json!({"old": old_of.get(t.id.name.as_str()).copied().unwrap_or(""), "new": t.id.version})
            }
            info::REMOVING => json!({"old": t.id.version, "new": ""}),
            _ => continue,
        };
        changes.insert(t.id.name.clone(), entry);
    }
    if test {
        let verb = match action {
            Action::Removed => "removed",
            _ => "installed/updated",
        };
        return Ok(Outcome {
            result: None,
            changes: Value::Object(changes),
            comment: format!(
                "The following packages would be {verb}: {}",
                targets.join(", ")
            ),
            outputs: Map::new(),
        });
    }
    // Check: what is installed now, for honest versions in changes and outputs.
    let after = backend.resolve(&names)?;
    let now: BTreeMap<&str, &str> = after
        .iter()
        .filter(|p| p.info == info::INSTALLED)
        .map(|p| (p.id.name.as_str(), p.id.version.as_str()))
        .collect();
    let mut failed = Vec::new();
    for (name, (_, new)) in &plan.expect {
        let have = now.get(name.as_str()).copied().unwrap_or("");
        if have != new {
            failed.push(format!(
                "{name} is at {:?} after the transaction, not {new:?}",
                have
            ));
        }
        if let Some(Value::Object(c)) = changes.get_mut(name) {
            c.insert("new".into(), json!(have));
        }
    }
    let mut versions = Map::new();
    for (n, v) in &now {
        versions.insert((*n).into(), json!(v));
    }
    let comment = if failed.is_empty() {
        match action {
            Action::Removed => format!("Removed: {}", targets.join(", ")),
            _ => format!("Installed/updated: {}", targets.join(", ")),
        }
    } else {
        format!("The transaction finished but {}", failed.join("; "))
    };
    Ok(Outcome {
        result: Some(failed.is_empty()),
        changes: Value::Object(changes),
        comment,
        outputs: [("versions".to_string(), Value::Object(versions))]
            .into_iter()
            .collect(),
    })
}

/// PackageKit on the system D-Bus (`org.freedesktop.PackageKit`, started by D-Bus activation).
pub struct PackageKit {
    conn: zbus::blocking::Connection,
}

/// `PkFilterEnum` bits: a filter value is `1 << enum`.
const FILTER_NONE: u64 = 1 << 1;
/// `PkTransactionFlagEnum` bits.
const FLAG_ONLY_TRUSTED: u64 = 1 << 1;
const FLAG_SIMULATE: u64 = 1 << 2;
const FLAG_ALLOW_DOWNGRADE: u64 = 1 << 6;
/// `PkExitEnum::SUCCESS`.
const EXIT_SUCCESS: u32 = 1;

const PK_NAME: &str = "org.freedesktop.PackageKit";
const PK_TX: &str = "org.freedesktop.PackageKit.Transaction";

fn dbus_err(what: &str) -> impl Fn(zbus::Error) -> Error + '_ {
    move |e| Error::Unavailable(format!("PackageKit {what}: {e}"))
}

impl PackageKit {
    pub fn connect() -> Result<Self> {
        let conn = zbus::blocking::Connection::system().map_err(|e| {
            Error::Unavailable(format!(
                "cannot reach the system D-Bus for PackageKit ({e}); start it (as root: \
                 mkdir -p /run/dbus && dbus-daemon --system --fork) and install packagekit"
            ))
        })?;
        Ok(PackageKit { conn })
    }

    /// Runs one transaction: `start` calls the method on the transaction object; the `Package`
    /// signals are collected until `Finished`.
    fn transaction(
        &self,
        what: &str,
        start: impl FnOnce(&zbus::blocking::Proxy) -> zbus::Result<()>,
    ) -> Result<Vec<PackageInfo>> {
        let err = dbus_err(what);
        let pk =
            zbus::blocking::Proxy::new(&self.conn, PK_NAME, "/org/freedesktop/PackageKit", PK_NAME)
                .map_err(&err)?;
        let path: zbus::zvariant::OwnedObjectPath =
            pk.call("CreateTransaction", &()).map_err(&err)?;
        // Subscribe before starting, so no signal is missed.
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface(PK_TX)
            .map_err(&err)?
            .path(path.clone())
            .map_err(&err)?
            .build();
        let mut signals = zbus::blocking::MessageIterator::for_match_rule(rule, &self.conn, None)
            .map_err(&err)?;
        let tx =
            zbus::blocking::Proxy::new(&self.conn, PK_NAME, path.as_str(), PK_TX).map_err(&err)?;
        tx.call_method("SetHints", &(vec!["interactive=false", "locale=C"],))
            .map_err(&err)?;
        start(&tx).map_err(&err)?;
        let mut packages = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        loop {
            let Some(msg) = signals.next() else {
                return Err(Error::Unavailable(format!(
                    "PackageKit {what}: the D-Bus connection closed before the transaction finished"
                )));
            };
            let msg = msg.map_err(&err)?;
            let header = msg.header();
            let member = header.member().map(|m| m.as_str().to_string());
            match member.as_deref() {
                Some("Package") => {
                    let (code, id, _summary): (u32, String, String) =
                        msg.body().deserialize().map_err(&err)?;
                    packages.push(PackageInfo {
                        info: code,
                        id: PackageId::parse(&id)?,
                    });
                }
                Some("ErrorCode") => {
                    let (_code, details): (u32, String) = msg.body().deserialize().map_err(&err)?;
                    errors.push(details.trim().to_string());
                }
                Some("Finished") => {
                    let (exit, _runtime): (u32, u32) = msg.body().deserialize().map_err(&err)?;
                    if exit != EXIT_SUCCESS || !errors.is_empty() {
                        return Err(Error::Unavailable(format!(
                            "PackageKit {what} failed: {}",
                            if errors.is_empty() {
                                format!("exit code {exit}")
                            } else {
                                errors.join("; ")
                            }
                        )));
                    }
                    return Ok(packages);
                }
                _ => {}
            }
        }
    }
}

impl PackageBackend for PackageKit {
    fn refresh(&self) -> Result<()> {
        self.transaction("RefreshCache", |tx| {
            tx.call_method("RefreshCache", &(false,)).map(drop)
        })
        .map(drop)
    }

    fn resolve(&self, names: &[String]) -> Result<Vec<PackageInfo>> {
        self.transaction("Resolve", |tx| {
            tx.call_method("Resolve", &(FILTER_NONE, names)).map(drop)
        })
    }

    fn install(&self, ids: &[PackageId], simulate: bool) -> Result<Vec<PackageInfo>> {
        let ids: Vec<String> = ids.iter().map(PackageId::id).collect();
        let mut flags = FLAG_ONLY_TRUSTED | FLAG_ALLOW_DOWNGRADE;
        if simulate {
            flags |= FLAG_SIMULATE;
        }
        self.transaction("InstallPackages", |tx| {
            tx.call_method("InstallPackages", &(flags, &ids)).map(drop)
        })
    }

    fn remove(&self, ids: &[PackageId], simulate: bool) -> Result<Vec<PackageInfo>> {
        let ids: Vec<String> = ids.iter().map(PackageId::id).collect();
        let flags = if simulate { FLAG_SIMULATE } else { 0 };
        // allow_deps=false: never remove packages that depend on these; autoremove=false.
        self.transaction("RemovePackages", |tx| {
            tx.call_method("RemovePackages", &(flags, &ids, false, false))
                .map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering::*;

    fn pi(info: u32, id: &str) -> PackageInfo {
        PackageInfo {
            info,
            id: PackageId::parse(id).unwrap(),
        }
    }

    fn want(n: &str, v: Option<&str>) -> Want {
        Want {
            name: n.into(),
            arch: None,
            version: v.map(Into::into),
        }
    }

    #[test]
    fn dpkg_version_order() {
        assert_eq!(compare_versions("2.10-3", "2.10-3"), Equal);
        assert_eq!(compare_versions("2.10-3", "2.9-9"), Greater);
        assert_eq!(compare_versions("1:1.0", "2.0"), Greater);
        assert_eq!(compare_versions("1.0~rc1", "1.0"), Less);
        assert_eq!(compare_versions("1.0a", "1.0+"), Less);
        assert_eq!(compare_versions("1.0", "1.0-1"), Less);
        assert_eq!(compare_versions("1.10", "1.9"), Greater);
    }

    #[test]
    fn plan_install_missing_and_keep_installed() {
        let arch = native_arches()[0];
        let r = vec![
            pi(info::AVAILABLE, &format!("hello;2.10-3;{arch};debian")),
            pi(
                info::INSTALLED,
                &format!("tree;2.1.0-1;{arch};installed:debian"),
            ),
        ];
        let p = plan(
            Action::Installed,
            &[want("hello", None), want("tree", None)],
            &r,
        );
        assert_eq!(p.ids.len(), 1);
        assert_eq!(p.ids[0].name, "hello");
        assert_eq!(p.expect["hello"], ("".into(), "2.10-3".into()));
        assert_eq!(p.ok, vec!["tree".to_string()]);
        assert!(p.errors.is_empty());
    }

    #[test]
    fn plan_reports_unknown_and_unavailable_version() {
        let arch = native_arches()[0];
        let r = vec![pi(info::AVAILABLE, &format!("hello;2.10-3;{arch};debian"))];
        let p = plan(
            Action::Installed,
            &[want("nosuch", None), want("hello", Some("9.9"))],
            &r,
        );
        assert!(p.ids.is_empty());
        assert_eq!(p.errors.len(), 2, "{:?}", p.errors);
        assert!(p.errors[0].contains("nosuch"));
        assert!(p.errors[1].contains("9.9") && p.errors[1].contains("2.10-3"));
    }

    #[test]
    fn plan_latest_upgrades_and_removed_removes() {
        let arch = native_arches()[0];
        let r = vec![
            pi(info::INSTALLED, &format!("hello;2.9-1;{arch};installed")),
            pi(info::AVAILABLE, &format!("hello;2.10-3;{arch};debian")),
        ];
        let p = plan(Action::Latest, &[want("hello", None)], &r);
        assert_eq!(p.expect["hello"], ("2.9-1".into(), "2.10-3".into()));
        let p = plan(Action::Installed, &[want("hello", None)], &r);
        assert!(p.ids.is_empty());
        let p = plan(Action::Installed, &[want("hello", Some("2.10*"))], &r);
        assert_eq!(p.ids[0].version, "2.10-3");
        let p = plan(Action::Removed, &[want("hello", None)], &r);
        assert_eq!(p.expect["hello"], ("2.9-1".into(), "".into()));
        let p = plan(Action::Removed, &[want("hello", Some("1.0"))], &r);
        assert!(p.ids.is_empty());
        // Salt's comparisons: the installed 2.9-1 is not >=2.10, so 2.10-3 is chosen.
        let p = plan(Action::Installed, &[want("hello", Some(">=2.10"))], &r);
        assert_eq!(p.expect["hello"], ("2.9-1".into(), "2.10-3".into()));
        let p = plan(Action::Installed, &[want("hello", Some(">=2.0,<3"))], &r);
        assert!(p.ids.is_empty(), "2.9-1 satisfies >=2.0,<3");
        let p = plan(Action::Installed, &[want("hello", Some(">3"))], &r);
        assert_eq!(p.errors.len(), 1);
    }

    #[test]
    fn version_specs() {
        assert!(version_matches("1:2.10-3", "2.10-3"));
        assert!(!version_matches("1:2.10-3", "0:2.10-3"));
        assert!(version_matches("2.10-3", "2.10*"));
        assert!(version_matches("2.10-3", ">=2.9"));
        assert!(version_matches("2.10-3", "<2.10-4"));
        assert!(!version_matches("2.10-3", "!=2.10-3"));
        assert!(version_matches("2.10-3", "==2.10-3"));
        assert!(!version_matches("2.10-3", ">2.10-3, <3"));
    }

    #[test]
    fn wants_from_pkgs_forms() {
        let args: Args = serde_json::from_value(json!({
            "name": "ignored", "pkgs": ["a", {"b": "1.0"}, "c:i386"]
        }))
        .unwrap();
        let w = wants(&args, "ignored").unwrap();
        assert_eq!(w[0], want("a", None));
        assert_eq!(w[1], want("b", Some("1.0")));
        assert_eq!(w[2].arch.as_deref(), Some("i386"));
        let bad: Args = serde_json::from_value(json!({"pkgs": "a b"})).unwrap();
        assert!(wants(&bad, "x").is_err());
        let bad: Args = serde_json::from_value(json!({"name": "a b"})).unwrap();
        assert!(wants(&bad, "a b").is_err());
    }
}
