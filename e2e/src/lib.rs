//! Helpers for end-to-end tests that run the real `skiff-controller` and `skiff` binaries as
//! processes, exactly as a user would. Every process a test starts is killed when its handle
//! drops, also when the test fails; every directory lives under a per-run temp dir.

#![forbid(unsafe_code)]

pub mod fleet;
pub mod history;
pub mod scenario;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where the workspace's binaries are: `SKIFF_BIN_DIR`, else the profile dir this test
/// executable was built into (`target/<profile>/deps/..`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SKIFF_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    // Tests run from target/<profile>/deps; benchmark binaries from target/<profile>.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary, with a clear message when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// Test ports are handed out below the kernel's ephemeral range (32768-60999 by default), so an
/// outgoing connection cannot take the port between this call and the server's bind, as it
/// could with a port the kernel picked for `bind(0)`.
const FIRST: u32 = 20000;
const COUNT: u32 = 12000;

/// A loopback address whose TCP port is free now and not handed out before by this process.
/// Processes start at different places in the range (by pid), so two test binaries running
/// at once rarely meet; a port in use is skipped.
pub fn free_addr() -> SocketAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % COUNT;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + n) % COUNT).unwrap_or(u16::MAX);
        if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            && let Ok(addr) = l.local_addr()
        {
            return addr;
        }
        if n > COUNT {
            // Every port tried: let the kernel pick one.
            if let Ok(addr) =
                TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr())
            {
                return addr;
            }
        }
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Sends `sig` to process `pid` (a negative pid: to its process group). A process that is
/// already gone is not an error here.
pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// Moves the calling thread (only it) into the network namespace `/run/netns/NAME`: sockets
/// it opens from then on live there.
pub fn enter_netns(name: &str) -> std::io::Result<()> {
    let ns = std::fs::File::open(format!("/run/netns/{name}"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

/// utime + stime of a process, in seconds (0 when it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(") ").map(|r| r.1).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clock_ticks_per_second()
}

/// The kernel's clock ticks per second (the unit of CPU times in /proc/PID/stat).
pub fn clock_ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// One controller member process.
pub struct ControllerProc {
    pub id: u64,
    pub data_dir: PathBuf,
    pub rpc: SocketAddr,
    pub http: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
}

impl ControllerProc {
    /// Starts a member; `extra` are flags such as `--bootstrap` or `--join ADDR`.
    pub fn start(root: &Path, id: u64, rpc: SocketAddr, http: SocketAddr, extra: &[&str]) -> Self {
        let data_dir = root.join(format!("controller-{id}"));
        let log = root.join(format!("controller-{id}.log"));
        let mut p = ControllerProc {
            id,
            data_dir,
            rpc,
            http,
            log,
            child: None,
        };
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.to_string(),
            "--data-dir".into(),
            p.data_dir.display().to_string(),
            "--rpc-addr".into(),
            rpc.to_string(),
            "--http-addr".into(),
            http.to_string(),
            "--heartbeat-ms".into(),
            "100".into(),
            "--election-timeout-ms".into(),
            "500-1000".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        p.spawn(&args);
        p
    }

    /// Starts `n` members under `root`: member 1 bootstraps (with `first_args` too), the
    /// others join it with a controller token; waits until all `n` are voters and ready.
    pub fn start_cluster(root: &Path, n: u64, first_args: &[&str]) -> Vec<ControllerProc> {
        let first = free_addr();
        let mut args = vec!["--bootstrap"];
        args.extend_from_slice(first_args);
        let mut members = vec![ControllerProc::start(root, 1, first, free_addr(), &args)];
        let token = members[0].join_token("controller");
        let join = first.to_string();
        for id in 2..=n {
            members.push(ControllerProc::start(
                root,
                id,
                free_addr(),
                free_addr(),
                &["--join", &join, "--join-token", &token],
            ));
        }
        let creds = members[0].creds();
        let addrs: Vec<SocketAddr> = members.iter().map(|m| m.rpc).collect();
        let want = usize::try_from(n).unwrap_or(usize::MAX);
        eventually(
            "every member a voter and ready",
            Duration::from_secs(30),
            || {
                let out = skiff(&creds, &addrs, &["cluster", "members", "-o", "json"]);
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                v.as_array()
                    .is_some_and(|m| m.iter().filter(|x| x["voter"] == true).count() == want)
                    && members
                        .iter()
                        .all(|m| m.http_get("/readyz").is_some_and(|(c, _)| c == 200))
            },
        );
        members
    }

    fn spawn(&mut self, args: &[String]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(bin("skiff-controller"))
            .args(args)
            .env("SKIFF_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn skiff-controller");
        self.child = Some(child);
    }

    /// Restarts a stopped member with only `--id` and `--data-dir`.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "member {} is still running", self.id);
        let args = vec![
            "--id".into(),
            self.id.to_string(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
        ];
        self.spawn(&args);
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The admin credentials a bootstrapper wrote.
    pub fn creds(&self) -> PathBuf {
        self.data_dir.join("admin.creds")
    }

    /// A join token made through this member with its admin credentials (waits until the
    /// member has written them and committed the CA).
    pub fn join_token(&self, role: &str) -> String {
        let mut token = String::new();
        eventually("a join token", Duration::from_secs(30), || {
            if !self.creds().exists() {
                return false;
            }
            let out = skiff(
                &self.creds(),
                &[self.rpc],
                &["token", "create", "--role", role],
            );
            token = String::from_utf8_lossy(&out.stdout).trim().to_string();
            out.status.success()
        });
        token
    }

    /// GET a path on the member's HTTP address; (status code, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http, path)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what each member said last.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- controller {} ({}), last 40 lines of its log\n{}",
                self.id,
                self.rpc,
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// A minimal HTTP/1.0 GET on loopback, enough for /healthz, /readyz and /metrics.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Runs `skiff --credentials CREDS --controller ADDRS ARGS`.
pub fn skiff(creds: &Path, controllers: &[SocketAddr], args: &[&str]) -> Output {
    let list = controllers
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    Command::new(bin("skiff"))
        .arg("--credentials")
        .arg(creds)
        .arg("--controller")
        .arg(list)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run skiff")
}

/// Polls `f` until it returns true or `timeout` passes; panics naming `what`.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < until,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `skiff ... -o json` parsed; panics with stderr if the command failed.
pub fn skiff_json(creds: &Path, controllers: &[SocketAddr], args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = skiff(creds, controllers, &all);
    assert!(
        out.status.success(),
        "skiff {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json output")
}

/// Kills (SIGKILL) and reaps a child process when dropped, also when a test panics.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prints a benchmark's markdown section and, with `--write-md PATH`, puts it in that file.
pub fn publish(head: &str, text: &str, write_md: Option<&Path>) -> std::io::Result<()> {
    println!("{text}");
    match write_md {
        Some(path) => write_md_section(path, head, text),
        None => Ok(()),
    }
}

/// Replaces the section that starts with `head` (a `## ` line) in the markdown file at `path`
/// with `text`, or appends it; for the benchmarks' `--write-md`.
pub fn write_md_section(path: &Path, head: &str, text: &str) -> std::io::Result<()> {
    let cur = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let new = match cur.find(head) {
        Some(start) => {
            let rest = &cur[start + 1..];
            match rest.find("\n## ") {
                Some(n) => format!("{}{}\n{}", &cur[..start], text, &rest[n + 1..]),
                None => format!("{}{}", &cur[..start], text),
            }
        }
        None => format!("{}\n\n{}", cur.trim_end(), text),
    };
    std::fs::write(path, new)
}

/// Today's date (UTC), for benchmark reports.
pub fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (y, m, d) = skiff_common::time::civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Runs Debian's `promtool` with `args`, `stdin` piped in; its output, or an error holding it
/// when it fails.
pub fn promtool(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use std::process::{Command, Stdio};
    let mut c = Command::new("/usr/bin/promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool")?;
    if let Some(text) = stdin {
        std::io::Write::write_all(c.stdin.as_mut().context("stdin")?, text.as_bytes())?;
    }
    drop(c.stdin.take());
    let out = c.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "promtool {}: {text}", args.join(" "));
    Ok(text)
}

/// A finished command's standard output, or an error naming `what` with its standard error.
pub fn stdout(out: std::process::Output, what: std::fmt::Arguments<'_>) -> anyhow::Result<String> {
    anyhow::ensure!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_loopback_ports_below_the_ephemeral_range() {
        let a: Vec<SocketAddr> = (0..50).map(|_| free_addr()).collect();
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), 50);
        assert!(
            a.iter()
                .all(|s| s.ip().is_loopback() && (20000..32000).contains(&s.port()))
        );
    }
}
