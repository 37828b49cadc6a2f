//! Security end to end on a fleet (3 controllers, 2 agents, real binaries, mutual TLS on
//! every connection): TLS 1.3 with the cluster CA seen by `openssl s_client` on the
//! controller and agent ports, roles enforced on the agent API (a reader cannot exec),
//! revocation, the device policy inside a cluster job (and a granted device), certificate
//! renewal under a running workload without a failed heartbeat, and a CA rotation.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use skiff_e2e::fleet::{Fleet, can_run, serial};

/// Node and member certificates live 60 s here, so they renew every 40 s.
const CERT_TTL: &str = "60s";

fn creds_pem(fleet: &Fleet) -> Result<std::path::PathBuf> {
    let c = skiff_tls::Credentials::load(&fleet.credentials())?;
    let ca = fleet.dir().join("ca.pem");
    std::fs::write(&ca, &c.ca)?;
    std::fs::write(fleet.dir().join("admin.pem"), &c.cert)?;
    std::fs::write(fleet.dir().join("admin.key"), &c.key)?;
    Ok(ca)
}

/// `openssl s_client` from the cli host: TLS 1.3, the server's certificate verified against
/// the cluster CA for the IP dialled.
fn s_client(fleet: &Fleet, ip: &str, port: u16) -> Result<String> {
    let ca = creds_pem(fleet)?;
    let d = fleet.dir();
    let out = fleet.on_host(
        "cli",
        &[
            "sh",
            "-c",
            &format!(
                "openssl s_client -connect {ip}:{port} -tls1_3 -CAfile {} -cert {} -key {} \
                 -alpn h2 -verify_ip {ip} -verify_return_error -brief </dev/null 2>&1",
                ca.display(),
                d.join("admin.pem").display(),
                d.join("admin.key").display()
            ),
        ],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Certificates by identity (`node a1`), from `skiff credentials ls`.
fn certs(fleet: &Fleet) -> Result<Vec<serde_json::Value>> {
    let v = fleet.cli_json(&["credentials", "ls"])?;
    Ok(v["certificates"].as_array().cloned().unwrap_or_default())
}

fn serials_of(certs: &[serde_json::Value], identity: &str) -> Vec<String> {
    certs
        .iter()
        .filter(|c| c["identity"] == identity)
        .filter_map(|c| c["serial"].as_str().map(String::from))
        .collect()
}

#[test]
fn s10_tls_roles_devices_renewal_and_ca_rotation() -> Result<()> {
    if !can_run() || !skiff_testkit::require(&[skiff_testkit::tool("openssl", "openssl")]) {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start_full(
        3,
        2,
        "5s",
        &["--cert-ttl", CERT_TTL],
        &["--allow-device", "/dev/fuse"],
    )?;
    let res = (|| -> Result<()> {
        // Both kinds of port speak TLS 1.3 with certificates of the cluster CA.
        for (host, port, cn) in [("c1", 7700, "member 1"), ("a1", 7801, "node a1")] {
            let ip = fleet.host(host)?.addr.clone();
            let text = s_client(&fleet, &ip, port)?;
            ensure!(text.contains("Protocol version: TLSv1.3"), "{host}: {text}");
            ensure!(text.contains("Verification: OK"), "{host}: {text}");
            ensure!(text.contains(&format!("CN = {cn}")), "{host}: {text}");
        }

        // A job that asks for a device the agents allow, and tries one it did not get.
        let spec = fleet.spec(
            "dev",
            &format!(
                "name = \"dev\"\nreplicas = 2\nimage = \"{}\"\ncommand = [\"/bin/sleep\"]\n\
                 args = [\"3600\"]\nstop_signal = \"SIGKILL\"\n[[devices]]\npath = \"/dev/fuse\"\n\
                 permissions = \"r\"\n[resources]\ncpu = 0.1\nmemory = \"32Mi\"\n",
                fleet.image()
            ),
        )?;
        fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
        fleet.wait_for("two running replicas", Duration::from_secs(60), |f| {
            Ok(f.allocations("dev")?
                .iter()
                .filter(|(_, _, s)| s == "running")
                .count()
                == 2)
        })?;
        let (alloc, _, _) = fleet
            .allocations("dev")?
            .into_iter()
            .next()
            .context("alloc")?;
        let sh = |script: &str| fleet.cli(&["exec", &alloc, "--", "sh", "-c", script]);
        let ok = sh(
            "head -c 8 /dev/urandom | wc -c && head -c 4 /dev/zero | wc -c && \
                     echo x >/dev/null && test -c /dev/fuse && test -c /dev/ptmx",
        )?;
        ensure!(
            ok.status.success(),
            "default devices: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let loop_dev = sh("mknod /tmp/d b 7 0 && head -c 16 /tmp/d")?;
        ensure!(
            !loop_dev.status.success(),
            "a loop device was created and read"
        );
        let tun = sh("mknod /tmp/t c 10 200 && cat /tmp/t")?;
        ensure!(
            !tun.status.success(),
            "a device the job was not granted was opened"
        );

        // Roles: a reader reads, cannot exec or apply; revoked, it cannot read either.
        let ro = fleet.dir().join("reader.creds");
        fleet.cli_ok(&[
            "credentials",
            "create",
            "ro",
            "--role",
            "reader",
            "--out",
            &ro.display().to_string(),
        ])?;
        let out = fleet.cli_with(&ro, &["ps", "dev"])?;
        ensure!(
            out.status.success(),
            "reader ps: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = fleet.cli_with(&ro, &["exec", &alloc, "--", "true"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("reader ro may not call /skiff.v1.Agent/Exec"),
            "reader exec: {err}"
        );
        let out = fleet.cli_with(&ro, &["scale", "dev", "5"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("may not call"),
            "reader scale: {err}"
        );
        fleet.cli_ok(&["credentials", "revoke", "--identity", "user/reader/ro"])?;
        let out = fleet.cli_with(&ro, &["ps", "dev"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("revoked"),
            "revoked reader: {err}"
        );
        ensure!(
            fleet.allocations("dev")?.len() == 2,
            "the reader changed nothing"
        );

        // Renewal under the running workload: every node and member gets a new certificate
        // (60 s life, renewed at 40 s) and no heartbeat fails meanwhile.
        let first = certs(&fleet)?;
        let started = std::time::Instant::now();
        fleet.wait_for(
            "every node and member renewed",
            Duration::from_secs(90),
            |f| {
                let now = certs(f)?;
                Ok(["node a1", "node a2", "member 1", "member 2", "member 3"]
                    .iter()
                    .all(|id| {
                        serials_of(&now, id)
                            .iter()
                            .any(|s| !serials_of(&first, id).contains(s))
                    }))
            },
        )?;
        eprintln!("renewed within {:?}", started.elapsed());
        for a in ["a1", "a2"] {
            let log = fleet.log(a);
            ensure!(
                log.contains("renewed the node's certificate"),
                "{a} did not renew"
            );
            ensure!(
                !log.contains("controller connection lost"),
                "{a} lost its controller:\n{log}"
            );
        }
        let out = fleet.cli(&["exec", &alloc, "--", "true"])?;
        ensure!(
            out.status.success(),
            "exec after renewal: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(fleet.ready_nodes()?.len() == 2, "a node went down");

        // CA rotation: a new CA issues; nodes and members renew at once; the old CA is
        // retired once nothing it issued is in use (here: new admin credentials first).
        fleet.cli_ok(&["ca", "rotate"])?;
        fleet.wait_for(
            "nodes and members on the new CA",
            Duration::from_secs(60),
            |f| {
                let now = certs(f)?;
                Ok(["node a1", "node a2", "member 1", "member 2", "member 3"]
                    .iter()
                    .all(|id| {
                        now.iter().any(|c| {
                            c["identity"] == *id && c["ca"] == "active" && c["revoked"] == false
                        })
                    }))
            },
        )?;
        let out = fleet.cli(&["ca", "retire"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("still valid"),
            "retire too early: {err}"
        );
        let admin2 = fleet.dir().join("admin2.creds");
        fleet.cli_ok(&[
            "credentials",
            "create",
            "admin2",
            "--role",
            "admin",
            "--out",
            &admin2.display().to_string(),
        ])?;
        let ok = |args: &[&str]| -> Result<String> {
            let out = fleet.cli_with(&admin2, args)?;
            ensure!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        // Every node and member has a certificate of the new CA; the old admin's is the last
        // of the old CA in use: revoke it, then the old CA can go.
        ok(&["credentials", "revoke", "--identity", "user/admin/admin"])?;
        ok(&["ca", "retire"])?;
        fleet.wait_for(
            "the workload still served after the rotation",
            Duration::from_secs(30),
            |_| {
                let out = fleet.cli_with(&admin2, &["exec", &alloc, "--", "true"])?;
                Ok(out.status.success())
            },
        )?;
        let nodes = ok(&["nodes", "-o", "json"])?;
        ensure!(
            nodes.matches("\"ready\"").count() >= 2,
            "nodes after rotation: {nodes}"
        );
        let old = fleet.cli(&["ps", "dev"])?;
        ensure!(
            !old.status.success(),
            "the old admin still works after revocation and retirement"
        );
        Ok(())
    })();
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(40));
    }
    res
}
