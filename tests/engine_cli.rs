//! `eden apply --local` and `eden plan` as a user runs them: the real binary, a real state tree
//! in a temporary directory, real files and commands.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn eden(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_eden"))
        .args(args)
        .output()
        .expect("run eden");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
}

fn web_tree(tree: &Path, out: &Path) {
    let o = out.display();
    write(
        tree,
        "web.sls",
        &format!(
            "{o}/conf/site.conf:\n  file.managed:\n    - contents: |\n        server {{{{ node.name }}}}\n        port {{{{ vars.port }}}}\n    - mode: \"0640\"\n\
             {o}/conf:\n  file.directory: []\n\
             token:\n  cmd.run:\n    - name: echo tok-42\n\
             use_token:\n  cmd.run:\n    - name: \"echo ${{{{ steps.token.stdout }}}} > {o}/token.txt\"\n\
             reload:\n  cmd.run:\n    - name: \"true\"\n    - onchanges:\n      - file: {o}/conf/site.conf\n"
        ),
    );
    write(tree, "vars/common.yaml", "port: 8080\n");
}

#[test]
fn apply_local_runs_idempotently_and_prints_the_contract_json() {
    let tree = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    web_tree(tree.path(), out.path());
    let t = tree.path().to_str().unwrap();
    // genius: the directory is ordered before the file by a rewrite, not by the author.
    let (code, stdout, stderr) = eden(&[
        "apply",
        "--local",
        t,
        "web",
        "--mode",
        "genius",
        "--output",
        "json",
        "--node-name",
        "web1",
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let steps = v["nodes"]["web1"].as_array().unwrap();
    assert_eq!(steps.len(), 5);
    assert_eq!(v["summary"]["failed"], 0);
    assert!(v["run"].as_str().unwrap().starts_with("local-"));
    let mut nums: Vec<u64> = steps
        .iter()
        .map(|s| s["run_num"].as_u64().unwrap())
        .collect();
    nums.sort();
    assert_eq!(nums, vec![0, 1, 2, 3, 4]);
    for s in steps {
        for key in [
            "id",
            "name",
            "function",
            "result",
            "changes",
            "comment",
            "duration_ms",
            "run_num",
            "outputs",
        ] {
            assert!(s.get(key).is_some(), "step lacks {key}: {s}");
        }
    }
    let conf = out.path().join("conf/site.conf");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "server web1\nport 8080\n"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("token.txt")).unwrap(),
        "tok-42\n"
    );
    let by_id = |steps: &[Value], id: &str| steps.iter().find(|s| s["id"] == id).cloned().unwrap();
    assert_eq!(by_id(steps, "token")["outputs"]["stdout"], "tok-42");
    assert!(by_id(steps, "reload")["changes"]["retcode"] == 0);

    // Second run: the files are in place, so they report no changes and reload does not run.
    let (code, stdout, _) = eden(&[
        "apply",
        "--local",
        t,
        "web",
        "--output",
        "json",
        "--node-name",
        "web1",
    ]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let steps = v["nodes"]["web1"].as_array().unwrap();
    let conf_id = conf.display().to_string();
    assert_eq!(by_id(steps, &conf_id)["changes"], serde_json::json!({}));
    assert_eq!(
        by_id(steps, "reload")["comment"],
        "State was not run because none of the onchanges reqs changed"
    );
}

#[test]
fn test_mode_changes_nothing_and_shows_a_diff() {
    let tree = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    web_tree(tree.path(), out.path());
    std::fs::create_dir_all(out.path().join("conf")).unwrap();
    let conf = out.path().join("conf/site.conf");
    std::fs::write(&conf, "server web1\nport 80\n").unwrap();
    let t = tree.path().to_str().unwrap();
    let (code, stdout, stderr) = eden(&[
        "apply",
        "--local",
        t,
        "web",
        "--test",
        "--output",
        "json",
        "--node-name",
        "web1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let steps = v["nodes"]["web1"].as_array().unwrap();
    let file = steps
        .iter()
        .find(|s| s["function"] == "file.managed")
        .unwrap();
    assert_eq!(file["result"], Value::Null);
    let diff = file["changes"]["diff"].as_str().unwrap();
    assert!(diff.contains("-port 80\n+port 8080"), "{diff}");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "server web1\nport 80\n"
    );
    assert!(!out.path().join("token.txt").exists());
}

#[test]
fn a_failure_gives_exit_code_1_and_names_the_failed_requisite() {
    let tree = tempfile::tempdir().unwrap();
    write(
        tree.path(),
        "app.sls",
        "build:\n  cmd.run:\n    - name: exit 3\ndeploy:\n  cmd.run:\n    - name: \"true\"\n    - require:\n      - cmd: build\n",
    );
    let t = tree.path().to_str().unwrap();
    let (code, stdout, stderr) = eden(&["apply", "--local", t, "app"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("Comment: One or more requisite failed: app.build"),
        "{stdout}"
    );
    assert!(stdout.contains("Summary for"), "{stdout}");
    assert!(stdout.contains("Failed:    2"), "{stdout}");
    // Live progress goes to stderr, one line per step.
    assert!(stderr.contains("[1/2] FAIL build (cmd.run)"), "{stderr}");
}

#[test]
fn plan_prints_the_order_and_genius_rewrites_with_reasons() {
    let tree = tempfile::tempdir().unwrap();
    write(tree.path(), "top.sls", "base:\n  '*':\n    - files\n");
    write(
        tree.path(),
        "files.sls",
        "/srv/app/config.yml:\n  file.managed:\n    - contents: x\n/srv/app:\n  file.directory: []\n",
    );
    let t = tree.path().to_str().unwrap();
    let (code, stdout, stderr) = eden(&["plan", "--local", t, "--mode", "genius"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("1. file.directory /srv/app"), "{stdout}");
    assert!(
        stdout.contains("2. file.managed /srv/app/config.yml"),
        "{stdout}"
    );
    assert!(stdout.contains("parent-dir-before-file"), "{stdout}");
    assert!(
        stdout.contains("/srv/app/config.yml lies under /srv/app"),
        "{stdout}"
    );
    let (code, stdout, _) = eden(&["plan", "--local", t, "--mode", "ansible"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("1. file.managed /srv/app/config.yml"),
        "{stdout}"
    );
    assert!(!stdout.contains("Rewrites"), "{stdout}");
}

#[test]
fn bad_input_is_refused_with_a_message() {
    let (code, _, stderr) = eden(&["apply", "/nonexistent", "x"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("use --local"), "{stderr}");
    let (code, _, stderr) = eden(&["apply", "--local", "/nonexistent", "x", "--mode", "fast"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown mode \"fast\""), "{stderr}");
}
