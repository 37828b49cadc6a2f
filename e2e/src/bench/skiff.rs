//! A 3-member `skiff-controller` cluster on loopback.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use skiff_proto::v1::cluster_client::ClusterClient;
use skiff_proto::v1::jobs_client::JobsClient;
use skiff_proto::v1::{LeaderRequest, ListMembersRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

use crate::cluster::{Cluster, Writer, channel};
use crate::procs::{Procs, free_ports};

/// Pause between readiness polls.
const POLL: Duration = Duration::from_millis(50);
/// Bound on one poll request.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);

struct Member {
    id: u64,
    data_dir: PathBuf,
    rpc: String,
    http: String,
    log: PathBuf,
}

/// The cluster; dropping it SIGKILLs every member.
pub struct Skiff {
    bin: PathBuf,
    members: Vec<Member>,
    procs: Procs,
    /// The bootstrapper's admin credentials; `None` for a build from before mutual TLS (the
    /// same harness measures both, to show what TLS costs).
    creds: Option<skiff_tls::Credentials>,
}

impl Skiff {
    /// Whether the cluster talks mutual TLS.
    pub fn tls(&self) -> bool {
        self.creds.is_some()
    }

    /// A connection to `addr` with the bootstrapper's admin credentials (plain without TLS).
    pub async fn channel(&self, addr: &str) -> Result<tonic::transport::Channel> {
        match &self.creds {
            None => channel(addr).await,
            Some(c) => {
                let ep = skiff_tls::net::endpoint(addr)?.connect_timeout(POLL_TIMEOUT);
                skiff_tls::net::channel_with(c.client_config()?, ep)
                    .await
                    .with_context(|| format!("connect {addr}"))
            }
        }
    }

    /// A controller join token (retried until the bootstrapper has committed its CA).
    async fn token(&self, deadline: Instant) -> Result<String> {
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            let ask = async {
                let mut c = skiff_proto::v1::pki_client::PkiClient::new(
                    self.channel(&self.members[0].rpc).await?,
                );
                let r = c
                    .create_token(skiff_proto::v1::CreateTokenRequest {
                        role: "controller".into(),
                        ttl_seconds: 600,
                        uses: 0,
                    })
                    .await
                    .context("CreateToken")?;
                anyhow::Ok(r.into_inner().token)
            };
            match timeout(POLL_TIMEOUT, ask).await {
                Ok(Ok(t)) => return Ok(t),
                Ok(Err(e)) => last = format!("{e:#}"),
                Err(_) => last = "CreateToken timed out".into(),
            }
            sleep(POLL).await;
        }
        bail!("skiff: no join token before the deadline ({last})")
    }
}

impl Skiff {
    /// Starts member 1 with `--bootstrap`, then members 2 and 3 with `--join`, and waits until
    /// all three are voters and ready.
    #[allow(dead_code)] // not every benchmark binary uses every entry point
    pub async fn start(bin: &Path, dir: &Path, deadline: Instant) -> Result<Skiff> {
        Skiff::start_with(bin, dir, deadline, &[]).await
    }

    /// As [`Skiff::start`], with `extra` flags for the bootstrapping member (cluster-wide
    /// settings such as `--node-subnet-prefix`).
    pub async fn start_with(
        bin: &Path,
        dir: &Path,
        deadline: Instant,
        extra: &[&str],
    ) -> Result<Skiff> {
        let ports = free_ports(6)?;
        let members = (0..3)
            .map(|i| Member {
                id: i as u64 + 1,
                data_dir: dir.join(format!("skiff-{}", i + 1)),
                rpc: format!("127.0.0.1:{}", ports[2 * i]),
                http: format!("127.0.0.1:{}", ports[2 * i + 1]),
                log: dir.join(format!("skiff-{}.log", i + 1)),
            })
            .collect();
        let mut s = Skiff {
            bin: bin.to_path_buf(),
            members,
            procs: Procs::default(),
            creds: None,
        };
        for i in 0..3 {
            let m = &s.members[i];
            let mut cmd = Command::new(&s.bin);
            cmd.arg("--id")
                .arg(m.id.to_string())
                .arg("--data-dir")
                .arg(&m.data_dir)
                .arg("--rpc-addr")
                .arg(&m.rpc)
                .arg("--http-addr")
                .arg(&m.http);
            if i == 0 {
                cmd.arg("--bootstrap").args(extra);
            } else {
                cmd.arg("--join").arg(&s.members[0].rpc);
                if s.tls() {
                    cmd.arg("--join-token").arg(s.token(deadline).await?);
                }
            }
            s.procs.spawn(&label(i), cmd, &m.log)?;
            s.wait_healthy(i, deadline).await?;
            if i == 0 {
                let path = s.members[0].data_dir.join("admin.creds");
                if path.exists() {
                    s.creds = Some(skiff_tls::Credentials::load(&path)?);
                }
            }
        }
        s.wait_voters(deadline).await?;
        Ok(s)
    }

    /// Waits until the membership lists all three members as voters (a joiner starts as a
    /// learner and is promoted once caught up).
    async fn wait_voters(&mut self, deadline: Instant) -> Result<()> {
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            match self.list_voters().await {
                Ok(3) => return Ok(()),
                Ok(n) => last = format!("{n} voters"),
                Err(e) => last = format!("{e:#}"),
            }
            sleep(POLL).await;
        }
        bail!("skiff: members not all voters before the deadline ({last})")
    }

    async fn list_voters(&self) -> Result<usize> {
        let mut c = ClusterClient::new(self.channel(&self.members[0].rpc).await?);
        let resp = timeout(POLL_TIMEOUT, c.list_members(ListMembersRequest {}))
            .await
            .context("ListMembers timed out")??
            .into_inner();
        Ok(resp.members.iter().filter(|m| m.voter).count())
    }
}

#[allow(dead_code)] // not every benchmark binary uses every accessor
impl Skiff {
    /// Every member's gRPC address.
    pub fn rpc_addrs(&self) -> Vec<String> {
        self.members.iter().map(|m| m.rpc.clone()).collect()
    }

    /// Member `i`'s HTTP address (/metrics, /readyz).
    pub fn http_addr(&self, i: usize) -> &str {
        &self.members[i].http
    }

    /// Member `i`'s process id, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.procs.pid(&label(i))
    }

    /// A join token for `role` (any number of uses, an hour).
    pub async fn token_for(&self, role: &str) -> Result<String> {
        let mut c =
            skiff_proto::v1::pki_client::PkiClient::new(self.channel(&self.members[0].rpc).await?);
        let r = c
            .create_token(skiff_proto::v1::CreateTokenRequest {
                role: role.into(),
                ttl_seconds: 3600,
                uses: 0,
            })
            .await
            .context("CreateToken")?;
        Ok(r.into_inner().token)
    }
}

/// The body of `GET http://addr/path` (HTTP/1.1, `Connection: close`), at most 16 MiB.
#[allow(dead_code)]
pub async fn http_get(addr: &str, path: &str) -> Result<String> {
    let get = async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.context("send request")?;
        let mut buf = Vec::new();
        (&mut s)
            .take(16 << 20)
            .read_to_end(&mut buf)
            .await
            .context("read response")?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("GET {path}: no header end"))?;
        anyhow::ensure!(
            head.starts_with("HTTP/1.1 200"),
            "GET {path}: {}",
            head.lines().next().unwrap_or("")
        );
        anyhow::Ok(body.to_owned())
    };
    timeout(Duration::from_secs(5), get)
        .await
        .with_context(|| format!("GET {addr}{path} timed out"))?
}

fn label(i: usize) -> String {
    format!("skiff-{}", i + 1)
}

impl Cluster for Skiff {
    fn name(&self) -> String {
        if self.tls() {
            "skiff (mTLS)".into()
        } else {
            "skiff (plain)".into()
        }
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    async fn leader(&mut self, deadline: Instant) -> Result<usize> {
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            for (i, m) in self.members.iter().enumerate() {
                if self.procs.check_alive(&label(i)).is_err() {
                    continue;
                }
                let ask = async {
                    let mut c = ClusterClient::new(self.channel(&m.rpc).await?);
                    let r = c
                        .leader(LeaderRequest {})
                        .await
                        .context("Leader")?
                        .into_inner();
                    anyhow::Ok(r)
                };
                match timeout(POLL_TIMEOUT, ask).await {
                    Ok(Ok(r)) if r.leader_id >= 1 && r.leader_id as usize <= self.members.len() => {
                        let li = r.leader_id as usize - 1;
                        if self.procs.check_alive(&label(li)).is_ok() {
                            return Ok(li);
                        }
                        last = format!("leader {} is not running", r.leader_id);
                    }
                    Ok(Ok(r)) => last = format!("leader_id {}", r.leader_id),
                    Ok(Err(e)) => last = format!("{e:#}"),
                    Err(_) => last = "Leader timed out".into(),
                }
            }
            sleep(POLL).await;
        }
        bail!("skiff: no leader before the deadline ({last})")
    }

    async fn connect(&self, member: usize) -> Result<Writer> {
        Ok(Writer::Skiff(JobsClient::new(
            self.channel(&self.members[member].rpc).await?,
        )))
    }

    fn pids(&self) -> Vec<u32> {
        (0..self.members.len())
            .filter_map(|i| self.pid(i))
            .collect()
    }

    fn kill(&mut self, member: usize) -> Result<()> {
        self.procs.kill(&label(member))
    }

    fn restart(&mut self, member: usize) -> Result<()> {
        let m = &self.members[member];
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--id")
            .arg(m.id.to_string())
            .arg("--data-dir")
            .arg(&m.data_dir);
        self.procs.spawn(&label(member), cmd, &m.log)
    }

    async fn wait_healthy(&mut self, member: usize, deadline: Instant) -> Result<()> {
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            self.procs
                .check_alive(&label(member))
                .with_context(|| format!("see {}", self.members[member].log.display()))?;
            match http_status(&self.members[member].http, "/readyz").await {
                Ok(200) => return Ok(()),
                Ok(code) => last = format!("HTTP {code}"),
                Err(e) => last = format!("{e:#}"),
            }
            sleep(POLL).await;
        }
        bail!(
            "skiff-{}: /readyz not 200 before the deadline ({last}); see {}",
            member + 1,
            self.members[member].log.display()
        )
    }
}

/// Status code of `GET http://addr/path` (a bare HTTP/1.1 request; no body is read).
async fn http_status(addr: &str, path: &str) -> Result<u16> {
    let get = async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.context("send request")?;
        let mut buf = vec![0u8; 256];
        let mut n = 0;
        // The status line fits in the first few reads; bounded by the buffer size.
        while n < buf.len() && !buf[..n].contains(&b'\n') {
            let k = s.read(&mut buf[n..]).await.context("read response")?;
            if k == 0 {
                break;
            }
            n += k;
        }
        let head = String::from_utf8_lossy(&buf[..n]);
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .with_context(|| format!("GET {path}: malformed status line {head:?}"))?;
        anyhow::Ok(code)
    };
    timeout(POLL_TIMEOUT, get)
        .await
        .with_context(|| format!("GET {addr}{path} timed out"))?
}
