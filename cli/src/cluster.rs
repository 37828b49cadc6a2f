//! `skiff cluster members | leader | add | remove`: the controller members.

use skiff_proto::v1 as pb;

use crate::client::{Controllers, rpc};
use crate::render::{self, Out, print_table};

pub async fn leader(ctl: &Controllers, out: Out) -> anyhow::Result<()> {
    let resp = rpc!(ctl, cluster, leader, pb::LeaderRequest {})?;
    if out.json {
        return out.json(&serde_json::json!({ "leader_id": resp.leader_id, "rpc_addr": resp.rpc_addr, "term": resp.term }));
    }
    if resp.leader_id == 0 {
        anyhow::bail!("no leader is known (term {})", resp.term);
    }
    println!("{} {} (term {})", resp.leader_id, resp.rpc_addr, resp.term);
    Ok(())
}

pub async fn info(ctl: &Controllers, out: Out, stale: bool) -> anyhow::Result<()> {
    let req = pb::ClusterInfoRequest {
        read: Some(pb::ReadOptions { stale }),
    };
    let r = rpc!(ctl, cluster, info, req)?;
    if out.json {
        return out.json(&serde_json::json!({
            "cluster_cidr": r.cluster_cidr,
            "node_subnet_prefix": r.node_subnet_prefix,
            "service_cidr": r.service_cidr,
            "leader_id": r.leader_id,
            "term": r.term,
            "members": r.members,
            "nodes": r.nodes,
            "jobs": r.jobs,
        }));
    }
    if r.cluster_cidr.is_empty() {
        println!("cluster settings: not committed yet (no leader since bootstrap)");
    } else {
        println!("cluster cidr:       {}", r.cluster_cidr);
        println!("node subnet prefix: /{}", r.node_subnet_prefix);
        println!("service cidr:       {}", r.service_cidr);
    }
    println!(
        "leader:             {} (term {})",
        if r.leader_id == 0 {
            "none".to_owned()
        } else {
            r.leader_id.to_string()
        },
        r.term
    );
    println!("members:            {}", r.members);
    println!("nodes:              {}", r.nodes);
    println!("jobs:               {}", r.jobs);
    Ok(())
}

pub async fn members(ctl: &Controllers, out: Out) -> anyhow::Result<()> {
    let resp = rpc!(ctl, cluster, list_members, pb::ListMembersRequest {})?;
    print_members(out, &resp.members)
}

pub async fn add(ctl: &Controllers, out: Out, req: pb::AddMemberRequest) -> anyhow::Result<()> {
    let resp = rpc!(ctl, cluster, add_member, req)?;
    print_members(out, &resp.members)
}

pub async fn remove(ctl: &Controllers, out: Out, id: u64) -> anyhow::Result<()> {
    let resp = rpc!(ctl, cluster, remove_member, pb::RemoveMemberRequest { id })?;
    print_members(out, &resp.members)
}

fn print_members(out: Out, members: &[pb::Member]) -> anyhow::Result<()> {
    if out.json {
        return out.json(&members.iter().map(render::member_json).collect::<Vec<_>>());
    }
    let rows = members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.rpc_addr.clone(),
                render::member_role(m.role).to_owned(),
                if m.voter { "yes".into() } else { "no".into() },
                m.applied_index.to_string(),
                m.term.to_string(),
                if m.release.is_empty() {
                    "-".into()
                } else {
                    format!("{} (level {})", m.release, m.command_level)
                },
            ]
        })
        .collect();
    print_table(
        &[
            "ID", "ADDRESS", "ROLE", "VOTER", "APPLIED", "TERM", "RELEASE",
        ],
        rows,
    );
    Ok(())
}
