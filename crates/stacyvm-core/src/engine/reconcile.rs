//! Agreement between the store and the runtimes: at start-up and periodically.

use super::{Engine, Live};
use crate::clock::now_ms;
use crate::error::Error;
use stacyvm_providers::{Provider, RuntimeInfo};
use stacyvm_store::{SandboxRecord, SandboxState};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

impl Engine {
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
                let agent = match runtime {
                    Some(rt) if rt.running => match provider.agent(id, &socket).await {
                        Ok(agent) => agent
                            .wait_ready(Duration::from_secs(3))
                            .await
                            .is_ok()
                            .then_some(agent),
                        Err(e) => {
                            tracing::warn!(sandbox = %id, error = %e, "cannot find the sandbox's agent");
                            None
                        }
                    },
                    _ => None,
                };
                if let Some(agent) = agent {
                    if rec.state == SandboxState::Unhealthy {
                        mark(SandboxState::Running, String::new()).await;
                    }
                    self.live.write().unwrap_or_else(|p| p.into_inner()).insert(
                        id.to_string(),
                        Arc::new(Live {
                            agent,
                            preview: super::preview::chosen_access(&rec.metadata),
                        }),
                    );
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
}
