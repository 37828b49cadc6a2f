//! A user's credentials file (TOML, mode 0600): the controllers to talk to, the cluster CA,
//! the user's certificate and key.
//!
//! ```toml
//! controllers = ["10.0.0.1:7700"]
//! name = "admin"
//! role = "admin"
//! ca = "-----BEGIN CERTIFICATE-----..."
//! cert = "-----BEGIN CERTIFICATE-----..."
//! key = "-----BEGIN PRIVATE KEY-----..."
//! ```

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::TlsError;
use crate::context::tls13_provider;
use crate::pki::{Material, certs, write_private};

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// gRPC addresses of controller members.
    #[serde(default)]
    pub controllers: Vec<String>,
    pub name: String,
    pub role: String,
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("controllers", &self.controllers)
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Credentials made of a member's or node's material (tests, benchmarks, tools run on
    /// that host).
    pub fn of(name: &str, role: &str, m: &Material) -> Credentials {
        Credentials {
            controllers: vec![],
            name: name.into(),
            role: role.into(),
            ca: m.ca_pem.clone(),
            cert: m.cert_pem.clone(),
            key: m.key_pem.clone(),
        }
    }

    pub fn load(path: &Path) -> Result<Credentials, TlsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TlsError::Io(format!("reading credentials {}: {e}", path.display())))?;
        let c: Credentials = toml::from_str(&text).map_err(|e| {
            TlsError::Invalid(format!("credentials {}: {}", path.display(), e.message()))
        })?;
        c.material().info()?;
        Ok(c)
    }

    pub fn store(&self, path: &Path) -> Result<(), TlsError> {
        let text =
            toml::to_string(self).map_err(|e| TlsError::Invalid(format!("credentials: {e}")))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| TlsError::Io(format!("creating {}: {e}", dir.display())))?;
        }
        write_private(path, &text)
    }

    pub fn material(&self) -> Material {
        Material {
            ca_pem: self.ca.clone(),
            cert_pem: self.cert.clone(),
            key_pem: self.key.clone(),
        }
    }

    /// A TLS 1.3 client config with this certificate, trusting the cluster CA.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(&self.ca)? {
            roots
                .add(c)
                .map_err(|e| TlsError::Invalid(format!("CA certificate: {e}")))?;
        }
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes())
            .map_err(|e| TlsError::Invalid(format!("private key: {e}")))?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(tls13_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs(&self.cert)?, key)
            .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}
