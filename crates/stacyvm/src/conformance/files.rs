//! Files: text and binary round trips, a 32 MiB transfer each way, list,
//! parent directories, move, chmod, delete, missing files.

use super::{Ctx, Reply};
use crate::client::enc;
use anyhow::{bail, Result};
use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Instant;

fn base(c: &Ctx) -> String {
    format!("/workspace/certify-{}", c.token)
}

async fn write(c: &Ctx, id: &str, path: &str, content: &str) -> Result<()> {
    c.call(
        Method::POST,
        &format!("/api/v1/sandboxes/{id}/files"),
        Some(&json!({"path": path, "content": content})),
    )
    .await?
    .expect(200, &format!("write {path}"))?;
    Ok(())
}

async fn read(c: &Ctx, id: &str, path: &str) -> Result<Reply> {
    c.call(
        Method::GET,
        &format!("/api/v1/sandboxes/{id}/files?path={}", enc(path)),
        None,
    )
    .await
}

async fn read_ok(c: &Ctx, id: &str, path: &str) -> Result<Bytes> {
    let r = read(c, id, path)
        .await?
        .expect(200, &format!("read {path}"))?;
    if !r.content_type.starts_with("application/octet-stream") || r.content_type.contains("charset")
    {
        bail!(
            "read {path}: content type {:?}, not application/octet-stream",
            r.content_type
        );
    }
    Ok(r.body)
}

async fn stat(c: &Ctx, id: &str, path: &str) -> Result<Reply> {
    c.call(
        Method::GET,
        &format!("/api/v1/sandboxes/{id}/files/stat?path={}", enc(path)),
        None,
    )
    .await
}

async fn stat_ok(c: &Ctx, id: &str, path: &str) -> Result<Value> {
    stat(c, id, path)
        .await?
        .expect(200, &format!("stat {path}"))?
        .json()
}

async fn put_raw(c: &Ctx, id: &str, path: &str, data: Bytes) -> Result<Value> {
    c.send(
        Method::PUT,
        &format!("/api/v1/sandboxes/{id}/files/raw?path={}", enc(path)),
        data,
        false,
    )
    .await?
    .expect(200, &format!("raw upload of {path}"))?
    .json()
}

fn all_bytes() -> Vec<u8> {
    (0..=255u8).cycle().take(256 * 4).collect()
}

pub(super) async fn text(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let path = format!("{}/text.txt", base(c));
    let content = "héllo wörld ✓\nsecond line\n\ttabbed\n";
    write(c, &id, &path, content).await?;
    let got = read_ok(c, &id, &path).await?;
    if got != content.as_bytes() {
        bail!("read back {:?}", String::from_utf8_lossy(&got));
    }
    Ok(format!(
        "{} bytes of UTF-8 written and read back",
        content.len()
    ))
}

pub(super) async fn binary(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let data = all_bytes();
    let p1 = format!("{}/bytes-json.bin", base(c));
    c.call(
        Method::POST,
        &format!("/api/v1/sandboxes/{id}/files"),
        Some(&json!({
            "path": p1,
            "content": base64::engine::general_purpose::STANDARD.encode(&data),
            "encoding": "base64",
        })),
    )
    .await?
    .expect(200, "base64 write")?;
    if read_ok(c, &id, &p1).await? != data {
        bail!("the base64-written file read back differently");
    }
    let p2 = format!("{}/bytes-raw.bin", base(c));
    let w = put_raw(c, &id, &p2, Bytes::from(data.clone())).await?;
    if w["size"] != data.len() {
        bail!("raw upload answered {w}");
    }
    if read_ok(c, &id, &p2).await? != data {
        bail!("the raw-uploaded file read back differently");
    }
    Ok("all 256 byte values survive base64 and raw writes".into())
}

/// 32 MiB of pseudo-random bytes (xorshift).
fn big_data() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(32 << 20);
    while out.len() < 32 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) async fn large(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let data = Bytes::from(big_data());
    let want = hex(&Sha256::digest(&data));
    let path = format!("{}/big.bin", base(c));
    let t = Instant::now();
    let w = put_raw(c, &id, &path, data.clone()).await?;
    let up = t.elapsed();
    if w["size"] != data.len() {
        bail!("upload answered {w}");
    }
    let t = Instant::now();
    let got = read_ok(c, &id, &path).await?;
    let down = t.elapsed();
    let back = hex(&Sha256::digest(&got));
    if back != want {
        bail!(
            "downloaded {} bytes with sha256 {back}, uploaded {} bytes with sha256 {want}",
            got.len(),
            data.len()
        );
    }
    let mut inside = String::new();
    if c.claims(stacyvm_providers::caps::EXEC) {
        let out = c.sh_ok(&id, &format!("sha256sum {path}"), "30s").await?;
        if !out.starts_with(&want) {
            bail!("sha256sum inside the sandbox: {out:?}, expected {want}");
        }
        inside = "; sha256sum inside agrees".into();
    }
    let mib = |d: std::time::Duration| 32.0 / d.as_secs_f64().max(1e-6);
    let _ = c
        .call(
            Method::DELETE,
            &format!("/api/v1/sandboxes/{id}/files?path={}", enc(&path)),
            None,
        )
        .await;
    Ok(format!(
        "32 MiB up {:.0} MiB/s, down {:.0} MiB/s, sha256 equal{inside}",
        mib(up),
        mib(down)
    ))
}

pub(super) async fn list(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let dir = format!("{}/list", base(c));
    write(c, &id, &format!("{dir}/b.txt"), "bb").await?;
    write(c, &id, &format!("{dir}/a.txt"), "a").await?;
    write(c, &id, &format!("{dir}/sub/c.txt"), "ccc").await?;
    let r = c
        .call(
            Method::GET,
            &format!("/api/v1/sandboxes/{id}/files/list?path={}", enc(&dir)),
            None,
        )
        .await?
        .expect(200, "list")?;
    let v = r.json()?;
    let entries = v.as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = entries.iter().filter_map(|e| e["name"].as_str()).collect();
    if names != ["a.txt", "b.txt", "sub"] {
        bail!(
            "listed {names:?}, expected [a.txt, b.txt, sub]: {}",
            r.describe()
        );
    }
    let ok = entries[0]["size"] == 1
        && entries[1]["size"] == 2
        && entries[0]["is_dir"] == false
        && entries[2]["is_dir"] == true
        && entries[0]["path"] == format!("{dir}/a.txt").as_str();
    if !ok {
        bail!("entries with wrong size/is_dir/path: {}", r.describe());
    }
    Ok("one level, sorted, with sizes and kinds".into())
}

pub(super) async fn mkdir(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let dir = format!("{}/made/deep/er", base(c));
    write(c, &id, &format!("{dir}/x.txt"), "x").await?;
    let st = stat_ok(c, &id, &dir).await?;
    if st["is_dir"] != true {
        bail!("{dir} is not a directory: {st}");
    }
    Ok("a write creates missing parent directories".into())
}

pub(super) async fn move_file(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let from = format!("{}/move-src.txt", base(c));
    let to = format!("{}/moved/into/new-name.txt", base(c));
    write(c, &id, &from, "moving").await?;
    c.call(
        Method::POST,
        &format!("/api/v1/sandboxes/{id}/files/move"),
        Some(&json!({"old_path": from, "new_path": to})),
    )
    .await?
    .expect(200, "move")?;
    let old = read(c, &id, &from).await?;
    if old.status.as_u16() != 404 {
        bail!("the old path still answers {}", old.describe());
    }
    if read_ok(c, &id, &to).await? != "moving".as_bytes() {
        bail!("the moved file has other content");
    }
    Ok("moved into a new directory; old path 404".into())
}

pub(super) async fn chmod(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let path = format!("{}/script.sh", base(c));
    write(c, &id, &path, "#!/bin/sh\necho run-ok\n").await?;
    for mode in ["755", "600"] {
        c.call(
            Method::POST,
            &format!("/api/v1/sandboxes/{id}/files/chmod"),
            Some(&json!({"path": path, "mode": mode})),
        )
        .await?
        .expect(200, "chmod")?;
        let st = stat_ok(c, &id, &path).await?;
        if st["mode"] != mode {
            bail!("after chmod {mode}, stat says mode {}", st["mode"]);
        }
        if mode == "755" && c.claims(stacyvm_providers::caps::EXEC) {
            let out = c.sh(&id, &path, "10s").await?;
            if out.stdout != "run-ok\n" {
                bail!("running the chmod 755 script: {}", out.describe());
            }
        }
    }
    Ok("755 and 600 applied and reported".into())
}

pub(super) async fn delete(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let dir = format!("{}/del", base(c));
    let file = format!("{dir}/f.txt");
    write(c, &id, &file, "x").await?;
    write(c, &id, &format!("{dir}/g.txt"), "y").await?;
    let del = |p: &str, recursive: bool| {
        let q = if recursive { "&recursive=true" } else { "" };
        format!("/api/v1/sandboxes/{id}/files?path={}{q}", enc(p))
    };
    c.call(Method::DELETE, &del(&file, false), None)
        .await?
        .expect(200, "delete file")?;
    let st = stat(c, &id, &file).await?;
    if st.status.as_u16() != 404 {
        bail!("the deleted file: stat {}", st.describe());
    }
    let r = c.call(Method::DELETE, &del(&dir, false), None).await?;
    if r.status.as_u16() != 409 {
        bail!(
            "deleting a non-empty directory without recursive: expected 409, got {}",
            r.describe()
        );
    }
    c.call(Method::DELETE, &del(&dir, true), None)
        .await?
        .expect(200, "recursive delete")?;
    let st = stat(c, &id, &dir).await?;
    if st.status.as_u16() != 404 {
        bail!("the deleted directory: stat {}", st.describe());
    }
    Ok("file deleted; non-empty dir 409, recursive delete 200".into())
}

pub(super) async fn missing(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let path = format!("{}/does-not-exist.txt", base(c));
    for (what, r) in [
        ("read", read(c, &id, &path).await?),
        ("stat", stat(c, &id, &path).await?),
    ] {
        if r.status.as_u16() != 404 || r.code() != "file_not_found" {
            bail!("{what}: expected 404 file_not_found, got {}", r.describe());
        }
    }
    Ok("404 file_not_found on read and stat".into())
}
