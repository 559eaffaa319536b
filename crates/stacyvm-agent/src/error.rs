//! The agent's one error type: an HTTP status plus an
//! [`ErrorBody`](stacyvm_agent_proto::ErrorBody), shared with the mock
//! provider through the protocol crate.

use stacyvm_agent_proto::error::errno;
pub use stacyvm_agent_proto::error::{io_message, ApiError};

// The protocol crate maps I/O errors by the generic Linux errno numbers;
// they must be this target's.
const _: () = assert!(
    errno::EPERM == libc::EPERM
        && errno::ENOENT == libc::ENOENT
        && errno::EACCES == libc::EACCES
        && errno::EEXIST == libc::EEXIST
        && errno::ENOTDIR == libc::ENOTDIR
        && errno::EISDIR == libc::EISDIR
        && errno::EINVAL == libc::EINVAL
        && errno::ENOTEMPTY == libc::ENOTEMPTY
        && errno::ELOOP == libc::ELOOP
);

/// The HTTP status of an error.
pub fn status(err: &ApiError) -> hyper::StatusCode {
    hyper::StatusCode::from_u16(err.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR)
}
