//! The controller's Prometheus metrics. The registry is built once in `Controller::start` and
//! passed to whoever records into it; nothing here is global.

use skiff_common::prometheus::label_value as escape;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::raft::{MemberInfo, Role, Status};
use crate::state::ClusterState;
use crate::state::{AllocationStatus, DesiredStatus, JobStatus, NodeStatus, RolloutStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

/// Every metric the controller exports.
pub struct Metrics {
    pub registry: Registry,
    pub term: Gauge<u64, AtomicU64>,
    pub leader_id: Gauge<u64, AtomicU64>,
    pub is_leader: Gauge<u64, AtomicU64>,
    pub last_log_index: Gauge<u64, AtomicU64>,
    pub commit_index: Gauge<u64, AtomicU64>,
    pub applied_index: Gauge<u64, AtomicU64>,
    pub snapshot_index: Gauge<u64, AtomicU64>,
    pub apply_seconds: Histogram,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<MethodLabels, Histogram>,
}

fn latency_buckets() -> std::vec::IntoIter<f64> {
    // 50 us .. ~1.6 s
    exponential_buckets(0.00005, 2.0, 16)
        .collect::<Vec<_>>()
        .into_iter()
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("skiff");
        let term = Gauge::default();
        let leader_id = Gauge::default();
        let is_leader = Gauge::default();
        let last_log_index = Gauge::default();
        let commit_index = Gauge::default();
        let applied_index = Gauge::default();
        let snapshot_index = Gauge::default();
        let apply_seconds = Histogram::new(latency_buckets());
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register("raft_term", "Current Raft term", term.clone());
        registry.register(
            "raft_leader_id",
            "Member id of the known leader (0: none)",
            leader_id.clone(),
        );
        registry.register(
            "raft_is_leader",
            "1 if this member is the leader",
            is_leader.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Index of the last log entry",
            last_log_index.clone(),
        );
        registry.register(
            "raft_commit_index",
            "Highest committed log index known here",
            commit_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Highest log index applied to the state machine",
            applied_index.clone(),
        );
        registry.register(
            "raft_snapshot_index",
            "Log index of the latest snapshot",
            snapshot_index.clone(),
        );
        registry.register(
            "state_apply_duration_seconds",
            "Time to apply one command to the state machine",
            apply_seconds.clone(),
        );
        registry.register(
            "api_requests",
            "API requests by method and status code",
            requests.clone(),
        );
        registry.register(
            "api_request_duration_seconds",
            "API request latency by method",
            request_seconds.clone(),
        );
        Metrics {
            registry,
            term,
            leader_id,
            is_leader,
            last_log_index,
            commit_index,
            applied_index,
            snapshot_index,
            apply_seconds,
            requests,
            request_seconds,
        }
    }

    /// Refreshes the Raft gauges from a status snapshot (done at scrape time).
    pub fn observe_status(&self, s: &Status) {
        self.term.set(s.term);
        self.leader_id.set(s.leader.unwrap_or(0));
        self.is_leader.set(u64::from(s.role == Role::Leader));
        self.last_log_index.set(s.last_log_index);
        self.commit_index.set(s.committed_index);
        self.applied_index.set(s.applied_index);
        self.snapshot_index.set(s.snapshot_index);
    }

    /// Counts one API request.
    pub fn request(&self, method: &str, code: tonic::Code, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
        self.request_seconds
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(seconds);
    }

    /// The Prometheus text exposition (format 0.0.4), which every Prometheus and `promtool
    /// check metrics` accept: prometheus-client writes OpenMetrics, so counters' HELP/TYPE
    /// lines get their `_total` name back and the `# EOF` marker goes.
    pub fn encode(&self) -> String {
        let mut om = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut om, &self.registry);
        openmetrics_to_prometheus(&om)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// This member's certificate expiry (agents export theirs under the same name).
pub fn render_certificate(o: &mut String, info: &skiff_tls::CertInfo) {
    let _ = writeln!(
        o,
        "# HELP skiff_tls_certificate_expiry_timestamp_seconds When this component's own certificate expires (Unix time); it is renewed at two thirds of its lifetime.\n\
         # TYPE skiff_tls_certificate_expiry_timestamp_seconds gauge\n\
         skiff_tls_certificate_expiry_timestamp_seconds{{identity=\"{}\"}} {}",
        escape(&info.identity.to_string()),
        info.not_after
    );
}

/// The cluster-level gauges, from the replicated state (exported by the leader only, so that
/// a sum over members does not count them three times).
pub fn render_cluster(o: &mut String, state: &ClusterState) {
    let jobs = state
        .jobs(None)
        .filter(|j| j.status == JobStatus::Running)
        .count();
    let _ = writeln!(
        o,
        "# HELP skiff_cluster_jobs Jobs that should run.\n# TYPE skiff_cluster_jobs gauge\nskiff_cluster_jobs {jobs}"
    );
    let mut allocs: BTreeMap<&str, u64> = ["pending", "running", "exited", "failed", "lost"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    let mut pending = 0u64;
    for a in state.allocations() {
        let s = match a.observed {
            AllocationStatus::Pending => "pending",
            AllocationStatus::Running => "running",
            AllocationStatus::Exited { .. } => "exited",
            AllocationStatus::Failed { .. } => "failed",
            AllocationStatus::Lost => "lost",
        };
        *allocs.entry(s).or_default() += 1;
    }
    // Replicas the scheduler could not place: the running jobs that say why.
    let waiting: Vec<_> = state
        .jobs(None)
        .filter(|j| j.status == JobStatus::Running && j.pending.is_some())
        .collect();
    if !waiting.is_empty() {
        let mut placed: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for a in state
            .allocations()
            .filter(|a| a.desired == DesiredStatus::Run)
        {
            *placed.entry((&a.namespace, &a.job)).or_default() += 1;
        }
        for j in waiting {
            let want = u64::from(j.latest().spec.replicas);
            let have = placed
                .get(&(j.namespace.as_str(), j.name.as_str()))
                .copied()
                .unwrap_or(0);
            pending += want.saturating_sub(have);
        }
    }
    let _ = writeln!(
        o,
        "# HELP skiff_cluster_allocations Allocations in the replicated state by observed state (stopped ones included until they are collected).\n# TYPE skiff_cluster_allocations gauge"
    );
    for (s, n) in &allocs {
        let _ = writeln!(o, "skiff_cluster_allocations{{state=\"{s}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP skiff_cluster_allocations_pending Replicas of running jobs the scheduler could not place.\n# TYPE skiff_cluster_allocations_pending gauge\nskiff_cluster_allocations_pending {pending}"
    );
    let mut nodes: BTreeMap<&str, u64> =
        [NodeStatus::Ready, NodeStatus::Draining, NodeStatus::Down]
            .into_iter()
            .map(|s| (s.as_str(), 0))
            .collect();
    for n in state.nodes() {
        *nodes.entry(n.status.as_str()).or_default() += 1;
    }
    let _ = writeln!(
        o,
        "# HELP skiff_cluster_nodes Nodes by status.\n# TYPE skiff_cluster_nodes gauge"
    );
    for (s, n) in &nodes {
        let _ = writeln!(o, "skiff_cluster_nodes{{status=\"{s}\"}} {n}");
    }
    let mut rollouts: BTreeMap<&str, u64> = [
        RolloutStatus::Running,
        RolloutStatus::Paused,
        RolloutStatus::Succeeded,
        RolloutStatus::Failed,
        RolloutStatus::Superseded,
    ]
    .into_iter()
    .map(|s| (s.as_str(), 0))
    .collect();
    for j in state.jobs(None) {
        for r in &j.rollouts {
            *rollouts.entry(r.status.as_str()).or_default() += 1;
        }
    }
    let _ = writeln!(
        o,
        "# HELP skiff_cluster_rollouts Rollouts kept in the jobs' histories by status (running and paused: in progress).\n# TYPE skiff_cluster_rollouts gauge"
    );
    for (s, n) in &rollouts {
        let _ = writeln!(o, "skiff_cluster_rollouts{{state=\"{s}\"}} {n}");
    }
}

/// One group of Prometheus HTTP SD targets.
#[derive(Debug, PartialEq, serde::Serialize)]
pub struct TargetGroup {
    pub targets: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// Every member (its HTTP address), every agent (its metrics address) and every running mesh
/// sidecar (through its agent, at `/sidecars/<alloc>/metrics`), in Prometheus' HTTP SD format.
pub fn targets(members: &[MemberInfo], state: &ClusterState) -> Vec<TargetGroup> {
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let mut out = Vec::new();
    for m in members {
        if m.member.http_addr.is_empty() {
            continue;
        }
        out.push(TargetGroup {
            targets: vec![m.member.http_addr.clone()],
            labels: labels(&[
                ("role", "controller"),
                ("node", &format!("member-{}", m.id)),
            ]),
        });
    }
    for n in state.nodes() {
        if n.metrics_addr.is_empty() {
            continue;
        }
        out.push(TargetGroup {
            targets: vec![n.metrics_addr.clone()],
            labels: labels(&[("role", "agent"), ("node", &n.name)]),
        });
    }
    for a in state.allocations() {
        if a.desired != DesiredStatus::Run || a.observed != AllocationStatus::Running {
            continue;
        }
        let meshed = state
            .job(&a.namespace, &a.job)
            .and_then(|j| j.version(a.job_version))
            .is_some_and(|v| v.spec.mesh.is_some());
        let Some(node) = state.node(&a.node).filter(|n| !n.metrics_addr.is_empty()) else {
            continue;
        };
        if !meshed {
            continue;
        }
        out.push(TargetGroup {
            targets: vec![node.metrics_addr.clone()],
            labels: labels(&[
                ("role", "sidecar"),
                ("node", &a.node),
                ("namespace", &a.namespace),
                ("workload", &a.job),
                ("alloc", &a.id),
                ("version", &a.job_version.to_string()),
                ("__metrics_path__", &format!("/sidecars/{}/metrics", a.id)),
            ]),
        });
    }
    out
}

/// Rewrites OpenMetrics text as Prometheus text format 0.0.4.
fn openmetrics_to_prometheus(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_keep_their_total_name_in_help_and_type() {
        let m = Metrics::new();
        m.request("ApplyJob", tonic::Code::Ok, 0.001);
        let text = m.encode();
        assert!(
            text.contains("# TYPE skiff_api_requests_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP skiff_api_requests_total "), "{text}");
        assert!(
            text.contains("skiff_api_requests_total{method=\"ApplyJob\",code=\"Ok\"} 1"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert!(text.ends_with('\n'));
    }
}
