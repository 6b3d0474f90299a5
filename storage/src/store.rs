//! [`Store`]: the keyspace of `mvcc.rs` made durable in a [`Tree`] (`tree.rs`).
//!
//! ## Contract
//! - **Atomic batches.** [`Store::apply`] applies its commands in order and writes all their
//!   effects, plus the caller's `meta` key/values, as one frame of the tree's data file. After a
//!   crash the store holds every batch or none of it, never part of one.
//! - **Durable after flush.** A batch is on disk once a later [`Store::flush`] returns. A crash
//!   before that may lose the batch (never tear it). The Raft layer re-applies lost entries from
//!   its log, which is why it stores its last applied log id in `meta` within the same batch.
//! - **Reads** take a read lock and run concurrently with each other; `apply` holds the write
//!   lock for one batch (in-memory work plus one unsynced `pwrite`).
//! - **Snapshots.** Importing one writes a new data file from the stream, syncs it and renames
//!   it into place: a damaged stream or a crash midway leaves the old state.
//! - **Older layout.** A directory written by earlier builds (one sled database) is converted
//!   on open, see [`migrate_from_sled`].

use std::io::{Read, Write};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::codec::*;
use crate::error::Error;
use crate::mvcc::{Keyspace, RecordRead, RecordSink};
use crate::tree::{self, Contents, Tree};
use crate::types::*;

const SNAPSHOT_MAGIC: &[u8; 8] = b"EDENSNAP";
const SNAPSHOT_VERSION: u32 = 1;

struct Inner {
    tree: Tree,
    ks: Keyspace,
}

/// The durable MVCC keyspace. `Send + Sync`; share it behind an `Arc`.
pub struct Store {
    inner: RwLock<Inner>,
    /// Entries converted from an older sled directory by this open, if it was one.
    converted: Option<usize>,
    /// The last failed checkpoint, until the caller takes it (outside `inner`, so that taking
    /// it after every apply does not wait for readers).
    maintenance_error: Mutex<Option<Error>>,
}

/// Reads records straight from the tree.
struct TreeRecords<'a>(&'a Contents);

fn read_record(tree: &Contents, at: RevKey) -> Result<Record, Error> {
    match tree.get(&at.to_tree_key())? {
        Some(bytes) => decode_record(&bytes),
        None => Err(Error::Corrupt(format!(
            "history record {}/{} is missing",
            at.main, at.sub
        ))),
    }
}

impl RecordRead for TreeRecords<'_> {
    fn record(&self, at: RevKey) -> Result<Record, Error> {
        read_record(self.0, at)
    }
}

/// Collects one apply batch; reads see the records written earlier in the same batch.
struct BatchSink<'a> {
    tree: &'a Contents,
    writes: Vec<tree::Write>,
    pending: std::collections::HashMap<RevKey, Record>,
}

impl RecordRead for BatchSink<'_> {
    fn record(&self, at: RevKey) -> Result<Record, Error> {
        match self.pending.get(&at) {
            Some(r) => Ok(r.clone()),
            None => read_record(self.tree, at),
        }
    }
}

impl RecordSink for BatchSink<'_> {
    fn insert_record(&mut self, at: RevKey, rec: &Record) {
        self.writes
            .push((at.to_tree_key().to_vec(), Some(encode_record(rec))));
        self.pending.insert(at, rec.clone());
    }
    fn remove_record(&mut self, at: RevKey) {
        self.writes.push((at.to_tree_key().to_vec(), None));
        self.pending.remove(&at);
    }
    fn put_lease(&mut self, id: LeaseId, ttl: i64) {
        self.writes
            .push((lease_tree_key(id).to_vec(), Some(encode_lease(ttl))));
    }
    fn remove_lease(&mut self, id: LeaseId) {
        self.writes.push((lease_tree_key(id).to_vec(), None));
    }
    fn put_alarm(&mut self, alarm: AlarmMember) {
        self.writes
            .push((alarm_tree_key(alarm).to_vec(), Some(Vec::new())));
    }
    fn remove_alarm(&mut self, alarm: AlarmMember) {
        self.writes.push((alarm_tree_key(alarm).to_vec(), None));
    }
}

fn meta_i64(tree: &Contents, key: &[u8], default: i64) -> Result<i64, Error> {
    match tree.get(key)? {
        Some(v) => decode_i64(&v, &String::from_utf8_lossy(key)),
        None => Ok(default),
    }
}

/// Rebuilds the in-memory keyspace from the tree.
fn load_keyspace(tree: &Contents) -> Result<Keyspace, Error> {
    let revision = meta_i64(tree, META_REV, 1)?;
    let compacted = meta_i64(tree, META_COMPACT, -1)?;
    let lease_seq = meta_i64(tree, META_LEASE_SEQ, 0)?;
    let mut leases = Vec::new();
    for item in tree.scan_prefix(&[PREFIX_LEASE]) {
        let (k, v) = item?;
        leases.push((lease_id_from_tree_key(k)?, decode_lease(&v)?));
    }
    let mut alarms = Vec::new();
    for item in tree.scan_prefix(&[PREFIX_ALARM]) {
        alarms.push(alarm_from_tree_key(item?.0)?);
    }
    let history = tree.scan_prefix(&[PREFIX_HISTORY]).map(|item| {
        let (k, v) = item?;
        let at = RevKey::from_tree_key(k)?;
        let rec = decode_record(&v)?;
        if rec.kv.mod_revision != at.main {
            return Err(Error::Corrupt(format!(
                "record at revision {} says mod_revision {}",
                at.main, rec.kv.mod_revision
            )));
        }
        Ok((at, rec))
    });
    Keyspace::load(revision, compacted, lease_seq, leases, alarms, history)
}

/// Counts bytes into a CRC as they pass.
struct CrcWriter<'a> {
    w: &'a mut dyn Write,
    crc: Crc32c,
}

impl CrcWriter<'_> {
    fn put(&mut self, b: &[u8]) -> Result<(), Error> {
        self.crc.update(b);
        self.w.write_all(b)?;
        Ok(())
    }
}

struct CrcReader<'a> {
    r: &'a mut dyn Read,
    crc: Crc32c,
}

impl CrcReader<'_> {
    fn get(&mut self, n: usize) -> Result<Vec<u8>, Error> {
        let mut buf = Vec::new();
        (&mut *self.r).take(n as u64).read_to_end(&mut buf)?;
        if buf.len() != n {
            return Err(Error::InvalidSnapshot(format!(
                "stream ended early: wanted {n} bytes, got {}",
                buf.len()
            )));
        }
        self.crc.update(&buf);
        Ok(buf)
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(
            self.get(4)?.try_into().expect("4 bytes"),
        ))
    }
}

/// Snapshot entries larger than this are refused rather than allocated.
const MAX_SNAPSHOT_ITEM: u32 = 1 << 30;

/// Files of the older layout: one sled database in the directory.
const SLED_FILES: [&str; 3] = ["conf", "db", "blobs"];

/// Converts a directory written by earlier builds (one sled database whose default tree names
/// the current generation tree `eden-g<N>`) to the tree's data file: the entries of the current
/// generation are written as a new data file (synced and renamed into place), and only then are
/// sled's files removed, and the directory synced. Returns the number of entries converted, or
/// `None` if there was nothing to convert.
///
/// Only a fresh tree (the empty first data file, made by this open) is filled from sled. A tree
/// that already has data was converted by an earlier open that stopped before removing sled's
/// files: they are only removed now. And sled's main file `db` must be there, since opening
/// sled would create a missing one empty.
fn migrate_from_sled(dir: &Path, tree: &mut Tree) -> Result<Option<usize>, Error> {
    if !SLED_FILES.iter().any(|f| dir.join(f).exists()) {
        return Ok(None);
    }
    let converted = if tree.is_fresh() && dir.join("db").is_file() {
        Some(convert_sled(dir, tree)?)
    } else {
        None
    };
    for name in SLED_FILES {
        let path = dir.join(name);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::Io(format!("cannot remove {}: {e}", path.display())))
            }
            _ => {}
        }
    }
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if name.to_string_lossy().starts_with("snap.") {
            let _ = std::fs::remove_file(dir.join(name));
        }
    }
    tree::sync_dir(dir)?;
    Ok(converted)
}

/// Fills `tree` with the current generation of the sled database in `dir`.
fn convert_sled(dir: &Path, tree: &mut Tree) -> Result<usize, Error> {
    let db = sled::Config::new().path(dir).open()?;
    let generation = match db.get(b"generation")? {
        Some(v) => decode_i64(&v, "generation pointer")? as u64,
        None => 0,
    };
    let old = db.open_tree(format!("eden-g{generation}"))?;
    let mut items = old.iter().map(|item| {
        let (k, v) = item?;
        Ok((k.to_vec(), v.to_vec()))
    });
    tree.replace(&mut items, &mut |c| load_keyspace(c).map(drop))?;
    Ok(tree.len())
}

impl Store {
    /// Opens (or creates) the store in `dir`, rebuilding the index from history.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        Self::open_with(dir, tree::CHECKPOINT_MIN)
    }

    /// [`Store::open`], rewriting the data file once it holds more than `checkpoint_min` bytes of
    /// garbage (and more garbage than live data) instead of [`tree::CHECKPOINT_MIN`]. For tests
    /// that want checkpoints to happen often.
    pub fn open_with(dir: &Path, checkpoint_min: u64) -> Result<Store, Error> {
        let mut tree = Tree::open_with(dir, checkpoint_min)?;
        let converted = migrate_from_sled(dir, &mut tree)?;
        let ks = load_keyspace(&tree)?;
        Ok(Store {
            inner: RwLock::new(Inner { tree, ks }),
            converted,
            maintenance_error: Mutex::new(None),
        })
    }

    /// What open cut from the end of the data file (a batch torn by a crash, or never written
    /// out), for the caller to report.
    pub fn recovery(&self) -> tree::Recovery {
        self.read().tree.recovery()
    }

    /// The number of entries this open converted from the sled layout of earlier builds, or
    /// `None` if the directory was already in the current layout.
    pub fn converted_from_sled(&self) -> Option<usize> {
        self.converted
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic inside `apply` may leave the in-memory keyspace ahead of the tree. Poison is
        // ignored so that reads keep working; as after any fault, the store should be reopened.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `cmds` in order and stores `meta`, all in one atomic batch. Each command gets its
    /// own result; a failed one changes nothing and does not affect the others. The outer `Err`
    /// is an I/O or corruption fault: nothing of the batch was applied in memory, and whether it
    /// reached the disk is unknown; reopen the store.
    #[allow(clippy::type_complexity)]
    pub fn apply(
        &self,
        cmds: &[Command],
        meta: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<Vec<Result<(Applied, Vec<Event>), Error>>, Error> {
        let mut guard = self.write();
        let inner = &mut *guard;
        let mut sink = BatchSink {
            tree: &inner.tree,
            writes: Vec::new(),
            pending: Default::default(),
        };
        let mut results = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            match inner.ks.apply(&mut sink, cmd) {
                Err(e) if e.is_fault() => {
                    inner.ks = load_keyspace(&inner.tree)?;
                    return Err(e);
                }
                other => results.push(other),
            }
        }
        let BatchSink { mut writes, .. } = sink;
        let counter = |k: &[u8], v: i64| (k.to_vec(), Some(encode_i64(v).to_vec()));
        writes.push(counter(META_REV, inner.ks.revision()));
        writes.push(counter(META_COMPACT, inner.ks.compact_revision()));
        writes.push(counter(META_LEASE_SEQ, inner.ks.lease_seq()));
        for (k, v) in meta {
            writes.push((user_meta_key(k), Some(v.clone())));
        }
        if let Err(e) = inner.tree.apply(&writes) {
            inner.ks = load_keyspace(&inner.tree)?;
            return Err(e);
        }
        // The batch is in. A checkpoint that fails does not undo it: the tree stays as it was,
        // tries again later, and the error waits for `take_maintenance_error`.
        let due = inner.tree.checkpoint_due();
        drop(guard);
        if due {
            self.checkpoint();
        }
        Ok(results)
    }

    /// Rewrites the data file without its garbage: written under the read lock, so reads go on
    /// meanwhile, and put in place under the write lock, unless a batch came in between.
    fn checkpoint(&self) {
        let prepared = self.read().tree.prepare_checkpoint();
        let mut inner = self.write();
        if let Err(e) = prepared.and_then(|p| inner.tree.finish_checkpoint(p)) {
            inner.tree.checkpoint_failed();
            *self.maintenance_error() = Some(e);
        }
    }

    /// Makes every applied batch durable (fsync).
    pub fn flush(&self) -> Result<(), Error> {
        self.read().tree.flush()
    }

    /// etcd's Range, at the current revision or at `req.revision`.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, Error> {
        let inner = self.read();
        inner.ks.range(&TreeRecords(&inner.tree), req)
    }

    /// The current revision: 1 for an empty store, +1 per command that changed something.
    pub fn revision(&self) -> Revision {
        self.read().ks.revision()
    }

    /// The raised alarms (replicated: every replica has the same list).
    pub fn alarms(&self) -> Vec<AlarmMember> {
        self.read().ks.alarms()
    }

    /// Rewrites the data file with only the live data now, not waiting for enough garbage
    /// (etcd's Defragment): after a compaction this is what brings the file's size down.
    /// Writes wait meanwhile, as they do in etcd.
    pub fn defragment(&self) -> Result<(), Error> {
        let mut inner = self.write();
        let prepared = inner.tree.prepare_checkpoint()?;
        inner.tree.finish_checkpoint(prepared)?;
        Ok(())
    }

    /// The revision of the last compaction; -1 if there was none (etcd's `compactMainRev`,
    /// which its HashKV reports as is).
    pub fn compact_revision(&self) -> Revision {
        self.read().ks.compact_revision()
    }

    /// Replays history for a watch: the events of up to `max_revisions` revisions starting at
    /// `from`, each with its `prev_kv`. Revisions with no retained events are skipped. Empty if
    /// `from` is above the current revision. `ErrCompacted` if `from` is below the compacted
    /// revision (as etcd, `from` equal to it is allowed; a delete at exactly that revision was
    /// compacted away and is not replayed).
    pub fn events(
        &self,
        from: Revision,
        max_revisions: usize,
    ) -> Result<Vec<(Revision, Vec<Event>)>, Error> {
        self.events_matching(from, max_revisions, |_, _| true, true)
    }

    /// [`Store::events`] for one watcher: only the events `wanted` (by kind and key) are kept,
    /// and their `prev_kv` is looked up only `with_prev`. A revision whose events are all left
    /// out is not listed; the span read is the same as [`Store::events`]'s.
    pub fn events_matching(
        &self,
        from: Revision,
        max_revisions: usize,
        wanted: impl Fn(EventKind, &[u8]) -> bool,
        with_prev: bool,
    ) -> Result<Vec<(Revision, Vec<Event>)>, Error> {
        let inner = self.read();
        if from < inner.ks.compact_revision() {
            return Err(Error::Compacted);
        }
        let from = from.max(1);
        let until = from
            .saturating_add(max_revisions as i64)
            .min(inner.ks.revision() + 1);
        if from >= until {
            return Ok(Vec::new());
        }
        let lo = RevKey { main: from, sub: 0 }.to_tree_key();
        let hi = RevKey {
            main: until,
            sub: 0,
        }
        .to_tree_key();
        let recs = TreeRecords(&inner.tree);
        let mut out: Vec<(Revision, Vec<Event>)> = Vec::new();
        for item in inner
            .tree
            .range(Bound::Included(&lo[..]), Bound::Excluded(&hi[..]))
        {
            let (k, v) = item?;
            let at = RevKey::from_tree_key(k)?;
            let rec = decode_record(&v)?;
            if !wanted(rec.kind, &rec.kv.key) {
                continue;
            }
            let create = rec.kind == EventKind::Put && rec.kv.create_revision == at.main;
            let prev_kv = if create || !with_prev {
                None
            } else {
                inner.ks.prev_kv(&recs, &rec.kv.key, at)?
            };
            let event = Event {
                kind: rec.kind,
                kv: rec.kv,
                prev_kv,
            };
            match out.last_mut() {
                Some((rev, events)) if *rev == at.main => events.push(event),
                _ => out.push((at.main, vec![event])),
            }
        }
        Ok(out)
    }

    pub fn lease(&self, id: LeaseId) -> Option<Lease> {
        self.read().ks.lease(id)
    }

    /// Every lease with its attached keys, by id.
    pub fn leases(&self) -> Vec<Lease> {
        self.read().ks.leases()
    }

    /// Every lease's id and granted TTL, without copying their keys (the lease keeper's tick).
    pub fn lease_ttls(&self) -> Vec<(LeaseId, i64)> {
        self.read().ks.lease_ttls()
    }

    /// A value the caller stored through `apply`'s `meta`.
    pub fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.read().tree.get(&user_meta_key(key))
    }

    /// The error of the last checkpoint of the data file that failed since the last call, if
    /// any. The batch that triggered it was applied; the checkpoint is tried again later. The
    /// caller logs it.
    pub fn take_maintenance_error(&self) -> Option<Error> {
        self.maintenance_error().take()
    }

    fn maintenance_error(&self) -> std::sync::MutexGuard<'_, Option<Error>> {
        self.maintenance_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the whole keyspace (history, leases, revisions, meta) as one stream:
    /// `EDENSNAP`, version (u32 BE), then `1, klen, key, vlen, value` per entry, then `0` and the
    /// CRC-32C of everything before it.
    pub fn export_snapshot(&self, w: &mut dyn Write) -> Result<(), Error> {
        let inner = self.read();
        let mut out = CrcWriter {
            w,
            crc: Crc32c::new(),
        };
        out.put(SNAPSHOT_MAGIC)?;
        out.put(&SNAPSHOT_VERSION.to_be_bytes())?;
        for item in inner.tree.iter() {
            let (k, v) = item?;
            out.put(&[1])?;
            out.put(&(k.len() as u32).to_be_bytes())?;
            out.put(k)?;
            out.put(&(v.len() as u32).to_be_bytes())?;
            out.put(&v)?;
        }
        out.put(&[0])?;
        let crc = out.crc.finish();
        out.w.write_all(&crc.to_be_bytes())?;
        out.w.flush()?;
        Ok(())
    }

    /// Replaces everything with a snapshot from [`Store::export_snapshot`]. The new state is
    /// durable when this returns. A damaged stream changes nothing; a crash midway leaves the
    /// old state.
    pub fn import_snapshot(&self, r: &mut dyn Read) -> Result<(), Error> {
        let mut inner = self.write();
        let mut input = CrcReader {
            r,
            crc: Crc32c::new(),
        };
        if input.get(8)? != SNAPSHOT_MAGIC {
            return Err(Error::InvalidSnapshot(
                "stream does not start with EDENSNAP".into(),
            ));
        }
        let version = input.u32()?;
        if version != SNAPSHOT_VERSION {
            return Err(Error::InvalidSnapshot(format!(
                "snapshot format version {version}; this build reads version {SNAPSHOT_VERSION}"
            )));
        }
        let mut items = SnapshotEntries { input, done: false };
        // The new content's keyspace is loaded before the new file is put in place: a stream
        // that passes its checksum but does not load changes nothing either.
        let mut loaded = None;
        inner.tree.replace(&mut items, &mut |c| {
            loaded = Some(load_keyspace(c)?);
            Ok(())
        })?;
        inner.ks = loaded.expect("replace ran the check");
        Ok(())
    }

    /// A CRC-32C over every retained history record at or below `rev` (0 = current), and the
    /// compacted revision; replicas that applied the same log give the same hash.
    pub fn hash_kv(&self, rev: Revision) -> Result<(u32, Revision), Error> {
        let inner = self.read();
        let rev = if rev <= 0 { inner.ks.revision() } else { rev };
        if rev > inner.ks.revision() {
            return Err(Error::FutureRev);
        }
        if rev < inner.ks.compact_revision() {
            return Err(Error::Compacted);
        }
        let mut crc = Crc32c::new();
        let hi = RevKey {
            main: rev + 1,
            sub: 0,
        }
        .to_tree_key();
        for item in inner.tree.range(
            Bound::Included(&[PREFIX_HISTORY][..]),
            Bound::Excluded(&hi[..]),
        ) {
            let (k, v) = item?;
            crc.update(k);
            crc.update(&v);
        }
        Ok((crc.finish(), inner.ks.compact_revision()))
    }

    /// Bytes of the data file.
    pub fn size_bytes(&self) -> u64 {
        self.read().tree.size_on_disk()
    }
}

/// The entries of a snapshot stream after its header. Each history record and lease is decoded
/// on the way, and the stream's checksum is checked at its end: a damaged stream ends in an
/// error, and [`Tree::replace`] puts its new file in place only after the entries end without
/// one.
struct SnapshotEntries<'a> {
    input: CrcReader<'a>,
    done: bool,
}

impl SnapshotEntries<'_> {
    fn next_entry(&mut self) -> Result<Option<tree::Entry>, Error> {
        match self.input.get(1)?[0] {
            0 => {
                let computed = self.input.crc.finish();
                let mut trailer = [0u8; 4];
                self.input.r.read_exact(&mut trailer).map_err(|e| {
                    Error::InvalidSnapshot(format!("stream ended before its checksum: {e}"))
                })?;
                let stored = u32::from_be_bytes(trailer);
                if stored != computed {
                    return Err(Error::InvalidSnapshot(format!(
                        "checksum mismatch: stream says {stored:08x}, content is {computed:08x}"
                    )));
                }
                return Ok(None);
            }
            1 => {}
            tag => return Err(Error::InvalidSnapshot(format!("unknown entry tag {tag}"))),
        }
        let klen = self.input.u32()?;
        if klen > MAX_SNAPSHOT_ITEM {
            return Err(Error::InvalidSnapshot(format!(
                "key length {klen} is too large"
            )));
        }
        let key = self.input.get(klen as usize)?;
        let vlen = self.input.u32()?;
        if vlen > MAX_SNAPSHOT_ITEM {
            return Err(Error::InvalidSnapshot(format!(
                "value length {vlen} is too large"
            )));
        }
        let value = self.input.get(vlen as usize)?;
        let bad = |e: Error| Error::InvalidSnapshot(e.to_string());
        match key.first() {
            Some(&PREFIX_HISTORY) => {
                let at = RevKey::from_tree_key(&key).map_err(bad)?;
                let rec = decode_record(&value).map_err(bad)?;
                if rec.kv.mod_revision != at.main {
                    return Err(Error::InvalidSnapshot(format!(
                        "record at revision {} says mod_revision {}",
                        at.main, rec.kv.mod_revision
                    )));
                }
            }
            Some(&PREFIX_LEASE) => {
                lease_id_from_tree_key(&key).map_err(bad)?;
                decode_lease(&value).map_err(bad)?;
            }
            Some(&PREFIX_ALARM) => {
                alarm_from_tree_key(&key).map_err(bad)?;
            }
            _ => {}
        }
        Ok(Some((key, value)))
    }
}

impl Iterator for SnapshotEntries<'_> {
    type Item = Result<tree::Entry, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_entry() {
            Ok(Some(entry)) => Some(Ok(entry)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
