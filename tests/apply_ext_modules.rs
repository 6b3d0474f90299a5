//! `eden apply --local` runs a signed extension module from the tree's `_modules/`, and refuses
//! (without running it) one whose file was changed after signing.

use std::path::Path;
use std::process::Command;

fn eden(args: &[&str], keys: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_eden"))
        .args(args)
        .env("EDEN_MODULE_KEYS", keys)
        .output()
        .unwrap()
}

#[test]
fn apply_local_runs_signed_tree_modules_and_refuses_tampered_ones() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("_modules")).unwrap();
    let key = dir.path().join("signer.key");
    let keys = dir.path().join("trusted");
    let out = eden(&["module", "keygen", "--out", key.to_str().unwrap()], &keys);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&keys, &out.stdout).unwrap();

    let ran = dir.path().join("ran");
    let module = tree.join("_modules/hello");
    std::fs::write(
        &module,
        format!(
            "#!/bin/sh\ncat > '{}'\necho '{{\"result\": true, \"changes\": {{\"said\": \"hi\"}}, \
             \"comment\": \"greeted\", \"outputs\": {{}}}}'\n",
            ran.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&module, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = eden(
        &[
            "module",
            "sign",
            "--key",
            key.to_str().unwrap(),
            module.to_str().unwrap(),
        ],
        &keys,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        tree.join("greet.sls"),
        "say hi:\n  hello.greet:\n    - who: world\n",
    )
    .unwrap();

    let apply = |keys: &Path| {
        eden(
            &[
                "apply",
                "--local",
                tree.to_str().unwrap(),
                "greet",
                "--output",
                "json",
            ],
            keys,
        )
    };
    let out = apply(&keys);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let request = std::fs::read_to_string(&ran).expect("the signed module ran");
    assert!(request.contains("\"greet\""), "{request}");
    assert!(request.contains("world"), "{request}");

    // Changed after signing: refused, not run.
    std::fs::remove_file(&ran).unwrap();
    let mut text = std::fs::read_to_string(&module).unwrap();
    text.push_str("# tampered\n");
    std::fs::write(&module, text).unwrap();
    let out = apply(&keys);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a tampered module did not fail the run"
    );
    assert!(!ran.exists(), "the tampered module was executed");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("signature") || report.contains("sha256"),
        "{report}"
    );
}
