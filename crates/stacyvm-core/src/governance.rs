//! Who is calling and what they may do: API keys and their scopes,
//! tenants and sandbox visibility, per-key rate limits.
//!
//! Keys live in the store (hashed); this module keeps an in-memory copy so
//! that authenticating a request never touches the database.

use sha2::{Digest, Sha256};
use stacyvm_store::{KeyRecord, SandboxRecord};
use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Instant;

/// What a key may do; each scope includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Scope {
    /// Read-only (GET).
    Viewer,
    /// Sandboxes, exec, files, spawning from templates.
    Api,
    /// `api` plus template changes, prune, provider tests.
    Operator,
    /// Everything, including keys, quotas and the audit log.
    #[default]
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        Some(match s {
            "viewer" => Scope::Viewer,
            "api" => Scope::Api,
            "operator" => Scope::Operator,
            "admin" => Scope::Admin,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::Viewer => "viewer",
            Scope::Api => "api",
            Scope::Operator => "operator",
            Scope::Admin => "admin",
        }
    }

    /// Whether a key of this scope may call a route that needs `needed`.
    pub fn allows(&self, needed: Scope) -> bool {
        *self >= needed
    }
}

/// Which sandboxes a caller can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    /// Every sandbox (admin keys without a tenant; no auth configured).
    All,
    /// Sandboxes created by keys of this tenant.
    Tenant(String),
    /// Sandboxes created by keys of this identity (non-admin keys without a tenant).
    Creator(String),
}

/// The party behind one API request.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// Identity of the key; `None` when the server has no keys (auth off).
    pub identity: Option<String>,
    pub key_id: Option<String>,
    pub scope: Scope,
    pub tenant: Option<String>,
    pub rate_limit: Option<f64>,
    pub request_id: Option<String>,
    pub client: Option<String>,
}

impl Caller {
    /// The actor named in audit records.
    pub fn actor(&self) -> String {
        self.identity
            .clone()
            .unwrap_or_else(|| "anonymous".to_string())
    }

    pub fn visibility(&self) -> Visibility {
        if let Some(t) = &self.tenant {
            return Visibility::Tenant(t.clone());
        }
        match &self.identity {
            Some(id) if self.scope != Scope::Admin => Visibility::Creator(id.clone()),
            _ => Visibility::All,
        }
    }
}

/// Who a sandbox belongs to (cached per sandbox id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxAcl {
    pub owner: Option<String>,
    pub tenant: Option<String>,
    pub creator: Option<String>,
    /// The template whose warm pool holds it, until claimed.
    pub pool: Option<String>,
}

impl SandboxAcl {
    pub fn of(r: &SandboxRecord) -> SandboxAcl {
        SandboxAcl {
            owner: r.owner_id.clone(),
            tenant: r.tenant.clone(),
            creator: r.creator.clone(),
            pool: r.pool.clone(),
        }
    }

    pub fn visible_to(&self, v: &Visibility) -> bool {
        match v {
            Visibility::All => true,
            Visibility::Tenant(t) => self.pool.is_none() && self.tenant.as_ref() == Some(t),
            Visibility::Creator(c) => self.pool.is_none() && self.creator.as_ref() == Some(c),
        }
    }
}

/// Compare without leaking where the first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn sha256_hex(data: &[u8]) -> String {
    stacyvm_store::audit::hex(&Sha256::digest(data))
}

/// Identity names, tenants: 1–128 characters of `[A-Za-z0-9._@:+-]`, not
/// starting with `system` (reserved for the server's own actors).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with("system")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@:+-".contains(&b))
}

struct CachedKey {
    digest: [u8; 32],
    rec: KeyRecord,
    scope: Scope,
}

/// The live keys, in memory.
pub struct KeyRing {
    bootstrap: Option<String>,
    keys: RwLock<Vec<CachedKey>>,
}

fn digest_of(hex_hash: &str) -> Option<[u8; 32]> {
    if hex_hash.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex_hash[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

impl KeyRing {
    pub fn new(bootstrap: Option<String>) -> KeyRing {
        KeyRing {
            bootstrap,
            keys: RwLock::new(Vec::new()),
        }
    }

    /// Replace the cached keys (at start, and after every change).
    pub fn load(&self, keys: Vec<KeyRecord>) {
        let cached = keys
            .into_iter()
            .filter(|k| k.revoked_at_ms.is_none())
            .filter_map(|rec| {
                let digest = digest_of(&rec.hash)?;
                let scope = Scope::parse(&rec.scope)?;
                Some(CachedKey { digest, rec, scope })
            })
            .collect();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = cached;
    }

    /// Auth is on as soon as any key exists.
    pub fn auth_on(&self) -> bool {
        self.bootstrap.is_some()
            || !self
                .keys
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
    }

    /// The caller a presented secret stands for, if any.
    pub fn authenticate(&self, secret: &str) -> Option<Caller> {
        if let Some(b) = &self.bootstrap {
            if constant_time_eq(secret.as_bytes(), b.as_bytes()) {
                return Some(Caller {
                    identity: Some("admin".to_string()),
                    key_id: Some("bootstrap".to_string()),
                    scope: Scope::Admin,
                    ..Caller::default()
                });
            }
        }
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        // Every key is compared, without an early exit.
        let mut found: Option<&CachedKey> = None;
        for k in keys.iter() {
            if constant_time_eq(&k.digest, &digest) {
                found = Some(k);
            }
        }
        found.map(|k| Caller {
            identity: Some(k.rec.name.clone()),
            key_id: Some(k.rec.id.clone()),
            scope: k.scope,
            tenant: k.rec.tenant.clone(),
            rate_limit: k.rec.rate_limit,
            ..Caller::default()
        })
    }
}

/// Token buckets per key: `rate` requests per second, bursts of up to
/// `max(1, rate)`.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `Err(seconds)`: refused, retry after that many seconds.
    pub fn check(&self, key: &str, rate: f64) -> Result<(), u64> {
        if rate.is_nan() || rate <= 0.0 || !rate.is_finite() {
            return Ok(());
        }
        let burst = rate.max(1.0);
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, at) = b.entry(key.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, secret: &str, scope: &str, tenant: Option<&str>) -> KeyRecord {
        KeyRecord {
            id: format!("key_{name}"),
            name: name.into(),
            scope: scope.into(),
            tenant: tenant.map(str::to_string),
            rate_limit: None,
            hash: sha256_hex(secret.as_bytes()),
            prefix: secret[..6].to_string(),
            created_at_ms: 0,
            revoked_at_ms: None,
        }
    }

    #[test]
    fn keys_authenticate_with_their_scope_and_tenant() {
        let ring = KeyRing::new(None);
        assert!(!ring.auth_on());
        ring.load(vec![
            key("ci", "sk_one", "api", Some("acme")),
            key("ro", "sk_two", "viewer", None),
        ]);
        assert!(ring.auth_on());
        let c = ring.authenticate("sk_one").unwrap();
        assert_eq!(c.identity.as_deref(), Some("ci"));
        assert_eq!(c.scope, Scope::Api);
        assert_eq!(c.visibility(), Visibility::Tenant("acme".into()));
        let v = ring.authenticate("sk_two").unwrap();
        assert_eq!(v.visibility(), Visibility::Creator("ro".into()));
        assert!(ring.authenticate("sk_thr").is_none());
        let boot = KeyRing::new(Some("boot".into()));
        assert_eq!(
            boot.authenticate("boot").unwrap().visibility(),
            Visibility::All
        );
        assert!(boot.authenticate("boo").is_none());
    }

    #[test]
    fn scopes_are_ordered() {
        assert!(Scope::Admin.allows(Scope::Operator));
        assert!(Scope::Operator.allows(Scope::Api));
        assert!(!Scope::Api.allows(Scope::Operator));
        assert!(!Scope::Viewer.allows(Scope::Api));
        for s in ["viewer", "api", "operator", "admin"] {
            assert_eq!(Scope::parse(s).unwrap().as_str(), s);
        }
        assert!(Scope::parse("root").is_none());
    }

    #[test]
    fn rate_limits_refuse_bursts() {
        let r = RateLimiter::default();
        assert!(r.check("k", 2.0).is_ok());
        assert!(r.check("k", 2.0).is_ok());
        assert_eq!(r.check("k", 2.0), Err(1));
        assert!(r.check("other", 2.0).is_ok());
        assert!(r.check("k", 0.0).is_ok());
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("ci-bot@acme"));
        assert!(!valid_name("system:pool:x"));
        assert!(!valid_name("has space"));
        assert!(!valid_name(""));
    }
}
