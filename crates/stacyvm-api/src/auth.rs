//! API key check (API.md §2). Probes (`/api/v1/live`, `/api/v1/ready`) are open.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use stacyvm_core::ErrorCode;

const OPEN_PATHS: [&str; 2] = ["/api/v1/live", "/api/v1/ready"];

/// Compare without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key a request presents: `X-API-Key`, else `Authorization: Bearer`.
pub fn presented_key(req: &Request) -> Option<&str> {
    if let Some(k) = req.headers().get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.trim());
    }
    req.headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.engine.config().api_key.as_deref() else {
        return next.run(req).await;
    };
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    // A refused request's body is never read; keep-alive clients must not
    // reuse such a connection.
    let has_body = req
        .headers()
        .contains_key(axum::http::header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let refuse = |msg: &str| {
        let e = ApiError::new(ErrorCode::Unauthorized, msg);
        if has_body { e.closing() } else { e }.into_response()
    };
    match presented_key(&req) {
        Some(k) if constant_time_eq(k.as_bytes(), expected.as_bytes()) => next.run(req).await,
        Some(_) => refuse("the API key is not valid"),
        None => refuse("an API key is required (X-API-Key or Authorization: Bearer)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
