//! Test support shared by Skiff's test suites (a dev-dependency only, never linked into a
//! binary).
//!
//! [`require`] is how a test states what it needs from the machine: root, a tool, a kernel
//! feature. When something is missing the test **fails**, naming what is missing and how to get
//! it, unless the run opts out explicitly with `SKIFF_TEST_SKIP` (a comma-separated list of
//! `root`, `tools`, a tool's name such as `dig`, or `all`). A test skipped that way says so on
//! stderr and, when `SKIFF_TEST_SKIP_LOG` names a file, appends a line to it, so that
//! `scripts/test.sh` can print how many tests were skipped and why. CI sets neither: nothing
//! skips there.

#![forbid(unsafe_code)]

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

/// Something a test needs from the machine.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// Running as root (namespaces, mounts, cgroups, network devices).
    Root,
    /// A program on `PATH`, and the Debian package that has it.
    Tool {
        name: &'static str,
        package: &'static str,
    },
    /// A mounted cgroup filesystem under /sys/fs/cgroup.
    Cgroupfs,
    /// A mounted cgroup2 filesystem (the unified hierarchy), where device programs attach.
    Cgroup2,
    /// A file a script builds for the tests, named by an environment variable (the previous
    /// release's binaries: `SKIFF_COMPAT_BIN_DIR`, from `scripts/compat-build.sh`). Opted out of by
    /// the variable's name or `tools`.
    Built {
        var: &'static str,
        how: &'static str,
    },
}

/// `Need::Tool` in short.
pub const fn tool(name: &'static str, package: &'static str) -> Need {
    Need::Tool { name, package }
}

impl Need {
    /// Whether the machine has it.
    pub fn present(&self) -> bool {
        match self {
            Need::Root => nix::unistd::geteuid().is_root(),
            Need::Tool { name, .. } => on_path(name),
            Need::Cgroupfs => {
                std::fs::read_dir("/sys/fs/cgroup").is_ok_and(|mut d| d.next().is_some())
            }
            Need::Cgroup2 => cgroup2_mount().is_some(),
            Need::Built { var, .. } => {
                std::env::var_os(var).is_some_and(|p| Path::new(&p).exists())
            }
        }
    }

    /// What is missing, and how to get it.
    pub fn describe(&self) -> String {
        match self {
            Need::Root => "root (run the tests as root)".into(),
            Need::Tool { name, package } => {
                format!("{name} (apt-get install {package})")
            }
            Need::Cgroupfs => "a cgroup filesystem mounted under /sys/fs/cgroup".into(),
            Need::Cgroup2 => "a mounted cgroup2 filesystem (cgroup_no_v1 or systemd's \
                              hybrid/unified hierarchy)"
                .into(),
            Need::Built { var, how } => format!("{var} naming what a script built ({how})"),
        }
    }

    /// Whether `SKIFF_TEST_SKIP` opts out of tests that need this.
    fn opted_out(&self, list: &str) -> bool {
        list.split(',').map(str::trim).any(|w| {
            w == "all"
                || match self {
                    Need::Root | Need::Cgroupfs | Need::Cgroup2 => w == "root",
                    Need::Tool { name, .. } => w == "tools" || w == *name,
                    Need::Built { var, .. } => w == "tools" || w == *var,
                }
        })
    }
}

/// Where the cgroup2 filesystem is mounted (the root on a v2 host, usually
/// `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split(' ').next()? == "cgroup2").then(|| left.split(' ').nth(4).map(Into::into))?
    })
}

fn on_path(name: &str) -> bool {
    if name.contains('/') {
        return Path::new(name).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The running test's name (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current().name().unwrap_or("a test").to_owned()
}

/// Checks what the calling test needs. Returns `true` when everything is there. When
/// something is missing: returns `false` (the test then returns at once, skipped) if
/// `SKIFF_TEST_SKIP` opts out of it, and panics naming what is missing otherwise.
pub fn require(needs: &[Need]) -> bool {
    let skip = std::env::var("SKIFF_TEST_SKIP").unwrap_or_default();
    for need in needs {
        if need.present() {
            continue;
        }
        let test = test_name();
        if need.opted_out(&skip) {
            let line = format!("{test}: needs {}", need.describe());
            eprintln!("SKIPPED {line} (SKIFF_TEST_SKIP={skip})");
            if let Some(log) = std::env::var_os("SKIFF_TEST_SKIP_LOG")
                && let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
            {
                // One write per line: concurrent tests append to the same file.
                let _ = f.write_all(format!("{line}\n").as_bytes());
            }
            return false;
        }
        panic!(
            "{test} needs {}; set SKIFF_TEST_SKIP={} to skip such tests explicitly",
            need.describe(),
            match need {
                Need::Root | Need::Cgroupfs | Need::Cgroup2 => "root".to_owned(),
                Need::Tool { name, .. } => (*name).to_owned(),
                Need::Built { var, .. } => (*var).to_owned(),
            }
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opting_out_is_by_kind_or_name() {
        let dig = tool("dig", "bind9-dnsutils");
        assert!(dig.opted_out("tools"));
        assert!(dig.opted_out("root, dig"));
        assert!(dig.opted_out("all"));
        assert!(!dig.opted_out("root"));
        assert!(!dig.opted_out(""));
        assert!(Need::Root.opted_out("root"));
        assert!(Need::Cgroupfs.opted_out("root"));
        assert!(!Need::Root.opted_out("tools"));
    }

    #[test]
    fn present_things_pass_and_missing_ones_fail_by_default() {
        assert!(require(&[tool("sh", "dash")]));
        let missing = tool("skiff-no-such-tool", "nothing");
        assert!(!missing.present());
        assert_eq!(
            missing.describe(),
            "skiff-no-such-tool (apt-get install nothing)"
        );
        if std::env::var_os("SKIFF_TEST_SKIP").is_none() {
            let r = std::panic::catch_unwind(|| require(&[missing]));
            assert!(r.is_err(), "a missing tool must fail the test");
        }
    }
}
