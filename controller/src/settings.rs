//! Cluster-wide settings: fixed at bootstrap and kept in the replicated state
//! ([`crate::state::ClusterSettings`]). The first leader that finds none commits them (this
//! member's flags, defaults for the rest); every member compares them with the flags it was
//! started with and stops, naming both values, when they differ.
//!
//! Per-member settings (addresses) live in the member's data dir; everything else
//! (Raft timing, node grace, snapshot interval) is per start.

use std::time::Duration;

use tokio::sync::watch;

use crate::config::ClusterFlags;
use crate::raft::{RaftNode, Role};
use crate::state::Command;

/// Runs until `stop`: commits the settings when this member leads a cluster that has none,
/// and reports a conflict with `flags` on `conflict`.
pub async fn keep(
    node: RaftNode,
    flags: ClusterFlags,
    conflict: watch::Sender<Option<String>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut applied = node.applied_watch();
    loop {
        let current = node.state().state.settings().cloned();
        match current {
            Some(settings) => {
                if let Some(why) = flags.conflict(&settings) {
                    tracing::error!(error = %why, "cluster settings conflict");
                    let _ = conflict.send(Some(why));
                    return;
                }
                // Fixed for good: nothing more to watch.
                return;
            }
            None if node.status().role == Role::Leader => {
                let settings = flags.for_bootstrap();
                match node
                    .write(Command::InitCluster {
                        settings: settings.clone(),
                    })
                    .await
                {
                    Ok((Ok(_), _)) => {
                        tracing::info!(%settings, "cluster settings committed");
                        continue;
                    }
                    Ok((Err(e), _)) => tracing::warn!(error = %e, "cluster settings refused"),
                    Err(e) => tracing::debug!(error = %e, "committing cluster settings"),
                }
            }
            None => {}
        }
        tokio::select! {
            _ = stop.changed() => return,
            changed = applied.changed() => if changed.is_none() { return },
            // A leadership change is not an applied entry: look again now and then.
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
