//! The StacyVM HTTP API (API.md).
//!
//! Handlers only translate HTTP into calls on [`stacyvm_core::Engine`] and
//! its answers back into JSON; they never talk to a runtime directly.

mod audit;
mod auth;
mod ctx;
mod error;
mod exec;
mod extract;
mod files;
mod keys;
pub mod preview;
mod quotas;
mod sandboxes;
mod system;
mod templates;

pub use error::{ApiError, ApiResult};
pub use preview::Previews;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use stacyvm_core::{Engine, ErrorCode};
use std::sync::Arc;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
}

/// Build the whole router.
pub fn router(engine: Arc<Engine>) -> Router {
    let state = AppState { engine };
    let api = Router::new()
        .route("/health", get(system::health))
        .route("/live", get(system::live))
        .route("/ready", get(system::ready))
        .route("/providers", get(system::providers))
        .route("/providers/test", post(system::providers_test))
        .route("/providers/{name}", get(system::provider_one))
        .route("/pool/status", get(system::pool_status))
        .route(
            "/sandboxes",
            post(sandboxes::create)
                .get(sandboxes::list)
                .delete(sandboxes::prune),
        )
        .route("/sandboxes/admission", post(sandboxes::admission))
        .route(
            "/sandboxes/{id}",
            get(sandboxes::get_one).delete(sandboxes::destroy),
        )
        .route("/sandboxes/{id}/extend", post(sandboxes::extend))
        .route("/sandboxes/{id}/logs", get(sandboxes::logs))
        .route("/sandboxes/{id}/stats", get(sandboxes::stats))
        .route("/sandboxes/{id}/preview/{port}", get(preview::grant))
        .route("/sandboxes/{id}/exec", post(exec::exec))
        .route(
            "/sandboxes/{id}/files",
            post(files::write_json)
                .get(files::read)
                .delete(files::delete),
        )
        .route("/sandboxes/{id}/files/raw", put(files::write_raw))
        .route("/sandboxes/{id}/files/list", get(files::list))
        .route("/sandboxes/{id}/files/stat", get(files::stat))
        .route("/sandboxes/{id}/files/glob", get(files::glob))
        .route("/sandboxes/{id}/files/move", post(files::move_file))
        .route("/sandboxes/{id}/files/chmod", post(files::chmod))
        // governance: keys, quotas, audit, templates
        .route("/keys", post(keys::create).get(keys::list))
        .route("/keys/{id}", delete(keys::revoke))
        .route("/quotas", get(quotas::list))
        .route("/quotas/summary", get(quotas::summary))
        .route(
            "/quotas/{owner}",
            get(quotas::get_one).put(quotas::put).delete(quotas::delete),
        )
        .route("/quotas/{owner}/usage", get(quotas::usage))
        .route("/audit", get(audit::query))
        .route("/audit/verify", get(audit::verify))
        .route("/templates", post(templates::create).get(templates::list))
        .route(
            "/templates/{name}",
            get(templates::get_one)
                .put(templates::update)
                .delete(templates::delete),
        )
        .route("/templates/{name}/spawn", post(templates::spawn));

    Router::new()
        .nest("/api/v1", api)
        .route("/metrics", get(system::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The main listener's service: requests for a preview host
/// (`{port}-{id}.{preview_domain}`) go to the preview proxy, everything else
/// to the API [`router`].
pub fn app(engine: Arc<Engine>, previews: &Previews) -> Router {
    Router::new()
        .fallback_service(router(engine))
        .layer(middleware::from_fn_with_state(
            previews.clone(),
            preview::intercept,
        ))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let mut r = ApiError::invalid(format!("method {method} is not allowed on {}", uri.path()))
        .into_response();
    *r.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    r
}

/// Request ids, access logging and status counters.
async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.is_ascii())
        .map(str::to_string)
        .unwrap_or_else(|| stacyvm_core::id::random_token(16));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        // Inner layers (auth, audit) read the id from the request.
        req.headers_mut().insert("x-request-id", v);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let start = std::time::Instant::now();
    let mut resp = next.run(req).await;
    let status = resp.status().as_u16();
    state.engine.metrics.observe_http(status);
    tracing::debug!(%method, %path, status, us = start.elapsed().as_micros() as u64, request_id = %request_id, "request");
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
