//! The framed peer protocol, used for the Raft routes (`/raft/...`) between nodes.
//!
//! It runs over the same TLS port as HTTP and is chosen by ALPN ([`ALPN`]). A connection carries
//! many calls at once; each request frame names the route and carries an id, and the answer
//! frame carries the same id, in whatever order answers are ready:
//!
//! ```text
//! request:  u32 length | u64 id | u16 route length | route | body
//! answer:   u32 length | u64 id | u16 status       | body
//! ```
//!
//! Integers are big-endian and `length` counts the bytes after it. The bodies and statuses are
//! those of the HTTP routes (bincode in and out, 200 when Raft was reached), so the two carry the
//! same calls. HTTP/2 costs two extra task hops and its flow control on every call; an append
//! here is one write and one read on each side.
//!
//! Each side has one writer task, fed by a channel, so a caller that gives up (a timeout) never
//! leaves half a frame on the wire. Frames queued while the writer was busy go out in one write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::MAX_BODY;

/// The ALPN protocol id of the framed protocol.
pub const ALPN: &[u8] = b"eden-raft/1";

/// Largest frame after the length: a whole body plus id, route length and a route.
const MAX_FRAME: usize = MAX_BODY + 8 + 2 + u16::MAX as usize;

/// A frame as read: its id, its u16 field (route length or status), and the rest.
struct Frame {
    id: u64,
    word: u16,
    rest: Bytes,
}

fn frame(id: u64, word: u16, parts: &[&[u8]]) -> Bytes {
    let len: usize = 8 + 2 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut buf = BytesMut::with_capacity(4 + len);
    buf.put_u32(len as u32);
    buf.put_u64(id);
    buf.put_u16(word);
    for p in parts {
        buf.put_slice(p);
    }
    buf.freeze()
}

/// Reads one frame; `None` on a clean end of stream between frames.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(10..=MAX_FRAME).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame length {len} is outside 10..={MAX_FRAME}"),
        ));
    }
    let mut buf = BytesMut::zeroed(len);
    r.read_exact(&mut buf).await?;
    let mut buf = buf.freeze();
    let id = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
    let word = u16::from_be_bytes(buf[8..10].try_into().expect("2 bytes"));
    Ok(Some(Frame {
        id,
        word,
        rest: buf.split_off(10),
    }))
}

/// Sends every queued frame, coalescing what queued up during the previous write. A frame is
/// dropped (with whatever it holds) once it is written or copied into the batch being written.
async fn write_loop<W: AsyncWrite + Unpin, T: AsRef<[u8]>>(
    w: &mut W,
    rx: &mut mpsc::UnboundedReceiver<T>,
) -> std::io::Result<()> {
    let mut batch = BytesMut::new();
    while let Some(first) = rx.recv().await {
        match rx.try_recv() {
            Err(_) => w.write_all(first.as_ref()).await?,
            Ok(second) => {
                batch.clear();
                batch.put_slice(first.as_ref());
                batch.put_slice(second.as_ref());
                while let Ok(more) = rx.try_recv() {
                    batch.put_slice(more.as_ref());
                }
                w.write_all(&batch).await?;
            }
        }
        w.flush().await?;
    }
    w.shutdown().await
}

#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<(u16, Bytes)>>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

/// Why a call got no answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CallFailed {
    /// Nothing was sent: the connection had already ended, or the request is larger than a
    /// frame may be (the connection stays usable then).
    NotSent(String),
    /// The connection ended after the request was queued: the peer may or may not have
    /// handled it.
    Lost(String),
}

/// The client end of one framed connection to a peer.
pub(crate) struct FramedConn {
    tx: mpsc::UnboundedSender<Bytes>,
    pending: Arc<Mutex<Pending>>,
    closed: Arc<AtomicBool>,
    /// Tells the reader task that the connection was dropped, so it stops even while the peer
    /// sends nothing (a vanished peer).
    dropped: Arc<tokio::sync::Notify>,
    next_id: AtomicU64,
    /// Frames read so far; a call that times out with this unchanged suggests a dead connection.
    frames_read: Arc<AtomicU64>,
}

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

fn close(pending: &Mutex<Pending>, closed: &AtomicBool, reason: String) {
    closed.store(true, Ordering::Release);
    let mut p = lock(pending);
    if p.closed.is_none() {
        p.closed = Some(reason);
    }
    // Dropping the senders wakes every waiting call with the error.
    p.waiting.clear();
}

/// Removes a call's entry if the call is dropped before its answer came.
struct Waiting<'a> {
    pending: &'a Mutex<Pending>,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(self.pending).waiting.remove(&self.id);
    }
}

impl FramedConn {
    /// Starts the reader and writer tasks on an established stream.
    pub(crate) fn start<S>(stream: S, peer: String) -> FramedConn
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let pending = Arc::new(Mutex::new(Pending::default()));
        let closed = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(tokio::sync::Notify::new());
        let frames_read = Arc::new(AtomicU64::new(0));
        {
            let (pending, closed, peer) = (pending.clone(), closed.clone(), peer.clone());
            tokio::spawn(async move {
                let reason = match write_loop(&mut wr, &mut rx).await {
                    Ok(()) => "connection closed".to_string(),
                    Err(e) => format!("writing to the connection: {e}"),
                };
                tracing::debug!(peer, "framed peer connection: {reason}");
                close(&pending, &closed, reason);
            });
        }
        {
            let (pending, closed, frames_read, dropped) = (
                pending.clone(),
                closed.clone(),
                frames_read.clone(),
                dropped.clone(),
            );
            tokio::spawn(async move {
                let reason = loop {
                    let read = tokio::select! {
                        read = read_frame(&mut rd) => read,
                        () = dropped.notified() => break "connection dropped".to_string(),
                    };
                    match read {
                        Ok(Some(f)) => {
                            frames_read.fetch_add(1, Ordering::Relaxed);
                            if let Some(w) = lock(&pending).waiting.remove(&f.id) {
                                let _ = w.send((f.word, f.rest));
                            }
                        }
                        Ok(None) => break "the peer closed the connection".to_string(),
                        Err(e) => break format!("reading from the connection: {e}"),
                    }
                    if closed.load(Ordering::Acquire) {
                        break "connection closed".to_string();
                    }
                };
                tracing::debug!(peer, "framed peer connection: {reason}");
                close(&pending, &closed, reason);
            });
        }
        FramedConn {
            tx,
            pending,
            closed,
            dropped,
            next_id: AtomicU64::new(1),
            frames_read,
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// How many answers this connection has read; see [`FramedConn::call`]'s caller.
    pub(crate) fn frames_read(&self) -> u64 {
        self.frames_read.load(Ordering::Relaxed)
    }

    /// Sends `body` to `path` and waits for the answer's status and body.
    pub(crate) async fn call(&self, path: &str, body: &[u8]) -> Result<(u16, Bytes), CallFailed> {
        if path.len() > u16::MAX as usize {
            return Err(CallFailed::NotSent(format!(
                "route of {} bytes is too long",
                path.len()
            )));
        }
        let len = 8 + 2 + path.len() + body.len();
        if len > MAX_FRAME {
            return Err(CallFailed::NotSent(format!(
                "a request of {len} bytes is larger than a peer frame may be ({MAX_FRAME} bytes)"
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = lock(&self.pending);
            if let Some(reason) = &p.closed {
                return Err(CallFailed::NotSent(reason.clone()));
            }
            p.waiting.insert(id, tx);
        }
        let _waiting = Waiting {
            pending: &self.pending,
            id,
        };
        let req = frame(id, path.len() as u16, &[path.as_bytes(), body]);
        if self.tx.send(req).is_err() {
            // The writer had already ended: the frame never reached the wire.
            return Err(CallFailed::NotSent(self.reason()));
        }
        rx.await.map_err(|_| CallFailed::Lost(self.reason()))
    }

    fn reason(&self) -> String {
        lock(&self.pending)
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".to_string())
    }
}

impl Drop for FramedConn {
    fn drop(&mut self) {
        // The writer ends when `tx` goes (it shuts the stream down, or fails to once TCP gives
        // up on a vanished peer); the reader is told directly.
        self.closed.store(true, Ordering::Release);
        self.dropped.notify_one();
    }
}

/// What a route handler answers: status and body.
pub(crate) type Answer = (u16, Bytes);

/// Most requests one connection may have between being read and their answer being written.
/// The server stops reading the connection while this many are outstanding, so a client that
/// sends without reading cannot make it queue answers without end.
pub(crate) const MAX_CALLS_PER_CONN: usize = 256;

/// An answer frame on its way to the writer, holding its call's slot until it is written.
struct Outgoing {
    frame: Bytes,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Outgoing {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

/// Serves framed requests on an accepted stream until the peer closes it. `handle` answers one
/// request (route, body); each request runs in its own task, so a slow one does not hold up the
/// others. At most [`MAX_CALLS_PER_CONN`] are outstanding at once.
pub(crate) async fn serve<S, H, F>(stream: S, remote: std::net::SocketAddr, handle: H)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    H: Fn(String, Bytes) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Answer> + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_PER_CONN));
    let writer = tokio::spawn(async move {
        if let Err(e) = write_loop(&mut wr, &mut rx).await {
            tracing::debug!(%remote, "framed peer connection, writing: {e}");
        }
    });
    let handle = Arc::new(handle);
    let mut calls = tokio::task::JoinSet::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let f = match read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%remote, "framed peer connection, reading: {e}");
                break;
            }
        };
        let id = f.id;
        let route_len = f.word as usize;
        if f.rest.len() < route_len {
            tracing::debug!(%remote, "framed request {id}: route longer than the frame");
            break;
        }
        let mut rest = f.rest;
        let body = rest.split_off(route_len);
        let route = String::from_utf8_lossy(&rest).into_owned();
        let (tx, handle) = (tx.clone(), handle.clone());
        calls.spawn(async move {
            let (status, answer) = handle(route, body).await;
            let _ = tx.send(Outgoing {
                frame: frame(id, status, &[&answer]),
                _slot: slot,
            });
        });
        while calls.try_join_next().is_some() {}
    }
    // Answers still being computed are dropped with the connection: the caller sees it close.
    calls.shutdown().await;
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_are_matched_to_answers_in_any_order() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let remote: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        tokio::spawn(serve(
            server,
            remote,
            |route: String, body: Bytes| async move {
                // The slow route answers after the fast one was sent later.
                if route == "/slow" {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                let mut out = route.into_bytes();
                out.extend_from_slice(&body);
                (if out.is_empty() { 204 } else { 200 }, Bytes::from(out))
            },
        ));
        let conn = Arc::new(FramedConn::start(client, "test".into()));
        let slow = {
            let conn = conn.clone();
            tokio::spawn(async move { conn.call("/slow", b"1").await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let fast = conn.call("/fast", b"2").await.unwrap();
        assert!(!slow.is_finished(), "the slow call finished first");
        assert_eq!(fast, (200, Bytes::from_static(b"/fast2")));
        assert_eq!(
            slow.await.unwrap().unwrap(),
            (200, Bytes::from_static(b"/slow1"))
        );
        let empty = conn.call("", b"").await.unwrap();
        assert_eq!(empty, (204, Bytes::new()));
        assert_eq!(conn.frames_read(), 3);
        assert!(!conn.is_closed());
    }

    #[tokio::test]
    async fn a_closed_connection_fails_waiting_and_later_calls() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let conn = Arc::new(FramedConn::start(client, "test".into()));
        let waiting = {
            let conn = conn.clone();
            tokio::spawn(async move { conn.call("/never", b"").await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        drop(server);
        match waiting.await.unwrap().unwrap_err() {
            CallFailed::Lost(why) => assert!(why.contains("closed"), "{why}"),
            other => panic!("a call in flight was {other:?}"),
        }
        assert!(conn.is_closed());
        match conn.call("/after", b"").await.unwrap_err() {
            CallFailed::NotSent(why) => assert!(why.contains("closed"), "{why}"),
            other => panic!("a call after the end was {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_oversized_request_fails_alone() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let remote: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        tokio::spawn(serve(server, remote, |_r: String, b: Bytes| async move {
            (200, b)
        }));
        let conn = FramedConn::start(client, "test".into());
        let huge = vec![0u8; MAX_FRAME];
        match conn.call("/append", &huge).await.unwrap_err() {
            CallFailed::NotSent(why) => assert!(why.contains("larger than a peer frame"), "{why}"),
            other => panic!("{other:?}"),
        }
        drop(huge);
        assert_eq!(
            conn.call("/append", b"small").await.unwrap(),
            (200, Bytes::from_static(b"small"))
        );
        assert!(!conn.is_closed());
    }

    #[tokio::test]
    async fn dropping_a_connection_lets_go_of_the_stream_while_the_peer_is_silent() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let conn = FramedConn::start(client, "test".into());
        // The start of a frame whose rest never comes: the reader waits in the middle of it,
        // and the single bytes below stay inside it.
        server.write_all(&100u32.to_be_bytes()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        drop(conn);
        // Once both halves of the client's stream are gone, writing to it fails; a reader task
        // still waiting for a frame would keep it open.
        let mut gone = false;
        for _ in 0..90 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            if server.write_all(b"x").await.is_err() {
                gone = true;
                break;
            }
        }
        assert!(
            gone,
            "the client's stream stayed open after the connection was dropped"
        );
    }

    #[tokio::test]
    async fn a_connection_has_at_most_max_calls_outstanding() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let remote: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let started = Arc::new(AtomicU64::new(0));
        let counted = started.clone();
        tokio::spawn(serve(server, remote, move |_r: String, _b: Bytes| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                std::future::pending::<()>().await;
                (200, Bytes::new())
            }
        }));
        let n = MAX_CALLS_PER_CONN as u64 + 100;
        for id in 0..n {
            client.write_all(&frame(id, 1, &[b"/", b""])).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(started.load(Ordering::SeqCst), MAX_CALLS_PER_CONN as u64);
    }

    #[tokio::test]
    async fn an_oversized_length_ends_the_connection() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let remote: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let served = tokio::spawn(serve(server, remote, |_r: String, _b: Bytes| async move {
            (200, Bytes::new())
        }));
        client.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), served)
            .await
            .expect("the server stops reading")
            .unwrap();
    }

    #[tokio::test]
    async fn a_cancelled_call_leaves_nothing_waiting() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let remote: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        tokio::spawn(serve(server, remote, |_r: String, _b: Bytes| async move {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            (200, Bytes::new())
        }));
        let conn = FramedConn::start(client, "test".into());
        let r = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            conn.call("/slow", b""),
        )
        .await;
        assert!(r.is_err());
        assert!(lock(&conn.pending).waiting.is_empty());
    }
}
