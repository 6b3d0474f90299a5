//! The etcd client the agent, the run controller and the CLI share. It speaks only the etcd v3
//! API (KV, Watch, Lease), so everything above it also works against a stock etcd.
//!
//! - Requests go to a balanced channel over every known endpoint; a request that fails because a
//!   node is down or has no leader yet is retried for [`RETRY_FOR`] (reads, guarded txns and
//!   puts of whole values are safe to repeat).
//! - [`Kv::watch`] keeps a watch alive across node failures: when a stream breaks it is opened
//!   again from the revision after the last one delivered, so no event is lost or repeated.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::error::{Error, Result};
use crate::etcd::pb::etcdserverpb as pb;
use crate::etcd::pb::mvccpb;

pub use mvccpb::KeyValue;

/// How long a failing request is retried before its error is returned.
pub const RETRY_FOR: Duration = Duration::from_secs(20);

/// One change seen by a watch.
#[derive(Debug, Clone)]
pub struct Event {
    pub put: bool,
    pub kv: KeyValue,
}

/// A handle to the cluster's store. Cheap to clone.
#[derive(Clone)]
pub struct Kv {
    channel: Channel,
    endpoints: std::sync::Arc<std::sync::Mutex<Endpoints>>,
}

/// The endpoints the balanced channel uses, so they can be changed while it runs.
struct Endpoints {
    urls: std::collections::BTreeSet<String>,
    tls: Option<ClientTlsConfig>,
    changes: mpsc::Sender<Change<String, Endpoint>>,
}

fn endpoint(url: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint> {
    let mut e = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::InvalidInput(format!("bad endpoint {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        e = e
            .tls_config(tls.clone())
            .map_err(|e| Error::InvalidInput(format!("TLS for {url}: {e}")))?;
    }
    Ok(e)
}

/// `prefix`'s range end: the key after every key that starts with it.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    ) || s.message().contains("leader")
}

fn status_error(what: &str, s: Status) -> Error {
    match s.code() {
        Code::NotFound => Error::NotFound(format!("{what}: {}", s.message())),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            Error::InvalidInput(format!("{what}: {}", s.message()))
        }
        _ => Error::Unavailable(format!("{what}: {}", s.message())),
    }
}

impl Kv {
    /// A client for `urls` (`https://H:P` with `tls`, or `http://H:P`). Connects lazily: an
    /// endpoint that is down is skipped while others answer.
    pub fn new(urls: &[String], tls: Option<&ClientTlsConfig>) -> Result<Kv> {
        if urls.is_empty() {
            return Err(Error::InvalidInput("no etcd endpoint given".into()));
        }
        let (channel, changes) = Channel::balance_channel::<String>(64);
        let mut set = std::collections::BTreeSet::new();
        for url in urls {
            let e = endpoint(url, tls)?;
            changes
                .try_send(Change::Insert(url.clone(), e))
                .map_err(|e| Error::Internal(format!("adding endpoint {url}: {e}")))?;
            set.insert(url.clone());
        }
        Ok(Kv {
            channel,
            endpoints: std::sync::Arc::new(std::sync::Mutex::new(Endpoints {
                urls: set,
                tls: tls.cloned(),
                changes,
            })),
        })
    }

    /// The endpoints in use.
    pub fn endpoints(&self) -> Vec<String> {
        let e = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        e.urls.iter().cloned().collect()
    }

    /// Uses exactly `urls` from now on (ignored when empty). True if anything changed.
    pub fn set_endpoints(&self, urls: &[String]) -> Result<bool> {
        if urls.is_empty() {
            return Ok(false);
        }
        let mut e = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let want: std::collections::BTreeSet<String> = urls.iter().cloned().collect();
        if want == e.urls {
            return Ok(false);
        }
        for url in want.difference(&e.urls) {
            let ep = endpoint(url, e.tls.as_ref())?;
            e.changes
                .try_send(Change::Insert(url.clone(), ep))
                .map_err(|err| Error::Internal(format!("adding endpoint {url}: {err}")))?;
        }
        for url in e.urls.difference(&want) {
            e.changes
                .try_send(Change::Remove(url.clone()))
                .map_err(|err| Error::Internal(format!("removing endpoint {url}: {err}")))?;
        }
        e.urls = want;
        Ok(true)
    }

    /// Runs `op` until it succeeds, fails for a reason retrying cannot fix, or [`RETRY_FOR`]
    /// has passed.
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        let deadline = tokio::time::Instant::now() + RETRY_FOR;
        let mut pause = Duration::from_millis(20);
        loop {
            match op(self.channel.clone()).await {
                Ok(v) => return Ok(v),
                Err(s) if retryable(&s) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!("{what}: {} (retrying)", s.message());
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(s) if retryable(&s) => {
                    return Err(Error::Unavailable(format!(
                        "{what}: {} (no datastore node at {} answered for {}s; is the cluster \
                         up and does it have a leader? see `eden cluster status`)",
                        s.message(),
                        self.endpoints().join(","),
                        RETRY_FOR.as_secs()
                    )))
                }
                Err(s) => return Err(status_error(what, s)),
            }
        }
    }

    /// The value of `key` and its mod revision.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let r = self
            .range(pb::RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })
            .await?;
        Ok(r.kvs.into_iter().next())
    }

    /// Every key under `prefix`, in key order, and the store's revision when read.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let r = self
            .range(pb::RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                ..Default::default()
            })
            .await?;
        Ok((r.kvs, r.header.map(|h| h.revision).unwrap_or(0)))
    }

    /// How many keys are under `prefix`.
    pub async fn count(&self, prefix: &str) -> Result<i64> {
        let r = self
            .range(pb::RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                count_only: true,
                ..Default::default()
            })
            .await?;
        Ok(r.count)
    }

    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse> {
        self.retry("reading the store", |ch| {
            let req = req.clone();
            async move {
                pb::kv_client::KvClient::new(ch)
                    .range(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Puts `key`; returns the revision of the write.
    pub async fn put(&self, key: &str, value: impl Into<Vec<u8>>, lease: i64) -> Result<i64> {
        let req = pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.into(),
            lease,
            ..Default::default()
        };
        let r = self
            .retry(&format!("writing {key}"), |ch| {
                let req = req.clone();
                async move {
                    pb::kv_client::KvClient::new(ch)
                        .put(req)
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        Ok(r.header.map(|h| h.revision).unwrap_or(0))
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        let req = pb::DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        self.retry(&format!("deleting {key}"), |ch| {
            let req = req.clone();
            async move {
                pb::kv_client::KvClient::new(ch)
                    .delete_range(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await?;
        Ok(())
    }

    pub async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse> {
        self.retry("a transaction on the store", |ch| {
            let req = req.clone();
            async move {
                pb::kv_client::KvClient::new(ch)
                    .txn(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Puts `key` only if it does not exist. True if this call created it.
    pub async fn create(&self, key: &str, value: impl Into<Vec<u8>>, lease: i64) -> Result<bool> {
        let r = self
            .txn(pb::TxnRequest {
                compare: vec![absent(key)],
                success: vec![put_op(key, value.into(), lease)],
                failure: vec![],
            })
            .await?;
        Ok(r.succeeded)
    }

    /// A lease of `ttl` seconds; its id.
    pub async fn grant(&self, ttl: i64) -> Result<i64> {
        let r = self
            .retry("granting a lease", |ch| async move {
                pb::lease_client::LeaseClient::new(ch)
                    .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                    .await
                    .map(|r| r.into_inner())
            })
            .await?;
        if !r.error.is_empty() {
            return Err(Error::Unavailable(format!("granting a lease: {}", r.error)));
        }
        Ok(r.id)
    }

    /// Renews `lease` once. False if the lease no longer exists.
    pub async fn keep_alive_once(&self, lease: i64) -> Result<bool> {
        let r = self
            .retry("renewing a lease", |ch| async move {
                let (tx, rx) = mpsc::channel(1);
                let _ = tx.send(pb::LeaseKeepAliveRequest { id: lease }).await;
                let mut stream = pb::lease_client::LeaseClient::new(ch)
                    .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                let r = stream.message().await?;
                drop(tx);
                Ok(r.map(|r| r.ttl > 0).unwrap_or(false))
            })
            .await?;
        Ok(r)
    }

    /// Revokes `lease` (its keys are deleted).
    pub async fn revoke(&self, lease: i64) -> Result<()> {
        self.retry("revoking a lease", |ch| async move {
            pb::lease_client::LeaseClient::new(ch)
                .lease_revoke(pb::LeaseRevokeRequest { id: lease })
                .await
                .map(|r| r.into_inner())
        })
        .await?;
        Ok(())
    }

    /// Watches every key under `prefix` from revision `from` (0: from now). Events arrive in
    /// revision order; the watch is opened again after a broken stream, from where it stopped.
    /// The receiver ends only when dropped, or with an error if the history it needs has been
    /// compacted.
    pub fn watch(&self, prefix: &str, from: i64) -> mpsc::Receiver<Result<Vec<Event>>> {
        let (tx, rx) = mpsc::channel(64);
        let channel = self.channel.clone();
        let key = prefix.as_bytes().to_vec();
        let range_end = prefix_end(&key);
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let mut next = from;
            loop {
                let (req_tx, req_rx) = mpsc::channel(1);
                let create = pb::WatchRequest {
                    request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                        pb::WatchCreateRequest {
                            key: key.clone(),
                            range_end: range_end.clone(),
                            start_revision: next,
                            ..Default::default()
                        },
                    )),
                };
                // Queued before the call: some servers answer headers only with a message.
                let _ = req_tx.send(create).await;
                let stream = pb::watch_client::WatchClient::new(channel.clone())
                    .watch(tokio_stream::wrappers::ReceiverStream::new(req_rx))
                    .await;
                let mut stream = match stream {
                    Ok(s) => s.into_inner(),
                    Err(e) => {
                        tracing::debug!(%prefix, "opening a watch: {}", e.message());
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                while let Ok(Some(r)) = stream.message().await {
                    if r.compact_revision > 0 {
                        let _ = tx
                            .send(Err(Error::Unavailable(format!(
                                "watching {prefix}: history before revision {} was compacted",
                                r.compact_revision
                            ))))
                            .await;
                        return;
                    }
                    if r.canceled {
                        break;
                    }
                    if r.events.is_empty() {
                        continue;
                    }
                    let events: Vec<Event> = r
                        .events
                        .into_iter()
                        .filter_map(|e| {
                            let put = e.r#type == mvccpb::event::EventType::Put as i32;
                            e.kv.map(|kv| Event { put, kv })
                        })
                        .collect();
                    if let Some(last) = events.last() {
                        next = last.kv.mod_revision + 1;
                    }
                    if tx.send(Ok(events)).await.is_err() {
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
                drop(req_tx);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        rx
    }
}

/// A compare that holds when `key` does not exist.
pub fn absent(key: impl AsRef<[u8]>) -> pb::Compare {
    created_at(key, 0)
}

/// A compare that holds when `key` was created at revision `rev` (0: does not exist).
pub fn created_at(key: impl AsRef<[u8]>, rev: i64) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal as i32,
        target: pb::compare::CompareTarget::Create as i32,
        key: key.as_ref().to_vec(),
        target_union: Some(pb::compare::TargetUnion::CreateRevision(rev)),
        range_end: vec![],
    }
}

/// A compare that holds when `key` was last written at `rev`.
pub fn unchanged_since(key: &str, rev: i64) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal as i32,
        target: pb::compare::CompareTarget::Mod as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(pb::compare::TargetUnion::ModRevision(rev)),
        range_end: vec![],
    }
}

pub fn put_op(key: impl AsRef<[u8]>, value: Vec<u8>, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.as_ref().to_vec(),
            value,
            lease,
            ..Default::default()
        })),
    }
}

pub fn delete_op(key: impl AsRef<[u8]>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: key.as_ref().to_vec(),
                ..Default::default()
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/eden/"), b"/eden0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
