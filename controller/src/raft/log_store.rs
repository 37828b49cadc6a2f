//! The durable Raft log and vote, in one redb file.
//!
//! **Architecture Invariant:** a write is acknowledged to openraft only after redb's commit
//! (which fsyncs, `Durability::Immediate`) has returned: `append` calls
//! `IOFlushed::io_completed` after the commit, never before. Vote and log writes are issued
//! one after another by openraft and each is durable before the next starts, so they are never
//! reordered.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::OptionalSend;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::types::{Entry, LogId, TypeConfig, Vote};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// The log store. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

fn io_err(e: impl Into<redb::Error>) -> io::Error {
    io::Error::other(e.into())
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("corrupt {what} in raft log: {e}"),
        )
    })
}

fn encode<T: serde::Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

impl LogStore {
    /// Opens (or creates) the log at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        // The data dir lock already keeps other processes out. Within one process, a previous
        // instance's background tasks may take a moment to release the file after shutdown.
        let mut tries = 0;
        let db = loop {
            match Database::create(path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other.map_err(io_err)?,
            }
        };
        let txn = db.begin_write().map_err(io_err)?;
        {
            txn.open_table(LOG).map_err(io_err)?;
            txn.open_table(META).map_err(io_err)?;
        }
        txn.commit().map_err(io_err)?;
        Ok(LogStore { db: Arc::new(db) })
    }

    /// Runs a blocking redb operation off the async runtime's worker threads.
    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> io::Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| io::Error::other(format!("log store task failed: {e}")))?
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        db: &Database,
        key: &str,
    ) -> io::Result<Option<T>> {
        let txn = db.begin_read().map_err(io_err)?;
        let table = txn.open_table(META).map_err(io_err)?;
        match table.get(key).map_err(io_err)? {
            Some(v) => Ok(Some(decode(key, v.value())?)),
            None => Ok(None),
        }
    }

    fn write_meta<T: serde::Serialize>(db: &Database, key: &str, value: &T) -> io::Result<()> {
        let bytes = encode(value)?;
        let mut txn = db.begin_write().map_err(io_err)?;
        txn.set_durability(Durability::Immediate).map_err(io_err)?;
        {
            let mut table = txn.open_table(META).map_err(io_err)?;
            table.insert(key, bytes.as_slice()).map_err(io_err)?;
        }
        txn.commit().map_err(io_err)
    }
}

fn to_bounds<RB: RangeBounds<u64>>(range: &RB) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let bounds = to_bounds(&range);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let table = txn.open_table(LOG).map_err(io_err)?;
            let mut out = Vec::new();
            for item in table.range::<u64>(bounds).map_err(io_err)? {
                let (_, v) = item.map_err(io_err)?;
                out.push(decode("entry", v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.blocking(|db| Self::read_meta(db, KEY_VOTE)).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        self.blocking(|db| {
            let last_purged: Option<LogId> = Self::read_meta(db, KEY_PURGED)?;
            let txn = db.begin_read().map_err(io_err)?;
            let table = txn.open_table(LOG).map_err(io_err)?;
            let last = match table.last().map_err(io_err)? {
                Some((_, v)) => {
                    let e: Entry = decode("entry", v.value())?;
                    Some(e.log_id)
                }
                None => last_purged,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let vote = *vote;
        self.blocking(move |db| Self::write_meta(db, KEY_VOTE, &vote))
            .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        self.blocking(move |db| Self::write_meta(db, KEY_COMMITTED, &committed))
            .await
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        self.blocking(|db| Ok(Self::read_meta::<Option<LogId>>(db, KEY_COMMITTED)?.flatten()))
            .await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for e in entries {
            encoded.push((e.log_id.index, encode(&e)?));
        }
        let res = self
            .blocking(move |db| {
                let mut txn = db.begin_write().map_err(io_err)?;
                txn.set_durability(Durability::Immediate).map_err(io_err)?;
                {
                    let mut table = txn.open_table(LOG).map_err(io_err)?;
                    for (index, bytes) in &encoded {
                        table.insert(*index, bytes.as_slice()).map_err(io_err)?;
                    }
                }
                // commit() returns once the data is fsync'd.
                txn.commit().map_err(io_err)
            })
            .await;
        match res {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        self.blocking(move |db| {
            let mut txn = db.begin_write().map_err(io_err)?;
            txn.set_durability(Durability::Immediate).map_err(io_err)?;
            {
                let mut table = txn.open_table(LOG).map_err(io_err)?;
                table.retain_in(from.., |_, _| false).map_err(io_err)?;
            }
            txn.commit().map_err(io_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        self.blocking(move |db| {
            let bytes = encode(&Some(log_id))?;
            let mut txn = db.begin_write().map_err(io_err)?;
            txn.set_durability(Durability::Immediate).map_err(io_err)?;
            {
                // Record the purge point first, in the same transaction: the log never looks
                // like it has a hole.
                let mut meta = txn.open_table(META).map_err(io_err)?;
                meta.insert(KEY_PURGED, bytes.as_slice()).map_err(io_err)?;
                let mut table = txn.open_table(LOG).map_err(io_err)?;
                table
                    .retain_in(..=log_id.index, |_, _| false)
                    .map_err(io_err)?;
            }
            txn.commit().map_err(io_err)
        })
        .await
    }
}
