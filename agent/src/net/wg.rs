//! The WireGuard side of the overlay: the host's key pair, the `skiff-wg` device (the
//! kernel's when the module is there, else a userspace tunnel process of our own), and
//! reconciling its peers to the other nodes.
//!
//! The userspace tunnel ([`tunnel`]) is a separate process (the agent binary re-exec'd), started
//! detached so that it outlives agent restarts: pod traffic keeps flowing while the agent is
//! down. It serves the standard UAPI socket; the agent configures it through that socket like
//! `wg` does. The socket lives under the agent's data dir (several agents in separate network
//! namespaces on one machine would collide on `/run/wireguard`); an agent in the machine's
//! initial network namespace also links it from `/run/wireguard/skiff-wg.sock`, so plain
//! `wg show` finds it.

pub mod kernel;
pub mod tunnel;
pub mod uapi;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tracing::{info, warn};

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
    /// The UAPI socket (userspace).
    socket: PathBuf,
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
        let backend = match choice {
            BackendChoice::Userspace => Backend::Userspace,
            BackendChoice::Kernel | BackendChoice::Auto => {
                // A running userspace tunnel keeps the interface name; stay with it.
                let tunnel_up = choice == BackendChoice::Auto && uapi::get(&socket).is_ok();
                if !tunnel_up && kernel::create_link()? != nl::WireguardLink::Unsupported {
                    Backend::Kernel
                } else if choice == BackendChoice::Kernel {
                    return Err(NetError::NoKernelWireguard);
                } else {
                    Backend::Userspace
                }
            }
        };
        let dev = Device {
            backend,
            private_key,
            listen_port,
            dir: dir.to_path_buf(),
            socket,
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
            Backend::Kernel => match kernel::create_link()? {
                nl::WireguardLink::Created => true,
                nl::WireguardLink::Existed => false,
                nl::WireguardLink::Unsupported => return Err(NetError::NoKernelWireguard),
            },
            Backend::Userspace => {
                if uapi::get(&self.socket).is_ok() {
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
            if uapi::get(&self.socket).is_ok() {
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
        link_well_known_socket(&self.socket);
        Ok(())
    }

    pub fn status(&self) -> Result<DeviceStatus, NetError> {
        match self.backend {
            Backend::Kernel => kernel::get(),
            Backend::Userspace => uapi::get(&self.socket).map_err(NetError::from),
        }
    }

    pub fn apply(&self, update: &DeviceUpdate) -> Result<(), NetError> {
        match self.backend {
            Backend::Kernel => kernel::set(update),
            Backend::Userspace => uapi::set(&self.socket, update).map_err(NetError::from),
        }
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

/// In the machine's initial network namespace, `/run/wireguard/skiff-wg.sock` points at our
/// socket so `wg show` works as usual. Elsewhere (simulated hosts sharing one filesystem) the
/// path would be shared by every agent, so it is left alone.
fn link_well_known_socket(socket: &Path) {
    if !in_initial_netns() {
        return;
    }
    let dir = Path::new("/run/wireguard");
    let link = dir.join(format!("{INTERFACE}.sock"));
    if let Ok(meta) = std::fs::symlink_metadata(&link)
        && !meta.file_type().is_symlink()
    {
        warn!(path = %link.display(), "not replacing a socket we did not create");
        return;
    }
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::remove_file(&link);
    if let Err(e) = std::os::unix::fs::symlink(socket, &link) {
        warn!(path = %link.display(), error = %e, "cannot link the UAPI socket for wg");
    }
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
