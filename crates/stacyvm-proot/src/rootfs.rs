//! Sandbox root filesystems as plain directories.
//!
//! PRoot needs one directory to use as `/`. An image's layers (bottom first,
//! whiteouts in overlayfs form, as [`stacyvm_native::RootfsSource`] gives
//! them) are flattened once per image into a *base* under the provider's
//! state directory ([`BaseCache`]), and every sandbox gets its own copy of
//! the base ([`BaseCache::materialize`]: a copy made ahead of time, or one
//! made by [`copy_tree`] there and then), so sandboxes never share a
//! writable inode with each other or with the image store.
//!
//! Flattening applies each layer on top of the result of the ones below it:
//!
//! * a character device `0:0` is a whiteout: the path is deleted;
//! * a directory with `trusted.overlay.opaque=y` replaces the directory
//!   below it (its lower contents are discarded);
//! * anything else replaces what was at its path (a directory merges into a
//!   directory below it).
//!
//! Owners, modes, timestamps, extended attributes (except `trusted.overlay.*`),
//! symlinks, device nodes, FIFOs and hard links (within one tree) are kept.
//! Regular files are copied with `copy_file_range` (reflinks on file systems
//! that support them).

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::sys;

/// The opaque-directory marker of overlayfs.
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
/// Extended attributes that belong to overlayfs and are never copied.
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
/// Version of the base layout; part of every base's key.
const BASE_FORMAT: u8 = 1;

/// Why a root filesystem could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("the image has no layers")]
    NoLayers,
    #[error("layer {0} is not an absolute path to a directory")]
    BadLayer(PathBuf),
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Whiteouts applied.
    pub whiteouts: u64,
    /// Entries that could not be recreated (device nodes without the
    /// privilege to make them, sockets).
    pub skipped: u64,
}

/// Flatten `layers` (bottom first) into the new directory `dest`.
pub fn flatten(layers: &[PathBuf], dest: &Path) -> Result<CopyStats, RootfsError> {
    if layers.is_empty() {
        return Err(RootfsError::NoLayers);
    }
    for l in layers {
        if !l.is_absolute() || !l.is_dir() {
            return Err(RootfsError::BadLayer(l.clone()));
        }
    }
    copy_trees(layers, dest, 0o755, true)
}

/// Copy the tree `src` to the new directory `dest` (no whiteout handling).
pub fn copy_tree(src: &Path, dest: &Path) -> Result<CopyStats, RootfsError> {
    let m = fs::symlink_metadata(src).map_err(io_err("stat", src))?;
    if !m.is_dir() {
        return Err(RootfsError::BadLayer(src.to_path_buf()));
    }
    copy_trees(&[src], dest, 0o700, false)
}

/// Copy the trees `srcs` one over the other (bottom first; `layers`: with
/// whiteouts and opaque markers) into the new directory `dest`, made with
/// `mode`; each tree's root passes its metadata on to `dest` in turn.
fn copy_trees(
    srcs: &[impl AsRef<Path>],
    dest: &Path,
    mode: u32,
    layers: bool,
) -> Result<CopyStats, RootfsError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(dest)
        .map_err(io_err("create", dest))?;
    let mut c = Copier::new(layers);
    for src in srcs {
        let src = src.as_ref();
        c.links.clear();
        c.merge(src, dest)?;
        let m = fs::symlink_metadata(src).map_err(io_err("stat", src))?;
        c.apply_meta(src, dest, &m)?;
    }
    Ok(c.stats)
}

/// Make sure the paths PRoot binds over exist in `root`: `/.stacyvm/run`
/// (a directory), `/.stacyvm/stacyvm-agent` (a file), `/proc`, `/dev` and
/// `/tmp`. PRoot refuses to bind onto a path that is missing.
pub fn prepare_mount_points(root: &Path) -> Result<(), RootfsError> {
    use stacyvm_agent_proto::{AGENT_PATH_IN_SANDBOX, RUN_DIR_IN_SANDBOX};
    let rel = |p: &str| root.join(p.trim_start_matches('/'));
    let run = rel(RUN_DIR_IN_SANDBOX);
    let agent = rel(AGENT_PATH_IN_SANDBOX);
    let reserved = run.parent().unwrap_or(root).to_path_buf();
    if fs::symlink_metadata(&reserved).is_ok_and(|m| !m.is_dir()) {
        fs::remove_file(&reserved).map_err(io_err("remove", &reserved))?;
    }
    for d in [&reserved, &run] {
        ensure_dir(d, 0o755)?;
    }
    match fs::symlink_metadata(&agent) {
        Ok(m) if m.is_file() => {}
        Ok(m) => {
            if m.is_dir() {
                fs::remove_dir_all(&agent).map_err(io_err("remove", &agent))?;
            } else {
                fs::remove_file(&agent).map_err(io_err("remove", &agent))?;
            }
            create_empty(&agent)?;
        }
        Err(_) => create_empty(&agent)?,
    }
    for (d, mode) in [("proc", 0o555), ("dev", 0o755), ("tmp", 0o1777)] {
        let p = root.join(d);
        // A symlink (e.g. /tmp -> /var/tmp) is left alone.
        if fs::symlink_metadata(&p).is_err() {
            ensure_dir(&p, mode)?;
            if mode & 0o1000 != 0 {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                    .map_err(io_err("chmod", &p))?;
            }
        }
    }
    Ok(())
}

fn ensure_dir(p: &Path, mode: u32) -> Result<(), RootfsError> {
    match fs::DirBuilder::new().mode(mode).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => Ok(()),
        Err(e) => Err(io_err("create", p)(e)),
    }
}

fn create_empty(p: &Path) -> Result<(), RootfsError> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(p)
        .map(|_| ())
        .map_err(io_err("create", p))
}

/// Remove whatever is at `p` (a file, a symlink or a whole directory).
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Remove everything inside the directory `p`.
fn clear_dir(p: &Path) -> io::Result<()> {
    for e in fs::read_dir(p)? {
        remove_any(&e?.path())?;
    }
    Ok(())
}

fn c_path(p: &Path) -> Result<CString, RootfsError> {
    sys::cstr(p).map_err(io_err("encode", p))
}

/// The value of one extended attribute of `p` (not following symlinks).
fn lgetxattr(p: &CString, name: &CString) -> io::Result<Vec<u8>> {
    loop {
        // SAFETY: valid C strings; a null buffer asks for the size.
        let size = unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: the buffer holds `buf.len()` bytes.
        let n = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

/// Names of the extended attributes of `p` (not following symlinks).
fn llistxattr(p: &CString) -> io::Result<Vec<CString>> {
    loop {
        // SAFETY: valid C string; a null buffer asks for the size.
        let size = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: the buffer holds `buf.len()` bytes.
        let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|n| !n.is_empty())
                .filter_map(|n| CString::new(n).ok())
                .collect());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

fn is_opaque(p: &Path) -> bool {
    let (Ok(path), Ok(name)) = (sys::cstr(p), CString::new(OPAQUE_XATTR)) else {
        return false;
    };
    lgetxattr(&path, &name).is_ok_and(|v| v == b"y")
}

/// Errors that mean "this attribute cannot be recreated here" rather than
/// a failure of the copy (no xattr support, no privilege for a namespace).
fn xattr_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTSUP) | Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EINVAL)
    )
}

struct Copier {
    /// Apply whiteouts and opaque markers (flattening layers).
    layers: bool,
    /// Whether owners can be set (the copier runs as root).
    root: bool,
    /// First copy of each multiply-linked source inode.
    links: HashMap<(u64, u64), PathBuf>,
    stats: CopyStats,
}

impl Copier {
    fn new(layers: bool) -> Copier {
        Copier {
            layers,
            root: sys::geteuid() == 0,
            links: HashMap::new(),
            stats: CopyStats::default(),
        }
    }

    /// Apply the contents of the directory `src` onto the directory `dst`.
    fn merge(&mut self, src: &Path, dst: &Path) -> Result<(), RootfsError> {
        let rd = fs::read_dir(src).map_err(io_err("read", src))?;
        for entry in rd {
            let entry = entry.map_err(io_err("read", src))?;
            let s = entry.path();
            let d = dst.join(entry.file_name());
            let m = fs::symlink_metadata(&s).map_err(io_err("stat", &s))?;
            let ft = m.file_type();
            if self.layers && ft.is_char_device() && m.rdev() == 0 {
                remove_any(&d).map_err(io_err("apply a whiteout at", &d))?;
                self.stats.whiteouts += 1;
                continue;
            }
            let existing = fs::symlink_metadata(&d).ok();
            if ft.is_dir() {
                match existing {
                    Some(e) if e.is_dir() => {
                        if !self.root && e.mode() & 0o700 != 0o700 {
                            // Without root, a read-only lower directory
                            // could not take new entries; its final mode is
                            // set once the merge is done.
                            use std::os::unix::fs::PermissionsExt;
                            fs::set_permissions(&d, fs::Permissions::from_mode(e.mode() | 0o700))
                                .map_err(io_err("chmod", &d))?;
                        }
                        if self.layers && is_opaque(&s) {
                            clear_dir(&d).map_err(io_err("clear", &d))?;
                        }
                    }
                    Some(_) => {
                        fs::remove_file(&d).map_err(io_err("replace", &d))?;
                        self.mkdir(&d)?;
                    }
                    None => self.mkdir(&d)?,
                }
                self.merge(&s, &d)?;
                self.apply_meta(&s, &d, &m)?;
                continue;
            }
            if existing.is_some() {
                remove_any(&d).map_err(io_err("replace", &d))?;
            }
            if m.nlink() > 1 {
                if let Some(first) = self.links.get(&(m.dev(), m.ino())) {
                    fs::hard_link(first, &d).map_err(io_err("link", &d))?;
                    continue;
                }
            }
            if !self.create(&s, &d, &m)? {
                continue;
            }
            self.apply_meta(&s, &d, &m)?;
            if m.nlink() > 1 {
                self.links.insert((m.dev(), m.ino()), d);
            }
        }
        Ok(())
    }

    fn mkdir(&mut self, d: &Path) -> Result<(), RootfsError> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(d)
            .map_err(io_err("create", d))?;
        self.stats.dirs += 1;
        Ok(())
    }

    /// Recreate the non-directory `s` at `d`; false if it was skipped.
    fn create(&mut self, s: &Path, d: &Path, m: &Metadata) -> Result<bool, RootfsError> {
        let ft = m.file_type();
        if ft.is_file() {
            let mut from = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(s)
                .map_err(io_err("open", s))?;
            let mut to = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(d)
                .map_err(io_err("create", d))?;
            let n = io::copy(&mut from, &mut to).map_err(io_err("copy", s))?;
            self.stats.files += 1;
            self.stats.bytes += n;
            return Ok(true);
        }
        if ft.is_symlink() {
            let target = fs::read_link(s).map_err(io_err("read the link", s))?;
            std::os::unix::fs::symlink(&target, d).map_err(io_err("create the link", d))?;
            self.stats.files += 1;
            return Ok(true);
        }
        if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            let path = c_path(d)?;
            // SAFETY: valid C string.
            let rc = unsafe {
                libc::mknod(
                    path.as_ptr(),
                    m.mode() as libc::mode_t,
                    m.rdev() as libc::dev_t,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EPERM) && !ft.is_fifo() {
                    tracing::debug!(path = %d.display(), "no privilege to create a device node; skipped");
                    self.stats.skipped += 1;
                    return Ok(false);
                }
                return Err(io_err("create", d)(e));
            }
            self.stats.files += 1;
            return Ok(true);
        }
        // Sockets cannot be copied; they are meaningless without their server.
        self.stats.skipped += 1;
        Ok(false)
    }

    /// Owner, mode, extended attributes and times of `s` onto `d`.
    fn apply_meta(&mut self, s: &Path, d: &Path, m: &Metadata) -> Result<(), RootfsError> {
        let dst = c_path(d)?;
        let symlink = m.file_type().is_symlink();
        // SAFETY: valid C string.
        if unsafe { libc::lchown(dst.as_ptr(), m.uid(), m.gid()) } < 0 {
            let e = io::Error::last_os_error();
            if self.root || e.raw_os_error() != Some(libc::EPERM) {
                return Err(io_err("chown", d)(e));
            }
        }
        self.copy_xattrs(s, &dst, d)?;
        if !symlink {
            // After chown, which clears set-id bits.
            // SAFETY: valid C string.
            if unsafe { libc::chmod(dst.as_ptr(), (m.mode() & 0o7777) as libc::mode_t) } < 0 {
                return Err(io_err("chmod", d)(io::Error::last_os_error()));
            }
        }
        let times = [
            libc::timespec {
                tv_sec: m.atime() as libc::time_t,
                tv_nsec: m.atime_nsec() as _,
            },
            libc::timespec {
                tv_sec: m.mtime() as libc::time_t,
                tv_nsec: m.mtime_nsec() as _,
            },
        ];
        // SAFETY: valid C string and two timespecs.
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                dst.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc < 0 {
            return Err(io_err("set the times of", d)(io::Error::last_os_error()));
        }
        Ok(())
    }

    fn copy_xattrs(&mut self, s: &Path, dst: &CString, d: &Path) -> Result<(), RootfsError> {
        let src = c_path(s)?;
        let names = match llistxattr(&src) {
            Ok(n) => n,
            Err(e) if xattr_unsupported(&e) => return Ok(()),
            Err(e) => return Err(io_err("list the attributes of", s)(e)),
        };
        for name in names {
            if name.as_bytes().starts_with(OVERLAY_XATTR_PREFIX) {
                continue;
            }
            let value = match lgetxattr(&src, &name) {
                Ok(v) => v,
                Err(e) if xattr_unsupported(&e) || e.raw_os_error() == Some(libc::ENODATA) => {
                    continue
                }
                Err(e) => return Err(io_err("read the attributes of", s)(e)),
            };
            // SAFETY: valid C strings; the value buffer holds `value.len()` bytes.
            let rc = unsafe {
                libc::lsetxattr(
                    dst.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if !xattr_unsupported(&e) {
                    return Err(io_err("set the attributes of", d)(e));
                }
                tracing::debug!(path = %d.display(), attr = ?name, error = %e, "extended attribute not copied");
            }
        }
        Ok(())
    }
}

/// FNV-1a, 64 bits: a stable hash for cache keys.
fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}

/// The cache key of an image's layers: their paths and the identity of each
/// layer directory (device, inode, modification time), so a layer replaced
/// at the same path makes a new base.
pub fn base_key(layers: &[PathBuf]) -> Result<String, RootfsError> {
    if layers.is_empty() {
        return Err(RootfsError::NoLayers);
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    fnv1a(&mut h, &[BASE_FORMAT]);
    for l in layers {
        if !l.is_absolute() {
            return Err(RootfsError::BadLayer(l.clone()));
        }
        let m = fs::metadata(l).map_err(io_err("stat", l))?;
        if !m.is_dir() {
            return Err(RootfsError::BadLayer(l.clone()));
        }
        fnv1a(&mut h, l.as_os_str().as_bytes());
        fnv1a(&mut h, &[0]);
        for n in [m.dev(), m.ino(), m.mtime() as u64, m.mtime_nsec() as u64] {
            fnv1a(&mut h, &n.to_le_bytes());
        }
    }
    Ok(format!("{h:016x}"))
}

/// A flattened image in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// Cache key ([`base_key`]).
    pub key: String,
    /// The flattened tree (never handed to a sandbox itself).
    pub root: PathBuf,
    /// `<cache>/<key>/spares`: ready copies of `root`.
    spares: PathBuf,
}

/// Flattened images, one directory per set of layers, each with a few
/// ready-made copies so a create only has to rename one into place:
///
/// ```text
/// <dir>/<key>/rootfs             the flattened tree, mount points prepared
/// <dir>/<key>/layers.json        the layer directories it was made from
/// <dir>/<key>/spares/<n>/        ready copies of rootfs
/// <dir>/<key>/spares/.tmp-<owner>-<n>/  a copy being made
/// <dir>/.build-<owner>-<n>/      a base being made (renamed to <key> when done)
/// ```
pub struct BaseCache {
    dir: PathBuf,
    owner: String,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Ready copies to keep per image.
    spares: AtomicUsize,
    /// Keys whose copies are being made right now.
    filling: Mutex<HashSet<String>>,
}

/// A unique-enough suffix for names made by this process.
fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

impl BaseCache {
    /// A cache in `dir` (created if missing) keeping `spares` ready copies
    /// per image; `owner` names this process's unfinished builds.
    pub fn new(dir: PathBuf, owner: &str, spares: usize) -> Result<BaseCache, RootfsError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create", &dir))?;
        Ok(BaseCache {
            dir,
            owner: owner.to_string(),
            locks: Mutex::new(HashMap::new()),
            spares: AtomicUsize::new(spares),
            filling: Mutex::new(HashSet::new()),
        })
    }

    fn base(&self, key: String) -> Base {
        let dir = self.dir.join(&key);
        Base {
            key,
            root: dir.join("rootfs"),
            spares: dir.join("spares"),
        }
    }

    /// The flattened root of `layers`, made now if it is not cached.
    pub async fn get(&self, layers: &[PathBuf]) -> Result<Base, RootfsError> {
        let key = {
            let layers = layers.to_vec();
            tokio::task::spawn_blocking(move || base_key(&layers))
                .await
                .map_err(|e| RootfsError::Io {
                    op: "hash",
                    path: PathBuf::new(),
                    source: io::Error::other(e.to_string()),
                })??
        };
        let base = self.base(key);
        if base.root.is_dir() {
            return Ok(base);
        }
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(locks.entry(base.key.clone()).or_default())
        };
        let _held = lock.lock().await;
        if base.root.is_dir() {
            return Ok(base);
        }
        let dir = self.dir.clone();
        let owner = self.owner.clone();
        let key = base.key.clone();
        let layers = layers.to_vec();
        tokio::task::spawn_blocking(move || build_base(&dir, &owner, &key, &layers))
            .await
            .map_err(|e| RootfsError::Io {
                op: "flatten",
                path: base.root.clone(),
                source: io::Error::other(e.to_string()),
            })??;
        Ok(base)
    }

    /// Give `dest` (which must not exist) its own copy of `base`: a ready
    /// copy renamed into place when there is one, else a copy made now.
    /// Returns whether a ready copy was used. Blocking.
    pub fn materialize(&self, base: &Base, dest: &Path) -> Result<bool, RootfsError> {
        if let Ok(rd) = fs::read_dir(&base.spares) {
            for e in rd.flatten() {
                if e.file_name().as_bytes().starts_with(b".") {
                    continue;
                }
                // Whoever renames it first owns it.
                if fs::rename(e.path(), dest).is_ok() {
                    return Ok(true);
                }
            }
        }
        copy_tree(&base.root, dest)?;
        Ok(false)
    }

    /// How many ready copies to keep per image (0 turns them off; extra ones
    /// are removed by the next [`BaseCache::refill`]).
    pub fn set_spares(&self, n: usize) {
        self.spares.store(n, Ordering::Release);
    }

    /// Make ready copies of `base` in a background thread until there are
    /// enough (at most one thread per image).
    pub fn refill(self: &Arc<Self>, base: &Base) {
        {
            let mut filling = self.filling.lock().unwrap_or_else(|p| p.into_inner());
            if !filling.insert(base.key.clone()) {
                return;
            }
        }
        let cache = Arc::clone(self);
        let base = base.clone();
        let spawned = std::thread::Builder::new()
            .name("proot-rootfs".into())
            .spawn({
                let cache = Arc::clone(&cache);
                let base = base.clone();
                move || {
                    cache.fill(&base);
                    cache
                        .filling
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&base.key);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start copying a root file system ahead of time");
            cache
                .filling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&base.key);
        }
    }

    fn fill(&self, base: &Base) {
        loop {
            let want = self.spares.load(Ordering::Acquire);
            let ready: Vec<PathBuf> = fs::read_dir(&base.spares)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| !e.file_name().as_bytes().starts_with(b"."))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            if ready.len() > want {
                for extra in &ready[want..] {
                    let _ = fs::remove_dir_all(extra);
                }
                return;
            }
            if ready.len() == want || !base.root.is_dir() {
                return;
            }
            let tmp = base
                .spares
                .join(format!(".tmp-{}-{}", self.owner, unique()));
            let t0 = std::time::Instant::now();
            let made = fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&base.spares)
                .map_err(io_err("create", &base.spares))
                .and_then(|()| copy_tree(&base.root, &tmp))
                .and_then(|_| {
                    let done = base.spares.join(unique());
                    fs::rename(&tmp, &done).map_err(io_err("store", &done))
                });
            match made {
                Ok(()) => tracing::debug!(
                    base = %base.key,
                    elapsed_ms = t0.elapsed().as_millis() as u64,
                    "copied a root file system ahead of time"
                ),
                Err(e) => {
                    let _ = fs::remove_dir_all(&tmp);
                    tracing::warn!(base = %base.key, error = %e, "cannot copy a root file system ahead of time");
                    return;
                }
            }
        }
    }

    /// Whether background copies are being made right now.
    pub fn refilling(&self) -> bool {
        !self
            .filling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Remove unfinished builds and copies of `owner` and bases whose
    /// layers are gone. Blocking.
    pub fn sweep(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        let own_build = format!(".build-{}-", self.owner);
        let own_tmp = format!(".tmp-{}-", self.owner);
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = if name.starts_with(&own_build) {
                true
            } else if name.starts_with('.') {
                false
            } else {
                match fs::read(e.path().join("layers.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Vec<PathBuf>>(&b).ok())
                {
                    Some(layers) => layers.iter().any(|l| !l.is_dir()),
                    None => true,
                }
            };
            if stale {
                tracing::debug!(base = %name, "removing a stale flattened image");
                if let Err(err) = fs::remove_dir_all(e.path()) {
                    tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a stale flattened image");
                }
                continue;
            }
            if let Ok(spares) = fs::read_dir(e.path().join("spares")) {
                for s in spares.flatten() {
                    if s.file_name().to_string_lossy().starts_with(&own_tmp) {
                        let _ = fs::remove_dir_all(s.path());
                    }
                }
            }
        }
    }
}

fn build_base(dir: &Path, owner: &str, key: &str, layers: &[PathBuf]) -> Result<(), RootfsError> {
    let tmp = dir.join(format!(".build-{owner}-{}", unique()));
    let t0 = std::time::Instant::now();
    let result = (|| {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io_err("create", &tmp))?;
        let root = tmp.join("rootfs");
        let stats = flatten(layers, &root)?;
        prepare_mount_points(&root)?;
        let list = serde_json::to_vec_pretty(layers).map_err(|e| RootfsError::Io {
            op: "encode",
            path: tmp.join("layers.json"),
            source: io::Error::other(e),
        })?;
        fs::write(tmp.join("layers.json"), list).map_err(io_err("write", &tmp))?;
        Ok::<CopyStats, RootfsError>(stats)
    })();
    let stats = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let target = dir.join(key);
    if let Err(e) = fs::rename(&tmp, &target) {
        let _ = fs::remove_dir_all(&tmp);
        if !target.join("rootfs").is_dir() {
            return Err(io_err("store", &target)(e));
        }
    }
    tracing::info!(
        base = key,
        layers = layers.len(),
        files = stats.files,
        bytes = stats.bytes,
        whiteouts = stats.whiteouts,
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "flattened an image for proot sandboxes"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "stacyvm-proot-rootfs-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn whiteout(p: &Path) {
        let c = sys::cstr(p).unwrap();
        // SAFETY: valid C string.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) };
        assert_eq!(
            rc,
            0,
            "mknod {}: {}",
            p.display(),
            io::Error::last_os_error()
        );
    }

    fn set_opaque(p: &Path) {
        let c = sys::cstr(p).unwrap();
        let name = CString::new(OPAQUE_XATTR).unwrap();
        // SAFETY: valid C strings and a one-byte value.
        let rc = unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
        assert_eq!(rc, 0, "setxattr: {}", io::Error::last_os_error());
    }

    #[test]
    fn layers_flatten_with_whiteouts_and_opaque_directories() {
        // Whiteouts need CAP_MKNOD and trusted.* xattrs CAP_SYS_ADMIN.
        assert_eq!(sys::geteuid(), 0, "this test needs root");
        let d = scratch("flatten");
        let (l1, l2, l3) = (d.join("l1"), d.join("l2"), d.join("l3"));
        for l in [&l1, &l2, &l3] {
            fs::create_dir(l).unwrap();
        }
        // Bottom layer.
        fs::create_dir_all(l1.join("etc/keep")).unwrap();
        fs::write(l1.join("etc/keep/a"), "a1").unwrap();
        fs::write(l1.join("etc/gone"), "x").unwrap();
        fs::create_dir_all(l1.join("opq/sub")).unwrap();
        fs::write(l1.join("opq/old"), "old").unwrap();
        fs::write(l1.join("opq/sub/deep"), "deep").unwrap();
        fs::write(l1.join("was_file"), "f").unwrap();
        fs::create_dir(l1.join("was_dir")).unwrap();
        fs::write(l1.join("was_dir/x"), "x").unwrap();
        fs::write(l1.join("hard1"), "same").unwrap();
        fs::hard_link(l1.join("hard1"), l1.join("hard2")).unwrap();
        fs::set_permissions(l1.join("hard1"), fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("etc/keep/a", l1.join("link")).unwrap();
        fs::create_dir(l1.join("dir_gone")).unwrap();
        fs::write(l1.join("dir_gone/x"), "x").unwrap();
        // Middle layer: whiteouts, an opaque directory, type changes.
        fs::create_dir(l2.join("etc")).unwrap();
        whiteout(&l2.join("etc/gone"));
        whiteout(&l2.join("dir_gone"));
        fs::write(l2.join("etc/new"), "n").unwrap();
        fs::create_dir(l2.join("opq")).unwrap();
        set_opaque(&l2.join("opq"));
        fs::write(l2.join("opq/fresh"), "fresh").unwrap();
        fs::create_dir(l2.join("was_file")).unwrap();
        fs::write(l2.join("was_file/inside"), "i").unwrap();
        fs::write(l2.join("was_dir"), "now a file").unwrap();
        // Top layer: overwrite and delete single files.
        fs::create_dir(l3.join("etc")).unwrap();
        fs::write(l3.join("etc/new"), "n3").unwrap();
        whiteout(&l3.join("link"));
        whiteout(&l3.join("missing_anyway"));

        let out = d.join("out");
        let stats = flatten(&[l1.clone(), l2.clone(), l3.clone()], &out).unwrap();
        assert_eq!(stats.whiteouts, 4);
        assert_eq!(fs::read_to_string(out.join("etc/keep/a")).unwrap(), "a1");
        assert!(!out.join("etc/gone").exists());
        assert!(!out.join("dir_gone").exists());
        assert_eq!(fs::read_to_string(out.join("etc/new")).unwrap(), "n3");
        assert_eq!(fs::read_to_string(out.join("opq/fresh")).unwrap(), "fresh");
        assert!(
            !out.join("opq/old").exists(),
            "opaque directory keeps lower files"
        );
        assert!(!out.join("opq/sub").exists());
        assert!(
            !is_opaque(&out.join("opq")),
            "overlay xattrs are not copied"
        );
        assert_eq!(
            fs::read_to_string(out.join("was_file/inside")).unwrap(),
            "i"
        );
        assert_eq!(
            fs::read_to_string(out.join("was_dir")).unwrap(),
            "now a file"
        );
        assert!(fs::symlink_metadata(out.join("link")).is_err());
        assert!(fs::symlink_metadata(out.join("missing_anyway")).is_err());
        let (h1, h2) = (
            fs::metadata(out.join("hard1")).unwrap(),
            fs::metadata(out.join("hard2")).unwrap(),
        );
        assert_eq!(h1.ino(), h2.ino(), "hard links stay hard links");
        assert_eq!(h1.mode() & 0o7777, 0o4755, "set-id bits survive");

        // A copy of the flattened tree is equal but shares no inode.
        let copy = d.join("copy");
        copy_tree(&out, &copy).unwrap();
        assert_eq!(fs::read_to_string(copy.join("etc/new")).unwrap(), "n3");
        assert_ne!(
            fs::metadata(copy.join("etc/new")).unwrap().ino(),
            fs::metadata(out.join("etc/new")).unwrap().ino()
        );
        assert_eq!(
            fs::metadata(copy.join("hard1")).unwrap().ino(),
            fs::metadata(copy.join("hard2")).unwrap().ino()
        );
        assert_eq!(
            fs::symlink_metadata(copy.join("etc/new")).unwrap().mtime(),
            fs::symlink_metadata(out.join("etc/new")).unwrap().mtime()
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn mount_points_are_prepared() {
        let d = scratch("mounts");
        fs::write(d.join(".stacyvm"), "in the way").unwrap();
        prepare_mount_points(&d).unwrap();
        assert!(d.join(".stacyvm/run").is_dir());
        assert!(d.join(".stacyvm/stacyvm-agent").is_file());
        assert!(d.join("proc").is_dir() && d.join("dev").is_dir());
        assert_eq!(fs::metadata(d.join("tmp")).unwrap().mode() & 0o7777, 0o1777);
        prepare_mount_points(&d).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn keys_depend_on_the_layers() {
        let d = scratch("keys");
        let (a, b) = (d.join("a"), d.join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let ka = base_key(std::slice::from_ref(&a)).unwrap();
        assert_eq!(ka, base_key(std::slice::from_ref(&a)).unwrap());
        assert_ne!(ka, base_key(std::slice::from_ref(&b)).unwrap());
        assert_ne!(ka, base_key(&[a.clone(), b.clone()]).unwrap());
        assert!(base_key(&[]).is_err());
        assert!(base_key(&[PathBuf::from("relative")]).is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
