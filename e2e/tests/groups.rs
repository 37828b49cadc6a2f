//! Groups on the netns fleet (needs root): an allocation of several containers sharing one
//! network namespace and its volumes, in lifecycle order (init, sidecar, main); volumes
//! (ephemeral, read-only, named across allocations, host directories the agent allows);
//! network modes (host, none); host ports published on the node and counted by the scheduler.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use skiff_e2e::fleet::{Fleet, can_run, serial};

/// The job's allocations from `skiff ps -o json`.
fn allocs(fleet: &Fleet, job: &str) -> Result<Vec<Value>> {
    Ok(fleet
        .cli_json(&["ps", job])?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// (name, state, exit code) of each container of an allocation.
fn containers(a: &Value) -> Vec<(String, String, Option<i64>)> {
    a["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_owned(),
                c["state"].as_str().unwrap_or_default().to_owned(),
                c["exit_code"].as_i64(),
            )
        })
        .collect()
}

fn host_addr(fleet: &Fleet, node: &str) -> Result<String> {
    let nodes = fleet.cli_json(&["nodes"])?;
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == node)
        .and_then(|n| n["address"].as_str().map(str::to_owned))
        .with_context(|| format!("node {node} in {nodes}"))
}

fn group_spec(fleet: &Fleet, name: &str, host_port: u16) -> String {
    let img = fleet.image();
    format!(
        r#"name = "{name}"
replicas = 2

[[containers]]
name = "migrate"
lifecycle = "init"
image = "{img}"
command = ["/bin/sh", "-c", "echo ready > /data/state"]
volumes = [{{ name = "data", path = "/data" }}]
resources = {{ cpu = 0.05, memory = "16Mi" }}

[[containers]]
name = "web"
image = "{img}"
command = ["/bin/httpd", "-f", "-p", "8080", "-h", "/data"]
volumes = [{{ name = "data", path = "/data", read_only = true }}]
stop_signal = "SIGKILL"
[containers.resources]
cpu = 0.05
memory = "32Mi"

[[containers]]
name = "shipper"
lifecycle = "sidecar"
image = "{img}"
command = ["/bin/sh", "-c", "while sleep 1; do wget -qO- http://127.0.0.1:8080/state; done"]
stop_signal = "SIGKILL"
resources = {{ cpu = 0.05, memory = "16Mi" }}

[[volumes]]
name = "data"
type = "ephemeral"

[network]
mode = "bridge"

[[ports]]
name = "http"
port = 8080
host_port = {host_port}

[service]
port = "http"
check = {{ http = "/state", interval = "500ms", timeout = "400ms" }}
"#
    )
}

#[test]
fn g10_a_group_shares_network_and_volumes_in_lifecycle_order() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start(1, 2, "3s")?;
    let res = (|| -> Result<()> {
        let spec = fleet.spec("app", &group_spec(&fleet, "app", 18080))?;
        fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
        fleet.wait_for(
            "2 running allocations of app",
            Duration::from_secs(60),
            |f| {
                let a = allocs(f, "app")?;
                Ok(a.len() == 2 && a.iter().all(|x| x["status"] == "running"))
            },
        )?;
        let list = allocs(&fleet, "app")?;
        let nodes: std::collections::BTreeSet<&str> =
            list.iter().filter_map(|a| a["node"].as_str()).collect();
        ensure!(nodes.len() == 2, "one per node (the host port): {list:?}");
        fleet.wait_for("every container's state", Duration::from_secs(30), |f| {
            Ok(allocs(f, "app")?.iter().all(|a| {
                containers(a)
                    == [
                        ("migrate".into(), "exited".into(), Some(0)),
                        ("web".into(), "running".into(), None),
                        ("shipper".into(), "running".into(), None),
                    ]
            }))
        })?;
        // The allocation is healthy when its main container answers the check.
        fleet.wait_for("2 healthy allocations", Duration::from_secs(30), |f| {
            Ok(allocs(f, "app")?.iter().all(|a| a["health"] == "healthy"))
        })?;
        let a = list[0]["id"].as_str().context("id")?.to_owned();
        let node = list[0]["node"].as_str().context("node")?.to_owned();

        // The init container's file is served by web and fetched by the sidecar over
        // 127.0.0.1 (one network namespace).
        fleet.wait_for(
            "the sidecar to fetch the state",
            Duration::from_secs(20),
            |f| Ok(f.cli_ok(&["logs", &a, "-c", "shipper"])?.contains("ready")),
        )?;
        let served = fleet.cli_ok(&["exec", &a, "-c", "web", "--", "cat", "/data/state"])?;
        ensure!(served.trim() == "ready", "{served}");
        // The default container of exec is the first main one.
        let host = fleet.cli_ok(&["exec", &a, "--", "cat", "/proc/1/cmdline"])?;
        ensure!(host.contains("httpd"), "{host:?}");

        // One IPC namespace for the allocation, a pid namespace per container.
        let ns = |c: &str, kind: &str| -> Result<String> {
            Ok(fleet
                .cli_ok(&[
                    "exec",
                    &a,
                    "-c",
                    c,
                    "--",
                    "readlink",
                    &format!("/proc/1/ns/{kind}"),
                ])?
                .trim()
                .to_owned())
        };
        ensure!(ns("web", "ipc")? == ns("shipper", "ipc")?, "IPC not shared");
        ensure!(
            ns("web", "net")? == ns("shipper", "net")?,
            "network not shared"
        );
        ensure!(
            ns("web", "pid")? != ns("shipper", "pid")?,
            "pid namespace shared"
        );

        // web mounts the volume read-only: writes are refused.
        let out = fleet.cli(&["exec", &a, "-c", "web", "--", "touch", "/data/x"])?;
        ensure!(!out.status.success(), "a read-only volume took a write");
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let missing = fleet.cli(&["exec", &a, "-c", "nope", "--", "true"])?;
        ensure!(
            String::from_utf8_lossy(&missing.stderr).contains("no container \"nope\""),
            "{}",
            String::from_utf8_lossy(&missing.stderr)
        );

        // The host port: from another host, to the node's address.
        let addr = host_addr(&fleet, &node)?;
        let url = format!("http://{addr}:18080/state");
        fleet.wait_for("the host port to answer", Duration::from_secs(10), |f| {
            let out = f.on_host("cli", &["curl", "-sS", "--max-time", "2", &url])?;
            Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ready")
        })?;

        // Resources add up: each node holds one allocation of 0.15 cores and 64 MiB.
        let nodes = fleet.cli_json(&["nodes"])?;
        for n in nodes.as_array().into_iter().flatten() {
            ensure!(
                n["allocated"]["memory"] == 64 << 20 && n["allocations"] == 1,
                "{n}"
            );
            let cpu = n["allocated"]["cpu"].as_f64().unwrap_or_default();
            ensure!((cpu - 0.15).abs() < 1e-9, "{n}");
        }

        // A second job asking the same host port fits nowhere and says why.
        let other = fleet.spec("other", &group_spec(&fleet, "other", 18080))?;
        fleet.cli_ok(&["apply", "-f", &other.display().to_string()])?;
        fleet.wait_for(
            "other to be pending with the reason",
            Duration::from_secs(20),
            |f| {
                let st = f.cli_json(&["job", "status", "other"])?;
                Ok(st["pending"]
                    .as_str()
                    .is_some_and(|p| p.contains("2 port 18080/tcp in use on the node")))
            },
        )?;

        // Stopping app frees the port: other, pending on it, is placed at once (its pending
        // reason cleared), and runs.
        fleet.cli_ok(&["stop", "app"])?;
        fleet.wait_for("app's allocations gone", Duration::from_secs(30), |f| {
            Ok(allocs(f, "app")?.is_empty())
        })?;
        fleet.wait_for(
            "other placed on the freed port",
            Duration::from_secs(20),
            |f| {
                let a = allocs(f, "other")?;
                Ok(a.len() == 2 && a.iter().all(|x| x["status"] == "running"))
            },
        )?;
        // The cleared reason is written with the next batch of reasons (within a second).
        fleet.wait_for(
            "other's pending reason cleared",
            Duration::from_secs(10),
            |f| {
                let st = f.cli_json(&["job", "status", "other"])?;
                Ok(st["pending"].as_str().unwrap_or_default().is_empty())
            },
        )?;

        // Stopping it too removes its pods: the host port answers no more.
        fleet.cli_ok(&["stop", "other"])?;
        fleet.wait_for("other's allocations gone", Duration::from_secs(30), |f| {
            Ok(allocs(f, "other")?.is_empty())
        })?;
        fleet.wait_for("the host port closed", Duration::from_secs(10), |f| {
            let out = f.on_host("cli", &["curl", "-sS", "--max-time", "1", &url])?;
            Ok(!String::from_utf8_lossy(&out.stdout).contains("ready"))
        })?;
        // And its rules are gone from every node.
        fleet.wait_for("no host port rule left", Duration::from_secs(10), |f| {
            for host in ["a1", "a2", "a3"].iter().filter(|h| f.host(h).is_ok()) {
                let out = f.on_host(host, &["iptables", "-w", "-t", "nat", "-S"])?;
                if String::from_utf8_lossy(&out.stdout).contains("skiff hostport") {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        Ok(())
    })();
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(40));
    }
    res
}

#[test]
fn g20_a_failing_init_container_blocks_the_main_one_and_is_reported() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start(1, 1, "3s")?;
    let res = (|| -> Result<()> {
        let img = fleet.image();
        let spec = fleet.spec(
            "broken",
            &format!(
                r#"name = "broken"
[[containers]]
name = "migrate"
lifecycle = "init"
image = "{img}"
restart = "never"
command = ["/bin/sh", "-c", "echo schema mismatch; exit 3"]
[[containers]]
name = "web"
image = "{img}"
command = ["sleep", "1000"]
"#
            ),
        )?;
        fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
        fleet.wait_for("the allocation to fail", Duration::from_secs(30), |f| {
            Ok(allocs(f, "broken")?.iter().any(|a| a["status"] == "failed"))
        })?;
        let a = allocs(&fleet, "broken")?.remove(0);
        let reason = a["reason"].as_str().unwrap_or_default();
        ensure!(
            reason.contains("init container migrate failed: exit 3")
                && reason.contains("schema mismatch"),
            "{a}"
        );
        ensure!(
            containers(&a)
                == [
                    ("migrate".into(), "failed".into(), Some(3)),
                    ("web".into(), "pending".into(), None),
                ],
            "{a}"
        );
        let node = a["node"].as_str().unwrap_or_default();
        ensure!(
            !fleet
                .containers(node)?
                .iter()
                .any(|c| c.1.ends_with("-web")),
            "web was started: {:?}",
            fleet.containers(node)?
        );

        // A batch job: its main container ends, and the sidecar does not keep it alive.
        let batch = fleet.spec(
            "batch",
            &format!(
                r#"name = "batch"
[[containers]]
name = "job"
image = "{img}"
restart = "never"
command = ["/bin/sh", "-c", "sleep 1; echo done"]
[[containers]]
name = "helper"
lifecycle = "sidecar"
image = "{img}"
command = ["sleep", "1000"]
"#
            ),
        )?;
        fleet.cli_ok(&["apply", "-f", &batch.display().to_string()])?;

        // On this one-node fleet a second job asking a host port already published is
        // pending, and says why.
        let port_job = |name: &str| {
            format!(
                "name = \"{name}\"\nimage = \"{img}\"\ncommand = [\"sleep\", \"1000\"]\n\
                 stop_signal = \"SIGKILL\"\n[[ports]]\nname = \"p\"\nport = 80\nhost_port = 18081\n"
            )
        };
        for name in ["first", "second"] {
            let spec = fleet.spec(name, &port_job(name))?;
            fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
        }
        fleet.wait_for(
            "second to be pending on the host port",
            Duration::from_secs(20),
            |f| {
                let st = f.cli_json(&["job", "status", "second"])?;
                Ok(st["pending"].as_str()
                    == Some("0/1 nodes fit: 1 port 18081/tcp in use on the node"))
            },
        )?;
        ensure!(
            allocs(&fleet, "first")?.len() == 1 && allocs(&fleet, "second")?.is_empty(),
            "first runs, second waits"
        );
        fleet.wait_for(
            "the batch job to end with its sidecar",
            Duration::from_secs(40),
            |f| {
                Ok(allocs(f, "batch")?.iter().any(|a| {
                    a["status"] == "exited"
                        && containers(a)
                            .iter()
                            .all(|c| c.1 == "exited" || c.1 == "failed")
                }))
            },
        )?;
        Ok(())
    })();
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(40));
    }
    res
}

#[test]
fn g30_volumes_named_host_and_network_modes() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    let allowed = tempfile::Builder::new()
        .prefix("skiff-hostvol-")
        .tempdir()?;
    std::fs::create_dir(allowed.path().join("site"))?;
    std::fs::write(allowed.path().join("site/index.html"), "from the node\n")?;
    let dir = allowed.path().display().to_string();
    let fleet = Fleet::start_full(1, 2, "3s", &[], &["--host-volume-dir", &dir])?;
    let res = (|| -> Result<()> {
        let img = fleet.image();
        // A named volume keeps its files across stop + apply, on the same node.
        let db = fleet.spec(
            "db",
            &format!(
                r#"name = "db"
[[containers]]
name = "db"
image = "{img}"
command = ["/bin/sh", "-c", "date >> /var/lib/db/boots; exec sleep 1000"]
stop_signal = "SIGKILL"
volumes = [{{ name = "data", path = "/var/lib/db" }}]
[[volumes]]
name = "data"
type = "named"
"#
            ),
        )?;
        fleet.cli_ok(&["apply", "-f", &db.display().to_string()])?;
        let boots = |f: &Fleet| -> Result<(String, usize)> {
            let a = allocs(f, "db")?;
            let a = a.first().context("no allocation")?;
            ensure!(a["status"] == "running", "{a}");
            let id = a["id"].as_str().unwrap_or_default();
            let text = f.cli_ok(&["exec", id, "--", "cat", "/var/lib/db/boots"])?;
            Ok((
                a["node"].as_str().unwrap_or_default().to_owned(),
                text.lines().count(),
            ))
        };
        fleet.wait_for("db to boot once", Duration::from_secs(60), |f| {
            Ok(boots(f).is_ok_and(|b| b.1 == 1))
        })?;
        let (first_node, _) = boots(&fleet)?;
        fleet.wait_for(
            "the node to report its volume",
            Duration::from_secs(10),
            |f| {
                let v = f.cli_json(&["volumes"])?;
                Ok(v.as_array().into_iter().flatten().any(|v| {
                    v["node"] == first_node.as_str()
                        && v["job"] == "db"
                        && v["name"] == "data"
                        && v["used_by"].as_array().is_some_and(|u| u.len() == 1)
                }))
            },
        )?;
        let busy = fleet.cli(&["volume", "rm", "db/data"])?;
        ensure!(
            !busy.status.success() && String::from_utf8_lossy(&busy.stderr).contains("in use"),
            "{}",
            String::from_utf8_lossy(&busy.stderr)
        );
        for round in 0..2 {
            fleet.cli_ok(&["stop", "db"])?;
            fleet.wait_for("db stopped", Duration::from_secs(30), |f| {
                Ok(allocs(f, "db")?.is_empty())
            })?;
            fleet.cli_ok(&["apply", "-f", &db.display().to_string()])?;
            fleet.wait_for("db to boot again", Duration::from_secs(60), |f| {
                Ok(boots(f).is_ok_and(|b| b.1 == round + 2))
            })?;
            let (node, _) = boots(&fleet)?;
            ensure!(
                node == first_node,
                "placement left the volume's node: {node}"
            );
        }
        fleet.cli_ok(&["stop", "db"])?;
        fleet.wait_for("db stopped", Duration::from_secs(30), |f| {
            Ok(allocs(f, "db")?.is_empty())
        })?;
        // Stopped in the controllers' view first; the node lets the volume go once the
        // allocation's pod is gone.
        fleet.wait_for("the volume to be unused", Duration::from_secs(30), |f| {
            let v = f.cli_json(&["volumes"])?;
            Ok(v.as_array()
                .into_iter()
                .flatten()
                .any(|v| v["name"] == "data" && v["used_by"].as_array().is_some_and(Vec::is_empty)))
        })?;
        let rm = fleet.cli_ok(&["volume", "rm", "db/data"])?;
        ensure!(rm.contains("removed volume default/db/data"), "{rm}");
        let left = fleet.cli_json(&["volumes"])?;
        ensure!(left.as_array().is_some_and(Vec::is_empty), "{left}");

        // A host volume under the allowed directory is served; one outside it, or with a
        // `..` in its path, is refused at apply with the reason.
        let site = format!("{dir}/site");
        let host_spec = |name: &str, path: &str| {
            format!(
                r#"name = "{name}"
[[containers]]
name = "web"
image = "{img}"
command = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
stop_signal = "SIGKILL"
volumes = [{{ name = "site", path = "/www", read_only = true }}]
[[volumes]]
name = "site"
type = "host"
path = "{path}"
"#
            )
        };
        let ok = fleet.spec("site", &host_spec("site", &site))?;
        fleet.cli_ok(&["apply", "-f", &ok.display().to_string()])?;
        fleet.wait_for(
            "site to serve the node's file",
            Duration::from_secs(60),
            |f| {
                let a = allocs(f, "site")?;
                let Some(a) = a.first().filter(|a| a["status"] == "running") else {
                    return Ok(false);
                };
                let id = a["id"].as_str().unwrap_or_default();
                let out = f.cli(&["exec", id, "--", "wget", "-qO-", "http://127.0.0.1:8080/"])?;
                Ok(String::from_utf8_lossy(&out.stdout).contains("from the node"))
            },
        )?;
        for (path, why) in [
            ("/etc", "not under any node's host volume directories"),
            (&format!("{dir}/../etc"), "not a plain absolute directory"),
        ] {
            let bad = fleet.spec("bad", &host_spec("bad", path))?;
            let out = fleet.cli(&["apply", "-f", &bad.display().to_string()])?;
            let err = String::from_utf8_lossy(&out.stderr);
            ensure!(!out.status.success() && err.contains(why), "{path}: {err}");
        }
        ensure!(
            fleet.cli(&["job", "status", "bad"])?.status.code() != Some(0),
            "a refused spec was applied"
        );

        // Network modes: host sees the node's interfaces (and its address); none only lo.
        for (name, mode) in [("hostnet", "host"), ("isolated", "none")] {
            let spec = fleet.spec(
                name,
                &format!(
                    "name = \"{name}\"\nimage = \"{img}\"\ncommand = [\"sleep\", \"1000\"]\n\
                     stop_signal = \"SIGKILL\"\n[network]\nmode = \"{mode}\"\n"
                ),
            )?;
            fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
        }
        let ifaces = |f: &Fleet, job: &str| -> Result<Vec<String>> {
            let a = allocs(f, job)?;
            let a = a
                .first()
                .filter(|a| a["status"] == "running")
                .context("not running")?;
            let id = a["id"].as_str().unwrap_or_default();
            let text = f.cli_ok(&["exec", id, "--", "cat", "/proc/net/dev"])?;
            Ok(text
                .lines()
                .skip(2)
                .filter_map(|l| l.split(':').next().map(|s| s.trim().to_owned()))
                .collect())
        };
        fleet.wait_for(
            "hostnet to see eth0 and skiff0",
            Duration::from_secs(60),
            |f| {
                Ok(ifaces(f, "hostnet").is_ok_and(|i| {
                    i.contains(&"eth0".to_owned()) && i.contains(&"skiff0".to_owned())
                }))
            },
        )?;
        fleet.wait_for("isolated to have only lo", Duration::from_secs(60), |f| {
            Ok(ifaces(f, "isolated").is_ok_and(|i| i == ["lo"]))
        })?;
        let host = allocs(&fleet, "hostnet")?;
        let node = host[0]["node"].as_str().unwrap_or_default();
        ensure!(
            host[0]["ip"].as_str() == Some(host_addr(&fleet, node)?.as_str()),
            "a host-mode allocation's address is its node's: {}",
            host[0]
        );
        Ok(())
    })();
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(40));
    }
    res
}
