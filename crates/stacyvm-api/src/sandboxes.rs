//! Sandbox lifecycle routes (API.md §3).

use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, Query, QueryPairs};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use stacyvm_core::clock::rfc3339_ms;
use stacyvm_core::engine::CreateSandbox;
use stacyvm_store::{SandboxFilter, SandboxRecord, SandboxState};

/// The sandbox object of every create/get/list/extend answer.
pub fn sandbox_json(s: &AppState, r: &SandboxRecord) -> Value {
    let isolation = s
        .engine
        .provider_status()
        .iter()
        .find(|p| p.name == r.provider)
        .map(|p| p.isolation)
        .unwrap_or("none");
    let mut v = json!({
        "id": r.id,
        "state": r.state.as_str(),
        "provider": r.provider,
        "image": r.image,
        "memory_mb": r.memory_mb,
        "vcpus": r.vcpus,
        "created_at": rfc3339_ms(r.created_at_ms),
        "expires_at": rfc3339_ms(r.expires_at_ms),
        "metadata": r.metadata,
        "preview_domain": s.engine.config().preview_domain,
        "network": r.network,
        "isolation": isolation,
    });
    if let Some(o) = &r.owner_id {
        v["owner_id"] = Value::String(o.clone());
    }
    if let Some(t) = &r.template {
        v["template"] = Value::String(t.clone());
    }
    if let Some(e) = &r.error {
        if matches!(r.state, SandboxState::Error | SandboxState::Unhealthy) {
            v["error"] = Value::String(e.clone());
        }
    }
    v
}

/// Owner attribution: `X-User-ID`, else the body's `owner_id` (handled by
/// the engine), else the key's identity when auth is on.
fn owner_from(s: &AppState, headers: &HeaderMap) -> ApiResult<Option<String>> {
    if let Some(v) = headers.get("x-user-id") {
        let v = v
            .to_str()
            .map_err(|_| ApiError::invalid("X-User-ID must be ASCII"))?;
        if !v.is_empty() {
            return Ok(Some(v.to_string()));
        }
    }
    let _ = s;
    Ok(None)
}

fn key_identity(s: &AppState) -> Option<&'static str> {
    s.engine.config().api_key.as_ref().map(|_| "admin")
}

fn with_identity(s: &AppState, mut req: CreateSandbox, owner: &Option<String>) -> CreateSandbox {
    if owner.is_none() && req.owner_id.as_deref().unwrap_or("").is_empty() {
        req.owner_id = key_identity(s).map(str::to_string);
    }
    req
}

pub async fn create(
    State(s): State<AppState>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateSandbox>,
) -> ApiResult<impl IntoResponse> {
    let owner = owner_from(&s, &headers)?;
    let req = with_identity(&s, req, &owner);
    let rec = s.engine.create(&req, owner.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(sandbox_json(&s, &rec))))
}

pub async fn admission(
    State(s): State<AppState>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateSandbox>,
) -> ApiResult<Json<Value>> {
    let owner = owner_from(&s, &headers)?;
    let req = with_identity(&s, req, &owner);
    let d = s.engine.admission(&req, owner.as_deref()).await?;
    Ok(Json(serde_json::to_value(d).unwrap_or(Value::Null)))
}

pub async fn list(State(s): State<AppState>, QueryPairs(q): QueryPairs) -> ApiResult<Json<Value>> {
    let mut filter = SandboxFilter::default();
    for (k, v) in q {
        match k.as_str() {
            "owner_id" => filter.owner_id = Some(v),
            "state" => {
                let st: SandboxState = v
                    .parse()
                    .map_err(|_| ApiError::invalid(format!("unknown state {v:?}")))?;
                if st == SandboxState::Destroyed {
                    filter.include_destroyed = true;
                }
                filter.state = Some(st);
            }
            "label" => {
                let (lk, lv) = v
                    .split_once(':')
                    .ok_or_else(|| ApiError::invalid("label filters look like label=key:value"))?;
                filter.labels.push((lk.to_string(), lv.to_string()));
            }
            _ => {}
        }
    }
    let list = s.engine.list(filter).await?;
    Ok(Json(Value::Array(
        list.iter().map(|r| sandbox_json(&s, r)).collect(),
    )))
}

pub async fn get_one(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let rec = s.engine.get(&id).await?;
    Ok(Json(sandbox_json(&s, &rec)))
}

pub async fn destroy(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    s.engine.destroy(&id, "destroyed through the API").await?;
    Ok(Json(json!({"status": "destroyed"})))
}

pub async fn prune(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let n = s.engine.prune("pruned through the API").await?;
    Ok(Json(json!({"pruned": n})))
}

#[derive(Deserialize, Default)]
pub struct ExtendBody {
    ttl: Option<String>,
}

pub async fn extend(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ExtendBody>,
) -> ApiResult<Json<Value>> {
    let ttl = body.ttl.unwrap_or_else(|| "30m".to_string());
    let rec = s.engine.extend(&id, Some(&ttl)).await?;
    Ok(Json(sandbox_json(&s, &rec)))
}

#[derive(Deserialize)]
pub struct LogsQuery {
    lines: Option<String>,
}

pub async fn logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Json<Vec<String>>> {
    let lines = match q.lines.as_deref() {
        None | Some("") => 100,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=10_000).contains(&n) => n,
            _ => return Err(ApiError::invalid("lines must be a number from 1 to 10000")),
        },
    };
    Ok(Json(s.engine.logs(&id, lines).await?))
}

pub async fn stats(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let st = s.engine.stats(&id).await?;
    Ok(Json(serde_json::to_value(st).unwrap_or(Value::Null)))
}
