//! The WireGuard side of the overlay: the host's key pair, the `skiff-wg` device (the
//! kernel's when the module is there, else a userspace tunnel process of our own), and
//! reconciling its peers to the other nodes.
//!
//! Both backends are configured and read through `wireguard-control`: the kernel's over
//! generic netlink, the userspace tunnel over the standard UAPI socket, exactly as `wg` does.
//!
//! The userspace tunnel ([`tunnel`]) is a separate process (the agent binary re-exec'd), started
//! detached so that it outlives agent restarts: pod traffic keeps flowing while the agent is
//! down. It serves the UAPI protocol on a socket under the agent's data dir, linked from
//! `/run/wireguard/NAME.sock` where `wireguard-control` and `wg` look for it. NAME is
//! `skiff-wg` (the TUN device's name, so `wg show skiff-wg` works) in the machine's initial
//! network namespace; an agent in another namespace (simulated hosts sharing one filesystem)
//! uses `skwg-` and a hash of its data dir, so agents never share a link.

pub mod noise;
pub mod offload;
pub mod tunnel;
pub mod uapi;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use base64::Engine as _;
use tracing::info;
use wireguard_control as wgc;

use super::{NetError, nl};

/// The interface name.
pub const INTERFACE: &str = "skiff-wg";
/// WireGuard's default port.
pub const DEFAULT_PORT: u16 = 51820;
/// What the tunnel adds to a packet over IPv4 (20 IP + 8 UDP + 32 WireGuard); IPv6 underlays
/// need 80, which is what we subtract to be safe on both.
pub const OVERHEAD: u32 = 80;

/// A Curve25519 key (private or public).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.to_base64())
    }
}

impl Key {
    /// A new private key, clamped as `wg genkey` does.
    pub fn generate() -> Key {
        let mut k: [u8; 32] = rand::random();
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        Key(k)
    }

    /// The public key of this private key.
    pub fn public(&self) -> [u8; 32] {
        let secret = boringtun::x25519::StaticSecret::from(self.0);
        boringtun::x25519::PublicKey::from(&secret).to_bytes()
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    pub fn from_base64(s: &str) -> Option<Key> {
        let v = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .ok()?;
        v.try_into().ok().map(Key)
    }
}

/// A change to a device, as `wg set` / UAPI `set=1` express it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceUpdate {
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    pub replace_peers: bool,
    pub peers: Vec<PeerUpdate>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: Key,
    pub remove: bool,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<(IpAddr, u8)>,
}

/// A device as read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceStatus {
    pub public_key: Option<Key>,
    pub listen_port: u16,
    pub peers: Vec<PeerStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<(IpAddr, u8)>,
    /// Unix seconds and nanoseconds of the last handshake.
    pub last_handshake: Option<(i64, i64)>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub keepalive: u16,
}

/// One other node, as the overlay should reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub public_key: Key,
    pub endpoint: SocketAddr,
    pub subnet: super::Subnet,
}

/// Which WireGuard runs the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Kernel,
    Userspace,
}

impl Backend {
    pub fn as_str(&self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::Userspace => "userspace",
        }
    }
}

/// How the backend is chosen (`--wireguard`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The kernel's when the module is there, else userspace.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

/// The device and how to talk to it.
pub struct Device {
    pub backend: Backend,
    pub private_key: Key,
    pub listen_port: u16,
    dir: PathBuf,
    /// The UAPI socket the userspace tunnel serves.
    socket: PathBuf,
    /// The name `wireguard-control` reaches the device by: the kernel link, or the
    /// userspace tunnel through `/run/wireguard/NAME.sock`.
    control: wgc::InterfaceName,
}

/// What `WG_USERSPACE_IMPLEMENTATION` is set to in the agent: a program that does not exist,
/// so `wireguard-control` never starts a userspace WireGuard of its own.
pub const NO_USERSPACE_FALLBACK: &str = "/nonexistent/skiff-agent-supervises-its-own-tunnel";

/// Where `wireguard-control` and `wg` look for userspace devices' sockets.
const RUN_DIR: &str = "/run/wireguard";

/// The UAPI name of the userspace device of the agent whose WireGuard dir is `dir`.
pub fn uapi_name(dir: &Path) -> String {
    if in_initial_netns() {
        return INTERFACE.to_owned();
    }
    // FNV-1a over the path: stable across restarts, distinct per agent.
    let hash = dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("skwg-{:010x}", hash & 0xff_ffff_ffff)
}

fn control_name(name: &str) -> Result<wgc::InterfaceName, NetError> {
    name.parse().map_err(|e| NetError::Wireguard {
        what: format!("interface name {name:?}"),
        reason: format!("{e}"),
    })
}

fn wg_err(what: &str, e: std::io::Error) -> NetError {
    NetError::Wireguard {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

/// Loads the host's private key from `dir/private.key`, generating it (mode 0600) on first
/// start.
pub fn load_or_create_key(dir: &Path) -> Result<Key, NetError> {
    let path = dir.join("private.key");
    match std::fs::read_to_string(&path) {
        Ok(s) => Key::from_base64(&s).ok_or_else(|| NetError::BadKey { path: path.clone() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| NetError::io(dir, e))?;
            let key = Key::generate();
            let text = format!("{}\n", key.to_base64());
            skiff_runtime::durable::write_atomic_mode(&path, text.as_bytes(), 0o600)
                .map_err(|e| NetError::io(&path, e))?;
            info!(public_key = %Key(key.public()).to_base64(), "generated the host's WireGuard key");
            Ok(key)
        }
        Err(e) => Err(NetError::io(&path, e)),
    }
}

impl Device {
    /// Brings up `skiff-wg`: the kernel's when allowed and present, else the userspace tunnel
    /// (started if it is not already running). Configures key and port.
    pub fn open(
        dir: &Path,
        choice: BackendChoice,
        listen_port: u16,
        private_key: Key,
    ) -> Result<Device, NetError> {
        std::fs::create_dir_all(dir).map_err(|e| NetError::io(dir, e))?;
        let socket = dir.join(format!("{INTERFACE}.sock"));
        let uapi = control_name(&uapi_name(dir))?;
        link_run_socket(&socket, &uapi.to_string())?;
        let backend = match choice {
            BackendChoice::Userspace => Backend::Userspace,
            BackendChoice::Kernel | BackendChoice::Auto => {
                // A running userspace tunnel keeps the interface name; stay with it.
                let tunnel_up = choice == BackendChoice::Auto
                    && wgc::Device::get(&uapi, wgc::Backend::Userspace).is_ok();
                if !tunnel_up && create_kernel_link()? != nl::WireguardLink::Unsupported {
                    Backend::Kernel
                } else if choice == BackendChoice::Kernel {
                    return Err(NetError::NoKernelWireguard);
                } else {
                    Backend::Userspace
                }
            }
        };
        let control = match backend {
            Backend::Kernel => control_name(INTERFACE)?,
            Backend::Userspace => uapi,
        };
        let dev = Device {
            backend,
            private_key,
            listen_port,
            dir: dir.to_path_buf(),
            socket,
            control,
        };
        dev.ensure_running()?;
        Ok(dev)
    }

    /// The UAPI socket of the userspace tunnel.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Makes sure the device exists and has our key and port; restarts a userspace tunnel
    /// that died. Returns true when the device was (re)created (its peers, link settings and
    /// routes must be applied again).
    pub fn ensure_running(&self) -> Result<bool, NetError> {
        let created = match self.backend {
            Backend::Kernel => match create_kernel_link()? {
                nl::WireguardLink::Created => true,
                nl::WireguardLink::Existed => false,
                nl::WireguardLink::Unsupported => return Err(NetError::NoKernelWireguard),
            },
            Backend::Userspace => {
                if self.tunnel_answers() {
                    false
                } else {
                    self.spawn_tunnel()?;
                    true
                }
            }
        };
        let status = self.status()?;
        if status.public_key != Some(Key(self.private_key.public()))
            || status.listen_port != self.listen_port
        {
            self.apply(&DeviceUpdate {
                private_key: Some(self.private_key),
                listen_port: Some(self.listen_port),
                ..DeviceUpdate::default()
            })?;
        }
        Ok(created)
    }

    fn spawn_tunnel(&self) -> Result<(), NetError> {
        let exe =
            std::env::current_exe().map_err(|e| NetError::io(Path::new("/proc/self/exe"), e))?;
        let log_path = self.dir.join("tunnel.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| NetError::io(&log_path, e))?;
        let log2 = log.try_clone().map_err(|e| NetError::io(&log_path, e))?;
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new(exe);
        cmd.arg("__wg-tunnel")
            .arg("--interface")
            .arg(INTERFACE)
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Its own session: signals to the agent's group (Ctrl-C, a service manager stopping
        // the agent) do not reach it.
        skiff_runtime::sys::new_session_on_spawn(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| NetError::Tunnel {
            reason: format!("starting the userspace tunnel: {e}"),
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.tunnel_answers() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(3).collect();
                return Err(NetError::Tunnel {
                    reason: format!(
                        "the userspace tunnel exited ({status}): {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    ),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(NetError::Tunnel {
                    reason: format!(
                        "the userspace tunnel did not open {}",
                        self.socket.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        info!(pid = child.id(), socket = %self.socket.display(), "userspace WireGuard tunnel started");
        // Reap it if it ends while we run; after we exit, init does.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
    }

    /// Whether the userspace tunnel serves its socket.
    fn tunnel_answers(&self) -> bool {
        wgc::Device::get(&self.control, wgc::Backend::Userspace).is_ok()
    }

    fn control_backend(&self) -> wgc::Backend {
        match self.backend {
            Backend::Kernel => wgc::Backend::Kernel,
            Backend::Userspace => wgc::Backend::Userspace,
        }
    }

    /// The device as `wg show` would print it.
    pub fn status(&self) -> Result<DeviceStatus, NetError> {
        let dev = wgc::Device::get(&self.control, self.control_backend())
            .map_err(|e| wg_err(&format!("reading {}", self.control), e))?;
        Ok(DeviceStatus {
            public_key: dev.public_key.map(|k| Key(k.0)),
            listen_port: dev.listen_port.unwrap_or(0),
            peers: dev
                .peers
                .iter()
                .map(|p| PeerStatus {
                    public_key: Key(p.config.public_key.0),
                    endpoint: p.config.endpoint,
                    allowed_ips: p
                        .config
                        .allowed_ips
                        .iter()
                        .map(|a| (a.address, a.cidr))
                        .collect(),
                    last_handshake: p
                        .stats
                        .last_handshake_time
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| {
                            (
                                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                                i64::from(d.subsec_nanos()),
                            )
                        }),
                    rx_bytes: p.stats.rx_bytes,
                    tx_bytes: p.stats.tx_bytes,
                    keepalive: p.config.persistent_keepalive_interval.unwrap_or(0),
                })
                .collect(),
        })
    }

    /// Applies a change, as `wg set` does.
    pub fn apply(&self, update: &DeviceUpdate) -> Result<(), NetError> {
        let mut b = wgc::DeviceUpdate::new();
        if let Some(k) = update.private_key {
            b = b.set_private_key(wgc::Key(k.0));
        }
        if let Some(port) = update.listen_port {
            b = b.set_listen_port(port);
        }
        if update.replace_peers {
            b = b.replace_peers();
        }
        for p in &update.peers {
            let mut pc = wgc::PeerConfigBuilder::new(&wgc::Key(p.public_key.0));
            if p.remove {
                pc = pc.remove();
            }
            if let Some(e) = p.endpoint {
                pc = pc.set_endpoint(e);
            }
            if let Some(k) = p.keepalive {
                pc = pc.set_persistent_keepalive_interval(k);
            }
            if p.replace_allowed_ips {
                pc = pc.replace_allowed_ips();
            }
            for (ip, cidr) in &p.allowed_ips {
                pc = pc.add_allowed_ip(*ip, *cidr);
            }
            b = b.add_peer(pc);
        }
        // A userspace device that does not answer makes wireguard-control start
        // WG_USERSPACE_IMPLEMENTATION; the agent sets that to a program that does not exist
        // (see `main`), so a dead tunnel is an error here and is restarted by `ensure_running`.
        b.apply(&self.control, self.control_backend())
            .map_err(|e| wg_err(&format!("configuring {}", self.control), e))
    }

    /// Brings the peers to `want`: removes the others (a node gone, or one whose key changed),
    /// adds the new, updates endpoint or subnet where they moved. Untouched peers keep their
    /// sessions. Returns how many peers changed.
    pub fn sync_peers(&self, want: &[Peer], keepalive: Option<u16>) -> Result<usize, NetError> {
        let status = self.status()?;
        let update = peer_changes(&status, want, keepalive);
        let n = update.peers.len();
        if n > 0 {
            self.apply(&update)?;
        }
        Ok(n)
    }
}

/// What turns `status` into `want` (pure, so it is unit-tested).
pub fn peer_changes(status: &DeviceStatus, want: &[Peer], keepalive: Option<u16>) -> DeviceUpdate {
    let mut update = DeviceUpdate::default();
    for have in &status.peers {
        if !want.iter().any(|p| p.public_key == have.public_key) {
            update.peers.push(PeerUpdate {
                public_key: have.public_key,
                remove: true,
                ..PeerUpdate::default()
            });
        }
    }
    for p in want {
        let allowed = vec![(IpAddr::V4(p.subnet.network()), p.subnet.prefix())];
        let same = status.peers.iter().any(|h| {
            h.public_key == p.public_key
                && h.endpoint == Some(p.endpoint)
                && h.allowed_ips == allowed
                && h.keepalive == keepalive.unwrap_or(0)
        });
        if !same {
            update.peers.push(PeerUpdate {
                public_key: p.public_key,
                remove: false,
                endpoint: Some(p.endpoint),
                keepalive: Some(keepalive.unwrap_or(0)),
                replace_allowed_ips: true,
                allowed_ips: allowed,
            });
        }
    }
    update
}

/// Whether this process is in the machine's initial network namespace: the one of pid 1, or,
/// where pid 1's is hidden from us, any that is not one of `ip netns`'s named namespaces.
fn in_initial_netns() -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(me) = id(Path::new("/proc/self/ns/net")) else {
        return false;
    };
    if let Some(init) = id(Path::new("/proc/1/ns/net")) {
        return init == me;
    }
    !std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| id(&e.path()) == Some(me))
}

/// Creates the kernel link `skiff-wg` unless it exists (through rtnetlink); `Unsupported`
/// when this kernel has no WireGuard.
pub fn create_kernel_link() -> Result<nl::WireguardLink, NetError> {
    nl::with_handle(None, "creating the kernel WireGuard link", |h| async move {
        nl::create_wireguard_link(&h, INTERFACE).await
    })
}

/// Points `/run/wireguard/NAME.sock` at our socket (see the module docs), replacing only a
/// link of ours; a socket we did not create is refused.
fn link_run_socket(socket: &Path, name: &str) -> Result<(), NetError> {
    let dir = Path::new(RUN_DIR);
    let link = dir.join(format!("{name}.sock"));
    if let Ok(meta) = std::fs::symlink_metadata(&link) {
        if !meta.file_type().is_symlink() {
            return Err(NetError::Tunnel {
                reason: format!(
                    "{} is a socket this agent did not create (another WireGuard named {name}?)",
                    link.display()
                ),
            });
        }
        if std::fs::read_link(&link).is_ok_and(|t| t == socket) {
            return Ok(());
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| NetError::io(dir, e))?;
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(socket, &link).map_err(|e| NetError::io(&link, e))
}

/// Removes the `/run/wireguard` links that point into `dir` (for `network down`).
pub fn unlink_run_sockets(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(RUN_DIR).into_iter().flatten().flatten() {
        let path = entry.path();
        if std::fs::read_link(&path).is_ok_and(|t| t.starts_with(dir))
            && std::fs::remove_file(&path).is_ok()
        {
            removed.push(path);
        }
    }
    // The directory too, when nothing else is in it.
    let _ = std::fs::remove_dir(RUN_DIR);
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8, subnet: &str, endpoint: &str) -> Peer {
        Peer {
            node: format!("n{n}"),
            public_key: Key([n; 32]),
            endpoint: endpoint.parse().expect("endpoint"),
            subnet: subnet.parse().expect("subnet"),
        }
    }

    #[test]
    fn keys_are_wg_compatible() {
        // What `echo YE0C...qH0= | wg pubkey` prints.
        let k = Key::from_base64("YE0CFK6kPc3qIkE1qQjq0VhgyqVPOgdHqhTBzDaQqH0=").expect("key");
        assert_eq!(
            Key(k.public()).to_base64(),
            "0OK+Q37tLd3BojAGcM0eRUYT5vJ+wctz0L2pL9EaSSE="
        );
        let g = Key::generate();
        assert_eq!(g.0[0] & 7, 0);
        assert_eq!(Key::from_base64(&g.to_base64()), Some(g));
    }

    #[test]
    fn peer_changes_remove_add_and_update_only_what_differs() {
        let keep = peer(1, "10.42.1.0/24", "198.18.0.11:51820");
        let moved = peer(2, "10.42.2.0/24", "198.18.0.12:51820");
        let status = DeviceStatus {
            public_key: None,
            listen_port: 51820,
            peers: vec![
                PeerStatus {
                    public_key: keep.public_key,
                    endpoint: Some(keep.endpoint),
                    allowed_ips: vec![("10.42.1.0".parse().expect("ip"), 24)],
                    keepalive: 25,
                    ..PeerStatus::default()
                },
                PeerStatus {
                    public_key: moved.public_key,
                    endpoint: Some("198.18.0.99:51820".parse().expect("addr")),
                    allowed_ips: vec![("10.42.2.0".parse().expect("ip"), 24)],
                    keepalive: 25,
                    ..PeerStatus::default()
                },
                PeerStatus {
                    public_key: Key([3; 32]),
                    ..PeerStatus::default()
                },
            ],
        };
        let new = peer(4, "10.42.4.0/24", "198.18.0.14:51820");
        let u = peer_changes(
            &status,
            &[keep.clone(), moved.clone(), new.clone()],
            Some(25),
        );
        let touched: Vec<(Key, bool)> = u.peers.iter().map(|p| (p.public_key, p.remove)).collect();
        assert_eq!(
            touched,
            vec![
                (Key([3; 32]), true),
                (moved.public_key, false),
                (new.public_key, false)
            ]
        );
        assert!(u.peers.iter().all(|p| p.remove || p.replace_allowed_ips));
        assert!(!u.replace_peers);
    }
}
