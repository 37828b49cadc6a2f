//! Commands about where things run: nodes, allocations, scaling and planning.

use skiff_proto::v1 as pb;

use crate::client::Controllers;
use crate::output::{Out, age, print_table};

fn gib(bytes: u64) -> String {
    format!("{:.1}Gi", bytes as f64 / (1u64 << 30) as f64)
}

pub fn node_json(n: &pb::Node) -> serde_json::Value {
    let res = |r: &Option<pb::NodeResources>| {
        let r = (*r).unwrap_or_default();
        serde_json::json!({"cpu": r.cpu, "memory": r.memory, "pids": r.pids})
    };
    serde_json::json!({
        "name": n.name, "address": n.address, "status": n.status, "labels": n.labels,
        "subnet": n.subnet,
        "wireguard": n.wireguard.as_ref().map(|w| wireguard_json(w, n.wireguard_status.as_ref())),
        "total": res(&n.total), "allocated": res(&n.allocated), "allocations": n.allocations,
        "registered_at_ms": n.registered_at_ms, "status_changed_at_ms": n.status_changed_at_ms,
    })
}

fn wireguard_json(
    w: &pb::WireguardIdentity,
    status: Option<&pb::WireguardStatus>,
) -> serde_json::Value {
    serde_json::json!({
        "public_key": w.public_key, "endpoint": w.endpoint, "backend": w.backend,
        "listen_port": status.map(|s| s.listen_port),
        "peers": status.map(|s| s.peers.iter().map(|p| serde_json::json!({
            "node": p.node, "public_key": p.public_key, "endpoint": p.endpoint,
            "allowed_ips": p.allowed_ips, "last_handshake_unix": p.last_handshake_unix,
            "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes,
            "persistent_keepalive": p.persistent_keepalive,
        })).collect::<Vec<_>>()),
    })
}

/// `userspace 2/2`: the backend, then peers with a handshake in the last 3 minutes / peers.
fn wireguard_cell(n: &pb::Node) -> String {
    let Some(w) = &n.wireguard else {
        return "-".into();
    };
    let Some(s) = &n.wireguard_status else {
        return w.backend.clone();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let fresh = s
        .peers
        .iter()
        .filter(|p| p.last_handshake_unix > 0 && now - p.last_handshake_unix < 180)
        .count();
    format!("{} {fresh}/{}", w.backend, s.peers.len())
}

pub fn allocation_json(a: &pb::Allocation) -> serde_json::Value {
    serde_json::json!({
        "id": a.id, "namespace": a.namespace, "job": a.job, "job_version": a.job_version,
        "node": a.node, "ip": a.ip, "health": a.health, "health_output": a.health_output,
        "desired": a.desired, "status": a.observed, "restarts": a.restarts,
        "exit_code": a.exit_code, "reason": a.reason, "created_at_ms": a.created_at_ms,
    })
}

pub async fn nodes(ctl: &Controllers, out: Out, stale: bool) -> anyhow::Result<()> {
    let req = pb::ListNodesRequest {
        read: Some(pb::ReadOptions { stale }),
    };
    let resp = ctl
        .nodes(|mut c| async move { c.list_nodes(req).await })
        .await?;
    if out.json {
        return out.json(&resp.nodes.iter().map(node_json).collect::<Vec<_>>());
    }
    let rows = resp
        .nodes
        .iter()
        .map(|n| {
            let t = n.total.unwrap_or_default();
            let a = n.allocated.unwrap_or_default();
            let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                n.name.clone(),
                n.address.clone(),
                n.subnet.clone(),
                n.status.clone(),
                n.allocations.to_string(),
                format!("{:.2}/{:.2}", a.cpu, t.cpu),
                format!("{}/{}", gib(a.memory), gib(t.memory)),
                wireguard_cell(n),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
                },
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "ADDRESS",
            "SUBNET",
            "STATUS",
            "ALLOCS",
            "CPU",
            "MEMORY",
            "WIREGUARD",
            "LABELS",
        ],
        rows,
    );
    Ok(())
}

pub async fn drain(ctl: &Controllers, out: Out, name: String, drain: bool) -> anyhow::Result<()> {
    let req = pb::SetDrainRequest { name, drain };
    let resp = ctl
        .nodes(|mut c| {
            let r = req.clone();
            async move { c.set_drain(r).await }
        })
        .await?;
    let node = resp.node.unwrap_or_default();
    if out.json {
        return out.json(&serde_json::json!({"node": node_json(&node), "changed": resp.changed}));
    }
    println!(
        "node {}: {}{}",
        node.name,
        node.status,
        if resp.changed { "" } else { " (unchanged)" }
    );
    Ok(())
}

pub async fn remove_node(ctl: &Controllers, out: Out, name: String) -> anyhow::Result<()> {
    let req = pb::RemoveNodeRequest { name };
    let resp = ctl
        .nodes(|mut c| {
            let r = req.clone();
            async move { c.remove_node(r).await }
        })
        .await?;
    if out.json {
        return out.json(&serde_json::json!({
            "name": resp.name,
            "subnet": resp.subnet,
            "lost": resp.lost,
        }));
    }
    let mut line = format!("node {} removed", resp.name);
    if !resp.subnet.is_empty() {
        line.push_str(&format!("; pod subnet {} released", resp.subnet));
    }
    if resp.lost > 0 {
        line.push_str(&format!(
            "; {} allocation(s) it still held marked lost",
            resp.lost
        ));
    }
    println!("{line}");
    Ok(())
}

pub async fn ps(
    ctl: &Controllers,
    out: Out,
    job: Option<String>,
    namespace: Option<String>,
    all: bool,
) -> anyhow::Result<()> {
    let req = pb::ListAllocationsRequest {
        namespace: namespace.unwrap_or_default(),
        job: job.unwrap_or_default(),
        all,
        read: None,
    };
    let resp = ctl
        .jobs(|mut c| {
            let r = req.clone();
            async move { c.list_allocations(r).await }
        })
        .await?;
    if out.json {
        return out.json(
            &resp
                .allocations
                .iter()
                .map(allocation_json)
                .collect::<Vec<_>>(),
        );
    }
    let rows = resp
        .allocations
        .iter()
        .map(|a| {
            let mut status = a.observed.clone();
            if a.desired == "stop" {
                status = format!("{status} (stopping)");
            }
            if let Some(code) = a.exit_code {
                status = format!("{status} ({code})");
            }
            if !a.health.is_empty() && a.observed == "running" {
                status = format!("{status}, {}", a.health);
            }
            vec![
                a.id.clone(),
                format!("{}/{}", a.namespace, a.job),
                a.job_version.to_string(),
                a.node.clone(),
                if a.ip.is_empty() {
                    "-".into()
                } else {
                    a.ip.clone()
                },
                status,
                a.restarts.to_string(),
                age(a.created_at_ms),
            ]
        })
        .collect();
    print_table(
        &[
            "ALLOCATION",
            "JOB",
            "VERSION",
            "NODE",
            "IP",
            "STATUS",
            "RESTARTS",
            "AGE",
        ],
        rows,
    );
    Ok(())
}

pub async fn scale(
    ctl: &Controllers,
    out: Out,
    name: String,
    namespace: String,
    replicas: u32,
) -> anyhow::Result<()> {
    let req = pb::ScaleJobRequest {
        namespace,
        name,
        replicas,
    };
    let resp = ctl
        .jobs(|mut c| {
            let r = req.clone();
            async move { c.scale_job(r).await }
        })
        .await?;
    if out.json {
        return out.json(&crate::output::apply_json(&resp));
    }
    let job = resp.job.unwrap_or_default();
    if resp.changed {
        println!(
            "job {}/{} scaled to {} (version {})",
            job.namespace, job.name, job.replicas, job.version
        );
    } else {
        println!(
            "job {}/{} already has {} replicas",
            job.namespace, job.name, job.replicas
        );
    }
    Ok(())
}

pub async fn plan(ctl: &Controllers, out: Out, req: pb::ApplyJobRequest) -> anyhow::Result<()> {
    let resp = ctl
        .jobs(|mut c| {
            let r = req.clone();
            async move { c.plan_job(r).await }
        })
        .await?;
    if out.json {
        return out.json(&serde_json::json!({
            "job": resp.job.as_ref().map(crate::output::job_json),
            "changed": resp.changed,
            "changes": resp.changes.iter().map(|c| serde_json::json!({"path": c.path, "old": c.old, "new": c.new})).collect::<Vec<_>>(),
            "placements": resp.placements.iter().map(|p| serde_json::json!({"node": p.node, "count": p.count})).collect::<Vec<_>>(),
            "stops": resp.stops,
            "unplaced": resp.unplaced,
            "pending": resp.pending,
        }));
    }
    let job = resp.job.clone().unwrap_or_default();
    println!(
        "job {}/{}: version {}{}",
        job.namespace,
        job.name,
        job.version,
        if resp.changed { "" } else { " (unchanged)" }
    );
    for c in &resp.changes {
        println!(
            "  {}: {} -> {}",
            c.path,
            c.old.as_deref().unwrap_or("(none)"),
            c.new.as_deref().unwrap_or("(none)")
        );
    }
    if resp.placements.is_empty() && resp.stops.is_empty() && resp.unplaced == 0 {
        println!("no changes to allocations");
    }
    for p in &resp.placements {
        println!("  place {} on {}", p.count, p.node);
    }
    if !resp.stops.is_empty() {
        println!("  stop {}: {}", resp.stops.len(), resp.stops.join(", "));
    }
    if resp.unplaced > 0 {
        println!("  {} would not be placed: {}", resp.unplaced, resp.pending);
    }
    Ok(())
}

/// The agent address and full id of an allocation (by id or unique prefix).
async fn locate(ctl: &Controllers, allocation: &str) -> anyhow::Result<(String, String)> {
    let req = pb::ListAllocationsRequest {
        all: true,
        ..Default::default()
    };
    let allocs = ctl
        .jobs(|mut c| {
            let r = req.clone();
            async move { c.list_allocations(r).await }
        })
        .await?
        .allocations;
    let found: Vec<&pb::Allocation> = allocs
        .iter()
        .filter(|a| a.id.starts_with(allocation))
        .collect();
    let a = match found.as_slice() {
        [a] => *a,
        [] => anyhow::bail!("allocation {allocation} not found"),
        many => anyhow::bail!(
            "allocation {allocation} is ambiguous ({} match); give more of its id",
            many.len()
        ),
    };
    let nodes = ctl
        .nodes(|mut c| async move { c.list_nodes(pb::ListNodesRequest::default()).await })
        .await?
        .nodes;
    let node = nodes
        .iter()
        .find(|n| n.name == a.node)
        .ok_or_else(|| anyhow::anyhow!("node {} of allocation {} is gone", a.node, a.id))?;
    if node.agent_addr.is_empty() {
        anyhow::bail!("node {} does not serve the agent API", node.name);
    }
    Ok((format!("http://{}", node.agent_addr), a.id.clone()))
}

async fn agent_client(
    addr: &str,
) -> anyhow::Result<pb::agent_client::AgentClient<tonic::transport::Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(addr.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("agent at {addr}: {e}"))?;
    Ok(pb::agent_client::AgentClient::new(ch))
}

pub async fn logs(ctl: &Controllers, allocation: String, follow: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let (addr, id) = locate(ctl, &allocation).await?;
    let mut client = agent_client(&addr).await?;
    let mut stream = client
        .logs(pb::LogsRequest {
            allocation: id,
            follow,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    while let Some(c) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
    {
        let end = if c.partial { "" } else { "\n" };
        if c.stream == "stderr" {
            let mut e = std::io::stderr().lock();
            write!(e, "{}{end}", c.text)?;
        } else {
            let mut o = std::io::stdout().lock();
            write!(o, "{}{end}", c.text)?;
            o.flush()?;
        }
    }
    Ok(())
}

pub async fn exec(
    ctl: &Controllers,
    allocation: String,
    command: Vec<String>,
    env: Vec<String>,
) -> anyhow::Result<i32> {
    use std::io::Write;
    let (addr, id) = locate(ctl, &allocation).await?;
    let mut client = agent_client(&addr).await?;
    let resp = client
        .exec(pb::ExecRequest {
            allocation: id,
            command,
            env,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    std::io::stdout().write_all(&resp.stdout)?;
    std::io::stderr().write_all(&resp.stderr)?;
    Ok(resp.exit_code)
}

pub async fn services(
    ctl: &Controllers,
    out: Out,
    namespace: Option<String>,
) -> anyhow::Result<()> {
    let req = pb::ListServicesRequest {
        namespace: namespace.unwrap_or_default(),
        read: None,
    };
    let resp = ctl
        .jobs(|mut c| {
            let r = req.clone();
            async move { c.list_services(r).await }
        })
        .await?;
    if out.json {
        let list: Vec<serde_json::Value> = resp
            .services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name, "namespace": s.namespace, "job": s.job,
                    "dns": format!("{}.{}.skiff.internal", s.name, s.namespace),
                    "port": s.port_name,
                    "ports": s.ports.iter().map(|p| serde_json::json!({
                        "name": p.name, "port": p.port, "protocol": p.protocol,
                    })).collect::<Vec<_>>(),
                    "tags": s.tags,
                    "endpoints": s.endpoints.iter().map(|e| serde_json::json!({
                        "allocation": e.allocation, "node": e.node, "ip": e.ip,
                        "health": e.health, "health_output": e.health_output, "ready": e.ready,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        return out.json(&list);
    }
    let rows = resp
        .services
        .iter()
        .map(|s| {
            let port = s.ports.iter().find(|p| p.name == s.port_name).map_or_else(
                || s.port_name.clone(),
                |p| format!("{}/{}", p.port, p.protocol),
            );
            let ready = s.endpoints.iter().filter(|e| e.ready).count();
            let endpoints: Vec<String> = s
                .endpoints
                .iter()
                .map(|e| {
                    let state = if e.ready {
                        String::new()
                    } else if e.health.is_empty() {
                        " (no address)".to_owned()
                    } else {
                        format!(" ({})", e.health)
                    };
                    format!("{}{state}", if e.ip.is_empty() { "-" } else { &e.ip })
                })
                .collect();
            vec![
                format!("{}.{}.skiff.internal", s.name, s.namespace),
                port,
                format!("{ready}/{}", s.endpoints.len()),
                if endpoints.is_empty() {
                    "-".into()
                } else {
                    endpoints.join(", ")
                },
            ]
        })
        .collect();
    print_table(&["SERVICE", "PORT", "READY", "ENDPOINTS"], rows);
    Ok(())
}
