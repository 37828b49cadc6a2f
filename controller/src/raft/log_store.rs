//! The durable Raft log and vote, in a write-ahead log of our own ([`super::wal`]), written by
//! one writer thread with group commit.
//!
//! The unpurged log (at most one snapshot interval plus the entries kept behind a snapshot)
//! is mirrored in memory, so reads never wait for the disk and openraft can replicate entries
//! to followers while the leader's own fsync is still running (as etcd does). Every change is
//! applied to the mirror at once and queued, in order, to the writer thread, which writes all
//! queued changes with one `write` and makes them durable with one `fdatasync`.
//!
//! **Architecture Invariant:** an append is acknowledged to openraft
//! (`IOFlushed::io_completed`) only after the `fdatasync` that covers it has returned.
//! `save_vote` returns only once the vote is durable. The single writer thread applies changes
//! in the order openraft issued them, so a vote and a log write are never reordered.
//!
//! A member upgraded from a release that kept its log in redb (`raft-log.redb`) has it carried
//! over once, on first open: written as the new log's first segment, atomically, and the redb
//! file renamed to `raft-log.redb.imported`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, RwLock};

use openraft::OptionalSend;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};

use super::types::{Entry, LogId, TypeConfig, Vote};
use super::wal::{self, Kind, Wal};

/// Segment size: at ~1 KB an entry, a snapshot interval (10,000 entries) spans a few segments.
const SEGMENT_SIZE: u64 = 16 << 20;

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
    /// Opens (or creates) the log in the directory `dir`, loads it into memory and starts the
    /// writer. A redb log from an earlier release at `<dir>.redb` is carried over first.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let legacy = dir.with_extension("redb");
        if legacy.exists() && !wal::has_segments(dir)? {
            import_redb(&legacy, dir)?;
        }
        let (wal, replayed) = Wal::open(dir, SEGMENT_SIZE)?;
        let mut mirror = Mirror::default();
        if let Some(b) = &replayed.vote {
            mirror.vote = decode("vote", b)?;
        }
        if let Some(b) = &replayed.committed {
            mirror.committed = decode("committed", b)?;
        }
        if let Some((_, b)) = &replayed.purged {
            mirror.purged = decode("purge point", b)?;
        }
        for (index, bytes) in &replayed.entries {
            mirror.entries.insert(*index, decode("entry", bytes)?);
        }

        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer(wal, rx))?;
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

/// The writer thread: takes every queued change, writes them in order with one `write` and
/// one `fdatasync`, then acknowledges them.
fn writer(mut wal: Wal, rx: mpsc::Receiver<Op>) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let result = write_batch(&mut wal, &batch);
        if let Err(e) = &result {
            tracing::error!(error = %e, "raft log write failed");
        }
        for op in batch.drain(..) {
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

fn write_batch(wal: &mut Wal, batch: &[Op]) -> io::Result<()> {
    for op in batch {
        match op {
            Op::Append(entries, _) => {
                for (index, bytes) in entries {
                    wal.push(Kind::Entry, *index, bytes);
                }
            }
            Op::TruncateFrom(from) => wal.push(Kind::Truncate, *from, &[]),
            Op::Purge { upto, bytes } => wal.push(Kind::Purge, *upto, bytes),
            Op::Vote(bytes, _) => wal.push(Kind::Vote, 0, bytes),
            Op::Committed(bytes) => wal.push(Kind::Committed, 0, bytes),
        }
    }
    // The committed index is only a hint (openraft re-derives it): a batch holding nothing
    // else is not worth a write, and stays queued for the next commit.
    if batch.iter().all(|op| matches!(op, Op::Committed(_))) {
        return Ok(());
    }
    wal.commit(true)
}

/// Carries a redb log (the format before the write-ahead log) over: every entry, the vote, the
/// committed index and the purge point become the new log's first segment, which appears
/// whole or not at all; then the redb file is renamed so it is not read again.
fn import_redb(legacy: &Path, dir: &Path) -> io::Result<()> {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
    fn err(e: impl Into<redb::Error>) -> io::Error {
        io::Error::other(e.into())
    }
    let mut records = Vec::new();
    {
        let db = redb::Database::open(legacy).map_err(err)?;
        let txn = db.begin_read().map_err(err)?;
        let meta = txn.open_table(META).map_err(err)?;
        let get = |key: &str| -> io::Result<Option<Vec<u8>>> {
            Ok(meta.get(key).map_err(err)?.map(|v| v.value().to_vec()))
        };
        if let Some(b) = get("vote")? {
            wal::encode_record(&mut records, Kind::Vote, 0, &b);
        }
        if let Some(b) = get("committed")? {
            wal::encode_record(&mut records, Kind::Committed, 0, &b);
        }
        if let Some(b) = get("last_purged")? {
            let purged: Option<LogId> = decode("purge point", &b)?;
            if let Some(p) = purged {
                wal::encode_record(&mut records, Kind::Purge, p.index, &b);
            }
        }
        let log = txn.open_table(LOG).map_err(err)?;
        for item in log.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            // Checked here, so a corrupt entry fails the import, not a later start.
            let _: Entry = decode("entry", v.value())?;
            wal::encode_record(&mut records, Kind::Entry, k.value(), v.value());
        }
    }
    wal::write_initial(dir, &records)?;
    let done = legacy.with_extension("redb.imported");
    std::fs::rename(legacy, &done)?;
    tracing::info!(
        from = %legacy.display(),
        to = %dir.display(),
        bytes = records.len(),
        "raft log carried over from redb"
    );
    Ok(())
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
