//! `skiff-controller` binary: parse the configuration, set up logging, run.

#![forbid(unsafe_code)]

use clap::Parser;
use skiff_controller::config::{Args, Config};
use tracing_subscriber::EnvFilter;

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
