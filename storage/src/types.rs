//! The requests and responses of the keyspace, shaped after etcd's `rpc.proto` and `kv.proto`
//! but free of protobuf. These are the contract between the layers:
//!
//! - the Raft log carries [`Command`]s (serde, bincode 2), applied by the state machine;
//! - the etcd API converts protobuf messages to and from these types at its edge;
//! - reads ([`RangeRequest`]) are served from any replica without going through the log.
//!
//! Field meanings are etcd's. Zero values mean what they mean in etcd (`limit: 0` is no limit,
//! `revision: 0` is the current revision, `lease: 0` is no lease).

use serde::{Deserialize, Serialize};

/// A store revision. Revisions start at 1; each mutating command that changes something adds 1.
pub type Revision = i64;

/// A lease id. 0 means "no lease".
pub type LeaseId = i64;

/// Byte strings (keys, values, range ends) are serialized as bytes (`serde_bytes`), not as
/// sequences of numbers: the same bincode encoding, written and read in one copy instead of one
/// call per byte.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Revision of the last creation of this key (since its last delete).
    pub create_revision: Revision,
    /// Revision of the last modification.
    pub mod_revision: Revision,
    /// Number of modifications since creation; a delete resets it to 0.
    pub version: i64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub lease: LeaseId,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortOrder {
    #[default]
    None,
    Ascend,
    Descend,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortTarget {
    #[default]
    Key,
    Version,
    Create,
    Mod,
    Value,
}

/// etcd's RangeRequest. `range_end` follows etcd: empty = the single key `key`; `[0]` = every key
/// at or after `key` (from-key, and with `key = [0]` all keys); otherwise the half-open range
/// `[key, range_end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub limit: i64,
    pub revision: Revision,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub keys_only: bool,
    pub count_only: bool,
    pub min_mod_revision: Revision,
    pub max_mod_revision: Revision,
    pub min_create_revision: Revision,
    pub max_create_revision: Revision,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    /// Number of keys in the range, ignoring limit and the min/max filters (as etcd does).
    pub count: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub lease: LeaseId,
    pub prev_kv: bool,
    pub ignore_value: bool,
    pub ignore_lease: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    pub prev_kv: Option<KeyValue>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeResponse {
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    Create(Revision),
    Mod(Revision),
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    Lease(LeaseId),
}

/// One txn guard. With a `range_end` it must hold for every key in the range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub result: CompareResult,
    pub target: CompareTarget,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionRequest {
    pub revision: Revision,
    pub physical: bool,
}

/// A lease as the store keeps it. The store never reads a clock: `ttl` is the granted TTL in
/// seconds; deadlines and keep-alives are the leader's business, and expiry arrives as a
/// [`Command::LeaseRevoke`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl: i64,
    /// Keys attached to the lease, sorted.
    pub keys: Vec<Vec<u8>>,
}

/// A mutating command: what the Raft log carries and the state machine applies, in order.
/// Applying a command is deterministic: the same commands on the same store give the same
/// results and the same bytes on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    /// Grant a lease. `id: 0` asks the store to choose one; the choice is deterministic.
    LeaseGrant {
        id: LeaseId,
        ttl: i64,
    },
    /// Revoke (or expire) a lease, deleting its keys in one revision.
    LeaseRevoke {
        id: LeaseId,
    },
    /// Raise (`activate`) or clear an alarm of one member. While any member has a `NoSpace`
    /// alarm, puts, txns with puts and lease grants are refused with [`crate::Error::NoSpace`].
    Alarm {
        activate: bool,
        member: u64,
        alarm: AlarmType,
    },
}

impl Command {
    /// About how many bytes this command takes in the log: its keys and values plus a small
    /// allowance for everything else. For sizing batches, not exact.
    pub fn approx_len(&self) -> usize {
        const PART: usize = 16;
        fn op(o: &RequestOp) -> usize {
            match o {
                RequestOp::Range(r) => PART + r.key.len() + r.range_end.len(),
                RequestOp::Put(p) => PART + p.key.len() + p.value.len(),
                RequestOp::DeleteRange(d) => PART + d.key.len() + d.range_end.len(),
                RequestOp::Txn(t) => txn(t),
            }
        }
        fn txn(t: &TxnRequest) -> usize {
            let compares: usize = t
                .compare
                .iter()
                .map(|c| {
                    let value = match &c.target {
                        CompareTarget::Value(v) => v.len(),
                        _ => 0,
                    };
                    PART + c.key.len() + c.range_end.len() + value
                })
                .sum();
            PART + compares + t.success.iter().chain(&t.failure).map(op).sum::<usize>()
        }
        match self {
            Command::Put(p) => PART + p.key.len() + p.value.len(),
            Command::DeleteRange(d) => PART + d.key.len() + d.range_end.len(),
            Command::Txn(t) => txn(t),
            _ => PART,
        }
    }
}

/// etcd's alarm types, with etcd's numbers ([`AlarmType::number`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AlarmType {
    /// `NONE` (0): in a request, any type.
    None,
    /// `NOSPACE` (1): the member's store reached its quota.
    NoSpace,
    /// `CORRUPT` (2): the member's store differs from the others'.
    Corrupt,
}

impl AlarmType {
    pub fn number(self) -> i32 {
        match self {
            AlarmType::None => 0,
            AlarmType::NoSpace => 1,
            AlarmType::Corrupt => 2,
        }
    }

    pub fn from_number(n: i32) -> Option<AlarmType> {
        match n {
            0 => Some(AlarmType::None),
            1 => Some(AlarmType::NoSpace),
            2 => Some(AlarmType::Corrupt),
            _ => None,
        }
    }
}

/// One raised alarm: which member, and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AlarmMember {
    pub member: u64,
    pub alarm: AlarmType,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact,
    LeaseGrant {
        id: LeaseId,
        ttl: i64,
    },
    LeaseRevoke,
    /// The alarm that was raised (also when it was up already), or the one that was cleared
    /// (none if it was not up).
    Alarm(Vec<AlarmMember>),
}

/// The outcome of one applied command: its response and the store revision after it (the
/// response header's `revision`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub revision: Revision,
    pub response: CommandResponse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// A watch event. For a delete, `kv` holds the key, the deleting revision as `mod_revision`, and
/// zero version, as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}
