//! openraft's own storage test suite against the segment-file log store and the eden-storage state
//! machine. Each case gets a fresh temporary data dir.

use std::sync::Arc;

use eden_raft::{LogStore, StateMachine, StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = TempDir::new().expect("temp dir");
        let log = LogStore::open(&dir.path().join("log")).expect("open log store");
        let store = eden_storage::Store::open(&dir.path().join("state")).expect("open store");
        let sm = StateMachine::new(Arc::new(store), &dir.path().join("snapshots"))
            .expect("state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("openraft's storage suite failed: {e}");
    }
}
