//! The syscall layer: the few calls nix does not wrap safely (openat2, clone and fork,
//! close_range, interface ioctls including TUNSETIFF, xattrs, forced socket buffer sizes,
//! setsid between fork and exec). Every `unsafe` block of the workspace lives here, tests
//! included, each with its `// SAFETY:` reasoning. A call whose safety depends on its caller
//! (fork, clone: "the process is single-threaded") is a private `unsafe fn` with that contract
//! written on it, behind a public function that checks the contract before calling it.

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

/// Whether this process runs on one thread only, the caller's. A thread that was just joined
/// can linger in the kernel's count for a moment after `join` returns, so a count above one
/// is read again for up to 100 ms before the answer is no.
fn single_threaded() -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    loop {
        let threads = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .and_then(|v| v.trim().parse::<u32>().ok())
            });
        match threads {
            Some(1) => return true,
            Some(_) if std::time::Instant::now() < deadline => std::thread::yield_now(),
            _ => return false,
        }
    }
}

fn not_single_threaded(what: &str) -> io::Error {
    io::Error::other(format!(
        "{what}: refused in a multi-threaded process (the child could inherit a lock another \
         thread holds)"
    ))
}

/// Clones a child in new namespaces running `f` on its own stack; returns its pid. The
/// child's exit status is `f`'s return value. Refused unless the process is single-threaded
/// (the monitor is): see [`clone_unchecked`].
pub fn clone_child(
    flags: nix::sched::CloneFlags,
    f: Box<dyn FnMut() -> isize + '_>,
) -> io::Result<nix::unistd::Pid> {
    if !single_threaded() {
        return Err(not_single_threaded("clone"));
    }
    // SAFETY: the process has one thread, checked just above.
    unsafe { clone_unchecked(flags, f) }
}

/// Clones a child as [`clone_child`] does, created inside the cgroup2 directory `cgroup`
/// (`clone3` with `CLONE_INTO_CGROUP`, Linux 5.7): it never has to be moved there. An error
/// of kind [`io::ErrorKind::Unsupported`] when this kernel cannot (no clone3, or no
/// `CLONE_INTO_CGROUP`): the caller clones the usual way and moves the child.
pub fn clone_child_into_cgroup(
    flags: nix::sched::CloneFlags,
    cgroup: std::os::fd::BorrowedFd<'_>,
    mut f: Box<dyn FnMut() -> isize + '_>,
) -> io::Result<nix::unistd::Pid> {
    /// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2).
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    if !single_threaded() {
        return Err(not_single_threaded("clone3"));
    }
    let args = CloneArgs {
        flags: flags.bits() as u64 | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed. Without CLONE_VM and with no
    // stack given, the child runs on a copy of this process's memory, like fork; the process
    // is single-threaded (checked above), so no lock another thread held is copied held.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match r {
        0 => {
            let code = f();
            // SAFETY: ends the child without running the parent's exit handlers or
            // destructors on the copied state.
            unsafe { libc::_exit(code as libc::c_int) }
        }
        r if r > 0 => Ok(nix::unistd::Pid::from_raw(r as i32)),
        _ => {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // No clone3 (before 5.3), a larger clone_args than it knows or a flag it does
                // not (before 5.7).
                Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL) => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("clone3 into a cgroup: {e}"),
                )),
                _ => Err(e),
            }
        }
    }
}

/// `clone` without `CLONE_VM`, the child running `f` on a stack of its own.
///
/// # Safety
/// The calling process must be single-threaded: the child starts as a copy of it, and `f`
/// runs ordinary code (it allocates, takes locks); a lock another thread held at the clone
/// would stay held in the child forever.
unsafe fn clone_unchecked(
    flags: nix::sched::CloneFlags,
    f: Box<dyn FnMut() -> isize + '_>,
) -> io::Result<nix::unistd::Pid> {
    let mut stack = vec![0u8; 1024 * 1024];
    // SAFETY: the stack outlives the call (the child gets its own copy of the address space,
    // clone is called without CLONE_VM), SIGCHLD is delivered on the child's exit, and the
    // caller is single-threaded (this function's contract).
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

/// Closes every descriptor from `first` up. Only for a process that owns all of them (a
/// forked child about to become something else): a descriptor another part of the process
/// still holds as an `OwnedFd` would be closed under it.
pub fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range passes no memory; the caller owns every descriptor it closes (this
    // function's contract above).
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
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

/// `lgetxattr(path, name)`: the attribute's value (at most 64 KiB), of the link itself when
/// `path` is a symlink.
pub fn lgetxattr(path: &CStr, name: &CStr) -> nix::Result<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: `path` and `name` are valid NUL-terminated strings and `buf` is writable for
    // `buf.len()` bytes, all alive for the call.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(Errno::result(n)?).map_err(|_| Errno::ERANGE)?;
    buf.truncate(n);
    Ok(buf)
}

/// Sets an environment variable, refused unless the process is single-threaded (with other
/// threads, a concurrent `getenv` could read freed memory; hence `set_var` is `unsafe`).
pub fn set_env_single_threaded(key: &str, value: &str) -> io::Result<()> {
    if !single_threaded() {
        return Err(not_single_threaded("setenv"));
    }
    // SAFETY: the process has one thread (checked just above), so nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var(key, value) };
    Ok(())
}

/// `fork()`, refused unless the process is single-threaded (the CLI before it starts any
/// thread, or a re-exec'd helper): see [`fork_unchecked`].
pub fn fork_single_threaded() -> io::Result<nix::unistd::ForkResult> {
    if !single_threaded() {
        return Err(not_single_threaded("fork"));
    }
    // SAFETY: the process has one thread, checked just above.
    unsafe { fork_unchecked() }
}

/// `fork()`.
///
/// # Safety
/// The calling process must be single-threaded: the child runs ordinary code before it execs
/// (it allocates, takes locks), and a lock another thread held at the fork would stay held in
/// the child forever.
unsafe fn fork_unchecked() -> io::Result<nix::unistd::ForkResult> {
    // SAFETY: the caller is single-threaded (this function's contract).
    unsafe { nix::unistd::fork() }.map_err(io::Error::from)
}

// bpf(2) for the device controller of cgroup v2 (the kernel's UAPI values; `libc` has only
// SYS_bpf). Each attr struct is a prefix of `union bpf_attr`, zero-initialised.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct BpfProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct BpfProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// The whole 64-byte query layout: some kernels write past a shorter one.
#[repr(C)]
#[derive(Default)]
struct BpfProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// One bpf(2) call with `attr`, a zero-initialised prefix of `union bpf_attr`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` struct laid out as the prefix of
    // `union bpf_attr` that `cmd` reads, and its size is passed, so the kernel reads and writes
    // only within it; every pointer stored in it is the caller's and outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Device programs this process has loaded, by their instructions. Containers with the same
/// rules (most have the default list) share one loaded program, which the kernel allows
/// attached to any number of cgroups: a process that starts many containers (the agent
/// daemon) has each rule set verified and compiled once, not at every start (0.35 ms of CPU
/// per start here). At most [`LOADED_MAX`]; past that the oldest is let go (the cgroups it is
/// attached to keep it alive in the kernel).
static LOADED: std::sync::Mutex<Vec<(Vec<crate::devices::BpfInsn>, std::sync::Arc<OwnedFd>)>> =
    std::sync::Mutex::new(Vec::new());
const LOADED_MAX: usize = 16;

/// How many device programs this process holds loaded (see [`attach_device_program`]).
pub fn device_programs_loaded() -> usize {
    LOADED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len()
}

/// Attaches `program` as a BPF_PROG_TYPE_CGROUP_DEVICE program to the cgroup v2 directory
/// `cgroup_dir` (with BPF_F_ALLOW_MULTI, so programs of parent cgroups keep applying too),
/// loading it unless this process already has (see [`LOADED`]). The attachment holds the
/// program: it applies until the cgroup is removed. A program the verifier refuses is an error
/// carrying the verifier's log.
pub fn attach_device_program(
    cgroup_dir: &Path,
    program: &[crate::devices::BpfInsn],
) -> io::Result<()> {
    let prog = {
        let mut loaded = LOADED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match loaded.iter().find(|(insns, _)| insns.as_slice() == program) {
            Some((_, prog)) => prog.clone(),
            None => {
                let prog = std::sync::Arc::new(load_device_program(program)?);
                if loaded.len() >= LOADED_MAX {
                    loaded.remove(0);
                }
                loaded.push((program.to_vec(), prog.clone()));
                prog
            }
        }
    };
    let dir = std::fs::File::open(cgroup_dir)?;
    let mut attach = BpfProgAttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attach).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "attaching the device program to {}: {e}",
                cgroup_dir.display()
            ),
        )
    })?;
    Ok(())
}

/// Loads `program` as a BPF_PROG_TYPE_CGROUP_DEVICE program; a program the verifier refuses is
/// an error carrying the verifier's log.
fn load_device_program(program: &[crate::devices::BpfInsn]) -> io::Result<OwnedFd> {
    let license = b"Apache\0";
    let load = |log: &mut [u8], level: u32| {
        let mut attr = BpfProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: u32::try_from(program.len()).unwrap_or(u32::MAX),
            insns: program.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: level,
            log_size: u32::try_from(log.len()).unwrap_or(0),
            log_buf: if log.is_empty() {
                0
            } else {
                log.as_mut_ptr() as u64
            },
            ..BpfProgLoadAttr::default()
        };
        attr.prog_name[..11].copy_from_slice(b"skiff_devcg");
        bpf(BPF_PROG_LOAD, &mut attr)
    };
    let fd = match load(&mut [], 0) {
        Ok(fd) => fd,
        Err(first) => {
            // Again with the verifier's log, to say why.
            let mut log = vec![0u8; 64 * 1024];
            let _ = load(&mut log, 1);
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            return Err(io::Error::new(
                first.kind(),
                format!(
                    "loading the device program: {first}: {}",
                    String::from_utf8_lossy(&log[..end]).trim()
                ),
            ));
        }
    };
    // SAFETY: the kernel returned a new program fd (close-on-exec, as every bpf(2) fd) that
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// How many device programs are attached to the cgroup v2 directory `cgroup_dir` itself.
pub fn device_programs_attached(cgroup_dir: &Path) -> io::Result<u32> {
    let dir = std::fs::File::open(cgroup_dir)?;
    let mut q = BpfProgQueryAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        ..BpfProgQueryAttr::default()
    };
    bpf(BPF_PROG_QUERY, &mut q)?;
    Ok(q.prog_cnt)
}

/// TUNSETIFF: makes `file` (an open `/dev/net/tun`) the TUN interface `name`, without the
/// packet-information header; with `vnet_hdr`, every packet read or written starts with a
/// `struct virtio_net_hdr` (IFF_VNET_HDR, for [`tun_set_offload`]). With `multi_queue`
/// (IFF_MULTI_QUEUE), each file attached to the same name is one more queue of the device: the
/// kernel spreads the flows it sends over them, and any of them can be written.
pub fn tun_attach(
    file: &std::fs::File,
    name: &str,
    vnet_hdr: bool,
    multi_queue: bool,
) -> io::Result<()> {
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
        flags: (libc::IFF_TUN
            | libc::IFF_NO_PI
            | if vnet_hdr { IFF_VNET_HDR } else { 0 }
            | if multi_queue { IFF_MULTI_QUEUE } else { 0 }) as libc::c_short,
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

const IFF_VNET_HDR: libc::c_int = 0x4000;
/// One more queue of the device per open file (attach with the same name and flags).
const IFF_MULTI_QUEUE: libc::c_int = 0x0100;
/// TUN_F_CSUM: the reader takes packets with partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// TUN_F_TSO4: the reader takes IPv4 TCP super-packets to segment.
pub const TUN_F_TSO4: u32 = 0x02;

/// TUNSETOFFLOAD: which offloads the reader of a TUN device with IFF_VNET_HDR takes; the
/// kernel turns them into the device's features (checksum offload, TSO).
pub fn tun_set_offload(file: &std::fs::File, flags: u32) -> io::Result<()> {
    const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int of TUN_F_ flags), not
    // a pointer; the fd is open for as long as `file` lives.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, flags as libc::c_ulong) };
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

/// Test-only helpers: a child process for tests that change per-process or per-thread state,
/// and the raw syscalls the seccomp tests probe the installed filter with (their `unsafe`
/// lives here with the rest).
/// Whether `path` (not following a last symlink) is the root of a mount, from statx's
/// STATX_ATTR_MOUNT_ROOT; `Ok(None)` when the kernel does not report that attribute (before
/// Linux 5.8).
pub fn is_mount_root(path: &std::path::Path) -> io::Result<Option<bool>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `stx` is a writable
    // statx buffer the kernel fills.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_TYPE,
            stx.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the call succeeded, so the kernel wrote the struct (and it was zeroed before).
    let stx = unsafe { stx.assume_init() };
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if stx.stx_attributes_mask & bit == 0 {
        return Ok(None);
    }
    Ok(Some(stx.stx_attributes & bit != 0))
}

#[cfg(test)]
pub(crate) mod testing {
    /// Runs `child` in a process of its own and returns its exit code and what it wrote to
    /// the file it is given. The process is this test binary run again with only the test
    /// `test` (the caller: `concat!(module_path!(), "::", NAME)`), which calls this again,
    /// finds `SKIFF_TEST_CHILD` set, runs `child` and exits with its code; nothing forks from
    /// the multi-threaded harness. In the child, `child` runs on the harness's test thread:
    /// per-thread state (capabilities, seccomp, no_new_privs) is read from /proc/thread-self.
    pub fn run_in_child(
        test: &str,
        child: impl FnOnce(&mut std::fs::File) -> i32,
    ) -> (i32, String) {
        const CHILD: &str = "SKIFF_TEST_CHILD";
        if let Some(out) = std::env::var_os(CHILD) {
            let code = match std::fs::File::create(&out) {
                Ok(mut f) => {
                    let code = child(&mut f);
                    let _ = f.sync_all();
                    code
                }
                Err(_) => 100,
            };
            std::process::exit(code);
        }
        // Test names as the harness knows them have no crate prefix.
        let name = test.split_once("::").map_or(test, |(_, rest)| rest);
        let dir = tempfile::tempdir().expect("temp dir for the test child");
        let out = dir.path().join("out");
        let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([name, "--exact", "--test-threads=1", "--nocapture", "-q"])
            .env(CHILD, &out)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run the test child");
        let code = status.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        });
        (code, std::fs::read_to_string(&out).unwrap_or_default())
    }

    /// Each probe makes one syscall and answers whether the kernel behaved as the default
    /// seccomp filter should make it behave; each only affects the forked child running it.
    pub mod probes {
        use nix::errno::Errno;

        fn fails_with(ret: libc::c_long, errno: i32) -> bool {
            ret == -1 && Errno::last_raw() == errno
        }

        pub fn mount_refused() -> bool {
            // SAFETY: a plain syscall with constant or null arguments, in the test child.
            let ret = unsafe {
                libc::mount(
                    c"none".as_ptr(),
                    c"/nonexistent-skiff-seccomp-test".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            fails_with(ret.into(), libc::EPERM)
        }

        pub fn unshare_refused() -> bool {
            fails_with(
                // SAFETY: a plain syscall with constant or null arguments, in the test child.
                unsafe { libc::unshare(libc::CLONE_NEWNS) }.into(),
                libc::EPERM,
            )
        }

        /// PTRACE_PEEKUSER of pid 1, which this process does not trace: without the filter the
        /// kernel answers ESRCH and changes nothing (PTRACE_TRACEME would make the harness the
        /// tracer of the child's thread, which could then never be reaped by a plain wait).
        pub fn ptrace_refused() -> bool {
            let null = std::ptr::null_mut::<libc::c_void>();
            fails_with(
                // SAFETY: a plain syscall with constant or null arguments, in the test child.
                unsafe { libc::ptrace(libc::PTRACE_PEEKUSER, 1, null, null) },
                libc::EPERM,
            )
        }

        pub fn keyctl_refused() -> bool {
            // KEYCTL_GET_KEYRING_ID of KEY_SPEC_SESSION_KEYRING, without creating it.
            fails_with(
                // SAFETY: a plain syscall with constant or null arguments, in the test child.
                unsafe { libc::syscall(libc::SYS_keyctl, 0, -3, 0) },
                libc::EPERM,
            )
        }

        pub fn clone3_enosys() -> bool {
            // SAFETY: a plain syscall with constant or null arguments, in the test child.
            let ret = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
            fails_with(ret, libc::ENOSYS)
        }

        pub fn clone_newuser_refused() -> bool {
            let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
            // SAFETY: a plain syscall with constant or null arguments, in the test child.
            let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
            if ret == 0 {
                // Not refused, and this is the new process.
                // SAFETY: a plain syscall with constant or null arguments, in the test child.
                unsafe { libc::_exit(0) };
            }
            fails_with(ret, libc::EPERM)
        }

        pub fn personality_refused() -> bool {
            // READ_IMPLIES_EXEC
            fails_with(
                // SAFETY: a plain syscall with constant or null arguments, in the test child.
                unsafe { libc::personality(0x0040_0000) }.into(),
                libc::EPERM,
            )
        }

        pub fn personality_query_allowed() -> bool {
            // SAFETY: a plain syscall with constant or null arguments, in the test child.
            (unsafe { libc::personality(0xffff_ffff) }) != -1
        }

        pub fn getpid_open_write_allowed() -> bool {
            // SAFETY: a plain syscall with constant or null arguments, in the test child.
            if unsafe { libc::getpid() } <= 0 {
                return false;
            }
            // SAFETY: a plain syscall with constant or null arguments, in the test child.
            let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            // SAFETY: a plain syscall with constant or null arguments, in the test child.
            fd >= 0 && unsafe { libc::write(fd, c"x".as_ptr().cast(), 1) } == 1
        }

        pub fn fork_allowed() -> bool {
            // SAFETY: a plain syscall with constant or null arguments, in the test child.
            match unsafe { libc::fork() } {
                // SAFETY: a plain syscall with constant or null arguments, in the test child.
                0 => unsafe { libc::_exit(7) },
                -1 => false,
                pid => {
                    let mut status = 0;
                    // SAFETY: a plain syscall with constant or null arguments, in the test child.
                    (unsafe { libc::waitpid(pid, &mut status, 0) }) == pid
                        && libc::WIFEXITED(status)
                        && libc::WEXITSTATUS(status) == 7
                }
            }
        }
    }
}
