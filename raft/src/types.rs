//! The types openraft is instantiated with, and what they carry on the wire.
//!
//! - [`NodeId`] is a `u64`; ids are never reused (the cluster layer's rule).
//! - [`NodeInfo`] is what the membership config stores for each node: its name and its two
//!   addresses. Every replica learns how to reach every other from the replicated membership.
//! - A Raft entry's application data is a [`Batch`]: several client [`Command`]s proposed as one
//!   entry by the proposer (`proposer.rs`), applied in order in one store batch.
//! - Its response is a [`BatchResponse`]: one [`CommandResult`] per command, in order. A command
//!   the store refuses (a deterministic reply such as `etcdserver: key not found`) is carried as a
//!   [`Rejection`], which keeps the store error's kind and its exact etcd message.

use std::fmt;

use eden_storage::{Applied, Command, Error as StoreError};
use serde::{Deserialize, Serialize};

/// A Raft node id. Never reused within a cluster.
pub type NodeId = u64;

/// What the membership config records about each node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's name (`eden serve --name`).
    pub name: String,
    /// `host:port` of the peer (Raft, join, gossip) listener, mutual TLS.
    pub peer_addr: String,
    /// `host:port` of the etcd client listener.
    pub client_addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (peer {}, client {})",
            self.name, self.peer_addr, self.client_addr
        )
    }
}

/// The application data of one Raft entry: commands applied in order, atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(pub Vec<Command>);

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch of {} commands", self.0.len())
    }
}

/// The kind of a deterministic store refusal, one per reply variant of `eden_storage::Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectionKind {
    Compacted,
    FutureRev,
    LeaseNotFound,
    LeaseExists,
    LeaseTtlTooLarge,
    TooManyOps,
    DuplicateKey,
    EmptyKey,
    ValueProvided,
    LeaseProvided,
    KeyNotFound,
    NoSpace,
    CorruptCluster,
}

/// A command the store refused. `message` is the store error's text, byte for byte etcd's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub kind: RejectionKind,
    pub message: String,
}

impl Rejection {
    /// Converts a store reply. Faults never become rejections: apply stops on them instead.
    pub fn from_store(e: &StoreError) -> Option<Rejection> {
        let kind = match e {
            StoreError::Compacted => RejectionKind::Compacted,
            StoreError::FutureRev => RejectionKind::FutureRev,
            StoreError::LeaseNotFound => RejectionKind::LeaseNotFound,
            StoreError::LeaseExists => RejectionKind::LeaseExists,
            StoreError::LeaseTtlTooLarge => RejectionKind::LeaseTtlTooLarge,
            StoreError::TooManyOps => RejectionKind::TooManyOps,
            StoreError::DuplicateKey => RejectionKind::DuplicateKey,
            StoreError::EmptyKey => RejectionKind::EmptyKey,
            StoreError::ValueProvided => RejectionKind::ValueProvided,
            StoreError::LeaseProvided => RejectionKind::LeaseProvided,
            StoreError::KeyNotFound => RejectionKind::KeyNotFound,
            StoreError::NoSpace => RejectionKind::NoSpace,
            StoreError::CorruptCluster => RejectionKind::CorruptCluster,
            StoreError::Io(_) | StoreError::Corrupt(_) | StoreError::InvalidSnapshot(_) => {
                return None
            }
        };
        Some(Rejection {
            kind,
            message: e.to_string(),
        })
    }

    /// The store error this rejection was made from.
    pub fn to_store(&self) -> StoreError {
        match self.kind {
            RejectionKind::Compacted => StoreError::Compacted,
            RejectionKind::FutureRev => StoreError::FutureRev,
            RejectionKind::LeaseNotFound => StoreError::LeaseNotFound,
            RejectionKind::LeaseExists => StoreError::LeaseExists,
            RejectionKind::LeaseTtlTooLarge => StoreError::LeaseTtlTooLarge,
            RejectionKind::TooManyOps => StoreError::TooManyOps,
            RejectionKind::DuplicateKey => StoreError::DuplicateKey,
            RejectionKind::EmptyKey => StoreError::EmptyKey,
            RejectionKind::ValueProvided => StoreError::ValueProvided,
            RejectionKind::LeaseProvided => StoreError::LeaseProvided,
            RejectionKind::KeyNotFound => StoreError::KeyNotFound,
            RejectionKind::NoSpace => StoreError::NoSpace,
            RejectionKind::CorruptCluster => StoreError::CorruptCluster,
        }
    }
}

/// The outcome of one command of a batch.
pub type CommandResult = Result<Applied, Rejection>;

/// The response to one Raft entry: one result per command of its [`Batch`], in order. Blank and
/// membership entries have none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse(pub Vec<CommandResult>);

openraft::declare_raft_types!(
    /// eden's instantiation of openraft.
    pub TypeConfig:
        D = Batch,
        R = BatchResponse,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
