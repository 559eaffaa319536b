//! API keys (admin scope): create (the secret is shown once), list, revoke.

use crate::ctx::Ctx;
use crate::error::ApiResult;
use crate::extract::JsonBody;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};
use stacyvm_core::clock::rfc3339_ms;
use stacyvm_core::engine::NewKey;
use stacyvm_store::KeyRecord;

fn key_json(k: &KeyRecord) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "identity": k.name,
        "scope": k.scope,
        "tenant": k.tenant,
        "rate_limit": k.rate_limit,
        "prefix": k.prefix,
        "created_at": rfc3339_ms(k.created_at_ms),
    })
}

pub async fn create(
    State(s): State<AppState>,
    ctx: Ctx,
    JsonBody(input): JsonBody<NewKey>,
) -> ApiResult<impl IntoResponse> {
    let r = s.engine.create_key(&input).await;
    let target = r.as_ref().map_or("-", |(k, _)| k.id.as_str());
    let mut ev = ctx.event("key.create", target).outcome(&r);
    if let Ok((k, _)) = &r {
        ev = ev
            .detail("name", k.name.as_str())
            .detail("scope", k.scope.as_str());
        if let Some(t) = &k.tenant {
            ev = ev.detail("key_tenant", t.as_str());
        }
    }
    s.engine.audit(ev);
    let (k, secret) = r?;
    let mut v = key_json(&k);
    v["key"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(v)))
}

pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let keys = s.engine.list_keys().await?;
    Ok(Json(Value::Array(keys.iter().map(key_json).collect())))
}

pub async fn revoke(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let r = s.engine.revoke_key(&id).await;
    let mut ev = ctx.event("key.revoke", &id).outcome(&r);
    if let Ok(k) = &r {
        ev = ev.detail("name", k.name.as_str());
    }
    s.engine.audit(ev);
    r?;
    Ok(Json(json!({"status": "revoked", "id": id})))
}
