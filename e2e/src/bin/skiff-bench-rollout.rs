//! Rollout benchmark (needs root): on a netns fleet of 1 controller and 3 agents, a web job of
//! 10 replicas (busybox httpd, an HTTP check) rolls to a new version, round after round, while
//! a client in a container calls the service by name (one connection per request). Per round:
//! the time from `apply` to the rollout's success, against the floor its settings set
//! (`ceil(replicas / (max_surge + max_unavailable))` waves of `min_healthy` each), the extremes
//! of running and ready replicas, and the requests that failed (the goal: none). No anchor:
//! neither Kubernetes nor Nomad runs here.
//!
//!   target/release/skiff-bench-rollout [--rounds 3] [--write-md BENCHMARKS.md]

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use clap::Parser;
use skiff_e2e::fleet::Fleet;

#[derive(Parser)]
struct Args {
    /// Rollouts measured.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Replace (or add) the rollout section of this markdown file.
    #[arg(long)]
    write_md: Option<PathBuf>,
}

const REPLICAS: u32 = 10;
const SURGE: u32 = 2;
const UNAVAILABLE: u32 = 1;
const MIN_HEALTHY_S: u64 = 2;
const DRAIN_S: u64 = 2;
const HEADING: &str = "## Rollouts: 10 replicas, duration vs the floor, failed requests";

fn spec(fleet: &Fleet, v: usize) -> Result<String> {
    let path = fleet.spec(
        &format!("web-{v}"),
        &format!(
            "name = \"web\"\nreplicas = {REPLICAS}\nimage = \"{img}\"\n\
             command = [\"/bin/sh\", \"-c\", \"mkdir -p /tmp/www && echo v$VERSION > /tmp/www/id && exec httpd -f -p 8080 -h /tmp/www\"]\n\
             stop_signal = \"SIGKILL\"\nenv = {{ VERSION = \"{v}\" }}\n\
             [[ports]]\nname = \"http\"\nport = 8080\n\
             [service]\nport = \"http\"\n\
             check = {{ http = \"/id\", interval = \"500ms\", timeout = \"400ms\", unhealthy_threshold = 1 }}\n\
             [update]\nmax_surge = {SURGE}\nmax_unavailable = {UNAVAILABLE}\nmin_healthy = \"{MIN_HEALTHY_S}s\"\n\
             drain_delay = \"{DRAIN_S}s\"\n\
             [resources]\ncpu = 0.02\nmemory = \"16Mi\"\n",
            img = fleet.image()
        ),
    )?;
    Ok(path.display().to_string())
}

struct Round {
    seconds: f64,
    max_running: usize,
    min_ready: usize,
    requests: usize,
    failed: usize,
}

fn counts(fleet: &Fleet) -> Result<(usize, usize, String)> {
    let (running, ready) = fleet.running_and_ready("web")?;
    let st = fleet.cli_json(&["job", "status", "web"])?;
    let status = st["rollout"]["status"]
        .as_str()
        .unwrap_or("none")
        .to_owned();
    Ok((running, ready, status))
}

fn round(fleet: &Fleet, client: &str, v: usize) -> Result<Round> {
    let script = "i=0; while [ ! -f /tmp/stop ] && [ $i -lt 3000 ]; do timeout 5 wget -qO- http://web.default.skiff.internal:8080/id 2>&1 || echo FAILED; sleep 0.05; i=$((i+1)); done; rm -f /tmp/stop";
    let load = fleet.cli_spawn(&["exec", client, "--", "sh", "-c", script])?;
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    fleet.cli_ok(&["apply", "-f", &spec(fleet, v)?])?;
    let (mut max_running, mut min_ready) = (0, usize::MAX);
    let seconds = loop {
        let (running, ready, status) = counts(fleet)?;
        max_running = max_running.max(running);
        min_ready = min_ready.min(ready);
        if status == "succeeded" {
            break t.elapsed().as_secs_f64();
        }
        ensure!(
            status == "running" && t.elapsed() < Duration::from_secs(300),
            "rollout to version {v}: {status} after {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(DRAIN_S + 1));
    fleet.cli_ok(&["exec", client, "--", "touch", "/tmp/stop"])?;
    let out = load.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let requests = text.lines().count();
    let failed = text.lines().filter(|l| !l.starts_with('v')).count();
    Ok(Round {
        seconds,
        max_running,
        min_ready,
        requests,
        failed,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut rounds = Vec::new();
    skiff_e2e::fleet::bench_on_fleet(1, 3, &[], "", |fleet, _| {
        fleet.cli_ok(&["apply", "-f", &spec(fleet, 1)?])?;
        let client = fleet.spec(
            "client",
            &format!(
                "name = \"client\"\nimage = \"{}\"\ninit = true\ncommand = [\"/bin/sleep\"]\nargs = [\"3600\"]\n\
                 stop_signal = \"SIGKILL\"\n[resources]\ncpu = 0.05\nmemory = \"16Mi\"\n",
                fleet.image()
            ),
        )?;
        fleet.cli_ok(&["apply", "-f", &client.display().to_string()])?;
        fleet.wait_for("10 ready endpoints", Duration::from_secs(120), |f| {
            Ok(counts(f)?.1 == REPLICAS as usize)
        })?;
        let client = fleet.wait_for_value("client running", Duration::from_secs(60), |f| {
            Ok(f.allocations("client")?
                .into_iter()
                .find(|a| a.2 == "running")
                .map(|a| a.0))
        })?;
        for i in 0..args.rounds {
            let r = round(fleet, &client, i + 2)?;
            eprintln!(
                "round {}: {:.1} s, at most {} running, at least {} ready, {} of {} requests failed",
                i + 1,
                r.seconds,
                r.max_running,
                r.min_ready,
                r.failed,
                r.requests
            );
            rounds.push(r);
        }
        Ok(())
    })?;
    let waves = REPLICAS.div_ceil(SURGE + UNAVAILABLE);
    let floor = f64::from(waves) * MIN_HEALTHY_S as f64;
    let mut secs: Vec<f64> = rounds.iter().map(|r| r.seconds).collect();
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    let mut md = format!(
        "{HEADING}\n\nMeasured {} on this machine (2 cores), {} rollouts in a row. \
         `target/release/skiff-bench-rollout --rounds {}` (a netns fleet: 1 controller, 3 agents).\n\
         10 replicas of busybox httpd with an HTTP check every 500 ms; `max_surge = {SURGE}`, \
         `max_unavailable = {UNAVAILABLE}`, `min_healthy = \"{MIN_HEALTHY_S}s\"`, \
         `drain_delay = \"{DRAIN_S}s\"`; a client container calls the service by name the whole \
         time (one connection per request, every 50 ms). Floor: {waves} waves x min_healthy = \
         {floor:.0} s (container start, the first passing check and each wave's drain come on top). \
         No anchor: neither Kubernetes nor Nomad runs here.\n\n\
         | round | duration | / floor | most running (bound {}) | fewest ready (bound {}) | requests | failed |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
        skiff_e2e::utc_date(),
        rounds.len(),
        args.rounds,
        REPLICAS + SURGE,
        REPLICAS - UNAVAILABLE,
    );
    for (i, r) in rounds.iter().enumerate() {
        md.push_str(&format!(
            "| {} | {:.1} s | {:.2}x | {} | {} | {} | {} |\n",
            i + 1,
            r.seconds,
            r.seconds / floor,
            r.max_running,
            r.min_ready,
            r.requests,
            r.failed
        ));
    }
    let with_drain = f64::from(waves) * (MIN_HEALTHY_S + DRAIN_S) as f64;
    md.push_str(&format!(
        "\nMedian {median:.1} s [{:.1}-{:.1}], {:.2}x the floor; {} failed requests in all. \
         Where the rest goes: draining replicas count as running (so the surge bound holds), so \
         each wave also waits its `drain_delay` before the next is placed ({waves} x \
         {MIN_HEALTHY_S} s + {waves} x {DRAIN_S} s = {with_drain:.0} s; the median is {:.2}x that); the \
         remaining {:.1} s per wave is the container start, its first passing check and the \
         agent's report of it (heartbeats every second).\n",
        secs[0],
        secs[secs.len() - 1],
        median / floor,
        rounds.iter().map(|r| r.failed).sum::<usize>(),
        median / with_drain,
        (median - with_drain) / f64::from(waves),
    ));
    skiff_e2e::publish(HEADING, &md, args.write_md.as_deref())?;
    Ok(())
}
