//! Property tests for what arrives from outside: join tokens, identity URIs, certificates,
//! certificate requests and credentials files. None panics; each bad input is an error.

use std::time::Duration;

use proptest::prelude::*;
use skiff_tls::pki::{key_and_csr, parse_cert};
use skiff_tls::{CaKey, Credentials, Identity, JoinToken, Role};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn tokens_parse_only_in_their_one_form(s in ".{0,200}") {
        if let Ok(t) = s.parse::<JoinToken>() {
            prop_assert_eq!(t.to_string(), s.trim().to_string());
        }
    }

    #[test]
    fn mutated_tokens_are_refused_or_still_well_formed(
        pos in 0usize..120, byte in any::<u8>(), cut in 0usize..120,
    ) {
        let t = JoinToken::generate(&"ab".repeat(32)).to_string();
        let mut b = t.clone().into_bytes();
        let p = pos % b.len();
        b[p] = byte;
        let s = String::from_utf8_lossy(&b).into_owned();
        match s.parse::<JoinToken>() {
            Ok(p) => prop_assert_eq!(p.to_string(), s.trim().to_string()),
            Err(e) => prop_assert!(e.to_string().contains("join token")),
        }
        let short = &t[..cut.min(t.len())];
        if short.len() < t.len() {
            prop_assert!(short.parse::<JoinToken>().is_err());
        }
    }

    #[test]
    fn identity_uris_round_trip_or_are_refused(
        s in "(spiffe://skiff/)?((member|node|user)/)?[a-z0-9./_-]{0,40}",
    ) {
        match Identity::from_uri(&s) {
            Ok(id) => prop_assert_eq!(id.uri(), s),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn arbitrary_bytes_are_no_certificate(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        prop_assert!(parse_cert(&b).is_err());
    }

    #[test]
    fn arbitrary_credentials_files_are_refused(text in ".{0,300}") {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("creds");
        std::fs::write(&path, &text).expect("write");
        let e = Credentials::load(&path).expect_err("not credentials");
        prop_assert!(!e.to_string().is_empty());
    }
}

/// A valid certificate with bytes flipped, and a certificate request with bytes replaced:
/// parsing never panics, and whatever the CA still accepts names the identity it chose.
#[test]
fn corrupted_certificates_and_requests_never_panic() {
    let ca = CaKey::generate("props").expect("ca");
    let (_k, csr) = key_and_csr("x").expect("csr");
    let id = Identity::User {
        role: Role::Reader,
        name: "p".into(),
    };
    let issued = ca
        .issue(&csr, &id, &[], Duration::from_secs(60))
        .expect("issue");
    let der = skiff_tls::pki::first_cert(&issued.cert_pem).expect("der");
    let der = der.as_ref().to_vec();
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(&(0..der.len(), any::<u8>()), |(i, b)| {
            let mut d = der.clone();
            d[i] ^= b | 1;
            let _ = parse_cert(&d);
            Ok(())
        })
        .expect("certificate mutations");
    let csr_bytes = csr.clone().into_bytes();
    runner
        .run(&(0..csr_bytes.len(), any::<u8>()), |(i, b)| {
            let mut c = csr_bytes.clone();
            c[i] = b;
            let text = String::from_utf8_lossy(&c).into_owned();
            if text != csr
                && let Ok(x) = ca.issue(&text, &id, &[], Duration::from_secs(60))
            {
                let pem = skiff_tls::pki::first_cert(&x.cert_pem).expect("pem");
                let info = parse_cert(pem.as_ref()).expect("parse");
                prop_assert_eq!(info.identity, id.clone());
            }
            Ok(())
        })
        .expect("request mutations");
}
