//! Sockets: the server's accept loop (handshakes in their own tasks, with a deadline) and the
//! client's connector for tonic channels.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::TlsError;
use crate::context::{JOIN_ALPN, TlsContext};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections on `listener` and yields the ones whose TLS handshake succeeds.
/// A client that offers the join ALPN gets the join config (no client certificate, the
/// enrollment call only); every other client must present a certificate from the cluster
/// CA. Failed handshakes are logged with the reason (unknown CA, expired, revoked, ...).
pub fn incoming(
    listener: TcpListener,
    ctx: Arc<TlsContext>,
    accept_joins: bool,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(5);
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => { backoff = Duration::from_millis(5); x }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            // Nagle costs a delayed-ACK stall per Raft round trip.
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let handshake = async {
                    let start = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        tcp,
                    )
                    .await?;
                    let join = accept_joins
                        && start
                            .client_hello()
                            .alpn()
                            .is_some_and(|mut a| a.any(|p| p == JOIN_ALPN));
                    let cfg = if join {
                        ctx.join_config()
                    } else {
                        ctx.server_config()
                    };
                    start.into_stream(cfg).await
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
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
            let name = ServerName::try_from(host.clone())?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let cfg = config();
            let want = cfg.alpn_protocols.first().cloned();
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            if tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec) != want {
                return Err("the server did not negotiate the expected protocol".into());
            }
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
