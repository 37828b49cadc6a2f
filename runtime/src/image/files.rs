//! The files of an image source: a directory (`oci:DIR`) or an uncompressed tar archive
//! (`oci-archive:FILE`, `docker-archive:FILE`) read in place.
//!
//! An archive is indexed once (one pass over its headers, no data copied); opening a member
//! then seeks to it with a handle of its own, so several layers can be read in parallel.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How many symlinks may be followed when opening one archive member.
const MAX_LINKS: usize = 8;

/// A read-only tree of files, addressed by `/`-separated relative paths (`index.json`,
/// `blobs/sha256/<hex>`).
pub(crate) trait SourceFiles: Send + Sync + std::fmt::Debug {
    /// Opens a regular file; returns it and its length.
    fn open(&self, path: &str) -> io::Result<(Box<dyn Read + Send>, u64)>;
    /// Where `path` lives, for error messages.
    fn display(&self, path: &str) -> PathBuf;
}

/// Files in a directory.
#[derive(Debug)]
pub(crate) struct DirFiles {
    dir: PathBuf,
}

impl DirFiles {
    pub(crate) fn new(dir: &Path) -> DirFiles {
        DirFiles {
            dir: dir.to_owned(),
        }
    }
}

impl SourceFiles for DirFiles {
    fn open(&self, path: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let full = self.dir.join(path);
        let file = File::open(&full)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        Ok((Box::new(file), meta.len()))
    }

    fn display(&self, path: &str) -> PathBuf {
        self.dir.join(path)
    }
}

#[derive(Debug, Clone)]
enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink (target relative to the link's directory, or absolute within the archive) or
    /// a hard link (target relative to the archive root).
    Link {
        target: String,
        hard: bool,
    },
}

/// The members of an uncompressed tar archive.
#[derive(Debug)]
pub(crate) struct TarFiles {
    file: PathBuf,
    members: HashMap<String, Member>,
}

impl TarFiles {
    /// Indexes the archive at `file` (headers only).
    pub(crate) fn open(file: &Path) -> io::Result<TarFiles> {
        let f = File::open(file)?;
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        let mut head = [0u8; 4];
        let n = (&f).take(4).read(&mut head)?;
        if n >= 2
            && (head.starts_with(&[0x1f, 0x8b]) || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the archive is compressed; give the uncompressed .tar",
            ));
        }
        (&f).seek(SeekFrom::Start(0))?;
        let mut archive = tar::Archive::new(io::BufReader::with_capacity(64 << 10, f));
        let mut members = HashMap::new();
        for entry in archive.entries_with_seek()? {
            let entry = entry?;
            let path = normalize(&String::from_utf8_lossy(&entry.path_bytes()));
            let Some(path) = path else { continue };
            let kind = entry.header().entry_type();
            let member = match kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => Member::File {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                },
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let Some(target) = entry.link_name_bytes() else {
                        continue;
                    };
                    Member::Link {
                        target: String::from_utf8_lossy(&target).into_owned(),
                        hard: kind == tar::EntryType::Link,
                    }
                }
                _ => continue,
            };
            members.insert(path, member);
        }
        Ok(TarFiles {
            file: file.to_owned(),
            members,
        })
    }

    /// Paths of the archive's members (for tests and error messages).
    #[cfg(test)]
    pub(crate) fn paths(&self) -> Vec<&str> {
        let mut p: Vec<&str> = self.members.keys().map(String::as_str).collect();
        p.sort_unstable();
        p
    }

    fn lookup(&self, path: &str) -> io::Result<(u64, u64)> {
        let mut current = normalize(path).ok_or_else(not_found)?;
        for _ in 0..MAX_LINKS {
            match self.members.get(&current) {
                None => return Err(not_found()),
                Some(Member::File { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Link { target, hard }) => {
                    let joined = if *hard || target.starts_with('/') {
                        target.clone()
                    } else {
                        match current.rsplit_once('/') {
                            Some((dir, _)) => format!("{dir}/{target}"),
                            None => target.clone(),
                        }
                    };
                    current = normalize(&joined).ok_or_else(not_found)?;
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many levels of links",
        ))
    }
}

fn not_found() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no such file in the archive")
}

/// `./a//b/../c` -> `a/c`; `None` for paths that leave the root or are empty.
fn normalize(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

impl SourceFiles for TarFiles {
    fn open(&self, path: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let (offset, size) = self.lookup(path)?;
        let mut f = File::open(&self.file)?;
        f.seek(SeekFrom::Start(offset))?;
        Ok((Box::new(f.take(size)), size))
    }

    fn display(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("{}:{path}", self.file.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize("./a//b/../c").as_deref(), Some("a/c"));
        assert_eq!(normalize("/index.json").as_deref(), Some("index.json"));
        assert_eq!(normalize("../x"), None);
        assert_eq!(normalize("."), None);
    }

    #[test]
    fn reads_members_and_follows_links() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "./blobs/sha256/abc", &b"hello"[..])
            .expect("append");
        let mut l = tar::Header::new_gnu();
        l.set_size(0);
        l.set_entry_type(tar::EntryType::Symlink);
        b.append_link(&mut l, "layer1/layer.tar", "../blobs/sha256/abc")
            .expect("link");
        let mut l = tar::Header::new_gnu();
        l.set_size(0);
        l.set_entry_type(tar::EntryType::Symlink);
        b.append_link(&mut l, "loop", "loop").expect("link");
        let bytes = b.into_inner().expect("finish");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.tar");
        std::fs::write(&path, &bytes).expect("write");

        let files = TarFiles::open(&path).expect("index");
        assert_eq!(
            files.paths(),
            ["blobs/sha256/abc", "layer1/layer.tar", "loop"]
        );
        for p in [
            "blobs/sha256/abc",
            "layer1/layer.tar",
            "./layer1//layer.tar",
        ] {
            let (mut r, len) = files.open(p).expect(p);
            let mut s = String::new();
            r.read_to_string(&mut s).expect("read");
            assert_eq!((s.as_str(), len), ("hello", 5), "{p}");
        }
        assert_eq!(
            files.open("nope").err().map(|e| e.kind()),
            Some(io::ErrorKind::NotFound)
        );
        assert!(files.open("loop").is_err());
    }
}
