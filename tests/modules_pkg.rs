//! The pkg module against the real PackageKit daemon on the system D-Bus: real Debian packages
//! are installed and removed. Needs root and a system bus (`scripts/test` starts one).
//!
//! Each test uses its own packages, because tests run in parallel processes.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use eden::engine::{self, tree::LocalTree, Context, Mode, Quiet, RunOptions};
use eden::modules::pkg::Pkg;
use eden::modules::{Args, Call, EmptyTree, Module, Outcome, Registry};
use serde_json::{json, Value};

fn call(function: &str, args: Value, test: bool) -> Outcome {
    let args: Args = args.as_object().unwrap().clone();
    let pkg = Pkg::packagekit();
    pkg.validate(function, &args).unwrap();
    pkg.call(&Call {
        id: "t",
        function,
        args: &args,
        test,
        tree: &EmptyTree,
        changed_watches: &[],
    })
    .unwrap()
}

/// What dpkg says, independently of PackageKit.
fn dpkg_installed(name: &str) -> bool {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("install ok installed")
}

#[test]
fn hello_is_installed_and_removed_through_packagekit() {
    // Start from "not installed", through the module itself; refresh the package cache first
    // (through PackageKit), so a machine whose apt lists were never fetched works too.
    let first = call("removed", json!({"name": "hello", "refresh": true}), false);
    assert_eq!(first.result, Some(true), "{}", first.comment);
    assert!(!dpkg_installed("hello"));

    // Test mode: reports the install, installs nothing.
    let dry = call("installed", json!({"name": "hello"}), true);
    assert_eq!(dry.result, None, "{}", dry.comment);
    assert_eq!(dry.changes["hello"]["old"], "");
    assert!(dry.changes["hello"]["new"]
        .as_str()
        .unwrap()
        .starts_with("2."));
    assert!(dry.comment.contains("hello"), "{}", dry.comment);
    assert!(!dpkg_installed("hello"));
    assert!(!Path::new("/usr/bin/hello").exists());

    // The install.
    let done = call("installed", json!({"name": "hello"}), false);
    assert_eq!(done.result, Some(true), "{}", done.comment);
    assert_eq!(done.changes["hello"]["old"], "");
    let version = done.changes["hello"]["new"].as_str().unwrap().to_string();
    assert!(version.starts_with("2."), "{version}");
    assert_eq!(done.outputs["versions"]["hello"], version.as_str());
    assert!(dpkg_installed("hello"));
    let greet = Command::new("/usr/bin/hello").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&greet.stdout), "Hello, world!\n");

    // Idempotent, also for latest and an exact or glob version.
    for (f, args) in [
        ("installed", json!({"name": "hello"})),
        ("latest", json!({"name": "hello"})),
        ("installed", json!({"name": "hello", "version": version})),
        ("installed", json!({"name": "hello", "version": "2.*"})),
        ("installed", json!({"name": "hello", "version": ">=2.0,<3"})),
    ] {
        let again = call(f, args.clone(), false);
        assert_eq!(again.result, Some(true), "{f} {args}: {}", again.comment);
        assert_eq!(again.changes, json!({}), "{f} {args}");
    }

    // A version that does not exist fails and names what is available.
    let bad = call(
        "installed",
        json!({"name": "hello", "version": "0.0.1"}),
        false,
    );
    assert_eq!(bad.result, Some(false));
    assert!(
        bad.comment.contains("0.0.1") && bad.comment.contains(&version),
        "{}",
        bad.comment
    );

    // Removal, dry then real, then idempotent.
    let dry = call("removed", json!({"name": "hello"}), true);
    assert_eq!(dry.result, None);
    assert_eq!(dry.changes["hello"], json!({"old": version, "new": ""}));
    assert!(dpkg_installed("hello"));
    let gone = call("removed", json!({"name": "hello"}), false);
    assert_eq!(gone.result, Some(true), "{}", gone.comment);
    assert_eq!(gone.changes["hello"], json!({"old": version, "new": ""}));
    assert!(!dpkg_installed("hello"));
    assert!(!Path::new("/usr/bin/hello").exists());
    let again = call("removed", json!({"name": "hello"}), false);
    assert_eq!(again.changes, json!({}));
}

#[test]
fn unknown_package_fails_with_a_clear_comment() {
    let out = call(
        "installed",
        json!({"name": "eden-no-such-package-xyz"}),
        false,
    );
    assert_eq!(out.result, Some(false));
    assert!(
        out.comment.contains("eden-no-such-package-xyz") && out.comment.contains("refresh"),
        "{}",
        out.comment
    );
    assert_eq!(out.changes, json!({}));
}

/// Genius mode merges two independent pkg.installed states into one step with `pkgs:`, which
/// the module runs as one PackageKit transaction.
#[test]
fn genius_aggregates_two_states_into_one_transaction() {
    call(
        "removed",
        json!({"name": "tree", "pkgs": ["tree", "figlet"]}),
        false,
    );
    assert!(!dpkg_installed("tree") && !dpkg_installed("figlet"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.sls"),
        "tree:\n  pkg.installed: []\nfiglet:\n  pkg.installed: []\n",
    )
    .unwrap();
    let tree: Arc<LocalTree> = Arc::new(LocalTree::new(dir.path()).unwrap());
    let reg = Registry::builtin();
    let plan = engine::plan(
        tree.clone(),
        &["p".into()],
        &Context::default(),
        &reg,
        Mode::Genius,
    )
    .unwrap();
    assert_eq!(plan.steps.len(), 1, "the two installs are one step");
    let results = engine::run::run(&plan, &reg, tree.as_ref(), &RunOptions::default(), &Quiet);
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert_eq!(r.result, Some(true), "{}", r.comment);
    assert_eq!(r.changes["tree"]["old"], "");
    assert_eq!(r.changes["figlet"]["old"], "");
    assert!(dpkg_installed("tree") && dpkg_installed("figlet"));

    let gone = call(
        "removed",
        json!({"name": "x", "pkgs": ["tree", "figlet"]}),
        false,
    );
    assert_eq!(gone.result, Some(true), "{}", gone.comment);
    assert!(gone.changes["tree"]["old"].is_string() && gone.changes["figlet"]["old"].is_string());
    assert!(!dpkg_installed("tree") && !dpkg_installed("figlet"));
}
