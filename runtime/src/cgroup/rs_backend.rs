//! [`CgroupManager`] and [`Cgroup`] over cgroups-rs 0.5 (`cgroups_rs::fs`).
//!
//! cgroups-rs finds the hierarchies (mountinfo), creates the directories (initialising cpuset
//! cgroups on v1 and enabling controllers down the path on v2), writes the limits, moves
//! processes, freezes and thaws, and removes v1 directories (retrying on EBUSY). Around it:
//! - every step is done per hierarchy, so an error names the directory, and a failed
//!   `create` removes whatever it made (cgroups-rs stops at the first failing hierarchy);
//! - limits go through the controllers' setters, which report errors, not `Cgroup::apply`,
//!   whose memory part drops them;
//! - the cgroup2 directory of a hybrid host is handled here (cgroups-rs ignores it), and so is
//!   removing v2 directories (cgroups-rs neither retries on EBUSY nor accepts a missing one);
//! - `cgroup.procs` and the statistics files are read here, because cgroups-rs turns read
//!   errors into empty lists and zeros.

use std::error::Error as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::freezer::FreezerController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup as RsCgroupHandle, Controller, MaxValue, hierarchies};
use cgroups_rs::{CgroupPid, FreezerState};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, warn};

use super::layout::{Layout, Mode};
use super::{
    CPU_PERIOD_US, Cgroup, CgroupError, CgroupManager, KILL_TIMEOUT, Limits, Stats, lower,
    read_keyed, read_u64, validate_limits, validate_name,
};

/// How long one freeze may take before we signal anyway (a task in uninterruptible sleep
/// keeps a v1 cgroup FREEZING).
const FREEZE_TIMEOUT: Duration = Duration::from_millis(500);
/// Attempts (10 ms, doubling) at removing a cgroup2 directory the kernel reports busy.
const RMDIR_ATTEMPTS: u32 = 6;

/// A cgroups-rs error as a lower-case message: its io cause if it has one.
fn rs_detail(e: &cgroups_rs::fs::error::Error) -> String {
    match e.source().and_then(|s| s.downcast_ref::<io::Error>()) {
        Some(io) => lower(io),
        None => e.kind().to_string(),
    }
}

/// cgroups-rs's view of the host's hierarchies (on v1 the mountinfo it parsed), made once
/// and cloned for each handle: `hierarchies::auto()` reads and parses /proc/self/mountinfo
/// again at every call.
#[derive(Clone, Debug)]
pub(crate) enum Hierarchy {
    V1(hierarchies::V1),
    V2(hierarchies::V2),
}

impl Hierarchy {
    pub(crate) fn detect() -> Hierarchy {
        if hierarchies::is_cgroup2_unified_mode() {
            Hierarchy::V2(hierarchies::V2::new())
        } else {
            Hierarchy::V1(hierarchies::V1::new())
        }
    }

    pub(crate) fn is_v2(&self) -> bool {
        matches!(self, Hierarchy::V2(_))
    }

    fn boxed(&self) -> Box<dyn cgroups_rs::fs::Hierarchy> {
        match self {
            Hierarchy::V1(h) => Box::new(h.clone()),
            Hierarchy::V2(h) => Box::new(h.clone()),
        }
    }
}

pub(crate) struct RsManager {
    parent: String,
    layout: Arc<Layout>,
    hierarchy: Hierarchy,
}

impl RsManager {
    pub(crate) fn new(parent: String, layout: Arc<Layout>, hierarchy: Hierarchy) -> RsManager {
        RsManager {
            parent,
            layout,
            hierarchy,
        }
    }

    /// A handle on `<parent>/<name>`, which may not exist yet.
    fn handle(&self, name: &str) -> RsCgroup {
        let rel = format!("{}/{}", self.parent, name);
        let cg = RsCgroupHandle::load_with_specified_controllers(
            self.hierarchy.boxed(),
            &rel,
            self.layout.controllers.clone(),
        );
        let unified = match self.layout.mode {
            Mode::Hybrid => self.layout.unified.as_ref().map(|u| u.join(&rel)),
            Mode::V1 | Mode::V2 => None,
        };
        RsCgroup {
            name: name.to_string(),
            rel,
            cg,
            unified,
            mode: self.layout.mode,
            use_cgroup_kill: true,
        }
    }

    /// The parent's directory in every hierarchy.
    fn parent_dirs(&self) -> Vec<PathBuf> {
        let cg = RsCgroupHandle::load_with_specified_controllers(
            self.hierarchy.boxed(),
            &self.parent,
            self.layout.controllers.clone(),
        );
        let mut dirs = subsystem_dirs(&cg);
        if self.layout.mode == Mode::Hybrid
            && let Some(u) = &self.layout.unified
        {
            dirs.push(u.join(&self.parent));
        }
        dirs
    }
}

impl CgroupManager for RsManager {
    fn create(&self, name: &str, limits: &Limits) -> Result<Box<dyn Cgroup>, CgroupError> {
        validate_name(name)?;
        let cg = self.handle(name);
        let kernel = validate_limits(&cg.rel, limits)?;
        if cg.dirs().iter().any(|d| d.exists()) {
            return Err(CgroupError::AlreadyExists { path: cg.rel });
        }
        if let Err(e) = cg
            .create_dirs()
            .and_then(|()| cg.apply_limits(limits, &kernel))
        {
            if let Err(cleanup) = cg.remove_dirs() {
                warn!(cgroup = %cg.rel, error = %cleanup, "cannot remove a half-created cgroup");
            }
            return Err(e);
        }
        debug!(cgroup = %cg.rel, mode = self.mode(), ?limits, "cgroup created");
        Ok(Box::new(cg))
    }

    fn open(&self, name: &str) -> Result<Option<Box<dyn Cgroup>>, CgroupError> {
        validate_name(name)?;
        let cg = self.handle(name);
        if cg.dirs().iter().any(|d| d.is_dir()) {
            Ok(Some(Box::new(cg)))
        } else {
            Ok(None)
        }
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = Vec::new();
        for dir in self.parent_dirs() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(CgroupError::Read { file: dir, source }),
            };
            for entry in entries {
                let entry = entry.map_err(|source| CgroupError::Read {
                    file: dir.clone(),
                    source,
                })?;
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if let (true, Some(name)) = (is_dir, entry.file_name().to_str()) {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn mode(&self) -> &'static str {
        self.layout.mode.as_str()
    }
}

/// The distinct directories of a cgroups-rs handle's subsystems, in its order (co-mounted v1
/// controllers and all v2 controllers share one).
fn subsystem_dirs(cg: &RsCgroupHandle) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for s in cg.subsystems() {
        let p = s.to_controller().path();
        if !dirs.iter().any(|d| d == p) {
            dirs.push(p.to_path_buf());
        }
    }
    dirs
}

pub(crate) struct RsCgroup {
    name: String,
    /// `<parent>/<name>`, relative to every hierarchy root.
    rel: String,
    cg: RsCgroupHandle,
    /// The directory in a hybrid host's cgroup2 hierarchy.
    unified: Option<PathBuf>,
    mode: Mode,
    /// Whether `kill_all` starts with `cgroup.kill` where it exists (false in a test, to
    /// exercise the freezer path).
    use_cgroup_kill: bool,
}

impl RsCgroup {
    fn v2(&self) -> bool {
        self.mode == Mode::V2
    }

    /// Every directory of this cgroup, deduplicated.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs = subsystem_dirs(&self.cg);
        dirs.extend(self.unified.iter().cloned());
        dirs
    }

    /// The v2 directory (all controllers share it), or the first v1 one.
    fn main_dir(&self) -> PathBuf {
        subsystem_dirs(&self.cg)
            .into_iter()
            .next()
            .unwrap_or_else(|| PathBuf::from(&self.rel))
    }

    fn controller<'a, T>(&'a self, name: &'static str) -> Result<&'a T, CgroupError>
    where
        &'a T: From<&'a cgroups_rs::fs::Subsystem>,
        T: Controller + cgroups_rs::fs::ControllIdentifier,
    {
        self.cg
            .controller_of::<T>()
            .ok_or_else(|| CgroupError::MissingController {
                controller: name,
                detail: format!("cgroup {} has no {name} hierarchy", self.rel),
            })
    }

    fn create_dirs(&self) -> Result<(), CgroupError> {
        if self.v2() {
            // Creates the path and enables our controllers in each ancestor's subtree_control.
            self.cg.create().map_err(|e| CgroupError::Create {
                path: self.main_dir().display().to_string(),
                detail: rs_detail(&e),
            })?;
        } else {
            for s in self.cg.subsystems() {
                let c = s.to_controller();
                c.create().map_err(|e| CgroupError::Create {
                    path: c.path().display().to_string(),
                    detail: rs_detail(&e),
                })?;
            }
        }
        if let Some(u) = &self.unified {
            std::fs::create_dir_all(u).map_err(|e| CgroupError::Create {
                path: u.display().to_string(),
                detail: lower(&e),
            })?;
        }
        Ok(())
    }

    fn apply_limits(
        &self,
        limits: &Limits,
        kernel: &super::KernelLimits,
    ) -> Result<(), CgroupError> {
        let set_error =
            |c: &dyn Controller,
             limit: &'static str,
             value: String,
             e: &cgroups_rs::fs::error::Error| CgroupError::SetLimit {
                path: c.path().display().to_string(),
                limit,
                value,
                detail: rs_detail(e),
            };
        if let (Some(quota), Some(cores)) = (kernel.cpu_quota_us, limits.cpu) {
            let cpu: &CpuController = self.controller("cpu")?;
            let res = if self.v2() {
                cpu.set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US))
            } else {
                cpu.set_cfs_period(CPU_PERIOD_US)
                    .and_then(|()| cpu.set_cfs_quota(quota))
            };
            res.map_err(|e| {
                let value = format!("{cores} cores (quota {quota} us per {CPU_PERIOD_US} us)");
                set_error(cpu, "cpu", value, &e)
            })?;
        }
        if let Some(bytes) = kernel.memory {
            let mem: &MemController = self.controller("memory")?;
            mem.set_limit(bytes)
                .map_err(|e| set_error(mem, "memory", format!("{bytes} bytes"), &e))?;
            // Memory+swap (v1) must not be below the memory limit, so it goes second.
            let (swap_file, swap_value) = if self.v2() {
                ("memory.swap.max", 0)
            } else {
                ("memory.memsw.limit_in_bytes", bytes)
            };
            if mem.path().join(swap_file).exists() {
                mem.set_memswap_limit(swap_value).map_err(|e| {
                    set_error(mem, "memory", format!("{swap_file} {swap_value} bytes"), &e)
                })?;
            }
        }
        if let Some(max) = kernel.pids {
            let pids: &PidController = self.controller("pids")?;
            pids.set_pid_max(MaxValue::Value(max))
                .map_err(|e| set_error(pids, "pids", max.to_string(), &e))?;
        }
        Ok(())
    }

    /// Removes every directory; missing ones are fine.
    fn remove_dirs(&self) -> Result<(), CgroupError> {
        let mut first_error = None;
        let mut record = |e: CgroupError| {
            warn!(cgroup = %self.rel, error = %e, "cannot remove a cgroup directory");
            first_error.get_or_insert(e);
        };
        if self.v2() {
            if let Err(e) = rmdir_retry(&self.main_dir()) {
                record(e);
            }
        } else {
            // cgroups-rs: Ok if absent, retries 5 times (10..80 ms) on EBUSY.
            for s in self.cg.subsystems() {
                let c = s.to_controller();
                if let Err(e) = c.delete() {
                    record(CgroupError::Delete {
                        path: c.path().display().to_string(),
                        detail: rs_detail(&e),
                    });
                }
            }
        }
        if let Some(u) = &self.unified
            && let Err(e) = rmdir_retry(u)
        {
            record(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The `cgroup.kill` file of our cgroup2 directory, if the kernel has it (5.14+).
    fn kill_file(&self) -> Option<PathBuf> {
        let dir = if !self.use_cgroup_kill {
            None
        } else if self.v2() {
            Some(self.main_dir())
        } else {
            self.unified.clone()
        };
        dir.map(|d| d.join("cgroup.kill")).filter(|f| f.exists())
    }

    /// Freezes (v1 freezer, or v2 cgroup.freeze), SIGKILLs every listed process, thaws.
    fn freeze_and_kill(&self) -> Result<(), CgroupError> {
        let freezer = if self.v2() {
            let dir = self.main_dir();
            dir.join("cgroup.freeze")
                .exists()
                .then(|| FreezerController::new(dir, PathBuf::new(), true))
        } else {
            self.cg.controller_of::<FreezerController>().cloned()
        };
        let frozen = match &freezer {
            Some(f) => match f.freeze() {
                Ok(()) => {
                    self.wait_frozen(f);
                    true
                }
                Err(e) => {
                    let error = rs_detail(&e);
                    warn!(cgroup = %self.rel, %error, "cannot freeze; killing unfrozen");
                    false
                }
            },
            None => false,
        };
        let killed = self.processes().and_then(|pids| {
            pids.into_iter()
                .try_for_each(|pid| match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                    Ok(()) | Err(Errno::ESRCH) => Ok(()),
                    Err(e) => Err(CgroupError::Kill {
                        path: self.rel.clone(),
                        detail: format!("kill {pid}: {}", e.desc().to_lowercase()),
                    }),
                })
        });
        if let (true, Some(f)) = (frozen, &freezer)
            && let Err(e) = f.thaw()
        {
            return Err(CgroupError::Kill {
                path: f.path().display().to_string(),
                detail: format!("cannot thaw: {}", rs_detail(&e)),
            });
        }
        killed
    }

    fn wait_frozen(&self, f: &FreezerController) {
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        while Instant::now() < deadline {
            let frozen = if self.v2() {
                read_keyed(&f.path().join("cgroup.events"), "frozen")
                    .ok()
                    .flatten()
                    == Some(1)
            } else {
                matches!(f.state(), Ok(FreezerState::Frozen))
            };
            if frozen {
                return;
            }
            sleep(Duration::from_millis(2));
        }
        debug!(cgroup = %self.rel, "freeze did not complete; killing anyway");
    }

    /// Waits up to `max` for the cgroup to empty; returns what is left.
    fn wait_empty(&self, max: Duration) -> Result<Vec<i32>, CgroupError> {
        let deadline = Instant::now() + max;
        let mut pause = Duration::from_millis(1);
        loop {
            let pids = self.processes()?;
            if pids.is_empty() || Instant::now() >= deadline {
                return Ok(pids);
            }
            sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

/// Removes a cgroup directory; absent is fine, busy is retried.
fn rmdir_retry(dir: &Path) -> Result<(), CgroupError> {
    let mut pause = Duration::from_millis(10);
    for attempt in 1..=RMDIR_ATTEMPTS {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < RMDIR_ATTEMPTS => {
                sleep(pause);
                pause *= 2;
            }
            Err(e) => {
                return Err(CgroupError::Delete {
                    path: dir.display().to_string(),
                    detail: lower(&e),
                });
            }
        }
    }
    Ok(())
}

impl Cgroup for RsCgroup {
    fn name(&self) -> &str {
        &self.name
    }

    fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        if pid <= 0 {
            // 0 would move the writer itself.
            return Err(CgroupError::InvalidPid {
                path: self.rel.clone(),
                pid,
            });
        }
        let tgid = CgroupPid::from(pid as u64);
        let mut done: Vec<&Path> = Vec::new();
        for s in self.cg.subsystems() {
            let c = s.to_controller();
            if done.contains(&c.path()) {
                continue;
            }
            c.add_task_by_tgid(&tgid)
                .map_err(|e| CgroupError::AddProcess {
                    path: c.path().display().to_string(),
                    pid,
                    detail: rs_detail(&e),
                })?;
            done.push(c.path());
        }
        if let Some(u) = &self.unified {
            std::fs::write(u.join("cgroup.procs"), pid.to_string()).map_err(|e| {
                CgroupError::AddProcess {
                    path: u.display().to_string(),
                    pid,
                    detail: lower(&e),
                }
            })?;
        }
        Ok(())
    }

    fn join_handles(&self) -> Result<super::JoinHandles, CgroupError> {
        use std::os::unix::fs::OpenOptionsExt;
        let failed = |path: &Path, e: &io::Error| CgroupError::AddProcess {
            path: path.display().to_string(),
            pid: 0,
            detail: lower(e),
        };
        let open_dir = |dir: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open(dir)
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| failed(dir, &e))
        };
        if self.v2() {
            return Ok(super::JoinHandles {
                v2_dir: Some(open_dir(&self.main_dir())?),
                v1_tasks: Vec::new(),
            });
        }
        let mut v1_tasks = Vec::new();
        for dir in subsystem_dirs(&self.cg) {
            let tasks = dir.join("tasks");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&tasks)
                .map_err(|e| failed(&tasks, &e))?;
            v1_tasks.push((tasks, f));
        }
        let v2_dir = match &self.unified {
            Some(u) => Some(open_dir(u)?),
            None => None,
        };
        Ok(super::JoinHandles { v2_dir, v1_tasks })
    }

    fn processes(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = Vec::new();
        for dir in self.dirs() {
            let file = dir.join("cgroup.procs");
            let content = match std::fs::read_to_string(&file) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(CgroupError::Read { file, source }),
            };
            for line in content.lines().filter(|l| !l.trim().is_empty()) {
                let pid = line.trim().parse::<i32>().map_err(|e| CgroupError::Parse {
                    file: file.clone(),
                    detail: format!("{line:?}: {e}"),
                })?;
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        let start = Instant::now();
        let mut kill_file = self.kill_file();
        loop {
            let left = self.wait_empty(Duration::ZERO)?;
            if left.is_empty() {
                debug!(cgroup = %self.rel, elapsed = ?start.elapsed(), "cgroup emptied");
                return Ok(());
            }
            if start.elapsed() >= KILL_TIMEOUT {
                return Err(CgroupError::KillTimeout {
                    path: self.rel.clone(),
                    pids: left,
                    waited: KILL_TIMEOUT,
                });
            }
            // cgroup.kill first (atomic, catches forks); if something survives it (a process
            // that joined only some hierarchies), freeze and kill what is listed.
            let via_kill_file = kill_file.take().is_some_and(|file| {
                match std::fs::write(&file, "1") {
                    Ok(()) => true,
                    Err(e) => {
                        let error = lower(&e);
                        warn!(cgroup = %self.rel, %error, "cgroup.kill failed; freezing instead");
                        false
                    }
                }
            });
            if !via_kill_file {
                self.freeze_and_kill()?;
            }
            let remaining = KILL_TIMEOUT.saturating_sub(start.elapsed());
            self.wait_empty(remaining.min(Duration::from_millis(250)))?;
        }
    }

    fn oom_kills(&self) -> Result<u64, CgroupError> {
        let mem: &MemController = self.controller("memory")?;
        let mem_dir = mem.path();
        if self.v2() {
            return Ok(read_keyed(&mem_dir.join("memory.events"), "oom_kill")?.unwrap_or(0));
        }
        v1_oom_kills(mem_dir)
    }

    fn stats(&self) -> Result<Stats, CgroupError> {
        let mem: &MemController = self.controller("memory")?;
        let mem_dir = mem.path();
        let pids: &PidController = self.controller("pids")?;
        let (memory_bytes, cpu_usage_ns, oom_kills) = if self.v2() {
            let cpu: &CpuController = self.controller("cpu")?;
            let stat = cpu.path().join("cpu.stat");
            let usage_us = read_keyed(&stat, "usage_usec")?.unwrap_or(0);
            (
                read_u64(&mem_dir.join("memory.current"))?,
                usage_us.saturating_mul(1000),
                read_keyed(&mem_dir.join("memory.events"), "oom_kill")?.unwrap_or(0),
            )
        } else {
            let cpu_ns = match self.cg.controller_of::<CpuAcctController>() {
                Some(acct) => read_u64(&acct.path().join("cpuacct.usage"))?,
                None => 0,
            };
            (
                read_u64(&mem_dir.join("memory.usage_in_bytes"))?,
                cpu_ns,
                v1_oom_kills(mem_dir)?,
            )
        };
        Ok(Stats {
            memory_bytes,
            cpu_usage_ns,
            pids: read_u64(&pids.path().join("pids.current"))?,
            oom_kills,
        })
    }

    fn delete(&self) -> Result<(), CgroupError> {
        let pids = self.processes()?;
        if !pids.is_empty() {
            return Err(CgroupError::NotEmpty {
                path: self.rel.clone(),
                pids,
            });
        }
        self.remove_dirs()?;
        debug!(cgroup = %self.rel, "cgroup deleted");
        Ok(())
    }

    fn set_devices(&self, rules: &[crate::devices::DeviceRule]) -> Result<(), CgroupError> {
        let err = |path: &Path, detail: String| CgroupError::Devices {
            path: path.display().to_string(),
            detail,
        };
        let mut enforced = false;
        if !self.v2()
            && let Some(dc) = self
                .cg
                .controller_of::<cgroups_rs::fs::devices::DevicesController>()
        {
            let dir = dc.path().to_path_buf();
            // Empty the list first (only possible while the cgroup has no children), then
            // one rule per write: the kernel takes one line per write.
            std::fs::write(dir.join("devices.deny"), "a")
                .map_err(|e| err(&dir, format!("devices.deny a: {}", lower(&e))))?;
            for r in rules {
                let line = r.v1_line();
                std::fs::write(dir.join("devices.allow"), &line)
                    .map_err(|e| err(&dir, format!("devices.allow {line}: {}", lower(&e))))?;
            }
            enforced = true;
        }
        let v2_dir = if self.v2() {
            Some(self.main_dir())
        } else {
            self.unified.clone()
        };
        if let Some(dir) = v2_dir {
            let program = crate::devices::device_program(rules);
            crate::sys::attach_device_program(&dir, &program).map_err(|e| err(&dir, lower(&e)))?;
            enforced = true;
        }
        if !enforced {
            return Err(CgroupError::MissingController {
                controller: "devices",
                detail: format!(
                    "cgroup {} has neither a v1 devices hierarchy nor cgroup2: the device \
                     policy cannot be enforced",
                    self.rel
                ),
            });
        }
        Ok(())
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.dirs()
    }
}

/// A v1 memory cgroup's OOM kills: `oom_kill` in memory.oom_control (Linux 4.13 and later);
/// before, failcnt (times the limit was hit) is the closest figure.
fn v1_oom_kills(mem_dir: &Path) -> Result<u64, CgroupError> {
    match read_keyed(&mem_dir.join("memory.oom_control"), "oom_kill")? {
        Some(n) => Ok(n),
        None => read_u64(&mem_dir.join("memory.failcnt")),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    use super::*;

    /// Removes the test parent in every hierarchy, also when the test fails.
    struct ParentGuard(Vec<PathBuf>);

    impl Drop for ParentGuard {
        fn drop(&mut self) {
            for dir in &self.0 {
                if let Ok(entries) = std::fs::read_dir(dir) {
                    for e in entries.flatten().filter(|e| e.path().is_dir()) {
                        let procs = std::fs::read_to_string(e.path().join("cgroup.procs"));
                        for pid in procs.unwrap_or_default().lines() {
                            if let Ok(pid) = pid.trim().parse::<i32>() {
                                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                            }
                        }
                        let _ = std::fs::write(e.path().join("freezer.state"), "THAWED");
                        let _ = rmdir_retry(&e.path());
                    }
                }
                let _ = rmdir_retry(dir);
            }
        }
    }

    /// Root only: kill_all's freeze, SIGKILL, thaw path, which a kernel with cgroup.kill
    /// never takes otherwise, against a shell that keeps forking.
    #[test]
    fn freezer_path_kills_a_forking_tree() {
        if !skiff_testkit::require(&[skiff_testkit::Need::Root, skiff_testkit::Need::Cgroupfs]) {
            return;
        }
        let hierarchy = Hierarchy::detect();
        let layout = Layout::detect(hierarchy.is_v2()).expect("cgroup layout of this host");
        let parent = format!(
            "skiff-unit-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mgr = RsManager::new(parent, Arc::new(layout), hierarchy);
        let _guard = ParentGuard(mgr.parent_dirs());
        let mut cg = mgr.handle("freeze");
        cg.use_cgroup_kill = false;
        assert_eq!(cg.kill_file(), None);
        cg.create_dirs().expect("create");

        let mut child = Command::new("sh")
            .args([
                "-c",
                "read x && { sleep 60 & while :; do sleep 0.01; done; }",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh");
        cg.add_process(child.id() as i32).expect("add");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("release");
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(5);
        while cg.processes().expect("procs").len() < 3 && Instant::now() < deadline {
            sleep(Duration::from_millis(10));
        }
        assert!(cg.processes().expect("procs").len() >= 3);

        cg.kill_all().expect("kill_all");
        assert_eq!(cg.processes().expect("procs"), Vec::<i32>::new());
        assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));
        if let Some(f) = cg.cg.controller_of::<FreezerController>() {
            assert!(matches!(f.state(), Ok(FreezerState::Thawed)), "left frozen");
        }
        cg.delete().expect("delete");
        assert!(cg.dirs().iter().all(|d| !d.exists()));
    }
}
