//! The image store as the native provider's source of root filesystems.

use async_trait::async_trait;
use stacyvm_images::{ImageError, ImageStore, PullProgress};
use stacyvm_native::{ResolvedImage, RootfsSource};
use stacyvm_providers::ProviderError;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Resolves image references to their extracted layers, pulling on first
/// use (with the pull's progress in the server log).
pub struct StoreRootfs {
    pub store: ImageStore,
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
        let progress = |p: &PullProgress| match p {
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
                ..
            } => tracing::info!(image = %reference, downloaded, size,
                ms = elapsed.as_millis() as u64, "image pulled"),
            _ => {}
        };
        let info = self
            .store
            .ensure(image, &progress)
            .await
            .map_err(|e| provider_error(image, e))?;
        Ok(ResolvedImage {
            layers: info.layers,
            env: info.config.env,
            working_dir: info.config.working_dir,
        })
    }
}
