//! Storage conformance: openraft's own suite against the log store and the snapshotting
//! state machine exactly as a member uses them.

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use prometheus_client::metrics::histogram::Histogram;

use super::log_store::LogStore;
use super::state_machine::StateMachineStore;
use super::types::TypeConfig;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().map_err(|e| {
            StorageError::from_io_error(openraft::ErrorSubject::Store, openraft::ErrorVerb::Read, e)
        })?;
        let log = LogStore::open(&dir.path().join("raft-log")).map_err(|e| {
            StorageError::from_io_error(openraft::ErrorSubject::Store, openraft::ErrorVerb::Read, e)
        })?;
        let sm = StateMachineStore::open(&dir.path().join("snapshots"), Histogram::new([0.001]))
            .map_err(|e| {
                StorageError::from_io_error(
                    openraft::ErrorSubject::Store,
                    openraft::ErrorVerb::Read,
                    e,
                )
            })?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_passes_openraft_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(Builder).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_survives_reopen() {
    use openraft::storage::{RaftLogReader, RaftLogStorage};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("raft-log");
    let vote = openraft::alias::VoteOf::<TypeConfig>::new(3, 1);
    {
        let mut log = LogStore::open(&path).expect("open");
        log.save_vote(&vote).await.expect("vote");
    }
    let mut log = LogStore::open(&path).expect("reopen");
    assert_eq!(log.read_vote().await.expect("read"), Some(vote));
    let state = log.get_log_state().await.expect("state");
    assert_eq!(state.last_log_id, None);
}

/// A member upgraded from the redb log format keeps its log: entries, vote, committed index
/// and purge point are carried over once, and the redb file is set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redb_log_is_carried_over() {
    use openraft::EntryPayload;
    use openraft::storage::{RaftLogReader, RaftLogStorage};
    use openraft::testing::log_id;
    use redb::TableDefinition;
    const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

    let dir = tempfile::tempdir().expect("tempdir");
    let legacy = dir.path().join("raft-log.redb");
    let vote = openraft::alias::VoteOf::<TypeConfig>::new(4, 2);
    let purged = log_id::<TypeConfig>(4, 2, 2);
    let entries: Vec<super::types::Entry> = (3..=5)
        .map(|i| openraft::Entry {
            log_id: log_id::<TypeConfig>(4, 2, i),
            payload: EntryPayload::Blank,
        })
        .collect();
    {
        let db = redb::Database::create(&legacy).expect("redb");
        let txn = db.begin_write().expect("txn");
        {
            let mut meta = txn.open_table(META).expect("meta");
            let v = serde_json::to_vec(&vote).expect("json");
            meta.insert("vote", v.as_slice()).expect("insert");
            let p = serde_json::to_vec(&Some(purged)).expect("json");
            meta.insert("last_purged", p.as_slice()).expect("insert");
            let mut log = txn.open_table(LOG).expect("log");
            for e in &entries {
                let b = serde_json::to_vec(e).expect("json");
                log.insert(e.log_id.index, b.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    let path = dir.path().join("raft-log");
    for _ in 0..2 {
        let mut log = LogStore::open(&path).expect("open");
        assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(purged));
        assert_eq!(state.last_log_id, Some(log_id::<TypeConfig>(4, 2, 5)));
        let got = log.try_get_log_entries(0..10).await.expect("entries");
        assert_eq!(got, entries);
    }
    assert!(!legacy.exists(), "the redb file is set aside");
    assert!(dir.path().join("raft-log.redb.imported").exists());
}
