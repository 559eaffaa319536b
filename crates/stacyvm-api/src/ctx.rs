//! The request context the auth layer attaches to every request: who calls
//! (key identity, scope, tenant, request id, client address) and, on
//! sandbox routes, who owns the sandbox.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use stacyvm_core::audit::AuditEvent;
use stacyvm_core::governance::{Caller, SandboxAcl};
use std::convert::Infallible;
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct Ctx {
    pub caller: Caller,
    /// Ownership of the sandbox named in the path (when it exists).
    pub acl: Option<Arc<SandboxAcl>>,
}

impl Ctx {
    /// An audit event by this caller, attributed to the sandbox's owner.
    pub fn event(&self, action: &str, target: &str) -> AuditEvent {
        let ev = AuditEvent::by(&self.caller, action, target);
        match &self.acl {
            Some(a) => ev.owner(a.owner.as_deref()).tenant(a.tenant.as_deref()),
            None => ev,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(parts.extensions.get::<Ctx>().cloned().unwrap_or_default())
    }
}
