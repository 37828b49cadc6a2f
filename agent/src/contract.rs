//! The agent's side of the controller contract, in one place: what arrives (assignments and
//! their tasks, overlay peers) is converted into the agent's own types here, once, where it
//! enters; what leaves (allocation reports, WireGuard status) is built here. The wire stays
//! tolerant: fields this agent does not know are ignored, and an enum value it does not know
//! falls back to the safe default; an assignment it cannot run is reported as failed with the
//! reason, never dropped silently.

use skiff_proxy::config::ServiceRef;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use skiff_common::spec::Lifecycle;
use skiff_proto::v1 as pb;
use skiff_runtime::cgroup::Limits;
pub use skiff_runtime::pod::PodNetwork;
use skiff_runtime::store::{RestartPolicy, State, Status};

use crate::health::Health;
use crate::net::{Backend, Key, Peer};

/// One allocation this node should run.
#[derive(Clone, Debug, PartialEq)]
pub struct Assigned {
    pub id: String,
    pub namespace: String,
    pub job: String,
    pub version: u64,
    /// What to run, or why this agent cannot run it.
    pub task: Result<Task, String>,
}

/// What to run for an allocation: a pod of containers.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// In the order the spec gives them (init containers run in this order).
    pub containers: Vec<ContainerTask>,
    pub check: Option<Check>,
    pub volumes: Vec<VolumeTask>,
    pub network: PodNetwork,
    pub ports: Vec<PortTask>,
    /// The mesh sidecar's policy; `None`: no sidecar.
    pub mesh: Option<MeshTask>,
    /// Fencing: the allocation stops once the node's lease is this old (see
    /// [`crate::fence`]); `None`: it runs whatever the controllers say or not.
    pub stop_after: Option<std::time::Duration>,
}

/// What the sidecar of a job in the mesh enforces.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshTask {
    /// The workload's identity: the service it publishes, or the job's name.
    pub identity: ServiceRef,
    pub mode: skiff_proxy::config::Mode,
    pub allow_from: Vec<ServiceRef>,
    pub upstreams: Vec<ServiceRef>,
    /// Report the sidecar's request counts with each heartbeat.
    pub request_stats: bool,
}

impl Task {
    /// The first main container: where exec checks, `logs` and `exec` go by default.
    pub fn main(&self) -> Option<&ContainerTask> {
        self.containers
            .iter()
            .find(|c| c.lifecycle == Lifecycle::Main)
    }

    /// The container named `name`.
    pub fn container(&self, name: &str) -> Option<&ContainerTask> {
        self.containers.iter().find(|c| c.name == name)
    }
}

/// One container of the allocation.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerTask {
    pub name: String,
    pub lifecycle: Lifecycle,
    pub image: String,
    /// Replaces the image's ENTRYPOINT when `Some`.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's CMD when not empty.
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub restart: RestartPolicy,
    pub stop_signal: i32,
    pub stop_grace: Duration,
    pub limits: Limits,
    /// Host devices asked for: path and access (`skiff_runtime::devices::ACC_*`). The node's
    /// policy decides whether they are granted.
    pub devices: Vec<(String, u32)>,
    /// A minimal init as PID 1.
    pub init: bool,
    pub mounts: Vec<MountTask>,
}

impl ContainerTask {
    /// A main container running `image` with the defaults of a spec (restart on failure,
    /// SIGTERM, 10 s grace, no limits, devices or mounts).
    pub fn new(name: &str, image: &str) -> ContainerTask {
        ContainerTask {
            name: name.to_owned(),
            lifecycle: Lifecycle::Main,
            image: image.to_owned(),
            entrypoint: None,
            args: Vec::new(),
            env: BTreeMap::new(),
            restart: RestartPolicy::OnFailure,
            stop_signal: 15,
            stop_grace: Duration::from_secs(10),
            limits: Limits::default(),
            devices: Vec::new(),
            init: false,
            mounts: Vec::new(),
        }
    }
}

/// Where a container sees one of the task's volumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountTask {
    pub volume: String,
    pub path: String,
    pub read_only: bool,
}

/// One of the task's volumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeTask {
    pub name: String,
    pub kind: VolumeKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeKind {
    Ephemeral,
    /// Persists on the node, keyed by namespace, job and name.
    Named,
    /// A directory of the node; the node's policy decides whether it may be mounted.
    Host(String),
    /// Memory, of this many bytes.
    Tmpfs(u64),
}

/// A port of the allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortTask {
    pub name: String,
    pub port: u16,
    pub udp: bool,
    /// HTTP (the mesh sidecar counts its requests).
    pub http: bool,
    /// Published on the node's advertise address at this port.
    pub host_port: Option<u16>,
}

/// The size of a tmpfs volume whose task gives none.
pub const DEFAULT_TMPFS: u64 = 64 << 20;

/// A health check, ports resolved to numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    Http {
        path: String,
        port: u16,
        expected_status: u16,
    },
    Tcp {
        port: u16,
    },
    Exec {
        command: Vec<String>,
    },
}

/// An assignment as the agent runs it.
pub fn assigned(a: pb::AssignedAllocation) -> Assigned {
    Assigned {
        task: a
            .task
            .ok_or_else(|| {
                "the controllers sent no task (a controller too old or too new for this agent)"
                    .to_owned()
            })
            .and_then(|t| task(t, &a.namespace)),
        id: a.id,
        namespace: a.namespace,
        job: a.job,
        version: a.job_version,
    }
}

fn task(t: pb::Task, namespace: &str) -> Result<Task, String> {
    if t.containers.is_empty() {
        return Err("task: no containers".into());
    }
    let check = t.check.map(check).transpose()?;
    let volumes = t
        .volumes
        .into_iter()
        .map(volume)
        .collect::<Result<Vec<_>, String>>()?;
    for (i, v) in volumes.iter().enumerate() {
        if volumes[..i].iter().any(|w| w.name == v.name) {
            return Err(format!("task: volume {} is declared twice", v.name));
        }
    }
    let containers = t
        .containers
        .into_iter()
        .map(|c| container(c, &volumes))
        .collect::<Result<Vec<_>, String>>()?;
    for (i, c) in containers.iter().enumerate() {
        if containers[..i].iter().any(|d| d.name == c.name) {
            return Err(format!("task: container {} is named twice", c.name));
        }
    }
    if !containers.iter().any(|c| c.lifecycle == Lifecycle::Main) {
        return Err("task: no main container".into());
    }
    let network = match pb::NetworkMode::try_from(t.network) {
        Ok(pb::NetworkMode::Unspecified | pb::NetworkMode::Bridge) => PodNetwork::Bridge,
        Ok(pb::NetworkMode::Host) => PodNetwork::Host,
        Ok(pb::NetworkMode::None) => PodNetwork::None,
        Err(_) => {
            return Err(format!(
                "task: network mode {} is one this agent does not know; upgrade it",
                t.network
            ));
        }
    };
    let ports =
        t.ports
            .iter()
            .map(|p| {
                let port = u16::try_from(p.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("task: port {}: {} is not a port", p.name, p.port))?;
                let host_port = match p.host_port {
                    0 => None,
                    h => Some(u16::try_from(h).map_err(|_| {
                        format!("task: port {}: host port {h} is not a port", p.name)
                    })?),
                };
                Ok(PortTask {
                    name: p.name.clone(),
                    port,
                    udp: p.protocol == pb::Protocol::Udp as i32,
                    http: p.protocol == pb::Protocol::Http as i32,
                    host_port,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
    let mesh = t.mesh.map(|m| mesh(m, namespace)).transpose()?;
    if mesh.is_some() && network != PodNetwork::Bridge {
        return Err("task: the mesh needs network mode bridge".into());
    }
    let stop_after = (t.disconnect_stop_after_ms > 0)
        .then(|| std::time::Duration::from_millis(t.disconnect_stop_after_ms));
    Ok(Task {
        containers,
        check,
        volumes,
        network,
        ports,
        mesh,
        stop_after,
    })
}

fn mesh(m: pb::MeshTask, namespace: &str) -> Result<MeshTask, String> {
    let refs = |what: &str, list: &[String]| {
        list.iter()
            .map(|s| ServiceRef::parse(s, namespace).map_err(|e| format!("task: mesh.{what}: {e}")))
            .collect::<Result<Vec<_>, String>>()
    };
    Ok(MeshTask {
        identity: ServiceRef::parse(&m.identity, namespace)
            .map_err(|e| format!("task: mesh identity: {e}"))?,
        mode: match pb::MeshMode::try_from(m.mode) {
            Ok(pb::MeshMode::Unspecified | pb::MeshMode::Strict) => {
                skiff_proxy::config::Mode::Strict
            }
            Ok(pb::MeshMode::Permissive) => skiff_proxy::config::Mode::Permissive,
            Err(_) => {
                return Err(format!(
                    "task: mesh mode {} is one this agent does not know; upgrade it",
                    m.mode
                ));
            }
        },
        allow_from: refs("allow_from", &m.allow_from)?,
        upstreams: refs("upstreams", &m.upstreams)?,
        request_stats: m.request_stats,
    })
}

/// A plain absolute path: no empty, `.` or `..` components, not `/` itself.
fn plain_abs(path: &str) -> bool {
    path.len() > 1
        && path.len() <= 4096
        && path.starts_with('/')
        && !path.contains('\0')
        && path[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

fn volume(v: pb::VolumeTask) -> Result<VolumeTask, String> {
    skiff_common::validate_name("volume", &v.name)
        .map_err(|e| format!("task: volume: {}", e.message))?;
    let kind = match pb::VolumeType::try_from(v.r#type) {
        Ok(pb::VolumeType::Unspecified | pb::VolumeType::Ephemeral) => VolumeKind::Ephemeral,
        Ok(pb::VolumeType::Named) => VolumeKind::Named,
        Ok(pb::VolumeType::Host) => {
            if !plain_abs(&v.host_path) {
                return Err(format!(
                    "task: volume {}: {:?} is not a plain absolute path",
                    v.name, v.host_path
                ));
            }
            VolumeKind::Host(v.host_path)
        }
        Ok(pb::VolumeType::Tmpfs) => {
            VolumeKind::Tmpfs(if v.size == 0 { DEFAULT_TMPFS } else { v.size })
        }
        Err(_) => {
            return Err(format!(
                "task: volume {}: a type this agent does not know; upgrade it",
                v.name
            ));
        }
    };
    Ok(VolumeTask { name: v.name, kind })
}

fn container(c: pb::ContainerTask, volumes: &[VolumeTask]) -> Result<ContainerTask, String> {
    skiff_common::validate_name("container", &c.name)
        .map_err(|e| format!("task: container: {}", e.message))?;
    if c.image.is_empty() {
        return Err(format!("task: container {} has no image", c.name));
    }
    let resources = c.resources.unwrap_or_default();
    let devices = c
        .devices
        .iter()
        .map(|d| {
            let access = skiff_runtime::devices::parse_access(&d.permissions).ok_or_else(|| {
                format!("task: device {}: permissions {:?}", d.path, d.permissions)
            })?;
            Ok((d.path.clone(), access))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mounts = c
        .mounts
        .iter()
        .map(|m| {
            if !volumes.iter().any(|v| v.name == m.volume) {
                return Err(format!(
                    "task: container {}: mounts volume {:?}, which the task does not declare",
                    c.name, m.volume
                ));
            }
            if !plain_abs(&m.path) {
                return Err(format!(
                    "task: container {}: mount path {:?} is not a plain absolute path",
                    c.name, m.path
                ));
            }
            Ok(MountTask {
                volume: m.volume.clone(),
                path: m.path.clone(),
                read_only: m.read_only,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let lifecycle = match pb::ContainerLifecycle::try_from(c.lifecycle) {
        Ok(pb::ContainerLifecycle::Init) => Lifecycle::Init,
        Ok(pb::ContainerLifecycle::Sidecar) => Lifecycle::Sidecar,
        Ok(pb::ContainerLifecycle::Unspecified | pb::ContainerLifecycle::Main) => Lifecycle::Main,
        Err(_) => {
            return Err(format!(
                "task: container {}: a lifecycle this agent does not know; upgrade it",
                c.name
            ));
        }
    };
    Ok(ContainerTask {
        name: c.name,
        lifecycle,
        image: c.image,
        entrypoint: (!c.entrypoint.is_empty()).then_some(c.entrypoint),
        args: c.args,
        env: c.env.into_iter().collect(),
        restart: match pb::RestartPolicy::try_from(c.restart) {
            Ok(pb::RestartPolicy::Never) => RestartPolicy::Never,
            Ok(pb::RestartPolicy::Always) => RestartPolicy::Always,
            // On failure is the spec's default, and the safe reading of a value unknown here.
            _ => RestartPolicy::OnFailure,
        },
        stop_signal: if c.stop_signal > 0 { c.stop_signal } else { 15 },
        stop_grace: Duration::from_millis(c.stop_grace_ms),
        limits: Limits {
            cpu: (resources.cpu > 0.0).then_some(resources.cpu),
            memory: (resources.memory > 0).then_some(resources.memory),
            pids: (resources.pids > 0).then_some(u64::from(resources.pids)),
        },
        devices,
        init: c.init,
        mounts,
    })
}

fn check(c: pb::HealthCheck) -> Result<Check, String> {
    let port = |p: u32| {
        u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("health check: port {p} is not a port"))
    };
    let kind = match c.kind {
        Some(pb::health_check::Kind::Http(h)) => CheckKind::Http {
            path: h.path,
            port: port(h.port)?,
            expected_status: u16::try_from(h.expected_status).unwrap_or(200),
        },
        Some(pb::health_check::Kind::Tcp(t)) => CheckKind::Tcp {
            port: port(t.port)?,
        },
        Some(pb::health_check::Kind::Exec(e)) => CheckKind::Exec { command: e.command },
        None => return Err("health check: a kind this agent does not know; upgrade it".into()),
    };
    Ok(Check {
        kind,
        interval: Duration::from_millis(c.interval_ms.max(100)),
        timeout: Duration::from_millis(c.timeout_ms.max(10)),
        healthy_threshold: c.healthy_threshold.max(1),
        unhealthy_threshold: c.unhealthy_threshold.max(1),
    })
}

/// The whole overlay peer set as a host gets it: shared, so handing it over costs a pointer
/// per peer, not a copy of each (a simulator of N nodes got N copies of N peers per change).
pub type Peers = Arc<[Arc<pb::OverlayPeer>]>;

/// The overlay peers one watch stream has given so far: whole, or folded from deltas
/// (`AssignedAllocations.peers_delta`, sent on streams whose request asked for them).
#[derive(Debug, Default)]
pub struct PeerSet {
    peers: BTreeMap<String, Arc<pb::OverlayPeer>>,
    /// Whether a whole set has arrived on this stream (a delta before it is refused).
    whole: bool,
}

/// At most this many peers in one set: more is a broken or hostile controller.
pub const MAX_PEERS: usize = 65_536;

impl PeerSet {
    /// Folds `msg`'s peers in (taking them out of `msg`). When they changed the set (a whole
    /// set always counts as a change) the answer is the whole set; an empty delta answers
    /// `None` (the host keeps the peers it has). A delta before any whole set, or a set past
    /// [`MAX_PEERS`], is an error (the session ends and starts again with a whole set).
    pub fn absorb(&mut self, msg: &mut pb::AssignedAllocations) -> Result<Option<Peers>, String> {
        if msg.peers_delta {
            if !self.whole {
                return Err("a peer delta before the whole peer set".into());
            }
            msg.peers_delta = false;
            if msg.peers.is_empty() && msg.peers_removed.is_empty() {
                return Ok(None);
            }
            for name in msg.peers_removed.drain(..) {
                self.peers.remove(&name);
            }
            for p in msg.peers.drain(..) {
                self.peers.insert(p.node.clone(), Arc::new(p));
            }
        } else {
            self.peers = msg
                .peers
                .drain(..)
                .map(|p| (p.node.clone(), Arc::new(p)))
                .collect();
            self.whole = true;
        }
        if self.peers.len() > MAX_PEERS {
            return Err(format!(
                "{} overlay peers, more than {MAX_PEERS}",
                self.peers.len()
            ));
        }
        Ok(Some(self.peers.values().cloned().collect()))
    }
}

/// The other nodes as WireGuard peers; entries that do not parse are skipped with a warning.
pub fn overlay_peers<'a>(list: impl IntoIterator<Item = &'a pb::OverlayPeer>) -> Vec<Peer> {
    list.into_iter()
        .filter_map(|p| {
            let parsed = (|| {
                Some(Peer {
                    node: p.node.clone(),
                    public_key: Key::from_base64(&p.public_key)?,
                    endpoint: p.endpoint.parse().ok()?,
                    subnet: p.subnet.parse().ok()?,
                })
            })();
            if parsed.is_none() {
                tracing::warn!(node = %p.node, "unusable overlay peer (key, endpoint or subnet); skipped");
            }
            parsed
        })
        .collect()
}

/// The services that have a virtual IP, as this node programs them: the ready endpoints with
/// an address, sorted; ports out of range and addresses that do not parse are left out (a
/// service whose VIP does not parse, or whose name or namespace is not a valid name, is
/// skipped with a warning).
pub fn vip_services(list: &[pb::ServiceInfo]) -> Vec<crate::net::vip::VipService> {
    list.iter()
        .filter(|s| !s.vip.is_empty())
        .filter_map(|s| {
            // Names go into the rules' comments: only what a spec allows is taken.
            let named = skiff_common::validate_name("service", &s.name).is_ok()
                && skiff_common::validate_name("namespace", &s.namespace).is_ok();
            let vip = s.vip.parse::<std::net::Ipv4Addr>();
            let (true, Ok(vip)) = (named, vip) else {
                tracing::warn!(service = %s.name, vip = %s.vip, "unusable service (name or VIP); skipped");
                return None;
            };
            let ports = s
                .ports
                .iter()
                .filter_map(|p| {
                    let port = u16::try_from(p.port).ok().filter(|p| *p > 0)?;
                    Some((port, p.protocol == pb::Protocol::Udp as i32))
                })
                .collect();
            let mut endpoints: Vec<std::net::Ipv4Addr> = s
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .filter_map(|e| e.ip.parse().ok())
                .collect();
            endpoints.sort();
            endpoints.dedup();
            Some(crate::net::vip::VipService {
                name: format!("{}/{}", s.namespace, s.name),
                vip,
                ports,
                endpoints,
            })
        })
        .collect()
}

/// The service set as the mesh sidecars route it: services with a virtual IP and valid names,
/// their TCP ports, and their ready endpoints (each marked whether it runs the mesh).
pub fn mesh_services(list: &[pb::ServiceInfo]) -> skiff_proxy::config::ServiceSet {
    use skiff_proxy::config::{Target, Upstream};
    let mut services: Vec<Upstream> = list
        .iter()
        .filter_map(|s| {
            let vip = s.vip.parse::<std::net::Ipv4Addr>().ok()?;
            let service = ServiceRef::parse(&s.name, &s.namespace).ok()?;
            let mut ports: Vec<u16> = s
                .ports
                .iter()
                .filter(|p| p.protocol != pb::Protocol::Udp as i32)
                .filter_map(|p| u16::try_from(p.port).ok().filter(|p| *p > 0))
                .collect();
            ports.sort_unstable();
            ports.dedup();
            let mut endpoints: Vec<Target> = s
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .filter_map(|e| {
                    Some(Target {
                        ip: e.ip.parse().ok()?,
                        mesh: e.mesh,
                    })
                })
                .collect();
            endpoints.sort_by_key(|t| t.ip);
            endpoints.dedup_by_key(|t| t.ip);
            Some(Upstream {
                service,
                vip,
                ports,
                endpoints,
            })
        })
        .collect();
    services.sort_by_key(|u| u.vip);
    services.dedup_by_key(|u| u.vip);
    skiff_proxy::config::ServiceSet { services }
}

/// A digest of WireGuard peers as (public key, endpoint) pairs, in order, and how many: what
/// the daemon's `WireguardReports` compares between heartbeats.
pub fn peers_digest<K: std::hash::Hash, E: std::hash::Hash>(
    peers: impl IntoIterator<Item = (K, E)>,
) -> (u64, usize) {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut n = 0;
    for (key, endpoint) in peers {
        key.hash(&mut h);
        endpoint.hash(&mut h);
        n += 1;
    }
    (h.finish(), n)
}

pub fn backend(b: Backend) -> pb::WireguardBackend {
    match b {
        Backend::Kernel => pb::WireguardBackend::Kernel,
        Backend::Userspace => pb::WireguardBackend::Userspace,
    }
}

pub fn health(h: Health) -> pb::Health {
    match h {
        Health::Starting => pb::Health::Starting,
        Health::Healthy => pb::Health::Healthy,
        Health::Unhealthy => pb::Health::Unhealthy,
    }
}

/// A report of an allocation that could not start.
pub fn failed(id: &str, reason: &str) -> pb::AllocationReport {
    pb::AllocationReport {
        id: id.to_owned(),
        state: pb::AllocationState::Failed as i32,
        reason: reason.to_owned(),
        ..Default::default()
    }
}

/// A container's state as reported: state, exit status (when it ended) and why.
pub fn container_state(s: &State) -> (pb::AllocationState, Option<i32>, String) {
    use pb::AllocationState as A;
    match s.status {
        // A restarted container says how its last run ended (an OOM kill, an exit code).
        Status::Running | Status::Restarting => (
            A::Running,
            None,
            s.exit
                .as_ref()
                .filter(|_| s.restarts > 0)
                .map(|e| format!("restarted after {}", e.describe()))
                .unwrap_or_default(),
        ),
        Status::Created => (A::Pending, None, String::new()),
        Status::Exited => match (&s.exit, &s.error) {
            (_, Some(err)) => (
                A::Failed,
                s.exit.as_ref().map(|e| e.status_code()),
                err.clone(),
            ),
            (Some(e), None) if e.code == Some(0) => (A::Exited, Some(0), String::new()),
            (Some(e), None) => (A::Failed, Some(e.status_code()), e.describe()),
            (None, None) => (A::Failed, None, "exited".into()),
        },
        Status::Failed => (
            A::Failed,
            s.exit.as_ref().map(|e| e.status_code()),
            s.error.clone().unwrap_or_else(|| "failed to start".into()),
        ),
    }
}

/// A report of an allocation from its one container's state (a container without a pod:
/// started by an agent from before groups, or its last state once stopped).
pub fn report(id: &str, s: &State) -> pb::AllocationReport {
    let (state, exit_code, reason) = container_state(s);
    pb::AllocationReport {
        id: id.to_owned(),
        state: state as i32,
        exit_code: exit_code.unwrap_or(0),
        reason,
        restarts: s.restarts,
        log_dropped_bytes: s.log_dropped_bytes,
        log_error: s.log_error.clone().unwrap_or_default(),
        ..Default::default()
    }
}

pub fn lifecycle(l: Lifecycle) -> pb::ContainerLifecycle {
    match l {
        Lifecycle::Init => pb::ContainerLifecycle::Init,
        Lifecycle::Sidecar => pb::ContainerLifecycle::Sidecar,
        Lifecycle::Main => pb::ContainerLifecycle::Main,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(image: &str) -> pb::ContainerTask {
        pb::ContainerTask {
            name: "main".into(),
            image: image.into(),
            restart: pb::RestartPolicy::Always as i32,
            stop_signal: 3,
            stop_grace_ms: 2500,
            resources: Some(pb::ContainerResources {
                cpu: 0.5,
                memory: 64 << 20,
                pids: 100,
            }),
            ..Default::default()
        }
    }

    fn alloc(task: Option<pb::Task>) -> pb::AssignedAllocation {
        pb::AssignedAllocation {
            id: "a1".into(),
            namespace: "default".into(),
            job: "web".into(),
            job_version: 2,
            task,
        }
    }

    #[test]
    fn a_task_becomes_what_the_runtime_runs() {
        let a = assigned(alloc(Some(pb::Task {
            containers: vec![container("reg/web:1")],
            ports: vec![],
            check: Some(pb::HealthCheck {
                kind: Some(pb::health_check::Kind::Tcp(pb::TcpCheck { port: 8080 })),
                interval_ms: 2000,
                timeout_ms: 500,
                healthy_threshold: 0,
                unhealthy_threshold: 3,
            }),
            ..Default::default()
        })));
        let t = a.task.expect("runnable");
        let c = &t.containers[0];
        assert_eq!(c.image, "reg/web:1");
        assert_eq!(c.entrypoint, None);
        assert_eq!(c.restart, RestartPolicy::Always);
        assert_eq!(c.stop_signal, 3);
        assert_eq!(c.stop_grace, Duration::from_millis(2500));
        assert_eq!(c.limits.memory, Some(64 << 20));
        assert_eq!(c.lifecycle, Lifecycle::Main, "unspecified reads as main");
        assert_eq!(t.network, PodNetwork::Bridge, "unspecified reads as bridge");
        let c = t.check.expect("check");
        assert_eq!(c.kind, CheckKind::Tcp { port: 8080 });
        assert_eq!(c.healthy_threshold, 1, "0 read as 1");
    }

    #[test]
    fn what_this_agent_cannot_run_is_named_not_dropped() {
        for (task, why) in [
            (None, "sent no task"),
            (
                Some(pb::Task {
                    containers: vec![container("a"), container("a")],
                    ..Default::default()
                }),
                "named twice",
            ),
            (
                Some(pb::Task {
                    containers: vec![pb::ContainerTask {
                        lifecycle: pb::ContainerLifecycle::Sidecar as i32,
                        ..container("a")
                    }],
                    ..Default::default()
                }),
                "no main container",
            ),
            (
                Some(pb::Task {
                    containers: vec![pb::ContainerTask {
                        mounts: vec![pb::VolumeMountTask {
                            volume: "data".into(),
                            path: "/data".into(),
                            read_only: false,
                        }],
                        ..container("a")
                    }],
                    ..Default::default()
                }),
                "which the task does not declare",
            ),
            (
                Some(pb::Task {
                    containers: vec![container("a")],
                    volumes: vec![pb::VolumeTask {
                        name: "data".into(),
                        r#type: pb::VolumeType::Host as i32,
                        host_path: "/srv/../etc".into(),
                        size: 0,
                    }],
                    ..Default::default()
                }),
                "not a plain absolute path",
            ),
            (
                Some(pb::Task {
                    containers: vec![container("a")],
                    network: 42,
                    ..Default::default()
                }),
                "network mode 42",
            ),
            (
                Some(pb::Task {
                    containers: vec![container("")],
                    ..Default::default()
                }),
                "no image",
            ),
            (
                Some(pb::Task {
                    containers: vec![container("a")],
                    check: Some(pb::HealthCheck::default()),
                    ..Default::default()
                }),
                "a kind this agent does not know",
            ),
            (
                Some(pb::Task {
                    containers: vec![container("a")],
                    check: Some(pb::HealthCheck {
                        kind: Some(pb::health_check::Kind::Tcp(pb::TcpCheck { port: 70000 })),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                "port 70000 is not a port",
            ),
        ] {
            let err = assigned(alloc(task)).task.expect_err(why);
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn unknown_enum_values_fall_back_to_safe_defaults() {
        let mut c = container("a");
        c.restart = 99;
        c.stop_signal = 0;
        let t = assigned(alloc(Some(pb::Task {
            containers: vec![c],
            ..Default::default()
        })))
        .task
        .expect("runnable");
        assert_eq!(t.containers[0].restart, RestartPolicy::OnFailure);
        assert_eq!(t.containers[0].stop_signal, 15);
    }

    #[test]
    fn container_states_become_reports() {
        let mut s = State::created();
        assert_eq!(report("a", &s).state, pb::AllocationState::Pending as i32);
        s.status = Status::Running;
        s.restarts = 2;
        let r = report("a", &s);
        assert_eq!(
            (r.state, r.restarts),
            (pb::AllocationState::Running as i32, 2)
        );
        s.status = Status::Failed;
        s.error = Some("no such image".into());
        let r = report("a", &s);
        assert_eq!(
            (r.state, r.reason.as_str()),
            (pb::AllocationState::Failed as i32, "no such image")
        );
    }

    fn peer(node: &str, key: &str) -> pb::OverlayPeer {
        pb::OverlayPeer {
            node: node.into(),
            subnet: "10.42.1.0/24".into(),
            public_key: key.into(),
            endpoint: "198.18.0.2:51820".into(),
        }
    }

    fn names(peers: Option<Peers>) -> Vec<(String, String)> {
        peers
            .expect("a change")
            .iter()
            .map(|p| (p.node.clone(), p.public_key.clone()))
            .collect()
    }

    #[test]
    fn peer_deltas_fold_into_the_whole_set() {
        let mut set = PeerSet::default();
        // A delta before any whole set is refused.
        let mut early = pb::AssignedAllocations {
            peers_delta: true,
            ..Default::default()
        };
        assert!(
            set.absorb(&mut early)
                .expect_err("a delta first")
                .contains("before the whole")
        );
        let mut whole = pb::AssignedAllocations {
            peers: vec![peer("n2", "k2"), peer("n3", "k3")],
            ..Default::default()
        };
        assert_eq!(names(set.absorb(&mut whole).expect("absorb")).len(), 2);
        assert!(whole.peers.is_empty(), "taken out of the message");
        // n3 re-keyed, n4 new, n2 gone.
        let mut delta = pb::AssignedAllocations {
            peers: vec![peer("n3", "k3b"), peer("n4", "k4")],
            peers_delta: true,
            peers_removed: vec!["n2".into()],
            ..Default::default()
        };
        let got = set.absorb(&mut delta).expect("absorb");
        assert!(!delta.peers_delta && delta.peers_removed.is_empty());
        assert_eq!(
            names(got),
            [("n3".into(), "k3b".into()), ("n4".into(), "k4".into())]
        );
        // An empty delta leaves the set; a whole set replaces it.
        let mut nothing = pb::AssignedAllocations {
            peers_delta: true,
            ..Default::default()
        };
        assert!(
            set.absorb(&mut nothing).expect("absorb").is_none(),
            "nothing changed: the host keeps its peers"
        );
        let mut check = pb::AssignedAllocations {
            peers: vec![peer("n5", "k5")],
            peers_delta: true,
            ..Default::default()
        };
        assert_eq!(
            names(set.absorb(&mut check).expect("absorb")).len(),
            3,
            "n3, n4 and n5"
        );
        let mut again = pb::AssignedAllocations {
            peers: vec![peer("n9", "k9")],
            ..Default::default()
        };
        assert_eq!(
            names(set.absorb(&mut again).expect("absorb")),
            [("n9".into(), "k9".into())]
        );
    }
}
