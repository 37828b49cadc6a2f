//! Setting extended attributes; the syscalls themselves live in the agent's syscall layer.

pub(crate) use crate::sys::{fsetxattr as fset, lsetxattr as lset};
