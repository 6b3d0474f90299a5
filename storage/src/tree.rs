//! [`Tree`]: the store's ordered key/value map, with its own file format.
//!
//! The keys (and small values) live in memory in a `BTreeMap`; every value also lives in one
//! append-only data file, `data-<N>.edb`, where larger values are read back with `pread`. The
//! file is a header and a sequence of frames:
//!
//! ```text
//! header: "EDENTREE" | version u32 BE
//! frame:  payload length u32 BE | CRC-32C of the payload u32 BE | payload
//! payload: op*   op = 1 | klen u32 BE | key | vlen u32 BE | value     (put)
//!                     2 | klen u32 BE | key                           (remove)
//! ```
//!
//! ## Contract
//! - **Atomic batches.** [`Tree::apply`] writes one frame with one `pwrite`. On open the frames
//!   are replayed in order; the first frame that is short or fails its CRC ends the file, and
//!   the bytes from it on are cut (a crash tore that write, or the page cache had not written
//!   it out). A batch is therefore whole or absent after a crash, never torn.
//! - **Durable after [`Tree::flush`]** (`fdatasync`). Nothing is synced per batch: the caller
//!   (the Raft layer) keeps its own durable log and re-applies what a crash took.
//! - **Checkpoints.** Removed and overwritten values stay in the file as garbage. When the
//!   garbage passes both [`CHECKPOINT_MIN`] (64 MiB) and the live bytes, [`Tree::apply`] writes the live
//!   entries to `data-<N+1>.tmp`, syncs it, renames it to `data-<N+1>.edb`, syncs the
//!   directory and deletes `data-<N>.edb`. [`Tree::replace`] (a snapshot import) fills the next
//!   file the same way from a stream. Open uses the highest-numbered `.edb` and deletes the
//!   rest, so a crash at any point leaves either the old file or the complete new one.
//! - **One process.** `LOCK` in the directory is `flock`ed while a tree is open.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::codec::Crc32c;
use crate::error::Error;

const MAGIC: &[u8; 8] = b"EDENTREE";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 12;
const FRAME_HEADER: u64 = 8;
const OP_PUT: u8 = 1;
const OP_REMOVE: u8 = 2;
/// Values up to this many bytes are kept in memory as well as in the file.
const INLINE_MAX: usize = 96;
/// A frame larger than this is not believed (it would be a torn or corrupt length).
const MAX_FRAME: u32 = 1 << 30;
/// No checkpoint before the file holds this much garbage.
pub const CHECKPOINT_MIN: u64 = 64 << 20;
/// Checkpoints and imports write frames of about this size.
const CHECKPOINT_FRAME: usize = 1 << 20;

/// Where a value is.
#[derive(Debug, Clone)]
enum Slot {
    /// Small: kept in memory (and in the file).
    Inline(Box<[u8]>),
    /// In the data file at `offset`, `len` bytes.
    At { offset: u64, len: u32 },
}

impl Slot {
    fn len(&self) -> u64 {
        match self {
            Slot::Inline(v) => v.len() as u64,
            Slot::At { len, .. } => *len as u64,
        }
    }
}

/// One change in a batch: a put (`Some`) or a removal (`None`).
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// One key and its value, as a checkpoint or an import writes them.
pub type Entry = (Vec<u8>, Vec<u8>);

/// An op parsed from a frame: the key, and for a put the value with its offset in the payload.
type ParsedOp<'a> = (&'a [u8], Option<(usize, &'a [u8])>);

/// What [`Tree::open`] found beyond the last whole frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Bytes cut from the end of the data file (a torn or unwritten last batch); 0 if none.
    pub cut_bytes: u64,
    /// Whether any of the cut bytes was not zero.
    pub cut_nonzero: bool,
}

pub struct Tree {
    dir: PathBuf,
    _lock: File,
    number: u64,
    file: File,
    /// End of the last whole frame: where the next one goes.
    end: u64,
    index: BTreeMap<Box<[u8]>, Slot>,
    /// Garbage that may pile up before a checkpoint (besides being more than `live`).
    checkpoint_min: u64,
    /// Bytes of keys and values the index refers to (the rest of the file is headers and
    /// garbage).
    live: u64,
    recovery: Recovery,
}

fn file_name(n: u64) -> String {
    format!("data-{n:08}.edb")
}

fn tmp_name(n: u64) -> String {
    format!("data-{n:08}.tmp")
}

fn number_of(name: &str) -> Option<(u64, bool)> {
    let rest = name.strip_prefix("data-")?;
    if let Some(n) = rest.strip_suffix(".edb") {
        return n.parse().ok().map(|n| (n, true));
    }
    rest.strip_suffix(".tmp")?.parse().ok().map(|n| (n, false))
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::Io(format!("fsync of {}: {e}", dir.display())))
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("{what} {}: {e}", path.display()))
}

fn put_u32(buf: &mut Vec<u8>, n: u32) {
    buf.extend_from_slice(&n.to_be_bytes());
}

/// Appends one op to a frame payload; returns the offset of the value within the payload.
fn put_op(buf: &mut Vec<u8>, key: &[u8], value: Option<&[u8]>) -> usize {
    buf.push(if value.is_some() { OP_PUT } else { OP_REMOVE });
    put_u32(buf, key.len() as u32);
    buf.extend_from_slice(key);
    match value {
        Some(v) => {
            put_u32(buf, v.len() as u32);
            let at = buf.len();
            buf.extend_from_slice(v);
            at
        }
        None => buf.len(),
    }
}

/// Wraps a payload in its frame header.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut crc = Crc32c::new();
    crc.update(payload);
    let mut out = Vec::with_capacity(payload.len() + FRAME_HEADER as usize);
    put_u32(&mut out, payload.len() as u32);
    put_u32(&mut out, crc.finish());
    out.extend_from_slice(payload);
    out
}

fn header() -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&VERSION.to_be_bytes());
    h
}

/// The ops of one payload, with each value's offset within the payload.
fn parse_ops(payload: &[u8]) -> Result<Vec<ParsedOp<'_>>, String> {
    let mut ops = Vec::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<std::ops::Range<usize>, String> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= payload.len())
            .ok_or_else(|| format!("op at byte {at} runs past the frame"))?;
        let r = *at..end;
        *at = end;
        Ok(r)
    };
    let u32_at = |at: &mut usize| -> Result<usize, String> {
        let r = take(at, 4)?;
        Ok(u32::from_be_bytes(payload[r].try_into().expect("4 bytes")) as usize)
    };
    while at < payload.len() {
        let tag = payload[at];
        at += 1;
        let klen = u32_at(&mut at)?;
        let key = &payload[take(&mut at, klen)?];
        match tag {
            OP_PUT => {
                let vlen = u32_at(&mut at)?;
                let r = take(&mut at, vlen)?;
                ops.push((key, Some((r.start, &payload[r]))));
            }
            OP_REMOVE => ops.push((key, None)),
            other => return Err(format!("unknown op {other}")),
        }
    }
    Ok(ops)
}

impl Tree {
    /// Opens (or creates) the tree in `dir`, replaying its data file and cutting a torn tail.
    pub fn open(dir: &Path) -> Result<Tree, Error> {
        Self::open_with(dir, CHECKPOINT_MIN)
    }

    /// [`Tree::open`], checkpointing once the garbage passes `checkpoint_min` bytes (and the
    /// live bytes) instead of [`CHECKPOINT_MIN`].
    pub fn open_with(dir: &Path, checkpoint_min: u64) -> Result<Tree, Error> {
        fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| io("cannot open the lock file in", dir, e))?;
        if lock.try_lock().is_err() {
            return Err(Error::Io(format!(
                "{} is locked by another process (is another eden running on this data \
                 directory?)",
                dir.display()
            )));
        }
        let mut complete = Vec::new();
        let mut partial = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| io("cannot list", dir, e))? {
            let entry = entry.map_err(|e| io("cannot list", dir, e))?;
            let name = entry.file_name();
            match number_of(&name.to_string_lossy()) {
                Some((n, true)) => complete.push(n),
                Some((n, false)) => partial.push(n),
                None => {}
            }
        }
        complete.sort_unstable();
        let number = match complete.last() {
            Some(&n) => n,
            None => {
                Self::write_file(dir, 1, &mut |_| Ok(()))?;
                1
            }
        };
        // Older files were replaced by a checkpoint whose deletes did not finish; `.tmp` files
        // are checkpoints or imports that did not finish.
        for &n in complete.iter().filter(|&&n| n != number) {
            let _ = fs::remove_file(dir.join(file_name(n)));
        }
        for n in partial {
            let _ = fs::remove_file(dir.join(tmp_name(n)));
        }
        let mut tree = Tree {
            dir: dir.to_path_buf(),
            _lock: lock,
            number,
            file: Self::open_file(dir, number)?,
            end: HEADER_LEN,
            index: BTreeMap::new(),
            checkpoint_min,
            live: 0,
            recovery: Recovery::default(),
        };
        tree.replay()?;
        Ok(tree)
    }

    fn open_file(dir: &Path, n: u64) -> Result<File, Error> {
        let path = dir.join(file_name(n));
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("cannot open", &path, e))
    }

    /// Creates `data-<n>.edb` atomically: the header and whatever `fill` writes go to
    /// `data-<n>.tmp`, which is synced and renamed, and the directory synced. On error the
    /// temporary file is removed and nothing changed.
    fn write_file(
        dir: &Path,
        n: u64,
        fill: &mut dyn FnMut(&mut dyn std::io::Write) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let tmp = dir.join(tmp_name(n));
        let result = (|| {
            let mut f = File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
            {
                let mut w = std::io::BufWriter::with_capacity(CHECKPOINT_FRAME, &mut f);
                std::io::Write::write_all(&mut w, &header())
                    .map_err(|e| io("cannot write", &tmp, e))?;
                fill(&mut w)?;
                std::io::Write::flush(&mut w).map_err(|e| io("cannot write", &tmp, e))?;
            }
            f.sync_all().map_err(|e| io("cannot fsync", &tmp, e))?;
            let path = dir.join(file_name(n));
            fs::rename(&tmp, &path).map_err(|e| io("cannot rename", &tmp, e))?;
            sync_dir(dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn path(&self) -> PathBuf {
        self.dir.join(file_name(self.number))
    }

    /// Rebuilds the index from the data file; cuts what follows the last whole frame.
    fn replay(&mut self) -> Result<(), Error> {
        let path = self.path();
        let size = self
            .file
            .metadata()
            .map_err(|e| io("cannot stat", &path, e))?
            .len();
        let mut r = BufReader::with_capacity(1 << 20, &self.file);
        let Scan { index, live, end } = scan(&mut r, size, &path.display())?;
        drop(r);
        if end < size {
            let mut rest = vec![0u8; (size - end).min(1 << 20) as usize];
            let nonzero = self
                .file
                .read_exact_at(&mut rest, end)
                .map(|()| rest.iter().any(|&b| b != 0))
                .unwrap_or(true);
            self.file
                .set_len(end)
                .and_then(|()| self.file.sync_all())
                .map_err(|e| io("cannot cut the torn tail of", &path, e))?;
            self.recovery = Recovery {
                cut_bytes: size - end,
                cut_nonzero: nonzero,
            };
        }
        self.index = index;
        self.live = live;
        self.end = end;
        Ok(())
    }

    /// What open cut from the end of the file.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    fn value(&self, slot: &Slot) -> Result<Vec<u8>, Error> {
        match slot {
            Slot::Inline(v) => Ok(v.to_vec()),
            Slot::At { offset, len } => {
                let mut buf = vec![0u8; *len as usize];
                self.file
                    .read_exact_at(&mut buf, *offset)
                    .map_err(|e| io("cannot read", &self.path(), e))?;
                Ok(buf)
            }
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        match self.index.get(key) {
            Some(slot) => self.value(slot).map(Some),
            None => Ok(None),
        }
    }

    /// The entries with keys between `lo` and `hi`, in key order.
    pub fn range<'a>(
        &'a self,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
    ) -> impl Iterator<Item = Result<(&'a [u8], Vec<u8>), Error>> + 'a {
        self.index
            .range::<[u8], _>((lo, hi))
            .map(move |(k, slot)| Ok((&k[..], self.value(slot)?)))
    }

    /// The entries whose keys start with `prefix`, in key order.
    pub fn scan_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = Result<(&'a [u8], Vec<u8>), Error>> + 'a {
        self.range(Bound::Included(prefix), Bound::Unbounded)
            .take_while(move |item| match item {
                Ok((k, _)) => k.starts_with(prefix),
                Err(_) => true,
            })
    }

    pub fn iter(&self) -> impl Iterator<Item = Result<(&[u8], Vec<u8>), Error>> + '_ {
        self.range(Bound::Unbounded, Bound::Unbounded)
    }

    /// Writes `writes` as one frame, then updates the index. On `Err` the index is unchanged,
    /// and whether the frame reached the file is unknown: reopen.
    pub fn apply(&mut self, writes: &[Write]) -> Result<(), Error> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut payload = Vec::new();
        let mut at = Vec::with_capacity(writes.len());
        for (k, v) in writes {
            at.push(put_op(&mut payload, k, v.as_deref()));
        }
        if payload.len() as u64 > MAX_FRAME as u64 {
            return Err(Error::Io(format!(
                "one batch of {} bytes is more than the data file's frame limit of {MAX_FRAME}",
                payload.len()
            )));
        }
        let bytes = frame(&payload);
        self.file
            .write_all_at(&bytes, self.end)
            .map_err(|e| io("cannot write", &self.path(), e))?;
        let base = self.end + FRAME_HEADER;
        self.end += bytes.len() as u64;
        for ((k, v), at) in writes.iter().zip(at) {
            let value = v.as_deref().map(|v| (base + at as u64, v));
            index_op(&mut self.index, &mut self.live, k, value);
        }
        if self.garbage() > self.checkpoint_min && self.garbage() > self.live {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn garbage(&self) -> u64 {
        self.end.saturating_sub(self.live)
    }

    /// Rewrites the live entries into a new data file and drops the old one.
    pub fn checkpoint(&mut self) -> Result<(), Error> {
        let mut items = self
            .index
            .iter()
            .map(|(k, s)| Ok((k.to_vec(), self.value(s)?)));
        let next = self.number + 1;
        Self::write_file(&self.dir, next, &mut |w| write_frames(w, &mut items))?;
        self.switch_to(next)
    }

    /// Replaces every entry with `items` (a snapshot import). The new content is durable when
    /// this returns. If `items` yields an error, nothing changed.
    pub fn replace(
        &mut self,
        items: &mut dyn Iterator<Item = Result<Entry, Error>>,
    ) -> Result<(), Error> {
        let next = self.number + 1;
        Self::write_file(&self.dir, next, &mut |w| write_frames(w, items))?;
        self.switch_to(next)
    }

    /// Makes `data-<n>.edb` (complete and synced) the data file, and deletes the old one.
    fn switch_to(&mut self, n: u64) -> Result<(), Error> {
        let old = self.path();
        self.file = Self::open_file(&self.dir, n)?;
        self.number = n;
        self.replay()?;
        fs::remove_file(&old).map_err(|e| io("cannot remove", &old, e))?;
        sync_dir(&self.dir)
    }

    /// Makes every applied batch durable.
    pub fn flush(&self) -> Result<(), Error> {
        self.file
            .sync_data()
            .map_err(|e| io("cannot fsync", &self.path(), e))
    }

    /// Bytes of the data file.
    pub fn size_on_disk(&self) -> u64 {
        self.end
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

/// What a replay of a data file gives.
struct Scan {
    index: BTreeMap<Box<[u8]>, Slot>,
    live: u64,
    /// End of the last whole frame.
    end: u64,
}

/// Replays the frames of a data file of `size` bytes read from `r`, up to the first one that is
/// short or fails its checksum. A bad header, or a frame that passes its checksum but does not
/// parse, is corruption. `name` names the file in errors.
fn scan(r: &mut dyn Read, size: u64, name: &dyn std::fmt::Display) -> Result<Scan, Error> {
    let mut head = [0u8; HEADER_LEN as usize];
    r.read_exact(&mut head)
        .map_err(|e| Error::Corrupt(format!("{name}: no header: {e}")))?;
    if &head[..8] != MAGIC {
        return Err(Error::Corrupt(format!("{name} is not an eden data file")));
    }
    let version = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(Error::Corrupt(format!(
            "{name} has format version {version}; this build reads version {VERSION}"
        )));
    }
    let mut index = BTreeMap::new();
    let mut live = 0u64;
    let mut end = HEADER_LEN;
    let mut payload = Vec::new();
    loop {
        let mut fh = [0u8; FRAME_HEADER as usize];
        if r.read_exact(&mut fh).is_err() {
            break;
        }
        let len = u32::from_be_bytes(fh[..4].try_into().expect("4 bytes"));
        let crc = u32::from_be_bytes(fh[4..].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_FRAME || end + FRAME_HEADER + len as u64 > size {
            break;
        }
        payload.resize(len as usize, 0);
        if r.read_exact(&mut payload).is_err() {
            break;
        }
        let mut c = Crc32c::new();
        c.update(&payload);
        if c.finish() != crc {
            break;
        }
        let ops = parse_ops(&payload).map_err(|why| {
            Error::Corrupt(format!(
                "{name}: frame at byte {end} passes its checksum but does not parse: {why}"
            ))
        })?;
        let base = end + FRAME_HEADER;
        for (key, value) in ops {
            index_op(
                &mut index,
                &mut live,
                key,
                value.map(|(at, v)| (base + at as u64, v)),
            );
        }
        end = base + len as u64;
    }
    Ok(Scan { index, live, end })
}

/// Replays the bytes of a data file as [`Tree::open`] would, without a file or a directory:
/// the entries it would keep (with their values) and the end of the last whole frame. For the
/// fuzz target and for checks.
pub fn scan_bytes(bytes: &[u8]) -> Result<(Vec<Entry>, u64), Error> {
    let Scan { index, end, .. } = scan(&mut &bytes[..], bytes.len() as u64, &"data file")?;
    let entries = index
        .into_iter()
        .map(|(k, slot)| {
            let v = match slot {
                Slot::Inline(v) => v.to_vec(),
                Slot::At { offset, len } => {
                    bytes[offset as usize..offset as usize + len as usize].to_vec()
                }
            };
            (k.to_vec(), v)
        })
        .collect();
    Ok((entries, end))
}

/// Applies one op to the index: a put of `value` (with its offset in the data file) or a removal.
/// `live` follows the bytes of keys and values the index refers to.
fn index_op(
    index: &mut BTreeMap<Box<[u8]>, Slot>,
    live: &mut u64,
    key: &[u8],
    value: Option<(u64, &[u8])>,
) {
    let old = match value {
        Some((offset, v)) => {
            *live += (key.len() + v.len()) as u64;
            let slot = if v.len() <= INLINE_MAX {
                Slot::Inline(v.into())
            } else {
                Slot::At {
                    offset,
                    len: v.len() as u32,
                }
            };
            index.insert(key.into(), slot)
        }
        None => index.remove(key),
    };
    if let Some(old) = old {
        *live -= key.len() as u64 + old.len();
    }
}

/// Writes `items` as put frames of about [`CHECKPOINT_FRAME`] bytes each.
fn write_frames(
    w: &mut dyn std::io::Write,
    items: &mut dyn Iterator<Item = Result<Entry, Error>>,
) -> Result<(), Error> {
    let werr = |e: std::io::Error| Error::Io(format!("cannot write a data file: {e}"));
    let mut payload = Vec::with_capacity(CHECKPOINT_FRAME);
    for item in items {
        let (k, v) = item?;
        if !payload.is_empty() && payload.len() + k.len() + v.len() + 9 > CHECKPOINT_FRAME {
            w.write_all(&frame(&payload)).map_err(werr)?;
            payload.clear();
        }
        put_op(&mut payload, &k, Some(&v));
        if payload.len() as u64 > MAX_FRAME as u64 {
            return Err(Error::Io(format!(
                "an entry of {} bytes is more than the data file's frame limit",
                v.len()
            )));
        }
    }
    if !payload.is_empty() {
        w.write_all(&frame(&payload)).map_err(werr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &[u8]) -> Write {
        (k.as_bytes().to_vec(), Some(v.to_vec()))
    }

    fn all(t: &Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
        t.iter()
            .map(|r| r.map(|(k, v)| (k.to_vec(), v)).unwrap())
            .collect()
    }

    #[test]
    fn batches_survive_reopen_with_small_and_large_values() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; 5000];
        {
            let mut t = Tree::open(dir.path()).unwrap();
            t.apply(&[put("a", b"1"), put("b", &big)]).unwrap();
            t.apply(&[(b"a".to_vec(), None), put("c", b"3")]).unwrap();
            assert_eq!(t.get(b"b").unwrap(), Some(big.clone()));
            assert_eq!(t.get(b"a").unwrap(), None);
            t.flush().unwrap();
        }
        let t = Tree::open(dir.path()).unwrap();
        assert_eq!(t.recovery(), Recovery::default());
        assert_eq!(
            all(&t),
            vec![(b"b".to_vec(), big.clone()), (b"c".to_vec(), b"3".to_vec())]
        );
        let prefixed: Vec<_> = t.scan_prefix(b"c").map(|r| r.unwrap().1).collect();
        assert_eq!(prefixed, vec![b"3".to_vec()]);
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = Tree::open(dir.path()).unwrap();
        let err = Tree::open(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("locked"), "{err}");
        drop(first);
        Tree::open(dir.path()).expect("free once the first is closed");
    }

    /// Every cut of the last frame loses that batch only, whole.
    #[test]
    fn a_torn_last_batch_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1));
        let (before, full) = {
            let mut t = Tree::open(dir.path()).unwrap();
            t.apply(&[put("a", b"1")]).unwrap();
            let before = t.end;
            t.apply(&[put("b", &[9u8; 300]), put("c", b"2")]).unwrap();
            (before, t.end)
        };
        let bytes = fs::read(&path).unwrap();
        for cut in before..full {
            fs::write(&path, &bytes[..cut as usize]).unwrap();
            let t = Tree::open(dir.path()).unwrap();
            assert_eq!(
                all(&t),
                vec![(b"a".to_vec(), b"1".to_vec())],
                "cut at {cut}"
            );
            assert_eq!(t.recovery().cut_bytes, cut - before);
            assert_eq!(fs::metadata(&path).unwrap().len(), before);
        }
        // A flipped byte in the last frame fails its CRC: the frame is cut, and reported as
        // non-zero bytes.
        let mut damaged = bytes.clone();
        damaged[full as usize - 1] ^= 0xff;
        fs::write(&path, &damaged).unwrap();
        let t = Tree::open(dir.path()).unwrap();
        assert_eq!(all(&t), vec![(b"a".to_vec(), b"1".to_vec())]);
        assert!(t.recovery().cut_nonzero);
        // A zero-filled tail (the file grew but its pages were never written) is cut silently.
        drop(t);
        let mut zeros = bytes[..full as usize].to_vec();
        zeros.extend_from_slice(&[0u8; 4096]);
        fs::write(&path, &zeros).unwrap();
        let t = Tree::open(dir.path()).unwrap();
        assert_eq!(all(&t).len(), 3);
        assert_eq!(
            t.recovery(),
            Recovery {
                cut_bytes: 4096,
                cut_nonzero: false
            }
        );
    }

    #[test]
    fn a_checkpoint_keeps_the_live_entries_and_drops_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![1u8; 1000];
        let mut t = Tree::open(dir.path()).unwrap();
        for i in 0..200 {
            t.apply(&[put(&format!("k{}", i % 10), &big), put("small", b"s")])
                .unwrap();
        }
        let expected = all(&t);
        let before = t.size_on_disk();
        t.checkpoint().unwrap();
        assert!(
            t.size_on_disk() < before / 10,
            "{} vs {before}",
            t.size_on_disk()
        );
        assert_eq!(all(&t), expected);
        assert!(!dir.path().join(file_name(1)).exists());
        assert!(dir.path().join(file_name(2)).exists());
        t.apply(&[put("after", b"x")]).unwrap();
        drop(t);
        let t = Tree::open(dir.path()).unwrap();
        assert_eq!(all(&t).len(), expected.len() + 1);
    }

    /// A crash inside a checkpoint leaves `.tmp` (ignored) or both files (the newer wins).
    #[test]
    fn open_after_an_unfinished_checkpoint_uses_the_newest_complete_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut t = Tree::open(dir.path()).unwrap();
            t.apply(&[put("a", b"1")]).unwrap();
            t.flush().unwrap();
        }
        fs::write(dir.path().join(tmp_name(2)), b"EDENTREE half").unwrap();
        let t = Tree::open(dir.path()).unwrap();
        assert_eq!(all(&t), vec![(b"a".to_vec(), b"1".to_vec())]);
        assert!(!dir.path().join(tmp_name(2)).exists());
        drop(t);
        // The checkpoint renamed but the old file was not yet deleted.
        let old = fs::read(dir.path().join(file_name(1))).unwrap();
        {
            let mut t = Tree::open(dir.path()).unwrap();
            t.apply(&[put("b", b"2")]).unwrap();
            t.checkpoint().unwrap();
        }
        fs::write(dir.path().join(file_name(1)), old).unwrap();
        let t = Tree::open(dir.path()).unwrap();
        assert_eq!(all(&t).len(), 2);
        assert!(!dir.path().join(file_name(1)).exists());
    }

    #[test]
    fn a_failed_replace_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::open(dir.path()).unwrap();
        t.apply(&[put("a", b"1")]).unwrap();
        let mut bad = vec![
            Ok((b"x".to_vec(), b"y".to_vec())),
            Err(Error::InvalidSnapshot("broken".into())),
        ]
        .into_iter();
        assert!(t.replace(&mut bad).is_err());
        assert_eq!(all(&t), vec![(b"a".to_vec(), b"1".to_vec())]);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("data-"))
            .collect();
        assert_eq!(names, vec![file_name(1)]);
        let mut good = vec![Ok((b"x".to_vec(), vec![5u8; 200]))].into_iter();
        t.replace(&mut good).unwrap();
        assert_eq!(all(&t), vec![(b"x".to_vec(), vec![5u8; 200])]);
        drop(t);
        let t = Tree::open(dir.path()).unwrap();
        assert_eq!(all(&t), vec![(b"x".to_vec(), vec![5u8; 200])]);
    }
}
