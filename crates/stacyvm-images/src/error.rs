//! The one error type of the crate.

use std::path::Path;

/// Everything that can go wrong while pulling, importing or reading images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image reference cannot be parsed (`python:3.12`,
    /// `ghcr.io/org/img@sha256:…` are fine; `Python::x` is not).
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// The registry has no such repository, tag or digest (404 /
    /// `MANIFEST_UNKNOWN`), or the image is not in the store.
    #[error("image not found: {0}")]
    NotFound(String),
    /// The registry refused our credentials or the anonymous token.
    #[error("registry authentication failed: {0}")]
    Auth(String),
    /// The registry answered with an unexpected status.
    #[error("registry error (HTTP {status}): {message}")]
    Registry { status: u16, message: String },
    /// The registry could not be reached or the connection broke.
    #[error("network error: {0}")]
    Network(String),
    /// Content did not hash to the digest it was fetched by.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    /// The image uses something this store does not handle (zstd layers, no
    /// image for this platform in an index, whiteouts without root…).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Malformed data: a manifest or config that does not parse, a layer
    /// whose tar is broken or tries to write outside its directory, a store
    /// file that is damaged.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> ImageError {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn io_path(what: &str, path: &Path, source: std::io::Error) -> ImageError {
        ImageError::Io {
            context: format!("{what} {}", path.display()),
            source,
        }
    }
}

/// Attach a context to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io_path(what, path, e))
    }
}
