//! The built-in modules the engine ships with, on real files and processes.

use std::os::unix::fs::PermissionsExt;

use eden::error::{Error, Result};
use eden::modules::{cmd::Cmd, file::File, Args, Call, EmptyTree, Module, Outcome, SourceTree};
use serde_json::{json, Value};

struct OneFile(&'static str, &'static str);
impl SourceTree for OneFile {
    fn read(&self, path: &str) -> Result<Vec<u8>> {
        if path == self.0 {
            Ok(self.1.as_bytes().to_vec())
        } else {
            Err(Error::NotFound(path.into()))
        }
    }
}

fn call(m: &dyn Module, function: &str, args: Value, test: bool, tree: &dyn SourceTree) -> Outcome {
    let args: Args = args.as_object().unwrap().clone();
    m.validate(function, &args).unwrap();
    m.call(&Call {
        id: "t",
        function,
        args: &args,
        test,
        tree,
        changed_watches: &[],
    })
    .unwrap()
}

#[test]
fn file_managed_creates_updates_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/c.txt");
    let p = path.to_str().unwrap();
    let failed = call(
        &File,
        "managed",
        json!({"name": p, "contents": "x"}),
        false,
        &EmptyTree,
    );
    assert_eq!(failed.result, Some(false));
    assert!(failed.comment.contains("makedirs"), "{}", failed.comment);
    let made = call(
        &File,
        "managed",
        json!({"name": p, "contents": "one\ntwo", "makedirs": true, "mode": 600}),
        false,
        &EmptyTree,
    );
    assert_eq!(made.result, Some(true));
    assert_eq!(made.changes["diff"], "New file");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = call(
        &File,
        "managed",
        json!({"name": p, "contents": "one\ntwo", "mode": "0600"}),
        false,
        &EmptyTree,
    );
    assert_eq!(again.result, Some(true));
    assert!(!again.has_changes(), "{:?}", again.changes);
    // Test mode shows a unified diff and leaves the file alone.
    let dry = call(
        &File,
        "managed",
        json!({"name": p, "contents": ["one", "three"], "mode": "0644"}),
        true,
        &EmptyTree,
    );
    assert_eq!(dry.result, None);
    let diff = dry.changes["diff"].as_str().unwrap();
    assert!(diff.contains("-two\n+three\n"), "{diff}");
    assert_eq!(dry.changes["mode"], "0644");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
    // From the state tree.
    let tree = OneFile("files/motd", "welcome\n");
    let from_tree = call(
        &File,
        "managed",
        json!({"name": p, "source": "salt://files/motd"}),
        false,
        &tree,
    );
    assert!(from_tree.changes["diff"]
        .as_str()
        .unwrap()
        .contains("+welcome"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "welcome\n");
    // No temporary files left beside it.
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );
}

#[test]
fn file_directory_and_absent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("x/y");
    let p = d.to_str().unwrap();
    let dry = call(
        &File,
        "directory",
        json!({"name": p, "makedirs": true}),
        true,
        &EmptyTree,
    );
    assert_eq!(dry.result, None);
    assert!(!d.exists());
    let made = call(
        &File,
        "directory",
        json!({"name": p, "makedirs": true, "mode": "0750"}),
        false,
        &EmptyTree,
    );
    assert_eq!(made.changes[p], "New Dir");
    assert_eq!(
        std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
        0o750
    );
    let again = call(
        &File,
        "directory",
        json!({"name": p, "mode": "0750"}),
        false,
        &EmptyTree,
    );
    assert!(!again.has_changes());
    let gone = call(&File, "absent", json!({"name": p}), false, &EmptyTree);
    assert!(gone.has_changes());
    assert!(!d.exists());
    assert!(!call(&File, "absent", json!({"name": p}), false, &EmptyTree).has_changes());
}

#[test]
fn cmd_run_outputs_guards_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let ran = call(
        &Cmd,
        "run",
        json!({"name": "echo $GREETING; echo oops >&2", "env": {"GREETING": "hi"}, "cwd": dir.path()}),
        false,
        &EmptyTree,
    );
    assert_eq!(ran.result, Some(true));
    assert_eq!(ran.outputs["stdout"], "hi");
    assert_eq!(ran.outputs["stderr"], "oops");
    assert_eq!(ran.outputs["retcode"], 0);
    let failed = call(&Cmd, "run", json!({"name": "exit 4"}), false, &EmptyTree);
    assert_eq!(failed.result, Some(false));
    assert_eq!(failed.outputs["retcode"], 4);
    let marker = dir.path().join("made");
    let m = marker.to_str().unwrap();
    let create = json!({"name": format!("touch {m}"), "creates": m});
    assert!(call(&Cmd, "run", create.clone(), false, &EmptyTree).has_changes());
    let skipped = call(&Cmd, "run", create, false, &EmptyTree);
    assert!(!skipped.has_changes());
    assert_eq!(skipped.comment, "All files in creates exist");
    assert!(!call(
        &Cmd,
        "run",
        json!({"name": "false", "unless": "true"}),
        false,
        &EmptyTree
    )
    .has_changes());
    assert!(!call(
        &Cmd,
        "run",
        json!({"name": "false", "onlyif": "false"}),
        false,
        &EmptyTree
    )
    .has_changes());
    let dry = call(
        &Cmd,
        "run",
        json!({"name": format!("touch {m}.2")}),
        true,
        &EmptyTree,
    );
    assert_eq!(dry.result, None);
    assert!(!dir.path().join("made.2").exists());
    let slow = call(
        &Cmd,
        "run",
        json!({"name": "sleep 5", "timeout": 0}),
        false,
        &EmptyTree,
    );
    assert_eq!(slow.result, Some(false));
    assert!(slow.comment.contains("timed out"), "{}", slow.comment);
}
