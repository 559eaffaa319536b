//! Governance on the engine: API keys, quotas and admission reports, the
//! audit hook, and who owns which sandbox.

use super::{AdmissionDecision, CreateSandbox, Engine};
use crate::audit::{AuditEvent, AuditSink};
use crate::clock::now_ms;
use crate::config::Config;
use crate::duration;
use crate::error::{Error, ErrorCode};
use crate::governance::{
    sha256_hex, valid_name, Caller, KeyRing, RateLimiter, SandboxAcl, Scope, Visibility,
};
use crate::id;
use stacyvm_store::{
    KeyRecord, QuotaLimits, QuotaRecord, SandboxFilter, SandboxRecord, Store, Usage,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Entries of the sandbox ownership cache before it is cleared.
const ACL_CACHE_MAX: usize = 50_000;

/// Governance state of the engine.
pub(super) struct Gov {
    pub keys: KeyRing,
    pub limiter: RateLimiter,
    pub audit: AuditSink,
    acl: RwLock<HashMap<String, Arc<SandboxAcl>>>,
    /// Quota limits by subject, mirrored from the store for the exec path.
    quotas: RwLock<HashMap<String, QuotaLimits>>,
    /// Wakes the warm-pool filler (a claim, a template change).
    pub pool_wake: tokio::sync::Notify,
    /// Per template: when the next fill may be tried, and consecutive failures.
    pub pool_backoff: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Gov {
    pub fn new(cfg: &Config, store: &Arc<Store>) -> Gov {
        let keys = KeyRing::new(cfg.api_key.clone());
        match store.list_keys() {
            Ok(k) => keys.load(k),
            Err(e) => tracing::error!(error = %e, "cannot load API keys"),
        }
        let quotas = match store.list_quotas() {
            Ok(q) => q.into_iter().map(|q| (q.owner, q.limits)).collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot load quotas");
                HashMap::new()
            }
        };
        Gov {
            keys,
            limiter: RateLimiter::default(),
            audit: AuditSink::start(store.clone(), cfg.audit_log),
            acl: RwLock::new(HashMap::new()),
            quotas: RwLock::new(quotas),
            pool_wake: tokio::sync::Notify::new(),
            pool_backoff: Mutex::new(HashMap::new()),
        }
    }
}

/// Input of `POST /api/v1/keys`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct NewKey {
    pub name: Option<String>,
    pub identity: Option<String>,
    pub scope: Option<String>,
    pub tenant: Option<String>,
    pub rate_limit: Option<f64>,
}

/// Input of `PUT /api/v1/quotas/{owner}`: counts, and durations in Go syntax.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct QuotaInput {
    pub max_sandboxes: Option<u64>,
    pub max_memory_mb: Option<u64>,
    pub max_vcpus: Option<u64>,
    pub max_ttl: Option<String>,
    pub max_exec_timeout: Option<String>,
}

/// `GET /api/v1/quotas/summary` (API.md §8: exactly these keys).
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuotaSummary {
    pub total: u64,
    pub with_max_sandboxes: u64,
    pub with_max_ttl: u64,
    pub with_max_exec_timeout: u64,
}

/// Usage of one subject against its effective limits.
#[derive(Debug, Clone)]
pub struct UsageReport {
    pub owner: String,
    /// Active sandboxes owned by it.
    pub as_owner: Usage,
    /// Active sandboxes created by keys of that identity.
    pub as_key: Usage,
    pub limits: Option<QuotaLimits>,
    pub active_sandboxes: u64,
    pub max_sandboxes: u64,
}

fn opt_dur(name: &str, v: &Option<String>) -> Result<Option<i64>, Error> {
    match v.as_deref() {
        None | Some("") => Ok(None),
        Some(s) => {
            let d = duration::parse(s).map_err(|e| Error::invalid(format!("{name}: {e}")))?;
            if d.is_zero() {
                return Err(Error::invalid(format!("{name} must be positive")));
            }
            Ok(Some(d.as_millis() as i64))
        }
    }
}

impl Engine {
    // ----- callers ---------------------------------------------------------

    /// Whether requests need a key (a bootstrap key or any created key exists).
    pub fn auth_on(&self) -> bool {
        self.gov.keys.auth_on()
    }

    /// The caller a presented API key stands for.
    pub fn authenticate(&self, secret: &str) -> Option<Caller> {
        self.gov.keys.authenticate(secret)
    }

    /// Token-bucket check of a caller's key; `Err(seconds)` to wait.
    pub fn rate_check(&self, caller: &Caller) -> Result<(), u64> {
        match (&caller.key_id, caller.rate_limit) {
            (Some(k), Some(rate)) => self.gov.limiter.check(k, rate),
            _ => Ok(()),
        }
    }

    // ----- audit -------------------------------------------------------------

    /// Record an auditable action. Never blocks: the record is queued for
    /// the background writer. (Preview token issue and any other hook call
    /// this.)
    pub fn audit(&self, ev: AuditEvent) {
        self.gov.audit.send(ev);
    }

    /// Wait until every queued audit record is stored (graceful stop).
    pub async fn audit_flush(&self) {
        self.gov.audit.flush().await;
    }

    /// The audit sink, for components outside the engine (image pulls).
    pub fn audit_sink(&self) -> AuditSink {
        self.gov.audit.clone()
    }

    pub async fn query_audit(
        &self,
        f: stacyvm_store::AuditFilter,
    ) -> Result<Vec<stacyvm_store::AuditRecord>, Error> {
        self.gov.audit.flush().await;
        self.db(move |s| s.query_audit(&f)).await
    }

    pub async fn verify_audit(&self) -> Result<stacyvm_store::AuditVerify, Error> {
        self.gov.audit.flush().await;
        self.db(|s| s.verify_audit()).await
    }

    // ----- ownership ---------------------------------------------------------

    /// Who owns a sandbox (also destroyed ones); `None` when no such record.
    pub async fn sandbox_acl(&self, id: &str) -> Result<Option<Arc<SandboxAcl>>, Error> {
        if let Some(a) = self
            .gov
            .acl
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Ok(Some(a.clone()));
        }
        if !id::is_sandbox_id(id) {
            return Ok(None);
        }
        let idc = id.to_string();
        let rec = self.db(move |s| s.get_sandbox(&idc)).await?;
        Ok(rec.map(|r| self.remember_acl(&r)))
    }

    /// Cache (or refresh) the ownership of a sandbox record.
    pub(super) fn remember_acl(&self, r: &SandboxRecord) -> Arc<SandboxAcl> {
        let acl = Arc::new(SandboxAcl::of(r));
        let mut m = self.gov.acl.write().unwrap_or_else(|p| p.into_inner());
        if m.len() >= ACL_CACHE_MAX {
            m.clear();
        }
        m.insert(r.id.clone(), acl.clone());
        acl
    }

    /// Sandboxes a caller may see, with `filter` applied on top.
    pub async fn list_visible(
        &self,
        mut filter: SandboxFilter,
        caller: &Caller,
    ) -> Result<Vec<SandboxRecord>, Error> {
        match caller.visibility() {
            Visibility::All => {}
            Visibility::Tenant(t) => filter.tenant = Some(t),
            Visibility::Creator(c) => filter.creator = Some(c),
        }
        self.list(filter).await
    }

    /// Destroy every expired sandbox (that `caller` may see), recording each
    /// in the audit log (actor `system` for the reaper).
    pub async fn prune_as(&self, reason: &str, caller: Option<&Caller>) -> Result<u64, Error> {
        let now = now_ms();
        let ids = self.db(move |s| s.list_expired(now)).await?;
        let vis = caller.map(|c| c.visibility()).unwrap_or(Visibility::All);
        let mut n = 0;
        for id in ids {
            let acl = self.sandbox_acl(&id).await.ok().flatten();
            if !acl.as_ref().is_some_and(|a| a.visible_to(&vis)) {
                continue;
            }
            let r = self.destroy(&id, reason).await;
            let ev = match caller {
                Some(c) => AuditEvent::by(c, "sandbox.destroy", &id),
                None => AuditEvent::system("sandbox.destroy", &id),
            };
            let acl = acl.unwrap_or_else(|| {
                Arc::new(SandboxAcl {
                    owner: None,
                    tenant: None,
                    creator: None,
                    pool: None,
                })
            });
            self.audit(
                ev.owner(acl.owner.as_deref())
                    .tenant(acl.tenant.as_deref())
                    .detail("reason", reason)
                    .outcome(&r),
            );
            match r {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "could not destroy expired sandbox")
                }
            }
        }
        Ok(n)
    }

    // ----- keys --------------------------------------------------------------

    async fn reload_keys(&self) -> Result<(), Error> {
        let keys = self.db(|s| s.list_keys()).await?;
        self.gov.keys.load(keys);
        Ok(())
    }

    /// Create a key; returns it and its secret (shown once).
    pub async fn create_key(&self, input: &NewKey) -> Result<(KeyRecord, String), Error> {
        let name = input
            .name
            .clone()
            .or_else(|| input.identity.clone())
            .unwrap_or_default();
        if !valid_name(&name) {
            return Err(Error::invalid(
                "name (the key's identity) must be 1-128 characters of [A-Za-z0-9._@:+-] and not start with \"system\"",
            ));
        }
        let scope = input.scope.as_deref().unwrap_or("api");
        let scope = Scope::parse(scope).ok_or_else(|| {
            Error::invalid(format!(
                "scope must be admin, operator, api or viewer, not {scope:?}"
            ))
        })?;
        let tenant = input.tenant.clone().filter(|t| !t.is_empty());
        if let Some(t) = &tenant {
            if !valid_name(t) {
                return Err(Error::invalid(
                    "tenant must be 1-128 characters of [A-Za-z0-9._@:+-]",
                ));
            }
        }
        if let Some(r) = input.rate_limit {
            if r.is_nan() || r <= 0.0 || r > 1e6 {
                return Err(Error::invalid(
                    "rate_limit must be a positive number of requests per second",
                ));
            }
        }
        let secret = format!("sk_{}", id::random_token(32));
        let rec = KeyRecord {
            id: format!("key_{}", id::random_token(12)),
            name,
            scope: scope.as_str().to_string(),
            tenant,
            rate_limit: input.rate_limit,
            hash: sha256_hex(secret.as_bytes()),
            prefix: secret[..7].to_string(),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        };
        let r = rec.clone();
        self.db(move |s| s.insert_key(&r)).await?;
        self.reload_keys().await?;
        Ok((rec, secret))
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, Error> {
        self.db(|s| s.list_keys()).await
    }

    /// Revoke a key at once (its next request is a 401).
    pub async fn revoke_key(&self, key_id: &str) -> Result<KeyRecord, Error> {
        let idc = key_id.to_string();
        let now = now_ms();
        let rec = self.db(move |s| s.revoke_key(&idc, now)).await?;
        self.reload_keys().await?;
        rec.ok_or_else(|| Error::new(ErrorCode::NotFound, format!("key {key_id} not found")))
    }

    // ----- quotas ------------------------------------------------------------

    pub async fn list_quotas(&self) -> Result<Vec<QuotaRecord>, Error> {
        self.db(|s| s.list_quotas()).await
    }

    pub async fn get_quota(&self, owner: &str) -> Result<QuotaRecord, Error> {
        let o = owner.to_string();
        self.db(move |s| s.get_quota(&o))
            .await?
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("no quota for {owner}")))
    }

    /// Insert or replace a quota; `true` when it is new.
    pub async fn put_quota(
        &self,
        owner: &str,
        input: &QuotaInput,
    ) -> Result<(QuotaRecord, bool), Error> {
        check_subject(owner)?;
        let limits = QuotaLimits {
            max_sandboxes: input.max_sandboxes,
            max_memory_mb: input.max_memory_mb,
            max_vcpus: input.max_vcpus,
            max_ttl_ms: opt_dur("max_ttl", &input.max_ttl)?,
            max_exec_timeout_ms: opt_dur("max_exec_timeout", &input.max_exec_timeout)?,
        };
        let o = owner.to_string();
        let now = now_ms();
        let (rec, existed) = self.db(move |s| s.put_quota(&o, &limits, now)).await?;
        self.gov
            .quotas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.owner.clone(), rec.limits.clone());
        Ok((rec, !existed))
    }

    pub async fn delete_quota(&self, owner: &str) -> Result<(), Error> {
        let o = owner.to_string();
        let found = self.db(move |s| s.delete_quota(&o)).await?;
        self.gov
            .quotas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(owner);
        if found {
            Ok(())
        } else {
            Err(Error::new(
                ErrorCode::NotFound,
                format!("no quota for {owner}"),
            ))
        }
    }

    pub async fn quota_summary(&self) -> Result<QuotaSummary, Error> {
        let q = self.list_quotas().await?;
        let count =
            |f: &dyn Fn(&QuotaLimits) -> bool| q.iter().filter(|r| f(&r.limits)).count() as u64;
        Ok(QuotaSummary {
            total: q.len() as u64,
            with_max_sandboxes: count(&|l| l.max_sandboxes.is_some()),
            with_max_ttl: count(&|l| l.max_ttl_ms.is_some()),
            with_max_exec_timeout: count(&|l| l.max_exec_timeout_ms.is_some()),
        })
    }

    /// Current usage of a subject, from the same queries admission uses.
    pub async fn quota_usage(&self, owner: &str) -> Result<UsageReport, Error> {
        check_subject(owner)?;
        let o = owner.to_string();
        let (as_owner, as_key, limits, active) = self
            .db(move |s| {
                let (a, b) = s.usage(&o)?;
                let l = s.get_quota(&o)?.map(|q| q.limits);
                Ok((a, b, l, s.count_active()?))
            })
            .await?;
        Ok(UsageReport {
            owner: owner.to_string(),
            as_owner,
            as_key,
            limits,
            active_sandboxes: active,
            max_sandboxes: self.cfg.max_sandboxes,
        })
    }

    fn limits_of(&self, subject: Option<&str>) -> Option<QuotaLimits> {
        let subject = subject?;
        self.gov
            .quotas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(subject)
            .cloned()
    }

    /// The strictest of a limit over a sandbox's owner and creator quotas.
    fn strictest(
        &self,
        acl: Option<&SandboxAcl>,
        f: impl Fn(&QuotaLimits) -> Option<i64>,
    ) -> Option<Duration> {
        let acl = acl?;
        [acl.owner.as_deref(), acl.creator.as_deref()]
            .into_iter()
            .filter_map(|s| self.limits_of(s))
            .filter_map(|l| f(&l))
            .min()
            .map(|ms| Duration::from_millis(ms.max(0) as u64))
    }

    /// Apply the quota's max exec timeout to an exec of a sandbox: a timeout
    /// asked for above it is refused (429); the default is capped to it.
    pub fn exec_quota(
        &self,
        acl: Option<&SandboxAcl>,
        explicit: bool,
        timeout: Duration,
    ) -> Result<Duration, Error> {
        let Some(max) = self.strictest(acl, |l| l.max_exec_timeout_ms) else {
            return Ok(timeout);
        };
        if timeout <= max {
            return Ok(timeout);
        }
        if explicit {
            return Err(Error::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "exec timeout {} exceeds the max_exec_timeout {} of this sandbox's quota",
                    duration::format(timeout),
                    duration::format(max)
                ),
            ));
        }
        Ok(max)
    }

    /// The longest TTL an extension of this sandbox may set (config and quotas).
    pub fn ttl_cap(&self, acl: Option<&SandboxAcl>) -> Duration {
        self.strictest(acl, |l| l.max_ttl_ms)
            .map_or(self.cfg.max_ttl, |q| q.min(self.cfg.max_ttl))
    }

    /// Dry run of admission: the same store check a create runs, without
    /// storing anything (API.md §3).
    pub async fn admission_report(
        &self,
        req: &CreateSandbox,
        owner: Option<&str>,
    ) -> Result<AdmissionDecision, Error> {
        let max = self.cfg.max_sandboxes;
        let mut d = AdmissionDecision {
            allowed: true,
            queueable: false,
            reason: None,
            active_sandboxes: 0,
            max_sandboxes: max,
            active_owner_sandboxes: None,
            max_owner_sandboxes: None,
            max_ttl: duration::format(self.cfg.max_ttl),
        };
        match self.plan(req, owner) {
            Ok(rec) => {
                let report = self.db(move |s| s.check_admission(&rec, max)).await?;
                d.active_sandboxes = report.active;
                let mut max_ttl = self.cfg.max_ttl;
                if let Some(o) = &report.owner {
                    d.active_owner_sandboxes = Some(o.usage.sandboxes);
                    d.max_owner_sandboxes = o.limits.as_ref().and_then(|l| l.max_sandboxes);
                }
                for su in [&report.owner, &report.creator].into_iter().flatten() {
                    if let Some(ms) = su.limits.as_ref().and_then(|l| l.max_ttl_ms) {
                        max_ttl = max_ttl.min(Duration::from_millis(ms.max(0) as u64));
                    }
                }
                d.max_ttl = duration::format(max_ttl);
                if let Some(r) = report.refusal {
                    d.allowed = false;
                    d.reason = Some(Error::from(r).message);
                }
            }
            Err(e) => {
                d.active_sandboxes = self.db(|s| s.count_active()).await?;
                d.allowed = false;
                d.reason = Some(e.message);
            }
        }
        Ok(d)
    }
}

/// Quota subjects: owner ids or key identities (`system:pool:<template>`
/// names a warm pool).
fn check_subject(s: &str) -> Result<(), Error> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@:+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "a quota owner is 1-128 characters of [A-Za-z0-9._@:+-]",
        ))
    }
}
