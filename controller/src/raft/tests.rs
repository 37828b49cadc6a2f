//! Storage conformance: openraft's own suite against the redb log store and the snapshotting
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
        let log = LogStore::open(&dir.path().join("log.redb")).map_err(|e| {
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
    let path = dir.path().join("log.redb");
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
