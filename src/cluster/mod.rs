//! cluster: what makes a set of `eden serve` processes one cluster.
//!
//! - [`pki`]: the cluster CA, node and admin certificates, the join token, rustls configs.
//! - [`datadir`]: a node's data dir: layout, lock, atomic writes, `node.json`.
//! - [`join`]: the join exchange on the peer port (`/join`, `/join/admit`).
//! - [`gossip`]: SWIM failure detection (foca) over the peer port: who is alive, suspect, dead.
//! - [`serve`]: `eden serve`: init, join or restart, then run Raft, the peer server and the
//!   etcd API until shutdown.
//! - [`compactor`]: auto-compaction of the keyspace's history by the leader.
//! - [`controller`]: the role controller (promotes standbys, replaces dead voters) and the
//!   leader's member prober; it reads health from both.

pub mod compactor;
pub mod controller;
pub mod datadir;
pub mod gossip;
pub mod join;
pub mod pki;
pub mod serve;
