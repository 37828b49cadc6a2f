//! Reaching the controllers: each address in turn until one answers. Every call goes through
//! [`rpc!`]: `rpc!(ctl, jobs, apply_job, request)` calls `Jobs.ApplyJob` on the first controller
//! that answers.

use std::future::Future;
use std::time::Duration;

use skiff_proto::v1::cluster_client::ClusterClient;
use skiff_proto::v1::jobs_client::JobsClient;
use skiff_proto::v1::nodes_client::NodesClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// The controller addresses the user gave.
pub struct Controllers {
    endpoints: Vec<(String, Endpoint)>,
}

impl Controllers {
    pub fn new(addrs: Vec<String>) -> anyhow::Result<Self> {
        let mut endpoints = Vec::new();
        for a in addrs
            .into_iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
        {
            let uri = if a.contains("://") {
                a.clone()
            } else {
                format!("http://{a}")
            };
            let ep = Endpoint::from_shared(uri)
                .map_err(|e| anyhow::anyhow!("--controller: {a:?} is not an address: {e}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(30));
            endpoints.push((a, ep));
        }
        if endpoints.is_empty() {
            anyhow::bail!("--controller: no address given");
        }
        Ok(Controllers { endpoints })
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
            let channel = match ep.connect().await {
                Ok(c) => c,
                Err(e) => {
                    tried.push(format!("{addr}: {e}"));
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
                Err(s) => anyhow::bail!("{}", s.message()),
            }
        }
        anyhow::bail!("no controller answered ({})", tried.join("; "))
    }

    pub async fn jobs<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(JobsClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call(JobsClient::new, f).await
    }

    pub async fn cluster<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call(ClusterClient::new, f).await
    }

    pub async fn nodes<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(NodesClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call(NodesClient::new, f).await
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
