//! The image store as the native provider's source of root filesystems.

use crate::audit::{AuditEvent, AuditSink};
use async_trait::async_trait;
use stacyvm_images::{ImageError, ImageStore, PullProgress};
use stacyvm_native::{ResolvedImage, RootfsSource};
use stacyvm_providers::ProviderError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Resolves image references to their extracted layers, pulling on first
/// use (with the pull's progress in the server log).
pub struct StoreRootfs {
    pub store: ImageStore,
    /// Where pulls are recorded (`image.pull`, actor `system`); set once
    /// the engine exists.
    pub audit: Arc<OnceLock<AuditSink>>,
}

fn provider_error(image: &str, e: ImageError) -> ProviderError {
    ProviderError::Image {
        image: image.to_string(),
        message: e.to_string(),
    }
}

#[async_trait]
impl RootfsSource for StoreRootfs {
    async fn resolve(&self, image: &str) -> Result<ResolvedImage, ProviderError> {
        let last = Mutex::new(Instant::now() - Duration::from_secs(1));
        let pulling = AtomicBool::new(false);
        let done: Mutex<Option<(String, u64, u64)>> = Mutex::new(None);
        let progress = |p: &PullProgress| match p {
            PullProgress::Resolving { .. } => pulling.store(true, Ordering::Relaxed),
            PullProgress::Resolved {
                reference,
                digest,
                layers,
                download_bytes,
                ..
            } => {
                tracing::info!(image = %reference, %digest, layers, download_bytes, "pulling image")
            }
            PullProgress::Layer {
                digest,
                downloaded,
                total,
                ..
            } => {
                let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
                if l.elapsed() >= Duration::from_secs(1) || downloaded == total {
                    *l = Instant::now();
                    tracing::info!(layer = %digest, downloaded, total, "pulling layer");
                }
            }
            PullProgress::Done {
                reference,
                downloaded,
                size,
                elapsed,
                digest,
            } => {
                *done.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((digest.clone(), *downloaded, *size));
                tracing::info!(image = %reference, downloaded, size,
                    ms = elapsed.as_millis() as u64, "image pulled")
            }
            _ => {}
        };
        let res = self.store.ensure(image, &progress).await;
        if pulling.load(Ordering::Relaxed) {
            if let Some(sink) = self.audit.get() {
                let mut ev = AuditEvent::system("image.pull", image);
                match (&res, done.lock().unwrap_or_else(|p| p.into_inner()).take()) {
                    (Ok(_), Some((digest, downloaded, size))) => {
                        ev = ev
                            .detail("digest", digest)
                            .detail("downloaded", downloaded)
                            .detail("size", size);
                    }
                    (Err(e), _) => ev = ev.failed("provider_error").detail("error", e.to_string()),
                    _ => {}
                }
                sink.send(ev);
            }
        }
        let info = res.map_err(|e| provider_error(image, e))?;
        Ok(ResolvedImage {
            layers: info.layers,
            env: info.config.env,
            working_dir: info.config.working_dir,
        })
    }
}
