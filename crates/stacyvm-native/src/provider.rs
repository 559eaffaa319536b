//! [`NativeProvider`]: sandboxes made directly from Linux namespaces,
//! overlayfs and cgroups, with no daemon in between.
//!
//! A create is either *cold* (start the init helper, which joins fresh
//! cgroups, creates the namespaces and waits for its configuration on
//! stdin — both lines are sent at once) or *warm*: a few helpers are started
//! ahead of time and parked right after the namespaces exist, in cgroups of
//! their own (`stacyvm/<instance>/pool-<token>`), waiting for the second line.
//! Moving a process into a cgroup costs an RCU grace period (≈10 ms on a
//! small VM), and `exec` plus `unshare` a few more; a warm create skips all of
//! that and only mounts the root, sets the limits and starts the agent.

use crate::cgroup::{self, Layout, Limits, CPU_PERIOD_US};
use crate::config::{CgroupView, InitConfig, InitMode, Prelude};
use crate::rootfs::{ResolvedImage, RootfsSource};
use crate::state::{self, Cgroups, SandboxDir, SandboxState};
use crate::support::{
    self, blocking, check_id, check_spec_paths, register, tail_file, token, AgentWait, CreateGuard,
    DirWatch, HealthCache,
};
use crate::sys;
use async_trait::async_trait;
use stacyvm_providers::{
    Isolation, NetworkMode, Provider, ProviderError, RuntimeInfo, SandboxSpec,
};
use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The answer to `network: egress`, which this provider cannot give yet.
pub const EGRESS_UNSUPPORTED: &str = "network egress is not supported by the native provider yet";

/// How long `destroy` waits for a sandbox's processes to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long starting a pre-started sandbox may take.
const WARM_TIMEOUT: Duration = Duration::from_secs(10);
/// Pre-started sandboxes kept ready by default.
pub const DEFAULT_WARM_POOL: usize = 2;
/// Limits of a pre-started sandbox until it is handed out.
const PARKED_LIMITS: Limits = Limits {
    memory_bytes: 64 << 20,
    cpu_quota_us: CPU_PERIOD_US,
    pids_max: 16,
};
/// Default `PATH` when the image sets none (Docker's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Settings of a [`NativeProvider`].
#[derive(Clone)]
pub struct NativeOptions {
    /// Where per-sandbox state lives (`<state_dir>/<id>/`: `state.json`, the
    /// writable layer, the agent log). Created if missing.
    pub state_dir: PathBuf,
    /// Id of this server instance; recorded in every sandbox's state and used
    /// in its cgroup path (`stacyvm/<instance>/…`).
    pub instance_id: String,
    /// Executable started to set up each sandbox; its `main` must call
    /// [`crate::sandbox_init_main`] when given `init_args`.
    pub init_exe: PathBuf,
    /// Arguments that make `init_exe` run [`crate::sandbox_init_main`].
    pub init_args: Vec<String>,
    /// Resolves image names to layers.
    pub rootfs: Arc<dyn RootfsSource>,
}

impl std::fmt::Debug for NativeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeOptions")
            .field("state_dir", &self.state_dir)
            .field("instance_id", &self.instance_id)
            .field("init_exe", &self.init_exe)
            .field("init_args", &self.init_args)
            .finish_non_exhaustive()
    }
}

/// [`Provider`] that runs each sandbox as the agent in fresh namespaces.
pub struct NativeProvider {
    inner: Arc<Inner>,
}

struct Inner {
    state_dir: PathBuf,
    instance_id: String,
    init_exe: PathBuf,
    init_args: Vec<String>,
    rootfs: Arc<dyn RootfsSource>,
    /// The host's cgroup layout, or why it is unusable.
    layout: Result<Layout, String>,
    /// Map root inside a user namespace (the provider is not root).
    rootless: Option<(u32, u32)>,
    /// Last health result and when it was taken.
    health: HealthCache<()>,
    /// Pre-started sandboxes waiting for their configuration.
    pool: Mutex<VecDeque<Warm>>,
    /// How many pre-started sandboxes to keep.
    pool_size: AtomicUsize,
    /// Pre-started sandboxes being started right now.
    filling: AtomicUsize,
}

impl std::fmt::Debug for NativeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeProvider")
            .field("state_dir", &self.inner.state_dir)
            .field("instance_id", &self.inner.instance_id)
            .field("layout", &self.inner.layout)
            .finish_non_exhaustive()
    }
}

fn unavailable(message: impl Into<String>) -> ProviderError {
    ProviderError::Unavailable {
        provider: "native".into(),
        message: message.into(),
    }
}

pub use stacyvm_providers::hostname_for;

/// The agent's environment: the image's, then `PATH`/`HOSTNAME`/`HOME`
/// defaults, then the sandbox's own variables (which win).
pub fn agent_env(
    image_env: &[String],
    spec_env: &BTreeMap<String, String>,
    hostname: &str,
) -> Vec<String> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let set = |vars: &mut Vec<(String, String)>, k: &str, v: &str| {
        if let Some(slot) = vars.iter_mut().find(|(key, _)| key == k) {
            slot.1 = v.to_string();
        } else {
            vars.push((k.to_string(), v.to_string()));
        }
    };
    for e in image_env {
        if let Some((k, v)) = e.split_once('=') {
            if !k.is_empty() {
                set(&mut vars, k, v);
            }
        }
    }
    if !vars.iter().any(|(k, _)| k == "PATH") {
        set(&mut vars, "PATH", DEFAULT_PATH);
    }
    set(&mut vars, "HOSTNAME", hostname);
    if !vars.iter().any(|(k, _)| k == "HOME") {
        set(&mut vars, "HOME", "/root");
    }
    for (k, v) in spec_env {
        if !k.is_empty() && !k.contains('=') && !k.contains('\0') && !v.contains('\0') {
            set(&mut vars, k, v);
        }
    }
    vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn with_log(message: String, log: &Path) -> String {
    support::with_log(message, log, "agent log")
}

/// Resolves when the process behind a pidfd exits.
async fn exited(pidfd: &AsyncFd<OwnedFd>) {
    let _ = pidfd.readable().await;
}

/// The sandbox init process as seen from the provider: its stdin (for the
/// two configuration lines) and its status pipe.
struct InitProc {
    /// The helper; it exits right after reporting the sandbox's pid.
    helper: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    /// Host pid of the sandbox's PID 1, once reported.
    pid: Option<i32>,
    /// First error reported.
    error: Option<String>,
    /// The probe passed.
    ok: bool,
    /// The status pipe is closed: the agent was executed (or everything died).
    eof: bool,
}

impl InitProc {
    /// Send one configuration line.
    async fn send<T: serde::Serialize>(&mut self, value: &T) -> Result<(), ProviderError> {
        let mut line = serde_json::to_vec(value)
            .map_err(|e| ProviderError::Runtime(format!("cannot encode the init config: {e}")))?;
        line.push(b'\n');
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(ProviderError::Runtime("the init's stdin is closed".into()));
        };
        if let Err(e) = stdin.write_all(&line).await {
            // The init died; its own report says why.
            tracing::debug!(error = %e, "cannot send the config to the sandbox init");
        }
        Ok(())
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Read one status line; false at the end of the pipe.
    async fn next(&mut self) -> bool {
        match self.lines.next_line().await {
            Ok(Some(line)) => {
                if let Some(pid) = line.strip_prefix("pid ") {
                    match pid.trim().parse::<i32>() {
                        Ok(pid) if pid > 0 => self.pid = Some(pid),
                        _ => {
                            self.error
                                .get_or_insert_with(|| format!("bad pid report {line:?}"));
                        }
                    }
                } else if let Some(msg) = line.strip_prefix("error ") {
                    self.error.get_or_insert_with(|| msg.to_string());
                } else if line == "ok" {
                    self.ok = true;
                } else {
                    tracing::debug!(line, "unexpected line from the sandbox init");
                }
                true
            }
            Ok(None) => {
                self.eof = true;
                false
            }
            Err(e) => {
                self.error
                    .get_or_insert_with(|| format!("cannot read the init's status: {e}"));
                self.eof = true;
                false
            }
        }
    }

    /// Read until the sandbox's pid is known (or the init failed), then
    /// collect the helper's exit.
    async fn read_pid(&mut self) -> Option<i32> {
        while self.pid.is_none() && self.error.is_none() && self.next().await {}
        self.reap_helper().await;
        self.pid
    }

    /// Read until the status pipe closes.
    async fn read_to_end(&mut self) {
        while self.next().await {}
        self.reap_helper().await;
    }

    async fn reap_helper(&mut self) {
        match self.helper.wait().await {
            Ok(status) if !status.success() && self.error.is_none() => {
                self.error = Some(format!("the sandbox init exited with {status}"));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot wait for the sandbox init"),
        }
    }
}

/// What every way of starting one sandbox needs.
#[derive(Clone, Copy)]
struct Start<'a> {
    spec: &'a SandboxSpec,
    layout: &'a Layout,
    limits: &'a Limits,
    image: &'a ResolvedImage,
    sd: &'a SandboxDir,
    watch: Option<&'a DirWatch>,
    deadline: tokio::time::Instant,
}

/// A pre-started sandbox: namespaces made, parked in its own cgroups,
/// waiting for its configuration.
struct Warm {
    /// Cgroup leaf name (`pool-<token>`).
    slot: String,
    /// Its state directory (`.pool-<instance>-<token>`), renamed to the
    /// sandbox id when handed out.
    dir: SandboxDir,
    init: InitProc,
    pid: i32,
    start_time: u64,
    pidfd: OwnedFd,
}

impl NativeProvider {
    /// Build the provider: create the state directory, read the host's
    /// cgroup layout and remove leftovers of this instance (parked sandboxes
    /// of a previous run, half-made or half-removed state directories).
    /// Problems with the host itself (no usable cgroups…) are not errors
    /// here; they are reported by [`Provider::health`] and make `create`
    /// fail with [`ProviderError::Unavailable`].
    pub fn new(opts: NativeOptions) -> Result<NativeProvider, ProviderError> {
        check_id("instance id", &opts.instance_id)?;
        if opts.init_exe.as_os_str().is_empty() {
            return Err(ProviderError::Invalid(
                "native provider needs the path of the sandbox init executable".into(),
            ));
        }
        let state_dir = support::make_state_dir(&opts.state_dir)?;
        let layout = Layout::detect();
        match &layout {
            Ok(l) => tracing::debug!(layout = %l.describe(), "native provider cgroups"),
            Err(e) => tracing::warn!(error = %e, "native provider: no usable cgroups"),
        }
        let rootless = (sys::geteuid() != 0).then(|| (sys::geteuid(), sys::getegid()));
        let inner = Inner {
            state_dir,
            instance_id: opts.instance_id,
            init_exe: opts.init_exe,
            init_args: opts.init_args,
            rootfs: opts.rootfs,
            layout,
            rootless,
            health: HealthCache::default(),
            pool: Mutex::new(VecDeque::new()),
            pool_size: AtomicUsize::new(DEFAULT_WARM_POOL),
            filling: AtomicUsize::new(0),
        };
        inner.sweep();
        Ok(NativeProvider {
            inner: Arc::new(inner),
        })
    }

    /// The state directory in use (absolute).
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// The instance id stamped on every sandbox.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// The host's cgroup layout as detected, or why it is unusable.
    pub fn cgroup_layout(&self) -> Result<&Layout, &str> {
        self.inner.layout.as_ref().map_err(String::as_str)
    }

    /// The recorded state of a sandbox of this instance, if any.
    pub fn sandbox_state(&self, sandbox_id: &str) -> Option<SandboxState> {
        state::own_state(&self.inner.state_dir, &self.inner.instance_id, sandbox_id)
    }

    /// How many sandboxes to keep pre-started (default
    /// [`DEFAULT_WARM_POOL`]; 0 turns pre-starting off). Each one costs an
    /// idle process and its namespaces. Shrinking removes the extra ones.
    pub fn set_warm_pool_size(&self, n: usize) {
        self.inner.pool_size.store(n, Ordering::Release);
        let extra: Vec<Warm> = {
            let mut pool = self.inner.pool.lock().unwrap_or_else(|p| p.into_inner());
            let keep = pool.len().min(n);
            pool.drain(keep..).collect()
        };
        for w in extra {
            self.inner.discard_warm(w);
        }
        if n > 0 {
            self.inner.refill();
        }
    }

    /// Pre-started sandboxes ready right now.
    pub fn warm_pool_len(&self) -> usize {
        self.inner
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Wait until the pool is full (or `timeout` passes); for benchmarks and
    /// tests.
    pub async fn wait_warm_pool(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.inner.refill();
        loop {
            if self.warm_pool_len() >= self.inner.pool_size.load(Ordering::Acquire) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let parked: Vec<Warm> = self
            .pool
            .get_mut()
            .map(|p| p.drain(..).collect())
            .unwrap_or_default();
        for w in parked {
            self.discard_warm(w);
        }
    }
}

impl Inner {
    fn layout(&self) -> Result<&Layout, ProviderError> {
        self.layout
            .as_ref()
            .map_err(|e| unavailable(format!("cgroups are not usable: {e}")))
    }

    /// The first configuration line for a sandbox whose cgroups are `leaf`.
    fn prelude(&self, layout: &Layout, leaf: &str) -> Prelude {
        Prelude {
            cgroup_procs: layout.procs_files(&self.instance_id, leaf),
            user_namespace: self.rootless,
        }
    }

    fn cgroup_view(&self, layout: &Layout) -> CgroupView {
        if self.rootless.is_some() {
            CgroupView::None
        } else {
            layout.view()
        }
    }

    /// The second configuration line of a sandbox.
    fn sandbox_config(
        &self,
        layout: &Layout,
        spec: &SandboxSpec,
        image: &ResolvedImage,
        sd: &SandboxDir,
    ) -> InitConfig {
        let hostname = hostname_for(&spec.id);
        InitConfig {
            mode: InitMode::Sandbox,
            sandbox_id: spec.id.clone(),
            env: agent_env(&image.env, &spec.env, &hostname),
            hostname,
            layers: image.layers.clone(),
            upper: sd.upper(),
            work: sd.work(),
            rootfs: sd.rootfs(),
            agent_binary: spec.agent_binary.clone(),
            run_dir: spec.run_dir.clone(),
            cgroup_view: self.cgroup_view(layout),
            working_dir: image.working_dir.clone(),
        }
    }

    /// Start the init helper with its stderr (and later the agent's output)
    /// going to `log`.
    fn spawn_init(&self, log: fs::File) -> Result<InitProc, ProviderError> {
        let mut cmd = tokio::process::Command::new(&self.init_exe);
        cmd.args(&self.init_args)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(false);
        let mut helper = cmd.spawn().map_err(|e| {
            ProviderError::Runtime(format!(
                "cannot start the sandbox init {}: {e}",
                self.init_exe.display()
            ))
        })?;
        let stdin = helper.stdin.take();
        let stdout = helper
            .stdout
            .take()
            .ok_or_else(|| ProviderError::Runtime("the sandbox init has no status pipe".into()))?;
        Ok(InitProc {
            helper,
            stdin,
            lines: BufReader::new(stdout).lines(),
            pid: None,
            error: None,
            ok: false,
            eof: false,
        })
    }

    /// Open a pidfd on `pid` and check that it is the sandbox's PID 1 (in the
    /// cgroups `leaf`), returning it with its start time.
    fn verify_pid1(&self, leaf: &str, pid: i32) -> Result<(OwnedFd, u64), String> {
        let fd = sys::pidfd_open(pid).map_err(|e| format!("pid {pid} is gone: {e}"))?;
        let start = sys::process_start_time(pid).ok_or_else(|| format!("pid {pid} is gone"))?;
        if self.layout.is_ok()
            && !cgroup::is_member(pid, &cgroup::member_suffix(&self.instance_id, leaf))
        {
            return Err(format!("pid {pid} is not in the sandbox's cgroup"));
        }
        if sys::pidfd_exited(&fd) {
            return Err(format!("pid {pid} exited"));
        }
        Ok((fd, start))
    }

    /// Send the sandbox configuration to a started init whose PID 1 is
    /// `pid`, wait for it to become the agent and for the agent to answer.
    /// Returns `pid`.
    async fn finish(
        &self,
        st: &Start<'_>,
        init: &mut InitProc,
        pid: i32,
        pidfd: OwnedFd,
    ) -> Result<i32, ProviderError> {
        let Start {
            spec,
            layout,
            image,
            sd,
            watch,
            deadline,
            ..
        } = *st;
        let pidfd = register(pidfd)
            .map_err(|e| ProviderError::Runtime(format!("cannot watch pid {pid}: {e}")))?;
        let log = &sd.log();
        init.send(&self.sandbox_config(layout, spec, image, sd))
            .await?;
        init.close_stdin();
        if tokio::time::timeout_at(deadline, init.read_to_end())
            .await
            .is_err()
        {
            return Err(ProviderError::AgentStart(with_log(
                format!(
                    "the sandbox init did not finish within {} ms",
                    spec.start_timeout.as_millis()
                ),
                log,
            )));
        }
        if let Some(e) = &init.error {
            let msg = with_log(format!("sandbox init failed: {e}"), log);
            return Err(if e.contains("cannot execute the agent") {
                ProviderError::AgentStart(msg)
            } else {
                ProviderError::Runtime(msg)
            });
        }
        let wait = AgentWait {
            spec,
            deadline,
            log,
            log_name: "agent log",
            first_delay: Duration::from_millis(1),
            exited_message: "the agent exited before it answered",
        };
        support::wait_for_agent(&wait, watch, exited(&pidfd)).await?;
        Ok(pid)
    }

    /// Kill everything of a sandbox and remove its cgroups and state
    /// directory. Blocking; idempotent.
    fn teardown(&self, id: &str) -> Result<(), ProviderError> {
        let t0 = Instant::now();
        let sd = SandboxDir::new(&self.state_dir, id);
        let Some(state) = sd.teardown_state::<Cgroups>(id, &self.instance_id) else {
            return Ok(());
        };
        let leaf = state
            .as_ref()
            .map(|s| s.extra.cgroup_leaf.clone())
            .filter(|l| check_id("cgroup", l).is_ok())
            .unwrap_or_else(|| id.to_string());
        let pid1 = state
            .as_ref()
            .and_then(|s| s.pidfd(SandboxState::same_pid))
            .map(|(_, fd)| fd);
        self.kill_and_remove(&leaf, pid1.as_ref())
            .map_err(|e| ProviderError::Runtime(format!("sandbox {id}: {e}")))?;
        // The overlay's upper layer can only be deleted quickly once the
        // sandbox's mount namespace is fully gone, which the kernel finishes
        // asynchronously: delete it in the background.
        sd.remove_in_background(&self.state_dir, id)?;
        tracing::debug!(
            sandbox = id,
            elapsed_us = t0.elapsed().as_micros() as u64,
            "native sandbox removed"
        );
        Ok(())
    }

    /// Kill every process in the cgroups `leaf` (PID 1 first when known),
    /// wait for them, and remove the cgroups.
    fn kill_and_remove(&self, leaf: &str, pid1: Option<&OwnedFd>) -> Result<(), String> {
        match &self.layout {
            Ok(layout) => {
                layout
                    .kill_all(&self.instance_id, leaf, pid1, KILL_TIMEOUT)
                    .map_err(|e| format!("cannot stop it: {e}"))?;
            }
            Err(_) => {
                if let Some(fd) = pid1 {
                    let _ = sys::pidfd_send_signal(fd, libc::SIGKILL);
                }
            }
        }
        if let Some(fd) = pid1 {
            if !sys::pidfd_wait(fd, KILL_TIMEOUT.as_millis() as i32) {
                return Err(format!(
                    "PID 1 did not exit within {} s",
                    KILL_TIMEOUT.as_secs()
                ));
            }
        }
        if let Ok(layout) = &self.layout {
            if !layout.remove_dirs(&self.instance_id, leaf) {
                return Err("cannot remove its cgroups".into());
            }
        }
        Ok(())
    }

    /// Stop and remove a pre-started sandbox. Blocking.
    fn discard_warm(&self, w: Warm) {
        let Warm {
            slot,
            dir,
            init,
            pidfd,
            ..
        } = w;
        // Closing its stdin alone would also end it; killing is quicker.
        drop(init);
        if let Err(e) = self.kill_and_remove(&slot, Some(&pidfd)) {
            tracing::warn!(slot = %slot, error = %e, "cannot remove a pre-started sandbox");
        }
        let _ = fs::remove_dir_all(&dir.dir);
    }

    /// Remove what a previous run of this instance left behind: parked
    /// sandboxes (they exit by themselves once their server is gone), and
    /// state directories that were being created or deleted.
    fn sweep(&self) {
        let own_prefixes = [
            format!(".pool-{}-", self.instance_id),
            format!(".new-{}-", self.instance_id),
            format!(".probe-{}-", self.instance_id),
        ];
        if let Ok(rd) = fs::read_dir(&self.state_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let stale = name.starts_with(".trash-")
                    || own_prefixes.iter().any(|p| name.starts_with(p.as_str()));
                if !stale {
                    continue;
                }
                if let Some(slot) = name.strip_prefix(own_prefixes[0].as_str()) {
                    let slot = format!("pool-{slot}");
                    if let Ok(layout) = &self.layout {
                        if layout.populated(&self.instance_id, &slot) {
                            // Still parked: some other provider object owns it.
                            continue;
                        }
                        layout.remove_dirs(&self.instance_id, &slot);
                    }
                }
                let _ = fs::remove_dir_all(e.path());
            }
        }
        if let Ok(layout) = &self.layout {
            for leaf in layout.leaves(&self.instance_id) {
                let parked = leaf.starts_with("pool-") || leaf.starts_with("probe-");
                if parked && !layout.populated(&self.instance_id, &leaf) {
                    layout.remove_dirs(&self.instance_id, &leaf);
                }
            }
        }
    }

    /// Start one sandbox ahead of time: state directory, cgroups, namespaces;
    /// it then waits for its configuration.
    async fn make_warm(&self) -> Result<Warm, ProviderError> {
        let layout = self.layout()?;
        let tok = token();
        let slot = format!("pool-{tok}");
        let dir = SandboxDir {
            dir: self
                .state_dir
                .join(format!(".pool-{}-{tok}", self.instance_id)),
        };
        let prepare = || -> io::Result<fs::File> {
            let mut b = fs::DirBuilder::new();
            b.mode(0o700).create(&dir.dir)?;
            b.mode(0o755);
            for d in [dir.upper(), dir.work(), dir.rootfs()] {
                b.create(d)?;
            }
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.log())
        };
        let log = prepare().map_err(|e| {
            let _ = fs::remove_dir_all(&dir.dir);
            ProviderError::Runtime(format!("cannot prepare {}: {e}", dir.dir.display()))
        })?;
        let cleanup = |pidfd: Option<&OwnedFd>| {
            let _ = self.kill_and_remove(&slot, pidfd);
            let _ = fs::remove_dir_all(&dir.dir);
        };
        if let Err(e) = layout.create(&self.instance_id, &slot, &PARKED_LIMITS) {
            cleanup(None);
            return Err(ProviderError::Runtime(format!(
                "cannot create cgroups: {e}"
            )));
        }
        let mut init = match self.spawn_init(log) {
            Ok(i) => i,
            Err(e) => {
                cleanup(None);
                return Err(e);
            }
        };
        let started = async {
            init.send(&self.prelude(layout, &slot)).await?;
            let pid = tokio::time::timeout(WARM_TIMEOUT, init.read_pid())
                .await
                .map_err(|_| ProviderError::Runtime("the sandbox init did not start".into()))?;
            match (pid, &init.error) {
                (Some(pid), None) => {
                    let (fd, start) = self
                        .verify_pid1(&slot, pid)
                        .map_err(|e| ProviderError::Runtime(format!("PID 1 check failed: {e}")))?;
                    Ok((pid, fd, start))
                }
                (_, Some(e)) => Err(ProviderError::Runtime(format!("sandbox init failed: {e}"))),
                (None, None) => Err(ProviderError::Runtime(
                    "the sandbox init ended without starting the sandbox".into(),
                )),
            }
        }
        .await;
        match started {
            Ok((pid, pidfd, start_time)) => Ok(Warm {
                slot,
                dir,
                init,
                pid,
                start_time,
                pidfd,
            }),
            Err(e) => {
                drop(init);
                cleanup(None);
                Err(e)
            }
        }
    }

    /// Top the pool of pre-started sandboxes up, in the background.
    fn refill(self: &Arc<Self>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.layout.is_err() {
            return;
        }
        loop {
            let want = self.pool_size.load(Ordering::Acquire);
            let have = self.pool.lock().unwrap_or_else(|p| p.into_inner()).len();
            let filling = self.filling.load(Ordering::Acquire);
            if have + filling >= want {
                return;
            }
            if self
                .filling
                .compare_exchange(filling, filling + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            let inner = Arc::clone(self);
            handle.spawn(async move {
                let made = inner.make_warm().await;
                inner.filling.fetch_sub(1, Ordering::AcqRel);
                match made {
                    Ok(w) => {
                        let extra = {
                            let mut pool = inner.pool.lock().unwrap_or_else(|p| p.into_inner());
                            if pool.len() < inner.pool_size.load(Ordering::Acquire) {
                                pool.push_back(w);
                                None
                            } else {
                                Some(w)
                            }
                        };
                        if let Some(w) = extra {
                            let inner2 = Arc::clone(&inner);
                            let _ =
                                tokio::task::spawn_blocking(move || inner2.discard_warm(w)).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot pre-start a sandbox");
                    }
                }
            });
        }
    }

    /// A live pre-started sandbox, if one is ready.
    fn take_warm(&self) -> Option<Warm> {
        loop {
            let w = self
                .pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()?;
            if !sys::pidfd_exited(&w.pidfd) {
                return Some(w);
            }
            tracing::debug!(slot = %w.slot, "a pre-started sandbox died while parked");
            self.discard_warm(w);
        }
    }

    /// Run the init in probe mode: namespaces, overlay on the state
    /// directory's filesystem, `/proc`, cgroup membership, `pivot_root`, the
    /// capability drop and the seccomp filter, then exit.
    async fn probe(&self) -> Result<(), String> {
        let layout = self.layout.as_ref().map_err(|e| e.clone())?;
        if !fs::read_to_string("/proc/filesystems")
            .map_err(|e| format!("cannot read /proc/filesystems: {e}"))?
            .contains("overlay")
        {
            return Err("the kernel has no overlayfs".into());
        }
        if !self.init_exe.is_file() {
            return Err(format!(
                "sandbox init executable {} does not exist",
                self.init_exe.display()
            ));
        }
        let tok = token();
        let leaf = format!("probe-{tok}");
        let dir = self
            .state_dir
            .join(format!(".probe-{}-{tok}", self.instance_id));
        let result = self.probe_in(layout, &dir, &leaf).await;
        if let Err(e) = self.kill_and_remove(&leaf, None) {
            tracing::warn!(error = %e, "probe cleanup failed");
        }
        let _ = fs::remove_dir_all(&dir);
        result
    }

    async fn probe_in(&self, layout: &Layout, dir: &Path, leaf: &str) -> Result<(), String> {
        let sub = |n: &str| dir.join(n);
        for d in ["lower", "upper", "work", "rootfs"] {
            fs::create_dir_all(sub(d))
                .map_err(|e| format!("cannot create {}: {e}", sub(d).display()))?;
        }
        layout
            .create(&self.instance_id, leaf, &PARKED_LIMITS)
            .map_err(|e| e.to_string())?;
        let cfg = InitConfig {
            mode: InitMode::Probe,
            sandbox_id: leaf.to_string(),
            hostname: "probe".into(),
            layers: vec![sub("lower")],
            upper: sub("upper"),
            work: sub("work"),
            rootfs: sub("rootfs"),
            agent_binary: PathBuf::new(),
            run_dir: PathBuf::new(),
            cgroup_view: self.cgroup_view(layout),
            env: Vec::new(),
            working_dir: None,
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(sub("probe.log"))
            .map_err(|e| format!("cannot create the probe log: {e}"))?;
        let mut init = self.spawn_init(log).map_err(|e| e.to_string())?;
        let run = async {
            init.send(&self.prelude(layout, leaf)).await?;
            init.send(&cfg).await?;
            init.close_stdin();
            init.read_to_end().await;
            Ok::<(), ProviderError>(())
        };
        tokio::time::timeout(PROBE_TIMEOUT, run)
            .await
            .map_err(|_| {
                format!(
                    "the probe did not finish within {} s",
                    PROBE_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| e.to_string())?;
        if let Some(e) = &init.error {
            return Err(format!("sandbox probe failed: {e}"));
        }
        if !init.ok {
            let log = tail_file(&sub("probe.log"), 5).join(" | ");
            return Err(format!(
                "the sandbox init {} {:?} did not run the probe (does its main call \
                 stacyvm_native::sandbox_init_main()?){}",
                self.init_exe.display(),
                self.init_args,
                if log.is_empty() {
                    String::new()
                } else {
                    format!("; it printed: {log}")
                }
            ));
        }
        Ok(())
    }

    async fn create(self: &Arc<Self>, spec: &SandboxSpec) -> Result<RuntimeInfo, ProviderError> {
        let t0 = Instant::now();
        check_id("sandbox id", &spec.id)?;
        if spec.network == NetworkMode::Egress {
            return Err(ProviderError::Invalid(EGRESS_UNSUPPORTED.into()));
        }
        if spec.memory_mb == 0 || spec.vcpus == 0 || spec.pids_limit == 0 {
            return Err(ProviderError::Invalid(
                "memory_mb, vcpus and pids_limit must be positive".into(),
            ));
        }
        let memory_bytes = spec
            .memory_mb
            .checked_mul(1024 * 1024)
            .filter(|b| *b < i64::MAX as u64)
            .ok_or_else(|| {
                ProviderError::Invalid(format!("memory_mb {} is too large", spec.memory_mb))
            })?;
        let limits = Limits {
            memory_bytes,
            cpu_quota_us: u64::from(spec.vcpus) * CPU_PERIOD_US,
            pids_max: spec.pids_limit,
        };
        check_spec_paths(spec)?;
        let layout = self.layout()?;
        let image = self.rootfs.resolve(&spec.image).await?;
        for l in &image.layers {
            if !l.is_absolute() || !l.is_dir() {
                return Err(ProviderError::Image {
                    image: spec.image.clone(),
                    message: format!("layer {} is not a directory", l.display()),
                });
            }
        }
        let sd = SandboxDir::new(&self.state_dir, &spec.id);
        crate::init::overlay_options(
            &image.layers,
            &sd.upper(),
            &sd.work(),
            self.rootless.is_some(),
        )
        .map_err(|message| ProviderError::Image {
            image: spec.image.clone(),
            message,
        })?;
        if sd.dir.exists() {
            return Err(ProviderError::Runtime(format!(
                "sandbox {} already exists ({})",
                spec.id,
                sd.dir.display()
            )));
        }
        // Watch for the agent's socket before anything can create it.
        let watch = match DirWatch::new(&spec.run_dir) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::debug!(error = %e, "no inotify on the run directory; polling");
                None
            }
        };
        let deadline = tokio::time::Instant::now() + spec.start_timeout;
        let warm = self.take_warm();
        let was_warm = warm.is_some();
        let inner = Arc::clone(self);
        let mut guard = CreateGuard::new(&spec.id, move |id| inner.teardown(id));
        let st = Start {
            spec,
            layout,
            limits: &limits,
            image: &image,
            sd: &sd,
            watch: watch.as_ref(),
            deadline,
        };
        let started = match warm {
            Some(w) => self.start_warm(&st, w).await,
            None => self.start_cold(&st).await,
        };
        // Not abandoned: a failure is cleaned up below, before answering.
        guard.disarm();
        self.refill();
        // Closing an inotify instance waits for an SRCU grace period (≈10 ms
        // here): let a blocking thread do it.
        if let Some(w) = watch {
            tokio::task::spawn_blocking(move || drop(w));
        }
        if let Ok(pid) = started {
            tracing::debug!(
                sandbox = %spec.id,
                pid,
                warm = was_warm,
                ready_us = t0.elapsed().as_micros() as u64,
                "native sandbox ready"
            );
        }
        let inner = Arc::clone(self);
        support::created(&spec.id, started, move |id| inner.teardown(id)).await
    }

    /// Hand a pre-started sandbox its configuration.
    async fn start_warm(&self, st: &Start<'_>, w: Warm) -> Result<i32, ProviderError> {
        let Start {
            spec,
            layout,
            limits,
            sd,
            ..
        } = *st;
        let cgroups = Cgroups {
            cgroup_leaf: w.slot.clone(),
            cgroups: layout.sandbox_dirs(&self.instance_id, &w.slot),
        };
        let state = SandboxState {
            pid: Some(w.pid),
            start_time: Some(w.start_time),
            ..SandboxState::new(spec, &self.instance_id, cgroups)
        };
        // From here on the sandbox is known by its id (teardown finds it).
        let claimed = w
            .dir
            .write(&state)
            .and_then(|()| fs::rename(&w.dir.dir, &sd.dir));
        if let Err(e) = claimed {
            let msg = format!("cannot claim a pre-started sandbox: {e}");
            self.discard_warm(w);
            return Err(ProviderError::Runtime(msg));
        }
        let Warm {
            slot,
            mut init,
            pid,
            pidfd,
            ..
        } = w;
        layout
            .set_limits(&self.instance_id, &slot, limits)
            .map_err(|e| ProviderError::Runtime(format!("cannot set limits: {e}")))?;
        self.finish(st, &mut init, pid, pidfd).await
    }

    /// Start a sandbox from scratch.
    async fn start_cold(&self, st: &Start<'_>) -> Result<i32, ProviderError> {
        let Start {
            spec,
            layout,
            limits,
            sd,
            deadline,
            ..
        } = *st;
        let cgroups = Cgroups {
            cgroup_leaf: spec.id.clone(),
            cgroups: layout.sandbox_dirs(&self.instance_id, &spec.id),
        };
        let mut state = SandboxState::new(spec, &self.instance_id, cgroups);
        // The state directory appears with its state file already inside, so
        // every directory `list` sees belongs to someone.
        let tmp = SandboxDir {
            dir: self
                .state_dir
                .join(format!(".new-{}-{}", self.instance_id, token())),
        };
        let prepare = || -> io::Result<()> {
            let mut b = fs::DirBuilder::new();
            b.mode(0o700).create(&tmp.dir)?;
            b.mode(0o755);
            for d in [tmp.upper(), tmp.work(), tmp.rootfs()] {
                b.create(d)?;
            }
            tmp.write(&state)?;
            fs::rename(&tmp.dir, &sd.dir)
        };
        if let Err(e) = prepare() {
            let _ = fs::remove_dir_all(&tmp.dir);
            return Err(ProviderError::Runtime(format!(
                "cannot create the state directory {}: {e}",
                sd.dir.display()
            )));
        }
        layout
            .create(&self.instance_id, &spec.id, limits)
            .map_err(|e| ProviderError::Runtime(format!("cannot create cgroups: {e}")))?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(sd.log())
            .map_err(|e| ProviderError::Runtime(format!("cannot create the agent log: {e}")))?;
        let mut init = self.spawn_init(log)?;
        init.send(&self.prelude(layout, &spec.id)).await?;
        let pid = match tokio::time::timeout_at(deadline, init.read_pid()).await {
            Ok(Some(pid)) if init.error.is_none() => pid,
            Ok(_) => {
                let e = init.error.clone().unwrap_or_else(|| {
                    "the sandbox init ended without starting the sandbox".into()
                });
                return Err(ProviderError::Runtime(with_log(
                    format!("sandbox init failed: {e}"),
                    &sd.log(),
                )));
            }
            Err(_) => {
                return Err(ProviderError::AgentStart(with_log(
                    format!(
                        "the sandbox init did not start within {} ms",
                        spec.start_timeout.as_millis()
                    ),
                    &sd.log(),
                )))
            }
        };
        let (fd, start) = self
            .verify_pid1(&spec.id, pid)
            .map_err(|e| ProviderError::Runtime(format!("sandbox PID 1 check failed: {e}")))?;
        state.pid = Some(pid);
        state.start_time = Some(start);
        sd.write(&state)
            .map_err(|e| ProviderError::Runtime(format!("cannot record the sandbox state: {e}")))?;
        self.finish(st, &mut init, pid, fd).await
    }

    fn info(&self, id: &str) -> Option<RuntimeInfo> {
        state::runtime_info::<Cgroups>(&self.state_dir, &self.instance_id, id)
    }

    fn list(&self) -> Result<Vec<RuntimeInfo>, ProviderError> {
        state::list_runtimes::<Cgroups>(&self.state_dir, &self.instance_id)
    }
}

#[async_trait]
impl Provider for NativeProvider {
    fn name(&self) -> &str {
        "native"
    }

    fn isolation(&self) -> Isolation {
        Isolation::Namespaces
    }

    fn capabilities(&self) -> Vec<String> {
        stacyvm_providers::agent_capabilities(&["seccomp"])
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, ProviderError> {
        let r = self.inner.create(spec).await;
        if let Err(e) = &r {
            tracing::debug!(sandbox = %spec.id, error = %e, "native sandbox failed to start");
        }
        r
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let inner = Arc::clone(&self.inner);
        support::destroy(sandbox_id, move |id| inner.teardown(id)).await
    }

    async fn inspect(&self, sandbox_id: &str) -> Result<Option<RuntimeInfo>, ProviderError> {
        Ok(self.inner.info(sandbox_id))
    }

    async fn shutdown(&self) {
        // Pre-started sandboxes belong to no one; a stopped server must not
        // leave them (or their cgroups) on the host.
        let this = NativeProvider {
            inner: Arc::clone(&self.inner),
        };
        let _ = tokio::task::spawn_blocking(move || this.set_warm_pool_size(0)).await;
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>, ProviderError> {
        let inner = Arc::clone(&self.inner);
        blocking("list", move || inner.list()).await?
    }

    async fn health(&self) -> Result<(), ProviderError> {
        let probe = async {
            let t0 = Instant::now();
            let result = self.inner.probe().await;
            match &result {
                Ok(()) => {
                    tracing::debug!(
                        elapsed_us = t0.elapsed().as_micros() as u64,
                        "native provider probe passed"
                    );
                    self.inner.refill();
                }
                Err(e) => tracing::warn!(error = %e, "native provider probe failed"),
            }
            result
        };
        self.inner.health.get(probe).await.map_err(unavailable)
    }

    async fn logs(&self, sandbox_id: &str, lines: usize) -> Vec<String> {
        state::log_tail(&self.inner.state_dir, sandbox_id, lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_layers_image_defaults_and_spec() {
        let image = vec![
            "PATH=/opt/bin:/usr/bin".to_string(),
            "LANG=C.UTF-8".to_string(),
            "broken".to_string(),
        ];
        let spec = BTreeMap::from([
            ("LANG".to_string(), "en_US.UTF-8".to_string()),
            ("X".to_string(), "1".to_string()),
        ]);
        let env = agent_env(&image, &spec, "sb-1");
        assert_eq!(
            env,
            [
                "PATH=/opt/bin:/usr/bin",
                "LANG=en_US.UTF-8",
                "HOSTNAME=sb-1",
                "HOME=/root",
                "X=1"
            ]
        );
        let env = agent_env(&[], &BTreeMap::new(), "h");
        assert_eq!(env[0], format!("PATH={DEFAULT_PATH}"));
    }

    #[test]
    fn hostnames_match_the_docker_provider() {
        assert_eq!(hostname_for("sb_AbC123"), "sb-abc123");
        assert_eq!(hostname_for("__"), "sandbox");
        assert_eq!(hostname_for(&"x".repeat(100)).len(), 63);
    }
}
