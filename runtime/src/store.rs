//! Containers on disk: one directory per container under `DATA_DIR/containers/<id>/` holding
//! `config.json` (what to run, written once) and the live state (what happened, rewritten
//! atomically by the monitor): `state.json` beside it, or `RUN_DIR/containers/<id>.json` when
//! the agent has a run dir (`--run-dir`, a tmpfs on a systemd host: the state is rewritten at
//! every start and exit and means nothing after a reboot, as containerd keeps its task state in
//! /run). Everything the agent knows about a container survives the agent: a restarted agent
//! re-reads these files and re-adopts running containers.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cgroup::Limits;

/// Everything needed to run one container, resolved from the image and the user's spec.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ContainerConfig {
    pub id: String,
    pub name: String,
    pub image: String,
    /// Unpacked image layers, lowest first.
    pub layers: Vec<PathBuf>,
    /// argv; `args[0]` is looked up in the container's PATH when it has no '/'.
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// Docker-style user spec ("", "1000", "nobody:nogroup"), resolved inside the rootfs.
    pub user: String,
    pub hostname: String,
    pub limits: Limits,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    pub restart: RestartPolicy,
    pub stop_signal: i32,
    pub stop_grace_ms: u64,
    /// Cgroup parent (relative to each hierarchy root).
    pub cgroup_parent: String,
    /// Largest size of a log file before it is rotated.
    pub log_max_bytes: u64,
    pub created_at_ms: i64,
    /// Labels its creator set (the agent marks the containers it runs for allocations).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Host devices granted beyond the default allow-list, made in its `/dev`.
    #[serde(default)]
    pub devices: Vec<crate::devices::DeviceNode>,
    /// Which network namespace it runs in.
    #[serde(default)]
    pub network: NetworkAttach,
    /// The IPC namespace (a bind-mounted `ns/ipc`) it shares with the rest of its pod; `None`:
    /// one of its own.
    #[serde(default)]
    pub ipc: Option<PathBuf>,
    /// Directories of the host bind-mounted into it (volumes).
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Run a minimal init as PID 1 that reaps orphans and forwards signals to the workload.
    #[serde(default)]
    pub init: bool,
    /// Stop it when its node loses touch with the controllers (see [`crate::fence`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<crate::fence::Fence>,
    /// Where its live state is kept: `<run dir>/containers/<id>.json`. `None` (and every record
    /// written before there was a run dir): `state.json` in its directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
}

/// The network namespace a container runs in.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NetworkAttach {
    /// A namespace of its own, made for it (plumbed by the runtime's network hook, if any).
    #[default]
    Own,
    /// An existing namespace bound at this path (its pod's).
    Join(PathBuf),
    /// The host's.
    Host,
}

/// A host directory bind-mounted into a container.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mount {
    /// The directory on the host.
    pub source: PathBuf,
    /// Absolute path in the container (plain: no `.`, `..` or empty components).
    pub target: String,
    pub read_only: bool,
}

/// When the monitor restarts a container that exited.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Never,
    OnFailure,
    Always,
}

impl RestartPolicy {
    /// Whether to restart after an exit with this code (`None`: killed by a signal).
    pub fn should_restart(self, code: Option<i32>, restarts: u32, max: u32) -> bool {
        if restarts >= max {
            return false;
        }
        match self {
            RestartPolicy::Never => false,
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != Some(0),
        }
    }
}

/// Where a container is in its life.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Record written, monitor not yet confirmed running.
    Created,
    Running,
    /// Waiting to restart (backoff).
    Restarting,
    Exited,
    /// Could not be started (bad command, bad rootfs): see `error`.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Restarting => "restarting",
            Status::Exited => "exited",
            Status::Failed => "failed",
        }
    }
}

/// How the last run ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, when it exited by itself.
    pub code: Option<i32>,
    /// Signal number, when it was killed.
    pub signal: Option<i32>,
    /// Killed by the kernel's OOM killer (memory limit).
    pub oom_killed: bool,
    pub at_ms: i64,
}

impl ExitInfo {
    /// The exit status a shell would report: the code, or 128 + signal.
    pub fn status_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }

    pub fn describe(&self) -> String {
        match (self.code, self.signal, self.oom_killed) {
            (_, _, true) => "oom-killed".to_string(),
            (Some(c), _, _) => format!("exit {c}"),
            (None, Some(s), _) => format!("signal {s}"),
            _ => "unknown".to_string(),
        }
    }
}

/// What the monitor records about a container.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub status: Status,
    /// The monitor's pid and its start time (clock ticks since boot, from /proc/PID/stat), so
    /// a reused pid is never mistaken for the monitor.
    pub monitor_pid: Option<i32>,
    pub monitor_start: Option<u64>,
    /// The container's pid 1 as the host sees it.
    pub pid: Option<i32>,
    pub started_at_ms: Option<i64>,
    pub restarts: u32,
    pub exit: Option<ExitInfo>,
    pub error: Option<String>,
    /// Set once a stop was asked for: the monitor will not restart the container.
    pub stopping: bool,
    /// Bytes of the container's output that could not be written to its log (a full disk).
    #[serde(default)]
    pub log_dropped_bytes: u64,
    /// Why, the last time it happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_error: Option<String>,
}

impl State {
    pub fn created() -> Self {
        State {
            status: Status::Created,
            monitor_pid: None,
            monitor_start: None,
            pid: None,
            started_at_ms: None,
            restarts: 0,
            exit: None,
            error: None,
            stopping: false,
            log_dropped_bytes: 0,
            log_error: None,
        }
    }
}

/// Errors reading or writing container records, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt record: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no container {0:?}")]
    NotFound(String),
    #[error("container name {0:?} is already in use")]
    NameInUse(String),
    #[error("container reference {0:?} matches several containers")]
    Ambiguous(String),
    #[error("run dir {path}: {reason}")]
    RunDir { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a container's record atomically (a reader never sees half of it) but not durably.
/// A host crash ends every container, and the agent starts again what its controller assigns,
/// not what it finds on disk: after one, a record is only what tells `gc` what to clean up. A
/// record a power loss tore (not JSON: empty, cut short, zeros) makes its directory an orphan
/// ([`Store::orphans`]), removed as one. An fsync of the record and its directory at each
/// start cost a journal commit or two (about 0.8 ms) on the path of every container start.
fn write_record(path: &Path, config: &ContainerConfig) -> Result<(), StoreError> {
    replace_json(path, config)
}

/// `value` as pretty JSON, replacing `path` atomically, not durably
/// ([`crate::durable::replace_atomic`]).
fn replace_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::durable::replace_atomic(path, &bytes).map_err(io(path))
}

/// Whether the record at `path` was torn by a power loss: not JSON at all (empty, cut short,
/// or zeros where the data never reached the disk, as some filesystems leave it). A record
/// that is JSON but not understood (a newer agent's, say) is not torn.
fn record_torn(path: &Path) -> bool {
    fs::read(path)
        .is_ok_and(|bytes| serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StoreError> {
    let bytes = fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Space set aside in each container's directory (allocated, not sparse) and given up when
/// its state cannot be saved on a full disk.
const RESERVE_FILE: &str = "reserve";
const RESERVE_BYTES: i64 = 64 * 1024;

/// Allocates the reserve; best effort (a filesystem without fallocate gets none).
fn reserve(path: &Path) {
    if let Ok(f) = fs::File::create(path) {
        let _ = nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, RESERVE_BYTES);
    }
}

/// Writes the monitor's live status atomically (readers never see half of it) but without
/// fsync: it changes at every start, exit and restart, and after a power loss it says nothing
/// true anyway (every container is gone); the agent re-derives what runs from what it finds.
/// The record of what to run (`config.json`) is not fsync'd either (see `write_record`).
fn write_state(path: &Path, state: &State) -> Result<(), StoreError> {
    replace_json(path, state)
}

/// The live state's file name in a container's directory (when there is no run dir).
const STATE_FILE: &str = "state.json";

/// The live state files' directory under a run dir.
const RUN_CONTAINERS: &str = "containers";

/// Where a container created with run dir `run_dir` keeps its live state.
pub fn run_state_file(run_dir: &Path, id: &str) -> PathBuf {
    run_dir.join(RUN_CONTAINERS).join(format!("{id}.json"))
}

/// The file in a run dir naming the data dir whose records it holds the live state of.
const RUN_OWNER: &str = "data-dir";

/// Creates `dir` (and its parents) with mode 0700 where missing.
fn make_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// The container directories under one data dir.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let root = data_dir.join("containers");
        fs::create_dir_all(&root).map_err(io(&root))?;
        Ok(Store { root })
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Creates a new container record; refuses a name already in use.
    pub fn create(&self, config: &ContainerConfig) -> Result<PathBuf, StoreError> {
        if self.list()?.iter().any(|(c, _)| c.name == config.name) {
            return Err(StoreError::NameInUse(config.name.clone()));
        }
        let state_file = self.state_file(config)?;
        if let Some(live) = state_file.parent() {
            make_private_dir(live)?;
        }
        let dir = self.dir(&config.id);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        reserve(&dir.join(RESERVE_FILE));
        write_state(&state_file, &State::created())?;
        write_record(&dir.join("config.json"), config)?;
        Ok(dir)
    }

    /// Makes `dir` this store's run dir and returns it in its plain form (no `.`, no doubled
    /// or trailing `/`: records name their state file under it, and a record naming anything
    /// else is refused). Refused: a relative, non-UTF-8 or `..` path; the data dir itself; a
    /// directory (or its `containers/`) that is a symlink, not owned by this user, or writable
    /// by others, since root trusts what it reads there; and a run dir already claimed by
    /// another data dir, whose live files this store's sweep would take for strays.
    pub fn claim_run_dir(&self, dir: &Path) -> Result<PathBuf, StoreError> {
        use std::os::unix::fs::MetadataExt as _;
        use std::path::Component;
        let refuse = |reason: String| StoreError::RunDir {
            path: dir.to_path_buf(),
            reason,
        };
        if !dir.is_absolute() {
            return Err(refuse("not an absolute path".into()));
        }
        if dir.to_str().is_none() {
            return Err(refuse("not UTF-8".into()));
        }
        if dir.components().any(|c| c == Component::ParentDir) {
            return Err(refuse("has a .. in it".into()));
        }
        let dir: PathBuf = dir.components().collect();
        let live = dir.join(RUN_CONTAINERS);
        make_private_dir(&live)?;
        let root = fs::canonicalize(&self.root).map_err(io(&self.root))?;
        if fs::canonicalize(&live).map_err(io(&live))? == root {
            return Err(refuse("it is the data dir".into()));
        }
        let me = nix::unistd::geteuid().as_raw();
        for d in [&dir, &live] {
            let m = fs::symlink_metadata(d).map_err(io(d))?;
            if m.file_type().is_symlink() {
                return Err(refuse(format!("{} is a symlink", d.display())));
            }
            if m.uid() != me || m.mode() & 0o022 != 0 {
                return Err(refuse(format!(
                    "{} is owned by uid {} with mode {:o}: it must be this user's, writable by no one else",
                    d.display(),
                    m.uid(),
                    m.mode() & 0o7777
                )));
            }
        }
        let owner = dir.join(RUN_OWNER);
        let root_text = root.to_string_lossy().into_owned();
        match fs::read_to_string(&owner) {
            Ok(text) if text.trim_end() == root_text => {}
            Ok(text) => {
                return Err(refuse(format!(
                    "it holds the live state of the data dir {}",
                    text.trim_end()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::durable::replace_atomic(&owner, format!("{root_text}\n").as_bytes())
                    .map_err(io(&owner))?;
            }
            Err(e) => return Err(io(&owner)(e)),
        }
        Ok(dir)
    }

    pub fn config(&self, id: &str) -> Result<ContainerConfig, StoreError> {
        read_json(&self.dir(id).join("config.json"))
    }

    /// The file holding the live state of the container `config` describes. A record that
    /// names any other file than `/<run dir>/containers/<its id>.json` (absolute, UTF-8, no
    /// empty, `.` or `..` segment) is refused: the monitor (root) writes there.
    pub fn state_file(&self, config: &ContainerConfig) -> Result<PathBuf, StoreError> {
        let Some(file) = &config.state_file else {
            return Ok(self.dir(&config.id).join(STATE_FILE));
        };
        let name = format!("{}.json", config.id);
        let plain = file
            .to_str()
            .and_then(|t| t.strip_prefix('/'))
            .is_some_and(|t| {
                let segments: Vec<&str> = t.split('/').collect();
                segments.len() >= 2
                    && segments
                        .iter()
                        .all(|s| !s.is_empty() && *s != "." && *s != "..")
                    && segments[segments.len() - 2] == RUN_CONTAINERS
                    && segments[segments.len() - 1] == name
            });
        if plain {
            Ok(file.clone())
        } else {
            Err(StoreError::Corrupt {
                path: self.dir(&config.id).join("config.json"),
                reason: format!(
                    "state_file {} is not RUN_DIR/{RUN_CONTAINERS}/{}.json",
                    file.display(),
                    config.id
                ),
            })
        }
    }

    pub fn state(&self, id: &str) -> Result<State, StoreError> {
        self.state_of(&self.config(id)?)
    }

    /// The container's state. With a run dir: the live file there; once the container has
    /// ended (see [`Store::save_state`]), the copy beside its record; when neither is there,
    /// the run dir was emptied by a reboot while the container ran (or was being created):
    /// it is `Running` under no monitor, which the next cleanup ([`crate::container::Runtime::gc`])
    /// records as ended by the node, as it does for a monitor that died.
    pub fn state_of(&self, config: &ContainerConfig) -> Result<State, StoreError> {
        let file = self.state_file(config)?;
        if config.state_file.is_none() {
            return read_json(&file);
        }
        for path in [&file, &self.dir(&config.id).join(STATE_FILE)] {
            match read_json(path) {
                Err(StoreError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                other => return other,
            }
        }
        Ok(State {
            status: Status::Running,
            ..State::created()
        })
    }

    /// Saves what happened. With a run dir, an ended container's state (exited or failed) is
    /// written beside its record instead, and the live file removed: it outlives a reboot, so
    /// a container that had finished is not taken for one the reboot stopped. On a full disk
    /// the container's reserve (see [`Store::create`]) is given up to make room, so the record
    /// of an exit is not lost to the output that filled the disk.
    pub fn save_state(&self, config: &ContainerConfig, state: &State) -> Result<(), StoreError> {
        self.save(config, state, true)
    }

    /// [`Store::save_state`] that leaves the reserve alone: for updates that may fail on a full
    /// disk without harm (a running count of a running container), so the reserve is still
    /// there for the exit.
    pub fn save_state_keeping_reserve(
        &self,
        config: &ContainerConfig,
        state: &State,
    ) -> Result<(), StoreError> {
        self.save(config, state, false)
    }

    fn save(
        &self,
        config: &ContainerConfig,
        state: &State,
        use_reserve: bool,
    ) -> Result<(), StoreError> {
        let live = self.state_file(config)?;
        let ended = matches!(state.status, Status::Exited | Status::Failed);
        let path = if config.state_file.is_some() && ended {
            self.dir(&config.id).join(STATE_FILE)
        } else {
            live.clone()
        };
        match write_state(&path, state) {
            Err(StoreError::Io { source, .. })
                if use_reserve
                    && source.raw_os_error() == Some(libc::ENOSPC)
                    && fs::remove_file(self.dir(&config.id).join(RESERVE_FILE)).is_ok() =>
            {
                write_state(&path, state)?
            }
            other => other?,
        }
        if path != live {
            match fs::remove_file(&live) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&live)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Every container with a readable config, ordered by creation time. A directory without
    /// a config (a create interrupted before it was written) is skipped.
    pub fn list(&self) -> Result<Vec<(ContainerConfig, State)>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let entry = entry.map_err(io(&self.root))?;
            let id = entry.file_name().to_string_lossy().to_string();
            let Ok(c) = self.config(&id) else {
                continue;
            };
            // The live status is not fsync'd (see `write_state`): after a power loss it may be
            // unreadable; the container is then over, not invisible.
            let s = self.state_of(&c).unwrap_or_else(|e| State {
                status: Status::Exited,
                error: Some(format!("its state was lost (crash or power loss): {e}")),
                ..State::created()
            });
            out.push((c, s));
        }
        out.sort_by_key(|(c, _)| (c.created_at_ms, c.id.clone()));
        Ok(out)
    }

    /// Directories that hold no usable record: none (left by an interrupted create) or a torn
    /// one (a power loss before it reached the disk, see [`write_record`]).
    pub fn orphans(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let entry = entry.map_err(io(&self.root))?;
            let record = entry.path().join("config.json");
            if !record.exists() || record_torn(&record) {
                out.push(entry.path());
            }
        }
        Ok(out)
    }

    /// Finds a container by full id, id prefix, or name.
    pub fn resolve(&self, reference: &str) -> Result<String, StoreError> {
        let all = self.list()?;
        if let Some((c, _)) = all
            .iter()
            .find(|(c, _)| c.id == reference || c.name == reference)
        {
            return Ok(c.id.clone());
        }
        let matches: Vec<_> = all
            .iter()
            .filter(|(c, _)| c.id.starts_with(reference))
            .collect();
        match matches.as_slice() {
            [] => Err(StoreError::NotFound(reference.to_string())),
            [(c, _)] => Ok(c.id.clone()),
            _ => Err(StoreError::Ambiguous(reference.to_string())),
        }
    }

    /// Removes a container's record: its live state (when its config names where), then its
    /// directory.
    pub fn remove_dir(&self, id: &str) -> Result<(), StoreError> {
        match self.take_out(id)? {
            Some(dir) => delete_tree(&dir),
            None => Ok(()),
        }
    }

    /// Takes a container's record out of the store at once, leaving its files to be deleted
    /// by the caller, on whatever thread it likes ([`delete_tree`]): its live state is
    /// removed, and its directory renamed into `removed/` beside the store (the same
    /// filesystem), where no listing sees it. Returns where it went; `None` when there was no
    /// directory, or it could not be moved (another filesystem) and was deleted in place.
    pub fn take_out(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        // Best effort: a live file left here is swept with the run dir (`sweep_run_dir`).
        if let Ok(file) = self.config(id).and_then(|c| self.state_file(&c)) {
            let _ = fs::remove_file(&file);
        }
        let dir = self.dir(id);
        let removed = self.removed_dir();
        make_private_dir(&removed)?;
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let to = removed.join(format!("{id}.{}.{seq}", std::process::id()));
        match fs::rename(&dir, &to) {
            Ok(()) => Ok(Some(to)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => delete_tree(&dir).map(|()| None),
            Err(e) => Err(io(&dir)(e)),
        }
    }

    /// Where [`Store::take_out`] moves containers' directories to.
    fn removed_dir(&self) -> PathBuf {
        self.root.with_file_name("removed")
    }

    /// Directories taken out of the store whose deletion has not finished (the process that
    /// took them out was killed), taken out at least `min_age` ago (by their ctime, which the
    /// rename set): younger ones may still be being deleted.
    pub fn removed_leftovers(&self, min_age: std::time::Duration) -> Vec<PathBuf> {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(entries) = fs::read_dir(self.removed_dir()) else {
            return Vec::new();
        };
        let now_s = now_ms() / 1000;
        let min_s = i64::try_from(min_age.as_secs()).unwrap_or(i64::MAX);
        entries
            .flatten()
            .filter(|e| {
                e.metadata()
                    .is_ok_and(|m| now_s.saturating_sub(m.ctime()) >= min_s)
            })
            .map(|e| e.path())
            .collect()
    }
}

/// Deletes a directory tree taken out of the store ([`Store::take_out`]); one already gone
/// is no error.
pub fn delete_tree(dir: &Path) -> Result<(), StoreError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(dir)(e)),
    }
}

/// Live state files under `run_dir` that no container record owns any more: a container
/// directory removed by an older agent or by hand, or a temporary left by a writer that was
/// killed (its pid is gone). Removes them and returns their paths.
pub fn sweep_run_dir(store: &Store, run_dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let root = run_dir.join(RUN_CONTAINERS);
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&root)(e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(&root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = if let Some(pid) = crate::durable::temp_writer_pid(&name) {
            // Its writer (a monitor or the agent, in this pid namespace) is gone.
            !Path::new(&format!("/proc/{pid}")).exists()
        } else if let Some(id) = name.strip_suffix(".json") {
            !store.dir(id).exists()
        } else {
            false
        };
        if stale && fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// A process's start time in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the recorded monitor is still that same process.
pub fn monitor_alive(state: &State) -> bool {
    match (state.monitor_pid, state.monitor_start) {
        (Some(pid), Some(start)) => process_start_time(pid) == Some(start),
        _ => false,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn config(id: &str) -> ContainerConfig {
        ContainerConfig {
            id: id.into(),
            name: format!("c-{id}"),
            image: "oci:/x".into(),
            layers: vec![],
            args: vec!["/bin/true".into()],
            env: vec![],
            cwd: String::new(),
            user: String::new(),
            hostname: "h".into(),
            limits: Limits::default(),
            nofile: 1024,
            restart: RestartPolicy::Never,
            stop_signal: 15,
            stop_grace_ms: 1000,
            cgroup_parent: "p".into(),
            log_max_bytes: 4096,
            created_at_ms: 1,
            labels: Default::default(),
            devices: vec![],
            network: NetworkAttach::Own,
            ipc: None,
            mounts: vec![],
            init: false,
            fence: None,
            state_file: None,
        }
    }

    /// The record is not fsync'd either: a power loss may leave it empty, cut short or zeros. Its
    /// directory is then an orphan (what `gc` removes), not a container; a whole record that
    /// is merely not understood (a newer agent's) is not taken for one.
    #[test]
    fn a_torn_record_makes_an_orphan_and_an_unknown_one_does_not() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("open");
        for id in ["whole", "empty", "cut", "zeros", "newer"] {
            store.create(&config(id)).expect("create");
        }
        let record = |id: &str| store.dir(id).join("config.json");
        let text = std::fs::read_to_string(record("cut")).expect("read");
        std::fs::write(record("empty"), b"").expect("truncate");
        std::fs::write(record("cut"), &text[..text.len() / 2]).expect("cut");
        std::fs::write(record("zeros"), vec![0u8; text.len()]).expect("zeros");
        std::fs::write(record("newer"), br#"{"a_field_from_the_future": 1}"#).expect("newer");
        let mut orphans: Vec<String> = store
            .orphans()
            .expect("orphans")
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        orphans.sort();
        assert_eq!(orphans, ["cut", "empty", "zeros"]);
        let listed: Vec<String> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|(c, _)| c.id)
            .collect();
        assert_eq!(listed, ["whole"]);
    }

    /// A record taken out of the store is gone from it at once (not listed, its name free)
    /// while its files wait in `removed/` for whoever deletes them; leftovers are found there
    /// once old enough.
    #[test]
    fn a_record_taken_out_leaves_the_store_at_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("open");
        store.create(&config("t1")).expect("create");
        std::fs::create_dir_all(store.dir("t1").join("upper/etc")).expect("upper");
        std::fs::write(store.dir("t1").join("upper/etc/f"), b"x").expect("file");
        let moved = store.take_out("t1").expect("take out").expect("moved");
        assert!(moved.starts_with(dir.path().join("removed")), "{moved:?}");
        assert!(moved.join("upper/etc/f").exists());
        assert!(!store.dir("t1").exists());
        assert!(store.list().expect("list").is_empty());
        store.create(&config("t1")).expect("the name is free again");
        assert_eq!(
            store.removed_leftovers(std::time::Duration::ZERO),
            std::slice::from_ref(&moved)
        );
        assert!(
            store
                .removed_leftovers(std::time::Duration::from_secs(3600))
                .is_empty()
        );
        delete_tree(&moved).expect("delete");
        delete_tree(&moved).expect("gone already is no error");
        assert!(store.take_out("nothing").expect("take out").is_none());
    }

    /// The live status is not fsync'd: after a power loss it may be empty. The container
    /// then shows as over, with the reason, instead of vanishing from the list.
    #[test]
    fn a_container_whose_state_was_lost_is_listed_as_over() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("open");
        store.create(&config("a1")).expect("create");
        store.create(&config("a2")).expect("create");
        std::fs::write(store.dir("a2").join("state.json"), b"").expect("truncate");
        let list = store.list().expect("list");
        assert_eq!(list.len(), 2);
        let (_, lost) = list.iter().find(|(c, _)| c.id == "a2").expect("a2 listed");
        assert_eq!(lost.status, Status::Exited);
        assert!(
            lost.error
                .as_deref()
                .is_some_and(|e| e.contains("state was lost")),
            "{lost:?}"
        );
        let stray: Vec<_> = std::fs::read_dir(store.dir("a1"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }

    fn in_run_dir(run: &Path, id: &str) -> ContainerConfig {
        ContainerConfig {
            state_file: Some(run_state_file(run, id)),
            ..config(id)
        }
    }

    /// With a run dir, the live state is there and not in the container's directory; removing
    /// the record removes both.
    #[test]
    fn live_state_is_kept_in_the_run_dir_and_removed_with_the_record() {
        let data = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        let store = Store::open(data.path()).expect("open");
        let c = in_run_dir(run.path(), "b1");
        store.create(&c).expect("create");
        let live = run.path().join("containers").join("b1.json");
        assert!(live.is_file());
        assert!(!store.dir("b1").join("state.json").exists());
        let mut s = store.state("b1").expect("state");
        assert_eq!(s.status, Status::Created);
        s.status = Status::Running;
        s.pid = Some(42);
        store.save_state(&c, &s).expect("save");
        assert_eq!(store.state_of(&c).expect("state"), s);
        assert!(live.is_file() && !store.dir("b1").join("state.json").exists());
        let listed = store.list().expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1.status, Status::Running);
        // A record from before the run dir keeps its state beside its config.
        store.create(&config("b2")).expect("create");
        assert!(store.dir("b2").join("state.json").is_file());
        assert_eq!(store.state("b2").expect("state").status, Status::Created);
        store.remove_dir("b1").expect("remove");
        assert!(!live.exists());
        assert!(!store.dir("b1").exists());
        let left: Vec<_> = std::fs::read_dir(run.path().join("containers"))
            .expect("ls")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A reboot empties the run dir. A container that was running (or being created) then is
    /// `Running` under no monitor, for the next cleanup to record as ended by the node; one
    /// that had ended keeps its end, saved beside its record.
    #[test]
    fn after_a_reboot_a_running_container_is_running_under_no_monitor_and_an_ended_one_ended() {
        let data = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        let store = Store::open(data.path()).expect("open");
        let running = in_run_dir(run.path(), "c1");
        store.create(&running).expect("create");
        let mut s = store.state_of(&running).expect("state");
        s.status = Status::Running;
        s.monitor_pid = Some(4242);
        store.save_state(&running, &s).expect("save");
        let ended = in_run_dir(run.path(), "c2");
        store.create(&ended).expect("create");
        let mut s = store.state_of(&ended).expect("state");
        s.status = Status::Exited;
        s.exit = Some(ExitInfo {
            code: Some(3),
            signal: None,
            oom_killed: false,
            at_ms: 5,
        });
        store.save_state(&ended, &s).expect("save");
        // The end is beside the record, the live file gone.
        assert!(store.dir("c2").join("state.json").is_file());
        assert!(!run_state_file(run.path(), "c2").exists());
        assert_eq!(store.state("c2").expect("state"), s);

        std::fs::remove_dir_all(run.path().join("containers")).expect("reboot");
        let after = store.state("c1").expect("state");
        assert_eq!(after.status, Status::Running);
        assert_eq!(after.monitor_pid, None);
        assert!(!monitor_alive(&after));
        assert_eq!(store.state("c2").expect("state"), s);
        assert_eq!(store.list().expect("list").len(), 2);
        store.remove_dir("c1").expect("remove");
        store.remove_dir("c2").expect("remove");
        assert!(!store.dir("c1").exists() && !store.dir("c2").exists());
    }

    /// A run dir is this store's alone, in its plain form, and root's to write.
    #[test]
    fn a_run_dir_is_claimed_by_one_data_dir() {
        let data = tempfile::tempdir().expect("tmp");
        let other = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        let store = Store::open(data.path()).expect("open");
        let messy = format!("{}/./live//", run.path().display());
        let dir = store.claim_run_dir(Path::new(&messy)).expect("claim");
        assert_eq!(dir, run.path().join("live"));
        store.claim_run_dir(&dir).expect("again, same data dir");
        let err = Store::open(other.path())
            .expect("open")
            .claim_run_dir(&dir)
            .expect_err("another data dir");
        assert!(err.to_string().contains("holds the live state of"), "{err}");
        let err = store.claim_run_dir(data.path()).expect_err("the data dir");
        assert!(err.to_string().contains("is the data dir"), "{err}");
        let open = run.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod");
        let err = store.claim_run_dir(&open).expect_err("writable by others");
        assert!(err.to_string().contains("writable by no one else"), "{err}");
        let link = run.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("symlink");
        let err = store.claim_run_dir(&link).expect_err("a symlink");
        assert!(err.to_string().contains("symlink"), "{err}");
        for bad in ["relative/run", "/run/../etc"] {
            let err = store.claim_run_dir(Path::new(bad)).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    /// The monitor writes where the record says: a record naming any other file is refused.
    #[test]
    fn a_record_naming_another_state_file_is_refused() {
        let data = tempfile::tempdir().expect("tmp");
        let store = Store::open(data.path()).expect("open");
        for bad in [
            "/etc/passwd",
            "relative/containers/d1.json",
            "/run/skiff/containers/other.json",
            "/run/skiff/elsewhere/d1.json",
            "/run/skiff/containers/../d1.json",
        ] {
            let c = ContainerConfig {
                state_file: Some(PathBuf::from(bad)),
                ..config("d1")
            };
            let err = store.create(&c).expect_err(bad);
            assert!(err.to_string().contains("state_file"), "{bad}: {err}");
            assert!(!store.dir("d1").exists(), "{bad}: nothing written");
        }
    }

    /// Files in the run dir that no record owns are swept; owned ones and a live writer's
    /// temporary are kept.
    #[test]
    fn the_run_dir_sweep_removes_only_what_no_record_owns() {
        let data = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        let store = Store::open(data.path()).expect("open");
        store.create(&in_run_dir(run.path(), "e1")).expect("create");
        let live = run.path().join("containers");
        std::fs::write(live.join("gone.json"), b"{}").expect("write");
        let dead_pid = u32::MAX - 1;
        std::fs::write(live.join(format!(".e1.json.{dead_pid}.0.tmp")), b"").expect("write");
        let mine = live.join(format!(".e1.json.{}.7.tmp", std::process::id()));
        std::fs::write(&mine, b"").expect("write");
        let mut removed = sweep_run_dir(&store, run.path()).expect("sweep");
        removed.sort();
        assert_eq!(
            removed,
            vec![
                live.join(format!(".e1.json.{dead_pid}.0.tmp")),
                live.join("gone.json"),
            ]
        );
        assert!(live.join("e1.json").is_file());
        assert!(mine.is_file());
    }

    proptest::proptest! {
        /// Whatever path a record names, the state file used is the canonical
        /// `/DIR/containers/ID.json` of a plain absolute path, or the record is refused.
        #[test]
        fn only_a_plain_run_dir_state_file_is_taken(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "", ".", "..", "run", "containers", "f1.json", "f2.json", "f1", ".f1.json",
                    "a b", "containers.json",
                ]),
                0..6,
            ),
            absolute in proptest::bool::ANY,
        ) {
            let data = tempfile::tempdir().expect("tmp");
            let store = Store::open(data.path()).expect("open");
            let joined = parts.join("/");
            let path = if absolute { format!("/{joined}") } else { joined };
            let c = ContainerConfig {
                state_file: Some(PathBuf::from(&path)),
                ..config("f1")
            };
            // A leading empty part makes the joined path absolute too ("" + "/containers"...).
            let (rooted, segments) = match parts.split_first() {
                Some((&"", rest)) if !absolute => (true, rest),
                _ => (absolute, parts.as_slice()),
            };
            let canonical = rooted
                && segments.len() >= 2
                && segments.iter().all(|p| !p.is_empty() && *p != "." && *p != "..")
                && segments[segments.len() - 2] == "containers"
                && segments[segments.len() - 1] == "f1.json";
            proptest::prop_assert_eq!(store.state_file(&c).is_ok(), canonical, "{}", path);
            match store.state_file(&c) {
                Ok(file) => {
                    let text = file.to_str().expect("utf-8");
                    proptest::prop_assert_eq!(text, path.as_str());
                    proptest::prop_assert!(text.starts_with('/'), "{}", text);
                    proptest::prop_assert!(text.ends_with("/containers/f1.json"), "{}", text);
                    proptest::prop_assert!(!text.contains("/./") && !text.contains("/../"), "{}", text);
                    proptest::prop_assert!(!text.contains("//"), "{}", text);
                }
                Err(e) => proptest::prop_assert!(e.to_string().contains("state_file"), "{}", e),
            }
        }
    }
}
