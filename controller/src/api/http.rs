//! HTTP endpoints: `/healthz` (the process and its Raft core are alive), `/readyz` (a leader is
//! known and this member has applied everything the leader has committed), `/metrics`
//! (Prometheus text format).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::ApiContext;

pub fn router(ctx: ApiContext) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
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
    ctx.metrics.observe_status(&ctx.node.status());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctx.metrics.encode(),
    )
}
