use std::collections::BTreeMap;

use skiff_common::{SpecFormat, parse_job_spec};

use super::*;
use crate::state::{Node, NodeResources};

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
}

impl World {
    fn new(nodes: &[&str]) -> World {
        let mut state = ClusterState::default();
        for n in nodes {
            state
                .apply(&Command::UpsertNode { node: node(n) })
                .expect("node");
        }
        World { state, next: 0 }
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
            plan_job(&self.state, &mut view, &job, &mut id, 2)
        };
        self.next = next;
        if !plan.place.is_empty() {
            self.state
                .apply(&Command::PlaceAllocations {
                    allocations: plan.place.clone(),
                })
                .expect("place");
        }
        if !plan.stop.is_empty() {
            self.state
                .apply(&Command::StopAllocations {
                    ids: plan.stop.clone(),
                    lost: false,
                    at_ms: 3,
                })
                .expect("stop");
        }
        plan
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
    let mut w = World::new(&["n1", "n2"]);
    w.apply(spec(2, "img:1"));
    w.reconcile();
    w.apply(spec(2, "img:2"));
    let plan = w.reconcile();
    assert_eq!((plan.place.len(), plan.stop.len()), (2, 2));
    assert!(
        w.state
            .allocations()
            .filter(|a| holds(a))
            .all(|a| a.job_version == 2)
    );
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
