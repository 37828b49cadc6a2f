//! The cluster PKI in the replicated state: the CA certificates and keys (never returned by
//! any API), every certificate issued (by serial: whose it is, until when, revoked or not)
//! and the join tokens (only a hash of each secret).

use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use skiff_tls::CaKey;

use super::{ApplyError, Outcome};

/// What a join token lets its holder become.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinRole {
    Agent,
    Controller,
}

impl JoinRole {
    pub fn as_str(self) -> &'static str {
        match self {
            JoinRole::Agent => "agent",
            JoinRole::Controller => "controller",
        }
    }

    fn uri_prefix(self) -> &'static str {
        match self {
            JoinRole::Agent => "spiffe://skiff/node/",
            JoinRole::Controller => "spiffe://skiff/member/",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// The identity URI.
    pub identity: String,
    pub issued_at: i64,
    pub not_after: i64,
    pub revoked: bool,
    /// The subject hash of the CA that issued it.
    pub ca: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub role: JoinRole,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    pub created_at: i64,
    pub expires_at: i64,
    /// 0: unlimited until it expires.
    pub uses: u32,
    pub used: u32,
    pub revoked: bool,
}

impl TokenRecord {
    pub fn usable(&self, at: i64) -> Result<(), String> {
        if self.revoked {
            return Err("the join token was revoked".into());
        }
        if at >= self.expires_at {
            return Err("the join token has expired".into());
        }
        if self.uses != 0 && self.used >= self.uses {
            return Err(format!(
                "the join token was already used {} time(s)",
                self.used
            ));
        }
        Ok(())
    }
}

/// A token being spent on a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    pub id: String,
    pub secret_hash: String,
}

/// A CA with the subject hash its certificates name as issuer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaEntry {
    pub key: CaKey,
    pub subject: String,
    /// During a rotation: this CA's certificate signed by the previous CA.
    #[serde(default)]
    pub cross_pem: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PkiState {
    /// Trusted CAs; the last one issues.
    pub cas: Vec<CaEntry>,
    pub certs: OrdMap<String, CertRecord>,
    pub tokens: OrdMap<String, TokenRecord>,
    /// Bumped whenever what nodes must trust or refuse changes.
    pub version: u64,
}

/// A change to the PKI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "pki_op", rename_all = "snake_case")]
pub enum PkiOp {
    /// The bootstrapper's CA and the certificates it issued itself before the log existed.
    Init {
        ca: CaEntry,
        certs: Vec<(String, CertRecord)>,
    },
    CreateToken {
        id: String,
        record: TokenRecord,
    },
    RevokeToken {
        id: String,
    },
    /// Record a certificate that was issued; with a token, spend it (refused if it cannot be
    /// spent, and then the certificate is never handed out).
    RecordCert {
        serial: String,
        record: CertRecord,
        token: Option<TokenUse>,
        at: i64,
    },
    /// Revoke by serial, or every certificate of an identity URI.
    Revoke {
        serials: Vec<String>,
        identity: Option<String>,
    },
    /// Trust a new CA and issue with it from now on.
    RotateCa {
        ca: CaEntry,
    },
    /// Drop every CA but the active one; unless forced, refused while a live certificate of
    /// another CA exists.
    RetireCa {
        force: bool,
        at: i64,
    },
}

fn refuse(message: impl Into<String>) -> ApplyError {
    ApplyError::Pki {
        message: message.into(),
    }
}

impl PkiState {
    pub fn active(&self) -> Option<&CaEntry> {
        self.cas.last()
    }

    /// Every trusted CA certificate, PEM.
    pub fn ca_bundle(&self) -> String {
        let mut pem = String::new();
        for c in &self.cas {
            pem.push_str(&c.key.cert_pem);
            if let Some(x) = &c.cross_pem {
                pem.push_str(x);
            }
        }
        pem
    }

    pub fn revoked(&self) -> impl Iterator<Item = &String> {
        self.certs.iter().filter(|(_, r)| r.revoked).map(|(s, _)| s)
    }

    /// Serials of an identity's certificates that are neither revoked nor expired.
    pub fn live_of(&self, identity: &str, at: i64) -> Vec<String> {
        self.certs
            .iter()
            .filter(|(_, r)| r.identity == identity && !r.revoked && r.not_after > at)
            .map(|(s, _)| s.clone())
            .collect()
    }

    fn prune(&mut self, at: i64) {
        let old: Vec<String> = self
            .certs
            .iter()
            .filter(|(_, r)| r.not_after <= at)
            .map(|(s, _)| s.clone())
            .collect();
        for s in old {
            self.certs.remove(&s);
        }
        let old: Vec<String> = self
            .tokens
            .iter()
            .filter(|(_, t)| t.expires_at + 86_400 <= at)
            .map(|(id, _)| id.clone())
            .collect();
        for id in old {
            self.tokens.remove(&id);
        }
    }

    /// Revokes every certificate of `identity`; returns the serials.
    pub(crate) fn revoke_identity(&mut self, identity: &str) -> Vec<String> {
        let serials: Vec<String> = self
            .certs
            .iter()
            .filter(|(_, r)| r.identity == identity && !r.revoked)
            .map(|(s, _)| s.clone())
            .collect();
        for s in &serials {
            if let Some(r) = self.certs.get_mut(s) {
                r.revoked = true;
            }
        }
        if !serials.is_empty() {
            self.version += 1;
        }
        serials
    }

    pub(crate) fn apply(&mut self, op: &PkiOp) -> Result<Outcome, ApplyError> {
        match op {
            PkiOp::Init { ca, certs } => {
                if let Some(first) = self.cas.first() {
                    if first == ca {
                        return Ok(Outcome::Pki { serials: vec![] });
                    }
                    return Err(refuse("the cluster CA already exists"));
                }
                self.cas.push(ca.clone());
                for (s, r) in certs {
                    self.certs.insert(s.clone(), r.clone());
                }
                self.version += 1;
                Ok(Outcome::Pki {
                    serials: certs.iter().map(|(s, _)| s.clone()).collect(),
                })
            }
            PkiOp::CreateToken { id, record } => {
                if self.tokens.contains_key(id) {
                    return Err(refuse(format!("token {id} exists")));
                }
                self.tokens.insert(id.clone(), record.clone());
                Ok(Outcome::Pki { serials: vec![] })
            }
            PkiOp::RevokeToken { id } => {
                let t = self
                    .tokens
                    .get_mut(id)
                    .ok_or_else(|| refuse(format!("no token {id}")))?;
                t.revoked = true;
                Ok(Outcome::Pki { serials: vec![] })
            }
            PkiOp::RecordCert {
                serial,
                record,
                token,
                at,
            } => {
                if self.cas.is_empty() {
                    return Err(refuse("the cluster PKI is not initialized yet"));
                }
                if self.certs.contains_key(serial) {
                    return Err(refuse(format!("serial {serial} already issued")));
                }
                if let Some(tu) = token {
                    let t = self
                        .tokens
                        .get(&tu.id)
                        .ok_or_else(|| refuse("unknown join token"))?;
                    if t.secret_hash != tu.secret_hash {
                        return Err(refuse("the join token's secret does not match"));
                    }
                    t.usable(*at).map_err(refuse)?;
                    if !record.identity.starts_with(t.role.uri_prefix()) {
                        return Err(refuse(format!(
                            "a {} token cannot enroll {}",
                            t.role.as_str(),
                            record.identity
                        )));
                    }
                    if let Some(live) = self.live_of(&record.identity, *at).first() {
                        return Err(refuse(format!(
                            "{} already has a valid certificate ({live}); remove it first \
                             (skiff node rm / skiff member remove) or revoke the certificate",
                            record.identity
                        )));
                    }
                    if let Some(t) = self.tokens.get_mut(&tu.id) {
                        t.used += 1;
                    }
                }
                self.prune(*at);
                self.certs.insert(serial.clone(), record.clone());
                Ok(Outcome::Pki {
                    serials: vec![serial.clone()],
                })
            }
            PkiOp::Revoke { serials, identity } => {
                for s in serials {
                    if !self.certs.contains_key(s) {
                        return Err(refuse(format!("no certificate with serial {s}")));
                    }
                }
                let mut done = Vec::new();
                for s in serials {
                    if let Some(r) = self.certs.get_mut(s).filter(|r| !r.revoked) {
                        r.revoked = true;
                        done.push(s.clone());
                    }
                }
                if !done.is_empty() {
                    self.version += 1;
                }
                if let Some(id) = identity {
                    done.extend(self.revoke_identity(id));
                }
                Ok(Outcome::Pki { serials: done })
            }
            PkiOp::RotateCa { ca } => {
                if self.cas.is_empty() {
                    return Err(refuse("the cluster PKI is not initialized yet"));
                }
                if self.cas.len() > 1 {
                    return Err(refuse(
                        "a CA rotation is already under way: retire the old CA first",
                    ));
                }
                self.cas.push(ca.clone());
                self.version += 1;
                Ok(Outcome::Pki { serials: vec![] })
            }
            PkiOp::RetireCa { force, at } => {
                let Some(active) = self.active().map(|c| c.subject.clone()) else {
                    return Err(refuse("the cluster PKI is not initialized yet"));
                };
                if self.cas.len() == 1 {
                    return Err(refuse("there is no old CA to retire"));
                }
                // Old-CA certificates still in use: live, and their identity has no live
                // certificate of the new CA yet (a renewed one supersedes them).
                let reissued = |identity: &str| {
                    self.certs.values().any(|r| {
                        r.identity == identity && r.ca == active && !r.revoked && r.not_after > *at
                    })
                };
                let stale: Vec<String> = self
                    .certs
                    .iter()
                    .filter(|(_, r)| r.ca != active && !r.revoked && r.not_after > *at)
                    .filter(|(_, r)| !reissued(&r.identity))
                    .map(|(_, r)| r.identity.clone())
                    .collect();
                if !stale.is_empty() && !force {
                    return Err(refuse(format!(
                        "{} certificate(s) of the old CA are still valid (e.g. {}): wait for \
                         their renewal or revoke them, or retire with --force",
                        stale.len(),
                        stale[0]
                    )));
                }
                self.cas.retain(|c| c.subject == active);
                for c in &mut self.cas {
                    c.cross_pem = None;
                }
                self.version += 1;
                Ok(Outcome::Pki { serials: vec![] })
            }
        }
    }
}
