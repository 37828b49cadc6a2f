//! The node's reconciler: makes the containers on this host match the allocations the
//! controllers assigned to it, and reports what it sees. It talks to the container runtime only
//! through [`Containers`], so every decision here is unit-tested with a fake (as youki tests
//! against its `Syscall` trait).
//!
//! An allocation is a pod (its network and IPC namespaces, its volumes, its host ports) and
//! the containers of its task, started in lifecycle order: init containers one after another,
//! each to successful completion, then the sidecars, then the main containers. A failed init
//! container (after its restart policy) fails the allocation and nothing else starts; once every
//! main container has ended for good, the sidecars are stopped. An allocation that is no longer
//! assigned stops main containers first, then sidecars, then its pod goes.
//!
//! A container is ours when it carries the [`ALLOC_LABEL`] label we set when starting it (and
//! [`CONTAINER_LABEL`], its name in the allocation); containers started by hand are left
//! alone, whatever their names. Containers and pods outlive the agent: a restarted agent
//! finds them by label and adopts them instead of starting them again.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use skiff_proto::v1 as pb;
use skiff_runtime::store::{State, Status};
use tracing::{info, warn};

use crate::contract::{self, Assigned, Check, ContainerTask, Lifecycle, Task};
use crate::health::{Checker, Probe};
use crate::policy::Policy;
use skiff_runtime::devices::DeviceNode;

/// The label that marks a container as one this agent runs for an allocation; its value is
/// the allocation id.
pub const ALLOC_LABEL: &str = "skiff.alloc";

/// The label holding a container's name within its allocation.
pub const CONTAINER_LABEL: &str = "skiff.container";

/// The label holding a container's lifecycle (`init`, `sidecar`, `main`), so an allocation
/// whose task is gone still stops in order.
pub const LIFECYCLE_LABEL: &str = "skiff.lifecycle";

/// How long a failed start waits before it is tried again.
pub const START_RETRY: Duration = Duration::from_secs(5);

/// How many of a failed init container's last output lines its allocation's report carries.
const INIT_TAIL_LINES: usize = 5;

/// A container of ours as the runtime last saw it.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The container's id.
    pub id: String,
    /// The allocation it runs (its [`ALLOC_LABEL`]).
    pub alloc: String,
    /// Its name in the allocation ([`CONTAINER_LABEL`]); empty for a container started by an
    /// agent from before groups.
    pub name: String,
    /// Its [`LIFECYCLE_LABEL`]; main when absent.
    pub lifecycle: Lifecycle,
    pub state: State,
    pub stop_grace: Duration,
}

impl Observed {
    fn live(&self) -> bool {
        matches!(
            self.state.status,
            Status::Running | Status::Restarting | Status::Created
        )
    }
}

/// What the reconciler needs from the container runtime.
pub trait Containers: Send + Sync {
    /// The containers this agent runs for allocations.
    fn list(&self) -> Result<Vec<Observed>, String>;
    /// The allocations that have a pod on this node.
    fn pods(&self) -> Vec<String>;
    /// Makes the allocation's pod (namespaces, address, volumes, host ports); idempotent.
    fn create_pod(&self, alloc: &Assigned, task: &Task) -> Result<(), String>;
    /// Takes the allocation's pod apart; idempotent.
    fn remove_pod(&self, alloc: &str);
    /// Makes sure the allocation's mesh sidecar runs while its containers do (restarted if
    /// it died); nothing for a job outside the mesh or an allocation without a pod.
    fn ensure_sidecar(&self, _alloc: &Assigned, _task: &Task) -> Result<(), String> {
        Ok(())
    }
    /// Stops the allocation's mesh sidecar (its containers have all ended for good).
    fn stop_sidecar(&self, _alloc: &str) {}
    /// Starts one container of `alloc` in its pod (detached; its image pulled if missing),
    /// labelled with [`ALLOC_LABEL`] and [`CONTAINER_LABEL`], with the host devices the
    /// node's policy granted; returns its id.
    fn start(
        &self,
        alloc: &Assigned,
        task: &Task,
        container: &ContainerTask,
        devices: &[DeviceNode],
        dns: Option<Ipv4Addr>,
    ) -> Result<String, String>;
    /// Stops a container: its stop signal, then SIGKILL after `grace`; waits for its end.
    fn stop(&self, id: &str, grace: Duration) -> Result<State, String>;
    /// As `stop`, without waiting (asking again while it stops changes nothing).
    fn request_stop(&self, id: &str, grace: Duration) -> Result<(), String>;
    /// Removes a stopped container and what it holds.
    fn remove(&self, id: &str) -> Result<(), String>;
    /// The allocation's address: its pod's, or (a container from before groups) the
    /// container's own.
    fn address(&self, alloc: &str, container: &str) -> Option<IpAddr>;
    /// The probe that runs `check` against the allocation (`container`: its main container).
    fn probe(&self, alloc: &str, container: &str, check: &Check) -> Probe;
    /// The last `lines` lines a container wrote.
    fn tail(&self, id: &str, lines: usize) -> String;
    /// Processes of the container the OOM killer killed (its cgroup's counter; 0 unknown).
    fn oom_kills(&self, _id: &str) -> u64 {
        0
    }
}

/// Remembered start failures, so a failing start is retried every [`START_RETRY`], not at
/// every pass.
#[derive(Default)]
pub struct Failures(Mutex<HashMap<String, (Instant, String)>>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why an assigned allocation may not start now (fencing, [`crate::fence`]); `None`: it may.
pub type Gate<'a> = &'a (dyn Fn(&Assigned) -> Option<String> + Sync);

/// A gate that lets everything start.
pub fn open_gate(_: &Assigned) -> Option<String> {
    None
}

/// One pass: start what is assigned and missing (in lifecycle order), stop sidecars whose
/// main containers are done, stop and remove what is ours and no longer assigned; returns
/// the reports of every assigned allocation (and the last state of those just stopped).
/// Nothing of an allocation the `gate` refuses starts: what runs of it keeps running (its
/// monitors stop it if the node's lease runs out), and it is reported pending with the
/// gate's reason when nothing of it runs.
pub fn reconcile_once(
    rt: &dyn Containers,
    want: &[Assigned],
    failures: &Failures,
    policy: &Policy,
    dns: Option<Ipv4Addr>,
    gate: Gate<'_>,
) -> Vec<pb::AllocationReport> {
    let existing = match rt.list() {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot list containers");
            return Vec::new();
        }
    };
    let mut by_alloc: HashMap<&str, Vec<&Observed>> = HashMap::new();
    for o in &existing {
        by_alloc.entry(o.alloc.as_str()).or_default().push(o);
    }
    let wanted: HashMap<&str, &Assigned> = want.iter().map(|a| (a.id.as_str(), a)).collect();

    // Stop and remove what is no longer assigned, every allocation at once (each may wait
    // out grace periods): main containers first, then sidecars, then the pod. Their last
    // state is reported once more.
    let stopped: Mutex<Vec<pb::AllocationReport>> = Mutex::default();
    let mut gone: Vec<&str> = by_alloc
        .keys()
        .copied()
        .filter(|a| !wanted.contains_key(a))
        .collect();
    let pods = rt.pods();
    for p in &pods {
        if !wanted.contains_key(p.as_str()) && !gone.contains(&p.as_str()) {
            gone.push(p.as_str());
        }
    }
    std::thread::scope(|scope| {
        for alloc in &gone {
            let containers = by_alloc.get(alloc).cloned().unwrap_or_default();
            let stopped = &stopped;
            scope.spawn(move || {
                info!(alloc = %alloc, "stopping: no longer assigned");
                let last = stop_allocation(rt, &containers);
                if let Some(report) = last.map(|s| contract::report(alloc, &s)) {
                    lock(stopped).push(report);
                }
                for o in &containers {
                    if let Err(e) = rt.remove(&o.id) {
                        warn!(alloc = %o.alloc, container = %o.name, error = %e, "remove failed");
                    }
                }
                rt.remove_pod(alloc);
            });
        }
    });

    let mut failures = lock(&failures.0);
    failures.retain(|id, _| wanted.contains_key(id.as_str()));
    let mut out = stopped
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for a in want {
        let observed = by_alloc.get(a.id.as_str()).cloned().unwrap_or_default();
        // A container from before groups (no name label): adopted as it is.
        if let Some(legacy) = observed.iter().find(|o| o.name.is_empty()) {
            let mut r = contract::report(&a.id, &legacy.state);
            r.ip = ip_string(rt.address(&a.id, &legacy.id));
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
        if let Some(why) = gate(a) {
            out.push(gated(&a.id, &why, task, &observed));
            continue;
        }
        // A container that ended not by itself (its monitor fenced it, or died, or the host
        // rebooted) starts afresh: the controllers still want it here.
        let observed: Vec<&Observed> = observed
            .into_iter()
            .filter(|o| {
                let Some(why) = ended_by_the_node(&o.state) else {
                    return true;
                };
                info!(alloc = %o.alloc, container = %o.name, reason = why, "starting the container again");
                if let Err(e) = rt.remove(&o.id) {
                    warn!(alloc = %o.alloc, container = %o.name, error = %e, "remove failed");
                    return true;
                }
                false
            })
            .collect();
        if let Some((at, reason)) = failures.get(&a.id)
            && at.elapsed() < START_RETRY
        {
            out.push(with_containers(
                contract::failed(&a.id, reason),
                task,
                &observed,
            ));
            continue;
        }
        match step(rt, a, task, &observed, policy, dns) {
            Ok(report) => {
                failures.remove(&a.id);
                out.push(report);
            }
            Err(reason) => {
                warn!(alloc = %a.id, job = %format!("{}/{}", a.namespace, a.job), error = %reason, "start failed");
                out.push(with_containers(
                    contract::failed(&a.id, &reason),
                    task,
                    &observed,
                ));
                failures.insert(a.id.clone(), (Instant::now(), reason));
            }
        }
    }
    out
}

fn ip_string(ip: Option<IpAddr>) -> String {
    ip.map(|ip| ip.to_string()).unwrap_or_default()
}

/// Stops an allocation's live containers, main and init ones first, then sidecars; returns
/// the state to report last: a main container's.
fn stop_allocation(rt: &dyn Containers, containers: &[&Observed]) -> Option<State> {
    let stop_all = |list: Vec<&Observed>| -> Vec<State> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = list
                .into_iter()
                .map(|o| {
                    scope.spawn(move || {
                        if !o.live() {
                            return o.state.clone();
                        }
                        rt.stop(&o.id, o.stop_grace).unwrap_or_else(|e| {
                            warn!(alloc = %o.alloc, container = %o.name, error = %e, "stop failed");
                            o.state.clone()
                        })
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    };
    let (sidecars, others): (Vec<&Observed>, Vec<&Observed>) = containers
        .iter()
        .copied()
        .partition(|o| o.lifecycle == Lifecycle::Sidecar);
    // Main containers come first in `others`, so the state reported is a main's.
    let mut others = others;
    others.sort_by_key(|o| o.lifecycle != Lifecycle::Main);
    let states = stop_all(others);
    stop_all(sidecars);
    states.into_iter().next()
}

/// Whether a container has ended for good (its monitor gave up restarting it, or it was
/// never going to be restarted).
fn ended(s: &State) -> bool {
    matches!(s.status, Status::Exited | Status::Failed)
}

/// Why an ended container ended by this node's doing rather than its workload's (fenced by
/// its monitor; its monitor gone), if it did.
fn ended_by_the_node(s: &State) -> Option<&str> {
    let why = s.error.as_deref().filter(|_| ended(s))?;
    (why.starts_with(skiff_runtime::fence::FENCED) || why == skiff_runtime::container::MONITOR_GONE)
        .then_some(why)
}

/// Whether an ended container succeeded.
fn succeeded(s: &State) -> bool {
    s.status == Status::Exited
        && s.error.is_none()
        && s.exit.as_ref().is_some_and(|e| e.code == Some(0))
}

/// One allocation's pass: its pod, then the next containers in lifecycle order; the report.
fn step(
    rt: &dyn Containers,
    a: &Assigned,
    task: &Task,
    observed: &[&Observed],
    policy: &Policy,
    dns: Option<Ipv4Addr>,
) -> Result<pb::AllocationReport, String> {
    let mut now: HashMap<String, (String, State)> = observed
        .iter()
        .map(|o| (o.name.clone(), (o.id.clone(), o.state.clone())))
        .collect();
    // The sidecar runs while any container does (it started before the first).
    if task.mesh.is_some() && observed.iter().any(|o| !ended(&o.state)) {
        rt.ensure_sidecar(a, task)?;
    }
    let started_state = || {
        let mut s = State::created();
        s.status = Status::Running;
        s
    };
    let start = |c: &ContainerTask, now: &mut HashMap<String, (String, State)>| {
        // Idempotent: made before the first container, and again if it was lost.
        rt.create_pod(a, task)?;
        let devices = policy.admit(c)?;
        let id = rt
            .start(a, task, c, &devices, dns)
            .map_err(|e| format!("container {}: {e}", c.name))?;
        info!(alloc = %a.id, container = %c.name, id = %id, image = %c.image, "started");
        now.insert(c.name.clone(), (id, started_state()));
        Ok::<(), String>(())
    };

    // Init containers, one after another, each to success.
    for c in task
        .containers
        .iter()
        .filter(|c| c.lifecycle == Lifecycle::Init)
    {
        match now.get(&c.name).map(|(id, s)| (id.clone(), s.clone())) {
            None => {
                start(c, &mut now)?;
                return Ok(group_report(
                    rt,
                    a,
                    task,
                    &now,
                    pb::AllocationState::Pending,
                    format!("init container {} running", c.name),
                ));
            }
            Some((_, s)) if !ended(&s) => {
                return Ok(group_report(
                    rt,
                    a,
                    task,
                    &now,
                    pb::AllocationState::Pending,
                    format!("init container {} running", c.name),
                ));
            }
            Some((_, s)) if succeeded(&s) => {}
            Some((id, s)) => {
                let (_, _, why) = contract::container_state(&s);
                let tail = rt.tail(&id, INIT_TAIL_LINES);
                let mut reason = format!("init container {} failed: {why}", c.name);
                if !tail.trim().is_empty() {
                    reason.push_str(&format!("; last output: {}", tail.trim()));
                }
                let mut r = group_report(rt, a, task, &now, pb::AllocationState::Failed, reason);
                r.exit_code = s.exit.as_ref().map_or(0, |e| e.status_code());
                return Ok(r);
            }
        }
    }

    // Main containers that have all ended for good take their sidecars with them, and
    // nothing is started again.
    let mains: Vec<&ContainerTask> = task
        .containers
        .iter()
        .filter(|c| c.lifecycle == Lifecycle::Main)
        .collect();
    let mains_done = mains
        .iter()
        .all(|c| now.get(&c.name).is_some_and(|(_, s)| ended(s)));
    if mains_done {
        for o in observed
            .iter()
            .filter(|o| o.lifecycle == Lifecycle::Sidecar && o.live())
        {
            // Not waited for here (it may take its grace period): the next passes see it end.
            if !o.state.stopping {
                info!(alloc = %a.id, container = %o.name, "stopping sidecar: the main containers have ended");
            }
            if let Err(e) = rt.request_stop(&o.id, o.stop_grace) {
                warn!(alloc = %a.id, container = %o.name, error = %e, "stop failed");
            }
        }
        // The mesh sidecar last: a container sidecar may still need the network to finish.
        if task.mesh.is_some() && !observed.iter().any(|o| o.live()) {
            rt.stop_sidecar(&a.id);
        }
    } else {
        // Sidecars first, then the main containers.
        for lifecycle in [Lifecycle::Sidecar, Lifecycle::Main] {
            for c in task.containers.iter().filter(|c| c.lifecycle == lifecycle) {
                if !now.contains_key(&c.name) {
                    start(c, &mut now)?;
                }
            }
        }
    }

    // The allocation is where its main containers are.
    let states: Vec<(&str, &State)> = mains
        .iter()
        .filter_map(|c| now.get(&c.name).map(|(_, s)| (c.name.as_str(), s)))
        .collect();
    let failed = states.iter().find(|(_, s)| ended(s) && !succeeded(s));
    let (state, reason, exit_code) = if let Some((name, s)) = failed {
        let (_, code, why) = contract::container_state(s);
        (
            pb::AllocationState::Failed,
            if task.containers.len() > 1 {
                format!("container {name}: {why}")
            } else {
                why
            },
            code.unwrap_or(0),
        )
    } else if states.len() == mains.len() && states.iter().all(|(_, s)| succeeded(s)) {
        (pb::AllocationState::Exited, String::new(), 0)
    } else if states
        .iter()
        .any(|(_, s)| matches!(s.status, Status::Running | Status::Restarting))
    {
        (pb::AllocationState::Running, String::new(), 0)
    } else {
        (pb::AllocationState::Pending, String::new(), 0)
    };
    let mut r = group_report(rt, a, task, &now, state, reason);
    r.exit_code = exit_code;
    Ok(r)
}

/// The allocation's report: its state and reason, its address, and each container's status.
fn group_report(
    rt: &dyn Containers,
    a: &Assigned,
    task: &Task,
    now: &HashMap<String, (String, State)>,
    state: pb::AllocationState,
    reason: String,
) -> pb::AllocationReport {
    let main_id = task
        .main()
        .and_then(|m| now.get(&m.name))
        .map(|(id, _)| id.as_str())
        .unwrap_or("");
    let mut r = pb::AllocationReport {
        id: a.id.clone(),
        state: state as i32,
        reason,
        ip: ip_string(rt.address(&a.id, main_id)),
        ..Default::default()
    };
    for (id, s) in now.values() {
        r.oom_kills = r.oom_kills.saturating_add(rt.oom_kills(id));
        r.restarts = r.restarts.saturating_add(s.restarts);
        r.log_dropped_bytes = r.log_dropped_bytes.saturating_add(s.log_dropped_bytes);
        if r.log_error.is_empty() {
            r.log_error = s.log_error.clone().unwrap_or_default();
        }
    }
    r.containers = container_statuses(task, now);
    r
}

fn container_statuses(
    task: &Task,
    now: &HashMap<String, (String, State)>,
) -> Vec<pb::ContainerStatus> {
    task.containers
        .iter()
        .map(|c| {
            let (state, exit_code, reason, restarts) = match now.get(&c.name) {
                Some((_, s)) => {
                    let (state, code, why) = contract::container_state(s);
                    (state, code, why, s.restarts)
                }
                None => (
                    pb::AllocationState::Pending,
                    None,
                    "not started".to_owned(),
                    0,
                ),
            };
            pb::ContainerStatus {
                name: c.name.clone(),
                lifecycle: contract::lifecycle(c.lifecycle) as i32,
                state: state as i32,
                exit_code,
                restarts,
                reason,
            }
        })
        .collect()
}

/// A failure report with what is known of each container.
/// The report of an allocation the gate holds back: its main container's state while one
/// runs, pending with the gate's reason otherwise.
fn gated(id: &str, why: &str, task: &Task, observed: &[&Observed]) -> pb::AllocationReport {
    let live = observed
        .iter()
        .find(|o| o.lifecycle == Lifecycle::Main && o.live());
    let r = match live {
        Some(o) => contract::report(id, &o.state),
        None => pb::AllocationReport {
            id: id.to_owned(),
            state: pb::AllocationState::Pending as i32,
            reason: why.to_owned(),
            ..Default::default()
        },
    };
    with_containers(r, task, observed)
}

fn with_containers(
    mut r: pb::AllocationReport,
    task: &Task,
    observed: &[&Observed],
) -> pb::AllocationReport {
    let now: HashMap<String, (String, State)> = observed
        .iter()
        .map(|o| (o.name.clone(), (o.id.clone(), o.state.clone())))
        .collect();
    r.containers = container_statuses(task, &now);
    r
}

/// Keeps one health check per running allocation whose task has one (run against its main
/// container and its address), and puts each verdict in its allocation's report.
pub fn health_checks(
    rt: &dyn Containers,
    want: &[Assigned],
    checker: &Checker,
    reports: &mut [pb::AllocationReport],
) {
    let running: HashMap<(String, String), String> = rt
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.state.status == Status::Running)
        .map(|o| ((o.alloc, o.name), o.id))
        .collect();
    let mut checks = HashMap::new();
    for a in want {
        let Some(task) = a.task.as_ref().ok() else {
            continue;
        };
        let (Some(check), Some(main)) = (task.check.clone(), task.main()) else {
            continue;
        };
        let container = running
            .get(&(a.id.clone(), main.name.clone()))
            .or_else(|| running.get(&(a.id.clone(), String::new())));
        let Some(container) = container else {
            continue;
        };
        let probe = rt.probe(&a.id, container, &check);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{ContainerTask, PodNetwork};

    /// A runtime in memory: records what the reconciler asks of it.
    #[derive(Default)]
    struct Fake {
        containers: Mutex<Vec<Observed>>,
        pods: Mutex<Vec<String>>,
        started: Mutex<Vec<String>>,
        stopped: Mutex<Vec<String>>,
        removed: Mutex<Vec<String>>,
        fail_start: Mutex<Option<String>>,
        /// Containers (by name) that start and end at once with this exit code.
        exits: Mutex<HashMap<String, i32>>,
        /// "ensure ALLOC" and "stop ALLOC" for the mesh sidecar, in order.
        sidecar: Mutex<Vec<String>>,
    }

    impl Fake {
        fn with(containers: Vec<Observed>) -> Fake {
            Fake {
                pods: Mutex::new(containers.iter().map(|c| c.alloc.clone()).collect()),
                containers: Mutex::new(containers),
                ..Fake::default()
            }
        }

        fn exit(&self, name: &str, code: i32) {
            lock(&self.exits).insert(name.into(), code);
        }
    }

    fn exited(code: i32) -> State {
        let mut s = State::created();
        s.status = Status::Exited;
        s.exit = Some(skiff_runtime::store::ExitInfo {
            code: Some(code),
            signal: None,
            oom_killed: false,
            at_ms: 0,
        });
        s
    }

    impl Containers for Fake {
        fn list(&self) -> Result<Vec<Observed>, String> {
            Ok(lock(&self.containers).clone())
        }
        fn pods(&self) -> Vec<String> {
            lock(&self.pods).clone()
        }
        fn ensure_sidecar(&self, alloc: &Assigned, _: &Task) -> Result<(), String> {
            lock(&self.sidecar).push(format!("ensure {}", alloc.id));
            Ok(())
        }
        fn stop_sidecar(&self, alloc: &str) {
            lock(&self.sidecar).push(format!("stop {alloc}"));
        }
        fn create_pod(&self, alloc: &Assigned, _: &Task) -> Result<(), String> {
            let mut pods = lock(&self.pods);
            if !pods.contains(&alloc.id) {
                pods.push(alloc.id.clone());
            }
            Ok(())
        }
        fn remove_pod(&self, alloc: &str) {
            lock(&self.pods).retain(|p| p != alloc);
        }
        fn start(
            &self,
            alloc: &Assigned,
            _: &Task,
            c: &ContainerTask,
            _: &[DeviceNode],
            _: Option<Ipv4Addr>,
        ) -> Result<String, String> {
            if let Some(e) = lock(&self.fail_start).clone() {
                return Err(e);
            }
            let id = format!("c-{}-{}", alloc.id, c.name);
            lock(&self.started).push(format!("{}/{}", alloc.id, c.name));
            let state = match lock(&self.exits).get(&c.name) {
                Some(code) => exited(*code),
                None => {
                    let mut s = State::created();
                    s.status = Status::Running;
                    s
                }
            };
            lock(&self.containers).push(Observed {
                id: id.clone(),
                alloc: alloc.id.clone(),
                name: c.name.clone(),
                lifecycle: c.lifecycle,
                state,
                stop_grace: Duration::from_secs(1),
            });
            Ok(id)
        }
        fn stop(&self, id: &str, _: Duration) -> Result<State, String> {
            lock(&self.stopped).push(id.to_owned());
            let s = exited(0);
            for c in lock(&self.containers).iter_mut().filter(|c| c.id == id) {
                c.state = s.clone();
            }
            Ok(s)
        }
        fn request_stop(&self, id: &str, grace: Duration) -> Result<(), String> {
            self.stop(id, grace).map(|_| ())
        }
        fn remove(&self, id: &str) -> Result<(), String> {
            lock(&self.removed).push(id.to_owned());
            lock(&self.containers).retain(|c| c.id != id);
            Ok(())
        }
        fn address(&self, alloc: &str, _: &str) -> Option<IpAddr> {
            lock(&self.pods)
                .iter()
                .any(|p| p == alloc)
                .then_some(IpAddr::V4(Ipv4Addr::new(10, 42, 0, 2)))
        }
        fn probe(&self, _: &str, container: &str, check: &Check) -> Probe {
            let crate::contract::CheckKind::Exec { command } = &check.kind else {
                panic!("the tests use exec checks");
            };
            Probe::Exec {
                data_dir: "/nonexistent".into(),
                container: container.to_owned(),
                command: command.clone(),
            }
        }
        fn tail(&self, _: &str, _: usize) -> String {
            "migration: table exists".into()
        }
    }

    fn task() -> Task {
        Task {
            containers: vec![ContainerTask::new("web", "127.0.0.1:5000/web:1")],
            check: None,
            volumes: vec![],
            network: PodNetwork::Bridge,
            ports: vec![],
            mesh: None,
            stop_after: None,
        }
    }

    fn container(name: &str, lifecycle: Lifecycle) -> ContainerTask {
        let mut c = ContainerTask::new(name, "127.0.0.1:5000/web:1");
        c.lifecycle = lifecycle;
        c
    }

    /// migrate (init), then shipper (sidecar) and web (main).
    fn group() -> Task {
        Task {
            containers: vec![
                container("migrate", Lifecycle::Init),
                container("web", Lifecycle::Main),
                container("shipper", Lifecycle::Sidecar),
            ],
            ..task()
        }
    }

    fn assigned_with(id: &str, task: Task) -> Assigned {
        Assigned {
            id: id.into(),
            namespace: "default".into(),
            job: "web".into(),
            version: 1,
            task: Ok(task),
        }
    }

    fn assigned(id: &str) -> Assigned {
        assigned_with(id, task())
    }

    fn running(id: &str, alloc: &str) -> Observed {
        let mut state = State::created();
        state.status = Status::Running;
        Observed {
            id: id.into(),
            alloc: alloc.into(),
            name: "web".into(),
            lifecycle: Lifecycle::Main,
            state,
            stop_grace: Duration::from_secs(1),
        }
    }

    fn pass(rt: &Fake, want: &[Assigned]) -> Vec<pb::AllocationReport> {
        reconcile_once(
            rt,
            want,
            &Failures::default(),
            &Policy::default(),
            None,
            &open_gate,
        )
    }

    fn state_of(reports: &[pb::AllocationReport], id: &str) -> i32 {
        reports
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.state)
            .unwrap_or(-1)
    }

    #[test]
    fn starts_what_is_missing_and_adopts_what_runs() {
        let rt = Fake::with(vec![running("c-a1", "a1")]);
        let reports = pass(&rt, &[assigned("a1"), assigned("a2")]);
        assert_eq!(*lock(&rt.started), ["a2/web"], "a1 adopted, not restarted");
        assert!(lock(&rt.stopped).is_empty());
        assert_eq!(reports.len(), 2);
        for r in &reports {
            assert_eq!(r.state, pb::AllocationState::Running as i32, "{r:?}");
            assert_eq!(r.ip, "10.42.0.2");
            assert_eq!(r.containers.len(), 1);
        }
    }

    #[test]
    fn the_gate_holds_back_starts_and_a_fenced_container_starts_afresh_once_let_through() {
        let rt = Fake::with(vec![running("c-a1", "a1")]);
        let want = [assigned("a1"), assigned("a2")];
        let refuse = |a: &Assigned| Some(format!("fenced: {} not confirmed", a.id));
        let run = |gate: Gate<'_>| {
            reconcile_once(
                &rt,
                &want,
                &Failures::default(),
                &Policy::default(),
                None,
                gate,
            )
        };
        let r = run(&refuse);
        assert!(lock(&rt.started).is_empty(), "nothing starts while refused");
        assert!(lock(&rt.stopped).is_empty(), "what runs keeps running");
        assert_eq!(state_of(&r, "a1"), pb::AllocationState::Running as i32);
        assert_eq!(state_of(&r, "a2"), pb::AllocationState::Pending as i32);
        let a2 = r.iter().find(|r| r.id == "a2").map(|r| r.reason.clone());
        assert_eq!(a2.as_deref(), Some("fenced: a2 not confirmed"));

        // Its monitor fenced a1; while refused it stays down, once let through it starts
        // again (a new container), and a2 starts.
        for c in lock(&rt.containers).iter_mut() {
            c.state = exited(143);
            c.state.error = Some("fenced: the controllers last answered this node 5.1s ago".into());
        }
        run(&refuse);
        assert!(lock(&rt.started).is_empty());
        let r = run(&open_gate);
        assert_eq!(
            *lock(&rt.removed),
            ["c-a1"],
            "the fenced container is replaced"
        );
        let mut started = lock(&rt.started).clone();
        started.sort();
        assert_eq!(started, ["a1/web", "a2/web"]);
        assert_eq!(state_of(&r, "a1"), pb::AllocationState::Running as i32);
        // One whose monitor died (killed, a reboot) starts again too.
        for c in lock(&rt.containers).iter_mut().filter(|c| c.alloc == "a2") {
            c.state = exited(137);
            c.state.error = Some(skiff_runtime::container::MONITOR_GONE.into());
        }
        run(&open_gate);
        let a2_starts = lock(&rt.started).iter().filter(|s| *s == "a2/web").count();
        assert_eq!(a2_starts, 2, "{:?}", lock(&rt.started));
        // A container that failed on its own is not restarted by the agent.
        for c in lock(&rt.containers).iter_mut() {
            c.state = exited(1);
        }
        run(&open_gate);
        assert_eq!(lock(&rt.started).len(), 3);
    }

    #[test]
    fn stops_and_removes_what_is_no_longer_assigned_and_reports_it_once_more() {
        let rt = Fake::with(vec![running("c-a1", "a1"), running("c-old", "old")]);
        let reports = pass(&rt, &[assigned("a1")]);
        assert_eq!(*lock(&rt.stopped), ["c-old"]);
        assert_eq!(*lock(&rt.removed), ["c-old"]);
        assert_eq!(*lock(&rt.pods), ["a1"], "the old pod is gone");
        let old = reports
            .iter()
            .find(|r| r.id == "old")
            .expect("old reported");
        assert_eq!(old.state, pb::AllocationState::Exited as i32);
        // An empty assignment stops everything of ours.
        pass(&rt, &[]);
        assert!(lock(&rt.containers).is_empty());
        assert!(lock(&rt.pods).is_empty());
    }

    #[test]
    fn init_containers_run_first_one_at_a_time_then_sidecars_then_mains() {
        let rt = Fake::default();
        let want = [assigned_with("a1", group())];
        let r = pass(&rt, &want);
        assert_eq!(*lock(&rt.started), ["a1/migrate"]);
        assert_eq!(state_of(&r, "a1"), pb::AllocationState::Pending as i32);
        assert!(r[0].reason.contains("init container migrate"), "{r:?}");
        // Still running: nothing else starts.
        pass(&rt, &want);
        assert_eq!(lock(&rt.started).len(), 1);
        // It succeeds: the sidecar, then the main container.
        for c in lock(&rt.containers).iter_mut() {
            c.state = exited(0);
        }
        let r = pass(&rt, &want);
        assert_eq!(*lock(&rt.started), ["a1/migrate", "a1/shipper", "a1/web"]);
        assert_eq!(state_of(&r, "a1"), pb::AllocationState::Running as i32);
        let names: Vec<(&str, i32)> = r[0]
            .containers
            .iter()
            .map(|c| (c.name.as_str(), c.state))
            .collect();
        assert_eq!(
            names,
            [
                ("migrate", pb::AllocationState::Exited as i32),
                ("web", pb::AllocationState::Running as i32),
                ("shipper", pb::AllocationState::Running as i32),
            ]
        );
    }

    #[test]
    fn a_failed_init_container_fails_the_allocation_and_blocks_the_rest() {
        let rt = Fake::default();
        rt.exit("migrate", 3);
        let want = [assigned_with("a1", group())];
        pass(&rt, &want);
        let r = pass(&rt, &want);
        assert_eq!(
            *lock(&rt.started),
            ["a1/migrate"],
            "nothing after it starts"
        );
        assert_eq!(state_of(&r, "a1"), pb::AllocationState::Failed as i32);
        assert_eq!(r[0].exit_code, 3);
        assert!(
            r[0].reason
                .contains("init container migrate failed: exit 3"),
            "{r:?}"
        );
        assert!(
            r[0].reason.contains("table exists"),
            "its last output: {r:?}"
        );
    }

    #[test]
    fn sidecars_stop_once_the_main_containers_have_ended() {
        let rt = Fake::default();
        rt.exit("web", 0);
        let mut t = group();
        t.containers.remove(0);
        let want = [assigned_with("a1", t)];
        pass(&rt, &want);
        // web ended at once (a batch job): the sidecar is stopped, not left running.
        let r = pass(&rt, &want);
        assert_eq!(*lock(&rt.stopped), ["c-a1-shipper"]);
        assert_eq!(state_of(&r, "a1"), pb::AllocationState::Exited as i32);
        // And it is not started again.
        pass(&rt, &want);
        assert_eq!(lock(&rt.started).len(), 2);
    }

    fn meshed() -> Task {
        let web = skiff_proxy::config::ServiceRef::parse("web", "default").expect("ref");
        Task {
            mesh: Some(crate::contract::MeshTask {
                identity: web,
                mode: skiff_proxy::config::Mode::Strict,
                allow_from: vec![],
                upstreams: vec![],
                request_stats: false,
            }),
            ..task()
        }
    }

    #[test]
    fn the_mesh_sidecar_is_kept_running_with_the_containers_and_stopped_after_them() {
        let rt = Fake::default();
        let want = [assigned_with("a1", meshed())];
        pass(&rt, &want);
        pass(&rt, &want);
        assert_eq!(*lock(&rt.sidecar), ["ensure a1"]);
        // A batch job in the mesh: its main ends, the sidecar goes, the job is done.
        let rt = Fake::default();
        rt.exit("web", 0);
        pass(&rt, &want);
        let r = pass(&rt, &want);
        assert_eq!(state_of(&r, "a1"), pb::AllocationState::Exited as i32);
        assert_eq!(*lock(&rt.sidecar), ["stop a1"]);
    }

    #[test]
    fn a_main_container_that_fails_fails_the_allocation_naming_it() {
        let rt = Fake::default();
        rt.exit("web", 2);
        let mut t = group();
        t.containers.remove(0);
        let want = [assigned_with("a1", t)];
        pass(&rt, &want);
        let r = pass(&rt, &want);
        assert_eq!(state_of(&r, "a1"), pb::AllocationState::Failed as i32);
        assert_eq!(r[0].exit_code, 2);
        assert!(r[0].reason.contains("container web: exit 2"), "{r:?}");
    }

    #[test]
    fn an_allocation_going_away_stops_mains_before_sidecars() {
        let rt = Fake::default();
        let mut t = group();
        t.containers.remove(0);
        pass(&rt, &[assigned_with("a1", t)]);
        pass(&rt, &[]);
        assert_eq!(*lock(&rt.stopped), ["c-a1-web", "c-a1-shipper"]);
        assert!(lock(&rt.containers).is_empty());
        assert!(lock(&rt.pods).is_empty());
    }

    #[test]
    fn what_the_node_policy_refuses_is_reported_and_never_started() {
        let rt = Fake::default();
        let mut local = assigned("a1");
        if let Ok(t) = &mut local.task {
            t.containers[0].image = "oci:/etc".into();
        }
        let mut device = assigned("a2");
        if let Ok(t) = &mut device.task {
            t.containers[0].devices = vec![("/dev/fuse".into(), 6)];
        }
        let reports = pass(&rt, &[local, device]);
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
            let reports = reconcile_once(
                &rt,
                &[assigned("a1")],
                &failures,
                &Policy::default(),
                None,
                &open_gate,
            );
            assert_eq!(reports[0].state, pb::AllocationState::Failed as i32);
            assert!(reports[0].reason.contains("no such directory"));
        }
        *lock(&rt.fail_start) = None;
        reconcile_once(
            &rt,
            &[assigned("a1")],
            &failures,
            &Policy::default(),
            None,
            &open_gate,
        );
        assert!(lock(&rt.started).is_empty(), "retried before START_RETRY");
    }

    #[test]
    fn a_task_this_agent_cannot_run_is_reported_failed() {
        let rt = Fake::default();
        let mut a = assigned("a1");
        a.task = Err("task: network mode 9 is one this agent does not know; upgrade it".into());
        let reports = pass(&rt, &[a]);
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
        let mut reports = pass(&rt, &want);
        let checker = Checker::default();
        health_checks(&rt, &want, &checker, &mut reports);
        let health = |id: &str| reports.iter().find(|r| r.id == id).map(|r| r.health);
        assert_eq!(health("a1"), Some(pb::Health::Starting as i32));
        assert_eq!(health("a2"), Some(pb::Health::Unspecified as i32));
    }
}
