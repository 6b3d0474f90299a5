//! eden-storage: the MVCC keyspace with etcd v3 semantics, on sled.

pub mod types;
pub use types::*;
