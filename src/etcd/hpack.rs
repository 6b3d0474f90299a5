//! An HPACK (RFC 7541) decoder for [`super::authority`], which decodes every header block a
//! client sends to keep its table in step with the client's.
//!
//! It allocates nothing per field: fields are handed to a callback as slices of the dynamic
//! table or of two scratch buffers, and Huffman strings are decoded with the canonical code's
//! per-length tables, built once. (A general-purpose decoder that built its Huffman lookup map
//! per string showed up as several per cent of a loaded node's CPU.)

use std::collections::VecDeque;
use std::sync::OnceLock;

/// The table size every HTTP/2 connection starts with, and the most a client may ask for
/// while the server's SETTINGS_HEADER_TABLE_SIZE is the default.
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Why a block did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HpackError {
    /// The block ended inside a field.
    Truncated,
    /// An integer longer than any table or string could need.
    IntegerOverflow,
    /// Index 0, or one past the static and dynamic tables.
    BadIndex(usize),
    /// A size update above [`DEFAULT_TABLE_SIZE`].
    TableTooLarge(usize),
    /// Invalid Huffman data: EOS inside the string, a code longer than 30 bits, or bad padding.
    Huffman,
}

/// RFC 7541 Appendix A.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The bit length of each symbol's Huffman code (RFC 7541 Appendix B), symbols 0-255 then EOS.
/// The code is canonical, so these lengths define it.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];
const EOS: u16 = 256;
const MAX_CODE: usize = 30;

/// The canonical code's decoding tables: for each length, its first code, how many codes have
/// it, and where its symbols start in `symbols` (ordered by length, then symbol).
struct Canonical {
    first: [u32; MAX_CODE + 1],
    count: [u32; MAX_CODE + 1],
    offset: [usize; MAX_CODE + 1],
    symbols: [u16; 257],
}

fn canonical() -> &'static Canonical {
    static TABLE: OnceLock<Canonical> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut c = Canonical {
            first: [0; MAX_CODE + 1],
            count: [0; MAX_CODE + 1],
            offset: [0; MAX_CODE + 1],
            symbols: [0; 257],
        };
        for &len in &CODE_LENGTHS {
            c.count[len as usize] += 1;
        }
        let (mut code, mut at) = (0u32, 0usize);
        for len in 1..=MAX_CODE {
            c.first[len] = code;
            c.offset[len] = at;
            at += c.count[len] as usize;
            code = (code + c.count[len]) << 1;
        }
        let mut next = c.offset;
        for (sym, &len) in CODE_LENGTHS.iter().enumerate() {
            c.symbols[next[len as usize]] = sym as u16;
            next[len as usize] += 1;
        }
        c
    })
}

/// Appends the Huffman-decoded `input` to `out`.
pub fn huffman_decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let t = canonical();
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in input {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            let idx = code.wrapping_sub(t.first[len]);
            if idx < t.count[len] {
                let sym = t.symbols[t.offset[len] + idx as usize];
                if sym == EOS {
                    return Err(HpackError::Huffman);
                }
                out.push(sym as u8);
                code = 0;
                len = 0;
            } else if len == MAX_CODE {
                return Err(HpackError::Huffman);
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (the most significant bits of EOS).
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(HpackError::Huffman);
    }
    Ok(())
}

/// Reads an integer with an `n`-bit prefix from `buf[*at..]`.
fn integer(buf: &[u8], at: &mut usize, n: u8) -> Result<usize, HpackError> {
    let mask = (1usize << n) - 1;
    let first = *buf.get(*at).ok_or(HpackError::Truncated)?;
    *at += 1;
    let mut value = first as usize & mask;
    if value < mask {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let b = *buf.get(*at).ok_or(HpackError::Truncated)?;
        *at += 1;
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
        value += (b as usize & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// Reads a string literal from `buf[*at..]` into `out` (cleared first).
fn string(buf: &[u8], at: &mut usize, out: &mut Vec<u8>) -> Result<(), HpackError> {
    out.clear();
    let huffman = buf.get(*at).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(buf, at, 7)?;
    let raw = buf
        .get(*at..at.saturating_add(len))
        .ok_or(HpackError::Truncated)?;
    *at += len;
    if huffman {
        huffman_decode(raw, out)
    } else {
        out.extend_from_slice(raw);
        Ok(())
    }
}

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// The decoding side of one connection's header compression.
pub struct Decoder {
    /// Newest first.
    dynamic: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            dynamic: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE,
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => Ok(STATIC[index - 1]),
            _ => self
                .dynamic
                .get(index - 62)
                .map(|(n, v)| (&n[..], &v[..]))
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            let (n, v) = self.dynamic.pop_back().expect("size counts entries");
            self.size -= n.len() + v.len() + 32;
        }
    }

    /// Decodes one complete header block, calling `field(name, value)` for each field in order.
    /// After an error the table may be partly updated: the connection's compression state is
    /// lost, as it is for any HTTP/2 endpoint.
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut at = 0;
        while at < block.len() {
            let b = block[at];
            if b & 0x80 != 0 {
                let index = integer(block, &mut at, 7)?;
                let (n, v) = self.entry(index)?;
                field(n, v);
                continue;
            }
            if b & 0xe0 == 0x20 {
                let size = integer(block, &mut at, 5)?;
                if size > DEFAULT_TABLE_SIZE {
                    return Err(HpackError::TableTooLarge(size));
                }
                self.max_size = size;
                self.evict_to(size);
                continue;
            }
            let (prefix, indexing) = if b & 0x40 != 0 { (6, true) } else { (4, false) };
            let index = integer(block, &mut at, prefix)?;
            // The scratch buffers are taken out so `insert` can borrow `self`; after an error
            // the decoder is done with, so they need not be put back.
            let mut name = std::mem::take(&mut self.name);
            let mut value = std::mem::take(&mut self.value);
            if index == 0 {
                string(block, &mut at, &mut name)?;
            } else {
                name.clear();
                name.extend_from_slice(self.entry(index)?.0);
            }
            string(block, &mut at, &mut value)?;
            field(&name, &value);
            if indexing {
                self.insert(&name, &value);
            }
            self.name = name;
            self.value = value;
        }
        Ok(())
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + 32;
        if size > self.max_size {
            self.dynamic.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - size);
        self.dynamic.push_front((name.into(), value.into()));
        self.size += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes with the canonical code built from [`CODE_LENGTHS`] alone.
    fn huffman_encode(input: &[u8]) -> Vec<u8> {
        let t = canonical();
        let code_of = |sym: usize| {
            let len = CODE_LENGTHS[sym] as usize;
            let rank = t.symbols[t.offset[len]..t.offset[len] + t.count[len] as usize]
                .iter()
                .position(|&s| s as usize == sym)
                .unwrap();
            (t.first[len] + rank as u32, len)
        };
        let (mut out, mut acc, mut bits) = (Vec::new(), 0u64, 0);
        for &b in input {
            let (code, len) = code_of(b as usize);
            acc = (acc << len) | u64::from(code);
            bits += len;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            let pad = 8 - bits;
            out.push(((acc << pad) | ((1 << pad) - 1)) as u8);
        }
        out
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn decode_all(dec: &mut Decoder, block: &[u8]) -> Result<Fields, HpackError> {
        let mut out = Vec::new();
        dec.decode(block, |n, v| out.push((n.to_vec(), v.to_vec())))?;
        Ok(out)
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_huffman_table_matches_an_independent_decoder() {
        // Every byte value, and pseudo-random strings: encoded with the code from our lengths,
        // then decoded by loona-hpack (its own code table) and by ours.
        let mut inputs: Vec<Vec<u8>> = vec![(0..=255).collect(), b"www.example.com".to_vec()];
        let mut x: u32 = 12345;
        for len in 0..200 {
            inputs.push(
                (0..len)
                    .map(|_| {
                        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        (x >> 16) as u8
                    })
                    .collect(),
            );
        }
        for input in inputs {
            let encoded = huffman_encode(&input);
            let mut theirs = loona_hpack::huffman::HuffmanDecoder::new();
            assert_eq!(theirs.decode(&encoded).unwrap(), input);
            let mut ours = Vec::new();
            huffman_decode(&encoded, &mut ours).unwrap();
            assert_eq!(ours, input);
        }
    }

    #[test]
    fn bad_huffman_is_refused() {
        let mut out = Vec::new();
        // Padding of zeros: 'a' is 00011 (5 bits), padded with 000.
        assert_eq!(huffman_decode(&[0x18], &mut out), Err(HpackError::Huffman));
        // A full byte of padding (8 one bits) is too long.
        assert_eq!(huffman_decode(&[0xff], &mut out), Err(HpackError::Huffman));
        // EOS itself (30 one bits) inside the string.
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff], &mut out),
            Err(HpackError::Huffman)
        );
    }

    #[test]
    fn rfc7541_c4_requests_with_huffman_decode_alike() {
        // RFC 7541 C.4: three requests on one connection, Huffman-coded, sharing the table.
        let blocks = [
            hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"),
            hex("8286 84be 5886 a8eb 1064 9cbf"),
            hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        ];
        let mut ours = Decoder::new();
        let mut theirs = loona_hpack::Decoder::new();
        let mut decoded = Vec::new();
        for block in &blocks {
            let a = decode_all(&mut ours, block).unwrap();
            let b: Fields = theirs.decode(block).unwrap();
            assert_eq!(a, b);
            decoded.push(a);
        }
        let f = |n: &str, v: &str| (n.as_bytes().to_vec(), v.as_bytes().to_vec());
        assert_eq!(
            decoded[2],
            vec![
                f(":method", "GET"),
                f(":scheme", "https"),
                f(":path", "/index.html"),
                f(":authority", "www.example.com"),
                f("custom-key", "custom-value"),
            ]
        );
        // Three entries were indexed: 54 + 53 + 55 octets.
        assert_eq!((ours.dynamic.len(), ours.size), (3, 164));
    }

    #[test]
    fn indexing_eviction_and_size_updates_agree_with_an_independent_decoder() {
        let mut enc = loona_hpack::Encoder::new();
        let mut ours = Decoder::new();
        let mut theirs = loona_hpack::Decoder::new();
        for round in 0..300u32 {
            let path = format!("/etcdserverpb.KV/Range{}", round % 7);
            let big = "v".repeat((round as usize * 37) % 900);
            let key = format!("x-key-{}", round % 13);
            let fields: Vec<(&[u8], &[u8])> = vec![
                (b":method", b"POST"),
                (b":path", path.as_bytes()),
                (key.as_bytes(), big.as_bytes()),
                (b"content-type", b"application/grpc"),
            ];
            let mut block = Vec::new();
            if round % 50 == 49 {
                // Size updates to 0 and back to 4096 empty the table: the encoder starts afresh.
                block.extend_from_slice(&[0x20, 0x3f, 0xe1, 0x1f]);
                enc = loona_hpack::Encoder::new();
            }
            block.extend(enc.encode(fields.iter().copied()));
            let a = decode_all(&mut ours, &block).unwrap();
            let b: Fields = theirs.decode(&block).unwrap();
            assert_eq!(a, b, "round {round}");
            assert_eq!(a.len(), 4);
            assert!(ours.size <= ours.max_size);
            if round % 50 == 49 {
                // Only this block's own entries are left: as a fresh decoder sees them.
                let mut fresh = Decoder::new();
                decode_all(&mut fresh, &block[4..]).unwrap();
                assert_eq!(ours.dynamic, fresh.dynamic);
                assert!(!ours.dynamic.is_empty());
            }
        }
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        let mut dec = Decoder::new();
        assert_eq!(decode_all(&mut dec, &[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(decode_all(&mut dec, &[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(
            decode_all(&mut dec, &[0x40, 0x05, b'a']),
            Err(HpackError::Truncated)
        );
        assert_eq!(
            decode_all(&mut dec, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(HpackError::IntegerOverflow)
        );
        assert_eq!(
            decode_all(&mut dec, &[0x3f, 0xe2, 0x1f]),
            Err(HpackError::TableTooLarge(4097))
        );
        // Every prefix of a good block fails or decodes; none panics.
        let good = hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf");
        for end in 0..good.len() {
            let _ = decode_all(&mut Decoder::new(), &good[..end]);
        }
        // Nor does noise, on one decoder whose table it keeps changing.
        let mut x: u64 = 7;
        for len in 0..20_000usize {
            let block: Vec<u8> = (0..len % 64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode_all(&mut dec, &block);
            assert!(dec.size <= dec.max_size);
        }
    }
}
