//! The agent's `/metrics` (Prometheus text format): the WireGuard device and its peers as read
//! from the device at each scrape, and the containers this agent runs. Written out by hand:
//! every value is read fresh from its source (the device's own counters), there is nothing to
//! accumulate.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::net::Network;
use crate::net::wg::DeviceStatus;

/// What a scrape reads.
#[derive(Clone)]
pub struct Sources {
    pub network: Arc<Network>,
    pub runtime: Arc<skiff_runtime::container::Runtime>,
    pub dns: Arc<crate::dns::DnsStats>,
    pub mesh: Arc<crate::mesh::Mesh>,
}

pub fn router(sources: Sources) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(sources)
}

async fn metrics(State(s): State<Sources>) -> impl IntoResponse {
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
        // The mesh sidecars' own metrics, read from inside their allocations.
        let rt = s.runtime.clone();
        text.push_str(
            &s.mesh
                .metrics(|alloc| rt.pod(alloc).map(|p| p.dir.join("net"))),
        );
        text
    })
    .await
    .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
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

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

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
