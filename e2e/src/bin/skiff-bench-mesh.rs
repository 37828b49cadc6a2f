//! Mesh sidecar benchmark (needs root, wrk, haproxy): two network namespaces made here (a
//! client pod and a server pod on a veth pair, addresses only inside them), one HTTP app in
//! the server pod (in this process), and three ways to reach it from wrk in the client pod:
//!
//! - direct: wrk -> app (a port the mesh does not redirect): the baseline;
//! - skiff: wrk -> service VIP -> client sidecar (REDIRECT, SO_ORIGINAL_DST) -> mutual TLS 1.3
//!   -> server sidecar (REDIRECT; HTTP-aware: per-request metrics) -> app on 127.0.0.1, the
//!   sidecars being `skiff-proxy` processes as the agent runs them (own user, configs,
//!   workload certificates from a CA made here);
//! - haproxy: wrk -> haproxy (mode http, 127.0.0.1) -> mutual TLS 1.3, `verify required` with
//!   the same certificates -> haproxy -> app: the pair a mesh replaces, one thread each (as
//!   each sidecar has one), `http-reuse never` (a sidecar's upstream connection belongs to
//!   its downstream one too).
//!
//! Per round, interleaved: one connection for latency (p50, p99), 16 connections for
//! requests/s and each proxy's CPU per request, 4 connections with `Connection: close` for
//! the CPU of a fresh handshake; RSS of each proxy after the round. Medians of the rounds,
//! with ranges.
//!
//!   SKIFF_BIN_DIR=target/release target/release/skiff-bench-mesh [--seconds 10] [--rounds 3] [--write-md BENCHMARKS.md]

#![forbid(unsafe_code)]

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use skiff_tls::pki::key_and_csr;
use skiff_tls::{CaKey, Identity};

#[derive(Parser)]
struct Args {
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Replace (or add) the mesh section of this markdown file.
    #[arg(long)]
    write_md: Option<PathBuf>,
}

const CLIENT_IP: &str = "10.250.0.1";
const SERVER_IP: &str = "10.250.0.2";
const VIP: &str = "10.251.0.10";
const SERVICE_CIDR: &str = "10.251.0.0/24";
const PROXY_UID: u32 = 1337;
const APP_PORT: u16 = 8080;
const DIRECT_PORT: u16 = 9090;
const HAPROXY_FRONT: u16 = 18080;
const HAPROXY_TLS: u16 = 8443;

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// What the benchmark made, removed on drop (success or failure).
struct Setup {
    prefix: String,
    dir: tempfile::TempDir,
    procs: Vec<Child>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in ["c", "s"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("{}-{ns}", self.prefix)])
                .output();
        }
    }
}

impl Setup {
    fn ns(&self, side: &str) -> String {
        format!("{}-{side}", self.prefix)
    }

    fn in_ns(&self, side: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(side)]).args(args);
        c
    }

    fn spawn(&mut self, side: &str, args: &[&str], log: &str) -> Result<u32> {
        let log = std::fs::File::create(self.dir.path().join(log))?;
        let child = self
            .in_ns(side, args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("{args:?}"))?;
        let pid = child.id();
        self.procs.push(child);
        Ok(pid)
    }
}

/// A `/proc/PID/status` memory field (`VmRSS`, `RssAnon`), in MB.
fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The HTTP app: keep-alive HTTP/1.1, a fixed 12-byte body, on `ports` in the server pod.
fn start_app(ns: String, ports: [u16; 2]) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let run = || -> Result<()> {
            skiff_e2e::enter_netns(&ns)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut ls = Vec::new();
                for p in ports {
                    ls.push(tokio::net::TcpListener::bind(("0.0.0.0", p)).await?);
                }
                let _ = tx.send(Ok(()));
                for l in ls {
                    tokio::spawn(async move {
                        while let Ok((s, _)) = l.accept().await {
                            tokio::spawn(app_conn(s));
                        }
                    });
                }
                std::future::pending::<()>().await;
                Ok::<(), anyhow::Error>(())
            })
        };
        if let Err(e) = run() {
            let _ = tx.send(Err(e));
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("the app did not start")?
}

async fn app_conn(mut s: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            let close = head.contains("connection: close") || head.contains("http/1.0");
            let resp: &[u8] = if close {
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 12\r\nconnection: close\r\n\r\nhello mesh\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\r\nhello mesh\r\n"
            };
            if s.write_all(resp).await.is_err() || close {
                let _ = s.shutdown().await;
                return;
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A workload's key and certificate (and the CA) in `dir`, owned by the proxy's user.
fn write_identity(ca: &CaKey, dir: &Path, service: &str) -> Result<()> {
    let (key, csr) = key_and_csr(service)?;
    let issued = ca.issue(
        &csr,
        &Identity::Workload {
            namespace: "default".into(),
            service: service.into(),
        },
        &[format!("{service}.default.skiff.internal")],
        Duration::from_secs(86_400),
    )?;
    std::fs::create_dir_all(dir)?;
    for (name, text, mode) in [
        ("key.pem", key.as_str(), 0o400),
        ("cert.pem", issued.cert_pem.as_str(), 0o644),
        ("ca.pem", ca.cert_pem.as_str(), 0o644),
    ] {
        std::fs::write(dir.join(name), text)?;
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(mode))?;
        std::os::unix::fs::chown(dir.join(name), Some(PROXY_UID), Some(PROXY_UID))?;
    }
    // haproxy wants the certificate and key in one file.
    std::fs::write(dir.join("haproxy.pem"), format!("{}{key}", issued.cert_pem))?;
    Ok(())
}

fn wait_ready(setup: &Setup, side: &str, url: &str) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let ok = setup
            .in_ns(side, &["curl", "-sf", "-m", "1", "-o", "/dev/null", url])
            .status()?
            .success();
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut logs = String::new();
    for e in std::fs::read_dir(setup.dir.path())?.flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            logs.push_str(&format!("--- {} ---\n{text}\n", e.path().display()));
        }
    }
    bail!("{url} in {side} did not answer\n{logs}")
}

fn build(prefix: &str) -> Result<Setup> {
    let mut setup = Setup {
        prefix: prefix.to_owned(),
        dir: tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()?,
        procs: Vec::new(),
    };
    std::fs::set_permissions(setup.dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let (c, s) = (setup.ns("c"), setup.ns("s"));
    for ns in [&c, &s] {
        sh(&["ip", "netns", "add", ns])?;
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    }
    let (vc, vs) = (format!("{prefix}c"), format!("{prefix}s"));
    sh(&[
        "ip", "-n", &c, "link", "add", &vc, "type", "veth", "peer", "name", &vs, "netns", &s,
    ])?;
    sh(&[
        "ip",
        "-n",
        &c,
        "addr",
        "add",
        &format!("{CLIENT_IP}/24"),
        "dev",
        &vc,
    ])?;
    sh(&[
        "ip",
        "-n",
        &s,
        "addr",
        "add",
        &format!("{SERVER_IP}/24"),
        "dev",
        &vs,
    ])?;
    sh(&["ip", "-n", &c, "link", "set", &vc, "up"])?;
    sh(&["ip", "-n", &s, "link", "set", &vs, "up"])?;
    sh(&["ip", "-n", &c, "route", "add", SERVICE_CIDR, "dev", &vc])?;
    start_app(s.clone(), [APP_PORT, DIRECT_PORT])?;

    // The sidecars, as the agent sets them up.
    let ca = CaKey::generate("bench CA")?;
    let d = setup.dir.path().to_path_buf();
    write_identity(&ca, &d.join("client"), "client")?;
    write_identity(&ca, &d.join("api"), "api")?;
    let client_cfg = serde_json::json!({
        "identity": {"namespace": "default", "name": "client"},
    });
    let server_cfg = serde_json::json!({
        "identity": {"namespace": "default", "name": "api"},
        "allow_from": [{"namespace": "default", "name": "client"}],
        "inbound_ports": [APP_PORT], "http_ports": [APP_PORT], "version": 1,
    });
    let services = serde_json::json!({"services": [{
        "service": {"namespace": "default", "name": "api"},
        "vip": VIP, "ports": [APP_PORT],
        "endpoints": [{"ip": SERVER_IP, "mesh": true}],
    }]});
    for (side, cfg) in [("client", &client_cfg), ("api", &server_cfg)] {
        let dir = d.join(side);
        std::fs::write(dir.join("proxy.json"), cfg.to_string())?;
        std::fs::write(dir.join("services.json"), services.to_string())?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        std::os::unix::fs::chown(&dir, Some(PROXY_UID), Some(PROXY_UID))?;
    }
    let rules_c = format!(
        "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -m owner --uid-owner {PROXY_UID} -j RETURN\n\
         -A OUTPUT -d {SERVICE_CIDR} -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"
    );
    let rules_s = format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp -m tcp --dport {APP_PORT} -j REDIRECT --to-ports 15006\nCOMMIT\n"
    );
    for (ns, rules) in [(&c, rules_c), (&s, rules_s)] {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "iptables-restore"])
            .stdin(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(rules.as_bytes())?;
        ensure!(child.wait()?.success(), "iptables-restore in {ns}");
    }
    // The sidecar binary the agent runs (`skiff-proxy`, next to it).
    let proxy = skiff_e2e::bin("skiff-proxy").display().to_string();
    for (side, ns) in [("client", "c"), ("api", "s")] {
        let dir = d.join(side).display().to_string();
        let uid = PROXY_UID.to_string();
        setup.spawn(
            ns,
            &[&proxy, "--dir", &dir, "--uid", &uid, "--gid", &uid],
            &format!("{side}-proxy.log"),
        )?;
    }
    wait_ready(&setup, "c", "http://127.0.0.1:15020/ready")?;
    wait_ready(&setup, "s", "http://127.0.0.1:15020/ready")?;

    // The haproxy pair.
    let common = "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n";
    let hc = format!(
        "{common}frontend f\n  bind 127.0.0.1:{HAPROXY_FRONT}\n  default_backend b\nbackend b\n  http-reuse never\n  \
         server s1 {SERVER_IP}:{HAPROXY_TLS} ssl crt {}/client/haproxy.pem ca-file {}/client/ca.pem verify required \
         ssl-min-ver TLSv1.3 sni str(api.default.skiff.internal) verifyhost api.default.skiff.internal\n",
        d.display(),
        d.display()
    );
    let hs = format!(
        "{common}frontend f\n  bind {SERVER_IP}:{HAPROXY_TLS} ssl crt {}/api/haproxy.pem ca-file {}/api/ca.pem verify required ssl-min-ver TLSv1.3\n  \
         default_backend app\nbackend app\n  http-reuse never\n  server a 127.0.0.1:{DIRECT_PORT}\n",
        d.display(),
        d.display()
    );
    std::fs::write(d.join("haproxy-c.cfg"), hc)?;
    std::fs::write(d.join("haproxy-s.cfg"), hs)?;
    let hcfg = d.join("haproxy-c.cfg").display().to_string();
    let scfg = d.join("haproxy-s.cfg").display().to_string();
    setup.spawn("c", &["haproxy", "-db", "-f", &hcfg], "haproxy-c.log")?;
    setup.spawn("s", &["haproxy", "-db", "-f", &scfg], "haproxy-s.log")?;
    wait_ready(&setup, "c", &format!("http://127.0.0.1:{HAPROXY_FRONT}/"))?;
    wait_ready(&setup, "c", &format!("http://{VIP}:{APP_PORT}/"))?;
    wait_ready(&setup, "c", &format!("http://{SERVER_IP}:{DIRECT_PORT}/"))?;
    Ok(setup)
}

/// The pids of the processes serving each way in (the proxy pair; none for direct).
fn pids_of(pattern: &str) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// wrk's figures: requests/s, requests, p50 and p99 latency (microseconds).
struct Wrk {
    rps: f64,
    requests: f64,
    p50_us: f64,
    p99_us: f64,
}

fn wrk(setup: &Setup, url: &str, conns: u32, seconds: u32, close: bool) -> Result<Wrk> {
    let (c, d) = (conns.to_string(), format!("{seconds}s"));
    let mut args = vec!["wrk", "-t1", "-c", &c, "-d", &d, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out = setup.in_ns("c", &args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success() && !text.contains("Non-2xx"),
        "wrk {url}: {text}"
    );
    ensure!(
        !text.contains("Socket errors") || close,
        "wrk {url}: socket errors: {text}"
    );
    let num = |key: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.trim_start()[key.len()..].split_whitespace().next())
            .and_then(|v| v.trim_end_matches(',').parse().ok())
    };
    let lat = |key: &str| -> Option<f64> {
        let v = text
            .lines()
            .find(|l| l.trim_start().starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .to_owned();
        let (n, unit) = v.split_at(v.find(|ch: char| ch.is_ascii_alphabetic())?);
        let n: f64 = n.parse().ok()?;
        Some(match unit {
            "us" => n,
            "ms" => n * 1e3,
            "s" => n * 1e6,
            _ => return None,
        })
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("wrk: requests")?;
    Ok(Wrk {
        rps: num("Requests/sec:").context("wrk: requests/s")?,
        requests,
        p50_us: lat("50%").context("wrk: p50")?,
        p99_us: lat("99%").context("wrk: p99")?,
    })
}

#[derive(Default, Clone)]
struct Round {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    cpu_us_per_req: f64,
    handshake_cpu_us: f64,
    rss_mb: f64,
    /// The part of it that is the process's own (not the binary's pages, shared by every
    /// process of that binary on the node).
    anon_mb: f64,
}

fn measure(setup: &Setup, url: &str, pids: &[u32], seconds: u32) -> Result<Round> {
    let cpu = |pids: &[u32]| pids.iter().map(|p| skiff_e2e::cpu_seconds(*p)).sum::<f64>();
    let per_proxy = pids.len().max(1) as f64;
    let one = wrk(setup, url, 1, seconds, false)?;
    let before = cpu(pids);
    let many = wrk(setup, url, 16, seconds, false)?;
    let used = cpu(pids) - before;
    let before = cpu(pids);
    let fresh = wrk(setup, url, 4, seconds.min(5), true)?;
    let hs = cpu(pids) - before;
    Ok(Round {
        p50_us: one.p50_us,
        p99_us: one.p99_us,
        rps: many.rps,
        cpu_us_per_req: used / many.requests / per_proxy * 1e6,
        handshake_cpu_us: hs / fresh.requests / per_proxy * 1e6,
        rss_mb: pids
            .iter()
            .map(|p| status_mb(*p, "VmRSS:"))
            .fold(0.0, f64::max),
        anon_mb: pids
            .iter()
            .map(|p| status_mb(*p, "RssAnon:"))
            .fold(0.0, f64::max),
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn range(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(0.0, f64::max),
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        skiff_e2e::is_root(),
        "needs root (network namespaces, iptables)"
    );
    for tool in ["wrk", "haproxy", "curl", "iptables-restore"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?
            .status
            .success();
        ensure!(
            found,
            "{tool} is not installed (apt-get install wrk haproxy curl iptables)"
        );
    }
    let prefix = format!("skm{}", std::process::id() % 100_000);
    let setup = build(&prefix)?;
    let dir = setup.dir.path().display().to_string();
    let skiff_pids: Vec<u32> = pids_of(&format!("proxy --dir {dir}/"));
    let haproxy_pids: Vec<u32> = pids_of(&format!("haproxy -db -f {dir}/"));
    ensure!(
        skiff_pids.len() == 2 && haproxy_pids.len() == 2,
        "proxies: skiff {skiff_pids:?}, haproxy {haproxy_pids:?}"
    );
    let ways = [
        (
            "direct",
            format!("http://{SERVER_IP}:{DIRECT_PORT}/"),
            Vec::new(),
        ),
        (
            "skiff",
            format!("http://{VIP}:{APP_PORT}/"),
            skiff_pids.clone(),
        ),
        (
            "haproxy",
            format!("http://127.0.0.1:{HAPROXY_FRONT}/"),
            haproxy_pids.clone(),
        ),
    ];
    let mut runs: Vec<Vec<Round>> = vec![Vec::new(); ways.len()];
    for round in 0..args.rounds {
        for (i, (name, url, pids)) in ways.iter().enumerate() {
            let r = measure(&setup, url, pids, args.seconds)?;
            eprintln!(
                "round {} {name}: p50 {:.0} us, p99 {:.0} us, {:.0} req/s, {:.1} us CPU/req/proxy, {:.0} us CPU/handshake/proxy, {:.1} MB ({:.1} MB anonymous)",
                round + 1,
                r.p50_us,
                r.p99_us,
                r.rps,
                r.cpu_us_per_req,
                r.handshake_cpu_us,
                r.rss_mb,
                r.anon_mb
            );
            runs[i].push(r);
        }
    }
    let col = |i: usize, f: fn(&Round) -> f64| -> Vec<f64> { runs[i].iter().map(f).collect() };
    // Added latency: each round's proxied p50/p99 minus that round's direct one.
    let added = |i: usize, f: fn(&Round) -> f64| -> Vec<f64> {
        runs[i]
            .iter()
            .zip(&runs[0])
            .map(|(r, d)| f(r) - f(d))
            .collect()
    };
    let mut md = format!(
        "## Mesh sidecar (skiff-bench-mesh)\n\n\
         Measured {} on this machine (2 cores), {} interleaved rounds of {} s per wrk run; medians \
         [range]. `SKIFF_BIN_DIR=target/release target/release/skiff-bench-mesh --rounds {} --seconds {}`.\n\
         wrk in a client pod, the app (keep-alive HTTP/1.1, 12-byte body) in a server pod, a veth \
         pair between. Skiff: VIP -> client sidecar -> mTLS 1.3 -> server sidecar (HTTP-aware, \
         per-request metrics) -> app. haproxy 2.6 (Debian): mode http, one thread per side, mTLS \
         1.3 with the same certificates, `verify required`; wrk talks to it directly (no \
         redirect), which the sidecar pays for (nat REDIRECT both ways).\n\n\
         | | p50 added (1 conn) | p99 added | requests/s (16 conns) | CPU per request per proxy | CPU per fresh handshake per proxy | RSS per proxy (anonymous) |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
        skiff_e2e::utc_date(),
        args.rounds,
        args.seconds,
        args.rounds,
        args.seconds
    );
    let p50d = median(&col(0, |r| r.p50_us));
    let p99d = median(&col(0, |r| r.p99_us));
    let rpsd = median(&col(0, |r| r.rps));
    md.push_str(&format!(
        "| direct | (p50 {p50d:.0} us) | (p99 {p99d:.0} us) | {rpsd:.0} | - | - | - |\n"
    ));
    for (i, name) in [(1, "skiff sidecars"), (2, "haproxy pair")] {
        let p50 = added(i, |r| r.p50_us);
        let p99 = added(i, |r| r.p99_us);
        let rps = col(i, |r| r.rps);
        let cpu = col(i, |r| r.cpu_us_per_req);
        let hs = col(i, |r| r.handshake_cpu_us);
        let rss = col(i, |r| r.rss_mb);
        let anon = col(i, |r| r.anon_mb);
        let (a, b) = range(&p50);
        let (c, d) = range(&rps);
        md.push_str(&format!(
            "| {name} | +{:.0} us [{a:.0}-{b:.0}] | +{:.0} us | {:.0} [{c:.0}-{d:.0}] | {:.1} us | {:.0} us | {:.1} MB ({:.1} MB) |\n",
            median(&p50),
            median(&p99),
            median(&rps),
            median(&cpu),
            median(&hs),
            median(&rss),
            median(&anon)
        ));
    }
    let ratio = |f: fn(&Round) -> f64| median(&col(2, f)) / median(&col(1, f)).max(1e-9);
    md.push_str(&format!(
        "\nSkiff / haproxy: requests/s {:.2}x; haproxy's CPU per request is {:.2}x Skiff's, its \
         handshake CPU {:.2}x, its RSS {:.2}x; added p50: Skiff {:.0} us vs haproxy {:.0} us.\n",
        median(&col(1, |r| r.rps)) / median(&col(2, |r| r.rps)).max(1e-9),
        ratio(|r| r.cpu_us_per_req),
        ratio(|r| r.handshake_cpu_us),
        ratio(|r| r.rss_mb),
        median(&added(1, |r| r.p50_us)),
        median(&added(2, |r| r.p50_us)),
    ));
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    let (p50, cpu, rss) = (
        median(&added(1, |r| r.p50_us)),
        median(&col(1, |r| r.cpu_us_per_req)),
        median(&col(1, |r| r.rss_mb)),
    );
    md.push_str(&format!(
        "The mesh issue's aims: added p50 <= 50 us ({p50:.0} us: {}), CPU per request per proxy \
         <= 20 us ({cpu:.1} us: {}), RSS per sidecar < 10 MB ({rss:.1} MB: {}).\n",
        verdict(p50 <= 50.0),
        verdict(cpu <= 20.0),
        verdict(rss < 10.0)
    ));
    skiff_e2e::publish(
        "## Mesh sidecar (skiff-bench-mesh)",
        &md,
        args.write_md.as_deref(),
    )?;
    drop(setup);
    Ok(())
}
