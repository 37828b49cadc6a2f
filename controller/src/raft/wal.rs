//! The write-ahead log under the Raft log store: append-only segment files, one `write` and
//! one `fdatasync` per group commit, as etcd's WAL does.
//!
//! ```text
//! raft-log/
//!   LOCK                       flock'd by the one writer (another process, or an old instance
//!                              in this one, cannot write the same log)
//!   00000000000000000001.wal   segments, preallocated, written in order
//!   00000000000000000002.wal   the last one is being written
//! ```
//!
//! A record is `len u32 | crc32 u32 | kind u8 | index u64 | payload`, little-endian, where
//! `len` counts from `kind` to the end and the CRC covers the same bytes. Kinds: an entry at
//! `index`, a truncation from `index`, a purge up to `index`, the vote, the committed index.
//! Replaying the records in order rebuilds the log exactly as the writer left it.
//!
//! Segments are preallocated (`fallocate`), so a commit's `fdatasync` writes data, not the
//! file's size. After a commit that passes the segment size the writer starts a new segment
//! whose first records are a checkpoint of the vote, the committed index and the purge point;
//! a segment is deleted once a later segment exists and every entry it holds is purged.
//!
//! **Architecture Invariant:** only the last segment can end in a torn record (a crash in the
//! middle of a commit: nothing in it was acknowledged). Replay stops there and the tail is
//! zeroed before anything new is written, so stale bytes are never read as records. Anything
//! wrong in an earlier segment is corruption, and opening fails naming the file and offset.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FallocateFlags, Flock, FlockArg};

/// Bytes before a record's payload: length, CRC, kind, index.
const HEADER: usize = 4 + 4 + 1 + 8;
/// The longest record accepted on replay (the API takes requests up to 16 MiB).
const MAX_RECORD: usize = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Entry = 1,
    Truncate = 2,
    Purge = 3,
    Vote = 4,
    Committed = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Entry,
            2 => Kind::Truncate,
            3 => Kind::Purge,
            4 => Kind::Vote,
            5 => Kind::Committed,
            _ => return None,
        })
    }
}

/// What replaying the segments gives: the log as the writer left it, still encoded.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Replayed {
    pub entries: BTreeMap<u64, Vec<u8>>,
    pub vote: Option<Vec<u8>>,
    pub committed: Option<Vec<u8>>,
    /// The purge point's index and its encoded log id.
    pub purged: Option<(u64, Vec<u8>)>,
}

impl Replayed {
    fn apply(&mut self, kind: Kind, index: u64, payload: &[u8]) {
        match kind {
            Kind::Entry => {
                self.entries.insert(index, payload.to_vec());
            }
            Kind::Truncate => {
                self.entries.split_off(&index);
            }
            Kind::Purge => {
                self.entries = self.entries.split_off(&(index + 1));
                self.purged = Some((index, payload.to_vec()));
            }
            Kind::Vote => self.vote = Some(payload.to_vec()),
            Kind::Committed => self.committed = Some(payload.to_vec()),
        }
    }
}

struct Segment {
    seq: u64,
    path: PathBuf,
    /// The highest entry index written into this segment, if any.
    max_index: Option<u64>,
}

/// The writer's handle. Owned by one thread; every method does blocking I/O.
pub(super) struct Wal {
    dir: PathBuf,
    segment_size: u64,
    /// Oldest first; the last is being written.
    segments: Vec<Segment>,
    file: File,
    offset: u64,
    buf: Vec<u8>,
    /// The latest vote, committed index and purge point pushed, for checkpoints.
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    purged: Option<(u64, Vec<u8>)>,
    /// A purge was pushed since the last commit: look for segments to delete.
    purge_pending: bool,
    _lock: Flock<File>,
}

fn segment_name(seq: u64) -> String {
    format!("{seq:020}.wal")
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Appends one framed record to `buf`.
pub(super) fn encode_record(buf: &mut Vec<u8>, kind: Kind, index: u64, payload: &[u8]) {
    let len = (HEADER - 8 + payload.len()) as u32;
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.push(kind as u8);
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// How a segment's records ended.
enum End {
    /// At a zero length or the end of the file: where the writer stopped.
    Clean(usize),
    /// At a record that is cut short or fails its CRC, at this offset.
    Bad(usize, String),
}

/// Replays one segment's records into `into`; returns where they end and the highest entry
/// index seen.
fn replay_segment(data: &[u8], into: &mut Replayed) -> (End, Option<u64>) {
    let mut pos = 0usize;
    let mut max_index = None;
    loop {
        if pos + 4 > data.len() {
            return (End::Clean(pos), max_index);
        }
        let len =
            u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        if len == 0 {
            return (End::Clean(pos), max_index);
        }
        if !(HEADER - 8..=MAX_RECORD).contains(&len) || pos + 8 + len > data.len() {
            return (
                End::Bad(pos, format!("record length {len} runs past the segment")),
                max_index,
            );
        }
        let body = &data[pos + 8..pos + 8 + len];
        let crc = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        if crc32fast::hash(body) != crc {
            return (End::Bad(pos, "checksum mismatch".into()), max_index);
        }
        let Some(kind) = Kind::from_u8(body[0]) else {
            return (
                End::Bad(pos, format!("unknown record kind {}", body[0])),
                max_index,
            );
        };
        let mut index = [0u8; 8];
        index.copy_from_slice(&body[1..9]);
        let index = u64::from_le_bytes(index);
        if kind == Kind::Entry {
            max_index = Some(max_index.map_or(index, |m: u64| m.max(index)));
        }
        into.apply(kind, index, &body[9..]);
        pos += 8 + len;
    }
}

/// Whether `dir` holds any segment (a missing directory holds none).
pub(super) fn has_segments(dir: &Path) -> io::Result<bool> {
    match list_segments(dir) {
        Ok(s) => Ok(!s.is_empty()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for item in fs::read_dir(dir)? {
        let item = item?;
        let name = item.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_suffix(".wal")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, item.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Creates `path` preallocated to `size` and durable (file and directory).
fn create_preallocated(dir: &Path, path: &Path, size: u64, first: &[u8]) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    preallocate(&file, size)?;
    file.write_all_at(first, 0)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(file)
}

fn preallocate(file: &File, size: u64) -> io::Result<()> {
    let len = i64::try_from(size).map_err(|_| io::Error::other("segment size too large"))?;
    match nix::fcntl::fallocate(file, FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        // A filesystem without fallocate: the file grows as it is written.
        Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

impl Wal {
    /// Locks `dir` (creating it), replays every segment and readies the last one for writing.
    pub fn open(dir: &Path, segment_size: u64) -> io::Result<(Wal, Replayed)> {
        fs::create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        let _ = fs::remove_file(dir.join("import.tmp"));
        let listed = list_segments(dir)?;
        let mut replayed = Replayed::default();
        let mut segments = Vec::with_capacity(listed.len());
        let mut tail = 0usize;
        for (i, (seq, path)) in listed.iter().enumerate() {
            let data = fs::read(path)?;
            let last = i + 1 == listed.len();
            let (end, max_index) = replay_segment(&data, &mut replayed);
            match end {
                End::Clean(at) => {
                    if !last && data[at..].iter().any(|b| *b != 0) {
                        return Err(invalid(format!(
                            "corrupt raft log segment {}: unreadable record at offset {at}",
                            path.display()
                        )));
                    }
                    tail = at;
                }
                End::Bad(at, why) if last => {
                    tracing::warn!(
                        segment = %path.display(),
                        offset = at,
                        dropped_bytes = data.len() - at,
                        reason = %why,
                        "raft log ends in a torn record (a crash during a write); dropping it"
                    );
                    tail = at;
                }
                End::Bad(at, why) => {
                    return Err(invalid(format!(
                        "corrupt raft log segment {} at offset {at}: {why}",
                        path.display()
                    )));
                }
            }
            segments.push(Segment {
                seq: *seq,
                path: path.clone(),
                max_index,
            });
        }
        let (file, offset) = match segments.last() {
            Some(seg) => {
                let file = OpenOptions::new().read(true).write(true).open(&seg.path)?;
                // Zero everything after the last good record: stale bytes there must never
                // be read as records once new ones are written in front of them.
                file.set_len(tail as u64)?;
                preallocate(&file, segment_size.max(tail as u64))?;
                let mut offset = tail as u64;
                if tail == 0 && segments.len() > 1 {
                    // A crash while the segment was being started: its checkpoint is what
                    // lets the segments before it go, so write it again.
                    let first = checkpoint(&replayed.vote, &replayed.committed, &replayed.purged);
                    file.write_all_at(&first, 0)?;
                    offset = first.len() as u64;
                }
                file.sync_all()?;
                (file, offset)
            }
            None => {
                let path = dir.join(segment_name(1));
                let file = create_preallocated(dir, &path, segment_size, &[])?;
                segments.push(Segment {
                    seq: 1,
                    path,
                    max_index: None,
                });
                (file, 0)
            }
        };
        let wal = Wal {
            dir: dir.to_path_buf(),
            segment_size,
            segments,
            file,
            offset,
            buf: Vec::with_capacity(64 << 10),
            vote: replayed.vote.clone(),
            committed: replayed.committed.clone(),
            purged: replayed.purged.clone(),
            purge_pending: false,
            _lock: lock,
        };
        Ok((wal, replayed))
    }

    /// Queues a record for the next [`Wal::commit`].
    pub fn push(&mut self, kind: Kind, index: u64, payload: &[u8]) {
        encode_record(&mut self.buf, kind, index, payload);
        match kind {
            Kind::Entry => {
                if let Some(seg) = self.segments.last_mut() {
                    seg.max_index = Some(seg.max_index.map_or(index, |m| m.max(index)));
                }
            }
            Kind::Purge => {
                self.purged = Some((index, payload.to_vec()));
                self.purge_pending = true;
            }
            Kind::Vote => self.vote = Some(payload.to_vec()),
            Kind::Committed => self.committed = Some(payload.to_vec()),
            Kind::Truncate => {}
        }
    }

    /// Writes every queued record with one `write`, and makes it durable with one
    /// `fdatasync` when `durable`. Then starts a new segment if this one is full, and deletes
    /// segments a purge has emptied.
    pub fn commit(&mut self, durable: bool) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.offset)?;
            self.offset += self.buf.len() as u64;
            self.buf.clear();
        }
        if durable {
            self.file.sync_data()?;
        }
        if self.offset >= self.segment_size {
            self.roll()?;
        }
        if self.purge_pending {
            self.purge_pending = false;
            self.delete_purged()?;
        }
        Ok(())
    }

    /// Starts the next segment with a checkpoint of the vote, committed index and purge point.
    fn roll(&mut self) -> io::Result<()> {
        // Whatever a non-durable commit left unsynced goes to disk before the segment closes.
        self.file.sync_data()?;
        let seq = self.segments.last().map_or(1, |s| s.seq + 1);
        let first = checkpoint(&self.vote, &self.committed, &self.purged);
        let path = self.dir.join(segment_name(seq));
        let size = self.segment_size.max(first.len() as u64);
        self.file = create_preallocated(&self.dir, &path, size, &first)?;
        self.offset = first.len() as u64;
        self.segments.push(Segment {
            seq,
            path,
            max_index: None,
        });
        Ok(())
    }

    /// Deletes the oldest segments while a later one exists and every entry they hold is at
    /// or below the purge point. Losing a deletion in a crash is harmless: replaying the old
    /// segment again ends in the same state.
    fn delete_purged(&mut self) -> io::Result<()> {
        let Some((upto, _)) = self.purged else {
            return Ok(());
        };
        let mut deleted = false;
        while self.segments.len() > 1 && self.segments[0].max_index.is_none_or(|m| m <= upto) {
            let seg = self.segments.remove(0);
            fs::remove_file(&seg.path)?;
            deleted = true;
        }
        if deleted {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// How many segment files the log has now.
    #[cfg(test)]
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

/// The records that open a new segment, so the segments before it can be deleted.
fn checkpoint(
    vote: &Option<Vec<u8>>,
    committed: &Option<Vec<u8>>,
    purged: &Option<(u64, Vec<u8>)>,
) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(v) = vote {
        encode_record(&mut out, Kind::Vote, 0, v);
    }
    if let Some(c) = committed {
        encode_record(&mut out, Kind::Committed, 0, c);
    }
    if let Some((upto, p)) = purged {
        encode_record(&mut out, Kind::Purge, *upto, p);
    }
    out
}

fn lock_dir(dir: &Path) -> io::Result<Flock<File>> {
    let path = dir.join("LOCK");
    // The data dir lock already keeps other processes out. Within one process, a previous
    // instance's writer thread may take a moment to finish and release the log.
    let mut tries = 0;
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err((_, e)) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("raft log {} is in use: {e}", dir.display()),
                ));
            }
        }
    }
}

/// Writes `records` as the first segment of the empty log at `dir`, atomically: the segment
/// appears whole (renamed into place after it is durable) or not at all. Used once, to carry
/// a log over from the previous (redb) format.
pub(super) fn write_initial(dir: &Path, records: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let _lock = lock_dir(dir)?;
    if !list_segments(dir)?.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("raft log {} already has segments", dir.display()),
        ));
    }
    let tmp = dir.join("import.tmp");
    let _ = fs::remove_file(&tmp);
    let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    file.write_all_at(records, 0)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, dir.join(segment_name(1)))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reopen(dir: &Path, size: u64) -> (Wal, Replayed) {
        Wal::open(dir, size).expect("open")
    }

    #[test]
    fn records_survive_reopen_and_segments_roll_and_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let payload = vec![7u8; 100];
        {
            let (mut wal, r) = reopen(&path, 1024);
            assert_eq!(r, Replayed::default());
            wal.push(Kind::Vote, 0, b"v1");
            for i in 1..=40 {
                wal.push(Kind::Entry, i, &payload);
                wal.commit(true).expect("commit");
            }
            assert!(wal.segment_count() > 3, "segments roll at the size");
        }
        let (mut wal, r) = reopen(&path, 1024);
        assert_eq!(r.entries.len(), 40);
        assert_eq!(r.vote.as_deref(), Some(&b"v1"[..]));
        let before = wal.segment_count();
        wal.push(Kind::Purge, 30, b"p30");
        wal.commit(true).expect("commit");
        assert!(wal.segment_count() < before, "purged segments are deleted");
        drop(wal);
        let (_wal, r) = reopen(&path, 1024);
        assert_eq!(
            r.entries.keys().copied().collect::<Vec<_>>(),
            (31..=40).collect::<Vec<_>>()
        );
        assert_eq!(
            r.vote.as_deref(),
            Some(&b"v1"[..]),
            "the checkpoint kept the vote"
        );
        assert_eq!(r.purged, Some((30, b"p30".to_vec())));
    }

    #[test]
    fn a_torn_tail_is_dropped_and_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        {
            let (mut wal, _) = reopen(&path, 1 << 20);
            wal.push(Kind::Entry, 1, b"one");
            wal.push(Kind::Entry, 2, b"two");
            wal.commit(true).expect("commit");
        }
        // A crash in the middle of a third record, with a stale valid-looking record behind it.
        let seg = path.join(segment_name(1));
        let mut rec = Vec::new();
        encode_record(&mut rec, Kind::Entry, 3, b"three");
        let half = &rec[..rec.len() / 2];
        let mut stale = Vec::new();
        encode_record(&mut stale, Kind::Entry, 9, b"stale");
        let f = OpenOptions::new().write(true).open(&seg).expect("seg");
        let end = 2 * HEADER as u64 + 6;
        f.write_all_at(half, end).expect("write");
        f.write_all_at(&stale, end + 64).expect("write");
        drop(f);
        {
            let (mut wal, r) = reopen(&path, 1 << 20);
            assert_eq!(r.entries.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
            wal.push(Kind::Entry, 3, b"3");
            wal.commit(true).expect("commit");
        }
        let (_wal, r) = reopen(&path, 1 << 20);
        assert_eq!(r.entries.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(r.entries[&3], b"3");
    }

    #[test]
    fn corruption_in_an_older_segment_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        {
            let (mut wal, _) = reopen(&path, 64);
            for i in 1..=4 {
                wal.push(Kind::Entry, i, &[1u8; 60]);
                wal.commit(true).expect("commit");
            }
        }
        let seg = path.join(segment_name(1));
        let f = OpenOptions::new().write(true).open(&seg).expect("seg");
        f.write_all_at(&[0xff], HEADER as u64 + 3).expect("write");
        drop(f);
        let err = Wal::open(&path, 64).err().expect("corrupt");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let msg = err.to_string();
        assert!(
            msg.contains(&segment_name(1)) && msg.contains("checksum"),
            "{msg}"
        );
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (_wal, _) = reopen(&path, 4096);
        // Not the 5 s retry: lock directly.
        let file = OpenOptions::new()
            .write(true)
            .open(path.join("LOCK"))
            .expect("lock file");
        assert!(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u64, u8),
        Truncate(u64),
        Purge(u64),
        Vote(u8),
        Commit(bool),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1u64..200, any::<u8>()).prop_map(|(i, b)| Op::Append(i, b)),
            1 => (0u64..200).prop_map(Op::Truncate),
            1 => (0u64..200).prop_map(Op::Purge),
            1 => any::<u8>().prop_map(Op::Vote),
            3 => any::<bool>().prop_map(Op::Commit),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever sequence of writes, truncations, rolls, purges and reopens: what is
        /// replayed equals what was written (a model applying the same records).
        #[test]
        fn replay_equals_what_was_written(ops in proptest::collection::vec(op(), 1..120)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("wal");
            let (mut wal, _) = reopen(&path, 512);
            let mut model = Replayed::default();
            for op in ops {
                // As in Raft: the purge point only moves forward, and nothing is appended at
                // or below it.
                let floor = model.purged.as_ref().map(|(i, _)| *i);
                match op {
                    Op::Append(i, _) | Op::Purge(i) if floor.is_some_and(|f| i <= f) => {}
                    Op::Append(i, b) => {
                        let p = vec![b; (i % 50) as usize];
                        wal.push(Kind::Entry, i, &p);
                        model.apply(Kind::Entry, i, &p);
                    }
                    Op::Truncate(i) => {
                        wal.push(Kind::Truncate, i, &[]);
                        model.apply(Kind::Truncate, i, &[]);
                    }
                    Op::Purge(i) => {
                        wal.push(Kind::Purge, i, &i.to_le_bytes());
                        model.apply(Kind::Purge, i, &i.to_le_bytes());
                    }
                    Op::Vote(b) => {
                        wal.push(Kind::Vote, 0, &[b]);
                        model.apply(Kind::Vote, 0, &[b]);
                    }
                    Op::Commit(durable) => wal.commit(durable).expect("commit"),
                    Op::Reopen => {
                        wal.commit(true).expect("commit");
                        drop(wal);
                        let (w, r) = reopen(&path, 512);
                        wal = w;
                        prop_assert_eq!(&r, &model);
                    }
                }
            }
            wal.commit(true).expect("commit");
            drop(wal);
            let (_w, r) = reopen(&path, 512);
            prop_assert_eq!(&r, &model);
        }
    }
}
