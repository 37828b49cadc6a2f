//! The markdown report and its section in BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::workload::{FailoverRound, Throughput, median_max};

/// Heading of the section this benchmark owns in BENCHMARKS.md.
pub const SECTION: &str = "## Controller: Raft writes vs etcd";

/// Header of a BENCHMARKS.md created from scratch.
const FILE_HEADER: &str = "# Benchmarks\n\nFigures measured on this project's CI-class machine; \
each with the command that produced it and its anchor measured in the same run.\n";

/// Everything measured for one system.
pub struct SystemResult {
    pub name: String,
    /// Each round's throughput phases, in the order the rounds ran (round k of the anchor ran
    /// right after round k of skiff).
    pub seq: Vec<Throughput>,
    pub conc: Vec<Throughput>,
    pub failover: Vec<FailoverRound>,
}

/// One result from several rounds of one system, every round kept.
pub fn all_rounds(rounds: Vec<SystemResult>) -> SystemResult {
    let name = rounds.first().map(|r| r.name.clone()).unwrap_or_default();
    let mut all = SystemResult {
        name,
        seq: Vec::new(),
        conc: Vec::new(),
        failover: Vec::new(),
    };
    for r in rounds {
        all.seq.extend(r.seq);
        all.conc.extend(r.conc);
        all.failover.extend(r.failover);
    }
    all
}

/// The median (the mean of the middle two for an even count), the lowest and the highest.
fn median_range(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let n = s.len();
    ((s[(n - 1) / 2] + s[n / 2]) / 2.0, s[0], s[n - 1])
}

/// `median (lo to hi)` of one figure over the rounds, each value written by `fmt`; the
/// median alone when there is one round.
fn over_rounds(v: &[f64], fmt: impl Fn(f64) -> String) -> String {
    let (med, lo, hi) = median_range(v);
    if v.len() < 2 {
        fmt(med)
    } else {
        format!("{} ({} to {})", fmt(med), fmt(lo), fmt(hi))
    }
}

/// Each round's ratio, > 1 meaning skiff is better: skiff/anchor where more is better,
/// anchor/skiff where less is.
fn round_ratios(skiff: &[f64], anchor: &[f64], more_is_better: bool) -> Vec<f64> {
    skiff
        .iter()
        .zip(anchor)
        .map(|(&s, &a)| if more_is_better { s / a } else { a / s })
        .map(|r| if r.is_finite() { r } else { f64::NAN })
        .collect()
}

/// Where and how the run happened.
pub struct RunInfo {
    pub command: String,
    pub data_fs: String,
    pub load_at_start: String,
    pub seq_writes: usize,
    pub conc_writes: usize,
    pub concurrency: usize,
    pub rounds: usize,
    pub throughput_rounds: usize,
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The comparison table: skiff first, the anchor second, and a ratio column in which > 1
/// always means skiff is better. Each cell is the median over the rounds and its range; the
/// ratio is the median of the rounds' own ratios (skiff's round k against the anchor's round
/// k), and their range.
pub fn table(skiff: &SystemResult, anchor: &SystemResult, info: &RunInfo) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| metric | {} | {} | ratio (>1 = skiff better) |",
        skiff.name, anchor.name
    );
    t.push_str("|---|---:|---:|---:|\n");
    let per_sec = |x: f64| format!("{x:.0}");
    let millis = |x: f64| format!("{:.2} ms", x * 1e3);
    let times = |x: f64| format!("{x:.2}×");
    let mut row = |label: String,
                   a: &[Throughput],
                   b: &[Throughput],
                   figure: fn(&Throughput) -> f64,
                   more_is_better: bool,
                   fmt: &dyn Fn(f64) -> String| {
        let (av, bv): (Vec<f64>, Vec<f64>) = (
            a.iter().map(figure).collect(),
            b.iter().map(figure).collect(),
        );
        let _ = writeln!(
            t,
            "| {label} | {} | {} | {} |",
            over_rounds(&av, fmt),
            over_rounds(&bv, fmt),
            over_rounds(&round_ratios(&av, &bv, more_is_better), times)
        );
    };
    for (label, a, b) in [
        (
            format!("1 client ({} writes),", info.seq_writes),
            &skiff.seq,
            &anchor.seq,
        ),
        (
            format!(
                "{} clients ({} writes),",
                info.concurrency, info.conc_writes
            ),
            &skiff.conc,
            &anchor.conc,
        ),
    ] {
        row(
            format!("{label} writes/s"),
            a,
            b,
            Throughput::writes_per_sec,
            true,
            &per_sec,
        );
        row(
            format!("{label} p50"),
            a,
            b,
            |p| p.p50.as_secs_f64(),
            false,
            &millis,
        );
        row(
            format!("{label} p99"),
            a,
            b,
            |p| p.p99.as_secs_f64(),
            false,
            &millis,
        );
        row(
            format!("{label} members' CPU per write"),
            a,
            b,
            |p| p.member_cpu_per_write().as_secs_f64(),
            false,
            &millis,
        );
    }
    let (sm, sx) = median_max(&skiff.failover);
    let (am, ax) = median_max(&anchor.failover);
    let ratio = |num: Duration, den: Duration| {
        let r = num.as_secs_f64() / den.as_secs_f64();
        if r.is_finite() {
            times(r)
        } else {
            "n/a".into()
        }
    };
    let _ = writeln!(
        t,
        "| leader SIGKILL → next acked write, median of {} | {} | {} | {} |",
        info.rounds,
        secs(sm),
        secs(am),
        ratio(am, sm)
    );
    let _ = writeln!(
        t,
        "| leader SIGKILL → next acked write, max of {} | {} | {} | {} |",
        info.rounds,
        secs(sx),
        secs(ax),
        ratio(ax, sx)
    );
    t
}

/// Per round and phase: errors, leaders, CPU; then the failover rounds.
pub fn details(r: &SystemResult) -> String {
    let mut t = String::new();
    let rounds = r.seq.iter().zip(&r.conc).enumerate();
    for (k, p) in rounds.flat_map(|(k, (s, c))| [(k, s), (k, c)]) {
        let _ = writeln!(
            t,
            "- {} round {} at concurrency {}: {} acked, {} errors, {:.2} s wall; latency mean {}, p90 {}, \
             max {}; CPU per write {} in the members (all three), {} in the client; written to \
             leader member {} (leader after: member {}){}",
            r.name,
            k + 1,
            p.concurrency,
            p.ok,
            p.errors,
            p.wall.as_secs_f64(),
            ms(p.mean),
            ms(p.p90),
            ms(p.max),
            ms(p.member_cpu_per_write()),
            ms(p.client_cpu_per_write()),
            p.leader_before,
            p.leader_after,
            p.first_error
                .as_ref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        );
    }
    let rounds: Vec<String> = r
        .failover
        .iter()
        .map(|f| {
            format!(
                "{} (killed {}, new leader {}; {} writes started, {} failed)",
                secs(f.downtime),
                f.killed,
                f.new_leader,
                f.attempts,
                f.failed_attempts
            )
        })
        .collect();
    let _ = writeln!(t, "- {} failover rounds: {}", r.name, rounds.join("; "));
    t
}

/// The full section for BENCHMARKS.md.
pub fn section(skiff: &SystemResult, anchor: &SystemResult, info: &RunInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{SECTION}\n");
    let _ = writeln!(s, "- Date: {} (UTC)", today_utc());
    let _ = writeln!(s, "- Machine: {}", machine());
    let _ = writeln!(
        s,
        "- Load average (1/5/15 min) at start: {}",
        info.load_at_start
    );
    let _ = writeln!(s, "- Data dirs under: {}", info.data_fs);
    let _ = writeln!(
        s,
        "- Command (after `cargo build --release -p skiff-controller -p skiff-e2e --bin \
         skiff-bench-raft`): `{}`\n",
        info.command
    );
    s.push_str(&table(skiff, anchor, info));
    s.push_str(
        "\nRatio: skiff/etcd for writes/s; etcd/skiff for latencies, CPU and failover times. \
         In every row a ratio above 1 means skiff is better, below 1 means etcd is better.\n\n",
    );
    let _ = writeln!(
        s,
        "Rounds: {} interleaved (fresh clusters each round; skiff's round k, then etcd's). \
         Each cell is the median of that figure over the rounds, with the lowest and highest \
         in brackets; each ratio is the median of the rounds' own ratios (skiff's round k \
         against etcd's round k), with theirs. The failover rows come from the last round.\n",
        info.throughput_rounds,
    );
    s.push_str("Per round and phase:\n\n");
    s.push_str(&details(skiff));
    s.push_str(&details(anchor));
    let _ = write!(
        s,
        "
Method:

- Both systems run as 3 members on 127.0.0.1 in one fresh temp dir, each member with its own data
  dir, started by the benchmark in the same run on the same machine (the benchmark client shares
  the CPUs with all members). Both fsync every commit: skiff (openraft + its own write-ahead log) fdatasyncs its log before
  acknowledging; etcd runs with its default WAL fsync. Neither is tuned.
- Timing: skiff at its defaults (heartbeat 100 ms, election timeout 400-800 ms after an 800 ms leader lease); etcd at its
  defaults (heartbeat 100 ms, election timeout 1000 ms).
- A write is one skiff `ApplyJob` creating a new job (unique name, a {spec_len}-byte TOML spec),
  or one etcd `Put` of the same TOML text under a new key. Latency is measured at the client from
  request to acknowledgement (commit).
- Throughput phases send to the current leader of each system (found via skiff's `Leader` RPC and
  etcd's `Status`), so neither pays follower forwarding. Concurrency 1: {seq} sequential writes on
  one connection. Concurrency {conc_n}: {conc} writes shared by {conc_n} tokio tasks, each with its
  own gRPC connection (connected before the clock starts). writes/s = acknowledged writes / wall
  time; p50/p99 are nearest-rank over all acknowledged writes. A short warm-up (sequential and
  concurrent) precedes the measured phases. CPU per write: the user + system time of the three
  members over the phase (from /proc/PID/stat, in 10 ms ticks) divided by the acknowledged
  writes; on 2 cores shared by three members and the client, CPU is what bounds a write.
- Failover, {rounds} rounds per system: connect a writer to each surviving member and check it
  writes; SIGKILL the leader; from then on start a new write every 20 ms, alternating between the
  survivors, each with a 500 ms timeout (attempts overlap, so the resolution is 20 ms rather than
  the timeout: etcd parks a proposal on a leaderless follower until the client gives up); record
  the time from the kill to the first acknowledgement. Then restart the killed member
  from its data dir (skiff: `--id N --data-dir D`; etcd: the same flags with
  `--initial-cluster-state existing`) and wait until all three are healthy before the next round.
",
        spec_len = crate::cluster::job_spec("b-0000").len(),
        seq = info.seq_writes,
        conc = info.conc_writes,
        conc_n = info.concurrency,
        rounds = info.rounds,
    );
    s
}

/// Replaces this benchmark's section of `path` (or appends it; creates the file if needed).
pub fn write_section(path: &Path, section: &str) -> Result<()> {
    write_titled_section(path, SECTION, section)
}

/// Replaces (or appends) the section titled `title` (a `## ` line) of the markdown file.
pub fn write_titled_section(path: &Path, title: &str, section: &str) -> Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => FILE_HEADER.to_string(),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let new = replace_section(&old, title, section);
    std::fs::write(path, new).with_context(|| format!("write {}", path.display()))
}

fn replace_section(doc: &str, title: &str, section: &str) -> String {
    let section = section.trim_end();
    let start = doc
        .match_indices(title)
        .find(|&(i, _)| i == 0 || doc[..i].ends_with('\n'))
        .map(|(i, _)| i);
    match start {
        Some(i) => {
            let after = &doc[i + title.len()..];
            let end = after
                .match_indices("\n## ")
                .next()
                .map_or(doc.len(), |(j, _)| i + title.len() + j + 1);
            let rest = &doc[end..];
            if rest.is_empty() {
                format!("{}{section}\n", &doc[..i])
            } else {
                format!("{}{section}\n\n{rest}", &doc[..i])
            }
        }
        None => format!("{}\n\n{section}\n", doc.trim_end()),
    }
}

/// `nproc × model` from /proc/cpuinfo, plus memory and kernel.
pub fn machine() -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or("? GiB".to_string(), |kb| {
            format!("{:.0} GiB", kb / 1024.0 / 1024.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{nproc} × {model}, {mem_gib} RAM, Linux {}", kernel.trim())
}

/// The 1, 5 and 15 minute load averages from /proc/loadavg (other work on the machine skews
/// every figure, so the report records it).
pub fn load_average() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<&str> = l.split_whitespace().take(3).collect();
    if v.len() == 3 {
        v.join(" / ")
    } else {
        "unknown".into()
    }
}

/// Filesystem type and device under `path` (longest mount-point prefix in /proc/mounts).
pub fn filesystem_of(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let best = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, mnt, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mnt).then_some((mnt.len(), dev, mnt, fs))
        })
        .max_by_key(|&(len, ..)| len);
    match best {
        Some((_, dev, mnt, fs)) => format!("{} ({fs} on {dev}, mounted at {mnt})", path.display()),
        None => format!("{} (filesystem unknown)", path.display()),
    }
}

/// Today's date, `YYYY-MM-DD`, in UTC.
fn today_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (y, m, d) = skiff_common::time::civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median_range(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(median_range(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert!(median_range(&[]).0.is_nan());
    }

    #[test]
    fn a_ratio_above_one_means_skiff_did_better_in_that_round() {
        // writes/s: more is better, skiff over the anchor.
        assert_eq!(
            round_ratios(&[800.0, 600.0], &[400.0, 600.0], true),
            [2.0, 1.0]
        );
        // latency: less is better, the anchor over skiff, round by round (not sorted first).
        assert_eq!(round_ratios(&[1.0, 4.0], &[2.0, 2.0], false), [2.0, 0.5]);
        assert!(round_ratios(&[0.0], &[1.0], false)[0].is_nan());
        assert_eq!(
            over_rounds(&[1.0, 3.0, 2.0], |x| format!("{x:.1}")),
            "2.0 (1.0 to 3.0)"
        );
        assert_eq!(over_rounds(&[1.5], |x| format!("{x:.1}")), "1.5");
    }

    #[test]
    fn replaces_a_middle_section_and_keeps_the_rest() {
        let doc = format!("# B\n\nintro\n\n{SECTION}\n\nold\n\n## Other\n\nkeep\n");
        let new = replace_section(&doc, SECTION, &format!("{SECTION}\n\nnew\n"));
        assert_eq!(
            new,
            format!("# B\n\nintro\n\n{SECTION}\n\nnew\n\n## Other\n\nkeep\n")
        );
    }

    #[test]
    fn appends_when_missing() {
        let new = replace_section("# B\n\nintro\n", SECTION, &format!("{SECTION}\n\nnew\n"));
        assert_eq!(new, format!("# B\n\nintro\n\n{SECTION}\n\nnew\n"));
    }

    #[test]
    fn replaces_a_last_section() {
        let doc = format!("# B\n\n{SECTION}\n\nold\n");
        let new = replace_section(&doc, SECTION, &format!("{SECTION}\n\nnew"));
        assert_eq!(new, format!("# B\n\n{SECTION}\n\nnew\n"));
    }
}
