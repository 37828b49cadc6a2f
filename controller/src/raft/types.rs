//! The openraft type configuration: what travels in the log and what a member is.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::state::{ApplyResult, Command};

/// A controller member's id. Never reused: a removed member's id is retired.
pub type MemberId = u64;

/// The addresses of a controller member, stored in the Raft membership.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// gRPC address for Raft traffic and the API.
    pub rpc_addr: String,
    /// HTTP address for `/metrics`, `/healthz`, `/readyz`.
    pub http_addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.rpc_addr)
    }
}

/// The log payload: one state-machine command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request(pub Command);

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What the state machine returns for a log entry. Blank and membership entries have no
/// command and return `None`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response(pub Option<ApplyResult>);

openraft::declare_raft_types!(
    /// Skiff's controller Raft types.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = MemberId,
        Node = Member,
);

pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// Snapshots are held whole in memory (the cluster state of a small cluster is small), as
/// shared bytes: the current snapshot is handed to every follower it is sent to, and kept,
/// without a copy.
pub type SnapshotData = bytes::Bytes;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
