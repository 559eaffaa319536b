//! The error envelope: every non-2xx answer is `{"code", "message"}`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use stacyvm_core::{Error, ErrorCode};

/// An API error answer. Extra JSON fields may ride along (e.g. the partial
/// output of a timed-out exec).
#[derive(Debug)]
pub struct ApiError {
    pub error: Error,
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
    /// Answer with `Connection: close`: set when the request body was not
    /// read, so that keep-alive clients do not reuse a connection the server
    /// is about to drop.
    pub close: bool,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            error: Error::new(code, message),
            extra: None,
            close: false,
        }
    }
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }
    /// The same error, answered with `Connection: close`.
    pub fn closing(mut self) -> ApiError {
        self.close = true;
        self
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> ApiError {
        ApiError {
            error,
            extra: None,
            close: false,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.error.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = serde_json::Map::new();
        body.insert("code".into(), self.error.code.as_str().into());
        body.insert("message".into(), self.error.message.clone().into());
        if let Some(extra) = self.extra {
            for (k, v) in extra {
                body.entry(k).or_insert(v);
            }
        }
        let mut resp = (status, axum::Json(serde_json::Value::Object(body))).into_response();
        if self.close {
            resp.headers_mut()
                .insert("connection", HeaderValue::from_static("close"));
        }
        if self.error.code == ErrorCode::RateLimited {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
