//! The peer transport: TLS between nodes (mutual, with the cluster CA), carrying HTTP/2 and, for
//! the Raft routes, a lighter framed protocol.
//!
//! - [`client`]: [`NetworkFactory`] (openraft's `RaftNetworkFactory`) and [`PeerPool`], per peer
//!   address one framed connection for the Raft routes and one HTTP/2 connection for the rest,
//!   also used to forward client requests to the leader.
//! - [`server`]: [`PeerServer`], which serves the Raft routes to peers that presented a
//!   certificate the cluster CA signed, and hands every other path to a fallback (join, gossip).
//!
//! - [`framed`]: the protocol the Raft routes use between eden nodes (chosen by ALPN on the same
//!   port): one write per call instead of HTTP/2's streams. The server also serves the Raft
//!   routes over HTTP/2, for peers that do not offer it.
//!
//! Every body is bincode 2 (serde): the request type in, `Result<response, error>` out, with
//! status 200. A non-200 status means the request did not reach Raft (bad route, missing client
//! certificate, undecodable body); its body is a plain-text explanation.
//!
//! TLS is the caller's: this module receives ready `rustls` configs (built from the cluster CA by
//! the cluster layer) and never reads key files. A peer is addressed by its `peer_addr`; the host
//! part is the TLS server name, so node certificates carry it as a SAN (IP or DNS).

pub mod client;
pub mod framed;
pub mod server;

/// The route paths, for logs and tests.
pub mod server_paths {
    pub use super::{
        APPEND, FORWARD_MEMBERSHIP, FORWARD_READ_INDEX, FORWARD_WRITE, FORWARD_WRITES, SNAPSHOT,
        VOTE,
    };
}

pub use client::{NetworkFactory, PeerNetwork, PeerPool, PeerStats, RTT_BUCKETS};
pub use server::{Fallback, PeerCertificate, PeerServer, RemoteAddr};

/// Raft RPCs; only for peers with a verified client certificate.
pub const APPEND: &str = "/raft/append";
pub const VOTE: &str = "/raft/vote";
pub const SNAPSHOT: &str = "/raft/snapshot";
/// Leader forwarding: a follower hands a client write, a read-index request or a membership
/// change to the leader.
pub const FORWARD_WRITE: &str = "/raft/forward/write";
/// Several client writes from one follower in one call (see `RaftNode::write`).
pub const FORWARD_WRITES: &str = "/raft/forward/writes";
pub const FORWARD_READ_INDEX: &str = "/raft/forward/read-index";
pub const FORWARD_MEMBERSHIP: &str = "/raft/forward/membership";

/// How long a peer connection may go without the peer acknowledging anything: keepalive probes
/// while idle (10 s, then 3 probes 5 s apart), and a user timeout while data waits for an ack
/// (Linux sends no keepalive probes then, and would retransmit for about 15 minutes).
pub(crate) const PEER_SILENCE: std::time::Duration = std::time::Duration::from_secs(25);

/// TCP keepalive and `TCP_USER_TIMEOUT` for every peer connection, both ends: a peer that
/// vanished without closing (a cut link, a powered-off host) is noticed after about
/// [`PEER_SILENCE`], whether the connection was idle or had data waiting, and its connection and
/// tasks go. The framed protocol has no pings of its own; HTTP/2 also pings.
pub(crate) fn keep_alive(tcp: &tokio::net::TcpStream) {
    let params = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(10))
        .with_interval(std::time::Duration::from_secs(5))
        .with_retries(3);
    let sock = socket2::SockRef::from(tcp);
    if let Err(e) = sock.set_tcp_keepalive(&params) {
        tracing::debug!("TCP keepalive on a peer connection: {e}");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(PEER_SILENCE)) {
        tracing::debug!("TCP_USER_TIMEOUT on a peer connection: {e}");
    }
}

/// Largest request or response body accepted (an append of `max_payload_entries` large entries,
/// or one snapshot chunk).
pub const MAX_BODY: usize = 256 << 20;

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn keep_alive_turns_tcp_keepalive_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let sock = socket2::SockRef::from(&tcp);
        assert!(!sock.keepalive().unwrap(), "on before it was asked for");
        super::keep_alive(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(super::PEER_SILENCE),
            "no user timeout for unacknowledged data"
        );
    }
}
