//! Skiff's wire protocol: the protobuf messages and tonic services shared by the controller,
//! the agent and the CLI. Nothing but generated code lives here; each side converts these
//! types to its own domain types at its edge.

#![forbid(unsafe_code)]
#![allow(clippy::all, missing_docs)]

/// Version 1 of the API (`skiff.v1`).
pub mod v1 {
    tonic::include_proto!("skiff.v1");
}

/// Largest message any Skiff gRPC server or client accepts (16 MiB). Larger messages are
/// refused with `RESOURCE_EXHAUSTED` and the server keeps serving.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
