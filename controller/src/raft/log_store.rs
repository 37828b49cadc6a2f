//! The durable Raft log and vote, in one redb file, written by one writer thread with group
//! commit.
//!
//! The unpurged log (at most one snapshot interval plus the entries kept behind a snapshot)
//! is mirrored in memory, so reads never wait for the disk and openraft can replicate entries
//! to followers while the leader's own fsync is still running (as etcd does). Every change is
//! applied to the mirror at once and queued, in order, to the writer thread, which folds all
//! queued changes into one redb transaction and commits it durably.
//!
//! **Architecture Invariant:** an append is acknowledged to openraft
//! (`IOFlushed::io_completed`) only after the redb commit that contains it has returned
//! (`Durability::Immediate`, fsync'd). `save_vote` returns only once the vote is durable. The
//! single writer thread applies changes in the order openraft issued them, so a vote and a
//! log write are never reordered.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, RwLock};

use openraft::OptionalSend;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::types::{Entry, LogId, TypeConfig, Vote};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

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

/// The in-memory mirror of what is (or is about to be) on disk.
#[derive(Default)]
struct Mirror {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

/// One change for the writer thread.
enum Op {
    Append(Vec<(u64, Vec<u8>)>, IOFlushed<TypeConfig>),
    TruncateFrom(u64),
    Purge { upto: u64, bytes: Vec<u8> },
    Vote(Vec<u8>, tokio::sync::oneshot::Sender<io::Result<()>>),
    Committed(Vec<u8>),
}

struct Shared {
    mirror: RwLock<Mirror>,
    tx: mpsc::Sender<Op>,
}

/// The log store. Cheap to clone: clones share the mirror and the writer.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

impl LogStore {
    /// Opens (or creates) the log at `path`, loads it into memory and starts the writer.
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

        let mut mirror = Mirror::default();
        {
            let txn = db.begin_read().map_err(io_err)?;
            let meta = txn.open_table(META).map_err(io_err)?;
            let get = |key: &str| -> io::Result<Option<Vec<u8>>> {
                Ok(meta.get(key).map_err(io_err)?.map(|v| v.value().to_vec()))
            };
            if let Some(b) = get(KEY_VOTE)? {
                mirror.vote = decode("vote", &b)?;
            }
            if let Some(b) = get(KEY_COMMITTED)? {
                mirror.committed = decode("committed", &b)?;
            }
            if let Some(b) = get(KEY_PURGED)? {
                mirror.purged = decode("purge point", &b)?;
            }
            let log = txn.open_table(LOG).map_err(io_err)?;
            for item in log.iter().map_err(io_err)? {
                let (k, v) = item.map_err(io_err)?;
                mirror
                    .entries
                    .insert(k.value(), decode("entry", v.value())?);
            }
        }

        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer(db, rx))?;
        Ok(LogStore {
            shared: Arc::new(Shared {
                mirror: RwLock::new(mirror),
                tx,
            }),
        })
    }

    fn mirror(&self) -> std::sync::RwLockReadGuard<'_, Mirror> {
        self.shared.mirror.read().unwrap_or_else(|e| e.into_inner())
    }

    fn mirror_mut(&self) -> std::sync::RwLockWriteGuard<'_, Mirror> {
        self.shared
            .mirror
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, op: Op) -> io::Result<()> {
        self.shared
            .tx
            .send(op)
            .map_err(|_| io::Error::other("raft log writer has stopped"))
    }
}

/// The writer thread: takes every queued change, applies them in order in one transaction,
/// commits durably, then acknowledges them.
fn writer(db: Database, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let result = write_batch(&db, &batch);
        if let Err(e) = &result {
            tracing::error!(error = %e, "raft log write failed");
        }
        for op in batch {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            match op {
                Op::Append(_, cb) => cb.io_completed(r),
                Op::Vote(_, ack) => {
                    let _ = ack.send(r);
                }
                Op::TruncateFrom(_) | Op::Purge { .. } | Op::Committed(_) => {}
            }
        }
        if result.is_err() {
            // The on-disk log may now disagree with the mirror: stop, so every later write
            // fails and openraft stops the node (a storage error is fatal).
            return;
        }
    }
}

fn write_batch(db: &Database, batch: &[Op]) -> io::Result<()> {
    // The committed index is only a hint (openraft re-derives it): a batch holding nothing
    // else is not worth an fsync, and rides on the next durable commit.
    let durability = if batch.iter().all(|op| matches!(op, Op::Committed(_))) {
        Durability::None
    } else {
        Durability::Immediate
    };
    let mut txn = db.begin_write().map_err(io_err)?;
    txn.set_durability(durability).map_err(io_err)?;
    {
        let mut log = txn.open_table(LOG).map_err(io_err)?;
        let mut meta = txn.open_table(META).map_err(io_err)?;
        for op in batch {
            match op {
                Op::Append(entries, _) => {
                    for (index, bytes) in entries {
                        log.insert(*index, bytes.as_slice()).map_err(io_err)?;
                    }
                }
                Op::TruncateFrom(from) => {
                    log.retain_in(*from.., |_, _| false).map_err(io_err)?;
                }
                Op::Purge { upto, bytes } => {
                    // The purge point and the removal go in one transaction: the log never
                    // looks like it has a hole.
                    meta.insert(KEY_PURGED, bytes.as_slice()).map_err(io_err)?;
                    log.retain_in(..=*upto, |_, _| false).map_err(io_err)?;
                }
                Op::Vote(bytes, _) => {
                    meta.insert(KEY_VOTE, bytes.as_slice()).map_err(io_err)?;
                }
                Op::Committed(bytes) => {
                    meta.insert(KEY_COMMITTED, bytes.as_slice())
                        .map_err(io_err)?;
                }
            }
        }
    }
    // commit() returns once the data is fsync'd.
    txn.commit().map_err(io_err)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        Ok(self
            .mirror()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        Ok(self.mirror().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let m = self.mirror();
        let last = m
            .entries
            .last_key_value()
            .map(|(_, e)| e.log_id)
            .or(m.purged);
        Ok(LogState {
            last_purged_log_id: m.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let bytes = encode(vote)?;
        let (ack, done) = tokio::sync::oneshot::channel();
        {
            // Mirror and queue under one lock so the queue order is the mirror's order.
            let mut m = self.mirror_mut();
            self.send(Op::Vote(bytes, ack))?;
            m.vote = Some(*vote);
        }
        done.await
            .map_err(|_| io::Error::other("raft log writer has stopped"))?
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        // A hint that speeds up restart; it rides on the next durable commit.
        let bytes = encode(&committed)?;
        let mut m = self.mirror_mut();
        self.send(Op::Committed(bytes))?;
        m.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(self.mirror().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut encoded = Vec::with_capacity(entries.len());
        for e in &entries {
            encoded.push((e.log_id.index, encode(e)?));
        }
        let mut m = self.mirror_mut();
        self.send(Op::Append(encoded, callback))?;
        for e in entries {
            m.entries.insert(e.log_id.index, e);
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        let mut m = self.mirror_mut();
        self.send(Op::TruncateFrom(from))?;
        m.entries.split_off(&from);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let bytes = encode(&Some(log_id))?;
        let mut m = self.mirror_mut();
        self.send(Op::Purge {
            upto: log_id.index,
            bytes,
        })?;
        m.entries = m.entries.split_off(&(log_id.index + 1));
        m.purged = Some(log_id);
        Ok(())
    }
}
