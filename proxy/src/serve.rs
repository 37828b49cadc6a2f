//! The proxy's listeners and the state they share.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, info, warn};

use crate::ProxyError;
use crate::balance::{self, Endpoint};
use crate::config::{self, Mode, ProxyConfig, ServiceRef, ServiceSet, Upstream};
use crate::files::{Dir, Stamp};
use crate::metrics::{Direction, Metrics, Outcome};
use crate::tls::{TlsState, workload_of};

/// How long a connect to one endpoint may take before the next is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Connect attempts per outbound connection (each on another endpoint).
pub const CONNECT_ATTEMPTS: usize = 3;
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// In permissive mode, how long a caller has to start talking before it is taken as plain
/// text (a client of a protocol where the server speaks first says nothing).
pub const PERMISSIVE_WAIT: Duration = Duration::from_millis(200);
/// How often the agent's files are looked at.
pub const RELOAD_EVERY: Duration = Duration::from_millis(200);

/// One service and its endpoints.
pub struct Route {
    pub upstream: Upstream,
    pub endpoints: Vec<Arc<Endpoint>>,
}

/// The shared state.
pub struct Proxy {
    pub cfg: ProxyConfig,
    dir: Dir,
    tls: RwLock<Option<Arc<TlsState>>>,
    routes: RwLock<Arc<HashMap<Ipv4Addr, Route>>>,
    pub metrics: Metrics,
    /// Connections to the workload for HTTP ports.
    pub http: crate::http::AppClients,
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Proxy {
    pub fn new(cfg: ProxyConfig, dir: Dir) -> Arc<Proxy> {
        Arc::new(Proxy {
            cfg,
            dir,
            tls: RwLock::new(None),
            routes: RwLock::default(),
            metrics: Metrics::default(),
            http: crate::http::AppClients::default(),
        })
    }

    fn tls(&self) -> Option<Arc<TlsState>> {
        read(&self.tls)
    }

    /// Loads the certificate files; on an error the previous certificate stays in use.
    pub fn reload_tls(&self) -> Result<(), ProxyError> {
        let state = TlsState::build(
            &self.dir.read(config::CERT_FILE)?,
            &self.dir.read(config::KEY_FILE)?,
            &self.dir.read(config::CA_FILE)?,
            &self.cfg.identity,
        )?;
        info!(serial = %state.info.serial, not_after = state.info.not_after, "workload certificate loaded");
        self.metrics
            .cert_not_after
            .store(state.info.not_after, Ordering::Relaxed);
        self.metrics.cert_reloads.fetch_add(1, Ordering::Relaxed);
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(state));
        Ok(())
    }

    /// Loads the service set (none yet: empty); on an error the previous one stays.
    pub fn reload_services(&self) -> Result<(), ProxyError> {
        let set = match self.dir.stamp(config::SERVICES_FILE) {
            None => ServiceSet::default(),
            Some(_) => ServiceSet::parse(&self.dir.read(config::SERVICES_FILE)?)?,
        };
        let old = read(&self.routes);
        let routes: HashMap<Ipv4Addr, Route> = set
            .services
            .into_iter()
            .map(|u| {
                let kept: HashMap<Ipv4Addr, Arc<Endpoint>> = old
                    .get(&u.vip)
                    .filter(|r| r.upstream.service == u.service)
                    .map(|r| r.endpoints.iter().map(|e| (e.ip, e.clone())).collect())
                    .unwrap_or_default();
                let endpoints = balance::refresh(&kept, &u.endpoints);
                (
                    u.vip,
                    Route {
                        upstream: u,
                        endpoints,
                    },
                )
            })
            .collect();
        debug!(services = routes.len(), "service set loaded");
        self.metrics
            .services_reloads
            .fetch_add(1, Ordering::Relaxed);
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
        Ok(())
    }

    fn stamps(&self) -> [Option<Stamp>; 4] {
        [
            config::CERT_FILE,
            config::KEY_FILE,
            config::CA_FILE,
            config::SERVICES_FILE,
        ]
        .map(|f| self.dir.stamp(f))
    }

    /// Follows the agent's files.
    async fn watch(self: Arc<Self>, mut seen: [Option<Stamp>; 4]) {
        loop {
            tokio::time::sleep(RELOAD_EVERY).await;
            let now = self.stamps();
            if now[..3] != seen[..3]
                && let Err(e) = self.reload_tls()
            {
                warn!(error = %e, "keeping the previous certificate");
            }
            if now[3] != seen[3]
                && let Err(e) = self.reload_services()
            {
                warn!(error = %e, "keeping the previous service set");
            }
            seen = now;
        }
    }
}

/// Where a redirected connection was going.
fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddrV4> {
    let sa = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst)
        .map_err(std::io::Error::from)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

/// Runs the three listeners (from `std` sockets already bound) until the process ends.
pub async fn serve(
    cfg: ProxyConfig,
    dir: Dir,
    outbound: std::net::TcpListener,
    inbound: std::net::TcpListener,
    admin: std::net::TcpListener,
) -> Result<(), ProxyError> {
    let io = |e: std::io::Error| ProxyError::Io(e.to_string());
    let proxy = Proxy::new(cfg, dir);
    let seen = proxy.stamps();
    proxy.reload_tls()?;
    proxy.reload_services()?;
    tokio::spawn(proxy.clone().watch(seen));
    let (outbound, inbound, admin) = (
        TcpListener::from_std(outbound).map_err(io)?,
        TcpListener::from_std(inbound).map_err(io)?,
        TcpListener::from_std(admin).map_err(io)?,
    );
    info!(identity = %proxy.cfg.identity, "mesh proxy ready");
    tokio::spawn(accept_loop(admin, proxy.clone(), |p, s, _| async move {
        admin_conn(&p, s).await;
    }));
    tokio::spawn(accept_loop(
        inbound,
        proxy.clone(),
        |p, s, from| async move {
            p.metrics.open_inbound.fetch_add(1, Ordering::Relaxed);
            let (peer, outcome) = inbound_conn(&p, s, from).await;
            p.metrics.open_inbound.fetch_sub(1, Ordering::Relaxed);
            p.metrics.connection(Direction::Inbound, &peer, outcome);
        },
    ));
    accept_loop(outbound, proxy, |p, s, _| async move {
        p.metrics.open_outbound.fetch_add(1, Ordering::Relaxed);
        let (peer, outcome) = outbound_conn(&p, s).await;
        p.metrics.open_outbound.fetch_sub(1, Ordering::Relaxed);
        p.metrics.connection(Direction::Outbound, &peer, outcome);
    })
    .await;
    Ok(())
}

async fn accept_loop<F, Fut>(l: TcpListener, p: Arc<Proxy>, handle: F)
where
    F: Fn(Arc<Proxy>, TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match l.accept().await {
            Ok((s, from)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(handle(p.clone(), s, from));
            }
            Err(e) => {
                // Out of descriptors or memory: pause rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn pipe<A, B>(p: &Proxy, dir: Direction, mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (x, y) = tokio::io::copy_bidirectional(&mut a, &mut b)
        .await
        .unwrap_or((0, 0));
    let counter = match dir {
        Direction::Inbound => &p.metrics.bytes_inbound,
        Direction::Outbound => &p.metrics.bytes_outbound,
    };
    counter.fetch_add(x + y, Ordering::Relaxed);
}

/// A connection from the workload to a service's virtual IP.
async fn outbound_conn(p: &Arc<Proxy>, s: TcpStream) -> (String, Outcome) {
    const UNKNOWN: &str = "unknown";
    let Ok(dst) = original_dst(&s) else {
        return (UNKNOWN.into(), Outcome::NoRoute);
    };
    let routes = read(&p.routes);
    let Some(route) = routes
        .get(dst.ip())
        .filter(|r| r.upstream.ports.contains(&dst.port()))
    else {
        debug!(%dst, "no service there");
        return (UNKNOWN.into(), Outcome::NoRoute);
    };
    let target = route.upstream.service.clone();
    if !p.cfg.may_call(&target) {
        info!(%target, "refused: not among this workload's upstreams");
        return (target.to_string(), Outcome::Forbidden);
    }
    let mut tried = Vec::new();
    let mut connected = None;
    while tried.len() < CONNECT_ATTEMPTS {
        let Some(ep) = balance::pick(&route.endpoints, &tried, &mut rand::rng()) else {
            break;
        };
        let hold = ep.hold();
        let addr = SocketAddrV4::new(ep.ip, dst.port());
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(up)) => {
                connected = Some((up, hold));
                break;
            }
            Ok(Err(e)) => debug!(%addr, error = %e, "connect failed"),
            Err(_) => debug!(%addr, "connect timed out"),
        }
        tried.push(ep.ip);
        if tried.len() < CONNECT_ATTEMPTS && tried.len() < route.endpoints.len() {
            p.metrics.connect_retries.fetch_add(1, Ordering::Relaxed);
        }
    }
    drop(routes);
    let Some((up, hold)) = connected else {
        return (target.to_string(), Outcome::ConnectError);
    };
    let _ = up.set_nodelay(true);
    if !hold.endpoint().mesh {
        pipe(p, Direction::Outbound, s, up).await;
        return (target.to_string(), Outcome::Plaintext);
    }
    let Some(tls) = p.tls() else {
        return (target.to_string(), Outcome::TlsError);
    };
    let Ok(name) = ServerName::try_from(target.dns_name()) else {
        return (target.to_string(), Outcome::NoRoute);
    };
    let connector = TlsConnector::from(tls.client.clone());
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, up)).await {
        Ok(Ok(up)) => {
            pipe(p, Direction::Outbound, s, up).await;
            drop(hold);
            (target.to_string(), Outcome::Ok)
        }
        Ok(Err(e)) => {
            warn!(%target, error = %e, "TLS to the upstream failed");
            (target.to_string(), Outcome::TlsError)
        }
        Err(_) => {
            warn!(%target, "TLS to the upstream timed out");
            (target.to_string(), Outcome::TlsError)
        }
    }
}

/// A connection to one of the workload's ports.
async fn inbound_conn(p: &Arc<Proxy>, s: TcpStream, from: SocketAddr) -> (String, Outcome) {
    const UNKNOWN: &str = "unknown";
    let Ok(dst) = original_dst(&s) else {
        return (UNKNOWN.into(), Outcome::NoRoute);
    };
    if !p.cfg.inbound_ports.contains(&dst.port()) {
        return (UNKNOWN.into(), Outcome::NoRoute);
    }
    let app = SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port());
    if p.cfg.mode == Mode::Permissive {
        let mut first = [0u8; 1];
        let tls = matches!(
            tokio::time::timeout(PERMISSIVE_WAIT, s.peek(&mut first)).await,
            Ok(Ok(1)) if first[0] == 0x16
        );
        if !tls {
            if p.cfg.http_ports.contains(&dst.port()) {
                crate::http::serve(p.clone(), s, dst.port(), "plaintext".into()).await;
                return (UNKNOWN.into(), Outcome::Plaintext);
            }
            let Ok(a) = TcpStream::connect(app).await else {
                return (UNKNOWN.into(), Outcome::ConnectError);
            };
            let _ = a.set_nodelay(true);
            pipe(p, Direction::Inbound, s, a).await;
            return (UNKNOWN.into(), Outcome::Plaintext);
        }
    }
    let Some(tls) = p.tls() else {
        return (UNKNOWN.into(), Outcome::TlsError);
    };
    let acceptor = TlsAcceptor::from(tls.server.clone());
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(s)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            info!(%from, error = %e, "refused: TLS handshake failed");
            return (UNKNOWN.into(), Outcome::TlsError);
        }
        Err(_) => {
            info!(%from, "refused: no TLS handshake in time");
            return (UNKNOWN.into(), Outcome::TlsError);
        }
    };
    let caller = match conn.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(c) => workload_of(c),
        None => Err("no client certificate".into()),
    };
    let caller: ServiceRef = match caller {
        Ok(c) => c,
        Err(why) => {
            info!(%from, %why, "refused: not a workload");
            return (UNKNOWN.into(), Outcome::Forbidden);
        }
    };
    if !p.cfg.allows(&caller) {
        info!(%from, %caller, "refused: not in allow_from");
        let mut conn = conn;
        let _ = conn.shutdown().await;
        return (caller.to_string(), Outcome::Forbidden);
    }
    if p.cfg.http_ports.contains(&dst.port()) {
        crate::http::serve(p.clone(), conn, dst.port(), caller.to_string()).await;
        return (caller.to_string(), Outcome::Ok);
    }
    let Ok(a) = TcpStream::connect(app).await else {
        return (caller.to_string(), Outcome::ConnectError);
    };
    let _ = a.set_nodelay(true);
    pipe(p, Direction::Inbound, conn, a).await;
    (caller.to_string(), Outcome::Ok)
}

/// `GET /ready` (200 once a certificate is loaded) and `GET /metrics`, HTTP/1.0.
async fn admin_conn(p: &Proxy, mut s: TcpStream) {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    let line = String::from_utf8_lossy(&buf);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        // With its pid: the agent knows the answer comes from the process it started.
        "/ready" if p.tls().is_some() => ("200 OK", format!("ready {}\n", std::process::id())),
        "/ready" => ("503 Service Unavailable", "no certificate\n".to_owned()),
        "/metrics" => (
            "200 OK",
            p.metrics.render(&p.cfg.identity.to_string(), p.cfg.version),
        ),
        _ => ("404 Not Found", "not found\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.0 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.shutdown().await;
}
