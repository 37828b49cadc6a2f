//! Every conversion between the wire (`skiff_proto`) and the controller's own types, in one
//! place: what the API sends is built here, and what agents report is checked here, once,
//! where it enters. Enums cross the wire as proto enums, never as strings compared with
//! literals.

use skiff_common::JobSpec;
use skiff_common::spec::{
    CheckKind, ContainerSpec, Lifecycle, NetworkMode, Protocol, RestartPolicy, VolumeKind,
};
use skiff_proto::v1 as pb;

use super::ApiError;
use crate::raft::Role;
use crate::scheduler::Usage;
use crate::state::{
    Allocation, AllocationStatus, ClusterState, ContainerState, ContainerStatus, DesiredStatus,
    Health, Job, JobStatus, JobSummary, Node, NodeResources, NodeStatus, Rollout, WireguardBackend,
    WireguardIdentity,
};

/// What an agent runs for an allocation of `spec`: the spec resolved (port names to numbers,
/// the stop signal to its number, durations to milliseconds). Computed once per job version
/// by the assignment cache, not once per watching agent.
pub fn task(spec: &JobSpec) -> pb::Task {
    let port_of = |name: &str| spec.port(name).map_or(0, |p| u32::from(p.port));
    let check = spec
        .service
        .as_ref()
        .and_then(|s| s.check.as_ref())
        .map(|c| {
            let kind = match &c.kind {
                CheckKind::Http {
                    path,
                    port,
                    expected_status,
                } => pb::health_check::Kind::Http(pb::HttpCheck {
                    path: path.clone(),
                    port: port.as_deref().map_or(0, port_of),
                    expected_status: u32::from(*expected_status),
                }),
                CheckKind::Tcp { port } => pb::health_check::Kind::Tcp(pb::TcpCheck {
                    port: port_of(port),
                }),
                CheckKind::Exec { command } => pb::health_check::Kind::Exec(pb::ExecCheck {
                    command: command.clone(),
                }),
            };
            pb::HealthCheck {
                kind: Some(kind),
                interval_ms: millis(c.interval),
                timeout_ms: millis(c.timeout),
                healthy_threshold: c.healthy_threshold,
                unhealthy_threshold: c.unhealthy_threshold,
            }
        });
    pb::Task {
        containers: spec.containers.iter().map(container_task).collect(),
        ports: spec
            .ports
            .iter()
            .map(|p| pb::TaskPort {
                name: p.name.clone(),
                port: u32::from(p.port),
                protocol: protocol(p.protocol) as i32,
                host_port: p.host_port.map_or(0, u32::from),
            })
            .collect(),
        check,
        volumes: spec
            .volumes
            .iter()
            .map(|v| pb::VolumeTask {
                name: v.name.clone(),
                r#type: match v.kind {
                    VolumeKind::Ephemeral => pb::VolumeType::Ephemeral,
                    VolumeKind::Named => pb::VolumeType::Named,
                    VolumeKind::Host => pb::VolumeType::Host,
                    VolumeKind::Tmpfs => pb::VolumeType::Tmpfs,
                } as i32,
                host_path: v.path.clone().unwrap_or_default(),
                size: v.size.map_or(0, |s| s.as_u64()),
            })
            .collect(),
        network: match spec.network.mode {
            NetworkMode::Bridge => pb::NetworkMode::Bridge,
            NetworkMode::Host => pb::NetworkMode::Host,
            NetworkMode::None => pb::NetworkMode::None,
        } as i32,
        mesh: mesh_task(spec),
        disconnect_stop_after_ms: spec.disconnect.as_ref().map_or(0, |d| millis(d.stop_after)),
    }
}

/// The sidecar's policy of a job in the mesh.
pub fn mesh_task(spec: &JobSpec) -> Option<pb::MeshTask> {
    let mesh = spec.mesh.as_ref()?;
    Some(pb::MeshTask {
        identity: spec.workload_name().unwrap_or(&spec.name).to_owned(),
        mode: match mesh.mode {
            skiff_common::MeshMode::Strict => pb::MeshMode::Strict,
            skiff_common::MeshMode::Permissive => pb::MeshMode::Permissive,
        } as i32,
        allow_from: mesh.allow_from.clone(),
        upstreams: mesh.upstreams.clone(),
        request_stats: spec.update.as_ref().is_some_and(|u| u.analysis.is_some()),
    })
}

fn container_task(c: &ContainerSpec) -> pb::ContainerTask {
    pb::ContainerTask {
        name: c.name.clone(),
        image: c.image.clone(),
        entrypoint: c.command.clone(),
        args: c.args.clone(),
        env: c.env.clone().into_iter().collect(),
        restart: match c.restart {
            RestartPolicy::Never => pb::RestartPolicy::Never,
            RestartPolicy::OnFailure => pb::RestartPolicy::OnFailure,
            RestartPolicy::Always => pb::RestartPolicy::Always,
        } as i32,
        // Validated at apply: a known name.
        stop_signal: skiff_common::spec::signal_number(&c.stop_signal).unwrap_or(15),
        stop_grace_ms: millis(c.stop_grace),
        resources: Some(pb::ContainerResources {
            cpu: c.resources.cpu,
            memory: c.resources.memory.as_u64(),
            pids: c.resources.pids,
        }),
        devices: c
            .devices
            .iter()
            .map(|d| pb::DeviceGrant {
                path: d.path.clone(),
                permissions: d.permissions.clone(),
            })
            .collect(),
        lifecycle: lifecycle(c.lifecycle) as i32,
        init: c.init,
        mounts: c
            .volumes
            .iter()
            .map(|m| pb::VolumeMountTask {
                volume: m.name.clone(),
                path: m.path.clone(),
                read_only: m.read_only,
            })
            .collect(),
    }
}

pub fn lifecycle(l: Lifecycle) -> pb::ContainerLifecycle {
    match l {
        Lifecycle::Init => pb::ContainerLifecycle::Init,
        Lifecycle::Sidecar => pb::ContainerLifecycle::Sidecar,
        Lifecycle::Main => pb::ContainerLifecycle::Main,
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub fn protocol(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Http => pb::Protocol::Http,
    }
}

pub fn job_status(s: JobStatus) -> pb::JobStatus {
    match s {
        JobStatus::Running => pb::JobStatus::Running,
        JobStatus::Stopped => pb::JobStatus::Stopped,
    }
}

pub fn job_summary(s: &JobSummary) -> pb::JobSummary {
    pb::JobSummary {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        version: s.version,
        status: job_status(s.status) as i32,
        replicas: s.replicas,
        image: s.image.clone(),
        submitted_at_ms: s.submitted_at_ms,
        versions: s.versions,
    }
}

pub fn health(h: Option<Health>) -> pb::Health {
    match h {
        None => pb::Health::Unspecified,
        Some(Health::Starting) => pb::Health::Starting,
        Some(Health::Healthy) => pb::Health::Healthy,
        Some(Health::Unhealthy) => pb::Health::Unhealthy,
    }
}

pub fn allocation_state(s: &AllocationStatus) -> pb::AllocationState {
    match s {
        AllocationStatus::Pending => pb::AllocationState::Pending,
        AllocationStatus::Running => pb::AllocationState::Running,
        AllocationStatus::Exited { .. } => pb::AllocationState::Exited,
        AllocationStatus::Failed { .. } => pb::AllocationState::Failed,
        AllocationStatus::Lost => pb::AllocationState::Lost,
    }
}

pub fn allocation(a: &Allocation) -> pb::Allocation {
    let (exit_code, reason) = match &a.observed {
        AllocationStatus::Exited { code } => (Some(*code), String::new()),
        AllocationStatus::Failed { reason } => (None, reason.clone()),
        _ => (None, String::new()),
    };
    pb::Allocation {
        id: a.id.clone(),
        namespace: a.namespace.clone(),
        job: a.job.clone(),
        job_version: a.job_version,
        node: a.node.clone(),
        desired: match a.desired {
            DesiredStatus::Run => pb::DesiredState::Run,
            DesiredStatus::Stop => pb::DesiredState::Stop,
        } as i32,
        observed: allocation_state(&a.observed) as i32,
        restarts: a.restarts,
        created_at_ms: a.created_at_ms,
        observed_at_ms: a.observed_at_ms,
        exit_code,
        reason,
        ip: a.ip.clone().unwrap_or_default(),
        health: health(a.health) as i32,
        health_output: a.health_output.clone(),
        log_dropped_bytes: a.log_dropped_bytes,
        log_error: a.log_error.clone(),
        containers: a.containers.iter().map(container_status).collect(),
        healthy_since_ms: a.healthy_since_ms.unwrap_or(0),
        oom_kills: a.oom_kills,
        drain_since_ms: a.drain_since_ms.unwrap_or(0),
    }
}

/// A rollout as the API shows it, with its replicas counted from the allocations now.
pub fn rollout(state: &ClusterState, job: &Job, r: &Rollout, now_ms: i64) -> pb::RolloutInfo {
    let latest = job.latest();
    let update = latest.spec.update_strategy();
    let min_healthy = i64::try_from(update.min_healthy.as_millis()).unwrap_or(i64::MAX);
    let live: Vec<&Allocation> = state
        .job_allocations(&job.namespace, &job.name)
        .filter(|a| a.desired == DesiredStatus::Run && a.observed != AllocationStatus::Lost)
        .collect();
    let current = r.status.is_open() && job.rollout().is_some_and(|c| c.version == r.version);
    let (mut placed, mut healthy, mut old, mut draining) = (0, 0, 0, 0);
    for a in &live {
        if a.drain_since_ms.is_some() {
            draining += 1;
        } else if job.same_as_latest(a.job_version) {
            placed += 1;
            if a.healthy_since_ms
                .is_some_and(|t| now_ms - t >= min_healthy)
            {
                healthy += 1;
            }
        } else {
            old += 1;
        }
    }
    let (desired, placed, healthy, old, draining) = if current {
        (latest.spec.replicas, placed, healthy, old, draining)
    } else {
        (latest.spec.replicas, r.healthy, r.healthy, r.old_left, 0)
    };
    pb::RolloutInfo {
        version: r.version,
        from_version: r.from_version,
        status: r.status.as_str().to_owned(),
        reason: r.reason.clone(),
        started_at_ms: r.started_at_ms,
        progress_at_ms: r.progress_at_ms,
        finished_at_ms: r.finished_at_ms.unwrap_or(0),
        canary: r.canary,
        promoted: r.promoted,
        rollback_of: r.rollback_of.unwrap_or(0),
        desired,
        placed,
        healthy,
        old,
        draining,
        awaiting_promotion: current && !r.promoted && !update.auto_promote && healthy >= r.canary,
    }
}

pub fn member_role(r: Role) -> pb::MemberRole {
    match r {
        Role::Leader => pb::MemberRole::Leader,
        Role::Follower => pb::MemberRole::Follower,
        Role::Candidate => pb::MemberRole::Candidate,
        Role::Learner => pb::MemberRole::Learner,
        Role::Shutdown => pb::MemberRole::Unreachable,
    }
}

fn resources(r: &NodeResources) -> pb::NodeResources {
    pb::NodeResources {
        cpu: r.cpu,
        memory: r.memory,
        pids: r.pids,
    }
}

pub fn node_status(s: NodeStatus) -> pb::NodeStatus {
    match s {
        NodeStatus::Ready => pb::NodeStatus::Ready,
        NodeStatus::Draining => pb::NodeStatus::Draining,
        NodeStatus::Down => pb::NodeStatus::Down,
    }
}

fn backend(b: WireguardBackend) -> pb::WireguardBackend {
    match b {
        WireguardBackend::Kernel => pb::WireguardBackend::Kernel,
        WireguardBackend::Userspace => pb::WireguardBackend::Userspace,
    }
}

/// A node as the API shows it, with what its allocations hold (from
/// [`crate::reconcile::usage_by_node`], computed once per request).
pub fn node(n: &Node, usage: Option<&(Usage, u32)>) -> pb::Node {
    let (used, count) = usage.copied().unwrap_or_default();
    let allocated = NodeResources {
        cpu: used.millicpu as f64 / 1000.0,
        memory: used.memory,
        pids: u32::try_from(used.pids).unwrap_or(u32::MAX),
    };
    pb::Node {
        name: n.name.clone(),
        address: n.address.clone(),
        status: node_status(n.status) as i32,
        labels: n.labels.clone().into_iter().collect(),
        total: Some(resources(&n.resources)),
        allocated: Some(resources(&allocated)),
        allocations: count,
        agent_addr: n.agent_addr.clone(),
        metrics_addr: n.metrics_addr.clone(),
        registered_at_ms: n.registered_at_ms,
        status_changed_at_ms: n.status_changed_at_ms,
        subnet: n.subnet.clone().unwrap_or_default(),
        wireguard: n.wireguard.as_ref().map(|w| pb::WireguardIdentity {
            public_key: w.public_key.clone(),
            endpoint: w.endpoint.clone(),
            backend: backend(w.backend) as i32,
        }),
        wireguard_status: None,
        host_volume_dirs: n.host_volume_dirs.clone(),
        named_volumes: n.named_volumes.iter().cloned().collect(),
        disk_pressure: n.disk_pressure,
        capabilities: n.capabilities.iter().cloned().collect(),
        heartbeat_age_ms: -1,
    }
}

/// The most host volume directories or named volumes one node may report.
const MAX_NODE_VOLUMES: usize = 1024;

/// An agent's `--host-volume-dir`s: plain absolute paths, not `/`.
pub fn host_volume_dirs(dirs: &[String]) -> Result<Vec<String>, ApiError> {
    if dirs.len() > MAX_NODE_VOLUMES {
        return Err(ApiError::BadRequest(format!(
            "host_volume_dirs: {} is more than {MAX_NODE_VOLUMES}",
            dirs.len()
        )));
    }
    for d in dirs {
        let plain = d.starts_with('/')
            && d.len() > 1
            && d.len() <= 4096
            && d[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'));
        if !plain {
            return Err(ApiError::BadRequest(format!(
                "host_volume_dirs: {d:?} is not a plain absolute directory"
            )));
        }
    }
    Ok(dirs.to_vec())
}

/// An agent's named volumes, `namespace/job/name` of three valid names; `None` when the
/// report carries none and nothing is recorded (an agent that does not report volumes).
pub fn named_volumes(
    keys: &[String],
) -> Result<Option<std::collections::BTreeSet<String>>, ApiError> {
    if keys.len() > MAX_NODE_VOLUMES {
        return Err(ApiError::BadRequest(format!(
            "named_volumes: {} is more than {MAX_NODE_VOLUMES}",
            keys.len()
        )));
    }
    let mut out = std::collections::BTreeSet::new();
    for k in keys {
        let parts: Vec<&str> = k.split('/').collect();
        let ok = parts.len() == 3
            && parts
                .iter()
                .all(|p| skiff_common::validate_name("volume", p).is_ok());
        if !ok {
            return Err(ApiError::BadRequest(format!(
                "named_volumes: {k:?} is not namespace/job/name"
            )));
        }
        out.insert(k.clone());
    }
    Ok(Some(out))
}

/// The containers of an allocation as an agent reported them; `None` when it reported none
/// (an agent from before groups).
pub fn container_statuses(
    list: &[pb::ContainerStatus],
) -> Result<Option<Vec<ContainerStatus>>, ApiError> {
    if list.is_empty() {
        return Ok(None);
    }
    if list.len() > skiff_common::spec::MAX_CONTAINERS {
        return Err(ApiError::BadRequest(format!(
            "containers: {} is more than {}",
            list.len(),
            skiff_common::spec::MAX_CONTAINERS
        )));
    }
    list.iter()
        .map(|c| {
            skiff_common::validate_name("container", &c.name)
                .map_err(|e| ApiError::BadRequest(format!("containers: {}", e.message)))?;
            let state = match pb::AllocationState::try_from(c.state) {
                Ok(pb::AllocationState::Running) => ContainerState::Running,
                Ok(pb::AllocationState::Exited) => ContainerState::Exited,
                Ok(pb::AllocationState::Failed) => ContainerState::Failed,
                _ => ContainerState::Pending,
            };
            let lifecycle = match pb::ContainerLifecycle::try_from(c.lifecycle) {
                Ok(pb::ContainerLifecycle::Init) => Lifecycle::Init,
                Ok(pb::ContainerLifecycle::Sidecar) => Lifecycle::Sidecar,
                _ => Lifecycle::Main,
            };
            Ok(ContainerStatus {
                name: c.name.clone(),
                lifecycle,
                state,
                exit_code: c.exit_code,
                restarts: c.restarts,
                reason: c.reason.chars().take(512).collect(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

pub fn container_status(c: &ContainerStatus) -> pb::ContainerStatus {
    pb::ContainerStatus {
        name: c.name.clone(),
        lifecycle: lifecycle(c.lifecycle) as i32,
        state: match c.state {
            ContainerState::Pending => pb::AllocationState::Pending,
            ContainerState::Running => pb::AllocationState::Running,
            ContainerState::Exited => pb::AllocationState::Exited,
            ContainerState::Failed => pb::AllocationState::Failed,
        } as i32,
        exit_code: c.exit_code,
        restarts: c.restarts,
        reason: c.reason.clone(),
    }
}

/// Checks an agent's WireGuard identity: a 32-byte base64 key, an `IP:port` endpoint, a
/// known backend.
pub fn wireguard_identity(w: pb::WireguardIdentity) -> Result<WireguardIdentity, ApiError> {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(&w.public_key)
        .ok()
        .filter(|k| k.len() == 32);
    if key.is_none() {
        return Err(ApiError::BadRequest(format!(
            "wireguard.public_key: {:?} is not a base64 32-byte key",
            w.public_key
        )));
    }
    if w.endpoint.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::BadRequest(format!(
            "wireguard.endpoint: {:?} is not IP:port",
            w.endpoint
        )));
    }
    let backend = match pb::WireguardBackend::try_from(w.backend) {
        Ok(pb::WireguardBackend::Kernel) => WireguardBackend::Kernel,
        Ok(pb::WireguardBackend::Userspace) => WireguardBackend::Userspace,
        _ => {
            return Err(ApiError::BadRequest(format!(
                "wireguard.backend: {} is not kernel or userspace",
                w.backend
            )));
        }
    };
    Ok(WireguardIdentity {
        public_key: w.public_key,
        endpoint: w.endpoint,
        backend,
    })
}

/// What an agent reports of an allocation: its state (PENDING, RUNNING, EXITED, FAILED; LOST is
/// the controllers' to say) and its health verdict.
pub fn report(r: &pb::AllocationReport) -> Result<(AllocationStatus, Option<Health>), ApiError> {
    let bad = |what: String| ApiError::BadRequest(format!("allocations: {}: {what}", r.id));
    let status = match pb::AllocationState::try_from(r.state) {
        Ok(pb::AllocationState::Pending) => AllocationStatus::Pending,
        Ok(pb::AllocationState::Running) => AllocationStatus::Running,
        Ok(pb::AllocationState::Exited) => AllocationStatus::Exited { code: r.exit_code },
        Ok(pb::AllocationState::Failed) => AllocationStatus::Failed {
            reason: r.reason.clone(),
        },
        _ => {
            return Err(bad(format!(
                "state {} is not one an agent reports",
                r.state
            )));
        }
    };
    let health = match pb::Health::try_from(r.health) {
        Ok(pb::Health::Unspecified) => None,
        Ok(pb::Health::Starting) => Some(Health::Starting),
        Ok(pb::Health::Healthy) => Some(Health::Healthy),
        Ok(pb::Health::Unhealthy) => Some(Health::Unhealthy),
        Err(_) => return Err(bad(format!("unknown health {}", r.health))),
    };
    Ok((status, health))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> JobSpec {
        skiff_common::parse_job_spec(text, skiff_common::SpecFormat::Toml).expect("spec")
    }

    #[test]
    fn task_resolves_ports_signals_and_durations() {
        let t = task(&spec(
            r#"
            name = "web"
            image = "127.0.0.1:5000/web:1"
            command = ["/bin/httpd"]
            args = ["-f"]
            env = { A = "1" }
            restart = "always"
            stop_signal = "SIGQUIT"
            stop_grace = "3s"
            [resources]
            memory = "32Mi"
            [[ports]]
            name = "http"
            port = 8080
            [service]
            port = "http"
            check = { http = "/healthz", interval = "2s", timeout = "1s" }
            "#,
        ));
        let c = &t.containers[0];
        assert_eq!(c.image, "127.0.0.1:5000/web:1");
        assert_eq!(c.entrypoint, ["/bin/httpd"]);
        assert_eq!(c.args, ["-f"]);
        assert_eq!(c.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(c.restart, pb::RestartPolicy::Always as i32);
        assert_eq!(c.stop_signal, 3);
        assert_eq!(c.stop_grace_ms, 3000);
        assert_eq!(c.resources.as_ref().map(|r| r.memory), Some(32 << 20));
        assert_eq!(t.ports[0].port, 8080);
        let check = t.check.expect("check");
        assert_eq!((check.interval_ms, check.timeout_ms), (2000, 1000));
        assert_eq!(
            check.kind,
            Some(pb::health_check::Kind::Http(pb::HttpCheck {
                path: "/healthz".into(),
                port: 8080,
                expected_status: 200,
            }))
        );
    }

    #[test]
    fn reports_are_checked() {
        let mut r = pb::AllocationReport {
            id: "a1".into(),
            state: pb::AllocationState::Exited as i32,
            exit_code: 3,
            health: pb::Health::Healthy as i32,
            ..Default::default()
        };
        assert_eq!(
            report(&r).expect("valid"),
            (AllocationStatus::Exited { code: 3 }, Some(Health::Healthy))
        );
        for (state, health, expect) in [
            (
                pb::AllocationState::Lost as i32,
                0,
                "state 5 is not one an agent reports",
            ),
            (0, 0, "state 0 is not one an agent reports"),
            (2, 9, "unknown health 9"),
        ] {
            r.state = state;
            r.health = health;
            let e = report(&r).expect_err(expect).to_string();
            assert_eq!(e, format!("allocations: a1: {expect}"));
        }
    }

    #[test]
    fn wireguard_identities_are_checked() {
        let ok = pb::WireguardIdentity {
            public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            endpoint: "198.18.0.2:51820".into(),
            backend: pb::WireguardBackend::Userspace as i32,
        };
        assert!(wireguard_identity(ok.clone()).is_ok());
        for (w, expect) in [
            (
                pb::WireguardIdentity {
                    public_key: "short".into(),
                    ..ok.clone()
                },
                "wireguard.public_key",
            ),
            (
                pb::WireguardIdentity {
                    endpoint: "nowhere".into(),
                    ..ok.clone()
                },
                "wireguard.endpoint",
            ),
            (
                pb::WireguardIdentity {
                    backend: 0,
                    ..ok.clone()
                },
                "wireguard.backend: 0 is not kernel or userspace",
            ),
        ] {
            let e = wireguard_identity(w).expect_err(expect).to_string();
            assert!(e.starts_with(expect), "{e}");
        }
    }
}
