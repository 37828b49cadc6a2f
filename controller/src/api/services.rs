//! Services as the API shows them: every running job with a `service` section, its ports, and
//! its endpoints (the job's allocations that should run and do), each with its health and
//! whether it takes traffic. Derived from the state on each read; nothing is stored.

use skiff_proto::v1 as pb;

use crate::state::{AllocationStatus, ClusterState, DesiredStatus, JobStatus};

/// The services in `namespace` (every namespace when `None`), by namespace then name.
pub fn services(state: &ClusterState, namespace: Option<&str>) -> Vec<pb::ServiceInfo> {
    let mut out = Vec::new();
    for job in state.jobs(namespace) {
        if job.status == JobStatus::Stopped {
            continue;
        }
        let spec = &job.latest().spec;
        let Some(service) = &spec.service else {
            continue;
        };
        let endpoints = state
            .job_allocations(&job.namespace, &job.name)
            .filter(|a| a.desired == DesiredStatus::Run && a.observed == AllocationStatus::Running)
            .map(|a| {
                // The allocation's own version decides whether it is checked.
                let checked = job
                    .version(a.job_version)
                    .and_then(|v| v.spec.service.as_ref())
                    .is_some_and(|s| s.check.is_some());
                let health = a.health.clone().unwrap_or_default();
                let ip = a.ip.clone().unwrap_or_default();
                pb::ServiceEndpoint {
                    allocation: a.id.clone(),
                    node: a.node.clone(),
                    ready: !ip.is_empty() && (!checked || health == "healthy"),
                    ip,
                    health,
                    health_output: a.health_output.clone(),
                }
            })
            .collect();
        out.push(pb::ServiceInfo {
            name: spec.service_name().unwrap_or(&job.name).to_owned(),
            namespace: job.namespace.clone(),
            job: job.name.clone(),
            port_name: service.port.clone(),
            ports: spec
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    name: p.name.clone(),
                    port: u32::from(p.port),
                    protocol: p.protocol.to_string(),
                })
                .collect(),
            tags: service.tags.clone(),
            endpoints,
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}
