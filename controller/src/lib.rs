//! `skiff-controller`: one member of Skiff's Raft-replicated control plane.
//!
//! Code map: [`config`] (flags, env, file), [`datadir`] (the member's identity on disk),
//! [`raft`] (consensus; the only module that knows openraft), [`state`] (the pure cluster
//! state machine), [`api`] (gRPC and HTTP), [`metrics`].

#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod datadir;
pub mod metrics;
pub mod pki;
pub mod raft;
pub mod reconcile;
pub mod scheduler;
pub mod settings;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use skiff_proto::MAX_MESSAGE_BYTES;
use skiff_proto::v1::cluster_server::ClusterServer;
use skiff_proto::v1::jobs_server::JobsServer;
use skiff_proto::v1::nodes_server::NodesServer;
use skiff_proto::v1::pki_server::PkiServer;
use skiff_proto::v1::raft_internal_server::RaftInternalServer;
use skiff_tls::{AuthzLayer, Need, TlsContext};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{ApiContext, ClusterApi, JobsApi, NodesApi, PkiApi};
use crate::config::{Config, Formation};
use crate::datadir::{DataDir, DataDirError};
use crate::metrics::Metrics;
use crate::raft::{Member, RaftNode, RaftNodeError, RaftService};

/// Why the controller could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Raft(#[from] RaftNodeError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("raft core stopped: {0}")]
    Fatal(String),
    /// A cluster-wide setting given to this member differs from the cluster's.
    #[error("{0}")]
    Settings(String),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
}

/// What each gRPC method of the controller needs of its caller.
pub fn policy(path: &str) -> Need {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("", ""));
    match (service, method) {
        ("skiff.v1.RaftInternal", _) => Need::Member,
        ("skiff.v1.Pki", "Join") => Need::Nothing,
        ("skiff.v1.Pki", "Renew") => Need::Node,
        ("skiff.v1.Pki", "SignWorkload") => Need::Node,
        ("skiff.v1.Pki", _) => Need::Admin,
        ("skiff.v1.Nodes", "Register" | "Heartbeat" | "WatchAllocations" | "WatchServices") => {
            Need::Node
        }
        ("skiff.v1.Nodes", "ListNodes" | "ListUsage") => Need::Reader,
        ("skiff.v1.Nodes", "SetDrain") => Need::Operator,
        ("skiff.v1.Nodes", "Liveness") => Need::Member,
        ("skiff.v1.Nodes", "RemoveNode") => Need::Admin,
        ("skiff.v1.Jobs", "ApplyJob" | "StopJob" | "ScaleJob" | "Rollout") => Need::Operator,
        ("skiff.v1.Jobs", _) => Need::Reader,
        ("skiff.v1.Cluster", "AddMember" | "RemoveMember") => Need::Admin,
        ("skiff.v1.Cluster", _) => Need::Reader,
        _ => Need::Member,
    }
}

/// A running controller member.
pub struct Controller {
    node: RaftNode,
    rpc_addr: SocketAddr,
    http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Set when this member learns that the cluster's settings differ from its flags.
    conflict: watch::Receiver<Option<String>>,
    _data_dir: DataDir,
}

impl Controller {
    /// Opens the data dir, starts Raft and the servers, and forms or joins the cluster on a
    /// first start. Returns once the servers are listening.
    pub async fn start(config: Config) -> Result<Controller, ControllerError> {
        let data_dir = DataDir::open(
            &config.data_dir,
            config.id,
            config.rpc_addr,
            config.http_addr,
            &config.formation,
        )?;
        let ident = data_dir.identity.clone();
        let metrics = Arc::new(Metrics::new());
        let me = Member {
            rpc_addr: ident.rpc_addr.to_string(),
            http_addr: ident.http_addr.to_string(),
        };
        let rpc_listener =
            TcpListener::bind(ident.rpc_addr)
                .await
                .map_err(|source| ControllerError::Bind {
                    what: "gRPC",
                    addr: ident.rpc_addr,
                    source,
                })?;
        let http_listener =
            TcpListener::bind(ident.http_addr)
                .await
                .map_err(|source| ControllerError::Bind {
                    what: "HTTP",
                    addr: ident.http_addr,
                    source,
                })?;
        let rpc_addr = rpc_listener
            .local_addr()
            .map_err(|source| ControllerError::Bind {
                what: "gRPC",
                addr: ident.rpc_addr,
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| ControllerError::Bind {
                what: "HTTP",
                addr: ident.http_addr,
                source,
            })?;
        let material = pki::material(&config, &ident).await?;
        let tls = TlsContext::new(material).map_err(pki::PkiError::from)?;
        let node = RaftNode::open(
            config.id,
            me,
            &data_dir.raft_dir(),
            &config.raft,
            metrics.apply_seconds.clone(),
            tls.clone(),
        )
        .await?;
        // What this member already knows of the cluster (its own log and snapshot): a flag
        // that contradicts the cluster's settings stops it here, before it serves anything.
        let known = node.state().state.settings().cloned();
        if let Some(why) = known.and_then(|current| config.cluster.conflict(&current)) {
            node.shutdown().await;
            return Err(ControllerError::Settings(why));
        }
        let heartbeats = reconcile::Heartbeats::default();
        let ctx = ApiContext {
            node: node.clone(),
            metrics: metrics.clone(),
            heartbeats: heartbeats.clone(),
            tls: tls.clone(),
        };
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let authz = AuthzLayer::new(tls.clone(), policy);
        let (wire_tx, wire_rx) = tokio::sync::mpsc::channel(64);
        tasks.push(tokio::spawn(raft::serve_wire(
            node.clone(),
            authz.clone(),
            wire_rx,
            stop_rx.clone(),
        )));
        let grpc = tonic::transport::Server::builder()
            .layer(authz)
            .add_service(
                PkiServer::new(PkiApi::new(ctx.clone(), config.cert_ttl))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                RaftInternalServer::new(RaftService::new(node.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                JobsServer::new(JobsApi::new(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                ClusterServer::new(ClusterApi::new(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                NodesServer::new(NodesApi::new(ctx.clone(), heartbeats.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        let (conflict_tx, conflict) = watch::channel(None);
        tasks.push(tokio::spawn(pki::keep(
            node.clone(),
            tls.clone(),
            pki::tls_dir(&config.data_dir),
            config.cert_ttl,
            pki::member_sans(&ident, &config.tls_sans),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(settings::keep(
            node.clone(),
            config.cluster.clone(),
            conflict_tx,
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(raft::keep_levels(
            node.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(reconcile::follow_leader_clock(
            node.clone(),
            heartbeats.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(reconcile::run(
            node.clone(),
            heartbeats,
            reconcile::ReconcileSettings {
                node_grace: config.node_grace,
                gc_after: config.gc_after,
                keep_versions: config.keep_versions,
                ..Default::default()
            },
            stop_rx.clone(),
        )));
        let mut rx = stop_rx.clone();
        let tls_server = tls.clone();
        tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = grpc
                .serve_with_incoming_shutdown(
                    skiff_tls::net::incoming_with_raft(
                        rpc_listener,
                        tls_server,
                        true,
                        Some(wire_tx),
                    ),
                    shutdown,
                )
                .await
            {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }));
        let mut rx = stop_rx.clone();
        let app = api::router(ctx.clone());
        let tls_http = tls.clone();
        tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            api::serve(http_listener, app, tls_http, shutdown).await;
        }));

        if !node.is_initialized().await? {
            match &ident.formation {
                Formation::Bootstrap => {
                    node.bootstrap().await?;
                    tracing::info!(member = config.id, "bootstrapped a new cluster");
                }
                Formation::Join(addr) => {
                    let node2 = node.clone();
                    let addr = addr.clone();
                    tasks.push(tokio::spawn(async move {
                        // Keep trying for as long as the member runs: the cluster may be down.
                        loop {
                            match node2.join_via(&addr, Duration::from_secs(30)).await {
                                Ok(()) => {
                                    tracing::info!(peer = %addr, "joined the cluster");
                                    return;
                                }
                                Err(RaftNodeError::Membership(m)) => {
                                    tracing::error!(peer = %addr, error = %m, "join refused");
                                    return;
                                }
                                Err(e) => tracing::warn!(peer = %addr, error = %e, "join failed, retrying"),
                            }
                        }
                    }));
                }
                Formation::Wait => {
                    tracing::info!("not part of a cluster yet: waiting to be added");
                }
            }
        }
        tracing::info!(member = config.id, %rpc_addr, %http_addr, "controller started");
        Ok(Controller {
            node,
            rpc_addr,
            http_addr,
            stop,
            tasks,
            conflict,
            _data_dir: data_dir,
        })
    }

    pub fn node(&self) -> &RaftNode {
        &self.node
    }

    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Resolves with the reason if the Raft core stops on a fatal error (e.g. storage), or
    /// when this member learns that its flags contradict the cluster's settings.
    pub async fn fatal(&self) -> ControllerError {
        let mut conflict = self.conflict.clone();
        tokio::select! {
            reason = self.node.fatal() => ControllerError::Fatal(reason),
            Ok(why) = conflict.wait_for(Option::is_some) => {
                ControllerError::Settings(why.clone().unwrap_or_default())
            }
        }
    }

    /// Stops the servers and the Raft core, and releases the data dir.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.node.shutdown().await;
        // Graceful server shutdown closes open connections (whose tasks hold the node and so
        // the data dir); give it a moment, then cut whatever is left.
        for mut t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(3), &mut t)
                .await
                .is_err()
            {
                t.abort();
                let _ = t.await;
            }
        }
    }
}

/// Runs a controller until SIGINT/SIGTERM (clean exit) or a fatal Raft error (error exit, so
/// a supervisor restarts the process and it recovers from its data dir).
pub async fn run(config: Config) -> Result<(), ControllerError> {
    let controller = Controller::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ControllerError::Fatal(format!("installing SIGTERM handler: {e}")))?;
    let res = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        e = controller.fatal() => Err(e),
    };
    tracing::info!("shutting down");
    controller.shutdown().await;
    res
}
