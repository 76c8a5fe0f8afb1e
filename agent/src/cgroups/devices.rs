//! Device control (`isolation.devices = "minimal"`): an instance's cgroup lets it open (and
//! create) only the character devices of a minimal `/dev` — `null`, `zero`, `full`,
//! `random`, `urandom`, `tty`, `ptmx` and its pseudo-terminals — and nothing else, whatever
//! device nodes it finds or makes.
//!
//! - v1: the `devices` controller: `a` written to `devices.deny`, then one line per device to
//!   `devices.allow`, and `devices.list` read back.
//! - v2: a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the cgroup (with
//!   `BPF_F_ALLOW_MULTI`, so programs of the cgroups above still apply), built here as runc,
//!   crun and youki build theirs: load the request's type, access, major and minor, compare
//!   with each allowed device, return 1 on a match and 0 at the end. One program is loaded
//!   per agent and attached to every instance cgroup; the attachment is read back with
//!   `BPF_PROG_QUERY`.
//!
//! Imports from the crate: nothing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// An allowed character device: major, and minor (`None`: any).
pub const ALLOWED: [(u32, Option<u32>); 8] = [
    (1, Some(3)), // null
    (1, Some(5)), // zero
    (1, Some(7)), // full
    (1, Some(8)), // random
    (1, Some(9)), // urandom
    (5, Some(0)), // tty
    (5, Some(2)), // ptmx
    (136, None),  // pts/*
];

/// The v1 `devices.allow` lines, in order.
pub fn v1_rules() -> Vec<String> {
    ALLOWED
        .iter()
        .map(|(major, minor)| match minor {
            Some(minor) => format!("c {major}:{minor} rwm"),
            None => format!("c {major}:* rwm"),
        })
        .collect()
}

/// Whether `devices.list` shows exactly the allowed devices (in any order).
pub fn v1_list_matches(list: &str) -> bool {
    let mut got: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    got.sort_unstable();
    let rules = v1_rules();
    let mut want: Vec<&str> = rules.iter().map(String::as_str).collect();
    want.sort_unstable();
    got == want
}

/// One eBPF instruction, as the kernel reads it (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    fn bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = (self.src << 4) | (self.dst & 0x0f);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

const LDX_MEM_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const ALU32_AND_K: u8 = 0x54;
const ALU32_RSH_K: u8 = 0x74;
const ALU32_MOV_K: u8 = 0xb4;
const JMP_JNE_K: u8 = 0x55;
const JMP_EXIT: u8 = 0x95;

/// `BPF_DEVCG_DEV_CHAR`.
const DEV_CHAR: i32 = 2;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

/// The device program: r2 = type, r3 = access, r4 = major, r5 = minor, from
/// `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }` (access_type is
/// `access << 16 | type`); then, per allowed device, a block that returns 1 when type, major
/// (and minor) match; 0 at the end.
pub fn program() -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU32_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 0, 0),
        insn(ALU32_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for (major, minor) in ALLOWED {
        // Immediates are 32-bit two's complement: the numbers' bits, not their values.
        let mut checks = vec![(2u8, DEV_CHAR), (4, major.cast_signed())];
        if let Some(minor) = minor {
            checks.push((5, minor.cast_signed()));
        }
        // The block: the checks, `w0 = 1`, `exit`. A failed check skips what is left of it.
        let len = checks.len() + 2;
        for (k, (reg, value)) in checks.iter().enumerate() {
            // A block has at most four instructions: the jump offset always fits.
            let skip = i16::try_from(len - k - 1).unwrap_or(i16::MAX);
            p.push(insn(JMP_JNE_K, *reg, 0, skip, *value));
        }
        p.push(insn(ALU32_MOV_K, 0, 0, 0, 1));
        p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    }
    p.push(insn(ALU32_MOV_K, 0, 0, 0, 0));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    p
}

/// What the program answers for a device request (an interpreter of the instructions
/// [`program`] uses, for tests): `access` is `BPF_DEVCG_ACC_*`, `kind` `BPF_DEVCG_DEV_*`.
// The casts are eBPF's own semantics: ALU32 operates on the low 32 bits of a register, and a
// 32-bit immediate is sign-extended when compared with a 64-bit register.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn evaluate(program: &[Insn], kind: u32, access: u32, major: u32, minor: u32) -> Option<u64> {
    let ctx = [(access << 16) | kind, major, minor];
    let mut r = [0u64; 11];
    let mut pc = 0usize;
    for _ in 0..4096 {
        let i = *program.get(pc)?;
        pc += 1;
        let (d, s) = (usize::from(i.dst), usize::from(i.src));
        match i.code {
            LDX_MEM_W => {
                // r1 is the context; only its three words exist.
                if s != 1 || i.off % 4 != 0 {
                    return None;
                }
                r[d] = u64::from(*ctx.get(usize::try_from(i.off / 4).ok()?)?);
            }
            ALU32_AND_K => r[d] = u64::from((r[d] as u32) & (i.imm as u32)),
            ALU32_RSH_K => r[d] = u64::from((r[d] as u32) >> (i.imm as u32)),
            ALU32_MOV_K => r[d] = u64::from(i.imm as u32),
            JMP_JNE_K => {
                if r[d] != i.imm as i64 as u64 {
                    pc = pc.checked_add_signed(isize::from(i.off))?;
                }
            }
            JMP_EXIT => return Some(r[0]),
            _ => return None,
        }
    }
    None
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a zero-padded attribute buffer of the size passed; the kernel reads
    // and writes only within it.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put_u32(attr: &mut [u8; 128], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// A loaded device program, attachable to any number of cgroups.
#[derive(Debug)]
pub struct DeviceProgram {
    fd: OwnedFd,
    id: u32,
}

impl DeviceProgram {
    /// Loads [`program`] into the kernel.
    pub fn load() -> io::Result<DeviceProgram> {
        let code: Vec<u8> = program().into_iter().flat_map(Insn::bytes).collect();
        let license = c"Apache-2.0";
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE);
        put_u32(&mut attr, 4, crate::num::count_u32(code.len() / 8));
        put_u64(&mut attr, 8, code.as_ptr() as u64);
        put_u64(&mut attr, 16, license.as_ptr() as u64);
        // expected_attach_type, after prog_name[16] and prog_ifindex.
        put_u32(&mut attr, 68, BPF_CGROUP_DEVICE);
        let raw = bpf(BPF_PROG_LOAD, &mut attr)?;
        // SAFETY: a fresh program fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(crate::num::syscall_int(raw)) };
        let mut info = [0u8; 256];
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, fd.as_raw_fd().cast_unsigned());
        put_u32(&mut attr, 4, crate::num::count_u32(info.len()));
        put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        let id = u32::from_ne_bytes([info[4], info[5], info[6], info[7]]);
        Ok(DeviceProgram { fd, id })
    }

    /// Attaches the program to the cgroup whose directory `dir` is (opened for reading), and
    /// checks that the cgroup lists it.
    pub fn attach(&self, dir: &OwnedFd) -> io::Result<()> {
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, dir.as_raw_fd().cast_unsigned());
        put_u32(&mut attr, 4, self.fd.as_raw_fd().cast_unsigned());
        put_u32(&mut attr, 8, BPF_CGROUP_DEVICE);
        put_u32(&mut attr, 12, BPF_F_ALLOW_MULTI);
        bpf(BPF_PROG_ATTACH, &mut attr)?;
        if self.attached_to(dir)? {
            Ok(())
        } else {
            Err(io::Error::other(
                "the device program is not listed on the cgroup after attaching it",
            ))
        }
    }

    /// Whether the cgroup `dir` has this program attached (not counting its ancestors').
    pub fn attached_to(&self, dir: &OwnedFd) -> io::Result<bool> {
        let mut ids = [0u32; 64];
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, dir.as_raw_fd().cast_unsigned());
        put_u32(&mut attr, 4, BPF_CGROUP_DEVICE);
        put_u64(&mut attr, 16, ids.as_mut_ptr() as u64);
        put_u32(&mut attr, 24, crate::num::count_u32(ids.len()));
        bpf(BPF_PROG_QUERY, &mut attr)?;
        let count = u32::from_ne_bytes([attr[24], attr[25], attr[26], attr[27]]) as usize;
        Ok(ids[..count.min(ids.len())].contains(&self.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u32 = 1;
    const CHAR: u32 = 2;
    const MKNOD: u32 = 1;
    const READ: u32 = 2;
    const WRITE: u32 = 4;

    #[test]
    fn program_allows_exactly_the_minimal_devices() {
        let p = program();
        let cases: &[(u32, u32, u32, u32, u64)] = &[
            (CHAR, READ | WRITE, 1, 3, 1),   // null
            (CHAR, READ, 1, 9, 1),           // urandom
            (CHAR, WRITE, 5, 0, 1),          // tty
            (CHAR, READ | WRITE, 136, 7, 1), // a pts
            (CHAR, MKNOD, 1, 3, 1),
            (CHAR, READ, 1, 1, 0),          // /dev/mem
            (CHAR, READ, 1, 11, 0),         // /dev/kmsg
            (CHAR, WRITE, 4, 1, 0),         // tty1
            (CHAR, READ, 10, 200, 0),       // tun
            (BLOCK, READ | WRITE, 7, 0, 0), // loop0
            (BLOCK, WRITE, 8, 0, 0),        // sda
            (BLOCK, MKNOD, 1, 3, 0),        // a block device with null's numbers
            (CHAR, READ, 5, 1, 0),          // console
        ];
        for (kind, access, major, minor, want) in cases {
            assert_eq!(
                evaluate(&p, *kind, *access, *major, *minor),
                Some(*want),
                "type {kind} {major}:{minor} access {access}"
            );
        }
    }

    #[test]
    fn v1_rules_and_read_back() {
        let rules = v1_rules();
        assert_eq!(rules[0], "c 1:3 rwm");
        assert_eq!(rules[7], "c 136:* rwm");
        let mut shown = rules.clone();
        shown.reverse();
        assert!(v1_list_matches(&(shown.join("\n") + "\n")));
        assert!(!v1_list_matches("a *:* rwm\n"));
        assert!(!v1_list_matches(&rules[..7].join("\n")));
    }

    #[test]
    fn the_kernel_accepts_the_program() {
        // Loading needs CAP_SYS_ADMIN (or CAP_BPF) and a kernel with cgroup BPF.
        match DeviceProgram::load() {
            Ok(p) => assert!(p.id > 0),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) => {
                eprintln!("SKIP the_kernel_accepts_the_program: {e}");
            }
            Err(e) => panic!("the verifier refused the device program: {e}"),
        }
    }
}
