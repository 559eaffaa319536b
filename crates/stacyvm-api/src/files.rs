//! File routes (API.md §5). Paths are checked here for clear 400s and again
//! by the agent, which resolves them inside the sandbox.

use crate::ctx::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, Query};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::Response;
use axum::Json;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{json, Value};
use stacyvm_agent_proto::FileEntry;
use stacyvm_providers::agent::BoxError;

#[derive(Deserialize)]
pub struct PathQuery {
    path: Option<String>,
    mode: Option<String>,
    recursive: Option<String>,
}

fn required(p: Option<String>) -> ApiResult<String> {
    p.filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::invalid("the path parameter is required"))
}

fn truthy(v: Option<&str>) -> ApiResult<bool> {
    match v {
        None | Some("") | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "recursive must be true or false, not {other:?}"
        ))),
    }
}

#[derive(Deserialize)]
pub struct WriteBody {
    path: Option<String>,
    content: Option<String>,
    mode: Option<String>,
    encoding: Option<String>,
}

pub async fn write_json(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<WriteBody>,
) -> ApiResult<Json<Value>> {
    let path = required(b.path)?;
    let ev = ctx.event("file.write", &id).detail("path", path.as_str());
    let content = b.content.unwrap_or_default();
    let data = match b.encoding.as_deref() {
        None | Some("") | Some("utf8") | Some("utf-8") => Bytes::from(content),
        Some("base64") => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(content.trim())
                .map_err(|e| ApiError::invalid(format!("content is not valid base64: {e}")))?,
        ),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "encoding must be utf8 or base64, not {other:?}"
            )))
        }
    };
    let r = s
        .engine
        .write_bytes(
            &id,
            &path,
            b.mode.as_deref().filter(|m| !m.is_empty()),
            data,
        )
        .await;
    audit_write(&s, ev, &r);
    let r = r?;
    Ok(Json(json!({"status": "written", "size": r.size})))
}

fn audit_write(
    s: &AppState,
    ev: stacyvm_core::audit::AuditEvent,
    r: &Result<stacyvm_agent_proto::WriteResult, stacyvm_core::Error>,
) {
    let ev = match r {
        Ok(w) => ev.detail("size", w.size),
        Err(_) => ev,
    };
    s.engine.audit(ev.outcome(r));
}

pub async fn write_raw(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    body: Body,
) -> ApiResult<Json<Value>> {
    // A refusal may come before the body was read; such a connection cannot
    // be reused, so every error answer here says `Connection: close`.
    let q: PathQuery = serde_urlencoded::from_str(uri.query().unwrap_or(""))
        .map_err(|e| ApiError::invalid(format!("invalid query string: {e}")).closing())?;
    let path = required(q.path).map_err(ApiError::closing)?;
    let ev = ctx.event("file.write", &id).detail("path", path.as_str());
    let body = body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync();
    let r = s
        .engine
        .write_file(
            &id,
            &path,
            q.mode.as_deref().filter(|m| !m.is_empty()),
            body,
        )
        .await;
    audit_write(&s, ev, &r);
    let r = r.map_err(|e| ApiError::from(e).closing())?;
    Ok(Json(json!({"status": "written", "size": r.size})))
}

pub async fn read(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Response> {
    let path = required(q.path)?;
    let (body, len) = s.engine.read_file(&id, &path).await?;
    let mut resp = Response::builder().header(header::CONTENT_TYPE, "application/octet-stream");
    if let Some(len) = len {
        resp = resp.header(header::CONTENT_LENGTH, len);
    }
    resp.body(Body::new(body))
        .map_err(|e| ApiError::new(stacyvm_core::ErrorCode::Internal, e.to_string()))
}

pub async fn delete(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<Value>> {
    let path = required(q.path)?;
    let recursive = truthy(q.recursive.as_deref())?;
    let r = s.engine.delete_file(&id, &path, recursive).await;
    s.engine.audit(
        ctx.event("file.delete", &id)
            .detail("path", path.as_str())
            .detail("recursive", recursive)
            .outcome(&r),
    );
    r?;
    Ok(Json(json!({"status": "deleted"})))
}

pub async fn list(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<Vec<FileEntry>>> {
    let path = q
        .path
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into());
    Ok(Json(s.engine.list_files(&id, &path).await?))
}

pub async fn stat(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<FileEntry>> {
    let path = required(q.path)?;
    Ok(Json(s.engine.stat_file(&id, &path).await?))
}

#[derive(Deserialize)]
pub struct GlobQuery {
    pattern: Option<String>,
}

pub async fn glob(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<GlobQuery>,
) -> ApiResult<Json<Vec<String>>> {
    let pattern = q
        .pattern
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::invalid("the pattern parameter is required"))?;
    Ok(Json(s.engine.glob(&id, &pattern).await?))
}

#[derive(Deserialize)]
pub struct MoveBody {
    old_path: Option<String>,
    new_path: Option<String>,
}

pub async fn move_file(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<MoveBody>,
) -> ApiResult<Json<Value>> {
    let from = b
        .old_path
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::invalid("old_path is required"))?;
    let to = b
        .new_path
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::invalid("new_path is required"))?;
    let r = s.engine.move_file(&id, &from, &to).await;
    s.engine.audit(
        ctx.event("file.move", &id)
            .detail("old_path", from.as_str())
            .detail("new_path", to.as_str())
            .outcome(&r),
    );
    r?;
    Ok(Json(json!({"status": "moved"})))
}

#[derive(Deserialize)]
pub struct ChmodBody {
    path: Option<String>,
    mode: Option<String>,
}

pub async fn chmod(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ChmodBody>,
) -> ApiResult<Json<Value>> {
    let path = required(b.path)?;
    let mode = b
        .mode
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("mode is required"))?;
    let r = s.engine.chmod(&id, &path, &mode).await;
    s.engine.audit(
        ctx.event("file.chmod", &id)
            .detail("path", path.as_str())
            .detail("mode", mode.as_str())
            .outcome(&r),
    );
    r?;
    Ok(Json(json!({"status": "chmod applied"})))
}
