//! Becoming the workload: the last steps of a container's first process and of every `exec`
//! into it, written once. Runs in a single-threaded child, inside the container's namespaces
//! (after `pivot_root` for the first process, after `setns` for an exec), and never returns on
//! success.
//!
//! Order: user resolved against the container's own `/etc/passwd` and `/etc/group` → working
//! dir → program looked up in the container's `PATH` → arguments and environment checked →
//! capabilities cut to Docker's default set → `no_new_privs` → supplementary groups, gid, uid
//! (also for root: the host's supplementary groups never reach the workload) → seccomp →
//! every fd ≥ 3 close-on-exec → with `init`, fork (the parent becomes [`crate::reaper`]) →
//! `execve`.

use std::ffi::CString;
use std::path::Path;

use nix::unistd::{Gid, Uid};

use crate::security::{self, SeccompProgram};
use crate::sys;

/// Who to become and what to run.
pub struct Workload<'a> {
    /// `user[:group]`, a name or a number; empty: root.
    pub user: &'a str,
    /// The working dir; empty: `/`.
    pub cwd: &'a str,
    /// Create the working dir when it is missing (as `docker run -w` does; an exec does not).
    pub create_cwd: bool,
    /// The program and its arguments; the program is looked up in `PATH` from `env`.
    pub args: &'a [String],
    /// `KEY=VALUE` entries.
    pub env: &'a [String],
    /// The filter installed last before `execve`.
    pub seccomp: &'a SeccompProgram,
    /// Fork first: the parent stays as PID 1, reaping orphans and forwarding signals (as
    /// `docker run --init`), with the same user, capabilities and filter as the workload.
    pub init: bool,
}

/// Becomes the workload and execs it. Returns only on failure, with the reason naming the
/// step that failed.
pub fn exec(w: &Workload<'_>) -> String {
    match become_and_exec(w) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn ctx<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn become_and_exec(w: &Workload<'_>) -> Result<Never, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let (uid, gid, groups) = ctx(
        &format!("user {:?}", w.user),
        security::resolve_user(w.user, &passwd, &group),
    )?;
    let cwd = if w.cwd.is_empty() { "/" } else { w.cwd };
    if w.create_cwd {
        ctx(&format!("working dir {cwd}"), std::fs::create_dir_all(cwd))?;
    }
    ctx(&format!("working dir {cwd}"), nix::unistd::chdir(cwd))?;

    let program = resolve_program(w.args, w.env)?;
    let argv = cstrings(w.args, "argument")?;
    let envp = cstrings(w.env, "environment")?;

    ctx(
        "capabilities",
        security::drop_capabilities(&security::default_capabilities()),
    )?;
    ctx("no_new_privs", security::set_no_new_privs())?;
    let gids: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    ctx("setgroups", nix::unistd::setgroups(&gids))?;
    ctx("setgid", nix::unistd::setgid(Gid::from_raw(gid)))?;
    ctx("setuid", nix::unistd::setuid(Uid::from_raw(uid)))?;
    ctx("seccomp", security::install_seccomp(w.seccomp))?;
    ctx("close descriptors", sys::cloexec_from(3))?;
    if w.init {
        match ctx("fork the workload", sys::fork_single_threaded())? {
            nix::unistd::ForkResult::Child => {}
            nix::unistd::ForkResult::Parent { child } => {
                // Whoever waits for our exec to close the error pipe is not kept waiting.
                let _ = sys::close_from(3);
                crate::reaper::run(child);
            }
        }
    }
    let e = nix::unistd::execve(&program, &argv, &envp)
        .err()
        .map(|e| e.desc())
        .unwrap_or("failed");
    Err(format!(
        "exec {}: {e}",
        w.args.first().map(String::as_str).unwrap_or("")
    ))
}

fn cstrings(items: &[String], what: &str) -> Result<Vec<CString>, String> {
    items
        .iter()
        .map(|a| CString::new(a.as_str()).map_err(|_| format!("{what} {a:?} contains NUL")))
        .collect()
}

/// Finds the program like execvp, in the container's `PATH`.
pub fn resolve_program(args: &[String], env: &[String]) -> Result<CString, String> {
    let Some(prog) = args.first() else {
        return Err("no command: the image has no entrypoint or cmd and none was given".into());
    };
    if prog.contains('/') {
        return CString::new(prog.as_str()).map_err(|_| "command contains NUL".into());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(prog);
        if sys::is_executable(&candidate) {
            return CString::new(candidate.display().to_string())
                .map_err(|_| "command contains NUL".into());
        }
    }
    Err(format!("exec {prog}: executable file not found in PATH"))
}
