//! Simulated nodes (`skiff-agent simulate`) against a real 3-member controller cluster: they
//! enroll with one join token (a certificate each), register, run what they are given (the
//! agent's own reconciler over an in-memory runtime) and report it; a scale-down stops the
//! extra allocations on the nodes; a leader SIGKILL is followed by every node's heartbeats
//! being answered again, with no node marked down. No root needed: everything is loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skiff_e2e::{ChildGuard, ControllerProc, bin, eventually, skiff};

const NODES: usize = 40;

/// The simulator's last report line.
fn sim_report(log: &Path) -> serde_json::Value {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .filter(|l| l.starts_with("{\"t_ms\""))
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_default()
}

/// `skiff ARGS -o json`, or null when it fails (a cluster still forming, a leader gone).
fn skiff_json(creds: &Path, addrs: &[SocketAddr], args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = skiff(creds, addrs, &all);
    if !out.status.success() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn running(creds: &Path, addrs: &[SocketAddr], job: &str) -> Vec<serde_json::Value> {
    skiff_json(creds, addrs, &["ps", job])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a["status"] == "running")
        .collect()
}

fn leader_index(creds: &Path, addrs: &[SocketAddr]) -> usize {
    let mut leader = 0;
    eventually("a leader", Duration::from_secs(20), || {
        let v = skiff_json(creds, addrs, &["cluster", "leader"]);
        leader = v["leader_id"].as_u64().unwrap_or(0) as usize;
        leader != 0
    });
    leader - 1
}

#[test]
fn simulated_nodes_run_a_job_and_reconnect_after_a_leader_kill() {
    let root = tempfile::Builder::new()
        .prefix("skiff-e2e-scale-")
        .tempdir()
        .expect("tempdir");
    let mut members =
        ControllerProc::start_cluster(root.path(), 3, &["--node-subnet-prefix", "26"]);
    let first = members[0].rpc;
    let creds = members[0].creds();
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.rpc).collect();
    let out = skiff(
        &creds,
        &addrs,
        &["token", "create", "--role", "agent", "--uses", "0"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent_token = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    // Bad flags are named, before anything connects.
    let data = root.path().join("sim");
    for (flag, value) in [
        ("--count", "0"),
        ("--name-prefix", "Bad_"),
        ("--memory", "lots"),
    ] {
        let out = Command::new(bin("skiff-agent"))
            .args(["--data-dir", &data.display().to_string(), "simulate"])
            .args(["--controller", &first.to_string(), flag, value])
            .output()
            .expect("skiff-agent simulate");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(flag),
            "{flag} {value}: {err}"
        );
    }

    let log = root.path().join("simulate.log");
    let controllers = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let started = Instant::now();
    let _sim = ChildGuard(
        Command::new(bin("skiff-agent"))
            .args(["--data-dir", &data.display().to_string(), "simulate"])
            .args(["--controller", &controllers, "--count", &NODES.to_string()])
            .args(["--join-token", &agent_token, "--report-every", "200ms"])
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn skiff-agent simulate"),
    );
    eventually(
        "every simulated node ready",
        Duration::from_secs(60),
        || {
            let v = skiff_json(&creds, &addrs, &["nodes"]);
            v.as_array()
                .is_some_and(|n| n.len() == NODES && n.iter().all(|x| x["status"] == "ready"))
        },
    );
    let nodes = skiff_json(&creds, &addrs, &["nodes"]);
    let first_node = nodes
        .as_array()
        .and_then(|n| n.iter().find(|x| x["name"] == "sim-1"))
        .cloned()
        .expect("sim-1");
    assert_eq!(first_node["address"], "127.1.0.1", "{first_node}");
    assert_eq!(first_node["labels"]["zone"], "a", "{first_node}");
    // Each enrolled with its own certificate, kept in its own directory.
    for i in [1, NODES] {
        let cert = data.join(format!("simulate/sim-{i}/tls"));
        assert!(cert.is_dir(), "{} missing", cert.display());
    }

    let spec = root.path().join("scale.toml");
    let write = |replicas: u32| {
        std::fs::write(
            &spec,
            format!(
                "name = \"scale\"\nimage = \"127.0.0.1:5000/scale/web:1\"\nreplicas = {replicas}\n\
                 [resources]\ncpu = 0.01\nmemory = \"16Mi\"\n"
            ),
        )
        .expect("spec");
    };
    write(120);
    let out = skiff(
        &creds,
        &addrs,
        &["apply", "-f", &spec.display().to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("120 allocations running", Duration::from_secs(60), || {
        running(&creds, &addrs, "scale").len() == 120
    });
    // Addresses are distinct and each is in its node's pod subnet.
    let allocs = running(&creds, &addrs, "scale");
    let ips: std::collections::HashSet<&str> =
        allocs.iter().filter_map(|a| a["ip"].as_str()).collect();
    assert_eq!(ips.len(), 120, "addresses: {ips:?}");
    eventually("the nodes run 120", Duration::from_secs(10), || {
        sim_report(&log)["running"] == 120
    });

    // Scaling down stops the extra allocations on the nodes themselves.
    let out = skiff(&creds, &addrs, &["scale", "scale", "30"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the nodes run 30", Duration::from_secs(30), || {
        sim_report(&log)["running"] == 30 && running(&creds, &addrs, "scale").len() == 30
    });

    // The leader dies: every node's heartbeat is answered by the new one, none is down.
    let leader = leader_index(&creds, &addrs);
    let killed_at = started.elapsed().as_millis() as u64;
    members[leader].kill();
    let live: Vec<SocketAddr> = addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, a)| *a)
        .collect();
    eventually(
        "every node answered after the kill",
        Duration::from_secs(30),
        || sim_report(&log)["min_answered_ms"].as_u64().unwrap_or(0) > killed_at,
    );
    let v = skiff_json(&creds, &live, &["nodes"]);
    let down: Vec<&serde_json::Value> = v
        .as_array()
        .map(|n| n.iter().filter(|x| x["status"] != "ready").collect())
        .unwrap_or_default();
    assert!(
        down.is_empty(),
        "nodes not ready after the failover: {down:?}"
    );
    assert_eq!(running(&creds, &live, "scale").len(), 30);
}
