//! The per-sandbox state directory and its `state.json`.
//!
//! ```text
//! <state_dir>/<sandbox id>/
//!     state.json   who owns the sandbox, PRoot's pid and start time
//!     rootfs/      the sandbox's own copy of the image (its `/`)
//!     tmp/         PRoot's scratch files (PROOT_TMP_DIR; PRoot 5.1 puts its
//!                  loader in /tmp regardless)
//!     agent.log    PRoot's and the agent's stdout and stderr
//! ```

use crate::sys;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Name of the state file in a sandbox's state directory.
pub const STATE_FILE: &str = "state.json";
/// Name of the log file in a sandbox's state directory.
pub const LOG_FILE: &str = "agent.log";
/// Version of the state file format.
pub const FORMAT: u32 = 1;

/// Contents of `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    pub format: u32,
    pub sandbox_id: String,
    pub instance_id: String,
    pub image: String,
    /// Host pid of the PRoot process; `None` while starting.
    pub pid: Option<i32>,
    /// Start time of that pid in clock ticks since boot, to tell a recycled
    /// pid from the sandbox.
    pub start_time: Option<u64>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The loader PRoot extracted for this sandbox (`/tmp/prooted-<pid>-…`
    /// with PRoot 5.1): the executable every sandbox process runs, so it
    /// identifies them even after PRoot is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader: Option<PathBuf>,
}

impl SandboxState {
    /// The recorded PRoot pid, if that process is alive (and is the same
    /// process: same start time, not a zombie).
    pub fn live_pid(&self) -> Option<i32> {
        let (pid, start) = (self.pid?, self.start_time?);
        let st = sys::proc_stat(pid)?;
        (st.start_time == start && st.state != 'Z' && st.state != 'X').then_some(pid)
    }

    /// Whether the recorded PRoot process is alive.
    pub fn is_running(&self) -> bool {
        self.live_pid().is_some()
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
    pub fn read(&self) -> io::Result<Option<SandboxState>> {
        match fs::read(self.state_file()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replace `state.json` atomically.
    pub fn write(&self, state: &SandboxState) -> io::Result<()> {
        let tmp = self.dir.join(".state.json.tmp");
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        fs::write(&tmp, bytes)?;
        fs::rename(&tmp, self.state_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_detects_liveness() {
        let dir = std::env::temp_dir().join(format!("stacyvm-proot-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let sd = SandboxDir { dir: dir.clone() };
        assert!(sd.read().unwrap().is_none());
        let me = std::process::id() as i32;
        let mut st = SandboxState {
            format: FORMAT,
            sandbox_id: "sb_1".into(),
            instance_id: "i".into(),
            image: "img".into(),
            pid: Some(me),
            start_time: sys::process_start_time(me),
            created_unix_ms: 1,
            loader: Some("/tmp/prooted-1-x".into()),
        };
        sd.write(&st).unwrap();
        assert_eq!(sd.read().unwrap().as_ref(), Some(&st));
        assert!(st.is_running());
        st.start_time = st.start_time.map(|t| t + 1);
        assert!(!st.is_running());
        st.pid = None;
        assert!(!st.is_running());
        fs::remove_dir_all(&dir).unwrap();
    }
}
