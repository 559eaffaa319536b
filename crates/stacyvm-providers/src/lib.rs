//! Sandbox runtimes ("providers") behind one trait, plus the client for the
//! in-sandbox agent.
//!
//! Providers differ only in how a sandbox is born and killed. Once it runs,
//! the server talks to it through the agent ([`agent::AgentClient`]) over the
//! Unix socket the provider exposes in the sandbox's host run directory.

pub mod agent;
pub mod custom;
pub mod docker;
pub mod mock;

use async_trait::async_trait;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a provider needs to start one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// `sb_…`; also the runtime's name/label.
    pub id: String,
    pub image: String,
    pub memory_mb: u64,
    pub vcpus: u32,
    /// Max processes inside the sandbox.
    pub pids_limit: u64,
    pub network: NetworkMode,
    /// Environment for the sandbox (the agent passes it to every exec).
    pub env: BTreeMap<String, String>,
    /// Host directory bind-mounted read-write at
    /// [`stacyvm_agent_proto::RUN_DIR_IN_SANDBOX`]; the agent creates its
    /// socket there. It exists when `create` is called.
    pub run_dir: PathBuf,
    /// Host path of the static agent binary, mounted read-only at
    /// [`stacyvm_agent_proto::AGENT_PATH_IN_SANDBOX`] and used as PID 1.
    pub agent_binary: PathBuf,
    /// How long to wait for the agent to answer before giving up.
    pub start_timeout: Duration,
}

impl SandboxSpec {
    /// Host path of the agent's socket.
    pub fn socket_path(&self) -> PathBuf {
        self.run_dir.join(stacyvm_agent_proto::SOCKET_NAME)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// Loopback only.
    None,
    /// Outbound network through the runtime's default network.
    Egress,
}

impl NetworkMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Egress => "egress",
        }
    }
    pub fn parse(s: &str) -> Option<NetworkMode> {
        match s {
            "none" => Some(NetworkMode::None),
            "egress" => Some(NetworkMode::Egress),
            _ => None,
        }
    }
}

/// A runtime object the provider knows about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    pub sandbox_id: String,
    /// Provider-specific id (container id, pid, …).
    pub runtime_id: String,
    pub running: bool,
}

/// What really isolates a provider's sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    Container,
    Namespaces,
    Microvm,
    Ptrace,
    None,
}

impl Isolation {
    pub fn as_str(&self) -> &'static str {
        match self {
            Isolation::Container => "container",
            Isolation::Namespaces => "namespaces",
            Isolation::Microvm => "microvm",
            Isolation::Ptrace => "ptrace",
            Isolation::None => "none",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The runtime itself is down or unreachable (daemon not running…).
    #[error("{provider} is unavailable: {message}")]
    Unavailable { provider: String, message: String },
    /// The image does not exist and could not be pulled.
    #[error("image {image} is not available: {message}")]
    Image { image: String, message: String },
    /// The request cannot be met by this runtime (bad limits, unsupported mode).
    #[error("{0}")]
    Invalid(String),
    /// The runtime failed while doing what was asked.
    #[error("{0}")]
    Runtime(String),
    /// The sandbox started but its agent never answered.
    #[error("agent did not become ready: {0}")]
    AgentStart(String),
}

/// An error and every source below it, joined with `: ` (sources whose
/// text the message already holds are left out).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A valid hostname (RFC 1123 label) derived from a sandbox id; every
/// provider names its sandboxes this way (`sb_x` → `sb-x`).
pub fn hostname_for(sandbox_id: &str) -> String {
    let mapped: String = sandbox_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed.is_empty() {
        "sandbox".to_string()
    } else {
        trimmed.to_string()
    }
}

/// Capability words a provider may claim in [`Provider::capabilities`].
/// The provider conformance suite (`stacyvm certify`) checks every claimed
/// word it knows; a provider must not claim what it cannot show.
pub mod caps {
    /// Commands run with exit codes, timeouts and stdin.
    pub const EXEC: &str = "exec";
    /// The exec API answers, but from a built-in command interpreter: no
    /// program runs (the `mock` provider). The suite's exec checks, which
    /// need real programs, are skipped for it.
    pub const SIMULATED_EXEC: &str = "simulated_exec";
    /// File API (read, write, list, move, chmod, delete).
    pub const FILES: &str = "files";
    /// Streamed exec output (NDJSON).
    pub const STREAMING: &str = "streaming";
    /// Live previews of ports inside the sandbox.
    pub const PREVIEW: &str = "preview";
    /// `memory_mb` is enforced (a hog is killed).
    pub const MEMORY_LIMIT: &str = "memory_limit";
    /// `vcpus` is enforced.
    pub const CPU_LIMIT: &str = "cpu_limit";
    /// The process count is capped (a fork bomb stops).
    pub const PIDS_LIMIT: &str = "pids_limit";
    /// `network: none` really leaves only loopback.
    pub const NETWORK_NONE: &str = "network_none";
    /// Sandbox processes see only their own processes.
    pub const ISOLATED_PIDS: &str = "isolated_pids";
    /// Sandbox processes cannot read or change host files.
    pub const ISOLATED_FILESYSTEM: &str = "isolated_filesystem";
    /// The sandbox has its own hostname.
    pub const ISOLATED_HOSTNAME: &str = "isolated_hostname";
}

/// What every agent-based provider with kernel isolation (namespaces or
/// containers, with cgroup limits) offers, plus its own `extra` words, for
/// [`Provider::capabilities`].
pub fn agent_capabilities(extra: &[&str]) -> Vec<String> {
    [
        caps::EXEC,
        caps::FILES,
        caps::STREAMING,
        caps::MEMORY_LIMIT,
        caps::CPU_LIMIT,
        caps::PIDS_LIMIT,
        caps::NETWORK_NONE,
        caps::PREVIEW,
        caps::ISOLATED_PIDS,
        caps::ISOLATED_FILESYSTEM,
        caps::ISOLATED_HOSTNAME,
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Name used in the API (`docker`, `native`, …).
    fn name(&self) -> &str;
    fn isolation(&self) -> Isolation;
    /// Feature words shown by `GET /api/v1/providers`.
    fn capabilities(&self) -> Vec<String>;
    /// Start the sandbox and return once its agent answers on
    /// `spec.socket_path()`. On error nothing of the sandbox is left running.
    async fn create(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, ProviderError>;
    /// Remove every runtime resource of the sandbox. Idempotent: a sandbox
    /// that is already gone is success.
    async fn destroy(&self, sandbox_id: &str) -> Result<(), ProviderError>;
    /// The runtime of one sandbox, `None` if it does not exist.
    async fn inspect(&self, sandbox_id: &str) -> Result<Option<RuntimeInfo>, ProviderError>;
    /// Every runtime this server instance owns (for reconciliation).
    async fn list(&self) -> Result<Vec<RuntimeInfo>, ProviderError>;
    /// Cheap liveness check of the runtime itself.
    async fn health(&self) -> Result<(), ProviderError>;
    /// The server is stopping gracefully: release whatever the provider
    /// holds that is not a sandbox (pre-started runtimes, caches). Running
    /// sandboxes stay up.
    async fn shutdown(&self) {}
    /// Recent runtime-side log lines of the sandbox (best effort).
    async fn logs(&self, _sandbox_id: &str, _lines: usize) -> Vec<String> {
        Vec::new()
    }
    /// How the server reaches the agent of a sandbox this provider runs.
    /// `socket` is the Unix socket in the sandbox's host run directory,
    /// which is where every local provider exposes it (the default).
    /// Providers whose agents listen elsewhere (the `custom` provider's
    /// TCP agents) answer their own endpoint, also after a server restart.
    async fn agent(
        &self,
        _sandbox_id: &str,
        socket: &Path,
    ) -> Result<agent::AgentClient, ProviderError> {
        Ok(agent::AgentClient::new(socket))
    }
}
