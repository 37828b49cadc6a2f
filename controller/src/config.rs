//! The controller's configuration: TOML file (`--config`), then `SKIFF_*` environment
//! variables, then command-line flags, each overriding the one before; validated before any
//! socket is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::raft::RaftSettings;
use crate::state::ClusterSettings;

/// Command-line flags (each also readable from a `SKIFF_*` environment variable).
#[derive(Debug, Default, Parser)]
#[command(
    name = "skiff-controller",
    version,
    about = "A member of Skiff's replicated control plane"
)]
pub struct Args {
    /// TOML config file; flags and environment override it.
    #[arg(long, env = "SKIFF_CONFIG")]
    pub config: Option<PathBuf>,
    /// This member's id (a positive integer, never reused).
    #[arg(long, env = "SKIFF_ID")]
    pub id: Option<u64>,
    /// Where this member keeps its log, snapshots and identity.
    #[arg(long, env = "SKIFF_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC address (API and Raft traffic) [default: 127.0.0.1:7700].
    #[arg(long, env = "SKIFF_RPC_ADDR")]
    pub rpc_addr: Option<SocketAddr>,
    /// HTTP address for /metrics, /healthz, /readyz [default: 127.0.0.1:7780].
    #[arg(long, env = "SKIFF_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Start a new one-member cluster (first start only).
    #[arg(long, env = "SKIFF_BOOTSTRAP", conflicts_with = "join")]
    pub bootstrap: bool,
    /// Join the cluster through the gRPC address of any member (first start only).
    #[arg(long, env = "SKIFF_JOIN")]
    pub join: Option<String>,
    /// The join token (`skiff token create --role controller`) a new member enrolls with:
    /// it pins the cluster CA and pays for this member's first certificate.
    #[arg(long, env = "SKIFF_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Extra names (IP addresses or DNS names) for this member's server certificate, beyond
    /// its gRPC address, 127.0.0.1, ::1 and localhost. Repeatable.
    #[arg(long = "tls-san", env = "SKIFF_TLS_SANS", value_delimiter = ',')]
    pub tls_sans: Vec<String>,
    /// Lifetime of the node and member certificates this member issues, e.g. 7d [default: 7d].
    /// They are renewed at two thirds of it.
    #[arg(long, env = "SKIFF_CERT_TTL")]
    pub cert_ttl: Option<String>,
    /// Leader heartbeat interval in ms [default: 100].
    #[arg(long, env = "SKIFF_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Election timeout range in ms, as MIN-MAX [default: 400-800].
    #[arg(long, env = "SKIFF_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<String>,
    /// Snapshot and compact the log every N entries [default: 10000].
    #[arg(long, env = "SKIFF_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// Log entries kept behind a snapshot [default: 1000].
    #[arg(long, env = "SKIFF_KEEP_AFTER_SNAPSHOT")]
    pub keep_after_snapshot: Option<u64>,
    /// A node not heard from for this long is marked down and its allocations are moved,
    /// e.g. 10s [default: 7s: a node heartbeats every second and reconnects within about
    /// 2.5 s of a network blip's end, so a 3 s blip is survived with a second to spare].
    #[arg(long, env = "SKIFF_NODE_GRACE")]
    pub node_grace: Option<String>,
    /// Stopped allocations whose process is gone are forgotten after this long, e.g. 1h
    /// [default: 1h].
    #[arg(long, env = "SKIFF_GC_AFTER")]
    pub gc_after: Option<String>,
    /// Versions kept per job for rollback and history; the latest, the stable one, the
    /// current rollout's and any still running are always kept [default: 10].
    #[arg(long, env = "SKIFF_KEEP_VERSIONS")]
    pub keep_versions: Option<usize>,
    /// The network nodes' pod subnets (/24 each) are taken from [default: 10.42.0.0/16].
    /// Cluster-wide: fixed at bootstrap; a member given another value refuses to start.
    #[arg(long, env = "SKIFF_CLUSTER_CIDR")]
    pub cluster_cidr: Option<String>,
    /// The prefix length of each node's pod subnet, 16 to 30 [default: 24, 253 addresses].
    /// Cluster-wide: fixed at bootstrap; a member given another value refuses to start.
    #[arg(long, env = "SKIFF_NODE_SUBNET_PREFIX")]
    pub node_subnet_prefix: Option<u8>,
    /// The network services' virtual IPs are taken from [default: 10.43.0.0/16]; it must not
    /// overlap the cluster CIDR. Cluster-wide: fixed at bootstrap; a member given another
    /// value refuses to start.
    #[arg(long, env = "SKIFF_SERVICE_CIDR")]
    pub service_cidr: Option<String>,
}

/// The config file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub id: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub rpc_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    #[serde(default)]
    pub bootstrap: bool,
    pub join: Option<String>,
    pub join_token: Option<String>,
    #[serde(default)]
    pub tls_sans: Vec<String>,
    pub cert_ttl: Option<String>,
    pub raft: Option<RaftSettings>,
    pub node_grace: Option<String>,
    pub gc_after: Option<String>,
    pub keep_versions: Option<usize>,
    pub cluster_cidr: Option<String>,
    pub node_subnet_prefix: Option<u8>,
    pub service_cidr: Option<String>,
}

/// How a member that has never run forms or joins a cluster.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Formation {
    Bootstrap,
    Join(String),
    /// Neither: wait to be added by an operator (`skiff cluster add`).
    Wait,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: u64,
    pub data_dir: PathBuf,
    /// `None`: take it from the data dir, or the default for a new member.
    pub rpc_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub formation: Formation,
    pub raft: RaftSettings,
    /// A node not heard from for this long is down.
    pub node_grace: std::time::Duration,
    /// Stopped allocations are forgotten after this long.
    pub gc_after: std::time::Duration,
    /// Versions kept per job.
    pub keep_versions: usize,
    /// Cluster-wide settings given on this start (flag, env or file); `None` where not given.
    pub cluster: ClusterFlags,
    /// The token a new (joining) member enrolls with.
    pub join_token: Option<skiff_tls::JoinToken>,
    /// Extra server certificate names.
    pub tls_sans: Vec<String>,
    /// Lifetime of the node and member certificates this member issues.
    pub cert_ttl: std::time::Duration,
}

/// The cluster-wide settings as given to one member at one start. They take effect only at
/// bootstrap (the first leader commits them, defaults for what was not given); afterwards
/// they live in the replicated state, and a member given a value that differs refuses to run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterFlags {
    pub cluster_cidr: Option<String>,
    pub node_subnet_prefix: Option<u8>,
    pub service_cidr: Option<String>,
}

impl ClusterFlags {
    /// What a new cluster is bootstrapped with.
    pub fn for_bootstrap(&self) -> ClusterSettings {
        ClusterSettings {
            cluster_cidr: self
                .cluster_cidr
                .clone()
                .unwrap_or_else(|| DEFAULT_CLUSTER_CIDR.to_owned()),
            node_subnet_prefix: self
                .node_subnet_prefix
                .unwrap_or(DEFAULT_NODE_SUBNET_PREFIX),
            service_cidr: self
                .service_cidr
                .clone()
                .unwrap_or_else(|| crate::state::DEFAULT_SERVICE_CIDR.to_owned()),
        }
    }

    /// Why these flags conflict with the cluster's settings, naming both values; `None` when
    /// every value given matches.
    pub fn conflict(&self, cluster: &ClusterSettings) -> Option<String> {
        let mut out = Vec::new();
        if let Some(c) = &self.cluster_cidr
            && *c != cluster.cluster_cidr
        {
            out.push(format!(
                "--cluster-cidr {c}, but the cluster was bootstrapped with {}",
                cluster.cluster_cidr
            ));
        }
        if let Some(p) = self.node_subnet_prefix
            && p != cluster.node_subnet_prefix
        {
            out.push(format!(
                "--node-subnet-prefix {p}, but the cluster was bootstrapped with {}",
                cluster.node_subnet_prefix
            ));
        }
        if let Some(c) = &self.service_cidr
            && *c != cluster.service_cidr
        {
            out.push(format!(
                "--service-cidr {c}, but the cluster was bootstrapped with {}",
                cluster.service_cidr
            ));
        }
        (!out.is_empty()).then(|| {
            format!(
                "{} (cluster-wide settings are fixed at bootstrap: drop the flag, or give the \
                 cluster's value; `skiff cluster info` shows them)",
                out.join("; ")
            )
        })
    }
}

/// The pod network when none is given at bootstrap.
pub const DEFAULT_CLUSTER_CIDR: &str = "10.42.0.0/16";
/// A node's pod subnet prefix when none is given at bootstrap (253 addresses).
pub const DEFAULT_NODE_SUBNET_PREFIX: u8 = 24;

/// A configuration problem, named precisely.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0} is required (flag --{0}, env SKIFF_{1}, or `{2}` in the config file)")]
    Missing(&'static str, &'static str, &'static str),
    #[error("id: must be a positive integer")]
    ZeroId,
    #[error("{field}: {addr} is not an address other members can reach; give a specific IP")]
    Unspecified {
        field: &'static str,
        addr: SocketAddr,
    },
    #[error("cluster-cidr: {0:?} is not an IPv4 network of prefix /8 to /24 (e.g. 10.42.0.0/16)")]
    ClusterCidr(String),
    #[error(
        "node-subnet-prefix: /{prefix} must be 16 to 30 and no shorter than the cluster CIDR {cidr}"
    )]
    NodeSubnetPrefix { prefix: u8, cidr: String },
    #[error("service-cidr: {0}")]
    ServiceCidr(String),
    #[error("node-grace: {0:?} is not a duration of at least 1s (e.g. 10s)")]
    NodeGrace(String),
    #[error("gc-after: {0:?} is not a duration of at least 1s (e.g. 1h)")]
    GcAfter(String),
    #[error("keep-versions: {0} is not between 1 and 10000")]
    KeepVersions(usize),
    #[error("election-timeout-ms: {0:?} is not MIN-MAX in milliseconds (e.g. 400-800)")]
    ElectionRange(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("{0}")]
    Tls(String),
}

/// Node and member certificates live a week unless `--cert-ttl` says otherwise.
pub const DEFAULT_CERT_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

impl Config {
    /// Builds the configuration from flags, environment (through clap) and the config file.
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let id = args
            .id
            .or(file.id)
            .ok_or(ConfigError::Missing("id", "ID", "id"))?;
        if id == 0 {
            return Err(ConfigError::ZeroId);
        }
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .ok_or(ConfigError::Missing("data-dir", "DATA_DIR", "data_dir"))?;
        let rpc_addr = args.rpc_addr.or(file.rpc_addr);
        let http_addr = args.http_addr.or(file.http_addr);
        for (field, addr) in [("rpc-addr", rpc_addr), ("http-addr", http_addr)] {
            if let Some(a) = addr
                && a.ip().is_unspecified()
                && field == "rpc-addr"
            {
                return Err(ConfigError::Unspecified { field, addr: a });
            }
        }
        let formation = if args.bootstrap || (file.bootstrap && args.join.is_none()) {
            Formation::Bootstrap
        } else if let Some(j) = args.join.or(file.join) {
            Formation::Join(j)
        } else {
            Formation::Wait
        };
        let mut raft = file.raft.unwrap_or_default();
        if let Some(v) = args.heartbeat_ms {
            raft.heartbeat_ms = v;
        }
        if let Some(r) = args.election_timeout_ms {
            let (min, max) = r
                .split_once('-')
                .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
                .ok_or_else(|| ConfigError::ElectionRange(r.clone()))?;
            raft.election_timeout_min_ms = min;
            raft.election_timeout_max_ms = max;
        }
        if let Some(v) = args.snapshot_every {
            raft.snapshot_every = v;
        }
        if let Some(v) = args.keep_after_snapshot {
            raft.keep_after_snapshot = v;
        }
        validate_raft(&raft)?;
        let node_grace = seconds_or_more(
            args.node_grace.or(file.node_grace),
            crate::reconcile::DEFAULT_NODE_GRACE.as_secs(),
        )
        .map_err(ConfigError::NodeGrace)?;
        let gc_after =
            seconds_or_more(args.gc_after.or(file.gc_after), 3600).map_err(ConfigError::GcAfter)?;
        let keep_versions = match args.keep_versions.or(file.keep_versions) {
            None => 10,
            Some(n) if (1..=10_000).contains(&n) => n,
            Some(n) => return Err(ConfigError::KeepVersions(n)),
        };
        let cluster = ClusterFlags {
            cluster_cidr: args.cluster_cidr.or(file.cluster_cidr),
            node_subnet_prefix: args.node_subnet_prefix.or(file.node_subnet_prefix),
            service_cidr: args.service_cidr.or(file.service_cidr),
        };
        let bootstrap = cluster.for_bootstrap();
        let Some((_, cluster_prefix)) = crate::state::parse_cidr(&bootstrap.cluster_cidr) else {
            return Err(ConfigError::ClusterCidr(bootstrap.cluster_cidr));
        };
        if !(16..=30).contains(&bootstrap.node_subnet_prefix)
            || u32::from(bootstrap.node_subnet_prefix) < cluster_prefix
        {
            return Err(ConfigError::NodeSubnetPrefix {
                prefix: bootstrap.node_subnet_prefix,
                cidr: bootstrap.cluster_cidr,
            });
        }
        crate::state::check_service_cidr(&bootstrap.service_cidr, &bootstrap.cluster_cidr)
            .map_err(|e| ConfigError::ServiceCidr(e.to_string()))?;
        let join_token = match args.join_token.or(file.join_token) {
            None => None,
            Some(t) => Some(
                t.parse::<skiff_tls::JoinToken>()
                    .map_err(|e| ConfigError::Tls(e.to_string()))?,
            ),
        };
        let mut tls_sans = file.tls_sans;
        tls_sans.extend(args.tls_sans);
        let cert_ttl = match args.cert_ttl.or(file.cert_ttl) {
            None => DEFAULT_CERT_TTL,
            Some(s) => humantime::parse_duration(&s)
                .ok()
                .filter(|d| *d >= std::time::Duration::from_secs(30))
                .ok_or_else(|| {
                    ConfigError::Tls(format!("cert-ttl {s:?}: a duration of at least 30s"))
                })?,
        };
        Ok(Config {
            id,
            data_dir,
            rpc_addr,
            http_addr,
            formation,
            raft,
            node_grace,
            gc_after,
            keep_versions,
            cluster,
            join_token,
            tls_sans,
            cert_ttl,
        })
    }
}

/// A duration of at least a second, `default_secs` when not given; the text when it is not.
fn seconds_or_more(
    given: Option<String>,
    default_secs: u64,
) -> Result<std::time::Duration, String> {
    match given {
        None => Ok(std::time::Duration::from_secs(default_secs)),
        Some(s) => humantime::parse_duration(&s)
            .ok()
            .filter(|d| *d >= std::time::Duration::from_secs(1))
            .ok_or(s),
    }
}

fn validate_raft(r: &RaftSettings) -> Result<(), ConfigError> {
    if r.heartbeat_ms == 0 {
        return Err(ConfigError::Raft("heartbeat_ms must be positive".into()));
    }
    if r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
        return Err(ConfigError::Raft(format!(
            "election_timeout_min_ms ({}) must be more than twice heartbeat_ms ({})",
            r.election_timeout_min_ms, r.heartbeat_ms
        )));
    }
    if r.election_timeout_max_ms <= r.election_timeout_min_ms {
        return Err(ConfigError::Raft(format!(
            "election_timeout_max_ms ({}) must be greater than election_timeout_min_ms ({})",
            r.election_timeout_max_ms, r.election_timeout_min_ms
        )));
    }
    if r.snapshot_every == 0 {
        return Err(ConfigError::Raft("snapshot_every must be positive".into()));
    }
    if r.command_level > crate::state::COMMAND_LEVEL {
        return Err(ConfigError::Raft(format!(
            "command_level ({}) is newer than this release applies ({})",
            r.command_level,
            crate::state::COMMAND_LEVEL
        )));
    }
    Ok(())
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string().trim().replace('\n', " "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("skiff-controller").chain(list.iter().copied()))
            .expect("flags parse")
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "id = 3\ndata_dir = \"/x\"\nrpc_addr = \"127.0.0.1:1\"\n[raft]\nheartbeat_ms = 100\n",
        )
        .expect("write");
        let p = path.to_str().expect("utf8");
        let c =
            Config::from_args(args(&["--config", p, "--rpc-addr", "127.0.0.1:2"])).expect("valid");
        assert_eq!(c.id, 3);
        assert_eq!(c.rpc_addr, Some("127.0.0.1:2".parse().expect("addr")));
        assert_eq!(c.raft.heartbeat_ms, 100);
        assert_eq!(c.formation, Formation::Wait);
    }

    #[test]
    fn unknown_file_field_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "id = 1\ndata_dir = \"/x\"\nrpc_adr = \"1.2.3.4:5\"\n",
        )
        .expect("write");
        let err = Config::from_args(args(&["--config", path.to_str().expect("utf8")]))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("rpc_adr"), "{err}");
    }

    /// A member can be held at an older release's command level, never at a newer one.
    #[test]
    fn command_level_is_at_most_this_releases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        let load = |level: u32| {
            std::fs::write(
                &path,
                format!("id = 1\ndata_dir = \"/x\"\n[raft]\ncommand_level = {level}\n"),
            )
            .expect("write");
            Config::from_args(args(&["--config", path.to_str().expect("utf8")]))
        };
        assert_eq!(load(0).expect("older level").raft.command_level, 0);
        let newest = crate::state::COMMAND_LEVEL;
        assert_eq!(load(newest).expect("this level").raft.command_level, newest);
        let err = load(newest + 1).expect_err("newer level").to_string();
        assert!(
            err.contains("command_level") && err.contains("newer"),
            "{err}"
        );
    }

    #[test]
    fn missing_id_and_bad_ranges() {
        let err = Config::from_args(args(&["--data-dir", "/x"]))
            .expect_err("no id")
            .to_string();
        assert!(err.starts_with("id is required"), "{err}");
        let err = Config::from_args(args(&[
            "--id",
            "1",
            "--data-dir",
            "/x",
            "--election-timeout-ms",
            "5",
        ]))
        .expect_err("bad range")
        .to_string();
        assert!(err.contains("MIN-MAX"), "{err}");
        let err = Config::from_args(args(&[
            "--id",
            "1",
            "--data-dir",
            "/x",
            "--rpc-addr",
            "0.0.0.0:7700",
        ]))
        .expect_err("unspecified")
        .to_string();
        assert!(err.contains("specific IP"), "{err}");
        let base = ["--id", "1", "--data-dir", "/x"];
        for (extra, want) in [
            (
                ["--node-grace", "500ms"],
                "node-grace: \"500ms\" is not a duration",
            ),
            (
                ["--gc-after", "soon"],
                "gc-after: \"soon\" is not a duration",
            ),
            (
                ["--keep-versions", "0"],
                "keep-versions: 0 is not between 1 and 10000",
            ),
        ] {
            let list: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
            let err = Config::from_args(args(&list)).expect_err(want).to_string();
            assert!(err.starts_with(want), "{err}");
        }
        let c = Config::from_args(args(&[
            "--id",
            "1",
            "--data-dir",
            "/x",
            "--gc-after",
            "2m",
            "--keep-versions",
            "3",
        ]))
        .expect("valid");
        assert_eq!(
            (c.gc_after, c.keep_versions),
            (std::time::Duration::from_secs(120), 3)
        );
        let c = Config::from_args(args(&base)).expect("defaults");
        assert_eq!(
            (c.node_grace, c.gc_after, c.keep_versions),
            (
                std::time::Duration::from_secs(7),
                std::time::Duration::from_secs(3600),
                10
            )
        );
    }

    #[test]
    fn cluster_flags_take_effect_at_bootstrap_and_conflicts_name_both_values() {
        let none = ClusterFlags::default();
        assert_eq!(
            none.for_bootstrap(),
            ClusterSettings {
                cluster_cidr: "10.42.0.0/16".into(),
                node_subnet_prefix: 24,
                service_cidr: "10.43.0.0/16".into(),
            }
        );
        let cluster = ClusterSettings {
            cluster_cidr: "10.50.0.0/16".into(),
            node_subnet_prefix: 26,
            service_cidr: "10.51.0.0/16".into(),
        };
        // Nothing given: no conflict, whatever the cluster has.
        assert_eq!(none.conflict(&cluster), None);
        let same = ClusterFlags {
            cluster_cidr: Some("10.50.0.0/16".into()),
            node_subnet_prefix: None,
            service_cidr: Some("10.51.0.0/16".into()),
        };
        assert_eq!(same.conflict(&cluster), None);
        let other = ClusterFlags {
            cluster_cidr: Some("10.60.0.0/16".into()),
            node_subnet_prefix: Some(24),
            service_cidr: Some("10.61.0.0/16".into()),
        };
        let why = other.conflict(&cluster).expect("conflict");
        assert!(
            why.starts_with(
                "--cluster-cidr 10.60.0.0/16, but the cluster was bootstrapped with \
                 10.50.0.0/16; --node-subnet-prefix 24, but the cluster was bootstrapped with \
                 26; --service-cidr 10.61.0.0/16, but the cluster was bootstrapped with \
                 10.51.0.0/16"
            ),
            "{why}"
        );
    }
}
