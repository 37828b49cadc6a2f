//! The `Jobs` service.

use skiff_common::{SpecFormat, parse_job_spec};
use skiff_proto::v1 as pb;
use skiff_proto::v1::jobs_server::Jobs;
use tonic::{Request, Response, Status};

use super::{ApiContext, ApiError, MAX_SPEC_BYTES, convert, now_ms};
use crate::reconcile;
use crate::state::{Command, DesiredStatus, Job, Outcome, RolloutChange};

/// Serves `skiff.v1.Jobs`.
pub struct JobsApi {
    ctx: ApiContext,
}

impl JobsApi {
    pub fn new(ctx: ApiContext) -> Self {
        JobsApi { ctx }
    }

    /// Commits a (validated) spec as the job's next version.
    async fn apply_spec(
        &self,
        spec: skiff_common::JobSpec,
    ) -> Result<pb::ApplyJobResponse, ApiError> {
        self.check_host_volumes(&spec)?;
        // A service name taken by another job: refused before it reaches the log (most specs
        // publish none and skip the state's lock).
        if spec.service_name().is_some() {
            self.ctx.node.state().state.check_service_free(&spec)?;
        }
        let (result, _index) = self
            .ctx
            .node
            .write(Command::ApplyJob {
                spec: Box::new(spec),
                at_ms: now_ms(),
            })
            .await?;
        applied_pb(result?)
    }
}

impl JobsApi {
    /// A host volume must lie under a directory some node allows (`--host-volume-dir`):
    /// otherwise no node could ever run the job, and the user hears it now, not as a pending
    /// reason later.
    fn check_host_volumes(&self, spec: &skiff_common::JobSpec) -> Result<(), ApiError> {
        // Most specs have none: no need to take the state's lock (the apply path wants it).
        if spec.volumes.iter().all(|v| v.path.is_none()) {
            return Ok(());
        }
        let applied = self.ctx.node.state();
        let nodes: Vec<_> = applied.state.nodes().collect();
        for (i, v) in spec.volumes.iter().enumerate() {
            let Some(path) = v.path.as_deref() else {
                continue;
            };
            if nodes.iter().any(|n| n.allows_host_path(path)) {
                continue;
            }
            let mut allowed: Vec<&str> = nodes
                .iter()
                .flat_map(|n| n.host_volume_dirs.iter().map(String::as_str))
                .collect();
            allowed.sort_unstable();
            allowed.dedup();
            let allowed = if allowed.is_empty() {
                "no node allows host volumes (start agents with --host-volume-dir)".to_owned()
            } else {
                format!("nodes allow {}", allowed.join(", "))
            };
            return Err(ApiError::BadRequest(format!(
                "volumes[{i}].path: {path} is not under any node's host volume directories ({allowed})"
            )));
        }
        Ok(())
    }
}

fn job_detail(
    state: &crate::state::ClusterState,
    job: &Job,
    allocations: Vec<pb::Allocation>,
) -> pb::GetJobResponse {
    let now = now_ms();
    pb::GetJobResponse {
        job: Some(convert::job_summary(&job.summary())),
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
        pending: job.pending.clone().unwrap_or_default(),
        rollouts: job
            .rollouts
            .iter()
            .rev()
            .map(|r| convert::rollout(state, job, r, now))
            .collect(),
        stable_version: job.stable_version.unwrap_or(0),
    }
}

/// The spec of an apply or plan request, size-checked and parsed.
fn parse_request_spec(req: &pb::ApplyJobRequest) -> Result<skiff_common::JobSpec, ApiError> {
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
    Ok(parse_job_spec(&req.spec, format)?)
}

fn applied_pb(outcome: Outcome) -> Result<pb::ApplyJobResponse, ApiError> {
    match outcome {
        Outcome::JobApplied {
            job,
            created,
            changed,
            changes,
        } => Ok(pb::ApplyJobResponse {
            job: Some(convert::job_summary(&job)),
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
                self.apply_spec(parse_request_spec(&req)?).await
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
                    .map(convert::allocation)
                    .collect();
                Ok(job_detail(&applied.state, job, allocs))
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
                        .map(|j| convert::job_summary(&j.summary()))
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
                        job: Some(convert::job_summary(&job)),
                        changed,
                    }),
                    other => Err(unexpected(other)),
                }
            })
            .await
    }

    async fn plan_job(
        &self,
        req: Request<pb::ApplyJobRequest>,
    ) -> Result<Response<pb::PlanJobResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("PlanJob", async {
                let spec = parse_request_spec(&req)?;
                let (ns, name) = (spec.namespace().to_owned(), spec.name.clone());
                self.ctx.read_barrier(None).await?;
                self.check_host_volumes(&spec)?;
                // Apply to a copy (O(1) with persistent maps) and plan that.
                let mut state = self.ctx.node.state().state.clone();
                let outcome = state.apply(&Command::ApplyJob {
                    spec: Box::new(spec),
                    at_ms: now_ms(),
                })?;
                let applied = applied_pb(outcome)?;
                let job = state
                    .job(&ns, &name)
                    .cloned()
                    .ok_or_else(|| ApiError::BadRequest("job vanished from the plan".into()))?;
                let mut view = reconcile::node_view(&state);
                let plan = reconcile::plan_job(
                    &state,
                    &mut view,
                    &job,
                    &mut reconcile::new_alloc_id,
                    now_ms(),
                    None,
                );
                let mut per_node: std::collections::BTreeMap<String, u32> = Default::default();
                for a in &plan.place {
                    *per_node.entry(a.node.clone()).or_default() += 1;
                }
                Ok(pb::PlanJobResponse {
                    job: applied.job,
                    changed: applied.changed,
                    changes: applied.changes,
                    placements: per_node
                        .into_iter()
                        .map(|(node, count)| pb::PlanPlacement { node, count })
                        .collect(),
                    stops: plan.stop,
                    unplaced: plan.unplaced,
                    pending: plan.pending.unwrap_or_default(),
                })
            })
            .await
    }

    async fn scale_job(
        &self,
        req: Request<pb::ScaleJobRequest>,
    ) -> Result<Response<pb::ApplyJobResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("ScaleJob", async {
                let ns = namespace_or_default(&req.namespace).to_owned();
                self.ctx.read_barrier(None).await?;
                let spec = {
                    let applied = self.ctx.node.state();
                    let job = applied.state.job(&ns, &req.name).ok_or_else(|| {
                        ApiError::Apply(crate::state::ApplyError::JobNotFound {
                            namespace: ns.clone(),
                            name: req.name.clone(),
                        })
                    })?;
                    let mut spec = job.latest().spec.clone();
                    spec.replicas = req.replicas;
                    spec
                };
                spec.validate()?;
                self.apply_spec(spec).await
            })
            .await
    }

    async fn list_allocations(
        &self,
        req: Request<pb::ListAllocationsRequest>,
    ) -> Result<Response<pb::ListAllocationsResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("ListAllocations", async {
                self.ctx.read_barrier(req.read.as_ref()).await?;
                let applied = self.ctx.node.state();
                let allocations = applied
                    .state
                    .allocations()
                    .filter(|a| req.namespace.is_empty() || a.namespace == req.namespace)
                    .filter(|a| req.job.is_empty() || a.job == req.job)
                    .filter(|a| req.all || a.desired == DesiredStatus::Run)
                    .map(convert::allocation)
                    .collect();
                Ok(pb::ListAllocationsResponse { allocations })
            })
            .await
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("ListEvents", async {
                let limit = match req.limit {
                    0 => 100,
                    n => n.min(crate::state::events::MAX_EVENTS as u32),
                } as usize;
                let wait = std::time::Duration::from_millis(req.wait_ms.min(60_000));
                self.ctx.read_barrier(req.read.as_ref()).await?;
                let deadline = tokio::time::Instant::now() + wait;
                let mut watch = self.ctx.node.applied_watch();
                loop {
                    let (events, last_seq) = {
                        let applied = self.ctx.node.state();
                        let state = &applied.state;
                        let matching = state
                            .events()
                            .rev()
                            .take_while(|e| e.seq > req.after)
                            .filter(|e| req.namespace.is_empty() || e.namespace == req.namespace)
                            .filter(|e| req.job.is_empty() || e.job == req.job)
                            .filter(|e| req.node.is_empty() || e.node == req.node);
                        // From the start: the newest `limit`; following (`after` set): the
                        // oldest `limit` after it, so that a follower pages forward.
                        let mut cut = false;
                        let mut v: Vec<&crate::state::events::Event> = if req.after == 0 {
                            matching.take(limit).collect()
                        } else {
                            let mut all: Vec<_> = matching.collect();
                            let skip = all.len().saturating_sub(limit);
                            cut = skip > 0;
                            all.drain(..skip);
                            all
                        };
                        v.reverse();
                        let v: Vec<pb::Event> = v
                            .into_iter()
                            .map(|e| pb::Event {
                                seq: e.seq,
                                at_ms: e.at_ms,
                                kind: e.kind.clone(),
                                namespace: e.namespace.clone(),
                                job: e.job.clone(),
                                allocation: e.alloc.clone(),
                                node: e.node.clone(),
                                message: e.message.clone(),
                            })
                            .collect();
                        // A page cut short ends at its last event: the follower asks
                        // again from there.
                        let last = match (cut, v.last()) {
                            (true, Some(e)) => e.seq,
                            _ => state.last_event(),
                        };
                        (v, last)
                    };
                    if !events.is_empty() || tokio::time::Instant::now() >= deadline {
                        return Ok(pb::ListEventsResponse { events, last_seq });
                    }
                    if tokio::time::timeout_at(deadline, watch.changed())
                        .await
                        .is_ok_and(|c| c.is_none())
                    {
                        return Err(ApiError::NotReady("this member is shutting down".into()));
                    }
                }
            })
            .await
    }

    async fn rollout(
        &self,
        req: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("Rollout", async {
                let ns = namespace_or_default(&req.namespace).to_owned();
                self.ctx.read_barrier(None).await?;
                let not_found = || {
                    ApiError::Apply(crate::state::ApplyError::JobNotFound {
                        namespace: ns.clone(),
                        name: req.name.clone(),
                    })
                };
                let (current, before) = {
                    let applied = self.ctx.node.state();
                    let job = applied.state.job(&ns, &req.name).ok_or_else(not_found)?;
                    (job.rollout().cloned(), job.rollout_before_current())
                };
                let action = pb::RolloutAction::try_from(req.action)
                    .map_err(|_| ApiError::BadRequest(format!("action: unknown value {}", req.action)))?;
                let none = || {
                    ApiError::BadRequest(format!(
                        "job {ns}/{} has no rollout (a rollout starts when a new version is applied)",
                        req.name
                    ))
                };
                let command = match action {
                    pb::RolloutAction::Unspecified => {
                        return Err(ApiError::BadRequest("action: missing".into()));
                    }
                    pb::RolloutAction::Undo => {
                        let to_version = if req.to_version != 0 {
                            req.to_version
                        } else {
                            before.ok_or_else(none)?
                        };
                        Command::RollbackJob {
                            namespace: ns.clone(),
                            name: req.name.clone(),
                            to_version,
                            reason: String::new(),
                            automatic: false,
                            at_ms: now_ms(),
                        }
                    }
                    pb::RolloutAction::Pause
                    | pb::RolloutAction::Resume
                    | pb::RolloutAction::Promote => {
                        let r = current.ok_or_else(none)?;
                        Command::Rollout {
                            namespace: ns.clone(),
                            name: req.name.clone(),
                            version: r.version,
                            change: match action {
                                pb::RolloutAction::Pause => RolloutChange::Pause,
                                pb::RolloutAction::Resume => RolloutChange::Resume,
                                _ => RolloutChange::Promote,
                            },
                            at_ms: now_ms(),
                        }
                    }
                };
                let (result, _) = self.ctx.node.write(command).await?;
                result?;
                let applied = self.ctx.node.state();
                let job = applied.state.job(&ns, &req.name).ok_or_else(not_found)?;
                Ok(pb::RolloutResponse {
                    rollout: job
                        .rollout()
                        .map(|r| convert::rollout(&applied.state, job, r, now_ms())),
                    job: Some(convert::job_summary(&job.summary())),
                })
            })
            .await
    }

    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let req = req.into_inner();
        self.ctx
            .track("ListServices", async {
                self.ctx.read_barrier(req.read.as_ref()).await?;
                let applied = self.ctx.node.state();
                let ns = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
                Ok(pb::ListServicesResponse {
                    services: super::services::services(&applied.state, ns),
                })
            })
            .await
    }
}
