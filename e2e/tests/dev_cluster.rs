//! README command 1 stays true: `scripts/dev-cluster.sh` brings up a controller and an agent
//! on this host and runs the example service, and `down` removes it all. Needs root; skipped
//! when the dev cluster's ports are taken (a developer's own dev cluster may be running).

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(format!("{ROOT}/scripts/dev-cluster.sh"))
            .arg("down")
            .env("SKIFF_DEV_DIR", self.0)
            .output();
    }
}

#[test]
fn readme_dev_cluster_runs_the_example_service() {
    if !skiff_e2e::is_root() {
        eprintln!("skipped: the dev cluster's agent runs containers (needs root)");
        return;
    }
    for port in [7700, 7780, 7801, 7802] {
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            eprintln!("skipped: 127.0.0.1:{port} is in use (a dev cluster already running?)");
            return;
        }
    }
    if std::net::UdpSocket::bind(("0.0.0.0", 51820)).is_err()
        || Path::new("/sys/class/net/skiff0").exists()
    {
        eprintln!("skipped: WireGuard's port 51820 or the skiff0 bridge is taken on this host");
        return;
    }
    let forward_before =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("ip_forward");
    let dir = tempfile::Builder::new()
        .prefix("skiff-dev-test-")
        .tempdir()
        .expect("tempdir");
    let state = dir.path().join("state");
    let _down = Down(&state);
    let out = Command::new("bash")
        .arg(format!("{ROOT}/scripts/dev-cluster.sh"))
        .env("SKIFF_DEV_DIR", &state)
        .output()
        .expect("dev-cluster.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("hello from skiff"), "{text}");
    // Each replica has a pod address on the bridge, shown by `skiff ps`.
    assert!(Path::new("/sys/class/net/skiff0").exists(), "no bridge");
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
    let out = Command::new("bash")
        .arg(format!("{ROOT}/scripts/dev-cluster.sh"))
        .arg("down")
        .env("SKIFF_DEV_DIR", &state)
        .output()
        .expect("down");
    assert!(out.status.success());
    assert!(!state.exists(), "state removed");
    let left = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .any(|h| h.path().join("skiff-dev").exists());
    assert!(!left, "cgroup parent removed");
    // The network is gone too: bridge, tunnel, iptables rules; ip_forward as it was.
    assert!(
        !Path::new("/sys/class/net/skiff0").exists(),
        "bridge removed"
    );
    let rules = Command::new("iptables")
        .args(["-t", "nat", "-S", "POSTROUTING"])
        .output()
        .expect("iptables");
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("skiff pod egress"),
        "masquerade rule removed"
    );
    for _ in 0..50 {
        if !Path::new("/sys/class/net/skiff-wg").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !Path::new("/sys/class/net/skiff-wg").exists(),
        "tunnel stopped"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("ip_forward"),
        forward_before
    );
}
