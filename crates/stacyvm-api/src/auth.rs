//! Authentication, scopes, rate limits and sandbox visibility (API.md §2).
//!
//! Probes (`/api/v1/live`, `/api/v1/ready`) are open. Every other request
//! needs a key as soon as any key exists (the bootstrap key from the
//! configuration, or one created through `/api/v1/keys`). The key decides
//! the scope a route needs ([`required_scope`]) and which sandboxes the
//! caller can see: a sandbox outside its tenant is a 404, never a 403.

use crate::ctx::Ctx;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use stacyvm_core::governance::{Caller, Scope};
use stacyvm_core::ErrorCode;
use std::net::SocketAddr;

const OPEN_PATHS: [&str; 2] = ["/api/v1/live", "/api/v1/ready"];

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

/// The scope a route needs. viewer: reads; api: sandboxes, exec, files,
/// spawning from templates; operator: template changes, prune, provider
/// tests; admin: keys, quotas, the audit log.
pub fn required_scope(method: &Method, path: &str, caller: &Caller) -> Scope {
    let p = path.strip_prefix("/api/v1").unwrap_or(path);
    let segs: Vec<&str> = p.trim_matches('/').split('/').collect();
    let read = method == Method::GET || method == Method::HEAD;
    match segs.as_slice() {
        ["keys", ..] | ["audit", ..] => Scope::Admin,
        ["quotas", "summary"] if read => Scope::Viewer,
        // A key may read its own identity's usage.
        ["quotas", owner, "usage"] if read && caller.identity.as_deref() == Some(*owner) => {
            Scope::Viewer
        }
        ["quotas", ..] => Scope::Admin,
        ["templates", _, "spawn"] => Scope::Api,
        ["templates", ..] if read => Scope::Viewer,
        ["templates", ..] => Scope::Operator,
        ["providers", "test"] => Scope::Operator,
        ["sandboxes"] if method == Method::DELETE => Scope::Operator,
        // Issuing preview tokens and interactive exec are not reads.
        ["sandboxes", _, "preview", ..] | ["sandboxes", _, "exec", ..] => Scope::Api,
        _ if read => Scope::Viewer,
        _ => Scope::Api,
    }
}

/// The sandbox id of a `/api/v1/sandboxes/{id}[/…]` path.
fn sandbox_in_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/api/v1/sandboxes/")?;
    let id = rest.split('/').next()?;
    stacyvm_core::id::is_sandbox_id(id).then_some(id)
}

pub async fn require_key(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if OPEN_PATHS.contains(&path.as_str()) {
        return next.run(req).await;
    }
    let engine = &state.engine;
    // A refused request's body is never read; keep-alive clients must not
    // reuse such a connection.
    let has_body = req
        .headers()
        .contains_key(axum::http::header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let refuse = |e: ApiError| if has_body { e.closing() } else { e }.into_response();
    let mut caller = if engine.auth_on() {
        match presented_key(&req) {
            Some(k) => match engine.authenticate(k) {
                Some(c) => c,
                None => {
                    return refuse(ApiError::new(
                        ErrorCode::Unauthorized,
                        "the API key is not valid",
                    ))
                }
            },
            None => {
                return refuse(ApiError::new(
                    ErrorCode::Unauthorized,
                    "an API key is required (X-API-Key or Authorization: Bearer)",
                ))
            }
        }
    } else {
        Caller::default()
    };
    if let Err(secs) = engine.rate_check(&caller) {
        let mut r = refuse(ApiError::new(
            ErrorCode::RateLimited,
            format!("this key's rate limit is exhausted; retry in {secs} s"),
        ));
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert("retry-after", v);
        }
        return r;
    }
    let needed = required_scope(req.method(), &path, &caller);
    if !caller.scope.allows(needed) {
        return refuse(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "{} {path} needs a key with the {} scope; this key has {}",
                req.method(),
                needed.as_str(),
                caller.scope.as_str()
            ),
        ));
    }
    caller.request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    caller.client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let mut acl = None;
    if let Some(id) = sandbox_in_path(&path) {
        match engine.sandbox_acl(id).await {
            Ok(Some(a)) => {
                if !a.visible_to(&caller.visibility()) {
                    return refuse(ApiError::new(
                        ErrorCode::NotFound,
                        format!("sandbox {id} not found"),
                    ));
                }
                acl = Some(a);
            }
            Ok(None) => {}
            Err(e) => return refuse(e.into()),
        }
    }
    req.extensions_mut().insert(Ctx { caller, acl });
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scope: Scope, identity: &str) -> Caller {
        Caller {
            identity: Some(identity.into()),
            scope,
            ..Caller::default()
        }
    }

    #[test]
    fn routes_need_the_documented_scopes() {
        let c = key(Scope::Viewer, "alice");
        let s = |m: Method, p: &str| required_scope(&m, p, &c);
        assert_eq!(s(Method::GET, "/api/v1/sandboxes"), Scope::Viewer);
        assert_eq!(s(Method::POST, "/api/v1/sandboxes"), Scope::Api);
        assert_eq!(s(Method::DELETE, "/api/v1/sandboxes"), Scope::Operator);
        assert_eq!(s(Method::POST, "/api/v1/sandboxes/sb_x/exec"), Scope::Api);
        assert_eq!(s(Method::GET, "/api/v1/sandboxes/sb_x/exec/ws"), Scope::Api);
        assert_eq!(
            s(Method::GET, "/api/v1/sandboxes/sb_x/preview/80"),
            Scope::Api
        );
        assert_eq!(
            s(Method::GET, "/api/v1/sandboxes/sb_x/files"),
            Scope::Viewer
        );
        assert_eq!(s(Method::GET, "/api/v1/templates"), Scope::Viewer);
        assert_eq!(s(Method::POST, "/api/v1/templates"), Scope::Operator);
        assert_eq!(s(Method::POST, "/api/v1/templates/t/spawn"), Scope::Api);
        assert_eq!(s(Method::POST, "/api/v1/providers/test"), Scope::Operator);
        assert_eq!(s(Method::GET, "/api/v1/keys"), Scope::Admin);
        assert_eq!(s(Method::GET, "/api/v1/audit/verify"), Scope::Admin);
        assert_eq!(s(Method::GET, "/api/v1/quotas"), Scope::Admin);
        assert_eq!(s(Method::GET, "/api/v1/quotas/summary"), Scope::Viewer);
        assert_eq!(s(Method::GET, "/api/v1/quotas/alice/usage"), Scope::Viewer);
        assert_eq!(s(Method::GET, "/api/v1/quotas/bob/usage"), Scope::Admin);
        assert_eq!(s(Method::GET, "/metrics"), Scope::Viewer);
        assert_eq!(
            sandbox_in_path("/api/v1/sandboxes/sb_abcdefghijkl/exec"),
            Some("sb_abcdefghijkl")
        );
        assert_eq!(sandbox_in_path("/api/v1/sandboxes/admission"), None);
    }
}
