//! What a container may do once it runs: capabilities cut to Docker's default set,
//! `no_new_privs`, `RLIMIT_NOFILE`, a default seccomp profile ([`seccomp`]), runc's masked and
//! read-only paths, and the `user[:group]` of the image or spec resolved against the
//! container's own `/etc/passwd` and `/etc/group` ([`user`]).
//!
//! Everything but [`default_seccomp`] and [`resolve_user`]'s inputs runs in the single-threaded
//! container init just before it execs the workload, after `pivot_root`. The seccomp program is
//! compiled up front by the parent; the init only installs it.
//!
//! **Invariant:** no `unsafe` here; the raw calls go through `caps`, `nix` and
//! `seccompiler`.

mod seccomp;
mod user;

pub use seccomp::{SeccompProgram, default_seccomp, install_seccomp, oci_profile};
pub use user::resolve_user;

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::resource::{Resource, setrlimit};

/// Paths hidden from the container (runc's defaults): files get `/dev/null` bound over them,
/// directories an empty read-only tmpfs.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths the container sees read-only (runc's defaults).
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Errors of the security set-up; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("clear the ambient capabilities: {0}")]
    ClearAmbient(#[source] caps::errors::CapsError),
    #[error("drop {cap} from the bounding set: {source}")]
    DropBounding {
        cap: Capability,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error(
        "the bounding set still holds capabilities {leftover:#x} after the drop \
         (a capability newer than this build knows?)"
    )]
    BoundingLeftover { leftover: u64 },
    #[error("set the {set} capabilities: {source}")]
    SetCapabilities {
        set: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("set no_new_privs: {0}")]
    NoNewPrivs(#[source] nix::Error),
    #[error("set RLIMIT_NOFILE to {limit}: {source}")]
    Nofile {
        limit: u64,
        #[source]
        source: nix::Error,
    },
    #[error("seccomp is not supported on {0}")]
    SeccompUnsupportedArch(&'static str),
    #[error("compile the seccomp filter: {0}")]
    SeccompCompile(#[source] seccompiler::BackendError),
    #[error("install the seccomp filter: {0}")]
    SeccompInstall(#[source] seccompiler::Error),
    #[error("invalid user {spec:?}: expected user[:group]")]
    BadUserSpec { spec: String },
    #[error("unable to find user {user:?}: no matching entry in the container's /etc/passwd")]
    UnknownUser { user: String },
    #[error("unable to find group {group:?}: no matching entry in the container's /etc/group")]
    UnknownGroup { group: String },
    #[error("id {id} in user {spec:?} is out of range (0 to 2147483647)")]
    IdOutOfRange { spec: String, id: String },
}

/// Docker's default capability set without MKNOD: CHOWN, DAC_OVERRIDE, FSETID, FOWNER,
/// NET_RAW, SETGID, SETUID, SETFCAP, SETPCAP, NET_BIND_SERVICE, SYS_CHROOT, KILL, AUDIT_WRITE.
/// A workload makes no device nodes: the ones it may use are in its `/dev` already (and the
/// device policy of its cgroup would refuse any other anyway).
pub fn default_capabilities() -> Vec<Capability> {
    use Capability::*;
    vec![
        CAP_CHOWN,
        CAP_DAC_OVERRIDE,
        CAP_FSETID,
        CAP_FOWNER,
        CAP_NET_RAW,
        CAP_SETGID,
        CAP_SETUID,
        CAP_SETFCAP,
        CAP_SETPCAP,
        CAP_NET_BIND_SERVICE,
        CAP_SYS_CHROOT,
        CAP_KILL,
        CAP_AUDIT_WRITE,
    ]
}

/// The bitmask of a set, as `/proc/self/status` shows it in `CapEff` (Docker's default set is
/// `0xa80425fb`, ours without MKNOD `0xa00425fb`).
pub fn cap_mask(caps: &[Capability]) -> u64 {
    caps.iter().fold(0, |mask, cap| mask | cap.bitmask())
}

/// Drops every capability not in `keep` from the bounding set, sets the effective and
/// permitted sets to `keep`, and clears the inheritable and ambient sets. Call while still uid 0
/// (the bounding drop needs `CAP_SETPCAP`); a later `setuid` to a non-zero uid empties
/// permitted and effective, as in Docker.
///
/// The inheritable set is left empty rather than set to `keep`, as Docker and runc do since
/// CVE-2022-24769: a non-empty one would hand a non-root workload the file-inheritable
/// capabilities of any program it execs.
///
/// Afterwards the bounding set is read back from `/proc/thread-self/status` (when /proc is
/// mounted; capabilities are per thread)
/// and any capability left over, such as one the kernel knows and this build does not, is an
/// error rather than a silent leak.
pub fn drop_capabilities(keep: &[Capability]) -> Result<(), SecurityError> {
    let keep_set: CapsHashSet = keep.iter().copied().collect();
    caps::clear(None, CapSet::Ambient).map_err(SecurityError::ClearAmbient)?;
    for cap in caps::all() {
        if keep_set.contains(&cap) {
            continue;
        }
        // An error here means the running kernel does not know `cap`: nothing to drop.
        if let Ok(true) = caps::has_cap(None, CapSet::Bounding, cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|source| SecurityError::DropBounding { cap, source })?;
        }
    }
    if let Some(bounding) = read_status_mask("CapBnd:") {
        let leftover = bounding & !cap_mask(keep);
        if leftover != 0 {
            return Err(SecurityError::BoundingLeftover { leftover });
        }
    }
    // Effective first: the kernel requires effective ⊆ permitted after every capset.
    let sets = [
        (CapSet::Effective, "effective", &keep_set),
        (CapSet::Permitted, "permitted", &keep_set),
        (CapSet::Inheritable, "inheritable", &CapsHashSet::new()),
    ];
    for (set, name, value) in sets {
        caps::set(None, set, value)
            .map_err(|source| SecurityError::SetCapabilities { set: name, source })?;
    }
    Ok(())
}

/// Reads a hexadecimal capability mask (`CapBnd:` and the like) of the calling thread from
/// `/proc/thread-self/status`; `None` when /proc is not there or the line is missing.
fn read_status_mask(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    status_mask(&status, field)
}

fn status_mask(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    u64::from_str_radix(line[field.len()..].trim(), 16).ok()
}

/// Sets `no_new_privs`: no exec can grant privileges again (setuid bits, file capabilities).
pub fn set_no_new_privs() -> Result<(), SecurityError> {
    nix::sys::prctl::set_no_new_privs().map_err(SecurityError::NoNewPrivs)
}

/// Sets both the soft and the hard `RLIMIT_NOFILE` to `limit`. Raising the hard limit needs
/// `CAP_SYS_RESOURCE`, and nothing can exceed `/proc/sys/fs/nr_open`.
pub fn set_nofile(limit: u64) -> Result<(), SecurityError> {
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit)
        .map_err(|source| SecurityError::Nofile { limit, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testing::run_in_child;
    use std::ffi::CString;

    pub(super) fn is_root() -> bool {
        skiff_testkit::require(&[skiff_testkit::Need::Root])
    }

    /// Copies this thread's /proc status into `out`; false on any failure.
    fn copy_status_to(out: &mut std::fs::File) -> bool {
        std::fs::File::open("/proc/thread-self/status")
            .and_then(|mut f| std::io::copy(&mut f, out))
            .is_ok()
    }

    fn mask_of(status: &str, field: &str) -> u64 {
        status_mask(status, field).unwrap_or_else(|| panic!("no {field} in\n{status}"))
    }

    #[test]
    fn default_capabilities_are_dockers() {
        assert_eq!(default_capabilities().len(), 13);
        assert_eq!(cap_mask(&default_capabilities()), 0xa004_25fb);
        assert!(!default_capabilities().contains(&Capability::CAP_MKNOD));
        assert_eq!(cap_mask(&[]), 0);
    }

    #[test]
    fn status_mask_parses_proc_lines() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapBnd:\t00000000a80425fb\n";
        assert_eq!(status_mask(status, "CapBnd:"), Some(0xa804_25fb));
        assert_eq!(status_mask(status, "CapInh:"), Some(0));
        assert_eq!(status_mask(status, "CapAmb:"), None);
    }

    #[test]
    fn runc_default_paths() {
        assert!(MASKED_PATHS.contains(&"/proc/kcore"));
        assert!(READONLY_PATHS.contains(&"/proc/sys"));
        assert!(
            MASKED_PATHS
                .iter()
                .chain(READONLY_PATHS)
                .all(|p| p.starts_with("/proc/") || p.starts_with("/sys/"))
        );
    }

    #[test]
    fn drop_capabilities_leaves_the_default_set() {
        if !is_root() {
            return;
        }
        let keep = default_capabilities();
        let test = concat!(module_path!(), "::drop_capabilities_leaves_the_default_set");
        let (code, status) = run_in_child(test, |out| {
            if drop_capabilities(&keep).is_err() {
                return 2;
            }
            if !copy_status_to(out) {
                return 3;
            }
            0
        });
        assert_eq!(
            code, 0,
            "child failed (2: drop_capabilities, 3: read status)"
        );
        let mask = cap_mask(&keep);
        assert_eq!(mask_of(&status, "CapEff:"), mask, "CapEff");
        assert_eq!(mask_of(&status, "CapPrm:"), mask, "CapPrm");
        assert_eq!(mask_of(&status, "CapBnd:"), mask, "CapBnd");
        assert_eq!(mask_of(&status, "CapInh:"), 0, "CapInh");
        assert_eq!(mask_of(&status, "CapAmb:"), 0, "CapAmb");
    }

    #[test]
    fn drop_capabilities_to_nothing() {
        if !is_root() {
            return;
        }
        let test = concat!(module_path!(), "::drop_capabilities_to_nothing");
        let (code, status) = run_in_child(test, |out| {
            if drop_capabilities(&[]).is_err() {
                return 2;
            }
            if !copy_status_to(out) {
                return 3;
            }
            0
        });
        assert_eq!(
            code, 0,
            "child failed (2: drop_capabilities, 3: read status)"
        );
        for field in ["CapEff:", "CapPrm:", "CapBnd:", "CapInh:", "CapAmb:"] {
            assert_eq!(mask_of(&status, field), 0, "{field}");
        }
    }

    #[test]
    fn set_nofile_sets_soft_and_hard() {
        let test = concat!(module_path!(), "::set_nofile_sets_soft_and_hard");
        let (code, _) = run_in_child(test, |_| {
            if set_nofile(512).is_err() {
                return 2;
            }
            match nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE) {
                Ok((512, 512)) => 0,
                _ => 3,
            }
        });
        assert_eq!(code, 0, "child failed (2: set_nofile, 3: getrlimit)");
    }

    #[test]
    fn set_nofile_names_the_limit_on_failure() {
        // Above fs.nr_open: refused even for root.
        let test = concat!(module_path!(), "::set_nofile_names_the_limit_on_failure");
        let (code, _) = run_in_child(test, |_| match set_nofile(u64::MAX - 1) {
            Err(e @ SecurityError::Nofile { .. }) => {
                if e.to_string()
                    .starts_with("set RLIMIT_NOFILE to 18446744073709551614: ")
                {
                    0
                } else {
                    3
                }
            }
            _ => 2,
        });
        assert_eq!(code, 0);
    }

    /// The whole sequence as the container init runs it, checked by the exec'd workload.
    #[test]
    fn security_settings_survive_exec() {
        if !is_root() {
            return;
        }
        if !skiff_testkit::require(&[skiff_testkit::tool("/bin/cat", "coreutils")]) {
            return;
        }
        let keep = default_capabilities();
        let program = default_seccomp().expect("compile the default seccomp profile");
        let cat = CString::new("/bin/cat").expect("cstring");
        let argv = ["cat", "/proc/self/status", "/proc/self/limits"]
            .map(|a| CString::new(a).expect("cstring"));
        let test = concat!(module_path!(), "::security_settings_survive_exec");
        let (code, out) = run_in_child(test, |out| {
            if set_nofile(1024).is_err() {
                return 2;
            }
            if drop_capabilities(&keep).is_err() {
                return 3;
            }
            if set_no_new_privs().is_err() {
                return 4;
            }
            if install_seccomp(&program).is_err() {
                return 5;
            }
            // The copy on fd 1 is not close-on-exec.
            if nix::unistd::dup2_stdout(&*out).is_err() {
                return 6;
            }
            let _ = nix::unistd::execv(&cat, &argv);
            7
        });
        assert_eq!(
            code, 0,
            "child failed (2: nofile, 3: caps, 4: no_new_privs, 5: seccomp, 6: dup2, 7: exec)"
        );
        let mask = cap_mask(&keep);
        // uid 0 execs with its bounding set as permitted and effective.
        assert_eq!(mask_of(&out, "CapEff:"), mask, "CapEff after exec");
        assert_eq!(mask_of(&out, "CapBnd:"), mask, "CapBnd after exec");
        assert_eq!(mask_of(&out, "CapInh:"), 0, "CapInh after exec");
        assert_eq!(mask_of(&out, "CapAmb:"), 0, "CapAmb after exec");
        assert!(out.contains("NoNewPrivs:\t1"), "no_new_privs lost:\n{out}");
        assert!(out.contains("Seccomp:\t2"), "seccomp filter lost:\n{out}");
        let limits = out
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("Max open files in /proc/self/limits");
        let fields: Vec<&str> = limits.split_whitespace().collect();
        assert_eq!(fields[3..5], ["1024", "1024"], "{limits}");
    }
}
