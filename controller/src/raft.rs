//! Consensus: openraft's type configuration, the durable log (a write-ahead log of our own), the state-machine
//! adapter with snapshots, and the tonic network between members.
//!
//! **Architecture Invariant:** no openraft type leaves this module. The rest of the
//! controller uses [`RaftNode`], [`Member`], [`Status`] and friends, so that an openraft
//! alpha bump changes this module and nothing else.

mod log_store;
mod network;
mod node;
mod server;
mod state_machine;
mod types;
mod wal;
mod wire;

pub use network::PeerError;
pub use node::{
    AppliedWatch, MemberInfo, RaftNode, RaftNodeError, RaftSettings, Role, Status, keep_levels,
};
pub use server::RaftService;
pub(crate) use server::node_error_status;
pub use types::{Member, MemberId};
pub(crate) use wire::serve as serve_wire;

#[cfg(test)]
mod tests;
