//! `skiff token | credentials | ca`: join tokens, user credentials, certificates, the CA.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use skiff_proto::v1 as pb;
use skiff_tls::Credentials;

use crate::args::{JoinRole, UserRole};
use crate::client::{Controllers, rpc};
use crate::render::{Out, print_table};

fn ttl_seconds(ttl: Option<&str>) -> anyhow::Result<u64> {
    match ttl {
        None => Ok(0),
        Some(t) => Ok(humantime::parse_duration(t)
            .map_err(|e| anyhow::anyhow!("--ttl {t:?}: {e}"))?
            .as_secs()),
    }
}

pub fn when(unix: i64) -> String {
    let now = skiff_tls::pki::now_unix();
    let d = Duration::from_secs(unix.abs_diff(now));
    let d = humantime::format_duration(Duration::from_secs(d.as_secs() / 60 * 60)).to_string();
    let d = if d.is_empty() || d == "0s" {
        "<1m".to_string()
    } else {
        d
    };
    if unix >= now {
        format!("in {d}")
    } else {
        format!("{d} ago")
    }
}

pub async fn token_create(
    ctl: &Controllers,
    out: Out,
    role: JoinRole,
    ttl: Option<String>,
    uses: Option<u32>,
) -> anyhow::Result<()> {
    let req = pb::CreateTokenRequest {
        role: match role {
            JoinRole::Agent => "agent",
            JoinRole::Controller => "controller",
        }
        .into(),
        ttl_seconds: ttl_seconds(ttl.as_deref())?,
        uses: uses.unwrap_or(0),
    };
    let resp = rpc!(ctl, pki, create_token, req)?;
    if out.json {
        return out.json(&json!({
            "token": resp.token, "id": resp.id, "expires_at": resp.expires_at,
        }));
    }
    println!("{}", resp.token);
    Ok(())
}

pub async fn token_ls(ctl: &Controllers, out: Out) -> anyhow::Result<()> {
    let resp = rpc!(ctl, pki, list_tokens, pb::ListTokensRequest {})?;
    if out.json {
        let v: Vec<_> = resp
            .tokens
            .iter()
            .map(|t| {
                json!({"id": t.id, "role": t.role, "created_at": t.created_at,
                       "expires_at": t.expires_at, "uses": t.uses, "used": t.used,
                       "revoked": t.revoked})
            })
            .collect();
        return out.json(&v);
    }
    let rows = resp
        .tokens
        .iter()
        .map(|t| {
            let state = if t.revoked {
                "revoked"
            } else if t.expires_at <= skiff_tls::pki::now_unix() {
                "expired"
            } else if t.uses != 0 && t.used >= t.uses {
                "used up"
            } else {
                "valid"
            };
            vec![
                t.id.clone(),
                t.role.clone(),
                state.into(),
                when(t.expires_at),
                if t.uses == 0 {
                    format!("{}/-", t.used)
                } else {
                    format!("{}/{}", t.used, t.uses)
                },
            ]
        })
        .collect();
    print_table(&["ID", "ROLE", "STATE", "EXPIRES", "USED"], rows);
    Ok(())
}

pub async fn token_revoke(ctl: &Controllers, out: Out, id: String) -> anyhow::Result<()> {
    rpc!(
        ctl,
        pki,
        revoke_token,
        pb::RevokeTokenRequest { id: id.clone() }
    )?;
    if out.json {
        return out.json(&json!({"revoked": id}));
    }
    println!("token {id} revoked");
    Ok(())
}

pub async fn credentials_create(
    ctl: &Controllers,
    creds: &Credentials,
    out: Out,
    name: String,
    role: UserRole,
    file: &Path,
    ttl: Option<String>,
) -> anyhow::Result<()> {
    let role = match role {
        UserRole::Admin => "admin",
        UserRole::Operator => "operator",
        UserRole::Reader => "reader",
    };
    skiff_tls::identity::check_name("user", &name)?;
    if file.exists() {
        anyhow::bail!("--out {}: exists; not overwriting it", file.display());
    }
    let (key, csr) = skiff_tls::pki::key_and_csr(&name)?;
    let req = pb::CreateCredentialsRequest {
        name: name.clone(),
        role: role.into(),
        csr_pem: csr,
        ttl_seconds: ttl_seconds(ttl.as_deref())?,
    };
    let resp = rpc!(ctl, pki, create_credentials, req)?;
    let made = Credentials {
        controllers: creds.controllers.clone(),
        name: name.clone(),
        role: role.into(),
        ca: resp.ca_pem,
        cert: resp.cert_pem,
        key,
    };
    made.store(file)?;
    let info = made.material().info()?;
    if out.json {
        return out.json(
            &json!({"file": file.display().to_string(), "identity": info.identity.describe(),
                                "serial": info.serial, "not_after": info.not_after}),
        );
    }
    println!(
        "wrote {} for {} (serial {}, expires {})",
        file.display(),
        info.identity,
        info.serial,
        when(info.not_after)
    );
    Ok(())
}

pub async fn credentials_ls(ctl: &Controllers, out: Out) -> anyhow::Result<()> {
    let resp = rpc!(ctl, pki, list_certificates, pb::ListCertificatesRequest {})?;
    if out.json {
        let v: Vec<_> = resp
            .certificates
            .iter()
            .map(|c| {
                json!({"serial": c.serial, "identity": c.identity, "issued_at": c.issued_at,
                       "not_after": c.not_after, "revoked": c.revoked, "ca": c.ca})
            })
            .collect();
        return out.json(&json!({"certificates": v, "cas": resp.ca_pem.len()}));
    }
    let rows = resp
        .certificates
        .iter()
        .map(|c| {
            vec![
                c.serial.clone(),
                c.identity.clone(),
                if c.revoked { "revoked" } else { "valid" }.into(),
                when(c.not_after),
                c.ca.clone(),
            ]
        })
        .collect();
    print_table(&["SERIAL", "IDENTITY", "STATE", "EXPIRES", "CA"], rows);
    Ok(())
}

pub async fn credentials_revoke(
    ctl: &Controllers,
    out: Out,
    serial: Option<String>,
    identity: Option<String>,
) -> anyhow::Result<()> {
    let req = pb::RevokeCertificateRequest {
        serial: serial.unwrap_or_default(),
        identity: identity.unwrap_or_default(),
    };
    let resp = rpc!(ctl, pki, revoke_certificate, req)?;
    if out.json {
        return out.json(&json!({"revoked": resp.serials}));
    }
    if resp.serials.is_empty() {
        println!("nothing to revoke");
    }
    for s in resp.serials {
        println!("revoked {s}");
    }
    Ok(())
}

pub async fn ca_rotate(ctl: &Controllers, out: Out) -> anyhow::Result<()> {
    let resp = rpc!(ctl, pki, rotate_ca, pb::RotateCaRequest {})?;
    if out.json {
        return out.json(&json!({"ca_pem": resp.ca_pem}));
    }
    println!(
        "a new CA issues from now on; nodes and members renew at once. Get new credentials for \
         people and CI (`skiff credentials create`), then `skiff ca retire`."
    );
    Ok(())
}

pub async fn ca_retire(ctl: &Controllers, out: Out, force: bool) -> anyhow::Result<()> {
    let resp = rpc!(ctl, pki, retire_ca, pb::RetireCaRequest { force })?;
    if out.json {
        return out.json(&json!({"ca_pem": resp.ca_pem}));
    }
    println!("the old CA is no longer trusted");
    Ok(())
}
