//! Coordination with other nodes during a cluster run.
//!
//! The engine stays free of network and store: a cluster run hands [`super::run::run`] a
//! [`Coordinator`], and the engine calls it for the two things only other nodes can answer:
//! - the value of `${{ nodes.NODE.steps.ID.FIELD }}` ([`Coordinator::remote`]), and
//! - whether a step with cross-node run options (`serialize: N`, `sync: true`,
//!   `target_limit: N`) may run here now ([`Coordinator::enter`]) and that it has finished
//!   ([`Coordinator::leave`]).
//!
//! Both may block (a watch on the datastore with a timeout). They are called on worker threads,
//! never on the thread that schedules the other steps.

use serde_json::Value;

use super::compile::PlanStep;
use super::refs::StepRef;
use super::run::StepResult;
use crate::error::Result;

/// What [`Coordinator::enter`] decided for a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Run the step on this node.
    Run,
    /// Do not run it here (for example `target_limit` chose other nodes). The step is recorded
    /// as succeeded without changes, with this comment.
    Skip(String),
}

/// The other nodes of a run, as the engine sees them.
pub trait Coordinator: Send + Sync {
    /// The value `r` names on node `r.node` (always `Some`): the step's result field, waited
    /// for until that node has recorded the step. An error says why it is not available
    /// (unknown node, step failed or was skipped there, timed out).
    fn remote(&self, r: &StepRef) -> Result<Value>;

    /// Called before a step that has `serialize`, `sync` or `target_limit` set, once its
    /// requisites are met. Blocks until the step may run here (a `serialize` slot is free).
    fn enter(&self, step: &PlanStep) -> Result<Admission>;

    /// Called after such a step finished here (ran, skipped or failed), with its result.
    /// Releases what `enter` took; for `sync: true` blocks until every node that runs the step
    /// has finished it.
    ///
    /// The engine calls it after the result is recorded and the run's observer has seen it
    /// (so a result published by the observer is already visible to the other nodes), and
    /// starts the step's dependents only when it returns. It is not called when `enter`
    /// returned an error. A node where the step did not run because of its requisites never
    /// calls `enter` or `leave` for it, but its result is recorded all the same: a `sync`
    /// barrier should count a node as done when its result for the step is recorded.
    ///
    /// An error (a `sync` barrier that gave up waiting) fails the step here: its result is
    /// recorded again as failed, with the error after its own comment, and steps that require
    /// it do not run.
    fn leave(&self, step: &PlanStep, result: &StepResult) -> Result<()>;
}
