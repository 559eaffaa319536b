//! Live previews: who may open them, their tokens, and the agent's TCP tunnel
//! that the API's proxy carries each connection through.

use super::Engine;
use crate::clock::{now_ms, rfc3339_ms};
use crate::duration;
use crate::error::Error;
use crate::preview::{self, Domain, PreviewAccess, TokenError, ACCESS_KEY};
use serde::Serialize;
use stacyvm_agent_proto::codes;
use stacyvm_providers::agent::{AgentError, Tunnel};
use std::collections::BTreeMap;

/// Validate the create field `preview` (or metadata `preview`) and keep the
/// choice, normalised, in the metadata.
pub(super) fn plan_access(
    field: Option<&str>,
    metadata: &mut BTreeMap<String, String>,
) -> Result<(), Error> {
    let (value, what) = match field.filter(|v| !v.is_empty()) {
        Some(v) => (v.to_string(), "preview"),
        None => match metadata.get(ACCESS_KEY) {
            Some(v) => (v.clone(), "metadata preview"),
            None => return Ok(()),
        },
    };
    let access = PreviewAccess::parse(&value).ok_or_else(|| {
        Error::invalid(format!(
            "{what} must be \"public\" or \"token\", not {value:?}"
        ))
    })?;
    metadata.insert(ACCESS_KEY.to_string(), access.as_str().to_string());
    Ok(())
}

/// A sandbox's own choice of preview access, if it made one.
pub(super) fn chosen_access(metadata: &BTreeMap<String, String>) -> Option<PreviewAccess> {
    metadata
        .get(ACCESS_KEY)
        .and_then(|v| PreviewAccess::parse(v))
}

/// Answer of `GET /api/v1/sandboxes/{id}/preview/{port}`.
#[derive(Debug, Clone, Serialize)]
pub struct PreviewGrant {
    /// The preview's address (without the token).
    pub url: String,
    /// Signed token for this sandbox and port.
    pub token: String,
    /// When the token stops working (RFC 3339).
    pub expires_at: String,
    /// `url` with `?stacyvm_token=`: opening it once in a browser sets a
    /// cookie for the preview host.
    pub browser_url: String,
    /// The sandbox's preview access (`public` needs no token).
    pub access: &'static str,
    pub port: u16,
}

/// Why a tunnel to a sandbox port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The sandbox runs, but nothing accepts connections on the port.
    #[error("nothing is listening on port {port} in sandbox {id} ({detail})")]
    PortClosed {
        id: String,
        port: u16,
        detail: String,
    },
    /// The sandbox is unknown (404), not running (409) or its agent did not
    /// answer (502).
    #[error(transparent)]
    Sandbox(#[from] Error),
}

impl Engine {
    /// Keep a live sandbox's preview choice in step with its record (a
    /// warm-pool sandbox gets its metadata when it is claimed).
    pub(super) fn note_preview_access(&self, rec: &stacyvm_store::SandboxRecord) {
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = live.get_mut(&rec.id) {
            *l = std::sync::Arc::new(super::Live {
                agent: l.agent.clone(),
                preview: chosen_access(&rec.metadata),
            });
        }
    }

    /// The preview access of a running sandbox; 404 when it is unknown or
    /// destroyed, 409 when it is not running.
    pub async fn preview_access(&self, id: &str) -> Result<PreviewAccess, Error> {
        let chosen = |e: &Engine| {
            let live = e.live.read().unwrap_or_else(|p| p.into_inner());
            live.get(id).map(|l| l.preview)
        };
        let choice = match chosen(self) {
            Some(c) => c,
            None => {
                self.agent(id).await?;
                chosen(self).flatten()
            }
        };
        Ok(choice.unwrap_or_else(|| self.cfg.default_preview_access()))
    }

    /// `http://{port}-{id}.{preview_domain}` plus the port previews are
    /// served on, unless the domain names its own port (or it is 80).
    pub fn preview_url(&self, id: &str, port: u16) -> String {
        let domain = Domain::parse(&self.cfg.preview_domain).unwrap_or(Domain {
            host: self.cfg.preview_domain.clone(),
            port: None,
        });
        let served = domain.port.or_else(|| {
            self.cfg
                .preview_listen
                .as_deref()
                .unwrap_or(&self.cfg.listen)
                .parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| a.port())
        });
        match served {
            Some(p) if p != 80 => format!("http://{port}-{id}.{}:{p}", domain.host),
            _ => format!("http://{port}-{id}.{}", domain.host),
        }
    }

    /// Issue a token for `port` of sandbox `id`, valid for `ttl` (default
    /// `preview_token_ttl`, capped by `max_ttl`).
    pub async fn issue_preview_token(
        &self,
        id: &str,
        port: u16,
        ttl: Option<&str>,
    ) -> Result<PreviewGrant, Error> {
        if port == 0 {
            return Err(Error::invalid("port must be 1 to 65535"));
        }
        let rec = self.get(id).await?;
        let ttl = match ttl {
            None | Some("") => self.cfg.preview_token_ttl,
            Some(t) => duration::parse(t).map_err(|e| Error::invalid(e.to_string()))?,
        };
        if ttl.is_zero() {
            return Err(Error::invalid("ttl must be positive"));
        }
        let ttl = ttl.min(self.cfg.max_ttl);
        // Whole seconds, rounded up: never shorter than asked.
        let exp = (now_ms() as u64 + ttl.as_millis() as u64).div_ceil(1000);
        let token = preview::sign(&self.preview_secret, id, port, exp);
        let url = self.preview_url(id, port);
        let access = chosen_access(&rec.metadata)
            .unwrap_or_else(|| self.cfg.default_preview_access())
            .as_str();
        Ok(PreviewGrant {
            browser_url: format!("{url}/?stacyvm_token={token}"),
            url,
            token,
            expires_at: rfc3339_ms(exp as i64 * 1000),
            access,
            port,
        })
    }

    /// Check a preview token for `port` of sandbox `id`; returns its expiry
    /// (unix seconds).
    pub fn check_preview_token(&self, token: &str, id: &str, port: u16) -> Result<u64, TokenError> {
        let now = (now_ms() / 1000) as u64;
        preview::verify(&self.preview_secret, token, id, port, now)
    }

    /// Open a byte pipe to `127.0.0.1:port` inside a running sandbox,
    /// through its agent (`GET /v1/tunnel`).
    pub async fn open_tunnel(&self, id: &str, port: u16) -> Result<Tunnel, TunnelError> {
        if port == 0 {
            return Err(Error::invalid("port must be 1 to 65535").into());
        }
        let agent = self.agent(id).await?;
        match agent.tunnel(port).await {
            Ok(t) => Ok(t),
            Err(AgentError::Status { code, message, .. }) if code == codes::PORT_CLOSED => {
                Err(TunnelError::PortClosed {
                    id: id.to_string(),
                    port,
                    detail: message,
                })
            }
            Err(e) => Err(self.agent_failed(id, e).await.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_is_validated_and_normalised() {
        let mut m = BTreeMap::new();
        plan_access(Some("Public"), &mut m).unwrap();
        assert_eq!(m.get("preview").map(String::as_str), Some("public"));
        assert_eq!(chosen_access(&m), Some(PreviewAccess::Public));
        let mut m = BTreeMap::from([("preview".to_string(), "TOKEN".to_string())]);
        plan_access(None, &mut m).unwrap();
        assert_eq!(chosen_access(&m), Some(PreviewAccess::Token));
        assert!(plan_access(Some("open"), &mut BTreeMap::new()).is_err());
        let mut m = BTreeMap::from([("preview".to_string(), "yes".to_string())]);
        assert!(plan_access(None, &mut m).is_err());
        let mut m = BTreeMap::new();
        plan_access(None, &mut m).unwrap();
        assert!(m.is_empty());
    }
}
