//! The default seccomp profile: allow everything except the syscalls Docker's default profile
//! refuses an unprivileged container (EPERM), `clone` with a namespace flag (EPERM), `clone3`
//! (ENOSYS, so libc falls back to `clone`, whose flags a filter can see) and `personality`
//! outside Docker's five values (EPERM).
//!
//! The deny list holds the dangerous syscalls Docker's allow-list profile leaves out or grants
//! only with a capability outside the default set, plus `ptrace`, `process_vm_readv` and
//! `process_vm_writev` (Docker allows these on kernels from 4.8) and `name_to_handle_at`.
//! `clock_adjtime` stays allowed, as in Docker today: glibc's `adjtimex` and `ntp_gettime` read
//! the clock through it, and changing the clock needs `CAP_SYS_TIME` anyway.
//!
//! The body is compiled by `seccompiler`, which allows one match action per filter and kills
//! the process on a foreign audit arch (i386 or arm32 compat syscalls: those are not filtered,
//! so they are refused outright). A short hand-written prefix runs first and answers ENOSYS
//! for `clone3` and, on x86_64, for every x32-ABI syscall: their numbers carry bit 30 under the
//! same audit arch, so a deny list keyed on syscall numbers would otherwise let
//! `mount | 0x40000000` through on kernels with x32 enabled. ENOSYS is what a kernel without
//! x32 answers anyway.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, sock_filter,
};

use super::SecurityError;

/// A compiled seccomp filter. Build it with [`default_seccomp`] before forking; the container
/// init only installs it with [`install_seccomp`].
#[derive(Debug, Clone)]
pub struct SeccompProgram(BpfProgram);

impl SeccompProgram {
    /// The BPF instructions, as handed to the kernel.
    pub fn instructions(&self) -> &[sock_filter] {
        &self.0
    }
}

/// The default profile for the architecture this agent was built for (x86_64 or aarch64),
/// compiled once per process. Syscalls a given architecture does not have are simply not in
/// its list.
pub fn default_seccomp() -> Result<SeccompProgram, SecurityError> {
    static PROGRAM: std::sync::OnceLock<SeccompProgram> = std::sync::OnceLock::new();
    if let Some(p) = PROGRAM.get() {
        return Ok(p.clone());
    }
    let compiled = compile_default()?;
    Ok(PROGRAM.get_or_init(|| compiled).clone())
}

fn compile_default() -> Result<SeccompProgram, SecurityError> {
    let target = arch::TARGET.ok_or(SecurityError::SeccompUnsupportedArch(
        std::env::consts::ARCH,
    ))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = arch::DENIED
        .iter()
        .map(|&(_, nr)| (nr, Vec::new()))
        .collect();

    // personality: only the values Docker allows (query, PER_LINUX, PER_LINUX32, and those
    // with UNAME26). All conditions of one rule must hold: "none of the allowed values".
    let not_allowed = PERSONALITY_ALLOWED
        .iter()
        .map(|&p| cond(0, SeccompCmpOp::Ne, p))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_personality, vec![rule(not_allowed)?]);

    // clone: any one namespace flag is enough to refuse (the legacy syscall uses only the low
    // 32 bits of its flags, so a 32-bit comparison sees exactly what the kernel sees).
    let namespace_rules = CLONE_NAMESPACE_FLAGS
        .iter()
        .map(|&flag| rule(vec![cond(0, SeccompCmpOp::MaskedEq(flag), flag)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, namespace_rules);

    // socket(AF_VSOCK, ...): Docker refuses it.
    rules.insert(
        libc::SYS_socket,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::Eq,
            libc::AF_VSOCK as u64,
        )?])?],
    );

    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target,
    )
    .map_err(SecurityError::SeccompCompile)?;
    let body: BpfProgram = filter.try_into().map_err(SecurityError::SeccompCompile)?;

    let mut program = prefix();
    program.extend(body);
    if program.len() > BPF_MAX_LEN {
        return Err(SecurityError::SeccompCompile(
            seccompiler::BackendError::FilterTooLarge(program.len()),
        ));
    }
    Ok(SeccompProgram(program))
}

/// The default profile in the OCI runtime spec's `linux.seccomp` form, for handing the same
/// profile to an OCI runtime (runc, crun) when comparing with one: everything allowed but the
/// deny list (EPERM), `clone` with a namespace flag (EPERM), `clone3` (ENOSYS) and
/// `socket(AF_VSOCK)` (EPERM). `personality` outside Docker's values is left out: libseccomp
/// takes one comparison per argument in a rule, so "none of five values" has no OCI form here.
/// `None` on an architecture the profile has no list for.
pub fn oci_profile() -> Option<serde_json::Value> {
    arch::TARGET?;
    let errno = |names: Vec<&str>, ret: i32, args: serde_json::Value| {
        serde_json::json!({
            "names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": ret, "args": args,
        })
    };
    let denied: Vec<&str> = arch::DENIED
        .iter()
        .map(|(name, _)| name.trim_start_matches("SYS_"))
        .collect();
    let mut syscalls = vec![
        errno(denied, libc::EPERM, serde_json::json!([])),
        errno(vec!["clone3"], libc::ENOSYS, serde_json::json!([])),
        errno(
            vec!["socket"],
            libc::EPERM,
            serde_json::json!([{"index": 0, "value": libc::AF_VSOCK, "op": "SCMP_CMP_EQ"}]),
        ),
    ];
    for flag in CLONE_NAMESPACE_FLAGS {
        syscalls.push(errno(
            vec!["clone"],
            libc::EPERM,
            serde_json::json!([{
                "index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ",
            }]),
        ));
    }
    Some(serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [arch::OCI_ARCH],
        "syscalls": syscalls,
    }))
}

/// Installs `p` on the calling thread. `seccompiler` sets `no_new_privs` first (a filter
/// needs it, or `CAP_SYS_ADMIN`). Does not allocate.
pub fn install_seccomp(p: &SeccompProgram) -> Result<(), SecurityError> {
    seccompiler::apply_filter(&p.0).map_err(SecurityError::SeccompInstall)
}

/// `personality` arguments Docker allows: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32,
/// and 0xffffffff (query).
const PERSONALITY_ALLOWED: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// CLONE_NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWCGROUP (Docker's 0x7e020000).
const CLONE_NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SecurityError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(SecurityError::SeccompCompile)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SecurityError> {
    SeccompRule::new(conditions).map_err(SecurityError::SeccompCompile)
}

// The classic-BPF bits the prefix needs (linux/bpf_common.h, linux/seccomp.h).
/// BPF_LD | BPF_W | BPF_ABS (the first two are 0).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const BPF_MAX_LEN: usize = 4096;

fn insn(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Runs before the `seccompiler` body:
///
/// ```text
///   ld  arch
///   jeq AUDIT_ARCH, 0, body    ; a foreign arch is left to the body, which kills
///   ld  nr
///   jge 0x40000000, enosys, 0  ; x86_64 only: the x32 ABI
///   jeq clone3, enosys, 0
///   ja  body
/// enosys:
///   ret ERRNO(ENOSYS)
/// body:
/// ```
fn prefix() -> Vec<sock_filter> {
    let mut checks = Vec::new();
    if let Some(bit) = arch::X32_SYSCALL_BIT {
        checks.push(insn(BPF_JMP_JGE_K, bit, 0, 0));
    }
    checks.push(insn(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 0, 0));
    let n = checks.len();
    let mut p = Vec::with_capacity(n + 5);
    p.push(insn(BPF_LD_W_ABS, SECCOMP_DATA_ARCH, 0, 0));
    // Jump offsets count from the next instruction; the body starts at index n + 5.
    p.push(insn(BPF_JMP_JEQ_K, arch::AUDIT_ARCH, 0, (n + 3) as u8));
    p.push(insn(BPF_LD_W_ABS, SECCOMP_DATA_NR, 0, 0));
    for (i, mut check) in checks.into_iter().enumerate() {
        check.jt = (n - i) as u8;
        p.push(check);
    }
    p.push(insn(BPF_JMP_JA, 1, 0, 0));
    p.push(insn(
        BPF_RET_K,
        libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        0,
        0,
    ));
    p
}

/// Pairs a name (for test messages) with a syscall number of the build target.
macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), libc::$name)),*]
    };
}

#[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
mod arch {
    use seccompiler::TargetArch;

    pub(super) const TARGET: Option<TargetArch> = Some(TargetArch::x86_64);
    pub(super) const OCI_ARCH: &str = "SCMP_ARCH_X86_64";
    /// AUDIT_ARCH_X86_64: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
    pub(super) const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    pub(super) const X32_SYSCALL_BIT: Option<u32> = Some(0x4000_0000);
    /// Refused with EPERM. create_module, get_kernel_syms, query_module, stime, vm86,
    /// vm86old and umount do not exist on x86_64.
    pub(super) const DENIED: &[(&str, i64)] = syscalls![
        SYS_acct,
        SYS_add_key,
        SYS_bpf,
        SYS_clock_settime,
        SYS_delete_module,
        SYS_fanotify_init,
        SYS_finit_module,
        SYS_fsconfig,
        SYS_fsmount,
        SYS_fsopen,
        SYS_fspick,
        SYS_get_mempolicy,
        SYS_init_module,
        SYS_ioperm,
        SYS_iopl,
        SYS_kcmp,
        SYS_kexec_file_load,
        SYS_kexec_load,
        SYS_keyctl,
        SYS_lookup_dcookie,
        SYS_mbind,
        SYS_migrate_pages,
        SYS_mount,
        SYS_mount_setattr,
        SYS_move_mount,
        SYS_move_pages,
        SYS_name_to_handle_at,
        SYS_nfsservctl,
        SYS_open_by_handle_at,
        SYS_open_tree,
        SYS_perf_event_open,
        SYS_pidfd_getfd,
        SYS_pivot_root,
        SYS_process_madvise,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_ptrace,
        SYS_quotactl,
        SYS_quotactl_fd,
        SYS_reboot,
        SYS_request_key,
        SYS_set_mempolicy,
        SYS_set_mempolicy_home_node,
        SYS_setdomainname,
        SYS_sethostname,
        SYS_setns,
        SYS_settimeofday,
        SYS_swapoff,
        SYS_swapon,
        SYS_syslog,
        SYS__sysctl,
        SYS_sysfs,
        SYS_umount2,
        SYS_unshare,
        SYS_uselib,
        SYS_userfaultfd,
        SYS_ustat,
        SYS_vhangup,
    ];
}

#[cfg(target_arch = "aarch64")]
mod arch {
    use seccompiler::TargetArch;

    pub(super) const TARGET: Option<TargetArch> = Some(TargetArch::aarch64);
    pub(super) const OCI_ARCH: &str = "SCMP_ARCH_AARCH64";
    /// AUDIT_ARCH_AARCH64: EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
    pub(super) const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;
    pub(super) const X32_SYSCALL_BIT: Option<u32> = None;
    /// Refused with EPERM. create_module, get_kernel_syms, ioperm, iopl, query_module, stime,
    /// sysfs, _sysctl, uselib, ustat, vm86, vm86old and umount do not exist on aarch64.
    pub(super) const DENIED: &[(&str, i64)] = syscalls![
        SYS_acct,
        SYS_add_key,
        SYS_bpf,
        SYS_clock_settime,
        SYS_delete_module,
        SYS_fanotify_init,
        SYS_finit_module,
        SYS_fsconfig,
        SYS_fsmount,
        SYS_fsopen,
        SYS_fspick,
        SYS_get_mempolicy,
        SYS_init_module,
        SYS_kcmp,
        SYS_kexec_file_load,
        SYS_kexec_load,
        SYS_keyctl,
        SYS_lookup_dcookie,
        SYS_mbind,
        SYS_migrate_pages,
        SYS_mount,
        SYS_mount_setattr,
        SYS_move_mount,
        SYS_move_pages,
        SYS_name_to_handle_at,
        SYS_nfsservctl,
        SYS_open_by_handle_at,
        SYS_open_tree,
        SYS_perf_event_open,
        SYS_pidfd_getfd,
        SYS_pivot_root,
        SYS_process_madvise,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_ptrace,
        SYS_quotactl,
        SYS_quotactl_fd,
        SYS_reboot,
        SYS_request_key,
        SYS_set_mempolicy,
        SYS_set_mempolicy_home_node,
        SYS_setdomainname,
        SYS_sethostname,
        SYS_setns,
        SYS_settimeofday,
        SYS_swapoff,
        SYS_swapon,
        SYS_syslog,
        SYS_umount2,
        SYS_unshare,
        SYS_userfaultfd,
        SYS_vhangup,
    ];
}

#[cfg(not(any(
    all(target_arch = "x86_64", target_pointer_width = "64"),
    target_arch = "aarch64"
)))]
mod arch {
    use seccompiler::TargetArch;

    pub(super) const TARGET: Option<TargetArch> = None;
    pub(super) const OCI_ARCH: &str = "";
    pub(super) const AUDIT_ARCH: u32 = 0;
    pub(super) const X32_SYSCALL_BIT: Option<u32> = None;
    pub(super) const DENIED: &[(&str, i64)] = &[];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testing::probes::*;
    use crate::sys::testing::run_in_child;

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    /// A classic-BPF interpreter for the instructions seccompiler and [`prefix`] emit, so the
    /// verdict for every syscall can be checked without installing anything.
    fn verdict(program: &SeccompProgram, audit_arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let load = |offset: u32| -> u32 {
            match offset {
                0 => nr as u32,
                4 => audit_arch,
                16..=63 => {
                    let arg = args[(offset as usize - 16) / 8];
                    if offset % 8 == 4 {
                        (arg >> 32) as u32
                    } else {
                        arg as u32
                    }
                }
                other => panic!("load from seccomp_data offset {other}"),
            }
        };
        let p = program.instructions();
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = &p[pc];
            pc += 1;
            let jump = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
            match i.code {
                BPF_LD_W_ABS => acc = load(i.k),
                0x54 => acc &= i.k, // BPF_ALU | BPF_AND | BPF_K
                BPF_JMP_JA => pc += i.k as usize,
                BPF_JMP_JEQ_K => pc += jump(acc == i.k),
                0x25 => pc += jump(acc > i.k), // BPF_JMP | BPF_JGT | BPF_K
                BPF_JMP_JGE_K => pc += jump(acc >= i.k),
                BPF_RET_K => return i.k,
                other => panic!("unexpected BPF opcode {other:#x} at {}", pc - 1),
            }
        }
    }

    fn native(program: &SeccompProgram, nr: i64, arg0: u64) -> u32 {
        verdict(program, arch::AUDIT_ARCH, nr, [arg0, 0, 0, 0, 0, 0])
    }

    fn program() -> SeccompProgram {
        default_seccomp().expect("compile the default seccomp profile")
    }

    #[test]
    fn compiles_within_the_kernel_limit() {
        let p = program();
        assert!(
            p.instructions().len() < BPF_MAX_LEN,
            "{}",
            p.instructions().len()
        );
    }

    #[test]
    fn every_denied_syscall_gets_eperm() {
        let p = program();
        assert!(arch::DENIED.len() > 40);
        for &(name, nr) in arch::DENIED {
            assert_eq!(native(&p, nr, 0), EPERM, "{name}");
        }
    }

    #[test]
    fn ordinary_syscalls_are_allowed() {
        let p = program();
        for (name, nr) in [
            ("read", libc::SYS_read),
            ("write", libc::SYS_write),
            ("openat", libc::SYS_openat),
            ("close", libc::SYS_close),
            ("getpid", libc::SYS_getpid),
            ("execve", libc::SYS_execve),
            ("close_range", libc::SYS_close_range),
            ("exit_group", libc::SYS_exit_group),
            ("setuid", libc::SYS_setuid),
            ("capset", libc::SYS_capset),
            ("chroot", libc::SYS_chroot),
            ("clock_adjtime", libc::SYS_clock_adjtime),
            ("seccomp", libc::SYS_seccomp),
        ] {
            assert_eq!(native(&p, nr, 0), ALLOW, "{name}");
        }
    }

    /// The OCI form names every denied syscall and the argument rules, as runc and crun read
    /// them (scripts/bench-runtime.sh hands it to both).
    #[test]
    fn the_oci_form_holds_the_same_denials() {
        let p = oci_profile().expect("a profile for this architecture");
        assert_eq!(p["defaultAction"], "SCMP_ACT_ALLOW");
        let rules = p["syscalls"].as_array().expect("syscalls");
        let names: Vec<&str> = rules[0]["names"]
            .as_array()
            .expect("names")
            .iter()
            .map(|n| n.as_str().expect("name"))
            .collect();
        assert_eq!(names.len(), arch::DENIED.len());
        for n in ["mount", "bpf", "ptrace", "kexec_load", "unshare"] {
            assert!(names.contains(&n), "{n} denied");
        }
        assert!(names.iter().all(|n| !n.starts_with("SYS_")));
        assert_eq!(rules[0]["errnoRet"], libc::EPERM);
        let clone: Vec<_> = rules.iter().filter(|r| r["names"][0] == "clone").collect();
        assert_eq!(clone.len(), CLONE_NAMESPACE_FLAGS.len());
        assert_eq!(clone[0]["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        assert!(
            rules
                .iter()
                .any(|r| r["names"][0] == "clone3" && r["errnoRet"] == libc::ENOSYS)
        );
    }

    #[test]
    fn clone3_gets_enosys() {
        assert_eq!(native(&program(), libc::SYS_clone3, 0), ENOSYS);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_syscalls_get_enosys() {
        let p = program();
        for nr in [libc::SYS_mount, libc::SYS_getpid, libc::SYS_unshare] {
            assert_eq!(native(&p, nr | 0x4000_0000, 0), ENOSYS, "x32 {nr}");
        }
    }

    #[test]
    fn foreign_arch_is_killed() {
        // AUDIT_ARCH_I386 (EM_386 | __AUDIT_ARCH_LE) and AUDIT_ARCH_ARM.
        let p = program();
        for audit_arch in [3 | 0x4000_0000, 40 | 0x4000_0000] {
            assert_eq!(
                verdict(&p, audit_arch, libc::SYS_getpid, [0; 6]),
                libc::SECCOMP_RET_KILL_PROCESS
            );
        }
    }

    #[test]
    fn clone_with_a_namespace_flag_gets_eperm() {
        let p = program();
        let fork_flags =
            (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;
        let thread_flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(native(&p, libc::SYS_clone, fork_flags), ALLOW, "fork");
        assert_eq!(native(&p, libc::SYS_clone, thread_flags), ALLOW, "thread");
        for flag in CLONE_NAMESPACE_FLAGS {
            assert_eq!(native(&p, libc::SYS_clone, flag), EPERM, "{flag:#x}");
            assert_eq!(
                native(&p, libc::SYS_clone, flag | fork_flags),
                EPERM,
                "{flag:#x}"
            );
        }
        assert_eq!(native(&p, libc::SYS_clone, 0x7e02_0000 | fork_flags), EPERM);
    }

    #[test]
    fn personality_only_with_dockers_values() {
        let p = program();
        for value in PERSONALITY_ALLOWED {
            assert_eq!(
                native(&p, libc::SYS_personality, value),
                ALLOW,
                "{value:#x}"
            );
        }
        // ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC.
        for value in [0x0004_0000, 0x0040_0000, 0x0004_0008] {
            assert_eq!(
                native(&p, libc::SYS_personality, value),
                EPERM,
                "{value:#x}"
            );
        }
    }

    #[test]
    fn vsock_sockets_get_eperm() {
        let p = program();
        assert_eq!(native(&p, libc::SYS_socket, libc::AF_VSOCK as u64), EPERM);
        assert_eq!(native(&p, libc::SYS_socket, libc::AF_INET as u64), ALLOW);
        assert_eq!(native(&p, libc::SYS_socket, libc::AF_UNIX as u64), ALLOW);
    }

    /// Each probe answers whether the kernel behaved as the filter should make it behave.
    type Probe = (&'static str, fn() -> bool);

    const PROBES: [Probe; 10] = [
        ("mount refused with EPERM", mount_refused),
        ("unshare(CLONE_NEWNS) refused with EPERM", unshare_refused),
        ("keyctl refused with EPERM", keyctl_refused),
        ("clone3 fails with ENOSYS", clone3_enosys),
        (
            "clone(CLONE_NEWUSER) refused with EPERM",
            clone_newuser_refused,
        ),
        (
            "personality(READ_IMPLIES_EXEC) refused with EPERM",
            personality_refused,
        ),
        ("personality(0xffffffff) allowed", personality_query_allowed),
        ("getpid, open and write allowed", getpid_open_write_allowed),
        ("fork allowed", fork_allowed),
        ("ptrace(PTRACE_PEEKUSER) refused with EPERM", ptrace_refused),
    ];

    /// Runs every probe in a child process (the test `test`), under `program` if given.
    fn probe(test: &str, program: Option<&SeccompProgram>) -> Vec<(&'static str, bool)> {
        let (code, answers) = run_in_child(test, |out| {
            use std::io::Write as _;
            if let Some(p) = program
                && install_seccomp(p).is_err()
            {
                return 2;
            }
            for (_, probe) in PROBES {
                let answer = if probe() { b"1" } else { b"0" };
                if out.write_all(answer).is_err() {
                    return 3;
                }
            }
            0
        });
        assert_eq!(code, 0, "probe child failed (2: install_seccomp, 3: write)");
        assert_eq!(answers.len(), PROBES.len(), "{answers}");
        PROBES
            .iter()
            .zip(answers.bytes())
            .map(|((name, _), a)| (*name, a == b'1'))
            .collect()
    }

    /// The filter as the kernel applies it, in a forked child.
    #[test]
    fn installed_filter_denies_and_allows() {
        let p = program();
        let test = concat!(module_path!(), "::installed_filter_denies_and_allows");
        let failed: Vec<_> = probe(test, Some(&p))
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(name, _)| name)
            .collect();
        assert!(failed.is_empty(), "under the filter, not true: {failed:?}");
    }

    /// Control for the test above: without the filter the same probes tell the difference,
    /// so they are not passing by accident.
    #[test]
    fn probes_see_the_difference_without_the_filter() {
        let test = concat!(
            module_path!(),
            "::probes_see_the_difference_without_the_filter"
        );
        let answers = probe(test, None);
        let answer = |name: &str| {
            answers
                .iter()
                .find(|(n, _)| n.starts_with(name))
                .map(|a| a.1)
        };
        for name in ["ptrace", "keyctl", "clone3", "personality(READ"] {
            assert_eq!(answer(name), Some(false), "{name} without the filter");
        }
        if nix::unistd::geteuid().is_root() {
            for name in ["mount", "unshare"] {
                assert_eq!(answer(name), Some(false), "{name} without the filter");
            }
        }
        for name in ["personality(0x", "getpid", "fork"] {
            assert_eq!(answer(name), Some(true), "{name} without the filter");
        }
    }
}
