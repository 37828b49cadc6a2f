//! The metric gate of a rollout's canaries (`[update.analysis]`): the new version's requests,
//! as its sidecars count them, against the old version's over the same window.
//!
//! Agents send each watched sidecar's cumulative counts with their heartbeats; the leader
//! keeps the latest per allocation in memory ([`RequestSample`]). A window opens when the
//! canaries are healthy, with every allocation's counts at that moment as its baseline; once
//! `interval` has passed and each version has answered `min_requests` in it, the error rates
//! (5xx or no answer) and the p99 latencies decide. A new leader opens a new window.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use skiff_common::Analysis;

/// A sidecar's requests since it started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestSample {
    pub requests: u64,
    pub errors: u64,
    /// Cumulative latency histogram: (upper bound in seconds, requests at most that slow).
    pub buckets: Vec<(f64, u64)>,
}

/// Most buckets accepted from an agent.
pub const MAX_BUCKETS: usize = 64;

impl RequestSample {
    /// What was counted since `base` (a restarted sidecar starts again from zero: all of it).
    fn since(&self, base: &RequestSample) -> RequestSample {
        if self.requests < base.requests || self.buckets.len() != base.buckets.len() {
            return self.clone();
        }
        RequestSample {
            requests: self.requests - base.requests,
            errors: self.errors.saturating_sub(base.errors),
            buckets: self
                .buckets
                .iter()
                .zip(&base.buckets)
                .map(|(a, b)| (a.0, a.1.saturating_sub(b.1)))
                .collect(),
        }
    }

    fn add(&mut self, other: &RequestSample) {
        self.requests += other.requests;
        self.errors += other.errors;
        if self.buckets.is_empty() {
            self.buckets = other.buckets.clone();
        } else if self.buckets.len() == other.buckets.len() {
            for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
                a.1 += b.1;
            }
        }
    }

    /// Percent of requests that failed.
    fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 * 100.0 / self.requests as f64
        }
    }

    /// The 99th percentile latency: the bound of the first bucket holding it.
    fn p99(&self) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = (total * 99).div_ceil(100);
        self.buckets.iter().find(|b| b.1 >= rank).map(|b| b.0)
    }
}

/// What the analysis says of a rollout's canaries.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Not yet: why.
    Waiting(String),
    Passed(String),
    Failed(String),
}

/// One open window per rollout (job key and version), on the leader.
#[derive(Default)]
pub struct Analyses {
    windows: HashMap<(String, u64), Window>,
}

struct Window {
    opened: Instant,
    /// Each allocation's counts when the window opened (or when it was first seen).
    baseline: HashMap<String, RequestSample>,
}

fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn ms(seconds: f64) -> String {
    if seconds.is_infinite() {
        "more than the largest bucket".into()
    } else {
        format!("{:.0}ms", seconds * 1e3)
    }
}

impl Analyses {
    /// Judges the canaries (`new`) of rollout `key` against the old version's allocations
    /// (`old`), with the latest counts `stats`.
    pub fn judge(
        &mut self,
        key: (String, u64),
        rules: &Analysis,
        new: &[String],
        old: &[String],
        stats: &dyn Fn(&str) -> Option<RequestSample>,
        now: Instant,
    ) -> Verdict {
        let window = self.windows.entry(key).or_insert_with(|| Window {
            opened: now,
            baseline: HashMap::new(),
        });
        let mut sum = |ids: &[String]| {
            let mut total = RequestSample::default();
            for id in ids {
                let Some(s) = stats(id) else { continue };
                let base = window
                    .baseline
                    .entry(id.clone())
                    .or_insert_with(|| s.clone());
                total.add(&s.since(base));
            }
            total
        };
        let (n, o) = (sum(new), sum(old));
        let elapsed = now.duration_since(window.opened);
        if elapsed < rules.interval {
            return Verdict::Waiting(format!(
                "analysis: {} of {} watched; {} and {} requests so far",
                secs(Duration::from_secs(elapsed.as_secs())),
                secs(rules.interval),
                n.requests,
                o.requests
            ));
        }
        let min = u64::from(rules.min_requests);
        if n.requests < min || o.requests < min {
            return Verdict::Waiting(format!(
                "analysis: waiting for {min} requests to each version ({} new, {} old)",
                n.requests, o.requests
            ));
        }
        let (en, eo) = (n.error_rate(), o.error_rate());
        if en - eo > rules.max_error_rate_increase {
            return Verdict::Failed(format!(
                "canary error rate {en:.1}% against {eo:.1}% for the old version over {} and {} requests (max_error_rate_increase {})",
                n.requests, o.requests, rules.max_error_rate_increase
            ));
        }
        if let (Some(pn), Some(po)) = (n.p99(), o.p99())
            && pn - po > rules.max_p99_increase.as_secs_f64()
        {
            return Verdict::Failed(format!(
                "canary p99 latency {} against {} for the old version (max_p99_increase {})",
                ms(pn),
                ms(po),
                secs(rules.max_p99_increase)
            ));
        }
        Verdict::Passed(format!(
            "canary error rate {en:.1}% against {eo:.1}%, p99 {} against {}, over {} and {} requests",
            n.p99().map_or("-".into(), ms),
            o.p99().map_or("-".into(), ms),
            n.requests,
            o.requests
        ))
    }

    /// Forgets the windows of rollouts not in `open`.
    pub fn retain(&mut self, open: &[(String, u64)]) {
        self.windows.retain(|k, _| open.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(requests: u64, errors: u64, fast: u64) -> RequestSample {
        RequestSample {
            requests,
            errors,
            buckets: vec![(0.01, fast), (0.5, requests), (f64::INFINITY, requests)],
        }
    }

    fn rules() -> Analysis {
        Analysis {
            max_error_rate_increase: 5.0,
            max_p99_increase: Duration::from_millis(100),
            interval: Duration::from_secs(10),
            min_requests: 20,
        }
    }

    #[test]
    fn waits_for_the_interval_and_the_requests_then_judges_errors_and_latency() {
        let mut a = Analyses::default();
        let key = ("default/web".to_owned(), 2);
        let t0 = Instant::now();
        let new = vec!["c1".to_owned()];
        let old = vec!["o1".to_owned(), "o2".to_owned()];
        // Baselines: whatever was counted before the window does not count.
        let before = |id: &str| {
            Some(if id == "c1" {
                sample(5, 5, 0)
            } else {
                sample(100, 0, 100)
            })
        };
        let v = a.judge(key.clone(), &rules(), &new, &old, &before, t0);
        assert!(matches!(v, Verdict::Waiting(_)), "{v:?}");
        // Interval over, too few requests to the canary.
        let few = |id: &str| {
            Some(if id == "c1" {
                sample(15, 5, 10)
            } else {
                sample(150, 0, 150)
            })
        };
        let v = a.judge(
            key.clone(),
            &rules(),
            &new,
            &old,
            &few,
            t0 + Duration::from_secs(11),
        );
        assert!(
            matches!(&v, Verdict::Waiting(w) if w.contains("10 new")),
            "{v:?}"
        );
        // 30 canary requests, 9 failed (30%): the old version failed none.
        let bad = |id: &str| {
            Some(if id == "c1" {
                sample(35, 14, 35)
            } else {
                sample(150, 0, 150)
            })
        };
        let v = a.judge(
            key.clone(),
            &rules(),
            &new,
            &old,
            &bad,
            t0 + Duration::from_secs(12),
        );
        assert!(
            matches!(&v, Verdict::Failed(r) if r.contains("canary error rate 30.0% against 0.0%")),
            "{v:?}"
        );
        // Slow: every canary request in the 500 ms bucket.
        let slow = |id: &str| {
            Some(if id == "c1" {
                sample(35, 5, 0)
            } else {
                sample(150, 0, 150)
            })
        };
        let v = a.judge(
            key.clone(),
            &rules(),
            &new,
            &old,
            &slow,
            t0 + Duration::from_secs(12),
        );
        assert!(
            matches!(&v, Verdict::Failed(r) if r.contains("p99 latency 500ms against 10ms")),
            "{v:?}"
        );
        let good = |id: &str| {
            Some(if id == "c1" {
                sample(35, 5, 35)
            } else {
                sample(150, 0, 150)
            })
        };
        let v = a.judge(
            key.clone(),
            &rules(),
            &new,
            &old,
            &good,
            t0 + Duration::from_secs(12),
        );
        assert!(matches!(v, Verdict::Passed(_)), "{v:?}");
        a.retain(&[]);
        assert!(a.windows.is_empty());
    }

    #[test]
    fn a_restarted_sidecar_counts_from_zero() {
        let base = sample(100, 10, 100);
        let now = sample(3, 1, 3);
        assert_eq!(now.since(&base), now);
        assert_eq!(sample(130, 10, 130).since(&base).requests, 30);
    }
}
