//! Sockets: the server's accept loop (handshakes in their own tasks, with a deadline) and the
//! client's connector for tonic channels.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tonic::transport::{Channel, Endpoint};

use crate::TlsError;
use crate::context::{JOIN_ALPN, RAFT_ALPN, TlsContext};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections on `listener` and yields the ones whose TLS handshake succeeds.
/// A client that offers the join ALPN gets the join config (no client certificate, the
/// enrollment call only); every other client must present a certificate from the cluster
/// CA. Failed handshakes are logged with the reason (unknown CA, expired, revoked, ...).
pub fn incoming(listener: TcpListener, ctx: Arc<TlsContext>, accept_joins: bool) -> Incoming {
    incoming_with_raft(listener, ctx, accept_joins, None)
}

/// The waits after failures in a row of an operation that is retried (an accept, a socket
/// read): `first` after the first, doubled after each further one up to `max`, so an error
/// that repeats does not spin a core; a success starts over.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// How long to wait after this failure.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// The operation succeeded: the next failure waits `first` again.
    pub fn ok(&mut self) {
        self.next = self.first;
    }
}

/// The waits after failed accepts (out of file descriptors, ...).
fn accept_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(5), Duration::from_secs(1))
}

/// As [`incoming`], and a client that asks for [`RAFT_ALPN`] gets the Raft config (the same
/// client certificate check) and its connection goes to `raft` instead. Without `raft`, such a
/// client is refused the handshake (no shared protocol), which tells it to use gRPC.
pub fn incoming_with_raft(
    listener: TcpListener,
    ctx: Arc<TlsContext>,
    accept_joins: bool,
    raft: Option<mpsc::Sender<TlsStream<TcpStream>>>,
) -> Incoming {
    let (tx, rx) = mpsc::channel(128);
    Incoming {
        listener,
        ctx,
        accept_joins,
        raft,
        tx,
        rx,
        backoff: accept_backoff(),
        retry: None,
    }
}

/// The stream of handshaken connections of [`incoming`]. It owns the listener: accepting
/// happens while it is polled, and dropping it closes the port at once (a server that has
/// shut down can be bound again on the same address straight away). Each handshake runs in
/// its own task with a deadline, so a slow client never holds up the others.
pub struct Incoming {
    listener: TcpListener,
    ctx: Arc<TlsContext>,
    accept_joins: bool,
    raft: Option<mpsc::Sender<TlsStream<TcpStream>>>,
    tx: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
    rx: mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>>,
    backoff: Backoff,
    /// Set after a failed accept (out of file descriptors, ...): no accepting until it fires.
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Incoming {
    fn handshake(&self, tcp: TcpStream, peer: std::net::SocketAddr) {
        // Nagle costs a delayed-ACK stall per Raft round trip.
        let _ = tcp.set_nodelay(true);
        let tx = self.tx.clone();
        let ctx = self.ctx.clone();
        let raft = self.raft.clone();
        let accept_joins = self.accept_joins;
        tokio::spawn(async move {
            let handshake = async {
                let start =
                    tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
                        .await?;
                let offers = |want: &[u8]| {
                    start
                        .client_hello()
                        .alpn()
                        .is_some_and(|mut a| a.any(|p| p == want))
                };
                let cfg = if accept_joins && offers(JOIN_ALPN) {
                    ctx.join_config()
                } else if raft.is_some() && offers(RAFT_ALPN) {
                    ctx.raft_server_config()
                } else {
                    ctx.server_config()
                };
                start.into_stream(cfg).await
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(tls)) => {
                    let is_raft = tls.get_ref().1.alpn_protocol() == Some(RAFT_ALPN);
                    match (&raft, is_raft) {
                        (Some(raft), true) => {
                            let _ = raft.send(tls).await;
                        }
                        (None, true) => {}
                        (_, false) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                    }
                }
                Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake refused"),
                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

impl Stream for Incoming {
    type Item = Result<TlsStream<TcpStream>, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(retry) = this.retry.as_mut() {
                if retry.as_mut().poll(cx).is_pending() {
                    break;
                }
                this.retry = None;
            }
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, peer))) => {
                    this.backoff.ok();
                    this.handshake(tcp, peer);
                }
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, "accept failed");
                    this.retry = Some(Box::pin(tokio::time::sleep(this.backoff.failed())));
                }
                Poll::Pending => break,
            }
        }
        // `this.tx` lives as long as the stream, so the channel never ends: neither does the
        // stream, as a listener does not.
        this.rx.poll_recv(cx)
    }
}

/// Connects to a controller member's Raft transport at `addr` (`host:port`) with this
/// member's certificate and [`RAFT_ALPN`]. A member that does not serve it refuses the
/// handshake: see [`is_alpn_refusal`].
pub async fn connect_raft(
    ctx: &TlsContext,
    addr: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad(format!("no port in {addr:?}")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .map_err(|_| bad(format!("bad port in {addr:?}")))?;
    connect_tls(ctx.raft_client_config(), host, port).await
}

/// TCP (no Nagle) and a TLS handshake with `cfg` to `host:port`, refusing a server that
/// does not negotiate the config's first ALPN protocol.
async fn connect_tls(
    cfg: Arc<ClientConfig>,
    host: &str,
    port: u16,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad host {host:?}: {e}"),
        )
    })?;
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    let want = cfg.alpn_protocols.first().cloned();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    if tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec) != want {
        return Err(std::io::Error::other(
            "the server did not negotiate the expected protocol",
        ));
    }
    Ok(tls)
}

/// Whether a failed [`connect_raft`] means the other side does not serve the Raft transport
/// (it answered "no application protocol"), as opposed to being unreachable.
pub fn is_alpn_refusal(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
            )
        })
}

/// `http://ADDR` (the TLS is the connector's; tonic must not try its own).
pub fn endpoint(addr: &str) -> Result<Endpoint, TlsError> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| TlsError::Invalid(format!("address {addr:?}: {e}")))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn connector(
    config: impl Fn() -> Arc<ClientConfig> + Send + Clone + 'static,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = BoxError,
    Future = impl Send,
> + Send
+ Clone
+ 'static {
    tower::service_fn(move |uri: http::Uri| {
        let config = config.clone();
        async move {
            let host = uri
                .host()
                .ok_or("no host in the address")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().ok_or("no port in the address")?;
            let tls = connect_tls(config(), &host, port).await?;
            Ok::<_, BoxError>(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

/// A channel that connects (and reconnects) with the context's current certificate.
pub fn channel_lazy(ctx: &Arc<TlsContext>, ep: Endpoint) -> Channel {
    let ctx = ctx.clone();
    ep.connect_with_connector_lazy(connector(move || ctx.client_config()))
}

/// As [`channel_lazy`], connected now.
pub async fn channel(
    ctx: &Arc<TlsContext>,
    ep: Endpoint,
) -> Result<Channel, tonic::transport::Error> {
    let ctx = ctx.clone();
    ep.connect_with_connector(connector(move || ctx.client_config()))
        .await
}

/// A channel with a fixed client config (a user's credentials, a joiner's pinned config).
pub async fn channel_with(
    config: Arc<ClientConfig>,
    ep: Endpoint,
) -> Result<Channel, tonic::transport::Error> {
    ep.connect_with_connector(connector(move || config.clone()))
        .await
}

/// As [`channel_with`], lazily.
pub fn channel_with_lazy(config: Arc<ClientConfig>, ep: Endpoint) -> Channel {
    ep.connect_with_connector_lazy(connector(move || config.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[test]
    fn a_backoff_doubles_to_its_cap_and_starts_over_after_a_success() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(5), ms(30));
        let waits: Vec<Duration> = (0..5).map(|_| b.failed()).collect();
        assert_eq!(waits, [ms(5), ms(10), ms(20), ms(30), ms(30)]);
        b.ok();
        assert_eq!(b.failed(), ms(5));
    }

    /// Dropping the stream closes the port at once: a server that shut down can be started
    /// again on its address with no wait (a restarted controller member binds its old port).
    #[tokio::test]
    async fn dropping_the_stream_frees_the_port() {
        let ctx = TlsContext::ephemeral(&crate::Identity::Member(1)).expect("ctx");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = incoming(listener, ctx.clone(), false);

        // It accepts and hands over a handshaken connection.
        let client = tokio::spawn({
            let ctx = ctx.clone();
            async move {
                let cfg = ctx.client_config();
                let tcp = TcpStream::connect(addr).await.expect("connect");
                tokio_rustls::TlsConnector::from(cfg)
                    .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
                    .await
                    .expect("handshake")
            }
        });
        let served = tokio::time::timeout(Duration::from_secs(10), incoming.next())
            .await
            .expect("a connection in time")
            .expect("the stream does not end")
            .expect("a handshaken connection");
        let _client = client.await.expect("client");
        drop(served);

        drop(incoming);
        TcpListener::bind(addr)
            .await
            .expect("the port is free once the stream is dropped");
    }
}
