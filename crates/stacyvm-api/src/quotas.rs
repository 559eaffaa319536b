//! Quotas (API.md §8): per owner / key identity limits and their usage.

use crate::ctx::Ctx;
use crate::error::ApiResult;
use crate::extract::JsonBody;
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};
use stacyvm_core::clock::rfc3339_ms;
use stacyvm_core::duration;
use stacyvm_core::engine::QuotaInput;
use stacyvm_store::{QuotaLimits, QuotaRecord, Usage};
use std::time::Duration;

fn dur(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |ms| {
        Value::String(duration::format(Duration::from_millis(ms.max(0) as u64)))
    })
}

fn limits_json(l: &QuotaLimits) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: Value| {
        if !v.is_null() {
            m.insert(k.to_string(), v);
        }
    };
    put("max_sandboxes", json!(l.max_sandboxes));
    put("max_memory_mb", json!(l.max_memory_mb));
    put("max_vcpus", json!(l.max_vcpus));
    put("max_ttl", dur(l.max_ttl_ms));
    put("max_exec_timeout", dur(l.max_exec_timeout_ms));
    m
}

fn quota_json(q: &QuotaRecord) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("owner".into(), q.owner.clone().into());
    m.extend(limits_json(&q.limits));
    m.insert("created_at".into(), rfc3339_ms(q.created_at_ms).into());
    m.insert("updated_at".into(), rfc3339_ms(q.updated_at_ms).into());
    Value::Object(m)
}

fn usage_json(u: &Usage) -> Value {
    json!({"sandboxes": u.sandboxes, "memory_mb": u.memory_mb, "vcpus": u.vcpus})
}

pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let q = s.engine.list_quotas().await?;
    Ok(Json(Value::Array(q.iter().map(quota_json).collect())))
}

pub async fn summary(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let sum = s.engine.quota_summary().await?;
    Ok(Json(serde_json::to_value(sum).unwrap_or(Value::Null)))
}

pub async fn get_one(
    State(s): State<AppState>,
    Path(owner): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(quota_json(&s.engine.get_quota(&owner).await?)))
}

pub async fn put(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(owner): Path<String>,
    JsonBody(input): JsonBody<QuotaInput>,
) -> ApiResult<Json<Value>> {
    let r = s.engine.put_quota(&owner, &input).await;
    let mut ev = ctx
        .event("quota.set", &owner)
        .owner(Some(&owner))
        .outcome(&r);
    if let Ok((q, created)) = &r {
        ev = ev.detail("created", *created);
        for (k, v) in limits_json(&q.limits) {
            ev = ev.detail(&k, v);
        }
    }
    s.engine.audit(ev);
    Ok(Json(quota_json(&r?.0)))
}

pub async fn delete(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(owner): Path<String>,
) -> ApiResult<Json<Value>> {
    let r = s.engine.delete_quota(&owner).await;
    s.engine.audit(
        ctx.event("quota.delete", &owner)
            .owner(Some(&owner))
            .outcome(&r),
    );
    r?;
    Ok(Json(json!({"status": "deleted"})))
}

/// Usage against the effective limits, from the queries admission runs.
pub async fn usage(State(s): State<AppState>, Path(owner): Path<String>) -> ApiResult<Json<Value>> {
    let u = s.engine.quota_usage(&owner).await?;
    let remaining = u.limits.as_ref().map(|l| {
        let left = |max: Option<u64>, used: u64| max.map(|m| m.saturating_sub(used));
        json!({
            "sandboxes": left(l.max_sandboxes, u.as_owner.sandboxes),
            "memory_mb": left(l.max_memory_mb, u.as_owner.memory_mb),
            "vcpus": left(l.max_vcpus, u.as_owner.vcpus),
        })
    });
    Ok(Json(json!({
        "owner": u.owner,
        "usage": usage_json(&u.as_owner),
        "key_usage": usage_json(&u.as_key),
        "limits": u.limits.as_ref().map(|l| Value::Object(limits_json(l))),
        "remaining": remaining,
        "active_sandboxes": u.active_sandboxes,
        "max_sandboxes": u.max_sandboxes,
    })))
}
