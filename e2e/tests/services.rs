//! Services and health checks on the netns fleet (needs root): a job's `service` section lists
//! its allocations as endpoints; only those whose health check passes take traffic; a failing
//! check takes an endpoint out and a recovering one puts it back.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use skiff_e2e::fleet::{Fleet, can_run};

/// (allocation, ip, health, ready) of a service's endpoints.
fn endpoints(fleet: &Fleet, service: &str) -> Result<Vec<(String, String, String, bool)>> {
    let list = fleet.cli_json(&["services"])?;
    let svc = list
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == service)
        .cloned()
        .with_context(|| format!("no service {service}: {list}"))?;
    Ok(svc["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["allocation"].as_str().unwrap_or_default().to_owned(),
                e["ip"].as_str().unwrap_or_default().to_owned(),
                e["health"].as_str().unwrap_or_default().to_owned(),
                e["ready"].as_bool().unwrap_or(false),
            )
        })
        .collect())
}

fn ready(eps: &[(String, String, String, bool)]) -> usize {
    eps.iter().filter(|e| e.3).count()
}

#[test]
fn s10_health_checks_gate_endpoints() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let fleet = Fleet::start(1, 2, "3s")?;
    let res = (|| -> Result<()> {
        let spec = fleet.spec(
            "web",
            &format!(
                "name = \"web\"\nreplicas = 2\nimage = \"{}\"\n\
                 command = [\"/bin/httpd\"]\nargs = [\"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
                 stop_signal = \"SIGKILL\"\n\
                 [[ports]]\nname = \"http\"\nport = 8080\n\
                 [service]\nport = \"http\"\n\
                 check = {{ http = \"/\", interval = \"500ms\", timeout = \"400ms\", unhealthy_threshold = 2 }}\n\
                 [resources]\ncpu = 0.05\nmemory = \"16Mi\"\n",
                fleet.image()
            ),
        )?;
        fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
        fleet.wait_for("2 healthy endpoints", Duration::from_secs(30), |f| {
            Ok(ready(&endpoints(f, "web")?) == 2)
        })?;
        let eps = endpoints(&fleet, "web")?;
        ensure!(
            eps.iter()
                .all(|e| e.2 == "healthy" && e.1.starts_with("10.42.")),
            "{eps:?}"
        );
        let text = fleet.cli_ok(&["services"])?;
        ensure!(
            text.contains("web.default.skiff.internal")
                && text.contains("8080/tcp")
                && text.contains("2/2"),
            "{text}"
        );

        // One replica starts answering 404: after 2 failed checks it is out.
        let sick = eps[0].0.clone();
        fleet.cli_ok(&[
            "exec",
            &sick,
            "--",
            "mv",
            "/www/index.html",
            "/www/away.html",
        ])?;
        fleet.wait_for("the failing endpoint out", Duration::from_secs(10), |f| {
            let eps = endpoints(f, "web")?;
            Ok(ready(&eps) == 1
                && eps
                    .iter()
                    .any(|e| e.0 == sick && e.2 == "unhealthy" && !e.3))
        })?;
        let ps = fleet.cli_json(&["ps", "web"])?;
        let out = ps
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["id"] == sick.as_str())
            .map(|a| a["health_output"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        ensure!(out.contains("404, expected 200"), "health output: {out:?}");

        // It recovers: back in.
        fleet.cli_ok(&[
            "exec",
            &sick,
            "--",
            "mv",
            "/www/away.html",
            "/www/index.html",
        ])?;
        fleet.wait_for("the endpoint back", Duration::from_secs(10), |f| {
            Ok(ready(&endpoints(f, "web")?) == 2)
        })?;

        // Scaling down removes the endpoint at once.
        fleet.cli_ok(&["scale", "web", "1"])?;
        fleet.wait_for("one endpoint", Duration::from_secs(10), |f| {
            Ok(endpoints(f, "web")?.len() == 1)
        })?;
        Ok(())
    })();
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(30));
    }
    res
}
