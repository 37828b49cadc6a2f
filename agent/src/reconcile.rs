//! The node's reconciler: makes the containers on this host match the allocations the
//! controllers assigned to it, and reports what it sees. It talks to the container runtime only
//! through [`Containers`], so every decision here is unit-tested with a fake (as youki tests
//! against its `Syscall` trait).
//!
//! A container is ours when it carries the [`ALLOC_LABEL`] label we set when starting it;
//! containers started by hand are left alone, whatever their names. Containers outlive the
//! agent: a restarted agent finds them by label and adopts them instead of starting them again.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use skiff_proto::v1 as pb;
use skiff_runtime::store::{State, Status};
use tracing::{info, warn};

use crate::contract::{self, Assigned, Check, Task};
use crate::health::{Checker, Probe};
use crate::policy::Policy;
use skiff_runtime::devices::DeviceNode;

/// The label that marks a container as the one this agent runs for an allocation; its value is
/// the allocation id.
pub const ALLOC_LABEL: &str = "skiff.alloc";

/// How long a failed start waits before it is tried again.
pub const START_RETRY: Duration = Duration::from_secs(5);

/// A container of ours as the runtime last saw it.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The container's id.
    pub id: String,
    /// The allocation it runs (its [`ALLOC_LABEL`]).
    pub alloc: String,
    pub state: State,
    pub stop_grace: Duration,
}

/// What the reconciler needs from the container runtime.
pub trait Containers: Send + Sync {
    /// The containers this agent runs for allocations.
    fn list(&self) -> Result<Vec<Observed>, String>;
    /// Starts the container of `alloc` (detached; its image pulled if missing), labelled with
    /// [`ALLOC_LABEL`], with the host devices the node's policy granted; returns its id.
    fn start(
        &self,
        alloc: &Assigned,
        task: &Task,
        devices: &[DeviceNode],
        dns: Option<Ipv4Addr>,
    ) -> Result<String, String>;
    /// Stops a container: its stop signal, then SIGKILL after `grace`.
    fn stop(&self, id: &str, grace: Duration) -> Result<State, String>;
    /// Removes a stopped container and what it holds (its address, its files).
    fn remove(&self, id: &str) -> Result<(), String>;
    /// The container's pod address.
    fn address(&self, id: &str) -> Option<IpAddr>;
    /// The probe that runs `check` against the container.
    fn probe(&self, id: &str, check: &Check) -> Probe;
}

/// Remembered start failures, so a failing start is retried every [`START_RETRY`], not at
/// every pass.
#[derive(Default)]
pub struct Failures(Mutex<HashMap<String, (Instant, String)>>);

/// One pass: start what is assigned and missing, stop and remove what is ours and no longer
/// assigned; returns the reports of every assigned allocation (and the last state of those
/// just stopped).
pub fn reconcile_once(
    rt: &dyn Containers,
    want: &[Assigned],
    failures: &Failures,
    policy: &Policy,
    dns: Option<Ipv4Addr>,
) -> Vec<pb::AllocationReport> {
    let existing = match rt.list() {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot list containers");
            return Vec::new();
        }
    };
    let by_alloc: HashMap<&str, &Observed> =
        existing.iter().map(|o| (o.alloc.as_str(), o)).collect();
    let wanted: HashMap<&str, &Assigned> = want.iter().map(|a| (a.id.as_str(), a)).collect();

    // Stop and remove what is no longer assigned, all at once (each may wait out its grace
    // period); their last state is reported once more.
    let stopped: Mutex<Vec<pb::AllocationReport>> = Mutex::default();
    let stopped_ref = &stopped;
    std::thread::scope(|scope| {
        for o in existing
            .iter()
            .filter(|o| !wanted.contains_key(o.alloc.as_str()))
        {
            scope.spawn(move || {
                info!(alloc = %o.alloc, "stopping: no longer assigned");
                let last = if matches!(
                    o.state.status,
                    Status::Running | Status::Restarting | Status::Created
                ) {
                    rt.stop(&o.id, o.stop_grace).unwrap_or_else(|e| {
                        warn!(alloc = %o.alloc, error = %e, "stop failed");
                        o.state.clone()
                    })
                } else {
                    o.state.clone()
                };
                stopped_ref
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(contract::report(&o.alloc, &last));
                if let Err(e) = rt.remove(&o.id) {
                    warn!(alloc = %o.alloc, error = %e, "remove failed");
                }
            });
        }
    });

    let mut failures = failures
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    failures.retain(|id, _| wanted.contains_key(id.as_str()));
    let mut out = stopped
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for a in want {
        if let Some(o) = by_alloc.get(a.id.as_str()) {
            let mut r = contract::report(&a.id, &o.state);
            r.ip = rt
                .address(&o.id)
                .map(|ip| ip.to_string())
                .unwrap_or_default();
            out.push(r);
            continue;
        }
        let task = match &a.task {
            Ok(t) => t,
            Err(why) => {
                out.push(contract::failed(&a.id, why));
                continue;
            }
        };
        if let Some((at, reason)) = failures.get(&a.id)
            && at.elapsed() < START_RETRY
        {
            out.push(contract::failed(&a.id, reason));
            continue;
        }
        let started = policy
            .admit(task)
            .and_then(|devices| rt.start(a, task, &devices, dns));
        match started {
            Ok(container) => {
                failures.remove(&a.id);
                info!(alloc = %a.id, container = %container, image = %task.container.image, "started");
                out.push(pb::AllocationReport {
                    id: a.id.clone(),
                    state: pb::AllocationState::Running as i32,
                    ip: rt
                        .address(&container)
                        .map(|ip| ip.to_string())
                        .unwrap_or_default(),
                    ..Default::default()
                });
            }
            Err(reason) => {
                warn!(alloc = %a.id, job = %format!("{}/{}", a.namespace, a.job), error = %reason, "start failed");
                out.push(contract::failed(&a.id, &reason));
                failures.insert(a.id.clone(), (Instant::now(), reason));
            }
        }
    }
    out
}

/// Keeps one health check per running allocation whose task has one, and puts each verdict in
/// its allocation's report.
pub fn health_checks(
    rt: &dyn Containers,
    want: &[Assigned],
    checker: &Checker,
    reports: &mut [pb::AllocationReport],
) {
    let running: HashMap<String, String> = rt
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.state.status == Status::Running)
        .map(|o| (o.alloc, o.id))
        .collect();
    let mut checks = HashMap::new();
    for a in want {
        let Some(check) = a.task.as_ref().ok().and_then(|t| t.check.clone()) else {
            continue;
        };
        let Some(container) = running.get(&a.id) else {
            continue;
        };
        let probe = rt.probe(container, &check);
        checks.insert(a.id.clone(), (check, probe));
    }
    checker.set(checks);
    for r in reports.iter_mut() {
        if r.state != pb::AllocationState::Running as i32 {
            continue;
        }
        if let Some(v) = checker.verdict(&r.id) {
            r.health = contract::health(v.health) as i32;
            r.health_output = v.output;
        }
    }
}

/// The real runtime behind the reconciler.
impl Containers for skiff_runtime::container::Runtime {
    fn list(&self) -> Result<Vec<Observed>, String> {
        let list = self.store().list().map_err(|e| e.to_string())?;
        Ok(list
            .into_iter()
            .filter_map(|(c, state)| {
                let alloc = c.labels.get(ALLOC_LABEL)?.clone();
                Some(Observed {
                    id: c.id,
                    alloc,
                    state,
                    stop_grace: Duration::from_millis(c.stop_grace_ms),
                })
            })
            .collect())
    }

    fn start(
        &self,
        alloc: &Assigned,
        task: &Task,
        devices: &[DeviceNode],
        dns: Option<Ipv4Addr>,
    ) -> Result<String, String> {
        let c = &task.container;
        let opts = skiff_runtime::container::RunOptions {
            image: c.image.clone(),
            name: Some(alloc.id.clone()),
            cmd: c.args.clone(),
            entrypoint: c.entrypoint.clone(),
            env: c.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            hostname: None,
            user: None,
            cwd: None,
            limits: c.limits.clone(),
            restart: c.restart,
            stop_signal: Some(c.stop_signal),
            stop_grace: Some(c.stop_grace),
            pull: skiff_runtime::image::PullPolicy::Missing,
            resolv_conf: dns.map(|server| crate::dns::resolv_conf(server, &alloc.namespace)),
            labels: [(ALLOC_LABEL.to_owned(), alloc.id.clone())].into(),
            devices: devices.to_vec(),
        };
        let (id, mut monitor) = self.run(&opts).map_err(|e| e.to_string())?;
        // The monitor is our child until we exit: reap it when it ends.
        std::thread::spawn(move || {
            let _ = monitor.wait();
        });
        Ok(id)
    }

    fn stop(&self, id: &str, grace: Duration) -> Result<State, String> {
        skiff_runtime::container::Runtime::stop(self, id, grace).map_err(|e| e.to_string())
    }

    fn remove(&self, id: &str) -> Result<(), String> {
        skiff_runtime::container::Runtime::remove(self, id, true).map_err(|e| e.to_string())
    }

    fn address(&self, id: &str) -> Option<IpAddr> {
        skiff_runtime::container::Runtime::address(self, id)
    }

    fn probe(&self, id: &str, check: &Check) -> Probe {
        Probe::new(check, self.data_dir(), id, self.address(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ContainerTask;

    /// A runtime in memory: records what the reconciler asks of it.
    #[derive(Default)]
    struct Fake {
        containers: Mutex<Vec<Observed>>,
        started: Mutex<Vec<String>>,
        stopped: Mutex<Vec<String>>,
        removed: Mutex<Vec<String>>,
        fail_start: Mutex<Option<String>>,
    }

    impl Fake {
        fn with(containers: Vec<Observed>) -> Fake {
            Fake {
                containers: Mutex::new(containers),
                ..Fake::default()
            }
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    impl Containers for Fake {
        fn list(&self) -> Result<Vec<Observed>, String> {
            Ok(lock(&self.containers).clone())
        }
        fn start(
            &self,
            alloc: &Assigned,
            _: &Task,
            _: &[DeviceNode],
            _: Option<Ipv4Addr>,
        ) -> Result<String, String> {
            if let Some(e) = lock(&self.fail_start).clone() {
                return Err(e);
            }
            let id = format!("c-{}", alloc.id);
            lock(&self.started).push(alloc.id.clone());
            let mut state = State::created();
            state.status = Status::Running;
            lock(&self.containers).push(Observed {
                id: id.clone(),
                alloc: alloc.id.clone(),
                state,
                stop_grace: Duration::from_secs(1),
            });
            Ok(id)
        }
        fn stop(&self, id: &str, _: Duration) -> Result<State, String> {
            lock(&self.stopped).push(id.to_owned());
            let mut s = State::created();
            s.status = Status::Exited;
            s.exit = Some(skiff_runtime::store::ExitInfo {
                code: Some(0),
                signal: None,
                oom_killed: false,
                at_ms: 0,
            });
            Ok(s)
        }
        fn remove(&self, id: &str) -> Result<(), String> {
            lock(&self.removed).push(id.to_owned());
            lock(&self.containers).retain(|c| c.id != id);
            Ok(())
        }
        fn address(&self, id: &str) -> Option<IpAddr> {
            id.starts_with("c-")
                .then_some(IpAddr::V4(Ipv4Addr::new(10, 42, 0, 2)))
        }
        fn probe(&self, id: &str, check: &Check) -> Probe {
            let crate::contract::CheckKind::Exec { command } = &check.kind else {
                panic!("the tests use exec checks");
            };
            Probe::Exec {
                data_dir: "/nonexistent".into(),
                container: id.to_owned(),
                command: command.clone(),
            }
        }
    }

    fn task() -> Task {
        Task {
            container: ContainerTask {
                image: "127.0.0.1:5000/web:1".into(),
                entrypoint: None,
                args: vec![],
                env: Default::default(),
                restart: skiff_runtime::store::RestartPolicy::OnFailure,
                stop_signal: 15,
                stop_grace: Duration::from_secs(1),
                limits: Default::default(),
                devices: vec![],
            },
            check: None,
        }
    }

    fn assigned(id: &str) -> Assigned {
        Assigned {
            id: id.into(),
            namespace: "default".into(),
            job: "web".into(),
            version: 1,
            task: Ok(task()),
        }
    }

    fn running(id: &str, alloc: &str) -> Observed {
        let mut state = State::created();
        state.status = Status::Running;
        Observed {
            id: id.into(),
            alloc: alloc.into(),
            state,
            stop_grace: Duration::from_secs(1),
        }
    }

    #[test]
    fn starts_what_is_missing_and_adopts_what_runs() {
        let rt = Fake::with(vec![running("c-a1", "a1")]);
        let reports = reconcile_once(
            &rt,
            &[assigned("a1"), assigned("a2")],
            &Failures::default(),
            &Policy::default(),
            None,
        );
        assert_eq!(*lock(&rt.started), ["a2"], "a1 adopted, not restarted");
        assert!(lock(&rt.stopped).is_empty());
        assert_eq!(reports.len(), 2);
        for r in &reports {
            assert_eq!(r.state, pb::AllocationState::Running as i32, "{r:?}");
            assert_eq!(r.ip, "10.42.0.2");
        }
    }

    #[test]
    fn stops_and_removes_what_is_no_longer_assigned_and_reports_it_once_more() {
        let rt = Fake::with(vec![running("c-a1", "a1"), running("c-old", "old")]);
        let reports = reconcile_once(
            &rt,
            &[assigned("a1")],
            &Failures::default(),
            &Policy::default(),
            None,
        );
        assert_eq!(*lock(&rt.stopped), ["c-old"]);
        assert_eq!(*lock(&rt.removed), ["c-old"]);
        let old = reports
            .iter()
            .find(|r| r.id == "old")
            .expect("old reported");
        assert_eq!(old.state, pb::AllocationState::Exited as i32);
        // An empty assignment stops everything of ours.
        reconcile_once(&rt, &[], &Failures::default(), &Policy::default(), None);
        assert!(lock(&rt.containers).is_empty());
    }

    #[test]
    fn what_the_node_policy_refuses_is_reported_and_never_started() {
        let rt = Fake::default();
        let mut local = assigned("a1");
        if let Ok(t) = &mut local.task {
            t.container.image = "oci:/etc".into();
        }
        let mut device = assigned("a2");
        if let Ok(t) = &mut device.task {
            t.container.devices = vec![("/dev/fuse".into(), 6)];
        }
        let reports = reconcile_once(
            &rt,
            &[local, device],
            &Failures::default(),
            &Policy::default(),
            None,
        );
        assert!(lock(&rt.started).is_empty());
        for r in &reports {
            assert_eq!(r.state, pb::AllocationState::Failed as i32, "{r:?}");
        }
        assert!(
            reports[0].reason.contains("--local-image-dir"),
            "{reports:?}"
        );
        assert!(
            reports[1]
                .reason
                .contains("device /dev/fuse is not allowed"),
            "{reports:?}"
        );
    }

    #[test]
    fn a_failed_start_is_reported_and_retried_only_after_a_pause() {
        let rt = Fake::default();
        *lock(&rt.fail_start) = Some("pulling 127.0.0.1:5000/web:1: no such directory".into());
        let failures = Failures::default();
        for _ in 0..3 {
            let reports =
                reconcile_once(&rt, &[assigned("a1")], &failures, &Policy::default(), None);
            assert_eq!(reports[0].state, pb::AllocationState::Failed as i32);
            assert!(reports[0].reason.contains("no such directory"));
        }
        *lock(&rt.fail_start) = None;
        reconcile_once(&rt, &[assigned("a1")], &failures, &Policy::default(), None);
        assert!(lock(&rt.started).is_empty(), "retried before START_RETRY");
    }

    #[test]
    fn a_task_this_agent_cannot_run_is_reported_failed() {
        let rt = Fake::default();
        let mut a = assigned("a1");
        a.task = Err("this agent runs exactly one container per allocation; upgrade it".into());
        let reports = reconcile_once(&rt, &[a], &Failures::default(), &Policy::default(), None);
        assert_eq!(reports[0].state, pb::AllocationState::Failed as i32);
        assert!(reports[0].reason.contains("upgrade it"));
        assert!(lock(&rt.started).is_empty());
    }

    #[test]
    fn checked_allocations_report_starting_until_a_verdict() {
        let rt = Fake::with(vec![running("c-a1", "a1")]);
        let mut a = assigned("a1");
        if let Ok(t) = &mut a.task {
            t.check = Some(Check {
                kind: crate::contract::CheckKind::Exec {
                    command: vec!["true".into()],
                },
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                healthy_threshold: 1,
                unhealthy_threshold: 1,
            });
        }
        let want = [a, assigned("a2")];
        let mut reports =
            reconcile_once(&rt, &want, &Failures::default(), &Policy::default(), None);
        let checker = Checker::default();
        health_checks(&rt, &want, &checker, &mut reports);
        let health = |id: &str| reports.iter().find(|r| r.id == id).map(|r| r.health);
        assert_eq!(health("a1"), Some(pb::Health::Starting as i32));
        assert_eq!(health("a2"), Some(pb::Health::Unspecified as i32));
    }
}
