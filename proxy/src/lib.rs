//! `skiff-proxy`: the mesh sidecar. The agent starts one per allocation of a job with a
//! `[mesh]` section (the small `skiff-proxy` binary installed next to it, or else its own
//! copy, `skiff-agent proxy`), in the allocation's network namespace, in a
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

impl Args {
    /// Parses the command line the agent gives the proxy (`skiff-proxy` or the agent's
    /// built-in `skiff-agent proxy`): `--dir DIR [--netns PATH] [--uid N --gid N]
    /// [--cgroup DIR]...`, without the program name.
    pub fn parse<I, S>(args: I) -> Result<Args, ProxyError>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        let bad = |why: String| ProxyError::Config(format!("the command line: {why}"));
        let mut out = Args::default();
        let (mut dir, mut uid, mut gid) = (None, None, None);
        let mut it = args.into_iter().map(Into::into);
        while let Some(flag) = it.next() {
            let name = flag.to_string_lossy().into_owned();
            let Some(value) = it.next() else {
                return Err(bad(format!("{name} needs a value")));
            };
            let number = |v: &std::ffi::OsString| {
                v.to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                    .ok_or_else(|| bad(format!("{name} takes a number, not {v:?}")))
            };
            match name.as_str() {
                "--dir" => dir = Some(PathBuf::from(value)),
                "--netns" => out.netns = Some(PathBuf::from(value)),
                "--uid" => uid = Some(number(&value)?),
                "--gid" => gid = Some(number(&value)?),
                "--cgroup" => out.cgroups.push(PathBuf::from(value)),
                _ => return Err(bad(format!("unknown argument {name:?}"))),
            }
        }
        out.dir = dir.ok_or_else(|| bad("--dir is required".into()))?;
        out.user = match (uid, gid) {
            (Some(u), Some(g)) => Some((u, g)),
            (None, None) => None,
            _ => return Err(bad("--uid and --gid go together".into())),
        };
        Ok(out)
    }

    /// The command line [`Args::parse`] reads back.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec!["--dir".into(), self.dir.clone().into()];
        if let Some(ns) = &self.netns {
            v.extend(["--netns".into(), ns.clone().into()]);
        }
        if let Some((u, g)) = self.user {
            v.extend([
                "--uid".into(),
                u.to_string().into(),
                "--gid".into(),
                g.to_string().into(),
            ]);
        }
        for c in &self.cgroups {
            v.extend(["--cgroup".into(), c.clone().into()]);
        }
        v
    }
}

/// The sidecar's process from its command line (without the program name): runs until
/// killed; a bad command line exits 2, a failure 1, each with the reason on stderr.
pub fn main<I, S>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString>,
{
    let args = match Args::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "mesh proxy");
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn command_lines() {
        let a = Args::parse([
            "--dir", "/d", "--netns", "/n", "--uid", "7", "--gid", "8", "--cgroup", "/c1",
            "--cgroup", "/c2",
        ])
        .expect("parses");
        assert_eq!(a.dir, PathBuf::from("/d"));
        assert_eq!(a.netns, Some(PathBuf::from("/n")));
        assert_eq!(a.user, Some((7, 8)));
        assert_eq!(a.cgroups, vec![PathBuf::from("/c1"), PathBuf::from("/c2")]);
        for (args, why) in [
            (vec![], "--dir is required"),
            (vec!["--dir"], "--dir needs a value"),
            (vec!["--dir", "/d", "--uid", "1"], "go together"),
            (
                vec!["--dir", "/d", "--uid", "x", "--gid", "1"],
                "takes a number",
            ),
            (
                vec!["--dir", "/d", "--port", "1"],
                "unknown argument \"--port\"",
            ),
        ] {
            let e = Args::parse(args.clone()).expect_err(why).to_string();
            assert!(e.contains(why), "{args:?}: {e}");
        }
    }

    proptest! {
        /// What the agent writes, the proxy reads back; anything else is an error, never a
        /// panic.
        #[test]
        fn round_trip(
            dir in "/[a-z0-9/]{1,20}",
            netns in proptest::option::of("/[a-z0-9]{1,10}"),
            user in proptest::option::of((any::<u32>(), any::<u32>())),
            cgroups in proptest::collection::vec("/[a-z0-9]{1,10}", 0..3),
            junk in proptest::collection::vec("[ -~]{0,8}", 0..6),
        ) {
            let a = Args {
                dir: dir.into(),
                netns: netns.map(PathBuf::from),
                user,
                cgroups: cgroups.into_iter().map(PathBuf::from).collect(),
            };
            let b = Args::parse(a.to_args()).expect("round trip");
            prop_assert_eq!(
                (&a.dir, &a.netns, a.user, &a.cgroups),
                (&b.dir, &b.netns, b.user, &b.cgroups)
            );
            let _ = Args::parse(junk);
        }
    }
}
