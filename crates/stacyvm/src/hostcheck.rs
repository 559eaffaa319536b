//! Host readiness checks, shared by `stacyvm doctor` and `stacyvm certify`.
//!
//! Every check probes the real thing where it can: namespaces are created,
//! an overlay is mounted in a private mount namespace, a seccomp filter is
//! installed in a child, the Docker socket is asked for its version, and a
//! tiny guest is run under KVM to its `hlt` instead of only looking for
//! `/dev/kvm`.

use serde::Serialize;
use stacyvm_core::config::Config;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod kvm;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    Skip,
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skip => "skip",
        }
    }
}

/// One host check and what it found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// Stable id, e.g. `host.cgroups`, `docker.socket`.
    pub id: String,
    pub status: Status,
    /// What was found (versions, paths, the error).
    pub detail: String,
}

fn check(id: &str, status: Status, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        id: id.to_string(),
        status,
        detail: detail.into(),
    }
}

/// A probe's result as a check: `ok` when it succeeded, its error if not.
fn probe(id: &str, res: Result<String, String>, ok: &str) -> CheckResult {
    match res {
        Ok(_) => check(id, Status::Pass, ok),
        Err(e) => check(id, Status::Fail, e),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Run a command with a deadline; `Ok(stdout)` when it exits 0, else the
/// reason (exit status and stderr).
fn run(program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} did not finish within {timeout:?}"));
            }
            Err(e) => return Err(format!("{program}: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("{program} failed ({}): {}", out.status, err.trim()))
    }
}

const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- host --

fn kernel() -> CheckResult {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if release.is_empty() {
        return check(
            "host.kernel",
            Status::Fail,
            "cannot read the kernel release",
        );
    }
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if (major, minor) < (5, 4) {
        check(
            "host.kernel",
            Status::Warn,
            format!("Linux {release}: older than 5.4, untested"),
        )
    } else {
        check("host.kernel", Status::Pass, format!("Linux {release}"))
    }
}

/// The cgroup layout (as recorded in certifications) and the controllers
/// available to sandboxes.
pub fn cgroup_layout() -> (&'static str, Vec<String>) {
    use stacyvm_core::certification::CgroupVersion;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let version = CgroupVersion::from_mountinfo(&mountinfo);
    let read = |p: &str| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let mut controllers: Vec<String> = Vec::new();
    if version == CgroupVersion::V2 {
        controllers = read("/sys/fs/cgroup/cgroup.controllers");
    } else {
        for c in ["memory", "cpu", "pids", "cpuset", "freezer"] {
            if Path::new("/sys/fs/cgroup").join(c).is_dir() {
                controllers.push(c.to_string());
            }
        }
        for c in read("/sys/fs/cgroup/unified/cgroup.controllers") {
            if !controllers.contains(&c) {
                controllers.push(c);
            }
        }
    }
    (version.as_str(), controllers)
}

fn cgroups() -> CheckResult {
    let (layout, controllers) = cgroup_layout();
    let missing: Vec<&str> = ["memory", "cpu", "pids"]
        .into_iter()
        .filter(|c| !controllers.iter().any(|x| x == c))
        .collect();
    let detail = format!("cgroup {layout}; controllers: {}", controllers.join(" "));
    if layout == "none" {
        check("host.cgroups", Status::Fail, "no cgroup filesystem mounted")
    } else if missing.is_empty() {
        check("host.cgroups", Status::Pass, detail)
    } else {
        check(
            "host.cgroups",
            Status::Fail,
            format!("{detail}; missing: {}", missing.join(" ")),
        )
    }
}

fn namespaces() -> CheckResult {
    let mut args = vec![
        "--mount", "--pid", "--net", "--uts", "--ipc", "--cgroup", "--fork",
    ];
    if !is_root() {
        args.extend(["--user", "--map-root-user"]);
    }
    args.push("true");
    probe(
        "host.namespaces",
        run("unshare", &args, T),
        "created mount, pid, net, uts, ipc and cgroup namespaces",
    )
}

fn user_namespaces() -> CheckResult {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    match run("unshare", &["--user", "--map-root-user", "true"], T) {
        Ok(_) => check(
            "host.userns",
            Status::Pass,
            format!("created a user namespace (max_user_namespaces {max})"),
        ),
        // Root does not need them; the native provider runs rootful.
        Err(e) if is_root() => check(
            "host.userns",
            Status::Warn,
            format!("{e}; only rootless operation needs user namespaces"),
        ),
        Err(e) => check("host.userns", Status::Fail, e),
    }
}

fn overlayfs() -> CheckResult {
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.lines().any(|l| l.trim_end().ends_with("overlay")) {
        // The module may still load on first mount; try anyway.
        tracing::debug!("overlay not in /proc/filesystems yet");
    }
    let dir = std::env::temp_dir().join(format!("stacyvm-doctor-ovl-{}", std::process::id()));
    let res = (|| -> Result<String, String> {
        for d in ["lower", "upper", "work", "merged"] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| e.to_string())?;
        }
        std::fs::write(dir.join("lower/probe"), b"x").map_err(|e| e.to_string())?;
        let d = dir.display();
        let script = format!(
            "mount -t overlay overlay -o lowerdir={d}/lower,upperdir={d}/upper,workdir={d}/work {d}/merged \
             && test -f {d}/merged/probe && echo ok > {d}/merged/new && test -f {d}/upper/new"
        );
        let mut args = vec!["--mount"];
        if !is_root() {
            args.extend(["--user", "--map-root-user"]);
        }
        args.extend(["sh", "-c", &script]);
        run("unshare", &args, T)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    probe(
        "host.overlayfs",
        res,
        "mounted an overlay in a private mount namespace and wrote through it",
    )
}

fn seccomp() -> CheckResult {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !status.lines().any(|l| l.starts_with("Seccomp:")) {
        return check(
            "host.seccomp",
            Status::Fail,
            "the kernel has no seccomp support",
        );
    }
    // One instruction: allow everything. Installing it proves filter mode.
    let filter = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ALLOW,
    }];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    let prog_addr = &prog as *const libc::sock_fprog as usize;
    let mut cmd = Command::new("true");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure only calls async-signal-safe prctl/syscall with
    // pointers to data that outlives the spawn (prog and filter live on
    // this stack frame until `status()` returns).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                prog_addr as *const libc::sock_fprog,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    match cmd.status() {
        Ok(s) if s.success() => check(
            "host.seccomp",
            Status::Pass,
            "installed a seccomp filter in a child process",
        ),
        Ok(s) => check("host.seccomp", Status::Fail, format!("probe exited {s}")),
        Err(e) => check(
            "host.seccomp",
            Status::Fail,
            format!("cannot install a seccomp filter: {e}"),
        ),
    }
}

/// The nearest existing ancestor of `p` (for free-space and permission
/// checks of a data dir that does not exist yet).
fn existing_ancestor(p: &Path) -> PathBuf {
    let mut cur = p.to_path_buf();
    while !cur.exists() {
        match cur.parent() {
            Some(parent) => cur = parent.to_path_buf(),
            None => return PathBuf::from("/"),
        }
    }
    cur
}

fn disk(data_dir: &Path) -> CheckResult {
    let at = existing_ancestor(data_dir);
    let Ok(c) = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()) else {
        return check("host.disk", Status::Fail, "data dir path contains NUL");
    };
    // SAFETY: statvfs writes into the zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path, `st` is writable.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return check(
            "host.disk",
            Status::Fail,
            format!(
                "statvfs {}: {}",
                at.display(),
                std::io::Error::last_os_error()
            ),
        );
    }
    let free_gib = st.f_bavail as f64 * st.f_frsize as f64 / (1u64 << 30) as f64;
    let detail = format!("{free_gib:.1} GiB free at {}", at.display());
    if free_gib < 1.0 {
        check("host.disk", Status::Fail, detail)
    } else if free_gib < 5.0 {
        check("host.disk", Status::Warn, format!("{detail} (below 5 GiB)"))
    } else {
        check("host.disk", Status::Pass, detail)
    }
}

fn data_dir_perms(data_dir: &Path) -> CheckResult {
    let id = "host.data_dir";
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    match std::fs::metadata(data_dir) {
        Ok(m) if !m.is_dir() => check(
            id,
            Status::Fail,
            format!("{} exists and is not a directory", data_dir.display()),
        ),
        Ok(m) => {
            let mode = m.mode() & 0o7777;
            if m.uid() != uid {
                check(
                    id,
                    Status::Fail,
                    format!(
                        "{} belongs to uid {}, the server runs as uid {uid}",
                        data_dir.display(),
                        m.uid()
                    ),
                )
            } else if mode & 0o002 != 0 {
                check(
                    id,
                    Status::Fail,
                    format!(
                        "{} is world-writable (mode {mode:o}); use 0700 or 0755",
                        data_dir.display()
                    ),
                )
            } else if mode & 0o020 != 0 {
                check(
                    id,
                    Status::Warn,
                    format!("{} is group-writable (mode {mode:o})", data_dir.display()),
                )
            } else {
                check(
                    id,
                    Status::Pass,
                    format!("{} (mode {mode:o}, owner uid {uid})", data_dir.display()),
                )
            }
        }
        Err(_) => {
            let parent = existing_ancestor(data_dir);
            let Ok(c) = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes()) else {
                return check(id, Status::Fail, "path contains NUL");
            };
            // SAFETY: valid C string.
            if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
                check(
                    id,
                    Status::Pass,
                    format!(
                        "{} does not exist yet; it will be created in {}",
                        data_dir.display(),
                        parent.display()
                    ),
                )
            } else {
                check(
                    id,
                    Status::Fail,
                    format!(
                        "{} does not exist and {} is not writable",
                        data_dir.display(),
                        parent.display()
                    ),
                )
            }
        }
    }
}

fn kvm_check() -> CheckResult {
    match kvm::boot_test(Duration::from_secs(5)) {
        Ok(detail) => check("host.kvm", Status::Pass, detail),
        Err(kvm::KvmError::Missing(d)) => check("host.kvm", Status::Skip, d),
        Err(e) => check("host.kvm", Status::Fail, e.to_string()),
    }
}

// ------------------------------------------------------------ providers --

/// `GET path` over a Unix socket or TCP with HTTP/1.0; the status code and
/// body.
fn http_get(
    stream: &mut (impl Read + Write),
    host: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    stream
        .take(1 << 20)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("not an HTTP answer")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn docker_socket_path(cfg: &Config) -> Result<PathBuf, String> {
    let raw = cfg
        .docker
        .socket
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
    if let Some(p) = raw.strip_prefix("unix://") {
        Ok(PathBuf::from(p))
    } else if raw.starts_with('/') {
        Ok(PathBuf::from(raw))
    } else {
        Err(format!("{raw}: only unix sockets are checked"))
    }
}

fn docker(cfg: &Config) -> CheckResult {
    let id = "docker.socket";
    let path = match docker_socket_path(cfg) {
        Ok(p) => p,
        Err(e) => return check(id, Status::Skip, e),
    };
    let res = (|| {
        let mut s = std::os::unix::net::UnixStream::connect(&path)
            .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
        s.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
        http_get(&mut s, "docker", "/version", None)
    })();
    let where_ = format!("{}: /version", path.display());
    json_check(id, res, &where_, |v| {
        format!(
            "{}: Docker {} (API {}, {})",
            path.display(),
            v["Version"].as_str().unwrap_or("?"),
            v["ApiVersion"].as_str().unwrap_or("?"),
            v["Os"].as_str().unwrap_or("?"),
        )
    })
}

/// An HTTP probe as a check: a 200 with a JSON body passes (`describe`
/// says what it found), any other answer or error fails.
fn json_check(
    id: &str,
    res: Result<(u16, String), String>,
    target: &str,
    describe: impl FnOnce(&serde_json::Value) -> String,
) -> CheckResult {
    match res {
        Ok((200, body)) => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            check(id, Status::Pass, describe(&v))
        }
        Ok((code, body)) => check(
            id,
            Status::Fail,
            format!("{target} answered {code}: {}", body.trim()),
        ),
        Err(e) => check(id, Status::Fail, e),
    }
}

fn which(binary: &str) -> Option<PathBuf> {
    if binary.contains('/') {
        return Path::new(binary).is_file().then(|| PathBuf::from(binary));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(binary))
            .find(|p| p.is_file())
    })
}

fn proot(cfg: &Config) -> CheckResult {
    let id = "proot.binary";
    let Some(path) = which(&cfg.proot.binary) else {
        return check(
            id,
            Status::Fail,
            format!("{} not found (apt-get install proot)", cfg.proot.binary),
        );
    };
    let p = path.to_string_lossy().into_owned();
    let version = run(&p, &["--version"], T)
        .ok()
        .and_then(|out| {
            out.split_whitespace()
                .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown version".into());
    // A real run: PRoot must be able to trace a child on this host.
    match run(&p, &["-r", "/", "true"], T) {
        Ok(_) => check(
            id,
            Status::Pass,
            format!("{p} {version}; traced a child process"),
        ),
        Err(e) => check(id, Status::Fail, format!("{p} {version}: {e}")),
    }
}

fn custom(cfg: &Config) -> CheckResult {
    let id = "custom.backend";
    let Some(url) = &cfg.custom.url else {
        return check(id, Status::Skip, "custom.url is not set");
    };
    let Some(rest) = url.strip_prefix("http://") else {
        return check(
            id,
            Status::Skip,
            format!("{url}: only http:// backends are probed"),
        );
    };
    let (hostport, prefix) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    let path = format!("{}/v1/health", prefix.trim_end_matches('/'));
    let res = (|| {
        use std::net::ToSocketAddrs;
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("{hostport}: {e}"))?
            .next()
            .ok_or_else(|| format!("{hostport}: no address"))?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        s.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
        http_get(&mut s, hostport, &path, cfg.custom.token.as_deref())
    })();
    json_check(id, res, &format!("{url}{path}"), |v| {
        format!(
            "{url}: healthy, isolation {}",
            v["isolation"].as_str().unwrap_or("not stated")
        )
    })
}

/// The host checks that matter for `provider` (kernel features, binaries
/// and their versions).
pub async fn for_provider(cfg: &Config, provider: &str) -> Vec<CheckResult> {
    let cfg = cfg.clone();
    let provider = provider.to_string();
    tokio::task::spawn_blocking(move || {
        let mut out = vec![kernel(), disk(&cfg.data_dir), data_dir_perms(&cfg.data_dir)];
        match provider.as_str() {
            "native" => {
                out.extend([cgroups(), namespaces(), overlayfs(), seccomp()]);
                if !is_root() {
                    out.push(user_namespaces());
                }
            }
            "docker" => out.push(docker(&cfg)),
            "proot" => out.push(proot(&cfg)),
            "custom" => out.push(custom(&cfg)),
            _ => {}
        }
        out
    })
    .await
    .unwrap_or_default()
}

/// Every check `stacyvm doctor` runs, in display order.
pub async fn all(cfg: &Config) -> Vec<CheckResult> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || {
        vec![
            kernel(),
            cgroups(),
            namespaces(),
            user_namespaces(),
            overlayfs(),
            seccomp(),
            docker(&cfg),
            proot(&cfg),
            custom(&cfg),
            kvm_check(),
            disk(&cfg.data_dir),
            data_dir_perms(&cfg.data_dir),
        ]
    })
    .await
    .unwrap_or_default()
}

/// Which providers depend on a check (for doctor's readiness summary).
pub fn needed_by(check_id: &str) -> &'static [&'static str] {
    match check_id {
        "host.cgroups" | "host.namespaces" | "host.overlayfs" | "host.seccomp" => &["native"],
        "host.userns" => &[],
        "docker.socket" => &["docker"],
        "proot.binary" => &["proot"],
        "custom.backend" => &["custom"],
        "host.kvm" => &["firecracker"],
        _ => &["native", "docker", "proot", "custom", "mock"],
    }
}
