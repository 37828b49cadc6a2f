//! WireGuard's protocol (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, the whitepaper's sections 5
//! and 6), written so that one peer's packets can be sealed and opened on several threads at
//! once: a peer's sessions sit behind a read-write lock that the data path only reads, each
//! session's send counter is an atomic, and its replay window a lock held for a bitmap update,
//! not for the cipher. Handshakes, cookies and timers take the peer's handshake lock (and,
//! where they change sessions, the sessions' lock after it, never before).
//!
//! - [`Device`]: this end's static key; consumes an initiation far enough to learn which peer
//!   sent it (the caller finds the [`Peer`]), and answers initiations with a cookie reply when
//!   more arrive than [`HANDSHAKES_PER_SECOND`] (the sender must then prove its address, mac2,
//!   and one proven address gets at most [`PER_SOURCE_PER_SECOND`]).
//! - [`Peer`]: one remote static key. [`Peer::seal`] encrypts a packet into a transport
//!   message (or queues it and asks for a handshake); [`Peer::open`] handles every message
//!   addressed to this peer's indexes; [`Peer::tick`] runs the timers (rekey, retries,
//!   keepalives, expiry).
//!
//! Indexes: a session's local index is the peer's 24-bit index shifted left by 8, plus a
//! slot no live session of the peer holds, so `index >> 8` finds the peer.
//!
//! Where this differs from the kernel: transport messages are not padded to 16 bytes (as
//! boringtun's are not; the padding must stop at the path MTU, which this layer does not
//! know), and the timers run from the caller's tick (every 250 ms in the tunnel) rather than
//! from timers of their own. Crossing handshakes keep the session answered for, as the kernel
//! does, and a responder with data waits `rekey_timeout` for the initiator's confirmation
//! before it starts a handshake of its own.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use boringtun::x25519::{PublicKey, StaticSecret};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

type Mac16 = Blake2sMac<blake2::digest::consts::U16>;
type HmacBlake2s = hmac::SimpleHmac<Blake2s256>;

const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
const LABEL_MAC1: &[u8] = b"mac1----";
const LABEL_COOKIE: &[u8] = b"cookie--";

pub const INITIATION: u8 = 1;
pub const RESPONSE: u8 = 2;
pub const COOKIE_REPLY: u8 = 3;
pub const DATA: u8 = 4;
pub const INITIATION_LEN: usize = 148;
pub const RESPONSE_LEN: usize = 92;
pub const COOKIE_REPLY_LEN: usize = 64;
/// A transport message's header (type, reserved, receiver, counter) and tag.
pub const DATA_HEADER: usize = 16;
pub const DATA_OVERHEAD: usize = DATA_HEADER + 16;

const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

/// The protocol's timers: the whitepaper's constants, which tests shrink.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// An initiator starts a new handshake when its session is this old (REKEY_AFTER_TIME).
    pub rekey_after: Duration,
    /// A session this old is not used (REJECT_AFTER_TIME).
    pub reject_after: Duration,
    /// Handshake attempts end after this long without an answer (REKEY_ATTEMPT_TIME).
    pub rekey_attempt: Duration,
    /// An unanswered initiation is sent again after this long (REKEY_TIMEOUT).
    pub rekey_timeout: Duration,
    /// Data received and nothing sent for this long: a keepalive (KEEPALIVE_TIMEOUT).
    pub keepalive_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            rekey_after: Duration::from_secs(120),
            reject_after: Duration::from_secs(180),
            rekey_attempt: Duration::from_secs(90),
            rekey_timeout: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}
const COOKIE_LIFETIME: Duration = Duration::from_secs(120);
/// Initiations a second a device answers without asking for a cookie.
pub const HANDSHAKES_PER_SECOND: u64 = 100;
/// Under load, handshake messages a second taken from one address that proved it (mac2),
/// as the kernel's rate limiter allows.
const PER_SOURCE_PER_SECOND: u64 = 20;
/// Addresses the per-source count remembers within a second; more is treated as a flood.
const MAX_SOURCES: usize = 4096;
/// One peer's initiations are taken at most this often (the kernel's INITIATIONS_PER_SECOND).
const INITIATION_INTERVAL: Duration = Duration::from_millis(20);
/// Packets kept for a peer while its handshake is under way.
const MAX_QUEUED: usize = 256;
/// Counters a session's replay window remembers behind the highest.
const WINDOW: u64 = 2048;

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <HmacBlake2s as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        Update::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

fn mac16(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m = <Mac16 as KeyInit>::new_from_slice(key).expect("a 32-byte BLAKE2s key");
    Update::update(&mut m, data);
    m.finalize_fixed().into()
}

/// KDF_n of the whitepaper: n keys from a chaining key and input.
fn kdf<const N: usize>(chain: &[u8; 32], input: &[u8]) -> [[u8; 32]; N] {
    let prk = hmac(chain, &[input]);
    let mut out = [[0u8; 32]; N];
    let mut prev: Vec<u8> = Vec::new();
    for (i, o) in out.iter_mut().enumerate() {
        *o = hmac(&prk, &[&prev, &[i as u8 + 1]]);
        prev = o.to_vec();
    }
    out
}

fn handshake_seal(key: &[u8; 32], plain: &[u8], aad: &[u8], out: &mut [u8]) {
    let cipher = ChaCha20Poly1305::new(key.into());
    let (body, tag) = out.split_at_mut(plain.len());
    body.copy_from_slice(plain);
    let t = cipher
        .encrypt_in_place_detached(&[0u8; 12].into(), aad, body)
        .expect("a handshake field fits ChaCha20-Poly1305");
    tag[..16].copy_from_slice(&t);
}

fn handshake_open(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let (body, tag) = sealed.split_at(sealed.len().checked_sub(16)?);
    let mut plain = body.to_vec();
    cipher
        .decrypt_in_place_detached(&[0u8; 12].into(), aad, &mut plain, tag.into())
        .ok()?;
    Some(plain)
}

fn dh(secret: &StaticSecret, public: &[u8; 32]) -> Option<[u8; 32]> {
    let shared = secret.diffie_hellman(&PublicKey::from(*public));
    // An all-zero result: the public key was of small order.
    shared.was_contributory().then(|| shared.to_bytes())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// TAI64N of now, its nanoseconds rounded down (as the kernel does) so a timestamp does not
/// tell the time more finely than initiations may come.
fn tai64n() -> [u8; 12] {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&(0x4000_0000_0000_000a_u64 + now.as_secs()).to_be_bytes());
    t[8..].copy_from_slice(&(now.subsec_nanos() & !0x00ff_ffff).to_be_bytes());
    t
}

/// The receiver index of a message addressed to one of our sessions (responses, cookie
/// replies, transport data), and its type; `None` for an initiation or anything malformed.
pub fn receiver(msg: &[u8]) -> Option<(u8, u32)> {
    match (msg.first()?, msg.len()) {
        (&RESPONSE, RESPONSE_LEN) => Some((RESPONSE, u32_at(msg, 8))),
        (&COOKIE_REPLY, COOKIE_REPLY_LEN) => Some((COOKIE_REPLY, u32_at(msg, 4))),
        (&DATA, n) if n >= DATA_OVERHEAD => Some((DATA, u32_at(msg, 4))),
        _ => None,
    }
}

/// This end: its static key, and the cookie secret and handshake count that keep a flood of
/// initiations from costing a Diffie-Hellman each.
pub struct Device {
    secret: StaticSecret,
    public: [u8; 32],
    /// HASH(LABEL_MAC1 || our public key): the key of mac1 on messages to us.
    mac1_key: [u8; 32],
    /// HASH(LABEL_COOKIE || our public key): the key our cookie replies are sealed with.
    cookie_key: [u8; 32],
    /// The secret cookies are made from, and when it was drawn (changed every 2 minutes).
    cookie_secret: Mutex<(Instant, [u8; 32])>,
    /// Initiations in the current second: (second, count); more than `limit` is load.
    load: Mutex<(u64, u64)>,
    /// Under load, handshake messages with a valid mac2 per source address in the current
    /// second: (second, count by address); at most [`PER_SOURCE_PER_SECOND`] each.
    per_source: Mutex<(u64, std::collections::HashMap<IpAddr, u64>)>,
    limit: u64,
    timing: Timing,
    born: Instant,
}

/// An initiation consumed as far as its sender's static key: what [`Peer::respond`] needs.
pub struct Initiation {
    pub peer: [u8; 32],
    sender: u32,
    ephemeral: [u8; 32],
    timestamp: [u8; 12],
    chain: [u8; 32],
    hash: [u8; 32],
}

/// What [`Device::consume_initiation`] found.
pub enum Consumed {
    Initiation(Box<Initiation>),
    /// Under load and without a valid mac2: send this cookie reply (its length in `out`).
    CookieReply(usize),
    /// Not a valid initiation to us (ignored, as WireGuard ignores what it cannot
    /// authenticate).
    Invalid,
}

impl Device {
    pub fn new(private: [u8; 32]) -> Self {
        let secret = StaticSecret::from(private);
        let public = PublicKey::from(&secret).to_bytes();
        Self {
            mac1_key: hash(&[LABEL_MAC1, &public]),
            cookie_key: hash(&[LABEL_COOKIE, &public]),
            secret,
            public,
            cookie_secret: Mutex::new((Instant::now(), rand::random())),
            load: Mutex::new((0, 0)),
            per_source: Mutex::default(),
            limit: HANDSHAKES_PER_SECOND,
            timing: Timing::default(),
            born: Instant::now(),
        }
    }

    /// The same device with other timers (tests).
    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// The same device taking at most `n` initiations a second without a cookie.
    pub fn with_handshake_limit(mut self, n: u64) -> Self {
        self.limit = n;
        self
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Counts an initiation; true when this second has had more than the device takes freely.
    fn under_load(&self) -> bool {
        let second = self.born.elapsed().as_secs();
        let mut l = self
            .load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if l.0 != second {
            *l = (second, 0);
        }
        l.1 += 1;
        l.1 > self.limit
    }

    /// Counts a proven handshake message from `ip`; false past its share of this second.
    fn source_allowed(&self, ip: IpAddr) -> bool {
        let second = self.born.elapsed().as_secs();
        let mut p = self
            .per_source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if p.0 != second {
            p.0 = second;
            p.1.clear();
        }
        if p.1.len() >= MAX_SOURCES && !p.1.contains_key(&ip) {
            return false;
        }
        let n = p.1.entry(ip).or_insert(0);
        *n += 1;
        *n <= PER_SOURCE_PER_SECOND
    }

    /// The cookie for a sender's address: MAC(secret, ip || port), the secret redrawn every
    /// two minutes.
    fn cookie_for(&self, from: SocketAddr) -> [u8; 16] {
        let secret = {
            let mut s = self
                .cookie_secret
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if s.0.elapsed() >= COOKIE_LIFETIME {
                *s = (Instant::now(), rand::random());
            }
            s.1
        };
        let mut a = Vec::with_capacity(18);
        match from.ip() {
            IpAddr::V4(ip) => a.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => a.extend_from_slice(&ip.octets()),
        }
        a.extend_from_slice(&from.port().to_be_bytes());
        mac16(&secret, &a)
    }

    /// Checks mac1 of an initiation or response (`msg`, whole), and under load its mac2; a
    /// cookie reply to send is written to `out`.
    fn check_macs(&self, msg: &[u8], from: SocketAddr, out: &mut [u8]) -> Result<(), Consumed> {
        let n = msg.len();
        let (mac1, mac2) = (&msg[n - 32..n - 16], &msg[n - 16..]);
        if mac16(&self.mac1_key, &msg[..n - 32]) != mac1 {
            return Err(Consumed::Invalid);
        }
        if !self.under_load() {
            return Ok(());
        }
        let cookie = self.cookie_for(from);
        if mac16(&cookie, &msg[..n - 16]) == mac2 {
            // Proven, but one address still gets only so many Diffie-Hellmans a second.
            return if self.source_allowed(from.ip()) {
                Ok(())
            } else {
                Err(Consumed::Invalid)
            };
        }
        // A cookie reply: to the sender's index, sealed with our cookie key, bound to mac1.
        if out.len() < COOKIE_REPLY_LEN {
            return Err(Consumed::Invalid);
        }
        out[..COOKIE_REPLY_LEN].fill(0);
        out[0] = COOKIE_REPLY;
        out[4..8].copy_from_slice(&msg[4..8]);
        let nonce: [u8; 24] = rand::random();
        out[8..32].copy_from_slice(&nonce);
        let cipher = XChaCha20Poly1305::new((&self.cookie_key).into());
        let mut body = cookie;
        let Ok(tag) = cipher.encrypt_in_place_detached((&nonce).into(), mac1, &mut body) else {
            return Err(Consumed::Invalid);
        };
        out[32..48].copy_from_slice(&body);
        out[48..64].copy_from_slice(&tag);
        Err(Consumed::CookieReply(COOKIE_REPLY_LEN))
    }

    /// Consumes an initiation from `from` up to its sender's static key (checking its macs
    /// first); `out` takes a cookie reply when one is due.
    pub fn consume_initiation(&self, msg: &[u8], from: SocketAddr, out: &mut [u8]) -> Consumed {
        if msg.len() != INITIATION_LEN || msg[0] != INITIATION || msg[1..4] != [0, 0, 0] {
            return Consumed::Invalid;
        }
        if let Err(c) = self.check_macs(msg, from, out) {
            return c;
        }
        let sender = u32_at(msg, 4);
        let mut ephemeral = [0u8; 32];
        ephemeral.copy_from_slice(&msg[8..40]);
        let mut chain = hash(&[CONSTRUCTION]);
        let mut h = hash(&[&hash(&[&chain, IDENTIFIER]), &self.public]);
        [chain] = kdf::<1>(&chain, &ephemeral);
        h = hash(&[&h, &ephemeral]);
        let Some(shared) = dh(&self.secret, &ephemeral) else {
            return Consumed::Invalid;
        };
        let [c, k] = kdf::<2>(&chain, &shared);
        chain = c;
        let Some(peer) = handshake_open(&k, &msg[40..88], &h) else {
            return Consumed::Invalid;
        };
        h = hash(&[&h, &msg[40..88]]);
        let Ok(peer) = <[u8; 32]>::try_from(peer.as_slice()) else {
            return Consumed::Invalid;
        };
        let Some(shared) = dh(&self.secret, &peer) else {
            return Consumed::Invalid;
        };
        let [c, k] = kdf::<2>(&chain, &shared);
        chain = c;
        let Some(ts) = handshake_open(&k, &msg[88..116], &h) else {
            return Consumed::Invalid;
        };
        h = hash(&[&h, &msg[88..116]]);
        let Ok(timestamp) = <[u8; 12]>::try_from(ts.as_slice()) else {
            return Consumed::Invalid;
        };
        Consumed::Initiation(Box::new(Initiation {
            peer,
            sender,
            ephemeral,
            timestamp,
            chain,
            hash: h,
        }))
    }
}

/// The replay window of a session: the highest counter seen and a bitmap of the [`WINDOW`]
/// before it (RFC 6479's scheme, bit by bit).
#[derive(Default)]
struct Replay {
    /// One more than the highest counter accepted (0: none yet).
    next: u64,
    bits: Vec<u64>,
}

impl Replay {
    fn bit(c: u64) -> (usize, u64) {
        let i = c % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    /// Whether `c` could be accepted (not marked).
    fn fresh(&self, c: u64) -> bool {
        if c >= REJECT_AFTER_MESSAGES {
            return false;
        }
        if c >= self.next {
            return true;
        }
        if self.next - c > WINDOW {
            return false;
        }
        let (w, b) = Self::bit(c);
        self.bits.get(w).is_none_or(|word| word & b == 0)
    }

    /// Marks `c` as seen; false (and nothing changed) when it was not fresh.
    fn mark(&mut self, c: u64) -> bool {
        if !self.fresh(c) {
            return false;
        }
        if self.bits.is_empty() {
            self.bits = vec![0; (WINDOW / 64) as usize];
        }
        if c >= self.next {
            if c - self.next >= WINDOW {
                self.bits.fill(0);
            } else {
                for skipped in self.next..c {
                    let (w, b) = Self::bit(skipped);
                    self.bits[w] &= !b;
                }
            }
            self.next = c + 1;
        }
        let (w, b) = Self::bit(c);
        self.bits[w] |= b;
        true
    }
}

/// One session's keys and counters.
struct Session {
    local: u32,
    remote: u32,
    send: LessSafeKey,
    recv: LessSafeKey,
    sent: AtomicU64,
    replay: Mutex<Replay>,
    born: Instant,
    /// `born` in the peer's clock (microseconds since its device was made), for the data
    /// path's age check without another clock read.
    born_us: u64,
    /// This end started the handshake (only the initiator rekeys on age).
    initiator: bool,
    /// The initiator asked for a new handshake because the peer still talks on this session
    /// as it nears its end (once per session, as the kernel's `sent_lastminute_handshake`).
    last_minute: AtomicBool,
    /// The initiator asked for a new handshake because it sent on this session past
    /// `rekey_after` or REKEY_AFTER_MESSAGES (once per session).
    rekey_asked: AtomicBool,
}

impl Session {
    fn new(
        local: u32,
        remote: u32,
        (send, recv): (&[u8; 32], &[u8; 32]),
        born_us: u64,
        initiator: bool,
    ) -> Self {
        let key = |k: &[u8; 32]| {
            LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, k).expect("a 32-byte key"))
        };
        Self {
            local,
            remote,
            send: key(send),
            recv: key(recv),
            sent: AtomicU64::new(0),
            replay: Mutex::default(),
            born: Instant::now(),
            born_us,
            initiator,
            last_minute: AtomicBool::new(false),
            rekey_asked: AtomicBool::new(false),
        }
    }

    fn nonce(counter: u64) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&counter.to_le_bytes());
        Nonce::assume_unique_for_key(n)
    }

    fn usable(&self, t: &Timing) -> bool {
        self.born.elapsed() < t.reject_after
    }
}

#[derive(Default)]
struct Sessions {
    current: Option<Arc<Session>>,
    previous: Option<Arc<Session>>,
    /// A responder's session, until the initiator's first transport message confirms it.
    next: Option<Arc<Session>>,
}

impl Sessions {
    fn slots(&self) -> [&Option<Arc<Session>>; 3] {
        [&self.current, &self.previous, &self.next]
    }

    fn slots_mut(&mut self) -> [&mut Option<Arc<Session>>; 3] {
        [&mut self.current, &mut self.previous, &mut self.next]
    }
}

/// An initiation this end sent and awaits the response to.
struct Pending {
    local: u32,
    ephemeral: StaticSecret,
    chain: [u8; 32],
    hash: [u8; 32],
    sent: Instant,
    /// When to send it again: `rekey_timeout` and a jitter of up to a fifteenth of it (the
    /// kernel's 333 ms on 5 s), so two ends do not retry in lockstep.
    retry_after: Duration,
}

#[derive(Default)]
struct Handshake {
    pending: Option<Pending>,
    /// When the current run of attempts began (given up after `rekey_attempt`).
    attempts_since: Option<Instant>,
    /// The newest initiation timestamp taken from the peer, and when.
    last_timestamp: [u8; 12],
    last_initiation: Option<Instant>,
    /// When this end last answered an initiation (a responder with data waits
    /// `rekey_timeout` for the initiator to confirm before it starts a handshake itself).
    last_response: Option<Instant>,
    /// A cookie the peer sent us, and when.
    cookie: Option<(Instant, [u8; 16])>,
    /// The mac1 of our last initiation and of our last response: a cookie reply is bound to
    /// the message it answers.
    initiation_mac1: Option<[u8; 16]>,
    response_mac1: Option<[u8; 16]>,
    queue: VecDeque<Vec<u8>>,
}

/// What [`Peer::seal`] did with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Sealed {
    /// A transport message of this length is in `out`.
    Data(usize),
    /// No session: the packet was queued and a handshake initiation of this length is in
    /// `out`.
    Initiation(usize),
    /// No session: the packet queued (or dropped, the queue full or empty), with a handshake
    /// under way, or one this end answered awaiting the initiator's confirmation (or no room
    /// in `out` for an initiation).
    Queued,
    /// `out` is too small for the sealed packet.
    Dropped,
}

/// What [`Peer::open`] and [`Peer::respond`] left in `out`.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// A decrypted IP packet of this length, from this source address.
    Packet(usize, IpAddr),
    /// A message of this length to send back (a handshake response, or a keepalive that
    /// confirms a new session).
    Reply(usize),
    /// Authentic, nothing to send back (a keepalive, or a response taken while packets
    /// wait: [`Peer::take_queued`] has them).
    Nothing,
    /// A cookie reply taken. It proves nothing about where the peer is: no roaming on it.
    CookieTaken,
    /// This end is under load and the response did not prove its sender's address: a cookie
    /// reply of this length, for the sender, is in `out` (nothing was authenticated).
    CookieReply(usize),
    /// Not authentic, replayed, stale or malformed: dropped.
    Rejected,
}

/// One remote static key and everything this end keeps about it.
///
/// Locks: `handshake` before `sessions` wherever both are held; the data path takes only
/// `sessions`, for reading, and a session's replay window for a bitmap update.
pub struct Peer {
    device: Arc<Device>,
    pub remote: [u8; 32],
    /// DH(our static, their static), the same for every handshake.
    static_shared: Option<[u8; 32]>,
    /// Keys of mac1 on our messages to the peer, and of the cookies it seals to us.
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    /// The peer's 24-bit index (the top of its sessions' indexes).
    index: u32,
    next_slot: AtomicU8,
    /// Persistent keepalive, seconds (0: none).
    keepalive: AtomicU16,
    sessions: RwLock<Sessions>,
    handshake: Mutex<Handshake>,
    /// Packets wait in the handshake's queue (checked without its lock on the data path).
    queued: AtomicBool,
    /// A handshake the data path asked for, which the timers send.
    want_handshake: AtomicBool,
    last_done: Mutex<Option<SystemTime>>,
    /// Microseconds since `device.born` (0: never) of: the last message sent; the first
    /// data received since this end last sent (a passive keepalive is due
    /// `keepalive_timeout` after it); the first data sent that nothing has been received
    /// after (a new handshake is due `keepalive_timeout + rekey_timeout` after it).
    sent_any: AtomicU64,
    unanswered_received: AtomicU64,
    unanswered_sent: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sets a time stamp to `now` unless it already holds a time less than a millisecond older.
fn stamp(field: &AtomicU64, now: u64) {
    if now.saturating_sub(field.load(Ordering::Relaxed)) >= 1000 {
        field.store(now, Ordering::Relaxed);
    }
}

/// Clears a time stamp, writing only if it was set.
fn clear(field: &AtomicU64) {
    if field.load(Ordering::Relaxed) != 0 {
        field.store(0, Ordering::Relaxed);
    }
}

/// Sets a time stamp that is not set, writing only then.
fn set_if_unset(field: &AtomicU64, now: u64) {
    if field.load(Ordering::Relaxed) == 0 {
        let _ = field.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }
}

fn lock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Peer {
    /// A peer for `remote`; `None` for a key no handshake can be made with (one of small
    /// order, whose Diffie-Hellman result is all zeros).
    pub fn new(device: Arc<Device>, remote: [u8; 32], index: u32, keepalive: u16) -> Option<Self> {
        Some(Self {
            static_shared: Some(dh(&device.secret, &remote)?),
            mac1_key: hash(&[LABEL_MAC1, &remote]),
            cookie_key: hash(&[LABEL_COOKIE, &remote]),
            device,
            remote,
            index: index & 0x00ff_ffff,
            next_slot: AtomicU8::new(0),
            keepalive: AtomicU16::new(keepalive),
            sessions: RwLock::default(),
            handshake: Mutex::default(),
            queued: AtomicBool::new(false),
            want_handshake: AtomicBool::new(false),
            last_done: Mutex::new(None),
            sent_any: AtomicU64::new(0),
            unanswered_received: AtomicU64::new(0),
            unanswered_sent: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
        })
    }

    /// Changes the persistent keepalive (seconds, 0: none), keeping the sessions.
    pub fn set_keepalive(&self, seconds: u16) {
        self.keepalive.store(seconds, Ordering::Relaxed);
    }

    fn handshake(&self) -> std::sync::MutexGuard<'_, Handshake> {
        lock(&self.handshake)
    }

    fn now_us(&self) -> u64 {
        // Never 0, which means "never".
        self.device.born.elapsed().as_micros() as u64 + 1
    }

    fn since(&self, stamp: &AtomicU64) -> Option<Duration> {
        match stamp.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_micros(self.now_us().saturating_sub(t))),
        }
    }

    /// A local index for a new session: the peer's index and a slot no live session or
    /// pending initiation of this peer holds (so a message can never reach a stale session).
    fn new_local(&self, hs: &Handshake) -> u32 {
        let s = read(&self.sessions);
        loop {
            let local =
                (self.index << 8) | u32::from(self.next_slot.fetch_add(1, Ordering::Relaxed));
            let taken = s
                .slots()
                .iter()
                .any(|x| x.as_ref().is_some_and(|x| x.local == local))
                || hs.pending.as_ref().is_some_and(|p| p.local == local);
            if !taken {
                return local;
            }
        }
    }

    /// Writes mac1 and mac2 (with a fresh cookie, zeros otherwise) at the end of `msg`; its
    /// mac1.
    fn add_macs(&self, hs: &Handshake, msg: &mut [u8]) -> [u8; 16] {
        let n = msg.len();
        let mac1 = mac16(&self.mac1_key, &msg[..n - 32]);
        msg[n - 32..n - 16].copy_from_slice(&mac1);
        let mac2 = match hs.cookie {
            Some((at, cookie)) if at.elapsed() < COOKIE_LIFETIME => mac16(&cookie, &msg[..n - 16]),
            _ => [0u8; 16],
        };
        msg[n - 16..].copy_from_slice(&mac2);
        mac1
    }

    /// A handshake initiation into `out` (at least [`INITIATION_LEN`] bytes); its length.
    pub fn initiate(&self, out: &mut [u8]) -> Option<usize> {
        let mut hs = self.handshake();
        self.initiate_locked(&mut hs, out)
    }

    fn initiate_locked(&self, hs: &mut Handshake, out: &mut [u8]) -> Option<usize> {
        let static_shared = self.static_shared?;
        let msg = out.get_mut(..INITIATION_LEN)?;
        msg.fill(0);
        let local = self.new_local(hs);
        let ephemeral = StaticSecret::from(rand::random::<[u8; 32]>());
        let e_pub = PublicKey::from(&ephemeral).to_bytes();
        let mut chain = hash(&[CONSTRUCTION]);
        let mut h = hash(&[&hash(&[&chain, IDENTIFIER]), &self.remote]);
        msg[0] = INITIATION;
        msg[4..8].copy_from_slice(&local.to_le_bytes());
        msg[8..40].copy_from_slice(&e_pub);
        [chain] = kdf::<1>(&chain, &e_pub);
        h = hash(&[&h, &e_pub]);
        let [c, k] = kdf::<2>(&chain, &dh(&ephemeral, &self.remote)?);
        chain = c;
        handshake_seal(&k, &self.device.public, &h, &mut msg[40..88]);
        h = hash(&[&h, &msg[40..88]]);
        let [c, k] = kdf::<2>(&chain, &static_shared);
        chain = c;
        handshake_seal(&k, &tai64n(), &h, &mut msg[88..116]);
        h = hash(&[&h, &msg[88..116]]);
        hs.initiation_mac1 = Some(self.add_macs(hs, msg));
        let timeout = self.device.timing.rekey_timeout;
        let jitter = timeout.mul_f64(rand::random::<f64>() / 15.0);
        hs.pending = Some(Pending {
            local,
            ephemeral,
            chain,
            hash: h,
            sent: Instant::now(),
            retry_after: timeout + jitter,
        });
        hs.attempts_since.get_or_insert_with(Instant::now);
        self.want_handshake.store(false, Ordering::Relaxed);
        tracing::debug!(peer = self.index, local, "handshake initiation sent");
        self.sent_any.store(self.now_us(), Ordering::Relaxed);
        self.unanswered_received.store(0, Ordering::Relaxed);
        Some(INITIATION_LEN)
    }

    /// Answers an initiation [`Device::consume_initiation`] found to be from this peer: a
    /// response into `out`, and a session that becomes current at the initiator's first
    /// transport message.
    pub fn respond(&self, init: &Initiation, out: &mut [u8]) -> Opened {
        if init.peer != self.remote || self.static_shared.is_none() {
            return Opened::Rejected;
        }
        let mut hs = self.handshake();
        // A replayed or older initiation, or a flood of them.
        if init.timestamp <= hs.last_timestamp
            || hs
                .last_initiation
                .is_some_and(|t| t.elapsed() < INITIATION_INTERVAL)
        {
            return Opened::Rejected;
        }
        let Some(msg) = out.get_mut(..RESPONSE_LEN) else {
            return Opened::Rejected;
        };
        msg.fill(0);
        let local = self.new_local(&hs);
        let ephemeral = StaticSecret::from(rand::random::<[u8; 32]>());
        let e_pub = PublicKey::from(&ephemeral).to_bytes();
        msg[0] = RESPONSE;
        msg[4..8].copy_from_slice(&local.to_le_bytes());
        msg[8..12].copy_from_slice(&init.sender.to_le_bytes());
        msg[12..44].copy_from_slice(&e_pub);
        let [mut chain] = kdf::<1>(&init.chain, &e_pub);
        let mut h = hash(&[&init.hash, &e_pub]);
        let (Some(ee), Some(es)) = (
            dh(&ephemeral, &init.ephemeral),
            dh(&ephemeral, &self.remote),
        ) else {
            return Opened::Rejected;
        };
        [chain] = kdf::<1>(&chain, &ee);
        [chain] = kdf::<1>(&chain, &es);
        let [c, tau, k] = kdf::<3>(&chain, &[0u8; 32]);
        chain = c;
        h = hash(&[&h, &tau]);
        handshake_seal(&k, &[], &h, &mut msg[44..60]);
        hs.response_mac1 = Some(self.add_macs(&hs, msg));
        let [recv, send] = kdf::<2>(&chain, &[]);
        hs.last_timestamp = init.timestamp;
        hs.last_initiation = Some(Instant::now());
        hs.last_response = Some(Instant::now());
        let session = Arc::new(Session::new(
            local,
            init.sender,
            (&send, &recv),
            self.now_us(),
            false,
        ));
        write(&self.sessions).next = Some(session);
        drop(hs);
        tracing::debug!(peer = self.index, local, "handshake initiation answered");
        self.sent_any.store(self.now_us(), Ordering::Relaxed);
        self.unanswered_received.store(0, Ordering::Relaxed);
        Opened::Reply(RESPONSE_LEN)
    }

    /// Encrypts the IP packet `packet` into a transport message in `out` (at least its
    /// length plus [`DATA_OVERHEAD`]), on the current session; with none, queues it and
    /// starts a handshake. Takes the sessions' read lock only: many threads can seal for one
    /// peer at once. Packets are not padded (as boringtun does not): padding to 16 bytes
    /// would have to stop at the path's MTU, which this layer does not know.
    pub fn seal(&self, packet: &[u8], out: &mut [u8]) -> Sealed {
        if let Some(sealed) = self.seal_current(packet, out) {
            return sealed;
        }
        let mut hs = self.handshake();
        // A handshake may have completed since the sessions were read.
        if let Some(sealed) = self.seal_current(packet, out) {
            return sealed;
        }
        if hs.queue.len() < MAX_QUEUED && !packet.is_empty() {
            hs.queue.push_back(packet.to_vec());
            self.queued.store(true, Ordering::Release);
        }
        // A handshake under way, or one this end just answered, which the initiator is about
        // to confirm: wait for it.
        if hs.pending.is_some() || self.awaiting_confirmation(&hs) {
            return Sealed::Queued;
        }
        match self.initiate_locked(&mut hs, out) {
            Some(n) => Sealed::Initiation(n),
            None => Sealed::Queued,
        }
    }

    /// This end answered an initiation less than `rekey_timeout` ago and the initiator has
    /// not confirmed the session yet: a handshake of our own now would cross it.
    fn awaiting_confirmation(&self, hs: &Handshake) -> bool {
        hs.last_response
            .is_some_and(|t| t.elapsed() < self.device.timing.rekey_timeout)
            && read(&self.sessions).next.is_some()
    }

    /// Seals on the current session, if there is a usable one; an initiator's session that
    /// is sent on past `rekey_after` (or REKEY_AFTER_MESSAGES) asks the timers for a new
    /// handshake, once.
    fn seal_current(&self, packet: &[u8], out: &mut [u8]) -> Option<Sealed> {
        let sessions = read(&self.sessions);
        let s = sessions
            .current
            .as_ref()
            .filter(|s| s.usable(&self.device.timing))?;
        if out.len() < packet.len() + DATA_OVERHEAD {
            return Some(Sealed::Dropped);
        }
        let counter = s.sent.fetch_add(1, Ordering::Relaxed);
        if counter >= REJECT_AFTER_MESSAGES {
            return None;
        }
        let n = seal_with(s, counter, packet, out);
        let now = self.now_us();
        let rekey_after = self.device.timing.rekey_after.as_micros() as u64;
        if s.initiator
            && (counter >= REKEY_AFTER_MESSAGES || now.saturating_sub(s.born_us) >= rekey_after)
            && !s.rekey_asked.swap(true, Ordering::Relaxed)
        {
            self.want_handshake.store(true, Ordering::Relaxed);
        }
        drop(sessions);
        // The timer fields are shared by every thread sealing for this peer: written only
        // when they change (a millisecond is fine enough for timers of seconds), so the
        // threads do not take each other's cache line at every packet.
        stamp(&self.sent_any, now);
        clear(&self.unanswered_received);
        self.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if !packet.is_empty() {
            set_if_unset(&self.unanswered_sent, now);
        }
        Some(Sealed::Data(n))
    }

    /// Packets queued while there was no session, to seal now that there is one (none
    /// without a lock when nothing waits).
    pub fn take_queued(&self) -> Vec<Vec<u8>> {
        if !self.queued.load(Ordering::Acquire) || read(&self.sessions).current.is_none() {
            return Vec::new();
        }
        let mut hs = self.handshake();
        self.queued.store(false, Ordering::Release);
        hs.queue.drain(..).collect()
    }

    /// Handles a response, cookie reply or transport message addressed to one of this peer's
    /// indexes (see [`receiver`]), from `from`; a decrypted packet or a reply goes to `out`.
    pub fn open(&self, msg: &[u8], from: SocketAddr, out: &mut [u8]) -> Opened {
        match receiver(msg) {
            Some((DATA, index)) => self.open_data(msg, index, out),
            Some((RESPONSE, index)) => self.take_response(msg, index, from, out),
            Some((COOKIE_REPLY, index)) => self.take_cookie(msg, index),
            _ => Opened::Rejected,
        }
    }

    fn open_data(&self, msg: &[u8], index: u32, out: &mut [u8]) -> Opened {
        let t = &self.device.timing;
        let (session, is_current, is_next) = {
            let s = read(&self.sessions);
            let mine = |x: &Option<Arc<Session>>| x.as_ref().filter(|s| s.local == index).cloned();
            match (mine(&s.current), mine(&s.previous), mine(&s.next)) {
                (Some(c), _, _) => (c, true, false),
                (None, Some(p), _) => (p, false, false),
                (None, None, Some(n)) => (n, false, true),
                _ => return Opened::Rejected,
            }
        };
        if !session.usable(t) {
            return Opened::Rejected;
        }
        let counter = u64::from_le_bytes(msg[8..16].try_into().unwrap_or_default());
        if !lock(&session.replay).fresh(counter) {
            return Opened::Rejected;
        }
        let sealed = &msg[DATA_HEADER..];
        let Some(buf) = out.get_mut(..sealed.len()) else {
            return Opened::Rejected;
        };
        buf.copy_from_slice(sealed);
        let Ok(plain) = session
            .recv
            .open_in_place(Session::nonce(counter), Aad::empty(), buf)
        else {
            return Opened::Rejected;
        };
        let plain_len = plain.len();
        // Authentic: only now may the window move.
        if !lock(&session.replay).mark(counter) {
            return Opened::Rejected;
        }
        let now = self.now_us();
        clear(&self.unanswered_sent);
        self.rx_bytes.fetch_add(msg.len() as u64, Ordering::Relaxed);
        if is_next {
            // Under the handshake lock (taken first, as everywhere), so a seal that found no
            // session and queues its packet is done before the queue is looked at.
            let hs = self.handshake();
            let promoted = {
                let mut s = write(&self.sessions);
                let mine = s.next.as_ref().is_some_and(|n| n.local == index);
                if mine {
                    s.previous = s.current.take();
                    s.current = s.next.take();
                }
                mine
            };
            drop(hs);
            if promoted {
                self.handshake_done(index, "responder");
            }
        }
        // The peer still talks on an initiator's session near its end: the timers start a
        // new handshake, once.
        if is_current
            && session.initiator
            && session.born.elapsed()
                >= t.reject_after
                    .saturating_sub(t.keepalive_timeout)
                    .saturating_sub(t.rekey_timeout)
            && !session.last_minute.swap(true, Ordering::Relaxed)
        {
            self.want_handshake.store(true, Ordering::Relaxed);
        }
        if plain_len == 0 {
            return Opened::Nothing;
        }
        set_if_unset(&self.unanswered_received, now);
        match ip_packet(&out[..plain_len]) {
            Some((len, src)) => Opened::Packet(len, src),
            None => Opened::Rejected,
        }
    }

    fn take_response(&self, msg: &[u8], index: u32, from: SocketAddr, out: &mut [u8]) -> Opened {
        if msg[1..4] != [0, 0, 0] {
            return Opened::Rejected;
        }
        match self.device.check_macs(msg, from, out) {
            Ok(()) => {}
            Err(Consumed::CookieReply(n)) => return Opened::CookieReply(n),
            Err(_) => return Opened::Rejected,
        }
        let mut hs = self.handshake();
        let Some(p) = hs.pending.as_ref().filter(|p| p.local == index) else {
            return Opened::Rejected;
        };
        let sender = u32_at(msg, 4);
        let e_pub: [u8; 32] = msg[12..44].try_into().unwrap_or_default();
        let [mut chain] = kdf::<1>(&p.chain, &e_pub);
        let mut h = hash(&[&p.hash, &e_pub]);
        let (Some(ee), Some(se)) = (dh(&p.ephemeral, &e_pub), dh(&self.device.secret, &e_pub))
        else {
            return Opened::Rejected;
        };
        [chain] = kdf::<1>(&chain, &ee);
        [chain] = kdf::<1>(&chain, &se);
        let [c, tau, k] = kdf::<3>(&chain, &[0u8; 32]);
        chain = c;
        h = hash(&[&h, &tau]);
        if handshake_open(&k, &msg[44..60], &h).is_none() {
            return Opened::Rejected;
        }
        let [send, recv] = kdf::<2>(&chain, &[]);
        let session = Arc::new(Session::new(
            p.local,
            sender,
            (&send, &recv),
            self.now_us(),
            true,
        ));
        // Published before the handshake lock is let go, so a seal that finds no session and
        // then takes the lock sees this one.
        {
            let mut s = write(&self.sessions);
            // Crossing handshakes: a session this end answered for and the peer may already
            // send on stays, as the previous one (as the kernel keeps it).
            s.previous = match s.next.take() {
                Some(answered) => Some(answered),
                None => s.current.take(),
            };
            s.current = Some(session);
        }
        hs.pending = None;
        hs.attempts_since = None;
        let queued = !hs.queue.is_empty();
        drop(hs);
        self.handshake_done(index, "initiator");
        if queued {
            return Opened::Nothing;
        }
        // Nothing waiting: a keepalive confirms the session to the responder.
        match self.seal(&[], out) {
            Sealed::Data(n) => Opened::Reply(n),
            _ => Opened::Nothing,
        }
    }

    /// A cookie reply to our last initiation or our last response.
    fn take_cookie(&self, msg: &[u8], index: u32) -> Opened {
        let mut hs = self.handshake();
        let mac1 = if hs.pending.as_ref().is_some_and(|p| p.local == index) {
            hs.initiation_mac1
        } else if read(&self.sessions)
            .next
            .as_ref()
            .is_some_and(|n| n.local == index)
        {
            hs.response_mac1
        } else {
            None
        };
        let Some(mac1) = mac1 else {
            return Opened::Rejected;
        };
        let nonce: [u8; 24] = msg[8..32].try_into().unwrap_or_default();
        let mut cookie: [u8; 16] = msg[32..48].try_into().unwrap_or_default();
        let tag: [u8; 16] = msg[48..64].try_into().unwrap_or_default();
        let cipher = XChaCha20Poly1305::new((&self.cookie_key).into());
        if cipher
            .decrypt_in_place_detached((&nonce).into(), &mac1, &mut cookie, (&tag).into())
            .is_err()
        {
            return Opened::Rejected;
        }
        hs.cookie = Some((Instant::now(), cookie));
        tracing::debug!(peer = self.index, "cookie taken: the peer is under load");
        Opened::CookieTaken
    }

    /// The timers ([`Timing`]), run every few hundred milliseconds: a handshake retried after
    /// `rekey_timeout` and given up after `rekey_attempt`, a rekey of an old session, a new
    /// handshake when what was sent got no answer, keepalives (passive and persistent), and
    /// sessions past `reject_after` forgotten. A message to send goes to `out`.
    pub fn tick(&self, out: &mut [u8]) -> Option<usize> {
        let t = self.device.timing;
        let expired = |x: &Option<Arc<Session>>| x.as_ref().is_some_and(|x| !x.usable(&t));
        if read(&self.sessions).slots().into_iter().any(expired) {
            let mut s = write(&self.sessions);
            for slot in s.slots_mut() {
                if expired(slot) {
                    *slot = None;
                }
            }
        }
        let mut hs = self.handshake();
        if let Some(p) = &hs.pending {
            if p.sent.elapsed() >= p.retry_after {
                if hs
                    .attempts_since
                    .is_some_and(|since| since.elapsed() >= t.rekey_attempt)
                {
                    hs.pending = None;
                    hs.attempts_since = None;
                    hs.queue.clear();
                    self.queued.store(false, Ordering::Release);
                    tracing::debug!(peer = self.index, "handshake given up: no answer");
                    return None;
                }
                return self.initiate_locked(&mut hs, out);
            }
            // Not yet time to retry: keepalives still go on the current session.
        } else {
            // Packets wait for a session (unless the initiator is about to confirm the one
            // this end answered for); data sent got no answer; or the data path asked (a
            // rekey of an initiator's session sent on past `rekey_after`, or the peer still
            // talking on one near its end).
            let waiting = read(&self.sessions).current.is_none()
                && !hs.queue.is_empty()
                && !self.awaiting_confirmation(&hs);
            let unanswered = self
                .since(&self.unanswered_sent)
                .is_some_and(|d| d >= t.keepalive_timeout + t.rekey_timeout);
            let asked = self.want_handshake.load(Ordering::Relaxed);
            if waiting || unanswered || asked {
                self.unanswered_sent.store(0, Ordering::Relaxed);
                return self.initiate_locked(&mut hs, out);
            }
        }
        drop(hs);
        let keepalive = self.keepalive.load(Ordering::Relaxed);
        let persistent = keepalive > 0
            && self
                .since(&self.sent_any)
                .is_none_or(|d| d >= Duration::from_secs(u64::from(keepalive)));
        // Data came in and nothing went back for `keepalive_timeout`.
        let passive = self
            .since(&self.unanswered_received)
            .is_some_and(|r| r >= t.keepalive_timeout);
        if persistent || passive {
            return match self.seal(&[], out) {
                Sealed::Data(n) | Sealed::Initiation(n) => Some(n),
                Sealed::Queued | Sealed::Dropped => None,
            };
        }
        None
    }

    fn handshake_done(&self, local: u32, role: &str) {
        *lock(&self.last_done) = Some(SystemTime::now());
        tracing::debug!(peer = self.index, local, role, "handshake done");
    }

    /// When the last handshake completed.
    pub fn last_handshake(&self) -> Option<SystemTime> {
        *lock(&self.last_done)
    }
}

/// Seals `packet` as transport message `counter` of session `s` into `out`; the message's
/// length.
fn seal_with(s: &Session, counter: u64, packet: &[u8], out: &mut [u8]) -> usize {
    let n = DATA_HEADER + packet.len() + 16;
    out[..4].copy_from_slice(&[DATA, 0, 0, 0]);
    out[4..8].copy_from_slice(&s.remote.to_le_bytes());
    out[8..16].copy_from_slice(&counter.to_le_bytes());
    let body = &mut out[DATA_HEADER..DATA_HEADER + packet.len()];
    body.copy_from_slice(packet);
    let tag = s
        .send
        .seal_in_place_separate_tag(Session::nonce(counter), Aad::empty(), body)
        .expect("ChaCha20-Poly1305 seals any packet under 256 GiB");
    out[DATA_HEADER + packet.len()..n].copy_from_slice(tag.as_ref());
    n
}

/// An IP packet's length (from its header, without the padding) and source address.
fn ip_packet(p: &[u8]) -> Option<(usize, IpAddr)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
            let src: [u8; 4] = p[12..16].try_into().ok()?;
            (len >= 20 && len <= p.len()).then_some((len, IpAddr::from(src)))
        }
        6 if p.len() >= 40 => {
            let len = usize::from(u16::from_be_bytes([p[4], p[5]])) + 40;
            let src: [u8; 16] = p[8..24].try_into().ok()?;
            (len <= p.len()).then_some((len, IpAddr::from(src)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::noise::{Tunn, TunnResult};
    use proptest::prelude::*;

    fn key() -> [u8; 32] {
        rand::random()
    }

    fn public(private: [u8; 32]) -> [u8; 32] {
        PublicKey::from(&StaticSecret::from(private)).to_bytes()
    }

    /// An IPv4 packet from `src` with `payload` bytes of UDP.
    fn ipv4(src: [u8; 4], payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 20 + payload];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&[10, 42, 9, 9]);
        for (i, b) in p[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    const FROM: &str = "198.18.0.2:51820";

    fn from() -> SocketAddr {
        FROM.parse().expect("address")
    }

    fn boringtun(private: [u8; 32], remote: [u8; 32]) -> Tunn {
        Tunn::new(
            StaticSecret::from(private),
            PublicKey::from(remote),
            None,
            None,
            77,
            None,
        )
    }

    fn to_network(r: TunnResult<'_>) -> Vec<u8> {
        match r {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            TunnResult::Err(e) => panic!("boringtun: {e:?}"),
            _ => panic!("boringtun sent nothing"),
        }
    }

    /// This module initiates; boringtun (the same protocol as wireguard-go and the kernel)
    /// answers; packets go both ways, and a replayed message is refused.
    #[test]
    fn a_handshake_we_start_with_boringtun_and_data_both_ways() {
        let (a, b) = (key(), key());
        let dev = Arc::new(Device::new(a));
        let ours = Peer::new(dev.clone(), public(b), 1, 0).expect("a peer");
        let mut theirs = boringtun(b, dev.public());
        let (mut buf, mut out) = (vec![0u8; 4096], vec![0u8; 4096]);
        let ip = from().ip();

        // No session: the packet waits and a handshake starts.
        let pkt = ipv4([10, 42, 1, 2], 100);
        let Sealed::Initiation(n) = ours.seal(&pkt, &mut buf) else {
            panic!("no initiation")
        };
        assert_eq!(
            ours.seal(&pkt, &mut buf),
            Sealed::Queued,
            "one handshake at a time"
        );
        let response = to_network(theirs.decapsulate(Some(ip), &buf[..n], &mut out));
        assert_eq!(ours.open(&response, from(), &mut buf), Opened::Nothing);
        assert!(ours.last_handshake().is_some());
        let queued = ours.take_queued();
        assert_eq!(queued, vec![pkt.clone(), pkt.clone()]);
        for q in &queued {
            let Sealed::Data(n) = ours.seal(q, &mut buf) else {
                panic!("no session")
            };
            match theirs.decapsulate(Some(ip), &buf[..n], &mut out) {
                TunnResult::WriteToTunnelV4(p, src) => {
                    assert_eq!((&p[..], src), (&pkt[..], [10, 42, 1, 2].into()));
                }
                _ => panic!("boringtun did not open our packet"),
            }
        }
        // And back.
        let back = ipv4([10, 42, 2, 3], 1000);
        let msg = to_network(theirs.encapsulate(&back, &mut out));
        assert_eq!(
            ours.open(&msg, from(), &mut buf),
            Opened::Packet(back.len(), [10, 42, 2, 3].into())
        );
        assert_eq!(&buf[..back.len()], &back[..]);
        assert_eq!(
            ours.open(&msg, from(), &mut buf),
            Opened::Rejected,
            "replayed"
        );
        let mut forged = msg.clone();
        *forged.last_mut().expect("tag") ^= 1;
        assert_eq!(
            ours.open(&forged, from(), &mut buf),
            Opened::Rejected,
            "forged"
        );
        assert!(ours.tx_bytes.load(Ordering::Relaxed) > 0);
        assert!(ours.rx_bytes.load(Ordering::Relaxed) > 0);
    }

    /// boringtun initiates; this module answers; boringtun's keepalive confirms the session,
    /// after which this end sends; the same initiation again is refused (replay).
    #[test]
    fn a_handshake_boringtun_starts_is_answered() {
        let (a, b) = (key(), key());
        let dev = Arc::new(Device::new(a));
        let ours = Peer::new(dev.clone(), public(b), 2, 0).expect("a peer");
        let mut theirs = boringtun(b, dev.public());
        let (mut buf, mut out) = (vec![0u8; 4096], vec![0u8; 4096]);
        let ip = from().ip();

        let init = to_network(theirs.format_handshake_initiation(&mut out, false));
        let Consumed::Initiation(i) = dev.consume_initiation(&init, from(), &mut buf) else {
            panic!("initiation not consumed")
        };
        assert_eq!(i.peer, public(b));
        let Opened::Reply(n) = ours.respond(&i, &mut buf) else {
            panic!("no response")
        };
        // Until the initiator speaks on it, the session is not ours to send on: a packet
        // waits (no second, crossing handshake), and goes once the initiator confirms.
        let early = ipv4([10, 42, 1, 2], 10);
        assert_eq!(ours.seal(&early, &mut out), Sealed::Queued);
        assert!(ours.take_queued().is_empty(), "nothing to send on yet");
        let keepalive = to_network(theirs.decapsulate(Some(ip), &buf[..n], &mut out));
        assert_eq!(ours.open(&keepalive, from(), &mut buf), Opened::Nothing);
        assert_eq!(ours.take_queued(), vec![early]);
        let pkt = ipv4([10, 42, 1, 2], 333);
        let Sealed::Data(n) = ours.seal(&pkt, &mut buf) else {
            panic!("no session after the keepalive")
        };
        assert!(matches!(
            theirs.decapsulate(Some(ip), &buf[..n], &mut out),
            TunnResult::WriteToTunnelV4(..)
        ));
        let Consumed::Initiation(again) = dev.consume_initiation(&init, from(), &mut buf) else {
            panic!("initiation not consumed")
        };
        assert_eq!(
            ours.respond(&again, &mut buf),
            Opened::Rejected,
            "replayed initiation"
        );
        // An initiation to someone else's key is not consumed.
        let stranger = Device::new(key());
        assert!(matches!(
            stranger.consume_initiation(&init, from(), &mut buf),
            Consumed::Invalid
        ));
    }

    /// Two ends of this module; then one peer's packets are sealed on four threads at once,
    /// each message opened exactly once at the other end, in any order.
    #[test]
    fn one_peer_seals_on_many_threads_at_once() {
        let (pa, pb) = connected(Timing::default());
        let pa = Arc::new(pa);
        let mut buf = vec![0u8; 4096];

        const THREADS: usize = 4;
        const EACH: usize = 400;
        let sealed: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let pa = pa.clone();
                    s.spawn(move || {
                        let mut out = vec![0u8; 2048];
                        (0..EACH)
                            .map(|i| {
                                let mut p = ipv4([10, 42, t as u8, 1], 64);
                                p[20..24].copy_from_slice(&(i as u32).to_be_bytes());
                                let Sealed::Data(n) = pa.seal(&p, &mut out) else {
                                    panic!("no session")
                                };
                                out[..n].to_vec()
                            })
                            .collect()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("sealer"))
                .collect()
        });
        let mut counters = std::collections::BTreeSet::new();
        let mut seen = std::collections::BTreeSet::new();
        // Opened in an order no single thread sent them in: threads interleaved, backwards.
        for i in (0..EACH).rev() {
            for (t, msgs) in sealed.iter().enumerate() {
                let m = &msgs[i];
                counters.insert(u64::from_le_bytes(m[8..16].try_into().expect("counter")));
                let Opened::Packet(len, src) = pb.open(m, from(), &mut buf) else {
                    panic!("message {i} of thread {t} not opened")
                };
                assert_eq!((len, src), (84, IpAddr::from([10, 42, t as u8, 1])));
                seen.insert((t, u32::from_be_bytes(buf[20..24].try_into().expect("n"))));
            }
        }
        assert_eq!(counters.len(), THREADS * EACH, "every counter used once");
        assert_eq!(seen.len(), THREADS * EACH, "every packet opened once");
    }

    /// Under load a responder asks for a cookie; the initiator takes it and proves its
    /// address with mac2: with boringtun as the responder, and with boringtun as the
    /// initiator.
    #[test]
    fn cookies_under_load_both_ways_with_boringtun() {
        let (a, b) = (key(), key());
        let ip = from().ip();
        let (mut buf, mut out) = (vec![0u8; 4096], vec![0u8; 4096]);

        // boringtun answers: more than 10 initiations and it wants a cookie.
        let dev = Arc::new(Device::new(a));
        let ours = Peer::new(dev.clone(), public(b), 5, 0).expect("a peer");
        let mut theirs = boringtun(b, dev.public());
        let mut cookie_reply = None;
        for _ in 0..50 {
            let n = ours.initiate(&mut buf).expect("initiation");
            if let TunnResult::WriteToNetwork(p) = theirs.decapsulate(Some(ip), &buf[..n], &mut out)
                && p[0] == COOKIE_REPLY
            {
                cookie_reply = Some(p.to_vec());
                break;
            }
        }
        let reply = cookie_reply.expect("boringtun never asked for a cookie");
        assert_eq!(ours.open(&reply, from(), &mut buf), Opened::CookieTaken);
        // With mac2, a later initiation (a newer timestamp) is answered.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(Instant::now() < deadline, "boringtun never took our mac2");
            let n = ours.initiate(&mut buf).expect("initiation");
            if let TunnResult::WriteToNetwork(p) = theirs.decapsulate(Some(ip), &buf[..n], &mut out)
                && p[0] == RESPONSE
            {
                break;
            }
            std::thread::sleep(INITIATION_INTERVAL);
        }

        // This module answers: past its limit it sends a cookie reply, which boringtun takes,
        // and boringtun's next initiation carries a mac2 this module accepts.
        let (a, b) = (key(), key());
        let dev = Arc::new(Device::new(a).with_handshake_limit(1));
        let mut theirs = boringtun(b, dev.public());
        let first = to_network(theirs.format_handshake_initiation(&mut out, true));
        assert!(matches!(
            dev.consume_initiation(&first, from(), &mut buf),
            Consumed::Initiation(_)
        ));
        let second = to_network(theirs.format_handshake_initiation(&mut out, true));
        let Consumed::CookieReply(n) = dev.consume_initiation(&second, from(), &mut buf) else {
            panic!("no cookie reply under load")
        };
        assert!(matches!(
            theirs.decapsulate(Some(ip), &buf[..n], &mut out),
            TunnResult::Done
        ));
        let third = to_network(theirs.format_handshake_initiation(&mut out, true));
        assert!(matches!(
            dev.consume_initiation(&third, from(), &mut buf),
            Consumed::Initiation(_)
        ));
        // The same mac2 from another address is not proof.
        let elsewhere: SocketAddr = "198.18.0.3:51820".parse().expect("address");
        assert!(matches!(
            dev.consume_initiation(&third, elsewhere, &mut buf),
            Consumed::CookieReply(_)
        ));
    }

    /// Timers fire on microsecond stamps; instants read around them may differ by this much.
    const SLACK: Duration = Duration::from_millis(2);

    /// The whitepaper's timers, shrunk to milliseconds.
    fn fast() -> Timing {
        Timing {
            rekey_after: Duration::from_millis(300),
            reject_after: Duration::from_millis(1500),
            rekey_attempt: Duration::from_millis(400),
            rekey_timeout: Duration::from_millis(50),
            keepalive_timeout: Duration::from_millis(100),
        }
    }

    /// Two ends of this module with a session, `a` its initiator.
    fn connected(timing: Timing) -> (Peer, Peer) {
        let (da, db) = (
            Arc::new(Device::new(key()).with_timing(timing)),
            Arc::new(Device::new(key()).with_timing(timing)),
        );
        let a = Peer::new(da.clone(), db.public(), 3, 0).expect("a peer");
        let b = Peer::new(db.clone(), da.public(), 4, 0).expect("a peer");
        let mut buf = vec![0u8; 4096];
        let n = a.initiate(&mut buf).expect("initiation");
        let Consumed::Initiation(i) = db.consume_initiation(&buf[..n], from(), &mut [0; 64]) else {
            panic!("not consumed")
        };
        let Opened::Reply(n) = b.respond(&i, &mut buf) else {
            panic!("no response")
        };
        let resp = buf[..n].to_vec();
        let Opened::Reply(n) = a.open(&resp, from(), &mut buf) else {
            panic!("no keepalive")
        };
        let keepalive = buf[..n].to_vec();
        assert_eq!(b.open(&keepalive, from(), &mut buf), Opened::Nothing);
        (a, b)
    }

    /// Calls `tick` every 5 ms until it has something to send (at most 3 s): what, and when.
    fn tick_until_sent(p: &Peer, out: &mut [u8]) -> (usize, Instant) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(n) = p.tick(out) {
                return (n, Instant::now());
            }
            assert!(Instant::now() < deadline, "the timers sent nothing");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// An initiation nobody answers is sent again after `rekey_timeout`, under a new index,
    /// until `rekey_attempt` has passed; then the peer gives up (a new packet starts afresh).
    #[test]
    fn an_unanswered_initiation_is_retried_then_given_up() {
        // Long enough that a busy machine does not make "too early" late.
        let t = Timing {
            rekey_timeout: Duration::from_millis(200),
            rekey_attempt: Duration::from_millis(1000),
            ..fast()
        };
        let dev = Arc::new(Device::new(key()).with_timing(t));
        let p = Peer::new(dev, public(key()), 9, 0).expect("a peer");
        let mut out = vec![0u8; 4096];
        let began = Instant::now();
        let Sealed::Initiation(_) = p.seal(&ipv4([10, 42, 1, 2], 10), &mut out) else {
            panic!("no initiation")
        };
        let first = u32_at(&out, 4);
        assert_eq!(p.tick(&mut out), None, "too early to retry");
        let (n, at) = tick_until_sent(&p, &mut out);
        assert_eq!((n, out[0]), (INITIATION_LEN, INITIATION));
        assert!(at - began >= t.rekey_timeout - SLACK);
        assert_ne!(u32_at(&out, 4), first, "a retry is a new handshake");
        let mut retries = 1;
        while began.elapsed() < t.rekey_attempt + t.rekey_timeout * 2 {
            if p.tick(&mut out).is_some() {
                retries += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // One every `rekey_timeout` while `rekey_attempt` lasts (fewer if the machine is busy).
        assert!(
            (1..=6).contains(&retries),
            "{retries} retries in {:?}",
            t.rekey_attempt
        );
        assert!(
            matches!(
                p.seal(&ipv4([10, 42, 1, 2], 10), &mut out),
                Sealed::Initiation(_)
            ),
            "given up: a new packet starts a new run of attempts"
        );
    }

    /// Data received and nothing sent back: a keepalive after `keepalive_timeout`. Data sent
    /// and nothing received: a new handshake after `keepalive_timeout + rekey_timeout`. The
    /// initiator rekeys after `rekey_after` while it sends; past `reject_after` a session is
    /// not used.
    #[test]
    fn keepalives_rekeys_and_expiry_follow_the_timers() {
        let t = fast();
        let (a, b) = connected(t);
        let (mut buf, mut out) = (vec![0u8; 4096], vec![0u8; 4096]);
        let Sealed::Data(n) = a.seal(&ipv4([10, 42, 1, 2], 10), &mut buf) else {
            panic!("no session")
        };
        let sent = Instant::now();
        assert!(matches!(
            b.open(&buf[..n], from(), &mut out),
            Opened::Packet(..)
        ));
        // b answers nothing: a keepalive, an empty transport message.
        let (n, at) = tick_until_sent(&b, &mut out);
        assert_eq!((n, out[0]), (DATA_OVERHEAD, DATA));
        assert!(at - sent >= t.keepalive_timeout - SLACK);
        let keepalive = out[..n].to_vec();
        // a has had no answer yet: it starts a handshake once that is overdue.
        let (n, at) = tick_until_sent(&a, &mut out);
        assert_eq!((n, out[0]), (INITIATION_LEN, INITIATION));
        assert!(at - sent >= t.keepalive_timeout + t.rekey_timeout - SLACK);
        assert_eq!(a.open(&keepalive, from(), &mut buf), Opened::Nothing);

        // A fresh pair talking both ways: the initiator rekeys when its session is
        // `rekey_after` old.
        let (a, b) = connected(t);
        let born2 = Instant::now();
        let deadline = born2 + Duration::from_secs(3);
        let at = loop {
            let Sealed::Data(n) = a.seal(&ipv4([10, 42, 1, 2], 10), &mut buf) else {
                panic!("no session")
            };
            assert!(matches!(
                b.open(&buf[..n], from(), &mut out),
                Opened::Packet(..)
            ));
            let Sealed::Data(n) = b.seal(&ipv4([10, 42, 2, 2], 10), &mut buf) else {
                panic!("no session")
            };
            assert!(matches!(
                a.open(&buf[..n], from(), &mut out),
                Opened::Packet(..)
            ));
            if let Some(n) = a.tick(&mut out) {
                if out[0] == INITIATION {
                    assert_eq!(n, INITIATION_LEN);
                    break Instant::now();
                }
                continue;
            }
            assert!(Instant::now() < deadline, "no rekey");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(at - born2 >= t.rekey_after - SLACK);

        // A pair left alone past `reject_after`: its session is gone.
        let t = Timing {
            reject_after: Duration::from_millis(200),
            ..t
        };
        let (a, _b) = connected(t);
        std::thread::sleep(t.reject_after);
        assert!(matches!(
            a.seal(&ipv4([10, 42, 1, 2], 10), &mut buf),
            Sealed::Initiation(_)
        ));
    }

    /// Both ends initiate at once: each answers the other's initiation and then takes the
    /// answer to its own. Each sends on the session it initiated, which the other end holds as
    /// the one it answered for: both directions still get through.
    #[test]
    fn crossing_handshakes_keep_the_session_the_peer_sends_on() {
        let (da, db) = (Arc::new(Device::new(key())), Arc::new(Device::new(key())));
        let a = Peer::new(da.clone(), db.public(), 1, 0).expect("a peer");
        let b = Peer::new(db.clone(), da.public(), 2, 0).expect("a peer");
        let (mut ia, mut ib) = (vec![0u8; 256], vec![0u8; 256]);
        let na = a.initiate(&mut ia).expect("a's initiation");
        let nb = b.initiate(&mut ib).expect("b's initiation");
        let (mut ra, mut rb) = (vec![0u8; 256], vec![0u8; 256]);
        let Consumed::Initiation(i) = db.consume_initiation(&ia[..na], from(), &mut ra) else {
            panic!("b did not take a's initiation")
        };
        let Opened::Reply(nra) = b.respond(&i, &mut ra) else {
            panic!("b did not answer")
        };
        let Consumed::Initiation(i) = da.consume_initiation(&ib[..nb], from(), &mut rb) else {
            panic!("a did not take b's initiation")
        };
        let Opened::Reply(nrb) = a.respond(&i, &mut rb) else {
            panic!("a did not answer")
        };
        let (mut buf, mut out) = (vec![0u8; 4096], vec![0u8; 4096]);
        assert!(matches!(
            a.open(&ra[..nra], from(), &mut buf),
            Opened::Reply(_)
        ));
        assert!(matches!(
            b.open(&rb[..nrb], from(), &mut buf),
            Opened::Reply(_)
        ));
        for (from_peer, to_peer, src) in [(&a, &b, [10, 42, 1, 1]), (&b, &a, [10, 42, 2, 1])] {
            let pkt = ipv4(src, 50);
            let Sealed::Data(n) = from_peer.seal(&pkt, &mut buf) else {
                panic!("no session to send on")
            };
            assert_eq!(
                to_peer.open(&buf[..n], from(), &mut out),
                Opened::Packet(pkt.len(), IpAddr::from(src)),
                "a packet from {src:?} across crossed handshakes"
            );
        }
    }

    /// An initiator under load asks the responder for a cookie in answer to its response; the
    /// responder takes it (bound to that response), and its answer to the next initiation
    /// carries a mac2 the loaded initiator accepts.
    #[test]
    fn a_loaded_initiator_gets_its_cookie_onto_the_next_response() {
        let da = Arc::new(Device::new(key()).with_handshake_limit(0));
        let db = Arc::new(Device::new(key()));
        let a = Peer::new(da.clone(), db.public(), 1, 0).expect("a peer");
        let b = Peer::new(db.clone(), da.public(), 2, 0).expect("a peer");
        let (mut buf, mut out) = (vec![0u8; 4096], vec![0u8; 4096]);
        let exchange = |buf: &mut Vec<u8>, out: &mut Vec<u8>| {
            let n = a.initiate(buf).expect("initiation");
            let Consumed::Initiation(i) = db.consume_initiation(&buf[..n], from(), out) else {
                panic!("b did not take the initiation")
            };
            let Opened::Reply(n) = b.respond(&i, out) else {
                panic!("b did not answer")
            };
            a.open(&out[..n], from(), buf)
        };
        let Opened::CookieReply(n) = exchange(&mut buf, &mut out) else {
            panic!("a, under load, did not ask for a cookie")
        };
        assert_eq!(b.open(&buf[..n], from(), &mut out), Opened::CookieTaken);
        std::thread::sleep(INITIATION_INTERVAL);
        assert!(
            matches!(exchange(&mut buf, &mut out), Opened::Reply(_)),
            "the response with mac2 was not taken"
        );
    }

    /// A session nobody sends on is not rekeyed when it ages (the kernel rekeys when it
    /// sends); the first packet after `rekey_after` asks for the handshake.
    #[test]
    fn an_idle_session_is_rekeyed_only_when_sent_on() {
        let t = fast();
        let (a, _b) = connected(t);
        let mut out = vec![0u8; 4096];
        std::thread::sleep(t.rekey_after + SLACK);
        assert_eq!(a.tick(&mut out), None, "an idle session is left alone");
        assert!(matches!(
            a.seal(&ipv4([10, 42, 1, 2], 10), &mut out),
            Sealed::Data(_)
        ));
        assert_eq!(
            a.tick(&mut out),
            Some(INITIATION_LEN),
            "sent on when old: a rekey"
        );
    }

    /// A responder with a packet to send waits `rekey_timeout` for the initiator to confirm
    /// the session it answered for, in `seal` and in the timers alike; then it starts a
    /// handshake of its own.
    #[test]
    fn a_responder_waits_for_confirmation_before_its_own_handshake() {
        let t = Timing {
            rekey_timeout: Duration::from_millis(300),
            ..fast()
        };
        let (da, db) = (
            Arc::new(Device::new(key()).with_timing(t)),
            Arc::new(Device::new(key()).with_timing(t)),
        );
        let a = Peer::new(da.clone(), db.public(), 1, 0).expect("a peer");
        let b = Peer::new(db.clone(), da.public(), 2, 0).expect("a peer");
        let mut buf = vec![0u8; 4096];
        let n = a.initiate(&mut buf).expect("initiation");
        let Consumed::Initiation(i) = db.consume_initiation(&buf[..n], from(), &mut [0; 64]) else {
            panic!("not consumed")
        };
        let answered = Instant::now();
        assert!(matches!(b.respond(&i, &mut buf), Opened::Reply(_)));
        assert_eq!(b.seal(&ipv4([10, 42, 2, 2], 10), &mut buf), Sealed::Queued);
        assert_eq!(b.tick(&mut buf), None, "the initiator may still confirm");
        let (n, at) = tick_until_sent(&b, &mut buf);
        assert_eq!((n, buf[0]), (INITIATION_LEN, INITIATION));
        assert!(at - answered >= t.rekey_timeout - SLACK);
    }

    /// A persistent keepalive goes out when nothing else was sent for its interval; data
    /// sent back in time cancels a passive keepalive.
    #[test]
    fn persistent_keepalives_and_a_passive_one_cancelled_by_a_reply() {
        // Data b sends gets no answer here: its handshake for that is far off.
        let t = Timing {
            rekey_timeout: Duration::from_millis(1000),
            ..fast()
        };
        let (a, b) = connected(t);
        let (mut buf, mut out) = (vec![0u8; 4096], vec![0u8; 4096]);
        let Sealed::Data(n) = a.seal(&ipv4([10, 42, 1, 2], 10), &mut buf) else {
            panic!("no session")
        };
        assert!(matches!(
            b.open(&buf[..n], from(), &mut out),
            Opened::Packet(..)
        ));
        assert!(matches!(
            b.seal(&ipv4([10, 42, 2, 2], 10), &mut out),
            Sealed::Data(_)
        ));
        std::thread::sleep(t.keepalive_timeout * 2);
        assert_eq!(b.tick(&mut out), None, "b answered: no keepalive due");

        // A pair that has sent no data: b's persistent keepalive, a second after its last
        // message.
        let (_a, b) = connected(t);
        let since = Instant::now();
        b.set_keepalive(1);
        let (n, at) = tick_until_sent(&b, &mut out);
        assert_eq!((n, out[0]), (DATA_OVERHEAD, DATA));
        assert!(
            at - since >= Duration::from_millis(900),
            "sent after {:?}",
            at - since
        );
    }

    /// Under load, an address that proved itself with mac2 still gets only so many
    /// handshakes a second; and a key of small order makes no peer.
    #[test]
    fn a_proven_address_is_still_limited_and_small_order_keys_are_refused() {
        let dev = Arc::new(Device::new(key()).with_handshake_limit(0));
        let them = Arc::new(Device::new(key()));
        let p = Peer::new(them.clone(), dev.public(), 1, 0).expect("a peer");
        let (mut buf, mut out) = (vec![0u8; 4096], vec![0u8; 4096]);
        let n = p.initiate(&mut buf).expect("initiation");
        let Consumed::CookieReply(c) = dev.consume_initiation(&buf[..n], from(), &mut out) else {
            panic!("no cookie asked for under load")
        };
        assert_eq!(p.open(&out[..c], from(), &mut buf), Opened::CookieTaken);
        let (mut taken, mut refused) = (0, 0);
        let start = Instant::now();
        for _ in 0..2 * PER_SOURCE_PER_SECOND + 5 {
            let n = p.initiate(&mut buf).expect("initiation");
            match dev.consume_initiation(&buf[..n], from(), &mut out) {
                Consumed::Initiation(_) => taken += 1,
                Consumed::Invalid => refused += 1,
                Consumed::CookieReply(_) => panic!("mac2 not taken"),
            }
        }
        // At most two seconds' share, if the loop crossed into a second one.
        let seconds = if start.elapsed() < Duration::from_secs(1) {
            2
        } else {
            3
        };
        assert!(
            taken >= 1 && taken <= seconds * PER_SOURCE_PER_SECOND,
            "{taken} taken"
        );
        assert!(refused >= 5 || seconds > 2, "{refused} refused");
        assert!(
            Peer::new(dev.clone(), [0u8; 32], 2, 0).is_none(),
            "a small-order key"
        );
    }

    #[test]
    fn the_replay_window_takes_each_counter_once_within_its_reach() {
        let mut r = Replay::default();
        assert!(r.mark(0));
        assert!(!r.mark(0));
        assert!(r.mark(5));
        assert!(r.mark(3), "late but inside the window");
        assert!(!r.mark(3));
        assert!(r.mark(5 + WINDOW));
        assert!(!r.mark(5), "now outside the window");
        assert!(r.mark(6), "the oldest counter still inside");
        assert!(r.mark(10 * WINDOW), "a jump clears the window");
        assert!(!r.mark(10 * WINDOW - WINDOW - 1));
        assert!(r.mark(10 * WINDOW - 1));
        assert!(!r.mark(REJECT_AFTER_MESSAGES));
    }

    proptest! {
        /// Whatever arrives, nothing panics, and nothing unauthenticated is taken.
        #[test]
        fn garbage_is_rejected_without_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), kind in 1u8..5) {
            let dev = Arc::new(Device::new([7u8; 32]));
            let peer = Peer::new(dev.clone(), public([9u8; 32]), 6, 0).expect("a peer");
            let mut msg = bytes;
            if let Some(first) = msg.first_mut() {
                *first = kind;
            }
            let mut out = vec![0u8; 4096];
            prop_assert!(!matches!(dev.consume_initiation(&msg, from(), &mut out), Consumed::Initiation(_)));
            prop_assert!(matches!(peer.open(&msg, from(), &mut out), Opened::Rejected));
            // A peer with a session and an initiation under way, the message aimed at its
            // indexes: still nothing taken.
            let (a, _b) = connected(Timing::default());
            let _ = a.initiate(&mut out);
            let pending = a.handshake().pending.as_ref().map(|p| p.local).unwrap_or_default();
            let current = read(&a.sessions).current.as_ref().map(|s| s.local).unwrap_or_default();
            for index in [pending, current] {
                let at = if kind == RESPONSE { 8 } else { 4 };
                if msg.len() >= at + 4 {
                    msg[at..at + 4].copy_from_slice(&index.to_le_bytes());
                }
                prop_assert!(matches!(a.open(&msg, from(), &mut out), Opened::Rejected));
            }
        }
    }
}
