//! `skiff`: the user's command line. Talks gRPC to any controller member, trying each address
//! given in `--controller` in turn until one answers.

#![forbid(unsafe_code)]

mod client;
mod fleet;
mod output;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use skiff_proto::v1 as pb;

use crate::client::Controllers;
use crate::output::{Out, age, print_table};

#[derive(Parser)]
#[command(
    name = "skiff",
    version,
    about = "Deploy and inspect workloads on a Skiff cluster"
)]
struct Cli {
    /// Controller gRPC addresses, comma-separated; tried in turn until one answers.
    #[arg(
        long,
        global = true,
        env = "SKIFF_CONTROLLER",
        default_value = "127.0.0.1:7700",
        value_delimiter = ','
    )]
    controller: Vec<String>,
    /// Output format for what a command prints.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
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
    },
    /// Services (jobs with a `service` section), their endpoints and health.
    Services {
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Drain or undrain a node.
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    /// An allocation's output (through its node's agent).
    Logs {
        allocation: String,
        /// Keep printing new output until it stops.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command in an allocation's container and exit with its exit code.
    Exec {
        allocation: String,
        /// KEY=VALUE added to the environment, repeatable.
        #[arg(short, long)]
        env: Vec<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
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

#[derive(Subcommand)]
enum NodeCmd {
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
enum JobCmd {
    /// A job's versions and allocations.
    Status {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(long)]
        stale: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
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

fn read_spec(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
}

fn spec_format(path: &std::path::Path) -> pb::SpecFormat {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => pb::SpecFormat::Toml,
        Some("json") => pb::SpecFormat::Json,
        _ => pb::SpecFormat::Auto,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let ctl = Controllers::new(cli.controller.clone())?;
    let out = Out {
        json: cli.output == Format::Json,
    };
    match cli.command {
        Cmd::Apply { file } => {
            let spec = read_spec(&file)?;
            let req = pb::ApplyJobRequest {
                spec,
                format: spec_format(&file) as i32,
            };
            let resp = ctl
                .jobs(|mut c| {
                    let r = req.clone();
                    async move { c.apply_job(r).await }
                })
                .await?;
            if out.json {
                return out.json(&output::apply_json(&resp));
            }
            let job = resp.job.unwrap_or_default();
            let key = format!("{}/{}", job.namespace, job.name);
            if resp.created {
                println!("job {key} created: version {}", job.version);
            } else if resp.changed {
                println!(
                    "job {key} updated: version {} (was {})",
                    job.version,
                    job.version.saturating_sub(1)
                );
                for c in &resp.changes {
                    println!(
                        "  {}: {} -> {}",
                        c.path,
                        c.old.as_deref().unwrap_or("(none)"),
                        c.new.as_deref().unwrap_or("(none)")
                    );
                }
            } else {
                println!("job {key} unchanged: version {}", job.version);
            }
        }
        Cmd::Jobs { namespace, stale } => {
            let req = pb::ListJobsRequest {
                namespace: namespace.unwrap_or_default(),
                read: Some(pb::ReadOptions { stale }),
            };
            let resp = ctl
                .jobs(|mut c| {
                    let r = req.clone();
                    async move { c.list_jobs(r).await }
                })
                .await?;
            if out.json {
                return out.json(&resp.jobs.iter().map(output::job_json).collect::<Vec<_>>());
            }
            let rows = resp
                .jobs
                .iter()
                .map(|j| {
                    vec![
                        j.namespace.clone(),
                        j.name.clone(),
                        j.version.to_string(),
                        j.status.clone(),
                        j.replicas.to_string(),
                        j.image.clone(),
                        age(j.submitted_at_ms),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAMESPACE",
                    "NAME",
                    "VERSION",
                    "STATUS",
                    "REPLICAS",
                    "IMAGE",
                    "SUBMITTED",
                ],
                rows,
            );
        }
        Cmd::Job {
            command:
                JobCmd::Status {
                    name,
                    namespace,
                    stale,
                },
        } => {
            let req = pb::GetJobRequest {
                namespace,
                name,
                read: Some(pb::ReadOptions { stale }),
            };
            let resp = ctl
                .jobs(|mut c| {
                    let r = req.clone();
                    async move { c.get_job(r).await }
                })
                .await?;
            if out.json {
                return out.json(&output::job_detail_json(&resp)?);
            }
            let job = resp.job.clone().unwrap_or_default();
            println!("job:       {}/{}", job.namespace, job.name);
            println!("status:    {}", job.status);
            println!("version:   {} ({} kept)", job.version, job.versions);
            println!("replicas:  {}", job.replicas);
            println!("image:     {}", job.image);
            println!("submitted: {} ago", age(job.submitted_at_ms));
            if !resp.pending.is_empty() {
                println!("pending:   {}", resp.pending);
            }
            println!();
            println!("versions:");
            let rows = resp
                .versions
                .iter()
                .map(|v| vec![v.version.to_string(), age(v.submitted_at_ms)])
                .collect();
            print_table(&["VERSION", "SUBMITTED"], rows);
            println!();
            if resp.allocations.is_empty() {
                println!("allocations: none");
            } else {
                let rows = resp
                    .allocations
                    .iter()
                    .map(|a| {
                        vec![
                            a.id.clone(),
                            a.job_version.to_string(),
                            a.node.clone(),
                            a.desired.clone(),
                            a.observed.clone(),
                        ]
                    })
                    .collect();
                print_table(
                    &["ALLOCATION", "VERSION", "NODE", "DESIRED", "STATUS"],
                    rows,
                );
            }
        }
        Cmd::Stop { name, namespace } => {
            let req = pb::StopJobRequest { namespace, name };
            let resp = ctl
                .jobs(|mut c| {
                    let r = req.clone();
                    async move { c.stop_job(r).await }
                })
                .await?;
            let job = resp.job.clone().unwrap_or_default();
            if out.json {
                return out.json(
                    &serde_json::json!({ "job": output::job_json(&job), "changed": resp.changed }),
                );
            }
            if resp.changed {
                println!(
                    "job {}/{} stopped (version {} kept)",
                    job.namespace, job.name, job.version
                );
            } else {
                println!("job {}/{} was already stopped", job.namespace, job.name);
            }
        }
        Cmd::Cluster { command } => cluster(&ctl, out, command).await?,
        Cmd::Plan { file } => {
            let spec = read_spec(&file)?;
            let req = pb::ApplyJobRequest {
                spec,
                format: spec_format(&file) as i32,
            };
            fleet::plan(&ctl, out, req).await?;
        }
        Cmd::Scale {
            name,
            replicas,
            namespace,
        } => fleet::scale(&ctl, out, name, namespace, replicas).await?,
        Cmd::Nodes { stale } => fleet::nodes(&ctl, out, stale).await?,
        Cmd::Services { namespace } => fleet::services(&ctl, out, namespace).await?,
        Cmd::Node { command } => match command {
            NodeCmd::Drain { name } => fleet::drain(&ctl, out, name, true).await?,
            NodeCmd::Undrain { name } => fleet::drain(&ctl, out, name, false).await?,
            NodeCmd::Rm { name } => fleet::remove_node(&ctl, out, name).await?,
        },
        Cmd::Ps {
            job,
            namespace,
            all,
        } => fleet::ps(&ctl, out, job, namespace, all).await?,
        Cmd::Logs { allocation, follow } => fleet::logs(&ctl, allocation, follow).await?,
        Cmd::Exec {
            allocation,
            env,
            command,
        } => {
            let code = fleet::exec(&ctl, allocation, command, env).await?;
            if code != 0 {
                return Err(ExitWith(code).into());
            }
        }
    }
    Ok(())
}

async fn cluster(ctl: &Controllers, out: Out, command: ClusterCmd) -> anyhow::Result<()> {
    let members = match command {
        ClusterCmd::Members => {
            let resp = ctl
                .cluster(|mut c| async move { c.list_members(pb::ListMembersRequest {}).await })
                .await?;
            resp.members
        }
        ClusterCmd::Leader => {
            let resp = ctl
                .cluster(|mut c| async move { c.leader(pb::LeaderRequest {}).await })
                .await?;
            if out.json {
                return out.json(&serde_json::json!({ "leader_id": resp.leader_id, "rpc_addr": resp.rpc_addr, "term": resp.term }));
            }
            if resp.leader_id == 0 {
                anyhow::bail!("no leader is known (term {})", resp.term);
            }
            println!("{} {} (term {})", resp.leader_id, resp.rpc_addr, resp.term);
            return Ok(());
        }
        ClusterCmd::Add {
            id,
            rpc_addr,
            http_addr,
        } => {
            let req = pb::AddMemberRequest {
                id,
                rpc_addr,
                http_addr,
            };
            ctl.cluster(|mut c| {
                let r = req.clone();
                async move { c.add_member(r).await }
            })
            .await?
            .members
        }
        ClusterCmd::Remove { id } => {
            ctl.cluster(
                |mut c| async move { c.remove_member(pb::RemoveMemberRequest { id }).await },
            )
            .await?
            .members
        }
    };
    if out.json {
        return out.json(&members.iter().map(output::member_json).collect::<Vec<_>>());
    }
    let rows = members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.rpc_addr.clone(),
                m.role.clone(),
                if m.voter { "yes".into() } else { "no".into() },
                m.applied_index.to_string(),
                m.term.to_string(),
            ]
        })
        .collect();
    print_table(&["ID", "ADDRESS", "ROLE", "VOTER", "APPLIED", "TERM"], rows);
    Ok(())
}

/// A command's own exit code to pass on (`skiff exec`), not an error of ours.
#[derive(Debug)]
struct ExitWith(i32);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ExitWith>().is_some() => {
            let code = e.downcast_ref::<ExitWith>().map_or(1, |c| c.0);
            ExitCode::from(u8::try_from(code & 0xff).unwrap_or(255))
        }
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
