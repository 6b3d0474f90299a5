//! eden: configuration management for fleets of servers, in one binary.
//!
//! Crate map (dependencies point down this list, never up):
//!
//! - [`cli`]: clap commands; talks to the cluster only through the etcd API.
//! - [`agent`]: per-node loop that watches assignments and runs the engine; the run controller.
//! - [`cluster`]: PKI, data dir, join, `eden serve`, SWIM gossip and the role controller.
//! - [`etcd`]: the etcd v3 gRPC services and JSON gateway over `eden_raft`.
//! - [`engine`]: the state language: render, parse, graph, order, run. Pure; no network, no store.
//! - [`modules`]: `cmd`, `file`, `pkg`, `pkgrepo`, `test`, external: what changes a server.
//! - [`sources`]: where state trees come from: git repositories at a commit.
//! - [`error`]: the one error type.
//!
//! Below this crate: `eden_raft` (openraft with its own log files) and `eden_storage` (the MVCC keyspace).

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod engine;
pub mod error;
pub mod etcd;
pub mod modules;
pub mod sources;
