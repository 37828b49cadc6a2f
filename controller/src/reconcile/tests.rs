use std::collections::BTreeMap;

use skiff_common::{SpecFormat, parse_job_spec};

use super::*;
use crate::state::{DesiredStatus, Node, NodeResources, RolloutStatus};

fn node(name: &str) -> Node {
    Node {
        resources: NodeResources {
            cpu: 4.0,
            memory: 4 << 30,
            pids: 10_000,
        },
        ..Node::for_test(name)
    }
}

fn spec(replicas: u32, image: &str) -> JobSpec {
    parse_job_spec(
        &format!("name = \"web\"\nimage = \"{image}\"\nreplicas = {replicas}\n"),
        SpecFormat::Toml,
    )
    .expect("spec")
}

struct World {
    state: ClusterState,
    next: u64,
    /// The clock, in milliseconds.
    now: i64,
    /// What the canary analysis says.
    verdict: Option<Verdict>,
}

impl World {
    fn new(nodes: &[&str]) -> World {
        let mut state = ClusterState::default();
        for n in nodes {
            state
                .apply(&Command::UpsertNode { node: node(n) })
                .expect("node");
        }
        World {
            state,
            next: 0,
            now: 2,
            verdict: None,
        }
    }

    fn apply(&mut self, spec: JobSpec) {
        self.state
            .apply(&Command::ApplyJob {
                spec: Box::new(spec),
                at_ms: 1,
            })
            .expect("job");
    }

    /// Plans and applies, as the loop would; returns the plan.
    fn reconcile(&mut self) -> JobPlan {
        let job = self.state.job("default", "web").expect("job").clone();
        let mut next = self.next;
        let plan = {
            let mut view = node_view(&self.state);
            let mut id = || {
                next += 1;
                format!("a{next:03}")
            };
            plan_job(
                &self.state,
                &mut view,
                &job,
                &mut id,
                self.now,
                self.verdict.as_ref(),
            )
        };
        self.next = next;
        if !plan.place.is_empty() {
            self.state
                .apply(&Command::PlaceAllocations {
                    allocations: plan.place.clone(),
                })
                .expect("place");
        }
        if !plan.drain.is_empty() {
            self.state
                .apply(&Command::DrainAllocations {
                    ids: plan.drain.clone(),
                    at_ms: self.now,
                })
                .expect("drain");
        }
        if !plan.stop.is_empty() {
            self.state
                .apply(&Command::StopAllocations {
                    ids: plan.stop.clone(),
                    lost: false,
                    at_ms: self.now,
                })
                .expect("stop");
        }
        if let Some((version, change)) = &plan.rollout {
            self.state
                .apply(&Command::Rollout {
                    namespace: "default".into(),
                    name: "web".into(),
                    version: *version,
                    change: change.clone(),
                    at_ms: self.now,
                })
                .expect("rollout");
        }
        if let Some((to_version, reason)) = &plan.rollback {
            self.state
                .apply(&Command::RollbackJob {
                    namespace: "default".into(),
                    name: "web".into(),
                    to_version: *to_version,
                    reason: reason.clone(),
                    automatic: true,
                    at_ms: self.now,
                })
                .expect("rollback");
        }
        plan
    }

    /// A user's change to the rollout of version 2.
    fn act(
        &mut self,
        change: RolloutChange,
    ) -> Result<crate::state::Outcome, crate::state::ApplyError> {
        self.state.apply(&Command::Rollout {
            namespace: "default".into(),
            name: "web".into(),
            version: 2,
            change,
            at_ms: self.now,
        })
    }

    /// Every live allocation reports running, healthy unless its version is `sick`.
    fn report(&mut self, sick: Option<u64>) {
        let reports = self
            .state
            .allocations()
            .filter(|a| holds(a))
            .map(|a| crate::state::AllocationReport {
                id: a.id.clone(),
                status: AllocationStatus::Running,
                restarts: 0,
                ip: Some("10.42.0.9".into()),
                health: Some(if sick == Some(a.job_version) {
                    crate::state::Health::Unhealthy
                } else {
                    crate::state::Health::Healthy
                }),
                health_output: if sick == Some(a.job_version) {
                    "HTTP 500".into()
                } else {
                    String::new()
                },
                log_dropped_bytes: 0,
                log_error: String::new(),
                containers: None,
                oom_kills: 0,
            })
            .collect();
        self.state
            .apply(&Command::ReportAllocations {
                reports,
                at_ms: self.now,
            })
            .expect("report");
    }

    fn job(&self) -> &Job {
        self.state.job("default", "web").expect("job")
    }

    /// Live allocations by version.
    fn versions(&self) -> BTreeMap<u64, usize> {
        let mut m = BTreeMap::new();
        for a in self.state.allocations().filter(|a| holds(a)) {
            *m.entry(a.job_version).or_insert(0) += 1;
        }
        m
    }

    fn running(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for a in self.state.allocations().filter(|a| holds(a)) {
            *m.entry(a.node.clone()).or_insert(0) += 1;
        }
        m
    }
}

#[test]
fn places_spreads_and_is_idempotent() {
    let mut w = World::new(&["n1", "n2", "n3"]);
    w.apply(spec(6, "img:1"));
    let plan = w.reconcile();
    assert_eq!(plan.place.len(), 6);
    assert_eq!(
        w.running(),
        BTreeMap::from([("n1".into(), 2), ("n2".into(), 2), ("n3".into(), 2)])
    );
    assert_eq!(w.reconcile(), JobPlan::default(), "nothing left to do");
}

#[test]
fn scales_down_from_the_most_loaded_nodes() {
    let mut w = World::new(&["n1", "n2", "n3"]);
    w.apply(spec(6, "img:1"));
    w.reconcile();
    w.apply(spec(9, "img:1"));
    w.reconcile();
    w.apply(spec(3, "img:1"));
    let plan = w.reconcile();
    assert_eq!((plan.place.len(), plan.stop.len()), (0, 6));
    assert_eq!(
        w.running(),
        BTreeMap::from([("n1".into(), 1), ("n2".into(), 1), ("n3".into(), 1)])
    );
}

#[test]
fn a_new_version_replaces_the_old_one() {
    // Without a service nothing needs draining: replaced replicas stop at once.
    let mut w = World::new(&["n1", "n2"]);
    w.apply(spec(2, "img:1"));
    w.reconcile();
    w.report(None);
    w.apply(spec(2, "img:2"));
    let mut steps = 0;
    while w.job().rollout().map(|r| r.status) == Some(RolloutStatus::Running) && steps < 50 {
        w.now += 1000;
        w.reconcile();
        w.report(None);
        steps += 1;
        assert!(w.state.allocations().filter(|a| holds(a)).count() <= 3);
    }
    assert_eq!(w.versions(), BTreeMap::from([(2, 2)]));
    assert_eq!(
        w.job().rollout().map(|r| r.status),
        Some(RolloutStatus::Succeeded)
    );
    assert_eq!(w.job().stable_version, Some(2));
}

/// A job with a checked service; `update` is the `[update]` section's body.
fn service_spec(replicas: u32, image: &str, update: &str) -> JobSpec {
    parse_job_spec(
        &format!(
            "name = \"web\"\nimage = \"{image}\"\nreplicas = {replicas}\n\
             [[ports]]\nname = \"http\"\nport = 80\n\
             [service]\nport = \"http\"\ncheck = {{ http = \"/\" }}\n\
             [update]\n{update}\n"
        ),
        SpecFormat::Toml,
    )
    .expect("spec")
}

/// Runs the loop a second at a time (every live allocation reporting, healthy unless of
/// version `sick`) until the rollout leaves `Running`/`Paused` or `limit` seconds pass;
/// checks the bounds at every step. Returns the seconds taken.
fn roll(
    w: &mut World,
    sick: Option<u64>,
    limit: usize,
    max_live: usize,
    min_healthy: usize,
) -> usize {
    for step in 0..limit {
        w.now += 1000;
        w.reconcile();
        w.report(sick);
        let live = w.state.allocations().filter(|a| holds(a)).count();
        assert!(
            live <= max_live,
            "step {step}: {live} running, at most {max_live}"
        );
        let serving = w
            .state
            .allocations()
            .filter(|a| holds(a) && a.drain_since_ms.is_none() && a.healthy_since_ms.is_some())
            .count();
        assert!(
            serving >= min_healthy,
            "step {step}: {serving} healthy in service, at least {min_healthy}"
        );
        if !w.job().rollout().is_some_and(|r| r.status.is_open()) {
            return step + 1;
        }
    }
    limit
}

#[test]
fn a_rollout_keeps_its_bounds_drains_first_and_succeeds() {
    let update = "max_surge = 2\nmin_healthy = \"3s\"\ndrain_delay = \"2s\"\n";
    let mut w = World::new(&["n1", "n2", "n3"]);
    w.apply(service_spec(6, "img:1", update));
    w.reconcile();
    w.report(None);
    w.now += 10_000;
    w.report(None);
    w.apply(service_spec(6, "img:2", update));
    let r = w.job().rollout().cloned().expect("a rollout");
    assert_eq!(
        (r.version, r.from_version, r.status),
        (2, 1, RolloutStatus::Running)
    );
    // At most 6 + 2 running (draining ones too), never fewer than 6 healthy in service.
    let secs = roll(&mut w, None, 120, 8, 6);
    assert_eq!(
        w.job().rollout().map(|r| r.status),
        Some(RolloutStatus::Succeeded)
    );
    // 3 waves of 2: each waits 3 s healthy; the floor is 9 s.
    assert!(secs >= 9, "{secs} s");
    // The last old replicas drain, then stop.
    for _ in 0..3 {
        w.now += 1000;
        w.reconcile();
    }
    assert_eq!(w.versions(), BTreeMap::from([(2, 6)]));
    // Every old replica was drained before it was stopped.
    assert!(
        w.state
            .allocations()
            .filter(|a| a.job_version == 1)
            .all(|a| a.desired == DesiredStatus::Stop && a.drain_since_ms.is_some())
    );
    // Scaling is not a rollout and replaces nothing.
    w.apply(service_spec(8, "img:2", update));
    assert_eq!(w.job().rollouts.len(), 1);
    let plan = w.reconcile();
    assert_eq!(
        (plan.place.len(), plan.drain.len(), plan.stop.len()),
        (2, 0, 0)
    );
}

#[test]
fn an_unhealthy_version_is_rolled_back_and_the_old_one_keeps_serving() {
    let update = "min_healthy = \"2s\"\nhealthy_deadline = \"10s\"\ndrain_delay = \"1s\"\n";
    let mut w = World::new(&["n1", "n2", "n3"]);
    w.apply(service_spec(3, "img:1", update));
    w.reconcile();
    w.report(None);
    w.now += 10_000;
    w.apply(service_spec(3, "img:2", update));
    // Version 2 never gets healthy: 3 old replicas serve the whole time.
    roll(&mut w, Some(2), 60, 4, 3);
    let job = w.job();
    assert_eq!(job.latest().version, 3, "the rollback is a new version");
    assert_eq!(job.latest().spec, job.version(1).expect("v1").spec);
    let failed = &job.rollouts[job.rollouts.len() - 2];
    assert_eq!(failed.status, RolloutStatus::Failed);
    assert!(
        failed
            .reason
            .contains("not healthy for 2s within healthy_deadline 10s: HTTP 500")
            && failed
                .reason
                .contains("rolled back to version 1 (as version 3)"),
        "{}",
        failed.reason
    );
    let back = job.rollout().expect("rollback");
    assert_eq!((back.version, back.rollback_of), (3, Some(2)));
    // The rollback replaces the one version-2 replica; the old replicas stay (same spec).
    roll(&mut w, Some(2), 60, 4, 3);
    assert_eq!(
        w.job().rollout().map(|r| r.status),
        Some(RolloutStatus::Succeeded)
    );
    for _ in 0..3 {
        w.now += 1000;
        w.reconcile();
    }
    assert_eq!(w.versions(), BTreeMap::from([(1, 3)]));
}

#[test]
fn canaries_wait_for_promotion_and_pause_holds_everything() {
    let update = "canary = 1\nmin_healthy = \"2s\"\ndrain_delay = \"1s\"\n";
    let mut w = World::new(&["n1", "n2", "n3"]);
    w.apply(service_spec(3, "img:1", update));
    w.reconcile();
    w.report(None);
    w.apply(service_spec(3, "img:2", update));
    for _ in 0..10 {
        w.now += 1000;
        w.reconcile();
        w.report(None);
    }
    // One canary next to all three old replicas, waiting.
    assert_eq!(w.versions(), BTreeMap::from([(1, 3), (2, 1)]));
    let r = w.job().rollout().cloned().expect("rollout");
    assert!(!r.promoted && r.status == RolloutStatus::Running);
    w.act(RolloutChange::Pause).expect("pause");
    w.act(RolloutChange::Promote).expect("promote while paused");
    for _ in 0..10 {
        w.now += 1000;
        let plan = w.reconcile();
        assert!(plan.place.is_empty() && plan.drain.is_empty(), "{plan:?}");
        w.report(None);
    }
    w.act(RolloutChange::Resume).expect("resume");
    roll(&mut w, None, 60, 4, 3);
    assert_eq!(
        w.job().rollout().map(|r| r.status),
        Some(RolloutStatus::Succeeded)
    );
    // A finished rollout cannot be paused.
    let e = w.act(RolloutChange::Pause).expect_err("finished");
    assert!(e.to_string().contains("it is succeeded"), "{e}");
}

#[test]
fn no_progress_fails_the_rollout_and_without_auto_rollback_it_stays_put() {
    // Nothing fits a surge replica: no progress; no rollback asked for.
    let update = "min_healthy = \"1s\"\nhealthy_deadline = \"5s\"\nprogress_deadline = \"5s\"\nauto_rollback = false\n";
    let mut w = World::new(&["n1"]);
    let mut v1 = service_spec(2, "img:1", update);
    v1.containers[0].resources.cpu = 2.0;
    w.apply(v1.clone());
    w.reconcile();
    w.report(None);
    let mut v2 = v1.clone();
    v2.containers[0].image = "img:2".into();
    w.apply(v2);
    roll(&mut w, None, 30, 2, 2);
    let r = w.job().rollout().cloned().expect("rollout");
    assert_eq!(r.status, RolloutStatus::Failed);
    assert!(
        r.reason.contains("no progress for progress_deadline 5s"),
        "{}",
        r.reason
    );
    assert_eq!(w.job().latest().version, 2, "no rollback");
    // Frozen: the old replicas keep running.
    w.now += 10_000;
    let plan = w.reconcile();
    assert!(plan.drain.is_empty() && plan.stop.is_empty());
    assert_eq!(w.versions(), BTreeMap::from([(1, 2)]));
}

#[test]
fn drain_moves_replicas_and_a_stopped_job_stops() {
    let mut w = World::new(&["n1", "n2", "n3"]);
    w.apply(spec(3, "img:1"));
    w.reconcile();
    w.state
        .apply(&Command::SetNodeStatus {
            name: "n2".into(),
            status: NodeStatus::Draining,
            at_ms: 5,
        })
        .expect("drain");
    let plan = w.reconcile();
    assert_eq!((plan.place.len(), plan.stop.len()), (1, 1));
    assert_eq!(
        w.running(),
        BTreeMap::from([("n1".into(), 2), ("n3".into(), 1)])
    );
    w.state
        .apply(&Command::StopJob {
            namespace: "default".into(),
            name: "web".into(),
            at_ms: 6,
        })
        .expect("stop");
    w.reconcile();
    assert!(w.running().is_empty());
}

#[test]
fn a_fenced_replica_on_a_down_node_is_replaced_only_once_lost() {
    let fenced = |stop_after: &str| {
        parse_job_spec(
            &format!(
                "name = \"web\"\nimage = \"img:1\"\nstop_grace = \"2s\"\n\
                 [disconnect]\nstop_after = \"{stop_after}\"\n"
            ),
            SpecFormat::Toml,
        )
        .expect("spec")
    };
    let mut w = World::new(&["n1", "n2"]);
    w.apply(fenced("5s"));
    w.reconcile();
    let first = w.state.allocations().next().expect("placed").clone();
    assert_eq!(
        fence_of(&w.state, &first),
        Some(Duration::from_secs(7)),
        "stop_after and the longest stop grace"
    );
    w.state
        .apply(&Command::SetNodeStatus {
            name: first.node.clone(),
            status: NodeStatus::Down,
            at_ms: 5,
        })
        .expect("down");
    let plan = w.reconcile();
    assert!(
        plan.place.is_empty() && plan.stop.is_empty(),
        "nothing moves while the replica may still run: {plan:?}"
    );
    w.state
        .apply(&Command::StopAllocations {
            ids: vec![first.id.clone()],
            lost: true,
            at_ms: 6,
        })
        .expect("lost");
    let plan = w.reconcile();
    assert_eq!(plan.place.len(), 1, "replaced once lost");
    assert_ne!(plan.place[0].node, first.node);

    // Without fencing, a replica on a down node is replaced at once (it may still run).
    let mut w = World::new(&["n1", "n2"]);
    w.apply(spec(1, "img:1"));
    w.reconcile();
    let first = w.state.allocations().next().expect("placed").clone();
    assert_eq!(fence_of(&w.state, &first), None);
    w.state
        .apply(&Command::SetNodeStatus {
            name: first.node.clone(),
            status: NodeStatus::Down,
            at_ms: 5,
        })
        .expect("down");
    assert_eq!(w.reconcile().place.len(), 1);
}

#[test]
fn a_node_is_fenced_after_its_last_heartbeat_and_a_former_leaders_lease() {
    let hb = Heartbeats::default();
    let stop = Duration::from_millis(300);
    let long_ago = Instant::now() - Duration::from_secs(60);
    // Never heard from, and this leader took over long ago: fenced at once.
    assert!(hb.begin_fence("n1", stop, long_ago));
    // Meanwhile its heartbeats go unanswered, and do not move its clock.
    assert!(!hb.beat_unless_fencing("n1"));
    assert!(hb.last("n1").is_none());
    hb.end_fence(&BTreeSet::from(["n1".to_owned()]));
    assert!(hb.beat_unless_fencing("n1"));
    // Just heard from: not until `stop` and the margin have passed.
    assert!(!hb.begin_fence("n1", stop, long_ago));
    assert!(
        hb.beat_unless_fencing("n1"),
        "a refused fence holds nothing up"
    );
    // A leader that just took over waits out a former leader's lease as well.
    assert!(!hb.begin_fence("n2", stop, Instant::now()));
    assert!(hb.begin_fence(
        "n2",
        stop,
        Instant::now() - LEADER_LEASE - stop - FENCE_MARGIN
    ));
}

#[test]
fn what_does_not_fit_stays_pending_with_the_reason() {
    let mut w = World::new(&["n1"]);
    let mut s = spec(3, "img:1");
    s.containers[0].resources.cpu = 1.5;
    w.apply(s);
    let plan = w.reconcile();
    assert_eq!((plan.place.len(), plan.unplaced), (2, 1));
    assert_eq!(
        plan.pending.as_deref(),
        Some("0/1 nodes fit: 1 insufficient cpu")
    );
    // A lost allocation's replacement goes elsewhere once a node is there.
    w.state
        .apply(&Command::UpsertNode { node: node("n2") })
        .expect("node");
    let plan = w.reconcile();
    assert_eq!((plan.place.len(), plan.unplaced), (1, 0));
    assert_eq!(plan.pending, None);
}

/// Version 1 on two nodes, version 2 (with a canary analysis) rolling: its healthy canary
/// waits for the analysis.
fn canary_under_analysis() -> World {
    let update = "canary = 1\nauto_promote = true\nmin_healthy = \"1s\"\ndrain_delay = \"1s\"\n";
    let mut w = World::new(&["n1", "n2"]);
    w.apply(service_spec(2, "img:1", update));
    w.reconcile();
    w.report(None);
    let mut v2 = service_spec(2, "img:2", update);
    // The analysis reads the sidecars' request counts: the mesh and an HTTP port.
    v2.mesh = Some(skiff_common::Mesh::default());
    v2.ports[0].protocol = skiff_common::Protocol::Http;
    v2.update = Some(skiff_common::UpdateStrategy {
        analysis: Some(skiff_common::Analysis {
            max_error_rate_increase: 1.0,
            max_p99_increase: std::time::Duration::from_millis(100),
            interval: std::time::Duration::from_secs(10),
            min_requests: 10,
        }),
        ..v2.update_strategy()
    });
    w.apply(v2);
    w.verdict = Some(Verdict::Waiting("analysis: 3s of 10s".into()));
    for _ in 0..5 {
        w.now += 1000;
        w.reconcile();
        w.report(None);
    }
    let r = w.job().rollout().cloned().expect("rollout");
    assert!(!r.promoted, "promoted before the analysis said so");
    assert_eq!(w.versions(), BTreeMap::from([(1, 2), (2, 1)]));
    w
}

#[test]
fn a_failed_canary_analysis_rolls_back_with_its_reason() {
    let mut w = canary_under_analysis();
    w.verdict = Some(Verdict::Failed(
        "canary error rate 40.0% against 0.0%".into(),
    ));
    w.now += 1000;
    let plan = w.reconcile();
    let (to, reason) = plan.rollback.expect("a rollback");
    assert_eq!(to, 1);
    assert!(reason.contains("canary error rate 40.0%"), "{reason}");
    let failed = &w.job().rollouts[0];
    assert_eq!(failed.status, RolloutStatus::Failed);
    assert!(
        failed.reason.starts_with("canary error rate 40.0%"),
        "{}",
        failed.reason
    );
}

#[test]
fn a_passed_canary_analysis_promotes() {
    let mut w = canary_under_analysis();
    w.verdict = Some(Verdict::Passed("fine".into()));
    w.now += 1000;
    let plan = w.reconcile();
    assert_eq!(plan.rollout, Some((2, RolloutChange::Promote)));
    w.verdict = None;
    roll(&mut w, None, 60, 3, 2);
    assert_eq!(
        w.job().rollout().map(|r| r.status),
        Some(RolloutStatus::Succeeded)
    );
}

#[test]
fn a_batch_job_rolls_out_with_replicas_that_ran_to_completion() {
    let mut w = World::new(&["n1", "n2"]);
    w.apply(spec(2, "img:1"));
    w.apply(spec(2, "img:2"));
    // Version 1 was replaced before it ran: version 2 rolls now.
    for _ in 0..30 {
        w.now += 1000;
        w.reconcile();
        let reports = w
            .state
            .allocations()
            .filter(|a| holds(a))
            .map(|a| crate::state::AllocationReport {
                id: a.id.clone(),
                status: AllocationStatus::Exited { code: 0 },
                restarts: 0,
                ip: None,
                health: None,
                health_output: String::new(),
                log_dropped_bytes: 0,
                log_error: String::new(),
                containers: None,
                oom_kills: 0,
            })
            .collect();
        w.state
            .apply(&Command::ReportAllocations {
                reports,
                at_ms: w.now,
            })
            .expect("report");
    }
    assert_eq!(
        w.job().rollout().map(|r| r.status),
        Some(RolloutStatus::Succeeded)
    );
    assert_eq!(w.versions(), BTreeMap::from([(2, 2)]));
}

#[test]
fn an_incremental_pass_plans_the_touched_the_time_bound_and_after_freed_resources_the_pending() {
    let mut w = World::new(&["n1"]);
    w.apply(spec(1, "127.0.0.1:5000/demo/web:1.0"));
    let mut db = spec(1, "127.0.0.1:5000/demo/db:1.0");
    db.name = "db".into();
    w.apply(db);
    w.state
        .apply(&Command::SetJobPending {
            namespace: "default".into(),
            name: "db".into(),
            pending: Some("does not fit".into()),
        })
        .expect("pending");
    let keys = |work: &Work, s: &ClusterState| work.keys(s).into_iter().collect::<Vec<_>>();

    let now = Instant::now();
    let every = Duration::from_secs(10);
    let mut work = Work::default();
    assert!(work.full(now, every), "the first pass plans everything");
    work.last_full = Some(now);
    assert!(!work.full(now, every));
    assert!(work.full(now + every, every), "the safety net's turn");

    assert!(
        keys(&work, &w.state).is_empty(),
        "nothing touched, nothing to plan"
    );
    let mut touched = Touched::default();
    touched.jobs.insert("default/web".into());
    work.add(touched);
    assert_eq!(keys(&work, &w.state), ["default/web"]);
    work.active.insert("default/rolling".into());
    assert_eq!(keys(&work, &w.state), ["default/rolling", "default/web"]);
    work.add(Touched {
        capacity: true,
        ..Touched::default()
    });
    assert_eq!(
        keys(&work, &w.state),
        ["default/db", "default/rolling", "default/web"],
        "freed resources: the pending job may fit now"
    );
    // A reason held back, not yet written, counts as pending too.
    let web = w.state.job("default", "web").expect("web").clone();
    work.defer_pending(&web, Some("0/1 nodes fit".into()), now);
    work.touched = Touched {
        capacity: true,
        ..Touched::default()
    };
    work.active.clear();
    assert_eq!(
        keys(&work, &w.state),
        ["default/db", "default/web"],
        "a reason not yet written: the job may fit now"
    );
    work.defer_pending(&web, None, now);
    assert_eq!(
        keys(&work, &w.state),
        ["default/db"],
        "a job held back as placeable is not pending"
    );
    work.everything();
    assert!(work.full(now, every));

    // Settled: planned again only when touched. Draining: planned at every pass.
    w.reconcile();
    let job = w.job().clone();
    let settled = JobPlan::default();
    assert!(!time_bound(&w.state, &job, &settled));
    let id = w
        .state
        .job_allocations("default", "web")
        .next()
        .expect("alloc")
        .id
        .clone();
    w.state
        .apply(&Command::DrainAllocations {
            ids: vec![id],
            at_ms: w.now,
        })
        .expect("drain");
    assert!(
        time_bound(&w.state, &job, &settled),
        "a replica is draining"
    );
}

#[test]
fn changed_pending_reasons_wait_together_and_the_latest_plan_wins() {
    let mut w = World::new(&["n1"]);
    w.apply(spec(1, "127.0.0.1:5000/demo/web:1.0"));
    let mut db = spec(1, "127.0.0.1:5000/demo/db:1.0");
    db.name = "db".into();
    w.apply(db);
    let web = w.state.job("default", "web").expect("web").clone();
    let db = w.state.job("default", "db").expect("db").clone();
    let mut work = Work::default();
    let t0 = Instant::now();
    assert_eq!(work.pending_due(), None);
    work.defer_pending(&web, Some("0/1 nodes fit".into()), t0);
    work.defer_pending(
        &db,
        Some("0/1 nodes fit".into()),
        t0 + Duration::from_millis(50),
    );
    assert_eq!(
        work.pending_due(),
        Some(t0 + PENDING_DELAY),
        "the oldest sets the time"
    );
    work.defer_pending(&web, Some("1 node disk pressure".into()), t0);
    work.settle_pending("default/db");
    assert!(
        work.take_due_pending(t0 + PENDING_DELAY / 2).is_empty(),
        "not due yet"
    );
    assert_eq!(
        work.take_due_pending(t0 + PENDING_DELAY),
        [(
            "default".to_owned(),
            "web".to_owned(),
            Some("1 node disk pressure".to_owned())
        )]
    );
    assert_eq!(work.pending_due(), None);
    work.defer_pending(&db, None, t0);
    work.settle_pending("default/db");
    assert_eq!(work.pending_due(), None, "nothing held back");
    // A whole batch held back is written at once, without waiting for the delay.
    for i in 0..PENDING_BATCH {
        let mut j = Job::clone(&web);
        j.name = format!("j{i}");
        work.defer_pending(&j, Some("0/1 nodes fit".into()), t0);
        let want = if i + 1 < PENDING_BATCH {
            t0 + PENDING_DELAY
        } else {
            t0
        };
        assert_eq!(work.pending_due(), Some(want), "{} held back", i + 1);
    }
    assert_eq!(work.take_due_pending(t0).len(), PENDING_BATCH);
    assert_eq!(work.pending_due(), None);
}

#[test]
fn garbage_is_what_is_over_past_retention_and_versions_beyond_those_kept() {
    let mut w = World::new(&["n1"]);
    for replicas in 1..=5 {
        w.apply(spec(replicas, "127.0.0.1:5000/demo/web:1.0"));
    }
    w.state
        .apply(&Command::PlaceAllocations {
            allocations: vec![
                Allocation::new_pending("a", "default", "web", 1, "n1", 10),
                Allocation::new_pending("b", "default", "web", 2, "n1", 10),
                Allocation::new_pending("c", "default", "web", 5, "n1", 10),
            ],
        })
        .expect("place");
    w.state
        .apply(&Command::ReportAllocation {
            id: "a".into(),
            status: AllocationStatus::Exited { code: 0 },
            at_ms: 1_000,
        })
        .expect("report");
    w.state
        .apply(&Command::ReportAllocation {
            id: "b".into(),
            status: AllocationStatus::Exited { code: 0 },
            at_ms: 5_000,
        })
        .expect("report");
    w.state
        .apply(&Command::StopAllocations {
            ids: vec!["a".into(), "b".into()],
            lost: false,
            at_ms: 5_000,
        })
        .expect("stop");
    let settings = ReconcileSettings {
        gc_after: Duration::from_secs(2),
        keep_versions: 2,
        ..ReconcileSettings::default()
    };
    // At 5 s only "a" (over since 1 s) is past 2 s; of the versions beyond the 2 kept (1-3),
    // 2 still has "b": 1 and 3 go.
    let Some(Command::CollectGarbage {
        allocations,
        versions,
        ..
    }) = garbage(&w.state, &settings, 5_000)
    else {
        panic!("garbage expected")
    };
    assert_eq!(allocations, ["a"]);
    assert_eq!(versions[0].versions, [1, 3]);
    let Some(Command::CollectGarbage {
        allocations,
        versions,
        ..
    }) = garbage(&w.state, &settings, 7_100)
    else {
        panic!("garbage expected")
    };
    assert_eq!(allocations, ["a", "b"], "both over for 2 s");
    assert_eq!(versions.len(), 1);
    assert_eq!(
        versions[0].versions,
        [1, 2, 3],
        "their versions go with them"
    );
    let mut keep_all = settings;
    keep_all.keep_versions = 10;
    keep_all.gc_after = Duration::from_secs(3600);
    assert!(garbage(&w.state, &keep_all, 7_100).is_none());
}
