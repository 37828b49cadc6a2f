//! The `Nodes` service: agents register, heartbeat (with what they observe of their
//! allocations) and watch what they should run; users list and drain nodes.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use skiff_proto::v1 as pb;
use skiff_proto::v1::nodes_server::Nodes;
use tonic::{Request, Response, Status};

use super::{ApiContext, ApiError, now_ms};
use crate::raft::Role;
use crate::reconcile::{self, Heartbeats};
use crate::scheduler::Usage;
use crate::state::{
    AllocationReport, AllocationStatus, ClusterState, Command, DesiredStatus, Node, NodeResources,
    NodeStatus, Outcome,
};

/// How often agents are told to heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The metadata key carrying the leader's address when a follower refuses a heartbeat.
pub const LEADER_METADATA: &str = "x-skiff-leader";

/// Serves `skiff.v1.Nodes`.
pub struct NodesApi {
    ctx: ApiContext,
    heartbeats: Heartbeats,
    cluster_cidr: String,
}

impl NodesApi {
    pub fn new(ctx: ApiContext, heartbeats: Heartbeats, cluster_cidr: String) -> Self {
        NodesApi {
            ctx,
            heartbeats,
            cluster_cidr,
        }
    }

    /// Heartbeats and registrations go to the leader (the liveness clock lives there).
    fn require_leader(&self) -> Result<(), Status> {
        if self.ctx.node.status().role == Role::Leader {
            return Ok(());
        }
        let mut status = Status::failed_precondition("not the leader");
        if let Some((_, leader)) = self.ctx.node.leader()
            && let Ok(v) = leader.rpc_addr.parse()
        {
            status.metadata_mut().insert(LEADER_METADATA, v);
        }
        Err(status)
    }
}

fn resources_pb(r: &NodeResources) -> pb::NodeResources {
    pb::NodeResources {
        cpu: r.cpu,
        memory: r.memory,
        pids: r.pids,
    }
}

/// A node as the API shows it, with what its allocations hold (from
/// [`reconcile::usage_by_node`], computed once per request).
pub(crate) fn node_pb(n: &Node, usage: Option<&(Usage, u32)>) -> pb::Node {
    let (used, count) = usage.copied().unwrap_or_default();
    let allocated = NodeResources {
        cpu: used.millicpu as f64 / 1000.0,
        memory: used.memory,
        pids: u32::try_from(used.pids).unwrap_or(u32::MAX),
    };
    pb::Node {
        name: n.name.clone(),
        address: n.address.clone(),
        status: match n.status {
            NodeStatus::Ready => "ready",
            NodeStatus::Draining => "draining",
            NodeStatus::Down => "down",
        }
        .to_owned(),
        labels: n.labels.clone().into_iter().collect(),
        total: Some(resources_pb(&n.resources)),
        allocated: Some(resources_pb(&allocated)),
        allocations: count,
        agent_addr: n.agent_addr.clone(),
        registered_at_ms: n.registered_at_ms,
        status_changed_at_ms: n.status_changed_at_ms,
        subnet: n.subnet.clone().unwrap_or_default(),
    }
}

fn report_status(r: &pb::AllocationReport) -> Result<AllocationStatus, ApiError> {
    Ok(match r.state.as_str() {
        "pending" => AllocationStatus::Pending,
        "running" => AllocationStatus::Running,
        "exited" => AllocationStatus::Exited { code: r.exit_code },
        "failed" => AllocationStatus::Failed {
            reason: r.reason.clone(),
        },
        other => {
            return Err(ApiError::BadRequest(format!(
                "allocations: {}: unknown state {other:?}",
                r.id
            )));
        }
    })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::AssignedAllocations, Status>> + Send>>;

#[tonic::async_trait]
impl Nodes for NodesApi {
    async fn register(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        self.require_leader()?;
        let req = req.into_inner();
        self.ctx
            .track("Register", async {
                skiff_common::validate_name("name", &req.name)?;
                let address: std::net::IpAddr = req.address.parse().map_err(|_| {
                    ApiError::BadRequest(format!("address: {:?} is not an IP address", req.address))
                })?;
                let r = req.resources.unwrap_or_default();
                if !r.cpu.is_finite() || r.cpu <= 0.0 || r.memory == 0 || r.pids == 0 {
                    return Err(ApiError::BadRequest(
                        "resources: cpu, memory and pids must be positive".into(),
                    ));
                }
                let existing = self.ctx.node.state().state.node(&req.name).cloned();
                let now = now_ms();
                let node = Node {
                    name: req.name.clone(),
                    address: address.to_string(),
                    labels: req.labels.into_iter().collect::<BTreeMap<_, _>>(),
                    resources: NodeResources {
                        cpu: r.cpu,
                        memory: r.memory,
                        pids: r.pids,
                    },
                    // A re-registering node keeps its drain; a down one is back.
                    status: match existing.as_ref().map(|n| n.status) {
                        Some(NodeStatus::Draining) => NodeStatus::Draining,
                        _ => NodeStatus::Ready,
                    },
                    status_changed_at_ms: existing
                        .as_ref()
                        .filter(|n| n.status != NodeStatus::Down)
                        .map_or(now, |n| n.status_changed_at_ms),
                    registered_at_ms: existing.as_ref().map_or(now, |n| n.registered_at_ms),
                    agent_addr: req.agent_addr,
                    subnet: existing.as_ref().and_then(|n| n.subnet.clone()),
                };
                self.heartbeats.beat(&node.name);
                let name = node.name.clone();
                if existing.as_ref() != Some(&node) || node.subnet.is_none() {
                    let (result, _) = self
                        .ctx
                        .node
                        .write(Command::RegisterNode {
                            node,
                            cluster_cidr: self.cluster_cidr.clone(),
                        })
                        .await?;
                    match result? {
                        Outcome::NodeUpserted { name, created } => {
                            tracing::info!(node = %name, created, "node registered");
                        }
                        other => {
                            return Err(ApiError::BadRequest(format!("unexpected {other:?}")));
                        }
                    }
                }
                let subnet = self
                    .ctx
                    .node
                    .state()
                    .state
                    .node(&name)
                    .and_then(|n| n.subnet.clone())
                    .unwrap_or_default();
                Ok(pb::RegisterNodeResponse {
                    heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
                    subnet,
                })
            })
            .await
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.require_leader()?;
        let req = req.into_inner();
        self.ctx
            .track("Heartbeat", async {
                let mut reports = Vec::new();
                {
                    let applied = self.ctx.node.state();
                    let state = &applied.state;
                    if state.node(&req.name).is_none() {
                        return Ok(pb::HeartbeatResponse { known: false });
                    }
                    self.heartbeats.beat(&req.name);
                    for r in &req.allocations {
                        let status = report_status(r)?;
                        // Only what changed goes through the log.
                        let Some(a) = state.allocation(&r.id) else {
                            continue;
                        };
                        if a.node != req.name {
                            continue;
                        }
                        if a.observed != status || a.restarts < r.restarts {
                            reports.push(AllocationReport {
                                id: r.id.clone(),
                                status,
                                restarts: r.restarts,
                            });
                        }
                    }
                }
                if !reports.is_empty() {
                    self.ctx
                        .node
                        .write(Command::ReportAllocations {
                            reports,
                            at_ms: now_ms(),
                        })
                        .await?
                        .0?;
                }
                Ok(pb::HeartbeatResponse { known: true })
            })
            .await
    }

    type WatchAllocationsStream = WatchStream;

    async fn watch_allocations(
        &self,
        req: Request<pb::WatchAllocationsRequest>,
    ) -> Result<Response<Self::WatchAllocationsStream>, Status> {
        let name = req.into_inner().node;
        skiff_common::validate_name("node", &name).map_err(ApiError::from)?;
        let node = self.ctx.node.clone();
        let mut applied = node.applied_watch();
        let stream = async_stream(move |tx| async move {
            let mut last: Option<Vec<pb::AssignedAllocation>> = None;
            while let Some(index) = applied.changed().await {
                let set = assigned(&node.state().state, &name);
                if last.as_ref() != Some(&set) {
                    let msg = pb::AssignedAllocations {
                        allocations: set.clone(),
                        index,
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = Some(set);
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("ListNodes", async {
                self.ctx.read_barrier(req.read.as_ref()).await?;
                let applied = self.ctx.node.state();
                let usage = reconcile::usage_by_node(&applied.state);
                Ok(pb::ListNodesResponse {
                    nodes: applied
                        .state
                        .nodes()
                        .map(|n| node_pb(n, usage.get(n.name.as_str())))
                        .collect(),
                })
            })
            .await
    }

    async fn set_drain(
        &self,
        req: Request<pb::SetDrainRequest>,
    ) -> Result<Response<pb::SetDrainResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("SetDrain", async {
                self.ctx.read_barrier(None).await?;
                let current = self
                    .ctx
                    .node
                    .state()
                    .state
                    .node(&req.name)
                    .map(|n| n.status);
                let Some(current) = current else {
                    return Err(ApiError::Apply(crate::state::ApplyError::NodeNotFound {
                        name: req.name.clone(),
                    }));
                };
                let target = match (req.drain, current) {
                    (true, NodeStatus::Ready) => Some(NodeStatus::Draining),
                    (false, NodeStatus::Draining) => Some(NodeStatus::Ready),
                    (true, NodeStatus::Down) => {
                        return Err(ApiError::BadRequest(format!(
                            "node {} is down; its allocations are already moved",
                            req.name
                        )));
                    }
                    _ => None,
                };
                if let Some(status) = target {
                    self.ctx
                        .node
                        .write(Command::SetNodeStatus {
                            name: req.name.clone(),
                            status,
                            at_ms: now_ms(),
                        })
                        .await?
                        .0?;
                }
                let applied = self.ctx.node.state();
                let usage = reconcile::usage_by_node(&applied.state);
                let node = applied
                    .state
                    .node(&req.name)
                    .map(|n| node_pb(n, usage.get(n.name.as_str())));
                Ok(pb::SetDrainResponse {
                    node,
                    changed: target.is_some(),
                })
            })
            .await
    }
}

/// The allocations `node` should run (desired = run), by id.
fn assigned(state: &ClusterState, node: &str) -> Vec<pb::AssignedAllocation> {
    state
        .allocations()
        .filter(|a| a.node == node && a.desired == DesiredStatus::Run)
        .filter_map(|a| {
            let v = state.job(&a.namespace, &a.job)?.version(a.job_version)?;
            Some(pb::AssignedAllocation {
                id: a.id.clone(),
                namespace: a.namespace.clone(),
                job: a.job.clone(),
                job_version: a.job_version,
                spec_json: v.spec.to_canonical_json(),
            })
        })
        .collect()
}

/// A stream fed by a task through a small channel; the task ends when the client goes away.
fn async_stream<F, Fut>(f: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::AssignedAllocations, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
