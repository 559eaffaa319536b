//! The StacyVM control plane.
//!
//! [`engine::Engine`] owns the lifecycle of every sandbox: validation and
//! admission, creation through a provider, the TTL reaper, reconciliation
//! after a restart, and the data plane calls (exec, files) that it forwards
//! to each sandbox's agent. The API layer only translates HTTP into calls on
//! the engine.

pub mod audit;
pub mod certification;
pub mod clock;
pub mod config;
pub mod duration;
pub mod engine;
pub mod error;
pub mod governance;
pub mod id;
pub mod images;
pub mod lint;
pub mod metrics;
pub mod preview;
pub mod setup;

pub use config::Config;
pub use engine::Engine;
pub use error::{Error, ErrorCode};
