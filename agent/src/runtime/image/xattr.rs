//! Setting extended attributes, which nix does not wrap. The only `unsafe` of the image
//! module; it belongs in the agent's syscall layer once there is one.

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;

/// `fsetxattr(fd, name, value, 0)`.
pub(crate) fn fset(fd: impl AsFd, name: &CStr, value: &[u8]) -> nix::Result<()> {
    // SAFETY: `name` is a valid NUL-terminated string and `value` a valid slice of
    // `value.len()` bytes, both alive for the call; the kernel only reads them.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_fd().as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(rc).map(drop)
}

/// `lsetxattr(path, name, value, 0)`: on the link itself when `path` is a symlink.
pub(crate) fn lset(path: &CStr, name: &CStr, value: &[u8]) -> nix::Result<()> {
    // SAFETY: `path` and `name` are valid NUL-terminated strings and `value` a valid slice of
    // `value.len()` bytes, all alive for the call; the kernel only reads them.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(rc).map(drop)
}
