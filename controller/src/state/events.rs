//! The cluster's event log: what happened to allocations, jobs, rollouts and nodes, derived
//! while applying each command by comparing what it touched before and after. Part of the
//! replicated state (the same on every member, in snapshots), bounded to the last
//! [`MAX_EVENTS`].

use imbl::OrdMap;
use serde::{Deserialize, Serialize};

use super::{
    Allocation, AllocationStatus, Command, ContainerState, DesiredStatus, Health, Job, JobStatus,
    Node,
};

/// Events kept; older ones are dropped.
pub const MAX_EVENTS: usize = 2000;

/// An entry at log index `i` numbers its events from `i << SEQ_SHIFT` (at most
/// `1 << SEQ_SHIFT` events per entry).
pub const SEQ_SHIFT: u32 = 16;

/// One thing that happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increases with each event, never reused: the Raft log index of the entry that made it,
    /// shifted left by [`SEQ_SHIFT`], plus its order within the entry.
    pub seq: u64,
    pub at_ms: i64,
    /// `placed`, `started`, `exited`, `failed`, `oom_killed`, `restarted`, `lost`, `health`,
    /// `stopping`, `draining`, `job_applied`, `job_stopped`, `pending`, `rollout`,
    /// `node_registered`, `node_status`, `node_disk_pressure`, `node_removed`.
    pub kind: String,
    /// Empty for node events.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub job: String,
    #[serde(default)]
    pub alloc: String,
    #[serde(default)]
    pub node: String,
    pub message: String,
}

/// What a command may touch, as it was before it is applied: only those values are copied
/// (copying whole maps would make the first write to each shared tree node copy the node).
pub struct Before {
    pub jobs: Vec<(String, Option<std::sync::Arc<Job>>)>,
    pub nodes: Vec<(String, Option<Node>)>,
    pub allocations: Vec<(String, Option<Allocation>)>,
}

impl Before {
    /// Takes what `c` may touch from the maps as they are.
    pub fn take(
        c: &Command,
        jobs: &OrdMap<String, std::sync::Arc<Job>>,
        nodes: &OrdMap<String, Node>,
        allocations: &OrdMap<String, Allocation>,
    ) -> Before {
        let job = touched_jobs(c);
        let node = touched_node(c);
        Before {
            jobs: job
                .into_iter()
                .map(|k| {
                    let v = jobs.get(&k).cloned();
                    (k, v)
                })
                .collect(),
            nodes: node
                .into_iter()
                .map(|k| {
                    let v = nodes.get(&k).cloned();
                    (k, v)
                })
                .collect(),
            allocations: touched_allocations(c, allocations)
                .into_iter()
                .map(|k| {
                    let v = allocations.get(&k).cloned();
                    (k, v)
                })
                .collect(),
        }
    }
}

/// The jobs (`namespace/name`) a command may change.
fn touched_jobs(c: &Command) -> Vec<String> {
    match c {
        Command::SetJobsPending { items } => items
            .iter()
            .map(|i| super::job_key(&i.namespace, &i.name))
            .collect(),
        c => touched_job(c).into_iter().collect(),
    }
}

/// The job (`namespace/name`) a command that names one may change.
fn touched_job(c: &Command) -> Option<String> {
    match c {
        Command::ApplyJob { spec, .. } => Some(super::job_key(&spec.namespace, &spec.name)),
        Command::StopJob {
            namespace, name, ..
        }
        | Command::Rollout {
            namespace, name, ..
        }
        | Command::RollbackJob {
            namespace, name, ..
        }
        | Command::SetJobPending {
            namespace, name, ..
        } => Some(super::job_key(namespace, name)),
        _ => None,
    }
}

/// The node a command may change.
fn touched_node(c: &Command) -> Option<String> {
    match c {
        Command::UpsertNode { node } | Command::RegisterNode { node, .. } => {
            Some(node.name.clone())
        }
        Command::SetNodeStatus { name, .. }
        | Command::RemoveNode { name, .. }
        | Command::SetNodeDiskPressure { name, .. } => Some(name.clone()),
        _ => None,
    }
}

/// When a command happened, when it says.
pub fn command_time(c: &Command) -> Option<i64> {
    match c {
        Command::ApplyJob { at_ms, .. }
        | Command::StopJob { at_ms, .. }
        | Command::SetNodeStatus { at_ms, .. }
        | Command::SetNodeDiskPressure { at_ms, .. }
        | Command::RemoveNode { at_ms, .. }
        | Command::ReportAllocation { at_ms, .. }
        | Command::ReportAllocations { at_ms, .. }
        | Command::StopAllocations { at_ms, .. }
        | Command::DrainAllocations { at_ms, .. }
        | Command::Rollout { at_ms, .. }
        | Command::RollbackJob { at_ms, .. }
        | Command::CollectGarbage { at_ms, .. } => Some(*at_ms),
        Command::PlaceAllocations { allocations } => {
            allocations.iter().map(|a| a.created_at_ms).max()
        }
        Command::UpsertNode { node } | Command::RegisterNode { node, .. } => {
            Some(node.status_changed_at_ms.max(node.registered_at_ms))
        }
        _ => None,
    }
}

/// The allocations a command may change (only placements add new ones).
fn touched_allocations(c: &Command, allocations: &OrdMap<String, Allocation>) -> Vec<String> {
    let of_job = |ns: &str, name: &str| -> Vec<String> {
        allocations
            .values()
            .filter(|a| a.namespace == ns && a.job == name)
            .map(|a| a.id.clone())
            .collect()
    };
    let on_node = |node: &str| -> Vec<String> {
        allocations
            .values()
            .filter(|a| a.node == node)
            .map(|a| a.id.clone())
            .collect()
    };
    let mut ids = match c {
        Command::PlaceAllocations { allocations } => {
            allocations.iter().map(|a| a.id.clone()).collect()
        }
        Command::SetAllocationDesired { id, .. } | Command::ReportAllocation { id, .. } => {
            vec![id.clone()]
        }
        Command::ReportAllocations { reports, .. } => {
            reports.iter().map(|r| r.id.clone()).collect()
        }
        Command::StopAllocations { ids, .. } | Command::DrainAllocations { ids, .. } => ids.clone(),
        Command::CollectGarbage { allocations, .. } => allocations.clone(),
        Command::StopJob {
            namespace, name, ..
        }
        | Command::RollbackJob {
            namespace, name, ..
        } => of_job(namespace, name),
        Command::SetNodeStatus { name, .. } | Command::RemoveNode { name, .. } => on_node(name),
        _ => Vec::new(),
    };
    ids.sort();
    ids.dedup();
    ids
}

/// A new event without its number and time.
pub struct Draft {
    pub kind: &'static str,
    pub namespace: String,
    pub job: String,
    pub alloc: String,
    pub node: String,
    pub message: String,
}

fn alloc_draft(a: &Allocation, kind: &'static str, message: String) -> Draft {
    Draft {
        kind,
        namespace: a.namespace.clone(),
        job: a.job.clone(),
        alloc: a.id.clone(),
        node: a.node.clone(),
        message,
    }
}

/// What changed about one allocation.
pub fn allocation_events(before: Option<&Allocation>, after: &Allocation, out: &mut Vec<Draft>) {
    let Some(b) = before else {
        out.push(alloc_draft(
            after,
            "placed",
            format!("placed on {} (version {})", after.node, after.job_version),
        ));
        return;
    };
    if b.observed != after.observed {
        match &after.observed {
            AllocationStatus::Pending => {}
            AllocationStatus::Running => out.push(alloc_draft(
                after,
                "started",
                format!("running on {}", after.node),
            )),
            AllocationStatus::Exited { code } => out.push(alloc_draft(
                after,
                "exited",
                format!("exited with code {code}"),
            )),
            AllocationStatus::Failed { reason } => {
                out.push(alloc_draft(after, "failed", format!("failed: {reason}")));
            }
            AllocationStatus::Lost => out.push(alloc_draft(
                after,
                "lost",
                format!("lost with its node {}", after.node),
            )),
        }
    }
    if after.oom_kills > b.oom_kills {
        let n = after.oom_kills - b.oom_kills;
        out.push(alloc_draft(
            after,
            "oom_killed",
            format!(
                "{n} process{} killed by the OOM killer (memory limit)",
                if n == 1 { "" } else { "es" }
            ),
        ));
    }
    if after.restarts > b.restarts {
        let why: Vec<String> = after
            .containers
            .iter()
            .filter(|c| !c.reason.is_empty() && c.state == ContainerState::Running)
            .map(|c| format!("{}: {}", c.name, c.reason))
            .collect();
        out.push(alloc_draft(
            after,
            "restarted",
            format!(
                "restarted ({} restarts){}",
                after.restarts,
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {}", why.join("; "))
                }
            ),
        ));
    }
    if b.health != after.health
        && let Some(h) = after.health
        && h != Health::Starting
    {
        let mut msg = if h == Health::Healthy {
            "healthy"
        } else {
            "unhealthy"
        }
        .to_owned();
        if h == Health::Unhealthy {
            let first = after.health_output.lines().next().unwrap_or("").trim();
            if !first.is_empty() {
                msg = format!("unhealthy: {}", truncate(first, 200));
            }
        }
        out.push(alloc_draft(after, "health", msg));
    }
    if b.desired == DesiredStatus::Run && after.desired == DesiredStatus::Stop {
        out.push(alloc_draft(after, "stopping", "stop requested".into()));
    }
    if b.drain_since_ms.is_none() && after.drain_since_ms.is_some() {
        out.push(alloc_draft(
            after,
            "draining",
            "out of service discovery, stopping after the drain delay".into(),
        ));
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn job_draft(j: &Job, kind: &'static str, message: String) -> Draft {
    Draft {
        kind,
        namespace: j.namespace.clone(),
        job: j.name.clone(),
        alloc: String::new(),
        node: String::new(),
        message,
    }
}

/// What changed about one job: versions, its status, its rollouts, why it is pending.
pub fn job_events(before: Option<&Job>, after: &Job, out: &mut Vec<Draft>) {
    let latest = after.latest().version;
    if before.is_none_or(|b| b.latest().version != latest) {
        out.push(job_draft(
            after,
            "job_applied",
            format!("version {latest} applied"),
        ));
    }
    if before.is_some_and(|b| b.status != after.status) && after.status == JobStatus::Stopped {
        out.push(job_draft(after, "job_stopped", "stopped".into()));
    }
    for r in &after.rollouts {
        let prior = before.and_then(|b| {
            // Not by version: a scale during a rollout moves it to the new version number.
            b.rollouts
                .iter()
                .find(|x| x.started_at_ms == r.started_at_ms && x.from_version == r.from_version)
        });
        let what = match prior {
            None => Some(match r.rollback_of {
                Some(v) => format!(
                    "rollout of version {} started (rolling back version {v})",
                    r.version
                ),
                None if r.canary > 0 => format!(
                    "rollout of version {} started with {} canaries",
                    r.version, r.canary
                ),
                None => format!("rollout of version {} started", r.version),
            }),
            Some(p) if p.status != r.status => Some(format!(
                "rollout of version {}: {}{}",
                r.version,
                r.status.as_str(),
                if r.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.reason)
                }
            )),
            Some(p) if !p.promoted && r.promoted => Some(format!(
                "rollout of version {}: canaries promoted",
                r.version
            )),
            _ => None,
        };
        if let Some(m) = what {
            out.push(job_draft(after, "rollout", m));
        }
    }
    if let Some(p) = &after.pending
        && before.and_then(|b| b.pending.as_ref()) != Some(p)
    {
        out.push(pending_draft(after, p));
    }
}

/// The event of a job's new pending reason `p`.
pub fn pending_draft(j: &Job, p: &str) -> Draft {
    job_draft(j, "pending", format!("replicas not placed: {p}"))
}

/// What changed about one node.
pub fn node_events(before: Option<&Node>, after: Option<&Node>, name: &str, out: &mut Vec<Draft>) {
    let draft = |kind, message| Draft {
        kind,
        namespace: String::new(),
        job: String::new(),
        alloc: String::new(),
        node: name.to_owned(),
        message,
    };
    match (before, after) {
        (None, Some(n)) => out.push(draft(
            "node_registered",
            format!("registered at {}", n.address),
        )),
        (Some(b), Some(n)) => {
            if b.status != n.status {
                out.push(draft("node_status", n.status.as_str().to_owned()));
            }
            if b.disk_pressure != n.disk_pressure {
                out.push(draft(
                    "node_disk_pressure",
                    if n.disk_pressure {
                        "disk pressure: nothing new is placed on the node".into()
                    } else {
                        "disk pressure gone".into()
                    },
                ));
            }
        }
        (Some(_), None) => out.push(draft("node_removed", "removed".into())),
        _ => {}
    }
}
