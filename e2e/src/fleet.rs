//! A fleet of simulated hosts on this machine: one network namespace per host, joined by a
//! bridge that lives in a namespace of its own, with underlay addresses from the benchmark
//! range 198.18.0.0/15. The real binaries run inside the host namespaces: controllers
//! (`c1`..), agents (`a1`..), and the CLI from a client host.
//!
//! Everything is named with a per-fleet prefix (`sk<pid><n>`): namespaces, links, cgroup
//! parents, data dirs. Dropping the fleet (also when a test panics) kills every process,
//! removes every container the agents started, their cgroups, the namespaces (and with them
//! the links) and the temp dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::bin;

/// The controllers' gRPC port on their hosts.
pub const RPC_PORT: u16 = 7700;
const HTTP_PORT: u16 = 7780;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One simulated host.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: String,
}

/// A process running in a host's namespace.
struct Proc {
    child: Option<Child>,
    host: Host,
    args: Vec<String>,
    log: PathBuf,
    binary: &'static str,
    /// What runs: the tree's `binary`, or an older build of it (see
    /// [`Fleet::start_with_binaries`]).
    exe: PathBuf,
    /// Extra environment (the fake clock of [`Fleet::start_fake_clocks`]).
    env: Vec<(String, String)>,
}

impl Proc {
    fn spawn(
        host: &Host,
        binary: &'static str,
        args: Vec<String>,
        log: PathBuf,
        env: Vec<(String, String)>,
        exe: Option<PathBuf>,
    ) -> Result<Proc> {
        let mut p = Proc {
            child: None,
            host: host.clone(),
            args,
            log,
            binary,
            exe: exe.unwrap_or_else(|| bin(binary)),
            env,
        };
        p.start()?;
        Ok(p)
    }

    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        // nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroup hierarchies
        // the agent needs.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.host.netns))
            .arg("--")
            .arg(&self.exe)
            .args(&self.args)
            // SKIFF_TEST_LOG (e.g. `info,skiff_agent::net::wg::noise=debug`) turns up the daemons' logs.
            .env(
                "SKIFF_LOG",
                std::env::var("SKIFF_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("SKIFF_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} on {}", self.binary, self.host.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, and wait for it.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The fleet. See the module doc.
pub struct Fleet {
    pub prefix: String,
    bridge_ns: String,
    hosts: Vec<Host>,
    controllers: Vec<Proc>,
    agents: Vec<Proc>,
    dir: tempfile::TempDir,
    /// The node agent's data dir and cgroup parent, per agent.
    agent_dirs: Vec<(PathBuf, String)>,
    image: PathBuf,
    controller_args: Vec<String>,
    /// Extra flags for every agent.
    agent_args: Vec<String>,
    /// Join tokens made so far, by role (agent, controller).
    tokens: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    /// When set, each agent's data dir is a tmpfs of this size (`mount -o size=`), so a test
    /// can fill it; the mounts, to remove when the fleet drops.
    agent_disk: Option<String>,
    mounts: Vec<PathBuf>,
    /// With [`Fleet::start_fake_clocks`]: each daemon's wall clock follows the offset in
    /// `DIR/clock-HOST` (libfaketime).
    fake_clocks: bool,
    /// When the fleet was made: libfaketime's shared memory files in /dev/shm of processes
    /// started since (and gone) are the fleet's, removed when it drops.
    born: std::time::SystemTime,
    /// Daemons (by host name: `c1`, `a1`...) that run another build than the tree's.
    binaries: std::collections::BTreeMap<String, PathBuf>,
}

/// Where Debian's libfaketime (the thread-safe one) is, if installed.
fn libfaketime() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
}

/// Unless a test sets its own, the fleet's agents report disk pressure only on a full disk:
/// their data directories share this machine's disk, and a CI machine whose disk the build
/// had filled to 95% saw every agent refuse new work at the default 90%.
fn disk_pressure_default(agent_args: &[String]) -> Vec<String> {
    if agent_args.iter().any(|a| a == "--disk-pressure-threshold") {
        Vec::new()
    } else {
        vec!["--disk-pressure-threshold".into(), "100".into()]
    }
}

/// `skiff-agent --data-dir DATA --cgroup-parent PARENT ARGS` on this host (not in a netns).
/// `skiff-agent ARGS` over an agent's data dir and cgroup parent (see [`Fleet::agent_dirs`]).
pub fn agent_cmd(data: &Path, parent: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin("skiff-agent"));
    c.arg("--data-dir")
        .arg(data)
        .args(["--cgroup-parent", parent])
        .args(args);
    c
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One fleet at a time in a test process (2 cores: timings would suffer otherwise). Hold the
/// guard for the test's length.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether this machine can run a fleet: root, cgroups, `ip netns`, `nsenter`. A missing one
/// fails the test unless SKIFF_TEST_SKIP opts out of it.
pub fn can_run() -> bool {
    use skiff_testkit::{Need, require, tool};
    require(&[
        Need::Root,
        Need::Cgroupfs,
        tool("ip", "iproute2"),
        tool("nsenter", "util-linux"),
        tool("iptables", "iptables"),
    ])
}

impl Fleet {
    /// Builds `controllers` + `agents` + 1 client hosts and starts the controllers (the first
    /// bootstraps, the others join) and the agents. `node_grace` goes to the controllers.
    pub fn start(controllers: usize, agents: usize, node_grace: &str) -> Result<Fleet> {
        Fleet::start_with(controllers, agents, node_grace, &[])
    }

    /// As [`Fleet::start`], with extra flags for every controller.
    pub fn start_with(
        controllers: usize,
        agents: usize,
        node_grace: &str,
        controller_args: &[&str],
    ) -> Result<Fleet> {
        Fleet::start_full(controllers, agents, node_grace, controller_args, &[])
    }

    /// As [`Fleet::start_with`], with extra flags for every agent too.
    pub fn start_full(
        controllers: usize,
        agents: usize,
        node_grace: &str,
        controller_args: &[&str],
        agent_args: &[&str],
    ) -> Result<Fleet> {
        Fleet::launch(
            controllers,
            agents,
            node_grace,
            controller_args,
            agent_args,
            None,
        )
    }

    /// As [`Fleet::start_full`], each agent's data directory on a tmpfs of its own of
    /// `disk_size` (`64m`, say), which a test may fill.
    pub fn start_small_disks(
        controllers: usize,
        agents: usize,
        node_grace: &str,
        agent_args: &[&str],
        disk_size: &str,
    ) -> Result<Fleet> {
        Fleet::launch(
            controllers,
            agents,
            node_grace,
            &[],
            agent_args,
            Some(disk_size.to_owned()),
        )
    }

    fn launch(
        controllers: usize,
        agents: usize,
        node_grace: &str,
        controller_args: &[&str],
        agent_args: &[&str],
        agent_disk: Option<String>,
    ) -> Result<Fleet> {
        Fleet::launch_with(
            controllers,
            agents,
            node_grace,
            controller_args,
            agent_args,
            agent_disk,
            false,
            Default::default(),
        )
    }

    /// As [`Fleet::start`], with some daemons (by host name: `c1`, `a1`...) running another
    /// build of `skiff-controller` or `skiff-agent` (an older release's, for the
    /// compatibility test).
    pub fn start_with_binaries(
        controllers: usize,
        agents: usize,
        node_grace: &str,
        binaries: &[(&str, &Path)],
    ) -> Result<Fleet> {
        Fleet::launch_with(
            controllers,
            agents,
            node_grace,
            &[],
            &[],
            None,
            false,
            binaries
                .iter()
                .map(|(h, p)| ((*h).to_owned(), p.to_path_buf()))
                .collect(),
        )
    }

    /// As [`Fleet::start_with`], every daemon's wall clock (`CLOCK_REALTIME` only: the
    /// monotonic and boot clocks are never stepped) under [`Fleet::jump_clock`]'s control,
    /// through Debian's libfaketime. Fails naming the package when it is missing.
    pub fn start_fake_clocks(
        controllers: usize,
        agents: usize,
        node_grace: &str,
        controller_args: &[&str],
    ) -> Result<Fleet> {
        ensure!(
            libfaketime().is_some(),
            "libfaketime is not installed (apt-get install libfaketime): the clock-jump tests need it"
        );
        Fleet::launch_with(
            controllers,
            agents,
            node_grace,
            controller_args,
            &[],
            None,
            true,
            Default::default(),
        )
    }

    /// Steps host `name`'s wall clock to `offset` from the real one (`+120`, `-120`, `+0`:
    /// seconds); its daemons see it within a second.
    pub fn jump_clock(&self, name: &str, offset: &str) -> Result<()> {
        ensure!(
            self.fake_clocks,
            "the fleet was not started with fake clocks"
        );
        self.host(name)?;
        std::fs::write(
            self.dir.path().join(format!("clock-{name}")),
            format!("{offset}\n"),
        )?;
        Ok(())
    }

    /// The environment that puts a daemon of host `name` under its fake clock (none unless
    /// the fleet has fake clocks).
    fn clock_env(&self, name: &str) -> Result<Vec<(String, String)>> {
        if !self.fake_clocks {
            return Ok(Vec::new());
        }
        let lib = libfaketime().context("libfaketime is not installed")?;
        let file = self.dir.path().join(format!("clock-{name}"));
        if !file.exists() {
            std::fs::write(&file, "+0\n")?;
        }
        Ok(vec![
            ("LD_PRELOAD".into(), lib.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ("FAKETIME_CACHE_DURATION".into(), "1".into()),
        ])
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_with(
        controllers: usize,
        agents: usize,
        node_grace: &str,
        controller_args: &[&str],
        agent_args: &[&str],
        agent_disk: Option<String>,
        fake_clocks: bool,
        binaries: std::collections::BTreeMap<String, PathBuf>,
    ) -> Result<Fleet> {
        let prefix = format!(
            "sk{}{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()?;
        let mut fleet = Fleet {
            bridge_ns: format!("{prefix}-br"),
            prefix: prefix.clone(),
            hosts: Vec::new(),
            controllers: Vec::new(),
            agents: Vec::new(),
            agent_dirs: Vec::new(),
            image: dir.path().join("image"),
            dir,
            controller_args: controller_args.iter().map(|s| (*s).to_owned()).collect(),
            tokens: Default::default(),
            agent_args: agent_args.iter().map(|s| (*s).to_owned()).collect(),
            agent_disk,
            mounts: Vec::new(),
            fake_clocks,
            born: std::time::SystemTime::now(),
            binaries,
        };
        fleet.build_network(controllers, agents)?;
        let out = Command::new("sh")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../runtime/tests/fixtures/make-busybox-image.sh"
            ))
            .arg(&fleet.image)
            .output()?;
        ensure!(
            out.status.success(),
            "fixture image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for i in 0..controllers {
            fleet.start_controller(i, node_grace)?;
            if i == 0 {
                fleet.wait_for(
                    "the first controller to lead",
                    Duration::from_secs(20),
                    |f| Ok(f.cli(&["cluster", "leader"])?.status.success()),
                )?;
            }
        }
        let want = controllers;
        fleet.wait_for(
            "every controller to be a voter",
            Duration::from_secs(30),
            |f| {
                let m = f.cli_json(&["cluster", "members"])?;
                Ok(m.as_array()
                    .is_some_and(|a| a.iter().filter(|m| m["voter"] == true).count() == want))
            },
        )?;
        for i in 0..agents {
            fleet.start_agent(i)?;
        }
        fleet.wait_for("every agent to register", Duration::from_secs(20), |f| {
            Ok(f.ready_nodes()?.len() == agents)
        })?;
        Ok(fleet)
    }

    fn build_network(&mut self, controllers: usize, agents: usize) -> Result<()> {
        ip(&["netns", "add", &self.bridge_ns])?;
        let in_br = |args: &[&str]| -> Result<()> {
            let mut a = vec!["-n", self.bridge_ns.as_str()];
            a.extend_from_slice(args);
            ip(&a)
        };
        in_br(&["link", "add", "br0", "type", "bridge"])?;
        in_br(&["link", "set", "br0", "up"])?;
        let names: Vec<String> = (1..=controllers)
            .map(|i| format!("c{i}"))
            .chain((1..=agents).map(|i| format!("a{i}")))
            .chain(std::iter::once("cli".to_owned()))
            .collect();
        for (i, name) in names.iter().enumerate() {
            let netns = format!("{}-{name}", self.prefix);
            let addr = format!("198.18.0.{}", i + 1);
            ip(&["netns", "add", &netns])?;
            self.hosts.push(Host {
                name: name.clone(),
                netns: netns.clone(),
                addr: addr.clone(),
            });
            let outer = format!("{}{name}", self.prefix);
            ip(&[
                "-n",
                &netns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &outer,
                "netns",
                &self.bridge_ns,
            ])?;
            in_br(&["link", "set", &outer, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr}/16"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("no host {name}"))
    }

    fn controller_addrs(&self) -> String {
        self.hosts
            .iter()
            .filter(|h| h.name.starts_with('c') && h.name != "cli")
            .map(|h| format!("{}:{RPC_PORT}", h.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_controller(&mut self, i: usize, node_grace: &str) -> Result<()> {
        let host = self.host(&format!("c{}", i + 1))?.clone();
        let mut args = vec![
            "--id".to_owned(),
            (i + 1).to_string(),
            "--data-dir".into(),
            self.dir.path().join(&host.name).display().to_string(),
            "--rpc-addr".into(),
            format!("{}:{RPC_PORT}", host.addr),
            "--http-addr".into(),
            format!("{}:{HTTP_PORT}", host.addr),
        ];
        // Empty: the default grace.
        if !node_grace.is_empty() {
            args.extend(["--node-grace".into(), node_grace.into()]);
        }
        args.extend(self.controller_args.iter().cloned());
        if i == 0 {
            args.push("--bootstrap".into());
        } else {
            args.push("--join".into());
            args.push(format!("{}:{RPC_PORT}", self.host("c1")?.addr));
            args.push("--join-token".into());
            args.push(self.token("controller")?);
        }
        let log = self.dir.path().join(format!("{}.log", host.name));
        self.controllers.push(Proc::spawn(
            &host,
            "skiff-controller",
            args,
            log,
            self.clock_env(&host.name)?,
            self.binaries.get(&host.name).cloned(),
        )?);
        Ok(())
    }

    fn start_agent(&mut self, i: usize) -> Result<()> {
        let host = self.host(&format!("a{}", i + 1))?.clone();
        let data = self.dir.path().join(&host.name);
        let parent = format!("{}/{}", self.prefix, host.name);
        let zone = if i.is_multiple_of(2) { "a" } else { "b" };
        if let Some(size) = self.agent_disk.clone() {
            std::fs::create_dir_all(&data)?;
            self.mount_tmpfs(&data, &size, "0711")?;
        }
        let args = vec![
            "--data-dir".to_owned(),
            data.display().to_string(),
            "--cgroup-parent".into(),
            parent.clone(),
            "--controller".into(),
            self.controller_addrs(),
            "--name".into(),
            host.name.clone(),
            "--advertise-addr".into(),
            host.addr.clone(),
            "--labels".into(),
            format!("zone={zone}"),
            "--cpus".into(),
            "2".into(),
            "--memory".into(),
            "2Gi".into(),
            // Names outside skiff.internal go to the cli host (a test may answer there), never
            // to this machine's resolvers.
            "--dns-upstream".into(),
            format!("{}:53", self.host("cli")?.addr),
            // The fleet's image is a local OCI layout: the agents may read it from there.
            "--local-image-dir".into(),
            self.image.display().to_string(),
            "--join-token".into(),
            self.token("agent")?,
        ]
        .into_iter()
        .chain(disk_pressure_default(&self.agent_args))
        .chain(self.agent_args.iter().cloned())
        .collect::<Vec<_>>();
        let log = self.dir.path().join(format!("{}.log", host.name));
        self.agents.push(Proc::spawn(
            &host,
            "skiff-agent",
            args,
            log,
            self.clock_env(&host.name)?,
            self.binaries.get(&host.name).cloned(),
        )?);
        self.agent_dirs.push((data, parent));
        Ok(())
    }

    /// The admin credentials the first controller wrote.
    pub fn credentials(&self) -> PathBuf {
        self.dir.path().join("c1").join("admin.creds")
    }

    /// A join token for `role` (agent, controller), made once per fleet.
    pub fn token(&self, role: &str) -> Result<String> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = tokens.get(role) {
            return Ok(t.clone());
        }
        let t = self
            .cli_ok(&["token", "create", "--role", role, "--ttl", "2h"])?
            .trim()
            .to_string();
        tokens.insert(role.to_string(), t.clone());
        Ok(t)
    }

    /// The busybox image every agent can run (`oci:` path on the shared file system).
    pub fn image(&self) -> String {
        format!("oci:{}", self.image.display())
    }

    /// Writes a job spec into the fleet's dir; returns its path.
    pub fn spec(&self, name: &str, text: &str) -> Result<PathBuf> {
        let p = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, text)?;
        Ok(p)
    }

    /// Runs `skiff ARGS` from the client host against every controller.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.cli_with(&self.credentials(), args)
    }

    /// As [`Fleet::cli`], with other credentials.
    pub fn cli_with(&self, credentials: &Path, args: &[&str]) -> Result<Output> {
        Ok(self.cli_command(credentials, args)?.output()?)
    }

    /// `skiff ARGS` on the client host, to run (a thread of its own may run it while the
    /// fleet changes).
    pub fn cli_command(&self, credentials: &Path, args: &[&str]) -> Result<Command> {
        let host = self.host("cli")?;
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", host.netns))
            .arg("--")
            .arg(bin("skiff"))
            .arg("--credentials")
            .arg(credentials)
            .arg("--controller")
            .arg(self.controller_addrs())
            .args(args)
            .env_remove("SKIFF_CONTROLLER");
        Ok(c)
    }

    /// Starts `skiff ARGS` from the client host (stdout and stderr piped), for a command that
    /// runs while the test goes on.
    pub fn cli_spawn(&self, args: &[&str]) -> Result<std::process::Child> {
        Ok(self
            .cli_command(&self.credentials(), args)?
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?)
    }

    /// Of `job`'s allocations that should run, those running (draining ones too); of its
    /// service's endpoints, those taking traffic.
    pub fn running_and_ready(&self, job: &str) -> Result<(usize, usize)> {
        let ps = self.cli_json(&["ps", job])?;
        let running = ps
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["status"] == "running" && a["desired"] == "run")
            .count();
        let services = self.cli_json(&["services"])?;
        let ready = services
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["job"] == job)
            .and_then(|s| s["endpoints"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|e| e["ready"] == true)
            .count();
        Ok((running, ready))
    }

    /// `skiff ARGS`, which must succeed; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        crate::stdout(self.cli(args)?, format_args!("skiff {}", args.join(" ")))
    }

    /// `skiff ARGS -o json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.cli_ok(&all)?)?)
    }

    /// Names of the nodes the controllers see as ready.
    pub fn ready_nodes(&self) -> Result<Vec<String>> {
        let nodes = self.cli_json(&["nodes"])?;
        Ok(nodes
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|n| n["status"] == "ready")
                    .filter_map(|n| n["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The job's allocations that should run, as (id, node, status).
    pub fn allocations(&self, job: &str) -> Result<Vec<(String, String, String)>> {
        let ps = self.cli_json(&["ps", job])?;
        Ok(ps
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        (
                            x["id"].as_str().unwrap_or_default().to_owned(),
                            x["node"].as_str().unwrap_or_default().to_owned(),
                            x["status"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The containers agent `name` has on its host: (container id, name, status, pid).
    pub fn containers(&self, agent: &str) -> Result<Vec<(String, String, String, i64)>> {
        let i = self.agent_index(agent)?;
        let (data, parent) = &self.agent_dirs[i];
        let out = agent_cmd(data, parent, &["container", "ps", "-a", "-o", "json"]).output()?;
        ensure!(out.status.success(), "container ps on {agent}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        (
                            c["id"].as_str().unwrap_or_default().to_owned(),
                            c["name"].as_str().unwrap_or_default().to_owned(),
                            c["status"].as_str().unwrap_or_default().to_owned(),
                            c["pid"].as_i64().unwrap_or(-1),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The images in agent `name`'s store, as `skiff-agent image ls` names them.
    pub fn images(&self, agent: &str) -> Result<Vec<String>> {
        let i = self.agent_index(agent)?;
        let (data, parent) = &self.agent_dirs[i];
        let out = agent_cmd(data, parent, &["image", "ls", "-o", "json"]).output()?;
        ensure!(
            out.status.success(),
            "image ls on {agent}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .map(|i| i["reference"].as_str().unwrap_or_default().to_owned())
            .collect())
    }

    /// Running containers on agent `name`.
    pub fn running(&self, agent: &str) -> Result<Vec<(String, String, String, i64)>> {
        Ok(self
            .containers(agent)?
            .into_iter()
            .filter(|c| c.2 == "running")
            .collect())
    }

    fn agent_index(&self, name: &str) -> Result<usize> {
        name.strip_prefix('a')
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n >= 1 && *n <= self.agents.len())
            .map(|n| n - 1)
            .with_context(|| format!("no agent {name}"))
    }

    /// SIGKILLs agent `name` (its containers keep running, as after a crash).
    pub fn kill_agent(&mut self, name: &str) -> Result<()> {
        self.agent_index(name)?;
        self.daemon(name)?.kill();
        Ok(())
    }

    /// Starts agent `name` again with the same flags.
    pub fn restart_agent(&mut self, name: &str) -> Result<()> {
        self.agent_index(name)?;
        self.restart(name)
    }

    /// Starts stopped daemon `name` again: the same binary, flags and data.
    fn restart(&mut self, name: &str) -> Result<()> {
        let p = self.daemon(name)?;
        ensure!(p.pid().is_none(), "{} on {name} is running", p.binary);
        p.start()
    }

    /// Replaces daemon `name`'s binary (`c1`, `a1`...) as an upgrade does: [`Fleet::stop`],
    /// then [`Fleet::start_daemon`] with `exe` (`None`: the tree's build).
    pub fn upgrade(&mut self, name: &str, exe: Option<&Path>) -> Result<()> {
        self.stop(name)?;
        self.start_daemon(name, exe)
    }

    fn daemon(&mut self, name: &str) -> Result<&mut Proc> {
        self.controllers
            .iter_mut()
            .chain(self.agents.iter_mut())
            .find(|p| p.host.name == name)
            .with_context(|| format!("no daemon on {name}"))
    }

    /// SIGTERM to daemon `name` alone (an agent's containers, monitors and tunnel keep
    /// running, as under systemd's `KillMode=process`), and wait up to 20 s for it to exit.
    pub fn stop(&mut self, name: &str) -> Result<()> {
        let p = self.daemon(name)?;
        let Some(mut child) = p.child.take() else {
            return Ok(());
        };
        let pid = i32::try_from(child.id()).context("pid")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .with_context(|| format!("SIGTERM to {} on {name}", p.binary))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                // Never two on the same data: killed and reaped before saying so.
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} on {name} did not exit within 20 s of SIGTERM", p.binary);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts stopped daemon `name` with its flags and data, running `exe` (`None`: the
    /// tree's build).
    pub fn start_daemon(&mut self, name: &str, exe: Option<&Path>) -> Result<()> {
        let p = self.daemon(name)?;
        p.exe = exe.map_or_else(|| bin(p.binary), Path::to_path_buf);
        self.restart(name)
    }

    /// Each agent's (name, data dir, cgroup parent), for [`agent_cmd`] from another thread.
    pub fn agent_dirs(&self) -> Vec<(String, PathBuf, String)> {
        self.agent_dirs
            .iter()
            .enumerate()
            .map(|(i, (d, p))| (format!("a{}", i + 1), d.clone(), p.clone()))
            .collect()
    }

    /// SIGKILLs controller `name` (a host name, `c1`...).
    pub fn kill_controller(&mut self, name: &str) -> Result<()> {
        self.controller(name)?;
        self.daemon(name)?.kill();
        Ok(())
    }

    /// Starts controller `name` again with the same flags and data dir.
    pub fn restart_controller(&mut self, name: &str) -> Result<()> {
        self.controller(name)?;
        self.restart(name)
    }

    fn controller(&self, name: &str) -> Result<&Proc> {
        self.controllers
            .iter()
            .find(|c| c.host.name == name)
            .with_context(|| format!("no controller {name}"))
    }

    /// Whether controller `name`'s process has ended by itself (a fatal error), and how.
    pub fn controller_exit(&mut self, name: &str) -> Result<Option<std::process::ExitStatus>> {
        self.controller(name)?;
        let c = self.daemon(name)?;
        let status = match c.child.as_mut() {
            Some(child) => child.try_wait()?,
            None => None,
        };
        if status.is_some() {
            c.child = None;
        }
        Ok(status)
    }

    /// Mounts a tmpfs of `size` on `dir` (removed when the fleet drops).
    fn mount_tmpfs(&mut self, dir: &Path, size: &str, mode: &str) -> Result<()> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode={mode}")])
            .arg(format!("{}-disk", self.prefix))
            .arg(dir)
            .output()
            .context("running mount")?;
        ensure!(
            out.status.success(),
            "mounting a tmpfs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounts.push(dir.to_owned());
        Ok(())
    }

    /// Moves controller `name`'s data onto a tmpfs of `size` (`48m`) of its own, which a test
    /// may fill: the controller is stopped, its data copied over, and started again.
    pub fn controller_on_small_disk(&mut self, name: &str, size: &str) -> Result<PathBuf> {
        self.kill_controller(name)?;
        let data = self.dir.path().join(name);
        let old = self.dir.path().join(format!("{name}.old"));
        std::fs::rename(&data, &old)?;
        std::fs::create_dir_all(&data)?;
        self.mount_tmpfs(&data, size, "0700")?;
        let out = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", old.display()))
            .arg(&data)
            .output()?;
        ensure!(
            out.status.success(),
            "copying {name}'s data: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_dir_all(&old)?;
        self.restart_controller(name)?;
        Ok(data)
    }

    /// The host name of the controller that leads now.
    pub fn leader_host(&self) -> Result<String> {
        let leader = self.cli_json(&["cluster", "leader"])?;
        let addr = leader["rpc_addr"].as_str().context("leader address")?;
        self.controllers
            .iter()
            .find(|c| format!("{}:{RPC_PORT}", c.host.addr) == addr)
            .map(|c| c.host.name.clone())
            .with_context(|| format!("no controller at {addr}"))
    }

    /// SIGKILLs the controller that leads now; returns its host name.
    pub fn kill_leader(&mut self) -> Result<String> {
        let leader = self.cli_json(&["cluster", "leader"])?;
        let addr = leader["rpc_addr"]
            .as_str()
            .context("leader address")?
            .to_owned();
        let i = self
            .controllers
            .iter()
            .position(|c| format!("{}:{RPC_PORT}", c.host.addr) == addr)
            .with_context(|| format!("no controller at {addr}"))?;
        self.controllers[i].kill();
        Ok(self.controllers[i].host.name.clone())
    }

    /// The text of a process's log (for failure messages).
    pub fn log(&self, host: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{host}.log"))).unwrap_or_default()
    }

    /// The last `n` lines of every process's log, for failure messages.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for h in &self.hosts {
            let text = self.log(&h.name);
            if text.is_empty() {
                continue;
            }
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} (last {n} lines)\n", h.name));
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Polls `f` every 100 ms until it says yes; fails after `timeout` naming `what`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Fleet) -> Result<bool>,
    ) -> Result<Duration> {
        let start = Instant::now();
        let mut last_err = None;
        loop {
            match f(self) {
                Ok(true) => return Ok(start.elapsed()),
                Ok(false) => {}
                Err(e) => last_err = Some(e),
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what}{}\n{}",
                    last_err
                        .map(|e| format!(" (last error: {e:#})"))
                        .unwrap_or_default(),
                    self.log_tails(12)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `f` like [`Fleet::wait_for`] until it returns a value, and returns it.
    pub fn wait_for_value<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Fleet) -> Result<Option<T>>,
    ) -> Result<T> {
        let mut got = None;
        self.wait_for(what, timeout, |fleet| {
            got = f(fleet)?;
            Ok(got.is_some())
        })?;
        got.with_context(|| format!("waiting for {what}"))
    }

    /// The fleet's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The pid of an agent's process, while it runs.
    pub fn agent_pid(&self, agent: &str) -> Result<Option<u32>> {
        Ok(self.agents[self.agent_index(agent)?].pid())
    }

    /// An agent's data dir.
    pub fn agent_data(&self, agent: &str) -> Result<&Path> {
        Ok(&self.agent_dirs[self.agent_index(agent)?].0)
    }

    /// The pid of an agent's userspace WireGuard tunnel, if one runs.
    pub fn tunnel_pid(&self, agent: &str) -> Result<Option<i32>> {
        Ok(tunnel_pids(self.agent_data(agent)?).into_iter().next())
    }

    /// Cuts host `name` off the network (its link on the bridge down): its processes keep
    /// running and its connections stay open, as behind a failed switch port.
    pub fn partition(&self, name: &str) -> Result<()> {
        self.host(name)?;
        let link = format!("{}{name}", self.prefix);
        ip(&["-n", &self.bridge_ns, "link", "set", &link, "down"])
    }

    /// Puts host `name` back on the network.
    pub fn heal(&self, name: &str) -> Result<()> {
        self.host(name)?;
        let link = format!("{}{name}", self.prefix);
        ip(&["-n", &self.bridge_ns, "link", "set", &link, "up"])
    }

    /// Agent `name`'s container records (`skiff-agent container ps -a -o json`), whatever
    /// their state: status, pid, exit, error, started_at_ms, labels.
    pub fn container_records(&self, agent: &str) -> Result<Vec<serde_json::Value>> {
        let i = self.agent_index(agent)?;
        let (data, parent) = &self.agent_dirs[i];
        let out = agent_cmd(data, parent, &["container", "ps", "-a", "-o", "json"]).output()?;
        ensure!(out.status.success(), "container ps on {agent}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Runs `args` on a simulated host (in its network namespace).
    pub fn on_host(&self, host: &str, args: &[&str]) -> Result<Output> {
        let h = self.host(host)?;
        Ok(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", h.netns))
            .arg("--")
            .args(args)
            .output()?)
    }

    /// Runs `args` in a container's network namespace (a container of `agent`, by id).
    pub fn in_container_netns(
        &self,
        agent: &str,
        container: &str,
        args: &[&str],
    ) -> Result<Output> {
        // Its own namespace, or (a container of a pod) the one its config says it joins.
        let data = self.agent_data(agent)?;
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(data.join("containers").join(container).join("config.json"))
                .with_context(|| format!("container {container} on {agent}"))?,
        )?;
        let ns = match config["network"]["join"].as_str() {
            Some(path) => PathBuf::from(path),
            None => data.join("run/netns").join(container),
        };
        Ok(Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .arg("--")
            .args(args)
            .output()?)
    }

    /// `wg show skiff-wg dump` against an agent's tunnel: run in the host's namespace with a
    /// private /run in which /run/wireguard/skiff-wg.sock is the agent's socket (every host
    /// shares this machine's /run, so agents keep their sockets in their data dirs).
    pub fn wg_dump(&self, agent: &str) -> Result<String> {
        let sock = self.agent_data(agent)?.join("net/wg/skiff-wg.sock");
        let script = format!(
            "mount -t tmpfs skiff-wg /run && mkdir /run/wireguard &&              ln -s {} /run/wireguard/skiff-wg.sock && wg show skiff-wg dump",
            sock.display()
        );
        let out = self.on_host(agent, &["unshare", "-m", "sh", "-c", &script])?;
        ensure!(
            out.status.success(),
            "wg show on {agent}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An agent's peers as `wg show dump` lists them: (public key, endpoint, latest handshake
    /// unix seconds).
    pub fn wg_peers(&self, agent: &str) -> Result<Vec<(String, String, i64)>> {
        let dump = self.wg_dump(agent)?;
        Ok(dump
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some((
                    f.first()?.to_string(),
                    f.get(2)?.to_string(),
                    f.get(4)?.parse().ok()?,
                ))
            })
            .collect())
    }
}

/// Userspace tunnels whose socket lives under `data`.
fn tunnel_pids(data: &Path) -> Vec<i32> {
    let needle = data.join("net/wg").display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("__wg-tunnel") && cmd.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.kill();
        }
        for c in &mut self.controllers {
            c.kill();
        }
        // Containers and tunnels outlive their agent: remove them, then the cgroup parents.
        for (data, parent) in &self.agent_dirs {
            for pid in tunnel_pids(data) {
                crate::signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
            // The links agents make in the shared /run/wireguard to their UAPI sockets.
            for link in std::fs::read_dir("/run/wireguard")
                .into_iter()
                .flatten()
                .flatten()
            {
                if std::fs::read_link(link.path()).is_ok_and(|t| t.starts_with(data)) {
                    let _ = std::fs::remove_file(link.path());
                }
            }
            // Mesh sidecars too (their pids beside their directories), then their cgroups.
            let mut sidecars = Vec::new();
            for e in std::fs::read_dir(data.join("mesh"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let pid = std::fs::read_to_string(e.path())
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok());
                if let Some(pid) = pid.filter(|_| e.path().extension().is_some_and(|x| x == "pid"))
                {
                    crate::signal(pid, nix::sys::signal::Signal::SIGKILL);
                    sidecars.push(pid);
                }
            }
            let t = std::time::Instant::now();
            while sidecars.iter().any(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| !s.contains(") Z"))
            }) && t.elapsed() < std::time::Duration::from_secs(3)
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            for h in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                for cg in std::fs::read_dir(h.path().join(parent))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if cg.file_name().to_string_lossy().starts_with("mesh-") {
                        let _ = std::fs::remove_dir(cg.path());
                    }
                }
            }
            let ids = agent_cmd(data, parent, &["container", "ps", "-a", "-o", "json"])
                .output()
                .ok()
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok());
            for c in ids
                .as_ref()
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(id) = c["id"].as_str() {
                    let _ = agent_cmd(data, parent, &["container", "rm", "-f", id]).output();
                }
            }
            for h in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let _ = std::fs::remove_dir(h.path().join(parent));
                let _ = std::fs::remove_dir(h.path().join(&self.prefix));
            }
        }
        // What the agents mounted under their data dirs and outlives them (pods' network and
        // IPC namespaces, bound to files), deepest first, so the temporary directory can go.
        for m in mounts_under(self.dir.path()) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        // The containers' mounts are gone with them: the agents' small disks can go now.
        for m in &self.mounts {
            let _ = Command::new("umount").arg("-l").arg(m).output();
        }
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.netns]);
        }
        let _ = ip(&["netns", "del", &self.bridge_ns]);
        if self.fake_clocks {
            remove_faketime_shm(self.born);
        }
    }
}

/// libfaketime gives every process it is preloaded into (the fleet's daemons and what they
/// start: monitors, tunnels) a semaphore and a shared memory file in /dev/shm named for its
/// pid, and removes them only when the process exits normally: the fleet kills its daemons.
/// Left, they make the next process with that pid fail to start under libfaketime. Removes
/// those of processes that are gone, made since `since` (the fleet's own).
fn remove_faketime_shm(since: std::time::SystemTime) {
    for e in std::fs::read_dir("/dev/shm")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("faketime_shm_")
            .or_else(|| name.strip_prefix("sem.faketime_sem_"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let ours = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= since);
        if ours && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Mount points at or under `dir` in this process's mount namespace, deepest first.
fn mounts_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes space, tab, newline and backslash as octal.
        .map(|p| {
            PathBuf::from(
                p.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Runs a benchmark on a fresh fleet: checks root and the `tools` it needs (naming the packages
/// in `install`), starts the fleet, runs `f` (which may start helper processes in process
/// groups of their own into the vector), then kills those groups; prints the fleet's log tails
/// when `f` fails. The fleet cleans up after itself when dropped.
pub fn bench_on_fleet(
    controllers: usize,
    agents: usize,
    tools: &[&str],
    install: &str,
    f: impl FnOnce(&Fleet, &mut Vec<Child>) -> Result<()>,
) -> Result<()> {
    ensure!(can_run(), "needs root and ip netns");
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?
            .status
            .success();
        ensure!(found, "{tool} is not installed (apt-get install {install})");
    }
    let fleet = Fleet::start(controllers, agents, "10s")?;
    let mut helpers: Vec<Child> = Vec::new();
    let res = f(&fleet, &mut helpers);
    for mut c in helpers {
        // The whole group: the benchmark started it as one.
        crate::signal(-(c.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = c.wait();
    }
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(20));
    }
    res
}

/// The network-namespace fleet as a [`crate::scenario::Cluster`]: its agents are its nodes;
/// commands run in a node host's network namespace (the hosts share this machine's
/// filesystem and processes); powering a node off cuts its host off and kills its agent.
impl crate::scenario::Cluster for Fleet {
    fn skiff(&self, args: &[&str]) -> Result<String> {
        self.cli_ok(args)
    }

    fn agent(&self, node: &str, args: &[&str]) -> Result<String> {
        let i = self.agent_index(node)?;
        let (data, parent) = &self.agent_dirs[i];
        crate::stdout(
            agent_cmd(data, parent, args).output()?,
            format_args!("skiff-agent {} on {node}", args.join(" ")),
        )
    }

    fn run(&self, node: &str, argv: &[&str]) -> Result<String> {
        crate::stdout(
            self.on_host(node, argv)?,
            format_args!("{} on {node}", argv.join(" ")),
        )
    }

    fn put(&self, name: &str, text: &str) -> Result<String> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    }

    fn image(&self) -> String {
        Fleet::image(self)
    }

    fn power_off(&mut self, node: &str) -> Result<()> {
        self.partition(node)?;
        self.kill_agent(node)
    }

    /// Node `aN`'s agent, and controller `cN` with it where there is one (as on the VMs,
    /// where node-N runs both), each stopped with SIGTERM and started again on the tree's
    /// build.
    fn upgrade(&mut self, node: &str) -> Result<()> {
        let i = self.agent_index(node)?;
        let controller = format!("c{}", i + 1);
        if self.controllers.iter().any(|c| c.host.name == controller) {
            Fleet::upgrade(self, &controller, None)?;
        }
        Fleet::upgrade(self, node, None)
    }

    fn controllers(&self) -> usize {
        self.controllers.len()
    }
}
