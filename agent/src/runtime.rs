//! The container runtime: turns an image and a task spec into an isolated, resource-limited,
//! supervised process (namespaces, overlayfs, cgroups, capabilities, seccomp).

pub mod cgroup;
pub mod container;
pub mod exec;
pub mod image;
pub mod init;
pub mod logs;
pub mod monitor;
pub mod security;
pub mod store;
pub mod sys;
