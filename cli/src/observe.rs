//! `skiff events` (the cluster's event log, followed with `-f`) and `skiff top` (what each
//! running allocation uses, from its agent's last heartbeat).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use skiff_proto::v1 as pb;

use crate::client::{Controllers, rpc};
use crate::render::{Out, print_table};

fn event_json(e: &pb::Event) -> Value {
    json!({
        "seq": e.seq, "at_ms": e.at_ms, "kind": e.kind, "namespace": e.namespace,
        "job": e.job, "allocation": e.allocation, "node": e.node, "message": e.message,
    })
}

/// `2026-12-03T09:41:07.120Z`.
fn timestamp(ms: i64) -> String {
    format!(
        "{}.{:03}Z",
        skiff_common::time::utc_seconds(ms.div_euclid(1000)),
        ms.rem_euclid(1000)
    )
}

fn event_row(e: &pb::Event) -> Vec<String> {
    let subject = match (e.job.is_empty(), e.allocation.is_empty()) {
        (true, _) => format!("node/{}", e.node),
        (false, true) => format!("job/{}/{}", e.namespace, e.job),
        (false, false) => format!(
            "alloc/{}/{}/{}",
            e.namespace,
            e.job,
            &e.allocation[..e.allocation.len().min(8)]
        ),
    };
    vec![
        timestamp(e.at_ms),
        e.kind.clone(),
        subject,
        e.message.clone(),
    ]
}

pub struct EventsFilter {
    pub namespace: Option<String>,
    pub job: Option<String>,
    pub node: Option<String>,
    pub limit: u32,
}

/// Prints the newest events (table, or a JSON array), then with `follow` every new one as
/// it happens (a line each; JSON lines with `-o json`) until interrupted.
pub async fn events(
    ctl: &Controllers,
    out: Out,
    filter: EventsFilter,
    follow: bool,
) -> anyhow::Result<()> {
    let request = |after: u64, wait_ms: u64, limit: u32| pb::ListEventsRequest {
        namespace: filter.namespace.clone().unwrap_or_default(),
        job: filter.job.clone().unwrap_or_default(),
        node: filter.node.clone().unwrap_or_default(),
        after,
        limit,
        wait_ms,
        read: None,
    };
    let first = rpc!(ctl, jobs, list_events, request(0, 0, filter.limit))?;
    let mut last = first.last_seq;
    if out.json && !follow {
        return out.json(&first.events.iter().map(event_json).collect::<Vec<_>>());
    }
    let headers = ["TIME", "KIND", "SUBJECT", "MESSAGE"];
    if out.json {
        for e in &first.events {
            println!("{}", event_json(e));
        }
    } else if follow {
        // Unaligned lines: a table cannot be aligned ahead of events not yet known.
        for e in &first.events {
            println!("{}", event_row(e).join("  "));
        }
    } else {
        print_table(&headers, first.events.iter().map(event_row).collect());
    }
    if !follow {
        return Ok(());
    }
    loop {
        let next = match rpc!(ctl, jobs, list_events, request(last, 20_000, 500)) {
            Ok(r) => r,
            Err(e) => {
                // A leader change or a restarting member: try again shortly.
                eprintln!("events: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for e in &next.events {
            if out.json {
                println!("{}", event_json(e));
            } else {
                println!("{}", event_row(e).join("  "));
            }
        }
        last = last.max(next.last_seq);
        if let Some(e) = next.events.last() {
            last = last.max(e.seq);
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}Mi", bytes as f64 / (1024.0 * 1024.0))
}

/// What each running allocation uses: CPU (cores, over the last heartbeats) and memory
/// against its limit.
pub async fn top(
    ctl: &Controllers,
    out: Out,
    job: Option<String>,
    namespace: Option<String>,
) -> anyhow::Result<()> {
    let allocs = rpc!(
        ctl,
        jobs,
        list_allocations,
        pb::ListAllocationsRequest {
            namespace: namespace.unwrap_or_default(),
            job: job.unwrap_or_default(),
            all: false,
            read: None,
        }
    )?;
    let usage = rpc!(ctl, nodes, list_usage, pb::ListUsageRequest {})?;
    let by_alloc: HashMap<&str, &pb::AllocationUsageRate> = usage
        .usage
        .iter()
        .map(|u| (u.allocation.as_str(), u))
        .collect();
    let rows: Vec<(&pb::Allocation, Option<&&pb::AllocationUsageRate>)> = allocs
        .allocations
        .iter()
        .filter(|a| a.observed == pb::AllocationState::Running as i32)
        .map(|a| (a, by_alloc.get(a.id.as_str())))
        .collect();
    if out.json {
        let v: Vec<Value> = rows
            .iter()
            .map(|(a, u)| {
                json!({
                    "allocation": a.id, "namespace": a.namespace, "job": a.job,
                    "version": a.job_version, "node": a.node,
                    "cpu_cores": u.map(|u| u.cpu_cores),
                    "memory_bytes": u.map(|u| u.memory_bytes),
                    "memory_limit_bytes": u.and_then(|u| (u.memory_limit_bytes > 0).then_some(u.memory_limit_bytes)),
                    "oom_kills": u.map(|u| u.oom_kills),
                    "at_ms": u.map(|u| u.at_ms),
                })
            })
            .collect();
        return out.json(&v);
    }
    let table = rows
        .iter()
        .map(|(a, u)| {
            let (cpu, mem, limit) = match u {
                Some(u) => (
                    format!("{:.3}", u.cpu_cores),
                    mib(u.memory_bytes),
                    if u.memory_limit_bytes > 0 {
                        format!(
                            "{} ({:.0}%)",
                            mib(u.memory_limit_bytes),
                            100.0 * u.memory_bytes as f64 / u.memory_limit_bytes as f64
                        )
                    } else {
                        "-".into()
                    },
                ),
                None => ("?".into(), "?".into(), "?".into()),
            };
            vec![
                a.id[..a.id.len().min(8)].to_owned(),
                format!("{}/{}", a.namespace, a.job),
                a.job_version.to_string(),
                a.node.clone(),
                cpu,
                mem,
                limit,
            ]
        })
        .collect();
    print_table(
        &["ALLOC", "JOB", "VERSION", "NODE", "CPU", "MEMORY", "LIMIT"],
        table,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_iso8601() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_796_291_267_120), "2026-12-03T09:47:47.120Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
