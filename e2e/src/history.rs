//! What the chaos suite checks: a history of client writes (invoked, then ok, failed or
//! unknown) and the lives of a fenced job's containers as sampled on every node, and the
//! properties they must have: no acknowledged write lost, no two replicas of a one-replica
//! fenced job running at once on two nodes.
//!
//! Like Jepsen's histories, an operation whose outcome the client could not learn (a timeout,
//! a broken connection) is *unknown*: it may or may not have happened, and neither outcome is
//! an error. Only an acknowledged write must be there at the end.

use std::collections::{BTreeMap, BTreeSet};

/// How an operation ended, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused for certain (it did not happen).
    Fail(String),
    /// Maybe applied, maybe not.
    Unknown(String),
}

/// One client operation.
#[derive(Clone, Debug)]
pub struct Op {
    /// What it wrote (a job's name).
    pub key: String,
    pub invoked_ms: i64,
    pub completed_ms: i64,
    pub outcome: Outcome,
}

/// The operations of a run.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub ops: Vec<Op>,
}

impl History {
    pub fn record(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Acknowledged writes whose key is not in `present`.
    pub fn lost<'a>(&'a self, present: &BTreeSet<String>) -> Vec<&'a Op> {
        self.ops
            .iter()
            .filter(|o| o.outcome == Outcome::Ok && !present.contains(&o.key))
            .collect()
    }

    /// One line: how many were invoked, ok, failed, unknown, and the slowest ok.
    pub fn summary(&self) -> String {
        let count =
            |f: &dyn Fn(&Outcome) -> bool| self.ops.iter().filter(|o| f(&o.outcome)).count();
        let slowest = self
            .ops
            .iter()
            .filter(|o| o.outcome == Outcome::Ok)
            .map(|o| o.completed_ms - o.invoked_ms)
            .max()
            .unwrap_or(0);
        format!(
            "{} writes invoked: {} ok, {} failed, {} unknown; slowest ok {} ms",
            self.ops.len(),
            count(&|o| *o == Outcome::Ok),
            count(&|o| matches!(o, Outcome::Fail(_))),
            count(&|o| matches!(o, Outcome::Unknown(_))),
            slowest
        )
    }
}

/// One container's life as sampled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Life {
    pub node: String,
    pub alloc: String,
    pub container: String,
    pub start_ms: i64,
    /// `None`: running when last sampled.
    pub end_ms: Option<i64>,
}

impl Life {
    fn overlaps(&self, other: &Life) -> bool {
        let before = |a: &Life, b: &Life| a.end_ms.is_some_and(|e| e <= b.start_ms);
        !before(self, other) && !before(other, self)
    }
}

/// The lives of a job's containers across the nodes, from repeated samples of the nodes'
/// container records.
#[derive(Clone, Debug, Default)]
pub struct Lives {
    by_id: BTreeMap<String, Life>,
}

impl Lives {
    /// One sample of `node`'s records (`skiff-agent container ps -a -o json`), those of
    /// allocations `of` accepts, taken at `sampled_ms`. A container running at an earlier
    /// sample and gone from this one ended at the latest now.
    pub fn sample(
        &mut self,
        node: &str,
        records: &[serde_json::Value],
        of: impl Fn(&str) -> bool,
        sampled_ms: i64,
    ) {
        let mut seen = BTreeSet::new();
        for r in records {
            let alloc = r["labels"]["skiff.alloc"].as_str().unwrap_or_default();
            let (Some(id), Some(start)) = (r["id"].as_str(), r["started_at_ms"].as_i64()) else {
                continue;
            };
            if !of(alloc) {
                continue;
            }
            seen.insert(id.to_owned());
            let live = matches!(r["status"].as_str(), Some("running" | "restarting"));
            let end = if live {
                None
            } else {
                Some(r["exit"]["at_ms"].as_i64().unwrap_or(sampled_ms))
            };
            let life = self.by_id.entry(id.to_owned()).or_insert_with(|| Life {
                node: node.to_owned(),
                alloc: alloc.to_owned(),
                container: id.to_owned(),
                start_ms: start,
                end_ms: end,
            });
            life.start_ms = life.start_ms.min(start);
            if life.end_ms.is_none() {
                life.end_ms = end;
            }
        }
        for life in self.by_id.values_mut() {
            if life.node == node && life.end_ms.is_none() && !seen.contains(&life.container) {
                life.end_ms = Some(sampled_ms);
            }
        }
    }

    /// Every pair of containers on two different nodes whose lives overlap. (On one node the
    /// agent starts a container of an allocation only after removing the one before, and a
    /// container removed between two samples has no end time to order it by.)
    pub fn overlaps(&self) -> Vec<(&Life, &Life)> {
        let lives: Vec<&Life> = self.by_id.values().collect();
        let mut out = Vec::new();
        for (i, a) in lives.iter().enumerate() {
            for b in &lives[i + 1..] {
                if a.node != b.node && a.overlaps(b) {
                    out.push((*a, *b));
                }
            }
        }
        out
    }

    /// The lives, by start.
    pub fn all(&self) -> Vec<&Life> {
        let mut v: Vec<&Life> = self.by_id.values().collect();
        v.sort_by_key(|l| l.start_ms);
        v
    }

    /// The shortest time between one life's end and the next one's start (the fence's slack).
    pub fn min_gap_ms(&self) -> Option<i64> {
        let v = self.all();
        v.windows(2)
            .filter_map(|w| Some(w[1].start_ms - w[0].end_ms?))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(
        id: &str,
        alloc: &str,
        status: &str,
        start: i64,
        exit: Option<i64>,
    ) -> serde_json::Value {
        json!({
            "id": id, "status": status, "started_at_ms": start,
            "exit": exit.map(|e| json!({"at_ms": e})),
            "labels": {"skiff.alloc": alloc},
        })
    }

    #[test]
    fn acknowledged_writes_must_be_there_unknown_ones_may_not() {
        let mut h = History::default();
        for (key, outcome) in [
            ("w-1", Outcome::Ok),
            ("w-2", Outcome::Unknown("deadline exceeded".into())),
            ("w-3", Outcome::Ok),
            ("w-4", Outcome::Fail("invalid".into())),
        ] {
            h.record(Op {
                key: key.into(),
                invoked_ms: 0,
                completed_ms: 5,
                outcome,
            });
        }
        let present: BTreeSet<String> = ["w-1".to_owned()].into();
        let lost: Vec<&str> = h.lost(&present).iter().map(|o| o.key.as_str()).collect();
        assert_eq!(lost, ["w-3"]);
        assert_eq!(
            h.summary(),
            "4 writes invoked: 2 ok, 1 failed, 1 unknown; slowest ok 5 ms"
        );
    }

    #[test]
    fn lives_overlap_only_when_two_run_at_once() {
        let mut l = Lives::default();
        let all = |_: &str| true;
        l.sample("a1", &[record("c1", "A", "running", 100, None)], all, 150);
        l.sample(
            "a1",
            &[record("c1", "A", "exited", 100, Some(300))],
            all,
            350,
        );
        l.sample("a2", &[record("c2", "B", "running", 400, None)], all, 450);
        assert!(l.overlaps().is_empty());
        assert_eq!(l.min_gap_ms(), Some(100));
        // A container that vanished from its node's records ended by then.
        l.sample("a2", &[], all, 600);
        l.sample("a3", &[record("c3", "C", "running", 590, None)], all, 650);
        let o = l.overlaps();
        assert_eq!(o.len(), 1, "c2 (400..600) and c3 (590..): {o:?}");
        // Still running at the end counts as running for ever.
        l.sample("a1", &[record("c4", "A", "running", 700, None)], all, 750);
        assert_eq!(l.overlaps().len(), 2);
        // On one node, a container that vanished and its successor are not compared.
        l.sample("a1", &[record("c5", "A", "running", 760, None)], all, 800);
        assert_eq!(l.overlaps().len(), 3, "c5 overlaps c3 on a3, not c4 on a1");
    }
}
