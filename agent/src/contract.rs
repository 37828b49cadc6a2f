//! The agent's side of the controller contract, in one place: what arrives (assignments and
//! their tasks, overlay peers) is converted into the agent's own types here, once, where it
//! enters; what leaves (allocation reports, WireGuard status) is built here. The wire stays
//! tolerant: fields this agent does not know are ignored, and an enum value it does not know
//! falls back to the safe default; an assignment it cannot run is reported as failed with the
//! reason, never dropped silently.

use std::collections::BTreeMap;
use std::time::Duration;

use skiff_proto::v1 as pb;
use skiff_runtime::cgroup::Limits;
use skiff_runtime::store::{RestartPolicy, State, Status};

use crate::health::Health;
use crate::net::{Backend, Key, Peer};

/// One allocation this node should run.
#[derive(Clone, Debug, PartialEq)]
pub struct Assigned {
    pub id: String,
    pub namespace: String,
    pub job: String,
    pub version: u64,
    /// What to run, or why this agent cannot run it.
    pub task: Result<Task, String>,
}

/// What to run for an allocation.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub container: ContainerTask,
    pub check: Option<Check>,
}

/// The allocation's container.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerTask {
    pub image: String,
    /// Replaces the image's ENTRYPOINT when `Some`.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's CMD when not empty.
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub restart: RestartPolicy,
    pub stop_signal: i32,
    pub stop_grace: Duration,
    pub limits: Limits,
    /// Host devices asked for: path and access (`skiff_runtime::devices::ACC_*`). The node's
    /// policy decides whether they are granted.
    pub devices: Vec<(String, u32)>,
}

/// A health check, ports resolved to numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    Http {
        path: String,
        port: u16,
        expected_status: u16,
    },
    Tcp {
        port: u16,
    },
    Exec {
        command: Vec<String>,
    },
}

/// An assignment as the agent runs it.
pub fn assigned(a: pb::AssignedAllocation) -> Assigned {
    Assigned {
        task: a
            .task
            .ok_or_else(|| {
                "the controllers sent no task (a controller too old or too new for this agent)"
                    .to_owned()
            })
            .and_then(task),
        id: a.id,
        namespace: a.namespace,
        job: a.job,
        version: a.job_version,
    }
}

fn task(t: pb::Task) -> Result<Task, String> {
    let mut containers = t.containers.into_iter();
    let (Some(c), None) = (containers.next(), containers.next()) else {
        return Err("this agent runs exactly one container per allocation; upgrade it".into());
    };
    if c.image.is_empty() {
        return Err("task: container has no image".into());
    }
    let resources = c.resources.unwrap_or_default();
    let check = t.check.map(check).transpose()?;
    let devices = c
        .devices
        .iter()
        .map(|d| {
            let access = skiff_runtime::devices::parse_access(&d.permissions).ok_or_else(|| {
                format!("task: device {}: permissions {:?}", d.path, d.permissions)
            })?;
            Ok((d.path.clone(), access))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Task {
        container: ContainerTask {
            image: c.image,
            entrypoint: (!c.entrypoint.is_empty()).then_some(c.entrypoint),
            args: c.args,
            env: c.env.into_iter().collect(),
            restart: match pb::RestartPolicy::try_from(c.restart) {
                Ok(pb::RestartPolicy::Never) => RestartPolicy::Never,
                Ok(pb::RestartPolicy::Always) => RestartPolicy::Always,
                // On failure is the spec's default, and the safe reading of a value unknown here.
                _ => RestartPolicy::OnFailure,
            },
            stop_signal: if c.stop_signal > 0 { c.stop_signal } else { 15 },
            stop_grace: Duration::from_millis(c.stop_grace_ms),
            limits: Limits {
                cpu: (resources.cpu > 0.0).then_some(resources.cpu),
                memory: (resources.memory > 0).then_some(resources.memory),
                pids: (resources.pids > 0).then_some(u64::from(resources.pids)),
            },
            devices,
        },
        check,
    })
}

fn check(c: pb::HealthCheck) -> Result<Check, String> {
    let port = |p: u32| {
        u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("health check: port {p} is not a port"))
    };
    let kind = match c.kind {
        Some(pb::health_check::Kind::Http(h)) => CheckKind::Http {
            path: h.path,
            port: port(h.port)?,
            expected_status: u16::try_from(h.expected_status).unwrap_or(200),
        },
        Some(pb::health_check::Kind::Tcp(t)) => CheckKind::Tcp {
            port: port(t.port)?,
        },
        Some(pb::health_check::Kind::Exec(e)) => CheckKind::Exec { command: e.command },
        None => return Err("health check: a kind this agent does not know; upgrade it".into()),
    };
    Ok(Check {
        kind,
        interval: Duration::from_millis(c.interval_ms.max(100)),
        timeout: Duration::from_millis(c.timeout_ms.max(10)),
        healthy_threshold: c.healthy_threshold.max(1),
        unhealthy_threshold: c.unhealthy_threshold.max(1),
    })
}

/// The other nodes as WireGuard peers; entries that do not parse are skipped with a warning.
pub fn overlay_peers(list: &[pb::OverlayPeer]) -> Vec<Peer> {
    list.iter()
        .filter_map(|p| {
            let parsed = (|| {
                Some(Peer {
                    node: p.node.clone(),
                    public_key: Key::from_base64(&p.public_key)?,
                    endpoint: p.endpoint.parse().ok()?,
                    subnet: p.subnet.parse().ok()?,
                })
            })();
            if parsed.is_none() {
                tracing::warn!(node = %p.node, "unusable overlay peer (key, endpoint or subnet); skipped");
            }
            parsed
        })
        .collect()
}

pub fn backend(b: Backend) -> pb::WireguardBackend {
    match b {
        Backend::Kernel => pb::WireguardBackend::Kernel,
        Backend::Userspace => pb::WireguardBackend::Userspace,
    }
}

pub fn health(h: Health) -> pb::Health {
    match h {
        Health::Starting => pb::Health::Starting,
        Health::Healthy => pb::Health::Healthy,
        Health::Unhealthy => pb::Health::Unhealthy,
    }
}

/// A report of an allocation that could not start.
pub fn failed(id: &str, reason: &str) -> pb::AllocationReport {
    pb::AllocationReport {
        id: id.to_owned(),
        state: pb::AllocationState::Failed as i32,
        reason: reason.to_owned(),
        ..Default::default()
    }
}

/// A report of an allocation from its container's state.
pub fn report(id: &str, s: &State) -> pb::AllocationReport {
    use pb::AllocationState as A;
    let (state, exit_code, reason) = match s.status {
        Status::Running | Status::Restarting => (A::Running, 0, String::new()),
        Status::Created => (A::Pending, 0, String::new()),
        Status::Exited => match (&s.exit, &s.error) {
            (_, Some(err)) => (A::Failed, 0, err.clone()),
            (Some(e), None) if e.code == Some(0) => (A::Exited, 0, String::new()),
            (Some(e), None) => (A::Failed, e.status_code(), e.describe()),
            (None, None) => (A::Failed, 0, "exited".into()),
        },
        Status::Failed => (
            A::Failed,
            0,
            s.error.clone().unwrap_or_else(|| "failed to start".into()),
        ),
    };
    pb::AllocationReport {
        id: id.to_owned(),
        state: state as i32,
        exit_code,
        reason,
        restarts: s.restarts,
        log_dropped_bytes: s.log_dropped_bytes,
        log_error: s.log_error.clone().unwrap_or_default(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(image: &str) -> pb::ContainerTask {
        pb::ContainerTask {
            name: "main".into(),
            image: image.into(),
            restart: pb::RestartPolicy::Always as i32,
            stop_signal: 3,
            stop_grace_ms: 2500,
            resources: Some(pb::ContainerResources {
                cpu: 0.5,
                memory: 64 << 20,
                pids: 100,
            }),
            ..Default::default()
        }
    }

    fn alloc(task: Option<pb::Task>) -> pb::AssignedAllocation {
        pb::AssignedAllocation {
            id: "a1".into(),
            namespace: "default".into(),
            job: "web".into(),
            job_version: 2,
            task,
        }
    }

    #[test]
    fn a_task_becomes_what_the_runtime_runs() {
        let a = assigned(alloc(Some(pb::Task {
            containers: vec![container("reg/web:1")],
            ports: vec![],
            check: Some(pb::HealthCheck {
                kind: Some(pb::health_check::Kind::Tcp(pb::TcpCheck { port: 8080 })),
                interval_ms: 2000,
                timeout_ms: 500,
                healthy_threshold: 0,
                unhealthy_threshold: 3,
            }),
        })));
        let t = a.task.expect("runnable");
        assert_eq!(t.container.image, "reg/web:1");
        assert_eq!(t.container.entrypoint, None);
        assert_eq!(t.container.restart, RestartPolicy::Always);
        assert_eq!(t.container.stop_signal, 3);
        assert_eq!(t.container.stop_grace, Duration::from_millis(2500));
        assert_eq!(t.container.limits.memory, Some(64 << 20));
        let c = t.check.expect("check");
        assert_eq!(c.kind, CheckKind::Tcp { port: 8080 });
        assert_eq!(c.healthy_threshold, 1, "0 read as 1");
    }

    #[test]
    fn what_this_agent_cannot_run_is_named_not_dropped() {
        for (task, why) in [
            (None, "sent no task"),
            (
                Some(pb::Task {
                    containers: vec![container("a"), container("b")],
                    ..Default::default()
                }),
                "exactly one container",
            ),
            (
                Some(pb::Task {
                    containers: vec![container("")],
                    ..Default::default()
                }),
                "no image",
            ),
            (
                Some(pb::Task {
                    containers: vec![container("a")],
                    check: Some(pb::HealthCheck::default()),
                    ..Default::default()
                }),
                "a kind this agent does not know",
            ),
            (
                Some(pb::Task {
                    containers: vec![container("a")],
                    check: Some(pb::HealthCheck {
                        kind: Some(pb::health_check::Kind::Tcp(pb::TcpCheck { port: 70000 })),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                "port 70000 is not a port",
            ),
        ] {
            let err = assigned(alloc(task)).task.expect_err(why);
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn unknown_enum_values_fall_back_to_safe_defaults() {
        let mut c = container("a");
        c.restart = 99;
        c.stop_signal = 0;
        let t = assigned(alloc(Some(pb::Task {
            containers: vec![c],
            ..Default::default()
        })))
        .task
        .expect("runnable");
        assert_eq!(t.container.restart, RestartPolicy::OnFailure);
        assert_eq!(t.container.stop_signal, 15);
    }

    #[test]
    fn container_states_become_reports() {
        let mut s = State::created();
        assert_eq!(report("a", &s).state, pb::AllocationState::Pending as i32);
        s.status = Status::Running;
        s.restarts = 2;
        let r = report("a", &s);
        assert_eq!(
            (r.state, r.restarts),
            (pb::AllocationState::Running as i32, 2)
        );
        s.status = Status::Failed;
        s.error = Some("no such image".into());
        let r = report("a", &s);
        assert_eq!(
            (r.state, r.reason.as_str()),
            (pb::AllocationState::Failed as i32, "no such image")
        );
    }
}
