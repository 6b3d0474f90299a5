//! cmd.run on real processes: runas, timeouts that kill the process group, the output limit,
//! stateful scripts, and both pipes read at once.

use eden::modules::cmd::{Cmd, OUTPUT_LIMIT};
use eden::modules::{Args, Call, EmptyTree, Module, Outcome};
use serde_json::{json, Value};

fn run(args: Value) -> eden::error::Result<Outcome> {
    let args: Args = args.as_object().unwrap().clone();
    Cmd.validate("run", &args)?;
    Cmd.call(&Call {
        id: "t",
        function: "run",
        args: &args,
        test: false,
        tree: &EmptyTree,
        changed_watches: &[],
    })
}

#[test]
fn runas_drops_to_the_user_and_its_groups() {
    let out = run(json!({"name": "id -u; id -g; id -G; pwd; echo $HOME $USER", "runas": "nobody"}))
        .unwrap();
    assert_eq!(out.result, Some(true), "{}", out.comment);
    let lines: Vec<&str> = out.outputs["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(lines[0], "65534");
    assert_eq!(lines[1], "65534");
    assert_eq!(lines[2], "65534", "no supplementary group of root is kept");
    assert_eq!(
        lines[3], "/",
        "nobody's home does not exist, so the command runs in /"
    );
    assert_eq!(lines[4], "/nonexistent nobody");
    // The guards run as the user too: nobody cannot write to /root.
    let out =
        run(json!({"name": "true", "runas": "nobody", "unless": "touch /root/eden-runas-probe"}))
            .unwrap();
    assert_eq!(
        out.comment, "Command \"true\" run",
        "unless failed as nobody, so the command ran"
    );
    assert!(!std::path::Path::new("/root/eden-runas-probe").exists());
}

#[test]
fn runas_unknown_user_is_an_error_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let side = dir.path().join("ran");
    let e = run(json!({"name": format!("touch {}", side.display()), "runas": "eden-no-such-user"}))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("eden-no-such-user") && e.contains("does not exist"),
        "{e}"
    );
    assert!(!side.exists());
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let out = run(json!({
        "name": format!("sleep 300 & echo $! > {}; wait", pidfile.display()),
        "timeout": 1
    }))
    .unwrap();
    assert_eq!(out.result, Some(false));
    assert!(out.comment.contains("timed out"), "{}", out.comment);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The background sleep was in the group: it is gone (or a zombie being reaped by init).
    let mut alive = true;
    for _ in 0..200 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        if stat.is_empty() || state == Some("Z") {
            alive = false;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!alive, "sleep {pid} survived the timeout");
}

#[test]
fn timeout_holds_for_a_command_that_closed_its_output() {
    // Both pipes close at once, so only the wait is left to bound.
    let started = std::time::Instant::now();
    let out = run(json!({"name": "exec >/dev/null 2>&1; sleep 300", "timeout": 1})).unwrap();
    assert_eq!(out.result, Some(false), "{}", out.comment);
    assert!(out.comment.contains("timed out"), "{}", out.comment);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "the wait went on for {:?}",
        started.elapsed()
    );
}

#[test]
fn output_is_limited_and_the_limit_is_reported() {
    let out = run(json!({"name": "head -c 3000000 /dev/zero | tr '\\0' a; echo err >&2"})).unwrap();
    assert_eq!(out.result, Some(true));
    assert_eq!(out.outputs["stdout"].as_str().unwrap().len(), OUTPUT_LIMIT);
    assert_eq!(out.outputs["stderr"], "err");
    assert!(
        out.comment.contains("stdout was 3000000 bytes") && out.comment.contains("output_limit"),
        "{}",
        out.comment
    );
    let out = run(json!({"name": "echo 0123456789abcdef", "output_limit": 10})).unwrap();
    assert_eq!(out.outputs["stdout"], "0123456789");
    assert!(
        out.comment.contains("stdout was 17 bytes"),
        "{}",
        out.comment
    );
    let small = run(json!({"name": "echo hi"})).unwrap();
    assert!(!small.comment.contains("output_limit"), "{}", small.comment);
    let e = run(json!({"name": "true", "output_limit": "lots"}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("output_limit"), "{e}");
}

#[test]
fn both_pipes_are_drained_at_once() {
    // 300 KB to each pipe, interleaved: reading one pipe to its end first would deadlock.
    let out = run(json!({
        "name": "i=0; while [ $i -lt 300 ]; do head -c 1024 /dev/zero; head -c 1024 /dev/zero >&2; i=$((i+1)); done | wc -c",
        "timeout": 60
    }))
    .unwrap();
    assert_eq!(out.result, Some(true), "{}", out.comment);
    assert_eq!(out.outputs["stdout"].as_str().unwrap().trim(), "307200");
    assert_eq!(out.outputs["stderr"].as_str().unwrap().len(), 307200);
}

#[test]
fn stateful_scripts_report_their_own_changes() {
    let changed = run(json!({
        "name": "echo working; echo '{\"changed\": true, \"comment\": \"rotated keys\", \"count\": 3}'",
        "stateful": true
    }))
    .unwrap();
    assert_eq!(changed.result, Some(true));
    assert_eq!(changed.comment, "rotated keys");
    assert_eq!(changed.changes["count"], 3);
    assert_eq!(changed.changes["stdout"], "working");
    assert_eq!(changed.outputs["stdout"], "working");

    let same = run(json!({"name": "echo \"changed=no comment='already done'\"", "stateful": true}))
        .unwrap();
    assert_eq!(same.result, Some(true));
    assert_eq!(same.changes, json!({}));
    assert_eq!(same.comment, "already done");

    let words =
        run(json!({"name": "echo 'changed=yes version=\"1.2 beta\"'", "stateful": true})).unwrap();
    assert_eq!(words.changes["version"], "1.2 beta");

    let bad = run(json!({"name": "echo not a state line", "stateful": true})).unwrap();
    assert_eq!(bad.result, Some(false));
    assert!(
        bad.comment.contains("Failed parsing script output"),
        "{}",
        bad.comment
    );
}

#[test]
fn missing_cwd_is_an_error_not_command_not_found() {
    let e = run(json!({"name": "/bin/true", "cwd": "/nonexistent-eden-dir"}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent-eden-dir"), "{e}");
}
