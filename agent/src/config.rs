//! The agent's settings: flags (each also `SKIFF_*`) over the `--config` TOML file over
//! defaults and what the host has, merged and validated before anything starts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use serde::Deserialize;
use skiff_runtime::image::RegistryOptions;

use crate::commands::Cmd;
use crate::daemon::DaemonConfig;

#[derive(Parser)]
#[command(name = "skiff-agent", version, about = "Skiff's node agent")]
pub struct Cli {
    /// A TOML file with defaults for these flags, each under its long name with `_` for `-`
    /// (`data_dir`, `controllers = [..]`, `labels = {..}`, `local_image_dirs = [..]`, ...; see
    /// deploy/systemd/agent.toml). Flags and SKIFF_* variables override it.
    #[arg(long, global = true, env = "SKIFF_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where containers, images and state live [default: /var/lib/skiff/agent].
    #[arg(long, global = true, env = "SKIFF_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Cgroup parent for containers, relative to each hierarchy root [default: skiff].
    #[arg(long, global = true, env = "SKIFF_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// Where containers' live state goes (rewritten at each start and exit): a tmpfs that
    /// outlives the agent but not the host, e.g. /run/skiff-agent under systemd with the
    /// directory preserved across restarts [default: beside each record in the data dir].
    #[arg(long, global = true, env = "SKIFF_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// A registry (HOST:PORT) reached over plain HTTP instead of HTTPS. Repeatable.
    #[arg(
        long = "insecure-registry",
        global = true,
        env = "SKIFF_INSECURE_REGISTRY",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Registry credentials in Docker's config.json format ({"auths": {"HOST:PORT":
    /// {"auth": "base64(user:password)"}}}).
    #[arg(long, global = true, env = "SKIFF_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Run as the node agent: the controllers' gRPC addresses, comma-separated.
    #[arg(long, env = "SKIFF_CONTROLLER", value_delimiter = ',')]
    pub controller: Vec<String>,
    /// This node's name [default: the host name].
    #[arg(long, env = "SKIFF_NAME")]
    pub name: Option<String>,
    /// The address other hosts reach this one at.
    #[arg(long, env = "SKIFF_ADVERTISE_ADDR")]
    pub advertise_addr: Option<std::net::IpAddr>,
    /// Node labels for placement constraints: k=v,k=v.
    #[arg(long, env = "SKIFF_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Cores offered to workloads [default: the host's].
    #[arg(long, env = "SKIFF_CPUS")]
    pub cpus: Option<f64>,
    /// Memory offered to workloads, e.g. 4Gi [default: the host's].
    #[arg(long, env = "SKIFF_MEMORY")]
    pub memory: Option<String>,
    /// Processes offered to workloads [default: 32768].
    #[arg(long, env = "SKIFF_PIDS")]
    pub pids: Option<u32>,
    /// Where the agent's API (logs, exec) listens [default: ADVERTISE_ADDR:7801].
    #[arg(long, env = "SKIFF_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// Where Prometheus scrapes the agent's /metrics [default: ADVERTISE_ADDR:7802].
    #[arg(long, env = "SKIFF_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Which WireGuard runs the overlay: the kernel's when present (auto), or one of them.
    #[arg(long, env = "SKIFF_WIREGUARD", value_enum)]
    pub wireguard: Option<crate::net::BackendChoice>,
    /// The UDP port WireGuard listens on [default: 51820].
    #[arg(long, env = "SKIFF_WIREGUARD_PORT")]
    pub wireguard_port: Option<u16>,
    /// Persistent keepalive to every peer in seconds, 0 = off [default: 25].
    #[arg(long, env = "SKIFF_WIREGUARD_KEEPALIVE")]
    pub wireguard_keepalive: Option<u16>,
    /// The pod MTU [default: the underlay link's MTU minus 80 for WireGuard].
    #[arg(long, env = "SKIFF_MTU")]
    pub mtu: Option<u32>,
    /// A directory cluster jobs may take local images (oci:, oci-archive:, docker-archive:)
    /// from. Repeatable; none by default (registry images only).
    #[arg(
        long = "local-image-dir",
        env = "SKIFF_LOCAL_IMAGE_DIR",
        value_delimiter = ','
    )]
    pub local_image_dirs: Vec<PathBuf>,
    /// A host device cluster jobs may be granted (`[[devices]]` in a job). Repeatable; none by
    /// default.
    #[arg(
        long = "allow-device",
        env = "SKIFF_ALLOW_DEVICE",
        value_delimiter = ','
    )]
    pub allow_devices: Vec<PathBuf>,
    /// A directory under which cluster jobs may mount host volumes (`type = "host"`).
    /// Repeatable; none by default.
    #[arg(
        long = "host-volume-dir",
        env = "SKIFF_HOST_VOLUME_DIR",
        value_delimiter = ','
    )]
    pub host_volume_dirs: Vec<PathBuf>,
    /// Resolvers the node's DNS forwards names outside skiff.internal to, IP[:PORT],...
    /// [default: the host's /etc/resolv.conf nameservers].
    #[arg(long, env = "SKIFF_DNS_UPSTREAM", value_delimiter = ',')]
    pub dns_upstream: Vec<String>,
    /// The join token (`skiff token create --role agent`) this node enrolls with on its
    /// first start; later starts use the certificate kept in the data dir.
    #[arg(long, env = "SKIFF_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// The user (and group) id the mesh sidecars run as; connections of processes with this
    /// id are not redirected into the sidecar, so workloads must not use it [default: 1337].
    #[arg(long, env = "SKIFF_MESH_PROXY_UID")]
    pub mesh_proxy_uid: Option<u32>,
    /// The lifetime asked for each workload certificate (renewed at two thirds), 30s-24h
    /// [default: 24h].
    #[arg(long, env = "SKIFF_MESH_CERT_TTL", value_parser = humantime::parse_duration)]
    pub mesh_cert_ttl: Option<std::time::Duration>,
    /// Percent used of the data directory's filesystem at which the agent prunes unused
    /// images and reports disk pressure (nothing new is placed on the node), 50-100 (100: only
    /// a full disk) [default: 90].
    #[arg(long, env = "SKIFF_DISK_PRESSURE_THRESHOLD")]
    pub disk_pressure_threshold: Option<u8>,
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub cgroup_parent: Option<String>,
    pub run_dir: Option<PathBuf>,
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    pub auth_file: Option<PathBuf>,
    #[serde(default)]
    pub controllers: Vec<String>,
    pub name: Option<String>,
    pub advertise_addr: Option<std::net::IpAddr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub cpus: Option<f64>,
    pub memory: Option<String>,
    pub pids: Option<u32>,
    pub listen: Option<std::net::SocketAddr>,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub wireguard: Option<crate::net::BackendChoice>,
    pub wireguard_port: Option<u16>,
    pub wireguard_keepalive: Option<u16>,
    pub mtu: Option<u32>,
    #[serde(default)]
    pub local_image_dirs: Vec<PathBuf>,
    #[serde(default)]
    pub allow_devices: Vec<PathBuf>,
    #[serde(default)]
    pub host_volume_dirs: Vec<PathBuf>,
    #[serde(default)]
    pub dns_upstream: Vec<String>,
    pub join_token: Option<String>,
    pub mesh_proxy_uid: Option<u32>,
    pub mesh_cert_ttl: Option<String>,
    pub disk_pressure_threshold: Option<u8>,
}

/// Flags over the config file over defaults.
pub struct Settings {
    pub data_dir: PathBuf,
    pub cgroup_parent: String,
    pub run_dir: Option<PathBuf>,
    pub registry: RegistryOptions,
    pub file: FileConfig,
}

impl Settings {
    pub fn load(cli: &Cli) -> anyhow::Result<Settings> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--config {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let mut insecure = file.insecure_registries.clone();
        for r in &cli.insecure_registries {
            if r.is_empty() || r.contains('/') {
                anyhow::bail!("--insecure-registry: {r:?} is not HOST[:PORT]");
            }
            if !insecure.contains(r) {
                insecure.push(r.clone());
            }
        }
        Ok(Settings {
            data_dir: cli
                .data_dir
                .clone()
                .or(file.data_dir.clone())
                .unwrap_or_else(|| PathBuf::from("/var/lib/skiff/agent")),
            cgroup_parent: cli
                .cgroup_parent
                .clone()
                .or(file.cgroup_parent.clone())
                .unwrap_or_else(|| "skiff".to_owned()),
            run_dir: cli.run_dir.clone().or(file.run_dir.clone()),
            registry: RegistryOptions {
                insecure,
                auth_file: cli.auth_file.clone().or(file.auth_file.clone()),
            },
            file,
        })
    }

    /// The container runtime of these settings (data dir, cgroup parent, run dir).
    pub fn runtime(&self) -> anyhow::Result<skiff_runtime::container::Runtime> {
        Ok(skiff_runtime::container::Runtime::open_with_run_dir(
            &self.data_dir,
            &self.cgroup_parent,
            self.run_dir.as_deref(),
        )?)
    }

    /// The daemon's settings: flags over the file over what the host has.
    pub fn daemon(&self, cli: &Cli) -> anyhow::Result<DaemonConfig> {
        let controllers = if cli.controller.is_empty() {
            self.file.controllers.clone()
        } else {
            cli.controller.clone()
        };
        if controllers.is_empty() {
            anyhow::bail!("--controller: at least one controller address is needed");
        }
        let name = match cli.name.clone().or(self.file.name.clone()) {
            Some(n) => n,
            None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
        };
        let advertise_addr = cli
            .advertise_addr
            .or(self.file.advertise_addr)
            .ok_or_else(|| anyhow::anyhow!("--advertise-addr: required to run as the agent"))?;
        let mut labels = self.file.labels.clone();
        for l in &cli.labels {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--labels: {l:?} is not key=value"))?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        let memory = match cli.memory.clone().or(self.file.memory.clone()) {
            Some(m) => m
                .parse::<skiff_common::ByteSize>()
                .map_err(|e| anyhow::anyhow!("--memory: {e}"))?
                .as_u64(),
            None => host_memory()?,
        };
        let cpu = match cli.cpus.or(self.file.cpus) {
            Some(c) if c.is_finite() && c > 0.0 => c,
            Some(c) => anyhow::bail!("--cpus: {c} is not a positive number"),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
        };
        let image_dirs = if cli.local_image_dirs.is_empty() {
            &self.file.local_image_dirs
        } else {
            &cli.local_image_dirs
        };
        let local_image_dirs = image_dirs
            .iter()
            .map(|d| {
                std::fs::canonicalize(d)
                    .map_err(|e| anyhow::anyhow!("--local-image-dir {}: {e}", d.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let allowed_devices = if cli.allow_devices.is_empty() {
            self.file.allow_devices.clone()
        } else {
            cli.allow_devices.clone()
        };
        for d in &allowed_devices {
            use std::os::unix::fs::FileTypeExt as _;
            let meta = std::fs::metadata(d)
                .map_err(|e| anyhow::anyhow!("--allow-device {}: {e}", d.display()))?;
            let ft = meta.file_type();
            if !d.is_absolute() || !(ft.is_char_device() || ft.is_block_device()) {
                anyhow::bail!(
                    "--allow-device {}: not an absolute path to a device node",
                    d.display()
                );
            }
        }
        let volume_dirs = if cli.host_volume_dirs.is_empty() {
            &self.file.host_volume_dirs
        } else {
            &cli.host_volume_dirs
        };
        let host_volume_dirs = volume_dirs
            .iter()
            .map(|d| {
                let real = std::fs::canonicalize(d)
                    .map_err(|e| anyhow::anyhow!("--host-volume-dir {}: {e}", d.display()))?;
                if real == std::path::Path::new("/") || !real.is_dir() {
                    anyhow::bail!(
                        "--host-volume-dir {}: not a directory other than /",
                        d.display()
                    );
                }
                Ok(real)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let join_token = match cli.join_token.clone().or(self.file.join_token.clone()) {
            None => None,
            Some(t) => Some(
                t.parse::<skiff_tls::JoinToken>()
                    .map_err(|e| anyhow::anyhow!("--join-token: {e}"))?,
            ),
        };
        let file_ttl = self
            .file
            .mesh_cert_ttl
            .as_deref()
            .map(|s| {
                humantime::parse_duration(s)
                    .map_err(|e| anyhow::anyhow!("mesh_cert_ttl {s:?} in the config file: {e}"))
            })
            .transpose()?;
        let mesh_cert_ttl = cli
            .mesh_cert_ttl
            .or(file_ttl)
            .unwrap_or(std::time::Duration::from_secs(86_400));
        if !(30..=86_400).contains(&mesh_cert_ttl.as_secs()) {
            anyhow::bail!("--mesh-cert-ttl must be between 30s and 24h");
        }
        let mesh_uid = cli
            .mesh_proxy_uid
            .or(self.file.mesh_proxy_uid)
            .unwrap_or(crate::mesh::DEFAULT_PROXY_UID);
        if mesh_uid == 0 {
            anyhow::bail!("--mesh-proxy-uid must not be 0: the sidecar runs unprivileged");
        }
        let disk_pressure_threshold = cli
            .disk_pressure_threshold
            .or(self.file.disk_pressure_threshold)
            .unwrap_or(crate::disk::DEFAULT_THRESHOLD);
        if !(50..=100).contains(&disk_pressure_threshold) {
            anyhow::bail!(
                "--disk-pressure-threshold must be a percentage between 50 and 100, not {disk_pressure_threshold}"
            );
        }
        Ok(DaemonConfig {
            disk_pressure_threshold,
            mesh: crate::mesh::MeshOptions {
                uid: mesh_uid,
                gid: mesh_uid,
                cert_ttl: mesh_cert_ttl,
                data_dir: self.data_dir.clone(),
                cgroup_parent: self.cgroup_parent.clone(),
            },
            join_token,
            policy: crate::policy::Policy {
                local_image_dirs,
                allowed_devices,
                host_volume_dirs,
            },
            controllers,
            name,
            advertise_addr,
            labels,
            data_dir: self.data_dir.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
            run_dir: self.run_dir.clone(),
            registry: self.registry.clone(),
            listen: cli
                .listen
                .or(self.file.listen)
                .unwrap_or(std::net::SocketAddr::new(advertise_addr, 7801)),
            metrics_listen: cli
                .metrics_listen
                .or(self.file.metrics_listen)
                .unwrap_or(std::net::SocketAddr::new(advertise_addr, 7802)),
            cpu,
            memory,
            pids: cli.pids.or(self.file.pids).unwrap_or(32768),
            dns_upstreams: if cli.dns_upstream.is_empty() {
                self.file.dns_upstream.clone()
            } else {
                cli.dns_upstream.clone()
            },
            net: crate::net::NetOptions {
                data_dir: self.data_dir.clone(),
                advertise: advertise_addr,
                wg_port: cli
                    .wireguard_port
                    .or(self.file.wireguard_port)
                    .unwrap_or(crate::net::wg::DEFAULT_PORT),
                keepalive: match cli
                    .wireguard_keepalive
                    .or(self.file.wireguard_keepalive)
                    .unwrap_or(25)
                {
                    0 => None,
                    k => Some(k),
                },
                backend: cli.wireguard.or(self.file.wireguard).unwrap_or_default(),
                mtu: match cli.mtu.or(self.file.mtu) {
                    Some(m) if !(1280..=65535).contains(&m) => {
                        anyhow::bail!("--mtu: {m} is not between 1280 and 65535")
                    }
                    m => m,
                },
            },
        })
    }
}

/// MemTotal from /proc/meminfo, in bytes.
fn host_memory() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow::anyhow!("/proc/meminfo: no MemTotal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str], file: Option<&str>) -> anyhow::Result<(Cli, Settings)> {
        let dir = tempfile::tempdir()?;
        let mut argv = vec!["skiff-agent".to_owned()];
        if let Some(text) = file {
            let path = dir.path().join("agent.toml");
            std::fs::write(&path, text)?;
            argv.push("--config".into());
            argv.push(path.display().to_string());
        }
        argv.extend(args.iter().map(|a| a.to_string()));
        let cli = Cli::try_parse_from(argv)?;
        let settings = Settings::load(&cli)?;
        Ok((cli, settings))
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() -> anyhow::Result<()> {
        let file = r#"
            data_dir = "/srv/agent"
            controllers = ["10.0.0.1:7700"]
            name = "from-file"
            advertise_addr = "10.0.0.5"
            labels = { zone = "a", disk = "ssd" }
            cpus = 2.0
            memory = "1Gi"
            wireguard_port = 51000
        "#;
        let (cli, s) = settings(
            &["--name", "n5", "--labels", "zone=b", "--cpus", "1.5"],
            Some(file),
        )?;
        assert_eq!(s.data_dir, PathBuf::from("/srv/agent"));
        assert_eq!(s.cgroup_parent, "skiff");
        let d = s.daemon(&cli)?;
        assert_eq!(d.name, "n5");
        assert_eq!(d.controllers, ["10.0.0.1:7700"]);
        assert_eq!(d.labels.get("zone").map(String::as_str), Some("b"));
        assert_eq!(d.labels.get("disk").map(String::as_str), Some("ssd"));
        assert_eq!(d.cpu, 1.5);
        assert_eq!(d.memory, 1 << 30);
        assert_eq!(d.pids, 32768);
        assert_eq!(d.net.wg_port, 51000);
        assert_eq!(d.listen.to_string(), "10.0.0.5:7801");
        assert_eq!(d.metrics_listen.to_string(), "10.0.0.5:7802");
        assert_eq!(d.disk_pressure_threshold, crate::disk::DEFAULT_THRESHOLD);
        let (cli, s) = settings(&[], Some(&format!("{file}disk_pressure_threshold = 80\n")))?;
        assert_eq!(s.daemon(&cli)?.disk_pressure_threshold, 80);
        Ok(())
    }

    #[test]
    fn bad_values_are_named() -> anyhow::Result<()> {
        let base = [
            "--controller",
            "127.0.0.1:7700",
            "--advertise-addr",
            "10.0.0.5",
        ];
        for (extra, expect) in [
            (
                &["--labels", "zone"][..],
                "--labels: \"zone\" is not key=value",
            ),
            (&["--cpus=-1"][..], "--cpus: -1 is not a positive number"),
            (&["--memory", "lots"][..], "--memory: "),
            (
                &["--mtu", "100"][..],
                "--mtu: 100 is not between 1280 and 65535",
            ),
            (
                &["--disk-pressure-threshold", "101"][..],
                "--disk-pressure-threshold must be a percentage between 50 and 100, not 101",
            ),
            (
                &["--disk-pressure-threshold", "10"][..],
                "--disk-pressure-threshold must be a percentage between 50 and 100, not 10",
            ),
        ] {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            let (cli, s) = settings(&args, None)?;
            let err = s.daemon(&cli).expect_err(expect).to_string();
            assert!(err.starts_with(expect), "{err}");
        }
        let (cli, s) = settings(&["--advertise-addr", "10.0.0.5"], None)?;
        let err = s.daemon(&cli).expect_err("no controller").to_string();
        assert!(err.contains("--controller"), "{err}");
        let err = settings(&["--insecure-registry", "a/b"], None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--insecure-registry"), "{err}");
        let err = settings(&[], Some("colour = \"red\""))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("unknown field `colour`"), "{err}");
        Ok(())
    }
}
