//! A KVM boot test: create a VM with one vCPU and 64 KiB of memory, load a
//! seven-byte real-mode guest that writes a byte to a serial port and halts,
//! and run it. Passing means hardware virtualisation really runs guest code
//! here, not just that `/dev/kvm` exists. (Booting a full Linux guest needs
//! more — the microVM provider's own certification covers that.)

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// No `/dev/kvm` at all.
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Failed(String),
}

// ioctl numbers from <linux/kvm.h> (x86_64).
const KVM_GET_API_VERSION: libc::c_ulong = 0xae00;
const KVM_CREATE_VM: libc::c_ulong = 0xae01;
const KVM_GET_VCPU_MMAP_SIZE: libc::c_ulong = 0xae04;
const KVM_CREATE_VCPU: libc::c_ulong = 0xae41;
const KVM_SET_USER_MEMORY_REGION: libc::c_ulong = 0x4020_ae46;
const KVM_RUN: libc::c_ulong = 0xae80;
const KVM_GET_REGS: libc::c_ulong = 0x8090_ae81;
const KVM_SET_REGS: libc::c_ulong = 0x4090_ae82;
const KVM_GET_SREGS: libc::c_ulong = 0x8138_ae83;
const KVM_SET_SREGS: libc::c_ulong = 0x4138_ae84;

const KVM_EXIT_IO: u32 = 2;
const KVM_EXIT_HLT: u32 = 5;

const GUEST_ADDR: u64 = 0x1000;
const SERIAL_PORT: u16 = 0x3f8;
/// mov dx, 0x3f8; mov al, 'K'; out dx, al; hlt
const GUEST_CODE: [u8; 7] = [0xba, 0xf8, 0x03, 0xb0, b'K', 0xee, 0xf4];

#[repr(C)]
struct MemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

/// `struct kvm_regs`: rax … r15, rip, rflags.
#[repr(C)]
#[derive(Default)]
struct Regs {
    gp: [u64; 16],
    rip: u64,
    rflags: u64,
}

/// `struct kvm_sregs` is 312 bytes; only the code segment (the first
/// `kvm_segment`: base u64, limit u32, selector u16, …) is changed.
#[repr(C, align(8))]
struct Sregs([u8; 312]);

fn failed(what: &str) -> KvmError {
    KvmError::Failed(format!("{what}: {}", std::io::Error::last_os_error()))
}

fn ioctl(fd: &OwnedFd, req: libc::c_ulong, arg: libc::c_ulong) -> libc::c_int {
    // SAFETY: every caller passes a request whose argument is either a
    // plain integer or a pointer to a correctly sized, live struct.
    unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) }
}

fn own(fd: libc::c_int, what: &str) -> Result<OwnedFd, KvmError> {
    if fd < 0 {
        return Err(failed(what));
    }
    // SAFETY: fd is a freshly returned, owned descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Anonymous mapping released on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(len: usize, fd: Option<&OwnedFd>) -> Result<Mapping, KvmError> {
        let (flags, raw) = match fd {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
        };
        // SAFETY: a fresh mapping with no address hint.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(failed("mmap"));
        }
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

fn run_guest() -> Result<String, KvmError> {
    let path = c"/dev/kvm";
    // SAFETY: valid C string.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::NotFound {
            KvmError::Missing("/dev/kvm does not exist (no hardware virtualisation)".into())
        } else {
            KvmError::Failed(format!("cannot open /dev/kvm: {e}"))
        });
    }
    let kvm = own(raw, "open /dev/kvm")?;
    let api = ioctl(&kvm, KVM_GET_API_VERSION, 0);
    if api != 12 {
        return Err(KvmError::Failed(format!(
            "unexpected KVM API version {api}"
        )));
    }
    let vm = own(ioctl(&kvm, KVM_CREATE_VM, 0), "KVM_CREATE_VM")?;
    let mem_len = 0x10000usize;
    let mem = Mapping::new(mem_len, None)?;
    // SAFETY: the guest code fits in the 64 KiB mapping at GUEST_ADDR.
    unsafe {
        std::ptr::copy_nonoverlapping(
            GUEST_CODE.as_ptr(),
            (mem.ptr as *mut u8).add(GUEST_ADDR as usize),
            GUEST_CODE.len(),
        )
    };
    let region = MemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem_len as u64,
        userspace_addr: mem.ptr as u64,
    };
    if ioctl(
        &vm,
        KVM_SET_USER_MEMORY_REGION,
        &region as *const _ as libc::c_ulong,
    ) < 0
    {
        return Err(failed("KVM_SET_USER_MEMORY_REGION"));
    }
    let vcpu = own(ioctl(&vm, KVM_CREATE_VCPU, 0), "KVM_CREATE_VCPU")?;
    let run_len = ioctl(&kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if run_len <= 0 {
        return Err(failed("KVM_GET_VCPU_MMAP_SIZE"));
    }
    let run = Mapping::new(run_len as usize, Some(&vcpu))?;

    let mut sregs = Sregs([0; 312]);
    if ioctl(&vcpu, KVM_GET_SREGS, &mut sregs as *mut _ as libc::c_ulong) < 0 {
        return Err(failed("KVM_GET_SREGS"));
    }
    // cs.base = 0 (bytes 0..8), cs.selector = 0 (bytes 12..14).
    sregs.0[0..8].fill(0);
    sregs.0[12..14].fill(0);
    if ioctl(&vcpu, KVM_SET_SREGS, &sregs as *const _ as libc::c_ulong) < 0 {
        return Err(failed("KVM_SET_SREGS"));
    }
    let mut regs = Regs::default();
    if ioctl(&vcpu, KVM_GET_REGS, &mut regs as *mut _ as libc::c_ulong) < 0 {
        return Err(failed("KVM_GET_REGS"));
    }
    regs.rip = GUEST_ADDR;
    regs.rflags = 0x2;
    if ioctl(&vcpu, KVM_SET_REGS, &regs as *const _ as libc::c_ulong) < 0 {
        return Err(failed("KVM_SET_REGS"));
    }

    let mut out = Vec::new();
    for _ in 0..16 {
        if ioctl(&vcpu, KVM_RUN, 0) < 0 {
            return Err(failed("KVM_RUN"));
        }
        let base = run.ptr as *const u8;
        // SAFETY: `struct kvm_run` starts with two u8 fields and 6 bytes of
        // padding; exit_reason is the u32 at offset 8, the exit union at 32.
        let exit_reason = unsafe { std::ptr::read_unaligned(base.add(8) as *const u32) };
        match exit_reason {
            KVM_EXIT_IO => {
                // SAFETY: io exit: direction u8, size u8, port u16, count
                // u32, data_offset u64 — all inside the mapping.
                let (port, offset) = unsafe {
                    (
                        std::ptr::read_unaligned(base.add(34) as *const u16),
                        std::ptr::read_unaligned(base.add(40) as *const u64),
                    )
                };
                if port == SERIAL_PORT && (offset as usize) < run.len {
                    // SAFETY: bounds checked above.
                    out.push(unsafe { *base.add(offset as usize) });
                }
            }
            KVM_EXIT_HLT => {
                return if out == b"K" {
                    Ok(
                        "ran a real-mode guest to hlt under KVM (it wrote 'K' to its serial port)"
                            .to_string(),
                    )
                } else {
                    Err(KvmError::Failed(format!(
                        "the guest halted without its serial output (got {out:?})"
                    )))
                };
            }
            other => {
                return Err(KvmError::Failed(format!(
                    "the guest stopped with KVM exit reason {other} instead of running to hlt"
                )))
            }
        }
    }
    Err(KvmError::Failed(
        "the guest did not halt after 16 exits".into(),
    ))
}

/// Run the boot test with a deadline (a wedged KVM must not hang doctor).
pub fn boot_test(timeout: Duration) -> Result<String, KvmError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run_guest());
    });
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        Err(KvmError::Failed(format!(
            "the KVM guest did not finish within {timeout:?}"
        )))
    })
}
