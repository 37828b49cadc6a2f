//! Placement: a pure function from a view of the nodes and one request (a job's replicas) to a
//! plan. No clock, no randomness, no I/O: the same input always gives the same plan, so the
//! leader can compute it and every member can check it.
//!
//! Filters, in order (the first that rejects a node is the reason counted for it): the node is
//! down, draining, fails a constraint on its labels, is not where the job's named volumes live,
//! has an agent without a capability the job needs (fencing), does not allow a host volume's
//! directory, has a port the replica would publish taken, or
//! lacks free cpu, memory, pids or pod addresses (its subnet's size).
//! Scoring among the nodes that pass: replicas of the same job repel each other (a node with
//! fewer of them always wins: anti-affinity), then bin-pack (fullest node after placement
//! first, the default) or spread (emptiest first), then the node name (deterministic
//! tie-break).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use skiff_common::spec::{Constraint, Protocol};

use crate::state::{Node, NodeStatus};

/// Resources in the units the scheduler counts (integers, so sums are exact).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub millicpu: u64,
    pub memory: u64,
    pub pids: u64,
    /// Pod addresses: one per replica.
    pub addresses: u64,
}

impl Usage {
    /// From cores, bytes and a process count.
    pub fn new(cpu: f64, memory: u64, pids: u64) -> Usage {
        Usage {
            millicpu: (cpu * 1000.0).round().max(0.0) as u64,
            memory,
            pids,
            addresses: 1,
        }
    }

    pub fn add(&mut self, other: Usage) {
        self.millicpu += other.millicpu;
        self.memory += other.memory;
        self.pids += other.pids;
        self.addresses += other.addresses;
    }
}

/// One node as the scheduler sees it: the node, what its live allocations use, and how many
/// of them belong to the job being placed.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub node: &'a Node,
    pub used: Usage,
    pub job_replicas: u32,
    /// Ports of the node that live allocations publish (host ports, host network mode).
    pub ports: BTreeSet<(u16, Protocol)>,
}

impl<'a> Candidate<'a> {
    /// An empty node.
    pub fn new(node: &'a Node) -> Candidate<'a> {
        Candidate {
            node,
            used: Usage::default(),
            job_replicas: 0,
            ports: BTreeSet::new(),
        }
    }
}

/// How to choose among nodes that fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Fill nodes up: fewer nodes busy, bigger holes left for big jobs (the default).
    #[default]
    BinPack,
    /// Emptiest node first.
    Spread,
}

/// What to place: `count` replicas, each asking for `ask`, on nodes meeting `constraints`.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub ask: Usage,
    pub constraints: &'a [Constraint],
    pub strategy: Strategy,
    pub count: u32,
    /// Ports each replica publishes on its node.
    pub ports: &'a [(u16, Protocol)],
    /// Host directories each replica mounts: its node must allow every one.
    pub host_paths: &'a [String],
    /// The job's named volumes (`namespace/job/name`): where one lives already, replicas go
    /// only there.
    pub named_volumes: &'a [String],
    /// What each replica needs its node's agent to be able to do
    /// ([`skiff_common::capability`]).
    pub capabilities: &'a [&'static str],
}

impl Request<'_> {
    /// A request with no ports, host paths or named volumes.
    pub fn simple(
        ask: Usage,
        constraints: &[Constraint],
        strategy: Strategy,
        count: u32,
    ) -> Request<'_> {
        Request {
            ask,
            constraints,
            strategy,
            count,
            ports: &[],
            host_paths: &[],
            named_volumes: &[],
            capabilities: &[],
        }
    }
}

/// The outcome: one node name per placed replica (in placement order), and for the replicas
/// that did not fit, why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub placements: Vec<String>,
    /// Replicas that could not be placed.
    pub unplaced: u32,
    /// Why the first replica that did not fit was refused by each node.
    pub rejections: Option<Rejections>,
}

/// Per filter, how many nodes it rejected (each node counted once, by its first failing filter).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rejections {
    pub nodes: u32,
    pub reasons: BTreeMap<String, u32>,
}

impl fmt::Display for Rejections {
    /// `0/5 nodes fit: 3 insufficient memory, 2 constraint zone = a` (largest counts first).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes == 0 {
            return f.write_str("no nodes registered");
        }
        let mut reasons: Vec<(&String, &u32)> = self.reasons.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let list: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        write!(f, "0/{} nodes fit: {}", self.nodes, list.join(", "))
    }
}

/// Why a node cannot take a replica, or `None` when it can. Static reasons (status,
/// constraints) come first.
fn reject(c: &Candidate<'_>, req: &Request<'_>, sticky: &BTreeSet<String>) -> Option<String> {
    match c.node.status {
        NodeStatus::Down => return Some("node down".to_owned()),
        NodeStatus::Draining => return Some("node draining".to_owned()),
        NodeStatus::Ready => {}
    }
    if c.node.disk_pressure {
        return Some("node disk pressure".to_owned());
    }
    if let Some(failed) = req.constraints.iter().find(|k| !k.matches(&c.node.labels)) {
        return Some(format!("constraint {failed}"));
    }
    reject_static(c, req, sticky).or_else(|| reject_dynamic(c, req))
}

/// The nodes where one of the job's named volumes lives, if any does.
fn sticky_nodes<'a>(
    req: &Request<'_>,
    candidates: impl Iterator<Item = &'a Candidate<'a>>,
) -> BTreeSet<String> {
    if req.named_volumes.is_empty() {
        return BTreeSet::new();
    }
    candidates
        .filter(|c| {
            req.named_volumes
                .iter()
                .any(|v| c.node.named_volumes.contains(v))
        })
        .map(|c| c.node.name.clone())
        .collect()
}

/// Reasons that hold for the whole request: named volumes elsewhere, host paths not allowed.
fn reject_static(
    c: &Candidate<'_>,
    req: &Request<'_>,
    sticky: &BTreeSet<String>,
) -> Option<String> {
    if !sticky.is_empty() && !sticky.contains(&c.node.name) {
        let held: Vec<&str> = req
            .named_volumes
            .iter()
            .map(String::as_str)
            .filter(|v| !c.node.named_volumes.contains(*v))
            .collect();
        return Some(format!(
            "named volume {} lives on another node",
            held.first().copied().unwrap_or("?")
        ));
    }
    if let Some(cap) = req
        .capabilities
        .iter()
        .find(|cap| !c.node.capabilities.contains(**cap))
    {
        return Some(format!(
            "agent without {cap} support (older than the job needs)"
        ));
    }
    if let Some(p) = req.host_paths.iter().find(|p| !c.node.allows_host_path(p)) {
        return Some(format!(
            "host volume {p} not under the node's --host-volume-dir"
        ));
    }
    None
}

/// Reasons that change as replicas are placed: ports taken, resources.
fn reject_dynamic(c: &Candidate<'_>, req: &Request<'_>) -> Option<String> {
    if let Some((port, proto)) = req.ports.iter().find(|p| c.ports.contains(p)) {
        return Some(format!("port {port}/{proto} in use on the node"));
    }
    reject_resources(c, req.ask)
}

fn reject_resources(c: &Candidate<'_>, ask: Usage) -> Option<String> {
    let total = Usage::new(
        c.node.resources.cpu,
        c.node.resources.memory,
        u64::from(c.node.resources.pids),
    );
    if c.used.millicpu + ask.millicpu > total.millicpu {
        return Some("insufficient cpu".to_owned());
    }
    if c.used.memory + ask.memory > total.memory {
        return Some("insufficient memory".to_owned());
    }
    if c.used.pids + ask.pids > total.pids {
        return Some("insufficient pids".to_owned());
    }
    if let Some(capacity) = c.node.pod_capacity()
        && c.used.addresses + ask.addresses > capacity
    {
        return Some(format!(
            "no free pod address (subnet {} full)",
            subnet_of(c.node)
        ));
    }
    None
}

/// Fit score in [0, 2000]: the node's cpu and memory utilization after placement, in
/// thousandths, summed; inverted for spread.
fn fit_score(c: &Candidate<'_>, ask: Usage, strategy: Strategy) -> u64 {
    let frac = |used: u64, total: u64| -> u64 {
        if total == 0 {
            1000
        } else {
            (u128::from(used) * 1000 / u128::from(total)).min(1000) as u64
        }
    };
    let total_cpu = (c.node.resources.cpu * 1000.0).round().max(0.0) as u64;
    let util = frac(c.used.millicpu + ask.millicpu, total_cpu)
        + frac(c.used.memory + ask.memory, c.node.resources.memory);
    match strategy {
        Strategy::BinPack => util,
        Strategy::Spread => 2000 - util,
    }
}

/// Places `req.count` replicas one after another onto `candidates`, updating their usage and
/// replica counts as it goes (so the caller can place several jobs in turn against the same
/// view).
pub fn place(candidates: &mut [Candidate<'_>], req: &Request<'_>) -> Plan {
    // Static filters once per request.
    let sticky = sticky_nodes(req, candidates.iter());
    let eligible: Vec<usize> = (0..candidates.len())
        .filter(|&i| {
            let c = &candidates[i];
            c.node.status == NodeStatus::Ready
                && !c.node.disk_pressure
                && req.constraints.iter().all(|k| k.matches(&c.node.labels))
                && reject_static(c, req, &sticky).is_none()
        })
        .collect();
    let mut plan = Plan::default();
    for placed in 0..req.count {
        let mut best: Option<(usize, (u32, u64))> = None;
        for &i in &eligible {
            let c = &candidates[i];
            if reject_dynamic(c, req).is_some() {
                continue;
            }
            // Fewer replicas of this job first, then the higher fit score.
            let key = (c.job_replicas, fit_score(c, req.ask, req.strategy));
            let better = match best {
                None => true,
                Some((b, (b_replicas, b_score))) => {
                    key.0 < b_replicas
                        || (key.0 == b_replicas
                            && (key.1 > b_score
                                || (key.1 == b_score && c.node.name < candidates[b].node.name)))
                }
            };
            if better {
                best = Some((i, key));
            }
        }
        let Some((i, _)) = best else {
            plan.unplaced = req.count - placed;
            plan.rejections = Some(rejections(candidates, req));
            return plan;
        };
        let c = &mut candidates[i];
        c.used.add(req.ask);
        c.job_replicas += 1;
        c.ports.extend(req.ports.iter().copied());
        plan.placements.push(c.node.name.clone());
    }
    plan
}

fn subnet_of(node: &Node) -> &str {
    node.subnet.as_deref().unwrap_or("?")
}

fn rejections(candidates: &[Candidate<'_>], req: &Request<'_>) -> Rejections {
    let mut r = Rejections {
        nodes: candidates.len() as u32,
        reasons: BTreeMap::new(),
    };
    let sticky = sticky_nodes(req, candidates.iter());
    for c in candidates {
        if let Some(reason) = reject(c, req, &sticky) {
            *r.reasons.entry(reason).or_default() += 1;
        }
    }
    r
}

#[cfg(test)]
mod tests;
