//! The agent's error answers: an HTTP status, an API error code and a
//! message, turned into an [`ErrorBody`] on the wire. The real agent and the
//! mock provider's in-process agent both answer with these, so their
//! statuses, codes and messages are the same by construction.

use crate::path::PathError;
use crate::{codes, ErrorBody};
use std::fmt;
use std::io;

/// Linux errno values the mapping needs (the generic Linux numbering, used
/// by x86_64 and aarch64 alike).
pub mod errno {
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

/// An error answer: HTTP status, API error code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status code.
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, codes::INVALID_REQUEST, message)
    }

    /// 404 `file_not_found` for `path`.
    pub fn no_such_file(path: &str) -> Self {
        Self::new(404, codes::FILE_NOT_FOUND, format!("no such file: {path}"))
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, codes::CONFLICT, message)
    }

    /// 401 `unauthorized`: the TCP transport's bearer token is missing or wrong.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "unauthorized", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, codes::FORBIDDEN, message)
    }

    /// 502 `port_closed`: the tunnel could not connect to a port.
    pub fn port_closed(message: impl Into<String>) -> Self {
        Self::new(502, codes::PORT_CLOSED, message)
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, codes::INTERNAL, message)
    }

    /// 404 `not_found` for an unknown route.
    pub fn no_route(path: &str) -> Self {
        Self::new(404, "not_found", format!("no such route: {path}"))
    }

    /// 405 for a known route called with the wrong method.
    pub fn method_not_allowed(method: &dyn fmt::Display, path: &str) -> Self {
        Self::new(
            405,
            "method_not_allowed",
            format!("method {method} is not allowed on {path}"),
        )
    }

    /// 413 `payload_too_large`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
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

    /// Map the error of creating the directory `dir` and its parents (for a
    /// file upload or a move): a file in the way is the client's mistake.
    pub fn from_create_dirs_io(err: &io::Error, dir: &str) -> Self {
        match err.raw_os_error() {
            Some(errno::EEXIST) | Some(errno::ENOTDIR) => Self::invalid(format!(
                "cannot create directory {dir}: a parent is not a directory"
            )),
            _ => Self::from_io(err, dir),
        }
    }

    /// Map the error of deleting `path` (`DELETE /v1/files`).
    pub fn from_delete_io(err: &io::Error, path: &str) -> Self {
        match err.raw_os_error() {
            Some(errno::ENOTEMPTY) | Some(errno::EEXIST) => Self::conflict(format!(
                "directory {path} is not empty (use recursive=true)"
            )),
            _ => Self::from_io(err, path),
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.to_string(),
            message: self.message.clone(),
        }
    }

    /// The serialized JSON body of this error.
    pub fn body_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body()).unwrap_or_default()
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<PathError> for ApiError {
    fn from(e: PathError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

/// An I/O error's message without std's " (os error N)" suffix.
pub fn io_message(err: &io::Error) -> String {
    let s = err.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(n: i32) -> io::Error {
        io::Error::from_raw_os_error(n)
    }

    #[test]
    fn io_errors_map_to_codes() {
        let e = ApiError::from_io(&os(errno::ENOENT), "/x");
        assert_eq!((e.status, e.code), (404, "file_not_found"));
        assert_eq!(e.message, "no such file: /x");
        assert_eq!(ApiError::from_io(&os(errno::EACCES), "/x").status, 403);
        assert_eq!(ApiError::from_io(&os(errno::ENOTEMPTY), "/x").status, 409);
        let e = ApiError::from_io(&os(5), "/x"); // EIO
        assert_eq!(e.status, 500);
        assert_eq!(e.message, "/x: Input/output error");
        let e = ApiError::from_io(&os(errno::ELOOP), "/x");
        assert_eq!(e.status, 500);
        assert_eq!(e.message, "/x: Too many levels of symbolic links");
        let e: ApiError = PathError::Relative.into();
        assert_eq!((e.status, e.code), (400, "invalid_request"));
    }

    #[test]
    fn operation_specific_mappings() {
        let e = ApiError::from_delete_io(&os(errno::ENOTEMPTY), "/d");
        assert_eq!(e.code, "conflict");
        assert_eq!(e.message, "directory /d is not empty (use recursive=true)");
        let e = ApiError::from_create_dirs_io(&os(errno::ENOTDIR), "/f/x");
        assert_eq!(e.code, "invalid_request");
        let e = ApiError::from_create_dirs_io(&os(errno::EACCES), "/d");
        assert_eq!(e.code, "forbidden");
    }

    #[test]
    fn bodies_and_display() {
        let e = ApiError::method_not_allowed(&"PUT", "/v1/health");
        assert_eq!(
            e.to_string(),
            "405 method_not_allowed: method PUT is not allowed on /v1/health"
        );
        let b: ErrorBody = serde_json::from_slice(&e.body_json()).unwrap();
        assert_eq!(b, e.body());
    }
}
