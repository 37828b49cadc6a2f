//! The userspace WireGuard tunnel: `skiff-agent __wg-tunnel --interface skiff-wg --socket PATH`.
//!
//! A process of its own (so pod traffic survives agent restarts) around boringtun's Noise
//! implementation (`noise::Tunn`): a TUN device, one UDP socket (4 MiB buffers: small default
//! buffers drop bursts and cost a third of the throughput), and four threads: TUN -> encrypt ->
//! UDP, UDP -> decrypt -> TUN, the protocol's timers (handshakes, keepalives, rekeys) every
//! 250 ms, and the UAPI socket (`get=1` / `set=1`, as `wg` speaks it). SIGTERM or SIGINT closes
//! the socket and ends it; the TUN device goes with the process.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::{DeviceStatus, DeviceUpdate, Key, PeerStatus};

/// Socket buffer size asked for (SO_RCVBUFFORCE/SO_SNDBUFFORCE as root).
const UDP_BUFFER: usize = 4 << 20;
const MAX_PACKET: usize = 65536;

struct PeerEntry {
    public: Key,
    index: u32,
    keepalive: u16,
    tunn: Mutex<Tunn>,
    endpoint: RwLock<Option<SocketAddr>>,
    allowed: Vec<(IpAddr, u8)>,
}

#[derive(Default)]
struct State {
    private: Option<Key>,
    listen_port: u16,
    peers: HashMap<Key, Arc<PeerEntry>>,
    by_index: HashMap<u32, Arc<PeerEntry>>,
    /// IPv4 allowed-ips, longest prefix first.
    routes: Vec<(u32, u8, Arc<PeerEntry>)>,
    next_index: u32,
}

impl State {
    fn rebuild_indexes(&mut self) {
        self.by_index = self.peers.values().map(|p| (p.index, p.clone())).collect();
        let mut routes = Vec::new();
        for p in self.peers.values() {
            for (ip, prefix) in &p.allowed {
                if let IpAddr::V4(v4) = ip {
                    routes.push((mask(u32::from(*v4), *prefix), *prefix, p.clone()));
                }
            }
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.1));
        self.routes = routes;
    }

    fn route(&self, dst: Ipv4Addr) -> Option<&Arc<PeerEntry>> {
        let d = u32::from(dst);
        self.routes
            .iter()
            .find(|(net, prefix, _)| mask(d, *prefix) == *net)
            .map(|r| &r.2)
    }

    fn new_tunn(&self, private: &Key, public: &Key, keepalive: u16, index: u32) -> Option<Tunn> {
        Some(Tunn::new(
            StaticSecret::from(private.0),
            PublicKey::from(public.0),
            None,
            (keepalive > 0).then_some(keepalive),
            index,
            None,
        ))
    }
}

fn mask(addr: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(prefix.min(32))))
    }
}

struct Shared {
    tun: File,
    state: RwLock<State>,
    udp: RwLock<Option<Arc<UdpSocket>>>,
    /// Bumped when the UDP socket is replaced, so the old reader stops.
    generation: AtomicU64,
}

impl Shared {
    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn udp(&self) -> Option<Arc<UdpSocket>> {
        self.udp
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn send(&self, packet: &[u8], to: Option<SocketAddr>) {
        if let (Some(udp), Some(to)) = (self.udp(), to) {
            let _ = udp.send_to(packet, to);
        }
    }
}

/// Opens a TUN interface named `name` (no packet info header).
fn open_tun(name: &str) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    skiff_runtime::sys::tun_attach(&file, name)?;
    Ok(file)
}

fn bind_udp(port: u16) -> std::io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if skiff_runtime::sys::force_socket_buffers(&s, UDP_BUFFER).is_err() {
        // Not root: the plain options, capped by net.core.[rw]mem_max.
        let _ = s.set_recv_buffer_size(UDP_BUFFER);
        let _ = s.set_send_buffer_size(UDP_BUFFER);
    }
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(s.into())
}

/// Runs the tunnel until SIGTERM/SIGINT. Returns the exit code.
pub fn run(interface: &str, socket: &Path) -> i32 {
    // Signals are taken by sigwait in this thread; block them before any thread starts.
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(nix::sys::signal::Signal::SIGTERM);
    mask.add(nix::sys::signal::Signal::SIGINT);
    mask.add(nix::sys::signal::Signal::SIGHUP);
    if let Err(e) = mask.thread_block() {
        eprintln!("wg-tunnel: blocking signals: {e}");
        return 1;
    }
    let tun = match open_tun(interface) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wg-tunnel: opening TUN device {interface}: {e}");
            return 1;
        }
    };
    let _ = std::fs::remove_file(socket);
    let listener = match UnixListener::bind(socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wg-tunnel: binding {}: {e}", socket.display());
            return 1;
        }
    };
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600));
    let shared = Arc::new(Shared {
        tun,
        state: RwLock::new(State {
            next_index: rand::random::<u32>() >> 8,
            ..State::default()
        }),
        udp: RwLock::new(None),
        generation: AtomicU64::new(0),
    });
    let pidfile = socket.with_extension("pid");
    let _ = std::fs::write(&pidfile, format!("{}\n", std::process::id()));
    eprintln!("wg-tunnel: {interface} up, UAPI at {}", socket.display());
    {
        let s = shared.clone();
        std::thread::spawn(move || tun_to_udp(&s));
    }
    {
        let s = shared.clone();
        std::thread::spawn(move || timers(&s));
    }
    {
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                serve_uapi(&s, conn);
            }
        });
    }
    let sig = mask.wait();
    eprintln!("wg-tunnel: {sig:?}; closing");
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(&pidfile);
    0
}

fn tun_to_udp(s: &Shared) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut out = vec![0u8; MAX_PACKET + 148];
    let mut tun = &s.tun;
    loop {
        let n = match tun.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("wg-tunnel: reading the TUN device: {e}");
                break;
            }
        };
        let Some(IpAddr::V4(dst)) = Tunn::dst_address(&buf[..n]) else {
            continue;
        };
        let peer = match s.state().route(dst) {
            Some(p) => p.clone(),
            None => continue,
        };
        let mut t = peer
            .tunn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let TunnResult::WriteToNetwork(p) = t.encapsulate(&buf[..n], &mut out) {
            s.send(
                p,
                *peer
                    .endpoint
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
        }
    }
}

fn udp_to_tun(s: &Shared, udp: Arc<UdpSocket>, generation: u64) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut out = vec![0u8; MAX_PACKET];
    let mut tun = &s.tun;
    while s.generation.load(Ordering::Relaxed) == generation {
        let (n, src) = match udp.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                eprintln!("wg-tunnel: receiving: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Ok(packet) = Tunn::parse_incoming_packet(&buf[..n]) else {
            continue;
        };
        let peer = {
            let st = s.state();
            match packet {
                Packet::HandshakeInit(ref h) => {
                    let Some(private) = st.private else { continue };
                    let secret = StaticSecret::from(private.0);
                    let public = PublicKey::from(&secret);
                    match parse_handshake_anon(&secret, &public, h) {
                        Ok(half) => st.peers.get(&Key(half.peer_static_public)).cloned(),
                        Err(_) => None,
                    }
                }
                Packet::HandshakeResponse(ref r) => {
                    st.by_index.get(&(r.receiver_idx >> 8)).cloned()
                }
                Packet::PacketCookieReply(ref c) => {
                    st.by_index.get(&(c.receiver_idx >> 8)).cloned()
                }
                Packet::PacketData(ref d) => st.by_index.get(&(d.receiver_idx >> 8)).cloned(),
            }
        };
        let Some(peer) = peer else { continue };
        let mut t = peer
            .tunn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match t.decapsulate(Some(src.ip()), &buf[..n], &mut out) {
            TunnResult::Done => {}
            TunnResult::Err(_) => continue,
            TunnResult::WriteToNetwork(p) => {
                let _ = udp.send_to(p, src);
                // Packets queued while the handshake was under way.
                while let TunnResult::WriteToNetwork(p) = t.decapsulate(None, &[], &mut out) {
                    let _ = udp.send_to(p, src);
                }
            }
            TunnResult::WriteToTunnelV4(p, from) => {
                if allowed(&peer.allowed, IpAddr::V4(from)) {
                    let _ = tun.write(p);
                }
            }
            TunnResult::WriteToTunnelV6(p, from) => {
                if allowed(&peer.allowed, IpAddr::V6(from)) {
                    let _ = tun.write(p);
                }
            }
        }
        drop(t);
        // Roaming: the peer is where its last authenticated packet came from.
        let mut ep = peer
            .endpoint
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *ep != Some(src) {
            *ep = Some(src);
        }
    }
}

fn allowed(list: &[(IpAddr, u8)], from: IpAddr) -> bool {
    list.iter().any(|(net, prefix)| match (net, from) {
        (IpAddr::V4(n), IpAddr::V4(f)) => {
            mask(u32::from(*n), *prefix) == mask(u32::from(f), *prefix)
        }
        (IpAddr::V6(n), IpAddr::V6(f)) => {
            let bits = u32::from(*prefix).min(128);
            let m = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(*n) & m == u128::from(f) & m
        }
        _ => false,
    })
}

fn timers(s: &Shared) {
    let mut out = vec![0u8; MAX_PACKET];
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let peers: Vec<Arc<PeerEntry>> = s.state().peers.values().cloned().collect();
        for p in peers {
            let mut t = p
                .tunn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let TunnResult::WriteToNetwork(pkt) = t.update_timers(&mut out) {
                s.send(
                    pkt,
                    *p.endpoint
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
            }
        }
    }
}

fn serve_uapi(s: &Arc<Shared>, conn: UnixStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut w = std::io::BufWriter::new(write_half);
    let mut lines = BufReader::new(conn).lines().map_while(Result::ok);
    while let Some(cmd) = lines.next() {
        let reply = match cmd.as_str() {
            "get=1" => {
                // The request ends with a blank line.
                for l in lines.by_ref() {
                    if l.is_empty() {
                        break;
                    }
                }
                let (status, private) = status(s);
                format!("{}errno=0\n\n", status.to_uapi(private.as_ref()))
            }
            "set=1" => match DeviceUpdate::parse_uapi(&mut lines) {
                Ok(u) => match apply(s, &u) {
                    Ok(()) => "errno=0\n\n".to_owned(),
                    Err(e) => {
                        eprintln!("wg-tunnel: set: {e}");
                        format!("errno={}\n\n", e.raw_os_error().unwrap_or(libc::EINVAL))
                    }
                },
                Err(e) => {
                    eprintln!("wg-tunnel: set: {e}");
                    format!("errno={}\n\n", libc::EINVAL)
                }
            },
            "" => continue,
            _ => format!("errno={}\n\n", libc::EINVAL),
        };
        if w.write_all(reply.as_bytes())
            .and_then(|()| w.flush())
            .is_err()
        {
            return;
        }
    }
}

fn status(s: &Shared) -> (DeviceStatus, Option<Key>) {
    let st = s.state();
    let now = SystemTime::now();
    let mut peers: Vec<PeerStatus> = st
        .peers
        .values()
        .map(|p| {
            let t = p
                .tunn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (since, tx, rx, _, _) = t.stats();
            let last_handshake = since
                .and_then(|d| now.checked_sub(d))
                .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                .map(|d| (d.as_secs() as i64, i64::from(d.subsec_nanos())));
            PeerStatus {
                public_key: p.public,
                endpoint: *p
                    .endpoint
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                allowed_ips: p.allowed.clone(),
                last_handshake,
                rx_bytes: rx as u64,
                tx_bytes: tx as u64,
                keepalive: p.keepalive,
            }
        })
        .collect();
    peers.sort_by_key(|p| p.public_key.0);
    (
        DeviceStatus {
            public_key: st.private.map(|k| Key(k.public())),
            listen_port: st.listen_port,
            peers,
        },
        st.private,
    )
}

fn apply(s: &Arc<Shared>, u: &DeviceUpdate) -> std::io::Result<()> {
    let einval =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
    let mut st = s
        .state
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(port) = u.listen_port
        && (port != st.listen_port || s.udp().is_none())
    {
        let udp = Arc::new(bind_udp(port)?);
        let actual = udp.local_addr()?.port();
        let generation = s.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *s.udp
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(udp.clone());
        st.listen_port = actual;
        let shared = s.clone();
        std::thread::spawn(move || udp_to_tun(&shared, udp, generation));
    }
    if let Some(k) = u.private_key
        && st.private != Some(k)
    {
        st.private = Some(k);
        // Every session was made with the old key.
        let old: Vec<Arc<PeerEntry>> = st.peers.values().cloned().collect();
        for p in old {
            let tunn = st
                .new_tunn(&k, &p.public, p.keepalive, p.index)
                .ok_or_else(|| einval("bad key"))?;
            *p.tunn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = tunn;
        }
    }
    if u.replace_peers {
        st.peers.clear();
    }
    // New peers with a keepalive get a handshake at once (as the kernel does): the other side
    // may still hold a session with a tunnel that is gone, and would not notice for a while.
    // A bare initiation, not an empty packet through `encapsulate`: that would be queued, and
    // flushed after the first handshake the *peer* starts (its responder session is not current
    // yet), starting a second, crossing handshake; wireguard-go handles crossing handshakes in
    // parallel and can drop the index of the session it then sends on (seen: replies lost for
    // 15 s until its retry).
    let mut greet = Vec::new();
    for pu in &u.peers {
        if pu.remove {
            st.peers.remove(&pu.public_key);
            continue;
        }
        let private = st
            .private
            .ok_or_else(|| einval("set a private key before peers"))?;
        let existing = st.peers.get(&pu.public_key).cloned();
        let keepalive = pu
            .keepalive
            .unwrap_or_else(|| existing.as_ref().map_or(0, |p| p.keepalive));
        let mut allowed = match (&existing, pu.replace_allowed_ips) {
            (Some(p), false) => p.allowed.clone(),
            _ => Vec::new(),
        };
        for a in &pu.allowed_ips {
            if !allowed.contains(a) {
                allowed.push(*a);
            }
        }
        let endpoint = pu.endpoint.or_else(|| {
            existing.as_ref().and_then(|p| {
                *p.endpoint
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            })
        });
        let entry = match existing {
            // Same peer, same keepalive: keep its sessions.
            Some(p) if p.keepalive == keepalive => {
                let tunn = std::mem::replace(
                    &mut *p
                        .tunn
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                    st.new_tunn(&private, &p.public, keepalive, p.index)
                        .ok_or_else(|| einval("bad key"))?,
                );
                PeerEntry {
                    public: p.public,
                    index: p.index,
                    keepalive,
                    tunn: Mutex::new(tunn),
                    endpoint: RwLock::new(endpoint),
                    allowed,
                }
            }
            _ => {
                if keepalive > 0 && endpoint.is_some() {
                    greet.push(pu.public_key);
                }
                st.next_index = (st.next_index + 1) & 0x00ff_ffff;
                let index = st.next_index;
                PeerEntry {
                    public: pu.public_key,
                    index,
                    keepalive,
                    tunn: Mutex::new(
                        st.new_tunn(&private, &pu.public_key, keepalive, index)
                            .ok_or_else(|| einval("bad key"))?,
                    ),
                    endpoint: RwLock::new(endpoint),
                    allowed,
                }
            }
        };
        st.peers.insert(pu.public_key, Arc::new(entry));
    }
    st.rebuild_indexes();
    let greet: Vec<Arc<PeerEntry>> = greet
        .iter()
        .filter_map(|k| st.peers.get(k).cloned())
        .collect();
    drop(st);
    let mut out = vec![0u8; 256];
    for p in greet {
        let mut t = p
            .tunn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let TunnResult::WriteToNetwork(pkt) = t.format_handshake_initiation(&mut out, false) {
            s.send(
                pkt,
                *p.endpoint
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
        }
    }
    Ok(())
}

/// The command line of the tunnel process.
#[derive(Debug, clap::Args)]
pub struct TunnelArgs {
    /// The TUN interface to create.
    #[arg(long)]
    pub interface: String,
    /// Where to serve the UAPI socket.
    #[arg(long)]
    pub socket: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_pick_the_longest_prefix_and_sources_are_checked() {
        assert_eq!(
            mask(u32::from(Ipv4Addr::new(10, 42, 1, 77)), 24),
            u32::from(Ipv4Addr::new(10, 42, 1, 0))
        );
        assert_eq!(mask(12345, 0), 0);
        let list = vec![("10.42.1.0".parse().expect("ip"), 24u8)];
        assert!(allowed(&list, "10.42.1.9".parse().expect("ip")));
        assert!(!allowed(&list, "10.42.2.9".parse().expect("ip")));
    }
}
