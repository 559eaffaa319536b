//! Killing a whole process tree: the process group, the session and every
//! descendant found through `/proc/*/stat` parent links.

use std::collections::{HashMap, HashSet};
use std::fs;

/// One process as seen in `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub session: i32,
}

/// Parse the interesting fields of a `/proc/<pid>/stat` line. The command
/// name is in parentheses and may itself contain spaces and parentheses, so
/// parsing starts after the last `)`.
pub fn parse_stat(pid: i32, stat: &str) -> Option<ProcInfo> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let _state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let _pgrp: i32 = fields.next()?.parse().ok()?;
    let session = fields.next()?.parse().ok()?;
    Some(ProcInfo { pid, ppid, session })
}

/// Every process currently visible in `/proc`.
pub fn scan() -> Vec<ProcInfo> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(info) = parse_stat(pid, &stat) {
            out.push(info);
        }
    }
    out
}

/// The pids to kill for the tree rooted at `roots`: every process in a session
/// led by a root, and every descendant of a root (by parent links).
pub fn tree_members(procs: &[ProcInfo], roots: &HashSet<i32>) -> HashSet<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut found: HashSet<i32> = procs
        .iter()
        .filter(|p| roots.contains(&p.session))
        .map(|p| p.pid)
        .collect();
    let mut stack: Vec<i32> = roots.iter().copied().collect();
    let mut seen: HashSet<i32> = HashSet::new();
    while let Some(pid) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        if let Some(kids) = children.get(&pid) {
            for &k in kids {
                found.insert(k);
                stack.push(k);
            }
        }
    }
    found
}

/// SIGKILL the process group `root`, the session `root` leads and all of
/// `root`'s descendants.
///
/// The tree is frozen first (SIGSTOP) so no process dies and gets
/// reparented, or forks, while the descendant set is collected; only then is
/// everything killed.
pub fn kill_tree(root: i32) {
    if root <= 1 {
        return;
    }
    let me = std::process::id() as i32;
    let signal = |pid: i32, sig: i32| {
        if pid > 1 && pid != me {
            // SAFETY: kill(2) on a pid we just saw in the tree.
            unsafe { libc::kill(pid, sig) };
        }
    };
    // SAFETY: kill(2) with a negative pid signals a process group.
    unsafe { libc::kill(-root, libc::SIGSTOP) };
    let mut members: HashSet<i32> = HashSet::from([root]);
    for _ in 0..4 {
        let fresh: Vec<i32> = tree_members(&scan(), &members)
            .into_iter()
            .filter(|p| !members.contains(p))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for pid in fresh {
            signal(pid, libc::SIGSTOP);
            members.insert(pid);
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(-root, libc::SIGKILL) };
    for &pid in &members {
        signal(pid, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines() {
        let s = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 0 0";
        assert_eq!(
            parse_stat(1234, s),
            Some(ProcInfo {
                pid: 1234,
                ppid: 1,
                session: 1234
            })
        );
        assert_eq!(parse_stat(1, "garbage"), None);
    }

    #[test]
    fn finds_descendants_and_session_members() {
        let p = |pid, ppid, session| ProcInfo { pid, ppid, session };
        let procs = vec![
            p(10, 1, 10),
            p(11, 10, 10),
            p(12, 11, 12), // setsid'd grandchild: found through parent links
            p(13, 1, 10),  // orphan reparented to init, same session
            p(20, 1, 20),  // unrelated
            p(21, 12, 21),
        ];
        let got = tree_members(&procs, &HashSet::from([10]));
        assert_eq!(got, HashSet::from([10, 11, 12, 13, 21]));
    }
}
