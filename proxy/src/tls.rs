//! The proxy's TLS: its workload certificate as a server (inbound, client certificates
//! required and chained to the cluster CA) and as a client (outbound, the server's
//! certificate chained to the cluster CA, valid for the service's DNS name, and carrying
//! exactly the identity of the service the connection was meant for).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use skiff_tls::Identity;
use skiff_tls::context::tls13_provider;
use skiff_tls::pki::{CertInfo, certs, parse_cert};

use crate::ProxyError;
use crate::config::ServiceRef;

/// The TLS state built from one set of certificate files.
pub struct TlsState {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// The proxy's own certificate.
    pub info: CertInfo,
}

fn tls_err(what: &str) -> impl FnOnce(rustls::Error) -> ProxyError + '_ {
    move |e| ProxyError::Tls(format!("{what}: {e}"))
}

/// The workload a certificate speaks for, if it is a workload certificate.
pub fn workload_of(cert: &CertificateDer<'_>) -> Result<ServiceRef, String> {
    let info = parse_cert(cert.as_ref()).map_err(|e| e.to_string())?;
    match info.identity {
        Identity::Workload { namespace, service } => Ok(ServiceRef {
            namespace,
            name: service,
        }),
        other => Err(format!("{other} is not a workload")),
    }
}

impl TlsState {
    /// Builds both configs from PEM texts; `expected` is the identity the certificate must
    /// carry (a certificate for another workload is refused, not served).
    pub fn build(
        cert_pem: &str,
        key_pem: &str,
        ca_pem: &str,
        expected: &ServiceRef,
    ) -> Result<TlsState, ProxyError> {
        let provider = tls13_provider();
        let bad = |e: skiff_tls::TlsError| ProxyError::Tls(e.to_string());
        let chain = certs(cert_pem).map_err(bad)?;
        let leaf = chain
            .first()
            .ok_or_else(|| ProxyError::Tls("no certificate in cert.pem".into()))?;
        let info = parse_cert(leaf.as_ref()).map_err(bad)?;
        let own = workload_of(leaf).map_err(ProxyError::Tls)?;
        if &own != expected {
            return Err(ProxyError::Tls(format!(
                "the certificate is for {own}, this proxy speaks for {expected}"
            )));
        }
        let roots = Arc::new(
            skiff_tls::context::roots_of(ca_pem)
                .map_err(|e| ProxyError::Tls(format!("ca.pem: {e}")))?,
        );
        let key = || {
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| ProxyError::Tls(format!("key.pem: {e}")))
        };
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| ProxyError::Tls(format!("client verifier: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err("server config"))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key()?)
            .map_err(tls_err("server certificate"))?;
        // A resumed session skips the certificate checks: every connection does a full one.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| ProxyError::Tls(format!("server verifier: {e}")))?;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err("client config"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(WorkloadVerifier { inner }))
            .with_client_auth_cert(chain, key()?)
            .map_err(tls_err("client certificate"))?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsState {
            server: Arc::new(server),
            client: Arc::new(client),
            info,
        })
    }
}

/// The service a mesh DNS name (`name.namespace.skiff.internal`) stands for.
fn service_of_name(name: &ServerName<'_>) -> Option<ServiceRef> {
    let ServerName::DnsName(d) = name else {
        return None;
    };
    let rest = d.as_ref().strip_suffix(".skiff.internal")?;
    let (svc, ns) = rest.split_once('.')?;
    (!ns.contains('.')).then(|| ServiceRef {
        namespace: ns.to_owned(),
        name: svc.to_owned(),
    })
}

/// webpki's chain and name checks, then the identity: the peer must carry the URI SAN of
/// exactly the service that was dialled.
#[derive(Debug)]
struct WorkloadVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for WorkloadVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let meant = service_of_name(server_name).ok_or_else(|| {
            rustls::Error::General(format!("{server_name:?} is not a mesh service name"))
        })?;
        let ok =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let peer = workload_of(end_entity).map_err(rustls::Error::General)?;
        if peer != meant {
            return Err(rustls::Error::General(format!(
                "the peer is {peer}, not {meant}"
            )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mesh_names_name_a_service() {
        let n = |s: &str| ServerName::try_from(s.to_owned()).expect("name");
        assert_eq!(
            service_of_name(&n("api.prod.skiff.internal")),
            Some(ServiceRef {
                namespace: "prod".into(),
                name: "api".into()
            })
        );
        assert_eq!(service_of_name(&n("api.skiff.internal")), None);
        assert_eq!(service_of_name(&n("a.b.c.skiff.internal")), None);
        assert_eq!(service_of_name(&n("api.prod.example.com")), None);
    }
}
