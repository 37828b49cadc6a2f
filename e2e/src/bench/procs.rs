//! Child processes started by the benchmark, and the loopback ports they listen on.
//!
//! **Invariant:** every process the benchmark starts is owned by a [`Procs`]; dropping it (on
//! success, on error, on a panic, or when Ctrl-C drops the whole benchmark future) SIGKILLs and
//! reaps every child still running.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// Environment variables passed through to children; everything else is cleared so that a
/// stray `SKIFF_*` or `ETCD_*` setting in the caller's shell cannot change what is measured.
const PASS_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "SKIFF_LOG"];

/// Running children by label (`skiff-1`, `etcd-2`, ...).
#[derive(Default)]
pub struct Procs {
    children: BTreeMap<String, Child>,
}

impl Procs {
    /// Starts `cmd` as `label`, appending its stdout and stderr to `log`.
    pub fn spawn(&mut self, label: &str, mut cmd: Command, log: &Path) -> Result<()> {
        if self.children.contains_key(label) {
            bail!("{label}: already running");
        }
        let out = open_log(log)?;
        let err = out
            .try_clone()
            .with_context(|| format!("dup {}", log.display()))?;
        cmd.env_clear();
        for key in PASS_ENV {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("{label}: cannot start {:?}", cmd.get_program()))?;
        self.children.insert(label.to_string(), child);
        Ok(())
    }

    /// The process id of `label`, while it runs.
    #[allow(dead_code)] // not every benchmark binary uses it
    pub fn pid(&self, label: &str) -> Option<u32> {
        self.children.get(label).map(Child::id)
    }

    /// SIGKILLs `label` and reaps it.
    pub fn kill(&mut self, label: &str) -> Result<()> {
        let mut child = self
            .children
            .remove(label)
            .with_context(|| format!("{label}: not running"))?;
        child.kill().with_context(|| format!("{label}: SIGKILL"))?;
        child.wait().with_context(|| format!("{label}: wait"))?;
        Ok(())
    }

    /// Fails if `label` has exited on its own (a crash, a refused flag).
    pub fn check_alive(&mut self, label: &str) -> Result<()> {
        let child = self
            .children
            .get_mut(label)
            .with_context(|| format!("{label}: not running"))?;
        if let Some(status) = child.try_wait().with_context(|| format!("{label}: wait"))? {
            self.children.remove(label);
            bail!("{label}: exited unexpectedly ({status})");
        }
        Ok(())
    }

    /// SIGKILLs and reaps every child.
    pub fn kill_all(&mut self) {
        for (label, mut child) in std::mem::take(&mut self.children) {
            if let Err(e) = child.kill().and_then(|()| child.wait().map(|_| ())) {
                eprintln!("warning: {label}: cannot kill: {e}");
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// `n` distinct free ports on 127.0.0.1, never etcd's well-known 2379/2380. All listeners are
/// held until every port is chosen, so the ports are distinct; another process could still take
/// one before the child binds it, which then fails that child's start-up loudly.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    // Bounded: the kernel hands out a fresh ephemeral port per bind.
    for _ in 0..n * 4 {
        if ports.len() == n {
            break;
        }
        let l =
            TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).context("bind 127.0.0.1:0")?;
        let port = l.local_addr().context("local_addr")?.port();
        if port == 2379 || port == 2380 {
            continue;
        }
        ports.push(port);
        held.push(l);
    }
    if ports.len() != n {
        bail!("could not find {n} free loopback ports");
    }
    Ok(ports)
}

/// Runs a benchmark's `run` on a tokio runtime (`workers` threads; default: one per core) until
/// it ends or Ctrl-C / SIGTERM arrives; then `run` is dropped, which kills every child and
/// removes the temp dir. Prints the error, if any, and gives the exit code.
pub fn main_until_interrupted(
    workers: Option<usize>,
    run: impl std::future::Future<Output = Result<()>>,
) -> std::process::ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = run => r,
            r = interrupted() => r,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves with an error on Ctrl-C or SIGTERM.
async fn interrupted() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        _ = term.recv() => {}
    }
    bail!("interrupted; stopped every process the benchmark started")
}
