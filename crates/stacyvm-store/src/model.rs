//! The sandbox record and the one lifecycle state machine.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Lifecycle of a sandbox.
///
/// ```text
///  creating ──► running ◄──► unhealthy
///     │  │        │  │           │
///     │  │        │  └──► expired│
///     │  ▼        ▼        │     ▼
///     │ error ──► destroying ◄───┘
///     │  │          │
///     └──┴────────► destroyed   (error may be cleaned up to destroyed directly)
/// ```
///
/// `creating`, `running` and `unhealthy` are *active*: they count against
/// capacity. `destroyed` is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxState {
    Creating,
    Running,
    Unhealthy,
    Expired,
    Destroying,
    Destroyed,
    Error,
}

impl SandboxState {
    pub const ACTIVE: [SandboxState; 3] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Unhealthy,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Unhealthy => "unhealthy",
            SandboxState::Expired => "expired",
            SandboxState::Destroying => "destroying",
            SandboxState::Destroyed => "destroyed",
            SandboxState::Error => "error",
        }
    }

    pub fn is_active(&self) -> bool {
        Self::ACTIVE.contains(self)
    }

    /// Whether the lifecycle allows going from `self` to `to`.
    pub fn can_become(&self, to: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, to),
            (Creating, Running)
                | (Creating, Error)
                | (Creating, Destroying)
                | (Running, Unhealthy)
                | (Running, Expired)
                | (Running, Destroying)
                | (Running, Error)
                | (Unhealthy, Running)
                | (Unhealthy, Expired)
                | (Unhealthy, Destroying)
                | (Unhealthy, Error)
                | (Expired, Destroying)
                | (Error, Destroying)
                | (Error, Destroyed)
                | (Destroying, Destroyed)
        )
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SandboxState {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "creating" => SandboxState::Creating,
            "running" => SandboxState::Running,
            "unhealthy" => SandboxState::Unhealthy,
            "expired" => SandboxState::Expired,
            "destroying" => SandboxState::Destroying,
            "destroyed" => SandboxState::Destroyed,
            "error" => SandboxState::Error,
            _ => return Err(()),
        })
    }
}

/// One sandbox as stored. Times are Unix milliseconds (UTC).
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRecord {
    pub id: String,
    pub state: SandboxState,
    pub provider: String,
    pub image: String,
    pub memory_mb: u64,
    pub vcpus: u32,
    pub owner_id: Option<String>,
    pub template: Option<String>,
    pub network: String,
    pub metadata: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub updated_at_ms: i64,
    pub error: Option<String>,
    pub runtime_id: Option<String>,
    /// Tenant of the API key that created it (visibility boundary).
    pub tenant: Option<String>,
    /// Identity of the API key that created it (per-key quotas).
    pub creator: Option<String>,
    /// Template whose warm pool holds it; `None` once claimed (or never pooled).
    pub pool: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [SandboxState; 7] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Unhealthy,
        SandboxState::Expired,
        SandboxState::Destroying,
        SandboxState::Destroyed,
        SandboxState::Error,
    ];

    #[test]
    fn names_round_trip() {
        for s in ALL {
            assert_eq!(s.as_str().parse::<SandboxState>(), Ok(s));
        }
        assert!("bogus".parse::<SandboxState>().is_err());
    }

    #[test]
    fn destroyed_is_final_and_everything_can_be_destroyed() {
        for s in ALL {
            assert!(!SandboxState::Destroyed.can_become(s));
            if s != SandboxState::Destroyed && s != SandboxState::Destroying {
                assert!(
                    s.can_become(SandboxState::Destroying) || s.can_become(SandboxState::Destroyed),
                    "{s} cannot be destroyed"
                );
            }
        }
        assert!(!SandboxState::Running.can_become(SandboxState::Creating));
        assert!(!SandboxState::Running.can_become(SandboxState::Running));
    }
}
