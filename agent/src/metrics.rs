//! The agent's metrics (Prometheus text format), plain HTTP GET as Prometheus scrapes by
//! default: figures and addresses, never secrets.
//! - `/metrics`: the WireGuard device and its peers as read from the device at each scrape,
//!   the DNS server's counters, the node certificate's expiry, and the `skiff_workload_*`
//!   families of every allocation (see [`crate::usage`]).
//! - `/sidecars/{alloc}/metrics`: one mesh sidecar's own metrics, read from inside its
//!   allocation (each sidecar is a target of its own in the controllers' service discovery);
//!   `/sidecars/metrics`: every sidecar's, each sample labelled with its allocation.
//!
//! Written out by hand: every value is read fresh from its source, nothing accumulates here.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

use crate::contract::Assigned;
use crate::net::Network;
use crate::net::wg::DeviceStatus;

/// What a scrape reads.
#[derive(Clone)]
pub struct Sources {
    pub network: Arc<Network>,
    pub runtime: Arc<skiff_runtime::container::Runtime>,
    pub dns: Arc<crate::dns::DnsStats>,
    pub mesh: Arc<crate::mesh::Mesh>,
    /// The allocations assigned to this node (labels of the workload series).
    pub desired: watch::Receiver<Option<Vec<Assigned>>>,
    /// This node's name.
    pub node: String,
    pub tls: Arc<skiff_tls::TlsContext>,
}

pub fn router(sources: Sources) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/sidecars/metrics", get(all_sidecars))
        .route("/sidecars/{alloc}/metrics", get(one_sidecar))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(sources)
}

fn exposition(text: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn metrics(State(s): State<Sources>) -> Response {
    let text = tokio::task::spawn_blocking(move || {
        let status = s.network.live_status();
        let running = s
            .runtime
            .store()
            .list()
            .map(|l| {
                l.iter()
                    .filter(|(_, st)| st.status == skiff_runtime::store::Status::Running)
                    .count()
            })
            .unwrap_or(0);
        let mut text = render(&s.network, status.as_ref(), running);
        render_dns(&mut text, &s.dns);
        render_certificate(&mut text, &s.tls.info());
        let assigned = s.desired.borrow().clone().unwrap_or_default();
        crate::usage::render(
            &mut text,
            &s.node,
            &crate::usage::collect(&s.runtime, &assigned),
        );
        text
    })
    .await
    .unwrap_or_default();
    exposition(text)
}

/// The labels a sidecar's samples get: the same as its target's in service discovery.
fn sidecar_label(s: &Sources) -> impl Fn(&str) -> String + use<> {
    let assigned = s.desired.borrow().clone().unwrap_or_default();
    let node = s.node.clone();
    move |alloc: &str| match assigned.iter().find(|a| a.id == alloc) {
        Some(a) => format!(
            "namespace=\"{}\",workload=\"{}\",alloc=\"{}\",node=\"{}\"",
            escape(&a.namespace),
            escape(&a.job),
            escape(alloc),
            escape(&node)
        ),
        None => format!("alloc=\"{}\",node=\"{}\"", escape(alloc), escape(&node)),
    }
}

async fn all_sidecars(State(s): State<Sources>) -> Response {
    let text = tokio::task::spawn_blocking(move || {
        let rt = s.runtime.clone();
        s.mesh.metrics(None, sidecar_label(&s), |alloc| {
            rt.pod(alloc).map(|p| p.dir.join("net"))
        })
    })
    .await
    .unwrap_or_default();
    exposition(text)
}

async fn one_sidecar(State(s): State<Sources>, Path(alloc): Path<String>) -> Response {
    let known = s.mesh.allocations().contains(&alloc);
    if !known {
        return (
            StatusCode::NOT_FOUND,
            format!("no sidecar for allocation {alloc:?} on this node\n"),
        )
            .into_response();
    }
    let text = tokio::task::spawn_blocking(move || {
        let rt = s.runtime.clone();
        s.mesh.metrics(Some(&alloc), sidecar_label(&s), |alloc| {
            rt.pod(alloc).map(|p| p.dir.join("net"))
        })
    })
    .await
    .unwrap_or_default();
    exposition(text)
}

/// The node certificate's expiry, as the controllers' members export theirs.
pub fn render_certificate(o: &mut String, info: &skiff_tls::pki::CertInfo) {
    let _ = writeln!(
        o,
        "# HELP skiff_tls_certificate_expiry_timestamp_seconds When this component's own certificate expires (Unix time); it is renewed at two thirds of its lifetime.\n\
         # TYPE skiff_tls_certificate_expiry_timestamp_seconds gauge\n\
         skiff_tls_certificate_expiry_timestamp_seconds{{identity=\"{}\"}} {}",
        escape(&info.identity.to_string()),
        info.not_after
    );
}

/// The DNS server's counters.
pub fn render_dns(o: &mut String, s: &crate::dns::DnsStats) {
    use std::sync::atomic::Ordering::Relaxed;
    for (name, help, v) in [
        (
            "skiff_agent_dns_forwarded_total",
            "Queries for names outside skiff.internal relayed to an upstream.",
            s.forwarded.load(Relaxed),
        ),
        (
            "skiff_agent_dns_cache_hits_total",
            "Queries for names outside skiff.internal answered from the cache of upstream answers.",
            s.cache_hits.load(Relaxed),
        ),
        (
            "skiff_agent_dns_forwards_refused_total",
            "Queries answered SERVFAIL because too many forwards were in flight.",
            s.forwards_refused.load(Relaxed),
        ),
        (
            "skiff_agent_dns_socket_errors_total",
            "Receive, send and accept errors of the DNS sockets (each logged; serving goes on).",
            s.socket_errors.load(Relaxed),
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
}

use skiff_common::prometheus::label_value as escape;

/// The exposition text.
pub fn render(net: &Network, status: Option<&DeviceStatus>, running: usize) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP skiff_agent_containers_running Containers this agent runs.\n\
         # TYPE skiff_agent_containers_running gauge\n\
         skiff_agent_containers_running {running}"
    );
    let _ = writeln!(
        o,
        "# HELP skiff_agent_wireguard_info The WireGuard device: backend and public key.\n\
         # TYPE skiff_agent_wireguard_info gauge\n\
         skiff_agent_wireguard_info{{backend=\"{}\",public_key=\"{}\",mtu=\"{}\"}} 1",
        net.backend().as_str(),
        escape(&net.public_key().to_base64()),
        net.mtu()
    );
    let _ = writeln!(
        o,
        "# HELP skiff_agent_wireguard_up 1 when the device answered this scrape.\n\
         # TYPE skiff_agent_wireguard_up gauge\n\
         skiff_agent_wireguard_up {}",
        u8::from(status.is_some())
    );
    let Some(status) = status else {
        return o;
    };
    let names = net.peer_names();
    let label = |k: &crate::net::Key| {
        let node = names.get(k).map(String::as_str).unwrap_or("");
        format!(
            "peer=\"{}\",public_key=\"{}\"",
            escape(node),
            escape(&k.to_base64())
        )
    };
    let _ = writeln!(
        o,
        "# HELP skiff_agent_wireguard_peers Peers configured on the device.\n\
         # TYPE skiff_agent_wireguard_peers gauge\n\
         skiff_agent_wireguard_peers {}",
        status.peers.len()
    );
    let _ = writeln!(
        o,
        "# HELP skiff_agent_wireguard_peer_last_handshake_seconds Unix time of the last handshake with the peer (0: never).\n\
         # TYPE skiff_agent_wireguard_peer_last_handshake_seconds gauge"
    );
    for p in &status.peers {
        let (s, ns) = p.last_handshake.unwrap_or((0, 0));
        let _ = writeln!(
            o,
            "skiff_agent_wireguard_peer_last_handshake_seconds{{{}}} {}",
            label(&p.public_key),
            s as f64 + ns as f64 / 1e9
        );
    }
    for (name, help, pick) in [
        (
            "skiff_agent_wireguard_peer_receive_bytes_total",
            "Bytes received from the peer through the tunnel.",
            (|p: &crate::net::wg::PeerStatus| p.rx_bytes) as fn(&crate::net::wg::PeerStatus) -> u64,
        ),
        (
            "skiff_agent_wireguard_peer_transmit_bytes_total",
            "Bytes sent to the peer through the tunnel.",
            |p: &crate::net::wg::PeerStatus| p.tx_bytes,
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        for p in &status.peers {
            let _ = writeln!(o, "{name}{{{}}} {}", label(&p.public_key), pick(p));
        }
    }
    o
}
