//! In-process cluster tests: three controller members in one process on loopback ports,
//! driven through the public gRPC API. Named by kind: t10 basics, t20 membership, t30 bad
//! input, t50 faults.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use skiff_controller::Controller;
use skiff_controller::config::{Config, Formation};
use skiff_controller::raft::{RaftSettings, Role};
use skiff_proto::v1 as pb;
use skiff_proto::v1::cluster_client::ClusterClient;
use skiff_proto::v1::jobs_client::JobsClient;
use skiff_proto::v1::pki_client::PkiClient;
use skiff_tls::Credentials;
use tonic::Code;
use tonic::transport::Channel;

/// A test cluster: members by id, each with its data dir kept across restarts.
struct TestCluster {
    dir: tempfile::TempDir,
    members: Vec<Option<Controller>>,
    rpc: Vec<SocketAddr>,
    settings: RaftSettings,
    /// `--gc-after` and `--keep-versions`.
    gc: (Duration, usize),
    /// `--node-grace`.
    node_grace: Duration,
    /// What the bootstrapper wrote to `admin.creds`.
    admin: Option<Credentials>,
}

/// A mutual-TLS channel to `addr` with `creds`.
async fn channel_as(addr: SocketAddr, creds: &Credentials) -> Channel {
    let ep = skiff_tls::net::endpoint(&addr.to_string()).expect("endpoint");
    skiff_tls::net::channel_with(creds.client_config().expect("tls config"), ep)
        .await
        .expect("connect")
}

/// Credentials made of a member's own certificate (members may act for any node).
fn member_creds(data_dir: &std::path::Path) -> Credentials {
    let m = skiff_tls::Material::load(&data_dir.join("tls"))
        .expect("material")
        .expect("a member certificate");
    Credentials::of("member", "member", &m)
}

use skiff_e2e::free_addr;

fn spec(name: &str, replicas: u32) -> String {
    format!("name = \"{name}\"\nimage = \"127.0.0.1:5000/demo/web:1.0\"\nreplicas = {replicas}\n")
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestCluster {
    fn settings() -> RaftSettings {
        RaftSettings {
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            ..RaftSettings::default()
        }
    }

    async fn start(n: usize, settings: RaftSettings) -> TestCluster {
        TestCluster::start_with_gc(n, settings, (Duration::from_secs(3600), 10)).await
    }

    async fn start_with_gc(n: usize, settings: RaftSettings, gc: (Duration, usize)) -> TestCluster {
        TestCluster::start_full(n, settings, gc, NODE_GRACE).await
    }

    async fn start_full(
        n: usize,
        settings: RaftSettings,
        gc: (Duration, usize),
        node_grace: Duration,
    ) -> TestCluster {
        let mut c = TestCluster {
            dir: tempfile::Builder::new()
                .prefix("skiff-cluster-test-")
                .tempdir()
                .expect("tempdir"),
            members: Vec::new(),
            rpc: Vec::new(),
            settings,
            gc,
            node_grace,
            admin: None,
        };
        for i in 0..n {
            let id = i as u64 + 1;
            let formation = if i == 0 {
                Formation::Bootstrap
            } else {
                Formation::Join(c.rpc[0].to_string())
            };
            let join_token = if i == 0 {
                None
            } else {
                Some(c.token("controller", 0, 3600).await.parse().expect("token"))
            };
            // A port picked free may be taken (by another test's connection) before we bind
            // it: start afresh on new ports.
            let mut attempt = 0;
            let (ctl, rpc) = loop {
                let rpc = free_addr();
                let res = Controller::start(Config {
                    id,
                    data_dir: c.data_dir(id),
                    rpc_addr: Some(rpc),
                    http_addr: Some(free_addr()),
                    formation: formation.clone(),
                    raft: c.settings.clone(),
                    node_grace: c.node_grace,
                    gc_after: c.gc.0,
                    keep_versions: c.gc.1,
                    cluster: Default::default(),
                    join_token: join_token.clone(),
                    tls_sans: vec![],
                    cert_ttl: skiff_controller::config::DEFAULT_CERT_TTL,
                })
                .await;
                match res {
                    Ok(ctl) => break (ctl, rpc),
                    Err(skiff_controller::ControllerError::Bind { .. }) if attempt < 5 => {
                        attempt += 1;
                        let _ = std::fs::remove_dir_all(c.data_dir(id));
                    }
                    Err(e) => panic!("start member {id}: {e}"),
                }
            };
            c.rpc.push(rpc);
            c.members.push(Some(ctl));
            if i == 0 {
                c.wait_leader().await;
                c.admin = Some(
                    Credentials::load(&c.data_dir(1).join("admin.creds")).expect("admin.creds"),
                );
            }
        }
        c.wait_voters(n).await;
        c
    }

    fn admin(&self) -> &Credentials {
        self.admin.as_ref().expect("admin credentials")
    }

    /// A join token, made as admin through member 1 (retried until the CA is committed).
    async fn token(&self, role: &str, uses: u32, ttl_seconds: u64) -> String {
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut pki = PkiClient::new(channel_as(self.rpc[0], self.admin()).await);
            let res = pki
                .create_token(pb::CreateTokenRequest {
                    role: role.to_string(),
                    ttl_seconds,
                    uses,
                })
                .await;
            match res {
                Ok(r) => return r.into_inner().token,
                Err(e) => assert!(tokio::time::Instant::now() < until, "no join token: {e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn channel(&self, id: u64, creds: &Credentials) -> Channel {
        channel_as(self.rpc[id as usize - 1], creds).await
    }

    async fn member_channel(&self, id: u64) -> Channel {
        self.channel(id, &member_creds(&self.data_dir(1))).await
    }

    fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("m{id}"))
    }

    fn member(&self, id: u64) -> &Controller {
        self.members[id as usize - 1]
            .as_ref()
            .expect("member running")
    }

    fn running(&self) -> impl Iterator<Item = &Controller> {
        self.members.iter().flatten()
    }

    async fn wait_leader(&self) -> u64 {
        let mut leader = 0;
        eventually("a leader", Duration::from_secs(20), || {
            let found = self
                .running()
                .find(|m| m.node().status().role == Role::Leader)
                .map(|m| m.node().id());
            leader = found.unwrap_or(0);
            async move { found.is_some() }
        })
        .await;
        leader
    }

    async fn wait_voters(&self, n: usize) {
        eventually("voters", Duration::from_secs(30), || {
            let ok = self
                .running()
                .all(|m| m.node().members().iter().filter(|x| x.voter).count() == n);
            async move { ok }
        })
        .await;
    }

    /// Waits until every running member has applied as far as the most advanced one.
    async fn wait_converged(&self) {
        eventually("members to converge", Duration::from_secs(20), || {
            let applied: Vec<u64> = self
                .running()
                .map(|m| m.node().status().applied_index)
                .collect();
            let max = applied.iter().copied().max().unwrap_or(0);
            let ok = applied.iter().all(|a| *a == max);
            async move { ok }
        })
        .await;
    }

    async fn kill(&mut self, id: u64) {
        let m = self.members[id as usize - 1].take().expect("running");
        m.shutdown().await;
    }

    /// Restarts a member with only its id and data dir, on the addresses it had.
    async fn restart(&mut self, id: u64) {
        let ctl = Controller::start(Config {
            id,
            data_dir: self.data_dir(id),
            rpc_addr: None,
            http_addr: None,
            formation: Formation::Wait,
            raft: self.settings.clone(),
            node_grace: self.node_grace,
            gc_after: self.gc.0,
            keep_versions: self.gc.1,
            cluster: Default::default(),
            join_token: None,
            tls_sans: vec![],
            cert_ttl: skiff_controller::config::DEFAULT_CERT_TTL,
        })
        .await
        .unwrap_or_else(|e| panic!("restart member {id}: {e}"));
        self.members[id as usize - 1] = Some(ctl);
    }

    async fn jobs(&self, id: u64) -> JobsClient<Channel> {
        JobsClient::new(self.channel(id, self.admin()).await)
    }

    async fn cluster_client(&self, id: u64) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel(id, self.admin()).await)
    }

    /// Job names present in a member's state (read locally, no barrier).
    fn job_names(&self, id: u64) -> BTreeSet<String> {
        let applied = self.member(id).node().state();
        applied.state.jobs(None).map(|j| j.name.clone()).collect()
    }

    async fn shutdown(mut self) {
        for m in self.members.drain(..).flatten() {
            m.shutdown().await;
        }
    }
}

async fn apply(
    client: &mut JobsClient<Channel>,
    text: String,
) -> Result<pb::ApplyJobResponse, tonic::Status> {
    client
        .apply_job(pb::ApplyJobRequest {
            spec: text,
            format: pb::SpecFormat::Toml as i32,
        })
        .await
        .map(|r| r.into_inner())
}

fn beat(node: &str, allocations: Vec<pb::AllocationReport>) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        name: node.into(),
        allocations,
        wireguard: None,
        trust_version: 0,
        named_volumes: Vec::new(),
        request_stats: Vec::new(),
        usage: Vec::new(),
        disk_pressure: false,
    }
}

/// No test here heartbeats as an agent does (every second): a node a test registered must not
/// be marked down while a loaded machine runs the test (in CI, t60's node went down and its
/// allocation was replaced between its registration and its first heartbeat, 10 s apart).
const NODE_GRACE: Duration = Duration::from_secs(300);

async fn allocations_of(client: &mut JobsClient<Channel>, job: &str) -> Vec<pb::Allocation> {
    client
        .list_allocations(pb::ListAllocationsRequest {
            job: job.into(),
            ..Default::default()
        })
        .await
        .expect("ps")
        .into_inner()
        .allocations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_election_and_writes_through_any_member() {
    let c = TestCluster::start(3, TestCluster::settings()).await;
    let leader = c.wait_leader().await;
    // Write through every member, followers included; read back through every member.
    for id in 1..=3u64 {
        let mut client = c.jobs(id).await;
        let r = apply(&mut client, spec(&format!("via-{id}"), 2))
            .await
            .expect("apply");
        assert!(r.created, "member {id} (leader {leader})");
        assert_eq!(r.job.expect("job").version, 1);
    }
    for id in 1..=3u64 {
        let mut client = c.jobs(id).await;
        let list = client
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .expect("list")
            .into_inner();
        let names: BTreeSet<_> = list.jobs.into_iter().map(|j| j.name).collect();
        assert_eq!(
            names,
            ["via-1", "via-2", "via-3"].map(String::from).into(),
            "linearizable read on {id}"
        );
    }
    // An unchanged spec changes nothing; a changed one makes version 2 with its diff.
    let mut client = c.jobs(2).await;
    let r = apply(&mut client, spec("via-1", 2)).await.expect("reapply");
    assert!(!r.changed);
    let r = apply(&mut client, spec("via-1", 5)).await.expect("change");
    assert_eq!(r.job.expect("job").version, 2);
    assert_eq!(r.changes.len(), 1);
    assert_eq!(r.changes[0].path, "replicas");
    // Every version is kept.
    let got = client
        .get_job(pb::GetJobRequest {
            namespace: "default".into(),
            name: "via-1".into(),
            read: None,
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        got.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    // Stop keeps the job.
    let stopped = client
        .stop_job(pb::StopJobRequest {
            namespace: "default".into(),
            name: "via-1".into(),
        })
        .await
        .expect("stop")
        .into_inner();
    assert_eq!(
        stopped.job.expect("job").status,
        pb::JobStatus::Stopped as i32
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_add_and_remove_member() {
    let mut c = TestCluster::start(3, TestCluster::settings()).await;
    let mut admin = c.cluster_client(1).await;
    let members = admin
        .list_members(pb::ListMembersRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(members.members.len(), 3);
    assert_eq!(
        members
            .members
            .iter()
            .filter(|m| m.role == pb::MemberRole::Leader as i32)
            .count(),
        1
    );

    // Remove member 3 through a member that may not be the leader.
    let resp = c
        .cluster_client(2)
        .await
        .remove_member(pb::RemoveMemberRequest { id: 3 })
        .await
        .expect("remove")
        .into_inner();
    assert!(resp.members.iter().all(|m| m.id != 3), "{resp:?}");
    // Its certificates are revoked with it: it can no longer talk to the cluster.
    eventually(
        "member 3's certificates revoked",
        Duration::from_secs(10),
        || {
            let st = c.member(1).node().state();
            let pki = st.state.pki();
            let uri = skiff_tls::Identity::Member(3).uri();
            let all: Vec<_> = pki.certs.values().filter(|r| r.identity == uri).collect();
            let ok = !all.is_empty() && all.iter().all(|r| r.revoked);
            async move { ok }
        },
    )
    .await;
    let err = c
        .jobs(1)
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .map(|_| ());
    assert!(err.is_ok(), "the admin still works");
    let removed = member_creds(&c.data_dir(3));
    let err = JobsClient::new(c.channel(1, &removed).await)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect_err("a removed member's certificate");
    // Refused at the handshake (a transport error on the client: the server closes the
    // connection, seen as Unknown or Cancelled) or, on a connection that raced the
    // revocation, by the call's check.
    assert!(
        matches!(
            err.code(),
            Code::Unknown | Code::Cancelled | Code::Unauthenticated
        ),
        "{err:?}"
    );
    c.kill(3).await;
    // Two voters still commit.
    let mut client = c.jobs(1).await;
    apply(&mut client, spec("after-remove", 1))
        .await
        .expect("write with 2 voters");
    // Removing an unknown member is refused with a clear error.
    let err = admin
        .remove_member(pb::RemoveMemberRequest { id: 9 })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("member 9 is not in the cluster"),
        "{}",
        err.message()
    );
    // A member id that is taken by another address is refused.
    let err = admin
        .add_member(pb::AddMemberRequest {
            id: 2,
            rpc_addr: "127.0.0.1:1".into(),
            http_addr: "127.0.0.1:2".into(),
        })
        .await
        .expect_err("id taken");
    assert!(err.message().contains("never reused"), "{}", err.message());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_bad_input_gets_clear_errors_and_changes_nothing() {
    let c = TestCluster::start(1, TestCluster::settings()).await;
    let mut client = c.jobs(1).await;
    let published = |job: &str| {
        format!(
            "name = \"{job}\"\nimage = \"x\"\n[[ports]]\nname = \"http\"\nport = 80\n\
             [service]\nname = \"first\"\nport = \"http\"\n"
        )
    };
    apply(&mut client, published("first")).await.expect("write");
    // The reconciler records why "first" is pending (no nodes): wait for that write, so what
    // follows is measured against a settled log.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c
        .member(1)
        .node()
        .state()
        .state
        .job("default", "first")
        .is_none_or(|j| j.pending.is_none())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "pending never recorded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = c.member(1).node().status().last_log_index;

    let err = apply(
        &mut client,
        "name = \"web\"\nimage = \"x\"\nreplicas = -1\n".into(),
    )
    .await
    .expect_err("negative replicas");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("replicas: expected a non-negative integer"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("line 3"), "{}", err.message());

    let err = apply(
        &mut client,
        "name = \"web\"\nimage = \"x\"\nreplicaz = 1\n".into(),
    )
    .await
    .expect_err("unknown field");
    assert!(err.message().contains("replicaz"), "{}", err.message());

    // A service name another job publishes.
    let err = apply(&mut client, published("second"))
        .await
        .expect_err("service taken");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message()
            .starts_with("service first in namespace default is already published by job first"),
        "{}",
        err.message()
    );

    // A bad rollout setting is refused with its field and line.
    let err = apply(
        &mut client,
        "name = \"web2\"\nimage = \"x\"\n[update]\nmax_surge = \"150%\"\n".into(),
    )
    .await
    .expect_err("a surge over 100%");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("update.max_surge: ") && err.message().ends_with("(line 4)"),
        "{}",
        err.message()
    );

    // Oversized request: refused, and the daemon keeps serving.
    let huge = format!(
        "name = \"web\"\nimage = \"x\"\n# {}\n",
        "x".repeat(2 * 1024 * 1024)
    );
    let err = apply(&mut client, huge).await.expect_err("oversized");
    assert_eq!(err.code(), Code::InvalidArgument);
    let huge = "x".repeat(20 * 1024 * 1024);
    let err = apply(&mut client, huge)
        .await
        .expect_err("over the message limit");
    assert!(
        matches!(
            err.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::Internal
        ),
        "{err:?}"
    );

    // Stopping a job that does not exist.
    let err = client
        .stop_job(pb::StopJobRequest {
            namespace: "default".into(),
            name: "ghost".into(),
        })
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "job default/ghost not found");

    // Malformed and misaddressed member-to-member traffic.
    let mut raw =
        skiff_proto::v1::raft_internal_client::RaftInternalClient::new(c.member_channel(1).await);
    let err = raw
        .append_entries(pb::RaftRequest {
            target: 1,
            from: 2,
            payload: b"{not json".to_vec(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = raw
        .vote(pb::RaftRequest {
            target: 7,
            from: 2,
            payload: b"{}".to_vec(),
        })
        .await
        .expect_err("wrong target");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not member 7"), "{}", err.message());

    // Nothing was committed, and the member still serves.
    assert_eq!(c.member(1).node().status().last_log_index, before);
    apply(&mut client, spec("fine", 1))
        .await
        .expect("still serving");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_leader_killed_writes_continue_and_no_acknowledged_write_is_lost() {
    let mut c = TestCluster::start(3, TestCluster::settings()).await;
    let leader = c.wait_leader().await;
    let others: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let mut acked = BTreeSet::new();
    let mut client = c.jobs(others[0]).await;
    for i in 0..20 {
        let name = format!("before-{i}");
        apply(&mut client, spec(&name, 1))
            .await
            .expect("write before kill");
        acked.insert(name);
    }
    c.kill(leader).await;
    // Writes through the survivors continue once a new leader is elected.
    let mut failed = 0;
    for i in 0..20 {
        let name = format!("after-{i}");
        let target = others[i % 2];
        let mut client = c.jobs(target).await;
        match apply(&mut client, spec(&name, 1)).await {
            Ok(_) => {
                acked.insert(name);
            }
            Err(e) => {
                failed += 1;
                assert!(failed < 20, "no write succeeded after the leader died: {e}");
            }
        }
    }
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);
    c.restart(leader).await;
    c.wait_converged().await;
    for id in 1..=3u64 {
        let names = c.job_names(id);
        let missing: Vec<_> = acked.difference(&names).collect();
        assert!(
            missing.is_empty(),
            "member {id} lost acknowledged writes: {missing:?}"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_restarted_member_recovers_from_its_data_dir_and_catches_up() {
    let mut c = TestCluster::start(3, TestCluster::settings()).await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|i| *i != leader).expect("follower");
    let mut client = c.jobs(leader).await;
    apply(&mut client, spec("one", 1)).await.expect("write");
    c.wait_converged().await;
    c.kill(follower).await;
    for i in 0..30 {
        apply(&mut client, spec(&format!("while-down-{i}"), 1))
            .await
            .expect("write");
    }
    c.restart(follower).await;
    c.wait_converged().await;
    let names = c.job_names(follower);
    assert!(names.contains("one"));
    assert!(
        (0..30).all(|i| names.contains(&format!("while-down-{i}"))),
        "{names:?}"
    );
    // It rejoined as a voter with the addresses it remembered.
    let me = c
        .member(follower)
        .node()
        .members()
        .into_iter()
        .find(|m| m.id == follower)
        .expect("member");
    assert!(me.voter);
    assert_eq!(me.member.rpc_addr, c.rpc[follower as usize - 1].to_string());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_member_behind_a_compaction_is_brought_up_by_snapshot() {
    let settings = RaftSettings {
        snapshot_every: 20,
        keep_after_snapshot: 5,
        ..TestCluster::settings()
    };
    let mut c = TestCluster::start(3, settings).await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|i| *i != leader).expect("follower");
    let stopped_at = c.member(follower).node().status().last_log_index;
    c.kill(follower).await;
    let mut client = c.jobs(leader).await;
    for i in 0..80 {
        apply(&mut client, spec(&format!("snap-{i}"), 1))
            .await
            .expect("write");
    }
    // The leader has compacted its log past where the follower stopped (the purge follows
    // the snapshot asynchronously).
    eventually("leader snapshot and purge", Duration::from_secs(10), || {
        let s = c.member(leader).node().status();
        async move { s.snapshot_index >= 60 && s.purged_index > stopped_at }
    })
    .await;
    c.restart(follower).await;
    c.wait_converged().await;
    let status = c.member(follower).node().status();
    assert!(
        status.snapshot_index > 0,
        "follower caught up without a snapshot: {status:?}"
    );
    let names = c.job_names(follower);
    assert!(
        (0..80).all(|i| names.contains(&format!("snap-{i}"))),
        "{} jobs",
        names.len()
    );
    // And it keeps working after: a later restart loads the snapshot from disk.
    c.kill(follower).await;
    c.restart(follower).await;
    c.wait_converged().await;
    assert_eq!(c.job_names(follower).len(), 80);
    c.shutdown().await;
}

/// The Nodes API: a node registers, gets work, reports it; bad input is named and changes
/// nothing; followers send agents to the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_nodes_api_registers_assigns_and_refuses_bad_input() {
    use skiff_proto::v1::nodes_client::NodesClient;
    let c = TestCluster::start(3, TestCluster::settings()).await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let mut nodes = NodesClient::new(c.member_channel(leader).await);
    let register = |name: &str, address: &str, cpu: f64| pb::RegisterNodeRequest {
        name: name.into(),
        address: address.into(),
        labels: [("zone".to_owned(), "a".to_owned())].into(),
        resources: Some(pb::NodeResources {
            cpu,
            memory: 1 << 30,
            pids: 1000,
        }),
        agent_addr: "198.18.0.9:7801".into(),
        metrics_addr: "198.18.0.9:7802".into(),
        wireguard: None,
        host_volume_dirs: Vec::new(),
        capabilities: vec!["fence".into()],
    };

    const KEY: &str = "0OK+Q37tLd3BojAGcM0eRUYT5vJ+wctz0L2pL9EaSSE=";
    let wg = |mut r: pb::RegisterNodeRequest, key: &str, endpoint: &str, backend: i32| {
        r.wireguard = Some(pb::WireguardIdentity {
            public_key: key.into(),
            endpoint: endpoint.into(),
            backend,
        });
        r
    };

    // A follower points at the leader.
    let mut via_follower = NodesClient::new(c.member_channel(follower).await);
    let err = via_follower
        .register(register("n1", "198.18.0.9", 2.0))
        .await
        .expect_err("follower");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let hint = err
        .metadata()
        .get("x-skiff-leader")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(hint, Some(c.rpc[leader as usize - 1].to_string()));

    // Bad registrations are refused with the field named, and write nothing.
    let before = c.member(leader).node().status().last_log_index;
    for (req, want) in [
        (register("Bad Name", "198.18.0.9", 2.0), "name"),
        (
            register("n1", "not-an-ip", 2.0),
            "address: \"not-an-ip\" is not an IP address",
        ),
        (register("n1", "198.18.0.9", 0.0), "resources"),
        (
            pb::RegisterNodeRequest {
                metrics_addr: "198.18.0.9".into(),
                ..register("n1", "198.18.0.9", 2.0)
            },
            "metrics_addr: \"198.18.0.9\" is not an address:port",
        ),
        (
            pb::RegisterNodeRequest {
                capabilities: vec!["fence".into(), "Fence!".into()],
                ..register("n1", "198.18.0.9", 2.0)
            },
            "capabilities: \"Fence!\" is not 1 to 32 of [a-z0-9-]",
        ),
        (register("n1", "198.18.0.9", f64::NAN), "resources"),
        (
            wg(
                register("n1", "198.18.0.9", 2.0),
                "nope",
                "198.18.0.9:51820",
                pb::WireguardBackend::Userspace as i32,
            ),
            "wireguard.public_key: \"nope\" is not a base64 32-byte key",
        ),
        (
            wg(
                register("n1", "198.18.0.9", 2.0),
                KEY,
                "198.18.0.9",
                pb::WireguardBackend::Userspace as i32,
            ),
            "wireguard.endpoint: \"198.18.0.9\" is not IP:port",
        ),
        (
            wg(
                register("n1", "198.18.0.9", 2.0),
                KEY,
                "198.18.0.9:51820",
                7,
            ),
            "wireguard.backend: 7 is not kernel or userspace",
        ),
    ] {
        let err = nodes.register(req).await.expect_err(want);
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(want), "{}", err.message());
    }
    let hb = nodes
        .heartbeat(beat("ghost", vec![]))
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(!hb.known, "an unknown node is told to register");
    assert_eq!(c.member(leader).node().status().last_log_index, before);

    // A good one gets the first /24 of the cluster CIDR, and keeps it; then a job: the watch
    // delivers its allocation.
    let reply = nodes
        .register(register("n1", "198.18.0.9", 2.0))
        .await
        .expect("register")
        .into_inner();
    assert_eq!(reply.subnet, "10.42.0.0/24");
    let reply = nodes
        .register(register("n2", "198.18.0.10", 2.0))
        .await
        .expect("register")
        .into_inner();
    assert_eq!(reply.subnet, "10.42.1.0/24");
    let reply = nodes
        .register(register("n1", "198.18.0.9", 2.0))
        .await
        .expect("register again")
        .into_inner();
    assert_eq!(reply.subnet, "10.42.0.0/24");
    let mut watch = NodesClient::new(c.member_channel(follower).await)
        .watch_allocations(pb::WatchAllocationsRequest {
            node: "n1".into(),
            peers_delta: false,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut jobs = c.jobs(leader).await;
    apply(&mut jobs, spec("web", 1)).await.expect("apply");
    let assigned = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let msg = watch.message().await.expect("stream").expect("message");
            if let Some(a) = msg.allocations.first() {
                return a.clone();
            }
        }
    })
    .await
    .expect("assignment within 10 s");
    assert_eq!(assigned.job, "web");
    let task = assigned.task.clone().expect("a task");
    assert_eq!(task.containers.len(), 1);
    assert!(!task.containers[0].image.is_empty());

    // Its report is recorded; a report with an unknown state is refused.
    nodes
        .heartbeat(beat(
            "n1",
            vec![pb::AllocationReport {
                id: assigned.id.clone(),
                state: pb::AllocationState::Running as i32,
                restarts: 2,
                ..Default::default()
            }],
        ))
        .await
        .expect("heartbeat");
    let err = nodes
        .heartbeat(beat(
            "n1",
            vec![pb::AllocationReport {
                id: assigned.id.clone(),
                state: 42,
                ..Default::default()
            }],
        ))
        .await
        .expect_err("bad state");
    assert!(
        err.message()
            .contains("state 42 is not one an agent reports"),
        "{}",
        err.message()
    );
    let ps = allocations_of(&mut jobs, "web").await;
    assert_eq!(ps.len(), 1);
    assert_eq!(
        (ps[0].observed, ps[0].restarts),
        (pb::AllocationState::Running as i32, 2)
    );

    // A long health output is kept cut to 512 characters, and the same report again writes
    // nothing to the log.
    let unhealthy = pb::AllocationReport {
        id: assigned.id.clone(),
        state: pb::AllocationState::Running as i32,
        restarts: 2,
        health: pb::Health::Unhealthy as i32,
        health_output: "x".repeat(2000),
        ..Default::default()
    };
    for _ in 0..2 {
        nodes
            .heartbeat(beat("n1", vec![unhealthy.clone()]))
            .await
            .expect("heartbeat");
    }
    // n2 too, so that it is not marked down (a write) in between.
    nodes
        .heartbeat(beat("n2", vec![]))
        .await
        .expect("heartbeat");
    let written = c.member(leader).node().status().last_log_index;
    nodes
        .heartbeat(beat("n1", vec![unhealthy.clone()]))
        .await
        .expect("heartbeat");
    assert_eq!(c.member(leader).node().status().last_log_index, written);
    let ps = allocations_of(&mut jobs, "web").await;
    assert_eq!(
        (ps[0].health, ps[0].health_output.len()),
        (pb::Health::Unhealthy as i32, 512)
    );

    // Output its node could not log (a full disk) is recorded and shown with the allocation.
    let full = pb::AllocationReport {
        log_dropped_bytes: 3 << 20,
        log_error: "writing container.log: No space left on device (os error 28)".into(),
        ..unhealthy.clone()
    };
    nodes
        .heartbeat(beat("n1", vec![full]))
        .await
        .expect("heartbeat");
    let ps = allocations_of(&mut jobs, "web").await;
    assert_eq!(ps[0].log_dropped_bytes, 3 << 20);
    assert!(ps[0].log_error.contains("No space left"), "{:?}", ps[0]);

    // Usage figures: only finite ones of the reporting node's own allocations are kept, and
    // nothing bad fails the heartbeat (an agent must keep beating).
    let usage = |allocation: &str, cpu_seconds: f64, memory_bytes: u64| pb::AllocationUsage {
        allocation: allocation.into(),
        cpu_seconds,
        memory_bytes,
        memory_limit_bytes: 64 << 20,
        oom_kills: 0,
    };
    let mut hb = beat("n2", vec![]);
    hb.usage = vec![usage(&assigned.id, 1.0, 1000)];
    nodes
        .heartbeat(hb)
        .await
        .expect("n2 claims n1's allocation");
    let mut hb = beat("n1", vec![]);
    hb.usage = vec![
        usage(&assigned.id, f64::NAN, 1000),
        usage(&assigned.id, -1.0, 1000),
        usage(&assigned.id, f64::INFINITY, 1000),
        usage("ghost", 1.0, 1000),
    ];
    nodes.heartbeat(hb).await.expect("malformed usage");
    let listed = nodes
        .list_usage(pb::ListUsageRequest {})
        .await
        .expect("usage")
        .into_inner()
        .usage;
    assert!(listed.is_empty(), "{listed:?}");
    let mut hb = beat("n1", vec![]);
    hb.usage = vec![usage(&assigned.id, 2.5, 4096)];
    nodes.heartbeat(hb).await.expect("usage");
    let listed = nodes
        .list_usage(pb::ListUsageRequest {})
        .await
        .expect("usage")
        .into_inner()
        .usage;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (
            listed[0].allocation.as_str(),
            listed[0].node.as_str(),
            listed[0].memory_bytes,
            listed[0].memory_limit_bytes
        ),
        (assigned.id.as_str(), "n1", 4096, 64 << 20)
    );

    // Drain an unknown node: named.
    let err = nodes
        .set_drain(pb::SetDrainRequest {
            name: "ghost".into(),
            drain: true,
        })
        .await
        .expect_err("ghost");
    assert_eq!(err.code(), Code::NotFound);

    // Removing: an unknown node is not found; a live one is refused, named, and kept.
    let err = nodes
        .remove_node(pb::RemoveNodeRequest {
            name: "ghost".into(),
        })
        .await
        .expect_err("ghost");
    assert_eq!(err.code(), Code::NotFound);
    let err = nodes
        .remove_node(pb::RemoveNodeRequest { name: "n1".into() })
        .await
        .expect_err("n1 is ready");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .starts_with("node n1 is ready: only a down node can be removed"),
        "{}",
        err.message()
    );
    let listed = nodes
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect("nodes")
        .into_inner()
        .nodes;
    assert!(listed.iter().any(|n| n.name == "n1"));
    c.shutdown().await;
}

/// Credentials with another certificate and key, trusting the cluster CA.
fn forged(admin: &Credentials, cert: String, key: String) -> Credentials {
    Credentials {
        cert,
        key,
        ..admin.clone()
    }
}

/// Overlay peers on a watch that asks for deltas: the whole set first, then only what
/// changed (a node joining, a node going down); a watch that does not ask (an older agent)
/// gets whole sets only. Folding the deltas gives, after every step, the whole set.
///
/// The nodes heartbeat as agents do, and one goes down by missing its heartbeats: a node
/// written down while its heartbeats are fresh is brought back by the reconciler's next
/// pass, and a watch that read late saw only the view after that (in CI, once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t61_a_watch_that_asks_gets_peer_deltas_and_one_that_does_not_whole_sets() {
    use skiff_proto::v1::nodes_client::NodesClient;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    let grace = Duration::from_secs(3);
    let c = TestCluster::start_full(
        1,
        TestCluster::settings(),
        (Duration::from_secs(3600), 10),
        grace,
    )
    .await;
    let leader = c.wait_leader().await;
    let mut nodes = NodesClient::new(c.member_channel(leader).await);
    for (name, key) in [("n1", KEY1), ("n2", KEY2)] {
        nodes.register(reg(name, key)).await.expect("register");
    }
    // Every registered node beats every 200 ms until it is taken off this list.
    let beating = Arc::new(Mutex::new(vec!["n1", "n2"]));
    let beats = {
        let beating = beating.clone();
        let mut client = nodes.clone();
        tokio::spawn(async move {
            loop {
                let names = beating.lock().expect("lock").clone();
                for n in names {
                    if let Err(e) = client.heartbeat(beat(n, vec![])).await {
                        eprintln!("heartbeat of {n} refused: {e}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let watch = |peers_delta: bool| {
        let mut client = nodes.clone();
        async move {
            client
                .watch_allocations(pb::WatchAllocationsRequest {
                    node: "n1".into(),
                    peers_delta,
                })
                .await
                .expect("watch")
                .into_inner()
        }
    };
    let mut new_agent = watch(true).await;
    let mut old_agent = watch(false).await;
    type Set = BTreeMap<String, String>;
    let mut folded: Set = Set::new();
    let mut first = true;
    // Reads each stream until its peers are `want` (node -> key); checks every message's form.
    let mut step =
        async |want: &[(&str, &str)],
               new_agent: &mut tonic::Streaming<pb::AssignedAllocations>,
               old_agent: &mut tonic::Streaming<pb::AssignedAllocations>| {
            let want: Set = want
                .iter()
                .map(|(n, k)| ((*n).to_owned(), (*k).to_owned()))
                .collect();
            tokio::time::timeout(Duration::from_secs(10), async {
                while folded != want {
                    let msg = new_agent.message().await.expect("stream").expect("message");
                    assert_eq!(msg.peers_delta, !first, "whole first, deltas after");
                    if !msg.peers_delta {
                        folded.clear();
                    }
                    for n in &msg.peers_removed {
                        folded.remove(n);
                    }
                    for p in &msg.peers {
                        assert_ne!(p.node, "n1", "a node is never its own peer");
                        folded.insert(p.node.clone(), p.public_key.clone());
                    }
                    first = false;
                }
            })
            .await
            .expect("the delta watch reaches the set");
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let msg = old_agent.message().await.expect("stream").expect("message");
                    assert!(
                        !msg.peers_delta && msg.peers_removed.is_empty(),
                        "whole sets only"
                    );
                    let whole: Set = msg
                        .peers
                        .iter()
                        .map(|p| (p.node.clone(), p.public_key.clone()))
                        .collect();
                    if whole == want {
                        break;
                    }
                }
            })
            .await
            .expect("the whole-set watch reaches the set");
        };
    step(&[("n2", KEY2)], &mut new_agent, &mut old_agent).await;
    // A node joins: the delta watch is sent that node alone.
    const KEY3: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    nodes.register(reg("n3", KEY3)).await.expect("register n3");
    beating.lock().expect("lock").push("n3");
    step(
        &[("n2", KEY2), ("n3", KEY3)],
        &mut new_agent,
        &mut old_agent,
    )
    .await;
    // A node goes down (its heartbeats stop; after the grace the reconciler marks it down):
    // it is named as removed.
    beating.lock().expect("lock").retain(|n| *n != "n2");
    step(&[("n3", KEY3)], &mut new_agent, &mut old_agent).await;
    beats.abort();
}

/// Two WireGuard public keys for test nodes.
const KEY1: &str = "0OK+Q37tLd3BojAGcM0eRUYT5vJ+wctz0L2pL9EaSSE=";
const KEY2: &str = "aGVsbG8gd29ybGQgdGhpcyBpcyBhIHRlc3Qga2V5ISE=";

/// A node's registration with a small resource vector and WireGuard key `key`.
fn reg(name: &str, key: &str) -> pb::RegisterNodeRequest {
    pb::RegisterNodeRequest {
        name: name.into(),
        address: "198.18.0.9".into(),
        labels: Default::default(),
        resources: Some(pb::NodeResources {
            cpu: 1.0,
            memory: 1 << 30,
            pids: 100,
        }),
        agent_addr: String::new(),
        metrics_addr: String::new(),
        wireguard: Some(pb::WireguardIdentity {
            public_key: key.into(),
            endpoint: "198.18.0.9:51820".into(),
            backend: pb::WireguardBackend::Userspace as i32,
        }),
        host_volume_dirs: Vec::new(),
        capabilities: Vec::new(),
    }
}

fn pki_counts(c: &TestCluster) -> (usize, usize) {
    let st = c.member(1).node().state();
    let pki = st.state.pki();
    (
        pki.certs.len(),
        pki.tokens.values().map(|t| t.used as usize).sum(),
    )
}

/// Mutual TLS and authorization on the controller port: forged, foreign, expired and revoked
/// certificates, a node acting as another, a reader writing, a plain-text client, spent,
/// expired and revoked tokens, a token pinning another CA. Each is refused with a clear
/// error and leaves the state as it was.
/// Garbage collection: allocations over for `--gc-after` are forgotten (the agent no longer
/// sees them, `ps` no longer lists them), and versions beyond `--keep-versions` go, the
/// latest kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t65_stopped_allocations_and_old_versions_are_collected() {
    use skiff_proto::v1::nodes_client::NodesClient;
    let c =
        TestCluster::start_with_gc(1, TestCluster::settings(), (Duration::from_secs(1), 2)).await;
    let leader = c.wait_leader().await;
    let mut nodes = NodesClient::new(c.member_channel(leader).await);
    nodes
        .register(pb::RegisterNodeRequest {
            name: "n1".into(),
            address: "198.18.0.9".into(),
            labels: Default::default(),
            resources: Some(pb::NodeResources {
                cpu: 8.0,
                memory: 8 << 30,
                pids: 10_000,
            }),
            agent_addr: "198.18.0.9:7801".into(),
            metrics_addr: "198.18.0.9:7802".into(),
            wireguard: None,
            host_volume_dirs: Vec::new(),
            capabilities: Vec::new(),
        })
        .await
        .expect("register");
    let mut jobs = c.jobs(leader).await;
    for replicas in 1..=4 {
        apply(&mut jobs, spec("web", replicas))
            .await
            .expect("apply");
    }
    let versions = |job: pb::GetJobResponse| job.job.map(|j| j.versions).unwrap_or_default();
    let get = pb::GetJobRequest {
        namespace: "default".into(),
        name: "web".into(),
        read: None,
    };
    // Running allocations hold their versions; the ones beyond the 2 kept that nothing
    // runs go.
    eventually("4 allocations", Duration::from_secs(10), || {
        let mut jobs = jobs.clone();
        async move { allocations_of(&mut jobs, "web").await.len() == 4 }
    })
    .await;
    let running: Vec<pb::AllocationReport> = allocations_of(&mut jobs, "web")
        .await
        .into_iter()
        .map(|a| pb::AllocationReport {
            id: a.id,
            state: pb::AllocationState::Running as i32,
            ..Default::default()
        })
        .collect();
    nodes
        .heartbeat(beat("n1", running.clone()))
        .await
        .expect("heartbeat");
    jobs.stop_job(pb::StopJobRequest {
        namespace: "default".into(),
        name: "web".into(),
    })
    .await
    .expect("stop");
    // Still running after the stop: kept, whatever their age.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes
        .heartbeat(beat("n1", running.clone()))
        .await
        .expect("heartbeat");
    let held = || c.member(leader).node().state().state.allocations().count();
    assert_eq!(held(), 4);
    // Exited: forgotten after a second, at the next full pass.
    let exited: Vec<pb::AllocationReport> = running
        .iter()
        .map(|r| pb::AllocationReport {
            state: pb::AllocationState::Exited as i32,
            ..r.clone()
        })
        .collect();
    let before = c.member(leader).node().state().state.events().count();
    nodes
        .heartbeat(beat("n1", exited))
        .await
        .expect("heartbeat");
    eventually("allocations collected", Duration::from_secs(25), || {
        let n = held();
        async move { n == 0 }
    })
    .await;
    // 2 kept, and the stable one if it is older.
    let kept = versions(jobs.get_job(get.clone()).await.expect("get").into_inner());
    assert!((2..=3).contains(&kept), "versions kept: {kept}");
    let state = &c.member(leader).node().state().state;
    let job = state.job("default", "web").expect("the job stays");
    assert_eq!(job.latest().version, 4, "the latest is kept");
    assert!(state.allocations().next().is_none());
    assert!(
        state.events().count() >= before,
        "collection leaves the event log alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_forged_identities_and_bad_tokens_are_refused_and_change_nothing() {
    use skiff_controller::state::Command;
    use skiff_controller::state::pki::{JoinRole, PkiOp, TokenRecord};
    use skiff_proto::v1::nodes_client::NodesClient;
    use skiff_tls::pki::{key_and_csr, now_unix};
    use skiff_tls::{CaKey, Identity, JoinToken, Role};

    let c = TestCluster::start(1, TestCluster::settings()).await;
    let addr = c.rpc[0];
    let admin = c.admin().clone();
    let mut jobs = c.jobs(1).await;
    apply(&mut jobs, spec("kept", 1)).await.expect("apply");

    // A plain-text gRPC client gets no response.
    let plain = JobsClient::connect(format!("http://{addr}")).await;
    if let Ok(mut plain) = plain {
        let err = plain
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .expect_err("plain text must not be answered");
        assert_ne!(err.code(), Code::Ok);
    }

    // Self-signed, another CA's, and expired client certificates.
    let rogue = CaKey::generate("rogue").expect("rogue CA");
    let self_signed = forged(&admin, rogue.cert_pem.clone(), rogue.key_pem.clone());
    let (k, csr) = key_and_csr("x").expect("csr");
    let foreign_cert = rogue
        .issue(
            &csr,
            &Identity::User {
                role: Role::Admin,
                name: "admin".into(),
            },
            &[],
            Duration::from_secs(3600),
        )
        .expect("foreign");
    let foreign = forged(&admin, foreign_cert.cert_pem, k);
    let ca = c
        .member(1)
        .node()
        .state()
        .state
        .pki()
        .active()
        .cloned()
        .expect("CA");
    let (k, csr) = key_and_csr("x").expect("csr");
    let now = now_unix();
    let expired_cert = ca
        .key
        .issue_between(
            &csr,
            &Identity::User {
                role: Role::Admin,
                name: "old".into(),
            },
            &[],
            now - 7200,
            now - 3600,
        )
        .expect("expired");
    let expired = forged(&admin, expired_cert.cert_pem, k);
    for (what, creds) in [
        ("self-signed", &self_signed),
        ("foreign CA", &foreign),
        ("expired", &expired),
    ] {
        let ep = skiff_tls::net::endpoint(&addr.to_string()).expect("endpoint");
        let res = match skiff_tls::net::channel_with(creds.client_config().expect("cfg"), ep).await
        {
            Err(_) => continue,
            Ok(ch) => {
                JobsClient::new(ch)
                    .apply_job(pb::ApplyJobRequest {
                        spec: spec("forged", 1),
                        format: pb::SpecFormat::Toml as i32,
                    })
                    .await
            }
        };
        let err = res.expect_err(what);
        let text = format!("{err:?}");
        assert!(
            text.contains("alert") || text.contains("certificate") || text.contains("transport"),
            "{what}: {text}"
        );
    }

    // A reader reads but cannot write; its revocation takes effect on the open connection.
    let (rk, rcsr) = key_and_csr("r").expect("csr");
    let mut pki = PkiClient::new(c.channel(1, &admin).await);
    let issued = pki
        .create_credentials(pb::CreateCredentialsRequest {
            name: "ro".into(),
            role: "reader".into(),
            csr_pem: rcsr,
            ttl_seconds: 0,
        })
        .await
        .expect("reader credentials")
        .into_inner();
    let reader = forged(&admin, issued.cert_pem, rk);
    let mut as_reader = JobsClient::new(c.channel(1, &reader).await);
    let listed = as_reader
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("a reader reads");
    assert_eq!(listed.into_inner().jobs.len(), 1);
    let err = apply(&mut as_reader, spec("nope", 1))
        .await
        .expect_err("reader apply");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("reader ro may not call /skiff.v1.Jobs/ApplyJob"),
        "{}",
        err.message()
    );
    let mut raft =
        skiff_proto::v1::raft_internal_client::RaftInternalClient::new(c.channel(1, &admin).await);
    let err = raft
        .propose(pb::RaftRequest {
            target: 1,
            from: 1,
            payload: b"{}".to_vec(),
        })
        .await
        .expect_err("admin is not a member");
    assert_eq!(err.code(), Code::PermissionDenied);
    let serial = skiff_tls::Material {
        ca_pem: reader.ca.clone(),
        cert_pem: reader.cert.clone(),
        key_pem: String::new(),
    }
    .info()
    .expect("info")
    .serial;
    pki.revoke_certificate(pb::RevokeCertificateRequest {
        serial: serial.clone(),
        identity: String::new(),
    })
    .await
    .expect("revoke");
    // Member 1 refuses the certificate once it has applied the revocation (a follower
    // learns of the commit on the leader's next append, so this may take a heartbeat).
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match as_reader.list_jobs(pb::ListJobsRequest::default()).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    tokio::time::Instant::now() < until,
                    "member 1 never applied the revocation"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{}", err.message());

    // Node n1 enrolls with a one-use token, and cannot act as n2.
    let before = pki_counts(&c);
    let token: JoinToken = c.token("agent", 1, 3600).await.parse().expect("token");
    let m = skiff_tls::enroll::join(&addr.to_string(), &token, "n1", 0, &["198.18.0.9".into()])
        .await
        .expect("n1 enrolls");
    let n1 = forged(&admin, m.cert_pem, m.key_pem);
    let again = skiff_tls::enroll::join(&addr.to_string(), &token, "n3", 0, &[])
        .await
        .expect_err("used token");
    assert!(again.message.contains("already used"), "{}", again.message);
    assert!(!again.retryable);
    let mut as_n1 = NodesClient::new(c.channel(1, &n1).await);
    as_n1
        .register(reg("n1", KEY1))
        .await
        .expect("n1 registers as itself");
    let mut as_member = NodesClient::new(c.member_channel(1).await);
    as_member
        .register(reg("n2", KEY2))
        .await
        .expect("n2 registered");
    let err = as_n1.register(reg("n2", KEY1)).await.expect_err("n1 as n2");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("node n1 may not act as node n2"),
        "{}",
        err.message()
    );
    let err = as_n1
        .heartbeat(beat("n2", vec![]))
        .await
        .expect_err("heartbeat as n2");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = as_n1
        .watch_allocations(pb::WatchAllocationsRequest {
            node: "n2".into(),
            peers_delta: false,
        })
        .await
        .expect_err("watch as n2");
    assert_eq!(err.code(), Code::PermissionDenied);
    let n2_key = c
        .member(1)
        .node()
        .state()
        .state
        .node("n2")
        .and_then(|n| n.wireguard.clone())
        .map(|w| w.public_key);
    assert_eq!(
        n2_key.as_deref(),
        Some(KEY2),
        "n2's WireGuard key unchanged"
    );
    // A node is no user: it cannot apply jobs.
    let err = apply(&mut JobsClient::new(c.channel(1, &n1).await), spec("x", 1))
        .await
        .expect_err("node apply");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Expired and revoked tokens; a token whose pin is another CA's.
    let after_n1 = pki_counts(&c);
    assert_eq!(after_n1.0, before.0 + 1, "one certificate: n1's");
    let stale = JoinToken::generate(&ca.key.hash().expect("hash"));
    c.member(1)
        .node()
        .write(Command::Pki {
            change: PkiOp::CreateToken {
                id: stale.id.clone(),
                record: TokenRecord {
                    role: JoinRole::Agent,
                    secret_hash: stale.secret_hash(),
                    created_at: now - 7200,
                    expires_at: now - 3600,
                    uses: 0,
                    used: 0,
                    revoked: false,
                },
            },
        })
        .await
        .expect("write")
        .0
        .expect("token created");
    let err = skiff_tls::enroll::join(&addr.to_string(), &stale, "n4", 0, &[])
        .await
        .expect_err("expired token");
    assert!(err.message.contains("expired"), "{}", err.message);
    let revoked: JoinToken = c.token("agent", 0, 3600).await.parse().expect("token");
    pki.revoke_token(pb::RevokeTokenRequest {
        id: revoked.id.clone(),
    })
    .await
    .expect("revoke token");
    let err = skiff_tls::enroll::join(&addr.to_string(), &revoked, "n5", 0, &[])
        .await
        .expect_err("revoked token");
    assert!(err.message.contains("revoked"), "{}", err.message);
    let mut wrong_pin = revoked.clone();
    wrong_pin.ca_hash = rogue.hash().expect("hash");
    let err = skiff_tls::enroll::join(&addr.to_string(), &wrong_pin, "n6", 0, &[])
        .await
        .expect_err("wrong pin");
    assert!(err.message.contains("pin"), "{}", err.message);
    assert!(!err.retryable);
    let mut bad_secret = c
        .token("agent", 0, 3600)
        .await
        .parse::<JoinToken>()
        .expect("token");
    bad_secret.secret = "0".repeat(32);
    // The reconciler has planned `kept` against both nodes registered above (its pending reason
    // names them: a write of its own that may otherwise land in the window below), and every
    // member has applied the token's creation before we read where the log stands.
    eventually(
        "the reconciler to plan kept against n1 and n2",
        Duration::from_secs(10),
        || {
            let applied = c.member(1).node().state();
            let planned = applied.state.jobs(None).any(|j| {
                j.name == "kept" && j.pending.as_deref().is_some_and(|p| p.contains("/2 nodes"))
            }) || applied.state.allocations().any(|a| a.job == "kept");
            async move { planned }
        },
    )
    .await;
    eventually(
        "members to apply the same index",
        Duration::from_secs(10),
        || {
            let indexes: Vec<_> = c
                .running()
                .map(|m| m.node().status().applied_index)
                .collect();
            async move { indexes.windows(2).all(|w| w[0] == w[1]) }
        },
    )
    .await;
    let index = c.member(1).node().status().applied_index;
    let pki_before = c.member(1).node().state().state.pki().clone();
    let err = skiff_tls::enroll::join(&addr.to_string(), &bad_secret, "n7", 0, &[])
        .await
        .expect_err("bad secret");
    assert!(
        err.message.contains("secret does not match"),
        "{}",
        err.message
    );
    // Refused before anything is signed or written. The log may move for the reconciler's own
    // reasons, so compare what a join would write: the PKI's certificates and tokens.
    assert!(
        c.member(1).node().state().state.pki() == &pki_before,
        "a refused join wrote to the PKI (log {} -> {})",
        index,
        c.member(1).node().status().applied_index
    );
    let after = pki_counts(&c);
    assert_eq!(
        after.0, after_n1.0,
        "no certificate recorded for a refused join"
    );
    let names: BTreeSet<String> = c
        .member(1)
        .node()
        .state()
        .state
        .nodes()
        .map(|n| n.name.clone())
        .collect();
    assert_eq!(names, ["n1", "n2"].into_iter().map(String::from).collect());
    assert_eq!(c.job_names(1), ["kept".to_string()].into_iter().collect());
    c.shutdown().await;
}

/// Workload identities: a node gets a certificate for `spiffe://skiff/ns/NS/svc/SERVICE` only
/// for an allocation assigned to it, of a job that publishes a service; the certificate lasts
/// a day and opens no controller API; users, other nodes and workloads are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t80_workload_certificates_only_for_the_nodes_own_allocations() {
    use skiff_controller::state::{Allocation, Command, DesiredStatus};
    use skiff_tls::pki::{key_and_csr, now_unix};
    use skiff_tls::{Identity, JoinToken};

    let c = TestCluster::start(1, TestCluster::settings()).await;
    let addr = c.rpc[0];
    let admin = c.admin().clone();
    let mut jobs = c.jobs(1).await;
    apply(
        &mut jobs,
        "name = \"web\"\nimage = \"127.0.0.1:5000/demo/web:1.0\"\nnamespace = \"shop\"\n\
         [[ports]]\nname = \"http\"\nport = 8080\n[service]\nname = \"www\"\nport = \"http\"\n"
            .into(),
    )
    .await
    .expect("apply web");
    apply(&mut jobs, spec("batch", 1))
        .await
        .expect("apply batch");
    let mut nodes = Vec::new();
    for name in ["n1", "n2"] {
        let token: JoinToken = c.token("agent", 1, 3600).await.parse().expect("token");
        let m = skiff_tls::enroll::join(&addr.to_string(), &token, name, 0, &[])
            .await
            .expect("enroll");
        let creds = forged(&admin, m.cert_pem, m.key_pem);
        let key = if name == "n1" { KEY1 } else { KEY2 };
        skiff_proto::v1::nodes_client::NodesClient::new(c.channel(1, &creds).await)
            .register(reg(name, key))
            .await
            .expect("register");
        nodes.push(creds);
    }
    let alloc = |id: &str, job: &str, namespace: &str| {
        Allocation::new_pending(id, namespace, job, 1, "n1", 1)
    };
    c.member(1)
        .node()
        .write(Command::PlaceAllocations {
            allocations: vec![alloc("w1", "web", "shop"), alloc("b1", "batch", "default")],
        })
        .await
        .expect("write")
        .0
        .expect("placed");

    let (key, csr) = key_and_csr("workload").expect("csr");
    let c = &c;
    let sign_for = |creds: Credentials, allocation: &str, csr: String, ttl_seconds: u64| {
        let allocation = allocation.to_owned();
        async move {
            PkiClient::new(c.channel(1, &creds).await)
                .sign_workload(pb::SignWorkloadRequest {
                    allocation,
                    csr_pem: csr,
                    ttl_seconds,
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let sign =
        |creds: Credentials, allocation: &str, csr: String| sign_for(creds, allocation, csr, 0);
    let issued = sign(nodes[0].clone(), "w1", csr.clone())
        .await
        .expect("n1 signs for its allocation");
    let info = skiff_tls::Material {
        ca_pem: issued.ca_pem.clone(),
        cert_pem: issued.cert_pem.clone(),
        key_pem: key.clone(),
    }
    .info()
    .expect("a cluster certificate");
    assert_eq!(
        info.identity,
        Identity::Workload {
            namespace: "shop".into(),
            service: "www".into()
        }
    );
    assert_eq!(info.identity.uri(), "spiffe://skiff/ns/shop/svc/www");
    let life = info.not_after - now_unix();
    assert!((86_000..=86_400).contains(&life), "lifetime {life}s");
    // The service's DNS name, which a caller's TLS checks against the name it dialled.
    assert_eq!(info.names, vec!["www.shop.skiff.internal".to_string()]);
    // A shorter life when asked (the agent's --mesh-cert-ttl); too short or too long refused.
    let short = sign_for(nodes[0].clone(), "w1", csr.clone(), 60)
        .await
        .expect("a one-minute certificate");
    let short = skiff_tls::Material {
        ca_pem: short.ca_pem,
        cert_pem: short.cert_pem,
        key_pem: key.clone(),
    }
    .info()
    .expect("a cluster certificate");
    let life = short.not_after - now_unix();
    assert!((55..=60).contains(&life), "lifetime {life}s");
    for ttl in [10, 86_401] {
        let err = sign_for(nodes[0].clone(), "w1", csr.clone(), ttl)
            .await
            .expect_err("lifetime out of bounds");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    }
    let recorded = c
        .member(1)
        .node()
        .state()
        .state
        .pki()
        .certs
        .get(&info.serial)
        .map(|r| r.identity.clone());
    assert_eq!(recorded.as_deref(), Some("spiffe://skiff/ns/shop/svc/www"));

    // Another node, a job without a service, an unknown allocation, a user, a member-less
    // identity: refused, with the reason.
    let before = pki_counts(c);
    let err = sign(nodes[1].clone(), "w1", csr.clone())
        .await
        .expect_err("n2 for n1's allocation");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("not assigned to node n2"),
        "{}",
        err.message()
    );
    let err = sign(nodes[0].clone(), "b1", csr.clone())
        .await
        .expect_err("no service");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("publishes no service and is not in the mesh"),
        "{}",
        err.message()
    );
    let err = sign(nodes[0].clone(), "nope", csr.clone())
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = sign(admin.clone(), "w1", csr.clone())
        .await
        .expect_err("a user");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = sign(nodes[0].clone(), "w1", "not a csr".into())
        .await
        .expect_err("garbage csr");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(pki_counts(c), before, "nothing recorded for a refusal");

    // The workload's certificate opens no controller API, and is not renewed by itself.
    let workload = forged(&admin, issued.cert_pem, key);
    let err = JobsClient::new(c.channel(1, &workload).await)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect_err("a workload lists jobs");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = sign(workload.clone(), "w1", csr.clone())
        .await
        .expect_err("a workload signs");
    assert_eq!(err.code(), Code::PermissionDenied);
    let (_, csr2) = key_and_csr("again").expect("csr");
    let err = PkiClient::new(c.channel(1, &workload).await)
        .renew(pb::RenewRequest {
            csr_pem: csr2,
            addresses: vec![],
        })
        .await
        .expect_err("a workload renews");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Once the allocation is stopped, no new certificate for it.
    c.member(1)
        .node()
        .write(Command::SetAllocationDesired {
            id: "w1".into(),
            desired: DesiredStatus::Stop,
        })
        .await
        .expect("write")
        .0
        .expect("stopped");
    let err = sign(nodes[0].clone(), "w1", csr)
        .await
        .expect_err("stopped allocation");
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// A new leader gives each node what is left of its grace, as the last leader's clock said
/// (followers read it every second): a node silent since before the failover goes down at its
/// own deadline, not a whole grace after the election; a node that keeps beating, through the
/// failover to the new leader, is never marked down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t66_liveness_survives_a_leader_change_without_a_whole_new_grace() {
    use skiff_controller::state::NodeStatus;
    use skiff_proto::v1::nodes_client::NodesClient;
    let grace = Duration::from_secs(10);
    let mut c = TestCluster::start_full(
        3,
        TestCluster::settings(),
        (Duration::from_secs(3600), 10),
        grace,
    )
    .await;
    let leader = c.wait_leader().await;
    let mut channels = Vec::new();
    for id in 1..=3 {
        channels.push(c.member_channel(id).await);
    }
    let mut nodes = NodesClient::new(channels[leader as usize - 1].clone());
    for (name, key) in [("n1", KEY1), ("n2", KEY2)] {
        nodes.register(reg(name, key)).await.expect("register");
    }
    // Both beat long enough for the followers to read the clock; then n2 falls silent and n1
    // goes on, to whichever member takes its heartbeat (the leader).
    let beats = {
        let channels = channels.clone();
        tokio::spawn(async move {
            let mut n2 = true;
            let started = tokio::time::Instant::now();
            loop {
                if started.elapsed() > Duration::from_millis(1500) {
                    n2 = false;
                }
                for name in ["n1", "n2"].into_iter().filter(|n| *n == "n1" || n2) {
                    for ch in &channels {
                        let mut c = NodesClient::new(ch.clone());
                        let mut req = tonic::Request::new(beat(name, vec![]));
                        req.set_timeout(Duration::from_millis(300));
                        if c.heartbeat(req).await.is_ok() {
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let status = |c: &TestCluster, id: u64, name: &str| {
        c.member(id)
            .node()
            .state()
            .state
            .node(name)
            .map(|n| n.status)
    };
    tokio::time::sleep(Duration::from_millis(1500 + 3000)).await;
    // n2 has been silent for about 3 s: it has about 7 s of grace left.
    let killed = tokio::time::Instant::now();
    c.kill(leader).await;
    let survivor = (1..=3).find(|id| *id != leader).expect("a survivor");
    let mut down_after = None;
    while killed.elapsed() < Duration::from_secs(15) {
        if status(&c, survivor, "n2") == Some(NodeStatus::Down) {
            down_after = Some(killed.elapsed());
            break;
        }
        assert_eq!(
            status(&c, survivor, "n1"),
            Some(NodeStatus::Ready),
            "n1 beats through the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let down_after = down_after.expect("n2 marked down within 15 s of the failover");
    // Its own deadline (~7 s after the kill), at least 5 s after the election; a whole new
    // grace would have been 10 s after the election.
    assert!(
        down_after > Duration::from_millis(4500) && down_after < Duration::from_millis(9000),
        "n2 down {down_after:?} after the leader was killed"
    );
    assert_eq!(status(&c, survivor, "n1"), Some(NodeStatus::Ready));
    beats.abort();
    c.shutdown().await;
}

/// A node whose agent reports disk pressure gets nothing new (the pending reason names it);
/// what it runs stays; once the pressure is gone, what was pending is placed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t67_disk_pressure_keeps_new_work_off_a_node_until_it_clears() {
    use skiff_proto::v1::nodes_client::NodesClient;
    let c = TestCluster::start(1, TestCluster::settings()).await;
    let leader = c.wait_leader().await;
    let mut nodes = NodesClient::new(c.member_channel(leader).await);
    let mut jobs = c.jobs(leader).await;
    for (name, key) in [("n1", KEY1), ("n2", KEY2)] {
        nodes.register(reg(name, key)).await.expect("register");
    }
    let pressure = |node: &str, on: bool| pb::HeartbeatRequest {
        disk_pressure: on,
        ..beat(node, vec![])
    };
    nodes
        .heartbeat(pressure("n1", true))
        .await
        .expect("heartbeat");
    let listed = nodes
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect("nodes")
        .into_inner()
        .nodes;
    let n1 = listed.iter().find(|n| n.name == "n1").expect("n1");
    assert!(n1.disk_pressure, "{n1:?}");
    // Each node fits one replica; n1 is under pressure: one runs on n2, one waits.
    let text = "name = \"big\"\nimage = \"127.0.0.1:5000/demo/web:1.0\"\nreplicas = 2\n\
                [resources]\nmemory = \"600Mi\"\npids = 50\n";
    apply(&mut jobs, text.into()).await.expect("apply");
    eventually(
        "one replica on n2, one pending",
        Duration::from_secs(10),
        || {
            let mut jobs = jobs.clone();
            async move {
                let job = jobs
                    .get_job(pb::GetJobRequest {
                        name: "big".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("get job")
                    .into_inner();
                let placed: Vec<&str> = job.allocations.iter().map(|a| a.node.as_str()).collect();
                placed == ["n2"] && job.pending.contains("1 node disk pressure")
            }
        },
    )
    .await;
    // The same report again writes nothing.
    let before = c.member(leader).node().status().last_log_index;
    nodes
        .heartbeat(pressure("n1", true))
        .await
        .expect("heartbeat");
    assert_eq!(c.member(leader).node().status().last_log_index, before);
    // Pressure gone: the pending replica goes to n1.
    nodes
        .heartbeat(pressure("n1", false))
        .await
        .expect("heartbeat");
    eventually("the second replica on n1", Duration::from_secs(10), || {
        let mut jobs = jobs.clone();
        async move {
            let mut on: Vec<String> = allocations_of(&mut jobs, "big")
                .await
                .into_iter()
                .map(|a| a.node)
                .collect();
            on.sort();
            on == ["n1", "n2"]
        }
    })
    .await;
    c.shutdown().await;
}

/// A rolling upgrade from a release before a command level (the members held at level 0, then
/// restarted at this release's level one at a time): while any member has not said it applies
/// a command's level, that command is not written, and a direct write names the level and
/// the way out. Heartbeats, jobs and pending reasons go on meanwhile in the older release's
/// commands (disk pressure waits); once the last member is upgraded, the newer commands are
/// written and `ListMembers` shows every member's release and level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t68_a_rolling_upgrade_writes_only_what_every_member_reads() {
    use skiff_controller::state::{COMMAND_LEVEL, Command};
    use skiff_proto::v1::nodes_client::NodesClient;
    let old = RaftSettings {
        command_level: 0,
        ..TestCluster::settings()
    };
    let mut c = TestCluster::start(3, old.clone()).await;
    let leader = c.wait_leader().await;
    NodesClient::new(c.member_channel(leader).await)
        .register(reg("n1", KEY1))
        .await
        .expect("register");
    let pressure = |on: bool| pb::HeartbeatRequest {
        disk_pressure: on,
        ..beat("n1", vec![])
    };
    // Nowhere to run: the reconciler records why.
    let huge = "name = \"huge\"\nimage = \"127.0.0.1:5000/demo/web:1.0\"\nreplicas = 1\n\
                [resources]\nmemory = \"100Gi\"\n";
    apply(&mut c.jobs(leader).await, huge.into())
        .await
        .expect("apply");
    for upgrade in 1..=3u64 {
        let leader = c.wait_leader().await;
        let node = c.member(leader).node().clone();
        assert_eq!(node.cluster_level(), 0, "before upgrading member {upgrade}");
        let err = node
            .write(Command::SetNodeDiskPressure {
                name: "n1".into(),
                pressure: true,
                at_ms: 0,
            })
            .await
            .expect_err("a level-1 command while a member is at level 0")
            .to_string();
        assert!(
            err.contains("set_node_disk_pressure needs command level 1")
                && err.contains("finish upgrading"),
            "{err}"
        );
        let mut nodes = NodesClient::new(c.member_channel(leader).await);
        nodes
            .heartbeat(pressure(true))
            .await
            .expect("a heartbeat reporting pressure still succeeds");
        let recorded = node.state().state.node("n1").map(|n| n.disk_pressure);
        assert_eq!(recorded, Some(false), "pressure recorded at level 0");
        // A fenced job needs level 2: refused with the way out, nothing written.
        let fenced = "name = \"lock\"\nimage = \"127.0.0.1:5000/demo/web:1.0\"\n\
                      [disconnect]\nstop_after = \"20s\"\n";
        let err = apply(&mut c.jobs(leader).await, fenced.into())
            .await
            .expect_err("a fenced job while a member is at level 0");
        assert!(
            err.message().contains("needs command level 2")
                && err.message().contains("finish upgrading"),
            "{}",
            err.message()
        );
        // Writes go on: a job per step, through any member.
        let name = format!("w{upgrade}");
        apply(&mut c.jobs(leader).await, spec(&name, 1))
            .await
            .expect("apply during the upgrade");
        let jobs = c.jobs(leader).await;
        eventually("the pending reason", Duration::from_secs(10), || {
            let mut jobs = jobs.clone();
            async move {
                let job = jobs
                    .get_job(pb::GetJobRequest {
                        name: "huge".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("get job")
                    .into_inner();
                !job.pending.is_empty()
            }
        })
        .await;
        // Upgrade the next member.
        c.kill(upgrade).await;
        c.settings.command_level = COMMAND_LEVEL;
        c.restart(upgrade).await;
        c.settings = old.clone();
        c.wait_leader().await;
        c.wait_converged().await;
    }
    let leader = c.wait_leader().await;
    eventually(
        "every member known at this release's level",
        Duration::from_secs(15),
        || {
            let level = c.member(leader).node().cluster_level();
            async move { level == COMMAND_LEVEL }
        },
    )
    .await;
    let listed = c
        .cluster_client(leader)
        .await
        .list_members(pb::ListMembersRequest {})
        .await
        .expect("members")
        .into_inner();
    assert_eq!(listed.cluster_command_level, COMMAND_LEVEL);
    for m in &listed.members {
        assert_eq!(
            (m.command_level, m.release.as_str()),
            (COMMAND_LEVEL, env!("CARGO_PKG_VERSION")),
            "{m:?}"
        );
    }
    let mut nodes = NodesClient::new(c.member_channel(leader).await);
    nodes.heartbeat(pressure(true)).await.expect("heartbeat");
    let recorded = c
        .member(leader)
        .node()
        .state()
        .state
        .node("n1")
        .map(|n| n.disk_pressure);
    assert_eq!(recorded, Some(true), "pressure recorded after the upgrade");
    let names = c.job_names(leader);
    for want in ["huge", "w1", "w2", "w3"] {
        assert!(names.contains(want), "{want} lost: {names:?}");
    }
    c.shutdown().await;
}

/// One request frame of the members' Raft transport (`controller/src/raft/wire.rs`) and its
/// reply: (status, text).
async fn wire_call(
    ctx: &skiff_tls::TlsContext,
    addr: SocketAddr,
    kind: u8,
    target: u64,
    payload: &[u8],
) -> std::io::Result<(u8, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = skiff_tls::net::connect_raft(ctx, &addr.to_string()).await?;
    let len = (17 + payload.len()) as u32;
    s.write_all(&len.to_le_bytes()).await?;
    s.write_all(&[kind]).await?;
    s.write_all(&target.to_le_bytes()).await?;
    s.write_all(&0u64.to_le_bytes()).await?;
    s.write_all(payload).await?;
    s.flush().await?;
    let len = s.read_u32_le().await? as usize;
    let mut reply = vec![0; len];
    s.read_exact(&mut reply).await?;
    Ok((reply[0], String::from_utf8_lossy(&reply[1..]).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t71_the_members_raft_transport_answers_members_only() {
    use skiff_tls::TlsContext;
    let c = TestCluster::start(1, TestCluster::settings()).await;
    let addr = c.rpc[0];

    // An admin's certificate passes the handshake (it is the cluster CA's) but not the
    // RaftInternal policy: every request is refused, naming why.
    let admin = TlsContext::new(c.admin().material()).expect("admin ctx");
    let (status, text) = wire_call(&admin, addr, 1, 1, b"{}").await.expect("call");
    assert_eq!(status, 1, "{text}");
    assert!(
        text.contains("refused") && text.contains("may not call"),
        "{text}"
    );

    // A member: a request for another member and a malformed one get clear errors.
    let member = TlsContext::new(member_creds(&c.data_dir(1)).material()).expect("member ctx");
    let (status, text) = wire_call(&member, addr, 1, 99, b"{}").await.expect("call");
    assert_eq!(
        (status, text.as_str()),
        (1, "this is member 1, not member 99")
    );
    let (status, text) = wire_call(&member, addr, 1, 1, b"{not json")
        .await
        .expect("call");
    assert_eq!(status, 1);
    assert!(text.starts_with("malformed raft message"), "{text}");
    let (status, text) = wire_call(&member, addr, 9, 1, b"{}").await.expect("call");
    assert_eq!((status, text.as_str()), (1, "unknown request kind 9"));

    // A certificate of another CA does not get through the handshake.
    let rogue = skiff_tls::CaKey::generate("rogue").expect("rogue CA");
    let (k, csr) = skiff_tls::pki::key_and_csr("m").expect("csr");
    let rogue_member = rogue
        .issue(
            &csr,
            &skiff_tls::Identity::Member(1),
            &[],
            Duration::from_secs(3600),
        )
        .expect("rogue member");
    let forged_ctx =
        TlsContext::new(forged(c.admin(), rogue_member.cert_pem, k).material()).expect("rogue ctx");
    assert!(wire_call(&forged_ctx, addr, 1, 1, b"{}").await.is_err());

    // A listener that does not serve the transport (an agent's, an older member's) refuses
    // the handshake in a way the client recognises, and falls back to gRPC.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let other = listener.local_addr().expect("addr");
    let ctx = member;
    let mut incoming = skiff_tls::net::incoming(listener, ctx.clone(), false);
    tokio::spawn(async move {
        use tokio_stream::StreamExt;
        while incoming.next().await.is_some() {}
    });
    let err = skiff_tls::net::connect_raft(&ctx, &other.to_string())
        .await
        .expect_err("no raft transport there");
    assert!(skiff_tls::net::is_alpn_refusal(&err), "{err:?}");

    // The cluster still writes through it.
    let mut jobs = c.jobs(1).await;
    apply(&mut jobs, spec("after-wire", 1))
        .await
        .expect("apply");
    c.shutdown().await;
}

/// Right after a cluster forms, the members' command levels are learned before the first
/// pending reasons fall due, so those reasons go to the log in one batch entry: not one
/// entry per job, as a member that has not said its level would force (that fallback is for
/// a rolling upgrade, and put hundreds of entries in front of the first clients' writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t72_the_first_pending_reasons_after_a_start_go_in_one_entry() {
    use skiff_controller::state::events::SEQ_SHIFT;
    let c = TestCluster::start(3, TestCluster::settings()).await;
    let leader = c.wait_leader().await;
    // No node is registered: every job has nowhere to run, and gets a pending reason.
    let names: Vec<String> = (0..10).map(|i| format!("cold-{i}")).collect();
    let mut jobs = c.jobs(leader).await;
    for name in &names {
        apply(&mut jobs, spec(name, 1)).await.expect("apply");
    }
    let node = c.member(leader).node().clone();
    let entries_of_reasons = || {
        let applied = node.state();
        let mut entries: Vec<u64> = applied
            .state
            .events()
            .filter(|e| e.kind == "pending" && names.contains(&e.job))
            .map(|e| e.seq >> SEQ_SHIFT)
            .collect();
        let jobs = entries.len();
        entries.dedup();
        (jobs, entries)
    };
    let want = names.len();
    eventually(
        "a pending reason for every job",
        Duration::from_secs(15),
        || {
            let (jobs, _) = entries_of_reasons();
            async move { jobs == want }
        },
    )
    .await;
    let (_, entries) = entries_of_reasons();
    // One entry, or two if the reconciler's batch fell due between two of the applies.
    assert!(
        entries.len() <= 2,
        "the reasons of {want} jobs went in {} log entries: {entries:?}",
        entries.len()
    );
    c.shutdown().await;
}
