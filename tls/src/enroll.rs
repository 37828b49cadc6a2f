//! Enrollment: a joiner with a token and no certificate gets one. The server must show the
//! CA the token pins before anything is sent; the key is made here and never leaves.

use std::time::Duration;

use skiff_proto::v1 as pb;
use skiff_proto::v1::pki_client::PkiClient;

use crate::pki::key_and_csr;
use crate::{JoinToken, Material};

/// Why an enrollment failed, and whether trying again may help (the cluster is starting, a
/// leader is moving) or not (a bad or spent token, a CA that does not match the pin).
#[derive(Debug, thiserror::Error)]
#[error("enrolling through {addr}: {message}")]
pub struct EnrollError {
    pub addr: String,
    pub message: String,
    pub retryable: bool,
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Enrolls as node `node_name` (or as member `member_id` when it is non-zero) with server
/// names `addresses`.
pub async fn join(
    addr: &str,
    token: &JoinToken,
    node_name: &str,
    member_id: u64,
    addresses: &[String],
) -> Result<Material, EnrollError> {
    let err = |message: String, retryable: bool| EnrollError {
        addr: addr.to_string(),
        message,
        retryable,
    };
    let cn = if member_id != 0 {
        format!("member {member_id}")
    } else {
        node_name.to_string()
    };
    let (key_pem, csr) = key_and_csr(&cn).map_err(|e| err(e.to_string(), false))?;
    let cfg = crate::context::join_client_config(&token.ca_hash)
        .map_err(|e| err(e.to_string(), false))?;
    let ep = crate::net::endpoint(addr)
        .map_err(|e| err(e.to_string(), false))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(15));
    let channel = crate::net::channel_with(cfg, ep).await.map_err(|e| {
        let chain = error_chain(&e);
        // A CA that does not match the pin is not a network problem.
        let pin = chain.contains("pin");
        err(chain, !pin)
    })?;
    let resp = PkiClient::new(channel)
        .join(pb::JoinRequest {
            token: token.to_string(),
            csr_pem: csr,
            node_name: node_name.to_string(),
            member_id,
            addresses: addresses.to_vec(),
        })
        .await
        .map_err(|s| {
            let retry = matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown);
            err(s.message().to_string(), retry)
        })?
        .into_inner();
    let m = Material {
        ca_pem: resp.ca_pem,
        cert_pem: resp.cert_pem,
        key_pem,
    };
    m.info().map_err(|e| err(e.to_string(), false))?;
    Ok(m)
}
