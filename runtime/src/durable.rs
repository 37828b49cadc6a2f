//! Writes that survive a crash or a power loss whole or not at all: a file is written under a
//! temporary name unique to this writer, fsync'd, renamed (or linked) into place, and its
//! directory fsync'd, so after a restart a reader finds the old content or the new one, never a
//! torn mix or an empty file; concurrent writers never share a temporary name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary name next to `path`, unique to this process and call.
fn temp_name(path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{seq}.tmp", std::process::id()))
}

/// The pid of the process that made the temporary file `name` (a file name as [`temp_name`]
/// makes them: `.<name>.<pid>.<seq>.tmp`), or `None` for any other name.
pub fn temp_writer_pid(name: &str) -> Option<u32> {
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = inner.rsplitn(3, '.');
    let seq = parts.next()?;
    let pid = parts.next()?;
    let _target = parts.next().filter(|t| !t.is_empty())?;
    seq.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// fsync of a directory: makes the creation, rename or removal of its entries durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> io::Result<PathBuf> {
    let tmp = temp_name(path);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    match written {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Replaces `path` with `bytes` atomically but not durably: a reader sees the old content or
/// the new, never a mix, but after a power loss either may be there, or neither if the file
/// is new. For state that is re-derived after a crash anyway (a container's live status); a
/// unique temporary per writer, no fsync.
pub fn replace_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_name(path);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(bytes)?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Replaces `path` with `bytes` atomically and durably (file mode 0644).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// [`write_atomic`] with the new file's mode (e.g. 0600 for a key).
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = write_temp(path, bytes, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(parent(path))
}

/// Creates `path` holding `bytes` only if nothing is there yet: `Ok(false)` when it exists.
/// The file appears whole (a hard link of a complete, fsync'd temporary file), so a crash
/// never leaves it empty, and two writers racing for the name cannot both win.
pub fn create_new(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let tmp = write_temp(path, bytes, 0o644)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            fsync_dir(parent(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes `path` durably; a missing file is not an error.
pub fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(parent(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Flushes everything written to the filesystem holding `path` (syncfs): one call for a whole
/// unpacked tree, before the rename that publishes it.
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    nix::unistd::syncfs(&f).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_names_its_writer() {
        let tmp = temp_name(Path::new("/run/x/containers/ab12.json"));
        let name = tmp.file_name().and_then(|n| n.to_str()).expect("name");
        assert_eq!(temp_writer_pid(name), Some(std::process::id()));
        for other in [
            "ab12.json",
            ".ab12.json",
            ".x.tmp",
            "..1.2.tmp",
            ".a.b.c.tmp",
            ".a.12.x.tmp",
        ] {
            assert_eq!(temp_writer_pid(other), None, "{other}");
        }
    }

    #[test]
    fn atomic_writes_replace_whole_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("rewrite");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        write_atomic_mode(&dir.path().join("key"), b"k", 0o600).expect("key");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn create_new_is_whole_and_exclusive() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("10.42.0.2");
        assert!(create_new(&p, b"owner-a").expect("create"));
        assert!(!create_new(&p, b"owner-b").expect("second"));
        assert_eq!(fs::read(&p).expect("read"), b"owner-a");
        remove(&p).expect("remove");
        remove(&p).expect("remove twice");
        assert!(create_new(&p, b"owner-b").expect("again"));
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn concurrent_writers_never_share_a_temporary() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("last");
        std::thread::scope(|s| {
            for i in 0..8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(p, format!("writer {i}").as_bytes()).expect("write");
                    }
                });
            }
        });
        let text = fs::read_to_string(&p).expect("read");
        assert!(text.starts_with("writer "), "{text}");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }
}
