//! Every built-in module has a reference page that documents every argument it accepts, and
//! `eden doc` prints it.

use std::process::Command;

use eden::modules::{cmd, file, pkg, pkgrepo, Registry};

fn page(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/docs/modules/{name}.md",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap_or_else(|e| panic!("docs/modules/{name}.md: {e}"))
}

#[test]
fn every_argument_is_documented() {
    let cases: &[(&str, &[&str])] = &[
        ("cmd", cmd::ARGS),
        ("file", file::MANAGED),
        ("file", file::DIRECTORY),
        ("file", file::ABSENT),
        ("file", file::SYMLINK),
        ("pkg", pkg::ARGS),
        ("pkgrepo", pkgrepo::ARGS),
        ("test", &["name", "comment"]),
    ];
    let mut missing = Vec::new();
    for (module, args) in cases {
        let text = page(module);
        for a in *args {
            if !text.contains(&format!("`{a}`")) {
                missing.push(format!("{module}: {a}"));
            }
        }
    }
    assert!(missing.is_empty(), "undocumented arguments: {missing:?}");
}

#[test]
fn every_builtin_function_has_a_section_and_a_page_for_eden_doc() {
    let reg = Registry::builtin();
    for name in reg.names() {
        let text = page(name);
        let module = reg.get(name).unwrap();
        for f in module.functions() {
            assert!(
                text.contains(&format!("{name}.{f}")),
                "docs/modules/{name}.md does not mention {name}.{f}"
            );
        }
        let out = Command::new(env!("CARGO_BIN_EXE_eden"))
            .args(["doc", name])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            text,
            "eden doc {name}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_eden"))
        .args(["doc", "nosuch"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nosuch") && err.contains("pkgrepo"), "{err}");
}
