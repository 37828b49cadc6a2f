//! Printing: aligned tables for people, JSON (`-o json`) for programs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use skiff_proto::v1 as pb;

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

pub fn job_json(j: &pb::JobSummary) -> Value {
    json!({
        "namespace": j.namespace,
        "name": j.name,
        "version": j.version,
        "status": j.status,
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
        "changes": r.changes.iter().map(|c| json!({"path": c.path, "old": c.old, "new": c.new})).collect::<Vec<_>>(),
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
        "allocations": r.allocations.iter().map(crate::fleet::allocation_json).collect::<Vec<_>>(),
        "pending": r.pending,
    }))
}

pub fn member_json(m: &pb::Member) -> Value {
    json!({
        "id": m.id,
        "rpc_addr": m.rpc_addr,
        "http_addr": m.http_addr,
        "role": m.role,
        "voter": m.voter,
        "applied_index": m.applied_index,
        "term": m.term,
    })
}
