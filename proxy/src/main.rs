//! `skiff-proxy` binary: the mesh sidecar on its own, so that each sidecar maps a small
//! program rather than the whole agent (its resident memory is mostly the code it touches).
//! The agent starts it with the arguments of [`skiff_proxy::Args::parse`].

#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    // The agent sets SKIFF_LOG for its sidecars (SKIFF_PROXY_LOG of its own, default `info`).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    skiff_proxy::main(std::env::args_os().skip(1))
}
