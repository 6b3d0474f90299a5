//! Offline recovery after a permanent loss of quorum: make this replica the only voter.
//!
//! Raft cannot commit anything once a majority of voters is gone for good. [`recover_as_single_voter`]
//! rewrites the membership of one surviving replica (voter or learner), with the node stopped:
//! it appends, after the last entry of its log, a membership entry with only this node as
//! voter, under a term above any it has seen, and records its vote for that term. When the node
//! starts again, openraft uses the newest membership entry in the log, so this node is a
//! one-voter cluster: it elects itself and commits its whole log, the tail it had not seen
//! committed included.
//!
//! What may be lost is exactly what this replica did not have: entries after its last log
//! index that the lost voters had committed. The report says where that boundary is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use eden_storage::Store;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, Membership};
use serde::Serialize;

use crate::error::Error;
use crate::log_store::LogStore;
use crate::state_machine::StateMachine;
use crate::types::{Entry, LogId, NodeId, NodeInfo, Vote};

/// What recovery found and did.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryReport {
    /// The last entry in this replica's log before recovery (index, term).
    pub last_log: Option<(u64, u64)>,
    /// The highest index this replica knew to be committed.
    pub known_committed: Option<u64>,
    /// The highest index applied to this replica's keyspace.
    pub applied: Option<u64>,
    /// The keyspace revision at `applied`.
    pub revision: i64,
    /// The voters and learners of the old membership (names).
    pub old_voters: Vec<String>,
    pub old_learners: Vec<String>,
    /// The index and term of the new membership entry.
    pub new_membership_at: (u64, u64),
}

fn io(e: impl std::fmt::Display) -> Error {
    Error::Io(e.to_string())
}

/// Rewrites `data_dir` (a stopped node's Raft dir) so that node `id` is the only voter.
pub async fn recover_as_single_voter(
    data_dir: &Path,
    id: NodeId,
    info: NodeInfo,
) -> Result<RecoveryReport, Error> {
    let mut log = LogStore::open(&data_dir.join("raft-log"))?;
    let flusher = log.flusher_handle();
    let store = Store::open(&data_dir.join("state")).map_err(io)?;
    let revision = store.revision();
    let mut sm = StateMachine::new(Arc::new(store), &data_dir.join("snapshots"))?;

    let state = log.get_log_state().await.map_err(io)?;
    let vote: Option<Vote> = log.read_vote().await.map_err(io)?;
    let committed: Option<LogId> = log.read_committed().await.map_err(io)?;
    let (applied, membership) = sm.applied_state().await.map_err(io)?;

    // The newest membership: in the log after `applied` if any, else the applied one.
    let mut newest = membership.membership().clone();
    if let Some(last) = state.last_log_id {
        let from = applied.map(|a| a.index + 1).unwrap_or(0);
        if from <= last.index {
            for e in log
                .try_get_log_entries(from..=last.index)
                .await
                .map_err(io)?
            {
                if let EntryPayload::Membership(m) = e.payload {
                    newest = m;
                }
            }
        }
    }
    let voter_ids: BTreeSet<NodeId> = newest.voter_ids().collect();
    let names = |learners: bool| -> Vec<String> {
        newest
            .nodes()
            .filter(|(nid, _)| voter_ids.contains(nid) != learners)
            .map(|(_, n)| n.name.clone())
            .collect()
    };
    let (old_voters, old_learners) = (names(false), names(true));

    let last = std::cmp::max(state.last_log_id, applied);
    let max_term = [
        last.map(|l| l.leader_id.term),
        vote.map(|v| v.leader_id().term),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0);
    let term = max_term + 1;
    let index = last.map(|l| l.index + 1).unwrap_or(0);
    let entry = Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, id), index),
        payload: EntryPayload::Membership(Membership::new(
            vec![BTreeSet::from([id])],
            BTreeMap::from([(id, info)]),
        )),
    };
    log.append_and_flush(&entry)?;
    log.save_vote(&Vote::new(term, id)).await.map_err(io)?;

    let report = RecoveryReport {
        last_log: state.last_log_id.map(|l| (l.index, l.leader_id.term)),
        known_committed: committed.map(|c| c.index),
        applied: applied.map(|a| a.index),
        revision,
        old_voters,
        old_learners,
        new_membership_at: (index, term),
    };
    drop(sm);
    drop(log);
    if let Some(h) = flusher.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = h.join();
    }
    Ok(report)
}
