//! Where sandbox root filesystems come from.
//!
//! The provider only needs, per image name, the image's layers as extracted
//! directories (bottom first, whiteouts already in overlayfs form) and the
//! image's environment and working directory. [`RootfsSource`] is that
//! contract; [`DirRootfs`] is the simplest implementation (fixed directories).

use async_trait::async_trait;
use stacyvm_providers::ProviderError;
use std::collections::HashMap;
use std::path::PathBuf;

/// An image ready to be mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedImage {
    /// Extracted layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// The image's environment (`KEY=value`); the sandbox's own variables
    /// override it.
    pub env: Vec<String>,
    /// The image's working directory, if it sets one.
    pub working_dir: Option<String>,
}

/// Resolves image names to extracted layers.
#[async_trait]
pub trait RootfsSource: Send + Sync {
    /// The layers and configuration of `image`. A missing image is
    /// [`ProviderError::Image`].
    async fn resolve(&self, image: &str) -> Result<ResolvedImage, ProviderError>;
}

/// A [`RootfsSource`] that maps image names to fixed directories, each used
/// as a single read-only layer.
#[derive(Debug, Clone, Default)]
pub struct DirRootfs {
    images: HashMap<String, ResolvedImage>,
}

impl DirRootfs {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Map `image` to the directory `dir` with the given environment.
    pub fn with_image(
        mut self,
        image: impl Into<String>,
        dir: impl Into<PathBuf>,
        env: Vec<String>,
    ) -> Self {
        self.images.insert(
            image.into(),
            ResolvedImage {
                layers: vec![dir.into()],
                env,
                working_dir: None,
            },
        );
        self
    }

    /// Map `image` to a full [`ResolvedImage`] (several layers…).
    pub fn with_resolved(mut self, image: impl Into<String>, resolved: ResolvedImage) -> Self {
        self.images.insert(image.into(), resolved);
        self
    }
}

#[async_trait]
impl RootfsSource for DirRootfs {
    async fn resolve(&self, image: &str) -> Result<ResolvedImage, ProviderError> {
        self.images
            .get(image)
            .cloned()
            .ok_or_else(|| ProviderError::Image {
                image: image.to_string(),
                message: "no such image in the directory map".into(),
            })
    }
}
