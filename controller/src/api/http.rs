//! HTTP endpoints: `/healthz` (the process and its Raft core are alive), `/readyz` (a leader is
//! known and this member has applied everything the leader has committed), `/metrics`
//! (Prometheus text format; the leader adds the cluster gauges) and `/v1/prometheus/targets`
//! (Prometheus' HTTP service discovery: every member, agent and mesh sidecar to scrape).
//! All plain HTTP GET, as Prometheus scrapes by default: addresses and figures, no secrets.
//!
//! The same port speaks TLS too (told apart by the first byte of the connection): with a
//! client certificate from the cluster CA that may read (the reader role or more, as for
//! `skiff` reads), `/status` is the cluster's status page. Over plain HTTP it answers 401
//! saying so.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use std::sync::Arc;

use axum::Extension;
use skiff_tls::{AuthzLayer, Need, TlsContext};

use super::ApiContext;

/// Who is calling, as the connection told: `None` over plain HTTP, else the TLS client's
/// leaf certificate (DER).
#[derive(Clone)]
pub struct Caller(pub Option<Arc<Vec<u8>>>);

/// Connections served at once; more are closed as they come.
const MAX_CONNECTIONS: usize = 512;
/// How long a connection may take to say what it is (its first byte, its TLS handshake, each
/// request's headers).
const SLOW_CLIENT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown`: plain HTTP, and TLS (client certificate
/// required) on the same port. At shutdown, open connections finish the request they are on
/// and close; the caller bounds how long that may take.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Arc<TlsContext>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Dropping the set (the caller aborting this task) aborts every connection.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "HTTP: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        let (app, tls, stop) = (app.clone(), tls.clone(), stop.clone());
        connections.spawn(async move {
            let _slot = slot;
            let mut first = [0u8; 1];
            let sniff = tokio::time::timeout(SLOW_CLIENT, tcp.peek(&mut first)).await;
            if !matches!(sniff, Ok(Ok(1))) {
                return;
            }
            // 0x16: a TLS handshake record.
            if first[0] == 0x16 {
                // The cluster's server config, speaking HTTP/1.1 (it offers h2 for gRPC).
                let mut config = (*tls.server_config()).clone();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                let stream = match tokio::time::timeout(SLOW_CLIENT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "HTTPS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| Arc::new(c.as_ref().to_vec()));
                connection(stream, app.layer(Extension(Caller(leaf))), stop).await;
            } else {
                connection(tcp, app.layer(Extension(Caller(None))), stop).await;
            }
        });
    }
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
}

async fn connection<S>(io: S, app: Router, mut stop: tokio::sync::watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(SLOW_CLIENT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Whether the caller may read; the response to send when not.
fn may_read(ctx: &ApiContext, caller: &Caller) -> Result<(), (StatusCode, String)> {
    let Some(leaf) = &caller.0 else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "the status page needs a client certificate from the cluster CA with the reader \
             role or more (as `skiff` reads do): open it over https:// on this port\n"
                .into(),
        ));
    };
    AuthzLayer::new(ctx.tls.clone(), |_| Need::Reader)
        .check("/status", Some(leaf))
        .map(|_| ())
        .map_err(|s| {
            let code = if s.code() == tonic::Code::PermissionDenied {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            (code, format!("{}\n", s.message()))
        })
}

fn render_status(ctx: &ApiContext, whole: bool) -> String {
    let status = ctx.node.status();
    let members = ctx.node.members();
    let applied = ctx.node.state();
    let view = super::status::View::new(
        &status,
        &members,
        &applied.state,
        &ctx.heartbeats,
        super::now_ms(),
    );
    if whole {
        super::status::page(&view)
    } else {
        super::status::fragment(&view)
    }
}

/// The status page (`whole`) or the fragment it refreshes itself with, for a reader.
fn status(ctx: &ApiContext, caller: &Caller, whole: bool) -> axum::response::Response {
    if let Err(e) = may_read(ctx, caller) {
        return e.into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        render_status(ctx, whole),
    )
        .into_response()
}

async fn status_page(
    State(ctx): State<ApiContext>,
    Extension(caller): Extension<Caller>,
) -> axum::response::Response {
    status(&ctx, &caller, true)
}

async fn status_fragment(
    State(ctx): State<ApiContext>,
    Extension(caller): Extension<Caller>,
) -> axum::response::Response {
    status(&ctx, &caller, false)
}

pub fn router(ctx: ApiContext) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/prometheus/targets", get(targets))
        .route(
            "/",
            get(|| async { axum::response::Redirect::to("/status") }),
        )
        .route("/status", get(status_page))
        .route("/status/fragment", get(status_fragment))
        .with_state(ctx)
}

async fn healthz(State(ctx): State<ApiContext>) -> impl IntoResponse {
    match ctx.node.status().fatal {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("raft stopped: {e}\n"),
        ),
    }
}

async fn readyz(State(ctx): State<ApiContext>) -> impl IntoResponse {
    let s = ctx.node.status();
    if let Some(e) = s.fatal {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("raft stopped: {e}\n"),
        );
    }
    let Some(leader) = s.leader else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no leader\n".to_string());
    };
    if s.applied_index < s.committed_index {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "applied {} of {} committed\n",
                s.applied_index, s.committed_index
            ),
        );
    }
    (
        StatusCode::OK,
        format!("ready: leader {leader}, applied {}\n", s.applied_index),
    )
}

async fn metrics(State(ctx): State<ApiContext>) -> impl IntoResponse {
    let status = ctx.node.status();
    ctx.metrics.observe_status(&status);
    let mut text = ctx.metrics.encode();
    crate::metrics::render_certificate(&mut text, &ctx.tls.info());
    if status.role == crate::raft::Role::Leader {
        crate::metrics::render_cluster(&mut text, &ctx.node.state().state);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

async fn targets(State(ctx): State<ApiContext>) -> impl IntoResponse {
    let members = ctx.node.members();
    let body = {
        let applied = ctx.node.state();
        crate::metrics::targets(&members, &applied.state)
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&body).unwrap_or_else(|_| "[]".into()),
    )
}
