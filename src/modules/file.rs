//! `file`: files, directories and links, like Salt's `file.managed`, `file.directory`,
//! `file.absent` and `file.symlink` states.
//!
//! - `file.managed`: the file `name` holds `contents` (a string, or a list of lines) or the bytes
//!   of `source` (a `salt://` or `eden://` path in the state tree, a `kv:///KEY` in the
//!   datastore, which the agent reads for the run, or an absolute local path).
//!   `contents` gets a final newline when it lacks one, as in Salt (`contents_newline`).
//!   `template: jinja` renders the text first with `defaults` overlaid by `context` (undefined
//!   names are errors). `mode` (e.g. `"0644"` or `644`), `user`, `group`, `makedirs`.
//!   `backup: minion` (or `True`, or an absolute directory) keeps the replaced file under
//!   `/var/lib/eden/file_backup/<path>.<ns timestamp>`; `changes.backup` says where.
//!   The write is atomic: a temporary file in the same directory gets the bytes, owner and
//!   mode, is fsynced and renamed over the file, and the directory is fsynced.
//!   `changes.diff` is a unified diff (also in test mode). Outputs `path` and `sha256`.
//! - `file.directory`: the directory `name` exists with `mode`/`user`/`group`; `makedirs`.
//!   `clean: True` removes every entry not listed in `keep` (paths) and whose name does not
//!   match the glob `exclude_pat`; `changes.removed` lists them (also in test mode).
//! - `file.absent`: `name` does not exist.
//! - `file.symlink`: `name` is a symlink to `target` (replaced atomically when it points
//!   elsewhere); `force: True` replaces a file or directory in the way; `makedirs`,
//!   `user`/`group` (of the link itself). Outputs `path` and `target`.
//!
//! Every function compares before it writes, so a second run reports no changes. Bad input
//! (a relative path, a missing source, an unknown user or group, a parent that is not a
//! directory or cannot be read, a template error) is an error raised before anything is
//! written, so it never leaves a half-written file.
//!
//! Not done (Salt has them): `source_hash`, lists of `source` fallbacks, http(s) sources,
//! `replace: False`, `create`, `follow_symlinks`, `show_changes`, `keep_source`, `attrs`,
//! `selinux`, `tmp_dir`/`tmp_ext`, `check_cmd`, `win_*`, `template` engines other than jinja,
//! Salt's template variables (`grains`, `pillar`, `salt`), `dir_mode`/`file_mode`/`recurse` on
//! `file.directory`, `clean` keeping files managed by required states (eden has only `keep` and
//! `exclude_pat`), `backupname` on `file.symlink`, and the other `file.*` functions
//! (`recurse`, `replace`, `line`, `blockreplace`, `append`, `comment`, `touch`, `copy`,
//! `rename`, `serialize`, `accumulated`, `hardlink`, ...).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{Args, Call, Module, Outcome};
use crate::error::{Error, Result};

pub struct File;

pub const MANAGED: &[&str] = &[
    "name",
    "contents",
    "source",
    "mode",
    "user",
    "group",
    "makedirs",
    "contents_newline",
    "dir_mode",
    "template",
    "context",
    "defaults",
    "backup",
];
pub const DIRECTORY: &[&str] = &[
    "name",
    "mode",
    "user",
    "group",
    "makedirs",
    "clean",
    "exclude_pat",
    "keep",
];
pub const ABSENT: &[&str] = &["name"];
pub const SYMLINK: &[&str] = &["name", "target", "force", "makedirs", "user", "group"];
const FUNCTIONS: &str = "managed, directory, absent, symlink";

impl Module for File {
    fn name(&self) -> &'static str {
        "file"
    }
    fn functions(&self) -> &'static [&'static str] {
        &["managed", "directory", "absent", "symlink"]
    }
    fn validate(&self, function: &str, args: &Args) -> Result<()> {
        let known = match function {
            "managed" => MANAGED,
            "directory" => DIRECTORY,
            "absent" => ABSENT,
            "symlink" => SYMLINK,
            other => {
                return Err(Error::InvalidInput(format!(
                    "file.{other} is not a function; file has {FUNCTIONS}"
                )))
            }
        };
        super::check_args("file", function, args, known)?;
        if function == "managed" && args.contains_key("contents") && args.contains_key("source") {
            return Err(Error::InvalidInput(
                "file.managed: give either contents or source, not both".into(),
            ));
        }
        if let Some(mode) = args.get("mode") {
            parse_mode(mode)?;
        }
        if let Some(t) = args.get("template") {
            if t.as_str() != Some("jinja") {
                return Err(Error::InvalidInput(format!(
                    "file.managed: template {t} is not supported; eden renders template: jinja"
                )));
            }
        }
        if function == "symlink" && !args.contains_key("target") {
            return Err(Error::InvalidInput(
                "file.symlink needs target: the path the link points to".into(),
            ));
        }
        Ok(())
    }
    fn outputs(&self, function: &str) -> &'static [&'static str] {
        match function {
            "managed" => &["path", "sha256"],
            "symlink" => &["path", "target"],
            _ => &["path"],
        }
    }
    fn call(&self, call: &Call) -> Result<Outcome> {
        let path = PathBuf::from(call.name());
        if !path.is_absolute() {
            return Err(Error::InvalidInput(format!(
                "file.{}: {:?} is not an absolute path",
                call.function,
                path.display()
            )));
        }
        let mut out = match call.function {
            "managed" => managed(call, &path)?,
            "directory" => directory(call, &path)?,
            "absent" => absent(call, &path)?,
            "symlink" => symlink(call, &path)?,
            other => {
                return Err(Error::InvalidInput(format!(
                    "file.{other} is not a function; file has {FUNCTIONS}"
                )))
            }
        };
        out.outputs
            .insert("path".into(), json!(path.display().to_string()));
        Ok(out)
    }
}

fn flag(args: &Args, key: &str, default: bool) -> bool {
    args.get(key).and_then(Value::as_bool).unwrap_or(default)
}

/// Salt accepts `mode: 644`, `mode: "0644"` and `mode: 0644` (which YAML reads as 644).
fn parse_mode(v: &Value) -> Result<u32> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => {
            return Err(Error::InvalidInput(format!(
                "mode must be octal digits like \"0644\", not {other}"
            )))
        }
    };
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "mode must be octal digits like \"0644\", not {text:?}"
            ))
        })
}

fn mode_arg(args: &Args) -> Result<Option<u32>> {
    args.get("mode").map(parse_mode).transpose()
}

/// Looks a user or group up in /etc/passwd or /etc/group; a number is taken as an id.
fn lookup_id(db: &str, name: &str) -> Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let text = fs::read_to_string(db)?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            (n == name).then_some(id)
        })
        .next()
        .ok_or_else(|| {
            let what = if db.ends_with("group") {
                "group"
            } else {
                "user"
            };
            Error::NotFound(format!(
                "{what} {name:?} does not exist (not in {db}); create it first or fix the name"
            ))
        })
}

/// The owner changes `user`/`group` ask for, given the current metadata (if any).
fn owner_changes(args: &Args, meta: Option<&fs::Metadata>) -> Result<(Option<u32>, Option<u32>)> {
    let uid = match args.get("user").and_then(Value::as_str) {
        Some(u) => Some(lookup_id("/etc/passwd", u)?),
        None => None,
    };
    let gid = match args.get("group").and_then(Value::as_str) {
        Some(g) => Some(lookup_id("/etc/group", g)?),
        None => None,
    };
    let uid = uid.filter(|u| meta.is_none_or(|m| m.uid() != *u));
    let gid = gid.filter(|g| meta.is_none_or(|m| m.gid() != *g));
    Ok((uid, gid))
}

/// The bytes `contents` or `source` give, rendered through Jinja with `template: jinja`.
fn desired_contents(call: &Call) -> Result<Option<Vec<u8>>> {
    let raw = raw_contents(call)?;
    match (raw, call.args.get("template").and_then(Value::as_str)) {
        (Some(bytes), Some("jinja")) => render_jinja(call, &bytes).map(Some),
        (raw, _) => Ok(raw),
    }
}

/// Renders a template with `defaults` overlaid by `context`, as Salt does. Undefined variables
/// are errors, so a typo cannot silently write an empty value.
fn render_jinja(call: &Call, bytes: &[u8]) -> Result<Vec<u8>> {
    let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
        Error::InvalidInput(format!(
            "file.managed {}: a jinja template must be UTF-8 text",
            call.name()
        ))
    })?;
    let mut vars = Map::new();
    for key in ["defaults", "context"] {
        match call.args.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => vars.extend(m.clone()),
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "file.managed: {key} must be a map of template variables, not {other}"
                )))
            }
        }
    }
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    let what = call
        .args
        .get("source")
        .and_then(Value::as_str)
        .unwrap_or("contents")
        .to_string();
    let err = |e: minijinja::Error| {
        Error::InvalidInput(format!(
            "file.managed {}: template {what}{}: {e}",
            call.name(),
            e.line().map(|l| format!(" line {l}")).unwrap_or_default()
        ))
    };
    env.add_template_owned(what.clone(), text).map_err(err)?;
    let out = env
        .get_template(&what)
        .and_then(|t| t.render(Value::Object(vars)))
        .map_err(err)?;
    Ok(out.into_bytes())
}

fn raw_contents(call: &Call) -> Result<Option<Vec<u8>>> {
    if let Some(c) = call.args.get("contents") {
        let mut text = match c {
            Value::String(s) => s.clone(),
            Value::Array(lines) => lines
                .iter()
                .map(|l| match l {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        if flag(call.args, "contents_newline", true) && !text.ends_with('\n') {
            text.push('\n');
        }
        return Ok(Some(text.into_bytes()));
    }
    if let Some(src) = call.args.get("source") {
        let src = src.as_str().ok_or_else(|| {
            Error::InvalidInput(format!("file.managed: source must be a string, not {src}"))
        })?;
        let missing = |e: Error| match e {
            Error::NotFound(m) => Error::NotFound(format!(
                "file.managed {}: source {src} is missing ({m}); add it to the state tree or \
                 fix the path",
                call.name()
            )),
            other => other,
        };
        if src.starts_with("kv://") {
            return call.tree.read(src).map(Some).map_err(|e| match e {
                Error::NotFound(m) => Error::NotFound(format!(
                    "file.managed {}: source {src}: {m}; a kv:// source is a key of the \
                     cluster's datastore, read when a cluster run (eden apply --target) starts",
                    call.name()
                )),
                other => other,
            });
        }
        for prefix in ["salt://", "eden://"] {
            if let Some(rel) = src.strip_prefix(prefix) {
                return Ok(Some(call.tree.read(rel).map_err(missing)?));
            }
        }
        let local = src.strip_prefix("file://").unwrap_or(src);
        if Path::new(local).is_absolute() {
            return fs::read(local).map(Some).map_err(|e| {
                Error::NotFound(format!("file.managed: cannot read source {local}: {e}"))
            });
        }
        return Ok(Some(call.tree.read(local).map_err(missing)?));
    }
    Ok(None)
}

pub(crate) fn unified_diff(path: &Path, old: &[u8], new: &[u8]) -> String {
    let (old, new) = (String::from_utf8_lossy(old), String::from_utf8_lossy(new));
    similar::TextDiff::from_lines(old.as_ref(), new.as_ref())
        .unified_diff()
        .context_radius(3)
        .header(
            &format!("{} (current)", path.display()),
            &format!("{} (desired)", path.display()),
        )
        .to_string()
}

/// `symlink_metadata`, but only "does not exist" is `None`: a parent that cannot be read or is
/// not a directory is an error, so nothing is written on a guess.
fn metadata(call: &Call, path: &Path) -> Result<Option<fs::Metadata>> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            // Names the ancestor that is in the way, if one is.
            check_parent(call, path)?;
            Ok(None)
        }
        Err(e) => Err(Error::Io(format!(
            "file.{} {}: cannot look at it ({e}); check that every parent directory exists, \
             is a directory, and can be searched",
            call.function,
            path.display()
        ))),
    }
}

/// The nearest existing ancestor must be a directory eden can search.
fn check_parent(call: &Call, path: &Path) -> Result<()> {
    for anc in path.ancestors().skip(1) {
        match fs::metadata(anc) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(Error::InvalidInput(format!(
                    "file.{} {}: {} is not a directory, so nothing can be created under it",
                    call.function,
                    path.display(),
                    anc.display()
                )))
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                continue
            }
            Err(e) => {
                return Err(Error::Io(format!(
                    "file.{} {}: cannot read the parent {} ({e})",
                    call.function,
                    path.display(),
                    anc.display()
                )))
            }
        }
    }
    Ok(())
}

/// `create_dir_all` with an error that names the directory and the function.
fn make_dirs(call: &Call, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| {
        Error::Io(format!(
            "file.{} {}: cannot create the directory {} ({e})",
            call.function,
            call.name(),
            dir.display()
        ))
    })
}

/// Where `backup` keeps old versions: `backup: minion` (or `True`) means
/// `/var/lib/eden/file_backup`, an absolute path means that directory.
fn backup_dir(args: &Args) -> Result<Option<PathBuf>> {
    match args.get("backup") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
        Some(Value::Bool(true)) => Ok(Some(PathBuf::from("/var/lib/eden/file_backup"))),
        Some(Value::String(s)) if s == "minion" => {
            Ok(Some(PathBuf::from("/var/lib/eden/file_backup")))
        }
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if Path::new(s).is_absolute() => Ok(Some(PathBuf::from(s))),
        Some(other) => Err(Error::InvalidInput(format!(
            "file.managed: backup must be minion, True or an absolute directory, not {other}"
        ))),
    }
}

/// Copies the current file to `dir/<path without the leading />.<time in ns>`, as Salt's
/// minion backups do, and returns where.
fn backup(dir: &Path, path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut name = rel.as_os_str().to_owned();
    name.push(format!(".{stamp}"));
    let dest = dir.join(name);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|e| {
            Error::Io(format!(
                "backup of {}: cannot create {} ({e})",
                path.display(),
                parent.display()
            ))
        })?;
    }
    write_atomic(&dest, bytes, mode)?;
    Ok(dest)
}

fn managed(call: &Call, path: &Path) -> Result<Outcome> {
    let name = path.display().to_string();
    // Everything that can fail on bad input is checked before anything is written.
    let want = desired_contents(call)?;
    let mode = mode_arg(call.args)?;
    let backup_to = backup_dir(call.args)?;
    let meta = metadata(call, path)?;
    if meta.as_ref().is_some_and(|m| m.is_dir()) {
        return Ok(Outcome::failed(format!(
            "{name} is a directory; file.managed manages regular files"
        )));
    }
    let current = if meta.is_some() {
        Some(fs::read(path).map_err(|e| {
            Error::Io(format!(
                "file.managed {name}: cannot read the current file: {e}"
            ))
        })?)
    } else {
        None
    };
    let (uid, gid) = owner_changes(call.args, meta.as_ref())?;
    let mut changes = Map::new();
    let new_bytes = match (&current, &want) {
        (None, want) => {
            changes.insert("diff".into(), json!("New file"));
            Some(want.clone().unwrap_or_default())
        }
        (Some(cur), Some(w)) if cur != w => {
            changes.insert("diff".into(), json!(unified_diff(path, cur, w)));
            Some(w.clone())
        }
        _ => None,
    };
    let sha256 = new_bytes
        .as_ref()
        .or(current.as_ref())
        .map(|b| super::ext::sha256_hex(b));
    let cur_mode = meta.as_ref().map(|m| m.permissions().mode() & 0o7777);
    let mode_change = mode.filter(|m| cur_mode != Some(*m) || current.is_none());
    if let Some(m) = mode_change {
        if current.is_some() {
            changes.insert("mode".into(), json!(format!("{m:04o}")));
        }
    }
    if let Some(u) = uid {
        changes.insert("user".into(), json!(u));
    }
    if let Some(g) = gid {
        changes.insert("group".into(), json!(g));
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let mut outputs = Map::new();
    if let Some(h) = &sha256 {
        outputs.insert("sha256".into(), json!(h));
    }
    if changes.is_empty() {
        let mut out = Outcome::ok(format!("File {name} is in the correct state"));
        out.outputs = outputs;
        return Ok(out);
    }
    if !parent.is_dir() && !flag(call.args, "makedirs", false) {
        return Ok(Outcome::failed(format!(
            "Parent directory not present: {} (set makedirs: True to create it)",
            parent.display()
        )));
    }
    if call.test {
        return Ok(Outcome {
            result: None,
            changes: Value::Object(changes),
            comment: format!("The file {name} is set to be changed"),
            outputs,
        });
    }
    make_dirs(call, parent)?;
    if let (Some(dir), Some(old), Some(_)) = (&backup_to, &current, &new_bytes) {
        let kept = backup(dir, path, old, cur_mode.unwrap_or(0o600))?;
        changes.insert("backup".into(), json!(kept.display().to_string()));
    }
    if let Some(bytes) = new_bytes {
        // Owner and mode are set on the temporary file, so the file appears complete.
        let owner = (
            uid.or(meta.as_ref().map(|m| m.uid())),
            gid.or(meta.as_ref().map(|m| m.gid())),
        );
        write_atomic_owned(path, &bytes, mode.or(cur_mode).unwrap_or(0o644), owner)?;
    } else {
        if let Some(m) = mode_change {
            fs::set_permissions(path, fs::Permissions::from_mode(m))?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::chown(path, uid, gid)?;
        }
    }
    let comment = if current.is_none() {
        format!("File {name} created")
    } else {
        format!("File {name} updated")
    };
    Ok(Outcome {
        result: Some(true),
        changes: Value::Object(changes),
        comment,
        outputs,
    })
}

/// Writes a temporary file beside `path`, fsyncs it, then renames it over `path`, so readers
/// see the old file or the new one and never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_atomic_owned(path, bytes, mode, (None, None))
}

/// [`write_atomic`], with the owner set on the temporary file before the rename. On any error
/// the temporary file is removed and `path` is untouched.
pub fn write_atomic_owned(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: (Option<u32>, Option<u32>),
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let file_name = path
        .file_name()
        .map(|f| f.to_string_lossy())
        .unwrap_or_default();
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{file_name}.eden-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if owner.0.is_some() || owner.1.is_some() {
            std::os::unix::fs::fchown(&f, owner.0, owner.1)?;
        }
        // After chown, which clears setuid/setgid bits.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename is durable once the directory is synced.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
}

fn directory(call: &Call, path: &Path) -> Result<Outcome> {
    let name = path.display().to_string();
    let mode = mode_arg(call.args)?;
    let meta = metadata(call, path)?;
    if meta.as_ref().is_some_and(|m| !m.is_dir()) {
        return Ok(Outcome::failed(format!(
            "{name} exists and is not a directory"
        )));
    }
    let mut changes = Map::new();
    if meta.is_none() {
        changes.insert(name.clone(), json!("New Dir"));
    }
    let cur_mode = meta.as_ref().map(|m| m.permissions().mode() & 0o7777);
    if let Some(m) = mode.filter(|m| cur_mode != Some(*m)) {
        changes.insert("mode".into(), json!(format!("{m:04o}")));
    }
    let (uid, gid) = owner_changes(call.args, meta.as_ref())?;
    if let Some(u) = uid {
        changes.insert("user".into(), json!(u));
    }
    if let Some(g) = gid {
        changes.insert("group".into(), json!(g));
    }
    let doomed = if flag(call.args, "clean", false) && meta.is_some() {
        let keep = keep_list(call.args, path)?;
        let pattern = call.args.get("exclude_pat").and_then(Value::as_str);
        let mut doomed = Vec::new();
        to_clean(path, &keep, pattern, &mut doomed)?;
        doomed
    } else {
        Vec::new()
    };
    if !doomed.is_empty() {
        let list: Vec<String> = doomed.iter().map(|p| p.display().to_string()).collect();
        changes.insert("removed".into(), json!(list));
    }
    if changes.is_empty() {
        return Ok(Outcome::ok(format!(
            "The directory {name} is in the correct state"
        )));
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    if meta.is_none() && !parent.is_dir() && !flag(call.args, "makedirs", false) {
        return Ok(Outcome::failed(format!(
            "No directory to create {name} in: {} is missing (set makedirs: True)",
            parent.display()
        )));
    }
    if call.test {
        return Ok(Outcome {
            result: None,
            changes: Value::Object(changes),
            comment: format!("The directory {name} is set to be changed"),
            outputs: Map::new(),
        });
    }
    if meta.is_none() {
        make_dirs(call, path)?;
    }
    if let Some(m) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(m))?;
    }
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(path, uid, gid)?;
    }
    for p in &doomed {
        let gone = match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(p),
            Ok(_) => fs::remove_file(p),
            Err(_) => Ok(()),
        };
        gone.map_err(|e| {
            Error::Io(format!(
                "file.directory clean: removing {}: {e}",
                p.display()
            ))
        })?;
    }
    Ok(Outcome {
        result: Some(true),
        changes: Value::Object(changes),
        comment: format!("Directory {name} updated"),
        outputs: Map::new(),
    })
}

/// `keep`: paths (absolute, or relative to the directory) that `clean` leaves alone.
fn keep_list(args: &Args, dir: &Path) -> Result<Vec<PathBuf>> {
    let items = match args.get("keep") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    Error::InvalidInput(format!("file.directory: keep lists paths, not {v}"))
                })
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(Error::InvalidInput(format!(
                "file.directory: keep must be a path or a list of paths, not {other}"
            )))
        }
    };
    Ok(items
        .into_iter()
        .map(|k| {
            let p = PathBuf::from(&k);
            if p.is_absolute() {
                p
            } else {
                dir.join(p)
            }
        })
        .collect())
}

/// What `clean` removes under `dir`: every entry that is not kept, not on the way to a kept
/// path, and whose name does not match `exclude_pat` (a glob). Sorted, for stable changes.
fn to_clean(
    dir: &Path,
    keep: &[PathBuf],
    pattern: Option<&str>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| {
            Error::Io(format!(
                "file.directory clean: reading {}: {e}",
                dir.display()
            ))
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let file_name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if keep.contains(&p)
            || pattern.is_some_and(|pat| crate::engine::compile::fnmatch(&file_name, pat))
        {
            continue;
        }
        let is_dir = fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if is_dir && keep.iter().any(|k| k.starts_with(&p)) {
            to_clean(&p, keep, pattern, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn symlink(call: &Call, path: &Path) -> Result<Outcome> {
    let name = path.display().to_string();
    let target = call
        .args
        .get("target")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "file.symlink {name}: target must be the path the link points to"
            ))
        })?
        .to_string();
    let meta = metadata(call, path)?;
    let (uid, gid) = {
        let link_meta = meta.as_ref().filter(|m| m.file_type().is_symlink());
        owner_changes(call.args, link_meta)?
    };
    let mut outputs = Map::new();
    outputs.insert("target".into(), json!(target));
    let mut changes = Map::new();
    match &meta {
        Some(m) if m.file_type().is_symlink() => {
            if fs::read_link(path)? != Path::new(&target) {
                changes.insert("change".into(), json!(name));
            }
        }
        Some(m) => {
            if !flag(call.args, "force", false) {
                let what = if m.is_dir() { "directory" } else { "file" };
                return Ok(Outcome::failed(format!(
                    "A {what} exists where the symlink {name} should be; set force: True to \
                     replace it"
                )));
            }
            changes.insert("change".into(), json!(name));
        }
        None => {
            changes.insert("new".into(), json!(name));
        }
    }
    if let Some(u) = uid {
        changes.insert("user".into(), json!(u));
    }
    if let Some(g) = gid {
        changes.insert("group".into(), json!(g));
    }
    if changes.is_empty() {
        let mut out = Outcome::ok(format!("Symlink {name} is present and owned correctly"));
        out.outputs = outputs;
        return Ok(out);
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    if !parent.is_dir() && !flag(call.args, "makedirs", false) {
        return Ok(Outcome::failed(format!(
            "Directory {} for symlink is not present (set makedirs: True)",
            parent.display()
        )));
    }
    if call.test {
        return Ok(Outcome {
            result: None,
            changes: Value::Object(changes),
            comment: format!("Symlink {name} to {target} is set for creation"),
            outputs,
        });
    }
    make_dirs(call, parent)?;
    let relink = changes.contains_key("new") || changes.contains_key("change");
    if relink {
        if meta.as_ref().is_some_and(|m| m.is_dir()) {
            fs::remove_dir_all(path)?;
        }
        // A new link beside the old path, renamed over it: the path is never missing.
        let tmp = parent.join(format!(
            ".{}.eden-link-{}",
            path.file_name()
                .map(|f| f.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)?;
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::Io(format!("file.symlink {name}: {e}")));
        }
    }
    if uid.is_some() || gid.is_some() || relink {
        let (u, g) = (
            uid.or_else(|| lookup_arg(call.args, "user", "/etc/passwd")),
            gid.or_else(|| lookup_arg(call.args, "group", "/etc/group")),
        );
        if u.is_some() || g.is_some() {
            std::os::unix::fs::lchown(path, u, g)?;
        }
    }
    Ok(Outcome {
        result: Some(true),
        changes: Value::Object(changes),
        comment: format!("Created new symlink {name} -> {target}"),
        outputs,
    })
}

fn lookup_arg(args: &Args, key: &str, db: &str) -> Option<u32> {
    args.get(key)
        .and_then(Value::as_str)
        .and_then(|n| lookup_id(db, n).ok())
}

fn absent(call: &Call, path: &Path) -> Result<Outcome> {
    let name = path.display().to_string();
    // `/`, `//`, `/.` and `/..` all name the root: never removed (Salt refuses it too).
    use std::path::Component;
    if path.components().all(|c| {
        matches!(
            c,
            Component::RootDir | Component::CurDir | Component::ParentDir
        )
    }) {
        return Err(Error::InvalidInput(format!(
            "file.absent: refusing to remove {name:?}, which is the root directory; name the \
             files or directories under it that should go"
        )));
    }
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        // Nothing under a missing path or under a file: absent already.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            return Ok(Outcome::ok(format!("File {name} is not present")));
        }
        Err(e) => {
            return Err(Error::Io(format!(
                "file.absent {name}: cannot look at it: {e}"
            )))
        }
    };
    let changes = json!({"removed": name});
    if call.test {
        return Ok(Outcome {
            result: None,
            changes,
            comment: format!("File {name} is set for removal"),
            outputs: Map::new(),
        });
    }
    if meta.is_dir() {
        fs::remove_dir_all(path)?;
    } else {
        fs::remove_file(path)?;
    }
    Ok(Outcome {
        result: Some(true),
        changes,
        comment: format!("Removed {name}"),
        outputs: Map::new(),
    })
}
