//! The fleet end to end: 3 controllers and 3 agents, each on a simulated host (a network
//! namespace on a bridge, 198.18.0.0/16), the real binaries, driven with the CLI. Needs root.
//! Fleets are built one test at a time (2 cores: timings would suffer otherwise), and each
//! removes everything it created when it drops, also on failure.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use skiff_e2e::fleet::{Fleet, can_run, serial};

const GRACE: &str = "3s";

fn web(fleet: &Fleet, replicas: u32, extra: &str) -> Result<std::path::PathBuf> {
    fleet.spec(
        "web",
        &format!(
            "name = \"web\"\nreplicas = {replicas}\nimage = \"{}\"\n\
             command = [\"/bin/httpd\"]\nargs = [\"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             stop_signal = \"SIGKILL\"\n{extra}\n[resources]\ncpu = 0.1\nmemory = \"32Mi\"\n",
            fleet.image()
        ),
    )
}

/// Allocations per node, of those running.
fn per_node(fleet: &Fleet, job: &str) -> Result<BTreeMap<String, usize>> {
    let mut m = BTreeMap::new();
    for (_, node, status) in fleet.allocations(job)? {
        if status == "running" {
            *m.entry(node).or_insert(0) += 1;
        }
    }
    Ok(m)
}

/// Running containers across every agent, by container name (allocation id).
fn containers_running(fleet: &Fleet, agents: &[&str]) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for a in agents {
        for (_, name, _, _) in fleet.running(a)? {
            ensure!(
                m.insert(name.clone(), (*a).to_owned()).is_none(),
                "allocation {name} runs twice"
            );
        }
    }
    Ok(m)
}

#[test]
fn f10_spread_scale_drain_and_plan() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start(3, 3, GRACE)?;
    let agents = ["a1", "a2", "a3"];

    // A 6-replica job spreads over the three agents.
    let spec = web(&fleet, 6, "")?;
    let plan = fleet.cli_ok(&["plan", "-f", &spec.display().to_string()])?;
    assert!(
        plan.contains("place 2 on a1") && plan.contains("place 2 on a3"),
        "{plan}"
    );
    fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
    fleet.wait_for(
        "6 running replicas, 2 per agent",
        Duration::from_secs(30),
        |f| Ok(per_node(f, "web")?.values().copied().collect::<Vec<_>>() == [2, 2, 2]),
    )?;
    assert_eq!(containers_running(&fleet, &agents)?.len(), 6);

    // Scale up and down.
    fleet.cli_ok(&["scale", "web", "9"])?;
    fleet.wait_for("9 replicas, 3 per agent", Duration::from_secs(30), |f| {
        Ok(per_node(f, "web")?.values().copied().collect::<Vec<_>>() == [3, 3, 3])
    })?;
    fleet.cli_ok(&["scale", "web", "3"])?;
    fleet.wait_for(
        "3 replicas, 1 per agent, 3 containers",
        Duration::from_secs(30),
        |f| {
            Ok(
                per_node(f, "web")?.values().copied().collect::<Vec<_>>() == [1, 1, 1]
                    && containers_running(f, &agents)?.len() == 3,
            )
        },
    )?;

    // Drain a2: its replica moves, nothing new lands there.
    let out = fleet.cli_ok(&["node", "drain", "a2"])?;
    assert!(out.contains("a2: draining"), "{out}");
    fleet.wait_for(
        "a2 empty, 3 replicas elsewhere",
        Duration::from_secs(30),
        |f| {
            let m = per_node(f, "web")?;
            Ok(!m.contains_key("a2")
                && m.values().sum::<usize>() == 3
                && f.running("a2")?.is_empty())
        },
    )?;
    fleet.cli_ok(&["scale", "web", "4"])?;
    fleet.wait_for("4 replicas, none on a2", Duration::from_secs(30), |f| {
        let m = per_node(f, "web")?;
        Ok(!m.contains_key("a2") && m.values().sum::<usize>() == 4)
    })?;
    let nodes = fleet.cli_json(&["nodes"])?;
    let a2 = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == "a2"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(a2["status"], "draining");
    fleet.cli_ok(&["node", "undrain", "a2"])?;

    // A job that cannot fit stays pending with the reason; the CLI shows it.
    let big = fleet.spec(
        "big",
        &format!(
            "name = \"big\"\nreplicas = 1\nimage = \"{}\"\nargs = [\"sleep\", \"1000\"]\n\
             [resources]\ncpu = 8\nmemory = \"32Mi\"\n",
            fleet.image()
        ),
    )?;
    fleet.cli_ok(&["apply", "-f", &big.display().to_string()])?;
    fleet.wait_for("big to be pending", Duration::from_secs(20), |f| {
        Ok(f.cli_ok(&["job", "status", "big"])?
            .contains("pending:   0/3 nodes fit: 3 insufficient cpu"))
    })?;
    // Constraints: zone = b is only a2.
    let zoned = web(&fleet, 2, "[placement]\nconstraints = [\"zone = b\"]")?;
    let text = std::fs::read_to_string(&zoned)?.replace("name = \"web\"", "name = \"zoned\"");
    let zoned = fleet.spec("zoned", &text)?;
    fleet.cli_ok(&["apply", "-f", &zoned.display().to_string()])?;
    fleet.wait_for("zoned on a2 only", Duration::from_secs(30), |f| {
        Ok(per_node(f, "zoned")? == BTreeMap::from([("a2".to_owned(), 2)]))
    })?;

    // Logs and exec through the agent.
    let (id, _, _) = fleet
        .allocations("web")?
        .into_iter()
        .next()
        .unwrap_or_default();
    let out = fleet.cli_ok(&["exec", &id, "--", "wget", "-qO-", "http://127.0.0.1:8080/"])?;
    assert_eq!(out, "hello from skiff\n");
    let out = fleet.cli(&["exec", &id, "--", "sh", "-c", "exit 7"])?;
    assert_eq!(out.status.code(), Some(7));
    fleet.cli_ok(&["logs", &id])?;
    Ok(())
}

#[test]
fn f20_agent_killed_is_replaced_and_restarted_agents_adopt() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    let mut fleet = Fleet::start(3, 3, GRACE)?;
    let agents = ["a1", "a2", "a3"];
    let spec = web(&fleet, 6, "")?;
    fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
    fleet.wait_for("6 running", Duration::from_secs(30), |f| {
        Ok(per_node(f, "web")?.values().sum::<usize>() == 6)
    })?;

    // Each node has its own pod subnet, kept when its agent restarts.
    let subnets = |f: &Fleet| -> Result<BTreeMap<String, String>> {
        let nodes = f.cli_json(&["nodes"])?;
        Ok(nodes
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                (
                    n["name"].as_str().unwrap_or_default().to_owned(),
                    n["subnet"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    };
    let before_subnets = subnets(&fleet)?;
    let distinct: std::collections::BTreeSet<&String> = before_subnets.values().collect();
    assert_eq!(distinct.len(), 3, "{before_subnets:?}");
    assert!(
        before_subnets
            .values()
            .all(|s| s.starts_with("10.42.") && s.ends_with(".0/24")),
        "{before_subnets:?}"
    );

    // An agent restart: its containers keep running, adopted, not restarted.
    let before = fleet.running("a1")?;
    fleet.kill_agent("a1")?;
    fleet.restart_agent("a1")?;
    fleet.wait_for("a1 back", Duration::from_secs(20), |f| {
        Ok(f.ready_nodes()?.contains(&"a1".to_owned()))
    })?;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fleet.running("a1")?, before, "same containers, same pids");
    assert_eq!(subnets(&fleet)?, before_subnets, "subnets kept");

    // SIGKILL a2: after the grace period its allocations run elsewhere.
    let lost: Vec<String> = fleet
        .allocations("web")?
        .into_iter()
        .filter(|(_, n, _)| n == "a2")
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(lost.len(), 2);
    fleet.kill_agent("a2")?;
    let took = fleet.wait_for(
        "a2's replicas to run on a1 and a3",
        Duration::from_secs(20),
        |f| {
            let m = per_node(f, "web")?;
            Ok(!m.contains_key("a2") && m.values().sum::<usize>() == 6)
        },
    )?;
    eprintln!("replaced a dead agent's allocations in {took:?} (grace {GRACE})");
    assert!(took < Duration::from_secs(3 + 8), "took {took:?}");
    let nodes = fleet.cli_json(&["nodes"])?;
    assert!(
        nodes
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["name"] == "a2" && n["status"] == "down")),
        "{nodes}"
    );

    // a2 comes back: its stale containers stop; nothing runs twice.
    fleet.restart_agent("a2")?;
    fleet.wait_for(
        "a2 ready and its stale containers gone",
        Duration::from_secs(30),
        |f| {
            Ok(f.ready_nodes()?.contains(&"a2".to_owned())
                && lost
                    .iter()
                    .all(|id| f.running("a2").is_ok_and(|r| r.iter().all(|c| &c.1 != id))))
        },
    )?;
    let running = containers_running(&fleet, &agents)?;
    let assigned: Vec<String> = fleet.allocations("web")?.into_iter().map(|a| a.0).collect();
    assert_eq!(running.len(), 6, "{running:?}");
    assert!(assigned.iter().all(|id| running.contains_key(id)));
    Ok(())
}

#[test]
fn f30_leader_killed_during_a_deploy() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    let mut fleet = Fleet::start(3, 3, GRACE)?;
    let spec = web(&fleet, 6, "")?;
    fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
    let killed = fleet.kill_leader()?;
    eprintln!("killed the leader ({killed}) right after the apply");
    fleet.wait_for(
        "the deploy to complete (6 running)",
        Duration::from_secs(45),
        |f| Ok(per_node(f, "web")?.values().sum::<usize>() == 6),
    )?;
    let running = containers_running(&fleet, &["a1", "a2", "a3"])?;
    assert_eq!(running.len(), 6, "{running:?}");
    // A new version deploys too, with one controller down.
    let v2 = web(
        &fleet,
        6,
        "env = { VERSION = \"2\" }\n[update]\nmax_surge = 3\nmin_healthy = \"1s\"",
    )?;
    fleet.cli_ok(&["apply", "-f", &v2.display().to_string()])?;
    fleet.wait_for("version 2 everywhere", Duration::from_secs(45), |f| {
        let ps = f.cli_json(&["ps", "web"])?;
        Ok(ps.as_array().is_some_and(|a| {
            a.len() == 6
                && a.iter()
                    .all(|x| x["job_version"] == 2 && x["status"] == "running")
        }))
    })?;
    Ok(())
}

/// The node named `name` in `skiff nodes -o json`.
fn node(fleet: &Fleet, name: &str) -> Result<serde_json::Value> {
    let nodes = fleet.cli_json(&["nodes"])?;
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == name))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no node {name} in {nodes}"))
}

#[test]
fn f40_a_full_data_disk_prunes_unused_images_and_stops_new_placements() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    // Each agent's data dir is a 64 MiB tmpfs; pressure starts at 50% used.
    let fleet = Fleet::start_small_disks(1, 2, GRACE, &["--disk-pressure-threshold", "50"], "64m")?;
    let a1 = fleet.agent_data("a1")?.to_owned();

    // A job runs on both agents, then stops: a1 keeps the image nothing uses now.
    let spec = web(&fleet, 2, "")?;
    fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
    fleet.wait_for("a replica on each agent", Duration::from_secs(30), |f| {
        Ok(per_node(f, "web")?.values().copied().collect::<Vec<_>>() == [1, 1])
    })?;
    fleet.cli_ok(&["stop", "web"])?;
    fleet.wait_for("no container running on a1", Duration::from_secs(30), |f| {
        Ok(f.running("a1")?.is_empty())
    })?;
    ensure!(!fleet.images("a1")?.is_empty(), "a1 has no image");
    assert_eq!(node(&fleet, "a1")?["disk_pressure"], false);

    // Fill a1's disk past the threshold: it prunes the unused image and reports pressure.
    let filler = a1.join("filler");
    let out = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=40", "status=none"])
        .arg(format!("of={}", filler.display()))
        .output()?;
    ensure!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.wait_for("a1 under disk pressure", Duration::from_secs(20), |f| {
        Ok(node(f, "a1")?["disk_pressure"] == true)
    })?;
    fleet.wait_for("a1's unused image pruned", Duration::from_secs(20), |f| {
        Ok(f.images("a1")?.is_empty())
    })?;
    assert!(
        fleet
            .log("a1")
            .contains("disk pressure: removed what no container uses"),
        "{}",
        fleet.log("a1")
    );
    let status = fleet.cli_ok(&["nodes"])?;
    assert!(status.contains("ready,disk-pressure"), "{status}");

    // Nothing new lands on a1; the plan names why.
    let plan = fleet.cli_ok(&["plan", "-f", &spec.display().to_string()])?;
    assert!(!plan.contains("on a1"), "{plan}");
    fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
    fleet.wait_for("both replicas on a2", Duration::from_secs(30), |f| {
        Ok(per_node(f, "web")? == BTreeMap::from([("a2".to_owned(), 2)]))
    })?;
    ensure!(fleet.running("a1")?.is_empty(), "a container started on a1");

    // Room again (5 points below the threshold): a1 takes replicas, pulling the image again.
    std::fs::remove_file(&filler)?;
    fleet.wait_for("a1's pressure to end", Duration::from_secs(20), |f| {
        Ok(node(f, "a1")?["disk_pressure"] == false)
    })?;
    let events: Vec<String> = fleet
        .cli_json(&["events", "--node", "a1"])?
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "node_disk_pressure")
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        events,
        [
            "disk pressure: nothing new is placed on the node",
            "disk pressure gone"
        ]
    );
    fleet.cli_ok(&["scale", "web", "4"])?;
    fleet.wait_for("2 replicas on each agent", Duration::from_secs(30), |f| {
        Ok(per_node(f, "web")?.values().copied().collect::<Vec<_>>() == [2, 2])
    })?;
    ensure!(
        !fleet.images("a1")?.is_empty(),
        "a1 did not fetch the image again"
    );
    Ok(())
}
