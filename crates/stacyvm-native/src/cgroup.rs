//! Control groups of the sandboxes, on cgroup v2, v1 and hybrid hosts.
//!
//! Every sandbox gets `stacyvm/<instance>/<sandbox id>` below the root of each
//! hierarchy it uses, the way Docker's cgroupfs driver uses `docker/<id>`:
//!
//! * **v2** (`cgroup2` with the `memory`, `cpu` and `pids` controllers): one
//!   directory; `memory.max`, `memory.swap.max = 0`, `cpu.max`, `pids.max`.
//! * **v1** (legacy, or hybrid with a controller-less v2 tree at
//!   `/sys/fs/cgroup/unified`): one directory per hierarchy among `memory`,
//!   `cpu`, `cpuacct` and `pids`; `memory.limit_in_bytes` and
//!   `memory.memsw.limit_in_bytes` (no swap), `cpu.cfs_quota_us`, `pids.max`.
//!   On hybrid hosts the sandbox also gets a directory in the v2 tree, which
//!   tracks its processes and offers `cgroup.kill`.
//!
//! Killing prefers `cgroup.kill` (v2, Linux ≥ 5.14); otherwise every process
//! listed in `cgroup.procs` is signalled through a pidfd after checking it
//! still belongs to the sandbox.

use crate::config::{CgroupMount, CgroupView};
use crate::sys;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Top-level directory of StacyVM's cgroups in every hierarchy.
pub const TOP: &str = "stacyvm";
/// CFS period used for the CPU quota, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Controllers the sandboxes need.
const REQUIRED: [&str; 3] = ["memory", "cpu", "pids"];
/// Controllers of v1 hierarchies the sandboxes join.
const JOINED_V1: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];
/// Names that can appear in a v1 mount's options and are controllers.
const V1_CONTROLLERS: [&str; 14] = [
    "cpuset",
    "cpu",
    "cpuacct",
    "blkio",
    "io",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "perf_event",
    "net_prio",
    "hugetlb",
    "pids",
    "rdma",
];

/// A cgroup operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {op} {}: {source}", path.display())]
pub struct CgroupError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn err(op: &'static str, path: &Path, source: io::Error) -> CgroupError {
    CgroupError {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One mounted v1 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Hierarchy {
    /// Where it is mounted on the host (e.g. `/sys/fs/cgroup/memory`).
    pub mount: PathBuf,
    /// Its controllers (e.g. `["cpu", "cpuacct"]`).
    pub controllers: Vec<String>,
}

/// How the host's cgroups are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v2 with the needed controllers at `mount`.
    Unified { mount: PathBuf },
    /// cgroup v1 hierarchies, plus the v2 tree of a hybrid host.
    Legacy {
        hierarchies: Vec<V1Hierarchy>,
        unified: Option<PathBuf>,
    },
}

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpu_quota_us: u64,
    pub pids_max: u64,
}

/// What kind of directory a sandbox cgroup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirKind {
    /// v2 with controllers.
    V2,
    /// v2 without controllers (process tracking and `cgroup.kill` only).
    V2Tracking,
    /// A v1 hierarchy.
    V1,
}

/// A line of `/proc/self/mountinfo` that mounts a cgroup filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMountInfo {
    mount_point: PathBuf,
    fstype: String,
    super_options: String,
}

/// Undo the octal escapes (`\040` for a space…) of mountinfo fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok());
            if let Some(v) = oct {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMountInfo> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let fstype = right[0];
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        out.push(CgroupMountInfo {
            mount_point: PathBuf::from(unescape(left[4])),
            fstype: fstype.to_string(),
            super_options: right[2].to_string(),
        });
    }
    out
}

impl Layout {
    /// Read the layout from `/proc/self/mountinfo`.
    pub fn detect() -> Result<Layout, String> {
        let text = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        Self::from_mounts(&parse_mountinfo(&text), |p| {
            fs::read_to_string(p.join("cgroup.controllers")).ok()
        })
    }

    fn from_mounts(
        mounts: &[CgroupMountInfo],
        controllers_of: impl Fn(&Path) -> Option<String>,
    ) -> Result<Layout, String> {
        let mut v2: Option<(PathBuf, Vec<String>)> = None;
        let mut v1: Vec<V1Hierarchy> = Vec::new();
        for m in mounts {
            if m.fstype == "cgroup2" {
                if v2.is_none() {
                    let ctrls = controllers_of(&m.mount_point)
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(str::to_string)
                        .collect();
                    v2 = Some((m.mount_point.clone(), ctrls));
                }
                continue;
            }
            let controllers: Vec<String> = m
                .super_options
                .split(',')
                .filter(|o| V1_CONTROLLERS.contains(o))
                .map(str::to_string)
                .collect();
            if controllers.is_empty() || v1.iter().any(|h| h.controllers == controllers) {
                continue;
            }
            v1.push(V1Hierarchy {
                mount: m.mount_point.clone(),
                controllers,
            });
        }
        if let Some((mount, ctrls)) = &v2 {
            if REQUIRED.iter().all(|c| ctrls.iter().any(|x| x == c)) {
                return Ok(Layout::Unified {
                    mount: mount.clone(),
                });
            }
        }
        let missing: Vec<&str> = REQUIRED
            .iter()
            .copied()
            .filter(|c| {
                !v1.iter().any(|h| h.controllers.iter().any(|x| x == c))
                    && !v2.as_ref().is_some_and(|(_, v)| v.iter().any(|x| x == c))
            })
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "cgroup controllers {} are not available (cgroup2 at {}; {} v1 hierarchies)",
                missing.join(", "),
                v2.as_ref()
                    .map_or("none".to_string(), |(m, _)| m.display().to_string()),
                v1.len()
            ));
        }
        let hierarchies = v1
            .into_iter()
            .filter(|h| {
                h.controllers
                    .iter()
                    .any(|c| JOINED_V1.contains(&c.as_str()))
            })
            .collect();
        Ok(Layout::Legacy {
            hierarchies,
            unified: v2.map(|(m, _)| m),
        })
    }

    /// Short description for logs and errors.
    pub fn describe(&self) -> String {
        match self {
            Layout::Unified { mount } => format!("cgroup v2 at {}", mount.display()),
            Layout::Legacy {
                hierarchies,
                unified,
            } => {
                let names: Vec<String> = hierarchies
                    .iter()
                    .map(|h| h.controllers.join(","))
                    .collect();
                match unified {
                    Some(u) => format!(
                        "cgroup v1 ({}) with the v2 tree at {}",
                        names.join(" "),
                        u.display()
                    ),
                    None => format!("cgroup v1 ({})", names.join(" ")),
                }
            }
        }
    }

    /// Directories of one sandbox, with their kinds.
    fn dirs(&self, instance: &str, id: &str) -> Vec<(PathBuf, DirKind)> {
        let rel = Path::new(TOP).join(instance).join(id);
        match self {
            Layout::Unified { mount } => vec![(mount.join(&rel), DirKind::V2)],
            Layout::Legacy {
                hierarchies,
                unified,
            } => {
                let mut v: Vec<(PathBuf, DirKind)> = hierarchies
                    .iter()
                    .map(|h| (h.mount.join(&rel), DirKind::V1))
                    .collect();
                if let Some(u) = unified {
                    v.push((u.join(&rel), DirKind::V2Tracking));
                }
                v
            }
        }
    }

    /// Paths of the sandbox's directories (one per hierarchy).
    pub fn sandbox_dirs(&self, instance: &str, id: &str) -> Vec<PathBuf> {
        self.dirs(instance, id)
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    /// The `cgroup.procs` files a process writes itself into to join the
    /// sandbox.
    pub fn procs_files(&self, instance: &str, id: &str) -> Vec<PathBuf> {
        self.sandbox_dirs(instance, id)
            .into_iter()
            .map(|p| p.join("cgroup.procs"))
            .collect()
    }

    /// How the cgroup filesystem is shown inside the sandbox.
    pub fn view(&self) -> CgroupView {
        match self {
            Layout::Unified { .. } => CgroupView::Unified,
            Layout::Legacy {
                hierarchies,
                unified,
            } => CgroupView::Legacy {
                hierarchies: hierarchies
                    .iter()
                    .map(|h| {
                        let options = h.controllers.join(",");
                        let name = h
                            .mount
                            .file_name()
                            .and_then(|n| n.to_str())
                            .filter(|n| !n.is_empty() && !n.contains('/'))
                            .unwrap_or(&options)
                            .to_string();
                        let aliases = h
                            .controllers
                            .iter()
                            .filter(|c| **c != name)
                            .cloned()
                            .collect();
                        CgroupMount {
                            name,
                            options,
                            aliases,
                        }
                    })
                    .collect(),
                with_unified: unified.is_some(),
            },
        }
    }

    /// Create the sandbox's cgroups and set its limits. Parents are created
    /// as needed; on failure nothing of the sandbox's own is left behind.
    pub fn create(&self, instance: &str, id: &str, limits: &Limits) -> Result<(), CgroupError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_create(instance, id, limits) {
                Ok(()) => return Ok(()),
                // A concurrent destroy may remove an empty parent between our
                // mkdir calls: start over.
                Err(e) if e.source.kind() == io::ErrorKind::NotFound && attempt < 5 => {
                    self.remove_dirs(instance, id);
                }
                Err(e) => {
                    self.remove_dirs(instance, id);
                    return Err(e);
                }
            }
        }
    }

    fn try_create(&self, instance: &str, id: &str, limits: &Limits) -> Result<(), CgroupError> {
        for (dir, kind) in self.dirs(instance, id) {
            let instance_dir = dir.parent().unwrap_or(&dir).to_path_buf();
            let top = instance_dir.parent().unwrap_or(&instance_dir).to_path_buf();
            let root = top.parent().unwrap_or(&top).to_path_buf();
            if kind == DirKind::V2 {
                enable_controllers(&root)?;
            }
            for d in [&top, &instance_dir] {
                mkdir_exist_ok(d)?;
                if kind == DirKind::V2 {
                    enable_controllers(d)?;
                }
            }
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // Left over by a crash: reuse it only if it is empty.
                    if !procs(&dir).map_err(|e| err("read", &dir, e))?.is_empty() {
                        return Err(err(
                            "create",
                            &dir,
                            io::Error::new(
                                io::ErrorKind::AlreadyExists,
                                "exists and has processes",
                            ),
                        ));
                    }
                }
                Err(e) => return Err(err("create", &dir, e)),
            }
            match kind {
                DirKind::V2 => set_v2_limits(&dir, limits)?,
                DirKind::V1 => set_v1_limits(&dir, limits)?,
                DirKind::V2Tracking => {}
            }
        }
        Ok(())
    }

    /// (Re)write the limits of existing sandbox cgroups.
    pub fn set_limits(&self, instance: &str, id: &str, limits: &Limits) -> Result<(), CgroupError> {
        for (dir, kind) in self.dirs(instance, id) {
            match kind {
                DirKind::V2 => set_v2_limits(&dir, limits)?,
                DirKind::V1 => set_v1_limits(&dir, limits)?,
                DirKind::V2Tracking => {}
            }
        }
        Ok(())
    }

    /// Names of the cgroups that exist under `stacyvm/<instance>/` (in the
    /// first hierarchy).
    pub fn leaves(&self, instance: &str) -> Vec<String> {
        let Some((first, _)) = self.dirs(instance, "x").into_iter().next() else {
            return Vec::new();
        };
        let Some(parent) = first.parent() else {
            return Vec::new();
        };
        fs::read_dir(parent)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether any process is in the sandbox's cgroups.
    pub fn populated(&self, instance: &str, id: &str) -> bool {
        self.sandbox_dirs(instance, id)
            .iter()
            .any(|d| procs(d).is_ok_and(|p| !p.is_empty()))
    }

    /// Kill every process of the sandbox and wait until its cgroups are
    /// empty, at most `timeout`. `pid1` (an already verified pidfd of the
    /// sandbox's PID 1) is killed first when given: that ends its PID
    /// namespace, and with it every process of the sandbox.
    pub fn kill_all(
        &self,
        instance: &str,
        id: &str,
        pid1: Option<&std::os::fd::OwnedFd>,
        timeout: Duration,
    ) -> Result<(), CgroupError> {
        let dirs = self.dirs(instance, id);
        let suffix = member_suffix(instance, id);
        let deadline = Instant::now() + timeout;
        let mut used_kill_file = false;
        for (dir, kind) in &dirs {
            if matches!(kind, DirKind::V2 | DirKind::V2Tracking) {
                let kill = dir.join("cgroup.kill");
                match fs::write(&kill, "1") {
                    Ok(()) => used_kill_file = true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::debug!(path = %kill.display(), error = %e, "cgroup.kill failed")
                    }
                }
            }
        }
        if let Some(fd) = pid1 {
            let _ = sys::pidfd_send_signal(fd, libc::SIGKILL);
        }
        let mut delay = Duration::from_micros(200);
        loop {
            let mut alive = false;
            for (dir, _) in &dirs {
                let pids = match procs(dir) {
                    Ok(p) => p,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(err("read", dir, e)),
                };
                if pids.is_empty() {
                    continue;
                }
                alive = true;
                if !used_kill_file || delay >= Duration::from_millis(5) {
                    for pid in pids {
                        kill_member(pid, &suffix);
                    }
                }
            }
            if !alive {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let dir = dirs.first().map(|(d, _)| d.clone()).unwrap_or_default();
                return Err(err(
                    "empty",
                    &dir,
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("processes still alive after {} ms", timeout.as_millis()),
                    ),
                ));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(10));
        }
    }

    /// Remove the sandbox's (empty) cgroups, and the instance and top
    /// directories when nothing else uses them. Errors are logged.
    pub fn remove_dirs(&self, instance: &str, id: &str) -> bool {
        let mut ok = true;
        for (dir, _) in self.dirs(instance, id) {
            let mut tries = 0;
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // The last exiting task may still be on its way out.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 50 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => {
                        tracing::warn!(path = %dir.display(), error = %e, "cannot remove cgroup");
                        ok = false;
                        break;
                    }
                }
            }
            // Best effort: fails harmlessly while other sandboxes use them.
            if let Some(instance_dir) = dir.parent() {
                if fs::remove_dir(instance_dir).is_ok() {
                    if let Some(top) = instance_dir.parent() {
                        let _ = fs::remove_dir(top);
                    }
                }
            }
        }
        ok
    }

    /// Whether any of the sandbox's cgroup directories exists.
    pub fn any_exists(&self, instance: &str, id: &str) -> bool {
        self.sandbox_dirs(instance, id).iter().any(|d| d.exists())
    }

    /// Create and remove a scratch cgroup with limits, to check that this
    /// process may manage cgroups.
    pub fn check_writable(&self, instance: &str) -> Result<(), CgroupError> {
        let id = format!(".probe-{}", std::process::id());
        let limits = Limits {
            memory_bytes: 64 << 20,
            cpu_quota_us: CPU_PERIOD_US,
            pids_max: 16,
        };
        let r = self.create(instance, &id, &limits);
        self.remove_dirs(instance, &id);
        r
    }
}

/// The tail every `/proc/<pid>/cgroup` path of a sandbox member ends with.
pub fn member_suffix(instance: &str, id: &str) -> String {
    format!("/{TOP}/{instance}/{id}")
}

/// Whether `pid` is in one of the sandbox's cgroups.
pub fn is_member(pid: i32, suffix: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|t| {
        t.lines().any(|l| {
            l.rsplit_once(':')
                .is_some_and(|(_, p)| p == suffix || p.ends_with(suffix))
        })
    })
}

/// SIGKILL `pid` if it still belongs to the sandbox (checked through a pidfd
/// so a recycled pid is never hit).
fn kill_member(pid: i32, suffix: &str) {
    let Ok(fd) = sys::pidfd_open(pid) else {
        return;
    };
    if is_member(pid, suffix) {
        let _ = sys::pidfd_send_signal(&fd, libc::SIGKILL);
    }
}

fn procs(dir: &Path) -> io::Result<Vec<i32>> {
    let text = fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(text
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect())
}

fn mkdir_exist_ok(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err("create", dir, e)),
    }
}

/// Make sure `dir`'s children get the required v2 controllers.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&file).map_err(|e| err("read", &file, e))?;
    let missing: Vec<String> = REQUIRED
        .iter()
        .filter(|c| !current.split_whitespace().any(|x| x == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    fs::write(&file, missing.join(" ")).map_err(|e| err("enable controllers in", &file, e))
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(|e| err("write", &path, e))
}

fn set_v2_limits(dir: &Path, l: &Limits) -> Result<(), CgroupError> {
    write(dir, "memory.max", &l.memory_bytes.to_string())?;
    // Absent when the kernel has no swap accounting: then there is no swap
    // to limit either.
    match write(dir, "memory.swap.max", "0") {
        Err(e) if e.source.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    write(
        dir,
        "cpu.max",
        &format!("{} {CPU_PERIOD_US}", l.cpu_quota_us),
    )?;
    write(dir, "pids.max", &l.pids_max.to_string())
}

fn set_v1_limits(dir: &Path, l: &Limits) -> Result<(), CgroupError> {
    if dir.join("memory.limit_in_bytes").exists() {
        let bytes = l.memory_bytes.to_string();
        if dir.join("memory.memsw.limit_in_bytes").exists() {
            // memory+swap may never be below memory: raise it first when
            // growing, lower it last when shrinking.
            let current = fs::read_to_string(dir.join("memory.memsw.limit_in_bytes"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            if l.memory_bytes > current {
                write(dir, "memory.memsw.limit_in_bytes", &bytes)?;
                write(dir, "memory.limit_in_bytes", &bytes)?;
            } else {
                write(dir, "memory.limit_in_bytes", &bytes)?;
                write(dir, "memory.memsw.limit_in_bytes", &bytes)?;
            }
        } else {
            write(dir, "memory.limit_in_bytes", &bytes)?;
            write(dir, "memory.swappiness", "0")?;
        }
    }
    if dir.join("cpu.cfs_quota_us").exists() {
        write(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
        write(dir, "cpu.cfs_quota_us", &l.cpu_quota_us.to_string())?;
    }
    if dir.join("pids.max").exists() {
        write(dir, "pids.max", &l.pids_max.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:29 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:31 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
37 31 0:32 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
38 31 0:33 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const PURE_V2: &str = "\
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    const COMBINED_V1: &str = "\
32 31 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:31 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
";

    #[test]
    fn hybrid_hosts_use_v1_controllers_and_the_v2_tree() {
        let l = Layout::from_mounts(&parse_mountinfo(HYBRID), |_| Some(String::new())).unwrap();
        let Layout::Legacy {
            hierarchies,
            unified,
        } = &l
        else {
            panic!("{l:?}");
        };
        let names: Vec<String> = hierarchies
            .iter()
            .map(|h| h.controllers.join(","))
            .collect();
        assert_eq!(names, ["cpu", "cpuacct", "memory", "pids"]);
        assert_eq!(
            unified.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            l.sandbox_dirs("i1", "sb_x").last().unwrap(),
            Path::new("/sys/fs/cgroup/unified/stacyvm/i1/sb_x")
        );
    }

    #[test]
    fn pure_v2_hosts_need_the_controllers() {
        let mounts = parse_mountinfo(PURE_V2);
        let l =
            Layout::from_mounts(&mounts, |_| Some("cpuset cpu io memory pids\n".into())).unwrap();
        assert_eq!(
            l,
            Layout::Unified {
                mount: "/sys/fs/cgroup".into()
            }
        );
        assert_eq!(l.view(), CgroupView::Unified);
        let e = Layout::from_mounts(&mounts, |_| Some("cpu io\n".into())).unwrap_err();
        assert!(e.contains("memory, pids"), "{e}");
    }

    #[test]
    fn combined_hierarchies_get_aliases() {
        let l = Layout::from_mounts(&parse_mountinfo(COMBINED_V1), |_| None).unwrap();
        let CgroupView::Legacy {
            hierarchies,
            with_unified,
        } = l.view()
        else {
            panic!();
        };
        assert!(!with_unified);
        assert_eq!(hierarchies[0].name, "cpu,cpuacct");
        assert_eq!(hierarchies[0].options, "cpu,cpuacct");
        assert_eq!(hierarchies[0].aliases, ["cpu", "cpuacct"]);
        assert_eq!(hierarchies[1].name, "memory");
        assert!(hierarchies[1].aliases.is_empty());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/trailing\\"), "/trailing\\");
    }
}
