//! Restart: the server is SIGKILLed and started again on the same data
//! directory; its sandboxes are re-attached, not lost or replaced.

use super::Ctx;
use crate::client::enc;
use anyhow::{bail, Context, Result};
use http::Method;
use serde_json::json;
use stacyvm_providers::caps;
use std::time::Instant;

pub(super) async fn reattach(c: &Ctx) -> Result<String> {
    let sb = c.create(json!({})).await?;
    let id = sb["id"].as_str().unwrap_or_default().to_string();
    let path = "/workspace/certify-restart.txt";
    let content = format!("written before the crash {}", c.token);
    if c.claims(caps::FILES) {
        c.call(
            Method::POST,
            &format!("/api/v1/sandboxes/{id}/files"),
            Some(&json!({"path": path, "content": content})),
        )
        .await?
        .expect(200, "write before the crash")?;
    } else {
        c.sh_ok(&id, &format!("printf '%s' '{content}' > {path}"), "10s")
            .await?;
    }
    // Sandboxes of earlier checks that must survive too.
    let others: Vec<String> = [
        c.main().ok(),
        c.limited.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    ]
    .into_iter()
    .flatten()
    .collect();

    let t = Instant::now();
    {
        let mut s = c.server.lock().await;
        let pid = s.pid().unwrap_or(0);
        s.kill();
        s.restart()
            .await
            .with_context(|| format!("restarting the server after SIGKILL of pid {pid}"))?;
        *c.client.lock().unwrap_or_else(|e| e.into_inner()) = s.client()?;
    }
    let back = t.elapsed();

    for sid in std::iter::once(&id).chain(&others) {
        let r = c
            .call(Method::GET, &format!("/api/v1/sandboxes/{sid}"), None)
            .await?;
        if r.status.as_u16() != 200 || r.json()?["state"] != "running" {
            bail!("{sid} after the restart: {}", r.describe());
        }
    }
    if c.claims(caps::FILES) {
        let r = c
            .call(
                Method::GET,
                &format!("/api/v1/sandboxes/{id}/files?path={}", enc(path)),
                None,
            )
            .await?
            .expect(200, "reading the file after the restart")?;
        if r.body != content.as_bytes() {
            bail!("the file has other content after the restart");
        }
    }
    if c.claims(caps::EXEC) {
        let out = c.sh(&id, &format!("cat {path}"), "10s").await?;
        if out.exit_code != 0 || out.stdout != content {
            bail!("exec after the restart: {}", out.describe());
        }
    }
    c.destroy(&id).await.context("destroy after the restart")?;
    let r = c
        .call(Method::GET, &format!("/api/v1/sandboxes/{id}"), None)
        .await?;
    if r.status.as_u16() != 404 && r.json().map(|v| v["state"] == "destroyed").ok() != Some(true) {
        bail!("GET after destroy: {}", r.describe());
    }
    Ok(format!(
        "ready again {:.2}s after SIGKILL; {} sandbox(es) running, file kept, exec and destroy work",
        back.as_secs_f64(),
        1 + others.len()
    ))
}
