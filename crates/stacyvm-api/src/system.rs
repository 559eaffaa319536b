//! System routes (API.md §10).

use crate::AppState;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use stacyvm_core::certification::{Certification, HostClass};
use stacyvm_core::engine::ProviderStatus;
use stacyvm_core::{clock, duration, ErrorCode};
use std::sync::OnceLock;

use crate::error::{ApiError, ApiResult};

pub async fn health(State(s): State<AppState>) -> Json<Value> {
    let up = std::time::Duration::from_secs(s.engine.uptime().as_secs());
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime": duration::format(up),
    }))
}

pub async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(s): State<AppState>) -> Response {
    let statuses = s.engine.provider_status();
    let providers: serde_json::Map<String, Value> = statuses
        .iter()
        .map(|p| (p.name.clone(), Value::Bool(p.healthy)))
        .collect();
    let default = s.engine.config().default_provider.clone();
    let default_ok = statuses.iter().any(|p| p.name == default && p.healthy);
    let store_ok = s.engine.store_ok();
    if default_ok && store_ok {
        return Json(json!({"status": "ready", "providers": providers})).into_response();
    }
    let why = if !store_ok {
        "the state store does not answer".to_string()
    } else {
        let err = statuses
            .iter()
            .find(|p| p.name == default)
            .and_then(|p| p.error.clone())
            .unwrap_or_else(|| "not configured".into());
        format!("default provider {default} is not healthy: {err}")
    };
    let mut e = ApiError::new(ErrorCode::Unavailable, why);
    let mut extra = serde_json::Map::new();
    extra.insert("status".into(), "not_ready".into());
    extra.insert("providers".into(), Value::Object(providers));
    e.extra = Some(extra);
    e.into_response()
}

/// Limit and isolation words a provider does not claim: what it accepts
/// in a request but cannot enforce.
fn unenforced(capabilities: &[String]) -> Vec<&'static str> {
    use stacyvm_providers::caps;
    [
        caps::MEMORY_LIMIT,
        caps::CPU_LIMIT,
        caps::PIDS_LIMIT,
        caps::NETWORK_NONE,
        caps::ISOLATED_PIDS,
        caps::ISOLATED_FILESYSTEM,
        caps::ISOLATED_HOSTNAME,
    ]
    .into_iter()
    .filter(|w| !capabilities.iter().any(|c| c == w))
    .collect()
}

/// This host's class, detected once.
fn this_host() -> &'static HostClass {
    static HOST: OnceLock<HostClass> = OnceLock::new();
    HOST.get_or_init(HostClass::detect)
}

/// The provider's certification record on this data dir, and whether it
/// certifies this host (passed, on the same host class).
fn certification(s: &AppState, provider: &str) -> (Option<Certification>, bool) {
    let host = this_host();
    match Certification::load(&s.engine.config().data_dir, provider) {
        Ok(Some(c)) => {
            let ok = c.certifies(host);
            (Some(c), ok)
        }
        Ok(None) => (None, false),
        Err(e) => {
            tracing::warn!(provider, error = %e, "unreadable certification record");
            (None, false)
        }
    }
}

fn provider_json(s: &AppState, p: &ProviderStatus, details: bool) -> Value {
    let (cert, certified) = certification(s, &p.name);
    let mut v = json!({
        "name": p.name,
        "healthy": p.healthy,
        "default": p.is_default,
        "latency_ms": p.latency_ms,
        "last_checked": if p.last_checked_ms > 0 { clock::rfc3339_ms(p.last_checked_ms) } else { String::new() },
        "capabilities": p.capabilities,
        "isolation": p.isolation,
        "certified": certified,
        "certified_at": if certified { cert.as_ref().map(|c| c.ran_at.clone()) } else { None },
        "unenforced": unenforced(&p.capabilities),
    });
    if let Some(e) = &p.error {
        v["error"] = Value::String(e.clone());
    }
    if details {
        v["certification"] = match &cert {
            Some(c) => json!({
                "passed": c.passed,
                "ran_at": c.ran_at,
                "valid_for_this_host": c.valid_for(this_host()),
                "host": c.host,
                "stacyvm_version": c.stacyvm_version,
                "checks_passed": c.checks_passed,
                "checks_failed": c.checks_failed,
                "checks_skipped": c.checks_skipped,
            }),
            None => Value::Null,
        };
    }
    v
}

pub async fn providers(State(s): State<AppState>) -> Json<Value> {
    Json(Value::Array(
        s.engine
            .provider_status()
            .iter()
            .map(|p| provider_json(&s, p, false))
            .collect(),
    ))
}

pub async fn provider_one(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    s.engine
        .provider_status()
        .iter()
        .find(|p| p.name == name)
        .map(|p| Json(provider_json(&s, p, true)))
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("provider {name} not found")))
}

pub async fn providers_test(State(s): State<AppState>) -> Json<Value> {
    let res = s.engine.check_providers().await;
    Json(serde_json::to_value(res).unwrap_or(Value::Null))
}

/// `{"enabled": false}` unless a template keeps a warm pool; then
/// `{"enabled": true, "templates": {name: {size, ready, warming}}}`.
pub async fn pool_status(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(s.engine.pool_status().await?))
}

pub async fn metrics(State(s): State<AppState>) -> Response {
    let e = &s.engine;
    let providers = e
        .provider_status()
        .iter()
        .map(|p| {
            (
                format!("provider=\"{}\"", p.name),
                if p.healthy { 1.0 } else { 0.0 },
            )
        })
        .collect();
    let text = e.metrics.render(&[
        (
            "stacyvm_sandboxes_active",
            "Sandboxes running and reachable.",
            vec![(String::new(), e.active_count() as f64)],
        ),
        (
            "stacyvm_provider_healthy",
            "1 when the provider's last health check passed.",
            providers,
        ),
        (
            "stacyvm_uptime_seconds",
            "Seconds since the server started.",
            vec![(String::new(), e.uptime().as_secs_f64().floor())],
        ),
    ]);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}
