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

use crate::clock::now_ms;
use crate::config::Config;
use crate::duration;
use crate::error::{Error, ErrorCode};
use crate::id;
use crate::metrics::Metrics;
use bytes::Bytes;
use serde::Deserialize;
use stacyvm_agent_proto::{path, ExecRequest, ExecResult, FileEntry, Stats, WriteResult};
use stacyvm_providers::agent::{full_body, AgentBody, AgentClient, AgentError, Incoming};
use stacyvm_providers::{NetworkMode, Provider, RuntimeInfo, SandboxSpec};
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
}

pub struct Engine {
    cfg: Config,
    store: Arc<Store>,
    providers: BTreeMap<String, Arc<dyn Provider>>,
    health: Mutex<BTreeMap<String, ProviderStatus>>,
    live: RwLock<HashMap<String, Arc<Live>>>,
    agent_binary: PathBuf,
    started: Instant,
    pub metrics: Metrics,
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
        Ok(Arc::new(Engine {
            cfg,
            store,
            providers,
            health: Mutex::new(health),
            live: RwLock::new(HashMap::new()),
            agent_binary,
            started: Instant::now(),
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
        let metadata = req.metadata.clone().unwrap_or_default();
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
            template: None,
            network: network.to_string(),
            metadata,
            env,
            created_at_ms: now,
            expires_at_ms: now + ttl.as_millis() as i64,
            updated_at_ms: now,
            error: None,
            runtime_id: None,
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

    /// Dry run of admission for a create request.
    pub async fn admission(
        &self,
        req: &CreateSandbox,
        owner: Option<&str>,
    ) -> Result<AdmissionDecision, Error> {
        let max = self.cfg.max_sandboxes;
        let active = self.db(|s| s.count_active()).await?;
        let mut d = AdmissionDecision {
            allowed: true,
            queueable: false,
            reason: None,
            active_sandboxes: active,
            max_sandboxes: max,
            active_owner_sandboxes: None,
            max_owner_sandboxes: None,
            max_ttl: duration::format(self.cfg.max_ttl),
        };
        match self.plan(req, owner) {
            Ok(rec) => {
                if let Some(o) = rec.owner_id.clone() {
                    let n = self
                        .db(move |s| {
                            s.list_sandboxes(&SandboxFilter {
                                owner_id: Some(o),
                                ..Default::default()
                            })
                        })
                        .await?
                        .iter()
                        .filter(|r| r.state.is_active())
                        .count();
                    d.active_owner_sandboxes = Some(n as u64);
                }
                if active >= max {
                    d.allowed = false;
                    d.reason = Some(format!(
                        "sandbox capacity reached: {active} of {max} sandboxes are active"
                    ));
                }
            }
            Err(e) => {
                d.allowed = false;
                d.reason = Some(e.message);
            }
        }
        Ok(d)
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
            Ok(()) => provider.create(&spec).await.map_err(Error::from),
            Err(e) => Err(Error::internal(format!(
                "cannot create {}: {e}",
                run_dir.display()
            ))),
        };
        match result {
            Ok(info) => {
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
                                agent: AgentClient::new(spec.socket_path()),
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
        let ttl = self.parse_ttl(ttl)?;
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
            match self.prune("ttl expired").await {
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

    // ----- reconciliation -------------------------------------------------

    /// Remove runtimes of this instance whose record is gone, destroyed or
    /// failed (e.g. a runtime that a crashed create left half-made).
    /// Runtimes of `creating` records are left alone: their create is
    /// still under way.
    pub async fn sweep_orphans(&self) {
        for (name, provider) in &self.providers {
            let Ok(runtimes) = provider.list().await else {
                continue;
            };
            for rt in runtimes {
                let idc = rt.sandbox_id.clone();
                let rec = match self.db(move |s| s.get_sandbox(&idc)).await {
                    Ok(r) => r,
                    Err(_) => continue,
                };
                let orphan = match &rec {
                    None => true,
                    Some(r) => matches!(r.state, SandboxState::Destroyed | SandboxState::Error),
                };
                if orphan {
                    tracing::warn!(provider = %name, sandbox = %rt.sandbox_id, "removing orphaned runtime");
                    if let Err(e) = provider.destroy(&rt.sandbox_id).await {
                        tracing::warn!(sandbox = %rt.sandbox_id, error = %e, "orphan removal failed");
                    }
                    if rec.is_none() {
                        let _ = std::fs::remove_dir_all(self.run_dir(&rt.sandbox_id));
                    }
                }
            }
        }
    }

    /// Bring store and runtimes into agreement after a (re)start: orphaned
    /// runtimes are destroyed, records whose runtime vanished are marked
    /// `error`, interrupted creates and destroys are finished, and running
    /// sandboxes are re-attached.
    pub async fn reconcile(&self) -> Result<(), Error> {
        let records = self
            .db(|s| {
                s.list_in_states(&[
                    SandboxState::Creating,
                    SandboxState::Running,
                    SandboxState::Unhealthy,
                    SandboxState::Expired,
                    SandboxState::Destroying,
                    SandboxState::Error,
                ])
            })
            .await?;
        for (name, provider) in &self.providers {
            let runtimes = match provider.list().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(provider = %name, error = %e, "cannot list runtimes; reconciliation of this provider skipped");
                    continue;
                }
            };
            let by_id: HashMap<&str, &RuntimeInfo> = runtimes
                .iter()
                .map(|r| (r.sandbox_id.as_str(), r))
                .collect();
            // Runtimes nobody owns any more.
            for rt in &runtimes {
                let owned = records
                    .iter()
                    .any(|r| r.id == rt.sandbox_id && r.provider == *name && r.state.is_active());
                let destroying = records.iter().any(|r| r.id == rt.sandbox_id);
                if !owned && !destroying {
                    tracing::warn!(provider = %name, sandbox = %rt.sandbox_id, "removing orphaned runtime");
                    if let Err(e) = provider.destroy(&rt.sandbox_id).await {
                        tracing::warn!(sandbox = %rt.sandbox_id, error = %e, "orphan removal failed");
                    }
                    let _ = std::fs::remove_dir_all(self.run_dir(&rt.sandbox_id));
                }
            }
            for rec in records.iter().filter(|r| r.provider == *name) {
                self.reconcile_one(rec, provider, by_id.get(rec.id.as_str()).copied())
                    .await;
            }
        }
        Ok(())
    }

    async fn reconcile_one(
        &self,
        rec: &SandboxRecord,
        provider: &Arc<dyn Provider>,
        runtime: Option<&RuntimeInfo>,
    ) {
        let id = rec.id.as_str();
        let mark = |to: SandboxState, why: String| {
            let idc = id.to_string();
            async move {
                let _ = self
                    .db(move |s| s.transition(&idc, to, Some(&why), now_ms()))
                    .await;
            }
        };
        match rec.state {
            SandboxState::Creating => {
                tracing::warn!(sandbox = %id, "create was interrupted by a restart");
                let _ = provider.destroy(id).await;
                let _ = std::fs::remove_dir_all(self.run_dir(id));
                mark(
                    SandboxState::Error,
                    "the server restarted while the sandbox was being created".into(),
                )
                .await;
                self.event(id, "creation interrupted by a server restart".into())
                    .await;
            }
            SandboxState::Destroying | SandboxState::Expired => {
                let _ = self.destroy(id, "finishing an interrupted destroy").await;
            }
            SandboxState::Error => {
                if runtime.is_some() {
                    let _ = provider.destroy(id).await;
                }
            }
            SandboxState::Running | SandboxState::Unhealthy => {
                let socket = self.run_dir(id).join(stacyvm_agent_proto::SOCKET_NAME);
                let agent = AgentClient::new(&socket);
                let alive = match runtime {
                    Some(rt) if rt.running => {
                        agent.wait_ready(Duration::from_secs(3)).await.is_ok()
                    }
                    _ => false,
                };
                if alive {
                    if rec.state == SandboxState::Unhealthy {
                        mark(SandboxState::Running, String::new()).await;
                    }
                    self.live
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.to_string(), Arc::new(Live { agent }));
                    tracing::info!(sandbox = %id, "re-attached running sandbox");
                } else {
                    let why = if runtime.is_none() {
                        "the sandbox's runtime vanished while the server was down"
                    } else {
                        "the sandbox's runtime stopped or its agent no longer answers"
                    };
                    tracing::warn!(sandbox = %id, why, "marking sandbox as error");
                    let _ = provider.destroy(id).await;
                    let _ = std::fs::remove_dir_all(self.run_dir(id));
                    mark(SandboxState::Error, why.to_string()).await;
                    self.event(id, why.to_string()).await;
                }
            }
            SandboxState::Destroyed => {}
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

    // ----- data plane -----------------------------------------------------

    fn live_agent(&self, id: &str) -> Option<AgentClient> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        live.get(id).map(|l| l.agent.clone())
    }

    /// The agent of a running sandbox, or the right error for its state.
    async fn agent(&self, id: &str) -> Result<AgentClient, Error> {
        if let Some(agent) = self.live_agent(id) {
            return Ok(agent);
        }
        let rec = self.get(id).await?;
        let why = rec
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        Err(Error::new(
            ErrorCode::Conflict,
            format!("sandbox {id} is {}{why}", rec.state),
        ))
    }

    /// Map an agent failure: a sandbox that disappeared meanwhile is a 404;
    /// an unreachable agent of a sandbox whose runtime is gone marks it `error`.
    async fn agent_failed(&self, id: &str, e: AgentError) -> Error {
        match e {
            AgentError::Status { .. } => e.into(),
            other => {
                if let Err(nf) = self.get(id).await {
                    return nf;
                }
                if let Ok(rec) = self.get(id).await {
                    if let Ok(p) = self.provider(&rec.provider) {
                        let gone = !matches!(p.inspect(id).await, Ok(Some(rt)) if rt.running);
                        if gone && rec.state == SandboxState::Running {
                            tracing::warn!(sandbox = %id, "runtime is gone; marking sandbox as error");
                            self.live
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(id);
                            let idc = id.to_string();
                            let _ = self
                                .db(move |s| {
                                    s.transition(
                                        &idc,
                                        SandboxState::Error,
                                        Some("the sandbox's runtime stopped unexpectedly"),
                                        now_ms(),
                                    )
                                })
                                .await;
                        }
                    }
                }
                Error::new(
                    ErrorCode::ProviderError,
                    format!("sandbox {id} did not answer: {other}"),
                )
            }
        }
    }

    /// Validate an exec body into the agent's request and the timeout.
    pub fn prepare_exec(&self, input: &ExecInput) -> Result<(ExecRequest, Duration), Error> {
        let command = input.command.as_deref().unwrap_or("");
        if command.trim().is_empty() {
            return Err(Error::invalid("command is required"));
        }
        let has_nul = command.contains('\0') || input.args.iter().any(|a| a.contains('\0'));
        if has_nul {
            return Err(Error::invalid(
                "command and args must not contain NUL bytes",
            ));
        }
        let argv = match input.mode.as_deref().unwrap_or("shell") {
            "shell" | "" => {
                let mut line = command.to_string();
                for a in &input.args {
                    line.push(' ');
                    line.push_str(&shell_quote(a));
                }
                vec!["/bin/sh".to_string(), "-c".to_string(), line]
            }
            "argv" => {
                let mut v = vec![command.to_string()];
                v.extend(input.args.iter().cloned());
                v
            }
            other => {
                return Err(Error::invalid(format!(
                    "mode must be \"shell\" or \"argv\", not {other:?}"
                )))
            }
        };
        for (k, v) in &input.env {
            check_env_pair(k, v)?;
        }
        let workdir = match input.workdir.as_deref() {
            None | Some("") => stacyvm_agent_proto::DEFAULT_WORKDIR.to_string(),
            Some(w) => path::normalize(w)
                .map_err(|e| Error::invalid(format!("invalid workdir {w:?}: {e}")))?,
        };
        let timeout = match input.timeout.as_deref() {
            None | Some("") => self.cfg.default_exec_timeout,
            Some(t) => {
                let d = duration::parse(t).map_err(|e| Error::invalid(e.to_string()))?;
                if d.is_zero() {
                    self.cfg.max_exec_timeout
                } else {
                    d
                }
            }
        };
        if timeout > self.cfg.max_exec_timeout {
            return Err(Error::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "exec timeout {} exceeds the maximum of {}",
                    duration::format(timeout),
                    duration::format(self.cfg.max_exec_timeout)
                ),
            ));
        }
        if input
            .stdin
            .as_deref()
            .is_some_and(|s| s.len() > self.cfg.max_body_bytes as usize)
        {
            return Err(Error::new(ErrorCode::PayloadTooLarge, "stdin is too large"));
        }
        Ok((
            ExecRequest {
                argv,
                env: input.env.clone(),
                workdir,
                timeout_ms: timeout.as_millis().max(1) as u64,
                stdin: input.stdin.clone(),
                output_limit: self.cfg.output_limit_bytes,
                stream: input.stream,
            },
            timeout,
        ))
    }

    /// Run a command to completion. A timed-out result is returned as such
    /// (`timed_out`); the caller decides how to answer it.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, Error> {
        let agent = self.agent(id).await?;
        let start = Instant::now();
        // The agent enforces the timeout itself; this guard only covers an
        // agent that stops answering.
        let guard = Duration::from_millis(req.timeout_ms) + Duration::from_secs(5);
        let res = match tokio::time::timeout(guard, agent.exec(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.metrics
                    .exec_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(self.agent_failed(id, e).await);
            }
            Err(_) => ExecResult {
                exit_code: -1,
                stdout: String::new(),
                stderr: String::new(),
                duration_ns: start.elapsed().as_nanos() as u64,
                truncated: false,
                timed_out: true,
            },
        };
        self.metrics.observe_exec(start.elapsed());
        if res.timed_out {
            self.metrics
                .exec_timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(res)
    }

    /// Start a streamed exec; the body is the agent's NDJSON event stream.
    pub async fn exec_stream(&self, id: &str, req: &ExecRequest) -> Result<Incoming, Error> {
        let agent = self.agent(id).await?;
        self.metrics
            .execs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match agent.exec_stream(req).await {
            Ok(b) => Ok(b),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        mode: Option<&str>,
        body: AgentBody,
    ) -> Result<WriteResult, Error> {
        let path = check_path(path)?;
        if let Some(m) = mode {
            if stacyvm_agent_proto::parse_mode(m).is_none() {
                return Err(Error::invalid(format!(
                    "mode {m:?} is not an octal permission like 644"
                )));
            }
        }
        let agent = self.agent(id).await?;
        match agent.write_file(&path, mode, body).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn write_bytes(
        &self,
        id: &str,
        path: &str,
        mode: Option<&str>,
        data: Bytes,
    ) -> Result<WriteResult, Error> {
        self.write_file(id, path, mode, full_body(data)).await
    }

    pub async fn read_file(&self, id: &str, path: &str) -> Result<(Incoming, Option<u64>), Error> {
        let path = check_path(path)?;
        let agent = self.agent(id).await?;
        match agent.read_file(&path).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn delete_file(&self, id: &str, path: &str, recursive: bool) -> Result<(), Error> {
        let path = check_path(path)?;
        if path == "/" {
            return Err(Error::invalid("refusing to delete /"));
        }
        let agent = self.agent(id).await?;
        match agent.delete(&path, recursive).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn list_files(&self, id: &str, path: &str) -> Result<Vec<FileEntry>, Error> {
        let path = check_path(path)?;
        let agent = self.agent(id).await?;
        match agent.list(&path).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn stat_file(&self, id: &str, path: &str) -> Result<FileEntry, Error> {
        let path = check_path(path)?;
        let agent = self.agent(id).await?;
        match agent.stat(&path).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn glob(&self, id: &str, pattern: &str) -> Result<Vec<String>, Error> {
        if pattern.is_empty() {
            return Err(Error::invalid("pattern is required"));
        }
        check_path(pattern)?;
        let agent = self.agent(id).await?;
        match agent.glob(pattern).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn move_file(&self, id: &str, from: &str, to: &str) -> Result<(), Error> {
        let from = check_path(from)?;
        let to = check_path(to)?;
        if from == "/" {
            return Err(Error::invalid("refusing to move /"));
        }
        let agent = self.agent(id).await?;
        match agent.rename(&from, &to).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn chmod(&self, id: &str, path: &str, mode: &str) -> Result<(), Error> {
        let path = check_path(path)?;
        if stacyvm_agent_proto::parse_mode(mode).is_none() {
            return Err(Error::invalid(format!(
                "mode {mode:?} is not an octal permission like 755"
            )));
        }
        let agent = self.agent(id).await?;
        match agent.chmod(&path, mode).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    /// The sandbox's own log: lifecycle lines from the store, then the
    /// agent's diagnostics (when it runs), the last `lines` of them.
    pub async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>, Error> {
        let rec = self.get(id).await?;
        let idc = id.to_string();
        let mut out: Vec<String> = self
            .db(move |s| s.events(&idc, lines))
            .await?
            .into_iter()
            .map(|(at, msg)| format!("{} [stacyvm] {msg}", crate::clock::rfc3339_ms(at)))
            .collect();
        let live = self.live_agent(id);
        if let Some(agent) = live {
            match agent.logs(lines).await {
                Ok(agent_lines) => out.extend(agent_lines),
                Err(e) => out.push(format!("[stacyvm] agent log unavailable: {e}")),
            }
        } else if let Ok(p) = self.provider(&rec.provider) {
            out.extend(p.logs(id, lines).await);
        }
        // Both sources start with an RFC 3339 timestamp; a stable sort merges them.
        out.sort_by(|a, b| a.split(' ').next().cmp(&b.split(' ').next()));
        let skip = out.len().saturating_sub(lines);
        Ok(out.split_off(skip))
    }

    pub async fn stats(&self, id: &str) -> Result<Stats, Error> {
        let agent = self.agent(id).await?;
        match agent.stats().await {
            Ok(s) => Ok(s),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
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
