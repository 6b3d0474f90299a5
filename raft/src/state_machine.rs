//! [`StateMachine`]: applies committed Raft entries to the eden-storage [`Store`], and builds and
//! installs snapshots through the store's export/import.
//!
//! ## Contract
//! - **Deterministic.** Applying reads nothing but the entries and the store: no clock, no
//!   randomness, no node-local configuration. Every replica ends with the same keyspace.
//! - **Atomic with its position.** Each `Store::apply` batch also writes, in the same atomic batch,
//!   the last applied log id and the last membership (store `meta` keys `raft/applied` and
//!   `raft/membership`). After a crash the store is at some whole batch, and openraft re-applies
//!   the entries after the recorded position from the log. Nothing is applied twice.
//! - **Not fsynced per apply.** The log is what makes a write durable; the store catches up from
//!   it. The store is flushed before a snapshot is taken, since the log before a snapshot may be
//!   purged.
//! - **Events.** After a batch is applied, the events of each revision it created are published
//!   on a broadcast feed as [`RevisionEvents`], in revision order. A snapshot install publishes
//!   the history it brought (`Store::events`) the same way. A receiver that falls behind gets
//!   `Lagged`, and one that sees a revision gap (history compacted away) must resync from the
//!   store.
//! - **Snapshots** are files in `snapshot_dir`: `<id>.snap` holds the store export, `current.meta`
//!   names the latest. Building one holds the apply lock, so the export and its meta agree.
//!
//! It does not decide what to write (the proposer and the node do) and does not talk to peers.

use std::fs;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use eden_storage::{Command, Event, Revision, Store};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};
use tokio::sync::broadcast;

use crate::codec::{decode, encode};
use crate::types::*;

const META_APPLIED: &[u8] = b"raft/applied";
const META_MEMBERSHIP: &[u8] = b"raft/membership";
const CURRENT_META: &str = "current.meta";
/// How many revisions' events the feed buffers for a slow receiver before it reports `Lagged`.
const FEED_CAPACITY: usize = 4096;
/// Entries applied in one store batch at most (a follower catching up gets thousands at once).
const APPLY_CHUNK: usize = 512;

/// The events of one revision, published after it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionEvents {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// A receiver of the event feed.
pub type EventFeed = broadcast::Receiver<Arc<RevisionEvents>>;

fn sm_err(verb: ErrorVerb, msg: impl ToString) -> StorageError {
    StorageIOError::new(
        ErrorSubject::StateMachine,
        verb,
        openraft::AnyError::error(msg.to_string()),
    )
    .into()
}

fn snap_err(verb: ErrorVerb, msg: impl ToString) -> StorageError {
    StorageIOError::new(
        ErrorSubject::Snapshot(None),
        verb,
        openraft::AnyError::error(msg.to_string()),
    )
    .into()
}

struct Shared {
    store: Arc<Store>,
    snapshot_dir: PathBuf,
    /// Serializes apply, snapshot build and snapshot install. A std mutex: it is only taken in
    /// blocking sections, never across an await.
    lock: Mutex<()>,
    feed: broadcast::Sender<Arc<RevisionEvents>>,
    seq: AtomicU64,
}

/// The state machine handed to openraft. Cloning shares it.
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

/// Builds a snapshot of the state machine it came from.
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
}

impl StateMachine {
    /// A state machine over `store`, keeping snapshot files in `snapshot_dir` (created if
    /// missing; half-written files from a crash are removed).
    pub fn new(store: Arc<Store>, snapshot_dir: &Path) -> Result<StateMachine, crate::Error> {
        fs::create_dir_all(snapshot_dir)?;
        for item in fs::read_dir(snapshot_dir)? {
            let path = item?.path();
            if path.extension().is_some_and(|e| e == "part") {
                fs::remove_file(&path)?;
            }
        }
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        Ok(StateMachine {
            shared: Arc::new(Shared {
                store,
                snapshot_dir: snapshot_dir.to_path_buf(),
                lock: Mutex::new(()),
                feed,
                seq: AtomicU64::new(0),
            }),
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// A new receiver of the event feed; it sees revisions applied from now on.
    pub fn subscribe(&self) -> EventFeed {
        self.shared.feed.subscribe()
    }
}

impl Shared {
    fn locked(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn applied_state(&self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let meta = |key| self.store.meta(key).map_err(|e| sm_err(ErrorVerb::Read, e));
        let applied = match meta(META_APPLIED)? {
            Some(b) => decode::<Option<LogId>>(&b).map_err(|e| sm_err(ErrorVerb::Read, e))?,
            None => None,
        };
        let membership = match meta(META_MEMBERSHIP)? {
            Some(b) => decode::<StoredMembership>(&b).map_err(|e| sm_err(ErrorVerb::Read, e))?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    fn publish(&self, revision: Revision, events: Vec<Event>) {
        // No receivers is fine: nobody watches yet.
        let _ = self
            .feed
            .send(Arc::new(RevisionEvents { revision, events }));
    }

    /// Applies a run of entries in one store batch.
    fn apply_chunk(&self, entries: Vec<Entry>) -> Result<Vec<BatchResponse>, StorageError> {
        let Some(last) = entries.last() else {
            return Ok(Vec::new());
        };
        let last_log_id = last.log_id;
        let mut cmds: Vec<Command> = Vec::new();
        let mut spans = Vec::with_capacity(entries.len());
        let mut membership = None;
        for entry in entries {
            let start = cmds.len();
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => cmds.extend(batch.0),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                }
            }
            spans.push(start..cmds.len());
        }
        let mut meta = vec![(
            META_APPLIED.to_vec(),
            encode(&Some(last_log_id)).map_err(|e| sm_err(ErrorVerb::Write, e))?,
        )];
        if let Some(m) = &membership {
            meta.push((
                META_MEMBERSHIP.to_vec(),
                encode(m).map_err(|e| sm_err(ErrorVerb::Write, e))?,
            ));
        }
        let results = self.store.apply(&cmds, &meta).map_err(|e| {
            StorageError::from(StorageIOError::apply(
                last_log_id,
                openraft::AnyError::new(&e),
            ))
        })?;
        if let Some(e) = self.store.take_maintenance_error() {
            tracing::warn!(
                "could not rewrite the store's data file to drop its garbage (the writes are \
                 applied; it is tried again later): {e}"
            );
        }
        let mut per_command = Vec::with_capacity(results.len());
        for result in results {
            match result {
                Ok((applied, events)) => {
                    if !events.is_empty() {
                        self.publish(applied.revision, events);
                    }
                    per_command.push(Ok(applied));
                }
                Err(e) => match Rejection::from_store(&e) {
                    Some(r) => per_command.push(Err(r)),
                    None => {
                        return Err(
                            StorageIOError::apply(last_log_id, openraft::AnyError::new(&e)).into(),
                        )
                    }
                },
            }
        }
        let mut per_command = per_command.into_iter();
        Ok(spans
            .into_iter()
            .map(|span| BatchResponse(per_command.by_ref().take(span.len()).collect()))
            .collect())
    }

    fn snap_path(&self, id: &str) -> PathBuf {
        self.snapshot_dir.join(format!("{id}.snap"))
    }

    fn unique(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Records `meta` as the current snapshot (atomically, durably) and removes older files.
    fn set_current(&self, meta: &SnapshotMeta) -> Result<(), StorageError> {
        let werr = |e: std::io::Error| snap_err(ErrorVerb::Write, e);
        let bytes = encode(meta).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let tmp = self
            .snapshot_dir
            .join(format!("{CURRENT_META}.{}.part", self.unique()));
        let mut f = fs::File::create(&tmp).map_err(werr)?;
        f.write_all(&bytes).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        fs::rename(&tmp, self.snapshot_dir.join(CURRENT_META)).map_err(werr)?;
        fs::File::open(&self.snapshot_dir)
            .and_then(|d| d.sync_all())
            .map_err(werr)?;
        let keep = format!("{}.snap", meta.snapshot_id);
        for item in fs::read_dir(&self.snapshot_dir).map_err(werr)? {
            let path = item.map_err(werr)?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if name.ends_with(".snap") && name != keep {
                // An open handle (a snapshot being sent) keeps the data until it is closed.
                fs::remove_file(&path).map_err(werr)?;
            }
        }
        Ok(())
    }

    fn current(&self) -> Result<Option<(SnapshotMeta, fs::File)>, StorageError> {
        let rerr = |e: std::io::Error| snap_err(ErrorVerb::Read, e);
        let bytes = match fs::read(self.snapshot_dir.join(CURRENT_META)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(rerr(e)),
        };
        let meta: SnapshotMeta = decode(&bytes).map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let file = fs::File::open(self.snap_path(&meta.snapshot_id)).map_err(rerr)?;
        Ok(Some((meta, file)))
    }

    fn build(&self) -> Result<(SnapshotMeta, fs::File), StorageError> {
        let werr = |e: std::io::Error| snap_err(ErrorVerb::Write, e);
        let guard = self.locked();
        // The log up to this snapshot may be purged once it exists, so the store must hold it.
        self.store
            .flush()
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let (last_log_id, last_membership) = self.applied_state()?;
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.unique()),
            None => format!("0-0-{}", self.unique()),
        };
        let tmp = self.snapshot_dir.join(format!("{snapshot_id}.part"));
        let mut file = fs::File::create(&tmp).map_err(werr)?;
        {
            let mut w = BufWriter::new(&mut file);
            self.store
                .export_snapshot(&mut w)
                .map_err(|e| snap_err(ErrorVerb::Write, e))?;
            w.flush().map_err(werr)?;
        }
        file.sync_all().map_err(werr)?;
        drop(file);
        let path = self.snap_path(&snapshot_id);
        fs::rename(&tmp, &path).map_err(werr)?;
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        self.set_current(&meta)?;
        drop(guard);
        let file = fs::File::open(&path).map_err(werr)?;
        Ok((meta, file))
    }

    fn install(&self, meta: &SnapshotMeta, mut data: fs::File) -> Result<(), StorageError> {
        let werr = |e: std::io::Error| snap_err(ErrorVerb::Write, e);
        // Keep our own copy: the received data may be a file we do not own.
        let tmp = self
            .snapshot_dir
            .join(format!("{}.{}.part", meta.snapshot_id, self.unique()));
        data.seek(SeekFrom::Start(0)).map_err(werr)?;
        let mut copy = fs::File::create(&tmp).map_err(werr)?;
        std::io::copy(&mut data, &mut copy).map_err(werr)?;
        copy.sync_all().map_err(werr)?;
        drop(copy);
        // The lock comes before the rename: a snapshot built meanwhile ends in `set_current`,
        // which removes every `.snap` but its own, this one included if it were already there.
        let _guard = self.locked();
        let path = self.snap_path(&meta.snapshot_id);
        fs::rename(&tmp, &path).map_err(werr)?;
        let before = self.store.revision();
        let mut reader: Box<dyn Read> =
            Box::new(BufReader::new(fs::File::open(&path).map_err(werr)?));
        self.store
            .import_snapshot(&mut reader)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        // The export already carries these, but the meta given to us is authoritative.
        let position = vec![
            (
                META_APPLIED.to_vec(),
                encode(&meta.last_log_id).map_err(|e| snap_err(ErrorVerb::Write, e))?,
            ),
            (
                META_MEMBERSHIP.to_vec(),
                encode(&meta.last_membership).map_err(|e| snap_err(ErrorVerb::Write, e))?,
            ),
        ];
        self.store
            .apply(&[], &position)
            .and_then(|_| self.store.flush())
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        self.set_current(meta)?;
        self.publish_history(before + 1);
        Ok(())
    }

    /// Publishes the retained history from `from` to the current revision.
    fn publish_history(&self, mut from: Revision) {
        let until = self.store.revision();
        while from <= until {
            match self.store.events(from, 1024) {
                Ok(revs) if revs.is_empty() => break,
                Ok(revs) => {
                    from = revs.last().map(|(r, _)| r + 1).unwrap_or(until + 1);
                    for (rev, events) in revs {
                        self.publish(rev, events);
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        from,
                        "snapshot install: history not replayed to watchers: {e}"
                    );
                    break;
                }
            }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let shared = self.shared.clone();
        let (meta, file) = tokio::task::spawn_blocking(move || shared.build())
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))??;
        tracing::info!(snapshot = %meta, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.shared.applied_state()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Store::apply is in-memory work plus one unsynced write (no fsync): tens of
        // microseconds for a typical entry. It runs right here, on the state machine's task:
        // handing it to the blocking pool cost a thread wake-up and a context switch per apply,
        // more than the work itself. A follower catching up gets thousands of entries at once,
        // so the runtime's other tasks get a turn between chunks.
        let shared = &self.shared;
        let mut out = Vec::new();
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<Entry> = entries.by_ref().take(APPLY_CHUNK).collect();
            {
                let _guard = shared.locked();
                out.extend(shared.apply_chunk(chunk)?);
            }
            if entries.peek().is_some() {
                tokio::task::yield_now().await;
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self
            .shared
            .snapshot_dir
            .join(format!("incoming-{}.part", self.shared.unique()));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let file = snapshot.into_std().await;
        let shared = self.shared.clone();
        let meta_owned = meta.clone();
        tokio::task::spawn_blocking(move || shared.install(&meta_owned, file))
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))??;
        // The received chunks are in our copy now.
        if let Ok(dir) = fs::read_dir(&self.shared.snapshot_dir) {
            for item in dir.flatten() {
                let name = item.file_name().to_string_lossy().to_string();
                if name.starts_with("incoming-") {
                    let _ = fs::remove_file(item.path());
                }
            }
        }
        tracing::info!(snapshot = %meta, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let shared = self.shared.clone();
        let current = tokio::task::spawn_blocking(move || shared.current())
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))??;
        Ok(current.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}
