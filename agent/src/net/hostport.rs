//! Host ports: traffic to the node's advertise address on a published port reaches an
//! allocation's pod. One DNAT rule per port in nat PREROUTING (traffic from other hosts) and
//! one in nat OUTPUT (from the node itself), each tagged with a comment naming the allocation,
//! so the rules of an allocation are found and removed with it (and by `network down`). The
//! bridge's FORWARD rules already let the traffic through.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// The comment on every host port rule; the allocation id follows it.
const TAG: &str = "skiff hostport ";

/// One published port: the node's port, the pod's port, the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub host_port: u16,
    pub port: u16,
    pub udp: bool,
}

/// Runs `iptables -w ARGS` quietly: whether it succeeded, or why it could not run.
pub(crate) fn iptables<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<bool, String> {
    Command::new("iptables")
        .arg("-w")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .map_err(|e| format!("iptables: {e}"))
}

fn rule(chain: &str, alloc: &str, node: IpAddr, pod: IpAddr, p: &Published) -> Vec<String> {
    let proto = if p.udp { "udp" } else { "tcp" };
    let mut r: Vec<String> = vec![chain.into(), "-d".into(), format!("{node}/32")];
    if chain == "OUTPUT" {
        // Only what the node itself sends to its own address; not what passes through.
        r.extend([
            "-m".into(),
            "addrtype".into(),
            "--src-type".into(),
            "LOCAL".into(),
        ]);
    }
    r.extend([
        "-p".into(),
        proto.into(),
        "--dport".into(),
        p.host_port.to_string(),
        "-m".into(),
        "comment".into(),
        "--comment".into(),
        format!("{TAG}{alloc}"),
        "-j".into(),
        "DNAT".into(),
        "--to-destination".into(),
        format!("{pod}:{}", p.port),
    ]);
    r
}

/// Publishes `ports` of allocation `alloc` (its pod at `pod`) on the node's address `node`.
/// Idempotent; on failure what was added is removed again.
pub fn publish(alloc: &str, node: IpAddr, pod: IpAddr, ports: &[Published]) -> Result<(), String> {
    for p in ports {
        for chain in ["PREROUTING", "OUTPUT"] {
            let r = rule(chain, alloc, node, pod, p);
            let check: Vec<String> = ["-t", "nat", "-C"]
                .iter()
                .map(|s| s.to_string())
                .chain(r.iter().cloned())
                .collect();
            if iptables(&check)? {
                continue;
            }
            let add: Vec<String> = ["-t", "nat", "-A"]
                .iter()
                .map(|s| s.to_string())
                .chain(r)
                .collect();
            if !iptables(&add)? {
                unpublish(alloc);
                return Err(format!(
                    "iptables refused the rule publishing host port {}",
                    p.host_port
                ));
            }
        }
    }
    Ok(())
}

/// The rules in nat `chain` tagged for an allocation: (allocation, rule spec after `-A`).
fn tagged(chain: &str) -> Vec<(String, Vec<String>)> {
    let Ok(out) = Command::new("iptables")
        .args(["-w", "-t", "nat", "-S", chain])
        .output()
    else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(spec) = line.strip_prefix("-A ") else {
            continue;
        };
        let args = split_quoted(spec);
        let Some(alloc) = args
            .iter()
            .find_map(|a| a.strip_prefix(TAG))
            .map(str::to_owned)
        else {
            continue;
        };
        found.push((alloc, args));
    }
    found
}

/// Removes every host port rule of `alloc`. Idempotent.
pub fn unpublish(alloc: &str) {
    for chain in ["PREROUTING", "OUTPUT"] {
        for (owner, args) in tagged(chain) {
            if owner == alloc {
                let del: Vec<String> = ["-t", "nat", "-D"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain(args)
                    .collect();
                let _ = iptables(&del);
            }
        }
    }
}

/// The allocations that have host port rules on this node.
pub fn published() -> BTreeSet<String> {
    ["PREROUTING", "OUTPUT"]
        .iter()
        .flat_map(|c| tagged(c))
        .map(|(alloc, _)| alloc)
        .collect()
}

/// Splits an `iptables -S` line into arguments, keeping quoted comments whole.
pub fn split_quoted(spec: &str) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut quoted = false;
    let mut cur = String::new();
    for ch in spec.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => args.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    args.push(cur);
    args
}

/// Feeds `input` to `iptables-restore ARGS`, in the network namespace bound at `netns` (through
/// nsenter) or in this one; `what` names the table in the error.
pub(crate) fn iptables_restore(
    netns: Option<&std::path::Path>,
    args: &[&str],
    input: &str,
    what: &str,
) -> Result<(), String> {
    use std::io::Write as _;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = std::process::Command::new("nsenter");
            c.arg(format!("--net={}", ns.display()))
                .arg("iptables-restore");
            c
        }
        None => std::process::Command::new("iptables-restore"),
    };
    let mut child = cmd
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("iptables-restore: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("iptables-restore: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("iptables-restore: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "iptables-restore refused {what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_the_allocation_and_split_back() {
        let r = rule(
            "PREROUTING",
            "a1",
            "198.18.0.2".parse().expect("ip"),
            "10.42.0.5".parse().expect("ip"),
            &Published {
                host_port: 18080,
                port: 8080,
                udp: false,
            },
        );
        assert!(r.contains(&"skiff hostport a1".to_owned()));
        assert!(r.contains(&"10.42.0.5:8080".to_owned()));
        let line = "PREROUTING -d 198.18.0.2/32 -p tcp -m tcp --dport 18080 -m comment --comment \"skiff hostport a1\" -j DNAT --to-destination 10.42.0.5:8080";
        let args = split_quoted(line);
        assert!(args.contains(&"skiff hostport a1".to_owned()), "{args:?}");
    }
}
