//! The `skiff-agent` commands: the daemon (no subcommand), `container` and `image` by hand,
//! `network down`, and the hidden re-exec modes (`__monitor`, `__wg-tunnel`).

mod container;
mod image;

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::{Cli, Settings};

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// Remove what the agent set up on this host (bridge, tunnel, iptables rules), once the
    /// agent and its containers are gone.
    Down,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run and inspect containers by hand.
    Container {
        #[command(subcommand)]
        command: Box<container::ContainerCmd>,
    },
    /// Images in the local store.
    Image {
        #[command(subcommand)]
        command: image::ImageCmd,
    },
    /// The host's pod network.
    Network {
        #[command(subcommand)]
        command: NetworkCmd,
    },
    /// Many simulated nodes in one process (for measuring the control plane at scale):
    /// they enroll, register, heartbeat and watch as agents do, and report what they are
    /// given as running without running it.
    Simulate(crate::simulate::SimulateArgs),
    #[command(name = "__monitor", hide = true)]
    Monitor { id: String },
    /// The userspace WireGuard tunnel (started by the agent, outlives it).
    #[command(name = "__wg-tunnel", hide = true)]
    WgTunnel(crate::net::wg::tunnel::TunnelArgs),
    /// The mesh sidecar of one allocation (started by the agent).
    #[command(name = "proxy", hide = true)]
    Proxy(ProxyArgs),
}

/// The sidecar's own command line, read by [`skiff_proxy::Args::parse`] (as `skiff-proxy`
/// reads it).
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<std::ffi::OsString>,
}

/// Runs what the command line asks for (the hidden modes are dispatched before this, by
/// [`monitor`] and [`tunnel`]).
pub fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let cfg = Settings::load(cli)?;
    match &cli.command {
        Some(Cmd::Container { command }) => container::run(&cfg, command),
        Some(Cmd::Image { command }) => image::run(&cfg, command),
        Some(Cmd::Network {
            command: NetworkCmd::Down,
        }) => {
            // Pods first: their namespaces and tmpfs volumes are mounts under the data dir.
            let rt = cfg.runtime()?;
            for pod in rt.pods() {
                rt.remove_pod(&pod);
                println!("removed pod {pod}");
            }
            for line in crate::net::teardown(&cfg.data_dir) {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Cmd::Simulate(args)) => {
            crate::simulate::run(args, &cfg.data_dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Cmd::Monitor { .. } | Cmd::WgTunnel(_) | Cmd::Proxy(_)) => {
            anyhow::bail!("__monitor, __wg-tunnel and proxy are started by the agent itself")
        }
        None => daemon(&cfg, cli),
    }
}

fn daemon(cfg: &Settings, cli: &Cli) -> anyhow::Result<ExitCode> {
    let config = cfg.daemon(cli)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(crate::daemon::run(config))?;
    Ok(ExitCode::SUCCESS)
}

/// The per-container monitor: the agent binary re-exec'd by the runtime. It must stay
/// single-threaded (it clones the container's first process), so it runs before anything
/// else starts.
pub fn monitor(data_dir: &std::path::Path, id: &str) -> ExitCode {
    ExitCode::from(skiff_runtime::monitor::main(data_dir, id))
}

/// The userspace WireGuard tunnel process (started by the agent, outlives it).
pub fn tunnel(args: &crate::net::wg::tunnel::TunnelArgs) -> ExitCode {
    let code = crate::net::wg::tunnel::run(&args.interface, &args.socket);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The mesh sidecar (when `skiff-proxy` is not installed next to the agent): runs until
/// killed.
pub fn proxy(args: &ProxyArgs) -> ExitCode {
    skiff_proxy::main(args.args.iter().cloned())
}
