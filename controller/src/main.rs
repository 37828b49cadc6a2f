//! `skiff-controller` binary: parse the configuration, set up logging, run.

#![forbid(unsafe_code)]

use clap::Parser;
use skiff_controller::config::{Args, Config};
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc's malloc: the write path allocates and frees small buffers on
/// every request across the runtime's threads, where glibc's malloc and free took about a
/// tenth of the members' CPU at 64 clients (BENCHMARKS.md, "Controller: the allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SKIFF_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config::from_args(Args::parse())?;
    skiff_controller::run(config).await?;
    Ok(())
}
