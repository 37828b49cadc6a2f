//! `skiff`: the user's command line. Talks gRPC to any controller member, trying each address
//! given in `--controller` in turn until one answers.

#![forbid(unsafe_code)]

/// `println!` that ends the process quietly when stdout is a closed pipe (`skiff ps | head`),
/// as command-line tools do, instead of panicking (Rust ignores SIGPIPE). Defined before the
/// modules, so it is theirs too.
macro_rules! println {
    () => {
        $crate::stdout_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::stdout_line(format_args!($($arg)*))
    };
}

/// Writes one line to stdout; a closed pipe ends the process (exit 0: the reader has what it
/// wanted), another write error ends it with status 1.
pub(crate) fn stdout_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

mod allocations;
mod args;
mod client;
mod cluster;
mod jobs;
mod mesh;
mod nodes;
mod observe;
mod pki;
mod render;
mod rollout;
mod services;

use std::process::ExitCode;

use clap::Parser;
use skiff_proto::v1 as pb;

use crate::args::{
    CaCmd, Cli, ClusterCmd, Cmd, CredentialsCmd, Format, JobCmd, MeshCmd, NodeCmd, RolloutAction,
    RolloutCmd, TokenCmd, VolumeCmd,
};
use crate::client::Controllers;
use crate::render::Out;

async fn run(cli: Cli) -> anyhow::Result<()> {
    let creds = client::load_credentials(cli.credentials.as_deref())?;
    let addrs = if !cli.controller.is_empty() {
        cli.controller.clone()
    } else if !creds.controllers.is_empty() {
        creds.controllers.clone()
    } else {
        vec!["127.0.0.1:7700".to_string()]
    };
    let ctl = Controllers::new(addrs, &creds)?;
    let out = Out {
        json: cli.output == Format::Json,
    };
    match cli.command {
        Cmd::Apply { file } => jobs::apply(&ctl, out, &file).await,
        Cmd::Plan { file } => jobs::plan(&ctl, out, &file).await,
        Cmd::Jobs { namespace, stale } => jobs::list(&ctl, out, namespace, stale).await,
        Cmd::Job {
            command:
                JobCmd::Status {
                    name,
                    namespace,
                    stale,
                },
        } => jobs::status(&ctl, out, name, namespace, stale).await,
        Cmd::Job {
            command:
                JobCmd::History {
                    name,
                    namespace,
                    diff,
                },
        } => rollout::history(&ctl, out, name, namespace, diff).await,
        Cmd::Rollout { command } => match command {
            RolloutCmd::Status {
                name,
                namespace,
                once,
            } => rollout::status(&ctl, out, name, namespace, !once).await,
            RolloutCmd::Pause { name, namespace } => {
                rollout::act(&ctl, out, name, namespace, RolloutAction::Pause, None).await
            }
            RolloutCmd::Resume { name, namespace } => {
                rollout::act(&ctl, out, name, namespace, RolloutAction::Resume, None).await
            }
            RolloutCmd::Promote { name, namespace } => {
                rollout::act(&ctl, out, name, namespace, RolloutAction::Promote, None).await
            }
            RolloutCmd::Undo {
                name,
                namespace,
                to_version,
            } => rollout::act(&ctl, out, name, namespace, RolloutAction::Undo, to_version).await,
        },
        Cmd::Stop { name, namespace } => jobs::stop(&ctl, out, name, namespace).await,
        Cmd::Scale {
            name,
            replicas,
            namespace,
        } => jobs::scale(&ctl, out, name, namespace, replicas).await,
        Cmd::Cluster { command } => match command {
            ClusterCmd::Info { stale } => cluster::info(&ctl, out, stale).await,
            ClusterCmd::Members => cluster::members(&ctl, out).await,
            ClusterCmd::Leader => cluster::leader(&ctl, out).await,
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
                cluster::add(&ctl, out, req).await
            }
            ClusterCmd::Remove { id } => cluster::remove(&ctl, out, id).await,
        },
        Cmd::Nodes { stale, peers } => nodes::list(&ctl, out, stale, peers).await,
        Cmd::Node { command } => match command {
            NodeCmd::Drain { name } => nodes::drain(&ctl, out, name, true).await,
            NodeCmd::Undrain { name } => nodes::drain(&ctl, out, name, false).await,
            NodeCmd::Rm { name } => nodes::remove(&ctl, out, name).await,
        },
        Cmd::Services { namespace } => services::list(&ctl, out, namespace).await,
        Cmd::Mesh { command } => match command {
            MeshCmd::Status => mesh::status(&ctl, out).await,
        },
        Cmd::Ps {
            job,
            namespace,
            all,
        } => allocations::ps(&ctl, out, job, namespace, all).await,
        Cmd::Events {
            follow,
            job,
            namespace,
            node,
            limit,
        } => {
            let filter = observe::EventsFilter {
                namespace,
                job,
                node,
                limit,
            };
            observe::events(&ctl, out, filter, follow).await
        }
        Cmd::Top { job, namespace } => observe::top(&ctl, out, job, namespace).await,
        Cmd::Token { command } => match command {
            TokenCmd::Create { role, ttl, uses } => {
                pki::token_create(&ctl, out, role, ttl, uses).await
            }
            TokenCmd::Ls => pki::token_ls(&ctl, out).await,
            TokenCmd::Revoke { id } => pki::token_revoke(&ctl, out, id).await,
        },
        Cmd::Credentials { command } => match command {
            CredentialsCmd::Create {
                name,
                role,
                out: file,
                ttl,
            } => pki::credentials_create(&ctl, &creds, out, name, role, &file, ttl).await,
            CredentialsCmd::Ls => pki::credentials_ls(&ctl, out).await,
            CredentialsCmd::Revoke { serial, identity } => {
                pki::credentials_revoke(&ctl, out, serial, identity).await
            }
        },
        Cmd::Ca { command } => match command {
            CaCmd::Rotate => pki::ca_rotate(&ctl, out).await,
            CaCmd::Retire { force } => pki::ca_retire(&ctl, out, force).await,
        },
        Cmd::Logs {
            allocation,
            container,
            follow,
        } => allocations::logs(&ctl, allocation, container, follow).await,
        Cmd::Volumes { namespace } => allocations::volumes(&ctl, out, namespace).await,
        Cmd::Volume {
            command: VolumeCmd::Rm { volume, node },
        } => allocations::volume_rm(&ctl, out, volume, node).await,
        Cmd::Exec {
            allocation,
            container,
            env,
            command,
        } => match allocations::exec(&ctl, allocation, container, command, env).await? {
            0 => Ok(()),
            code => Err(ExitWith(code).into()),
        },
    }
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
