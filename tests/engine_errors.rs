//! Error messages for bad SLS: each names the file, line (and column where YAML gives one), the
//! state ID, and what was expected.

use std::sync::Arc;

use eden::engine::{self, tree::LocalTree, Context, Mode};
use eden::modules::Registry;

/// Writes the files into a fresh tree and compiles `sls`, expecting an error.
fn error_of(files: &[(&str, &str)], sls: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let tree = Arc::new(LocalTree::new(dir.path()).unwrap());
    let sls: Vec<String> = sls.iter().map(|s| s.to_string()).collect();
    match engine::plan(
        tree,
        &sls,
        &Context::default(),
        &Registry::builtin(),
        Mode::Ansible,
    ) {
        Ok(plan) => panic!(
            "expected an error, got a plan of {} steps",
            plan.steps.len()
        ),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error lacks {p:?}:\n{err}");
    }
}

#[test]
fn yaml_syntax_error_has_line_and_column() {
    let e = error_of(
        &[("web.sls", "a:\n  test.nop: []\nb: [unclosed\n")],
        &["web"],
    );
    assert_has(&e, &["web.sls:4:1", "not valid YAML"]);
}

#[test]
fn argument_items_that_hold_two_keys_are_explained() {
    let e = error_of(
        &[(
            "web.sls",
            "ok:\n  test.nop: []\nbad:\n  file.managed:\n    - name: /tmp/x\n      mode: 644\n",
        )],
        &["web"],
    );
    assert_has(
        &e,
        &[
            "web.sls:3:1",
            "\"bad\"",
            "2 keys",
            "name, mode",
            "indentation",
        ],
    );
}

#[test]
fn unknown_module_and_function() {
    let e = error_of(&[("a.sls", "x:\n  nosuch.thing: []\n")], &["a"]);
    assert_has(
        &e,
        &[
            "a.sls:1:1",
            "\"x\"",
            "module \"nosuch\"",
            "cmd, file, pkg, pkgrepo, test",
        ],
    );
    let e = error_of(&[("a.sls", "x:\n  test.frobnicate: []\n")], &["a"]);
    assert_has(
        &e,
        &[
            "test.frobnicate is not a function",
            "succeed_without_changes",
        ],
    );
    let e = error_of(&[("a.sls", "\n\nx:\n  test: []\n")], &["a"]);
    assert_has(&e, &["a.sls:3:1", "\"x\"", "no function"]);
}

#[test]
fn unknown_argument_is_rejected_before_running() {
    let e = error_of(
        &[(
            "a.sls",
            "x:\n  cmd.run:\n    - name: /bin/true\n    - cwdd: /tmp\n",
        )],
        &["a"],
    );
    assert_has(&e, &["a.sls:1:1", "\"x\"", "\"cwdd\"", "cwd"]);
}

#[test]
fn a_cycle_names_every_state_in_it() {
    let e = error_of(
        &[("c.sls", "a:\n  test.nop:\n    - require:\n      - b\nb:\n  test.nop:\n    - watch:\n      - c\nc:\n  test.nop:\n    - onchanges:\n      - a\nfree:\n  test.nop: []\n")],
        &["c"],
    );
    assert_has(
        &e,
        &[
            "Recursive requisites",
            "a (SLS c, c.sls:1:1)",
            "b (SLS c, c.sls:5:1)",
            "c (SLS c, c.sls:9:1)",
        ],
    );
    assert_has(&e, &["a require b", "b watch c", "c onchanges a"]);
    assert!(!e.contains("free"), "{e}");
}

#[test]
fn missing_requisite_target() {
    let e = error_of(
        &[(
            "a.sls",
            "x:\n  test.nop:\n    - require:\n      - file: /etc/nope\n",
        )],
        &["a"],
    );
    assert_has(
        &e,
        &[
            "a.sls:1:1",
            "Referenced state does not exist",
            "require: (file: /etc/nope)",
            "[x]",
        ],
    );
}

#[test]
fn step_references_are_checked_at_compile_time() {
    let e = error_of(
        &[(
            "a.sls",
            "a:\n  cmd.run:\n    - name: \"echo ${{ steps.nosuch.stdout }}\"\n",
        )],
        &["a"],
    );
    assert_has(
        &e,
        &[
            "a.sls:1:1",
            "steps.nosuch.stdout",
            "names no step",
            "the state IDs are a",
        ],
    );
    let e = error_of(
        &[("a.sls", "t:\n  cmd.run:\n    - name: echo\nu:\n  cmd.run:\n    - name: \"echo ${{ steps.t.stdrout }}\"\n")],
        &["a"],
    );
    assert_has(
        &e,
        &[
            "a.sls:4:1",
            "cmd.run has no field \"stdrout\"",
            "stdout, stderr, retcode",
        ],
    );
    let e = error_of(
        &[(
            "a.sls",
            "a:\n  cmd.run:\n    - name: \"echo ${{ steps.a\"\n",
        )],
        &["a"],
    );
    assert_has(&e, &["a.sls:3: unclosed ${{"]);
}

#[test]
fn include_and_extend_errors() {
    let e = error_of(
        &[("a.sls", "include:\n  - missing\nx:\n  test.nop: []\n")],
        &["a"],
    );
    assert_has(
        &e,
        &[
            "a.sls",
            "include \"missing\"",
            "missing.sls",
            "missing/init.sls",
        ],
    );
    let e = error_of(
        &[(
            "a.sls",
            "extend:\n  ghost:\n    test:\n      - comment: x\n",
        )],
        &["a"],
    );
    assert_has(&e, &["Cannot extend ID \"ghost\"", "include"]);
    let e = error_of(
        &[
            ("a.sls", "include:\n  - b\nx:\n  test.nop: []\n"),
            ("b.sls", "x:\n  test.nop: []\n"),
        ],
        &["a"],
    );
    assert_has(&e, &["conflicting ID", "\"x\"", "a.sls:3:1", "b.sls:1:1"]);
}

#[test]
fn jinja_errors_name_the_line_and_missing_sls_says_where_it_looked() {
    let e = error_of(&[("j.sls", "a:\n  test.nop: []\n{% for x in %}\n")], &["j"]);
    assert_has(&e, &["j.sls:3", "Jinja"]);
    let e = error_of(&[("j.sls", "a:\n  test.nop: []\n")], &["web.nginx"]);
    assert_has(&e, &["web/nginx.sls", "web/nginx/init.sls"]);
}

#[test]
fn salt_keywords_eden_does_not_act_on_are_refused_with_what_to_write_instead() {
    for (key, hint) in [
        ("listen", "use `watch`"),
        ("listen_in", "use `watch_in`"),
        ("failhard", "`require` this one"),
    ] {
        let e = error_of(
            &[(
                "web.sls",
                &format!("a:\n  test.nop: []\nb:\n  test.nop:\n    - {key}:\n      - test: a\n"),
            )],
            &["web"],
        );
        assert_has(
            &e,
            &[
                "web.sls",
                "\"b\"",
                &format!("`{key}` is not supported"),
                hint,
            ],
        );
    }
}
