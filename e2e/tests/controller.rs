//! The controller cluster as real processes, driven by the real `skiff` CLI: formation by
//! `--bootstrap`/`--join`, writes through any member, leader SIGKILL, restart from the data
//! dir with only `--id` and `--data-dir`, bad input, and the HTTP endpoints.

use std::time::Duration;

use skiff_e2e::{ControllerProc, eventually, free_addr, skiff, skiff_json};

fn write_spec(dir: &std::path::Path, name: &str, replicas: u32) -> String {
    let path = dir.join(format!("{name}-{replicas}.toml"));
    std::fs::write(
        &path,
        format!("name = \"{name}\"\nimage = \"127.0.0.1:5000/demo/web:1.0\"\nreplicas = {replicas}\n[resources]\nmemory = \"32Mi\"\n"),
    )
    .expect("write spec");
    path.display().to_string()
}

fn leader_of(creds: &std::path::Path, addrs: &[std::net::SocketAddr]) -> u64 {
    let mut leader = 0;
    eventually("a leader", Duration::from_secs(20), || {
        let out = skiff(creds, addrs, &["cluster", "leader", "-o", "json"]);
        if !out.status.success() {
            return false;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        leader = v["leader_id"].as_u64().unwrap_or(0);
        leader != 0
    });
    leader
}

#[test]
fn three_member_cluster_survives_leader_sigkill_and_restarts() {
    let root = tempfile::Builder::new()
        .prefix("skiff-e2e-ctl-")
        .tempdir()
        .expect("tempdir");
    let mut members = ControllerProc::start_cluster(root.path(), 3, &[]);
    let creds = members[0].creds();
    let addrs: Vec<_> = members.iter().map(|m| m.rpc).collect();

    // Apply through a follower; the CLI prints the version and what changed.
    let spec = write_spec(root.path(), "web", 3);
    let out = skiff(&creds, &addrs[2..], &["apply", "-f", &spec]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "job default/web created: version 1"
    );
    // A reader that has gone (`skiff jobs | head -0`) ends the CLI quietly: no panic.
    let mut child = std::process::Command::new(skiff_e2e::bin("skiff"))
        .args(["--credentials", &creds.display().to_string()])
        .args(["--controller", &addrs[0].to_string(), "jobs"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run skiff");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for skiff");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("panicked"),
        "skiff jobs into a closed pipe: {:?} {err}",
        out.status
    );
    let spec5 = write_spec(root.path(), "web", 5);
    let out = skiff(&creds, &addrs[1..2], &["apply", "-f", &spec5]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("version 2") && text.contains("replicas: 3 -> 5"),
        "{text}"
    );
    let out = skiff(&creds, &addrs, &["apply", "-f", &spec5]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));

    // SIGKILL the leader; with every address given, the CLI finds a live member and writes
    // go on under a new leader.
    let leader = leader_of(&creds, &addrs);
    members[leader as usize - 1].kill();
    let mut acked = vec!["web".to_string()];
    for i in 0..5 {
        let name = format!("after-kill-{i}");
        let spec = write_spec(root.path(), &name, 1);
        let mut ok = false;
        eventually(
            "a write after the leader died",
            Duration::from_secs(15),
            || {
                ok = skiff(&creds, &addrs, &["apply", "-f", &spec])
                    .status
                    .success();
                ok
            },
        );
        acked.push(name);
    }
    let new_leader = leader_of(&creds, &addrs);
    assert_ne!(new_leader, leader);

    // The killed member restarts from its data dir with only --id and --data-dir, catches up,
    // and every acknowledged write is on every member.
    members[leader as usize - 1].restart();
    for m in &members {
        eventually("member to catch up", Duration::from_secs(20), || {
            let out = skiff(&creds, &[m.rpc], &["jobs", "--stale", "-o", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let names: Vec<&str> = v
                .as_array()
                .map(|a| a.iter().filter_map(|j| j["name"].as_str()).collect())
                .unwrap_or_default();
            acked.iter().all(|a| names.contains(&a.as_str()))
        });
    }
    let status = skiff_json(&creds, &addrs, &["job", "status", "web"]);
    assert_eq!(status["job"]["version"], 2);
    assert_eq!(status["versions"].as_array().map(Vec::len), Some(2));
    assert_eq!(status["versions"][0]["spec"]["replicas"], 5);

    // Stop keeps the job's versions.
    let out = skiff(&creds, &addrs, &["stop", "web"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped"));
    let status = skiff_json(&creds, &addrs, &["job", "status", "web"]);
    assert_eq!(status["job"]["status"], "stopped");

    // Metrics and health from every member.
    for m in &members {
        let (code, body) = m.http_get("/metrics").expect("metrics");
        assert_eq!(code, 200);
        for metric in [
            "skiff_raft_term",
            "skiff_raft_applied_index",
            "skiff_raft_commit_index",
            "skiff_state_apply_duration_seconds_bucket",
            "skiff_api_requests_total",
        ] {
            assert!(body.contains(metric), "member {} lacks {metric}", m.id);
        }
        assert_eq!(m.http_get("/healthz").map(|x| x.0), Some(200));
    }
}

#[test]
fn bad_input_is_refused_with_one_clear_line() {
    let root = tempfile::Builder::new()
        .prefix("skiff-e2e-bad-")
        .tempdir()
        .expect("tempdir");
    let mut m = ControllerProc::start(root.path(), 1, free_addr(), free_addr(), &["--bootstrap"]);
    let addrs = [m.rpc];
    let creds = m.creds();
    eventually("ready", Duration::from_secs(20), || {
        m.http_get("/readyz").is_some_and(|(c, _)| c == 200)
    });

    let bad = root.path().join("bad.toml");
    std::fs::write(&bad, "name = \"web\"\nimage = \"x\"\nreplicas = -2\n").expect("write");
    let out = skiff(
        &creds,
        &addrs,
        &["apply", "-f", bad.to_str().expect("utf8")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: replicas: expected a non-negative integer"),
        "{err}"
    );
    assert!(err.contains("(line 3)"), "{err}");
    let jobs = skiff_json(&creds, &addrs, &["jobs"]);
    assert_eq!(
        jobs.as_array().map(Vec::len),
        Some(0),
        "nothing was committed"
    );

    // No controller reachable: a clear error, non-zero exit.
    let out = skiff(&creds, &[free_addr()], &["jobs"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: no controller answered"));

    // A data dir of another member, or one that is not a skiff data dir, is refused.
    m.kill();
    let out = std::process::Command::new(skiff_e2e::bin("skiff-controller"))
        .args(["--id", "2", "--data-dir"])
        .arg(&m.data_dir)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to member 1, not member 2"));
    let foreign = root.path().join("foreign");
    std::fs::create_dir_all(&foreign).expect("mkdir");
    std::fs::write(foreign.join("precious.txt"), b"keep me").expect("write");
    let out = std::process::Command::new(skiff_e2e::bin("skiff-controller"))
        .args(["--id", "1", "--bootstrap", "--data-dir"])
        .arg(&foreign)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a skiff controller data dir"));
    assert_eq!(
        std::fs::read(foreign.join("precious.txt")).expect("kept"),
        b"keep me"
    );
    assert!(m.log_text().contains("controller started"));
}

/// A real Prometheus scrapes every member; `promtool` accepts the exposition.
#[test]
fn prometheus_scrapes_every_member() {
    if !skiff_testkit::require(&[
        skiff_testkit::tool("/usr/bin/prometheus", "prometheus"),
        skiff_testkit::tool("/usr/bin/promtool", "prometheus"),
    ]) {
        return;
    }
    let root = tempfile::Builder::new()
        .prefix("skiff-e2e-prom-")
        .tempdir()
        .expect("tempdir");
    let members = ControllerProc::start_cluster(root.path(), 3, &[]);

    // promtool lints the exposition format.
    let (_, body) = members[0].http_get("/metrics").expect("metrics");
    let mut check = std::process::Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(check.stdin.as_mut().expect("stdin"), body.as_bytes())
        .expect("write");
    drop(check.stdin.take());
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus server scrapes all three.
    let targets = members
        .iter()
        .map(|m| format!("'{}'", m.http))
        .collect::<Vec<_>>()
        .join(", ");
    let config = root.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: skiff-controller\n    static_configs:\n      - targets: [{targets}]\n"),
    )
    .expect("config");
    let web = free_addr();
    let _prometheus = skiff_e2e::ChildGuard(
        std::process::Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                root.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(root.path().join("prometheus.log")).expect("log"))
            .spawn()
            .expect("start prometheus"),
    );
    let query = |q: &str| -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={q}");
        skiff_e2e::http_get(web, &path)
            .and_then(|(code, body)| (code == 200).then_some(body))
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .unwrap_or_default()
    };
    eventually(
        "prometheus to scrape all three members",
        Duration::from_secs(60),
        || {
            let up = query("up");
            up.len() == 3 && up.iter().all(|s| s["value"][1] == "1")
        },
    );
    eventually(
        "exactly one leader in prometheus",
        Duration::from_secs(30),
        || {
            let leaders = query("sum(skiff_raft_is_leader)");
            leaders.first().is_some_and(|s| s["value"][1] == "1")
        },
    );
}

/// Every flag can come from the environment (`SKIFF_*`) and from a `--config` TOML file.
#[test]
fn config_from_environment_and_file() {
    let root = tempfile::Builder::new()
        .prefix("skiff-e2e-env-")
        .tempdir()
        .expect("tempdir");
    let (rpc, http) = (free_addr(), free_addr());
    let child = skiff_e2e::ChildGuard(
        std::process::Command::new(skiff_e2e::bin("skiff-controller"))
            .env("SKIFF_ID", "1")
            .env("SKIFF_DATA_DIR", root.path().join("env-member"))
            .env("SKIFF_RPC_ADDR", rpc.to_string())
            .env("SKIFF_HTTP_ADDR", http.to_string())
            .env("SKIFF_BOOTSTRAP", "true")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    eventually(
        "env-configured member ready",
        Duration::from_secs(20),
        || skiff_e2e::http_get(http, "/readyz").is_some_and(|(c, _)| c == 200),
    );
    drop(child);

    let (rpc, http) = (free_addr(), free_addr());
    let config = root.path().join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "id = 7\ndata_dir = \"{}\"\nrpc_addr = \"{rpc}\"\nhttp_addr = \"{http}\"\nbootstrap = true\n[raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\n",
            root.path().join("file-member").display()
        ),
    )
    .expect("config");
    let child = skiff_e2e::ChildGuard(
        std::process::Command::new(skiff_e2e::bin("skiff-controller"))
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    eventually(
        "file-configured member ready",
        Duration::from_secs(20),
        || {
            skiff_e2e::http_get(http, "/readyz")
                .is_some_and(|(c, body)| c == 200 && body.contains("leader 7"))
        },
    );
    drop(child);

    // An unknown key in the file is named, and the process exits non-zero.
    std::fs::write(
        &config,
        "id = 7\ndata_dir = \"/nonexistent\"\nheartbeat = 5\n",
    )
    .expect("config");
    let out = std::process::Command::new(skiff_e2e::bin("skiff-controller"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("heartbeat"), "{err}");
}

/// Cluster-wide settings are fixed at bootstrap: a member restarted with only `--id` and
/// `--data-dir` keeps them (it used to fall back to defaults), and one restarted with another
/// value refuses to start, naming both.
#[test]
fn cluster_settings_survive_restarts_and_conflicts_are_refused() {
    let root = tempfile::Builder::new()
        .prefix("skiff-e2e-settings-")
        .tempdir()
        .expect("tempdir");
    let (rpc, http) = (free_addr(), free_addr());
    let mut m = skiff_e2e::ControllerProc::start(
        root.path(),
        1,
        rpc,
        http,
        &[
            "--bootstrap",
            "--cluster-cidr",
            "10.50.0.0/16",
            "--node-subnet-prefix",
            "26",
        ],
    );
    let creds = m.creds();
    let info = || skiff_e2e::skiff_json(&creds, &[rpc], &["cluster", "info"]);
    let cidr_is = |want: &str| {
        let out = skiff(&creds, &[rpc], &["cluster", "info", "-o", "json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|v| v["cluster_cidr"] == want)
    };
    eventually("settings committed", Duration::from_secs(20), || {
        cidr_is("10.50.0.0/16")
    });
    assert_eq!(info()["node_subnet_prefix"], 26);
    let text = skiff(&creds, &[rpc], &["cluster", "info"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("cluster cidr:       10.50.0.0/16"), "{text}");

    m.kill();
    m.restart();
    eventually("restarted member answers", Duration::from_secs(20), || {
        cidr_is("10.50.0.0/16")
    });
    assert_eq!(info()["node_subnet_prefix"], 26, "not the default 24");
    m.kill();

    let out = std::process::Command::new(skiff_e2e::bin("skiff-controller"))
        .args(["--id", "1", "--data-dir"])
        .arg(&m.data_dir)
        .args(["--cluster-cidr", "10.60.0.0/16"])
        .output()
        .expect("run");
    assert!(!out.status.success(), "a conflicting member must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "--cluster-cidr 10.60.0.0/16, but the cluster was bootstrapped with 10.50.0.0/16"
        ),
        "{err}"
    );
}
