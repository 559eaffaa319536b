//! The provider conformance suite: what every provider must do, checked over
//! real HTTP against a real `stacyvm serve` child process that runs exactly
//! one provider.
//!
//! Every check has a stable id (`group.name`), a group, an outcome (pass,
//! fail, or skip — skip only when the provider does not claim the capability
//! the check is about, per `GET /api/v1/providers/{name}`), a detail message
//! and its duration. Each check runs under its own time limit; a failure or
//! a time-out never stops the suite, and every sandbox the suite created is
//! destroyed at the end.
//!
//! Groups, in the order they run: `provider`, `lifecycle`, `exec`,
//! `streaming`, `files`, `limits`, `isolation`, `preview`, `restart`,
//! `cleanup`.

mod cleanup;
mod exec;
mod files;
mod isolation;
mod lifecycle;
mod limits;
mod preview;
mod restart;
mod streaming;

use crate::client::{full, Client};
use crate::server_proc::OwnServer;
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::{json, Value};
use stacyvm_providers::caps;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Outcome of one check (the suite never warns: a check passes or fails).
pub use crate::hostcheck::Status;

/// One check and what it found.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Stable id, e.g. `exec.timeout_kills_tree`.
    pub id: String,
    pub group: String,
    pub status: Status,
    pub detail: String,
    #[serde(serialize_with = "as_millis")]
    #[serde(rename = "duration_ms")]
    pub duration: Duration,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// What the suite found.
#[derive(Debug, Clone, Default)]
pub struct SuiteResult {
    /// As `GET /api/v1/providers/{name}` reports it (empty if unknown).
    pub isolation: String,
    pub capabilities: Vec<String>,
    pub checks: Vec<Outcome>,
    /// The server log's tail when some check failed.
    pub server_log_tail: Option<String>,
}

/// Everything the checks share.
pub(crate) struct Ctx {
    provider: String,
    image: String,
    caps: Vec<String>,
    server: tokio::sync::Mutex<OwnServer>,
    client: Mutex<Client>,
    data_dir: PathBuf,
    /// Docker Engine socket, for the container leftover checks.
    docker_socket: Option<String>,
    /// Every sandbox the suite created.
    created: Mutex<Vec<String>>,
    /// Sandboxes the suite destroyed (or let expire) on purpose.
    destroyed: Mutex<Vec<String>>,
    /// The long-lived sandbox most checks use.
    main: Mutex<Option<String>>,
    /// A sandbox with 128 MB and 1 vCPU for the limit checks.
    limited: Mutex<Option<String>>,
    /// Random token for markers that must not collide with anything else.
    token: String,
    /// The server's `pids_limit` (processes per sandbox).
    pids_limit: u64,
    /// `provider.info` answered (else nothing may be skipped).
    caps_known: bool,
}

/// Settings of a suite run.
pub struct SuiteOptions {
    pub provider: String,
    pub image: String,
    pub docker_socket: Option<String>,
    /// The `pids_limit` the server was started with.
    pub pids_limit: u64,
    /// Print one line per check to stderr as it completes.
    pub progress: bool,
}

/// An answer of the API, read completely.
pub(crate) struct Reply {
    status: StatusCode,
    content_type: String,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "answer {} is not JSON: {}",
                self.status.as_u16(),
                snippet(&String::from_utf8_lossy(&self.body))
            )
        })
    }

    /// The error code of an error answer.
    fn code(&self) -> String {
        self.json()
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    fn describe(&self) -> String {
        format!(
            "{} {}",
            self.status.as_u16(),
            snippet(&String::from_utf8_lossy(&self.body))
        )
    }

    /// Fail unless the status is `want`.
    fn expect(self, want: u16, what: &str) -> Result<Reply> {
        if self.status.as_u16() != want {
            bail!("{what}: expected {want}, got {}", self.describe());
        }
        Ok(self)
    }
}

/// At most 300 characters of `s`, on one line.
pub(crate) fn snippet(s: &str) -> String {
    let one: String = s.trim().replace('\n', "\\n");
    if one.chars().count() > 300 {
        format!("{}…", one.chars().take(300).collect::<String>())
    } else {
        one
    }
}

/// The result of a finished exec.
#[derive(Debug)]
pub(crate) struct ExecOut {
    exit_code: i64,
    stdout: String,
    stderr: String,
}

impl ExecOut {
    fn describe(&self) -> String {
        format!(
            "exit {}, stdout {:?}, stderr {:?}",
            self.exit_code,
            snippet(&self.stdout),
            snippet(&self.stderr)
        )
    }
}

impl Ctx {
    fn claims(&self, cap: &str) -> bool {
        self.caps.iter().any(|c| c == cap)
    }

    fn client(&self) -> Client {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn send(&self, method: Method, path: &str, body: Bytes, json: bool) -> Result<Reply> {
        let resp = self
            .client()
            .send(method.clone(), path, full(body), json)
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the answer to {method} {path}"))?
            .to_bytes();
        Ok(Reply {
            status,
            content_type,
            body,
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Reply> {
        match body {
            Some(v) => {
                self.send(method, path, Bytes::from(serde_json::to_vec(v)?), true)
                    .await
            }
            None => self.send(method, path, Bytes::new(), false).await,
        }
    }

    /// Create a sandbox of the provider under test with `extra` fields;
    /// checks the 201, the state and the provider.
    async fn create(&self, extra: Value) -> Result<Value> {
        let mut body = json!({
            "image": self.image,
            "provider": self.provider,
            "ttl": "10m",
            "network": "none",
            "metadata": {"purpose": "certify"},
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let r = self
            .call(Method::POST, "/api/v1/sandboxes", Some(&body))
            .await?;
        if let Ok(v) = r.json() {
            if let Some(id) = v["id"].as_str() {
                self.created
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(id.to_string());
            }
        }
        let r = r.expect(201, "create")?;
        let sb = r.json()?;
        let id = sb["id"].as_str().unwrap_or_default();
        if !stacyvm_core::id::is_sandbox_id(id) {
            bail!("create answered no valid sandbox id: {}", r.describe());
        }
        if sb["state"] != "running" {
            bail!("create answered state {} (want running)", sb["state"]);
        }
        if sb["provider"] != self.provider.as_str() {
            bail!(
                "create answered provider {} (want {})",
                sb["provider"],
                self.provider
            );
        }
        Ok(sb)
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        self.call(Method::DELETE, &format!("/api/v1/sandboxes/{id}"), None)
            .await?
            .expect(200, "destroy")?;
        self.destroyed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.to_string());
        Ok(())
    }

    /// POST an exec request.
    async fn exec_raw(&self, id: &str, body: &Value) -> Result<Reply> {
        self.call(
            Method::POST,
            &format!("/api/v1/sandboxes/{id}/exec"),
            Some(body),
        )
        .await
    }

    /// Run an exec that must answer 200.
    async fn exec(&self, id: &str, body: Value) -> Result<ExecOut> {
        let r = self.exec_raw(id, &body).await?.expect(200, "exec")?;
        let v = r.json()?;
        let exit_code = v["exit_code"]
            .as_i64()
            .ok_or_else(|| anyhow!("exec answer has no exit_code: {}", r.describe()))?;
        let text = |k: &str| -> Result<String> {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("exec answer has no {k}: {}", r.describe()))
        };
        Ok(ExecOut {
            exit_code,
            stdout: text("stdout")?,
            stderr: text("stderr")?,
        })
    }

    /// Run a shell command line that must answer 200.
    async fn sh(&self, id: &str, command: &str, timeout: &str) -> Result<ExecOut> {
        self.exec(id, json!({"command": command, "timeout": timeout}))
            .await
    }

    /// Like [`Ctx::sh`], and the exit code must be 0.
    async fn sh_ok(&self, id: &str, command: &str, timeout: &str) -> Result<String> {
        let out = self.sh(id, command, timeout).await?;
        if out.exit_code != 0 {
            bail!("`{}` failed: {}", snippet(command), out.describe());
        }
        Ok(out.stdout)
    }

    fn main(&self) -> Result<String> {
        self.main
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| anyhow!("no sandbox to run in: lifecycle.create failed"))
    }

    /// The 128 MB / 1 vCPU sandbox, created on first use.
    async fn limited(&self) -> Result<String> {
        if let Some(id) = self
            .limited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(id);
        }
        let sb = self
            .create(json!({"memory_mb": 128, "vcpus": 1}))
            .await
            .context("creating a sandbox with memory_mb 128, vcpus 1")?;
        if sb["memory_mb"] != 128 || sb["vcpus"] != 1 {
            bail!(
                "the sandbox reports memory_mb {} and vcpus {} (asked for 128 and 1)",
                sb["memory_mb"],
                sb["vcpus"]
            );
        }
        let id = sb["id"].as_str().unwrap_or_default().to_string();
        *self.limited.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.clone());
        Ok(id)
    }

    /// Whether the sandbox still runs commands (retried for a few seconds:
    /// a sandbox that just lost a process to a limit may need a moment).
    async fn answers(&self, id: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let err = match self.sh(id, "echo alive", "10s").await {
                Ok(o) if o.exit_code == 0 && o.stdout == "alive\n" => return Ok(()),
                Ok(o) => anyhow!("`echo alive`: {}", o.describe()),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(err.context("the sandbox no longer runs commands"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Runs checks and collects their outcomes.
struct Runner<'a> {
    ctx: &'a Ctx,
    out: Vec<Outcome>,
    progress: bool,
}

impl Runner<'_> {
    /// Run one check: skipped when the provider does not claim every word
    /// of `needs`, failed on error or when it takes longer than `limit`.
    async fn check<F>(&mut self, id: &str, needs: &[&str], limit: Duration, f: F)
    where
        F: Future<Output = Result<String>>,
    {
        let group = id.split('.').next().unwrap_or(id).to_string();
        let t = Instant::now();
        let (status, detail) =
            if let Some(decided) = not_run(needs, &self.ctx.caps, self.ctx.caps_known) {
                decided
            } else {
                match tokio::time::timeout(limit, f).await {
                    Ok(Ok(d)) => (Status::Pass, d),
                    Ok(Err(e)) => (Status::Fail, snippet_long(&format!("{e:#}"))),
                    Err(_) => (
                        Status::Fail,
                        format!("did not finish within its {}s limit", limit.as_secs()),
                    ),
                }
            };
        let o = Outcome {
            id: id.to_string(),
            group,
            status,
            detail,
            duration: t.elapsed(),
        };
        if self.progress {
            eprintln!(
                "  {:<4} {:<34} {:>6.2}s  {}",
                o.status.as_str(),
                o.id,
                o.duration.as_secs_f64(),
                o.detail
            );
        }
        self.out.push(o);
    }
}

/// Why a check that needs the capability words `needs` is not run: a skip
/// when the provider does not claim one of them, a failure when its
/// capabilities are unknown; `None`: run it.
fn not_run(needs: &[&str], caps: &[String], caps_known: bool) -> Option<(Status, String)> {
    let missing: Vec<&str> = needs
        .iter()
        .copied()
        .filter(|n| !caps.iter().any(|c| c == n))
        .collect();
    if missing.is_empty() {
        None
    } else if !caps_known {
        Some((
            Status::Fail,
            format!(
                "needs {}, but the provider's capabilities are unknown (provider.info failed)",
                missing.join(", ")
            ),
        ))
    } else {
        Some((
            Status::Skip,
            format!("the provider does not claim {}", missing.join(", ")),
        ))
    }
}

/// At most 1000 characters on one line (error chains can be long).
fn snippet_long(s: &str) -> String {
    let one = s.trim().replace('\n', "\\n");
    if one.chars().count() > 1000 {
        format!("{}…", one.chars().take(1000).collect::<String>())
    } else {
        one
    }
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Run the whole suite against `server` (which must run only the provider
/// under test). The server is stopped when the suite is done.
pub async fn run(server: OwnServer, o: SuiteOptions) -> SuiteResult {
    let client = match server.client() {
        Ok(c) => c,
        Err(e) => {
            return SuiteResult {
                checks: vec![Outcome {
                    id: "provider.info".into(),
                    group: "provider".into(),
                    status: Status::Fail,
                    detail: format!("{e:#}"),
                    duration: Duration::ZERO,
                }],
                ..SuiteResult::default()
            }
        }
    };
    let data_dir = server.data_dir().to_path_buf();
    let mut ctx = Ctx {
        provider: o.provider.clone(),
        image: o.image.clone(),
        caps: Vec::new(),
        server: tokio::sync::Mutex::new(server),
        client: Mutex::new(client),
        data_dir,
        docker_socket: o.docker_socket.clone(),
        created: Mutex::new(Vec::new()),
        destroyed: Mutex::new(Vec::new()),
        main: Mutex::new(None),
        limited: Mutex::new(None),
        token: stacyvm_core::id::random_token(10),
        pids_limit: o.pids_limit,
        caps_known: false,
    };

    // What the provider claims decides what is skipped.
    let t = Instant::now();
    let info = provider_info(&ctx).await;
    let mut result = SuiteResult::default();
    let info_outcome = match info {
        Ok((isolation, capabilities, detail)) => {
            result.isolation = isolation;
            result.capabilities = capabilities.clone();
            ctx.caps = capabilities;
            ctx.caps_known = true;
            (Status::Pass, detail)
        }
        Err(e) => (Status::Fail, format!("{e:#}")),
    };
    let first = Outcome {
        id: "provider.info".into(),
        group: "provider".into(),
        status: info_outcome.0,
        detail: info_outcome.1,
        duration: t.elapsed(),
    };
    if o.progress {
        eprintln!(
            "  {:<4} {:<34} {:>6.2}s  {}",
            first.status.as_str(),
            first.id,
            first.duration.as_secs_f64(),
            first.detail
        );
    }

    let mut r = Runner {
        ctx: &ctx,
        out: vec![first],
        progress: o.progress,
    };
    let c = &ctx;

    r.check("lifecycle.create", &[], secs(90), lifecycle::create(c))
        .await;
    r.check("lifecycle.get", &[], secs(15), lifecycle::get(c))
        .await;
    r.check("lifecycle.list", &[], secs(15), lifecycle::list(c))
        .await;
    r.check("lifecycle.destroy", &[], secs(90), lifecycle::destroy(c))
        .await;
    r.check(
        "lifecycle.ttl_expiry",
        &[],
        secs(90),
        lifecycle::ttl_expiry(c),
    )
    .await;

    let ex = &[caps::EXEC][..];
    r.check("exec.exit_codes", ex, secs(20), exec::exit_codes(c))
        .await;
    r.check("exec.stdout_stderr", ex, secs(15), exec::stdout_stderr(c))
        .await;
    r.check("exec.stdin", ex, secs(15), exec::stdin(c)).await;
    r.check("exec.env", ex, secs(15), exec::env(c)).await;
    r.check("exec.workdir", ex, secs(15), exec::workdir(c))
        .await;
    r.check("exec.argv_mode", ex, secs(15), exec::argv_mode(c))
        .await;
    r.check(
        "exec.timeout_kills_tree",
        ex,
        secs(30),
        exec::timeout_kills_tree(c),
    )
    .await;
    r.check("exec.not_found_127", ex, secs(15), exec::not_found(c))
        .await;

    r.check(
        "streaming.incremental",
        &[caps::EXEC, caps::STREAMING],
        secs(30),
        streaming::incremental(c),
    )
    .await;

    let fl = &[caps::FILES][..];
    r.check("files.text_roundtrip", fl, secs(15), files::text(c))
        .await;
    r.check("files.binary_bytes", fl, secs(15), files::binary(c))
        .await;
    r.check("files.large_32mib", fl, secs(90), files::large(c))
        .await;
    r.check("files.list", fl, secs(15), files::list(c)).await;
    r.check("files.mkdir_parents", fl, secs(15), files::mkdir(c))
        .await;
    r.check("files.move", fl, secs(15), files::move_file(c))
        .await;
    r.check("files.chmod", fl, secs(15), files::chmod(c)).await;
    r.check("files.delete", fl, secs(15), files::delete(c))
        .await;
    r.check("files.missing_404", fl, secs(15), files::missing(c))
        .await;

    r.check(
        "limits.memory",
        &[caps::EXEC, caps::MEMORY_LIMIT],
        secs(90),
        limits::memory(c),
    )
    .await;
    r.check(
        "limits.pids",
        &[caps::EXEC, caps::PIDS_LIMIT],
        secs(60),
        limits::pids(c),
    )
    .await;
    r.check(
        "limits.cpu",
        &[caps::EXEC, caps::CPU_LIMIT],
        secs(60),
        limits::cpu(c),
    )
    .await;

    r.check(
        "isolation.pids",
        &[caps::EXEC, caps::ISOLATED_PIDS],
        secs(20),
        isolation::pids(c),
    )
    .await;
    r.check(
        "isolation.filesystem",
        &[caps::EXEC, caps::ISOLATED_FILESYSTEM],
        secs(20),
        isolation::filesystem(c),
    )
    .await;
    r.check(
        "isolation.hostname",
        &[caps::EXEC, caps::ISOLATED_HOSTNAME],
        secs(20),
        isolation::hostname(c),
    )
    .await;
    r.check(
        "isolation.network_none",
        &[caps::EXEC, caps::NETWORK_NONE],
        secs(20),
        isolation::network_none(c),
    )
    .await;

    r.check(
        "preview.http",
        &[caps::EXEC, caps::PREVIEW],
        secs(45),
        preview::http(c),
    )
    .await;

    r.check("restart.reattach", &[], secs(120), restart::reattach(c))
        .await;

    r.check("cleanup.destroyed", &[], secs(45), cleanup::destroyed(c))
        .await;
    r.check("cleanup.final", &[], secs(90), cleanup::final_state(c))
        .await;

    let mut checks = r.out;
    // Whatever happened (a check may have been cut off while the server was
    // down): no sandbox of the suite outlives it.
    {
        let mut s = ctx.server.lock().await;
        if !s.is_started() && s.restart().await.is_ok() {
            if let Ok(client) = s.client() {
                *ctx.client.lock().unwrap_or_else(|e| e.into_inner()) = client;
            }
        }
    }
    cleanup::destroy_everything(&ctx).await;
    result.checks.append(&mut checks);
    let mut server = ctx.server.into_inner();
    if result.checks.iter().any(|c| c.status == Status::Fail) {
        result.server_log_tail = Some(server.log_tail(40));
    }
    server.stop();
    result
}

/// `GET /api/v1/providers/{name}`: healthy, with isolation and capabilities.
async fn provider_info(c: &Ctx) -> Result<(String, Vec<String>, String)> {
    let r = c
        .call(
            Method::GET,
            &format!("/api/v1/providers/{}", c.provider),
            None,
        )
        .await?
        .expect(200, "GET /api/v1/providers/{name}")?;
    let v = r.json()?;
    if v["name"] != c.provider.as_str() {
        bail!("the provider answers with name {}", v["name"]);
    }
    if v["healthy"] != true {
        bail!(
            "the provider is not healthy: {}",
            v["error"].as_str().unwrap_or("(no error given)")
        );
    }
    let capabilities: Vec<String> = v["capabilities"]
        .as_array()
        .ok_or_else(|| anyhow!("no capabilities array: {}", r.describe()))?
        .iter()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    let isolation = v["isolation"].as_str().unwrap_or_default().to_string();
    if isolation.is_empty() {
        bail!("no isolation reported: {}", r.describe());
    }
    let detail = format!(
        "healthy, isolation {isolation}, {} capabilities",
        capabilities.len()
    );
    Ok((isolation, capabilities, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unclaimed_capabilities_are_skipped() {
        let caps: Vec<String> = vec!["exec".into(), "files".into()];
        assert!(not_run(&[], &caps, true).is_none());
        assert!(not_run(&[caps::EXEC], &caps, true).is_none());
        let (st, why) = not_run(&[caps::EXEC, caps::MEMORY_LIMIT], &caps, true).unwrap();
        assert_eq!(st, Status::Skip);
        assert!(
            why.contains("memory_limit") && !why.contains("exec"),
            "{why}"
        );
        // Unknown capabilities never turn into skips.
        let (st, _) = not_run(&[caps::PREVIEW], &[], false).unwrap();
        assert_eq!(st, Status::Fail);
        assert!(not_run(&[], &[], false).is_none());
    }

    #[test]
    fn snippets_stay_on_one_line() {
        assert_eq!(snippet("a\nb\n"), "a\\nb");
        let long = "x".repeat(400);
        assert_eq!(snippet(&long).chars().count(), 301);
        assert_eq!(snippet_long(&long), long);
    }

    #[test]
    fn outcomes_serialize_durations_in_milliseconds() {
        let o = Outcome {
            id: "exec.stdin".into(),
            group: "exec".into(),
            status: Status::Pass,
            detail: "ok".into(),
            duration: Duration::from_millis(1500),
        };
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(
            v,
            json!({"id": "exec.stdin", "group": "exec", "status": "pass", "detail": "ok", "duration_ms": 1500})
        );
    }
}
