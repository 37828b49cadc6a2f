//! The `Nodes` service: agents register, heartbeat (with what they observe of their
//! allocations) and watch what they should run; users list and drain nodes.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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
    NodeStatus, Outcome, WireguardIdentity,
};

/// How often agents are told to heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The metadata key carrying the leader's address when a follower refuses a heartbeat.
pub const LEADER_METADATA: &str = "x-skiff-leader";

/// Marks a request a follower passed on to the leader (so it is not passed on again).
const FORWARDED_METADATA: &str = "x-skiff-forwarded";

/// Serves `skiff.v1.Nodes`.
pub struct NodesApi {
    ctx: ApiContext,
    heartbeats: Heartbeats,
    cluster_cidr: String,
    subnet_prefix: u8,
    /// Each node's last reported WireGuard state (leader memory: it changes every second and
    /// is not worth a log entry).
    wireguard: Arc<Mutex<HashMap<String, pb::WireguardStatus>>>,
}

impl NodesApi {
    pub fn new(
        ctx: ApiContext,
        heartbeats: Heartbeats,
        cluster_cidr: String,
        subnet_prefix: u8,
    ) -> Self {
        NodesApi {
            ctx,
            heartbeats,
            cluster_cidr,
            subnet_prefix,
            wireguard: Default::default(),
        }
    }

    fn wireguard_status(&self) -> std::sync::MutexGuard<'_, HashMap<String, pb::WireguardStatus>> {
        self.wireguard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn list_nodes_on_leader(
        &self,
        req: &pb::ListNodesRequest,
    ) -> Option<pb::ListNodesResponse> {
        let (_, leader) = self.ctx.node.leader()?;
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{}", leader.rpc_addr))
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5));
        let mut client = pb::nodes_client::NodesClient::new(ep.connect().await.ok()?);
        let mut r = Request::new(*req);
        r.metadata_mut().insert(
            FORWARDED_METADATA,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        client.list_nodes(r).await.ok().map(Response::into_inner)
    }

    fn nodes_pb<'a>(
        &self,
        state: &ClusterState,
        nodes: impl Iterator<Item = &'a Node>,
    ) -> Vec<pb::Node> {
        let usage = reconcile::usage_by_node(state);
        let wg = self.wireguard_status();
        nodes
            .map(|n| {
                let mut p = node_pb(n, usage.get(n.name.as_str()));
                p.wireguard_status = wg.get(&n.name).cloned();
                p
            })
            .collect()
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
        status: n.status.as_str().to_owned(),
        labels: n.labels.clone().into_iter().collect(),
        total: Some(resources_pb(&n.resources)),
        allocated: Some(resources_pb(&allocated)),
        allocations: count,
        agent_addr: n.agent_addr.clone(),
        registered_at_ms: n.registered_at_ms,
        status_changed_at_ms: n.status_changed_at_ms,
        subnet: n.subnet.clone().unwrap_or_default(),
        wireguard: n.wireguard.as_ref().map(|w| pb::WireguardIdentity {
            public_key: w.public_key.clone(),
            endpoint: w.endpoint.clone(),
            backend: w.backend.clone(),
        }),
        wireguard_status: None,
    }
}

/// Checks an agent's WireGuard identity: a 32-byte base64 key, an `IP:port` endpoint, a
/// known backend.
fn wireguard_identity(w: pb::WireguardIdentity) -> Result<WireguardIdentity, ApiError> {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(&w.public_key)
        .ok()
        .filter(|k| k.len() == 32);
    if key.is_none() {
        return Err(ApiError::BadRequest(format!(
            "wireguard.public_key: {:?} is not a base64 32-byte key",
            w.public_key
        )));
    }
    if w.endpoint.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::BadRequest(format!(
            "wireguard.endpoint: {:?} is not IP:port",
            w.endpoint
        )));
    }
    if w.backend != "kernel" && w.backend != "userspace" {
        return Err(ApiError::BadRequest(format!(
            "wireguard.backend: {:?} is not kernel or userspace",
            w.backend
        )));
    }
    Ok(WireguardIdentity {
        public_key: w.public_key,
        endpoint: w.endpoint,
        backend: w.backend,
    })
}

/// The overlay peers of `node`: every other node that is not down and has a key and a subnet.
fn overlay_peers(state: &ClusterState, node: &str) -> Vec<pb::OverlayPeer> {
    state
        .nodes()
        .filter(|n| n.name != node && n.status != NodeStatus::Down)
        .filter_map(|n| {
            let wg = n.wireguard.as_ref()?;
            Some(pb::OverlayPeer {
                node: n.name.clone(),
                subnet: n.subnet.clone()?,
                public_key: wg.public_key.clone(),
                endpoint: wg.endpoint.clone(),
            })
        })
        .collect()
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
type ServicesStream = Pin<Box<dyn Stream<Item = Result<pb::ServiceSet, Status>> + Send>>;

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
                let wireguard = req.wireguard.map(wireguard_identity).transpose()?;
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
                    wireguard,
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
                            subnet_prefix: self.subnet_prefix,
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
                    cluster_cidr: self.cluster_cidr.clone(),
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
                    if let Some(wg) = &req.wireguard {
                        self.wireguard_status().insert(req.name.clone(), wg.clone());
                    }
                    for r in &req.allocations {
                        let status = report_status(r)?;
                        // Only what changed goes through the log.
                        let Some(a) = state.allocation(&r.id) else {
                            continue;
                        };
                        if a.node != req.name {
                            continue;
                        }
                        let ip = Some(r.ip.clone()).filter(|ip| !ip.is_empty());
                        if ip
                            .as_ref()
                            .is_some_and(|ip| ip.parse::<std::net::IpAddr>().is_err())
                        {
                            return Err(ApiError::BadRequest(format!(
                                "allocations: {}: ip {:?} is not an IP address",
                                r.id, r.ip
                            )));
                        }
                        let new_ip = ip.is_some() && a.ip != ip;
                        let health = match r.health.as_str() {
                            "" => None,
                            "starting" | "healthy" | "unhealthy" => Some(r.health.clone()),
                            other => {
                                return Err(ApiError::BadRequest(format!(
                                    "allocations: {}: unknown health {other:?}",
                                    r.id
                                )));
                            }
                        };
                        // Stored cut to 512 characters, so compared cut too (else a long
                        // output would be written through the log at every heartbeat).
                        let health_output: String = r.health_output.chars().take(512).collect();
                        let new_health = health.is_some()
                            && (a.health != health || a.health_output != health_output);
                        if a.observed != status || a.restarts < r.restarts || new_ip || new_health {
                            reports.push(AllocationReport {
                                id: r.id.clone(),
                                status,
                                restarts: r.restarts,
                                ip,
                                health,
                                health_output,
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
            let mut last: Option<(Vec<pb::AssignedAllocation>, Vec<pb::OverlayPeer>)> = None;
            while let Some(index) = applied.changed().await {
                let current = {
                    let state = &node.state().state;
                    (assigned(state, &name), overlay_peers(state, &name))
                };
                if last.as_ref() != Some(&current) {
                    let msg = pb::AssignedAllocations {
                        allocations: current.0.clone(),
                        index,
                        peers: current.1.clone(),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = Some(current);
                }
            }
        });
        Ok(Response::new(stream))
    }

    type WatchServicesStream = ServicesStream;

    async fn watch_services(
        &self,
        req: Request<pb::WatchServicesRequest>,
    ) -> Result<Response<Self::WatchServicesStream>, Status> {
        let node = req.into_inner().node;
        if !node.is_empty() {
            skiff_common::validate_name("node", &node).map_err(ApiError::from)?;
        }
        let raft = self.ctx.node.clone();
        let mut applied = raft.applied_watch();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<Vec<pb::ServiceInfo>> = None;
            while let Some(index) = applied.changed().await {
                let set = super::services::services(&raft.state().state, None);
                if last.as_ref() != Some(&set) {
                    let msg = pb::ServiceSet {
                        services: set.clone(),
                        index,
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = Some(set);
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        // WireGuard state lives in the leader's memory: a follower asks the leader (once; a
        // forwarded request is answered locally).
        let forwarded = req.metadata().get(FORWARDED_METADATA).is_some();
        let req = req.into_inner();
        if !forwarded
            && self.ctx.node.status().role != Role::Leader
            && let Some(resp) = self.list_nodes_on_leader(&req).await
        {
            return Ok(Response::new(resp));
        }
        self.ctx
            .track("ListNodes", async {
                self.ctx.read_barrier(req.read.as_ref()).await?;
                let applied = self.ctx.node.state();
                Ok(pb::ListNodesResponse {
                    nodes: self.nodes_pb(&applied.state, applied.state.nodes()),
                })
            })
            .await
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let req = req.into_inner();
        self.ctx.track("RemoveNode", self.remove(req.name)).await
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
                let node = self
                    .nodes_pb(&applied.state, applied.state.node(&req.name).into_iter())
                    .pop();
                Ok(pb::SetDrainResponse {
                    node,
                    changed: target.is_some(),
                })
            })
            .await
    }
}

impl NodesApi {
    async fn remove(&self, name: String) -> Result<pb::RemoveNodeResponse, ApiError> {
        let (outcome, _) = self
            .ctx
            .node
            .write(Command::RemoveNode {
                name: name.clone(),
                at_ms: now_ms(),
            })
            .await?;
        let Outcome::NodeRemoved { subnet, lost, .. } = outcome? else {
            return Err(ApiError::BadRequest(format!(
                "node {name}: unexpected outcome of a removal"
            )));
        };
        // Leader memory about it goes too (a node of that name may register again).
        self.wireguard_status().remove(&name);
        self.heartbeats.forget(&name);
        tracing::info!(node = %name, subnet = ?subnet, lost, "node removed");
        Ok(pb::RemoveNodeResponse {
            name,
            subnet: subnet.unwrap_or_default(),
            lost: u32::try_from(lost).unwrap_or(u32::MAX),
        })
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
