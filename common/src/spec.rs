//! The job spec: model, parsing, validation, canonical form and diff.
//!
//! A spec is parsed by [`parse_job_spec`] in three steps:
//!
//! 1. deserialize (TOML or JSON) into [`JobSpec`]; every struct rejects unknown fields and fills
//!    in the defaults of fields that were left out,
//! 2. [`JobSpec::normalize`] fills in the defaults that depend on other fields (the service name
//!    is the job name, an http check probes the service port),
//! 3. [`JobSpec::validate`] checks every rule that one field's type cannot express.
//!
//! Every error is a [`SpecError`] naming the field by its dotted path (`resources.memory`,
//! `ports[1].port`) and, when the spec came from text, the line.
//!
//! **Architecture Invariant:** a parsed spec is complete: every default is spelled out, so two
//! specs that differ only in formatting or in writing a default explicitly compare equal, and
//! [`JobSpec::to_canonical_json`] parses back to an equal spec.

mod bytesize;
mod check;
mod constraint;
mod diff;
mod encoding;
mod error;
mod locate;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use bytesize::{ByteSize, ByteSizeError};
pub use check::{Check, CheckKind};
pub use constraint::{Constraint, ConstraintError, ConstraintOp};
pub use diff::{FieldChange, diff_specs};
pub use error::SpecError;
pub use validate::{KNOWN_SIGNALS, MAX_NAME_LEN, signal_number, validate_name};

/// The largest spec text [`parse_job_spec`] accepts, in bytes.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;
/// The largest number of replicas a job may ask for.
pub const MAX_REPLICAS: u32 = 1000;
/// The largest number of cores one replica may ask for.
pub const MAX_CPU: f64 = 512.0;
/// The smallest memory limit one replica may ask for.
pub const MIN_MEMORY: ByteSize = ByteSize::mib(4);

/// The text format of a spec given to [`parse_job_spec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecFormat {
    /// TOML, the format users write.
    Toml,
    /// JSON, accepted as well; [`JobSpec::to_canonical_json`] writes it.
    Json,
    /// JSON if the first non-whitespace character is `{`, TOML otherwise.
    Auto,
}

impl SpecFormat {
    /// Resolves [`SpecFormat::Auto`] by looking at `text`; the other formats stay as they are.
    pub fn detect(self, text: &str) -> SpecFormat {
        match self {
            SpecFormat::Auto if text.trim_start().starts_with('{') => SpecFormat::Json,
            SpecFormat::Auto => SpecFormat::Toml,
            other => other,
        }
    }
}

/// One job: a group of containers run together as one allocation per replica, how many
/// replicas, their volumes and network, and how to publish and update them.
///
/// Field docs give the spec key and its default. The containers of an allocation share its
/// network namespace (one address; `127.0.0.1` between them), its IPC namespace and the volumes
/// they mount; each has its own mount and pid namespaces, cgroup and limits.
///
/// A spec with one container may be written in the shorthand form: the container's fields
/// (`image`, `command`, `args`, `env`, `restart`, `init`, `stop_signal`, `stop_grace`,
/// `resources`, `devices`) at the top level instead of a `[[containers]]` entry. It parses to
/// the general form with one main container named after the job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawJobSpec")]
pub struct JobSpec {
    /// `name`: required; `[a-z0-9-]`, unique per namespace.
    pub name: String,
    /// `namespace`: default `"default"`.
    pub namespace: String,
    /// `replicas`: default 1, at most [`MAX_REPLICAS`]; 0 keeps the job but runs nothing.
    pub replicas: u32,
    /// `[[containers]]`: at least one, at most [`MAX_CONTAINERS`], at least one of them main.
    pub containers: Vec<ContainerSpec>,
    /// `[[volumes]]`: volumes the containers mount by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// `[network]`: the allocation's network.
    pub network: Network,
    /// `[[ports]]`: named ports the workload listens on.
    pub ports: Vec<Port>,
    /// `[service]`: publishes `<service>.<namespace>.skiff.internal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
    /// `[placement]`: where replicas may run.
    pub placement: Placement,
    /// `[update]`: how a new version rolls out (absent: the defaults of [`UpdateStrategy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStrategy>,
    /// `[mesh]`: the sidecar's mTLS policy; no sidecar when absent. Not supported yet
    /// (refused at apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<Mesh>,
    /// `[disconnect]`: what a node cut off from the controllers does with the job's
    /// replicas (absent: they keep running, and the controllers replace them after the node
    /// grace, so for a while two may run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect: Option<Disconnect>,
    /// Whether the text used the shorthand form: error paths then name the top-level field
    /// (`image`), not `containers[0].image`. Never part of equality or of the canonical form.
    #[serde(skip)]
    written: Written,
}

/// How a spec was written; equal whatever it holds (see [`JobSpec`]'s `written`).
#[derive(Clone, Copy, Debug, Default)]
struct Written {
    shorthand: bool,
}

impl PartialEq for Written {
    fn eq(&self, _: &Written) -> bool {
        true
    }
}

/// The most containers one allocation may hold.
pub const MAX_CONTAINERS: usize = 16;

/// One container of an allocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// `name`: required; `[a-z0-9-]`, unique in the job.
    pub name: String,
    /// `lifecycle`: `init` (runs to completion, one after another, before the others start),
    /// `sidecar` (starts before the main containers, stops after them) or `main` (default).
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// `image`: required; a registry reference, or `oci:DIR[:TAG]`, `oci-archive:FILE`,
    /// `docker-archive:FILE`.
    pub image: String,
    /// `command`: overrides the image entrypoint when not empty.
    #[serde(default)]
    pub command: Vec<String>,
    /// `args`: overrides the image cmd when not empty.
    #[serde(default)]
    pub args: Vec<String>,
    /// `env`: added to the image's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `restart`: default `on-failure`; an init container's is `never` or `on-failure`.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// `init`: run a minimal init as PID 1 that reaps orphans and forwards signals (like
    /// `docker run --init`); default false.
    #[serde(default)]
    pub init: bool,
    /// `stop_signal`: sent first when stopping; default `SIGTERM`.
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// `stop_grace`: how long after `stop_signal` before SIGKILL; default 10s.
    #[serde(default = "default_stop_grace", with = "encoding::duration")]
    pub stop_grace: Duration,
    /// `[resources]`: this container's limits; the allocation asks for the sum.
    #[serde(default)]
    pub resources: Resources,
    /// `volumes`: the job's volumes this container mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// `[[devices]]`: host devices the container may use beyond the default set (null, zero,
    /// full, random, urandom, tty, ptmx, pts); each agent grants only those it allows
    /// (`--allow-device`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceGrant>,
}

impl ContainerSpec {
    /// A main container named `name` running `image`, every other field at its default.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            lifecycle: Lifecycle::Main,
            image: image.into(),
            command: Vec::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            restart: RestartPolicy::default(),
            init: false,
            stop_signal: default_stop_signal(),
            stop_grace: default_stop_grace(),
            resources: Resources::default(),
            volumes: Vec::new(),
            devices: Vec::new(),
        }
    }
}

/// When a container runs within its allocation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    /// Runs to successful completion before the sidecars and main containers start.
    Init,
    /// Starts before the main containers and stops after them.
    Sidecar,
    /// The allocation's workload: it is healthy when these are.
    #[default]
    Main,
}

impl std::fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lifecycle::Init => "init",
            Lifecycle::Sidecar => "sidecar",
            Lifecycle::Main => "main",
        })
    }
}

/// A volume of the job, mounted by its containers by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// `name`: `[a-z0-9-]`, unique in the job.
    pub name: String,
    /// `type`: `ephemeral` (default: lives and dies with the allocation), `named` (persists on
    /// the node across allocations of this job; placement sticks to that node while it
    /// lives), `host` (`path` under a directory the agent allows) or `tmpfs` (memory, `size`).
    #[serde(default, rename = "type")]
    pub kind: VolumeKind,
    /// `path`: for `host`, the absolute directory on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `size`: for `tmpfs`, its size (default 64Mi); counted in no container's memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
}

/// What backs a [`Volume`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    #[default]
    Ephemeral,
    Named,
    Host,
    Tmpfs,
}

impl std::fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeKind::Ephemeral => "ephemeral",
            VolumeKind::Named => "named",
            VolumeKind::Host => "host",
            VolumeKind::Tmpfs => "tmpfs",
        })
    }
}

/// Where a container sees one of the job's volumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// `name`: one of the job's `volumes`.
    pub name: String,
    /// `path`: absolute, in the container.
    pub path: String,
    /// `read_only`: default false.
    #[serde(default)]
    pub read_only: bool,
}

/// Fencing (Nomad's `disconnect.stop_on_client_after`): the replicas of a job that must
/// never run twice at once (a singleton, a lock holder, a writer to shared storage).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disconnect {
    /// `stop_after`: required; a node whose last heartbeat the controllers answered was sent
    /// longer ago than this stops the job's replicas (stop signal, then SIGKILL after
    /// `stop_grace`), even with its agent down; the controllers replace them only once that
    /// stop is certain to be over, and the node starts them again only when the controllers
    /// confirm they are still its own. Between 1s and 24h.
    #[serde(with = "encoding::duration")]
    pub stop_after: Duration,
}

/// The allocation's network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// `mode`: `bridge` (default: an address of its own on the overlay), `host` (the node's
    /// network namespace; ports must be free on the node) or `none` (loopback only).
    #[serde(default)]
    pub mode: NetworkMode,
}

/// See [`Network`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    #[default]
    Bridge,
    Host,
    None,
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetworkMode::Bridge => "bridge",
            NetworkMode::Host => "host",
            NetworkMode::None => "none",
        })
    }
}

/// A spec as written: the general form's fields and the shorthand's, before
/// [`RawJobSpec::into_spec`] folds the shorthand into one container.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJobSpec {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default = "default_replicas", deserialize_with = "encoding::u32_int")]
    replicas: u32,
    #[serde(default)]
    containers: Vec<ContainerSpec>,
    #[serde(default)]
    volumes: Vec<Volume>,
    #[serde(default)]
    network: Network,
    #[serde(default)]
    ports: Vec<Port>,
    #[serde(default)]
    service: Option<Service>,
    #[serde(default)]
    placement: Placement,
    #[serde(default)]
    update: Option<UpdateStrategy>,
    #[serde(default)]
    mesh: Option<Mesh>,
    #[serde(default)]
    disconnect: Option<Disconnect>,
    // The shorthand: one container's fields at the top level.
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    args: Option<Vec<String>>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    restart: Option<RestartPolicy>,
    #[serde(default)]
    init: Option<bool>,
    #[serde(default)]
    stop_signal: Option<String>,
    #[serde(default, deserialize_with = "encoding::opt_duration")]
    stop_grace: Option<Duration>,
    #[serde(default)]
    resources: Option<Resources>,
    #[serde(default)]
    devices: Option<Vec<DeviceGrant>>,
}

impl RawJobSpec {
    /// The spec in its general form. The shorthand and `[[containers]]` do not mix; a
    /// container field at the top level without `image` is an error naming it.
    fn into_spec(self) -> Result<JobSpec, SpecError> {
        let shorthand_fields = [
            ("command", self.command.is_some()),
            ("args", self.args.is_some()),
            ("env", self.env.is_some()),
            ("restart", self.restart.is_some()),
            ("init", self.init.is_some()),
            ("stop_signal", self.stop_signal.is_some()),
            ("stop_grace", self.stop_grace.is_some()),
            ("resources", self.resources.is_some()),
            ("devices", self.devices.is_some()),
        ];
        let mut containers = self.containers;
        let shorthand = self.image.is_some();
        match self.image {
            Some(image) => {
                if !containers.is_empty() {
                    return Err(SpecError::new(
                        "image",
                        "a top-level image is the one-container shorthand: with [[containers]], \
                         give each container its image",
                    ));
                }
                containers.push(ContainerSpec {
                    name: self.name.clone(),
                    lifecycle: Lifecycle::Main,
                    image,
                    command: self.command.unwrap_or_default(),
                    args: self.args.unwrap_or_default(),
                    env: self.env.unwrap_or_default(),
                    restart: self.restart.unwrap_or_default(),
                    init: self.init.unwrap_or_default(),
                    stop_signal: self.stop_signal.unwrap_or_else(default_stop_signal),
                    stop_grace: self.stop_grace.unwrap_or_else(default_stop_grace),
                    resources: self.resources.unwrap_or_default(),
                    volumes: Vec::new(),
                    devices: self.devices.unwrap_or_default(),
                });
            }
            None => {
                if let Some((field, _)) = shorthand_fields.iter().find(|(_, set)| *set) {
                    let hint = if containers.is_empty() {
                        "it belongs to a container: add `image` (one container) or give it in \
                         [[containers]]"
                    } else {
                        "with [[containers]], set it on each container"
                    };
                    return Err(SpecError::new(*field, hint));
                }
                if containers.is_empty() {
                    return Err(SpecError::new(
                        "image",
                        "missing required field (give `image` for one container, or \
                         [[containers]])",
                    ));
                }
            }
        }
        Ok(JobSpec {
            name: self.name,
            namespace: self.namespace,
            replicas: self.replicas,
            containers,
            volumes: self.volumes,
            network: self.network,
            ports: self.ports,
            service: self.service,
            placement: self.placement,
            update: self.update,
            mesh: self.mesh,
            disconnect: self.disconnect,
            written: Written { shorthand },
        })
    }
}

impl TryFrom<RawJobSpec> for JobSpec {
    type Error = SpecError;

    fn try_from(raw: RawJobSpec) -> Result<JobSpec, SpecError> {
        raw.into_spec()
    }
}

/// What happens when a replica's process exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart; the replica stays exited.
    Never,
    /// Restart when it exits with a non-zero status or is killed by a signal.
    #[default]
    OnFailure,
    /// Always restart.
    Always,
}

/// Limits of one replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `cpu`: cores, default 0.1; more than 0, at most [`MAX_CPU`].
    #[serde(default = "default_cpu", deserialize_with = "encoding::cores")]
    pub cpu: f64,
    /// `memory`: default 64Mi, at least [`MIN_MEMORY`].
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// `pids`: the most processes and threads, default 256, at least 1.
    #[serde(default = "default_pids", deserialize_with = "encoding::u32_int")]
    pub pids: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu: default_cpu(),
            memory: default_memory(),
            pids: default_pids(),
        }
    }
}

/// A named port the workload listens on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// `name`: `[a-z0-9-]`, unique in the job; named by `service.port` and SRV records.
    pub name: String,
    /// `port`: 1 to 65535.
    #[serde(deserialize_with = "encoding::u16_int")]
    pub port: u16,
    /// `protocol`: default `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// `host_port`: also published on the node's advertise address at this port; the
    /// scheduler puts at most one allocation using it on a node.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "encoding::opt_u16_int"
    )]
    pub host_port: Option<u16>,
}

/// The transport protocol of a [`Port`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// HTTP/1 or HTTP/2 over TCP: the mesh sidecar counts requests (status class, latency).
    Http,
}

impl Protocol {
    /// Whether it is carried over TCP.
    pub fn is_tcp(self) -> bool {
        self != Protocol::Udp
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Http => "http",
        })
    }
}

/// Publishes the job in DNS and to the mesh.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// `name`: defaults to the job name (filled in on parse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `port`: the name of one of the job's `ports`.
    pub port: String,
    /// `tags`: free-form labels, no whitespace.
    #[serde(default)]
    pub tags: Vec<String>,
    /// `check`: the health check gating endpoints; none means healthy once running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
}

/// A host device a job asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceGrant {
    /// `path`: the device on the host, also its path in the container (`/dev/...`).
    pub path: String,
    /// `permissions`: `r`, `w`, `m` (mknod) letters; default `rw`.
    #[serde(default = "default_device_permissions")]
    pub permissions: String,
}

fn default_device_permissions() -> String {
    "rw".to_owned()
}

/// Where replicas may run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// `constraints`: all must match a node's labels.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// `spread`: put replicas on distinct nodes where possible; default false.
    #[serde(default)]
    pub spread: bool,
}

/// How a new version of the job rolls out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateStrategy {
    /// `max_surge`: replicas above `replicas` during a rollout, a count or a percentage of
    /// `replicas` (rounded up); default 1.
    #[serde(default = "default_max_surge")]
    pub max_surge: ReplicaCount,
    /// `max_unavailable`: replicas below `replicas` during a rollout, a count or a percentage
    /// (rounded down); default 0. Not both 0.
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: ReplicaCount,
    /// `min_healthy`: how long a new replica must stay healthy to count; default 5s.
    #[serde(default = "default_min_healthy", with = "encoding::duration")]
    pub min_healthy: Duration,
    /// `healthy_deadline`: a new replica not healthy for `min_healthy` this long after it was
    /// placed fails the rollout; default 3m.
    #[serde(default = "default_healthy_deadline", with = "encoding::duration")]
    pub healthy_deadline: Duration,
    /// `progress_deadline`: a rollout that makes no progress for this long fails; default 5m.
    #[serde(default = "default_progress_deadline", with = "encoding::duration")]
    pub progress_deadline: Duration,
    /// `canary`: replicas of the new version started next to the old ones (which all keep
    /// running) before the rollout goes on; default 0.
    #[serde(default, deserialize_with = "encoding::u32_int")]
    pub canary: u32,
    /// `auto_promote`: go on past healthy canaries without `skiff rollout promote`; default
    /// false.
    #[serde(default)]
    pub auto_promote: bool,
    /// `auto_rollback`: go back to the last good version when a rollout fails; default true.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    /// `drain_delay`: how long a replica stays out of service discovery (DNS, virtual IPs,
    /// the mesh), still running, before its stop signal; default 5s.
    #[serde(default = "default_drain_delay", with = "encoding::duration")]
    pub drain_delay: Duration,
    /// `[update.analysis]`: compare the canaries' requests with the old version's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
}

impl Default for UpdateStrategy {
    fn default() -> Self {
        UpdateStrategy {
            max_surge: default_max_surge(),
            max_unavailable: default_max_unavailable(),
            min_healthy: default_min_healthy(),
            healthy_deadline: default_healthy_deadline(),
            progress_deadline: default_progress_deadline(),
            canary: 0,
            auto_promote: false,
            auto_rollback: true,
            drain_delay: default_drain_delay(),
            analysis: None,
        }
    }
}

/// The metric gate of a canary: the new version's requests (from its sidecars) against the
/// old version's over the same time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    /// `max_error_rate_increase`: how much higher the share of 5xx answers may be, in
    /// percentage points (0 to 100); default 1.
    #[serde(default = "default_max_error_rate_increase")]
    pub max_error_rate_increase: f64,
    /// `max_p99_increase`: how much higher the p99 latency may be; default 100ms.
    #[serde(default = "default_max_p99_increase", with = "encoding::duration")]
    pub max_p99_increase: Duration,
    /// `interval`: how long the canaries are watched; default 30s.
    #[serde(default = "default_analysis_interval", with = "encoding::duration")]
    pub interval: Duration,
    /// `min_requests`: requests each version must have answered for a verdict; default 50.
    #[serde(
        default = "default_min_requests",
        deserialize_with = "encoding::u32_int"
    )]
    pub min_requests: u32,
}

/// A number of replicas: a count, or a percentage of the job's `replicas` (`"25%"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaCount {
    Count(u32),
    Percent(u32),
}

impl ReplicaCount {
    /// The count for a job of `replicas`: a percentage rounded up (`up`) or down.
    pub fn resolve(self, replicas: u32, up: bool) -> u32 {
        match self {
            ReplicaCount::Count(n) => n,
            ReplicaCount::Percent(p) => {
                let x = u64::from(replicas) * u64::from(p);
                let n = if up { x.div_ceil(100) } else { x / 100 };
                u32::try_from(n).unwrap_or(u32::MAX)
            }
        }
    }
}

impl std::fmt::Display for ReplicaCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaCount::Count(n) => write!(f, "{n}"),
            ReplicaCount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for ReplicaCount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ReplicaCount::Count(n) => s.serialize_u32(*n),
            ReplicaCount::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for ReplicaCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(encoding::ReplicaCountVisitor)
    }
}

/// The sidecar's mTLS policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mesh {
    /// `upstreams`: services this job calls, `name` or `name.namespace`.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// `allow_from`: services allowed to call this one, `name` or `name.namespace`; empty:
    /// any workload of the cluster (with its mesh certificate).
    #[serde(default)]
    pub allow_from: Vec<String>,
    /// `mode`: `strict` (default: callers must use mutual TLS) or `permissive` (plain-text
    /// callers are let through too, for a migration into the mesh).
    #[serde(default, skip_serializing_if = "MeshMode::is_strict")]
    pub mode: MeshMode,
}

/// How a sidecar treats plain-text callers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshMode {
    /// Mutual TLS only.
    #[default]
    Strict,
    /// Mutual TLS or plain text.
    Permissive,
}

impl MeshMode {
    fn is_strict(&self) -> bool {
        *self == MeshMode::Strict
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MeshMode::Strict => "strict",
            MeshMode::Permissive => "permissive",
        }
    }
}

fn default_namespace() -> String {
    "default".to_owned()
}
fn default_replicas() -> u32 {
    1
}
fn default_stop_signal() -> String {
    "SIGTERM".to_owned()
}
fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_cpu() -> f64 {
    0.1
}
fn default_memory() -> ByteSize {
    ByteSize::mib(64)
}
fn default_pids() -> u32 {
    256
}
fn default_max_surge() -> ReplicaCount {
    ReplicaCount::Count(1)
}
fn default_max_unavailable() -> ReplicaCount {
    ReplicaCount::Count(0)
}
fn default_healthy_deadline() -> Duration {
    Duration::from_secs(180)
}
fn default_drain_delay() -> Duration {
    Duration::from_secs(5)
}
fn default_max_error_rate_increase() -> f64 {
    1.0
}
fn default_max_p99_increase() -> Duration {
    Duration::from_millis(100)
}
fn default_analysis_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_min_requests() -> u32 {
    50
}
fn default_min_healthy() -> Duration {
    Duration::from_secs(5)
}
fn default_progress_deadline() -> Duration {
    Duration::from_secs(300)
}
fn default_true() -> bool {
    true
}

impl JobSpec {
    /// A spec with the given name and one main container (named after the job) running
    /// `image`, every other field at its default.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> JobSpec {
        let name = name.into();
        JobSpec {
            containers: vec![ContainerSpec::new(name.clone(), image)],
            name,
            namespace: default_namespace(),
            replicas: default_replicas(),
            volumes: Vec::new(),
            network: Network::default(),
            ports: Vec::new(),
            service: None,
            placement: Placement::default(),
            update: None,
            mesh: None,
            disconnect: None,
            written: Written { shorthand: true },
        }
    }

    /// The first main container: in the shorthand form, the only one. Every valid spec has one.
    pub fn main(&self) -> Option<&ContainerSpec> {
        self.containers
            .iter()
            .find(|c| c.lifecycle == Lifecycle::Main)
    }

    /// The container named `name`.
    pub fn container(&self, name: &str) -> Option<&ContainerSpec> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// What one replica asks of a node: the sum of its containers' resources.
    pub fn total_resources(&self) -> Resources {
        self.containers.iter().fold(
            Resources {
                cpu: 0.0,
                memory: ByteSize::bytes(0),
                pids: 0,
            },
            |sum, c| Resources {
                cpu: sum.cpu + c.resources.cpu,
                memory: ByteSize::bytes(
                    sum.memory
                        .as_u64()
                        .saturating_add(c.resources.memory.as_u64()),
                ),
                pids: sum.pids.saturating_add(c.resources.pids),
            },
        )
    }

    /// The ports the allocation takes on its node: every `host_port`, and in host network
    /// mode every port (the allocation listens on the node itself).
    pub fn node_ports(&self) -> Vec<(u16, Protocol)> {
        let mut out: Vec<(u16, Protocol)> = self
            .ports
            .iter()
            .filter_map(|p| match self.network.mode {
                NetworkMode::Host => Some((p.host_port.unwrap_or(p.port), p.protocol)),
                _ => p.host_port.map(|h| (h, p.protocol)),
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The job's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `namespace/name`, unique in a cluster.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The name the job is published under, if it has a service.
    pub fn service_name(&self) -> Option<&str> {
        self.service
            .as_ref()
            .map(|s| s.name.as_deref().unwrap_or(&self.name))
    }

    /// The service name in the job's workload identity (`spiffe://skiff/ns/NS/svc/NAME`):
    /// the service it publishes, or for a job in the mesh that publishes none (a client),
    /// its own name. `None`: the job has no identity.
    pub fn workload_name(&self) -> Option<&str> {
        self.service_name()
            .or_else(|| self.mesh.as_ref().map(|_| self.name.as_str()))
    }

    /// The port named `name`.
    pub fn port(&self, name: &str) -> Option<&Port> {
        self.ports.iter().find(|p| p.name == name)
    }

    /// Fills in the defaults that depend on other fields: the service name (the job name) and
    /// the port of an http check (the service port). [`parse_job_spec`] calls it; call it on a
    /// spec built in code before comparing it with a parsed one.
    pub fn normalize(&mut self) {
        let job_name = &self.name;
        if let Some(service) = &mut self.service {
            if service.name.is_none() {
                service.name = Some(job_name.clone());
            }
            if let Some(Check {
                kind: CheckKind::Http { port, .. },
                ..
            }) = &mut service.check
                && port.is_none()
            {
                *port = Some(service.port.clone());
            }
        }
    }

    /// Checks every rule of the spec; the error names the first offending field.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate::validate(self).map_err(|mut e| {
            // The shorthand's one container was written at the top level.
            if self.written.shorthand
                && let Some(rest) = e.field.strip_prefix("containers[0].")
            {
                e.field = rest.to_owned();
            }
            e
        })
    }

    /// The complete spec as compact JSON: every field, in a fixed order, maps sorted by key.
    /// Parsing it back gives an equal spec.
    pub fn to_canonical_json(&self) -> String {
        // Serializing these types cannot fail: every map has string keys and no custom
        // serializer returns an error.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Spec fields that are parsed and validated but that nothing implements yet. A spec that uses
/// one is refused by [`parse_job_spec`] with "not supported yet: FIELD", never accepted and
/// ignored; the issue that implements a field removes it from here.
pub const NOT_SUPPORTED_YET: &[&str] = &[];

impl JobSpec {
    /// How a new version rolls out: the `[update]` section, or its defaults.
    pub fn update_strategy(&self) -> UpdateStrategy {
        self.update.clone().unwrap_or_default()
    }

    /// The first field of [`NOT_SUPPORTED_YET`] this spec uses.
    pub fn unsupported_field(&self) -> Option<&'static str> {
        // Every field is implemented; a field added before its implementation is named in
        // NOT_SUPPORTED_YET and matched here.
        NOT_SUPPORTED_YET.iter().copied().find(|_| false)
    }
}

/// Parses a spec from `text`, validates it and refuses the fields nothing implements yet
/// ([`NOT_SUPPORTED_YET`]). The result is complete (see [`JobSpec::normalize`]).
pub fn parse_job_spec(text: &str, format: SpecFormat) -> Result<JobSpec, SpecError> {
    let spec = parse_job_spec_unchecked(text, format)?;
    if let Some(field) = spec.unsupported_field() {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        return Err(SpecError {
            // Named in the message ("not supported yet: update"), so not as a prefix too.
            field: String::new(),
            line: locate::line_of(text, format.detect(text), field),
            message: format!("not supported yet: {field}"),
        });
    }
    Ok(spec)
}

/// [`parse_job_spec`] without the refusal of fields not supported yet: what the spec would
/// be. For tests and tools that look at a spec without running it.
pub fn parse_job_spec_unchecked(text: &str, format: SpecFormat) -> Result<JobSpec, SpecError> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(SpecError::new(
            "",
            format!(
                "spec is {} bytes, more than the limit of {MAX_SPEC_BYTES}",
                text.len()
            ),
        ));
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let format = format.detect(text);
    let raw: RawJobSpec = match format {
        SpecFormat::Json => error::from_json(text)?,
        _ => error::from_toml(text)?,
    };
    let locate = |e: SpecError| e.located(|path| locate::line_of(text, format, path));
    let mut spec = raw.into_spec().map_err(locate)?;
    spec.normalize();
    spec.validate().map_err(locate)?;
    Ok(spec)
}
