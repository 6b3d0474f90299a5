//! The Watch service: one bidirectional stream carrying many watches.
//!
//! A [`WatchSession`] runs per stream, on the node the client is connected to, and reads only
//! the local replica. Each watch remembers the next revision it owes the client (`next`). The
//! session wakes on the state machine's event feed and replays history from the store
//! (`Store::events`) from `next` on, so a watch started in the past, one that fell behind, and
//! one that is live are the same code path and cannot skip a revision.
//!
//! Semantics, as etcd 3.4 (`etcdserver/api/v3rpc/watch.go`, `mvcc/watcher.go`):
//! - the first response of a watch has `created: true` and the current revision;
//! - `watch_id: 0` asks the server for an id; a client-chosen id already in use is refused with
//!   `created: true, canceled: true, watch_id: -1` and etcd's reason; so is an empty range;
//! - `start_revision: 0` means "from the next revision"; a past one replays history; a future one
//!   waits; one below the compacted revision gets a response with `compact_revision` set and
//!   `canceled: true`, and the watch ends;
//! - events are in revision order with no gaps, and a revision is never split across
//!   responses, except with `fragment: true` when a response would exceed the size limit;
//! - a progress request is answered with `watch_id: -1` and the current revision;
//! - cancelling an unknown id is silently ignored.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use eden_storage as st;
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::kv::kv_to_pb;
use super::pb::etcdserverpb as pb;
use super::pb::mvccpb;
use super::Backend;

/// Revisions replayed per store read while catching up.
const REPLAY_CHUNK: usize = 256;
/// A fragmenting watch splits responses above this many bytes (etcd's default
/// `--max-request-bytes`, 1.5 MiB).
const FRAGMENT_BYTES: usize = 3 * 512 * 1024;
/// etcd's default `--experimental-watch-progress-notify-interval`.
pub const DEFAULT_PROGRESS_NOTIFY: std::time::Duration = std::time::Duration::from_secs(600);
/// Responses buffered towards a slow client before the session waits for it.
const OUT_BUFFER: usize = 64;

const ERR_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
const ERR_EMPTY_RANGE: &str = "mvcc: watcher range is empty";

pub struct WatchService {
    backend: Arc<Backend>,
}

impl WatchService {
    pub fn new(backend: Arc<Backend>) -> WatchService {
        WatchService { backend }
    }
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

/// Starts a session over `requests` and returns its responses.
pub fn start_session<S>(backend: Arc<Backend>, requests: S) -> WatchStream
where
    S: Stream<Item = Result<pb::WatchRequest, Status>> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel(OUT_BUFFER);
    // Subscribe before the session reads its first request, so no revision applied after a
    // watch is created can be missed.
    let feed = backend.node.subscribe();
    tokio::spawn(async move {
        let mut session = WatchSession {
            backend,
            out: tx,
            watches: BTreeMap::new(),
            next_auto_id: 0,
        };
        session.run(requests, feed).await;
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(start_session(
            self.backend.clone(),
            req.into_inner(),
        )))
    }
}

struct Watch {
    key: Vec<u8>,
    range_end: Vec<u8>,
    /// The next revision this watch owes the client.
    next: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    fragment: bool,
    /// Created with `progress_notify`: told the current revision every progress interval
    /// while caught up.
    progress_notify: bool,
    /// No events went out for this watch since the last progress tick (etcd skips one
    /// notification after events, as they carried the revision already).
    progress_due: bool,
}

impl Watch {
    fn matches(&self, key: &[u8]) -> bool {
        if self.range_end.is_empty() {
            key == self.key.as_slice()
        } else if self.range_end == [0] {
            key >= self.key.as_slice()
        } else {
            key >= self.key.as_slice() && key < self.range_end.as_slice()
        }
    }

    fn wants(&self, kind: st::EventKind, key: &[u8]) -> bool {
        match kind {
            st::EventKind::Put if self.no_put => false,
            st::EventKind::Delete if self.no_delete => false,
            _ => self.matches(key),
        }
    }
}

struct WatchSession {
    backend: Arc<Backend>,
    out: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    watches: BTreeMap<i64, Watch>,
    next_auto_id: i64,
}

/// The client went away; the session ends.
struct Gone;

impl WatchSession {
    async fn run<S>(&mut self, mut requests: S, mut feed: eden_raft::EventFeed)
    where
        S: Stream<Item = Result<pb::WatchRequest, Status>> + Unpin,
    {
        // A client that closes its side still gets its watches' events, as from etcd, until it
        // goes away.
        let mut reading = true;
        let every = self.backend.watch_progress_notify_interval();
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = progress.tick() => {
                    if self.notify_progress().await.is_err() {
                        return;
                    }
                    continue;
                }
                req = requests.next(), if reading => match req {
                    Some(Ok(req)) => {
                        if self.handle(req).await.is_err() {
                            return;
                        }
                    }
                    None => reading = false,
                    // The stream broke, or a message could not be read (too large): the
                    // stream ends with that status, as etcd's does.
                    Some(Err(status)) => {
                        let status = super::limits::grpc_go_status(&status).unwrap_or(status);
                        let _ = self.out.send(Err(status)).await;
                        return;
                    }
                },
                got = feed.recv() => match got {
                    // A new revision, or we fell behind the feed: either way the store has
                    // what we owe, and `pump` reads it from there.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = self.out.closed() => return,
                // Retired from Raft: the local replica stops following, so the stream ends
                // and the client watches through another endpoint.
                _ = self.backend.stopped_serving() => {
                    let _ = self
                        .out
                        .send(Err(Status::unavailable(super::NOT_SERVING)))
                        .await;
                    return;
                }
            }
            // Drain anything else already queued on the feed: one pump covers it all.
            while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = feed.try_recv() {}
            if self.pump().await.is_err() {
                return;
            }
        }
    }

    /// etcd's progress notification tick: each `progress_notify` watch that is caught up and
    /// got no events since the last tick is sent the current revision (no events, its id);
    /// then every such watch is due again.
    async fn notify_progress(&mut self) -> Result<(), Gone> {
        let current = self.backend.node.store().revision();
        let due: Vec<i64> = self
            .watches
            .iter()
            .filter(|(_, w)| w.progress_notify && w.progress_due && w.next > current)
            .map(|(id, _)| *id)
            .collect();
        for w in self.watches.values_mut() {
            w.progress_due = true;
        }
        for id in due {
            self.send(pb::WatchResponse {
                header: self.backend.header(current),
                watch_id: id,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }

    async fn send(&self, resp: pb::WatchResponse) -> Result<(), Gone> {
        self.out.send(Ok(resp)).await.map_err(|_| Gone)
    }

    async fn handle(&mut self, req: pb::WatchRequest) -> Result<(), Gone> {
        use pb::watch_request::RequestUnion as U;
        match req.request_union {
            Some(U::CreateRequest(c)) => self.create(c).await,
            Some(U::CancelRequest(c)) => {
                if self.watches.remove(&c.watch_id).is_some() {
                    self.send(pb::WatchResponse {
                        header: self.backend.header_now(),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    })
                    .await?;
                }
                Ok(())
            }
            Some(U::ProgressRequest(_)) => {
                // A progress answer promises every event up to its revision was sent: send
                // what a revision that landed meanwhile owes first (etcd #15220).
                let header = self.backend.header_now();
                self.pump().await?;
                self.send(pb::WatchResponse {
                    header,
                    watch_id: -1,
                    ..Default::default()
                })
                .await
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, mut c: pb::WatchCreateRequest) -> Result<(), Gone> {
        use pb::watch_create_request::FilterType;
        if c.key.is_empty() {
            // As etcd: an empty key means "\0", the smallest key.
            c.key = vec![0];
        }
        let store = self.backend.node.store();
        let current = store.revision();
        let refuse = |reason: &str| pb::WatchResponse {
            header: self.backend.header(current),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        };
        let ranged = !c.range_end.is_empty() && c.range_end != [0];
        if ranged && c.key >= c.range_end {
            return self.send(refuse(ERR_EMPTY_RANGE)).await;
        }
        let id = if c.watch_id == 0 {
            while self.watches.contains_key(&self.next_auto_id) {
                self.next_auto_id += 1;
            }
            self.next_auto_id += 1;
            self.next_auto_id - 1
        } else if self.watches.contains_key(&c.watch_id) {
            return self.send(refuse(ERR_DUPLICATE_ID)).await;
        } else {
            c.watch_id
        };
        let filters: Vec<FilterType> = c
            .filters
            .iter()
            .filter_map(|f| FilterType::try_from(*f).ok())
            .collect();
        let watch = Watch {
            next: if c.start_revision > 0 {
                c.start_revision
            } else {
                current + 1
            },
            key: c.key,
            range_end: c.range_end,
            prev_kv: c.prev_kv,
            no_put: filters.contains(&FilterType::Noput),
            no_delete: filters.contains(&FilterType::Nodelete),
            fragment: c.fragment,
            progress_notify: c.progress_notify,
            progress_due: true,
        };
        self.watches.insert(id, watch);
        self.send(pb::WatchResponse {
            header: self.backend.header(current),
            watch_id: id,
            created: true,
            ..Default::default()
        })
        .await?;
        // A watch starting in the past replays at once.
        self.pump().await
    }

    /// Sends every watch what it is owed, up to the store's current revision.
    async fn pump(&mut self) -> Result<(), Gone> {
        let ids: Vec<i64> = self.watches.keys().copied().collect();
        for id in ids {
            loop {
                let store = self.backend.node.store().clone();
                let current = store.revision();
                let Some(watch) = self.watches.get_mut(&id) else {
                    break;
                };
                if watch.next > current {
                    break;
                }
                let from = watch.next;
                // Only this watch's events are decoded in full, with their previous values
                // only if it asked for them.
                let replayed = match store.events_matching(
                    from,
                    REPLAY_CHUNK,
                    |kind, key| watch.wants(kind, key),
                    watch.prev_kv,
                ) {
                    Ok(r) => r,
                    Err(st::Error::Compacted) => {
                        let compact = store.compact_revision();
                        self.watches.remove(&id);
                        // etcd sends this cancel with header revision 0.
                        self.send(pb::WatchResponse {
                            header: self.backend.header(0),
                            watch_id: id,
                            canceled: true,
                            compact_revision: compact,
                            ..Default::default()
                        })
                        .await?;
                        break;
                    }
                    Err(e) => {
                        tracing::error!("watch {id}: reading history from {from} failed: {e}");
                        self.watches.remove(&id);
                        // etcd sends this cancel with header revision 0.
                        self.send(pb::WatchResponse {
                            header: self.backend.header(0),
                            watch_id: id,
                            canceled: true,
                            cancel_reason: e.to_string(),
                            ..Default::default()
                        })
                        .await?;
                        break;
                    }
                };
                // The read covered [from, from + REPLAY_CHUNK) up to the revision at the time
                // of the read, which is at least `current`; revisions without events (lease
                // bookkeeping, compaction) are covered too.
                let covered = (from + REPLAY_CHUNK as i64).min(current + 1);
                let last = replayed.last().map_or(0, |(rev, _)| *rev);
                watch.next = covered.max(last + 1);
                let mut events = Vec::new();
                for (_, evs) in replayed {
                    for e in evs {
                        events.push(event_to_pb(e, watch.prev_kv));
                    }
                }
                let fragment = watch.fragment;
                if !events.is_empty() {
                    watch.progress_due = false;
                    let header = self.backend.header(current);
                    for resp in responses(id, header, events, fragment) {
                        self.send(resp).await?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn event_to_pb(e: st::Event, with_prev: bool) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            st::EventKind::Put => mvccpb::event::EventType::Put as i32,
            st::EventKind::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(kv_to_pb(e.kv)),
        prev_kv: if with_prev {
            e.prev_kv.map(kv_to_pb)
        } else {
            None
        },
    }
}

/// One response, or with `fragment` several whose bodies stay under [`FRAGMENT_BYTES`]; all but
/// the last have `fragment: true`.
fn responses(
    id: i64,
    header: Option<pb::ResponseHeader>,
    events: Vec<mvccpb::Event>,
    fragment: bool,
) -> Vec<pb::WatchResponse> {
    let whole = pb::WatchResponse {
        header,
        watch_id: id,
        events,
        ..Default::default()
    };
    if !fragment || whole.encoded_len() <= FRAGMENT_BYTES {
        return vec![whole];
    }
    let mut out = Vec::new();
    let mut current = pb::WatchResponse {
        header,
        watch_id: id,
        fragment: true,
        ..Default::default()
    };
    let mut size = 0;
    for e in whole.events {
        let len = e.encoded_len();
        if !current.events.is_empty() && size + len > FRAGMENT_BYTES {
            let next = pb::WatchResponse {
                header,
                watch_id: id,
                fragment: true,
                ..Default::default()
            };
            out.push(std::mem::replace(&mut current, next));
            size = 0;
        }
        size += len;
        current.events.push(e);
    }
    current.fragment = false;
    out.push(current);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: &str, value_len: usize) -> mvccpb::Event {
        mvccpb::Event {
            kv: Some(mvccpb::KeyValue {
                key: key.as_bytes().to_vec(),
                value: vec![b'x'; value_len],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn small_responses_are_never_fragmented() {
        let r = responses(7, None, vec![event("a", 10), event("b", 10)], true);
        assert_eq!(r.len(), 1);
        assert!(!r[0].fragment);
        assert_eq!(r[0].events.len(), 2);
    }

    #[test]
    fn large_responses_fragment_only_when_asked() {
        let big: Vec<_> = (0..4).map(|i| event(&format!("k{i}"), 1 << 20)).collect();
        assert_eq!(responses(1, None, big.clone(), false).len(), 1);
        let parts = responses(1, None, big, true);
        assert_eq!(parts.len(), 4);
        let flags: Vec<bool> = parts.iter().map(|p| p.fragment).collect();
        assert_eq!(flags, vec![true, true, true, false]);
        let keys: Vec<Vec<u8>> = parts
            .iter()
            .flat_map(|p| p.events.iter().map(|e| e.kv.as_ref().unwrap().key.clone()))
            .collect();
        assert_eq!(
            keys,
            vec![
                b"k0".to_vec(),
                b"k1".to_vec(),
                b"k2".to_vec(),
                b"k3".to_vec()
            ]
        );
    }

    #[test]
    fn ranges_match_like_etcd() {
        let w = |key: &str, end: &[u8]| Watch {
            key: key.as_bytes().to_vec(),
            range_end: end.to_vec(),
            next: 1,
            prev_kv: false,
            no_put: false,
            no_delete: false,
            fragment: false,
            progress_notify: false,
            progress_due: false,
        };
        assert!(w("a", b"").matches(b"a"));
        assert!(!w("a", b"").matches(b"ab"));
        assert!(w("a", b"\0").matches(b"zzz"));
        assert!(!w("b", b"\0").matches(b"a"));
        assert!(w("a", b"c").matches(b"b"));
        assert!(!w("a", b"c").matches(b"c"));
    }
}
