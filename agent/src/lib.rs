//! `skiff-agent`: the node agent. For now: the container runtime ([`runtime`]) and the
//! `skiff-agent container ...` commands that drive it by hand.

#![forbid(unsafe_code)]

pub mod api;
pub mod daemon;
pub mod dns;
pub mod health;
pub mod metrics;
pub mod net;
