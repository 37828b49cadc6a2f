//! Pulling from an OCI distribution registry (Docker Hub's API, docker-registry, Harbor, ...)
//! with oci-client.
//!
//! The store's pipeline is synchronous (unpacking is file-system work), so this source owns a
//! small tokio runtime for HTTP: manifests and configs are fetched with `block_on`, and a layer
//! is streamed by a task that feeds a bounded channel the unpacking thread reads from. A
//! connection that breaks mid-blob is resumed with a range request from the byte it stopped at
//! (up to [`RESUME_ATTEMPTS`] times), so the unpacker never notices; the digest is checked over
//! the whole blob as always.

use std::collections::HashMap;
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{Descriptor, MediaType};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::ImageError;
use super::blob;
use super::manifest::{self, BlobSource, INDEX_TYPES, MANIFEST_TYPES, PlannedLayer, Resolved};

/// How often a broken layer download is resumed before the pull fails.
const RESUME_ATTEMPTS: u32 = 5;
/// Chunks buffered between the download task and the unpacking thread (~64 KiB each).
const CHANNEL_CHUNKS: usize = 4;

/// How to reach registries: which may be plain HTTP, and where credentials are.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `HOST:PORT` (or `HOST`) of registries reached over plain HTTP. Every other registry is
    /// HTTPS with certificate checks.
    pub insecure: Vec<String>,
    /// A credentials file in Docker's `config.json` format (`{"auths": {"HOST[:PORT]":
    /// {"auth": base64("user:password")}}}`; also `username`/`password` and `registrytoken`).
    pub auth_file: Option<PathBuf>,
}

/// A parsed `host[:port]/name[:tag|@digest]` reference.
pub(crate) fn parse_reference(reference: &str) -> Result<Reference, ImageError> {
    let r = reference.strip_prefix("docker://").unwrap_or(reference);
    r.parse::<Reference>()
        .map_err(|e| ImageError::BadReference {
            reference: reference.to_owned(),
            reason: e.to_string(),
        })
}

/// The credentials file's shape (Docker's `~/.docker/config.json`).
#[derive(Debug, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Debug, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// Finds the credentials for `registry` (`host[:port]`) in the file at `path`.
pub(crate) fn credentials(path: &Path, registry: &str) -> Result<RegistryAuth, ImageError> {
    let bad = |reason: String| ImageError::Credentials {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let file: AuthFile =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid json: {e}")))?;
    // Keys may be written as URLs ("https://host:port/v1/"), as docker login does.
    let entry = file.auths.iter().find_map(|(key, entry)| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host);
        (host == registry).then_some(entry)
    });
    let Some(entry) = entry else {
        debug!(
            registry,
            "no credentials for this registry; pulling anonymously"
        );
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = &entry.registrytoken {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let Some(auth) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| bad(format!("{registry}: auth is not base64: {e}")))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| bad(format!("{registry}: auth is not UTF-8")))?;
        let Some((user, password)) = decoded.split_once(':') else {
            return Err(bad(format!("{registry}: auth is not user:password")));
        };
        return Ok(RegistryAuth::Basic(user.to_owned(), password.to_owned()));
    }
    if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
    }
    if entry.identitytoken.is_some() {
        return Err(bad(format!(
            "{registry}: identitytoken (OAuth refresh tokens) is not supported; use auth or registrytoken"
        )));
    }
    Err(bad(format!(
        "{registry}: no auth, username/password or registrytoken"
    )))
}

/// One registry image being pulled.
pub(crate) struct RegistrySource {
    name: String,
    reference: Reference,
    client: Client,
    auth: RegistryAuth,
    runtime: tokio::runtime::Runtime,
    /// Manifests already fetched, by digest (the first one is fetched by tag).
    manifests: Mutex<HashMap<String, Bytes>>,
}

impl RegistrySource {
    pub(crate) fn new(
        reference: Reference,
        options: &RegistryOptions,
    ) -> Result<RegistrySource, ImageError> {
        install_crypto_provider();
        let registry = reference.resolve_registry().to_owned();
        let auth = match &options.auth_file {
            Some(path) => credentials(path, &registry)?,
            None => RegistryAuth::Anonymous,
        };
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(options.insecure.clone()),
            // We pick the platform ourselves (and record what we picked).
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("skiff-agent/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        let client = Client::try_from(config).map_err(|e| ImageError::Registry {
            reference: reference.whole(),
            reason: e.to_string(),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("skiff-pull")
            .enable_all()
            .build()
            .map_err(ImageError::io("tokio runtime"))?;
        Ok(RegistrySource {
            name: reference.whole(),
            reference,
            client,
            auth,
            runtime,
            manifests: Mutex::new(HashMap::new()),
        })
    }

    fn registry_err(&self, e: OciDistributionError) -> ImageError {
        registry_error(&self.name, e)
    }

    /// Fetches the manifest the reference names (by tag or digest) and resolves it.
    pub(crate) fn resolve(&self) -> Result<Resolved, ImageError> {
        let bytes = self.fetch_manifest(&self.reference)?;
        let digest = format!("sha256:{}", hex::encode(sha2_digest(&bytes)));
        if let Some(wanted) = self.reference.digest()
            && wanted != digest
        {
            return Err(ImageError::DigestMismatch {
                kind: "manifest",
                digest: wanted.to_owned(),
                got: digest,
            });
        }
        let media_type = media_type_of(&bytes).ok_or_else(|| ImageError::Invalid {
            kind: "manifest",
            digest: digest.clone(),
            reason: "neither an image manifest nor an index".into(),
        })?;
        let desc = Descriptor::new(
            MediaType::from(media_type.as_str()),
            bytes.len() as u64,
            digest
                .parse::<oci_spec::image::Digest>()
                .map_err(|e| ImageError::Invalid {
                    kind: "manifest",
                    digest: digest.clone(),
                    reason: e.to_string(),
                })?,
        );
        self.lock_manifests().insert(digest, bytes);
        manifest::resolve_descriptor(self, desc)
    }

    /// Fetches a manifest or index (by tag or digest) as raw bytes.
    fn fetch_manifest(&self, reference: &Reference) -> Result<Bytes, ImageError> {
        let mut accept: Vec<&str> = MANIFEST_TYPES.to_vec();
        accept.extend_from_slice(INDEX_TYPES);
        let (bytes, _) = self
            .runtime
            .block_on(
                self.client
                    .pull_manifest_raw(reference, &self.auth, &accept),
            )
            .map_err(|e| self.registry_err(e))?;
        Ok(bytes)
    }

    fn lock_manifests(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bytes>> {
        self.manifests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The manifest's media type: its `mediaType` field, or guessed from its shape (OCI allows
/// leaving it out).
fn media_type_of(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if let Some(t) = v.get("mediaType").and_then(|t| t.as_str()) {
        return Some(t.to_owned());
    }
    if v.get("manifests").is_some() {
        Some(INDEX_TYPES[0].to_owned())
    } else if v.get("config").is_some() && v.get("layers").is_some() {
        Some(MANIFEST_TYPES[0].to_owned())
    } else {
        None
    }
}

fn sha2_digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

fn registry_error(name: &str, e: OciDistributionError) -> ImageError {
    let reason = match &e {
        OciDistributionError::AuthenticationFailure(r) => format!("authentication failed: {r}"),
        OciDistributionError::UnauthorizedError { url } => {
            format!("unauthorized at {url} (check the credentials file)")
        }
        OciDistributionError::ImageManifestNotFoundError(r) => format!("manifest not found: {r}"),
        OciDistributionError::RegistryError { envelope, url } => {
            let errors: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| {
                    if e.message.is_empty() {
                        format!("{:?}", e.code)
                    } else {
                        e.message.clone()
                    }
                })
                .collect();
            format!("{} ({url})", errors.join("; "))
        }
        OciDistributionError::RequestError(r) => {
            // reqwest hides the cause (refused, TLS, ...) in the source chain.
            let mut msg = r.to_string();
            let mut src = std::error::Error::source(r);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            if msg.contains("InvalidContentType") || msg.contains("corrupt message") {
                msg.push_str(
                    " (the registry may speak plain HTTP: if it is meant to, add --insecure-registry HOST:PORT)",
                );
            }
            msg
        }
        other => other.to_string(),
    };
    ImageError::Registry {
        reference: name.to_owned(),
        reason,
    }
}

impl BlobSource for RegistrySource {
    fn name(&self) -> &str {
        &self.name
    }

    fn open_json(
        &self,
        kind: &'static str,
        desc: &Descriptor,
    ) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        let digest = blob::sha256_of(desc.digest(), kind)?.to_owned();
        if let Some(bytes) = self.lock_manifests().get(&digest) {
            return Ok(Box::new(Cursor::new(bytes.clone())));
        }
        let by_digest = self.reference.clone_with_digest(digest.clone());
        let bytes = if kind == "config" {
            let mut out = Vec::with_capacity(desc.size() as usize);
            self.runtime
                .block_on(self.client.pull_blob(&by_digest, digest.as_str(), &mut out))
                .map_err(|e| self.registry_err(e))?;
            Bytes::from(out)
        } else {
            let bytes = self.fetch_manifest(&by_digest)?;
            self.lock_manifests().insert(digest, bytes.clone());
            bytes
        };
        Ok(Box::new(Cursor::new(bytes)))
    }

    fn open_layer(&self, layer: &PlannedLayer) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        let digest = layer.digest.clone().ok_or_else(|| ImageError::Invalid {
            kind: "layer",
            digest: layer.diff_id.clone(),
            reason: "no blob digest".into(),
        })?;
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let client = self.client.clone();
        let reference = self.reference.clone();
        let name = self.name.clone();
        let size = layer.size;
        self.runtime.spawn(async move {
            download(client, reference, name, digest, size, tx).await;
        });
        Ok(Box::new(ChannelReader {
            rx,
            chunk: Bytes::new(),
        }))
    }
}

/// Streams the blob into `tx`, resuming from the last byte after a broken connection.
async fn download(
    client: Client,
    reference: Reference,
    name: String,
    digest: String,
    size: u64,
    tx: mpsc::Sender<io::Result<Bytes>>,
) {
    let mut offset = 0u64;
    let mut failures = 0u32;
    loop {
        let error = match stream_from(&client, &reference, &digest, offset, &tx).await {
            Ok(Done::Complete | Done::ReaderGone) => return,
            Ok(Done::Broken(sent, e)) => {
                offset += sent;
                e
            }
            Err(e) => {
                // Errors before any byte: a registry that answers 404 or 401 will keep doing
                // so; only transport errors are worth retrying.
                let retry = matches!(e, OciDistributionError::RequestError(_));
                let err = registry_error(&name, e);
                if !retry {
                    let _ = tx.send(Err(io::Error::other(err.to_string()))).await;
                    return;
                }
                err.to_string()
            }
        };
        failures += 1;
        if failures > RESUME_ATTEMPTS || offset >= size {
            let _ = tx
                .send(Err(io::Error::other(format!(
                    "download of {digest} failed after {failures} attempts at byte {offset}: {error}"
                ))))
                .await;
            return;
        }
        warn!(%digest, offset, attempt = failures, error = %error, "layer download broke; resuming");
        tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
    }
}

enum Done {
    Complete,
    ReaderGone,
    /// Bytes sent before the stream broke, and why.
    Broken(u64, String),
}

async fn stream_from(
    client: &Client,
    reference: &Reference,
    digest: &str,
    offset: u64,
    tx: &mpsc::Sender<io::Result<Bytes>>,
) -> Result<Done, OciDistributionError> {
    // Always a range request ("bytes=OFFSET-"): with offset 0 the registry answers 206 and
    // oci-client does not hash the blob a second time (we verify it while unpacking).
    let response = client
        .pull_blob_stream_partial(reference, digest, offset, None)
        .await?;
    let (mut stream, mut skip) = match response {
        BlobResponse::Partial(s) => (s.stream, 0),
        // The registry ignored the range: it sends the whole blob again.
        BlobResponse::Full(s) => (s.stream, offset),
    };
    let mut sent = 0u64;
    while let Some(chunk) = stream.next().await {
        let mut chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Ok(Done::Broken(sent, e.to_string())),
        };
        if skip > 0 {
            let n = skip.min(chunk.len() as u64);
            chunk = chunk.slice(n as usize..);
            skip -= n;
            if chunk.is_empty() {
                continue;
            }
        }
        sent += chunk.len() as u64;
        if tx.send(Ok(chunk)).await.is_err() {
            return Ok(Done::ReaderGone);
        }
    }
    Ok(Done::Complete)
}

/// The unpacking thread's end of a layer download.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

/// rustls needs one process-wide crypto provider; we use ring (no C toolchain for aws-lc).
fn install_crypto_provider() {
    // Fails only when one is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_style_credentials() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("auth.json");
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://127.0.0.1:5000/v1/":{{"auth":"{basic}"}},
                "reg.example:443":{{"username":"bob","password":"pw"}},
                "tok.example":{{"registrytoken":"T"}},
                "bad.example":{{"auth":"!!"}}}}}}"#
            ),
        )
        .expect("write");
        assert!(matches!(
            credentials(&path, "127.0.0.1:5000").expect("basic"),
            RegistryAuth::Basic(u, p) if u == "alice" && p == "s3cr:et"
        ));
        assert!(matches!(
            credentials(&path, "reg.example:443").expect("user/pass"),
            RegistryAuth::Basic(u, _) if u == "bob"
        ));
        assert!(matches!(
            credentials(&path, "tok.example").expect("token"),
            RegistryAuth::Bearer(t) if t == "T"
        ));
        assert!(matches!(
            credentials(&path, "other:1").expect("none"),
            RegistryAuth::Anonymous
        ));
        let e = credentials(&path, "bad.example").expect_err("bad base64");
        assert!(
            e.to_string().contains("bad.example: auth is not base64"),
            "{e}"
        );
        std::fs::write(&path, b"{").expect("write");
        let e = credentials(&path, "x").expect_err("bad json");
        assert!(e.to_string().contains("auth.json"), "{e}");
    }

    #[test]
    fn parses_registry_references() {
        let r = parse_reference("127.0.0.1:5000/demo/web:1.0").expect("ref");
        assert_eq!(r.resolve_registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "demo/web");
        assert_eq!(r.tag(), Some("1.0"));
        let r = parse_reference("docker://localhost:5000/web").expect("ref");
        assert_eq!(r.repository(), "web");
        assert!(parse_reference("UPPER/Case:x y").is_err());
    }

    #[test]
    fn guesses_media_types() {
        assert_eq!(
            media_type_of(br#"{"manifests":[]}"#).as_deref(),
            Some(INDEX_TYPES[0])
        );
        assert_eq!(
            media_type_of(br#"{"config":{},"layers":[]}"#).as_deref(),
            Some(MANIFEST_TYPES[0])
        );
        assert_eq!(media_type_of(b"[]"), None);
    }
}
