//! The records kept in the cluster state: jobs and their versions, nodes, allocations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use skiff_common::JobSpec;

use super::JobSummary;

/// Whether a job should run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Running,
    Stopped,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Stopped => "stopped",
        }
    }
}

/// One version of a job's spec. Every version is kept, for history and rollback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobVersion {
    pub version: u64,
    pub spec: JobSpec,
    pub submitted_at_ms: i64,
}

/// A job: its versions (oldest first, never empty) and whether it should run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub namespace: String,
    pub name: String,
    pub status: JobStatus,
    pub status_changed_at_ms: i64,
    /// Shared, not copied, when the job is: a job record is cloned whenever a change meets a
    /// state copy still in use (the reconciler's, a snapshot's), and a spec is its bulk.
    versions: Vec<std::sync::Arc<JobVersion>>,
    /// Why replicas of the latest version are not placed, as the scheduler said it.
    #[serde(default)]
    pub pending: Option<String>,
    /// The job's rollouts, oldest first, the last [`MAX_ROLLOUTS`] kept; the last one is the
    /// current one.
    #[serde(default)]
    pub rollouts: Vec<Rollout>,
    /// The last version whose rollout succeeded: where an automatic rollback goes.
    #[serde(default)]
    pub stable_version: Option<u64>,
}

/// Rollouts kept per job.
pub const MAX_ROLLOUTS: usize = 10;

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    /// Replacing replicas.
    Running,
    /// Held (`skiff rollout pause`): nothing is replaced until it is resumed.
    Paused,
    /// Every replica runs the new version and is healthy.
    Succeeded,
    /// It failed (why is in its reason); no replica is replaced for it any more. With
    /// `auto_rollback`, a rollback rollout follows it.
    Failed,
    /// A newer version was applied (or an undo asked for) before it finished.
    Superseded,
}

impl RolloutStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Running => "running",
            RolloutStatus::Paused => "paused",
            RolloutStatus::Succeeded => "succeeded",
            RolloutStatus::Failed => "failed",
            RolloutStatus::Superseded => "superseded",
        }
    }

    /// Whether it still decides what runs (running, paused, or failed without a rollback).
    pub fn is_open(self) -> bool {
        matches!(self, RolloutStatus::Running | RolloutStatus::Paused)
    }
}

/// The replacement of a job's replicas by a new version, kept in the replicated state so
/// that it survives leader changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The version rolled out.
    pub version: u64,
    /// The version that was the latest when it started.
    pub from_version: u64,
    pub status: RolloutStatus,
    /// Why it is where it is (failed, rolled back, paused, superseded); empty while running.
    #[serde(default)]
    pub reason: String,
    pub started_at_ms: i64,
    /// When it last made progress (a new replica healthy, an old one gone).
    pub progress_at_ms: i64,
    #[serde(default)]
    pub finished_at_ms: Option<i64>,
    /// Canaries run before the rest.
    #[serde(default)]
    pub canary: u32,
    /// Whether the canaries were promoted (always, without canaries).
    #[serde(default)]
    pub promoted: bool,
    /// For a rollback: the version it undoes.
    #[serde(default)]
    pub rollback_of: Option<u64>,
    /// Progress as last recorded: new replicas healthy for `min_healthy`, old ones left.
    #[serde(default)]
    pub healthy: u32,
    #[serde(default)]
    pub old_left: u32,
}

/// A change to a job's current rollout, decided by the leader's reconciler or asked for by a
/// user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum RolloutChange {
    Progress { healthy: u32, old_left: u32 },
    Promote,
    Pause,
    Resume,
    Succeed,
    Fail { reason: String },
}

impl Job {
    pub(super) fn new(spec: JobSpec, at_ms: i64) -> Self {
        Job {
            namespace: spec.namespace().to_string(),
            name: spec.name.clone(),
            status: JobStatus::Running,
            status_changed_at_ms: at_ms,
            versions: vec![std::sync::Arc::new(JobVersion {
                version: 1,
                spec,
                submitted_at_ms: at_ms,
            })],
            pending: None,
            rollouts: Vec::new(),
            stable_version: None,
        }
    }

    /// The current rollout (the last one), whatever its status.
    pub fn rollout(&self) -> Option<&Rollout> {
        self.rollouts.last()
    }

    /// The rollout that decides what runs: the last one, while it is running or paused, or
    /// failed with nothing after it.
    pub fn open_rollout(&self) -> Option<&Rollout> {
        self.rollouts
            .last()
            .filter(|r| r.status.is_open() || r.status == RolloutStatus::Failed)
    }

    /// Where an undo goes by default: the version the current rollout replaced.
    pub fn rollout_before_current(&self) -> Option<u64> {
        self.rollout().map(|r| r.from_version)
    }

    pub(super) fn rollout_mut(&mut self) -> Option<&mut Rollout> {
        self.rollouts.last_mut()
    }

    /// Starts a rollout of the latest version (from `from_version`), superseding an open one.
    pub(super) fn start_rollout(
        &mut self,
        from_version: u64,
        canary: u32,
        rollback_of: Option<u64>,
        at_ms: i64,
    ) {
        if let Some(r) = self.rollouts.last_mut()
            && r.status.is_open()
        {
            r.status = RolloutStatus::Superseded;
            r.reason = format!(
                "superseded by version {}",
                self.versions[self.versions.len() - 1].version
            );
            r.finished_at_ms = Some(at_ms);
        }
        let version = self.latest().version;
        self.rollouts.push(Rollout {
            version,
            from_version,
            status: RolloutStatus::Running,
            reason: String::new(),
            started_at_ms: at_ms,
            progress_at_ms: at_ms,
            finished_at_ms: None,
            canary,
            promoted: canary == 0,
            rollback_of,
            healthy: 0,
            old_left: 0,
        });
        if self.rollouts.len() > MAX_ROLLOUTS {
            self.rollouts.remove(0);
        }
    }

    /// Whether `version` runs the same thing as the latest version (it may differ in
    /// `replicas` only).
    pub fn same_as_latest(&self, version: u64) -> bool {
        let latest = self.latest();
        version == latest.version
            || self.version(version).is_some_and(|v| {
                let mut spec = v.spec.clone();
                spec.replicas = latest.spec.replicas;
                spec == latest.spec
            })
    }

    pub(super) fn push_version(&mut self, spec: JobSpec, at_ms: i64) {
        let version = self.latest().version + 1;
        self.versions.push(std::sync::Arc::new(JobVersion {
            version,
            spec,
            submitted_at_ms: at_ms,
        }));
        if self.status != JobStatus::Running {
            self.status = JobStatus::Running;
            self.status_changed_at_ms = at_ms;
        }
    }

    /// The newest version.
    pub fn latest(&self) -> &JobVersion {
        // `versions` is never empty: `new` creates one and `drop_versions` keeps the latest.
        &self.versions[self.versions.len() - 1]
    }

    /// Drops the versions listed, except the latest, the stable one, those of the last
    /// rollout (where it went and where an undo goes) and those in `in_use`; returns how many
    /// it dropped.
    pub fn drop_versions(
        &mut self,
        drop: &[u64],
        in_use: &std::collections::BTreeSet<u64>,
    ) -> usize {
        let latest = self.latest().version;
        let rollout = self.rollout().map(|r| (r.version, r.from_version));
        let keep = |v: u64| {
            v == latest
                || Some(v) == self.stable_version
                || rollout.is_some_and(|(to, from)| v == to || v == from)
                || in_use.contains(&v)
                || !drop.contains(&v)
        };
        let keep: Vec<bool> = self.versions.iter().map(|v| keep(v.version)).collect();
        let before = self.versions.len();
        let mut flags = keep.into_iter();
        self.versions.retain(|_| flags.next().unwrap_or(true));
        before - self.versions.len()
    }

    /// A version by number.
    pub fn version(&self, version: u64) -> Option<&JobVersion> {
        self.versions
            .iter()
            .find(|v| v.version == version)
            .map(|v| &**v)
    }

    /// Every version, oldest first.
    pub fn versions(&self) -> &[std::sync::Arc<JobVersion>] {
        &self.versions
    }

    pub fn summary(&self) -> JobSummary {
        let latest = self.latest();
        JobSummary {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            version: latest.version,
            status: self.status,
            replicas: latest.spec.replicas,
            // The shorthand's one image; a group's main images.
            image: latest
                .spec
                .containers
                .iter()
                .filter(|c| c.lifecycle == skiff_common::spec::Lifecycle::Main)
                .map(|c| c.image.as_str())
                .collect::<Vec<_>>()
                .join(","),
            submitted_at_ms: latest.submitted_at_ms,
            versions: u32::try_from(self.versions.len()).unwrap_or(u32::MAX),
        }
    }
}

/// Resources a node offers to workloads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeResources {
    /// Cores.
    pub cpu: f64,
    /// Bytes.
    pub memory: u64,
    pub pids: u32,
}

/// A node's scheduling status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Ready,
    Draining,
    Down,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Draining => "draining",
            NodeStatus::Down => "down",
        }
    }
}

/// A host running an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub resources: NodeResources,
    pub status: NodeStatus,
    pub status_changed_at_ms: i64,
    pub registered_at_ms: i64,
    /// The agent's own API (logs, exec), `host:port`.
    #[serde(default)]
    pub agent_addr: String,
    /// Where Prometheus scrapes its agent (`host:port`, plain HTTP).
    #[serde(default)]
    pub metrics_addr: String,
    /// The node's pod subnet (a /24 of the cluster CIDR), given at its first registration and
    /// kept for good.
    #[serde(default)]
    pub subnet: Option<String>,
    /// The node's WireGuard identity, when its agent runs the overlay.
    #[serde(default)]
    pub wireguard: Option<WireguardIdentity>,
    /// Directories under which jobs may mount host volumes (the agent's
    /// `--host-volume-dir`).
    #[serde(default)]
    pub host_volume_dirs: Vec<String>,
    /// The named volumes on the node, `namespace/job/name`, as its agent last reported.
    #[serde(default)]
    pub named_volumes: std::collections::BTreeSet<String>,
    /// Its agent's data directory is fuller than the agent's threshold: nothing new is placed
    /// on it (what runs there stays).
    #[serde(default)]
    pub disk_pressure: bool,
    /// What its agent said it can do when it last registered
    /// ([`skiff_common::capability`]); a node registered by an older agent has none.
    #[serde(default)]
    pub capabilities: std::collections::BTreeSet<String>,
}

impl Node {
    /// Whether `path` (a plain absolute path) lies under one of the node's host volume
    /// directories.
    pub fn allows_host_path(&self, path: &str) -> bool {
        self.host_volume_dirs.iter().any(|dir| {
            let dir = dir.trim_end_matches('/');
            path.strip_prefix(dir)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }
}

/// One container of an allocation as its agent last reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub name: String,
    pub lifecycle: skiff_common::spec::Lifecycle,
    /// `pending`, `running`, `exited` or `failed`.
    pub state: ContainerState,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub reason: String,
}

/// Where a container of an allocation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerState {
    Pending,
    Running,
    Exited,
    Failed,
}

/// What other nodes need to reach a node through the overlay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardIdentity {
    /// Base64 public key.
    pub public_key: String,
    /// Underlay `host:port`.
    pub endpoint: String,
    pub backend: WireguardBackend,
}

/// Which WireGuard a node's agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireguardBackend {
    Kernel,
    Userspace,
}

/// The verdict of an allocation's health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Checked, no verdict yet.
    Starting,
    Healthy,
    Unhealthy,
}

impl Node {
    /// A ready node with 2 cores, 1 GiB and 1000 pids, for tests.
    #[cfg(test)]
    pub(crate) fn for_test(name: &str) -> Node {
        Node {
            name: name.into(),
            address: "198.18.0.2".into(),
            labels: Default::default(),
            resources: NodeResources {
                cpu: 2.0,
                memory: 1 << 30,
                pids: 1000,
            },
            status: NodeStatus::Ready,
            status_changed_at_ms: 0,
            registered_at_ms: 0,
            agent_addr: String::new(),
            metrics_addr: String::new(),
            subnet: None,
            wireguard: None,
            host_volume_dirs: Vec::new(),
            named_volumes: Default::default(),
            disk_pressure: false,
            capabilities: skiff_common::capability::ALL
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
        }
    }

    /// How many containers the node's pod subnet can address (network, broadcast and the
    /// gateway excluded); `None` without a subnet.
    pub fn pod_capacity(&self) -> Option<u64> {
        let prefix: u32 = self.subnet.as_ref()?.split_once('/')?.1.parse().ok()?;
        (prefix <= 30).then(|| (1u64 << (32 - prefix)) - 3)
    }
}

/// What should happen to an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredStatus {
    Run,
    Stop,
}

/// What an agent last saw of an allocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AllocationStatus {
    Pending,
    Running,
    Exited { code: i32 },
    Failed { reason: String },
    Lost,
}

impl AllocationStatus {
    /// Whether the allocation's process is gone for good (it is not coming back by itself).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            AllocationStatus::Exited { .. }
                | AllocationStatus::Failed { .. }
                | AllocationStatus::Lost
        )
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            AllocationStatus::Pending => "pending",
            AllocationStatus::Running => "running",
            AllocationStatus::Exited { .. } => "exited",
            AllocationStatus::Failed { .. } => "failed",
            AllocationStatus::Lost => "lost",
        }
    }
}

/// One replica of one job version placed on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub id: String,
    pub namespace: String,
    pub job: String,
    pub job_version: u64,
    pub node: String,
    pub desired: DesiredStatus,
    pub observed: AllocationStatus,
    pub restarts: u32,
    pub created_at_ms: i64,
    pub observed_at_ms: i64,
    /// The container's overlay address, as its agent reported it.
    #[serde(default)]
    pub ip: Option<String>,
    /// The verdict when its job has a health check.
    #[serde(default)]
    pub health: Option<Health>,
    /// The last check's output or failure.
    #[serde(default)]
    pub health_output: String,
    /// Bytes of its output its node could not write to the log (a full disk), and why.
    #[serde(default)]
    pub log_dropped_bytes: u64,
    #[serde(default)]
    pub log_error: String,
    /// Each container, as its agent last reported it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<ContainerStatus>,
    /// Since when it has been running and healthy (or running, without a health check), as
    /// its agent's reports said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since_ms: Option<i64>,
    /// Since when it has been out of service discovery, still running, on its way to being
    /// stopped (`drain_delay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_since_ms: Option<i64>,
    /// Processes of it the OOM killer killed, as its agent last reported.
    #[serde(default)]
    pub oom_kills: u64,
}

impl Allocation {
    /// Whether it is over and may be forgotten: stopped, and its process gone (or never
    /// started).
    pub fn collectable(&self) -> bool {
        self.desired == DesiredStatus::Stop
            && (self.observed.is_terminal() || self.observed == AllocationStatus::Pending)
    }

    /// Whether it holds its node's resources: meant to run and not lost.
    pub fn holds(&self) -> bool {
        self.desired == DesiredStatus::Run && self.observed != AllocationStatus::Lost
    }

    /// A new allocation of `namespace/job` version `job_version` on `node`, to run, not yet
    /// reported by its agent.
    pub fn new_pending(
        id: &str,
        namespace: &str,
        job: &str,
        job_version: u64,
        node: &str,
        at_ms: i64,
    ) -> Allocation {
        Allocation {
            id: id.to_owned(),
            namespace: namespace.to_owned(),
            job: job.to_owned(),
            job_version,
            node: node.to_owned(),
            desired: DesiredStatus::Run,
            observed: AllocationStatus::Pending,
            restarts: 0,
            created_at_ms: at_ms,
            observed_at_ms: at_ms,
            ip: None,
            health: None,
            health_output: String::new(),
            log_dropped_bytes: 0,
            log_error: String::new(),
            containers: Vec::new(),
            healthy_since_ms: None,
            drain_since_ms: None,
            oom_kills: 0,
        }
    }

    /// Records since when it has been running and healthy (`checked`: its version has a
    /// health check, so only a healthy verdict counts), after a report at `at_ms`.
    pub(super) fn track_health(&mut self, checked: bool, at_ms: i64) {
        let ok = self.observed == AllocationStatus::Running
            && (!checked || self.health == Some(Health::Healthy));
        if !ok {
            self.healthy_since_ms = None;
        } else if self.healthy_since_ms.is_none() {
            self.healthy_since_ms = Some(at_ms);
        }
    }

    pub(super) fn observe(&mut self, status: AllocationStatus, at_ms: i64) {
        let restarted = matches!(
            self.observed,
            AllocationStatus::Exited { .. } | AllocationStatus::Failed { .. }
        ) && status == AllocationStatus::Running;
        if restarted {
            self.restarts = self.restarts.saturating_add(1);
        }
        self.observed = status;
        self.observed_at_ms = at_ms;
    }
}
