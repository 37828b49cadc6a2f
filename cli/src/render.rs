//! Everything the CLI prints: aligned tables for people, JSON (`-o json`) for programs, and
//! the names of the wire's enums (the JSON keeps the lower-case names scripts match on).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use skiff_proto::v1 as pb;

/// How to print: `-o table` (default) or `-o json`.
#[derive(Clone, Copy)]
pub struct Out {
    pub json: bool,
}

impl Out {
    pub fn json<T: serde::Serialize>(&self, v: &T) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    }
}

pub fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

/// "3m", "2h", "5d" since a Unix-millisecond timestamp.
pub fn age(ms: i64) -> String {
    let then = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    let secs = SystemTime::now()
        .duration_since(then)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

pub fn gib(bytes: u64) -> String {
    format!("{:.1}Gi", bytes as f64 / (1u64 << 30) as f64)
}

/// A field change of an apply or plan: `path: old -> new`.
pub fn change_line(c: &pb::FieldChange) -> String {
    format!(
        "  {}: {} -> {}",
        c.path,
        c.old.as_deref().unwrap_or("(none)"),
        c.new.as_deref().unwrap_or("(none)")
    )
}

fn changes_json(changes: &[pb::FieldChange]) -> Vec<Value> {
    changes
        .iter()
        .map(|c| json!({"path": c.path, "old": c.old, "new": c.new}))
        .collect()
}

// The wire's enums by name. A value this CLI does not know prints as "unknown".

pub fn job_status(v: i32) -> &'static str {
    match pb::JobStatus::try_from(v) {
        Ok(pb::JobStatus::Running) => "running",
        Ok(pb::JobStatus::Stopped) => "stopped",
        _ => "unknown",
    }
}

pub fn allocation_state(v: i32) -> &'static str {
    match pb::AllocationState::try_from(v) {
        Ok(pb::AllocationState::Pending) => "pending",
        Ok(pb::AllocationState::Running) => "running",
        Ok(pb::AllocationState::Exited) => "exited",
        Ok(pb::AllocationState::Failed) => "failed",
        Ok(pb::AllocationState::Lost) => "lost",
        _ => "unknown",
    }
}

pub fn desired_state(v: i32) -> &'static str {
    match pb::DesiredState::try_from(v) {
        Ok(pb::DesiredState::Run) => "run",
        Ok(pb::DesiredState::Stop) => "stop",
        _ => "unknown",
    }
}

/// "" when there is no check.
pub fn health(v: i32) -> &'static str {
    match pb::Health::try_from(v) {
        Ok(pb::Health::Unspecified) => "",
        Ok(pb::Health::Starting) => "starting",
        Ok(pb::Health::Healthy) => "healthy",
        Ok(pb::Health::Unhealthy) => "unhealthy",
        Err(_) => "unknown",
    }
}

pub fn node_status(v: i32) -> &'static str {
    match pb::NodeStatus::try_from(v) {
        Ok(pb::NodeStatus::Ready) => "ready",
        Ok(pb::NodeStatus::Draining) => "draining",
        Ok(pb::NodeStatus::Down) => "down",
        _ => "unknown",
    }
}

pub fn member_role(v: i32) -> &'static str {
    match pb::MemberRole::try_from(v) {
        Ok(pb::MemberRole::Leader) => "leader",
        Ok(pb::MemberRole::Follower) => "follower",
        Ok(pb::MemberRole::Candidate) => "candidate",
        Ok(pb::MemberRole::Learner) => "learner",
        Ok(pb::MemberRole::Unreachable) => "unreachable",
        _ => "unknown",
    }
}

pub fn backend(v: i32) -> &'static str {
    match pb::WireguardBackend::try_from(v) {
        Ok(pb::WireguardBackend::Kernel) => "kernel",
        Ok(pb::WireguardBackend::Userspace) => "userspace",
        _ => "unknown",
    }
}

pub fn protocol(v: i32) -> &'static str {
    match pb::Protocol::try_from(v) {
        Ok(pb::Protocol::Udp) => "udp",
        Ok(pb::Protocol::Http) => "http",
        _ => "tcp",
    }
}

pub fn job_json(j: &pb::JobSummary) -> Value {
    json!({
        "namespace": j.namespace,
        "name": j.name,
        "version": j.version,
        "status": job_status(j.status),
        "replicas": j.replicas,
        "image": j.image,
        "submitted_at_ms": j.submitted_at_ms,
        "versions": j.versions,
    })
}

pub fn apply_json(r: &pb::ApplyJobResponse) -> Value {
    json!({
        "job": r.job.as_ref().map(job_json),
        "created": r.created,
        "changed": r.changed,
        "changes": changes_json(&r.changes),
    })
}

pub fn plan_json(r: &pb::PlanJobResponse) -> Value {
    json!({
        "job": r.job.as_ref().map(job_json),
        "changed": r.changed,
        "changes": changes_json(&r.changes),
        "placements": r.placements.iter().map(|p| json!({"node": p.node, "count": p.count})).collect::<Vec<_>>(),
        "stops": r.stops,
        "unplaced": r.unplaced,
        "pending": r.pending,
    })
}

pub fn job_detail_json(r: &pb::GetJobResponse) -> anyhow::Result<Value> {
    let mut versions = Vec::new();
    for v in &r.versions {
        let spec: Value = serde_json::from_str(&v.spec_json)?;
        versions.push(
            json!({"version": v.version, "submitted_at_ms": v.submitted_at_ms, "spec": spec}),
        );
    }
    Ok(json!({
        "job": r.job.as_ref().map(job_json),
        "versions": versions,
        "allocations": r.allocations.iter().map(allocation_json).collect::<Vec<_>>(),
        "pending": r.pending,
        "rollout": r.rollouts.first().map(crate::rollout::rollout_json),
        "stable_version": (r.stable_version != 0).then_some(r.stable_version),
    }))
}

pub fn allocation_json(a: &pb::Allocation) -> Value {
    json!({
        "id": a.id, "namespace": a.namespace, "job": a.job, "job_version": a.job_version,
        "node": a.node, "ip": a.ip, "health": health(a.health), "health_output": a.health_output,
        "desired": desired_state(a.desired), "status": allocation_state(a.observed),
        "restarts": a.restarts, "exit_code": a.exit_code, "reason": a.reason,
        "created_at_ms": a.created_at_ms, "log_dropped_bytes": a.log_dropped_bytes,
        "log_error": a.log_error,
        "containers": a.containers.iter().map(container_json).collect::<Vec<_>>(),
        "healthy_since_ms": (a.healthy_since_ms != 0).then_some(a.healthy_since_ms),
        "draining_since_ms": (a.drain_since_ms != 0).then_some(a.drain_since_ms),
    })
}

pub fn container_json(c: &pb::ContainerStatus) -> Value {
    json!({
        "name": c.name, "lifecycle": lifecycle(c.lifecycle), "state": allocation_state(c.state),
        "exit_code": c.exit_code, "restarts": c.restarts, "reason": c.reason,
    })
}

pub fn lifecycle(l: i32) -> &'static str {
    match pb::ContainerLifecycle::try_from(l) {
        Ok(pb::ContainerLifecycle::Init) => "init",
        Ok(pb::ContainerLifecycle::Sidecar) => "sidecar",
        _ => "main",
    }
}

pub fn volume_json(v: &pb::NodeVolume) -> Value {
    json!({
        "node": v.node, "namespace": v.namespace, "job": v.job, "name": v.name,
        "size_bytes": v.size_bytes, "used_by": v.used_by, "created_at_ms": v.created_at_ms,
    })
}

pub fn member_json(m: &pb::Member) -> Value {
    json!({
        "id": m.id,
        "rpc_addr": m.rpc_addr,
        "http_addr": m.http_addr,
        "role": member_role(m.role),
        "voter": m.voter,
        "applied_index": m.applied_index,
        "term": m.term,
        "command_level": m.command_level,
        "release": m.release,
    })
}

pub fn node_json(n: &pb::Node) -> Value {
    let res = |r: &Option<pb::NodeResources>| {
        let r = (*r).unwrap_or_default();
        json!({"cpu": r.cpu, "memory": r.memory, "pids": r.pids})
    };
    json!({
        "name": n.name, "address": n.address, "status": node_status(n.status), "labels": n.labels,
        "disk_pressure": n.disk_pressure,
        "capabilities": n.capabilities,
        "heartbeat_age_ms": (n.heartbeat_age_ms >= 0).then_some(n.heartbeat_age_ms),
        "subnet": n.subnet, "host_volume_dirs": n.host_volume_dirs,
        "named_volumes": n.named_volumes,
        "wireguard": n.wireguard.as_ref().map(|w| wireguard_json(w, n.wireguard_status.as_ref())),
        "total": res(&n.total), "allocated": res(&n.allocated), "allocations": n.allocations,
        "registered_at_ms": n.registered_at_ms, "status_changed_at_ms": n.status_changed_at_ms,
    })
}

fn wireguard_json(w: &pb::WireguardIdentity, status: Option<&pb::WireguardStatus>) -> Value {
    json!({
        "public_key": w.public_key, "endpoint": w.endpoint, "backend": backend(w.backend),
        "listen_port": status.map(|s| s.listen_port),
        "peer_count": status.map(|s| s.peer_count),
        "peers_handshaken": status.map(|s| s.peers_handshaken),
        // Listed only when asked for (`skiff nodes --peers`): null when left out.
        "peers": status.filter(|s| !s.peers.is_empty() || s.peer_count == 0).map(|s| s.peers.iter().map(|p| json!({
            "node": p.node, "public_key": p.public_key, "endpoint": p.endpoint,
            "allowed_ips": p.allowed_ips, "last_handshake_unix": p.last_handshake_unix,
            "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes,
            "persistent_keepalive": p.persistent_keepalive,
        })).collect::<Vec<_>>()),
    })
}

pub fn service_json(s: &pb::ServiceInfo) -> Value {
    json!({
        "name": s.name, "namespace": s.namespace, "job": s.job,
        "dns": format!("{}.{}.skiff.internal", s.name, s.namespace),
        "vip": (!s.vip.is_empty()).then_some(&s.vip),
        "port": s.port_name,
        "ports": s.ports.iter().map(|p| json!({
            "name": p.name, "port": p.port, "protocol": protocol(p.protocol),
        })).collect::<Vec<_>>(),
        "tags": s.tags,
        "endpoints": s.endpoints.iter().map(|e| json!({
            "allocation": e.allocation, "node": e.node, "ip": e.ip,
            "health": health(e.health), "health_output": e.health_output, "ready": e.ready,
            "mesh": e.mesh, "draining": e.draining,
        })).collect::<Vec<_>>(),
        "mesh": s.mesh.as_ref().map(|m| json!({
            "identity": m.identity,
            "mode": if m.mode == pb::MeshMode::Permissive as i32 { "permissive" } else { "strict" },
            "allow_from": m.allow_from, "upstreams": m.upstreams,
        })),
    })
}

/// Bytes for people: `512 B`, `3.2 KiB`, `1.5 MiB`, `2.0 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}
