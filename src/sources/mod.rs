//! Where state trees come from, before they become content-addressed blobs in the KV.
//!
//! - [`git`]: a git repository at a ref, resolved once to a commit ([`git::fetch`]).
//!
//! A source only produces files (path to bytes) and the identity of what was read (for git, the
//! commit id); storing them as blobs and recording them in the run is the caller's job. Sources
//! do blocking I/O and know nothing of the engine, the agent or the store.

pub mod git;
