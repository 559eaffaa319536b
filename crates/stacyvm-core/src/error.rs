//! The control plane's typed error: an API error code plus a human message.

use stacyvm_providers::agent::AgentError;
use stacyvm_providers::ProviderError;
use stacyvm_store::StoreError;
use std::fmt;

/// Error codes of the public API (API.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    FileNotFound,
    Timeout,
    Conflict,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    Internal,
    ProviderError,
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::FileNotFound => "file_not_found",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::ProviderError => "provider_error",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    /// HTTP status of the code.
    pub fn http_status(&self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound | ErrorCode::FileNotFound => 404,
            ErrorCode::Timeout => 408,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::QuotaExceeded | ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::ProviderError => 502,
            ErrorCode::Unavailable => 503,
        }
    }

    pub fn from_wire(code: &str) -> ErrorCode {
        match code {
            "invalid_request" => ErrorCode::InvalidRequest,
            "unauthorized" => ErrorCode::Unauthorized,
            "forbidden" => ErrorCode::Forbidden,
            "not_found" => ErrorCode::NotFound,
            "file_not_found" => ErrorCode::FileNotFound,
            "timeout" => ErrorCode::Timeout,
            "conflict" => ErrorCode::Conflict,
            "payload_too_large" => ErrorCode::PayloadTooLarge,
            "quota_exceeded" => ErrorCode::QuotaExceeded,
            "rate_limited" => ErrorCode::RateLimited,
            "provider_error" => ErrorCode::ProviderError,
            "unavailable" => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::InvalidRequest, message)
    }
    pub fn sandbox_not_found(id: &str) -> Error {
        Error::new(ErrorCode::NotFound, format!("sandbox {id} not found"))
    }
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for Error {}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::CapacityExceeded { .. } => {
                Error::new(ErrorCode::QuotaExceeded, e.to_string())
            }
            StoreError::QuotaExceeded(m) => Error::new(ErrorCode::QuotaExceeded, m),
            StoreError::Conflict(m) => Error::new(ErrorCode::Conflict, m),
            StoreError::NotFound(id) => Error::sandbox_not_found(&id),
            StoreError::IllegalTransition { .. } => Error::new(ErrorCode::Conflict, e.to_string()),
            StoreError::Db(_) | StoreError::Corrupt(_) => {
                tracing::error!(error = %e, "store failure");
                Error::internal("the state store failed; see the server log")
            }
        }
    }
}

impl From<ProviderError> for Error {
    fn from(e: ProviderError) -> Error {
        match &e {
            ProviderError::Invalid(_) => Error::invalid(e.to_string()),
            ProviderError::Unavailable { .. } => {
                Error::new(ErrorCode::ProviderError, e.to_string())
            }
            _ => Error::new(ErrorCode::ProviderError, e.to_string()),
        }
    }
}

impl From<AgentError> for Error {
    fn from(e: AgentError) -> Error {
        match e {
            AgentError::Status { code, message, .. } => {
                let code = ErrorCode::from_wire(&code);
                // The agent never decides about sandboxes; its not_found is a route miss.
                let code = if code == ErrorCode::NotFound {
                    ErrorCode::ProviderError
                } else {
                    code
                };
                Error::new(code, message)
            }
            other => Error::new(ErrorCode::ProviderError, other.to_string()),
        }
    }
}
