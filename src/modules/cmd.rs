//! `cmd`: run commands, like Salt's `cmd.run` state.
//!
//! `cmd.run` runs `name` through a shell (`/bin/sh -c` unless `shell` says otherwise) and
//! succeeds when the exit code is 0. Its outputs (`stdout`, `stderr`, `retcode`, `pid`) are what
//! later steps read as `${{ steps.ID.stdout }}`.
//!
//! Like Salt, a command always reports a change when it runs; idempotence comes from the guards:
//! - `creates`: a path (or list of paths); if they all exist, the command is not run.
//! - `unless`: a command (or list); if any exits 0, the command is not run.
//! - `onlyif`: a command (or list); unless all exit 0, the command is not run.
//!
//! Also:
//! - `cwd`, `env` (a map, or Salt's list of one-key maps);
//! - `runas`: a user name or uid; the command (and its guards) run with that user's uid and
//!   primary gid, no supplementary groups, `HOME`/`USER`/`LOGNAME` set, and in the home
//!   directory unless `cwd` is given;
//! - `timeout` (seconds): the command runs in its own process group, and the whole group is
//!   killed at the deadline; the step fails;
//! - `stateful`: the last line of stdout reports changes, as in Salt (see `docs/modules/cmd.md`);
//! - `output_limit` (bytes, default [`OUTPUT_LIMIT`]): at most this much of each of stdout and
//!   stderr is kept; the comment says when output was cut.
//!
//! Both pipes are read in the calling thread with poll(2), so a chatty command never blocks
//! and no helper thread is needed; plain `/path args` commands are started without a shell.
//! In test mode the guards still run (they must not change anything, as in Salt) but the
//! command does not.
//!
//! Not done (Salt has them): `stdin`, `umask`, `output_loglevel`/`hide_output`, `prepend_path`,
//! `success_retcodes`/`success_stdout`/`success_stderr`, `use_vt`, `bg`, `password` (Windows),
//! `test_name` for stateful scripts, `cmd.script`, `cmd.wait`, `cmd.mod_watch` specifics.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::{Args, Call, Module, Outcome};
use crate::error::{Error, Result};

pub struct Cmd;

pub const ARGS: &[&str] = &[
    "name",
    "cwd",
    "env",
    "shell",
    "runas",
    "timeout",
    "creates",
    "unless",
    "onlyif",
    "stateful",
    "output_limit",
    "comment",
];

/// The default most bytes kept of each of stdout and stderr (`output_limit` changes it). The
/// rest is read and dropped, and the result's comment says how much there was.
pub const OUTPUT_LIMIT: usize = 1 << 20;

impl Module for Cmd {
    fn name(&self) -> &'static str {
        "cmd"
    }
    fn functions(&self) -> &'static [&'static str] {
        &["run"]
    }
    fn validate(&self, function: &str, args: &Args) -> Result<()> {
        if function != "run" {
            return Err(Error::InvalidInput(format!(
                "cmd.{function} is not a function; cmd has run"
            )));
        }
        super::check_args("cmd", "run", args, ARGS)?;
        if let Some(t) = args.get("timeout") {
            if !(t.is_u64() || t.is_string()) {
                return Err(Error::InvalidInput(format!(
                    "cmd.run: timeout must be a number of seconds, not {t}"
                )));
            }
        }
        if let Some(r) = args.get("runas") {
            if !(r.is_string() || r.is_null()) {
                return Err(Error::InvalidInput(format!(
                    "cmd.run: runas must be a user name, not {r}"
                )));
            }
        }
        output_limit(args)?;
        Ok(())
    }
    fn outputs(&self, _function: &str) -> &'static [&'static str] {
        &["stdout", "stderr", "retcode", "pid"]
    }
    fn call(&self, call: &Call) -> Result<Outcome> {
        let command = call.name().to_string();
        let args = call.args;
        if let Some(creates) = args.get("creates") {
            let paths = string_list(creates, "creates")?;
            if paths.iter().all(|p| Path::new(p).exists()) {
                return Ok(Outcome::ok("All files in creates exist"));
            }
        }
        if let Some(unless) = args.get("unless") {
            for guard in string_list(unless, "unless")? {
                if run_shell(&guard, args, None)?.retcode == 0 {
                    return Ok(Outcome::ok("unless condition is true"));
                }
            }
        }
        if let Some(onlyif) = args.get("onlyif") {
            for guard in string_list(onlyif, "onlyif")? {
                if run_shell(&guard, args, None)?.retcode != 0 {
                    return Ok(Outcome::ok("onlyif condition is false"));
                }
            }
        }
        if call.test {
            let mut out = Outcome::ok(format!("Command {command:?} would have been executed"));
            out.result = None;
            out.changes = json!({"cmd": command});
            return Ok(out);
        }
        let timeout = match args.get("timeout") {
            Some(Value::Number(n)) => n.as_u64().map(Duration::from_secs),
            Some(Value::String(s)) => Some(Duration::from_secs(s.parse().map_err(|_| {
                Error::InvalidInput(format!("cmd.run: timeout {s:?} is not a number"))
            })?)),
            _ => None,
        };
        let ran = run_shell(&command, args, timeout)?;
        let mut outputs = Map::new();
        outputs.insert("stdout".into(), json!(ran.stdout));
        outputs.insert("stderr".into(), json!(ran.stderr));
        outputs.insert("retcode".into(), json!(ran.retcode));
        outputs.insert("pid".into(), json!(ran.pid));
        let ok = ran.retcode == 0 && !ran.timed_out;
        let mut comment = if ran.timed_out {
            format!("Command {command:?} timed out and was killed")
        } else if ok {
            format!("Command {command:?} run")
        } else {
            format!("Command {command:?} run and exited {}", ran.retcode)
        };
        let limit = output_limit(args)?;
        for (stream, total) in ["stdout", "stderr"].iter().zip(ran.dropped) {
            if let Some(total) = total {
                comment.push_str(&format!(
                    "; {stream} was {total} bytes, only the first {limit} are kept \
                     (output_limit)"
                ));
            }
        }
        let mut out = Outcome {
            result: Some(ok),
            changes: Value::Object(outputs.clone()),
            comment,
            outputs,
        };
        if flag(args.get("stateful")) && ok {
            stateful(&mut out);
        }
        Ok(out)
    }
}

fn flag(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => is_true(s),
        Some(Value::Number(n)) => n.as_u64().is_some_and(|n| n != 0),
        _ => false,
    }
}

fn is_true(s: &str) -> bool {
    matches!(s.to_ascii_lowercase().as_str(), "yes" | "true" | "1" | "on")
}

/// Salt's `stateful`: the last line of stdout says what the command did, as JSON
/// (`{"changed": true, "comment": "..."}`) or as `name=value` words
/// (`changed=yes comment='did it' extra=1`). With `changed` false there are no changes and the
/// step reports the command's comment; with `changed` true the changes are the parsed values
/// plus the command's outputs, stdout without its state line.
fn stateful(out: &mut Outcome) {
    let stdout = out.outputs["stdout"].as_str().unwrap_or("").to_string();
    if stdout.trim().is_empty() {
        return;
    }
    let trimmed = stdout.trim_end();
    let (rest, last) = match trimmed.rfind('\n') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => ("", trimmed),
    };
    let data: Map<String, Value> = match serde_json::from_str::<Value>(last) {
        Ok(Value::Object(m)) => m,
        _ => match shell_words(last)
            .into_iter()
            .map(|w| {
                w.split_once('=')
                    .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                    .ok_or(())
            })
            .collect::<std::result::Result<Map<_, _>, ()>>()
        {
            Ok(m) if !m.is_empty() => m,
            _ => {
                out.result = Some(false);
                out.comment = "Failed parsing script output! Stdout must be JSON or a line of \
                               name=value pairs."
                    .into();
                return;
            }
        },
    };
    let mut data = data;
    let changed = match data.remove("changed") {
        Some(Value::Bool(b)) => b,
        Some(Value::String(s)) => is_true(&s),
        Some(Value::Number(n)) => n.as_u64().is_some_and(|n| n != 0),
        _ => false,
    };
    if let Some(c) = data.remove("comment") {
        out.comment = match c {
            Value::String(s) => s,
            other => other.to_string(),
        };
    }
    out.outputs.insert("stdout".into(), json!(rest));
    if changed {
        for (k, v) in &out.outputs {
            data.entry(k.clone()).or_insert_with(|| v.clone());
        }
        out.changes = Value::Object(data);
    } else {
        out.changes = Value::Object(Map::new());
    }
}

/// Splits a line into words as a POSIX shell would for quoting: '...', "..." and backslash.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                cur.push(n);
                            }
                        }
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

fn string_list(v: &Value, what: &str) -> Result<Vec<String>> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    Error::InvalidInput(format!("cmd.run: {what} must list strings, not {i}"))
                })
            })
            .collect(),
        other => Err(Error::InvalidInput(format!(
            "cmd.run: {what} must be a string or a list of strings, not {other}"
        ))),
    }
}

struct Ran {
    stdout: String,
    stderr: String,
    retcode: i64,
    pid: u32,
    timed_out: bool,
    /// Bytes each stream really produced, when more than the limit (the rest was dropped).
    dropped: [Option<usize>; 2],
}

/// True when `command` is plain words with nothing a shell would interpret, so running it
/// directly behaves exactly like `sh -c` and saves starting a shell.
/// The program must be given by path: a bare word may be a shell builtin (`exit`, `cd`).
fn is_plain(command: &str) -> bool {
    command.trim_start().starts_with('/')
        && command.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, ' ' | '/' | '.' | '-' | '_' | ',' | ':' | '+' | '@')
        })
}

/// A user from /etc/passwd: (name, uid, gid, home).
pub(crate) fn passwd_user(user: &str) -> Result<(String, u32, u32, String)> {
    let text = std::fs::read_to_string("/etc/passwd")?;
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 6 {
            continue;
        }
        if f[0] == user || f[2] == user {
            let uid = f[2].parse().unwrap_or(u32::MAX);
            let gid = f[3].parse().unwrap_or(u32::MAX);
            return Ok((f[0].to_string(), uid, gid, f[5].to_string()));
        }
    }
    Err(Error::NotFound(format!(
        "cmd.run: runas user {user:?} does not exist in /etc/passwd; create the user first \
         (for example with a user state) or fix the name"
    )))
}

/// The byte limit for each of stdout and stderr.
fn output_limit(args: &Args) -> Result<usize> {
    match args.get("output_limit") {
        None | Some(Value::Null) => Ok(OUTPUT_LIMIT),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .map(|n| n as usize)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "cmd.run: output_limit must be a number of bytes, not {v}"
                ))
            }),
    }
}

fn run_shell(command: &str, args: &Args, timeout: Option<Duration>) -> Result<Ran> {
    let shell = args.get("shell").and_then(Value::as_str);
    let mut cmd = match shell {
        None if is_plain(command) => {
            let mut words = command.split_whitespace();
            let mut c = Command::new(words.next().expect("not empty"));
            c.args(words);
            c
        }
        _ => {
            let mut c = Command::new(shell.unwrap_or("/bin/sh"));
            c.arg("-c").arg(command);
            c
        }
    };
    let shell = shell.unwrap_or("/bin/sh");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cwd = args.get("cwd").and_then(Value::as_str);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    if let Some(user) = args.get("runas").and_then(Value::as_str) {
        // std drops the supplementary groups (setgroups(0)) before setuid, so the command
        // keeps none of eden's privileges.
        let (name, uid, gid, home) = passwd_user(user)?;
        cmd.uid(uid).gid(gid);
        cmd.env("HOME", &home)
            .env("USER", &name)
            .env("LOGNAME", &name);
        if cwd.is_none() {
            // Users such as `nobody` have a home that does not exist.
            cmd.current_dir(if Path::new(&home).is_dir() {
                home.as_str()
            } else {
                "/"
            });
        }
    }
    match args.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                cmd.env(k, scalar(v));
            }
        }
        Some(Value::Array(items)) => {
            for item in items {
                let Value::Object(m) = item else {
                    return Err(Error::InvalidInput(format!(
                        "cmd.run: env entries must be KEY: value maps, not {item}"
                    )));
                };
                for (k, v) in m {
                    cmd.env(k, scalar(v));
                }
            }
        }
        Some(other) => {
            return Err(Error::InvalidInput(format!(
                "cmd.run: env must be a map of variables, not {other}"
            )))
        }
    }
    if timeout.is_some() {
        // Its own process group, so a timeout kills what the command started too (a shell's
        // children would otherwise keep running and hold the output pipes open). std sets it
        // with posix_spawn's POSIX_SPAWN_SETPGROUP, no pre_exec hook needed.
        cmd.process_group(0);
    }
    let limit = output_limit(args)?;
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // A plain command that is not a program: report it as `sh -c` would.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && cwd_ok(cwd) => {
            let prog = command.split_whitespace().next().unwrap_or("");
            return Ok(Ran {
                stdout: String::new(),
                stderr: format!("{shell}: {prog}: not found"),
                retcode: 127,
                pid: 0,
                timed_out: false,
                dropped: [None, None],
            });
        }
        Err(e) => {
            return Err(Error::Io(format!(
                "cmd.run: cannot start {command:?}{}: {e}",
                cwd.map(|c| format!(" in {c}")).unwrap_or_default()
            )))
        }
    };
    let pid = child.id();
    let deadline = timeout.map(|t| Instant::now() + t);
    let (streams, mut timed_out) = read_both(&mut child, limit, deadline)?;
    // Both pipes can close long before the command ends (`exec >/dev/null 2>&1; sleep 999`),
    // so the deadline holds for the wait too.
    let status = match deadline {
        Some(d) if !timed_out => {
            let (status, late) = wait_until(&mut child, d)?;
            timed_out = late;
            status
        }
        _ => child.wait()?,
    };
    use std::os::unix::process::ExitStatusExt;
    let retcode = status
        .code()
        .map(i64::from)
        .unwrap_or_else(|| 128 + i64::from(status.signal().unwrap_or(0)));
    let [(stdout, out_total), (stderr, err_total)] = streams;
    let dropped = [
        (out_total > limit).then_some(out_total),
        (err_total > limit).then_some(err_total),
    ];
    Ok(Ran {
        stdout: trim_newline(String::from_utf8_lossy(&stdout).into_owned()),
        stderr: trim_newline(String::from_utf8_lossy(&stderr).into_owned()),
        retcode,
        pid,
        timed_out,
        dropped,
    })
}

/// Waits for `child` until `deadline`, then kills its process group (it has one whenever there
/// is a deadline) and reaps it; true if it had to be killed.
fn wait_until(
    child: &mut std::process::Child,
    deadline: Instant,
) -> Result<(std::process::ExitStatus, bool)> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, false));
        }
        if Instant::now() >= deadline {
            kill_group(child);
            return Ok((child.wait()?, true));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills the process group made for `child` (`process_group(0)`), then the child itself.
fn kill_group(child: &mut std::process::Child) {
    // SAFETY: kill(2) with a negative pid signals the process group made for this child
    // (process_group(0) is set whenever there is a deadline).
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
    }
    let _ = child.kill();
}

/// A missing cwd also gives NotFound from spawn; that is an error, not "command not found".
fn cwd_ok(cwd: Option<&str>) -> bool {
    cwd.is_none_or(|c| Path::new(c).is_dir())
}

type Stream = (Vec<u8>, usize);

/// Reads stdout and stderr together with poll(2), in this thread: each keeps at most `limit`
/// bytes (the rest is read and counted, so the command never blocks on a full pipe). At the
/// deadline the command's process group is killed.
fn read_both(
    child: &mut std::process::Child,
    limit: usize,
    deadline: Option<Instant>,
) -> Result<([Stream; 2], bool)> {
    use std::os::fd::{AsRawFd, OwnedFd};
    let mut pipes: [Option<std::fs::File>; 2] = [
        child
            .stdout
            .take()
            .map(|p| std::fs::File::from(OwnedFd::from(p))),
        child
            .stderr
            .take()
            .map(|p| std::fs::File::from(OwnedFd::from(p))),
    ];
    let mut out: [Stream; 2] = [(Vec::new(), 0), (Vec::new(), 0)];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut polled: Vec<(usize, libc::pollfd)> = Vec::with_capacity(2);
        for (i, p) in pipes.iter().enumerate() {
            if let Some(f) = p {
                polled.push((
                    i,
                    libc::pollfd {
                        fd: f.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ));
            }
        }
        if polled.is_empty() {
            return Ok((out, false));
        }
        let wait_ms: libc::c_int = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    kill_group(child);
                    return Ok((out, true));
                }
                left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
            }
        };
        let mut fds: Vec<libc::pollfd> = polled.iter().map(|(_, p)| *p).collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io(format!("cmd.run: waiting for output: {e}")));
        }
        for (k, pfd) in fds.iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let i = polled[k].0;
            let Some(f) = pipes[i].as_mut() else { continue };
            match f.read(&mut buf) {
                Ok(0) => pipes[i] = None,
                Ok(got) => {
                    let (kept, total) = &mut out[i];
                    let room = limit.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..got.min(room)]);
                    *total += got;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => pipes[i] = None,
            }
        }
    }
}

/// Salt strips the final newline of a command's output; so do we, so `${{ steps.x.stdout }}`
/// can be used inline.
fn trim_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
    }
    s
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
