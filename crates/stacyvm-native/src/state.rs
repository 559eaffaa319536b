//! The per-sandbox state directory and its `state.json`, shared by the
//! providers that keep their sandboxes' state on this host (this one and the
//! `proot` provider).
//!
//! ```text
//! <state_dir>/<sandbox id>/
//!     state.json   who owns the sandbox, its main process (native: PID 1;
//!                  proot: PRoot) and what else the provider records
//!     rootfs/      native: mount point of the root (inside the sandbox's
//!                  mount namespace only); proot: the sandbox's own copy of
//!                  the image (its `/`)
//!     upper/       native: writable overlay layer
//!     work/        native: overlay work directory
//!     tmp/         proot: PRoot's scratch files (PROOT_TMP_DIR)
//!     agent.log    the agent's (and PRoot's) stdout and stderr
//! ```

use crate::support::{check_id, now_unix_ms, tail_file, token};
use crate::sys;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use stacyvm_providers::{ProviderError, RuntimeInfo, SandboxSpec};
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Name of the state file in a sandbox's state directory.
pub const STATE_FILE: &str = "state.json";
/// Name of the agent's log file in a sandbox's state directory.
pub const LOG_FILE: &str = "agent.log";
/// Version of the state file format.
pub const FORMAT: u32 = 1;

/// Contents of `state.json`: what every provider records, and the
/// provider's own fields (`extra`, stored next to the others).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile<X> {
    pub format: u32,
    pub sandbox_id: String,
    pub instance_id: String,
    pub image: String,
    /// Host pid of the sandbox's main process; `None` while starting.
    pub pid: Option<i32>,
    /// Start time of that pid in clock ticks since boot, to tell a recycled
    /// pid from the sandbox.
    pub start_time: Option<u64>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    #[serde(flatten)]
    pub extra: X,
}

/// The native provider's own fields of `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroups {
    /// Name of the sandbox's cgroups under `stacyvm/<instance>/`: the
    /// sandbox id, or the name of the pre-started slot it was made from.
    pub cgroup_leaf: String,
    /// The sandbox's cgroup directories.
    pub cgroups: Vec<PathBuf>,
}

/// Contents of a native sandbox's `state.json`.
pub type SandboxState = StateFile<Cgroups>;

impl<X> StateFile<X> {
    /// The state of a sandbox being created now: no process yet.
    pub fn new(spec: &SandboxSpec, instance_id: &str, extra: X) -> Self {
        StateFile {
            format: FORMAT,
            sandbox_id: spec.id.clone(),
            instance_id: instance_id.to_string(),
            image: spec.image.clone(),
            pid: None,
            start_time: None,
            created_unix_ms: now_unix_ms(),
            extra,
        }
    }

    /// The recorded pid while it still belongs to the recorded process (same
    /// start time), even as a zombie.
    pub fn same_pid(&self) -> Option<i32> {
        let (pid, start) = (self.pid?, self.start_time?);
        (sys::proc_stat(pid)?.start_time == start).then_some(pid)
    }

    /// The recorded pid, if that process is alive (and is the same process:
    /// same start time, not a zombie).
    pub fn live_pid(&self) -> Option<i32> {
        let (pid, start) = (self.pid?, self.start_time?);
        let st = sys::proc_stat(pid)?;
        (st.start_time == start && st.is_live()).then_some(pid)
    }

    /// Whether the recorded process is alive (and is the same process).
    pub fn is_running(&self) -> bool {
        self.live_pid().is_some()
    }

    /// A pidfd on the process `which` names ([`Self::live_pid`] or
    /// [`Self::same_pid`]), checked again once it is open: a signal sent
    /// through it can never reach a recycled pid.
    pub fn pidfd(&self, which: fn(&Self) -> Option<i32>) -> Option<(i32, OwnedFd)> {
        let pid = which(self)?;
        let fd = sys::pidfd_open(pid).ok()?;
        (which(self) == Some(pid)).then_some((pid, fd))
    }
}

/// Paths of one sandbox's state directory.
#[derive(Debug, Clone)]
pub struct SandboxDir {
    pub dir: PathBuf,
}

impl SandboxDir {
    pub fn new(state_dir: &Path, id: &str) -> Self {
        SandboxDir {
            dir: state_dir.join(id),
        }
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn tmp(&self) -> PathBuf {
        self.dir.join("tmp")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// Read `state.json`; `Ok(None)` when there is none.
    pub fn read<X: DeserializeOwned>(&self) -> io::Result<Option<StateFile<X>>> {
        match fs::read(self.state_file()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replace `state.json` atomically.
    pub fn write<X: Serialize>(&self, state: &StateFile<X>) -> io::Result<()> {
        let tmp = self.dir.join(".state.json.tmp");
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        fs::write(&tmp, bytes)?;
        fs::rename(&tmp, self.state_file())
    }

    /// The state of a sandbox about to be torn down: `None` when the
    /// directory belongs to another instance (which must be left alone),
    /// else its state, if it has a readable one (an unreadable one is logged;
    /// the sandbox is still cleaned up).
    pub fn teardown_state<X: DeserializeOwned>(
        &self,
        id: &str,
        instance_id: &str,
    ) -> Option<Option<StateFile<X>>> {
        let state = match self.read::<X>() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(sandbox = id, error = %e, "unreadable state file; cleaning up anyway");
                None
            }
        };
        if let Some(s) = &state {
            if s.instance_id != instance_id {
                tracing::warn!(
                    sandbox = id,
                    owner = %s.instance_id,
                    "state directory belongs to another instance; leaving it alone"
                );
                return None;
            }
        }
        Some(state)
    }

    /// Move the directory aside (to `<state_dir>/.trash-<id>-…`) and delete
    /// it in the background: deleting a sandbox's files can take a while.
    /// A directory that is already gone is fine.
    pub fn remove_in_background(&self, state_dir: &Path, id: &str) -> Result<(), ProviderError> {
        let trash = state_dir.join(format!(".trash-{id}-{}", token()));
        match fs::rename(&self.dir, &trash) {
            Ok(()) => {
                std::thread::spawn(move || {
                    if let Err(e) = fs::remove_dir_all(&trash) {
                        tracing::warn!(path = %trash.display(), error = %e, "cannot delete a sandbox's files");
                    }
                });
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::Runtime(format!(
                "cannot remove {}: {e}",
                self.dir.display()
            ))),
        }
    }
}

/// The recorded state of sandbox `id` under `state_dir`, if it belongs to
/// `instance_id`.
pub fn own_state<X: DeserializeOwned>(
    state_dir: &Path,
    instance_id: &str,
    id: &str,
) -> Option<StateFile<X>> {
    check_id("sandbox id", id).ok()?;
    SandboxDir::new(state_dir, id)
        .read()
        .ok()
        .flatten()
        .filter(|s| s.instance_id == instance_id)
}

/// The runtime of sandbox `id` as recorded under `state_dir`, if it is one
/// of `instance_id`'s.
pub fn runtime_info<X: DeserializeOwned>(
    state_dir: &Path,
    instance_id: &str,
    id: &str,
) -> Option<RuntimeInfo> {
    check_id("sandbox id", id).ok()?;
    let state = SandboxDir::new(state_dir, id).read::<X>().ok().flatten()?;
    if state.instance_id != instance_id || state.sandbox_id != id {
        return None;
    }
    Some(RuntimeInfo {
        sandbox_id: state.sandbox_id.clone(),
        runtime_id: state.pid.map(|p| p.to_string()).unwrap_or_default(),
        running: state.is_running(),
    })
}

/// Every sandbox of `instance_id` recorded under `state_dir`, sorted by id.
pub fn list_runtimes<X: DeserializeOwned>(
    state_dir: &Path,
    instance_id: &str,
) -> Result<Vec<RuntimeInfo>, ProviderError> {
    let entries = fs::read_dir(state_dir)
        .map_err(|e| ProviderError::Runtime(format!("cannot list {}: {e}", state_dir.display())))?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Ok(name) = std::str::from_utf8(name.as_bytes()) else {
            continue;
        };
        if let Some(info) = runtime_info::<X>(state_dir, instance_id, name) {
            out.push(info);
        }
    }
    out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
    Ok(out)
}

/// The last `lines` lines of sandbox `id`'s log under `state_dir`.
pub fn log_tail(state_dir: &Path, id: &str, lines: usize) -> Vec<String> {
    if check_id("sandbox id", id).is_err() {
        return Vec::new();
    }
    tail_file(&SandboxDir::new(state_dir, id).log(), lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_detects_liveness() {
        let dir = std::env::temp_dir().join(format!("stacyvm-native-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let sd = SandboxDir { dir: dir.clone() };
        assert!(sd.read::<Cgroups>().unwrap().is_none());
        let me = std::process::id() as i32;
        let mut st = SandboxState {
            format: FORMAT,
            sandbox_id: "sb_1".into(),
            instance_id: "i".into(),
            image: "img".into(),
            pid: Some(me),
            start_time: sys::process_start_time(me),
            created_unix_ms: 1,
            extra: Cgroups {
                cgroup_leaf: "sb_1".into(),
                cgroups: vec!["/sys/fs/cgroup/x".into()],
            },
        };
        sd.write(&st).unwrap();
        assert_eq!(sd.read().unwrap().as_ref(), Some(&st));
        // The provider's fields sit next to the common ones.
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(sd.state_file()).unwrap()).unwrap();
        assert_eq!(json["cgroup_leaf"], "sb_1");
        assert_eq!(json["pid"], me);
        assert!(st.is_running());
        assert_eq!(st.same_pid(), Some(me));
        assert_eq!(st.pidfd(SandboxState::live_pid).map(|(p, _)| p), Some(me));
        st.start_time = st.start_time.map(|t| t + 1);
        assert!(!st.is_running());
        assert_eq!(st.same_pid(), None);
        assert!(st.pidfd(SandboxState::same_pid).is_none());
        st.pid = None;
        assert!(!st.is_running());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_own_sandboxes_are_listed() {
        let root = std::env::temp_dir().join(format!("stacyvm-native-list-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (id, instance) in [("sb_b", "i"), ("sb_a", "i"), ("sb_c", "other")] {
            let sd = SandboxDir::new(&root, id);
            fs::create_dir_all(&sd.dir).unwrap();
            sd.write(&StateFile {
                format: FORMAT,
                sandbox_id: id.into(),
                instance_id: instance.into(),
                image: "img".into(),
                pid: None,
                start_time: None,
                created_unix_ms: 1,
                extra: (),
            })
            .unwrap();
        }
        fs::create_dir_all(root.join(".new-i-x")).unwrap();
        let ids: Vec<String> = list_runtimes::<()>(&root, "i")
            .unwrap()
            .into_iter()
            .map(|r| r.sandbox_id)
            .collect();
        assert_eq!(ids, ["sb_a", "sb_b"]);
        assert!(own_state::<()>(&root, "i", "sb_c").is_none());
        assert!(own_state::<()>(&root, "other", "sb_c").is_some());
        let sd = SandboxDir::new(&root, "sb_c");
        assert!(sd.teardown_state::<()>("sb_c", "i").is_none());
        assert!(sd.teardown_state::<()>("sb_c", "other").is_some());
        sd.remove_in_background(&root, "sb_c").unwrap();
        assert!(!sd.dir.exists());
        assert!(SandboxDir::new(&root, "gone")
            .remove_in_background(&root, "gone")
            .is_ok());
        // The moved directory may still be being deleted.
        let _ = fs::remove_dir_all(&root);
    }
}
