//! Containers on disk: one directory per container under `DATA_DIR/containers/<id>/` holding
//! `config.json` (what to run, written once) and `state.json` (what happened, rewritten
//! atomically by the monitor). Everything the agent knows about a container survives the
//! agent: a restarted agent re-reads these files and re-adopts running containers.

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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a record atomically and durably ([`crate::durable::write_atomic`]: a unique
/// temporary, fsync, rename, fsync of the directory): a reader never sees half a record, also
/// after a kill or a power loss.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::durable::write_atomic(path, &bytes).map_err(io(path))
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
/// The record of what to run (`config.json`) is durable.
fn write_state(path: &Path, state: &State) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::durable::replace_atomic(path, &bytes).map_err(io(path))
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
        let dir = self.dir(&config.id);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        reserve(&dir.join(RESERVE_FILE));
        write_state(&dir.join("state.json"), &State::created())?;
        write_json_atomic(&dir.join("config.json"), config)?;
        Ok(dir)
    }

    pub fn config(&self, id: &str) -> Result<ContainerConfig, StoreError> {
        read_json(&self.dir(id).join("config.json"))
    }

    pub fn state(&self, id: &str) -> Result<State, StoreError> {
        read_json(&self.dir(id).join("state.json"))
    }

    /// Saves what happened. On a full disk the container's reserve (see [`Store::create`]) is
    /// given up to make room, so the record of an exit is not lost to the output that filled
    /// the disk.
    pub fn save_state(&self, id: &str, state: &State) -> Result<(), StoreError> {
        let path = self.dir(id).join("state.json");
        match write_state(&path, state) {
            Err(StoreError::Io { source, .. })
                if source.raw_os_error() == Some(libc::ENOSPC)
                    && fs::remove_file(self.dir(id).join(RESERVE_FILE)).is_ok() =>
            {
                write_state(&path, state)
            }
            other => other,
        }
    }

    /// [`Store::save_state`] that leaves the reserve alone: for updates that may fail on a full
    /// disk without harm (a running count), so the reserve is still there for the exit.
    pub fn save_state_keeping_reserve(&self, id: &str, state: &State) -> Result<(), StoreError> {
        write_state(&self.dir(id).join("state.json"), state)
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
            let s = self.state(&id).unwrap_or_else(|e| State {
                status: Status::Exited,
                error: Some(format!("its state was lost (crash or power loss): {e}")),
                ..State::created()
            });
            out.push((c, s));
        }
        out.sort_by_key(|(c, _)| (c.created_at_ms, c.id.clone()));
        Ok(out)
    }

    /// Directories that hold no usable record (left by an interrupted create).
    pub fn orphans(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let entry = entry.map_err(io(&self.root))?;
            if !entry.path().join("config.json").exists() {
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

    pub fn remove_dir(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&dir)(e)),
        }
    }
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
mod tests {
    use super::*;

    fn config(id: &str) -> ContainerConfig {
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
        }
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
}
