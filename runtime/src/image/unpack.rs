//! Unpacking one layer's tar stream into a directory, converting whiteouts to overlayfs form.
//!
//! Every path is resolved with `openat2(RESOLVE_IN_ROOT)` from the layer dir, so neither `..`
//! nor a symlink unpacked earlier (`a -> /etc`, then `a/passwd`) can reach outside it; entries
//! whose own path is absolute or contains `..` are refused outright, as are hard links whose
//! target does. Ownership, modes (with setuid/setgid/sticky), device numbers, xattrs and
//! mtimes are kept; this runs as root.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens, makedev,
    mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use tar::EntryType;
use tracing::{debug, warn};

use super::{ImageError, xattr};

const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";
const COPY_BUF: usize = 256 << 10;

/// Unpacks the tar stream `reader` into `dest` (an existing, empty directory).
/// `digest` names the layer in errors.
pub(crate) fn unpack<R: Read>(reader: R, dest: &Path, digest: &str) -> Result<(), ImageError> {
    let root = nix::fcntl::open(
        dest,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ImageError::Io {
        path: dest.to_owned(),
        source: e.into(),
    })?;
    let mut u = Unpacker {
        root,
        dirs: Vec::new(),
        buf: vec![0; COPY_BUF],
        parent_cache: None,
    };
    let stream = |source: io::Error| ImageError::Unpack {
        digest: digest.to_owned(),
        source,
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(stream)? {
        let mut entry = entry.map_err(stream)?;
        let raw = entry.path_bytes().into_owned();
        u.entry(&mut entry, &raw).map_err(|f| match f {
            Fail::Stream(source) => stream(source),
            Fail::Entry(reason) => ImageError::Entry {
                digest: digest.to_owned(),
                entry: String::from_utf8_lossy(&raw).into_owned(),
                reason,
            },
        })?;
    }
    u.finish_dirs();
    Ok(())
}

/// Why one entry failed: the stream itself (bad tar, bad compression) or this entry.
enum Fail {
    Stream(io::Error),
    Entry(String),
}

fn refuse(reason: impl Into<String>) -> Fail {
    Fail::Entry(reason.into())
}

fn sys(what: &str) -> impl FnOnce(Errno) -> Fail + '_ {
    move |e| Fail::Entry(format!("{what}: {e}"))
}

/// Ownership, mode, mtime and xattrs of one entry.
struct Meta {
    uid: Uid,
    gid: Gid,
    mode: Mode,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

struct Unpacker {
    root: OwnedFd,
    /// Directories and their mtimes, set once every entry is in place.
    dirs: Vec<(PathBuf, TimeSpec)>,
    buf: Vec<u8>,
    /// The last parent directory opened; dropped whenever anything is removed, since a removed
    /// directory (or one replaced by a symlink) must not be written into.
    parent_cache: Option<(PathBuf, Rc<OwnedFd>)>,
}

impl Unpacker {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, raw: &[u8]) -> Result<(), Fail> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let comps = clean_path(raw).map_err(refuse)?;
        let Some((&name, parent)) = comps.split_last() else {
            // The layer root itself ("./"): only its metadata can be set.
            if kind != EntryType::Directory {
                return Err(refuse("only a directory may name the layer root"));
            }
            let meta = meta(entry)?;
            let root = self.root.as_fd();
            apply_fd_meta(root, &meta)?;
            self.dirs.push((PathBuf::new(), meta.mtime));
            return Ok(());
        };

        if let Some(target) = name.as_bytes().strip_prefix(b".wh.") {
            let pfd = self.parent(parent)?;
            if target == b".wh..opq" {
                // The directory hides everything below it in lower layers.
                return xattr::fset(pfd.as_fd(), OPAQUE_XATTR, b"y").map_err(sys("set opaque"));
            }
            if target.starts_with(b".wh.") {
                debug!(entry = %String::from_utf8_lossy(raw), "ignoring aufs metadata");
                return Ok(());
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(refuse("invalid whiteout"));
            }
            return self.whiteout(&pfd, OsStr::from_bytes(target));
        }

        let meta = meta(entry)?;
        match kind {
            EntryType::Directory => self.dir(&comps, &meta),
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let pfd = self.parent(parent)?;
                self.file(&pfd, name, &meta, entry)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse("symlink without a target"))?
                    .into_owned();
                let pfd = self.parent(parent)?;
                self.clear(&pfd, name)?;
                symlinkat(OsStr::from_bytes(&target), pfd.as_fd(), name).map_err(sys("symlink"))?;
                apply_at_meta(&pfd, name, &meta, true)
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse("hard link without a target"))?
                    .into_owned();
                let pfd = self.parent(parent)?;
                self.hard_link(&pfd, name, &comps, &target)
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (sflag, dev) = match kind {
                    EntryType::Char => (SFlag::S_IFCHR, device(entry.header())?),
                    EntryType::Block => (SFlag::S_IFBLK, device(entry.header())?),
                    _ => (SFlag::S_IFIFO, 0),
                };
                let pfd = self.parent(parent)?;
                self.clear(&pfd, name)?;
                mknodat(pfd.as_fd(), name, sflag, Mode::empty(), dev).map_err(sys("mknod"))?;
                apply_at_meta(&pfd, name, &meta, false)
            }
            other => Err(refuse(format!(
                "unsupported entry type {:?}",
                other.as_byte() as char
            ))),
        }
    }

    /// Opens (creating missing components as 0755 root:root dirs) the directory `comps`,
    /// resolved inside the layer.
    fn parent(&mut self, comps: &[&OsStr]) -> Result<Rc<OwnedFd>, Fail> {
        let path: PathBuf = comps.iter().collect();
        if let Some((cached, fd)) = &self.parent_cache
            && *cached == path
        {
            return Ok(Rc::clone(fd));
        }
        let fd = Rc::new(self.open_dir(comps, true).map_err(|e| {
            Fail::Entry(format!(
                "parent directory {:?}: {e}",
                path.display().to_string()
            ))
        })?);
        self.parent_cache = Some((path, Rc::clone(&fd)));
        Ok(fd)
    }

    fn open_dir(&self, comps: &[&OsStr], create: bool) -> nix::Result<OwnedFd> {
        let Some((&last, up)) = comps.split_last() else {
            return nix::unistd::dup(&self.root);
        };
        let path: PathBuf = comps.iter().collect();
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        match resolve_in(&self.root, &path, flags) {
            Err(Errno::ENOENT) if create => {
                let pfd = self.open_dir(up, true)?;
                match mkdirat(pfd.as_fd(), last, Mode::from_bits_truncate(0o755)) {
                    // Not subject to the umask.
                    Ok(()) => fchmodat(
                        pfd.as_fd(),
                        last,
                        Mode::from_bits_truncate(0o755),
                        FchmodatFlags::FollowSymlink,
                    )?,
                    Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e),
                }
                resolve_in(&self.root, &path, flags)
            }
            r => r,
        }
    }

    /// Removes whatever is at `pfd/name` (a directory recursively).
    fn clear(&mut self, pfd: &OwnedFd, name: &OsStr) -> Result<(), Fail> {
        match fstatat(pfd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(sys("stat existing")(e)),
            Ok(st) => {
                self.parent_cache = None;
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
                    std::fs::remove_dir_all(proc_path(pfd, name))
                        .map_err(|e| refuse(format!("remove existing directory: {e}")))
                } else {
                    unlinkat(pfd.as_fd(), name, UnlinkatFlags::NoRemoveDir)
                        .map_err(sys("remove existing"))
                }
            }
        }
    }

    fn dir(&mut self, comps: &[&OsStr], meta: &Meta) -> Result<(), Fail> {
        let Some((&name, parent)) = comps.split_last() else {
            return Ok(());
        };
        let pfd = self.parent(parent)?;
        match fstatat(pfd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {}
            Ok(_) => {
                self.clear(&pfd, name)?;
                mkdirat(pfd.as_fd(), name, Mode::from_bits_truncate(0o700))
                    .map_err(sys("mkdir"))?;
            }
            Err(Errno::ENOENT) => {
                mkdirat(pfd.as_fd(), name, Mode::from_bits_truncate(0o700))
                    .map_err(sys("mkdir"))?;
            }
            Err(e) => return Err(sys("stat existing")(e)),
        }
        let dfd = openat(
            pfd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys("open directory"))?;
        apply_fd_meta(dfd.as_fd(), meta)?;
        self.dirs.push((comps.iter().collect(), meta.mtime));
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        pfd: &OwnedFd,
        name: &OsStr,
        meta: &Meta,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), Fail> {
        self.clear(pfd, name)?;
        let fd = openat(
            pfd.as_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(sys("create"))?;
        let mut file = File::from(fd);
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::Stream(e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| refuse(format!("write: {e}")))?;
        }
        apply_fd_meta(file.as_fd(), meta)
    }

    fn hard_link(
        &mut self,
        pfd: &OwnedFd,
        name: &OsStr,
        comps: &[&OsStr],
        target: &[u8],
    ) -> Result<(), Fail> {
        let tcomps = clean_path(target)
            .map_err(|reason| refuse(format!("hard link target {:?}: {reason}", lossy(target))))?;
        let Some((&tname, tparent)) = tcomps.split_last() else {
            return Err(refuse("hard link to the layer root"));
        };
        if tcomps == comps {
            return Ok(());
        }
        let tpfd = self
            .open_dir(tparent, false)
            .map_err(|e| refuse(format!("hard link target {:?}: {e}", lossy(target))))?;
        self.clear(pfd, name)?;
        linkat(tpfd.as_fd(), tname, pfd.as_fd(), name, AtFlags::empty())
            .map_err(|e| refuse(format!("hard link to {:?}: {e}", lossy(target))))
    }

    /// `.wh.NAME`: NAME becomes a 0:0 character device, overlayfs' whiteout.
    fn whiteout(&mut self, pfd: &OwnedFd, name: &OsStr) -> Result<(), Fail> {
        self.clear(pfd, name)?;
        mknodat(
            pfd.as_fd(),
            name,
            SFlag::S_IFCHR,
            Mode::empty(),
            makedev(0, 0),
        )
        .map_err(sys("mknod whiteout"))?;
        fchownat(
            pfd.as_fd(),
            name,
            Some(Uid::from_raw(0)),
            Some(Gid::from_raw(0)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(sys("chown whiteout"))
    }

    /// Sets directory mtimes last: creating their children changed them.
    fn finish_dirs(&mut self) {
        for (path, mtime) in std::mem::take(&mut self.dirs) {
            let fd = if path.as_os_str().is_empty() {
                nix::unistd::dup(&self.root)
            } else {
                resolve_in(
                    &self.root,
                    &path,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                )
            };
            if let Err(e) = fd.and_then(|fd| futimens(&fd, &mtime, &mtime)) {
                debug!(path = %path.display(), error = %e, "cannot set directory mtime");
            }
        }
    }
}

/// `openat2(root, path, RESOLVE_IN_ROOT)`: `..` and symlinks cannot leave `root`.
fn resolve_in(root: &OwnedFd, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    loop {
        // EAGAIN: a concurrent rename somewhere on the filesystem; the kernel asks to retry.
        match openat2(root.as_fd(), path, how) {
            Err(Errno::EAGAIN) => continue,
            r => return r,
        }
    }
}

/// The entry's path as components; absolute paths and `..` are refused.
fn clean_path(raw: &[u8]) -> Result<Vec<&OsStr>, &'static str> {
    if raw.contains(&0) {
        return Err("NUL byte in path");
    }
    let mut out = Vec::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("absolute path refused"),
            Component::ParentDir => return Err("path escapes the layer dir (..)"),
        }
    }
    Ok(out)
}

/// The device number of a character or block device entry.
fn device(h: &tar::Header) -> Result<libc::dev_t, Fail> {
    let bad = |e: io::Error| refuse(format!("bad device number: {e}"));
    let major = h.device_major().map_err(bad)?.unwrap_or(0);
    let minor = h.device_minor().map_err(bad)?.unwrap_or(0);
    Ok(makedev(u64::from(major), u64::from(minor)))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A path naming `dirfd/name` for the calls that have no `*at` form (lsetxattr, remove_dir_all).
fn proc_path(dirfd: &OwnedFd, name: &OsStr) -> PathBuf {
    Path::new(&format!("/proc/self/fd/{}", dirfd.as_raw_fd())).join(name)
}

fn meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, Fail> {
    let h = entry.header();
    let id = |v: u64, what: &str| {
        u32::try_from(v).map_err(|_| refuse(format!("{what} {v} out of range")))
    };
    let uid = id(h.uid().map_err(Fail::Stream)?, "uid")?;
    let gid = id(h.gid().map_err(Fail::Stream)?, "gid")?;
    let mode = h.mode().map_err(Fail::Stream)? & 0o7777;
    let mtime = i64::try_from(h.mtime().map_err(Fail::Stream)?).unwrap_or(i64::MAX);
    let mut xattrs = Vec::new();
    if let Some(exts) = entry.pax_extensions().map_err(Fail::Stream)? {
        for ext in exts {
            let ext = ext.map_err(Fail::Stream)?;
            let Ok(key) = ext.key() else { continue };
            let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if name.starts_with("trusted.overlay.") {
                // Only whiteouts may carry overlayfs semantics; a layer must not smuggle in
                // redirects, metacopy or opaque markers of its own.
                warn!(xattr = name, "ignoring overlayfs xattr in layer");
                continue;
            }
            let name = CString::new(name).map_err(|_| refuse("NUL byte in xattr name"))?;
            xattrs.push((name, ext.value_bytes().to_vec()));
        }
    }
    Ok(Meta {
        uid: Uid::from_raw(uid),
        gid: Gid::from_raw(gid),
        mode: Mode::from_bits_truncate(mode),
        mtime: TimeSpec::new(mtime, 0),
        xattrs,
    })
}

/// Owner, then mode (chown clears setuid), then xattrs (chown clears security.capability),
/// then mtime, on an open file or directory.
fn apply_fd_meta(fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), Fail> {
    fchown(fd, Some(meta.uid), Some(meta.gid)).map_err(sys("chown"))?;
    fchmod(fd, meta.mode).map_err(sys("chmod"))?;
    for (name, value) in &meta.xattrs {
        set_xattr_result(name, xattr::fset(fd, name, value))?;
    }
    futimens(fd, &meta.mtime, &meta.mtime).map_err(sys("set mtime"))
}

/// The same for `dirfd/name`, without following it if it is a symlink (whose mode is not set).
fn apply_at_meta(dirfd: &OwnedFd, name: &OsStr, meta: &Meta, symlink: bool) -> Result<(), Fail> {
    fchownat(
        dirfd.as_fd(),
        name,
        Some(meta.uid),
        Some(meta.gid),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(sys("chown"))?;
    if !symlink {
        // A device node or fifo we just created: following is harmless.
        fchmodat(dirfd.as_fd(), name, meta.mode, FchmodatFlags::FollowSymlink)
            .map_err(sys("chmod"))?;
    }
    if !meta.xattrs.is_empty() {
        let path = CString::new(proc_path(dirfd, name).into_os_string().into_encoded_bytes())
            .map_err(|_| refuse("NUL byte in path"))?;
        for (xname, value) in &meta.xattrs {
            match xattr::lset(&path, xname, value) {
                // The kernel takes user.* xattrs only on regular files and directories, and
                // this is neither: skipped with a warning, as containerd's unpacker does,
                // instead of refusing the whole layer.
                Err(Errno::EPERM) if xname.to_bytes().starts_with(b"user.") => {
                    warn!(xattr = ?xname, "user.* xattr on a symlink, device or fifo; skipped");
                }
                r => set_xattr_result(xname, r)?,
            }
        }
    }
    utimensat(
        dirfd.as_fd(),
        name,
        &meta.mtime,
        &meta.mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(sys("set mtime"))
}

fn set_xattr_result(name: &CStr, r: nix::Result<()>) -> Result<(), Fail> {
    match r {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP) => {
            warn!(xattr = ?name, "filesystem does not support this xattr; skipped");
            Ok(())
        }
        Err(e) => Err(Fail::Entry(format!(
            "setxattr {}: {e}",
            name.to_string_lossy()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_path_refuses_escapes() {
        fn ok(p: &str) -> Vec<&OsStr> {
            clean_path(p.as_bytes()).expect(p)
        }
        assert_eq!(ok("./a/b/"), vec![OsStr::new("a"), OsStr::new("b")]);
        assert_eq!(ok("a/./b"), vec![OsStr::new("a"), OsStr::new("b")]);
        assert!(ok("./").is_empty());
        for bad in ["../evil", "a/../../evil", "/etc/passwd", "a/..", "a\0b"] {
            assert!(clean_path(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
