//! What the workloads need from a system under test, implemented by `skiff` and `etcd`.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::etcd::pb::kv_client::KvClient;
use skiff_proto::v1::jobs_client::JobsClient;

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A 3-member replicated store started by the benchmark.
pub trait Cluster {
    /// Display name: `skiff` or `etcd`.
    fn name(&self) -> String;
    /// Number of members.
    fn size(&self) -> usize;
    /// Index (0-based) of the current leader, waiting for one until `deadline`.
    async fn leader(&mut self, deadline: Instant) -> Result<usize>;
    /// A client with its own connection to `member`.
    async fn connect(&self, member: usize) -> Result<Writer>;
    /// SIGKILLs `member`.
    fn kill(&mut self, member: usize) -> Result<()>;
    /// Restarts a killed `member` from its data dir.
    fn restart(&mut self, member: usize) -> Result<()>;
    /// The process ids of the members running now.
    fn pids(&self) -> Vec<u32>;
    /// Waits until `member` is serving and caught up, failing at `deadline`.
    async fn wait_healthy(&mut self, member: usize, deadline: Instant) -> Result<()>;

    /// Waits until every member is healthy.
    async fn wait_all_healthy(&mut self, deadline: Instant) -> Result<()> {
        for m in 0..self.size() {
            self.wait_healthy(m, deadline).await?;
        }
        Ok(())
    }
}

/// One client connection issuing committed writes. Clones share the connection.
#[derive(Clone)]
pub enum Writer {
    /// `skiff.v1.Jobs/ApplyJob` with a new job name per write.
    Skiff(JobsClient<Channel>),
    /// `etcdserverpb.KV/Put` of the same TOML text under a new key per write.
    Etcd(KvClient<Channel>),
}

impl Writer {
    /// Commits one write named `name` (unique per write) and waits for its acknowledgement.
    pub async fn write(&mut self, name: &str) -> Result<()> {
        let spec = job_spec(name);
        match self {
            Writer::Skiff(c) => {
                let resp = c
                    .apply_job(skiff_proto::v1::ApplyJobRequest {
                        spec,
                        format: skiff_proto::v1::SpecFormat::Toml as i32,
                    })
                    .await
                    .with_context(|| format!("ApplyJob {name}"))?
                    .into_inner();
                // A unique name must create a job; anything else means nothing was committed.
                anyhow::ensure!(resp.created, "ApplyJob {name}: job not created");
            }
            Writer::Etcd(c) => {
                c.put(crate::etcd::pb::PutRequest {
                    key: format!("/skiff/jobs/default/{name}").into_bytes(),
                    value: spec.into_bytes(),
                })
                .await
                .with_context(|| format!("Put {name}"))?;
            }
        }
        Ok(())
    }
}

/// The job spec written by every write (etcd stores the same text as its value).
pub fn job_spec(name: &str) -> String {
    format!("name = \"{name}\"\nimage = \"127.0.0.1:5000/demo/web:1.0\"\nreplicas = 3\n")
}

/// A new gRPC connection to `addr` (`host:port`).
pub async fn channel(addr: &str) -> Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("bad address {addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connect {addr}"))
}
