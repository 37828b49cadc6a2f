//! Pulling from a real registry: Debian's docker-registry started on 127.0.0.1 with its
//! storage in a temp dir, images pushed by skopeo from OCI layouts the fixture script builds
//! from busybox-static, archives written by skopeo, and containers run from every kind of
//! reference. Needs root (unpacking keeps owners and device nodes; containers), docker-registry
//! and skopeo; each test says what is missing and returns.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use skiff_runtime::image::{ImageError, ImageStore, PullOptions, RegistryOptions};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../runtime/tests/fixtures/make-busybox-image.sh"
);
const AGENT: &str = env!("CARGO_BIN_EXE_skiff-agent");

/// Whether this test can run here: root, a registry, skopeo (a missing one fails the test
/// unless SKIFF_TEST_SKIP opts out).
fn can_run() -> bool {
    use skiff_testkit::{Need, require, tool};
    require(&[
        Need::Root,
        Need::Cgroupfs,
        tool("docker-registry", "docker-registry"),
        tool("skopeo", "skopeo"),
    ])
}

/// A docker-registry process on 127.0.0.1, storage and log in a temp dir; killed on drop.
struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    addr: String,
    /// `(user, password)` when it requires basic auth.
    creds: Option<(String, String)>,
}

impl Registry {
    fn start() -> Result<Registry> {
        Registry::start_with(None)
    }

    fn start_with(creds: Option<(&str, &str)>) -> Result<Registry> {
        let dir = tempfile::Builder::new().prefix("skiff-reg-").tempdir()?;
        let mut auth = String::new();
        if let Some((user, password)) = creds {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .context("htpasswd (apt-get install apache2-utils)")?;
            ensure!(out.status.success(), "htpasswd failed");
            fs::write(dir.path().join("htpasswd"), &out.stdout)?;
            auth = format!(
                "auth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        // A port picked by the kernel may be taken again before the registry binds it: retry.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: {addr}\n{auth}",
                    dir.path().join("data").display()
                ),
            )?;
            let log = fs::File::create(dir.path().join("registry.log"))?;
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting docker-registry")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(status) = child.try_wait()? {
                    eprintln!("docker-registry on {addr} exited ({status}); retrying");
                    break;
                }
                if TcpStream::connect(&addr).is_ok() {
                    return Ok(Registry {
                        child,
                        dir,
                        addr,
                        creds: creds.map(|(u, p)| (u.to_owned(), p.to_owned())),
                    });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    bail!("docker-registry did not listen on {addr} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        bail!("could not start docker-registry")
    }

    /// `skopeo copy [extra] SRC docker://ADDR/NAME`.
    fn push(&self, src: &str, name: &str, extra: &[&str]) -> Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "-q", "--dest-tls-verify=false"])
            .args(extra);
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        let out = cmd
            .arg(src)
            .arg(format!("docker://{}/{name}", self.addr))
            .output()?;
        ensure!(
            out.status.success(),
            "skopeo copy {src}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.addr)
    }

    /// Where the registry keeps blob `digest`.
    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// How many GET requests for blob `digest` the access log shows.
    fn blob_gets(&self, digest: &str) -> Result<usize> {
        let log = fs::read_to_string(self.dir.path().join("registry.log"))?;
        Ok(log
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")))
            .count())
    }

    fn insecure(&self) -> RegistryOptions {
        RegistryOptions {
            insecure: vec![self.addr.clone()],
            auth_file: None,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the fixture script into `dir` with extra environment.
fn fixture(dir: &Path, env: &[(&str, &str)], tags: &[&str]) -> Result<()> {
    let out = Command::new("sh")
        .arg(FIXTURE)
        .arg(dir)
        .args(tags)
        .envs(env.iter().copied())
        .output()?;
    ensure!(
        out.status.success(),
        "fixture: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A fresh registry with the fixture image (built with `env`) pushed as `name`; returns the
/// registry, the temp dir and the layout.
fn registry_with(
    env: &[(&str, &str)],
    name: &str,
) -> Result<(Registry, tempfile::TempDir, PathBuf)> {
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("image");
    fixture(&layout, env, &["latest"])?;
    reg.push(&format!("oci:{}", layout.display()), name, &[])?;
    Ok((reg, tmp, layout))
}

/// The layout's manifest: (manifest json, its layer digests).
fn layout_layers(dir: &Path) -> Result<Vec<(String, u64)>> {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("digest")?
        .trim_start_matches("sha256:")
        .to_owned();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("blobs/sha256").join(digest))?)?;
    manifest["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .map(|l| {
            Ok((
                l["digest"].as_str().context("digest")?.to_owned(),
                l["size"].as_u64().context("size")?,
            ))
        })
        .collect()
}

/// The cgroup parent of the containers under `data`: `skiff-test-reg/<name of data's parent>`
/// (each test's temp dir), so tests running at once do not share one.
fn cgroup_parent(data: &Path) -> String {
    let tag = data
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().trim_start_matches('.').to_owned())
        .unwrap_or_else(|| "x".to_owned());
    format!("skiff-test-reg/{tag}")
}

/// `skiff-agent --data-dir DATA ARGS...`; registers DATA for [`Cleanup`].
fn agent(data: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(AGENT)
        .arg("--data-dir")
        .arg(data)
        .arg("--cgroup-parent")
        .arg(cgroup_parent(data))
        .args(args)
        .env_remove("SKIFF_CONFIG")
        .output()?)
}

/// On drop (success or failure), removes the containers under `data` and their cgroup parent
/// in every hierarchy: nothing a test started stays on the host.
struct Cleanup {
    data: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(out) = agent(&self.data, &["container", "ps", "-a", "-o", "json"])
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        {
            for c in v.as_array().into_iter().flatten() {
                if let Some(id) = c["id"].as_str() {
                    let _ = agent(&self.data, &["container", "rm", "-f", id]);
                }
            }
        }
        let parent = cgroup_parent(&self.data);
        for h in fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = h.path().join(&parent);
            let _ = fs::remove_dir(&dir);
            // The shared top goes with the last test that used it.
            if let Some(top) = dir.parent() {
                let _ = fs::remove_dir(top);
            }
        }
    }
}

fn stdout_of(out: &Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes a Docker-style credentials file with basic credentials `user_password` for `host`.
fn write_auth(path: &Path, host: &str, user_password: &str) -> Result<()> {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(user_password);
    fs::write(
        path,
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )?;
    Ok(())
}

/// Asserts the command failed and its stderr says `needle`.
fn assert_fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(needle), "{err}");
}

fn store_layers(store: &Path) -> Result<usize> {
    Ok(fs::read_dir(store.join("images/layers/sha256"))?.count())
}

fn tmp_is_empty(store: &Path) -> Result<bool> {
    Ok(fs::read_dir(store.join("images/tmp"))?.next().is_none())
}

#[test]
fn r10_pull_by_tag_and_digest_then_run_the_merged_view() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("wh");
    fixture(&layout, &[("FIXTURE_WHITEOUTS", "1")], &["latest"])?;
    reg.push(
        &format!("oci:{}:latest", layout.display()),
        "demo/wh:1",
        &[],
    )?;
    let data = tmp.path().join("agent");
    let _cleanup_data = Cleanup { data: data.clone() };
    let insecure = ["--insecure-registry", &reg.addr];

    let r = reg.reference("demo/wh:1");
    let out = stdout_of(&agent(
        &data,
        &[&insecure[..], &["image", "pull", &r]].concat(),
    )?)?;
    assert!(out.starts_with(&format!("{r} sha256:")), "{out}");
    assert!(out.contains("(3 layers"), "{out}");
    let digest = out
        .split_whitespace()
        .nth(1)
        .context("digest in output")?
        .to_owned();

    // Whiteouts and the opaque dir give the merged view in a container.
    let out = stdout_of(&agent(
        &data,
        &[
            &insecure[..],
            &[
                "container",
                "run",
                "--rm",
                "--pull",
                "never",
                "--image",
                &r,
                "--",
                "sh",
                "-c",
                "test ! -e /etc/skiff-release && ls /opt/data && cat /www/index.html",
            ],
        ]
        .concat(),
    )?)?;
    assert_eq!(out, "new\nhello from skiff\n");

    // By digest: same image, nothing fetched again.
    let layers = layout_layers(&layout)?;
    let by_digest = reg.reference(&format!("demo/wh@{digest}"));
    let out = stdout_of(&agent(
        &data,
        &[&insecure[..], &["image", "pull", &by_digest]].concat(),
    )?)?;
    assert!(out.contains(&digest), "{out}");
    for (d, _) in &layers {
        assert_eq!(reg.blob_gets(d)?, 1, "layer {d} fetched once");
    }
    let ls = stdout_of(&agent(&data, &["image", "ls", "-o", "json"])?)?;
    let ls: serde_json::Value = serde_json::from_str(&ls)?;
    let mut refs: Vec<&str> = ls
        .as_array()
        .context("array")?
        .iter()
        .filter_map(|i| i["reference"].as_str())
        .collect();
    refs.sort_unstable();
    let mut want = [by_digest.as_str(), r.as_str()];
    want.sort_unstable();
    assert_eq!(refs, want);
    assert_eq!(ls[0]["manifest_digest"], serde_json::json!(digest));
    assert_eq!(ls[1]["manifest_digest"], serde_json::json!(digest));

    // A digest that the registry does not have, and a tag it does not have.
    let missing = reg.reference(&format!("demo/wh@sha256:{}", "0".repeat(64)));
    let out = agent(
        &data,
        &[&insecure[..], &["image", "pull", &missing]].concat(),
    )?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("manifest unknown"), "{err}");
    let out = agent(
        &data,
        &[
            &insecure[..],
            &["image", "pull", &reg.reference("demo/wh:nope")],
        ]
        .concat(),
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "error: {}: manifest unknown",
            reg.reference("demo/wh:nope")
        )),
        "{err}"
    );
    Ok(())
}

#[test]
fn r11_plain_http_only_when_marked_insecure() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let (reg, tmp, layout) = registry_with(&[], "demo/bb:1")?;
    let data = tmp.path().join("agent");
    let _cleanup_data = Cleanup { data: data.clone() };
    let r = reg.reference("demo/bb:1");
    let out = agent(&data, &["image", "pull", &r])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("https://{}/v2/", reg.addr)) && err.contains("--insecure-registry"),
        "{err}"
    );
    assert_eq!(reg.blob_gets(&layout_layers(&layout)?[0].0)?, 0);

    // From the config file instead of the flag.
    let config = tmp.path().join("agent.toml");
    fs::write(
        &config,
        format!("insecure_registries = [\"{}\"]\n", reg.addr),
    )?;
    let out = agent(
        &data,
        &[
            "--config",
            &config.display().to_string(),
            "image",
            "pull",
            &r,
        ],
    )?;
    stdout_of(&out)?;
    // A typo in the config file is named, not ignored.
    fs::write(&config, "insecure_registry = [\"x\"]\n")?;
    let out = agent(
        &data,
        &["--config", &config.display().to_string(), "image", "ls"],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("insecure_registry"),
        "{err}"
    );
    Ok(())
}

#[test]
fn r12_multi_platform_index_picks_the_host() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("multi");
    fixture(&layout, &[], &["latest"])?;
    let blobs = layout.join("blobs/sha256");
    let put = |bytes: &[u8]| -> Result<(String, u64)> {
        use sha2::Digest as _;
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        fs::write(blobs.join(&hex), bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len() as u64))
    };
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let host = index["manifests"][0].clone();
    let host_digest = host["digest"].as_str().context("digest")?.to_owned();
    let host_arch = host["platform"]["architecture"]
        .as_str()
        .context("arch")?
        .to_owned();
    let other_arch = if host_arch == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    // The other platform's image: same layers, its own config (architecture, a marker env).
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(
        blobs.join(host_digest.trim_start_matches("sha256:")),
    )?)?;
    let config_digest = manifest["config"]["digest"].as_str().context("config")?;
    let mut config: serde_json::Value = serde_json::from_slice(&fs::read(
        blobs.join(config_digest.trim_start_matches("sha256:")),
    )?)?;
    config["architecture"] = serde_json::json!(other_arch);
    config["config"]["Env"] = serde_json::json!(["PLATFORM=other"]);
    let (cd, cs) = put(&serde_json::to_vec(&config)?)?;
    let mut other = manifest.clone();
    other["config"]["digest"] = serde_json::json!(cd);
    other["config"]["size"] = serde_json::json!(cs);
    let (od, os) = put(&serde_json::to_vec(&other)?)?;
    let entry = |d: &str, s: u64, arch: &str| {
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": d, "size": s, "platform": {"architecture": arch, "os": "linux"}})
    };
    let both = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&od, os, other_arch),
                      entry(&host_digest, host["size"].as_u64().context("size")?, &host_arch)]});
    let (bd, bs) = put(&serde_json::to_vec(&both)?)?;
    let foreign = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&od, os, other_arch)]});
    let (fd, fs_) = put(&serde_json::to_vec(&foreign)?)?;
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": bd, "size": bs,
         "annotations": {"org.opencontainers.image.ref.name": "multi"}},
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": fd, "size": fs_,
         "annotations": {"org.opencontainers.image.ref.name": "foreign"}}]});
    fs::write(layout.join("index.json"), serde_json::to_vec(&top)?)?;
    reg.push(
        &format!("oci:{}:multi", layout.display()),
        "demo/multi:1",
        &["--all"],
    )?;
    reg.push(
        &format!("oci:{}:foreign", layout.display()),
        "demo/foreign:1",
        &["--all"],
    )?;

    let store = ImageStore::open(&tmp.path().join("store"))?;
    let opts = PullOptions {
        registry: reg.insecure(),
        progress: None,
    };
    let image = store.pull(&reg.reference("demo/multi:1"), &opts)?;
    assert_eq!(image.manifest_digest.as_deref(), Some(host_digest.as_str()));
    assert!(!image.config.env.iter().any(|e| e == "PLATFORM=other"));
    assert_eq!(image.layers.len(), 2);

    // The same as Docker's formats: a manifest list of schema 2 manifests.
    reg.push(
        &format!("oci:{}:multi", layout.display()),
        "demo/multi-docker:1",
        &["--all", "--format", "v2s2"],
    )?;
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}", reg.reference("demo/multi-docker:1")))
        .output()?;
    let raw = String::from_utf8_lossy(&raw.stdout);
    assert!(
        raw.contains("application/vnd.docker.distribution.manifest.list.v2+json"),
        "{raw}"
    );
    let docker = store.pull(&reg.reference("demo/multi-docker:1"), &opts)?;
    assert_ne!(
        docker.manifest_digest, image.manifest_digest,
        "converted manifest"
    );
    assert_eq!(docker.id, image.id, "same config");
    assert_eq!(docker.layers, image.layers, "same layers, shared");

    let err = store
        .pull(&reg.reference("demo/foreign:1"), &opts)
        .expect_err("no manifest for this host");
    assert!(matches!(err, ImageError::NoPlatform { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("no manifest for linux/{host_arch}"))
            && msg.contains(&format!("have: linux/{other_arch}")),
        "{msg}"
    );
    Ok(())
}

#[test]
fn r13_zstd_layers() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let (reg, tmp, _) = registry_with(&[("FIXTURE_COMPRESSION", "zstd")], "demo/zstd:1")?;
    let manifest = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}", reg.reference("demo/zstd:1")))
        .output()?;
    assert!(String::from_utf8_lossy(&manifest.stdout).contains("tar+zstd"));
    let data = tmp.path().join("agent");
    let _cleanup_data = Cleanup { data: data.clone() };
    let out = stdout_of(&agent(
        &data,
        &[
            "--insecure-registry",
            &reg.addr,
            "container",
            "run",
            "--rm",
            "--image",
            &reg.reference("demo/zstd:1"),
            "--",
            "cat",
            "/www/index.html",
        ],
    )?)?;
    assert_eq!(out, "hello from skiff\n");
    Ok(())
}

#[test]
fn r14_corrupt_blob_in_the_registry_is_rejected_and_leaves_nothing() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let (reg, tmp, layout) = registry_with(&[], "demo/bad:1")?;
    // Flip a byte of the busybox layer where the registry stores it.
    let (digest, size) = layout_layers(&layout)?[0].clone();
    let path = reg.blob_path(&digest);
    let mut bytes = fs::read(&path)?;
    assert_eq!(bytes.len() as u64, size);
    bytes[size as usize / 2] ^= 0x55;
    fs::write(&path, bytes)?;

    let data = tmp.path().join("agent");

    let _cleanup_data = Cleanup { data: data.clone() };
    let out = agent(
        &data,
        &[
            "--insecure-registry",
            &reg.addr,
            "image",
            "pull",
            &reg.reference("demo/bad:1"),
        ],
    )?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("layer {digest}: digest mismatch (got sha256:")),
        "{err}"
    );
    // Nothing of it in the store; no image recorded; no leftovers.
    let store = ImageStore::open(&data.join("images"))?;
    assert!(store.list()?.is_empty());
    for entry in fs::read_dir(data.join("images/layers/sha256"))? {
        assert!(
            !entry?.path().join("bin/busybox").exists(),
            "corrupt layer kept"
        );
    }
    assert!(tmp_is_empty(&data)?);
    Ok(())
}

#[test]
fn r15_basic_auth_from_a_credentials_file() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let reg = Registry::start_with(Some(("skiff", "s3cret")))?;
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("bb");
    fixture(&layout, &[], &["latest"])?;
    reg.push(&format!("oci:{}", layout.display()), "private/bb:1", &[])?;
    let data = tmp.path().join("agent");
    let _cleanup_data = Cleanup { data: data.clone() };
    let r = reg.reference("private/bb:1");
    let pull = |auth: Option<&Path>| -> Result<Output> {
        let mut args = vec!["--insecure-registry", &reg.addr];
        let auth = auth.map(|p| p.display().to_string());
        if let Some(a) = &auth {
            args.extend(["--auth-file", a]);
        }
        args.extend(["image", "pull", &r]);
        agent(&data, &args)
    };
    let out = pull(None)?;
    assert_fails_with(&out, "unauthorized");

    let auth = tmp.path().join("auth.json");
    write_auth(&auth, &reg.addr, "skiff:wrong")?;
    let out = pull(Some(&auth))?;
    assert_fails_with(&out, "unauthorized");

    write_auth(&auth, &reg.addr, "skiff:s3cret")?;
    stdout_of(&pull(Some(&auth))?)?;

    fs::write(&auth, "{not json")?;
    let out = pull(Some(&auth))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "credentials file {}: invalid json",
            auth.display()
        )),
        "{err}"
    );
    Ok(())
}

#[test]
fn r16_concurrent_pulls_fetch_each_layer_once() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let (reg, tmp, layout) = registry_with(
        &[("FIXTURE_EXTRA_LAYERS", "3"), ("FIXTURE_EXTRA_MB", "8")],
        "demo/big:1",
    )?;
    let data = tmp.path().join("agent");
    let _cleanup_data = Cleanup { data: data.clone() };
    let r = reg.reference("demo/big:1");
    let pulls: Vec<Child> = (0..3)
        .map(|_| {
            Command::new(AGENT)
                .arg("--data-dir")
                .arg(&data)
                .args(["--insecure-registry", &reg.addr, "image", "pull", &r])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    for p in pulls {
        stdout_of(&p.wait_with_output()?)?;
    }
    let layers = layout_layers(&layout)?;
    assert_eq!(layers.len(), 5);
    for (d, _) in &layers {
        assert_eq!(reg.blob_gets(d)?, 1, "layer {d} fetched once by 3 pulls");
    }
    assert_eq!(store_layers(&data)?, 5);
    Ok(())
}

#[test]
fn r17_archives_from_skopeo() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("bb");
    fixture(&layout, &[("FIXTURE_WHITEOUTS", "1")], &["latest"])?;
    let oci_tar = tmp.path().join("bb-oci.tar");
    let docker_tar = tmp.path().join("bb-docker.tar");
    for (dest, what) in [
        (
            format!("oci-archive:{}:v1", oci_tar.display()),
            "oci-archive",
        ),
        (
            format!("docker-archive:{}:demo/bb:1", docker_tar.display()),
            "docker-archive",
        ),
    ] {
        let out = Command::new("skopeo")
            .args(["copy", "-q"])
            .arg(format!("oci:{}", layout.display()))
            .arg(&dest)
            .output()?;
        ensure!(
            out.status.success(),
            "skopeo {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let data = tmp.path().join("agent");
    let _cleanup_data = Cleanup { data: data.clone() };
    let refs = [
        format!("oci-archive:{}:v1", oci_tar.display()),
        format!("docker-archive:{}", docker_tar.display()),
        format!("docker-archive:{}:demo/bb:1", docker_tar.display()),
        format!("docker-archive:{}:@0", docker_tar.display()),
    ];
    for r in &refs {
        let out = stdout_of(&agent(
            &data,
            &[
                "container",
                "run",
                "--rm",
                "--image",
                r,
                "--",
                "sh",
                "-c",
                "test ! -e /etc/skiff-release && cat /opt/data/new",
            ],
        )?)?;
        assert_eq!(out, "new data\n", "{r}");
    }
    // All four share the same three layers.
    assert_eq!(store_layers(&data)?, 3);
    let ls = stdout_of(&agent(&data, &["image", "ls", "-o", "json"])?)?;
    let ls: serde_json::Value = serde_json::from_str(&ls)?;
    assert_eq!(ls.as_array().map(Vec::len), Some(4));
    let ids: Vec<&str> = ls
        .as_array()
        .context("array")?
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "one image id: {ids:?}"
    );

    // Wrong names are named.
    let bad = format!("docker-archive:{}:demo/other:1", docker_tar.display());
    let out = agent(&data, &["image", "pull", &bad])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no manifest tagged \"demo/other:1\" (have: docker.io/demo/bb:1)"),
        "{err}"
    );
    let gz = tmp.path().join("x.tar.gz");
    fs::write(&gz, [0x1f, 0x8b, 8, 0])?;
    let out = agent(
        &data,
        &["image", "pull", &format!("oci-archive:{}", gz.display())],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("compressed"), "{err}");
    Ok(())
}

/// A TCP relay between the agent and the registry that can cut a response short.
struct Relay {
    addr: String,
    /// Cut the connection once after this many bytes from the registry (0: never).
    cut_after: Arc<AtomicU64>,
    /// Stop forwarding registry bytes after this many (0: never), holding connections open.
    stall_after: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
    cuts: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(upstream: &str) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let relay = Relay {
            addr,
            cut_after: Arc::default(),
            stall_after: Arc::default(),
            forwarded: Arc::default(),
            cuts: Arc::default(),
            stop: Arc::default(),
        };
        let (cut, stall, fwd, cuts, stop) = (
            relay.cut_after.clone(),
            relay.stall_after.clone(),
            relay.forwarded.clone(),
            relay.cuts.clone(),
            relay.stop.clone(),
        );
        let upstream = upstream.to_owned();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (c2, s2) = match (client.try_clone(), server.try_clone()) {
                    (Ok(c), Ok(s)) => (c, s),
                    _ => continue,
                };
                std::thread::spawn(move || pump(c2, s2, None));
                let (cut, stall, fwd, cuts) =
                    (cut.clone(), stall.clone(), fwd.clone(), cuts.clone());
                std::thread::spawn(move || {
                    pump(server, client, Some((cut, stall, fwd, cuts)));
                });
            }
        });
        Ok(relay)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}

type Limits = (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
);

fn pump(mut from: TcpStream, mut to: TcpStream, limits: Option<Limits>) {
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((cut, stall, fwd, cuts)) = &limits {
            let before = fwd.fetch_add(n as u64, Ordering::Relaxed);
            let c = cut.load(Ordering::Relaxed);
            if c > 0 && before + n as u64 > c {
                cut.store(0, Ordering::Relaxed);
                cuts.fetch_add(1, Ordering::Relaxed);
                let keep = c.saturating_sub(before) as usize;
                let _ = to.write_all(&buf[..keep.min(n)]);
                break;
            }
            let s = stall.load(Ordering::Relaxed);
            if s > 0 && before + n as u64 > s {
                // Hold the connection open without forwarding, until the client goes away.
                let _ = from.read(&mut buf);
                std::thread::sleep(Duration::from_secs(30));
                break;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[test]
fn r18_broken_download_resumes_and_killed_pull_restarts_cleanly() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let (reg, tmp, layout) = registry_with(
        &[("FIXTURE_EXTRA_LAYERS", "1"), ("FIXTURE_EXTRA_MB", "16")],
        "demo/big:1",
    )?;
    let relay = Relay::start(&reg.addr)?;
    let r = format!("{}/demo/big:1", relay.addr);
    let data = tmp.path().join("agent");
    let _cleanup_data = Cleanup { data: data.clone() };

    // The connection breaks 4 MiB into the pull: the download resumes from where it broke.
    relay.cut_after.store(4 << 20, Ordering::Relaxed);
    let out = agent(
        &data,
        &["--insecure-registry", &relay.addr, "image", "pull", &r],
    )?;
    stdout_of(&out)?;
    assert_eq!(relay.cuts.load(Ordering::Relaxed), 1, "the relay cut once");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("layer download broke; resuming"), "{log}");
    let big = layout_layers(&layout)?
        .into_iter()
        .max_by_key(|(_, s)| *s)
        .context("layers")?;
    assert!(reg.blob_gets(&big.0)? >= 1);
    let out = stdout_of(&agent(&data, &["image", "ls", "-o", "json"])?)?;
    assert!(out.contains(&r), "{out}");

    // A pull killed mid-layer (SIGKILL) leaves no half layer in the store; the next pull
    // starts that layer over and succeeds.
    let data2 = tmp.path().join("agent2");
    let _cleanup_data2 = Cleanup {
        data: data2.clone(),
    };
    relay.forwarded.store(0, Ordering::Relaxed);
    relay.stall_after.store(6 << 20, Ordering::Relaxed);
    let mut child = Command::new(AGENT)
        .arg("--data-dir")
        .arg(&data2)
        .args(["--insecure-registry", &relay.addr, "image", "pull", &r])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.forwarded.load(Ordering::Relaxed) < 6 << 20 {
        ensure!(Instant::now() < deadline, "pull never reached the stall");
        ensure!(child.try_wait()?.is_none(), "pull ended before the stall");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill()?;
    child.wait()?;
    for entry in fs::read_dir(data2.join("images/layers/sha256"))? {
        assert!(
            !entry?.path().join("data").exists(),
            "half layer in the store"
        );
    }
    relay.stall_after.store(0, Ordering::Relaxed);
    stdout_of(&agent(
        &data2,
        &["--insecure-registry", &relay.addr, "image", "pull", &r],
    )?)?;
    assert!(tmp_is_empty(&data2)?);
    assert_eq!(store_layers(&data2)?, 3);
    Ok(())
}

#[test]
fn r19_rm_and_prune_keep_what_is_used() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let plain = tmp.path().join("plain");
    let wh = tmp.path().join("wh");
    fixture(&plain, &[], &["latest"])?;
    fixture(&wh, &[("FIXTURE_WHITEOUTS", "1")], &["latest"])?;
    reg.push(&format!("oci:{}", plain.display()), "demo/plain:1", &[])?;
    reg.push(&format!("oci:{}", wh.display()), "demo/wh:1", &[])?;
    let data = tmp.path().join("agent");
    let _cleanup_data = Cleanup { data: data.clone() };
    let (a, b) = (reg.reference("demo/plain:1"), reg.reference("demo/wh:1"));
    let ins = ["--insecure-registry", reg.addr.as_str()];
    stdout_of(&agent(&data, &[&ins[..], &["image", "pull", &a]].concat())?)?;
    stdout_of(&agent(&data, &[&ins[..], &["image", "pull", &b]].concat())?)?;
    // The whiteout image shares the plain image's two layers and adds one.
    assert_eq!(store_layers(&data)?, 3);
    // A container (exited, record kept) uses the plain image.
    let out = agent(
        &data,
        &[
            "container",
            "run",
            "--name",
            "user",
            "--image",
            &a,
            "--",
            "true",
        ],
    )?;
    stdout_of(&out)?;

    let out = agent(&data, &["image", "rm", &a])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("image {a} is used by container")),
        "{err}"
    );
    stdout_of(&agent(&data, &["image", "rm", &b])?)?;
    // Leftovers of an interrupted pull go too.
    fs::create_dir_all(data.join("images/tmp/layer-deadbeef/x"))?;
    let report = stdout_of(&agent(&data, &["image", "prune", "-o", "json"])?)?;
    let report: serde_json::Value = serde_json::from_str(&report)?;
    assert_eq!(
        report["layers"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert!(report["bytes"].as_u64().context("bytes")? > 0);
    assert_eq!(store_layers(&data)?, 2);
    assert!(tmp_is_empty(&data)?);

    // `rm --force` forgets the image; its layers stay while the container exists...
    stdout_of(&agent(&data, &["image", "rm", "--force", &a])?)?;
    let report = stdout_of(&agent(&data, &["image", "prune", "-o", "json"])?)?;
    assert!(report.contains("\"layers\": []"), "{report}");
    // ... and the container still runs from them.
    stdout_of(&agent(&data, &["container", "rm", "user"])?)?;
    let report = stdout_of(&agent(&data, &["image", "prune", "-o", "json"])?)?;
    let report: serde_json::Value = serde_json::from_str(&report)?;
    assert_eq!(
        report["layers"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    assert_eq!(store_layers(&data)?, 0);
    Ok(())
}

#[test]
fn r20_progress_on_a_terminal() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    if !skiff_testkit::require(&[skiff_testkit::tool("script", "util-linux")]) {
        return Ok(());
    }
    let (reg, tmp, layout) = registry_with(
        &[("FIXTURE_EXTRA_LAYERS", "1"), ("FIXTURE_EXTRA_MB", "8")],
        "demo/big:1",
    )?;
    let data = tmp.path().join("agent");
    let _cleanup_data = Cleanup { data: data.clone() };
    let cmd = format!(
        "{AGENT} --data-dir {} --insecure-registry {} image pull {}",
        data.display(),
        reg.addr,
        reg.reference("demo/big:1")
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // One line per layer: short digest, sizes, and how it ended.
    for (digest, _) in layout_layers(&layout)? {
        let short = &digest["sha256:".len().."sha256:".len() + 12];
        assert!(text.contains(short), "no progress for {short}: {text}");
    }
    assert!(text.contains("done") && text.contains("MiB"), "{text}");
    // Not a terminal: no progress bars, just the result line.
    let out = stdout_of(&agent(
        &data,
        &[
            "--insecure-registry",
            &reg.addr,
            "image",
            "pull",
            &reg.reference("demo/big:1"),
        ],
    )?)?;
    assert_eq!(out.lines().count(), 1, "{out}");
    Ok(())
}

/// A token-auth front for a registry, as Docker Hub or Harbor put one: `/v2/...` needs
/// `Authorization: Bearer TOKEN` (else 401 with a Bearer challenge naming the realm), and the
/// realm `/token` hands out TOKEN for the right basic credentials. Authorized requests are
/// relayed to the real registry.
struct TokenGateway {
    addr: String,
    token_requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

const GATEWAY_TOKEN: &str = "tok-8f2e1c";

impl TokenGateway {
    fn start(upstream: &str, user: &str, password: &str) -> Result<TokenGateway> {
        use base64::Engine as _;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let basic = format!(
            "basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let gw = TokenGateway {
            addr: addr.clone(),
            token_requests: Arc::default(),
            stop: Arc::default(),
        };
        let (tokens, stop) = (gw.token_requests.clone(), gw.stop.clone());
        let upstream = upstream.to_owned();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (upstream, addr, basic, tokens) = (
                    upstream.clone(),
                    addr.clone(),
                    basic.clone(),
                    tokens.clone(),
                );
                std::thread::spawn(move || {
                    let _ = serve_gateway(conn, &upstream, &addr, &basic, &tokens);
                });
            }
        });
        Ok(gw)
    }
}

impl Drop for TokenGateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}

/// One connection: one request (no bodies: the client only GETs), one response, close.
fn serve_gateway(
    mut conn: TcpStream,
    upstream: &str,
    addr: &str,
    basic: &str,
    tokens: &AtomicU64,
) -> Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
        ensure!(head.len() < 64 << 10, "request head too large");
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let auth = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let reply = |conn: &mut TcpStream, status: &str, extra: &str, body: &str| {
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n{extra}\r\n{body}",
            body.len()
        );
    };
    if path.starts_with("/token") {
        tokens.fetch_add(1, Ordering::Relaxed);
        if auth.eq_ignore_ascii_case(basic) {
            reply(
                &mut conn,
                "200 OK",
                "",
                &format!(r#"{{"token":"{GATEWAY_TOKEN}","expires_in":300}}"#),
            );
        } else {
            reply(
                &mut conn,
                "401 Unauthorized",
                "",
                r#"{"details":"bad credentials"}"#,
            );
        }
        return Ok(());
    }
    if auth != format!("Bearer {GATEWAY_TOKEN}") {
        reply(
            &mut conn,
            "401 Unauthorized",
            &format!(
                "WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"skiff-test\"\r\n"
            ),
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
        );
        return Ok(());
    }
    let mut server = TcpStream::connect(upstream)?;
    let forwarded = text.replacen("\r\n", "\r\nConnection: close\r\n", 1);
    server.write_all(forwarded.as_bytes())?;
    std::io::copy(&mut server, &mut conn)?;
    Ok(())
}

#[test]
fn r21_bearer_token_auth() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let (reg, tmp, _) = registry_with(&[], "private/bb:1")?;
    let gw = TokenGateway::start(&reg.addr, "skiff", "s3cret")?;
    let r = format!("{}/private/bb:1", gw.addr);
    let auth = tmp.path().join("auth.json");
    let pull = |data: &Path| -> Result<Output> {
        agent(
            data,
            &[
                "--insecure-registry",
                &gw.addr,
                "--auth-file",
                &auth.display().to_string(),
                "image",
                "pull",
                &r,
            ],
        )
    };

    // Basic credentials are exchanged at the realm for a bearer token.
    write_auth(&auth, &gw.addr, "skiff:wrong")?;
    let out = pull(&tmp.path().join("a"))?;
    assert_fails_with(&out, "unauthorized");
    write_auth(&auth, &gw.addr, "skiff:s3cret")?;
    let before = gw.token_requests.load(Ordering::Relaxed);
    stdout_of(&pull(&tmp.path().join("b"))?)?;
    assert!(
        gw.token_requests.load(Ordering::Relaxed) > before,
        "token fetched"
    );

    // A registry token in the file is used as is.
    fs::write(
        &auth,
        format!(
            r#"{{"auths":{{"{}":{{"registrytoken":"{GATEWAY_TOKEN}"}}}}}}"#,
            gw.addr
        ),
    )?;
    let before = gw.token_requests.load(Ordering::Relaxed);
    stdout_of(&pull(&tmp.path().join("c"))?)?;
    assert_eq!(gw.token_requests.load(Ordering::Relaxed), before);
    Ok(())
}
