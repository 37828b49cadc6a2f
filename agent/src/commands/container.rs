//! `skiff-agent container ...`: run and inspect containers by hand.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use skiff_runtime::cgroup::Limits;
use skiff_runtime::container::RunOptions;
use skiff_runtime::image::PullPolicy;
use skiff_runtime::logs;
use skiff_runtime::store::{RestartPolicy, Status, monitor_alive};

use crate::config::Settings;

// Parsed once per process from the command line: the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum ContainerCmd {
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
        /// A host device to give the container, PATH[:PERMISSIONS] (r, w, m; default rw),
        /// made at the same path in its /dev. Repeatable.
        #[arg(long = "device")]
        devices: Vec<String>,
        /// A host directory to bind-mount, SRC:DST[:ro]. Repeatable.
        #[arg(long = "volume", short = 'v')]
        volumes: Vec<String>,
        /// Run a minimal init as PID 1 that reaps orphans and forwards signals.
        #[arg(long)]
        init: bool,
        /// Use the host's network namespace instead of one of its own.
        #[arg(long = "net-host")]
        net_host: bool,
        /// Fencing, as the agent runs a job with `[disconnect] stop_after`: stop the
        /// container (and do not start it) while the time in FILE (`CLOCK_BOOTTIME`
        /// nanoseconds, as the agent writes its lease) is older than `--fence-after`.
        #[arg(long, requires = "fence_after")]
        fence_lease: Option<std::path::PathBuf>,
        /// See `--fence-lease` (e.g. 2s).
        #[arg(long, requires = "fence_lease", value_parser = humantime::parse_duration)]
        fence_after: Option<std::time::Duration>,
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

pub fn run(cfg: &Settings, cmd: &ContainerCmd) -> anyhow::Result<ExitCode> {
    let mut rt = cfg.runtime()?;
    rt.set_pull_options(cfg.registry.clone(), Some(indicatif::MultiProgress::new()));
    // Clean up after interrupted agents (`run` skips it: it is on the start path).
    if !matches!(cmd, ContainerCmd::Run { .. }) {
        // A read must work on a full disk too: what cannot be cleaned now is left for later.
        if let Err(e) = rt.gc() {
            eprintln!("warning: cleaning up after interrupted containers: {e}");
        }
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
            devices,
            volumes,
            init,
            net_host,
            fence_lease,
            fence_after,
            rm,
            cmd,
        } => {
            let mounts = volumes
                .iter()
                .map(|v| {
                    let mut parts = v.splitn(3, ':');
                    let (Some(src), Some(dst)) = (parts.next(), parts.next()) else {
                        anyhow::bail!("--volume {v}: not SRC:DST[:ro]");
                    };
                    let read_only = match parts.next() {
                        None | Some("rw") => false,
                        Some("ro") => true,
                        Some(o) => anyhow::bail!("--volume {v}: {o:?} is not ro or rw"),
                    };
                    if !dst.starts_with('/') {
                        anyhow::bail!("--volume {v}: {dst} is not an absolute path");
                    }
                    Ok(skiff_runtime::store::Mount {
                        source: std::fs::canonicalize(src)
                            .map_err(|e| anyhow::anyhow!("--volume {v}: {src}: {e}"))?,
                        target: dst.to_owned(),
                        read_only,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
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
                devices: devices
                    .iter()
                    .map(|d| {
                        let (path, perms) = d.split_once(':').unwrap_or((d.as_str(), "rw"));
                        let access =
                            skiff_runtime::devices::parse_access(perms).ok_or_else(|| {
                                anyhow::anyhow!("--device {d}: permissions are r, w and m")
                            })?;
                        crate::policy::host_device(path, access)
                            .map_err(|e| anyhow::anyhow!("--device {d}: {e}"))
                    })
                    .collect::<anyhow::Result<_>>()?,
                mounts,
                init: *init,
                fence: fence_lease.clone().zip(*fence_after).map(|(lease, after)| {
                    skiff_runtime::fence::Fence {
                        lease,
                        after_ms: after.as_millis() as u64,
                    }
                }),
                network: if *net_host {
                    skiff_runtime::store::NetworkAttach::Host
                } else {
                    skiff_runtime::store::NetworkAttach::Own
                },
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
                            "labels": c.labels, "log_dropped_bytes": s.log_dropped_bytes,
                            "log_error": s.log_error,
                            "exit": s.exit, "error": s.error, "monitor_alive": monitor_alive(s),
                            "created_at_ms": c.created_at_ms, "started_at_ms": s.started_at_ms,
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
