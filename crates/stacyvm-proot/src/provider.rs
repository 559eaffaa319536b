//! [`ProotProvider`]: the agent as the root process of a PRoot session.
//!
//! Not a security boundary (see the crate documentation): sandbox processes
//! are host processes with the server's privileges whose paths PRoot
//! translates.

use crate::filter;
use crate::kill;
use crate::rootfs::{self, Base, BaseCache};
use crate::state::{Loader, SandboxDir, SandboxState};
use crate::sys;
use async_trait::async_trait;
use stacyvm_agent_proto::{AGENT_PATH_IN_SANDBOX, RUN_DIR_IN_SANDBOX};
use stacyvm_native::state;
use stacyvm_native::support::{
    self, blocking, check_id, check_spec_paths, token, AgentWait, CreateGuard, HealthCache,
};
use stacyvm_native::{agent_env, hostname_for, ResolvedImage, RootfsSource};
use stacyvm_providers::{
    caps, Isolation, NetworkMode, Provider, ProviderError, RuntimeInfo, SandboxSpec,
};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Provider name in the API.
const NAME: &str = "proot";
/// How long `destroy` waits for a sandbox's processes to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Ready copies of each image's root kept by default.
pub const DEFAULT_SPARE_ROOTS: usize = 1;

/// Settings of a [`ProotProvider`].
#[derive(Clone)]
pub struct ProotOptions {
    /// Where per-sandbox state lives (`<state_dir>/<id>/`: `state.json`, the
    /// sandbox's root file system, the log) and the flattened images
    /// (`<state_dir>/.bases/`). Created if missing.
    pub state_dir: PathBuf,
    /// Id of this server instance; recorded in every sandbox's state.
    pub instance_id: String,
    /// The `proot` executable: a path, or a name looked up in `PATH`.
    pub proot_binary: PathBuf,
    /// Where flattened images and their ready copies live (default
    /// `<state_dir>/.bases`). Ready copies are renamed into sandbox
    /// directories, so it should be on the state directory's file system
    /// (elsewhere every create copies the image).
    pub cache_dir: Option<PathBuf>,
    /// Resolves image names to layers.
    pub rootfs: Arc<dyn RootfsSource>,
}

impl std::fmt::Debug for ProotOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProotOptions")
            .field("state_dir", &self.state_dir)
            .field("instance_id", &self.instance_id)
            .field("proot_binary", &self.proot_binary)
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

/// [`Provider`] that runs each sandbox's agent under PRoot. **Not a
/// security boundary**: PRoot only translates paths; sandbox processes are
/// host processes with the server's privileges, and no resource limit is
/// enforced.
pub struct ProotProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProotProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProotProvider")
            .field("state_dir", &self.inner.state_dir)
            .field("instance_id", &self.inner.instance_id)
            .field("proot", &self.inner.proot)
            .finish_non_exhaustive()
    }
}

struct Inner {
    state_dir: PathBuf,
    instance_id: String,
    /// Absolute path of the `proot` executable.
    proot: PathBuf,
    rootfs: Arc<dyn RootfsSource>,
    bases: Arc<BaseCache>,
    /// The seccomp filter in the kernel's form, built once.
    filter: Arc<Vec<libc::sock_filter>>,
    /// Last health result (the PRoot version, or why it failed) and when it
    /// was taken.
    health: HealthCache<String>,
}

fn unavailable(message: impl Into<String>) -> ProviderError {
    ProviderError::Unavailable {
        provider: NAME.into(),
        message: message.into(),
    }
}

/// Find the `proot` executable: a path is used as is, a bare name is looked
/// up in `PATH`.
fn resolve_binary(name: &Path) -> Result<PathBuf, ProviderError> {
    let executable = |p: &Path| {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.as_os_str().is_empty() {
        return Err(unavailable("no proot executable configured"));
    }
    if name.as_os_str().as_bytes().contains(&b'/') {
        return if executable(name) {
            name.canonicalize()
                .map_err(|e| unavailable(format!("{}: {e}", name.display())))
        } else {
            Err(unavailable(format!(
                "the proot executable {} does not exist or is not executable \
                 (install the proot package or set proot.binary)",
                name.display()
            )))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| executable(p))
        .ok_or_else(|| {
            unavailable(format!(
                "{} is not installed: no such executable in PATH \
                 (install the proot package or set proot.binary)",
                name.display()
            ))
        })
}

fn with_log(message: String, log: &Path) -> String {
    support::with_log(message, log, "proot log")
}

/// `host:guest` for `proot -b`.
fn bind_arg(host: &Path, guest: &str) -> OsString {
    let mut s = host.as_os_str().to_os_string();
    s.push(":");
    s.push(guest);
    s
}

/// The limits a spec asks for that this provider cannot enforce.
fn unenforced(spec: &SandboxSpec) -> Vec<String> {
    let mut out = Vec::new();
    if spec.memory_mb > 0 {
        out.push(format!("memory_mb={}", spec.memory_mb));
    }
    if spec.vcpus > 0 {
        out.push(format!("vcpus={}", spec.vcpus));
    }
    if spec.pids_limit > 0 {
        out.push(format!("pids_limit={}", spec.pids_limit));
    }
    if spec.network == NetworkMode::None {
        out.push("network=none".into());
    }
    out
}

/// The first `x.y[.z]` token of PRoot's banner.
fn parse_version(banner: &str) -> Option<String> {
    banner
        .split(|c: char| c.is_whitespace() || c == '|' || c == 'v')
        .find(|t| {
            let parts: Vec<&str> = t.split('.').collect();
            parts.len() >= 2
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_string)
}

impl ProotProvider {
    /// Build the provider: find `proot`, create the state directory and
    /// remove leftovers of this instance (half-made or half-removed sandbox
    /// directories, unfinished or orphaned flattened images). Fails when
    /// `proot` is not installed.
    pub fn new(opts: ProotOptions) -> Result<ProotProvider, ProviderError> {
        check_id("instance id", &opts.instance_id)?;
        let proot = resolve_binary(&opts.proot_binary)?;
        let state_dir = support::make_state_dir(&opts.state_dir)?;
        if state_dir.as_os_str().as_bytes().contains(&b':') {
            return Err(ProviderError::Invalid(format!(
                "the proot state directory {} must not contain ':'",
                state_dir.display()
            )));
        }
        let bases = BaseCache::new(
            opts.cache_dir
                .clone()
                .unwrap_or_else(|| state_dir.join(".bases")),
            &opts.instance_id,
            DEFAULT_SPARE_ROOTS,
        )
        .map_err(|e| ProviderError::Invalid(e.to_string()))?;
        let inner = Inner {
            state_dir,
            instance_id: opts.instance_id,
            proot,
            rootfs: opts.rootfs,
            bases: Arc::new(bases),
            filter: Arc::new(filter::prepared()),
            health: HealthCache::default(),
        };
        inner.sweep();
        tracing::debug!(proot = %inner.proot.display(), state_dir = %inner.state_dir.display(), "proot provider ready");
        Ok(ProotProvider {
            inner: Arc::new(inner),
        })
    }

    /// The state directory in use (absolute).
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// The `proot` executable in use (absolute).
    pub fn proot_binary(&self) -> &Path {
        &self.inner.proot
    }

    /// How many ready copies of each image's root to keep (default
    /// [`DEFAULT_SPARE_ROOTS`]; 0 turns them off). Each costs the image's
    /// size on disk; with one ready, a create only renames it into place
    /// instead of copying the whole image.
    pub fn set_spare_roots(&self, n: usize) {
        self.inner.bases.set_spares(n);
    }

    /// Flatten `image` and start making its ready copies now, so the next
    /// create of it does not wait for either.
    pub async fn prepare_image(&self, image: &str) -> Result<(), ProviderError> {
        let resolved = self.inner.rootfs.resolve(image).await?;
        let base =
            self.inner
                .bases
                .get(&resolved.layers)
                .await
                .map_err(|e| ProviderError::Image {
                    image: image.to_string(),
                    message: e.to_string(),
                })?;
        self.inner.bases.refill(&base);
        Ok(())
    }

    /// Wait until no ready copy is being made (or `timeout` passes); for
    /// benchmarks and tests.
    pub async fn wait_spare_roots(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.inner.bases.refilling() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// The recorded state of a sandbox of this instance, if any.
    pub fn sandbox_state(&self, sandbox_id: &str) -> Option<SandboxState> {
        state::own_state(&self.inner.state_dir, &self.inner.instance_id, sandbox_id)
    }
}

impl Inner {
    /// Remove what a previous run of this instance left behind.
    fn sweep(&self) {
        let own_new = format!(".new-{}-", self.instance_id);
        if let Ok(rd) = fs::read_dir(&self.state_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".trash-") || name.starts_with(&own_new) {
                    if let Err(err) = fs::remove_dir_all(e.path()) {
                        tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a leftover sandbox directory");
                    }
                }
            }
        }
        self.bases.sweep();
    }

    /// A `proot` command with the launch settings every sandbox gets: its
    /// own session, `no_new_privs` and the filter of [`crate::filter`].
    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.proot);
        cmd.env_clear().stdin(Stdio::null()).kill_on_drop(false);
        let filter = Arc::clone(&self.filter);
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe system calls; the filter was built before the
        // fork, so nothing allocates.
        unsafe {
            cmd.pre_exec(move || {
                sys::setsid()?;
                sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)?;
                stacyvm_native::seccomp::install_prepared(&filter)
            });
        }
        cmd
    }

    /// Run PRoot once (`proot -r / proot --version`, under the same filter
    /// as sandboxes): PRoot starts, can trace a process and exec through its
    /// loader. Returns PRoot's version.
    async fn probe(&self) -> Result<String, String> {
        let mut cmd = self.command();
        cmd.arg("-r")
            .arg("/")
            .arg(&self.proot)
            .arg("--version")
            .current_dir("/")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = tokio::time::timeout(PROBE_TIMEOUT, cmd.output())
            .await
            .map_err(|_| {
                format!(
                    "{} did not finish within {} s",
                    self.proot.display(),
                    PROBE_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("cannot run {}: {e}", self.proot.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!(
                "{} -r / {} --version failed ({}): {}",
                self.proot.display(),
                self.proot.display(),
                out.status,
                stderr.trim()
            ));
        }
        parse_version(&stdout).ok_or_else(|| {
            format!(
                "{} did not print a version: {}",
                self.proot.display(),
                stdout.trim()
            )
        })
    }

    fn info(&self, id: &str) -> Option<RuntimeInfo> {
        state::runtime_info::<Loader>(&self.state_dir, &self.instance_id, id)
    }

    fn list(&self) -> Result<Vec<RuntimeInfo>, ProviderError> {
        state::list_runtimes::<Loader>(&self.state_dir, &self.instance_id)
    }

    async fn create(self: &Arc<Self>, spec: &SandboxSpec) -> Result<RuntimeInfo, ProviderError> {
        let t0 = Instant::now();
        check_id("sandbox id", &spec.id)?;
        check_spec_paths(spec)?;
        for p in [&spec.agent_binary, &spec.run_dir] {
            if p.as_os_str().as_bytes().contains(&b':') {
                return Err(ProviderError::Invalid(format!(
                    "{} must not contain ':' (proot bind syntax)",
                    p.display()
                )));
            }
        }
        let ignored = unenforced(spec);
        if !ignored.is_empty() {
            tracing::warn!(
                sandbox = %spec.id,
                limits = %ignored.join(", "),
                "the proot provider cannot enforce these limits (and is not a security boundary); the sandbox runs without them"
            );
        }
        let image = self.rootfs.resolve(&spec.image).await?;
        let sd = SandboxDir::new(&self.state_dir, &spec.id);
        if fs::symlink_metadata(&sd.dir).is_ok() {
            return Err(ProviderError::Runtime(format!(
                "sandbox {} already exists ({})",
                spec.id,
                sd.dir.display()
            )));
        }
        let base = self
            .bases
            .get(&image.layers)
            .await
            .map_err(|e| ProviderError::Image {
                image: spec.image.clone(),
                message: e.to_string(),
            })?;
        let base_ms = t0.elapsed().as_millis() as u64;
        let state = SandboxState::new(spec, &self.instance_id, Loader::default());
        // The sandbox directory appears (renamed into place) with its state
        // file and root already inside, so every directory `list` sees is
        // complete and belongs to someone.
        let tmp = SandboxDir {
            dir: self
                .state_dir
                .join(format!(".new-{}-{}", self.instance_id, token())),
        };
        let prepared = {
            let (bases, base, tmp, sd, state) = (
                Arc::clone(&self.bases),
                base.clone(),
                tmp.clone(),
                sd.clone(),
                state.clone(),
            );
            tokio::task::spawn_blocking(move || prepare_dir(&bases, &base, &tmp, &sd, &state)).await
        };
        let spare = match prepared {
            Ok(Ok(s)) => s,
            Ok(Err(message)) => return Err(ProviderError::Runtime(message)),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp.dir);
                return Err(ProviderError::Runtime(format!(
                    "preparing the root file system failed: {e}"
                )));
            }
        };
        let copy_ms = t0.elapsed().as_millis() as u64 - base_ms;
        // Make the next create of this image quick too.
        self.bases.refill(&base);
        let inner = Arc::clone(self);
        let mut guard = CreateGuard::new(&spec.id, move |id| inner.teardown(id));
        let started = self.start(spec, &image, &sd, state).await;
        guard.disarm();
        if let Ok(pid) = started {
            tracing::debug!(
                sandbox = %spec.id,
                pid,
                base_ms,
                copy_ms,
                spare,
                ready_ms = t0.elapsed().as_millis() as u64,
                "proot sandbox ready"
            );
        }
        let inner = Arc::clone(self);
        support::created(&spec.id, started, move |id| inner.teardown(id)).await
    }

    /// Start PRoot with the agent, record it, and wait for the agent.
    async fn start(
        &self,
        spec: &SandboxSpec,
        image: &ResolvedImage,
        sd: &SandboxDir,
        mut state: SandboxState,
    ) -> Result<i32, ProviderError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(sd.log())
            .map_err(|e| ProviderError::Runtime(format!("cannot create the sandbox log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ProviderError::Runtime(format!("cannot open the sandbox log: {e}")))?;
        let rootfs = sd.rootfs();
        let workdir = image
            .working_dir
            .as_deref()
            .filter(|w| w.starts_with('/') && !w.contains(':'))
            .filter(|w| rootfs.join(w.trim_start_matches('/')).is_dir())
            .unwrap_or("/");
        let env = agent_env(&image.env, &spec.env, &hostname_for(&spec.id));
        let mut cmd = self.command();
        cmd.arg("-r")
            .arg(&rootfs)
            .arg("-b")
            .arg(bind_arg(&spec.run_dir, RUN_DIR_IN_SANDBOX))
            .arg("-b")
            .arg(bind_arg(&spec.agent_binary, AGENT_PATH_IN_SANDBOX))
            .arg("-b")
            .arg("/proc")
            .arg("-b")
            .arg("/dev")
            .arg("-w")
            .arg(workdir)
            .arg(AGENT_PATH_IN_SANDBOX)
            .envs(env.iter().filter_map(|e| e.split_once('=')))
            .env("PROOT_TMP_DIR", sd.tmp())
            .current_dir(&rootfs)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let deadline = tokio::time::Instant::now() + spec.start_timeout;
        let mut child = cmd.spawn().map_err(|e| {
            ProviderError::Runtime(format!("cannot start {}: {e}", self.proot.display()))
        })?;
        let Some(pid) = child.id().map(|p| p as i32) else {
            return Err(ProviderError::Runtime(with_log(
                "proot exited at once".into(),
                &sd.log(),
            )));
        };
        // Our child cannot be reaped before we wait for it, so the pid is
        // still PRoot's here.
        state.pid = Some(pid);
        state.start_time = sys::process_start_time(pid);
        let recorded = sd.write(&state);
        // Reap PRoot whenever it exits, and tell the wait below.
        let (exited_tx, mut exited) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let status = child.wait().await;
            tracing::debug!(pid, status = ?status, "proot exited");
            let _ = exited_tx.send(true);
        });
        if let Err(e) = recorded {
            return Err(ProviderError::Runtime(format!(
                "cannot record the sandbox state: {e}"
            )));
        }
        if state.start_time.is_none() {
            return Err(ProviderError::Runtime(with_log(
                format!("proot (pid {pid}) exited at once"),
                &sd.log(),
            )));
        }
        let wait = AgentWait {
            spec,
            deadline,
            log: &sd.log(),
            log_name: "proot log",
            first_delay: Duration::from_millis(2),
            exited_message: "proot exited before the agent answered",
        };
        let exited = async move {
            let _ = exited.wait_for(|e| *e).await;
        };
        support::wait_for_agent(&wait, None, exited).await?;
        self.record_loader(sd, state, pid).await?;
        Ok(pid)
    }

    /// Find and record the loader PRoot runs the sandbox's programs with
    /// (the executable of its first tracee, the agent).
    async fn record_loader(
        &self,
        sd: &SandboxDir,
        mut state: SandboxState,
        proot: i32,
    ) -> Result<(), ProviderError> {
        let found = tokio::task::spawn_blocking(move || kill::find_loader(proot))
            .await
            .ok()
            .flatten();
        let Some(exe) = found else {
            return Ok(());
        };
        state.extra.loader = Some(exe);
        sd.write(&state)
            .map_err(|e| ProviderError::Runtime(format!("cannot record the sandbox state: {e}")))
    }

    /// Kill every process of a sandbox and remove its directory. Blocking;
    /// idempotent.
    fn teardown(&self, id: &str) -> Result<(), ProviderError> {
        let t0 = Instant::now();
        let sd = SandboxDir::new(&self.state_dir, id);
        if fs::symlink_metadata(&sd.dir).is_err() {
            return Ok(());
        }
        let Some(state) = sd.teardown_state::<Loader>(id, &self.instance_id) else {
            return Ok(());
        };
        let proot = state.as_ref().and_then(|s| s.pidfd(SandboxState::live_pid));
        let loader = state
            .as_ref()
            .and_then(|s| s.extra.loader.clone())
            .filter(|l| kill::is_loader(l))
            .or_else(|| proot.as_ref().and_then(|(pid, _)| kill::find_loader(*pid)));
        let sandbox = kill::Sandbox {
            dir: &sd.dir,
            loader: loader.as_deref(),
        };
        kill::kill_sandbox(&sandbox, proot, KILL_TIMEOUT)
            .map_err(|e| ProviderError::Runtime(format!("sandbox {id}: {e}")))?;
        if let Some(l) = &loader {
            // PRoot removes it when it exits normally, not when killed.
            if let Err(e) = fs::remove_file(l) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::debug!(path = %l.display(), error = %e, "cannot remove proot's loader");
                }
            }
        }
        // Deleting a whole root file system takes a while.
        sd.remove_in_background(&self.state_dir, id)?;
        tracing::debug!(
            sandbox = id,
            elapsed_us = t0.elapsed().as_micros() as u64,
            "proot sandbox removed"
        );
        Ok(())
    }
}

/// Fill the new sandbox directory `tmp` (its own root from `base`, PRoot's
/// scratch directory, the state file) and rename it to `sd`. Returns
/// whether a ready copy of the root was used. Blocking.
fn prepare_dir(
    bases: &BaseCache,
    base: &Base,
    tmp: &SandboxDir,
    sd: &SandboxDir,
    state: &SandboxState,
) -> Result<bool, String> {
    let run = || -> Result<bool, String> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp.dir)
            .map_err(|e| format!("cannot create {}: {e}", tmp.dir.display()))?;
        let spare = bases
            .materialize(base, &tmp.rootfs())
            .map_err(|e| e.to_string())?;
        rootfs::prepare_mount_points(&tmp.rootfs()).map_err(|e| e.to_string())?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(tmp.tmp())
            .map_err(|e| format!("cannot create {}: {e}", tmp.tmp().display()))?;
        tmp.write(state)
            .map_err(|e| format!("cannot write the sandbox state: {e}"))?;
        fs::rename(&tmp.dir, &sd.dir).map_err(|e| {
            format!(
                "cannot move the sandbox directory to {}: {e}",
                sd.dir.display()
            )
        })?;
        Ok(spare)
    };
    let r = run();
    if r.is_err() {
        let _ = fs::remove_dir_all(&tmp.dir);
    }
    r
}

#[async_trait]
impl Provider for ProotProvider {
    fn name(&self) -> &str {
        NAME
    }

    /// `ptrace`: path translation only. **Not a security boundary.**
    fn isolation(&self) -> Isolation {
        Isolation::Ptrace
    }

    fn capabilities(&self) -> Vec<String> {
        [caps::EXEC, caps::FILES, caps::STREAMING, caps::PREVIEW]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, ProviderError> {
        let r = self.inner.create(spec).await;
        if let Err(e) = &r {
            tracing::debug!(sandbox = %spec.id, error = %e, "proot sandbox failed to start");
        }
        r
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let inner = Arc::clone(&self.inner);
        support::destroy(sandbox_id, move |id| inner.teardown(id)).await
    }

    async fn inspect(&self, sandbox_id: &str) -> Result<Option<RuntimeInfo>, ProviderError> {
        let inner = Arc::clone(&self.inner);
        let id = sandbox_id.to_string();
        blocking("inspect", move || inner.info(&id)).await
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>, ProviderError> {
        let inner = Arc::clone(&self.inner);
        blocking("list", move || inner.list()).await?
    }

    async fn health(&self) -> Result<(), ProviderError> {
        let probe = async {
            let result = self.inner.probe().await;
            match &result {
                Ok(version) => tracing::debug!(version, "proot provider probe passed"),
                Err(e) => tracing::warn!(error = %e, "proot provider probe failed"),
            }
            result
        };
        self.inner
            .health
            .get(probe)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn logs(&self, sandbox_id: &str, lines: usize) -> Vec<String> {
        state::log_tail(&self.inner.state_dir, sandbox_id, lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_banner() {
        let banner = " _____ _____              ___\n|__|  |__|__\\_____/\\_____/\\____| 5.1.0\n\nbuilt-in accelerators: process_vm = yes";
        assert_eq!(parse_version(banner).as_deref(), Some("5.1.0"));
        assert_eq!(
            parse_version("proot v5.4.0 (abc)").as_deref(),
            Some("5.4.0")
        );
        assert_eq!(parse_version("no version here"), None);
    }

    #[test]
    fn missing_binaries_are_reported() {
        let e = resolve_binary(Path::new("stacyvm-no-such-proot")).unwrap_err();
        assert!(e.to_string().contains("not installed"), "{e}");
        let e = resolve_binary(Path::new("/nonexistent/proot")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(resolve_binary(Path::new("")).is_err());
    }

    #[test]
    fn every_default_limit_is_named() {
        let spec = SandboxSpec {
            id: "sb_x".into(),
            image: "i".into(),
            memory_mb: 512,
            vcpus: 1,
            pids_limit: 256,
            network: NetworkMode::None,
            env: Default::default(),
            run_dir: PathBuf::from("/r"),
            agent_binary: PathBuf::from("/a"),
            start_timeout: Duration::from_secs(1),
        };
        assert_eq!(
            unenforced(&spec),
            ["memory_mb=512", "vcpus=1", "pids_limit=256", "network=none"]
        );
    }
}
