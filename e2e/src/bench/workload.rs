//! The measured workloads: writes at a fixed concurrency, and leader failover.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, timeout};

use crate::cluster::{Cluster, Writer};

/// Bound on one measured write; a write slower than this counts as an error.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-request timeout of the failover writer.
const FAILOVER_WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// The failover writer starts a new write this often (alternating between the survivors).
const FAILOVER_ATTEMPT_EVERY: Duration = Duration::from_millis(20);
/// Give up on a failover round after this long without an acknowledged write.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// Bound on waiting for a leader or a (re)started member.
const HEALTH_DEADLINE: Duration = Duration::from_secs(60);

/// The result of one throughput phase.
#[derive(Debug, Clone, Default)]
pub struct Throughput {
    pub concurrency: usize,
    pub ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub wall: Duration,
    pub mean: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Member (1-based) that was leader before and after the phase, and was written to.
    pub leader_before: usize,
    pub leader_after: usize,
    /// CPU time (user + system) the members used during the phase, all together, and the
    /// benchmark's own process (the client).
    pub member_cpu: Duration,
    pub client_cpu: Duration,
    /// The writes slower than the phase's `slow_over`, as (when each began, from the
    /// phase's start; how long it took), in the order they began.
    pub slow: Vec<(Duration, Duration)>,
}

impl Throughput {
    /// Acknowledged writes per second of wall time.
    pub fn writes_per_sec(&self) -> f64 {
        self.ok as f64 / self.wall.as_secs_f64()
    }

    /// The members' CPU time per acknowledged write.
    pub fn member_cpu_per_write(&self) -> Duration {
        self.member_cpu / u32::try_from(self.ok.max(1)).unwrap_or(u32::MAX)
    }

    /// The client's CPU time per acknowledged write.
    pub fn client_cpu_per_write(&self) -> Duration {
        self.client_cpu / u32::try_from(self.ok.max(1)).unwrap_or(u32::MAX)
    }
}

/// CPU seconds used so far by `pids`, together.
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| skiff_e2e::cpu_seconds(p)).sum()
}

/// One leader-kill round.
#[derive(Debug, Clone)]
pub struct FailoverRound {
    /// Old and new leader (1-based).
    pub killed: usize,
    pub new_leader: usize,
    /// From SIGKILL to the first acknowledged write issued after it.
    pub downtime: Duration,
    /// Writes started after the kill, and how many of those had failed or timed out by then.
    pub attempts: usize,
    pub failed_attempts: usize,
}

/// `q`-quantile (nearest rank) of sorted microsecond samples.
fn quantile(sorted_us: &[u64], q: f64) -> Duration {
    if sorted_us.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    Duration::from_micros(sorted_us[rank - 1])
}

/// Writes `total` unique names `<prefix>-<n>` to the current leader from `concurrency`
/// clients, each on its own connection, and reports throughput and latency.
pub async fn throughput(
    c: &mut impl Cluster,
    prefix: &str,
    concurrency: usize,
    total: usize,
    slow_over: Option<Duration>,
) -> Result<Throughput> {
    let leader_before = c.leader(Instant::now() + HEALTH_DEADLINE).await?;
    let mut writers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        writers.push(c.connect(leader_before).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let pids = c.pids();
    let me = [std::process::id()];
    let (members_before, client_before) = (cpu_of(&pids), cpu_of(&me));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for mut w in writers {
        let next = next.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat_us = Vec::new();
            let mut slow = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            // Bounded: each iteration claims one of `total` indices.
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let name = format!("{prefix}-{i}");
                let t = Instant::now();
                match timeout(WRITE_TIMEOUT, w.write(&name)).await {
                    Ok(Ok(())) => {
                        let took = t.elapsed();
                        lat_us.push(took.as_micros() as u64);
                        if slow_over.is_some_and(|over| took > over) {
                            slow.push((t.duration_since(start), took));
                        }
                    }
                    Ok(Err(e)) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{name}: timed out"));
                    }
                }
            }
            (lat_us, slow, errors, first_error)
        }));
    }
    let mut lat_us = Vec::with_capacity(total);
    let mut slow = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (l, s, e, f) = t.await.context("writer task panicked")?;
        lat_us.extend(l);
        slow.extend(s);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let wall = start.elapsed();
    let member_cpu = Duration::from_secs_f64((cpu_of(&pids) - members_before).max(0.0));
    let client_cpu = Duration::from_secs_f64((cpu_of(&me) - client_before).max(0.0));
    lat_us.sort_unstable();
    slow.sort_unstable();
    let leader_after = c.leader(Instant::now() + HEALTH_DEADLINE).await?;
    Ok(Throughput {
        concurrency,
        ok: lat_us.len(),
        errors,
        first_error,
        wall,
        mean: Duration::from_micros(lat_us.iter().sum::<u64>() / lat_us.len().max(1) as u64),
        p50: quantile(&lat_us, 0.50),
        p90: quantile(&lat_us, 0.90),
        p99: quantile(&lat_us, 0.99),
        max: lat_us
            .last()
            .map_or(Duration::ZERO, |&us| Duration::from_micros(us)),
        leader_before: leader_before + 1,
        leader_after: leader_after + 1,
        member_cpu,
        client_cpu,
        slow,
    })
}

/// Kills the leader, measures the time to the next acknowledged write through the surviving
/// members, then restarts the killed member and waits until the whole cluster is healthy.
///
/// After the kill a new write is started every [`FAILOVER_ATTEMPT_EVERY`], alternating between
/// the survivors, each with a [`FAILOVER_WRITE_TIMEOUT`]; attempts overlap, so the measurement's
/// resolution is the stagger, not the per-request timeout (a write parked on a leaderless
/// follower until its timeout does not hide a new leader that was elected meanwhile).
pub async fn failover_round(c: &mut impl Cluster, round: usize) -> Result<FailoverRound> {
    c.wait_all_healthy(Instant::now() + HEALTH_DEADLINE).await?;
    let leader = c.leader(Instant::now() + HEALTH_DEADLINE).await?;
    let mut writers: Vec<Writer> = Vec::new();
    for m in (0..c.size()).filter(|&m| m != leader) {
        let mut w = c.connect(m).await?;
        // Warm the connection (and check the path works) before the kill.
        w.write(&format!("f{round}-warm-{}", m + 1)).await?;
        writers.push(w);
    }

    c.kill(leader)?;
    let killed_at = Instant::now();
    let mut attempts: JoinSet<Result<Duration, String>> = JoinSet::new();
    let mut started = 0usize;
    let mut failed = 0usize;
    let mut last_error = String::from("no attempt finished");
    let mut tick = interval(FAILOVER_ATTEMPT_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Bounded by the deadline; at most FAILOVER_WRITE_TIMEOUT / FAILOVER_ATTEMPT_EVERY attempts
    // are in flight at once.
    let downtime = loop {
        if killed_at.elapsed() > FAILOVER_DEADLINE {
            attempts.abort_all();
            bail!(
                "{}: no write acknowledged {FAILOVER_DEADLINE:?} after killing member {} \
                 ({started} attempts, last error: {last_error})",
                c.name(),
                leader + 1
            );
        }
        tokio::select! {
            _ = tick.tick() => {
                let mut w = writers[started % writers.len()].clone();
                let name = format!("f{round}-{started}");
                started += 1;
                attempts.spawn(async move {
                    match timeout(FAILOVER_WRITE_TIMEOUT, w.write(&name)).await {
                        Ok(Ok(())) => Ok(killed_at.elapsed()),
                        Ok(Err(e)) => Err(format!("{e:#}")),
                        Err(_) => Err(format!("{name}: timed out")),
                    }
                });
            }
            Some(done) = attempts.join_next() => match done {
                Ok(Ok(acked_after)) => break acked_after,
                Ok(Err(e)) => {
                    failed += 1;
                    last_error = e;
                }
                Err(e) => bail!("failover writer task failed: {e}"),
            },
        }
    };
    attempts.abort_all();
    let new_leader = c.leader(Instant::now() + HEALTH_DEADLINE).await?;

    c.restart(leader)?;
    c.wait_healthy(leader, Instant::now() + HEALTH_DEADLINE)
        .await?;
    c.wait_all_healthy(Instant::now() + HEALTH_DEADLINE).await?;
    Ok(FailoverRound {
        killed: leader + 1,
        new_leader: new_leader + 1,
        downtime,
        attempts: started,
        failed_attempts: failed,
    })
}

/// Median (upper median for an even count) and maximum.
pub fn median_max(rounds: &[FailoverRound]) -> (Duration, Duration) {
    let mut d: Vec<Duration> = rounds.iter().map(|r| r.downtime).collect();
    d.sort_unstable();
    let median = d.get(d.len() / 2).copied().unwrap_or_default();
    let max = d.last().copied().unwrap_or_default();
    (median, max)
}
