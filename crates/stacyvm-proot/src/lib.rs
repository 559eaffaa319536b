//! The `proot` provider: sandboxes for hosts where Linux namespaces are not
//! available (no user namespaces, no privileges, locked-down containers).
//!
//! **This is not a security boundary.** PRoot translates file paths by
//! tracing every sandbox process with `ptrace`; the processes are ordinary
//! host processes with the server's user and privileges. They share the
//! host's process table, network (including its loopback), hostname, IPC and
//! kernel, can read the host's `/proc` and `/dev`, and nothing limits their
//! memory, CPU or process count. Anything a sandbox runs must be trusted as
//! much as the server itself. Use `native` or `docker` when isolation
//! matters. Requested limits and `network: none` are accepted and ignored
//! (with a warning in the server log); sandbox ports are ports of the host's
//! loopback, and `PROOT_TMP_DIR` is visible in sandbox environments.
//!
//! ```text
//! server ──spawn (setsid, no_new_privs, seccomp)──► proot -r <state>/<id>/rootfs … /.stacyvm/stacyvm-agent
//!   │                                                  │ ptrace: path translation for the agent and
//!   │                                                  ▼ every process it starts
//!   └── waits for <run_dir>/agent.sock ◄───────────── stacyvm-agent
//! ```
//!
//! * **Root filesystem**: the image's layers are flattened once per image
//!   (overlay-form whiteouts applied) into a cached base under the state
//!   directory, and each sandbox gets its own writable copy ([`rootfs`]).
//!   A copy is made ahead of time for the next create of the same image,
//!   which then only renames it into place.
//! * **Untranslated syscalls**: PRoot acts only on the syscalls it knows;
//!   newer ones (`statx`, `faccessat2`, `openat2`, `execveat`, …) would reach
//!   the kernel with the sandbox's paths taken as *host* paths. A seccomp
//!   filter installed before PRoot starts makes them fail with `ENOSYS`, so
//!   libc and language runtimes fall back to the older calls PRoot translates
//!   ([`filter`]).
//! * **Bookkeeping**: PRoot runs in a session of its own with its output in
//!   the sandbox's log file; its pid and start time are recorded in
//!   `<state_dir>/<id>/state.json`, so a restarted server finds its
//!   sandboxes again. Destroying a sandbox freezes and kills every process
//!   PRoot traces or started, and all their descendants, then PRoot itself
//!   (see `kill.rs`).

pub mod filter;
mod kill;
mod provider;
pub mod rootfs;
mod state;
mod sys;

pub use provider::{ProotOptions, ProotProvider, DEFAULT_SPARE_ROOTS};
pub use state::{Loader, SandboxState, LOG_FILE, STATE_FILE};
