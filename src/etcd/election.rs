//! The Election service (etcd's `v3electionpb.Election`): leader election served by the
//! node, for clients without an election recipe of their own.
//!
//! etcd's client-side election run inside the server, with the same keys, so it interoperates
//! with clients that campaign by hand:
//!
//! - A candidate's key is `NAME/` plus its lease id in hex, holding its value, put with its
//!   lease (lease 0: a new 60 s lease). The oldest key under `NAME/` is the leader.
//! - `Campaign` puts the key (or finds it from an earlier campaign of the same lease and
//!   proclaims the new value), then waits until every older candidate's key is gone
//!   (`Backend::wait_deletes`). It answers with the [`electionpb::LeaderKey`] that `Proclaim`
//!   and `Resign` take; both act only while the key still has the create revision in it.
//! - `Leader` reads the oldest key; `Observe` streams the leader's key and each of its changes,
//!   and moves on to the next leader when it is deleted.
//!
//! etcd returns the recipe's own errors (`election: not leader`, `election: no leader`) as
//! plain errors, which gRPC reports as Unknown; so does eden ([`ApiError::Recipe`]).

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::errors::ApiError;
use super::lock::{as_recipe, by_create, op_range, prefix, range_kvs, waiter_key, OnDrop};
use super::pb::etcdserverpb as pb;
use super::pb::mvccpb;
use super::pb::v3electionpb as electionpb;
use super::Backend;
use crate::agent::kv::{absent, created_at, delete_op, prefix_end, put_op};

const NOT_LEADER: &str = "election: not leader";
const NO_LEADER: &str = "election: no leader";
const MISSING_LEADER: &str = "\"leader\" field must be provided";

pub struct ElectionService {
    backend: Arc<Backend>,
}

impl ElectionService {
    pub fn new(backend: Arc<Backend>) -> ElectionService {
        ElectionService { backend }
    }
}

impl Backend {
    /// Puts `value` under the leader's key if it is still the one created at `rev`.
    async fn proclaim_at(
        &self,
        key: &[u8],
        rev: i64,
        lease: i64,
        value: &[u8],
    ) -> Result<Option<pb::ResponseHeader>, ApiError> {
        let resp = self
            .txn(pb::TxnRequest {
                compare: vec![created_at(key, rev)],
                success: vec![put_op(key, value.to_vec(), lease)],
                failure: Vec::new(),
            })
            .await?;
        if !resp.succeeded {
            return Err(ApiError::Recipe(NOT_LEADER.into()));
        }
        Ok(resp.header)
    }

    /// Deletes the leader's key if it is still the one created at `rev`.
    async fn resign_at(
        &self,
        key: &[u8],
        rev: i64,
    ) -> Result<Option<pb::ResponseHeader>, ApiError> {
        let resp = self
            .txn(pb::TxnRequest {
                compare: vec![created_at(key, rev)],
                success: vec![delete_op(key)],
                failure: Vec::new(),
            })
            .await?;
        Ok(resp.header)
    }

    pub async fn campaign(
        self: &Arc<Self>,
        r: electionpb::CampaignRequest,
    ) -> Result<electionpb::CampaignResponse, ApiError> {
        let lease = self.session_lease(r.lease).await?;
        let pfx = prefix(&r.name);
        let key = waiter_key(&pfx, lease);
        let resp = self
            .txn(pb::TxnRequest {
                compare: vec![absent(&key)],
                success: vec![put_op(&key, r.value.clone(), lease)],
                failure: vec![op_range(pb::RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })],
            })
            .await?;
        let mut rev = resp.header.as_ref().map_or(0, |h| h.revision);
        if !resp.succeeded {
            if let Some(kv) = range_kvs(&resp, 0).first() {
                rev = kv.create_revision;
                if kv.value != r.value {
                    if let Err(e) = self.proclaim_at(&key, rev, lease, &r.value).await {
                        let _ = self.resign_at(&key, rev).await;
                        return Err(e);
                    }
                }
            }
        }
        // A campaign the client abandons resigns, as etcd's does when its context ends.
        let me = self.clone();
        let abandon = key.clone();
        let guard = OnDrop::new(move || {
            tokio::spawn(async move {
                if let Err(e) = me.resign_at(&abandon, rev).await {
                    tracing::warn!("resigning an abandoned campaign: {e}");
                }
            });
        });
        let waited = self.wait_deletes(&pfx, rev - 1).await;
        guard.disarm();
        waited?;
        Ok(electionpb::CampaignResponse {
            header: resp.header,
            leader: Some(electionpb::LeaderKey {
                name: r.name,
                key,
                rev,
                lease,
            }),
        })
    }

    pub async fn proclaim(
        &self,
        r: electionpb::ProclaimRequest,
    ) -> Result<electionpb::ProclaimResponse, ApiError> {
        let leader = r
            .leader
            .ok_or_else(|| ApiError::Recipe(MISSING_LEADER.into()))?;
        let lease = self.session_lease(leader.lease).await?;
        let header = self
            .proclaim_at(&leader.key, leader.rev, lease, &r.value)
            .await?;
        Ok(electionpb::ProclaimResponse { header })
    }

    pub async fn resign(
        &self,
        r: electionpb::ResignRequest,
    ) -> Result<electionpb::ResignResponse, ApiError> {
        let leader = r
            .leader
            .ok_or_else(|| ApiError::Recipe(MISSING_LEADER.into()))?;
        self.session_lease(leader.lease).await?;
        let header = self.resign_at(&leader.key, leader.rev).await?;
        Ok(electionpb::ResignResponse { header })
    }

    /// The current leader's key, or `election: no leader`.
    pub async fn election_leader(
        &self,
        r: electionpb::LeaderRequest,
    ) -> Result<electionpb::LeaderResponse, ApiError> {
        let resp = self
            .range(by_create(
                &prefix(&r.name),
                pb::range_request::SortOrder::Ascend,
            ))
            .await?;
        match resp.kvs.into_iter().next() {
            Some(kv) => Ok(electionpb::LeaderResponse {
                header: resp.header,
                kv: Some(kv),
            }),
            None => Err(ApiError::Recipe(NO_LEADER.into())),
        }
    }

    /// Streams the leader of `name`: its key when there is one (waiting for the first
    /// candidate otherwise), each change of it, and the next leader once it is deleted.
    async fn observe(
        self: Arc<Self>,
        name: Vec<u8>,
        out: tokio::sync::mpsc::Sender<Result<electionpb::LeaderResponse, Status>>,
    ) {
        let pfx = prefix(&name);
        let send = |header: Option<pb::ResponseHeader>, kv: mvccpb::KeyValue| {
            let out = out.clone();
            async move {
                out.send(Ok(electionpb::LeaderResponse {
                    header,
                    kv: Some(kv),
                }))
                .await
                .is_ok()
            }
        };
        loop {
            let first = match self
                .range(by_create(&pfx, pb::range_request::SortOrder::Ascend))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = out.send(Err(as_recipe(e))).await;
                    return;
                }
            };
            let at = first.header.as_ref().map_or(0, |h| h.revision);
            let (mut header, leader) = match first.kvs.into_iter().next() {
                Some(kv) => (first.header, kv),
                // No candidate yet: the first put under the prefix is the leader.
                None => match self.first_put_under(&pfx, at + 1).await {
                    Some((rev, kv)) => (self.header(rev), kv),
                    None => return,
                },
            };
            if !send(header, leader.clone()).await {
                return;
            }
            // Follow the leader's key: each put is news, its delete ends this leader. (The
            // range's header may be older than the value it read: start after both.)
            let mut from = header
                .as_ref()
                .map_or(0, |h| h.revision)
                .max(leader.mod_revision)
                + 1;
            loop {
                match self.key_change(&leader.key, from).await {
                    Some((rev, Some(kv))) => {
                        header = self.header(rev);
                        if !send(header, kv).await {
                            return;
                        }
                        from = rev + 1;
                    }
                    Some((_, None)) => break,
                    None => return,
                }
            }
            if out.is_closed() {
                return;
            }
        }
    }

    /// The first put of a key under `pfx` at revision `from` or later, with its revision;
    /// `None` if the feed ends.
    async fn first_put_under(&self, pfx: &[u8], from: i64) -> Option<(i64, mvccpb::KeyValue)> {
        let end = prefix_end(pfx);
        self.first_event(from, |e| {
            let under = e.kv.key.as_slice() >= pfx && e.kv.key < end;
            (e.kind == eden_storage::EventKind::Put && under)
                .then(|| super::kv::kv_to_pb(e.kv.clone()))
        })
        .await
        .ok()
    }

    /// The next put (`Some(kv)`) or delete (`None`) of `key` at revision `from` or later.
    async fn key_change(&self, key: &[u8], from: i64) -> Option<(i64, Option<mvccpb::KeyValue>)> {
        self.first_event(from, |e| {
            (e.kv.key == key).then(|| match e.kind {
                eden_storage::EventKind::Put => Some(super::kv::kv_to_pb(e.kv.clone())),
                eden_storage::EventKind::Delete => None,
            })
        })
        .await
        .ok()
    }
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<electionpb::LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl electionpb::election_server::Election for ElectionService {
    async fn campaign(
        &self,
        req: Request<electionpb::CampaignRequest>,
    ) -> Result<Response<electionpb::CampaignResponse>, Status> {
        Ok(Response::new(
            self.backend
                .campaign(req.into_inner())
                .await
                .map_err(as_recipe)?,
        ))
    }

    async fn proclaim(
        &self,
        req: Request<electionpb::ProclaimRequest>,
    ) -> Result<Response<electionpb::ProclaimResponse>, Status> {
        Ok(Response::new(
            self.backend
                .proclaim(req.into_inner())
                .await
                .map_err(as_recipe)?,
        ))
    }

    async fn leader(
        &self,
        req: Request<electionpb::LeaderRequest>,
    ) -> Result<Response<electionpb::LeaderResponse>, Status> {
        Ok(Response::new(
            self.backend
                .election_leader(req.into_inner())
                .await
                .map_err(as_recipe)?,
        ))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        req: Request<electionpb::LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let backend = self.backend.clone();
        let name = req.into_inner().name;
        let task = tokio::spawn(async move { backend.observe(name, tx).await });
        // The observer stops when the client goes away (the stream is dropped).
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let guard = OnDrop::new(move || task.abort());
        let stream = tokio_stream::StreamExt::map(stream, move |item| {
            let _ = &guard;
            item
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn resign(
        &self,
        req: Request<electionpb::ResignRequest>,
    ) -> Result<Response<electionpb::ResignResponse>, Status> {
        Ok(Response::new(
            self.backend
                .resign(req.into_inner())
                .await
                .map_err(as_recipe)?,
        ))
    }
}
