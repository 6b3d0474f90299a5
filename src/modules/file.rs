//! `file`: files and directories, like Salt's `file.managed`, `file.directory` and
//! `file.absent` states.
//!
//! - `file.managed`: the file `name` holds `contents` (a string, or a list of lines) or the bytes
//!   of `source` (a `salt://` or `eden://` path in the state tree, or an absolute local path).
//!   `contents` gets a final newline when it lacks one, as in Salt (`contents_newline`). `mode`
//!   (e.g. `"0644"` or `644`), `user`, `group`, `makedirs`. The write is atomic: a temporary file
//!   in the same directory, fsync, rename. `changes.diff` is a unified diff (also in test mode).
//! - `file.directory`: the directory `name` exists with `mode`/`user`/`group`; `makedirs`.
//! - `file.absent`: `name` does not exist.
//!
//! Every function compares before it writes, so a second run reports no changes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{Args, Call, Module, Outcome};
use crate::error::{Error, Result};

pub struct File;

const MANAGED: &[&str] = &[
    "name",
    "contents",
    "source",
    "mode",
    "user",
    "group",
    "makedirs",
    "contents_newline",
    "dir_mode",
];
const DIRECTORY: &[&str] = &["name", "mode", "user", "group", "makedirs"];
const ABSENT: &[&str] = &["name"];

impl Module for File {
    fn name(&self) -> &'static str {
        "file"
    }
    fn functions(&self) -> &'static [&'static str] {
        &["managed", "directory", "absent"]
    }
    fn validate(&self, function: &str, args: &Args) -> Result<()> {
        let known = match function {
            "managed" => MANAGED,
            "directory" => DIRECTORY,
            "absent" => ABSENT,
            other => {
                return Err(Error::InvalidInput(format!(
                    "file.{other} is not a function; file has managed, directory, absent"
                )))
            }
        };
        for key in args.keys() {
            if !known.contains(&key.as_str()) {
                return Err(Error::InvalidInput(format!(
                    "file.{function} does not take the argument {key:?}; it takes {}",
                    known.join(", ")
                )));
            }
        }
        if function == "managed" && args.contains_key("contents") && args.contains_key("source") {
            return Err(Error::InvalidInput(
                "file.managed: give either contents or source, not both".into(),
            ));
        }
        if let Some(mode) = args.get("mode") {
            parse_mode(mode)?;
        }
        Ok(())
    }
    fn outputs(&self, _function: &str) -> &'static [&'static str] {
        &["path"]
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
            other => {
                return Err(Error::InvalidInput(format!(
                    "file.{other} is not a function; file has managed, directory, absent"
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
        .ok_or_else(|| Error::NotFound(format!("no {name:?} in {db}")))
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

fn desired_contents(call: &Call) -> Result<Option<Vec<u8>>> {
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
        for prefix in ["salt://", "eden://"] {
            if let Some(rel) = src.strip_prefix(prefix) {
                return Ok(Some(call.tree.read(rel)?));
            }
        }
        let local = src.strip_prefix("file://").unwrap_or(src);
        if Path::new(local).is_absolute() {
            return fs::read(local).map(Some).map_err(|e| {
                Error::NotFound(format!("file.managed: cannot read source {local}: {e}"))
            });
        }
        return Ok(Some(call.tree.read(local)?));
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

fn managed(call: &Call, path: &Path) -> Result<Outcome> {
    let name = path.display().to_string();
    let want = desired_contents(call)?;
    let mode = mode_arg(call.args)?;
    let meta = fs::symlink_metadata(path).ok();
    if meta.as_ref().is_some_and(|m| m.is_dir()) {
        return Ok(Outcome::failed(format!(
            "{name} is a directory; file.managed manages regular files"
        )));
    }
    let current = if meta.is_some() {
        Some(fs::read(path)?)
    } else {
        None
    };
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
    let cur_mode = meta.as_ref().map(|m| m.permissions().mode() & 0o7777);
    let mode_change = mode.filter(|m| cur_mode != Some(*m) || current.is_none());
    if let Some(m) = mode_change {
        if current.is_some() {
            changes.insert("mode".into(), json!(format!("{m:04o}")));
        }
    }
    let (uid, gid) = owner_changes(call.args, meta.as_ref())?;
    if let Some(u) = uid {
        changes.insert("user".into(), json!(u));
    }
    if let Some(g) = gid {
        changes.insert("group".into(), json!(g));
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    if changes.is_empty() {
        return Ok(Outcome::ok(format!("File {name} is in the correct state")));
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
            outputs: Map::new(),
        });
    }
    fs::create_dir_all(parent)?;
    if let Some(bytes) = new_bytes {
        write_atomic(path, &bytes, mode.or(cur_mode).unwrap_or(0o644))?;
    } else if let Some(m) = mode_change {
        fs::set_permissions(path, fs::Permissions::from_mode(m))?;
    }
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(path, uid, gid)?;
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
        outputs: Map::new(),
    })
}

/// Writes a temporary file beside `path`, fsyncs it, then renames it over `path`, so readers
/// see the old file or the new one and never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let file_name = path
        .file_name()
        .map(|f| f.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.eden-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn directory(call: &Call, path: &Path) -> Result<Outcome> {
    let name = path.display().to_string();
    let mode = mode_arg(call.args)?;
    let meta = fs::symlink_metadata(path).ok();
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
        fs::create_dir_all(path)?;
    }
    if let Some(m) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(m))?;
    }
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(path, uid, gid)?;
    }
    Ok(Outcome {
        result: Some(true),
        changes: Value::Object(changes),
        comment: format!("Directory {name} updated"),
        outputs: Map::new(),
    })
}

fn absent(call: &Call, path: &Path) -> Result<Outcome> {
    let name = path.display().to_string();
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(Outcome::ok(format!("File {name} is not present")));
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
