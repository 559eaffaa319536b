//! An OCI image store for providers that assemble a sandbox's root
//! filesystem themselves with overlayfs.
//!
//! The store pulls images from any registry that speaks the Distribution API
//! v2 / OCI distribution spec (Docker Hub with its bearer-token auth, ghcr.io,
//! a local `registry:2`…), imports root filesystems from tarballs or
//! directories, and keeps every layer **extracted in its own directory**,
//! content-addressed and shared between images, with whiteouts already in
//! overlayfs format. A provider mounts an image as
//!
//! ```text
//! mount -t overlay overlay -o lowerdir=<info.overlay_lowerdir()>,upperdir=U,workdir=W <rootfs>
//! ```
//!
//! ```no_run
//! # async fn demo() -> Result<(), stacyvm_images::ImageError> {
//! use stacyvm_images::{ImageStore, StoreOptions};
//! let store = ImageStore::open("/var/lib/stacyvm/images".as_ref(), StoreOptions::default())?;
//! let info = store.ensure("python:3.12", &|_p| {}).await?;
//! assert_eq!(info.reference, "docker.io/library/python:3.12");
//! println!("layers (bottom first): {:?}", info.layers);
//! # Ok(()) }
//! ```
//!
//! # API
//!
//! * [`ImageStore::open`] creates or opens a store directory.
//! * [`ImageStore::pull`] always asks the registry (a moved tag is followed),
//!   downloads only the layers that are not stored yet, and reports
//!   [`PullProgress`].
//! * [`ImageStore::ensure`] returns the stored image and pulls only when it is
//!   missing: once stored, it never touches the network.
//! * [`ImageStore::get`], [`ImageStore::list`] read the store.
//! * [`ImageStore::import_tar`] / [`ImageStore::import_dir`] turn a root
//!   filesystem (tarball, plain or gzip, or a directory) into a single-layer
//!   image whose digest is computed from its content: importing the same
//!   content again changes nothing.
//! * [`ImageStore::remove`] forgets an image and garbage-collects the layers
//!   and blobs no other image references ([`ImageStore::gc`]).
//!
//! The async methods need a Tokio runtime; the others block (file system
//! work) and belong on `spawn_blocking` in async code. [`ImageStore`] is a
//! cheap handle (`Clone`).
//!
//! References are normalised like the Docker CLI does ([`Reference`]):
//! `python:3.12` is `docker.io/library/python:3.12`, fetched from
//! [`StoreOptions::default_registry`] (`registry-1.docker.io`). Imported
//! images are named the same way (`stacyvm-test/python:bookworm` is stored as
//! `docker.io/stacyvm-test/python:bookworm`), so `ensure` finds them without
//! a registry.
//!
//! # On-disk layout
//!
//! ```text
//! <root>/lock                  flock(2): shared while pulling/importing, exclusive while removing/GC
//! <root>/blobs/sha256/<hex>    manifests, indexes and image configs as fetched (or synthesised
//!                              for imports); compressed layer blobs are not kept: they are
//!                              downloaded into tmp/, extracted, verified and deleted
//! <root>/layers/<hex>/         one extracted layer; <hex> is its diff id, the sha256 of the
//!                              uncompressed tar (so the same layer is stored once, however it
//!                              was compressed, and shared by every image that has it)
//! <root>/layers/<hex>.json     the layer's size, written before the directory appears
//! <root>/images/<ref>.json     one image: reference, digests, layer ids, config, size, time;
//!                              <ref> is the normalised reference, percent-escaped
//! <root>/tmp/                  downloads and extractions in progress
//! ```
//!
//! Everything appears atomically: layers are extracted into `tmp/` and
//! renamed into `layers/`, records and blobs are written to a temporary file
//! and renamed. Several processes (the server and the CLI) may use one store:
//! pulls and imports hold a shared lock on `<root>/lock` and can run side by
//! side (two pulls of one layer both extract it, the second rename loses and
//! its copy is dropped); `remove` and `gc` hold it exclusively, so they never
//! delete a layer an unfinished pull is about to reference. Through one
//! handle (and its clones), concurrent pulls of the same reference are
//! serialised, so many `ensure` calls for one image download it once.
//!
//! A layer in use by a mounted overlay must not be garbage-collected: the
//! caller only removes images no sandbox uses.
//!
//! # Integrity
//!
//! Every blob is hashed while it streams to disk and refused
//! ([`ImageError::DigestMismatch`]) unless it matches its descriptor; a
//! manifest fetched by digest must hash to it (by tag, to the registry's
//! `Docker-Content-Digest`, when sent); and the uncompressed stream of each
//! layer must hash to the diff id listed in the image config. Nothing of a
//! failed pull is stored.
//!
//! # Extraction
//!
//! Tar entries (plain or gzip; zstd is [`ImageError::Unsupported`]) keep
//! their mode bits, mtimes and, when running as root, owners and device
//! nodes (skipped otherwise). No entry can be written outside its layer:
//! `..` and absolute paths are refused, symlinks are never followed while
//! extracting, hard links must stay in the layer. OCI whiteouts are converted
//! to overlayfs ones (`.wh.<name>` → a 0:0 character device `<name>`,
//! `.wh..wh..opq` → `trusted.overlay.opaque=y` on the directory); that needs
//! root, and without it a layer with whiteouts is `Unsupported`.
//!
//! # Registries
//!
//! HTTPS with rustls (ring) and the Mozilla roots of `webpki-roots`. Plain
//! HTTP only for registries on loopback (`localhost`, `127.0.0.0/8`, `[::1]`)
//! and those listed in [`StoreOptions::insecure_registries`]. On `401` the
//! `WWW-Authenticate` challenge is answered: a bearer token from the realm
//! (anonymous, or with [`StoreOptions::credentials`]) or basic auth.
//! Redirects (blob CDNs) are followed without the registry's credentials.
//! For an image index the `linux/<host arch>` image is taken.

mod error;
mod extract;
mod import;
mod manifest;
mod reference;
mod registry;
mod store;

pub use error::ImageError;
pub use extract::{is_opaque, is_whiteout};
pub use reference::Reference;
pub use store::{GcStats, ImageStore};

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// The registry Docker Hub images are fetched from.
pub const DEFAULT_REGISTRY: &str = "registry-1.docker.io";

/// The `PATH` of imported images.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How the store reaches registries.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Registries (`host:port` or `host`) spoken to over plain HTTP.
    /// Registries on loopback (`localhost`, `127.0.0.0/8`, `[::1]`) always are.
    pub insecure_registries: Vec<String>,
    /// The host that `docker.io` references (and so short names like
    /// `python:3.12`) are fetched from; `registry-1.docker.io`, or a mirror.
    pub default_registry: String,
    /// Credentials per registry (`docker.io`, `ghcr.io`, `host:port`), used
    /// when a registry asks for them. Anonymous access needs none.
    pub credentials: HashMap<String, Credentials>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            insecure_registries: Vec::new(),
            default_registry: DEFAULT_REGISTRY.to_string(),
            credentials: HashMap::new(),
        }
    }
}

/// A registry login.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Normalised reference, e.g. `docker.io/library/python:3.12`.
    pub reference: String,
    /// `sha256:…` of what the reference resolved to: the image index for a
    /// multi-platform image, else the manifest. `repository@digest` names
    /// the same image. For imports, the digest of a synthesised manifest.
    pub digest: String,
    /// Extracted layer directories, **bottom first** (overlayfs wants them
    /// the other way round: see [`ImageInfo::overlay_lowerdir`]).
    pub layers: Vec<PathBuf>,
    pub config: ImageConfig,
    /// Sum of the uncompressed layer sizes, in bytes.
    pub size: u64,
    /// When the image was stored (RFC 3339, UTC).
    pub created_at: String,
    /// Pulled from a registry or imported.
    pub source: ImageSource,
}

impl ImageInfo {
    /// The `lowerdir=` value for overlayfs: layers top first, `:`-separated.
    pub fn overlay_lowerdir(&self) -> String {
        self.layers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// Where an image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageSource {
    Registry,
    Import,
}

/// The parts of the image config a sandbox needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=value` pairs.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// What a pull is doing; `digest` of layer events is the layer blob's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PullProgress {
    /// Asking the registry for the manifest.
    Resolving { reference: String },
    /// The manifest is known.
    Resolved {
        reference: String,
        digest: String,
        layers: usize,
        /// Compressed bytes still to download (layers not stored yet).
        download_bytes: u64,
    },
    /// This layer is stored already; nothing to download.
    LayerExists { digest: String, size: u64 },
    /// Downloading: `downloaded` of `total` compressed bytes.
    Layer {
        digest: String,
        downloaded: u64,
        total: u64,
    },
    /// Downloaded and verified; unpacking.
    Extracting { digest: String },
    /// Stored.
    LayerDone { digest: String },
    /// The image is stored.
    Done {
        reference: String,
        digest: String,
        /// Compressed bytes downloaded by this pull.
        downloaded: u64,
        /// Uncompressed size of the image.
        size: u64,
        elapsed: Duration,
    },
}
