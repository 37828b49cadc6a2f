//! The container's first process before it becomes the workload: runs in a child cloned by
//! the (single-threaded) monitor into new pid, mount, uts and ipc namespaces, sets up the
//! rootfs and security, and finally execs the workload. Nothing here runs in the
//! multi-threaded agent.
//!
//! Order: join the cgroup's v1 hierarchies (the child was created in its cgroup2 directory)
//! → wait for the monitor's go → new cgroup namespace → join the
//! container's network namespace → private mounts → overlayfs rootfs → /proc, /dev, /sys →
//! masked and read-only paths → hostname → pivot_root and detach the old root → rlimits, stdio
//! → [`crate::workload`] (user, cwd, capabilities, no_new_privs, setuid, seccomp, close-on-exec
//! every fd ≥ 3, exec), the sequence `exec` shares.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::stat::{Mode, SFlag, makedev, mknodat};
use nix::unistd::{chdir, dup2_stderr, dup2_stdin, dup2_stdout, pivot_root, sethostname};

use super::security::{self, SeccompProgram};
use super::store::ContainerConfig;
use super::sys;

/// What the child needs, prepared by the monitor before the clone.
pub struct Child<'a> {
    pub config: &'a ContainerConfig,
    pub dir: &'a Path,
    /// The network namespace to join; `None`: stay in the host's.
    pub netns: Option<&'a Path>,
    pub sync_read: &'a OwnedFd,
    pub err_write: &'a OwnedFd,
    pub stdout: &'a OwnedFd,
    pub stderr: &'a OwnedFd,
    pub seccomp: &'a SeccompProgram,
    /// The container cgroup's v1 `tasks` files (none on a cgroup v2 host), which the child
    /// writes "0" into to join them itself (see [`crate::cgroup::JoinHandles`]).
    pub cgroup_tasks: &'a [(PathBuf, std::fs::File)],
    /// The monitor has run this container before (its restart policy): the writable layer
    /// was last mounted by it, on this boot.
    pub restart: bool,
}

/// Paths of a container's rootfs pieces.
pub fn rootfs_dirs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("rootfs"), dir.join("upper"), dir.join("work"))
}

/// Mounts the container's overlay at `rootfs`, `volatile` where the kernel has it (5.10).
///
/// Without it, overlayfs syncs its whole upper filesystem (the data dir's, shared with every
/// other writer on the host) when the container's last process exits, before its parent hears
/// of the exit: 160 ms more per `/bin/true` with 300 MB of another process's writes not yet on
/// the disk, measured here. A writable layer is scratch in Skiff: after a host crash no
/// container runs again on its old one (the agent starts new containers; there is no `start`
/// of an old record), which is the one case `volatile` gives up. overlayfs refuses an upper
/// once mounted `volatile` until `WORK/work/incompat/volatile` is removed: on a `restart` (the
/// same monitor, so the same boot: a crash would have ended the monitor) it is removed first;
/// on a first start there is none, and if there were, the kernel's refusal stands.
fn mount_overlay(rootfs: &Path, work: &Path, opts: &str, restart: bool) -> Result<(), String> {
    if restart {
        let marker = work.join("work").join("incompat").join("volatile");
        match std::fs::remove_dir_all(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("remove {}: {e}", marker.display())),
        }
    }
    // nodev: a device node in an image layer (or one the workload makes) opens nothing.
    let flags = MsFlags::MS_NODEV;
    let volatile = format!("{opts},volatile");
    match mount(
        Some("overlay"),
        rootfs,
        Some("overlay"),
        flags,
        Some(volatile.as_str()),
    ) {
        // An older kernel does not know the option.
        Err(nix::errno::Errno::EINVAL) => ctx(
            "mount overlay rootfs",
            mount(Some("overlay"), rootfs, Some("overlay"), flags, Some(opts)),
        ),
        other => ctx("mount overlay rootfs", other),
    }
}

/// The child's body: never returns on success (the workload replaces it). On failure the
/// reason goes to the monitor through the error pipe and the child exits 127.
pub fn run(c: &Child<'_>) -> isize {
    let err = match setup_and_exec(c) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let mut f = std::fs::File::from(
        c.err_write
            .try_clone()
            .unwrap_or_else(|_| std::process::exit(127)),
    );
    let _ = f.write_all(err.as_bytes());
    127
}

fn ctx<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

enum Never {}

fn setup_and_exec(c: &Child<'_>) -> Result<Never, String> {
    let cfg = c.config;
    // The monitor blocks the signals it reads through a signalfd: the workload must not
    // inherit that mask.
    ctx(
        "signal mask",
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None),
    )?;
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
        Signal::SIGPIPE,
    ] {
        ctx("reset signal", sys::default_signal(sig))?;
    }
    // Into the container's cgroup in every v1 hierarchy: a thread moving itself does not wait
    // for the kernel's global lock, as a move by another process does.
    for (path, tasks) in c.cgroup_tasks {
        let mut tasks: &std::fs::File = tasks;
        ctx(
            &format!("joining cgroup {}", path.display()),
            tasks.write_all(b"0"),
        )?;
    }
    // Wait for the monitor's go (after it moved us, on a kernel that cannot clone into a
    // cgroup).
    let mut byte = [0u8; 1];
    let n = ctx(
        "waiting for the monitor",
        std::fs::File::from(c.sync_read.try_clone().map_err(|e| e.to_string())?).read(&mut byte),
    )?;
    if n == 0 {
        return Err("monitor went away before the start".into());
    }
    ctx("set non-dumpable", sys::set_non_dumpable())?;
    ctx("new cgroup namespace", unshare(CloneFlags::CLONE_NEWCGROUP))?;
    if let Some(path) = c.netns {
        let netns = ctx(
            &format!("open {}", path.display()),
            std::fs::File::open(path),
        )?;
        ctx(
            "join network namespace",
            setns(netns.as_fd(), CloneFlags::CLONE_NEWNET),
        )?;
    }
    // A pod's containers share its IPC namespace (the clone made none of our own).
    if let Some(path) = &cfg.ipc {
        let ipcns = ctx(
            &format!("open {}", path.display()),
            std::fs::File::open(path),
        )?;
        ctx(
            "join IPC namespace",
            setns(ipcns.as_fd(), CloneFlags::CLONE_NEWIPC),
        )?;
    }

    // Nothing we mount may propagate back to the host.
    ctx(
        "make / private",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    let (rootfs, upper, work) = rootfs_dirs(c.dir);
    // overlayfs lists the top layer first.
    let lower = cfg
        .layers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mount_overlay(&rootfs, &work, &opts, c.restart)?;
    let root: OwnedFd = ctx(
        "open rootfs",
        nix::fcntl::open(
            &rootfs,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            Mode::empty(),
        ),
    )?;

    mount_proc_dev_sys(&root, &cfg.devices)?;
    for m in &cfg.mounts {
        bind_volume(&root, m)?;
    }
    for path in security::MASKED_PATHS {
        mask(&root, path)?;
    }
    for path in security::READONLY_PATHS {
        read_only(&root, path)?;
    }
    ctx("set hostname", sethostname(&cfg.hostname))?;

    // pivot_root into the rootfs and detach the old root.
    ctx("chdir rootfs", chdir(&rootfs))?;
    ctx("pivot_root", pivot_root(".", "."))?;
    ctx("detach old root", umount2(".", MntFlags::MNT_DETACH))?;
    ctx("chdir /", chdir("/"))?;
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));

    // Docker's default; where this host's own hard limit is lower and we may not raise it
    // (no CAP_SYS_RESOURCE, e.g. inside another sandbox), the host's hard limit.
    if security::set_nofile(cfg.nofile).is_err() {
        let (_, hard) = ctx(
            "rlimit nofile",
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE),
        )?;
        ctx("rlimit nofile", security::set_nofile(hard.min(cfg.nofile)))?;
    }
    let devnull = ctx("open /dev/null", std::fs::File::open("/dev/null"))?;
    ctx("stdin", dup2_stdin(&devnull))?;
    ctx("stdout", dup2_stdout(c.stdout))?;
    ctx("stderr", dup2_stderr(c.stderr))?;
    drop(devnull);

    Err(crate::workload::exec(&crate::workload::Workload {
        user: &cfg.user,
        cwd: &cfg.cwd,
        create_cwd: true,
        args: &cfg.args,
        env: &cfg.env,
        seccomp: c.seccomp,
        init: cfg.init,
    }))
}

/// Bind-mounts a volume's host directory at its path in the rootfs (made if missing; a
/// symlink in the image on the way is refused), never suid or device-bearing, read-only when
/// asked.
fn bind_volume(root: &OwnedFd, m: &crate::store::Mount) -> Result<(), String> {
    let what = format!("volume at {}", m.target);
    let rel = m.target.trim_start_matches('/');
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!("{what}: not a plain absolute path"));
    }
    let target = ctx(&what, sys::ensure_dir_in_root(root, rel))?;
    let source = m.source.display().to_string();
    ctx(
        &what,
        sys::mount_on(
            Some(source.as_str()),
            &target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        ),
    )?;
    // Re-open to reach the bind mount itself, then set its flags.
    let mounted = ctx(&what, sys::open_in_root(root, rel, true))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if m.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let p = sys::fd_path(&mounted);
    ctx(
        &what,
        mount(None::<&str>, p.as_str(), None::<&str>, flags, None::<&str>),
    )
}

fn mount_proc_dev_sys(
    root: &OwnedFd,
    granted: &[crate::devices::DeviceNode],
) -> Result<(), String> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let proc_dir = ctx("/proc mount point", sys::ensure_dir_in_root(root, "proc"))?;
    ctx(
        "mount /proc",
        sys::mount_on(
            Some("proc"),
            &proc_dir,
            Some("proc"),
            nosuid_nodev_noexec,
            None,
        ),
    )?;

    let dev_dir = ctx("/dev mount point", sys::ensure_dir_in_root(root, "dev"))?;
    ctx(
        "mount /dev",
        sys::mount_on(
            Some("tmpfs"),
            &dev_dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            Some("mode=755,size=65536k"),
        ),
    )?;
    // Re-open: the old fd still points at the directory under the new tmpfs.
    let dev = ctx("open /dev", sys::open_in_root(root, "dev", true))?;
    let devices: [(&str, u64, u64); 6] = [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    for (name, major, minor) in devices {
        ctx(
            &format!("mknod /dev/{name}"),
            mknodat(
                &dev,
                name,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(major, minor),
            ),
        )?;
        ctx(
            &format!("chmod /dev/{name}"),
            nix::sys::stat::fchmodat(
                &dev,
                name,
                Mode::from_bits_truncate(0o666),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            ),
        )?;
    }
    // Host devices granted to this container (their cgroup rules allow them).
    for d in granted {
        let rel = d
            .path
            .strip_prefix("/dev/")
            .filter(|r| {
                !r.is_empty() && !r.split('/').any(|c| c.is_empty() || c == "." || c == "..")
            })
            .ok_or_else(|| format!("device {}: not a path under /dev", d.path))?;
        let (dir, name) = match rel.rsplit_once('/') {
            Some((dir, name)) => (
                ctx(
                    &format!("device {}", d.path),
                    sys::ensure_dir_in_root(root, &format!("dev/{dir}")),
                )?,
                name,
            ),
            None => (ctx("open /dev", sys::open_in_root(root, "dev", true))?, rel),
        };
        let kind = match d.kind {
            crate::devices::DeviceKind::Char => SFlag::S_IFCHR,
            crate::devices::DeviceKind::Block => SFlag::S_IFBLK,
        };
        ctx(
            &format!("mknod {}", d.path),
            mknodat(
                &dir,
                name,
                kind,
                Mode::from_bits_truncate(0o666),
                makedev(u64::from(d.major), u64::from(d.minor)),
            ),
        )?;
        // What the workload may do with it is the cgroup's access mask, not the mode.
        ctx(
            &format!("chmod {}", d.path),
            nix::sys::stat::fchmodat(
                &dir,
                name,
                Mode::from_bits_truncate(0o666),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            ),
        )?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        ctx(
            &format!("symlink /dev/{link}"),
            nix::unistd::symlinkat(target, &dev, link),
        )?;
    }
    let pts = ctx("/dev/pts", sys::ensure_dir_in_root(root, "dev/pts"))?;
    ctx(
        "mount /dev/pts",
        sys::mount_on(
            Some("devpts"),
            &pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
    )?;
    let shm = ctx("/dev/shm", sys::ensure_dir_in_root(root, "dev/shm"))?;
    ctx(
        "mount /dev/shm",
        sys::mount_on(
            Some("shm"),
            &shm,
            Some("tmpfs"),
            nosuid_nodev_noexec,
            Some("mode=1777,size=65536k"),
        ),
    )?;

    let sys_dir = ctx("/sys mount point", sys::ensure_dir_in_root(root, "sys"))?;
    ctx(
        "mount /sys",
        sys::mount_on(
            Some("sysfs"),
            &sys_dir,
            Some("sysfs"),
            nosuid_nodev_noexec | MsFlags::MS_RDONLY,
            None,
        ),
    )?;
    Ok(())
}

/// Hides a path: /dev/null over a file, an empty read-only tmpfs over a directory.
fn mask(root: &OwnedFd, path: &str) -> Result<(), String> {
    let target = match sys::open_in_root(root, path, false) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("mask {path}: {e}")),
    };
    let is_dir = nix::sys::stat::fstat(&target)
        .map(|s| s.st_mode & libc::S_IFMT == libc::S_IFDIR)
        .unwrap_or(false);
    if is_dir {
        ctx(
            &format!("mask {path}"),
            sys::mount_on(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None,
            ),
        )
    } else {
        ctx(
            &format!("mask {path}"),
            sys::mount_on(Some("/dev/null"), &target, None, MsFlags::MS_BIND, None),
        )
    }
}

/// Makes a path read-only: bind it onto itself, then remount the bind read-only.
fn read_only(root: &OwnedFd, path: &str) -> Result<(), String> {
    let target = match sys::open_in_root(root, path, false) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("read-only {path}: {e}")),
    };
    let p = sys::fd_path(&target);
    ctx(
        &format!("read-only {path}"),
        mount(
            Some(p.as_str()),
            p.as_str(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    // Re-open to reach the new bind mount, then remount it read-only.
    let target = ctx(
        &format!("read-only {path}"),
        sys::open_in_root(root, path, false),
    )?;
    let p = sys::fd_path(&target);
    ctx(
        &format!("read-only {path}"),
        mount(
            None::<&str>,
            p.as_str(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    Ok(())
}
