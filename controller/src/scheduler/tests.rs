use std::collections::BTreeMap;

use super::*;
use crate::state::NodeResources;

fn node(name: &str, cpu: f64, memory_mib: u64, labels: &[(&str, &str)]) -> Node {
    Node {
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        resources: NodeResources {
            cpu,
            memory: memory_mib << 20,
            pids: 1000,
        },
        ..Node::for_test(name)
    }
}

fn candidates(nodes: &[Node]) -> Vec<Candidate<'_>> {
    nodes.iter().map(Candidate::new).collect()
}

fn ask(cpu: f64, memory_mib: u64) -> Usage {
    Usage::new(cpu, memory_mib << 20, 10)
}

fn request(count: u32, ask: Usage, constraints: &[Constraint]) -> Request<'_> {
    Request::simple(ask, constraints, Strategy::BinPack, count)
}

#[test]
fn replicas_of_one_job_spread_over_nodes_before_doubling_up() {
    let nodes = [
        node("a", 4.0, 4096, &[]),
        node("b", 4.0, 4096, &[]),
        node("c", 4.0, 4096, &[]),
    ];
    let mut view = candidates(&nodes);
    let plan = place(&mut view, &request(6, ask(0.1, 64), &[]));
    assert_eq!(plan.unplaced, 0);
    let mut per_node = BTreeMap::new();
    for n in &plan.placements {
        *per_node.entry(n.as_str()).or_insert(0) += 1;
    }
    assert_eq!(per_node, BTreeMap::from([("a", 2), ("b", 2), ("c", 2)]));
    // Deterministic: the same input gives the same plan.
    let mut again = candidates(&nodes);
    assert_eq!(place(&mut again, &request(6, ask(0.1, 64), &[])), plan);
}

#[test]
fn bin_pack_fills_the_fullest_node_and_spread_the_emptiest() {
    let nodes = [node("a", 4.0, 4096, &[]), node("b", 4.0, 4096, &[])];
    let mut view = candidates(&nodes);
    view[1].used = ask(2.0, 2048);
    let plan = place(&mut view, &request(1, ask(0.5, 256), &[]));
    assert_eq!(plan.placements, ["b"]);

    let mut view = candidates(&nodes);
    view[1].used = ask(2.0, 2048);
    let mut req = request(1, ask(0.5, 256), &[]);
    req.strategy = Strategy::Spread;
    assert_eq!(place(&mut view, &req).placements, ["a"]);
}

#[test]
fn ties_break_by_node_name() {
    let nodes = [node("b", 2.0, 1024, &[]), node("a", 2.0, 1024, &[])];
    let mut view = candidates(&nodes);
    assert_eq!(
        place(&mut view, &request(1, ask(0.1, 64), &[])).placements,
        ["a"]
    );
}

#[test]
fn constraints_status_and_resources_filter_with_reasons() {
    let mut nodes = vec![
        node("eu-1", 1.0, 512, &[("zone", "eu")]),
        node("eu-2", 1.0, 512, &[("zone", "eu")]),
        node("us-1", 8.0, 8192, &[("zone", "us")]),
        node("eu-3", 8.0, 8192, &[("zone", "eu")]),
        node("eu-4", 8.0, 8192, &[("zone", "eu")]),
    ];
    nodes[3].status = NodeStatus::Draining;
    nodes[4].status = NodeStatus::Down;
    let zone: Constraint = "zone = eu".parse().expect("constraint");
    let constraints = [zone];
    let mut view = candidates(&nodes);
    let plan = place(&mut view, &request(3, ask(0.5, 256), &constraints));
    // eu-1 and eu-2 take one each (anti-affinity), then one more each fits...
    assert_eq!(plan.placements.len(), 3);
    assert!(plan.placements.iter().all(|n| n == "eu-1" || n == "eu-2"));
    assert_eq!(plan.unplaced, 0);

    // ... and a fifth replica has nowhere to go: every node is named with its reason.
    let plan = place(&mut view, &request(2, ask(0.5, 256), &constraints));
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(plan.unplaced, 1);
    let why = plan.rejections.expect("reasons");
    assert_eq!(why.nodes, 5);
    assert_eq!(
        why.reasons,
        BTreeMap::from([
            ("constraint zone = eu".to_owned(), 1),
            ("insufficient cpu".to_owned(), 2),
            ("node down".to_owned(), 1),
            ("node draining".to_owned(), 1),
        ])
    );
    assert_eq!(
        why.to_string(),
        "0/5 nodes fit: 2 insufficient cpu, 1 constraint zone = eu, 1 node down, 1 node draining"
    );
}

#[test]
fn memory_and_pids_are_counted() {
    let nodes = [node("a", 64.0, 1024, &[])];
    let mut view = candidates(&nodes);
    let plan = place(&mut view, &request(5, ask(0.1, 256), &[]));
    assert_eq!((plan.placements.len(), plan.unplaced), (4, 1));
    assert_eq!(
        plan.rejections.expect("why").to_string(),
        "0/1 nodes fit: 1 insufficient memory"
    );
    let mut view = candidates(&nodes);
    let plan = place(&mut view, &request(3, Usage::new(0.1, 1, 400), &[]));
    assert_eq!(plan.unplaced, 1);
    assert_eq!(
        plan.rejections.expect("why").to_string(),
        "0/1 nodes fit: 1 insufficient pids"
    );
}

#[test]
fn no_nodes_is_said_plainly() {
    let plan = place(&mut [], &request(1, ask(0.1, 64), &[]));
    assert_eq!(plan.unplaced, 1);
    assert_eq!(
        plan.rejections.expect("why").to_string(),
        "no nodes registered"
    );
}

#[test]
fn ten_thousand_replicas_on_five_thousand_nodes() {
    let nodes: Vec<Node> = (0..5000)
        .map(|i| node(&format!("n{i:05}"), 4.0, 8192, &[]))
        .collect();
    let mut view = candidates(&nodes);
    let plan = place(&mut view, &request(10_000, ask(0.25, 128), &[]));
    assert_eq!(plan.unplaced, 0);
    // Two per node exactly: anti-affinity first.
    assert!(view.iter().all(|c| c.job_replicas == 2));
}

#[test]
fn a_full_pod_subnet_refuses_more_replicas_with_a_reason() {
    // A /29 addresses 5 containers (8 minus network, broadcast and the gateway).
    let mut small = node("a", 16.0, 16384, &[]);
    small.subnet = Some("10.42.0.0/29".to_owned());
    assert_eq!(small.pod_capacity(), Some(5));
    let nodes = [small];
    let mut view = candidates(&nodes);
    let plan = place(&mut view, &request(7, ask(0.1, 16), &[]));
    assert_eq!(plan.placements.len(), 5);
    assert_eq!(plan.unplaced, 2);
    assert_eq!(
        plan.rejections.expect("reasons").to_string(),
        "0/1 nodes fit: 1 no free pod address (subnet 10.42.0.0/29 full)"
    );
}

#[test]
fn a_host_port_takes_the_node_and_the_reason_names_it() {
    let nodes = [node("a", 4.0, 4096, &[]), node("b", 4.0, 4096, &[])];
    let mut view = candidates(&nodes);
    let ports = [(18080, Protocol::Tcp)];
    let mut req = request(3, ask(0.1, 64), &[]);
    req.ports = &ports;
    let plan = place(&mut view, &req);
    assert_eq!(plan.placements, ["a", "b"], "one per node");
    assert_eq!(plan.unplaced, 1);
    assert_eq!(
        plan.rejections.expect("why").to_string(),
        "0/2 nodes fit: 2 port 18080/tcp in use on the node"
    );
    // The same number over udp is another port.
    let udp = [(18080, Protocol::Udp)];
    req.ports = &udp;
    req.count = 1;
    assert_eq!(place(&mut view, &req).unplaced, 0);
}

#[test]
fn named_volumes_keep_replicas_where_they_live() {
    let mut b = node("b", 4.0, 4096, &[]);
    b.named_volumes.insert("default/db/data".into());
    let nodes = [node("a", 4.0, 4096, &[]), b, node("c", 4.0, 4096, &[])];
    let vols = ["default/db/data".to_owned()];
    let mut view = candidates(&nodes);
    let mut req = request(2, ask(0.1, 64), &[]);
    req.named_volumes = &vols;
    let plan = place(&mut view, &req);
    assert_eq!(plan.placements, ["b", "b"], "both on the volume's node");
    // Where it lives no longer fits: pending, naming the volume.
    let mut view = candidates(&nodes);
    view[1].used = ask(4.0, 4096);
    let plan = place(&mut view, &request(1, ask(0.1, 64), &[]));
    assert_eq!(plan.unplaced, 0, "a job without the volume goes anywhere");
    let mut view = candidates(&nodes);
    view[1].used = ask(4.0, 4096);
    req.count = 1;
    let plan = place(&mut view, &req);
    assert_eq!(plan.unplaced, 1);
    assert_eq!(
        plan.rejections.expect("why").to_string(),
        "0/3 nodes fit: 2 named volume default/db/data lives on another node, 1 insufficient cpu"
    );
    // A volume that lives nowhere yet does not restrict placement.
    let fresh = ["default/new/data".to_owned()];
    let mut view = candidates(&nodes);
    req.named_volumes = &fresh;
    assert_eq!(place(&mut view, &req).placements.len(), 1);
}

#[test]
fn host_volumes_only_on_nodes_that_allow_their_directory() {
    let mut b = node("b", 4.0, 4096, &[]);
    b.host_volume_dirs = vec!["/srv/skiff".into()];
    let nodes = [node("a", 4.0, 4096, &[]), b];
    let mut view = candidates(&nodes);
    let paths = ["/srv/skiff/site".to_owned()];
    let mut req = request(1, ask(0.1, 64), &[]);
    req.host_paths = &paths;
    assert_eq!(place(&mut view, &req).placements, ["b"]);
    // A sibling with the same prefix is not under it.
    let sneaky = ["/srv/skiffy/site".to_owned()];
    req.host_paths = &sneaky;
    let plan = place(&mut candidates(&nodes), &req);
    assert_eq!(plan.unplaced, 1);
    assert!(
        plan.rejections
            .expect("why")
            .to_string()
            .contains("2 host volume /srv/skiffy/site not under the node's --host-volume-dir"),
    );
}

#[test]
fn a_node_under_disk_pressure_gets_nothing_new_and_is_named() {
    let mut pressed = node("n1", 4.0, 4096, &[]);
    pressed.disk_pressure = true;
    let nodes = vec![pressed, node("n2", 1.0, 1024, &[])];
    let mut c = candidates(&nodes);
    let plan = place(&mut c, &request(3, ask(0.5, 256), &[]));
    assert_eq!(plan.placements, vec!["n2".to_owned(), "n2".to_owned()]);
    assert_eq!(plan.unplaced, 1);
    let why = plan.rejections.expect("why").to_string();
    assert!(why.contains("1 node disk pressure"), "{why}");
}

#[test]
fn fenced_jobs_go_only_to_agents_that_fence() {
    // "old" was registered by an agent built before fencing: it lists no capabilities.
    let mut old = node("a-old", 4.0, 4096, &[]);
    old.capabilities.clear();
    let nodes = [old, node("b-new", 4.0, 4096, &[])];
    let needs = [skiff_common::capability::FENCE];
    let mut req = request(2, ask(0.1, 64), &[]);
    req.capabilities = &needs;
    let plan = place(&mut candidates(&nodes), &req);
    assert_eq!(plan.placements, ["b-new", "b-new"]);
    // Without the need, the old node takes its share (it sorts first).
    let plan = place(&mut candidates(&nodes), &request(2, ask(0.1, 64), &[]));
    assert_eq!(plan.placements, ["a-old", "b-new"]);
    // Only old agents: pending, and the reason says why.
    let plan = place(&mut candidates(&nodes[..1]), &req);
    assert_eq!(plan.unplaced, 2);
    let why = plan.rejections.expect("why").to_string();
    assert!(
        why.contains("1 agent without fence support (older than the job needs)"),
        "{why}"
    );
}
