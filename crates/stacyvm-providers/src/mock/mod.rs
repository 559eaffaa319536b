//! The `mock` provider: sandboxes without any runtime, for developing
//! clients and for tests.
//!
//! **It isolates nothing and runs no code.** A mock sandbox is a directory
//! on the host, `<state_dir>/<id>/`, holding `state.json` (sandbox id,
//! server instance id, socket path, environment) and `root/`, the sandbox's
//! `/`. No process, container or namespace is made. The provider serves the
//! agent protocol itself, in-process, on the sandbox's socket
//! ([`SandboxSpec::socket_path`]), so the server's exec, streaming and file
//! code is the same as for every other provider:
//!
//! - files are real files under `root/`; every path is resolved inside it
//!   (symlinks included), so nothing outside can be read or written;
//! - exec interprets a tiny shell-like language (described in `shell.rs`):
//!   `echo`, `exit N`, `cat`, `ls`, `sleep`, redirections, `;`/`&&`/`||`…;
//!   any other command exits with 127;
//! - the TCP tunnel (live previews) answers `502 port_closed`.
//!
//! After a server restart, a new provider over the same state directory
//! serves this instance's sandboxes again (their files are kept), so
//! reconciliation re-attaches them.

mod exec;
mod fs;
mod server;
mod shell;

use crate::agent::AgentClient;
use crate::{caps, Isolation, Provider, ProviderError, RuntimeInfo, SandboxSpec};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use server::Served;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The provider's name in the API.
pub const NAME: &str = "mock";
/// Name of the per-sandbox state file.
const STATE_FILE: &str = "state.json";
/// Name of the per-sandbox root directory.
const ROOT_DIR: &str = "root";
/// Directories made in every new sandbox's root.
const INITIAL_DIRS: &[&str] = &["workspace", "tmp", "root"];
/// `PATH` of every mock sandbox (only shown by `env`).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the provider keeps its sandboxes and whose they are.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Per-sandbox directories live in `<state_dir>/<id>/`. Created if
    /// missing.
    pub state_dir: PathBuf,
    /// Id of this server instance; recorded in every sandbox's state, and
    /// only this instance's sandboxes are listed and served.
    pub instance_id: String,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct SandboxState {
    sandbox_id: String,
    instance_id: String,
    /// Host path of the agent socket the sandbox is served on.
    socket: PathBuf,
    image: String,
    memory_mb: u64,
    /// The sandbox's environment, as every exec starts with it.
    env: BTreeMap<String, String>,
    /// Unix seconds.
    created_at: u64,
}

/// The `mock` provider. See the module documentation.
pub struct MockProvider {
    inner: Arc<Inner>,
}

struct Inner {
    state_dir: PathBuf,
    instance_id: String,
    served: Mutex<HashMap<String, Served>>,
}

impl std::fmt::Debug for MockProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockProvider")
            .field("state_dir", &self.inner.state_dir)
            .field("instance_id", &self.inner.instance_id)
            .finish()
    }
}

/// Sandbox ids become directory names: letters, digits, `_` and `-` only.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn runtime_error(what: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Runtime(format!("mock provider: {what}: {e}"))
}

fn read_state(dir: &Path) -> io::Result<SandboxState> {
    let bytes = std::fs::read(dir.join(STATE_FILE))?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl Inner {
    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join(id)
    }

    fn served(&self) -> std::sync::MutexGuard<'_, HashMap<String, Served>> {
        self.served.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serve a sandbox whose directory exists.
    fn start_serving(&self, st: &SandboxState) -> io::Result<()> {
        let dir = self.sandbox_dir(&st.sandbox_id);
        let served = server::serve(
            &st.sandbox_id,
            fs::Root::new(dir.join(ROOT_DIR)),
            st.env.clone(),
            st.memory_mb,
            &st.socket,
        )?;
        self.served().insert(st.sandbox_id.clone(), served);
        Ok(())
    }

    /// Blocking: this instance's sandboxes found on disk.
    fn scan(&self) -> io::Result<Vec<SandboxState>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.state_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for ent in entries {
            let ent = ent?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if !valid_id(&name) {
                continue;
            }
            match read_state(&ent.path()) {
                Ok(st) if st.instance_id == self.instance_id && st.sandbox_id == name => {
                    out.push(st)
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(dir = %ent.path().display(), error = %e, "skipping a mock sandbox directory without a readable state")
                }
            }
        }
        Ok(out)
    }

    /// Blocking: remove half-made directories of this instance's creates.
    fn sweep_partial(&self) {
        let prefix = format!(".new-{}-", self.instance_id);
        let Ok(entries) = std::fs::read_dir(&self.state_dir) else {
            return;
        };
        for ent in entries.flatten() {
            if ent.file_name().to_string_lossy().starts_with(&prefix) {
                if let Err(e) = std::fs::remove_dir_all(ent.path()) {
                    tracing::warn!(dir = %ent.path().display(), error = %e, "cannot remove a partial mock sandbox");
                }
            }
        }
    }

    /// Blocking: make the sandbox's directory (published atomically by a
    /// rename, so a crash never leaves a half-made sandbox under its id).
    fn make_dir(&self, st: &SandboxState) -> io::Result<()> {
        let partial = self
            .state_dir
            .join(format!(".new-{}-{}", self.instance_id, st.sandbox_id));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        for d in INITIAL_DIRS {
            std::fs::create_dir_all(partial.join(ROOT_DIR).join(d))?;
        }
        let json = serde_json::to_vec_pretty(st)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        std::fs::write(partial.join(STATE_FILE), json)?;
        match std::fs::rename(&partial, self.sandbox_dir(&st.sandbox_id)) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                Err(e)
            }
        }
    }

    /// Blocking: delete the sandbox's directory unless another instance
    /// owns it. Gone already is success.
    fn remove_dir(&self, id: &str) -> io::Result<()> {
        let dir = self.sandbox_dir(id);
        match read_state(&dir) {
            Ok(st) if st.instance_id != self.instance_id => {
                tracing::warn!(sandbox = %id, owner = %st.instance_id, "not removing a mock sandbox of another server instance");
                return Ok(());
            }
            _ => {}
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl MockProvider {
    /// Open the provider over `options.state_dir` and serve again every
    /// sandbox of this instance found there (whose socket directory still
    /// exists). Must be called inside a tokio runtime.
    pub async fn new(options: MockOptions) -> Result<MockProvider, ProviderError> {
        tracing::warn!(
            state_dir = %options.state_dir.display(),
            "the mock provider is enabled: its sandboxes ISOLATE NOTHING and RUN NO CODE \
             (directories on the host, commands interpreted by a tiny built-in language); \
             use it only for client development and tests"
        );
        std::fs::create_dir_all(&options.state_dir).map_err(|e| {
            runtime_error(&format!("cannot create {}", options.state_dir.display()), e)
        })?;
        let inner = Arc::new(Inner {
            state_dir: options.state_dir,
            instance_id: options.instance_id,
            served: Mutex::new(HashMap::new()),
        });
        let scan_inner = Arc::clone(&inner);
        let found = tokio::task::spawn_blocking(move || {
            scan_inner.sweep_partial();
            scan_inner.scan()
        })
        .await
        .map_err(|e| runtime_error("scan task failed", e))?
        .map_err(|e| runtime_error("cannot read the state directory", e))?;
        for st in found {
            let socket_dir_exists = st.socket.parent().is_some_and(Path::is_dir);
            if !socket_dir_exists {
                tracing::info!(sandbox = %st.sandbox_id, socket = %st.socket.display(), "mock sandbox not served again: its socket directory is gone");
                continue;
            }
            match inner.start_serving(&st) {
                Ok(()) => {
                    tracing::info!(sandbox = %st.sandbox_id, "serving mock sandbox again")
                }
                Err(e) => {
                    tracing::warn!(sandbox = %st.sandbox_id, error = %e, "cannot serve mock sandbox again")
                }
            }
        }
        Ok(MockProvider { inner })
    }

    fn info(&self, id: &str, running: bool) -> RuntimeInfo {
        RuntimeInfo {
            sandbox_id: id.to_string(),
            runtime_id: format!("mock-{id}"),
            running,
        }
    }

    fn is_served(&self, id: &str) -> bool {
        self.inner.served().get(id).is_some_and(Served::alive)
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, ProviderError>
    where
        F: FnOnce(&Inner) -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| runtime_error("task failed", e))?
            .map_err(|e| runtime_error("filesystem", e))
    }
}

#[async_trait]
impl Provider for MockProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn isolation(&self) -> Isolation {
        Isolation::None
    }

    fn capabilities(&self) -> Vec<String> {
        [caps::SIMULATED_EXEC, caps::FILES, caps::STREAMING]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, ProviderError> {
        let id = spec.id.clone();
        if !valid_id(&id) {
            return Err(ProviderError::Invalid(format!(
                "invalid sandbox id {id:?} for the mock provider"
            )));
        }
        if self.inner.served().contains_key(&id) || self.inner.sandbox_dir(&id).exists() {
            return Err(ProviderError::Invalid(format!(
                "mock sandbox {id} already exists"
            )));
        }
        let mut env = BTreeMap::from([
            ("PATH".to_string(), DEFAULT_PATH.to_string()),
            ("HOME".to_string(), "/root".to_string()),
            ("HOSTNAME".to_string(), crate::hostname_for(&id)),
        ]);
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let st = SandboxState {
            sandbox_id: id.clone(),
            instance_id: self.inner.instance_id.clone(),
            socket: spec.socket_path(),
            image: spec.image.clone(),
            memory_mb: spec.memory_mb,
            env,
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let made = st.clone();
        self.blocking(move |inner| inner.make_dir(&made)).await?;
        if let Err(e) = self.inner.start_serving(&st) {
            let _ = self.destroy(&id).await;
            return Err(runtime_error(
                &format!("cannot listen on {}", st.socket.display()),
                e,
            ));
        }
        if let Err(e) = AgentClient::new(spec.socket_path())
            .wait_ready(spec.start_timeout)
            .await
        {
            let _ = self.destroy(&id).await;
            return Err(ProviderError::AgentStart(e.to_string()));
        }
        tracing::info!(sandbox = %id, dir = %self.inner.sandbox_dir(&id).display(), "mock sandbox created (nothing runs on the host)");
        Ok(self.info(&id, true))
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        if !valid_id(sandbox_id) {
            return Ok(());
        }
        let served = self.inner.served().remove(sandbox_id);
        if let Some(s) = served {
            s.shut_down();
        }
        let id = sandbox_id.to_string();
        self.blocking(move |inner| inner.remove_dir(&id)).await
    }

    async fn inspect(&self, sandbox_id: &str) -> Result<Option<RuntimeInfo>, ProviderError> {
        if !valid_id(sandbox_id) {
            return Ok(None);
        }
        if self.is_served(sandbox_id) {
            return Ok(Some(self.info(sandbox_id, true)));
        }
        let id = sandbox_id.to_string();
        let mine = self
            .blocking(move |inner| match read_state(&inner.sandbox_dir(&id)) {
                Ok(st) => Ok(st.instance_id == inner.instance_id),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            })
            .await?;
        Ok(mine.then(|| self.info(sandbox_id, false)))
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>, ProviderError> {
        let found = self.blocking(|inner| inner.scan()).await?;
        Ok(found
            .into_iter()
            .map(|st| {
                let running = self.is_served(&st.sandbox_id);
                self.info(&st.sandbox_id, running)
            })
            .collect())
    }

    async fn health(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn logs(&self, sandbox_id: &str, lines: usize) -> Vec<String> {
        self.inner
            .served()
            .get(sandbox_id)
            .map(|s| s.ctx.tail(lines))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_directory_names() {
        assert!(valid_id("sb_abc123"));
        assert!(valid_id("a-b"));
        for bad in ["", "..", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
