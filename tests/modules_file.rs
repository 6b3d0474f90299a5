//! file.* on real files: templates, backups, sha256 outputs, directory clean, symlinks, and bad
//! input that must leave nothing half-written.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use eden::error::{Error, Result};
use eden::modules::file::File;
use eden::modules::{Args, Call, EmptyTree, Module, Outcome, SourceTree};
use serde_json::{json, Value};

struct Tree(Vec<(&'static str, &'static str)>);
impl SourceTree for Tree {
    fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.0
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, c)| c.as_bytes().to_vec())
            .ok_or_else(|| Error::NotFound(format!("no file {path:?} in the test tree")))
    }
}

fn call_in(function: &str, args: Value, test: bool, tree: &dyn SourceTree) -> Result<Outcome> {
    let args: Args = args.as_object().unwrap().clone();
    File.validate(function, &args)?;
    File.call(&Call {
        id: "t",
        function,
        args: &args,
        test,
        tree,
        changed_watches: &[],
    })
}

fn call(function: &str, args: Value, test: bool) -> Result<Outcome> {
    call_in(function, args, test, &EmptyTree)
}

fn sha256(b: &[u8]) -> String {
    eden::modules::ext::sha256_hex(b)
}

/// Names in `dir`, sorted: used to prove no temporary file was left behind.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn jinja_template_from_the_state_tree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.conf");
    let tree = Tree(vec![(
        "app.conf.j2",
        "port = {{ port }}\nhost = {{ host }}\n{% for u in users %}user {{ u }}\n{% endfor %}",
    )]);
    let args = json!({
        "name": path.to_str().unwrap(),
        "source": "salt://app.conf.j2",
        "template": "jinja",
        "defaults": {"port": 80, "host": "localhost", "users": []},
        "context": {"port": 8080, "users": ["ann", "bob"]}
    });
    let out = call_in("managed", args.clone(), false, &tree).unwrap();
    assert_eq!(out.result, Some(true), "{}", out.comment);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, "port = 8080\nhost = localhost\nuser ann\nuser bob\n");
    assert_eq!(out.outputs["sha256"], sha256(text.as_bytes()));
    let again = call_in("managed", args, false, &tree).unwrap();
    assert_eq!(again.changes, json!({}));
    assert_eq!(again.outputs["sha256"], sha256(text.as_bytes()));

    // An undefined variable is an error that names it, and nothing is written.
    let other = dir.path().join("other.conf");
    let e = call_in(
        "managed",
        json!({"name": other.to_str().unwrap(), "contents": "x = {{ nosuch }}", "template": "jinja"}),
        false,
        &tree,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nosuch") || e.contains("undefined"), "{e}");
    assert!(!other.exists());
    let e = call(
        "managed",
        json!({"name": "/tmp/x", "contents": "", "template": "mako"}),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mako") && e.contains("jinja"), "{e}");
}

#[test]
fn backup_keeps_the_replaced_file() {
    let dir = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let path = dir.path().join("motd");
    std::fs::write(&path, "old text\n").unwrap();
    let out = call(
        "managed",
        json!({"name": path.to_str().unwrap(), "contents": "new text", "backup": backups.path().to_str().unwrap()}),
        false,
    )
    .unwrap();
    assert_eq!(out.result, Some(true), "{}", out.comment);
    let kept = out.changes["backup"].as_str().unwrap();
    assert!(kept.starts_with(backups.path().to_str().unwrap()), "{kept}");
    assert!(
        kept.contains(path.strip_prefix("/").unwrap().to_str().unwrap()),
        "{kept}"
    );
    assert_eq!(std::fs::read_to_string(kept).unwrap(), "old text\n");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new text\n");
    // No change, no backup.
    let again = call(
        "managed",
        json!({"name": path.to_str().unwrap(), "contents": "new text", "backup": backups.path().to_str().unwrap()}),
        false,
    )
    .unwrap();
    assert_eq!(again.changes, json!({}));
    let e = call(
        "managed",
        json!({"name": path.to_str().unwrap(), "contents": "x", "backup": "rel"}),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("backup"), "{e}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new text\n");
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("existing"), "keep me\n").unwrap();
    let before = listing(d);

    let e = call(
        "managed",
        json!({"name": "relative/path", "contents": "x"}),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("relative/path") && e.contains("absolute"), "{e}");

    let target = d.join("from-source");
    let e = call_in(
        "managed",
        json!({"name": target.to_str().unwrap(), "source": "salt://missing.conf"}),
        false,
        &Tree(vec![]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("missing.conf") && e.contains("source"), "{e}");

    let e = call(
        "managed",
        json!({"name": d.join("existing").to_str().unwrap(), "contents": "changed", "user": "eden-no-such-user"}),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("eden-no-such-user") && e.contains("does not exist"),
        "{e}"
    );
    let e = call(
        "managed",
        json!({"name": d.join("new").to_str().unwrap(), "contents": "x", "group": "eden-no-such-group"}),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("group \"eden-no-such-group\""), "{e}");

    // A parent that is a file: nothing can be created under it, even with makedirs.
    let e = call(
        "managed",
        json!({"name": d.join("existing/sub/f").to_str().unwrap(), "contents": "x", "makedirs": true}),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("is not a directory") && e.contains("existing"),
        "{e}"
    );
    let e = call(
        "directory",
        json!({"name": d.join("existing/sub").to_str().unwrap(), "makedirs": true}),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("is not a directory"), "{e}");

    // The root is never made absent. Asked in test mode, so a broken check removes nothing.
    for root in ["/", "//", "/./..", "/.."] {
        let e = call("absent", json!({ "name": root }), true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refusing") && e.contains("root directory"),
            "{root}: {e}"
        );
    }

    assert_eq!(listing(d), before, "no file and no temporary file was left");
    assert_eq!(
        std::fs::read_to_string(d.join("existing")).unwrap(),
        "keep me\n"
    );
}

#[test]
fn owner_is_set_before_the_file_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("owned");
    let out = call(
        "managed",
        json!({"name": path.to_str().unwrap(), "contents": "x", "user": "nobody", "group": "nogroup", "mode": "0640"}),
        false,
    )
    .unwrap();
    assert_eq!(out.result, Some(true), "{}", out.comment);
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (65534, 65534, 0o640));
    let again = call(
        "managed",
        json!({"name": path.to_str().unwrap(), "contents": "x", "user": "nobody", "group": "nogroup", "mode": "0640"}),
        false,
    )
    .unwrap();
    assert_eq!(again.changes, json!({}));
}

#[test]
fn directory_clean_removes_what_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("conf.d");
    std::fs::create_dir_all(d.join("sub/deeper")).unwrap();
    for f in [
        "a.conf",
        "b.conf",
        "notes.txt",
        "sub/keep.conf",
        "sub/drop.conf",
        "sub/deeper/x",
    ] {
        std::fs::write(d.join(f), f).unwrap();
    }
    let args = json!({
        "name": d.to_str().unwrap(),
        "clean": true,
        "keep": ["a.conf", d.join("sub/keep.conf").to_str().unwrap()],
        "exclude_pat": "*.txt"
    });
    let dry = call("directory", args.clone(), true).unwrap();
    assert_eq!(dry.result, None);
    let d_ = |p: &str| d.join(p).to_str().unwrap().to_string();
    assert_eq!(
        dry.changes["removed"],
        json!([d_("b.conf"), d_("sub/deeper"), d_("sub/drop.conf")])
    );
    assert!(d.join("b.conf").exists());
    let done = call("directory", args.clone(), false).unwrap();
    assert_eq!(done.result, Some(true), "{}", done.comment);
    assert_eq!(listing(&d), vec!["a.conf", "notes.txt", "sub"]);
    assert_eq!(listing(&d.join("sub")), vec!["keep.conf"]);
    assert_eq!(call("directory", args, false).unwrap().changes, json!({}));
}

#[test]
fn symlink_create_retarget_force_and_idempotence() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("current");
    let l = link.to_str().unwrap();
    let dry = call(
        "symlink",
        json!({"name": l, "target": "/etc/hostname"}),
        true,
    )
    .unwrap();
    assert_eq!(dry.result, None);
    assert!(std::fs::symlink_metadata(&link).is_err());
    let made = call(
        "symlink",
        json!({"name": l, "target": "/etc/hostname"}),
        false,
    )
    .unwrap();
    assert_eq!(made.result, Some(true), "{}", made.comment);
    assert_eq!(made.changes, json!({"new": l}));
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("/etc/hostname")
    );
    assert_eq!(made.outputs["target"], "/etc/hostname");
    let same = call(
        "symlink",
        json!({"name": l, "target": "/etc/hostname"}),
        false,
    )
    .unwrap();
    assert_eq!(same.changes, json!({}));
    let moved = call("symlink", json!({"name": l, "target": "release-2"}), false).unwrap();
    assert_eq!(moved.changes, json!({"change": l}));
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("release-2"));

    let file = dir.path().join("in-the-way");
    std::fs::write(&file, "data").unwrap();
    let f = file.to_str().unwrap();
    let refused = call("symlink", json!({"name": f, "target": "/tmp"}), false).unwrap();
    assert_eq!(refused.result, Some(false));
    assert!(refused.comment.contains("force"), "{}", refused.comment);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    let forced = call(
        "symlink",
        json!({"name": f, "target": "/tmp", "force": true}),
        false,
    )
    .unwrap();
    assert_eq!(forced.result, Some(true), "{}", forced.comment);
    assert_eq!(std::fs::read_link(&file).unwrap(), Path::new("/tmp"));
    let e = call("symlink", json!({"name": l}), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("target"), "{e}");
}

/// A parent directory the running user cannot search: eden (run as `nobody`) reports it and
/// writes nothing. Root can read everything, so the real binary runs as another user.
#[test]
fn unreadable_parent_is_reported_by_a_non_root_run() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let tree = tempfile::tempdir().unwrap();
    let locked = tempfile::tempdir().unwrap();
    std::fs::set_permissions(locked.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(tree.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = locked.path().join("inner/app.conf");
    std::fs::write(
        tree.path().join("s.sls"),
        format!(
            "{}:\n  file.managed:\n    - contents: hello\n    - makedirs: True\n",
            target.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        tree.path().join("s.sls"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    // The build directory may not be open to other users: run a copy.
    let bin = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let eden = bin.path().join("eden");
    std::fs::copy(env!("CARGO_BIN_EXE_eden"), &eden).unwrap();
    // Applies the tree as nobody; returns the exit code and the one step's comment.
    let apply_as_nobody = || -> (Option<i32>, String) {
        let out = std::process::Command::new(&eden)
            .args(["apply", "--local", tree.path().to_str().unwrap(), "s"])
            .args(["--output", "json"])
            .current_dir("/")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{e}: {stdout}{}", String::from_utf8_lossy(&out.stderr)));
        let step = &report["nodes"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()[0];
        assert_eq!(step["result"], false, "{step}");
        (
            out.status.code(),
            step["comment"].as_str().unwrap().to_string(),
        )
    };
    let (code, comment) = apply_as_nobody();
    assert!(
        comment.contains("Permission denied") && comment.contains(locked.path().to_str().unwrap()),
        "{comment}"
    );
    assert_ne!(code, Some(0));
    assert!(listing(locked.path()).is_empty(), "nothing was written");

    // Searchable but not writable: the directory that cannot be made is named.
    std::fs::set_permissions(locked.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_, comment) = apply_as_nobody();
    assert!(
        comment.contains("cannot create the directory") && comment.contains("inner"),
        "{comment}"
    );
    assert!(listing(locked.path()).is_empty(), "nothing was written");
}
