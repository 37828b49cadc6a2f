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
            ]
        })
        .collect();
    print_table(&["ID", "ADDRESS", "ROLE", "VOTER", "APPLIED", "TERM"], rows);
    Ok(())
}
