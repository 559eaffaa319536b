//! The audit trail's write path.
//!
//! Callers hand [`AuditEvent`]s to an [`AuditSink`]: a bounded channel in
//! front of one background writer task that appends whatever has queued up
//! in a single store transaction (the hash chain is computed there). A
//! caller never waits for the database: when the channel is full the
//! record is handed to a task that waits for room, so records are never
//! dropped. [`AuditSink::flush`] returns once everything sent before it is
//! stored (used at shutdown).

use crate::clock::now_ms;
use crate::governance::Caller;
use serde_json::Value;
use stacyvm_store::{NewAudit, Store};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Capacity of the channel in front of the writer.
const QUEUE: usize = 16 * 1024;
/// Most records written in one transaction.
const BATCH: usize = 1024;
/// How long the writer lets records gather after the first one of a batch
/// (fewer, larger transactions; a flush does not wait).
const LINGER: Duration = Duration::from_millis(25);

/// One auditable action.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// `sandbox.create`, `sandbox.exec`, `file.write`, `template.update`,
    /// `preview.token`, … (`<noun>.<verb>`).
    pub action: String,
    /// What it acted on: a sandbox id, template name, key id, image…
    pub target: String,
    /// Key identity, `system` for the server's own work.
    pub actor: String,
    pub owner: Option<String>,
    pub tenant: Option<String>,
    /// `None` is success; `Some(code)` an error with its API code.
    pub error: Option<String>,
    pub request_id: Option<String>,
    pub client: Option<String>,
    /// Extra facts (command line, paths, reason…); never outputs or secrets.
    pub details: serde_json::Map<String, Value>,
}

impl AuditEvent {
    /// An event done by the server itself (`actor` = `system`).
    pub fn system(action: &str, target: &str) -> AuditEvent {
        AuditEvent {
            action: action.to_string(),
            target: target.to_string(),
            actor: "system".to_string(),
            owner: None,
            tenant: None,
            error: None,
            request_id: None,
            client: None,
            details: serde_json::Map::new(),
        }
    }

    /// An event done on behalf of an API caller.
    pub fn by(caller: &Caller, action: &str, target: &str) -> AuditEvent {
        AuditEvent {
            actor: caller.actor(),
            tenant: caller.tenant.clone(),
            request_id: caller.request_id.clone(),
            client: caller.client.clone(),
            ..AuditEvent::system(action, target)
        }
    }

    pub fn owner(mut self, owner: Option<&str>) -> AuditEvent {
        self.owner = owner.map(str::to_string);
        self
    }

    pub fn tenant(mut self, tenant: Option<&str>) -> AuditEvent {
        if tenant.is_some() {
            self.tenant = tenant.map(str::to_string);
        }
        self
    }

    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> AuditEvent {
        self.details.insert(key.to_string(), value.into());
        self
    }

    /// Record the outcome of `r` (its error code when it failed).
    pub fn outcome<T>(mut self, r: &Result<T, crate::Error>) -> AuditEvent {
        self.error = r.as_ref().err().map(|e| e.code.as_str().to_string());
        self
    }

    pub fn failed(mut self, code: &str) -> AuditEvent {
        self.error = Some(code.to_string());
        self
    }

    fn into_record(self) -> NewAudit {
        NewAudit {
            at_ms: now_ms(),
            actor: self.actor,
            owner: self.owner,
            tenant: self.tenant,
            action: self.action,
            target: self.target,
            outcome: if self.error.is_some() { "error" } else { "ok" }.to_string(),
            code: self.error,
            request_id: self.request_id,
            client: self.client,
            details: Value::Object(self.details).to_string(),
        }
    }
}

enum Msg {
    Record(Box<NewAudit>),
    Flush(oneshot::Sender<()>),
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    enabled: bool,
    tx: Option<mpsc::Sender<Msg>>,
    store: Arc<Store>,
    /// Records that had to wait for room in the queue.
    pub backpressure: Arc<AtomicU64>,
}

impl AuditSink {
    /// Start the writer task on the current Tokio runtime. Without a
    /// runtime (or when `enabled` is false) nothing is queued: records are
    /// written synchronously, or not at all when disabled.
    pub fn start(store: Arc<Store>, enabled: bool) -> AuditSink {
        let backpressure = Arc::new(AtomicU64::new(0));
        if !enabled {
            return AuditSink {
                enabled,
                tx: None,
                store,
                backpressure,
            };
        }
        let tx = match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                let (tx, rx) = mpsc::channel(QUEUE);
                h.spawn(writer(store.clone(), rx));
                Some(tx)
            }
            Err(_) => None,
        };
        AuditSink {
            enabled,
            tx,
            store,
            backpressure,
        }
    }

    /// False when the audit log is switched off (`audit_log = false`).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Queue an event; never blocks and never drops it.
    pub fn send(&self, ev: AuditEvent) {
        if !self.enabled {
            return;
        }
        let Some(tx) = &self.tx else {
            if let Err(e) = self.store.append_audit(&[ev.into_record()]) {
                tracing::error!(error = %e, "an audit record could not be stored");
            }
            return;
        };
        match tx.try_send(Msg::Record(Box::new(ev.into_record()))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                self.backpressure.fetch_add(1, Ordering::Relaxed);
                let tx = tx.clone();
                tokio::spawn(async move {
                    if tx.send(msg).await.is_err() {
                        tracing::error!("audit writer stopped; an audit record was not stored");
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(Msg::Record(rec))) => {
                // The writer is gone (shutting down): store it directly.
                if let Err(e) = self.store.append_audit(&[*rec]) {
                    tracing::error!(error = %e, "an audit record could not be stored");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Wait until every record queued before this call is stored.
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        if tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
        }
    }
}

async fn writer(store: Arc<Store>, mut rx: mpsc::Receiver<Msg>) {
    let mut buf = Vec::with_capacity(BATCH);
    loop {
        if rx.recv_many(&mut buf, BATCH).await == 0 {
            return;
        }
        if buf.len() < BATCH && !buf.iter().any(|m| matches!(m, Msg::Flush(_))) {
            let deadline = tokio::time::Instant::now() + LINGER;
            while buf.len() < BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) => {
                        let flush = matches!(m, Msg::Flush(_));
                        buf.push(m);
                        if flush {
                            break;
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let mut records = Vec::with_capacity(buf.len());
        let mut waiters = Vec::new();
        for m in buf.drain(..) {
            match m {
                Msg::Record(r) => records.push(*r),
                Msg::Flush(w) => waiters.push(w),
            }
        }
        let mut attempt = 0u32;
        while !records.is_empty() {
            let st = store.clone();
            let batch = std::mem::take(&mut records);
            let res = tokio::task::spawn_blocking(move || {
                let r = st.append_audit(&batch);
                (r, batch)
            })
            .await;
            match res {
                Ok((Ok(_), _)) => {}
                Ok((Err(e), batch)) => {
                    attempt += 1;
                    if attempt >= 20 {
                        for r in &batch {
                            tracing::error!(action = %r.action, target = %r.target, actor = %r.actor,
                                error = %e, "audit record could not be stored");
                        }
                    } else {
                        tracing::warn!(error = %e, attempt, "audit write failed; retrying");
                        records = batch;
                        tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
                    }
                }
                Err(e) => tracing::error!(error = %e, "audit writer task failed"),
            }
        }
        for w in waiters {
            let _ = w.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_are_batched_and_flushed() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let sink = AuditSink::start(store.clone(), true);
        let caller = Caller {
            identity: Some("ci".into()),
            request_id: Some("r1".into()),
            ..Caller::default()
        };
        for i in 0..500 {
            sink.send(
                AuditEvent::by(&caller, "sandbox.exec", &format!("sb_{i}"))
                    .owner(Some("alice"))
                    .detail("command", "echo hi"),
            );
        }
        sink.send(AuditEvent::system("sandbox.destroy", "sb_1").failed("provider_error"));
        sink.flush().await;
        let v = store.verify_audit().unwrap();
        assert!(v.ok);
        assert_eq!(v.records, 501);
        let last = store
            .query_audit(&stacyvm_store::AuditFilter {
                actor: Some("system".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].entry.outcome, "error");
        assert_eq!(last[0].entry.code.as_deref(), Some("provider_error"));
        let disabled = AuditSink::start(store.clone(), false);
        disabled.send(AuditEvent::system("x.y", "z"));
        disabled.flush().await;
        assert_eq!(store.verify_audit().unwrap().records, 501);
    }
}
