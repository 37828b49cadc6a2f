//! `skiff-agent` binary: parses the command line and dispatches. The hidden `__monitor` mode
//! is the per-container monitor (the binary re-exec'd); it stays single-threaded, so nothing
//! here starts an async runtime or a thread before dispatching to it.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use skiff_agent::commands::{self, Cmd};
use skiff_agent::config::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Monitor { id }) = &cli.command {
        // The runtime passes --data-dir explicitly; no config file is read here.
        let data_dir = cli
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/skiff/agent"));
        return commands::monitor(&data_dir, id);
    }
    // wireguard-control starts WG_USERSPACE_IMPLEMENTATION when a userspace device does not
    // answer; the agent supervises its own tunnel, so nothing may be started behind its back.
    if let Err(e) = skiff_runtime::sys::set_env_single_threaded(
        "WG_USERSPACE_IMPLEMENTATION",
        skiff_agent::net::wg::NO_USERSPACE_FALLBACK,
    ) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // The tunnel logs too (to its tunnel.log): SKIFF_LOG=skiff_agent::net::wg::noise=debug
    // shows the handshakes.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(Cmd::WgTunnel(args)) = &cli.command {
        return commands::tunnel(args);
    }
    // The sidecar joins a namespace and drops privileges: still one thread here.
    if let Some(Cmd::Proxy(args)) = &cli.command {
        return commands::proxy(args);
    }
    match commands::run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
