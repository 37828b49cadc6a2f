//! The node's part of the overlay network: a bridge (`skiff0`) holding the node's pod subnet,
//! a veth pair per container with an address from an on-disk IPAM store, egress masquerade,
//! and the WireGuard device (`skiff-wg`) with one peer per other node and a route per remote
//! subnet. Containers on one host talk over the bridge (no tunnel); across hosts through
//! WireGuard. All link, address and route changes go through rtnetlink ([`nl`]).

pub mod hostport;
pub mod ipam;
pub mod nl;
pub mod vip;
pub mod wg;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{info, warn};

pub use wg::{Backend, BackendChoice, Key, Peer};

/// The bridge's name.
pub const BRIDGE: &str = "skiff0";

/// Network failures, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    Netlink { what: String, reason: String },
    #[error("entering network namespace {path}: {reason}")]
    Netns { path: PathBuf, reason: String },
    #[error("no free address in pod subnet {subnet}")]
    Exhausted { subnet: String },
    #[error("{path}: not a base64 WireGuard key")]
    BadKey { path: PathBuf },
    #[error("--wireguard kernel: this kernel has no WireGuard module")]
    NoKernelWireguard,
    #[error("{reason}")]
    Tunnel { reason: String },
    #[error("WireGuard: {what}: {reason}")]
    Wireguard { what: String, reason: String },
    #[error("{what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("the pod network is not configured yet (the node has not registered)")]
    NotConfigured,
}

impl NetError {
    pub fn io(path: &Path, source: std::io::Error) -> NetError {
        NetError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An IPv4 network, `a.b.c.d/len`, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    net: u32,
    prefix: u8,
}

impl Subnet {
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.net)
    }
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }
    /// The gateway (the bridge's address): the first host.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.net + 1)
    }
    /// The first address for containers (after the gateway).
    pub fn first_host(&self) -> u32 {
        self.net + 2
    }
    /// The last address for containers (before broadcast).
    pub fn last_host(&self) -> u32 {
        (u64::from(self.net) + self.size() - 2) as u32
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let m = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        u32::from(ip) & m == self.net
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl std::str::FromStr for Subnet {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Subnet, NetError> {
        let bad = |reason| NetError::Invalid {
            what: "subnet",
            value: s.to_owned(),
            reason,
        };
        let (a, p) = s.split_once('/').ok_or_else(|| bad("not ADDRESS/PREFIX"))?;
        let a: Ipv4Addr = a.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = p.parse().map_err(|_| bad("bad prefix"))?;
        if !(8..=30).contains(&prefix) {
            return Err(bad("prefix must be 8 to 30"));
        }
        let net = u32::from(a);
        if net & ((1u32 << (32 - u32::from(prefix))) - 1) != 0 {
            return Err(bad("host bits set"));
        }
        Ok(Subnet { net, prefix })
    }
}

/// How the node's network is set up (agent flags).
#[derive(Clone, Debug)]
pub struct NetOptions {
    pub data_dir: PathBuf,
    /// The underlay address (WireGuard endpoint host).
    pub advertise: IpAddr,
    pub wg_port: u16,
    /// Persistent keepalive to every peer, seconds.
    pub keepalive: Option<u16>,
    pub backend: BackendChoice,
    /// Pod MTU; default: the underlay link's MTU minus WireGuard's overhead.
    pub mtu: Option<u32>,
}

/// The pod subnet and what hangs off it.
struct Plumbed {
    subnet: Subnet,
    cluster: Subnet,
    bridge: u32,
    ipam: ipam::Ipam,
}

/// The node's network.
pub struct Network {
    opts: NetOptions,
    dir: PathBuf,
    device: wg::Device,
    mtu: u32,
    plumbed: Mutex<Option<Plumbed>>,
    peers: Mutex<Vec<Peer>>,
    /// The last status read from the device (for heartbeats and metrics).
    last_status: Mutex<Option<wg::DeviceStatus>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Network {
    /// Loads (or creates) the host's key and brings up the WireGuard device. The pod subnet
    /// comes later, from the controllers ([`Network::configure`]).
    pub fn open(opts: NetOptions) -> Result<Network, NetError> {
        let dir = opts.data_dir.join("net");
        let wg_dir = dir.join("wg");
        let key = wg::load_or_create_key(&wg_dir)?;
        let device = wg::Device::open(&wg_dir, opts.backend, opts.wg_port, key)?;
        let advertise = opts.advertise;
        let mtu = match opts.mtu {
            Some(m) => m,
            // A single host on loopback: no tunnel traffic, but keep a common size.
            None if advertise.is_loopback() => 1500 - wg::OVERHEAD,
            None => {
                let underlay =
                    nl::with_handle(None, "reading the underlay MTU", move |h| async move {
                        nl::mtu_of_address(&h, advertise).await
                    })?
                    .unwrap_or(1500);
                underlay.saturating_sub(wg::OVERHEAD).max(1280)
            }
        };
        info!(
            backend = device.backend.as_str(),
            public_key = %Key(key.public()).to_base64(),
            mtu,
            "WireGuard device ready"
        );
        let net = Network {
            opts,
            dir,
            device,
            mtu,
            plumbed: Mutex::new(None),
            peers: Mutex::new(Vec::new()),
            last_status: Mutex::new(None),
        };
        net.link_up()?;
        Ok(net)
    }

    pub fn backend(&self) -> Backend {
        self.device.backend
    }

    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    pub fn public_key(&self) -> Key {
        Key(self.device.private_key.public())
    }

    /// The underlay endpoint other nodes send to.
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.opts.advertise, self.opts.wg_port)
    }

    /// The UAPI socket of a userspace device.
    pub fn uapi_socket(&self) -> Option<&Path> {
        (self.device.backend == Backend::Userspace).then(|| self.device.socket())
    }

    fn link_up(&self) -> Result<(), NetError> {
        let mtu = self.mtu;
        nl::with_handle(None, "bringing up skiff-wg", move |h| async move {
            if let Some(i) = nl::link_index(&h, wg::INTERFACE).await? {
                nl::up_with_mtu(&h, i, mtu).await?;
            }
            Ok(())
        })
    }

    /// Sets up the bridge for `subnet` (the node's, from the controllers), forwarding and
    /// masquerade of traffic leaving `cluster`, and a route for the `services` CIDR through the
    /// bridge (the node's own connections to a VIP need a route before nat OUTPUT rewrites
    /// them). Idempotent; a changed subnet moves the bridge.
    pub fn configure(
        &self,
        subnet: &str,
        cluster: &str,
        services: Option<&str>,
    ) -> Result<(), NetError> {
        let subnet: Subnet = subnet.parse()?;
        let cluster: Subnet = cluster.parse()?;
        let services: Option<Subnet> = services.map(str::parse).transpose()?;
        let mtu = self.mtu;
        let gw = subnet.gateway();
        let bridge = nl::with_handle(None, "setting up the bridge skiff0", move |h| async move {
            let index = nl::ensure_bridge(&h, BRIDGE, gw, subnet.prefix(), mtu).await?;
            if let Some(s) = services {
                nl::add_route(&h, s.network(), s.prefix(), index, gw).await?;
            }
            Ok(index)
        })?;
        let fwd = Path::new("/proc/sys/net/ipv4/ip_forward");
        std::fs::write(fwd, "1").map_err(|e| NetError::io(fwd, e))?;
        masquerade(&subnet, &cluster);
        let ipam = ipam::Ipam::open(self.dir.join("ipam"), subnet)?;
        let mut p = lock(&self.plumbed);
        if p.as_ref().map(|p| p.subnet) != Some(subnet) {
            info!(%subnet, %cluster, bridge = BRIDGE, gateway = %gw, "pod network configured");
        }
        *p = Some(Plumbed {
            subnet,
            cluster,
            bridge,
            ipam,
        });
        drop(p);
        self.sync_routes()
    }

    /// The node's pod subnet, once configured.
    pub fn subnet(&self) -> Option<Subnet> {
        lock(&self.plumbed).as_ref().map(|p| p.subnet)
    }

    /// Replaces the set of peers and applies it.
    pub fn set_peers(&self, peers: Vec<Peer>) -> Result<(), NetError> {
        *lock(&self.peers) = peers;
        self.sync()
    }

    /// Brings device, peers and routes to what they should be: restarts a userspace tunnel
    /// that died, re-adds what a restart lost. Called on every change and periodically.
    pub fn sync(&self) -> Result<(), NetError> {
        if self.device.ensure_running()? {
            warn!("the WireGuard device was gone; recreated it");
        }
        self.link_up()?;
        let peers = lock(&self.peers).clone();
        let changed = self.device.sync_peers(&peers, self.opts.keepalive)?;
        if changed > 0 {
            info!(changed, peers = peers.len(), "WireGuard peers updated");
        }
        self.sync_routes()?;
        *lock(&self.last_status) = Some(self.device.status()?);
        Ok(())
    }

    /// One route per peer subnet through skiff-wg (source: our gateway, so the answer comes
    /// back through the tunnel); routes to subnets no longer peered are removed.
    fn sync_routes(&self) -> Result<(), NetError> {
        let Some(src) = self.subnet().map(|s| s.gateway()) else {
            return Ok(());
        };
        let want: Vec<Subnet> = lock(&self.peers).iter().map(|p| p.subnet).collect();
        nl::with_handle(
            None,
            "routing peer subnets through skiff-wg",
            move |h| async move {
                let Some(index) = nl::link_index(&h, wg::INTERFACE).await? else {
                    return Ok(());
                };
                let have = nl::routes_via(&h, index).await?;
                for r in have {
                    let keep = nl::route_dst(&r).is_some_and(|(net, prefix)| {
                        want.iter()
                            .any(|s| s.network() == net && s.prefix() == prefix)
                    });
                    if !keep {
                        h.route().del(r).execute().await?;
                    }
                }
                for s in &want {
                    nl::add_route(&h, s.network(), s.prefix(), index, src).await?;
                }
                Ok(())
            },
        )
    }

    /// Gives the container whose network namespace is bound at `netns` an address and a veth
    /// into the bridge. Returns the address.
    pub fn attach(&self, id: &str, netns: &Path) -> Result<Ipv4Addr, NetError> {
        let (subnet, bridge) = {
            let p = lock(&self.plumbed);
            let p = p.as_ref().ok_or(NetError::NotConfigured)?;
            (p.subnet, p.bridge)
        };
        let ip = self.with_ipam(|i| i.allocate(id))?;
        let result = self.plumb(id, netns, ip, subnet, bridge);
        if let Err(e) = result {
            let _ = self.with_ipam(|i| i.release(id));
            let host = host_veth(id);
            let _ = nl::with_handle(None, "removing a half-made veth", move |h| async move {
                nl::delete_link(&h, &host).await
            });
            return Err(e);
        }
        Ok(ip)
    }

    fn plumb(
        &self,
        id: &str,
        netns: &Path,
        ip: Ipv4Addr,
        subnet: Subnet,
        bridge: u32,
    ) -> Result<(), NetError> {
        let host = host_veth(id);
        let peer = format!("sp{}", &host[2..]);
        let mtu = self.mtu;
        let ns = std::fs::File::open(netns).map_err(|e| NetError::io(netns, e))?;
        let fd = ns.as_raw_fd();
        let peer2 = peer.clone();
        nl::with_handle(None, "creating the container's veth", move |h| async move {
            nl::create_veth(&h, &host, &peer2, bridge, mtu, fd).await
        })?;
        drop(ns);
        nl::with_handle(
            Some(netns),
            "configuring eth0 in the container",
            move |h| async move {
                nl::configure_container_side(&h, &peer, ip, subnet.prefix(), subnet.gateway(), mtu)
                    .await
            },
        )
    }

    fn with_ipam<T>(
        &self,
        f: impl FnOnce(&ipam::Ipam) -> Result<T, NetError>,
    ) -> Result<T, NetError> {
        let p = lock(&self.plumbed);
        let p = p.as_ref().ok_or(NetError::NotConfigured)?;
        f(&p.ipam)
    }

    /// The address `id` holds.
    pub fn ip_of(&self, id: &str) -> Option<Ipv4Addr> {
        self.with_ipam(|i| i.get(id)).ok().flatten()
    }

    /// Frees the container's address and its veth (normally gone with its namespace).
    pub fn release(&self, id: &str) {
        if let Err(e) = self.with_ipam(|i| i.release(id)) {
            warn!(container = id, error = %e, "releasing the address failed");
        }
        let host = host_veth(id);
        let _ = nl::with_handle(None, "removing the container's veth", move |h| async move {
            nl::delete_link(&h, &host).await
        });
    }

    /// Frees addresses held by containers that no longer exist (an agent killed between
    /// removing a container and releasing its address).
    pub fn gc(&self, live: &HashSet<String>) -> usize {
        let Ok(entries) = self.with_ipam(|i| i.entries()) else {
            return 0;
        };
        let mut n = 0;
        for (_, owner) in entries {
            if !live.contains(&owner) {
                self.release(&owner);
                n += 1;
            }
        }
        n
    }

    /// The device's last read state, with node names for known peers.
    pub fn status(&self) -> Option<(wg::DeviceStatus, Vec<Peer>)> {
        let s = lock(&self.last_status).clone()?;
        Some((s, lock(&self.peers).clone()))
    }

    /// A digest of the last read's peers (public key, endpoint) and how many, taken under the
    /// lock without copying them (the heartbeat's test for a changed status).
    pub fn status_digest(&self) -> Option<(u64, usize)> {
        let s = lock(&self.last_status);
        let s = s.as_ref()?;
        Some(crate::contract::peers_digest(
            s.peers.iter().map(|p| (&p.public_key, &p.endpoint)),
        ))
    }

    /// The device's state read now (and kept as the last status).
    pub fn live_status(&self) -> Option<wg::DeviceStatus> {
        let s = self.device.status().ok()?;
        *lock(&self.last_status) = Some(s.clone());
        Some(s)
    }

    /// Node names of the peers, by public key.
    pub fn peer_names(&self) -> std::collections::HashMap<Key, String> {
        lock(&self.peers)
            .iter()
            .map(|p| (p.public_key, p.node.clone()))
            .collect()
    }

    /// Whether `ip` is in the cluster network.
    pub fn in_cluster(&self, ip: Ipv4Addr) -> bool {
        lock(&self.plumbed)
            .as_ref()
            .is_some_and(|p| p.cluster.contains(ip))
    }
}

/// Undoes what the agent set up on this host (for `skiff-agent network down`, after the agent
/// and its containers are gone): stops the userspace tunnel, deletes `skiff0` and a kernel
/// `skiff-wg`, removes the iptables rules and the `/run/wireguard` link. Returns what it did.
pub fn teardown(data_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    let wg_dir = data_dir.join("net").join("wg");
    let pidfile = wg_dir.join(format!("{}.pid", wg::INTERFACE));
    if let Some(pid) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("__wg-tunnel") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            done.push(format!("stopped the userspace tunnel (pid {pid})"));
        }
    }
    for link in [BRIDGE, wg::INTERFACE] {
        let name = link.to_owned();
        if let Ok(true) = nl::with_handle(None, "deleting a link", move |h| async move {
            let had = nl::link_index(&h, &name).await?.is_some();
            nl::delete_link(&h, &name).await?;
            Ok(had)
        }) {
            done.push(format!("deleted link {link}"));
        }
    }
    for (table, chain) in [("nat", "POSTROUTING"), ("filter", "FORWARD")] {
        let Ok(out) = std::process::Command::new("iptables")
            .args(["-w", "-t", table, "-S", chain])
            .output()
        else {
            continue;
        };
        for rule in String::from_utf8_lossy(&out.stdout).lines() {
            let ours = rule.contains("skiff pod egress")
                || rule.ends_with(&format!("-i {BRIDGE} -j ACCEPT"))
                || rule.ends_with(&format!("-o {BRIDGE} -j ACCEPT"));
            let Some(spec) = rule.strip_prefix("-A ") else {
                continue;
            };
            if !ours {
                continue;
            }
            // `-S` prints the comment quoted; split respecting the quotes.
            let args = hostport::split_quoted(spec);
            let ok = std::process::Command::new("iptables")
                .args(["-w", "-t", table, "-D"])
                .args(&args)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                done.push(format!("removed iptables rule -t {table} {rule}"));
            }
        }
    }
    done.extend(vip::remove());
    for alloc in hostport::published() {
        hostport::unpublish(&alloc);
        done.push(format!("removed the host port rules of allocation {alloc}"));
    }
    for link in wg::unlink_run_sockets(&wg_dir) {
        done.push(format!("removed {}", link.display()));
    }
    done
}

/// The host side of a container's veth: `sk` + 12 characters of its id (names are at most 15).
pub fn host_veth(id: &str) -> String {
    let short: String = id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect();
    format!("sk{short}")
}

/// Masquerades traffic from the pod subnet to anything outside the cluster network, and lets
/// the bridge and the tunnel forward (hosts whose FORWARD policy is DROP, as Docker sets it).
/// Through iptables (nat has no rtnetlink interface); a host without it gets a warning.
fn masquerade(subnet: &Subnet, cluster: &Subnet) {
    let rules: [(&str, Vec<String>); 3] = [
        (
            "nat",
            vec![
                "POSTROUTING".into(),
                "-s".into(),
                subnet.to_string(),
                "!".into(),
                "-d".into(),
                cluster.to_string(),
                "-m".into(),
                "comment".into(),
                "--comment".into(),
                "skiff pod egress".into(),
                "-j".into(),
                "MASQUERADE".into(),
            ],
        ),
        (
            "filter",
            vec![
                "FORWARD".into(),
                "-i".into(),
                BRIDGE.into(),
                "-j".into(),
                "ACCEPT".into(),
            ],
        ),
        (
            "filter",
            vec![
                "FORWARD".into(),
                "-o".into(),
                BRIDGE.into(),
                "-j".into(),
                "ACCEPT".into(),
            ],
        ),
    ];
    for (table, rule) in rules {
        let run = |op: &str| {
            std::process::Command::new("iptables")
                .args(["-w", "-t", table, op])
                .args(&rule)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
        };
        match run("-C") {
            Ok(s) if s.success() => {}
            Ok(_) => {
                if !run("-A").is_ok_and(|s| s.success()) {
                    warn!(table, rule = %rule.join(" "), "iptables refused the rule");
                }
            }
            Err(e) => {
                warn!(error = %e, "iptables not found: pod egress is not masqueraded");
                return;
            }
        }
    }
}

impl skiff_runtime::container::NetworkHook for Network {
    fn attach(&self, id: &str, netns: &Path) -> Result<IpAddr, String> {
        Network::attach(self, id, netns)
            .map(IpAddr::V4)
            .map_err(|e| e.to_string())
    }

    fn release(&self, id: &str) {
        Network::release(self, id);
    }

    fn address(&self, id: &str) -> Option<IpAddr> {
        self.ip_of(id).map(IpAddr::V4)
    }
}

/// A sender's address as the standard library spells it (IPv4 or IPv6; anything else `None`),
/// for the batched receives of the DNS server and the userspace tunnel.
pub(crate) fn std_addr(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_name_their_hosts() {
        let s: Subnet = "10.42.7.0/24".parse().expect("subnet");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 42, 7, 1));
        assert_eq!(Ipv4Addr::from(s.first_host()), Ipv4Addr::new(10, 42, 7, 2));
        assert_eq!(Ipv4Addr::from(s.last_host()), Ipv4Addr::new(10, 42, 7, 254));
        assert!(s.contains(Ipv4Addr::new(10, 42, 7, 99)));
        assert!(!s.contains(Ipv4Addr::new(10, 42, 8, 1)));
        let err = "10.42.7.1/24".parse::<Subnet>().expect_err("host bits");
        assert_eq!(err.to_string(), "subnet \"10.42.7.1/24\": host bits set");
        assert!("10.42.0.0/31".parse::<Subnet>().is_err());
        assert_eq!(host_veth("0123456789abcdef0123"), "sk0123456789ab");
    }
}
