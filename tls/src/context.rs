//! The live TLS state of one process: its own certificate and key, the CA certificates it
//! trusts and the serials the cluster has revoked. Every new handshake reads the current
//! configs, so a renewed certificate, a new CA or a revocation applies to the next
//! connection without a restart; the authorization layer checks revocation and expiry on
//! every call, so it applies to open connections too.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme, SupportedCipherSuite,
};
use sha2::{Digest, Sha256};

use crate::TlsError;
use crate::pki::{CertInfo, Material, certs, parse_cert, subject_hash};
use crate::token::hex;

/// The ALPN protocol a joiner (no certificate yet) offers; the server then lets it in
/// without a client certificate, for the enrollment call only.
pub const JOIN_ALPN: &[u8] = b"skiff-join";
/// The ALPN protocol of the controller members' own Raft transport (framed messages over
/// mutual TLS, see `controller/src/raft/wire.rs`). Only a listener that serves it offers it; a
/// client that asks elsewhere (or a member of an older release) is refused the handshake and
/// falls back to gRPC.
pub const RAFT_ALPN: &[u8] = b"skiff-raft/1";

fn cfg_err(what: &str) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
    move |e| TlsError::Config(format!("{what}: {e}"))
}

/// ring, TLS 1.3 suites only.
pub fn tls13_provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .retain(|s| matches!(s, SupportedCipherSuite::Tls13(_)));
    Arc::new(p)
}

/// Serials the cluster revoked (lowercase hex).
pub type Revoked = Arc<RwLock<HashSet<String>>>;

struct Built {
    material: Material,
    info: CertInfo,
    server: Arc<ServerConfig>,
    join: Arc<ServerConfig>,
    raft_server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    raft_client: Arc<ClientConfig>,
}

/// See the module docs.
pub struct TlsContext {
    provider: Arc<CryptoProvider>,
    revoked: Revoked,
    built: RwLock<Arc<Built>>,
    /// Bumped by every [`TlsContext::update`]: a client holding connections made with an
    /// older certificate makes new ones (a server refuses calls on a connection whose
    /// certificate has expired).
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("identity", &self.info().identity)
            .finish()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

impl TlsContext {
    pub fn new(material: Material) -> Result<Arc<TlsContext>, TlsError> {
        let provider = tls13_provider();
        let revoked = Revoked::default();
        let built = build(&provider, &revoked, material)?;
        Ok(Arc::new(TlsContext {
            provider,
            revoked,
            built: RwLock::new(Arc::new(built)),
            generation: Default::default(),
        }))
    }

    /// Replaces the certificate, key and trusted CAs (renewal, CA rotation).
    pub fn update(&self, material: Material) -> Result<(), TlsError> {
        if read(&self.built).material == material {
            return Ok(());
        }
        let built = build(&self.provider, &self.revoked, material)?;
        *self.built.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(built);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// See the field's docs.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Replaces the set of revoked serials.
    pub fn set_revoked(&self, serials: impl IntoIterator<Item = String>) {
        *self.revoked.write().unwrap_or_else(|e| e.into_inner()) = serials.into_iter().collect();
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        read(&self.revoked).contains(serial)
    }

    pub fn material(&self) -> Material {
        read(&self.built).material.clone()
    }

    /// This process's own certificate.
    pub fn info(&self) -> CertInfo {
        read(&self.built).info.clone()
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        read(&self.built).server.clone()
    }

    pub fn join_config(&self) -> Arc<ServerConfig> {
        read(&self.built).join.clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        read(&self.built).client.clone()
    }

    /// The server config for a client that asks for [`RAFT_ALPN`].
    pub fn raft_server_config(&self) -> Arc<ServerConfig> {
        read(&self.built).raft_server.clone()
    }

    /// The client config of the Raft transport: this member's certificate, [`RAFT_ALPN`].
    pub fn raft_client_config(&self) -> Arc<ClientConfig> {
        read(&self.built).raft_client.clone()
    }
}

/// The trust store of a PEM bundle of CA certificates (at least one).
pub fn roots_of(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c).map_err(cfg_err("a CA certificate"))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Invalid("no CA certificate".into()));
    }
    Ok(roots)
}

fn build(
    provider: &Arc<CryptoProvider>,
    revoked: &Revoked,
    material: Material,
) -> Result<Built, TlsError> {
    let info = material.info()?;
    let roots = Arc::new(roots_of(&material.ca_pem)?);
    let leaf = certs(&material.cert_pem)?;
    // The chain a server presents: its certificate and the CA that issued it, so a joiner can
    // compare the CA against its token's pin.
    let mut chain = leaf.clone();
    for ca in pem_blocks(&material.ca_pem) {
        if subject_hash(&ca)? == info.issuer {
            chain.extend(certs(&ca)?);
        }
    }
    let key = || {
        PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes())
            .map_err(|e| TlsError::Invalid(format!("private key: {e}")))
    };
    let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let verifier = Arc::new(ClientVerifier {
        inner,
        revoked: revoked.clone(),
    });
    let server_cfg = |verifier: Arc<dyn ClientCertVerifier>, alpn: &[u8]| {
        let mut cfg = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err("server config"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key()?)
            .map_err(cfg_err("server certificate"))?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        // Resumption would skip the client certificate check (and with it revocation).
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok::<_, TlsError>(Arc::new(cfg))
    };
    let server = server_cfg(verifier.clone(), b"h2")?;
    let raft_server = server_cfg(verifier, RAFT_ALPN)?;
    let join = server_cfg(WebPkiClientVerifier::no_client_auth(), JOIN_ALPN)?;
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err("client config"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(leaf, key()?)
        .map_err(cfg_err("client certificate"))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    let mut raft_client = client.clone();
    raft_client.alpn_protocols = vec![RAFT_ALPN.to_vec()];
    Ok(Built {
        material,
        info,
        server,
        join,
        raft_server,
        client: Arc::new(client),
        raft_client: Arc::new(raft_client),
    })
}

/// Splits a PEM bundle into one PEM text per certificate.
pub fn pem_blocks(pem: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in pem.lines() {
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

/// webpki's client verification, then the cluster's revocation list.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Revoked,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let info = parse_cert(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if read(&self.revoked).contains(&info.serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A joiner's view of the server: trusted only if a certificate in the chain it presents
/// hashes to the token's pin and that CA issued the server's certificate for the address
/// dialled. Nothing is sent before this check passes.
#[derive(Debug)]
pub(crate) struct PinnedVerifier {
    pub(crate) pin: String,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex(&Sha256::digest(c.as_ref())) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's CA does not match the join token's pin: refusing to talk to it"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        v.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client config of a joiner: no certificate, the CA pinned by hash, the join ALPN.
pub fn join_client_config(pin: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = tls13_provider();
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err("client config"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
            pin: pin.to_string(),
            provider,
        }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![JOIN_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

impl TlsContext {
    /// A context whose certificate comes from a throwaway CA of its own, for tests and
    /// benchmarks that need a process's TLS state but no cluster.
    pub fn ephemeral(identity: &crate::Identity) -> Result<Arc<TlsContext>, TlsError> {
        let ca = crate::CaKey::generate("ephemeral CA")?;
        let (key_pem, csr) = crate::pki::key_and_csr("ephemeral")?;
        let issued = ca.issue(
            &csr,
            identity,
            &["127.0.0.1".into(), "localhost".into()],
            std::time::Duration::from_secs(86_400),
        )?;
        TlsContext::new(Material {
            ca_pem: ca.cert_pem,
            cert_pem: issued.cert_pem,
            key_pem,
        })
    }
}
