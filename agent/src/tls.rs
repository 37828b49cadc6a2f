//! The node's certificate: enrolled once with a join token (the controllers' CA checked
//! against the token's pin before anything is sent; the key made here and never sent), kept
//! in `<data-dir>/tls/`, renewed at two thirds of its life or when the cluster rotates its
//! CA, and the trust bundle (CAs, revoked serials) the controllers send with heartbeats.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use skiff_proto::v1 as pb;
use skiff_proto::v1::pki_client::PkiClient;
use skiff_tls::pki::{key_and_csr, now_unix, subject_hash};
use skiff_tls::{Identity, Material, Need, TlsContext};
use tracing::{info, warn};

pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// What the agent's own API needs of its callers: Exec and Logs are for operators (and the
/// controllers).
pub fn policy(path: &str) -> Need {
    match path {
        "/skiff.v1.Agent/Exec" | "/skiff.v1.Agent/Logs" => Need::Operator,
        "/skiff.v1.Agent/ListVolumes" => Need::Reader,
        _ => Need::Admin,
    }
}

/// The names the node's server certificate carries.
pub fn sans(advertise: std::net::IpAddr, listen: std::net::SocketAddr) -> Vec<String> {
    let mut v = vec![advertise.to_string()];
    if !listen.ip().is_unspecified() && listen.ip() != advertise {
        v.push(listen.ip().to_string());
    }
    v
}

/// Loads the node's material, or enrolls with `token` through the first controller that
/// answers. A refusal (bad or spent token, a CA that does not match the pin) is final.
pub async fn material(
    dir: &Path,
    name: &str,
    controllers: &[String],
    token: Option<&skiff_tls::JoinToken>,
    sans: &[String],
) -> anyhow::Result<Material> {
    if let Some(m) = Material::load(dir)? {
        let info = m.info()?;
        if info.identity != Identity::Node(name.to_string()) {
            anyhow::bail!(
                "the certificate in {} is for {}, not node {name}",
                dir.display(),
                info.identity
            );
        }
        return Ok(m);
    }
    let Some(token) = token else {
        anyhow::bail!(
            "node {name} has no certificate yet: start the agent with --join-token \
             (SKIFF_JOIN_TOKEN), from `skiff token create --role agent`"
        );
    };
    let mut attempt = 0usize;
    loop {
        let addr = &controllers[attempt % controllers.len()];
        attempt += 1;
        match skiff_tls::enroll::join(addr, token, name, 0, sans).await {
            Ok(m) => {
                m.store(dir)?;
                info!(controller = %addr, serial = %m.info()?.serial, "enrolled with the cluster CA");
                return Ok(m);
            }
            Err(e) if e.retryable => {
                warn!(error = %e, "enrollment failed, retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// An error and its causes on one line.
pub use skiff_tls::enroll::error_chain;

/// The trust state the heartbeats keep current.
#[derive(Debug, Default)]
pub struct Trust {
    pub version: std::sync::atomic::AtomicU64,
    /// Subject hash of the CA that issues now.
    pub active: std::sync::Mutex<Option<String>>,
}

/// Applies a trust bundle from a heartbeat answer.
pub fn apply_bundle(ctx: &TlsContext, dir: &Path, trust: &Trust, bundle: &pb::TrustBundle) {
    ctx.set_revoked(bundle.revoked_serials.iter().cloned());
    let mut m = ctx.material();
    if !bundle.ca_pem.is_empty() && m.ca_pem != bundle.ca_pem {
        m.ca_pem = bundle.ca_pem.clone();
        if let Err(e) = ctx.update(m.clone()).and_then(|()| m.store(dir)) {
            warn!(error = %e, "applying the cluster's CA bundle");
            return;
        }
        info!("trusting the cluster's new CA bundle");
    }
    if let Ok(s) = subject_hash(&bundle.active_ca_pem) {
        *trust.active.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
    }
    trust
        .version
        .store(bundle.version, std::sync::atomic::Ordering::SeqCst);
}

/// Renews the node's certificate when it is due, through any controller; returns once
/// renewed (the caller reconnects with it). Runs forever otherwise.
pub async fn renew_when_due(
    ctx: Arc<TlsContext>,
    dir: PathBuf,
    trust: Arc<Trust>,
    controllers: Vec<String>,
    sans: Vec<String>,
) {
    let mut next = 0usize;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let active = trust
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !ctx.info().wants_renewal(now_unix(), active.as_deref()) {
            continue;
        }
        let addr = &controllers[next % controllers.len()];
        next += 1;
        match renew(&ctx, addr, &sans).await {
            Ok(m) => match ctx.update(m.clone()).and_then(|()| m.store(&dir)) {
                Ok(()) => info!(serial = %ctx.info().serial, "renewed the node's certificate"),
                Err(e) => warn!(error = %e, "storing the renewed certificate"),
            },
            Err(e) => warn!(controller = %addr, error = %e, "renewing the node's certificate"),
        }
    }
}

async fn renew(ctx: &Arc<TlsContext>, addr: &str, sans: &[String]) -> anyhow::Result<Material> {
    let info = ctx.info();
    let (key_pem, csr) = key_and_csr(&info.identity.describe())?;
    let ep = skiff_tls::net::endpoint(addr)?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(15));
    let channel = skiff_tls::net::channel(ctx, ep).await?;
    let resp = PkiClient::new(channel)
        .renew(pb::RenewRequest {
            csr_pem: csr,
            addresses: sans.to_vec(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let m = Material {
        ca_pem: resp.ca_pem,
        cert_pem: resp.cert_pem,
        key_pem,
    };
    if m.info()?.identity != info.identity {
        anyhow::bail!("the renewed certificate names another identity");
    }
    Ok(m)
}
