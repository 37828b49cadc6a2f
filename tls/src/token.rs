//! Join tokens: `SK10<sha256 of the CA certificate, hex>::<id>.<secret>`, after k3s's
//! `K10<ca-hash>::` tokens. The pin lets a joiner check the cluster's CA before it sends
//! anything; the id names the token in the replicated state, which keeps only a hash of the
//! secret.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::TlsError;

const PREFIX: &str = "SK10";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the CA certificate's DER, lowercase hex.
    pub ca_hash: String,
    /// 16 hex digits.
    pub id: String,
    /// 32 hex digits.
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_hash", &self.ca_hash)
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}::{}.{}", self.ca_hash, self.id, self.secret)
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl JoinToken {
    /// A new token pinning the CA whose hash is `ca_hash`.
    pub fn generate(ca_hash: &str) -> JoinToken {
        JoinToken {
            ca_hash: ca_hash.to_string(),
            id: random_hex(8),
            secret: random_hex(16),
        }
    }

    /// What the replicated state keeps: SHA-256 of the secret, hex.
    pub fn secret_hash(&self) -> String {
        hex(&Sha256::digest(self.secret.as_bytes()))
    }
}

impl FromStr for JoinToken {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        let bad = |why: &str| {
            TlsError::Invalid(format!(
                "join token: {why} (expected {PREFIX}<64 hex digits>::<16 hex digits>.<32 hex digits>, as `skiff token create` prints)"
            ))
        };
        let s = s.trim();
        let rest = s.strip_prefix(PREFIX).ok_or_else(|| bad("wrong prefix"))?;
        let (hash, cred) = rest.split_once("::").ok_or_else(|| bad("no '::'"))?;
        let (id, secret) = cred.split_once('.').ok_or_else(|| bad("no '.'"))?;
        if !is_hex(hash, 64) {
            return Err(bad("the CA hash is not 64 lowercase hex digits"));
        }
        if !is_hex(id, 16) {
            return Err(bad("the token id is not 16 lowercase hex digits"));
        }
        if !is_hex(secret, 32) {
            return Err(bad("the secret is not 32 lowercase hex digits"));
        }
        Ok(JoinToken {
            ca_hash: hash.to_string(),
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let t = JoinToken::generate(&"ab".repeat(32));
        let s = t.to_string();
        assert_eq!(s.parse::<JoinToken>().expect("parse"), t);
        assert!(!format!("{t:?}").contains(&t.secret));
        for bad in [
            "",
            "SK10",
            &s[..s.len() - 1],
            &s.replace("::", ":"),
            &s.to_uppercase(),
        ] {
            let e = bad.parse::<JoinToken>().expect_err(bad).to_string();
            assert!(e.contains("join token"), "{e}");
        }
    }
}
