//! eden-raft: openraft glue over eden-storage.
//!
//! - `types`: the openraft type config, [`NodeInfo`], [`Batch`] (a Raft entry's commands).
//! - `log_store`: [`LogStore`], the Raft log and vote in sled, acknowledged after fsync.
//! - `state_machine`: [`StateMachine`], applies entries through `eden_storage::Store`, snapshots.

mod codec;
pub mod error;
pub mod log_store;
pub mod state_machine;
pub mod types;

pub use error::Error;
pub use log_store::LogStore;
pub use state_machine::{EventFeed, RevisionEvents, StateMachine};
pub use types::*;
