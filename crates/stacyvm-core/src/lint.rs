//! `stacyvm config lint`: unsafe or surprising settings in an effective
//! configuration. With `production` set, settings that are fine on a
//! developer's laptop (no key on loopback, the mock provider, no quotas)
//! become errors.

use crate::config::Config;
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(&self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One finding: what is wrong and how to fix it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Stable id, e.g. `auth.no_api_key`.
    pub id: &'static str,
    pub severity: Severity,
    pub message: String,
    pub fix: String,
}

/// Facts from outside the config file that some rules need.
#[derive(Debug, Clone, Default)]
pub struct LintContext {
    /// Per-owner quota rows in the data dir's store; `None` when there is
    /// no store yet.
    pub quota_rows: Option<usize>,
}

fn is_loopback_listen(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false)
}

fn url_host_is_loopback(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or("");
    let host = match hostport.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => hostport,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// Check `cfg`. Findings are sorted, errors first.
pub fn lint(cfg: &Config, ctx: &LintContext, production: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    // In production mode, a warning about something only a laptop should
    // do is an error.
    let prod = |dev: Severity| if production { Severity::Error } else { dev };
    let mut add = |id, severity, message: String, fix: &str| {
        out.push(Finding {
            id,
            severity,
            message,
            fix: fix.to_string(),
        })
    };
    let providers = cfg.enabled_providers();

    match &cfg.api_key {
        None if !is_loopback_listen(&cfg.listen) => add(
            "auth.no_api_key",
            Severity::Error,
            format!(
                "no API key, and the server listens on {} (not loopback): anyone who can reach it controls every sandbox",
                cfg.listen
            ),
            "set api_key (STACYVM_API_KEY) or listen on 127.0.0.1",
        ),
        None => add(
            "auth.no_api_key",
            prod(Severity::Info),
            format!("no API key; the server only listens on loopback ({})", cfg.listen),
            "set api_key (STACYVM_API_KEY) before exposing the server",
        ),
        Some(k) if k.len() < 24 => add(
            "auth.weak_api_key",
            prod(Severity::Warning),
            format!("the API key is only {} characters long", k.len()),
            "use a random key of at least 32 characters",
        ),
        Some(_) => {}
    }

    let public = cfg.default_preview_access() == crate::preview::PreviewAccess::Public;
    let local_domain = crate::preview::Domain::parse(&cfg.preview_domain)
        .map(|d| d.host == "localhost")
        .unwrap_or(false);
    if public && !local_domain {
        add(
            "preview.public_default",
            Severity::Error,
            format!(
                "previews on {} are public by default: anyone with a URL reaches apps inside sandboxes",
                cfg.preview_domain
            ),
            "set preview_access = \"token\" (sandboxes can still opt in with preview: public)",
        );
    } else if public {
        add(
            "preview.public_default",
            prod(Severity::Info),
            "previews are public by default (preview domain localhost)".to_string(),
            "set preview_access = \"token\"",
        );
    }

    match ctx.quota_rows {
        Some(0) | None => add(
            "quotas.none",
            prod(Severity::Warning),
            format!(
                "no per-owner quotas: any one caller may use the whole host (up to {} sandboxes, {} MB each)",
                cfg.max_sandboxes, cfg.max_memory_mb
            ),
            "set quotas with PUT /api/v1/quotas/{owner}",
        ),
        Some(_) => {}
    }
    if cfg.max_sandboxes > 10_000 {
        add(
            "quotas.max_sandboxes",
            Severity::Warning,
            format!(
                "max_sandboxes is {}: effectively unlimited",
                cfg.max_sandboxes
            ),
            "size max_sandboxes to the host",
        );
    }
    if cfg.max_ttl > Duration::from_secs(7 * 24 * 3600) {
        add(
            "quotas.max_ttl",
            Severity::Warning,
            format!(
                "max_ttl is {} hours: forgotten sandboxes live that long",
                cfg.max_ttl.as_secs() / 3600
            ),
            "keep max_ttl at a day or less",
        );
    }

    if providers.iter().any(|p| p == "mock") {
        add(
            "providers.mock",
            prod(Severity::Warning),
            "the mock provider is enabled: it isolates nothing and runs no code (isolation none)"
                .to_string(),
            "remove mock from providers and default_provider",
        );
    }
    if cfg.default_provider == "proot" {
        add(
            "providers.proot_default",
            prod(Severity::Warning),
            "the default provider is proot, which is not a security boundary (ptrace path translation only)"
                .to_string(),
            "use native or docker for untrusted code",
        );
    }
    if providers.iter().any(|p| p == "custom") {
        if let Some(url) = &cfg.custom.url {
            let local = url_host_is_loopback(url);
            if url.starts_with("http://") && !local {
                add(
                    "custom.plaintext",
                    prod(Severity::Warning),
                    format!("the custom provider backend {url} is reached over plain HTTP"),
                    "use https:// or a loopback/private tunnel",
                );
            }
            if cfg.custom.token.is_none() && !local {
                add(
                    "custom.no_token",
                    Severity::Error,
                    format!("the custom provider backend {url} is called without a token"),
                    "set custom.token (STACYVM_CUSTOM_TOKEN)",
                );
            }
        }
    }
    if !cfg.audit_log {
        add(
            "audit.off",
            prod(Severity::Warning),
            "the audit log is off".to_string(),
            "set audit_log = true",
        );
    }
    for r in &cfg.insecure_registries {
        add(
            "images.insecure_registry",
            Severity::Warning,
            format!("images are pulled from {r} over plain HTTP"),
            "serve the registry over TLS",
        );
    }
    out.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.id.cmp(b.id)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Config {
        Config::load(
            None,
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap()
    }

    fn ids(f: &[Finding], sev: Severity) -> Vec<&'static str> {
        f.iter()
            .filter(|x| x.severity == sev)
            .map(|x| x.id)
            .collect()
    }

    #[test]
    fn defaults_are_unsafe_off_loopback() {
        // The embedded default listens on 0.0.0.0 without a key.
        let f = lint(&load(&[]), &LintContext::default(), false);
        assert_eq!(ids(&f, Severity::Error), ["auth.no_api_key"]);
    }

    #[test]
    fn laptop_setup_passes_without_production() {
        let cfg = load(&[
            ("STACYVM_LISTEN", "127.0.0.1:7423"),
            ("STACYVM_DEFAULT_PROVIDER", "mock"),
        ]);
        let ctx = LintContext { quota_rows: None };
        let f = lint(&cfg, &ctx, false);
        assert!(ids(&f, Severity::Error).is_empty(), "{f:?}");
        let f = lint(&cfg, &ctx, true);
        let errors = ids(&f, Severity::Error);
        for id in ["providers.mock", "quotas.none", "auth.no_api_key"] {
            assert!(errors.contains(&id), "{id} missing in {errors:?}");
        }
    }

    #[test]
    fn hardened_setup_is_clean_in_production() {
        let cfg = load(&[
            ("STACYVM_API_KEY", "sk_0123456789abcdef0123456789abcdef"),
            ("STACYVM_PREVIEW_DOMAIN", "preview.example.com"),
        ]);
        let f = lint(
            &cfg,
            &LintContext {
                quota_rows: Some(3),
            },
            true,
        );
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn public_previews_on_a_real_domain() {
        let cfg = load(&[
            ("STACYVM_API_KEY", "sk_0123456789abcdef0123456789abcdef"),
            ("STACYVM_PREVIEW_DOMAIN", "preview.example.com"),
            ("STACYVM_PREVIEW_ACCESS", "public"),
            ("STACYVM_PROVIDERS", "native,custom"),
            ("STACYVM_CUSTOM_URL", "http://192.0.2.13:7500"),
        ]);
        let f = lint(
            &cfg,
            &LintContext {
                quota_rows: Some(1),
            },
            false,
        );
        let errors = ids(&f, Severity::Error);
        assert_eq!(errors, ["custom.no_token", "preview.public_default"]);
        assert!(ids(&f, Severity::Warning).contains(&"custom.plaintext"));
    }

    #[test]
    fn loopback_detection() {
        assert!(url_host_is_loopback("http://127.0.0.1:7500"));
        assert!(url_host_is_loopback("http://localhost/x"));
        assert!(url_host_is_loopback("http://[::1]:80"));
        assert!(!url_host_is_loopback("http://192.0.2.1:80"));
        assert!(is_loopback_listen("127.0.0.1:1"));
        assert!(!is_loopback_listen("0.0.0.0:1"));
    }
}
