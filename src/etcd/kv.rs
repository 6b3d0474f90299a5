//! The KV service: Range, Put, DeleteRange, Txn, Compact.
//!
//! Writes go through `RaftNode::write` (forwarded to the leader, batched). Range is
//! linearizable by default (`RaftNode::linearizable_read`, then the local store) and served
//! from the local replica when `serializable` is set. The conversions between protobuf and
//! `eden_storage` types live here and are shared with the gateway and the watch service.

use std::sync::Arc;

use eden_storage as st;
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::errors::ApiError;
use super::pb::etcdserverpb as pb;
use super::pb::mvccpb;
use super::Backend;

pub struct KvService {
    backend: Arc<Backend>,
}

impl KvService {
    pub fn new(backend: Arc<Backend>) -> KvService {
        KvService { backend }
    }
}

pub fn kv_to_pb(kv: st::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

pub fn range_from_pb(r: pb::RangeRequest) -> st::RangeRequest {
    use pb::range_request::{SortOrder as O, SortTarget as T};
    st::RangeRequest {
        sort_order: match O::try_from(r.sort_order).unwrap_or(O::None) {
            O::None => st::SortOrder::None,
            O::Ascend => st::SortOrder::Ascend,
            O::Descend => st::SortOrder::Descend,
        },
        sort_target: match T::try_from(r.sort_target).unwrap_or(T::Key) {
            T::Key => st::SortTarget::Key,
            T::Version => st::SortTarget::Version,
            T::Create => st::SortTarget::Create,
            T::Mod => st::SortTarget::Mod,
            T::Value => st::SortTarget::Value,
        },
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    }
}

fn put_from_pb(p: pb::PutRequest) -> st::PutRequest {
    st::PutRequest {
        key: p.key,
        value: p.value,
        lease: p.lease,
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    }
}

fn delete_from_pb(d: pb::DeleteRangeRequest) -> st::DeleteRangeRequest {
    st::DeleteRangeRequest {
        key: d.key,
        range_end: d.range_end,
        prev_kv: d.prev_kv,
    }
}

fn compare_from_pb(c: pb::Compare) -> Result<st::Compare, ApiError> {
    use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let result = match R::try_from(c.result) {
        Ok(R::Equal) => st::CompareResult::Equal,
        Ok(R::Greater) => st::CompareResult::Greater,
        Ok(R::Less) => st::CompareResult::Less,
        Ok(R::NotEqual) => st::CompareResult::NotEqual,
        Err(_) => {
            return Err(ApiError::InvalidInput(format!(
                "txn compare on {:?}: unknown compare result {}",
                String::from_utf8_lossy(&c.key),
                c.result
            )))
        }
    };
    // etcd reads the union member that matches `target`; a missing one compares with zero.
    let u = c.target_union;
    let target = match T::try_from(c.target) {
        Ok(T::Version) => st::CompareTarget::Version(match u {
            Some(U::Version(v)) => v,
            _ => 0,
        }),
        Ok(T::Create) => st::CompareTarget::Create(match u {
            Some(U::CreateRevision(v)) => v,
            _ => 0,
        }),
        Ok(T::Mod) => st::CompareTarget::Mod(match u {
            Some(U::ModRevision(v)) => v,
            _ => 0,
        }),
        Ok(T::Value) => st::CompareTarget::Value(match u {
            Some(U::Value(v)) => v,
            _ => Vec::new(),
        }),
        Ok(T::Lease) => st::CompareTarget::Lease(match u {
            Some(U::Lease(v)) => v,
            _ => 0,
        }),
        Err(_) => {
            return Err(ApiError::InvalidInput(format!(
                "txn compare on {:?}: unknown compare target {}",
                String::from_utf8_lossy(&c.key),
                c.target
            )))
        }
    };
    Ok(st::Compare {
        result,
        target,
        key: c.key,
        range_end: c.range_end,
    })
}

pub fn txn_from_pb(t: pb::TxnRequest) -> Result<st::TxnRequest, ApiError> {
    let ops = |ops: Vec<pb::RequestOp>| -> Result<Vec<st::RequestOp>, ApiError> {
        ops.into_iter()
            .map(|op| match op.request {
                Some(pb::request_op::Request::RequestRange(r)) => {
                    Ok(st::RequestOp::Range(range_from_pb(r)))
                }
                Some(pb::request_op::Request::RequestPut(p)) => {
                    Ok(st::RequestOp::Put(put_from_pb(p)))
                }
                Some(pb::request_op::Request::RequestDeleteRange(d)) => {
                    Ok(st::RequestOp::DeleteRange(delete_from_pb(d)))
                }
                Some(pb::request_op::Request::RequestTxn(t)) => {
                    Ok(st::RequestOp::Txn(txn_from_pb(t)?))
                }
                None => Err(ApiError::InvalidInput(
                    "txn request op has no request set".to_string(),
                )),
            })
            .collect()
    };
    Ok(st::TxnRequest {
        compare: t
            .compare
            .into_iter()
            .map(compare_from_pb)
            .collect::<Result<_, _>>()?,
        success: ops(t.success)?,
        failure: ops(t.failure)?,
    })
}

/// The response bodies, with the header the caller decides (top level or inside a txn).
fn range_to_pb(r: st::RangeResponse, header: Option<pb::ResponseHeader>) -> pb::RangeResponse {
    pb::RangeResponse {
        header,
        kvs: r.kvs.into_iter().map(kv_to_pb).collect(),
        more: r.more,
        count: r.count,
    }
}

fn put_to_pb(r: st::PutResponse, header: Option<pb::ResponseHeader>) -> pb::PutResponse {
    pb::PutResponse {
        header,
        prev_kv: r.prev_kv.map(kv_to_pb),
    }
}

fn delete_to_pb(
    r: st::DeleteRangeResponse,
    header: Option<pb::ResponseHeader>,
) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header,
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(kv_to_pb).collect(),
    }
}

impl Backend {
    fn txn_to_pb(&self, r: st::TxnResponse, revision: i64) -> pb::TxnResponse {
        // etcd fills only `revision` in the headers of the ops inside a txn, and leaves a
        // nested txn's own header empty. A range sees the txn's writes so far: it reports the
        // revision before the txn until the first write, and the txn's revision after it.
        let wrote = txn_writes(&r);
        let mut inner = InnerRevision {
            before: if wrote { revision - 1 } else { revision },
            wrote: false,
        };
        let mut out = inner.txn(r);
        out.header = self.header(revision);
        out
    }

    pub async fn range(&self, r: pb::RangeRequest) -> Result<pb::RangeResponse, ApiError> {
        if !r.serializable {
            self.node.linearizable_read().await?;
        }
        let store = self.node.store();
        let revision = store.revision();
        let resp = store.range(&range_from_pb(r))?;
        Ok(range_to_pb(resp, self.header(revision)))
    }

    pub async fn put(&self, p: pb::PutRequest) -> Result<pb::PutResponse, ApiError> {
        // etcd's order: quota, the request's own checks, then its size.
        self.check_quota(super::maintenance::Cost::Put(&p)).await?;
        let len = p.encoded_len();
        let put = put_from_pb(p);
        st::mvcc::check_put(&put)?;
        super::limits::check_write_size(len)?;
        let applied = self.node.write(st::Command::Put(put)).await?;
        match applied.response {
            st::CommandResponse::Put(r) => Ok(put_to_pb(r, self.header(applied.revision))),
            other => Err(unexpected("put", &other)),
        }
    }

    pub async fn delete_range(
        &self,
        d: pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, ApiError> {
        if d.key.is_empty() {
            return Err(st::Error::EmptyKey.into());
        }
        super::limits::check_write_size(d.encoded_len())?;
        let applied = self
            .node
            .write(st::Command::DeleteRange(delete_from_pb(d)))
            .await?;
        match applied.response {
            st::CommandResponse::DeleteRange(r) => {
                Ok(delete_to_pb(r, self.header(applied.revision)))
            }
            other => Err(unexpected("delete", &other)),
        }
    }

    pub async fn txn(&self, t: pb::TxnRequest) -> Result<pb::TxnResponse, ApiError> {
        // etcd's order: quota, the txn's own checks, then its size, which only a txn that
        // writes has (etcd serves a read-only one without proposing it).
        self.check_quota(super::maintenance::Cost::Txn(&t)).await?;
        let len = t.encoded_len();
        let txn = txn_from_pb(t)?;
        st::mvcc::validate_txn(&txn)?;
        if !st::mvcc::is_read_only(&txn) {
            super::limits::check_write_size(len)?;
        }
        let applied = self.node.write(st::Command::Txn(txn)).await?;
        match applied.response {
            st::CommandResponse::Txn(r) => Ok(self.txn_to_pb(r, applied.revision)),
            other => Err(unexpected("txn", &other)),
        }
    }

    pub async fn compact(
        &self,
        c: pb::CompactionRequest,
    ) -> Result<pb::CompactionResponse, ApiError> {
        let applied = self
            .node
            .write(st::Command::Compact(st::CompactionRequest {
                revision: c.revision,
                physical: c.physical,
            }))
            .await?;
        Ok(pb::CompactionResponse {
            header: self.header(applied.revision),
        })
    }
}

/// Whether a txn response records a change: a put, a delete that deleted something, or a
/// nested txn that did either.
fn txn_writes(r: &st::TxnResponse) -> bool {
    r.responses.iter().any(|op| match op {
        st::ResponseOp::Range(_) => false,
        st::ResponseOp::Put(_) => true,
        st::ResponseOp::DeleteRange(d) => d.deleted > 0,
        st::ResponseOp::Txn(t) => txn_writes(t),
    })
}

/// Converts the responses inside a txn, tracking the revision each op observed.
struct InnerRevision {
    before: i64,
    wrote: bool,
}

impl InnerRevision {
    fn now(&self) -> i64 {
        if self.wrote {
            self.before + 1
        } else {
            self.before
        }
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            revision: self.now(),
            ..Default::default()
        })
    }

    fn txn(&mut self, r: st::TxnResponse) -> pb::TxnResponse {
        use pb::response_op::Response as R;
        let mut responses = Vec::with_capacity(r.responses.len());
        for op in r.responses {
            let response = match op {
                st::ResponseOp::Range(x) => R::ResponseRange(range_to_pb(x, self.header())),
                st::ResponseOp::Put(x) => {
                    self.wrote = true;
                    R::ResponsePut(put_to_pb(x, self.header()))
                }
                st::ResponseOp::DeleteRange(x) => {
                    self.wrote |= x.deleted > 0;
                    R::ResponseDeleteRange(delete_to_pb(x, self.header()))
                }
                st::ResponseOp::Txn(x) => R::ResponseTxn(self.txn(x)),
            };
            responses.push(pb::ResponseOp {
                response: Some(response),
            });
        }
        pb::TxnResponse {
            header: Some(pb::ResponseHeader::default()),
            succeeded: r.succeeded,
            responses,
        }
    }
}

/// A response of the wrong kind for its command: a bug in the state machine, not a reply.
pub(crate) fn unexpected(what: &str, got: &st::CommandResponse) -> ApiError {
    ApiError::Internal(format!(
        "the state machine answered a {what} with {got:?}; this is a bug in eden"
    ))
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        Ok(Response::new(self.backend.range(req.into_inner()).await?))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        Ok(Response::new(self.backend.put(req.into_inner()).await?))
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        Ok(Response::new(
            self.backend.delete_range(req.into_inner()).await?,
        ))
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        Ok(Response::new(self.backend.txn(req.into_inner()).await?))
    }

    async fn compact(
        &self,
        req: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        Ok(Response::new(self.backend.compact(req.into_inner()).await?))
    }
}
