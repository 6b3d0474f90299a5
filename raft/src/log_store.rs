//! [`LogStore`]: the Raft log and vote in append-only segment files, acknowledged after fsync.
//!
//! ## Layout
//! The log directory holds `LOCK` (flock'ed while a store has the directory open) and
//! segments `NNNNNNNNNNNNNNNNNNNN.wal` (a sequence number, 20 digits, so names sort in order).
//! A segment is a run of records:
//!
//! ```text
//! len: u32 LE | crc: u32 LE | kind: u8 | body        len = 1 + body length
//!                                                     crc = CRC-32 of kind and body
//! ```
//!
//! | kind | body |
//! |---|---|
//! | 1 entry | index (u64 LE), then bincode of the [`Entry`] |
//! | 2 truncate | index (u64 LE): entries from it on are gone |
//! | 3 purge | bincode of the last purged log id: entries up to it are gone |
//! | 4 vote | bincode of the vote |
//! | 5 committed | bincode of the committed log id (an `Option`) |
//!
//! Every segment starts with the vote, committed and purged ids as they were when it was
//! created, so deleting older segments never loses them. Only the last segment is written; it
//! is closed once it passes [`SEGMENT_BYTES`], and cut to its last record then. While it is
//! written its file is preallocated [`PREALLOC_STEP`] ahead (zeros), so an append's fsync does
//! not also have to store a new file size; opening cuts that space off again. Reading the
//! directory back replays every record in order; memory keeps only where each live entry is
//! (segment, offset, length), and entries are read back with `pread`.
//!
//! ## Contract
//! - **Append is acknowledged after fsync.** `append` writes its records with one `pwrite` and
//!   hands the callback to the flusher thread, which `fdatasync`s the last segment and only
//!   then calls it. The flusher drains every callback waiting when it wakes, so one fsync
//!   covers many appends (group commit). Closing a segment syncs it and the directory first,
//!   so syncing the last segment covers everything before it.
//! - **Vote, truncate and purge are durable** before they return.
//! - **No holes.** The live entries are one contiguous run of indexes; replay refuses a log
//!   whose records would leave a gap.
//! - **After a crash** a record cut short at the end of the last segment (a torn write) is
//!   dropped with everything after it, and the file is cut there: only appends not yet
//!   acknowledged can be lost. A bad record anywhere else is corruption, and the store refuses
//!   to open rather than guess.
//! - A segment is deleted once a purge leaves no live entry in it (never the last one), after
//!   the purge record is on disk.
//! - A directory in the old layout (one sled database, before this format) is converted on
//!   open: the log is written as a new segment, synced and renamed into place before the sled
//!   files are removed.
//!
//! It does not know what entries mean; the state machine (`state_machine.rs`) does.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::fs::File;
use std::io::{BufReader, Read};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};

use crate::codec::{decode, encode};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// A segment is closed, and the next one started, once it is this large.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// The last segment's file is extended this far ahead of its records, so that an append's
/// `fdatasync` need not also write the file's new size (a third faster here on ext4).
pub const PREALLOC_STEP: u64 = 4 << 20;
/// A record longer than this is not believed: its length field is taken as damage.
const MAX_RECORD: u32 = 1 << 30;
const HEADER: u64 = 8;

const K_ENTRY: u8 = 1;
const K_TRUNCATE: u8 = 2;
const K_PURGE: u8 = 3;
const K_VOTE: u8 = 4;
const K_COMMITTED: u8 = 5;

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, msg: impl ToString) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::error(msg.to_string())).into()
}

fn read_err(msg: impl ToString) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, msg)
}

fn write_err(msg: impl ToString) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, msg)
}

fn segment_name(seq: u64) -> String {
    format!("{seq:020}.wal")
}

/// Appends one record to `buf`.
fn put_record(buf: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) {
    let body: usize = parts.iter().map(|p| p.len()).sum();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    for p in parts {
        crc.update(p);
    }
    buf.extend_from_slice(&((1 + body) as u32).to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.push(kind);
    for p in parts {
        buf.extend_from_slice(p);
    }
}

/// Where one live entry's bincode is.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seg: u64,
    off: u64,
    len: u32,
}

struct Inner {
    dir: PathBuf,
    /// Every retained segment by sequence number; the last one is written.
    segments: BTreeMap<u64, Arc<File>>,
    active: u64,
    /// Where the last segment's records end (its file may run on, preallocated and zero).
    active_len: u64,
    /// Where the last segment's preallocated space ends.
    prealloc_end: u64,
    segment_bytes: u64,
    /// Index of `locs[0]`.
    first: u64,
    locs: VecDeque<Loc>,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    purged: Option<LogId>,
    last_log_id: Option<LogId>,
}

impl Inner {
    fn active_file(&self) -> Arc<File> {
        self.segments[&self.active].clone()
    }

    fn next_index(&self) -> u64 {
        let after_purge = self.purged.map(|p| p.index + 1).unwrap_or(0);
        if self.locs.is_empty() {
            after_purge
        } else {
            self.first + self.locs.len() as u64
        }
    }

    /// Writes `buf` (whole records) at the end of the last segment. On failure the segment is
    /// cut back, so a later write never lands after half a record.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<u64> {
        let file = self.active_file();
        let at = self.active_len;
        let end = at + buf.len() as u64;
        if end > self.prealloc_end {
            // Best effort: without it (a file system that cannot) writes extend the file.
            let step = PREALLOC_STEP.max(buf.len() as u64);
            if preallocate(&file, at, step).is_ok() {
                self.prealloc_end = at + step;
            }
        }
        if let Err(e) = file.write_all_at(buf, at) {
            let _ = file.set_len(at);
            self.prealloc_end = at;
            return Err(e);
        }
        self.active_len = end;
        Ok(at)
    }

    /// The records that restate the vote, committed and purged ids (a new segment's start).
    fn meta_records(&self) -> Result<Vec<u8>, String> {
        let mut buf = Vec::new();
        if let Some(v) = &self.vote {
            put_record(&mut buf, K_VOTE, &[v]);
        }
        if let Some(c) = &self.committed {
            put_record(&mut buf, K_COMMITTED, &[c]);
        }
        if let Some(p) = &self.purged {
            put_record(&mut buf, K_PURGE, &[&encode(p)?]);
        }
        Ok(buf)
    }

    /// Closes the last segment (synced) and starts the next one, made durable in the directory
    /// before anything is acknowledged from it.
    fn roll(&mut self) -> std::io::Result<()> {
        // A closed segment ends with its last record: replay takes anything after that in a
        // segment other than the last for damage.
        let closing = self.active_file();
        closing.set_len(self.active_len)?;
        closing.sync_data()?;
        let seq = self.active + 1;
        let file = create_segment(&self.dir, seq)?;
        self.segments.insert(seq, Arc::new(file));
        self.active = seq;
        self.active_len = 0;
        self.prealloc_end = 0;
        let meta = self.meta_records().map_err(std::io::Error::other)?;
        self.write(&meta)?;
        Ok(())
    }

    /// Why an entry at `index` cannot come next (it would leave a gap after the live entries).
    fn gap_before(&self, index: u64) -> Option<String> {
        let next = self.next_index();
        (!self.locs.is_empty() && index > next)
            .then(|| format!("entry {index} would follow entry {}", next - 1))
    }

    /// Records where entry `index` is. An entry at or below the last live one replaces it and
    /// everything after it, as a truncate would. The caller has checked `gap_before`.
    fn place(&mut self, index: u64, loc: Loc) {
        if !self.locs.is_empty() && index < self.next_index() {
            self.drop_from(index);
        }
        if self.locs.is_empty() {
            self.first = index;
        }
        self.locs.push_back(loc);
    }

    fn drop_from(&mut self, index: u64) {
        if index <= self.first {
            self.locs.clear();
        } else {
            let keep = (index - self.first) as usize;
            self.locs.truncate(keep);
        }
    }

    fn drop_upto(&mut self, index: u64) {
        while !self.locs.is_empty() && self.first <= index {
            self.locs.pop_front();
            self.first += 1;
        }
        if self.locs.is_empty() {
            self.first = index + 1;
        }
    }

    /// Deletes the segments no live entry is in, except the last one.
    fn delete_dead_segments(&mut self) -> std::io::Result<()> {
        let oldest_live = self.locs.front().map(|l| l.seg).unwrap_or(self.active);
        let dead: Vec<u64> = self
            .segments
            .range(..oldest_live)
            .map(|(s, _)| *s)
            .collect();
        for seq in dead {
            std::fs::remove_file(self.dir.join(segment_name(seq)))?;
            self.segments.remove(&seq);
        }
        Ok(())
    }

    fn read_entry(&self, loc: Loc) -> Result<Entry, String> {
        let file = self
            .segments
            .get(&loc.seg)
            .ok_or_else(|| format!("segment {} is gone", loc.seg))?;
        read_entry_at(file, loc)
    }
}

fn read_entry_at(file: &File, loc: Loc) -> Result<Entry, String> {
    let mut buf = vec![0u8; loc.len as usize];
    file.read_exact_at(&mut buf, loc.off)
        .map_err(|e| format!("reading the Raft log: {e}"))?;
    decode(&buf)
}

/// Reserves `len` bytes of `file` from `offset` (zeros to readers), growing it as needed.
fn preallocate(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::other("preallocation out of range"));
    };
    // SAFETY: the descriptor is open for as long as `file` is borrowed.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), offset, len) } {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

fn create_segment(dir: &Path, seq: u64) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join(segment_name(seq)))?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Reads the live entries the range asks for: locations under the lock, data after it.
#[derive(Clone)]
pub struct LogReader {
    inner: Arc<Mutex<Inner>>,
}

/// The Raft log storage. Owned by openraft once the node starts.
pub struct LogStore {
    /// The last committed index saved (see [`LogStore::committed_index`]).
    committed_index: Arc<AtomicU64>,
    reader: LogReader,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
    flusher_done: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // Every update of `Inner` completes or leaves it as it was (writes happen before the
    // in-memory change), so a panic elsewhere cannot leave it half-changed.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl LogStore {
    /// Opens (or creates) the log in `dir`. Fails if another process (or another `LogStore` in
    /// this one) has `dir` open, and if the log is damaged anywhere but its very end.
    pub fn open(dir: &Path) -> Result<LogStore, crate::Error> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    pub(crate) fn open_with(dir: &Path, segment_bytes: u64) -> Result<LogStore, crate::Error> {
        let ctx = |what: &str, e: &dyn std::fmt::Display| {
            crate::Error::Io(format!("the Raft log in {}: {what}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| ctx("cannot create it", &e))?;
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| ctx("cannot open LOCK", &e))?;
        if lock_file.try_lock().is_err() {
            return Err(crate::Error::Io(format!(
                "cannot open the Raft log in {}: it is locked (is another eden using this data \
                 dir?)",
                dir.display()
            )));
        }
        migrate_from_sled(dir)?;
        let inner = replay(dir, segment_bytes)?;
        let committed = match &inner.committed {
            Some(c) => decode::<Option<LogId>>(c)
                .map_err(|e| ctx("cannot read the committed index", &e))?
                .map_or(0, |id| id.index),
            None => 0,
        };
        let committed_index = Arc::new(AtomicU64::new(committed));
        let inner = Arc::new(Mutex::new(inner));
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let flush_inner = inner.clone();
        let handle = std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || {
                flush_loop(&flush_inner, rx);
                // The directory is free once the flusher ends (the store was dropped).
                drop(lock_file);
            })?;
        Ok(LogStore {
            committed_index,
            reader: LogReader { inner },
            flusher: tx,
            flusher_done: Arc::new(Mutex::new(Some(handle))),
        })
    }

    /// The committed log index as last saved by Raft, readable from anywhere (for
    /// `etcd_server_proposals_committed_total`).
    pub(crate) fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed_index.clone()
    }

    /// A handle that joins the flusher thread, which ends once this store is dropped and then
    /// releases the directory's lock. The node uses it on shutdown so the data dir is free
    /// when `shutdown` returns.
    pub(crate) fn flusher_handle(&self) -> Arc<Mutex<Option<std::thread::JoinHandle<()>>>> {
        self.flusher_done.clone()
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.reader.inner)
    }

    /// Writes `records`, then fsyncs the last segment before returning.
    fn write_durably(
        &self,
        records: &[u8],
        subject: ErrorSubject<u64>,
    ) -> Result<(), StorageError> {
        let file = {
            let mut inner = self.inner();
            inner
                .write(records)
                .map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
            inner.active_file()
        };
        file.sync_data()
            .map_err(|e| io_err(subject, ErrorVerb::Write, format!("fsync: {e}")))
    }

    /// Writes one entry and fsyncs, outside openraft (offline recovery only).
    pub(crate) fn append_and_flush(&self, entry: &Entry) -> Result<(), crate::Error> {
        let file = {
            let mut inner = self.inner();
            append_records(&mut inner, std::slice::from_ref(entry))
                .map_err(|e| crate::Error::Io(e.to_string()))?;
            inner.active_file()
        };
        file.sync_data()?;
        Ok(())
    }
}

/// Appends entries (rolling to a new segment first if the last one is full) and records where
/// they are. Entries that overlap the log replace its tail, as a truncate would.
fn append_records(inner: &mut Inner, entries: &[Entry]) -> Result<(), String> {
    let mut buf = Vec::new();
    let mut spans = Vec::with_capacity(entries.len());
    for entry in entries {
        let bytes = encode(entry)?;
        let index = entry.log_id.index;
        let start = buf.len() as u64;
        put_record(&mut buf, K_ENTRY, &[&index.to_le_bytes(), &bytes]);
        spans.push((index, start + HEADER + 1 + 8, bytes.len() as u32));
    }
    if buf.is_empty() {
        return Ok(());
    }
    if let Some(why) = inner.gap_before(spans[0].0) {
        return Err(format!("appending would leave a gap: {why}"));
    }
    if inner.active_len > 0 && inner.active_len + buf.len() as u64 > inner.segment_bytes {
        inner
            .roll()
            .map_err(|e| format!("starting a new log segment: {e}"))?;
    }
    let at = inner.write(&buf).map_err(|e| e.to_string())?;
    let seg = inner.active;
    for (index, off, len) in spans {
        let loc = Loc {
            seg,
            off: at + off,
            len,
        };
        inner.place(index, loc);
    }
    inner.last_log_id = entries.last().map(|e| e.log_id);
    Ok(())
}

/// Upper bounds of the fsync latency histogram, in seconds: 1 ms doubling to 8.192 s (the
/// buckets of etcd's `etcd_disk_wal_fsync_duration_seconds`).
pub const FSYNC_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192,
];

/// The latencies of every Raft log fsync in this process, as a histogram.
struct FsyncHistogram {
    buckets: [std::sync::atomic::AtomicU64; 14],
    count: std::sync::atomic::AtomicU64,
    sum_nanos: std::sync::atomic::AtomicU64,
}

/// A copy of the fsync histogram: per-bucket counts (not cumulative), count, sum in seconds.
#[derive(Debug, Clone)]
pub struct FsyncSnapshot {
    pub buckets: [u64; 14],
    pub count: u64,
    pub sum_seconds: f64,
}

static FSYNCS: FsyncHistogram = FsyncHistogram {
    buckets: [const { std::sync::atomic::AtomicU64::new(0) }; 14],
    count: std::sync::atomic::AtomicU64::new(0),
    sum_nanos: std::sync::atomic::AtomicU64::new(0),
};

fn record_fsync(took: std::time::Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    let secs = took.as_secs_f64();
    if let Some(i) = FSYNC_BUCKETS.iter().position(|b| secs <= *b) {
        FSYNCS.buckets[i].fetch_add(1, Relaxed);
    }
    FSYNCS.count.fetch_add(1, Relaxed);
    FSYNCS
        .sum_nanos
        .fetch_add(took.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
}

/// The fsync latencies of the Raft logs of this process so far.
pub fn fsync_histogram() -> FsyncSnapshot {
    use std::sync::atomic::Ordering::Relaxed;
    FsyncSnapshot {
        buckets: std::array::from_fn(|i| FSYNCS.buckets[i].load(Relaxed)),
        count: FSYNCS.count.load(Relaxed),
        sum_seconds: FSYNCS.sum_nanos.load(Relaxed) as f64 / 1e9,
    }
}

/// Waits for appends, fsyncs once for all that are waiting, then acknowledges them in order.
fn flush_loop(inner: &Mutex<Inner>, rx: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        // The segment is looked up after the callbacks arrived, so it holds their records (or a
        // later segment does, and closing the earlier one synced it).
        let file = lock(inner).active_file();
        let started = std::time::Instant::now();
        let result = file.sync_data();
        record_fsync(started.elapsed());
        for cb in waiting {
            cb.log_io_completed(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(format!("fsync of the Raft log: {e}"))),
            });
        }
    }
}

/// Reads the segments in `dir` back into memory (see the module docs for what is accepted).
fn replay(dir: &Path, segment_bytes: u64) -> Result<Inner, crate::Error> {
    let mut seqs = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let name = item?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".wal") {
            if let Ok(seq) = stem.parse::<u64>() {
                seqs.push(seq);
            }
        }
    }
    seqs.sort_unstable();
    let mut inner = Inner {
        dir: dir.to_path_buf(),
        segments: BTreeMap::new(),
        active: 0,
        active_len: 0,
        prealloc_end: 0,
        segment_bytes,
        first: 0,
        locs: VecDeque::new(),
        vote: None,
        committed: None,
        purged: None,
        last_log_id: None,
    };
    if seqs.is_empty() {
        let file = create_segment(dir, 1)?;
        inner.segments.insert(1, Arc::new(file));
        inner.active = 1;
        return Ok(inner);
    }
    let last = *seqs.last().expect("not empty");
    for seq in seqs {
        let path = dir.join(segment_name(seq));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let good = replay_segment(&mut inner, &file, seq, seq == last)?;
        let size = file.metadata()?.len();
        if good < size {
            // Only the last segment gets here (replay_segment refuses the others). What follows
            // its records is preallocated space (zeros) or a torn write, or both; it is cut
            // off either way, so a later write never ends next to an old record.
            let mut next = [0u8; HEADER as usize];
            let n = file.read_at(&mut next, good)?;
            if next[..n].iter().any(|b| *b != 0) {
                tracing::warn!(
                    segment = %path.display(),
                    kept = good,
                    dropped = size - good,
                    "the Raft log ends in a torn write; cutting it off (it was never acknowledged)"
                );
            }
            file.set_len(good)?;
            file.sync_all()?;
        }
        inner.segments.insert(seq, Arc::new(file));
        inner.active = seq;
        inner.active_len = good;
    }
    if let (Some(p), Some(_)) = (inner.purged, inner.locs.front()) {
        if inner.first > p.index + 1 {
            return Err(crate::Error::Io(format!(
                "the Raft log in {} is damaged: entries {}..{} are missing after the purged \
                 index {}; restore the node from a backup or remove it and let it rejoin",
                dir.display(),
                p.index + 1,
                inner.first,
                p.index
            )));
        }
    }
    if let Some(loc) = inner.locs.back().copied() {
        let entry = inner
            .read_entry(loc)
            .map_err(|e| crate::Error::Io(format!("the Raft log in {}: {e}", dir.display())))?;
        inner.last_log_id = Some(entry.log_id);
    }
    Ok(inner)
}

/// Replays one segment's records; the offset after the last good one. Damage is an error
/// unless `is_last` (then it is a torn tail, and the caller cuts it off).
fn replay_segment(
    inner: &mut Inner,
    file: &File,
    seq: u64,
    is_last: bool,
) -> Result<u64, crate::Error> {
    let size = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut at = 0u64;
    let mut body = Vec::new();
    let path = inner.dir.join(segment_name(seq));
    let damaged = |at: u64, why: &str| {
        crate::Error::Io(format!(
            "the Raft log segment {} is damaged at offset {at}: {why}; restore the node from a \
             backup or remove it and let it rejoin",
            path.display()
        ))
    };
    while at < size {
        let bad = |why: &str| -> Result<u64, crate::Error> {
            if is_last {
                Ok(at)
            } else {
                Err(damaged(at, why))
            }
        };
        if size - at < HEADER + 1 {
            return bad("a record header is cut short");
        }
        let mut header = [0u8; HEADER as usize];
        r.read_exact(&mut header)?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_RECORD || u64::from(len) > size - at - HEADER {
            return bad("a record's length is out of range");
        }
        body.resize(len as usize, 0);
        r.read_exact(&mut body)?;
        if crc32fast::hash(&body) != crc {
            return bad("a record's checksum does not match");
        }
        let kind = body[0];
        let payload = &body[1..];
        let index_of = |p: &[u8]| {
            p.get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        };
        match kind {
            K_ENTRY => {
                let Some(index) = index_of(payload) else {
                    return Err(damaged(at, "an entry record is too short"));
                };
                if let Some(why) = inner.gap_before(index) {
                    return Err(damaged(at, &why));
                }
                let loc = Loc {
                    seg: seq,
                    off: at + HEADER + 1 + 8,
                    len: (payload.len() - 8) as u32,
                };
                inner.place(index, loc);
            }
            K_TRUNCATE => {
                let Some(index) = index_of(payload) else {
                    return Err(damaged(at, "a truncate record is too short"));
                };
                inner.drop_from(index);
            }
            K_PURGE => {
                let id: LogId = decode(payload).map_err(|e| damaged(at, &e))?;
                inner.drop_upto(id.index);
                inner.purged = Some(id);
            }
            K_VOTE => inner.vote = Some(payload.to_vec()),
            K_COMMITTED => inner.committed = Some(payload.to_vec()),
            other => return Err(damaged(at, &format!("unknown record kind {other}"))),
        }
        at += HEADER + u64::from(len);
    }
    Ok(at)
}

/// Converts a log directory in the old layout (one sled database: tree `raft-log` with `e` +
/// index -> entry, `m/vote`, `m/committed`, `m/purged`) to segments, once.
fn migrate_from_sled(dir: &Path) -> Result<(), crate::Error> {
    let sled_files = ["conf", "db", "blobs", "snap"];
    let is_sled =
        |name: &str| sled_files.contains(&name) || name.starts_with("snap.") || name == "db.tmp";
    let mut has_sled = false;
    let mut has_segments = false;
    for item in std::fs::read_dir(dir)? {
        let name = item?.file_name().to_string_lossy().into_owned();
        has_sled |= name == "db" || name == "conf";
        has_segments |= name.ends_with(".wal");
        if name.ends_with(".wal.tmp") {
            std::fs::remove_file(dir.join(&name))?;
        }
    }
    if !has_sled {
        return Ok(());
    }
    if !has_segments {
        let io = |e: &dyn std::fmt::Display| {
            crate::Error::Io(format!(
                "converting the Raft log in {} from the old layout: {e}",
                dir.display()
            ))
        };
        let db = sled::Config::new().path(dir).open().map_err(|e| io(&e))?;
        let tree = db.open_tree("raft-log").map_err(|e| io(&e))?;
        let mut buf = Vec::new();
        for (key, kind) in [(&b"m/vote"[..], K_VOTE), (b"m/committed", K_COMMITTED)] {
            if let Some(v) = tree.get(key).map_err(|e| io(&e))? {
                put_record(&mut buf, kind, &[&v]);
            }
        }
        if let Some(v) = tree.get(b"m/purged").map_err(|e| io(&e))? {
            put_record(&mut buf, K_PURGE, &[&v]);
        }
        let mut entries = 0u64;
        for item in tree.scan_prefix(b"e") {
            let (k, v) = item.map_err(|e| io(&e))?;
            let index: [u8; 8] = k[1..]
                .try_into()
                .map_err(|_| io(&"an entry key is not 9 bytes"))?;
            let index = u64::from_be_bytes(index);
            put_record(&mut buf, K_ENTRY, &[&index.to_le_bytes(), &v]);
            entries += 1;
        }
        drop(tree);
        drop(db);
        let tmp = dir.join(format!("{}.tmp", segment_name(1)));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all_at(&buf, 0)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(segment_name(1)))?;
        File::open(dir)?.sync_all()?;
        tracing::info!(dir = %dir.display(), entries, "converted the Raft log from the old sled layout");
    }
    // The segments are in place: the sled files are no longer needed.
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let name = item.file_name().to_string_lossy().into_owned();
        if is_sled(&name) {
            let path = item.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

impl LogReader {
    fn entries(&self, start: u64, end: Bound<u64>) -> Result<Vec<Entry>, StorageError> {
        self.entries_within(start, end, usize::MAX)
    }

    /// The entries from `start` to `end` whose records add up to at most `max_bytes` (at least
    /// one entry when the range holds any).
    fn entries_within(
        &self,
        start: u64,
        end: Bound<u64>,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        let picked: Vec<(Arc<File>, Loc)> = {
            let inner = lock(&self.inner);
            let live_end = inner.first + inner.locs.len() as u64;
            let end = match end {
                Bound::Excluded(e) => e.min(live_end),
                Bound::Included(e) => e.saturating_add(1).min(live_end),
                Bound::Unbounded => live_end,
            };
            let start = start.max(inner.first);
            if start >= end {
                return Ok(Vec::new());
            }
            let from = (start - inner.first) as usize;
            let to = (end - inner.first) as usize;
            let mut bytes = 0usize;
            inner
                .locs
                .range(from..to)
                .take_while(|l| {
                    let first = bytes == 0;
                    bytes = bytes.saturating_add(l.len as usize);
                    first || bytes <= max_bytes
                })
                .map(|l| (inner.segments[&l.seg].clone(), *l))
                .collect()
        };
        picked
            .into_iter()
            .map(|(file, loc)| read_entry_at(&file, loc).map_err(read_err))
            .collect()
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
        self.entries(start, end)
    }

    /// What replication reads for one append: at most
    /// [`MAX_APPEND_BYTES`](crate::transport::client::MAX_APPEND_BYTES) of records, so that a
    /// follower far behind on large values gets appends small enough to answer in openraft's
    /// time, and the leader never reads more than that for one.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        self.entries_within(
            start,
            Bound::Excluded(end),
            crate::transport::client::MAX_APPEND_BYTES,
        )
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
        let inner = self.inner();
        let last_log_id = if inner.locs.is_empty() {
            inner.purged
        } else {
            inner.last_log_id
        };
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        self.reader.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes = encode(vote).map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        let mut rec = Vec::new();
        put_record(&mut rec, K_VOTE, &[&bytes]);
        self.write_durably(&rec, ErrorSubject::Vote)?;
        self.inner().vote = Some(bytes);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        match &self.inner().vote {
            Some(v) => Ok(Some(decode(v).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    /// Recorded without fsync: after a crash an older committed id only means re-applying
    /// entries later, once the leader confirms them again.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = encode(&committed).map_err(write_err)?;
        let mut rec = Vec::new();
        put_record(&mut rec, K_COMMITTED, &[&bytes]);
        let mut inner = self.inner();
        inner.write(&rec).map_err(write_err)?;
        inner.committed = Some(bytes);
        self.committed_index
            .store(committed.map_or(0, |id| id.index), Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        match &self.inner().committed {
            Some(v) => Ok(decode::<Option<LogId>>(v).map_err(read_err)?),
            None => Ok(None),
        }
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        append_records(&mut self.inner(), &entries).map_err(write_err)?;
        // The flusher fsyncs after this point, so the records above are covered.
        if let Err(mpsc::SendError(cb)) = self.flusher.send(callback) {
            cb.log_io_completed(Err(std::io::Error::other(
                "the Raft log flusher has stopped",
            )));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut rec = Vec::new();
        put_record(&mut rec, K_TRUNCATE, &[&log_id.index.to_le_bytes()]);
        self.write_durably(&rec, ErrorSubject::Logs)?;
        let mut inner = self.inner();
        inner.drop_from(log_id.index);
        inner.last_log_id = match inner.locs.back().copied() {
            Some(loc) => Some(inner.read_entry(loc).map_err(read_err)?.log_id),
            None => None,
        };
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut rec = Vec::new();
        put_record(&mut rec, K_PURGE, &[&encode(&log_id).map_err(write_err)?]);
        self.write_durably(&rec, ErrorSubject::Logs)?;
        let mut inner = self.inner();
        inner.drop_upto(log_id.index);
        inner.purged = Some(log_id);
        if inner.locs.is_empty() {
            inner.last_log_id = None;
        }
        inner.delete_dead_segments().map_err(write_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::NodeId;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, NodeId::default()), index)
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: id(term, index),
            payload: EntryPayload::Blank,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn append(log: &mut LogStore, entries: Vec<Entry>) {
        let mut inner = log.inner();
        append_records(&mut inner, &entries).unwrap();
        let file = inner.active_file();
        drop(inner);
        file.sync_data().unwrap();
    }

    async fn indexes(log: &mut LogStore) -> Vec<(u64, u64)> {
        log.try_get_log_entries(..)
            .await
            .unwrap()
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    fn segments(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".wal"))
            .collect();
        v.sort();
        v
    }

    fn close(log: LogStore) {
        let handle = log.flusher_handle();
        drop(log);
        let thread = handle.lock().unwrap().take();
        if let Some(h) = thread {
            h.join().unwrap();
        }
    }

    #[test]
    fn reopen_keeps_entries_vote_committed_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut log = LogStore::open(dir.path()).unwrap();
            append(&mut log, (1..=5).map(|i| entry(1, i)).collect()).await;
            log.truncate(id(1, 4)).await.unwrap();
            append(&mut log, vec![entry(2, 4)]).await;
            let vote = Vote::new(2, 7);
            log.save_vote(&vote).await.unwrap();
            log.save_committed(Some(id(2, 4))).await.unwrap();
            close(log);

            let mut log = LogStore::open(dir.path()).unwrap();
            assert_eq!(
                indexes(&mut log).await,
                vec![(1, 1), (1, 2), (1, 3), (2, 4)]
            );
            assert_eq!(log.read_vote().await.unwrap(), Some(vote));
            assert_eq!(log.read_committed().await.unwrap(), Some(id(2, 4)));
            let state = log.get_log_state().await.unwrap();
            assert_eq!(state.last_log_id, Some(id(2, 4)));
            assert_eq!(state.last_purged_log_id, None);
        });
    }

    #[test]
    fn replication_reads_at_most_an_appends_worth_of_large_entries() {
        use eden_storage::{Command, PutRequest};
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut log = LogStore::open(dir.path()).unwrap();
            let big = |i: u64| Entry {
                log_id: id(1, i),
                payload: EntryPayload::Normal(crate::types::Batch(vec![Command::Put(
                    PutRequest {
                        key: b"k".to_vec(),
                        value: vec![7; 1 << 20],
                        ..Default::default()
                    },
                )])),
            };
            append(&mut log, (1..=10).map(big).collect()).await;
            append(&mut log, vec![entry(1, 11), entry(1, 12)]).await;
            let mut reader = log.get_log_reader().await;
            // Three 1 MiB records and their framing fit in 4 MiB; a fourth does not.
            let got = reader.limited_get_log_entries(1, 11).await.unwrap();
            assert_eq!(
                got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
                [1, 2, 3]
            );
            // Small entries all come; a single large one comes alone if it must.
            assert_eq!(
                reader.limited_get_log_entries(11, 13).await.unwrap().len(),
                2
            );
            let lone = LogReader::entries_within(&reader, 5, Bound::Excluded(11), 10).unwrap();
            assert_eq!(lone.len(), 1);
            // Plain reads are not limited.
            assert_eq!(reader.try_get_log_entries(1..11).await.unwrap().len(), 10);
            close(log);
        });
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path()).unwrap();
        let err = LogStore::open(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("locked"), "{err}");
        close(log);
        LogStore::open(dir.path()).expect("free once the first is closed");
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut log = LogStore::open(dir.path()).unwrap();
            append(&mut log, (0..=3).map(|i| entry(1, i)).collect()).await;
            close(log);
            // Opening cuts the preallocated space, so the file then ends with its last record.
            close(LogStore::open(dir.path()).unwrap());
            let seg = dir.path().join(segment_name(1));
            let good = std::fs::metadata(&seg).unwrap().len();
            // Half a record at the end, as a crash in the middle of a write leaves it.
            let mut tail = Vec::new();
            put_record(
                &mut tail,
                K_ENTRY,
                &[&4u64.to_le_bytes(), b"never finished"],
            );
            let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
            f.write_all_at(&tail[..tail.len() / 2], good).unwrap();
            drop(f);

            let mut log = LogStore::open(dir.path()).unwrap();
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), good);
            assert_eq!(
                indexes(&mut log).await,
                vec![(1, 0), (1, 1), (1, 2), (1, 3)]
            );
            // Appending goes on after the kept records.
            append(&mut log, vec![entry(1, 4)]).await;
            close(log);
            let mut log = LogStore::open(dir.path()).unwrap();
            assert_eq!(indexes(&mut log).await.len(), 5);
        });
    }

    /// Writes entries 0..20 one at a time into 200-byte segments; the segment names.
    async fn twenty_in_small_segments(dir: &Path) -> Vec<String> {
        let mut log = LogStore::open_with(dir, 200).unwrap();
        for i in 0..20 {
            append(&mut log, vec![entry(1, i)]).await;
        }
        close(log);
        let segs = segments(dir);
        assert!(segs.len() > 2, "{segs:?}");
        segs
    }

    #[test]
    fn the_last_segment_is_preallocated_and_its_zero_tail_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join(segment_name(1));
        rt().block_on(async {
            let mut log = LogStore::open(dir.path()).unwrap();
            append(&mut log, (0..=3).map(|i| entry(1, i)).collect()).await;
            let data = log.inner().active_len;
            assert!(data > 0);
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), PREALLOC_STEP);
            close(log);

            let mut log = LogStore::open(dir.path()).unwrap();
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), data);
            assert_eq!(indexes(&mut log).await.len(), 4);
            append(&mut log, vec![entry(1, 4)]).await;
            close(log);
            let mut log = LogStore::open(dir.path()).unwrap();
            assert_eq!(indexes(&mut log).await.len(), 5);
        });
        // Small segments: each one closed ends with its last record (replay refuses anything
        // else in a segment before the last), and all of them read back.
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            twenty_in_small_segments(dir.path()).await;
            let mut log = LogStore::open(dir.path()).unwrap();
            assert_eq!(indexes(&mut log).await.len(), 20);
        });
    }

    #[test]
    fn damage_before_the_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let segs = twenty_in_small_segments(dir.path()).await;
            // Flip a byte inside the first segment's first record.
            let first = dir.path().join(&segs[0]);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&first)
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, 10).unwrap();
            f.write_all_at(&[b[0] ^ 0xff], 10).unwrap();
            drop(f);
            let err = LogStore::open(dir.path()).err().expect("refused");
            assert!(err.to_string().contains("damaged at offset"), "{err}");
        });
    }

    #[test]
    fn purge_deletes_whole_segments_and_keeps_meta() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut log = LogStore::open_with(dir.path(), 100).unwrap();
            log.save_vote(&Vote::new(1, 3)).await.unwrap();
            for i in 0..30 {
                append(&mut log, vec![entry(1, i)]).await;
            }
            let before = segments(dir.path());
            assert!(before.len() > 4, "{before:?}");
            log.purge(id(1, 20)).await.unwrap();
            let after = segments(dir.path());
            assert!(after.len() < before.len(), "{before:?} -> {after:?}");
            assert_eq!(after.last(), before.last());
            assert_eq!(
                indexes(&mut log).await,
                (21..30).map(|i| (1, i)).collect::<Vec<_>>()
            );
            close(log);

            // The vote was written in a deleted segment; the copies at each segment's start
            // keep it.
            let mut log = LogStore::open_with(dir.path(), 100).unwrap();
            assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(1, 3)));
            let state = log.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(id(1, 20)));
            assert_eq!(state.last_log_id, Some(id(1, 29)));
            assert_eq!(indexes(&mut log).await.len(), 9);

            // Purging past the end (a snapshot was installed) leaves an empty log that goes on
            // after the purged index.
            log.purge(id(2, 40)).await.unwrap();
            assert!(indexes(&mut log).await.is_empty());
            append(&mut log, vec![entry(2, 41)]).await;
            close(log);
            let mut log = LogStore::open_with(dir.path(), 100).unwrap();
            assert_eq!(indexes(&mut log).await, vec![(2, 41)]);
            let state = log.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(id(2, 40)));
        });
    }

    #[test]
    fn an_old_sled_log_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let tree = db.open_tree("raft-log").unwrap();
            for i in 0..4u64 {
                let mut k = vec![b'e'];
                k.extend_from_slice(&i.to_be_bytes());
                tree.insert(k, encode(&entry(1, i)).unwrap()).unwrap();
            }
            tree.insert(b"m/vote", encode(&Vote::new(1, 9)).unwrap())
                .unwrap();
            tree.insert(b"m/committed", encode(&Some(id(1, 2))).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        // sled lets go of its lock from a background thread after the drop.
        std::thread::sleep(std::time::Duration::from_millis(200));
        rt().block_on(async {
            let mut log = LogStore::open(dir.path()).unwrap();
            assert_eq!(
                indexes(&mut log).await,
                vec![(1, 0), (1, 1), (1, 2), (1, 3)]
            );
            assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(1, 9)));
            assert_eq!(log.read_committed().await.unwrap(), Some(id(1, 2)));
            close(log);
            assert!(!dir.path().join("db").exists());
            assert!(!dir.path().join("conf").exists());
            let mut log = LogStore::open(dir.path()).unwrap();
            assert_eq!(indexes(&mut log).await.len(), 4);
        });
    }
}
