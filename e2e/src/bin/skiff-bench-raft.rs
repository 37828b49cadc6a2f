//! `skiff-bench-raft`: committed writes/s, p50/p99 commit latency and leader-failover time of a
//! 3-member `skiff-controller` cluster, measured against a 3-member etcd 3.4 cluster (the
//! anchor) started in the same run. A benchmark, not a test; see BENCHMARKS.md.
//!
//! ```text
//! cargo build --release -p skiff-controller -p skiff-e2e --bin skiff-bench-raft
//! target/release/skiff-bench-raft --write-md BENCHMARKS.md
//! ```
//!
//! Everything runs on 127.0.0.1 in a fresh temp dir (`skiff-bench-*`), removed at the end; every
//! process started is SIGKILLed on exit, on error and on Ctrl-C.

#![forbid(unsafe_code)]

// The bench modules live in `e2e/src/bench/` (the e2e library is the tests' helper crate).
#[path = "../bench/cluster.rs"]
mod cluster;
#[path = "../bench/etcd.rs"]
mod etcd;
#[path = "../bench/procs.rs"]
mod procs;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/skiff.rs"]
mod skiff;
#[path = "../bench/workload.rs"]
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::time::Instant;

use cluster::Cluster;
use report::{RunInfo, SystemResult};

/// Bound on forming each cluster.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// Warm-up before the measured phases: sequential writes, then writes per concurrent client.
const WARMUP_SEQ: usize = 200;
const WARMUP_PER_CLIENT: usize = 5;

/// Raft write benchmark: skiff-controller vs etcd.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory holding `skiff-controller` [default: the directory of this executable].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The etcd binary (Debian package `etcd-server`, etcd 3.4).
    #[arg(long, default_value = etcd::ETCD_BIN)]
    etcd: PathBuf,
    /// Sequential writes at concurrency 1.
    #[arg(long, default_value_t = 2000)]
    writes: usize,
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Total writes shared by the concurrent clients.
    #[arg(long, default_value_t = 20000)]
    concurrent_writes: usize,
    /// Leader-kill rounds per system.
    #[arg(long, default_value_t = 5)]
    failover_rounds: usize,
    /// Rounds of the throughput phases, interleaved (skiff, etcd, skiff, ...), each on fresh
    /// clusters; the table shows each figure's median over the rounds and its range, and
    /// the median and range of the rounds' own ratios.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Replace (or append) the section "## Controller: Raft writes vs etcd" in this file.
    #[arg(long)]
    write_md: Option<PathBuf>,
    /// Where to create the `skiff-bench-*` temp dir [default: $TMPDIR or /tmp].
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Keep the temp dir (data dirs and member logs) instead of removing it.
    #[arg(long)]
    keep_dir: bool,
    /// Print every measured write slower than this many milliseconds, with when it began in
    /// its phase, and the gaps between them (a rhythm in the gaps names a periodic cause).
    #[arg(long, value_name = "MS")]
    trace_slow: Option<f64>,
}

impl Args {
    fn validate(&self) -> Result<()> {
        if self.writes == 0 || self.concurrent_writes == 0 || self.concurrency == 0 {
            bail!("--writes, --concurrency and --concurrent-writes must be positive");
        }
        if self.rounds == 0 {
            bail!("--rounds must be positive");
        }
        if self
            .trace_slow
            .is_some_and(|ms| !ms.is_finite() || ms <= 0.0)
        {
            bail!("--trace-slow must be a positive number of milliseconds");
        }
        if self.failover_rounds == 0 {
            bail!("--failover-rounds must be positive");
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    procs::main_until_interrupted(None, run(Args::parse()))
}

fn find_binaries(args: &Args) -> Result<PathBuf> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("locate the current executable")?
            .parent()
            .context("the current executable has no parent directory")?
            .to_path_buf(),
    };
    let controller = bin_dir.join("skiff-controller");
    if !controller.is_file() {
        bail!(
            "{} not found; build it with `cargo build --release -p skiff-controller` or pass \
             --bin-dir",
            controller.display()
        );
    }
    if !args.etcd.is_file() {
        bail!(
            "{} not found: install Debian's etcd 3.4 with `sudo apt-get install -y etcd-server` \
             (then stop the system service it may start: `sudo systemctl disable --now etcd`), \
             or pass --etcd PATH",
            args.etcd.display()
        );
    }
    Ok(controller)
}

async fn run(args: Args) -> Result<()> {
    args.validate()?;
    let controller = find_binaries(&args)?;
    let base = args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("skiff-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("create a temp dir in {}", base.display()))?;
    eprintln!("temp dir: {}", tmp.path().display());

    let info = RunInfo {
        command: command_line(),
        data_fs: report::filesystem_of(&base),
        load_at_start: report::load_average(),
        seq_writes: args.writes,
        conc_writes: args.concurrent_writes,
        concurrency: args.concurrency,
        rounds: args.failover_rounds,
        throughput_rounds: args.rounds,
    };

    let result = measure_both(&args, &controller, tmp.path()).await;
    if args.keep_dir {
        let kept = tmp.keep();
        eprintln!("kept {}", kept.display());
    }
    let (skiff, anchor) = result?;

    println!("\n{}", report::table(&skiff, &anchor, &info));
    println!("ratio: skiff/etcd for writes/s, etcd/skiff for latencies; > 1 = skiff better\n");
    print!("{}{}", report::details(&skiff), report::details(&anchor));
    if let Some(path) = &args.write_md {
        report::write_section(path, &report::section(&skiff, &anchor, &info))?;
        eprintln!("wrote section {:?} in {}", report::SECTION, path.display());
    }
    Ok(())
}

async fn measure_both(
    args: &Args,
    controller: &Path,
    dir: &Path,
) -> Result<(SystemResult, SystemResult)> {
    let mut skiff_rounds = Vec::new();
    let mut etcd_rounds = Vec::new();
    for round in 1..=args.rounds {
        // Failover is measured once, in the last round (it has rounds of its own).
        let last = round == args.rounds;
        let rdir = dir.join(format!("round{round}"));
        std::fs::create_dir_all(&rdir)?;
        eprintln!(
            "round {round}/{}: starting 3 skiff-controller members",
            args.rounds
        );
        skiff_rounds.push({
            let mut s =
                skiff::Skiff::start(controller, &rdir, Instant::now() + START_DEADLINE).await?;
            let r = measure(&mut s, args, last).await;
            if r.is_err() {
                eprintln!(
                    "member logs: {}/*.log (pass --keep-dir to keep them)",
                    rdir.display()
                );
            }
            r?
            // `s` is dropped here: every member is killed before etcd starts.
        });
        eprintln!("round {round}/{}: starting 3 etcd members", args.rounds);
        etcd_rounds.push({
            let mut e =
                etcd::Etcd::start(&args.etcd, &rdir, Instant::now() + START_DEADLINE).await?;
            eprintln!("etcd version {}", e.version());
            let r = measure(&mut e, args, last).await;
            if r.is_err() {
                eprintln!(
                    "member logs: {}/*.log (pass --keep-dir to keep them)",
                    rdir.display()
                );
            }
            r?
        });
    }
    Ok((
        report::all_rounds(skiff_rounds),
        report::all_rounds(etcd_rounds),
    ))
}

async fn measure(c: &mut impl Cluster, args: &Args, with_failover: bool) -> Result<SystemResult> {
    let name = c.name();
    eprintln!("{name}: warm-up");
    for (prefix, conc, n) in [
        ("warm-seq", 1, WARMUP_SEQ),
        (
            "warm-conc",
            args.concurrency,
            args.concurrency * WARMUP_PER_CLIENT,
        ),
    ] {
        let w = workload::throughput(c, prefix, conc, n, None).await?;
        if w.errors > 0 {
            bail!(
                "{name}: warm-up write failed: {}",
                w.first_error.unwrap_or_default()
            );
        }
    }

    eprintln!("{name}: {} sequential writes", args.writes);
    let slow_over = args
        .trace_slow
        .map(|ms| Duration::from_secs_f64(ms / 1000.0));
    let seq = workload::throughput(c, "seq", 1, args.writes, slow_over).await?;
    eprintln!(
        "{name}:   {:.0} writes/s, p50 {:?}, p99 {:?}",
        seq.writes_per_sec(),
        seq.p50,
        seq.p99
    );
    print_slow(&name, &seq, slow_over);
    eprintln!(
        "{name}: {} writes from {} clients",
        args.concurrent_writes, args.concurrency
    );
    let conc = workload::throughput(
        c,
        "conc",
        args.concurrency,
        args.concurrent_writes,
        slow_over,
    )
    .await?;
    eprintln!(
        "{name}:   {:.0} writes/s, p50 {:?}, p99 {:?}",
        conc.writes_per_sec(),
        conc.p50,
        conc.p99
    );
    print_slow(&name, &conc, slow_over);
    for p in [&seq, &conc] {
        // More than 1% failed writes makes the figures meaningless.
        if p.errors * 100 > p.ok + p.errors {
            bail!(
                "{name}: {} of {} writes failed at concurrency {}; first: {}",
                p.errors,
                p.ok + p.errors,
                p.concurrency,
                p.first_error.clone().unwrap_or_default()
            );
        }
    }

    let mut failover = Vec::with_capacity(args.failover_rounds);
    for round in (1..=args.failover_rounds).filter(|_| with_failover) {
        let r = workload::failover_round(c, round).await?;
        eprintln!(
            "{name}: failover {round}/{}: killed {}, new leader {}, {:?} to the next acked write",
            args.failover_rounds, r.killed, r.new_leader, r.downtime
        );
        failover.push(r);
    }
    Ok(SystemResult {
        name,
        seq: vec![seq],
        conc: vec![conc],
        failover,
    })
}

/// With `--trace-slow`: the phase's slow writes (at most 200 lines), then how many and the
/// median gap between the starts of consecutive ones.
fn print_slow(name: &str, p: &workload::Throughput, over: Option<Duration>) {
    let Some(over) = over else { return };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for (at, took) in p.slow.iter().take(200) {
        eprintln!(
            "{name}:     slow write at +{:.1} ms: {:.2} ms",
            ms(*at),
            ms(*took)
        );
    }
    let mut gaps: Vec<Duration> = p.slow.windows(2).map(|w| w[1].0 - w[0].0).collect();
    gaps.sort_unstable();
    let median_gap = gaps
        .get(gaps.len() / 2)
        .map_or("-".to_string(), |g| format!("{:.1} ms", ms(*g)));
    eprintln!(
        "{name}:   {} of {} writes at concurrency {} over {:.2} ms; median gap between them {median_gap}",
        p.slow.len(),
        p.ok,
        p.concurrency,
        ms(over)
    );
}

/// This process's command line, shell-quoted where needed.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
