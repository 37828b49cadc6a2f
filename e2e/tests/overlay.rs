//! The overlay network end to end on the netns fleet (needs root): containers get addresses
//! from their node's pod subnet and reach each other across hosts through WireGuard (this
//! machine has no WireGuard module, so the userspace tunnel), the underlay carries only
//! WireGuard UDP, hosts leaving and agents restarting are handled, a full subnet is a
//! scheduling error, and the tunnel talks to Debian's wireguard-go configured with `wg`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use skiff_e2e::fleet::{Fleet, can_run, serial};

const GRACE: &str = "3s";

fn web(fleet: &Fleet, name: &str, replicas: u32) -> Result<std::path::PathBuf> {
    fleet.spec(
        name,
        &format!(
            "name = \"{name}\"\nreplicas = {replicas}\nimage = \"{}\"\n\
             command = [\"/bin/httpd\"]\nargs = [\"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             stop_signal = \"SIGKILL\"\n[resources]\ncpu = 0.05\nmemory = \"16Mi\"\n",
            fleet.image()
        ),
    )
}

/// One running allocation: id, node, ip.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Alloc {
    id: String,
    node: String,
    ip: String,
}

fn running_with_ips(fleet: &Fleet, job: &str) -> Result<Vec<Alloc>> {
    let ps = fleet.cli_json(&["ps", job])?;
    Ok(ps
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["status"] == "running" && a["ip"].as_str().is_some_and(|s| !s.is_empty()))
        .map(|a| Alloc {
            id: a["id"].as_str().unwrap_or_default().to_owned(),
            node: a["node"].as_str().unwrap_or_default().to_owned(),
            ip: a["ip"].as_str().unwrap_or_default().to_owned(),
        })
        .collect())
}

fn on(allocs: &[Alloc], node: &str) -> Result<Alloc> {
    allocs
        .iter()
        .find(|a| a.node == node)
        .cloned()
        .with_context(|| format!("no allocation on {node}: {allocs:?}"))
}

/// `skiff exec ALLOC -- args`: (exit code, stdout + stderr).
fn exec(fleet: &Fleet, alloc: &str, args: &[&str]) -> Result<(i32, String)> {
    let mut all = vec!["exec", alloc, "--"];
    all.extend_from_slice(args);
    let out = fleet.cli(&all)?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// 6 MiB of random bytes written in `to`'s container and fetched over HTTP from `from`'s: the
/// same SHA-256 at both ends.
fn bulk_transfer(fleet: &Fleet, from: &Alloc, to: &Alloc) -> Result<()> {
    let (code, made) = exec(
        fleet,
        &to.id,
        &[
            "sh",
            "-c",
            "dd if=/dev/urandom of=/www/bulk bs=64k count=96 2>/dev/null && sha256sum /www/bulk",
        ],
    )?;
    ensure!(code == 0, "making the bulk file on {}: {made}", to.node);
    let want = made
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let (code, got) = exec(
        fleet,
        &from.id,
        &[
            "sh",
            "-c",
            &format!("wget -q -O - http://{}:8080/bulk | sha256sum", to.ip),
        ],
    )?;
    ensure!(
        code == 0 && got.split_whitespace().next() == Some(want.as_str()),
        "6 MiB from {} to {}: sha256 {got:?}, sent {want}",
        to.node,
        from.node
    );
    Ok(())
}

fn ping(fleet: &Fleet, from: &Alloc, to: &str) -> Result<()> {
    let (code, out) = exec(fleet, &from.id, &["ping", "-c", "2", "-W", "2", to])?;
    ensure!(
        code == 0 && out.contains("2 packets received"),
        "ping {to} from {} on {}: exit {code}: {out}",
        from.ip,
        from.node
    );
    Ok(())
}

fn fetch(fleet: &Fleet, from: &Alloc, url: &str) -> Result<String> {
    let (code, out) = exec(
        fleet,
        &from.id,
        &["timeout", "10", "wget", "-q", "-O", "-", url],
    )?;
    ensure!(
        code == 0,
        "wget {url} from {}: exit {code}: {out}",
        from.node
    );
    Ok(out)
}

/// Node name -> (subnet, public key) from `skiff nodes -o json`.
fn node_keys(fleet: &Fleet) -> Result<BTreeMap<String, (String, String)>> {
    let nodes = fleet.cli_json(&["nodes"])?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_owned(),
                (
                    n["subnet"].as_str().unwrap_or_default().to_owned(),
                    n["wireguard"]["public_key"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                ),
            )
        })
        .collect())
}

fn in_subnet(ip: &str, subnet: &str) -> bool {
    // /24 subnets: the first three octets match.
    let prefix = subnet.rsplit_once('.').map(|p| p.0).unwrap_or_default();
    ip.rsplit_once('.').map(|p| p.0) == Some(prefix)
}

#[test]
fn o10_cross_host_traffic_is_encrypted_and_survives_agent_restarts() -> Result<()> {
    if !can_run()
        || !skiff_testkit::require(&[
            skiff_testkit::tool("tcpdump", "tcpdump"),
            skiff_testkit::tool("wg", "wireguard-tools"),
            skiff_testkit::tool("curl", "curl"),
        ])
    {
        return Ok(());
    }
    let _serial = serial();
    let mut fleet = Fleet::start(1, 3, GRACE)?;
    let res = cross_host(&mut fleet);
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(30));
    }
    res
}

fn cross_host(fleet: &mut Fleet) -> Result<()> {
    let spec = web(fleet, "web", 3)?;
    fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
    fleet.wait_for("3 replicas with addresses", Duration::from_secs(30), |f| {
        Ok(running_with_ips(f, "web")?.len() == 3)
    })?;
    let allocs = running_with_ips(fleet, "web")?;
    let keys = node_keys(fleet)?;
    for a in &allocs {
        let (subnet, key) = &keys[&a.node];
        ensure!(
            in_subnet(&a.ip, subnet),
            "{} on {} is outside {subnet}",
            a.ip,
            a.node
        );
        ensure!(key.len() == 44, "{} has no WireGuard key: {keys:?}", a.node);
    }
    let a1 = on(&allocs, "a1")?;
    let a2 = on(&allocs, "a2")?;
    let a3 = on(&allocs, "a3")?;

    // Each agent has the two others as peers, allowed-ips = their subnets.
    fleet.wait_for(
        "every agent to peer with the others",
        Duration::from_secs(20),
        |f| {
            for agent in ["a1", "a2", "a3"] {
                if f.wg_peers(agent)?.len() != 2 {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    let dump = fleet.wg_dump("a1")?;
    ensure!(
        dump.contains(&keys["a2"].1) && dump.contains(&keys["a2"].0),
        "{dump}"
    );

    // The pod MTU leaves room for WireGuard's 80 bytes on the 1500-byte underlay.
    let (_, mtu) = exec(fleet, &a1.id, &["cat", "/sys/class/net/eth0/mtu"])?;
    ensure!(mtu.trim() == "1420", "eth0 MTU {mtu}");
    let (_, route) = exec(fleet, &a1.id, &["ip", "route"])?;
    ensure!(
        route.contains(&format!(
            "default via {}",
            keys["a1"].0.replace(".0/24", ".1")
        )),
        "{route}"
    );

    // Across hosts by IP: ping and a TCP request.
    ping(fleet, &a1, &a2.ip)?;
    ping(fleet, &a2, &a3.ip)?;
    let page = fetch(fleet, &a1, &format!("http://{}:8080/", a2.ip))?;
    ensure!(page.contains("hello from skiff"), "{page}");

    // Bulk TCP both ways, checked byte for byte: the userspace tunnel cuts the TUN device's
    // super-packets (TSO) into wire packets and joins them back on the other side.
    for (from, to) in [(&a1, &a2), (&a2, &a1)] {
        bulk_transfer(fleet, from, to)?;
    }
    // One TUN queue (and one socket of the listen port) per core, each read by its own
    // thread.
    let queues = std::thread::available_parallelism().map_or(1, |n| n.get().min(16));
    for agent in ["a1", "a2"] {
        let log = std::fs::read_to_string(fleet.agent_data(agent)?.join("net/wg/tunnel.log"))?;
        let link = fleet.on_host(agent, &["ip", "-d", "link", "show", "dev", "skiff-wg"])?;
        let link = String::from_utf8_lossy(&link.stdout);
        ensure!(
            link.contains(&format!("multi_queue numqueues {queues} ")),
            "{agent}'s skiff-wg should have {queues} queues: {link}"
        );
        ensure!(
            log.contains(&format!("queues: {queues}"))
                && log.contains("TUN offloads (TSO, checksum): on")
                && log.contains("first super-packet from the TUN device")
                && log.contains("first joined write to the TUN device")
                && !log.contains("dropped a packet"),
            "{agent}'s tunnel ran without offloads or dropped packets:\n{log}"
        );
    }

    // The underlay between a1 and a2 carries only WireGuard UDP; a marker sent between the
    // containers never shows in clear text.
    let h1 = fleet.host("a1")?.addr.clone();
    let h2 = fleet.host("a2")?.addr.clone();
    let pcap = fleet.dir().join("underlay.pcap");
    let mut tcpdump = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}-a1", fleet.prefix))
        .args(["--", "tcpdump", "-i", "eth0", "-U", "-n", "-s", "0", "-w"])
        .arg(&pcap)
        .args(["host", &h1, "and", "host", &h2])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("tcpdump")?;
    // Wait for it to listen (it says so on stderr).
    let mut err = BufReader::new(tcpdump.stderr.take().context("tcpdump stderr")?);
    let mut line = String::new();
    err.read_line(&mut line)?;
    ensure!(line.contains("listening"), "tcpdump: {line}");
    let marker = format!("SKIFF-MARKER-{}", std::process::id());
    let (code, out) = exec(
        fleet,
        &a1.id,
        &[
            "timeout",
            "10",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{}:8080/{marker}", a2.ip),
        ],
    )?;
    ensure!(
        code != 0 && out.contains("404"),
        "expected a 404 for the marker: {out}"
    );
    ping(fleet, &a2, &a1.ip)?;
    // SIGINT flushes and ends the capture.
    skiff_e2e::signal(tcpdump.id() as i32, Signal::SIGINT);
    tcpdump.wait()?;
    let raw = std::fs::read(&pcap)?;
    ensure!(
        !raw.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker crossed the underlay in clear text"
    );
    let read = Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(&pcap)
        .output()?;
    let text = String::from_utf8_lossy(&read.stdout);
    let lines: Vec<&str> = text.lines().collect();
    ensure!(lines.len() >= 8, "too few packets captured: {text}");
    for l in &lines {
        ensure!(
            l.contains(&format!("{h1}.51820 > {h2}.51820: UDP"))
                || l.contains(&format!("{h2}.51820 > {h1}.51820: UDP")),
            "not WireGuard UDP on the underlay: {l}"
        );
    }
    eprintln!(
        "underlay: {} packets, all WireGuard UDP, no marker",
        lines.len()
    );

    // WireGuard state: in `skiff nodes -o json` (handshakes, bytes) and the agent's /metrics.
    let node_a1 = |nodes: serde_json::Value| {
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == "a1")
            .cloned()
            .unwrap_or_default()
    };
    fleet.wait_for("a1's peer state reported", Duration::from_secs(10), |f| {
        let n1 = node_a1(f.cli_json(&["nodes", "--peers"])?);
        let peers = n1["wireguard"]["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // Without --peers: only their counts (the full lists are N x N in all).
        let b1 = node_a1(f.cli_json(&["nodes"])?);
        Ok(n1["wireguard"]["backend"] == "userspace"
            && b1["wireguard"]["peer_count"] == 2
            && b1["wireguard"]["peers_handshaken"].as_u64().unwrap_or(0) >= 1
            && b1["wireguard"]["peers"].is_null()
            && peers.len() == 2
            && peers.iter().any(|p| {
                p["node"] == "a2"
                    && p["last_handshake_unix"].as_i64().unwrap_or(0) > 0
                    && p["rx_bytes"].as_u64().unwrap_or(0) > 0
            }))
    })?;
    let metrics = fleet.on_host(
        "cli",
        &["curl", "-sf", &format!("http://{h1}:7802/metrics")],
    )?;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    ensure!(
        metrics.contains("skiff_agent_wireguard_peers 2"),
        "{metrics}"
    );
    ensure!(
        metrics.contains("skiff_agent_wireguard_peer_last_handshake_seconds{peer=\"a2\""),
        "{metrics}"
    );
    ensure!(
        metrics.contains("skiff_agent_wireguard_info{backend=\"userspace\""),
        "{metrics}"
    );

    // An agent restart: the tunnel is a process of its own and keeps carrying traffic while
    // the agent is down; the containers keep their addresses.
    let tunnel = fleet
        .tunnel_pid("a1")?
        .context("a1 has no tunnel process")?;
    fleet.kill_agent("a1")?;
    ping(fleet, &a2, &a1.ip)?;
    fleet.restart_agent("a1")?;
    fleet.wait_for("a1 to report again", Duration::from_secs(20), |f| {
        Ok(f.log("a1").matches("registered").count() >= 2)
    })?;
    ensure!(
        fleet.tunnel_pid("a1")? == Some(tunnel),
        "the tunnel was restarted with the agent"
    );
    let after = running_with_ips(fleet, "web")?;
    ensure!(
        on(&after, "a1")? == a1,
        "a1's allocation changed: {after:?}"
    );
    ping(fleet, &a3, &a1.ip)?;

    // The tunnel process is supervised: killed, it is restarted and reconfigured.
    skiff_e2e::signal(tunnel, Signal::SIGKILL);
    fleet.wait_for("a1's tunnel to come back", Duration::from_secs(15), |f| {
        Ok(f.tunnel_pid("a1")?.is_some_and(|p| p != tunnel) && f.wg_peers("a1")?.len() == 2)
    })?;
    fleet.wait_for(
        "traffic through the new tunnel",
        Duration::from_secs(15),
        |f| Ok(ping(f, &a2, &a1.ip).is_ok()),
    )?;

    // A host that leaves (agent and tunnel gone) is removed from every peer list.
    let gone_key = keys["a3"].1.clone();
    fleet.kill_agent("a3")?;
    if let Some(p) = fleet.tunnel_pid("a3")? {
        skiff_e2e::signal(p, Signal::SIGKILL);
    }
    fleet.wait_for(
        "a3 out of a1's and a2's peers",
        Duration::from_secs(20),
        |f| {
            for agent in ["a1", "a2"] {
                let peers = f.wg_peers(agent)?;
                if peers.len() != 1 || peers.iter().any(|p| p.0 == gone_key) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    // Its replacement runs on a1 or a2 and is reachable.
    fleet.wait_for("3 replicas again", Duration::from_secs(30), |f| {
        Ok(running_with_ips(f, "web")?
            .iter()
            .filter(|a| a.node != "a3")
            .count()
            == 3)
    })?;
    ping(fleet, &a1, &a2.ip)?;

    // The operator forgets the dead host: `skiff node rm` frees its subnet and it leaves the
    // node list (a live node is refused: see the cluster test).
    let removed = fleet.cli_ok(&["node", "rm", "a3"])?;
    ensure!(
        removed.trim() == format!("node a3 removed; pod subnet {} released", keys["a3"].0),
        "node rm: {removed}"
    );
    ensure!(
        !node_keys(fleet)?.contains_key("a3"),
        "a3 still listed after node rm"
    );

    // The host comes back re-installed (a new key; `node rm` revoked its certificate, so it
    // enrolls again with its join token): it registers afresh (the lowest free subnet is its
    // old one) and its peer is replaced everywhere.
    std::fs::remove_file(fleet.agent_data("a3")?.join("net/wg/private.key"))?;
    std::fs::remove_dir_all(fleet.agent_data("a3")?.join("tls"))?;
    fleet.restart_agent("a3")?;
    let mut new_key = String::new();
    fleet.wait_for("a3's new key on a1 and a2", Duration::from_secs(20), |f| {
        let Some((subnet, key)) = node_keys(f)?.remove("a3") else {
            return Ok(false);
        };
        ensure!(subnet == keys["a3"].0, "a3 came back with subnet {subnet}");
        new_key = key;
        if new_key == gone_key {
            return Ok(false);
        }
        for agent in ["a1", "a2"] {
            let peers = f.wg_peers(agent)?;
            if peers.len() != 2
                || peers.iter().any(|p| p.0 == gone_key)
                || !peers.iter().any(|p| p.0 == new_key)
            {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    let a3_gateway = format!("{}.1", keys["a3"].0.rsplit_once('.').context("subnet")?.0);
    fleet.wait_for(
        "a1's container to reach a3 again",
        Duration::from_secs(15),
        |f| Ok(ping(f, &a1, &a3_gateway).is_ok()),
    )?;
    Ok(())
}

#[test]
fn o20_a_full_pod_subnet_is_a_scheduling_error() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    // A /29 per node: 5 container addresses.
    let fleet = Fleet::start_with(1, 1, GRACE, &["--node-subnet-prefix", "29"])?;
    let res = (|| -> Result<()> {
        let spec = web(&fleet, "many", 7)?;
        fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
        fleet.wait_for(
            "5 running and a pending reason",
            Duration::from_secs(30),
            |f| {
                let status = f.cli_json(&["job", "status", "many"])?;
                let pending = status["pending"].as_str().unwrap_or_default().to_owned();
                Ok(running_with_ips(f, "many")?.len() == 5
                    && pending.contains("no free pod address (subnet 10.42.0.0/29 full)"))
            },
        )?;
        let ips: std::collections::BTreeSet<String> = running_with_ips(&fleet, "many")?
            .into_iter()
            .map(|a| a.ip)
            .collect();
        ensure!(ips.len() == 5, "addresses handed out twice: {ips:?}");
        // The agent and the controller are fine: scaling down clears it, and the addresses
        // of the removed containers are released (one file per address in use).
        fleet.cli_ok(&["scale", "many", "4"])?;
        let ipam = fleet.agent_data("a1")?.join("net/ipam/10.42.0.0_29");
        fleet.wait_for(
            "no pending reason, 4 addresses held",
            Duration::from_secs(20),
            |f| {
                let status = f.cli_json(&["job", "status", "many"])?;
                let held = std::fs::read_dir(&ipam)?
                    .flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count();
                Ok(status["pending"].as_str().unwrap_or_default().is_empty()
                    && running_with_ips(f, "many")?.len() == 4
                    && held == 4)
            },
        )?;
        Ok(())
    })();
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(30));
    }
    res
}

/// A node that is not an agent: registers with a WireGuard key (as a peer run by wireguard-go)
/// from inside the `cli` host's network namespace, is drained (nothing scheduled on it), and
/// heartbeats until `stop`. Sends its pod subnet once registered.
#[allow(clippy::too_many_arguments)]
fn fake_node(
    netns: String,
    controller: String,
    token: String,
    admin: std::path::PathBuf,
    address: String,
    public_key: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    subnet: std::sync::mpsc::Sender<Result<String>>,
) -> std::thread::JoinHandle<()> {
    use skiff_proto::v1 as pb;
    std::thread::spawn(move || {
        let run = || -> Result<()> {
            skiff_e2e::enter_netns(&netns)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                // The node enrolls with a join token, as an agent does; the drain is an
                // operator's call, made with the fleet's admin credentials.
                let token: skiff_tls::JoinToken = token.parse()?;
                let m = skiff_tls::enroll::join(
                    &controller,
                    &token,
                    "wgx",
                    0,
                    std::slice::from_ref(&address),
                )
                .await?;
                let node = skiff_tls::Credentials::of("wgx", "node", &m);
                let ep = skiff_tls::net::endpoint(&controller)?;
                let mut c = pb::nodes_client::NodesClient::new(
                    skiff_tls::net::channel_with(node.client_config()?, ep.clone()).await?,
                );
                let admin = skiff_tls::Credentials::load(&admin)?;
                let mut op = pb::nodes_client::NodesClient::new(
                    skiff_tls::net::channel_with(admin.client_config()?, ep).await?,
                );
                let r = c
                    .register(pb::RegisterNodeRequest {
                        name: "wgx".into(),
                        address: address.clone(),
                        labels: Default::default(),
                        resources: Some(pb::NodeResources {
                            cpu: 1.0,
                            memory: 1 << 30,
                            pids: 100,
                        }),
                        agent_addr: String::new(),
                        metrics_addr: String::new(),
                        wireguard: Some(pb::WireguardIdentity {
                            public_key,
                            endpoint: format!("{address}:51820"),
                            backend: skiff_proto::v1::WireguardBackend::Userspace as i32,
                        }),
                        host_volume_dirs: Vec::new(),
                        capabilities: Vec::new(),
                    })
                    .await?
                    .into_inner();
                op.set_drain(pb::SetDrainRequest {
                    name: "wgx".into(),
                    drain: true,
                })
                .await?;
                let _ = subnet.send(Ok(r.subnet));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.heartbeat(pb::HeartbeatRequest {
                        name: "wgx".into(),
                        allocations: vec![],
                        wireguard: None,
                        trust_version: 0,
                        named_volumes: Vec::new(),
                        request_stats: Vec::new(),
                        usage: Vec::new(),
                        disk_pressure: false,
                    })
                    .await?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Ok::<(), anyhow::Error>(())
            })
        };
        if let Err(e) = run() {
            let _ = subnet.send(Err(e));
        }
    })
}

#[test]
fn o30_userspace_tunnel_talks_to_wireguard_go() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    if !skiff_testkit::require(&[
        skiff_testkit::tool("wireguard-go", "wireguard-go"),
        skiff_testkit::tool("wg", "wireguard-tools"),
    ]) {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start(1, 1, GRACE)?;
    let mut wgo: Option<std::process::Child> = None;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let res = interop(&fleet, &mut wgo, &stop);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(mut c) = wgo {
        // The whole group: the shell, wireguard-go and the dump loop.
        skiff_e2e::signal(-(c.id() as i32), Signal::SIGKILL);
        let _ = c.wait();
    }
    if res.is_err() {
        eprintln!("{}", fleet.log_tails(30));
        eprintln!(
            "--- wireguard-go\n{}\n--- its wg dump\n{}\n--- a1's wg dump\n{}\n--- a1's tunnel.log\n{}",
            std::fs::read_to_string(fleet.dir().join("wgx.log")).unwrap_or_default(),
            std::fs::read_to_string(fleet.dir().join("wgx.dump")).unwrap_or_default(),
            fleet.wg_dump("a1").unwrap_or_default(),
            fleet
                .agent_data("a1")
                .map(|d| std::fs::read_to_string(d.join("net/wg/tunnel.log")).unwrap_or_default())
                .unwrap_or_default()
        );
    }
    res
}

fn interop(
    fleet: &Fleet,
    wgo: &mut Option<std::process::Child>,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    let spec = web(fleet, "web", 1)?;
    fleet.cli_ok(&["apply", "-f", &spec.display().to_string()])?;
    fleet.wait_for(
        "the replica with an address",
        Duration::from_secs(30),
        |f| Ok(running_with_ips(f, "web")?.len() == 1),
    )?;
    let target = running_with_ips(fleet, "web")?.remove(0);
    let keys = node_keys(fleet)?;
    let (a1_subnet, a1_key) = keys["a1"].clone();

    // wireguard-go's key pair, by `wg`.
    let private = Command::new("wg").arg("genkey").output()?.stdout;
    let key_file = fleet.dir().join("wgx.key");
    std::fs::write(&key_file, &private)?;
    let mut pubkey = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut pubkey.stdin.take().context("stdin")?, &private)?;
    let public = String::from_utf8(pubkey.wait_with_output()?.stdout)?
        .trim()
        .to_owned();

    let cli = fleet.host("cli")?.clone();
    let a1 = fleet.host("a1")?.addr.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let token = fleet.token("agent")?;
    fake_node(
        cli.netns.clone(),
        format!("{}:7700", fleet.host("c1")?.addr),
        token,
        fleet.credentials(),
        cli.addr.clone(),
        public.clone(),
        stop.clone(),
        tx,
    );
    let subnet = rx.recv_timeout(Duration::from_secs(10))??;
    let gw = format!("{}.1", subnet.rsplit_once('.').context("subnet")?.0);

    // wireguard-go on the cli host, configured with wg (its socket in a private /run).
    let dump = fleet.dir().join("wgx.dump");
    let script = format!(
        "set -e\n\
         mount -t tmpfs skiffwgx /run\n\
         mkdir -p /run/wireguard\n\
         WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f wgx0 >>{log} 2>&1 &\n\
         WGPID=$!\n\
         for i in $(seq 200); do [ -S /run/wireguard/wgx0.sock ] && break; sleep 0.05; done\n\
         wg set wgx0 private-key {key} listen-port 51820 peer {a1_key} endpoint {a1}:51820 \
            allowed-ips {a1_subnet} persistent-keepalive 1\n\
         ip addr add {gw}/32 dev wgx0\n\
         ip link set wgx0 mtu 1420 up\n\
         ip route add {a1_subnet} dev wgx0 src {gw}\n\
         echo READY\n\
         while kill -0 $WGPID 2>/dev/null; do wg show wgx0 dump > {dump}.tmp && mv {dump}.tmp {dump}; sleep 0.3; done\n",
        log = fleet.dir().join("wgx.log").display(),
        key = key_file.display(),
        dump = dump.display(),
    );
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", cli.netns))
        .args(["--", "unshare", "-m", "sh", "-c", &script])
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    *wgo = Some(child);
    let mut line = String::new();
    out.read_line(&mut line)?;
    ensure!(line.trim() == "READY", "wireguard-go setup: {line:?}");

    // The agent peers with it (from the controllers), and traffic flows both ways.
    fleet.wait_for(
        "a1 to peer with wireguard-go",
        Duration::from_secs(15),
        |f| Ok(f.wg_peers("a1")?.iter().any(|p| p.0 == public)),
    )?;
    fleet.wait_for(
        "ping from behind wireguard-go",
        Duration::from_secs(15),
        |f| {
            Ok(f.on_host(
                "cli",
                &[
                    "busybox", "ping", "-c", "1", "-W", "1", "-I", &gw, &target.ip,
                ],
            )?
            .status
            .success())
        },
    )?;
    ping(fleet, &target, &gw)?;
    let (code, page) = {
        let o = fleet.on_host(
            "cli",
            &[
                "curl",
                "-sf",
                "--interface",
                &gw,
                &format!("http://{}:8080/", target.ip),
            ],
        )?;
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    ensure!(
        code == 0 && page.contains("hello from skiff"),
        "curl through wireguard-go: {code} {page}"
    );
    // Both ends saw a handshake.
    let theirs = std::fs::read_to_string(&dump)?;
    let line = theirs
        .lines()
        .find(|l| l.starts_with(&a1_key))
        .with_context(|| format!("wireguard-go has no peer {a1_key}: {theirs}"))?;
    let handshake: i64 = line.split('\t').nth(4).unwrap_or("0").parse()?;
    ensure!(handshake > 0, "wireguard-go saw no handshake: {line}");
    let ours = fleet.wg_peers("a1")?;
    ensure!(
        ours.iter().any(|p| p.0 == public && p.2 > 0),
        "the agent saw no handshake: {ours:?}"
    );

    // It stops heartbeating: down after the grace, and out of the agent's peers.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    fleet.wait_for(
        "wireguard-go's node out of a1's peers",
        Duration::from_secs(20),
        |f| Ok(!f.wg_peers("a1")?.iter().any(|p| p.0 == public)),
    )?;
    Ok(())
}
