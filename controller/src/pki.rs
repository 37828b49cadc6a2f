//! This member's place in the cluster PKI: its own certificate (created at bootstrap, from an
//! enrollment with a join token, or renewed), the trust bundle and revocations it applies
//! to every handshake, and the bootstrapper's CA until the log holds it.
//!
//! Files under `<data-dir>/tls/`: `ca.pem` (every trusted CA), `cert.pem`, `key.pem` (this
//! member's), and on the bootstrapper, until the first leader commits it, `pending.json`
//! (the new CA and the certificates it issued before the log existed). The CA's key lives
//! in the replicated state (and so in the log and snapshots), like the rest of the cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skiff_tls::pki::{key_and_csr, now_unix, subject_hash, write_private};
use skiff_tls::{CaKey, Credentials, Identity, Material, Role, TlsContext};
use tokio::sync::watch;

use crate::config::{Config, Formation};
use crate::datadir::Identity as MemberIdentity;
use crate::raft::{RaftNode, Role as RaftRole};
use crate::state::Command;
use crate::state::pki::{CaEntry, CertRecord, PkiOp};

/// Lifetime of the bootstrap admin's credentials.
pub const ADMIN_TTL: Duration = Duration::from_secs(365 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Tls(#[from] skiff_tls::TlsError),
    #[error(
        "member {0} has no certificate yet: start it with --bootstrap for a new cluster, or \
         with --join ADDR --join-token TOKEN (skiff token create --role controller)"
    )]
    NoToken(u64),
    #[error(transparent)]
    Enroll(#[from] skiff_tls::enroll::EnrollError),
    #[error("{0}")]
    Io(String),
}

/// What the bootstrapper keeps until the log has the CA.
#[derive(Debug, Serialize, Deserialize)]
pub struct Pending {
    pub ca: CaEntry,
    pub certs: Vec<(String, CertRecord)>,
}

pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// The names a member's server certificate carries.
pub fn member_sans(ident: &MemberIdentity, extra: &[String]) -> Vec<String> {
    let mut sans = vec![ident.rpc_addr.ip().to_string()];
    for s in ["127.0.0.1", "::1", "localhost"]
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
    {
        if !sans.contains(&s) {
            sans.push(s);
        }
    }
    sans
}

fn record(info: &skiff_tls::CertInfo, issued_at: i64) -> CertRecord {
    CertRecord {
        identity: info.identity.uri(),
        issued_at,
        not_after: info.not_after,
        revoked: false,
        ca: info.issuer.clone(),
    }
}

/// This member's material: from its data dir, or new (bootstrap: a new CA; join: enrolled
/// with the join token through the member it joins).
pub async fn material(config: &Config, ident: &MemberIdentity) -> Result<Material, PkiError> {
    let dir = tls_dir(&config.data_dir);
    if let Some(m) = Material::load(&dir)? {
        return Ok(m);
    }
    let sans = member_sans(ident, &config.tls_sans);
    match (&ident.formation, &config.join_token) {
        (Formation::Bootstrap, _) => bootstrap(config, ident, &dir, &sans),
        (Formation::Join(addr), Some(token)) => {
            let m = loop {
                match skiff_tls::enroll::join(addr, token, "", config.id, &sans).await {
                    Ok(m) => break m,
                    Err(e) if e.retryable => {
                        tracing::warn!(error = %e, "enrollment failed, retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            m.store(&dir)?;
            tracing::info!(
                member = config.id,
                "enrolled: certificate issued by the cluster CA"
            );
            Ok(m)
        }
        _ => Err(PkiError::NoToken(config.id)),
    }
}

fn bootstrap(
    config: &Config,
    ident: &MemberIdentity,
    dir: &Path,
    sans: &[String],
) -> Result<Material, PkiError> {
    let now = now_unix();
    let ca = CaKey::generate(&format!("skiff cluster CA {now}"))?;
    let entry = CaEntry {
        subject: subject_hash(&ca.cert_pem)?,
        key: ca.clone(),
        cross_pem: None,
    };
    let (key_pem, csr) = key_and_csr("member")?;
    let me = ca.issue(&csr, &Identity::Member(config.id), sans, config.cert_ttl)?;
    let m = Material {
        ca_pem: ca.cert_pem.clone(),
        cert_pem: me.cert_pem,
        key_pem,
    };
    let (admin_key, admin_csr) = key_and_csr("admin")?;
    let admin_id = Identity::User {
        role: Role::Admin,
        name: "admin".into(),
    };
    let admin = ca.issue(&admin_csr, &admin_id, &[], ADMIN_TTL)?;
    let certs = vec![
        (me.serial.clone(), record(&m.info()?, now)),
        (admin.serial.clone(), {
            let info =
                skiff_tls::pki::parse_cert(skiff_tls::pki::first_cert(&admin.cert_pem)?.as_ref())?;
            record(&info, now)
        }),
    ];
    std::fs::create_dir_all(dir).map_err(|e| PkiError::Io(format!("{}: {e}", dir.display())))?;
    let pending = Pending { ca: entry, certs };
    let text = serde_json::to_string(&pending).map_err(|e| PkiError::Io(e.to_string()))?;
    write_private(&dir.join("pending.json"), &text)?;
    m.store(dir)?;
    let creds = Credentials {
        controllers: vec![ident.rpc_addr.to_string()],
        name: "admin".into(),
        role: "admin".into(),
        ca: ca.cert_pem.clone(),
        cert: admin.cert_pem,
        key: admin_key,
    };
    let path = config.data_dir.join("admin.creds");
    creds.store(&path)?;
    tracing::info!(path = %path.display(), "created the cluster CA; admin credentials written");
    Ok(m)
}

fn load_pending(dir: &Path) -> Option<Pending> {
    let text = std::fs::read_to_string(dir.join("pending.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Runs until `stop`: commits the bootstrapper's CA, keeps the trust bundle and the
/// revocations of the state applied to `ctx`, and renews this member's certificate at two
/// thirds of its life (or at once after a CA rotation).
pub async fn keep(
    node: RaftNode,
    ctx: Arc<TlsContext>,
    dir: PathBuf,
    cert_ttl: Duration,
    sans: Vec<String>,
    mut stop: watch::Receiver<bool>,
) {
    let mut applied = node.applied_watch();
    // The PKI as last read. Trust and revocations change only with `PkiState::version`, so
    // at other entries nothing more is read (the certificates alone grow with the nodes).
    let mut seen: Option<u64> = None;
    // The CA that issues now; none before the cluster CA is committed.
    let mut active: Option<CaEntry> = None;
    loop {
        let changed = {
            let st = node.state();
            let pki = st.state.pki();
            (seen != Some(pki.version)).then(|| {
                seen = Some(pki.version);
                active = pki.active().cloned();
                (pki.ca_bundle(), pki.revoked().cloned().collect::<Vec<_>>())
            })
        };
        if let Some((bundle, revoked)) = changed
            && active.is_some()
        {
            let _ = std::fs::remove_file(dir.join("pending.json"));
            ctx.set_revoked(revoked);
            let mut m = ctx.material();
            if m.ca_pem != bundle {
                m.ca_pem = bundle;
                apply(&ctx, &dir, m);
            }
        }
        if active.is_none() {
            if let Some(p) = load_pending(&dir)
                && node.status().role == RaftRole::Leader
            {
                let op = PkiOp::Init {
                    ca: p.ca,
                    certs: p.certs,
                };
                match node.write(Command::Pki { change: op }).await {
                    Ok((Ok(_), _)) => {
                        tracing::info!("cluster CA committed");
                        continue;
                    }
                    Ok((Err(e), _)) => tracing::error!(error = %e, "cluster CA refused"),
                    Err(e) => tracing::debug!(error = %e, "committing the cluster CA"),
                }
            }
        } else if let Some(active) = &active
            && ctx.info().wants_renewal(now_unix(), Some(&active.subject))
        {
            match renew_self(&node, &ctx, active, cert_ttl, &sans).await {
                Ok(m) => {
                    apply(&ctx, &dir, m);
                    tracing::info!(serial = %ctx.info().serial, "renewed this member's certificate");
                }
                Err(e) => tracing::warn!(error = %e, "renewing this member's certificate"),
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            changed = applied.changed() => if changed.is_none() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn apply(ctx: &TlsContext, dir: &Path, m: Material) {
    if let Err(e) = ctx.update(m.clone()).and_then(|()| m.store(dir)) {
        tracing::error!(error = %e, "applying new TLS material");
    }
}

async fn renew_self(
    node: &RaftNode,
    ctx: &TlsContext,
    active: &CaEntry,
    ttl: Duration,
    sans: &[String],
) -> Result<Material, String> {
    let info = ctx.info();
    let (key_pem, csr) = key_and_csr("member").map_err(|e| e.to_string())?;
    let issued = active
        .key
        .issue(&csr, &info.identity, sans, ttl)
        .map_err(|e| e.to_string())?;
    let op = PkiOp::RecordCert {
        serial: issued.serial.clone(),
        record: CertRecord {
            identity: info.identity.uri(),
            issued_at: now_unix(),
            not_after: issued.not_after,
            revoked: false,
            ca: active.subject.clone(),
        },
        token: None,
        at: now_unix(),
    };
    match node.write(Command::Pki { change: op }).await {
        Ok((Ok(_), _)) => {}
        Ok((Err(e), _)) => return Err(e.to_string()),
        Err(e) => return Err(e.to_string()),
    }
    Ok(Material {
        ca_pem: ctx.material().ca_pem,
        cert_pem: issued.cert_pem,
        key_pem,
    })
}
