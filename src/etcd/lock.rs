//! The Lock service (etcd's `v3lockpb.Lock`): a distributed mutex served by the node, for
//! clients that have no lock recipe of their own (the `etcd-client` crate's `lock()`, the
//! gateway's `/v3/lock/lock`).
//!
//! It is etcd's client-side mutex run inside the server, with the same keys and revisions, so
//! eden's locks and etcd's interoperate with clients that lock by hand:
//!
//! - The waiter's key is `NAME/` plus its lease id in lower-case hex, put with that lease (a
//!   lease of 0 gets a new 60 s lease, as etcd's session does). One txn puts it, unless it is
//!   there already, and reads the oldest key under `NAME/`.
//! - The oldest key (lowest create revision) holds the lock. A later waiter waits until every
//!   key created before its own is deleted (`Backend::wait_deletes`): unlocked, or its lease
//!   gone.
//! - A waiter that gives up (the client cancels, the wait fails) deletes its key, so it never
//!   holds the lock by accident later.
//!
//! `Backend::wait_deletes` and `Backend::wait_delete` are shared with the Election service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::errors::ApiError;
use super::pb::etcdserverpb as pb;
use super::pb::v3lockpb as lockpb;
use super::Backend;
use crate::agent::kv::{absent, prefix_end, put_op};
use eden_storage as st;

/// The TTL of the lease a lock or campaign with lease 0 gets (etcd's session default).
const SESSION_TTL: i64 = 60;

pub struct LockService {
    backend: Arc<Backend>,
}

impl LockService {
    pub fn new(backend: Arc<Backend>) -> LockService {
        LockService { backend }
    }
}

/// Runs its closure when dropped, unless disarmed: cleanup for a request the client abandons.
pub(super) struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    pub(super) fn new(f: F) -> Self {
        OnDrop(Some(f))
    }
    pub(super) fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// etcd runs these recipes through an in-process client, which loses the status code of a
/// refusal: the client sees the message with code Unknown. So do eden's.
pub(super) fn as_recipe(e: ApiError) -> Status {
    match e {
        ApiError::Store(s) => ApiError::Recipe(s.to_string()).into(),
        other => other.into(),
    }
}

/// `name` + `/`: the prefix every waiter's key of one lock or election is under.
pub(super) fn prefix(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// `prefix` + the lease id in lower-case hex as Go's `%x` prints it (a sign, not two's
/// complement, for a negative id).
pub(super) fn waiter_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    let sign = if lease < 0 { "-" } else { "" };
    k.extend_from_slice(format!("{sign}{:x}", lease.unsigned_abs()).as_bytes());
    k
}

/// A linearizable range over `prefix`, sorted by create revision, one key.
pub(super) fn by_create(prefix: &[u8], order: pb::range_request::SortOrder) -> pb::RangeRequest {
    pb::RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        sort_order: order as i32,
        sort_target: pb::range_request::SortTarget::Create as i32,
        limit: 1,
        ..Default::default()
    }
}

pub(super) fn op_range(r: pb::RangeRequest) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestRange(r)),
    }
}

/// The kvs of the `i`th response of a txn, which must be a range.
pub(super) fn range_kvs(t: &pb::TxnResponse, i: usize) -> Vec<super::pb::mvccpb::KeyValue> {
    match t.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(pb::response_op::Response::ResponseRange(r)) => r.kvs.clone(),
        _ => Vec::new(),
    }
}

impl Backend {
    /// The lease a lock or campaign runs under: the caller's, or a new one for lease 0.
    pub(super) async fn session_lease(&self, lease: i64) -> Result<i64, ApiError> {
        if lease != 0 {
            return Ok(lease);
        }
        let granted = self
            .lease_grant(pb::LeaseGrantRequest {
                ttl: SESSION_TTL,
                id: 0,
            })
            .await?;
        Ok(granted.id)
    }

    /// Deletes `key`; for cleanup, so failures are only logged.
    pub(super) fn delete_in_background(self: &Arc<Self>, key: Vec<u8>) {
        let backend = self.clone();
        tokio::spawn(async move {
            let req = pb::DeleteRangeRequest {
                key: key.clone(),
                ..Default::default()
            };
            if let Err(e) = backend.delete_range(req).await {
                tracing::warn!(
                    key = %String::from_utf8_lossy(&key),
                    "releasing an abandoned lock or campaign key: {e}"
                );
            }
        });
    }

    /// Waits until `key` is deleted at revision `from` or later.
    pub(super) async fn wait_delete(&self, key: &[u8], from: i64) -> Result<(), ApiError> {
        self.first_event(from, |e| {
            (e.kind == st::EventKind::Delete && e.kv.key == key).then_some(())
        })
        .await
        .map(|_| ())
    }

    /// The first event at revision `from` or later that `pick` takes, with its revision: from
    /// the local replica's history, then its event feed (subscribed before history is read,
    /// so nothing falls between). Fails if that history is compacted or the node stops.
    pub(super) async fn first_event<T>(
        &self,
        from: i64,
        pick: impl Fn(&st::Event) -> Option<T>,
    ) -> Result<(i64, T), ApiError> {
        const CHUNK: usize = 1024;
        let mut next = from;
        loop {
            let mut feed = self.node.subscribe();
            loop {
                let store = self.node.store();
                let current = store.revision();
                if next > current {
                    break;
                }
                let revisions = store.events(next, CHUNK)?;
                for (rev, events) in &revisions {
                    if let Some(t) = events.iter().find_map(&pick) {
                        return Ok((*rev, t));
                    }
                }
                // `events` covers a window of CHUNK revision numbers, with or without events.
                next = next.saturating_add(CHUNK as i64).min(current + 1);
            }
            loop {
                match feed.recv().await {
                    Ok(batch) if batch.revision < next => {}
                    // A gap in the feed (a snapshot install publishes no compacted history):
                    // read what is missing from the store, which fails if it is compacted.
                    Ok(batch) if batch.revision > next => break,
                    Ok(batch) => {
                        if let Some(t) = batch.events.iter().find_map(&pick) {
                            return Ok((batch.revision, t));
                        }
                        next = batch.revision + 1;
                    }
                    // Missed some: read them from history.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Err(ApiError::Unavailable(
                            "etcdserver: the node is shutting down".into(),
                        ))
                    }
                }
            }
        }
    }

    /// Waits until no key under `prefix` created at or below `max_create` is left, newest
    /// first (etcd's `waitDeletes`), and returns the header of the last look.
    pub(super) async fn wait_deletes(
        &self,
        prefix: &[u8],
        max_create: i64,
    ) -> Result<Option<pb::ResponseHeader>, ApiError> {
        loop {
            let mut req = by_create(prefix, pb::range_request::SortOrder::Descend);
            req.max_create_revision = max_create;
            let resp = self.range(req).await?;
            let Some(newest) = resp.kvs.first() else {
                return Ok(resp.header);
            };
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            self.wait_delete(&newest.key, rev).await?;
        }
    }

    /// Takes the lock `name` for `lease`, waiting for earlier waiters.
    pub async fn lock(
        self: &Arc<Self>,
        r: lockpb::LockRequest,
    ) -> Result<lockpb::LockResponse, ApiError> {
        let lease = self.session_lease(r.lease).await?;
        let pfx = prefix(&r.name);
        let key = waiter_key(&pfx, lease);
        let oldest = || op_range(by_create(&pfx, pb::range_request::SortOrder::Ascend));
        let resp = self
            .txn(pb::TxnRequest {
                compare: vec![absent(&key)],
                success: vec![put_op(&key, Vec::new(), lease), oldest()],
                failure: vec![
                    op_range(pb::RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    }),
                    oldest(),
                ],
            })
            .await?;
        let mut my_rev = resp.header.as_ref().map_or(0, |h| h.revision);
        if !resp.succeeded {
            if let Some(kv) = range_kvs(&resp, 0).first() {
                my_rev = kv.create_revision;
            }
        }
        let owner = range_kvs(&resp, 1);
        if owner.first().is_none_or(|o| o.create_revision == my_rev) {
            return Ok(lockpb::LockResponse {
                header: resp.header,
                key,
            });
        }
        let me = self.clone();
        let abandon = key.clone();
        let guard = OnDrop::new(move || me.delete_in_background(abandon));
        let header = self.wait_deletes(&pfx, my_rev - 1).await?;
        guard.disarm();
        Ok(lockpb::LockResponse { header, key })
    }

    /// Releases a lock: deletes the key `Lock` answered with.
    pub async fn unlock(
        &self,
        r: lockpb::UnlockRequest,
    ) -> Result<lockpb::UnlockResponse, ApiError> {
        let resp = self
            .delete_range(pb::DeleteRangeRequest {
                key: r.key,
                ..Default::default()
            })
            .await?;
        Ok(lockpb::UnlockResponse {
            header: resp.header,
        })
    }
}

#[tonic::async_trait]
impl lockpb::lock_server::Lock for LockService {
    async fn lock(
        &self,
        req: Request<lockpb::LockRequest>,
    ) -> Result<Response<lockpb::LockResponse>, Status> {
        Ok(Response::new(
            self.backend
                .lock(req.into_inner())
                .await
                .map_err(as_recipe)?,
        ))
    }

    async fn unlock(
        &self,
        req: Request<lockpb::UnlockRequest>,
    ) -> Result<Response<lockpb::UnlockResponse>, Status> {
        Ok(Response::new(
            self.backend
                .unlock(req.into_inner())
                .await
                .map_err(as_recipe)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn waiter_keys_print_the_lease_as_go_does() {
        assert_eq!(super::waiter_key(b"l/", 1001), b"l/3e9");
        assert_eq!(
            super::waiter_key(b"l/", 0x7fff_ffff_ffff_ffff),
            b"l/7fffffffffffffff"
        );
        assert_eq!(super::waiter_key(b"l/", -31), b"l/-1f");
    }
}
