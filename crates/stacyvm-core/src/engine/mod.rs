//! The orchestrator: every sandbox operation of the API goes through here.
//!
//! Invariants kept by this module:
//! - a record is stored (state `creating`) before any runtime object exists,
//!   so a crash can never leave a runtime without a record;
//! - every state change goes through [`Store::transition`], which enforces
//!   the lifecycle;
//! - admission is one atomic store step;
//! - the data plane (exec, files) only talks to a sandbox's agent, never to
//!   the runtime behind it.
//!
//! The `impl Engine` is split by concern: this file (construction,
//! admission, create/destroy, the reaper, provider health), [`reconcile`]
//! (agreement between store and runtimes after a restart) and [`dataplane`]
//! (exec and files through the agents).

mod dataplane;
mod gov;
mod preview;
mod reconcile;
mod templates;

pub use gov::{NewKey, QuotaInput, QuotaSummary, UsageReport};
pub use templates::{
    SpawnOverrides, Template, TemplateFile, TemplateInfo, TemplateInput, MAX_POOL_SIZE,
};

pub use preview::{PreviewGrant, TunnelError};

use crate::clock::now_ms;
use crate::config::Config;
use crate::duration;
use crate::error::{Error, ErrorCode};
use crate::id;
use crate::metrics::Metrics;
use crate::preview::PreviewAccess;
use serde::Deserialize;
use stacyvm_agent_proto::path;
use stacyvm_providers::agent::AgentClient;
use stacyvm_providers::{NetworkMode, Provider, SandboxSpec};
use stacyvm_store::{SandboxFilter, SandboxRecord, SandboxState, Store};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Body of `POST /api/v1/sandboxes` (and the admission dry run).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CreateSandbox {
    pub image: Option<String>,
    pub provider: Option<String>,
    pub memory_mb: Option<u64>,
    pub vcpus: Option<u32>,
    pub ttl: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub owner_id: Option<String>,
    pub template: Option<String>,
    pub network: Option<String>,
    pub env: Option<BTreeMap<String, String>>,
    /// Set by the server, never read from the body: the creating key's
    /// tenant and identity, the template it comes from, the warm pool that
    /// will hold it.
    #[serde(skip)]
    pub tenant: Option<String>,
    #[serde(skip)]
    pub creator: Option<String>,
    #[serde(skip)]
    pub from_template: Option<String>,
    #[serde(skip)]
    pub pool: Option<String>,
    /// Live preview access: `public` or `token` (kept as metadata `preview`).
    pub preview: Option<String>,
}

/// Body of `POST /api/v1/sandboxes/{id}/exec`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExecInput {
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    pub mode: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub timeout: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub stdin: Option<String>,
}

/// Answer of the admission dry run (API.md §3: exactly these keys).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdmissionDecision {
    pub allowed: bool,
    pub queueable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub active_sandboxes: u64,
    pub max_sandboxes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_owner_sandboxes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_owner_sandboxes: Option<u64>,
    pub max_ttl: String,
}

/// Last known health of one provider.
#[derive(Debug, Clone)]
pub struct ProviderStatus {
    pub name: String,
    pub healthy: bool,
    pub is_default: bool,
    pub latency_ms: f64,
    pub last_checked_ms: i64,
    pub error: Option<String>,
    pub capabilities: Vec<String>,
    pub isolation: &'static str,
}

/// A sandbox that is running and reachable through its agent.
struct Live {
    agent: AgentClient,
    /// The sandbox's own choice of preview access (metadata `preview`).
    preview: Option<PreviewAccess>,
}

pub struct Engine {
    cfg: Config,
    store: Arc<Store>,
    providers: BTreeMap<String, Arc<dyn Provider>>,
    health: Mutex<BTreeMap<String, ProviderStatus>>,
    live: RwLock<HashMap<String, Arc<Live>>>,
    agent_binary: PathBuf,
    started: Instant,
    /// Key of the preview tokens' HMAC; made once, kept in the store.
    preview_secret: Vec<u8>,
    pub metrics: Metrics,
    gov: gov::Gov,
}

/// Single-quote a word for `/bin/sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn valid_owner(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@:+-".contains(&b))
}

/// Check a path given by a client; 400 with the reason when it is not usable.
pub fn check_path(p: &str) -> Result<String, Error> {
    path::normalize(p).map_err(|e| Error::invalid(format!("invalid path {p:?}: {e}")))
}

fn is_valid_image(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@+".contains(&b))
        && !s.starts_with(['-', '.', '/', ':'])
}

impl Engine {
    /// Build the engine over an open store and the configured providers.
    pub fn new(
        cfg: Config,
        store: Arc<Store>,
        providers: Vec<Arc<dyn Provider>>,
        agent_binary: PathBuf,
    ) -> Result<Arc<Engine>, Error> {
        let providers: BTreeMap<String, Arc<dyn Provider>> = providers
            .into_iter()
            .map(|p| (p.name().to_string(), p))
            .collect();
        if !providers.contains_key(&cfg.default_provider) {
            return Err(Error::invalid(format!(
                "default provider {:?} is not available (available: {})",
                cfg.default_provider,
                providers.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let health = providers
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    ProviderStatus {
                        name: name.clone(),
                        healthy: false,
                        is_default: *name == cfg.default_provider,
                        latency_ms: 0.0,
                        last_checked_ms: 0,
                        error: Some("not checked yet".to_string()),
                        capabilities: p.capabilities(),
                        isolation: p.isolation().as_str(),
                    },
                )
            })
            .collect();
        let gov = gov::Gov::new(&cfg, &store);
        let preview_secret = store
            .meta_get_or_init("preview_secret", || id::random_token(64))?
            .into_bytes();
        Ok(Arc::new(Engine {
            gov,
            cfg,
            store,
            providers,
            health: Mutex::new(health),
            live: RwLock::new(HashMap::new()),
            agent_binary,
            started: Instant::now(),
            preview_secret,
            metrics: Metrics::default(),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Run a store call off the async worker threads.
    async fn db<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, stacyvm_store::StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(r) => r.map_err(Error::from),
            Err(e) => Err(Error::internal(format!("store task failed: {e}"))),
        }
    }

    async fn event(&self, id: &str, message: String) {
        let id = id.to_string();
        let at = now_ms();
        if let Err(e) = self.db(move |s| s.add_event(&id, at, &message)).await {
            tracing::warn!(error = %e, "could not record a sandbox event");
        }
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("s").join(id)
    }

    fn provider(&self, name: &str) -> Result<&Arc<dyn Provider>, Error> {
        self.providers.get(name).ok_or_else(|| {
            Error::invalid(format!(
                "unknown provider {name:?} (available: {})",
                self.providers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    pub fn provider_names(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }

    // ----- creation ------------------------------------------------------

    /// Validate a create request into a record (not yet stored).
    fn plan(&self, req: &CreateSandbox, owner: Option<&str>) -> Result<SandboxRecord, Error> {
        if let Some(t) = &req.template {
            if !t.is_empty() {
                return Err(Error::new(
                    ErrorCode::NotFound,
                    format!("template {t} not found"),
                ));
            }
        }
        let provider = match req.provider.as_deref() {
            None | Some("") => self.cfg.default_provider.clone(),
            Some(p) => p.to_string(),
        };
        self.provider(&provider)?;
        let image = match req.image.as_deref() {
            None | Some("") => self.cfg.default_image.clone(),
            Some(i) => i.to_string(),
        };
        if !is_valid_image(&image) {
            return Err(Error::invalid(format!(
                "image {image:?} is not a valid image reference"
            )));
        }
        let memory_mb = req.memory_mb.unwrap_or(self.cfg.default_memory_mb);
        if memory_mb < 16 {
            return Err(Error::invalid("memory_mb must be at least 16"));
        }
        if memory_mb > self.cfg.max_memory_mb {
            return Err(Error::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "memory_mb {memory_mb} exceeds the maximum of {} per sandbox",
                    self.cfg.max_memory_mb
                ),
            ));
        }
        let vcpus = req.vcpus.unwrap_or(self.cfg.default_vcpus);
        if vcpus == 0 {
            return Err(Error::invalid("vcpus must be at least 1"));
        }
        if vcpus > self.cfg.max_vcpus {
            return Err(Error::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "vcpus {vcpus} exceeds the maximum of {} per sandbox",
                    self.cfg.max_vcpus
                ),
            ));
        }
        let ttl = self.parse_ttl(req.ttl.as_deref())?;
        let network = req.network.as_deref().unwrap_or("none");
        if NetworkMode::parse(network).is_none() {
            return Err(Error::invalid(format!(
                "network must be \"none\" or \"egress\", not {network:?}"
            )));
        }
        let mut metadata = req.metadata.clone().unwrap_or_default();
        preview::plan_access(req.preview.as_deref(), &mut metadata)?;
        if metadata.len() > 64 {
            return Err(Error::invalid("metadata may have at most 64 entries"));
        }
        for (k, v) in &metadata {
            if k.is_empty() || k.len() > 128 || v.len() > 1024 {
                return Err(Error::invalid(
                    "metadata keys must be 1-128 characters and values at most 1024",
                ));
            }
        }
        let env = req.env.clone().unwrap_or_default();
        for (k, v) in &env {
            check_env_pair(k, v)?;
        }
        let owner = owner
            .map(str::to_string)
            .or_else(|| req.owner_id.clone().filter(|o| !o.is_empty()));
        if let Some(o) = &owner {
            if !valid_owner(o) {
                return Err(Error::invalid(
                    "owner id must be 1-128 characters of [A-Za-z0-9._@:+-]",
                ));
            }
        }
        let now = now_ms();
        Ok(SandboxRecord {
            id: id::new_sandbox_id(),
            state: SandboxState::Creating,
            provider,
            image,
            memory_mb,
            vcpus,
            owner_id: owner,
            template: req.from_template.clone(),
            network: network.to_string(),
            metadata,
            env,
            created_at_ms: now,
            expires_at_ms: now + ttl.as_millis() as i64,
            updated_at_ms: now,
            error: None,
            runtime_id: None,
            tenant: req.tenant.clone(),
            creator: req.creator.clone(),
            pool: req.pool.clone(),
        })
    }

    fn parse_ttl(&self, ttl: Option<&str>) -> Result<Duration, Error> {
        let ttl = match ttl {
            None | Some("") => self.cfg.default_ttl,
            Some(t) => duration::parse(t).map_err(|e| Error::invalid(e.to_string()))?,
        };
        if ttl.is_zero() {
            return Err(Error::invalid("ttl must be positive"));
        }
        if ttl > self.cfg.max_ttl {
            return Err(Error::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "ttl {} exceeds the maximum ttl of {}",
                    duration::format(ttl),
                    duration::format(self.cfg.max_ttl)
                ),
            ));
        }
        Ok(ttl)
    }

    /// Dry run of admission for a create request: the same store check
    /// (global cap and quotas) that [`Engine::create`] runs.
    pub async fn admission(
        &self,
        req: &CreateSandbox,
        owner: Option<&str>,
    ) -> Result<AdmissionDecision, Error> {
        self.admission_report(req, owner).await
    }

    /// Create a sandbox and return once it can run an exec.
    pub async fn create(
        &self,
        req: &CreateSandbox,
        owner: Option<&str>,
    ) -> Result<SandboxRecord, Error> {
        let started = Instant::now();
        let rec = self.plan(req, owner)?;
        let provider = self.provider(&rec.provider)?.clone();
        let max = self.cfg.max_sandboxes;
        {
            let rec = rec.clone();
            self.db(move |s| s.admit_sandbox(&rec, max)).await?;
        }
        let id = rec.id.clone();
        self.event(
            &id,
            format!("creating: provider={} image={}", rec.provider, rec.image),
        )
        .await;
        let run_dir = self.run_dir(&id);
        let spec = SandboxSpec {
            id: id.clone(),
            image: rec.image.clone(),
            memory_mb: rec.memory_mb,
            vcpus: rec.vcpus,
            pids_limit: self.cfg.pids_limit,
            network: NetworkMode::parse(&rec.network).unwrap_or(NetworkMode::None),
            env: rec.env.clone(),
            run_dir: run_dir.clone(),
            agent_binary: self.agent_binary.clone(),
            start_timeout: self.cfg.start_timeout,
        };
        let result = match std::fs::create_dir_all(&run_dir) {
            Ok(()) => match provider.create(&spec).await {
                Ok(info) => provider
                    .agent(&id, &spec.socket_path())
                    .await
                    .map(|agent| (info, agent))
                    .map_err(Error::from),
                Err(e) => Err(Error::from(e)),
            },
            Err(e) => Err(Error::internal(format!(
                "cannot create {}: {e}",
                run_dir.display()
            ))),
        };
        match result {
            Ok((info, agent)) => {
                let rid = info.runtime_id.clone();
                let idc = id.clone();
                let _ = self.db(move |s| s.set_runtime_id(&idc, &rid)).await;
                let idc = id.clone();
                match self
                    .db(move |s| s.transition(&idc, SandboxState::Running, None, now_ms()))
                    .await
                {
                    Ok(rec) => {
                        self.live.write().unwrap_or_else(|p| p.into_inner()).insert(
                            id.clone(),
                            Arc::new(Live {
                                agent,
                                preview: preview::chosen_access(&rec.metadata),
                            }),
                        );
                        self.metrics.observe_create(started.elapsed());
                        tracing::info!(sandbox = %id, provider = %rec.provider, image = %rec.image,
                            ms = started.elapsed().as_millis() as u64, "sandbox running");
                        self.event(
                            &id,
                            format!("running after {} ms", started.elapsed().as_millis()),
                        )
                        .await;
                        Ok(rec)
                    }
                    Err(e) => {
                        // Destroyed while it was being created: take the runtime down too.
                        tracing::info!(sandbox = %id, "sandbox was destroyed while being created");
                        let _ = provider.destroy(&id).await;
                        let _ = std::fs::remove_dir_all(&run_dir);
                        Err(if e.code == ErrorCode::Conflict {
                            Error::new(
                                ErrorCode::Conflict,
                                format!("sandbox {id} was destroyed while it was being created"),
                            )
                        } else {
                            e
                        })
                    }
                }
            }
            Err(err) => {
                self.metrics
                    .sandboxes_create_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(sandbox = %id, error = %err.message, "sandbox creation failed");
                let _ = provider.destroy(&id).await;
                let _ = std::fs::remove_dir_all(&run_dir);
                let msg = err.message.clone();
                let idc = id.clone();
                let _ = self
                    .db(move |s| s.transition(&idc, SandboxState::Error, Some(&msg), now_ms()))
                    .await;
                self.event(&id, format!("creation failed: {}", err.message))
                    .await;
                Err(err)
            }
        }
    }

    // ----- queries --------------------------------------------------------

    /// A sandbox that exists and is not destroyed.
    pub async fn get(&self, id: &str) -> Result<SandboxRecord, Error> {
        if !id::is_sandbox_id(id) {
            return Err(Error::sandbox_not_found(id));
        }
        let idc = id.to_string();
        match self.db(move |s| s.get_sandbox(&idc)).await? {
            Some(r) if r.state != SandboxState::Destroyed => Ok(r),
            _ => Err(Error::sandbox_not_found(id)),
        }
    }

    pub async fn list(&self, filter: SandboxFilter) -> Result<Vec<SandboxRecord>, Error> {
        self.db(move |s| s.list_sandboxes(&filter)).await
    }

    /// Move the expiry to now + ttl.
    pub async fn extend(&self, id: &str, ttl: Option<&str>) -> Result<SandboxRecord, Error> {
        let rec = self.get(id).await?;
        // Unlike create, an extension past the maximum is capped, not refused.
        let ttl = match ttl {
            None | Some("") => self.cfg.default_ttl,
            Some(t) => duration::parse(t).map_err(|e| Error::invalid(e.to_string()))?,
        };
        if ttl.is_zero() {
            return Err(Error::invalid("ttl must be positive"));
        }
        let ttl = ttl.min(self.cfg.max_ttl);
        let expires = now_ms() + ttl.as_millis() as i64;
        let idc = id.to_string();
        match self
            .db(move |s| s.set_expires(&idc, expires, now_ms()))
            .await?
        {
            Some(r) => {
                self.event(id, format!("ttl extended by {}", duration::format(ttl)))
                    .await;
                Ok(r)
            }
            None => Err(Error::new(
                ErrorCode::Conflict,
                format!("sandbox {id} is {} and cannot be extended", rec.state),
            )),
        }
    }

    // ----- destruction ----------------------------------------------------

    /// Destroy a sandbox. Idempotent: an already destroyed sandbox is Ok.
    pub async fn destroy(&self, id: &str, reason: &str) -> Result<(), Error> {
        if !id::is_sandbox_id(id) {
            return Err(Error::sandbox_not_found(id));
        }
        let idc = id.to_string();
        let Some(rec) = self.db(move |s| s.get_sandbox(&idc)).await? else {
            return Err(Error::sandbox_not_found(id));
        };
        match rec.state {
            SandboxState::Destroyed => return Ok(()),
            SandboxState::Destroying => {}
            _ => {
                let idc = id.to_string();
                match self
                    .db(move |s| s.transition(&idc, SandboxState::Destroying, None, now_ms()))
                    .await
                {
                    Ok(_) => {}
                    // Someone else moved it on meanwhile; fall through and make sure.
                    Err(e) if e.code == ErrorCode::Conflict => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let provider = self.provider(&rec.provider)?.clone();
        if let Err(e) = provider.destroy(id).await {
            tracing::warn!(sandbox = %id, error = %e, "runtime destroy failed; will retry");
            return Err(e.into());
        }
        let _ = std::fs::remove_dir_all(self.run_dir(id));
        let idc = id.to_string();
        match self
            .db(move |s| s.transition(&idc, SandboxState::Destroyed, None, now_ms()))
            .await
        {
            Ok(_) => {
                self.metrics
                    .sandboxes_destroyed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(sandbox = %id, reason, "sandbox destroyed");
                self.event(id, format!("destroyed ({reason})")).await;
                Ok(())
            }
            Err(e) if e.code == ErrorCode::Conflict => Ok(()), // a concurrent destroy finished first
            Err(e) => Err(e),
        }
    }

    /// Destroy every sandbox past its expiry; returns how many were destroyed.
    pub async fn prune(&self, reason: &str) -> Result<u64, Error> {
        let now = now_ms();
        let ids = self.db(move |s| s.list_expired(now)).await?;
        let mut n = 0;
        for id in ids {
            match self.destroy(&id, reason).await {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "could not destroy expired sandbox")
                }
            }
        }
        Ok(n)
    }

    /// The TTL reaper: runs until the process ends.
    pub async fn run_reaper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.reaper_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep = Instant::now();
        loop {
            tick.tick().await;
            match self.prune_as("ttl expired", None).await {
                Ok(0) => {}
                Ok(n) => {
                    self.metrics
                        .sandboxes_reaped
                        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(count = n, "reaper destroyed expired sandboxes");
                }
                Err(e) => tracing::warn!(error = %e, "reaper pass failed"),
            }
            if last_sweep.elapsed() >= Duration::from_secs(30) {
                last_sweep = Instant::now();
                self.sweep_orphans().await;
            }
            // Finish destroys that failed earlier (e.g. the runtime was down).
            if let Ok(stuck) = self
                .db(|s| s.list_in_states(&[SandboxState::Destroying]))
                .await
            {
                for r in stuck {
                    if now_ms() - r.updated_at_ms > 5_000 {
                        let _ = self.destroy(&r.id, "retrying destroy").await;
                    }
                }
            }
        }
    }

    // ----- provider health ------------------------------------------------

    /// Check every provider now; returns name → healthy.
    pub async fn check_providers(&self) -> BTreeMap<String, bool> {
        let mut out = BTreeMap::new();
        for (name, p) in &self.providers {
            let t = Instant::now();
            let res = tokio::time::timeout(Duration::from_secs(5), p.health()).await;
            let latency = t.elapsed().as_secs_f64() * 1000.0;
            let err = match res {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("health check timed out after 5s".to_string()),
            };
            out.insert(name.clone(), err.is_none());
            let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(st) = h.get_mut(name) {
                st.healthy = err.is_none();
                st.error = err;
                // Some providers learn these from their runtime (custom).
                st.capabilities = p.capabilities();
                st.isolation = p.isolation().as_str();
                st.latency_ms = (latency * 1000.0).round() / 1000.0;
                st.last_checked_ms = now_ms();
            }
        }
        out
    }

    pub fn provider_status(&self) -> Vec<ProviderStatus> {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Graceful stop: let every provider release what is not a sandbox.
    /// Sandboxes keep running and are re-attached at the next start.
    pub async fn shutdown(&self) {
        for p in self.providers.values() {
            p.shutdown().await;
        }
    }

    /// Periodic provider health checks.
    pub async fn run_health_checks(self: Arc<Self>) {
        loop {
            self.check_providers().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }

    pub fn active_count(&self) -> usize {
        self.live.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn store_ok(&self) -> bool {
        self.store.ping().is_ok()
    }
}

fn check_env_pair(k: &str, v: &str) -> Result<(), Error> {
    if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
        return Err(Error::invalid(format!(
            "invalid environment variable {k:?}: names must be non-empty without '=' and no NUL bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_the_shell() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn owners_and_images_are_checked() {
        assert!(valid_owner("user_123"));
        assert!(valid_owner("a.b@c:d+e-f"));
        assert!(!valid_owner(""));
        assert!(!valid_owner("a b"));
        assert!(!valid_owner(&"x".repeat(129)));
        assert!(is_valid_image("python:3.12"));
        assert!(is_valid_image("ghcr.io/org/img:tag"));
        assert!(is_valid_image("127.0.0.1:5000/x/y@sha256:abc"));
        assert!(!is_valid_image("python 3"));
        assert!(!is_valid_image("-rm"));
        assert!(!is_valid_image(""));
    }
}
