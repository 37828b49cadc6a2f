//! Reaching the controllers: each address in turn until one answers. Every call goes through
//! [`rpc!`]: `rpc!(ctl, jobs, apply_job, request)` calls `Jobs.ApplyJob` on the first controller
//! that answers.

use skiff_proto::MAX_MESSAGE_BYTES;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use skiff_proto::v1::cluster_client::ClusterClient;
use skiff_proto::v1::jobs_client::JobsClient;
use skiff_proto::v1::nodes_client::NodesClient;
use skiff_proto::v1::pki_client::PkiClient;
use skiff_tls::Credentials;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Where credentials are looked for when `--credentials` is not given.
pub fn default_credentials() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("skiff").join("credentials"))
}

/// Loads the user's credentials, saying how to get some when there are none.
pub fn load_credentials(path: Option<&Path>) -> anyhow::Result<Credentials> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => default_credentials().ok_or_else(|| {
            anyhow::anyhow!("no credentials: give --credentials FILE (or SKIFF_CREDENTIALS)")
        })?,
    };
    if !path.exists() {
        anyhow::bail!(
            "no credentials at {}: every command needs a client certificate from the cluster. \
             Use --credentials FILE (or SKIFF_CREDENTIALS): the bootstrap member wrote \
             <data-dir>/admin.creds, and an admin makes more with `skiff credentials create \
             NAME --role operator --out FILE`",
            path.display()
        );
    }
    Ok(Credentials::load(&path)?)
}

/// The controller addresses the user gave, and the user's TLS identity.
pub struct Controllers {
    endpoints: Vec<(String, Endpoint)>,
    tls: Arc<skiff_tls::rustls::ClientConfig>,
}

/// `http://` for tonic (the TLS is the connector's); a scheme the user gave is dropped.
pub fn endpoint(addr: &str) -> anyhow::Result<Endpoint> {
    let a = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    Ok(skiff_tls::net::endpoint(a)?)
}

/// A failed call as the user should read it: TLS refusals say what was refused and why.
pub fn status_message(s: &Status) -> String {
    use std::error::Error as _;
    let mut chain = vec![s.message().to_string()];
    let mut src = s.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !chain.iter().any(|x| x.contains(&t)) {
            chain.push(t);
        }
        src = c.source();
    }
    let msg = chain.join(": ");
    let why = [
        ("CertificateRevoked", "it is revoked"),
        ("CertificateExpired", "it has expired"),
        ("UnknownCA", "it is not from this cluster's CA"),
        ("BadCertificate", "it is not from this cluster's CA"),
        ("CertificateUnknown", "it is not from this cluster's CA"),
        ("CertificateRequired", "none was presented"),
    ]
    .iter()
    .find(|(alert, _)| msg.contains(alert));
    match why {
        Some((_, why)) => format!("the server refused this client's certificate: {why} ({msg})"),
        // TLS 1.3: a refused client certificate may show only as a closed connection.
        None if [
            "broken pipe",
            "connection reset",
            "stream closed",
            "connection closed",
        ]
        .iter()
        .any(|m| msg.contains(m)) =>
        {
            format!(
                "{msg} (the server closed the connection: it may have refused this client's \
                 certificate as revoked, expired or from another CA; its log says why)"
            )
        }
        None => msg,
    }
}

impl Controllers {
    pub fn new(addrs: Vec<String>, creds: &Credentials) -> anyhow::Result<Self> {
        let mut endpoints = Vec::new();
        for a in addrs
            .into_iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
        {
            let ep = endpoint(&a)
                .map_err(|e| anyhow::anyhow!("--controller: {a:?} is not an address: {e}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(30));
            endpoints.push((a, ep));
        }
        if endpoints.is_empty() {
            anyhow::bail!("--controller: no address given");
        }
        Ok(Controllers {
            endpoints,
            tls: creds.client_config()?,
        })
    }

    /// A channel to `addr` (an agent) with the user's certificate.
    pub async fn channel_to(&self, addr: &str) -> anyhow::Result<Channel> {
        let ep = endpoint(addr)?.connect_timeout(Duration::from_secs(3));
        skiff_tls::net::channel_with(self.tls.clone(), ep)
            .await
            .map_err(|e| anyhow::anyhow!("{addr}: {}", skiff_tls::enroll::error_chain(&e)))
    }

    /// Calls `f` on each controller in turn until one answers. Only "unreachable" moves on to
    /// the next address; any answer, including an error, is final.
    async fn call<C, T, F, Fut>(&self, make: fn(Channel) -> C, f: F) -> anyhow::Result<T>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut tried = Vec::new();
        for (addr, ep) in &self.endpoints {
            let channel = match skiff_tls::net::channel_with(self.tls.clone(), ep.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    tried.push(format!("{addr}: {}", skiff_tls::enroll::error_chain(&e)));
                    continue;
                }
            };
            match f(make(channel)).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s)
                    if s.code() == Code::Unavailable && tried.len() + 1 < self.endpoints.len() =>
                {
                    tried.push(format!("{addr}: {}", s.message()));
                }
                Err(s) => anyhow::bail!("{}", status_message(&s)),
            }
        }
        anyhow::bail!("no controller answered ({})", tried.join("; "))
    }

    pub async fn jobs<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(JobsClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call(
            |ch| JobsClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES),
            f,
        )
        .await
    }

    pub async fn cluster<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call(
            |ch| ClusterClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES),
            f,
        )
        .await
    }

    pub async fn pki<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(PkiClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call(
            |ch| PkiClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES),
            f,
        )
        .await
    }

    pub async fn nodes<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(NodesClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call(
            |ch| NodesClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES),
            f,
        )
        .await
    }
}

/// One RPC on the first controller that answers: `rpc!(ctl, jobs, list_jobs, request)` (the
/// service accessor of [`Controllers`], the client method, the request). Evaluates to
/// `anyhow::Result` of the response message.
macro_rules! rpc {
    ($ctl:expr, $service:ident, $method:ident, $req:expr) => {{
        let req = $req;
        $ctl.$service(move |mut c| {
            let r = req.clone();
            async move { c.$method(r).await }
        })
        .await
    }};
}
pub(crate) use rpc;
