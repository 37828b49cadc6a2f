//! The agent's own gRPC API (`skiff.v1.Agent`): an allocation's logs and exec into one of its
//! containers, for `skiff logs` and `skiff exec`; the node's named volumes, for `skiff
//! volumes` and `skiff volume rm`. Allocations are found by the label their containers carry
//! (the allocation id, or a unique prefix of it).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use skiff_proto::v1 as pb;
use skiff_proto::v1::agent_server::Agent;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use skiff_runtime::container::Runtime;
use skiff_runtime::logs;
use skiff_runtime::store::monitor_alive;

use crate::pods::NodeRuntime;
use crate::reconcile::{ALLOC_LABEL, CONTAINER_LABEL, LIFECYCLE_LABEL};
use crate::volumes::VolumeKey;

/// The longest an exec may run before it is killed.
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);

/// Serves `skiff.v1.Agent`.
pub struct AgentApi {
    runtime: Arc<Runtime>,
    node: Arc<NodeRuntime>,
    data_dir: PathBuf,
    cgroup_parent: String,
}

impl AgentApi {
    pub fn new(
        runtime: Arc<Runtime>,
        node: Arc<NodeRuntime>,
        data_dir: PathBuf,
        cgroup_parent: String,
    ) -> Self {
        AgentApi {
            runtime,
            node,
            data_dir,
            cgroup_parent,
        }
    }

    /// The container id of an allocation's container (by allocation id or unique prefix;
    /// `name` empty: its first main container).
    fn container(&self, allocation: &str, name: &str) -> Result<String, Status> {
        if allocation.is_empty() || !allocation.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!(
                "allocation: {allocation:?} is not an allocation id"
            )));
        }
        let list = self
            .runtime
            .store()
            .list()
            .map_err(|e| Status::internal(e.to_string()))?;
        let ours: Vec<_> = list
            .iter()
            .filter_map(|(c, _)| {
                let alloc = c.labels.get(ALLOC_LABEL)?;
                alloc.starts_with(allocation).then_some((alloc, c))
            })
            .collect();
        let mut allocs: Vec<&String> = ours.iter().map(|(a, _)| *a).collect();
        allocs.sort();
        allocs.dedup();
        match allocs.len() {
            0 => {
                return Err(Status::not_found(format!(
                    "allocation {allocation} has no container on this node"
                )));
            }
            1 => {}
            n => {
                return Err(Status::invalid_argument(format!(
                    "allocation {allocation}: prefix matches {n} allocations"
                )));
            }
        }
        let lifecycle = |c: &skiff_runtime::store::ContainerConfig| {
            c.labels.get(LIFECYCLE_LABEL).cloned().unwrap_or_default()
        };
        let names = |c: &skiff_runtime::store::ContainerConfig| {
            c.labels.get(CONTAINER_LABEL).cloned().unwrap_or_default()
        };
        let found = if name.is_empty() {
            // The first main container (a container from before groups has no labels but
            // the allocation's).
            let mut mains: Vec<_> = ours
                .iter()
                .filter(|(_, c)| matches!(lifecycle(c).as_str(), "" | "main"))
                .collect();
            mains.sort_by_key(|(_, c)| c.created_at_ms);
            mains.first().map(|(_, c)| c.id.clone())
        } else {
            ours.iter()
                .find(|(_, c)| names(c) == name)
                .map(|(_, c)| c.id.clone())
        };
        found.ok_or_else(|| {
            let mut have: Vec<String> = ours.iter().map(|(_, c)| names(c)).collect();
            have.sort();
            Status::not_found(format!(
                "allocation {allocation} has no container {name:?} on this node (it has {})",
                have.join(", ")
            ))
        })
    }
}

type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

fn chunk(r: &logs::Record) -> pb::LogChunk {
    pb::LogChunk {
        stream: match r.stream {
            logs::Stream::Stdout => pb::LogStream::Stdout,
            logs::Stream::Stderr => pb::LogStream::Stderr,
        } as i32,
        text: r.text.clone(),
        partial: r.partial,
    }
}

#[tonic::async_trait]
impl Agent for AgentApi {
    type LogsStream = LogStream;

    async fn logs(
        &self,
        req: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = req.into_inner();
        let id = self.container(&req.allocation, &req.container)?;
        let runtime = self.runtime.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::task::spawn_blocking(move || {
            let dir = runtime.store().dir(&id);
            let mut seen = 0;
            loop {
                let records = match logs::read_all(&dir) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                        return;
                    }
                };
                // A rotation makes the list shorter: start over from what is there.
                if records.len() < seen {
                    seen = 0;
                }
                for r in &records[seen..] {
                    if tx.blocking_send(Ok(chunk(r))).is_err() {
                        return;
                    }
                }
                seen = records.len();
                let alive = runtime
                    .store()
                    .state(&id)
                    .map(|s| monitor_alive(&s))
                    .unwrap_or(false);
                if !req.follow || !alive || tx.is_closed() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn exec(
        &self,
        req: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        let req = req.into_inner();
        if req.command.is_empty() {
            return Err(Status::invalid_argument("command: empty"));
        }
        if let Some(bad) = req.env.iter().find(|e| !e.contains('=')) {
            return Err(Status::invalid_argument(format!(
                "env: {bad:?} is not KEY=VALUE"
            )));
        }
        let id = self.container(&req.allocation, &req.container)?;
        // `container exec` in a fresh process: joining a container's namespaces is done from a
        // single-threaded process, never from this one.
        let exe = std::env::current_exe().map_err(|e| Status::internal(e.to_string()))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .args(["container", "exec", &id]);
        for e in &req.env {
            cmd.arg("--env").arg(e);
        }
        cmd.arg("--")
            .args(&req.command)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(EXEC_TIMEOUT, cmd.output())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("exec ran longer than {EXEC_TIMEOUT:?}"))
            })?
            .map_err(|e| Status::internal(format!("exec: {e}")))?;
        Ok(Response::new(pb::ExecResponse {
            exit_code: out.status.code().unwrap_or(255),
            stdout: out.stdout,
            stderr: out.stderr,
        }))
    }

    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let node = self.node.clone();
        let volumes = tokio::task::spawn_blocking(move || {
            node.volumes
                .list()
                .into_iter()
                .map(|v| pb::NodeVolume {
                    node: String::new(),
                    used_by: node.volume_users(&v.key),
                    namespace: v.key.namespace,
                    job: v.key.job,
                    name: v.key.name,
                    size_bytes: v.size_bytes,
                    created_at_ms: v.created_at_ms,
                })
                .collect()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn remove_volume(
        &self,
        req: Request<pb::RemoveVolumeRequest>,
    ) -> Result<Response<pb::RemoveVolumeResponse>, Status> {
        let req = req.into_inner();
        let key = VolumeKey::new(&req.namespace, &req.job, &req.name)
            .map_err(|e| Status::invalid_argument(format!("volume: {e}")))?;
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || {
            let users = node.volume_users(&key);
            if !users.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "volume {key} is in use by allocation {} (stop the job first)",
                    users.join(", ")
                )));
            }
            match node.volumes.remove(&key) {
                Ok(true) => Ok(()),
                Ok(false) => Err(Status::not_found(format!("no volume {key} on this node"))),
                Err(e) => Err(Status::internal(e)),
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::RemoveVolumeResponse {}))
    }
}
