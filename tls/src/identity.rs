//! Who a certificate speaks for: a controller member, a node (agent), or a person/CI user with
//! a role. The identity is the certificate's one URI SAN, `spiffe://skiff/...`; nothing else in
//! the certificate (CN, DNS or IP names) is ever used to authorize.

use std::fmt;
use std::str::FromStr;

use crate::TlsError;

/// The URI prefix of every Skiff identity.
pub const URI_PREFIX: &str = "spiffe://skiff/";

/// What a user may do. Each role can do everything the ones before it can.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Every read.
    Reader,
    /// Reads, and apply, scale, stop, drain, exec, logs.
    Operator,
    /// Everything: members, tokens, credentials, node removal, the CA.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        match s {
            "reader" => Ok(Role::Reader),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(TlsError::Invalid(format!(
                "unknown role {s:?} (expected admin, operator or reader)"
            ))),
        }
    }
}

/// The subject of a cluster certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A controller member, by its Raft id.
    Member(u64),
    /// A node's agent, by node name.
    Node(String),
    /// A person or a CI job.
    User { role: Role, name: String },
    /// A service's workload (the mesh sidecar of one of its allocations): authenticates to
    /// other workloads, never to a controller or an agent API.
    Workload { namespace: String, service: String },
}

/// A node or user name as it appears in an identity: 1-63 of `[A-Za-z0-9._-]`, not starting
/// with a dot or dash.
pub fn check_name(what: &str, name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(TlsError::Invalid(format!(
            "{what} name {name:?}: 1-63 characters of letters, digits, '.', '_' and '-', not starting with '.' or '-'"
        )))
    }
}

impl Identity {
    /// The URI SAN that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Member(id) => format!("{URI_PREFIX}member/{id}"),
            Identity::Node(name) => format!("{URI_PREFIX}node/{name}"),
            Identity::User { role, name } => format!("{URI_PREFIX}user/{role}/{name}"),
            Identity::Workload { namespace, service } => {
                format!("{URI_PREFIX}ns/{namespace}/svc/{service}")
            }
        }
    }

    /// Parses a URI SAN; anything that is not exactly one of the four forms is an error.
    pub fn from_uri(uri: &str) -> Result<Identity, TlsError> {
        let bad = |why: &str| TlsError::Invalid(format!("identity {uri:?}: {why}"));
        let rest = uri
            .strip_prefix(URI_PREFIX)
            .ok_or_else(|| bad("not a skiff identity"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["member", id] => {
                let id: u64 = id.parse().map_err(|_| bad("member id is not a number"))?;
                if id == 0 {
                    return Err(bad("member id 0"));
                }
                Ok(Identity::Member(id))
            }
            ["node", name] => {
                check_name("node", name)?;
                Ok(Identity::Node((*name).to_string()))
            }
            ["user", role, name] => {
                let role: Role = role.parse()?;
                check_name("user", name)?;
                Ok(Identity::User {
                    role,
                    name: (*name).to_string(),
                })
            }
            ["ns", namespace, "svc", service] => {
                check_name("namespace", namespace)?;
                check_name("service", service)?;
                Ok(Identity::Workload {
                    namespace: (*namespace).to_string(),
                    service: (*service).to_string(),
                })
            }
            _ => Err(bad(
                "expected member/ID, node/NAME, user/ROLE/NAME or ns/NAMESPACE/svc/SERVICE",
            )),
        }
    }

    /// Whether this identity may do what `need` asks.
    pub fn satisfies(&self, need: Need) -> bool {
        if matches!(self, Identity::Workload { .. }) {
            return need == Need::Nothing;
        }
        let role = |min: Role| matches!(self, Identity::User { role, .. } if *role >= min);
        let member = matches!(self, Identity::Member(_));
        match need {
            Need::Nothing => true,
            Need::Member => member,
            Need::Node => matches!(self, Identity::Node(_)) || member,
            Need::Reader => member || role(Role::Reader),
            Need::Operator => member || role(Role::Operator),
            Need::Admin => member || role(Role::Admin),
        }
    }

    /// Short form for logs: `member 2`, `node n1`, `operator alice`.
    pub fn describe(&self) -> String {
        match self {
            Identity::Member(id) => format!("member {id}"),
            Identity::Node(name) => format!("node {name}"),
            Identity::User { role, name } => format!("{role} {name}"),
            Identity::Workload { namespace, service } => {
                format!("workload {service}.{namespace}")
            }
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What a method requires of its caller. Members (controllers) may do everything: they forward
/// calls for clients that were checked where they came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// No certificate at all (only enrollment with a join token).
    Nothing,
    /// Controller members only (Raft).
    Member,
    /// A node; handlers check that it acts only as itself.
    Node,
    Reader,
    Operator,
    Admin,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_roles_nest() {
        for id in [
            Identity::Member(3),
            Identity::Node("n-1.a_b".into()),
            Identity::User {
                role: Role::Operator,
                name: "ci".into(),
            },
            Identity::Workload {
                namespace: "shop".into(),
                service: "web".into(),
            },
        ] {
            assert_eq!(Identity::from_uri(&id.uri()).expect("parse"), id);
        }
        let workload = Identity::Workload {
            namespace: "default".into(),
            service: "web".into(),
        };
        assert_eq!(workload.uri(), "spiffe://skiff/ns/default/svc/web");
        for need in [
            Need::Member,
            Need::Node,
            Need::Reader,
            Need::Operator,
            Need::Admin,
        ] {
            assert!(!workload.satisfies(need), "a workload passed {need:?}");
        }
        let reader = Identity::User {
            role: Role::Reader,
            name: "r".into(),
        };
        assert!(reader.satisfies(Need::Reader));
        assert!(!reader.satisfies(Need::Operator));
        assert!(!reader.satisfies(Need::Node));
        assert!(!Identity::Node("n".into()).satisfies(Need::Reader));
        assert!(!Identity::Node("n".into()).satisfies(Need::Member));
        assert!(Identity::Member(1).satisfies(Need::Admin));
        for bad in [
            "spiffe://skiff/member/0",
            "spiffe://skiff/member/x",
            "spiffe://skiff/node/",
            "spiffe://skiff/node/a/b",
            "spiffe://skiff/node/../x",
            "spiffe://skiff/user/root/x",
            "spiffe://other/node/x",
            "spiffe://skiff/user/admin/-x",
            "spiffe://skiff/ns/default/svc/",
            "spiffe://skiff/ns//svc/web",
            "spiffe://skiff/ns/default/svc/web/x",
            "spiffe://skiff/ns/default/job/web",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad}");
        }
    }
}
