//! The seccomp filter of every sandbox: a small classic-BPF program written
//! out by hand so it can be read and audited in one sitting.
//!
//! Policy (a deny list plus a cut-off for syscalls newer than the list):
//!
//! 1. The architecture must be the native one (`AUDIT_ARCH_X86_64` or
//!    `AUDIT_ARCH_AARCH64`); anything else (i386 via `int 0x80`, …) kills the
//!    process.
//! 2. On x86-64 the x32 ABI (syscall numbers with bit 30 set) gets `EPERM`.
//! 3. Syscall numbers above the newest one this policy was written against
//!    ([`LAST_KNOWN`]) get `ENOSYS`, so a future syscall is never allowed
//!    by accident (libc falls back to older calls on `ENOSYS`).
//! 4. `clone3` gets `ENOSYS` (its flags live in memory BPF cannot read;
//!    libc falls back to `clone`), like Docker does.
//! 5. `clone` with any namespace flag and `unshare` with any namespace flag
//!    get `EPERM`; plain thread and process creation is allowed.
//! 6. `personality` is allowed only for the values Docker allows.
//! 7. `socket(AF_VSOCK, …)` gets `EPERM` (no path to a hypervisor's services).
//! 8. Everything in [`DENIED`] gets `EPERM`: mounts and the new mount API,
//!    `pivot_root`, `setns`, `sethostname`, kernel modules,
//!    `kexec`, `reboot`, swap, BPF, perf, keyrings, handle-based opens,
//!    `userfaultfd`, io_uring, clock setting, `syslog`, `acct`, quotas,
//!    `iopl`/`ioperm`, NUMA policy calls and obsolete syscalls.
//! 9. Everything else is allowed.
//!
//! `ptrace`, `process_vm_readv/writev`, `kcmp` and `pidfd_getfd` stay allowed
//! as in Docker's default profile on kernels ≥ 4.8: the PID namespace keeps
//! them inside the sandbox.

use std::io;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ: u16 = 0x15;
const BPF_JGT: u16 = 0x25;
const BPF_JSET: u16 = 0x45;
const BPF_RET: u16 = 0x06;

const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low 32 bits of `args[0]` (both supported architectures are little endian).
const OFF_ARG0_LO: u32 = 16;

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;
const AF_VSOCK: u32 = 40;

/// Namespace flags of `clone` (`CLONE_NEWTIME` shares its bit with the exit
/// signal there, so it is checked for `unshare` only).
const CLONE_NS_FLAGS: u32 = 0x0002_0000 // CLONE_NEWNS
    | 0x0200_0000 // CLONE_NEWCGROUP
    | 0x0400_0000 // CLONE_NEWUTS
    | 0x0800_0000 // CLONE_NEWIPC
    | 0x1000_0000 // CLONE_NEWUSER
    | 0x2000_0000 // CLONE_NEWPID
    | 0x4000_0000; // CLONE_NEWNET
const UNSHARE_NS_FLAGS: u32 = CLONE_NS_FLAGS | 0x0000_0080; // CLONE_NEWTIME

/// `personality` values Docker's default profile allows: PER_LINUX,
/// PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, and the query value.
const PERSONALITY_ALLOWED: &[u32] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// The newest syscall number the policy knows (`mseal`, Linux 6.10). Higher
/// numbers get `ENOSYS`.
pub const LAST_KNOWN: u32 = 462;

#[cfg(target_arch = "x86_64")]
mod arch {
    /// `AUDIT_ARCH_X86_64`.
    pub const AUDIT_ARCH: u32 = 0xc000_003e;
    /// Syscall numbers with this bit belong to the x32 ABI.
    pub const X32_BIT: Option<u32> = Some(0x4000_0000);
    pub const NR_CLONE: u32 = 56;
    pub const NR_CLONE3: u32 = 435;
    pub const NR_UNSHARE: u32 = 272;
    pub const NR_PERSONALITY: u32 = 135;
    pub const NR_SOCKET: u32 = 41;

    /// Syscalls answered with `EPERM`.
    pub const DENIED: &[(&str, u32)] = &[
        ("_sysctl", 156),
        ("acct", 163),
        ("add_key", 248),
        ("afs_syscall", 183),
        ("bpf", 321),
        ("clock_adjtime", 305),
        ("clock_settime", 227),
        ("create_module", 174),
        ("delete_module", 176),
        ("fanotify_init", 300),
        ("finit_module", 313),
        ("fsconfig", 431),
        ("fsmount", 432),
        ("fsopen", 430),
        ("fspick", 433),
        ("get_kernel_syms", 177),
        ("get_mempolicy", 239),
        ("getpmsg", 181),
        ("init_module", 175),
        ("io_uring_enter", 426),
        ("io_uring_register", 427),
        ("io_uring_setup", 425),
        ("ioperm", 173),
        ("iopl", 172),
        ("kexec_file_load", 320),
        ("kexec_load", 246),
        ("keyctl", 250),
        ("lookup_dcookie", 212),
        ("mbind", 237),
        ("migrate_pages", 256),
        ("mount", 165),
        ("mount_setattr", 442),
        ("move_mount", 429),
        ("move_pages", 279),
        ("name_to_handle_at", 303),
        ("nfsservctl", 180),
        ("open_by_handle_at", 304),
        ("open_tree", 428),
        ("perf_event_open", 298),
        ("pivot_root", 155),
        ("putpmsg", 182),
        ("query_module", 178),
        ("quotactl", 179),
        ("quotactl_fd", 443),
        ("reboot", 169),
        ("request_key", 249),
        ("security", 185),
        ("set_mempolicy", 238),
        ("set_mempolicy_home_node", 450),
        ("setdomainname", 171),
        ("sethostname", 170),
        ("setns", 308),
        ("settimeofday", 164),
        ("swapoff", 168),
        ("swapon", 167),
        ("sysfs", 139),
        ("syslog", 103),
        ("tuxcall", 184),
        ("umount2", 166),
        ("uselib", 134),
        ("userfaultfd", 323),
        ("ustat", 136),
        ("vhangup", 153),
    ];
}

#[cfg(target_arch = "aarch64")]
mod arch {
    /// `AUDIT_ARCH_AARCH64`.
    pub const AUDIT_ARCH: u32 = 0xc000_00b7;
    pub const X32_BIT: Option<u32> = None;
    pub const NR_CLONE: u32 = 220;
    pub const NR_CLONE3: u32 = 435;
    pub const NR_UNSHARE: u32 = 97;
    pub const NR_PERSONALITY: u32 = 92;
    pub const NR_SOCKET: u32 = 198;

    /// Syscalls answered with `EPERM`.
    pub const DENIED: &[(&str, u32)] = &[
        ("acct", 89),
        ("add_key", 217),
        ("bpf", 280),
        ("clock_adjtime", 266),
        ("clock_settime", 112),
        ("delete_module", 106),
        ("fanotify_init", 262),
        ("finit_module", 273),
        ("fsconfig", 431),
        ("fsmount", 432),
        ("fsopen", 430),
        ("fspick", 433),
        ("get_mempolicy", 236),
        ("init_module", 105),
        ("io_uring_enter", 426),
        ("io_uring_register", 427),
        ("io_uring_setup", 425),
        ("kexec_file_load", 294),
        ("kexec_load", 104),
        ("keyctl", 219),
        ("lookup_dcookie", 18),
        ("mbind", 235),
        ("migrate_pages", 238),
        ("mount", 40),
        ("mount_setattr", 442),
        ("move_mount", 429),
        ("move_pages", 239),
        ("name_to_handle_at", 264),
        ("nfsservctl", 42),
        ("open_by_handle_at", 265),
        ("open_tree", 428),
        ("perf_event_open", 241),
        ("pivot_root", 41),
        ("quotactl", 60),
        ("quotactl_fd", 443),
        ("reboot", 142),
        ("request_key", 218),
        ("set_mempolicy", 237),
        ("set_mempolicy_home_node", 450),
        ("setdomainname", 162),
        ("sethostname", 161),
        ("setns", 268),
        ("settimeofday", 170),
        ("swapoff", 225),
        ("swapon", 224),
        ("syslog", 116),
        ("umount2", 39),
        ("userfaultfd", 282),
        ("vhangup", 58),
    ];
}

pub use arch::DENIED;

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

fn ret(action: u32) -> Insn {
    stmt(BPF_RET, action)
}

fn errno(e: u32) -> u32 {
    SECCOMP_RET_ERRNO | (e & 0xffff)
}

/// `if nr == syscall { body }`, where every path of `body` returns.
fn when_nr(prog: &mut Vec<Insn>, syscall: u32, body: &[Insn]) {
    let skip = u8::try_from(body.len()).expect("filter block longer than 255 instructions");
    prog.push(jump(BPF_JEQ, syscall, 0, skip));
    prog.extend_from_slice(body);
}

/// Reject the call when `args[0]` has any of `flags`, else allow it.
fn flags_block(flags: u32) -> [Insn; 4] {
    [
        stmt(BPF_LD_W_ABS, OFF_ARG0_LO),
        jump(BPF_JSET, flags, 0, 1),
        ret(errno(EPERM)),
        ret(SECCOMP_RET_ALLOW),
    ]
}

/// The start of every filter: a foreign architecture kills the process, x32
/// syscalls get `EPERM`, and the syscall number is loaded.
fn arch_checks() -> Vec<Insn> {
    let mut p = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JEQ, arch::AUDIT_ARCH, 1, 0),
        ret(SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, OFF_NR),
    ];
    if let Some(bit) = arch::X32_BIT {
        // nr >= bit  ⇔  nr > bit - 1
        p.push(jump(BPF_JGT, bit - 1, 0, 1));
        p.push(ret(errno(EPERM)));
    }
    p
}

/// The whole filter program.
pub fn program() -> Vec<Insn> {
    let mut p = arch_checks();
    p.push(jump(BPF_JGT, LAST_KNOWN, 0, 1));
    p.push(ret(errno(ENOSYS)));
    when_nr(&mut p, arch::NR_CLONE3, &[ret(errno(ENOSYS))]);
    when_nr(&mut p, arch::NR_CLONE, &flags_block(CLONE_NS_FLAGS));
    when_nr(&mut p, arch::NR_UNSHARE, &flags_block(UNSHARE_NS_FLAGS));
    let mut personality = vec![stmt(BPF_LD_W_ABS, OFF_ARG0_LO)];
    for v in PERSONALITY_ALLOWED {
        personality.push(jump(BPF_JEQ, *v, 0, 1));
        personality.push(ret(SECCOMP_RET_ALLOW));
    }
    personality.push(ret(errno(EPERM)));
    when_nr(&mut p, arch::NR_PERSONALITY, &personality);
    when_nr(
        &mut p,
        arch::NR_SOCKET,
        &[
            stmt(BPF_LD_W_ABS, OFF_ARG0_LO),
            jump(BPF_JEQ, AF_VSOCK, 0, 1),
            ret(errno(EPERM)),
            ret(SECCOMP_RET_ALLOW),
        ],
    );
    for (_, nr) in DENIED {
        when_nr(&mut p, *nr, &[ret(errno(EPERM))]);
    }
    p.push(ret(SECCOMP_RET_ALLOW));
    p
}

/// Install the filter on the calling thread. `no_new_privs` must be set
/// first (or the caller must hold `CAP_SYS_ADMIN`).
pub fn install() -> io::Result<()> {
    install_prepared(&prepare(&program()))
}

/// A filter with the same architecture checks as [`program`] (a foreign
/// architecture kills the process, x32 gets `EPERM`) that answers each
/// syscall in `syscalls` with `errno` and allows everything else.
pub fn errno_program(syscalls: &[u32], errno_value: u32) -> Vec<Insn> {
    let mut p = arch_checks();
    for nr in syscalls {
        when_nr(&mut p, *nr, &[ret(errno(errno_value))]);
    }
    p.push(ret(SECCOMP_RET_ALLOW));
    p
}

/// A program in the kernel's form, for [`install_prepared`].
pub fn prepare(prog: &[Insn]) -> Vec<libc::sock_filter> {
    prog.iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

/// Install a [`prepare`]d filter on the calling thread. Does not allocate,
/// so it may run between `fork` and `exec`. `no_new_privs` must be set first
/// (or the caller must hold `CAP_SYS_ADMIN`).
pub fn install_prepared(filters: &[libc::sock_filter]) -> io::Result<()> {
    let Ok(len) = u16::try_from(filters.len()) else {
        return Err(io::Error::from_raw_os_error(libc::E2BIG));
    };
    let fprog = libc::sock_fprog {
        len,
        filter: filters.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points to `len` valid instructions that outlive the
    // call; the kernel copies the program.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic-BPF interpreter for the instructions the filter uses.
    fn run(prog: &[Insn], arch: u32, nr: u32, arg0: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[16..24].copy_from_slice(&arg0.to_le_bytes());
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            match i.code {
                BPF_LD_W_ABS => {
                    let k = i.k as usize;
                    a = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                    pc += 1;
                }
                BPF_JEQ | BPF_JGT | BPF_JSET => {
                    let taken = match i.code {
                        BPF_JEQ => a == i.k,
                        BPF_JGT => a > i.k,
                        _ => a & i.k != 0,
                    };
                    pc += 1 + usize::from(if taken { i.jt } else { i.jf });
                }
                BPF_RET => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn eval(nr: u32, arg0: u64) -> u32 {
        run(&program(), arch::AUDIT_ARCH, nr, arg0)
    }

    #[test]
    fn every_path_ends_in_a_return_inside_the_program() {
        let p = program();
        assert!(p.len() < 400, "{} instructions", p.len());
        for (pc, i) in p.iter().enumerate() {
            if matches!(i.code, BPF_JEQ | BPF_JGT | BPF_JSET) {
                assert!(pc + 1 + usize::from(i.jt.max(i.jf)) < p.len());
            }
        }
        assert_eq!(p.last().map(|i| i.code), Some(BPF_RET));
    }

    #[test]
    fn foreign_architectures_are_killed() {
        assert_eq!(run(&program(), 0x4000_0003, 1, 0), SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn denied_syscalls_get_eperm_and_the_rest_is_allowed() {
        for (name, nr) in DENIED {
            assert_eq!(eval(*nr, 0), errno(EPERM), "{name}");
        }
        // read, write, openat, execve (x86-64 numbers and generic ones).
        for nr in [0u32, 1, 257, 59, 63, 64, 56 + 1] {
            if DENIED.iter().any(|(_, d)| *d == nr) || nr == arch::NR_CLONE {
                continue;
            }
            assert_eq!(eval(nr, 0), SECCOMP_RET_ALLOW, "nr {nr}");
        }
        assert_eq!(eval(LAST_KNOWN, 0), SECCOMP_RET_ALLOW);
        assert_eq!(eval(LAST_KNOWN + 1, 0), errno(ENOSYS));
        assert_eq!(eval(arch::NR_CLONE3, 0), errno(ENOSYS));
    }

    #[test]
    fn namespace_flags_are_refused() {
        // fork-like and thread-like clones.
        assert_eq!(eval(arch::NR_CLONE, 0x11), SECCOMP_RET_ALLOW);
        assert_eq!(eval(arch::NR_CLONE, 0x003d_0f00), SECCOMP_RET_ALLOW);
        for flag in [0x0002_0000u64, 0x1000_0000, 0x2000_0000, 0x4000_0000] {
            assert_eq!(eval(arch::NR_CLONE, flag | 0x11), errno(EPERM));
            assert_eq!(eval(arch::NR_UNSHARE, flag), errno(EPERM));
        }
        assert_eq!(eval(arch::NR_UNSHARE, 0x80), errno(EPERM));
        // CLONE_FILES | CLONE_FS is harmless.
        assert_eq!(eval(arch::NR_UNSHARE, 0x600), SECCOMP_RET_ALLOW);
    }

    #[test]
    fn personality_and_vsock() {
        assert_eq!(eval(arch::NR_PERSONALITY, 0xffff_ffff), SECCOMP_RET_ALLOW);
        assert_eq!(eval(arch::NR_PERSONALITY, 0), SECCOMP_RET_ALLOW);
        // ADDR_NO_RANDOMIZE
        assert_eq!(eval(arch::NR_PERSONALITY, 0x0004_0000), errno(EPERM));
        assert_eq!(eval(arch::NR_SOCKET, 40), errno(EPERM));
        assert_eq!(eval(arch::NR_SOCKET, 1), SECCOMP_RET_ALLOW);
        assert_eq!(eval(arch::NR_SOCKET, 2), SECCOMP_RET_ALLOW);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_is_refused() {
        assert_eq!(eval(0x4000_0000, 0), errno(EPERM));
        assert_eq!(eval(0x4000_0000 + 165, 0), errno(EPERM));
    }

    #[test]
    fn errno_program_answers_only_the_listed_syscalls() {
        let p = errno_program(&[332, 439], ENOSYS);
        assert_eq!(run(&p, arch::AUDIT_ARCH, 332, 0), errno(ENOSYS));
        assert_eq!(run(&p, arch::AUDIT_ARCH, 439, 0), errno(ENOSYS));
        assert_eq!(run(&p, arch::AUDIT_ARCH, 0, 0), SECCOMP_RET_ALLOW);
        assert_eq!(run(&p, arch::AUDIT_ARCH, 333, 0), SECCOMP_RET_ALLOW);
        assert_eq!(run(&p, 0x4000_0003, 332, 0), SECCOMP_RET_KILL_PROCESS);
        assert_eq!(prepare(&p).len(), p.len());
    }
}
