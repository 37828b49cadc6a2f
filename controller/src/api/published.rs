//! What the controller streams to agents, computed once per applied log entry and shared by
//! every open watch: each node's assignment (its allocations with their tasks), the overlay
//! peers, and the service set. A watch only compares pointers and sends what changed.
//!
//! Tasks are converted from a job version's spec once ever (versions never change), the
//! per-node lists once per entry that may have changed them ([`Touched::published`]: an
//! entry that only records a job without a service, or a pending reason, reuses the last
//! view under its new index); a node whose list is unchanged keeps the same `Arc`.
//!
//! [`Touched::published`]: crate::state::Touched::published

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use skiff_proto::v1 as pb;
use tokio::sync::watch;

use super::convert;
use crate::raft::RaftNode;
use crate::state::{ClusterState, DesiredStatus, NodeStatus};

/// One applied entry's view.
#[derive(Default)]
pub struct Published {
    /// The applied log index it was computed at.
    pub index: u64,
    /// Each node's allocations to run, by node name (nodes with none are absent).
    pub assignments: Arc<HashMap<String, Arc<Vec<pb::AssignedAllocation>>>>,
    /// Every node the overlay should reach: not down, with a key and a subnet. A node's own
    /// entry is left out when its message is built.
    pub peers: Arc<Vec<pb::OverlayPeer>>,
    /// Every service and its endpoints.
    pub services: Arc<Vec<pb::ServiceInfo>>,
    /// How `peers` differs from the view before it, computed once for every watch that
    /// last sent that view's peers (the common case: the watch keeps up).
    pub peers_change: Option<Arc<PeersChange>>,
}

/// The peers added or changed and the nodes gone between two views.
#[derive(Debug, PartialEq)]
pub struct PeersChange {
    /// The peers before.
    pub from: Arc<Vec<pb::OverlayPeer>>,
    pub changed: Vec<pb::OverlayPeer>,
    pub removed: Vec<String>,
}

impl Published {
    /// The same view under a later index.
    fn at(&self, index: u64) -> Published {
        Published {
            index,
            assignments: self.assignments.clone(),
            peers: self.peers.clone(),
            services: self.services.clone(),
            peers_change: self.peers_change.clone(),
        }
    }

    /// The message for `node`'s watch, its peers as a delta from `sent` (what the stream's
    /// previous message left the node with, its own entry included or not).
    pub fn assignment_delta_for(
        &self,
        node: &str,
        sent: &Arc<Vec<pb::OverlayPeer>>,
    ) -> pb::AssignedAllocations {
        let (peers, peers_removed) = match &self.peers_change {
            // Unchanged since the watch's last message (only its allocations changed).
            _ if Arc::ptr_eq(sent, &self.peers) => (Vec::new(), Vec::new()),
            // The watch sent the view just before this one: the change computed once.
            Some(c) if Arc::ptr_eq(&c.from, sent) => (
                c.changed
                    .iter()
                    .filter(|p| p.node != node)
                    .cloned()
                    .collect(),
                c.removed.iter().filter(|n| *n != node).cloned().collect(),
            ),
            _ => peers_delta(node, sent, &self.peers),
        };
        pb::AssignedAllocations {
            allocations: self.allocations_of(node),
            index: self.index,
            peers,
            peers_delta: true,
            peers_removed,
        }
    }

    fn allocations_of(&self, node: &str) -> Vec<pb::AssignedAllocation> {
        self.assignments
            .get(node)
            .map(|a| a.as_ref().clone())
            .unwrap_or_default()
    }

    /// The message for `node`'s watch.
    pub fn assignment_for(&self, node: &str) -> pb::AssignedAllocations {
        pb::AssignedAllocations {
            allocations: self.allocations_of(node),
            index: self.index,
            peers: self
                .peers
                .iter()
                .filter(|p| p.node != node)
                .cloned()
                .collect(),
            peers_delta: false,
            peers_removed: Vec::new(),
        }
    }
}

/// From `sent` to `current`, for `node` (whose own entry is never sent): the peers added or
/// changed, and the names of those gone.
pub fn peers_delta(
    node: &str,
    sent: &[pb::OverlayPeer],
    current: &[pb::OverlayPeer],
) -> (Vec<pb::OverlayPeer>, Vec<String>) {
    let before: HashMap<&str, &pb::OverlayPeer> = sent
        .iter()
        .filter(|p| p.node != node)
        .map(|p| (p.node.as_str(), p))
        .collect();
    let now: HashSet<&str> = current.iter().map(|p| p.node.as_str()).collect();
    let changed = current
        .iter()
        .filter(|p| p.node != node && before.get(p.node.as_str()) != Some(p))
        .cloned()
        .collect();
    let mut removed: Vec<String> = before
        .keys()
        .filter(|n| !now.contains(*n))
        .map(|n| (*n).to_owned())
        .collect();
    removed.sort();
    (changed, removed)
}

/// Starts the task that follows the applied index; returns the receiver watches subscribe to.
pub fn spawn(node: RaftNode) -> watch::Receiver<Arc<Published>> {
    let (tx, rx) = watch::channel(Arc::new(Published::default()));
    tokio::spawn(async move {
        let mut applied = node.applied_watch();
        let mut tasks: HashMap<(String, String, u64), pb::Task> = HashMap::new();
        while let Some(index) = applied.changed().await {
            let prev = tx.borrow().clone();
            // Taken before the state is read: an entry applied in between marks it again.
            let dirty = node.take_published_dirty();
            let next = if dirty || prev.index == 0 {
                let snapshot = node.state();
                build(&snapshot.state, index, &prev, &mut tasks)
            } else {
                prev.at(index)
            };
            if tx.send(Arc::new(next)).is_err() {
                return;
            }
        }
    });
    rx
}

fn build(
    state: &ClusterState,
    index: u64,
    prev: &Published,
    tasks: &mut HashMap<(String, String, u64), pb::Task>,
) -> Published {
    let mut by_node: BTreeMap<&str, Vec<pb::AssignedAllocation>> = BTreeMap::new();
    let mut used = HashSet::new();
    for a in state.allocations() {
        if a.desired != DesiredStatus::Run {
            continue;
        }
        let key = (a.namespace.clone(), a.job.clone(), a.job_version);
        used.insert(key.clone());
        let task = match tasks.get(&key) {
            Some(t) => t.clone(),
            None => {
                let Some(v) = state
                    .job(&a.namespace, &a.job)
                    .and_then(|j| j.version(a.job_version))
                else {
                    continue;
                };
                let t = convert::task(&v.spec);
                tasks.insert(key, t.clone());
                t
            }
        };
        by_node
            .entry(a.node.as_str())
            .or_default()
            .push(pb::AssignedAllocation {
                id: a.id.clone(),
                namespace: a.namespace.clone(),
                job: a.job.clone(),
                job_version: a.job_version,
                task: Some(task),
            });
    }
    // Tasks of versions no allocation runs any more are dropped from the cache.
    tasks.retain(|key, _| used.contains(key));
    let assignments: HashMap<String, _> = by_node
        .into_iter()
        .map(|(node, list)| {
            let shared = match prev.assignments.get(node) {
                Some(old) if old.as_ref() == &list => old.clone(),
                _ => Arc::new(list),
            };
            (node.to_owned(), shared)
        })
        .collect();
    let peers: Vec<pb::OverlayPeer> = state
        .nodes()
        .filter(|n| n.status != NodeStatus::Down)
        .filter_map(|n| {
            let wg = n.wireguard.as_ref()?;
            Some(pb::OverlayPeer {
                node: n.name.clone(),
                subnet: n.subnet.clone()?,
                public_key: wg.public_key.clone(),
                endpoint: wg.endpoint.clone(),
            })
        })
        .collect();
    let services = super::services::services(state, None);
    let (peers, peers_change) = if prev.peers.as_ref() == &peers {
        // The same peers: the last change still leads to them.
        (prev.peers.clone(), prev.peers_change.clone())
    } else {
        let (changed, removed) = peers_delta("", &prev.peers, &peers);
        let change = PeersChange {
            from: prev.peers.clone(),
            changed,
            removed,
        };
        (Arc::new(peers), Some(Arc::new(change)))
    };
    Published {
        index,
        assignments: Arc::new(assignments),
        peers,
        peers_change,
        services: if prev.services.as_ref() == &services {
            prev.services.clone()
        } else {
            Arc::new(services)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Allocation, Command, Node, WireguardBackend, WireguardIdentity};

    fn node(name: &str, n: u8) -> Node {
        let mut node = Node::for_test(name);
        node.subnet = Some(format!("10.42.{n}.0/24"));
        node.wireguard = Some(WireguardIdentity {
            public_key: format!("key-{name}"),
            endpoint: format!("198.18.0.{n}:51820"),
            backend: WireguardBackend::Userspace,
        });
        node
    }

    fn alloc(id: &str, node: &str, version: u64) -> Allocation {
        Allocation::new_pending(id, "default", "web", version, node, 1)
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (name, n) in [("n1", 1), ("n2", 2), ("n3", 3)] {
            s.apply(&Command::UpsertNode {
                node: node(name, n),
            })
            .expect("node");
        }
        s.apply(&Command::ApplyJob {
            spec: Box::new(skiff_common::JobSpec::new("web", "reg/web:1")),
            at_ms: 1,
        })
        .expect("job");
        s.apply(&Command::PlaceAllocations {
            allocations: vec![alloc("a1", "n1", 1), alloc("a2", "n2", 1)],
        })
        .expect("place");
        s
    }

    #[test]
    fn each_node_gets_its_allocations_and_every_peer_but_itself() {
        let s = state();
        let mut tasks = HashMap::new();
        let p = build(&s, 7, &Published::default(), &mut tasks);
        let msg = p.assignment_for("n1");
        assert_eq!(msg.index, 7);
        assert_eq!(
            msg.allocations
                .iter()
                .map(|a| a.id.as_str())
                .collect::<Vec<_>>(),
            ["a1"]
        );
        let task = msg.allocations[0].task.as_ref().expect("task");
        assert_eq!(task.containers[0].image, "reg/web:1");
        let peers: Vec<&str> = msg.peers.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(peers, ["n2", "n3"]);
        // A node with nothing to run still learns its peers.
        let n3 = p.assignment_for("n3");
        assert!(n3.allocations.is_empty());
        assert_eq!(n3.peers.len(), 2);
        // The task of a version is converted once and kept while it runs somewhere.
        assert_eq!(tasks.len(), 1);
    }

    #[test]
    fn unchanged_parts_keep_their_arc_and_changes_replace_it() {
        let mut s = state();
        let mut tasks = HashMap::new();
        let first = build(&s, 7, &Published::default(), &mut tasks);
        // A change on n2 only, and n3 goes down (it leaves the peers).
        s.apply(&Command::SetAllocationDesired {
            id: "a2".into(),
            desired: DesiredStatus::Stop,
        })
        .expect("stop a2");
        s.apply(&Command::SetNodeStatus {
            name: "n3".into(),
            status: NodeStatus::Down,
            at_ms: 2,
        })
        .expect("down");
        let second = build(&s, 9, &first, &mut tasks);
        assert!(Arc::ptr_eq(
            &first.assignments["n1"],
            &second.assignments["n1"]
        ));
        assert!(
            !second.assignments.contains_key("n2"),
            "n2 runs nothing now"
        );
        assert!(!Arc::ptr_eq(&first.peers, &second.peers));
        assert_eq!(second.assignment_for("n1").peers.len(), 1);
        // The delta a watch that sent `first` gets: computed once, and equal to the diff.
        for n in ["n1", "n2", "n3"] {
            let msg = second.assignment_delta_for(n, &first.peers);
            assert!(msg.peers_delta);
            let (changed, removed) = peers_delta(n, &first.peers, &second.peers);
            assert_eq!((msg.peers, msg.peers_removed), (changed, removed), "{n}");
        }
        let removed = &second.peers_change.as_ref().expect("a change").removed;
        assert_eq!(removed, &["n3".to_owned()], "n3 went down");
        // A watch further behind gets the diff from what it sent.
        let stale = Arc::new(Vec::new());
        let msg = second.assignment_delta_for("n1", &stale);
        assert_eq!(msg.peers.len(), 1);
        // One that already has these peers gets none.
        let msg = second.assignment_delta_for("n1", &second.peers);
        assert!(msg.peers.is_empty() && msg.peers_removed.is_empty());
        assert!(Arc::ptr_eq(&first.services, &second.services));
        // Stopping every replica of the version drops its task from the cache.
        s.apply(&Command::SetAllocationDesired {
            id: "a1".into(),
            desired: DesiredStatus::Stop,
        })
        .expect("stop a1");
        build(&s, 10, &second, &mut tasks);
        assert!(tasks.is_empty());
    }

    fn peer(node: &str, key: &str) -> pb::OverlayPeer {
        pb::OverlayPeer {
            node: node.into(),
            subnet: format!("10.42.0.0/26#{node}"),
            public_key: key.into(),
            endpoint: format!("198.18.0.1:51820#{node}"),
        }
    }

    /// What the agent does with a delta (agent/src/contract.rs, `PeerSet`), for the check.
    fn fold(
        set: &mut BTreeMap<String, pb::OverlayPeer>,
        (changed, removed): (Vec<pb::OverlayPeer>, Vec<String>),
    ) {
        for n in removed {
            set.remove(&n);
        }
        for p in changed {
            set.insert(p.node.clone(), p);
        }
    }

    #[test]
    fn a_delta_names_what_changed_and_never_the_node_itself() {
        let sent = vec![peer("n1", "k1"), peer("n2", "k2"), peer("n3", "k3")];
        let current = vec![peer("n1", "k1"), peer("n3", "k3b"), peer("n4", "k4")];
        let (changed, removed) = peers_delta("n1", &sent, &current);
        let names: Vec<&str> = changed.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(names, ["n3", "n4"], "a re-keyed node and a new one");
        assert_eq!(removed, ["n2"]);
        // Nothing changed: an empty delta.
        let (changed, removed) = peers_delta("n1", &current, &current);
        assert!(changed.is_empty() && removed.is_empty());
        // The node's own entry neither comes nor goes.
        let (changed, removed) = peers_delta("n4", &sent, &current);
        assert!(changed.iter().all(|p| p.node != "n4"));
        assert!(removed.iter().all(|n| n != "n4"));
    }

    proptest::proptest! {
        /// Folding each delta into the set the first message gave reproduces, after every
        /// message, exactly the whole set a full message would carry.
        #[test]
        fn deltas_fold_back_into_the_whole_set(
            sets in proptest::collection::vec(
                proptest::collection::btree_map("n[0-9]", "k[0-2]", 0..8), 1..12),
        ) {
            let as_peers = |m: &std::collections::BTreeMap<String, String>| -> Vec<pb::OverlayPeer> {
                m.iter().map(|(n, k)| peer(n, k)).collect()
            };
            let me = "n0";
            let mut sent = as_peers(&sets[0]);
            let mut folded: BTreeMap<String, pb::OverlayPeer> = sent
                .iter()
                .filter(|p| p.node != me)
                .map(|p| (p.node.clone(), p.clone()))
                .collect();
            for next in &sets[1..] {
                let current = as_peers(next);
                fold(&mut folded, peers_delta(me, &sent, &current));
                let whole: Vec<pb::OverlayPeer> =
                    current.iter().filter(|p| p.node != me).cloned().collect();
                proptest::prop_assert_eq!(folded.values().cloned().collect::<Vec<_>>(), whole);
                sent = current;
            }
        }
    }
}
