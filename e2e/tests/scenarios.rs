//! The fleet scenarios shared with the Vagrant VM fleet (`skiff_e2e::scenario`, run there by
//! `scripts/vm-e2e.sh`), here on the network-namespace fleet: 3 controllers, 3 agents.

use anyhow::Result;
use skiff_e2e::fleet::{Fleet, can_run, serial};
use skiff_e2e::scenario::{Expect, run_all};

/// What this machine's hosts are: the kernel WireGuard backend where the module loads, the
/// userspace one otherwise; pure cgroup v2 or not.
fn this_machine() -> Expect {
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

#[test]
fn s10_the_shared_fleet_scenarios_on_the_netns_fleet() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    let mut fleet = Fleet::start(3, 3, "")?;
    run_all(&mut fleet, &this_machine(), 3)
}
