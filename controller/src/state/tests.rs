use skiff_common::{SpecFormat, parse_job_spec};

use super::*;

fn spec(toml: &str) -> JobSpec {
    parse_job_spec(toml, SpecFormat::Toml).expect("valid spec")
}

fn web(replicas: u32) -> Box<JobSpec> {
    Box::new(spec(&format!(
        "name = \"web\"\nreplicas = {replicas}\nimage = \"127.0.0.1:5000/demo/web:1.0\"\n"
    )))
}

fn node(name: &str) -> Node {
    Node::for_test(name)
}

fn alloc(id: &str, node: &str, version: u64) -> Allocation {
    Allocation::new_pending(id, "default", "web", version, node, 5)
}

#[test]
fn apply_creates_then_versions_and_unchanged_is_a_no_op() {
    let mut s = ClusterState::default();
    let r = s
        .apply(&Command::ApplyJob {
            spec: web(1),
            at_ms: 10,
        })
        .expect("apply");
    let Outcome::JobApplied {
        job,
        created,
        changed,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert!(created && changed);
    assert_eq!(job.version, 1);

    let before = s.clone();
    let r = s
        .apply(&Command::ApplyJob {
            spec: web(1),
            at_ms: 20,
        })
        .expect("apply");
    let Outcome::JobApplied {
        job,
        created,
        changed,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert!(!created && !changed);
    assert_eq!(job.version, 1);
    assert_eq!(s, before, "an unchanged spec changes nothing");

    let r = s
        .apply(&Command::ApplyJob {
            spec: web(3),
            at_ms: 30,
        })
        .expect("apply");
    let Outcome::JobApplied {
        job,
        changed,
        changes,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert!(changed);
    assert_eq!(job.version, 2);
    assert_eq!(job.submitted_at_ms, 30);
    assert!(changes.iter().any(|c| c.path == "replicas"), "{changes:?}");
    let j = s.job("default", "web").expect("job");
    assert_eq!(j.versions().len(), 2, "every version is kept");
    assert_eq!(j.version(1).expect("v1").spec.replicas, 1);
}

#[test]
fn stop_keeps_versions_and_reapply_restarts() {
    let mut s = ClusterState::default();
    s.apply(&Command::ApplyJob {
        spec: web(2),
        at_ms: 1,
    })
    .expect("apply");
    s.apply(&Command::UpsertNode { node: node("n1") })
        .expect("node");
    s.apply(&Command::PlaceAllocations {
        allocations: vec![alloc("a1", "n1", 1)],
    })
    .expect("place");
    let stop = Command::StopJob {
        namespace: "default".into(),
        name: "web".into(),
        at_ms: 2,
    };
    let r = s.apply(&stop).expect("stop");
    assert!(matches!(r, Outcome::JobStopped { changed: true, .. }));
    assert_eq!(
        s.job("default", "web").expect("job").status,
        JobStatus::Stopped
    );
    assert!(s.allocations().all(|a| a.desired == DesiredStatus::Stop));
    let r = s.apply(&stop).expect("stop twice");
    assert!(matches!(r, Outcome::JobStopped { changed: false, .. }));

    // Re-applying the same spec to a stopped job runs it again as a new version.
    let r = s
        .apply(&Command::ApplyJob {
            spec: web(2),
            at_ms: 3,
        })
        .expect("apply");
    let Outcome::JobApplied { job, changed, .. } = r else {
        panic!("{r:?}")
    };
    assert!(changed);
    assert_eq!(job.version, 2);
    assert_eq!(job.status, JobStatus::Running);
}

#[test]
fn errors_change_nothing() {
    let mut s = ClusterState::default();
    s.apply(&Command::ApplyJob {
        spec: web(1),
        at_ms: 1,
    })
    .expect("apply");
    s.apply(&Command::UpsertNode { node: node("n1") })
        .expect("node");
    let before = s.clone();
    let err = s
        .apply(&Command::StopJob {
            namespace: "default".into(),
            name: "nope".into(),
            at_ms: 2,
        })
        .expect_err("missing job");
    assert_eq!(err.to_string(), "job default/nope not found");
    // One bad allocation in a batch: none of the batch is placed.
    let err = s
        .apply(&Command::PlaceAllocations {
            allocations: vec![alloc("a1", "n1", 1), alloc("a2", "ghost", 1)],
        })
        .expect_err("unknown node");
    assert!(matches!(err, ApplyError::NodeNotFound { .. }));
    let err = s
        .apply(&Command::PlaceAllocations {
            allocations: vec![alloc("a1", "n1", 1), alloc("a1", "n1", 1)],
        })
        .expect_err("duplicate");
    assert!(matches!(err, ApplyError::AllocationExists { .. }));
    let err = s
        .apply(&Command::PlaceAllocations {
            allocations: vec![alloc("a3", "n1", 7)],
        })
        .expect_err("unknown version");
    assert!(matches!(err, ApplyError::UnknownJobVersion { .. }));
    let err = s
        .apply(&Command::ReportAllocation {
            id: "zz".into(),
            status: AllocationStatus::Running,
            at_ms: 3,
        })
        .expect_err("unknown alloc");
    assert!(matches!(err, ApplyError::AllocationNotFound { .. }));
    assert_eq!(s, before);
}

#[test]
fn allocation_lifecycle_counts_restarts() {
    let mut s = ClusterState::default();
    s.apply(&Command::ApplyJob {
        spec: web(1),
        at_ms: 1,
    })
    .expect("apply");
    s.apply(&Command::UpsertNode { node: node("n1") })
        .expect("node");
    s.apply(&Command::PlaceAllocations {
        allocations: vec![alloc("a1", "n1", 1)],
    })
    .expect("place");
    for status in [
        AllocationStatus::Running,
        AllocationStatus::Exited { code: 1 },
        AllocationStatus::Running,
    ] {
        s.apply(&Command::ReportAllocation {
            id: "a1".into(),
            status,
            at_ms: 9,
        })
        .expect("report");
    }
    let a = s.allocations().next().expect("alloc");
    assert_eq!(a.restarts, 1);
    assert_eq!(a.observed, AllocationStatus::Running);
    s.apply(&Command::SetNodeStatus {
        name: "n1".into(),
        status: NodeStatus::Draining,
        at_ms: 10,
    })
    .expect("drain");
    assert_eq!(s.nodes().next().expect("node").status, NodeStatus::Draining);
}

#[test]
fn apply_is_deterministic_and_survives_serialization() {
    let commands = vec![
        Command::ApplyJob {
            spec: web(1),
            at_ms: 1,
        },
        Command::UpsertNode { node: node("n1") },
        Command::PlaceAllocations {
            allocations: vec![alloc("a1", "n1", 1)],
        },
        Command::ApplyJob {
            spec: web(4),
            at_ms: 2,
        },
        Command::StopJob {
            namespace: "default".into(),
            name: "web".into(),
            at_ms: 3,
        },
        Command::StopJob {
            namespace: "x".into(),
            name: "y".into(),
            at_ms: 4,
        },
    ];
    let run = |cmds: &[Command]| {
        let mut s = ClusterState::default();
        let results: Vec<_> = cmds.iter().map(|c| s.apply(c)).collect();
        (s, results)
    };
    let (a, ra) = run(&commands);
    // Commands as they travel in the log: through JSON.
    let wire: Vec<Command> = commands
        .iter()
        .map(|c| serde_json::from_str(&serde_json::to_string(c).expect("ser")).expect("de"))
        .collect();
    let (b, rb) = run(&wire);
    assert_eq!(a, b);
    assert_eq!(ra, rb);
    let snap: ClusterState =
        serde_json::from_str(&serde_json::to_string(&a).expect("ser")).expect("de");
    assert_eq!(snap, a, "a snapshot round-trips");
}

#[test]
fn registration_gives_each_node_a_subnet_for_good() {
    let mut s = ClusterState::default();
    let register = |s: &mut ClusterState, name: &str, cidr: &str| {
        s.apply(&Command::RegisterNode {
            node: node(name),
            cluster_cidr: cidr.into(),
            subnet_prefix: 24,
        })
    };
    register(&mut s, "n1", "10.42.0.0/23").expect("n1");
    register(&mut s, "n2", "10.42.0.0/23").expect("n2");
    let subnet = |s: &ClusterState, n: &str| s.node(n).and_then(|n| n.subnet.clone());
    assert_eq!(subnet(&s, "n1").as_deref(), Some("10.42.0.0/24"));
    assert_eq!(subnet(&s, "n2").as_deref(), Some("10.42.1.0/24"));
    // Registering again keeps it, even if the CIDR changed meanwhile.
    register(&mut s, "n1", "10.99.0.0/16").expect("again");
    assert_eq!(subnet(&s, "n1").as_deref(), Some("10.42.0.0/24"));
    // Full: a clear error, nothing changed.
    let before = s.clone();
    let err = register(&mut s, "n3", "10.42.0.0/23").expect_err("full");
    assert_eq!(
        err.to_string(),
        "cluster CIDR 10.42.0.0/23 has no free /24 left for node n3"
    );
    assert_eq!(s, before);
    let err = register(&mut s, "n3", "10.42.0.1/16").expect_err("host bits");
    assert!(matches!(err, ApplyError::BadCidr { .. }), "{err}");
}

#[test]
fn only_a_down_node_is_removed_and_its_subnet_is_free_again() {
    let mut s = ClusterState::default();
    let register = |s: &mut ClusterState, name: &str| {
        s.apply(&Command::RegisterNode {
            node: node(name),
            cluster_cidr: "10.42.0.0/23".into(),
            subnet_prefix: 24,
        })
    };
    register(&mut s, "n1").expect("n1");
    register(&mut s, "n2").expect("n2");
    s.apply(&Command::ApplyJob {
        spec: web(2),
        at_ms: 10,
    })
    .expect("job");
    s.apply(&Command::PlaceAllocations {
        allocations: vec![alloc("a1", "n1", 1), alloc("a2", "n2", 1)],
    })
    .expect("place");
    let remove = |s: &mut ClusterState, name: &str| {
        s.apply(&Command::RemoveNode {
            name: name.into(),
            at_ms: 20,
        })
    };

    // Unknown, ready or draining: refused, nothing changed.
    let before = s.clone();
    let err = remove(&mut s, "ghost").expect_err("unknown");
    assert!(matches!(err, ApplyError::NodeNotFound { .. }), "{err}");
    let err = remove(&mut s, "n1").expect_err("ready");
    assert!(
        err.to_string()
            .starts_with("node n1 is ready: only a down node can be removed"),
        "{err}"
    );
    assert_eq!(s, before);
    s.apply(&Command::SetNodeStatus {
        name: "n1".into(),
        status: NodeStatus::Draining,
        at_ms: 11,
    })
    .expect("drain");
    let err = remove(&mut s, "n1").expect_err("draining");
    assert!(matches!(err, ApplyError::NodeNotDown { .. }), "{err}");
    s.apply(&Command::SetNodeStatus {
        name: "n1".into(),
        status: NodeStatus::Ready,
        at_ms: 12,
    })
    .expect("undrain");

    // Down (before the reconciler marked its allocation lost): removed, the allocation lost
    // and stopped, the subnet released and handed to the next node.
    s.apply(&Command::SetNodeStatus {
        name: "n1".into(),
        status: NodeStatus::Down,
        at_ms: 13,
    })
    .expect("down");
    let r = remove(&mut s, "n1").expect("remove");
    assert_eq!(
        r,
        Outcome::NodeRemoved {
            name: "n1".into(),
            subnet: Some("10.42.0.0/24".into()),
            lost: 1,
        }
    );
    assert!(s.node("n1").is_none());
    let a1 = s.allocation("a1").expect("kept in the history");
    assert_eq!(
        (a1.desired, &a1.observed),
        (DesiredStatus::Stop, &AllocationStatus::Lost)
    );
    assert_eq!(
        s.allocation("a2").map(|a| a.desired),
        Some(DesiredStatus::Run)
    );
    register(&mut s, "n3").expect("n3 takes the freed subnet");
    assert_eq!(
        s.node("n3").and_then(|n| n.subnet.clone()).as_deref(),
        Some("10.42.0.0/24")
    );
    // Removing again: not found.
    let err = remove(&mut s, "n1").expect_err("gone");
    assert!(matches!(err, ApplyError::NodeNotFound { .. }), "{err}");
}

#[test]
fn cluster_settings_are_fixed_once_and_win_over_registrations() {
    let mut s = ClusterState::default();
    assert_eq!(s.settings(), None);
    let settings = ClusterSettings {
        cluster_cidr: "10.50.0.0/16".into(),
        node_subnet_prefix: 26,
        service_cidr: "10.43.0.0/16".into(),
    };
    assert_eq!(
        s.apply(&Command::InitCluster {
            settings: settings.clone()
        }),
        Ok(Outcome::ClusterInitialized { changed: true })
    );
    // The same again: nothing changes. Others: refused, naming both, state unchanged.
    assert_eq!(
        s.apply(&Command::InitCluster {
            settings: settings.clone()
        }),
        Ok(Outcome::ClusterInitialized { changed: false })
    );
    let before = s.clone();
    let other = ClusterSettings {
        cluster_cidr: "10.60.0.0/16".into(),
        node_subnet_prefix: 24,
        service_cidr: "10.43.0.0/16".into(),
    };
    let e = s
        .apply(&Command::InitCluster { settings: other })
        .expect_err("conflict");
    assert_eq!(
        e.to_string(),
        "the cluster was bootstrapped with cluster-cidr 10.50.0.0/16, node-subnet-prefix 26, \
         service-cidr 10.43.0.0/16, not cluster-cidr 10.60.0.0/16, node-subnet-prefix 24, \
         service-cidr 10.43.0.0/16"
    );
    assert_eq!(s, before);
    // A registration carrying other values (a member with other flags) gets the cluster's.
    s.apply(&Command::RegisterNode {
        node: node("n1"),
        cluster_cidr: "10.99.0.0/16".into(),
        subnet_prefix: 24,
    })
    .expect("register");
    assert_eq!(
        s.node("n1").and_then(|n| n.subnet.clone()).as_deref(),
        Some("10.50.0.0/26")
    );
    // Kept through a snapshot.
    let back: ClusterState =
        serde_json::from_str(&serde_json::to_string(&s).expect("serialize")).expect("parse");
    assert_eq!(back.settings(), Some(&settings));
    // A bad network is refused before anything is set.
    let mut fresh = ClusterState::default();
    assert!(
        fresh
            .apply(&Command::InitCluster {
                settings: ClusterSettings {
                    cluster_cidr: "10.50.0.1/16".into(),
                    node_subnet_prefix: 24,
                    service_cidr: "10.43.0.0/16".into(),
                }
            })
            .is_err()
    );
    assert_eq!(fresh.settings(), None);
}

fn service_spec(name: &str, service: Option<&str>) -> JobSpec {
    let svc = match service {
        Some(s) => format!("[service]\nname = \"{s}\"\nport = \"http\"\n"),
        None => String::new(),
    };
    skiff_common::parse_job_spec(
        &format!(
            "name = \"{name}\"\nimage = \"reg/web:1\"\n[[ports]]\nname = \"http\"\nport = 8080\n{svc}"
        ),
        skiff_common::SpecFormat::Toml,
    )
    .expect("spec")
}

#[test]
fn services_get_virtual_ips_kept_while_published_and_unique_names() {
    let mut s = ClusterState::default();
    let apply = |s: &mut ClusterState, spec: JobSpec| {
        s.apply(&Command::ApplyJob {
            spec: Box::new(spec),
            at_ms: 1,
        })
    };
    apply(&mut s, service_spec("web", Some("web"))).expect("web");
    apply(&mut s, service_spec("api", Some("api"))).expect("api");
    apply(&mut s, service_spec("batch", None)).expect("batch");
    let web = s.vip("default", "web").expect("web vip");
    assert_eq!(web.to_string(), "10.43.0.1");
    assert_eq!(
        s.vip("default", "api").map(|i| i.to_string()).as_deref(),
        Some("10.43.0.2")
    );
    assert_eq!(s.vip("default", "batch"), None);
    // A new version keeps the address.
    let mut v2 = service_spec("web", Some("web"));
    v2.replicas = 3;
    apply(&mut s, v2).expect("v2");
    assert_eq!(s.vip("default", "web"), Some(web));
    // Another job may not publish the same name: refused, nothing changed.
    let before = s.clone();
    let e = apply(&mut s, service_spec("web2", Some("web"))).expect_err("taken");
    assert!(
        e.to_string().contains("already published by job web"),
        "{e}"
    );
    assert_eq!(s, before);
    // A client in the mesh (no service) claims its own name as its identity: a service of
    // that name elsewhere is refused, both ways round.
    let mut client = service_spec("client", None);
    client.mesh = Some(skiff_common::Mesh::default());
    apply(&mut s, client).expect("mesh client");
    let before = s.clone();
    let e = apply(&mut s, service_spec("other", Some("client"))).expect_err("identity taken");
    assert!(e.to_string().contains("mesh identity"), "{e}");
    let mut second = service_spec("web", None);
    second.name = "web3".into();
    second.mesh = Some(skiff_common::Mesh::default());
    second.service = None;
    let mut clash = second.clone();
    clash.name = "api".into();
    apply(&mut s, second).expect("another client, another name");
    assert_ne!(s, before);
    let mut s2 = s.clone();
    // A new version of job api itself may join the mesh (same job, same name).
    apply(&mut s2, clash).expect("same job");
    let mut third = service_spec("x", Some("web3"));
    third.name = "x".into();
    let e = apply(&mut s, third).expect_err("web3 is a mesh identity");
    assert!(e.to_string().contains("job web3"), "{e}");
    // Renaming the service frees the old name's address; the new name gets a fresh one (not
    // the old one: clients that cached the old name must not reach another service).
    apply(&mut s, service_spec("web", Some("www"))).expect("rename");
    assert_eq!(s.vip("default", "web"), None);
    assert_eq!(
        s.vip("default", "www").map(|i| i.to_string()).as_deref(),
        Some("10.43.0.3")
    );
    // Stopping frees it; a later job may then take the name.
    s.apply(&Command::StopJob {
        namespace: "default".into(),
        name: "api".into(),
        at_ms: 2,
    })
    .expect("stop");
    assert_eq!(s.vip("default", "api"), None);
    apply(&mut s, service_spec("api2", Some("api"))).expect("api2 takes the name");
    assert!(s.vip("default", "api").is_some());
    // Kept through a snapshot; a snapshot from before virtual IPs reads as none.
    let back: ClusterState =
        serde_json::from_str(&serde_json::to_string(&s).expect("serialize")).expect("parse");
    assert_eq!(back, s);
}

#[test]
fn a_full_service_cidr_refuses_the_job_and_changes_nothing() {
    let mut s = ClusterState::default();
    s.apply(&Command::InitCluster {
        settings: ClusterSettings {
            cluster_cidr: "10.50.0.0/16".into(),
            node_subnet_prefix: 24,
            service_cidr: "10.51.0.0/30".into(),
        },
    })
    .expect_err("a /30 is below the smallest service CIDR");
    s.apply(&Command::InitCluster {
        settings: ClusterSettings {
            cluster_cidr: "10.50.0.0/16".into(),
            node_subnet_prefix: 24,
            service_cidr: "10.50.128.0/24".into(),
        },
    })
    .expect_err("overlaps the cluster CIDR");
    s.apply(&Command::InitCluster {
        settings: ClusterSettings {
            cluster_cidr: "10.50.0.0/16".into(),
            node_subnet_prefix: 24,
            service_cidr: "10.51.0.0/28".into(),
        },
    })
    .expect("init");
    for i in 0..14 {
        let name = format!("s{i}");
        s.apply(&Command::ApplyJob {
            spec: Box::new(service_spec(&name, Some(&name))),
            at_ms: 1,
        })
        .expect("fits");
    }
    let before = s.clone();
    let e = s
        .apply(&Command::ApplyJob {
            spec: Box::new(service_spec("s14", Some("s14"))),
            at_ms: 1,
        })
        .expect_err("full");
    assert_eq!(
        e.to_string(),
        "service CIDR 10.51.0.0/28 has no free address left for service s14"
    );
    assert_eq!(s, before);
}

#[test]
fn what_commands_change_is_recorded_as_events_bounded_and_numbered() {
    let mut s = ClusterState::default();
    s.apply(&Command::ApplyJob {
        spec: web(1),
        at_ms: 1,
    })
    .expect("apply");
    s.apply(&Command::UpsertNode { node: node("n1") })
        .expect("node");
    s.apply(&Command::PlaceAllocations {
        allocations: vec![alloc("a1", "n1", 1)],
    })
    .expect("place");
    let report = |restarts: u32, reason: &str, oom_kills: u64| AllocationReport {
        id: "a1".into(),
        status: AllocationStatus::Running,
        restarts,
        ip: None,
        health: None,
        health_output: String::new(),
        log_dropped_bytes: 0,
        log_error: String::new(),
        oom_kills,
        containers: Some(vec![ContainerStatus {
            name: "web".into(),
            lifecycle: skiff_common::spec::Lifecycle::Main,
            state: ContainerState::Running,
            exit_code: None,
            restarts,
            reason: reason.into(),
        }]),
    };
    s.apply(&Command::ReportAllocations {
        reports: vec![report(0, "", 0)],
        at_ms: 20,
    })
    .expect("running");
    // The same report again records nothing.
    let before = s.last_event();
    s.apply(&Command::ReportAllocations {
        reports: vec![report(0, "", 0)],
        at_ms: 21,
    })
    .expect("same");
    assert_eq!(s.last_event(), before);
    s.apply(&Command::ReportAllocations {
        reports: vec![report(1, "restarted after oom-killed", 1)],
        at_ms: 30,
    })
    .expect("oom");
    s.apply(&Command::SetNodeStatus {
        name: "n1".into(),
        status: NodeStatus::Down,
        at_ms: 40,
    })
    .expect("down");
    let got: Vec<(u64, i64, &str, &str)> = s
        .events()
        .map(|e| (e.seq, e.at_ms, e.kind.as_str(), e.alloc.as_str()))
        .collect();
    assert_eq!(
        got[..6],
        [
            (1, 1, "job_applied", ""),
            (2, 1, "node_registered", ""),
            (3, 5, "placed", "a1"),
            (4, 20, "started", "a1"),
            (5, 30, "oom_killed", "a1"),
            (6, 30, "restarted", "a1"),
        ],
        "{got:?}"
    );
    let down = s.events().find(|e| e.kind == "node_status").expect("down");
    assert_eq!((down.node.as_str(), down.message.as_str()), ("n1", "down"));
    assert_eq!(s.last_event(), got.last().expect("events").0);
    // Disk pressure comes and goes with an event each time; the same report again, none.
    for (pressure, at_ms) in [(true, 50), (true, 51), (false, 60)] {
        s.apply(&Command::SetNodeDiskPressure {
            name: "n1".into(),
            pressure,
            at_ms,
        })
        .expect("pressure");
    }
    let pressure: Vec<(i64, &str)> = s
        .events()
        .filter(|e| e.kind == "node_disk_pressure" && e.node == "n1")
        .map(|e| (e.at_ms, e.message.as_str()))
        .collect();
    assert_eq!(
        pressure,
        [
            (50, "disk pressure: nothing new is placed on the node"),
            (60, "disk pressure gone")
        ]
    );
    // Bounded: the oldest go, numbers keep increasing.
    for i in 0..events::MAX_EVENTS as i64 {
        s.apply(&Command::SetNodeStatus {
            name: "n1".into(),
            status: if i % 2 == 0 {
                NodeStatus::Ready
            } else {
                NodeStatus::Down
            },
            at_ms: 50 + i,
        })
        .expect("flap");
    }
    assert_eq!(s.events().count(), events::MAX_EVENTS);
    let first = s.events().next().expect("first").seq;
    assert!(first > 6);
    assert_eq!(s.last_event(), first + events::MAX_EVENTS as u64 - 1);
    // They survive a snapshot.
    let back: ClusterState =
        serde_json::from_str(&serde_json::to_string(&s).expect("ser")).expect("de");
    assert_eq!(back, s);
}

#[test]
fn events_are_numbered_by_log_index_so_members_agree_after_an_upgrade() {
    let entries = [
        Command::ApplyJob {
            spec: web(1),
            at_ms: 1,
        },
        Command::UpsertNode { node: node("n1") },
        Command::PlaceAllocations {
            allocations: vec![alloc("a1", "n1", 1)],
        },
        Command::ReportAllocation {
            id: "a1".into(),
            status: AllocationStatus::Running,
            at_ms: 9,
        },
        Command::SetNodeStatus {
            name: "n1".into(),
            status: NodeStatus::Draining,
            at_ms: 10,
        },
    ];
    let mut a = ClusterState::default();
    let mut b = ClusterState::default();
    for (i, c) in entries.iter().enumerate() {
        let index = i as u64 + 1;
        a.apply_entry(Some(index), c).expect("a");
        b.apply_entry(Some(index), c).expect("b");
        if index == 2 {
            // `b` restarts from a snapshot taken before it kept events.
            b.events.clear();
            b.next_event = 0;
            b.clock_ms = 0;
        }
    }
    let tail = |s: &ClusterState| -> Vec<(u64, String)> {
        s.events()
            .filter(|e| e.seq >= 3 << events::SEQ_SHIFT)
            .map(|e| (e.seq, e.kind.clone()))
            .collect()
    };
    assert_eq!(
        tail(&a),
        [
            (3 << events::SEQ_SHIFT, "placed".to_owned()),
            (4 << events::SEQ_SHIFT, "started".to_owned()),
            (5 << events::SEQ_SHIFT, "node_status".to_owned()),
        ]
    );
    assert_eq!(tail(&a), tail(&b));
    assert_eq!(a.last_event(), b.last_event());
}

#[test]
fn allocations_by_job_survive_a_snapshot_and_follow_placements() {
    let mut s = ClusterState::default();
    s.apply(&Command::ApplyJob {
        spec: web(2),
        at_ms: 1,
    })
    .expect("apply");
    s.apply(&Command::ApplyJob {
        spec: Box::new(spec(
            "name = \"db\"\nreplicas = 1\nimage = \"127.0.0.1:5000/demo/db:1.0\"\n",
        )),
        at_ms: 1,
    })
    .expect("apply");
    s.apply(&Command::UpsertNode { node: node("n1") })
        .expect("node");
    let ids = |s: &ClusterState, job: &str| -> Vec<String> {
        s.job_allocations("default", job)
            .map(|a| a.id.clone())
            .collect()
    };
    // Placed before the index is first used, then after.
    s.apply(&Command::PlaceAllocations {
        allocations: vec![alloc("b2", "n1", 1)],
    })
    .expect("place");
    assert_eq!(ids(&s, "web"), ["b2"]);
    s.apply(&Command::PlaceAllocations {
        allocations: vec![
            alloc("a1", "n1", 1),
            Allocation::new_pending("d1", "default", "db", 1, "n1", 5),
        ],
    })
    .expect("place");
    assert_eq!(
        ids(&s, "web"),
        ["a1", "b2"],
        "ordered by id, like the full scan"
    );
    assert_eq!(ids(&s, "db"), ["d1"]);
    assert!(ids(&s, "none").is_empty());
    // A snapshot carries no index: it is rebuilt from the allocations.
    let snap: ClusterState =
        serde_json::from_str(&serde_json::to_string(&s).expect("ser")).expect("de");
    assert_eq!(ids(&snap, "web"), ["a1", "b2"]);
    assert_eq!(ids(&snap, "db"), ["d1"]);
    // A clone taken before a placement does not see it; the original does.
    let before = s.clone();
    s.apply(&Command::PlaceAllocations {
        allocations: vec![alloc("c3", "n1", 1)],
    })
    .expect("place");
    assert_eq!(ids(&s, "web"), ["a1", "b2", "c3"]);
    assert_eq!(ids(&before, "web"), ["a1", "b2"]);
    // By node as by job, against the full scan.
    s.apply(&Command::UpsertNode { node: node("n2") })
        .expect("node");
    s.apply(&Command::PlaceAllocations {
        allocations: vec![alloc("e4", "n2", 1)],
    })
    .expect("place");
    for st in [&s, &snap, &before] {
        for n in ["n1", "n2", "n3"] {
            let indexed: Vec<&str> = st.node_allocations(n).map(|a| a.id.as_str()).collect();
            let scanned: Vec<&str> = st
                .allocations()
                .filter(|a| a.node == n)
                .map(|a| a.id.as_str())
                .collect();
            assert_eq!(indexed, scanned, "{n}");
        }
    }
    assert_eq!(
        s.node_allocations("n2")
            .map(|a| a.id.as_str())
            .collect::<Vec<_>>(),
        ["e4"]
    );
}

#[test]
fn applying_names_the_jobs_touched_and_whether_resources_were_freed() {
    let mut s = ClusterState::default();
    let apply = |s: &mut ClusterState, c: Command| {
        let mut t = Touched::default();
        s.apply_touching(None, &c, &mut t).expect("apply");
        t
    };
    let t = apply(
        &mut s,
        Command::ApplyJob {
            spec: web(1),
            at_ms: 1,
        },
    );
    assert_eq!(t.jobs.iter().collect::<Vec<_>>(), ["default/web"]);
    assert!(!t.capacity && !t.all);
    assert!(
        !t.published,
        "a job without a service and no allocations: agents see nothing"
    );
    let t = apply(
        &mut s,
        Command::SetJobPending {
            namespace: "default".into(),
            name: "web".into(),
            pending: Some("no nodes".into()),
        },
    );
    assert!(!t.published);
    let t = apply(
        &mut s,
        Command::ApplyJob {
            spec: Box::new(service_spec("api", Some("api"))),
            at_ms: 1,
        },
    );
    assert!(t.published, "a new service is streamed to agents");
    let t = apply(&mut s, Command::UpsertNode { node: node("n1") });
    assert!(t.jobs.is_empty() && t.capacity, "a node changed: {t:?}");
    assert!(t.published, "a node changed: the overlay peers may have");
    let t = apply(
        &mut s,
        Command::PlaceAllocations {
            allocations: vec![alloc("a1", "n1", 1)],
        },
    );
    assert_eq!(t.jobs.iter().collect::<Vec<_>>(), ["default/web"]);
    assert!(!t.capacity, "placing frees nothing");
    assert!(t.published, "a placement is an assignment");
    let t = apply(
        &mut s,
        Command::ReportAllocation {
            id: "a1".into(),
            status: AllocationStatus::Running,
            at_ms: 2,
        },
    );
    assert_eq!(t.jobs.iter().collect::<Vec<_>>(), ["default/web"]);
    assert!(!t.capacity);
    let t = apply(
        &mut s,
        Command::StopAllocations {
            ids: vec!["a1".into()],
            lost: false,
            at_ms: 3,
        },
    );
    assert_eq!(t.jobs.iter().collect::<Vec<_>>(), ["default/web"]);
    assert!(
        t.capacity,
        "a stopped allocation frees its node's resources"
    );
    // A refused command touches nothing.
    let mut t = Touched::default();
    assert!(
        s.apply_touching(
            None,
            &Command::PlaceAllocations {
                allocations: vec![alloc("a1", "n1", 1)],
            },
            &mut t,
        )
        .is_err()
    );
    assert!(t.is_empty());
    // Bounded: past MAX_JOBS it gives way to everything.
    let mut t = Touched::default();
    for i in 0..=Touched::MAX_JOBS {
        t.job(format!("default/j{i}"));
    }
    assert!(t.all && t.jobs.is_empty());
    let mut u = Touched::default();
    u.merge(t);
    assert!(u.all);
}

#[test]
fn garbage_collection_removes_only_what_is_still_collectable() {
    let mut s = ClusterState::default();
    for replicas in 1..=4 {
        s.apply(&Command::ApplyJob {
            spec: web(replicas),
            at_ms: 1,
        })
        .expect("apply");
    }
    s.apply(&Command::UpsertNode { node: node("n1") })
        .expect("node");
    s.apply(&Command::PlaceAllocations {
        allocations: vec![
            alloc("old", "n1", 1),
            alloc("gone", "n1", 2),
            alloc("stopping", "n1", 2),
            alloc("live", "n1", 3),
        ],
    })
    .expect("place");
    let report = |s: &mut ClusterState, id: &str, status: AllocationStatus| {
        s.apply(&Command::ReportAllocation {
            id: id.into(),
            status,
            at_ms: 2,
        })
        .expect("report");
    };
    report(&mut s, "gone", AllocationStatus::Running);
    report(&mut s, "stopping", AllocationStatus::Running);
    report(&mut s, "live", AllocationStatus::Running);
    s.apply(&Command::StopAllocations {
        ids: vec!["old".into(), "gone".into(), "stopping".into()],
        lost: false,
        at_ms: 3,
    })
    .expect("stop");
    report(&mut s, "gone", AllocationStatus::Exited { code: 143 });
    let events_before = s.last_event();

    let r = s
        .apply(&Command::CollectGarbage {
            // "old" never started, "gone" exited: both over. "stopping" still runs, "live"
            // is wanted, "nope" is unknown.
            allocations: ["old", "gone", "stopping", "live", "nope"]
                .map(String::from)
                .to_vec(),
            // 1 and 2: version 2 still runs in "stopping"; 4 is the latest.
            versions: vec![JobVersions {
                namespace: "default".into(),
                name: "web".into(),
                versions: vec![1, 2, 4],
            }],
            at_ms: 4,
        })
        .expect("collect");
    assert_eq!(
        r,
        Outcome::Collected {
            allocations: 2,
            versions: 1
        }
    );
    let ids: Vec<&str> = s.allocations().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["live", "stopping"]);
    let web_ids: Vec<String> = s
        .job_allocations("default", "web")
        .map(|a| a.id.clone())
        .collect();
    assert_eq!(web_ids, ["live", "stopping"], "the index follows");
    let on_n1: Vec<&str> = s.node_allocations("n1").map(|a| a.id.as_str()).collect();
    assert_eq!(on_n1, ["live", "stopping"], "the node index follows too");
    let job = s.job("default", "web").expect("job");
    let versions: Vec<u64> = job.versions().iter().map(|v| v.version).collect();
    assert_eq!(versions, [2, 3, 4]);
    assert_eq!(
        s.last_event(),
        events_before,
        "collection is not an event per item"
    );

    // Collecting again changes nothing.
    let again = s.clone();
    s.apply(&Command::CollectGarbage {
        allocations: vec!["live".into()],
        versions: vec![JobVersions {
            namespace: "default".into(),
            name: "web".into(),
            versions: vec![2, 4],
        }],
        at_ms: 5,
    })
    .expect("collect");
    assert_eq!(s, again);
}

#[test]
fn pending_reasons_of_many_jobs_go_in_one_entry_and_skip_jobs_that_are_gone() {
    let mut s = ClusterState::default();
    for name in ["a", "b"] {
        s.apply(&Command::ApplyJob {
            spec: Box::new(service_spec(name, None)),
            at_ms: 1,
        })
        .expect("apply");
    }
    let item = |name: &str, pending: Option<&str>| JobPending {
        namespace: "default".into(),
        name: name.into(),
        pending: pending.map(String::from),
    };
    let batch = Command::SetJobsPending {
        items: vec![
            item("a", Some("no nodes")),
            item("gone", Some("no nodes")),
            item("b", Some("1 node disk pressure")),
        ],
    };
    let mut t = Touched::default();
    let out = s.apply_touching(Some(7), &batch, &mut t).expect("batch");
    assert_eq!(out, Outcome::JobPendingSet { changed: true });
    assert!(
        t.jobs.is_empty() && !t.all && !t.capacity,
        "a pending reason is the reconciler's output: writing it plans nothing again"
    );
    assert!(!t.published, "pending reasons are not streamed to agents");
    assert_eq!(
        s.job("default", "a")
            .and_then(|j| j.pending.clone())
            .as_deref(),
        Some("no nodes")
    );
    assert_eq!(
        s.job("default", "b")
            .and_then(|j| j.pending.clone())
            .as_deref(),
        Some("1 node disk pressure")
    );
    assert!(s.job("default", "gone").is_none(), "nothing is created");
    let pending: Vec<&str> = s
        .events()
        .filter(|e| e.kind == "pending")
        .map(|e| e.job.as_str())
        .collect();
    assert_eq!(pending, ["a", "b"], "an event per job whose reason changed");

    // The same again changes nothing; clearing one changes only it.
    assert_eq!(
        s.apply(&batch).expect("again"),
        Outcome::JobPendingSet { changed: false }
    );
    s.apply(&Command::SetJobsPending {
        items: vec![item("a", None)],
    })
    .expect("clear");
    assert_eq!(s.job("default", "a").and_then(|j| j.pending.clone()), None);
    assert!(
        s.job("default", "b")
            .and_then(|j| j.pending.clone())
            .is_some()
    );
}

#[test]
fn a_copy_of_the_state_keeps_what_it_saw_while_the_state_changes() {
    // The reconciler's full pass and the snapshots work on copies (O(1): the records are
    // shared); a change after the copy must copy what it touches, never reach into the copy.
    let mut s = ClusterState::default();
    s.apply(&Command::ApplyJob {
        spec: web(1),
        at_ms: 10,
    })
    .expect("apply");
    let copy = s.clone();
    let seen = serde_json::to_vec(&copy).expect("encode");
    s.apply(&Command::SetJobsPending {
        items: vec![JobPending {
            namespace: "default".into(),
            name: "web".into(),
            pending: Some("no node has room".into()),
        }],
    })
    .expect("pending");
    s.apply(&Command::ApplyJob {
        spec: web(3),
        at_ms: 20,
    })
    .expect("a new version");
    assert_eq!(s.job("default", "web").map(|j| j.versions().len()), Some(2));
    assert_eq!(
        copy.job("default", "web")
            .map(|j| (j.versions().len(), j.pending.clone())),
        Some((1, None))
    );
    assert_eq!(serde_json::to_vec(&copy).expect("encode"), seen);
}

#[test]
fn a_pending_reason_that_does_not_change_leaves_the_job_shared_with_a_copy() {
    // SetJobPending and SetJobsPending share one per-job step: an unchanged reason copies
    // nothing (the job stays shared with a copy of the state) and reports no change; a
    // missing job is an error for the single command and skipped in a batch.
    let mut s = ClusterState::default();
    s.apply(&Command::ApplyJob {
        spec: web(1),
        at_ms: 10,
    })
    .expect("apply");
    let set = |pending: Option<&str>| Command::SetJobPending {
        namespace: "default".into(),
        name: "web".into(),
        pending: pending.map(str::to_owned),
    };
    let key = job_key("default", "web");
    let copy = s.clone();
    let out = s.apply(&set(None)).expect("unchanged");
    assert_eq!(out, Outcome::JobPendingSet { changed: false });
    let shared = |a: &ClusterState, b: &ClusterState| match (a.jobs.get(&key), b.jobs.get(&key)) {
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    };
    assert!(shared(&s, &copy), "an unchanged reason copied the job");
    let out = s.apply(&set(Some("no nodes"))).expect("changed");
    assert_eq!(out, Outcome::JobPendingSet { changed: true });
    assert!(!shared(&s, &copy));
    assert_eq!(
        copy.job("default", "web").map(|j| j.pending.clone()),
        Some(None)
    );
    let missing = s.apply(&Command::SetJobPending {
        namespace: "default".into(),
        name: "nope".into(),
        pending: None,
    });
    assert!(
        matches!(missing, Err(ApplyError::JobNotFound { .. })),
        "{missing:?}"
    );
    let batch = s.apply(&Command::SetJobsPending {
        items: vec![JobPending {
            namespace: "default".into(),
            name: "nope".into(),
            pending: Some("x".into()),
        }],
    });
    assert_eq!(batch.ok(), Some(Outcome::JobPendingSet { changed: false }));
}

proptest::proptest! {
    /// A batch of reasons (`SetJobsPending`, set in place) leaves the jobs and the event log
    /// as the same reasons one command each (`SetJobPending`, the general path comparing
    /// before and after) do: repeated jobs, missing jobs, cleared and unchanged reasons,
    /// with a copy of the state alive or not. And the copy keeps what it had.
    #[test]
    fn a_batch_of_reasons_acts_as_one_command_per_reason(
        items in proptest::collection::vec((0usize..6, proptest::option::of(0usize..3)), 0..24),
        copy_alive in proptest::bool::ANY,
    ) {
        let mut base = ClusterState::default();
        for j in 0..4 {
            let sp = spec(&format!("name = \"j{j}\"\nimage = \"127.0.0.1:5000/demo/web:1.0\"\n"));
            base.apply(&Command::ApplyJob { spec: Box::new(sp), at_ms: 10 }).expect("apply");
        }
        let items: Vec<JobPending> = items
            .iter()
            .map(|(j, p)| JobPending {
                namespace: "default".into(),
                // j4 and j5 do not exist.
                name: format!("j{j}"),
                pending: p.map(|p| format!("reason {p}")),
            })
            .collect();
        let mut batch = base.clone();
        let copy = copy_alive.then(|| batch.clone());
        let out = batch.apply_entry(Some(100), &Command::SetJobsPending { items: items.clone() });
        let mut single = base.clone();
        let mut changed = false;
        for it in &items {
            if let Ok(Outcome::JobPendingSet { changed: c }) = single.apply(&Command::SetJobPending {
                namespace: it.namespace.clone(),
                name: it.name.clone(),
                pending: it.pending.clone(),
            }) {
                changed |= c;
            }
        }
        proptest::prop_assert_eq!(out.ok(), Some(Outcome::JobPendingSet { changed }));
        let pending = |s: &ClusterState| -> Vec<(String, Option<String>)> {
            s.jobs(None).map(|j| (j.name.clone(), j.pending.clone())).collect()
        };
        proptest::prop_assert_eq!(pending(&batch), pending(&single));
        let events = |s: &ClusterState| -> Vec<(String, String, String)> {
            s.events().map(|e| (e.kind.clone(), e.job.clone(), e.message.clone())).collect()
        };
        proptest::prop_assert_eq!(events(&batch), events(&single));
        if let Some(copy) = copy {
            proptest::prop_assert_eq!(pending(&copy), pending(&base));
            proptest::prop_assert_eq!(events(&copy), events(&base));
        }
    }
}
