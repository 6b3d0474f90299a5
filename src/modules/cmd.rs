//! `cmd`: run commands, like Salt's `cmd.run` state.
//!
//! `cmd.run` runs `name` through a shell (`/bin/sh -c` unless `shell` says otherwise) and
//! succeeds when the exit code is 0. Its outputs (`stdout`, `stderr`, `retcode`, `pid`) are what
//! later steps read as `${{ steps.ID.stdout }}`.
//!
//! Like Salt, a command always reports a change when it runs; idempotence comes from the guards:
//! - `creates`: a path (or list of paths); if they all exist, the command is not run.
//! - `unless`: a command; if it exits 0, the command is not run.
//! - `onlyif`: a command; unless it exits 0, the command is not run.
//!
//! Also `cwd`, `env` (a map, or Salt's list of one-key maps) and `timeout` (seconds; the command
//! is killed and the step fails). In test mode the guards still run (they must not change
//! anything, as in Salt) but the command does not.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::{Args, Call, Module, Outcome};
use crate::error::{Error, Result};

pub struct Cmd;

const KNOWN: &[&str] = &[
    "name", "cwd", "env", "shell", "timeout", "creates", "unless", "onlyif", "comment",
];

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
        for key in args.keys() {
            if !KNOWN.contains(&key.as_str()) {
                return Err(Error::InvalidInput(format!(
                    "cmd.run does not take the argument {key:?}; it takes {}",
                    KNOWN.join(", ")
                )));
            }
        }
        if let Some(t) = args.get("timeout") {
            if !(t.is_u64() || t.is_string()) {
                return Err(Error::InvalidInput(format!(
                    "cmd.run: timeout must be a number of seconds, not {t}"
                )));
            }
        }
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
        let comment = if ran.timed_out {
            format!("Command {command:?} timed out and was killed")
        } else if ok {
            format!("Command {command:?} run")
        } else {
            format!("Command {command:?} run and exited {}", ran.retcode)
        };
        Ok(Outcome {
            result: Some(ok),
            changes: Value::Object(outputs.clone()),
            comment,
            outputs,
        })
    }
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
    if let Some(cwd) = args.get("cwd").and_then(Value::as_str) {
        cmd.current_dir(cwd);
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
        // children would otherwise keep running and hold the output pipes open).
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // A plain command that is not a program: report it as `sh -c` would.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let prog = command.split_whitespace().next().unwrap_or("");
            return Ok(Ran {
                stdout: String::new(),
                stderr: format!("{shell}: {prog}: not found"),
                retcode: 127,
                pid: 0,
                timed_out: false,
            });
        }
        Err(e) => return Err(Error::Io(format!("cmd.run: cannot start {command:?}: {e}"))),
    };
    let pid = child.id();
    let mut timed_out = false;
    let (status, stdout, stderr) = match timeout {
        // Without a timeout std reads both pipes without extra threads.
        None => {
            let out = child.wait_with_output()?;
            (out.status, out.stdout, out.stderr)
        }
        Some(limit) => {
            // Drain both pipes on threads so a chatty command cannot block on a full pipe
            // while we poll for the deadline.
            let mut out_pipe = child.stdout.take().expect("piped stdout");
            let mut err_pipe = child.stderr.take().expect("piped stderr");
            let out_t = std::thread::spawn(move || {
                let mut b = Vec::new();
                let _ = out_pipe.read_to_end(&mut b);
                b
            });
            let err_t = std::thread::spawn(move || {
                let mut b = Vec::new();
                let _ = err_pipe.read_to_end(&mut b);
                b
            });
            let start = Instant::now();
            let status = loop {
                if let Some(st) = child.try_wait()? {
                    break st;
                }
                if start.elapsed() >= limit {
                    // SAFETY: kill(2) with a negative pid signals the process group we created
                    // for this child; it touches no memory.
                    unsafe {
                        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                    }
                    let _ = child.kill();
                    timed_out = true;
                    break child.wait()?;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            (
                status,
                out_t.join().unwrap_or_default(),
                err_t.join().unwrap_or_default(),
            )
        }
    };
    use std::os::unix::process::ExitStatusExt;
    let retcode = status
        .code()
        .map(i64::from)
        .unwrap_or_else(|| 128 + i64::from(status.signal().unwrap_or(0)));
    Ok(Ran {
        stdout: trim_newline(String::from_utf8_lossy(&stdout).into_owned()),
        stderr: trim_newline(String::from_utf8_lossy(&stderr).into_owned()),
        retcode,
        pid,
        timed_out,
    })
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
