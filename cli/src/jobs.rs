//! `skiff apply | plan | jobs | job status | stop | scale`: jobs and their versions.

use std::io::Read;
use std::path::{Path, PathBuf};

use skiff_proto::v1 as pb;

use crate::client::{Controllers, rpc};
use crate::render::{self, Out, age, print_table};

fn read_spec(path: &PathBuf) -> anyhow::Result<pb::ApplyJobRequest> {
    let spec = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?
    };
    Ok(pb::ApplyJobRequest {
        spec,
        format: spec_format(path) as i32,
    })
}

fn spec_format(path: &Path) -> pb::SpecFormat {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => pb::SpecFormat::Toml,
        Some("json") => pb::SpecFormat::Json,
        _ => pb::SpecFormat::Auto,
    }
}

pub async fn apply(ctl: &Controllers, out: Out, file: &PathBuf) -> anyhow::Result<()> {
    let resp = rpc!(ctl, jobs, apply_job, read_spec(file)?)?;
    if out.json {
        return out.json(&render::apply_json(&resp));
    }
    let job = resp.job.unwrap_or_default();
    let key = format!("{}/{}", job.namespace, job.name);
    if resp.created {
        println!("job {key} created: version {}", job.version);
    } else if resp.changed {
        println!(
            "job {key} updated: version {} (was {})",
            job.version,
            job.version.saturating_sub(1)
        );
        for c in &resp.changes {
            println!("{}", render::change_line(c));
        }
        // Anything but the replica count is rolled out.
        if resp.changes.iter().any(|c| c.path != "replicas") {
            let ns = if job.namespace == "default" {
                String::new()
            } else {
                format!(" -n {}", job.namespace)
            };
            println!(
                "rolling out: follow with `skiff rollout status {}{ns}`",
                job.name
            );
        }
    } else {
        println!("job {key} unchanged: version {}", job.version);
    }
    Ok(())
}

pub async fn plan(ctl: &Controllers, out: Out, file: &PathBuf) -> anyhow::Result<()> {
    let resp = rpc!(ctl, jobs, plan_job, read_spec(file)?)?;
    if out.json {
        return out.json(&render::plan_json(&resp));
    }
    let job = resp.job.clone().unwrap_or_default();
    println!(
        "job {}/{}: version {}{}",
        job.namespace,
        job.name,
        job.version,
        if resp.changed { "" } else { " (unchanged)" }
    );
    for c in &resp.changes {
        println!("{}", render::change_line(c));
    }
    if resp.placements.is_empty() && resp.stops.is_empty() && resp.unplaced == 0 {
        println!("no changes to allocations");
    }
    for p in &resp.placements {
        println!("  place {} on {}", p.count, p.node);
    }
    if !resp.stops.is_empty() {
        println!("  stop {}: {}", resp.stops.len(), resp.stops.join(", "));
    }
    if resp.unplaced > 0 {
        println!("  {} would not be placed: {}", resp.unplaced, resp.pending);
    }
    Ok(())
}

pub async fn list(
    ctl: &Controllers,
    out: Out,
    namespace: Option<String>,
    stale: bool,
) -> anyhow::Result<()> {
    let req = pb::ListJobsRequest {
        namespace: namespace.unwrap_or_default(),
        read: Some(pb::ReadOptions { stale }),
    };
    let resp = rpc!(ctl, jobs, list_jobs, req)?;
    if out.json {
        return out.json(&resp.jobs.iter().map(render::job_json).collect::<Vec<_>>());
    }
    let rows = resp
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.namespace.clone(),
                j.name.clone(),
                j.version.to_string(),
                render::job_status(j.status).to_owned(),
                j.replicas.to_string(),
                j.image.clone(),
                age(j.submitted_at_ms),
            ]
        })
        .collect();
    print_table(
        &[
            "NAMESPACE",
            "NAME",
            "VERSION",
            "STATUS",
            "REPLICAS",
            "IMAGE",
            "SUBMITTED",
        ],
        rows,
    );
    Ok(())
}

pub async fn status(
    ctl: &Controllers,
    out: Out,
    name: String,
    namespace: String,
    stale: bool,
) -> anyhow::Result<()> {
    let req = pb::GetJobRequest {
        namespace,
        name,
        read: Some(pb::ReadOptions { stale }),
    };
    let resp = rpc!(ctl, jobs, get_job, req)?;
    if out.json {
        return out.json(&render::job_detail_json(&resp)?);
    }
    let job = resp.job.clone().unwrap_or_default();
    println!("job:       {}/{}", job.namespace, job.name);
    println!("status:    {}", render::job_status(job.status));
    println!("version:   {} ({} kept)", job.version, job.versions);
    println!("replicas:  {}", job.replicas);
    println!("image:     {}", job.image);
    println!("submitted: {} ago", age(job.submitted_at_ms));
    if !resp.pending.is_empty() {
        println!("pending:   {}", resp.pending);
    }
    if let Some(r) = resp.rollouts.first() {
        println!("rollout:   {}", crate::rollout::progress_line(r));
        // Why the one before it ended, when it failed (an automatic rollback says why).
        if let Some(prev) = resp.rollouts.get(1).filter(|p| p.status == "failed")
            && r.rollback_of == prev.version
        {
            println!(
                "           version {} failed: {}",
                prev.version, prev.reason
            );
        }
    }
    println!();
    println!("versions:");
    let rows = resp
        .versions
        .iter()
        .map(|v| vec![v.version.to_string(), age(v.submitted_at_ms)])
        .collect();
    print_table(&["VERSION", "SUBMITTED"], rows);
    println!();
    if resp.allocations.is_empty() {
        println!("allocations: none");
        return Ok(());
    }
    let rows = resp
        .allocations
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.job_version.to_string(),
                a.node.clone(),
                if a.drain_since_ms != 0 {
                    "drain".to_owned()
                } else {
                    render::desired_state(a.desired).to_owned()
                },
                render::allocation_state(a.observed).to_owned(),
            ]
        })
        .collect();
    print_table(
        &["ALLOCATION", "VERSION", "NODE", "DESIRED", "STATUS"],
        rows,
    );
    Ok(())
}

pub async fn stop(
    ctl: &Controllers,
    out: Out,
    name: String,
    namespace: String,
) -> anyhow::Result<()> {
    let resp = rpc!(ctl, jobs, stop_job, pb::StopJobRequest { namespace, name })?;
    let job = resp.job.clone().unwrap_or_default();
    if out.json {
        return out
            .json(&serde_json::json!({ "job": render::job_json(&job), "changed": resp.changed }));
    }
    if resp.changed {
        println!(
            "job {}/{} stopped (version {} kept)",
            job.namespace, job.name, job.version
        );
    } else {
        println!("job {}/{} was already stopped", job.namespace, job.name);
    }
    Ok(())
}

pub async fn scale(
    ctl: &Controllers,
    out: Out,
    name: String,
    namespace: String,
    replicas: u32,
) -> anyhow::Result<()> {
    let req = pb::ScaleJobRequest {
        namespace,
        name,
        replicas,
    };
    let resp = rpc!(ctl, jobs, scale_job, req)?;
    if out.json {
        return out.json(&render::apply_json(&resp));
    }
    let job = resp.job.unwrap_or_default();
    if resp.changed {
        println!(
            "job {}/{} scaled to {} (version {})",
            job.namespace, job.name, job.replicas, job.version
        );
    } else {
        println!(
            "job {}/{} already has {} replicas",
            job.namespace, job.name, job.replicas
        );
    }
    Ok(())
}
