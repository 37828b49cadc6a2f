//! Scheduler benchmark: placements per second and peak memory, for 10,000 allocations onto
//! 5,000 simulated nodes.
//!
//! - in-process: the controller's own planning code (`reconcile::plan_job`, which calls the
//!   scheduler) on a `ClusterState` holding the nodes: one job of 10,000 replicas, and 100 jobs
//!   of 100 replicas with a label constraint (as Nomad's C1M split its work);
//! - end to end through Raft: three `skiff-controller` processes on loopback, 5,000 nodes
//!   registered through the Nodes API, one job of 10,000 replicas applied through the Jobs API;
//!   timed from the apply's acknowledgement until all 10,000 allocations are committed and
//!   applied on the leader (its reconciler planned them and the plan went through the log).
//!
//!   skiff-bench-sched [--nodes 5000] [--allocations 10000] [--write-md BENCHMARKS.md]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use skiff_common::{SpecFormat, parse_job_spec};
use skiff_controller::reconcile;
use skiff_controller::state::{ClusterState, Command, Node, NodeResources, NodeStatus};
use skiff_e2e::{ControllerProc, free_addr};
use skiff_proto::v1 as pb;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    #[arg(long, default_value_t = 10_000)]
    allocations: u32,
    /// Replace (or add) the scheduler section of this markdown file.
    #[arg(long)]
    write_md: Option<PathBuf>,
}

fn node(i: usize) -> Node {
    Node {
        name: format!("node-{i:05}"),
        address: format!("198.18.{}.{}", i / 250, i % 250 + 1),
        labels: BTreeMap::from([("zone".to_owned(), ["a", "b", "c"][i % 3].to_owned())]),
        resources: NodeResources {
            cpu: 8.0,
            memory: 16 << 30,
            pids: 32768,
        },
        status: NodeStatus::Ready,
        status_changed_at_ms: 0,
        registered_at_ms: 0,
        agent_addr: String::new(),
        subnet: None,
        wireguard: None,
    }
}

fn spec_text(name: &str, replicas: u32, constraint: bool) -> String {
    format!(
        "name = \"{name}\"\nimage = \"bench/app:1\"\nreplicas = {replicas}\n\
         [resources]\ncpu = 0.1\nmemory = \"64Mi\"\npids = 64\n{}",
        if constraint {
            "[placement]\nconstraints = [\"zone in (a, b)\"]\n"
        } else {
            ""
        }
    )
}

/// Peak resident set (VmHWM) of a process, KiB.
fn peak_rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

struct InProcess {
    one_job_secs: f64,
    many_jobs_secs: f64,
    placed_one: usize,
    placed_many: usize,
}

fn in_process(nodes: usize, allocations: u32) -> anyhow::Result<InProcess> {
    let mut state = ClusterState::default();
    for i in 0..nodes {
        state.apply(&Command::UpsertNode { node: node(i) })?;
    }
    let apply = |state: &mut ClusterState, text: &str| -> anyhow::Result<()> {
        let spec = parse_job_spec(text, SpecFormat::Toml)?;
        state.apply(&Command::ApplyJob {
            spec: Box::new(spec),
            at_ms: 1,
        })?;
        Ok(())
    };
    // Jobs hold at most 1,000 replicas: 10 jobs of 1,000.
    for j in 0..allocations.div_ceil(1000) {
        apply(&mut state, &spec_text(&format!("big-{j}"), 1000, false))?;
    }
    let mut n = 0u64;
    let mut id = || {
        n += 1;
        format!("{n:016x}")
    };
    let started = Instant::now();
    let mut view = reconcile::node_view(&state);
    let mut placed_one = 0;
    for job in state.jobs(None) {
        placed_one += reconcile::plan_job(&state, &mut view, job, &mut id, 2)
            .place
            .len();
    }
    let one_job_secs = started.elapsed().as_secs_f64();

    let mut state = ClusterState::default();
    for i in 0..nodes {
        state.apply(&Command::UpsertNode { node: node(i) })?;
    }
    let jobs = 100u32;
    let per_job = allocations / jobs;
    for j in 0..jobs {
        apply(
            &mut state,
            &spec_text(&format!("job-{j:03}"), per_job, true),
        )?;
    }
    let started = Instant::now();
    let mut view = reconcile::node_view(&state);
    let mut placed_many = 0;
    for job in state.jobs(None) {
        placed_many += reconcile::plan_job(&state, &mut view, job, &mut id, 2)
            .place
            .len();
    }
    let many_jobs_secs = started.elapsed().as_secs_f64();
    Ok(InProcess {
        one_job_secs,
        many_jobs_secs,
        placed_one,
        placed_many,
    })
}

struct ThroughRaft {
    register_secs: f64,
    place_secs: f64,
    single_ms: Vec<f64>,
    leader_rss_kib: u64,
}

async fn through_raft(nodes: usize, allocations: u32) -> anyhow::Result<ThroughRaft> {
    let dir = tempfile::Builder::new()
        .prefix("skiff-bench-sched-")
        .tempdir()?;
    let grace = ["--node-grace", "1h"];
    let (r1, r2, r3) = (free_addr(), free_addr(), free_addr());
    let c1 = ControllerProc::start(
        dir.path(),
        1,
        r1,
        free_addr(),
        &[&["--bootstrap"][..], &grace[..]].concat(),
    );
    let j = r1.to_string();
    let c2 = ControllerProc::start(
        dir.path(),
        2,
        r2,
        free_addr(),
        &[&["--join", &j][..], &grace[..]].concat(),
    );
    let c3 = ControllerProc::start(
        dir.path(),
        3,
        r3,
        free_addr(),
        &[&["--join", &j][..], &grace[..]].concat(),
    );
    let url = format!("http://{r1}");
    let channel = loop {
        if let Ok(c) = tonic::transport::Endpoint::from_shared(url.clone())?
            .connect()
            .await
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut cluster = pb::cluster_client::ClusterClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = cluster.list_members(pb::ListMembersRequest {}).await;
        if m.is_ok_and(|m| m.get_ref().members.iter().filter(|m| m.voter).count() == 3) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "cluster did not form");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Register the nodes, 32 at a time.
    let started = Instant::now();
    let mut next = 0;
    while next < nodes {
        let mut batch = Vec::new();
        for i in next..(next + 32).min(nodes) {
            let mut c = pb::nodes_client::NodesClient::new(channel.clone());
            let n = node(i);
            batch.push(tokio::spawn(async move {
                c.register(pb::RegisterNodeRequest {
                    name: n.name,
                    address: n.address,
                    labels: n.labels.into_iter().collect(),
                    resources: Some(pb::NodeResources {
                        cpu: n.resources.cpu,
                        memory: n.resources.memory,
                        pids: n.resources.pids,
                    }),
                    agent_addr: String::new(),
                    wireguard: None,
                })
                .await
            }));
        }
        for b in batch {
            b.await??;
        }
        next = (next + 32).min(nodes);
    }
    let register_secs = started.elapsed().as_secs_f64();

    let mut jobs = pb::jobs_client::JobsClient::new(channel.clone());
    let count = |jobs: &mut pb::jobs_client::JobsClient<tonic::transport::Channel>, job: &str| {
        let mut jobs = jobs.clone();
        let job = job.to_owned();
        async move {
            jobs.list_allocations(pb::ListAllocationsRequest {
                job,
                read: Some(pb::ReadOptions { stale: true }),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().allocations.len())
        }
    };
    // Latency of a one-replica placement, 20 times.
    let mut single_ms = Vec::new();
    for k in 0..20 {
        let name = format!("single-{k}");
        let t = Instant::now();
        jobs.apply_job(pb::ApplyJobRequest {
            spec: spec_text(&name, 1, false),
            format: pb::SpecFormat::Toml as i32,
        })
        .await?;
        while count(&mut jobs, &name).await? < 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        single_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    let started = Instant::now();
    let big = allocations.div_ceil(1000);
    for j in 0..big {
        jobs.apply_job(pb::ApplyJobRequest {
            spec: spec_text(&format!("big-{j}"), 1000, false),
            format: pb::SpecFormat::Toml as i32,
        })
        .await?;
    }
    let deadline = started + Duration::from_secs(300);
    let mut placed = 0;
    while placed < (big * 1000) as usize {
        placed = 0;
        for j in 0..big {
            placed += count(&mut jobs, &format!("big-{j}")).await?;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "placement did not finish in 300 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let place_secs = started.elapsed().as_secs_f64();
    let leader_rss_kib = peak_rss_kib(&c1.pid().to_string());
    drop((c1, c2, c3));
    single_ms.sort_by(f64::total_cmp);
    Ok(ThroughRaft {
        register_secs,
        place_secs,
        single_ms,
        leader_rss_kib,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    eprintln!(
        "in-process: {} nodes, {} allocations ...",
        args.nodes, args.allocations
    );
    let ip = in_process(args.nodes, args.allocations)?;
    let self_rss = peak_rss_kib("self");
    eprintln!("through Raft: 3 controllers ...");
    let rt = tokio::runtime::Runtime::new()?;
    let tr = rt.block_on(through_raft(args.nodes, args.allocations))?;
    let a = f64::from(args.allocations);
    let p50 = tr.single_ms[tr.single_ms.len() / 2];
    let p99 = tr.single_ms[tr.single_ms.len() - 1];
    let head = "## Scheduler: placements for 10,000 allocations on 5,000 nodes";
    let lines = [
        head.to_owned(),
        String::new(),
        format!(
            "- Date: {} (UTC); machine: {} cores; release build; command: `target/release/skiff-bench-sched --write-md BENCHMARKS.md`",
            skiff_e2e::utc_date(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        format!("- {} simulated nodes (8 cores, 16 GiB, zone a/b/c), allocations of 0.1 core / 64 MiB.", args.nodes),
        String::new(),
        "| what | allocations | time | placements/s | peak memory |".to_owned(),
        "|---|---:|---:|---:|---:|".to_owned(),
        format!(
            "| in-process, {} jobs × 1,000 replicas | {} | {:.3} s | {:.0} | {:.1} MiB (bench process) |",
            args.allocations / 1000, ip.placed_one, ip.one_job_secs, ip.placed_one as f64 / ip.one_job_secs, self_rss as f64 / 1024.0
        ),
        format!(
            "| in-process, 100 jobs × {} replicas, constraint `zone in (a, b)` | {} | {:.3} s | {:.0} | |",
            args.allocations / 100, ip.placed_many, ip.many_jobs_secs, ip.placed_many as f64 / ip.many_jobs_secs
        ),
        format!(
            "| through Raft (3 controllers), {} jobs × 1,000 replicas, first apply → all committed | {} | {:.2} s | {:.0} | {:.1} MiB (leader) |",
            args.allocations / 1000, args.allocations, tr.place_secs, a / tr.place_secs, tr.leader_rss_kib as f64 / 1024.0
        ),
        String::new(),
        format!(
            "Registering the {} nodes through the Nodes API (32 at a time, each a Raft write) took {:.1} s. One-replica job, apply → allocation committed, 20 runs: p50 {p50:.1} ms, max {p99:.1} ms (the reconciler wakes on each applied entry).",
            args.nodes, tr.register_secs
        ),
        String::new(),
        "Published anchors (different hardware and scope; not measured here): Nomad's C1M (2016) placed 1,000,000 containers on 5,000 hosts \
         in under 5 minutes with 5 servers, 3,750 containers/s, counting from job submission to placement (<https://www.hashicorp.com/c1m>); \
         Nomad's C2M (2020) placed 2,000,000 on 6,100 hosts in 22 min 14 s with 3 schedulers, ~1,500/s (<https://www.hashicorp.com/c2m>). \
         The Kubernetes scheduler reached an average of 100 pods/s on its 5,000-node test cluster in 2019, where the test itself is \
         rate-limited to 100 pods/s (kubernetes/kubernetes#74041); ByteDance's Gödel docs report kube-scheduler at ~300 pods/s \
         (430 peak) end to end on 30,000 nodes. Those count many jobs in flight against a real fleet; ours is one planner pass \
         on one leader, so read the ratios as orders of magnitude."
            .to_owned(),
        String::new(),
        format!(
            "Ratios, through Raft: {:.1}× C1M's 3,750/s, {:.1}× C2M's ~1,500/s, {:.0}× the Kubernetes 5,000-node test's 100 pods/s.",
            a / tr.place_secs / 3750.0,
            a / tr.place_secs / 1500.0,
            a / tr.place_secs / 100.0
        ),
        String::new(),
    ];
    skiff_e2e::publish(head, &lines.join("\n"), args.write_md.as_deref())?;
    Ok(())
}
