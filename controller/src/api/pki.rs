//! The Pki service: enrollment with a join token, renewal, tokens, user credentials,
//! certificates and CA rotation. The CA's key is used here and never leaves the member.

use std::time::Duration;

use skiff_proto::v1 as pb;
use skiff_proto::v1::pki_server::Pki;
use skiff_tls::pki::{cert_hash, now_unix, subject_hash};
use skiff_tls::{CaKey, Identity, JoinToken, Role, peer_of};
use tonic::{Request, Response, Status};

use super::{ApiContext, ApiError};
use crate::state::Command;
use crate::state::pki::{CaEntry, CertRecord, JoinRole, PkiOp, TokenRecord, TokenUse};

/// Default and longest lifetimes of join tokens and user credentials.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);
const USER_TTL: Duration = Duration::from_secs(90 * 86_400);
const MAX_USER_TTL: Duration = Duration::from_secs(3 * 365 * 86_400);
/// Lifetime of a workload certificate; its node renews it at two thirds.
pub const WORKLOAD_TTL: Duration = Duration::from_secs(86_400);

pub struct PkiApi {
    ctx: ApiContext,
    cert_ttl: Duration,
}

impl PkiApi {
    pub fn new(ctx: ApiContext, cert_ttl: Duration) -> PkiApi {
        PkiApi { ctx, cert_ttl }
    }

    fn active(&self) -> Result<(CaEntry, String), ApiError> {
        let st = self.ctx.node.state();
        let pki = st.state.pki();
        let ca = pki
            .active()
            .cloned()
            .ok_or_else(|| ApiError::NotReady("the cluster PKI is not initialized yet".into()))?;
        Ok((ca, pki.ca_bundle()))
    }

    /// Issues for `identity` with the active CA and records it (spending `token` if given):
    /// the certificate is handed out only once the record is committed.
    async fn issue(
        &self,
        csr: &str,
        identity: &Identity,
        sans: &[String],
        ttl: Duration,
        token: Option<TokenUse>,
    ) -> Result<pb::JoinResponse, ApiError> {
        let (ca, bundle) = self.active()?;
        let issued = ca
            .key
            .issue(csr, identity, sans, ttl)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let at = now_unix();
        let op = PkiOp::RecordCert {
            serial: issued.serial.clone(),
            record: CertRecord {
                identity: identity.uri(),
                issued_at: at,
                not_after: issued.not_after,
                revoked: false,
                ca: ca.subject.clone(),
            },
            token,
            at,
        };
        self.ctx.node.write(Command::Pki { change: op }).await?.0?;
        tracing::info!(identity = %identity, serial = %issued.serial, "certificate issued");
        Ok(pb::JoinResponse {
            cert_pem: issued.cert_pem,
            ca_pem: bundle,
        })
    }

    async fn write(&self, op: PkiOp) -> Result<Vec<String>, ApiError> {
        match self.ctx.node.write(Command::Pki { change: op }).await?.0? {
            crate::state::Outcome::Pki { serials } => Ok(serials),
            _ => Ok(vec![]),
        }
    }
}

fn ttl_of(
    seconds: u64,
    default: Duration,
    max: Duration,
    what: &str,
) -> Result<Duration, ApiError> {
    let ttl = if seconds == 0 {
        default
    } else {
        Duration::from_secs(seconds)
    };
    if ttl > max || ttl < Duration::from_secs(30) {
        return Err(ApiError::BadRequest(format!(
            "{what} lifetime must be between 30s and {}",
            humantime::format_duration(max)
        )));
    }
    Ok(ttl)
}

/// `node/NAME`, `member/ID` or `user/ROLE/NAME` (or the full URI).
fn parse_identity(s: &str) -> Result<Identity, ApiError> {
    let uri = if s.starts_with(skiff_tls::identity::URI_PREFIX) {
        s.to_string()
    } else {
        format!("{}{s}", skiff_tls::identity::URI_PREFIX)
    };
    Identity::from_uri(&uri).map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[tonic::async_trait]
impl Pki for PkiApi {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("Join", async {
                let token: JoinToken = req
                    .token
                    .parse()
                    .map_err(|e: skiff_tls::TlsError| ApiError::BadRequest(e.to_string()))?;
                let (_, bundle) = self.active()?;
                let pinned = skiff_tls::context::pem_blocks(&bundle)
                    .iter()
                    .any(|c| cert_hash(c).is_ok_and(|h| h == token.ca_hash));
                if !pinned {
                    return Err(ApiError::BadRequest(
                        "the join token pins another CA than this cluster's".into(),
                    ));
                }
                let identity = match (req.node_name.as_str(), req.member_id) {
                    ("", 0) => {
                        return Err(ApiError::BadRequest(
                            "a join names a node or a member id".into(),
                        ));
                    }
                    (name, 0) => {
                        skiff_common::validate_name("node_name", name)?;
                        Identity::Node(name.to_string())
                    }
                    ("", id) => Identity::Member(id),
                    _ => {
                        return Err(ApiError::BadRequest(
                            "a join names a node or a member id, not both".into(),
                        ));
                    }
                };
                let use_ = TokenUse {
                    id: token.id.clone(),
                    secret_hash: token.secret_hash(),
                };
                // Check the token before signing anything or writing to the log: an
                // unauthenticated caller must not cost a signature and a Raft entry. The
                // state machine checks again, atomically with spending it.
                self.ctx.node.linearize().await?;
                {
                    let st = self.ctx.node.state();
                    let refuse = |message: String| {
                        ApiError::Apply(crate::state::ApplyError::Pki { message })
                    };
                    let t = st
                        .state
                        .pki()
                        .tokens
                        .get(&use_.id)
                        .ok_or_else(|| refuse("unknown join token".into()))?;
                    if t.secret_hash != use_.secret_hash {
                        return Err(refuse("the join token's secret does not match".into()));
                    }
                    t.usable(now_unix()).map_err(refuse)?;
                }
                self.issue(
                    &req.csr_pem,
                    &identity,
                    &req.addresses,
                    self.cert_ttl,
                    Some(use_),
                )
                .await
            })
            .await
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let peer = peer_of(&req).cloned();
        let req = req.into_inner();
        self.ctx
            .track("Renew", async {
                let peer = peer.ok_or_else(|| ApiError::BadRequest("no certificate".into()))?;
                match peer.identity {
                    Identity::User { .. } => {
                        return Err(ApiError::BadRequest(
                            "user credentials are renewed with `skiff credentials create`".into(),
                        ));
                    }
                    Identity::Workload { .. } => {
                        return Err(ApiError::BadRequest(
                            "workload certificates are renewed by their node (SignWorkload)".into(),
                        ));
                    }
                    Identity::Member(_) | Identity::Node(_) => {}
                }
                self.issue(
                    &req.csr_pem,
                    &peer.identity,
                    &req.addresses,
                    self.cert_ttl,
                    None,
                )
                .await
            })
            .await
    }

    async fn sign_workload(
        &self,
        req: Request<pb::SignWorkloadRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let peer = peer_of(&req).cloned();
        let req = req.into_inner();
        self.ctx
            .track("SignWorkload", async {
                // Only a node, and only for an allocation the state assigns to it: a node
                // cannot mint another node's services' identities.
                let node = match peer.map(|p| p.identity) {
                    Some(Identity::Node(name)) => name,
                    Some(other) => {
                        return Err(ApiError::Forbidden(format!(
                            "{other} is not a node: only a node signs for its allocations"
                        )));
                    }
                    None => return Err(ApiError::BadRequest("no certificate".into())),
                };
                self.ctx.node.linearize().await?;
                let ttl = ttl_of(
                    req.ttl_seconds,
                    WORKLOAD_TTL,
                    WORKLOAD_TTL,
                    "a workload certificate's",
                )?;
                let identity = {
                    let st = self.ctx.node.state();
                    let alloc = st.state.allocation(&req.allocation).ok_or_else(|| {
                        ApiError::Apply(crate::state::ApplyError::AllocationNotFound {
                            id: req.allocation.clone(),
                        })
                    })?;
                    if alloc.node != node || alloc.desired != crate::state::DesiredStatus::Run {
                        return Err(ApiError::Forbidden(format!(
                            "allocation {} is not assigned to node {node}",
                            req.allocation
                        )));
                    }
                    let service = st
                        .state
                        .job(&alloc.namespace, &alloc.job)
                        .and_then(|j| j.version(alloc.job_version))
                        .and_then(|v| v.spec.workload_name().map(str::to_owned))
                        .ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "allocation {} belongs to job {}/{}, which publishes no \
                                 service and is not in the mesh: it has no workload identity",
                                req.allocation, alloc.namespace, alloc.job
                            ))
                        })?;
                    Identity::Workload {
                        namespace: alloc.namespace.clone(),
                        service,
                    }
                };
                // The service's DNS name too: a caller's TLS checks the name it dialled (the
                // identity, in the URI, is what authorizes).
                let Identity::Workload { namespace, service } = &identity else {
                    return Err(ApiError::BadRequest("not a workload".into()));
                };
                let dns = format!("{service}.{namespace}.skiff.internal");
                self.issue(&req.csr_pem, &identity, &[dns], ttl, None).await
            })
            .await
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("CreateToken", async {
                let role = match req.role.as_str() {
                    "agent" => JoinRole::Agent,
                    "controller" => JoinRole::Controller,
                    r => {
                        return Err(ApiError::BadRequest(format!(
                            "role {r:?}: expected agent or controller"
                        )));
                    }
                };
                let ttl = ttl_of(req.ttl_seconds, TOKEN_TTL, MAX_TOKEN_TTL, "a token's")?;
                let (ca, _) = self.active()?;
                let hash = ca
                    .key
                    .hash()
                    .map_err(|e| ApiError::NotReady(e.to_string()))?;
                let token = JoinToken::generate(&hash);
                let now = now_unix();
                let record = TokenRecord {
                    role,
                    secret_hash: token.secret_hash(),
                    created_at: now,
                    expires_at: now + ttl.as_secs() as i64,
                    uses: req.uses,
                    used: 0,
                    revoked: false,
                };
                let expires_at = record.expires_at;
                self.write(PkiOp::CreateToken {
                    id: token.id.clone(),
                    record,
                })
                .await?;
                Ok(pb::CreateTokenResponse {
                    token: token.to_string(),
                    id: token.id,
                    expires_at,
                })
            })
            .await
    }

    async fn list_tokens(
        &self,
        _req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.ctx
            .track("ListTokens", async {
                self.ctx.node.linearize().await?;
                let st = self.ctx.node.state();
                let tokens = st
                    .state
                    .pki()
                    .tokens
                    .iter()
                    .map(|(id, t)| pb::TokenInfo {
                        id: id.clone(),
                        role: t.role.as_str().into(),
                        created_at: t.created_at,
                        expires_at: t.expires_at,
                        uses: t.uses,
                        used: t.used,
                        revoked: t.revoked,
                    })
                    .collect();
                Ok(pb::ListTokensResponse { tokens })
            })
            .await
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let id = req.into_inner().id;
        self.ctx
            .track("RevokeToken", async {
                self.write(PkiOp::RevokeToken { id }).await?;
                Ok(pb::RevokeTokenResponse {})
            })
            .await
    }

    async fn create_credentials(
        &self,
        req: Request<pb::CreateCredentialsRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("CreateCredentials", async {
                let role: Role = req
                    .role
                    .parse()
                    .map_err(|e: skiff_tls::TlsError| ApiError::BadRequest(e.to_string()))?;
                skiff_tls::identity::check_name("user", &req.name)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                let ttl = ttl_of(req.ttl_seconds, USER_TTL, MAX_USER_TTL, "a credential's")?;
                let id = Identity::User {
                    role,
                    name: req.name.clone(),
                };
                self.issue(&req.csr_pem, &id, &[], ttl, None).await
            })
            .await
    }

    async fn list_certificates(
        &self,
        _req: Request<pb::ListCertificatesRequest>,
    ) -> Result<Response<pb::ListCertificatesResponse>, Status> {
        self.ctx
            .track("ListCertificates", async {
                self.ctx.node.linearize().await?;
                let st = self.ctx.node.state();
                let pki = st.state.pki();
                let ca_name = |subject: &str| {
                    pki.cas
                        .iter()
                        .position(|c| c.subject == subject)
                        .map(|i| {
                            if i + 1 == pki.cas.len() {
                                "active".to_string()
                            } else {
                                "old".to_string()
                            }
                        })
                        .unwrap_or_else(|| "retired".into())
                };
                let certificates = pki
                    .certs
                    .iter()
                    .map(|(serial, r)| pb::CertificateInfo {
                        serial: serial.clone(),
                        identity: Identity::from_uri(&r.identity)
                            .map(|i| i.describe())
                            .unwrap_or_else(|_| r.identity.clone()),
                        issued_at: r.issued_at,
                        not_after: r.not_after,
                        revoked: r.revoked,
                        ca: ca_name(&r.ca),
                    })
                    .collect();
                Ok(pb::ListCertificatesResponse {
                    certificates,
                    ca_pem: pki.cas.iter().map(|c| c.key.cert_pem.clone()).collect(),
                })
            })
            .await
    }

    async fn revoke_certificate(
        &self,
        req: Request<pb::RevokeCertificateRequest>,
    ) -> Result<Response<pb::RevokeCertificateResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("RevokeCertificate", async {
                let op = match (req.serial.as_str(), req.identity.as_str()) {
                    ("", "") => {
                        return Err(ApiError::BadRequest(
                            "name a serial or an identity to revoke".into(),
                        ));
                    }
                    (serial, "") => PkiOp::Revoke {
                        serials: vec![serial.to_lowercase()],
                        identity: None,
                    },
                    ("", identity) => PkiOp::Revoke {
                        serials: vec![],
                        identity: Some(parse_identity(identity)?.uri()),
                    },
                    _ => {
                        return Err(ApiError::BadRequest(
                            "name a serial or an identity, not both".into(),
                        ));
                    }
                };
                let serials = self.write(op).await?;
                tracing::info!(count = serials.len(), "certificates revoked");
                Ok(pb::RevokeCertificateResponse { serials })
            })
            .await
    }

    async fn rotate_ca(
        &self,
        _req: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::RotateCaResponse>, Status> {
        self.ctx
            .track("RotateCa", async {
                let ca = CaKey::generate(&format!("skiff cluster CA {}", now_unix()))
                    .map_err(|e| ApiError::NotReady(e.to_string()))?;
                let subject =
                    subject_hash(&ca.cert_pem).map_err(|e| ApiError::NotReady(e.to_string()))?;
                let (old, _) = self.active()?;
                let cross = old
                    .key
                    .cross_sign(&ca)
                    .map_err(|e| ApiError::NotReady(e.to_string()))?;
                let pem = ca.cert_pem.clone();
                self.write(PkiOp::RotateCa {
                    ca: CaEntry {
                        key: ca,
                        subject,
                        cross_pem: Some(cross),
                    },
                })
                .await?;
                tracing::info!("CA rotation started: a new CA issues from now on");
                Ok(pb::RotateCaResponse { ca_pem: pem })
            })
            .await
    }

    async fn retire_ca(
        &self,
        req: Request<pb::RetireCaRequest>,
    ) -> Result<Response<pb::RotateCaResponse>, Status> {
        let force = req.into_inner().force;
        self.ctx
            .track("RetireCa", async {
                self.write(PkiOp::RetireCa {
                    force,
                    at: now_unix(),
                })
                .await?;
                let (ca, _) = self.active()?;
                Ok(pb::RotateCaResponse {
                    ca_pem: ca.key.cert_pem,
                })
            })
            .await
    }
}
