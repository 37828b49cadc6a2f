//! Fleet scenarios written once and run on two kinds of fleet: the network-namespace fleet
//! of this machine ([`crate::fleet::Fleet`], `e2e/tests/scenarios.rs`, in CI) and a Vagrant
//! fleet of VMs reached over ssh (`skiff-vm-scenarios`, from `scripts/vm-e2e.sh`). Each fleet
//! is a [`Cluster`]: hosts it can run commands on, the CLI, and a way to power a node off.
//! What differs between the fleets is said in [`Expect`] (the WireGuard backend and the cgroup
//! hierarchy the hosts have), not in the scenarios.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// A fleet the scenarios drive.
pub trait Cluster {
    /// `skiff ARGS` as the cluster's admin: its standard output, or an error with its
    /// standard error.
    fn skiff(&self, args: &[&str]) -> Result<String>;
    /// `skiff-agent ARGS` on node `node`, over that node's own data and settings.
    fn agent(&self, node: &str, args: &[&str]) -> Result<String>;
    /// A command on node `node`'s host, as root: its standard output.
    fn run(&self, node: &str, argv: &[&str]) -> Result<String>;
    /// Puts `text` in a file named `name` where `skiff` (as [`Cluster::skiff`] runs it) reads
    /// files; returns that path.
    fn put(&self, name: &str, text: &str) -> Result<String>;
    /// The image reference the scenarios' jobs run (busybox with `/www/index.html`).
    fn image(&self) -> String;
    /// Powers node `node` off as the others see it: off the network, its agent gone.
    fn power_off(&mut self, node: &str) -> Result<()>;
    /// Upgrades Skiff on node `node` in place, as an operator does (`install.sh upgrade`:
    /// its controller, if it runs one, and its agent, each restarted on the new binaries
    /// with the containers left running); returns once that command has.
    fn upgrade(&mut self, node: &str) -> Result<()>;
    /// How many controllers the fleet has.
    fn controllers(&self) -> usize;
}

/// What the hosts of a fleet are.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// The WireGuard backend every node reports: `kernel` where the module exists,
    /// `userspace` where not.
    pub backend: &'static str,
    /// Pure cgroup v2 (Debian 12's default) rather than v1 or hybrid hierarchies.
    pub cgroup_v2: bool,
}

impl Expect {
    /// What this machine's hosts are: the kernel WireGuard backend where the module loads, the
    /// userspace one otherwise; pure cgroup v2 or not.
    pub fn this_machine() -> Expect {
        let probe = format!("skwgprobe{}", std::process::id() % 100_000);
        let kernel_wg = std::process::Command::new("ip")
            .args(["link", "add", &probe, "type", "wireguard"])
            .output()
            .is_ok_and(|o| o.status.success());
        if kernel_wg {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &probe])
                .output();
        }
        let cgroup_v2 = nix::sys::statfs::statfs("/sys/fs/cgroup")
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
        Expect {
            backend: if kernel_wg { "kernel" } else { "userspace" },
            cgroup_v2,
        }
    }
}

/// Polls `f` every 200 ms for up to `timeout` until it returns a value.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e),
        }
        if start.elapsed() > timeout {
            bail!(
                "timed out after {timeout:?} waiting for {what}{}",
                last.map(|e| format!(" (last error: {e:#})"))
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn json(c: &dyn Cluster, args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = c.skiff(&all)?;
    serde_json::from_str(&out).with_context(|| format!("skiff {}: not JSON: {out}", args.join(" ")))
}

fn list(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// Every controller a voter; every node ready, on the expected WireGuard backend, with a
/// handshake with every other node. Returns the nodes' names.
pub fn members_and_nodes(c: &dyn Cluster, expect: &Expect, nodes: usize) -> Result<Vec<String>> {
    let want = c.controllers();
    wait_for(
        "every controller to be a voter",
        Duration::from_secs(60),
        || {
            let m = json(c, &["cluster", "members"])?;
            Ok((list(&m).filter(|m| m["voter"] == true).count() == want).then_some(()))
        },
    )?;
    let names = wait_for("every node ready", Duration::from_secs(60), || {
        let n = json(c, &["nodes"])?;
        let ready: Vec<String> = list(&n)
            .filter(|n| n["status"] == "ready")
            .filter_map(|n| n["name"].as_str().map(str::to_owned))
            .collect();
        Ok((ready.len() == nodes).then_some(ready))
    })?;
    let n = json(c, &["nodes"])?;
    for node in list(&n) {
        let backend = node["wireguard"]["backend"].as_str().unwrap_or_default();
        ensure!(
            backend == expect.backend,
            "node {} is on the {backend} WireGuard backend, not {}",
            node["name"],
            expect.backend
        );
    }
    if nodes > 1 {
        wait_for(
            "every node's handshake with every other",
            Duration::from_secs(90),
            || {
                let n = json(c, &["nodes"])?;
                Ok(list(&n)
                    .all(|n| n["wireguard"]["peers_handshaken"].as_u64() == Some(nodes as u64 - 1))
                    .then_some(()))
            },
        )?;
    }
    Ok(names)
}

/// The scenarios' web job: `replicas` busybox httpd replicas of 64 MiB each, spread.
pub fn web(c: &dyn Cluster, replicas: usize) -> Result<()> {
    let spec = c.put(
        "scenario-web.toml",
        &format!(
            "name = \"web\"\nreplicas = {replicas}\nimage = \"{}\"\ncommand = [\"/bin/httpd\"]\n\
             args = [\"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nstop_signal = \"SIGKILL\"\n\
             [resources]\ncpu = 0.05\nmemory = \"64Mi\"\npids = 256\n\
             [placement]\nspread = true\n",
            c.image()
        ),
    )?;
    c.skiff(&["apply", "-f", &spec])?;
    wait_for("web to run", Duration::from_secs(180), || {
        Ok((running(c, "web", None)? == replicas).then_some(()))
    })
}

/// Allocations of `job` running (on nodes other than `not_on`, if given).
fn running(c: &dyn Cluster, job: &str, not_on: Option<&str>) -> Result<usize> {
    let ps = json(c, &["ps", job])?;
    Ok(list(&ps)
        .filter(|a| a["status"] == "running" && not_on.is_none_or(|n| a["node"] != n))
        .count())
}

/// A container of the web job on `node` is limited to 64 MiB by its cgroup: `memory.max`
/// under cgroup v2, `memory.limit_in_bytes` under v1. Returns the cgroup's path.
pub fn memory_limit(c: &dyn Cluster, expect: &Expect, node: &str) -> Result<String> {
    let ps: Value = serde_json::from_str(&c.agent(node, &["container", "ps", "-o", "json"])?)?;
    let pid = list(&ps)
        .filter_map(|x| x["pid"].as_i64())
        .next()
        .with_context(|| format!("{node} runs no container"))?;
    let cgroups = c.run(node, &["cat", &format!("/proc/{pid}/cgroup")])?;
    let (file, path) = if expect.cgroup_v2 {
        let path = cgroups
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .with_context(|| {
                format!("{node}: container {pid} is in no cgroup v2 hierarchy: {cgroups}")
            })?;
        ensure!(
            c.run(node, &["stat", "-fc", "%T", "/sys/fs/cgroup"])?
                .trim()
                == "cgroup2fs",
            "{node}: /sys/fs/cgroup is not cgroup2fs (pure cgroup v2)"
        );
        (format!("/sys/fs/cgroup{path}/memory.max"), path.to_owned())
    } else {
        let path = cgroups
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
                controllers
                    .split(',')
                    .any(|c| c == "memory")
                    .then_some(path)
            })
            .with_context(|| {
                format!("{node}: container {pid} is in no v1 memory cgroup: {cgroups}")
            })?;
        (
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"),
            path.to_owned(),
        )
    };
    let limit = c.run(node, &["cat", &file])?;
    ensure!(
        limit.trim() == "67108864",
        "{node}: {file} is {}, not 67108864 (64Mi)",
        limit.trim()
    );
    Ok(path)
}

/// A replica on `from` fetches the page of a replica on another node, through the overlay.
/// Returns the address it reached.
pub fn across_hosts(c: &dyn Cluster, from: &str) -> Result<String> {
    let ps = json(c, &["ps", "web"])?;
    let src = list(&ps)
        .find(|a| a["node"] == from && a["status"] == "running")
        .and_then(|a| a["id"].as_str())
        .with_context(|| format!("no replica on {from}"))?
        .to_owned();
    let to = list(&ps)
        .find(|a| a["node"] != from && a["status"] == "running")
        .and_then(|a| a["ip"].as_str())
        .context("no replica on another node")?
        .to_owned();
    // (No wget -T: busybox 1.35's wget segfaults with it on Debian 12.)
    let url = format!("http://{to}:8080/");
    let page = wait_for(
        "the page across the overlay",
        Duration::from_secs(30),
        || {
            Ok(c.skiff(&["exec", &src, "--", "wget", "-qO-", &url])
                .ok()
                .filter(|p| p.contains("hello from skiff")))
        },
    )?;
    ensure!(page.contains("hello from skiff"), "{from} to {to}: {page}");
    Ok(to)
}

/// The running containers on `node`, as (id, pid).
fn containers(c: &dyn Cluster, node: &str) -> Result<Vec<(String, i64)>> {
    let ps: Value = serde_json::from_str(&c.agent(node, &["container", "ps", "-o", "json"])?)?;
    Ok(list(&ps)
        .filter(|x| x["status"] == "running")
        .map(|x| {
            (
                x["id"].as_str().unwrap_or_default().to_owned(),
                x["pid"].as_i64().unwrap_or(-1),
            )
        })
        .collect())
}

/// A rolling upgrade: each of `nodes` in turn is upgraded in place ([`Cluster::upgrade`]);
/// after each, a write is acknowledged within a minute, the node's upgraded agent
/// heartbeats (a beat that reached the leader after the upgrade returned), and every
/// container the node ran before runs on as the same process. Then every write is still
/// there and web runs all its replicas. Returns the time of each node's step.
pub fn rolling_upgrade(c: &mut dyn Cluster, nodes: &[String]) -> Result<Vec<Duration>> {
    let ps = json(c, &["ps", "web"])?;
    let replicas = list(&ps).filter(|a| a["desired"] == "run").count();
    let mut took = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let start = Instant::now();
        let before = containers(c, node)?;
        ensure!(!before.is_empty(), "{node} runs no container to keep");
        c.upgrade(node)?;
        let upgraded = Instant::now();
        let probe = format!("probe-{}", i + 1);
        let spec = c.put(
            &format!("{probe}.toml"),
            &format!(
                "name = \"{probe}\"\nimage = \"{}\"\ncommand = [\"/bin/sleep\", \"3600\"]\nreplicas = 0\n",
                c.image()
            ),
        )?;
        wait_for(
            &format!("a write after upgrading {node}"),
            Duration::from_secs(60),
            || Ok(c.skiff(&["apply", "-f", &spec]).ok().map(|_| ())),
        )?;
        wait_for(
            &format!("a heartbeat from {node}'s upgraded agent"),
            Duration::from_secs(60),
            || {
                // Asked now; the beat it reports came `heartbeat_age_ms` before the
                // answer, so after this moment minus that age: after the upgrade returned
                // (the old agent was stopped by then) when the age is below the time since.
                let asked = upgraded.elapsed().as_millis();
                let n = json(c, &["nodes"])?;
                Ok(list(&n)
                    .any(|n| {
                        n["name"] == node.as_str()
                            && n["status"] == "ready"
                            && n["heartbeat_age_ms"]
                                .as_u64()
                                .is_some_and(|age| u128::from(age) < asked)
                    })
                    .then_some(()))
            },
        )?;
        let after = containers(c, node)?;
        for (id, pid) in &before {
            ensure!(
                after.iter().any(|(a, p)| a == id && p == pid),
                "{node}: container {id} (pid {pid}) did not run on through the upgrade: {after:?}"
            );
        }
        took.push(start.elapsed());
    }
    let jobs = json(c, &["jobs"])?;
    for i in 1..=nodes.len() {
        let probe = format!("probe-{i}");
        ensure!(
            list(&jobs).any(|j| j["name"] == probe.as_str()),
            "job {probe}, written during the upgrade, is gone"
        );
    }
    wait_for(
        "web's replicas running after the upgrade",
        Duration::from_secs(120),
        || Ok((running(c, "web", None)? == replicas).then_some(())),
    )?;
    Ok(took)
}

/// Powers `victim` off; returns how long until every web replica runs on another node.
pub fn node_loss(c: &mut dyn Cluster, victim: &str) -> Result<Duration> {
    let ps = json(c, &["ps", "web"])?;
    let want = list(&ps).filter(|a| a["status"] == "running").count();
    ensure!(
        list(&ps).any(|a| a["node"] == victim),
        "{victim} runs no web replica"
    );
    c.power_off(victim)?;
    let t = Instant::now();
    let c: &dyn Cluster = c;
    wait_for(
        &format!("{victim}'s replicas to run elsewhere"),
        Duration::from_secs(120),
        || Ok((running(c, "web", Some(victim))? == want).then_some(())),
    )?;
    Ok(t.elapsed())
}

/// Runs the scenarios in order, printing each with its time; the fleet has `nodes` nodes.
/// The last one powers a node off (the fleet is not whole afterwards).
pub fn run_all(c: &mut dyn Cluster, expect: &Expect, nodes: usize) -> Result<()> {
    let start = Instant::now();
    let say = |what: String| eprintln!("[{:6.1}s] {what}", start.elapsed().as_secs_f64());
    let names = members_and_nodes(c, expect, nodes)?;
    say(format!(
        "{} controllers voters; {nodes} nodes ready on the {} WireGuard backend, each with a handshake with every other",
        c.controllers(),
        expect.backend
    ));
    let replicas = nodes * 2;
    web(c, replicas)?;
    say(format!("web: {replicas} replicas running"));
    let node = &names[names.len() / 2];
    let cg = memory_limit(c, expect, node)?;
    say(format!(
        "{node}: a container's memory limit is 64Mi (cgroup {}: {cg})",
        if expect.cgroup_v2 { "v2" } else { "v1" }
    ));
    if nodes > 1 {
        let to = across_hosts(c, &names[0])?;
        say(format!(
            "a replica on {} reached {to} on another node through the overlay",
            names[0]
        ));
    }
    if nodes >= 3 {
        let victim = names[names.len() - 1].clone();
        let took = node_loss(c, &victim)?;
        say(format!(
            "{victim} powered off: its replicas running elsewhere after {:.1} s",
            took.as_secs_f64()
        ));
    }
    Ok(())
}
