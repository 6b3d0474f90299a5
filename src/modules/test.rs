//! `test`: Salt's test states, for exercising the engine. Placeholder until the engine work
//! fills it in.

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
        Err(Error::Internal(format!(
            "test.{} not implemented yet",
            call.function
        )))
    }
}
