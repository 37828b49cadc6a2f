//! Container start-to-exit through the runtime as the agent daemon calls it, for
//! `scripts/bench-runtime.sh`: one process that stays up and, for each container, calls the
//! runtime as the daemon's is set up (a spare monitor, files deleted in the background;
//! `--daemon-off`: neither, as `container run`): `Runtime::run`, wait for the monitor,
//! `Runtime::remove`, without the `skiff-agent container run` command line's own start and
//! exit per container. Unlike the daemon it plumbs no pod network (no network hook: the
//! container's namespace has loopback only, as runc's and crun's have in that script). Needs
//! root and `skiff-monitor` next to this binary (cargo builds both into the same directory).
//!
//!   skiff-bench-start --data-dir DIR --cgroup-parent P [--run-dir DIR] --image REF
//!                     [--warmup 10] [--runs 100] [--daemon-off] -- CMD...
//!
//! Prints one line of JSON: `{"times_ms": [...]}`, each run's time from the call to `run` to
//! the end of `remove`. `skiff-bench-start --print-oci-seccomp` prints the runtime's default
//! seccomp profile in the OCI form instead, for giving runc and crun the same filter.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use skiff_runtime::container::{RunOptions, Runtime};

#[derive(Parser)]
struct Args {
    /// Print the default seccomp profile as an OCI `linux.seccomp` object and exit.
    #[arg(long, exclusive = true)]
    print_oci_seccomp: bool,
    #[arg(long, required = true)]
    data_dir: Option<PathBuf>,
    #[arg(long, required = true)]
    cgroup_parent: Option<String>,
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// An image already in the data dir's store (e.g. `oci:DIR:TAG`, pulled beforehand).
    #[arg(long, required = true)]
    image: Option<String>,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Without what the agent daemon's runtime does for a long-lived process: start each
    /// container's monitor at its start, as `container run` does, instead of handing it to a
    /// spare monitor started ahead, and delete a removed container's files before `remove`
    /// returns instead of on a thread of its own.
    #[arg(long)]
    daemon_off: bool,
    #[arg(last = true)]
    cmd: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.print_oci_seccomp {
        let profile = skiff_runtime::security::oci_profile()
            .context("no seccomp profile for this architecture")?;
        println!("{profile}");
        return Ok(());
    }
    let (Some(data_dir), Some(parent), Some(image)) =
        (&args.data_dir, &args.cgroup_parent, &args.image)
    else {
        anyhow::bail!("--data-dir, --cgroup-parent and --image are needed");
    };
    ensure!(!args.cmd.is_empty(), "give the command after --");
    let mut rt = Runtime::open_with_run_dir(data_dir, parent, args.run_dir.as_deref())?;
    if !args.daemon_off {
        rt.keep_spare_monitor();
        rt.delete_in_background()?;
    }
    let opts = RunOptions {
        image: image.clone(),
        cmd: args.cmd.clone(),
        ..RunOptions::default()
    };
    let mut times = Vec::with_capacity(args.runs);
    for i in 0..args.warmup + args.runs {
        let start = Instant::now();
        let (id, mut monitor) = rt.run(&opts).context("run")?;
        monitor.wait().context("waiting for the monitor")?;
        let state = rt.store().state(&id)?;
        let code = state.exit.as_ref().map(|e| e.status_code());
        rt.remove(&id, true).context("remove")?;
        let took = start.elapsed();
        ensure!(
            code == Some(0),
            "container {id} ended with {code:?}: {state:?}"
        );
        if i >= args.warmup {
            times.push(took.as_secs_f64() * 1000.0);
        }
    }
    println!("{}", serde_json::json!({ "times_ms": times }));
    Ok(())
}
