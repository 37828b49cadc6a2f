//! The command line: every command, flag and argument (clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "skiff",
    version,
    about = "Deploy and inspect workloads on a Skiff cluster"
)]
pub struct Cli {
    /// Controller gRPC addresses, comma-separated; tried in turn until one answers
    /// [default: the credentials file's, else 127.0.0.1:7700].
    #[arg(long, global = true, env = "SKIFF_CONTROLLER", value_delimiter = ',')]
    pub controller: Vec<String>,
    /// Credentials file (cluster CA, your certificate and key; see `skiff credentials
    /// create`) [default: ~/.config/skiff/credentials].
    #[arg(long, global = true, env = "SKIFF_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// Output format for what a command prints.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Create or update a job from a spec file (TOML or JSON; `-` reads stdin).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List jobs.
    Jobs {
        /// Only this namespace (default: all).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Allow a possibly stale read from the member answering.
        #[arg(long)]
        stale: bool,
    },
    /// Inspect one job.
    Job {
        #[command(subcommand)]
        command: JobCmd,
    },
    /// Stop a job (its versions are kept).
    Stop {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// The controller cluster itself.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Show what applying a spec would do (placements, stops) without doing it.
    Plan {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// A job's rollout: follow it, pause, resume, promote its canaries, undo it.
    Rollout {
        #[command(subcommand)]
        command: RolloutCmd,
    },
    /// Set a job's number of replicas.
    Scale {
        name: String,
        replicas: u32,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// List nodes: address, status, labels, allocated/total resources.
    Nodes {
        #[arg(long)]
        stale: bool,
        /// List each node's WireGuard peers (with `-o json`; one entry per other node, so
        /// N x N in all); without it, their counts.
        #[arg(long)]
        peers: bool,
    },
    /// Services (jobs with a `service` section), their endpoints and health.
    Services {
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// The service mesh.
    Mesh {
        #[command(subcommand)]
        command: MeshCmd,
    },
    /// Drain or undrain a node.
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    /// An allocation's output (through its node's agent).
    Logs {
        allocation: String,
        /// Which container of the allocation (default: its first main container).
        #[arg(short, long)]
        container: Option<String>,
        /// Keep printing new output until it stops.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command in an allocation's container and exit with its exit code.
    Exec {
        allocation: String,
        /// Which container of the allocation (default: its first main container).
        #[arg(short, long)]
        container: Option<String>,
        /// KEY=VALUE added to the environment, repeatable.
        #[arg(short, long)]
        env: Vec<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Named volumes on every node (through each node's agent).
    Volumes {
        /// Only this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// A named volume.
    Volume {
        #[command(subcommand)]
        command: VolumeCmd,
    },
    /// Join tokens for new agents and controller members.
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Credentials (client certificates) for people and CI, and the certificates issued.
    Credentials {
        #[command(subcommand)]
        command: CredentialsCmd,
    },
    /// The cluster CA: rotate it, retire the old one.
    Ca {
        #[command(subcommand)]
        command: CaCmd,
    },
    /// The cluster's events (placements, starts, exits, OOM kills, health changes, drains,
    /// rollout steps, nodes going down), oldest first.
    Events {
        /// Keep printing new events as they happen.
        #[arg(short, long)]
        follow: bool,
        /// Only this job's.
        #[arg(long)]
        job: Option<String>,
        #[arg(short, long)]
        namespace: Option<String>,
        /// Only this node's.
        #[arg(long)]
        node: Option<String>,
        /// How many of the newest to print first (at most 2000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// CPU and memory of each running allocation (of one job, or all), from the agents.
    Top {
        job: Option<String>,
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// List allocations (of one job, or all).
    Ps {
        job: Option<String>,
        #[arg(short, long)]
        namespace: Option<String>,
        /// Also stopped ones.
        #[arg(short, long)]
        all: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JoinRole {
    Agent,
    Controller,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UserRole {
    Admin,
    Operator,
    Reader,
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Print a new join token, alone on stdout.
    Create {
        #[arg(long, value_enum)]
        role: JoinRole,
        /// How long it can be used, e.g. 1h, 30m, 7d [default: 1h].
        #[arg(long)]
        ttl: Option<String>,
        /// How many joins it pays for [default: unlimited until it expires].
        #[arg(long)]
        uses: Option<u32>,
    },
    /// List tokens (never their secrets).
    Ls,
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum CredentialsCmd {
    /// Make credentials for a person or CI: the key is generated here and stays in FILE.
    Create {
        name: String,
        #[arg(long, value_enum)]
        role: UserRole,
        /// Where to write them (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. 30d [default: 90d].
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Certificates the cluster issued and not yet expired.
    Ls,
    /// Revoke a certificate by serial, or every certificate of an identity.
    Revoke {
        #[arg(
            long,
            conflicts_with = "identity",
            required_unless_present = "identity"
        )]
        serial: Option<String>,
        /// node/NAME, member/ID or user/ROLE/NAME.
        #[arg(long)]
        identity: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum CaCmd {
    /// Start a CA rotation: a new CA is trusted next to the old one and issues from now on;
    /// nodes and members renew their certificates at once.
    Rotate,
    /// End a rotation: stop trusting the old CA (refused while a valid certificate of it
    /// remains, unless --force).
    Retire {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum MeshCmd {
    /// Workload identities, their certificates' expiry, and who may call each service.
    Status,
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Move the node's allocations elsewhere and place nothing new on it.
    Drain { name: String },
    /// Make a drained node schedulable again.
    Undrain { name: String },
    /// Forget a node that is down for good (a decommissioned host): its pod subnet is freed
    /// and it leaves `skiff nodes`. Refused while the node is not down.
    #[command(alias = "remove")]
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// The job's current rollout; follows it until it ends (fails if it fails).
    Status {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Print where it is now and exit.
        #[arg(long)]
        once: bool,
    },
    /// Hold the rollout: nothing is replaced until it is resumed.
    Pause {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Go on with a paused rollout.
    Resume {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Go on past the canaries.
    Promote {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Roll back: to the version before the current rollout, or to `--to-version`.
    Undo {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(long)]
        to_version: Option<u64>,
    },
}

/// What `skiff rollout` does to a rollout.
#[derive(Clone, Copy)]
pub enum RolloutAction {
    Pause,
    Resume,
    Promote,
    Undo,
}

#[derive(Subcommand)]
pub enum JobCmd {
    /// A job's versions and allocations.
    Status {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(long)]
        stale: bool,
    },
    /// A job's versions, their rollouts and what each changed; `--diff A --diff B` shows the
    /// changes between two versions.
    History {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(long, num_args = 1)]
        diff: Vec<u64>,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// The cluster-wide settings fixed at bootstrap (pod network), the leader, and counts.
    Info {
        #[arg(long)]
        stale: bool,
    },
    /// Members with their role and applied index.
    Members,
    /// The current leader.
    Leader,
    /// Add a member (it is promoted to voter once caught up).
    Add {
        id: u64,
        #[arg(long)]
        rpc_addr: String,
        #[arg(long)]
        http_addr: String,
    },
    /// Remove a member.
    Remove { id: u64 },
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Remove a named volume and its data (refused while an allocation uses it).
    #[command(alias = "remove")]
    Rm {
        /// NAMESPACE/JOB/NAME, or JOB/NAME in the default namespace.
        volume: String,
        /// The node holding it (needed when several nodes hold one of that name).
        #[arg(long)]
        node: Option<String>,
    },
}
