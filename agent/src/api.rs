//! The agent's own gRPC API (`skiff.v1.Agent`): an allocation's logs and exec into it, for
//! `skiff logs` and `skiff exec`. Allocations are found by their container's name (the
//! allocation id, or a unique prefix of it).

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

/// The longest an exec may run before it is killed.
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);

/// Serves `skiff.v1.Agent`.
pub struct AgentApi {
    runtime: Arc<Runtime>,
    data_dir: PathBuf,
    cgroup_parent: String,
}

impl AgentApi {
    pub fn new(runtime: Arc<Runtime>, data_dir: PathBuf, cgroup_parent: String) -> Self {
        AgentApi {
            runtime,
            data_dir,
            cgroup_parent,
        }
    }

    /// The container id of an allocation (by id or unique id prefix).
    fn container(&self, allocation: &str) -> Result<String, Status> {
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
        let matches: Vec<_> = list
            .iter()
            .filter(|(c, _)| c.name.len() == 16 && c.name.starts_with(allocation))
            .collect();
        match matches.as_slice() {
            [(c, _)] => Ok(c.id.clone()),
            [] => Err(Status::not_found(format!(
                "allocation {allocation} has no container on this node"
            ))),
            _ => Err(Status::invalid_argument(format!(
                "allocation {allocation}: prefix matches {} allocations",
                matches.len()
            ))),
        }
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
        let id = self.container(&req.allocation)?;
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
        let id = self.container(&req.allocation)?;
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
}
