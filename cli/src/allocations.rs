//! `skiff ps | logs | exec | volumes | volume rm`: allocations, and what only their node's
//! agent can do.

use std::io::Write;

use skiff_proto::v1 as pb;

use crate::client::{Controllers, rpc};
use crate::render::{self, Out, age, print_table};

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
    let resp = rpc!(ctl, jobs, list_allocations, req)?;
    if out.json {
        return out.json(
            &resp
                .allocations
                .iter()
                .map(render::allocation_json)
                .collect::<Vec<_>>(),
        );
    }
    let rows = resp
        .allocations
        .iter()
        .map(|a| {
            let mut status = render::allocation_state(a.observed).to_owned();
            if a.desired == pb::DesiredState::Stop as i32 {
                status = format!("{status} (stopping)");
            }
            if let Some(code) = a.exit_code {
                status = format!("{status} ({code})");
            }
            let health = render::health(a.health);
            if !health.is_empty() && a.observed == pb::AllocationState::Running as i32 {
                status = format!("{status}, {health}");
            }
            if a.log_dropped_bytes > 0 {
                status = format!("{status}, {} B of output lost", a.log_dropped_bytes);
            }
            if a.containers.len() > 1 {
                let parts: Vec<String> = a
                    .containers
                    .iter()
                    .map(|c| {
                        let mut s = format!("{} {}", c.name, render::allocation_state(c.state));
                        if let Some(code) = c.exit_code {
                            s = format!("{s} ({code})");
                        }
                        s
                    })
                    .collect();
                status = format!("{status} [{}]", parts.join(", "));
            }
            if !a.reason.is_empty() && a.observed != pb::AllocationState::Running as i32 {
                status = format!("{status}: {}", a.reason);
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

/// The agent address and full id of an allocation (by id or unique prefix).
async fn locate(ctl: &Controllers, allocation: &str) -> anyhow::Result<(String, String)> {
    let req = pb::ListAllocationsRequest {
        all: true,
        ..Default::default()
    };
    let allocs = rpc!(ctl, jobs, list_allocations, req)?.allocations;
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
    let nodes = rpc!(ctl, nodes, list_nodes, pb::ListNodesRequest::default())?.nodes;
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
    ctl: &Controllers,
    addr: &str,
) -> anyhow::Result<pb::agent_client::AgentClient<tonic::transport::Channel>> {
    let ch = ctl
        .channel_to(addr)
        .await
        .map_err(|e| anyhow::anyhow!("agent at {e}"))?;
    Ok(pb::agent_client::AgentClient::new(ch))
}

pub async fn logs(
    ctl: &Controllers,
    allocation: String,
    container: Option<String>,
    follow: bool,
) -> anyhow::Result<()> {
    let (addr, id) = locate(ctl, &allocation).await?;
    let mut client = agent_client(ctl, &addr).await?;
    let mut stream = client
        .logs(pb::LogsRequest {
            allocation: id,
            follow,
            container: container.unwrap_or_default(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", crate::client::status_message(&s)))?
        .into_inner();
    while let Some(c) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{}", crate::client::status_message(&s)))?
    {
        let end = if c.partial { "" } else { "\n" };
        if c.stream == pb::LogStream::Stderr as i32 {
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
    container: Option<String>,
    command: Vec<String>,
    env: Vec<String>,
) -> anyhow::Result<i32> {
    let (addr, id) = locate(ctl, &allocation).await?;
    let mut client = agent_client(ctl, &addr).await?;
    let resp = client
        .exec(pb::ExecRequest {
            allocation: id,
            command,
            env,
            container: container.unwrap_or_default(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", crate::client::status_message(&s)))?
        .into_inner();
    std::io::stdout().write_all(&resp.stdout)?;
    std::io::stderr().write_all(&resp.stderr)?;
    Ok(resp.exit_code)
}

/// Every ready node's named volumes, asked of each node's agent.
pub async fn volumes(ctl: &Controllers, out: Out, namespace: Option<String>) -> anyhow::Result<()> {
    let nodes = rpc!(ctl, nodes, list_nodes, pb::ListNodesRequest::default())?.nodes;
    let mut all = Vec::new();
    let mut unreachable = Vec::new();
    for n in nodes.iter().filter(|n| !n.agent_addr.is_empty()) {
        let listed = async {
            let mut client = agent_client(ctl, &format!("http://{}", n.agent_addr)).await?;
            let resp = client
                .list_volumes(pb::ListVolumesRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("{}", crate::client::status_message(&s)))?;
            anyhow::Ok(resp.into_inner().volumes)
        }
        .await;
        match listed {
            Ok(list) => all.extend(list.into_iter().map(|mut v| {
                v.node = n.name.clone();
                v
            })),
            Err(e) => unreachable.push(format!("{}: {e:#}", n.name)),
        }
    }
    if let Some(ns) = &namespace {
        all.retain(|v| &v.namespace == ns);
    }
    for u in &unreachable {
        eprintln!("warning: node {u}");
    }
    if out.json {
        return out.json(&all.iter().map(render::volume_json).collect::<Vec<_>>());
    }
    let rows = all
        .iter()
        .map(|v| {
            vec![
                v.node.clone(),
                format!("{}/{}/{}", v.namespace, v.job, v.name),
                render::bytes(v.size_bytes),
                if v.used_by.is_empty() {
                    "-".into()
                } else {
                    v.used_by.join(",")
                },
                age(v.created_at_ms),
            ]
        })
        .collect();
    print_table(&["NODE", "VOLUME", "SIZE", "USED BY", "AGE"], rows);
    Ok(())
}

/// Removes a named volume through the agent of the node that holds it.
pub async fn volume_rm(
    ctl: &Controllers,
    out: Out,
    volume: String,
    node: Option<String>,
) -> anyhow::Result<()> {
    let parts: Vec<&str> = volume.split('/').collect();
    let (namespace, job, name) = match parts.as_slice() {
        [ns, job, name] => (*ns, *job, *name),
        [job, name] => ("default", *job, *name),
        _ => anyhow::bail!("volume: {volume:?} is not NAMESPACE/JOB/NAME or JOB/NAME"),
    };
    let key = format!("{namespace}/{job}/{name}");
    let nodes = rpc!(ctl, nodes, list_nodes, pb::ListNodesRequest::default())?.nodes;
    let holders: Vec<&pb::Node> = nodes
        .iter()
        .filter(|n| node.as_ref().is_none_or(|want| &n.name == want))
        .filter(|n| n.named_volumes.contains(&key))
        .collect();
    let n = match holders.as_slice() {
        [n] => *n,
        [] => anyhow::bail!(
            "no node holds volume {key}{}",
            node.map(|n| format!(" (looked on {n})"))
                .unwrap_or_default()
        ),
        many => anyhow::bail!(
            "volume {key} is on {} nodes ({}); say which with --node",
            many.len(),
            many.iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut client = agent_client(ctl, &format!("http://{}", n.agent_addr)).await?;
    client
        .remove_volume(pb::RemoveVolumeRequest {
            namespace: namespace.to_owned(),
            job: job.to_owned(),
            name: name.to_owned(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", crate::client::status_message(&s)))?;
    if out.json {
        return out.json(&serde_json::json!({"removed": key, "node": n.name}));
    }
    println!("removed volume {key} from node {}", n.name);
    Ok(())
}
