//! Disk pressure: when the filesystem of the agent's data directory (images, containers'
//! layers and logs) is fuller than `--disk-pressure-threshold`, the agent removes what no
//! container uses (leftovers of removed containers, then images no container uses), at most
//! once a minute, and reports pressure with its heartbeats while the disk stays that full; the
//! scheduler places nothing new on the node meanwhile. Pressure ends once the disk is
//! [`HYSTERESIS`] points below the threshold, so a node at the edge does not flap.

use std::path::Path;
use std::time::{Duration, Instant};

/// Percentage points below the threshold at which pressure ends.
pub const HYSTERESIS: f64 = 5.0;
/// The least time between two prunes.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// The default threshold, percent used.
pub const DEFAULT_THRESHOLD: u8 = 90;

/// The pressure state of one node.
#[derive(Debug)]
pub struct Pressure {
    /// Percent used at which pressure starts.
    threshold: f64,
    on: bool,
    last_prune: Option<Instant>,
}

impl Pressure {
    pub fn new(threshold_percent: u8) -> Pressure {
        Pressure {
            threshold: f64::from(threshold_percent),
            on: false,
            last_prune: None,
        }
    }

    /// Whether the disk, `used` percent full, calls for pruning now.
    pub fn prune_due(&mut self, used: f64, now: Instant) -> bool {
        let due = used >= self.threshold
            && self
                .last_prune
                .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY);
        if due {
            self.last_prune = Some(now);
        }
        due
    }

    /// Takes a reading (percent used, after any pruning); returns whether the node is under
    /// pressure.
    pub fn observe(&mut self, used: f64) -> bool {
        if used >= self.threshold {
            self.on = true;
        } else if used < self.threshold - HYSTERESIS {
            self.on = false;
        }
        self.on
    }
}

/// How full the filesystem holding `path` is, in percent of the blocks an unprivileged user
/// could use (as `df` shows it).
pub fn used_percent(path: &Path) -> Result<f64, String> {
    let s = nix::sys::statvfs::statvfs(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (total, free, avail) = (
        s.blocks() as f64,
        s.blocks_free() as f64,
        s.blocks_available() as f64,
    );
    let used = total - free;
    if used + avail <= 0.0 {
        return Ok(0.0);
    }
    Ok(100.0 * used / (used + avail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_starts_at_the_threshold_and_ends_below_it_by_the_hysteresis() {
        let mut p = Pressure::new(90);
        assert!(!p.observe(89.9));
        assert!(p.observe(90.0));
        assert!(p.observe(86.0), "still on within the hysteresis");
        assert!(!p.observe(84.9));
        assert!(!p.observe(88.0), "off until the threshold again");
    }

    #[test]
    fn pruning_is_due_above_the_threshold_at_most_once_a_minute() {
        let mut p = Pressure::new(80);
        let t0 = Instant::now();
        assert!(!p.prune_due(79.0, t0));
        assert!(p.prune_due(95.0, t0));
        assert!(!p.prune_due(95.0, t0 + Duration::from_secs(30)));
        assert!(p.prune_due(95.0, t0 + PRUNE_EVERY));
    }

    #[test]
    fn the_data_dir_filesystem_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let used = used_percent(dir.path()).expect("statvfs");
        assert!((0.0..=100.0).contains(&used), "{used}");
        let err = used_percent(Path::new("/nonexistent/skiff")).expect_err("missing dir");
        assert!(err.contains("/nonexistent/skiff"), "{err}");
    }
}
