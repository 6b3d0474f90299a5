//! `pkgrepo`: package repositories, like Salt's `pkgrepo.managed` and `pkgrepo.absent`.
//!
//! On apt systems a repository is one source line (`name`, e.g.
//! `deb [signed-by=/usr/share/keyrings/x.gpg] https://example.org/debian bookworm main`) in a file
//! under `/etc/apt/sources.list.d/`. eden manages **that line** in the file (`file`, by default a
//! name made from the URL), leaving other lines alone unless `clean_file: True`; `disabled: True`
//! (or `enabled: False`) keeps the line commented out. On RPM systems (no apt, a
//! `/etc/yum.repos.d`) a repository is a `[name]` section owned whole in `file` (default
//! `/etc/yum.repos.d/<name>.repo`) with `humanname`, `baseurl`, `mirrorlist`, `gpgcheck`,
//! `gpgkey`, `enabled`.
//!
//! Files are written atomically (temp file, fsync, rename) and `changes.diff` is a unified diff.
//! When a file changed and `refresh` is true (the default), the package cache is refreshed
//! through PackageKit (`RefreshCache`), so a `pkg` step after this one sees the repository.
//! In test mode nothing is written and nothing is refreshed.
//!
//! Not done (Salt has them): `key_url`/`keyid`/`keyserver`/`key_text` (import keys yourself with
//! `file.managed` and use `signed-by`), `ppa`, `dist`/`comps`/`architectures` as separate
//! arguments (write them in the line), deb822 `.sources` files, `aptkey`, zypper repositories.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::file::{unified_diff, write_atomic};
use super::pkg::LazyBackend;
use super::{Args, Call, Module, Outcome};
use crate::error::{Error, Result};

pub const ARGS: &[&str] = &[
    "name",
    "file",
    "humanname",
    "disabled",
    "enabled",
    "clean_file",
    "refresh",
    "baseurl",
    "mirrorlist",
    "gpgcheck",
    "gpgkey",
    "comments",
];

/// Which repository files this machine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Apt,
    Yum,
}

impl Family {
    /// apt when `/etc/apt` exists, else yum when `/etc/yum.repos.d` does.
    pub fn detect() -> Result<Family> {
        if Path::new("/etc/apt/sources.list.d").is_dir() {
            Ok(Family::Apt)
        } else if Path::new("/etc/yum.repos.d").is_dir() {
            Ok(Family::Yum)
        } else {
            Err(Error::Unavailable(
                "pkgrepo: this machine has neither /etc/apt/sources.list.d nor /etc/yum.repos.d"
                    .into(),
            ))
        }
    }
}

pub struct PkgRepo {
    backend: LazyBackend,
}

impl PkgRepo {
    pub fn packagekit() -> Self {
        PkgRepo {
            backend: LazyBackend::packagekit(),
        }
    }
}

impl Default for PkgRepo {
    fn default() -> Self {
        Self::packagekit()
    }
}

impl Module for PkgRepo {
    fn name(&self) -> &'static str {
        "pkgrepo"
    }
    fn functions(&self) -> &'static [&'static str] {
        &["managed", "absent"]
    }
    fn validate(&self, function: &str, args: &Args) -> Result<()> {
        if !self.functions().contains(&function) {
            return Err(Error::InvalidInput(format!(
                "pkgrepo.{function} is not a function; pkgrepo has managed, absent"
            )));
        }
        super::check_args("pkgrepo", function, args, ARGS)?;
        if let Some(f) = args.get("file").and_then(Value::as_str) {
            if !f.contains("${{") && !Path::new(f).is_absolute() {
                return Err(Error::InvalidInput(format!(
                    "pkgrepo: file {f:?} is not an absolute path"
                )));
            }
        }
        Ok(())
    }
    fn outputs(&self, _function: &str) -> &'static [&'static str] {
        &["file"]
    }
    fn call(&self, call: &Call) -> Result<Outcome> {
        let family = Family::detect()?;
        let edit = match family {
            Family::Apt => apt_edit(call)?,
            Family::Yum => yum_edit(call)?,
        };
        let name = call.name();
        let file = edit.path.display().to_string();
        let mut out = if edit.old == edit.new {
            Outcome::ok(format!(
                "Package repo {name:?} is already in the correct state"
            ))
        } else {
            let mut changes = Map::new();
            changes.insert(
                "diff".into(),
                json!(unified_diff(
                    &edit.path,
                    edit.old.as_deref().unwrap_or(b""),
                    edit.new.as_deref().unwrap_or(b"")
                )),
            );
            if call.test {
                Outcome {
                    result: None,
                    changes: Value::Object(changes),
                    comment: format!("Package repo {name:?} would be changed in {file}"),
                    outputs: Map::new(),
                }
            } else {
                match &edit.new {
                    Some(bytes) => {
                        if let Some(dir) = edit.path.parent() {
                            fs::create_dir_all(dir)?;
                        }
                        write_atomic(&edit.path, bytes, 0o644)?
                    }
                    None => fs::remove_file(&edit.path)?,
                }
                let refresh = call
                    .args
                    .get("refresh")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                let mut comment = format!("Package repo {name:?} changed in {file}");
                if refresh {
                    let refreshed = self.backend.get().and_then(|b| b.refresh());
                    if refreshed.is_err() {
                        self.backend.reset();
                    }
                    refreshed.map_err(|e| {
                        Error::Unavailable(format!(
                            "pkgrepo: {file} was written, but refreshing the package cache \
                             failed: {e}"
                        ))
                    })?;
                    comment.push_str("; package cache refreshed");
                }
                Outcome {
                    result: Some(true),
                    changes: Value::Object(changes),
                    comment,
                    outputs: Map::new(),
                }
            }
        };
        out.outputs.insert("file".into(), json!(file));
        Ok(out)
    }
}

/// A planned change of one repository file: `None` means "no file".
struct Edit {
    path: PathBuf,
    old: Option<Vec<u8>>,
    new: Option<Vec<u8>>,
}

fn flag(args: &Args, key: &str) -> Option<bool> {
    args.get(key).and_then(|v| match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_u64().map(|n| n != 0),
        Value::String(s) => Some(matches!(s.as_str(), "1" | "true" | "True" | "yes")),
        _ => None,
    })
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io(format!(
            "pkgrepo: cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Whitespace-insensitive form of a source line, without a leading `#`.
fn normalize(line: &str) -> String {
    line.trim()
        .trim_start_matches('#')
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks an apt source line: `deb` or `deb-src`, options in brackets, a URI, a suite.
pub fn parse_apt_line(line: &str) -> Result<(String, String)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let bad = || {
        Error::InvalidInput(format!(
            "pkgrepo: {line:?} is not an apt source line; write it as \
             `deb [options] URI suite [component...]`"
        ))
    };
    let kind = *words.first().ok_or_else(bad)?;
    if kind != "deb" && kind != "deb-src" {
        return Err(bad());
    }
    let mut rest = words[1..].iter();
    let mut uri = rest.next().ok_or_else(bad)?;
    if uri.starts_with('[') {
        // Options run until the word that ends with `]`.
        let mut w = *uri;
        while !w.ends_with(']') {
            w = rest.next().ok_or_else(bad)?;
        }
        uri = rest.next().ok_or_else(bad)?;
    }
    let suite = rest.next().ok_or_else(bad)?;
    if !uri.contains(':') {
        return Err(bad());
    }
    Ok((uri.to_string(), suite.to_string()))
}

/// `/etc/apt/sources.list.d/<host_path>.list`, from the line's URI.
fn default_apt_file(uri: &str) -> PathBuf {
    let stem: String = uri
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(uri)
        .trim_start_matches("file:")
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from(format!("/etc/apt/sources.list.d/{stem}.list"))
}

fn apt_edit(call: &Call) -> Result<Edit> {
    let line = call.name().trim().to_string();
    let (uri, _suite) = parse_apt_line(&line)?;
    let path = match call.args.get("file").and_then(Value::as_str) {
        Some(f) => PathBuf::from(f),
        None => default_apt_file(&uri),
    };
    if !path.is_absolute() {
        return Err(Error::InvalidInput(format!(
            "pkgrepo: file {:?} is not an absolute path",
            path.display()
        )));
    }
    let old = read_opt(&path)?;
    let text = old
        .as_deref()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let want = normalize(&line);
    let others: Vec<&str> = text.lines().filter(|l| normalize(l) != want).collect();
    let new = if call.function == "absent" {
        let keep: Vec<&str> = others;
        // A file left with nothing but comments (such as its humanname) goes too.
        if keep
            .iter()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            None
        } else {
            Some(format!("{}\n", keep.join("\n")).into_bytes())
        }
    } else {
        let disabled = flag(call.args, "disabled")
            .or_else(|| flag(call.args, "enabled").map(|e| !e))
            .unwrap_or(false);
        let entry = if disabled {
            format!("# {line}")
        } else {
            line.clone()
        };
        let clean = flag(call.args, "clean_file").unwrap_or(false);
        // Keep the existing line in place when only its state changes.
        let mut lines: Vec<String> = Vec::new();
        let mut placed = false;
        for l in text.lines() {
            if normalize(l) == want {
                if !placed {
                    let commented = l.trim_start().starts_with('#');
                    lines.push(if commented == disabled {
                        l.to_string()
                    } else {
                        entry.clone()
                    });
                    placed = true;
                }
            } else if !clean {
                lines.push(l.to_string());
            }
        }
        if !placed {
            if let Some(h) = call.args.get("humanname").and_then(Value::as_str) {
                if !clean || lines.is_empty() {
                    lines.push(format!("# {h}"));
                }
            }
            lines.push(entry);
        }
        Some(format!("{}\n", lines.join("\n")).into_bytes())
    };
    // An existing line that is already right, including its enabled state, is no change.
    let new = match (&old, &new) {
        (Some(o), Some(n)) if o == n => old.clone(),
        _ => new,
    };
    Ok(Edit { path, old, new })
}

fn yum_edit(call: &Call) -> Result<Edit> {
    let name = call.name();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(Error::InvalidInput(format!(
            "pkgrepo: {name:?} is not a yum repository id (letters, digits, - _ . :)"
        )));
    }
    let path = match call.args.get("file").and_then(Value::as_str) {
        Some(f) => PathBuf::from(f),
        None => PathBuf::from(format!("/etc/yum.repos.d/{name}.repo")),
    };
    let old = read_opt(&path)?;
    if call.function == "absent" {
        return Ok(Edit {
            path,
            new: None,
            old,
        });
    }
    let args = call.args;
    if !args.contains_key("baseurl") && !args.contains_key("mirrorlist") {
        return Err(Error::InvalidInput(format!(
            "pkgrepo.managed {name}: a yum repository needs baseurl or mirrorlist"
        )));
    }
    let mut text = format!("[{name}]\n");
    let enabled = flag(args, "enabled")
        .or_else(|| flag(args, "disabled").map(|d| !d))
        .unwrap_or(true);
    text.push_str(&format!(
        "name={}\n",
        args.get("humanname")
            .and_then(Value::as_str)
            .unwrap_or(name)
    ));
    for key in ["baseurl", "mirrorlist", "gpgkey"] {
        if let Some(v) = args.get(key).and_then(Value::as_str) {
            text.push_str(&format!("{key}={v}\n"));
        }
    }
    text.push_str(&format!("enabled={}\n", u8::from(enabled)));
    if let Some(g) = flag(args, "gpgcheck") {
        text.push_str(&format!("gpgcheck={}\n", u8::from(g)));
    }
    Ok(Edit {
        path,
        old,
        new: Some(text.into_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_lines_are_checked() {
        assert_eq!(
            parse_apt_line("deb [signed-by=/k.gpg arch=amd64] https://x.org/debian bookworm main")
                .unwrap(),
            ("https://x.org/debian".to_string(), "bookworm".to_string())
        );
        assert!(parse_apt_line("deb file:/srv/repo ./").is_ok());
        for bad in [
            "",
            "rpm http://x a",
            "deb [trusted=yes http://x",
            "deb nourl suite",
        ] {
            let e = parse_apt_line(bad).unwrap_err().to_string();
            assert!(e.contains("apt source line"), "{bad}: {e}");
        }
    }

    #[test]
    fn default_file_from_uri() {
        assert_eq!(
            default_apt_file("https://download.example.org/debian/"),
            PathBuf::from("/etc/apt/sources.list.d/download.example.org_debian.list")
        );
    }
}
