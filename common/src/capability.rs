//! What an agent can do beyond the base contract. An agent lists its capabilities when it
//! registers; a job that needs one is placed only on nodes whose agent has it, so that an
//! agent one release older than the controllers never runs a job whose semantics it would
//! silently ignore (it cannot know about a field added after it was built).

use std::collections::BTreeSet;

use crate::spec::JobSpec;

/// The agent's container monitors stop a job's replicas when the node's lease runs out
/// (`[disconnect] stop_after`).
pub const FENCE: &str = "fence";

/// Everything this build's agent can do.
pub const ALL: &[&str] = &[FENCE];

/// At most this many capabilities per node.
pub const MAX_CAPABILITIES: usize = 64;

/// The capabilities a node must have to run `spec`'s replicas.
pub fn required_by(spec: &JobSpec) -> Vec<&'static str> {
    let mut needs = Vec::new();
    if spec.disconnect.is_some() {
        needs.push(FENCE);
    }
    needs
}

/// Checks an agent's list: at most [`MAX_CAPABILITIES`], each 1 to 32 of `[a-z0-9-]`. Names
/// this build does not know are kept (a newer agent may know more); duplicates fold.
pub fn parse(list: &[String]) -> Result<BTreeSet<String>, String> {
    if list.len() > MAX_CAPABILITIES {
        return Err(format!(
            "capabilities: {} is more than {MAX_CAPABILITIES}",
            list.len()
        ));
    }
    list.iter()
        .map(|c| {
            let ok = (1..=32).contains(&c.len())
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if ok {
                Ok(c.clone())
            } else {
                Err(format!("capabilities: {c:?} is not 1 to 32 of [a-z0-9-]"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_jobs_need_fence() {
        let mut spec = JobSpec::new("lock", "demo/lock:1");
        assert!(required_by(&spec).is_empty());
        spec.disconnect = Some(crate::spec::Disconnect {
            stop_after: std::time::Duration::from_secs(20),
        });
        assert_eq!(required_by(&spec), vec![FENCE]);
    }

    #[test]
    fn agent_lists_are_checked() {
        let ok = parse(&["fence".into(), "fence".into(), "gpu-2".into()]).unwrap();
        assert_eq!(ok.len(), 2);
        assert!(parse(&[String::new()]).unwrap_err().contains("\"\""));
        assert!(parse(&["Fence".into()]).unwrap_err().contains("Fence"));
        assert!(parse(&["x".repeat(33)]).is_err());
        let many: Vec<String> = (0..65).map(|i| format!("c{i}")).collect();
        assert!(parse(&many).unwrap_err().contains("65"));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_keeps_only_valid_names(list in proptest::collection::vec(".{0,40}", 0..70)) {
            if let Ok(set) = parse(&list) {
                proptest::prop_assert!(set.len() <= MAX_CAPABILITIES);
                for c in set {
                    proptest::prop_assert!(!c.is_empty() && c.len() <= 32);
                    proptest::prop_assert!(c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
                }
            }
        }
    }
}
