//! The cluster state as a pure, deterministic state machine.
//!
//! **Architecture Invariant:** [`ClusterState::apply`] does no I/O and reads no clock and no
//! randomness: every input, including timestamps, arrives inside the [`Command`]. Every member
//! applies the same commands in the same order and so holds the same state. `apply` never
//! panics on any command; a command that cannot be applied returns an [`ApplyError`] and
//! leaves the state exactly as it was.

pub mod events;
mod model;
pub mod pki;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use skiff_common::{FieldChange, JobSpec, diff_specs};
use std::sync::Arc;

pub use model::{
    Allocation, AllocationStatus, ContainerState, ContainerStatus, DesiredStatus, Health, Job,
    JobStatus, JobVersion, MAX_ROLLOUTS, Node, NodeResources, NodeStatus, Rollout, RolloutChange,
    RolloutStatus, WireguardBackend, WireguardIdentity,
};

/// The newest [`Command`] level this release applies (see [`Command::level`]).
///
/// Level 0 is every command the release before command levels applied. Each later level adds
/// commands (or fields an older member would refuse). A member proposes a command only once
/// every member of the membership has said it applies that command's level
/// (`raft::RaftNode::allows`), so during a rolling upgrade a member of the older release is
/// never sent an entry it cannot read. A new command variant gets a new level here.
pub const COMMAND_LEVEL: u32 = 2;

/// A change to the cluster state, replicated through the Raft log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Create a job or add a version to it.
    ApplyJob { spec: Box<JobSpec>, at_ms: i64 },
    /// Stop a job: its versions are kept, its allocations are to be stopped.
    StopJob {
        namespace: String,
        name: String,
        at_ms: i64,
    },
    /// Register a node or update its registration.
    UpsertNode { node: Node },
    /// An agent's registration: as `UpsertNode`, and the node keeps its pod subnet or gets the
    /// lowest free /24 of `cluster_cidr`.
    RegisterNode {
        node: Node,
        cluster_cidr: String,
        /// The prefix length of a node's pod subnet (24 in logs written before it existed).
        #[serde(default = "default_subnet_prefix")]
        subnet_prefix: u8,
    },
    /// Set a node's scheduling status (ready, draining, down).
    SetNodeStatus {
        name: String,
        status: NodeStatus,
        at_ms: i64,
    },
    /// Forget a node that is down (a host gone for good): its pod subnet is free again, its
    /// allocations stay in the history as lost. Refused while the node is not down.
    RemoveNode { name: String, at_ms: i64 },
    /// Add allocations decided by the scheduler.
    PlaceAllocations { allocations: Vec<Allocation> },
    /// Change an allocation's desired status (e.g. stop it).
    SetAllocationDesired { id: String, desired: DesiredStatus },
    /// Record what an agent observed of an allocation.
    ReportAllocation {
        id: String,
        status: AllocationStatus,
        at_ms: i64,
    },
    /// Record what an agent observed of several allocations; unknown ids are skipped (an
    /// allocation may be gone by the time its report is applied).
    ReportAllocations {
        reports: Vec<AllocationReport>,
        at_ms: i64,
    },
    /// Record whether a node's agent reports disk pressure.
    SetNodeDiskPressure {
        name: String,
        pressure: bool,
        at_ms: i64,
    },
    /// Record the named volumes a node holds (`namespace/job/name`), as its agent reported.
    SetNodeVolumes {
        name: String,
        volumes: std::collections::BTreeSet<String>,
    },
    /// Stop allocations (desired = stop); with `lost`, also record that their node is gone.
    StopAllocations {
        ids: Vec<String>,
        lost: bool,
        at_ms: i64,
    },
    /// Take allocations out of service discovery, still running (their stop follows after the
    /// job's `drain_delay`); ids already draining or unknown are skipped.
    DrainAllocations { ids: Vec<String>, at_ms: i64 },
    /// Change the current rollout of a job, which must be of `version`.
    Rollout {
        namespace: String,
        name: String,
        version: u64,
        change: RolloutChange,
        at_ms: i64,
    },
    /// Roll a job back to `to_version`: a new version with that version's spec, rolled out
    /// like any other (without canaries); the current rollout, if open, ends as failed (an
    /// automatic rollback, `reason` saying why) or superseded (an undo).
    RollbackJob {
        namespace: String,
        name: String,
        to_version: u64,
        reason: String,
        automatic: bool,
        at_ms: i64,
    },
    /// Record why a job's replicas are not (all) placed, or clear it.
    SetJobPending {
        namespace: String,
        name: String,
        pending: Option<String>,
    },
    /// [`Command::SetJobPending`] for many jobs in one entry (the reconciler writes what
    /// changed within its batching delay together). A job gone by the time it applies is
    /// skipped.
    SetJobsPending { items: Vec<JobPending> },
    /// Forget what the leader found past its retention: allocations that are over (stopped,
    /// their process gone) and old versions of jobs. What is no longer collectable when it is
    /// applied is kept: an allocation that is not over, a job's latest or stable version, the
    /// versions of its current rollout and any version an allocation still runs.
    CollectGarbage {
        allocations: Vec<String>,
        versions: Vec<JobVersions>,
        at_ms: i64,
    },
    /// Fix the cluster-wide settings: written once, by the first leader after bootstrap (or
    /// the first leader of a cluster that predates them). The same settings again change
    /// nothing; different ones are refused.
    InitCluster { settings: ClusterSettings },
    /// A change to the cluster PKI (CA, certificates, join tokens).
    Pki { change: pki::PkiOp },
}

/// One job's pending reason in [`Command::SetJobsPending`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPending {
    pub namespace: String,
    pub name: String,
    pub pending: Option<String>,
}

/// Versions of one job (for [`Command::CollectGarbage`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobVersions {
    pub namespace: String,
    pub name: String,
    pub versions: Vec<u64>,
}

/// Settings of the whole cluster, fixed at bootstrap and kept in the replicated state, so a
/// member restarted with only `--id` and `--data-dir` (or with other defaults) cannot hand out
/// addresses from another range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Pod subnets are cut from this network.
    pub cluster_cidr: String,
    /// The prefix length of each node's pod subnet.
    pub node_subnet_prefix: u8,
    /// Services' virtual IPs are taken from this network. Clusters bootstrapped before it
    /// existed read the default.
    #[serde(default = "default_service_cidr")]
    pub service_cidr: String,
}

/// The service CIDR of a cluster that was not given one.
pub const DEFAULT_SERVICE_CIDR: &str = "10.43.0.0/16";

fn default_service_cidr() -> String {
    DEFAULT_SERVICE_CIDR.to_owned()
}

impl std::fmt::Display for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cluster-cidr {}, node-subnet-prefix {}, service-cidr {}",
            self.cluster_cidr, self.node_subnet_prefix, self.service_cidr
        )
    }
}

/// One allocation's state as its agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationReport {
    pub id: String,
    pub status: AllocationStatus,
    pub restarts: u32,
    /// The container's overlay address.
    #[serde(default)]
    pub ip: Option<String>,
    /// Its health check's verdict, when it has one.
    #[serde(default)]
    pub health: Option<Health>,
    #[serde(default)]
    pub health_output: String,
    /// Bytes of its output its node could not log (a full disk), and why.
    #[serde(default)]
    pub log_dropped_bytes: u64,
    #[serde(default)]
    pub log_error: String,
    /// Each container of the allocation; `None`: not reported (an older agent), keep what
    /// is recorded.
    #[serde(default)]
    pub containers: Option<Vec<ContainerStatus>>,
    /// Processes the OOM killer killed in it.
    #[serde(default)]
    pub oom_kills: u64,
}

fn default_subnet_prefix() -> u8 {
    24
}

impl Command {
    /// The command level a member must apply to read this command (see [`COMMAND_LEVEL`]).
    /// Level 1 (2026-12-04): the commands added after rollouts landed.
    /// Level 2 (2026-12-05): a job with `[disconnect]` (fencing): an older member's spec
    /// parser refuses the section, which would stop its Raft core.
    pub fn level(&self) -> u32 {
        match self {
            Command::ApplyJob { spec, .. } if spec.disconnect.is_some() => 2,
            Command::SetNodeDiskPressure { .. }
            | Command::SetJobsPending { .. }
            | Command::CollectGarbage { .. } => 1,
            _ => 0,
        }
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::ApplyJob { .. } => "apply_job",
            Command::StopJob { .. } => "stop_job",
            Command::UpsertNode { .. } => "upsert_node",
            Command::RegisterNode { .. } => "register_node",
            Command::SetNodeStatus { .. } => "set_node_status",
            Command::RemoveNode { .. } => "remove_node",
            Command::PlaceAllocations { .. } => "place_allocations",
            Command::SetAllocationDesired { .. } => "set_allocation_desired",
            Command::ReportAllocation { .. } => "report_allocation",
            Command::ReportAllocations { .. } => "report_allocations",
            Command::StopAllocations { .. } => "stop_allocations",
            Command::SetNodeVolumes { .. } => "set_node_volumes",
            Command::SetNodeDiskPressure { .. } => "set_node_disk_pressure",
            Command::SetJobPending { .. } => "set_job_pending",
            Command::SetJobsPending { .. } => "set_jobs_pending",
            Command::CollectGarbage { .. } => "collect_garbage",
            Command::DrainAllocations { .. } => "drain_allocations",
            Command::Rollout { .. } => "rollout",
            Command::RollbackJob { .. } => "rollback_job",
            Command::InitCluster { .. } => "init_cluster",
            Command::Pki { .. } => "pki",
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::ApplyJob { spec, .. } => write!(f, "apply_job({})", spec.key()),
            Command::StopJob {
                namespace, name, ..
            } => write!(f, "stop_job({namespace}/{name})"),
            Command::UpsertNode { node } => write!(f, "upsert_node({})", node.name),
            Command::RegisterNode { node, .. } => write!(f, "register_node({})", node.name),
            Command::SetNodeStatus { name, status, .. } => {
                write!(f, "set_node_status({name}, {status:?})")
            }
            Command::RemoveNode { name, .. } => write!(f, "remove_node({name})"),
            Command::PlaceAllocations { allocations } => {
                write!(f, "place_allocations({})", allocations.len())
            }
            Command::SetAllocationDesired { id, desired } => {
                write!(f, "set_allocation_desired({id}, {desired:?})")
            }
            Command::ReportAllocation { id, .. } => write!(f, "report_allocation({id})"),
            Command::ReportAllocations { reports, .. } => {
                write!(f, "report_allocations({})", reports.len())
            }
            Command::StopAllocations { ids, lost, .. } => {
                write!(f, "stop_allocations({}, lost={lost})", ids.len())
            }
            Command::SetNodeVolumes { name, volumes } => {
                write!(f, "set_node_volumes({name}, {})", volumes.len())
            }
            Command::SetNodeDiskPressure { name, pressure, .. } => {
                write!(f, "set_node_disk_pressure({name}, {pressure})")
            }
            Command::SetJobPending {
                namespace, name, ..
            } => write!(f, "set_job_pending({namespace}/{name})"),
            Command::SetJobsPending { items } => write!(f, "set_jobs_pending({})", items.len()),
            Command::DrainAllocations { ids, .. } => write!(f, "drain_allocations({})", ids.len()),
            Command::CollectGarbage {
                allocations,
                versions,
                ..
            } => write!(
                f,
                "collect_garbage({} allocations, {} job versions)",
                allocations.len(),
                versions.iter().map(|v| v.versions.len()).sum::<usize>()
            ),
            Command::Rollout {
                namespace,
                name,
                version,
                change,
                ..
            } => write!(f, "rollout({namespace}/{name} v{version}, {change:?})"),
            Command::RollbackJob {
                namespace,
                name,
                to_version,
                ..
            } => write!(f, "rollback_job({namespace}/{name} to v{to_version})"),
            Command::InitCluster { settings } => write!(f, "init_cluster({settings})"),
            Command::Pki { change } => match change {
                pki::PkiOp::Init { .. } => write!(f, "pki(init)"),
                pki::PkiOp::CreateToken { id, .. } => write!(f, "pki(create_token {id})"),
                pki::PkiOp::RevokeToken { id } => write!(f, "pki(revoke_token {id})"),
                pki::PkiOp::RecordCert { record, .. } => {
                    write!(f, "pki(record_cert {})", record.identity)
                }
                pki::PkiOp::Revoke { serials, identity } => {
                    write!(f, "pki(revoke {} {identity:?})", serials.len())
                }
                pki::PkiOp::RotateCa { .. } => write!(f, "pki(rotate_ca)"),
                pki::PkiOp::RetireCa { .. } => write!(f, "pki(retire_ca)"),
            },
        }
    }
}

/// What applying a command produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    JobApplied {
        job: JobSummary,
        created: bool,
        changed: bool,
        changes: Vec<FieldChange>,
    },
    JobStopped {
        job: JobSummary,
        changed: bool,
    },
    NodeUpserted {
        name: String,
        created: bool,
    },
    NodeStatusSet {
        name: String,
        changed: bool,
    },
    NodeRemoved {
        name: String,
        /// The pod subnet it held, now free.
        subnet: Option<String>,
        /// Its allocations that were still held and are now lost.
        lost: usize,
    },
    AllocationsPlaced {
        count: usize,
    },
    AllocationUpdated {
        id: String,
    },
    AllocationsUpdated {
        count: usize,
    },
    JobPendingSet {
        changed: bool,
    },
    RolloutChanged {
        version: u64,
        status: RolloutStatus,
        changed: bool,
    },
    ClusterInitialized {
        changed: bool,
    },
    /// What garbage collection removed.
    Collected {
        allocations: usize,
        versions: usize,
    },
    /// A PKI change; the serials it issued or revoked.
    Pki {
        serials: Vec<String>,
    },
}

/// A command the state machine refused. The state is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum ApplyError {
    #[error("job {namespace}/{name} not found")]
    JobNotFound { namespace: String, name: String },
    #[error("node {name} not found")]
    NodeNotFound { name: String },
    #[error(
        "node {name} is {status}: only a down node can be removed (drain it to move its \
         allocations, stop its agent, and wait until it is marked down)"
    )]
    NodeNotDown { name: String, status: String },
    #[error("allocation {id} not found")]
    AllocationNotFound { id: String },
    #[error("allocation {id} already exists")]
    AllocationExists { id: String },
    #[error("cluster CIDR {cidr} has no free /24 left for node {node}")]
    NoSubnet { cidr: String, node: String },
    #[error("cluster CIDR {cidr:?} is not an IPv4 network of prefix /8 to /24")]
    BadCidr { cidr: String },
    #[error("invalid job spec: {message}")]
    InvalidSpec { message: String },
    #[error(
        "service {service} in namespace {namespace} is already published by job {job} \
         (as its service or its mesh identity): give this job another `service.name`, or stop {job}"
    )]
    ServiceTaken {
        namespace: String,
        service: String,
        job: String,
    },
    #[error("service CIDR {cidr} has no free address left for service {service}")]
    NoServiceIp { cidr: String, service: String },
    #[error(
        "service CIDR {service_cidr:?} must be an IPv4 network of prefix /8 to /28 that does \
         not overlap the cluster CIDR {cluster_cidr}"
    )]
    BadServiceCidr {
        service_cidr: String,
        cluster_cidr: String,
    },
    #[error("the cluster was bootstrapped with {current}, not {requested}")]
    SettingsConflict {
        current: ClusterSettings,
        requested: ClusterSettings,
    },
    #[error(
        "allocation {id} refers to job {namespace}/{name} version {version}, which does not exist"
    )]
    UnknownJobVersion {
        id: String,
        namespace: String,
        name: String,
        version: u64,
    },
    #[error("{message}")]
    Pki { message: String },
    #[error("job {namespace}/{name} has no rollout of version {version} in progress{why}")]
    NoRollout {
        namespace: String,
        name: String,
        version: u64,
        /// What there is instead, from `: `.
        why: String,
    },
    #[error("job {namespace}/{name} cannot roll back to version {version}: {why}")]
    BadRollback {
        namespace: String,
        name: String,
        version: u64,
        why: String,
    },
}

/// The result the state machine returns for one command.
pub type ApplyResult = Result<Outcome, ApplyError>;

/// A job as the API shows it in lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    pub namespace: String,
    pub name: String,
    pub version: u64,
    pub status: JobStatus,
    pub replicas: u32,
    pub image: String,
    pub submitted_at_ms: i64,
    pub versions: u32,
}

/// The whole replicated cluster state.
///
/// Persistent (structurally shared) maps: cloning the state for a snapshot is O(1), so
/// building a snapshot never holds up applying commands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Jobs by `namespace/name`.
    /// Each behind an `Arc`: a change after a copy (a snapshot's, a full pass's) copies the
    /// map's nodes on its path, and those then hold pointers, not records.
    jobs: OrdMap<String, Arc<Job>>,
    /// Nodes by name.
    nodes: OrdMap<String, Node>,
    /// Allocations by id.
    allocations: OrdMap<String, Allocation>,
    /// Fixed at bootstrap; `None` until the first leader commits them.
    #[serde(default)]
    settings: Option<ClusterSettings>,
    /// The cluster PKI; empty until the bootstrapper's first leader commits its CA.
    #[serde(default)]
    pki: pki::PkiState,
    /// Services' virtual IPs by `namespace/service`, kept while a running job publishes the
    /// service.
    #[serde(default)]
    vips: OrdMap<String, std::net::Ipv4Addr>,
    /// The last [`events::MAX_EVENTS`] events, oldest first.
    #[serde(default)]
    events: imbl::Vector<events::Event>,
    /// The number the next event gets.
    #[serde(default)]
    next_event: u64,
    /// The latest time a command carried (events of commands without one get it).
    #[serde(default)]
    clock_ms: i64,
    /// Allocation ids by job: derived from `allocations`, never stored.
    #[serde(skip)]
    by_job: AllocIndex<ByJob>,
    /// Allocation ids by node (an allocation never moves): derived, never stored.
    #[serde(skip)]
    by_node: AllocIndex<ByNode>,
}

/// Allocation ids by a key of the allocation that never changes (its job, its node), derived
/// from the allocations: built on first use after a load, then kept up to date where
/// allocations are added and collected. Cloning it with the state is O(1).
#[derive(Clone, Debug)]
struct AllocIndex<K>(
    std::sync::OnceLock<OrdMap<String, imbl::OrdSet<String>>>,
    std::marker::PhantomData<K>,
);

/// What an [`AllocIndex`] is keyed by.
trait IndexKey {
    fn key(a: &Allocation) -> String;
}

/// By job (`namespace/name`).
#[derive(Clone, Debug)]
struct ByJob;
impl IndexKey for ByJob {
    fn key(a: &Allocation) -> String {
        job_key(&a.namespace, &a.job)
    }
}

/// By node name.
#[derive(Clone, Debug)]
struct ByNode;
impl IndexKey for ByNode {
    fn key(a: &Allocation) -> String {
        a.node.clone()
    }
}

impl<K> Default for AllocIndex<K> {
    fn default() -> Self {
        AllocIndex(std::sync::OnceLock::new(), std::marker::PhantomData)
    }
}

impl<K> PartialEq for AllocIndex<K> {
    /// Derived data: two states with the same allocations have the same index.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<K: IndexKey> AllocIndex<K> {
    fn get(
        &self,
        allocations: &OrdMap<String, Allocation>,
    ) -> &OrdMap<String, imbl::OrdSet<String>> {
        self.0.get_or_init(|| {
            let mut m: OrdMap<String, imbl::OrdSet<String>> = OrdMap::new();
            for a in allocations.values() {
                m.entry(K::key(a)).or_default().insert(a.id.clone());
            }
            m
        })
    }

    fn remove(&mut self, a: &Allocation) {
        if let Some(m) = self.0.get_mut() {
            let key = K::key(a);
            if let Some(ids) = m.get_mut(&key) {
                ids.remove(&a.id);
                if ids.is_empty() {
                    m.remove(&key);
                }
            }
        }
    }

    fn add(&mut self, a: &Allocation) {
        // Not built yet: it will be built from the allocations, this one included.
        if let Some(m) = self.0.get_mut() {
            m.entry(K::key(a)).or_default().insert(a.id.clone());
        }
    }

    /// The allocations under `key`, ordered by id.
    fn lookup<'a>(
        &'a self,
        allocations: &'a OrdMap<String, Allocation>,
        key: &str,
    ) -> impl Iterator<Item = &'a Allocation> + use<'a, K> {
        self.get(allocations)
            .get(key)
            .into_iter()
            .flat_map(|ids| ids.iter())
            .filter_map(|id| allocations.get(id))
    }
}

/// What applied entries touched, gathered for the leader's reconciler (local to each member,
/// not replicated): the jobs whose plan may have changed, and whether resources were freed
/// or nodes changed, so that pending jobs may fit now.
#[derive(Debug, Default, PartialEq)]
pub struct Touched {
    pub jobs: std::collections::BTreeSet<String>,
    pub capacity: bool,
    /// Too much to list, or the state was replaced (a snapshot): everything.
    pub all: bool,
    /// What the controller streams to agents (assignments, overlay peers, services) may
    /// have changed: an allocation or node changed, or a job that publishes a service, or a
    /// command not known to leave them alone.
    pub published: bool,
}

impl Touched {
    /// Past this many jobs the set gives way to `all` (a member that is not leading keeps
    /// gathering until it leads, and must not grow without bound).
    pub const MAX_JOBS: usize = 65_536;

    /// Everything.
    pub fn everything() -> Touched {
        Touched {
            all: true,
            ..Touched::default()
        }
    }

    fn job(&mut self, key: String) {
        if self.all {
            return;
        }
        self.jobs.insert(key);
        if self.jobs.len() > Self::MAX_JOBS {
            self.jobs.clear();
            self.all = true;
        }
    }

    /// Adds what `other` touched.
    pub fn merge(&mut self, other: Touched) {
        self.capacity |= other.capacity;
        self.published |= other.published;
        if other.all {
            self.all = true;
            self.jobs.clear();
        }
        for k in other.jobs {
            self.job(k);
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && !self.capacity && self.jobs.is_empty()
    }
}

/// `a.b.c.d/p` with 8 <= p <= 24 -> (network address as u32, p); host bits must be zero.
pub fn parse_cidr(cidr: &str) -> Option<(u32, u32)> {
    parse_network(cidr, 24)
}

/// `a.b.c.d/p` with 8 <= p <= `longest` -> (network address as u32, p); host bits zero.
fn parse_network(cidr: &str, longest: u32) -> Option<(u32, u32)> {
    let (addr, prefix) = cidr.split_once('/')?;
    let addr: std::net::Ipv4Addr = addr.parse().ok()?;
    let prefix: u32 = prefix.parse().ok()?;
    if !(8..=longest).contains(&prefix) {
        return None;
    }
    let base = u32::from(addr);
    let host_bits = (1u32 << (32 - prefix)) - 1;
    (base & host_bits == 0).then_some((base, prefix))
}

/// `a.b.c.d/p` with 8 <= p <= 28 -> (network address, p): a service CIDR; host bits zero.
pub fn parse_service_cidr(cidr: &str) -> Option<(u32, u32)> {
    parse_network(cidr, 28)
}

/// Whether two networks share an address.
pub fn cidrs_overlap((a, ap): (u32, u32), (b, bp): (u32, u32)) -> bool {
    let p = ap.min(bp);
    let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
    a & mask == b & mask
}

/// Checks a service CIDR against the cluster CIDR it must stay clear of.
pub fn check_service_cidr(service_cidr: &str, cluster_cidr: &str) -> Result<(), ApplyError> {
    let bad = || ApplyError::BadServiceCidr {
        service_cidr: service_cidr.to_owned(),
        cluster_cidr: cluster_cidr.to_owned(),
    };
    let svc = parse_service_cidr(service_cidr).ok_or_else(bad)?;
    if let Some(pods) = parse_cidr(cluster_cidr)
        && cidrs_overlap(svc, pods)
    {
        return Err(bad());
    }
    Ok(())
}

pub fn job_key(namespace: &str, name: &str) -> String {
    let mut key = String::with_capacity(namespace.len() + 1 + name.len());
    job_key_into(&mut key, namespace, name);
    key
}

/// [`job_key`] into `key`, replacing what it held (a buffer reused across many jobs).
fn job_key_into(key: &mut String, namespace: &str, name: &str) {
    key.clear();
    key.push_str(namespace);
    key.push('/');
    key.push_str(name);
}

impl ClusterState {
    /// Applies one command. Deterministic; on error nothing changed. What it changed is
    /// recorded in the event log.
    pub fn apply(&mut self, command: &Command) -> ApplyResult {
        self.apply_entry(None, command)
    }

    /// As [`ClusterState::apply`], for the Raft log entry at `index`: its events are numbered
    /// from the index (`index << 16` + their order), so that every member numbers them alike
    /// even when some started keeping events later than others (an upgrade). Without an
    /// index they follow the last one.
    pub fn apply_entry(&mut self, index: Option<u64>, command: &Command) -> ApplyResult {
        self.apply_touching(index, command, &mut Touched::default())
    }

    /// As [`ClusterState::apply_entry`], adding to `touched` the jobs it may have changed
    /// and whether it freed resources or changed a node.
    pub fn apply_touching(
        &mut self,
        index: Option<u64>,
        command: &Command,
        touched: &mut Touched,
    ) -> ApplyResult {
        if let Command::SetJobsPending { items } = command {
            // Hundreds of reasons per entry, each one field of one job: set in place. The
            // general path would hold each job's old record to compare with the new one, so
            // that every reason copied its job, and it looks each job up four times.
            return Ok(self.set_jobs_pending(index, items, touched));
        }
        let before = events::Before::take(command, &self.jobs, &self.nodes, &self.allocations);
        let result = self.apply_command(command);
        if result.is_ok() {
            self.note_touched(&before, command, touched);
            self.record_events(index, &before, command);
        }
        result
    }

    fn note_touched(&self, before: &events::Before, command: &Command, touched: &mut Touched) {
        // A pending reason is the reconciler's own output, and no plan reads it: its write
        // does not plan the jobs again. (A node change still plans the jobs whose reason is
        // held back unwritten: `reconcile::Work::keys`.)
        let reason_only = matches!(
            command,
            Command::SetJobPending { .. } | Command::SetJobsPending { .. }
        );
        for (key, _) in before.jobs.iter().filter(|_| !reason_only) {
            touched.job(key.clone());
        }
        for (id, was) in &before.allocations {
            let after = self.allocations.get(id);
            if let Some(a) = after.or(was.as_ref()) {
                touched.job(job_key(&a.namespace, &a.job));
            }
            if was.as_ref().is_some_and(Allocation::holds) && !after.is_some_and(Allocation::holds)
            {
                touched.capacity = true;
            }
        }
        if !before.nodes.is_empty()
            || matches!(
                command,
                Command::SetNodeVolumes { .. } | Command::SetNodeDiskPressure { .. }
            )
        {
            touched.capacity = true;
        }
        // Commands known to change only jobs' records or node facts agents are not sent:
        // they change what agents are sent only through a job with a service.
        let jobs_only = matches!(
            command,
            Command::ApplyJob { .. }
                | Command::StopJob { .. }
                | Command::SetJobPending { .. }
                | Command::SetJobsPending { .. }
                | Command::Rollout { .. }
                | Command::RollbackJob { .. }
                | Command::SetNodeVolumes { .. }
                | Command::SetNodeDiskPressure { .. }
                | Command::CollectGarbage { .. }
                | Command::InitCluster { .. }
                | Command::Pki { .. }
        );
        let service = |j: &Arc<Job>| j.versions().iter().any(|v| v.spec.service.is_some());
        if !jobs_only
            || !before.allocations.is_empty()
            || !before.nodes.is_empty()
            || before.jobs.iter().any(|(key, was)| {
                was.as_ref().is_some_and(service) || self.jobs.get(key).is_some_and(service)
            })
        {
            touched.published = true;
        }
    }

    /// Every event kept, oldest first.
    pub fn events(&self) -> impl DoubleEndedIterator<Item = &events::Event> + '_ {
        self.events.iter()
    }

    /// The sequence number of the newest event (0: none yet).
    pub fn last_event(&self) -> u64 {
        self.events.back().map_or(0, |e| e.seq)
    }

    fn record_events(&mut self, index: Option<u64>, before: &events::Before, command: &Command) {
        let mut drafts = Vec::new();
        for (id, was) in &before.allocations {
            if let Some(after) = self.allocations.get(id) {
                events::allocation_events(was.as_ref(), after, &mut drafts);
            }
        }
        for (key, was) in &before.jobs {
            if let Some(after) = self.jobs.get(key) {
                events::job_events(was.as_deref(), after, &mut drafts);
            }
        }
        for (name, was) in &before.nodes {
            events::node_events(was.as_ref(), self.nodes.get(name), name, &mut drafts);
        }
        self.push_events(index, drafts, events::command_time(command));
    }

    /// Numbers and keeps the events an entry made (at `at_ms`, when it says when).
    fn push_events(&mut self, index: Option<u64>, drafts: Vec<events::Draft>, at_ms: Option<i64>) {
        if drafts.is_empty() {
            // Nothing happened: the state stays exactly as it was.
            return;
        }
        if let Some(t) = at_ms {
            self.clock_ms = self.clock_ms.max(t);
        }
        let first = match index {
            Some(i) => (i << events::SEQ_SHIFT).max(self.next_event),
            None => self.next_event.max(1),
        };
        for (seq, d) in (first..).zip(drafts.into_iter().take(1 << events::SEQ_SHIFT)) {
            self.next_event = seq + 1;
            self.events.push_back(events::Event {
                seq,
                at_ms: self.clock_ms,
                kind: d.kind.to_owned(),
                namespace: d.namespace,
                job: d.job,
                alloc: d.alloc,
                node: d.node,
                message: d.message,
            });
            while self.events.len() > events::MAX_EVENTS {
                self.events.pop_front();
            }
        }
    }

    fn apply_command(&mut self, command: &Command) -> ApplyResult {
        match command {
            Command::ApplyJob { spec, at_ms } => self.apply_job(spec, *at_ms),
            Command::StopJob {
                namespace,
                name,
                at_ms,
            } => self.stop_job(namespace, name, *at_ms),
            Command::UpsertNode { node } => {
                let created = !self.nodes.contains_key(&node.name);
                self.nodes.insert(node.name.clone(), node.clone());
                Ok(Outcome::NodeUpserted {
                    name: node.name.clone(),
                    created,
                })
            }
            Command::RegisterNode {
                node,
                cluster_cidr,
                subnet_prefix,
            } => {
                // The cluster's own settings win over what an entry carries (entries written
                // before the settings existed carry the leader's flags).
                let (cidr, prefix) = match &self.settings {
                    Some(s) => (s.cluster_cidr.as_str(), s.node_subnet_prefix),
                    None => (cluster_cidr.as_str(), *subnet_prefix),
                };
                let mut node = node.clone();
                // What the node reported since it first registered stays until it reports again.
                if let Some(known) = self.nodes.get(&node.name) {
                    node.named_volumes = known.named_volumes.clone();
                }
                node.subnet = match self.nodes.get(&node.name).and_then(|n| n.subnet.clone()) {
                    Some(kept) => Some(kept),
                    None => Some(self.free_subnet(cidr, prefix, &node.name)?),
                };
                let created = !self.nodes.contains_key(&node.name);
                let name = node.name.clone();
                self.nodes.insert(name.clone(), node);
                Ok(Outcome::NodeUpserted { name, created })
            }
            Command::SetNodeStatus {
                name,
                status,
                at_ms,
            } => {
                let node = self
                    .nodes
                    .get_mut(name)
                    .ok_or_else(|| ApplyError::NodeNotFound { name: name.clone() })?;
                let changed = node.status != *status;
                node.status = *status;
                if changed {
                    node.status_changed_at_ms = *at_ms;
                }
                Ok(Outcome::NodeStatusSet {
                    name: name.clone(),
                    changed,
                })
            }
            Command::RemoveNode { name, at_ms } => {
                let node = self
                    .nodes
                    .get(name)
                    .ok_or_else(|| ApplyError::NodeNotFound { name: name.clone() })?;
                if node.status != NodeStatus::Down {
                    return Err(ApplyError::NodeNotDown {
                        name: name.clone(),
                        status: node.status.as_str().to_owned(),
                    });
                }
                // As when it went down: whatever it still held is lost (already so, unless the
                // removal comes before the reconciler's own write).
                let held: Vec<String> = self
                    .node_allocations(name)
                    .filter(|a| a.desired == DesiredStatus::Run || !a.observed.is_terminal())
                    .map(|a| a.id.clone())
                    .collect();
                let lost = self.stop_allocations(&held, true, *at_ms);
                let subnet = self.nodes.remove(name).and_then(|n| n.subnet);
                // A removed node's certificates stop working at once.
                self.pki
                    .revoke_identity(&skiff_tls::Identity::Node(name.clone()).uri());
                Ok(Outcome::NodeRemoved {
                    name: name.clone(),
                    subnet,
                    lost,
                })
            }
            Command::PlaceAllocations { allocations } => self.place(allocations),
            Command::SetAllocationDesired { id, desired } => {
                let alloc = self
                    .allocations
                    .get_mut(id)
                    .ok_or_else(|| ApplyError::AllocationNotFound { id: id.clone() })?;
                alloc.desired = *desired;
                Ok(Outcome::AllocationUpdated { id: id.clone() })
            }
            Command::ReportAllocation { id, status, at_ms } => {
                let alloc = self
                    .allocations
                    .get_mut(id)
                    .ok_or_else(|| ApplyError::AllocationNotFound { id: id.clone() })?;
                alloc.observe(status.clone(), *at_ms);
                Ok(Outcome::AllocationUpdated { id: id.clone() })
            }
            Command::ReportAllocations { reports, at_ms } => {
                let mut count = 0;
                for r in reports {
                    let checked = self.allocations.get(&r.id).is_some_and(|a| {
                        self.job(&a.namespace, &a.job)
                            .and_then(|j| j.version(a.job_version))
                            .is_some_and(|v| {
                                v.spec.service.as_ref().is_some_and(|s| s.check.is_some())
                            })
                    });
                    if let Some(alloc) = self.allocations.get_mut(&r.id) {
                        // A lost allocation stays lost: its replacement is already placed.
                        if alloc.observed != AllocationStatus::Lost {
                            alloc.observe(r.status.clone(), *at_ms);
                            alloc.restarts = alloc.restarts.max(r.restarts);
                            if r.ip.is_some() {
                                alloc.ip = r.ip.clone();
                            }
                            if r.health.is_some() {
                                alloc.health = r.health;
                                alloc.health_output = r.health_output.clone();
                            }
                            if r.log_dropped_bytes > alloc.log_dropped_bytes {
                                alloc.log_dropped_bytes = r.log_dropped_bytes;
                                alloc.log_error = r.log_error.clone();
                            }
                            if let Some(containers) = &r.containers {
                                alloc.containers = containers.clone();
                            }
                            alloc.oom_kills = alloc.oom_kills.max(r.oom_kills);
                            alloc.track_health(checked, *at_ms);
                            count += 1;
                        }
                    }
                }
                Ok(Outcome::AllocationsUpdated { count })
            }
            Command::SetNodeDiskPressure { name, pressure, .. } => {
                let node = self
                    .nodes
                    .get_mut(name)
                    .ok_or_else(|| ApplyError::NodeNotFound { name: name.clone() })?;
                let changed = node.disk_pressure != *pressure;
                node.disk_pressure = *pressure;
                Ok(Outcome::NodeStatusSet {
                    name: name.clone(),
                    changed,
                })
            }
            Command::SetNodeVolumes { name, volumes } => {
                let node = self
                    .nodes
                    .get_mut(name)
                    .ok_or_else(|| ApplyError::NodeNotFound { name: name.clone() })?;
                let changed = node.named_volumes != *volumes;
                node.named_volumes = volumes.clone();
                Ok(Outcome::NodeStatusSet {
                    name: name.clone(),
                    changed,
                })
            }
            Command::StopAllocations { ids, lost, at_ms } => Ok(Outcome::AllocationsUpdated {
                count: self.stop_allocations(ids, *lost, *at_ms),
            }),
            Command::DrainAllocations { ids, at_ms } => {
                let mut count = 0;
                for id in ids {
                    if let Some(a) = self.allocations.get_mut(id)
                        && a.desired == DesiredStatus::Run
                        && a.drain_since_ms.is_none()
                    {
                        a.drain_since_ms = Some(*at_ms);
                        count += 1;
                    }
                }
                Ok(Outcome::AllocationsUpdated { count })
            }
            Command::Rollout {
                namespace,
                name,
                version,
                change,
                at_ms,
            } => self.change_rollout(namespace, name, *version, change, *at_ms),
            Command::RollbackJob {
                namespace,
                name,
                to_version,
                reason,
                automatic,
                at_ms,
            } => self.rollback_job(namespace, name, *to_version, reason, *automatic, *at_ms),
            Command::CollectGarbage {
                allocations,
                versions,
                ..
            } => Ok(self.collect_garbage(allocations, versions)),
            Command::SetJobPending {
                namespace,
                name,
                pending,
            } => {
                let changed = self
                    .set_job_pending(&job_key(namespace, name), pending)
                    .ok_or_else(|| ApplyError::JobNotFound {
                        namespace: namespace.clone(),
                        name: name.clone(),
                    })?
                    .is_some();
                Ok(Outcome::JobPendingSet { changed })
            }
            // Taken by `apply_touching` before it gets here.
            Command::SetJobsPending { items } => {
                Ok(self.set_jobs_pending(None, items, &mut Touched::default()))
            }
            Command::InitCluster { settings } => match &self.settings {
                None => {
                    if parse_cidr(&settings.cluster_cidr).is_none() {
                        return Err(ApplyError::BadCidr {
                            cidr: settings.cluster_cidr.clone(),
                        });
                    }
                    check_service_cidr(&settings.service_cidr, &settings.cluster_cidr)?;
                    self.settings = Some(settings.clone());
                    Ok(Outcome::ClusterInitialized { changed: true })
                }
                Some(current) if current == settings => {
                    Ok(Outcome::ClusterInitialized { changed: false })
                }
                Some(current) => Err(ApplyError::SettingsConflict {
                    current: current.clone(),
                    requested: settings.clone(),
                }),
            },
            Command::Pki { change } => self.pki.apply(change),
        }
    }

    /// The cluster-wide settings, once the first leader committed them.
    pub fn pki(&self) -> &pki::PkiState {
        &self.pki
    }

    pub fn settings(&self) -> Option<&ClusterSettings> {
        self.settings.as_ref()
    }

    /// The lowest /24 of `cidr` no node holds.
    /// Marks allocations to be stopped (and, if `lost`, the live ones lost); unknown ids are
    /// skipped. Returns how many were found.
    fn stop_allocations(&mut self, ids: &[String], lost: bool, at_ms: i64) -> usize {
        let mut count = 0;
        for id in ids {
            if let Some(alloc) = self.allocations.get_mut(id) {
                alloc.desired = DesiredStatus::Stop;
                if lost && !alloc.observed.is_terminal() {
                    alloc.observe(AllocationStatus::Lost, at_ms);
                }
                count += 1;
            }
        }
        count
    }

    /// The lowest address of the service CIDR no service holds (not the network's first or
    /// last address).
    fn free_vip(&self, service: &str) -> Result<std::net::Ipv4Addr, ApplyError> {
        let cidr = self
            .settings
            .as_ref()
            .map_or(DEFAULT_SERVICE_CIDR, |s| s.service_cidr.as_str());
        let (base, prefix) =
            parse_service_cidr(cidr).ok_or_else(|| ApplyError::BadServiceCidr {
                service_cidr: cidr.to_owned(),
                cluster_cidr: self
                    .settings
                    .as_ref()
                    .map(|s| s.cluster_cidr.clone())
                    .unwrap_or_default(),
            })?;
        let taken: std::collections::HashSet<std::net::Ipv4Addr> =
            self.vips.values().copied().collect();
        let size = 1u32 << (32 - prefix);
        (1..size - 1)
            .map(|i| std::net::Ipv4Addr::from(base + i))
            .find(|ip| !taken.contains(ip))
            .ok_or_else(|| ApplyError::NoServiceIp {
                cidr: cidr.to_owned(),
                service: service.to_owned(),
            })
    }

    /// Refuses `spec` when another running job of its namespace publishes its service name.
    /// The API checks before proposing; the state machine checks again when applying.
    pub fn check_service_free(&self, spec: &JobSpec) -> Result<(), ApplyError> {
        // A job claims its service name and its workload identity's name (its own name for
        // a client in the mesh): two jobs claiming one name would share DNS or an identity.
        let claims = |s: &JobSpec| -> Vec<String> {
            let mut v: Vec<String> = s
                .service_name()
                .into_iter()
                .chain(s.workload_name())
                .map(str::to_owned)
                .collect();
            v.dedup();
            v
        };
        let mine = claims(spec);
        if mine.is_empty() {
            return Ok(());
        }
        for j in self.jobs.values().filter(|j| {
            j.namespace == spec.namespace && j.name != spec.name && j.status == JobStatus::Running
        }) {
            if let Some(name) = claims(&j.latest().spec)
                .into_iter()
                .find(|n| mine.contains(n))
            {
                return Err(ApplyError::ServiceTaken {
                    namespace: spec.namespace.clone(),
                    service: name,
                    job: j.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// A service's virtual IP, while a running job publishes it.
    pub fn vip(&self, namespace: &str, service: &str) -> Option<std::net::Ipv4Addr> {
        self.vips.get(&job_key(namespace, service)).copied()
    }

    fn free_subnet(&self, cidr: &str, subnet_prefix: u8, node: &str) -> Result<String, ApplyError> {
        let (base, prefix) = parse_cidr(cidr).ok_or_else(|| ApplyError::BadCidr {
            cidr: cidr.to_owned(),
        })?;
        let sp = u32::from(subnet_prefix);
        if !(prefix..=30).contains(&sp) {
            return Err(ApplyError::BadCidr {
                cidr: format!("{cidr} split into /{sp}"),
            });
        }
        let taken: std::collections::HashSet<&str> = self
            .nodes
            .values()
            .filter_map(|n| n.subnet.as_deref())
            .collect();
        let count = 1u32 << (sp - prefix);
        (0..count)
            .map(|i| {
                let net = std::net::Ipv4Addr::from(base + (i << (32 - sp)));
                format!("{net}/{sp}")
            })
            .find(|s| !taken.contains(s.as_str()))
            .ok_or_else(|| ApplyError::NoSubnet {
                cidr: cidr.to_owned(),
                node: node.to_owned(),
            })
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// An allocation by id.
    pub fn allocation(&self, id: &str) -> Option<&Allocation> {
        self.allocations.get(id)
    }

    fn apply_job(&mut self, spec: &JobSpec, at_ms: i64) -> ApplyResult {
        // Specs are validated before they are proposed; this guards the log against a member
        // running older validation rules, without ever panicking.
        spec.validate().map_err(|e| ApplyError::InvalidSpec {
            message: e.to_string(),
        })?;
        let key = spec.key();
        // The service's virtual IP: checked and chosen before anything changes.
        let published = self
            .jobs
            .get(&key)
            .filter(|j| j.status == JobStatus::Running)
            .and_then(|j| {
                j.latest()
                    .spec
                    .service_name()
                    .map(|s| job_key(&j.namespace, s))
            });
        let publishes = spec.service_name().map(|s| job_key(&spec.namespace, s));
        let new_vip = match (spec.service_name(), &publishes) {
            (Some(service), Some(svc_key)) => {
                self.check_service_free(spec)?;
                match self.vips.get(svc_key) {
                    Some(_) => None,
                    None => Some((svc_key.clone(), self.free_vip(service)?)),
                }
            }
            _ => None,
        };
        if published != publishes
            && let Some(old) = published
        {
            self.vips.remove(&old);
        }
        if let Some((svc_key, ip)) = new_vip {
            self.vips.insert(svc_key, ip);
        }
        match self.jobs.get_mut(&key).map(Arc::make_mut) {
            None => {
                let job = Job::new(spec.clone(), at_ms);
                let summary = job.summary();
                self.jobs.insert(key, Arc::new(job));
                Ok(Outcome::JobApplied {
                    job: summary,
                    created: true,
                    changed: true,
                    changes: Vec::new(),
                })
            }
            Some(job) => {
                let latest = job.latest();
                if latest.spec == *spec && job.status == JobStatus::Running {
                    return Ok(Outcome::JobApplied {
                        job: job.summary(),
                        created: false,
                        changed: false,
                        changes: Vec::new(),
                    });
                }
                let changes = diff_specs(&latest.spec, spec);
                let from = latest.version;
                let was_running = job.status == JobStatus::Running;
                job.push_version(spec.clone(), at_ms);
                let new = job.latest().version;
                if was_running && job.same_as_latest(from) {
                    // Scaling: an open rollout goes on, now of the scaled version.
                    if let Some(r) = job.rollout_mut()
                        && r.version == from
                        && (r.status.is_open() || r.status == RolloutStatus::Failed)
                    {
                        r.version = new;
                    }
                } else if was_running {
                    job.start_rollout(from, spec.update_strategy().canary, None, at_ms);
                }
                Ok(Outcome::JobApplied {
                    job: job.summary(),
                    created: false,
                    changed: true,
                    changes,
                })
            }
        }
    }

    fn change_rollout(
        &mut self,
        namespace: &str,
        name: &str,
        version: u64,
        change: &RolloutChange,
        at_ms: i64,
    ) -> ApplyResult {
        let job = self
            .jobs
            .get_mut(&job_key(namespace, name))
            .map(Arc::make_mut)
            .ok_or_else(|| ApplyError::JobNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })?;
        let no = |why: String| ApplyError::NoRollout {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            version,
            why,
        };
        let status = job.status;
        let replicas = job.latest().spec.replicas;
        let r = job
            .rollout_mut()
            .filter(|r| r.version == version)
            .ok_or_else(|| no(String::new()))?;
        if status != JobStatus::Running {
            return Err(no(": the job is stopped".into()));
        }
        let before = r.clone();
        match change {
            RolloutChange::Progress { healthy, old_left } => {
                if (r.healthy, r.old_left) != (*healthy, *old_left) {
                    r.progress_at_ms = at_ms;
                }
                r.healthy = *healthy;
                r.old_left = *old_left;
            }
            RolloutChange::Promote => {
                if !r.status.is_open() {
                    return Err(no(format!(": it is {}", r.status.as_str())));
                }
                if r.promoted {
                    return Err(no(": it has no canaries waiting".into()));
                }
                r.promoted = true;
                r.progress_at_ms = at_ms;
            }
            RolloutChange::Pause => {
                if r.status != RolloutStatus::Running {
                    return Err(no(format!(": it is {}", r.status.as_str())));
                }
                r.status = RolloutStatus::Paused;
                r.reason = "paused".into();
            }
            RolloutChange::Resume => {
                if r.status != RolloutStatus::Paused {
                    return Err(no(format!(": it is {}", r.status.as_str())));
                }
                r.status = RolloutStatus::Running;
                r.reason.clear();
                // The time paused does not count against the progress deadline.
                r.progress_at_ms = at_ms;
            }
            RolloutChange::Succeed => {
                if r.status != RolloutStatus::Running {
                    return Err(no(format!(": it is {}", r.status.as_str())));
                }
                r.status = RolloutStatus::Succeeded;
                r.finished_at_ms = Some(at_ms);
                r.progress_at_ms = at_ms;
                r.old_left = 0;
                r.healthy = replicas;
                job.stable_version = Some(version);
            }
            RolloutChange::Fail { reason } => {
                if !r.status.is_open() {
                    return Err(no(format!(": it is {}", r.status.as_str())));
                }
                r.status = RolloutStatus::Failed;
                r.reason = reason.clone();
                r.finished_at_ms = Some(at_ms);
            }
        }
        let r = job.rollout().cloned().unwrap_or(before.clone());
        Ok(Outcome::RolloutChanged {
            version,
            status: r.status,
            changed: r != before,
        })
    }

    fn rollback_job(
        &mut self,
        namespace: &str,
        name: &str,
        to_version: u64,
        reason: &str,
        automatic: bool,
        at_ms: i64,
    ) -> ApplyResult {
        let job =
            self.jobs
                .get(&job_key(namespace, name))
                .ok_or_else(|| ApplyError::JobNotFound {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })?;
        let bad = |why: &str| ApplyError::BadRollback {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            version: to_version,
            why: why.to_owned(),
        };
        if job.status != JobStatus::Running {
            return Err(bad("the job is stopped (apply it again to run it)"));
        }
        let latest = job.latest().version;
        let mut spec = job
            .version(to_version)
            .ok_or_else(|| bad("no such version"))?
            .spec
            .clone();
        if job.same_as_latest(to_version) {
            return Err(bad(&format!(
                "it runs the same spec as the latest version {latest}"
            )));
        }
        // The replica count stays what it is now: a rollback undoes a change of what runs.
        spec.replicas = job.latest().spec.replicas;
        // The service and its virtual IP follow the spec, as for any apply.
        let applied = self.apply_job(&spec, at_ms)?;
        let job = self
            .jobs
            .get_mut(&job_key(namespace, name))
            .map(Arc::make_mut)
            .ok_or_else(|| bad("the job is gone"))?;
        let new = job.latest().version;
        // `apply_job` started a rollout of the new version, superseding the open one; the
        // rollout it replaced says why, and the new one is a rollback without canaries.
        let n = job.rollouts.len();
        if n >= 2 {
            let prev = &mut job.rollouts[n - 2];
            if prev.version == latest && prev.status == RolloutStatus::Superseded {
                if automatic {
                    prev.status = RolloutStatus::Failed;
                    prev.reason =
                        format!("{reason}; rolled back to version {to_version} (as version {new})");
                } else {
                    prev.reason =
                        format!("undone: rolled back to version {to_version} (as version {new})");
                }
            }
        }
        if let Some(r) = job.rollout_mut()
            && r.version == new
        {
            r.rollback_of = Some(latest);
            r.canary = 0;
            r.promoted = true;
            r.reason = if automatic {
                format!("automatic rollback of version {latest}: {reason}")
            } else {
                format!("rollback of version {latest} to version {to_version}")
            };
        }
        // A failed rollout (not superseded: already closed) records the rollback too.
        if let Some(prev) = job.rollouts.iter_mut().rev().nth(1)
            && prev.version == latest
            && prev.status == RolloutStatus::Failed
            && !prev.reason.contains("rolled back")
        {
            prev.reason = format!(
                "{}; rolled back to version {to_version} (as version {new})",
                prev.reason
            );
        }
        Ok(applied)
    }

    fn stop_job(&mut self, namespace: &str, name: &str, at_ms: i64) -> ApplyResult {
        let job = self
            .jobs
            .get_mut(&job_key(namespace, name))
            .map(Arc::make_mut)
            .ok_or_else(|| ApplyError::JobNotFound {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })?;
        let changed = job.status != JobStatus::Stopped;
        if changed {
            job.status = JobStatus::Stopped;
            job.status_changed_at_ms = at_ms;
            if let Some(service) = job.latest().spec.service_name() {
                self.vips.remove(&job_key(namespace, service));
            }
            let ids: Vec<String> = self
                .allocations
                .values()
                .filter(|a| a.namespace == namespace && a.job == name)
                .map(|a| a.id.clone())
                .collect();
            for id in ids {
                if let Some(alloc) = self.allocations.get_mut(&id) {
                    alloc.desired = DesiredStatus::Stop;
                }
            }
        }
        Ok(Outcome::JobStopped {
            job: job.summary(),
            changed,
        })
    }

    fn place(&mut self, allocations: &[Allocation]) -> ApplyResult {
        // Check everything first so that a bad batch changes nothing.
        for (i, alloc) in allocations.iter().enumerate() {
            if self.allocations.contains_key(&alloc.id)
                || allocations[..i].iter().any(|a| a.id == alloc.id)
            {
                return Err(ApplyError::AllocationExists {
                    id: alloc.id.clone(),
                });
            }
            if !self.nodes.contains_key(&alloc.node) {
                return Err(ApplyError::NodeNotFound {
                    name: alloc.node.clone(),
                });
            }
            let known = self
                .jobs
                .get(&job_key(&alloc.namespace, &alloc.job))
                .is_some_and(|j| j.version(alloc.job_version).is_some());
            if !known {
                return Err(ApplyError::UnknownJobVersion {
                    id: alloc.id.clone(),
                    namespace: alloc.namespace.clone(),
                    name: alloc.job.clone(),
                    version: alloc.job_version,
                });
            }
        }
        for alloc in allocations {
            self.by_job.add(alloc);
            self.by_node.add(alloc);
            self.allocations.insert(alloc.id.clone(), alloc.clone());
        }
        Ok(Outcome::AllocationsPlaced {
            count: allocations.len(),
        })
    }

    /// Sets the pending reason of the job at `key`: `None` when the job does not exist,
    /// `Some(None)` when it already had that reason, else the job as changed. The job is copied
    /// (it may be shared with a copy of the state, and taking it copies the map's path to it)
    /// only when the reason changes.
    fn set_job_pending(&mut self, key: &str, pending: &Option<String>) -> Option<Option<&Job>> {
        if self.jobs.get(key)?.pending == *pending {
            return Some(None);
        }
        let job = self.jobs.get_mut(key).map(Arc::make_mut)?;
        job.pending.clone_from(pending);
        Some(Some(job))
    }

    /// Sets each item's reason (a job that is gone is skipped), with a `pending` event for
    /// each new reason, as [`events::job_events`] makes it. A reason changes nothing that
    /// plans read (see `note_touched`); agents may be sent it only for a job with a service.
    fn set_jobs_pending(
        &mut self,
        index: Option<u64>,
        items: &[JobPending],
        touched: &mut Touched,
    ) -> Outcome {
        let mut changed = false;
        let mut drafts = Vec::new();
        let mut key = String::new();
        for item in items {
            job_key_into(&mut key, &item.namespace, &item.name);
            let Some(Some(job)) = self.set_job_pending(&key, &item.pending) else {
                continue;
            };
            changed = true;
            if job.versions().iter().any(|v| v.spec.service.is_some()) {
                touched.published = true;
            }
            if let Some(p) = &job.pending {
                drafts.push(events::pending_draft(job, p));
            }
        }
        self.push_events(index, drafts, None);
        Outcome::JobPendingSet { changed }
    }

    /// Removes the allocations and versions listed that are still collectable.
    fn collect_garbage(&mut self, allocations: &[String], versions: &[JobVersions]) -> Outcome {
        let mut removed = 0;
        for id in allocations {
            if self
                .allocations
                .get(id)
                .is_some_and(Allocation::collectable)
                && let Some(a) = self.allocations.remove(id)
            {
                self.by_job.remove(&a);
                self.by_node.remove(&a);
                removed += 1;
            }
        }
        let mut dropped = 0;
        for jv in versions {
            let key = job_key(&jv.namespace, &jv.name);
            let in_use: std::collections::BTreeSet<u64> = self
                .job_allocations(&jv.namespace, &jv.name)
                .map(|a| a.job_version)
                .collect();
            if let Some(job) = self.jobs.get_mut(&key).map(Arc::make_mut) {
                dropped += job.drop_versions(&jv.versions, &in_use);
            }
        }
        Outcome::Collected {
            allocations: removed,
            versions: dropped,
        }
    }

    /// A job by namespace and name.
    pub fn job(&self, namespace: &str, name: &str) -> Option<&Job> {
        self.jobs.get(&job_key(namespace, name)).map(Arc::as_ref)
    }

    /// A job by its key (`namespace/name`).
    pub fn job_by_key(&self, key: &str) -> Option<&Job> {
        self.jobs.get(key).map(Arc::as_ref)
    }

    /// Every job, ordered by namespace then name; optionally only one namespace.
    pub fn jobs<'a>(&'a self, namespace: Option<&'a str>) -> impl Iterator<Item = &'a Job> + 'a {
        self.jobs
            .values()
            .map(Arc::as_ref)
            .filter(move |j| namespace.is_none_or(|ns| j.namespace == ns))
    }

    /// Every node, ordered by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// Allocations of one job, ordered by id.
    pub fn job_allocations<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Allocation> + 'a {
        self.by_job
            .lookup(&self.allocations, &job_key(namespace, name))
    }

    /// Allocations placed on one node (whatever their state), ordered by id.
    pub fn node_allocations<'a>(
        &'a self,
        node: &str,
    ) -> impl Iterator<Item = &'a Allocation> + use<'a> {
        self.by_node.lookup(&self.allocations, node)
    }

    /// Every allocation, ordered by id.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }
}

#[cfg(test)]
mod tests;
