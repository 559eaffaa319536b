//! Streaming: NDJSON exec output arrives as it is produced, and the last
//! line carries the exit code.

use super::{snippet, Ctx};
use crate::client::full;
use anyhow::{anyhow, bail, Context, Result};
use http::Method;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub(super) async fn incremental(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let body = json!({
        "command": "echo first; sleep 2; echo second >&2; sleep 0.5; echo third; exit 3",
        "stream": true,
        "timeout": "20s",
    });
    let t = Instant::now();
    let resp = c
        .client()
        .send(
            Method::POST,
            &format!("/api/v1/sandboxes/{id}/exec"),
            full(serde_json::to_vec(&body)?),
            true,
        )
        .await?;
    if resp.status().as_u16() != 200 {
        let s = resp.status();
        let b = resp.into_body().collect().await?.to_bytes();
        bail!(
            "expected 200, got {} {}",
            s.as_u16(),
            snippet(&String::from_utf8_lossy(&b))
        );
    }
    let ctype = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if !ctype.starts_with("application/x-ndjson") {
        bail!("content type {ctype:?}, not application/x-ndjson");
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut lines: Vec<(Duration, Value)> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the stream")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line).trim().to_string();
            if text.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| anyhow!("line {text:?} is not JSON: {e}"))?;
            if !v["stream"].is_string() || !v["data"].is_string() {
                bail!("line {text:?} lacks stream/data");
            }
            lines.push((t.elapsed(), v));
        }
    }
    let total = t.elapsed();
    if !buf.iter().all(u8::is_ascii_whitespace) {
        bail!(
            "the stream ended inside a line: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    let Some((_, last)) = lines.last() else {
        bail!("the stream carried no line");
    };
    if last["stream"] != "exit" || last["exit_code"] != 3 {
        bail!("the last line is {last}, not the exit with code 3");
    }
    if lines[..lines.len() - 1]
        .iter()
        .any(|(_, v)| v["stream"] == "exit")
    {
        bail!("an exit line came before the last line");
    }
    let joined = |s: &str| -> String {
        lines
            .iter()
            .filter(|(_, v)| v["stream"] == s)
            .filter_map(|(_, v)| v["data"].as_str())
            .collect()
    };
    if joined("stdout") != "first\nthird\n" || joined("stderr") != "second\n" {
        bail!(
            "stdout {:?}, stderr {:?}",
            joined("stdout"),
            joined("stderr")
        );
    }
    let first_at = lines
        .iter()
        .find(|(_, v)| v["data"].as_str().is_some_and(|d| d.contains("first")))
        .map(|(at, _)| *at)
        .unwrap_or(total);
    if total < Duration::from_millis(2400) {
        bail!(
            "the command should take 2.5s but the stream ended after {:.2}s",
            total.as_secs_f64()
        );
    }
    if first_at > Duration::from_millis(1500) {
        bail!(
            "the first line arrived after {:.2}s of {:.2}s: output is not streamed",
            first_at.as_secs_f64(),
            total.as_secs_f64()
        );
    }
    Ok(format!(
        "first line after {:.2}s of {:.2}s; {} lines, last carries exit 3",
        first_at.as_secs_f64(),
        total.as_secs_f64(),
        lines.len()
    ))
}
