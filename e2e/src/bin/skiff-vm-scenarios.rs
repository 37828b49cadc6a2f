//! The shared fleet scenarios (`skiff_e2e::scenario`) on hosts reached over ssh: the Vagrant
//! VMs of `scripts/vm-e2e.sh`, which runs this after `vagrant up`.
//!
//!   skiff-vm-scenarios --key '.vagrant/machines/{node}/libvirt/private_key' \
//!       --node node-1=198.18.20.11 --node node-2=198.18.20.12 ... basics
//!   skiff-vm-scenarios ... node-loss --victim node-3 --power-off 'virsh destroy PREFIX{node}'
//!
//! Each node is a host with Skiff installed by `deploy/systemd/install.sh` (the agent's
//! settings in /etc/skiff/agent.toml, the admin credentials on the first node). The CLI runs
//! on the first node.

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};
use skiff_e2e::scenario::{self, Cluster, Expect};

#[derive(Parser)]
struct Args {
    /// The ssh private key; `{node}` in it is replaced by the node's name (Vagrant keeps one
    /// per machine: `.vagrant/machines/{node}/libvirt/private_key`).
    #[arg(long)]
    key: String,
    /// The ssh user (with passwordless sudo).
    #[arg(long, default_value = "vagrant")]
    user: String,
    /// A node as NAME=ADDRESS, in order (the first runs the CLI); repeatable.
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    /// A controller's RPC address [default: the first node's, port 7700].
    #[arg(long)]
    controller: Option<String>,
    /// The WireGuard backend the nodes must report.
    #[arg(long, default_value = "kernel")]
    backend: String,
    /// The hosts run cgroup v1 (or hybrid) hierarchies, not pure v2.
    #[arg(long)]
    cgroup_v1: bool,
    #[command(subcommand)]
    step: Step,
}

#[derive(Subcommand)]
enum Step {
    /// Members and nodes, the web job, a container's memory limit, a page across the overlay.
    Basics,
    /// `install.sh upgrade` on every node in turn, with a write after each.
    Upgrade,
    /// Powers a node off and times its replicas' replacement.
    NodeLoss {
        #[arg(long)]
        victim: String,
        /// The command that powers the victim off, run here; `{node}` is its name.
        #[arg(long)]
        power_off: String,
    },
}

struct Ssh {
    key: String,
    user: String,
    nodes: Vec<(String, String)>,
    controller: String,
    power_off: String,
}

/// `arg` quoted for the remote shell.
fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

impl Ssh {
    fn addr(&self, node: &str) -> Result<&str> {
        self.nodes
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, a)| a.as_str())
            .with_context(|| format!("no node {node}"))
    }

    /// `sudo ARGV` on `node`, `input` on its standard input.
    fn ssh(&self, node: &str, argv: &[&str], input: Option<&str>) -> Result<String> {
        let addr = self.addr(node)?;
        let remote = std::iter::once("sudo".to_owned())
            .chain(argv.iter().map(|a| quote(a)))
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = Command::new("ssh")
            .args(["-q", "-i"])
            .arg(self.key.replace("{node}", node))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "BatchMode=yes",
            ])
            .arg(format!("{}@{addr}", self.user))
            .arg(remote)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ssh")?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes())?;
        }
        skiff_e2e::stdout(
            child.wait_with_output()?,
            format_args!("{} on {node}", argv.join(" ")),
        )
    }

    fn first(&self) -> &str {
        &self.nodes[0].0
    }
}

impl Cluster for Ssh {
    fn skiff(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec![
            "env",
            "SKIFF_CREDENTIALS=/var/lib/skiff/controller/admin.creds",
            "skiff",
            "--controller",
            &self.controller,
        ];
        argv.extend_from_slice(args);
        self.ssh(self.first(), &argv, None)
    }

    fn agent(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut argv = vec!["skiff-agent", "--config", "/etc/skiff/agent.toml"];
        argv.extend_from_slice(args);
        self.ssh(node, &argv, None)
    }

    fn run(&self, node: &str, argv: &[&str]) -> Result<String> {
        self.ssh(node, argv, None)
    }

    fn put(&self, name: &str, text: &str) -> Result<String> {
        let path = format!("/root/{name}");
        self.ssh(self.first(), &["tee", &path], Some(text))?;
        Ok(path)
    }

    fn image(&self) -> String {
        "oci:/opt/skiff/images/web".into()
    }

    fn power_off(&mut self, node: &str) -> Result<()> {
        let cmd = self.power_off.replace("{node}", node);
        let out = Command::new("sh").args(["-c", &cmd]).output()?;
        ensure!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    fn upgrade(&mut self, node: &str) -> Result<()> {
        self.ssh(
            node,
            &[
                "/tmp/skiff/install.sh",
                "upgrade",
                "--bin-dir",
                "/tmp/skiff",
            ],
            None,
        )
        .map(|_| ())
    }

    fn controllers(&self) -> usize {
        self.nodes.len().min(3)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let nodes: Vec<(String, String)> = args
        .nodes
        .iter()
        .map(|n| {
            n.split_once('=')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .with_context(|| format!("--node {n}: not NAME=ADDRESS"))
        })
        .collect::<Result<_>>()?;
    let controller = args
        .controller
        .unwrap_or_else(|| format!("{}:7700", nodes[0].1));
    let backend: &'static str = match args.backend.as_str() {
        "kernel" => "kernel",
        "userspace" => "userspace",
        b => anyhow::bail!("--backend {b}: kernel or userspace"),
    };
    let expect = Expect {
        backend,
        cgroup_v2: !args.cgroup_v1,
    };
    let count = nodes.len();
    let mut ssh = Ssh {
        key: args.key,
        user: args.user,
        nodes,
        controller,
        power_off: String::new(),
    };
    match args.step {
        Step::Basics => {
            let start = std::time::Instant::now();
            let names = scenario::members_and_nodes(&ssh, &expect, count)?;
            println!(
                "{} controller members, all voters; {count} nodes ready on the {backend} WireGuard backend, each with a handshake with every other ({:.1}s)",
                ssh.controllers(),
                start.elapsed().as_secs_f64()
            );
            scenario::web(&ssh, count * 2)?;
            println!("web: {} replicas running", count * 2);
            let node = &names[names.len() / 2];
            let cg = scenario::memory_limit(&ssh, &expect, node)?;
            println!(
                "{node}: a container's memory limit is 64Mi (cgroup {}: {cg})",
                if expect.cgroup_v2 { "v2" } else { "v1" }
            );
            if count > 1 {
                let to = scenario::across_hosts(&ssh, &names[0])?;
                println!(
                    "a replica on {} reached {to} on another node through the overlay",
                    names[0]
                );
            }
        }
        Step::Upgrade => {
            let names: Vec<String> = ssh.nodes.iter().map(|(n, _)| n.clone()).collect();
            let took = scenario::rolling_upgrade(&mut ssh, &names)?;
            let secs: Vec<String> = took
                .iter()
                .map(|d| format!("{:.1}", d.as_secs_f64()))
                .collect();
            println!(
                "every node upgraded in turn (install.sh upgrade; {} s each); a write after each; every container ran on; web running",
                secs.join(", ")
            );
        }
        Step::NodeLoss { victim, power_off } => {
            ssh.power_off = power_off;
            let took = scenario::node_loss(&mut ssh, &victim)?;
            println!(
                "{victim} powered off: its replicas running elsewhere after {} ms",
                took.as_millis()
            );
        }
    }
    Ok(())
}
