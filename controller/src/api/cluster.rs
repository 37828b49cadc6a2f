//! The `Cluster` service: membership of the controller cluster.

use std::time::Duration;

use skiff_proto::v1 as pb;
use skiff_proto::v1::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use super::{ApiContext, ApiError, validate_member};
use crate::raft::Role;

/// Serves `skiff.v1.Cluster`.
pub struct ClusterApi {
    ctx: ApiContext,
}

impl ClusterApi {
    pub fn new(ctx: ApiContext) -> Self {
        ClusterApi { ctx }
    }

    /// Every member with its own view of its role and applied index (asked in parallel;
    /// a member that does not answer within a second shows as "unreachable").
    async fn member_list(&self) -> Vec<pb::Member> {
        let node = &self.ctx.node;
        let members = node.members();
        let asks = members.iter().map(|m| {
            let node = node.clone();
            let m = m.clone();
            async move {
                let status = if m.id == node.id() {
                    Ok(node.status())
                } else {
                    tokio::time::timeout(
                        Duration::from_secs(1),
                        node.peer_status(m.id, &m.member.rpc_addr),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(crate::raft::PeerError::Timeout {
                            addr: m.member.rpc_addr.clone(),
                        })
                    })
                };
                let (role, applied, term, command_level, release) = match status {
                    Ok(s) => {
                        let role = if !m.voter && s.role != Role::Leader {
                            Role::Learner
                        } else {
                            s.role
                        };
                        let role = super::convert::member_role(role);
                        (role, s.applied_index, s.term, s.command_level, s.release)
                    }
                    Err(_) => (pb::MemberRole::Unreachable, 0, 0, 0, String::new()),
                };
                pb::Member {
                    id: m.id,
                    rpc_addr: m.member.rpc_addr.clone(),
                    http_addr: m.member.http_addr.clone(),
                    role: role as i32,
                    voter: m.voter,
                    applied_index: applied,
                    term,
                    command_level,
                    release,
                }
            }
        });
        futures::future::join_all(asks).await
    }
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn list_members(
        &self,
        _req: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        self.ctx
            .track("ListMembers", async {
                let status = self.ctx.node.status();
                Ok(pb::ListMembersResponse {
                    members: self.member_list().await,
                    leader_id: status.leader.unwrap_or(0),
                    term: status.term,
                    cluster_command_level: self.ctx.node.cluster_level(),
                })
            })
            .await
    }

    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::AddMemberResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("AddMember", async {
                let member = validate_member(&req).map_err(ApiError::BadRequest)?;
                self.ctx.node.add_member(req.id, member).await?;
                // The change is committed; make sure this member has applied it before
                // answering with the list (it may have been done by another member).
                self.ctx.read_barrier(None).await?;
                Ok(pb::AddMemberResponse {
                    members: self.member_list().await,
                })
            })
            .await
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("RemoveMember", async {
                self.ctx.node.remove_member(req.id).await?;
                self.ctx.read_barrier(None).await?;
                Ok(pb::RemoveMemberResponse {
                    members: self.member_list().await,
                })
            })
            .await
    }

    async fn leader(
        &self,
        _req: Request<pb::LeaderRequest>,
    ) -> Result<Response<pb::LeaderResponse>, Status> {
        self.ctx
            .track("Leader", async {
                let status = self.ctx.node.status();
                let leader = self.ctx.node.leader();
                Ok(pb::LeaderResponse {
                    leader_id: leader.as_ref().map(|l| l.0).unwrap_or(0),
                    rpc_addr: leader.map(|l| l.1.rpc_addr).unwrap_or_default(),
                    term: status.term,
                })
            })
            .await
    }

    async fn info(
        &self,
        req: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("Info", async {
                self.ctx.read_barrier(req.read.as_ref()).await?;
                let status = self.ctx.node.status();
                let members = self.ctx.node.members().len();
                let applied = self.ctx.node.state();
                let state = &applied.state;
                let settings = state.settings().cloned();
                Ok(pb::ClusterInfoResponse {
                    cluster_cidr: settings
                        .as_ref()
                        .map(|s| s.cluster_cidr.clone())
                        .unwrap_or_default(),
                    service_cidr: settings
                        .as_ref()
                        .map(|s| s.service_cidr.clone())
                        .unwrap_or_default(),
                    node_subnet_prefix: settings.map_or(0, |s| u32::from(s.node_subnet_prefix)),
                    leader_id: status.leader.unwrap_or(0),
                    term: status.term,
                    members: u32::try_from(members).unwrap_or(u32::MAX),
                    nodes: u32::try_from(state.nodes().count()).unwrap_or(u32::MAX),
                    jobs: u32::try_from(state.jobs(None).count()).unwrap_or(u32::MAX),
                })
            })
            .await
    }
}
