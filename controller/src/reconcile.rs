//! The leader's control loops: node liveness (heartbeat TTL -> down, allocations lost and
//! replaced), job reconciliation (desired replicas vs allocations: place, scale down, replace old
//! versions, move off draining nodes), and the pending reason of jobs that do not fit.
//!
//! [`plan_job`] is pure (the state, a view of the nodes, fresh ids in): the loop and the
//! `PlanJob` API share it. The loop runs only on the leader and starts afresh at every
//! leadership: a new leader gives every node a full grace period before judging it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skiff_common::JobSpec;
use skiff_common::spec::Protocol;
use tracing::{debug, info, warn};

use crate::api::now_ms;
use crate::raft::RaftNode;
use crate::scheduler::{self, Candidate, Request, Strategy, Usage};
use crate::state::{
    Allocation, AllocationStatus, ClusterState, Command, Job, JobPending, JobStatus, JobVersions,
    NodeStatus, RolloutChange, RolloutStatus, Touched,
};

pub mod analysis;

use analysis::{Analyses, RequestSample, Verdict};

/// When the leader last heard from each node, and the request counts of the sidecars it
/// reported (shared by the Nodes API and the loop).
#[derive(Clone, Default)]
pub struct Heartbeats {
    inner: Arc<Mutex<HashMap<String, Instant>>>,
    /// On a follower: the leader's clock as last read ([`follow_leader_clock`]), when it was
    /// read and how long ago each node's last heartbeat was then.
    leader_clock: Arc<Mutex<Option<LeaderClock>>>,
    /// Per node: each watched sidecar's counts, by allocation, as last reported.
    requests: Arc<Mutex<HashMap<String, HashMap<String, RequestSample>>>>,
    /// Per node: what each allocation uses, by allocation, as last reported.
    usage: Arc<Mutex<HashMap<String, HashMap<String, Measured>>>>,
    /// Nodes whose fenced allocations are being declared lost (from the decision until its
    /// write is applied): their heartbeats are not answered meanwhile, so that no answer
    /// lists an allocation whose replacement is on its way ([`Heartbeats::beat_unless_fencing`]).
    fencing: Arc<Mutex<BTreeSet<String>>>,
}

/// How recently a quorum must have confirmed the leader's leadership for it to answer a
/// heartbeat. A node's fencing lease runs from heartbeats such a leader answered, so no
/// leader answers one later than this after a newer leader was elected.
pub const LEADER_LEASE: Duration = Duration::from_secs(2);

/// Added to a fenced allocation's stop time before the leader replaces it: the monitors read
/// the lease every 200 ms, and SIGKILL takes a moment.
pub const FENCE_MARGIN: Duration = Duration::from_secs(1);

/// How long after its node's last heartbeat a fenced allocation is certain to be stopped:
/// its job's `disconnect.stop_after`, then its containers' longest stop grace. `None`: not
/// fenced.
pub fn fence_of(state: &ClusterState, a: &Allocation) -> Option<Duration> {
    let spec = &state
        .job(&a.namespace, &a.job)?
        .version(a.job_version)?
        .spec;
    let stop_after = spec.disconnect.as_ref()?.stop_after;
    let grace = spec
        .containers
        .iter()
        .map(|c| c.stop_grace)
        .max()
        .unwrap_or_default();
    Some(stop_after + grace)
}

/// When a follower read the leader's clock, and how long ago each node's last heartbeat was.
type LeaderClock = (Instant, HashMap<String, Duration>);

/// What an allocation uses, from its node's heartbeats.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// CPU time used (a counter) and when it was read here.
    pub cpu_seconds: f64,
    pub at: Instant,
    pub at_ms: i64,
    /// CPU seconds per second between the last two reports (0 after the first).
    pub cpu_cores: f64,
    pub memory_bytes: u64,
    /// 0: unlimited.
    pub memory_limit_bytes: u64,
    pub oom_kills: u64,
}

impl Heartbeats {
    /// Replaces `node`'s sidecar request counts.
    pub fn record_requests(&self, node: &str, samples: HashMap<String, RequestSample>) {
        let mut m = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if samples.is_empty() {
            m.remove(node);
        } else {
            m.insert(node.to_owned(), samples);
        }
    }

    /// The last counts of an allocation's sidecar on `node`.
    pub fn requests(&self, node: &str, alloc: &str) -> Option<RequestSample> {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)?
            .get(alloc)
            .cloned()
    }

    /// Replaces `node`'s usage figures (`(allocation, cpu seconds, memory, limit, OOM kills)`),
    /// each allocation's CPU rate taken against its previous report.
    pub fn record_usage(&self, node: &str, reported: Vec<(String, f64, u64, u64, u64)>) {
        let now = Instant::now();
        let at_ms = crate::api::now_ms();
        let mut m = self
            .usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = m.remove(node).unwrap_or_default();
        if reported.is_empty() {
            return;
        }
        let next = reported
            .into_iter()
            .map(
                |(alloc, cpu_seconds, memory_bytes, memory_limit_bytes, oom_kills)| {
                    let cpu_cores = before
                        .get(&alloc)
                        .map(|p| {
                            let dt = now.duration_since(p.at).as_secs_f64();
                            let used = cpu_seconds - p.cpu_seconds;
                            if dt > 0.0 && used >= 0.0 {
                                used / dt
                            } else {
                                0.0
                            }
                        })
                        .unwrap_or(0.0);
                    let u = Measured {
                        cpu_seconds,
                        at: now,
                        at_ms,
                        cpu_cores,
                        memory_bytes,
                        memory_limit_bytes,
                        oom_kills,
                    };
                    (alloc, u)
                },
            )
            .collect();
        m.insert(node.to_owned(), next);
    }

    /// Every allocation's last usage, as `(node, allocation, usage)`, sorted.
    pub fn usage(&self) -> Vec<(String, String, Measured)> {
        let m = self
            .usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<_> = m
            .iter()
            .flat_map(|(node, allocs)| {
                allocs
                    .iter()
                    .map(|(a, u)| (node.clone(), a.clone(), u.clone()))
            })
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    pub fn beat(&self, node: &str) {
        self.lock().insert(node.to_owned(), Instant::now());
    }

    /// Records a heartbeat from `node` unless its fenced allocations are being declared lost
    /// (false: the heartbeat must not be answered).
    pub fn beat_unless_fencing(&self, node: &str) -> bool {
        let mut clock = self.lock();
        if lock(&self.fencing).contains(node) {
            return false;
        }
        clock.insert(node.to_owned(), Instant::now());
        true
    }

    /// Whether a fenced allocation of `node` that stops `stop` after the node's last lease
    /// is certain to be stopped now: `stop` (and [`FENCE_MARGIN`]) has passed since the last
    /// heartbeat this leader recorded, and since the last a former leader may have answered
    /// (up to [`LEADER_LEASE`] after this leader took over at `leading_at`). If so, the node's
    /// heartbeats go unanswered until [`Heartbeats::end_fence`].
    fn begin_fence(&self, node: &str, stop: Duration, leading_at: Instant) -> bool {
        let clock = self.lock();
        let now = Instant::now();
        let wait = stop + FENCE_MARGIN;
        let stopped = now >= leading_at + LEADER_LEASE + wait
            && clock.get(node).is_none_or(|t| now >= *t + wait);
        if stopped {
            lock(&self.fencing).insert(node.to_owned());
        }
        stopped
    }

    /// The write declaring `nodes`' fenced allocations lost is applied (or failed).
    fn end_fence(&self, nodes: &BTreeSet<String>) {
        let mut f = lock(&self.fencing);
        for n in nodes {
            f.remove(n);
        }
    }

    /// Drops a removed node's clock and counts.
    pub fn forget(&self, node: &str) {
        self.lock().remove(node);
        self.record_requests(node, HashMap::new());
        self.record_usage(node, Vec::new());
    }

    /// How long ago each node's last heartbeat arrived (the Liveness RPC).
    pub fn ages(&self) -> Vec<(String, Duration)> {
        let now = Instant::now();
        self.lock()
            .iter()
            .map(|(n, t)| (n.clone(), now.saturating_duration_since(*t)))
            .collect()
    }

    /// Keeps the leader's clock as a follower read it.
    pub fn learn(&self, ages: HashMap<String, Duration>) {
        *self
            .leader_clock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), ages));
    }

    fn last(&self, node: &str) -> Option<Instant> {
        self.lock().get(node).copied()
    }

    /// Starts every node's clock now (a new leader does not know when they last beat).
    /// A new leader's clock: each node's last heartbeat as the previous leader saw it (read
    /// in the last [`CLOCK_FRESH`]), so that a node already silent then is not given a whole
    /// new grace; but at least [`RECONNECT_FLOOR`] from now for every node to reach the new
    /// leader (no node is marked down for the failover itself). Nodes the old clock did not
    /// have get a whole grace from now.
    fn reset(&self, nodes: impl Iterator<Item = String>, grace: Duration) {
        let now = Instant::now();
        let learned = self
            .leader_clock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .filter(|(at, _)| now.saturating_duration_since(*at) < CLOCK_FRESH);
        let floor = now
            .checked_sub(grace.saturating_sub(RECONNECT_FLOOR))
            .unwrap_or(now);
        let mut m = self.lock();
        m.clear();
        for n in nodes {
            let last = learned
                .as_ref()
                .and_then(|(at, ages)| at.checked_sub(*ages.get(&n)?))
                .map_or(now, |t| t.max(floor));
            m.insert(n, last);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Ends the fencing of the nodes it holds when dropped (the write done, or the pass
/// stopped early).
struct FenceGuard<'a> {
    heartbeats: &'a Heartbeats,
    nodes: BTreeSet<String>,
}

impl Drop for FenceGuard<'_> {
    fn drop(&mut self) {
        self.heartbeats.end_fence(&self.nodes);
    }
}

/// How long a node may go unheard before it is down, by default. Nodes heartbeat every
/// second (`HEARTBEAT_INTERVAL` in the Nodes API) and give up on a heartbeat after 2 s
/// (the agent's `HEARTBEAT_TIMEOUT`), then reconnect; across a 3 s network blip the longest
/// silence measured is below 5 s (`e2e/tests/fleet.rs`, f60). Node loss to a replacement
/// running is then about 8 s.
pub const DEFAULT_NODE_GRACE: Duration = Duration::from_secs(7);

/// Timing of the loops.
#[derive(Clone, Copy, Debug)]
pub struct ReconcileSettings {
    /// A node not heard from for this long is down.
    pub node_grace: Duration,
    /// How often the loop runs when nothing changes.
    pub interval: Duration,
    /// How often every job is planned, whatever was touched (the safety net under the
    /// incremental passes); garbage is collected as often.
    pub full_interval: Duration,
    /// Allocations over (stopped, process gone) for this long are forgotten.
    pub gc_after: Duration,
    /// Versions kept per job (the latest, the stable one, the current rollout's and any still
    /// running are kept whatever this says).
    pub keep_versions: usize,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        ReconcileSettings {
            node_grace: DEFAULT_NODE_GRACE,
            interval: Duration::from_millis(500),
            full_interval: Duration::from_secs(10),
            gc_after: Duration::from_secs(3600),
            keep_versions: 10,
        }
    }
}

/// What one job needs: new allocations, allocations to take out of service discovery or to
/// stop, what did not fit, and a step of its rollout.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobPlan {
    pub place: Vec<Allocation>,
    /// Out of service discovery now, stopped after the job's `drain_delay`.
    pub drain: Vec<String>,
    pub stop: Vec<String>,
    pub unplaced: u32,
    /// The scheduler's reason when `unplaced > 0`.
    pub pending: Option<String>,
    /// A change to the job's current rollout (of the version given).
    pub rollout: Option<(u64, RolloutChange)>,
    /// A failed rollout to roll back: to this version, for this reason.
    pub rollback: Option<(u64, String)>,
}

/// What an allocation of `spec` asks of its node: the sum of its containers, and a pod
/// address unless it has no network of its own (host or none).
pub fn ask(spec: &JobSpec) -> Usage {
    let r = spec.total_resources();
    let mut u = Usage::new(r.cpu, r.memory.as_u64(), u64::from(r.pids));
    if spec.network.mode != skiff_common::spec::NetworkMode::Bridge {
        u.addresses = 0;
    }
    u
}

/// The job's named volumes as nodes report them: `namespace/job/name`.
pub fn named_volume_keys(spec: &JobSpec) -> Vec<String> {
    spec.volumes
        .iter()
        .filter(|v| v.kind == skiff_common::spec::VolumeKind::Named)
        .map(|v| format!("{}/{}/{}", spec.namespace, spec.name, v.name))
        .collect()
}

/// The node directories the job's host volumes mount.
pub fn host_paths(spec: &JobSpec) -> Vec<String> {
    spec.volumes
        .iter()
        .filter(|v| v.kind == skiff_common::spec::VolumeKind::Host)
        .filter_map(|v| v.path.clone())
        .collect()
}

/// Whether an allocation holds its node's resources: it should run and is not gone.
fn holds(a: &Allocation) -> bool {
    a.holds()
}

/// What the live allocations on each node hold, and how many there are.
pub fn usage_by_node(state: &ClusterState) -> BTreeMap<&str, (Usage, u32)> {
    node_holdings(state)
        .into_iter()
        .map(|(node, (usage, count, _))| (node, (usage, count)))
        .collect()
}

type Holdings<'a> = BTreeMap<&'a str, (Usage, u32, std::collections::BTreeSet<(u16, Protocol)>)>;

/// Per node: what its live allocations hold, how many there are, and the ports they publish.
fn node_holdings(state: &ClusterState) -> Holdings<'_> {
    let mut used: Holdings<'_> = BTreeMap::new();
    for a in state.allocations().filter(|a| holds(a)) {
        let entry = used.entry(a.node.as_str()).or_default();
        entry.1 += 1;
        if let Some(spec) = state
            .job(&a.namespace, &a.job)
            .and_then(|j| j.version(a.job_version))
            .map(|v| &v.spec)
        {
            entry.0.add(ask(spec));
            entry.2.extend(spec.node_ports());
        }
    }
    used
}

/// The scheduler's view of every node: resources and ports held by live allocations.
pub fn node_view(state: &ClusterState) -> Vec<Candidate<'_>> {
    let mut held = node_holdings(state);
    state
        .nodes()
        .map(|n| {
            let (used, _, ports) = held.remove(n.name.as_str()).unwrap_or_default();
            Candidate {
                node: n,
                used,
                job_replicas: 0,
                ports,
            }
        })
        .collect()
}

/// Plans one job against `view` (updated in place with what is placed). `new_id` names new
/// allocations.
///
/// Without an open rollout, missing replicas are placed at once and replicas of other
/// versions (or on draining and down nodes) leave once their replacements are placed. With
/// one, replicas are replaced within its bounds: at most `replicas + max_surge` running (those
/// draining included), at least `replicas - max_unavailable` healthy, a new replica counting
/// once healthy for `min_healthy`; canaries first when it has them.
/// `verdict` is the canary analysis's, for a job whose rollout has one.
pub fn plan_job(
    state: &ClusterState,
    view: &mut [Candidate<'_>],
    job: &Job,
    new_id: &mut dyn FnMut() -> String,
    now_ms: i64,
    verdict: Option<&Verdict>,
) -> JobPlan {
    let mut plan = JobPlan::default();
    let live: Vec<&Allocation> = state
        .job_allocations(&job.namespace, &job.name)
        .filter(|a| holds(a))
        .collect();
    if job.status == JobStatus::Stopped {
        plan.stop = live.iter().map(|a| a.id.clone()).collect();
        return plan;
    }
    let latest = job.latest();
    let update = latest.spec.update_strategy();
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    // Draining replicas are stopped once their delay is over; they count as running.
    let (draining, serving): (Vec<&Allocation>, Vec<&Allocation>) =
        live.iter().partition(|a| a.drain_since_ms.is_some());
    for a in &draining {
        if a.drain_since_ms
            .is_some_and(|t| now_ms.saturating_sub(t) >= ms(update.drain_delay))
        {
            plan.stop.push(a.id.clone());
        }
    }
    // Only what is in service discovery and running needs draining; the rest stops at once.
    let drains = latest.spec.service.is_some() && !update.drain_delay.is_zero();
    let leave = |plan: &mut JobPlan, a: &Allocation| {
        if drains && a.observed == AllocationStatus::Running {
            plan.drain.push(a.id.clone());
        } else {
            plan.stop.push(a.id.clone());
        }
    };
    let node_status = |name: &str| state.node(name).map(|n| n.status);
    let mut compatible: BTreeMap<u64, bool> = BTreeMap::new();
    let (current, rest): (Vec<&Allocation>, Vec<&Allocation>) = serving.iter().partition(|a| {
        let same = *compatible
            .entry(a.job_version)
            .or_insert_with(|| job.same_as_latest(a.job_version));
        // A fenced replica on a down node keeps its place until it is lost (its node has
        // surely stopped it): its replacement must not run beside it.
        same && match node_status(&a.node) {
            Some(NodeStatus::Ready) => true,
            Some(NodeStatus::Down) => fence_of(state, a).is_some(),
            _ => false,
        }
    });
    // Replicas of the current version per node, for anti-affinity.
    let mut per_node: BTreeMap<&str, u32> = BTreeMap::new();
    for a in &current {
        *per_node.entry(a.node.as_str()).or_default() += 1;
    }
    for c in view.iter_mut() {
        c.job_replicas = per_node.get(c.node.name.as_str()).copied().unwrap_or(0);
    }
    let want = latest.spec.replicas as usize;
    let rollout = job.open_rollout().filter(|r| job.same_as_latest(r.version));
    let Some(rollout) = rollout else {
        // No rollout: fill up, scale down, move off draining and down nodes.
        if current.len() > want {
            for a in scale_down(&current, current.len() - want) {
                leave(&mut plan, a);
            }
        } else if current.len() < want {
            place(&mut plan, view, job, want - current.len(), new_id, now_ms);
        }
        // Old versions and replicas on draining (or down) nodes go once their replacements
        // are placed; while some replicas do not fit, they keep serving.
        if plan.unplaced == 0 {
            for a in &rest {
                leave(&mut plan, a);
            }
        }
        return plan;
    };
    let version = rollout.version;
    // A replica that ran to completion (a batch job's) counts as healthy.
    let done = |a: &Allocation| a.observed == AllocationStatus::Exited { code: 0 };
    let healthy_for = |a: &Allocation| {
        done(a)
            || a.healthy_since_ms
                .is_some_and(|t| now_ms.saturating_sub(t) >= ms(update.min_healthy))
    };
    let ready = current.iter().filter(|a| healthy_for(a)).count();
    if rollout.status != RolloutStatus::Running {
        // Paused, or failed without a rollback: keep the count, replace nothing.
        let total = current.len() + rest.len();
        if total < want {
            place(&mut plan, view, job, want - total, new_id, now_ms);
        }
        return plan;
    }
    // Failures: a new replica not healthy in time (crashing, failing its check, not
    // starting), or no progress at all.
    let failure = current.iter().find_map(|a| {
        let age = now_ms.saturating_sub(a.created_at_ms);
        if age <= ms(update.healthy_deadline) || healthy_for(a) {
            return None;
        }
        let why = match &a.observed {
            AllocationStatus::Failed { reason } => format!(": failed: {reason}"),
            _ if !a.health_output.is_empty() => format!(": {}", a.health_output.trim()),
            other => format!(" ({}, {} restarts)", other.as_str(), a.restarts),
        };
        Some(format!(
            "replica {} of version {} on {} not healthy for {} within healthy_deadline {}{why}",
            a.id,
            a.job_version,
            a.node,
            humantime::format_duration(update.min_healthy),
            humantime::format_duration(update.healthy_deadline),
        ))
    });
    let stalled = now_ms.saturating_sub(rollout.progress_at_ms) > ms(update.progress_deadline);
    let failure = failure.or_else(|| {
        stalled.then(|| {
            format!(
                "no progress for progress_deadline {} ({ready} of {want} new replicas healthy, {} old left)",
                humantime::format_duration(update.progress_deadline),
                rest.len()
            )
        })
    });
    let fail = |plan: &mut JobPlan, reason: String| {
        let target = job
            .stable_version
            .filter(|v| *v != version)
            .unwrap_or(rollout.from_version);
        if update.auto_rollback && rollout.rollback_of.is_none() && !job.same_as_latest(target) {
            plan.rollback = Some((target, reason));
        } else {
            plan.rollout = Some((version, RolloutChange::Fail { reason }));
        }
    };
    if let Some(reason) = failure {
        fail(&mut plan, reason);
        return plan;
    }
    let replicas = latest.spec.replicas;
    if !rollout.promoted {
        // Canaries next to every old replica; once healthy, the analysis (if any) decides.
        let canary = rollout.canary as usize;
        if current.len() < canary {
            place(&mut plan, view, job, canary - current.len(), new_id, now_ms);
        }
        if ready >= canary {
            let passed = match (&update.analysis, verdict) {
                (None, _) => true,
                (Some(_), Some(Verdict::Failed(reason))) => {
                    fail(&mut plan, reason.clone());
                    return plan;
                }
                (Some(_), Some(Verdict::Passed(_))) => true,
                (Some(_), _) => false,
            };
            if passed && update.auto_promote {
                plan.rollout = Some((version, RolloutChange::Promote));
                return plan;
            }
        }
        if (ready as u32, rest.len() as u32) != (rollout.healthy, rollout.old_left) {
            plan.rollout = Some((
                version,
                RolloutChange::Progress {
                    healthy: ready as u32,
                    old_left: rest.len() as u32,
                },
            ));
        }
        return plan;
    }
    let surge = update.max_surge.resolve(replicas, true) as usize;
    let unavailable = update.max_unavailable.resolve(replicas, false) as usize;
    let running = live.len();
    if current.len() > want {
        for a in scale_down(&current, current.len() - want) {
            leave(&mut plan, a);
        }
    } else {
        let room = (want + surge).saturating_sub(running);
        let n = (want - current.len()).min(room);
        if n > 0 {
            place(&mut plan, view, job, n, new_id, now_ms);
        }
    }
    // Old replicas leave while enough stay healthy: those not serving first.
    let available = |a: &Allocation| a.healthy_since_ms.is_some() || done(a);
    let old_available = rest.iter().filter(|a| available(a)).count();
    let mut budget = (ready + old_available).saturating_sub(want.saturating_sub(unavailable));
    let mut old: Vec<&&Allocation> = rest.iter().collect();
    old.sort_by_key(|a| (available(a), a.created_at_ms));
    let mut left = rest.len();
    for a in old {
        if available(a) {
            if budget == 0 {
                break;
            }
            budget -= 1;
        }
        leave(&mut plan, a);
        left -= 1;
    }
    if ready >= want && current.len() == want && left == 0 {
        plan.rollout = Some((version, RolloutChange::Succeed));
    } else if (ready as u32, left as u32) != (rollout.healthy, rollout.old_left) {
        plan.rollout = Some((
            version,
            RolloutChange::Progress {
                healthy: ready as u32,
                old_left: left as u32,
            },
        ));
    }
    plan
}

/// `count` replicas to take away, one at a time from the node that has the most left (ties:
/// the node name), its newest first: what stays is as spread as what was there.
fn scale_down<'a>(current: &[&'a Allocation], count: usize) -> Vec<&'a Allocation> {
    let mut by_node: BTreeMap<&str, Vec<&Allocation>> = BTreeMap::new();
    for a in current {
        by_node.entry(a.node.as_str()).or_default().push(a);
    }
    for list in by_node.values_mut() {
        list.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    }
    let mut out = Vec::new();
    for _ in 0..count {
        let Some(list) = by_node
            .iter_mut()
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
            .map(|(_, l)| l)
        else {
            break;
        };
        if let Some(a) = list.pop() {
            out.push(a);
        }
    }
    out
}

/// Places `count` replicas of the job's latest version (what does not fit is `unplaced`).
fn place(
    plan: &mut JobPlan,
    view: &mut [Candidate<'_>],
    job: &Job,
    count: usize,
    new_id: &mut dyn FnMut() -> String,
    now_ms: i64,
) {
    let latest = job.latest();
    let ports = latest.spec.node_ports();
    let host_paths = host_paths(&latest.spec);
    let named_volumes = named_volume_keys(&latest.spec);
    let req = Request {
        ask: ask(&latest.spec),
        constraints: &latest.spec.placement.constraints,
        strategy: if latest.spec.placement.spread {
            Strategy::Spread
        } else {
            Strategy::BinPack
        },
        count: u32::try_from(count).unwrap_or(u32::MAX),
        ports: &ports,
        host_paths: &host_paths,
        named_volumes: &named_volumes,
        capabilities: &skiff_common::capability::required_by(&latest.spec),
    };
    let placed = scheduler::place(view, &req);
    for node in placed.placements {
        plan.place.push(Allocation::new_pending(
            &new_id(),
            &job.namespace,
            &job.name,
            latest.version,
            &node,
            now_ms,
        ));
    }
    plan.unplaced = placed.unplaced;
    plan.pending = placed.rejections.map(|r| r.to_string());
}

/// The canary analysis of `job`'s rollout, when it has one and its canaries are healthy.
fn judge(
    state: &ClusterState,
    job: &Job,
    heartbeats: &Heartbeats,
    analyses: &mut Analyses,
    now_ms: i64,
) -> Option<Verdict> {
    let rollout = job.open_rollout()?;
    let update = job.latest().spec.update_strategy();
    let rules = update.analysis.as_ref()?;
    if rollout.status != RolloutStatus::Running
        || rollout.promoted
        || job.status != JobStatus::Running
    {
        return None;
    }
    let min_healthy = i64::try_from(update.min_healthy.as_millis()).unwrap_or(i64::MAX);
    let (mut new, mut old) = (Vec::new(), Vec::new());
    let mut ready = 0;
    for a in state
        .job_allocations(&job.namespace, &job.name)
        .filter(|a| holds(a) && a.drain_since_ms.is_none())
    {
        if job.same_as_latest(a.job_version) {
            if a.healthy_since_ms
                .is_some_and(|t| now_ms.saturating_sub(t) >= min_healthy)
            {
                ready += 1;
            }
            new.push((a.node.clone(), a.id.clone()));
        } else {
            old.push((a.node.clone(), a.id.clone()));
        }
    }
    if ready < rollout.canary {
        return None;
    }
    let nodes: HashMap<String, String> = new
        .iter()
        .chain(&old)
        .map(|(n, id)| (id.clone(), n.clone()))
        .collect();
    let stats = |id: &str| heartbeats.requests(nodes.get(id)?, id);
    let ids = |v: &[(String, String)]| v.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>();
    Some(analyses.judge(
        (
            format!("{}/{}", job.namespace, job.name),
            job.latest().version,
        ),
        rules,
        &ids(&new),
        &ids(&old),
        &stats,
        Instant::now(),
    ))
}

/// A fresh allocation id: 16 hex digits.
pub fn new_alloc_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    format!("{:016x}", rng.random::<u64>())
}

/// The jobs the next pass plans: what applied entries touched, plus the jobs whose plan
/// changes with time alone (a rollout under way, replicas draining, a plan that wrote
/// something last time), plus everything at each full pass.
#[derive(Debug, Default)]
pub struct Work {
    touched: Touched,
    /// Planned at every pass until a plan of theirs is settled.
    active: BTreeSet<String>,
    last_full: Option<Instant>,
    /// Changed pending reasons not yet written, by job key (namespace, name, reason), and
    /// when the oldest of them was found.
    pending: BTreeMap<String, (String, String, Option<String>)>,
    pending_since: Option<Instant>,
}

/// How long a job's changed pending reason may wait before it is written, unless a whole
/// batch ([`PENDING_BATCH`]) is held back sooner. The reasons found meanwhile go to the log
/// together: otherwise every apply of a job that cannot be placed (the usual case while a
/// cluster has no room) costs a second entry right behind it. Each such entry delays the
/// client writes behind it by a few milliseconds (it is replicated, made durable and applied
/// before them); at 200 ms the writes so delayed were about 1% of a single client's, and set
/// its p99 (`skiff-bench-raft --trace-slow`).
pub const PENDING_DELAY: Duration = Duration::from_secs(1);

/// Pending reasons per [`Command::SetJobsPending`] entry (a few hundred bytes each); a batch
/// this large is written at once, without waiting for [`PENDING_DELAY`].
const PENDING_BATCH: usize = 1000;

impl Work {
    /// Everything, at the next pass (a new term).
    pub fn everything(&mut self) {
        self.touched = Touched::everything();
    }

    /// Adds what applied entries touched.
    pub fn add(&mut self, touched: Touched) {
        self.touched.merge(touched);
    }

    /// Holds a job's new pending reason until [`Work::pending_due`] (a later plan replaces it).
    fn defer_pending(&mut self, job: &Job, reason: Option<String>, now: Instant) {
        let key = crate::state::job_key(&job.namespace, &job.name);
        self.pending
            .insert(key, (job.namespace.clone(), job.name.clone(), reason));
        self.pending_since.get_or_insert(now);
    }

    /// A job's reason as planned now equals the written one: nothing to write for it.
    fn settle_pending(&mut self, key: &str) {
        self.pending.remove(key);
        if self.pending.is_empty() {
            self.pending_since = None;
        }
    }

    /// When the pending reasons held back are to be written: [`PENDING_DELAY`] after the
    /// oldest, or at once when they fill a batch.
    pub fn pending_due(&self) -> Option<Instant> {
        let full = self.pending.len() >= PENDING_BATCH;
        self.pending_since
            .map(|t| if full { t } else { t + PENDING_DELAY })
    }

    /// Takes the pending reasons held back, if they are due at `now`.
    fn take_due_pending(&mut self, now: Instant) -> Vec<(String, String, Option<String>)> {
        if self.pending_due().is_none_or(|due| now < due) {
            return Vec::new();
        }
        self.pending_since = None;
        std::mem::take(&mut self.pending).into_values().collect()
    }

    /// Whether the next pass plans every job: asked for, or the safety net's turn.
    fn full(&self, now: Instant, every: Duration) -> bool {
        self.touched.all
            || self
                .last_full
                .is_none_or(|t| now.duration_since(t) >= every)
    }

    /// The keys of the jobs an incremental pass plans.
    fn keys(&self, state: &ClusterState) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = self.touched.jobs.union(&self.active).cloned().collect();
        if self.touched.capacity {
            // Resources were freed or a node changed: what did not fit may fit now. That is
            // the jobs with a reason written, and those whose reason is held back here (its
            // write plans nothing again, so they would wait for the next full pass).
            keys.extend(
                state
                    .jobs(None)
                    .filter(|j| j.pending.is_some())
                    .map(|j| crate::state::job_key(&j.namespace, &j.name)),
            );
            keys.extend(
                self.pending
                    .iter()
                    .filter(|(_, (_, _, reason))| reason.is_some())
                    .map(|(key, _)| key.clone()),
            );
        }
        keys
    }
}

/// Allocation ids one garbage collection entry names at most (the rest waits for the next).
pub const GC_BATCH: usize = 1000;

/// What garbage collection would remove now: allocations over for at least `gc_after`, and
/// versions of each job beyond the last `keep_versions` that nothing still needs. `None`
/// when there is nothing.
pub fn garbage(state: &ClusterState, settings: &ReconcileSettings, now_ms: i64) -> Option<Command> {
    let after = i64::try_from(settings.gc_after.as_millis()).unwrap_or(i64::MAX);
    let allocations: Vec<String> = state
        .allocations()
        .filter(|a| a.collectable() && now_ms.saturating_sub(a.observed_at_ms) >= after)
        .map(|a| a.id.clone())
        .take(GC_BATCH)
        .collect();
    let collected: std::collections::HashSet<&str> =
        allocations.iter().map(String::as_str).collect();
    let keep = settings.keep_versions.max(1);
    let mut versions = Vec::new();
    for job in state.jobs(None) {
        let all = job.versions();
        if all.len() <= keep {
            continue;
        }
        let in_use: BTreeSet<u64> = state
            .job_allocations(&job.namespace, &job.name)
            .filter(|a| !collected.contains(a.id.as_str()))
            .map(|a| a.job_version)
            .collect();
        let rollout = job.rollout().map(|r| (r.version, r.from_version));
        let old: Vec<u64> = all[..all.len() - keep]
            .iter()
            .map(|v| v.version)
            .filter(|v| {
                !in_use.contains(v)
                    && Some(*v) != job.stable_version
                    && !rollout.is_some_and(|(to, from)| *v == to || *v == from)
            })
            .collect();
        if !old.is_empty() {
            versions.push(JobVersions {
                namespace: job.namespace.clone(),
                name: job.name.clone(),
                versions: old,
            });
        }
    }
    (!allocations.is_empty() || !versions.is_empty()).then_some(Command::CollectGarbage {
        allocations,
        versions,
        at_ms: now_ms,
    })
}

/// Whether a job's plan may change with time alone, so it is planned at every pass.
/// (A changed pending reason is held in [`Work`] until written; its write touches the job.)
fn time_bound(state: &ClusterState, job: &Job, plan: &JobPlan) -> bool {
    let wrote = !plan.place.is_empty()
        || !plan.stop.is_empty()
        || !plan.drain.is_empty()
        || plan.rollout.is_some()
        || plan.rollback.is_some();
    wrote
        || job
            .open_rollout()
            .is_some_and(|r| r.status == RolloutStatus::Running)
        || state
            .job_allocations(&job.namespace, &job.name)
            .any(|a| holds(a) && a.drain_since_ms.is_some())
}

/// How recent a follower's copy of the leader's clock must be to be used when elected.
const CLOCK_FRESH: Duration = Duration::from_secs(3);
/// The least time a new leader gives every node to reach it.
const RECONNECT_FLOOR: Duration = Duration::from_secs(5);

/// On a follower: reads the leader's heartbeat clock every second (see [`Heartbeats::reset`]).
/// Runs until `stop` fires.
pub async fn follow_leader_clock(
    node: RaftNode,
    heartbeats: Heartbeats,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if *stop.borrow() {
            return;
        }
        if node.status().role == crate::raft::Role::Leader {
            continue;
        }
        let Some((_, leader)) = node.leader() else {
            continue;
        };
        let Ok(channel) = node.channel(&leader.rpc_addr) else {
            continue;
        };
        let mut client = skiff_proto::v1::nodes_client::NodesClient::new(channel);
        let mut req = tonic::Request::new(skiff_proto::v1::LivenessRequest {});
        req.set_timeout(Duration::from_secs(1));
        let Ok(Ok(reply)) =
            tokio::time::timeout(Duration::from_secs(1), client.liveness(req)).await
        else {
            continue;
        };
        heartbeats.learn(
            reply
                .into_inner()
                .nodes
                .into_iter()
                .map(|n| (n.node, Duration::from_millis(n.age_ms)))
                .collect(),
        );
    }
}

/// The leader's loop: runs until `stop` fires.
pub async fn run(
    node: RaftNode,
    heartbeats: Heartbeats,
    settings: ReconcileSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut applied = node.applied_watch();
    let mut leading_since: Option<u64> = None;
    let mut leading_at = Instant::now();
    let mut analyses = Analyses::default();
    let mut work = Work::default();
    loop {
        let status = node.status();
        let leader = status.role == crate::raft::Role::Leader;
        // Taken on every member, so that what a follower gathers stays small.
        let touched = node.take_touched();
        if leader && leading_since != Some(status.term) {
            // A new term of ours: every node gets what is left of its grace (as the last
            // leader's clock said, at least a few seconds to reconnect), and every job is
            // planned afresh.
            let names: Vec<String> = node.state().state.nodes().map(|n| n.name.clone()).collect();
            heartbeats.reset(names.into_iter(), settings.node_grace);
            leading_since = Some(status.term);
            leading_at = Instant::now();
            work = Work::default();
            work.everything();
            info!(term = status.term, "reconciler started");
        } else if !leader {
            leading_since = None;
        }
        if !leader {
            analyses = Analyses::default();
            work = Work::default();
        }
        if leader {
            work.add(touched);
            let mut result = pass(
                &node,
                &heartbeats,
                &settings,
                &mut analyses,
                &mut work,
                leading_at,
            )
            .await;
            if result.is_ok() {
                result = write_pending(&node, &mut work).await;
            }
            if let Err(e) = result {
                // What this pass had to do is not known to be done: all of it next time.
                work.everything();
                debug!(error = %e, "reconcile pass stopped early");
            }
        }
        let wait = work
            .pending_due()
            .map_or(settings.interval, |due| {
                due.saturating_duration_since(Instant::now())
            })
            .min(settings.interval);
        tokio::select! {
            _ = stop.changed() => return,
            _ = applied.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Writes the pending reasons held back, once due, all at once (they share the log's group
/// commit). A reason the state already has, or whose job is gone, is dropped.
async fn write_pending(node: &RaftNode, work: &mut Work) -> Result<(), crate::raft::RaftNodeError> {
    let due = work.take_due_pending(Instant::now());
    if due.is_empty() {
        return Ok(());
    }
    let items: Vec<JobPending> = {
        let applied = node.state();
        due.into_iter()
            .filter(|(namespace, name, pending)| {
                applied
                    .state
                    .job(namespace, name)
                    .is_some_and(|j| j.pending != *pending)
            })
            .map(|(namespace, name, pending)| JobPending {
                namespace,
                name,
                pending,
            })
            .collect()
    };
    // One entry per batch, not per job: a burst of new jobs with nowhere to run would
    // otherwise double the entries the cluster writes. A cluster part-way through an upgrade
    // from a release without batches gets one entry per job.
    let batched = node
        .allows(&Command::SetJobsPending { items: Vec::new() })
        .is_ok();
    let commands: Vec<Command> = if batched {
        items
            .chunks(PENDING_BATCH)
            .map(|c| Command::SetJobsPending { items: c.to_vec() })
            .collect()
    } else {
        items
            .into_iter()
            .map(|p| Command::SetJobPending {
                namespace: p.namespace,
                name: p.name,
                pending: p.pending,
            })
            .collect()
    };
    let results = futures::future::join_all(commands.into_iter().map(|c| node.write(c))).await;
    for r in results {
        if let (Err(e), _) = r? {
            warn!(error = %e, "pending reason refused");
        }
    }
    Ok(())
}

/// One pass: liveness, then the jobs `work` names (every job at a full pass). Each
/// decision is one Raft write; pending reasons are held back briefly ([`PENDING_DELAY`]).
async fn pass(
    node: &RaftNode,
    heartbeats: &Heartbeats,
    settings: &ReconcileSettings,
    analyses: &mut Analyses,
    work: &mut Work,
    leading_at: Instant,
) -> Result<(), crate::raft::RaftNodeError> {
    let now = Instant::now();
    let mut commands: Vec<Command> = Vec::new();
    let mut fencing = FenceGuard {
        heartbeats,
        nodes: BTreeSet::new(),
    };
    {
        let applied = node.state();
        let state = &applied.state;
        for n in state.nodes() {
            let last = heartbeats.last(&n.name);
            let fresh = last.is_some_and(|t| now.duration_since(t) < settings.node_grace);
            match (n.status, fresh) {
                (NodeStatus::Ready | NodeStatus::Draining, false) => {
                    warn!(node = %n.name, grace = ?settings.node_grace, "node missed its heartbeats: down");
                    commands.push(Command::SetNodeStatus {
                        name: n.name.clone(),
                        status: NodeStatus::Down,
                        at_ms: now_ms(),
                    });
                }
                (NodeStatus::Down, true) => {
                    info!(node = %n.name, "node is back");
                    commands.push(Command::SetNodeStatus {
                        name: n.name.clone(),
                        status: NodeStatus::Ready,
                        at_ms: now_ms(),
                    });
                }
                _ => {}
            }
            if n.status == NodeStatus::Down || !fresh {
                // A fenced allocation is lost only once its node has surely stopped it;
                // deciding so begins the node's fence (its heartbeats go unanswered until
                // the loss is written).
                let mut lost = Vec::new();
                for a in state.node_allocations(&n.name).filter(|a| holds(a)) {
                    let gone = match fence_of(state, a) {
                        None => true,
                        Some(stop) => {
                            let stopped = heartbeats.begin_fence(&n.name, stop, leading_at);
                            if stopped {
                                fencing.nodes.insert(n.name.clone());
                            }
                            stopped
                        }
                    };
                    if gone {
                        lost.push(a.id.clone());
                    }
                }
                if !lost.is_empty() {
                    commands.push(Command::StopAllocations {
                        ids: lost,
                        lost: true,
                        at_ms: now_ms(),
                    });
                }
            }
        }
    }
    if !commands.is_empty() {
        // Liveness first; the jobs are planned against the state it leaves.
        for c in commands.drain(..) {
            if let (Err(e), _) = node.write(c).await? {
                warn!(error = %e, "liveness command refused");
            }
        }
        // What those writes touched is planned now, not at the next pass.
        work.add(node.take_touched());
    }
    drop(fencing);
    let full = work.full(now, settings.full_interval);
    {
        // A full pass plans every job, tens of milliseconds at tens of thousands of jobs: on
        // a copy, so that entries go on being applied meanwhile. An incremental pass is
        // short, and holding the lock through it is cheaper than a copy: a copy makes the
        // next changes to the state copy the records they touch.
        let (guard, copy);
        let state = if full {
            copy = node.state_copy();
            &copy
        } else {
            guard = node.state();
            &guard.state
        };
        let keys = (!full).then(|| work.keys(state));
        if keys.as_ref().is_some_and(BTreeSet::is_empty) {
            work.touched = Touched::default();
            return Ok(());
        }
        let jobs: Vec<&Job> = match &keys {
            None => state.jobs(None).collect(),
            Some(keys) => keys.iter().filter_map(|k| state.job_by_key(k)).collect(),
        };
        let mut view = node_view(state);
        let mut place = Vec::new();
        let mut stop = Vec::new();
        let mut drain = Vec::new();
        let mut rollouts = Vec::new();
        let mut judged = Vec::new();
        let mut active = BTreeSet::new();
        for job in jobs {
            let key = format!("{}/{}", job.namespace, job.name);
            let verdict = judge(state, job, heartbeats, analyses, now_ms());
            if let Some(v) = &verdict {
                judged.push((key.clone(), job.latest().version));
                debug!(job = %key, ?v, "canary analysis");
            }
            let plan = plan_job(
                state,
                &mut view,
                job,
                &mut new_alloc_id,
                now_ms(),
                verdict.as_ref(),
            );
            if !plan.place.is_empty() || !plan.stop.is_empty() || !plan.drain.is_empty() {
                info!(
                    job = %key,
                    place = plan.place.len(),
                    drain = plan.drain.len(),
                    stop = plan.stop.len(),
                    unplaced = plan.unplaced,
                    "reconciling"
                );
            }
            let pending_changed = job.pending != plan.pending;
            if time_bound(state, job, &plan) {
                active.insert(crate::state::job_key(&job.namespace, &job.name));
            }
            place.extend(plan.place);
            stop.extend(plan.stop);
            drain.extend(plan.drain);
            if let Some((version, change)) = plan.rollout {
                if !matches!(change, RolloutChange::Progress { .. }) {
                    info!(job = %key, version, ?change, "rollout");
                }
                rollouts.push(Command::Rollout {
                    namespace: job.namespace.clone(),
                    name: job.name.clone(),
                    version,
                    change,
                    at_ms: now_ms(),
                });
            }
            if let Some((to_version, reason)) = plan.rollback {
                warn!(job = %key, to_version, %reason, "rollout failed: rolling back");
                rollouts.push(Command::RollbackJob {
                    namespace: job.namespace.clone(),
                    name: job.name.clone(),
                    to_version,
                    reason,
                    automatic: true,
                    at_ms: now_ms(),
                });
            }
            if pending_changed {
                work.defer_pending(job, plan.pending, now);
            } else {
                work.settle_pending(&key);
            }
        }
        if full {
            // Only a full pass sees every open rollout.
            analyses.retain(&judged);
            if let Some(gc) = garbage(state, settings, now_ms()) {
                // Until every member applies it (an upgrade under way), garbage waits.
                match node.allows(&gc) {
                    Ok(()) => {
                        info!(command = %gc, "collecting garbage");
                        commands.push(gc);
                    }
                    Err(e) => debug!(error = %e, "garbage not collected yet"),
                }
            }
            work.last_full = Some(now);
            work.active = active;
        } else {
            // The planned jobs' entries are replaced; the others' stand.
            if let Some(keys) = &keys {
                work.active.retain(|k| !keys.contains(k));
            }
            work.active.extend(active);
        }
        work.touched = Touched::default();
        if !place.is_empty() {
            commands.push(Command::PlaceAllocations { allocations: place });
        }
        if !drain.is_empty() {
            commands.push(Command::DrainAllocations {
                ids: drain,
                at_ms: now_ms(),
            });
        }
        if !stop.is_empty() {
            commands.push(Command::StopAllocations {
                ids: stop,
                lost: false,
                at_ms: now_ms(),
            });
        }
        commands.extend(rollouts);
    }
    for c in commands {
        let (result, _) = node.write(c).await?;
        if let Err(e) = result {
            warn!(error = %e, "reconcile command refused");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
