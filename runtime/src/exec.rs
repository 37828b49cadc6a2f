//! `exec` into a running container: a new process in the container's namespaces and cgroup,
//! with the container's user, capabilities, no_new_privs and seccomp filter.
//!
//! Called from a single-threaded process (the CLI, or later the agent's re-exec'd helper): it
//! forks, and the child runs set-up code before exec. The host binary is never exposed to the
//! container (CVE-2019-5736): this process joins only the container's pid namespace *for its
//! children* (`setns(CLONE_NEWPID)` does not move the caller), so it is never visible inside;
//! the child, which is visible from the moment it is forked, is made non-dumpable first, so no
//! process in the container (which lacks CAP_SYS_PTRACE) can open its `/proc/PID/exe` or
//! ptrace it until it has exec'd the container's own program.

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use nix::sched::{CloneFlags, setns};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::pipe2;

use super::cgroup;
use super::security;
use super::store::{ContainerConfig, Status, Store, monitor_alive};
use super::sys;

/// Why an exec failed, naming the container.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("exec in {id}: {reason}")]
    Setup { id: String, reason: String },
}

/// Runs `args` inside running container `id` with the caller's stdio; returns its exit status
/// (128 + signal when killed).
pub fn exec(
    store: &Store,
    id: &str,
    args: &[String],
    extra_env: &[String],
) -> Result<i32, ExecError> {
    let config = store.config(id)?;
    let state = store.state_of(&config)?;
    let pid = match (state.status, state.pid) {
        (Status::Running, Some(pid)) if monitor_alive(&state) => pid,
        _ => return Err(ExecError::NotRunning(id.to_string())),
    };
    let setup = |reason: String| ExecError::Setup {
        id: id.to_string(),
        reason,
    };
    // Everything is opened before any namespace changes, while host paths still resolve.
    let mut ns = Vec::new();
    for (name, flag) in [
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let f = std::fs::File::open(format!("/proc/{pid}/ns/{name}"))
            .map_err(|e| setup(format!("open {name} namespace: {e}")))?;
        ns.push((OwnedFd::from(f), flag, name));
    }
    let pidns = std::fs::File::open(format!("/proc/{pid}/ns/pid"))
        .map_err(|e| setup(format!("open pid namespace: {e}")))?;
    let manager = cgroup::host(&config.cgroup_parent).map_err(|e| setup(e.to_string()))?;
    let cg = manager
        .open(id)
        .map_err(|e| setup(e.to_string()))?
        .ok_or_else(|| setup("container cgroup is gone".into()))?;
    let seccomp = security::default_seccomp().map_err(|e| setup(e.to_string()))?;
    let mut env = config.env.clone();
    env.extend(extra_env.iter().cloned());

    sys::set_non_dumpable().map_err(|e| setup(format!("set non-dumpable: {e}")))?;
    setns(&pidns, CloneFlags::CLONE_NEWPID)
        .map_err(|e| setup(format!("join pid namespace: {e}")))?;
    let join = cg.join_handles().map_err(|e| setup(e.to_string()))?;
    let (err_read, err_write) =
        pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| setup(format!("pipe: {e}")))?;
    let err_write = std::fs::File::from(err_write);
    // The child is never moved into the container's cgroup by another process (a write to
    // cgroup.procs waits an RCU grace period, 10-20 ms): it is created in the cgroup2 directory
    // (CLONE_INTO_CGROUP) and joins each v1 hierarchy itself, as a container's first process
    // does (see `monitor`). A kernel that cannot clone into a cgroup gets the move.
    let joined = Cell::new(true);
    let mut body = || -> isize {
        let tasks = joined.get().then_some(join.v1_tasks.as_slice());
        let reason = child_setup(&config, &ns, cg.as_ref(), tasks, &seccomp, args, &env);
        let _ = (&err_write).write_all(reason.as_bytes());
        127
    };
    // The caller is single-threaded (see the module docs), so the child may run ordinary code
    // until it execs.
    let spawned = match join.v2_dir.as_ref() {
        Some(dir) => {
            match sys::clone_child_into_cgroup(
                CloneFlags::empty(),
                dir.as_fd(),
                Box::new(&mut body),
            ) {
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    joined.set(false);
                    sys::clone_child(CloneFlags::empty(), Box::new(&mut body))
                }
                other => other,
            }
        }
        None => sys::clone_child(CloneFlags::empty(), Box::new(&mut body)),
    };
    let child = spawned.map_err(|e| setup(format!("clone: {e}")))?;
    drop(err_write);
    let mut msg = String::new();
    let _ = std::fs::File::from(err_read).read_to_string(&mut msg);
    let status = loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(setup(format!("wait: {e}"))),
        }
    };
    if !msg.is_empty() {
        return Err(setup(msg));
    }
    Ok(status)
}

/// In the child: joins the cgroup (`tasks`: the v1 hierarchies' `tasks` files to write
/// itself into, the cgroup2 one being where it was created; `None`: move itself everywhere),
/// the namespaces, then execs. Returns why it could not.
fn child_setup(
    config: &ContainerConfig,
    ns: &[(OwnedFd, CloneFlags, &str)],
    cg: &dyn cgroup::Cgroup,
    tasks: Option<&[(PathBuf, std::fs::File)]>,
    seccomp: &security::SeccompProgram,
    args: &[String],
    env: &[String],
) -> String {
    match tasks {
        Some(tasks) => {
            for (path, f) in tasks {
                if let Err(e) = (&*f).write_all(b"0") {
                    return format!("join cgroup {}: {e}", path.display());
                }
            }
        }
        None => {
            if let Err(e) = cg.add_process(std::process::id() as i32) {
                return format!("join cgroup: {e}");
            }
        }
    }
    for (fd, flag, name) in ns {
        if let Err(e) = setns(fd, *flag) {
            return format!("join {name} namespace: {e}");
        }
    }
    crate::workload::exec(&crate::workload::Workload {
        user: &config.user,
        cwd: &config.cwd,
        create_cwd: false,
        args,
        env,
        seccomp,
        init: false,
    })
}
