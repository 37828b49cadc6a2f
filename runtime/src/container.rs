//! The runtime's entry points: create and start a container (spawning its monitor), stop,
//! remove, list, and clean up what an interrupted agent left behind. Used by the
//! `skiff-agent container ...` commands and, later, by the agent's reconciler.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cgroup::{self, Limits};
use super::image::{
    ImageConfig, ImageStore, PruneReport, PullOptions, PullPolicy, RegistryOptions,
};
use super::monitor::{self, STOP_FILE};
use super::store::{
    ContainerConfig, Mount, NetworkAttach, RestartPolicy, State, Status, Store, StoreError,
    monitor_alive, now_ms,
};

/// The reason a container whose monitor died (killed, or the host rebooted) records: its
/// workload did not end by itself.
pub const MONITOR_GONE: &str = "monitor gone; container killed";

/// What the user asked to run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub image: String,
    pub name: Option<String>,
    /// Overrides the image's CMD (the entrypoint is kept, as `docker run IMAGE CMD...`).
    pub cmd: Vec<String>,
    /// Overrides the image's ENTRYPOINT.
    pub entrypoint: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub hostname: Option<String>,
    pub user: Option<String>,
    pub cwd: Option<String>,
    pub limits: Limits,
    pub restart: RestartPolicy,
    pub stop_signal: Option<i32>,
    pub stop_grace: Option<Duration>,
    /// When to pull the image from its registry.
    pub pull: PullPolicy,
    /// Contents for the container's /etc/resolv.conf (the node's DNS), if any.
    pub resolv_conf: Option<String>,
    /// Labels kept with the container (`skiff-agent container ps -o json` shows them).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Host devices granted beyond the default allow-list (the caller decides which may be).
    pub devices: Vec<crate::devices::DeviceNode>,
    /// Its network namespace: its own (plumbed by the network hook), its pod's, or the host's.
    pub network: NetworkAttach,
    /// Its pod's IPC namespace, if it shares one.
    pub ipc: Option<PathBuf>,
    /// Host directories bind-mounted into it.
    pub mounts: Vec<Mount>,
    /// A minimal init as PID 1.
    pub init: bool,
    /// Stopped when the node's lease from the controllers runs out (see [`crate::fence`]).
    pub fence: Option<crate::fence::Fence>,
}

/// Runtime failures, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] super::image::ImageError),
    #[error(transparent)]
    Cgroup(#[from] super::cgroup::CgroupError),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("starting monitor: {0}")]
    Spawn(std::io::Error),
    #[error("starting the thread that deletes removed containers: {0}")]
    Deleter(std::io::Error),
    #[error("container {id} failed to start: {reason}")]
    Start { id: String, reason: String },
    #[error("container {0} is running (stop it first, or use --force)")]
    Running(String),
    #[error("container {id} did not stop within {waited:?}")]
    StopTimeout { id: String, waited: Duration },
}

/// The runtime over one data dir.
pub struct Runtime {
    data_dir: PathBuf,
    /// Where live state goes (see [`Runtime::set_run_dir`]); `None`: beside each record.
    run_dir: Option<PathBuf>,
    store: Store,
    cgroup_parent: String,
    registry: RegistryOptions,
    progress: Option<indicatif::MultiProgress>,
    network: Option<std::sync::Arc<dyn NetworkHook>>,
    /// Cgroup managers by parent, for reading usage without detecting the host's layout each
    /// time (the layout does not change while the process runs).
    managers: std::sync::Mutex<
        std::collections::HashMap<String, std::sync::Arc<dyn cgroup::CgroupManager>>,
    >,
    /// Whether a spare monitor is kept (see [`Runtime::keep_spare_monitor`]).
    keep_spare: bool,
    spare: std::sync::Mutex<Option<MonitorProcess>>,
    /// A spare is being spawned (at most one at a time).
    refilling: std::sync::atomic::AtomicBool,
    /// The thread removed containers' files are deleted on (see
    /// [`Runtime::delete_in_background`]), and the queue to it.
    deleter: Option<(
        std::sync::mpsc::Sender<PathBuf>,
        std::thread::JoinHandle<()>,
    )>,
}

/// A monitor process as its starter holds it: the child, the pipe it reports its start on
/// (`ok` or `error: ...`), and, for a spare, the pipe its container's id is written to.
struct MonitorProcess {
    child: Child,
    report: std::io::PipeReader,
    id_pipe: Option<std::process::ChildStdin>,
}

/// Ends a spare monitor never handed a container: closing its id pipe ends it (it exits at
/// once), and it is reaped.
fn retire(mut spare: MonitorProcess) {
    drop(spare.id_pipe.take());
    let _ = spare.child.wait();
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let spare = self
            .spare
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(spare) = spare {
            retire(spare);
        }
        // What was queued is deleted before the runtime is gone.
        if let Some((queue, thread)) = self.deleter.take() {
            drop(queue);
            let _ = thread.join();
        }
    }
}

/// Plumbs containers into the node's network (the agent daemon's overlay). Without one, a
/// container has only loopback.
pub trait NetworkHook: Send + Sync {
    /// Gives the container (its namespace bound at `netns`) an interface and an address;
    /// returns the address.
    fn attach(&self, id: &str, netns: &Path) -> Result<std::net::IpAddr, String>;
    /// Frees what `attach` took. Idempotent.
    fn release(&self, id: &str);
    /// The address `id` holds.
    fn address(&self, id: &str) -> Option<std::net::IpAddr>;
}

/// Docker's default RLIMIT_NOFILE (1048576), capped at what this kernel allows.
fn nofile_limit() -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1_048_576);
    nr_open.min(1_048_576)
}

fn new_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..16)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect()
}

impl Runtime {
    pub fn open(data_dir: &Path, cgroup_parent: &str) -> Result<Runtime, RuntimeError> {
        Ok(Runtime {
            data_dir: data_dir.to_path_buf(),
            run_dir: None,
            store: Store::open(data_dir)?,
            cgroup_parent: cgroup_parent.to_string(),
            registry: RegistryOptions::default(),
            progress: None,
            network: None,
            managers: Default::default(),
            keep_spare: false,
            spare: Default::default(),
            refilling: Default::default(),
            deleter: None,
        })
    }

    /// Containers created from now on keep their live state (rewritten at each start, exit
    /// and restart by their monitor) under `dir`, which should be a tmpfs that outlives the
    /// agent but not the host (`/run/...` under systemd, with the directory preserved across
    /// restarts); their records stay in the data dir. Containers created before keep theirs
    /// where they are.
    pub fn set_run_dir(&mut self, dir: &Path) -> Result<(), RuntimeError> {
        self.run_dir = Some(self.store.claim_run_dir(dir)?);
        Ok(())
    }

    /// [`Runtime::open`], then [`Runtime::set_run_dir`] when there is a run dir.
    pub fn open_with_run_dir(
        data_dir: &Path,
        cgroup_parent: &str,
        run_dir: Option<&Path>,
    ) -> Result<Runtime, RuntimeError> {
        let mut rt = Runtime::open(data_dir, cgroup_parent)?;
        if let Some(dir) = run_dir {
            rt.set_run_dir(dir)?;
        }
        Ok(rt)
    }

    /// How images are pulled by `run`: registries, credentials, progress display.
    pub fn set_pull_options(
        &mut self,
        registry: RegistryOptions,
        progress: Option<indicatif::MultiProgress>,
    ) {
        self.registry = registry;
        self.progress = progress;
    }

    /// Containers started from now on are plumbed by `network`.
    pub fn set_network(&mut self, network: std::sync::Arc<dyn NetworkHook>) {
        self.network = Some(network);
    }

    /// The network hook containers and pods are plumbed by, if any.
    pub fn network_hook(&self) -> Option<&std::sync::Arc<dyn NetworkHook>> {
        self.network.as_ref()
    }

    /// Where containers and images live.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The container's network address, if it has one.
    pub fn address(&self, id: &str) -> Option<std::net::IpAddr> {
        self.network.as_ref()?.address(id)
    }

    /// The image store of this data dir.
    pub fn images(&self) -> Result<ImageStore, RuntimeError> {
        Ok(ImageStore::open(&self.data_dir.join("images"))?)
    }

    /// (container id, normalized image reference) of every container record.
    pub fn image_users(&self) -> Result<Vec<(String, String)>, RuntimeError> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .map(|(c, _)| {
                let image = ImageStore::normalize(&c.image).unwrap_or(c.image);
                (c.id, image)
            })
            .collect())
    }

    /// Removes image layers no image and no container uses (see [`ImageStore::prune`]).
    pub fn prune_images(&self, all: bool) -> Result<PruneReport, RuntimeError> {
        let in_use: std::collections::HashSet<PathBuf> = self
            .store
            .list()?
            .into_iter()
            .flat_map(|(c, _)| c.layers)
            .collect();
        Ok(self.images()?.prune(&in_use, all)?)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Resolves the container config from the image and the options (Docker's rules).
    fn resolve(
        &self,
        opts: &RunOptions,
        image: &ImageConfig,
        layers: Vec<PathBuf>,
    ) -> Result<ContainerConfig, RuntimeError> {
        let id = new_id();
        let name = opts.name.clone().unwrap_or_else(|| id[..12].to_string());
        skiff_common::validate_name("name", &name).map_err(|e| RuntimeError::Invalid {
            field: "name",
            reason: e.to_string(),
        })?;
        let entrypoint = opts
            .entrypoint
            .clone()
            .unwrap_or_else(|| image.entrypoint.clone());
        let cmd = if !opts.cmd.is_empty() || opts.entrypoint.is_some() {
            opts.cmd.clone()
        } else {
            image.cmd.clone()
        };
        let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if args.is_empty() {
            return Err(RuntimeError::Invalid {
                field: "command",
                reason: format!(
                    "image {} has no entrypoint or cmd; give a command",
                    opts.image
                ),
            });
        }
        let mut env: Vec<String> = image.env.clone();
        for (k, v) in &opts.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(RuntimeError::Invalid {
                    field: "env",
                    reason: format!("{k:?} is not a valid variable name"),
                });
            }
            env.retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k.as_str()));
            env.push(format!("{k}={v}"));
        }
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        let hostname = opts.hostname.clone().unwrap_or_else(|| name.clone());
        if hostname.is_empty() || hostname.len() > 64 || hostname.contains(['/', '\0', ' ']) {
            return Err(RuntimeError::Invalid {
                field: "hostname",
                reason: format!("{hostname:?} is not a hostname"),
            });
        }
        let stop_signal = match opts.stop_signal {
            Some(s) => s,
            None => match &image.stop_signal {
                Some(name) => skiff_common::spec::signal_number(name).ok_or_else(|| {
                    RuntimeError::Invalid {
                        field: "stop signal",
                        reason: format!("{name:?} is not a signal"),
                    }
                })?,
                None => libc::SIGTERM,
            },
        };
        let state_file = self
            .run_dir
            .as_deref()
            .map(|d| super::store::run_state_file(d, &id));
        Ok(ContainerConfig {
            id,
            name: name.clone(),
            image: opts.image.clone(),
            layers,
            args,
            env,
            cwd: opts
                .cwd
                .clone()
                .unwrap_or_else(|| image.working_dir.clone()),
            user: opts.user.clone().unwrap_or_else(|| image.user.clone()),
            hostname,
            limits: opts.limits.clone(),
            nofile: nofile_limit(),
            restart: opts.restart,
            stop_signal,
            stop_grace_ms: opts
                .stop_grace
                .unwrap_or(Duration::from_secs(10))
                .as_millis() as u64,
            cgroup_parent: self.cgroup_parent.clone(),
            log_max_bytes: 10 * 1024 * 1024,
            created_at_ms: now_ms(),
            labels: opts.labels.clone(),
            devices: opts.devices.clone(),
            network: opts.network.clone(),
            ipc: opts.ipc.clone(),
            mounts: opts.mounts.clone(),
            init: opts.init,
            fence: opts.fence.clone(),
            state_file,
        })
    }

    /// Creates a container and starts it under a new monitor. Returns once the workload has
    /// been exec'd (or failed to be); the monitor is a child of this process.
    pub fn run(&self, opts: &RunOptions) -> Result<(String, Child), RuntimeError> {
        let images = self.images()?;
        // Held until the container record names the layers, so a prune cannot take them.
        let _hold = images.hold()?;
        let pull = PullOptions {
            registry: self.registry.clone(),
            progress: self.progress.as_ref(),
        };
        let image = images.ensure(&opts.image, opts.pull, &pull)?;
        let mut config = self.resolve(opts, &image.config, image.layers.clone())?;
        config.image = image.reference.clone();
        for m in &config.mounts {
            if !m.source.is_dir() {
                return Err(RuntimeError::Invalid {
                    field: "mounts",
                    reason: format!("{} is not a directory", m.source.display()),
                });
            }
        }
        if let NetworkAttach::Join(ns) = &config.network
            && !ns.exists()
        {
            return Err(RuntimeError::Invalid {
                field: "network",
                reason: format!("no network namespace at {}", ns.display()),
            });
        }
        // Check the limits (and that cgroups work) before anything is written.
        let manager = cgroup::host(&self.cgroup_parent)?;
        let cg = manager.create(&config.id, &config.limits)?;
        // The device policy is in force before any process of the container runs.
        let mut rules = crate::devices::default_rules();
        // Granted nodes also get `m`: the container's init makes them in its /dev (the
        // workload itself has no CAP_MKNOD).
        rules.extend(config.devices.iter().map(|n| {
            let mut r = crate::devices::DeviceRule::from(n);
            r.access |= crate::devices::ACC_MKNOD;
            r
        }));
        if let Err(e) = cg.set_devices(&rules) {
            let _ = cg.delete();
            return Err(e.into());
        }
        let id = config.id.clone();
        if let Err(e) = self.store.create(&config) {
            let _ = cg.delete();
            return Err(e.into());
        }
        if let Some(text) = &opts.resolv_conf {
            // Into the overlay's upper layer: the image's own file (if any) is hidden, nothing
            // of the host's is mounted in.
            let etc = self.store.dir(&id).join("upper").join("etc");
            let written = std::fs::create_dir_all(&etc)
                .and_then(|()| std::fs::write(etc.join("resolv.conf"), text));
            if let Err(e) = written {
                let _ = self.remove(&id, true);
                return Err(RuntimeError::Start {
                    id,
                    reason: format!("writing resolv.conf: {e}"),
                });
            }
        }
        if let Some(net) = self
            .network
            .as_ref()
            .filter(|_| config.network == NetworkAttach::Own)
        {
            // The namespace exists before the workload does, so it starts with its network.
            let netns = monitor::netns_path(&self.data_dir, &id);
            let attached = monitor::create_netns(&netns).and_then(|()| net.attach(&id, &netns));
            if let Err(reason) = attached {
                let _ = self.remove(&id, true);
                return Err(RuntimeError::Start {
                    id,
                    reason: format!("network: {reason}"),
                });
            }
        }
        // A spare monitor, started while the last container ran, is handed this one; else one
        // is started for it now.
        let started = match self.take_spare(&id) {
            Some(spare) => Ok(spare),
            None => self.spawn_monitor(Some(&id)),
        };
        let (child, mut read) = match started {
            Ok(MonitorProcess { child, report, .. }) => (child, report),
            Err(e) => {
                // Its cgroup, network and record, as for a start that failed later.
                let _ = self.remove(&id, true);
                return Err(RuntimeError::Spawn(e));
            }
        };
        // The next spare loads while this monitor sets its container up.
        self.refill_spare();
        let mut report = String::new();
        let _ = read.read_to_string(&mut report);
        drop(read);
        let report = report.trim();
        if report == "ok" {
            return Ok((id, child));
        }
        let reason = report.strip_prefix("error: ").unwrap_or(report).to_string();
        let mut child = child;
        let _ = child.wait();
        // A container that never started leaves nothing behind.
        let _ = self.remove(&id, true);
        Err(RuntimeError::Start {
            id,
            reason: if reason.is_empty() {
                "monitor exited without a report".into()
            } else {
                reason
            },
        })
    }

    /// Keeps a spare monitor from now on: a monitor process started and loaded ahead of need,
    /// waiting for the id of the next container, so a start does not wait for the monitor's
    /// exec. For long-lived callers (the agent daemon); a process that starts one container
    /// and exits would only pay for a spare it never uses. The spare exits when this runtime
    /// is dropped or this process ends (its stdin closes).
    pub fn keep_spare_monitor(&mut self) {
        self.keep_spare = true;
        self.refill_spare();
    }

    /// From now on `remove` takes a container's directory out of the store (a rename) and
    /// returns, and a thread of this runtime deletes its files (the writable layer may hold
    /// many), so the caller does not wait for the deletion. For long-lived callers (the agent
    /// daemon); what is queued when the runtime is dropped is deleted first, and what a killed
    /// process left is deleted by `gc`.
    pub fn delete_in_background(&mut self) -> Result<(), RuntimeError> {
        if self.deleter.is_some() {
            return Ok(());
        }
        let (queue, work) = std::sync::mpsc::channel::<PathBuf>();
        let thread = std::thread::Builder::new()
            .name("skiff-delete".into())
            .spawn(move || {
                for dir in work {
                    if let Err(e) = super::store::delete_tree(&dir) {
                        tracing::warn!(error = %e, "deleting a removed container's files");
                    }
                }
            })
            .map_err(RuntimeError::Deleter)?;
        self.deleter = Some((queue, thread));
        Ok(())
    }

    /// Starts a monitor for container `id`, or a spare (`None`) that reads the id from its
    /// stdin.
    fn spawn_monitor(&self, id: Option<&str>) -> std::io::Result<MonitorProcess> {
        let (read, write) = std::io::pipe()?;
        let (program, args) = monitor::program(&self.data_dir)?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdout(write);
        match id {
            Some(id) => {
                let log = std::fs::File::create(self.store.dir(id).join("monitor.log"))?;
                cmd.arg(id).stdin(Stdio::null()).stderr(log);
            }
            // The spare opens its container's monitor log itself once it knows the container.
            None => {
                cmd.arg(monitor::SPARE_ID)
                    .stdin(Stdio::piped())
                    .stderr(Stdio::null());
            }
        }
        // A process group of its own: Ctrl-C at the terminal that ran us (SIGINT to our
        // group) and our exit do not reach the monitor.
        cmd.process_group(0);
        let mut child = cmd.spawn()?;
        // Our copy of the report pipe's write end goes with `cmd`: the report ends when the
        // monitor closes its copy.
        drop(cmd);
        let id_pipe = child.stdin.take();
        Ok(MonitorProcess {
            child,
            report: read,
            id_pipe,
        })
    }

    /// The spare monitor, told that it monitors container `id`; `None` when there is no spare
    /// or it has died.
    fn take_spare(&self, id: &str) -> Option<MonitorProcess> {
        use std::io::Write as _;
        let mut spare = self
            .spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        if !matches!(spare.child.try_wait(), Ok(None)) {
            tracing::warn!("the spare monitor had ended; starting one for {id}");
            let _ = spare.child.wait();
            return None;
        }
        // Closing the pipe after the id is what the spare waits for.
        let handed = match spare.id_pipe.take() {
            Some(mut pipe) => writeln!(pipe, "{id}"),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        match handed {
            Ok(()) => Some(spare),
            Err(e) => {
                tracing::warn!(error = %e, "the spare monitor is gone; starting one for {id}");
                let _ = spare.child.wait();
                None
            }
        }
    }

    /// Starts a spare monitor when one is kept and there is none, outside the lock (a start
    /// running at the same time takes the spare slot or spawns its own monitor, and does not
    /// wait for this exec). Best effort: without a spare the next start spawns its monitor
    /// itself.
    fn refill_spare(&self) {
        use std::sync::atomic::Ordering;
        let slot = || {
            self.spare
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if !self.keep_spare || slot().is_some() || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        match self.spawn_monitor(None) {
            Ok(m) => {
                let mut slot = slot();
                if slot.is_none() {
                    *slot = Some(m);
                } else {
                    drop(slot);
                    retire(m);
                }
            }
            Err(e) => tracing::warn!(error = %e, "starting a spare monitor"),
        }
        self.refilling.store(false, Ordering::Release);
    }

    /// Asks the monitor to stop the container (stop signal, then SIGKILL after `grace`) and
    /// returns at once; asking again while it stops changes nothing. Returns the state when
    /// the container has already ended.
    pub fn request_stop(
        &self,
        reference: &str,
        grace: Duration,
    ) -> Result<Option<State>, RuntimeError> {
        let id = self.store.resolve(reference)?;
        let state = self.store.state(&id)?;
        if !monitor_alive(&state) {
            return Ok(Some(self.settle(&id)?));
        }
        if state.stopping {
            return Ok(None);
        }
        let dir = self.store.dir(&id);
        std::fs::write(dir.join(STOP_FILE), grace.as_millis().to_string()).map_err(|e| {
            StoreError::Io {
                path: dir.join(STOP_FILE),
                source: e,
            }
        })?;
        if let Some(pid) = state.monitor_pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        Ok(None)
    }

    /// Asks the monitor to stop the container: stop signal, then SIGKILL after `grace`.
    /// Waits until it has exited.
    pub fn stop(&self, reference: &str, grace: Duration) -> Result<State, RuntimeError> {
        let id = self.store.resolve(reference)?;
        if let Some(ended) = self.request_stop(&id, grace)? {
            return Ok(ended);
        }
        let waited = grace + Duration::from_secs(10);
        let until = Instant::now() + waited;
        loop {
            let s = self.store.state(&id)?;
            if !monitor_alive(&s) {
                return Ok(s);
            }
            if Instant::now() >= until {
                return Err(RuntimeError::StopTimeout { id, waited });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes a stopped container (with `force`, stops it first, without grace).
    pub fn remove(&self, reference: &str, force: bool) -> Result<(), RuntimeError> {
        let id = self.store.resolve(reference).or_else(|e| {
            // A half-created record (no config) can still be removed by its full id.
            if self.store.dir(reference).exists() {
                Ok(reference.to_string())
            } else {
                Err(e)
            }
        })?;
        if let Ok(state) = self.store.state(&id)
            && monitor_alive(&state)
        {
            if !force {
                return Err(RuntimeError::Running(id));
            }
            self.stop(&id, Duration::ZERO)?;
        }
        self.release(&id);
        let Some(dir) = self.store.take_out(&id)? else {
            return Ok(());
        };
        match &self.deleter {
            Some((queue, _)) => {
                if let Err(unsent) = queue.send(dir) {
                    super::store::delete_tree(&unsent.0)?;
                }
            }
            None => super::store::delete_tree(&dir)?,
        }
        Ok(())
    }

    /// A container's usage as its cgroup reports it, with its limits; `None` when it has no
    /// cgroup (not started, or gone).
    pub fn stats(&self, id: &str) -> Result<Option<(cgroup::Stats, Limits)>, RuntimeError> {
        let config = self.store.config(id)?;
        Ok(self.stats_of(&config)?.map(|s| (s, config.limits)))
    }

    /// As [`Runtime::stats`], for a container whose record is at hand.
    pub fn stats_of(
        &self,
        config: &ContainerConfig,
    ) -> Result<Option<cgroup::Stats>, RuntimeError> {
        let manager = {
            let mut m = self
                .managers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match m.get(&config.cgroup_parent) {
                Some(manager) => manager.clone(),
                None => {
                    let manager: std::sync::Arc<dyn cgroup::CgroupManager> =
                        std::sync::Arc::from(cgroup::host(&config.cgroup_parent)?);
                    m.insert(config.cgroup_parent.clone(), manager.clone());
                    manager
                }
            }
        };
        let Some(cg) = manager.open(&config.id)? else {
            return Ok(None);
        };
        Ok(Some(cg.stats()?))
    }

    /// Frees what a container holds outside its directory: cgroup, network namespace.
    fn release(&self, id: &str) {
        let parent = self
            .store
            .config(id)
            .map(|c| c.cgroup_parent)
            .unwrap_or_else(|_| self.cgroup_parent.clone());
        if let Ok(manager) = cgroup::host(&parent)
            && let Ok(Some(cg)) = manager.open(id)
        {
            let _ = cg.kill_all();
            let _ = cg.delete();
        }
        monitor::remove_netns(&monitor::netns_path(&self.data_dir, id));
        if let Some(net) = &self.network {
            net.release(id);
        }
    }

    /// A container whose monitor is gone: kill whatever is left of it and record it exited.
    fn settle(&self, id: &str) -> Result<State, StoreError> {
        let config = self.store.config(id)?;
        let mut s = self.store.state_of(&config)?;
        if matches!(
            s.status,
            Status::Running | Status::Restarting | Status::Created
        ) {
            self.release(id);
            s.status = Status::Exited;
            s.pid = None;
            // Killed now (an earlier run's exit, if any, is not how this one ended).
            s.exit = Some(super::store::ExitInfo {
                code: None,
                signal: Some(libc::SIGKILL),
                oom_killed: false,
                at_ms: now_ms(),
            });
            s.monitor_pid = None;
            s.monitor_start = None;
            if s.error.is_none() {
                s.error = Some(MONITOR_GONE.into());
            }
            self.store.save_state(&config, &s)?;
        }
        Ok(s)
    }

    /// Cleans up after interrupted agents: records that never got a monitor, containers whose
    /// monitor died, half-created directories, and cgroups under our parent with no record.
    pub fn gc(&self) -> Result<Vec<String>, RuntimeError> {
        let mut cleaned = Vec::new();
        let known: Vec<(ContainerConfig, State)> = self.store.list()?;
        for (c, s) in &known {
            if monitor_alive(s) {
                continue;
            }
            match s.status {
                // Its monitor died: nothing reaps or logs it any more.
                Status::Running | Status::Restarting => {
                    self.settle(&c.id)?;
                    cleaned.push(c.id.clone());
                }
                // Never got a monitor; a record younger than a few seconds may be a start in
                // progress in another process.
                Status::Created if now_ms() - c.created_at_ms > 5_000 => {
                    self.release(&c.id);
                    self.store.remove_dir(&c.id)?;
                    cleaned.push(c.id.clone());
                }
                _ => {}
            }
        }
        for dir in self.store.orphans()? {
            let id = dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let young = std::fs::metadata(&dir)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(5));
            if !young {
                self.release(&id);
                self.store.remove_dir(&id)?;
                cleaned.push(id);
            }
        }
        // Directories taken out by a process killed before it deleted them.
        // Best effort: one that cannot be deleted now does not stop the rest of the sweep.
        for dir in self.store.removed_leftovers(Duration::from_secs(5)) {
            match super::store::delete_tree(&dir) {
                Ok(()) => cleaned.push(dir.display().to_string()),
                Err(e) => tracing::warn!(error = %e, "deleting a removed container's files"),
            }
        }
        if let Some(run_dir) = &self.run_dir {
            // Best effort: what is left now is swept the next time.
            match super::store::sweep_run_dir(&self.store, run_dir) {
                Ok(files) => cleaned.extend(files.iter().map(|f| f.display().to_string())),
                Err(e) => tracing::warn!(error = %e, "sweeping the run dir"),
            }
        }
        if let Ok(manager) = cgroup::host(&self.cgroup_parent) {
            let ids: Vec<String> = self.store.list()?.into_iter().map(|(c, _)| c.id).collect();
            for name in manager.list().unwrap_or_default() {
                if !ids.contains(&name)
                    && let Ok(Some(cg)) = manager.open(&name)
                    && cg.processes().map(|p| p.is_empty()).unwrap_or(false)
                {
                    let _ = cg.delete();
                    cleaned.push(name);
                }
            }
        }
        Ok(cleaned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run dir is kept in its plain form (see `Store::claim_run_dir`), so the state files
    /// records name under it pass the store's check.
    #[test]
    fn containers_are_given_state_files_under_the_plain_run_dir() {
        let data = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        let mut rt = Runtime::open(data.path(), "p").expect("open");
        let messy = format!("{}/./live//", run.path().display());
        rt.set_run_dir(Path::new(&messy)).expect("set");
        assert_eq!(
            rt.run_dir.as_deref(),
            Some(run.path().join("live").as_path())
        );
        let err = rt.set_run_dir(Path::new("relative")).expect_err("relative");
        assert!(err.to_string().contains("run dir relative"), "{err}");
    }

    /// With deletion in the background, `remove` returns once the container is out of the
    /// store, and its files are gone by the time the runtime is dropped. `gc` leaves a young
    /// directory in `removed/` alone (its deletion may be under way).
    #[test]
    fn removed_containers_are_deleted_in_the_background() {
        let data = tempfile::tempdir().expect("tmp");
        let mut rt = Runtime::open(data.path(), "skiff-test-no-such-parent").expect("open");
        rt.delete_in_background().expect("deleter");
        for id in ["b1", "b2"] {
            rt.store
                .create(&crate::store::tests::config(id))
                .expect("create");
            let upper = rt.store.dir(id).join("upper");
            std::fs::create_dir_all(upper.join("a/b")).expect("upper");
            std::fs::write(upper.join("a/b/f"), b"x").expect("file");
            rt.remove(id, false).expect("remove");
            assert!(!rt.store.dir(id).exists());
        }
        assert!(rt.store.list().expect("list").is_empty());
        drop(rt);
        let removed = data.path().join("removed");
        let left: Vec<_> = std::fs::read_dir(&removed).expect("ls").flatten().collect();
        assert!(left.is_empty(), "{left:?}");

        let rt = Runtime::open(data.path(), "skiff-test-no-such-parent").expect("open");
        rt.store
            .create(&crate::store::tests::config("b3"))
            .expect("create");
        let young = rt.store.take_out("b3").expect("take out").expect("moved");
        rt.gc().expect("gc");
        assert!(young.exists());
    }
}
