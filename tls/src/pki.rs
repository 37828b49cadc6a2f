//! The cluster CA and certificates: generation, issuing from a CSR by the CA's own policy
//! (nothing but the public key is taken from a request), parsing what a peer presents, and
//! the material a member, node or user keeps on disk.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::TlsError;
use crate::identity::Identity;
use crate::token::hex;

fn pki_err(what: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
    move |e| TlsError::Pki(format!("{what}: {e}"))
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    // Positive, and no leading zero byte DER would strip: the bytes we record are the bytes
    // a parser reads back.
    b[0] = (b[0] & 0x7f).max(1);
    SerialNumber::from(b.to_vec())
}

/// SHA-256 of a certificate's DER, hex: what a join token pins.
pub fn cert_hash(pem: &str) -> Result<String, TlsError> {
    let der = first_cert(pem)?;
    Ok(hex(&Sha256::digest(der.as_ref())))
}

/// The first certificate of a PEM text.
pub fn first_cert(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    certs(pem)?
        .into_iter()
        .next()
        .ok_or_else(|| TlsError::Invalid("no certificate in the PEM text".into()))
}

/// All certificates of a PEM text.
pub fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("certificate PEM: {e}")))
}

/// A CA certificate and its private key. Debug never shows the key.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate the CA issued: what the replicated state records of it.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    /// Serial, lowercase hex.
    pub serial: String,
    pub not_after: i64,
}

impl CaKey {
    /// A new P-256 CA valid for ten years.
    pub fn generate(name: &str) -> Result<CaKey, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(pki_err("generating the CA key"))?;
        let now = OffsetDateTime::now_utc();
        let p = ca_params(
            name,
            now - time::Duration::hours(1),
            now + time::Duration::days(3650),
        );
        let cert = p.self_signed(&key).map_err(pki_err("signing the CA"))?;
        Ok(CaKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// `other`'s CA certificate signed by this CA: during a rotation, servers whose
    /// certificate the new CA issued present it so that clients trusting only the old CA
    /// still verify them.
    pub fn cross_sign(&self, other: &CaKey) -> Result<String, TlsError> {
        let der = first_cert(&other.cert_pem)?;
        let (_, x) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| TlsError::Invalid(format!("the new CA: {e}")))?;
        let name = x
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .ok_or_else(|| TlsError::Invalid("the new CA has no common name".into()))?;
        let at = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map_err(|_| TlsError::Invalid("CA validity out of range".into()))
        };
        let params = ca_params(
            name,
            at(x.validity().not_before.timestamp())?,
            at(x.validity().not_after.timestamp())?,
        );
        let other_key = KeyPair::from_pem(&other.key_pem).map_err(pki_err("the new CA key"))?;
        let key = KeyPair::from_pem(&self.key_pem).map_err(pki_err("the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &key).map_err(pki_err("the CA"))?;
        Ok(params
            .signed_by(&other_key, &issuer)
            .map_err(pki_err("cross-signing"))?
            .pem())
    }

    /// SHA-256 of the CA certificate (what tokens pin).
    pub fn hash(&self) -> Result<String, TlsError> {
        cert_hash(&self.cert_pem)
    }

    /// Issues a certificate for `identity` to the key of `csr_pem`. Members and nodes get
    /// server and client use and `sans` (IP addresses or DNS names); users client use only.
    pub fn issue(
        &self,
        csr_pem: &str,
        identity: &Identity,
        sans: &[String],
        ttl: Duration,
    ) -> Result<Issued, TlsError> {
        let ttl = i64::try_from(ttl.as_secs())
            .map_err(|_| TlsError::Invalid("certificate lifetime too long".into()))?;
        let now = now_unix();
        // Valid a little early, for clocks that are behind: five minutes, or a tenth of a
        // short life (renewal is due at two thirds of the whole span).
        let early = (ttl / 10).min(300);
        self.issue_between(csr_pem, identity, sans, now - early, now + ttl)
    }

    /// As [`CaKey::issue`], valid from `not_before` to `not_after` (Unix seconds).
    pub fn issue_between(
        &self,
        csr_pem: &str,
        identity: &Identity,
        sans: &[String],
        not_before: i64,
        not_after: i64,
    ) -> Result<Issued, TlsError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| TlsError::Invalid(format!("certificate request: {e}")))?;
        let key = KeyPair::from_pem(&self.key_pem).map_err(pki_err("the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &key).map_err(pki_err("the CA"))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, identity.describe());
        p.distinguished_name.push(DnType::OrganizationName, "skiff");
        let uri = identity
            .uri()
            .try_into()
            .map_err(pki_err("the identity URI"))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        let server = !matches!(identity, Identity::User { .. });
        if server {
            for san in sans {
                p.subject_alt_names.push(san_of(san)?);
            }
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if server {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        let at = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map_err(|_| TlsError::Invalid("certificate validity out of range".into()))
        };
        p.not_before = at(not_before)?;
        p.not_after = at(not_after)?;
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        p.key_identifier_method = KeyIdMethod::Sha256;
        let cert = p
            .signed_by(&csr.public_key, &issuer)
            .map_err(pki_err("signing"))?;
        let parsed = parse_cert(cert.der())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: parsed.serial,
            not_after: parsed.not_after,
        })
    }
}

/// A CA's certificate: the same subject and key identifier for a self-signed and a
/// cross-signed certificate of one CA.
fn ca_params(
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name.push(DnType::OrganizationName, "skiff");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = not_before;
    p.not_after = not_after;
    p.serial_number = Some(random_serial());
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

/// An IP address or a DNS name as a SAN.
fn san_of(s: &str) -> Result<SanType, TlsError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
        });
    if !ok {
        return Err(TlsError::Invalid(format!(
            "certificate name {s:?} is neither an IP address nor a DNS name"
        )));
    }
    Ok(SanType::DnsName(
        s.to_string().try_into().map_err(pki_err("a DNS name"))?,
    ))
}

/// A new P-256 key and a certificate request for it. The key never leaves the caller.
pub fn key_and_csr(common_name: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(pki_err("generating a key"))?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(pki_err("a request"))?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, common_name);
    let csr = p
        .serialize_request(&key)
        .map_err(pki_err("a request"))?
        .pem()
        .map_err(pki_err("a request"))?;
    Ok((key.serialize_pem(), csr))
}

/// What Skiff reads from a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    /// Serial, lowercase hex.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the issuer's subject (to tell which CA issued it).
    pub issuer: String,
    /// The DNS and IP names it is valid for.
    pub names: Vec<String>,
}

/// Parses a cluster certificate: exactly one Skiff identity URI SAN.
pub fn parse_cert(der: &[u8]) -> Result<CertInfo, TlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, x) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::Invalid(format!("certificate: {e}")))?;
    let mut uris = Vec::new();
    let mut names = Vec::new();
    if let Some(san) = x
        .subject_alternative_name()
        .map_err(|e| TlsError::Invalid(format!("certificate names: {e}")))?
    {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push((*u).to_string()),
                GeneralName::DNSName(d) => names.push((*d).to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(
                        IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()).to_string(),
                    ),
                    16 => names.push(
                        IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()).to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(TlsError::Invalid(format!(
            "certificate carries {} identity URIs, expected one",
            uris.len()
        )));
    };
    Ok(CertInfo {
        identity: Identity::from_uri(uri)?,
        serial: hex(x.raw_serial()),
        not_before: x.validity().not_before.timestamp(),
        not_after: x.validity().not_after.timestamp(),
        issuer: hex(&Sha256::digest(x.issuer().as_raw())),
        names,
    })
}

/// The subject hash of a CA certificate (compare with [`CertInfo::issuer`]).
pub fn subject_hash(ca_pem: &str) -> Result<String, TlsError> {
    let der = first_cert(ca_pem)?;
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| TlsError::Invalid(format!("certificate: {e}")))?;
    Ok(hex(&Sha256::digest(x.subject().as_raw())))
}

/// What a member, node or user holds: the cluster's trusted CA certificates, its own
/// certificate and its key. Debug never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// One or more CA certificates (two during a CA rotation).
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl CertInfo {
    /// Whether it is time to renew: two thirds of its validity have passed, or
    /// `active_ca_subject` is not the CA that issued it.
    pub fn wants_renewal(&self, now: i64, active_ca_subject: Option<&str>) -> bool {
        let life = (self.not_after - self.not_before).max(1);
        now >= self.not_before + life * 2 / 3 || active_ca_subject.is_some_and(|a| a != self.issuer)
    }
}

impl Material {
    /// This material's own certificate, parsed.
    pub fn info(&self) -> Result<CertInfo, TlsError> {
        parse_cert(first_cert(&self.cert_pem)?.as_ref())
    }

    /// Reads `ca.pem`, `cert.pem` and `key.pem` from `dir`; `None` when there are none yet.
    pub fn load(dir: &Path) -> Result<Option<Material>, TlsError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| TlsError::Io(format!("reading {}: {e}", dir.join(name).display())))
        };
        if !dir.join("cert.pem").exists() {
            return Ok(None);
        }
        let m = Material {
            ca_pem: read("ca.pem")?,
            cert_pem: read("cert.pem")?,
            key_pem: read("key.pem")?,
        };
        m.info()?;
        Ok(Some(m))
    }

    /// Writes the three files (mode 0600, each replaced atomically) into `dir`.
    pub fn store(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| TlsError::Io(format!("creating {}: {e}", dir.display())))?;
        for (name, text) in [
            ("ca.pem", &self.ca_pem),
            ("key.pem", &self.key_pem),
            ("cert.pem", &self.cert_pem),
        ] {
            write_private(&dir.join(name), text)?;
        }
        Ok(())
    }
}

/// Writes `text` to `path` with mode 0600, through a temporary file and a rename.
pub fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let io = |e: std::io::Error| TlsError::Io(format!("writing {}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    #[test]
    fn issues_what_the_policy_says_not_what_the_request_asks() {
        let ca = CaKey::generate("test CA").expect("ca");
        let (_key, csr) = key_and_csr("anything").expect("csr");
        let node = Identity::Node("n1".into());
        let issued = ca
            .issue(
                &csr,
                &node,
                &["10.0.0.1".into(), "n1.local".into()],
                Duration::from_secs(3600),
            )
            .expect("issue");
        let info = parse_cert(first_cert(&issued.cert_pem).expect("pem").as_ref()).expect("parse");
        assert_eq!(info.identity, node);
        assert_eq!(info.serial, issued.serial);
        assert!(info.names.contains(&"10.0.0.1".to_string()));
        assert_eq!(info.issuer, subject_hash(&ca.cert_pem).expect("subject"));
        let user = Identity::User {
            role: Role::Reader,
            name: "r".into(),
        };
        let u = ca
            .issue(&csr, &user, &["10.0.0.1".into()], Duration::from_secs(60))
            .expect("user");
        let info = parse_cert(first_cert(&u.cert_pem).expect("pem").as_ref()).expect("parse");
        assert!(info.names.is_empty(), "users get no server names");
        assert_ne!(u.serial, issued.serial);
        assert!(
            ca.issue("garbage", &node, &[], Duration::from_secs(1))
                .is_err()
        );
        assert!(
            ca.issue(&csr, &node, &["bad name!".into()], Duration::from_secs(1))
                .is_err()
        );
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }
}

#[cfg(test)]
mod renewal_tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_life_also_for_short_ones() {
        let ca = CaKey::generate("t").expect("ca");
        for ttl in [60u64, 3600, 7 * 86_400] {
            let (_k, csr) = key_and_csr("n").expect("csr");
            let issued = ca
                .issue(
                    &csr,
                    &Identity::Node("n".into()),
                    &[],
                    Duration::from_secs(ttl),
                )
                .expect("issue");
            let info =
                parse_cert(first_cert(&issued.cert_pem).expect("pem").as_ref()).expect("info");
            let now = now_unix();
            assert!(
                !info.wants_renewal(now, Some(&info.issuer)),
                "ttl {ttl}: due at once"
            );
            let due = now + (ttl as i64) * 2 / 3 + 1;
            assert!(
                info.wants_renewal(due, Some(&info.issuer)),
                "ttl {ttl}: not due at 2/3"
            );
            assert!(
                info.wants_renewal(now, Some("another CA")),
                "a rotation makes it due"
            );
        }
    }
}
