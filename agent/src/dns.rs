//! The per-host DNS server: authoritative for `skiff.internal` from the controllers' service set
//! (a watch stream; the last view keeps being served when the controllers are unreachable),
//! everything else relayed to the host's upstream resolvers, whose answers are kept for their
//! TTL (`dns/cache.rs`). UDP and TCP on the bridge address,
//! port 53; answers over UDP that do not fit the client's payload size are truncated (TC) so the
//! client retries over TCP.
//!
//! Records, for a service `web` in namespace `default` with a port named `http` (8080/tcp):
//! `web.default.skiff.internal` A = the service's virtual IP (the ready endpoints' addresses
//! for a service without one);
//! `<alloc>.web.default.skiff.internal` A = that endpoint's address;
//! `_http._tcp.web.default.skiff.internal` SRV = `0 10 8080 <alloc>.web.default.skiff.internal`
//! per ready endpoint, with those names' A records in the additional section. Names in the zone
//! that do not exist are NXDOMAIN, with the zone's SOA for negative caching.
//!
//! Messages are parsed and written by hickory-proto; UDP queries are read and answered in
//! batches by one thread per socket (one socket per core, SO_REUSEPORT), zone answers computed
//! inline; only forwarded queries get a task, since they wait on the network.

mod cache;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};
use skiff_proto::v1 as pb;
use skiff_tls::net::Backoff;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tracing::{debug, warn};

/// The zone.
pub const ZONE: &str = "skiff.internal";
/// TTL of answers: short, endpoints move.
const TTL: u32 = 5;

/// The UDP payload this server takes and advertises in its OPT records (RFC 6891; the size
/// DNS flag day 2020 settled on).
const EDNS_PAYLOAD: u16 = 1232;

/// What the zone holds, by lower-case name without the trailing dot.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Zone {
    a: BTreeMap<String, Vec<Ipv4Addr>>,
    /// SRV name -> (port, target) per endpoint.
    srv: BTreeMap<String, Vec<(u16, String)>>,
    /// Every name that exists (owners and their parents up to the zone), for NXDOMAIN vs NODATA.
    names: BTreeSet<String>,
    /// Prepared answers for the fast path: (name, qtype) -> header flags and counts (bytes 2..12
    /// of the answer) and everything after the question (compression pointers in it hold for
    /// any spelling of the question name, which has the same length).
    prepared: std::collections::HashMap<(String, u16), (Vec<u8>, Vec<u8>)>,
}

impl Zone {
    /// The records for a service set.
    pub fn build(services: &[pb::ServiceInfo]) -> Zone {
        let mut z = Zone::default();
        for s in services {
            let base = format!("{}.{}.{ZONE}", s.name, s.namespace).to_ascii_lowercase();
            let ready: Vec<(&pb::ServiceEndpoint, Ipv4Addr)> = s
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .filter_map(|e| e.ip.parse().ok().map(|ip| (e, ip)))
                .collect();
            // The virtual IP when the service has one (it reaches a ready endpoint per
            // connection, and stays valid in a client's cache while endpoints move); else the
            // ready endpoints themselves.
            let ips: Vec<Ipv4Addr> = match s.vip.parse::<Ipv4Addr>() {
                Ok(vip) => vec![vip],
                Err(_) => {
                    let mut ips: Vec<Ipv4Addr> = ready.iter().map(|(_, ip)| *ip).collect();
                    ips.sort();
                    ips
                }
            };
            z.add_name(&base);
            z.a.insert(base.clone(), ips);
            for (e, ip) in &ready {
                let host = format!("{}.{base}", e.allocation.to_ascii_lowercase());
                z.add_name(&host);
                z.a.insert(host, vec![*ip]);
            }
            for p in &s.ports {
                let proto = match pb::Protocol::try_from(p.protocol) {
                    Ok(pb::Protocol::Udp) => "udp",
                    _ => "tcp",
                };
                let name = format!("_{}._{proto}.{base}", p.name).to_ascii_lowercase();
                z.add_name(&name);
                let targets = ready
                    .iter()
                    .map(|(e, _)| {
                        (
                            p.port as u16,
                            format!("{}.{base}", e.allocation.to_ascii_lowercase()),
                        )
                    })
                    .collect();
                z.srv.insert(name, targets);
            }
        }
        z.add_name(ZONE);
        z.prepare();
        z
    }

    /// Builds the wire answer of every (name, A|SRV) once, through the same [`answer`] path.
    fn prepare(&mut self) {
        let mut prepared = std::collections::HashMap::new();
        // A '\\' reads as an escape in a text name: such names (kept out by spec validation)
        // are not prepared; the general path answers them.
        for name in self.names.iter().filter(|n| !n.contains('\\')) {
            for t in [RecordType::A, RecordType::SRV, RecordType::AAAA] {
                let Ok(n) = Name::from_ascii(format!("{name}.")) else {
                    continue;
                };
                let mut q = Message::query();
                q.add_query(hickory_proto::op::Query::query(n, t));
                let Ok(bytes) = q.to_vec() else { continue };
                let qlen = bytes.len() - 12;
                if let Reply::Answer(a) = answer_slow(&bytes, self, false)
                    && a.len() >= 12 + qlen
                {
                    prepared.insert(
                        (name.clone(), u16::from(t)),
                        (a[2..12].to_vec(), a[12 + qlen..].to_vec()),
                    );
                }
            }
        }
        self.prepared = prepared;
    }

    fn add_name(&mut self, name: &str) {
        let mut n = name;
        loop {
            self.names.insert(n.to_owned());
            if n == ZONE {
                break;
            }
            match n.split_once('.') {
                Some((_, rest)) if rest.ends_with(ZONE) => n = rest,
                _ => break,
            }
        }
    }

    fn a_records(&self, name: &str, owner: &Name) -> Vec<Record> {
        self.a
            .get(name)
            .into_iter()
            .flatten()
            .map(|ip| Record::from_rdata(owner.clone(), TTL, RData::A(A(*ip))))
            .collect()
    }
}

/// Whether `name` (lower case, no trailing dot) is in our zone.
fn in_zone(name: &str) -> bool {
    name == ZONE || name.ends_with(&format!(".{ZONE}"))
}

fn soa() -> Record {
    let zone = Name::from_ascii(format!("{ZONE}.")).unwrap_or_default();
    let ns = Name::from_ascii(format!("ns.{ZONE}.")).unwrap_or_default();
    let mail = Name::from_ascii(format!("hostmaster.{ZONE}.")).unwrap_or_default();
    Record::from_rdata(
        zone,
        TTL,
        RData::SOA(SOA::new(ns, mail, 1, 60, 10, 600, TTL)),
    )
}

fn wire_name(out: &mut Vec<u8>, name: &str) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

/// The SOA record as [`soa`] makes it, on the wire without compression (made once).
fn soa_wire() -> &'static [u8] {
    static WIRE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(make_soa_wire);
    &WIRE
}

fn make_soa_wire() -> Vec<u8> {
    let mut rdata = Vec::new();
    wire_name(&mut rdata, &format!("ns.{ZONE}"));
    wire_name(&mut rdata, &format!("hostmaster.{ZONE}"));
    for v in [1u32, 60, 10, 600, TTL] {
        rdata.extend_from_slice(&v.to_be_bytes());
    }
    let mut out = Vec::new();
    wire_name(&mut out, ZONE);
    out.extend_from_slice(&[0, 6, 0, 1]);
    out.extend_from_slice(&TTL.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(&rdata);
    out
}

/// What to do with a query.
pub enum Reply {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// Not ours: relay to the upstream resolvers.
    Forward,
    /// Not even a DNS header: drop it.
    Drop,
}

/// Answers one message from the zone, or says to forward it. `udp`: the answer must fit the
/// client's payload size (else it is truncated with TC set).
pub fn answer(query: &[u8], zone: &Zone, udp: bool) -> Reply {
    if let Some(r) = answer_fast(query, zone, udp) {
        return r;
    }
    answer_slow(query, zone, udp)
}

/// The OPT record of this server's answers to EDNS queries: the root name, type OPT (41),
/// this server's UDP payload size as the class, extended rcode 0, version 0, no flags, no
/// options (RFC 6891).
const OPT_RECORD: [u8; 11] = [
    0,
    0,
    41,
    (EDNS_PAYLOAD >> 8) as u8,
    (EDNS_PAYLOAD & 0xff) as u8,
    0,
    0,
    0,
    0,
    0,
    0,
];

/// Reads the OPT record that ends a query at `at` (one additional record, nothing after it):
/// the client's UDP payload size, when the record is well formed and of EDNS version 0 with
/// well-formed options other than client subnet (which the general path reads). `None`: let
/// the general path answer (BADVERS, FORMERR, ...).
fn query_opt(query: &[u8], at: usize) -> Option<u16> {
    let rr = query.get(at..at + 11)?;
    if rr[0] != 0 || rr[1..3] != [0, 41] || rr[6] != 0 {
        return None; // not an OPT record of the root, or a version other than 0
    }
    let payload = u16::from_be_bytes([rr[3], rr[4]]);
    let rdlen = usize::from(u16::from_be_bytes([rr[9], rr[10]]));
    let options = query.get(at + 11..)?;
    if options.len() != rdlen {
        return None;
    }
    let mut i = 0;
    while i < options.len() {
        let head = options.get(i..i + 4)?;
        let code = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        if code == 8 || options.len() < i + 4 + len {
            return None;
        }
        i += 4 + len;
    }
    Some(payload)
}

/// The lean path for the common query (one question, class IN, with or without an EDNS0 OPT
/// record, a name in the zone with a prepared answer): copy the question, patch the id and RD,
/// append the prepared records (and this server's OPT record when the query had one). `None`:
/// use the general path.
fn answer_fast(query: &[u8], zone: &Zone, udp: bool) -> Option<Reply> {
    if query.len() < 17 || query[2] & 0xf8 != 0 {
        return None; // a response, or an opcode other than QUERY
    }
    let edns = match query[4..12] {
        [0, 1, 0, 0, 0, 0, 0, 0] => false,
        [0, 1, 0, 0, 0, 0, 0, 1] => true,
        _ => return None, // not exactly one question (and at most one additional record)
    };
    let mut i = 12;
    let mut name = String::with_capacity(64);
    loop {
        let len = usize::from(*query.get(i)?);
        if len == 0 {
            i += 1;
            break;
        }
        if len > 63 {
            return None;
        }
        let label = query.get(i + 1..i + 1 + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            // '\\' would read as an escape in the zone's text names: the general path.
            if b == b'.' || b == b'\\' || !b.is_ascii_graphic() {
                return None;
            }
            name.push(char::from(b.to_ascii_lowercase()));
        }
        i += 1 + len;
    }
    if i - 12 > 255 {
        return None; // longer than a name may be: the general path answers FORMERR
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let qclass = u16::from_be_bytes([*query.get(i + 2)?, *query.get(i + 3)?]);
    let end = i + 4;
    // Other classes and zone transfers (AXFR 252, IXFR 251): the general path refuses them.
    if qclass != 1 || qtype == 251 || qtype == 252 {
        return None;
    }
    // What the client takes over UDP: 512 without EDNS, else its payload size (at least 512)
    // but no more than this server offers.
    let limit = if edns {
        usize::from(query_opt(query, end)?.clamp(512, EDNS_PAYLOAD))
    } else if end == query.len() {
        512
    } else {
        return None;
    };
    let opt: &[u8] = if edns { &OPT_RECORD } else { &[] };
    if in_zone(&name) && !zone.names.contains(&name) {
        // NXDOMAIN with the zone's SOA (written out uncompressed).
        let mut out = Vec::with_capacity(end + 80 + opt.len());
        out.extend_from_slice(&query[..2]);
        out.extend_from_slice(&[
            0x84 | (query[2] & 1),
            0x83,
            0,
            1,
            0,
            0,
            0,
            1,
            0,
            u8::from(edns),
        ]);
        out.extend_from_slice(&query[12..end]);
        out.extend_from_slice(soa_wire());
        out.extend_from_slice(opt);
        return Some(Reply::Answer(out));
    }
    let (flags_counts, tail) = zone.prepared.get(&(name, qtype))?;
    if udp && end + tail.len() + opt.len() > limit {
        return None; // the general path truncates
    }
    let mut out = Vec::with_capacity(end + tail.len() + opt.len());
    out.extend_from_slice(&query[..2]);
    out.extend_from_slice(flags_counts);
    // RD as the client set it.
    out[2] = (out[2] & !1) | (query[2] & 1);
    if edns {
        // One more additional record: the OPT.
        let ar = u16::from_be_bytes([out[10], out[11]]).checked_add(1)?;
        out[10..12].copy_from_slice(&ar.to_be_bytes());
    }
    out.extend_from_slice(&query[12..end]);
    out.extend_from_slice(tail);
    out.extend_from_slice(opt);
    Some(Reply::Answer(out))
}

/// The general path: hickory parses the message and builds the answer. A query with EDNS
/// gets an OPT record back (version 0, this server's payload size); a version it does not
/// speak gets BADVERS; other classes than IN (and ANY) and zone transfers are refused.
fn answer_slow(query: &[u8], zone: &Zone, udp: bool) -> Reply {
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            // A header we can read gets FORMERR; less than that is dropped.
            if query.len() < 12 {
                return Reply::Drop;
            }
            let id = u16::from_be_bytes([query[0], query[1]]);
            return encode(Message::error_msg(id, OpCode::Query, ResponseCode::FormErr));
        }
    };
    if msg.metadata.message_type != MessageType::Query {
        return Reply::Drop;
    }
    let id = msg.metadata.id;
    // The OPT record of every answer to an EDNS query.
    let opt = msg.edns.as_ref().map(|_| {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        e.set_version(0);
        e
    });
    let error = |op: OpCode, code: ResponseCode, q: Option<&hickory_proto::op::Query>| {
        let mut m = Message::error_msg(id, op, code);
        m.metadata.recursion_desired = msg.metadata.recursion_desired;
        if let Some(q) = q {
            m.add_query(q.clone());
        }
        if let Some(e) = &opt {
            m.set_edns(e.clone());
        }
        encode(m)
    };
    if msg.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return error(
            msg.metadata.op_code,
            ResponseCode::BADVERS,
            msg.queries.first(),
        );
    }
    if msg.metadata.op_code != OpCode::Query {
        return error(msg.metadata.op_code, ResponseCode::NotImp, None);
    }
    let [q] = msg.queries.as_slice() else {
        return error(OpCode::Query, ResponseCode::FormErr, None);
    };
    if !matches!(q.query_class, DNSClass::IN | DNSClass::ANY)
        || matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR)
    {
        return error(OpCode::Query, ResponseCode::Refused, Some(q));
    }
    let owner = q.name().clone();
    let name = owner.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    if !in_zone(&name) {
        return Reply::Forward;
    }
    let mut resp = Message::response(id, OpCode::Query);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = msg.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_query(q.clone());
    if let Some(e) = &opt {
        resp.set_edns(e.clone());
    }
    if !zone.names.contains(&name) {
        resp.metadata.response_code = ResponseCode::NXDomain;
        resp.add_authority(soa());
        return encode(resp);
    }
    let qtype = q.query_type();
    if matches!(qtype, RecordType::A | RecordType::ANY) {
        resp.add_answers(zone.a_records(&name, &owner));
    }
    if matches!(qtype, RecordType::SRV | RecordType::ANY)
        && let Some(targets) = zone.srv.get(&name)
    {
        for (port, target) in targets {
            let Ok(t) = Name::from_ascii(format!("{target}.")) else {
                continue;
            };
            resp.add_answer(Record::from_rdata(
                owner.clone(),
                TTL,
                RData::SRV(SRV::new(0, 10, *port, t.clone())),
            ));
            resp.add_additionals(zone.a_records(target, &t));
        }
    }
    if resp.answers.is_empty() {
        // NODATA: the name exists, not with this type.
        resp.add_authority(soa());
    }
    let Ok(bytes) = resp.to_vec() else {
        return error(OpCode::Query, ResponseCode::ServFail, Some(q));
    };
    // What the client takes over UDP (512 without EDNS), no more than this server offers.
    let limit = if opt.is_some() {
        msg.max_payload().clamp(512, EDNS_PAYLOAD)
    } else {
        512
    };
    if udp && bytes.len() > usize::from(limit) {
        let mut t = Message::response(id, OpCode::Query);
        t.metadata = resp.metadata;
        t.metadata.truncation = true;
        t.add_query(q.clone());
        if let Some(e) = &opt {
            t.set_edns(e.clone());
        }
        return encode(t);
    }
    Reply::Answer(bytes)
}

fn encode(m: Message) -> Reply {
    match m.to_vec() {
        Ok(b) => Reply::Answer(b),
        Err(_) => Reply::Drop,
    }
}

/// The zone the server answers from, replaced whole at each change.
pub type SharedZone = Arc<RwLock<Arc<Zone>>>;

fn current(zone: &SharedZone) -> Arc<Zone> {
    zone.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Upstream resolvers: `--dns-upstream`, else the host's /etc/resolv.conf nameservers.
pub fn upstreams(flag: &[String]) -> Vec<SocketAddr> {
    let from = |s: &str| -> Option<SocketAddr> {
        s.parse::<SocketAddr>()
            .ok()
            .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
    };
    if !flag.is_empty() {
        return flag.iter().filter_map(|s| from(s)).collect();
    }
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| from(v.trim()))
        .collect()
}

/// Forwards in flight at once; a query beyond them is answered SERVFAIL at once (and counted)
/// rather than queued: a flood of out-of-zone names cannot take the agent's memory.
pub const MAX_FORWARDS: usize = 256;
/// TCP connections served at once; more wait in the kernel's backlog.
const MAX_TCP: usize = 128;

/// What the DNS server counts (shown on the agent's `/metrics`).
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Queries relayed to an upstream.
    pub forwarded: AtomicU64,
    /// Queries outside the zone answered from the cache of upstream answers.
    pub cache_hits: AtomicU64,
    /// Queries answered SERVFAIL because [`MAX_FORWARDS`] were in flight.
    pub forwards_refused: AtomicU64,
    /// Receive, send and accept errors (each logged; the socket keeps serving).
    pub socket_errors: AtomicU64,
}

/// The bound on forwards, and the counters.
#[derive(Clone)]
struct Forwarding {
    upstreams: Arc<Vec<SocketAddr>>,
    permits: Arc<tokio::sync::Semaphore>,
    stats: Arc<DnsStats>,
    cache: Arc<cache::Cache>,
}

impl Forwarding {
    /// The cached upstream answer to `query`, if there is one (counted).
    fn cached(&self, query: &[u8]) -> Option<Vec<u8>> {
        let hit = self.cache.answer(query)?;
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        Some(hit)
    }

    /// A slot for one forward, or `None` (counted) when all are taken.
    fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => {
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                Some(p)
            }
            Err(_) => {
                self.stats.forwards_refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// The waits after socket errors in a row: 10 ms, doubling to 1 s.
fn socket_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(10), Duration::from_secs(1))
}

/// Relays a query to the upstreams in turn under an id of its own (random: with the fresh
/// socket's random port, a forger who saw the client's query still has 32 bits to guess, not
/// 16, before an answer is taken, and kept in the cache for every client). An answer counts
/// only with that id and to the same question ([`cache::answers`]); over UDP other datagrams
/// are skipped until the deadline. It is returned with the client's id. `None` when no
/// upstream answered.
async fn forward(query: &[u8], upstreams: &[SocketAddr], tcp: bool) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut ours = query.to_vec();
    ours[..2].copy_from_slice(&rand::random::<u16>().to_be_bytes());
    let ours = &ours;
    for up in upstreams {
        let res = tokio::time::timeout(Duration::from_secs(2), async {
            if tcp {
                let mut s = tokio::net::TcpStream::connect(up).await?;
                s.write_all(&(ours.len() as u16).to_be_bytes()).await?;
                s.write_all(ours).await?;
                let len = s.read_u16().await?;
                let mut buf = vec![0u8; usize::from(len)];
                s.read_exact(&mut buf).await?;
                if !cache::answers(ours, &buf) {
                    return Err(std::io::Error::other("an answer to another query"));
                }
                Ok::<Vec<u8>, std::io::Error>(buf)
            } else {
                let bind: SocketAddr = if up.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = UdpSocket::bind(bind).await?;
                s.connect(up).await?;
                s.send(ours).await?;
                let mut buf = vec![0u8; 65535];
                loop {
                    let n = s.recv(&mut buf).await?;
                    if cache::answers(ours, &buf[..n]) {
                        buf.truncate(n);
                        return Ok(buf);
                    }
                    debug!(upstream = %up, "skipped a datagram that does not answer the query");
                }
            }
        })
        .await;
        match res {
            Ok(Ok(mut b)) => {
                b[..2].copy_from_slice(&query[..2]);
                return Some(b);
            }
            Ok(Err(e)) => debug!(upstream = %up, error = %e, "upstream failed"),
            Err(_) => debug!(upstream = %up, "upstream timed out"),
        }
    }
    None
}

/// An error answer with the query's id; `None` for less than a header.
fn error_reply(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    Message::error_msg(id, OpCode::Query, code).to_vec().ok()
}

fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    error_reply(query, ResponseCode::ServFail)
}

/// Serves DNS on `addr` (UDP and TCP) until the task is dropped: one UDP socket per core
/// (SO_REUSEPORT, queries steered to the socket of the CPU that received them), each read by
/// a thread of its own, which ends when the task is dropped.
/// Errors on a socket are logged and counted, never the end of it; out-of-zone names are
/// forwarded at most [`MAX_FORWARDS`] at a time.
pub async fn serve(
    addr: SocketAddr,
    zone: SharedZone,
    upstreams: Arc<Vec<SocketAddr>>,
    stats: Arc<DnsStats>,
) -> std::io::Result<()> {
    let fwd = Forwarding {
        upstreams,
        permits: Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS)),
        stats,
        cache: Arc::default(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut sockets = Vec::new();
    for _ in 0..cores {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_reuse_port(true)?;
        s.set_write_timeout(Some(SEND_WAIT))?;
        // Steering sends every query from one CPU to one socket: a burst from one CPU must
        // fit in that socket's buffer (the default holds about 250 queries).
        if skiff_runtime::sys::force_socket_buffers(&s, UDP_BUFFER).is_err() {
            let _ = s.set_recv_buffer_size(UDP_BUFFER);
        }
        s.bind(&addr.into())?;
        if sockets.is_empty()
            && let Err(e) = steer_by_cpu(&s, cores)
        {
            warn!(error = %e, "DNS sockets not steered by CPU; the kernel hashes senders instead");
        }
        sockets.push(Arc::new(s));
    }
    let tcp = TcpListener::bind(addr).await?;
    tracing::info!(%addr, sockets = sockets.len(), upstreams = ?fwd.upstreams, "DNS serving {ZONE}");
    let mut tasks = Vec::new();
    {
        let (zone, fwd) = (zone.clone(), fwd.clone());
        let conns = Arc::new(tokio::sync::Semaphore::new(MAX_TCP));
        tasks.push(tokio::spawn(async move {
            let mut backoff = socket_backoff();
            loop {
                let Ok(permit) = conns.clone().acquire_owned().await else {
                    return;
                };
                let conn = match tcp.accept().await {
                    Ok((conn, _)) => {
                        backoff.ok();
                        conn
                    }
                    Err(e) => {
                        fwd.stats.socket_errors.fetch_add(1, Ordering::Relaxed);
                        warn!(%addr, error = %e, "DNS TCP accept failed; backing off");
                        tokio::time::sleep(backoff.failed()).await;
                        continue;
                    }
                };
                let (zone, fwd) = (zone.clone(), fwd.clone());
                tokio::spawn(async move {
                    let _ = serve_tcp(conn, zone, fwd).await;
                    drop(permit);
                });
            }
        }));
    }
    let stop = StopUdp {
        stop: Arc::default(),
        sockets: sockets.clone(),
    };
    let runtime = tokio::runtime::Handle::current();
    for (n, udp) in sockets.into_iter().enumerate() {
        let (zone, fwd, runtime, stop) = (
            zone.clone(),
            fwd.clone(),
            runtime.clone(),
            stop.stop.clone(),
        );
        std::thread::Builder::new()
            .name(format!("skiff-dns-{n}"))
            .spawn(move || serve_udp(&udp, &zone, &fwd, &runtime, &stop))?;
    }
    // The tasks never end by themselves; this one waits until it is dropped, and then `stop`
    // ends the UDP threads.
    for t in tasks {
        let _ = t.await;
    }
    drop(stop);
    Ok(())
}

/// Steers each query to the socket of the CPU that received it (socket `cpu % sockets`, the
/// group's sockets in the order they were bound), with a classic BPF program on the
/// SO_REUSEPORT group, instead of a hash of the sender's address. The CPU that received a
/// query (on loopback or a veth, the sender's) then wakes the thread that last ran there,
/// which the scheduler tends to keep there (the threads are not pinned), and its answer is
/// delivered from there: fewer wake-ups across CPUs, which a virtual machine pays for dearly.
/// Best effort for the caller: without it the kernel hashes.
fn steer_by_cpu(first: &socket2::Socket, sockets: usize) -> nix::Result<()> {
    let n = u32::try_from(sockets.max(1)).map_err(|_| nix::errno::Errno::EINVAL)?;
    let mut prog = [
        // A = the CPU this packet is processed on.
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
        },
        // A = A % sockets.
        libc::sock_filter {
            code: (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: n,
        },
        // The socket at index A.
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_A) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    nix::sys::socket::setsockopt(
        first,
        nix::sys::socket::sockopt::AttachReusePortCbpf,
        &fprog,
    )
}

/// Ends the UDP threads when [`serve`] ends or is dropped: each socket is shut for reading,
/// which wakes a thread blocked in recvmmsg (Linux does this for unconnected UDP sockets too,
/// though it reports ENOTCONN), and the thread sees the flag.
struct StopUdp {
    stop: Arc<AtomicBool>,
    sockets: Vec<Arc<socket2::Socket>>,
}

impl Drop for StopUdp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
    }
}

/// Each UDP socket's buffers (SO_RCVBUFFORCE/SO_SNDBUFFORCE as root).
const UDP_BUFFER: usize = 4 << 20;

/// The longest a UDP thread waits for room in its socket's send buffer.
const SEND_WAIT: Duration = Duration::from_millis(50);

/// Datagrams read, and answers sent, per system call (recvmmsg, sendmmsg).
const BATCH: usize = 32;
/// The longest query read over UDP; a longer one is answered FORMERR.
const MAX_UDP_QUERY: usize = 4096;

/// One datagram of a batch: its length, sender and whether it was cut short.
type Received = (usize, Option<SocketAddr>, bool);

/// Reads the datagrams waiting on `fd`, up to one per buffer, in one recvmmsg that waits for
/// the first.
fn recv_batch(
    fd: std::os::fd::RawFd,
    bufs: &mut [Vec<u8>],
    got: &mut Vec<Received>,
) -> std::io::Result<()> {
    got.clear();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(bufs.len(), None);
    let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
        .iter_mut()
        .map(|b| [IoSliceMut::new(&mut b[..])])
        .collect();
    let msgs = recvmmsg(
        fd,
        &mut headers,
        iovs.iter_mut(),
        MsgFlags::MSG_WAITFORONE,
        None,
    )?;
    for m in msgs {
        got.push((
            m.bytes,
            m.address.as_ref().and_then(crate::net::std_addr),
            m.flags.contains(MsgFlags::MSG_TRUNC),
        ));
    }
    Ok(())
}

/// Sends answers from the front of `replies` in one sendmmsg; how many went.
fn send_batch(fd: std::os::fd::RawFd, replies: &[(Vec<u8>, SocketAddr)]) -> std::io::Result<usize> {
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(replies.len(), None);
    let iovs: Vec<[IoSlice<'_>; 1]> = replies.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
    let addrs: Vec<Option<SockaddrStorage>> = replies
        .iter()
        .map(|(_, a)| Some(SockaddrStorage::from(*a)))
        .collect();
    let no_cmsgs: [ControlMessage<'_>; 0] = [];
    let sent = sendmmsg(
        fd,
        &mut headers,
        iovs.iter(),
        addrs,
        no_cmsgs,
        MsgFlags::empty(),
    )?;
    Ok(sent.count())
}

/// Sends every answer, as many per system call as the socket takes. A full send buffer is
/// waited out for at most [`SEND_WAIT`] (the socket's send timeout): a burst drains in that
/// time, while a buffer held full (a container asking from addresses nobody answers ARP for)
/// costs the batch's remaining answers, counted and dropped as UDP may, not the thread. An
/// answer the kernel refuses (a sender that cannot be reached) is counted and skipped.
fn send_all(fd: std::os::fd::RawFd, mut replies: &[(Vec<u8>, SocketAddr)], stats: &DnsStats) {
    while let Some((_, peer)) = replies.first() {
        match send_batch(fd, replies) {
            Ok(n) => replies = &replies[n.max(1)..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stats
                    .socket_errors
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                debug!(%peer, dropped = replies.len(), "DNS UDP send buffer stayed full");
                return;
            }
            Err(e) => {
                stats.socket_errors.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, error = %e, "DNS UDP send failed");
                replies = &replies[1..];
            }
        }
    }
}

/// Serves one UDP socket on a thread of its own until `stop` is set: a recvmmsg that waits for
/// a batch of datagrams, the answers computed inline, one sendmmsg back. A thread that sleeps in
/// its own receive, rather than a task woken by the runtime's reactor, takes one system call
/// and one wake-up per batch instead of three calls and two wake-ups. Queries that go upstream
/// become tasks on `runtime`. An error is logged, counted and backed off from, never the end
/// of the socket.
fn serve_udp(
    udp: &Arc<socket2::Socket>,
    zone: &SharedZone,
    fwd: &Forwarding,
    runtime: &tokio::runtime::Handle,
    stop: &AtomicBool,
) {
    let mut bufs = vec![vec![0u8; MAX_UDP_QUERY]; BATCH];
    let mut got: Vec<Received> = Vec::with_capacity(BATCH);
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(BATCH);
    let mut backoff = socket_backoff();
    let fd = udp.as_raw_fd();
    while !stop.load(Ordering::Acquire) {
        match recv_batch(fd, &mut bufs, &mut got) {
            Ok(()) => backoff.ok(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // An ICMP error for an earlier answer; nothing is wrong with the socket.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                fwd.stats.socket_errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "DNS UDP receive failed; the socket keeps serving");
                std::thread::sleep(backoff.failed());
                continue;
            }
        }
        // A shut-down socket reads as empty datagrams with no sender.
        if stop.load(Ordering::Acquire) {
            return;
        }
        // A panic in a batch must not leave this socket in the group unread: it is logged
        // and the thread goes on.
        let batch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            answer_batch(udp, zone, fwd, runtime, &bufs, &got, &mut replies);
        }));
        if batch.is_err() {
            fwd.stats.socket_errors.fetch_add(1, Ordering::Relaxed);
            warn!("DNS answering a batch panicked; the socket keeps serving");
            continue;
        }
        send_all(fd, &replies, &fwd.stats);
    }
}

/// Answers one batch of datagrams into `replies`; forwards become tasks on `runtime`, which
/// hold the socket only weakly (a stopped server's socket closes without waiting for them).
fn answer_batch(
    udp: &Arc<socket2::Socket>,
    zone: &SharedZone,
    fwd: &Forwarding,
    runtime: &tokio::runtime::Handle,
    bufs: &[Vec<u8>],
    got: &[Received],
    replies: &mut Vec<(Vec<u8>, SocketAddr)>,
) {
    let z = current(zone);
    replies.clear();
    for (buf, &(len, peer, cut)) in bufs.iter().zip(got) {
        let Some(peer) = peer else { continue };
        let query = &buf[..len.min(buf.len())];
        if cut {
            replies.extend(error_reply(query, ResponseCode::FormErr).map(|b| (b, peer)));
            continue;
        }
        // Names outside the zone asked again: answered before any parsing.
        if let Some(hit) = fwd.cached(query) {
            replies.push((hit, peer));
            continue;
        }
        match answer(query, &z, true) {
            Reply::Answer(b) => replies.push((b, peer)),
            Reply::Drop => {}
            Reply::Forward => {
                let Some(permit) = fwd.slot() else {
                    replies.extend(servfail(query).map(|b| (b, peer)));
                    continue;
                };
                let (q, udp, fwd) = (query.to_vec(), Arc::downgrade(udp), fwd.clone());
                runtime.spawn(async move {
                    let reply = match forward(&q, &fwd.upstreams, false).await {
                        Some(b) => {
                            fwd.cache.insert(&q, &b);
                            Some(b)
                        }
                        None => servfail(&q),
                    };
                    drop(permit);
                    // Never waits: a full send buffer loses this one answer, as UDP may.
                    if let Some(b) = reply
                        && let Some(udp) = udp.upgrade()
                        && let Err(e) = nix::sys::socket::sendto(
                            udp.as_raw_fd(),
                            &b,
                            &SockaddrStorage::from(peer),
                            MsgFlags::MSG_DONTWAIT,
                        )
                    {
                        fwd.stats.socket_errors.fetch_add(1, Ordering::Relaxed);
                        debug!(%peer, error = %e, "DNS UDP send failed");
                    }
                });
            }
        }
    }
}

async fn serve_tcp(
    mut conn: tokio::net::TcpStream,
    zone: SharedZone,
    fwd: Forwarding,
) -> std::io::Result<()> {
    loop {
        let len = match tokio::time::timeout(Duration::from_secs(10), conn.read_u16()).await {
            Ok(Ok(l)) => l,
            _ => return Ok(()),
        };
        let mut q = vec![0u8; usize::from(len)];
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut q))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let reply = match answer(&q, &current(&zone), false) {
            Reply::Answer(b) => Some(b),
            Reply::Drop => return Ok(()),
            // Answers kept from UDP fit any TCP client; TCP answers are not kept (they may not
            // fit a UDP one).
            Reply::Forward => match fwd.cached(&q) {
                Some(hit) => Some(hit),
                None => match fwd.slot() {
                    None => servfail(&q),
                    Some(_permit) => match forward(&q, &fwd.upstreams, true).await {
                        Some(b) => Some(b),
                        None => servfail(&q),
                    },
                },
            },
        };
        if let Some(b) = reply {
            conn.write_all(&(b.len() as u16).to_be_bytes()).await?;
            conn.write_all(&b).await?;
        }
    }
}

/// The resolv.conf a container in `namespace` gets. ndots:2: a bare service name (`web`) or
/// `web.ns` goes through the search list first, answered here without leaving the host; names
/// with two dots or more go out as they are (no ndots:5 fan-out of every external lookup).
pub fn resolv_conf(server: Ipv4Addr, namespace: &str) -> String {
    format!(
        "# written by skiff-agent\nnameserver {server}\nsearch {namespace}.{ZONE} {ZONE}\noptions ndots:2\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn service(ready: &[(&str, &str)], unready: &[(&str, &str)]) -> pb::ServiceInfo {
        let ep = |(alloc, ip): &(&str, &str), ready: bool| pb::ServiceEndpoint {
            allocation: (*alloc).into(),
            node: "a1".into(),
            ip: (*ip).into(),
            health: 0,
            health_output: String::new(),
            ready,
            mesh: false,
            draining: false,
        };
        pb::ServiceInfo {
            name: "web".into(),
            namespace: "default".into(),
            job: "web".into(),
            port_name: "http".into(),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 8080,
                protocol: pb::Protocol::Tcp as i32,
            }],
            tags: vec![],
            endpoints: ready
                .iter()
                .map(|e| ep(e, true))
                .chain(unready.iter().map(|e| ep(e, false)))
                .collect(),
            vip: String::new(),
            mesh: None,
        }
    }

    fn ask(zone: &Zone, name: &str, t: RecordType, udp: bool) -> Message {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        let bytes = m.to_vec().expect("encode");
        // The lean path answers exactly what the general one does, with EDNS (of several
        // payload sizes, the smallest ones truncating) and without.
        let mut variants = vec![bytes.clone()];
        for payload in [0u16, 512, 600, 1232, 4096] {
            let mut e = m.clone();
            let mut edns = Edns::new();
            edns.set_max_payload(payload);
            e.set_edns(edns);
            variants.push(e.to_vec().expect("encode"));
        }
        for v in &variants {
            if let Some(Reply::Answer(fast)) = answer_fast(v, zone, udp) {
                let Reply::Answer(slow) = answer_slow(v, zone, udp) else {
                    panic!("slow path has no answer for {name}");
                };
                let (f, s) = (
                    Message::from_vec(&fast).expect("fast"),
                    Message::from_vec(&slow).expect("slow"),
                );
                assert_eq!(f, s, "{name} {t:?}");
                // Byte for byte as long (NXDOMAIN's SOA is written out uncompressed).
                if f.metadata.response_code == ResponseCode::NoError {
                    assert_eq!(fast.len(), slow.len(), "{name} {t:?}");
                }
            }
        }
        match answer(&bytes, zone, udp) {
            Reply::Answer(b) => Message::from_vec(&b).expect("decode"),
            Reply::Forward => panic!("{name} forwarded"),
            Reply::Drop => panic!("{name} dropped"),
        }
    }

    #[test]
    fn a_srv_nxdomain_and_nodata() {
        let zone = Zone::build(&[service(
            &[
                ("aaaa000000000001", "10.42.1.2"),
                ("aaaa000000000002", "10.42.2.2"),
            ],
            &[("aaaa000000000003", "10.42.1.3")],
        )]);
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("web.default.skiff.internal.").expect("n"),
            RecordType::A,
        ));
        assert!(
            answer_fast(&q.to_vec().expect("enc"), &zone, true).is_some(),
            "lean path used"
        );
        // With EDNS0 too (dig's cookie option among the options), and for a name that is not
        // there; an EDNS version other than 0 and a client subnet option go the long way.
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.options_mut()
            .insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(
                10,
                vec![1, 2, 3, 4, 5, 6, 7, 8],
            ));
        q.set_edns(e.clone());
        assert!(answer_fast(&q.to_vec().expect("enc"), &zone, true).is_some());
        let mut nx = q.clone();
        nx.queries[0] = Query::query(
            Name::from_ascii("nope.default.skiff.internal.").expect("n"),
            RecordType::A,
        );
        assert!(answer_fast(&nx.to_vec().expect("enc"), &zone, true).is_some());
        e.set_version(1);
        q.set_edns(e);
        assert!(answer_fast(&q.to_vec().expect("enc"), &zone, true).is_none());
        let r = ask(&zone, "WEB.default.skiff.internal.", RecordType::A, true);
        assert_eq!(r.metadata.id, 4242);
        assert!(r.metadata.authoritative);
        let ips: Vec<String> = r.answers.iter().map(|a| a.data.to_string()).collect();
        assert_eq!(
            ips,
            vec!["10.42.1.2", "10.42.2.2"],
            "unready endpoint left out"
        );

        let r = ask(
            &zone,
            "_http._tcp.web.default.skiff.internal.",
            RecordType::SRV,
            true,
        );
        let srv: Vec<String> = r.answers.iter().map(|a| a.data.to_string()).collect();
        assert_eq!(
            srv,
            vec![
                "0 10 8080 aaaa000000000001.web.default.skiff.internal.",
                "0 10 8080 aaaa000000000002.web.default.skiff.internal."
            ]
        );
        assert_eq!(r.additionals.len(), 2, "targets' addresses in additional");

        let r = ask(&zone, "nope.default.skiff.internal.", RecordType::A, true);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(r.authorities.len(), 1, "SOA for negative caching");
        // An existing name without that type, and an empty non-terminal: NODATA.
        for (n, t) in [
            ("web.default.skiff.internal.", RecordType::AAAA),
            ("default.skiff.internal.", RecordType::A),
        ] {
            let r = ask(&zone, n, t, true);
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{n}");
            assert!(r.answers.is_empty(), "{n}");
        }
    }

    #[test]
    fn a_service_with_a_vip_answers_it_and_keeps_endpoint_names_and_srv() {
        let mut svc = service(
            &[
                ("aaaa000000000001", "10.42.1.2"),
                ("aaaa000000000002", "10.42.2.2"),
            ],
            &[],
        );
        svc.vip = "10.43.0.7".into();
        let zone = Zone::build(&[svc.clone()]);
        let r = ask(&zone, "web.default.skiff.internal.", RecordType::A, true);
        let ips: Vec<String> = r.answers.iter().map(|a| a.data.to_string()).collect();
        assert_eq!(ips, vec!["10.43.0.7"]);
        let r = ask(
            &zone,
            "aaaa000000000002.web.default.skiff.internal.",
            RecordType::A,
            true,
        );
        let ips: Vec<String> = r.answers.iter().map(|a| a.data.to_string()).collect();
        assert_eq!(ips, vec!["10.42.2.2"]);
        let r = ask(
            &zone,
            "_http._tcp.web.default.skiff.internal.",
            RecordType::SRV,
            true,
        );
        assert_eq!(r.answers.len(), 2);
        // With no ready endpoint the name still answers the VIP (connections to it are
        // refused by the node until one is ready).
        svc.endpoints.clear();
        let zone = Zone::build(&[svc]);
        let r = ask(&zone, "web.default.skiff.internal.", RecordType::A, true);
        assert_eq!(r.answers.len(), 1);
    }

    /// A query as dig sends it: `edns` (a version) or none, a class, a type.
    fn raw(name: &str, t: RecordType, class: DNSClass, edns: Option<u8>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.metadata.recursion_desired = true;
        let mut q = Query::query(Name::from_ascii(name).expect("name"), t);
        q.query_class = class;
        m.add_query(q);
        if let Some(v) = edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            e.set_version(v);
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
    }

    fn reply(bytes: &[u8], zone: &Zone) -> Message {
        match answer(bytes, zone, true) {
            Reply::Answer(b) => Message::from_vec(&b).expect("decode"),
            Reply::Forward => panic!("forwarded"),
            Reply::Drop => panic!("dropped"),
        }
    }

    #[test]
    fn edns_compliance_as_isc_checks_it() {
        let zone = Zone::build(&[service(&[("a1", "10.42.0.2")], &[])]);
        // EDNS 0: answered with an OPT record of version 0 and this server's payload size,
        // the question's case echoed (0x20).
        let m = reply(
            &raw(
                "WeB.Default.Skiff.Internal",
                RecordType::A,
                DNSClass::IN,
                Some(0),
            ),
            &zone,
        );
        let opt = m.edns.as_ref().expect("an OPT record");
        assert_eq!((opt.version(), opt.max_payload()), (0, EDNS_PAYLOAD));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(
            m.queries[0].name().to_ascii(),
            "WeB.Default.Skiff.Internal."
        );
        // NXDOMAIN keeps the OPT record too.
        let m = reply(
            &raw(
                "nope.default.skiff.internal",
                RecordType::A,
                DNSClass::IN,
                Some(0),
            ),
            &zone,
        );
        assert!(m.edns.is_some() && m.metadata.response_code == ResponseCode::NXDomain);
        // Without EDNS, none.
        let m = reply(
            &raw(
                "web.default.skiff.internal",
                RecordType::A,
                DNSClass::IN,
                None,
            ),
            &zone,
        );
        assert!(m.edns.is_none());
        // EDNS version 1: BADVERS, with an OPT record of the version spoken.
        let m = reply(
            &raw(
                "web.default.skiff.internal",
                RecordType::A,
                DNSClass::IN,
                Some(1),
            ),
            &zone,
        );
        // 16 on the wire, BADVERS (hickory reads 16 back as BADSIG, the TSIG meaning).
        assert_eq!(u16::from(m.metadata.response_code), 16);
        assert_eq!(m.edns.as_ref().map(Edns::version), Some(0));
        assert!(m.answers.is_empty());
        // Zone transfers and other classes: refused, never forwarded.
        for (name, t, class) in [
            ("skiff.internal", RecordType::AXFR, DNSClass::IN),
            ("skiff.internal", RecordType::IXFR, DNSClass::IN),
            ("example.test", RecordType::AXFR, DNSClass::IN),
            ("version.bind", RecordType::TXT, DNSClass::CH),
            ("web.default.skiff.internal", RecordType::A, DNSClass::CH),
        ] {
            for edns in [None, Some(0)] {
                let m = reply(&raw(name, t, class, edns), &zone);
                assert_eq!(
                    m.metadata.response_code,
                    ResponseCode::Refused,
                    "{name} {t:?} {class:?}"
                );
                assert_eq!(m.edns.is_some(), edns.is_some(), "{name} {t:?}");
            }
        }
    }

    #[test]
    fn large_udp_answers_are_truncated_and_whole_over_tcp() {
        let eps: Vec<(String, String)> = (0..40)
            .map(|i| (format!("bbbb{i:012}"), format!("10.42.3.{}", i + 2)))
            .collect();
        let refs: Vec<(&str, &str)> = eps.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let zone = Zone::build(&[service(&refs, &[])]);
        let name = "_http._tcp.web.default.skiff.internal.";
        let udp = ask(&zone, name, RecordType::SRV, true);
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        let tcp = ask(&zone, name, RecordType::SRV, false);
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 40);
    }

    #[test]
    fn outside_names_are_forwarded_and_garbage_never_panics() {
        let zone = Zone::build(&[]);
        let mut m = Message::query();
        m.add_query(Query::query(
            Name::from_ascii("example.org.").expect("n"),
            RecordType::A,
        ));
        assert!(matches!(
            answer(&m.to_vec().expect("enc"), &zone, true),
            Reply::Forward
        ));
        assert!(matches!(answer(&[1, 2, 3], &zone, true), Reply::Drop));
        // Deterministic pseudo-random garbage: every answer is a parseable message or nothing.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2000usize {
            let mut buf = vec![0u8; len % 300];
            for b in &mut buf {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if let Reply::Answer(b) = answer(&buf, &zone, true) {
                assert!(Message::from_vec(&b).is_ok());
            }
        }
        assert_eq!(
            resolv_conf(Ipv4Addr::new(10, 42, 1, 1), "shop"),
            "# written by skiff-agent\nnameserver 10.42.1.1\nsearch shop.skiff.internal skiff.internal\noptions ndots:2\n"
        );
    }

    /// A server on a free loopback port, its zone one service with one endpoint.
    /// An A query for `name` with id `id`, recursion desired.
    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        m.to_vec().expect("encode")
    }

    /// Waits until the server at `addr` answers a zone name (it is starting).
    async fn wait_until_up(client: &UdpSocket, addr: SocketAddr) {
        let mut buf = vec![0u8; 4096];
        for _ in 0..100 {
            let _ = client
                .send_to(&query(1, "web.default.skiff.internal."), addr)
                .await;
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(50), client.recv_from(&mut buf)).await
            {
                return;
            }
        }
        panic!("the DNS server did not come up");
    }

    fn start_server(
        upstreams: Vec<SocketAddr>,
    ) -> (
        SocketAddr,
        Arc<DnsStats>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let zone: SharedZone = Arc::new(RwLock::new(Arc::new(Zone::build(&[service(
            &[("aaaa000000000001", "10.42.1.2")],
            &[],
        )]))));
        let stats = Arc::new(DnsStats::default());
        let server = tokio::spawn(serve(addr, zone, Arc::new(upstreams), stats.clone()));
        (addr, stats, server)
    }

    /// Bursts from several clients at once are read and answered in batches: every query
    /// gets exactly one answer, with its id, at the client that asked; a query longer than
    /// the server reads gets FORMERR; a dropped server lets go of its port.
    #[tokio::test]
    async fn bursts_are_answered_once_each_to_their_sender() {
        let (addr, stats, server) = start_server(vec![]);
        let query = |id: u16, edns: bool| {
            let mut m = Message::query();
            m.metadata.id = id;
            m.add_query(Query::query(
                Name::from_ascii("web.default.skiff.internal.").expect("name"),
                RecordType::A,
            ));
            if edns {
                m.set_edns(Edns::new());
            }
            m.to_vec().expect("encode")
        };
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(UdpSocket::bind("127.0.0.1:0").await.expect("client"));
        }
        let mut buf = vec![0u8; 4096];
        // Up: one answer to the first client.
        let mut up = false;
        for _ in 0..100 {
            let _ = clients[0].send_to(&query(1, false), addr).await;
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(50), clients[0].recv_from(&mut buf))
                    .await
            {
                up = true;
                break;
            }
        }
        assert!(up, "the DNS server did not come up");
        // Drain late answers to the probes.
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(100), clients[0].recv_from(&mut buf)).await
        {
        }
        const PER_CLIENT: u16 = 100;
        for i in 0..PER_CLIENT {
            for (c, client) in clients.iter().enumerate() {
                let id = c as u16 * 1000 + i;
                client
                    .send_to(&query(id, i % 2 == 0), addr)
                    .await
                    .expect("send");
            }
        }
        for (c, client) in clients.iter().enumerate() {
            let mut ids = Vec::new();
            while ids.len() < usize::from(PER_CLIENT) {
                let Ok(Ok((n, from))) =
                    tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf)).await
                else {
                    break;
                };
                assert_eq!(from, addr);
                let m = Message::from_vec(&buf[..n]).expect("answer");
                assert_eq!(m.answers.len(), 1);
                assert_eq!(
                    m.edns.is_some(),
                    m.metadata.id.is_multiple_of(2),
                    "OPT iff asked"
                );
                ids.push(m.metadata.id);
            }
            ids.sort_unstable();
            let want: Vec<u16> = (0..PER_CLIENT).map(|i| c as u16 * 1000 + i).collect();
            assert_eq!(ids, want, "client {c}: each query answered once");
        }
        // Longer than the server reads: FORMERR with the query's id.
        let mut long = query(4242, false);
        long.resize(MAX_UDP_QUERY + 100, 0);
        clients[1].send_to(&long, addr).await.expect("send");
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), clients[1].recv_from(&mut buf))
            .await
            .expect("an answer to the long query")
            .expect("recv");
        let m = Message::from_vec(&buf[..n]).expect("answer");
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (4242, ResponseCode::FormErr)
        );
        assert_eq!(stats.socket_errors.load(Ordering::Relaxed), 0);
        // Dropping the server ends its UDP threads, which close their sockets: the port can
        // then be bound by a socket outside the SO_REUSEPORT group.
        server.abort();
        let _ = server.await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::net::UdpSocket::bind(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the UDP threads still hold {addr} after the server was dropped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A datagram sent from CPU `k` reaches socket `k % n` of a steered SO_REUSEPORT group of
    /// `n`, whatever the sender's port: on loopback the sending CPU is the receiving one.
    #[test]
    fn queries_are_steered_to_the_socket_of_their_cpu() {
        let cpus: Vec<usize> = {
            let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("cpus");
            (0..nix::sched::CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect()
        };
        let n = 2;
        let mut group = Vec::new();
        let mut addr = SocketAddr::from(([127, 0, 0, 1], 0));
        for i in 0..n {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
                .expect("socket");
            s.set_reuse_port(true).expect("reuseport");
            s.bind(&addr.into()).expect("bind");
            if i == 0 {
                addr = s.local_addr().expect("addr").as_socket().expect("inet");
                steer_by_cpu(&s, n).expect("a steering program attached");
            }
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            group.push(s);
        }
        for &cpu in &cpus {
            let sent = std::thread::spawn(move || {
                let mut one = nix::sched::CpuSet::new();
                one.set(cpu).expect("cpu");
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("pinned");
                // Several senders, so a hash of the sender could not pass by luck.
                for _ in 0..4 {
                    let c = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
                    c.send_to(&[cpu as u8], addr).expect("send");
                }
            });
            sent.join().expect("sender");
            for (i, s) in group.iter().enumerate() {
                let mut got = 0;
                let mut buf = [std::mem::MaybeUninit::new(0u8); 16];
                while s.recv(&mut buf).is_ok() {
                    got += 1;
                }
                let want = if i == cpu % n { 4 } else { 0 };
                assert_eq!(
                    got, want,
                    "socket {i} after 4 datagrams sent from CPU {cpu}"
                );
            }
        }
    }

    /// A flood of out-of-zone names against an upstream that never answers: at most
    /// MAX_FORWARDS are in flight, the rest are answered SERVFAIL at once and counted, and
    /// zone names are still answered meanwhile.
    #[tokio::test]
    async fn forwards_are_bounded_and_the_excess_gets_servfail() {
        // An upstream that reads nothing and answers nothing.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("upstream");
        let upstream = silent.local_addr().expect("addr");
        let (addr, stats, server) = start_server(vec![upstream]);
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        wait_until_up(&client, addr).await;
        let mut buf = vec![0u8; 4096];
        let flood = MAX_FORWARDS + 50;
        for i in 0..flood {
            let q = query(1000 + i as u16, &format!("n{i}.example.org."));
            client.send_to(&q, addr).await.expect("send");
        }
        // The excess is refused at once, not after the upstream timeout.
        let mut servfails = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        while servfails < 50 {
            let Ok(Ok((n, _))) =
                tokio::time::timeout_at(deadline, client.recv_from(&mut buf)).await
            else {
                break;
            };
            let m = Message::from_vec(&buf[..n]).expect("answer");
            if m.metadata.response_code == ResponseCode::ServFail {
                servfails += 1;
            }
        }
        assert!(servfails >= 50, "{servfails} SERVFAIL answers");
        assert!(stats.forwards_refused.load(Ordering::Relaxed) >= 50);
        assert_eq!(stats.forwarded.load(Ordering::Relaxed), MAX_FORWARDS as u64);
        // The zone is still answered while the forwards wait.
        client
            .send_to(&query(7, "web.default.skiff.internal."), addr)
            .await
            .expect("send");
        let mut answered = false;
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await
        {
            let m = Message::from_vec(&buf[..n]).expect("answer");
            if m.metadata.id == 7 {
                answered = m.answers.len() == 1;
                break;
            }
        }
        assert!(answered, "zone answers keep coming during a forward flood");
        server.abort();
        drop(silent);
    }

    /// An upstream's answer is kept: the same name asked again (another id, another spelling)
    /// is answered without a second forward, with the asker's id and spelling; an answer the
    /// upstream gives SERVFAIL is asked for again.
    #[tokio::test]
    async fn upstream_answers_are_cached_for_their_ttl() {
        // An upstream that answers every A query with 198.18.0.9 (TTL 60), except names
        // starting with "fail", which get SERVFAIL; it counts what it is asked.
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").expect("upstream");
        let up_addr = upstream.local_addr().expect("addr");
        let asked = Arc::new(AtomicU64::new(0));
        let counter = asked.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, peer)) = upstream.recv_from(&mut buf) {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let mut r = Message::response(q.metadata.id, OpCode::Query);
                r.metadata.recursion_desired = true;
                r.metadata.recursion_available = true;
                let question = q.queries[0].clone();
                if question
                    .name()
                    .to_ascii()
                    .to_ascii_lowercase()
                    .starts_with("fail")
                {
                    r.metadata.response_code = ResponseCode::ServFail;
                } else {
                    r.add_answer(Record::from_rdata(
                        question.name().clone(),
                        60,
                        RData::A(A::from(Ipv4Addr::new(198, 18, 0, 9))),
                    ));
                }
                r.add_query(question);
                if let Ok(b) = r.to_vec() {
                    let _ = upstream.send_to(&b, peer);
                }
            }
        });
        let (addr, stats, server) = start_server(vec![up_addr]);
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        // Each name below is sent once, so the upstream's count is what those queries caused.
        wait_until_up(&client, addr).await;
        let ask = |id: u16, name: &'static str| {
            let (client, q) = (&client, query(id, name));
            async move {
                client.send_to(&q, addr).await.expect("send");
                let mut buf = vec![0u8; 4096];
                loop {
                    let (n, _) =
                        tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                            .await
                            .expect("an answer within 5 s")
                            .expect("receive");
                    let r = Message::from_vec(&buf[..n]).expect("answer");
                    if r.metadata.id == id {
                        return r;
                    }
                }
            }
        };
        let first = ask(1, "www.example.org.").await;
        assert_eq!(first.answers.len(), 1);
        let before = asked.load(Ordering::Relaxed);
        let again = ask(2, "WwW.ExAmPlE.oRg.").await;
        assert_eq!(again.metadata.id, 2);
        assert_eq!(again.queries[0].name().to_ascii(), "WwW.ExAmPlE.oRg.");
        assert_eq!(again.answers.len(), 1);
        assert!(again.answers[0].ttl <= 60);
        assert_eq!(
            asked.load(Ordering::Relaxed),
            before,
            "asked the upstream again"
        );
        assert!(stats.cache_hits.load(Ordering::Relaxed) >= 1);
        let failed = ask(3, "fail.example.org.").await;
        assert_eq!(failed.metadata.response_code, ResponseCode::ServFail);
        let before = asked.load(Ordering::Relaxed);
        let failed = ask(4, "fail.example.org.").await;
        assert_eq!(failed.metadata.response_code, ResponseCode::ServFail);
        assert!(
            asked.load(Ordering::Relaxed) > before,
            "a SERVFAIL was kept"
        );
        server.abort();
    }
}
