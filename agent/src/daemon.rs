//! The node agent as a daemon: registers with the controllers, heartbeats with what it
//! observes of its allocations, watches what it should run (a server stream), and reconciles
//! the containers on this host to it.
//!
//! The reconciler ([`crate::reconcile`]) runs the containers: its own are labelled with their
//! allocation, anything else on the host (containers started by hand) is left alone.
//! Containers outlive the agent (each has its monitor): a restarted agent finds them by label
//! and adopts them instead of starting them again. Until the first assignment arrives from a
//! controller, nothing is stopped.
//!
//! The network ([`crate::net`]) comes up before registering (the registration carries the
//! node's WireGuard key and endpoint); the pod subnet in the answer configures the bridge; the
//! other nodes arrive with every assignment and become WireGuard peers.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_proto::v1 as pb;
use skiff_proto::v1::nodes_client::NodesClient;
use skiff_tls::TlsContext;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::contract::{self, Assigned};
use crate::net::Network;
use crate::reconcile::{self, Failures};
use skiff_runtime::container::Runtime;
use skiff_runtime::image::RegistryOptions;

/// The metadata key the controllers put the leader's address in (see the Nodes API).
const LEADER_METADATA: &str = "x-skiff-leader";

/// What the daemon needs to know.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub controllers: Vec<String>,
    pub name: String,
    pub advertise_addr: IpAddr,
    pub labels: BTreeMap<String, String>,
    pub data_dir: PathBuf,
    pub cgroup_parent: String,
    /// Where containers' live state goes (`--run-dir`); `None`: beside each record.
    pub run_dir: Option<PathBuf>,
    pub registry: RegistryOptions,
    /// Where the agent's own API (logs, exec) listens.
    pub listen: std::net::SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_listen: std::net::SocketAddr,
    /// What this node offers: cores, bytes, processes.
    pub cpu: f64,
    pub memory: u64,
    pub pids: u32,
    pub net: crate::net::NetOptions,
    /// `--dns-upstream`; empty: the host's resolv.conf.
    pub dns_upstreams: Vec<String>,
    /// What tasks may use of the host (local image dirs, devices).
    pub policy: crate::policy::Policy,
    /// The token to enroll with when the node has no certificate yet.
    pub join_token: Option<skiff_tls::JoinToken>,
    /// The mesh sidecars.
    pub mesh: crate::mesh::MeshOptions,
    /// Percent used of the data directory's filesystem at which disk pressure starts.
    pub disk_pressure_threshold: u8,
}

/// The node's DNS server: the zone it answers from (kept when the controllers are away) and
/// whether it is listening yet (it binds the bridge address, known after registering).
struct Dns {
    zone: crate::dns::SharedZone,
    upstreams: Arc<Vec<std::net::SocketAddr>>,
    stats: Arc<crate::dns::DnsStats>,
    started: std::sync::atomic::AtomicBool,
}

impl Dns {
    fn start(&self, gateway: std::net::Ipv4Addr) {
        if self.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let addr = std::net::SocketAddr::new(gateway.into(), 53);
        let (zone, upstreams, stats) = (
            self.zone.clone(),
            self.upstreams.clone(),
            self.stats.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = crate::dns::serve(addr, zone, upstreams, stats).await {
                warn!(%addr, error = %e, "DNS server not running");
            }
        });
    }
}

/// Runs the daemon until the process is told to stop (SIGINT/SIGTERM). Containers keep
/// running when it stops.
pub async fn run(cfg: DaemonConfig) -> anyhow::Result<()> {
    let mut runtime =
        Runtime::open_with_run_dir(&cfg.data_dir, &cfg.cgroup_parent, cfg.run_dir.as_deref())?;
    runtime.set_pull_options(cfg.registry.clone(), None);
    let opts = cfg.net.clone();
    let network = Arc::new(
        tokio::task::spawn_blocking(move || Network::open(opts))
            .await?
            .map_err(|e| anyhow::anyhow!("network: {e}"))?,
    );
    runtime.set_network(network.clone());
    // A monitor is started ahead of each container start, so no start waits for its exec.
    runtime.keep_spare_monitor();
    // A removed container's files are deleted off the reconciler's path.
    runtime.delete_in_background()?;
    let runtime = Arc::new(runtime);
    {
        let rt = runtime.clone();
        let cleaned = tokio::task::spawn_blocking(move || rt.gc()).await??;
        if !cleaned.is_empty() {
            info!(
                count = cleaned.len(),
                "cleaned up after an interrupted agent"
            );
        }
    }
    let tls_dir = crate::tls::tls_dir(&cfg.data_dir);
    let sans = crate::tls::sans(cfg.advertise_addr, cfg.listen);
    let material = crate::tls::material(
        &tls_dir,
        &cfg.name,
        &cfg.controllers,
        cfg.join_token.as_ref(),
        &sans,
    )
    .await?;
    let tls = TlsContext::new(material)?;
    let trust: Arc<crate::tls::Trust> = Arc::default();
    let renewal = tokio::spawn(crate::tls::renew_when_due(
        tls.clone(),
        tls_dir.clone(),
        trust.clone(),
        cfg.controllers.clone(),
        sans,
    ));
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", cfg.listen))?;
    let mesh = Arc::new(crate::mesh::Mesh::new(
        cfg.mesh.clone(),
        tokio::runtime::Handle::current(),
    )?);
    let mesh_renewal = {
        let mesh = mesh.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                mesh.renew_due().await;
            }
        })
    };
    let lease = Arc::new(crate::fence::Lease::open(
        cfg.data_dir.join(crate::fence::LEASE_FILE),
    ));
    let node_runtime = Arc::new(crate::pods::NodeRuntime::new(
        runtime.clone(),
        crate::volumes::Volumes::new(&cfg.data_dir),
        Arc::new(cfg.policy.clone()),
        cfg.advertise_addr,
        mesh.clone(),
        lease.clone(),
    ));
    let api = crate::api::AgentApi::new(
        runtime.clone(),
        node_runtime.clone(),
        cfg.data_dir.clone(),
        cfg.cgroup_parent.clone(),
    );
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(skiff_tls::AuthzLayer::new(tls.clone(), crate::tls::policy))
            .add_service(skiff_proto::v1::agent_server::AgentServer::new(api))
            .serve_with_incoming(skiff_tls::net::incoming(listener, tls.clone(), false)),
    );
    let dns_stats: Arc<crate::dns::DnsStats> = Arc::default();
    let (desired_tx, desired_rx) = watch::channel::<Option<Vec<Assigned>>>(None);
    let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-listen {}: {e}", cfg.metrics_listen))?;
    let metrics = tokio::spawn(
        axum::serve(
            metrics_listener,
            crate::metrics::router(crate::metrics::Sources {
                network: network.clone(),
                runtime: runtime.clone(),
                dns: dns_stats.clone(),
                mesh: mesh.clone(),
                desired: desired_rx.clone(),
                node: cfg.name.clone(),
                tls: tls.clone(),
            }),
        )
        .into_future(),
    );
    let dns = Arc::new(Dns {
        zone: Default::default(),
        upstreams: Arc::new(crate::dns::upstreams(&cfg.dns_upstreams)),
        stats: dns_stats.clone(),
        started: Default::default(),
    });
    let reports: Arc<Mutex<Vec<pb::AllocationReport>>> = Arc::default();

    let checker = crate::health::Checker::default();
    let checks = tokio::spawn(checker.clone().run());
    let reconciler = tokio::spawn(reconcile_loop(
        node_runtime.clone(),
        network.clone(),
        checker,
        desired_rx,
        reports.clone(),
    ));
    let host = Arc::new(LocalHost {
        cfg: cfg.clone(),
        runtime: runtime.clone(),
        network,
        dns,
        tls,
        tls_dir,
        trust,
        mesh,
        desired: desired_tx,
        reports,
        vips: Mutex::default(),
        disk: Arc::new(Mutex::new(crate::disk::Pressure::new(
            cfg.disk_pressure_threshold,
        ))),
        disk_pressure: Arc::default(),
        lease,
    });
    let control = tokio::spawn(control_loop(host, cfg.controllers.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("agent stopping; containers keep running");
    control.abort();
    renewal.abort();
    mesh_renewal.abort();
    reconciler.abort();
    checks.abort();
    server.abort();
    metrics.abort();
    Ok(())
}

/// The node a session with the controllers speaks for: this host ([`LocalHost`]: containers,
/// network, DNS, mesh) or one of many simulated ones (`skiff-agent simulate`,
/// [`crate::simulate`]). The protocol (connecting, following leader hints, registering, the
/// assignment and service watches, heartbeats, registering again when forgotten, reconnecting
/// with a renewed certificate) is this module's code for both.
pub trait Host: Send + Sync + 'static {
    /// The node's name (its certificate's identity).
    fn name(&self) -> &str;
    /// The node's TLS material.
    fn tls(&self) -> &Arc<TlsContext>;
    /// What the node registers with.
    fn registration(&self) -> pb::RegisterNodeRequest;
    /// The controllers accepted the registration: set up what the answer gives (the pod
    /// subnet, the service range) and what needs the channel.
    fn registered(
        &self,
        answer: &pb::RegisterNodeResponse,
        channel: &Channel,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// A new service set (DNS, VIPs, the mesh's upstreams).
    fn services(&self, set: pb::ServiceSet) -> impl Future<Output = ()> + Send;
    /// A new assignment: what to run, and when they changed the whole set of overlay peers
    /// (deltas already folded in; `set.peers` is empty); `None`: the peers are as before.
    fn assigned(
        &self,
        set: pb::AssignedAllocations,
        peers: Option<contract::Peers>,
    ) -> impl Future<Output = ()> + Send;
    /// An assignment message as it came off the wire (before deltas are folded in).
    fn received(&self, _msg: &pb::AssignedAllocations) {}
    /// The next heartbeat (what the node observes of its allocations), without the WireGuard
    /// status: the session adds that to the heartbeats that carry it ([`WireguardReports`]).
    fn heartbeat(&self) -> impl Future<Output = pb::HeartbeatRequest> + Send;
    /// A digest of the WireGuard peers (public key, endpoint) and how many there are
    /// ([`crate::contract::peers_digest`]), taken without copying them: it decides whether a
    /// heartbeat carries the status. `None`: no WireGuard device.
    fn wireguard_digest(&self) -> Option<(u64, usize)>;
    /// The WireGuard status, built only for the heartbeats that carry it.
    fn wireguard_status(&self) -> Option<pb::WireguardStatus>;
    /// A trust bundle came with a heartbeat's answer.
    fn trust(&self, bundle: &pb::TrustBundle);
    /// A heartbeat sent at `sent_ns` (`CLOCK_BOOTTIME`) was answered by the leader.
    fn answered(&self, _reply: &pb::HeartbeatResponse, _sent_ns: u64) {}
}

/// This host as a [`Host`]: what a session with the controllers drives.
struct LocalHost {
    mesh: Arc<crate::mesh::Mesh>,
    cfg: DaemonConfig,
    runtime: Arc<Runtime>,
    network: Arc<Network>,
    dns: Arc<Dns>,
    tls: Arc<TlsContext>,
    tls_dir: PathBuf,
    trust: Arc<crate::tls::Trust>,
    desired: watch::Sender<Option<Vec<Assigned>>>,
    reports: Arc<Mutex<Vec<pb::AllocationReport>>>,
    /// The VIP table last applied since registering: an unchanged one is not re-applied.
    vips: Mutex<Option<String>>,
    /// Disk pressure: the state (held while pruning) and what the heartbeats report.
    disk: Arc<Mutex<crate::disk::Pressure>>,
    disk_pressure: Arc<std::sync::atomic::AtomicBool>,
    /// The fencing lease the leader's answers renew.
    lease: Arc<crate::fence::Lease>,
}

impl LocalHost {
    /// Reads how full the data directory's filesystem is, pruning what no container uses
    /// when it is past the threshold; returns the pressure to report. A slow read or prune
    /// does not hold up the heartbeat: it reports the last value meanwhile.
    async fn disk_pressure(&self) -> bool {
        use std::sync::atomic::Ordering;
        let (dir, rt) = (self.cfg.data_dir.clone(), self.runtime.clone());
        let (state, reported) = (self.disk.clone(), self.disk_pressure.clone());
        let read = tokio::task::spawn_blocking(move || {
            let Ok(mut p) = state.try_lock() else {
                return; // a prune is still running
            };
            let mut used = match crate::disk::used_percent(&dir) {
                Ok(u) => u,
                Err(e) => {
                    warn!(error = %e, "reading the data directory's disk usage");
                    return;
                }
            };
            if p.prune_due(used, std::time::Instant::now()) {
                if let Err(e) = rt.gc() {
                    warn!(error = %e, "disk pressure: removing container leftovers");
                }
                match rt.prune_images(true) {
                    Ok(r) => info!(
                        used_percent = used,
                        images = r.images.len(),
                        layers = r.layers.len(),
                        freed = r.bytes,
                        "disk pressure: removed what no container uses"
                    ),
                    Err(e) => warn!(error = %e, "disk pressure: pruning images"),
                }
                used = crate::disk::used_percent(&dir).unwrap_or(used);
            }
            reported.store(p.observe(used), Ordering::SeqCst);
        });
        let _ = tokio::time::timeout(Duration::from_millis(500), read).await;
        self.disk_pressure.load(Ordering::SeqCst)
    }
}

impl Host for LocalHost {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn tls(&self) -> &Arc<TlsContext> {
        &self.tls
    }

    fn registration(&self) -> pb::RegisterNodeRequest {
        let (cfg, network) = (&self.cfg, &self.network);
        pb::RegisterNodeRequest {
            name: cfg.name.clone(),
            address: cfg.advertise_addr.to_string(),
            labels: cfg.labels.clone().into_iter().collect(),
            resources: Some(pb::NodeResources {
                cpu: cfg.cpu,
                memory: cfg.memory,
                pids: cfg.pids,
            }),
            agent_addr: agent_addr(cfg.listen, cfg.advertise_addr).to_string(),
            metrics_addr: agent_addr(cfg.metrics_listen, cfg.advertise_addr).to_string(),
            wireguard: Some(pb::WireguardIdentity {
                public_key: network.public_key().to_base64(),
                endpoint: network.endpoint().to_string(),
                backend: contract::backend(network.backend()) as i32,
            }),
            host_volume_dirs: cfg
                .policy
                .host_volume_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect(),
            capabilities: skiff_common::capability::ALL
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
        }
    }

    async fn registered(
        &self,
        answer: &pb::RegisterNodeResponse,
        channel: &Channel,
    ) -> Result<(), String> {
        configure_network(&self.runtime, &self.network, answer).await?;
        if let Some(s) = self.network.subnet() {
            self.dns.start(s.gateway());
        }
        self.mesh.set_channel(Some(channel.clone()));
        self.mesh.set_service_cidr(&answer.service_cidr);
        *lock(&self.vips) = None;
        Ok(())
    }

    async fn services(&self, msg: pb::ServiceSet) {
        self.mesh.set_services(&msg.services);
        let z = Arc::new(crate::dns::Zone::build(&msg.services));
        *self
            .dns
            .zone
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = z;
        if let Some(subnet) = self.network.subnet() {
            let rules = crate::net::vip::render(
                &contract::vip_services(&msg.services),
                &subnet.to_string(),
                crate::net::BRIDGE,
            );
            if lock(&self.vips).as_ref() != Some(&rules) {
                let r = rules.clone();
                match tokio::task::spawn_blocking(move || crate::net::vip::apply(&r)).await {
                    Ok(Ok(())) => *lock(&self.vips) = Some(rules),
                    Ok(Err(e)) => warn!(error = %e, "programming service VIPs"),
                    Err(e) => warn!(error = %e, "programming service VIPs"),
                }
            }
        }
        debug!(
            services = msg.services.len(),
            index = msg.index,
            "service set"
        );
    }

    async fn assigned(&self, msg: pb::AssignedAllocations, peers: Option<contract::Peers>) {
        let set: Vec<Assigned> = msg
            .allocations
            .into_iter()
            .map(contract::assigned)
            .collect();
        debug!(
            count = set.len(),
            index = msg.index,
            peers_changed = peers.is_some(),
            "assignment"
        );
        if let Some(peers) = peers {
            let peers = contract::overlay_peers(peers.iter().map(|p| &**p));
            let n = self.network.clone();
            match tokio::task::spawn_blocking(move || n.set_peers(peers)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "applying WireGuard peers"),
                Err(e) => warn!(error = %e, "applying WireGuard peers"),
            }
        }
        self.desired.send_replace(Some(set));
    }

    async fn heartbeat(&self) -> pb::HeartbeatRequest {
        let allocations = lock(&self.reports).clone();
        // Request counts of the sidecars a rollout's analysis watches.
        let watched: Vec<String> = self
            .desired
            .borrow()
            .iter()
            .flatten()
            .filter(|a| {
                a.task
                    .as_ref()
                    .is_ok_and(|t| t.mesh.as_ref().is_some_and(|m| m.request_stats))
            })
            .map(|a| a.id.clone())
            .collect();
        let request_stats = if watched.is_empty() {
            Vec::new()
        } else {
            let (mesh, rt) = (self.mesh.clone(), self.runtime.clone());
            tokio::task::spawn_blocking(move || {
                mesh.request_stats(&watched, |alloc| rt.pod(alloc).map(|p| p.dir.join("net")))
            })
            .await
            .unwrap_or_default()
        };
        // What each allocation uses (for `skiff top` and the status page); a slow read
        // does not hold up the heartbeat (liveness) beyond a moment.
        let usage = {
            let (rt, assigned) = (
                self.runtime.clone(),
                self.desired.borrow().clone().unwrap_or_default(),
            );
            let read = tokio::task::spawn_blocking(move || {
                crate::usage::to_proto(&crate::usage::collect(&rt, &assigned))
            });
            match tokio::time::timeout(Duration::from_millis(500), read).await {
                Ok(Ok(u)) => u,
                _ => Vec::new(),
            }
        };
        pb::HeartbeatRequest {
            name: self.cfg.name.clone(),
            request_stats,
            usage,
            allocations,
            // Added by the session when due.
            wireguard: None,
            trust_version: self.trust.version.load(std::sync::atomic::Ordering::SeqCst),
            named_volumes: crate::volumes::Volumes::new(&self.cfg.data_dir).keys(),
            disk_pressure: self.disk_pressure().await,
        }
    }

    fn wireguard_digest(&self) -> Option<(u64, usize)> {
        self.network.status_digest()
    }

    fn wireguard_status(&self) -> Option<pb::WireguardStatus> {
        wireguard_status(&self.network)
    }

    fn trust(&self, bundle: &pb::TrustBundle) {
        crate::tls::apply_bundle(&self.tls, &self.tls_dir, &self.trust, bundle);
    }

    fn answered(&self, reply: &pb::HeartbeatResponse, sent_ns: u64) {
        if reply.known {
            self.lease.renew(sent_ns, reply.leased.clone());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Connects to a controller (following leader hints), registers, then heartbeats and watches
/// until the connection breaks; then the next controller. Runs until aborted.
pub async fn control_loop<H: Host>(host: Arc<H>, controllers: Vec<String>) {
    let mut next = 0usize;
    let mut hint: Option<String> = None;
    loop {
        let addr = match hint.take() {
            Some(h) => h,
            None => {
                let a = controllers[next % controllers.len()].clone();
                next += 1;
                a
            }
        };
        match session(&host, &addr).await {
            Ok(()) => {}
            Err(SessionEnd::Leader(leader)) => {
                debug!(%addr, %leader, "redirected to the leader");
                hint = Some(leader);
                continue;
            }
            Err(SessionEnd::Renewed) => {
                info!(controller = %addr, "reconnecting with the renewed certificate");
                hint = Some(addr);
                continue;
            }
            Err(SessionEnd::Failed(e)) => {
                warn!(node = host.name(), controller = %addr, error = %e, "controller connection lost");
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

enum SessionEnd {
    /// Talk to this address instead.
    Leader(String),
    /// The node's certificate was renewed: connect again with it.
    Renewed,
    Failed(String),
}

fn session_err(s: tonic::Status) -> SessionEnd {
    if s.code() == tonic::Code::FailedPrecondition
        && let Some(leader) = s.metadata().get(LEADER_METADATA)
        && let Ok(l) = leader.to_str()
    {
        return SessionEnd::Leader(l.to_owned());
    }
    SessionEnd::Failed(format!("{}: {}", s.code(), s.message()))
}

/// Where other hosts reach the agent's API: the listen address, or the advertise address on
/// the listen port when listening on all addresses.
fn agent_addr(listen: std::net::SocketAddr, advertise: IpAddr) -> std::net::SocketAddr {
    if listen.ip().is_unspecified() {
        std::net::SocketAddr::new(advertise, listen.port())
    } else {
        listen
    }
}

async fn connect(addr: &str, tls: &Arc<TlsContext>) -> Result<Channel, SessionEnd> {
    let addr = addr.strip_prefix("http://").unwrap_or(addr);
    let ep = skiff_tls::net::endpoint(addr)
        .map_err(|e| SessionEnd::Failed(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10));
    skiff_tls::net::channel(tls, ep).await.map_err(|e| {
        SessionEnd::Failed(format!(
            "connecting to {addr}: {}",
            crate::tls::error_chain(&e)
        ))
    })
}

async fn session<H: Host>(host: &Arc<H>, addr: &str) -> Result<(), SessionEnd> {
    let serial = host.tls().info().serial;
    let channel = connect(addr, host.tls()).await?;
    let mut client = NodesClient::new(channel.clone());
    let register = host.registration();
    let registered = client
        .register(register.clone())
        .await
        .map_err(session_err)?
        .into_inner();
    let interval = Duration::from_millis(registered.heartbeat_interval_ms.clamp(100, 10_000));
    info!(node = host.name(), controller = %addr, subnet = %registered.subnet, "registered");
    host.registered(&registered, &channel)
        .await
        .map_err(SessionEnd::Failed)?;
    // The service set: its own stream; what it last gave stays if it breaks.
    let mut services_client = NodesClient::new(channel.clone());
    let node = host.name().to_owned();
    let h = host.clone();
    let mut services = tokio::spawn(async move {
        let mut stream = services_client
            .watch_services(pb::WatchServicesRequest { node })
            .await?
            .into_inner();
        while let Some(msg) = stream.message().await? {
            h.services(msg).await;
        }
        Ok::<(), tonic::Status>(())
    });

    // The watch: its own task, on the same connection (no per-request timeout on a stream).
    let mut watch_client = NodesClient::new(channel.clone());
    let name = host.name().to_owned();
    let h = host.clone();
    let mut watch = tokio::spawn(async move {
        let mut stream = watch_client
            .watch_allocations(pb::WatchAllocationsRequest {
                node: name,
                peers_delta: true,
            })
            .await?
            .into_inner();
        // Each stream starts from a whole peer set; deltas fold into it.
        let mut peers = contract::PeerSet::default();
        while let Some(mut msg) = stream.message().await? {
            h.received(&msg);
            let changed = peers.absorb(&mut msg).map_err(tonic::Status::data_loss)?;
            h.assigned(msg, changed).await;
        }
        Ok::<(), tonic::Status>(())
    });
    // However the session ends, its streams end with it.
    let _streams = AbortOnDrop([watch.abort_handle(), services.abort_handle()]);
    let mut tick = tokio::time::interval(interval);
    let mut wireguard = WireguardReports::default();
    loop {
        tokio::select! {
            res = &mut watch => {
                return Err(match res {
                    Ok(Ok(())) => SessionEnd::Failed("watch stream ended".into()),
                    Ok(Err(s)) => session_err(s),
                    Err(e) => SessionEnd::Failed(e.to_string()),
                });
            }
            res = &mut services => {
                return Err(match res {
                    Ok(Ok(())) => SessionEnd::Failed("services stream ended".into()),
                    Ok(Err(s)) => session_err(s),
                    Err(e) => SessionEnd::Failed(e.to_string()),
                });
            }
            _ = tick.tick() => {}
        }
        if host.tls().info().serial != serial {
            return Err(SessionEnd::Renewed);
        }
        let mut beat = host.heartbeat().await;
        if wireguard.due(host.wireguard_digest()) {
            beat.wireguard = host.wireguard_status();
        }
        // Taken before sending: the lease never runs later than the leader's record of it.
        let sent_ns = skiff_runtime::fence::boottime_ns();
        // A heartbeat not answered in time ends the session: a new connection gets through
        // as soon as the network does, where the old one waits out TCP's retransmission
        // backoff (seconds after a blip of a few).
        let mut req = tonic::Request::new(beat);
        req.set_timeout(HEARTBEAT_TIMEOUT);
        let reply = match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.heartbeat(req)).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "heartbeat not answered within {HEARTBEAT_TIMEOUT:?}"
            ))),
        };
        if let Ok(r) = &reply {
            host.answered(r.get_ref(), sent_ns);
            if let Some(bundle) = &r.get_ref().trust {
                host.trust(bundle);
            }
        }
        match reply {
            Ok(r) if r.get_ref().known => {}
            Ok(_) => {
                info!(
                    node = host.name(),
                    "controllers do not know this node; registering again"
                );
                let registered = client
                    .register(register.clone())
                    .await
                    .map_err(session_err)?
                    .into_inner();
                host.registered(&registered, &channel)
                    .await
                    .map_err(SessionEnd::Failed)?;
            }
            Err(s) => return Err(session_err(s)),
        }
    }
}

/// How long a heartbeat may wait for its answer before the session is started afresh.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a heartbeat carries the node's WireGuard status when its peers are unchanged.
const WIREGUARD_EVERY: u32 = 10;

/// After a change of the peers, a status waits at least one heartbeat per this many peers
/// since the last one sent (at most [`WIREGUARD_EVERY`]).
const WIREGUARD_PEERS_PER_BEAT: usize = 50;

/// Which heartbeats of a session carry the WireGuard status: it lists every other node (at a
/// few hundred nodes, tens of kilobytes per heartbeat, every node every second, all decoded
/// by the leader), so it goes with the first heartbeat, when the set of peers or their
/// endpoints change, and every [`WIREGUARD_EVERY`]th heartbeat otherwise (handshake times and
/// byte counts in `skiff nodes --peers` are that fresh; the agent's /metrics has them live).
/// The controllers keep the last status they were sent.
///
/// A change goes out at once in a small cluster; in a big one it waits a heartbeat per
/// [`WIREGUARD_PEERS_PER_BEAT`] peers since the last status. Without that, while hundreds of
/// nodes register, every node's peers change every second and every heartbeat carried its
/// whole status: at 500 simulated nodes the leader then decoded 250,000 peer entries a second
/// and answered some heartbeats after their 2 s timeout, and those nodes started their
/// sessions again (skiff-bench-scale, 2026-12-05).
#[derive(Default)]
struct WireguardReports {
    /// The digest of the peers last sent ([`crate::contract::peers_digest`]: no copy, it is
    /// taken every second over every other node), and heartbeats since.
    sent: Option<u64>,
    since: u32,
}

impl WireguardReports {
    /// Whether this heartbeat carries the status, given the peers' digest and count now
    /// (`None`: there is no status to send).
    fn due(&mut self, now: Option<(u64, usize)>) -> bool {
        let Some((peers, count)) = now else {
            return false;
        };
        let gap = u32::try_from(count / WIREGUARD_PEERS_PER_BEAT)
            .unwrap_or(u32::MAX)
            .clamp(1, WIREGUARD_EVERY);
        self.since += 1;
        let due = match self.sent {
            None => true,
            Some(sent) if sent == peers => self.since >= WIREGUARD_EVERY,
            Some(_) => self.since >= gap,
        };
        if due {
            self.sent = Some(peers);
            self.since = 0;
        }
        due
    }
}

/// Aborts the tasks when dropped.
struct AbortOnDrop<const N: usize>([tokio::task::AbortHandle; N]);

impl<const N: usize> Drop for AbortOnDrop<N> {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Reconciles whenever the assignment changes, and every 2 s to follow container state.
async fn reconcile_loop(
    runtime: Arc<crate::pods::NodeRuntime>,
    network: Arc<Network>,
    checker: crate::health::Checker,
    mut desired: watch::Receiver<Option<Vec<Assigned>>>,
    reports: Arc<Mutex<Vec<pb::AllocationReport>>>,
) {
    let failures: Arc<Failures> = Arc::default();
    loop {
        let want = desired.borrow_and_update().clone();
        // The tunnel process is supervised here: restarted and reconfigured if it died.
        let net = network.clone();
        match tokio::task::spawn_blocking(move || net.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "network sync"),
            Err(e) => warn!(error = %e, "network sync panicked"),
        }
        if let Some(want) = want {
            let (rt, f, c) = (runtime.clone(), failures.clone(), checker.clone());
            let dns = network.subnet().map(|s| s.gateway());
            match tokio::task::spawn_blocking(move || {
                let lease = rt.lease.clone();
                let gate = move |a: &Assigned| lease.refuse(a);
                let mut reports =
                    reconcile::reconcile_once(rt.as_ref(), &want, &f, &rt.policy, dns, &gate);
                reconcile::health_checks(rt.as_ref(), &want, &c, &mut reports);
                reports
            })
            .await
            {
                Ok(r) => {
                    *reports
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = r;
                }
                Err(e) => warn!(error = %e, "reconcile pass panicked"),
            }
        }
        tokio::select! {
            r = desired.changed() => if r.is_err() { return },
            _ = runtime.lease.confirmed() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Sets up the bridge for the subnet the controllers gave this node, then frees addresses of
/// containers that no longer exist.
async fn configure_network(
    runtime: &Arc<Runtime>,
    network: &Arc<Network>,
    registered: &pb::RegisterNodeResponse,
) -> Result<(), String> {
    if registered.subnet.is_empty() {
        return Err("the controllers gave this node no pod subnet".into());
    }
    let (net, rt) = (network.clone(), runtime.clone());
    let (subnet, cluster) = (registered.subnet.clone(), registered.cluster_cidr.clone());
    let services = registered.service_cidr.clone();
    tokio::task::spawn_blocking(move || {
        net.configure(
            &subnet,
            &cluster,
            (!services.is_empty()).then_some(services.as_str()),
        )?;
        // Addresses are held by pods, and by containers from before pods.
        let mut live: std::collections::HashSet<String> = rt
            .store()
            .list()
            .map(|l| l.into_iter().map(|(c, _)| c.id).collect())
            .unwrap_or_default();
        live.extend(rt.pods());
        let freed = net.gc(&live);
        if freed > 0 {
            info!(freed, "released addresses of containers that are gone");
        }
        Ok::<(), crate::net::NetError>(())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("network: {e}"))
}

/// The device state for the heartbeat (the last read, refreshed every reconcile pass).
fn wireguard_status(network: &Network) -> Option<pb::WireguardStatus> {
    let (status, peers) = network.status()?;
    let names: std::collections::HashMap<_, _> =
        peers.iter().map(|x| (&x.public_key, &x.node)).collect();
    Some(pb::WireguardStatus {
        backend: contract::backend(network.backend()) as i32,
        public_key: network.public_key().to_base64(),
        listen_port: u32::from(status.listen_port),
        peers: status
            .peers
            .iter()
            .map(|p| pb::WireguardPeerStatus {
                node: names
                    .get(&p.public_key)
                    .map(|n| (*n).clone())
                    .unwrap_or_default(),
                public_key: p.public_key.to_base64(),
                endpoint: p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                allowed_ips: p
                    .allowed_ips
                    .iter()
                    .map(|(ip, prefix)| format!("{ip}/{prefix}"))
                    .collect(),
                last_handshake_unix: p.last_handshake.map_or(0, |h| h.0),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                persistent_keepalive: u32::from(p.keepalive),
            })
            .collect(),
        // Counted by the controllers.
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_redirect_names_the_leader_and_other_errors_end_the_session() {
        let mut s = tonic::Status::failed_precondition("not the leader");
        s.metadata_mut().insert(
            LEADER_METADATA,
            "198.18.0.2:7700".parse().expect("metadata value"),
        );
        assert!(matches!(session_err(s), SessionEnd::Leader(l) if l == "198.18.0.2:7700"));
        let plain = tonic::Status::failed_precondition("not the leader");
        assert!(matches!(session_err(plain), SessionEnd::Failed(_)));
        let down = tonic::Status::unavailable("connection refused");
        assert!(
            matches!(session_err(down), SessionEnd::Failed(m) if m.contains("connection refused"))
        );
    }

    #[test]
    fn wireguard_status_goes_first_on_change_and_every_tenth_heartbeat() {
        let digest =
            |peers: &[(&str, &str)]| Some(crate::contract::peers_digest(peers.iter().copied()));
        let mut w = WireguardReports::default();
        let mut sent = Vec::new();
        for i in 0..25 {
            // The peer set changes at beat 14 (a new endpoint), then stays.
            let ep = if i < 14 {
                "198.18.0.2:51820"
            } else {
                "198.18.0.9:51820"
            };
            if w.due(digest(&[("k1", ep)])) {
                sent.push(i);
            }
        }
        assert_eq!(sent, vec![0, 10, 14, 24]);
        // With 200 peers a change waits for 4 heartbeats since the last status.
        let many = |tag: usize| -> Vec<(String, String)> {
            (0..200)
                .map(|p| (format!("k{p}"), format!("198.18.{tag}.{p}:51820")))
                .collect()
        };
        let mut w = WireguardReports::default();
        let mut sent = Vec::new();
        for i in 0..12usize {
            // A new endpoint set at every beat from 1 to 6, then none.
            let set = many(i.min(6));
            let refs: Vec<(&str, &str)> =
                set.iter().map(|(k, e)| (k.as_str(), e.as_str())).collect();
            if w.due(digest(&refs)) {
                sent.push(i);
            }
        }
        assert_eq!(sent, vec![0, 4, 8]);
        // A node without WireGuard status sends none, and it does not count as a heartbeat
        // since the last status.
        let since = w.since;
        assert!(!w.due(None));
        assert_eq!(w.since, since);
        // The digest follows order, keys and endpoints.
        assert_ne!(
            digest(&[("a", "1"), ("b", "2")]),
            digest(&[("b", "2"), ("a", "1")])
        );
        assert_ne!(digest(&[("a", "1")]), digest(&[("a", "2")]));
        assert_eq!(digest(&[("a", "1")]).map(|d| d.1), Some(1));
    }

    #[test]
    fn the_agent_api_is_advertised_where_others_reach_it() {
        let adv: IpAddr = "198.18.0.5".parse().expect("ip");
        let any: std::net::SocketAddr = "0.0.0.0:7801".parse().expect("addr");
        assert_eq!(agent_addr(any, adv).to_string(), "198.18.0.5:7801");
        let specific: std::net::SocketAddr = "10.0.0.5:9000".parse().expect("addr");
        assert_eq!(agent_addr(specific, adv), specific);
    }
}
