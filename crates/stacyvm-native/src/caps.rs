//! Capabilities: the sandbox keeps the same small set the Docker provider
//! keeps, in the bounding, permitted and effective sets; the inheritable and
//! ambient sets are emptied.

use crate::sys;
use std::io;

/// Capabilities the sandbox keeps, by name and number.
pub const KEEP: &[(&str, u32)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_NET_BIND_SERVICE", 10),
];

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Bit mask of [`KEEP`].
pub fn keep_mask() -> u64 {
    KEEP.iter().fold(0u64, |m, (_, c)| m | (1u64 << c))
}

/// Drop every capability not in [`KEEP`] from the bounding set, clear the
/// ambient set, and set permitted = effective = [`KEEP`], inheritable = ∅.
/// Needs `CAP_SETPCAP` (i.e. call it as root, before anything else drops it).
pub fn drop_to_keep_set() -> io::Result<()> {
    let keep = keep_mask();
    for cap in 0..64u32 {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        match sys::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) {
            Ok(_) => {}
            // Past the last capability this kernel knows.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot drop capability {cap} from the bounding set: {e}"),
                ))
            }
        }
    }
    sys::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
        0,
        0,
    )
    .map_err(|e| io::Error::new(e.kind(), format!("cannot clear ambient capabilities: {e}")))?;
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: keep as u32,
            permitted: keep as u32,
            inheritable: 0,
        },
        CapData {
            effective: (keep >> 32) as u32,
            permitted: (keep >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: header and a two-element data array in the v3 layout.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot set capabilities: {e}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_mask_matches_the_docker_provider() {
        assert_eq!(keep_mask(), 0b100_1111_1011);
    }
}
