//! eden-raft: openraft glue over eden-storage.
//!
//! - `types`: the openraft type config, [`NodeInfo`], [`Batch`] (a Raft entry's commands).
//! - `log_store`: [`LogStore`], the Raft log and vote in segment files, acknowledged after fsync.
//! - `state_machine`: [`StateMachine`], applies entries through `eden_storage::Store`, snapshots.

// openraft's storage traits fix the error type to `openraft::StorageError`, which is large; the
// helpers that build it return it by value like the traits do.
#![allow(clippy::result_large_err)]

mod codec;
pub mod error;
pub mod log_store;
pub mod node;
mod proposer;
pub mod state_machine;
pub mod transport;
pub mod types;

pub mod recover;
pub use error::Error;
pub use log_store::LogStore;
pub use node::{
    default_raft_config, ElectionHold, MembershipChange, NodeConfig, NodeMetrics, PeerProgress,
    ProposalCounts, RaftNode, RaftRole, StartHash,
};
pub use openraft;
pub use state_machine::{EventFeed, RevisionEvents, StateMachine};
pub use transport::{Fallback, NetworkFactory, PeerCertificate, PeerPool, PeerServer, RemoteAddr};
pub use types::*;
