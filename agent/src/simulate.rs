//! `skiff-agent simulate`: many agents in one process, for measuring the control plane at
//! scale on one machine. Each simulated node enrolls with the join token (its own key and
//! certificate, kept under `<data-dir>/simulate/<name>/tls`), then runs the daemon's own
//! session code ([`crate::daemon::control_loop`]: register, the assignment and service
//! watches, heartbeats, leader hints, renewal) and the daemon's own reconciler
//! ([`crate::reconcile::reconcile_once`]) against a container runtime kept in memory: what is
//! assigned is "started" at once and reported running, health checks pass, nothing runs.
//!
//! Node `i` (from 0) is `<prefix><i+1>` at loopback address 127.1.(i/250).(i%250+1): nothing
//! outside this machine is ever named, and nothing listens there (the controllers dial an
//! agent only for `skiff logs` and `exec`). Every `--report-every` a JSON line on stdout gives
//! the counters a benchmark reads ([`Stats`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use serde::Serialize;
use skiff_proto::v1 as pb;
use skiff_runtime::store::{State, Status};
use skiff_tls::TlsContext;
use tonic::transport::Channel;
use tracing::warn;

use crate::contract::{self, Assigned, ContainerTask, Task};
use crate::daemon::Host;
use crate::health::Probe;
use crate::reconcile::{self, Containers, Failures, Observed};
use skiff_runtime::devices::DeviceNode;

/// The most nodes one process simulates (addresses run out past 250 x 255).
pub const MAX_NODES: usize = 20_000;

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The controllers' gRPC addresses, comma-separated.
    #[arg(long = "controller", value_delimiter = ',', required = true)]
    pub controllers: Vec<String>,
    /// How many nodes to simulate.
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Node names are this prefix and a number from 1.
    #[arg(long, default_value = "sim-")]
    pub name_prefix: String,
    /// The join token (`skiff token create --role agent --uses 0`) every node enrolls with
    /// on its first start.
    #[arg(long, env = "SKIFF_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Cores each node offers.
    #[arg(long, default_value_t = 8.0)]
    pub cpus: f64,
    /// Memory each node offers.
    #[arg(long, default_value = "16Gi")]
    pub memory: String,
    /// Processes each node offers.
    #[arg(long, default_value_t = 32_768)]
    pub pids: u32,
    /// Labels of every node: k=v,k=v (`zone` is spread over a, b, c when not given).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Nodes started per second (enrolling all at once would only measure the CA).
    #[arg(long, default_value_t = 100)]
    pub ramp: u32,
    /// How often the counters are printed (a JSON line on stdout).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub report_every: Duration,
    /// Worker threads of the process.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

/// What the simulated nodes did, summed; printed as one JSON line per report.
#[derive(Debug, Default)]
pub struct Stats {
    enrolled: AtomicU64,
    registrations: AtomicU64,
    heartbeats: AtomicU64,
    assignments: AtomicU64,
    assignment_bytes: AtomicU64,
    peers_received: AtomicU64,
    service_sets: AtomicU64,
    service_bytes: AtomicU64,
}

/// One report line.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Milliseconds since the process started.
    pub t_ms: u64,
    pub nodes: usize,
    pub enrolled: u64,
    /// Nodes whose last heartbeat was answered within three heartbeat intervals.
    pub live: usize,
    pub registrations: u64,
    pub heartbeats: u64,
    /// Assignment messages received, their encoded bytes and the overlay peers they held.
    pub assignments: u64,
    pub assignment_bytes: u64,
    pub peers_received: u64,
    pub service_sets: u64,
    pub service_bytes: u64,
    /// Allocations the nodes report running.
    pub running: usize,
    /// The earliest of the nodes' last answered heartbeats (ms since the process started; 0
    /// while a node has none): after a failover, every node is back once it passes the kill.
    pub min_answered_ms: u64,
}

/// The address of node `i` (from 0).
pub fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Runs the simulated nodes until SIGINT/SIGTERM.
pub fn run(args: &SimulateArgs, data_dir: &std::path::Path) -> anyhow::Result<()> {
    if args.count == 0 || args.count > MAX_NODES {
        anyhow::bail!("--count must be between 1 and {MAX_NODES}");
    }
    skiff_common::validate_name("node", &format!("{}{}", args.name_prefix, args.count))
        .map_err(|e| anyhow::anyhow!("--name-prefix: {e}"))?;
    if !(args.cpus.is_finite() && args.cpus > 0.0) {
        anyhow::bail!("--cpus: {} is not a positive number", args.cpus);
    }
    let memory = args
        .memory
        .parse::<skiff_common::ByteSize>()
        .map_err(|e| anyhow::anyhow!("--memory: {e}"))?
        .as_u64();
    let mut labels = BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--labels: {l:?} is not key=value"))?;
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    let token = args
        .join_token
        .as_deref()
        .map(|t| {
            t.parse::<skiff_tls::JoinToken>()
                .map_err(|e| anyhow::anyhow!("--join-token: {e}"))
        })
        .transpose()?;
    if args.ramp == 0 || args.threads == 0 || args.report_every.is_zero() {
        anyhow::bail!("--ramp, --threads and --report-every must be above 0");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let spec = Spec {
        controllers: args.controllers.clone(),
        prefix: args.name_prefix.clone(),
        labels,
        resources: pb::NodeResources {
            cpu: args.cpus,
            memory,
            pids: args.pids,
        },
        dir: data_dir.join("simulate"),
        token,
        started: Instant::now(),
    };
    runtime.block_on(simulate(spec, args.count, args.ramp, args.report_every))
}

/// What every node shares.
struct Spec {
    controllers: Vec<String>,
    prefix: String,
    labels: BTreeMap<String, String>,
    resources: pb::NodeResources,
    dir: PathBuf,
    token: Option<skiff_tls::JoinToken>,
    /// When the process started: report times count from it.
    started: Instant,
}

async fn simulate(spec: Spec, count: usize, ramp: u32, every: Duration) -> anyhow::Result<()> {
    let spec = Arc::new(spec);
    let stats: Arc<Stats> = Arc::default();
    let nodes: Arc<Mutex<Vec<Arc<SimNode>>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    // Nodes come up at `ramp` per second; each enrolls, then runs its session forever.
    let starter = {
        let (spec, stats, nodes) = (spec.clone(), stats.clone(), nodes.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / ramp);
            for i in 0..count {
                tick.tick().await;
                let (spec, stats, nodes) = (spec.clone(), stats.clone(), nodes.clone());
                tasks.spawn(async move {
                    match SimNode::enroll(&spec, i, stats).await {
                        Ok(node) => {
                            let node = Arc::new(node);
                            lock(&nodes).push(node.clone());
                            crate::daemon::control_loop(node, spec.controllers.clone()).await;
                        }
                        Err(e) => warn!(node = i + 1, error = %format!("{e:#}"), "enrolling"),
                    }
                });
            }
            tasks
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {}
        }
        let line = report(&stats, &lock(&nodes), count, spec.started);
        println!("{}", serde_json::to_string(&line)?);
    }
    starter.abort();
    Ok(())
}

fn report(stats: &Stats, nodes: &[Arc<SimNode>], count: usize, started: Instant) -> Report {
    let now = started.elapsed().as_millis() as u64;
    let since = |t: &AtomicU64| now.saturating_sub(t.load(Ordering::Relaxed));
    let live = nodes
        .iter()
        .filter(|n| n.last_ok.load(Ordering::Relaxed) > 0 && since(&n.last_ok) < 3_000)
        .count();
    let running = nodes.iter().map(|n| n.containers.running()).sum();
    let min_answered_ms = if nodes.len() < count {
        0
    } else {
        nodes
            .iter()
            .map(|n| n.last_ok.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    };
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Report {
        t_ms: now,
        nodes: count,
        enrolled: get(&stats.enrolled),
        live,
        registrations: get(&stats.registrations),
        heartbeats: get(&stats.heartbeats),
        assignments: get(&stats.assignments),
        assignment_bytes: get(&stats.assignment_bytes),
        peers_received: get(&stats.peers_received),
        service_sets: get(&stats.service_sets),
        service_bytes: get(&stats.service_bytes),
        running,
        min_answered_ms,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One simulated node.
struct SimNode {
    name: String,
    address: Ipv4Addr,
    spec: Arc<Spec>,
    labels: BTreeMap<String, String>,
    tls: Arc<TlsContext>,
    tls_dir: PathBuf,
    trust: Arc<crate::tls::Trust>,
    public_key: String,
    containers: SimContainers,
    failures: Failures,
    policy: crate::policy::Policy,
    /// Held through a reconcile pass: the watch and the heartbeat both reconcile, and two
    /// passes at once would both start what is missing (the daemon has one reconcile loop).
    pass: Mutex<()>,
    /// What the controllers assigned last (`None`: nothing yet, nothing is stopped).
    desired: Mutex<Option<Vec<Assigned>>>,
    /// The overlay peers of the last assignment, for the heartbeat's WireGuard status.
    peers: Mutex<contract::Peers>,
    /// When (ms since the process started) the last heartbeat was answered; 0: never.
    last_ok: AtomicU64,
    stats: Arc<Stats>,
}

impl SimNode {
    async fn enroll(spec: &Arc<Spec>, i: usize, stats: Arc<Stats>) -> anyhow::Result<SimNode> {
        let name = format!("{}{}", spec.prefix, i + 1);
        let address = address(i);
        let tls_dir = crate::tls::tls_dir(&spec.dir.join(&name));
        let sans = vec![address.to_string()];
        let material = crate::tls::material(
            &tls_dir,
            &name,
            &spec.controllers,
            spec.token.as_ref(),
            &sans,
        )
        .await?;
        let tls = TlsContext::new(material)?;
        let trust: Arc<crate::tls::Trust> = Arc::default();
        tokio::spawn(crate::tls::renew_when_due(
            tls.clone(),
            tls_dir.clone(),
            trust.clone(),
            spec.controllers.clone(),
            sans,
        ));
        stats.enrolled.fetch_add(1, Ordering::Relaxed);
        let mut labels = spec.labels.clone();
        labels
            .entry("zone".into())
            .or_insert_with(|| ["a", "b", "c"][i % 3].into());
        let key = crate::net::wg::Key::generate();
        Ok(SimNode {
            name,
            address,
            spec: spec.clone(),
            labels,
            tls,
            tls_dir,
            trust,
            public_key: crate::net::wg::Key(key.public()).to_base64(),
            containers: SimContainers::default(),
            failures: Failures::default(),
            policy: crate::policy::Policy::default(),
            pass: Mutex::default(),
            desired: Mutex::default(),
            peers: Mutex::default(),
            last_ok: AtomicU64::new(0),
            stats,
        })
    }

    /// One reconcile pass over the in-memory runtime: the daemon's reconciler, so
    /// allocations start, stop and report as on a real node. Health checks pass.
    fn reconcile(&self) -> Vec<pb::AllocationReport> {
        let _pass = lock(&self.pass);
        let Some(want) = lock(&self.desired).clone() else {
            return Vec::new();
        };
        let mut reports = reconcile::reconcile_once(
            &self.containers,
            &want,
            &self.failures,
            &self.policy,
            None,
            &reconcile::open_gate,
        );
        for r in &mut reports {
            let checked = want
                .iter()
                .find(|a| a.id == r.id)
                .and_then(|a| a.task.as_ref().ok())
                .is_some_and(|t| t.check.is_some());
            if checked && r.state == pb::AllocationState::Running as i32 {
                r.health = pb::Health::Healthy as i32;
            }
        }
        reports
    }
}

impl Host for SimNode {
    fn name(&self) -> &str {
        &self.name
    }

    fn tls(&self) -> &Arc<TlsContext> {
        &self.tls
    }

    fn registration(&self) -> pb::RegisterNodeRequest {
        pb::RegisterNodeRequest {
            name: self.name.clone(),
            address: self.address.to_string(),
            labels: self.labels.clone().into_iter().collect(),
            resources: Some(self.spec.resources),
            agent_addr: format!("{}:7801", self.address),
            metrics_addr: format!("{}:7802", self.address),
            wireguard: Some(pb::WireguardIdentity {
                public_key: self.public_key.clone(),
                endpoint: format!("{}:51820", self.address),
                backend: pb::WireguardBackend::Userspace as i32,
            }),
            host_volume_dirs: Vec::new(),
            // It starts no containers, so it can fence none.
            capabilities: Vec::new(),
        }
    }

    async fn registered(
        &self,
        answer: &pb::RegisterNodeResponse,
        _: &Channel,
    ) -> Result<(), String> {
        if answer.subnet.is_empty() {
            return Err("the controllers gave this node no pod subnet".into());
        }
        self.containers.set_subnet(&answer.subnet)?;
        self.stats.registrations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn services(&self, set: pb::ServiceSet) {
        self.stats.service_sets.fetch_add(1, Ordering::Relaxed);
        self.stats
            .service_bytes
            .fetch_add(set.encoded_len() as u64, Ordering::Relaxed);
    }

    fn received(&self, msg: &pb::AssignedAllocations) {
        let s = &self.stats;
        s.assignments.fetch_add(1, Ordering::Relaxed);
        s.assignment_bytes
            .fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
        s.peers_received
            .fetch_add(msg.peers.len() as u64, Ordering::Relaxed);
    }

    async fn assigned(&self, set: pb::AssignedAllocations, peers: Option<contract::Peers>) {
        if let Some(peers) = peers {
            *lock(&self.peers) = peers;
        }
        let want: Vec<Assigned> = set
            .allocations
            .into_iter()
            .map(contract::assigned)
            .collect();
        *lock(&self.desired) = Some(want);
        self.reconcile();
    }

    async fn heartbeat(&self) -> pb::HeartbeatRequest {
        let allocations = self.reconcile();
        pb::HeartbeatRequest {
            name: self.name.clone(),
            allocations,
            trust_version: self.trust.version.load(Ordering::SeqCst),
            ..Default::default()
        }
    }

    fn wireguard_digest(&self) -> Option<(u64, usize)> {
        Some(crate::contract::peers_digest(
            lock(&self.peers)
                .iter()
                .map(|p| (p.public_key.as_str(), p.endpoint.as_str())),
        ))
    }

    fn wireguard_status(&self) -> Option<pb::WireguardStatus> {
        // What a real node's WireGuard device lists: every peer it was given.
        let peers = lock(&self.peers)
            .iter()
            .map(|p| pb::WireguardPeerStatus {
                node: p.node.clone(),
                public_key: p.public_key.clone(),
                endpoint: p.endpoint.clone(),
                allowed_ips: vec![p.subnet.clone()],
                persistent_keepalive: 25,
                ..Default::default()
            })
            .collect();
        Some(pb::WireguardStatus {
            backend: pb::WireguardBackend::Userspace as i32,
            public_key: self.public_key.clone(),
            listen_port: 51820,
            peers,
            // Counted by the controllers.
            ..Default::default()
        })
    }

    fn answered(&self, _reply: &pb::HeartbeatResponse, _sent_ns: u64) {
        self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
        self.last_ok.store(
            self.spec.started.elapsed().as_millis() as u64 + 1,
            Ordering::Relaxed,
        );
    }

    fn trust(&self, bundle: &pb::TrustBundle) {
        crate::tls::apply_bundle(&self.tls, &self.tls_dir, &self.trust, bundle);
    }
}

/// A container runtime in memory: pods get an address of the node's subnet, containers run
/// from the moment they are started until stopped.
#[derive(Default)]
struct SimContainers(Mutex<SimState>);

#[derive(Default)]
struct SimState {
    /// The node's pod subnet: its network address and prefix length.
    subnet: Option<(u32, u8)>,
    pods: BTreeMap<String, Ipv4Addr>,
    containers: Vec<Observed>,
    next: u64,
}

impl SimContainers {
    fn set_subnet(&self, subnet: &str) -> Result<(), String> {
        let bad = || format!("the pod subnet {subnet:?} is not an IPv4 CIDR");
        let (ip, len) = subnet.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&len) {
            return Err(bad());
        }
        lock(&self.0).subnet = Some((u32::from(ip), len));
        Ok(())
    }

    fn running(&self) -> usize {
        lock(&self.0)
            .containers
            .iter()
            .filter(|c| {
                c.state.status == Status::Running && c.lifecycle == contract::Lifecycle::Main
            })
            .count()
    }
}

impl Containers for SimContainers {
    fn list(&self) -> Result<Vec<Observed>, String> {
        Ok(lock(&self.0).containers.clone())
    }

    fn pods(&self) -> Vec<String> {
        lock(&self.0).pods.keys().cloned().collect()
    }

    fn create_pod(&self, alloc: &Assigned, _: &Task) -> Result<(), String> {
        let mut s = lock(&self.0);
        if s.pods.contains_key(&alloc.id) {
            return Ok(());
        }
        let (net, len) = s.subnet.ok_or("no pod subnet yet")?;
        let size = 1u32 << (32 - len);
        // .0 is the network, .1 the bridge, the last the broadcast address.
        let used: std::collections::HashSet<Ipv4Addr> = s.pods.values().copied().collect();
        let free = (2..size - 1)
            .map(|h| Ipv4Addr::from(net + h))
            .find(|a| !used.contains(a))
            .ok_or_else(|| format!("no free address in the pod subnet ({} pods)", s.pods.len()))?;
        s.pods.insert(alloc.id.clone(), free);
        Ok(())
    }

    fn remove_pod(&self, alloc: &str) {
        lock(&self.0).pods.remove(alloc);
    }

    fn start(
        &self,
        alloc: &Assigned,
        _: &Task,
        c: &ContainerTask,
        _: &[DeviceNode],
        _: Option<Ipv4Addr>,
    ) -> Result<String, String> {
        let mut s = lock(&self.0);
        s.next += 1;
        let id = format!("sim{:012x}", s.next);
        let mut state = State::created();
        state.status = Status::Running;
        state.started_at_ms = Some(now_ms());
        s.containers.push(Observed {
            id: id.clone(),
            alloc: alloc.id.clone(),
            name: c.name.clone(),
            lifecycle: c.lifecycle,
            state,
            stop_grace: c.stop_grace,
        });
        Ok(id)
    }

    fn stop(&self, id: &str, _: Duration) -> Result<State, String> {
        let mut s = lock(&self.0);
        let c = s
            .containers
            .iter_mut()
            .find(|c| c.id == id)
            .ok_or_else(|| format!("no container {id}"))?;
        if c.state.status == Status::Running {
            c.state.status = Status::Exited;
            c.state.exit = Some(skiff_runtime::store::ExitInfo {
                code: None,
                signal: Some(15),
                oom_killed: false,
                at_ms: now_ms(),
            });
        }
        Ok(c.state.clone())
    }

    fn request_stop(&self, id: &str, grace: Duration) -> Result<(), String> {
        self.stop(id, grace).map(|_| ())
    }

    fn remove(&self, id: &str) -> Result<(), String> {
        lock(&self.0).containers.retain(|c| c.id != id);
        Ok(())
    }

    fn address(&self, alloc: &str, _: &str) -> Option<IpAddr> {
        lock(&self.0).pods.get(alloc).map(|a| IpAddr::V4(*a))
    }

    /// Never used: simulated checks pass without probing ([`SimNode::reconcile`]).
    fn probe(&self, alloc: &str, container: &str, _: &crate::contract::Check) -> Probe {
        Probe::Tcp {
            netns: None,
            addr: std::net::SocketAddr::new(
                self.address(alloc, container)
                    .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                0,
            ),
        }
    }

    fn tail(&self, _: &str, _: usize) -> String {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_are_distinct_loopback_addresses() {
        let all: std::collections::HashSet<Ipv4Addr> = (0..MAX_NODES).map(address).collect();
        assert_eq!(all.len(), MAX_NODES);
        assert!(all.iter().all(|a| a.is_loopback() && a.octets()[3] != 0));
        assert_eq!(address(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(address(250), Ipv4Addr::new(127, 1, 1, 1));
    }
}
