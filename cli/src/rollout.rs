//! `skiff rollout status | pause | resume | promote | undo` and `skiff job history`: a job's
//! rollouts and versions.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde_json::{Value, json};
use skiff_common::{SpecFormat, diff_specs, parse_job_spec_unchecked};
use skiff_proto::v1 as pb;

use crate::args::RolloutAction;
use crate::client::{Controllers, rpc};
use crate::render::{self, Out, age, print_table};

pub fn rollout_json(r: &pb::RolloutInfo) -> Value {
    json!({
        "version": r.version, "from_version": r.from_version, "status": r.status,
        "reason": r.reason, "started_at_ms": r.started_at_ms,
        "progress_at_ms": r.progress_at_ms,
        "finished_at_ms": (r.finished_at_ms != 0).then_some(r.finished_at_ms),
        "canary": r.canary, "promoted": r.promoted,
        "rollback_of": (r.rollback_of != 0).then_some(r.rollback_of),
        "desired": r.desired, "placed": r.placed, "healthy": r.healthy, "old": r.old,
        "draining": r.draining, "awaiting_promotion": r.awaiting_promotion,
    })
}

/// One line of progress: `version 2: 6/10 healthy, 7 placed, 3 old, 1 draining [######    ]`.
pub fn progress_line(r: &pb::RolloutInfo) -> String {
    let width = 20usize;
    let done = if r.desired == 0 {
        width
    } else {
        (r.healthy.min(r.desired) as usize * width) / r.desired as usize
    };
    let mut line = format!(
        "version {}: {}/{} healthy, {} placed, {} old, {} draining [{}{}] {}",
        r.version,
        r.healthy,
        r.desired,
        r.placed,
        r.old,
        r.draining,
        "#".repeat(done),
        " ".repeat(width - done),
        r.status
    );
    if r.rollback_of != 0 {
        line.push_str(&format!(" (rollback of version {})", r.rollback_of));
    }
    if r.awaiting_promotion {
        line.push_str(" - canaries healthy, waiting for `skiff rollout promote`");
    } else if r.canary > 0 && !r.promoted {
        line.push_str(&format!(" - canary phase ({} canaries)", r.canary));
    }
    if !r.reason.is_empty() && r.status != "running" {
        line.push_str(&format!(": {}", r.reason));
    }
    line
}

fn is_open(r: &pb::RolloutInfo) -> bool {
    r.status == "running" || r.status == "paused"
}

async fn get(ctl: &Controllers, namespace: &str, name: &str) -> anyhow::Result<pb::GetJobResponse> {
    let req = pb::GetJobRequest {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        read: Some(pb::ReadOptions { stale: false }),
    };
    Ok(rpc!(ctl, jobs, get_job, req)?)
}

/// Prints the job's current rollout; with `follow`, keeps printing its progress until it
/// ends (following an automatic rollback of it too). Fails when the rollout followed failed.
pub async fn status(
    ctl: &Controllers,
    out: Out,
    name: String,
    namespace: String,
    follow: bool,
) -> anyhow::Result<()> {
    let resp = get(ctl, &namespace, &name).await?;
    let Some(first) = resp.rollouts.first().cloned() else {
        if out.json {
            return out.json(&json!({ "rollout": null }));
        }
        println!(
            "job {namespace}/{name} has had no rollout (one starts when a new version is applied)"
        );
        return Ok(());
    };
    if !follow || !is_open(&first) {
        if out.json {
            return out.json(&json!({ "rollout": rollout_json(&first) }));
        }
        println!("{}", progress_line(&first));
        return verdict(&resp, first.version);
    }
    let watched = first.version;
    let tty = std::io::stdout().is_terminal() && !out.json;
    let mut last = String::new();
    loop {
        let resp = get(ctl, &namespace, &name).await?;
        let Some(r) = resp.rollouts.first() else {
            anyhow::bail!("job {namespace}/{name} lost its rollouts");
        };
        // A rollback of the watched version is followed too.
        let ours = r.version == watched || r.rollback_of == watched;
        let line = progress_line(r);
        if line != last {
            if out.json {
                println!("{}", serde_json::to_string(&rollout_json(r))?);
            } else if tty {
                print!("\r\x1b[2K{line}");
                std::io::stdout().flush()?;
            } else {
                println!("{line}");
            }
            last = line;
        }
        if !ours || !is_open(r) {
            if tty {
                println!();
            }
            return verdict(&resp, watched);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Ok when the rollout of `version` succeeded (or is still open); an error saying why not.
fn verdict(resp: &pb::GetJobResponse, version: u64) -> anyhow::Result<()> {
    let Some(r) = resp.rollouts.iter().find(|r| r.version == version) else {
        return Ok(());
    };
    match r.status.as_str() {
        "failed" => anyhow::bail!("rollout of version {version} failed: {}", r.reason),
        "superseded" => {
            let after = resp.rollouts.first().map(|n| n.version).unwrap_or(0);
            anyhow::bail!(
                "rollout of version {version} was superseded by version {after}: {}",
                r.reason
            )
        }
        _ => Ok(()),
    }
}

pub async fn act(
    ctl: &Controllers,
    out: Out,
    name: String,
    namespace: String,
    action: RolloutAction,
    to_version: Option<u64>,
) -> anyhow::Result<()> {
    let req = pb::RolloutRequest {
        namespace,
        name,
        action: match action {
            RolloutAction::Pause => pb::RolloutAction::Pause,
            RolloutAction::Resume => pb::RolloutAction::Resume,
            RolloutAction::Promote => pb::RolloutAction::Promote,
            RolloutAction::Undo => pb::RolloutAction::Undo,
        } as i32,
        to_version: to_version.unwrap_or(0),
    };
    let resp = rpc!(ctl, jobs, rollout, req)?;
    if out.json {
        return out.json(&json!({
            "job": resp.job.as_ref().map(render::job_json),
            "rollout": resp.rollout.as_ref().map(rollout_json),
        }));
    }
    let job = resp.job.unwrap_or_default();
    let what = match action {
        RolloutAction::Pause => "paused",
        RolloutAction::Resume => "resumed",
        RolloutAction::Promote => "promoted",
        RolloutAction::Undo => "undone",
    };
    println!("job {}/{}: rollout {what}", job.namespace, job.name);
    if let Some(r) = resp.rollout {
        println!("{}", progress_line(&r));
    }
    Ok(())
}

/// `skiff job history`: every version with its rollout and what changed from the one
/// before; with `diff`, the changes between two versions.
pub async fn history(
    ctl: &Controllers,
    out: Out,
    name: String,
    namespace: String,
    diff: Vec<u64>,
) -> anyhow::Result<()> {
    let resp = get(ctl, &namespace, &name).await?;
    let mut versions = Vec::new();
    for v in resp.versions.iter().rev() {
        let spec = parse_job_spec_unchecked(&v.spec_json, SpecFormat::Json)
            .map_err(|e| anyhow::anyhow!("version {}: {e}", v.version))?;
        versions.push((v, spec));
    }
    if !diff.is_empty() {
        let find = |n: u64| {
            versions
                .iter()
                .find(|(v, _)| v.version == n)
                .map(|(_, s)| s)
                .ok_or_else(|| anyhow::anyhow!("job {namespace}/{name} has no version {n}"))
        };
        let (a, b) = match diff[..] {
            [a, b] => (a, b),
            _ => anyhow::bail!("--diff takes two versions: --diff A --diff B"),
        };
        let changes = diff_specs(find(a)?, find(b)?);
        if out.json {
            return out.json(&json!({ "from": a, "to": b, "changes": changes }));
        }
        if changes.is_empty() {
            println!("versions {a} and {b} are the same");
        }
        for c in &changes {
            println!(
                "  {}: {} -> {}",
                c.path,
                c.old.as_deref().unwrap_or("(none)"),
                c.new.as_deref().unwrap_or("(none)")
            );
        }
        return Ok(());
    }
    let rollout_of = |n: u64| resp.rollouts.iter().find(|r| r.version == n);
    let mut rows = Vec::new();
    let mut list = Vec::new();
    let mut prev: Option<&skiff_common::JobSpec> = None;
    for (v, spec) in &versions {
        let changes = prev.map(|p| diff_specs(p, spec)).unwrap_or_default();
        let r = rollout_of(v.version);
        let note = match r {
            Some(r) if r.rollback_of != 0 => format!("rollback of version {}", r.rollback_of),
            _ if prev.is_none() => "created".to_owned(),
            _ => changes
                .iter()
                .map(|c| c.path.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        };
        rows.push(vec![
            v.version.to_string(),
            age(v.submitted_at_ms),
            r.map_or("-".to_owned(), |r| r.status.clone()),
            spec.replicas.to_string(),
            note.clone(),
        ]);
        list.push(json!({
            "version": v.version, "submitted_at_ms": v.submitted_at_ms,
            "rollout": r.map(rollout_json), "replicas": spec.replicas,
            "changes": changes, "stable": resp.stable_version == v.version,
        }));
        prev = Some(spec);
    }
    if out.json {
        list.reverse();
        return out.json(&json!({ "versions": list, "stable_version": resp.stable_version }));
    }
    rows.reverse();
    print_table(
        &["VERSION", "SUBMITTED", "ROLLOUT", "REPLICAS", "CHANGES"],
        rows,
    );
    Ok(())
}
