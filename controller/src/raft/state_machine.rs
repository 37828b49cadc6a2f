//! The openraft state-machine adapter around [`ClusterState`], with durable snapshots.
//!
//! The state lives in memory. Durability comes from the log plus snapshots: on start the
//! latest snapshot is loaded from disk and openraft re-applies the log entries after it, so
//! `applied_state` only ever reports a log id whose effects are durable (in the snapshot or
//! in the log above it). A snapshot is written to a temp file, fsync'd and renamed into place,
//! so a crash never leaves half a snapshot behind.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Instant;

use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};

use super::types::{
    LogId, Request, Response, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig,
};
use crate::state::{ClusterState, Touched};

const SNAPSHOT_FILE: &str = "snapshot.json";
/// How much of a snapshot is written before it is made durable and the next part written.
const SNAPSHOT_CHUNK: usize = 1 << 20;
/// The nice value of the thread that encodes and writes a snapshot (the lowest priority).
const SNAPSHOT_NICE: i32 = 19;

/// The applied state and the log position it reflects.
#[derive(Default)]
pub struct Applied {
    pub state: ClusterState,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// The snapshot file: metadata and the serialized state.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    state: ClusterState,
}

struct Inner {
    applied: RwLock<Applied>,
    /// The latest built or installed snapshot, as sent to followers.
    current: RwLock<Option<(SnapshotMeta, SnapshotData)>>,
    dir: PathBuf,
    apply_seconds: Histogram,
    /// What entries applied since the reconciler last looked touched.
    touched: std::sync::Mutex<Touched>,
    /// Whether an entry applied since the last look may have changed what agents are sent
    /// ([`Touched::published`]); true at first.
    published_dirty: std::sync::atomic::AtomicBool,
}

/// The state machine. Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
}

fn invalid(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
}

impl StateMachineStore {
    /// Opens the state machine, loading the latest snapshot in `dir` if there is one.
    pub fn open(dir: &Path, apply_seconds: Histogram) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(SNAPSHOT_FILE);
        let (applied, current) = match fs::read(&path) {
            Ok(bytes) => {
                let file: SnapshotFile = serde_json::from_slice(&bytes)
                    .map_err(|e| invalid(&format!("corrupt snapshot {}", path.display()), e))?;
                let data = serde_json::to_vec(&file.state).map_err(io::Error::other)?;
                let applied = Applied {
                    state: file.state,
                    last_applied: file.meta.last_log_id,
                    membership: file.meta.last_membership.clone(),
                };
                (applied, Some((file.meta, SnapshotData::from(data))))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Applied::default(), None),
            Err(e) => return Err(e),
        };
        Ok(StateMachineStore {
            inner: Arc::new(Inner {
                applied: RwLock::new(applied),
                current: RwLock::new(current),
                dir: dir.to_path_buf(),
                apply_seconds,
                touched: std::sync::Mutex::new(Touched::everything()),
                published_dirty: std::sync::atomic::AtomicBool::new(true),
            }),
        })
    }

    /// Read access to the applied state.
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        // A poisoned lock means a panic while applying; the state may be half-changed, so
        // there is nothing sane to serve: propagate the panic.
        self.inner
            .applied
            .read()
            .unwrap_or_else(|_| panic!("state machine lock poisoned"))
    }

    /// What was touched since the last call (everything, the first time and after a
    /// snapshot replaced the state).
    pub fn take_touched(&self) -> Touched {
        std::mem::take(&mut *self.touched())
    }

    /// Whether what agents are sent may have changed since the last call (true the first
    /// time, and after a snapshot replaced the state). Take it before reading the state.
    pub fn take_published_dirty(&self) -> bool {
        self.inner
            .published_dirty
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    fn touched(&self) -> std::sync::MutexGuard<'_, Touched> {
        self.inner
            .touched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.inner
            .applied
            .write()
            .unwrap_or_else(|_| panic!("state machine lock poisoned"))
    }

    fn set_current(&self, meta: SnapshotMeta, data: SnapshotData) {
        let mut cur = self
            .inner
            .current
            .write()
            .unwrap_or_else(|_| panic!("snapshot lock poisoned"));
        *cur = Some((meta, data));
    }

    /// Writes a snapshot durably (temp file, fsync, rename, fsync the directory), with the
    /// state already serialized: the file is a [`SnapshotFile`] written around those bytes, so
    /// a snapshot's state is serialized once, where it is built.
    fn persist_encoded(&self, meta: &SnapshotMeta, state: &[u8]) -> io::Result<()> {
        let mut head = b"{\"meta\":".to_vec();
        serde_json::to_writer(&mut head, meta).map_err(io::Error::other)?;
        head.extend_from_slice(b",\"state\":");
        let tmp = self.inner.dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&head)?;
            write_durably(&mut f, state, SNAPSHOT_CHUNK)?;
            f.write_all(b"}")?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.inner.dir.join(SNAPSHOT_FILE))?;
        fs::File::open(&self.inner.dir)?.sync_all()?;
        Ok(())
    }
}

/// Writes `data` to `f`, made durable `chunk` bytes at a time. On ext4 (data=ordered) every
/// fsync of the Raft log commits the journal, which first writes out the data of every file
/// allocated in it: megabytes of snapshot left to one final sync stalled the log's commits,
/// and every write waiting on them, for tens of milliseconds (BENCHMARKS.md, "the 64-client
/// tail").
fn write_durably(f: &mut fs::File, data: &[u8], chunk: usize) -> io::Result<()> {
    for part in data.chunks(chunk) {
        f.write_all(part)?;
        f.sync_data()?;
    }
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        // The state is persistent (imbl): the clone is O(1) under the lock. Encoding and
        // writing it take tens of milliseconds of CPU per megabyte-sized state, on every
        // member at about the same index; on a thread of its own at the lowest priority they
        // use what the write path leaves, rather than taking turns with it.
        let (meta, state) = {
            let g = self.read();
            let meta = SnapshotMeta {
                last_log_id: g.last_applied,
                last_membership: g.membership.clone(),
            };
            (meta, g.state.clone())
        };
        let this = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let lowered = rustix::process::setpriority_process(
                    Some(rustix::thread::gettid()),
                    SNAPSHOT_NICE,
                );
                let started = Instant::now();
                let built = serde_json::to_vec(&state)
                    .map_err(io::Error::other)
                    .and_then(|data| {
                        let encoded = started.elapsed();
                        this.persist_encoded(&meta, &data)?;
                        // Kept as the current snapshot and returned, without a copy.
                        let data = SnapshotData::from(data);
                        this.set_current(meta.clone(), data.clone());
                        tracing::info!(
                            last_log_id = ?meta.last_log_id,
                            bytes = data.len(),
                            encode_ms = encoded.as_millis() as u64,
                            write_ms = (started.elapsed() - encoded).as_millis() as u64,
                            low_priority = lowered.is_ok(),
                            "snapshot built"
                        );
                        Ok(Snapshot {
                            meta,
                            snapshot: data,
                        })
                    });
                let _ = tx.send(built);
            })?;
        rx.await
            .map_err(|_| io::Error::other("the snapshot thread ended without a result"))?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let g = self.read();
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: futures::Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = {
                let mut g = self.write();
                g.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => Response(None),
                    EntryPayload::Normal(Request(command)) => {
                        let started = Instant::now();
                        let mut touched = Touched::default();
                        let result = g.state.apply_touching(
                            Some(entry.log_id.index),
                            &command,
                            &mut touched,
                        );
                        if touched.published || touched.all {
                            self.inner
                                .published_dirty
                                .store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        self.touched().merge(touched);
                        self.inner
                            .apply_seconds
                            .observe(started.elapsed().as_secs_f64());
                        if let Err(e) = &result {
                            tracing::debug!(command = %command, error = %e, "command refused");
                        }
                        Response(Some(result))
                    }
                    EntryPayload::Membership(m) => {
                        g.membership = StoredMembership::new(Some(entry.log_id), m);
                        Response(None)
                    }
                }
            };
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        // Decoded to check it and to serve from; the file is written from the bytes received
        // (one serialization, the leader's).
        let state: ClusterState = serde_json::from_slice(&snapshot)
            .map_err(|e| invalid("corrupt snapshot received", e))?;
        let this = self.clone();
        let meta2 = meta.clone();
        let bytes = snapshot.clone();
        tokio::task::spawn_blocking(move || this.persist_encoded(&meta2, &bytes))
            .await
            .map_err(|e| io::Error::other(format!("snapshot task failed: {e}")))??;
        {
            let mut g = self.write();
            g.state = state;
            g.last_applied = meta.last_log_id;
            g.membership = meta.last_membership.clone();
            *self.touched() = Touched::everything();
            self.inner
                .published_dirty
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.set_current(meta.clone(), snapshot);
        tracing::info!(last_log_id = ?meta.last_log_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let cur = self
            .inner
            .current
            .read()
            .unwrap_or_else(|_| panic!("snapshot lock poisoned"));
        Ok(cur.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: data.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    async fn current_of(sm: &mut StateMachineStore) -> Snapshot {
        sm.get_current_snapshot()
            .await
            .expect("current")
            .expect("a current snapshot")
    }

    #[test]
    fn data_written_durably_in_chunks_reads_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..10_007u32).map(|i| (i % 251) as u8).collect();
        for chunk in [1000, 10_007, 1 << 20] {
            let mut f = fs::File::create(&path).expect("create");
            f.write_all(b"head").expect("head");
            write_durably(&mut f, &data, chunk).expect("write");
            drop(f);
            let back = fs::read(&path).expect("read");
            assert_eq!(&back[..4], b"head");
            assert_eq!(&back[4..], &data[..], "chunk {chunk}");
        }
    }

    /// A built snapshot (its state serialized once, the file written around it) opens again
    /// as the same state, and what it hands to followers is that state.
    #[tokio::test]
    async fn a_built_snapshot_reopens_as_the_same_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sm = StateMachineStore::open(dir.path(), Histogram::new([0.001])).expect("open");
        {
            let mut g = sm.write();
            for name in ["a", "b"] {
                let spec = skiff_common::parse_job_spec(
                    &format!("name = \"{name}\"\nimage = \"127.0.0.1:5000/x:1\"\n"),
                    skiff_common::SpecFormat::Toml,
                )
                .expect("spec");
                g.state
                    .apply(&Command::ApplyJob {
                        spec: Box::new(spec),
                        at_ms: 1,
                    })
                    .expect("apply");
            }
        }
        let built = sm.build_snapshot().await.expect("build");
        let sent: ClusterState = serde_json::from_slice(&built.snapshot).expect("state json");
        let again = StateMachineStore::open(dir.path(), Histogram::new([0.001])).expect("reopen");
        assert_eq!(again.read().state, sm.read().state);
        assert_eq!(sent, sm.read().state);
        assert!(again.read().state.job("default", "b").is_some());
        // The current snapshot is the built one's bytes, shared, not a copy.
        let current = current_of(&mut sm).await;
        assert_eq!(current.snapshot.as_ptr(), built.snapshot.as_ptr());

        // A follower installs it: its file holds the bytes received, it reopens as the same
        // state, and it hands on the same buffer.
        let dir2 = tempfile::tempdir().expect("tempdir");
        let mut follower =
            StateMachineStore::open(dir2.path(), Histogram::new([0.001])).expect("open");
        follower
            .install_snapshot(&built.meta, built.snapshot.clone())
            .await
            .expect("install");
        let file = fs::read_to_string(dir2.path().join(SNAPSHOT_FILE)).expect("file");
        let sent = std::str::from_utf8(&built.snapshot).expect("utf-8");
        assert!(file.ends_with(&format!(",\"state\":{sent}}}")), "{file}");
        let reopened =
            StateMachineStore::open(dir2.path(), Histogram::new([0.001])).expect("reopen");
        assert_eq!(reopened.read().state, sm.read().state);
        let handed = current_of(&mut follower).await;
        assert_eq!(handed.snapshot.as_ptr(), built.snapshot.as_ptr());

        // A corrupt one is refused and changes nothing, in memory or on disk.
        let err = follower
            .install_snapshot(&built.meta, SnapshotData::from_static(b"{\"jobs\": ["))
            .await
            .expect_err("corrupt snapshot");
        assert!(
            err.to_string().contains("corrupt snapshot received"),
            "{err}"
        );
        assert_eq!(follower.read().state, sm.read().state);
        assert_eq!(
            fs::read_to_string(dir2.path().join(SNAPSHOT_FILE)).expect("file"),
            file
        );
    }
}
