//! Node-loss benchmark (needs root): on a netns fleet of 3 controllers and 3 agents at the
//! default settings (no `--node-grace`), a 3-replica job runs one replica per node; each round
//! powers one node off (its host cut from the network and its agent killed, its containers
//! unreachable) and measures the time until the controllers mark it down and until its
//! replica's replacement is reported running elsewhere; then the node comes back and the
//! fleet settles before the next round. The nodes take turns. No anchor runs here; the
//! published defaults are given for scale: Kubernetes marks a node NotReady after
//! `node-monitor-grace-period` (40 s, 50 s since 1.32) and evicts its pods 300 s later
//! (`tolerationSeconds`); Nomad marks a client down after its heartbeat TTL plus
//! `heartbeat_grace` (10 s) and then replaces its allocations.
//!
//!   target/release/skiff-bench-nodeloss [--rounds 10] [--write-md BENCHMARKS.md]

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use skiff_e2e::fleet::Fleet;

#[derive(Parser)]
struct Args {
    /// Nodes powered off, one after another.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Replace (or add) the node-loss section of this markdown file.
    #[arg(long)]
    write_md: Option<PathBuf>,
}

const HEADING: &str = "## Node loss: powered off to replacement running, default settings";

struct Round {
    node: String,
    down: f64,
    replaced: f64,
}

fn node_status(fleet: &Fleet, name: &str) -> Result<String> {
    let nodes = fleet.cli_json(&["nodes"])?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == name)
        .and_then(|n| n["status"].as_str())
        .unwrap_or_default()
        .to_owned())
}

fn round(fleet: &mut Fleet, node: &str) -> Result<Round> {
    let before = fleet.allocations("web")?;
    ensure!(
        before.iter().filter(|a| a.2 == "running").count() == 3,
        "not settled: {before:?}"
    );
    fleet.partition(node)?;
    fleet.kill_agent(node)?;
    let t = Instant::now();
    let mut down = None;
    let replaced = loop {
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "no replacement after 60 s"
        );
        if down.is_none() && node_status(fleet, node)? == "down" {
            down = Some(t.elapsed());
        }
        let now = fleet.allocations("web")?;
        let elsewhere = now
            .iter()
            .filter(|a| a.2 == "running" && a.1 != node)
            .count();
        if elsewhere == 3 {
            break t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let down = down.unwrap_or(replaced);
    eprintln!(
        "{node}: down after {:.2} s, replacement running after {:.2} s",
        down.as_secs_f64(),
        replaced.as_secs_f64()
    );
    // Back: the node rejoins and its stale container goes.
    fleet.heal(node)?;
    fleet.restart_agent(node)?;
    fleet.wait_for("the node back", Duration::from_secs(60), |f| {
        Ok(f.ready_nodes()?.len() == 3 && f.running(node)?.is_empty())
    })?;
    Ok(Round {
        node: node.to_owned(),
        down: down.as_secs_f64(),
        replaced: replaced.as_secs_f64(),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let mut fleet = Fleet::start(3, 3, "")?;
    let spec = fleet
        .spec(
            "web",
            &format!(
                "name = \"web\"\nreplicas = 3\nimage = \"{}\"\ncommand = [\"/bin/httpd\"]\n\
                 args = [\"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nstop_signal = \"SIGKILL\"\n\
                 [placement]\nspread = true\n[resources]\ncpu = 0.1\nmemory = \"32Mi\"\n",
                fleet.image()
            ),
        )?
        .display()
        .to_string();
    fleet.cli_ok(&["apply", "-f", &spec])?;
    let mut rounds = Vec::new();
    fleet.wait_for("web to run", Duration::from_secs(60), |f| {
        Ok(f.allocations("web")?
            .iter()
            .filter(|a| a.2 == "running")
            .count()
            == 3)
    })?;
    for i in 0..args.rounds {
        // The nodes take turns, skipping one that runs no replica now.
        let hosting: Vec<String> = fleet
            .allocations("web")?
            .into_iter()
            .filter(|a| a.2 == "running")
            .map(|a| a.1)
            .collect();
        let node = (0..3)
            .map(|k| format!("a{}", (i + k) % 3 + 1))
            .find(|n| hosting.contains(n))
            .context("no node runs a replica")?;
        rounds.push(round(&mut fleet, &node).with_context(|| format!("round {}", i + 1))?);
    }
    let mut replaced: Vec<f64> = rounds.iter().map(|r| r.replaced).collect();
    replaced.sort_by(f64::total_cmp);
    let mut down: Vec<f64> = rounds.iter().map(|r| r.down).collect();
    down.sort_by(f64::total_cmp);
    let mut md = format!(
        "{HEADING}\n\nMeasured {} on this machine (2 cores): `target/release/skiff-bench-nodeloss \
         --rounds {}` (a netns fleet: 3 controllers, 3 agents, no `--node-grace`: the default 7 s). \
         Each round cuts one agent's host off the network and kills its agent (a power-off as the \
         controllers see it); times run from then. \"Down\": `skiff nodes` shows it down; \
         \"replaced\": `skiff ps` shows its replica's replacement running on another node (its \
         agent has started it and reported it with a heartbeat).\n\n\
         | round | node | down | replaced |\n| --- | --- | --- | --- |\n",
        skiff_e2e::utc_date(),
        args.rounds,
    );
    for (i, r) in rounds.iter().enumerate() {
        md.push_str(&format!(
            "| {} | {} | {:.2} s | {:.2} s |\n",
            i + 1,
            r.node,
            r.down,
            r.replaced
        ));
    }
    md.push_str(&format!(
        "\nReplaced: p50 {:.2} s, p99 {:.2} s (range {:.2}-{:.2} s); down: p50 {:.2} s, p99 {:.2} s. \
         The grace runs from the last heartbeat the leader received (up to 1 s before the \
         power-off); the replacement then waits for the next reconcile pass (500 ms), its \
         placement, its start and the heartbeat that reports it (up to 1 s). A 3 s network \
         blip at these settings evicts nothing (e2e `f60`: the longest silence was about 4 s). \
         Published defaults for scale, not measured here: Kubernetes evicts a lost node's pods \
         after about 5 minutes (NotReady after 40-50 s, then `tolerationSeconds` 300 s); Nomad \
         marks a client down after its heartbeat TTL plus a 10 s grace.\n",
        percentile(&replaced, 0.5),
        percentile(&replaced, 0.99),
        replaced[0],
        replaced[replaced.len() - 1],
        percentile(&down, 0.5),
        percentile(&down, 0.99),
    ));
    skiff_e2e::publish(HEADING, &md, args.write_md.as_deref())?;
    Ok(())
}
