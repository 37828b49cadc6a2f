//! Health [`Check`]s of a service, written in a spec as one inline table:
//! `{ http = "/", interval = "2s", timeout = "1s" }`, `{ tcp = "http" }` or
//! `{ exec = ["cat", "/ready"] }`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::encoding;

/// A health check. Exactly one kind (`http`, `tcp`, `exec`) is given in the spec; it is stored
/// parsed in [`Check::kind`], and the spec form is written back on serialization.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CheckRepr", into = "CheckRepr")]
pub struct Check {
    /// What is probed.
    pub kind: CheckKind,
    /// `interval`: time between probes; default 10s.
    pub interval: Duration,
    /// `timeout`: a probe that takes longer fails; default 2s, shorter than `interval`.
    pub timeout: Duration,
    /// `healthy_threshold`: consecutive passes that make a replica healthy; default 1.
    pub healthy_threshold: u32,
    /// `unhealthy_threshold`: consecutive failures that make a replica unhealthy; default 3.
    pub unhealthy_threshold: u32,
}

/// What a [`Check`] probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// `http = "/path"`: a GET that must answer `expected_status`.
    Http {
        /// The request path, starting with `/`.
        path: String,
        /// `port`: the name of the port to probe; the service port when `None`
        /// (filled in on parse).
        port: Option<String>,
        /// `expected_status`: default 200.
        expected_status: u16,
    },
    /// `tcp = "port-name"`: a connection to that port must open.
    Tcp {
        /// The name of the port to connect to.
        port: String,
    },
    /// `exec = ["cmd", "arg"]`: the command, run in the container, must exit 0.
    Exec {
        /// The command and its arguments.
        command: Vec<String>,
    },
}

impl CheckKind {
    /// `http`, `tcp` or `exec`, as the kind is written in a spec.
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Http { .. } => "http",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Exec { .. } => "exec",
        }
    }
}

impl Check {
    /// A check of `kind` with every other field at its default.
    pub fn new(kind: CheckKind) -> Check {
        Check {
            kind,
            interval: default_interval(),
            timeout: default_timeout(),
            healthy_threshold: 1,
            unhealthy_threshold: default_unhealthy_threshold(),
        }
    }
}

const DEFAULT_EXPECTED_STATUS: u16 = 200;

fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_one() -> u32 {
    1
}
fn default_unhealthy_threshold() -> u32 {
    3
}

/// The spec form of a [`Check`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tcp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exec: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_u16"
    )]
    expected_status: Option<u16>,
    #[serde(default = "default_interval", with = "encoding::duration")]
    interval: Duration,
    #[serde(default = "default_timeout", with = "encoding::duration")]
    timeout: Duration,
    #[serde(default = "default_one", deserialize_with = "encoding::u32_int")]
    healthy_threshold: u32,
    #[serde(
        default = "default_unhealthy_threshold",
        deserialize_with = "encoding::u32_int"
    )]
    unhealthy_threshold: u32,
}

fn opt_u16<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    encoding::u16_int(d).map(Some)
}

impl TryFrom<CheckRepr> for Check {
    type Error = String;

    fn try_from(r: CheckRepr) -> Result<Check, String> {
        let given: Vec<&str> = [
            ("http", r.http.is_some()),
            ("tcp", r.tcp.is_some()),
            ("exec", r.exec.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        let port_given = r.port.is_some();
        let status_given = r.expected_status.is_some();
        let kind = match (r.http, r.tcp, r.exec) {
            (Some(path), None, None) => CheckKind::Http {
                path,
                port: r.port,
                expected_status: r.expected_status.unwrap_or(DEFAULT_EXPECTED_STATUS),
            },
            (None, Some(port), None) => CheckKind::Tcp { port },
            (None, None, Some(command)) => CheckKind::Exec { command },
            (None, None, None) => {
                return Err("exactly one of http, tcp or exec must be given, found none".to_owned());
            }
            _ => {
                return Err(format!(
                    "exactly one of http, tcp or exec must be given, found {}",
                    given.join(" and ")
                ));
            }
        };
        if !matches!(kind, CheckKind::Http { .. }) {
            for (field, set) in [("port", port_given), ("expected_status", status_given)] {
                if set {
                    return Err(format!(
                        "{field} applies only to http checks, not {}",
                        kind.name()
                    ));
                }
            }
        }
        Ok(Check {
            kind,
            interval: r.interval,
            timeout: r.timeout,
            healthy_threshold: r.healthy_threshold,
            unhealthy_threshold: r.unhealthy_threshold,
        })
    }
}

impl From<Check> for CheckRepr {
    fn from(c: Check) -> CheckRepr {
        let mut r = CheckRepr {
            http: None,
            tcp: None,
            exec: None,
            port: None,
            expected_status: None,
            interval: c.interval,
            timeout: c.timeout,
            healthy_threshold: c.healthy_threshold,
            unhealthy_threshold: c.unhealthy_threshold,
        };
        match c.kind {
            CheckKind::Http {
                path,
                port,
                expected_status,
            } => {
                r.http = Some(path);
                r.port = port;
                r.expected_status = Some(expected_status);
            }
            CheckKind::Tcp { port } => r.tcp = Some(port),
            CheckKind::Exec { command } => r.exec = Some(command),
        }
        r
    }
}
