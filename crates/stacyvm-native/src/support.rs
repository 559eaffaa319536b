//! Provider plumbing this provider shares with the `proot` provider: id
//! checks, log tails for error messages, the health cache, cleanup after an
//! abandoned or failed create, and waiting for a new sandbox's agent.

use stacyvm_providers::agent::AgentClient;
use stacyvm_providers::{ProviderError, RuntimeInfo, SandboxSpec};
use std::fs;
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::unix::AsyncFd;

/// Longest sandbox or instance id accepted (it becomes a directory name).
pub const MAX_ID_LEN: usize = 128;
/// Lines of the sandbox log attached to start failures.
pub const FAILURE_LOG_LINES: usize = 20;
/// How long a successful health check is reused.
const HEALTH_OK_TTL: Duration = Duration::from_secs(300);
/// How long a failed health check is reused.
const HEALTH_ERR_TTL: Duration = Duration::from_secs(5);

/// A unique-enough token for slot and directory names.
pub fn token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{nanos:08x}{n:x}", std::process::id())
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A sandbox or instance id usable as one path component (and cgroup name).
pub fn check_id(what: &str, id: &str) -> Result<(), ProviderError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ProviderError::Invalid(format!(
            "{what} {id:?} must be 1-{MAX_ID_LEN} characters of [A-Za-z0-9_.-] and not start with '.'"
        )))
    }
}

/// Create a provider's state directory (and its parents) if missing, private
/// to the server's user; returns it absolute.
pub fn make_state_dir(dir: &Path) -> Result<PathBuf, ProviderError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            ProviderError::Invalid(format!(
                "cannot create the state directory {}: {e}",
                dir.display()
            ))
        })?;
    dir.canonicalize()
        .map_err(|e| ProviderError::Invalid(format!("{}: {e}", dir.display())))
}

/// The agent binary and run directory of a spec must exist and be absolute.
pub fn check_spec_paths(spec: &SandboxSpec) -> Result<(), ProviderError> {
    if !spec.agent_binary.is_absolute() || !spec.agent_binary.is_file() {
        return Err(ProviderError::Invalid(format!(
            "agent binary {} must be an existing absolute path",
            spec.agent_binary.display()
        )));
    }
    if !spec.run_dir.is_absolute() || !spec.run_dir.is_dir() {
        return Err(ProviderError::Invalid(format!(
            "run directory {} must be an existing absolute directory",
            spec.run_dir.display()
        )));
    }
    Ok(())
}

/// The last `lines` lines of a log file (reads at most its last 64 KiB).
pub fn tail_file(path: &Path, lines: usize) -> Vec<String> {
    if lines == 0 {
        return Vec::new();
    }
    let Ok(mut f) = fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let mut out: Vec<String> = text
        .lines()
        .skip(usize::from(start > 0))
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let skip = out.len().saturating_sub(lines);
    out.drain(..skip);
    out
}

/// `message` with the end of the sandbox's log (called `log_name` in the
/// message) attached, if it has any.
pub fn with_log(message: String, log: &Path, log_name: &str) -> String {
    let lines = tail_file(log, FAILURE_LOG_LINES);
    if lines.is_empty() {
        message
    } else {
        format!("{message}; {log_name}:\n{}", lines.join("\n"))
    }
}

/// Run blocking `f` on a blocking thread; `what` names the task in the
/// error when it fails to finish.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ProviderError::Runtime(format!("{what} task failed: {e}")))
}

/// The last result of a provider's health probe and when it was taken,
/// reused for a while (longer when it passed than when it failed).
pub struct HealthCache<T> {
    last: tokio::sync::Mutex<Option<(Instant, Result<T, String>)>>,
}

impl<T> Default for HealthCache<T> {
    fn default() -> Self {
        HealthCache {
            last: tokio::sync::Mutex::new(None),
        }
    }
}

impl<T: Clone> HealthCache<T> {
    /// The last result while it is fresh, else the result of `probe`
    /// (awaited only then; concurrent callers wait for it).
    pub async fn get(&self, probe: impl Future<Output = Result<T, String>>) -> Result<T, String> {
        let mut cached = self.last.lock().await;
        if let Some((at, result)) = cached.as_ref() {
            let ttl = if result.is_ok() {
                HEALTH_OK_TTL
            } else {
                HEALTH_ERR_TTL
            };
            if at.elapsed() < ttl {
                return result.clone();
            }
        }
        let result = probe.await;
        *cached = Some((Instant::now(), result.clone()));
        result
    }
}

/// Tears a sandbox down if `create` is abandoned half-way (its future
/// dropped) while the guard is armed.
pub struct CreateGuard {
    cleanup: Option<Box<dyn FnOnce() + Send>>,
}

impl CreateGuard {
    /// A guard that runs `teardown(id)` when dropped armed: on a blocking
    /// thread when there is a runtime, else at once. Failures are logged.
    pub fn new(
        id: &str,
        teardown: impl FnOnce(&str) -> Result<(), ProviderError> + Send + 'static,
    ) -> CreateGuard {
        let id = id.to_string();
        CreateGuard {
            cleanup: Some(Box::new(move || {
                if let Err(e) = teardown(&id) {
                    tracing::warn!(sandbox = %id, error = %e, "cleanup after an abandoned create failed");
                }
            })),
        }
    }

    pub fn disarm(&mut self) {
        self.cleanup = None;
    }
}

impl Drop for CreateGuard {
    fn drop(&mut self) {
        let Some(cleanup) = self.cleanup.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(cleanup);
            }
            Err(_) => cleanup(),
        }
    }
}

/// The answer to a create: the runtime of the sandbox whose main process is
/// `started`, or, when starting it failed (rather than was abandoned), the
/// error once `teardown(id)` has removed the sandbox, so that nothing of it
/// is left when the error is seen. Teardown failures are logged.
pub async fn created(
    id: &str,
    started: Result<i32, ProviderError>,
    teardown: impl FnOnce(&str) -> Result<(), ProviderError> + Send + 'static,
) -> Result<RuntimeInfo, ProviderError> {
    let e = match started {
        Ok(pid) => {
            return Ok(RuntimeInfo {
                sandbox_id: id.to_string(),
                runtime_id: pid.to_string(),
                running: true,
            })
        }
        Err(e) => e,
    };
    let owned = id.to_string();
    match tokio::task::spawn_blocking(move || teardown(&owned)).await {
        Ok(Ok(())) => {}
        Ok(Err(te)) => {
            tracing::warn!(sandbox = %id, error = %te, "cleanup after a failed create failed")
        }
        Err(je) => {
            tracing::warn!(sandbox = %id, error = %je, "cleanup task after a failed create failed")
        }
    }
    Err(e)
}

/// `destroy` for a provider whose `teardown(id)` blocks: checks the id and
/// runs it on a blocking thread.
pub async fn destroy(
    id: &str,
    teardown: impl FnOnce(&str) -> Result<(), ProviderError> + Send + 'static,
) -> Result<(), ProviderError> {
    check_id("sandbox id", id)?;
    let owned = id.to_string();
    blocking("destroy", move || teardown(&owned)).await?
}

/// Register an owned descriptor with the reactor (readable interest).
pub(crate) fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` moves into the `AsyncFd` and stays open, always
    // as the same descriptor, until the `AsyncFd` is dropped.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// Watches a directory for new entries (the agent's socket) with inotify.
pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
}

impl DirWatch {
    pub fn new(dir: &Path) -> io::Result<DirWatch> {
        // SAFETY: no pointers involved.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = crate::sys::cstr(dir)?;
        // SAFETY: valid descriptor and C string.
        let wd = unsafe {
            libc::inotify_add_watch(
                fd.as_raw_fd(),
                path.as_ptr(),
                libc::IN_CREATE | libc::IN_ATTRIB | libc::IN_MOVED_TO,
            )
        };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DirWatch { fd: register(fd)? })
    }

    /// Resolves after the next batch of events.
    pub async fn changed(&self) {
        let mut buf = [0u8; 1024];
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                // Cannot wait on it: behave like a timer-less poll.
                return std::future::pending().await;
            };
            // SAFETY: reading into a local buffer of the given size.
            let n = unsafe {
                libc::read(
                    self.fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n > 0 {
                return;
            }
            guard.clear_ready();
        }
    }
}

/// How [`wait_for_agent`] waits, and what its errors say.
pub struct AgentWait<'a> {
    pub spec: &'a SandboxSpec,
    pub deadline: tokio::time::Instant,
    /// The sandbox's log, attached to errors as `log_name`.
    pub log: &'a Path,
    pub log_name: &'a str,
    /// The first pause between tries; it doubles up to 20 ms.
    pub first_delay: Duration,
    /// The error when the sandbox's main process exits first.
    pub exited_message: &'a str,
}

/// Ask the new sandbox's agent for its health until it answers, the
/// deadline passes, or `exited` resolves (the sandbox's main process is
/// gone). `watch`, when given, wakes the wait as soon as the run directory
/// changes (the socket appears).
pub async fn wait_for_agent(
    w: &AgentWait<'_>,
    watch: Option<&DirWatch>,
    exited: impl Future<Output = ()>,
) -> Result<(), ProviderError> {
    let socket = w.spec.socket_path();
    let agent = AgentClient::new(socket.clone());
    let mut delay = w.first_delay;
    let mut last_err = String::from("no answer yet");
    let mut gone = false;
    tokio::pin!(exited);
    loop {
        let remaining = w
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Err(ProviderError::AgentStart(with_log(
                format!(
                    "no answer on {} within {} ms: {last_err}",
                    socket.display(),
                    w.spec.start_timeout.as_millis()
                ),
                w.log,
                w.log_name,
            )));
        }
        match tokio::time::timeout(remaining, agent.health()).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last_err = e.to_string(),
            Err(_) => last_err = "the agent accepted but never answered".into(),
        }
        if gone {
            return Err(ProviderError::AgentStart(with_log(
                w.exited_message.into(),
                w.log,
                w.log_name,
            )));
        }
        let changed = async {
            match watch {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_millis(20)),
            _ = &mut exited => gone = true,
            _ = tokio::time::sleep_until(w.deadline) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_single_safe_path_components() {
        assert!(check_id("id", "sb_abc-1.2").is_ok());
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "x\0",
            &"x".repeat(200),
        ] {
            assert!(check_id("id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn log_tails() {
        let p = std::env::temp_dir().join(format!("stacyvm-native-tail-{}", std::process::id()));
        fs::write(&p, "a\nb\n\nc\n").unwrap();
        assert_eq!(tail_file(&p, 2), ["b", "c"]);
        assert_eq!(tail_file(&p, 10), ["a", "b", "c"]);
        assert!(tail_file(&p, 0).is_empty());
        assert!(with_log("failed".into(), &p, "agent log").ends_with("; agent log:\na\nb\nc"));
        fs::remove_file(&p).unwrap();
        assert!(tail_file(&p, 3).is_empty());
        assert_eq!(with_log("failed".into(), &p, "agent log"), "failed");
    }

    #[tokio::test]
    async fn health_results_are_reused() {
        let cache = HealthCache::<u32>::default();
        assert_eq!(cache.get(async { Ok(1) }).await, Ok(1));
        assert_eq!(cache.get(async { Ok(2) }).await, Ok(1));
    }
}
