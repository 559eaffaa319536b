//! Thin wrappers around the system calls and `/proc` files this crate
//! needs; those the native provider needs too come from its `sys` module.

pub use stacyvm_native::sys::{
    cstr, geteuid, pidfd_send_signal, pidfd_wait, prctl, proc_stat, process_start_time,
};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `kill(2)`.
pub fn kill(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: no pointers involved.
    if unsafe { libc::kill(pid, sig) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The pid tracing `pid` (`TracerPid` in `/proc/<pid>/status`), 0 if none.
pub fn tracer_pid(pid: i32) -> Option<i32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The executable of a process (without the ` (deleted)` suffix).
pub fn exe(pid: i32) -> Option<PathBuf> {
    let link = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let bytes = link.as_os_str().as_bytes();
    let trimmed = bytes.strip_suffix(b" (deleted)").unwrap_or(bytes);
    Some(PathBuf::from(OsStr::from_bytes(trimmed)))
}

/// Every pid in `/proc`.
pub fn all_pids() -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

/// `setsid(2)`; async-signal-safe.
pub fn setsid() -> io::Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` is `dir` or below it (compared component-wise).
pub fn is_within(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_visible() {
        let me = std::process::id() as i32;
        let st = proc_stat(me).expect("own stat");
        assert!(st.start_time > 0);
        assert_eq!(tracer_pid(me).map(|t| t >= 0), Some(true));
        assert!(exe(me).is_some());
        assert!(all_pids().contains(&me));
    }
}
