//! The controller's API: the tonic services for users and agents, and the HTTP endpoints
//! (`/healthz`, `/readyz`, `/metrics`, Prometheus discovery, the status page). Requests are validated and turned into commands or
//! reads here; this is the one place that maps errors to `tonic::Status`.

mod cluster;
pub mod convert;
mod http;
mod jobs;
mod nodes;
mod pki;
mod published;
mod services;
pub mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use skiff_common::SpecError;
use skiff_proto::v1::AddMemberRequest;
use tonic::Status;

pub use cluster::ClusterApi;
pub use http::{router, serve};
pub use jobs::JobsApi;
pub use nodes::{LEADER_METADATA, NodesApi};
pub use pki::PkiApi;

use crate::metrics::Metrics;
use crate::raft::{Member, RaftNode, RaftNodeError, node_error_status};
use crate::state::ApplyError;

/// Largest job spec accepted (1 MiB).
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;

/// What every API handler needs.
#[derive(Clone)]
pub struct ApiContext {
    pub node: RaftNode,
    pub metrics: Arc<Metrics>,
    /// What the leader hears from the agents (liveness, usage, request counts).
    pub heartbeats: crate::reconcile::Heartbeats,
    /// This member's own TLS identity (its certificate's expiry is a metric).
    pub tls: Arc<skiff_tls::TlsContext>,
}

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Apply(#[from] ApplyError),
    #[error("{0}")]
    Raft(#[from] RaftNodeError),
    #[error("{0}")]
    BadRequest(String),
    /// The member cannot answer yet (try again shortly).
    #[error("{0}")]
    NotReady(String),
    /// The caller is authenticated but may not do this.
    #[error("{0}")]
    Forbidden(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Spec(e) => Status::invalid_argument(e.to_string()),
            ApiError::BadRequest(m) => Status::invalid_argument(m),
            ApiError::NotReady(m) => Status::unavailable(m),
            ApiError::Forbidden(m) => Status::permission_denied(m),
            ApiError::Apply(e) => match e {
                ApplyError::JobNotFound { .. }
                | ApplyError::NodeNotFound { .. }
                | ApplyError::AllocationNotFound { .. } => Status::not_found(e.to_string()),
                ApplyError::AllocationExists { .. } => Status::already_exists(e.to_string()),
                ApplyError::ServiceTaken { .. } => Status::already_exists(e.to_string()),
                ApplyError::NoSubnet { .. } | ApplyError::NoServiceIp { .. } => {
                    Status::resource_exhausted(e.to_string())
                }
                ApplyError::BadCidr { .. }
                | ApplyError::BadServiceCidr { .. }
                | ApplyError::NodeNotDown { .. }
                | ApplyError::SettingsConflict { .. }
                | ApplyError::NoRollout { .. }
                | ApplyError::BadRollback { .. } => Status::failed_precondition(e.to_string()),
                ApplyError::InvalidSpec { .. } | ApplyError::UnknownJobVersion { .. } => {
                    Status::invalid_argument(e.to_string())
                }
                ApplyError::Pki { .. } => Status::permission_denied(e.to_string()),
            },
            ApiError::Raft(e) => node_error_status(e),
        }
    }
}

/// Milliseconds since the Unix epoch, stamped on commands before they are proposed (the state
/// machine itself never reads a clock).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl ApiContext {
    /// Runs a handler, counting it in the request metrics.
    pub async fn track<T, F>(
        &self,
        method: &'static str,
        f: F,
    ) -> Result<tonic::Response<T>, Status>
    where
        F: Future<Output = Result<T, ApiError>>,
    {
        let started = Instant::now();
        let res = f.await.map_err(Status::from);
        let code = match &res {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics
            .request(method, code, started.elapsed().as_secs_f64());
        if let Err(s) = &res {
            tracing::debug!(method, code = ?s.code(), error = %s.message(), "request failed");
        }
        res.map(tonic::Response::new)
    }

    /// Waits until a read of the local state is linearizable, unless a stale read was asked for.
    pub async fn read_barrier(
        &self,
        read: Option<&skiff_proto::v1::ReadOptions>,
    ) -> Result<(), ApiError> {
        if read.is_some_and(|r| r.stale) {
            return Ok(());
        }
        Ok(self.node.linearize().await?)
    }
}

/// Refuses a node call made with another node's certificate: node n1 can register,
/// heartbeat and watch only as n1. Members (forwarding) may act for any node.
pub fn act_as_node<T>(req: &tonic::Request<T>, name: &str) -> Result<(), Status> {
    match skiff_tls::peer_of(req).map(|p| &p.identity) {
        Some(skiff_tls::Identity::Node(n)) if n == name => Ok(()),
        Some(skiff_tls::Identity::Member(_)) => Ok(()),
        Some(other) => {
            tracing::warn!(caller = %other, node = name, "a node call for another identity refused");
            Err(Status::permission_denied(format!(
                "{other} may not act as node {name}"
            )))
        }
        None => Err(Status::unauthenticated("a node certificate is required")),
    }
}

/// Validates a member's id and addresses from a request.
pub fn validate_member(req: &AddMemberRequest) -> Result<Member, String> {
    if req.id == 0 {
        return Err("id: must be a positive integer".into());
    }
    for (field, addr) in [("rpc_addr", &req.rpc_addr), ("http_addr", &req.http_addr)] {
        let parsed: std::net::SocketAddr = addr
            .parse()
            .map_err(|_| format!("{field}: {addr:?} is not an IP:port address"))?;
        if parsed.ip().is_unspecified() {
            return Err(format!("{field}: {addr} is not reachable by other members"));
        }
    }
    Ok(Member {
        rpc_addr: req.rpc_addr.clone(),
        http_addr: req.http_addr.clone(),
    })
}
