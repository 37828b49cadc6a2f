//! What the agent tells the proxy, as JSON files in the proxy's directory: `proxy.json`
//! (written once, before the proxy starts) and `services.json` (rewritten, by rename, each
//! time the cluster's service set changes). Both are validated on load: a file that does not
//! validate is refused whole and the proxy keeps what it had.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::ProxyError;

/// The static configuration's file name.
pub const CONFIG_FILE: &str = "proxy.json";
/// The service set's file name.
pub const SERVICES_FILE: &str = "services.json";
/// The workload's certificate, key and the cluster's CA certificates.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const CA_FILE: &str = "ca.pem";

/// Where outbound connections are redirected to (on 127.0.0.1).
pub const OUTBOUND_PORT: u16 = 15001;
/// Where inbound connections are redirected to.
pub const INBOUND_PORT: u16 = 15006;
/// The proxy's own HTTP endpoint: `/ready` and `/metrics`.
pub const ADMIN_PORT: u16 = 15020;

/// How the inbound side treats callers without TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Mutual TLS only.
    #[default]
    Strict,
    /// Mutual TLS, or plain TCP from callers that do not start a TLS handshake (a migration).
    Permissive,
}

/// A service, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

impl ServiceRef {
    /// The DNS name a workload certificate of this service carries, and the name the proxy
    /// asks for when it calls one.
    pub fn dns_name(&self) -> String {
        format!("{}.{}.skiff.internal", self.name, self.namespace)
    }

    /// Parses `name` or `name.namespace` (the spec's form), in `namespace` by default.
    pub fn parse(s: &str, namespace: &str) -> Result<ServiceRef, ProxyError> {
        let (name, ns) = s.split_once('.').unwrap_or((s, namespace));
        let r = ServiceRef {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        };
        r.check()?;
        Ok(r)
    }

    fn check(&self) -> Result<(), ProxyError> {
        skiff_common::validate_name("namespace", &self.namespace)
            .and_then(|()| skiff_common::validate_name("service", &self.name))
            .map_err(|e| ProxyError::Config(e.to_string()))
    }
}

/// `proxy.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The workload this proxy speaks for (its certificate's identity).
    pub identity: ServiceRef,
    #[serde(default)]
    pub mode: Mode,
    /// Who may call the workload; empty: any workload of the cluster.
    #[serde(default)]
    pub allow_from: Vec<ServiceRef>,
    /// The services the workload may call; empty: any.
    #[serde(default)]
    pub upstreams: Vec<ServiceRef>,
    /// The workload's TCP ports: connections to them are terminated here.
    #[serde(default)]
    pub inbound_ports: Vec<u16>,
    /// Those of `inbound_ports` that speak HTTP (per-request metrics).
    #[serde(default)]
    pub http_ports: Vec<u16>,
    /// The version of the workload's job (a label of the request metrics).
    #[serde(default)]
    pub version: u64,
    #[serde(default = "default_outbound")]
    pub outbound_port: u16,
    #[serde(default = "default_inbound")]
    pub inbound_port: u16,
    #[serde(default = "default_admin")]
    pub admin_port: u16,
}

fn default_outbound() -> u16 {
    OUTBOUND_PORT
}
fn default_inbound() -> u16 {
    INBOUND_PORT
}
fn default_admin() -> u16 {
    ADMIN_PORT
}

impl ProxyConfig {
    pub fn parse(text: &str) -> Result<ProxyConfig, ProxyError> {
        let c: ProxyConfig = serde_json::from_str(text)
            .map_err(|e| ProxyError::Config(format!("{CONFIG_FILE}: {e}")))?;
        c.identity.check()?;
        for r in c.allow_from.iter().chain(&c.upstreams) {
            r.check()?;
        }
        let own: BTreeSet<u16> = [c.outbound_port, c.inbound_port, c.admin_port].into();
        if own.len() != 3 || own.contains(&0) {
            return Err(ProxyError::Config(format!(
                "{CONFIG_FILE}: the proxy's ports must be three distinct non-zero ports"
            )));
        }
        if let Some(p) = c.inbound_ports.iter().find(|p| **p == 0 || own.contains(p)) {
            return Err(ProxyError::Config(format!(
                "{CONFIG_FILE}: workload port {p} is 0 or one of the proxy's own"
            )));
        }
        if let Some(p) = c.http_ports.iter().find(|p| !c.inbound_ports.contains(p)) {
            return Err(ProxyError::Config(format!(
                "{CONFIG_FILE}: HTTP port {p} is not one of the workload's ports"
            )));
        }
        Ok(c)
    }

    /// Whether `caller` may call the workload.
    pub fn allows(&self, caller: &ServiceRef) -> bool {
        self.allow_from.is_empty() || self.allow_from.contains(caller)
    }

    /// Whether the workload may call `target`.
    pub fn may_call(&self, target: &ServiceRef) -> bool {
        self.upstreams.is_empty() || self.upstreams.contains(target)
    }
}

/// One service of the cluster as the proxy routes to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub service: ServiceRef,
    pub vip: Ipv4Addr,
    /// TCP ports (a connection to `vip:port` goes to `endpoint:port`).
    pub ports: Vec<u16>,
    /// The ready endpoints.
    pub endpoints: Vec<Target>,
}

/// One ready endpoint of an [`Upstream`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub ip: Ipv4Addr,
    /// Whether it runs the mesh (is called with mutual TLS); during a rollout that adds or
    /// removes `[mesh]`, a service has both kinds.
    pub mesh: bool,
}

/// `services.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSet {
    pub services: Vec<Upstream>,
}

impl ServiceSet {
    pub fn parse(text: &str) -> Result<ServiceSet, ProxyError> {
        let s: ServiceSet = serde_json::from_str(text)
            .map_err(|e| ProxyError::Config(format!("{SERVICES_FILE}: {e}")))?;
        let mut vips = BTreeSet::new();
        for u in &s.services {
            u.service.check()?;
            if !vips.insert(u.vip) {
                return Err(ProxyError::Config(format!(
                    "{SERVICES_FILE}: virtual IP {} is given to two services",
                    u.vip
                )));
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            identity: ServiceRef::parse("api", "default").expect("ref"),
            mode: Mode::Strict,
            allow_from: vec![ServiceRef::parse("web", "default").expect("ref")],
            upstreams: vec![],
            inbound_ports: vec![8080],
            http_ports: vec![8080],
            version: 2,
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            admin_port: ADMIN_PORT,
        }
    }

    #[test]
    fn round_trips_and_checks_names_and_ports() {
        let c = cfg();
        let text = serde_json::to_string(&c).expect("json");
        assert_eq!(ProxyConfig::parse(&text).expect("parse"), c);
        let mut bad = c.clone();
        bad.allow_from[0].name = "No_Such".into();
        let err =
            ProxyConfig::parse(&serde_json::to_string(&bad).expect("json")).expect_err("bad name");
        assert!(err.to_string().contains("No_Such"), "{err}");
        let mut bad = c.clone();
        bad.inbound_ports = vec![INBOUND_PORT];
        assert!(ProxyConfig::parse(&serde_json::to_string(&bad).expect("json")).is_err());
        assert!(ProxyConfig::parse("{\"identity\":1}").is_err());
        let mut bad = c.clone();
        bad.http_ports = vec![9090];
        assert!(ProxyConfig::parse(&serde_json::to_string(&bad).expect("json")).is_err());
    }

    #[test]
    fn service_refs_take_the_namespace_when_given() {
        let r = ServiceRef::parse("web.prod", "default").expect("ref");
        assert_eq!((r.name.as_str(), r.namespace.as_str()), ("web", "prod"));
        assert_eq!(r.dns_name(), "web.prod.skiff.internal");
        assert!(ServiceRef::parse("", "default").is_err());
        assert!(ServiceRef::parse("a.b.c", "default").is_err());
    }

    #[test]
    fn allow_from_and_upstreams_empty_mean_any() {
        let mut c = cfg();
        let web = ServiceRef::parse("web", "default").expect("ref");
        let other = ServiceRef::parse("other", "default").expect("ref");
        assert!(c.allows(&web) && !c.allows(&other));
        assert!(c.may_call(&other));
        c.allow_from.clear();
        c.upstreams = vec![web.clone()];
        assert!(c.allows(&other) && c.may_call(&web) && !c.may_call(&other));
    }

    #[test]
    fn a_vip_given_twice_is_refused() {
        let u = Upstream {
            service: ServiceRef::parse("a", "default").expect("ref"),
            vip: Ipv4Addr::new(10, 43, 0, 1),
            ports: vec![80],
            endpoints: vec![Target {
                ip: Ipv4Addr::new(10, 42, 0, 2),
                mesh: true,
            }],
        };
        let mut v = u.clone();
        v.service.name = "b".into();
        let s = ServiceSet {
            services: vec![u, v],
        };
        let err = ServiceSet::parse(&serde_json::to_string(&s).expect("json")).expect_err("dup");
        assert!(err.to_string().contains("10.43.0.1"), "{err}");
    }
}
