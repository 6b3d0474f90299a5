//! The one error type of the `eden` crate.
//!
//! A few kinds, each with a message meant for an operator: it names the bad input and, where there
//! is one, the way out. Foreign errors convert through `From`. Errors become gRPC statuses only at
//! the etcd API edge (`etcd/`), and exit codes only in `main`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The caller gave bad input: a malformed SLS, an unknown module argument, a bad flag.
    InvalidInput(String),
    /// Data we read back is not what we wrote or expect: a corrupt file, a bad signature.
    InvalidData(String),
    /// A named thing does not exist: a state ID, a module, a node.
    NotFound(String),
    /// Something needed is not reachable now; trying again later may work.
    Unavailable(String),
    /// An operating-system I/O failure.
    Io(String),
    /// A bug in eden. Never expected; always worth a report.
    Internal(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput(m)
            | Error::InvalidData(m)
            | Error::NotFound(m)
            | Error::Unavailable(m)
            | Error::Io(m)
            | Error::Internal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::InvalidData(e.to_string())
    }
}

impl From<eden_raft::Error> for Error {
    fn from(e: eden_raft::Error) -> Self {
        match e {
            eden_raft::Error::Store(s) => Error::InvalidInput(s.to_string()),
            eden_raft::Error::Unavailable(m) => Error::Unavailable(m),
            eden_raft::Error::InvalidInput(m) => Error::InvalidInput(m),
            eden_raft::Error::Io(m) => Error::Io(m),
            eden_raft::Error::Internal(m) => Error::Internal(m),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
