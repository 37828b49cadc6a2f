//! The agent's syscall layer: the few calls nix does not wrap safely (openat2, clone,
//! close_range, interface ioctls including TUNSETIFF, forced socket buffer sizes, setsid
//! between fork and exec). Every `unsafe` block of the agent lives here, each with
//! its `// SAFETY:` reasoning.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;
const RESOLVE_IN_ROOT: u64 = 0x10;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path {s:?} contains NUL"),
        )
    })
}

fn openat2(dir: RawFd, path: &str, flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let p = cstr(path)?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: `p` is a valid NUL-terminated string and `how` a properly laid out open_how that
    // outlives the call; the kernel writes nothing through these pointers.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            p.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Opens `rel` inside the directory `root` as if `root` were `/`: symlinks (absolute or
/// with `..`) can never lead outside it (CVE-2021-30465 class). `O_PATH`.
pub fn open_in_root(root: &OwnedFd, rel: &str, dir: bool) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | if dir { libc::O_DIRECTORY } else { 0 };
    openat2(
        root.as_raw_fd(),
        rel.trim_start_matches('/'),
        flags,
        RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    )
}

/// Makes sure directory `rel` exists inside `root`, creating missing components, and returns
/// it opened `O_PATH`. A component that is a symlink is refused: mount points must be real
/// directories of the rootfs.
pub fn ensure_dir_in_root(root: &OwnedFd, rel: &str) -> io::Result<OwnedFd> {
    let mut cur = openat2(
        root.as_raw_fd(),
        ".",
        libc::O_PATH | libc::O_DIRECTORY,
        RESOLVE_BENEATH,
    )?;
    for comp in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if comp == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{rel}: '..' not allowed"),
            ));
        }
        let next = match openat2(
            cur.as_raw_fd(),
            comp,
            libc::O_PATH | libc::O_DIRECTORY,
            RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS,
        ) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                nix::sys::stat::mkdirat(
                    &cur,
                    comp,
                    nix::sys::stat::Mode::from_bits_truncate(0o755),
                )
                .map_err(io::Error::from)?;
                openat2(
                    cur.as_raw_fd(),
                    comp,
                    libc::O_PATH | libc::O_DIRECTORY,
                    RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS,
                )?
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{rel}: component {comp:?} is a symlink in the image"),
                ));
            }
            Err(e) => return Err(e),
        };
        cur = next;
    }
    Ok(cur)
}

/// The `/proc/self/fd/N` path of an fd, to mount onto exactly the inode it refers to.
pub fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Mounts onto the object `target` refers to.
pub fn mount_on(
    source: Option<&str>,
    target: &OwnedFd,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    mount(source, fd_path(target).as_str(), fstype, flags, data).map_err(io::Error::from)
}

/// Clones a child in new namespaces running `f` on its own stack; returns its pid. The
/// child's exit status is `f`'s return value.
///
/// Only called from the monitor, a single-threaded process: the child starts with a copy of
/// a process that holds no lock another thread could have held.
pub fn clone_child(
    flags: nix::sched::CloneFlags,
    f: Box<dyn FnMut() -> isize + '_>,
) -> io::Result<nix::unistd::Pid> {
    let mut stack = vec![0u8; 1024 * 1024];
    // SAFETY: the stack outlives the call (the child gets its own copy of the address space,
    // clone is called without CLONE_VM), SIGCHLD is delivered on the child's exit, and the
    // caller is single-threaded (see above).
    unsafe { nix::sched::clone(f, &mut stack, flags, Some(libc::SIGCHLD)) }.map_err(io::Error::from)
}

/// Marks every descriptor from `first` up close-on-exec, so none survives into the workload
/// (CVE-2024-21626).
pub fn cloexec_from(first: u32) -> io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: close_range only changes descriptor flags; no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq for SIOCGIFFLAGS/SIOCSIFFLAGS on an open socket; the
    // union member ifru_flags is the one these requests use.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes the process non-dumpable: other processes (also in the container) cannot open its
/// /proc/PID/exe or ptrace it while it still runs host code (CVE-2019-5736).
pub fn set_non_dumpable() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to SIGKILL this process when its parent dies.
pub fn die_with_parent() -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` names an executable regular file.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Restores a signal's default disposition.
pub fn default_signal(sig: nix::sys::signal::Signal) -> io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let act = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing SIG_DFL runs no handler code, so no async-signal-safety concern arises.
    unsafe { sigaction(sig, &act) }
        .map(|_| ())
        .map_err(io::Error::from)
}

/// `fsetxattr(fd, name, value, 0)`.
pub fn fsetxattr(fd: impl AsFd, name: &CStr, value: &[u8]) -> nix::Result<()> {
    // SAFETY: `name` is a valid NUL-terminated string and `value` a valid slice of
    // `value.len()` bytes, both alive for the call; the kernel only reads them.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_fd().as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(rc).map(drop)
}

/// `lsetxattr(path, name, value, 0)`: on the link itself when `path` is a symlink.
pub fn lsetxattr(path: &CStr, name: &CStr, value: &[u8]) -> nix::Result<()> {
    // SAFETY: `path` and `name` are valid NUL-terminated strings and `value` a valid slice of
    // `value.len()` bytes, all alive for the call; the kernel only reads them.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(rc).map(drop)
}

/// `fork()` for a single-threaded caller.
pub fn fork_single_threaded() -> nix::Result<nix::unistd::ForkResult> {
    // SAFETY: callers are single-threaded processes (the CLI before it starts any thread, or
    // a re-exec'd helper), so the child cannot inherit a lock held by another thread.
    unsafe { nix::unistd::fork() }
}

/// TUNSETIFF: makes `file` (an open `/dev/net/tun`) the TUN interface `name`, without the
/// packet-information header.
pub fn tun_attach(file: &std::fs::File, name: &str) -> io::Result<()> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} too long"),
        ));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out (name, flags,
    // padding to the union's 24 bytes); the fd is open for as long as `file` lives.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SO_RCVBUFFORCE and SO_SNDBUFFORCE of `bytes` (as root, past `net.core.[rw]mem_max`).
pub fn force_socket_buffers(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt with a c_int value and its size, on an open socket.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The process `cmd` spawns starts a session of its own (signals to ours do not reach it).
pub fn new_session_on_spawn(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(io::Error::from)?;
            Ok(())
        });
    }
}
