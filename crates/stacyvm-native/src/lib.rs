//! The `native` provider: daemonless Linux sandboxes.
//!
//! Each sandbox is the agent running as PID 1 in new mount, PID, IPC, UTS,
//! network and cgroup namespaces (plus a user namespace when the server is
//! not root), on an overlayfs root made of the image's layers and a private
//! writable layer. Limits come from cgroups (v1, v2 or hybrid), and a
//! hand-written seccomp filter, a minimal capability set and
//! `no_new_privs` confine what runs inside. There is no daemon: the server
//! starts a short-lived helper (its own executable, see
//! [`sandbox_init_main`]) that builds the sandbox and becomes the agent, and
//! the sandbox keeps running on its own when the server stops.
//!
//! ```text
//! server ──spawn──► init helper ──unshare + fork──► PID 1 (new namespaces)
//!   │  config on stdin ─┘   │ "pid N" on stdout, exits     │ overlay, /proc, /dev, cgroups,
//!   │                       ▼                              │ pivot_root, caps, seccomp
//!   └── waits for the agent socket (inotify) ◄────────── execve(/.stacyvm/stacyvm-agent)
//! ```
//!
//! Mounts exist only inside each sandbox's own mount namespace, so they
//! vanish with it; destroying a sandbox kills its cgroup, removes the cgroup
//! directories and deletes its state directory.
//!
//! The per-sandbox state directory ([`state`]), the provider plumbing around
//! it ([`support`]: ids, the health cache, create cleanup, waiting for the
//! agent) and the system call wrappers ([`sys`]) serve the `proot` provider
//! too.

mod caps;
pub mod cgroup;
mod config;
mod init;
mod provider;
mod rootfs;
pub mod seccomp;
pub mod state;
pub mod support;
pub mod sys;

pub use caps::KEEP as KEPT_CAPABILITIES;
pub use init::sandbox_init_main;
pub use provider::{
    agent_env, hostname_for, NativeOptions, NativeProvider, DEFAULT_WARM_POOL, EGRESS_UNSUPPORTED,
};
pub use rootfs::{DirRootfs, ResolvedImage, RootfsSource};
pub use state::{SandboxState, LOG_FILE, STATE_FILE};
