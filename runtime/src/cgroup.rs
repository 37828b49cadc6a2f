//! Control groups for containers: one cgroup per container under a configurable parent
//! (`skiff`, `skiff/agent-2`, ...), relative to the root of every hierarchy, with cpu, memory
//! and pids limits.
//!
//! The runtime only sees the [`CgroupManager`] and [`Cgroup`] traits. The implementation in
//! [`rs_backend`] uses cgroups-rs 0.5 for hierarchy discovery and for creating, limiting,
//! joining, freezing and removing cgroups, and reads the few statistics files itself (cgroups-rs
//! turns read errors into zeros). The traits exist so that a thin cgroupfs layer can replace
//! cgroups-rs later without touching the runtime.
//!
//! Host layouts ([`host`] detects them):
//! - **v2**: `/sys/fs/cgroup` is cgroup2; one directory per container, controllers `cpu`,
//!   `memory`, `pids` enabled down the parent path.
//! - **v1**: one directory per v1 hierarchy we use: `memory`, `cpu`, `pids` (required),
//!   `cpuacct`, `freezer`, `name=systemd` (when mounted), plus `cpuset` only when it is co-mounted
//!   with one of those (so the new cpuset cgroup gets its cpus/mems initialised).
//! - **hybrid**: v1 as above, plus a directory in the (controller-less) cgroup2 hierarchy, usually
//!   `/sys/fs/cgroup/unified`, as runc does. It moves containers out of the agent's own
//!   cgroup2 (where systemd tracks services on hybrid hosts) and gives `cgroup.kill`.
//!
//! **Invariant:** `create` either returns a cgroup with every limit written, or leaves no
//! `<parent>/<name>` directory in any hierarchy. The parent directories are created on first
//! use and kept (they are shared by every container of the agent).

mod layout;
mod rs_backend;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The CFS period every cpu limit uses, in microseconds (as Docker and runc do).
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest cpu limit, in cores: the kernel refuses a CFS quota below 1 ms.
pub const MIN_CPU: f64 = 0.01;
/// The smallest memory limit, in bytes (Docker's minimum): below it a container cannot even
/// start its first process.
pub const MIN_MEMORY: u64 = 6 * 1024 * 1024;
/// How long `kill_all` waits for the cgroup to become empty.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Resource limits of one container. `None` means unlimited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Cores, e.g. 0.5 -> CFS quota 50000 us per 100000 us period. At least [`MIN_CPU`].
    pub cpu: Option<f64>,
    /// Bytes, hard limit. Swap is limited too (v1 `memory.memsw.limit_in_bytes` = the limit,
    /// v2 `memory.swap.max` = 0) where the kernel accounts swap, so swap cannot dodge it.
    /// At least [`MIN_MEMORY`].
    pub memory: Option<u64>,
    /// Maximum number of tasks (processes and threads). At least 1; the kernel's own maximum
    /// (`PID_MAX_LIMIT`, 4194304 on 64-bit) is enforced by the kernel.
    pub pids: Option<u64>,
}

/// Usage figures of one cgroup.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Memory charged to the cgroup, page cache included (v1 `memory.usage_in_bytes`,
    /// v2 `memory.current`).
    pub memory_bytes: u64,
    /// CPU time used (v1 `cpuacct.usage`, 0 without a cpuacct hierarchy; v2 `cpu.stat`
    /// `usage_usec` * 1000).
    pub cpu_usage_ns: u64,
    /// Tasks in the cgroup (`pids.current`).
    pub pids: u64,
    /// Processes killed by the OOM killer (v1 `memory.oom_control` `oom_kill`, or
    /// `memory.failcnt` on kernels without it; v2 `memory.events` `oom_kill`).
    pub oom_kills: u64,
}

/// Creates and finds the cgroups of one agent, all under one parent.
pub trait CgroupManager: Send + Sync {
    /// Creates `<parent>/<name>` in every hierarchy with the limits set. An impossible limit
    /// (e.g. memory below [`MIN_MEMORY`], negative/NaN cpu, or a value the kernel refuses) is a
    /// clear error and leaves nothing behind. An existing cgroup of that name is an error too.
    fn create(&self, name: &str, limits: &Limits) -> Result<Box<dyn Cgroup>, CgroupError>;
    /// Opens an existing one (re-adoption after an agent restart); None if absent from every
    /// hierarchy. A cgroup present in only some hierarchies (a crash mid-create) is opened, so
    /// that it can be deleted.
    fn open(&self, name: &str) -> Result<Option<Box<dyn Cgroup>>, CgroupError>;
    /// Names of the cgroups under the parent, in any hierarchy, sorted (to find leftovers).
    fn list(&self) -> Result<Vec<String>, CgroupError>;
    /// "v1", "v2" or "hybrid" — reported by the agent.
    fn mode(&self) -> &'static str;
}

/// One container's cgroup.
pub trait Cgroup: Send + Sync {
    /// The name given to `create` or `open`.
    fn name(&self) -> &str;
    /// Moves a process (and so its future children) into this cgroup in every hierarchy.
    fn add_process(&self, pid: i32) -> Result<(), CgroupError>;
    /// What a new process needs to be in this cgroup without being moved there by another:
    /// see [`JoinHandles`].
    fn join_handles(&self) -> Result<JoinHandles, CgroupError>;
    /// The processes in it (union over the hierarchies), sorted.
    fn processes(&self) -> Result<Vec<i32>, CgroupError>;
    /// Kills every process in it (`cgroup.kill` where the kernel has it; otherwise freeze,
    /// SIGKILL, thaw) and waits, at most [`KILL_TIMEOUT`], until it is empty.
    fn kill_all(&self) -> Result<(), CgroupError>;
    /// Current usage; see [`Stats`] for the files read.
    fn stats(&self) -> Result<Stats, CgroupError>;
    /// The OOM kills in it so far ([`Stats::oom_kills`]), reading only the file that holds
    /// them: the monitor reads it before and after each run of the workload.
    fn oom_kills(&self) -> Result<u64, CgroupError> {
        self.stats().map(|s| s.oom_kills)
    }
    /// Removes it from every hierarchy. It must be empty. Idempotent: directories already gone
    /// are fine, and a removal the kernel refuses as busy (tasks still exiting) is retried
    /// briefly.
    fn delete(&self) -> Result<(), CgroupError>;
    /// The directories (one per hierarchy, deduplicated, or the v2 dir) — the runtime
    /// bind-mounts the container's own cgroup read-only.
    fn paths(&self) -> Vec<PathBuf>;
    /// Allows exactly `rules` of device access (mknod, read, write) to the processes in it,
    /// everything else denied: the v1 `devices` list where that hierarchy is mounted, a
    /// cgroup v2 device program where cgroup2 is (both on a hybrid host). An error when
    /// neither is available: the policy would not be enforced.
    fn set_devices(&self, rules: &[crate::devices::DeviceRule]) -> Result<(), CgroupError>;
}

/// How a container's first process gets into its cgroup without the cost of a move.
///
/// Moving a process into a cgroup by writing its pid to `cgroup.procs` takes the kernel's
/// global `cgroup_threadgroup_rwsem` for writing, and taking it waits for an RCU grace period
/// (8-20 ms measured on this project's 2-core hosts, most of a container's start). Two ways in
/// avoid it:
/// - cgroup v2: `clone3(CLONE_INTO_CGROUP)` with [`JoinHandles::v2_dir`] creates the process
///   in the cgroup (Linux 5.7), no move at all;
/// - cgroup v1: a thread moving *itself* (writing "0" to a hierarchy's `tasks` file,
///   [`JoinHandles::v1_tasks`]) does not take the global lock (Linux 6.0). The new process is
///   single-threaded, so its one thread is the whole process.
///
/// On a hybrid host both apply: v1 hierarchies through `tasks`, the unified one at the clone.
#[derive(Debug, Default)]
pub struct JoinHandles {
    /// The cgroup2 directory (all of a v2 host's controllers, or a hybrid host's unified
    /// hierarchy, where the device program is attached), opened as a directory.
    pub v2_dir: Option<std::os::fd::OwnedFd>,
    /// Each v1 hierarchy's `tasks` file of this cgroup, opened for writing, with its path for
    /// messages.
    pub v1_tasks: Vec<(PathBuf, std::fs::File)>,
}

/// The host's cgroup manager for a parent path like "skiff" or "skiff/agent-2" (relative to
/// each hierarchy root; no "..", no leading "/", non-empty components). Detects the layout
/// (v1, v2, hybrid) and checks that the controllers we need are there; creates nothing.
pub fn host(parent: &str) -> Result<Box<dyn CgroupManager>, CgroupError> {
    validate_parent(parent)?;
    let host = detected()?;
    Ok(Box::new(rs_backend::RsManager::new(
        parent.to_string(),
        host.layout.clone(),
        host.hierarchy.clone(),
    )))
}

/// Detects the host's cgroup layout now, if this process has not yet: a spare monitor does
/// so before it is handed a container.
pub fn warm_up() -> Result<(), CgroupError> {
    detected().map(|_| ())
}

/// The host's cgroup layout, as this process found it.
struct Detected {
    layout: std::sync::Arc<layout::Layout>,
    hierarchy: rs_backend::Hierarchy,
}

/// The layout, detected once per process: cgroup filesystems are mounted at boot, and a
/// detection reads and parses /proc/self/mountinfo twice (about 0.3 ms, which the agent
/// daemon paid twice per container start). A failed detection is not kept.
fn detected() -> Result<&'static Detected, CgroupError> {
    static DETECTED: std::sync::OnceLock<Detected> = std::sync::OnceLock::new();
    if let Some(d) = DETECTED.get() {
        return Ok(d);
    }
    let hierarchy = rs_backend::Hierarchy::detect();
    let layout = layout::Layout::detect(hierarchy.is_v2())?;
    Ok(DETECTED.get_or_init(|| Detected {
        layout: std::sync::Arc::new(layout),
        hierarchy,
    }))
}

/// Errors of the cgroup module. Messages name the cgroup path (relative `parent/name`, or the
/// directory in one hierarchy) and, for limits, the limit and its value.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup parent {parent:?}: {reason}")]
    InvalidParent {
        parent: String,
        reason: &'static str,
    },
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid {limit} limit {value} for cgroup {path}: {reason}")]
    InvalidLimit {
        path: String,
        limit: &'static str,
        value: String,
        reason: String,
    },
    #[error("no usable cgroup filesystem: {0}")]
    NoCgroupFs(String),
    #[error("the {controller} cgroup controller is not available: {detail}")]
    MissingController {
        controller: &'static str,
        detail: String,
    },
    #[error("cgroup {path} already exists")]
    AlreadyExists { path: String },
    #[error("cannot set the device policy of cgroup {path}: {detail}")]
    Devices { path: String, detail: String },
    #[error("cannot create cgroup {path}: {detail}")]
    Create { path: String, detail: String },
    #[error("cannot set {limit} limit {value} on cgroup {path}: {detail}")]
    SetLimit {
        path: String,
        limit: &'static str,
        value: String,
        detail: String,
    },
    #[error("invalid pid {pid} for cgroup {path}")]
    InvalidPid { path: String, pid: i32 },
    #[error("cannot move process {pid} into cgroup {path}: {detail}")]
    AddProcess {
        path: String,
        pid: i32,
        detail: String,
    },
    #[error("cannot read {}: {}", .file.display(), lower(.source))]
    Read {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse {}: {detail}", .file.display())]
    Parse { file: PathBuf, detail: String },
    #[error("cannot kill the processes of cgroup {path}: {detail}")]
    Kill { path: String, detail: String },
    #[error("cgroup {path} still holds processes {pids:?} after {waited:?}")]
    KillTimeout {
        path: String,
        pids: Vec<i32>,
        waited: Duration,
    },
    #[error("cannot delete cgroup {path}: it still holds processes {pids:?}")]
    NotEmpty { path: String, pids: Vec<i32> },
    #[error("cannot delete cgroup {path}: {detail}")]
    Delete { path: String, detail: String },
}

/// An io::Error as a lower-case message ("invalid argument (os error 22)").
pub(crate) fn lower(e: &io::Error) -> String {
    let s = e.to_string();
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => s,
    }
}

/// One path component of a parent or a name: `[A-Za-z0-9_.-]`, starting with a letter or
/// digit, at most 128 bytes, and not the name of a cgroupfs control file (`tasks`,
/// `cgroup.procs`, `memory.max`, ...), which a directory could not be created over.
fn check_component(c: &str) -> Result<(), &'static str> {
    if c.is_empty() {
        return Err("empty path component");
    }
    if c == "." || c == ".." {
        return Err("\".\" and \"..\" are not allowed");
    }
    if c.len() > 128 {
        return Err("component longer than 128 bytes");
    }
    if !c
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err("only ASCII letters, digits, '_', '-' and '.' are allowed");
    }
    if !c.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("must start with a letter or a digit");
    }
    const CONTROL_FILES: [&str; 4] = ["tasks", "notify_on_release", "release_agent", "cgroup"];
    const FILE_PREFIXES: [&str; 16] = [
        "cgroup",
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "pids",
        "freezer",
        "devices",
        "blkio",
        "io",
        "hugetlb",
        "rdma",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
    ];
    if CONTROL_FILES.contains(&c) {
        return Err("clashes with a cgroupfs control file");
    }
    if let Some((prefix, _)) = c.split_once('.')
        && FILE_PREFIXES.contains(&prefix)
    {
        return Err("clashes with a cgroupfs control file");
    }
    Ok(())
}

fn validate_parent(parent: &str) -> Result<(), CgroupError> {
    let invalid = |reason| CgroupError::InvalidParent {
        parent: parent.to_string(),
        reason,
    };
    if parent.is_empty() {
        return Err(invalid("empty"));
    }
    if parent.starts_with('/') {
        return Err(invalid(
            "must be relative to the hierarchy root (no leading '/')",
        ));
    }
    parent
        .split('/')
        .try_for_each(check_component)
        .map_err(invalid)
}

fn validate_name(name: &str) -> Result<(), CgroupError> {
    let invalid = |reason| CgroupError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.contains('/') {
        return Err(invalid("must be a single path component"));
    }
    check_component(name).map_err(invalid)
}

/// Limits turned into the values written to the kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct KernelLimits {
    /// CFS quota in microseconds per [`CPU_PERIOD_US`].
    pub cpu_quota_us: Option<i64>,
    pub memory: Option<i64>,
    pub pids: Option<i64>,
}

/// Checks limits before anything is created; `path` names the cgroup in the error.
pub(crate) fn validate_limits(path: &str, limits: &Limits) -> Result<KernelLimits, CgroupError> {
    let invalid = |limit: &'static str, value: String, reason: String| CgroupError::InvalidLimit {
        path: path.to_string(),
        limit,
        value,
        reason,
    };
    let cpu_quota_us = match limits.cpu {
        None => None,
        Some(cpu) => {
            if !cpu.is_finite() {
                return Err(invalid(
                    "cpu",
                    cpu.to_string(),
                    "not a finite number".into(),
                ));
            }
            if cpu < MIN_CPU {
                return Err(invalid(
                    "cpu",
                    cpu.to_string(),
                    format!("below the minimum of {MIN_CPU} cores"),
                ));
            }
            let quota = (cpu * CPU_PERIOD_US as f64).round();
            if quota >= i64::MAX as f64 {
                return Err(invalid("cpu", cpu.to_string(), "too large".into()));
            }
            Some(quota as i64)
        }
    };
    let memory = match limits.memory {
        None => None,
        Some(m) if m < MIN_MEMORY => {
            return Err(invalid(
                "memory",
                format!("{m} bytes"),
                format!("below the minimum of {MIN_MEMORY} bytes"),
            ));
        }
        Some(m) => Some(i64::try_from(m).map_err(|_| {
            invalid(
                "memory",
                format!("{m} bytes"),
                format!("above the maximum of {} bytes", i64::MAX),
            )
        })?),
    };
    let pids = match limits.pids {
        None => None,
        Some(0) => {
            return Err(invalid(
                "pids",
                "0".into(),
                "at least 1 is needed to run anything".into(),
            ));
        }
        Some(p) => Some(i64::try_from(p).map_err(|_| {
            invalid(
                "pids",
                p.to_string(),
                format!("above the maximum of {}", i64::MAX),
            )
        })?),
    };
    Ok(KernelLimits {
        cpu_quota_us,
        memory,
        pids,
    })
}

/// The value of `key` in a flat-keyed cgroup file ("key value" per line), e.g. `oom_kill` in
/// `memory.events` or `memory.oom_control`, `usage_usec` in `cpu.stat`.
pub(crate) fn keyed_value(content: &str, key: &str) -> Option<Result<u64, String>> {
    content.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        (it.next() == Some(key)).then(|| match it.next() {
            Some(v) => v
                .parse::<u64>()
                .map_err(|e| format!("{key} value {v:?}: {e}")),
            None => Err(format!("{key} has no value")),
        })
    })
}

/// Reads a cgroup file whole.
pub(crate) fn read_file(file: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(file).map_err(|source| CgroupError::Read {
        file: file.to_path_buf(),
        source,
    })
}

/// Reads a cgroup file holding one unsigned number.
pub(crate) fn read_u64(file: &Path) -> Result<u64, CgroupError> {
    let s = read_file(file)?;
    s.trim().parse().map_err(|e| CgroupError::Parse {
        file: file.to_path_buf(),
        detail: format!("{:?}: {e}", s.trim()),
    })
}

/// Reads `key` from a flat-keyed cgroup file; `Ok(None)` when the key is absent.
pub(crate) fn read_keyed(file: &Path, key: &str) -> Result<Option<u64>, CgroupError> {
    let s = read_file(file)?;
    keyed_value(&s, key)
        .transpose()
        .map_err(|detail| CgroupError::Parse {
            file: file.to_path_buf(),
            detail,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_validated() {
        for ok in ["skiff", "skiff/agent-2", "a.b/c_d", "skiff-test-12-ab"] {
            assert!(validate_parent(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/skiff",
            "skiff/",
            "skiff//x",
            "..",
            "skiff/../etc",
            "./skiff",
            "sk iff",
            "skiff/tasks",
            "skiff/cgroup.procs",
            "memory.max",
            "-x",
        ] {
            let err = validate_parent(bad).expect_err(bad);
            assert!(
                err.to_string().starts_with("invalid cgroup parent"),
                "{err}"
            );
        }
    }

    #[test]
    fn names_are_single_components() {
        assert!(validate_name("web-1.abc").is_ok());
        for bad in ["", "a/b", "..", ".", "cpu.max", "notify_on_release", "é"] {
            let err = validate_name(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let long = "a".repeat(129);
        assert!(validate_name(&long).is_err());
    }

    #[test]
    fn limits_become_kernel_values() {
        let l = Limits {
            cpu: Some(0.5),
            memory: Some(64 << 20),
            pids: Some(64),
        };
        assert_eq!(
            validate_limits("skiff/x", &l).ok(),
            Some(KernelLimits {
                cpu_quota_us: Some(50_000),
                memory: Some(64 << 20),
                pids: Some(64),
            })
        );
        let none = validate_limits("skiff/x", &Limits::default()).ok();
        assert_eq!(
            none,
            Some(KernelLimits {
                cpu_quota_us: None,
                memory: None,
                pids: None
            })
        );
        let tiny = Limits {
            cpu: Some(0.01),
            ..Limits::default()
        };
        assert_eq!(
            validate_limits("p/x", &tiny)
                .ok()
                .and_then(|k| k.cpu_quota_us),
            Some(1000)
        );
    }

    #[test]
    fn impossible_limits_name_the_limit_and_path() {
        let cases: [(Limits, &str); 9] = [
            (
                Limits {
                    cpu: Some(f64::NAN),
                    ..Default::default()
                },
                "cpu",
            ),
            (
                Limits {
                    cpu: Some(-1.0),
                    ..Default::default()
                },
                "cpu",
            ),
            (
                Limits {
                    cpu: Some(0.0),
                    ..Default::default()
                },
                "cpu",
            ),
            (
                Limits {
                    cpu: Some(0.001),
                    ..Default::default()
                },
                "cpu",
            ),
            (
                Limits {
                    cpu: Some(f64::INFINITY),
                    ..Default::default()
                },
                "cpu",
            ),
            (
                Limits {
                    cpu: Some(1e300),
                    ..Default::default()
                },
                "cpu",
            ),
            (
                Limits {
                    memory: Some(1024),
                    ..Default::default()
                },
                "memory",
            ),
            (
                Limits {
                    memory: Some(u64::MAX),
                    ..Default::default()
                },
                "memory",
            ),
            (
                Limits {
                    pids: Some(0),
                    ..Default::default()
                },
                "pids",
            ),
        ];
        for (limits, which) in cases {
            let err = validate_limits("skiff/web-1", &limits).expect_err(which);
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("invalid {which} limit ")), "{msg}");
            assert!(msg.contains("skiff/web-1"), "{msg}");
        }
        let err = validate_limits(
            "p/x",
            &Limits {
                pids: Some(u64::MAX),
                ..Default::default()
            },
        )
        .expect_err("pids u64::MAX");
        assert!(err.to_string().contains("pids"));
    }

    #[test]
    fn keyed_files_parse() {
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(oom_control, "oom_kill"), Some(Ok(3)));
        assert_eq!(keyed_value(oom_control, "oom_kill_disable"), Some(Ok(0)));
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_value(events, "oom_kill"), Some(Ok(1)));
        assert_eq!(keyed_value(events, "oom"), Some(Ok(2)));
        assert_eq!(keyed_value("usage_usec 17\n", "missing"), None);
        assert!(matches!(
            keyed_value("oom_kill x\n", "oom_kill"),
            Some(Err(_))
        ));
        assert!(matches!(
            keyed_value("oom_kill\n", "oom_kill"),
            Some(Err(_))
        ));
    }

    #[test]
    fn io_errors_are_lower_case() {
        let e = io::Error::from_raw_os_error(libc::EINVAL);
        assert!(lower(&e).starts_with("invalid argument"), "{}", lower(&e));
        let err = CgroupError::Read {
            file: PathBuf::from("/sys/fs/cgroup/pids/x/pids.current"),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(
            err.to_string(),
            "cannot read /sys/fs/cgroup/pids/x/pids.current: no such file or directory (os error 2)"
        );
    }
}
