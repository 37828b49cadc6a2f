//! The leader's control loops: node liveness (heartbeat TTL -> down, allocations lost and
//! replaced), job reconciliation (desired replicas vs allocations: place, scale down, replace old
//! versions, move off draining nodes), and the pending reason of jobs that do not fit.
//!
//! [`plan_job`] is pure (the state, a view of the nodes, fresh ids in): the loop and the
//! `PlanJob` API share it. The loop runs only on the leader and starts afresh at every
//! leadership: a new leader gives every node a full grace period before judging it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skiff_common::JobSpec;
use skiff_common::spec::Protocol;
use tracing::{debug, info, warn};

use crate::api::now_ms;
use crate::raft::RaftNode;
use crate::scheduler::{self, Candidate, Request, Strategy, Usage};
use crate::state::{
    Allocation, AllocationStatus, ClusterState, Command, DesiredStatus, Job, JobStatus, NodeStatus,
};

/// When the leader last heard from each node (shared by the Nodes API and the loop).
#[derive(Clone, Default)]
pub struct Heartbeats {
    inner: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Heartbeats {
    pub fn beat(&self, node: &str) {
        self.lock().insert(node.to_owned(), Instant::now());
    }

    /// Drops a removed node's clock.
    pub fn forget(&self, node: &str) {
        self.lock().remove(node);
    }

    fn last(&self, node: &str) -> Option<Instant> {
        self.lock().get(node).copied()
    }

    /// Starts every node's clock now (a new leader does not know when they last beat).
    fn reset(&self, nodes: impl Iterator<Item = String>) {
        let now = Instant::now();
        let mut m = self.lock();
        m.clear();
        for n in nodes {
            m.insert(n, now);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Timing of the loops.
#[derive(Clone, Copy, Debug)]
pub struct ReconcileSettings {
    /// A node not heard from for this long is down.
    pub node_grace: Duration,
    /// How often the loop runs when nothing changes.
    pub interval: Duration,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        ReconcileSettings {
            node_grace: Duration::from_secs(10),
            interval: Duration::from_millis(500),
        }
    }
}

/// What one job needs: new allocations, allocations to stop, and what did not fit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobPlan {
    pub place: Vec<Allocation>,
    pub stop: Vec<String>,
    pub unplaced: u32,
    /// The scheduler's reason when `unplaced > 0`.
    pub pending: Option<String>,
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
    a.desired == DesiredStatus::Run && a.observed != AllocationStatus::Lost
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
pub fn plan_job(
    state: &ClusterState,
    view: &mut [Candidate<'_>],
    job: &Job,
    new_id: &mut dyn FnMut() -> String,
    now_ms: i64,
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
    let node_status = |name: &str| state.node(name).map(|n| n.status);
    // An older version that differs only in `replicas` runs the same thing: its allocations
    // count as current (scaling does not replace replicas).
    let same_as_latest = |version: u64| {
        version == latest.version
            || job.version(version).is_some_and(|v| {
                let mut spec = v.spec.clone();
                spec.replicas = latest.spec.replicas;
                spec == latest.spec
            })
    };
    let mut compatible: BTreeMap<u64, bool> = BTreeMap::new();
    let (current, rest): (Vec<&Allocation>, Vec<&Allocation>) = live.iter().partition(|a| {
        let same = *compatible
            .entry(a.job_version)
            .or_insert_with(|| same_as_latest(a.job_version));
        same && node_status(&a.node) == Some(NodeStatus::Ready)
    });
    // Replicas of the current version per node, for anti-affinity.
    for c in view.iter_mut() {
        c.job_replicas = current.iter().filter(|a| a.node == c.node.name).count() as u32;
    }
    let want = latest.spec.replicas as usize;
    if current.len() > want {
        // Scale down one replica at a time from the node that has the most left (ties: the
        // node name), taking its newest: what stays is as spread as what was there.
        let mut by_node: BTreeMap<&str, Vec<&Allocation>> = BTreeMap::new();
        for a in &current {
            by_node.entry(a.node.as_str()).or_default().push(a);
        }
        for list in by_node.values_mut() {
            list.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        }
        for _ in want..current.len() {
            let Some(list) = by_node
                .iter_mut()
                .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
                .map(|(_, l)| l)
            else {
                break;
            };
            if let Some(a) = list.pop() {
                plan.stop.push(a.id.clone());
            }
        }
    } else if current.len() < want {
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
            count: (want - current.len()) as u32,
            ports: &ports,
            host_paths: &host_paths,
            named_volumes: &named_volumes,
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
    // Old versions and replicas on draining (or down) nodes go once their replacements are
    // placed; while some replicas do not fit, they keep serving.
    if plan.unplaced == 0 {
        plan.stop.extend(rest.iter().map(|a| a.id.clone()));
    }
    plan
}

/// A fresh allocation id: 16 hex digits.
pub fn new_alloc_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    format!("{:016x}", rng.random::<u64>())
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
    loop {
        let status = node.status();
        let leader = status.role == crate::raft::Role::Leader;
        if leader && leading_since != Some(status.term) {
            // A new term of ours: every node gets a full grace period from now.
            let names: Vec<String> = node.state().state.nodes().map(|n| n.name.clone()).collect();
            heartbeats.reset(names.into_iter());
            leading_since = Some(status.term);
            info!(term = status.term, "reconciler started");
        } else if !leader {
            leading_since = None;
        }
        if leader && let Err(e) = pass(&node, &heartbeats, &settings).await {
            debug!(error = %e, "reconcile pass stopped early");
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = applied.changed() => {}
            _ = tokio::time::sleep(settings.interval) => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// One pass: liveness, then every job. Each decision is one Raft write.
async fn pass(
    node: &RaftNode,
    heartbeats: &Heartbeats,
    settings: &ReconcileSettings,
) -> Result<(), crate::raft::RaftNodeError> {
    let now = Instant::now();
    let mut commands: Vec<Command> = Vec::new();
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
                let lost: Vec<String> = state
                    .allocations()
                    .filter(|a| a.node == n.name && holds(a))
                    .map(|a| a.id.clone())
                    .collect();
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
    }
    {
        let applied = node.state();
        let state = &applied.state;
        let mut view = node_view(state);
        let mut place = Vec::new();
        let mut stop = Vec::new();
        for job in state.jobs(None) {
            let plan = plan_job(state, &mut view, job, &mut new_alloc_id, now_ms());
            if !plan.place.is_empty() || !plan.stop.is_empty() {
                info!(
                    job = %format!("{}/{}", job.namespace, job.name),
                    place = plan.place.len(),
                    stop = plan.stop.len(),
                    unplaced = plan.unplaced,
                    "reconciling"
                );
            }
            place.extend(plan.place);
            stop.extend(plan.stop);
            if job.pending != plan.pending {
                commands.push(Command::SetJobPending {
                    namespace: job.namespace.clone(),
                    name: job.name.clone(),
                    pending: plan.pending,
                });
            }
        }
        if !place.is_empty() {
            commands.push(Command::PlaceAllocations { allocations: place });
        }
        if !stop.is_empty() {
            commands.push(Command::StopAllocations {
                ids: stop,
                lost: false,
                at_ms: now_ms(),
            });
        }
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
