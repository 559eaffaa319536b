//! Finding and killing every process of a sandbox.
//!
//! A sandbox has no cgroup and no PID namespace, so its processes are found
//! by what they have in common:
//!
//! * PRoot traces every one of them and started them in its session (while
//!   PRoot runs);
//! * every program PRoot starts runs through its loader (a file PRoot
//!   extracts, recorded in `state.json`), or, with other PRoot builds, is a
//!   file inside the sandbox's directory;
//! * everything else of the sandbox descends from one of those (the agent
//!   is a child subreaper, so orphans stay in its tree).
//!
//! Killing freezes before it kills: PRoot is stopped (its tracees then wait
//! for it at their next syscall), every process found is stopped with
//! `SIGSTOP` (a stopped process cannot fork), and the search repeats until it
//! finds nothing new; only then is everything killed. Traced processes
//! finish dying once PRoot is gone, so PRoot is killed next, and whatever is
//! still found afterwards is killed until nothing is left.

use crate::sys;
use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// A process, told apart from a later one with the same pid by its start
/// time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    pid: i32,
    start_time: u64,
}

impl Proc {
    /// Still running (a zombie has finished).
    fn alive(&self) -> bool {
        sys::proc_stat(self.pid).is_some_and(|st| st.start_time == self.start_time && st.is_live())
    }

    fn signal(&self, sig: libc::c_int) {
        // The start time is checked right before the signal: a pid recycled
        // in between would need a whole pid-space wrap in that window.
        if self.alive() {
            let _ = sys::kill(self.pid, sig);
        }
    }
}

/// One live process of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    pid: i32,
    ppid: i32,
    session: i32,
    start_time: u64,
}

/// Every live (not zombie) process.
fn table() -> Vec<Entry> {
    sys::all_pids()
        .into_iter()
        .filter_map(|pid| {
            let st = sys::proc_stat(pid)?;
            st.is_live().then_some(Entry {
                pid,
                ppid: st.ppid,
                session: st.session,
                start_time: st.start_time,
            })
        })
        .collect()
}

/// Whether `p` looks like a loader PRoot extracted (`prooted-<pid>-<random>`).
pub fn is_loader(p: &Path) -> bool {
    p.is_absolute()
        && p.file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"prooted-"))
}

/// The loader PRoot `proot` runs its tracees with: the executable of one of
/// them, if it is a loader.
pub fn find_loader(proot: i32) -> Option<std::path::PathBuf> {
    sys::all_pids()
        .into_iter()
        .filter(|&p| sys::tracer_pid(p) == Some(proot))
        .find_map(sys::exe)
        .filter(|e| is_loader(e))
}

/// What identifies one sandbox's processes.
#[derive(Debug, Clone, Copy)]
pub struct Sandbox<'a> {
    /// The sandbox's state directory.
    pub dir: &'a Path,
    /// PRoot's loader for this sandbox, if recorded.
    pub loader: Option<&'a Path>,
}

impl Sandbox<'_> {
    fn runs_from_it(&self, pid: i32) -> bool {
        sys::exe(pid)
            .is_some_and(|e| Some(e.as_path()) == self.loader || sys::is_within(&e, self.dir))
    }
}

/// The processes of the sandbox in `table` (`proot` is the verified live
/// PRoot pid, if any; it is not part of the answer).
fn members(sb: &Sandbox<'_>, proot: Option<i32>, table: &[Entry]) -> Vec<Proc> {
    let me = std::process::id() as i32;
    let mut children: HashMap<i32, Vec<&Entry>> = HashMap::new();
    for e in table {
        children.entry(e.ppid).or_default().push(e);
    }
    let mut queue: Vec<i32> = proot.into_iter().collect();
    for e in table {
        if e.pid <= 1 || e.pid == me || Some(e.pid) == proot {
            continue;
        }
        let traced = proot.is_some_and(|p| e.session == p || sys::tracer_pid(e.pid) == Some(p));
        if traced || sb.runs_from_it(e.pid) {
            queue.push(e.pid);
        }
    }
    // Everything below those.
    let mut seen: HashSet<i32> = queue.iter().copied().collect();
    let mut i = 0;
    while i < queue.len() {
        if let Some(kids) = children.get(&queue[i]) {
            for k in kids {
                if seen.insert(k.pid) {
                    queue.push(k.pid);
                }
            }
        }
        i += 1;
    }
    let by_pid: HashMap<i32, &Entry> = table.iter().map(|e| (e.pid, e)).collect();
    queue
        .into_iter()
        .filter(|&pid| pid > 1 && pid != me && Some(pid) != proot)
        .filter_map(|pid| by_pid.get(&pid))
        .map(|e| Proc {
            pid: e.pid,
            start_time: e.start_time,
        })
        .collect()
}

/// Kill every process of the sandbox `sb`, with `proot` its live PRoot
/// process (pid and a pidfd on it) if PRoot still runs.
pub fn kill_sandbox(
    sb: &Sandbox<'_>,
    proot: Option<(i32, OwnedFd)>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let too_slow = |what: &str, procs: &[Proc]| {
        format!(
            "{what} {:?} did not stop within {} s",
            procs.iter().map(|p| p.pid).collect::<Vec<_>>(),
            timeout.as_secs()
        )
    };
    if let Some((_, fd)) = &proot {
        let _ = sys::pidfd_send_signal(fd, libc::SIGSTOP);
    }
    let proot_pid = proot.as_ref().map(|(p, _)| *p);
    // Freeze until the set is closed.
    let mut frozen: Vec<Proc> = Vec::new();
    loop {
        let found = members(sb, proot_pid, &table());
        let new: Vec<Proc> = found
            .into_iter()
            .filter(|p| !frozen.iter().any(|f| f.pid == p.pid))
            .collect();
        if new.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(too_slow("processes", &new));
        }
        for p in &new {
            p.signal(libc::SIGSTOP);
        }
        frozen.extend(new);
    }
    for p in &frozen {
        p.signal(libc::SIGKILL);
    }
    if let Some((pid, fd)) = &proot {
        if let Err(e) = sys::pidfd_send_signal(fd, libc::SIGKILL) {
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(format!("cannot kill proot (pid {pid}): {e}"));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if !sys::pidfd_wait(fd, left.as_millis().clamp(1, i32::MAX as u128) as i32) {
            return Err(format!(
                "proot (pid {pid}) did not exit within {} s",
                timeout.as_secs()
            ));
        }
    }
    // Wait for the frozen ones, then for anything found later.
    loop {
        let alive: Vec<Proc> = frozen.iter().filter(|p| p.alive()).copied().collect();
        let later = members(sb, None, &table());
        if alive.is_empty() && later.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(too_slow("processes", &[alive, later].concat()));
        }
        for p in alive.iter().chain(&later) {
            p.signal(libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn entry(pid: i32, ppid: i32, session: i32) -> Entry {
        Entry {
            pid,
            ppid,
            session,
            start_time: 1,
        }
    }

    #[test]
    fn the_session_and_every_descendant_are_members() {
        // Fake pids above any pid_max: nothing in /proc, so only the table
        // decides.
        let proot = 1 << 30;
        let (a, b, c, d, e) = (proot + 1, proot + 2, proot + 3, proot + 4, proot + 5);
        let me = std::process::id() as i32;
        let dir = PathBuf::from("/nonexistent-sandbox-dir");
        let sb = Sandbox {
            dir: &dir,
            loader: None,
        };
        let table = [
            entry(proot, 1, proot),
            entry(a, proot, proot), // the agent
            entry(b, a, b),         // left the session (setsid)
            entry(c, b, b),         // its child
            entry(d, 1, d),         // unrelated
            entry(e, 1, proot),     // orphan still in the session
            entry(me, 1, me),
        ];
        let mut pids: Vec<i32> = members(&sb, Some(proot), &table)
            .iter()
            .map(|p| p.pid)
            .collect();
        pids.sort_unstable();
        assert_eq!(pids, [a, b, c, e]);
        // Without PRoot, only programs from the sandbox count.
        assert!(members(&sb, None, &table).is_empty());
    }

    #[test]
    fn loaders_are_recognised() {
        assert!(is_loader(Path::new("/tmp/prooted-123-abcdef")));
        assert!(!is_loader(Path::new("prooted-1-x")));
        assert!(!is_loader(Path::new("/usr/bin/proot")));
    }
}
