//! Observability on the netns fleet (needs root, Debian's `prometheus`): a real Prometheus,
//! configured only with the shipped `deploy/monitoring/prometheus.yml` pointed at one
//! controller's HTTP service discovery, scrapes every controller, agent and mesh sidecar;
//! per-workload series carry the right labels and figures (memory within the limit, CPU
//! rising, an OOM kill counted); every endpoint passes `promtool check metrics`, the shipped
//! rules pass `promtool check rules` and their unit tests.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use skiff_e2e::fleet::{Fleet, can_run, serial};

const MONITORING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/monitoring");
const PROM_WEB: &str = "127.0.0.1:9090";
/// The burner's memory limit.
const LIMIT: u64 = 32 * 1024 * 1024;

use skiff_e2e::promtool;

/// GET `url` from the cli host.
fn get(fleet: &Fleet, url: &str) -> Result<String> {
    let out = fleet.on_host("cli", &["curl", "-sfS", "--max-time", "5", url])?;
    ensure!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An instant query's result vector.
fn query(fleet: &Fleet, q: &str) -> Result<Vec<serde_json::Value>> {
    let out = fleet.on_host(
        "cli",
        &[
            "curl",
            "-sfS",
            "--max-time",
            "5",
            &format!("http://{PROM_WEB}/api/v1/query"),
            "--data-urlencode",
            &format!("query={q}"),
        ],
    )?;
    ensure!(out.status.success(), "query {q}: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn value(sample: &serde_json::Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Starts Prometheus on the cli host with the shipped config, its only target source being
/// `controller`'s service discovery (faster intervals for the test).
fn start_prometheus(fleet: &Fleet, controller: &str) -> Result<skiff_e2e::ChildGuard> {
    let dir = fleet.dir().join("prometheus");
    std::fs::create_dir_all(&dir)?;
    let shipped = std::fs::read_to_string(format!("{MONITORING}/prometheus.yml"))?;
    ensure!(
        shipped.contains("CONTROLLER:7780"),
        "the shipped config names CONTROLLER:7780"
    );
    let config = shipped
        .replace("CONTROLLER:7780", controller)
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("refresh_interval: 15s", "refresh_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    std::fs::write(dir.join("prometheus.yml"), config)?;
    std::fs::copy(format!("{MONITORING}/alerts.yml"), dir.join("alerts.yml"))?;
    promtool(
        &[
            "check",
            "config",
            &dir.join("prometheus.yml").display().to_string(),
        ],
        None,
    )?;
    let netns = format!("/run/netns/{}", fleet.host("cli")?.netns);
    let child = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .arg("--")
        .arg("/usr/bin/prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={PROM_WEB}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
        .spawn()
        .context("starting prometheus")?;
    Ok(skiff_e2e::ChildGuard(child))
}

fn scenario(fleet: &Fleet) -> Result<()> {
    let image = fleet.image();
    // Two replicas that burn CPU, one that gets OOM-killed (its `sort` holds ~100 MB against
    // a 24 MiB limit; the shell survives), and a meshed HTTP service.
    fleet.cli_ok(&[
        "apply",
        "-f",
        &fleet
            .spec(
                "burn",
                &format!(
                    "name = \"burn\"\nreplicas = 2\nimage = \"{image}\"\n\
                     command = [\"/bin/sh\", \"-c\", \"while :; do :; done\"]\n\
                     stop_signal = \"SIGKILL\"\n\
                     [placement]\nspread = true\n\
                     [resources]\ncpu = 0.2\nmemory = \"32Mi\"\n"
                ),
            )?
            .display()
            .to_string(),
    ])?;
    fleet.cli_ok(&[
        "apply",
        "-f",
        &fleet
            .spec(
                "hog",
                &format!(
                    "name = \"hog\"\nimage = \"{image}\"\n\
                     command = [\"/bin/sh\", \"-c\", \"sleep 1; yes | head -n 3000000 | sort > /dev/null; exec sleep 3600\"]\n\
                     stop_signal = \"SIGKILL\"\n\
                     [resources]\ncpu = 0.2\nmemory = \"24Mi\"\n"
                ),
            )?
            .display()
            .to_string(),
    ])?;
    fleet.cli_ok(&[
        "apply",
        "-f",
        &fleet
            .spec(
                "api",
                &format!(
                    "name = \"api\"\nimage = \"{image}\"\n\
                     command = [\"/bin/sh\", \"-c\", \"mkdir -p /tmp/www && echo ok > /tmp/www/id && exec httpd -f -p 8080 -h /tmp/www\"]\n\
                     stop_signal = \"SIGKILL\"\n\
                     [[ports]]\nname = \"http\"\nport = 8080\nprotocol = \"http\"\n\
                     [service]\nport = \"http\"\n\
                     [mesh]\n\
                     [resources]\ncpu = 0.05\nmemory = \"16Mi\"\n"
                ),
            )?
            .display()
            .to_string(),
    ])?;
    // And one that keeps failing (restarted by its policy).
    fleet.cli_ok(&[
        "apply",
        "-f",
        &fleet
            .spec(
                "crash",
                &format!(
                    "name = \"crash\"\nimage = \"{image}\"\n\
                     command = [\"/bin/sh\", \"-c\", \"sleep 1; exit 3\"]\n\
                     [resources]\ncpu = 0.05\nmemory = \"16Mi\"\n"
                ),
            )?
            .display()
            .to_string(),
    ])?;
    for job in ["burn", "hog", "api"] {
        fleet.wait_for(&format!("{job} running"), Duration::from_secs(60), |f| {
            let a = f.allocations(job)?;
            let want = if job == "burn" { 2 } else { 1 };
            Ok(a.iter().filter(|(_, _, s)| s == "running").count() == want)
        })?;
    }
    let burners: BTreeSet<String> = fleet
        .allocations("burn")?
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    let api_alloc = fleet.allocations("api")?[0].0.clone();

    // The discovery document lists 3 members, 2 agents and the api's sidecar.
    let c1 = format!("{}:7780", fleet.host("c1")?.addr);
    let sd: serde_json::Value =
        serde_json::from_str(&get(fleet, &format!("http://{c1}/v1/prometheus/targets"))?)?;
    let roles: Vec<String> = sd
        .as_array()
        .context("SD is a list")?
        .iter()
        .map(|g| g["labels"]["role"].as_str().unwrap_or("").to_owned())
        .collect();
    ensure!(
        roles.iter().filter(|r| *r == "controller").count() == 3
            && roles.iter().filter(|r| *r == "agent").count() == 2,
        "targets: {sd}"
    );
    fleet.wait_for("the api's sidecar in SD", Duration::from_secs(30), |f| {
        let sd: serde_json::Value =
            serde_json::from_str(&get(f, &format!("http://{c1}/v1/prometheus/targets"))?)?;
        Ok(sd.as_array().into_iter().flatten().any(|g| {
            g["labels"]["role"] == "sidecar"
                && g["labels"]["alloc"] == api_alloc.as_str()
                && g["labels"]["workload"] == "api"
                && g["labels"]["namespace"] == "default"
                && g["labels"]["__metrics_path__"]
                    == format!("/sidecars/{api_alloc}/metrics").as_str()
        }))
    })?;

    // promtool accepts every endpoint: each member (the leader's has the cluster gauges),
    // each agent, the sidecar.
    let mut leader_has_cluster_gauges = false;
    for c in ["c1", "c2", "c3"] {
        let text = get(
            fleet,
            &format!("http://{}:7780/metrics", fleet.host(c)?.addr),
        )?;
        promtool(&["check", "metrics"], Some(&text)).with_context(|| c.to_string())?;
        ensure!(text.contains("skiff_tls_certificate_expiry_timestamp_seconds{identity=\"member"));
        leader_has_cluster_gauges |= text.contains("skiff_cluster_nodes{status=\"ready\"} 2");
    }
    ensure!(
        leader_has_cluster_gauges,
        "no member exported the cluster gauges"
    );
    for a in ["a1", "a2"] {
        let text = get(
            fleet,
            &format!("http://{}:7802/metrics", fleet.host(a)?.addr),
        )?;
        promtool(&["check", "metrics"], Some(&text)).with_context(|| a.to_string())?;
        ensure!(
            text.contains(
                "skiff_workload_cpu_seconds_total{namespace=\"default\",workload=\"burn\""
            ),
            "{a}: {text}"
        );
    }
    let api_node = fleet.allocations("api")?[0].1.clone();
    let text = get(
        fleet,
        &format!(
            "http://{}:7802/sidecars/{api_alloc}/metrics",
            fleet.host(&api_node)?.addr
        ),
    )?;
    promtool(&["check", "metrics"], Some(&text)).context("sidecar")?;
    ensure!(
        text.contains(
            "skiff_mesh_certificate_expiry_timestamp_seconds{namespace=\"default\",workload=\"api\""
        ),
        "sidecar metrics: {text}"
    );

    // The shipped rules are valid and their unit tests pass.
    promtool(
        &["check", "rules", &format!("{MONITORING}/alerts.yml")],
        None,
    )?;
    promtool(
        &["test", "rules", &format!("{MONITORING}/alerts_test.yml")],
        None,
    )?;

    // A real Prometheus given only the discovery URL scrapes everything.
    let _prometheus = start_prometheus(fleet, &c1)?;
    fleet.wait_for(
        "Prometheus: up == 1 for 3 controllers, 2 agents and the sidecar",
        Duration::from_secs(90),
        |f| {
            let up = query(f, "up")?;
            let count = |role: &str| {
                up.iter()
                    .filter(|s| s["metric"]["role"] == role && value(s) == 1.0)
                    .count()
            };
            Ok(count("controller") == 3 && count("agent") == 2 && count("sidecar") == 1)
        },
    )?;
    // One memory series per burner, labelled, within the limit.
    let mem = fleet.wait_for_value("the burners' memory series", Duration::from_secs(30), |f| {
        let m = query(f, "skiff_workload_memory_bytes{workload=\"burn\"}")?;
        Ok((m.len() == 2).then_some(m))
    })?;
    let mut seen = BTreeSet::new();
    for s in &mem {
        let l = &s["metric"];
        ensure!(
            l["namespace"] == "default"
                && l["version"] == "1"
                && l["container"] == "burn"
                && matches!(l["node"].as_str(), Some("a1" | "a2"))
                && l["role"] == "agent",
            "labels: {l}"
        );
        seen.insert(l["alloc"].as_str().unwrap_or("").to_owned());
        let v = value(s);
        ensure!(
            v > 0.0 && v <= LIMIT as f64,
            "memory {v} not within (0, {LIMIT}]"
        );
    }
    ensure!(
        seen == burners,
        "series of {seen:?}, allocations {burners:?}"
    );
    let limits = query(
        fleet,
        "skiff_workload_memory_limit_bytes{workload=\"burn\"}",
    )?;
    ensure!(
        limits.len() == 2 && limits.iter().all(|s| value(s) == LIMIT as f64),
        "limits: {limits:?}"
    );
    // CPU rises.
    let cpu = |f: &Fleet| -> Result<f64> {
        Ok(query(
            f,
            "sum(skiff_workload_cpu_seconds_total{workload=\"burn\"})",
        )?
        .first()
        .map(value)
        .unwrap_or(0.0))
    };
    let before = cpu(fleet)?;
    fleet.wait_for(
        "the burners' CPU time to rise",
        Duration::from_secs(30),
        |f| Ok(cpu(f)? > before + 0.5),
    )?;
    // The OOM kill is counted.
    fleet.wait_for("the hog's OOM kill counted", Duration::from_secs(60), |f| {
        let o = query(f, "skiff_workload_oom_kills_total{workload=\"hog\"}")?;
        Ok(o.first().is_some_and(|s| value(s) >= 1.0))
    })?;
    // Network series exist for the pod network.
    let rx = query(
        fleet,
        "skiff_workload_network_receive_bytes_total{workload=\"api\"}",
    )?;
    ensure!(rx.len() == 1, "network series: {rx:?}");
    // The crashing container's restarts are counted, and logged as events.
    fleet.wait_for(
        "the crasher's restarts counted",
        Duration::from_secs(60),
        |f| {
            let r = query(f, "skiff_workload_restarts_total{workload=\"crash\"}")?;
            Ok(r.first().is_some_and(|s| value(s) >= 1.0))
        },
    )?;
    fleet.wait_for(
        "the crasher's restarts in its events",
        Duration::from_secs(30),
        |f| {
            Ok(f.cli_json(&["events", "--job", "crash"])?
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| {
                    e["kind"] == "restarted"
                        && e["message"].as_str().is_some_and(|m| m.contains("exit 3"))
                }))
        },
    )?;
    // The leader's cluster gauges, through Prometheus.
    // (Exported by the leader alone: one series each.)
    for (q, want) in [
        ("skiff_cluster_jobs", 4.0),
        ("skiff_cluster_nodes{status=\"ready\"}", 2.0),
        ("skiff_cluster_nodes{status=\"down\"}", 0.0),
    ] {
        let got = query(fleet, q)?;
        ensure!(
            got.len() == 1 && value(&got[0]) == want,
            "{q}: {got:?}, want one series of {want}"
        );
    }
    // The rules were loaded.
    let rules = get(fleet, &format!("http://{PROM_WEB}/api/v1/rules"))?;
    ensure!(
        rules.contains("SkiffAllocationCrashLooping"),
        "rules: {rules}"
    );
    eprintln!(
        "prometheus: burners' memory {:?} B (limit {LIMIT}), CPU {:.2} s and rising, hog OOM kills {:?}",
        mem.iter().map(value).collect::<Vec<_>>(),
        cpu(fleet)?,
        query(fleet, "skiff_workload_oom_kills_total{workload=\"hog\"}")?
            .iter()
            .map(value)
            .collect::<Vec<_>>()
    );

    top_and_events(fleet, &burners)?;
    status_page(fleet, &burners)?;

    // A stopped job's series disappear from its agent.
    fleet.cli_ok(&["stop", "crash"])?;
    fleet.wait_for("the crasher's series gone", Duration::from_secs(60), |f| {
        let mut any = false;
        for a in ["a1", "a2"] {
            let text = get(f, &format!("http://{}:7802/metrics", f.host(a)?.addr))?;
            any |= text.contains("workload=\"crash\"");
        }
        Ok(!any)
    })?;
    Ok(())
}

/// `skiff top` shows the burners' CPU and memory; `skiff events` has the hog's OOM kill and
/// follows a scale-up as it happens.
fn top_and_events(fleet: &Fleet, burners: &BTreeSet<String>) -> Result<()> {
    let top = fleet.wait_for_value(
        "skiff top to show both burners busy",
        Duration::from_secs(30),
        |f| {
            let top = f.cli_json(&["top", "burn"])?;
            let rows = top.as_array().cloned().unwrap_or_default();
            let busy = rows
                .iter()
                .filter(|r| {
                    burners.contains(r["allocation"].as_str().unwrap_or(""))
                        && r["cpu_cores"].as_f64().is_some_and(|c| c > 0.05)
                        && r["memory_bytes"]
                            .as_u64()
                            .is_some_and(|m| m > 0 && m <= LIMIT)
                        && r["memory_limit_bytes"].as_u64() == Some(LIMIT)
                })
                .count();
            Ok((busy == 2).then_some(top))
        },
    )?;
    eprintln!("skiff top: {top}");
    let table = fleet.cli_ok(&["top"])?;
    ensure!(
        table.contains("CPU") && table.contains("default/burn"),
        "{table}"
    );

    let kinds = |job: &str| -> Result<Vec<String>> {
        Ok(fleet
            .cli_json(&["events", "--job", job])?
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
            .collect())
    };
    fleet.wait_for(
        "the hog's OOM kill in its events",
        Duration::from_secs(30),
        |_| {
            let k = kinds("hog")?;
            Ok(["job_applied", "placed", "started", "oom_killed"]
                .iter()
                .all(|want| k.iter().any(|x| x == want)))
        },
    )?;
    // Follow the burner's events, then scale it: the placement and start arrive as they
    // happen, as JSON lines.
    let mut follow = fleet.cli_spawn(&[
        "events", "-f", "--job", "burn", "-o", "json", "--limit", "1",
    ])?;
    let stdout = follow.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The first line is the newest event so far.
    let first = rx
        .recv_timeout(Duration::from_secs(15))
        .context("first event line")?;
    let first: serde_json::Value = serde_json::from_str(&first)?;
    fleet.cli_ok(&["scale", "burn", "3"])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !(seen.iter().any(|k| k == "placed") && seen.iter().any(|k| k == "started")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        ensure!(
            !left.is_zero(),
            "followed events after the scale-up: {seen:?}"
        );
        let Ok(line) = rx.recv_timeout(left) else {
            continue;
        };
        let e: serde_json::Value = serde_json::from_str(&line)?;
        ensure!(
            e["seq"].as_u64() > first["seq"].as_u64() && e["job"] == "burn",
            "out of order or another job's: {e} after {first}"
        );
        seen.push(e["kind"].as_str().unwrap_or("").to_owned());
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let _ = reader.join();
    eprintln!("followed: {seen:?}");
    Ok(())
}

/// Runs `args` on the cli host; its stdout, or an error with its stderr.
fn on_cli(fleet: &Fleet, args: &[&str]) -> Result<String> {
    let out = fleet.on_host("cli", args)?;
    ensure!(
        out.status.success(),
        "{}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The status page: refused over plain HTTP, without a certificate and with a forged one;
/// served to a reader; rendered by headless chromium (with the reader's certificate in its
/// NSS store), its script refreshing it, and its screenshot read back by OCR.
fn status_page(fleet: &Fleet, burners: &BTreeSet<String>) -> Result<()> {
    let dir = fleet.dir().join("status-page");
    std::fs::create_dir_all(&dir)?;
    let creds = dir.join("viewer.creds");
    fleet.cli_ok(&[
        "credentials",
        "create",
        "viewer",
        "--role",
        "reader",
        "--out",
        &creds.display().to_string(),
    ])?;
    let c: toml::Value = toml::from_str(&std::fs::read_to_string(&creds)?)?;
    for (field, file) in [("ca", "ca.pem"), ("cert", "cert.pem"), ("key", "key.pem")] {
        std::fs::write(
            dir.join(file),
            c.get(field).and_then(|v| v.as_str()).context(field)?,
        )?;
    }
    let p = |f: &str| dir.join(f).display().to_string();
    let members = fleet.cli_json(&["cluster", "members"])?;
    let leader = members
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["role"] == "leader")
        .and_then(|m| m["http_addr"].as_str())
        .context("the leader's HTTP address")?
        .to_owned();
    let url = format!("https://{leader}/status");

    // Plain HTTP: 401, saying what is needed.
    let out = fleet.on_host(
        "cli",
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{leader}/status"),
        ],
    )?;
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "401",
        "plain HTTP: {out:?}"
    );
    // TLS without a client certificate, or with one from another CA: no handshake.
    let out = fleet.on_host("cli", &["curl", "-s", "--cacert", &p("ca.pem"), &url])?;
    ensure!(!out.status.success(), "no client certificate was let in");
    on_cli(
        fleet,
        &[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=forged",
            "-days",
            "1",
            "-keyout",
            &p("forged.key"),
            "-out",
            &p("forged.pem"),
        ],
    )?;
    let out = fleet.on_host(
        "cli",
        &[
            "curl",
            "-s",
            "--cacert",
            &p("ca.pem"),
            "--cert",
            &p("forged.pem"),
            "--key",
            &p("forged.key"),
            &url,
        ],
    )?;
    ensure!(!out.status.success(), "a forged certificate was let in");
    // The reader gets the page: members, nodes, the jobs and their allocations, events.
    let page = on_cli(
        fleet,
        &[
            "curl",
            "-sfS",
            "--cacert",
            &p("ca.pem"),
            "--cert",
            &p("cert.pem"),
            "--key",
            &p("key.pem"),
            &url,
        ],
    )?;
    for want in [
        "Skiff cluster status",
        "default/burn",
        "default/hog",
        "Recent events",
        "a1",
        "a2",
    ] {
        ensure!(
            page.contains(want),
            "the status page lacks {want:?}:\n{page}"
        );
    }
    for b in burners {
        ensure!(
            page.contains(b.as_str()),
            "the status page lacks allocation {b}"
        );
    }

    // Headless chromium with the reader's certificate, everything in a temp HOME.
    on_cli(
        fleet,
        &[
            "openssl",
            "pkcs12",
            "-export",
            "-in",
            &p("cert.pem"),
            "-inkey",
            &p("key.pem"),
            "-out",
            &p("viewer.p12"),
            "-passout",
            "pass:",
            "-name",
            "viewer",
        ],
    )?;
    let home = dir.join("home");
    let nssdb = home.join(".pki/nssdb");
    let profile = dir.join("profile");
    let tmp = dir.join("tmp");
    for d in [&nssdb, &profile.join("Default"), &tmp] {
        std::fs::create_dir_all(d)?;
    }
    let db = format!("sql:{}", nssdb.display());
    on_cli(fleet, &["certutil", "-N", "-d", &db, "--empty-password"])?;
    on_cli(
        fleet,
        &["pk12util", "-i", &p("viewer.p12"), "-d", &db, "-W", ""],
    )?;
    on_cli(
        fleet,
        &[
            "certutil",
            "-A",
            "-d",
            &db,
            "-n",
            "skiff-ca",
            "-t",
            "C,,",
            "-i",
            &p("ca.pem"),
        ],
    )?;
    // Chromium picks the certificate for this origin by itself (else it would wait for a
    // person to choose).
    std::fs::write(
        profile.join("Default/Preferences"),
        format!(
            "{{\"profile\":{{\"content_settings\":{{\"exceptions\":{{\"auto_select_certificate\":{{\"https://{leader},*\":{{\"setting\":{{\"filters\":[{{}}]}}}}}}}}}}}}}}\n"
        ),
    )?;
    let shot = dir.join("status.png");
    let netns = format!("--net=/run/netns/{}", fleet.host("cli")?.netns);
    let started = std::time::Instant::now();
    let out = Command::new("timeout")
        .args([
            "90",
            "nsenter",
            &netns,
            "--",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args([
            "--timeout=30000",
            "--virtual-time-budget=8000",
            "--window-size=1400,1000",
        ])
        .arg("--force-device-scale-factor=2")
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--dump-dom")
        .arg(&url)
        .env("HOME", &home)
        .env("TMPDIR", &tmp)
        .output()?;
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("chromium took {:.1} s", started.elapsed().as_secs_f64());
    ensure!(
        !log.contains("Page load failed") && !log.contains("Page load timed out"),
        "chromium: {log}"
    );
    // The DOM after the script ran: the content, and the refresh that fetched it again
    // (with the certificate too).
    for want in ["Skiff cluster status", "default/burn", "Last refresh:"] {
        ensure!(
            dom.contains(want),
            "chromium's DOM lacks {want:?}:\n{dom}\n{log}"
        );
    }
    for b in burners {
        ensure!(
            dom.contains(b.as_str()),
            "chromium's DOM lacks allocation {b}"
        );
    }
    // The screenshot shows it: OCR reads the heading and the job back.
    let png = std::fs::read(&shot)?;
    // To look at it: SKIFF_STATUS_SCREENSHOT=/some/file.png.
    if let Ok(keep) = std::env::var("SKIFF_STATUS_SCREENSHOT") {
        std::fs::copy(&shot, keep)?;
    }
    ensure!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG"),
        "screenshot: {} bytes",
        png.len()
    );
    let ocr = Command::new("tesseract").arg(&shot).arg("-").output()?;
    let text = String::from_utf8_lossy(&ocr.stdout).into_owned();
    ensure!(
        ocr.status.success()
            && text.contains("Skiff cluster status")
            && text.contains("default/burn"),
        "OCR of the screenshot: {text}"
    );
    eprintln!(
        "status page: {} bytes of DOM, screenshot {} bytes, OCR found the heading and default/burn",
        dom.len(),
        png.len()
    );
    Ok(())
}

#[test]
fn o10_prometheus_discovers_and_scrapes_the_whole_cluster() -> Result<()> {
    if !can_run()
        || !skiff_testkit::require(&[
            skiff_testkit::tool("/usr/bin/prometheus", "prometheus"),
            skiff_testkit::tool("/usr/bin/promtool", "prometheus"),
            skiff_testkit::tool("curl", "curl"),
            skiff_testkit::tool("chromium", "chromium"),
            skiff_testkit::tool("certutil", "libnss3-tools"),
            skiff_testkit::tool("pk12util", "libnss3-tools"),
            skiff_testkit::tool("tesseract", "tesseract-ocr"),
            skiff_testkit::tool("openssl", "openssl"),
        ])
    {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start(3, 2, "10s")?;
    let res = scenario(&fleet);
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(40));
    }
    res
}
