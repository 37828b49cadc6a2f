//! `skiff nodes | node drain | node undrain | node rm`: the hosts.

use skiff_proto::v1 as pb;

use crate::client::{Controllers, rpc};
use crate::render::{self, Out, gib, print_table};

/// `userspace 2/2`: the backend, then peers with a handshake in the last 3 minutes / peers.
fn wireguard_cell(n: &pb::Node) -> String {
    let Some(w) = &n.wireguard else {
        return "-".into();
    };
    let backend = render::backend(w.backend);
    let Some(s) = &n.wireguard_status else {
        return backend.into();
    };
    // The controllers count them (the peers themselves are only listed when asked for).
    format!("{backend} {}/{}", s.peers_handshaken, s.peer_count)
}

pub async fn list(ctl: &Controllers, out: Out, stale: bool, peers: bool) -> anyhow::Result<()> {
    let req = pb::ListNodesRequest {
        read: Some(pb::ReadOptions { stale }),
        peers: peers && out.json,
    };
    let resp = rpc!(ctl, nodes, list_nodes, req)?;
    if out.json {
        return out.json(&resp.nodes.iter().map(render::node_json).collect::<Vec<_>>());
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
                if n.disk_pressure {
                    format!("{},disk-pressure", render::node_status(n.status))
                } else {
                    render::node_status(n.status).to_owned()
                },
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
    let resp = rpc!(ctl, nodes, set_drain, pb::SetDrainRequest { name, drain })?;
    let node = resp.node.unwrap_or_default();
    if out.json {
        return out
            .json(&serde_json::json!({"node": render::node_json(&node), "changed": resp.changed}));
    }
    println!(
        "node {}: {}{}",
        node.name,
        render::node_status(node.status),
        if resp.changed { "" } else { " (unchanged)" }
    );
    Ok(())
}

pub async fn remove(ctl: &Controllers, out: Out, name: String) -> anyhow::Result<()> {
    let resp = rpc!(ctl, nodes, remove_node, pb::RemoveNodeRequest { name })?;
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
