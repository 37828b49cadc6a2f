//! The mesh sidecars: one `skiff-agent proxy` process per allocation of a job with `[mesh]`
//! (see the `skiff-proxy` crate), in the allocation's network namespace, in a cgroup of its
//! own, as an unprivileged user.
//!
//! For each allocation the agent keeps a directory `<data-dir>/mesh/<alloc>/` owned by the
//! proxy's user: `proxy.json` (the policy), `services.json` (the cluster's services, rewritten
//! as they change), and the workload's key, certificate and CA bundle. The key is made here
//! and never leaves the node; the controllers sign it only for an allocation assigned to this
//! node. Certificates are renewed at two thirds of their life; the proxy picks up new files
//! by itself, so open connections are not dropped.
//!
//! Inside the allocation's namespace, nat rules send the workload's TCP connections to
//! service virtual IPs to the proxy's outbound port (except the proxy's own, by user id), and
//! connections arriving for the workload's TCP ports to its inbound port.
//!
//! The proxy outlives agent restarts (like the containers): its pid is kept beside its
//! directory and adopted when the process is still that proxy.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use skiff_proto::v1 as pb;
use skiff_proto::v1::pki_client::PkiClient;
use skiff_proxy::config::{self as pc, ProxyConfig};
use skiff_runtime::cgroup::{self, Limits};
use skiff_tls::pki::{first_cert, key_and_csr, now_unix, parse_cert};
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::contract::{Assigned, MeshTask, Task};

/// The sidecars' user and group id unless `--mesh-proxy-uid` says otherwise.
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// How long a new sidecar has to answer `/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The sidecar's cgroup limits.
pub const PROXY_LIMITS: Limits = Limits {
    cpu: None,
    memory: Some(64 * 1024 * 1024),
    pids: Some(64),
};

/// See [`Mesh`].
#[derive(Clone, Debug)]
pub struct MeshOptions {
    pub uid: u32,
    pub gid: u32,
    /// The lifetime asked for each workload certificate.
    pub cert_ttl: Duration,
    pub data_dir: PathBuf,
    pub cgroup_parent: String,
}

/// The node's sidecars.
pub struct Mesh {
    opts: MeshOptions,
    /// The sidecar's program and the arguments before its own: `skiff-proxy` next to this
    /// binary, else this binary's `proxy` mode.
    proxy_cmd: (PathBuf, Option<&'static str>),
    handle: tokio::runtime::Handle,
    /// A connection to the controllers, while the agent has one.
    channel: Mutex<Option<Channel>>,
    /// The cluster's service CIDR (the outbound redirect's target).
    service_cidr: Mutex<Option<String>>,
    /// `services.json` as last rendered.
    services: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes `name` in `dir` by rename (the proxy never reads half a file), owned by `uid`.
fn write_file(dir: &Path, name: &str, text: &str, mode: u32, uid: u32) -> Result<(), String> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let err = |e: std::io::Error| format!("writing {}: {e}", dir.join(name).display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    chown(&tmp, Some(uid), Some(uid)).map_err(err)?;
    std::fs::rename(&tmp, dir.join(name)).map_err(err)
}

/// The nat rules of an allocation's namespace (an `iptables-restore` input for the table).
pub fn render_rules(uid: u32, service_cidr: &str, ports: &[u16]) -> String {
    let mut r = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:SKIFF-MESH-IN - [0:0]\n:SKIFF-MESH-OUT - [0:0]\n-A PREROUTING -p tcp -j SKIFF-MESH-IN\n-A OUTPUT -p tcp -j SKIFF-MESH-OUT\n",
    );
    // multiport takes at most 15 ports per rule.
    for chunk in ports.chunks(15) {
        let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
        r.push_str(&format!(
            "-A SKIFF-MESH-IN -p tcp -m multiport --dports {} -j REDIRECT --to-ports {}\n",
            list.join(","),
            pc::INBOUND_PORT
        ));
    }
    r.push_str(&format!(
        "-A SKIFF-MESH-OUT -m owner --uid-owner {uid} -j RETURN\n-A SKIFF-MESH-OUT -d {service_cidr} -p tcp -j REDIRECT --to-ports {}\nCOMMIT\n",
        pc::OUTBOUND_PORT
    ));
    r
}

/// The proxy's policy for an allocation.
pub fn proxy_config(mesh: &MeshTask, task: &Task, version: u64) -> ProxyConfig {
    let mut inbound_ports: Vec<u16> = task
        .ports
        .iter()
        .filter(|p| !p.udp)
        .map(|p| p.port)
        .collect();
    inbound_ports.sort_unstable();
    inbound_ports.dedup();
    let mut http_ports: Vec<u16> = task
        .ports
        .iter()
        .filter(|p| p.http)
        .map(|p| p.port)
        .collect();
    http_ports.sort_unstable();
    http_ports.dedup();
    ProxyConfig {
        http_ports,
        version,
        identity: mesh.identity.clone(),
        mode: mesh.mode,
        allow_from: mesh.allow_from.clone(),
        upstreams: mesh.upstreams.clone(),
        inbound_ports,
        outbound_port: pc::OUTBOUND_PORT,
        inbound_port: pc::INBOUND_PORT,
        admin_port: pc::ADMIN_PORT,
    }
}

/// A workload certificate: (not_before, not_after).
fn validity(cert_pem: &str) -> Option<(i64, i64)> {
    let der = first_cert(cert_pem).ok()?;
    let info = parse_cert(der.as_ref()).ok()?;
    Some((info.not_before, info.not_after))
}

/// Whether a certificate valid over (nb, na) is due for renewal at `now`.
pub fn due(nb: i64, na: i64, now: i64) -> bool {
    now >= nb + (na - nb) * 2 / 3
}

/// The sidecar's program: `skiff-proxy` installed next to the agent (a small binary, so each
/// sidecar maps little code), else the agent's own copy (`skiff-agent proxy`), which works the
/// same at several megabytes more resident memory per sidecar.
fn proxy_command(agent: &Path) -> (PathBuf, Option<&'static str>) {
    let small = agent.with_file_name("skiff-proxy");
    if small.is_file() {
        info!(program = %small.display(), "mesh sidecars run as skiff-proxy");
        (small, None)
    } else {
        warn!(
            missing = %small.display(),
            "mesh sidecars run as `skiff-agent proxy`: install skiff-proxy next to the agent \
             for a smaller sidecar"
        );
        (agent.to_path_buf(), Some("proxy"))
    }
}

impl Mesh {
    pub fn new(opts: MeshOptions, handle: tokio::runtime::Handle) -> anyhow::Result<Mesh> {
        let proxy_cmd = proxy_command(&std::env::current_exe()?);
        let root = opts.data_dir.join("mesh");
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))?;
        Ok(Mesh {
            opts,
            proxy_cmd,
            handle,
            channel: Mutex::default(),
            service_cidr: Mutex::default(),
            services: Mutex::new(
                serde_json::to_string(&pc::ServiceSet::default()).unwrap_or_default(),
            ),
        })
    }

    fn root(&self) -> PathBuf {
        self.opts.data_dir.join("mesh")
    }

    fn dir(&self, alloc: &str) -> PathBuf {
        self.root().join(alloc)
    }

    fn pid_file(&self, alloc: &str) -> PathBuf {
        self.root().join(format!("{alloc}.pid"))
    }

    pub fn set_channel(&self, channel: Option<Channel>) {
        *lock(&self.channel) = channel;
    }

    pub fn set_service_cidr(&self, cidr: &str) {
        *lock(&self.service_cidr) = (!cidr.is_empty()).then(|| cidr.to_owned());
    }

    /// The allocations with a sidecar directory.
    pub fn allocations(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root())
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The sidecar's pid, when its process is alive and is that sidecar.
    pub fn running(&self, alloc: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file(alloc))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let dir = self.dir(alloc);
        let want = dir.as_os_str().as_encoded_bytes();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // A zombie (ended, not yet reaped) is not running.
        let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
        (cmdline.split(|b| *b == 0).any(|a| a == want) && state != Some(Some('Z'))).then_some(pid)
    }

    /// The new service set: rewritten for every sidecar when it changed.
    pub fn set_services(&self, list: &[pb::ServiceInfo]) {
        let text = serde_json::to_string(&crate::contract::mesh_services(list)).unwrap_or_default();
        {
            let mut cur = lock(&self.services);
            if *cur == text {
                return;
            }
            *cur = text.clone();
        }
        for alloc in self.allocations() {
            if let Err(e) = write_file(
                &self.dir(&alloc),
                pc::SERVICES_FILE,
                &text,
                0o644,
                self.opts.uid,
            ) {
                warn!(alloc = %alloc, error = %e, "updating the sidecar's service set");
            }
        }
    }

    async fn sign(&self, alloc: &str) -> Result<(String, String, String), String> {
        let channel = lock(&self.channel)
            .clone()
            .ok_or_else(|| "no controller to sign the workload certificate".to_owned())?;
        let (key, csr) = key_and_csr(alloc).map_err(|e| e.to_string())?;
        let mut client = PkiClient::new(channel);
        let call = client.sign_workload(pb::SignWorkloadRequest {
            allocation: alloc.to_owned(),
            csr_pem: csr,
            ttl_seconds: self.opts.cert_ttl.as_secs(),
        });
        let r = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .map_err(|_| "signing the workload certificate timed out".to_owned())?
            .map_err(|s| format!("signing the workload certificate: {}", s.message()))?
            .into_inner();
        Ok((key, r.cert_pem, r.ca_pem))
    }

    fn store_cert(
        &self,
        alloc: &str,
        (key, cert, ca): (String, String, String),
    ) -> Result<(), String> {
        let dir = self.dir(alloc);
        write_file(&dir, pc::CA_FILE, &ca, 0o644, self.opts.uid)?;
        write_file(&dir, pc::KEY_FILE, &key, 0o400, self.opts.uid)?;
        write_file(&dir, pc::CERT_FILE, &cert, 0o644, self.opts.uid)
    }

    /// Renews the certificates that are due (every sidecar's, each on its own).
    pub async fn renew_due(&self) {
        let now = now_unix();
        for alloc in self.allocations() {
            let cert = std::fs::read_to_string(self.dir(&alloc).join(pc::CERT_FILE));
            let Some((nb, na)) = cert.ok().as_deref().and_then(validity) else {
                continue;
            };
            if !due(nb, na, now) {
                continue;
            }
            match self.sign(&alloc).await {
                Ok(m) => match self.store_cert(&alloc, m) {
                    Ok(()) => info!(alloc = %alloc, "workload certificate renewed"),
                    Err(e) => warn!(alloc = %alloc, error = %e, "storing a renewed certificate"),
                },
                Err(e) => warn!(alloc = %alloc, error = %e, "renewing the workload certificate"),
            }
        }
    }

    /// Makes sure the sidecar of `alloc` runs and is ready (starting it if not): its
    /// directory, certificate, the namespace's rules, its cgroup and process.
    pub fn ensure(
        &self,
        alloc: &Assigned,
        mesh: &MeshTask,
        task: &Task,
        netns: &Path,
    ) -> Result<(), String> {
        if self.running(&alloc.id).is_some() {
            return Ok(());
        }
        let cidr = lock(&self.service_cidr).clone().ok_or_else(|| {
            "the mesh needs the cluster's service CIDR (not registered yet)".to_owned()
        })?;
        let dir = self.dir(&alloc.id);
        let uid = self.opts.uid;
        let io = |what: &str, e: std::io::Error| format!("mesh sidecar: {what}: {e}");
        std::fs::create_dir_all(&dir).map_err(|e| io("its directory", e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("its directory", e))?;
        chown(&dir, Some(uid), Some(uid)).map_err(|e| io("its directory", e))?;
        let cfg = proxy_config(mesh, task, alloc.version);
        write_file(
            &dir,
            pc::CONFIG_FILE,
            &serde_json::to_string_pretty(&cfg).unwrap_or_default(),
            0o644,
            uid,
        )?;
        let services = lock(&self.services).clone();
        write_file(&dir, pc::SERVICES_FILE, &services, 0o644, uid)?;
        // A certificate still good (the sidecar died, or the agent restarted) is kept.
        let valid = std::fs::read_to_string(dir.join(pc::CERT_FILE))
            .ok()
            .as_deref()
            .and_then(validity)
            .is_some_and(|(nb, na)| !due(nb, na, now_unix()))
            && dir.join(pc::KEY_FILE).exists();
        if !valid {
            let m = self.handle.block_on(self.sign(&alloc.id))?;
            self.store_cert(&alloc.id, m)?;
        }
        apply_rules(netns, &render_rules(uid, &cidr, &cfg.inbound_ports))?;
        let manager = cgroup::host(&self.opts.cgroup_parent).map_err(|e| e.to_string())?;
        let name = format!("mesh-{}", alloc.id);
        let cg = match manager.open(&name).map_err(|e| e.to_string())? {
            Some(cg) => cg,
            None => manager
                .create(&name, &PROXY_LIMITS)
                .map_err(|e| e.to_string())?,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root().join(format!("{}.log", alloc.id)))
            .map_err(|e| io("its log", e))?;
        let args = skiff_proxy::Args {
            dir: dir.clone(),
            netns: Some(netns.to_path_buf()),
            user: Some((uid, self.opts.gid)),
            cgroups: cg.paths(),
        };
        let mut cmd = Command::new(&self.proxy_cmd.0);
        cmd.args(self.proxy_cmd.1).args(args.to_args());
        use std::os::unix::process::CommandExt as _;
        let mut child = cmd
            .env(
                "SKIFF_LOG",
                std::env::var("SKIFF_PROXY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| io("starting it", e))?;
        let pid = child.id();
        std::fs::write(self.pid_file(&alloc.id), pid.to_string())
            .map_err(|e| io("its pid file", e))?;
        // Ready: its admin port answers with its own pid (not another process's, say one
        // left from an earlier start).
        let deadline = Instant::now() + READY_TIMEOUT;
        let outcome = loop {
            let answer = admin_get(netns, "/ready");
            if answer
                .as_deref()
                .ok()
                .and_then(|b| b.trim().strip_prefix("ready "))
                .and_then(|p| p.parse::<u32>().ok())
                == Some(pid)
            {
                break Ok(());
            }
            match child.try_wait() {
                Ok(Some(status)) => break Err(format!("it exited ({status})")),
                Ok(None) => {}
                Err(e) => break Err(format!("waiting for it: {e}")),
            }
            if Instant::now() > deadline {
                break Err(format!(
                    "no answer in {}s ({})",
                    READY_TIMEOUT.as_secs(),
                    answer
                        .err()
                        .unwrap_or_else(|| "another process answered".into())
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Err(why) = outcome {
            // Ours to end: nothing may keep its ports or its directory.
            let _ = child.kill();
            let _ = child.wait();
            let tail = std::fs::read_to_string(self.root().join(format!("{}.log", alloc.id)))
                .unwrap_or_default();
            let last = tail.lines().last().unwrap_or("").to_owned();
            self.remove(&alloc.id);
            return Err(format!("mesh sidecar did not become ready: {why}: {last}"));
        }
        // Our child until we exit: reap it when it ends.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        info!(alloc = %alloc.id, pid, identity = %cfg.identity, "mesh sidecar ready");
        Ok(())
    }

    /// Stops the sidecar of `alloc` and removes what it had (its rules go with the namespace).
    pub fn remove(&self, alloc: &str) {
        if !self.dir(alloc).exists() && !self.pid_file(alloc).exists() {
            return;
        }
        info!(alloc = %alloc, "stopping the mesh sidecar");
        if let Some(pid) = self.running(alloc) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Ok(manager) = cgroup::host(&self.opts.cgroup_parent)
            && let Ok(Some(cg)) = manager.open(&format!("mesh-{alloc}"))
            && let Err(e) = cg.kill_all().and_then(|()| cg.delete())
        {
            warn!(alloc = %alloc, error = %e, "removing the sidecar's cgroup");
        }
        let _ = std::fs::remove_dir_all(self.dir(alloc));
        let _ = std::fs::remove_file(self.pid_file(alloc));
        let _ = std::fs::remove_file(self.root().join(format!("{alloc}.log")));
    }
}

/// One sidecar's `/metrics`, read from inside the allocation's namespace.
fn scrape(netns: &Path) -> Result<String, String> {
    admin_get(netns, "/metrics")
}

/// The body of a 200 answer of the sidecar's admin port to `GET path`, from inside the
/// allocation's namespace.
fn admin_get(netns: &Path, path: &str) -> Result<String, String> {
    use std::io::Read as _;
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    crate::health::in_netns(Some(netns), move || {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], pc::ADMIN_PORT));
        let timeout = Duration::from_secs(2);
        let mut s =
            std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.take(4 << 20)
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.to_owned()),
            Some((head, _)) => Err(head.lines().next().unwrap_or_default().to_owned()),
            None => Err("no answer".into()),
        }
    })
}

/// A metric family as the agent re-exposes it: its HELP and TYPE lines, and every sidecar's
/// samples.
#[derive(Debug, Default)]
struct Family {
    name: String,
    header: Vec<String>,
    samples: Vec<String>,
}

/// Adds one sidecar's exposition `text` to `families`, every sample labelled `alloc`.
fn merge(families: &mut Vec<Family>, label: &str, text: &str) {
    let mut current: Option<usize> = None;
    for line in text.lines() {
        let header = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "));
        if let Some(rest) = header {
            let name = rest.split(' ').next().unwrap_or_default();
            let i = match families.iter().position(|f| f.name == name) {
                Some(i) => i,
                None => {
                    families.push(Family {
                        name: name.to_owned(),
                        ..Family::default()
                    });
                    families.len() - 1
                }
            };
            if !families[i].header.iter().any(|h| h == line) {
                families[i].header.push(line.to_owned());
            }
            current = Some(i);
        } else if !line.is_empty() && !line.starts_with('#') {
            let Some(i) = current else { continue };
            let sample = match line.find('{') {
                Some(b) => format!("{}{{{label},{}", &line[..b], &line[b + 1..]),
                None => match line.split_once(' ') {
                    Some((n, v)) => format!("{n}{{{label}}} {v}"),
                    None => continue,
                },
            };
            families[i].samples.push(sample);
        }
    }
}

impl Mesh {
    /// The metrics of every running sidecar (`only`: of that allocation's), each sample
    /// labelled with `label(alloc)` (e.g. `alloc="..."`), one family at a time. `netns` finds
    /// an allocation's namespace.
    pub fn metrics(
        &self,
        only: Option<&str>,
        label: impl Fn(&str) -> String,
        netns: impl Fn(&str) -> Option<PathBuf>,
    ) -> String {
        let mut families = Vec::new();
        for alloc in self.allocations() {
            if only.is_some_and(|o| o != alloc) || self.running(&alloc).is_none() {
                continue;
            }
            let Some(ns) = netns(&alloc) else { continue };
            match scrape(&ns) {
                Ok(text) => merge(&mut families, &label(&alloc), &text),
                Err(e) => tracing::debug!(alloc = %alloc, error = %e, "scraping a sidecar"),
            }
        }
        let mut out = String::new();
        for f in families {
            for h in &f.header {
                out.push_str(h);
                out.push('\n');
            }
            for s in &f.samples {
                out.push_str(s);
                out.push('\n');
            }
        }
        out
    }
}

/// The value of label `name` in a sample line's label set.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let rest = &line[start..];
    Some(&rest[..rest.find('"')?])
}

/// A sidecar's request counts from its exposition `text`: every caller and class summed.
pub fn request_stats(alloc: &str, text: &str) -> pb::RequestStats {
    let mut stats = pb::RequestStats {
        allocation: alloc.to_owned(),
        ..pb::RequestStats::default()
    };
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for line in text.lines() {
        let Some(value) = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
        else {
            continue;
        };
        // Counters are whole numbers.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = value as u64;
        if line.starts_with("skiff_mesh_requests_total{") {
            stats.requests += n;
            if matches!(label(line, "class"), Some("5xx" | "error")) {
                stats.errors += n;
            }
        } else if line.starts_with("skiff_mesh_request_duration_seconds_bucket{") {
            let Some(le) = label(line, "le").and_then(|le| match le {
                "+Inf" => Some(f64::INFINITY),
                v => v.parse::<f64>().ok(),
            }) else {
                continue;
            };
            match buckets.iter_mut().find(|b| b.0 == le) {
                Some(b) => b.1 += n,
                None => buckets.push((le, n)),
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    stats.bucket_bounds = buckets.iter().map(|b| b.0).collect();
    stats.bucket_counts = buckets.iter().map(|b| b.1).collect();
    stats
}

impl Mesh {
    /// The request counts of the running sidecars of `allocs` (those that answer).
    pub fn request_stats(
        &self,
        allocs: &[String],
        netns: impl Fn(&str) -> Option<PathBuf>,
    ) -> Vec<pb::RequestStats> {
        let mut out = Vec::new();
        for alloc in allocs {
            if self.running(alloc).is_none() {
                continue;
            }
            let Some(ns) = netns(alloc) else { continue };
            match scrape(&ns) {
                Ok(text) => out.push(request_stats(alloc, &text)),
                Err(e) => {
                    tracing::debug!(alloc = %alloc, error = %e, "reading a sidecar's requests")
                }
            }
        }
        out
    }
}

/// Loads `rules` into the nat table of the namespace at `netns`.
fn apply_rules(netns: &Path, rules: &str) -> Result<(), String> {
    crate::net::hostport::iptables_restore(
        Some(netns),
        &[],
        rules,
        "the sidecar's redirects in the allocation's namespace",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_stats_sum_callers_and_classes() {
        let text = "# HELP skiff_mesh_requests_total x\n# TYPE skiff_mesh_requests_total counter\n\
            skiff_mesh_requests_total{identity=\"a\",version=\"2\",source=\"client\",class=\"2xx\"} 7\n\
            skiff_mesh_requests_total{identity=\"a\",version=\"2\",source=\"client\",class=\"5xx\"} 2\n\
            skiff_mesh_requests_total{identity=\"a\",version=\"2\",source=\"plaintext\",class=\"error\"} 1\n\
            skiff_mesh_request_duration_seconds_bucket{identity=\"a\",class=\"2xx\",le=\"0.005\"} 6\n\
            skiff_mesh_request_duration_seconds_bucket{identity=\"a\",class=\"2xx\",le=\"+Inf\"} 7\n\
            skiff_mesh_request_duration_seconds_bucket{identity=\"a\",class=\"5xx\",le=\"0.005\"} 0\n\
            skiff_mesh_request_duration_seconds_bucket{identity=\"a\",class=\"5xx\",le=\"+Inf\"} 3\n\
            skiff_mesh_open_connections{direction=\"inbound\"} 4\n";
        let s = request_stats("x", text);
        assert_eq!((s.requests, s.errors), (10, 3));
        assert_eq!(s.bucket_bounds, vec![0.005, f64::INFINITY]);
        assert_eq!(s.bucket_counts, vec![6, 10]);
    }

    #[test]
    fn rules_redirect_workload_ports_in_and_service_ips_out_but_not_the_proxy() {
        let r = render_rules(1337, "10.43.0.0/16", &[8080, 9090]);
        assert!(r.contains(
            "-A SKIFF-MESH-IN -p tcp -m multiport --dports 8080,9090 -j REDIRECT --to-ports 15006\n"
        ));
        let own = r.find("--uid-owner 1337 -j RETURN").expect("own traffic");
        let out = r
            .find("-d 10.43.0.0/16 -p tcp -j REDIRECT --to-ports 15001")
            .expect("outbound");
        assert!(
            own < out,
            "the proxy's own connections must return first:\n{r}"
        );
        assert!(r.ends_with("COMMIT\n"));
        let many: Vec<u16> = (1..=20).collect();
        assert_eq!(
            render_rules(1, "10.43.0.0/16", &many)
                .matches("multiport")
                .count(),
            2
        );
        assert!(!render_rules(1, "10.43.0.0/16", &[]).contains("SKIFF-MESH-IN -p tcp -m"));
    }

    #[test]
    fn sidecar_metrics_merge_by_family_with_the_allocation_label() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total{identity=\"api.default\"} 3\n# HELP y Y.\n# TYPE y gauge\ny 1\n";
        let mut f = Vec::new();
        merge(&mut f, "alloc=\"a1\"", a);
        merge(&mut f, "alloc=\"a2\"", a);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].header.len(), 2);
        assert_eq!(
            f[0].samples,
            [
                "x_total{alloc=\"a1\",identity=\"api.default\"} 3",
                "x_total{alloc=\"a2\",identity=\"api.default\"} 3"
            ]
        );
        assert_eq!(f[1].samples, ["y{alloc=\"a1\"} 1", "y{alloc=\"a2\"} 1"]);
    }

    #[test]
    fn renewal_is_due_at_two_thirds() {
        assert!(!due(0, 300, 199));
        assert!(due(0, 300, 200));
        assert!(due(0, 300, 400));
    }
}
