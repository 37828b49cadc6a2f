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
//! Three interleaved rounds (in-process, then through Raft on fresh controllers); medians and
//! ranges are reported, and how many Raft entries the placements took.
//!
//!   cargo bench -p skiff-controller --bench sched -- [--nodes 5000] [--allocations 10000]
//!       [--rounds 3] [--write-md $PWD/BENCHMARKS.md]

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
    /// Interleaved rounds; medians and ranges are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Replace (or add) the scheduler section of this markdown file (`cargo bench` runs in
    /// `controller/`: give an absolute path).
    #[arg(long)]
    write_md: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
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
        metrics_addr: String::new(),
        agent_addr: String::new(),
        subnet: None,
        wireguard: None,
        host_volume_dirs: Vec::new(),
        named_volumes: Default::default(),
        disk_pressure: false,
        capabilities: Default::default(),
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
        placed_one += reconcile::plan_job(&state, &mut view, job, &mut id, 2, None)
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
        placed_many += reconcile::plan_job(&state, &mut view, job, &mut id, 2, None)
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
    /// Log entries committed from the first big apply until every allocation was placed,
    /// and how many of them were the applies themselves.
    entries: u64,
    applies: u64,
}

async fn through_raft(nodes: usize, allocations: u32) -> anyhow::Result<ThroughRaft> {
    let dir = tempfile::Builder::new()
        .prefix("skiff-bench-sched-")
        .tempdir()?;
    // 5,000 nodes need 5,000 pod subnets: a /8 split into /24s has 65,536.
    let grace = ["--node-grace", "1h", "--cluster-cidr", "10.0.0.0/8"];
    let (r1, r2, r3) = (free_addr(), free_addr(), free_addr());
    let c1 = ControllerProc::start(
        dir.path(),
        1,
        r1,
        free_addr(),
        &[&["--bootstrap"][..], &grace[..]].concat(),
    );
    let j = r1.to_string();
    let token = tokio::task::block_in_place(|| c1.join_token("controller"));
    let c2 = ControllerProc::start(
        dir.path(),
        2,
        r2,
        free_addr(),
        &[&["--join", &j, "--join-token", &token][..], &grace[..]].concat(),
    );
    let c3 = ControllerProc::start(
        dir.path(),
        3,
        r3,
        free_addr(),
        &[&["--join", &j, "--join-token", &token][..], &grace[..]].concat(),
    );
    // Member 1's own certificate: a member may register any node (as it forwards for them),
    // so 5,000 nodes need no 5,000 enrollments. Every call is mutual TLS.
    let m = skiff_tls::Material::load(&c1.data_dir.join("tls"))?
        .ok_or_else(|| anyhow::anyhow!("member 1 has no certificate"))?;
    let creds = skiff_tls::Credentials::of("member", "member", &m);
    let channel = loop {
        let ep = skiff_tls::net::endpoint(&r1.to_string())?;
        if let Ok(c) = skiff_tls::net::channel_with(creds.client_config()?, ep).await {
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
                    metrics_addr: String::new(),
                    wireguard: None,
                    host_volume_dirs: Vec::new(),
                    capabilities: Vec::new(),
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

    let applied_index =
        |cluster: &mut pb::cluster_client::ClusterClient<tonic::transport::Channel>| {
            let mut cluster = cluster.clone();
            async move {
                let m = cluster
                    .list_members(pb::ListMembersRequest {})
                    .await?
                    .into_inner();
                Ok::<u64, tonic::Status>(
                    m.members
                        .iter()
                        .find(|x| x.id == m.leader_id)
                        .map_or(0, |x| x.applied_index),
                )
            }
        };
    let index_before = applied_index(&mut cluster).await?;
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
    let entries = applied_index(&mut cluster)
        .await?
        .saturating_sub(index_before);
    let leader_rss_kib = peak_rss_kib(&c1.pid().to_string());
    drop((c1, c2, c3));
    single_ms.sort_by(f64::total_cmp);
    Ok(ThroughRaft {
        register_secs,
        place_secs,
        single_ms,
        leader_rss_kib,
        entries,
        applies: u64::from(big),
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

/// Median and range of a list.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn run(args: &Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let mut ips = Vec::new();
    let mut trs = Vec::new();
    for round in 1..=args.rounds.max(1) {
        eprintln!(
            "round {round}/{}: in-process, {} nodes, {} allocations ...",
            args.rounds, args.nodes, args.allocations
        );
        ips.push(in_process(args.nodes, args.allocations)?);
        eprintln!(
            "round {round}/{}: through Raft, 3 controllers ...",
            args.rounds
        );
        trs.push(rt.block_on(through_raft(args.nodes, args.allocations))?);
    }
    let self_rss = peak_rss_kib("self");
    let a = f64::from(args.allocations);
    let one = stats(
        &ips.iter()
            .map(|i| i.placed_one as f64 / i.one_job_secs)
            .collect::<Vec<_>>(),
    );
    let many = stats(
        &ips.iter()
            .map(|i| i.placed_many as f64 / i.many_jobs_secs)
            .collect::<Vec<_>>(),
    );
    let raft = stats(&trs.iter().map(|t| a / t.place_secs).collect::<Vec<_>>());
    let raft_secs = stats(&trs.iter().map(|t| t.place_secs).collect::<Vec<_>>());
    let register = stats(&trs.iter().map(|t| t.register_secs).collect::<Vec<_>>());
    let entries = stats(&trs.iter().map(|t| t.entries as f64).collect::<Vec<_>>());
    let applies = trs.first().map_or(0, |t| t.applies);
    let leader_rss = trs.iter().map(|t| t.leader_rss_kib).max().unwrap_or(0);
    let mut single: Vec<f64> = trs.iter().flat_map(|t| t.single_ms.clone()).collect();
    single.sort_by(f64::total_cmp);
    let p50 = single[single.len() / 2];
    let max = single[single.len() - 1];
    let head = "## Scheduler: placements for 10,000 allocations on 5,000 nodes";
    let range = |(m, lo, hi): (f64, f64, f64)| format!("{m:.0} ({lo:.0} to {hi:.0})");
    let lines = [
        head.to_owned(),
        String::new(),
        format!(
            "- Date: {} (UTC); machine: {} cores; release build; command: `cargo bench -p skiff-controller --bench sched -- --rounds {} --write-md $PWD/BENCHMARKS.md` ({} interleaved rounds: medians, ranges in parentheses)",
            skiff_e2e::utc_date(),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            args.rounds,
            args.rounds,
        ),
        format!("- {} simulated nodes (8 cores, 16 GiB, zone a/b/c), allocations of 0.1 core / 64 MiB.", args.nodes),
        String::new(),
        "| what | allocations | placements/s, median (range) | peak memory |".to_owned(),
        "|---|---:|---:|---:|".to_owned(),
        format!(
            "| in-process, {} jobs × 1,000 replicas | {} | {} | {:.1} MiB (bench process) |",
            args.allocations / 1000, ips[0].placed_one, range(one), self_rss as f64 / 1024.0
        ),
        format!(
            "| in-process, 100 jobs × {} replicas, constraint `zone in (a, b)` | {} | {} | |",
            args.allocations / 100, ips[0].placed_many, range(many)
        ),
        format!(
            "| through Raft (3 controllers), {} jobs × 1,000 replicas, first apply → all committed ({:.2} s) | {} | {} | {:.1} MiB (leader) |",
            args.allocations / 1000, raft_secs.0, args.allocations, range(raft), leader_rss as f64 / 1024.0
        ),
        String::new(),
        format!(
            "Through Raft the placements took {:.0} log entries (median; {:.0} to {:.0}) from the first apply to the last placement, {applies} of them the applies: \
             {} allocations went through the log in about {:.0} entries (the reconciler's placements and pending notes).",
            entries.0, entries.1, entries.2, args.allocations, entries.0 - applies as f64
        ),
        format!(
            "Registering the {} nodes through the Nodes API (32 at a time, each a Raft write) took {:.1} s (median). One-replica job, apply → allocation committed, {} runs: p50 {p50:.1} ms, max {max:.1} ms.",
            args.nodes, register.0, single.len()
        ),
        String::new(),
        "Published figures, for orders of magnitude only (other hardware, other scope, not measured here): Nomad's C1M (2016) \
         placed 1,000,000 containers on 5,000 hosts at about 3,750 containers/s with 5 servers (<https://www.hashicorp.com/c1m>), \
         C2M (2020) 2,000,000 on 6,100 hosts at about 1,500/s with 3 schedulers (<https://www.hashicorp.com/c2m>): thousands \
         per second, as here, but with many jobs in flight against real fleets, while this is one planner pass on one leader. \
         Kubernetes' scalability tests are rate-limited by their own harness, so their figures say nothing about the scheduler's speed."
            .to_owned(),
        String::new(),
    ];
    skiff_e2e::publish(head, &lines.join("\n"), args.write_md.as_deref())?;
    Ok(())
}
