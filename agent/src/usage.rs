//! What each allocation on this node uses, read fresh from the kernel: its containers' cgroups
//! (CPU time, memory, the memory limit, OOM kills; v1 or v2, as the runtime set them up), its
//! restarts from the runtime's records, and its network traffic from the host side of its veth
//! in this agent's network namespace (`/proc/self/net/dev`). Served on `/metrics` as the
//! `skiff_workload_*` families and sent with each heartbeat (for `skiff top` and the status
//! page).

use skiff_common::prometheus::label_value as escape;
use std::collections::HashMap;
use std::fmt::Write as _;

use skiff_proto::v1 as pb;
use skiff_runtime::container::Runtime;

use crate::contract::Assigned;
use crate::reconcile::{ALLOC_LABEL, CONTAINER_LABEL};

/// One container's figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerUsage {
    pub name: String,
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    /// `None`: unlimited.
    pub memory_limit_bytes: Option<u64>,
    pub oom_kills: u64,
    pub restarts: u32,
}

/// One allocation's figures, with the labels its series carry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AllocUsage {
    pub alloc: String,
    pub namespace: String,
    pub workload: String,
    pub version: u64,
    pub containers: Vec<ContainerUsage>,
    /// Bytes the allocation received and sent on its pod network (`None`: no veth of its own,
    /// e.g. host networking).
    pub network: Option<(u64, u64)>,
}

/// Reads the usage of every allocation assigned to this node that has containers here.
pub fn collect(rt: &Runtime, assigned: &[Assigned]) -> Vec<AllocUsage> {
    let by_alloc: HashMap<&str, &Assigned> = assigned.iter().map(|a| (a.id.as_str(), a)).collect();
    let mut out: HashMap<String, AllocUsage> = HashMap::new();
    let Ok(list) = rt.store().list() else {
        return Vec::new();
    };
    for (config, state) in list {
        let Some(alloc) = config.labels.get(ALLOC_LABEL) else {
            continue;
        };
        let Some(a) = by_alloc.get(alloc.as_str()) else {
            continue;
        };
        // Only containers that have a cgroup: a gone container's series disappear.
        let Ok(Some(stats)) = rt.stats_of(&config) else {
            continue;
        };
        let limits = &config.limits;
        let entry = out.entry(alloc.clone()).or_insert_with(|| AllocUsage {
            alloc: alloc.clone(),
            namespace: a.namespace.clone(),
            workload: a.job.clone(),
            version: a.version,
            ..AllocUsage::default()
        });
        entry.containers.push(ContainerUsage {
            name: config
                .labels
                .get(CONTAINER_LABEL)
                .cloned()
                .unwrap_or_else(|| config.name.clone()),
            cpu_seconds: stats.cpu_usage_ns as f64 / 1e9,
            memory_bytes: stats.memory_bytes,
            memory_limit_bytes: limits.memory,
            oom_kills: stats.oom_kills,
            restarts: state.restarts,
        });
    }
    let links = std::fs::read_to_string("/proc/self/net/dev")
        .map(|t| parse_net_dev(&t))
        .unwrap_or_default();
    let mut v: Vec<AllocUsage> = out.into_values().collect();
    for u in &mut v {
        u.containers.sort_by(|a, b| a.name.cmp(&b.name));
        // The host side of the pod's veth: what it receives the pod sent.
        u.network = links
            .get(&crate::net::host_veth(&u.alloc))
            .map(|&(host_rx, host_tx)| (host_tx, host_rx));
    }
    v.sort_by(|a, b| a.alloc.cmp(&b.alloc));
    v
}

/// `/proc/net/dev` -> interface name -> (received bytes, transmitted bytes).
pub fn parse_net_dev(text: &str) -> HashMap<String, (u64, u64)> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            // rx: bytes packets errs drop fifo frame compressed multicast; then tx: bytes ...
            Some((name.trim().to_owned(), (*f.first()?, *f.get(8)?)))
        })
        .collect()
}

/// What the heartbeat carries: each allocation's containers summed.
pub fn to_proto(usage: &[AllocUsage]) -> Vec<pb::AllocationUsage> {
    usage
        .iter()
        .map(|u| pb::AllocationUsage {
            allocation: u.alloc.clone(),
            cpu_seconds: u.containers.iter().map(|c| c.cpu_seconds).sum(),
            memory_bytes: u.containers.iter().map(|c| c.memory_bytes).sum(),
            memory_limit_bytes: u
                .containers
                .iter()
                .map(|c| c.memory_limit_bytes)
                .sum::<Option<u64>>()
                .unwrap_or(0),
            oom_kills: u.containers.iter().map(|c| c.oom_kills).sum(),
        })
        .collect()
}

/// The `skiff_workload_*` families. Every series carries `namespace`, `workload` (the job's
/// name: `job` is Prometheus' own target label), `alloc`, `container`, `version` and `node`;
/// the network series are the allocation's (`container=""`, its containers share the pod's
/// network).
pub fn render(o: &mut String, node: &str, usage: &[AllocUsage]) {
    let base = |u: &AllocUsage, container: &str| {
        format!(
            "namespace=\"{}\",workload=\"{}\",alloc=\"{}\",container=\"{}\",version=\"{}\",node=\"{}\"",
            escape(&u.namespace),
            escape(&u.workload),
            escape(&u.alloc),
            escape(container),
            u.version,
            escape(node)
        )
    };
    type Pick = fn(&ContainerUsage) -> Option<String>;
    let families: [(&str, &str, &str, Pick); 5] = [
        (
            "skiff_workload_cpu_seconds_total",
            "counter",
            "CPU time the container used (user and system), from its cgroup.",
            |c| Some(c.cpu_seconds.to_string()),
        ),
        (
            "skiff_workload_memory_bytes",
            "gauge",
            "Memory charged to the container's cgroup, page cache included.",
            |c| Some(c.memory_bytes.to_string()),
        ),
        (
            "skiff_workload_memory_limit_bytes",
            "gauge",
            "The container's memory limit (no series: unlimited).",
            |c| c.memory_limit_bytes.map(|l| l.to_string()),
        ),
        (
            "skiff_workload_oom_kills_total",
            "counter",
            "Processes of the container the kernel's OOM killer killed.",
            |c| Some(c.oom_kills.to_string()),
        ),
        (
            "skiff_workload_restarts_total",
            "counter",
            "Times the container was restarted on this node.",
            |c| Some(c.restarts.to_string()),
        ),
    ];
    for (name, kind, help, pick) in families {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for u in usage {
            for c in &u.containers {
                if let Some(v) = pick(c) {
                    let _ = writeln!(o, "{name}{{{}}} {v}", base(u, &c.name));
                }
            }
        }
    }
    for (name, help, rx) in [
        (
            "skiff_workload_network_receive_bytes_total",
            "Bytes the allocation received on its pod network.",
            true,
        ),
        (
            "skiff_workload_network_transmit_bytes_total",
            "Bytes the allocation sent on its pod network.",
            false,
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        for u in usage {
            if let Some((r, t)) = u.network {
                let _ = writeln!(o, "{name}{{{}}} {}", base(u, ""), if rx { r } else { t });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_lines_give_received_and_sent_bytes() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:    1200      12    0    0    0     0          0         0     1200      12    0    0    0     0       0          0\n\
             skabc123: 5000 40 0 0 0 0 0 0 7000 50 0 0 0 0 0 0\n\
             broken: x y\n";
        let m = parse_net_dev(text);
        assert_eq!(m.get("lo"), Some(&(1200, 1200)));
        assert_eq!(m.get("skabc123"), Some(&(5000, 7000)));
        assert!(!m.contains_key("broken"));
    }

    #[test]
    fn series_carry_every_label_and_unlimited_memory_has_no_limit_series() {
        let u = AllocUsage {
            alloc: "a1".into(),
            namespace: "default".into(),
            workload: "web".into(),
            version: 3,
            containers: vec![
                ContainerUsage {
                    name: "app".into(),
                    cpu_seconds: 1.5,
                    memory_bytes: 1024,
                    memory_limit_bytes: Some(4096),
                    oom_kills: 1,
                    restarts: 2,
                },
                ContainerUsage {
                    name: "log\"s".into(),
                    ..ContainerUsage::default()
                },
            ],
            network: Some((10, 20)),
        };
        let mut o = String::new();
        render(&mut o, "n1", std::slice::from_ref(&u));
        let l = "namespace=\"default\",workload=\"web\",alloc=\"a1\",container=\"app\",version=\"3\",node=\"n1\"";
        for line in [
            format!("skiff_workload_cpu_seconds_total{{{l}}} 1.5"),
            format!("skiff_workload_memory_limit_bytes{{{l}}} 4096"),
            format!("skiff_workload_oom_kills_total{{{l}}} 1"),
            format!("skiff_workload_restarts_total{{{l}}} 2"),
        ] {
            assert!(o.lines().any(|x| x == line), "{line} in\n{o}");
        }
        assert!(o.contains("container=\"log\\\"s\""));
        assert_eq!(o.matches("skiff_workload_memory_limit_bytes{").count(), 1);
        assert!(o.contains("skiff_workload_network_receive_bytes_total{namespace=\"default\",workload=\"web\",alloc=\"a1\",container=\"\",version=\"3\",node=\"n1\"} 10"));
        let p = to_proto(&[u]);
        assert_eq!(p[0].memory_bytes, 1024);
        // One unlimited container: the allocation is unlimited.
        assert_eq!(p[0].memory_limit_bytes, 0);
        assert_eq!(p[0].oom_kills, 1);
    }
}
