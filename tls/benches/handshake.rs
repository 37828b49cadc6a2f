//! What a fresh TLS handshake costs: Skiff's mutual TLS 1.3 (P-256 certificates from the
//! cluster CA, client certificate verified and checked against the revocation list, no
//! resumption) against rustls' own defaults on the same machine in the same run (server
//! authentication only, then stock mutual authentication), in memory (no sockets), one
//! thread. Reports the median of interleaved rounds, with the range, of the time per
//! handshake spent in the server and in the client.
//!
//! `cargo bench -p skiff-tls --bench handshake [-- --rounds 3 --count 2000]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use skiff_tls::pki::{certs, key_and_csr};
use skiff_tls::{CaKey, Credentials, Identity, Material, Role, TlsContext};

struct Times {
    server: Duration,
    client: Duration,
}

fn handshake(server_cfg: &Arc<ServerConfig>, client_cfg: &Arc<ClientConfig>) -> Times {
    let mut t = Times {
        server: Duration::ZERO,
        client: Duration::ZERO,
    };
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let start = Instant::now();
    let mut client = ClientConnection::new(client_cfg.clone(), name).expect("client");
    t.client += start.elapsed();
    let start = Instant::now();
    let mut server = ServerConnection::new(server_cfg.clone()).expect("server");
    t.server += start.elapsed();
    let mut buf = Vec::with_capacity(16 * 1024);
    for _ in 0..10 {
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
        // client -> server
        buf.clear();
        let start = Instant::now();
        while client.wants_write() {
            client.write_tls(&mut buf).expect("client write");
        }
        t.client += start.elapsed();
        let start = Instant::now();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).expect("server read");
            server.process_new_packets().expect("server process");
        }
        let mut out = Vec::with_capacity(16 * 1024);
        while server.wants_write() {
            server.write_tls(&mut out).expect("server write");
        }
        t.server += start.elapsed();
        let start = Instant::now();
        let mut rd = &out[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("client read");
            client.process_new_packets().expect("client process");
        }
        t.client += start.elapsed();
    }
    assert!(
        !client.is_handshaking() && !server.is_handshaking(),
        "handshake did not complete"
    );
    t
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let mut rounds = 3usize;
    let mut count = 2000usize;
    let args: Vec<String> = std::env::args().collect();
    for w in args.windows(2) {
        match w[0].as_str() {
            "--rounds" => rounds = w[1].parse().expect("--rounds N"),
            "--count" => count = w[1].parse().expect("--count N"),
            _ => {}
        }
    }
    // The cluster: a CA, a member's server certificate, an admin's client certificate.
    let ca = CaKey::generate("bench CA").expect("CA");
    let issue = |id: &Identity| {
        let (key, csr) = key_and_csr("x").expect("csr");
        let c = ca
            .issue(&csr, id, &["127.0.0.1".into()], Duration::from_secs(3600))
            .expect("issue");
        Material {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: c.cert_pem,
            key_pem: key,
        }
    };
    let member = issue(&Identity::Member(1));
    let admin = issue(&Identity::User {
        role: Role::Admin,
        name: "admin".into(),
    });
    let ctx = TlsContext::new(member.clone()).expect("context");
    ctx.set_revoked((0..100).map(|i| format!("{i:032x}")));
    let skiff_server = ctx.server_config();
    let skiff_client = Credentials {
        controllers: vec![],
        name: "admin".into(),
        role: "admin".into(),
        ca: admin.ca_pem.clone(),
        cert: admin.cert_pem.clone(),
        key: admin.key_pem.clone(),
    }
    .client_config()
    .expect("client config");

    // rustls' own defaults with the same P-256 certificates and the ring provider.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = certs(&member.cert_pem).expect("chain");
    let key = || PrivateKeyDer::from_pem_slice(member.key_pem.as_bytes()).expect("key");
    let mut roots = RootCertStore::empty();
    roots
        .add(certs(&ca.cert_pem).expect("ca").remove(0))
        .expect("root");
    let roots = Arc::new(roots);
    let stock_server = Arc::new(
        ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key())
            .expect("server"),
    );
    let mut stock_client = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    stock_client.resumption = rustls::client::Resumption::disabled();
    let stock_client = Arc::new(stock_client);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let stock_mtls_server = Arc::new(
        ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key())
            .expect("server"),
    );
    let admin_key = PrivateKeyDer::from_pem_slice(admin.key_pem.as_bytes()).expect("key");
    let mut stock_mtls_client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(certs(&admin.cert_pem).expect("cert"), admin_key)
        .expect("client");
    stock_mtls_client.resumption = rustls::client::Resumption::disabled();
    let stock_mtls_client = Arc::new(stock_mtls_client);

    let cases: [(&str, &Arc<ServerConfig>, &Arc<ClientConfig>); 3] = [
        (
            "skiff mTLS (TLS 1.3, P-256, revocation list)",
            &skiff_server,
            &skiff_client,
        ),
        (
            "rustls defaults, server auth only",
            &stock_server,
            &stock_client,
        ),
        (
            "rustls defaults, stock mutual auth",
            &stock_mtls_server,
            &stock_mtls_client,
        ),
    ];
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); cases.len()];
    for (_, s, c) in &cases {
        for _ in 0..50 {
            handshake(s, c);
        }
    }
    for _ in 0..rounds {
        for (i, (_, s, c)) in cases.iter().enumerate() {
            let mut server = Duration::ZERO;
            let mut client = Duration::ZERO;
            for _ in 0..count {
                let t = handshake(s, c);
                server += t.server;
                client += t.client;
            }
            results[i].0.push(server.as_secs_f64() * 1e6 / count as f64);
            results[i].1.push(client.as_secs_f64() * 1e6 / count as f64);
        }
    }
    println!(
        "| handshake ({count} per round, {rounds} interleaved rounds) | server µs/handshake (median, range) | client µs/handshake | server vs rustls server-auth |"
    );
    println!("| --- | --- | --- | --- |");
    let base = median(results[1].0.clone()).0;
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let (s, smin, smax) = median(results[i].0.clone());
        let (c, cmin, cmax) = median(results[i].1.clone());
        println!(
            "| {name} | {s:.0} ({smin:.0}-{smax:.0}) | {c:.0} ({cmin:.0}-{cmax:.0}) | {:.2}x |",
            s / base
        );
    }
}
