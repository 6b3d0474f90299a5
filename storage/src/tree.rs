//! [`Tree`]: the store's ordered key/value map, with its own file format.
//!
//! The keys (and small values) live in memory in a `BTreeMap`; every value also lives in one
//! append-only data file, `data-<N>.edb`, where larger values are read back with `pread`. The
//! file is a header and a sequence of frames:
//!
//! ```text
//! header: "EDENTREE" | version u32 BE | base u64 BE
//! frame:  payload length u32 BE | CRC-32C of the payload u32 BE | payload
//! payload: op*   op = 1 | klen u32 BE | key | vlen u32 BE | value     (put)
//!                     2 | klen u32 BE | key                           (remove)
//! ```
//!
//! `base` is the length the file had when it was created and synced (a checkpoint's or an
//! import's content); the frames after it are appended batches. `SYNCED` in the directory holds
//! the file number and length of the last [`Tree::flush`], with a CRC.
//!
//! ## Contract
//! - **Atomic batches.** [`Tree::apply`] writes one frame with one `pwrite`. On open the frames
//!   are replayed in order. The first frame that is short or fails its CRC ends the file: if it
//!   lies past everything known to be synced (`base`, and `SYNCED` for this file), the bytes
//!   from it on are cut, since a crash tore that write or the page cache never wrote it out.
//!   If it lies before, the disk lost or changed synced data, and open refuses with
//!   [`Error::Corrupt`] and changes nothing. A batch is therefore whole or absent after a crash,
//!   never torn, and a synced batch is never silently dropped.
//! - **Durable after [`Tree::flush`]** (`fdatasync`). Nothing is synced per batch: the caller
//!   (the Raft layer) keeps its own durable log and re-applies what a crash took.
//! - **New files.** A checkpoint ([`Tree::checkpoint`]) or an import ([`Tree::replace`]) writes
//!   `data-<N+1>.tmp`, building its index on the way, syncs it, lets the caller check it (an
//!   import loads its keyspace), renames it to `data-<N+1>.edb`, syncs the directory and only
//!   then deletes `data-<N>.edb`. Open uses the highest-numbered `.edb` and, once it has
//!   replayed, deletes the others and every `.tmp`. A crash at any point leaves either the old
//!   file or the complete new one.
//! - **Garbage.** Overwritten and removed values stay in the file. [`Tree::checkpoint_due`]
//!   says when the garbage passes both the checkpoint threshold ([`CHECKPOINT_MIN`] by default)
//!   and the live bytes; the caller then checkpoints, in one step ([`Tree::checkpoint`]) or in
//!   two, the first of which needs only `&self` ([`Tree::prepare_checkpoint`],
//!   [`Tree::finish_checkpoint`]).
//! - **One process.** `LOCK` in the directory is `flock`ed while a tree is open.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Write as _};
use std::ops::{Bound, Deref};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::codec::Crc32c;
use crate::error::Error;

const MAGIC: &[u8; 8] = b"EDENTREE";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 20;
const FRAME_HEADER: u64 = 8;
/// Tag, key length and value length of one op.
const OP_HEADER: u64 = 9;
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
const SYNCED: &str = "SYNCED";

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

/// One data file and the index of what it holds. [`Tree`] derefs to the current one; a
/// checkpoint or an import builds the next one beside it.
pub struct Contents {
    number: u64,
    path: PathBuf,
    file: File,
    /// End of the last whole frame: where the next one goes.
    end: u64,
    index: BTreeMap<Box<[u8]>, Slot>,
    /// Bytes of the ops the index refers to (keys, values and op headers). The rest of the file
    /// is file and frame headers, and garbage.
    live: u64,
}

/// A checkpoint written by [`Tree::prepare_checkpoint`], not yet in place.
pub struct PreparedCheckpoint {
    contents: Contents,
    /// The data file's number and length it was made from.
    from: (u64, u64),
}

pub struct Tree {
    dir: PathBuf,
    _lock: File,
    synced: File,
    data: Contents,
    /// Garbage that may pile up before a checkpoint (besides being more than the live bytes).
    checkpoint_min: u64,
    /// After a failed checkpoint, the next waits until the garbage reaches this.
    retry_at: u64,
    recovery: Recovery,
}

impl Deref for Tree {
    type Target = Contents;
    fn deref(&self) -> &Contents {
        &self.data
    }
}

fn file_name(n: u64) -> String {
    format!("data-{n:08}.edb")
}

fn tmp_name(n: u64) -> String {
    format!("data-{n:08}.tmp")
}

/// The number of a data file (`true`) or of an unfinished one (`false`), for names exactly as
/// [`file_name`] and [`tmp_name`] write them.
fn number_of(name: &str) -> Option<(u64, bool)> {
    let digits = name
        .strip_prefix("data-")?
        .get(..name.len().checked_sub(9)?)?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    if name == file_name(n) {
        Some((n, true))
    } else if name == tmp_name(n) {
        Some((n, false))
    } else {
        None
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
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

/// Appends one op to a frame buffer; returns the offset of the value within the buffer.
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

/// A frame buffer: room for the frame header, then ops.
fn new_frame() -> Vec<u8> {
    vec![0u8; FRAME_HEADER as usize]
}

/// Fills in the frame header of a buffer from [`new_frame`] and [`put_op`].
fn seal_frame(buf: &mut [u8]) -> Result<(), Error> {
    let len = buf.len() as u64 - FRAME_HEADER;
    if len > MAX_FRAME as u64 {
        return Err(Error::Io(format!(
            "a batch of {len} bytes is more than the data file's frame limit of {MAX_FRAME}"
        )));
    }
    let mut crc = Crc32c::new();
    crc.update(&buf[FRAME_HEADER as usize..]);
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    buf[4..8].copy_from_slice(&crc.finish().to_be_bytes());
    Ok(())
}

fn header(base: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_be_bytes());
    h[12..].copy_from_slice(&base.to_be_bytes());
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

/// Applies one op to an index: a put of `value` (with its offset in the data file) or a
/// removal. `live` follows the bytes of the ops the index refers to.
fn index_op(
    index: &mut BTreeMap<Box<[u8]>, Slot>,
    live: &mut u64,
    key: &[u8],
    value: Option<(u64, &[u8])>,
) {
    let old = match value {
        Some((offset, v)) => {
            *live += OP_HEADER + (key.len() + v.len()) as u64;
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
        *live -= OP_HEADER + key.len() as u64 + old.len();
    }
}

/// What a replay of a data file gives.
struct Scan {
    index: BTreeMap<Box<[u8]>, Slot>,
    live: u64,
    /// The header's `base`: the file was synced up to here when it was created.
    base: u64,
    /// End of the last whole frame.
    end: u64,
}

/// `read_exact` that tells the end of the input (`Ok(false)`) from a failure to read.
fn read_full(
    r: &mut dyn Read,
    buf: &mut [u8],
    name: &dyn std::fmt::Display,
) -> Result<bool, Error> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::Io(format!("cannot read {name}: {e}"))),
    }
}

/// Replays the frames of a data file of `size` bytes read from `r`, up to the first one that is
/// short or fails its checksum. A bad header, or a frame that passes its checksum but does not
/// parse, is corruption. `name` names the file in errors.
fn scan(r: &mut dyn Read, size: u64, name: &dyn std::fmt::Display) -> Result<Scan, Error> {
    let mut head = [0u8; HEADER_LEN as usize];
    if !read_full(r, &mut head, name)? {
        return Err(Error::Corrupt(format!("{name}: the header is cut short")));
    }
    if &head[..8] != MAGIC {
        return Err(Error::Corrupt(format!("{name} is not an eden data file")));
    }
    let version = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(Error::Corrupt(format!(
            "{name} has format version {version}; this build reads version {VERSION}"
        )));
    }
    let base = u64::from_be_bytes(head[12..].try_into().expect("8 bytes"));
    let mut index = BTreeMap::new();
    let mut live = 0u64;
    let mut end = HEADER_LEN;
    let mut payload = Vec::new();
    loop {
        let mut fh = [0u8; FRAME_HEADER as usize];
        if !read_full(r, &mut fh, name)? {
            break;
        }
        let len = u32::from_be_bytes(fh[..4].try_into().expect("4 bytes"));
        let crc = u32::from_be_bytes(fh[4..].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_FRAME || end + FRAME_HEADER + len as u64 > size {
            break;
        }
        payload.resize(len as usize, 0);
        if !read_full(r, &mut payload, name)? {
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
        let start = end + FRAME_HEADER;
        for (key, value) in ops {
            index_op(
                &mut index,
                &mut live,
                key,
                value.map(|(at, v)| (start + at as u64, v)),
            );
        }
        end = start + len as u64;
    }
    Ok(Scan {
        index,
        live,
        base,
        end,
    })
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

/// The `SYNCED` record: file number, length, CRC-32C of the 16 bytes before it.
fn encode_synced(number: u64, end: u64) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(&number.to_be_bytes());
    b[8..16].copy_from_slice(&end.to_be_bytes());
    let mut c = Crc32c::new();
    c.update(&b[..16]);
    b[16..].copy_from_slice(&c.finish().to_be_bytes());
    b
}

/// The `(file number, length)` of the last flush, if the record is whole.
fn decode_synced(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() < 20 {
        return None;
    }
    let mut c = Crc32c::new();
    c.update(&b[..16]);
    if c.finish().to_be_bytes() != b[16..20] {
        return None;
    }
    Some((
        u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
        u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
    ))
}

impl Contents {
    fn value(&self, slot: &Slot) -> Result<Vec<u8>, Error> {
        match slot {
            Slot::Inline(v) => Ok(v.to_vec()),
            Slot::At { offset, len } => {
                let mut buf = vec![0u8; *len as usize];
                self.file
                    .read_exact_at(&mut buf, *offset)
                    .map_err(|e| io("cannot read", &self.path, e))?;
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

    /// The entries with keys between `lo` and `hi`, in key order (none if `lo` is above `hi`).
    pub fn range<'a>(
        &'a self,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
    ) -> impl Iterator<Item = Result<(&'a [u8], Vec<u8>), Error>> + 'a {
        let empty = match (lo, hi) {
            (Bound::Included(a), Bound::Included(b)) => a > b,
            (Bound::Included(a) | Bound::Excluded(a), Bound::Excluded(b))
            | (Bound::Excluded(a), Bound::Included(b)) => a >= b,
            _ => false,
        };
        let items = if empty {
            None
        } else {
            Some(self.index.range::<[u8], _>((lo, hi)))
        };
        items
            .into_iter()
            .flatten()
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

    fn garbage(&self) -> u64 {
        self.end.saturating_sub(self.live)
    }
}

/// Writes `data-<n>.tmp`: the header and `items` as put frames of about [`CHECKPOINT_FRAME`]
/// bytes, indexed on the way, then syncs it. On error the file is removed.
fn write_new(
    dir: &Path,
    n: u64,
    items: &mut dyn Iterator<Item = Result<Entry, Error>>,
) -> Result<Contents, Error> {
    let path = dir.join(tmp_name(n));
    let result = (|| {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io("cannot create", &path, e))?;
        let werr = |e: std::io::Error| io("cannot write", &path, e);
        let mut index = BTreeMap::new();
        let mut live = 0u64;
        let mut end = HEADER_LEN;
        {
            let mut w = std::io::BufWriter::with_capacity(CHECKPOINT_FRAME, &file);
            w.write_all(&header(0)).map_err(werr)?;
            let mut frame = new_frame();
            // The entries of the frame being filled: key, value offset in the frame, length,
            // and the value itself if it is small enough to keep in memory.
            type Pending = Vec<(Box<[u8]>, usize, usize, Option<Box<[u8]>>)>;
            let mut pending: Pending = Vec::new();
            let mut emit = |frame: &mut Vec<u8>, pending: &mut Pending, end: &mut u64| {
                if frame.len() as u64 == FRAME_HEADER {
                    return Ok::<(), Error>(());
                }
                seal_frame(frame)?;
                w.write_all(frame).map_err(werr)?;
                for (k, at, len, small) in pending.drain(..) {
                    let klen = k.len() as u64;
                    live += OP_HEADER + klen + len as u64;
                    let slot = match small {
                        Some(v) => Slot::Inline(v),
                        None => Slot::At {
                            offset: *end + at as u64,
                            len: len as u32,
                        },
                    };
                    if let Some(old) = index.insert(k, slot) {
                        live -= OP_HEADER + klen + old.len();
                    }
                }
                *end += frame.len() as u64;
                frame.truncate(FRAME_HEADER as usize);
                Ok(())
            };
            for item in items {
                let (k, v) = item?;
                if frame.len() as u64 > FRAME_HEADER
                    && frame.len() + k.len() + v.len() + OP_HEADER as usize > CHECKPOINT_FRAME
                {
                    emit(&mut frame, &mut pending, &mut end)?;
                }
                let at = put_op(&mut frame, &k, Some(&v));
                let len = v.len();
                let small = (len <= INLINE_MAX).then(|| v.into_boxed_slice());
                pending.push((k.into_boxed_slice(), at, len, small));
            }
            emit(&mut frame, &mut pending, &mut end)?;
            w.flush().map_err(werr)?;
        }
        // Every byte written so far is synced below: that is the file's base.
        file.write_all_at(&header(end), 0).map_err(werr)?;
        file.sync_all().map_err(|e| io("cannot fsync", &path, e))?;
        Ok(Contents {
            number: n,
            path: path.clone(),
            file,
            end,
            index,
            live,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&path);
    }
    result
}

impl Tree {
    /// Opens (or creates) the tree in `dir`, replaying its data file and cutting a torn tail.
    pub fn open(dir: &Path) -> Result<Tree, Error> {
        Self::open_with(dir, CHECKPOINT_MIN)
    }

    /// [`Tree::open`], with a checkpoint due once the garbage passes `checkpoint_min` bytes
    /// (and the live bytes) instead of [`CHECKPOINT_MIN`].
    pub fn open_with(dir: &Path, checkpoint_min: u64) -> Result<Tree, Error> {
        fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| io("cannot open the lock file in", dir, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::Io(format!(
                    "{} is locked by another process (is another eden running on this data \
                     directory?)",
                    dir.display()
                )))
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(io("cannot lock", &dir.join("LOCK"), e));
            }
        }
        let synced_path = dir.join(SYNCED);
        let synced = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&synced_path)
            .map_err(|e| io("cannot open", &synced_path, e))?;
        let mut complete = Vec::new();
        let mut partial = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| io("cannot list", dir, e))? {
            let entry = entry.map_err(|e| io("cannot list", dir, e))?;
            match number_of(&entry.file_name().to_string_lossy()) {
                Some((n, true)) => complete.push(n),
                Some((n, false)) => partial.push(n),
                None => {}
            }
        }
        complete.sort_unstable();
        let (data, recovery) = match complete.last() {
            Some(&n) => Self::replay(dir, n, &synced)?,
            None => {
                let mut c = write_new(dir, 1, &mut std::iter::empty())?;
                Self::commit(dir, &mut c)?;
                (c, Recovery::default())
            }
        };
        // Older files were replaced by a checkpoint whose deletes did not finish; `.tmp` files
        // are checkpoints or imports that did not finish. Only now that the newest file has
        // replayed are they let go.
        let stale: Vec<PathBuf> = complete
            .iter()
            .filter(|&&n| n != data.number)
            .map(|&n| dir.join(file_name(n)))
            .chain(partial.iter().map(|&n| dir.join(tmp_name(n))))
            .collect();
        if !stale.is_empty() {
            for path in stale {
                let _ = fs::remove_file(path);
            }
            sync_dir(dir)?;
        }
        Ok(Tree {
            dir: dir.to_path_buf(),
            _lock: lock,
            synced,
            data,
            checkpoint_min,
            retry_at: 0,
            recovery,
        })
    }

    /// Replays `data-<n>.edb`; cuts what follows the last whole frame if that lies past what
    /// was synced, and refuses to open otherwise.
    fn replay(dir: &Path, n: u64, synced: &File) -> Result<(Contents, Recovery), Error> {
        let path = dir.join(file_name(n));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("cannot open", &path, e))?;
        let size = file
            .metadata()
            .map_err(|e| io("cannot stat", &path, e))?
            .len();
        let Scan {
            index,
            live,
            base,
            end,
        } = scan(
            &mut BufReader::with_capacity(1 << 20, &file),
            size,
            &path.display(),
        )?;
        let mut mark = [0u8; 20];
        let flushed = match synced.read_at(&mut mark, 0) {
            Ok(20) => decode_synced(&mark)
                .filter(|&(number, _)| number == n)
                .map_or(0, |(_, len)| len),
            _ => 0,
        };
        let durable = base.max(flushed);
        if end < durable {
            return Err(Error::Corrupt(format!(
                "{}: the data ends in damage at byte {end}, but it was synced up to byte \
                 {durable}: the disk lost or changed synced data. The file is left as it is; \
                 rebuild this node's store from a snapshot or another replica",
                path.display()
            )));
        }
        let mut recovery = Recovery::default();
        if end < size {
            let mut rest = vec![0u8; (size - end).min(1 << 20) as usize];
            let nonzero = file
                .read_exact_at(&mut rest, end)
                .map(|()| rest.iter().any(|&b| b != 0))
                .unwrap_or(true);
            file.set_len(end)
                .and_then(|()| file.sync_all())
                .map_err(|e| io("cannot cut the torn tail of", &path, e))?;
            recovery = Recovery {
                cut_bytes: size - end,
                cut_nonzero: nonzero,
            };
        }
        let contents = Contents {
            number: n,
            path,
            file,
            end,
            index,
            live,
        };
        Ok((contents, recovery))
    }

    /// Renames a file from [`write_new`] into place and syncs the directory. On error the new
    /// file is removed (under either name), so the directory's newest data file is unchanged.
    fn commit(dir: &Path, c: &mut Contents) -> Result<(), Error> {
        let path = dir.join(file_name(c.number));
        if let Err(e) = fs::rename(&c.path, &path) {
            let _ = fs::remove_file(&c.path);
            return Err(io("cannot rename", &c.path, e));
        }
        if let Err(e) = sync_dir(dir) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        c.path = path;
        Ok(())
    }

    /// Makes a committed new file the current one and deletes the old one (best effort: open
    /// deletes what is left).
    fn switch_to(&mut self, c: Contents) {
        let old = std::mem::replace(&mut self.data, c);
        drop(old.file);
        if fs::remove_file(&old.path).is_ok() {
            let _ = sync_dir(&self.dir);
        }
        self.retry_at = 0;
    }

    /// Whether this is the empty first data file of a directory that had none.
    pub fn is_fresh(&self) -> bool {
        self.data.number == 1 && self.data.index.is_empty()
    }

    /// What open cut from the end of the file.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// Writes `writes` as one frame, then updates the index. On `Err` the index is unchanged,
    /// and the frame is not in the file (or, if even cutting it back failed, reopen).
    pub fn apply(&mut self, writes: &[Write]) -> Result<(), Error> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut frame = new_frame();
        let mut at = Vec::with_capacity(writes.len());
        for (k, v) in writes {
            at.push(put_op(&mut frame, k, v.as_deref()));
        }
        seal_frame(&mut frame)?;
        let data = &mut self.data;
        if let Err(e) = data.file.write_all_at(&frame, data.end) {
            // Nothing may follow the last whole frame: a later, shorter frame would leave
            // this one's tail after it.
            let _ = data.file.set_len(data.end);
            return Err(io("cannot write", &data.path, e));
        }
        let base = data.end;
        data.end += frame.len() as u64;
        for ((k, v), at) in writes.iter().zip(at) {
            let value = v.as_deref().map(|v| (base + at as u64, v));
            index_op(&mut data.index, &mut data.live, k, value);
        }
        Ok(())
    }

    /// Whether the garbage calls for a [`Tree::checkpoint`]: more than the threshold, more than
    /// the live bytes, and, after a failed checkpoint, another threshold's worth since.
    pub fn checkpoint_due(&self) -> bool {
        let garbage = self.garbage();
        garbage > self.checkpoint_min && garbage > self.live && garbage >= self.retry_at
    }

    /// Rewrites the live entries into a new data file and drops the old one. On `Err` the tree
    /// is unchanged, and the next checkpoint is due only once another threshold's worth of
    /// garbage has piled up.
    pub fn checkpoint(&mut self) -> Result<(), Error> {
        let done = self
            .prepare_checkpoint()
            .and_then(|p| self.finish_checkpoint(p));
        if done.is_err() {
            self.checkpoint_failed();
        }
        done.map(drop)
    }

    /// The first half of a checkpoint: writes the live entries into the next data file, synced,
    /// under its temporary name. It needs only `&self`, so reads may go on meanwhile;
    /// [`Tree::finish_checkpoint`] puts it in place if nothing was written since.
    pub fn prepare_checkpoint(&self) -> Result<PreparedCheckpoint, Error> {
        let data = &self.data;
        let mut items = data
            .index
            .iter()
            .map(|(k, s)| Ok((k.to_vec(), data.value(s)?)));
        let contents = write_new(&self.dir, data.number + 1, &mut items)?;
        Ok(PreparedCheckpoint {
            contents,
            from: (data.number, data.end),
        })
    }

    /// The second half of a checkpoint: renames the prepared file into place and drops the old
    /// one. `Ok(false)` if the tree changed since the checkpoint was prepared: it is discarded
    /// and the tree is unchanged.
    pub fn finish_checkpoint(&mut self, p: PreparedCheckpoint) -> Result<bool, Error> {
        let PreparedCheckpoint { mut contents, from } = p;
        if from != (self.data.number, self.data.end) {
            let _ = fs::remove_file(&contents.path);
            return Ok(false);
        }
        Self::commit(&self.dir, &mut contents)?;
        self.switch_to(contents);
        Ok(true)
    }

    /// Records a failed checkpoint: the next is due only once another threshold's worth of
    /// garbage has piled up.
    pub fn checkpoint_failed(&mut self) {
        self.retry_at = self.garbage() + self.checkpoint_min;
    }

    /// Replaces every entry with `items` (a snapshot import). The new file is written and
    /// synced, `check` is run on its contents, and only if both succeed is it put in place: the
    /// new content is durable when this returns. On `Err` nothing changed.
    pub fn replace(
        &mut self,
        items: &mut dyn Iterator<Item = Result<Entry, Error>>,
        check: &mut dyn FnMut(&Contents) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut c = write_new(&self.dir, self.data.number + 1, items)?;
        if let Err(e) = check(&c) {
            let _ = fs::remove_file(&c.path);
            return Err(e);
        }
        Self::commit(&self.dir, &mut c)?;
        self.switch_to(c);
        Ok(())
    }

    /// Makes every applied batch durable, and records how far (`SYNCED`) so that open can tell
    /// damage to synced data from a torn tail.
    pub fn flush(&self) -> Result<(), Error> {
        let data = &self.data;
        data.file
            .sync_data()
            .map_err(|e| io("cannot fsync", &data.path, e))?;
        let synced_path = self.dir.join(SYNCED);
        self.synced
            .write_all_at(&encode_synced(data.number, data.end), 0)
            .and_then(|()| self.synced.sync_data())
            .map_err(|e| io("cannot record the synced length in", &synced_path, e))
    }
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

    fn no_check(_: &Contents) -> Result<(), Error> {
        Ok(())
    }

    #[test]
    fn batches_survive_reopen_with_small_and_large_values() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; 5000];
        {
            let mut t = Tree::open(dir.path()).unwrap();
            assert!(t.is_fresh());
            t.apply(&[put("a", b"1"), put("b", &big)]).unwrap();
            t.apply(&[(b"a".to_vec(), None), put("c", b"3")]).unwrap();
            assert_eq!(t.get(b"b").unwrap(), Some(big.clone()));
            assert_eq!(t.get(b"a").unwrap(), None);
            t.flush().unwrap();
        }
        let t = Tree::open(dir.path()).unwrap();
        assert!(!t.is_fresh());
        assert_eq!(t.recovery(), Recovery::default());
        assert_eq!(
            all(&t),
            vec![(b"b".to_vec(), big.clone()), (b"c".to_vec(), b"3".to_vec())]
        );
        let prefixed: Vec<_> = t.scan_prefix(b"c").map(|r| r.unwrap().1).collect();
        assert_eq!(prefixed, vec![b"3".to_vec()]);
        // Inverted bounds give nothing (BTreeMap::range would panic).
        let inverted = t.range(Bound::Included(&b"c"[..]), Bound::Excluded(&b"a"[..]));
        assert_eq!(inverted.count(), 0);
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

    /// Every cut of the last, unsynced frame loses that batch only, whole.
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

    /// Damage before the synced length is not a torn tail: open refuses and leaves the file.
    #[test]
    fn damage_to_synced_data_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1));
        let synced_end = {
            let mut t = Tree::open(dir.path()).unwrap();
            for i in 0..10 {
                t.apply(&[put(&format!("k{i}"), b"v")]).unwrap();
            }
            t.flush().unwrap();
            let end = t.end;
            t.apply(&[put("unsynced", b"x")]).unwrap();
            end
        };
        let bytes = fs::read(&path).unwrap();
        let mut damaged = bytes.clone();
        damaged[HEADER_LEN as usize + 10] ^= 0x01; // inside the first frame
        fs::write(&path, &damaged).unwrap();
        let err = Tree::open(dir.path()).err().expect("refused");
        assert!(matches!(err, Error::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("synced"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), damaged, "the file was changed");
        // A file cut short of its synced length is refused the same way.
        fs::write(&path, &bytes[..synced_end as usize - 3]).unwrap();
        assert!(matches!(Tree::open(dir.path()), Err(Error::Corrupt(_))));
        // Damage past the synced length is a torn tail: cut.
        let mut tail = bytes.clone();
        let last = tail.len() - 1;
        tail[last] ^= 0x01;
        fs::write(&path, &tail).unwrap();
        let t = Tree::open(dir.path()).unwrap();
        assert_eq!(t.len(), 10);
        assert_eq!(t.recovery().cut_bytes, bytes.len() as u64 - synced_end);
    }

    /// A checkpoint's content was synced when it was made: damage there is refused too.
    #[test]
    fn damage_to_a_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut t = Tree::open(dir.path()).unwrap();
            t.apply(&[put("a", b"1"), put("b", b"2")]).unwrap();
            t.checkpoint().unwrap();
        }
        let path = dir.path().join(file_name(2));
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(Tree::open(dir.path()), Err(Error::Corrupt(_))));
    }

    #[test]
    fn a_checkpoint_keeps_the_live_entries_and_drops_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![1u8; 1000];
        let mut t = Tree::open_with(dir.path(), 10_000).unwrap();
        let mut due_at = None;
        for i in 0..200 {
            t.apply(&[put(&format!("k{}", i % 10), &big), put("small", b"s")])
                .unwrap();
            if due_at.is_none() && t.checkpoint_due() {
                due_at = Some(i);
            }
        }
        assert!(
            due_at.is_some(),
            "200 overwrites of 10 keys make a checkpoint due"
        );
        let expected = all(&t);
        let before = t.size_on_disk();
        t.checkpoint().unwrap();
        assert!(!t.checkpoint_due());
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

    /// A checkpoint that cannot write its file leaves the tree as it was, and is not due again
    /// until another threshold's worth of garbage has piled up.
    #[test]
    fn a_failed_checkpoint_changes_nothing_and_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::open_with(dir.path(), 1000).unwrap();
        for i in 0..20 {
            t.apply(&[put("k", &[i as u8; 200])]).unwrap();
        }
        assert!(t.checkpoint_due());
        let expected = all(&t);
        let blocker = dir.path().join(tmp_name(2));
        fs::create_dir(&blocker).unwrap();
        assert!(t.checkpoint().is_err());
        assert_eq!(all(&t), expected);
        assert!(!t.checkpoint_due(), "retried at once");
        for i in 0..3 {
            t.apply(&[put("k", &[i as u8; 200])]).unwrap();
        }
        assert!(
            !t.checkpoint_due(),
            "retried before another threshold's worth"
        );
        for i in 0..10 {
            t.apply(&[put("k", &[i as u8; 200])]).unwrap();
        }
        assert!(t.checkpoint_due());
        fs::remove_dir(&blocker).unwrap();
        t.checkpoint().unwrap();
        assert_eq!(t.get(b"k").unwrap(), Some(vec![9u8; 200]));
    }

    /// A checkpoint prepared before a write is discarded, not put in place: it would lack the
    /// write.
    #[test]
    fn a_checkpoint_prepared_before_a_write_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::open(dir.path()).unwrap();
        t.apply(&[put("a", b"1")]).unwrap();
        let prepared = t.prepare_checkpoint().unwrap();
        assert!(dir.path().join(tmp_name(2)).exists());
        t.apply(&[put("b", b"2")]).unwrap();
        assert!(!t.finish_checkpoint(prepared).unwrap());
        assert!(!dir.path().join(tmp_name(2)).exists());
        assert!(!dir.path().join(file_name(2)).exists());
        assert_eq!(all(&t).len(), 2);
        let prepared = t.prepare_checkpoint().unwrap();
        assert!(t.finish_checkpoint(prepared).unwrap());
        assert!(dir.path().join(file_name(2)).exists());
        drop(t);
        assert_eq!(all(&Tree::open(dir.path()).unwrap()).len(), 2);
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
        let data_files = |dir: &Path| -> Vec<String> {
            fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("data-"))
                .collect()
        };
        // The stream fails partway.
        let mut bad = vec![
            Ok((b"x".to_vec(), b"y".to_vec())),
            Err(Error::InvalidSnapshot("broken".into())),
        ]
        .into_iter();
        assert!(t.replace(&mut bad, &mut no_check).is_err());
        assert_eq!(all(&t), vec![(b"a".to_vec(), b"1".to_vec())]);
        assert_eq!(data_files(dir.path()), vec![file_name(1)]);
        // The stream is whole but its content fails the caller's check.
        let mut whole = vec![Ok((b"x".to_vec(), b"y".to_vec()))].into_iter();
        let mut refuse = |c: &Contents| -> Result<(), Error> {
            assert_eq!(c.get(b"x").unwrap(), Some(b"y".to_vec()));
            Err(Error::InvalidSnapshot("does not load".into()))
        };
        assert!(t.replace(&mut whole, &mut refuse).is_err());
        assert_eq!(all(&t), vec![(b"a".to_vec(), b"1".to_vec())]);
        assert_eq!(data_files(dir.path()), vec![file_name(1)]);
        let mut good = vec![
            Ok((b"x".to_vec(), vec![5u8; 200])),
            Ok((b"y".to_vec(), b"small".to_vec())),
        ]
        .into_iter();
        t.replace(&mut good, &mut no_check).unwrap();
        let expected = vec![
            (b"x".to_vec(), vec![5u8; 200]),
            (b"y".to_vec(), b"small".to_vec()),
        ];
        assert_eq!(all(&t), expected);
        drop(t);
        let t = Tree::open(dir.path()).unwrap();
        assert_eq!(all(&t), expected);
    }

    #[test]
    fn only_exact_data_file_names_count() {
        assert_eq!(number_of("data-00000005.edb"), Some((5, true)));
        assert_eq!(number_of("data-00000005.tmp"), Some((5, false)));
        assert_eq!(number_of("data-123456789.edb"), Some((123_456_789, true)));
        for bad in [
            "data-5.edb",
            "data-+0000005.edb",
            "data-00000005.edbx",
            "data-.edb",
            "x",
        ] {
            assert_eq!(number_of(bad), None, "{bad}");
        }
    }
}
