//! The service mesh on the netns fleet (needs root): jobs with `[mesh]` get a sidecar that
//! carries their service-to-service traffic over mutual TLS with workload identities, and
//! that refuses callers outside `allow_from`, callers without the mesh, and forged
//! certificates; certificates rotate under load without a failed request.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use skiff_e2e::fleet::{Fleet, can_run, serial};

/// What the server serves; must never be seen in clear on the wire.
const MARKER: &str = "MESH-MARKER-5e1f0c";

fn job(fleet: &Fleet, name: &str, text: &str) -> Result<()> {
    let path = fleet.spec(name, text)?;
    fleet.cli_ok(&["apply", "-f", &path.display().to_string()])?;
    Ok(())
}

/// A job that only sleeps (a caller), with `extra` appended. With an init: the requests'
/// `timeout` watchers are orphaned into pid 1, which must reap them.
fn caller(image: &str, name: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{image}\"\ninit = true\ncommand = [\"/bin/sleep\"]\nargs = [\"3600\"]\n\
         stop_signal = \"SIGKILL\"\n[resources]\ncpu = 0.05\nmemory = \"16Mi\"\n{extra}"
    )
}

/// The running allocation of `job` and its node.
fn running(fleet: &Fleet, job: &str) -> Result<(String, String)> {
    fleet.wait_for_value(&format!("{job} running"), Duration::from_secs(40), |f| {
        Ok(f.allocations(job)?
            .into_iter()
            .find(|a| a.2 == "running")
            .map(|a| (a.0, a.1)))
    })
}

/// Runs `count` requests from `client` to `url`, one connection each; the answers (or
/// FAILED lines).
fn fetch(fleet: &Fleet, client: &str, url: &str, count: u32, pause: &str) -> Result<Vec<String>> {
    let script = format!(
        "for i in $(seq {count}); do timeout 5 wget -qO- {url} 2>&1 || echo FAILED; sleep {pause}; done"
    );
    let out = fleet.cli_ok(&["exec", client, "--", "sh", "-c", &script])?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// The sidecar directory of an allocation on its node.
fn mesh_dir(fleet: &Fleet, node: &str, alloc: &str) -> Result<PathBuf> {
    Ok(fleet.agent_data(node)?.join("mesh").join(alloc))
}

fn sidecar_pid(fleet: &Fleet, node: &str, alloc: &str) -> Result<i32> {
    let path = fleet
        .agent_data(node)?
        .join("mesh")
        .join(format!("{alloc}.pid"));
    Ok(std::fs::read_to_string(&path)
        .with_context(|| path.display().to_string())?
        .trim()
        .parse()?)
}

/// What a node's agent exposes of its sidecars (`/sidecars/metrics`), read from the CLI host.
fn agent_sidecar_metrics(fleet: &Fleet, node: &str) -> Result<String> {
    let addr = fleet.host(node)?.addr.clone();
    let out = fleet.on_host(
        "cli",
        &[
            "curl",
            "-sf",
            &format!("http://{addr}:7802/sidecars/metrics"),
        ],
    )?;
    ensure!(out.status.success(), "agent metrics of {node}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A sidecar's metrics, read from the node it runs on.
fn metrics(fleet: &Fleet, node: &str, ip: &str) -> Result<String> {
    let out = fleet.on_host(
        node,
        &[
            "curl",
            "-sS",
            "-m",
            "3",
            &format!("http://{ip}:15020/metrics"),
        ],
    )?;
    ensure!(out.status.success(), "metrics of {ip}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn counter(text: &str, needle: &[&str]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && needle.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `GET /id` through TLS with `cert`/`key` to `ip:8080` from `node`: the answer (empty when
/// refused) and s_client's report.
fn tls_get(
    fleet: &Fleet,
    node: &str,
    ip: &str,
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<(String, String)> {
    let h = fleet.host(node)?;
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", h.netns))
        .args(["--", "timeout", "10", "openssl", "s_client", "-connect"])
        .arg(format!("{ip}:8080"))
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .arg("-CAfile")
        .arg(ca)
        .args(["-verify_return_error", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(b"GET /id HTTP/1.0\r\n\r\n")?;
    }
    let out = child.wait_with_output()?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Starts tcpdump on `node`'s `iface` with `filter`, writing to `path`; returns once it
/// captures (it says "listening on").
fn capture(
    fleet: &Fleet,
    node: &str,
    iface: &str,
    filter: &str,
    path: &Path,
) -> Result<std::process::Child> {
    use std::io::Read as _;
    let h = fleet.host(node)?;
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", h.netns))
        .args(["--", "tcpdump", "-U", "-n", "-s", "0", "-i", iface, "-w"])
        .arg(path)
        .arg(filter)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut err = child.stderr.take().context("tcpdump stderr")?;
    let mut buf = [0u8; 256];
    let t = Instant::now();
    let mut seen = String::new();
    while !seen.contains("listening on") && t.elapsed() < Duration::from_secs(10) {
        let n = err.read(&mut buf)?;
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    ensure!(
        seen.contains("listening on"),
        "tcpdump on {node} {iface}: {seen}"
    );
    // Kept open: tcpdump writes its counts there when it stops.
    child.stderr = Some(err);
    Ok(child)
}

/// A new P-256 key and a self-signed certificate for it (a day), with `extra` arguments.
fn self_signed(key: &str, cert: &str, subject: &str, extra: &[&str]) -> Result<()> {
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key,
        "-out",
        cert,
        "-days",
        "1",
        "-subj",
        subject,
    ];
    args.extend_from_slice(extra);
    openssl(&args)
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).output()?;
    ensure!(out.status.success(), "openssl {args:?}: {out:?}");
    Ok(())
}

#[test]
fn m10_mesh_mtls_between_services_with_identity_policy_and_rotation() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    if !skiff_testkit::require(&[
        skiff_testkit::tool("tcpdump", "tcpdump"),
        skiff_testkit::tool("openssl", "openssl"),
        skiff_testkit::tool("curl", "curl"),
        skiff_testkit::tool("promtool", "prometheus"),
    ]) {
        return Ok(());
    }
    let _serial = serial();
    // Short-lived workload certificates, so that they rotate during the test.
    let fleet = Fleet::start_full(1, 2, "3s", &[], &["--mesh-cert-ttl", "30s"])?;
    let res = mesh_checks(&fleet);
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(30));
        for node in ["a1", "a2"] {
            if let Ok(d) = fleet.agent_data(node) {
                for e in std::fs::read_dir(d.join("mesh"))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if e.path().extension().is_some_and(|x| x == "log") {
                        let t = std::fs::read_to_string(e.path()).unwrap_or_default();
                        let tail: Vec<&str> = t.lines().rev().take(15).collect();
                        eprintln!("--- {} ---", e.path().display());
                        for l in tail.iter().rev() {
                            eprintln!("{l}");
                        }
                    }
                }
            }
        }
    }
    res
}

fn mesh_checks(fleet: &Fleet) -> Result<()> {
    let image = fleet.image();
    let api_spec = format!(
        "name = \"api\"\nreplicas = 2\nimage = \"{image}\"\n\
             command = [\"/bin/sh\", \"-c\", \"echo $(hostname) {MARKER} > /www/id && exec httpd -f -p 8080 -h /www\"]\n\
             stop_signal = \"SIGKILL\"\n\
             [[ports]]\nname = \"http\"\nport = 8080\nprotocol = \"http\"\n\
             [service]\nport = \"http\"\ncheck = {{ http = \"/id\", port = \"http\", interval = \"500ms\", timeout = \"400ms\" }}\n\
             [mesh]\nallow_from = [\"client\"]\n\
             [placement]\nspread = true\n\
             [resources]\ncpu = 0.05\nmemory = \"16Mi\"\n"
    );
    job(fleet, "api", &api_spec)?;
    job(
        fleet,
        "client",
        &caller(&image, "client", "[mesh]\nupstreams = [\"api\"]\n"),
    )?;
    job(fleet, "intruder", &caller(&image, "intruder", "[mesh]\n"))?;
    job(fleet, "plain", &caller(&image, "plain", ""))?;
    fleet.wait_for("2 ready endpoints of api", Duration::from_secs(60), |f| {
        let list = f.cli_json(&["services"])?;
        Ok(list.as_array().into_iter().flatten().any(|s| {
            s["name"] == "api"
                && s["endpoints"]
                    .as_array()
                    .is_some_and(|e| e.iter().filter(|e| e["ready"] == true).count() == 2)
        }))
    })?;
    let (client, client_node) = running(fleet, "client")?;
    let (intruder, _) = running(fleet, "intruder")?;
    let (plain, _) = running(fleet, "plain")?;
    let apis: Vec<(String, String, String)> = fleet
        .allocations("api")?
        .into_iter()
        .filter(|a| a.2 == "running")
        .collect();
    ensure!(apis.len() == 2, "api: {apis:?}");
    let svc = fleet.cli_json(&["services"])?;
    let api_ips: Vec<String> = svc
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "api")
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["ip"].as_str().map(str::to_owned))
        .collect();
    ensure!(api_ips.len() == 2, "{svc}");

    // The sidecars: the small skiff-proxy binary, unprivileged, each in a cgroup of its own.
    for (alloc, node, _) in &apis {
        let pid = sidecar_pid(fleet, node, alloc)?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
        ensure!(
            exe.file_name().is_some_and(|n| n == "skiff-proxy"),
            "sidecar {pid} runs {}",
            exe.display()
        );
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
        ensure!(
            uid.split_whitespace().skip(1).all(|u| u == "1337"),
            "sidecar {pid} runs as {uid}"
        );
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        ensure!(
            cg.contains(&format!("mesh-{alloc}")),
            "sidecar cgroups: {cg}"
        );
    }

    // The client reaches api by name, through its VIP, on both endpoints; while a capture on
    // the client's node (its bridge, where pod traffic is still outside the tunnel) never sees
    // the marker in clear.
    let bridge_cap = fleet.dir().join("bridge.pcap");
    let underlay_cap = fleet.dir().join("underlay.pcap");
    let mut captures = vec![
        capture(fleet, &client_node, "any", "tcp port 8080", &bridge_cap)?,
        capture(fleet, &client_node, "eth0", "udp", &underlay_cap)?,
    ];
    let got = fetch(
        fleet,
        &client,
        "http://api.default.skiff.internal:8080/id",
        30,
        "0",
    )?;
    for c in &mut captures {
        stop(c);
    }
    let ids: BTreeSet<String> = got
        .iter()
        .map(|l| l.split(' ').next().unwrap_or("").to_owned())
        .collect();
    ensure!(
        got.len() == 30 && got.iter().all(|l| l.contains(MARKER)),
        "the client through the mesh: {got:?}"
    );
    ensure!(
        ids.len() == 2,
        "one endpoint took every connection: {got:?}"
    );
    for (what, path) in [("bridge", &bridge_cap), ("underlay", &underlay_cap)] {
        let pcap = std::fs::read(path)?;
        ensure!(
            pcap.len() > 4096,
            "the {what} capture saw nothing ({} bytes)",
            pcap.len()
        );
        ensure!(
            !pcap.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "the marker crossed the {what} in clear"
        );
        eprintln!(
            "captured {} bytes on {client_node}'s {what}, no marker in clear",
            pcap.len()
        );
    }

    // The port says HTTP: the server sidecars counted each request by caller, status class
    // and version, and the agents expose that (per allocation, labelled like its scrape
    // target) at /sidecars/metrics, which promtool accepts.
    let mut served = 0;
    for node in ["a1", "a2"] {
        let text = agent_sidecar_metrics(fleet, node)?;
        served += counter(
            &text,
            &[
                "skiff_mesh_requests_total{",
                "identity=\"api.default\"",
                "version=\"1\"",
                "source=\"client.default\"",
                "class=\"2xx\"",
            ],
        );
        ensure!(
            text.contains(
                "skiff_mesh_request_duration_seconds_bucket{namespace=\"default\",workload=\"api\",alloc=\""
            ),
            "no latency histogram on {node}"
        );
        skiff_e2e::promtool(&["check", "metrics"], Some(&text))
            .with_context(|| format!("promtool on {node}'s metrics"))?;
    }
    ensure!(
        served >= 30,
        "requests counted by the api sidecars: {served}"
    );

    // Outside allow_from, and outside the mesh: refused.
    for who in [&intruder, &plain] {
        let got = fetch(
            fleet,
            who,
            "http://api.default.skiff.internal:8080/id",
            3,
            "0",
        )?;
        ensure!(
            got.iter().all(|l| !l.contains(MARKER)),
            "{who} was let through: {got:?}"
        );
    }
    let mut forbidden = 0;
    let mut tls_errors = 0;
    for ip in &api_ips {
        // Pod addresses are routed from every node (over the overlay for the other's).
        let m = metrics(fleet, "a1", ip).or_else(|_| metrics(fleet, "a2", ip))?;
        forbidden += counter(
            &m,
            &[
                "direction=\"inbound\"",
                "peer=\"intruder.default\"",
                "result=\"forbidden\"",
            ],
        );
        tls_errors += counter(&m, &["direction=\"inbound\"", "result=\"tls_error\""]);
    }
    ensure!(
        forbidden >= 3,
        "the intruder's refusals counted: {forbidden}"
    );
    ensure!(
        tls_errors >= 3,
        "the plain caller's refusals counted: {tls_errors}"
    );

    // openssl s_client: TLS 1.3 and the server's identity; the client's own certificate is
    // let in, forged ones are not.
    let cdir = mesh_dir(fleet, &client_node, &client)?;
    let work = fleet.dir().join("forge");
    std::fs::create_dir_all(&work)?;
    let copy = |from: &str, to: &str| std::fs::copy(cdir.join(from), work.join(to)).map(|_| ());
    copy("cert.pem", "client.pem")?;
    copy("key.pem", "client.key")?;
    copy("ca.pem", "ca.pem")?;
    let (intruder_alloc, intruder_node) = running(fleet, "intruder")?;
    let idir = mesh_dir(fleet, &intruder_node, &intruder_alloc)?;
    std::fs::copy(idir.join("cert.pem"), work.join("intruder.pem"))?;
    std::fs::copy(idir.join("key.pem"), work.join("intruder.key"))?;
    let w = |f: &str| work.join(f);
    let ws = |f: &str| w(f).display().to_string();
    let target = &api_ips[0];
    let (ok, report) = tls_get(
        fleet,
        &client_node,
        target,
        &w("client.pem"),
        &w("client.key"),
        &w("ca.pem"),
    )?;
    ensure!(
        ok.contains(MARKER),
        "the client's certificate: {ok} {report}"
    );
    ensure!(
        ok.contains("TLSv1.3") || report.contains("TLSv1.3"),
        "not TLS 1.3: {ok}"
    );
    // The server's certificate: the identity of api, in the URI SAN.
    let server_pem = ok
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|r| r.split("-----END CERTIFICATE-----").next())
        .map(|b| format!("-----BEGIN CERTIFICATE-----{b}-----END CERTIFICATE-----\n"))
        .context("s_client printed no certificate")?;
    std::fs::write(w("server.pem"), server_pem)?;
    let san = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-ext",
            "subjectAltName",
            "-in",
            &ws("server.pem"),
        ])
        .output()?;
    let san = String::from_utf8_lossy(&san.stdout).into_owned();
    ensure!(
        san.contains("URI:spiffe://skiff/ns/default/svc/api"),
        "SAN: {san}"
    );
    // Forgeries: self-signed with the right identity, another CA's, another service's.
    self_signed(
        &ws("self.key"),
        &ws("self.pem"),
        "/CN=client",
        &[
            "-addext",
            "subjectAltName=URI:spiffe://skiff/ns/default/svc/client",
        ],
    )?;
    self_signed(
        &ws("evil-ca.key"),
        &ws("evil-ca.pem"),
        "/CN=skiff cluster CA",
        &[],
    )?;
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &ws("evil.key"),
        "-out",
        &ws("evil.csr"),
        "-subj",
        "/CN=client",
    ])?;
    std::fs::write(
        w("ext.cnf"),
        "subjectAltName=URI:spiffe://skiff/ns/default/svc/client\nextendedKeyUsage=clientAuth,serverAuth\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &ws("evil.csr"),
        "-CA",
        &ws("evil-ca.pem"),
        "-CAkey",
        &ws("evil-ca.key"),
        "-CAcreateserial",
        "-out",
        &ws("evil.pem"),
        "-days",
        "1",
        "-extfile",
        &ws("ext.cnf"),
    ])?;
    for (what, cert, key) in [
        ("self-signed", "self.pem", "self.key"),
        ("another CA's", "evil.pem", "evil.key"),
        (
            "another service's (intruder)",
            "intruder.pem",
            "intruder.key",
        ),
    ] {
        let (out, _) = tls_get(fleet, &client_node, target, &w(cert), &w(key), &w("ca.pem"))?;
        ensure!(
            !out.contains(MARKER),
            "a {what} certificate was let in: {out}"
        );
    }

    // skiff mesh status: every identity, its certificates in force, and the policy.
    let status = fleet.cli_json(&["mesh", "status"])?;
    let ids = status["identities"].as_array().cloned().unwrap_or_default();
    let find = |svc: &str| {
        ids.iter()
            .find(|i| i["identity"] == format!("spiffe://skiff/ns/default/svc/{svc}"))
            .cloned()
            .unwrap_or_default()
    };
    let api = find("api");
    ensure!(
        api["service"] == true
            && api["mode"] == "strict"
            && api["allow_from"] == serde_json::json!(["client"])
            && api["certificates"].as_u64() >= Some(2)
            && api["expires"].as_i64() > Some(skiff_tls::pki::now_unix()),
        "mesh status of api: {status}"
    );
    ensure!(
        find("client")["certificates"].as_u64() >= Some(1) && find("client")["service"] == false,
        "mesh status of the client: {status}"
    );
    let table = fleet.cli_ok(&["mesh", "status"])?;
    ensure!(
        table.contains("spiffe://skiff/ns/default/svc/api") && table.contains("client"),
        "{table}"
    );

    // Rotation under a bounded constant load: 300 requests, one every 100 ms, while every
    // certificate (30 s, renewed at two thirds) is replaced; none fails.
    let api_dir = mesh_dir(fleet, &apis[0].1, &apis[0].0)?;
    let serial_of = |dir: &Path| -> Result<String> {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(dir.join("cert.pem"))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let (api_before, client_before) = (serial_of(&api_dir)?, serial_of(&cdir)?);
    let t = Instant::now();
    let got = fetch(fleet, &client, "http://api:8080/id", 300, "0.1")?;
    let failed: Vec<&String> = got.iter().filter(|l| !l.contains(MARKER)).collect();
    ensure!(
        got.len() == 300 && failed.is_empty(),
        "{} of {} requests failed during rotation: {failed:?}",
        failed.len(),
        got.len()
    );
    let (api_after, client_after) = (serial_of(&api_dir)?, serial_of(&cdir)?);
    ensure!(
        api_after != api_before && client_after != client_before,
        "no rotation in {:?}: api {api_before} -> {api_after}, client {client_before} -> {client_after}",
        t.elapsed()
    );
    eprintln!(
        "300 requests over {:.1}s across certificate rotations, none failed",
        t.elapsed().as_secs_f64()
    );
    // The client's first certificate has expired by now: refused.
    let (out, _) = tls_get(
        fleet,
        &client_node,
        target,
        &w("client.pem"),
        &w("client.key"),
        &w("ca.pem"),
    )?;
    ensure!(
        !out.contains(MARKER),
        "an expired certificate was let in: {out}"
    );

    // Permissive mode (a migration): plain-text callers get in too, mutual TLS still works.
    // (And the batch job below may call it too.)
    let v2 = api_spec
        .replace("[mesh]\n", "[mesh]\nmode = \"permissive\"\n")
        .replace("[\"client\"]", "[\"client\", \"once\"]");
    ensure!(v2.contains("\"once\"") && v2.contains("permissive"), "{v2}");
    job(fleet, "api", &v2)?;
    // (It rolls out replica by replica: wait until the new version alone serves.)
    let old: BTreeSet<String> = apis.iter().map(|a| a.0.clone()).collect();
    fleet.wait_for(
        "the permissive version in place of the old",
        Duration::from_secs(60),
        |f| {
            let now: Vec<_> = f
                .allocations("api")?
                .into_iter()
                .filter(|a| a.2 == "running")
                .collect();
            let list = f.cli_json(&["services"])?;
            let ready = list
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["name"] == "api")
                .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                .filter(|e| e["ready"] == true)
                .count();
            Ok(now.len() == 2 && now.iter().all(|a| !old.contains(&a.0)) && ready == 2)
        },
    )?;
    let got = fetch(fleet, &plain, "http://api:8080/id", 5, "0")?;
    ensure!(
        got.iter().all(|l| l.contains(MARKER)),
        "a plain-text caller in permissive mode: {got:?}"
    );
    let got = fetch(fleet, &client, "http://api:8080/id", 5, "0")?;
    ensure!(
        got.iter().all(|l| l.contains(MARKER)),
        "the client in permissive mode: {got:?}"
    );

    // Scale-down: the client's sidecar follows at once, and the endpoint that left gets no new
    // connection.
    // How many service sets the client's sidecar has loaded: it polls its files every 200 ms,
    // so the new set counts only once this has moved past the file's change.
    let client_reloads = || -> Result<u64> {
        Ok(counter(
            &agent_sidecar_metrics(fleet, &client_node)?,
            &[
                "skiff_mesh_service_set_reloads_total",
                &format!("alloc=\"{client}\""),
            ],
        ))
    };
    let before = client_reloads()?;
    fleet.cli_ok(&["scale", "api", "1"])?;
    let t = Instant::now();
    let services_json = cdir.join("services.json");
    let kept: String = fleet.wait_for_value(
        "the client's sidecar to list one api endpoint",
        Duration::from_secs(20),
        |_| {
            let set: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&services_json).unwrap_or_default())
                    .unwrap_or_default();
            let eps: Vec<String> = set["services"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|u| u["service"]["name"] == "api")
                .flat_map(|u| u["endpoints"].as_array().cloned().unwrap_or_default())
                .filter_map(|e| e["ip"].as_str().map(str::to_owned))
                .collect();
            Ok((eps.len() == 1).then(|| eps[0].clone()))
        },
    )?;
    fleet.wait_for_value(
        "the client's sidecar to load the new service set",
        Duration::from_secs(5),
        |_| Ok((client_reloads()? > before).then_some(())),
    )?;
    eprintln!(
        "the client's sidecar followed the scale-down in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let answered: BTreeSet<String> = fetch(fleet, &client, "http://api:8080/id", 20, "0")?
        .iter()
        .map(|l| l.split(' ').next().unwrap_or("").to_owned())
        .collect();
    ensure!(
        answered.len() == 1 && !answered.contains("FAILED"),
        "after the scale-down to {kept}: {answered:?}"
    );

    // A batch job in the mesh: it calls api once and ends; its sidecar goes with it.
    job(
        fleet,
        "once",
        &format!(
            "name = \"once\"\nimage = \"{image}\"\nrestart = \"never\"\n\
             command = [\"/bin/sh\", \"-c\", \"timeout 5 wget -qO- http://api:8080/id\"]\n\
             [mesh]\nupstreams = [\"api\"]\n[resources]\ncpu = 0.05\nmemory = \"16Mi\"\n"
        ),
    )?;
    let (once, once_node) = fleet
        .wait_for_value("the batch job to exit", Duration::from_secs(40), |f| {
            Ok(f.allocations("once")?
                .into_iter()
                .find(|a| a.2 == "exited" || a.2 == "failed")
                .map(|a| (a.0, a.1, a.2)))
        })
        .and_then(|(a, n, state)| {
            ensure!(
                state == "exited",
                "the batch job in the mesh: {state}: {}",
                fleet
                    .cli_ok(&["ps", "once", "-o", "json"])
                    .unwrap_or_default()
            );
            Ok((a, n))
        })?;
    let once_dir = mesh_dir(fleet, &once_node, &once)?;
    fleet.wait_for(
        "the batch job's sidecar gone",
        Duration::from_secs(10),
        |_| Ok(!once_dir.exists()),
    )?;

    // Stopping a job stops its sidecars and removes what they had.
    fleet.cli_ok(&["stop", "client"])?;
    fleet.wait_for("the client's sidecar gone", Duration::from_secs(20), |_| {
        Ok(!cdir.exists())
    })?;
    Ok(())
}

fn stop(child: &mut std::process::Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = child.wait();
}
