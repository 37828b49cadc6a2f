//! A 3-member etcd cluster on loopback (Debian's `etcd-server`, etcd 3.4), the benchmark's anchor.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::{Instant, sleep, timeout};

use crate::cluster::{Cluster, Writer, channel};
use crate::procs::{Procs, free_ports};

/// The generated client for the subset of etcd's API in `e2e/proto/etcd/rpc.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::maintenance_client::MaintenanceClient;

/// Where Debian's `etcd-server` package installs etcd.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

const POLL: Duration = Duration::from_millis(50);
const POLL_TIMEOUT: Duration = Duration::from_secs(1);

struct Member {
    name: String,
    data_dir: PathBuf,
    client: String,
    peer: String,
    log: PathBuf,
    /// etcd's member id, learned from the first successful `Status`.
    id: Option<u64>,
}

/// The cluster; dropping it SIGKILLs every member.
pub struct Etcd {
    bin: PathBuf,
    version: String,
    members: Vec<Member>,
    initial_cluster: String,
    procs: Procs,
}

/// `etcd --version`'s first line's version, e.g. `3.4.23`.
pub fn version(bin: &Path) -> Result<String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("run {} --version", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("{} --version: unexpected output {text:?}", bin.display()))
}

impl Etcd {
    /// Starts three members with a static `--initial-cluster` and waits until all are healthy.
    pub async fn start(bin: &Path, dir: &Path, deadline: Instant) -> Result<Etcd> {
        let version = version(bin)?;
        let ports = free_ports(6)?;
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                name: format!("m{}", i + 1),
                data_dir: dir.join(format!("etcd-{}", i + 1)),
                client: format!("127.0.0.1:{}", ports[2 * i]),
                peer: format!("127.0.0.1:{}", ports[2 * i + 1]),
                log: dir.join(format!("etcd-{}.log", i + 1)),
                id: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut e = Etcd {
            bin: bin.to_path_buf(),
            version,
            members,
            initial_cluster,
            procs: Procs::default(),
        };
        for i in 0..3 {
            e.spawn(i, "new")?;
        }
        e.wait_all_healthy(deadline).await?;
        Ok(e)
    }

    /// The etcd version being measured.
    pub fn version(&self) -> &str {
        &self.version
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<()> {
        let m = &self.members[i];
        let mut cmd = Command::new(&self.bin);
        // Heartbeat, election timeout and fsync are left at etcd's defaults.
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(format!("http://{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg("skiff-bench")
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr");
        self.procs.spawn(&label(i), cmd, &m.log)
    }

    async fn status(&self, i: usize) -> Result<pb::StatusResponse> {
        let ask = async {
            let mut c = MaintenanceClient::new(channel(&self.members[i].client).await?);
            let r = c
                .status(pb::StatusRequest {})
                .await
                .context("Status")?
                .into_inner();
            anyhow::Ok(r)
        };
        timeout(POLL_TIMEOUT, ask)
            .await
            .context("Status timed out")?
    }
}

fn label(i: usize) -> String {
    format!("etcd-{}", i + 1)
}

impl Cluster for Etcd {
    fn name(&self) -> String {
        format!("etcd {}", self.version)
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    async fn leader(&mut self, deadline: Instant) -> Result<usize> {
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            for i in 0..self.members.len() {
                if self.procs.check_alive(&label(i)).is_err() {
                    continue;
                }
                match self.status(i).await {
                    Ok(s) if s.leader != 0 => {
                        let found = self.members.iter().position(|m| m.id == Some(s.leader));
                        match found {
                            Some(li) if self.procs.check_alive(&label(li)).is_ok() => {
                                return Ok(li);
                            }
                            Some(li) => last = format!("leader {} is not running", label(li)),
                            None => last = format!("leader {:x} is not a known member", s.leader),
                        }
                    }
                    Ok(_) => last = "no leader".into(),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            sleep(POLL).await;
        }
        bail!("etcd: no leader before the deadline ({last})")
    }

    async fn connect(&self, member: usize) -> Result<Writer> {
        Ok(Writer::Etcd(KvClient::new(
            channel(&self.members[member].client).await?,
        )))
    }

    fn kill(&mut self, member: usize) -> Result<()> {
        self.procs.kill(&label(member))
    }

    fn pids(&self) -> Vec<u32> {
        (0..self.members.len())
            .filter_map(|i| self.procs.pid(&label(i)))
            .collect()
    }

    fn restart(&mut self, member: usize) -> Result<()> {
        self.spawn(member, "existing")
    }

    /// Healthy: `Status` answers with a leader and no errors, and a write through the member
    /// commits.
    async fn wait_healthy(&mut self, member: usize, deadline: Instant) -> Result<()> {
        let mut last = String::from("no answer");
        let mut probe = 0u32;
        while Instant::now() < deadline {
            self.procs
                .check_alive(&label(member))
                .with_context(|| format!("see {}", self.members[member].log.display()))?;
            match self.status(member).await {
                Ok(s) if s.leader != 0 && s.errors.is_empty() => {
                    if let Some(h) = &s.header {
                        self.members[member].id = Some(h.member_id);
                    }
                    probe += 1;
                    let name = format!("health-{}-{probe}", member + 1);
                    let put = async { self.connect(member).await?.write(&name).await };
                    match timeout(POLL_TIMEOUT, put).await {
                        Ok(Ok(())) => return Ok(()),
                        Ok(Err(e)) => last = format!("{e:#}"),
                        Err(_) => last = "Put timed out".into(),
                    }
                }
                Ok(s) => last = format!("leader {:x}, errors {:?}", s.leader, s.errors),
                Err(e) => last = format!("{e:#}"),
            }
            sleep(POLL).await;
        }
        bail!(
            "etcd-{}: not healthy before the deadline ({last}); see {}",
            member + 1,
            self.members[member].log.display()
        )
    }
}
