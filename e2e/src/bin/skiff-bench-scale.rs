//! `skiff-bench-scale`: the control plane with hundreds of nodes on one machine. A 3-member
//! `skiff-controller` cluster on loopback and `skiff-agent simulate --count N` (N simulated
//! nodes in one process, each with its own certificate, running the agent's own session and
//! reconciler code against an in-memory runtime). Per node count, measured in rounds
//! interleaved over the counts:
//!
//! - registration: from starting the simulator to every node ready;
//! - steady state (heartbeats every second, nothing changing): CPU and RSS of the leader and
//!   of a follower over `--steady` seconds, Raft entries written per second;
//! - apply of a `--replicas` job: until every allocation is reported running; the Raft
//!   entries it took, and the watch fan-out (assignment messages and bytes the nodes received
//!   per applied entry);
//! - a rollout of it (`max_surge` 25%, `min_healthy` 1s): until it succeeds;
//! - leader failover (SIGKILL): until every node's heartbeat is answered again, and whether
//!   any node was marked down.
//!
//! ```text
//! cargo build --release -p skiff-controller -p skiff-agent -p skiff-e2e --bin skiff-bench-scale
//! target/release/skiff-bench-scale --nodes 100,250,500 --rounds 3 --write-md BENCHMARKS.md
//! ```
//!
//! Everything runs on loopback (the simulated nodes have 127.1.x.y addresses; nothing dials
//! them) in a fresh temp dir, removed at the end; every process is SIGKILLed on exit, on error
//! and on Ctrl-C. No anchor runs here (neither Nomad nor Kubernetes is installed); published
//! figures are quoted in BENCHMARKS.md as orders of magnitude.

#![forbid(unsafe_code)]

#[path = "../bench/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "../bench/etcd.rs"]
#[allow(dead_code)]
mod etcd;
#[path = "../bench/procs.rs"]
mod procs;
#[path = "../bench/report.rs"]
#[allow(dead_code)]
mod report;
#[path = "../bench/skiff.rs"]
mod skiff;
#[path = "../bench/workload.rs"]
#[allow(dead_code)]
mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use cluster::Cluster;
use skiff_proto::v1 as pb;
use tokio::time::{Instant, sleep};

/// Bound on forming the cluster.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// Control-plane scale benchmark with simulated nodes.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Node counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,250,500")]
    nodes: Vec<usize>,
    /// Rounds per node count (interleaved: every count once per round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Replicas of the job applied and rolled out.
    #[arg(long, default_value_t = 1000)]
    replicas: u32,
    /// Seconds of steady state measured.
    #[arg(long, default_value_t = 10)]
    steady: u64,
    /// Bound on each phase (registration, apply, rollout, failover), seconds.
    #[arg(long, default_value_t = 300)]
    phase_timeout: u64,
    /// Where skiff-controller and skiff-agent are [default: this executable's directory].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Parent of the temp dir.
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Replace (or add) the scale section of this markdown file.
    #[arg(long)]
    write_md: Option<PathBuf>,
}

const SECTION: &str = "## Control plane at scale: simulated nodes";

fn main() -> ExitCode {
    procs::main_until_interrupted(Some(1), run(Args::parse()))
}

/// One round at one node count.
#[derive(Debug, Clone, Default)]
struct Round {
    register: Duration,
    /// CPU (cores) of the simulator and of the leader while the nodes registered.
    register_sim_cpu: f64,
    register_leader_cpu: f64,
    leader_cpu: f64,
    follower_cpu: f64,
    sim_cpu: f64,
    leader_rss_mib: f64,
    follower_rss_mib: f64,
    steady_entries_per_s: f64,
    apply: Duration,
    apply_entries: u64,
    fanout_msgs_per_entry: f64,
    fanout_kib_per_entry: f64,
    apply_leader_cpu_s: f64,
    rollout: Duration,
    failover: Duration,
    nodes_down_after_failover: usize,
    /// Sessions the nodes started again before the failover (a heartbeat unanswered for
    /// 2 s, a stream broken): registrations beyond the first of each node.
    restarts_before_failover: u64,
    /// The same, by the phase they fell in: registration, steady state, apply, rollout.
    restarts_by_phase: [u64; 4],
    /// Why sessions ended before the failover, as the simulator logged it, with counts.
    restart_causes: BTreeMap<String, u64>,
}

async fn run(args: Args) -> Result<()> {
    ensure!(
        !args.nodes.is_empty() && args.rounds > 0,
        "--nodes and --rounds must not be empty or 0"
    );
    ensure!(
        args.nodes.iter().all(|&n| (1..=1000).contains(&n)),
        "--nodes: each count must be 1..=1000 (/26 subnets of 10.42.0.0/16)"
    );
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("locate the current executable")?
            .parent()
            .context("no parent directory")?
            .to_path_buf(),
    };
    for b in ["skiff-controller", "skiff-agent"] {
        ensure!(
            bin_dir.join(b).is_file(),
            "{} not found; build it with `cargo build --release -p {b}` or pass --bin-dir",
            bin_dir.join(b).display()
        );
    }
    let base = args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("skiff-bench-scale-")
        .tempdir_in(&base)
        .with_context(|| format!("create a temp dir in {}", base.display()))?;
    let load_at_start = report::load_average();
    let mut results: BTreeMap<usize, Vec<Round>> = BTreeMap::new();
    for round in 0..args.rounds {
        for &n in &args.nodes {
            let dir = tmp.path().join(format!("n{n}-r{round}"));
            std::fs::create_dir_all(&dir)?;
            eprintln!("round {} / {}: {n} nodes", round + 1, args.rounds);
            let r = measure(&args, &bin_dir, &dir, n)
                .await
                .with_context(|| format!("{n} nodes, round {}", round + 1))?;
            eprintln!("  {r:?}");
            results.entry(n).or_default().push(r);
            // Each round's state is gone with its processes (kept with SKIFF_BENCH_KEEP=1, to
            // read the logs).
            if std::env::var_os("SKIFF_BENCH_KEEP").is_none() {
                std::fs::remove_dir_all(&dir).ok();
            }
        }
    }
    if std::env::var_os("SKIFF_BENCH_KEEP").is_some() {
        eprintln!("logs kept in {}", tmp.keep().display());
    }
    let md = section(&args, &results, &load_at_start);
    println!("\n{md}");
    if let Some(path) = &args.write_md {
        report::write_titled_section(path, SECTION, &md)?;
        eprintln!("wrote section {SECTION:?} in {}", path.display());
    }
    Ok(())
}

/// The simulator's latest counters (its JSON report lines).
#[derive(Debug, Default, Clone)]
struct SimReport {
    assignments: u64,
    assignment_bytes: u64,
    running: usize,
    min_answered_ms: u64,
    registrations: u64,
}

impl SimReport {
    fn parse(line: &str) -> Option<SimReport> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let get = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
        Some(SimReport {
            assignments: get("assignments")?,
            assignment_bytes: get("assignment_bytes")?,
            running: get("running")? as usize,
            min_answered_ms: get("min_answered_ms")?,
            registrations: get("registrations")?,
        })
    }
}

/// The reasons the simulated nodes gave for ending sessions ("controller connection lost"),
/// each with how often it was given.
fn session_end_causes(log: &Path) -> Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    let mut causes = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.contains("controller connection lost"))
    {
        let line = strip_ansi(line);
        let cause = line
            .split_once("error=")
            .map_or(line.as_str(), |(_, e)| e)
            .trim()
            .chars()
            .take(90)
            .collect::<String>();
        *causes.entry(cause).or_default() += 1;
    }
    Ok(causes)
}

/// `line` without terminal colour sequences (ESC [ ... m).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn sim_report(log: &Path) -> Result<SimReport> {
    let text = std::fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    text.lines()
        .rev()
        .filter(|l| l.starts_with("{\"t_ms\""))
        .find_map(SimReport::parse)
        .with_context(|| format!("no report line in {} yet", log.display()))
}

/// CPU seconds (user + system) and RSS bytes of a process.
fn proc_usage(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    // USER_HZ is 100 on Linux for /proc.
    Ok((ticks as f64 / 100.0, rss_kib * 1024))
}

/// The leader's applied index, from its /metrics.
async fn applied_index(c: &skiff::Skiff, member: usize) -> Result<u64> {
    let body = skiff::http_get(c.http_addr(member), "/metrics").await?;
    body.lines()
        .find_map(|l| l.strip_prefix("skiff_raft_applied_index "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("no skiff_raft_applied_index in /metrics")
}

async fn wait<T>(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    let mut last = String::from("not yet");
    while Instant::now() < deadline {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        sleep(Duration::from_millis(200)).await;
    }
    bail!("{what}: not within {limit:?} ({last})")
}

fn job_spec(replicas: u32, version: &str) -> String {
    format!(
        "name = \"scale\"\nimage = \"127.0.0.1:5000/scale/web:1\"\nreplicas = {replicas}\n\
         env = {{ VERSION = \"{version}\" }}\n\
         [resources]\ncpu = 0.01\nmemory = \"16Mi\"\n\
         [update]\nmax_surge = \"25%\"\nmax_unavailable = \"25%\"\nmin_healthy = \"1s\"\n"
    )
}

async fn measure(args: &Args, bin_dir: &Path, dir: &Path, n: usize) -> Result<Round> {
    let limit = Duration::from_secs(args.phase_timeout);
    let mut c = skiff::Skiff::start_with(
        &bin_dir.join("skiff-controller"),
        dir,
        Instant::now() + START_DEADLINE,
        &["--node-subnet-prefix", "26"],
    )
    .await?;
    let token = c.token_for("agent").await?;
    let mut sim = procs::Procs::default();
    let sim_log = dir.join("simulate.log");
    let mut cmd = Command::new(bin_dir.join("skiff-agent"));
    cmd.arg("--data-dir")
        .arg(dir.join("sim"))
        .arg("simulate")
        .arg("--controller")
        .arg(c.rpc_addrs().join(","))
        .arg("--count")
        .arg(n.to_string())
        .arg("--join-token")
        .arg(&token)
        .arg("--report-every")
        .arg("200ms");
    let leader = c.leader(Instant::now() + limit).await?;
    let (leader_cpu0, _) = proc_usage(c.pid(leader).context("leader not running")?)?;
    let started = Instant::now();
    sim.spawn("simulate", cmd, &sim_log)?;
    let sim_pid = sim.pid("simulate").context("simulator pid")?;
    let mut r = Round::default();

    // Registration: every node ready in the cluster's state.
    let channel = c.channel(&c.rpc_addrs()[leader]).await?;
    let mut nodes = pb::nodes_client::NodesClient::new(channel.clone());
    let mut jobs = pb::jobs_client::JobsClient::new(channel);
    wait("every node ready", limit, async || {
        sim.check_alive("simulate")?;
        let list = nodes
            .list_nodes(pb::ListNodesRequest::default())
            .await?
            .into_inner();
        let ready = list
            .nodes
            .iter()
            .filter(|x| x.status == pb::NodeStatus::Ready as i32)
            .count();
        Ok((ready == n).then_some(()))
    })
    .await?;
    r.register = started.elapsed();
    r.register_sim_cpu = proc_usage(sim_pid)?.0 / r.register.as_secs_f64();
    r.register_leader_cpu = (proc_usage(c.pid(leader).context("leader not running")?)?.0
        - leader_cpu0)
        / r.register.as_secs_f64();
    let restarts = |r: &SimReport| r.registrations.saturating_sub(n as u64);
    let mut phase_restarts = vec![restarts(&sim_report(&sim_log)?)];

    // Steady state.
    sleep(Duration::from_secs(3)).await;
    let follower = (leader + 1) % 3;
    let pid = |i: usize| c.pid(i).context("member not running");
    let (l0, _) = proc_usage(pid(leader)?)?;
    let (f0, _) = proc_usage(pid(follower)?)?;
    let (s0, _) = proc_usage(sim_pid)?;
    let i0 = applied_index(&c, leader).await?;
    let t0 = Instant::now();
    sleep(Duration::from_secs(args.steady)).await;
    let secs = t0.elapsed().as_secs_f64();
    let (l1, lrss) = proc_usage(pid(leader)?)?;
    let (f1, frss) = proc_usage(pid(follower)?)?;
    let (s1, _) = proc_usage(sim_pid)?;
    let i1 = applied_index(&c, leader).await?;
    r.leader_cpu = (l1 - l0) / secs;
    r.follower_cpu = (f1 - f0) / secs;
    r.sim_cpu = (s1 - s0) / secs;
    r.leader_rss_mib = lrss as f64 / (1 << 20) as f64;
    r.follower_rss_mib = frss as f64 / (1 << 20) as f64;
    r.steady_entries_per_s = (i1 - i0) as f64 / secs;

    // Apply: every replica reported running.
    let before = sim_report(&sim_log)?;
    phase_restarts.push(restarts(&before));
    let (la0, _) = proc_usage(pid(leader)?)?;
    let t0 = Instant::now();
    jobs.apply_job(pb::ApplyJobRequest {
        spec: job_spec(args.replicas, "1"),
        format: pb::SpecFormat::Toml as i32,
    })
    .await
    .context("apply")?;
    let want = args.replicas as usize;
    wait("every replica running", limit, async || {
        let list = jobs
            .list_allocations(pb::ListAllocationsRequest {
                job: "scale".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let running = list
            .allocations
            .iter()
            .filter(|a| a.observed == pb::AllocationState::Running as i32)
            .count();
        Ok((running == want).then_some(()))
    })
    .await?;
    r.apply = t0.elapsed();
    let (la1, _) = proc_usage(pid(leader)?)?;
    r.apply_leader_cpu_s = la1 - la0;
    let i2 = applied_index(&c, leader).await?;
    // The simulator reports every 200 ms: wait for a line written after the last change.
    sleep(Duration::from_millis(500)).await;
    let after = sim_report(&sim_log)?;
    r.apply_entries = i2.saturating_sub(i1).max(1);
    r.fanout_msgs_per_entry =
        (after.assignments - before.assignments) as f64 / r.apply_entries as f64;
    r.fanout_kib_per_entry =
        (after.assignment_bytes - before.assignment_bytes) as f64 / 1024.0 / r.apply_entries as f64;
    ensure!(
        after.running == want,
        "the simulator runs {} of {want}",
        after.running
    );

    phase_restarts.push(restarts(&after));

    // Rollout.
    let t0 = Instant::now();
    let v2 = jobs
        .apply_job(pb::ApplyJobRequest {
            spec: job_spec(args.replicas, "2"),
            format: pb::SpecFormat::Toml as i32,
        })
        .await
        .context("apply version 2")?
        .into_inner()
        .job
        .context("ApplyJob answered no job")?
        .version;
    wait("the rollout succeeded", limit, async || {
        let job = jobs
            .get_job(pb::GetJobRequest {
                name: "scale".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let Some(ro) = job.rollouts.first() else {
            return Ok(None);
        };
        ensure!(ro.status != "failed", "rollout failed: {}", ro.reason);
        Ok((ro.version == v2 && ro.status == "succeeded").then_some(()))
    })
    .await?;
    r.rollout = t0.elapsed();

    r.restarts_before_failover = restarts(&sim_report(&sim_log)?);
    phase_restarts.push(r.restarts_before_failover);
    let mut prev = 0;
    for (i, total) in phase_restarts.iter().enumerate() {
        r.restarts_by_phase[i] = total.saturating_sub(prev);
        prev = *total;
    }
    r.restart_causes = session_end_causes(&sim_log)?;
    // Failover: kill the leader; until every node's heartbeat is answered again.
    let killed_at = started.elapsed().as_millis() as u64;
    let t0 = Instant::now();
    c.kill(leader)?;
    wait("every node answered by the new leader", limit, async || {
        sim.check_alive("simulate")?;
        let s = sim_report(&sim_log)?;
        Ok((s.min_answered_ms > killed_at).then_some(()))
    })
    .await?;
    r.failover = t0.elapsed();
    let new_leader = c.leader(Instant::now() + limit).await?;
    let mut nodes =
        pb::nodes_client::NodesClient::new(c.channel(&c.rpc_addrs()[new_leader]).await?);
    let list = nodes
        .list_nodes(pb::ListNodesRequest::default())
        .await?
        .into_inner();
    r.nodes_down_after_failover = list
        .nodes
        .iter()
        .filter(|x| x.status == pb::NodeStatus::Down as i32)
        .count();
    sim.kill_all();
    Ok(r)
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let mid = v[v.len() / 2];
    (mid, v[0], v[v.len() - 1])
}

fn cell(v: Vec<f64>, digits: usize) -> String {
    let (m, lo, hi) = median(v);
    if lo == hi {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
    }
}

fn section(args: &Args, results: &BTreeMap<usize, Vec<Round>>, load: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{SECTION}\n");
    let _ = writeln!(
        s,
        "`target/release/skiff-bench-scale --nodes {} --rounds {} --replicas {}` ({}). A \
         3-member controller cluster on loopback (`--node-subnet-prefix 26`) and one \
         `skiff-agent simulate` process running every node (own certificate, the agent's own \
         session and reconciler code, an in-memory runtime; heartbeats every second). Medians \
         of {} interleaved rounds, range in brackets. Load at start: {load}.\n",
        args.nodes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.rounds,
        args.replicas,
        report::machine(),
        args.rounds,
    );
    let cols: Vec<&usize> = results.keys().collect();
    let _ = writeln!(
        s,
        "| measure | {} |",
        cols.iter()
            .map(|n| format!("{n} nodes"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(s, "|---|{}", "---|".repeat(cols.len()));
    type Get = fn(&Round) -> f64;
    let rows: [(&str, Get, usize); 18] = [
        (
            "registration, all ready (s)",
            |r| r.register.as_secs_f64(),
            1,
        ),
        (
            "registration: simulator CPU (cores)",
            |r| r.register_sim_cpu,
            2,
        ),
        (
            "registration: leader CPU (cores)",
            |r| r.register_leader_cpu,
            2,
        ),
        ("steady: leader CPU (cores)", |r| r.leader_cpu, 3),
        ("steady: follower CPU (cores)", |r| r.follower_cpu, 3),
        ("steady: simulator CPU (cores)", |r| r.sim_cpu, 3),
        ("steady: leader RSS (MiB)", |r| r.leader_rss_mib, 0),
        ("steady: follower RSS (MiB)", |r| r.follower_rss_mib, 0),
        ("steady: Raft entries/s", |r| r.steady_entries_per_s, 2),
        ("apply: all running (s)", |r| r.apply.as_secs_f64(), 1),
        ("apply: Raft entries", |r| r.apply_entries as f64, 0),
        ("apply: leader CPU (s)", |r| r.apply_leader_cpu_s, 1),
        (
            "apply: watch messages per entry",
            |r| r.fanout_msgs_per_entry,
            1,
        ),
        ("apply: watch KiB per entry", |r| r.fanout_kib_per_entry, 1),
        ("rollout to success (s)", |r| r.rollout.as_secs_f64(), 1),
        (
            "re-registrations before the failover",
            |r| r.restarts_before_failover as f64,
            0,
        ),
        (
            "failover: all nodes answered (s)",
            |r| r.failover.as_secs_f64(),
            1,
        ),
        (
            "failover: nodes marked down",
            |r| r.nodes_down_after_failover as f64,
            0,
        ),
    ];
    for (name, get, digits) in rows {
        let _ = write!(s, "| {name} |");
        for n in &cols {
            let v: Vec<f64> = results[n].iter().map(get).collect();
            let _ = write!(s, " {} |", cell(v, digits));
        }
        s.push('\n');
    }
    // Where the re-registrations fell, round by round, and why the sessions ended.
    let mut lines = Vec::new();
    for n in &cols {
        let by_round: Vec<String> = results[n]
            .iter()
            .map(|r| {
                let p = r.restarts_by_phase;
                format!("{}/{}/{}/{}", p[0], p[1], p[2], p[3])
            })
            .collect();
        let mut causes: BTreeMap<&str, u64> = BTreeMap::new();
        for r in &results[n] {
            for (c, k) in &r.restart_causes {
                *causes.entry(c.as_str()).or_default() += k;
            }
        }
        let causes: Vec<String> = causes
            .iter()
            .map(|(c, k)| format!("{k} × \"{c}\""))
            .collect();
        lines.push(format!(
            "{n} nodes: {}{}",
            by_round.join(", "),
            if causes.is_empty() {
                String::new()
            } else {
                format!(" (sessions ended: {})", causes.join("; "))
            }
        ));
    }
    let _ = writeln!(
        s,
        "\nRe-registrations by phase (registration/steady/apply/rollout), each round: {}.",
        lines.join("; ")
    );
    s
}
