//! [`Store`]: the keyspace of `mvcc.rs` made durable in sled.
//!
//! ## Contract
//! - **Atomic batches.** [`Store::apply`] applies its commands in order and writes all their
//!   effects, plus the caller's `meta` key/values, in one sled batch. After a crash the store
//!   holds every batch or none of it, never part of one.
//! - **Durable after flush.** A batch is on disk once a later [`Store::flush`] returns. A crash
//!   before that may lose the batch (never tear it). The Raft layer re-applies lost entries from
//!   its log, which is why it stores its last applied log id in `meta` within the same batch.
//! - **Reads** take a read lock and run concurrently with each other; `apply` holds the write
//!   lock for one batch (in-memory work plus an unflushed sled write, no fsync).
//! - **Generations.** All data lives in one sled tree, `eden-g<N>`; the default tree names the
//!   current N. Importing a snapshot fills tree N+1, flushes, then flips the pointer: a crash
//!   mid-import leaves the old generation in place, and open drops the half-written one.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::codec::*;
use crate::error::Error;
use crate::mvcc::{Keyspace, RecordRead, RecordSink};
use crate::types::*;

const GENERATION_KEY: &[u8] = b"generation";
const TREE_PREFIX: &str = "eden-g";
const SNAPSHOT_MAGIC: &[u8; 8] = b"EDENSNAP";
const SNAPSHOT_VERSION: u32 = 1;

fn tree_name(generation: u64) -> String {
    format!("{TREE_PREFIX}{generation}")
}

struct Inner {
    generation: u64,
    tree: sled::Tree,
    ks: Keyspace,
}

/// The durable MVCC keyspace. `Send + Sync`; share it behind an `Arc`.
pub struct Store {
    db: sled::Db,
    inner: RwLock<Inner>,
}

/// Reads records straight from the tree.
struct TreeRecords<'a>(&'a sled::Tree);

fn read_record(tree: &sled::Tree, at: RevKey) -> Result<Record, Error> {
    match tree.get(at.to_tree_key())? {
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
    tree: &'a sled::Tree,
    batch: sled::Batch,
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
        self.batch.insert(&at.to_tree_key()[..], encode_record(rec));
        self.pending.insert(at, rec.clone());
    }
    fn remove_record(&mut self, at: RevKey) {
        self.batch.remove(&at.to_tree_key()[..]);
        self.pending.remove(&at);
    }
    fn put_lease(&mut self, id: LeaseId, ttl: i64) {
        self.batch
            .insert(&lease_tree_key(id)[..], encode_lease(ttl));
    }
    fn remove_lease(&mut self, id: LeaseId) {
        self.batch.remove(&lease_tree_key(id)[..]);
    }
}

fn meta_i64(tree: &sled::Tree, key: &[u8], default: i64) -> Result<i64, Error> {
    match tree.get(key)? {
        Some(v) => decode_i64(&v, &String::from_utf8_lossy(key)),
        None => Ok(default),
    }
}

/// Rebuilds the in-memory keyspace from one generation's tree.
fn load_keyspace(tree: &sled::Tree) -> Result<Keyspace, Error> {
    let revision = meta_i64(tree, META_REV, 1)?;
    let compacted = meta_i64(tree, META_COMPACT, -1)?;
    let lease_seq = meta_i64(tree, META_LEASE_SEQ, 0)?;
    let mut leases = Vec::new();
    for item in tree.scan_prefix([PREFIX_LEASE]) {
        let (k, v) = item?;
        leases.push((lease_id_from_tree_key(&k)?, decode_lease(&v)?));
    }
    let history = tree.scan_prefix([PREFIX_HISTORY]).map(|item| {
        let (k, v) = item?;
        let at = RevKey::from_tree_key(&k)?;
        let rec = decode_record(&v)?;
        if rec.kv.mod_revision != at.main {
            return Err(Error::Corrupt(format!(
                "record at revision {} says mod_revision {}",
                at.main, rec.kv.mod_revision
            )));
        }
        Ok((at, rec))
    });
    Keyspace::load(revision, compacted, lease_seq, leases, history)
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

/// Opens sled, waiting out a lock still held by a handle dropped moments ago in this process:
/// sled 0.34 releases its `flock` from a background thread after `Db` is dropped (sled issues
/// #1234, #1289), so an immediate reopen can see `WouldBlock`. A lock held by a live process
/// outlasts the wait and is reported.
fn open_sled(dir: &Path) -> Result<sled::Db, Error> {
    // sled reports the contention as ErrorKind::Other with this text (sled 0.34 config.rs).
    let contended = |e: &sled::Error| matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"));
    let step = std::time::Duration::from_millis(20);
    let mut attempts = 0;
    loop {
        match sled::Config::new().path(dir).open() {
            Err(e) if contended(&e) && attempts < 100 => {
                std::thread::sleep(step);
                attempts += 1;
            }
            Err(e) if contended(&e) => {
                return Err(Error::Io(format!(
                    "{} is locked by another process (is another eden running on this data \
                     directory?): {e}",
                    dir.display()
                )));
            }
            other => return Ok(other?),
        }
    }
}

/// Snapshot entries larger than this are refused rather than allocated.
const MAX_SNAPSHOT_ITEM: u32 = 1 << 30;

impl Store {
    /// Opens (or creates) the store in `dir`, rebuilding the index from history.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        let db = open_sled(dir)?;
        let generation = match db.get(GENERATION_KEY)? {
            Some(v) => decode_i64(&v, "generation pointer")? as u64,
            None => 0,
        };
        let current = tree_name(generation);
        // A tree of another generation is an import that crashed before its pointer flip, or
        // an old generation whose drop did not finish.
        for name in db.tree_names() {
            if name.starts_with(TREE_PREFIX.as_bytes()) && name.as_ref() != current.as_bytes() {
                db.drop_tree(&name)?;
            }
        }
        let tree = db.open_tree(&current)?;
        let ks = load_keyspace(&tree)?;
        Ok(Store {
            db,
            inner: RwLock::new(Inner {
                generation,
                tree,
                ks,
            }),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated in a way reads
        // could observe wrongly: apply reloads from disk on any fault. So poison is ignored.
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
            batch: sled::Batch::default(),
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
        let BatchSink { mut batch, .. } = sink;
        batch.insert(META_REV, &encode_i64(inner.ks.revision())[..]);
        batch.insert(META_COMPACT, &encode_i64(inner.ks.compact_revision())[..]);
        batch.insert(META_LEASE_SEQ, &encode_i64(inner.ks.lease_seq())[..]);
        for (k, v) in meta {
            batch.insert(user_meta_key(k), v.as_slice());
        }
        if let Err(e) = inner.tree.apply_batch(batch) {
            inner.ks = load_keyspace(&inner.tree)?;
            return Err(e.into());
        }
        Ok(results)
    }

    /// Makes every applied batch durable (fsync).
    pub fn flush(&self) -> Result<(), Error> {
        self.db.flush()?;
        Ok(())
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
        for item in inner.tree.range(lo..hi) {
            let (k, v) = item?;
            let at = RevKey::from_tree_key(&k)?;
            let rec = decode_record(&v)?;
            let create = rec.kind == EventKind::Put && rec.kv.create_revision == at.main;
            let prev_kv = if create {
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
    pub fn meta(&self, key: &[u8]) -> Option<Vec<u8>> {
        let inner = self.read();
        inner
            .tree
            .get(user_meta_key(key))
            .ok()
            .flatten()
            .map(|v| v.to_vec())
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
            out.put(&k)?;
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
        let generation = inner.generation + 1;
        let name = tree_name(generation);
        self.db.drop_tree(&name)?;
        let tree = self.db.open_tree(&name)?;
        let filled = Self::fill_from_snapshot(&tree, r).and_then(|()| {
            let ks = load_keyspace(&tree)?;
            tree.flush()?;
            Ok(ks)
        });
        let ks = match filled {
            Ok(ks) => ks,
            Err(e) => {
                drop(tree);
                self.db.drop_tree(&name)?;
                return Err(e);
            }
        };
        self.db
            .insert(GENERATION_KEY, &encode_i64(generation as i64)[..])?;
        self.db.flush()?;
        let old = std::mem::replace(
            &mut *inner,
            Inner {
                generation,
                tree,
                ks,
            },
        );
        drop(old.tree);
        self.db.drop_tree(tree_name(old.generation))?;
        Ok(())
    }

    fn fill_from_snapshot(tree: &sled::Tree, r: &mut dyn Read) -> Result<(), Error> {
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
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        loop {
            match input.get(1)?[0] {
                0 => break,
                1 => {}
                tag => {
                    return Err(Error::InvalidSnapshot(format!("unknown entry tag {tag}")));
                }
            }
            let klen = input.u32()?;
            if klen > MAX_SNAPSHOT_ITEM {
                return Err(Error::InvalidSnapshot(format!(
                    "key length {klen} is too large"
                )));
            }
            let key = input.get(klen as usize)?;
            let vlen = input.u32()?;
            if vlen > MAX_SNAPSHOT_ITEM {
                return Err(Error::InvalidSnapshot(format!(
                    "value length {vlen} is too large"
                )));
            }
            let value = input.get(vlen as usize)?;
            batch.insert(key, value);
            in_batch += 1;
            if in_batch == 1024 {
                tree.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
        let computed = input.crc.finish();
        let mut trailer = [0u8; 4];
        input.r.read_exact(&mut trailer).map_err(|e| {
            Error::InvalidSnapshot(format!("stream ended before its checksum: {e}"))
        })?;
        let stored = u32::from_be_bytes(trailer);
        if stored != computed {
            return Err(Error::InvalidSnapshot(format!(
                "checksum mismatch: stream says {stored:08x}, content is {computed:08x}"
            )));
        }
        tree.apply_batch(batch)?;
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
        for item in inner.tree.range(&[PREFIX_HISTORY][..]..&hi[..]) {
            let (k, v) = item?;
            crc.update(&k);
            crc.update(&v);
        }
        Ok((crc.finish(), inner.ks.compact_revision()))
    }

    /// Bytes sled occupies on disk.
    pub fn size_bytes(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}
