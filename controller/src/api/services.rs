//! Services as the API shows them: every running job with a `service` section, its ports, and
//! its endpoints (the job's allocations that should run and do), each with its health and
//! whether it takes traffic. Derived from the state on each read; nothing is stored.

use skiff_proto::v1 as pb;

use crate::state::{AllocationStatus, ClusterState, DesiredStatus, Health, JobStatus};

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
                // The allocation's own version decides whether it is checked and whether it
                // runs the mesh.
                let own = job.version(a.job_version).map(|v| &v.spec);
                let checked = own
                    .and_then(|s| s.service.as_ref())
                    .is_some_and(|s| s.check.is_some());
                let mesh = own.is_some_and(|s| s.mesh.is_some());
                let ip = a.ip.clone().unwrap_or_default();
                let draining = a.drain_since_ms.is_some();
                pb::ServiceEndpoint {
                    allocation: a.id.clone(),
                    node: a.node.clone(),
                    ready: !ip.is_empty()
                        && !draining
                        && (!checked || a.health == Some(Health::Healthy)),
                    draining,
                    ip,
                    health: super::convert::health(a.health) as i32,
                    health_output: a.health_output.clone(),
                    mesh,
                }
            })
            .collect();
        let name = spec.service_name().unwrap_or(&job.name);
        out.push(pb::ServiceInfo {
            vip: state
                .vip(&job.namespace, name)
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            name: name.to_owned(),
            namespace: job.namespace.clone(),
            job: job.name.clone(),
            port_name: service.port.clone(),
            ports: spec
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    name: p.name.clone(),
                    port: u32::from(p.port),
                    protocol: super::convert::protocol(p.protocol) as i32,
                })
                .collect(),
            tags: service.tags.clone(),
            endpoints,
            mesh: super::convert::mesh_task(spec),
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

#[cfg(test)]
mod tests {
    use skiff_common::{SpecFormat, parse_job_spec};

    use super::*;
    use crate::state::{Allocation, AllocationReport, Command, Node};

    fn alloc(id: &str, node: &str) -> Allocation {
        Allocation::new_pending(id, "default", "web", 1, node, 1)
    }

    #[test]
    fn only_running_addressed_healthy_allocations_are_ready() {
        let spec = parse_job_spec(
            "name = \"web\"\nreplicas = 3\nimage = \"oci:/x\"\n\
             [[ports]]\nname = \"http\"\nport = 8080\n\
             [service]\nport = \"http\"\ncheck = { http = \"/\" }\n",
            SpecFormat::Toml,
        )
        .expect("spec");
        let mut s = ClusterState::default();
        s.apply(&Command::ApplyJob {
            spec: Box::new(spec),
            at_ms: 1,
        })
        .expect("apply");
        for n in ["n1", "n2"] {
            s.apply(&Command::UpsertNode {
                node: Node::for_test(n),
            })
            .expect("node");
        }
        s.apply(&Command::PlaceAllocations {
            allocations: vec![alloc("a", "n1"), alloc("b", "n2"), alloc("c", "n1")],
        })
        .expect("place");
        let report = |id: &str, health: Health| AllocationReport {
            id: id.into(),
            status: AllocationStatus::Running,
            restarts: 0,
            ip: Some(format!("10.42.0.{}", id.as_bytes()[0])),
            health: Some(health),
            health_output: format!("{health:?} output"),
            log_dropped_bytes: 0,
            log_error: String::new(),
            containers: None,
            oom_kills: 0,
        };
        s.apply(&Command::ReportAllocations {
            reports: vec![report("a", Health::Healthy), report("b", Health::Unhealthy)],
            at_ms: 2,
        })
        .expect("report");
        let list = services(&s, None);
        assert_eq!(list.len(), 1);
        let web = &list[0];
        assert_eq!((web.name.as_str(), web.port_name.as_str()), ("web", "http"));
        assert_eq!(web.ports[0].port, 8080);
        // c is still pending: not an endpoint at all.
        let eps: Vec<(&str, bool, i32)> = web
            .endpoints
            .iter()
            .map(|e| (e.allocation.as_str(), e.ready, e.health))
            .collect();
        assert_eq!(
            eps,
            vec![
                ("a", true, pb::Health::Healthy as i32),
                ("b", false, pb::Health::Unhealthy as i32)
            ]
        );
        assert!(services(&s, Some("other")).is_empty());
    }
}
