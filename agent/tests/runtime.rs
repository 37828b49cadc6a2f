//! Host tests of the container runtime (root): real namespaces, overlayfs, cgroups, seccomp.
//! Each test checks from *inside* a container started by the real `skiff-agent` binary, with
//! its own data dir and cgroup parent, and removes everything it made, also on failure.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

macro_rules! need_root {
    () => {
        if !skiff_testkit::require(&[skiff_testkit::Need::Root, skiff_testkit::Need::Cgroupfs]) {
            return;
        }
    };
}

/// The busybox OCI layout, built once per test process by the fixture script into cargo's
/// per-target temp dir (statics are never dropped, so a temp dir here would stay in /tmp; the
/// fixture is reproducible and idempotent, so rebuilding over it is safe).
fn image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("skiff-rt-busybox");
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../runtime/tests/fixtures/make-busybox-image.sh");
        let st = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .status()
            .expect("fixture script");
        assert!(st.success(), "fixture script failed");
        format!("oci:{}:latest", out.display())
    })
}

/// A per-test agent: data dir and cgroup parent named for this run; cleaned on drop.
struct Agent {
    dir: tempfile::TempDir,
    parent: String,
}

impl Agent {
    fn new() -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("skiff-rt-")
            .tempdir()
            .expect("tempdir");
        let tag = dir
            .path()
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        Agent {
            parent: format!("skiff-test/{tag}"),
            dir,
        }
    }

    fn cmd(&self) -> Command {
        self.cmd_as(Path::new(env!("CARGO_BIN_EXE_skiff-agent")))
    }

    /// The agent's command line, run as the binary at `exe`.
    fn cmd_as(&self, exe: &Path) -> Command {
        let mut c = Command::new(exe);
        c.arg("--data-dir")
            .arg(self.dir.path())
            .arg("--cgroup-parent")
            .arg(&self.parent);
        c.stdin(Stdio::null());
        c
    }

    fn run(&self, extra: &[&str], cmd: &[&str]) -> Output {
        let mut c = self.cmd();
        c.args(["container", "run", "--image", image()])
            .args(extra)
            .arg("--")
            .args(cmd);
        c.output().expect("skiff-agent container run")
    }

    fn ok(&self, extra: &[&str], cmd: &[&str]) -> String {
        let out = self.run(extra, cmd);
        assert!(
            out.status.success(),
            "{cmd:?} failed ({:?}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs a `skiff-agent` command that must succeed.
    fn agent_ok(&self, args: &[&str]) -> Output {
        let out = self.cmd().args(args).output().expect("skiff-agent");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// One container from `container ps -a -o json`, by id or name.
    fn find(&self, reference: &str) -> serde_json::Value {
        let ps = self.ps();
        ps.as_array()
            .and_then(|v| {
                v.iter()
                    .find(|c| c["id"] == reference || c["name"] == reference)
            })
            .cloned()
            .unwrap_or_else(|| panic!("container {reference} not listed: {ps}"))
    }

    fn ps(&self) -> serde_json::Value {
        let out = self
            .cmd()
            .args(["container", "ps", "-a", "-o", "json"])
            .output()
            .expect("ps");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let p = h.path().join(&self.parent);
                if p.exists() {
                    v.push(p);
                }
            }
        }
        v
    }

    /// Container cgroups left under our parent.
    fn leftover_cgroups(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for d in self.cgroup_dirs() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    v.push(e.path());
                }
            }
        }
        v
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(out) = self
            .cmd()
            .args(["container", "ps", "-a", "-o", "json"])
            .output()
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        {
            for c in v.as_array().into_iter().flatten() {
                if let Some(id) = c["id"].as_str() {
                    let _ = self.cmd().args(["container", "rm", "-f", id]).output();
                }
            }
        }
        // Our parent and its (empty) tag dir in every hierarchy.
        for d in self.cgroup_dirs() {
            let _ = std::fs::remove_dir(&d);
            if let Some(p) = d.parent() {
                let _ = std::fs::remove_dir(p);
            }
        }
    }
}

#[test]
fn pid1_is_the_command_and_host_processes_are_invisible() {
    need_root!();
    let a = Agent::new();
    assert_eq!(a.ok(&[], &["sh", "-c", "echo $$"]), "1");
    let n: usize = a
        .ok(&[], &["sh", "-c", "ls /proc | grep -cE '^[0-9]+$'"])
        .parse()
        .expect("count");
    assert!(n <= 3, "container sees {n} processes");
}

/// The container's first process is in the container's cgroup in every hierarchy, seen from
/// the host: it is created in the cgroup2 directory and joins the v1 hierarchies itself, and
/// no hierarchy is missed.
#[test]
fn the_first_process_is_in_its_cgroup_in_every_hierarchy() {
    need_root!();
    let a = Agent::new();
    let id = a.ok(&["-d"], &["sleep", "30"]);
    let pid = a.find(&id)["pid"].as_i64().expect("pid");
    let dirs = a.cgroup_dirs();
    assert!(!dirs.is_empty(), "no cgroup made under {}", a.parent);
    for d in dirs {
        let procs = std::fs::read_to_string(d.join(&id).join("cgroup.procs"))
            .unwrap_or_else(|e| panic!("{}/{id}: {e}", d.display()));
        assert!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "pid {pid} is not in {}/{id}: {procs:?}",
            d.display()
        );
    }
    a.agent_ok(&["container", "rm", "-f", &id]);
}

#[test]
fn hostname_env_user_and_cwd() {
    need_root!();
    let a = Agent::new();
    assert_eq!(a.ok(&["--hostname", "box-1"], &["hostname"]), "box-1");
    assert_eq!(
        a.ok(
            &["-e", "GREETING=hi there"],
            &["sh", "-c", "echo $GREETING"]
        ),
        "hi there"
    );
    assert_eq!(a.ok(&["-u", "nobody"], &["id", "-u"]), "65534");
    assert_eq!(a.ok(&[], &["pwd"]), "/");
}

#[test]
fn writes_do_not_reach_the_image() {
    need_root!();
    let a = Agent::new();
    a.ok(
        &[],
        &[
            "sh",
            "-c",
            "echo changed > /etc/skiff-release && rm /bin/true && touch /new-file",
        ],
    );
    // A second container sees the image as it was.
    assert_eq!(a.ok(&[], &["cat", "/etc/skiff-release"]), "2");
    // Its writable layer is scratch: mounted `volatile`, so its exit does not sync the host's
    // filesystem (see `init::mount_overlay`).
    let root = a.ok(&[], &["sh", "-c", "grep ' / / ' /proc/self/mountinfo"]);
    assert!(
        // `volatile`, or `fsync=volatile` as kernels since 6.6 show it.
        root.contains(" - overlay ") && root.contains("volatile"),
        "{root}"
    );
    a.ok(&[], &["true"]);
    let out = a.run(&[], &["ls", "/new-file"]);
    assert!(!out.status.success());
}

#[test]
fn memory_limit_oom_kills_a_hog_and_reports_it() {
    need_root!();
    let a = Agent::new();
    let out = a.run(
        &["--memory", "32Mi", "--name", "hog"],
        &["sh", "-c", "tail /dev/zero"],
    );
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("OOM"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hog = a.find("hog");
    assert_eq!(hog["exit"]["oom_killed"], true);
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    need_root!();
    let a = Agent::new();
    let out = a.run(
        &["--pids", "16"],
        &[
            "sh",
            "-c",
            "for i in $(seq 40); do sleep 5 & done; echo spawned",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("can't fork") || err.contains("Resource temporarily unavailable"),
        "{err}"
    );
}

#[test]
fn capabilities_seccomp_and_descriptors() {
    need_root!();
    let a = Agent::new();
    // Docker's default capability set.
    assert_eq!(
        a.ok(&[], &["sh", "-c", "grep CapEff /proc/self/status"]),
        "CapEff:\t00000000a00425fb"
    );
    assert_eq!(
        a.ok(
            &["-u", "nobody"],
            &["sh", "-c", "grep CapEff /proc/self/status"]
        ),
        "CapEff:\t0000000000000000"
    );
    assert_eq!(
        a.ok(&[], &["sh", "-c", "grep NoNewPrivs /proc/self/status"]),
        "NoNewPrivs:\t1"
    );
    // A denied syscall fails.
    let out = a.run(&[], &["mount", "-t", "tmpfs", "none", "/tmp"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("not permitted") || err.contains("permission denied"),
        "{err}"
    );
    // Only stdio (and ls's own directory fd) are open in the workload.
    let fds = a.ok(&[], &["ls", "/proc/self/fd"]);
    let fds: Vec<&str> = fds.split_whitespace().collect();
    assert!(fds.len() <= 4, "open descriptors: {fds:?}");
    // /sys is read-only: the container cannot raise its own limits.
    let out = a.run(
        &[],
        &[
            "sh",
            "-c",
            "echo 1 > /sys/kernel/mm/transparent_hugepage/enabled",
        ],
    );
    assert!(!out.status.success());
    // Masked paths.
    // Masked paths read empty (those this kernel has).
    let present: Vec<&str> = [
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
        "/proc/kcore",
    ]
    .into_iter()
    .filter(|p| Path::new(p).exists())
    .collect();
    assert!(
        !present.is_empty(),
        "none of the masked files exist on this host"
    );
    for p in present {
        assert_eq!(
            a.ok(&[], &["sh", "-c", &format!("wc -c < {p}")]),
            "0",
            "{p} is not masked"
        );
    }
}

/// Device accesses a container's shell tries, `name:ok` or `name:no` each.
const DEVICE_PROBE: &str = r#"t() { if eval "$2" 2>/dev/null; then echo "$1:ok"; else echo "$1:no"; fi; }
t null 'echo x >/dev/null'
t zero 'head -c 4 /dev/zero | wc -c | grep -q 4'
t urandom 'head -c 4 /dev/urandom >/dev/null'
t ptmx 'true <>/dev/ptmx'
t mknod 'mknod /tmp/loop b 7 0'
t fuse-read 'true </dev/fuse'
t fuse-write 'test -c /dev/fuse && true >/dev/fuse'
t tun 'true </dev/net/tun'"#;

#[test]
fn devices_are_the_default_list_plus_what_is_granted() {
    need_root!();
    let a = Agent::new();
    let probe = |extra: &[&str]| {
        a.ok(extra, &["sh", "-c", DEVICE_PROBE])
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        probe(&[]),
        "null:ok zero:ok urandom:ok ptmx:ok mknod:no fuse-read:no fuse-write:no tun:no"
    );
    for dev in ["/dev/fuse", "/dev/net/tun"] {
        assert!(Path::new(dev).exists(), "this test needs {dev} on the host");
    }
    // Granted read-only, /dev/fuse can be opened to read and not to write; /dev/net/tun is
    // made in its own directory.
    assert_eq!(
        probe(&["--device", "/dev/fuse:r", "--device", "/dev/net/tun"]),
        "null:ok zero:ok urandom:ok ptmx:ok mknod:no fuse-read:ok fuse-write:no tun:ok"
    );
    // Device nodes that came in the image open nothing: the root filesystem is nodev.
    let root = a.ok(
        &[],
        &["sh", "-c", "awk '$2 == \"/\" { print $4 }' /proc/mounts"],
    );
    assert!(root.split(',').any(|o| o == "nodev"), "root mounted {root}");
    // The workload cannot make nodes, not even of a granted device.
    let out = a.run(
        &["--device", "/dev/fuse:r"],
        &["sh", "-c", "mknod /tmp/fuse c 10 229"],
    );
    assert!(!out.status.success(), "mknod worked");
    let bad = a.run(&["--device", "/etc/passwd"], &["true"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--device /etc/passwd: /etc/passwd is not a device"),
        "{err}"
    );
    let bad = a.run(&["--device", "/dev/null:rx"], &["true"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("permissions are r, w and m"), "{err}");
}

#[test]
fn exit_codes_signals_and_logs() {
    need_root!();
    let a = Agent::new();
    assert_eq!(a.run(&[], &["sh", "-c", "exit 42"]).status.code(), Some(42));
    let out = a.run(
        &["--name", "talker"],
        &["sh", "-c", "echo to-out; echo to-err >&2"],
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "to-out");
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "to-err");
    let logs = a
        .cmd()
        .args(["container", "logs", "talker"])
        .output()
        .expect("logs");
    assert_eq!(String::from_utf8_lossy(&logs.stdout).trim(), "to-out");
    assert_eq!(String::from_utf8_lossy(&logs.stderr).trim(), "to-err");

    // A stop ends with the stop signal, or SIGKILL after the grace period (pid 1 ignores
    // SIGTERM unless it handles it).
    let id = a.ok(&["-d", "--name", "sleeper"], &["sleep", "1000"]);
    let out = a.agent_ok(&["container", "stop", "-t", "1", &id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("signal 9"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Whether process `pid` is gone (or a zombie) within a second.
fn process_ends(pid: i32) -> bool {
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    };
    for _ in 0..50 {
        if gone() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    gone()
}

/// The program the monitor of container `id` runs as (from /proc).
fn monitor_exe(a: &Agent, id: &str) -> PathBuf {
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(a.dir.path().join("containers").join(id).join("state.json"))
            .expect("state.json"),
    )
    .expect("state json");
    let pid = state["monitor_pid"].as_i64().expect("a monitor pid");
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("the monitor's exe")
}

#[test]
fn the_monitor_is_the_small_binary_next_to_the_agent_or_the_agent_itself() {
    need_root!();
    // Installed side by side (cargo builds both): containers are watched by skiff-monitor.
    let a = Agent::new();
    let id = a.ok(&["-d"], &["sleep", "30"]);
    let exe = monitor_exe(&a, &id);
    assert_eq!(
        exe.file_name().and_then(|n| n.to_str()),
        Some("skiff-monitor"),
        "{}",
        exe.display()
    );
    a.agent_ok(&["container", "rm", "-f", &id]);
    // An agent installed alone runs its built-in copy, `skiff-agent __monitor`.
    let alone = tempfile::tempdir().expect("tempdir");
    let agent = alone.path().join("skiff-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_skiff-agent"), &agent).expect("copy the agent");
    let out = a
        .cmd_as(&agent)
        .args([
            "container",
            "run",
            "-d",
            "--image",
            image(),
            "--",
            "sleep",
            "30",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(monitor_exe(&a, &id), agent);
    let out = a
        .cmd_as(&agent)
        .args([
            "container",
            "run",
            "--rm",
            "--image",
            image(),
            "--",
            "sh",
            "-c",
            "exit 7",
        ])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.agent_ok(&["container", "rm", "-f", &id]);
    // The small binary refuses what it is not meant to run.
    let bad = Command::new(env!("CARGO_BIN_EXE_skiff-monitor"))
        .arg("--wrong")
        .output()
        .expect("skiff-monitor");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("usage: skiff-monitor"));
}

/// A spare monitor (started ahead of need by a long-lived runtime, the agent daemon) waits for
/// its container's id on stdin: closed without one, it ends quietly; a bad id or one with no
/// record gets an error report naming it, as the starter reads it. (The daemon hands every
/// container start to a spare, so the e2e fleets run containers through this path.)
#[test]
fn a_spare_monitor_waits_for_its_id_and_refuses_a_bad_one() {
    need_root!();
    let a = Agent::new();
    let spare = |input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_skiff-monitor"))
            .arg("--data-dir")
            .arg(a.dir.path())
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("skiff-monitor");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).expect("write the id");
        drop(stdin);
        child.wait_with_output().expect("wait")
    };
    let unused = spare("");
    assert_eq!(unused.status.code(), Some(0), "{unused:?}");
    assert!(unused.stdout.is_empty(), "{unused:?}");
    for (id, says) in [
        ("../../etc\n", "invalid container id"),
        ("a/b\n", "invalid container id"),
        ("0123456789abcdef\n", "0123456789abcdef"),
    ] {
        let out = spare(id);
        let report = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{id:?}: {out:?}");
        assert!(
            report.starts_with("error: ") && report.contains(says),
            "{id:?}: {report}"
        );
    }
    // Nothing was made for the ids refused or not found.
    let containers = a.dir.path().join("containers");
    let left: Vec<_> = std::fs::read_dir(&containers)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn containers_outlive_the_agent_and_are_adopted() {
    need_root!();
    let a = Agent::new();
    let id = a.ok(
        &["-d", "--name", "survivor"],
        &["sh", "-c", "while true; do echo tick; sleep 0.2; done"],
    );
    // The `run -d` process has exited; the container keeps running under its monitor.
    std::thread::sleep(Duration::from_millis(500));
    let c = a.find(&id);
    assert_eq!(c["status"], "running");
    assert_eq!(c["monitor_alive"], true);
    let logs = a
        .cmd()
        .args(["container", "logs", "survivor"])
        .output()
        .expect("logs");
    assert!(String::from_utf8_lossy(&logs.stdout).contains("tick"));
    let out = a
        .cmd()
        .args(["container", "rm", "survivor"])
        .output()
        .expect("rm");
    assert!(
        !out.status.success(),
        "rm of a running container must refuse"
    );
    a.agent_ok(&["container", "stop", "-t", "0", "survivor"]);
    a.agent_ok(&["container", "rm", "survivor"]);
    assert!(
        a.leftover_cgroups().is_empty(),
        "{:?}",
        a.leftover_cgroups()
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_nothing() {
    need_root!();
    let a = Agent::new();
    let out = a.run(&[], &["no-such-command"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-command") && err.contains("not found"),
        "{err}"
    );

    let out = a
        .cmd()
        .args([
            "container",
            "run",
            "--image",
            "oci:/nonexistent/dir",
            "--",
            "true",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dir"));

    let out = a.run(&["--memory", "1"], &["true"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("memory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ps = a.ps();
    assert_eq!(ps.as_array().map(Vec::len), Some(0), "records left: {ps}");
    assert!(
        a.leftover_cgroups().is_empty(),
        "{:?}",
        a.leftover_cgroups()
    );
    let netns = a.dir.path().join("run/netns");
    let left: Vec<_> = std::fs::read_dir(&netns)
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(left.is_empty(), "netns left: {left:?}");
}

#[test]
fn restart_policy_restarts_with_backoff_until_stopped() {
    need_root!();
    let a = Agent::new();
    // Each run counts itself in its writable layer: a restart runs on the same one (mounted
    // again after a `volatile` mount, which overlayfs allows only once its marker is gone).
    let id = a.ok(
        &["-d", "--name", "flaky", "--restart", "on-failure"],
        &[
            "sh",
            "-c",
            "echo x >> /runs; echo attempt $(wc -l < /runs); exit 3",
        ],
    );
    let mut restarts = 0;
    for _ in 0..100 {
        let c = a.find(&id);
        restarts = c["restarts"].as_u64().unwrap_or(0);
        if restarts >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(restarts >= 2, "restarted {restarts} times");
    a.agent_ok(&["container", "stop", "-t", "1", "flaky"]);
    let logs = a
        .cmd()
        .args(["container", "logs", "flaky"])
        .output()
        .expect("logs");
    // `restarts` counts a restart once it is scheduled; each run printed once, the second
    // on the first one's writable layer.
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.matches("attempt").count() >= 2, "{logs}");
    assert!(logs.contains("attempt 2"), "{logs}");
    // never: an exit is final.
    let out = a.run(&["--restart", "never"], &["sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
}

/// Fencing in the monitor: a container runs while the lease is renewed, is stopped within
/// `stop_after` (plus the monitor's check interval) once it is not, with the reason, and is
/// not started on a stale lease. No agent daemon is involved: the monitor alone enforces it.
#[test]
fn a_fenced_container_stops_when_its_lease_runs_out_and_does_not_start_on_a_stale_one() {
    use skiff_runtime::fence::{boottime_ns, write_lease};
    need_root!();
    let a = Agent::new();
    let lease = a.dir.path().join("lease");
    let renew = || write_lease(&lease, boottime_ns()).expect("lease");
    renew();
    let lease_arg = lease.display().to_string();
    let fence = ["--fence-lease", lease_arg.as_str(), "--fence-after", "1s"];
    let mut args = vec!["-d", "--init", "--name", "fenced"];
    args.extend(fence);
    let id = a.ok(&args, &["sleep", "1000"]);
    for _ in 0..15 {
        renew();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(a.find(&id)["status"], "running", "renewed: still running");
    let last = std::time::Instant::now();
    let mut c = a.find(&id);
    while c["status"] == "running" && last.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        c = a.find(&id);
    }
    let took = last.elapsed();
    eprintln!("stopped {took:?} after the last renewal (fence after 1s)");
    assert_eq!(c["status"], "exited", "{c}");
    let why = c["error"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("fenced: the controllers last answered"),
        "{c}"
    );
    // Its contract with the controllers: stopped within stop_after, the check interval and
    // the stop (SIGTERM, which --init forwards), well inside the 1 s margin they allow.
    assert!(took < Duration::from_millis(2000), "took {took:?}");

    // A stale lease: nothing starts.
    let mut args = vec!["--init"];
    args.extend(fence);
    let out = a.run(&args, &["true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fenced"), "{err}");
}

/// With `--run-dir`, the monitor's live state goes there (a tmpfs under systemd) and the
/// record stays in the data dir; later commands find it through the record, without the flag.
/// An ended container's state is saved beside its record. Removing the container removes
/// both; a state file no record owns is swept. After a reboot (the run dir emptied, every
/// process gone) a container that was running is recorded as ended by the node, which the
/// agent starts again; one that had ended keeps its exit.
#[test]
fn live_state_goes_to_the_run_dir_and_leaves_with_the_container() {
    need_root!();
    let a = Agent::new();
    let run = a.dir.path().join("run-dir");
    let run_arg = run.to_str().expect("utf-8 path");
    let read = |path: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).expect("state file")).expect("json")
    };
    let id = a.ok(&["-d", "--run-dir", run_arg], &["sleep", "1000"]);
    let live = run.join("containers").join(format!("{id}.json"));
    let state = read(&live);
    assert_eq!(state["status"], "running", "{state}");
    assert!(state["monitor_pid"].as_i64().is_some(), "{state}");
    let record = a.dir.path().join("containers").join(&id);
    assert!(record.join("config.json").is_file());
    assert!(
        !record.join("state.json").exists(),
        "no state beside the record"
    );
    let c = a.find(&id);
    assert_eq!(c["status"], "running");
    assert_eq!(c["monitor_alive"], true);
    let out = a.agent_ok(&["container", "stop", "-t", "0", &id]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("signal 9"));
    // Ended: beside the record, so it outlives a reboot.
    assert!(
        !live.exists(),
        "the live file is gone once the container ended"
    );
    assert_eq!(read(&record.join("state.json"))["status"], "exited");
    a.agent_ok(&["container", "rm", &id]);
    assert!(!record.exists());

    // A stray state file (its record removed by hand) is swept by the next command.
    let stray = run.join("containers").join("0123456789abcdef.json");
    std::fs::write(&stray, b"{}").expect("stray");
    a.agent_ok(&["--run-dir", run_arg, "container", "ps", "-a"]);
    assert!(!stray.exists(), "stray state file swept");

    // A reboot: one container running, one ended before it.
    let ended = a.run(&["--run-dir", run_arg], &["sh", "-c", "exit 3"]);
    assert_eq!(ended.status.code(), Some(3));
    let ended = a
        .ps()
        .as_array()
        .and_then(|v| v.iter().find(|c| c["exit"]["code"] == 3).cloned())
        .expect("the ended container listed");
    let ended_id = ended["id"].as_str().expect("id").to_string();
    let id = a.ok(&["-d", "--run-dir", run_arg], &["sleep", "1000"]);
    let state = read(&run.join("containers").join(format!("{id}.json")));
    let monitor = state["monitor_pid"].as_i64().expect("monitor pid") as i32;
    let pid = state["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the monitor");
    std::fs::remove_dir_all(&run).expect("the run dir emptied");
    a.agent_ok(&["--run-dir", run_arg, "container", "ps", "-a"]);
    let c = a.find(&id);
    assert_eq!(c["status"], "exited", "{c}");
    assert_eq!(c["error"], skiff_runtime::container::MONITOR_GONE, "{c}");
    assert!(process_ends(pid), "container process {pid} survived");
    let e = a.find(&ended_id);
    assert_eq!(e["status"], "exited", "{e}");
    assert_eq!(e["exit"]["code"], 3, "{e}");
    assert!(e["error"].is_null(), "{e}");
    a.agent_ok(&["container", "rm", &id]);
    a.agent_ok(&["container", "rm", &ended_id]);
    assert!(
        a.leftover_cgroups().is_empty(),
        "{:?}",
        a.leftover_cgroups()
    );
}

#[test]
fn a_crashed_monitor_is_cleaned_up_by_the_next_agent_command() {
    need_root!();
    let a = Agent::new();
    let id = a.ok(&["-d", "--name", "orphan"], &["sleep", "1000"]);
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(a.dir.path().join("containers").join(&id).join("state.json"))
            .expect("state"),
    )
    .expect("json");
    let monitor = state["monitor_pid"].as_i64().expect("monitor pid") as i32;
    let pid = state["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    // The next command notices, kills what is left of the container and records it.
    let mut status = String::new();
    for _ in 0..50 {
        let c = a.find(&id);
        status = c["status"].as_str().unwrap_or("").to_string();
        if status == "exited" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status, "exited");
    assert!(
        process_ends(pid),
        "container process {pid} survived its monitor"
    );
    assert!(
        a.leftover_cgroups().is_empty(),
        "{:?}",
        a.leftover_cgroups()
    );
}

#[test]
fn exec_joins_the_container_without_exposing_the_host_binary() {
    need_root!();
    let a = Agent::new();
    a.ok(
        &[
            "-d",
            "--name",
            "target",
            "--hostname",
            "inside",
            "--pids",
            "32",
        ],
        &["sleep", "1000"],
    );
    let out = a.agent_ok(&[
        "container",
        "exec",
        "target",
        "--",
        "sh",
        "-c",
        "echo $$; hostname; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; for e in /proc/[0-9]*/exe; do readlink $e; done",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_ne!(lines[0], "1", "exec'd process must not be pid 1");
    assert_eq!(lines[1], "inside");
    assert!(text.contains("CapEff:\t00000000a00425fb"), "{text}");
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    // Every process the container can see runs the container's own binaries.
    assert!(
        text.contains("/bin/sleep") || text.contains("/bin/busybox"),
        "{text}"
    );
    assert!(!text.contains("skiff-agent"), "host binary visible: {text}");
    // In the container's cgroup in every hierarchy: at the root of its cgroup namespace (a
    // hierarchy it did not join would show as a path above it, "/../..").
    let out = a.agent_ok(&[
        "container",
        "exec",
        "target",
        "--",
        "cat",
        "/proc/self/cgroup",
    ]);
    let cgroups = String::from_utf8_lossy(&out.stdout);
    assert!(
        !cgroups.is_empty() && cgroups.lines().all(|l| l.ends_with(":/")),
        "{cgroups}"
    );
    let out = a
        .cmd()
        .args(["container", "exec", "target", "--", "sh", "-c", "exit 7"])
        .output()
        .expect("exec");
    assert_eq!(out.status.code(), Some(7));
    let out = a
        .cmd()
        .args(["container", "exec", "target", "--", "no-such-tool"])
        .output()
        .expect("exec");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    a.agent_ok(&["container", "stop", "-t", "0", "target"]);
    let out = a
        .cmd()
        .args(["container", "exec", "target", "--", "true"])
        .output()
        .expect("exec");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A full disk: output the log cannot take is counted and reported (`container ps` shows
/// how much was lost and why), not silently dropped; the container keeps running.
#[test]
fn output_lost_to_a_full_disk_is_counted_and_reported() {
    need_root!();
    /// The agent's data dir on a small tmpfs of its own (the image fits, the output does
    /// not); the agent's cleanup runs before the unmount (fields drop in order), and the
    /// directory, a mount point while the agent's temporary directory was removed, goes after.
    struct OnSmallDisk {
        agent: Agent,
        _unmount: Unmount,
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let agent = Agent::new();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "skiff-test-full"])
        .arg(agent.dir.path())
        .status()
        .expect("mount");
    assert!(mounted.success(), "mount tmpfs");
    let dir = agent.dir.path().to_path_buf();
    let small = OnSmallDisk {
        agent,
        _unmount: Unmount(dir),
    };
    let agent = &small.agent;
    let out = agent.run(
        &["--name", "chatty", "-d"],
        &["sh", "-c", "i=0; while [ $i -lt 400 ]; do head -c 65536 /dev/zero | tr '\\0' x; echo; i=$((i+1)); done; echo done"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while agent.find("chatty")["status"] != "exited" {
        assert!(std::time::Instant::now() < deadline, "chatty never exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = agent.find("chatty");
    assert_eq!(
        c["exit"]["code"], 0,
        "a full disk does not fail the container: {c}"
    );
    let lost = c["log_dropped_bytes"].as_u64().unwrap_or(0);
    assert!(lost > 1 << 20, "nothing counted as lost: {c}");
    let why = c["log_error"].as_str().unwrap_or_default();
    assert!(why.contains("No space left on device"), "{c}");
    agent.agent_ok(&["container", "rm", "-f", "chatty"]);
}

#[test]
fn init_reaps_orphans_and_forwards_signals() {
    need_root!();
    let a = Agent::new();
    // Without an init, PID 1 (sleep) never reaps the orphan a short-lived shell leaves: it
    // stays a zombie. With one, it is reaped.
    let orphan = "sh -c 'sleep 0.2 & exit 0'";
    for (flags, zombies) in [(&[][..], true), (&["--init"][..], false)] {
        let mut args = vec!["-d"];
        args.extend_from_slice(flags);
        let id = a.ok(&args, &["sleep", "1000"]);
        a.agent_ok(&["container", "exec", &id, "--", "sh", "-c", orphan]);
        // Bounded wait for the orphan to end and be reaped (or not).
        let mut seen = String::new();
        for _ in 0..50 {
            let out = a.agent_ok(&["container", "exec", &id, "--", "ps", "-o", "stat,comm"]);
            seen = String::from_utf8_lossy(&out.stdout).into_owned();
            let has_zombie = seen.lines().any(|l| l.trim_start().starts_with('Z'));
            let orphan_alive = seen.lines().filter(|l| l.contains("sleep")).count() > 1;
            if !orphan_alive && has_zombie == zombies {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            seen.lines().any(|l| l.trim_start().starts_with('Z')),
            zombies,
            "flags {flags:?}: {seen}"
        );
        // A stop's SIGTERM reaches the workload through the init (it dies of it: 128 + 15);
        // without an init PID 1 ignores it and is killed after the grace period (signal 9).
        let out = a.agent_ok(&["container", "stop", "-t", "2", &id]);
        let text = String::from_utf8_lossy(&out.stdout);
        if zombies {
            assert!(text.contains("signal 9"), "{text}");
        } else {
            assert!(text.contains("exit 143"), "{text}");
        }
    }
}

#[test]
fn volumes_are_bind_mounted_read_write_or_read_only() {
    need_root!();
    let a = Agent::new();
    let host = tempfile::tempdir().expect("tempdir");
    std::fs::write(host.path().join("hello"), "from the host\n").expect("write");
    let rw = format!("{}:/data", host.path().display());
    let out = a.ok(
        &["-v", &rw],
        &[
            "sh",
            "-c",
            "cat /data/hello; echo from-container > /data/back",
        ],
    );
    assert_eq!(out, "from the host");
    assert_eq!(
        std::fs::read_to_string(host.path().join("back")).expect("read"),
        "from-container\n"
    );
    let ro = format!("{}:/srv/ro:ro", host.path().display());
    let out = a.run(
        &["-v", &ro],
        &["sh", "-c", "cat /srv/ro/hello && touch /srv/ro/x"],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a read-only volume refuses writes"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!host.path().join("x").exists());
    // The mount is nosuid and nodev whatever the host directory's mount is.
    let opts = a.ok(&["-v", &rw], &["sh", "-c", "grep ' /data ' /proc/mounts"]);
    assert!(opts.contains("nosuid") && opts.contains("nodev"), "{opts}");
    // A symlink in the image on the way to the mount point is refused, not followed.
    let out = a.run(
        &["-v", &format!("{}:/bin/sh/x", host.path().display())],
        &["true"],
    );
    assert!(!out.status.success());
}

#[test]
fn host_network_sees_the_hosts_interfaces() {
    need_root!();
    let a = Agent::new();
    let own = a.ok(&[], &["cat", "/proc/net/dev"]);
    let host = a.ok(&["--net-host"], &["cat", "/proc/net/dev"]);
    let ifaces = |t: &str| -> Vec<String> {
        t.lines()
            .skip(2)
            .filter_map(|l| l.split(':').next().map(|s| s.trim().to_owned()))
            .collect()
    };
    assert_eq!(ifaces(&own), ["lo"], "its own namespace has loopback only");
    let real = std::fs::read_to_string("/proc/net/dev").expect("host");
    assert_eq!(ifaces(&host).len(), ifaces(&real).len(), "{host}");
}
