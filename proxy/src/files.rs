//! The proxy's directory, read through a descriptor opened before privileges were dropped:
//! the directory itself belongs to the proxy's user, so files in it stay readable even where
//! the agent's data directory above it is closed to that user.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, fstatat};

use crate::ProxyError;

/// An open directory.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: String,
}

/// What identifies one version of a file (a rename gives a new inode).
pub type Stamp = (u64, i64, i64);

impl Dir {
    pub fn open(path: &Path) -> Result<Dir, ProxyError> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ProxyError::Io(format!("opening {}: {e}", path.display())))?;
        Ok(Dir {
            fd,
            path: path.display().to_string(),
        })
    }

    pub fn read(&self, name: &str) -> Result<String, ProxyError> {
        let err = |e: &dyn std::fmt::Display| ProxyError::Io(format!("{}/{name}: {e}", self.path));
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err(&e))?;
        let mut text = String::new();
        std::fs::File::from(fd)
            .take(1 << 20)
            .read_to_string(&mut text)
            .map_err(|e| err(&e))?;
        Ok(text)
    }

    /// The file's stamp, `None` when it is missing.
    pub fn stamp(&self, name: &str) -> Option<Stamp> {
        fstatat(&self.fd, name, AtFlags::empty())
            .ok()
            .map(|s| (s.st_ino, s.st_mtime, s.st_mtime_nsec))
    }
}
