//! Health checks of running allocations, as their task's check says: tcp (a connection
//! opens), http (a GET answers the expected status) or exec (a command in the container exits
//! 0), every `interval`, each probe bounded by `timeout`; `healthy_threshold` passes in a row
//! make an allocation healthy, `unhealthy_threshold` failures in a row unhealthy. Until the
//! first verdict it is `starting` (not an endpoint).
//!
//! tcp and http probes run from inside the container's network namespace (a thread joined to
//! it) against the container's address, so they see what its peers see, whatever the host's
//! routes; exec runs through `skiff-agent container exec` like `skiff exec`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::contract::{Check, CheckKind};

/// What is known of an allocation's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(&self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// One probe, ready to run: what to do and where.
#[derive(Clone, Debug)]
pub enum Probe {
    Tcp {
        /// Where to connect from: the allocation's network namespace; `None`: the node's.
        netns: Option<PathBuf>,
        addr: SocketAddr,
    },
    Http {
        netns: Option<PathBuf>,
        addr: SocketAddr,
        path: String,
        expected: u16,
    },
    Exec {
        data_dir: PathBuf,
        container: String,
        command: Vec<String>,
    },
}

impl Probe {
    /// The probe for `check` of a container (its id), run from `netns` (the allocation's
    /// network namespace; `None`: the node's) against `ip`.
    pub fn new(
        check: &Check,
        data_dir: &Path,
        container: &str,
        netns: Option<PathBuf>,
        ip: Option<IpAddr>,
    ) -> Probe {
        let ip = ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        match &check.kind {
            CheckKind::Tcp { port } => Probe::Tcp {
                netns,
                addr: SocketAddr::new(ip, *port),
            },
            CheckKind::Http {
                path,
                port,
                expected_status,
            } => Probe::Http {
                netns,
                addr: SocketAddr::new(ip, *port),
                path: path.clone(),
                expected: *expected_status,
            },
            CheckKind::Exec { command } => Probe::Exec {
                data_dir: data_dir.to_path_buf(),
                container: container.to_owned(),
                command: command.clone(),
            },
        }
    }

    /// Runs the probe once: `Ok(output)` on a pass, `Err(why)` on a failure.
    pub fn run(&self, timeout: Duration) -> Result<String, String> {
        match self {
            Probe::Tcp { netns, addr } => {
                let addr = *addr;
                in_netns(netns.as_deref(), move || {
                    TcpStream::connect_timeout(&addr, timeout)
                        .map(|_| format!("connected to {addr}"))
                        .map_err(|e| format!("connecting to {addr}: {e}"))
                })
            }
            Probe::Http {
                netns,
                addr,
                path,
                expected,
            } => {
                let (addr, path, expected) = (*addr, path.clone(), *expected);
                in_netns(netns.as_deref(), move || {
                    http_get(addr, &path, expected, timeout)
                })
            }
            Probe::Exec {
                data_dir,
                container,
                command,
            } => exec(data_dir, container, command, timeout),
        }
    }
}

/// Runs `f` on a thread joined to the network namespace bound at `netns` (`None`: the
/// node's own, where this process is).
pub(crate) fn in_netns<F>(netns: Option<&Path>, f: F) -> Result<String, String>
where
    F: FnOnce() -> Result<String, String> + Send + 'static,
{
    let Some(netns) = netns else {
        return f();
    };
    let ns = std::fs::File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the container's network: {e}"))?;
        f()
    })
    .join()
    .map_err(|_| "probe thread panicked".to_owned())?
}

/// `GET path` over HTTP/1.0; passes when the status is `expected`.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    expected: u16,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    s.set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    // One write: a server that answers after the first segment must see the whole request.
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: skiff-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes())
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    s.set_read_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("reading from {addr}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default().to_owned();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: not an HTTP answer: {line:?}"))?;
    if status == expected {
        Ok(format!("GET {path}: {status}"))
    } else {
        Err(format!("GET {path}: {status}, expected {expected}"))
    }
}

fn exec(
    data_dir: &Path,
    container: &str,
    command: &[String],
    timeout: Duration,
) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["container", "exec", container, "--"])
        .args(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("exec: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let out = child.wait_with_output().map_err(|e| e.to_string())?;
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                let text: String = text.trim().chars().take(256).collect();
                return if status.success() {
                    Ok(text)
                } else {
                    Err(format!(
                        "{} exited {}: {text}",
                        command.join(" "),
                        status.code().unwrap_or(-1)
                    ))
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} timed out after {timeout:?}", command.join(" ")));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Consecutive results and the verdict (pure: unit-tested).
#[derive(Clone, Debug)]
pub struct Verdict {
    pub health: Health,
    passes: u32,
    failures: u32,
    pub output: String,
}

impl Default for Verdict {
    fn default() -> Self {
        Verdict {
            health: Health::Starting,
            passes: 0,
            failures: 0,
            output: String::new(),
        }
    }
}

impl Verdict {
    pub fn record(
        &mut self,
        result: Result<String, String>,
        healthy_after: u32,
        unhealthy_after: u32,
    ) {
        match result {
            Ok(out) => {
                self.passes += 1;
                self.failures = 0;
                self.output = out;
                if self.passes >= healthy_after.max(1) {
                    self.health = Health::Healthy;
                }
            }
            Err(why) => {
                self.failures += 1;
                self.passes = 0;
                self.output = why;
                if self.failures >= unhealthy_after.max(1) {
                    self.health = Health::Unhealthy;
                }
            }
        }
    }
}

struct Entry {
    check: Check,
    probe: Probe,
    verdict: Verdict,
    next: Instant,
    running: bool,
}

/// The checks of this node's allocations, driven by [`Checker::run`].
#[derive(Clone, Default)]
pub struct Checker {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

impl Checker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes the set of checks `want` (allocation id -> its check and probe): new ones start
    /// as `starting` with a first probe now, changed ones start over, others keep their state.
    pub fn set(&self, want: HashMap<String, (Check, Probe)>) {
        let mut m = self.lock();
        m.retain(|id, e| want.get(id).is_some_and(|(c, _)| *c == e.check));
        for (id, (check, probe)) in want {
            m.entry(id).or_insert(Entry {
                check,
                probe,
                verdict: Verdict::default(),
                next: Instant::now(),
                running: false,
            });
        }
    }

    /// The verdict for an allocation, if it has a check.
    pub fn verdict(&self, id: &str) -> Option<Verdict> {
        self.lock().get(id).map(|e| e.verdict.clone())
    }

    /// Runs due probes forever (each on a blocking thread; one at a time per allocation).
    pub async fn run(self) {
        loop {
            let due: Vec<(String, Probe, Duration)> = {
                let now = Instant::now();
                let mut m = self.lock();
                m.iter_mut()
                    .filter(|(_, e)| !e.running && e.next <= now)
                    .map(|(id, e)| {
                        e.running = true;
                        (id.clone(), e.probe.clone(), e.check.timeout)
                    })
                    .collect()
            };
            for (id, probe, timeout) in due {
                let me = self.clone();
                tokio::spawn(async move {
                    let result = tokio::task::spawn_blocking(move || probe.run(timeout))
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()));
                    let mut m = me.lock();
                    if let Some(e) = m.get_mut(&id) {
                        let before = e.verdict.health;
                        e.verdict.record(
                            result,
                            e.check.healthy_threshold,
                            e.check.unhealthy_threshold,
                        );
                        if e.verdict.health != before {
                            tracing::info!(
                                alloc = %id,
                                health = e.verdict.health.as_str(),
                                output = %e.verdict.output,
                                "health changed"
                            );
                        }
                        e.running = false;
                        e.next = Instant::now() + e.check.interval;
                    }
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_decide_the_verdict() {
        let mut v = Verdict::default();
        assert_eq!(v.health, Health::Starting);
        v.record(Err("refused".into()), 2, 3);
        assert_eq!(v.health, Health::Starting);
        v.record(Ok("ok".into()), 2, 3);
        assert_eq!(v.health, Health::Starting);
        v.record(Ok("ok".into()), 2, 3);
        assert_eq!(v.health, Health::Healthy);
        v.record(Err("500".into()), 2, 3);
        v.record(Err("500".into()), 2, 3);
        assert_eq!(v.health, Health::Healthy, "two failures of three allowed");
        v.record(Err("500".into()), 2, 3);
        assert_eq!(v.health, Health::Unhealthy);
        assert_eq!(v.output, "500");
        v.record(Ok("ok".into()), 2, 3);
        assert_eq!(v.health, Health::Unhealthy);
        v.record(Ok("ok".into()), 2, 3);
        assert_eq!(v.health, Health::Healthy);
    }

    #[test]
    fn http_probe_checks_the_status() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            for (i, conn) in listener.incoming().take(2).enumerate() {
                let mut c = conn.expect("conn");
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let status = if i == 0 {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = write!(c, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            }
        });
        let t = Duration::from_secs(2);
        assert_eq!(
            http_get(addr, "/healthz", 200, t),
            Ok("GET /healthz: 200".into())
        );
        assert_eq!(
            http_get(addr, "/healthz", 200, t),
            Err("GET /healthz: 503, expected 200".into())
        );
        server.join().expect("server");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let gone = closed.local_addr().expect("addr");
        drop(closed);
        assert!(
            http_get(gone, "/", 200, t)
                .expect_err("refused")
                .contains("connecting")
        );
    }
}
