//! Types shared by the Skiff controller, agent and CLI.
//!
//! Today this crate holds the job spec: the contract users write (TOML, JSON accepted), its
//! typed model, parsing with errors that name the offending field and line, validation, a
//! canonical JSON form and a field-level diff between two versions of a spec.
//!
//! ```
//! use skiff_common::{SpecFormat, parse_job_spec};
//!
//! let spec = parse_job_spec("name = \"web\"\nimage = \"demo/web:1.0\"\n", SpecFormat::Auto).unwrap();
//! assert_eq!(spec.key(), "default/web");
//! assert_eq!(spec.replicas, 1);
//!
//! let err = parse_job_spec("name = \"web\"\nimage = \"x\"\nreplicas = -1\n", SpecFormat::Toml)
//!     .unwrap_err();
//! assert_eq!(err.to_string(), "replicas: expected a non-negative integer, found -1 (line 3)");
//! ```
//!
//! **Architecture Invariant:** this crate does no I/O and knows nothing of gRPC or protobuf; the
//! `proto` crate converts at the edge. Everything here is deterministic.

#![forbid(unsafe_code)]
// Tests may unwrap; the library itself may not (the workspace warns on `unwrap_used`).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod capability;
pub mod prometheus;
pub mod spec;
pub mod time;

pub use spec::{
    Analysis, ByteSize, Check, CheckKind, Constraint, ConstraintOp, Disconnect, FieldChange,
    JobSpec, Mesh, MeshMode, NOT_SUPPORTED_YET, Placement, Port, Protocol, ReplicaCount, Resources,
    RestartPolicy, Service, SpecError, SpecFormat, UpdateStrategy, diff_specs, parse_job_spec,
    parse_job_spec_unchecked, validate_name,
};
