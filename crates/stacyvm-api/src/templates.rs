//! Templates (API.md §6): CRUD and spawning, warm pools behind it.

use crate::ctx::Ctx;
use crate::error::ApiResult;
use crate::extract::JsonBody;
use crate::sandboxes::{audit_create, owner_from, sandbox_json, with_identity};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};
use stacyvm_core::clock::rfc3339_ms;
use stacyvm_core::duration;
use stacyvm_core::engine::{CreateSandbox, SpawnOverrides, TemplateInfo, TemplateInput};

pub fn template_json(t: &TemplateInfo) -> Value {
    let tpl = &t.template;
    let mut v = serde_json::to_value(tpl).unwrap_or_else(|_| json!({}));
    // Both namings, for clients of either.
    v["cpu_cores"] = json!(tpl.vcpus);
    if let Ok(d) = duration::parse(&tpl.ttl) {
        v["ttl_seconds"] = json!(d.as_secs());
    }
    v["created_at"] = json!(rfc3339_ms(t.created_at_ms));
    v["updated_at"] = json!(rfc3339_ms(t.updated_at_ms));
    v
}

fn audit_change(
    s: &AppState,
    ctx: &Ctx,
    action: &str,
    name: &str,
    r: &Result<TemplateInfo, stacyvm_core::Error>,
) {
    let mut ev = ctx.event(action, name).outcome(r);
    if let Ok(t) = r {
        ev = ev
            .detail("image", t.template.image.as_str())
            .detail("pool_size", t.template.pool_size)
            .detail("setup_commands", t.template.setup.len());
    }
    s.engine.audit(ev);
}

pub async fn create(
    State(s): State<AppState>,
    ctx: Ctx,
    JsonBody(input): JsonBody<TemplateInput>,
) -> ApiResult<impl IntoResponse> {
    let r = s.engine.create_template(&input).await;
    audit_change(
        &s,
        &ctx,
        "template.create",
        input.name.as_deref().unwrap_or("-"),
        &r,
    );
    Ok((StatusCode::CREATED, Json(template_json(&r?))))
}

pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let list = s.engine.list_templates().await?;
    Ok(Json(Value::Array(list.iter().map(template_json).collect())))
}

pub async fn get_one(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(template_json(&s.engine.get_template(&name).await?)))
}

pub async fn update(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(name): Path<String>,
    JsonBody(input): JsonBody<TemplateInput>,
) -> ApiResult<Json<Value>> {
    let r = s.engine.update_template(&name, &input).await;
    audit_change(&s, &ctx, "template.update", &name, &r);
    Ok(Json(template_json(&r?)))
}

pub async fn delete(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let r = s.engine.delete_template(&name).await;
    s.engine
        .audit(ctx.event("template.delete", &name).outcome(&r));
    r?;
    Ok(Json(json!({"status": "deleted"})))
}

/// `POST /api/v1/templates/{name}/spawn`: the body is optional (`{}`,
/// empty, or overrides `{provider, ttl, metadata, owner_id}`).
pub async fn spawn(
    State(s): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    Path(name): Path<String>,
    JsonBody(ov): JsonBody<SpawnOverrides>,
) -> ApiResult<impl IntoResponse> {
    let owner = owner_from(&headers)?;
    let req = with_identity(
        &ctx,
        CreateSandbox {
            owner_id: ov.owner_id.clone(),
            ..CreateSandbox::default()
        },
        &owner,
    )?;
    let ov = SpawnOverrides {
        owner_id: req.owner_id.clone(),
        ..ov
    };
    let res = s
        .engine
        .spawn_template(&name, &ov, owner.as_deref(), &ctx.caller)
        .await
        .map(|(r, warm)| (r, Some(warm)));
    audit_create(&s, &ctx, &req, owner.as_deref(), Some(&name), &res);
    let (rec, _) = res?;
    Ok((StatusCode::CREATED, Json(sandbox_json(&s, &rec))))
}
