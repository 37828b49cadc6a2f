//! The receiving side of member-to-member traffic: the `RaftInternal` gRPC service.

use openraft::raft::{AppendEntriesRequest, VoteRequest};
use serde::Serialize;
use skiff_proto::v1::raft_internal_server::RaftInternal;
use skiff_proto::v1::{AddMemberRequest, AddMemberResponse, RaftReply, RaftRequest, SnapshotChunk};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::network::{decode, encode};
use super::node::{RaftNode, RaftNodeError};
use super::types::{SnapshotMeta, TypeConfig, Vote};
use crate::state::Command;

/// Largest snapshot a member accepts (256 MiB).
const MAX_SNAPSHOT_BYTES: usize = 256 * 1024 * 1024;

/// Serves `RaftInternal` for one member.
#[derive(Clone)]
pub struct RaftService {
    node: RaftNode,
}

impl RaftService {
    pub fn new(node: RaftNode) -> Self {
        RaftService { node }
    }

    fn check_target(&self, target: u64) -> Result<(), Status> {
        if target != self.node.id() {
            return Err(Status::failed_precondition(format!(
                "this is member {}, not member {target}",
                self.node.id()
            )));
        }
        Ok(())
    }

    fn open<T: serde::de::DeserializeOwned>(&self, req: Request<RaftRequest>) -> Result<T, Status> {
        let req = req.into_inner();
        self.check_target(req.target)?;
        decode(&req.payload)
            .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))
    }
}

fn ok<T: Serialize>(v: &T) -> Result<Response<RaftReply>, Status> {
    Ok(Response::new(RaftReply {
        payload: encode(v),
        error: Vec::new(),
    }))
}

fn err(message: String) -> Result<Response<RaftReply>, Status> {
    Ok(Response::new(RaftReply {
        payload: Vec::new(),
        error: encode(&message),
    }))
}

pub(crate) fn node_error_status(e: RaftNodeError) -> Status {
    match e {
        RaftNodeError::NoLeader | RaftNodeError::NoQuorum => Status::unavailable(e.to_string()),
        RaftNodeError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        RaftNodeError::Membership(m) => Status::failed_precondition(m),
        e @ RaftNodeError::NotAllMembersApply { .. } => Status::failed_precondition(e.to_string()),
        RaftNodeError::Settings(_) => Status::invalid_argument(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl RaftInternal for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = self.open(req)?;
        match self.node.raft().append_entries(rpc).await {
            Ok(r) => ok(&r),
            Err(e) => err(e.to_string()),
        }
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: VoteRequest<TypeConfig> = self.open(req)?;
        match self.node.raft().vote(rpc).await {
            Ok(r) => ok(&r),
            Err(e) => err(e.to_string()),
        }
    }

    async fn pre_vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: VoteRequest<TypeConfig> = self.open(req)?;
        match self.node.raft().pre_vote(rpc).await {
            Ok(r) => ok(&r),
            Err(e) => err(e.to_string()),
        }
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        let mut stream = req.into_inner();
        let mut header: Option<(Vote, SnapshotMeta)> = None;
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if header.is_none() {
                self.check_target(chunk.target)?;
                header = Some(decode(&chunk.header).map_err(|e| {
                    Status::invalid_argument(format!("malformed snapshot header: {e}"))
                })?);
            }
            if data.len() + chunk.data.len() > MAX_SNAPSHOT_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "snapshot larger than {MAX_SNAPSHOT_BYTES} bytes"
                )));
            }
            data.extend_from_slice(&chunk.data);
        }
        let Some((vote, meta)) = header else {
            return Err(Status::invalid_argument("empty snapshot stream"));
        };
        let snapshot = openraft::Snapshot {
            meta,
            snapshot: data.into(),
        };
        match self.node.raft().install_full_snapshot(vote, snapshot).await {
            Ok(r) => ok(&r),
            Err(e) => err(e.to_string()),
        }
    }

    async fn propose(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let command: Command = self.open(req)?;
        match self.node.propose_local(command).await {
            Ok(r) => ok(&r),
            Err(e) => Err(node_error_status(e)),
        }
    }

    async fn read_index(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let () = self.open(req)?;
        match self.node.read_index_local().await {
            Ok(r) => ok(&r),
            Err(e) => Err(node_error_status(e)),
        }
    }

    async fn status(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let () = self.open(req)?;
        ok(&self.node.status())
    }

    async fn join(
        &self,
        req: Request<AddMemberRequest>,
    ) -> Result<Response<AddMemberResponse>, Status> {
        // A member joins only as itself: its certificate names the id it asks to be.
        match skiff_tls::peer_of(&req).map(|p| &p.identity) {
            Some(skiff_tls::Identity::Member(id)) if *id == req.get_ref().id => {}
            other => {
                return Err(Status::permission_denied(format!(
                    "refused: a member joins as the id its certificate names ({})",
                    other.map(|i| i.describe()).unwrap_or_else(|| "none".into())
                )));
            }
        }
        let req = req.into_inner();
        let member = crate::api::validate_member(&req).map_err(Status::invalid_argument)?;
        self.node
            .add_member(req.id, member)
            .await
            .map_err(node_error_status)?;
        Ok(Response::new(AddMemberResponse {
            members: Vec::new(),
        }))
    }
}
