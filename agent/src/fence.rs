//! The node's side of fencing (a job's `disconnect.stop_after`): the lease the monitors of
//! fenced containers read, and the gate that keeps this agent from starting a fenced
//! allocation the controllers may be replacing.
//!
//! The lease is the `CLOCK_BOOTTIME` time at which the agent *sent* the last heartbeat the
//! leader answered (the leader answers only while a quorum confirmed its leadership within
//! a few seconds), so it is never later than the
//! leader's own record of that heartbeat. Each fenced container's monitor stops it once the
//! lease is older than its job's `stop_after` ([`skiff_runtime::fence`]); the leader replaces
//! such an allocation only once `stop_after` plus its containers' stop grace (and a margin)
//! has passed since the node's last heartbeat reached it.
//!
//! Starting is gated too: a fenced allocation starts (or starts again after being fenced)
//! only while the lease holds *and* the leader's last answer listed it among the node's
//! allocations (`HeartbeatResponse.leased`). An assignment read before a replacement was
//! decided can therefore not start a replica the controllers have already replaced.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use skiff_runtime::fence::{FENCED, boottime_ns, read_lease, write_lease};
use tracing::warn;

use crate::contract::Assigned;

/// The lease file's name in the agent's data directory.
pub const LEASE_FILE: &str = "lease";

/// The node's lease and what the leader last said the node may run.
pub struct Lease {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// Told when an answer lists an allocation the last one did not.
    confirmed: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    /// When the last answered heartbeat was sent (`CLOCK_BOOTTIME`, ns).
    sent_ns: Option<u64>,
    /// The fenced allocations the last answer listed.
    leased: HashSet<String>,
}

impl Lease {
    /// The lease at `path` (as a restarted agent finds it: the time stays, the list of
    /// allocations waits for the next answer).
    pub fn open(path: PathBuf) -> Lease {
        let sent_ns = read_lease(&path);
        Lease {
            path,
            inner: Mutex::new(Inner {
                sent_ns,
                leased: HashSet::new(),
            }),
            confirmed: tokio::sync::Notify::new(),
        }
    }

    /// Resolves when an answer lists an allocation the one before did not (the node's
    /// reconciler then starts it at once instead of at its next pass).
    pub async fn confirmed(&self) {
        self.confirmed.notified().await
    }

    /// The lease file the monitors read.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// A heartbeat sent at `sent_ns` was answered by the leader, listing `leased`.
    pub fn renew(&self, sent_ns: u64, leased: Vec<String>) {
        let mut inner = lock(&self.inner);
        if inner.sent_ns.is_none_or(|s| s < sent_ns) {
            if let Err(e) = write_lease(&self.path, sent_ns) {
                // The monitors keep the older time: fenced containers stop early, never late.
                warn!(path = %self.path.display(), error = %e, "writing the fencing lease");
            }
            inner.sent_ns = Some(sent_ns);
        }
        let leased: HashSet<String> = leased.into_iter().collect();
        if !leased.is_subset(&inner.leased) {
            self.confirmed.notify_one();
        }
        inner.leased = leased;
    }

    /// Why `alloc` may not start now; `None` when it may (a job without fencing always may).
    pub fn refuse(&self, alloc: &Assigned) -> Option<String> {
        let stop_after = alloc.task.as_ref().ok()?.stop_after?;
        let inner = lock(&self.inner);
        let age = inner
            .sent_ns
            .map(|s| Duration::from_nanos(boottime_ns().saturating_sub(s)));
        match age {
            Some(age) if age < stop_after => {}
            Some(age) => {
                return Some(format!(
                    "{FENCED}: the controllers last answered this node {:.1}s ago \
                     (disconnect.stop_after {})",
                    age.as_secs_f64(),
                    humantime::format_duration(stop_after)
                ));
            }
            None => return Some(format!("{FENCED}: no answer from the controllers yet")),
        }
        (!inner.leased.contains(&alloc.id)).then(|| {
            format!(
                "{FENCED}: waiting for the controllers to confirm the allocation is this node's"
            )
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{ContainerTask, PodNetwork, Task};

    fn alloc(id: &str, stop_after: Option<Duration>) -> Assigned {
        Assigned {
            id: id.into(),
            namespace: "default".into(),
            job: "j".into(),
            version: 1,
            task: Ok(Task {
                containers: vec![ContainerTask::new("main", "img")],
                check: None,
                volumes: vec![],
                network: PodNetwork::Bridge,
                ports: vec![],
                mesh: None,
                stop_after,
            }),
        }
    }

    #[test]
    fn a_fenced_allocation_starts_only_while_leased_and_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lease = Lease::open(dir.path().join(LEASE_FILE));
        let free = alloc("free", None);
        let fenced = alloc("a1", Some(Duration::from_secs(5)));
        assert_eq!(lease.refuse(&free), None, "no fencing: always");
        assert!(
            lease
                .refuse(&fenced)
                .unwrap_or_default()
                .contains("no answer")
        );

        lease.renew(boottime_ns(), vec!["other".into()]);
        assert!(
            lease
                .refuse(&fenced)
                .unwrap_or_default()
                .contains("confirm")
        );
        lease.renew(boottime_ns(), vec!["a1".into()]);
        assert_eq!(lease.refuse(&fenced), None);
        // The monitors read the same time.
        assert!(read_lease(lease.path()).is_some());

        // An older answer arriving late does not move the lease back.
        let now = boottime_ns();
        lease.renew(now - 10_000_000_000, vec!["a1".into()]);
        assert_eq!(read_lease(lease.path()), lock(&lease.inner).sent_ns);
        assert!(read_lease(lease.path()).unwrap_or(0) > now - 1_000_000_000);

        // A restarted agent keeps the time but waits for the list.
        let reopened = Lease::open(dir.path().join(LEASE_FILE));
        assert!(
            reopened
                .refuse(&fenced)
                .unwrap_or_default()
                .contains("confirm")
        );

        // Too old: refused, whatever the list says.
        let stale = Lease::open(dir.path().join("stale"));
        stale.renew(boottime_ns() - 6_000_000_000, vec!["a1".into()]);
        assert!(
            stale
                .refuse(&fenced)
                .unwrap_or_default()
                .contains("stop_after 5s")
        );
    }
}
