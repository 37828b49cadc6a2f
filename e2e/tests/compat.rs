//! Mixed releases: the previous release's controllers upgraded one member at a time under
//! writes, and an agent one release older than the controllers, kept working and then
//! upgraded in place.
//!
//! The baseline's binaries come from `scripts/compat-build.sh` (which `scripts/test.sh` runs
//! and names in `SKIFF_COMPAT_BIN_DIR`). The fleet starts wholly on the baseline: 3
//! controllers, 2 agents, and a web job. Then:
//! - each controller is upgraded in turn (SIGTERM, the tree's binary on the same data), and a
//!   write is acknowledged after each; while any member is on the baseline, a job with
//!   `[disconnect]` (which that release's spec parser refuses) is refused with the way out,
//!   and accepted once all are upgraded;
//! - the baseline agents list no capabilities, so fenced jobs go only to a2 once a2 is
//!   upgraded, and one that may run only on a1 stays pending and says why; a1's watch gets
//!   whole peer sets, a2's deltas (it asks for them);
//! - the shared fleet scenarios run across the old a1 and the new a2 (overlay handshakes,
//!   replicas on both, a memory limit, a page from a1's container to a2's through the
//!   overlay);
//! - a1 is upgraded: its containers keep running with the same processes, the node lists
//!   `fence`, and the pending fenced job runs on it. No acknowledged write was lost.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use skiff_e2e::fleet::{Fleet, can_run, serial};
use skiff_e2e::scenario::{Expect, run_all};
use skiff_testkit::{Need, require};

const COMPAT_BINARIES: Need = Need::Built {
    var: "SKIFF_COMPAT_BIN_DIR",
    how: "the previous release's skiff-controller and skiff-agent: `scripts/compat-build.sh` \
          builds them and prints their directory; scripts/test.sh sets it",
};

fn capabilities(fleet: &Fleet, node: &str) -> Result<Vec<String>> {
    let nodes = fleet.cli_json(&["nodes"])?;
    let n = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == node)
        .with_context(|| format!("node {node} in `skiff nodes`: {nodes}"))?;
    Ok(n["capabilities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect())
}

fn fenced_spec(fleet: &Fleet, name: &str, replicas: u32, zone: Option<&str>) -> String {
    let constraint = zone
        .map(|z| format!("[placement]\nconstraints = [\"zone = {z}\"]\n"))
        .unwrap_or_default();
    format!(
        "name = \"{name}\"\nimage = \"{}\"\ncommand = [\"sleep\", \"3600\"]\nreplicas = {replicas}\n\
         [resources]\ncpu = 0.05\nmemory = \"16Mi\"\n\
         [disconnect]\nstop_after = \"30s\"\n{constraint}",
        fleet.image()
    )
}

/// `skiff apply` of `text` as job `name`: the CLI's result.
fn apply(fleet: &Fleet, name: &str, text: &str) -> Result<std::process::Output> {
    let path = fleet.spec(name, text)?;
    fleet.cli(&["apply", "-f", &path.display().to_string()])
}

fn pending(fleet: &Fleet, job: &str) -> Result<String> {
    let st = fleet.cli_json(&["job", "status", job])?;
    Ok(st["pending"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn k10_previous_release_upgrades_in_place_and_its_agent_keeps_working() -> Result<()> {
    if !can_run() || !require(&[COMPAT_BINARIES]) {
        return Ok(());
    }
    let dir = PathBuf::from(std::env::var_os("SKIFF_COMPAT_BIN_DIR").context("compat dir")?);
    let (old_controller, old_agent) = (dir.join("skiff-controller"), dir.join("skiff-agent"));
    for b in [&old_controller, &old_agent] {
        ensure!(b.is_file(), "{} is missing", b.display());
    }
    let _serial = serial();
    let olds: Vec<(&str, &std::path::Path)> = vec![
        ("c1", &old_controller),
        ("c2", &old_controller),
        ("c3", &old_controller),
        ("a1", &old_agent),
        ("a2", &old_agent),
    ];
    let mut fleet = Fleet::start_with_binaries(3, 2, "", &olds)?;
    let result = (|| -> Result<()> {
        let say = |what: &str| eprintln!("compat: {what}");
        scenario_web(&fleet)?;
        let mut written = vec!["web".to_owned()];

        // Controllers one at a time, followers first, a write acknowledged after each.
        let leader = fleet.leader_host()?;
        let mut order: Vec<String> = ["c1", "c2", "c3"]
            .iter()
            .filter(|c| **c != leader)
            .map(|c| (*c).to_owned())
            .collect();
        order.push(leader);
        for (i, member) in order.iter().enumerate() {
            // A fenced job is refused while any member is on the baseline: by a baseline
            // leader's parser, or by an upgraded leader's command level. Nothing is written.
            let fenced = apply(&fleet, "early", &fenced_spec(&fleet, "early", 1, None))?;
            let err = String::from_utf8_lossy(&fenced.stderr).into_owned();
            ensure!(
                !fenced.status.success()
                    && (err.contains("disconnect: unknown field")
                        || (err.contains("needs command level 2")
                            && err.contains("finish upgrading"))),
                "a fenced job with {i} of 3 members upgraded: {err}"
            );
            fleet.stop(member)?;
            if i == 2 {
                // The baseline leader is down: an upgraded member leads, and refuses the
                // fenced job by its level while a member's level is not known to be 2.
                fleet.wait_for(
                    "an upgraded member to refuse the fenced job by level",
                    Duration::from_secs(30),
                    |f| {
                        let out = apply(f, "early", &fenced_spec(f, "early", 1, None))?;
                        let err = String::from_utf8_lossy(&out.stderr);
                        ensure!(!out.status.success(), "early was accepted");
                        Ok(err.contains("needs command level 2")
                            && err.contains("finish upgrading"))
                    },
                )?;
                say(
                    "with the last baseline member down, the new leader refuses [disconnect] by command level",
                );
            }
            fleet.start_daemon(member, None)?;
            let name = format!("w{}", i + 1);
            let text = format!(
                "name = \"{name}\"\nimage = \"{}\"\nreplicas = 0\n",
                fleet.image()
            );
            fleet.wait_for(
                &format!("a write after upgrading {member}"),
                Duration::from_secs(30),
                |f| Ok(apply(f, &name, &text)?.status.success()),
            )?;
            written.push(name);
            say(&format!("{member} upgraded; a write went through"));
        }
        let early = fleet.cli(&["job", "status", "early"])?;
        ensure!(
            !early.status.success()
                && String::from_utf8_lossy(&early.stderr).contains("job default/early not found"),
            "the refused fenced job was written: {}",
            String::from_utf8_lossy(&early.stderr)
        );
        // Every member now says it applies level 2 (they ask each other every few seconds).
        fleet.wait_for(
            "a fenced job to be accepted",
            Duration::from_secs(30),
            |f| {
                Ok(apply(f, "lock", &fenced_spec(f, "lock", 2, None))?
                    .status
                    .success())
            },
        )?;
        written.push("lock".into());
        // The baseline agents cannot fence: lock waits, and says why.
        fleet.wait_for(
            "lock pending for want of fencing",
            Duration::from_secs(20),
            |f| Ok(pending(f, "lock")?.contains("2 agent without fence support")),
        )?;
        ensure!(
            capabilities(&fleet, "a1")?.is_empty(),
            "a1 is the old agent"
        );
        say("all controllers upgraded; lock pending: no agent fences");

        // a2 upgraded: lock runs there, both replicas.
        fleet.upgrade("a2", None)?;
        fleet.wait_for(
            "lock's 2 replicas running on a2",
            Duration::from_secs(60),
            |f| {
                let a = f.allocations("lock")?;
                Ok(a.len() == 2 && a.iter().all(|x| x.1 == "a2" && x.2 == "running"))
            },
        )?;
        ensure!(capabilities(&fleet, "a2")? == ["fence"], "a2 lists fence");
        // One that may run only on a1 (zone a) waits, and says why.
        let out = apply(
            &fleet,
            "pinned",
            &fenced_spec(&fleet, "pinned", 1, Some("a")),
        )?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        written.push("pinned".into());
        fleet.wait_for("pinned pending", Duration::from_secs(20), |f| {
            let p = pending(f, "pinned")?;
            Ok(p.contains("1 agent without fence support") && p.contains("1 constraint zone = a"))
        })?;
        say("a2 upgraded: lock runs there; pinned (zone a) pending on the old a1");

        // Old and new agents under the new controllers: everything the fleets are tested for.
        run_all(&mut fleet, &Expect::this_machine(), 2)?;
        let web = fleet.allocations("web")?;
        ensure!(
            web.iter().any(|a| a.1 == "a1"),
            "web runs on the old agent too: {web:?}"
        );

        // a1 upgraded in place: same containers, same processes, and now it fences.
        let before = fleet.running("a1")?;
        ensure!(!before.is_empty(), "containers on a1 before its upgrade");
        fleet.upgrade("a1", None)?;
        fleet.wait_for("a1 to list fence", Duration::from_secs(30), |f| {
            Ok(capabilities(f, "a1")? == ["fence"])
        })?;
        fleet.wait_for("pinned to run on a1", Duration::from_secs(60), |f| {
            let a = f.allocations("pinned")?;
            Ok(a.len() == 1 && a[0].1 == "a1" && a[0].2 == "running")
        })?;
        let after = fleet.running("a1")?;
        for c in &before {
            ensure!(
                after.iter().any(|a| a.0 == c.0 && a.3 == c.3),
                "container {} ({}, pid {}) did not survive the upgrade: {after:?}",
                c.1,
                c.0,
                c.3
            );
        }
        let web = fleet.allocations("web")?;
        ensure!(
            web.iter().all(|a| a.2 == "running"),
            "web after the upgrade: {web:?}"
        );
        // No acknowledged write lost.
        let jobs = fleet.cli_json(&["jobs"])?;
        for name in &written {
            ensure!(
                jobs.as_array()
                    .into_iter()
                    .flatten()
                    .any(|j| j["name"] == name.as_str()),
                "job {name} was acknowledged and is gone: {jobs}"
            );
        }
        say(&format!(
            "a1 upgraded with its {} containers kept; pinned runs there; {} acknowledged jobs all present",
            before.len(),
            written.len()
        ));
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", fleet.log_tails(40));
    }
    result
}

/// The web job the scenarios run, on the baseline fleet before anything is upgraded.
fn scenario_web(fleet: &Fleet) -> Result<()> {
    skiff_e2e::scenario::web(fleet, 4)
}
