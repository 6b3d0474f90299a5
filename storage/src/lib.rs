//! eden-storage: the MVCC keyspace with etcd v3 semantics, in its own data file.
//!
//! Every eden node that holds the datastore role keeps one [`Store`]. The Raft layer feeds it
//! committed commands through [`Store::apply`]; the etcd API layer reads it through
//! [`Store::range`] and replays [`Store::events`] for watches. Nothing here knows about Raft,
//! gRPC, tokio or clocks.
//!
//! ## The model in one paragraph
//! The store is a sequence of revisions. Revision 1 is the empty store; every command that
//! changes keys (a put, a delete that matched something, a txn that wrote, a lease revoke that
//! deleted keys) produces exactly one new revision, however many keys it touched. History keeps
//! each change as a record keyed by `(revision, sub)`, so any retained revision can be read back
//! and every revision's events replayed in order. Compaction forgets history below a revision;
//! reading below it gives `ErrCompacted`, reading above the current revision `ErrFutureRev`.
//!
//! ## Crate map
//! - [`types`]: requests, responses and commands, shaped after etcd's protos (the contract with
//!   the Raft and etcd layers).
//! - [`mvcc`]: what each command and read *means*: pure functions over an in-memory index
//!   ([`mvcc::Keyspace`]) and a record source. Deterministic; used by the store, the tests and
//!   the fuzz target alike.
//! - [`codec`]: the bytes on disk: key layout, versioned record encodings, total decoders.
//! - [`store`]: [`Store`], the keyspace made durable: atomic batches, flush, snapshots.
//! - [`tree`]: the ordered key/value tree under it: an in-memory index over one append-only,
//!   checksummed data file.
//! - [`error`]: [`Error`], with etcd's exact messages.
//!
//! ## Invariants worth knowing
//! - `apply` is deterministic: no clock, no randomness (lease ids are generated from a counter).
//! - A batch from `apply` is atomic on disk, and durable once `flush` returns.
//! - Reads never see half a batch.
//!
//! ```
//! use eden_storage::*;
//! let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path()).unwrap();
//! let put = Command::Put(PutRequest { key: b"a".to_vec(), value: b"1".to_vec(), ..Default::default() });
//! let results = store.apply(&[put], &[(b"applied".to_vec(), b"7".to_vec())]).unwrap();
//! let (applied, events) = results[0].clone().unwrap();
//! assert_eq!(applied.revision, 2); // the empty store is revision 1
//! assert_eq!(events.len(), 1);
//! store.flush().unwrap();
//! let got = store.range(&RangeRequest { key: b"a".to_vec(), ..Default::default() }).unwrap();
//! assert_eq!(got.kvs[0].value, b"1");
//! assert_eq!(store.meta(b"applied").unwrap(), Some(b"7".to_vec()));
//! ```

pub mod codec;
pub mod error;
pub mod mvcc;
pub mod store;
pub mod tree;
pub mod types;

pub use error::Error;
pub use store::Store;
pub use types::*;
