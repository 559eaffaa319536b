//! Sandbox lifecycle routes (API.md §3).

use crate::ctx::Ctx;
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
use stacyvm_core::duration;
use stacyvm_core::engine::{CreateSandbox, SpawnOverrides};
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

/// `X-User-ID` when given. Owner names starting with `system` are the
/// server's own (warm pools) and refused.
pub fn owner_from(headers: &HeaderMap) -> ApiResult<Option<String>> {
    if let Some(v) = headers.get("x-user-id") {
        let v = v
            .to_str()
            .map_err(|_| ApiError::invalid("X-User-ID must be ASCII"))?;
        if !v.is_empty() {
            if v.starts_with("system") {
                return Err(ApiError::invalid(
                    "owner ids starting with \"system\" are reserved",
                ));
            }
            return Ok(Some(v.to_string()));
        }
    }
    Ok(None)
}

/// Owner attribution (API.md §2): `X-User-ID`, else the body's `owner_id`,
/// else the key's identity. Also records the creating key's identity and
/// tenant on the request.
pub fn with_identity(
    ctx: &Ctx,
    mut req: CreateSandbox,
    owner: &Option<String>,
) -> ApiResult<CreateSandbox> {
    if req
        .owner_id
        .as_deref()
        .is_some_and(|o| o.starts_with("system"))
    {
        return Err(ApiError::invalid(
            "owner ids starting with \"system\" are reserved",
        ));
    }
    if owner.is_none() && req.owner_id.as_deref().unwrap_or("").is_empty() {
        req.owner_id = ctx.caller.identity.clone();
    }
    req.tenant = ctx.caller.tenant.clone();
    req.creator = ctx.caller.identity.clone();
    Ok(req)
}

fn requested_template(req: &CreateSandbox) -> Option<String> {
    req.template.clone().filter(|t| !t.is_empty())
}

pub async fn create(
    State(s): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateSandbox>,
) -> ApiResult<impl IntoResponse> {
    let owner = owner_from(&headers)?;
    let req = with_identity(&ctx, req, &owner)?;
    let template = requested_template(&req);
    let res = match &template {
        Some(t) => s
            .engine
            .spawn_template(
                t,
                &SpawnOverrides::from_create(&req),
                owner.as_deref(),
                &ctx.caller,
            )
            .await
            .map(|(r, warm)| (r, Some(warm))),
        None => s
            .engine
            .create(&req, owner.as_deref())
            .await
            .map(|r| (r, None)),
    };
    audit_create(&s, &ctx, &req, owner.as_deref(), template.as_deref(), &res);
    let (rec, _) = res?;
    Ok((StatusCode::CREATED, Json(sandbox_json(&s, &rec))))
}

/// Record a create (or spawn) in the audit log.
pub fn audit_create(
    s: &AppState,
    ctx: &Ctx,
    req: &CreateSandbox,
    owner: Option<&str>,
    template: Option<&str>,
    res: &Result<(SandboxRecord, Option<bool>), stacyvm_core::Error>,
) {
    let target = res.as_ref().map_or("-", |(r, _)| r.id.as_str());
    let owner = match res {
        Ok((r, _)) => r.owner_id.clone(),
        Err(_) => owner.map(str::to_string).or_else(|| req.owner_id.clone()),
    };
    let mut ev = ctx
        .event("sandbox.create", target)
        .owner(owner.as_deref())
        .outcome(res);
    match res {
        Ok((r, warm)) => {
            ev = ev
                .detail("image", r.image.as_str())
                .detail("provider", r.provider.as_str());
            if let Some(w) = warm {
                ev = ev.detail("warm", *w);
            }
        }
        Err(e) => {
            ev = ev.detail("error", e.message.chars().take(1024).collect::<String>());
            if let Some(i) = req.image.as_deref() {
                ev = ev.detail("image", i);
            }
        }
    }
    if let Some(t) = template {
        ev = ev.detail("template", t);
    }
    s.engine.audit(ev);
}

pub async fn admission(
    State(s): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateSandbox>,
) -> ApiResult<Json<Value>> {
    let owner = owner_from(&headers)?;
    let mut req = with_identity(&ctx, req, &owner)?;
    if let Some(t) = requested_template(&req) {
        req = s.engine.template_create_request(&t, &req).await?;
    }
    let d = s.engine.admission(&req, owner.as_deref()).await?;
    Ok(Json(serde_json::to_value(d).unwrap_or(Value::Null)))
}

pub async fn list(
    State(s): State<AppState>,
    ctx: Ctx,
    QueryPairs(q): QueryPairs,
) -> ApiResult<Json<Value>> {
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
    let list = s.engine.list_visible(filter, &ctx.caller).await?;
    Ok(Json(Value::Array(
        list.iter().map(|r| sandbox_json(&s, r)).collect(),
    )))
}

pub async fn get_one(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let rec = s.engine.get(&id).await?;
    Ok(Json(sandbox_json(&s, &rec)))
}

pub async fn destroy(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let r = s.engine.destroy(&id, "destroyed through the API").await;
    s.engine.audit(
        ctx.event("sandbox.destroy", &id)
            .detail("reason", "api")
            .outcome(&r),
    );
    r?;
    Ok(Json(json!({"status": "destroyed"})))
}

pub async fn prune(State(s): State<AppState>, ctx: Ctx) -> ApiResult<Json<Value>> {
    let n = s
        .engine
        .prune_as("pruned through the API", Some(&ctx.caller))
        .await?;
    Ok(Json(json!({"pruned": n})))
}

#[derive(Deserialize, Default)]
pub struct ExtendBody {
    ttl: Option<String>,
}

pub async fn extend(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ExtendBody>,
) -> ApiResult<Json<Value>> {
    let mut ttl = body.ttl.unwrap_or_else(|| "30m".to_string());
    // An owner's or key's max TTL caps the extension like the global one.
    let cap = s.engine.ttl_cap(ctx.acl.as_deref());
    if duration::parse(&ttl).is_ok_and(|d| d > cap) {
        ttl = duration::format(cap);
    }
    let r = s.engine.extend(&id, Some(&ttl)).await;
    s.engine.audit(
        ctx.event("sandbox.extend", &id)
            .detail("ttl", ttl.as_str())
            .outcome(&r),
    );
    Ok(Json(sandbox_json(&s, &r?)))
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
