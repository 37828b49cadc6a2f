//! Fencing: containers that must stop when their node loses touch with the controllers.
//!
//! The agent keeps a lease file: the time (`CLOCK_BOOTTIME`, nanoseconds) at which it sent
//! the last heartbeat the controllers' leader answered. Each fenced container's monitor reads
//! it several times a second and stops the container (its stop signal, SIGKILL after its grace)
//! once that heartbeat is older than the container's [`Fence::after_ms`]; it does not start
//! or restart it while that is so. The monitor, not the agent, enforces it: a container is
//! stopped in time with its agent killed, hung or restarting.
//!
//! `CLOCK_BOOTTIME` counts time while the host is suspended and is not moved by setting the
//! wall clock, so a clock jump neither stops a container early nor keeps it running late.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a fenced container's monitor fences it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The agent's lease file.
    pub lease: PathBuf,
    /// The container stops once the lease is this old.
    pub after_ms: u64,
}

/// The start of the reason a fenced container's state gives; the agent knows a fenced
/// container by it.
pub const FENCED: &str = "fenced";

/// How often a monitor reads the lease.
pub const CHECK_EVERY: Duration = Duration::from_millis(200);

impl Fence {
    /// Why the container must not run now (its lease is too old, or unreadable); `None`
    /// while the lease holds.
    pub fn expired(&self) -> Option<String> {
        let after = Duration::from_millis(self.after_ms);
        match read_lease(&self.lease) {
            Some(sent) => {
                let age = Duration::from_nanos(boottime_ns().saturating_sub(sent));
                (age >= after).then(|| {
                    format!(
                        "{FENCED}: the controllers last answered this node {:.1}s ago \
                         (disconnect.stop_after {})",
                        age.as_secs_f64(),
                        humantime::format_duration(after)
                    )
                })
            }
            None => Some(format!(
                "{FENCED}: no lease from the controllers ({} unreadable)",
                self.lease.display()
            )),
        }
    }
}

/// `CLOCK_BOOTTIME` in nanoseconds.
pub fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            (t.tv_sec() as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(t.tv_nsec() as u64)
        })
        .unwrap_or(0)
}

/// The lease's time, if the file holds one.
pub fn read_lease(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Writes the lease (atomically: a reader sees the old time or the new one).
pub fn write_lease(path: &Path, sent_ns: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{sent_ns}\n"))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_until_it_is_older_than_the_fence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lease = dir.path().join("lease");
        let fence = Fence {
            lease: lease.clone(),
            after_ms: 60_000,
        };
        let why = fence.expired().unwrap_or_default();
        assert!(
            why.starts_with(FENCED) && why.contains("unreadable"),
            "{why}"
        );
        write_lease(&lease, boottime_ns()).expect("lease");
        assert_eq!(fence.expired(), None);
        write_lease(&lease, boottime_ns() - 61_000_000_000).expect("lease");
        let why = fence.expired().unwrap_or_default();
        assert!(
            why.contains("61.0s ago") && why.contains("stop_after 1m"),
            "{why}"
        );
        std::fs::write(&lease, "garbage").expect("write");
        assert!(fence.expired().is_some());
    }
}
