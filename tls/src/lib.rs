//! Skiff's cluster PKI and mutual TLS.
//!
//! Every gRPC connection in a cluster is TLS 1.3 with a client certificate from the cluster
//! CA. A certificate names one [`Identity`] (a controller member, a node, a user with a
//! [`Role`]) in a `spiffe://skiff/...` URI; servers authorize each call by it
//! ([`authz`]). Joiners (new members, new nodes) enroll with a [`JoinToken`] that pins the
//! CA by hash: they verify the server against the pin before sending anything, generate
//! their key locally and send only a certificate request.

#![forbid(unsafe_code)]

pub mod authz;
pub mod context;
pub mod creds;
pub mod enroll;
pub mod identity;
pub mod net;
pub mod pki;
pub mod token;

pub use authz::{AuthzLayer, Peer, peer_of};
pub use context::TlsContext;
pub use creds::Credentials;
pub use identity::{Identity, Need, Role};
pub use pki::{CaKey, CertInfo, Material};
pub use rustls;
pub use token::JoinToken;

/// What went wrong with a certificate, a key, a token or a TLS config.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Bad input: a malformed token, certificate, request or name.
    #[error("{0}")]
    Invalid(String),
    /// Generating or signing failed.
    #[error("PKI: {0}")]
    Pki(String),
    #[error("TLS config: {0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
}
