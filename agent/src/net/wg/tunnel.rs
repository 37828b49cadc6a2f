//! The userspace WireGuard tunnel: `skiff-agent __wg-tunnel --interface skiff-wg --socket PATH`.
//!
//! A process of its own (so pod traffic survives agent restarts) around the protocol in
//! [`noise`](super::noise): a multi-queue TUN device and a group of UDP sockets on the
//! listen port (SO_REUSEPORT; 4 MiB buffers: small default buffers drop bursts and cost a
//! third of the throughput), one queue and one socket per core (`SKIFF_WG_QUEUES` sets how
//! many). Each queue has two threads: TUN -> encrypt -> UDP and UDP -> decrypt -> TUN. The
//! kernel keeps a flow on one TUN queue and a sender on one socket of the group, so packets
//! stay in order while flows and peers spread over the cores; one peer's packets are sealed
//! and opened on every queue at once (its sessions are read-locked, its send counter an
//! atomic; only handshakes take the peer's lock). Two more threads run
//! the protocol's timers (handshakes, keepalives, rekeys) every 250 ms and the UAPI socket
//! (`get=1` / `set=1`, as `wg` speaks it). SIGTERM or SIGINT ends it; the TUN device goes with
//! the process.
//!
//! Batches, not packets, cross the system calls ([`offload`](super::offload)): the TUN device
//! has TSO and checksum offload (IFF_VNET_HDR, TUNSETOFFLOAD), so one read is a TCP
//! super-packet of up to 64 KiB, cut here into wire-sized packets, encrypted and sent with
//! one UDP_SEGMENT `sendmsg`; the socket has UDP_GRO, so one `recvmsg`
//! is a train of datagrams from one sender, decrypted and joined back into super-packets for
//! one TUN write each. Where the kernel refuses an offload, that side goes a packet at a time
//! (`SKIFF_WG_OFFLOAD=off` asks for that everywhere, to measure the difference).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sendmsg, setsockopt,
    sockopt,
};

use super::noise::{self, Consumed, Device, Opened, Sealed};
use super::offload::{
    Coalescer, F_NEEDS_CSUM, GSO_NONE, Segments, VNET_HDR_LEN, VnetHdr, complete_checksum,
};
use super::{DeviceStatus, DeviceUpdate, Key, PeerStatus};

/// Socket buffer size asked for (SO_RCVBUFFORCE/SO_SNDBUFFORCE as root).
const UDP_BUFFER: usize = 4 << 20;
/// The most TUN queues (and UDP sockets) the tunnel opens.
const MAX_QUEUES: usize = 16;
const MAX_PACKET: usize = 65536;
/// One UDP_SEGMENT send carries at most this many bytes (a UDP datagram's limit is 65,507)
/// and datagrams (the kernel's limit is 64 on older kernels, 128 since 6.x).
const GSO_MAX_BYTES: usize = 65_000;
const GSO_MAX_SEGMENTS: usize = 64;

struct PeerEntry {
    public: Key,
    index: u32,
    keepalive: u16,
    /// Shared with the entry that replaces this one when the peer is set again, so its
    /// sessions live on.
    noise: Arc<noise::Peer>,
    endpoint: RwLock<Option<SocketAddr>>,
    allowed: Vec<(IpAddr, u8)>,
}

impl PeerEntry {
    /// Where the peer was last heard from (or was configured to be).
    fn endpoint(&self) -> Option<SocketAddr> {
        *self
            .endpoint
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Default)]
struct State {
    private: Option<Key>,
    /// This end's static key, made when the private key is set.
    device: Option<Arc<Device>>,
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

    /// `None` without a private key, or for a public key of small order (no handshake can be
    /// made with it).
    fn new_peer(&self, public: &Key, keepalive: u16, index: u32) -> Option<Arc<noise::Peer>> {
        let device = self.device.clone()?;
        noise::Peer::new(device, public.0, index, keepalive).map(Arc::new)
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
    /// The TUN device's queues.
    tun: Vec<File>,
    /// Offloads were asked for (not `SKIFF_WG_OFFLOAD=off`).
    want_offload: bool,
    /// The TUN device speaks virtio-net headers, with TSO and checksum offload.
    tun_offload: bool,
    /// Several datagrams per UDP_SEGMENT send; switched off for good if the kernel refuses one.
    udp_gso: AtomicBool,
    /// Packets dropped because the device or the kernel handed over something malformed.
    dropped: AtomicU64,
    /// The first super-packet read and the first joined write were logged (so a test, or an
    /// operator, can see the offloads at work).
    seen_split: AtomicBool,
    seen_join: AtomicBool,
    state: RwLock<State>,
    /// The sockets of the listen port (empty until it is set).
    udp: RwLock<Vec<Arc<UdpSocket>>>,
    /// Bumped when the UDP socket is replaced, so the old reader stops.
    generation: AtomicU64,
}

impl Shared {
    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The first socket of the listen port (for the timers' and the UAPI's sends).
    fn udp(&self) -> Option<Arc<UdpSocket>> {
        self.udp_for(0)
    }

    /// The socket queue `q` sends on (any of the group sends from the listen port).
    fn udp_for(&self, q: usize) -> Option<Arc<UdpSocket>> {
        let group = self
            .udp
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (!group.is_empty()).then(|| group[q % group.len()].clone())
    }

    fn send(&self, packet: &[u8], to: Option<SocketAddr>) {
        if let (Some(udp), Some(to)) = (self.udp(), to) {
            let _ = udp.send_to(packet, to);
        }
    }

    /// Counts a dropped packet, saying why for the first and then at each power of two.
    fn drop_packet(&self, why: &dyn std::fmt::Display) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            eprintln!("wg-tunnel: dropped a packet ({n} so far): {why}");
        }
    }

    /// Writes one frame from the [`Coalescer`] (header and packet) to queue `q` of the TUN
    /// device, or the bare packet when the device has no virtio-net header.
    fn write_tun(&self, q: usize, frame: &[u8]) {
        let bytes = if self.tun_offload {
            if frame[1] != GSO_NONE && !self.seen_join.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "wg-tunnel: first joined write to the TUN device ({} bytes)",
                    frame.len() - VNET_HDR_LEN
                );
            }
            frame
        } else {
            &frame[VNET_HDR_LEN..]
        };
        if let Err(e) = (&self.tun[q % self.tun.len()]).write(bytes) {
            self.drop_packet(&format_args!("writing to the TUN device: {e}"));
        }
    }
}

/// Opens a TUN interface named `name` (no packet info header) with `queues` queues (fewer
/// when the kernel refuses more; one without IFF_MULTI_QUEUE where it has none): with TSO and
/// checksum offload when `offload` is asked for and the kernel has them, else plain. Says
/// which it got.
fn open_tun(name: &str, offload: bool, queues: usize) -> std::io::Result<(Vec<File>, bool)> {
    use skiff_runtime::sys::{TUN_F_CSUM, TUN_F_TSO4, tun_attach, tun_set_offload};
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
    };
    // Every queue is attached with the same flags; a half-made device goes with its files.
    let attach_all = |vnet: bool| -> std::io::Result<Vec<File>> {
        let mut files = Vec::with_capacity(queues);
        for i in 0..queues {
            let file = open()?;
            let attached = tun_attach(&file, name, vnet, true).and_then(|()| {
                if vnet {
                    tun_set_offload(&file, TUN_F_CSUM | TUN_F_TSO4)
                } else {
                    Ok(())
                }
            });
            match attached {
                Ok(()) => files.push(file),
                Err(e) if i == 0 => return Err(e),
                Err(e) => {
                    eprintln!("wg-tunnel: queue {i} of {name} refused ({e}): {i} queues");
                    break;
                }
            }
        }
        Ok(files)
    };
    if offload {
        match attach_all(true) {
            Ok(files) => return Ok((files, true)),
            Err(e) => eprintln!("wg-tunnel: no TUN offloads ({e}): a packet per read"),
        }
    }
    match attach_all(false) {
        Ok(files) => Ok((files, false)),
        Err(e) => {
            eprintln!("wg-tunnel: no multi-queue TUN ({e}): one queue");
            let file = open()?;
            tun_attach(&file, name, false, false)?;
            Ok((vec![file], false))
        }
    }
}

/// How many TUN queues and UDP sockets: `SKIFF_WG_QUEUES` (1 to [`MAX_QUEUES`]), else one per
/// core.
fn queue_count() -> usize {
    let cores = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_QUEUES);
    match std::env::var("SKIFF_WG_QUEUES") {
        Err(_) => cores,
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_QUEUES).contains(&n) => n,
            _ => {
                eprintln!(
                    "wg-tunnel: SKIFF_WG_QUEUES={v:?} is not a number from 1 to {MAX_QUEUES}; \
                     using {cores} (one per core)"
                );
                cores
            }
        },
    }
}

/// Binds `count` UDP sockets to `port` (0: one the kernel picks) as one SO_REUSEPORT group,
/// or fewer if the kernel refuses more: it hands each sender's datagrams to one of them.
/// Returns them (at least one) and the port they share.
fn bind_udp(port: u16, count: usize) -> std::io::Result<(Vec<UdpSocket>, u16)> {
    let first = bind_udp_one(port, count > 1)?;
    let actual = first.local_addr()?.port();
    let mut group = vec![first];
    for _ in 1..count {
        match bind_udp_one(actual, true) {
            Ok(s) => group.push(s),
            Err(e) => {
                eprintln!("wg-tunnel: another socket on port {actual} refused ({e})");
                break;
            }
        }
    }
    Ok((group, actual))
}

fn bind_udp_one(port: u16, reuse_port: bool) -> std::io::Result<UdpSocket> {
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
    if reuse_port {
        s.set_reuse_port(true)?;
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
    let want_offload = std::env::var("SKIFF_WG_OFFLOAD").map_or(true, |v| v != "off");
    let (tun, tun_offload) = match open_tun(interface, want_offload, queue_count()) {
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
        want_offload,
        tun_offload,
        udp_gso: AtomicBool::new(want_offload),
        dropped: AtomicU64::new(0),
        seen_split: AtomicBool::new(false),
        seen_join: AtomicBool::new(false),
        state: RwLock::new(State {
            next_index: rand::random::<u32>() >> 8,
            ..State::default()
        }),
        udp: RwLock::new(Vec::new()),
        generation: AtomicU64::new(0),
    });
    let pidfile = socket.with_extension("pid");
    let _ = std::fs::write(&pidfile, format!("{}\n", std::process::id()));
    eprintln!(
        "wg-tunnel: {interface} up, UAPI at {}; TUN offloads (TSO, checksum): {}; queues: {}",
        socket.display(),
        if tun_offload { "on" } else { "off" },
        shared.tun.len()
    );
    for q in 0..shared.tun.len() {
        let s = shared.clone();
        std::thread::spawn(move || tun_to_udp(&s, q));
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

/// Reads queue `q` of the TUN device, encrypts and sends on the group's socket `q`.
fn tun_to_udp(s: &Shared, q: usize) {
    let head = if s.tun_offload { VNET_HDR_LEN } else { 0 };
    let mut buf = vec![0u8; head + MAX_PACKET];
    let mut segments = Segments::default();
    let mut batch = SendBatch::default();
    let mut tun = &s.tun[q];
    loop {
        let n = match tun.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("wg-tunnel: reading the TUN device: {e}");
                break;
            }
        };
        if n <= head {
            continue;
        }
        if !s.tun_offload {
            batch.encrypt_and_send(s, q, &buf, std::slice::from_ref(&(0..n)));
            continue;
        }
        let hdr = match VnetHdr::decode(&buf[..n]) {
            Ok(h) => h,
            Err(e) => {
                s.drop_packet(&e);
                continue;
            }
        };
        if hdr.gso_type == GSO_NONE {
            if hdr.flags & F_NEEDS_CSUM != 0
                && let Err(e) = complete_checksum(
                    &mut buf[head..n],
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                )
            {
                s.drop_packet(&e);
                continue;
            }
            batch.encrypt_and_send(s, q, &buf, std::slice::from_ref(&(head..n)));
            continue;
        }
        match segments.split(&buf[head..n], &hdr) {
            Ok(()) => {
                if !s.seen_split.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "wg-tunnel: first super-packet from the TUN device ({} bytes, {} packets)",
                        n - head,
                        segments.ranges.len()
                    );
                }
                batch.encrypt_and_send(s, q, &segments.buf, &segments.ranges);
            }
            Err(e) => s.drop_packet(&e),
        }
    }
}

/// Encrypted datagrams for one peer, one after another, to go out in one UDP_SEGMENT send:
/// all of `seg` bytes but the last, which may be shorter.
struct SendBatch {
    buf: Vec<u8>,
    len: usize,
    seg: usize,
    count: usize,
    /// A shorter datagram was added: it must be the last.
    short: bool,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self {
            // Room for a full batch, then for one more packet's worst case (a handshake
            // initiation needs 148 bytes, data its length and 32).
            buf: vec![0u8; GSO_MAX_BYTES + MAX_PACKET + 256],
            len: 0,
            seg: 0,
            count: 0,
            short: false,
        }
    }
}

impl SendBatch {
    /// Encrypts the packets at `ranges` of `bytes` (all to the same destination, as one read
    /// from the device is) for their peer, without a lock (other queues seal for the same
    /// peer at the same time), and sends them in as few system calls as the kernel takes.
    fn encrypt_and_send(&mut self, s: &Shared, q: usize, bytes: &[u8], ranges: &[Range<usize>]) {
        let Some(first) = ranges.first() else { return };
        let Some(dst) = ipv4_destination(&bytes[first.clone()]) else {
            return;
        };
        let Some(peer) = s.state().route(dst).cloned() else {
            return;
        };
        let to = peer.endpoint();
        let udp = s.udp_for(q);
        for r in ranges {
            let src = &bytes[r.clone()];
            let n = src.len() + noise::DATA_OVERHEAD;
            if self.count > 0
                && (n > self.seg
                    || self.short
                    || self.len + n > GSO_MAX_BYTES
                    || self.count == GSO_MAX_SEGMENTS)
            {
                self.flush(s, udp.as_deref(), to);
            }
            let at = self.len;
            match peer.noise.seal(src, &mut self.buf[at..]) {
                Sealed::Data(len) => {
                    if self.count == 0 {
                        self.seg = len;
                    } else if len < self.seg {
                        self.short = true;
                    }
                    self.len += len;
                    self.count += 1;
                }
                Sealed::Initiation(len) => {
                    // No session: the packet was queued and this is a handshake initiation.
                    if let (Some(udp), Some(to)) = (udp.as_deref(), to) {
                        let _ = udp.send_to(&self.buf[at..at + len], to);
                    }
                }
                Sealed::Queued | Sealed::Dropped => {}
            }
        }
        self.flush(s, udp.as_deref(), to);
    }

    fn flush(&mut self, s: &Shared, udp: Option<&UdpSocket>, to: Option<SocketAddr>) {
        if let (Some(udp), Some(to)) = (udp, to)
            && self.count > 0
        {
            let data = &self.buf[..self.len];
            let mut one_by_one = self.count == 1 || !s.udp_gso.load(Ordering::Relaxed);
            if !one_by_one && let Err(e) = send_segments(udp, data, self.seg, to) {
                // EIO: the route's device cannot checksum for us; EINVAL/ENOPROTOOPT: a
                // kernel without UDP_SEGMENT. Anything else (a full buffer) is a lost batch.
                if matches!(
                    e,
                    nix::errno::Errno::EIO
                        | nix::errno::Errno::EINVAL
                        | nix::errno::Errno::ENOPROTOOPT
                ) {
                    s.udp_gso.store(false, Ordering::Relaxed);
                    eprintln!("wg-tunnel: UDP segmentation refused ({e}): a datagram per send");
                    one_by_one = true;
                }
            }
            if one_by_one {
                for d in data.chunks(self.seg) {
                    let _ = udp.send_to(d, to);
                }
            }
        }
        self.len = 0;
        self.count = 0;
        self.short = false;
    }
}

/// One `sendmsg` of `data`, which the kernel cuts into datagrams of `seg` bytes (UDP_SEGMENT).
fn send_segments(udp: &UdpSocket, data: &[u8], seg: usize, to: SocketAddr) -> nix::Result<usize> {
    let seg = seg as u16;
    let addr = SockaddrStorage::from(to);
    sendmsg(
        udp.as_raw_fd(),
        &[IoSlice::new(data)],
        &[ControlMessage::UdpGsoSegments(&seg)],
        MsgFlags::empty(),
        Some(&addr),
    )
}

/// One `recvmsg`: the bytes read, the sender, and the size of the datagrams they are a train
/// of (UDP_GRO; 0 for a single datagram).
fn recv_train(
    udp: &UdpSocket,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> nix::Result<(usize, Option<SocketAddr>, usize)> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(udp.as_raw_fd(), &mut iov, Some(cmsg), MsgFlags::empty())?;
    let mut seg = 0;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::UdpGroSegments(n) = c {
                seg = usize::try_from(n).unwrap_or(0);
            }
        }
    }
    let from = msg.address.as_ref().and_then(crate::net::std_addr);
    Ok((msg.bytes, from, seg))
}

/// Reads socket `q` of the group, decrypts and writes to queue `q` of the TUN device, until
/// the listen port changes (`generation`).
fn udp_to_tun(s: &Shared, udp: Arc<UdpSocket>, generation: u64, q: usize) {
    if s.want_offload
        && let Err(e) = setsockopt(&*udp, sockopt::UdpGroSegment, &true)
    {
        eprintln!("wg-tunnel: no UDP_GRO ({e}): a datagram per read");
    }
    let mut buf = vec![0u8; MAX_PACKET];
    let mut cmsg = nix::cmsg_space!(libc::c_int);
    let mut frame = vec![0u8; VNET_HDR_LEN + MAX_PACKET];
    let mut coalescer = Coalescer::default();
    while s.generation.load(Ordering::Relaxed) == generation {
        let (n, src, seg) = match recv_train(&udp, &mut buf, &mut cmsg) {
            Ok((n, Some(src), seg)) => (n, src, seg),
            Ok(_) => continue,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("wg-tunnel: receiving: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let seg = if seg == 0 { n.max(1) } else { seg };
        for datagram in buf[..n].chunks(seg) {
            receive(s, q, &udp, datagram, src, &mut frame, &mut coalescer);
        }
        coalescer.flush(&mut |f| s.write_tun(q, f));
    }
}

/// The destination of an IPv4 packet (the overlay carries IPv4 only).
fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let d: [u8; 4] = packet[16..20].try_into().ok()?;
    Some(Ipv4Addr::from(d))
}

/// Handles one datagram from `src`: an initiation is answered (or, under load, asked for a
/// cookie), a response or cookie reply taken, a data packet decrypted into `frame` (after
/// room for its virtio-net header) and handed to the coalescer. No lock is held while
/// decrypting: other queues open the same peer's packets at the same time.
fn receive(
    s: &Shared,
    q: usize,
    udp: &UdpSocket,
    datagram: &[u8],
    src: SocketAddr,
    frame: &mut [u8],
    coalescer: &mut Coalescer,
) {
    let out = &mut frame[VNET_HDR_LEN..];
    let (peer, opened) = if datagram.first() == Some(&noise::INITIATION) {
        let Some(device) = s.state().device.clone() else {
            return;
        };
        match device.consume_initiation(datagram, src, out) {
            Consumed::Initiation(init) => {
                let Some(peer) = s.state().peers.get(&Key(init.peer)).cloned() else {
                    return;
                };
                let opened = peer.noise.respond(&init, out);
                (peer, opened)
            }
            Consumed::CookieReply(n) => {
                let _ = udp.send_to(&out[..n], src);
                return;
            }
            Consumed::Invalid => return,
        }
    } else {
        let Some((_, index)) = noise::receiver(datagram) else {
            return;
        };
        let Some(peer) = s.state().by_index.get(&(index >> 8)).cloned() else {
            return;
        };
        let opened = peer.noise.open(datagram, src, out);
        (peer, opened)
    };
    match opened {
        // A cookie reply proves nothing about where the peer is.
        Opened::Rejected | Opened::CookieTaken => return,
        Opened::CookieReply(n) => {
            let _ = udp.send_to(&out[..n], src);
            return;
        }
        Opened::Reply(n) => {
            let _ = udp.send_to(&out[..n], src);
        }
        Opened::Nothing => {}
        Opened::Packet(len, from) => {
            if allowed(&peer.allowed, from) {
                let frame = &mut frame[..VNET_HDR_LEN + len];
                if s.tun_offload {
                    coalescer.push(frame, &mut |f| s.write_tun(q, f));
                } else {
                    s.write_tun(q, frame);
                }
            }
        }
    }
    // Roaming: the peer is where its last authenticated message came from.
    let current = peer.endpoint();
    if current != Some(src) {
        *peer
            .endpoint
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(src);
    }
    // A handshake done (a response taken, or the first message on a session this end
    // answered for): packets queued while it was under way go now. An atomic load when none
    // wait.
    send_queued(&peer, udp, src);
}

/// Seals and sends the packets a peer queued while it had no session.
fn send_queued(peer: &PeerEntry, udp: &UdpSocket, to: SocketAddr) {
    let queued = peer.noise.take_queued();
    if queued.is_empty() {
        return;
    }
    let mut out = vec![0u8; MAX_PACKET + 256];
    for p in queued {
        if let Sealed::Data(n) | Sealed::Initiation(n) = peer.noise.seal(&p, &mut out) {
            let _ = udp.send_to(&out[..n], to);
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
            let to = p.endpoint();
            if let Some(n) = p.noise.tick(&mut out) {
                s.send(&out[..n], to);
            }
            // Packets a handshake's end left waiting (an atomic load when none do).
            if let (Some(udp), Some(to)) = (s.udp(), to) {
                send_queued(&p, &udp, to);
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
    let mut peers: Vec<PeerStatus> = st
        .peers
        .values()
        .map(|p| {
            let last_handshake = p
                .noise
                .last_handshake()
                .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                .map(|d| (d.as_secs() as i64, i64::from(d.subsec_nanos())));
            PeerStatus {
                public_key: p.public,
                endpoint: p.endpoint(),
                allowed_ips: p.allowed.clone(),
                last_handshake,
                rx_bytes: p.noise.rx_bytes.load(Ordering::Relaxed),
                tx_bytes: p.noise.tx_bytes.load(Ordering::Relaxed),
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
        let (group, actual) = bind_udp(port, s.tun.len())?;
        let group: Vec<Arc<UdpSocket>> = group.into_iter().map(Arc::new).collect();
        let generation = s.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *s.udp
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = group.clone();
        st.listen_port = actual;
        for (q, udp) in group.into_iter().enumerate() {
            let shared = s.clone();
            std::thread::spawn(move || udp_to_tun(&shared, udp, generation, q));
        }
    }
    if let Some(k) = u.private_key
        && st.private != Some(k)
    {
        st.private = Some(k);
        st.device = Some(Arc::new(Device::new(k.0)));
        // Every session was made with the old key.
        let old: Vec<Arc<PeerEntry>> = st.peers.values().cloned().collect();
        for p in old {
            let noise = st
                .new_peer(&p.public, p.keepalive, p.index)
                .ok_or_else(|| einval("a peer's public key of small order"))?;
            let entry = PeerEntry {
                public: p.public,
                index: p.index,
                keepalive: p.keepalive,
                noise,
                endpoint: RwLock::new(p.endpoint()),
                allowed: p.allowed.clone(),
            };
            st.peers.insert(p.public, Arc::new(entry));
        }
    }
    if u.replace_peers {
        st.peers.clear();
    }
    // New peers with a keepalive get a handshake at once (as the kernel does): the other side
    // may still hold a session with a tunnel that is gone, and would not notice for a while.
    // A bare initiation (`noise::Peer::initiate`), not a keepalive through `seal`: that
    // would queue nothing and start the same handshake, but a bare one says what it is.
    let mut greet = Vec::new();
    for pu in &u.peers {
        if pu.remove {
            st.peers.remove(&pu.public_key);
            continue;
        }
        if st.device.is_none() {
            return Err(einval("set a private key before peers"));
        }
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
        let endpoint = pu
            .endpoint
            .or_else(|| existing.as_ref().and_then(|p| p.endpoint()));
        let entry = match existing {
            // The same peer: its sessions stay, whatever changed (a new persistent keepalive
            // runs from the next timer pass).
            Some(p) => {
                p.noise.set_keepalive(keepalive);
                PeerEntry {
                    public: p.public,
                    index: p.index,
                    keepalive,
                    noise: p.noise.clone(),
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
                    noise: st
                        .new_peer(&pu.public_key, keepalive, index)
                        .ok_or_else(|| einval("a peer's public key of small order"))?,
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
        if let Some(n) = p.noise.initiate(&mut out) {
            s.send(&out[..n], p.endpoint());
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
