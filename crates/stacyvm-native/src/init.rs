//! The sandbox init: a short-lived, single-threaded helper process that turns
//! itself into a sandbox.
//!
//! The provider starts it as a fresh executable (never as a `pre_exec` of
//! the multithreaded server) with:
//!
//! * fd 0: a pipe carrying two JSON lines, a [`Prelude`] and an
//!   [`InitConfig`] (the second may come much later: a pre-started sandbox
//!   waits for it);
//! * fd 1: the status pipe the provider reads;
//! * fd 2: the sandbox's log file (the agent's stdout and stderr).
//!
//! The helper reads the prelude, joins the sandbox's cgroups, unshares the
//! mount, UTS, IPC, network, cgroup and PID namespaces (and a user namespace
//! when not root), and forks. The child is PID 1 of the new PID namespace;
//! it reads the configuration line and carries on. The helper writes
//! `pid <host pid>` to the status pipe and exits at once, so the child is
//! re-parented to the host's init (or the nearest subreaper) and costs
//! nothing extra per sandbox. The child builds the root filesystem, switches
//! into it with `pivot_root`, drops capabilities, sets `no_new_privs`,
//! installs the seccomp filter and `execve`s the agent. Any failure is
//! written as `error <message>` to the status pipe; a successful `execve`
//! closes the pipe (it is close-on-exec), which the provider reads as "the
//! agent is running".

use crate::config::{CgroupView, InitConfig, InitMode, Prelude};
use crate::{caps, seccomp, sys};
use stacyvm_agent_proto::{AGENT_PATH_IN_SANDBOX, RUN_DIR_IN_SANDBOX};
use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Longest overlay option string passed to `mount(2)` in one page.
const MAX_MOUNT_DATA: usize = 4000;

/// Device nodes bind-mounted from the host into the sandbox's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Files and directories hidden inside the sandbox (as Docker does).
const MASKED: &[&str] = &[
    "proc/acpi",
    "proc/asound",
    "proc/interrupts",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];

/// Paths made read-only inside the sandbox (as Docker does).
const READ_ONLY: &[&str] = &[
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];

/// An init step that failed, as told to the provider.
#[derive(Debug)]
struct InitError(String);

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, InitError>;

/// Attach what was being done to an I/O error.
trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| InitError(format!("{}: {e}", what())))
    }
}

/// Entry point of the sandbox init. Call it first thing in `main` (before
/// any thread or async runtime starts) when the process was started as the
/// provider's `init_exe init_args…`. Never returns.
pub fn sandbox_init_main() -> ! {
    // Keep the status pipe on a close-on-exec descriptor; fd 1 becomes the
    // log file below.
    let status = match sys::dup_cloexec(1, 3) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = writeln!(io::stderr(), "stacyvm sandbox init: no status pipe: {e}");
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(120) }
        }
    };
    // Nothing else the starting process left open may reach the sandbox.
    let n = status.as_raw_fd() as u32;
    let closed =
        sys::close_range(3, n.saturating_sub(1)).and_then(|()| sys::close_range(n + 1, u32::MAX));
    if let Err(e) = closed {
        report_error(
            status.as_raw_fd(),
            &InitError(format!("cannot close inherited descriptors: {e}")),
        );
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(1) }
    }
    let code = match helper(status.as_raw_fd()) {
        Ok(code) => code,
        Err(e) => {
            report_error(status.as_raw_fd(), &e);
            1
        }
    };
    // SAFETY: _exit has no preconditions; nothing needs flushing.
    unsafe { libc::_exit(code) }
}

/// Send `error <message>` (one line) to the provider.
fn report_error(status: RawFd, e: &InitError) {
    let msg = e.0.replace('\n', " ");
    let _ = sys::write_all(status, format!("error {msg}\n").as_bytes());
}

/// Reads newline-terminated lines from stdin without reading past what it
/// returns except into its own buffer, which a forked child inherits.
struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    fn next_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                return Ok(line);
            }
            let mut chunk = [0u8; 8192];
            match io::stdin().lock().read(&mut chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stdin closed before a full line",
                    ))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn helper(status: RawFd) -> Result<i32> {
    let mut input = LineReader { buf: Vec::new() };
    let line = input
        .next_line()
        .ctx(|| "cannot read the sandbox prelude from stdin".into())?;
    let prelude: Prelude = serde_json::from_slice(&line)
        .map_err(|e| InitError(format!("invalid sandbox prelude: {e}")))?;
    // stdout joins stderr in the log file.
    sys::dup2(2, 1).ctx(|| "cannot redirect stdout".into())?;

    let pid = std::process::id().to_string();
    for procs in &prelude.cgroup_procs {
        fs::write(procs, &pid).ctx(|| format!("cannot join cgroup {}", procs.display()))?;
    }

    let mut flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWPID;
    if prelude.user_namespace.is_some() {
        flags |= libc::CLONE_NEWUSER;
    }
    sys::unshare(flags).ctx(|| {
        "cannot create namespaces (the init must be single-threaded and privileged)".into()
    })?;
    if let Some((uid, gid)) = prelude.user_namespace {
        fs::write("/proc/self/setgroups", "deny").ctx(|| "cannot write setgroups".into())?;
        fs::write("/proc/self/uid_map", format!("0 {uid} 1"))
            .ctx(|| "cannot write uid_map".into())?;
        fs::write("/proc/self/gid_map", format!("0 {gid} 1"))
            .ctx(|| "cannot write gid_map".into())?;
    }

    // SAFETY: this process is single-threaded, so the child may do anything.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(InitError(format!(
            "cannot fork the sandbox's PID 1: {}",
            io::Error::last_os_error()
        )));
    }
    if child == 0 {
        let e = match pid1_main(&mut input, &prelude, status) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        report_error(status, &e);
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(1) }
    }
    sys::write_all(status, format!("pid {child}\n").as_bytes())
        .ctx(|| "cannot report the sandbox pid".into())?;
    Ok(0)
}

/// PID 1 of the new namespaces: wait for the configuration, then build the
/// sandbox (or run the probe).
fn pid1_main(
    input: &mut LineReader,
    prelude: &Prelude,
    status: RawFd,
) -> Result<std::convert::Infallible> {
    let line = input
        .next_line()
        .ctx(|| "cannot read the sandbox configuration from stdin".into())?;
    let cfg: InitConfig = serde_json::from_slice(&line)
        .map_err(|e| InitError(format!("invalid sandbox configuration: {e}")))?;
    // stdin becomes /dev/null for the agent.
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .ctx(|| "cannot open /dev/null".into())?;
    sys::dup2(null.as_raw_fd(), 0).ctx(|| "cannot redirect stdin".into())?;
    drop(null);
    sandbox_pid1(&cfg, prelude.user_namespace.is_some(), status)
}

/// Everything PID 1 does before it becomes the agent.
fn sandbox_pid1(
    cfg: &InitConfig,
    rootless: bool,
    status: RawFd,
) -> Result<std::convert::Infallible> {
    // Its own session: signals for the server's terminal must not reach it.
    // SAFETY: no preconditions.
    unsafe { libc::setsid() };
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .ctx(|| "cannot make the mount namespace private".into())?;

    let root = cfg.rootfs.as_path();
    if cfg.mode == InitMode::Sandbox {
        prepare_upper(&cfg.upper)?;
    }
    mount_overlay(cfg, rootless)?;
    for (dir, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
    ] {
        ensure_dir(root, dir, mode)?;
    }
    let nsx = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sys::mount(
        Some(Path::new("proc")),
        &root.join("proc"),
        Some("proc"),
        nsx,
        None,
    )
    .ctx(|| "cannot mount /proc".into())?;
    sys::mount(
        Some(Path::new("sysfs")),
        &root.join("sys"),
        Some("sysfs"),
        nsx | libc::MS_RDONLY,
        None,
    )
    .ctx(|| "cannot mount /sys".into())?;
    if !rootless {
        mount_cgroups(root, &cfg.cgroup_view)?;
    }
    setup_dev(root, rootless)?;
    mask_paths(root)?;
    if cfg.mode == InitMode::Sandbox {
        let agent = root.join(AGENT_PATH_IN_SANDBOX.trim_start_matches('/'));
        bind(
            &cfg.agent_binary,
            &agent,
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        )
        .ctx(|| format!("cannot mount the agent {}", cfg.agent_binary.display()))?;
        let run = root.join(RUN_DIR_IN_SANDBOX.trim_start_matches('/'));
        bind(&cfg.run_dir, &run, nsx)
            .ctx(|| format!("cannot mount the run directory {}", cfg.run_dir.display()))?;
        write_etc(root, &cfg.hostname)?;
    }
    sys::sethostname(&cfg.hostname).ctx(|| "cannot set the hostname".into())?;
    loopback_up().ctx(|| "cannot bring up lo".into())?;
    // The server may run with a protective score; sandboxes must not.
    // Best effort: failing to lower a raised score is not fatal.
    let _ = fs::write("/proc/self/oom_score_adj", "0");

    sys::chdir(root).ctx(|| format!("cannot enter {}", root.display()))?;
    sys::pivot_root(Path::new("."), Path::new(".")).ctx(|| "pivot_root failed".into())?;
    sys::umount2(Path::new("."), libc::MNT_DETACH)
        .ctx(|| "cannot detach the host's root".into())?;
    let wd = cfg
        .working_dir
        .as_deref()
        .filter(|w| w.starts_with('/') && Path::new(w).is_dir())
        .unwrap_or("/");
    sys::chdir(Path::new(wd)).ctx(|| format!("cannot enter {wd}"))?;

    if !rootless {
        // SAFETY: an empty list.
        if unsafe { libc::setgroups(0, std::ptr::null()) } < 0 {
            return Err(InitError(format!(
                "cannot clear supplementary groups: {}",
                io::Error::last_os_error()
            )));
        }
    }
    caps::drop_to_keep_set().map_err(|e| InitError(e.to_string()))?;
    reset_signals();
    sys::cloexec_from(3).ctx(|| "cannot mark descriptors close-on-exec".into())?;
    sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).ctx(|| "cannot set no_new_privs".into())?;
    seccomp::install().ctx(|| "cannot install the seccomp filter".into())?;

    if cfg.mode == InitMode::Probe {
        probe_checks()?;
        let _ = sys::write_all(status, b"ok\n");
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) }
    }
    exec_agent(&cfg.env)
}

/// Create the sandbox's own mount points in the upper layer before the
/// overlay is mounted: they hide whatever the image has at those paths.
fn prepare_upper(upper: &Path) -> Result<()> {
    let dir = upper.join(".stacyvm");
    let mut b = fs::DirBuilder::new();
    b.mode(0o755);
    for d in [dir.clone(), dir.join("run")] {
        match b.create(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx(|| format!("cannot create {}", d.display())),
        }
    }
    let agent = dir.join("stacyvm-agent");
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o755)
        .open(&agent)
        .ctx(|| format!("cannot create {}", agent.display()))?;
    Ok(())
}

/// The overlay's option string, and the directory to run `mount` from when
/// the layers had to be given relative to it to fit in one page.
pub(crate) fn overlay_options(
    layers: &[PathBuf],
    upper: &Path,
    work: &Path,
    userxattr: bool,
) -> std::result::Result<(String, Option<PathBuf>), String> {
    if layers.is_empty() {
        return Err("the image has no layers".into());
    }
    for p in layers.iter().map(PathBuf::as_path).chain([upper, work]) {
        let s = p
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", p.display()))?;
        if s.contains([',', ':', '\\']) {
            return Err(format!(
                "overlay path {s:?} must not contain ',', ':' or '\\'"
            ));
        }
    }
    let tail = format!(
        ",upperdir={},workdir={}{}",
        upper.display(),
        work.display(),
        if userxattr { ",userxattr" } else { "" }
    );
    // overlayfs lists the top layer first.
    let join = |f: &dyn Fn(&Path) -> String| {
        layers
            .iter()
            .rev()
            .map(|l| f(l))
            .collect::<Vec<_>>()
            .join(":")
    };
    let full = format!("lowerdir={}{tail}", join(&|l| l.display().to_string()));
    if full.len() <= MAX_MOUNT_DATA {
        return Ok((full, None));
    }
    // Too long for one page: name the layers relative to their common parent.
    let mut common = layers[0]
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    while !layers.iter().all(|l| l.starts_with(&common)) {
        match common.parent() {
            Some(p) => common = p.to_path_buf(),
            None => break,
        }
    }
    let rel = format!(
        "lowerdir={}{tail}",
        join(&|l| l.strip_prefix(&common).unwrap_or(l).display().to_string())
    );
    if rel.len() > MAX_MOUNT_DATA {
        return Err(format!(
            "{} layers do not fit in one overlay mount ({} bytes of options)",
            layers.len(),
            rel.len()
        ));
    }
    Ok((rel, Some(common)))
}

fn mount_overlay(cfg: &InitConfig, rootless: bool) -> Result<()> {
    let (data, cwd) =
        overlay_options(&cfg.layers, &cfg.upper, &cfg.work, rootless).map_err(InitError)?;
    if let Some(dir) = &cwd {
        sys::chdir(dir).ctx(|| format!("cannot enter {}", dir.display()))?;
    }
    for l in &cfg.layers {
        if !l.is_dir() {
            return Err(InitError(format!(
                "image layer {} is not a directory",
                l.display()
            )));
        }
    }
    sys::mount(
        Some(Path::new("overlay")),
        &cfg.rootfs,
        Some("overlay"),
        0,
        Some(&data),
    )
    .ctx(|| format!("cannot mount the overlay root on {}", cfg.rootfs.display()))
}

/// Make sure `root/name` is a real directory (not a symlink an image could
/// point at the host), creating it when missing.
fn ensure_dir(root: &Path, name: &str, mode: u32) -> Result<()> {
    let p = root.join(name);
    match fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(InitError(format!(
            "the image has a non-directory at /{name}; cannot mount there"
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(mode)
                .create(&p)
                .ctx(|| format!("cannot create /{name}"))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .ctx(|| format!("cannot chmod /{name}"))
        }
        Err(e) => Err(e).ctx(|| format!("cannot stat /{name}")),
    }
}

/// Bind `src` on `dst`, then apply `flags` (read-only, nosuid, …) to it.
fn bind(src: &Path, dst: &Path, flags: libc::c_ulong) -> io::Result<()> {
    sys::mount(Some(src), dst, None, libc::MS_BIND, None)?;
    sys::mount(
        None,
        dst,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
    )
}

/// `/sys/fs/cgroup`, read-only, rooted at the sandbox's own cgroups.
fn mount_cgroups(root: &Path, view: &CgroupView) -> Result<()> {
    let target = root.join("sys/fs/cgroup");
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY;
    match view {
        CgroupView::None => Ok(()),
        CgroupView::Unified => sys::mount(
            Some(Path::new("cgroup2")),
            &target,
            Some("cgroup2"),
            flags,
            None,
        )
        .ctx(|| "cannot mount /sys/fs/cgroup".into()),
        CgroupView::Legacy {
            hierarchies,
            with_unified,
        } => {
            sys::mount(
                Some(Path::new("tmpfs")),
                &target,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some("mode=755,size=64k"),
            )
            .ctx(|| "cannot mount a tmpfs on /sys/fs/cgroup".into())?;
            for h in hierarchies {
                let dir = target.join(&h.name);
                fs::create_dir(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
                sys::mount(
                    Some(Path::new("cgroup")),
                    &dir,
                    Some("cgroup"),
                    flags,
                    Some(&h.options),
                )
                .ctx(|| format!("cannot mount cgroup {} in the sandbox", h.options))?;
                for alias in &h.aliases {
                    symlink(&h.name, target.join(alias))
                        .ctx(|| format!("cannot link /sys/fs/cgroup/{alias}"))?;
                }
            }
            if *with_unified {
                let dir = target.join("unified");
                fs::create_dir(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
                sys::mount(
                    Some(Path::new("cgroup2")),
                    &dir,
                    Some("cgroup2"),
                    flags,
                    None,
                )
                .ctx(|| "cannot mount cgroup2 in the sandbox".into())?;
            }
            sys::mount(
                None,
                &target,
                None,
                libc::MS_REMOUNT | flags,
                Some("mode=755,size=64k"),
            )
            .ctx(|| "cannot make /sys/fs/cgroup read-only".into())
        }
    }
}

/// A fresh `/dev`: a tmpfs with the usual harmless devices bind-mounted from
/// the host, a private devpts, `/dev/shm`, `/dev/mqueue` and the usual links.
fn setup_dev(root: &Path, rootless: bool) -> Result<()> {
    let dev = root.join("dev");
    sys::mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .ctx(|| "cannot mount a tmpfs on /dev".into())?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        let node = dev.join(name);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&node)
            .ctx(|| format!("cannot create /dev/{name}"))?;
        sys::mount(Some(&host), &node, None, libc::MS_BIND, None)
            .ctx(|| format!("cannot mount /dev/{name}"))?;
    }
    for (name, mode) in [("pts", 0o755), ("shm", 0o1777), ("mqueue", 0o1777)] {
        let d = dev.join(name);
        fs::DirBuilder::new()
            .mode(mode)
            .create(&d)
            .ctx(|| format!("cannot create /dev/{name}"))?;
    }
    let pts_opts = if rootless {
        "newinstance,ptmxmode=0666,mode=0620"
    } else {
        "newinstance,ptmxmode=0666,mode=0620,gid=5"
    };
    sys::mount(
        Some(Path::new("devpts")),
        &dev.join("pts"),
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(pts_opts),
    )
    .ctx(|| "cannot mount /dev/pts".into())?;
    sys::mount(
        Some(Path::new("shm")),
        &dev.join("shm"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .ctx(|| "cannot mount /dev/shm".into())?;
    sys::mount(
        Some(Path::new("mqueue")),
        &dev.join("mqueue"),
        Some("mqueue"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .ctx(|| "cannot mount /dev/mqueue".into())?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link)).ctx(|| format!("cannot link /dev/{link}"))?;
    }
    Ok(())
}

/// Hide what a sandbox must not read and make the rest of the kernel's
/// knobs read-only.
fn mask_paths(root: &Path) -> Result<()> {
    let null = root.join("dev/null");
    for rel in MASKED {
        let p = root.join(rel);
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            sys::mount(
                Some(Path::new("tmpfs")),
                &p,
                Some("tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some("size=0"),
            )
        } else {
            sys::mount(Some(&null), &p, None, libc::MS_BIND, None)
        }
        .ctx(|| format!("cannot mask /{rel}"))?;
    }
    for rel in READ_ONLY {
        let p = root.join(rel);
        if fs::symlink_metadata(&p).is_err() {
            continue;
        }
        sys::mount(Some(&p), &p, None, libc::MS_BIND | libc::MS_REC, None)
            .and_then(|_| {
                sys::mount(
                    None,
                    &p,
                    None,
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    None,
                )
            })
            .ctx(|| format!("cannot make /{rel} read-only"))?;
    }
    Ok(())
}

/// `/etc/hostname` and `/etc/hosts` naming the sandbox, written through the
/// overlay (never following a symlink of the image).
fn write_etc(root: &Path, hostname: &str) -> Result<()> {
    let etc = root.join("etc");
    match fs::symlink_metadata(&etc) {
        Ok(m) if m.is_dir() => {}
        // No /etc (or not a real one): nothing to write into.
        _ => return Ok(()),
    }
    let hosts = format!(
        "127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback {hostname}\n"
    );
    for (name, content) in [("hostname", format!("{hostname}\n")), ("hosts", hosts)] {
        let p = etc.join(name);
        if fs::symlink_metadata(&p).is_ok_and(|m| !m.is_file()) {
            // A symlink or something odd: replace it with a plain file.
            let _ = fs::remove_file(&p);
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .ctx(|| format!("cannot write /etc/{name}"))?;
        f.write_all(content.as_bytes())
            .ctx(|| format!("cannot write /etc/{name}"))?;
    }
    Ok(())
}

/// `struct ifreq` with the flags member.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Bring up `lo` in the (new) network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor owned here.
    let sock: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: `req` is a valid ifreq for these requests.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Default dispositions and an empty signal mask for the agent.
fn reset_signals() {
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: setting the default disposition; invalid numbers (the
        // libc-reserved real-time signals) fail harmlessly.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: valid, initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// What the probe checks after the filter is in place.
fn probe_checks() -> Result<()> {
    let denied = sys::mount(
        Some(Path::new("tmpfs")),
        Path::new("/tmp"),
        Some("tmpfs"),
        0,
        None,
    );
    match denied {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        other => {
            return Err(InitError(format!(
                "the seccomp filter did not refuse mount(2): {other:?}"
            )))
        }
    }
    if !Path::new("/proc/self/stat").exists() {
        return Err(InitError("/proc is not mounted in the probe".into()));
    }
    Ok(())
}

fn exec_agent(env: &[String]) -> Result<std::convert::Infallible> {
    let path = sys::cstr(AGENT_PATH_IN_SANDBOX).ctx(|| "bad agent path".into())?;
    let envs: Vec<CString> = env
        .iter()
        .filter_map(|e| CString::new(e.as_bytes()).ok())
        .collect();
    let mut envp: Vec<*const libc::c_char> = envs.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let argv = [path.as_ptr(), std::ptr::null()];
    // SAFETY: NUL-terminated argv and envp arrays of valid C strings.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    let e = io::Error::last_os_error();
    Err(InitError(format!(
        "cannot execute the agent at {AGENT_PATH_IN_SANDBOX}: {e}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_lists_the_top_layer_first() {
        let layers = vec![PathBuf::from("/l/base"), PathBuf::from("/l/top")];
        let (opts, cwd) =
            overlay_options(&layers, Path::new("/s/upper"), Path::new("/s/work"), false).unwrap();
        assert_eq!(
            opts,
            "lowerdir=/l/top:/l/base,upperdir=/s/upper,workdir=/s/work"
        );
        assert!(cwd.is_none());
    }

    #[test]
    fn long_layer_lists_become_relative() {
        let layers: Vec<PathBuf> = (0..50)
            .map(|i| PathBuf::from(format!("/var/lib/stacyvm/images/layers/{i:064x}/fs")))
            .collect();
        let (opts, cwd) =
            overlay_options(&layers, Path::new("/s/upper"), Path::new("/s/work"), true).unwrap();
        assert_eq!(
            cwd.as_deref(),
            Some(Path::new("/var/lib/stacyvm/images/layers"))
        );
        assert!(opts.len() <= MAX_MOUNT_DATA);
        assert!(opts.starts_with(&format!("lowerdir={:064x}/fs:", 49)));
        assert!(opts.ends_with(",userxattr"));
    }

    #[test]
    fn bad_overlay_paths_are_refused() {
        let bad = vec![PathBuf::from("/l/a,b")];
        assert!(overlay_options(&bad, Path::new("/u"), Path::new("/w"), false).is_err());
        assert!(overlay_options(&[], Path::new("/u"), Path::new("/w"), false).is_err());
    }
}
