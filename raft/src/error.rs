//! The one error type of eden-raft.
//!
//! Kinds, not sources: the callers (the etcd API, the cluster layer) decide what to do by kind.
//! - [`Error::Store`]: the store refused a command or a read, deterministically, with etcd's exact
//!   message. It is a reply, not a failure of this node.
//! - [`Error::Unavailable`]: no leader, no quorum, a peer that cannot be reached, or a node that
//!   is shutting down. Retrying later may succeed. The message says whether a write may have been
//!   applied anyway ("outcome unknown").
//! - [`Error::InvalidInput`]: the caller asked for something impossible (an unknown node id, a
//!   membership change that does not fit). Retrying will not help.
//! - [`Error::Io`]: the disk failed. The node should stop.
//! - [`Error::Internal`]: a bug or corrupt data; the message says what.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Store(eden_storage::Error),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<eden_storage::Error> for Error {
    fn from(e: eden_storage::Error) -> Self {
        match e {
            eden_storage::Error::Io(m) => Error::Io(m),
            eden_storage::Error::Corrupt(m) => Error::Internal(format!("storage corrupt: {m}")),
            eden_storage::Error::InvalidSnapshot(m) => {
                Error::Internal(format!("invalid snapshot: {m}"))
            }
            reply => Error::Store(reply),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Io(e.to_string())
    }
}

/// [`Error`] as it crosses the peer transport (leader forwarding). Store replies keep their kind
/// so the caller can rebuild the exact `eden_storage::Error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WireError {
    Store(crate::types::Rejection),
    Unavailable(String),
    InvalidInput(String),
    Io(String),
    Internal(String),
    /// The receiver is not the leader; the sender should ask `leader` (if known) instead.
    NotLeader(Option<crate::types::NodeId>),
}

impl From<Error> for WireError {
    fn from(e: Error) -> Self {
        match e {
            Error::Store(s) => match crate::types::Rejection::from_store(&s) {
                Some(r) => WireError::Store(r),
                None => WireError::Internal(s.to_string()),
            },
            Error::Unavailable(m) => WireError::Unavailable(m),
            Error::InvalidInput(m) => WireError::InvalidInput(m),
            Error::Io(m) => WireError::Io(m),
            Error::Internal(m) => WireError::Internal(m),
        }
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Store(r) => Error::Store(r.to_store()),
            WireError::Unavailable(m) => Error::Unavailable(m),
            WireError::InvalidInput(m) => Error::InvalidInput(m),
            WireError::Io(m) => Error::Io(m),
            WireError::Internal(m) => Error::Internal(m),
            WireError::NotLeader(l) => Error::Unavailable(match l {
                Some(id) => format!("node {id} is the leader; retry there"),
                None => "no leader is known; retry once one is elected".to_string(),
            }),
        }
    }
}
