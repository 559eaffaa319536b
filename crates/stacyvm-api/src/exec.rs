//! `POST /api/v1/sandboxes/{id}/exec` (API.md §4).

use crate::ctx::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use stacyvm_agent_proto::ExecEvent;
use stacyvm_core::engine::{shell_quote, ExecInput};
use stacyvm_core::{duration, ErrorCode};
use std::time::Duration;
use tokio::sync::mpsc;

fn go_duration(ns: u64) -> String {
    duration::format(Duration::from_nanos(ns))
}

/// The command line an exec runs, as the audit log keeps it (never its
/// output).
fn command_line(input: &ExecInput) -> String {
    let command = input.command.as_deref().unwrap_or("");
    let mut line = match input.mode.as_deref() {
        Some("argv") => shell_quote(command),
        _ => command.to_string(),
    };
    for a in &input.args {
        line.push(' ');
        line.push_str(&shell_quote(a));
    }
    if line.len() > 8192 {
        let mut cut = 8192;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

pub async fn exec(
    State(s): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<ExecInput>,
) -> ApiResult<Response> {
    let ev = ctx
        .event("sandbox.exec", &id)
        .detail("command", command_line(&input));
    let audit = |ev: stacyvm_core::audit::AuditEvent, r: &Result<(), stacyvm_core::Error>| {
        s.engine.audit(ev.outcome(r));
    };
    let prepared = s
        .engine
        .prepare_exec(&input)
        .and_then(|(mut req, timeout)| {
            let explicit = input.timeout.as_deref().is_some_and(|t| !t.is_empty());
            let timeout = s.engine.exec_quota(ctx.acl.as_deref(), explicit, timeout)?;
            req.timeout_ms = timeout.as_millis().max(1) as u64;
            Ok((req, timeout))
        });
    let (req, timeout) = match prepared {
        Ok(p) => p,
        Err(e) => {
            audit(ev, &Err(e.clone()));
            return Err(e.into());
        }
    };
    let ev = ev.detail("stream", req.stream);
    if req.stream {
        let r = s.engine.exec_stream(&id, &req).await;
        audit(ev, &r.as_ref().map(|_| ()).map_err(Clone::clone));
        return Ok(stream_response(r?));
    }
    let res = match s.engine.exec(&id, &req).await {
        Ok(r) => r,
        Err(e) => {
            audit(ev, &Err(e.clone()));
            return Err(e.into());
        }
    };
    let ev = ev
        .detail("exit_code", res.exit_code)
        .detail("duration_ms", res.duration_ns / 1_000_000);
    if res.timed_out {
        s.engine.audit(ev.failed(ErrorCode::Timeout.as_str()));
    } else {
        audit(ev, &Ok(()));
    }
    if res.timed_out {
        let mut e = ApiError::new(
            ErrorCode::Timeout,
            format!(
                "command timed out after {}; its process tree was killed",
                duration::format(timeout)
            ),
        );
        let mut extra = serde_json::Map::new();
        extra.insert("exit_code".into(), res.exit_code.into());
        extra.insert("stdout".into(), res.stdout.into());
        extra.insert("stderr".into(), res.stderr.into());
        extra.insert("duration".into(), go_duration(res.duration_ns).into());
        extra.insert("timeout".into(), true.into());
        e.extra = Some(extra);
        return Err(e);
    }
    let mut v = json!({
        "exit_code": res.exit_code,
        "stdout": res.stdout,
        "stderr": res.stderr,
        "duration": go_duration(res.duration_ns),
    });
    if res.truncated {
        v["truncated"] = Value::Bool(true);
    }
    Ok(axum::Json(v).into_response())
}

/// Translate one agent event into an API NDJSON line.
fn api_line(ev: ExecEvent) -> Value {
    if ev.stream == "exit" {
        let mut v = json!({
            "stream": "exit",
            "data": "",
            "exit_code": ev.exit_code.unwrap_or(-1),
            "duration": go_duration(ev.duration_ns.unwrap_or(0)),
        });
        if ev.timed_out {
            v["timeout"] = Value::Bool(true);
        }
        if ev.truncated {
            v["truncated"] = Value::Bool(true);
        }
        v
    } else {
        json!({"stream": ev.stream, "data": ev.data})
    }
}

fn ndjson(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

/// Relay the agent's event stream as API NDJSON. The last line always
/// carries the exit code, or `error` when the sandbox stopped answering.
fn stream_response(mut agent: stacyvm_providers::agent::Incoming) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let mut saw_exit = false;
        loop {
            match agent.frame().await {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    buf.extend_from_slice(&data);
                    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line = buf.split_to(pos + 1);
                        let line = &line[..line.len() - 1];
                        if line.is_empty() {
                            continue;
                        }
                        let out = match serde_json::from_slice::<ExecEvent>(line) {
                            Ok(ev) => {
                                saw_exit |= ev.stream == "exit";
                                api_line(ev)
                            }
                            Err(e) => {
                                json!({"stream": "error", "data": "", "error": format!("bad event from agent: {e}")})
                            }
                        };
                        if tx.send(Ok(ndjson(&out))).await.is_err() {
                            return; // client went away: dropping the agent body stops the command
                        }
                    }
                }
                Some(Err(e)) => {
                    let _ = tx
                        .send(Ok(ndjson(&json!({"stream": "error", "data": "", "error": format!("lost the sandbox agent: {e}")}))))
                        .await;
                    return;
                }
                None => break,
            }
        }
        if !saw_exit {
            let _ = tx
                .send(Ok(ndjson(&json!({"stream": "error", "data": "", "error": "the sandbox agent ended the stream without an exit code"}))))
                .await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| {
            ApiError::new(ErrorCode::Internal, "could not build the stream").into_response()
        })
}
