//! Error answers of the mock agent: the same statuses, codes and messages
//! as the real agent's.

use http::StatusCode;
use stacyvm_agent_proto::{codes, path::PathError, ErrorBody};
use std::fmt;
use std::io;

/// Linux errno values the mapping needs (identical on every Linux target).
mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const ENOTEMPTY: i32 = 39;
    pub const ELOOP: i32 = 40;
}

#[cfg(test)]
pub(crate) use errno::ELOOP;
pub(crate) use errno::{EACCES, EEXIST, EISDIR, ENOTDIR, ENOTEMPTY};

/// An error answer: HTTP status, API error code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, codes::INVALID_REQUEST, message)
    }

    /// 404 `file_not_found` for `path`.
    pub fn no_such_file(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            codes::FILE_NOT_FOUND,
            format!("no such file: {path}"),
        )
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, codes::CONFLICT, message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, codes::FORBIDDEN, message)
    }

    /// 502 `port_closed`.
    pub fn port_closed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, codes::PORT_CLOSED, message)
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL, message)
    }

    /// 404 `not_found` for an unknown route.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such route: {path}"),
        )
    }

    /// 405 for a known route called with the wrong method.
    pub fn method_not_allowed(method: &http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("method {method} is not allowed on {path}"),
        )
    }

    /// 413 `payload_too_large`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {limit} bytes"),
        )
    }

    /// Map an I/O error from an operation on `path` (a sandbox path).
    pub fn from_io(err: &io::Error, path: &str) -> Self {
        match err.raw_os_error() {
            Some(errno::ENOENT) | Some(errno::ENOTDIR) => Self::no_such_file(path),
            Some(errno::EACCES) | Some(errno::EPERM) => {
                Self::forbidden(format!("permission denied: {path}"))
            }
            Some(errno::ENOTEMPTY) => Self::conflict(format!("directory not empty: {path}")),
            Some(errno::EEXIST) => Self::conflict(format!("already exists: {path}")),
            Some(errno::EISDIR) => Self::invalid(format!("{path} is a directory")),
            Some(errno::EINVAL) => Self::invalid(format!("{path}: {}", io_message(err))),
            _ => Self::internal(format!("{path}: {}", io_message(err))),
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.to_string(),
            message: self.message.clone(),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl From<PathError> for ApiError {
    fn from(e: PathError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

/// An I/O error's message without std's " (os error N)" suffix.
pub(crate) fn io_message(err: &io::Error) -> String {
    let s = err.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// The `ELOOP` error of a symlink chain that never ends.
pub(crate) fn too_many_links() -> io::Error {
    io::Error::from_raw_os_error(errno::ELOOP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_like_the_agent() {
        let e = ApiError::from_io(&io::Error::from_raw_os_error(errno::ENOENT), "/x");
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.code, "file_not_found");
        assert_eq!(e.message, "no such file: /x");
        let e = ApiError::from_io(&io::Error::from_raw_os_error(errno::EACCES), "/x");
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        let e = ApiError::from_io(&io::Error::from_raw_os_error(errno::ENOTEMPTY), "/x");
        assert_eq!(e.status, StatusCode::CONFLICT);
        let e = ApiError::from_io(&too_many_links(), "/x");
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.message, "/x: Too many levels of symbolic links");
        let e: ApiError = PathError::Escapes.into();
        assert_eq!(e.code, "invalid_request");
    }
}
