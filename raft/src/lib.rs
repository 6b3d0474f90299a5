//! eden-raft: openraft glue over eden-storage.
