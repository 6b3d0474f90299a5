//! `test`: Salt's test states, for exercising the engine and its requisites.
//!
//! The functions behave exactly like Salt's `salt.states.test`, comments included, so the
//! golden tests recorded from a real `salt-call` compare result for result:
//! - `succeed_without_changes` / `nop`: `True`, no changes, "Success!".
//! - `succeed_with_changes`: `True` with one pretend change; in test mode `None`.
//! - `fail_without_changes`: `False`, no changes (also in test mode).
//! - `fail_with_changes`: `False` with one pretend change; in test mode `None`.
//! - The watch action reports "Watch statement fired." and the watched states that changed.
//!
//! A `comment` argument replaces the default comment, as in Salt. Nothing here touches the
//! machine.

use serde_json::{json, Map, Value};

use super::{Args, Call, Module, Outcome};
use crate::error::{Error, Result};

pub struct Test;

const FUNCTIONS: &[&str] = &[
    "succeed_without_changes",
    "succeed_with_changes",
    "fail_without_changes",
    "fail_with_changes",
    "nop",
];

fn pretend_changes() -> Value {
    json!({"testing": {"old": "Unchanged", "new": "Something pretended to change"}})
}

impl Module for Test {
    fn name(&self) -> &'static str {
        "test"
    }
    fn functions(&self) -> &'static [&'static str] {
        FUNCTIONS
    }
    fn validate(&self, function: &str, _args: &Args) -> Result<()> {
        if FUNCTIONS.contains(&function) {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "test.{function} is not a function; test has {}",
                FUNCTIONS.join(", ")
            )))
        }
    }
    fn outputs(&self, _function: &str) -> &'static [&'static str] {
        &[]
    }
    fn call(&self, call: &Call) -> Result<Outcome> {
        let comment = |default: &str| {
            call.args
                .get("comment")
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        let mut out = Outcome::ok(comment("Success!"));
        match call.function {
            "succeed_without_changes" | "nop" => {}
            "succeed_with_changes" => {
                out.changes = pretend_changes();
                if call.test {
                    out.result = None;
                    out.comment =
                        "If we weren't testing, this would be successful with changes".into();
                }
            }
            "fail_without_changes" => {
                out.result = Some(false);
                out.comment = comment("Failure!");
                if call.test {
                    out.comment = "If we weren't testing, this would be a failure!".into();
                }
            }
            "fail_with_changes" => {
                out.result = Some(false);
                out.comment = comment("Failure!");
                out.changes = pretend_changes();
                if call.test {
                    out.result = None;
                    out.comment = "If we weren't testing, this would be failed with changes".into();
                }
            }
            other => {
                return Err(Error::InvalidInput(format!(
                    "test.{other} is not a function; test has {}",
                    FUNCTIONS.join(", ")
                )))
            }
        }
        Ok(out)
    }
    fn watch(&self, call: &Call) -> Result<Outcome> {
        let mut changes = Map::new();
        changes.insert(
            "Requisites with changes".into(),
            Value::Array(
                call.changed_watches
                    .iter()
                    .map(|s| Value::String(s.clone()))
                    .collect(),
            ),
        );
        Ok(Outcome {
            result: Some(
                call.args
                    .get("result")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            ),
            changes: call
                .args
                .get("changes")
                .cloned()
                .unwrap_or(Value::Object(changes)),
            comment: call
                .args
                .get("comment")
                .and_then(Value::as_str)
                .unwrap_or("Watch statement fired.")
                .to_string(),
            outputs: Map::new(),
        })
    }
}
