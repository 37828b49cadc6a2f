//! Which device nodes a container may create and open: Docker's default allow-list (null,
//! zero, full, random, urandom, tty, ptmx and the pts it hands out) plus what its task grants,
//! everything else denied. Enforced by the kernel through the container's cgroup: the `devices`
//! controller's list on cgroup v1, a BPF_PROG_TYPE_CGROUP_DEVICE program on cgroup v2, both on
//! a hybrid host (the kernel consults both). The program is generated here, pure and
//! unit-tested with an interpreter; loading and attaching it is in [`crate::sys`].

use serde::{Deserialize, Serialize};

/// A block or a character device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Char,
    Block,
}

/// mknod, read, write.
pub const ACC_MKNOD: u32 = 1;
pub const ACC_READ: u32 = 2;
pub const ACC_WRITE: u32 = 4;
pub const ACC_ALL: u32 = 7;

/// One allow rule: a kind, a major and minor (`None`: any), the access it allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRule {
    pub kind: DeviceKind,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// [`ACC_MKNOD`] | [`ACC_READ`] | [`ACC_WRITE`].
    pub access: u32,
}

/// A device node the container gets in its `/dev` (a granted host device).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Where in the container, e.g. `/dev/fuse`.
    pub path: String,
    pub kind: DeviceKind,
    pub major: u32,
    pub minor: u32,
    pub access: u32,
}

impl DeviceRule {
    pub const fn char(major: u32, minor: Option<u32>) -> DeviceRule {
        DeviceRule {
            kind: DeviceKind::Char,
            major: Some(major),
            minor,
            access: ACC_ALL,
        }
    }

    /// The line the v1 `devices.allow` file takes: `c 1:3 rwm`, `c 136:* rw`.
    pub fn v1_line(&self) -> String {
        let id = |v: Option<u32>| v.map_or("*".to_owned(), |v| v.to_string());
        format!(
            "{} {}:{} {}",
            match self.kind {
                DeviceKind::Char => 'c',
                DeviceKind::Block => 'b',
            },
            id(self.major),
            id(self.minor),
            access_letters(self.access)
        )
    }
}

impl From<&DeviceNode> for DeviceRule {
    fn from(n: &DeviceNode) -> DeviceRule {
        DeviceRule {
            kind: n.kind,
            major: Some(n.major),
            minor: Some(n.minor),
            access: n.access,
        }
    }
}

/// `rwm`-style letters of an access mask.
pub fn access_letters(access: u32) -> String {
    let mut s = String::new();
    if access & ACC_READ != 0 {
        s.push('r');
    }
    if access & ACC_WRITE != 0 {
        s.push('w');
    }
    if access & ACC_MKNOD != 0 {
        s.push('m');
    }
    s
}

/// Parses `rwm`-style letters; `None` for anything else or nothing.
pub fn parse_access(letters: &str) -> Option<u32> {
    let mut a = 0;
    for c in letters.chars() {
        let bit = match c {
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            'm' => ACC_MKNOD,
            _ => return None,
        };
        if a & bit != 0 {
            return None;
        }
        a |= bit;
    }
    (a != 0).then_some(a)
}

/// Docker's default: null, zero, full, random, urandom, tty, ptmx and the pseudo-terminals
/// devpts hands out. Nothing else, no mknod of anything else.
pub fn default_rules() -> Vec<DeviceRule> {
    vec![
        DeviceRule::char(1, Some(3)), // null
        DeviceRule::char(1, Some(5)), // zero
        DeviceRule::char(1, Some(7)), // full
        DeviceRule::char(1, Some(8)), // random
        DeviceRule::char(1, Some(9)), // urandom
        DeviceRule::char(5, Some(0)), // tty
        DeviceRule::char(5, Some(2)), // ptmx
        DeviceRule::char(136, None),  // /dev/pts/*
    ]
}

/// One eBPF instruction, laid out as the kernel's `struct bpf_insn` (little-endian register
/// nibbles: `src << 4 | dst`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

const LDX_W: u8 = 0x61;
const AND32_K: u8 = 0x54;
const RSH32_K: u8 = 0x74;
const MOV32_K: u8 = 0xb4;
const MOV32_X: u8 = 0xbc;
const JNE_K: u8 = 0x55;
const JNE_X: u8 = 0x5d;
const EXIT: u8 = 0x95;

/// The BPF_PROG_TYPE_CGROUP_DEVICE program allowing `rules` and denying everything else.
/// The context is `{ access_type: (access << 16) | type, major, minor }` (u32 each); the
/// program returns 1 to allow, 0 to deny. A rule matches when the type, major and minor
/// match and every requested access bit is in the rule's mask.
pub fn device_program(rules: &[DeviceRule]) -> Vec<BpfInsn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),        // r2 = access_type
        insn(AND32_K, 2, 0, 0, 0xffff), // r2 = type
        insn(LDX_W, 3, 1, 0, 0),        // r3 = access_type
        insn(RSH32_K, 3, 0, 0, 16),     // r3 = requested access
        insn(LDX_W, 4, 1, 4, 0),        // r4 = major
        insn(LDX_W, 5, 1, 8, 0),        // r5 = minor
    ];
    for r in rules {
        let ty: i32 = match r.kind {
            DeviceKind::Block => 1,
            DeviceKind::Char => 2,
        };
        let checks_access = r.access & ACC_ALL != ACC_ALL;
        let n: i16 = 1
            + if checks_access { 3 } else { 0 }
            + i16::from(r.major.is_some())
            + i16::from(r.minor.is_some())
            + 2;
        let mut k: i16 = 0;
        p.push(insn(JNE_K, 2, 0, n - 1 - k, ty));
        k += 1;
        if checks_access {
            p.push(insn(MOV32_X, 1, 3, 0, 0));
            p.push(insn(AND32_K, 1, 0, 0, (r.access & ACC_ALL) as i32));
            k += 2;
            p.push(insn(JNE_X, 1, 3, n - 1 - k, 0));
            k += 1;
        }
        if let Some(m) = r.major {
            p.push(insn(JNE_K, 4, 0, n - 1 - k, m as i32));
            k += 1;
        }
        if let Some(m) = r.minor {
            p.push(insn(JNE_K, 5, 0, n - 1 - k, m as i32));
        }
        p.push(insn(MOV32_K, 0, 0, 0, 1));
        p.push(insn(EXIT, 0, 0, 0, 0));
    }
    p.push(insn(MOV32_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a device program the way the kernel would, for one request.
    fn run(p: &[BpfInsn], kind: DeviceKind, major: u32, minor: u32, access: u32) -> u32 {
        let ty = match kind {
            DeviceKind::Block => 1u32,
            DeviceKind::Char => 2,
        };
        let ctx = [(access << 16) | ty, major, minor];
        let mut r = [0u32; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = (usize::from(i.regs & 0x0f), usize::from(i.regs >> 4));
            pc += 1;
            match i.code {
                LDX_W => {
                    assert_eq!(src, 1, "loads come from the context");
                    r[dst] = ctx[i.off as usize / 4];
                }
                AND32_K => r[dst] &= i.imm as u32,
                RSH32_K => r[dst] >>= i.imm as u32,
                MOV32_K => r[dst] = i.imm as u32,
                MOV32_X => r[dst] = r[src],
                JNE_K => {
                    if r[dst] != i.imm as u32 {
                        pc = (pc as i64 + i64::from(i.off)) as usize;
                    }
                }
                JNE_X => {
                    if r[dst] != r[src] {
                        pc = (pc as i64 + i64::from(i.off)) as usize;
                    }
                }
                EXIT => return r[0],
                other => panic!("opcode {other:#x}"),
            }
            assert!(pc < p.len(), "jumped out of the program");
        }
    }

    #[test]
    fn the_program_is_the_reviewed_listing() {
        let p = device_program(&[
            DeviceRule::char(1, Some(3)),
            DeviceRule::char(5, None),
            DeviceRule::char(136, None),
        ]);
        let offs: Vec<(u8, i16, i32)> = p.iter().map(|i| (i.code, i.off, i.imm)).collect();
        assert_eq!(p.len(), 21);
        assert_eq!(offs[6], (JNE_K, 4, 2));
        assert_eq!(offs[7], (JNE_K, 3, 1));
        assert_eq!(offs[8], (JNE_K, 2, 3));
        assert_eq!(offs[11], (JNE_K, 3, 2));
        assert_eq!(offs[16], (JNE_K, 2, 136));
        assert_eq!(offs[19], (MOV32_K, 0, 0));
    }

    #[test]
    fn defaults_allow_the_usual_devices_and_nothing_else() {
        let p = device_program(&default_rules());
        let all = ACC_READ | ACC_WRITE;
        for (maj, min) in [
            (1, 3),
            (1, 5),
            (1, 7),
            (1, 8),
            (1, 9),
            (5, 0),
            (5, 2),
            (136, 0),
            (136, 99),
        ] {
            assert_eq!(run(&p, DeviceKind::Char, maj, min, all), 1, "c {maj}:{min}");
        }
        // A loop device, a disk, kmsg, mem, fuse, tun: denied, also mknod.
        for (kind, maj, min) in [
            (DeviceKind::Block, 7, 0),
            (DeviceKind::Block, 8, 0),
            (DeviceKind::Char, 1, 11),
            (DeviceKind::Char, 1, 1),
            (DeviceKind::Char, 10, 229),
            (DeviceKind::Char, 10, 200),
            (DeviceKind::Block, 1, 3),
        ] {
            for access in [ACC_READ, ACC_WRITE, ACC_MKNOD, all] {
                assert_eq!(
                    run(&p, kind, maj, min, access),
                    0,
                    "{kind:?} {maj}:{min} {access}"
                );
            }
        }
    }

    #[test]
    fn a_rule_with_less_than_rwm_allows_only_its_bits() {
        let p = device_program(&[DeviceRule {
            kind: DeviceKind::Char,
            major: Some(10),
            minor: Some(229),
            access: ACC_READ | ACC_WRITE,
        }]);
        assert_eq!(run(&p, DeviceKind::Char, 10, 229, ACC_READ), 1);
        assert_eq!(run(&p, DeviceKind::Char, 10, 229, ACC_READ | ACC_WRITE), 1);
        assert_eq!(run(&p, DeviceKind::Char, 10, 229, ACC_MKNOD), 0);
        assert_eq!(run(&p, DeviceKind::Char, 10, 229, ACC_READ | ACC_MKNOD), 0);
        assert_eq!(run(&p, DeviceKind::Char, 10, 228, ACC_READ), 0);
    }

    #[test]
    fn v1_lines_and_access_letters() {
        assert_eq!(DeviceRule::char(1, Some(3)).v1_line(), "c 1:3 rwm");
        assert_eq!(DeviceRule::char(136, None).v1_line(), "c 136:* rwm");
        let b = DeviceRule {
            kind: DeviceKind::Block,
            major: None,
            minor: None,
            access: ACC_MKNOD,
        };
        assert_eq!(b.v1_line(), "b *:* m");
        assert_eq!(parse_access("rw"), Some(ACC_READ | ACC_WRITE));
        assert_eq!(parse_access("mrw"), Some(ACC_ALL));
        for bad in ["", "x", "rr", "rwx"] {
            assert_eq!(parse_access(bad), None, "{bad}");
        }
    }
}
