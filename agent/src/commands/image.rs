//! `skiff-agent image ...`: the node's image store by hand.

use std::process::ExitCode;

use clap::Subcommand;
use skiff_runtime::image::PullOptions;

use crate::config::Settings;

#[derive(Subcommand)]
pub enum ImageCmd {
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

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}

pub fn run(cfg: &Settings, cmd: &ImageCmd) -> anyhow::Result<ExitCode> {
    let mut rt = cfg.runtime()?;
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
