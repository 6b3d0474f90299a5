//! [`LogStore`]: the Raft log and vote, in sled.
//!
//! ## Layout
//! One sled tree, `raft-log`, so that every change is a single atomic sled batch:
//! - `e` + index (u64 big-endian) -> bincode of the [`Entry`]; big-endian keeps sled's order the
//!   log's order;
//! - `m/vote`, `m/committed`, `m/purged` -> bincode of the vote, the committed and the last
//!   purged log id.
//!
//! ## Contract
//! - **Append is acknowledged after fsync.** `append` writes its entries in one batch and hands
//!   the callback to the flusher thread, which fsyncs and only then calls it. The flusher drains
//!   every callback waiting when it wakes, so one fsync covers many appends (group commit).
//! - **Vote is durable** before `save_vote` returns.
//! - **No holes.** `truncate` removes a suffix and `purge` a prefix (plus records the purged id)
//!   in one batch each, so the stored indexes are always one contiguous run.
//! - **After a crash** the log is a prefix of what was written (sled recovers in write order), so
//!   an unacknowledged append may be lost whole; a truncate or purge may have to be done again,
//!   which openraft does.
//!
//! It does not know what entries mean; the state machine (`state_machine.rs`) does.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};

use crate::codec::{decode, encode};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const TREE: &str = "raft-log";
const VOTE: &[u8] = b"m/vote";
const COMMITTED: &[u8] = b"m/committed";
const PURGED: &[u8] = b"m/purged";
const ENTRY_PREFIX: u8 = b'e';

fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = ENTRY_PREFIX;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, msg: impl ToString) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::error(msg.to_string())).into()
}

fn read_err(msg: impl ToString) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, msg)
}

fn write_err(msg: impl ToString) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, msg)
}

/// Reads entries; cheap to clone, shares the tree with its [`LogStore`].
#[derive(Clone)]
pub struct LogReader {
    tree: sled::Tree,
}

/// The Raft log storage. Owned by openraft once the node starts.
pub struct LogStore {
    db: sled::Db,
    reader: LogReader,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
    flusher_done: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`. Fails if another process (or another `LogStore` in
    /// this one) has `dir` open.
    pub fn open(dir: &Path) -> Result<LogStore, crate::Error> {
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            crate::Error::Io(format!(
                "cannot open the Raft log in {}: {e} (is another eden using this data dir?)",
                dir.display()
            ))
        })?;
        let tree = db.open_tree(TREE)?;
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let flush_db = db.clone();
        let handle = std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flush_loop(flush_db, rx))?;
        Ok(LogStore {
            db,
            reader: LogReader { tree },
            flusher: tx,
            flusher_done: Arc::new(std::sync::Mutex::new(Some(handle))),
        })
    }

    /// A handle that joins the flusher thread, which ends once this store is dropped. The node
    /// uses it on shutdown so the data dir is released when `shutdown` returns.
    pub(crate) fn flusher_handle(
        &self,
    ) -> Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>> {
        self.flusher_done.clone()
    }

    fn tree(&self) -> &sled::Tree {
        &self.reader.tree
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match self.tree().get(key).map_err(read_err)? {
            Some(v) => Ok(Some(decode(&v).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    /// Writes one entry and fsyncs, outside openraft (offline recovery only).
    pub(crate) fn append_and_flush(&self, entry: &Entry) -> Result<(), crate::Error> {
        let bytes = encode(entry).map_err(crate::Error::Internal)?;
        self.tree()
            .insert(entry_key(entry.log_id.index), bytes)
            .map_err(|e| crate::Error::Io(e.to_string()))?;
        self.db
            .flush()
            .map_err(|e| crate::Error::Io(e.to_string()))?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StorageError> {
        self.db.flush_async().await.map_err(write_err)?;
        Ok(())
    }
}

/// Waits for appends, fsyncs once for all that are waiting, then acknowledges them in order.
fn flush_loop(db: sled::Db, rx: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let result = db.flush().map(|_| ());
        for cb in waiting {
            cb.log_io_completed(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(format!("fsync of the Raft log: {e}"))),
            });
        }
    }
}

impl LogReader {
    fn entries(&self, start: u64, end: Bound<u64>) -> Result<Vec<Entry>, StorageError> {
        let lo = entry_key(start);
        let iter = match end {
            Bound::Excluded(e) => self.tree.range(lo..entry_key(e)),
            Bound::Included(e) => self.tree.range(lo..=entry_key(e)),
            Bound::Unbounded => self.tree.range(lo..=entry_key(u64::MAX)),
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item.map_err(read_err)?;
            out.push(decode::<Entry>(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Bound::Included(*e),
            Bound::Excluded(e) => Bound::Excluded(*e),
            Bound::Unbounded => Bound::Unbounded,
        };
        if let Bound::Excluded(e) = end {
            if e <= start {
                return Ok(Vec::new());
            }
        }
        self.entries(start, end)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.reader.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(PURGED)?;
        let last = self
            .tree()
            .range(entry_key(0)..=entry_key(u64::MAX))
            .next_back()
            .transpose()
            .map_err(read_err)?;
        let last_log_id = match last {
            Some((_, v)) => Some(decode::<Entry>(&v).map_err(read_err)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        self.reader.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes = encode(vote).map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        self.tree()
            .insert(VOTE, bytes)
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(VOTE)
    }

    /// Recorded without fsync: after a crash an older committed id only means re-applying
    /// entries later, once the leader confirms them again.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = encode(&committed).map_err(write_err)?;
        self.tree().insert(COMMITTED, bytes).map_err(write_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = encode(&entry).map_err(write_err)?;
            batch.insert(&entry_key(entry.log_id.index), bytes);
        }
        self.tree().apply_batch(batch).map_err(write_err)?;
        // The flusher fsyncs after this point, so the batch above is covered.
        if let Err(mpsc::SendError(cb)) = self.flusher.send(callback) {
            cb.log_io_completed(Err(std::io::Error::other(
                "the Raft log flusher has stopped",
            )));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self
            .tree()
            .range(entry_key(log_id.index)..=entry_key(u64::MAX))
        {
            let (k, _) = item.map_err(read_err)?;
            batch.remove(k);
        }
        self.tree().apply_batch(batch).map_err(write_err)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.tree().range(entry_key(0)..=entry_key(log_id.index)) {
            let (k, _) = item.map_err(read_err)?;
            batch.remove(k);
        }
        batch.insert(PURGED, encode(&log_id).map_err(write_err)?);
        self.tree().apply_batch(batch).map_err(write_err)?;
        self.flush().await
    }
}
