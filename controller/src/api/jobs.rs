//! The `Jobs` service.

use skiff_common::{SpecFormat, parse_job_spec};
use skiff_proto::v1 as pb;
use skiff_proto::v1::jobs_server::Jobs;
use tonic::{Request, Response, Status};

use super::{ApiContext, ApiError, MAX_SPEC_BYTES, now_ms};
use crate::state::{Allocation, Command, Job, JobSummary, Outcome};

/// Serves `skiff.v1.Jobs`.
pub struct JobsApi {
    ctx: ApiContext,
}

impl JobsApi {
    pub fn new(ctx: ApiContext) -> Self {
        JobsApi { ctx }
    }
}

pub(crate) fn summary_pb(s: &JobSummary) -> pb::JobSummary {
    pb::JobSummary {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        version: s.version,
        status: s.status.as_str().to_string(),
        replicas: s.replicas,
        image: s.image.clone(),
        submitted_at_ms: s.submitted_at_ms,
        versions: s.versions,
    }
}

fn allocation_pb(a: &Allocation) -> pb::Allocation {
    pb::Allocation {
        id: a.id.clone(),
        namespace: a.namespace.clone(),
        job: a.job.clone(),
        job_version: a.job_version,
        node: a.node.clone(),
        desired: format!("{:?}", a.desired).to_lowercase(),
        observed: a.observed.as_str().to_string(),
    }
}

fn job_detail(job: &Job, allocations: Vec<pb::Allocation>) -> pb::GetJobResponse {
    pb::GetJobResponse {
        job: Some(summary_pb(&job.summary())),
        versions: job
            .versions()
            .iter()
            .rev()
            .map(|v| pb::JobVersion {
                version: v.version,
                submitted_at_ms: v.submitted_at_ms,
                spec_json: v.spec.to_canonical_json(),
            })
            .collect(),
        allocations,
    }
}

fn namespace_or_default(ns: &str) -> &str {
    if ns.is_empty() { "default" } else { ns }
}

fn unexpected(outcome: Outcome) -> ApiError {
    ApiError::BadRequest(format!("unexpected state machine outcome {outcome:?}"))
}

#[tonic::async_trait]
impl Jobs for JobsApi {
    async fn apply_job(
        &self,
        req: Request<pb::ApplyJobRequest>,
    ) -> Result<Response<pb::ApplyJobResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("ApplyJob", async {
                if req.spec.len() > MAX_SPEC_BYTES {
                    return Err(ApiError::BadRequest(format!(
                        "spec: {} bytes is more than the {MAX_SPEC_BYTES} allowed",
                        req.spec.len()
                    )));
                }
                let format = match pb::SpecFormat::try_from(req.format) {
                    Ok(pb::SpecFormat::Toml) => SpecFormat::Toml,
                    Ok(pb::SpecFormat::Json) => SpecFormat::Json,
                    Ok(pb::SpecFormat::Auto) => SpecFormat::Auto,
                    Err(_) => {
                        return Err(ApiError::BadRequest(format!(
                            "format: unknown value {}",
                            req.format
                        )));
                    }
                };
                let spec = parse_job_spec(&req.spec, format)?;
                let (result, _index) = self
                    .ctx
                    .node
                    .write(Command::ApplyJob {
                        spec: Box::new(spec),
                        at_ms: now_ms(),
                    })
                    .await?;
                match result? {
                    Outcome::JobApplied {
                        job,
                        created,
                        changed,
                        changes,
                    } => Ok(pb::ApplyJobResponse {
                        job: Some(summary_pb(&job)),
                        changed,
                        created,
                        changes: changes
                            .into_iter()
                            .map(|c| pb::FieldChange {
                                path: c.path,
                                old: c.old,
                                new: c.new,
                            })
                            .collect(),
                    }),
                    other => Err(unexpected(other)),
                }
            })
            .await
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("GetJob", async {
                self.ctx.read_barrier(req.read.as_ref()).await?;
                let ns = namespace_or_default(&req.namespace);
                let applied = self.ctx.node.state();
                let job = applied.state.job(ns, &req.name).ok_or_else(|| {
                    ApiError::Apply(crate::state::ApplyError::JobNotFound {
                        namespace: ns.to_string(),
                        name: req.name.clone(),
                    })
                })?;
                let allocs = applied
                    .state
                    .job_allocations(ns, &req.name)
                    .map(allocation_pb)
                    .collect();
                Ok(job_detail(job, allocs))
            })
            .await
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("ListJobs", async {
                self.ctx.read_barrier(req.read.as_ref()).await?;
                let ns = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
                let applied = self.ctx.node.state();
                Ok(pb::ListJobsResponse {
                    jobs: applied
                        .state
                        .jobs(ns)
                        .map(|j| summary_pb(&j.summary()))
                        .collect(),
                })
            })
            .await
    }

    async fn stop_job(
        &self,
        req: Request<pb::StopJobRequest>,
    ) -> Result<Response<pb::StopJobResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("StopJob", async {
                let namespace = namespace_or_default(&req.namespace).to_string();
                skiff_common::validate_name("namespace", &namespace)?;
                skiff_common::validate_name("name", &req.name)?;
                // Refuse a missing job without putting a no-op entry in the log.
                self.ctx.read_barrier(None).await?;
                if self
                    .ctx
                    .node
                    .state()
                    .state
                    .job(&namespace, &req.name)
                    .is_none()
                {
                    return Err(ApiError::Apply(crate::state::ApplyError::JobNotFound {
                        namespace,
                        name: req.name.clone(),
                    }));
                }
                let (result, _) = self
                    .ctx
                    .node
                    .write(Command::StopJob {
                        namespace,
                        name: req.name.clone(),
                        at_ms: now_ms(),
                    })
                    .await?;
                match result? {
                    Outcome::JobStopped { job, changed } => Ok(pb::StopJobResponse {
                        job: Some(summary_pb(&job)),
                        changed,
                    }),
                    other => Err(unexpected(other)),
                }
            })
            .await
    }
}
