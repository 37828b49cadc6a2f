//! Services and health checks on the netns fleet (needs root): a job's `service` section lists
//! its allocations as endpoints; only those whose health check passes take traffic; a failing
//! check takes an endpoint out and a recovering one puts it back; DNS answers each service's
//! virtual IP, and a connection to it reaches one ready endpoint.

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

/// The SRV records of web's http port that a1's DNS (at `gw`) answers, one per line.
fn web_srv(fleet: &Fleet, gw: &str) -> Result<String> {
    dig(
        fleet,
        "a1",
        &[
            &format!("@{gw}"),
            "_http._tcp.web.default.skiff.internal",
            "SRV",
            "+short",
        ],
    )
}

/// A service's virtual IP as `skiff services` shows it.
fn vip(fleet: &Fleet, service: &str) -> Result<String> {
    let list = fleet.cli_json(&["services"])?;
    list.as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == service)
        .and_then(|s| s["vip"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("no VIP for {service}: {list}"))
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

/// Queries the stand-in upstream has answered.
static UPSTREAM_ASKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A stand-in upstream resolver on the cli host: answers every A query with 192.0.2.7, TTL 60
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
            UPSTREAM_ASKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    let web_vip = vip(fleet, "web")?;
    ensure!(web_vip.starts_with("10.43."), "VIP {web_vip}");
    for host in ["a1", "a2"] {
        let server = format!("@{}", gateway(host)?);
        // A: the service's virtual IP.
        fleet.wait_for(
            &format!("{host}'s DNS to answer the VIP"),
            Duration::from_secs(5),
            |f| {
                let got = dig(
                    f,
                    host,
                    &[&server, "web.default.skiff.internal", "A", "+short"],
                )?;
                Ok(got.trim() == web_vip)
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
            &[
                &server,
                "+tcp",
                "_http._tcp.web.default.skiff.internal",
                "SRV",
                "+short",
            ],
        )?;
        ensure!(tcp.lines().count() == 10, "{tcp}");
        // Outside the zone: forwarded upstream.
        let ext = dig(fleet, host, &[&server, "example.test", "A", "+short"])?;
        ensure!(ext.trim() == "192.0.2.7", "forwarded: {ext}");
        // Asked again (another spelling): answered from the agent's cache, the upstream not
        // asked, the asker's spelling echoed, the TTL at most the upstream's 60.
        let asked = UPSTREAM_ASKED.load(std::sync::atomic::Ordering::Relaxed);
        let again = dig(
            fleet,
            host,
            &[&server, "ExAmPlE.TeSt", "A", "+noall", "+answer"],
        )?;
        let fields: Vec<&str> = again.split_whitespace().collect();
        ensure!(
            fields.first() == Some(&"ExAmPlE.TeSt.")
                && fields
                    .get(1)
                    .and_then(|t| t.parse::<u32>().ok())
                    .is_some_and(|t| t <= 60)
                && fields.last() == Some(&"192.0.2.7"),
            "cached: {again}"
        );
        ensure!(
            UPSTREAM_ASKED.load(std::sync::atomic::Ordering::Relaxed) == asked,
            "the upstream was asked again for a name the agent had just forwarded"
        );
        // EDNS as ISC's compliance checks ask: an OPT record with the server's payload size
        // (the question's case echoed); BADVERS for version 1; zone transfers and the CHAOS
        // class refused.
        let edns = dig(
            fleet,
            host,
            &[&server, "+edns=0", "WeB.DeFault.skiff.internal", "A"],
        )?;
        ensure!(
            edns.contains("status: NOERROR")
                && edns.contains("OPT PSEUDOSECTION")
                && edns.contains("udp: 1232")
                && edns.contains(";WeB.DeFault.skiff.internal."),
            "{edns}"
        );
        let v1 = dig(
            fleet,
            host,
            &[
                &server,
                "+edns=1",
                "+noednsneg",
                "web.default.skiff.internal",
                "A",
            ],
        )?;
        ensure!(v1.contains("status: BADVERS"), "{v1}");
        let ch = dig(fleet, host, &[&server, "CH", "TXT", "version.bind"])?;
        ensure!(ch.contains("status: REFUSED"), "{ch}");
        let out = fleet.on_host(
            host,
            &[
                "dig",
                "+time=2",
                "+tries=1",
                &server,
                "AXFR",
                "skiff.internal",
            ],
        )?;
        let axfr = String::from_utf8_lossy(&out.stdout);
        ensure!(
            axfr.contains("Transfer failed") && !axfr.contains("\tSOA\t"),
            "AXFR: {axfr}"
        );
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
    ensure!(ns.contains(web_vip.as_str()), "{ns}");
    let one = format!("{alloc}.web.default.skiff.internal");
    let ns = fleet.cli_ok(&["exec", &alloc, "--", "nslookup", &one])?;
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
    let after = web_srv(fleet, &gw)?;
    ensure!(after.lines().count() == 10, "after garbage: {after}");

    // Scale down: the records follow.
    fleet.cli_ok(&["scale", "web", "2"])?;
    let t = std::time::Instant::now();
    fleet.wait_for("2 endpoints in DNS", Duration::from_secs(10), |f| {
        Ok(web_srv(f, &gw)?.lines().count() == 2)
    })?;
    eprintln!(
        "DNS followed the scale-down in {:.2}s",
        t.elapsed().as_secs_f64()
    );

    // The controller goes away: the last view keeps being served.
    fleet.kill_leader()?;
    let still = web_srv(fleet, &gw)?;
    ensure!(
        still.lines().count() == 2,
        "with the controller down: {still}"
    );
    Ok(())
}

/// The allocation ids that `count` requests to `url` from inside `client` were answered by
/// (each endpoint serves its own id at /id). Not `wget -T`: Debian's busybox crashes on it.
fn answered_by(fleet: &Fleet, client: &str, url: &str, count: u32) -> Result<Vec<String>> {
    let script =
        format!("for i in $(seq {count}); do timeout 5 wget -qO- {url} 2>&1 || echo FAILED; done");
    let out = fleet.cli_ok(&["exec", client, "--", "sh", "-c", &script])?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// The DNAT targets of the VIP table on `host`.
fn vip_targets(fleet: &Fleet, host: &str) -> Result<Vec<String>> {
    let out = fleet.on_host(
        host,
        &["iptables", "-w", "-t", "nat", "-S", "SKIFF-SERVICES"],
    )?;
    ensure!(out.status.success(), "iptables on {host}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("--to-destination ").nth(1))
        .map(|t| t.split(':').next().unwrap_or_default().to_owned())
        .collect())
}

#[test]
fn s30_service_vips_balance_per_connection_and_follow_endpoints() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    if !skiff_testkit::require(&[skiff_testkit::tool("dig", "bind9-dnsutils")]) {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start(1, 2, "3s")?;
    let res = vip_checks(&fleet);
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(30));
    }
    res
}

fn vip_checks(fleet: &Fleet) -> Result<()> {
    let image = fleet.image();
    let web = |replicas: u32| {
        format!(
            "name = \"web\"\nreplicas = {replicas}\nimage = \"{image}\"\n\
             command = [\"/bin/sh\", \"-c\", \"hostname > /www/id && exec httpd -f -p 8080 -h /www\"]\n\
             stop_signal = \"SIGKILL\"\n\
             [[ports]]\nname = \"http\"\nport = 8080\n\
             [service]\nport = \"http\"\ncheck = {{ tcp = \"http\", interval = \"500ms\", timeout = \"400ms\" }}\n\
             [resources]\ncpu = 0.05\nmemory = \"16Mi\"\n"
        )
    };
    let path = fleet.spec("web", &web(2))?;
    fleet.cli_ok(&["apply", "-f", &path.display().to_string()])?;
    let client = fleet.spec(
        "client",
        &format!(
            "name = \"client\"\nreplicas = 1\nimage = \"{image}\"\n\
             command = [\"/bin/sleep\"]\nargs = [\"3600\"]\nstop_signal = \"SIGKILL\"\n\
             [resources]\ncpu = 0.05\nmemory = \"16Mi\"\n"
        ),
    )?;
    fleet.cli_ok(&["apply", "-f", &client.display().to_string()])?;
    fleet.wait_for("2 ready endpoints", Duration::from_secs(40), |f| {
        Ok(ready(&endpoints(f, "web")?) == 2)
    })?;
    let client_alloc =
        fleet.wait_for_value("the client running", Duration::from_secs(30), |f| {
            Ok(f.allocations("client")?
                .into_iter()
                .find(|a| a.2 == "running")
                .map(|a| a.0))
        })?;
    let eps = endpoints(fleet, "web")?;
    let ids: std::collections::BTreeSet<String> = eps.iter().map(|e| e.0.clone()).collect();
    // The replicas are on both nodes, so the client reaches one on its own node (hairpin
    // through the host) and one across the overlay.
    let nodes: std::collections::BTreeSet<String> =
        fleet.allocations("web")?.into_iter().map(|a| a.1).collect();
    ensure!(nodes.len() == 2, "web's replicas on {nodes:?}");
    let web_vip = vip(fleet, "web")?;
    let text = fleet.cli_ok(&["services"])?;
    ensure!(text.contains(&web_vip), "{text}");
    // Every agent programs the VIP with both endpoints.
    fleet.wait_for(
        "both agents to program the VIP",
        Duration::from_secs(5),
        |f| {
            let want: std::collections::BTreeSet<String> =
                eps.iter().map(|e| e.1.clone()).collect();
            for host in ["a1", "a2"] {
                let got: std::collections::BTreeSet<String> =
                    vip_targets(f, host)?.into_iter().collect();
                if got != want {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;

    // By name (DNS answers the VIP) and by address: every connection is answered, by both
    // endpoints (the chance that 40 fair picks miss one is 2^-39).
    for url in [
        "http://web.default.skiff.internal:8080/id".to_owned(),
        format!("http://{web_vip}:8080/id"),
    ] {
        let got = answered_by(fleet, &client_alloc, &url, 40)?;
        ensure!(
            got.len() == 40 && got.iter().all(|g| ids.contains(g)),
            "{url}: {got:?}"
        );
        let seen: std::collections::BTreeSet<&String> = got.iter().collect();
        ensure!(
            seen.len() == 2,
            "{url}: one endpoint took every connection: {got:?}"
        );
    }
    // From a node itself (the host's own traffic goes through nat OUTPUT).
    let from_host = fleet.on_host(
        "a1",
        &[
            "curl",
            "-sS",
            "-m",
            "3",
            &format!("http://{web_vip}:8080/id"),
        ],
    )?;
    let body = String::from_utf8_lossy(&from_host.stdout).trim().to_owned();
    ensure!(ids.contains(&body), "from host a1: {from_host:?}");

    // Scale down: the leaving endpoint gets no new connection once its rules are gone.
    fleet.cli_ok(&["scale", "web", "1"])?;
    let t = std::time::Instant::now();
    let kept = fleet.wait_for_value("one endpoint left", Duration::from_secs(10), |f| {
        let eps = endpoints(f, "web")?;
        Ok((eps.len() == 1).then(|| (eps[0].0.clone(), eps[0].1.clone())))
    })?;
    fleet.wait_for("both VIP tables to follow", Duration::from_secs(10), |f| {
        Ok(vip_targets(f, "a1")? == [kept.1.clone()] && vip_targets(f, "a2")? == [kept.1.clone()])
    })?;
    eprintln!(
        "VIP tables followed the scale-down in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let got = answered_by(fleet, &client_alloc, "http://web:8080/id", 20)?;
    ensure!(
        got.iter().all(|g| *g == kept.0),
        "after the scale-down: {got:?}"
    );

    // No endpoint at all: refused at once, not sent off the node.
    fleet.cli_ok(&["scale", "web", "0"])?;
    fleet.wait_for("no DNAT left", Duration::from_secs(10), |f| {
        Ok(vip_targets(f, "a1")?.is_empty() && vip_targets(f, "a2")?.is_empty())
    })?;
    let t = std::time::Instant::now();
    let refused = fleet.cli(&[
        "exec",
        &client_alloc,
        "--",
        "timeout",
        "5",
        "wget",
        "-qO-",
        &format!("http://{web_vip}:8080/id"),
    ])?;
    let err = String::from_utf8_lossy(&refused.stderr).into_owned();
    ensure!(
        !refused.status.success(),
        "answered with no endpoint: {refused:?}"
    );
    ensure!(
        err.contains("refused") && t.elapsed() < Duration::from_secs(4),
        "not refused at once ({:?}): {err}",
        t.elapsed()
    );

    // The job stops: its VIP is released and its rules go.
    fleet.cli_ok(&["stop", "web"])?;
    fleet.wait_for("the VIP's rules gone", Duration::from_secs(10), |f| {
        for host in ["a1", "a2"] {
            let out = f.on_host(host, &["iptables", "-w", "-S", "SKIFF-SVC-REJECT"])?;
            if String::from_utf8_lossy(&out.stdout).contains(&web_vip) {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    Ok(())
}
