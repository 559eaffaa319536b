//! The seccomp filter PRoot runs under.
//!
//! PRoot 5.1.0 (the version Debian ships) translates the paths of the
//! syscalls it knows and passes every other syscall to the kernel unchanged.
//! A path-taking syscall it does not know therefore acts on the *host's*
//! file system: inside `proot -r ROOT`, `statx("/etc")` looks at the host's
//! `/etc`. Measured on Linux 6.18 with PRoot 5.1.0 by calling each syscall
//! with one path that exists only in the root and one that exists only on
//! the host:
//!
//! | translated (kept) | untranslated (refused here) |
//! |---|---|
//! | `newfstatat`, `faccessat`, `utimensat`, `renameat2`, `name_to_handle_at`, `inotify_add_watch`, `mknodat`, `readlinkat`, `truncate`, `statfs`, `chdir`, `*xattr`, `mount`, `umount2`, `pivot_root`, `acct` | `statx`, `faccessat2`, `openat2`, `execveat`, `fchmodat2`, `fanotify_mark`, `open_tree`, `fspick`, `mount_setattr`, `getxattrat`, `listxattrat`, `open_tree_attr`, `file_getattr` |
//!
//! The filter answers the untranslated ones (and the rest of the new mount
//! API and the `*xattrat`/`file_*attr` families, which take paths the same
//! way) with `ENOSYS`. glibc, Rust's standard library, CPython and coreutils
//! treat `ENOSYS` as "old kernel" and fall back to the older syscalls, which
//! PRoot does translate.
//!
//! Two more entries are not about paths:
//!
//! * `io_uring_setup`/`_enter`/`_register`: io_uring operations (open, stat,
//!   rename, …) run in the kernel without any syscall PRoot could see.
//! * `clone3`: PRoot does not know it, so it cannot tell that a thread made
//!   with it shares the working directory of its creator; a `chdir` in one
//!   thread is then not seen by the others. With `ENOSYS` glibc uses `clone`,
//!   which PRoot handles.
//!
//! The filter is installed on PRoot itself and inherited by every process
//! PRoot starts. With plain `ptrace` tracing (Debian's 5.1.0 is built
//! without PRoot's seccomp accelerator) PRoot sees such a syscall at entry,
//! leaves it alone, and the filter then answers it; with the accelerator,
//! the kernel ranks a filter's `SECCOMP_RET_ERRNO` above PRoot's
//! `SECCOMP_RET_TRACE`, so the answer is the same. PRoot's own calls fall
//! back the same way. Syscalls of other architectures kill the process, as
//! in the native provider's filter.

use stacyvm_native::seccomp;

/// Syscalls answered with `ENOSYS`, by name and number. Only the first
/// three are numbered differently on x86_64 and aarch64; the others (425
/// and up) have the same number on both.
pub const REFUSED: &[(&str, u32)] = &[
    ("fanotify_mark", libc::SYS_fanotify_mark as u32),
    ("execveat", libc::SYS_execveat as u32),
    ("statx", libc::SYS_statx as u32),
    ("io_uring_setup", 425),
    ("io_uring_enter", 426),
    ("io_uring_register", 427),
    ("open_tree", 428),
    ("move_mount", 429),
    ("fsopen", 430),
    ("fsconfig", 431),
    ("fsmount", 432),
    ("fspick", 433),
    ("clone3", 435),
    ("openat2", 437),
    ("faccessat2", 439),
    ("mount_setattr", 442),
    ("fchmodat2", 452),
    ("setxattrat", 463),
    ("getxattrat", 464),
    ("listxattrat", 465),
    ("removexattrat", 466),
    ("open_tree_attr", 467),
    ("file_getattr", 468),
    ("file_setattr", 469),
];

/// The filter, in the kernel's form, ready for
/// [`seccomp::install_prepared`] between `fork` and `exec`.
pub fn prepared() -> Vec<libc::sock_filter> {
    let nrs: Vec<u32> = REFUSED.iter().map(|(_, nr)| *nr).collect();
    seccomp::prepare(&seccomp::errno_program(&nrs, libc::ENOSYS as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_has_no_duplicates_and_fits_a_jump() {
        let mut nrs: Vec<u32> = REFUSED.iter().map(|(_, nr)| *nr).collect();
        nrs.sort_unstable();
        nrs.dedup();
        assert_eq!(nrs.len(), REFUSED.len());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            &REFUSED[..3],
            [("fanotify_mark", 301), ("execveat", 322), ("statx", 332)]
        );
        #[cfg(target_arch = "aarch64")]
        assert_eq!(
            &REFUSED[..3],
            [("fanotify_mark", 263), ("execveat", 281), ("statx", 291)]
        );
        let p = prepared();
        assert!(p.len() < 255, "{} instructions", p.len());
    }
}
