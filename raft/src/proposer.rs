//! The proposer: groups waiting client commands into one Raft entry.
//!
//! openraft 0.9 appends (and fsyncs) each client entry on its own, so proposing one entry per
//! command would cap writes at one per fsync. Instead every write goes into a queue, and one task
//! takes **whatever is waiting** (up to [`MAX_BATCH`]) and proposes it as a single [`Batch`].
//!
//! A batch also stops at [`MAX_BATCH_BYTES`] of commands.
//!
//! At most [`MAX_IN_FLIGHT`] batch is uncommitted at a time. While it is in flight, new
//! commands accumulate in the queue and make the next batch larger: under load the batch size
//! grows to match, while a lone client still gets a batch of one with no added delay. There is no
//! timer: batching never waits for more commands to arrive.
//!
//! A command whose caller has already gone (it timed out while queued) is dropped unproposed.
//!
//! Outcomes per command: its `Applied`, or the store's deterministic refusal, or `NotLeader`
//! (the entry was refused or truncated, so the command was *not* applied and may be retried
//! elsewhere), or an unknown outcome (the leader stopped before answering).

use std::sync::Arc;

use eden_storage::{Applied, Command};
use openraft::error::ClientWriteError;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::WireError;
use crate::types::{Batch, NodeId, Raft};

/// Most commands in one entry.
pub const MAX_BATCH: usize = 1024;
/// Most bytes of commands ([`Command::approx_len`]) in one entry, so that an entry stays inside
/// one append (`transport::client::MAX_APPEND_BYTES`) however large the values are; a single
/// larger command still goes alone.
pub const MAX_BATCH_BYTES: usize = 2 << 20;
/// Most uncommitted batches at once. One: openraft 0.9's core waits for each of the leader's
/// fsyncs, so a second batch in flight holds up the first one's commit and only makes both
/// smaller. With 64 clients on three loopback nodes, one in flight took 55–56 µs of CPU per put
/// against 59–66 µs with two, at the same or higher throughput (4 paired rounds).
pub const MAX_IN_FLIGHT: usize = 1;

pub(crate) struct Proposal {
    pub cmd: Command,
    pub reply: oneshot::Sender<Result<Applied, WireError>>,
}

/// Runs until every sender of `queue` is dropped.
pub(crate) async fn run(raft: Raft, mut queue: mpsc::Receiver<Proposal>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // A command that did not fit in the last batch: it starts the next one.
    let mut carried: Option<Proposal> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(p) => p,
            None => match queue.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = first.cmd.approx_len();
        let mut proposals = vec![first];
        while proposals.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(p) => {
                    let len = p.cmd.approx_len();
                    if bytes + len > MAX_BATCH_BYTES {
                        carried = Some(p);
                        break;
                    }
                    bytes += len;
                    proposals.push(p);
                }
                Err(_) => break,
            }
        }
        // A caller that gave up while its command waited here (a write that timed out) was
        // told the outcome is unknown; nothing was proposed yet, so leave it out.
        proposals.retain(|p| !p.reply.is_closed());
        if proposals.is_empty() {
            continue;
        }
        let (cmds, replies): (Vec<Command>, Vec<_>) =
            proposals.into_iter().map(|p| (p.cmd, p.reply)).unzip();
        match raft.client_write_ff(Batch(cmds)).await {
            Err(fatal) => {
                for r in replies {
                    let _ = r.send(Err(WireError::Unavailable(format!(
                        "Raft has stopped: {fatal}"
                    ))));
                }
            }
            Ok(answer) => {
                tokio::spawn(async move {
                    let outcome = answer.await;
                    drop(slot);
                    deliver(outcome, replies);
                });
            }
        }
    }
}

type Answer = Result<
    Result<
        openraft::raft::ClientWriteResponse<crate::types::TypeConfig>,
        ClientWriteError<NodeId, crate::types::NodeInfo>,
    >,
    oneshot::error::RecvError,
>;

fn deliver(outcome: Answer, replies: Vec<oneshot::Sender<Result<Applied, WireError>>>) {
    match outcome {
        Ok(Ok(resp)) => {
            let results = resp.data.0;
            if results.len() != replies.len() {
                let msg = format!(
                    "entry {} answered {} results for {} commands",
                    resp.log_id,
                    results.len(),
                    replies.len()
                );
                for r in replies {
                    let _ = r.send(Err(WireError::Internal(msg.clone())));
                }
                return;
            }
            for (r, result) in replies.into_iter().zip(results) {
                let _ = r.send(result.map_err(WireError::Store));
            }
        }
        Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
            for r in replies {
                let _ = r.send(Err(WireError::NotLeader(f.leader_id)));
            }
        }
        Ok(Err(e)) => {
            for r in replies {
                let _ = r.send(Err(WireError::Internal(e.to_string())));
            }
        }
        Err(_) => {
            for r in replies {
                let _ = r.send(Err(WireError::Unavailable(
                    "the leader stopped before the write committed; the outcome is unknown".into(),
                )));
            }
        }
    }
}
