//! The chaos suite on the netns fleet (3 controllers, 3 agents): while a client writes jobs
//! and a fenced one-replica job and a 3-replica job run, it kills and cuts off controllers and
//! agents, drops 30% of an agent's packets, kills a container's monitor and a WireGuard tunnel,
//! and kills the leader again and again; then it heals
//! everything and checks the history: no acknowledged write lost, the fenced job never ran
//! twice at once, no allocation lost. Bounded: about a minute of faults, at most
//! [`MAX_WRITES`] writes, each client call at most [`CALL_TIMEOUT`].
//!
//! Also a follower's disk filling up (its data on a small tmpfs) and the wall clocks of the
//! leader's host and an agent's stepping forward and back (libfaketime: `CLOCK_REALTIME` only,
//! as an NTP step or `date -s` moves it). Not here (this kernel has no `sch_netem`): added delay.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use skiff_e2e::fleet::{Fleet, agent_cmd, can_run, serial};
use skiff_e2e::history::{History, Lives, Op, Outcome};

const MAX_WRITES: usize = 3000;
/// Between one write's end and the next's start: about 20 writes a second, so that they
/// last through every fault.
const WRITE_PAUSE: Duration = Duration::from_millis(25);
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs a client call, killing it past [`CALL_TIMEOUT`]: its outcome.
fn call(mut cmd: Command) -> Outcome {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Outcome::Fail(format!("not started: {e}")),
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Outcome::Ok,
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                // Whatever the error, the write may have been proposed before it: unknown.
                return Outcome::Unknown(format!("{status}: {}", err.trim()));
            }
            Ok(None) if start.elapsed() > CALL_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Outcome::Unknown("timed out".into());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Outcome::Unknown(e.to_string()),
        }
    }
}

fn kill9(pid: i64) -> Result<()> {
    let pid = i32::try_from(pid).context("pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .with_context(|| format!("kill -9 {pid}"))
}

/// SIGKILLs the leader, waits for another to lead, starts the killed one again and gives it
/// two seconds; returns the killed one's host.
fn kill_leader(fleet: &mut Fleet) -> Result<String> {
    let l = fleet.wait_for_value("a leader", Duration::from_secs(20), |f| {
        Ok(f.leader_host().ok())
    })?;
    fleet.kill_controller(&l)?;
    fleet.wait_for("a new leader", Duration::from_secs(20), |f| {
        Ok(f.leader_host().is_ok_and(|n| n != l))
    })?;
    fleet.restart_controller(&l)?;
    std::thread::sleep(Duration::from_secs(2));
    Ok(l)
}

/// Whether controller `name` is a voter that has applied what the leader had committed a
/// moment ago.
fn caught_up(fleet: &Fleet, name: &str) -> Result<bool> {
    let members = fleet.cli_json(&["cluster", "members"])?;
    let list = members.as_array().context("members")?;
    let leader_commit = list
        .iter()
        .filter_map(|m| m["applied_index"].as_u64())
        .max()
        .unwrap_or(0);
    let addr = fleet.host(name)?.addr.clone();
    Ok(list.iter().any(|m| {
        m["rpc_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{addr}:")))
            && m["voter"] == true
            && m["applied_index"].as_u64().unwrap_or(0) + 50 >= leader_commit
    }))
}

/// Drops `percent`% of host `name`'s packets, both ways (iptables in its namespace), or
/// stops dropping.
fn loss(fleet: &Fleet, name: &str, percent: u32, on: bool) -> Result<()> {
    let p = format!("{:.2}", f64::from(percent) / 100.0);
    for chain in ["INPUT", "OUTPUT"] {
        let op = if on { "-I" } else { "-D" };
        let out = fleet.on_host(
            name,
            &[
                "iptables",
                op,
                chain,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ],
        )?;
        ensure!(
            out.status.success(),
            "iptables {op} {chain} on {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn c10_faults_during_writes_lose_no_acknowledged_write_and_never_run_a_fenced_job_twice()
-> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    // Snapshots every 100 entries: the members snapshot and compact all through the run.
    let mut fleet = Fleet::start_fake_clocks(3, 3, "6s", &["--snapshot-every", "100"])?;
    let image = fleet.image();
    let lock = fleet.spec(
        "lock",
        &format!(
            "name = \"lock\"\nimage = \"{image}\"\ncommand = [\"/bin/httpd\"]\n\
             args = [\"-f\", \"-p\", \"8081\", \"-h\", \"/www\"]\nstop_grace = \"1s\"\n\
             [disconnect]\nstop_after = \"2s\"\n[resources]\ncpu = 0.1\nmemory = \"32Mi\"\n"
        ),
    )?;
    let web = fleet.spec(
        "web",
        &format!(
            "name = \"web\"\nreplicas = 3\nimage = \"{image}\"\ncommand = [\"/bin/httpd\"]\n\
             args = [\"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nstop_signal = \"SIGKILL\"\n\
             [resources]\ncpu = 0.1\nmemory = \"32Mi\"\n"
        ),
    )?;
    for spec in [&lock, &web] {
        fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
    }
    fleet.wait_for("lock and web to run", Duration::from_secs(40), |f| {
        Ok(f.running_and_ready("lock")?.0 == 1 && f.running_and_ready("web")?.0 == 3)
    })?;

    // The client: one job write after another, each its own job (replicas 0: control plane
    // only).
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(History::default()));
    let mut writes = Vec::new();
    for i in 0..MAX_WRITES {
        let name = format!("w-{i}");
        let spec = fleet.spec(
            &name,
            &format!("name = \"{name}\"\nreplicas = 0\nimage = \"{image}\"\n"),
        )?;
        let cmd = fleet.cli_command(
            &fleet.credentials(),
            &["apply", "-f", &spec.display().to_string()],
        )?;
        writes.push((name, cmd));
    }
    let writer = {
        let (stop, history) = (stop.clone(), history.clone());
        std::thread::spawn(move || {
            for (key, cmd) in writes {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let invoked_ms = now_ms();
                let outcome = call(cmd);
                let op = Op {
                    key,
                    invoked_ms,
                    completed_ms: now_ms(),
                    outcome,
                };
                history.lock().unwrap_or_else(|e| e.into_inner()).record(op);
                std::thread::sleep(WRITE_PAUSE);
            }
        })
    };
    // The sampler: every node's container records of the fenced job, about 5 times a second.
    let lives = Arc::new(Mutex::new(Lives::default()));
    let sampler = {
        let (stop, lives) = (stop.clone(), lives.clone());
        let dirs = fleet.agent_dirs();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for (node, data, parent) in &dirs {
                    let Ok(out) =
                        agent_cmd(data, parent, &["container", "ps", "-a", "-o", "json"]).output()
                    else {
                        continue;
                    };
                    let Ok(v) = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
                    else {
                        continue;
                    };
                    // The fenced job's containers: the only ones serving port 8081.
                    let lock: Vec<serde_json::Value> = v
                        .into_iter()
                        .filter(|r| {
                            r["command"]
                                .as_array()
                                .is_some_and(|a| a.iter().any(|x| x == "8081"))
                        })
                        .collect();
                    lives.lock().unwrap_or_else(|e| e.into_inner()).sample(
                        node,
                        &lock,
                        |_| true,
                        now_ms(),
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let mut faults: Vec<String> = Vec::new();
    let mut fault = |what: String| {
        eprintln!("[{}] {what}", now_ms());
        faults.push(what);
    };
    let result = (|| -> Result<()> {
        std::thread::sleep(Duration::from_secs(3));
        // 1. kill -9 the leader, restart it once another leads.
        let l = kill_leader(&mut fleet)?;
        fault(format!("kill -9 leader {l}"));

        // 2. cut the leader off for 4 s.
        let l = fleet.leader_host()?;
        fleet.partition(&l)?;
        fault(format!("cut off leader {l} for 4s"));
        std::thread::sleep(Duration::from_secs(4));
        fleet.heal(&l)?;
        std::thread::sleep(Duration::from_secs(2));

        // 3. cut the fenced job's node off for 10 s (fenced, then replaced elsewhere). The
        // faults before may have cut off lock's node too: wait for it to run somewhere (a local
        // run looked once, found it between nodes and failed).
        let node = fleet.wait_for_value("lock running", Duration::from_secs(30), |f| {
            Ok(f.allocations("lock")?
                .into_iter()
                .find(|a| a.2 == "running")
                .map(|a| a.1))
        })?;
        fleet.partition(&node)?;
        fault(format!("cut off agent {node} (lock's node) for 10s"));
        std::thread::sleep(Duration::from_secs(10));
        fleet.heal(&node)?;

        // 4. drop 30% of an agent's packets for 6 s.
        loss(&fleet, "a1", 30, true)?;
        fault("30% packet loss on a1 for 6s".into());
        std::thread::sleep(Duration::from_secs(6));
        loss(&fleet, "a1", 30, false)?;

        // 5. kill -9 an agent, restart it after 3 s.
        fleet.kill_agent("a2")?;
        fault("kill -9 agent a2 for 3s".into());
        std::thread::sleep(Duration::from_secs(3));
        fleet.restart_agent("a2")?;

        // 6. kill -9 the fenced job's container monitor (the agent starts the container
        // again) and an agent's WireGuard tunnel (the agent restarts it).
        let (lock_alloc, lock_node, record) =
            fleet.wait_for_value("lock's container running", Duration::from_secs(30), |f| {
                for (alloc, node, status) in f.allocations("lock")? {
                    if status != "running" {
                        continue;
                    }
                    if let Some(r) = f.container_records(&node)?.into_iter().find(|r| {
                        r["labels"]["skiff.alloc"] == alloc.as_str() && r["status"] == "running"
                    }) {
                        return Ok(Some((alloc, node, r)));
                    }
                }
                Ok(None)
            })?;
        let id = record["id"].as_str().context("container id")?;
        let state: serde_json::Value = serde_json::from_slice(&std::fs::read(
            fleet
                .agent_data(&lock_node)?
                .join("containers")
                .join(id)
                .join("state.json"),
        )?)?;
        let monitor = state["monitor_pid"].as_i64().context("monitor pid")?;
        kill9(monitor)?;
        fault(format!(
            "kill -9 the monitor of lock's container on {lock_node}"
        ));
        let tunnel = fleet.tunnel_pid("a3")?.context("a3's tunnel")?;
        kill9(i64::from(tunnel))?;
        fault("kill -9 a3's WireGuard tunnel".into());
        fleet.wait_for("lock running again", Duration::from_secs(30), |f| {
            Ok(f.running_and_ready("lock")?.0 == 1
                && f.container_records(&lock_node)?.iter().any(|r| {
                    r["labels"]["skiff.alloc"] == lock_alloc.as_str() && r["status"] == "running"
                }))
        })?;

        // 7. a follower's disk fills up: it stops (a fatal storage error ends the process,
        // as systemd would see it), the others go on; freed and restarted, it catches up.
        let leader = fleet.leader_host()?;
        let victim = ["c1", "c2", "c3"]
            .into_iter()
            .find(|c| *c != leader)
            .context("a follower")?;
        let data = fleet.controller_on_small_disk(victim, "48m")?;
        fleet.wait_for(
            "the member back on its small disk",
            Duration::from_secs(30),
            |f| caught_up(f, victim),
        )?;
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M"])
            .arg(format!("of={}", data.join("fill").display()))
            .output()?;
        fault(format!("disk of controller {victim} full for up to 30s"));
        let t = Instant::now();
        let mut exited = None;
        while t.elapsed() < Duration::from_secs(30) && exited.is_none() {
            exited = fleet.controller_exit(victim)?;
            std::thread::sleep(Duration::from_millis(200));
        }
        std::fs::remove_file(data.join("fill"))?;
        match exited {
            Some(status) => {
                let log = fleet.log(victim);
                let why = log
                    .lines()
                    .rev()
                    .find(|l| l.contains("No space left"))
                    .or_else(|| log.lines().rev().find(|l| l.contains("ERROR")))
                    .unwrap_or("(no error line)")
                    .trim()
                    .to_owned();
                fault(format!(
                    "controller {victim} stopped on its full disk after {:?} ({status}): {why}",
                    t.elapsed()
                ));
                fleet.restart_controller(victim)?;
            }
            None => fault(format!(
                "controller {victim} kept going on its full disk for 30s"
            )),
        }
        fleet.wait_for(
            "the member to catch up after its disk was freed",
            Duration::from_secs(60),
            |f| caught_up(f, victim),
        )?;

        // 8. the wall clocks of the leader's host and of an agent's step 2 minutes forward,
        // then 4 minutes back, then back to the real time.
        let leader = fleet.leader_host()?;
        for (offset, what) in [
            ("+120", "forward 2 min"),
            ("-120", "back 4 min"),
            ("+0", "back to real time"),
        ] {
            fleet.jump_clock(&leader, offset)?;
            fleet.jump_clock("a3", offset)?;
            fault(format!("wall clocks of {leader} and a3 step {what}"));
            std::thread::sleep(Duration::from_secs(6));
        }

        // 9. kill the leader three times in a row during the writes.
        for _ in 0..3 {
            let l = kill_leader(&mut fleet)?;
            fault(format!("kill -9 leader {l}"));
        }
        Ok(())
    })();
    // Healed whatever happened, so that the fleet's cleanup and the checks see it whole.
    for h in ["c1", "c2", "c3", "a1", "a2", "a3"] {
        let _ = fleet.heal(h);
    }
    let _ = loss(&fleet, "a1", 30, false);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let _ = writer.join();
    result?;

    // Settled: every node ready, every allocation running again.
    fleet.wait_for("the fleet to settle", Duration::from_secs(60), |f| {
        Ok(f.ready_nodes()?.len() == 3
            && f.running_and_ready("lock")?.0 == 1
            && f.running_and_ready("web")?.0 == 3)
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let _ = sampler.join();

    let history = history.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let jobs = fleet.cli_json(&["jobs"])?;
    let present: BTreeSet<String> = jobs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["name"].as_str().map(str::to_owned))
        .collect();
    let lives = lives.lock().unwrap_or_else(|e| e.into_inner()).clone();
    eprintln!("faults: {}", faults.join("; "));
    eprintln!("history: {}", history.summary());
    eprintln!(
        "lock: {} containers over the run, the shortest gap between one's end and the next's start {:?} ms",
        lives.all().len(),
        lives.min_gap_ms()
    );
    for l in lives.all() {
        eprintln!(
            "  {} on {} (alloc {}): {}..{}",
            l.container,
            l.node,
            l.alloc,
            l.start_ms,
            l.end_ms.map_or("running".to_owned(), |e| e.to_string())
        );
    }
    let lost = history.lost(&present);
    ensure!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    ensure!(
        history
            .ops
            .iter()
            .filter(|o| o.outcome == Outcome::Ok)
            .count()
            > 10,
        "too few writes succeeded to mean anything: {}",
        history.summary()
    );
    let overlaps = lives.overlaps();
    ensure!(
        overlaps.is_empty(),
        "the fenced job ran twice at once: {overlaps:?}\nall: {:?}",
        lives.all()
    );
    ensure!(
        lives.all().len() >= 2,
        "lock was never replaced: {:?}",
        lives.all()
    );
    Ok(())
}
