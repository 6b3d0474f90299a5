//! The bytes on disk: tree keys and record encodings.
//!
//! Everything a store holds lives in one ordered tree (see `tree.rs`), with a
//! one-byte prefix per kind of entry:
//!
//! | key                                   | value                         |
//! |---------------------------------------|-------------------------------|
//! | `h` + main rev (u64 BE) + sub (u32 BE) | a [`Record`] (history)        |
//! | `l` + lease id (i64, sign-flipped BE) | [`encode_lease`]: the TTL      |
//! | `m` + name (`rev`, `compact`, `lease_seq`) | i64 BE                   |
//! | `u` + caller's key                    | caller's bytes (Raft meta)    |
//!
//! Big-endian revisions make the tree's byte order the revision order, so replaying history is a
//! plain range scan. Every value starts with a format version byte; decoders are total (they
//! return an error, never panic, on any input) so they can be fuzzed.

use crate::error::Error;
use crate::types::{AlarmMember, AlarmType, EventKind, KeyValue, LeaseId, Revision};

/// The format version byte at the start of every record and lease value.
pub const FORMAT_V1: u8 = 1;

pub const PREFIX_HISTORY: u8 = b'h';
pub const PREFIX_LEASE: u8 = b'l';
pub const PREFIX_ALARM: u8 = b'a';
pub const PREFIX_META: u8 = b'm';
pub const PREFIX_USER: u8 = b'u';

pub const META_REV: &[u8] = b"mrev";
pub const META_COMPACT: &[u8] = b"mcompact";
pub const META_LEASE_SEQ: &[u8] = b"mlease_seq";

/// The position of one change in history: etcd's `revision{main, sub}`. `sub` orders the changes
/// made by one command (a txn or a delete of several keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RevKey {
    pub main: Revision,
    pub sub: u32,
}

impl RevKey {
    pub fn to_tree_key(self) -> [u8; 13] {
        let mut k = [0u8; 13];
        k[0] = PREFIX_HISTORY;
        k[1..9].copy_from_slice(&(self.main as u64).to_be_bytes());
        k[9..13].copy_from_slice(&self.sub.to_be_bytes());
        k
    }

    pub fn from_tree_key(k: &[u8]) -> Result<RevKey, Error> {
        if k.len() != 13 || k[0] != PREFIX_HISTORY {
            return Err(Error::Corrupt(format!(
                "history key of {} bytes is malformed",
                k.len()
            )));
        }
        let main = u64::from_be_bytes(k[1..9].try_into().expect("8 bytes")) as i64;
        let sub = u32::from_be_bytes(k[9..13].try_into().expect("4 bytes"));
        if main < 1 {
            return Err(Error::Corrupt(format!("history key has revision {main}")));
        }
        Ok(RevKey { main, sub })
    }
}

/// One entry of history: a put (the full key-value as of that revision) or a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: EventKind,
    /// For a tombstone: the key and `mod_revision` = the deleting revision; the rest zero.
    pub kv: KeyValue,
}

/// Encodes a record: version, kind, key (u32 length + bytes), create, mod, version, lease (i64
/// BE each), value (u32 length + bytes).
pub fn encode_record(r: &Record) -> Vec<u8> {
    let kv = &r.kv;
    let mut out = Vec::with_capacity(2 + 4 + kv.key.len() + 32 + 4 + kv.value.len());
    out.push(FORMAT_V1);
    out.push(match r.kind {
        EventKind::Put => 0,
        EventKind::Delete => 1,
    });
    out.extend_from_slice(&(kv.key.len() as u32).to_be_bytes());
    out.extend_from_slice(&kv.key);
    for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.extend_from_slice(&(kv.value.len() as u32).to_be_bytes());
    out.extend_from_slice(&kv.value);
    out
}

/// A cursor that refuses to read past the end.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(Error::Corrupt(format!(
                "{} truncated: wanted {n} more bytes, {} left",
                self.what,
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, Error> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, Error> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn finish(self) -> Result<(), Error> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::Corrupt(format!(
                "{} has {} trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
}

/// Decodes a record. Total: any byte string gives `Ok` or `Err(Corrupt)`, never a panic.
pub fn decode_record(buf: &[u8]) -> Result<Record, Error> {
    let mut r = Reader {
        buf,
        what: "history record",
    };
    let version = r.u8()?;
    if version != FORMAT_V1 {
        return Err(Error::Corrupt(format!(
            "history record has unknown format version {version}"
        )));
    }
    let kind = match r.u8()? {
        0 => EventKind::Put,
        1 => EventKind::Delete,
        k => {
            return Err(Error::Corrupt(format!(
                "history record has unknown kind {k}"
            )))
        }
    };
    let key = r.bytes()?;
    let create_revision = r.i64()?;
    let mod_revision = r.i64()?;
    let version = r.i64()?;
    let lease = r.i64()?;
    let value = r.bytes()?;
    r.finish()?;
    if key.is_empty() {
        return Err(Error::Corrupt("history record has an empty key".into()));
    }
    if mod_revision < 1 {
        return Err(Error::Corrupt(format!(
            "history record has mod_revision {mod_revision}"
        )));
    }
    if kind == EventKind::Put
        && (create_revision < 1 || create_revision > mod_revision || version < 1)
    {
        return Err(Error::Corrupt(format!(
            "put record has create_revision {create_revision}, mod_revision {mod_revision}, version {version}"
        )));
    }
    let kv = KeyValue {
        key,
        create_revision,
        mod_revision,
        version,
        value,
        lease,
    };
    Ok(Record { kind, kv })
}

/// Lease ids are i64; flipping the sign bit makes their BE bytes sort like the numbers.
pub fn lease_tree_key(id: LeaseId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = PREFIX_LEASE;
    k[1..].copy_from_slice(&((id as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// `a` + member (u64 BE) + alarm number (i32 BE); the value is empty.
pub fn alarm_tree_key(a: AlarmMember) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = PREFIX_ALARM;
    k[1..9].copy_from_slice(&a.member.to_be_bytes());
    k[9..].copy_from_slice(&a.alarm.number().to_be_bytes());
    k
}

pub fn alarm_from_tree_key(k: &[u8]) -> Result<AlarmMember, Error> {
    let bad = || Error::Corrupt(format!("alarm key {k:02x?} is malformed"));
    if k.len() != 13 || k[0] != PREFIX_ALARM {
        return Err(bad());
    }
    let member = u64::from_be_bytes(k[1..9].try_into().expect("8 bytes"));
    let n = i32::from_be_bytes(k[9..].try_into().expect("4 bytes"));
    let alarm = AlarmType::from_number(n).ok_or_else(bad)?;
    Ok(AlarmMember { member, alarm })
}

pub fn lease_id_from_tree_key(k: &[u8]) -> Result<LeaseId, Error> {
    if k.len() != 9 || k[0] != PREFIX_LEASE {
        return Err(Error::Corrupt(format!(
            "lease key of {} bytes is malformed",
            k.len()
        )));
    }
    Ok((u64::from_be_bytes(k[1..].try_into().expect("8 bytes")) ^ (1 << 63)) as i64)
}

pub fn encode_lease(ttl: i64) -> Vec<u8> {
    let mut v = vec![FORMAT_V1];
    v.extend_from_slice(&ttl.to_be_bytes());
    v
}

pub fn decode_lease(buf: &[u8]) -> Result<i64, Error> {
    let mut r = Reader {
        buf,
        what: "lease record",
    };
    let version = r.u8()?;
    if version != FORMAT_V1 {
        return Err(Error::Corrupt(format!(
            "lease record has unknown format version {version}"
        )));
    }
    let ttl = r.i64()?;
    r.finish()?;
    Ok(ttl)
}

pub fn encode_i64(n: i64) -> [u8; 8] {
    n.to_be_bytes()
}

pub fn decode_i64(buf: &[u8], what: &str) -> Result<i64, Error> {
    let arr: [u8; 8] = buf
        .try_into()
        .map_err(|_| Error::Corrupt(format!("{what} is {} bytes, expected 8", buf.len())))?;
    Ok(i64::from_be_bytes(arr))
}

pub fn user_meta_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(PREFIX_USER);
    k.extend_from_slice(key);
    k
}

/// CRC-32C (Castagnoli), the checksum etcd uses for HashKV and snapshots.
pub struct Crc32c {
    state: u32,
}

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32c {
    pub fn new() -> Self {
        Crc32c { state: !0 }
    }
    pub fn update(&mut self, data: &[u8]) {
        let mut c = self.state;
        for &b in data {
            c = CRC32C_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
        self.state = c;
    }
    pub fn finish(&self) -> u32 {
        !self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C over "123456789".
        let mut c = Crc32c::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xE306_9283);
    }

    #[test]
    fn record_round_trip_and_truncation() {
        let rec = Record {
            kind: EventKind::Put,
            kv: KeyValue {
                key: b"k".to_vec(),
                create_revision: 2,
                mod_revision: 3,
                version: 2,
                value: b"value".to_vec(),
                lease: 7,
            },
        };
        let bytes = encode_record(&rec);
        assert_eq!(decode_record(&bytes).unwrap(), rec);
        for cut in 0..bytes.len() {
            assert!(
                decode_record(&bytes[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_record(&long).is_err());
    }

    #[test]
    fn lease_keys_sort_like_ids() {
        let ids = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        let keys: Vec<_> = ids.iter().map(|&i| lease_tree_key(i)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for (&id, k) in ids.iter().zip(&keys) {
            assert_eq!(lease_id_from_tree_key(k).unwrap(), id);
        }
    }
}
