//! Host readiness checks, shared by `stacyvm doctor` and `stacyvm certify`.

use stacyvm_core::config::Config;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    Skip,
}

/// One host check and what it found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    /// Stable id, e.g. `host.cgroups`, `docker.socket`.
    pub id: String,
    pub status: Status,
    /// What was found (versions, paths, the error).
    pub detail: String,
}

/// The host checks that matter for `provider` (kernel features, binaries
/// and their versions).
pub async fn for_provider(_cfg: &Config, _provider: &str) -> Vec<CheckResult> {
    Vec::new()
}
