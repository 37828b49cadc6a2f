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
    /// The median round of each throughput phase.
    pub seq: Throughput,
    pub conc: Throughput,
    /// Writes/s of that phase in every round.
    pub seq_rounds: Vec<f64>,
    pub conc_rounds: Vec<f64>,
    pub failover: Vec<FailoverRound>,
}

/// One result from several rounds: for each throughput phase the round with the median
/// writes/s (its latencies go with it), every round's writes/s, and the failover rounds.
pub fn median_rounds(rounds: Vec<SystemResult>) -> SystemResult {
    let seq_rounds: Vec<f64> = rounds.iter().map(|r| r.seq.writes_per_sec()).collect();
    let conc_rounds: Vec<f64> = rounds.iter().map(|r| r.conc.writes_per_sec()).collect();
    let median_index = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|a, b| v[*a].total_cmp(&v[*b]));
        idx[idx.len() / 2]
    };
    let (si, ci) = (median_index(&seq_rounds), median_index(&conc_rounds));
    let name = rounds.first().map(|r| r.name.clone()).unwrap_or_default();
    let mut failover = Vec::new();
    let mut seq = None;
    let mut conc = None;
    for (i, r) in rounds.into_iter().enumerate() {
        failover.extend(r.failover);
        if i == si {
            seq = Some(r.seq.clone());
        }
        if i == ci {
            conc = Some(r.conc);
        }
    }
    SystemResult {
        name,
        seq: seq.unwrap_or_default(),
        conc: conc.unwrap_or_default(),
        seq_rounds,
        conc_rounds,
        failover,
    }
}

/// `median (lo to hi)` of writes/s over the rounds.
fn range(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let med = s.get(s.len() / 2).copied().unwrap_or(0.0);
    format!("{med:.0} ({lo:.0} to {hi:.0})")
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

fn ratio(num: f64, den: f64) -> String {
    if den > 0.0 && num.is_finite() {
        format!("{:.2}×", num / den)
    } else {
        "n/a".into()
    }
}

/// The comparison table: skiff first, the anchor second, and a ratio column in which > 1
/// always means skiff is better.
pub fn table(skiff: &SystemResult, anchor: &SystemResult, info: &RunInfo) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| metric | {} | {} | ratio (>1 = skiff better) |",
        skiff.name, anchor.name
    );
    t.push_str("|---|---:|---:|---:|\n");
    let mut tp = |label: String, a: &Throughput, b: &Throughput| {
        let _ = writeln!(
            t,
            "| {label} writes/s | {:.0} | {:.0} | {} |",
            a.writes_per_sec(),
            b.writes_per_sec(),
            ratio(a.writes_per_sec(), b.writes_per_sec())
        );
        let _ = writeln!(
            t,
            "| {label} p50 | {} | {} | {} |",
            ms(a.p50),
            ms(b.p50),
            ratio(b.p50.as_secs_f64(), a.p50.as_secs_f64())
        );
        let _ = writeln!(
            t,
            "| {label} p99 | {} | {} | {} |",
            ms(a.p99),
            ms(b.p99),
            ratio(b.p99.as_secs_f64(), a.p99.as_secs_f64())
        );
        let (ac, bc) = (a.member_cpu_per_write(), b.member_cpu_per_write());
        let _ = writeln!(
            t,
            "| {label} members' CPU per write | {} | {} | {} |",
            ms(ac),
            ms(bc),
            ratio(bc.as_secs_f64(), ac.as_secs_f64())
        );
    };
    tp(
        format!("1 client ({} writes),", info.seq_writes),
        &skiff.seq,
        &anchor.seq,
    );
    tp(
        format!(
            "{} clients ({} writes),",
            info.concurrency, info.conc_writes
        ),
        &skiff.conc,
        &anchor.conc,
    );
    let (sm, sx) = median_max(&skiff.failover);
    let (am, ax) = median_max(&anchor.failover);
    let _ = writeln!(
        t,
        "| leader SIGKILL → next acked write, median of {} | {} | {} | {} |",
        info.rounds,
        secs(sm),
        secs(am),
        ratio(am.as_secs_f64(), sm.as_secs_f64())
    );
    let _ = writeln!(
        t,
        "| leader SIGKILL → next acked write, max of {} | {} | {} | {} |",
        info.rounds,
        secs(sx),
        secs(ax),
        ratio(ax.as_secs_f64(), sx.as_secs_f64())
    );
    t
}

/// Per-phase detail: errors, leaders, per-round failover times.
pub fn details(r: &SystemResult) -> String {
    let mut t = String::new();
    for p in [&r.seq, &r.conc] {
        let _ = writeln!(
            t,
            "- {} at concurrency {}: {} acked, {} errors, {:.2} s wall; latency mean {}, p90 {}, \
             max {}; CPU per write {} in the members (all three), {} in the client; written to \
             leader member {} (leader after: member {}){}",
            r.name,
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
        "Writes/s over {} interleaved rounds (fresh clusters each round; the table shows each \
         phase's median round, its latencies with it), median (range): {} 1 client {}, {} \
         clients {}; {} 1 client {}, {} clients {}.\n",
        info.throughput_rounds,
        skiff.name,
        range(&skiff.seq_rounds),
        info.concurrency,
        range(&skiff.conc_rounds),
        anchor.name,
        range(&anchor.seq_rounds),
        info.concurrency,
        range(&anchor.conc_rounds),
    );
    s.push_str("Per phase:\n\n");
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
