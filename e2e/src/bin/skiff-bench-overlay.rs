//! Overlay network benchmark (needs root, iperf3, wireguard-go, wg, busybox): on a netns fleet
//! of one controller and two agents, iperf3 throughput and ping latency container to container
//! across the two hosts through Skiff's WireGuard tunnel, and container to container on one
//! host (bridge only: must not pay for the tunnel); between the same two simulated hosts in the
//! same run, the anchors: plain veth routing host to host (no tunnel: the ceiling) and Debian's
//! wireguard-go host to host, configured with `wg` (the userspace anchor). Also the peak RSS of
//! Skiff's tunnel process and of wireguard-go.
//!
//!   SKIFF_BIN_DIR=target/release target/release/skiff-bench-overlay [--seconds 5] [--write-md BENCHMARKS.md]

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use skiff_e2e::fleet::Fleet;

#[derive(Parser)]
struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Interleaved rounds, one iperf3 run per path each (median and range are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Replace (or add) the overlay section of this markdown file.
    #[arg(long)]
    write_md: Option<PathBuf>,
}

/// Where a command runs: a host's or a container's network namespace.
#[derive(Clone)]
struct Ns(String);

impl Ns {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.0)).arg("--").args(args);
        c
    }
}

/// Gbit/s of one iperf3 run from `client` to `server_ip` (server in `server`).
fn iperf(server: &Ns, client: &Ns, server_ip: &str, seconds: u32) -> Result<f64> {
    let mut srv = server
        .cmd(&[
            "iperf3",
            "-s",
            "-1",
            "--forceflush",
            "-B",
            server_ip,
            "-p",
            "5299",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = BufReader::new(srv.stdout.take().context("iperf3 stdout")?);
    let mut line = String::new();
    // "Server listening on 5299" once it is ready.
    while out.read_line(&mut line)? > 0 && !line.contains("listening") {
        line.clear();
    }
    let res = client
        .cmd(&[
            "iperf3",
            "-c",
            server_ip,
            "-p",
            "5299",
            "-t",
            &seconds.to_string(),
            "-J",
        ])
        .output()?;
    let _ = srv.kill();
    let _ = srv.wait();
    ensure!(
        res.status.success(),
        "iperf3 to {server_ip}: {}",
        String::from_utf8_lossy(&res.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&res.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no sum_received")?;
    Ok(bps / 1e9)
}

/// Average ping RTT in microseconds (200 pings, 10 ms apart).
fn ping(from: &Ns, to: &str) -> Result<f64> {
    let out = from
        .cmd(&["busybox", "ping", "-q", "-c", "200", "-i", "0.01", to])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "ping {to}: {text}");
    // "round-trip min/avg/max = 0.045/0.060/0.120 ms"
    let avg = text
        .lines()
        .find_map(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("ping output: {text}"))?;
    Ok(avg * 1000.0)
}

fn peak_rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// wireguard-go on a host (its socket in a private /run), configured with `wg`: address
/// `10.99.0.N/24`, one peer. Returns the process group leader.
#[allow(clippy::too_many_arguments)]
fn wireguard_go(
    host_ns: &Ns,
    dir: &std::path::Path,
    name: &str,
    key: &std::path::Path,
    addr: &str,
    peer_pub: &str,
    peer_endpoint: &str,
    peer_addr: &str,
) -> Result<std::process::Child> {
    let script = format!(
        "set -e\n\
         mount -t tmpfs skiffbench /run\n\
         mkdir -p /run/wireguard\n\
         WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f {name} >{log} 2>&1 &\n\
         P=$!\n\
         for i in $(seq 200); do [ -S /run/wireguard/{name}.sock ] && break; sleep 0.05; done\n\
         wg set {name} private-key {key} listen-port 51830 peer {peer_pub} endpoint {peer_endpoint} allowed-ips {peer_addr}/32\n\
         ip addr add {addr}/24 dev {name}\n\
         ip link set {name} mtu 1420 up\n\
         echo READY $P\n\
         wait $P\n",
        log = dir.join(format!("{name}.log")).display(),
        key = key.display(),
    );
    let mut child = host_ns
        .cmd(&["unshare", "-m", "sh", "-c", &script])
        .process_group(0)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    ensure!(line.starts_with("READY"), "wireguard-go {name}: {line:?}");
    Ok(child)
}

fn keypair(dir: &std::path::Path, name: &str) -> Result<(PathBuf, String)> {
    let private = Command::new("wg").arg("genkey").output()?.stdout;
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, &private)?;
    let mut p = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut p.stdin.take().context("stdin")?, &private)?;
    let public = String::from_utf8(p.wait_with_output()?.stdout)?
        .trim()
        .to_owned();
    Ok((path, public))
}

fn main() -> Result<()> {
    let args = Args::parse();
    skiff_e2e::fleet::bench_on_fleet(
        1,
        2,
        &["iperf3", "wireguard-go", "wg", "busybox"],
        "iperf3 wireguard-go wireguard-tools busybox-static",
        |fleet, helpers| run(fleet, &args, helpers),
    )
}

fn run(fleet: &Fleet, args: &Args, wgo: &mut Vec<std::process::Child>) -> Result<()> {
    let image = fleet.image();
    let spec = |name: &str, replicas: u32, extra: &str| -> Result<PathBuf> {
        fleet.spec(
            name,
            &format!(
                "name = \"{name}\"\nreplicas = {replicas}\nimage = \"{image}\"\n\
                 command = [\"/bin/sleep\"]\nargs = [\"3600\"]\nstop_signal = \"SIGKILL\"\n{extra}\n\
                 [resources]\ncpu = 0.1\nmemory = \"16Mi\"\n"
            ),
        )
    };
    // Two replicas spread over a1 and a2; two more on a1 only (zone a).
    let cross = spec("cross", 2, "")?;
    let local = spec("local", 2, "[placement]\nconstraints = [\"zone = a\"]")?;
    for s in [&cross, &local] {
        fleet.cli_ok(&["apply", "-f", &s.display().to_string()])?;
    }
    fleet.wait_for(
        "4 containers with addresses",
        Duration::from_secs(60),
        |f| {
            let ps = f.cli_json(&["ps"])?;
            Ok(ps
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["status"] == "running" && !a["ip"].as_str().unwrap_or("").is_empty())
                .count()
                == 4)
        },
    )?;
    // Allocation -> (node, ip, container netns).
    let mut allocs = Vec::new();
    for job in ["cross", "local"] {
        for a in fleet
            .cli_json(&["ps", job])?
            .as_array()
            .into_iter()
            .flatten()
        {
            let node = a["node"].as_str().unwrap_or_default().to_owned();
            let id = a["id"].as_str().unwrap_or_default().to_owned();
            // The allocation's pod namespace (its containers join it).
            let ns = Ns(fleet
                .agent_data(&node)?
                .join("pods")
                .join(&id)
                .join("net")
                .display()
                .to_string());
            allocs.push((
                job.to_owned(),
                node,
                a["ip"].as_str().unwrap_or_default().to_owned(),
                ns,
            ));
        }
    }
    let find = |job: &str, node: &str, skip: usize| {
        allocs
            .iter()
            .filter(|a| a.0 == job && a.1 == node)
            .nth(skip)
            .cloned()
            .with_context(|| format!("no {job} container on {node}"))
    };
    let c1 = find("cross", "a1", 0)?;
    let c2 = find("cross", "a2", 0)?;
    let l1 = find("local", "a1", 0)?;
    let l2 = find("local", "a1", 1)?;
    let host = |n: &str| -> Result<(Ns, String)> {
        let h = fleet.host(n)?;
        Ok((Ns(format!("/run/netns/{}", h.netns)), h.addr.clone()))
    };
    let (h1, h1_addr) = host("a1")?;
    let (h2, h2_addr) = host("a2")?;
    // Handshakes done before measuring.
    ping(&c1.3, &c2.2)?;

    let (s, r) = (args.seconds, args.runs);
    // The anchor's tunnel, set up once beside Skiff's.
    let dir = fleet.dir();
    let (k1, p1) = keypair(dir, "wgb1")?;
    let (k2, p2) = keypair(dir, "wgb2")?;
    wgo.push(wireguard_go(
        &h1,
        dir,
        "wgb1",
        &k1,
        "10.99.0.1",
        &p2,
        &format!("{h2_addr}:51830"),
        "10.99.0.2",
    )?);
    wgo.push(wireguard_go(
        &h2,
        dir,
        "wgb2",
        &k2,
        "10.99.0.2",
        &p1,
        &format!("{h1_addr}:51830"),
        "10.99.0.1",
    )?);
    ping(&h1, "10.99.0.2")?;
    // What actually carries Skiff's overlay (detected, not assumed), and the anchor's version.
    let backend = fleet.cli_json(&["nodes"])?[0]["wireguard"]["backend"]
        .as_str()
        .unwrap_or("unknown")
        .to_owned();
    let wgo_version = Command::new("wireguard-go")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default();

    // Interleaved rounds: every path once per round, so a slow moment of the machine does not
    // land on one path only. Median of the rounds and the range.
    let mut overlay_runs = Vec::new();
    let mut same_runs = Vec::new();
    let mut veth_runs = Vec::new();
    let mut wgo_runs = Vec::new();
    for round in 1..=r {
        eprintln!("round {round}/{r}: Skiff overlay, one host, plain veth, wireguard-go");
        overlay_runs.push(iperf(&c2.3, &c1.3, &c2.2, s)?);
        same_runs.push(iperf(&l2.3, &l1.3, &l2.2, s)?);
        veth_runs.push(iperf(&h2, &h1, &h2_addr, s)?);
        wgo_runs.push(iperf(&h2, &h1, "10.99.0.2", s)?);
    }
    let stat = |v: &[f64]| -> (f64, f64, f64) {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let overlay = (stat(&overlay_runs), ping(&c1.3, &c2.2)?);
    let same_host = (stat(&same_runs), ping(&l1.3, &l2.2)?);
    let veth = (stat(&veth_runs), ping(&h1, &h2_addr)?);
    let wg_go = (stat(&wgo_runs), ping(&h1, "10.99.0.2")?);
    let tunnel_pid = fleet.tunnel_pid("a1")?.context("a1's tunnel")?;
    let tunnel_rss = peak_rss_mib(tunnel_pid).max(peak_rss_mib(
        fleet.tunnel_pid("a2")?.context("a2's tunnel")?,
    ));
    let wgo_pids: Vec<i32> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("wireguard-go\0-f\0wgb"))
                .unwrap_or(false)
        })
        .collect();
    let wgo_rss = wgo_pids
        .iter()
        .map(|p| peak_rss_mib(*p))
        .fold(0.0, f64::max);

    // Each round's ratios, so the spread of a ratio is shown, not only the ratio of medians.
    let per_round = |a: &[f64], b: &[f64]| -> (f64, f64, f64) {
        let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y.max(1e-9)).collect();
        stat(&r)
    };
    let vs_wgo = per_round(&overlay_runs, &wgo_runs);
    let vs_veth = per_round(&overlay_runs, &veth_runs);
    // Whether the tunnels ran with their offloads (each says so when it starts).
    let offloads = {
        let log = std::fs::read_to_string(fleet.agent_data("a1")?.join("net/wg/tunnel.log"))
            .unwrap_or_default();
        if log.contains("TUN offloads (TSO, checksum): on") {
            "on"
        } else {
            "off"
        }
    };
    let env = if std::env::var("SKIFF_WG_OFFLOAD").is_ok_and(|v| v == "off") {
        "SKIFF_WG_OFFLOAD=off "
    } else {
        ""
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let head = "## Overlay network: container to container vs veth and wireguard-go";
    let row = |name: &str, ((gbps, lo, hi), rtt): ((f64, f64, f64), f64), note: &str| {
        format!("| {name} | {gbps:.2} ({lo:.2} to {hi:.2}) | {rtt:.0} | {note} |")
    };
    let lines = [
        head.to_owned(),
        String::new(),
        format!(
            "- Date: {} (UTC); machine: {cores} cores; release build; command: \
             `{env}SKIFF_BIN_DIR=target/release target/release/skiff-bench-overlay --write-md BENCHMARKS.md` \
             ({s} s iperf3 runs, {r} interleaved rounds: median and range; 200 pings 10 ms apart).",
            skiff_e2e::utc_date()
        ),
        format!(
            "- Setup: a netns fleet (one controller, two agents, hosts on a bridge, MTU 1500). Skiff's \
             WireGuard backend as the agents report it: {backend} (this kernel has no WireGuard module, \
             so userspace: a process of its own, WireGuard's protocol from agent/src/net/wg/noise.rs \
             (a peer's packets sealed and opened on every queue at once), a TUN queue and a UDP \
             socket per core, 4 MiB UDP buffers; TUN offloads (TSO, checksum) with UDP GSO/GRO: \
             {offloads}), pod MTU 1420. \
             iperf3 and ping run in the containers' network namespaces. The overlay path crosses two \
             more veths and bridges than the host-to-host anchors; wireguard-go ({wgo_version}, \
             Debian's) gets the same hosts, MTU and buffer defaults as it ships."
        ),
        String::new(),
        "| path | iperf3 Gbit/s | ping avg µs | |".to_owned(),
        "|---|---|---|---|".to_owned(),
        row(
            "Skiff overlay, container to container across hosts",
            overlay,
            &format!(
                "{:.2}x wireguard-go's throughput (rounds {:.2}x to {:.2}x)",
                vs_wgo.0, vs_wgo.1, vs_wgo.2
            ),
        ),
        row(
            "wireguard-go (Debian), host to host, same hosts",
            wg_go,
            "anchor: userspace WireGuard, configured with wg",
        ),
        row(
            "plain veth routing, host to host",
            veth,
            &format!(
                "ceiling; the overlay gets {:.0}% of it (rounds {:.0}% to {:.0}%)",
                vs_veth.0 * 100.0,
                vs_veth.1 * 100.0,
                vs_veth.2 * 100.0
            ),
        ),
        row(
            "Skiff, two containers on one host",
            same_host,
            "bridge only, no tunnel",
        ),
        String::new(),
        format!(
            "- Peak RSS during the runs: Skiff tunnel process {tunnel_rss:.1} MiB, wireguard-go \
             {wgo_rss:.1} MiB ({:.2}x).",
            tunnel_rss / wgo_rss.max(0.001)
        ),
        String::new(),
    ];
    skiff_e2e::publish(head, &lines.join("\n"), args.write_md.as_deref())?;
    Ok(())
}
