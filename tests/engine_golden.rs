//! Golden tests: eden's `ansible` order and results against what real Salt did.
//!
//! Each directory under `tests/golden/salt/cases/` holds SLS files and `expected.json`, recorded
//! by `scripts/record-salt-golden` from `salt-call --local state.apply` (the Salt version is in
//! `tests/golden/salt/salt-version.txt`). This test reads only those files, so it needs no Salt.
//! For every case eden must produce the same states in the same `__run_num__` order with the
//! same result, changes and comment, or, where Salt refused the SLS, refuse it too.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use eden::engine::{self, tree::LocalTree, Context, Mode, Quiet, RunOptions};
use eden::modules::Registry;
use serde_json::{json, Value};

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/salt/cases")
}

/// Salt lists failed requisites from a Python set, so their order varies between runs; compare
/// them sorted.
fn normalise(mut step: Value) -> Value {
    const PREFIX: &str = "One or more requisite failed: ";
    if let Some(c) = step["comment"].as_str() {
        if let Some(list) = c.strip_prefix(PREFIX) {
            let mut items: Vec<&str> = list.split(", ").collect();
            items.sort();
            step["comment"] = Value::String(format!("{PREFIX}{}", items.join(", ")));
        }
    }
    step
}

fn check_case(name: &str) -> Result<(), String> {
    let dir = cases_dir();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(name).join("expected.json")).map_err(|e| {
            format!("{name}: no expected.json ({e}); run scripts/record-salt-golden")
        })?,
    )
    .map_err(|e| e.to_string())?;
    let sls: Vec<String> = expected["sls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let tree = Arc::new(LocalTree::new(&dir).unwrap());
    let registry = Registry::builtin();
    let ctx = Context::default();
    let plan = engine::plan(tree.clone(), &sls, &ctx, &registry, Mode::Ansible);
    if let Some(errors) = expected.get("errors") {
        let err = match plan {
            Ok(_) => {
                return Err(format!(
                    "{name}: Salt refused this SLS ({errors}) but eden compiled it"
                ))
            }
            Err(e) => e.to_string(),
        };
        // Every state Salt names in its error must be named by eden too.
        let salt_text = errors.to_string();
        for piece in salt_text.split("'ID': '").skip(1) {
            let id = piece.split('\'').next().unwrap();
            if !err.contains(&format!("{id} ")) && !err.contains(&format!("[{id}]")) {
                return Err(format!("{name}: eden's error does not name {id}: {err}"));
            }
        }
        for phrase in [
            "Recursive requisites were found",
            "Referenced state does not exist",
        ] {
            if salt_text.contains(phrase) && !err.contains(phrase) {
                return Err(format!(
                    "{name}: expected an error like Salt's {phrase:?}, got: {err}"
                ));
            }
        }
        return Ok(());
    }
    let plan = plan.map_err(|e| format!("{name}: eden refused what Salt ran: {e}"))?;
    let opts = RunOptions {
        test: expected["test"].as_bool().unwrap_or(false),
        ..RunOptions::default()
    };
    let results = engine::run::run(&plan, &registry, tree.as_ref(), &opts, &Quiet);
    let got: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({"run_num": r.run_num, "id": r.id, "name": r.name, "function": r.function,
                   "result": r.result, "changes": r.changes, "comment": r.comment})
        })
        .collect();
    let got: Vec<Value> = got.into_iter().map(normalise).collect();
    let want: Vec<Value> = expected["steps"]
        .as_array()
        .unwrap()
        .iter()
        .cloned()
        .map(normalise)
        .collect();
    let want = &want;
    if got.len() != want.len() || got.iter().zip(want).any(|(g, w)| g != w) {
        let show = |v: &[Value]| {
            v.iter()
                .map(|s| {
                    format!(
                        "  {} {} {} {:?}",
                        s["run_num"], s["id"], s["result"], s["comment"]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let diff: Vec<String> = got
            .iter()
            .zip(want)
            .filter(|(g, w)| g != w)
            .map(|(g, w)| format!("  eden {g}\n  salt {w}"))
            .collect();
        return Err(format!(
            "{name}: eden differs from Salt\neden:\n{}\nsalt:\n{}\nfirst differences:\n{}",
            show(&got),
            show(want),
            diff.join("\n")
        ));
    }
    // Salt's retcode is non-zero exactly when a state failed; eden's exit code follows results.
    let failed = results.iter().any(|r| r.result == Some(false));
    if failed != (expected["retcode"].as_i64() != Some(0)) {
        return Err(format!(
            "{name}: failure does not match Salt's retcode {}",
            expected["retcode"]
        ));
    }
    Ok(())
}

#[test]
fn every_case_matches_salt() {
    let mut names: Vec<String> = std::fs::read_dir(cases_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        names.len() >= 25,
        "expected at least 25 golden cases, found {}",
        names.len()
    );
    let failures: Vec<String> = names.iter().filter_map(|n| check_case(n).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} golden cases differ from Salt:\n\n{}",
        failures.len(),
        names.len(),
        failures.join("\n\n")
    );
}
