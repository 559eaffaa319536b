//! What the provider tells the sandbox init: two JSON lines on the init's
//! standard input. The [`Prelude`] is read by the helper before it creates
//! the namespaces; the [`InitConfig`] by the sandbox's PID 1 afterwards, which
//! lets the provider start a sandbox ahead of time and hand it its
//! configuration later.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What the init is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitMode {
    /// Start a sandbox: its PID 1 execs the agent.
    Sandbox,
    /// Check that namespaces, overlayfs, `/proc` and the seccomp filter work,
    /// then exit; nothing is left behind.
    Probe,
}

/// One cgroup v1 hierarchy to mount read-only inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupMount {
    /// Directory name under `/sys/fs/cgroup` (e.g. `memory`, `cpu,cpuacct`).
    pub name: String,
    /// Mount options naming the controllers (e.g. `memory`, `cpu,cpuacct`).
    pub options: String,
    /// Extra names that point to `name` (e.g. `cpu` → `cpu,cpuacct`).
    pub aliases: Vec<String>,
}

/// How the cgroup filesystem appears inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupView {
    /// A cgroup2 mount at `/sys/fs/cgroup`.
    Unified,
    /// A tmpfs at `/sys/fs/cgroup` with these v1 hierarchies (and the v2
    /// tree at `unified` when `with_unified`).
    Legacy {
        hierarchies: Vec<CgroupMount>,
        with_unified: bool,
    },
    /// Nothing at `/sys/fs/cgroup`.
    None,
}

/// What the helper needs before the namespaces exist.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prelude {
    /// `cgroup.procs` files the helper moves itself into before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// Run in a new user namespace mapping this (uid, gid) to root; set when
    /// the provider does not run as root.
    pub user_namespace: Option<(u32, u32)>,
}

/// Everything the sandbox's PID 1 needs, resolved by the provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    pub mode: InitMode,
    /// Sandbox id (for messages).
    pub sandbox_id: String,
    /// Hostname inside the sandbox.
    pub hostname: String,
    /// Image layers, bottom first.
    pub layers: Vec<PathBuf>,
    /// Writable overlay layer.
    pub upper: PathBuf,
    /// Overlay work directory (same filesystem as `upper`).
    pub work: PathBuf,
    /// Empty directory the overlay is mounted on before `pivot_root`.
    pub rootfs: PathBuf,
    /// Host path of the agent binary.
    pub agent_binary: PathBuf,
    /// Host directory mounted at the run directory inside the sandbox.
    pub run_dir: PathBuf,
    /// The cgroup filesystem inside the sandbox.
    pub cgroup_view: CgroupView,
    /// The agent's environment (`KEY=value`).
    pub env: Vec<String>,
    /// The agent's working directory; `/` when unset or missing.
    pub working_dir: Option<String>,
}
