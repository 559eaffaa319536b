//! The per-sandbox state directory and its `state.json`: the native
//! provider's ([`stacyvm_native::state`]), with this provider's own field.
//!
//! ```text
//! <state_dir>/<sandbox id>/
//!     state.json   who owns the sandbox, PRoot's pid and start time, its loader
//!     rootfs/      the sandbox's own copy of the image (its `/`)
//!     tmp/         PRoot's scratch files (PROOT_TMP_DIR; PRoot 5.1 puts its
//!                  loader in /tmp regardless)
//!     agent.log    PRoot's and the agent's stdout and stderr
//! ```

use serde::{Deserialize, Serialize};
use stacyvm_native::state::StateFile;
pub use stacyvm_native::state::{SandboxDir, LOG_FILE, STATE_FILE};
use std::path::PathBuf;

/// This provider's own field of `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loader {
    /// The loader PRoot extracted for this sandbox (`/tmp/prooted-<pid>-…`
    /// with PRoot 5.1): the executable every sandbox process runs, so it
    /// identifies them even after PRoot is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader: Option<PathBuf>,
}

/// Contents of a proot sandbox's `state.json`; its `pid` is PRoot's.
pub type SandboxState = StateFile<Loader>;

#[cfg(test)]
mod tests {
    use super::*;
    use stacyvm_native::state::FORMAT;

    #[test]
    fn the_loader_is_kept_only_when_known() {
        let mut st = SandboxState {
            format: FORMAT,
            sandbox_id: "sb_1".into(),
            instance_id: "i".into(),
            image: "img".into(),
            pid: None,
            start_time: None,
            created_unix_ms: 1,
            extra: Loader::default(),
        };
        let json = serde_json::to_value(&st).unwrap();
        assert!(json.get("loader").is_none(), "{json}");
        assert_eq!(serde_json::from_value::<SandboxState>(json).unwrap(), st);
        st.extra.loader = Some("/tmp/prooted-1-x".into());
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["loader"], "/tmp/prooted-1-x");
        assert_eq!(serde_json::from_value::<SandboxState>(json).unwrap(), st);
    }
}
