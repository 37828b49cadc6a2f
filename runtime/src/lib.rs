//! Skiff's container runtime: turns an image and a task into an isolated, resource-limited,
//! supervised process (namespaces, overlayfs, cgroups, capabilities, seccomp), and the image
//! store it runs them from (registry pulls, OCI layouts and archives, a content-addressed layer
//! store).
//!
//! Like youki's libcontainer, it is a library: the agent daemon drives it through
//! [`container::Runtime`], and `skiff-agent container ...` exposes it by hand. The per-container
//! monitor is the embedding binary re-exec'd (see [`monitor`]).
//!
//! **Architecture Invariant:** every `unsafe` of the workspace lives in [`sys`], each block with
//! its `// SAFETY:` reasoning; the rest of this crate denies `unsafe_code`, every other crate
//! forbids it.

#![deny(unsafe_code)]

pub mod cgroup;
pub mod container;
pub mod devices;
pub mod durable;
pub mod exec;
pub mod fence;
pub mod image;
pub mod init;
pub mod logs;
pub mod monitor;
pub mod pod;
pub mod reaper;
pub mod security;
pub mod store;
#[allow(unsafe_code)]
pub mod sys;
pub mod workload;
