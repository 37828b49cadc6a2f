//! Services and health checks on the netns fleet (needs root): a job's `service` section lists
//! its allocations as endpoints; only those whose health check passes take traffic; a failing
//! check takes an endpoint out and a recovering one puts it back.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use skiff_e2e::fleet::{Fleet, can_run, serial};

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

/// The A records of web.default.skiff.internal that a1's DNS (at `gw`) answers, one per line.
fn web_a(fleet: &Fleet, gw: &str) -> Result<String> {
    dig(
        fleet,
        "a1",
        &[
            &format!("@{gw}"),
            "web.default.skiff.internal",
            "A",
            "+short",
        ],
    )
}

#[test]
fn s10_health_checks_gate_endpoints() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
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

        // An exec check: a command in the container decides (here: a file's presence).
        let gated = fleet.spec(
            "gated",
            &format!(
                "name = \"gated\"\nreplicas = 1\nimage = \"{}\"\n\
                 command = [\"/bin/sleep\"]\nargs = [\"3600\"]\nstop_signal = \"SIGKILL\"\n\
                 [[ports]]\nname = \"api\"\nport = 9000\n\
                 [service]\nport = \"api\"\n\
                 check = {{ exec = [\"test\", \"-f\", \"/tmp/ready\"], interval = \"1s\", timeout = \"900ms\", unhealthy_threshold = 1 }}\n\
                 [resources]\ncpu = 0.05\nmemory = \"16Mi\"\n",
                fleet.image()
            ),
        )?;
        fleet.cli_ok(&["apply", "-f", &gated.display().to_string()])?;
        fleet.wait_for(
            "gated running but unhealthy",
            Duration::from_secs(20),
            |f| {
                let eps = endpoints(f, "gated")?;
                Ok(eps.len() == 1 && eps[0].2 == "unhealthy" && !eps[0].3)
            },
        )?;
        let g = endpoints(&fleet, "gated")?[0].0.clone();
        fleet.cli_ok(&["exec", &g, "--", "touch", "/tmp/ready"])?;
        fleet.wait_for("gated healthy", Duration::from_secs(10), |f| {
            Ok(ready(&endpoints(f, "gated")?) == 1)
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

/// A stand-in upstream resolver on the cli host: answers every A query with 192.0.2.7
/// (built by hand: the query with QR/RA set and one answer pointing at the question name).
fn fake_upstream(netns: String, addr: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    std::thread::spawn(move || {
        if skiff_e2e::enter_netns(&netns).is_err() {
            return;
        }
        let Ok(sock) = std::net::UdpSocket::bind(format!("{addr}:53")) else {
            return;
        };
        let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 512];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if n < 12 {
                continue;
            }
            // The question ends after the name's zero label, then type and class.
            let mut i = 12;
            while i < n && buf[i] != 0 {
                i += usize::from(buf[i]) + 1;
            }
            let end = (i + 5).min(n);
            let mut r = buf[..end].to_vec();
            r[2] |= 0x80; // QR
            r[3] |= 0x80; // RA
            r[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]); // 1 answer, no authority/additional
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
            let _ = sock.send_to(&r, peer);
        }
    });
}

fn dig(fleet: &Fleet, host: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["dig", "+time=2", "+tries=1"];
    all.extend_from_slice(args);
    let out = fleet.on_host(host, &all)?;
    ensure!(
        out.status.success(),
        "dig {args:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn s20_dns_serves_services_on_every_host() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    if !skiff_testkit::require(&[
        skiff_testkit::tool("dig", "bind9-dnsutils"),
        skiff_testkit::tool("python3", "python3"),
    ]) {
        return Ok(());
    }
    let _serial = serial();
    let mut fleet = Fleet::start(1, 2, "3s")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cli = fleet.host("cli")?.clone();
    fake_upstream(cli.netns.clone(), cli.addr.clone(), stop.clone());
    let res = dns_checks(&mut fleet);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(30));
    }
    res
}

fn dns_checks(fleet: &mut Fleet) -> Result<()> {
    let image = fleet.image();
    let spec = |replicas: u32| {
        format!(
            "name = \"web\"\nreplicas = {replicas}\nimage = \"{}\"\n\
             command = [\"/bin/httpd\"]\nargs = [\"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             stop_signal = \"SIGKILL\"\n\
             [[ports]]\nname = \"http\"\nport = 8080\n\
             [service]\nport = \"http\"\ncheck = {{ tcp = \"http\", interval = \"500ms\", timeout = \"400ms\" }}\n\
             [resources]\ncpu = 0.05\nmemory = \"16Mi\"\n",
            image
        )
    };
    let path = fleet.spec("web", &spec(10))?;
    fleet.cli_ok(&["apply", "-f", &path.display().to_string()])?;
    fleet.wait_for("10 ready endpoints", Duration::from_secs(40), |f| {
        Ok(ready(&endpoints(f, "web")?) == 10)
    })?;
    let ips: std::collections::BTreeSet<String> =
        endpoints(fleet, "web")?.into_iter().map(|e| e.1).collect();
    let nodes = fleet.cli_json(&["nodes"])?;
    let gateway = |n: &str| -> Result<String> {
        let subnet = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["name"] == n)
            .and_then(|x| x["subnet"].as_str())
            .context("subnet")?
            .to_owned();
        Ok(format!(
            "{}.1",
            subnet.rsplit_once('.').context("subnet")?.0
        ))
    };
    for host in ["a1", "a2"] {
        let server = format!("@{}", gateway(host)?);
        // A: every ready endpoint, over the default EDNS size.
        fleet.wait_for(
            &format!("{host}'s DNS to list 10 addresses"),
            Duration::from_secs(5),
            |f| {
                let got: std::collections::BTreeSet<String> = dig(
                    f,
                    host,
                    &[&server, "web.default.skiff.internal", "A", "+short"],
                )?
                .lines()
                .map(str::to_owned)
                .collect();
                Ok(got == ips)
            },
        )?;
        // SRV with ports; the targets resolve.
        let srv = dig(
            fleet,
            host,
            &[
                &server,
                "_http._tcp.web.default.skiff.internal",
                "SRV",
                "+short",
            ],
        )?;
        ensure!(
            srv.lines().count() == 10 && srv.lines().all(|l| l.starts_with("0 10 8080 ")),
            "{srv}"
        );
        let target = srv
            .lines()
            .next()
            .and_then(|l| l.split(' ').nth(3))
            .context("target")?;
        let one = dig(fleet, host, &[&server, target, "A", "+short"])?;
        ensure!(ips.contains(one.trim()), "{target} -> {one}");
        // NXDOMAIN for unknown names in the zone.
        let nx = dig(fleet, host, &[&server, "nope.default.skiff.internal", "A"])?;
        ensure!(nx.contains("status: NXDOMAIN"), "{nx}");
        // Too big for 512 bytes over UDP: truncated, and complete over TCP.
        let trunc = dig(
            fleet,
            host,
            &[
                &server,
                "+noedns",
                "+ignore",
                "_http._tcp.web.default.skiff.internal",
                "SRV",
            ],
        )?;
        ensure!(
            trunc.contains(" tc") && trunc.contains("ANSWER: 0"),
            "{trunc}"
        );
        let full = dig(
            fleet,
            host,
            &[
                &server,
                "+noedns",
                "_http._tcp.web.default.skiff.internal",
                "SRV",
            ],
        )?;
        ensure!(full.contains("ANSWER: 10"), "{full}");
        let tcp = dig(
            fleet,
            host,
            &[&server, "+tcp", "web.default.skiff.internal", "A", "+short"],
        )?;
        ensure!(tcp.lines().count() == 10, "{tcp}");
        // Outside the zone: forwarded upstream.
        let ext = dig(fleet, host, &[&server, "example.test", "A", "+short"])?;
        ensure!(ext.trim() == "192.0.2.7", "forwarded: {ext}");
    }

    // From inside a container: the resolv.conf names the node's DNS; short names work.
    let alloc = endpoints(fleet, "web")?[0].0.clone();
    let conf = fleet.cli_ok(&["exec", &alloc, "--", "cat", "/etc/resolv.conf"])?;
    ensure!(
        conf.contains("search default.skiff.internal skiff.internal") && conf.contains("ndots:2"),
        "{conf}"
    );
    let ns = fleet.cli_ok(&[
        "exec",
        &alloc,
        "--",
        "nslookup",
        "web.default.skiff.internal",
    ])?;
    ensure!(ips.iter().any(|ip| ns.contains(ip.as_str())), "{ns}");
    let page = fleet.cli_ok(&["exec", &alloc, "--", "wget", "-qO-", "http://web:8080/"])?;
    ensure!(page.contains("hello from skiff"), "{page}");

    // Malformed packets (bounded, deterministic) do not take the server down.
    let gw = gateway("a1")?;
    let garbage = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nx=12345\n\
         for i in range(3000):\n    b=bytearray()\n    for j in range(i%200):\n        x=(x*1103515245+12345)&0x7fffffff\n        b.append(x&255)\n    s.sendto(bytes(b),('{gw}',53))\n"
    );
    let sent = fleet.on_host("a1", &["python3", "-c", &garbage])?;
    ensure!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let after = web_a(fleet, &gw)?;
    ensure!(after.lines().count() == 10, "after garbage: {after}");

    // Scale down: the records follow.
    fleet.cli_ok(&["scale", "web", "2"])?;
    let t = std::time::Instant::now();
    fleet.wait_for("2 addresses in DNS", Duration::from_secs(10), |f| {
        Ok(web_a(f, &gw)?.lines().count() == 2)
    })?;
    eprintln!(
        "DNS followed the scale-down in {:.2}s",
        t.elapsed().as_secs_f64()
    );

    // The controller goes away: the last view keeps being served.
    fleet.kill_leader()?;
    let still = web_a(fleet, &gw)?;
    ensure!(
        still.lines().count() == 2,
        "with the controller down: {still}"
    );
    Ok(())
}
