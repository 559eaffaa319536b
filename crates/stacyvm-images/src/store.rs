//! The store itself: directories, records, locking, pull, import, GC.

use crate::error::IoContext;
use crate::extract::{self, ExtractOptions};
use crate::import::DirTarStream;
use crate::manifest::{self, ConfigFile, Descriptor, LayerFormat, Manifest, ManifestKind};
use crate::reference::{validate_digest, Reference};
use crate::registry::{sha256_digest, Endpoint, Registry, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES};
use crate::{
    ImageConfig, ImageError, ImageInfo, ImageSource, PullProgress, StoreOptions, DEFAULT_PATH_ENV,
};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Layers downloaded and extracted at the same time by one pull.
const PARALLEL_LAYERS: usize = 3;
/// Progress of a download is reported at most every this many bytes.
const PROGRESS_STEP: u64 = 256 * 1024;

type Progress<'a> = &'a (dyn Fn(&PullProgress) + Send + Sync);

/// A handle on an image store directory. Cheap to clone.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

struct Inner {
    root: PathBuf,
    registry: Registry,
    extract: ExtractOptions,
    /// Serialises pulls of one reference within this process.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// What [`ImageStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    pub layers_removed: usize,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
}

/// `images/<ref>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageRecord {
    reference: String,
    digest: String,
    /// The platform manifest (differs from `digest` when that is an index).
    manifest_digest: String,
    config_digest: String,
    layers: Vec<LayerRecord>,
    config: ImageConfig,
    size: u64,
    created_at: String,
    source: ImageSource,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerRecord {
    /// `sha256:` of the uncompressed tar; names the directory.
    diff_id: String,
    /// The compressed blob it was pulled as (none for imports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blob: Option<String>,
    size: u64,
}

/// `layers/<hex>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerMeta {
    diff_id: String,
    size: u64,
}

/// An flock on `<root>/lock`, released when dropped.
struct StoreLock(#[allow(dead_code)] File);

fn lock_file(path: &Path, exclusive: bool) -> Result<StoreLock, ImageError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ctx("opening the lock file", path)?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: a valid open file descriptor.
        let rc = unsafe { libc::flock(f.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(StoreLock(f));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(ImageError::io_path("locking", path, e));
        }
    }
}

/// Unique names for temporary files, across processes and threads.
fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temporary path removed when dropped, unless kept.
struct TempPath(Option<PathBuf>);

impl TempPath {
    fn new(p: PathBuf) -> TempPath {
        TempPath(Some(p))
    }
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = remove_tree(&p);
        }
    }
}

/// Remove a file or a directory tree, making read-only directories writable
/// first if needed (when not root).
fn remove_tree(p: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(p);
    }
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_dirs_writable(p);
            std::fs::remove_dir_all(p)
        }
        Err(e) => Err(e),
    }
}

fn make_dirs_writable(p: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            make_dirs_writable(&e.path());
        }
    }
}

/// Write `data` to `path` atomically (temp file in `tmp_dir`, then rename).
fn write_atomic(tmp_dir: &Path, path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let tmp = TempPath::new(tmp_dir.join(unique("write")));
    {
        let mut f = File::create(tmp.path()).ctx("creating", tmp.path())?;
        f.write_all(data).ctx("writing", tmp.path())?;
        f.sync_all().ctx("syncing", tmp.path())?;
    }
    std::fs::rename(tmp.path(), path).ctx("storing", path)?;
    tmp.keep();
    Ok(())
}

/// `docker.io/library/python:3.12` → `docker.io%2Flibrary%2Fpython%3A3.12`.
fn escape_reference(r: &str) -> String {
    let mut out = String::with_capacity(r.len() + 16);
    for b in r.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > 200 {
        // File names are limited to 255 bytes; the record holds the reference.
        format!("h-{}", &sha256_digest(r.as_bytes())[7..])
    } else {
        out
    }
}

fn hex_of(digest: &str) -> Result<&str, ImageError> {
    validate_digest(digest)
        .map_err(|e| ImageError::Corrupt(format!("bad digest {digest:?}: {e}")))?;
    Ok(&digest[7..])
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn image_config(cf: &ConfigFile) -> ImageConfig {
    let c = cf.config.clone().unwrap_or_default();
    ImageConfig {
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.filter(|s| !s.is_empty()),
        user: c.user.filter(|s| !s.is_empty()),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
    }
}

impl ImageStore {
    /// Open (creating if needed) the store at `root`.
    pub fn open(root: &Path, opts: StoreOptions) -> Result<ImageStore, ImageError> {
        for d in ["blobs/sha256", "layers", "images", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).ctx("creating", &p)?;
        }
        let registry = Registry::new(&opts)?;
        let store = ImageStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                registry,
                extract: ExtractOptions::for_current_user(),
                inflight: Mutex::new(HashMap::new()),
            }),
        };
        store.sweep_tmp_if_idle();
        Ok(store)
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// HTTP requests this handle has sent to registries (diagnostics).
    pub fn registry_requests(&self) -> u64 {
        self.inner.registry.requests()
    }

    fn dir(&self, sub: &str) -> PathBuf {
        self.inner.root.join(sub)
    }
    fn tmp_dir(&self) -> PathBuf {
        self.dir("tmp")
    }
    fn layer_dir(&self, hex: &str) -> PathBuf {
        self.dir("layers").join(hex)
    }
    fn layer_meta_path(&self, hex: &str) -> PathBuf {
        self.dir("layers").join(format!("{hex}.json"))
    }
    fn blob_path(&self, hex: &str) -> PathBuf {
        self.dir("blobs/sha256").join(hex)
    }
    fn record_path(&self, reference: &str) -> PathBuf {
        self.dir("images")
            .join(format!("{}.json", escape_reference(reference)))
    }
    fn lock_path(&self) -> PathBuf {
        self.dir("lock")
    }

    fn lock_blocking(&self, exclusive: bool) -> Result<StoreLock, ImageError> {
        lock_file(&self.lock_path(), exclusive)
    }

    async fn lock_async(&self, exclusive: bool) -> Result<StoreLock, ImageError> {
        let path = self.lock_path();
        tokio::task::spawn_blocking(move || lock_file(&path, exclusive))
            .await
            .map_err(|e| ImageError::io("locking the store", io::Error::other(e)))?
    }

    /// Clear `tmp/` when no other user of the store is active.
    fn sweep_tmp_if_idle(&self) {
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.lock_path())
        else {
            return;
        };
        // SAFETY: a valid open file descriptor.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            self.clear_tmp();
        }
    }

    fn clear_tmp(&self) {
        if let Ok(rd) = std::fs::read_dir(self.tmp_dir()) {
            for e in rd.flatten() {
                if let Err(err) = remove_tree(&e.path()) {
                    tracing::warn!(path = %e.path().display(), error = %err, "cannot remove temporary file");
                }
            }
        }
    }

    fn inflight_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = match self.inner.inflight.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.retain(|_, v| Arc::strong_count(v) > 1);
        m.entry(key.to_string()).or_default().clone()
    }

    // ----- reading -----

    fn read_record(&self, path: &Path) -> Result<Option<ImageRecord>, ImageError> {
        match std::fs::read(path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| ImageError::Corrupt(format!("image record {}: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io_path("reading", path, e)),
        }
    }

    fn all_records(&self) -> Result<Vec<(PathBuf, ImageRecord)>, ImageError> {
        let dir = self.dir("images");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).ctx("reading", &dir)? {
            let e = e.ctx("reading", &dir)?;
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match self.read_record(&p) {
                Ok(Some(r)) => out.push((p, r)),
                Ok(None) => {}
                Err(err) => tracing::warn!(error = %err, "skipping unreadable image record"),
            }
        }
        out.sort_by(|a, b| a.1.reference.cmp(&b.1.reference));
        Ok(out)
    }

    /// The record a reference names: by exact reference, or for
    /// `repo@digest` any record of that repository with that digest.
    fn find_record(&self, r: &Reference) -> Result<Option<(PathBuf, ImageRecord)>, ImageError> {
        let key = r.to_string();
        let path = self.record_path(&key);
        if let Some(rec) = self.read_record(&path)? {
            if rec.reference == key {
                return Ok(Some((path, rec)));
            }
        }
        if let Some(d) = &r.digest {
            let repo = r.repository();
            for (p, rec) in self.all_records()? {
                let same_repo = Reference::parse(&rec.reference)
                    .map(|x| x.repository() == repo)
                    .unwrap_or(false);
                if same_repo && (&rec.digest == d || &rec.manifest_digest == d) {
                    return Ok(Some((p, rec)));
                }
            }
        }
        Ok(None)
    }

    fn info(&self, rec: &ImageRecord) -> Result<ImageInfo, ImageError> {
        let layers = rec
            .layers
            .iter()
            .map(|l| Ok(self.layer_dir(hex_of(&l.diff_id)?)))
            .collect::<Result<Vec<_>, ImageError>>()?;
        Ok(ImageInfo {
            reference: rec.reference.clone(),
            digest: rec.digest.clone(),
            layers,
            config: rec.config.clone(),
            size: rec.size,
            created_at: rec.created_at.clone(),
            source: rec.source,
        })
    }

    /// The stored image a reference names, if it is stored (all its layers
    /// present). Never touches the network.
    pub fn get(&self, reference: &str) -> Result<Option<ImageInfo>, ImageError> {
        let r = Reference::parse(reference)?;
        let Some((_, rec)) = self.find_record(&r)? else {
            return Ok(None);
        };
        let info = self.info(&rec)?;
        if let Some(missing) = info.layers.iter().find(|l| !l.is_dir()) {
            tracing::warn!(reference = %rec.reference, layer = %missing.display(), "stored image misses a layer; treating it as absent");
            return Ok(None);
        }
        Ok(Some(info))
    }

    /// Every stored image, sorted by reference.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        self.all_records()?
            .iter()
            .map(|(_, r)| self.info(r))
            .collect()
    }

    // ----- pulling -----

    /// The stored image; pulled only when it is not stored yet. Once stored,
    /// this never touches the network.
    pub async fn ensure(
        &self,
        reference: &str,
        progress: &(dyn Fn(&PullProgress) + Send + Sync),
    ) -> Result<ImageInfo, ImageError> {
        let r = Reference::parse(reference)?;
        if let Some(info) = self.get(reference)? {
            return Ok(info);
        }
        let gate = self.inflight_lock(&r.to_string());
        let _g = gate.lock().await;
        // Someone else may have pulled it while we waited.
        if let Some(info) = self.get(reference)? {
            return Ok(info);
        }
        self.pull_locked(&r, progress).await
    }

    /// Pull an image: always asks the registry for the manifest (so a moved
    /// tag is followed); layers already stored are not downloaded again.
    pub async fn pull(
        &self,
        reference: &str,
        progress: &(dyn Fn(&PullProgress) + Send + Sync),
    ) -> Result<ImageInfo, ImageError> {
        let r = Reference::parse(reference)?;
        let gate = self.inflight_lock(&r.to_string());
        let _g = gate.lock().await;
        self.pull_locked(&r, progress).await
    }

    async fn pull_locked(
        &self,
        r: &Reference,
        progress: Progress<'_>,
    ) -> Result<ImageInfo, ImageError> {
        let reference = r.to_string();
        let started = Instant::now();
        tracing::info!(%reference, "pulling image");
        let result = self.pull_inner(r, progress, started).await;
        match &result {
            Ok((info, downloaded)) => tracing::info!(
                %reference,
                digest = %info.digest,
                layers = info.layers.len(),
                downloaded_bytes = downloaded,
                size_bytes = info.size,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "pulled image"
            ),
            Err(e) => {
                tracing::warn!(%reference, error = %e, elapsed_ms = started.elapsed().as_millis() as u64, "pull failed")
            }
        }
        result.map(|(info, _)| info)
    }

    async fn pull_inner(
        &self,
        r: &Reference,
        progress: Progress<'_>,
        started: Instant,
    ) -> Result<(ImageInfo, u64), ImageError> {
        let reference = r.to_string();
        let _lock = self.lock_async(false).await?;
        let reg = &self.inner.registry;
        let ep = reg.endpoint(r);
        progress(&PullProgress::Resolving {
            reference: reference.clone(),
        });

        let top = reg.manifest(&ep, r.object()).await?;
        let (man, manifest_digest, mut blobs) =
            match manifest::parse_manifest(top.content_type.as_deref(), &top.body)? {
                ManifestKind::Manifest(m) => {
                    (m, top.digest.clone(), vec![(top.digest.clone(), top.body)])
                }
                ManifestKind::Index(index) => {
                    let arch = manifest::host_arch();
                    let desc = manifest::pick_platform(&index, arch).ok_or_else(|| {
                        ImageError::Unsupported(format!(
                            "{reference} has no linux/{arch} image (it has: {})",
                            manifest::platforms(&index)
                        ))
                    })?;
                    if desc.size > MAX_MANIFEST_BYTES {
                        return Err(ImageError::Corrupt(format!(
                            "manifest {} is too large ({} bytes)",
                            desc.digest, desc.size
                        )));
                    }
                    let sub = reg.manifest(&ep, &desc.digest).await?;
                    let m = match manifest::parse_manifest(sub.content_type.as_deref(), &sub.body)?
                    {
                        ManifestKind::Manifest(m) => m,
                        ManifestKind::Index(_) => {
                            return Err(ImageError::Unsupported(
                                "nested image indexes are not supported".to_string(),
                            ))
                        }
                    };
                    (
                        m,
                        sub.digest.clone(),
                        vec![(top.digest.clone(), top.body), (sub.digest, sub.body)],
                    )
                }
            };
        let digest = top.digest;

        // Refuse what cannot be extracted before downloading anything.
        for l in &man.layers {
            if manifest::layer_format(&l.media_type)? == LayerFormat::Zstd {
                return Err(ImageError::Unsupported(format!(
                    "{reference} has zstd-compressed layers ({}); only gzip and plain tar layers are supported",
                    l.digest
                )));
            }
            hex_of(&l.digest)?;
        }

        let config_bytes = reg.blob_bytes(&ep, &man.config, MAX_CONFIG_BYTES).await?;
        let config: ConfigFile = serde_json::from_slice(&config_bytes)
            .map_err(|e| ImageError::Corrupt(format!("image config {}: {e}", man.config.digest)))?;
        check_config(&reference, &man, &config)?;
        blobs.push((man.config.digest.clone(), config_bytes));

        // The layers to fetch: one task per distinct diff id.
        let mut todo: Vec<(Descriptor, String)> = Vec::new();
        let mut seen = HashSet::new();
        let mut download_bytes = 0;
        for (desc, diff_id) in man.layers.iter().zip(&config.rootfs.diff_ids) {
            if seen.insert(diff_id.clone()) {
                if !self.layer_dir(hex_of(diff_id)?).is_dir() {
                    download_bytes += desc.size;
                }
                todo.push((desc.clone(), diff_id.clone()));
            }
        }
        progress(&PullProgress::Resolved {
            reference: reference.clone(),
            digest: digest.clone(),
            layers: man.layers.len(),
            download_bytes,
        });

        let results: Vec<(String, u64, u64)> =
            stream::iter(todo.into_iter().map(|(desc, diff_id)| {
                let ep = &ep;
                async move {
                    let (size, downloaded) =
                        self.fetch_layer(ep, &desc, &diff_id, progress).await?;
                    Ok::<_, ImageError>((diff_id, size, downloaded))
                }
            }))
            .buffer_unordered(PARALLEL_LAYERS)
            .try_collect()
            .await?;
        let sizes: HashMap<String, u64> = results.iter().map(|(d, s, _)| (d.clone(), *s)).collect();
        let downloaded: u64 = results.iter().map(|(_, _, n)| n).sum();

        let tmp = self.tmp_dir();
        for (d, body) in &blobs {
            let path = self.blob_path(hex_of(d)?);
            if !path.exists() {
                write_atomic(&tmp, &path, body)?;
            }
        }
        let layers: Vec<LayerRecord> = man
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .map(|(desc, diff_id)| LayerRecord {
                diff_id: diff_id.clone(),
                blob: Some(desc.digest.clone()),
                size: sizes.get(diff_id).copied().unwrap_or(0),
            })
            .collect();
        // A pull that finds the same image keeps its original time.
        let created_at = match self.read_record(&self.record_path(&reference)) {
            Ok(Some(old)) if old.reference == reference && old.digest == digest => old.created_at,
            _ => now_rfc3339(),
        };
        let record = ImageRecord {
            reference: reference.clone(),
            digest: digest.clone(),
            manifest_digest,
            config_digest: man.config.digest.clone(),
            size: layers.iter().map(|l| l.size).sum(),
            layers,
            config: image_config(&config),
            created_at,
            source: ImageSource::Registry,
        };
        self.write_record(&record)?;
        let info = self.info(&record)?;
        progress(&PullProgress::Done {
            reference,
            digest,
            downloaded,
            size: info.size,
            elapsed: started.elapsed(),
        });
        Ok((info, downloaded))
    }

    /// Make sure one layer is stored; returns (uncompressed size, bytes downloaded).
    async fn fetch_layer(
        &self,
        ep: &Endpoint,
        desc: &Descriptor,
        diff_id: &str,
        progress: Progress<'_>,
    ) -> Result<(u64, u64), ImageError> {
        let hex = hex_of(diff_id)?.to_string();
        if self.layer_dir(&hex).is_dir() {
            let size = self.layer_size(&hex);
            tracing::debug!(layer = %diff_id, "layer already stored");
            progress(&PullProgress::LayerExists {
                digest: desc.digest.clone(),
                size,
            });
            return Ok((size, 0));
        }
        let layer_started = Instant::now();
        let blob = TempPath::new(self.tmp_dir().join(unique("blob")));
        let last = AtomicU64::new(0);
        let total = desc.size;
        let on_bytes = |n: u64| {
            let prev = last.load(Ordering::Relaxed);
            if n >= prev + PROGRESS_STEP || n == total {
                last.store(n, Ordering::Relaxed);
                progress(&PullProgress::Layer {
                    digest: desc.digest.clone(),
                    downloaded: n,
                    total,
                });
            }
        };
        progress(&PullProgress::Layer {
            digest: desc.digest.clone(),
            downloaded: 0,
            total,
        });
        let downloaded = self
            .inner
            .registry
            .download_blob(ep, desc, blob.path(), &on_bytes)
            .await?;
        let download_ms = layer_started.elapsed().as_millis() as u64;
        progress(&PullProgress::Extracting {
            digest: desc.digest.clone(),
        });

        let store = self.clone();
        let expected = diff_id.to_string();
        let blob_digest = desc.digest.clone();
        let size = tokio::task::spawn_blocking(move || -> Result<u64, ImageError> {
            let f = File::open(blob.path()).ctx("opening", blob.path())?;
            let size = store.store_layer(f, Some(&expected))?.1;
            drop(blob);
            Ok(size)
        })
        .await
        .map_err(|e| ImageError::io("extracting a layer", io::Error::other(e)))??;
        tracing::debug!(
            layer = %diff_id,
            blob = %blob_digest,
            compressed_bytes = downloaded,
            size_bytes = size,
            download_ms,
            total_ms = layer_started.elapsed().as_millis() as u64,
            "layer stored"
        );
        progress(&PullProgress::LayerDone {
            digest: desc.digest.clone(),
        });
        Ok((size, downloaded))
    }

    /// Size of a stored layer, from its sidecar file.
    fn layer_size(&self, hex: &str) -> u64 {
        std::fs::read(self.layer_meta_path(hex))
            .ok()
            .and_then(|d| serde_json::from_slice::<LayerMeta>(&d).ok())
            .map(|m| m.size)
            .unwrap_or(0)
    }

    /// Extract a layer stream into `layers/` (blocking). With `expected`, the
    /// uncompressed stream must hash to it. Returns (diff id, size).
    fn store_layer(
        &self,
        reader: impl Read,
        expected: Option<&str>,
    ) -> Result<(String, u64), ImageError> {
        let tmp = TempPath::new(self.tmp_dir().join(unique("layer")));
        std::fs::create_dir(tmp.path()).ctx("creating", tmp.path())?;
        let started = Instant::now();
        let out = extract::extract_layer(reader, tmp.path(), self.inner.extract)?;
        if let Some(expected) = expected {
            if out.diff_id != expected {
                return Err(ImageError::DigestMismatch {
                    expected: expected.to_string(),
                    actual: out.diff_id,
                });
            }
        }
        let hex = hex_of(&out.diff_id)?.to_string();
        let dest = self.layer_dir(&hex);
        tracing::debug!(
            layer = %out.diff_id,
            entries = out.entries,
            whiteouts = out.whiteouts,
            size_bytes = out.size,
            extract_ms = started.elapsed().as_millis() as u64,
            "layer extracted"
        );
        if dest.is_dir() {
            return Ok((out.diff_id, out.size));
        }
        let meta = serde_json::to_vec(&LayerMeta {
            diff_id: out.diff_id.clone(),
            size: out.size,
        })
        .map_err(|e| ImageError::Corrupt(format!("encoding layer metadata: {e}")))?;
        write_atomic(&self.tmp_dir(), &self.layer_meta_path(&hex), &meta)?;
        match std::fs::rename(tmp.path(), &dest) {
            Ok(()) => tmp.keep(),
            // Another pull stored the same layer first.
            Err(e) if dest.is_dir() => {
                tracing::debug!(layer = %out.diff_id, error = %e, "layer stored concurrently");
            }
            Err(e) => return Err(ImageError::io_path("storing the layer", &dest, e)),
        }
        Ok((out.diff_id, out.size))
    }

    fn write_record(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        let data = serde_json::to_vec_pretty(rec)
            .map_err(|e| ImageError::Corrupt(format!("encoding the image record: {e}")))?;
        write_atomic(&self.tmp_dir(), &self.record_path(&rec.reference), &data)
    }

    // ----- importing -----

    /// Import a root filesystem tarball (plain or gzip) as a single-layer
    /// image named `name`. Blocking. Importing the same content again under
    /// the same name changes nothing.
    pub fn import_tar(&self, name: &str, tar: impl Read) -> Result<ImageInfo, ImageError> {
        let r = Reference::parse(name)?;
        if r.digest.is_some() {
            return Err(ImageError::InvalidReference {
                reference: name.to_string(),
                reason: "an imported image is named by a tag, not a digest".to_string(),
            });
        }
        let started = Instant::now();
        let _lock = self.lock_blocking(false)?;
        let (diff_id, size) = self.store_layer(tar, None)?;
        let info = self.record_import(&r, diff_id, size)?;
        tracing::info!(
            reference = %info.reference,
            digest = %info.digest,
            size_bytes = info.size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "imported image"
        );
        Ok(info)
    }

    /// Import a root filesystem directory as a single-layer image (blocking).
    pub fn import_dir(&self, name: &str, dir: &Path) -> Result<ImageInfo, ImageError> {
        Reference::parse(name)?;
        let mut stream = DirTarStream::new(dir)?;
        let res = self.import_tar(name, &mut stream);
        let archived = stream.finish();
        let info = res?;
        archived?;
        Ok(info)
    }

    fn record_import(
        &self,
        r: &Reference,
        diff_id: String,
        size: u64,
    ) -> Result<ImageInfo, ImageError> {
        let config = ConfigFile {
            created: None,
            architecture: manifest::host_arch().to_string(),
            os: "linux".to_string(),
            config: Some(manifest::ContainerConfig {
                env: Some(vec![DEFAULT_PATH_ENV.to_string()]),
                ..Default::default()
            }),
            rootfs: manifest::RootFs {
                kind: "layers".to_string(),
                diff_ids: vec![diff_id.clone()],
            },
        };
        let config_bytes = serde_json::to_vec(&config)
            .map_err(|e| ImageError::Corrupt(format!("encoding the config: {e}")))?;
        let config_digest = sha256_digest(&config_bytes);
        let man = Manifest {
            schema_version: 2,
            media_type: Some(manifest::OCI_MANIFEST.to_string()),
            config: Descriptor {
                media_type: manifest::OCI_CONFIG.to_string(),
                digest: config_digest.clone(),
                size: config_bytes.len() as u64,
                platform: None,
            },
            layers: vec![Descriptor {
                media_type: manifest::OCI_LAYER_TAR.to_string(),
                digest: diff_id.clone(),
                size,
                platform: None,
            }],
        };
        let man_bytes = serde_json::to_vec(&man)
            .map_err(|e| ImageError::Corrupt(format!("encoding the manifest: {e}")))?;
        let digest = sha256_digest(&man_bytes);
        let reference = r.to_string();
        if let Some(existing) = self.read_record(&self.record_path(&reference))? {
            if existing.digest == digest && existing.reference == reference {
                return self.info(&existing);
            }
        }
        let tmp = self.tmp_dir();
        for (d, body) in [(&config_digest, &config_bytes), (&digest, &man_bytes)] {
            let path = self.blob_path(hex_of(d)?);
            if !path.exists() {
                write_atomic(&tmp, &path, body)?;
            }
        }
        let record = ImageRecord {
            reference,
            digest: digest.clone(),
            manifest_digest: digest,
            config_digest,
            layers: vec![LayerRecord {
                diff_id,
                blob: None,
                size,
            }],
            config: image_config(&config),
            size,
            created_at: now_rfc3339(),
            source: ImageSource::Import,
        };
        self.write_record(&record)?;
        self.info(&record)
    }

    // ----- removing -----

    /// Forget an image, then garbage-collect what no image references.
    /// Blocking. [`ImageError::NotFound`] if it is not stored.
    pub fn remove(&self, reference: &str) -> Result<(), ImageError> {
        let r = Reference::parse(reference)?;
        let _lock = self.lock_blocking(true)?;
        let Some((path, rec)) = self.find_record(&r)? else {
            return Err(ImageError::NotFound(format!(
                "{r} is not in the image store"
            )));
        };
        std::fs::remove_file(&path).ctx("removing", &path)?;
        tracing::info!(reference = %rec.reference, digest = %rec.digest, "removed image");
        self.gc_locked()?;
        Ok(())
    }

    /// Remove layers, blobs and temporary files no stored image references.
    /// Blocking; waits for running pulls and imports.
    pub fn gc(&self) -> Result<GcStats, ImageError> {
        let _lock = self.lock_blocking(true)?;
        self.gc_locked()
    }

    fn gc_locked(&self) -> Result<GcStats, ImageError> {
        let mut keep_layers = HashSet::new();
        let mut keep_blobs = HashSet::new();
        for (_, rec) in self.all_records()? {
            for l in &rec.layers {
                keep_layers.insert(hex_of(&l.diff_id)?.to_string());
            }
            for d in [&rec.digest, &rec.manifest_digest, &rec.config_digest] {
                if let Ok(h) = hex_of(d) {
                    keep_blobs.insert(h.to_string());
                }
            }
        }
        let mut stats = GcStats::default();
        // Everything in tmp/ is garbage: nobody else holds the lock.
        self.clear_tmp();

        let layers = self.dir("layers");
        for e in std::fs::read_dir(&layers).ctx("reading", &layers)? {
            let e = e.ctx("reading", &layers)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.strip_suffix(".json").unwrap_or(&name);
            if keep_layers.contains(hex) {
                continue;
            }
            let path = e.path();
            if name.ends_with(".json") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            stats.bytes_freed += self.layer_size(hex);
            // Out of layers/ first, so a half-deleted layer is never visible.
            let doomed = self.tmp_dir().join(unique("gc"));
            std::fs::rename(&path, &doomed).ctx("removing", &path)?;
            remove_tree(&doomed).ctx("removing", &doomed)?;
            stats.layers_removed += 1;
            tracing::debug!(layer = %hex, "removed unreferenced layer");
        }

        let blobs = self.dir("blobs/sha256");
        for e in std::fs::read_dir(&blobs).ctx("reading", &blobs)? {
            let e = e.ctx("reading", &blobs)?;
            if keep_blobs.contains(e.file_name().to_string_lossy().as_ref()) {
                continue;
            }
            let path = e.path();
            stats.bytes_freed += e.metadata().map(|m| m.len()).unwrap_or(0);
            remove_tree(&path).ctx("removing", &path)?;
            stats.blobs_removed += 1;
        }
        tracing::info!(
            layers_removed = stats.layers_removed,
            blobs_removed = stats.blobs_removed,
            bytes_freed = stats.bytes_freed,
            "image store garbage-collected"
        );
        Ok(stats)
    }
}

fn check_config(reference: &str, man: &Manifest, config: &ConfigFile) -> Result<(), ImageError> {
    if config.rootfs.diff_ids.len() != man.layers.len() {
        return Err(ImageError::Corrupt(format!(
            "{reference}: the manifest has {} layers but the config lists {} diff ids",
            man.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    for d in &config.rootfs.diff_ids {
        hex_of(d)?;
    }
    if !config.os.is_empty() && config.os != "linux" {
        return Err(ImageError::Unsupported(format!(
            "{reference} is a {} image, not linux",
            config.os
        )));
    }
    let arch = manifest::host_arch();
    if !config.architecture.is_empty() && config.architecture != arch {
        return Err(ImageError::Unsupported(format!(
            "{reference} is built for {}, this machine is {arch}",
            config.architecture
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::tests::TarBuilder;

    fn store() -> (tempfile::TempDir, ImageStore) {
        let t = tempfile::tempdir().unwrap();
        let s = ImageStore::open(&t.path().join("images"), StoreOptions::default()).unwrap();
        (t, s)
    }

    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn escapes_references() {
        assert_eq!(
            escape_reference("docker.io/library/python:3.12"),
            "docker.io%2Flibrary%2Fpython%3A3.12"
        );
        assert_ne!(escape_reference("a/b:c"), escape_reference("a/b%3Ac"));
        let long = format!("ghcr.io/{}:x", "a".repeat(240));
        let e = escape_reference(&long);
        assert!(e.starts_with("h-") && e.len() == 66, "{e}");
    }

    #[test]
    fn import_is_idempotent() {
        let (_t, s) = store();
        let tar = TarBuilder::default()
            .dir("usr/bin/", 0o755)
            .file("usr/bin/python3", 0o755, b"#!")
            .bytes();
        let a = s
            .import_tar("stacyvm-test/python:bookworm", &tar[..])
            .unwrap();
        assert_eq!(a.reference, "docker.io/stacyvm-test/python:bookworm");
        assert_eq!(a.source, ImageSource::Import);
        assert_eq!(a.layers.len(), 1);
        assert!(a.layers[0].join("usr/bin/python3").is_file());
        assert_eq!(a.config.env, [DEFAULT_PATH_ENV]);
        assert_eq!(a.size, tar.len() as u64);
        // Same bytes, gzip this time: same image, same record, same time.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let gz = TarBuilder::default()
            .dir("usr/bin/", 0o755)
            .file("usr/bin/python3", 0o755, b"#!")
            .gzip();
        let b = s
            .import_tar("stacyvm-test/python:bookworm", &gz[..])
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(count(&s.dir("layers")), 2, "one layer dir and its sidecar");
        assert_eq!(count(&s.dir("images")), 1);
        assert_eq!(count(&s.dir("tmp")), 0, "no temporary leftovers");
        assert_eq!(
            s.get("stacyvm-test/python:bookworm").unwrap(),
            Some(a.clone())
        );
        assert_eq!(
            s.get(&format!("docker.io/stacyvm-test/python@{}", a.digest))
                .unwrap()
                .map(|i| i.reference),
            Some(a.reference.clone()),
            "found by digest"
        );
        // Different content: a new digest.
        let other = TarBuilder::default().file("x", 0o644, b"y").bytes();
        let c = s
            .import_tar("stacyvm-test/python:bookworm", &other[..])
            .unwrap();
        assert_ne!(c.digest, a.digest);
        assert!(s
            .import_tar("stacyvm-test/python@sha256:0000000000000000000000000000000000000000000000000000000000000000", &other[..])
            .is_err());
    }

    #[test]
    fn import_dir_matches_its_content() {
        let (t, s) = store();
        let root = t.path().join("rootfs");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/python3"), b"py").unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        let a = s.import_dir("local/rootfs", &root).unwrap();
        let b = s.import_dir("local/rootfs", &root).unwrap();
        assert_eq!(a, b);
        let l = &a.layers[0];
        assert_eq!(std::fs::read(l.join("usr/bin/python3")).unwrap(), b"py");
        assert_eq!(
            std::fs::read_link(l.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert!(matches!(
            s.import_dir("local/x", &t.path().join("missing")),
            Err(ImageError::Io { .. })
        ));
        assert_eq!(s.list().unwrap().len(), 1);
    }

    #[test]
    fn corrupt_import_stores_nothing() {
        let (_t, s) = store();
        let tar = TarBuilder::default().file("../evil", 0o644, b"x").bytes();
        assert!(matches!(
            s.import_tar("a/b", &tar[..]),
            Err(ImageError::Corrupt(_))
        ));
        assert_eq!(count(&s.dir("layers")), 0);
        assert_eq!(count(&s.dir("images")), 0);
        assert_eq!(count(&s.dir("tmp")), 0);
    }

    #[test]
    fn diff_id_mismatch_is_detected() {
        let (_t, s) = store();
        let tar = TarBuilder::default().file("a", 0o644, b"x").bytes();
        let wrong = format!("sha256:{}", "0".repeat(64));
        match s.store_layer(&tar[..], Some(&wrong)) {
            Err(ImageError::DigestMismatch { expected, actual }) => {
                assert_eq!(expected, wrong);
                assert_eq!(actual, sha256_digest(&tar));
            }
            other => panic!("expected DigestMismatch, got {other:?}"),
        }
        assert_eq!(count(&s.dir("layers")), 0);
        assert_eq!(count(&s.dir("tmp")), 0);
    }

    /// Build a record by hand for an image made of already stored layers.
    fn record(s: &ImageStore, name: &str, diff_ids: &[String]) {
        let rec = ImageRecord {
            reference: Reference::parse(name).unwrap().to_string(),
            digest: sha256_digest(name.as_bytes()),
            manifest_digest: sha256_digest(name.as_bytes()),
            config_digest: sha256_digest(b"cfg"),
            layers: diff_ids
                .iter()
                .map(|d| LayerRecord {
                    diff_id: d.clone(),
                    blob: None,
                    size: 1,
                })
                .collect(),
            config: ImageConfig::default(),
            size: 1,
            created_at: now_rfc3339(),
            source: ImageSource::Registry,
        };
        s.write_record(&rec).unwrap();
    }

    #[test]
    fn gc_keeps_shared_layers() {
        let (_t, s) = store();
        let base = TarBuilder::default().file("base", 0o644, b"b").bytes();
        let top = TarBuilder::default().file("top", 0o644, b"t").bytes();
        let (base_id, _) = s.store_layer(&base[..], None).unwrap();
        let (top_id, _) = s.store_layer(&top[..], None).unwrap();
        record(&s, "test/one", std::slice::from_ref(&base_id));
        record(&s, "test/two", &[base_id.clone(), top_id.clone()]);
        let one = s.get("test/one").unwrap().unwrap();
        let two = s.get("test/two").unwrap().unwrap();
        assert_eq!(
            one.layers[0], two.layers[0],
            "the base layer is stored once"
        );
        assert_eq!(count(&s.dir("layers")), 4);

        s.remove("test/two").unwrap();
        assert!(s.get("test/two").unwrap().is_none());
        assert!(one.layers[0].is_dir(), "shared base layer survives");
        assert!(!two.layers[1].exists(), "top layer collected");
        assert_eq!(count(&s.dir("layers")), 2);

        s.remove("test/one").unwrap();
        assert_eq!(count(&s.dir("layers")), 0);
        assert!(matches!(s.remove("test/one"), Err(ImageError::NotFound(_))));
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn gc_removes_unreferenced_blobs_and_tmp() {
        let (_t, s) = store();
        let tar = TarBuilder::default().file("f", 0o644, b"1").bytes();
        let info = s.import_tar("test/keep", &tar[..]).unwrap();
        std::fs::write(s.blob_path(&"a".repeat(64)), b"orphan").unwrap();
        std::fs::create_dir(s.tmp_dir().join("stale")).unwrap();
        let stats = s.gc().unwrap();
        assert_eq!(stats.blobs_removed, 1);
        assert_eq!(stats.layers_removed, 0);
        assert_eq!(count(&s.tmp_dir()), 0);
        assert_eq!(count(&s.dir("blobs/sha256")), 2, "config and manifest kept");
        assert!(s.get(&info.reference).unwrap().is_some());
    }

    #[test]
    fn missing_layer_means_not_stored() {
        let (_t, s) = store();
        let tar = TarBuilder::default().file("f", 0o644, b"1").bytes();
        let info = s.import_tar("test/x", &tar[..]).unwrap();
        remove_tree(&info.layers[0]).unwrap();
        assert!(s.get("test/x").unwrap().is_none());
    }

    #[test]
    fn lowerdir_is_top_first() {
        let info = ImageInfo {
            reference: String::new(),
            digest: String::new(),
            layers: vec!["/l/a".into(), "/l/b".into()],
            config: ImageConfig::default(),
            size: 0,
            created_at: String::new(),
            source: ImageSource::Import,
        };
        assert_eq!(info.overlay_lowerdir(), "/l/b:/l/a");
    }

    #[test]
    fn locks_exclude_across_handles() {
        let (_t, s) = store();
        let shared = s.lock_blocking(false).unwrap();
        let other = s.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            let _x = other.lock_blocking(true).unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "exclusive lock granted while a shared one is held"
        );
        drop(shared);
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        h.join().unwrap();
    }
}
