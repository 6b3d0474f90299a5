//! The one error type of the keyspace.
//!
//! Variants that etcd itself returns display etcd's exact strings, byte for byte, because clients
//! compare them. The etcd API layer maps each variant to a gRPC status code at its edge; this
//! crate knows nothing of gRPC.
//!
//! Two families:
//! - **replies** (`Compacted` .. `CorruptCluster`): deterministic outcomes of a command or a read.
//!   Every replica computes the same one, so they are safe to return from `apply`.
//! - **faults** (`Io`, `Corrupt`, `InvalidSnapshot`): the disk or the input is bad. A fault from
//!   `apply` means the store must not be used further; reopen it.

/// etcd's `MaxLeaseTTL`: a granted TTL above this is refused.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A read, watch, compaction or hash below the compacted revision.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// A read, compaction or hash above the current revision.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A put with `ignore_value` or `ignore_lease` on a key that does not exist.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A put, a txn with puts or a lease grant while a member's `NoSpace` alarm is up, or a
    /// request that would take the store past its quota.
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// Any change while a member's CORRUPT alarm is up.
    #[error("etcdserver: corrupt cluster")]
    CorruptCluster,
    /// The disk failed. The message names the operation.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// Stored bytes do not decode. The message names the record; restore from a snapshot.
    #[error("storage corrupt: {0}")]
    Corrupt(String),
    /// A snapshot stream is truncated, damaged or of an unknown version; nothing was changed.
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(String),
}

impl Error {
    /// True for faults of the disk or the input, false for deterministic replies.
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            Error::Io(_) | Error::Corrupt(_) | Error::InvalidSnapshot(_)
        )
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => Error::Corrupt(e.to_string()),
            other => Error::Io(other.to_string()),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}
