//! [`RaftNode`]: the controller's one handle on consensus. Everything else in the controller
//! talks to this type and never sees an openraft type.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::{ChangeMembers, Config, Raft, ReadPolicy, ServerState, SnapshotPolicy};
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use skiff_proto::v1::AddMemberRequest;
use tokio::sync::watch;
use tokio::time::{Instant, sleep};

use super::log_store::LogStore;
use super::network::{
    Channels, NetworkFactory, PeerError, decode_reply, encode, status_to_peer_error,
};
use super::state_machine::{Applied, StateMachineStore};
use super::types::{Member, MemberId, Request, TypeConfig};
use crate::state::{ApplyResult, COMMAND_LEVEL, Command};

/// Raft timing and compaction settings. The defaults suit loaded 2-core hosts: openraft's own
/// (50 ms heartbeat, 150-300 ms election timeout) make a busy host call needless elections.
/// A follower only campaigns once the leader's lease (= `election_timeout_max_ms`) *and* a
/// random election timeout have passed since the last heartbeat, so with 100 ms heartbeats
/// and 400-800 ms timeouts a member tolerates 1.2-1.6 s of silence (etcd's defaults: 1-2 s)
/// and a dead leader is replaced in about that time.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSettings {
    /// Leader heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// A follower that hears nothing for a random time in [min, max] ms starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log) every this many applied entries.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot, so a lagging follower can often catch up from the
    /// log instead of needing the snapshot (openraft#1706).
    pub keep_after_snapshot: u64,
    /// The newest command level this member says it applies (at most
    /// [`COMMAND_LEVEL`], the default). Members hold on to the level a member last gave, so
    /// holding a member back works from its first start at the new release: holding every
    /// member at an older release's level keeps the cluster from writing anything that
    /// release cannot read, so the members can still go back to it.
    pub command_level: u32,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            command_level: COMMAND_LEVEL,
        }
    }
}

/// Failures of the consensus layer, as the API sees them.
#[derive(Debug, thiserror::Error)]
pub enum RaftNodeError {
    #[error("opening raft storage in {path}: {source}")]
    Storage {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid raft settings: {0}")]
    Settings(String),
    #[error("no leader is known (the cluster may be electing one or has lost its quorum)")]
    NoLeader,
    #[error("the leader could not reach a quorum in time")]
    NoQuorum,
    #[error("raft stopped: {0}")]
    Fatal(String),
    #[error("the write's outcome is unknown: {0}")]
    Indeterminate(String),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(
        "{command} needs command level {level}, and member(s) {behind:?} have not said they \
         apply it (an older release, or not reached yet): finish upgrading them"
    )]
    NotAllMembersApply {
        command: &'static str,
        level: u32,
        behind: Vec<MemberId>,
    },
}

/// A member's role as shown by the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }
}

/// One member's view of itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub id: MemberId,
    pub role: Role,
    pub term: u64,
    pub leader: Option<MemberId>,
    pub last_log_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    /// Log entries at or below this index have been compacted away.
    pub purged_index: u64,
    pub fatal: Option<String>,
    /// The newest command level the member applies (0 from a release before levels).
    #[serde(default)]
    pub command_level: u32,
    /// The member's release (empty from a release before this field).
    #[serde(default)]
    pub release: String,
}

/// A member of the cluster membership.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: MemberId,
    pub member: Member,
    pub voter: bool,
}

/// The reply to a forwarded write.
#[derive(Serialize, Deserialize)]
pub(crate) struct Proposed {
    pub result: ApplyResult,
    pub index: u64,
}

/// What a forwarded request got back when the receiver is not the leader either.
#[derive(Serialize, Deserialize)]
pub(crate) enum NotLeader {
    NotLeader { leader: Option<(MemberId, String)> },
}

/// A forwarded membership change's failure: a refusal stays a refusal.
fn membership_status(addr: &str, s: tonic::Status) -> RaftNodeError {
    if s.code() == tonic::Code::FailedPrecondition {
        RaftNodeError::Membership(s.message().to_string())
    } else {
        status_to_peer_error(addr, s).into()
    }
}

struct Inner {
    id: MemberId,
    me: Member,
    raft: Raft<TypeConfig, StateMachineStore>,
    sm: StateMachineStore,
    channels: Channels,
    /// The applied index and the fatal error, forwarded from openraft's metrics by one task
    /// (see [`forward_metrics`]); both close when the Raft core stops.
    applied: watch::Receiver<u64>,
    fatal: watch::Receiver<Option<String>>,
    /// This member's command level ([`RaftSettings::command_level`]).
    command_level: u32,
    /// The command level each other member last said it applies. A member's level only goes
    /// up during an upgrade, so the last answer stands while it is unreachable; a member never
    /// heard from counts as level 0.
    levels: std::sync::Mutex<BTreeMap<MemberId, u32>>,
}

/// Follows the applied index (see [`RaftNode::applied_watch`]).
pub struct AppliedWatch {
    rx: watch::Receiver<u64>,
    last: Option<u64>,
}

impl AppliedWatch {
    /// Waits until the applied index differs from the one last returned; returns it, or
    /// `None` once the member has shut down.
    pub async fn changed(&mut self) -> Option<u64> {
        loop {
            let now = *self.rx.borrow_and_update();
            if self.last != Some(now) {
                self.last = Some(now);
                return Some(now);
            }
            self.rx.changed().await.ok()?;
        }
    }
}

/// Forwards the applied index and a fatal error from openraft's metrics into watches of their
/// own. openraft publishes its metrics several times per entry (appended, flushed, committed,
/// applied), and every task waiting on them wakes each time: with the reconciler, the agents'
/// view, settings, the PKI and the API's waits all on the metrics, that was a dozen task
/// wake-ups per write on every member. Now one task wakes, and the others only when the
/// applied index moves. Ends, closing both watches, when the Raft core stops.
fn applied_index(m: &openraft::RaftMetrics<TypeConfig>) -> u64 {
    m.last_applied.as_ref().map(|l| l.index).unwrap_or(0)
}

fn forward_metrics(
    mut metrics: openraft::type_config::alias::WatchReceiverOf<
        TypeConfig,
        openraft::RaftMetrics<TypeConfig>,
    >,
    applied: watch::Sender<u64>,
    fatal: watch::Sender<Option<String>>,
) {
    tokio::spawn(async move {
        loop {
            {
                let m = metrics.borrow_watched();
                let now = applied_index(&m);
                applied.send_if_modified(|v| {
                    let moved = *v != now;
                    *v = now;
                    moved
                });
                if let Err(e) = &m.running_state
                    && fatal.borrow().is_none()
                {
                    fatal.send_replace(Some(e.to_string()));
                }
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    });
}

/// A controller member's consensus handle. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    inner: Arc<Inner>,
}

const WRITE_DEADLINE: Duration = Duration::from_secs(10);
const READ_DEADLINE: Duration = Duration::from_secs(5);

impl RaftNode {
    /// Opens this member's storage under `dir` and starts its Raft core.
    pub async fn open(
        id: MemberId,
        me: Member,
        dir: &Path,
        settings: &RaftSettings,
        apply_seconds: Histogram,
        tls: Arc<skiff_tls::TlsContext>,
    ) -> Result<Self, RaftNodeError> {
        let storage_err = |source| RaftNodeError::Storage {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(storage_err)?;
        let log = LogStore::open(&dir.join("raft-log")).map_err(storage_err)?;
        let sm =
            StateMachineStore::open(&dir.join("snapshots"), apply_seconds).map_err(storage_err)?;
        let config = Config {
            cluster_name: "skiff".to_string(),
            heartbeat_interval: settings.heartbeat_ms,
            election_timeout_min: settings.election_timeout_min_ms,
            election_timeout_max: settings.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
            max_in_snapshot_log_to_keep: settings.keep_after_snapshot,
            install_snapshot_timeout: 10_000,
            enable_pre_vote: Some(true),
            // The log store acknowledges appends from its writer thread after fsync, so
            // entries can go to followers while the leader's own fsync runs.
            broadcast_submitted_on_append: Some(true),
            ..Default::default()
        }
        .validate()
        .map_err(|e| RaftNodeError::Settings(e.to_string()))?;
        let channels = Channels::new(tls);
        let network = NetworkFactory {
            me: id,
            channels: channels.clone(),
        };
        let raft = Raft::new(id, Arc::new(config), network, log, sm.clone())
            .await
            .map_err(|e| RaftNodeError::Fatal(e.to_string()))?;
        let now = applied_index(&raft.metrics().borrow_watched());
        let (applied_tx, applied) = watch::channel(now);
        let (fatal_tx, fatal) = watch::channel(None);
        forward_metrics(raft.metrics(), applied_tx, fatal_tx);
        Ok(RaftNode {
            inner: Arc::new(Inner {
                id,
                me,
                raft,
                sm,
                channels,
                applied,
                fatal,
                command_level: settings.command_level.min(COMMAND_LEVEL),
                levels: std::sync::Mutex::new(BTreeMap::new()),
            }),
        })
    }

    pub fn id(&self) -> MemberId {
        self.inner.id
    }

    /// A (cached, mutual TLS) channel to a member.
    pub fn channel(&self, addr: &str) -> Result<tonic::transport::Channel, PeerError> {
        self.inner.channels.get(addr)
    }

    pub fn me(&self) -> &Member {
        &self.inner.me
    }

    pub(crate) fn raft(&self) -> &Raft<TypeConfig, StateMachineStore> {
        &self.inner.raft
    }

    /// Whether this member has ever been part of a cluster (has a membership in its log).
    pub async fn is_initialized(&self) -> Result<bool, RaftNodeError> {
        self.inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| RaftNodeError::Fatal(e.to_string()))
    }

    /// Makes this member the only voter of a new cluster. Does nothing if it already belongs
    /// to one.
    pub async fn bootstrap(&self) -> Result<(), RaftNodeError> {
        if self.is_initialized().await? {
            return Ok(());
        }
        let members = [(self.inner.id, self.inner.me.clone())]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>();
        match self.inner.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(e)) => Err(RaftNodeError::Membership(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(RaftNodeError::Fatal(f.to_string())),
        }
    }

    /// Asks the cluster reachable at `addr` to add this member, retrying until `deadline`.
    pub async fn join_via(&self, addr: &str, deadline: Duration) -> Result<(), RaftNodeError> {
        let until = Instant::now() + deadline;
        let req = AddMemberRequest {
            id: self.inner.id,
            rpc_addr: self.inner.me.rpc_addr.clone(),
            http_addr: self.inner.me.http_addr.clone(),
        };
        loop {
            let res = async {
                let mut client = self.inner.channels.client(addr)?;
                client
                    .join(req.clone())
                    .await
                    .map_err(|s| status_to_peer_error(addr, s))
            }
            .await;
            match res {
                Ok(_) => return Ok(()),
                Err(PeerError::Remote { message, .. }) if message.starts_with("refused:") => {
                    return Err(RaftNodeError::Membership(message));
                }
                Err(e) if Instant::now() >= until => return Err(e.into()),
                Err(e) => {
                    tracing::info!(peer = %addr, error = %e, "join not accepted yet, retrying");
                    sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Commits a command, forwarding it to the leader when this member is not the leader, and
    /// returns the state machine's result and the log index it was committed at.
    pub async fn write(&self, command: Command) -> Result<(ApplyResult, u64), RaftNodeError> {
        self.admit(&command).await?;
        let until = Instant::now() + WRITE_DEADLINE;
        loop {
            let leader = match self.inner.raft.client_write(Request(command.clone())).await {
                Ok(resp) => {
                    let index = resp.log_id.index;
                    return match resp.data.0 {
                        Some(r) => Ok((r, index)),
                        None => Err(RaftNodeError::Indeterminate(
                            "no result for a command entry".into(),
                        )),
                    };
                }
                Err(RaftError::Fatal(f)) => return Err(RaftNodeError::Fatal(f.to_string())),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    f.leader_id.zip(f.leader_node.map(|n| n.rpc_addr))
                }
                Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f))) => {
                    return Err(RaftNodeError::Indeterminate(f.to_string()));
                }
                Err(RaftError::APIError(e)) => {
                    return Err(RaftNodeError::Membership(e.to_string()));
                }
            };
            if let Some((leader_id, addr)) = leader {
                match self.forward_propose(leader_id, &addr, &command).await {
                    Ok(Ok(p)) => return Ok((p.result, p.index)),
                    // The leader moved on: go round again with fresh metrics.
                    Ok(Err(NotLeader::NotLeader { .. })) => {}
                    Err(e @ PeerError::Timeout { .. }) => {
                        return Err(RaftNodeError::Indeterminate(e.to_string()));
                    }
                    Err(e) => tracing::debug!(peer = %addr, error = %e, "forwarding write failed"),
                }
            }
            if Instant::now() >= until {
                return Err(RaftNodeError::NoLeader);
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    async fn forward_propose(
        &self,
        leader: MemberId,
        addr: &str,
        command: &Command,
    ) -> Result<Result<Proposed, NotLeader>, PeerError> {
        let mut client = self.inner.channels.client(addr)?;
        let mut req = tonic::Request::new(skiff_proto::v1::RaftRequest {
            target: leader,
            from: self.inner.id,
            payload: encode(command),
        });
        req.set_timeout(WRITE_DEADLINE);
        let reply = client
            .propose(req)
            .await
            .map_err(|s| status_to_peer_error(addr, s))?;
        decode_reply(addr, reply.into_inner())
    }

    /// Called on the leader for a write forwarded by a follower.
    pub(crate) async fn propose_local(
        &self,
        command: Command,
    ) -> Result<Result<Proposed, NotLeader>, RaftNodeError> {
        self.admit(&command).await?;
        match self.inner.raft.client_write(Request(command)).await {
            Ok(resp) => match resp.data.0 {
                Some(result) => Ok(Ok(Proposed {
                    result,
                    index: resp.log_id.index,
                })),
                None => Err(RaftNodeError::Indeterminate(
                    "no result for a command entry".into(),
                )),
            },
            Err(RaftError::Fatal(f)) => Err(RaftNodeError::Fatal(f.to_string())),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Ok(Err(NotLeader::NotLeader {
                    leader: f.leader_id.zip(f.leader_node.map(|n| n.rpc_addr)),
                }))
            }
            Err(RaftError::APIError(e)) => Err(RaftNodeError::Indeterminate(e.to_string())),
        }
    }

    /// Makes the next read of the local state linearizable: gets the read index from the
    /// leader (a quorum round-trip) and waits until this member has applied up to it.
    /// Retries while the leader cannot reach a quorum or leadership moves (openraft#1851).
    pub async fn linearize(&self) -> Result<(), RaftNodeError> {
        let until = Instant::now() + READ_DEADLINE;
        loop {
            let attempt = self.read_index_once().await;
            let err = match attempt {
                Ok(index) => {
                    let left = until.saturating_duration_since(Instant::now());
                    return self
                        .inner
                        .raft
                        .wait(Some(left.max(Duration::from_millis(100))))
                        .applied_index_at_least(Some(index), "read index")
                        .await
                        .map(|_| ())
                        .map_err(|_| RaftNodeError::Timeout(READ_DEADLINE));
                }
                Err(e) => e,
            };
            if Instant::now() >= until {
                return Err(err);
            }
            tracing::debug!(error = %err, "read index not available yet, retrying");
            sleep(Duration::from_millis(50)).await;
        }
    }

    async fn read_index_once(&self) -> Result<u64, RaftNodeError> {
        match self.read_index_local().await? {
            Ok(index) => Ok(index),
            Err(NotLeader::NotLeader { leader: None }) => Err(RaftNodeError::NoLeader),
            Err(NotLeader::NotLeader {
                leader: Some((leader, addr)),
            }) => {
                let mut client = self.inner.channels.client(&addr)?;
                let mut req = tonic::Request::new(skiff_proto::v1::RaftRequest {
                    target: leader,
                    from: self.inner.id,
                    payload: encode(&()),
                });
                req.set_timeout(READ_DEADLINE);
                let reply = client
                    .read_index(req)
                    .await
                    .map_err(|s| status_to_peer_error(&addr, s))?;
                match decode_reply::<Result<u64, NotLeader>>(&addr, reply.into_inner())? {
                    Ok(i) => Ok(i),
                    Err(_) => Err(RaftNodeError::NoLeader),
                }
            }
        }
    }

    /// The read index if this member is the leader.
    pub(crate) async fn read_index_local(&self) -> Result<Result<u64, NotLeader>, RaftNodeError> {
        match self
            .inner
            .raft
            .get_read_linearizer(ReadPolicy::ReadIndex)
            .await
        {
            Ok(lin) => Ok(Ok(lin.read_log_id().index())),
            Err(RaftError::Fatal(f)) => Err(RaftNodeError::Fatal(f.to_string())),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                Ok(Err(NotLeader::NotLeader {
                    leader: f.leader_id.zip(f.leader_node.map(|n| n.rpc_addr)),
                }))
            }
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_))) => {
                Err(RaftNodeError::NoQuorum)
            }
        }
    }

    /// Read access to the applied state. Hold it briefly: applying waits for it.
    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.inner.sm.read()
    }

    /// A copy of the applied state, taken in O(1) (its maps are persistent): for work long
    /// enough that holding [`RaftNode::state`]'s lock through it would hold up applying
    /// entries, since a waiting writer blocks the lock.
    pub fn state_copy(&self) -> crate::state::ClusterState {
        self.inner.sm.read().state.clone()
    }

    /// Whether what agents are sent may have changed since the last call.
    pub fn take_published_dirty(&self) -> bool {
        self.inner.sm.take_published_dirty()
    }

    /// What applied entries touched since the last call (for the leader's reconciler).
    pub fn take_touched(&self) -> crate::state::Touched {
        self.inner.sm.take_touched()
    }

    /// This member's view of itself.
    /// Whether this member leads and a quorum acknowledged it within `within` (its
    /// replication requests sent since then were answered by a quorum, so no other leader
    /// can have been elected before that moment).
    pub fn leadership_confirmed(&self, within: std::time::Duration) -> bool {
        // Read under the watch's lock, not cloned: this runs on every heartbeat.
        let rx = self.inner.raft.metrics();
        let m = rx.borrow_watched();
        if m.state != ServerState::Leader {
            return false;
        }
        // The only voter: no other member can be elected, and no replication runs to keep
        // the quorum clock moving.
        let mut voters = m.membership_config.voter_ids();
        if voters.next() == Some(self.inner.id) && voters.next().is_none() {
            return true;
        }
        m.last_quorum_acked
            .as_ref()
            .is_some_and(|t| openraft::Instant::elapsed(&**t) < within)
    }

    pub fn status(&self) -> Status {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let role = match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        };
        Status {
            id: self.inner.id,
            role,
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            committed_index: m
                .cluster_committed
                .as_ref()
                .or(m.local_committed.as_ref())
                .map(|l| l.index)
                .unwrap_or(0),
            applied_index: m.last_applied.as_ref().map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.as_ref().map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.as_ref().map(|l| l.index).unwrap_or(0),
            fatal: m.running_state.as_ref().err().map(|e| e.to_string()),
            command_level: self.inner.command_level,
            release: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// The members of the membership that have not said they apply `level`.
    fn behind(&self, level: u32) -> Vec<MemberId> {
        if level > self.inner.command_level {
            return vec![self.inner.id];
        }
        let known = self.inner.levels.lock().unwrap_or_else(|e| e.into_inner());
        self.members()
            .into_iter()
            .filter(|m| m.id != self.inner.id && known.get(&m.id).copied().unwrap_or(0) < level)
            .map(|m| m.id)
            .collect()
    }

    /// [`RaftNode::allows`], after asking the members not yet known to apply `command`'s
    /// level (a member just started or joined has not been asked yet: `keep_levels` asks
    /// within 200 ms).
    async fn admit(&self, command: &Command) -> Result<(), RaftNodeError> {
        if self.allows(command).is_ok() {
            return Ok(());
        }
        self.learn_levels().await;
        self.allows(command)
    }

    /// Whether every member applies `command`'s level, so that it may be written; the
    /// error names the members that do not (yet).
    pub fn allows(&self, command: &Command) -> Result<(), RaftNodeError> {
        let level = command.level();
        if level == 0 {
            return Ok(());
        }
        let behind = self.behind(level);
        if behind.is_empty() {
            Ok(())
        } else {
            Err(RaftNodeError::NotAllMembersApply {
                command: command.kind(),
                level,
                behind,
            })
        }
    }

    /// The newest command level every member applies.
    pub fn cluster_level(&self) -> u32 {
        (0..=self.inner.command_level)
            .rev()
            .find(|l| self.behind(*l).is_empty())
            .unwrap_or(0)
    }

    /// Asks every other member which level it applies (in parallel, a second each): every
    /// 2 s from [`keep_levels`], and before a command not every member is known to apply.
    pub async fn learn_levels(&self) {
        // Every other member, each time: one known at a level may since have been rolled
        // back to an older release.
        self.ask_levels(false).await;
    }

    /// As [`RaftNode::learn_levels`]; with `only_unknown`, only the members whose level is
    /// not known yet (none, most of the time).
    async fn ask_levels(&self, only_unknown: bool) {
        let known: BTreeSet<MemberId> = if only_unknown {
            let known = self.inner.levels.lock().unwrap_or_else(|e| e.into_inner());
            known.keys().copied().collect()
        } else {
            BTreeSet::new()
        };
        let asks = self
            .members()
            .into_iter()
            .filter(|m| m.id != self.inner.id && !known.contains(&m.id))
            .map(|m| {
                let node = self.clone();
                async move {
                    let status = tokio::time::timeout(
                        Duration::from_secs(1),
                        node.peer_status(m.id, &m.member.rpc_addr),
                    )
                    .await;
                    (m.id, status)
                }
            });
        for (id, status) in futures::future::join_all(asks).await {
            if let Ok(Ok(s)) = status {
                let mut known = self.inner.levels.lock().unwrap_or_else(|e| e.into_inner());
                let before = known.insert(id, s.command_level);
                if before != Some(s.command_level) {
                    tracing::info!(
                        member = id,
                        level = s.command_level,
                        release = %s.release,
                        "member's command level"
                    );
                }
            }
        }
    }

    /// The membership as this member knows it, ordered by id.
    pub fn members(&self) -> Vec<MemberInfo> {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<MemberId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, member)| MemberInfo {
                id: *id,
                member: member.clone(),
                voter: voters.contains(id),
            })
            .collect()
    }

    /// The leader's id and address, if known.
    pub fn leader(&self) -> Option<(MemberId, Member)> {
        let id = self.status().leader?;
        let member = self.members().into_iter().find(|m| m.id == id)?.member;
        Some((id, member))
    }

    /// Asks a peer for its status.
    pub async fn peer_status(&self, id: MemberId, addr: &str) -> Result<Status, PeerError> {
        let mut client = self.inner.channels.client(addr)?;
        let mut req = tonic::Request::new(skiff_proto::v1::RaftRequest {
            target: id,
            from: self.inner.id,
            payload: encode(&()),
        });
        req.set_timeout(Duration::from_secs(1));
        let reply = client
            .status(req)
            .await
            .map_err(|s| status_to_peer_error(addr, s))?;
        decode_reply(addr, reply.into_inner())
    }

    /// Adds a member: as a learner first, promoted to voter once it has caught up. Runs on the
    /// leader; a follower forwards the request.
    pub async fn add_member(&self, id: MemberId, member: Member) -> Result<(), RaftNodeError> {
        if let Some(existing) = self.members().into_iter().find(|m| m.id == id) {
            if existing.member.rpc_addr != member.rpc_addr {
                return Err(RaftNodeError::Membership(format!(
                    "refused: member id {id} already belongs to {} (ids are never reused)",
                    existing.member.rpc_addr
                )));
            }
            if existing.voter {
                return Ok(());
            }
        }
        if let Some(forward) = self.forward_target()? {
            let (_leader, addr) = forward;
            let mut client = self.inner.channels.client(&addr)?;
            let mut req = tonic::Request::new(AddMemberRequest {
                id,
                rpc_addr: member.rpc_addr.clone(),
                http_addr: member.http_addr.clone(),
            });
            req.set_timeout(Duration::from_secs(60));
            client
                .join(req)
                .await
                .map_err(|s| membership_status(&addr, s))?;
            return Ok(());
        }
        let raft = &self.inner.raft;
        self.wait_membership_settled().await?;
        raft.add_learner(id, member, true)
            .await
            .map_err(|e| RaftNodeError::Membership(e.to_string()))?;
        raft.change_membership(
            ChangeMembers::AddVoterIds([id].into_iter().collect()),
            false,
        )
        .await
        .map_err(|e| RaftNodeError::Membership(e.to_string()))?;
        tracing::info!(member = id, "member added as voter");
        Ok(())
    }

    /// Removes a member (voter or learner). Runs on the leader; a follower forwards it.
    pub async fn remove_member(&self, id: MemberId) -> Result<(), RaftNodeError> {
        let Some(existing) = self.members().into_iter().find(|m| m.id == id) else {
            return Err(RaftNodeError::Membership(format!(
                "refused: member {id} is not in the cluster"
            )));
        };
        if existing.voter && self.members().iter().filter(|m| m.voter).count() == 1 {
            return Err(RaftNodeError::Membership(format!(
                "refused: member {id} is the last voter"
            )));
        }
        if let Some((_leader, addr)) = self.forward_target()? {
            let mut client = skiff_proto::v1::cluster_client::ClusterClient::new(
                self.inner.channels.get(&addr)?,
            );
            client
                .remove_member(skiff_proto::v1::RemoveMemberRequest { id })
                .await
                .map_err(|s| membership_status(&addr, s))?;
            return Ok(());
        }
        self.wait_membership_settled().await?;
        let change = if existing.voter {
            ChangeMembers::RemoveVoters([id].into_iter().collect())
        } else {
            ChangeMembers::RemoveNodes([id].into_iter().collect())
        };
        self.inner
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| RaftNodeError::Membership(e.to_string()))?;
        tracing::info!(member = id, "member removed");
        // Its certificates stop working at once: it can no longer talk to the cluster.
        let revoke = Command::Pki {
            change: crate::state::pki::PkiOp::Revoke {
                serials: vec![],
                identity: Some(skiff_tls::Identity::Member(id).uri()),
            },
        };
        match self.write(revoke).await {
            Ok((Ok(_), _)) => {}
            Ok((Err(e), _)) => tracing::warn!(member = id, error = %e, "revoking its certificates"),
            Err(e) => tracing::warn!(member = id, error = %e, "revoking its certificates"),
        }
        Ok(())
    }

    /// Waits until the leader's membership is committed and no change is in flight: before
    /// the first change (openraft#1885) and between changes, which must not overlap.
    async fn wait_membership_settled(&self) -> Result<(), RaftNodeError> {
        self.inner
            .raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| {
                    m.state == ServerState::Leader
                        && m.membership_config.log_id() == m.committed_membership_config.log_id()
                        && m.local_committed.is_some()
                },
                "membership committed",
            )
            .await
            .map(|_| ())
            .map_err(|e| RaftNodeError::Membership(format!("membership not settled: {e}")))
    }

    /// `None` if this member is the leader, else the leader to forward to.
    fn forward_target(&self) -> Result<Option<(MemberId, String)>, RaftNodeError> {
        let status = self.status();
        match status.leader {
            Some(l) if l == self.inner.id && status.role == Role::Leader => Ok(None),
            Some(l) => {
                let addr = self
                    .members()
                    .into_iter()
                    .find(|m| m.id == l)
                    .map(|m| m.member.rpc_addr)
                    .ok_or(RaftNodeError::NoLeader)?;
                Ok(Some((l, addr)))
            }
            None => Err(RaftNodeError::NoLeader),
        }
    }

    /// A watch of this member's applied index: resolves at every change of it.
    pub fn applied_watch(&self) -> AppliedWatch {
        AppliedWatch {
            rx: self.inner.applied.clone(),
            last: None,
        }
    }

    /// Resolves when the Raft core has stopped with a fatal error (e.g. a storage failure).
    pub async fn fatal(&self) -> String {
        let mut rx = self.inner.fatal.clone();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The core stopped: report its error if it had one.
                return rx
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| "raft metrics channel closed".to_string());
            }
        }
    }

    /// Triggers a snapshot now (used by tests and operators).
    pub async fn snapshot_now(&self) -> Result<(), RaftNodeError> {
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| RaftNodeError::Fatal(e.to_string()))
    }

    /// Stops the Raft core.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

/// How often [`keep_levels`] asks every member its level.
const LEVELS_EVERY: Duration = Duration::from_secs(2);
/// How often [`keep_levels`] asks the members whose level is not known.
const LEVELS_UNKNOWN_EVERY: Duration = Duration::from_millis(200);

/// Learns the other members' command levels: every member every 2 s, and a member whose
/// level is not known (this member just started, a member just joined or has not answered)
/// every 200 ms. Until then a command of a newer level is not written: the reconciler writes
/// one entry per pending reason instead of one per batch, which right after a start put
/// hundreds of entries in front of the first clients' writes.
pub async fn keep_levels(node: RaftNode, mut stop: watch::Receiver<bool>) {
    let mut asked: Option<Instant> = None;
    while !*stop.borrow() {
        if asked.is_none_or(|t| t.elapsed() >= LEVELS_EVERY) {
            node.learn_levels().await;
            asked = Some(Instant::now());
        } else {
            node.ask_levels(true).await;
        }
        tokio::select! {
            _ = sleep(LEVELS_UNKNOWN_EVERY) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ClusterSettings, Outcome};

    fn settings() -> RaftSettings {
        RaftSettings {
            heartbeat_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            ..RaftSettings::default()
        }
    }

    async fn open(dir: &Path, id: MemberId) -> RaftNode {
        let me = Member {
            rpc_addr: format!("127.0.0.1:{}", 7700 + id),
            http_addr: format!("127.0.0.1:{}", 7780 + id),
        };
        let tls = skiff_tls::TlsContext::ephemeral(&skiff_tls::Identity::Member(id)).expect("tls");
        RaftNode::open(id, me, dir, &settings(), Histogram::new([0.001]), tls)
            .await
            .expect("open")
    }

    async fn leader(node: &RaftNode) {
        node.raft()
            .wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.state == ServerState::Leader, "leader")
            .await
            .expect("becomes leader");
    }

    fn init(cidr: &str) -> Command {
        Command::InitCluster {
            settings: ClusterSettings {
                cluster_cidr: cidr.into(),
                node_subnet_prefix: 24,
                service_cidr: crate::state::DEFAULT_SERVICE_CIDR.into(),
            },
        }
    }

    /// A one-member cluster: bootstrap, a write through the log is applied and its result
    /// returned, the applied watch moves, a linearizable read passes; restarted from its data
    /// dir it has the state back.
    #[tokio::test]
    async fn bootstraps_writes_and_reopens_with_its_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = open(dir.path(), 1).await;
        assert!(!node.is_initialized().await.expect("initialized?"));
        node.bootstrap().await.expect("bootstrap");
        leader(&node).await;
        assert_eq!(node.status().role, Role::Leader);
        assert_eq!(node.leader().map(|l| l.0), Some(1));
        let mut watch = node.applied_watch();
        let first = watch.changed().await.expect("index");
        let (result, index) = node.write(init("10.50.0.0/16")).await.expect("write");
        assert_eq!(result, Ok(Outcome::ClusterInitialized { changed: true }));
        assert!(index > first);
        assert!(watch.changed().await.expect("index") >= index);
        node.linearize().await.expect("read barrier");
        // A refused command is the state machine's answer, not a Raft error.
        let (refused, _) = node.write(init("10.60.0.0/16")).await.expect("write");
        assert!(refused.is_err(), "{refused:?}");
        node.shutdown().await;
        drop(node);

        let again = open(dir.path(), 1).await;
        assert!(again.is_initialized().await.expect("initialized?"));
        // Bootstrapping again does nothing.
        again.bootstrap().await.expect("bootstrap again");
        leader(&again).await;
        again.linearize().await.expect("read barrier");
        let cidr = again
            .state()
            .state
            .settings()
            .map(|s| s.cluster_cidr.clone());
        assert_eq!(cidr.as_deref(), Some("10.50.0.0/16"));
        again.shutdown().await;
    }

    /// Membership changes that cannot be right are refused, naming why, and change nothing.
    #[tokio::test]
    async fn bad_membership_changes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = open(dir.path(), 1).await;
        node.bootstrap().await.expect("bootstrap");
        leader(&node).await;
        let e = node.remove_member(1).await.expect_err("last voter");
        assert_eq!(
            e.to_string(),
            "membership change refused: refused: member 1 is the last voter"
        );
        let e = node.remove_member(9).await.expect_err("unknown");
        assert!(
            e.to_string().contains("member 9 is not in the cluster"),
            "{e}"
        );
        let other = Member {
            rpc_addr: "127.0.0.1:9999".into(),
            http_addr: "127.0.0.1:9998".into(),
        };
        let e = node.add_member(1, other).await.expect_err("id reuse");
        assert!(
            e.to_string().contains("already belongs to 127.0.0.1:7701"),
            "{e}"
        );
        assert_eq!(node.members().len(), 1);
        node.shutdown().await;
    }

    #[test]
    fn a_refused_forwarded_change_stays_a_refusal() {
        let refused = membership_status(
            "127.0.0.1:7701",
            tonic::Status::failed_precondition("refused: member 2 is the last voter"),
        );
        assert!(
            matches!(refused, RaftNodeError::Membership(_)),
            "{refused:?}"
        );
        let unreachable = membership_status("127.0.0.1:7701", tonic::Status::unavailable("down"));
        assert!(
            matches!(unreachable, RaftNodeError::Peer(_)),
            "{unreachable:?}"
        );
    }
}
