//! README command 1 stays true: `scripts/dev-cluster.sh` brings up a controller and an agent
//! and runs the example service, and `down` removes it all. The script runs in a network
//! namespace of this test's own (loopback up, nothing else), so its fixed ports, bridge and
//! WireGuard port are never taken by a developer's own dev cluster and nothing it sets up
//! touches the host's network; its state dir and cgroup parent are per run too.

use std::path::Path;
use std::process::{Command, Output};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The test's own network namespace and what the script left there; removed on drop.
struct Sandbox {
    netns: String,
    state: std::path::PathBuf,
    cgroup: String,
}

impl Sandbox {
    /// Runs `args` inside the namespace (network only: /sys and the cgroup mounts stay the
    /// host's, which the agent needs).
    fn run(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .args(args)
            .env("SKIFF_DEV_DIR", &self.state)
            .env("SKIFF_DEV_CGROUP", &self.cgroup)
            .output()
            .expect("nsenter")
    }

    fn script(&self, arg: &str) -> Output {
        self.run(&["bash", &format!("{ROOT}/scripts/dev-cluster.sh"), arg])
    }

    fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.netns, "link", "show", name])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.script("down");
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

#[test]
fn readme_dev_cluster_runs_the_example_service() {
    use skiff_testkit::{Need, require, tool};
    if !require(&[
        Need::Root,
        Need::Cgroupfs,
        tool("ip", "iproute2"),
        tool("nsenter", "util-linux"),
        tool("iptables", "iptables"),
    ]) {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("skiff-dev-test-")
        .tempdir()
        .expect("tempdir");
    let run = format!("skdev{}", std::process::id());
    let sandbox = Sandbox {
        netns: run.clone(),
        state: dir.path().join("state"),
        cgroup: format!("skiff-devtest-{}", std::process::id()),
    };
    let made = Command::new("ip")
        .args(["netns", "add", &sandbox.netns])
        .status()
        .expect("ip netns add");
    assert!(made.success(), "ip netns add {}", sandbox.netns);
    let lo = Command::new("ip")
        .args(["-n", &sandbox.netns, "link", "set", "lo", "up"])
        .status()
        .expect("ip link");
    assert!(lo.success());
    let forward_before = sandbox
        .run(&["cat", "/proc/sys/net/ipv4/ip_forward"])
        .stdout;

    let out = sandbox.script("up");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("hello from skiff"), "{text}");
    // Each replica has a pod address on the bridge, shown by `skiff ps`.
    assert!(sandbox.has_link("skiff0"), "no bridge");
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("default/web") && l.contains(" 10.42.0."))
            .count(),
        3,
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("default/web") && l.contains("running"))
            .count(),
        3,
        "{text}"
    );

    let out = sandbox.script("down");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sandbox.state.exists(), "state removed");
    let left = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .any(|h| h.path().join(&sandbox.cgroup).exists());
    assert!(!left, "cgroup parent removed");
    // The network is gone too: bridge, tunnel, iptables rules; ip_forward as it was.
    assert!(!sandbox.has_link("skiff0"), "bridge removed");
    let rules = sandbox.run(&["iptables", "-t", "nat", "-S", "POSTROUTING"]);
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("skiff pod egress"),
        "masquerade rule removed"
    );
    for _ in 0..50 {
        if !sandbox.has_link("skiff-wg") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!sandbox.has_link("skiff-wg"), "tunnel stopped");
    assert_eq!(
        sandbox
            .run(&["cat", "/proc/sys/net/ipv4/ip_forward"])
            .stdout,
        forward_before
    );
    assert!(Path::new(&format!("/run/netns/{run}")).exists());
}
