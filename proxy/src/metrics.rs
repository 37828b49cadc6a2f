//! The proxy's counters, rendered in Prometheus' text format on its admin port. Labels are
//! bounded: a direction, a result from a fixed set, and the peer service (a cluster service
//! that passed the checks, or `unknown`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Which side of the proxy a connection came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// How a connection ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Proxied (mutual TLS on the mesh side).
    Ok,
    /// Proxied in plain text (a permissive inbound, or an upstream outside the mesh).
    Plaintext,
    /// Refused by policy (`allow_from`, `upstreams`, plain text in strict mode).
    Forbidden,
    /// The TLS handshake failed (bad certificate, wrong identity, not TLS).
    TlsError,
    /// No endpoint could be reached.
    ConnectError,
    /// No service at that address and port.
    NoRoute,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Plaintext => "plaintext",
            Outcome::Forbidden => "forbidden",
            Outcome::TlsError => "tls_error",
            Outcome::ConnectError => "connect_error",
            Outcome::NoRoute => "no_route",
        }
    }
}

type Key = (Direction, String, Outcome);

/// Upper bounds (seconds) of the request latency histogram's buckets.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Requests of one (source, status class).
#[derive(Debug, Default, Clone)]
struct Requests {
    /// Per bucket of [`BUCKETS`], then +Inf.
    buckets: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Metrics {
    connections: Mutex<BTreeMap<Key, u64>>,
    requests: Mutex<BTreeMap<(String, &'static str), Requests>>,
    pub open_inbound: AtomicI64,
    pub open_outbound: AtomicI64,
    pub bytes_inbound: AtomicU64,
    pub bytes_outbound: AtomicU64,
    pub connect_retries: AtomicU64,
    pub cert_not_after: AtomicI64,
    pub cert_reloads: AtomicU64,
    pub services_reloads: AtomicU64,
}

impl Metrics {
    pub fn connection(&self, dir: Direction, peer: &str, outcome: Outcome) {
        let mut m = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry((dir, peer.to_owned(), outcome)).or_default() += 1;
    }

    /// One HTTP request served inbound from `source`, answered with `class` after `took`.
    pub fn request(&self, source: &str, class: &'static str, took: std::time::Duration) {
        let secs = took.as_secs_f64();
        let mut m = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = m.entry((source.to_owned(), class)).or_default();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        r.buckets[i] += 1;
        r.sum += secs;
        r.count += 1;
    }

    /// The text format; `version` is the version of the workload's job this proxy fronts.
    pub fn render(&self, identity: &str, version: u64) -> String {
        let mut t = String::new();
        let id = identity.replace('"', "");
        let reqs = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let _ = writeln!(
            t,
            "# HELP skiff_mesh_requests_total HTTP requests the sidecar served to its workload, by caller and status class (error: the workload did not answer).\n\
             # TYPE skiff_mesh_requests_total counter"
        );
        for ((src, class), r) in &reqs {
            let _ = writeln!(
                t,
                "skiff_mesh_requests_total{{identity=\"{id}\",version=\"{version}\",source=\"{}\",class=\"{class}\"}} {}",
                src.replace('"', ""),
                r.count
            );
        }
        let _ = writeln!(
            t,
            "# HELP skiff_mesh_request_duration_seconds How long the workload took to answer HTTP requests, by caller and status class.\n\
             # TYPE skiff_mesh_request_duration_seconds histogram"
        );
        for ((src, class), r) in &reqs {
            let labels = format!(
                "identity=\"{id}\",version=\"{version}\",source=\"{}\",class=\"{class}\"",
                src.replace('"', "")
            );
            let mut acc = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                acc += r.buckets[i];
                let _ = writeln!(
                    t,
                    "skiff_mesh_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {acc}"
                );
            }
            acc += r.buckets[BUCKETS.len()];
            let _ = writeln!(
                t,
                "skiff_mesh_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {acc}"
            );
            let _ = writeln!(
                t,
                "skiff_mesh_request_duration_seconds_sum{{{labels}}} {}",
                r.sum
            );
            let _ = writeln!(
                t,
                "skiff_mesh_request_duration_seconds_count{{{labels}}} {}",
                r.count
            );
        }
        let _ = writeln!(
            t,
            "# HELP skiff_mesh_connections_total Connections through the sidecar, by direction, peer service and result.\n\
             # TYPE skiff_mesh_connections_total counter"
        );
        let m = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((d, peer, o), n) in m.iter() {
            let _ = writeln!(
                t,
                "skiff_mesh_connections_total{{identity=\"{id}\",direction=\"{}\",peer=\"{}\",result=\"{}\"}} {n}",
                d.as_str(),
                peer.replace('"', ""),
                o.as_str()
            );
        }
        drop(m);
        let gauge = |t: &mut String, name: &str, help: &str, kind: &str, lines: &[(&str, i128)]| {
            let _ = writeln!(t, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let sep = if labels.is_empty() { "" } else { "," };
                let _ = writeln!(t, "{name}{{identity=\"{id}\"{sep}{labels}}} {v}");
            }
        };
        let ld = |a: &AtomicI64| i128::from(a.load(Ordering::Relaxed));
        let lu = |a: &AtomicU64| i128::from(a.load(Ordering::Relaxed));
        gauge(
            &mut t,
            "skiff_mesh_open_connections",
            "Connections open through the sidecar.",
            "gauge",
            &[
                ("direction=\"inbound\"", ld(&self.open_inbound)),
                ("direction=\"outbound\"", ld(&self.open_outbound)),
            ],
        );
        gauge(
            &mut t,
            "skiff_mesh_bytes_total",
            "Bytes the sidecar carried from callers (inbound) or from the workload (outbound), both ways.",
            "counter",
            &[
                ("direction=\"inbound\"", lu(&self.bytes_inbound)),
                ("direction=\"outbound\"", lu(&self.bytes_outbound)),
            ],
        );
        gauge(
            &mut t,
            "skiff_mesh_connect_retries_total",
            "Outbound connects retried on another endpoint after a failure.",
            "counter",
            &[("", lu(&self.connect_retries))],
        );
        gauge(
            &mut t,
            "skiff_mesh_certificate_expiry_timestamp_seconds",
            "When the workload certificate in use expires (Unix time).",
            "gauge",
            &[("", ld(&self.cert_not_after))],
        );
        gauge(
            &mut t,
            "skiff_mesh_certificate_reloads_total",
            "Workload certificates loaded (the first, and each rotation).",
            "counter",
            &[("", lu(&self.cert_reloads))],
        );
        gauge(
            &mut t,
            "skiff_mesh_service_set_reloads_total",
            "Service sets loaded.",
            "counter",
            &[("", lu(&self.services_reloads))],
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn requests_render_as_a_cumulative_histogram() {
        let m = Metrics::default();
        m.request("web.default", "2xx", Duration::from_micros(300));
        m.request("web.default", "2xx", Duration::from_millis(30));
        m.request("web.default", "5xx", Duration::from_secs(20));
        let t = m.render("api.default", 3);
        let line = |needle: &str| {
            t.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("{needle} in\n{t}"))
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        let base = "identity=\"api.default\",version=\"3\",source=\"web.default\"";
        assert_eq!(
            line(&format!(
                "skiff_mesh_requests_total{{{base},class=\"2xx\"}}"
            )),
            "2"
        );
        assert_eq!(
            line(&format!(
                "skiff_mesh_request_duration_seconds_bucket{{{base},class=\"2xx\",le=\"0.0005\"}}"
            )),
            "1"
        );
        assert_eq!(
            line(&format!(
                "skiff_mesh_request_duration_seconds_bucket{{{base},class=\"2xx\",le=\"0.05\"}}"
            )),
            "2"
        );
        assert_eq!(
            line(&format!(
                "skiff_mesh_request_duration_seconds_bucket{{{base},class=\"5xx\",le=\"10\"}}"
            )),
            "0"
        );
        assert_eq!(
            line(&format!(
                "skiff_mesh_request_duration_seconds_bucket{{{base},class=\"5xx\",le=\"+Inf\"}}"
            )),
            "1"
        );
    }
}
