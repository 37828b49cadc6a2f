//! Service virtual IPs: a connection from any container on this node (or from the node
//! itself) to a service's VIP and port goes to one ready endpoint, chosen per connection.
//!
//! The whole table is one `iptables-restore --noflush` of Skiff's own chains, so a change is
//! applied atomically and follows the service set as soon as it arrives:
//! - nat `SKIFF-SERVICES` (from PREROUTING and OUTPUT): per VIP and port, DNAT to endpoint *i*
//!   of *n* with probability 1/(n-i) (the `statistic` match), so each endpoint gets 1/n of new
//!   connections. Connections already set up keep their endpoint (conntrack); an endpoint that
//!   left gets no new one from the moment the table is replaced.
//! - nat `SKIFF-SVC-HAIRPIN` (from POSTROUTING): a connection a pod on this node's bridge made
//!   to a VIP that was sent back out of the bridge to a pod on the same node is masqueraded,
//!   so the reply comes back through the host and is un-NATed (the bridge would deliver it
//!   straight to the client otherwise, from an address it never called).
//! - filter `SKIFF-SVC-REJECT` (from FORWARD and OUTPUT): what reaches a VIP without being
//!   DNATed (no ready endpoint, or a port the service does not have) is refused at once
//!   (TCP reset, ICMP port unreachable) instead of leaving the node by its default route.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::hostport::{iptables, iptables_restore};

/// nat chain with the DNAT rules.
pub const SERVICES: &str = "SKIFF-SERVICES";
/// nat chain masquerading hairpin connections.
pub const HAIRPIN: &str = "SKIFF-SVC-HAIRPIN";
/// filter chain refusing what a VIP cannot serve.
pub const REJECT: &str = "SKIFF-SVC-REJECT";

/// Where each chain is jumped to from: (table, built-in chain, our chain).
const HOOKS: [(&str, &str, &str); 5] = [
    ("nat", "PREROUTING", SERVICES),
    ("nat", "OUTPUT", SERVICES),
    ("nat", "POSTROUTING", HAIRPIN),
    ("filter", "FORWARD", REJECT),
    ("filter", "OUTPUT", REJECT),
];

/// One service as the node programs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipService {
    /// `namespace/name`, for the rules' comments.
    pub name: String,
    pub vip: Ipv4Addr,
    /// (port, udp).
    pub ports: Vec<(u16, bool)>,
    /// The ready endpoints, in a stable order.
    pub endpoints: Vec<Ipv4Addr>,
}

/// The `iptables-restore` input for `services` on a node whose pods are in `subnet` behind
/// `bridge`. Declaring a chain flushes it, so the input replaces the whole table.
pub fn render(services: &[VipService], subnet: &str, bridge: &str) -> String {
    let mut nat = String::new();
    let mut filter = String::new();
    for s in services {
        for &(port, udp) in &s.ports {
            let proto = if udp { "udp" } else { "tcp" };
            let m = format!(
                "-d {}/32 -p {proto} -m {proto} --dport {port} -m comment --comment \"{}\"",
                s.vip, s.name
            );
            let n = s.endpoints.len();
            for (i, ep) in s.endpoints.iter().enumerate() {
                let left = n - i;
                let pick = if left > 1 {
                    format!(
                        " -m statistic --mode random --probability {:.10}",
                        1.0 / left as f64
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    nat,
                    "-A {SERVICES} {m}{pick} -j DNAT --to-destination {ep}:{port}"
                );
            }
        }
        // Anything else to the VIP: refused at once.
        let _ = writeln!(
            filter,
            "-A {REJECT} -d {}/32 -p tcp -m comment --comment \"{}\" -j REJECT --reject-with tcp-reset",
            s.vip, s.name
        );
        let _ = writeln!(
            filter,
            "-A {REJECT} -d {}/32 -m comment --comment \"{}\" -j REJECT --reject-with icmp-port-unreachable",
            s.vip, s.name
        );
    }
    format!(
        "*nat\n:{SERVICES} - [0:0]\n:{HAIRPIN} - [0:0]\n{nat}\
         -A {HAIRPIN} -s {subnet} -o {bridge} -m conntrack --ctstate DNAT -j MASQUERADE\n\
         COMMIT\n*filter\n:{REJECT} - [0:0]\n{filter}COMMIT\n"
    )
}

/// Replaces the node's VIP table with `rules` (from [`render`]) and makes sure the built-in
/// chains jump to it (first, ahead of the rules that accept the bridge's traffic).
pub fn apply(rules: &str) -> Result<(), String> {
    iptables_restore(None, &["-w", "--noflush"], rules, "the service table")?;
    for (table, builtin, chain) in HOOKS {
        if !iptables(&["-t", table, "-C", builtin, "-j", chain])? {
            iptables(&["-t", table, "-I", builtin, "1", "-j", chain])?
                .then_some(())
                .ok_or_else(|| format!("iptables refused the jump {table} {builtin} -> {chain}"))?;
        }
    }
    Ok(())
}

/// Removes the jumps and the chains (`network down`). Returns what was removed.
pub fn remove() -> Vec<String> {
    let mut done = Vec::new();
    for (table, builtin, chain) in HOOKS {
        while iptables(&["-t", table, "-D", builtin, "-j", chain]).unwrap_or(false) {
            done.push(format!("removed the jump {table} {builtin} -> {chain}"));
        }
    }
    for (table, chain) in [("nat", SERVICES), ("nat", HAIRPIN), ("filter", REJECT)] {
        if iptables(&["-t", table, "-F", chain]).unwrap_or(false)
            && iptables(&["-t", table, "-X", chain]).unwrap_or(false)
        {
            done.push(format!("removed chain {table} {chain}"));
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(endpoints: &[&str]) -> VipService {
        VipService {
            name: "default/web".into(),
            vip: "10.43.0.1".parse().expect("ip"),
            ports: vec![(8080, false), (53, true)],
            endpoints: endpoints.iter().map(|e| e.parse().expect("ip")).collect(),
        }
    }

    #[test]
    fn each_endpoint_gets_an_equal_share_and_the_last_takes_the_rest() {
        let out = render(
            &[svc(&["10.42.1.2", "10.42.2.2", "10.42.3.2"])],
            "10.42.1.0/24",
            "skiff0",
        );
        let tcp: Vec<&str> = out.lines().filter(|l| l.contains("--dport 8080")).collect();
        assert_eq!(tcp.len(), 3, "{out}");
        assert!(tcp[0].contains("--probability 0.3333333333"), "{}", tcp[0]);
        assert!(tcp[0].ends_with("--to-destination 10.42.1.2:8080"));
        assert!(tcp[1].contains("--probability 0.5000000000"), "{}", tcp[1]);
        assert!(!tcp[2].contains("statistic"), "{}", tcp[2]);
        assert!(tcp[2].ends_with("--to-destination 10.42.3.2:8080"));
        assert!(out.contains("-p udp -m udp --dport 53"));
        assert!(
            out.contains("-s 10.42.1.0/24 -o skiff0 -m conntrack --ctstate DNAT -j MASQUERADE")
        );
        // Both tables are declared (and so flushed) whatever the services.
        let empty = render(&[], "10.42.1.0/24", "skiff0");
        assert!(empty.starts_with("*nat\n:SKIFF-SERVICES - [0:0]\n"));
        assert!(empty.contains("*filter\n:SKIFF-SVC-REJECT - [0:0]\nCOMMIT\n"));
    }

    #[test]
    fn a_service_without_ready_endpoints_is_refused_not_routed() {
        let out = render(&[svc(&[])], "10.42.1.0/24", "skiff0");
        assert!(!out.contains("DNAT --to"), "{out}");
        assert!(out.contains("-A SKIFF-SVC-REJECT -d 10.43.0.1/32 -p tcp"));
        assert!(out.contains("--reject-with icmp-port-unreachable"));
    }
}
