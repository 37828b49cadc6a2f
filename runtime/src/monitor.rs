//! The per-container monitor: `skiff-monitor` (a small binary of its own, installed next to the
//! agent) or the agent binary re-exec'd as `skiff-agent __monitor`, a small
//! single-threaded process that is the container's parent. It creates the container's
//! network namespace, clones the container's first process, writes its output to the log,
//! reaps it, records how it ended (exit code, signal, OOM kill), restarts it by policy, stops
//! it on request (stop signal, grace period, SIGKILL), and cleans up. It runs in its own
//! session, so it outlives the agent that started it.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, pipe2};

use super::cgroup::{self, Cgroup};
use super::init;
use super::logs::{LogWriter, Stream};
use super::security;
use super::store::{
    ContainerConfig, ExitInfo, NetworkAttach, State, Status, Store, now_ms, process_start_time,
};
use super::sys;

/// Restarts are given up after this many in a row.
const MAX_RESTARTS: u32 = 10;

/// The file a stop request writes its grace period (ms) into before signalling the monitor.
pub const STOP_FILE: &str = "stop-grace-ms";

/// Where a container's network namespace is bound.
pub fn netns_path(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("run").join("netns").join(id)
}

/// The program a monitor runs as, and the arguments before the container's id:
/// `skiff-monitor --data-dir DIR` when it is installed next to the running binary, else that
/// binary itself as `--data-dir DIR __monitor`.
pub fn program(data_dir: &Path) -> std::io::Result<(PathBuf, Vec<std::ffi::OsString>)> {
    let exe = std::env::current_exe()?;
    let small = exe.with_file_name("skiff-monitor");
    let dir = data_dir.as_os_str().to_owned();
    if is_executable(&small) && small != exe {
        return Ok((small, vec!["--data-dir".into(), dir]));
    }
    Ok((exe, vec!["--data-dir".into(), dir, "__monitor".into()]))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The id argument of a spare monitor: one started ahead of need (see
/// `Runtime::keep_spare_monitor`), which reads its container's id from stdin.
pub const SPARE_ID: &str = "-";

/// A monitor process's whole life: its stdout is the pipe the starter reads one report line
/// from, kept as the report fd with /dev/null put in its place; then [`run`]. The exit code.
/// A spare ([`SPARE_ID`]) first waits for its container's id on stdin; it exits with 0 when
/// stdin closes without one (its starter no longer needs it, or is gone).
pub fn main(data_dir: &Path, id: &str) -> u8 {
    let report: Option<OwnedFd> = nix::unistd::dup(std::io::stdout()).ok();
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    if let Ok(null) = &null {
        let _ = nix::unistd::dup2_stdout(null);
    }
    let id = if id == SPARE_ID {
        // What does not depend on the container is done before it is known. Errors are
        // reported when the same is done again for the container.
        let _ = cgroup::warm_up();
        let _ = security::default_seccomp();
        match spare_wait(data_dir) {
            Ok(Some(id)) => id,
            Ok(None) => return 0,
            Err(e) => {
                if let Some(fd) = report {
                    let _ = writeln!(std::fs::File::from(fd), "error: {e}");
                }
                return 1;
            }
        }
    } else {
        id.to_string()
    };
    if let Ok(null) = &null {
        let _ = nix::unistd::dup2_stdin(null);
    }
    u8::try_from(run(data_dir, &id, report)).unwrap_or(1)
}

/// A spare's wait: the container id its starter writes to stdin (one line, then the pipe
/// closed), checked to be one path component of the store; then the container's monitor log
/// as stderr, as a monitor started for it has from the start. `None`: stdin closed empty.
fn spare_wait(data_dir: &Path) -> Result<Option<String>, String> {
    let mut text = String::new();
    std::io::stdin()
        .take(256)
        .read_to_string(&mut text)
        .map_err(|e| format!("reading the container id: {e}"))?;
    let id = text.trim_end_matches('\n');
    if id.is_empty() {
        return Ok(None);
    }
    if !valid_id(id) {
        return Err(format!(
            "invalid container id {id:?} handed to a spare monitor"
        ));
    }
    let store = Store::open(data_dir).map_err(|e| e.to_string())?;
    let log = store.dir(id).join("monitor.log");
    let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    nix::unistd::dup2_stderr(&file).map_err(|e| format!("monitor log as stderr: {e}"))?;
    Ok(Some(id.to_string()))
}

/// A container id as the runtime makes them: one path component of ASCII letters, digits,
/// `-` and `_`, at most 64 long.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Runs the monitor for container `id`. `report` receives one line once the container has
/// started (`ok`) or failed to start (`error: ...`), then is closed.
pub fn run(data_dir: &Path, id: &str, report: Option<OwnedFd>) -> i32 {
    let mut report = report.map(std::fs::File::from);
    let mut say = |line: &str| {
        if let Some(f) = report.as_mut() {
            let _ = writeln!(f, "{line}");
        }
        report = None;
    };
    let store = match Store::open(data_dir) {
        Ok(s) => s,
        Err(e) => {
            say(&format!("error: {e}"));
            return 1;
        }
    };
    let mut m = match Monitor::new(store, data_dir, id) {
        Ok(m) => m,
        Err(e) => {
            say(&format!("error: {e}"));
            return 1;
        }
    };
    let code = m.supervise(&mut say);
    m.cleanup();
    code
}

struct Monitor {
    store: Store,
    id: String,
    dir: PathBuf,
    config: ContainerConfig,
    state: State,
    cgroup: Box<dyn Cgroup>,
    /// The network namespace to join; `None`: the host's.
    netns: Option<PathBuf>,
    signals: SignalFd,
    seccomp: security::SeccompProgram,
    /// Why the container was fenced (see [`crate::fence`]); it is not started again.
    fenced: Option<String>,
}

impl Monitor {
    fn new(store: Store, data_dir: &Path, id: &str) -> Result<Monitor, String> {
        let config = store.config(id).map_err(|e| e.to_string())?;
        let mut state = store.state_of(&config).map_err(|e| e.to_string())?;
        let me = std::process::id() as i32;
        state.monitor_pid = Some(me);
        state.monitor_start = process_start_time(me);
        store
            .save_state(&config, &state)
            .map_err(|e| e.to_string())?;

        let mut mask = SigSet::empty();
        for s in [
            Signal::SIGCHLD,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
        ] {
            mask.add(s);
        }
        mask.thread_block()
            .map_err(|e| format!("blocking signals: {e}"))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(|e| format!("signalfd: {e}"))?;

        let manager = cgroup::host(&config.cgroup_parent).map_err(|e| e.to_string())?;
        let cgroup = match manager.open(id).map_err(|e| e.to_string())? {
            Some(c) => c,
            None => manager
                .create(id, &config.limits)
                .map_err(|e| e.to_string())?,
        };
        let seccomp = security::default_seccomp().map_err(|e| e.to_string())?;
        let netns = match &config.network {
            NetworkAttach::Own => {
                let own = netns_path(data_dir, id);
                create_netns(&own)?;
                Some(own)
            }
            NetworkAttach::Join(path) => Some(path.clone()),
            NetworkAttach::Host => None,
        };
        Ok(Monitor {
            dir: store.dir(id),
            store,
            id: id.to_string(),
            config,
            state,
            cgroup,
            netns,
            signals,
            seccomp,
            fenced: None,
        })
    }

    /// Output the log could not take (a full disk) is counted in the state, saved at most
    /// once a second (the save itself may fail while the disk is full; the count is kept and
    /// saved again later).
    fn note_dropped(&mut self, log: &LogWriter, last_save: &mut Option<Instant>) {
        let (bytes, why) = log.dropped();
        self.state.log_dropped_bytes = bytes;
        self.state.log_error = why.map(str::to_owned);
        if last_save.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last_save = Some(Instant::now());
            // The disk is full: keep the reserve for the state saved at the exit.
            if let Err(e) = self
                .store
                .save_state_keeping_reserve(&self.config, &self.state)
            {
                note(format_args!("monitor {}: saving state: {e}", self.id));
            }
        }
    }

    fn save(&self) {
        if let Err(e) = self.store.save_state(&self.config, &self.state) {
            // Never eprintln! here: on a full disk writing to the log file fails, and a
            // panicking monitor would orphan its container.
            note(format_args!("monitor {}: saving state: {e}", self.id));
        }
    }

    /// Starts the container and watches it until it is done for good. Returns the monitor's
    /// exit code.
    fn supervise(&mut self, say: &mut dyn FnMut(&str)) -> i32 {
        let mut log = match LogWriter::open(&self.dir, self.config.log_max_bytes) {
            Ok(l) => l,
            Err(e) => {
                say(&format!("error: opening log: {e}"));
                return 1;
            }
        };
        loop {
            if let Some(why) = self.config.fence.as_ref().and_then(|f| f.expired()) {
                // Not started (again) while the node's lease has run out.
                note(format_args!("monitor {}: {why}", self.id));
                self.state.status = Status::Exited;
                self.state.error = Some(why.clone());
                self.save();
                say(&format!("error: {why}"));
                return 0;
            }
            let started = match self.start_once() {
                Ok(s) => s,
                Err(e) => {
                    self.state.status = Status::Failed;
                    self.state.error = Some(e.clone());
                    self.state.exit = Some(ExitInfo {
                        code: Some(127),
                        signal: None,
                        oom_killed: false,
                        at_ms: now_ms(),
                    });
                    self.save();
                    say(&format!("error: {e}"));
                    return 1;
                }
            };
            self.state.status = Status::Running;
            self.state.pid = Some(started.pid.as_raw());
            self.state.started_at_ms = Some(now_ms());
            self.state.error = None;
            self.save();
            say("ok");

            let oom_before = self.cgroup.oom_kills().unwrap_or(0);
            let exit = self.watch(started, &mut log);
            let _ = log.flush();
            // The final count goes with the exit state saved below.
            let (dropped, why) = log.dropped();
            self.state.log_dropped_bytes = dropped;
            self.state.log_error = why.map(str::to_owned);
            self.kill_leftovers();
            let oom_after = self.cgroup.oom_kills().unwrap_or(0);
            let exit = ExitInfo {
                oom_killed: oom_after > oom_before && exit.signal == Some(libc::SIGKILL),
                ..exit
            };
            self.state.exit = Some(exit.clone());
            self.state.pid = None;
            if let Some(why) = self.fenced.take() {
                self.state.status = Status::Exited;
                self.state.error = Some(why);
                self.save();
                return 0;
            }
            let again = !self.state.stopping
                && self
                    .config
                    .restart
                    .should_restart(exit.code, self.state.restarts, MAX_RESTARTS);
            if !again {
                self.state.status = Status::Exited;
                self.save();
                return 0;
            }
            self.state.status = Status::Restarting;
            self.state.restarts += 1;
            self.save();
            let backoff = Duration::from_millis(100u64 << self.state.restarts.min(7));
            if self.sleep_unless_stopped(backoff) {
                self.state.status = Status::Exited;
                self.save();
                return 0;
            }
        }
    }

    /// Clones the container's first process and waits until it has exec'd the workload.
    fn start_once(&mut self) -> Result<Started, String> {
        let (sync_read, sync_write) =
            pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let (err_read, err_write) =
            pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let (out_read, out_write) =
            pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let (errs_read, errs_write) =
            pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        for dir in ["rootfs", "upper", "work"] {
            std::fs::create_dir_all(self.dir.join(dir))
                .map_err(|e| format!("creating {dir}: {e}"))?;
        }
        // The child gets into the cgroup without being moved (see cgroup::JoinHandles): it is
        // created in the cgroup2 directory, and joins the v1 hierarchies itself.
        let join = self
            .cgroup
            .join_handles()
            .map_err(|e| format!("joining cgroup: {e}"))?;
        let child = init::Child {
            config: &self.config,
            dir: &self.dir,
            netns: self.netns.as_deref(),
            sync_read: &sync_read,
            err_write: &err_write,
            stdout: &out_write,
            stderr: &errs_write,
            seccomp: &self.seccomp,
            cgroup_tasks: &join.v1_tasks,
            // A monitor is only ever started for a new record: a restart count is its own.
            restart: self.state.restarts > 0,
        };
        let mut flags =
            CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS;
        // A pod's containers share its IPC namespace: the child joins it instead.
        if self.config.ipc.is_none() {
            flags |= CloneFlags::CLONE_NEWIPC;
        }
        let mut body = || init::run(&child);
        let (pid, placed) = match &join.v2_dir {
            Some(dir) => {
                match sys::clone_child_into_cgroup(flags, dir.as_fd(), Box::new(&mut body)) {
                    Ok(pid) => (pid, true),
                    Err(e) if e.kind() == std::io::ErrorKind::Unsupported => (
                        sys::clone_child(flags, Box::new(&mut body))
                            .map_err(|e| format!("clone: {e}"))?,
                        false,
                    ),
                    Err(e) => return Err(format!("clone: {e}")),
                }
            }
            None => (
                sys::clone_child(flags, Box::new(&mut body)).map_err(|e| format!("clone: {e}"))?,
                true,
            ),
        };
        drop(join);
        drop(err_write);
        drop(out_write);
        drop(errs_write);
        drop(sync_read);
        // A kernel that cannot clone into a cgroup: the child is moved, the slow way.
        if !placed && let Err(e) = self.cgroup.add_process(pid.as_raw()) {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(format!("joining cgroup: {e}"));
        }
        let mut w = std::fs::File::from(sync_write);
        w.write_all(b"1")
            .map_err(|e| format!("releasing the container: {e}"))?;
        drop(w);
        // EOF without a message: the exec succeeded (the pipe closed on exec).
        let mut msg = String::new();
        let _ = std::fs::File::from(err_read).read_to_string(&mut msg);
        if !msg.is_empty() {
            let _ = waitpid(pid, None);
            return Err(msg);
        }
        Ok(Started {
            pid,
            stdout: Some(out_read),
            stderr: Some(errs_read),
        })
    }

    /// Forwards output to the log and handles signals until the container's pid 1 exits.
    fn watch(&mut self, mut s: Started, log: &mut LogWriter) -> ExitInfo {
        let mut exit: Option<ExitInfo> = None;
        let mut kill_at: Option<Instant> = None;
        let mut last_drop_save: Option<Instant> = None;
        let mut buf = vec![0u8; 64 * 1024];
        let fence = self.config.fence.clone();
        loop {
            // The node lost touch with the controllers for too long: stop as on a request.
            if kill_at.is_none()
                && exit.is_none()
                && self.fenced.is_none()
                && let Some(why) = fence.as_ref().and_then(|f| f.expired())
            {
                note(format_args!("monitor {}: {why}: stopping", self.id));
                self.fenced = Some(why);
                self.state.stopping = true;
                self.save();
                if let Ok(sig) = Signal::try_from(self.config.stop_signal) {
                    let _ = kill(s.pid, sig);
                }
                kill_at = Some(Instant::now() + Duration::from_millis(self.config.stop_grace_ms));
            }
            // After pid 1 exits the kernel kills the rest of its pid namespace; the pipes then
            // close. Stop waiting for them after a short drain.
            if exit.is_some() && s.stdout.is_none() && s.stderr.is_none() {
                break;
            }
            let timeout = match (kill_at, &exit) {
                (_, Some(_)) => PollTimeout::from(500u16),
                (Some(t), None) => {
                    let ms = t
                        .saturating_duration_since(Instant::now())
                        .as_millis()
                        .min(60_000) as u16;
                    PollTimeout::from(ms)
                }
                (None, None) if fence.is_some() => {
                    PollTimeout::from(crate::fence::CHECK_EVERY.as_millis() as u16)
                }
                (None, None) => PollTimeout::NONE,
            };
            let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let mut which = vec![None];
            for (stream, fd) in [(Stream::Stdout, &s.stdout), (Stream::Stderr, &s.stderr)] {
                if let Some(fd) = fd {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    which.push(Some(stream));
                }
            }
            let ready = match poll(&mut fds, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => 0,
            };
            let revents: Vec<_> = fds
                .iter()
                .map(|f| f.revents().unwrap_or(PollFlags::empty()))
                .collect();
            drop(fds);
            if ready == 0 {
                if exit.is_some() {
                    break;
                }
                if kill_at.is_some_and(|t| Instant::now() >= t) {
                    let _ = self.cgroup.kill_all();
                    kill_at = None;
                }
                continue;
            }
            for (i, rev) in revents.iter().enumerate() {
                if rev.is_empty() {
                    continue;
                }
                match which[i] {
                    None => {
                        while let Ok(Some(info)) = self.signals.read_signal() {
                            match info.ssi_signo as i32 {
                                libc::SIGCHLD => {
                                    if let Some(e) = reap(s.pid) {
                                        exit = Some(e);
                                    }
                                }
                                // A stop request; a repeated one changes nothing (the grace
                                // period runs from the first).
                                libc::SIGTERM | libc::SIGINT if kill_at.is_none() => {
                                    self.state.stopping = true;
                                    self.save();
                                    let grace = std::fs::read_to_string(self.dir.join(STOP_FILE))
                                        .ok()
                                        .and_then(|s| s.trim().parse().ok())
                                        .unwrap_or(self.config.stop_grace_ms);
                                    if let Ok(sig) = Signal::try_from(self.config.stop_signal) {
                                        let _ = kill(s.pid, sig);
                                    }
                                    kill_at = Some(Instant::now() + Duration::from_millis(grace));
                                }
                                // SIGHUP and the like: the monitor has no terminal.
                                _ => {}
                            }
                        }
                    }
                    Some(stream) => {
                        let slot = match stream {
                            Stream::Stdout => &mut s.stdout,
                            Stream::Stderr => &mut s.stderr,
                        };
                        let Some(fd) = slot.as_ref() else { continue };
                        match nix::unistd::read(fd, &mut buf) {
                            Ok(0) => *slot = None,
                            Ok(n) => {
                                if log.write(stream, &buf[..n]).is_err() {
                                    self.note_dropped(log, &mut last_drop_save);
                                }
                            }
                            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                            Err(_) => *slot = None,
                        }
                    }
                }
            }
        }
        exit.unwrap_or(ExitInfo {
            code: None,
            signal: None,
            oom_killed: false,
            at_ms: now_ms(),
        })
    }

    /// Sleeps, returning early (true) if a stop is requested.
    fn sleep_unless_stopped(&mut self, d: Duration) -> bool {
        let until = Instant::now() + d;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut fds = [PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let _ = poll(
                &mut fds,
                PollTimeout::from(left.as_millis().min(60_000) as u16),
            );
            while let Ok(Some(info)) = self.signals.read_signal() {
                if matches!(info.ssi_signo as i32, libc::SIGTERM | libc::SIGINT) {
                    self.state.stopping = true;
                    self.save();
                    return true;
                }
            }
        }
    }

    /// Kills whatever is left in the container's cgroup (processes that escaped the pid
    /// namespace teardown cannot exist, but a cgroup is the only complete list).
    fn kill_leftovers(&self) {
        if self
            .cgroup
            .processes()
            .map(|p| !p.is_empty())
            .unwrap_or(true)
        {
            let _ = self.cgroup.kill_all();
        }
    }

    fn cleanup(&mut self) {
        // The cgroup is normally empty by now (the workload's exit killed what it left), and
        // `delete` refuses one that is not: only then is anything killed. One listing of the
        // hierarchies' processes instead of two.
        let deleted = match self.cgroup.delete() {
            Err(cgroup::CgroupError::NotEmpty { .. }) => {
                let _ = self.cgroup.kill_all();
                self.cgroup.delete()
            }
            other => other,
        };
        if let Err(e) = deleted {
            note(format_args!("monitor {}: removing cgroup: {e}", self.id));
        }
        // Only a namespace made for this container goes with it; a pod's stays for the pod.
        if self.config.network == NetworkAttach::Own
            && let Some(netns) = &self.netns
        {
            remove_netns(netns);
        }
        let _ = std::fs::remove_file(self.dir.join(STOP_FILE));
        self.state.monitor_pid = None;
        self.state.monitor_start = None;
        self.save();
    }
}

struct Started {
    pid: Pid,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

/// Reaps every exited child; returns the container's exit if it was among them.
fn reap(pid: Pid) -> Option<ExitInfo> {
    let mut found = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => {
                found = Some(ExitInfo {
                    code: Some(code),
                    signal: None,
                    oom_killed: false,
                    at_ms: now_ms(),
                })
            }
            Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => {
                found = Some(ExitInfo {
                    code: None,
                    signal: Some(sig as i32),
                    oom_killed: false,
                    at_ms: now_ms(),
                })
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(_) => {}
        }
    }
}

/// A line on the monitor's stderr (its `monitor.log`), ignoring failures: a full disk must
/// not stop the monitor.
fn note(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{args}");
}

/// Creates a network namespace with only loopback, up, and binds it at `path`, so it
/// outlives its processes and the network layer can plumb it.
///
/// The namespace is made on a thread of its own (namespaces are per thread, and a thread that
/// unshares its network touches nothing the process's other threads use), so this is safe to
/// call from the multi-threaded agent: nothing forks.
pub fn create_netns(path: &Path) -> Result<(), String> {
    create_bound_ns(path, CloneFlags::CLONE_NEWNET, "net", "network namespace")
}

/// Creates an IPC namespace and binds it at `path`, as [`create_netns`] does for a network
/// namespace (on a thread of its own), so a pod's containers can share it.
pub fn create_ipcns(path: &Path) -> Result<(), String> {
    create_bound_ns(path, CloneFlags::CLONE_NEWIPC, "ipc", "IPC namespace")
}

/// Unshares `flag` on a thread of its own (bringing loopback up in a new network namespace)
/// and binds `/proc/thread-self/ns/<kind>` at `path`. Nothing is left on failure.
fn create_bound_ns(path: &Path, flag: CloneFlags, kind: &str, what: &str) -> Result<(), String> {
    if path.exists() && is_mountpoint(path) {
        return Ok(());
    }
    let parent = path.parent().ok_or("namespace path has no parent")?;
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    std::fs::File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    let target = path.to_path_buf();
    let source = format!("/proc/thread-self/ns/{kind}");
    let made = std::thread::spawn(move || -> Result<(), String> {
        nix::sched::unshare(flag).map_err(|e| format!("unshare: {e}"))?;
        if flag == CloneFlags::CLONE_NEWNET {
            sys::loopback_up().map_err(|e| format!("loopback: {e}"))?;
        }
        nix::mount::mount(
            Some(source.as_str()),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind mount: {e}"))
    })
    .join()
    .unwrap_or_else(|_| Err("the namespace thread panicked".into()));
    made.map_err(|e| {
        let _ = std::fs::remove_file(path);
        format!("creating {what} {}: {e}", path.display())
    })
}

/// Whether something is mounted at `path` in this process's mount namespace: statx's
/// mount-root attribute (Linux 5.8), else a look through /proc/self/mountinfo (which costs a
/// walk of every mount of the host).
pub fn is_mountpoint(path: &Path) -> bool {
    match sys::is_mount_root(path) {
        Ok(Some(root)) => return root,
        Ok(None) => {}
        Err(_) => return false,
    }
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.display().to_string();
    text.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(p.as_str()))
}

/// Unmounts and removes a bound namespace file (network or IPC). Idempotent.
pub fn remove_ns(path: &Path) {
    remove_netns(path)
}

/// Unmounts and removes a container's network namespace file. Idempotent.
pub fn remove_netns(path: &Path) {
    while is_mountpoint(path) {
        if nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
    let _ = std::fs::remove_file(path);
}
