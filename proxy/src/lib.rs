//! `skiff-proxy`: the mesh sidecar. The agent starts one per allocation of a job with a
//! `[mesh]` section (as `skiff-agent proxy`), in the allocation's network namespace, in a
//! cgroup of its own, as an unprivileged user. Inside that namespace the agent redirects
//! the workload's TCP connections to service virtual IPs into the proxy's outbound port, and
//! connections to the workload's ports into its inbound port:
//!
//! - outbound: the service is found by the connection's original destination; an endpoint
//!   is picked (power of two choices over the least outstanding connections) and a failed
//!   connect is retried on another; to a service in the mesh the proxy speaks TLS 1.3 with
//!   the workload's certificate and checks that the peer is that service;
//! - inbound: TLS is terminated with a client certificate required; the caller's identity
//!   is checked against `allow_from`; what passes goes to the workload on 127.0.0.1.
//!
//! The proxy carries bytes, not protocols: nothing is sniffed, so protocols where the server
//! speaks first work. Its certificate and the service set are files the agent replaces; they
//! are reloaded as they change, for new connections (open ones keep theirs).

#![forbid(unsafe_code)]

pub mod balance;
pub mod config;
pub mod files;
pub mod http;
pub mod metrics;
pub mod serve;
pub mod tls;

use std::path::PathBuf;

/// Errors of the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Io(String),
    #[error("setting up the proxy's process: {0}")]
    Setup(String),
}

/// How the agent starts the proxy.
#[derive(Clone, Debug, Default)]
pub struct Args {
    /// The proxy's directory (configuration, service set, certificate).
    pub dir: PathBuf,
    /// The allocation's network namespace, entered before anything else.
    pub netns: Option<PathBuf>,
    /// The user and group to run as once the ports are bound.
    pub user: Option<(u32, u32)>,
    /// Cgroup directories to join first (one per hierarchy).
    pub cgroups: Vec<PathBuf>,
}

/// Runs the proxy until it is killed. Must be called while the process has one thread: it
/// joins cgroups and a network namespace and drops privileges, which apply per thread.
pub fn run(args: &Args) -> Result<(), ProxyError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| ProxyError::Setup(format!("{what}: {e}"));
    for cg in &args.cgroups {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| setup(&format!("joining cgroup {}", cg.display()), &e))?;
    }
    let dir = files::Dir::open(&args.dir)?;
    if let Some(ns) = &args.netns {
        let f = std::fs::File::open(ns).map_err(|e| setup(&ns.display().to_string(), &e))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| setup("entering the allocation's network namespace", &e))?;
    }
    let cfg = config::ProxyConfig::parse(&dir.read(config::CONFIG_FILE)?)?;
    let bind = |ip: [u8; 4], port: u16| {
        let l = std::net::TcpListener::bind((std::net::Ipv4Addr::from(ip), port))
            .map_err(|e| setup(&format!("binding port {port}"), &e))?;
        l.set_nonblocking(true)
            .map_err(|e| setup("a non-blocking socket", &e))?;
        Ok::<_, ProxyError>(l)
    };
    let outbound = bind([127, 0, 0, 1], cfg.outbound_port)?;
    let inbound = bind([0, 0, 0, 0], cfg.inbound_port)?;
    let admin = bind([0, 0, 0, 0], cfg.admin_port)?;
    if let Some((uid, gid)) = args.user {
        use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
        setgroups(&[]).map_err(|e| setup("dropping groups", &e))?;
        setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid))
            .map_err(|e| setup("setting the group", &e))?;
        setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))
            .map_err(|e| setup("setting the user", &e))?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| setup("no_new_privs", &e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| setup("the async runtime", &e))?;
    rt.block_on(serve::serve(cfg, dir, outbound, inbound, admin))
}
