//! Host tests of `runtime::cgroup` (need root and a cgroup filesystem; they say so and pass
//! otherwise): real processes in real cgroups, on whatever layout this host has.
//!
//! Each test works under its own parent `skiff-test-<pid>-<random>-<test>`, removed with
//! everything under it (processes killed) when the test ends, also on failure.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use skiff_runtime::cgroup::{self, CgroupError, Limits};

const MIB: u64 = 1024 * 1024;

fn host_ready() -> bool {
    skiff_testkit::require(&[skiff_testkit::Need::Root, skiff_testkit::Need::Cgroupfs])
}

/// Mount points of every cgroup and cgroup2 filesystem.
fn cgroup_mounts() -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| PathBuf::from(left.split(' ').nth(4).unwrap_or("/nonexistent")))
        })
        .collect()
}

/// The layout this host should be reported as, found independently of the module.
fn expected_mode() -> &'static str {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else if fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(" - cgroup2 "))
    {
        "hybrid"
    } else {
        "v1"
    }
}

/// Directories named `rel` in any cgroup hierarchy.
fn dirs_named(rel: &str) -> Vec<PathBuf> {
    cgroup_mounts()
        .into_iter()
        .map(|m| m.join(rel))
        .filter(|d| d.exists())
        .collect()
}

/// A per-test cgroup parent; dropping it kills and removes everything under it.
struct TestParent {
    path: String,
}

impl TestParent {
    fn new(test: &str) -> TestParent {
        TestParent {
            path: format!(
                "skiff-test-{}-{:08x}-{test}",
                std::process::id(),
                rand::random::<u32>()
            ),
        }
    }

    fn sub(&self, name: &str) -> String {
        format!("{}/{name}", self.path)
    }
}

impl Drop for TestParent {
    fn drop(&mut self) {
        for dir in dirs_named(&self.path) {
            remove_tree(&dir);
        }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..100 {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = fs::write(dir.join("freezer.state"), "THAWED");
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        sleep(Duration::from_millis(20));
    }
    eprintln!("warning: cannot remove test cgroup {}", dir.display());
}

/// A `sh -c` child that blocks reading stdin until [`release`]d, so it can be put in a
/// cgroup before it allocates or forks anything.
fn gated(script: &str) -> Result<Child> {
    gated_to(script, Stdio::null())
}

fn gated_to(script: &str, stdout: Stdio) -> Result<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(format!("read x && {{ {script}\n}}"))
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn sh")
}

fn release(child: &mut Child) -> Result<()> {
    let mut stdin = child.stdin.take().context("child stdin")?;
    stdin.write_all(b"go\n").context("release child")?;
    Ok(())
}

fn pid_of(child: &Child) -> i32 {
    i32::try_from(child.id()).unwrap_or(i32::MAX)
}

fn wait_timeout(child: &mut Child, max: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + max;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!("child {} still running after {max:?}", child.id());
        }
        sleep(Duration::from_millis(10));
    }
}

/// The first of `paths` holding `file`, joined with it.
fn file_in(paths: &[PathBuf], file: &str) -> Result<PathBuf> {
    paths
        .iter()
        .map(|p| p.join(file))
        .find(|f| f.exists())
        .with_context(|| format!("no {file} in {paths:?}"))
}

fn read_trimmed(paths: &[PathBuf], file: &str) -> Result<String> {
    let f = file_in(paths, file)?;
    Ok(fs::read_to_string(&f)
        .with_context(|| format!("read {}", f.display()))?
        .trim()
        .to_string())
}

fn keyed(paths: &[PathBuf], file: &str, key: &str) -> Result<u64> {
    let content = read_trimmed(paths, file)?;
    content
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {key} in {file}: {content:?}"))
}

#[test]
fn t10_lifecycle_limits_paths_and_readoption() -> Result<()> {
    if !host_ready() {
        return Ok(());
    }
    let parent = TestParent::new("life");
    let mgr = cgroup::host(&parent.path)?;
    println!("cgroup mode: {}", mgr.mode());
    assert_eq!(mgr.mode(), expected_mode());
    assert_eq!(mgr.list()?, Vec::<String>::new(), "nothing before create");

    let limits = Limits {
        cpu: Some(0.5),
        memory: Some(64 * MIB),
        pids: Some(64),
    };
    let cg = mgr.create("basic", &limits)?;
    assert_eq!(cg.name(), "basic");
    let paths = cg.paths();
    assert!(!paths.is_empty());
    for p in &paths {
        assert!(p.is_dir(), "{} missing", p.display());
        assert!(p.ends_with(parent.sub("basic")), "{}", p.display());
    }

    // The limits, read back from the kernel.
    if mgr.mode() == "v2" {
        assert_eq!(read_trimmed(&paths, "memory.max")?, (64 * MIB).to_string());
        assert_eq!(read_trimmed(&paths, "cpu.max")?, "50000 100000");
        if let Ok(swap) = read_trimmed(&paths, "memory.swap.max") {
            assert_eq!(swap, "0");
        }
    } else {
        let mem = (64 * MIB).to_string();
        assert_eq!(read_trimmed(&paths, "memory.limit_in_bytes")?, mem);
        if let Ok(memsw) = read_trimmed(&paths, "memory.memsw.limit_in_bytes") {
            assert_eq!(memsw, mem, "swap must not dodge the memory limit");
        }
        assert_eq!(read_trimmed(&paths, "cpu.cfs_quota_us")?, "50000");
        assert_eq!(read_trimmed(&paths, "cpu.cfs_period_us")?, "100000");
    }
    assert_eq!(read_trimmed(&paths, "pids.max")?, "64");

    // A real process, in every hierarchy.
    let mut child = Command::new("sleep").arg("30").spawn()?;
    let pid = pid_of(&child);
    cg.add_process(pid)?;
    assert_eq!(cg.processes()?, vec![pid]);
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let want = format!("/{}", parent.sub("basic"));
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next().unwrap_or(""), parts.next());
        let ours = ctrls.is_empty()
            || ctrls
                .split(',')
                .any(|c| ["memory", "cpu", "pids", "freezer"].contains(&c));
        if ours {
            assert_eq!(
                path,
                Some(want.as_str()),
                "/proc/{pid}/cgroup line {line:?}"
            );
        }
    }
    let stats = cg.stats()?;
    assert_eq!(stats.pids, 1, "{stats:?}");
    assert_eq!(stats.oom_kills, 0, "{stats:?}");

    // Re-adoption, as after an agent restart.
    assert_eq!(mgr.list()?, vec!["basic".to_string()]);
    let again = mgr.open("basic")?.context("open basic")?;
    assert_eq!(again.paths(), paths);
    assert_eq!(again.processes()?, vec![pid]);
    assert!(mgr.open("absent")?.is_none());

    // Not empty: delete refuses and changes nothing.
    match cg.delete() {
        Err(CgroupError::NotEmpty { pids, .. }) => assert_eq!(pids, vec![pid]),
        other => bail!("delete of a busy cgroup: {other:?}"),
    }
    assert!(paths.iter().all(|p| p.is_dir()));

    again.kill_all()?;
    let status = wait_timeout(&mut child, Duration::from_secs(5))?;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert_eq!(cg.processes()?, Vec::<i32>::new());
    cg.kill_all()?; // empty: nothing to do

    cg.delete()?;
    for p in &paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    cg.delete()?; // idempotent
    assert!(mgr.open("basic")?.is_none());
    assert_eq!(mgr.list()?, Vec::<String>::new());
    Ok(())
}

#[test]
fn t20_kill_all_stops_a_forking_tree() -> Result<()> {
    if !host_ready() {
        return Ok(());
    }
    let parent = TestParent::new("tree");
    let mgr = cgroup::host(&parent.path)?;
    let cg = mgr.create("tree", &Limits::default())?;
    // Keeps forking short-lived children and has long-lived grandchildren.
    let mut child = gated("sleep 60 & sh -c 'sleep 60 & wait' & while :; do sleep 0.01; done")?;
    cg.add_process(pid_of(&child))?;
    release(&mut child)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while cg.processes()?.len() < 4 && Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }
    ensure!(cg.processes()?.len() >= 4, "tree: {:?}", cg.processes()?);
    cg.kill_all()?;
    assert_eq!(cg.processes()?, Vec::<i32>::new());
    let status = wait_timeout(&mut child, Duration::from_secs(5))?;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    cg.delete()?;
    assert!(dirs_named(&parent.sub("tree")).is_empty());
    Ok(())
}

#[test]
fn t30_memory_limit_oom_kills_and_is_counted() -> Result<()> {
    if !host_ready() {
        return Ok(());
    }
    let parent = TestParent::new("oom");
    let mgr = cgroup::host(&parent.path)?;
    let cg = mgr.create(
        "hog",
        &Limits {
            memory: Some(32 * MIB),
            ..Limits::default()
        },
    )?;
    // `tail /dev/zero` keeps the never-ending first line in memory.
    let mut child = gated("exec tail /dev/zero")?;
    cg.add_process(pid_of(&child))?;
    release(&mut child)?;
    let status = wait_timeout(&mut child, Duration::from_secs(30))?;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let stats = cg.stats()?;
    println!("after oom: {stats:?}");
    assert!(stats.oom_kills >= 1, "{stats:?}");
    assert_eq!(cg.oom_kills()?, stats.oom_kills, "the one-file read agrees");
    cg.kill_all()?;
    cg.delete()?;
    Ok(())
}

#[test]
fn t40_pids_limit_stops_forks() -> Result<()> {
    if !host_ready() {
        return Ok(());
    }
    let parent = TestParent::new("pids");
    let mgr = cgroup::host(&parent.path)?;
    let cg = mgr.create(
        "forker",
        &Limits {
            pids: Some(8),
            ..Limits::default()
        },
    )?;
    let mut child = gated("for i in $(seq 20); do sleep 5 & done; wait")?;
    cg.add_process(pid_of(&child))?;
    release(&mut child)?;
    let paths = cg.paths();
    let deadline = Instant::now() + Duration::from_secs(10);
    while keyed(&paths, "pids.events", "max")? == 0 && Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }
    let refused = keyed(&paths, "pids.events", "max")?;
    let stats = cg.stats()?;
    println!("forks refused: {refused}, {stats:?}");
    assert!(refused >= 1, "no fork was refused");
    assert!(stats.pids <= 8, "{stats:?}");
    cg.kill_all()?;
    let _ = wait_timeout(&mut child, Duration::from_secs(5))?;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    println!("shell stderr: {stderr:?}");
    cg.delete()?;
    Ok(())
}

#[test]
fn t50_invalid_input_is_refused_and_leaves_nothing() -> Result<()> {
    if !host_ready() {
        return Ok(());
    }
    for bad in ["", "/skiff", "skiff/../etc", "skiff//x", "skiff/", ".."] {
        match cgroup::host(bad) {
            Err(CgroupError::InvalidParent { .. }) => {}
            Err(e) => bail!("parent {bad:?}: unexpected error {e}"),
            Ok(_) => bail!("parent {bad:?} accepted"),
        }
    }
    let parent = TestParent::new("bad");
    let mgr = cgroup::host(&parent.path)?;
    for bad in ["", "a/b", "..", "cgroup.procs", "tasks"] {
        let err = mgr
            .create(bad, &Limits::default())
            .err()
            .with_context(|| format!("name {bad:?} accepted"))?;
        assert!(matches!(err, CgroupError::InvalidName { .. }), "{err}");
    }

    let refused_by_us = [
        (
            "cpu",
            Limits {
                cpu: Some(f64::NAN),
                ..Limits::default()
            },
        ),
        (
            "cpu",
            Limits {
                cpu: Some(-0.5),
                ..Limits::default()
            },
        ),
        (
            "cpu",
            Limits {
                cpu: Some(0.001),
                ..Limits::default()
            },
        ),
        (
            "memory",
            Limits {
                memory: Some(4096),
                ..Limits::default()
            },
        ),
        (
            "memory",
            Limits {
                memory: Some(u64::MAX),
                ..Limits::default()
            },
        ),
        (
            "pids",
            Limits {
                pids: Some(0),
                ..Limits::default()
            },
        ),
    ];
    for (which, limits) in refused_by_us {
        let err = mgr
            .create("bad", &limits)
            .err()
            .with_context(|| format!("{limits:?} accepted"))?;
        let msg = err.to_string();
        println!("{msg}");
        assert!(matches!(err, CgroupError::InvalidLimit { .. }), "{msg}");
        assert!(
            msg.contains(which) && msg.contains(&parent.sub("bad")),
            "{msg}"
        );
        assert!(dirs_named(&parent.path).is_empty(), "{msg}: parent created");
    }

    // Refused by the kernel after some directories and limits were written.
    let refused_by_kernel = [
        (
            "cpu",
            Limits {
                cpu: Some(1e9),
                ..Limits::default()
            },
        ),
        (
            "pids",
            Limits {
                memory: Some(64 * MIB),
                cpu: Some(1.0),
                pids: Some(10_000_000),
            },
        ),
    ];
    for (which, limits) in refused_by_kernel {
        let err = mgr
            .create("bad", &limits)
            .err()
            .with_context(|| format!("{limits:?} accepted"))?;
        let msg = err.to_string();
        println!("{msg}");
        assert!(matches!(err, CgroupError::SetLimit { .. }), "{msg}");
        assert!(
            msg.contains(which) && msg.contains(&parent.sub("bad")),
            "{msg}"
        );
        let left = dirs_named(&parent.sub("bad"));
        assert!(left.is_empty(), "{msg}: left behind {left:?}");
    }
    assert_eq!(mgr.list()?, Vec::<String>::new());

    // A name in use is refused, and the existing cgroup is untouched.
    let first = mgr.create(
        "dup",
        &Limits {
            pids: Some(5),
            ..Limits::default()
        },
    )?;
    match mgr.create("dup", &Limits::default()) {
        Err(CgroupError::AlreadyExists { path }) => assert_eq!(path, parent.sub("dup")),
        other => bail!("second create: {:?}", other.map(|c| c.paths())),
    }
    assert_eq!(read_trimmed(&first.paths(), "pids.max")?, "5");
    assert!(matches!(
        first.add_process(0),
        Err(CgroupError::InvalidPid { .. })
    ));
    first.delete()?;
    Ok(())
}

#[test]
fn t60_parents_keep_agents_apart() -> Result<()> {
    if !host_ready() {
        return Ok(());
    }
    let base = TestParent::new("share");
    let one = cgroup::host(&base.sub("agent-1"))?;
    let two = cgroup::host(&base.sub("agent-2"))?;
    let a = one.create("web-1", &Limits::default())?;
    let b = two.create("db-1", &Limits::default())?;
    let c = two.create("db-2", &Limits::default())?;
    assert_eq!(one.list()?, vec!["web-1".to_string()]);
    assert_eq!(two.list()?, vec!["db-1".to_string(), "db-2".to_string()]);
    assert!(one.open("db-1")?.is_none());
    assert!(two.open("web-1")?.is_none());
    let outer = cgroup::host(&base.path)?;
    assert_eq!(
        outer.list()?,
        vec!["agent-1".to_string(), "agent-2".to_string()]
    );
    for cg in [a, b, c] {
        cg.delete()?;
    }
    assert_eq!(two.list()?, Vec::<String>::new());
    Ok(())
}

#[test]
fn t70_half_created_leftover_is_opened_and_deleted() -> Result<()> {
    if !host_ready() {
        return Ok(());
    }
    let parent = TestParent::new("half");
    let mgr = cgroup::host(&parent.path)?;
    let cg = mgr.create("crashed", &Limits::default())?;
    let paths = cg.paths();
    // As if the agent died mid-create: the cgroup exists in only some hierarchies.
    let last = paths.last().context("no paths")?;
    if paths.len() > 1 {
        fs::remove_dir(last)?;
    }
    drop(cg);
    assert_eq!(mgr.list()?, vec!["crashed".to_string()]);
    let leftover = mgr.open("crashed")?.context("leftover not found")?;
    leftover.kill_all()?;
    leftover.delete()?;
    assert!(dirs_named(&parent.sub("crashed")).is_empty());
    assert!(mgr.open("crashed")?.is_none());
    Ok(())
}

#[test]
fn t80_cpu_quota_throttles_and_usage_is_counted() -> Result<()> {
    if !host_ready() {
        return Ok(());
    }
    let parent = TestParent::new("cpu");
    let mgr = cgroup::host(&parent.path)?;
    let cg = mgr.create(
        "busy",
        &Limits {
            cpu: Some(0.2),
            ..Limits::default()
        },
    )?;
    let mut child = gated("while :; do :; done")?;
    cg.add_process(pid_of(&child))?;
    let start = Instant::now();
    release(&mut child)?;
    sleep(Duration::from_millis(1000));
    let stats = cg.stats()?;
    let elapsed = start.elapsed();
    let throttled = keyed(&cg.paths(), "cpu.stat", "nr_throttled")?;
    cg.kill_all()?;
    let _ = wait_timeout(&mut child, Duration::from_secs(5))?;
    println!("{elapsed:?} wall, {stats:?}, nr_throttled {throttled}");
    assert!(stats.cpu_usage_ns > 0, "{stats:?}");
    // 0.2 cores: at most ~20% of the wall time, plus a period of slack.
    let bound = elapsed.as_nanos() as f64 * 0.2 + 100_000_000.0;
    assert!(
        (stats.cpu_usage_ns as f64) < bound,
        "{stats:?} over {bound} ns"
    );
    assert!(throttled >= 1, "never throttled");
    cg.delete()?;
    Ok(())
}

/// Device accesses a shell tries, printing `name:ok` or `name:no` for each (`true`, not `:`:
/// a failed redirection on a special builtin ends the shell). `$DIR` is a scratch
/// directory for mknod.
const DEVICE_PROBE: &str = r#"
t() { if eval "$2" 2>/dev/null; then echo "$1:ok"; else echo "$1:no"; fi; }
t read-null 'true </dev/null'
t write-null 'echo x >/dev/null'
t read-urandom 'head -c 8 /dev/urandom >/dev/null'
t read-kmsg 'true </dev/kmsg'
t write-kmsg 'true >/dev/kmsg'
t open-tun 'true </dev/net/tun'
t mknod-null "mknod $DIR/null c 1 3"
t mknod-loop "mknod $DIR/loop b 7 0"
"#;

/// The default list plus /dev/kmsg read-only.
fn probe_rules() -> Vec<skiff_runtime::devices::DeviceRule> {
    use skiff_runtime::devices::{ACC_READ, DeviceKind, DeviceRule, default_rules};
    let mut rules = default_rules();
    rules.push(DeviceRule {
        kind: DeviceKind::Char,
        major: Some(1),
        minor: Some(11),
        access: ACC_READ,
    });
    rules
}

const PROBE_EXPECTED: &str = "read-null:ok write-null:ok read-urandom:ok read-kmsg:ok \
                              write-kmsg:no open-tun:no mknod-null:ok mknod-loop:no";

/// Runs the probe, put in a cgroup by `enter` first (or left where it is with `None`).
fn run_probe(enter: Option<&dyn Fn(i32) -> Result<()>>) -> Result<String> {
    let scratch = tempfile::tempdir()?;
    let script = format!("DIR={}\n{DEVICE_PROBE}", scratch.path().display());
    let mut child = gated_to(&script, Stdio::piped())?;
    if let Some(enter) = enter {
        enter(pid_of(&child))?;
    }
    release(&mut child)?;
    let status = wait_timeout(&mut child, Duration::from_secs(10))?;
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("probe stdout")?
        .read_to_string(&mut out)?;
    ensure!(status.success(), "probe: {status:?}: {out}");
    Ok(out.split_whitespace().collect::<Vec<_>>().join(" "))
}

#[test]
fn t90_device_policy_allows_its_list_and_denies_the_rest() -> Result<()> {
    if !host_ready() {
        return Ok(());
    }
    // Outside any policy, root may do all of it: every "no" below is the policy's.
    let free = run_probe(None)?;
    assert_eq!(free, PROBE_EXPECTED.replace(":no", ":ok"), "unconfined");

    let parent = TestParent::new("devices");
    let mgr = cgroup::host(&parent.path)?;
    let cg = mgr.create("dev", &Limits::default())?;
    cg.set_devices(&probe_rules())?;
    let paths = cg.paths();
    // Every mechanism this host has is in force: the v1 list and/or the v2 program.
    let mut mechanisms = vec![];
    if let Ok(list) = read_trimmed(&paths, "devices.list") {
        let mut lines: Vec<&str> = list.lines().collect();
        lines.sort_unstable();
        let mut want: Vec<String> = probe_rules().iter().map(|r| r.v1_line()).collect();
        want.sort_unstable();
        assert_eq!(lines, want, "devices.list");
        mechanisms.push("v1 devices.list");
    }
    if let Some(v2) = skiff_testkit::cgroup2_mount() {
        let dir = paths
            .iter()
            .find(|p| p.starts_with(&v2))
            .context("no cgroup2 directory")?;
        assert_eq!(skiff_runtime::sys::device_programs_attached(dir)?, 1);
        mechanisms.push("v2 device program");
    }
    println!("enforced by: {mechanisms:?}");
    ensure!(!mechanisms.is_empty(), "nothing enforces the policy");
    let confined = run_probe(Some(&|pid| Ok(cg.add_process(pid)?)))?;
    assert_eq!(confined, PROBE_EXPECTED);
    cg.kill_all()?;
    cg.delete()?;
    Ok(())
}

/// The cgroup v2 device program on its own (on a hybrid host the v1 devices controller would
/// otherwise also be enforcing): attached to a bare cgroup2 directory.
#[test]
fn t91_device_program_alone_enforces_the_policy() -> Result<()> {
    if !skiff_testkit::require(&[skiff_testkit::Need::Root, skiff_testkit::Need::Cgroup2]) {
        return Ok(());
    }
    let v2 = skiff_testkit::cgroup2_mount().context("cgroup2 mount")?;
    let parent = TestParent::new("devprog");
    let dir = v2.join(&parent.path);
    fs::create_dir(&dir)?;
    let program = skiff_runtime::devices::device_program(&probe_rules());
    skiff_runtime::sys::attach_device_program(&dir, &program)?;
    assert_eq!(skiff_runtime::sys::device_programs_attached(&dir)?, 1);
    println!(
        "{} instructions attached to {}",
        program.len(),
        dir.display()
    );
    let confined = run_probe(Some(&|pid| {
        fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        Ok(())
    }))?;
    assert_eq!(confined, PROBE_EXPECTED);

    // The same rules for a second cgroup: the program this process loaded is attached again,
    // not loaded again, and enforces there too.
    let loaded = skiff_runtime::sys::device_programs_loaded();
    let other = TestParent::new("devprog2");
    let second = v2.join(&other.path);
    fs::create_dir(&second)?;
    skiff_runtime::sys::attach_device_program(&second, &program)?;
    assert_eq!(skiff_runtime::sys::device_programs_attached(&second)?, 1);
    assert_eq!(skiff_runtime::sys::device_programs_loaded(), loaded);
    let confined = run_probe(Some(&|pid| {
        fs::write(second.join("cgroup.procs"), pid.to_string())?;
        Ok(())
    }))?;
    assert_eq!(confined, PROBE_EXPECTED);
    Ok(())
}
