//! DNS benchmark (needs root, dnsperf, dnsmasq, unbound): on a netns fleet of one controller
//! and one agent, a service with 5 endpoints; dnsperf against the agent's DNS (on its bridge
//! address) and, on the same simulated host in the same run, against dnsmasq and unbound
//! serving the same A and SRV records, and forwarding the same share of names outside the zone
//! to the same upstream (a dnsmasq on the fleet's `cli` host, where the agents forward). Queries/s,
//! average latency, and the server's CPU time per query (from /proc/PID/stat around each run).
//!
//! Like against like: unbound runs as many threads as the agent has DNS sockets (one per
//! core); dnsmasq is single-threaded by design. Half the load carries EDNS0 (two dnsperf
//! processes at once, one with `-e`), as resolvers that advertise a larger UDP size send it.
//!
//!   SKIFF_BIN_DIR=target/release target/release/skiff-bench-dns [--seconds 10] [--write-md BENCHMARKS.md]

#![forbid(unsafe_code)]

use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use skiff_e2e::fleet::Fleet;

/// The domain outside the zone the mix asks for, and what its upstream answers.
const FORWARDED: &str = "fwd.test";
const FORWARDED_IP: &str = "198.18.255.1";

#[derive(Parser)]
struct Args {
    /// Seconds per dnsperf run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Interleaved rounds (each server once per round); medians and ranges are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Replace (or add) the DNS section of this markdown file.
    #[arg(long)]
    write_md: Option<PathBuf>,
}

/// Medians over the rounds, and the range of queries/s.
struct Summary {
    qps: f64,
    qps_lo: f64,
    qps_hi: f64,
    latency_us: f64,
    cpu_us_per_query: f64,
    edns_share: f64,
}

impl Summary {
    fn of(runs: &[Result1]) -> Summary {
        let median = |f: fn(&Result1) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let qps: Vec<f64> = runs.iter().map(|r| r.qps).collect();
        Summary {
            qps: median(|r| r.qps),
            qps_lo: qps.iter().copied().fold(f64::INFINITY, f64::min),
            qps_hi: qps.iter().copied().fold(0.0, f64::max),
            latency_us: median(|r| r.latency_us),
            cpu_us_per_query: median(|r| r.cpu_us_per_query),
            edns_share: median(|r| r.edns_share),
        }
    }
}

struct Result1 {
    qps: f64,
    latency_us: f64,
    cpu_us_per_query: f64,
    /// The share of completed queries that carried EDNS0.
    edns_share: f64,
}

/// One dnsperf process's figures.
struct Half {
    completed: f64,
    qps: f64,
    latency_s: f64,
}

fn dnsperf_one(
    fleet: &Fleet,
    host: &str,
    server: &str,
    port: u16,
    data: &std::path::Path,
    seconds: u32,
    edns: bool,
) -> Result<Half> {
    let port = port.to_string();
    let data = data.display().to_string();
    let seconds = seconds.to_string();
    let mut argv = vec![
        "dnsperf", "-s", server, "-p", &port, "-d", &data, "-l", &seconds, "-c", "2", "-q", "100",
    ];
    if edns {
        argv.push("-e");
    }
    let out = fleet.on_host(host, &argv)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "dnsperf {server}:{port}: {text}");
    let field = |key: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let completed = field("Queries completed").context("dnsperf: completed")?;
    let lost = field("Queries lost").unwrap_or(0.0);
    ensure!(
        completed > 0.0 && lost / (completed + lost) < 0.01,
        "{server}:{port} lost queries: {text}"
    );
    Ok(Half {
        completed,
        qps: field("Queries per second").context("dnsperf: qps")?,
        latency_s: field("Average Latency (s)").context("dnsperf: latency")?,
    })
}

/// The mixed load: two dnsperf processes at once (4 clients, 200 outstanding in all), one
/// sending EDNS0 with every query; the server's CPU time is read around both.
fn dnsperf(
    fleet: &Fleet,
    host: &str,
    server: &str,
    port: u16,
    data: &std::path::Path,
    seconds: u32,
    pid: u32,
) -> Result<Result1> {
    let before = skiff_e2e::cpu_seconds(pid);
    let (plain, edns) = std::thread::scope(|s| {
        let plain = s.spawn(|| dnsperf_one(fleet, host, server, port, data, seconds, false));
        let edns = s.spawn(|| dnsperf_one(fleet, host, server, port, data, seconds, true));
        (
            plain
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("dnsperf thread"))),
            edns.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("dnsperf thread"))),
        )
    });
    let (plain, edns) = (plain?, edns?);
    let cpu = skiff_e2e::cpu_seconds(pid) - before;
    let completed = plain.completed + edns.completed;
    Ok(Result1 {
        qps: plain.qps + edns.qps,
        latency_us: (plain.latency_s * plain.completed + edns.latency_s * edns.completed)
            / completed
            * 1e6,
        cpu_us_per_query: cpu / completed * 1e6,
        edns_share: edns.completed / completed,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    skiff_e2e::fleet::bench_on_fleet(
        1,
        1,
        &["dnsperf", "dnsmasq", "unbound", "dig"],
        "dnsperf dnsmasq-base unbound bind9-dnsutils",
        |fleet, helpers| run(fleet, &args, helpers),
    )
}

fn run(fleet: &Fleet, args: &Args, anchors: &mut Vec<std::process::Child>) -> Result<()> {
    let spec = fleet.spec(
        "web",
        &format!(
            "name = \"web\"\nreplicas = 5\nimage = \"{}\"\ncommand = [\"/bin/sleep\"]\nargs = [\"3600\"]\n\
             stop_signal = \"SIGKILL\"\n[[ports]]\nname = \"http\"\nport = 8080\n[service]\nport = \"http\"\n\
             [resources]\ncpu = 0.05\nmemory = \"16Mi\"\n",
            fleet.image()
        ),
    )?;
    fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
    let mut eps: Vec<(String, String)> = Vec::new();
    fleet.wait_for("5 ready endpoints", Duration::from_secs(40), |f| {
        let list = f.cli_json(&["services"])?;
        eps = list
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["ready"] == true)
            .map(|e| {
                (
                    e["allocation"].as_str().unwrap_or_default().to_owned(),
                    e["ip"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        Ok(eps.len() == 5)
    })?;
    // The service's name answers its virtual IP; each endpoint has a name of its own.
    let vip = fleet
        .cli_json(&["services"])?
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "web")
        .and_then(|s| s["vip"].as_str())
        .context("the service's virtual IP")?
        .to_owned();
    let nodes = fleet.cli_json(&["nodes"])?;
    let subnet = nodes[0]["subnet"].as_str().context("subnet")?.to_owned();
    let gateway = format!("{}.1", subnet.rsplit_once('.').context("subnet")?.0);
    let dir = fleet.dir();

    // The same records for the anchors.
    let base = "web.default.skiff.internal";
    let mut hosts = std::fs::File::create(dir.join("dns-hosts"))?;
    let mut local_data = format!("    local-data: \"{base}. 5 IN A {vip}\"\n");
    writeln!(hosts, "{vip} {base}")?;
    let mut srv_args = Vec::new();
    for (alloc, ip) in &eps {
        writeln!(hosts, "{ip} {alloc}.{base}")?;
        local_data += &format!("    local-data: \"{alloc}.{base}. 5 IN A {ip}\"\n");
        local_data +=
            &format!("    local-data: \"_http._tcp.{base}. 5 IN SRV 0 10 8080 {alloc}.{base}.\"\n");
        srv_args.push(format!(
            "--srv-host=_http._tcp.{base},{alloc}.{base},8080,0,10"
        ));
    }
    drop(hosts);
    let mut dnsmasq = vec![
        "dnsmasq".to_owned(),
        "--no-daemon".into(),
        "--port=5302".into(),
        "--listen-address=127.0.0.1".into(),
        "--bind-interfaces".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        format!("--addn-hosts={}", dir.join("dns-hosts").display()),
        "--local=/skiff.internal/".into(),
        "--local-ttl=5".into(),
        "--user=root".into(),
        "--pid-file=".into(),
    ];
    dnsmasq.extend(srv_args);
    // Names outside the zone: the upstream the agents forward to (the fleet gives every agent
    // `--dns-upstream CLI_ADDR:53`), answering every name under fwd.test, TTL 300.
    let upstream = fleet.host("cli")?.addr.clone();
    dnsmasq.push(format!("--server=/{FORWARDED}/{upstream}"));
    // As many unbound threads as the agent has DNS sockets (one per core). unbound serves
    // `test.` itself as an empty zone unless told not to (RFC 6761's special-use names).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let unbound_conf = dir.join("unbound.conf");
    std::fs::write(
        &unbound_conf,
        format!(
            "server:\n    interface: 127.0.0.1@5303\n    num-threads: {cores}\n    so-reuseport: yes\n    do-daemonize: no\n    chroot: \"\"\n\
             username: \"\"\n    directory: \"{}\"\n    pidfile: \"\"\n    use-syslog: no\n    logfile: \"\"\n\
             verbosity: 0\n    access-control: 127.0.0.0/8 allow\n    do-ip6: no\n\
             local-zone: \"skiff.internal.\" static\n{local_data}\
                 local-zone: \"test.\" nodefault\n\
             forward-zone:\n    name: \"{FORWARDED}.\"\n    forward-addr: {upstream}@53\n",
            dir.display()
        ),
    )?;

    let host = fleet.host("a1")?;
    let ns = format!("--net=/run/netns/{}", host.netns);
    for argv in [
        dnsmasq,
        vec![
            "unbound".to_owned(),
            "-d".into(),
            "-c".into(),
            unbound_conf.display().to_string(),
        ],
    ] {
        anchors.push(
            Command::new("nsenter")
                .arg(&ns)
                .arg("--")
                .args(&argv)
                .process_group(0)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    // After the two anchors: their pids are the first two.
    let upstream_ns = format!("--net=/run/netns/{}", fleet.host("cli")?.netns);
    anchors.push(
        Command::new("nsenter")
            .arg(&upstream_ns)
            .arg("--")
            .args([
                "dnsmasq",
                "--no-daemon",
                "--port=53",
                &format!("--listen-address={upstream}"),
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                &format!("--address=/{FORWARDED}/{FORWARDED_IP}"),
                "--local-ttl=300",
                "--user=root",
                "--pid-file=",
            ])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    for (server, port) in [
        (gateway.as_str(), 53u16),
        ("127.0.0.1", 5302),
        ("127.0.0.1", 5303),
    ] {
        fleet.wait_for(
            &format!("{server}:{port} to answer"),
            Duration::from_secs(10),
            |f| {
                let answer = |name: &str| -> Result<String> {
                    let out = f.on_host(
                        "a1",
                        &[
                            "dig",
                            "+time=1",
                            "+tries=1",
                            "-p",
                            &port.to_string(),
                            &format!("@{server}"),
                            name,
                            "A",
                            "+short",
                        ],
                    )?;
                    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
                };
                Ok(answer(base)? == vip && answer(&format!("ready.{FORWARDED}"))? == FORWARDED_IP)
            },
        )?;
    }
    // The pids of the anchors' servers (nsenter exec'd them: same pid).
    let pids: Vec<u32> = anchors.iter().map(std::process::Child::id).collect();
    let agent = fleet.agent_pid("a1")?.context("agent pid")?;

    // The query mix: A, SRV, names that do not exist, as a service mesh asks, and names
    // outside the zone (20 of them, each asked again while its TTL runs).
    let data = dir.join("queries.txt");
    let mut q = String::new();
    for i in 0..100 {
        q += &match i % 20 {
            0..=7 => format!("{base} A\n"),
            8..=12 => format!("_http._tcp.{base} SRV\n"),
            13..=15 => format!("nope{i}.default.skiff.internal A\n"),
            _ => format!("n{i}.{FORWARDED} A\n"),
        };
    }
    std::fs::write(&data, q)?;

    let s = args.seconds;
    let mut runs: [Vec<Result1>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for round in 1..=args.rounds.max(1) {
        eprintln!("round {round}/{}: skiff, dnsmasq, unbound", args.rounds);
        runs[0].push(dnsperf(fleet, "a1", &gateway, 53, &data, s, agent)?);
        runs[1].push(dnsperf(fleet, "a1", "127.0.0.1", 5302, &data, s, pids[0])?);
        runs[2].push(dnsperf(fleet, "a1", "127.0.0.1", 5303, &data, s, pids[1])?);
    }
    // Each round's own ratio (skiff's queries/s over the anchor's in the same round).
    let ratio = |anchor: usize| {
        let mut r: Vec<f64> = runs[0]
            .iter()
            .zip(&runs[anchor])
            .map(|(a, b)| a.qps / b.qps)
            .collect();
        r.sort_by(f64::total_cmp);
        let (lo, hi) = (r[0], r[r.len() - 1]);
        format!("{:.2}x ({lo:.2} to {hi:.2})", r[r.len() / 2])
    };
    let (vs_dnsmasq, vs_unbound) = (ratio(1), ratio(2));
    // The anchors' versions as Debian packaged them.
    let versions = Command::new("dpkg-query")
        .args([
            "-W",
            "-f",
            "${Package} ${Version}; ",
            "dnsmasq-base",
            "unbound",
            "dnsperf",
        ])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim_end_matches("; ")
                .to_owned()
        })
        .unwrap_or_default();
    let [skiff, dnsmasq, unbound] = runs.map(|v| Summary::of(&v));

    let head = "## DNS: the agent's server vs dnsmasq and unbound";
    let row = |name: &str, r: &Summary, note: String| {
        format!(
            "| {name} | {:.0} ({:.0} to {:.0}) | {:.0} | {:.1} | {note} |",
            r.qps, r.qps_lo, r.qps_hi, r.latency_us, r.cpu_us_per_query
        )
    };
    let lines = [
        head.to_owned(),
        String::new(),
        format!(
            "- Date: {} (UTC); machine: {cores} cores; release build; command: \
             `SKIFF_BIN_DIR=target/release target/release/skiff-bench-dns --write-md BENCHMARKS.md` \
             ({} interleaved rounds, medians; dnsperf {s} s per server per round: two processes at once, each 2 clients and 100 outstanding, \
             one sending EDNS0 ({:.0}% of the queries Skiff completed); names: 40% A for a \
             service (its virtual IP), 25% its SRV (5 endpoints, their addresses added), 15% NXDOMAIN, \
             20% names outside the zone (20 names under {FORWARDED}, TTL 300 at their upstream, a dnsmasq \
             on another simulated host of the fleet: every server forwards them there and keeps the answers).",
            skiff_e2e::utc_date(),
            args.rounds,
            skiff.edns_share * 100.0
        ),
        format!("- Versions (Debian packages): {versions}."),
        "- All three on the same simulated host (netns), dnsperf alongside; the agent's DNS is \
         measured inside the running agent (its CPU time includes heartbeats and reconcile \
         passes); dnsmasq (`--addn-hosts`, `--srv-host`) and unbound (`local-zone static`, \
         threads, one per core) serve the same records. The agent answers zone queries with or \
         without EDNS0 (an OPT record added to the answer, as RFC 6891 asks) from answers \
         prepared per (name, type) at each service-set change, and everything else through \
         hickory-proto, with one UDP socket per core (SO_REUSEPORT, each query steered to the \
         socket of the CPU that received it by a classic BPF program on the group), each read \
         by a thread of its own up to 32 queries per blocking recvmmsg and answered with one \
         sendmmsg; answers from the upstream are kept for their TTL and answered on the \
         receiving thread too. unbound gets as many threads as the agent has sockets (and \
         `so-reuseport: yes`, its sockets hashed by sender: it has no CPU steering); dnsmasq \
         has one thread by design. \
         Ratios are the median of the rounds' own ratios, with their range."
            .to_owned(),
        String::new(),
        "| server | queries/s, median (range) | avg latency µs | CPU µs/query | |".to_owned(),
        "|---|---|---|---|---|".to_owned(),
        row(
            "skiff-agent DNS",
            &skiff,
            format!(
                "{vs_dnsmasq} dnsmasq's queries/s, {:.2}x its CPU per query",
                skiff.cpu_us_per_query / dnsmasq.cpu_us_per_query
            ),
        ),
        row("dnsmasq", &dnsmasq, "anchor".into()),
        row(
            "unbound",
            &unbound,
            format!("skiff {vs_unbound} its queries/s"),
        ),
        String::new(),
    ];
    skiff_e2e::publish(head, &lines.join("\n"), args.write_md.as_deref())?;
    Ok(())
}
