//! `skiff-agent` binary: parses the command line and dispatches. The hidden `__monitor` mode
//! is the per-container monitor (the binary re-exec'd); it stays single-threaded, so nothing
//! here starts an async runtime before dispatching to it.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde::Deserialize;
use skiff_agent::daemon::DaemonConfig;
use skiff_runtime::cgroup::Limits;
use skiff_runtime::container::{RunOptions, Runtime};
use skiff_runtime::image::{PullOptions, PullPolicy, RegistryOptions};
use skiff_runtime::logs;
use skiff_runtime::store::{RestartPolicy, Status, monitor_alive};

#[derive(Parser)]
#[command(name = "skiff-agent", version, about = "Skiff's node agent")]
struct Cli {
    /// A TOML file with defaults for these flags (`data_dir`, `cgroup_parent`,
    /// `insecure_registries`, `auth_file`). Flags and SKIFF_* variables override it.
    #[arg(long, global = true, env = "SKIFF_CONFIG")]
    config: Option<PathBuf>,
    /// Where containers, images and state live [default: /var/lib/skiff/agent].
    #[arg(long, global = true, env = "SKIFF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Cgroup parent for containers, relative to each hierarchy root [default: skiff].
    #[arg(long, global = true, env = "SKIFF_CGROUP_PARENT")]
    cgroup_parent: Option<String>,
    /// A registry (HOST:PORT) reached over plain HTTP instead of HTTPS. Repeatable.
    #[arg(
        long = "insecure-registry",
        global = true,
        env = "SKIFF_INSECURE_REGISTRY",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
    /// Registry credentials in Docker's config.json format ({"auths": {"HOST:PORT":
    /// {"auth": "base64(user:password)"}}}).
    #[arg(long, global = true, env = "SKIFF_AUTH_FILE")]
    auth_file: Option<PathBuf>,
    /// Run as the node agent: the controllers' gRPC addresses, comma-separated.
    #[arg(long, env = "SKIFF_CONTROLLER", value_delimiter = ',')]
    controller: Vec<String>,
    /// This node's name [default: the host name].
    #[arg(long, env = "SKIFF_NAME")]
    name: Option<String>,
    /// The address other hosts reach this one at.
    #[arg(long, env = "SKIFF_ADVERTISE_ADDR")]
    advertise_addr: Option<std::net::IpAddr>,
    /// Node labels for placement constraints: k=v,k=v.
    #[arg(long, env = "SKIFF_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    /// Cores offered to workloads [default: the host's].
    #[arg(long, env = "SKIFF_CPUS")]
    cpus: Option<f64>,
    /// Memory offered to workloads, e.g. 4Gi [default: the host's].
    #[arg(long, env = "SKIFF_MEMORY")]
    memory: Option<String>,
    /// Processes offered to workloads [default: 32768].
    #[arg(long, env = "SKIFF_PIDS")]
    pids: Option<u32>,
    /// Where the agent's API (logs, exec) listens [default: ADVERTISE_ADDR:7801].
    #[arg(long, env = "SKIFF_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Where Prometheus scrapes the agent's /metrics [default: ADVERTISE_ADDR:7802].
    #[arg(long, env = "SKIFF_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Which WireGuard runs the overlay: the kernel's when present (auto), or one of them.
    #[arg(long, env = "SKIFF_WIREGUARD", value_enum)]
    wireguard: Option<skiff_agent::net::BackendChoice>,
    /// The UDP port WireGuard listens on [default: 51820].
    #[arg(long, env = "SKIFF_WIREGUARD_PORT")]
    wireguard_port: Option<u16>,
    /// Persistent keepalive to every peer in seconds, 0 = off [default: 25].
    #[arg(long, env = "SKIFF_WIREGUARD_KEEPALIVE")]
    wireguard_keepalive: Option<u16>,
    /// The pod MTU [default: the underlay link's MTU minus 80 for WireGuard].
    #[arg(long, env = "SKIFF_MTU")]
    mtu: Option<u32>,
    /// Resolvers the node's DNS forwards names outside skiff.internal to, IP[:PORT],...
    /// [default: the host's /etc/resolv.conf nameservers].
    #[arg(long, env = "SKIFF_DNS_UPSTREAM", value_delimiter = ',')]
    dns_upstream: Vec<String>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    cgroup_parent: Option<String>,
    #[serde(default)]
    insecure_registries: Vec<String>,
    auth_file: Option<PathBuf>,
    #[serde(default)]
    controllers: Vec<String>,
    name: Option<String>,
    advertise_addr: Option<std::net::IpAddr>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    cpus: Option<f64>,
    memory: Option<String>,
    pids: Option<u32>,
    listen: Option<std::net::SocketAddr>,
    metrics_listen: Option<std::net::SocketAddr>,
    wireguard: Option<skiff_agent::net::BackendChoice>,
    wireguard_port: Option<u16>,
    wireguard_keepalive: Option<u16>,
    mtu: Option<u32>,
    #[serde(default)]
    dns_upstream: Vec<String>,
}

/// Flags over the config file over defaults.
struct Settings {
    data_dir: PathBuf,
    cgroup_parent: String,
    registry: RegistryOptions,
    file: FileConfig,
}

impl Settings {
    fn load(cli: &Cli) -> anyhow::Result<Settings> {
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
            registry: RegistryOptions {
                insecure,
                auth_file: cli.auth_file.clone().or(file.auth_file.clone()),
            },
            file,
        })
    }

    /// The daemon's settings: flags over the file over what the host has.
    fn daemon(&self, cli: &Cli) -> anyhow::Result<DaemonConfig> {
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
        Ok(DaemonConfig {
            controllers,
            name,
            advertise_addr,
            labels,
            data_dir: self.data_dir.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
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
            net: skiff_agent::net::NetOptions {
                data_dir: self.data_dir.clone(),
                advertise: advertise_addr,
                wg_port: cli
                    .wireguard_port
                    .or(self.file.wireguard_port)
                    .unwrap_or(skiff_agent::net::wg::DEFAULT_PORT),
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

fn daemon(cfg: &Settings, cli: &Cli) -> anyhow::Result<ExitCode> {
    let config = cfg.daemon(cli)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(skiff_agent::daemon::run(config))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Remove what the agent set up on this host (bridge, tunnel, iptables rules), once the
    /// agent and its containers are gone.
    Down,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run and inspect containers by hand.
    Container {
        #[command(subcommand)]
        command: ContainerCmd,
    },
    /// Images in the local store.
    Image {
        #[command(subcommand)]
        command: ImageCmd,
    },
    /// The host's pod network.
    Network {
        #[command(subcommand)]
        command: NetworkCmd,
    },
    #[command(name = "__monitor", hide = true)]
    Monitor { id: String },
    /// The userspace WireGuard tunnel (started by the agent, outlives it).
    #[command(name = "__wg-tunnel", hide = true)]
    WgTunnel(skiff_agent::net::wg::tunnel::TunnelArgs),
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Pull or import an image: HOST[:PORT]/NAME[:TAG|@DIGEST], oci:DIR[:TAG],
    /// oci-archive:FILE[:TAG] or docker-archive:FILE[:NAME:TAG|:@N].
    Pull {
        reference: String,
        /// Print only the image id.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List images.
    Ls {
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Forget an image (its layers go at the next prune).
    Rm {
        reference: String,
        /// Even if a container uses it (its layers stay while the container exists).
        #[arg(short, long)]
        force: bool,
    },
    /// Remove layers no image and no container uses, and leftovers of interrupted pulls.
    Prune {
        /// Also remove images no container uses.
        #[arg(short, long)]
        all: bool,
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
}

#[derive(Subcommand)]
enum ContainerCmd {
    /// Run a container in the foreground and exit with its exit code.
    Run {
        #[arg(long)]
        image: String,
        #[arg(long)]
        name: Option<String>,
        /// Memory limit (e.g. 64Mi).
        #[arg(long)]
        memory: Option<String>,
        /// CPU limit in cores (e.g. 0.5).
        #[arg(long)]
        cpus: Option<f64>,
        /// Process limit.
        #[arg(long)]
        pids: Option<u64>,
        #[arg(long)]
        hostname: Option<String>,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// User (name or uid[:gid]) inside the container.
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// never | on-failure | always.
        #[arg(long, default_value = "never")]
        restart: String,
        /// When to pull a registry image: missing | always | never.
        #[arg(long, default_value = "missing")]
        pull: PullPolicy,
        /// Start it and return its id instead of waiting.
        #[arg(short = 'd', long)]
        detach: bool,
        /// Remove the container when it exits.
        #[arg(long)]
        rm: bool,
        /// The command (overrides the image's CMD).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// List containers.
    Ps {
        /// Also exited ones.
        #[arg(short, long)]
        all: bool,
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Print a container's output.
    Logs {
        container: String,
        /// Keep printing new output until the container exits.
        #[arg(short, long)]
        follow: bool,
    },
    /// Stop a container: its stop signal, then SIGKILL after the grace period.
    Stop {
        container: String,
        /// Grace period in seconds.
        #[arg(short, long, default_value_t = 10)]
        time: u64,
    },
    /// Run a command inside a running container (its namespaces, cgroup, user, capabilities
    /// and seccomp filter) and exit with its exit code.
    Exec {
        container: String,
        /// KEY=VALUE added to the container's environment, repeatable.
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Remove a stopped container.
    Rm {
        container: String,
        #[arg(short, long)]
        force: bool,
    },
}

fn parse_restart(s: &str) -> anyhow::Result<RestartPolicy> {
    Ok(match s {
        "never" | "no" => RestartPolicy::Never,
        "on-failure" => RestartPolicy::OnFailure,
        "always" => RestartPolicy::Always,
        other => anyhow::bail!("--restart: {other:?} is not never, on-failure or always"),
    })
}

fn print_logs(dir: &std::path::Path, from: usize) -> anyhow::Result<usize> {
    let records = logs::read_all(dir)?;
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    for r in records.iter().skip(from) {
        let end = if r.partial { "" } else { "\n" };
        match r.stream {
            logs::Stream::Stdout => write!(out, "{}{end}", r.text)?,
            logs::Stream::Stderr => write!(err, "{}{end}", r.text)?,
        }
    }
    out.flush()?;
    Ok(records.len())
}

fn container(cfg: &Settings, cmd: &ContainerCmd) -> anyhow::Result<ExitCode> {
    let mut rt = Runtime::open(&cfg.data_dir, &cfg.cgroup_parent)?;
    rt.set_pull_options(cfg.registry.clone(), Some(indicatif::MultiProgress::new()));
    // Clean up after interrupted agents (`run` skips it: it is on the start path).
    if !matches!(cmd, ContainerCmd::Run { .. }) {
        rt.gc()?;
    }
    match cmd {
        ContainerCmd::Run {
            image,
            name,
            memory,
            cpus,
            pids,
            hostname,
            env,
            user,
            restart,
            pull,
            detach,
            rm,
            cmd,
        } => {
            let memory = match memory {
                Some(m) => Some(
                    m.parse::<skiff_common::ByteSize>()
                        .map_err(|e| anyhow::anyhow!("--memory: {e}"))?
                        .as_u64(),
                ),
                None => None,
            };
            let mut envs = Vec::new();
            for e in env {
                let (k, v) = e
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--env: {e:?} is not KEY=VALUE"))?;
                envs.push((k.to_string(), v.to_string()));
            }
            let opts = RunOptions {
                image: image.clone(),
                name: name.clone(),
                cmd: cmd.clone(),
                env: envs,
                hostname: hostname.clone(),
                user: user.clone(),
                limits: Limits {
                    cpu: *cpus,
                    memory,
                    pids: *pids,
                },
                restart: parse_restart(restart)?,
                pull: *pull,
                ..RunOptions::default()
            };
            let (id, mut monitor) = rt.run(&opts)?;
            if *detach {
                println!("{id}");
                return Ok(ExitCode::SUCCESS);
            }
            let dir = rt.store().dir(&id);
            // Wait for the monitor on a thread so its exit is seen at once, while this one
            // copies the log to our stdout/stderr as it grows.
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = done_tx.send(monitor.wait());
            });
            let mut seen = 0;
            loop {
                seen = print_logs(&dir, seen)?;
                match done_rx.recv_timeout(Duration::from_millis(50)) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => break,
                }
            }
            print_logs(&dir, seen)?;
            let state = rt.store().state(&id)?;
            let code = state.exit.as_ref().map(|e| e.status_code()).unwrap_or(255);
            if let Some(e) = &state.exit
                && e.oom_killed
            {
                eprintln!("container {id}: killed by the OOM killer (memory limit)");
            }
            if *rm {
                rt.remove(&id, true)?;
            }
            Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(255)))
        }
        ContainerCmd::Ps { all, output } => {
            let list = rt.store().list()?;
            let rows: Vec<_> = list
                .into_iter()
                .filter(|(_, s)| {
                    *all || matches!(
                        s.status,
                        Status::Running | Status::Restarting | Status::Created
                    )
                })
                .collect();
            if output == "json" {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(c, s)| {
                        serde_json::json!({
                            "id": c.id, "name": c.name, "image": c.image, "command": c.args,
                            "status": s.status.as_str(), "pid": s.pid, "restarts": s.restarts,
                            "exit": s.exit, "error": s.error, "monitor_alive": monitor_alive(s),
                            "created_at_ms": c.created_at_ms,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<14}{:<18}{:<21}{:<9}{:<9}COMMAND",
                    "ID", "NAME", "STATUS", "PID", "RESTARTS"
                );
                for (c, s) in rows {
                    let status = match (&s.status, &s.exit) {
                        (Status::Exited, Some(e)) => format!("exited({})", e.describe()),
                        (st, _) => st.as_str().to_string(),
                    };
                    println!(
                        "{:<14}{:<18}{:<21}{:<9}{:<9}{}",
                        &c.id[..12.min(c.id.len())],
                        c.name,
                        status,
                        s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        s.restarts,
                        c.args.join(" ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ContainerCmd::Logs { container, follow } => {
            let id = rt.store().resolve(container)?;
            let dir = rt.store().dir(&id);
            let mut seen = print_logs(&dir, 0)?;
            while *follow && monitor_alive(&rt.store().state(&id)?) {
                std::thread::sleep(Duration::from_millis(100));
                seen = print_logs(&dir, seen)?;
            }
            if *follow {
                print_logs(&dir, seen)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ContainerCmd::Stop { container, time } => {
            let state = rt.stop(container, Duration::from_secs(*time))?;
            let how = state
                .exit
                .map(|e| e.describe())
                .unwrap_or_else(|| "stopped".into());
            println!("{container}: {how}");
            Ok(ExitCode::SUCCESS)
        }
        ContainerCmd::Exec {
            container,
            env,
            cmd,
        } => {
            let id = rt.store().resolve(container)?;
            for e in env {
                if !e.contains('=') {
                    anyhow::bail!("--env: {e:?} is not KEY=VALUE");
                }
            }
            let code = skiff_runtime::exec::exec(rt.store(), &id, cmd, env)?;
            Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(255)))
        }
        ContainerCmd::Rm { container, force } => {
            rt.remove(container, *force)?;
            println!("{container}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}

fn image(cfg: &Settings, cmd: &ImageCmd) -> anyhow::Result<ExitCode> {
    let mut rt = Runtime::open(&cfg.data_dir, &cfg.cgroup_parent)?;
    rt.set_pull_options(cfg.registry.clone(), None);
    let store = rt.images()?;
    match cmd {
        ImageCmd::Pull { reference, quiet } => {
            let progress = indicatif::MultiProgress::new();
            let started = std::time::Instant::now();
            let img = store.pull(
                reference,
                &PullOptions {
                    registry: cfg.registry.clone(),
                    progress: (!quiet).then_some(&progress),
                },
            )?;
            if *quiet {
                println!("{}", img.id);
            } else {
                println!(
                    "{} {} ({} layers, {:.1} s)",
                    img.reference,
                    img.manifest_digest.as_deref().unwrap_or(&img.id),
                    img.layers.len(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        ImageCmd::Ls { output } => {
            let list = store.list()?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<14}{:>8}{:>12}  REFERENCE", "ID", "LAYERS", "SIZE");
                for i in list {
                    println!(
                        "{:<14}{:>8}{:>12}  {}",
                        short_id(&i.id),
                        i.layers,
                        human_bytes(i.size),
                        i.reference
                    );
                }
            }
        }
        ImageCmd::Rm { reference, force } => {
            let users = rt.image_users()?;
            let removed = store.remove(reference, &users, *force)?;
            println!("{removed}");
        }
        ImageCmd::Prune { all, output } => {
            rt.gc()?;
            let report = rt.prune_images(*all)?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for r in &report.images {
                    println!("removed image {r}");
                }
                for l in &report.layers {
                    println!("removed layer {l}");
                }
                println!("freed {}", human_bytes(report.bytes));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn monitor(data_dir: &std::path::Path, id: &str) -> ExitCode {
    // Our stdout is the pipe the starter reads one report line from; keep it as the report
    // fd and put /dev/null in its place.
    let report: Option<OwnedFd> = nix::unistd::dup(std::io::stdout()).ok();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(&null);
    }
    let code = skiff_runtime::monitor::run(data_dir, id, report);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Monitor { id }) = &cli.command {
        // The runtime passes --data-dir explicitly; no config file is read here.
        let data_dir = cli
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/skiff/agent"));
        return monitor(&data_dir, id);
    }
    // The tunnel logs too (to its tunnel.log): SKIFF_LOG=boringtun=debug shows the handshakes.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(Cmd::WgTunnel(args)) = &cli.command {
        let code = skiff_agent::net::wg::tunnel::run(&args.interface, &args.socket);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let res = Settings::load(&cli).and_then(|cfg| match &cli.command {
        Some(Cmd::Container { command }) => container(&cfg, command),
        Some(Cmd::Image { command }) => image(&cfg, command),
        Some(Cmd::Network {
            command: NetworkCmd::Down,
        }) => {
            for line in skiff_agent::net::teardown(&cfg.data_dir) {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Cmd::Monitor { .. } | Cmd::WgTunnel(_)) => unreachable!("dispatched above"),
        None => daemon(&cfg, &cli),
    });
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
