//! The status page: a read-only view of the cluster served by the controller's HTTP port to
//! callers with the same rights as `skiff` reads (a client certificate from the cluster CA
//! with at least the reader role, over TLS on that port). Server-rendered HTML; a small
//! script swaps in a fresh `/status/fragment` every few seconds.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::raft::{MemberInfo, Role, Status};
use crate::reconcile::{Heartbeats, Measured};
use crate::state::{AllocationStatus, ClusterState, DesiredStatus, Health, JobStatus};

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn ago(now_ms: i64, at_ms: i64) -> String {
    let s = (now_ms - at_ms).max(0) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn state_name(s: &AllocationStatus) -> String {
    match s {
        AllocationStatus::Pending => "pending".into(),
        AllocationStatus::Running => "running".into(),
        AllocationStatus::Exited { code } => format!("exited ({code})"),
        AllocationStatus::Failed { reason } => format!("failed: {reason}"),
        AllocationStatus::Lost => "lost".into(),
    }
}

/// What the page shows, read at one instant.
pub struct View<'a> {
    pub status: &'a Status,
    pub members: &'a [MemberInfo],
    pub state: &'a ClusterState,
    /// The leader's measured usage, by allocation (empty on other members).
    pub usage: BTreeMap<String, Measured>,
    pub now_ms: i64,
}

impl<'a> View<'a> {
    pub fn new(
        status: &'a Status,
        members: &'a [MemberInfo],
        state: &'a ClusterState,
        heartbeats: &Heartbeats,
        now_ms: i64,
    ) -> View<'a> {
        View {
            status,
            members,
            state,
            usage: heartbeats
                .usage()
                .into_iter()
                .map(|(_, alloc, u)| (alloc, u))
                .collect(),
            now_ms,
        }
    }
}

/// The whole page.
pub fn page(v: &View) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Skiff cluster status</title>\
         <style>\
         body{{font-family:sans-serif;margin:1.5em;color:#222}}\
         h1{{font-size:1.5em}} h2{{font-size:1.2em;margin-top:1.4em}}\
         table{{border-collapse:collapse;margin:.4em 0}}\
         td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.95em}}\
         th{{background:#eef}} .bad{{color:#b00;font-weight:bold}} .ok{{color:#070}}\
         .muted{{color:#777}} code{{font-size:.95em}}\
         </style></head><body>\
         <h1>Skiff cluster status</h1>\
         <div id=\"status\">{}</div>\
         <p class=\"muted\">Refreshes every 3 s. <span id=\"refreshed\"></span></p>\
         <script>\
         async function refresh(){{\
           try{{const r=await fetch('/status/fragment',{{cache:'no-store'}});\
             if(r.ok){{document.getElementById('status').innerHTML=await r.text();\
               document.getElementById('refreshed').textContent='Last refresh: '+new Date().toISOString();}}\
           }}catch(e){{document.getElementById('refreshed').textContent='Refresh failed: '+e;}}\
         }}\
         setInterval(refresh,3000);\
         </script></body></html>\n",
        fragment(v)
    )
}

/// The page's content (what the script refreshes).
pub fn fragment(v: &View) -> String {
    let mut o = String::new();
    let me = v.status.id;
    let leader = v.status.leader;
    let _ = write!(
        o,
        "<p>Served by member <b>{me}</b> ({}), term {}, applied index {}. Leader: {}.</p>",
        v.status.role.as_str(),
        v.status.term,
        v.status.applied_index,
        leader.map_or("<span class=\"bad\">none</span>".to_owned(), |l| format!(
            "member <b>{l}</b>"
        ))
    );

    // Members.
    o.push_str(
        "<h2>Controllers</h2><table><tr><th>member</th><th>role</th><th>RPC</th><th>HTTP</th></tr>",
    );
    for m in v.members {
        let role = if Some(m.id) == leader {
            "leader"
        } else if m.voter {
            "voter"
        } else {
            "learner"
        };
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{role}</td><td>{}</td><td>{}</td></tr>",
            m.id,
            esc(&m.member.rpc_addr),
            esc(&m.member.http_addr)
        );
    }
    o.push_str("</table>");

    // Nodes, with what is reserved and (on the leader) what is used.
    let reserved = crate::reconcile::usage_by_node(v.state);
    let mut used: BTreeMap<&str, (f64, u64)> = BTreeMap::new();
    for a in v.state.allocations() {
        if let Some(u) = v.usage.get(&a.id) {
            let e = used.entry(a.node.as_str()).or_default();
            e.0 += u.cpu_cores;
            e.1 += u.memory_bytes;
        }
    }
    let measured = v.status.role == Role::Leader;
    o.push_str("<h2>Nodes</h2><table><tr><th>node</th><th>address</th><th>status</th><th>allocations</th><th>CPU reserved / total</th><th>memory reserved / total</th><th>CPU used</th><th>memory used</th></tr>");
    for n in v.state.nodes() {
        let (res, count) = reserved
            .get(n.name.as_str())
            .map(|(u, c)| (*u, *c))
            .unwrap_or_default();
        let class = match n.status.as_str() {
            "ready" => "ok",
            "down" => "bad",
            _ => "",
        };
        let (cpu_used, mem_used) = match (measured, used.get(n.name.as_str())) {
            (true, Some((c, m))) => (format!("{c:.2} cores"), mib(*m)),
            (true, None) => ("0".into(), "0".into()),
            (false, _) => ("(leader)".into(), "(leader)".into()),
        };
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td class=\"{class}\">{}</td><td>{count}</td>\
             <td>{:.2} / {:.2}</td><td>{} / {}</td><td>{cpu_used}</td><td>{mem_used}</td></tr>",
            esc(&n.name),
            esc(&n.address),
            n.status.as_str(),
            res.millicpu as f64 / 1000.0,
            n.resources.cpu,
            mib(res.memory),
            mib(n.resources.memory),
        );
    }
    o.push_str("</table>");
    if !measured {
        let _ = write!(
            o,
            "<p class=\"muted\">Measured usage is kept by the leader; see its status page.</p>"
        );
    }

    // Rollouts in progress.
    let open: Vec<_> = v
        .state
        .jobs(None)
        .filter_map(|j| j.rollouts.last().map(|r| (j, r)))
        .filter(|(_, r)| r.status.is_open())
        .collect();
    o.push_str("<h2>Rollouts in progress</h2>");
    if open.is_empty() {
        o.push_str("<p class=\"muted\">None.</p>");
    } else {
        o.push_str("<table><tr><th>job</th><th>version</th><th>status</th><th>healthy</th><th>old left</th><th>started</th></tr>");
        for (j, r) in open {
            let _ = write!(
                o,
                "<tr><td>{}/{}</td><td>{} (from {})</td><td>{}{}</td><td>{} / {}</td><td>{}</td><td>{}</td></tr>",
                esc(&j.namespace),
                esc(&j.name),
                r.version,
                r.from_version,
                r.status.as_str(),
                if r.canary > 0 && !r.promoted {
                    ", canaries awaiting promotion"
                } else {
                    ""
                },
                r.healthy,
                j.latest().spec.replicas,
                r.old_left,
                ago(v.now_ms, r.started_at_ms)
            );
        }
        o.push_str("</table>");
    }

    // Jobs and their allocations.
    o.push_str("<h2>Jobs</h2>");
    // Each job's allocations that should run, in one pass over them all.
    let mut by_job: BTreeMap<(&str, &str), Vec<&crate::state::Allocation>> = BTreeMap::new();
    for a in v.state.allocations() {
        if a.desired == DesiredStatus::Run {
            by_job
                .entry((a.namespace.as_str(), a.job.as_str()))
                .or_default()
                .push(a);
        }
    }
    for j in v.state.jobs(None) {
        let allocs = by_job
            .remove(&(j.namespace.as_str(), j.name.as_str()))
            .unwrap_or_default();
        let running = allocs
            .iter()
            .filter(|a| a.observed == AllocationStatus::Running)
            .count();
        let _ = write!(
            o,
            "<h3 class=\"job\">{}/{} <span class=\"muted\">version {}, {}, {running}/{} running{}</span></h3>",
            esc(&j.namespace),
            esc(&j.name),
            j.latest().version,
            if j.status == JobStatus::Running {
                "running"
            } else {
                "stopped"
            },
            j.latest().spec.replicas,
            j.pending
                .as_ref()
                .map(|p| format!(", <span class=\"bad\">pending: {}</span>", esc(p)))
                .unwrap_or_default()
        );
        if allocs.is_empty() {
            continue;
        }
        o.push_str("<table><tr><th>allocation</th><th>node</th><th>version</th><th>state</th><th>health</th><th>restarts</th><th>CPU</th><th>memory</th></tr>");
        for a in allocs {
            let health = match a.health {
                Some(Health::Healthy) => "<span class=\"ok\">healthy</span>",
                Some(Health::Unhealthy) => "<span class=\"bad\">unhealthy</span>",
                Some(Health::Starting) => "starting",
                None => "-",
            };
            let (cpu, mem) = match v.usage.get(&a.id) {
                Some(u) => (
                    format!("{:.3}", u.cpu_cores),
                    if u.memory_limit_bytes > 0 {
                        format!("{} of {}", mib(u.memory_bytes), mib(u.memory_limit_bytes))
                    } else {
                        mib(u.memory_bytes)
                    },
                ),
                None => ("-".into(), "-".into()),
            };
            let _ = write!(
                o,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{health}</td><td>{}</td><td>{cpu}</td><td>{mem}</td></tr>",
                esc(&a.id),
                esc(&a.node),
                a.job_version,
                esc(&state_name(&a.observed)),
                a.restarts
            );
        }
        o.push_str("</table>");
    }

    // Recent events, newest first.
    o.push_str("<h2>Recent events</h2><table><tr><th>when</th><th>kind</th><th>subject</th><th>message</th></tr>");
    for e in v.state.events().rev().take(30) {
        let subject = if e.job.is_empty() {
            format!("node {}", e.node)
        } else if e.alloc.is_empty() {
            format!("{}/{}", e.namespace, e.job)
        } else {
            format!("{}/{} {}", e.namespace, e.job, e.alloc)
        };
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ago(v.now_ms, e.at_ms),
            esc(&e.kind),
            esc(&subject),
            esc(&e.message)
        );
    }
    o.push_str("</table>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn the_page_shows_members_and_an_empty_cluster() {
        let status = Status {
            id: 1,
            role: Role::Leader,
            term: 3,
            leader: Some(1),
            last_log_index: 9,
            committed_index: 9,
            applied_index: 9,
            snapshot_index: 0,
            purged_index: 0,
            fatal: None,
            command_level: 1,
            release: "0.1.0".into(),
        };
        let state = ClusterState::default();
        let v = View {
            status: &status,
            members: &[],
            state: &state,
            usage: BTreeMap::new(),
            now_ms: 0,
        };
        let p = page(&v);
        assert!(
            p.contains("Served by member <b>1</b> (leader), term 3"),
            "{p}"
        );
        assert!(p.contains("/status/fragment"));
        assert!(p.contains("<h2>Rollouts in progress</h2><p class=\"muted\">None.</p>"));
    }
}
