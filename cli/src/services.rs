//! `skiff services`: every service, its endpoints and their health.

use skiff_proto::v1 as pb;

use crate::client::{Controllers, rpc};
use crate::render::{self, Out, print_table};

pub async fn list(ctl: &Controllers, out: Out, namespace: Option<String>) -> anyhow::Result<()> {
    let req = pb::ListServicesRequest {
        namespace: namespace.unwrap_or_default(),
        read: None,
    };
    let resp = rpc!(ctl, jobs, list_services, req)?;
    if out.json {
        return out.json(
            &resp
                .services
                .iter()
                .map(render::service_json)
                .collect::<Vec<_>>(),
        );
    }
    let rows = resp
        .services
        .iter()
        .map(|s| {
            let port = s.ports.iter().find(|p| p.name == s.port_name).map_or_else(
                || s.port_name.clone(),
                |p| format!("{}/{}", p.port, render::protocol(p.protocol)),
            );
            let ready = s.endpoints.iter().filter(|e| e.ready).count();
            let endpoints: Vec<String> = s
                .endpoints
                .iter()
                .map(|e| {
                    let health = render::health(e.health);
                    let state = if e.ready {
                        String::new()
                    } else if health.is_empty() {
                        " (no address)".to_owned()
                    } else {
                        format!(" ({health})")
                    };
                    format!("{}{state}", if e.ip.is_empty() { "-" } else { &e.ip })
                })
                .collect();
            vec![
                format!("{}.{}.skiff.internal", s.name, s.namespace),
                if s.vip.is_empty() {
                    "-".into()
                } else {
                    s.vip.clone()
                },
                port,
                format!("{ready}/{}", s.endpoints.len()),
                if endpoints.is_empty() {
                    "-".into()
                } else {
                    endpoints.join(", ")
                },
            ]
        })
        .collect();
    print_table(&["SERVICE", "VIP", "PORT", "READY", "ENDPOINTS"], rows);
    Ok(())
}
