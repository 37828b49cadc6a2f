//! `skiff-agent`: the node agent daemon. It registers with the controllers, watches what its
//! node should run and reconciles the host to it ([`daemon`], [`reconcile`]) through the
//! container runtime (the `skiff-runtime` crate); it runs the overlay network ([`net`]), the
//! node's DNS ([`dns`]), health checks ([`health`]), its API ([`api`]) and `/metrics`
//! ([`metrics`]). [`config`] merges its settings; [`commands`] holds the command-line modes
//! (`container` and `image` by hand, `network down`, the re-exec'd monitor and tunnel);
//! [`simulate`] runs many simulated nodes in one process, for measuring at scale.

#![forbid(unsafe_code)]

pub mod api;
pub mod commands;
pub mod config;
pub mod contract;
pub mod daemon;
pub mod disk;
pub mod dns;
pub mod fence;
pub mod health;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod pods;
pub mod policy;
pub mod reconcile;
pub mod simulate;
pub mod tls;
pub mod usage;
pub mod volumes;
