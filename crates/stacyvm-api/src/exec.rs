//! `POST /api/v1/sandboxes/{id}/exec` (API.md §4).

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
use stacyvm_core::engine::ExecInput;
use stacyvm_core::{duration, ErrorCode};
use std::time::Duration;
use tokio::sync::mpsc;

fn go_duration(ns: u64) -> String {
    duration::format(Duration::from_nanos(ns))
}

pub async fn exec(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<ExecInput>,
) -> ApiResult<Response> {
    let (req, timeout) = s.engine.prepare_exec(&input)?;
    if req.stream {
        let body = s.engine.exec_stream(&id, &req).await?;
        return Ok(stream_response(body));
    }
    let res = s.engine.exec(&id, &req).await?;
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
