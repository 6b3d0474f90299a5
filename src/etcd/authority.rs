//! [`AuthorityFix`]: mends the `:authority` of HTTP/2 requests before hyper sees them.
//!
//! Some etcd clients send an `:authority` that is not an authority at all. etcdctl 3.4 dials
//! `endpoint status` and `endpoint hashkv` with the endpoint URL as the authority
//! (`http://127.0.0.1:2379`), and etcd 3.5.0 clients send `#initially=[...]` on every request.
//! etcd's Go server ignores the field; hyper's HTTP/2 layer (the `h2` crate) resets any stream
//! whose authority does not parse, with `PROTOCOL_ERROR`, and offers no option to accept it.
//!
//! So the client port reads through this wrapper. On a connection that starts with the HTTP/2
//! preface it walks the client's frames and decodes every header block (HEADERS plus any
//! CONTINUATION) with [`super::hpack`], to keep its table in step with the client's. Blocks pass as
//! received until one carries a malformed `:authority`. That one, and every block after it on
//! the connection, is re-encoded as literals that never touch the server's dynamic table, with
//! the authority repaired (`scheme://host:port/...` becomes `host:port`) or dropped. All other
//! frames, and everything the server writes, pass through unchanged. A connection that
//! does not start with the preface (HTTP/1.1 for the JSON gateway) passes through untouched.
//!
//! If a header block fails to decode, the wrapper stops rewriting and forwards the rest of the
//! connection as it came, so hyper reports the client's error itself.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::hpack;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer must accept (SETTINGS_MAX_FRAME_SIZE's initial value);
/// rewritten header blocks are split at it.
const MAX_FRAME: usize = 16_384;
/// A frame longer than this is not buffered for inspection (no server here allows one).
const MAX_INSPECT: usize = 16 << 20;
const READ_CHUNK: usize = 16 * 1024;

enum Mode {
    /// Waiting for enough bytes to tell HTTP/2 from anything else.
    Sniffing,
    /// Walking HTTP/2 frames.
    Frames,
    /// Forwarding bytes as they come.
    Passthrough,
}

/// A header block whose HEADERS frame arrived without END_HEADERS.
struct OpenBlock {
    stream_id: u32,
    /// END_STREAM and PRIORITY of the HEADERS frame.
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, forwarded unchanged if decoding fails.
    raw: Vec<u8>,
}

/// Wraps a client connection; see the module documentation.
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    /// Received and not yet processed.
    input: BytesMut,
    /// Processed and ready for the reader.
    output: BytesMut,
    decoder: hpack::Decoder,
    open: Option<OpenBlock>,
    /// Set once a block had to be repaired: every block after it is re-encoded.
    reencode: bool,
    fields: Fields,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> AuthorityFix<S> {
        AuthorityFix {
            inner,
            mode: Mode::Sniffing,
            input: BytesMut::new(),
            output: BytesMut::new(),
            decoder: hpack::Decoder::new(),
            open: None,
            reencode: false,
            fields: Fields::default(),
            eof: false,
        }
    }

    /// Moves what can be processed from `input` to `output`.
    fn process(&mut self) {
        loop {
            match self.mode {
                Mode::Sniffing => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                    } else if n == PREFACE.len() {
                        self.output.put(self.input.split_to(n));
                        self.mode = Mode::Frames;
                    } else if self.eof {
                        self.mode = Mode::Passthrough;
                    } else {
                        return;
                    }
                }
                Mode::Passthrough => {
                    if let Some(open) = self.open.take() {
                        self.output.put_slice(&open.raw);
                    }
                    let all = self.input.split();
                    self.output.put(all);
                    return;
                }
                Mode::Frames => {
                    if self.input.len() < FRAME_HEADER {
                        if self.eof {
                            self.mode = Mode::Passthrough;
                            continue;
                        }
                        return;
                    }
                    let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]])
                        as usize;
                    let kind = self.input[3];
                    let header = kind == TYPE_HEADERS || kind == TYPE_CONTINUATION;
                    // Anything between a HEADERS and its last CONTINUATION is the client's
                    // protocol error, and an oversized frame is too: let hyper see them as sent.
                    if len > MAX_INSPECT || (!header && self.open.is_some()) {
                        self.mode = Mode::Passthrough;
                        continue;
                    }
                    if self.input.len() < FRAME_HEADER + len {
                        if self.eof {
                            self.mode = Mode::Passthrough;
                            continue;
                        }
                        return;
                    }
                    let frame = self.input.split_to(FRAME_HEADER + len);
                    if !header {
                        self.output.put(frame);
                    } else if !self.header_frame(&frame) {
                        if let Some(open) = self.open.take() {
                            self.output.put_slice(&open.raw);
                        }
                        self.output.put(frame);
                        self.mode = Mode::Passthrough;
                    }
                }
            }
        }
    }

    /// Handles one HEADERS or CONTINUATION frame. False if it cannot be understood: the caller
    /// then forwards the open block's frames, this one, and everything after them unchanged.
    fn header_frame(&mut self, frame: &[u8]) -> bool {
        let kind = frame[3];
        let flags = frame[4];
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let mut payload = &frame[FRAME_HEADER..];
        if kind == TYPE_HEADERS {
            if self.open.is_some() {
                return false;
            }
            if flags & FLAG_PADDED != 0 {
                let Some((&pad, rest)) = payload.split_first() else {
                    return false;
                };
                if pad as usize > rest.len() {
                    return false;
                }
                payload = &rest[..rest.len() - pad as usize];
            }
            let mut priority = None;
            if flags & FLAG_PRIORITY != 0 {
                if payload.len() < 5 {
                    return false;
                }
                priority = Some(payload[..5].try_into().expect("5 bytes"));
                payload = &payload[5..];
            }
            let block_flags = flags & (FLAG_END_STREAM | FLAG_PRIORITY);
            if flags & FLAG_END_HEADERS != 0 {
                // The common case: the whole block in one frame, decoded in place.
                return self.finish_block(stream_id, block_flags, priority, payload, frame);
            }
            self.open = Some(OpenBlock {
                stream_id,
                flags: block_flags,
                priority,
                fragment: payload.to_vec(),
                raw: frame.to_vec(),
            });
            return true;
        }
        let Some(open) = self.open.as_mut().filter(|o| o.stream_id == stream_id) else {
            return false;
        };
        open.fragment.extend_from_slice(payload);
        open.raw.extend_from_slice(frame);
        if flags & FLAG_END_HEADERS == 0 {
            return true;
        }
        let open = self.open.take().expect("a block is open");
        self.finish_block(
            open.stream_id,
            open.flags,
            open.priority,
            &open.fragment,
            &open.raw,
        )
    }

    /// Decodes a complete header block and forwards it: as received (`raw`) while no repair was
    /// ever needed on this connection, re-encoded from then on. Always true: a block that does
    /// not decode is forwarded as received, and so is the rest of the connection.
    fn finish_block(
        &mut self,
        stream_id: u32,
        flags: u8,
        priority: Option<[u8; 5]>,
        block: &[u8],
        raw: &[u8],
    ) -> bool {
        let fields = &mut self.fields;
        fields.clear();
        let mut bad_authority = false;
        let decoded = self.decoder.decode(block, |name, value| {
            if name == b":authority" && http::uri::Authority::try_from(value).is_err() {
                bad_authority = true;
            }
            fields.push(name, value);
        });
        if decoded.is_err() {
            self.output.put_slice(raw);
            self.mode = Mode::Passthrough;
            return true;
        }
        // The server's HPACK table mirrors the client's for as long as blocks pass verbatim.
        // Once one is re-encoded (as literals that never index) the server's table stops
        // changing, so every later block must be re-encoded too.
        self.reencode |= bad_authority;
        if !self.reencode {
            self.output.put_slice(raw);
            return true;
        }
        let mut out = Vec::with_capacity(block.len() + 64);
        for (name, value) in self.fields.iter() {
            if name == b":authority" {
                if let Some(fixed) = mend_authority(value) {
                    encode_literal(&mut out, name, &fixed);
                }
            } else {
                encode_literal(&mut out, name, value);
            }
        }
        write_header_block(&mut self.output, stream_id, flags, priority, &out);
        true
    }
}

/// Decoded header fields, kept in one buffer that is reused from block to block.
#[derive(Default)]
struct Fields {
    bytes: Vec<u8>,
    /// (name end, value end) offsets into `bytes`; each field starts where the last one ended.
    ends: Vec<(usize, usize)>,
}

impl Fields {
    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }
    fn push(&mut self, name: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(name);
        let name_end = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.ends.push((name_end, self.bytes.len()));
    }
    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(n, v)| {
            let field = (&self.bytes[start..n], &self.bytes[n..v]);
            start = v;
            field
        })
    }
}

/// The authority to send on: `value` itself if it parses, the `host:port` inside a URL, or
/// `None` (drop the field) when nothing usable is in it.
fn mend_authority(value: &[u8]) -> Option<Vec<u8>> {
    if http::uri::Authority::try_from(value).is_ok() {
        return Some(value.to_vec());
    }
    let text = std::str::from_utf8(value).ok()?;
    let after_scheme = text.split_once("://").map_or(text, |(_, rest)| rest);
    let host = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
    if !host.is_empty() && http::uri::Authority::try_from(host).is_ok() {
        Some(host.as_bytes().to_vec())
    } else {
        None
    }
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1); `first` holds the bits above it.
fn encode_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// "Literal header field without indexing, new name" (RFC 7541 §6.2.2), plain strings.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    encode_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// Writes `block` as a HEADERS frame and as many CONTINUATION frames as it needs.
fn write_header_block(
    out: &mut BytesMut,
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: &[u8],
) {
    let mut first_room = MAX_FRAME;
    if priority.is_some() {
        first_room -= 5;
    }
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut frame_flags = flags;
    if rest.is_empty() {
        frame_flags |= FLAG_END_HEADERS;
    }
    let len = first.len() + if priority.is_some() { 5 } else { 0 };
    put_frame_header(out, len, TYPE_HEADERS, frame_flags, stream_id);
    if let Some(p) = priority {
        out.put_slice(&p);
    }
    out.put_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        let f = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        put_frame_header(out, chunk.len(), TYPE_CONTINUATION, f, stream_id);
        out.put_slice(chunk);
        rest = tail;
    }
}

fn put_frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream_id: u32) {
    out.put_slice(&(len as u32).to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if matches!(this.mode, Mode::Passthrough) && this.input.is_empty() {
                // Nothing held back: read straight into the caller's buffer.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            this.input.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.input) {
                Poll::Ready(Ok(n)) => {
                    if n == 0 {
                        this.eof = true;
                    }
                    this.process();
                    if this.eof && this.output.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A HEADERS frame (optionally padded, with priority, split into a CONTINUATION) carrying
    /// `headers` encoded by a real HPACK encoder with its dynamic table.
    fn headers_frames(
        enc: &mut loona_hpack::Encoder<'static>,
        stream_id: u32,
        headers: &[(&[u8], &[u8])],
        split: bool,
    ) -> Vec<u8> {
        let block = enc.encode(headers.iter().copied());
        let mut out = BytesMut::new();
        if split {
            let (a, b) = block.split_at(block.len() / 2);
            // HEADERS, padded (3 bytes), with priority, then one CONTINUATION.
            let len = 1 + 5 + a.len() + 3;
            put_frame_header(
                &mut out,
                len,
                TYPE_HEADERS,
                FLAG_PADDED | FLAG_PRIORITY,
                stream_id,
            );
            out.put_u8(3);
            out.put_slice(&[0, 0, 0, 0, 15]);
            out.put_slice(a);
            out.put_slice(&[0, 0, 0]);
            put_frame_header(
                &mut out,
                b.len(),
                TYPE_CONTINUATION,
                FLAG_END_HEADERS,
                stream_id,
            );
            out.put_slice(b);
        } else {
            put_frame_header(
                &mut out,
                block.len(),
                TYPE_HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                stream_id,
            );
            out.put_slice(&block);
        }
        out.to_vec()
    }

    struct Frame {
        kind: u8,
        flags: u8,
        stream_id: u32,
        payload: Vec<u8>,
    }

    fn parse_frames(mut bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            frames.push(Frame {
                kind: bytes[3],
                flags: bytes[4],
                stream_id: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]),
                payload: bytes[9..9 + len].to_vec(),
            });
            bytes = &bytes[9 + len..];
        }
        frames
    }

    /// Runs `input` through the wrapper, delivered in `piece`-byte reads.
    async fn through(input: Vec<u8>, piece: usize) -> Vec<u8> {
        let (mut tx, rx) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in input.chunks(piece) {
                tx.write_all(chunk).await.unwrap();
            }
        });
        let mut fix = AuthorityFix::new(rx);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        out
    }

    fn header_blocks(frames: &[Frame]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut dec = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut fragment = Vec::new();
        for f in frames {
            if f.kind == TYPE_HEADERS || f.kind == TYPE_CONTINUATION {
                let mut p = &f.payload[..];
                if f.kind == TYPE_HEADERS && f.flags & FLAG_PADDED != 0 {
                    let pad = p[0] as usize;
                    p = &p[1..p.len() - pad];
                }
                if f.kind == TYPE_HEADERS && f.flags & FLAG_PRIORITY != 0 {
                    p = &p[5..];
                }
                fragment.extend_from_slice(p);
                if f.flags & FLAG_END_HEADERS != 0 {
                    blocks.push(dec.decode(&std::mem::take(&mut fragment)).unwrap());
                }
            }
        }
        blocks
    }

    #[tokio::test]
    async fn repairs_a_url_authority_and_keeps_everything_else() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        // SETTINGS (empty) and a DATA frame pass through unchanged.
        let mut settings = BytesMut::new();
        put_frame_header(&mut settings, 0, 0x4, 0, 0);
        input.extend_from_slice(&settings);
        // A good request, split across HEADERS+CONTINUATION with padding and priority: it
        // passes byte for byte.
        let good: &[(&[u8], &[u8])] = &[
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/etcdserverpb.KV/Range"),
            (b":authority", b"127.0.0.1:2379"),
            (b"content-type", b"application/grpc"),
        ];
        let first = headers_frames(&mut enc, 1, good, true);
        input.extend(&first);
        let verbatim = input.len();
        // The URL authority etcdctl sends for endpoint status.
        let bad: &[(&[u8], &[u8])] = &[
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/etcdserverpb.Maintenance/Status"),
            (b":authority", b"http://127.0.0.1:2379"),
            (b"content-type", b"application/grpc"),
        ];
        input.extend(headers_frames(&mut enc, 3, bad, false));
        let mut data = BytesMut::new();
        put_frame_header(&mut data, 5, 0x0, FLAG_END_STREAM, 3);
        data.put_slice(&[0, 0, 0, 0, 0]);
        input.extend_from_slice(&data);
        // The good request again: the client's encoder now sends indexed fields from its
        // dynamic table, which the server never saw for re-encoded blocks.
        input.extend(headers_frames(&mut enc, 5, good, true));
        // An authority with nothing usable in it (etcd 3.5.0's form) is dropped.
        let hopeless: &[(&[u8], &[u8])] = &[
            (b":method", b"POST"),
            (b":authority", b"#initially=[http://127.0.0.1:2379]"),
        ];
        input.extend(headers_frames(&mut enc, 7, hopeless, false));

        let owned = |h: &[(&[u8], &[u8])]| -> Vec<(Vec<u8>, Vec<u8>)> {
            h.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()
        };
        let mut mended = owned(bad);
        mended[3].1 = b"127.0.0.1:2379".to_vec();
        for piece in [1, 7, 4096] {
            let out = through(input.clone(), piece).await;
            assert_eq!(
                out[..verbatim],
                input[..verbatim],
                "before the repair: verbatim"
            );
            let frames = parse_frames(&out[PREFACE.len()..]);
            assert_eq!(frames[0].kind, 0x4, "SETTINGS first");
            let data = frames.iter().find(|f| f.kind == 0).expect("DATA kept");
            assert_eq!((data.stream_id, data.payload.len()), (3, 5));
            let again = frames.iter().find(|f| f.stream_id == 5).unwrap();
            assert_ne!(again.flags & FLAG_PRIORITY, 0, "priority kept");
            assert_eq!(&again.payload[..5], &[0, 0, 0, 0, 15]);
            let h3 = frames.iter().find(|f| f.stream_id == 3).unwrap();
            assert_ne!(h3.flags & FLAG_END_STREAM, 0, "END_STREAM kept");
            let blocks = header_blocks(&frames);
            assert_eq!(
                blocks,
                vec![
                    owned(good),
                    mended.clone(),
                    owned(good),
                    vec![(b":method".to_vec(), b"POST".to_vec())]
                ]
            );
        }
    }

    #[tokio::test]
    async fn http1_and_undecodable_blocks_pass_through_unchanged() {
        let http1 = b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\n\r\n{}".to_vec();
        assert_eq!(through(http1.clone(), 3).await, http1);

        let mut bad = PREFACE.to_vec();
        let mut f = BytesMut::new();
        // Index 200 is in neither table: HPACK cannot decode it.
        put_frame_header(&mut f, 2, TYPE_HEADERS, FLAG_END_HEADERS, 1);
        f.put_slice(&[0xff, 0x49]);
        bad.extend_from_slice(&f);
        bad.extend_from_slice(b"trailing bytes");
        assert_eq!(through(bad.clone(), 5).await, bad);
    }

    #[test]
    fn mends_authorities() {
        let m = |s: &str| mend_authority(s.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(m("127.0.0.1:2379").as_deref(), Some("127.0.0.1:2379"));
        assert_eq!(
            m("http://127.0.0.1:2379").as_deref(),
            Some("127.0.0.1:2379")
        );
        assert_eq!(m("https://node-1:2379/x").as_deref(), Some("node-1:2379"));
        assert_eq!(m("#initially=[http://a:1]"), None);
        assert_eq!(m(""), None);
    }

    #[test]
    fn long_values_use_multi_byte_integers() {
        let mut out = Vec::new();
        encode_int(&mut out, 0, 7, 1337);
        assert_eq!(out, [0x7f, 0xba, 0x09]);
        out.clear();
        encode_int(&mut out, 0, 7, 126);
        assert_eq!(out, [126]);
    }
}
