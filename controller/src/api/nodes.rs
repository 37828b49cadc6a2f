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

use prost::Message as _;

use super::{ApiContext, ApiError, convert, now_ms};
use crate::raft::Role;
use crate::reconcile::{self, Heartbeats};
use crate::state::{
    AllocationReport, ClusterState, Command, Node, NodeResources, NodeStatus, Outcome,
};

/// How often agents are told to heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// A node's last reported WireGuard status as the leader keeps it. Every node lists every
/// other, so the peers are kept encoded (as structs, the N x N of them took about 100 MB of
/// the leader's memory at 500 nodes; encoded, a quarter), with their handshake times for the
/// counts `skiff nodes` shows.
pub struct StoredWireguard {
    /// The status without its peers.
    brief: pb::WireguardStatus,
    /// Each peer's last handshake (Unix seconds, 0 never).
    handshakes: Vec<i64>,
    /// The peers, as a `WireguardStatus` message holding only them.
    peers: Vec<u8>,
}

impl StoredWireguard {
    pub fn new(mut status: pb::WireguardStatus) -> StoredWireguard {
        let handshakes = status.peers.iter().map(|p| p.last_handshake_unix).collect();
        let peers = pb::WireguardStatus {
            peers: std::mem::take(&mut status.peers),
            ..Default::default()
        }
        .encode_to_vec();
        StoredWireguard {
            brief: status,
            handshakes,
            peers,
        }
    }

    /// The status with its peers counted (`now`: Unix seconds; a handshake in the last 3
    /// minutes counts), and listed only when `peers`.
    pub fn view(&self, now: i64, peers: bool) -> pb::WireguardStatus {
        let mut s = self.brief.clone();
        s.peer_count = self.handshakes.len() as u32;
        s.peers_handshaken = self
            .handshakes
            .iter()
            .filter(|&&h| h > 0 && now - h < 180)
            .count() as u32;
        if peers {
            // Encoded here from a decoded message: decoding cannot fail but for a bug.
            s.peers = pb::WireguardStatus::decode(self.peers.as_slice())
                .map(|p| p.peers)
                .unwrap_or_default();
        }
        s
    }
}

/// The metadata key carrying the leader's address when a follower refuses a heartbeat.
pub const LEADER_METADATA: &str = "x-skiff-leader";

/// Marks a request a follower passed on to the leader (so it is not passed on again).
const FORWARDED_METADATA: &str = "x-skiff-forwarded";

/// Serves `skiff.v1.Nodes`.
pub struct NodesApi {
    ctx: ApiContext,
    heartbeats: Heartbeats,
    /// Each node's last reported WireGuard state (leader memory: it changes every second and
    /// is not worth a log entry).
    wireguard: Arc<Mutex<HashMap<String, StoredWireguard>>>,
    /// Assignments and services as of the last applied entry, shared by every watch.
    published: tokio::sync::watch::Receiver<Arc<super::published::Published>>,
}

impl NodesApi {
    pub fn new(ctx: ApiContext, heartbeats: Heartbeats) -> Self {
        let published = super::published::spawn(ctx.node.clone());
        NodesApi {
            ctx,
            heartbeats,
            wireguard: Default::default(),
            published,
        }
    }

    fn wireguard_status(&self) -> std::sync::MutexGuard<'_, HashMap<String, StoredWireguard>> {
        self.wireguard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn list_nodes_on_leader(
        &self,
        req: &pb::ListNodesRequest,
    ) -> Option<pb::ListNodesResponse> {
        let (_, leader) = self.ctx.node.leader()?;
        let mut client =
            pb::nodes_client::NodesClient::new(self.ctx.node.channel(&leader.rpc_addr).ok()?);
        let mut r = Request::new(*req);
        r.set_timeout(Duration::from_secs(5));
        r.metadata_mut().insert(
            FORWARDED_METADATA,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        client.list_nodes(r).await.ok().map(Response::into_inner)
    }

    /// The nodes as the API gives them: WireGuard peers counted, and listed only when
    /// `peers` (every node lists every other: N x N in all).
    fn nodes_pb<'a>(
        &self,
        state: &ClusterState,
        nodes: impl Iterator<Item = &'a Node>,
        peers: bool,
    ) -> Vec<pb::Node> {
        let usage = reconcile::usage_by_node(state);
        let wg = self.wireguard_status();
        let now = now_ms() / 1000;
        let ages: HashMap<String, Duration> = if self.ctx.node.status().role == Role::Leader {
            self.heartbeats.ages().into_iter().collect()
        } else {
            HashMap::new()
        };
        nodes
            .map(|n| {
                let mut p = convert::node(n, usage.get(n.name.as_str()));
                p.wireguard_status = wg.get(&n.name).map(|s| s.view(now, peers));
                p.heartbeat_age_ms = ages
                    .get(&n.name)
                    .map_or(-1, |a| i64::try_from(a.as_millis()).unwrap_or(i64::MAX));
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

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::AssignedAllocations, Status>> + Send>>;
type ServicesStream = Pin<Box<dyn Stream<Item = Result<pb::ServiceSet, Status>> + Send>>;

#[tonic::async_trait]
impl Nodes for NodesApi {
    async fn register(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        self.require_leader()?;
        super::act_as_node(&req, &req.get_ref().name)?;
        let req = req.into_inner();
        self.ctx
            .track("Register", async {
                skiff_common::validate_name("name", &req.name)?;
                let address: std::net::IpAddr = req.address.parse().map_err(|_| {
                    ApiError::BadRequest(format!("address: {:?} is not an IP address", req.address))
                })?;
                let wireguard = req.wireguard.map(convert::wireguard_identity).transpose()?;
                let host_volume_dirs = convert::host_volume_dirs(&req.host_volume_dirs)?;
                let capabilities = skiff_common::capability::parse(&req.capabilities)
                    .map_err(ApiError::BadRequest)?;
                // Shown to Prometheus as a target: a socket address or nothing.
                let metrics_addr = match req.metrics_addr.as_str() {
                    "" => String::new(),
                    a => a
                        .parse::<std::net::SocketAddr>()
                        .map_err(|_| {
                            ApiError::BadRequest(format!(
                                "metrics_addr: {a:?} is not an address:port"
                            ))
                        })?
                        .to_string(),
                };
                let r = req.resources.unwrap_or_default();
                if !r.cpu.is_finite() || r.cpu <= 0.0 || r.memory == 0 || r.pids == 0 {
                    return Err(ApiError::BadRequest(
                        "resources: cpu, memory and pids must be positive".into(),
                    ));
                }
                let (existing, settings) = {
                    let applied = self.ctx.node.state();
                    (
                        applied.state.node(&req.name).cloned(),
                        applied.state.settings().cloned(),
                    )
                };
                let settings = settings.ok_or_else(|| {
                    ApiError::NotReady(
                        "the cluster's settings are not committed yet; register again shortly"
                            .into(),
                    )
                })?;
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
                    metrics_addr,
                    subnet: existing.as_ref().and_then(|n| n.subnet.clone()),
                    wireguard,
                    host_volume_dirs,
                    named_volumes: existing
                        .as_ref()
                        .map(|n| n.named_volumes.clone())
                        .unwrap_or_default(),
                    disk_pressure: existing.as_ref().is_some_and(|n| n.disk_pressure),
                    capabilities,
                };
                self.heartbeats.beat(&node.name);
                let name = node.name.clone();
                if existing.as_ref() != Some(&node) || node.subnet.is_none() {
                    let (result, _) = self
                        .ctx
                        .node
                        .write(Command::RegisterNode {
                            node,
                            cluster_cidr: settings.cluster_cidr.clone(),
                            subnet_prefix: settings.node_subnet_prefix,
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
                    cluster_cidr: settings.cluster_cidr,
                    service_cidr: settings.service_cidr,
                })
            })
            .await
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.require_leader()?;
        super::act_as_node(&req, &req.get_ref().name)?;
        let req = req.into_inner();
        self.ctx
            .track("Heartbeat", async {
                let reports;
                let trust;
                let volumes;
                let pressure;
                {
                    let applied = self.ctx.node.state();
                    let state = &applied.state;
                    if state.node(&req.name).is_none() {
                        return Ok(pb::HeartbeatResponse {
                            known: false,
                            trust: None,
                            leased: Vec::new(),
                        });
                    }
                    let pki = state.pki();
                    trust = (pki.version != req.trust_version).then(|| pb::TrustBundle {
                        version: pki.version,
                        ca_pem: pki.ca_bundle(),
                        revoked_serials: pki.revoked().cloned().collect(),
                        active_ca_pem: pki
                            .active()
                            .map(|c| c.key.cert_pem.clone())
                            .unwrap_or_default(),
                    });
                    // Answered only by a leader a quorum confirmed lately, and not while the
                    // node's fenced allocations are being declared lost: the node's fencing
                    // lease runs from the heartbeats answered (see crate::reconcile::fence_of).
                    if !self
                        .ctx
                        .node
                        .leadership_confirmed(crate::reconcile::LEADER_LEASE)
                    {
                        return Err(ApiError::NotReady(format!(
                            "this leader's leadership was not confirmed by a quorum in the last {:?}",
                            crate::reconcile::LEADER_LEASE
                        )));
                    }
                    if !self.heartbeats.beat_unless_fencing(&req.name) {
                        return Err(ApiError::NotReady(
                            "the node's fenced allocations are being declared lost; try again"
                                .into(),
                        ));
                    }
                    // Counts of this node's own allocations only, well formed.
                    let samples = req
                        .request_stats
                        .iter()
                        .filter(|r| {
                            state
                                .allocation(&r.allocation)
                                .is_some_and(|a| a.node == req.name)
                                && r.bucket_bounds.len() == r.bucket_counts.len()
                                && r.bucket_bounds.len() <= crate::reconcile::analysis::MAX_BUCKETS
                                && r.errors <= r.requests
                        })
                        .map(|r| {
                            (
                                r.allocation.clone(),
                                crate::reconcile::analysis::RequestSample {
                                    requests: r.requests,
                                    errors: r.errors,
                                    buckets: r
                                        .bucket_bounds
                                        .iter()
                                        .copied()
                                        .zip(r.bucket_counts.iter().copied())
                                        .collect(),
                                },
                            )
                        })
                        .collect();
                    self.heartbeats.record_requests(&req.name, samples);
                    // Usage of this node's own allocations only, finite figures.
                    let usage = req
                        .usage
                        .iter()
                        .filter(|u| {
                            state
                                .allocation(&u.allocation)
                                .is_some_and(|a| a.node == req.name)
                                && u.cpu_seconds.is_finite()
                                && u.cpu_seconds >= 0.0
                        })
                        .map(|u| {
                            (
                                u.allocation.clone(),
                                u.cpu_seconds,
                                u.memory_bytes,
                                u.memory_limit_bytes,
                                u.oom_kills,
                            )
                        })
                        .collect();
                    self.heartbeats.record_usage(&req.name, usage);
                    if let Some(wg) = &req.wireguard {
                        self.wireguard_status()
                            .insert(req.name.clone(), StoredWireguard::new(wg.clone()));
                    }
                    reports = changed_reports(state, &req.name, &req.allocations)?;
                    volumes = convert::named_volumes(&req.named_volumes)?
                        .filter(|v| state.node(&req.name).is_some_and(|n| n.named_volumes != *v));
                    pressure = state
                        .node(&req.name)
                        .is_some_and(|n| n.disk_pressure != req.disk_pressure)
                        .then_some(req.disk_pressure);
                }
                // A cluster part-way through an upgrade cannot record disk pressure yet (an
                // older member could not read it): the heartbeat goes on, and the pressure is
                // written by the first heartbeat after the upgrade.
                let pressure = pressure.filter(|p| {
                    let c = Command::SetNodeDiskPressure {
                        name: req.name.clone(),
                        pressure: *p,
                        at_ms: 0,
                    };
                    self.ctx
                        .node
                        .allows(&c)
                        .inspect_err(|e| tracing::debug!(node = %req.name, error = %e, "disk pressure not recorded"))
                        .is_ok()
                });
                if let Some(pressure) = pressure {
                    if pressure {
                        tracing::warn!(node = %req.name, "disk pressure: nothing new is placed on the node");
                    } else {
                        tracing::info!(node = %req.name, "disk pressure gone");
                    }
                    self.ctx
                        .node
                        .write(Command::SetNodeDiskPressure {
                            name: req.name.clone(),
                            pressure,
                            at_ms: now_ms(),
                        })
                        .await?
                        .0?;
                }
                if let Some(volumes) = volumes {
                    self.ctx
                        .node
                        .write(Command::SetNodeVolumes {
                            name: req.name.clone(),
                            volumes,
                        })
                        .await?
                        .0?;
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
                // Read after the heartbeat was recorded: any allocation declared lost before
                // that is left out.
                let leased = {
                    let applied = self.ctx.node.state();
                    let state = &applied.state;
                    state
                        .node_allocations(&req.name)
                        .filter(|a| a.holds() && crate::reconcile::fence_of(state, a).is_some())
                        .map(|a| a.id.clone())
                        .collect()
                };
                Ok(pb::HeartbeatResponse {
                    known: true,
                    trust,
                    leased,
                })
            })
            .await
    }

    type WatchAllocationsStream = WatchStream;

    async fn watch_allocations(
        &self,
        req: Request<pb::WatchAllocationsRequest>,
    ) -> Result<Response<Self::WatchAllocationsStream>, Status> {
        super::act_as_node(&req, &req.get_ref().node)?;
        let req = req.into_inner();
        let name = req.node;
        skiff_common::validate_name("node", &name).map_err(ApiError::from)?;
        let mut published = self.published.clone();
        // An agent that asks for peer deltas on this stream gets the whole set first, then
        // what changed; any other gets whole sets (asked per stream, not read from the
        // node's record, which may be another build's or not applied here yet).
        let deltas = req.peers_delta;
        let stream = async_stream(move |tx| async move {
            let mut last: Option<(Arc<Vec<pb::AssignedAllocation>>, Arc<Vec<pb::OverlayPeer>>)> =
                None;
            loop {
                let msg = {
                    let p = published.borrow_and_update().clone();
                    let current = (
                        p.assignments.get(&name).cloned().unwrap_or_default(),
                        p.peers.clone(),
                    );
                    // A node with nothing assigned gets a fresh empty list each time: equal
                    // to the last one, not the same pointer.
                    let same = last.as_ref().is_some_and(|(a, peers)| {
                        (Arc::ptr_eq(a, &current.0) || (a.is_empty() && current.0.is_empty()))
                            && Arc::ptr_eq(peers, &current.1)
                    });
                    if same || p.index == 0 {
                        None
                    } else {
                        let msg = match &last {
                            Some((_, sent)) if deltas => p.assignment_delta_for(&name, sent),
                            _ => p.assignment_for(&name),
                        };
                        last = Some(current);
                        Some(msg)
                    }
                };
                if let Some(msg) = msg
                    && tx.send(Ok(msg)).await.is_err()
                {
                    return;
                }
                if published.changed().await.is_err() {
                    return;
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
        super::act_as_node(&req, &req.get_ref().node)?;
        let node = req.into_inner().node;
        if !node.is_empty() {
            skiff_common::validate_name("node", &node).map_err(ApiError::from)?;
        }
        let mut published = self.published.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<Arc<Vec<pb::ServiceInfo>>> = None;
            loop {
                let msg = {
                    let p = published.borrow_and_update().clone();
                    if p.index == 0 || last.as_ref().is_some_and(|l| Arc::ptr_eq(l, &p.services)) {
                        None
                    } else {
                        last = Some(p.services.clone());
                        Some(pb::ServiceSet {
                            services: p.services.as_ref().clone(),
                            index: p.index,
                        })
                    }
                };
                if let Some(msg) = msg
                    && tx.send(Ok(msg)).await.is_err()
                {
                    return;
                }
                if published.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_usage(
        &self,
        req: Request<pb::ListUsageRequest>,
    ) -> Result<Response<pb::ListUsageResponse>, Status> {
        // Usage lives in the leader's memory: a follower asks the leader (once).
        let forwarded = req.metadata().get(FORWARDED_METADATA).is_some();
        if self.ctx.node.status().role != Role::Leader {
            if forwarded {
                return Err(Status::unavailable("not the leader"));
            }
            let (_, leader) = self
                .ctx
                .node
                .leader()
                .ok_or_else(|| Status::unavailable("no leader known"))?;
            let mut client = pb::nodes_client::NodesClient::new(
                self.ctx
                    .node
                    .channel(&leader.rpc_addr)
                    .map_err(|e| Status::unavailable(e.to_string()))?,
            );
            let mut r = Request::new(pb::ListUsageRequest {});
            r.set_timeout(Duration::from_secs(5));
            r.metadata_mut().insert(
                FORWARDED_METADATA,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            return client.list_usage(r).await;
        }
        Ok(Response::new(pb::ListUsageResponse {
            usage: usage_pb(&self.heartbeats),
        }))
    }

    async fn liveness(
        &self,
        _req: Request<pb::LivenessRequest>,
    ) -> Result<Response<pb::LivenessResponse>, Status> {
        self.require_leader()?;
        Ok(Response::new(pb::LivenessResponse {
            nodes: self
                .heartbeats
                .ages()
                .into_iter()
                .map(|(node, age)| pb::NodeLiveness {
                    node,
                    age_ms: age.as_millis() as u64,
                })
                .collect(),
        }))
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
                    nodes: self.nodes_pb(&applied.state, applied.state.nodes(), req.peers),
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
                    .nodes_pb(
                        &applied.state,
                        applied.state.node(&req.name).into_iter(),
                        true,
                    )
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

/// What of an agent's reports must go through the log: only what changed (state, restarts,
/// address, health, lost output), and only for allocations of that node. Bad reports are
/// refused whole, naming the allocation and the field.
fn changed_reports(
    state: &ClusterState,
    node: &str,
    reports: &[pb::AllocationReport],
) -> Result<Vec<AllocationReport>, ApiError> {
    let mut out = Vec::new();
    for r in reports {
        let (status, health) = convert::report(r)?;
        let Some(a) = state.allocation(&r.id) else {
            continue;
        };
        if a.node != node {
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
        let containers = convert::container_statuses(&r.containers)?;
        let new_containers = containers.as_ref().is_some_and(|c| *c != a.containers);
        // Stored cut to 512 characters, so compared cut too (else a long output would be
        // written through the log at every heartbeat).
        let health_output: String = r.health_output.chars().take(512).collect();
        let new_health =
            health.is_some() && (a.health != health || a.health_output != health_output);
        // Lost output is recorded when it starts and then as it grows by a tenth (at least
        // 64 KiB), not at every heartbeat of a full disk.
        let old = a.log_dropped_bytes;
        let new_drops = r.log_dropped_bytes > old
            && (old == 0 || r.log_dropped_bytes >= old + (old / 10).max(64 << 10));
        if a.observed != status
            || a.restarts < r.restarts
            || new_ip
            || new_health
            || new_drops
            || new_containers
            || r.oom_kills > a.oom_kills
        {
            if new_drops {
                tracing::warn!(
                    alloc = %r.id,
                    node,
                    bytes = r.log_dropped_bytes,
                    error = %r.log_error,
                    "allocation output lost: its node cannot write the log"
                );
            }
            out.push(AllocationReport {
                id: r.id.clone(),
                status,
                restarts: r.restarts,
                ip,
                health,
                health_output,
                log_dropped_bytes: r.log_dropped_bytes,
                log_error: r.log_error.chars().take(512).collect(),
                containers,
                oom_kills: r.oom_kills,
            });
        }
    }
    Ok(out)
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

/// The leader's last usage figures of every allocation.
pub fn usage_pb(heartbeats: &Heartbeats) -> Vec<pb::AllocationUsageRate> {
    heartbeats
        .usage()
        .into_iter()
        .map(|(node, allocation, u)| pb::AllocationUsageRate {
            allocation,
            node,
            cpu_cores: u.cpu_cores,
            memory_bytes: u.memory_bytes,
            memory_limit_bytes: u.memory_limit_bytes,
            oom_kills: u.oom_kills,
            at_ms: u.at_ms,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Allocation, AllocationStatus, DesiredStatus, Health};

    #[test]
    fn node_lists_count_wireguard_peers_and_list_them_only_when_asked() {
        let peer = |node: &str, handshake: i64| pb::WireguardPeerStatus {
            node: node.into(),
            last_handshake_unix: handshake,
            ..Default::default()
        };
        let status = pb::WireguardStatus {
            listen_port: 51820,
            peers: vec![peer("a", 1_000), peer("b", 900), peer("c", 0)],
            ..Default::default()
        };
        // At 1,100 s: a's handshake is 100 s old, b's 200 s (stale), c never had one.
        let stored = StoredWireguard::new(status.clone());
        let brief = stored.view(1_100, false);
        assert_eq!((brief.peer_count, brief.peers_handshaken), (3, 1));
        assert!(brief.peers.is_empty());
        assert_eq!(brief.listen_port, 51820);
        let full = stored.view(1_100, true);
        assert_eq!(full.peers, status.peers);
        assert_eq!((full.peer_count, full.peers_handshaken), (3, 1));
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for n in ["n1", "n2"] {
            s.apply(&Command::UpsertNode {
                node: Node::for_test(n),
            })
            .expect("node");
        }
        s.apply(&Command::ApplyJob {
            spec: Box::new(skiff_common::JobSpec::new("web", "img")),
            at_ms: 1,
        })
        .expect("job");
        let alloc = |id: &str, node: &str| Allocation {
            id: id.into(),
            namespace: "default".into(),
            job: "web".into(),
            job_version: 1,
            node: node.into(),
            desired: DesiredStatus::Run,
            observed: AllocationStatus::Running,
            restarts: 0,
            created_at_ms: 1,
            observed_at_ms: 1,
            ip: Some("10.42.0.2".into()),
            health: Some(Health::Healthy),
            health_output: "ok".into(),
            log_dropped_bytes: 0,
            log_error: String::new(),
            containers: Vec::new(),
            healthy_since_ms: Some(1),
            drain_since_ms: None,
            oom_kills: 0,
        };
        s.apply(&Command::PlaceAllocations {
            allocations: vec![alloc("a1", "n1"), alloc("b1", "n2")],
        })
        .expect("place");
        s
    }

    fn same(id: &str) -> pb::AllocationReport {
        pb::AllocationReport {
            id: id.into(),
            state: pb::AllocationState::Running as i32,
            ip: "10.42.0.2".into(),
            health: pb::Health::Healthy as i32,
            health_output: "ok".into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_changes_of_the_nodes_own_allocations_go_through_the_log() {
        let s = state();
        // Nothing new; another node's allocation and an unknown one are ignored.
        let quiet = [same("a1"), same("b1"), same("ghost")];
        assert!(changed_reports(&s, "n1", &quiet).expect("valid").is_empty());
        // Each kind of change is one report.
        for change in [
            pb::AllocationReport {
                state: pb::AllocationState::Exited as i32,
                ..same("a1")
            },
            pb::AllocationReport {
                restarts: 1,
                ..same("a1")
            },
            pb::AllocationReport {
                ip: "10.42.0.9".into(),
                ..same("a1")
            },
            pb::AllocationReport {
                health: pb::Health::Unhealthy as i32,
                ..same("a1")
            },
            pb::AllocationReport {
                log_dropped_bytes: 100,
                ..same("a1")
            },
        ] {
            let out = changed_reports(&s, "n1", std::slice::from_ref(&change)).expect("valid");
            assert_eq!(out.len(), 1, "{change:?}");
        }
        // A long health output is compared as it is stored, cut.
        let mut s2 = s.clone();
        let long = pb::AllocationReport {
            health_output: "x".repeat(2000),
            ..same("a1")
        };
        let out = changed_reports(&s2, "n1", std::slice::from_ref(&long)).expect("valid");
        s2.apply(&Command::ReportAllocations {
            reports: out,
            at_ms: 2,
        })
        .expect("report");
        assert!(
            changed_reports(&s2, "n1", &[long])
                .expect("valid")
                .is_empty()
        );
    }

    #[test]
    fn lost_output_is_written_when_it_starts_and_as_it_grows_by_a_tenth() {
        let mut s = state();
        let lost = |bytes: u64| pb::AllocationReport {
            log_dropped_bytes: bytes,
            ..same("a1")
        };
        let out = changed_reports(&s, "n1", &[lost(1 << 20)]).expect("valid");
        s.apply(&Command::ReportAllocations {
            reports: out,
            at_ms: 2,
        })
        .expect("report");
        assert!(
            changed_reports(&s, "n1", &[lost((1 << 20) + 1000)])
                .expect("valid")
                .is_empty()
        );
        assert_eq!(
            changed_reports(&s, "n1", &[lost(2 << 20)])
                .expect("valid")
                .len(),
            1
        );
    }

    #[test]
    fn a_bad_report_is_refused_naming_the_allocation() {
        let s = state();
        let bad_ip = pb::AllocationReport {
            ip: "not-an-ip".into(),
            ..same("a1")
        };
        let e = changed_reports(&s, "n1", &[same("a1"), bad_ip]).expect_err("bad ip");
        assert_eq!(
            e.to_string(),
            "allocations: a1: ip \"not-an-ip\" is not an IP address"
        );
        let lost = pb::AllocationReport {
            state: pb::AllocationState::Lost as i32,
            ..same("a1")
        };
        assert!(changed_reports(&s, "n1", &[lost]).is_err());
    }
}
