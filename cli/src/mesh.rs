//! `skiff mesh status`: the workload identities of the mesh, their certificates' expiry, and
//! who may call each service.

use std::collections::BTreeMap;

use serde_json::json;
use skiff_proto::v1 as pb;

use crate::client::{Controllers, rpc};
use crate::render::{Out, print_table};

/// One identity as the status shows it.
#[derive(Default)]
struct Row {
    service: bool,
    mode: String,
    allow_from: Vec<String>,
    upstreams: Vec<String>,
    /// Certificates in force (issued, not revoked, not expired).
    live: usize,
    /// The latest expiry among them.
    expires: Option<i64>,
}

const PREFIX: &str = "spiffe://skiff/ns/";

pub async fn status(ctl: &Controllers, out: Out) -> anyhow::Result<()> {
    let services = rpc!(
        ctl,
        jobs,
        list_services,
        pb::ListServicesRequest {
            namespace: String::new(),
            read: None,
        }
    )?
    .services;
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for s in &services {
        let Some(m) = &s.mesh else { continue };
        let row = rows
            .entry(format!("{PREFIX}{}/svc/{}", s.namespace, m.identity))
            .or_default();
        row.service = true;
        row.mode = if m.mode == pb::MeshMode::Permissive as i32 {
            "permissive"
        } else {
            "strict"
        }
        .into();
        row.allow_from = m.allow_from.clone();
        row.upstreams = m.upstreams.clone();
    }
    // Certificates are an admin's to list; without them the policy is still shown.
    let now = skiff_tls::pki::now_unix();
    let certs = rpc!(ctl, pki, list_certificates, pb::ListCertificatesRequest {});
    let certs_note = match &certs {
        Ok(_) => None,
        Err(e) => Some(format!("certificates not shown: {e}")),
    };
    for c in certs.map(|r| r.certificates).unwrap_or_default() {
        // Listed as "workload SERVICE.NAMESPACE".
        let Some((svc, ns)) = c
            .identity
            .strip_prefix("workload ")
            .and_then(|w| w.split_once('.'))
        else {
            continue;
        };
        if c.revoked || c.not_after <= now {
            continue;
        }
        let row = rows.entry(format!("{PREFIX}{ns}/svc/{svc}")).or_default();
        row.live += 1;
        row.expires = row.expires.max(Some(c.not_after));
    }
    if out.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(id, r)| {
                json!({"identity": id, "service": r.service, "mode": r.mode,
                       "allow_from": r.allow_from, "upstreams": r.upstreams,
                       "certificates": r.live, "expires": r.expires})
            })
            .collect();
        return out.json(&json!({"identities": v, "note": certs_note}));
    }
    let list = |v: &[String], empty: &str| {
        if v.is_empty() {
            empty.to_owned()
        } else {
            v.join(",")
        }
    };
    let table = rows
        .iter()
        .map(|(id, r)| {
            vec![
                id.clone(),
                if r.service {
                    r.mode.clone()
                } else {
                    "-".into()
                },
                if r.service {
                    list(&r.allow_from, "any workload")
                } else {
                    "-".into()
                },
                r.live.to_string(),
                r.expires.map_or_else(|| "-".into(), crate::pki::when),
            ]
        })
        .collect();
    print_table(
        &["IDENTITY", "MODE", "ALLOW FROM", "CERTS", "EXPIRES"],
        table,
    );
    if let Some(n) = certs_note {
        eprintln!("{n}");
    }
    Ok(())
}
