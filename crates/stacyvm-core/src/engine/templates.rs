//! Templates (API.md §6) and their warm pools.
//!
//! A template is a named create request plus what to do once the sandbox
//! runs: `files` to write and `setup` commands to run (a failing command
//! fails the spawn and the sandbox is destroyed).
//!
//! Warm pools: a template with `pool_size > 0` has that many sandboxes kept
//! created, set up and ready. They are ordinary records owned by
//! `system:pool:<template>` with `pool = <template>`: they count against the
//! global capacity (and against a quota set for that owner, if any), are
//! hidden from every list, and are invisible to tenant-scoped keys. A spawn
//! hands the oldest ready one to the caller in one store transaction that
//! also checks the caller's quotas ([`Store::claim_pooled`]); the filler
//! task then makes a replacement in the background.

use super::{check_path, is_valid_image, CreateSandbox, Engine, ExecInput};
use crate::audit::AuditEvent;
use crate::clock::now_ms;
use crate::duration;
use crate::error::{Error, ErrorCode};
use crate::governance::Caller;
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use stacyvm_store::quotas::Claim;
use stacyvm_store::{SandboxRecord, SandboxState, TemplateRow};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest warm pool of one template.
pub const MAX_POOL_SIZE: u32 = 64;
/// Pool fills running at once.
const FILL_CONCURRENCY: usize = 4;

/// A file a template writes into every sandbox it makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateFile {
    pub path: String,
    #[serde(default)]
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `utf8` (default) or `base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
}

/// A stored template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub name: String,
    pub image: String,
    /// Empty: the default provider.
    #[serde(default)]
    pub provider: String,
    pub memory_mb: u64,
    pub vcpus: u32,
    pub ttl: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub setup: Vec<String>,
    #[serde(default)]
    pub files: Vec<TemplateFile>,
    #[serde(default)]
    pub pool_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// A template with its timestamps.
#[derive(Debug, Clone)]
pub struct TemplateInfo {
    pub template: Template,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FilesInput {
    List(Vec<TemplateFile>),
    /// `{"/path": "content"}`
    Map(BTreeMap<String, String>),
}

/// Body of `POST /api/v1/templates` and `PUT /api/v1/templates/{name}`.
/// Accepts both namings: `vcpus`/`cpu_cores`, `ttl` (Go duration or
/// seconds)/`ttl_seconds`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TemplateInput {
    pub name: Option<String>,
    pub image: Option<String>,
    pub provider: Option<String>,
    pub memory_mb: Option<u64>,
    pub vcpus: Option<u32>,
    pub cpu_cores: Option<u32>,
    pub ttl: Option<serde_json::Value>,
    pub ttl_seconds: Option<u64>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub description: Option<String>,
    pub env: Option<BTreeMap<String, String>>,
    pub setup: Option<OneOrMany>,
    pub files: Option<FilesInput>,
    pub pool_size: Option<u32>,
    pub network: Option<String>,
}

/// Optional body of `POST /api/v1/templates/{name}/spawn`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SpawnOverrides {
    pub provider: Option<String>,
    pub ttl: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub owner_id: Option<String>,
    pub memory_mb: Option<u64>,
    pub vcpus: Option<u32>,
    pub network: Option<String>,
    pub env: Option<BTreeMap<String, String>>,
}

impl SpawnOverrides {
    /// The overrides a `POST /api/v1/sandboxes` with `template` carries
    /// (its `image` is the template's).
    pub fn from_create(req: &CreateSandbox) -> SpawnOverrides {
        SpawnOverrides {
            provider: req.provider.clone().filter(|p| !p.is_empty()),
            ttl: req.ttl.clone().filter(|t| !t.is_empty()),
            metadata: req.metadata.clone(),
            owner_id: req.owner_id.clone().filter(|o| !o.is_empty()),
            memory_mb: req.memory_mb,
            vcpus: req.vcpus,
            network: req.network.clone(),
            env: req.env.clone(),
        }
    }
}

fn valid_template_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn template_not_found(name: &str) -> Error {
    Error::new(ErrorCode::NotFound, format!("template {name} not found"))
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn decode_file(f: &TemplateFile) -> Result<Bytes, Error> {
    match f.encoding.as_deref() {
        None | Some("") | Some("utf8") | Some("utf-8") => Ok(Bytes::from(f.content.clone())),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(f.content.trim())
            .map(Bytes::from)
            .map_err(|e| {
                Error::invalid(format!("file {}: content is not valid base64: {e}", f.path))
            }),
        Some(other) => Err(Error::invalid(format!(
            "file {}: encoding must be utf8 or base64, not {other:?}",
            f.path
        ))),
    }
}

fn info(row: TemplateRow) -> Result<TemplateInfo, Error> {
    let template: Template = serde_json::from_str(&row.spec).map_err(|e| {
        tracing::error!(template = %row.name, error = %e, "stored template is unreadable");
        Error::internal(format!(
            "template {} is stored in an unreadable form",
            row.name
        ))
    })?;
    Ok(TemplateInfo {
        template,
        created_at_ms: row.created_at_ms,
        updated_at_ms: row.updated_at_ms,
    })
}

impl Engine {
    // ----- CRUD ----------------------------------------------------------

    /// Validate a template body into a template named `name`.
    fn normalize_template(&self, name: &str, input: &TemplateInput) -> Result<Template, Error> {
        if !valid_template_name(name) {
            return Err(Error::invalid(
                "template names are 1-64 characters of [A-Za-z0-9._-], not starting with '.' or '-'",
            ));
        }
        let image = input
            .image
            .clone()
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| self.cfg.default_image.clone());
        if !is_valid_image(&image) {
            return Err(Error::invalid(format!(
                "image {image:?} is not a valid image reference"
            )));
        }
        let provider = input.provider.clone().unwrap_or_default();
        if !provider.is_empty() {
            self.provider(&provider)?;
        }
        let ttl = match (&input.ttl, input.ttl_seconds) {
            (Some(serde_json::Value::String(s)), _) if !s.is_empty() => s.clone(),
            (Some(serde_json::Value::Number(n)), _) => {
                let secs = n
                    .as_u64()
                    .ok_or_else(|| Error::invalid("ttl in seconds must be a positive integer"))?;
                duration::format(Duration::from_secs(secs))
            }
            (
                Some(serde_json::Value::String(_)) | Some(serde_json::Value::Null) | None,
                Some(secs),
            ) => duration::format(Duration::from_secs(secs)),
            (Some(serde_json::Value::String(_)) | Some(serde_json::Value::Null) | None, None) => {
                duration::format(self.cfg.default_ttl)
            }
            (Some(other), _) => {
                return Err(Error::invalid(format!(
                    "ttl must be a duration like \"30m\" or a number of seconds, not {other}"
                )))
            }
        };
        let setup = match &input.setup {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if setup.len() > 64 {
            return Err(Error::invalid(
                "a template may have at most 64 setup commands",
            ));
        }
        for c in &setup {
            if c.trim().is_empty() || c.contains('\0') {
                return Err(Error::invalid(
                    "setup commands must be non-empty and free of NUL bytes",
                ));
            }
        }
        let files = match &input.files {
            None => Vec::new(),
            Some(FilesInput::List(v)) => v.clone(),
            Some(FilesInput::Map(m)) => m
                .iter()
                .map(|(p, c)| TemplateFile {
                    path: p.clone(),
                    content: c.clone(),
                    mode: None,
                    encoding: None,
                })
                .collect(),
        };
        if files.len() > 256 {
            return Err(Error::invalid("a template may have at most 256 files"));
        }
        let mut files_out = Vec::with_capacity(files.len());
        for mut f in files {
            f.path = check_path(&f.path)?;
            if f.path == "/" {
                return Err(Error::invalid("a template file cannot be /"));
            }
            if let Some(m) = f.mode.as_deref().filter(|m| !m.is_empty()) {
                if stacyvm_agent_proto::parse_mode(m).is_none() {
                    return Err(Error::invalid(format!(
                        "file {}: mode {m:?} is not an octal permission like 644",
                        f.path
                    )));
                }
            }
            decode_file(&f)?;
            files_out.push(f);
        }
        let pool_size = input.pool_size.unwrap_or(0);
        if pool_size > MAX_POOL_SIZE || pool_size as u64 > self.cfg.max_sandboxes {
            return Err(Error::invalid(format!(
                "pool_size may be at most {}",
                MAX_POOL_SIZE.min(self.cfg.max_sandboxes as u32)
            )));
        }
        let t = Template {
            name: name.to_string(),
            image,
            provider,
            memory_mb: input.memory_mb.unwrap_or(self.cfg.default_memory_mb),
            vcpus: input
                .vcpus
                .or(input.cpu_cores)
                .unwrap_or(self.cfg.default_vcpus),
            ttl,
            metadata: input.metadata.clone().unwrap_or_default(),
            description: input.description.clone().filter(|d| !d.is_empty()),
            env: input.env.clone().unwrap_or_default(),
            setup,
            files: files_out,
            pool_size,
            network: input.network.clone().filter(|n| !n.is_empty()),
        };
        // Everything a spawn will check (limits, ttl, env, metadata), now.
        let req = self.template_request(&t, &SpawnOverrides::default());
        self.plan(&req, None)
            .map_err(|e| Error::invalid(format!("template {name}: {}", e.message)))?;
        Ok(t)
    }

    pub async fn create_template(&self, input: &TemplateInput) -> Result<TemplateInfo, Error> {
        let name = input.name.clone().unwrap_or_default();
        let t = self.normalize_template(&name, input)?;
        let spec = serde_json::to_string(&t).map_err(|e| Error::internal(e.to_string()))?;
        let now = now_ms();
        let row = self
            .db(move |s| s.insert_template(&name, &spec, now))
            .await?;
        self.gov.pool_wake.notify_one();
        info(row)
    }

    /// Full replace; the template's warm pool is rebuilt.
    pub async fn update_template(
        &self,
        name: &str,
        input: &TemplateInput,
    ) -> Result<TemplateInfo, Error> {
        if let Some(n) = input.name.as_deref().filter(|n| !n.is_empty()) {
            if n != name {
                return Err(Error::invalid(format!(
                    "the body names template {n:?} but the URL names {name:?}"
                )));
            }
        }
        let t = self.normalize_template(name, input)?;
        let spec = serde_json::to_string(&t).map_err(|e| Error::internal(e.to_string()))?;
        let now = now_ms();
        let n = name.to_string();
        let row = self
            .db(move |s| s.update_template(&n, &spec, now))
            .await?
            .ok_or_else(|| template_not_found(name))?;
        self.drain_pool(name, "template updated").await;
        self.gov.pool_wake.notify_one();
        info(row)
    }

    pub async fn get_template(&self, name: &str) -> Result<TemplateInfo, Error> {
        let n = name.to_string();
        let row = self
            .db(move |s| s.get_template(&n))
            .await?
            .ok_or_else(|| template_not_found(name))?;
        info(row)
    }

    pub async fn list_templates(&self) -> Result<Vec<TemplateInfo>, Error> {
        self.db(|s| s.list_templates())
            .await?
            .into_iter()
            .map(info)
            .collect()
    }

    /// Delete a template and destroy its warm pool.
    pub async fn delete_template(&self, name: &str) -> Result<(), Error> {
        let n = name.to_string();
        if !self.db(move |s| s.delete_template(&n)).await? {
            return Err(template_not_found(name));
        }
        self.drain_pool(name, "template deleted").await;
        Ok(())
    }

    // ----- spawning ------------------------------------------------------

    /// The create request a template (plus overrides) stands for.
    pub fn template_request(&self, t: &Template, ov: &SpawnOverrides) -> CreateSandbox {
        let mut metadata = t.metadata.clone();
        if let Some(m) = &ov.metadata {
            metadata.extend(m.clone());
        }
        let mut env = t.env.clone();
        if let Some(e) = &ov.env {
            env.extend(e.clone());
        }
        CreateSandbox {
            image: Some(t.image.clone()),
            provider: ov
                .provider
                .clone()
                .filter(|p| !p.is_empty())
                .or_else(|| Some(t.provider.clone()).filter(|p| !p.is_empty())),
            memory_mb: ov.memory_mb.or(Some(t.memory_mb)),
            vcpus: ov.vcpus.or(Some(t.vcpus)),
            ttl: ov
                .ttl
                .clone()
                .filter(|s| !s.is_empty())
                .or(Some(t.ttl.clone())),
            metadata: Some(metadata),
            owner_id: ov.owner_id.clone(),
            template: None,
            network: ov.network.clone().or(t.network.clone()),
            env: Some(env),
            from_template: Some(t.name.clone()),
            ..CreateSandbox::default()
        }
    }

    /// The create request of a `POST /api/v1/sandboxes` naming a template.
    pub async fn template_create_request(
        &self,
        name: &str,
        req: &CreateSandbox,
    ) -> Result<CreateSandbox, Error> {
        let t = self.get_template(name).await?.template;
        let mut out = self.template_request(&t, &SpawnOverrides::from_create(req));
        out.tenant = req.tenant.clone();
        out.creator = req.creator.clone();
        Ok(out)
    }

    /// Spawn a sandbox from a template: from its warm pool when it has a
    /// ready sandbox that fits the request, else created now (files
    /// written, setup run). Returns the record and whether it came warm.
    pub async fn spawn_template(
        &self,
        name: &str,
        ov: &SpawnOverrides,
        owner: Option<&str>,
        caller: &Caller,
    ) -> Result<(SandboxRecord, bool), Error> {
        let t = self.get_template(name).await?.template;
        let mut req = self.template_request(&t, ov);
        req.tenant = caller.tenant.clone();
        req.creator = caller.identity.clone();
        if t.pool_size > 0 {
            let planned = self.plan(&req, owner)?;
            let claim = Claim {
                owner_id: planned.owner_id.clone(),
                tenant: planned.tenant.clone(),
                creator: planned.creator.clone(),
                metadata: planned.metadata.clone(),
                expires_at_ms: planned.expires_at_ms,
                now_ms: planned.created_at_ms,
            };
            let max = self.cfg.max_sandboxes;
            let n = name.to_string();
            let min_expiry = now_ms() + 60_000;
            let got = self
                .db(move |s| {
                    s.claim_pooled(&n, &claim, max, |r| {
                        r.image == planned.image
                            && r.provider == planned.provider
                            && r.memory_mb == planned.memory_mb
                            && r.vcpus == planned.vcpus
                            && r.network == planned.network
                            && r.env == planned.env
                            && r.expires_at_ms > min_expiry
                    })
                })
                .await?;
            if let Some(rec) = got {
                self.gov.pool_wake.notify_one();
                self.remember_acl(&rec);
                self.note_preview_access(&rec);
                let store = self.store.clone();
                let (id, msg) = (
                    rec.id.clone(),
                    format!("claimed from the warm pool of template {name}"),
                );
                tokio::task::spawn_blocking(move || store.add_event(&id, now_ms(), &msg));
                return Ok((rec, true));
            }
        }
        let rec = self.create(&req, owner).await?;
        self.remember_acl(&rec);
        if let Err(e) = self.prepare_from_template(&rec.id, &t).await {
            let _ = self.destroy(&rec.id, "template setup failed").await;
            return Err(e);
        }
        Ok((rec, false))
    }

    /// Write a template's files and run its setup commands in a sandbox.
    async fn prepare_from_template(&self, id: &str, t: &Template) -> Result<(), Error> {
        for f in &t.files {
            let data = decode_file(f)?;
            self.write_bytes(
                id,
                &f.path,
                f.mode.as_deref().filter(|m| !m.is_empty()),
                data,
            )
            .await
            .map_err(|e| {
                Error::new(
                    e.code,
                    format!(
                        "template {}: writing {} failed: {}",
                        t.name, f.path, e.message
                    ),
                )
            })?;
        }
        for (i, cmd) in t.setup.iter().enumerate() {
            let (req, timeout) = self.prepare_exec(&ExecInput {
                command: Some(cmd.clone()),
                ..ExecInput::default()
            })?;
            let res = self.exec(id, &req).await.map_err(|e| {
                Error::new(
                    e.code,
                    format!(
                        "template {}: setup command {} failed: {}",
                        t.name,
                        i + 1,
                        e.message
                    ),
                )
            })?;
            if res.timed_out || res.exit_code != 0 {
                let how = if res.timed_out {
                    format!("timed out after {}", duration::format(timeout))
                } else {
                    format!("exited with code {}", res.exit_code)
                };
                return Err(Error::new(
                    ErrorCode::ProviderError,
                    format!(
                        "template {}: setup command {} ({cmd}) {how}\nstdout:\n{}\nstderr:\n{}",
                        t.name,
                        i + 1,
                        tail(&res.stdout, 4096),
                        tail(&res.stderr, 4096)
                    ),
                ));
            }
        }
        Ok(())
    }

    // ----- warm pools ----------------------------------------------------

    /// `GET /api/v1/pool/status`: `{"enabled": false}` unless a template
    /// keeps a pool.
    pub async fn pool_status(&self) -> Result<serde_json::Value, Error> {
        let templates = self.list_templates().await?;
        let pooled = self.db(|s| s.pooled()).await?;
        let mut out = serde_json::Map::new();
        for t in templates.iter().filter(|t| t.template.pool_size > 0) {
            let mine = pooled.iter().filter(|p| p.1 == t.template.name);
            let ready = mine.clone().filter(|p| p.2).count();
            let total = mine.count();
            out.insert(
                t.template.name.clone(),
                serde_json::json!({
                    "size": t.template.pool_size,
                    "ready": ready,
                    "warming": total - ready,
                }),
            );
        }
        if out.is_empty() {
            return Ok(serde_json::json!({"enabled": false}));
        }
        Ok(serde_json::json!({"enabled": true, "templates": out}))
    }

    /// Destroy every pooled sandbox of a template.
    async fn drain_pool(&self, name: &str, reason: &str) {
        let pooled = self.db(|s| s.pooled()).await.unwrap_or_default();
        for (id, tname, _) in pooled {
            if tname == name {
                self.destroy_pooled(&id, &tname, reason).await;
            }
        }
    }

    async fn destroy_pooled(&self, id: &str, template: &str, reason: &str) {
        let r = self.destroy(id, reason).await;
        if let Err(e) = &r {
            tracing::warn!(sandbox = %id, template, error = %e, "could not destroy a pooled sandbox");
        }
        self.audit(
            AuditEvent::system("sandbox.destroy", id)
                .owner(Some(&format!("system:pool:{template}")))
                .detail("reason", reason)
                .detail("template", template)
                .outcome(&r),
        );
    }

    /// The warm-pool filler: runs until the process ends.
    pub async fn run_pools(self: Arc<Self>) {
        // A pooled sandbox whose setup a restart interrupted is stale.
        if let Ok(pooled) = self.db(|s| s.pooled()).await {
            for (id, tname, ready) in pooled {
                if !ready {
                    self.destroy_pooled(&id, &tname, "warm pool: setup was interrupted")
                        .await;
                }
            }
        }
        loop {
            self.refill_pools().await;
            tokio::select! {
                _ = self.gov.pool_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    /// One pass: remove what no template wants, start what is missing.
    async fn refill_pools(self: &Arc<Self>) {
        let Ok(templates) = self.list_templates().await else {
            return;
        };
        // A pooled sandbox whose runtime failed is nobody's to clean up.
        if let Ok(failed) = self.db(|s| s.list_in_states(&[SandboxState::Error])).await {
            for r in failed {
                if let Some(t) = &r.pool {
                    self.destroy_pooled(&r.id, t, "warm pool: the sandbox failed")
                        .await;
                }
            }
        }
        let Ok(pooled) = self.db(|s| s.pooled()).await else {
            return;
        };
        let wanted: HashMap<&str, &TemplateInfo> = templates
            .iter()
            .map(|t| (t.template.name.as_str(), t))
            .collect();
        let mut have: HashMap<String, Vec<(String, bool)>> = HashMap::new();
        for (id, tname, ready) in pooled {
            have.entry(tname).or_default().push((id, ready));
        }
        for (tname, list) in &have {
            let size = wanted
                .get(tname.as_str())
                .map_or(0, |t| t.template.pool_size) as usize;
            if list.len() > size {
                // Surplus: warming ones first, then the newest.
                let mut order: Vec<_> = list
                    .iter()
                    .filter(|s| !s.1)
                    .chain(list.iter().filter(|s| s.1).rev())
                    .collect();
                order.truncate(list.len() - size);
                for (id, _) in order {
                    self.destroy_pooled(id, tname, "warm pool shrunk").await;
                }
            }
        }
        let mut jobs = tokio::task::JoinSet::new();
        for t in templates.iter().filter(|t| t.template.pool_size > 0) {
            let name = &t.template.name;
            let missing =
                (t.template.pool_size as usize).saturating_sub(have.get(name).map_or(0, Vec::len));
            if missing == 0 {
                continue;
            }
            {
                let b = self
                    .gov
                    .pool_backoff
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if b.get(name)
                    .is_some_and(|(until, _)| Instant::now() < *until)
                {
                    continue;
                }
            }
            for _ in 0..missing {
                while jobs.len() >= FILL_CONCURRENCY {
                    jobs.join_next().await;
                }
                let me = self.clone();
                let t = t.clone();
                jobs.spawn(async move { me.fill_one(t).await });
            }
        }
        while jobs.join_next().await.is_some() {}
    }

    fn pool_failed(&self, name: &str) {
        let mut b = self
            .gov
            .pool_backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let fails = b.get(name).map_or(0, |e| e.1) + 1;
        let wait = Duration::from_millis(500u64 << fails.min(7)); // up to 64 s
        b.insert(name.to_string(), (Instant::now() + wait, fails));
    }

    /// Make one pooled sandbox of a template and mark it ready.
    async fn fill_one(&self, t: TemplateInfo) {
        let name = t.template.name.clone();
        let owner = format!("system:pool:{name}");
        let mut req = self.template_request(&t.template, &SpawnOverrides::default());
        req.owner_id = Some(owner.clone());
        req.pool = Some(name.clone());
        req.ttl = Some(duration::format(self.cfg.max_ttl));
        let created = self.create(&req, None).await;
        self.audit(
            AuditEvent::system(
                "sandbox.create",
                created.as_ref().map_or("-", |r| r.id.as_str()),
            )
            .owner(Some(&owner))
            .detail("template", name.as_str())
            .detail("pool", true)
            .outcome(&created),
        );
        let rec = match created {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(template = %name, error = %e, "warm pool: could not create a sandbox");
                self.pool_failed(&name);
                return;
            }
        };
        self.remember_acl(&rec);
        if let Err(e) = self.prepare_from_template(&rec.id, &t.template).await {
            tracing::warn!(template = %name, sandbox = %rec.id, error = %e.message, "warm pool: setup failed");
            self.destroy_pooled(&rec.id, &name, "warm pool: setup failed")
                .await;
            self.pool_failed(&name);
            return;
        }
        // The template may have changed while this one was being made.
        let current = self.get_template(&name).await.ok();
        let still =
            current.is_some_and(|c| c.updated_at_ms == t.updated_at_ms && c.template.pool_size > 0);
        let (id, n) = (rec.id.clone(), name.clone());
        let marked = still
            && self
                .db(move |s| s.mark_pool_ready(&id, &n))
                .await
                .unwrap_or(false);
        if !marked {
            self.destroy_pooled(&rec.id, &name, "template changed while warming")
                .await;
            return;
        }
        self.gov
            .pool_backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        tracing::debug!(template = %name, sandbox = %rec.id, "warm pool: sandbox ready");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names_and_inputs() {
        assert!(valid_template_name("py-3.12_base"));
        assert!(!valid_template_name(".hidden"));
        assert!(!valid_template_name("a/b"));
        assert!(!valid_template_name(""));
        let i: TemplateInput = serde_json::from_str(
            r#"{"name":"t","image":"x","cpu_cores":2,"ttl_seconds":60,
                "setup":"pip install x","files":{"/a.txt":"hi"}}"#,
        )
        .unwrap();
        assert_eq!(i.cpu_cores, Some(2));
        assert!(matches!(i.setup, Some(OneOrMany::One(_))));
        assert!(matches!(i.files, Some(FilesInput::Map(_))));
        let i: TemplateInput = serde_json::from_str(
            r#"{"name":"t","image":"x","provider":"","ttl":"30m","metadata":{},
                "files":[{"path":"/a","content":"aGk=","encoding":"base64","mode":"600"}]}"#,
        )
        .unwrap();
        assert!(
            matches!(i.files, Some(FilesInput::List(ref v)) if v[0].mode.as_deref() == Some("600"))
        );
        assert_eq!(tail("abcdef", 3), "def");
    }
}
