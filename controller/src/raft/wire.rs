//! The members' own transport for the Raft messages sent on every write (AppendEntries, Vote,
//! PreVote): length-prefixed frames over a mutual-TLS connection, one request and its reply
//! at a time, as etcd's members stream their messages instead of making an HTTP request each.
//!
//! ```text
//! request  len u32 | kind u8 | target u64 | from u64 | payload (JSON of openraft's message)
//! reply    len u32 | status u8 | payload (JSON of the response, or the error's text)
//! ```
//!
//! It runs on the gRPC port: a client asks for it with the TLS ALPN protocol
//! [`skiff_tls::context::RAFT_ALPN`], and the accept loop hands such connections here instead of
//! to tonic. The certificate is checked as for gRPC (the cluster CA at the handshake; then, for
//! every request, the `RaftInternal` policy: a controller member, not revoked, not expired).
//! A member of an older release does not offer the protocol; the client then uses gRPC for
//! that peer and asks again a minute later. Snapshots, forwarded writes and the rest stay on
//! gRPC.
//!
//! **Architecture Invariant:** the server answers a connection's requests one at a time, in
//! order, so the n-th reply answers the n-th request. A client call abandoned halfway (its
//! timeout, or its future dropped) leaves its request queued or sent; the next call finishes
//! writing it and reads and drops its reply before its own. A peer that leaves 8 requests
//! unanswered, or any I/O error, costs the connection.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use skiff_tls::TlsContext;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::network::{PeerError, decode, encode};
use super::node::RaftNode;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Append = 1,
    Vote = 2,
    PreVote = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Append,
            2 => Kind::Vote,
            3 => Kind::PreVote,
            _ => return None,
        })
    }

    /// The gRPC method whose policy applies.
    fn path(self) -> &'static str {
        match self {
            Kind::Append => "/skiff.v1.RaftInternal/AppendEntries",
            Kind::Vote => "/skiff.v1.RaftInternal/Vote",
            Kind::PreVote => "/skiff.v1.RaftInternal/PreVote",
        }
    }
}

const REPLY_OK: u8 = 0;
const REPLY_ERR: u8 = 1;
/// Request header after the length: kind, target, from.
const REQUEST_HEADER: usize = 1 + 8 + 8;
/// The largest frame either side reads: what gRPC allows, plus the header.
const MAX_FRAME: usize = skiff_proto::MAX_MESSAGE_BYTES + 64;
/// A server closes a connection that has carried nothing for this long.
const IDLE: Duration = Duration::from_secs(600);
/// The longest a handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a member refused the protocol, use gRPC with it for this long before asking again.
const FALLBACK_FOR: Duration = Duration::from_secs(60);

async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let len = s.read_u32_le().await? as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut buf = vec![0; len];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<S: AsyncWrite + Unpin>(
    s: &mut S,
    head: &[u8],
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(head.len() + payload.len())
        .map_err(|_| std::io::Error::other("frame too large"))?;
    s.write_all(&len.to_le_bytes()).await?;
    s.write_all(head).await?;
    s.write_all(payload).await?;
    s.flush().await
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// One peer's connection, as a Raft network client holds it.
pub(crate) struct WireClient {
    tls: Arc<TlsContext>,
    addr: String,
    conn: Option<Conn<ClientTls>>,
    /// A handshake under way, kept across calls.
    connecting: Option<tokio::task::JoinHandle<(u64, std::io::Result<ClientTls>)>>,
    /// The peer does not serve this transport: use gRPC until then.
    fallback_until: Option<Instant>,
}

/// A connection with its own buffers, so that a call abandoned halfway (its timeout, or its
/// future dropped) leaves it usable: bytes not yet written are written by the next call, and
/// the replies of abandoned requests are read and dropped before the next call's own.
struct Conn<S> {
    io: S,
    /// The certificate generation it was made with.
    generation: u64,
    /// Request bytes not yet written.
    wbuf: Vec<u8>,
    /// Reply bytes read and not yet taken.
    rbuf: Vec<u8>,
    /// Requests sent (or queued in `wbuf`) whose replies are not yet read.
    outstanding: usize,
}

/// A peer that leaves this many requests unanswered is stuck: make a new connection.
const MAX_OUTSTANDING: usize = 8;

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(io: S, generation: u64) -> Conn<S> {
        Conn {
            io,
            generation,
            wbuf: Vec::new(),
            rbuf: Vec::new(),
            outstanding: 0,
        }
    }

    /// Queues a request frame for the next [`Conn::round_trip`].
    fn queue(&mut self, frame: &[u8]) {
        self.wbuf.extend_from_slice(frame);
        self.outstanding += 1;
    }

    /// Writes what is queued. Cancel-safe: what is not written stays queued.
    async fn flush_out(&mut self) -> std::io::Result<()> {
        while !self.wbuf.is_empty() {
            let n = self.io.write(&self.wbuf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.wbuf.drain(..n);
        }
        self.io.flush().await
    }

    /// The next reply frame. Cancel-safe: bytes read stay in `rbuf`.
    async fn next_frame(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if self.rbuf.len() >= 4 {
                let len =
                    u32::from_le_bytes([self.rbuf[0], self.rbuf[1], self.rbuf[2], self.rbuf[3]])
                        as usize;
                if len > MAX_FRAME {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("reply of {len} bytes is over the {MAX_FRAME}-byte limit"),
                    ));
                }
                if self.rbuf.len() >= 4 + len {
                    let frame = self.rbuf[4..4 + len].to_vec();
                    self.rbuf.drain(..4 + len);
                    return Ok(frame);
                }
            }
            self.rbuf.reserve(16 << 10);
            if self.io.read_buf(&mut self.rbuf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Sends the queued request and returns its reply, after those of abandoned requests.
    async fn round_trip(&mut self) -> std::io::Result<Vec<u8>> {
        self.flush_out().await?;
        loop {
            let frame = self.next_frame().await?;
            self.outstanding = self.outstanding.saturating_sub(1);
            if self.outstanding == 0 {
                return Ok(frame);
            }
        }
    }
}

impl Drop for WireClient {
    fn drop(&mut self) {
        if let Some(h) = self.connecting.take() {
            h.abort();
        }
    }
}

/// Why a call over the wire failed.
pub(crate) enum WireError {
    /// The peer does not serve this transport: call it over gRPC.
    Unsupported,
    /// As gRPC would report it.
    Peer(PeerError),
}

impl WireClient {
    pub fn new(tls: Arc<TlsContext>, addr: String) -> WireClient {
        WireClient {
            tls,
            addr,
            conn: None,
            connecting: None,
            fallback_until: None,
        }
    }

    /// Whether to try this transport now (else gRPC).
    pub fn usable(&self) -> bool {
        self.fallback_until.is_none_or(|t| Instant::now() >= t)
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> PeerError {
        PeerError::Unreachable {
            addr: self.addr.clone(),
            status: tonic::Status::unavailable(e.to_string()),
        }
    }

    /// Sends `body` to member `target` and returns its reply, within `ttl`.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        kind: Kind,
        target: u64,
        from: u64,
        body: &Req,
        ttl: Duration,
    ) -> Result<Resp, WireError> {
        let payload = encode(body);
        let len = u32::try_from(REQUEST_HEADER + payload.len()).map_err(|_| {
            WireError::Peer(PeerError::Remote {
                addr: self.addr.clone(),
                message: "message too large".into(),
            })
        })?;
        let mut frame = Vec::with_capacity(4 + REQUEST_HEADER + payload.len());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.push(kind as u8);
        frame.extend_from_slice(&target.to_le_bytes());
        frame.extend_from_slice(&from.to_le_bytes());
        frame.extend_from_slice(&payload);
        let reply = match tokio::time::timeout(ttl, self.exchange(&frame)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(WireError::Peer(PeerError::Timeout {
                    addr: self.addr.clone(),
                }));
            }
        };
        let Some((&status, body)) = reply.split_first() else {
            return Err(WireError::Peer(PeerError::Decode {
                addr: self.addr.clone(),
                reason: "empty reply".into(),
            }));
        };
        match status {
            REPLY_OK => decode(body).map_err(|reason| {
                WireError::Peer(PeerError::Decode {
                    addr: self.addr.clone(),
                    reason,
                })
            }),
            _ => Err(WireError::Peer(PeerError::Remote {
                addr: self.addr.clone(),
                message: String::from_utf8_lossy(body).into_owned(),
            })),
        }
    }

    /// Sends the request and reads its reply. A connection kept from an earlier call may have
    /// been closed by the peer meanwhile (idle, restart): then once more on a new one, which
    /// is safe because Raft's messages may be delivered twice.
    async fn exchange(&mut self, frame: &[u8]) -> Result<Vec<u8>, WireError> {
        let stale = self.conn.as_ref().is_some_and(|c| {
            c.generation != self.tls.generation() || c.outstanding >= MAX_OUTSTANDING
        });
        if stale {
            self.conn = None;
        }
        let reused = self.conn.is_some();
        match self.exchange_once(frame).await {
            Ok(r) => Ok(r),
            Err(WireError::Peer(_)) if reused => self.exchange_once(frame).await,
            Err(e) => Err(e),
        }
    }

    async fn exchange_once(&mut self, frame: &[u8]) -> Result<Vec<u8>, WireError> {
        if self.conn.is_none() {
            // The handshake runs in a task of its own, with its own deadline: a call that
            // gives up (its timeout is the heartbeat interval) must not abort it, or on a
            // loaded host every call would start a handshake and none would finish.
            let handle = self.connecting.get_or_insert_with(|| {
                let tls = self.tls.clone();
                let addr = self.addr.clone();
                let generation = tls.generation();
                tokio::spawn(async move {
                    let r = tokio::time::timeout(
                        CONNECT_TIMEOUT,
                        skiff_tls::net::connect_raft(&tls, &addr),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        ))
                    });
                    (generation, r)
                })
            });
            let joined = handle.await;
            self.connecting = None;
            let (generation, result) = joined.map_err(|e| WireError::Peer(self.unreachable(e)))?;
            match result {
                Ok(tls) => {
                    self.fallback_until = None;
                    self.conn = Some(Conn::new(tls, generation));
                }
                Err(e) if skiff_tls::net::is_alpn_refusal(&e) => {
                    tracing::info!(
                        peer = %self.addr,
                        "member does not serve the Raft transport (older release): using gRPC"
                    );
                    self.fallback_until = Some(Instant::now() + FALLBACK_FOR);
                    return Err(WireError::Unsupported);
                }
                Err(e) => return Err(WireError::Peer(self.unreachable(e))),
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(WireError::Peer(self.unreachable("no connection")));
        };
        conn.queue(frame);
        match conn.round_trip().await {
            Ok(reply) => Ok(reply),
            Err(e) => {
                self.conn = None;
                Err(WireError::Peer(self.unreachable(e)))
            }
        }
    }
}

/// Serves the Raft transport's connections as the accept loop hands them over, until `stop`;
/// then closes them all (a member stopped in-process must not keep answering on them).
pub(crate) async fn serve(
    node: RaftNode,
    authz: skiff_tls::AuthzLayer,
    mut conns: tokio::sync::mpsc::Receiver<tokio_rustls::server::TlsStream<TcpStream>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let mut stopping = stop.clone();
        let tls = tokio::select! {
            c = conns.recv() => match c {
                Some(c) => c,
                None => return,
            },
            _ = stopping.wait_for(|s| *s) => return,
        };
        let node = node.clone();
        let authz = authz.clone();
        let mut stopping = stop.clone();
        tokio::spawn(async move {
            let peer = tls
                .get_ref()
                .0
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tokio::select! {
                r = serve_conn(node, authz, tls) => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "raft transport connection closed");
                },
                _ = stopping.wait_for(|s| *s) => {}
            }
        });
    }
}

async fn serve_conn(
    node: RaftNode,
    authz: skiff_tls::AuthzLayer,
    tls: tokio_rustls::server::TlsStream<TcpStream>,
) -> std::io::Result<()> {
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let mut conn = BufStream::new(tls);
    // A certificate of the cluster CA that is not a member's (a node's, a user's) is refused
    // before anything it sends is read: a frame may be 16 MiB.
    if let Err(s) = authz.check(Kind::Append.path(), leaf.as_deref()) {
        let message = format!("refused: {}", s.message());
        write_frame(&mut conn, &[REPLY_ERR], message.as_bytes()).await?;
        // Close our side, then drop what the peer sends for a moment (into a small buffer):
        // closing with unread bytes would reset the connection and could lose the answer.
        conn.shutdown().await?;
        let mut sink = [0u8; 16 << 10];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        return Ok(());
    }
    loop {
        let frame = match tokio::time::timeout(IDLE, read_frame(&mut conn)).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let (status, body) = match handle(&node, &authz, leaf.as_deref(), &frame).await {
            Ok(body) => (REPLY_OK, body),
            Err(message) => (REPLY_ERR, message.into_bytes()),
        };
        write_frame(&mut conn, &[status], &body).await?;
    }
}

/// Answers one request: the reply's JSON, or the error's text.
async fn handle(
    node: &RaftNode,
    authz: &skiff_tls::AuthzLayer,
    leaf: Option<&[u8]>,
    frame: &[u8],
) -> Result<Vec<u8>, String> {
    if frame.len() < REQUEST_HEADER {
        return Err(format!("request of {} bytes has no header", frame.len()));
    }
    let kind =
        Kind::from_u8(frame[0]).ok_or_else(|| format!("unknown request kind {}", frame[0]))?;
    authz
        .check(kind.path(), leaf)
        .map_err(|s| format!("refused: {}", s.message()))?;
    let mut target = [0u8; 8];
    target.copy_from_slice(&frame[1..9]);
    let target = u64::from_le_bytes(target);
    if target != node.id() {
        return Err(format!("this is member {}, not member {target}", node.id()));
    }
    let payload = &frame[REQUEST_HEADER..];
    let malformed = |e: String| format!("malformed raft message: {e}");
    let raft = node.raft();
    fn reply<R: Serialize>(r: Result<R, impl std::fmt::Display>) -> Result<Vec<u8>, String> {
        r.map(|r| encode(&r)).map_err(|e| e.to_string())
    }
    match kind {
        Kind::Append => reply(
            raft.append_entries(decode(payload).map_err(malformed)?)
                .await,
        ),
        Kind::Vote => reply(raft.vote(decode(payload).map_err(malformed)?).await),
        Kind::PreVote => reply(raft.pre_vote(decode(payload).map_err(malformed)?).await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(payload);
        f
    }

    /// A call abandoned while its reply is on the way leaves the connection usable: the next
    /// call gets its own reply, not the late one.
    #[tokio::test]
    async fn an_abandoned_call_does_not_shift_the_replies() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut first = true;
            while let Ok(req) = read_frame(&mut server).await {
                if first {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    first = false;
                }
                if write_frame(&mut server, b"re:", &req).await.is_err() {
                    return;
                }
            }
        });
        let mut conn = Conn::new(client, 0);
        conn.queue(&frame(b"one"));
        let late = tokio::time::timeout(Duration::from_millis(50), conn.round_trip()).await;
        assert!(late.is_err(), "the first reply is late");
        conn.queue(&frame(b"two"));
        assert_eq!(conn.round_trip().await.expect("reply"), b"re:two");
        conn.queue(&frame(b"three"));
        assert_eq!(conn.round_trip().await.expect("reply"), b"re:three");
        assert_eq!(conn.outstanding, 0);
    }

    /// A reply over the limit is refused, not allocated.
    #[tokio::test]
    async fn an_oversized_reply_is_an_error() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let _ = read_frame(&mut server).await;
            let _ = server.write_all(&u32::MAX.to_le_bytes()).await;
            let _ = server.flush().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let mut conn = Conn::new(client, 0);
        conn.queue(&frame(b"x"));
        let err = conn.round_trip().await.expect_err("oversized");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
