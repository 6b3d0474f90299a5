//! The one table from eden errors to gRPC status codes and etcd's exact messages.
//!
//! Clients (etcdctl, clientv3, the `etcd-client` crate) compare error strings byte for byte, so
//! every message that etcd itself returns is etcd's, taken from its `rpctypes` package, with
//! etcd's status code. Errors etcd has no equivalent for (eden's own unavailability reasons)
//! keep eden's message, which names the cause and what to do. Nothing else in `src/etcd/`
//! builds a [`tonic::Status`]: handlers return [`ApiError`] and let `From` do the mapping.

use tonic::{Code, Status};

/// An error at the etcd API edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A deterministic refusal from the keyspace; its `Display` is etcd's message.
    #[error("{0}")]
    Store(eden_storage::Error),
    /// etcd's `ErrGRPCMemberNotFound`.
    #[error("etcdserver: member not found")]
    MemberNotFound,
    /// etcd's `ErrGRPCMemberNotLearner`.
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    /// etcd's `ErrGRPCRequestTooLarge`: the write's Raft request would pass
    /// `--max-request-bytes` (see `limits`).
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// etcd's `ErrGRPCPeerURLExist`.
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    /// A request etcd would accept but eden's roles do not allow; the message says what to do.
    #[error("{0}")]
    Unsupported(String),
    /// A malformed request; the message names the bad field.
    #[error("{0}")]
    InvalidInput(String),
    /// No leader, no quorum, shutting down; retry later. The message says why.
    #[error("{0}")]
    Unavailable(String),
    /// A disk fault or a bug on this node.
    #[error("{0}")]
    Internal(String),
    /// An error of the lock and election recipes (`election: not leader`), which etcd returns
    /// as a plain error: gRPC code Unknown.
    #[error("{0}")]
    Recipe(String),
}

impl From<eden_storage::Error> for ApiError {
    fn from(e: eden_storage::Error) -> Self {
        if e.is_fault() {
            ApiError::Internal(e.to_string())
        } else {
            ApiError::Store(e)
        }
    }
}

impl From<eden_raft::Error> for ApiError {
    fn from(e: eden_raft::Error) -> Self {
        match e {
            eden_raft::Error::Store(s) => ApiError::from(s),
            eden_raft::Error::Unavailable(m) => ApiError::Unavailable(format!("etcdserver: {m}")),
            eden_raft::Error::InvalidInput(m) => ApiError::InvalidInput(m),
            e @ (eden_raft::Error::Io(_) | eden_raft::Error::Internal(_)) => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}

/// The gRPC code etcd uses for each store refusal (etcd `api/v3rpc/rpctypes/error.go`).
fn store_code(e: &eden_storage::Error) -> Code {
    use eden_storage::Error as E;
    match e {
        E::Compacted | E::FutureRev | E::LeaseTtlTooLarge => Code::OutOfRange,
        E::LeaseNotFound => Code::NotFound,
        E::LeaseExists => Code::FailedPrecondition,
        E::TooManyOps
        | E::DuplicateKey
        | E::EmptyKey
        | E::ValueProvided
        | E::LeaseProvided
        | E::KeyNotFound => Code::InvalidArgument,
        E::NoSpace => Code::ResourceExhausted,
        E::CorruptCluster => Code::DataLoss,
        E::Io(_) | E::Corrupt(_) | E::InvalidSnapshot(_) => Code::Internal,
    }
}

impl ApiError {
    /// The gRPC status code of this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Store(e) => store_code(e),
            ApiError::MemberNotFound => Code::NotFound,
            ApiError::MemberNotLearner | ApiError::PeerUrlExists => Code::FailedPrecondition,
            ApiError::Unsupported(_) => Code::FailedPrecondition,
            ApiError::InvalidInput(_) | ApiError::RequestTooLarge => Code::InvalidArgument,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
            ApiError::Recipe(_) => Code::Unknown,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eden_storage::Error as E;

    /// The examples the issue names, plus every store refusal: code and exact text.
    #[test]
    fn table_matches_etcd() {
        let cases: Vec<(ApiError, Code, &str)> = vec![
            (
                ApiError::RequestTooLarge,
                Code::InvalidArgument,
                "etcdserver: request is too large",
            ),
            (
                ApiError::Store(E::LeaseNotFound),
                Code::NotFound,
                "etcdserver: requested lease not found",
            ),
            (
                ApiError::Store(E::DuplicateKey),
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request",
            ),
            (
                ApiError::Store(E::FutureRev),
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
            ),
            (
                ApiError::Store(E::Compacted),
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
            ),
            (
                ApiError::Store(E::TooManyOps),
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
            ),
            (
                ApiError::Store(E::EmptyKey),
                Code::InvalidArgument,
                "etcdserver: key is not provided",
            ),
            (
                ApiError::Store(E::LeaseExists),
                Code::FailedPrecondition,
                "etcdserver: lease already exists",
            ),
            (
                ApiError::Store(E::LeaseTtlTooLarge),
                Code::OutOfRange,
                "etcdserver: too large lease TTL",
            ),
            (
                ApiError::Store(E::KeyNotFound),
                Code::InvalidArgument,
                "etcdserver: key not found",
            ),
            (
                ApiError::Store(E::ValueProvided),
                Code::InvalidArgument,
                "etcdserver: value is provided",
            ),
            (
                ApiError::Store(E::LeaseProvided),
                Code::InvalidArgument,
                "etcdserver: lease is provided",
            ),
            (
                ApiError::Store(E::NoSpace),
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
            ),
            (
                ApiError::Store(E::CorruptCluster),
                Code::DataLoss,
                "etcdserver: corrupt cluster",
            ),
            (
                ApiError::MemberNotFound,
                Code::NotFound,
                "etcdserver: member not found",
            ),
            (
                ApiError::MemberNotLearner,
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member",
            ),
        ];
        for (err, code, msg) in cases {
            let status = Status::from(err.clone());
            assert_eq!((status.code(), status.message()), (code, msg), "{err:?}");
        }
    }

    #[test]
    fn storage_faults_are_internal() {
        let e = ApiError::from(eden_raft::Error::from(E::Io("disk full".into())));
        assert_eq!(e.code(), Code::Internal);
    }
}
