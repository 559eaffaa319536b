//! Lifecycle: create, get, list, destroy, TTL expiry.

use super::Ctx;
use anyhow::{bail, Result};
use http::Method;
use serde_json::json;
use std::time::{Duration, Instant};

/// `POST /sandboxes` → 201, `running`, the provider under test. The sandbox
/// becomes the one most later checks run in.
pub(super) async fn create(c: &Ctx) -> Result<String> {
    let t = Instant::now();
    let sb = c.create(json!({})).await?;
    let took = t.elapsed();
    let id = sb["id"].as_str().unwrap_or_default().to_string();
    *c.main.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.clone());
    Ok(format!(
        "201 running in {:.2}s ({id}, isolation {})",
        took.as_secs_f64(),
        sb["isolation"].as_str().unwrap_or("?")
    ))
}

/// `GET /sandboxes/{id}` → 200, the same sandbox, `running`.
pub(super) async fn get(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let r = c
        .call(Method::GET, &format!("/api/v1/sandboxes/{id}"), None)
        .await?
        .expect(200, "get")?;
    let v = r.json()?;
    if v["id"] != id.as_str() || v["state"] != "running" || v["provider"] != c.provider.as_str() {
        bail!("unexpected sandbox: {}", r.describe());
    }
    for k in ["image", "memory_mb", "vcpus", "created_at", "expires_at"] {
        if v[k].is_null() {
            bail!("the sandbox JSON has no {k}: {}", r.describe());
        }
    }
    Ok(format!(
        "200 running, {} MB, {} vCPU",
        v["memory_mb"], v["vcpus"]
    ))
}

/// `GET /sandboxes` lists it as running.
pub(super) async fn list(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let r = c
        .call(Method::GET, "/api/v1/sandboxes", None)
        .await?
        .expect(200, "list")?;
    let v = r.json()?;
    let Some(items) = v.as_array() else {
        bail!("the list is not an array: {}", r.describe());
    };
    match items.iter().find(|s| s["id"] == id.as_str()) {
        Some(s) if s["state"] == "running" => Ok(format!("listed among {}", items.len())),
        Some(s) => bail!("listed with state {}", s["state"]),
        None => bail!("{id} is not in the list of {} sandboxes", items.len()),
    }
}

/// A second sandbox is destroyed: 200, then 404 (or `destroyed`), not
/// listed, and a second destroy is 200 too.
pub(super) async fn destroy(c: &Ctx) -> Result<String> {
    let sb = c.create(json!({})).await?;
    let id = sb["id"].as_str().unwrap_or_default().to_string();
    let t = Instant::now();
    c.destroy(&id).await?;
    let took = t.elapsed();
    let r = c
        .call(Method::GET, &format!("/api/v1/sandboxes/{id}"), None)
        .await?;
    match r.status.as_u16() {
        404 => {}
        200 if r.json()?["state"] == "destroyed" => {}
        _ => bail!("GET after destroy: {}", r.describe()),
    }
    let listed = c
        .call(Method::GET, "/api/v1/sandboxes", None)
        .await?
        .expect(200, "list")?
        .json()?;
    if listed
        .as_array()
        .is_some_and(|a| a.iter().any(|s| s["id"] == id.as_str()))
    {
        bail!("{id} is still listed after destroy");
    }
    c.call(Method::DELETE, &format!("/api/v1/sandboxes/{id}"), None)
        .await?
        .expect(200, "second destroy (idempotent)")?;
    Ok(format!(
        "destroyed in {:.2}s; then {} on GET; second destroy 200",
        took.as_secs_f64(),
        r.status.as_u16()
    ))
}

/// A sandbox with a 2 s TTL is gone a few seconds later (and not before).
pub(super) async fn ttl_expiry(c: &Ctx) -> Result<String> {
    let t = Instant::now();
    let sb = c.create(json!({"ttl": "2s"})).await?;
    let id = sb["id"].as_str().unwrap_or_default().to_string();
    c.destroyed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(id.clone());
    let ttl = Duration::from_secs(2);
    loop {
        let r = c
            .call(Method::GET, &format!("/api/v1/sandboxes/{id}"), None)
            .await?;
        let gone = match r.status.as_u16() {
            404 => true,
            200 => matches!(
                r.json()?["state"].as_str(),
                Some("destroyed" | "expired" | "destroying")
            ),
            _ => bail!("GET: {}", r.describe()),
        };
        let age = t.elapsed();
        if gone {
            // The TTL counts from the create; the create itself took part
            // of it, so only a sandbox gone well before can be wrong.
            if age < ttl - Duration::from_millis(500) {
                bail!(
                    "gone after {:.2}s, before its {}s TTL",
                    age.as_secs_f64(),
                    ttl.as_secs()
                );
            }
            return Ok(format!(
                "gone {:.2}s after the create call (ttl 2s)",
                age.as_secs_f64()
            ));
        }
        if age > ttl + Duration::from_secs(8) {
            bail!(
                "still {} {:.1}s after a create with ttl 2s",
                r.json()?["state"],
                age.as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
