//! Client commands: spawn, exec, ls, rm, cp.

use crate::client::{empty, enc, Client, ReqBody};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use futures_util::TryStreamExt;
use http::Method;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{json, Map, Value};
use std::io::Write;
use tokio::io::AsyncWriteExt;

#[derive(Args)]
pub struct SpawnArgs {
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    provider: Option<String>,
    #[arg(long)]
    memory_mb: Option<u64>,
    #[arg(long)]
    vcpus: Option<u32>,
    /// Time to live, Go syntax (10m, 1h30m).
    #[arg(long)]
    ttl: Option<String>,
    /// Metadata label KEY=VALUE (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// Print the whole sandbox JSON instead of the id.
    #[arg(long)]
    json: bool,
}

fn kv(pairs: &[String], what: &str) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("{what} {p:?} must look like KEY=VALUE"))?;
        m.insert(k.to_string(), Value::String(v.to_string()));
    }
    Ok(m)
}

pub async fn spawn(c: &Client, a: SpawnArgs) -> Result<i32> {
    let mut body = Map::new();
    if let Some(v) = a.image {
        body.insert("image".into(), v.into());
    }
    if let Some(v) = a.provider {
        body.insert("provider".into(), v.into());
    }
    if let Some(v) = a.memory_mb {
        body.insert("memory_mb".into(), v.into());
    }
    if let Some(v) = a.vcpus {
        body.insert("vcpus".into(), v.into());
    }
    if let Some(v) = a.ttl {
        body.insert("ttl".into(), v.into());
    }
    if !a.meta.is_empty() {
        body.insert("metadata".into(), Value::Object(kv(&a.meta, "--meta")?));
    }
    let sb = c
        .json(
            Method::POST,
            "/api/v1/sandboxes",
            Some(&Value::Object(body)),
        )
        .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&sb)?);
    } else {
        println!("{}", sb["id"].as_str().unwrap_or(""));
    }
    Ok(0)
}

#[derive(Args)]
pub struct ExecArgs {
    id: String,
    /// Go duration, e.g. 30s.
    #[arg(long)]
    timeout: Option<String>,
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Environment KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Print output as it arrives.
    #[arg(long)]
    stream: bool,
    /// One argument runs through /bin/sh -c; several run as an argv without a shell.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub async fn exec(c: &Client, a: ExecArgs) -> Result<i32> {
    let mut body = json!({});
    if a.command.len() == 1 {
        body["command"] = a.command[0].clone().into();
    } else {
        body["command"] = a.command[0].clone().into();
        body["args"] = a.command[1..].to_vec().into();
        body["mode"] = "argv".into();
    }
    if let Some(t) = a.timeout {
        body["timeout"] = t.into();
    }
    if let Some(w) = a.workdir {
        body["workdir"] = w.into();
    }
    if !a.env.is_empty() {
        body["env"] = Value::Object(kv(&a.env, "--env")?);
    }
    let path = format!("/api/v1/sandboxes/{}/exec", a.id);
    if !a.stream {
        return match c.json(Method::POST, &path, Some(&body)).await {
            Ok(r) => {
                print!("{}", r["stdout"].as_str().unwrap_or(""));
                eprint!("{}", r["stderr"].as_str().unwrap_or(""));
                Ok(r["exit_code"].as_i64().unwrap_or(1) as i32)
            }
            Err(e) => match e.downcast_ref::<crate::client::ApiFailure>() {
                Some(f) if f.code == "timeout" => {
                    print!("{}", f.body["stdout"].as_str().unwrap_or(""));
                    eprint!("{}", f.body["stderr"].as_str().unwrap_or(""));
                    eprintln!("stacyvm: {}", f.message);
                    Ok(124)
                }
                _ => Err(e),
            },
        };
    }
    body["stream"] = true.into();
    let resp = Client::check(
        c.send(
            Method::POST,
            &path,
            crate::client::full(serde_json::to_vec(&body)?),
            true,
        )
        .await?,
    )
    .await?;
    let mut incoming = resp.into_body();
    let mut buf = Vec::new();
    let mut code = 1;
    while let Some(frame) = incoming.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            match v["stream"].as_str() {
                Some("stdout") => {
                    let mut o = std::io::stdout();
                    o.write_all(v["data"].as_str().unwrap_or("").as_bytes())?;
                    o.flush()?;
                }
                Some("stderr") => eprint!("{}", v["data"].as_str().unwrap_or("")),
                Some("exit") => {
                    code = v["exit_code"].as_i64().unwrap_or(1) as i32;
                    if v["timeout"].as_bool() == Some(true) {
                        eprintln!("stacyvm: command timed out");
                        code = 124;
                    }
                }
                _ => eprintln!("stacyvm: {}", v["error"].as_str().unwrap_or("stream error")),
            }
        }
    }
    Ok(code)
}

#[derive(Args)]
pub struct LsArgs {
    #[arg(long)]
    json: bool,
}

pub async fn ls(c: &Client, a: LsArgs) -> Result<i32> {
    let list = c.json(Method::GET, "/api/v1/sandboxes", None).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!(
        "{:<20} {:<10} {:<8} {:<28} {:<22}",
        "ID", "STATE", "PROVIDER", "IMAGE", "EXPIRES"
    );
    for s in list.as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<10} {:<8} {:<28} {:<22}",
            s["id"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            s["provider"].as_str().unwrap_or(""),
            s["image"].as_str().unwrap_or(""),
            s["expires_at"].as_str().unwrap_or(""),
        );
    }
    Ok(0)
}

pub async fn rm(c: &Client, ids: Vec<String>) -> Result<i32> {
    let mut code = 0;
    for id in ids {
        match c
            .json(Method::DELETE, &format!("/api/v1/sandboxes/{id}"), None)
            .await
        {
            Ok(_) => println!("{id}"),
            Err(e) => {
                eprintln!("stacyvm: {id}: {e:#}");
                code = 1;
            }
        }
    }
    Ok(code)
}

/// `sb_…:/path` → (id, path).
fn remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    (id.starts_with("sb_") && path.starts_with('/')).then_some((id, path))
}

pub async fn cp(c: &Client, src: &str, dst: &str) -> Result<i32> {
    match (remote(src), remote(dst)) {
        (None, Some((id, path))) => {
            let body: ReqBody = if src == "-" {
                let stream = tokio_util::io::ReaderStream::new(tokio::io::stdin());
                BodyExt::boxed(StreamBody::new(
                    stream
                        .map_ok(hyper::body::Frame::data)
                        .map_err(|e| e.into()),
                ))
            } else {
                let f = tokio::fs::File::open(src)
                    .await
                    .with_context(|| format!("cannot open {src}"))?;
                let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024);
                BodyExt::boxed(StreamBody::new(
                    stream
                        .map_ok(hyper::body::Frame::data)
                        .map_err(|e| e.into()),
                ))
            };
            let path = format!("/api/v1/sandboxes/{id}/files/raw?path={}", enc(path));
            let resp = Client::check(c.send(Method::PUT, &path, body, false).await?).await?;
            let _ = resp.into_body().collect().await?;
            Ok(0)
        }
        (Some((id, path)), None) => {
            let url = format!("/api/v1/sandboxes/{id}/files?path={}", enc(path));
            let resp = Client::check(c.send(Method::GET, &url, empty(), false).await?).await?;
            let mut body = resp.into_body();
            let mut out: Box<dyn tokio::io::AsyncWrite + Unpin> = if dst == "-" {
                Box::new(tokio::io::stdout())
            } else {
                Box::new(
                    tokio::fs::File::create(dst)
                        .await
                        .with_context(|| format!("cannot create {dst}"))?,
                )
            };
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    let data: Bytes = data;
                    out.write_all(&data).await?;
                }
            }
            out.flush().await?;
            Ok(0)
        }
        _ => bail!("exactly one of SRC and DST must be a sandbox path like sb_abc…:/path"),
    }
}
