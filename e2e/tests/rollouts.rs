//! Rolling updates on the netns fleet (needs root): 10 replicas over 3 hosts roll to a new
//! version within their surge and unavailability bounds while a client in a container calls
//! the service by name the whole time, and no request fails; a version whose health check
//! fails is rolled back by itself; the leader is killed mid-rollout and the rollout completes;
//! an undo to an older version is paused and resumed.

use std::collections::BTreeMap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use skiff_e2e::fleet::{Fleet, can_run, serial};

const REPLICAS: usize = 10;
const SURGE: usize = 2;
const UNAVAILABLE: usize = 1;

/// Version `v` of the web job: it serves `v<v>` at /id once its check passes; `sick`: it
/// serves nothing at /id, so its check never passes.
fn web(fleet: &Fleet, v: u32, sick: bool) -> Result<String> {
    let file = if sick { "other" } else { "id" };
    let spec = fleet.spec(
        &format!("web-v{v}{}", if sick { "-sick" } else { "" }),
        &format!(
            "name = \"web\"\nreplicas = {REPLICAS}\nimage = \"{img}\"\n\
             command = [\"/bin/sh\", \"-c\", \"mkdir -p /tmp/www && echo v$VERSION > /tmp/www/{file} && exec httpd -f -p 8080 -h /tmp/www\"]\n\
             stop_signal = \"SIGKILL\"\nenv = {{ VERSION = \"{v}\" }}\n\
             [[ports]]\nname = \"http\"\nport = 8080\n\
             [service]\nport = \"http\"\n\
             check = {{ http = \"/id\", interval = \"500ms\", timeout = \"400ms\", unhealthy_threshold = 1 }}\n\
             [update]\nmax_surge = {SURGE}\nmax_unavailable = {UNAVAILABLE}\nmin_healthy = \"2s\"\n\
             drain_delay = \"2s\"\nhealthy_deadline = \"20s\"\nprogress_deadline = \"60s\"\n\
             [resources]\ncpu = 0.02\nmemory = \"16Mi\"\n",
            img = fleet.image()
        ),
    )?;
    Ok(spec.display().to_string())
}

/// A client loop in the `client` container: `count` requests to the service by name, one
/// connection each, every `pause`; the answers (or FAILED).
fn client_loop(fleet: &Fleet, client: &str, count: u32, pause: &str) -> Result<Vec<String>> {
    let script = format!(
        "for i in $(seq {count}); do timeout 5 wget -qO- http://web.default.skiff.internal:8080/id 2>&1 || echo FAILED; sleep {pause}; done"
    );
    let out = fleet.cli_ok(&["exec", client, "--", "sh", "-c", &script])?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// What the fleet shows now: replicas running (draining ones too), endpoints taking
/// traffic, and the current rollout.
struct Sample {
    running: usize,
    ready: usize,
    rollout: serde_json::Value,
    latest: u64,
}

fn sample(fleet: &Fleet) -> Result<Sample> {
    let (running, ready) = fleet.running_and_ready("web")?;
    let status = fleet.cli_json(&["job", "status", "web"])?;
    Ok(Sample {
        running,
        ready,
        rollout: status["rollout"].clone(),
        latest: status["job"]["version"].as_u64().unwrap_or(0),
    })
}

/// Follows the rollout until it is no longer running (or `limit` passes), checking the
/// bounds at every sample; returns the last sample and the extremes seen.
fn follow(fleet: &Fleet, limit: Duration) -> Result<(Sample, usize, usize)> {
    let t = Instant::now();
    let (mut max_running, mut min_ready) = (0, usize::MAX);
    loop {
        let s = sample(fleet)?;
        max_running = max_running.max(s.running);
        min_ready = min_ready.min(s.ready);
        ensure!(
            s.running <= REPLICAS + SURGE,
            "{} replicas running, more than {REPLICAS} + max_surge {SURGE}: {}",
            s.running,
            s.rollout
        );
        ensure!(
            s.ready + UNAVAILABLE >= REPLICAS,
            "{} endpoints ready, fewer than {REPLICAS} - max_unavailable {UNAVAILABLE}: {}",
            s.ready,
            s.rollout
        );
        let status = s.rollout["status"].as_str().unwrap_or_default();
        if status != "running" {
            return Ok((s, max_running, min_ready));
        }
        ensure!(
            t.elapsed() < limit,
            "the rollout did not finish in {limit:?}: {}",
            s.rollout
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts a client loop of `count` requests in the background.
fn start_loop(fleet: &Fleet, client: &str, count: u32) -> Result<JoinHandle<Result<Vec<String>>>> {
    let script = format!(
        "for i in $(seq {count}); do timeout 5 wget -qO- http://web.default.skiff.internal:8080/id 2>&1 || echo FAILED; sleep 0.1; done"
    );
    let child = fleet.cli_spawn(&["exec", client, "--", "sh", "-c", &script])?;
    Ok(std::thread::spawn(move || {
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "client loop: {out:?}");
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }))
}

/// The answers of a finished loop by what they said; fails on any failed request.
fn tally(handle: JoinHandle<Result<Vec<String>>>, count: usize) -> Result<BTreeMap<String, usize>> {
    let lines = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the client loop panicked"))??;
    let mut by = BTreeMap::new();
    for l in &lines {
        *by.entry(l.trim().to_owned()).or_insert(0) += 1;
    }
    ensure!(
        lines.len() == count && !by.contains_key("FAILED") && by.keys().all(|k| k.starts_with('v')),
        "{} answers of {count}: {by:?}",
        lines.len()
    );
    Ok(by)
}

#[test]
fn r10_rollouts_surge_health_gate_rollback_failover_undo() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    let mut fleet = Fleet::start(3, 3, "5s")?;
    let res = scenario(&mut fleet);
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(40));
    }
    res
}

fn scenario(fleet: &mut Fleet) -> Result<()> {
    fleet.cli_ok(&["apply", "-f", &web(fleet, 1, false)?])?;
    let client = fleet.spec(
        "client",
        &format!(
            "name = \"client\"\nimage = \"{}\"\ninit = true\ncommand = [\"/bin/sleep\"]\nargs = [\"3600\"]\n\
             stop_signal = \"SIGKILL\"\n[resources]\ncpu = 0.05\nmemory = \"16Mi\"\n",
            fleet.image()
        ),
    )?;
    fleet.cli_ok(&["apply", "-f", &client.display().to_string()])?;
    fleet.wait_for("10 endpoints ready", Duration::from_secs(90), |f| {
        Ok(sample(f)?.ready == REPLICAS)
    })?;
    let (client, _) = fleet.wait_for_value("client running", Duration::from_secs(30), |f| {
        Ok(f.allocations("client")?
            .into_iter()
            .find(|a| a.2 == "running")
            .map(|a| (a.0, a.1)))
    })?;
    let nodes: std::collections::BTreeSet<String> =
        fleet.allocations("web")?.into_iter().map(|a| a.1).collect();
    ensure!(nodes.len() == 3, "10 replicas over 3 hosts: {nodes:?}");
    let warm = client_loop(fleet, &client, 5, "0")?;
    ensure!(warm.iter().all(|l| l == "v1"), "{warm:?}");
    // No rollout yet: the job was created.
    ensure!(
        sample(fleet)?.rollout.is_null(),
        "a rollout before any update"
    );

    // 1. Version 2 rolls out under load: bounds kept, no request fails.
    let load = start_loop(fleet, &client, 400)?;
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    fleet.cli_ok(&["apply", "-f", &web(fleet, 2, false)?])?;
    let (s, max_running, min_ready) = follow(fleet, Duration::from_secs(150))?;
    let took = t.elapsed();
    ensure!(s.rollout["status"] == "succeeded", "{}", s.rollout);
    let seen = tally(load, 400)?;
    ensure!(
        seen.contains_key("v1") && seen.contains_key("v2"),
        "the loop saw both versions: {seen:?}"
    );
    eprintln!(
        "version 2: {REPLICAS} replicas in {:.1}s, at most {max_running} running, at least {min_ready} ready, answers {seen:?}",
        took.as_secs_f64()
    );
    let follow_out = fleet.cli_ok(&["rollout", "status", "web"])?;
    ensure!(
        follow_out.contains("version 2: 10/10 healthy") && follow_out.contains("succeeded"),
        "{follow_out}"
    );

    // 2. A version whose check fails is rolled back by itself; the old one keeps serving.
    let load = start_loop(fleet, &client, 300)?;
    fleet.cli_ok(&["apply", "-f", &web(fleet, 3, true)?])?;
    let out = fleet.cli(&["rollout", "status", "web"])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !out.status.success()
            && text.contains("rollout of version 3 failed")
            && text.contains("within healthy_deadline 20s")
            && text.contains("rolled back to version 2 (as version 4)"),
        "rollout status of the sick version: {text}"
    );
    let (s, _, _) = follow(fleet, Duration::from_secs(90))?;
    ensure!(
        s.latest == 4 && s.rollout["status"] == "succeeded" && s.rollout["rollback_of"] == 3,
        "{}",
        s.rollout
    );
    let seen = tally(load, 300)?;
    ensure!(
        seen.keys().all(|k| k == "v2"),
        "only version 2 answered: {seen:?}"
    );
    let status = fleet.cli_ok(&["job", "status", "web"])?;
    ensure!(
        status.contains("rollback of version 3") && status.contains("version 3 failed:"),
        "{status}"
    );

    // 3. The leader is killed mid-rollout; the next leader finishes it.
    fleet.cli_ok(&["apply", "-f", &web(fleet, 5, false)?])?;
    fleet.wait_for("version 5 replicas placed", Duration::from_secs(30), |f| {
        Ok(sample(f)?.rollout["placed"].as_u64() >= Some(2))
    })?;
    let killed = fleet.kill_leader()?;
    eprintln!("killed the leader ({killed}) mid-rollout");
    let (s, _, _) = follow(fleet, Duration::from_secs(150))?;
    ensure!(
        s.latest == 5 && s.rollout["status"] == "succeeded",
        "{}",
        s.rollout
    );

    // 4. Undo to version 1, paused and resumed on the way.
    fleet.cli_ok(&["rollout", "undo", "web", "--to-version", "1"])?;
    fleet.wait_for("the undo under way", Duration::from_secs(30), |f| {
        Ok(sample(f)?.rollout["placed"].as_u64() >= Some(1))
    })?;
    fleet.cli_ok(&["rollout", "pause", "web"])?;
    let held = sample(fleet)?;
    ensure!(held.rollout["status"] == "paused", "{}", held.rollout);
    std::thread::sleep(Duration::from_secs(6));
    let later = sample(fleet)?;
    ensure!(
        later.rollout["placed"] == held.rollout["placed"]
            && later.rollout["old"] == held.rollout["old"],
        "a paused rollout moved: {} -> {}",
        held.rollout,
        later.rollout
    );
    fleet.cli_ok(&["rollout", "resume", "web"])?;
    let (s, _, _) = follow(fleet, Duration::from_secs(150))?;
    ensure!(
        s.latest == 6 && s.rollout["status"] == "succeeded" && s.rollout["rollback_of"] == 5,
        "{}",
        s.rollout
    );
    let answers = client_loop(fleet, &client, 5, "0")?;
    ensure!(answers.iter().all(|l| l == "v1"), "{answers:?}");

    // History: every version, its rollout, and the diff between two.
    let history = fleet.cli_json(&["job", "history", "web"])?;
    let versions = history["versions"].as_array().cloned().unwrap_or_default();
    ensure!(versions.len() == 6, "{history}");
    ensure!(
        versions[0]["version"] == 6 && versions[3]["rollout"]["status"] == "failed",
        "{history}"
    );
    let diff = fleet.cli_ok(&["job", "history", "web", "--diff", "1", "--diff", "2"])?;
    ensure!(
        diff.contains("VERSION") && diff.contains("-> \"2\""),
        "{diff}"
    );
    Ok(())
}

/// Version `v` of the api job in the mesh: `/cgi-bin/x` answers `v<v>`, or, when `bad`, a 500
/// half of the time; its check (`/id`) passes either way. One canary, promoted by the
/// analysis when its error rate is no worse than the old version's.
fn api(fleet: &Fleet, v: u32, bad: bool) -> Result<String> {
    let spec = fleet.spec(
        &format!("api-v{v}"),
        &format!(
            r#"name = "api"
replicas = 3
image = "{img}"
init = true
command = ["/bin/sh", "-c"]
args = ['''
mkdir -p /tmp/www/cgi-bin
echo v$VERSION > /tmp/www/id
cat > /tmp/www/cgi-bin/x <<END
#!/bin/sh
if [ $BAD = 1 ] && [ \$((RANDOM % 2)) = 0 ]; then
  printf 'HTTP/1.0 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\nboom\n'
else
  printf 'Content-Type: text/plain\r\n\r\nv$VERSION\n'
fi
END
chmod +x /tmp/www/cgi-bin/x
exec httpd -f -p 8080 -h /tmp/www
''']
stop_signal = "SIGKILL"
env = {{ VERSION = "{v}", BAD = "{bad}" }}
[[ports]]
name = "http"
port = 8080
protocol = "http"
[service]
port = "http"
check = {{ http = "/id", interval = "500ms", timeout = "400ms" }}
[mesh]
allow_from = ["client"]
[update]
canary = 1
auto_promote = true
min_healthy = "2s"
drain_delay = "1s"
healthy_deadline = "30s"
progress_deadline = "90s"
[update.analysis]
interval = "10s"
min_requests = 15
max_error_rate_increase = 5
[resources]
cpu = 0.05
memory = "16Mi"
"#,
            img = fleet.image(),
            bad = u8::from(bad),
        ),
    )?;
    Ok(spec.display().to_string())
}

/// Follows the api's rollout until it is no longer running; the job status then.
fn settle(fleet: &Fleet, limit: Duration) -> Result<serde_json::Value> {
    fleet.wait_for_value("the api's rollout to end", limit, |f| {
        let st = f.cli_json(&["job", "status", "api"])?;
        Ok((st["rollout"]["status"] != "running").then_some(st))
    })
}

#[test]
fn r20_the_metric_gate_stops_a_bad_canary_and_passes_a_good_one() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start(1, 2, "5s")?;
    let res = (|| -> Result<()> {
        fleet.cli_ok(&["apply", "-f", &api(&fleet, 1, false)?])?;
        let client = fleet.spec(
            "client",
            &format!(
                "name = \"client\"\nimage = \"{}\"\ninit = true\ncommand = [\"/bin/sleep\"]\nargs = [\"3600\"]\n\
                 stop_signal = \"SIGKILL\"\n[resources]\ncpu = 0.05\nmemory = \"16Mi\"\n[mesh]\nupstreams = [\"api\"]\n",
                fleet.image()
            ),
        )?;
        fleet.cli_ok(&["apply", "-f", &client.display().to_string()])?;
        let (client, _) = fleet.wait_for_value("client running", Duration::from_secs(60), |f| {
            Ok(f.allocations("client")?
                .into_iter()
                .find(|a| a.2 == "running")
                .map(|a| (a.0, a.1)))
        })?;
        let script = |count: u32| {
            format!(
                "for i in $(seq {count}); do timeout 5 wget -qO- http://api:8080/cgi-bin/x 2>&1 || echo FAILED; sleep 0.05; done"
            )
        };
        fleet.wait_for("the api answering v1", Duration::from_secs(60), |f| {
            let out = f.cli_ok(&["exec", &client, "--", "sh", "-c", &script(3)])?;
            Ok(out.lines().all(|l| l == "v1") && out.lines().count() == 3)
        })?;

        // A bad version: stopped at its one canary by its error rate, rolled back.
        let load = fleet.cli_spawn(&["exec", &client, "--", "sh", "-c", &script(700)])?;
        fleet.cli_ok(&["apply", "-f", &api(&fleet, 2, true)?])?;
        let mut max_v2 = 0;
        let st = fleet.wait_for_value("the bad canary judged", Duration::from_secs(120), |f| {
            let ps = f.cli_json(&["ps", "api"])?;
            let v2 = ps
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["job_version"] == 2)
                .count();
            max_v2 = max_v2.max(v2);
            let st = f.cli_json(&["job", "status", "api"])?;
            Ok((st["job"]["version"] == 3).then_some(st))
        })?;
        ensure!(
            max_v2 <= 1,
            "version 2 went past its canary: {max_v2} replicas"
        );
        let history = fleet.cli_json(&["job", "history", "api"])?;
        let failed = history["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["version"] == 2)
            .map(|v| v["rollout"].clone())
            .unwrap_or_default();
        let reason = failed["reason"].as_str().unwrap_or_default().to_owned();
        ensure!(
            failed["status"] == "failed"
                && reason.contains("canary error rate")
                && reason.contains("rolled back to version 1 (as version 3)"),
            "{failed}\n{st}"
        );
        eprintln!("the metric gate: {reason}");
        let st = settle(&fleet, Duration::from_secs(90))?;
        ensure!(st["rollout"]["status"] == "succeeded", "{st}");

        // A good version passes the gate and rolls out.
        fleet.cli_ok(&["apply", "-f", &api(&fleet, 4, false)?])?;
        let st = settle(&fleet, Duration::from_secs(150))?;
        ensure!(
            st["rollout"]["status"] == "succeeded" && st["job"]["version"] == 4,
            "{st}"
        );
        let out = load.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut by: BTreeMap<&str, usize> = BTreeMap::new();
        for l in text.lines() {
            *by.entry(l).or_insert(0) += 1;
        }
        // Requests that reached the bad canary may fail (what the gate measures); the rest
        // answer.
        eprintln!("answers during both rollouts: {by:?}");
        ensure!(
            by.keys()
                .all(|k| ["v1", "v2", "v4", "boom", "FAILED"].contains(k) || k.contains("500")),
            "{by:?}"
        );
        // "Succeeded" is written when the last old replica starts draining: it leaves the
        // service set then, and answers what still reaches it for its drain_delay while the
        // client's agent and sidecar load the new set. So the client reaches only version 4
        // once that has happened, which takes well under a second here.
        fleet.wait_for(
            "the client reaching only v4",
            Duration::from_secs(10),
            |f| {
                let after = f.cli_ok(&["exec", &client, "--", "sh", "-c", &script(5)])?;
                Ok(after.lines().count() == 5 && after.lines().all(|l| l == "v4"))
            },
        )?;
        Ok(())
    })();
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(40));
    }
    res
}
