//! Layer extraction: a tar stream (plain or gzip) becomes a directory tree
//! that overlayfs can use as a lower layer.
//!
//! Entries are written by hand rather than with `tar::Entry::unpack`, so that
//! nothing is ever created outside the layer directory: entry paths with `..`
//! or a leading `/` are refused, existing symlinks are never followed (every
//! parent of an entry must be a real directory created by this layer), and
//! hard links may only point at entries of the same layer.
//!
//! OCI whiteouts become overlayfs whiteouts: `.wh.<name>` is a 0:0 character
//! device `<name>`, `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its
//! directory. Both need root (`CAP_MKNOD`, `CAP_SYS_ADMIN`); without it a layer
//! that has whiteouts is refused with [`ImageError::Unsupported`].

use crate::error::IoContext;
use crate::ImageError;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// How to extract.
#[derive(Debug, Clone, Copy)]
pub struct ExtractOptions {
    /// Running with root privileges: owners are applied, device nodes and
    /// whiteouts are created. Otherwise owners are left to the current user,
    /// device nodes are skipped and whiteouts refused.
    pub privileged: bool,
}

impl ExtractOptions {
    pub fn for_current_user() -> ExtractOptions {
        ExtractOptions {
            privileged: is_root(),
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// What an extraction produced.
#[derive(Debug, Clone)]
pub struct Extracted {
    /// `sha256:` of the uncompressed tar stream (the OCI "diff id").
    pub diff_id: String,
    /// Length of the uncompressed tar stream.
    pub size: u64,
    pub entries: u64,
    pub whiteouts: u64,
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// `(sha256:<hex>, bytes)`.
    pub fn finish(self) -> (String, u64) {
        (format!("sha256:{:x}", self.hasher.finalize()), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Compression of a layer or tarball, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
    Bzip2,
}

pub fn detect_compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Compression::Xz
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else {
        Compression::None
    }
}

/// Wrap `reader` in the decompressor its magic bytes call for.
pub fn decompressed<'a, R: Read + 'a>(reader: R) -> Result<Box<dyn Read + 'a>, ImageError> {
    let mut buf = BufReader::with_capacity(256 * 1024, reader);
    let head = buf
        .fill_buf()
        .map_err(|e| ImageError::io("reading layer", e))?;
    match detect_compression(head) {
        Compression::None => Ok(Box::new(buf)),
        Compression::Gzip => Ok(Box::new(flate2::bufread::MultiGzDecoder::new(buf))),
        Compression::Zstd => Err(ImageError::Unsupported(
            "zstd-compressed layers are not supported; use an image with gzip layers".to_string(),
        )),
        Compression::Xz => Err(ImageError::Unsupported(
            "xz-compressed tarballs are not supported (use plain tar or gzip)".to_string(),
        )),
        Compression::Bzip2 => Err(ImageError::Unsupported(
            "bzip2-compressed tarballs are not supported (use plain tar or gzip)".to_string(),
        )),
    }
}

/// Extract a layer (plain tar or gzip) into `dest`, an existing empty
/// directory, and return the digest of the uncompressed tar.
pub fn extract_layer(
    reader: impl Read,
    dest: &Path,
    opts: ExtractOptions,
) -> Result<Extracted, ImageError> {
    let plain = decompressed(reader)?;
    let mut hashing = HashingReader::new(plain);
    let mut x = Extractor {
        dest,
        opts,
        known_dirs: HashSet::new(),
        dir_meta: HashMap::new(),
        entries: 0,
        whiteouts: 0,
    };
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let entries = archive.entries().map_err(tar_err)?;
        for entry in entries {
            let entry = entry.map_err(tar_err)?;
            x.entry(entry)?;
        }
    }
    // Trailing padding after the end-of-archive marker is part of the diff id.
    io::copy(&mut hashing, &mut io::sink()).map_err(tar_err)?;
    x.finish_dirs()?;
    let (diff_id, size) = hashing.finish();
    if size == 0 {
        return Err(ImageError::Corrupt(
            "empty stream: not a tar archive".to_string(),
        ));
    }
    Ok(Extracted {
        diff_id,
        size,
        entries: x.entries,
        whiteouts: x.whiteouts,
    })
}

fn tar_err(e: io::Error) -> ImageError {
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof | io::ErrorKind::Other => {
            ImageError::Corrupt(format!("bad tar stream: {e}"))
        }
        _ => ImageError::io("reading layer", e),
    }
}

/// Ownership, mode and time of an entry.
#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    mtime_nsec: i64,
}

struct Extractor<'a> {
    dest: &'a Path,
    opts: ExtractOptions,
    /// Directories known to be real directories of this layer.
    known_dirs: HashSet<PathBuf>,
    /// Mode and mtime of directories, applied at the end (children change a
    /// directory's mtime, and a read-only mode would stop us writing them).
    dir_meta: HashMap<PathBuf, Meta>,
    entries: u64,
    whiteouts: u64,
}

/// Split an entry path into normal components; refuse anything that could
/// leave the layer.
fn safe_components(raw: &[u8]) -> Result<Vec<OsString>, ImageError> {
    let p = Path::new(OsStr::from_bytes(raw));
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(ImageError::Corrupt(format!(
                    "layer entry {:?} contains '..'",
                    String::from_utf8_lossy(raw)
                )))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(ImageError::Corrupt(format!(
                    "layer entry {:?} is an absolute path",
                    String::from_utf8_lossy(raw)
                )))
            }
        }
    }
    Ok(out)
}

fn cstr(p: &Path) -> Result<CString, ImageError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| ImageError::Corrupt(format!("path {} contains a NUL byte", p.display())))
}

fn last_os_error(what: &str, p: &Path) -> ImageError {
    ImageError::io_path(what, p, io::Error::last_os_error())
}

impl Extractor<'_> {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), ImageError> {
        self.entries += 1;
        let raw_path = entry.path_bytes().into_owned();
        let comps = safe_components(&raw_path)?;
        let kind = entry.header().entry_type();
        let meta = self.meta_of(&mut entry)?;
        let xattrs = pax_xattrs(&mut entry)?;

        // Whiteouts.
        if let Some(last) = comps.last() {
            let name = last.as_bytes();
            if name == WHITEOUT_OPAQUE.as_bytes() {
                let dir = self.ensure_parents(&comps[..comps.len() - 1])?;
                self.whiteouts += 1;
                return self.set_opaque(&dir);
            }
            if name.starts_with(WHITEOUT_META_PREFIX.as_bytes()) {
                tracing::debug!(entry = %String::from_utf8_lossy(&raw_path), "skipping whiteout metadata entry");
                return Ok(());
            }
            if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
                if target.is_empty() {
                    return Err(ImageError::Corrupt(format!(
                        "layer entry {:?} is an empty whiteout",
                        String::from_utf8_lossy(&raw_path)
                    )));
                }
                let parent = self.ensure_parents(&comps[..comps.len() - 1])?;
                let path = parent.join(OsStr::from_bytes(target));
                self.whiteouts += 1;
                return self.make_whiteout(&path);
            }
        }

        if comps.is_empty() {
            // "./": the layer root itself.
            if kind.is_dir() {
                self.dir_meta.insert(self.dest.to_path_buf(), meta);
            }
            return Ok(());
        }
        let parent = self.ensure_parents(&comps[..comps.len() - 1])?;
        let path = parent.join(&comps[comps.len() - 1]);

        use tar::EntryType as T;
        match kind {
            T::Directory => {
                match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.remove_existing(&path)?;
                        self.mkdir(&path)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => self.mkdir(&path)?,
                    Err(e) => return Err(ImageError::io_path("inspecting", &path, e)),
                }
                self.known_dirs.insert(path.clone());
                self.chown(&path, &meta)?;
                self.set_xattrs(&path, &xattrs);
                self.dir_meta.insert(path, meta);
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                self.remove_existing(&path)?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .ctx("creating", &path)?;
                io::copy(&mut entry, &mut f).map_err(tar_err)?;
                drop(f);
                self.chown(&path, &meta)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(meta.mode))
                    .ctx("setting the mode of", &path)?;
                self.set_xattrs(&path, &xattrs);
                set_mtime(&path, &meta)?;
            }
            T::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| {
                    ImageError::Corrupt(format!("symlink {} has no target", path.display()))
                })?;
                self.remove_existing(&path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .ctx("creating the symlink", &path)?;
                self.chown(&path, &meta)?;
                set_mtime(&path, &meta)?;
            }
            T::Link => {
                let target_raw = entry.link_name_bytes().ok_or_else(|| {
                    ImageError::Corrupt(format!("hard link {} has no target", path.display()))
                })?;
                let target = self.existing_in_layer(&target_raw)?;
                if target == path {
                    return Ok(());
                }
                self.remove_existing(&path)?;
                std::fs::hard_link(&target, &path).ctx("creating the hard link", &path)?;
            }
            T::Char | T::Block | T::Fifo => {
                let fmt = match kind {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                if fmt != libc::S_IFIFO && !self.opts.privileged {
                    tracing::debug!(path = %path.display(), "not root: skipping device node");
                    return Ok(());
                }
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                self.remove_existing(&path)?;
                let c = cstr(&path)?;
                let dev = libc::makedev(major, minor);
                // SAFETY: `c` is a valid NUL-terminated path.
                let rc = unsafe { libc::mknod(c.as_ptr(), fmt | (meta.mode & 0o7777), dev) };
                if rc != 0 {
                    return Err(last_os_error("creating the device node", &path));
                }
                self.chown(&path, &meta)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(meta.mode))
                    .ctx("setting the mode of", &path)?;
                set_mtime(&path, &meta)?;
            }
            other => {
                tracing::debug!(path = %path.display(), kind = ?other, "skipping tar entry of unsupported type");
            }
        }
        Ok(())
    }

    fn meta_of<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<Meta, ImageError> {
        let h = entry.header();
        let bad = |what: &str, e: io::Error| {
            ImageError::Corrupt(format!("bad {what} in tar header: {e}"))
        };
        let mut m = Meta {
            mode: h.mode().map_err(|e| bad("mode", e))? & 0o7777,
            // Some writers leave these empty (PAX records may carry them).
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
            mtime: i64::try_from(h.mtime().unwrap_or(0)).unwrap_or(0),
            mtime_nsec: 0,
        };
        if let Some(exts) = entry.pax_extensions().map_err(tar_err)? {
            for ext in exts {
                let ext = ext.map_err(tar_err)?;
                let (Ok(key), Ok(value)) = (ext.key(), ext.value()) else {
                    continue;
                };
                match key {
                    "uid" => m.uid = value.parse().unwrap_or(m.uid),
                    "gid" => m.gid = value.parse().unwrap_or(m.gid),
                    "mtime" => {
                        if let Some((s, ns)) = parse_pax_time(value) {
                            m.mtime = s;
                            m.mtime_nsec = ns;
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(m)
    }

    /// Make sure every component of `comps` is a real directory of this layer
    /// (created with mode 0755 if missing) and return the full path.
    fn ensure_parents(&mut self, comps: &[OsString]) -> Result<PathBuf, ImageError> {
        let mut cur = self.dest.to_path_buf();
        for c in comps {
            cur.push(c);
            if self.known_dirs.contains(&cur) {
                continue;
            }
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) => {
                    let what = if m.file_type().is_symlink() {
                        "a symlink"
                    } else {
                        "not a directory"
                    };
                    return Err(ImageError::Corrupt(format!(
                        "layer entry goes through {}, which is {what}",
                        rel(self.dest, &cur)
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.mkdir(&cur)?;
                    self.dir_meta.entry(cur.clone()).or_insert(Meta {
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                        mtime: 0,
                        mtime_nsec: 0,
                    });
                }
                Err(e) => return Err(ImageError::io_path("inspecting", &cur, e)),
            }
            self.known_dirs.insert(cur.clone());
        }
        Ok(cur)
    }

    /// The path of an existing non-directory entry of this layer, for a hard
    /// link, resolved without following symlinks.
    fn existing_in_layer(&self, raw: &[u8]) -> Result<PathBuf, ImageError> {
        let comps = safe_components(raw)?;
        let Some((last, parents)) = comps.split_last() else {
            return Err(ImageError::Corrupt(
                "hard link to the layer root".to_string(),
            ));
        };
        let mut cur = self.dest.to_path_buf();
        for c in parents {
            cur.push(c);
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                _ => {
                    return Err(ImageError::Corrupt(format!(
                        "hard link target {:?} is not inside the layer",
                        String::from_utf8_lossy(raw)
                    )))
                }
            }
        }
        cur.push(last);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if !m.is_dir() => Ok(cur),
            _ => Err(ImageError::Corrupt(format!(
                "hard link target {:?} is missing or a directory",
                String::from_utf8_lossy(raw)
            ))),
        }
    }

    fn mkdir(&self, path: &Path) -> Result<(), ImageError> {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(path)
            .ctx("creating the directory", path)
    }

    /// Remove whatever is at `path` (a later tar entry replaces an earlier one).
    fn remove_existing(&mut self, path: &Path) -> Result<(), ImageError> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                std::fs::remove_dir_all(path).ctx("replacing", path)?;
                self.known_dirs.retain(|d| !d.starts_with(path));
                self.dir_meta.retain(|d, _| !d.starts_with(path));
                Ok(())
            }
            Ok(_) => std::fs::remove_file(path).ctx("replacing", path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io_path("inspecting", path, e)),
        }
    }

    fn chown(&self, path: &Path, m: &Meta) -> Result<(), ImageError> {
        if !self.opts.privileged {
            return Ok(());
        }
        let (Ok(uid), Ok(gid)) = (u32::try_from(m.uid), u32::try_from(m.gid)) else {
            return Err(ImageError::Corrupt(format!(
                "owner {}:{} of {} is out of range",
                m.uid,
                m.gid,
                path.display()
            )));
        };
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).ctx("changing the owner of", path)
    }

    fn set_xattrs(&self, path: &Path, xattrs: &[(String, Vec<u8>)]) {
        for (name, value) in xattrs {
            // Overlay metadata must never come from image content.
            if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                tracing::debug!(path = %path.display(), %name, "ignoring overlay xattr in layer");
                continue;
            }
            if !self.opts.privileged && !name.starts_with("user.") {
                continue;
            }
            if let Err(e) = lsetxattr(path, name, value) {
                tracing::debug!(path = %path.display(), %name, error = %e, "cannot set xattr");
            }
        }
    }

    fn set_opaque(&self, dir: &Path) -> Result<(), ImageError> {
        if !self.opts.privileged {
            return Err(whiteout_needs_root());
        }
        lsetxattr(dir, OPAQUE_XATTR, b"y").ctx("marking opaque", dir)
    }

    fn make_whiteout(&mut self, path: &Path) -> Result<(), ImageError> {
        if !self.opts.privileged {
            return Err(whiteout_needs_root());
        }
        self.remove_existing(path)?;
        let c = cstr(path)?;
        // SAFETY: `c` is a valid NUL-terminated path.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) };
        if rc != 0 {
            return Err(last_os_error("creating the whiteout", path));
        }
        Ok(())
    }

    /// Apply directory modes and mtimes, deepest first.
    fn finish_dirs(&mut self) -> Result<(), ImageError> {
        let mut dirs: Vec<(PathBuf, Meta)> = self.dir_meta.drain().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (path, meta) in dirs {
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                _ => continue,
            }
            if path == self.dest && self.opts.privileged {
                self.chown(&path, &meta)?;
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(meta.mode))
                .ctx("setting the mode of", &path)?;
            set_mtime(&path, &meta)?;
        }
        Ok(())
    }
}

fn whiteout_needs_root() -> ImageError {
    ImageError::Unsupported(
        "this layer deletes files of lower layers (whiteouts); converting them to overlayfs \
         whiteouts needs root (CAP_MKNOD and CAP_SYS_ADMIN)"
            .to_string(),
    )
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .map(|r| r.display().to_string())
        .unwrap_or_else(|_| p.display().to_string())
}

/// `1700000000.123456789` → (seconds, nanoseconds).
fn parse_pax_time(v: &str) -> Option<(i64, i64)> {
    let (s, frac) = match v.split_once('.') {
        Some((s, f)) => (s, f),
        None => (v, ""),
    };
    let secs: i64 = s.parse().ok()?;
    let mut ns: i64 = 0;
    let digits: String = frac.chars().take(9).collect();
    if !digits.is_empty() {
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        ns = digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32);
        if secs < 0 && ns > 0 {
            return Some((secs - 1, 1_000_000_000 - ns));
        }
    }
    Some((secs, ns))
}

fn pax_xattrs<R: Read>(
    entry: &mut tar::Entry<'_, R>,
) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions().map_err(tar_err)? {
        for ext in exts {
            let ext = ext.map_err(tar_err)?;
            if let Ok(key) = ext.key() {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    out.push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(out)
}

fn set_mtime(path: &Path, m: &Meta) -> Result<(), ImageError> {
    let c = cstr(path)?;
    let t = libc::timespec {
        tv_sec: m.mtime as libc::time_t,
        tv_nsec: m.mtime_nsec as _,
    };
    let times = [t, t];
    // SAFETY: valid path and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(last_os_error("setting the mtime of", path));
    }
    Ok(())
}

pub fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: valid C strings and a buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Read an xattr without following symlinks; `None` if it is not set.
pub fn lgetxattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let rc = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODATA) {
            return Ok(None);
        }
        return Err(e);
    }
    buf.truncate(rc as usize);
    Ok(Some(buf))
}

/// Whether `dir` is marked opaque for overlayfs (`trusted.overlay.opaque=y`).
pub fn is_opaque(dir: &Path) -> bool {
    matches!(lgetxattr(dir, OPAQUE_XATTR), Ok(Some(v)) if v == b"y")
}

/// Whether `path` is an overlayfs whiteout (a 0:0 character device).
pub fn is_whiteout(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) => m.file_type().is_char_device() && m.rdev() == 0,
        Err(_) => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A tar built entry by entry, for tests.
    pub struct TarBuilder {
        b: tar::Builder<Vec<u8>>,
    }

    impl Default for TarBuilder {
        fn default() -> Self {
            TarBuilder {
                b: tar::Builder::new(Vec::new()),
            }
        }
    }

    impl TarBuilder {
        fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_mtime(1_600_000_000);
            h.set_size(size);
            // set_path refuses "..", so write the raw name for hostile tests.
            let name = path.as_bytes();
            let gnu = h.as_gnu_mut().expect("gnu header");
            gnu.name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            h
        }
        pub fn dir(mut self, path: &str, mode: u32) -> Self {
            let h = Self::header(path, tar::EntryType::Directory, mode, 0);
            self.b.append(&h, io::empty()).expect("append");
            self
        }
        pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
            let h = Self::header(path, tar::EntryType::Regular, mode, data.len() as u64);
            self.b.append(&h, data).expect("append");
            self
        }
        pub fn symlink(mut self, path: &str, target: &str) -> Self {
            let mut h = Self::header(path, tar::EntryType::Symlink, 0o777, 0);
            h.set_link_name_literal(target).expect("link");
            h.set_cksum();
            self.b.append(&h, io::empty()).expect("append");
            self
        }
        pub fn hardlink(mut self, path: &str, target: &str) -> Self {
            let mut h = Self::header(path, tar::EntryType::Link, 0o644, 0);
            h.set_link_name_literal(target).expect("link");
            h.set_cksum();
            self.b.append(&h, io::empty()).expect("append");
            self
        }
        pub fn bytes(self) -> Vec<u8> {
            self.b.into_inner().expect("finish")
        }
        pub fn gzip(self) -> Vec<u8> {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&self.bytes()).expect("gzip");
            e.finish().expect("gzip")
        }
    }

    fn root_opts() -> ExtractOptions {
        ExtractOptions { privileged: true }
    }

    fn require_root() {
        assert!(
            is_root(),
            "this test creates whiteouts and sets trusted.* xattrs: run it as root"
        );
    }

    #[test]
    fn extracts_files_dirs_links_and_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let tar = TarBuilder::default()
            .dir("./", 0o755)
            .dir("etc/", 0o750)
            .file("etc/hello", 0o4755, b"hi")
            .file("deep/er/file", 0o600, b"x") // parents are created
            .symlink("etc/link", "/etc/hello")
            .hardlink("etc/hard", "etc/hello")
            .file("etc/replaced", 0o644, b"old")
            .file("etc/replaced", 0o644, b"new")
            .dir("ro/", 0o555)
            .file("ro/inside", 0o444, b"r")
            .bytes();
        let expected = format!("sha256:{:x}", Sha256::digest(&tar));
        let out = extract_layer(&tar[..], tmp.path(), ExtractOptions::for_current_user()).unwrap();
        assert_eq!(out.diff_id, expected);
        assert_eq!(out.size, tar.len() as u64);
        let p = tmp.path();
        assert_eq!(std::fs::read(p.join("etc/hello")).unwrap(), b"hi");
        let m = std::fs::metadata(p.join("etc/hello")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o4755, "setuid survives the chown");
        assert_eq!(m.mtime(), 1_600_000_000);
        if is_root() {
            assert_eq!((m.uid(), m.gid()), (1000, 1000));
        }
        assert_eq!(
            std::fs::read_link(p.join("etc/link")).unwrap(),
            Path::new("/etc/hello")
        );
        let h = std::fs::metadata(p.join("etc/hard")).unwrap();
        assert_eq!(h.ino(), m.ino(), "hard link shares the inode");
        assert_eq!(std::fs::read(p.join("etc/replaced")).unwrap(), b"new");
        assert_eq!(std::fs::read(p.join("deep/er/file")).unwrap(), b"x");
        let d = std::fs::metadata(p.join("etc")).unwrap();
        assert_eq!(d.mode() & 0o7777, 0o750);
        assert_eq!(
            d.mtime(),
            1_600_000_000,
            "dir mtime applied after its children"
        );
        assert_eq!(
            std::fs::metadata(p.join("ro")).unwrap().mode() & 0o7777,
            0o555
        );
        assert_eq!(std::fs::read(p.join("ro/inside")).unwrap(), b"r");
    }

    #[test]
    fn gzip_and_plain_give_the_same_diff_id() {
        let t = || TarBuilder::default().file("a", 0o644, b"abc");
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let plain = extract_layer(&t().bytes()[..], a.path(), root_opts()).unwrap();
        let gz = extract_layer(&t().gzip()[..], b.path(), root_opts()).unwrap();
        assert_eq!(plain.diff_id, gz.diff_id);
        assert_eq!(std::fs::read(b.path().join("a")).unwrap(), b"abc");
    }

    #[test]
    fn zstd_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let data = [0x28u8, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0];
        match extract_layer(&data[..], tmp.path(), root_opts()) {
            Err(ImageError::Unsupported(m)) => assert!(m.contains("zstd"), "{m}"),
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    fn expect_refused(tar: Vec<u8>, outside: &Path) {
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("layer");
        std::fs::create_dir(&layer).unwrap();
        match extract_layer(&tar[..], &layer, root_opts()) {
            Err(ImageError::Corrupt(_)) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(!outside.exists(), "{} was written", outside.display());
    }

    #[test]
    fn refuses_entries_leaving_the_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let v = victim.to_str().unwrap();

        // ../ in the path.
        expect_refused(
            TarBuilder::default()
                .file("../escaped", 0o644, b"x")
                .bytes(),
            &tmp.path().join("escaped"),
        );
        expect_refused(
            TarBuilder::default()
                .file("a/../../escaped2", 0o644, b"x")
                .bytes(),
            &tmp.path().join("escaped2"),
        );
        // Absolute path.
        let abs = format!("{v}/abs");
        expect_refused(
            TarBuilder::default().file(&abs, 0o644, b"x").bytes(),
            &victim.join("abs"),
        );
        // Writing through a symlink created by an earlier entry.
        expect_refused(
            TarBuilder::default()
                .symlink("evil", v)
                .file("evil/through", 0o644, b"x")
                .bytes(),
            &victim.join("through"),
        );
        // A hard link to a file outside.
        std::fs::write(victim.join("secret"), b"s").unwrap();
        expect_refused(
            TarBuilder::default()
                .hardlink("h", &format!("{v}/secret"))
                .bytes(),
            &tmp.path().join("nothing"),
        );
        expect_refused(
            TarBuilder::default()
                .hardlink("h", "../victim/secret")
                .bytes(),
            &tmp.path().join("nothing"),
        );
        // A hard link through an in-layer symlink to a file outside.
        expect_refused(
            TarBuilder::default()
                .symlink("evil", v)
                .hardlink("h", "evil/secret")
                .bytes(),
            &tmp.path().join("nothing"),
        );
        assert_eq!(
            std::fs::read_dir(&victim).unwrap().count(),
            1,
            "only the secret is in the victim dir"
        );
    }

    #[test]
    fn whiteouts_become_overlayfs_whiteouts() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let tar = TarBuilder::default()
            .dir("usr/share/", 0o755)
            .file("usr/share/.wh.doc", 0o644, b"")
            .file("top/.wh.gone-without-parent-entry", 0o644, b"")
            .dir("etc/x/", 0o755)
            .file("etc/x/.wh..wh..opq", 0o644, b"")
            .file("etc/x/new", 0o644, b"n")
            .file(".wh..wh.plnk", 0o644, b"")
            .bytes();
        let out = extract_layer(&tar[..], tmp.path(), root_opts()).unwrap();
        assert_eq!(out.whiteouts, 3);
        let p = tmp.path();
        assert!(is_whiteout(&p.join("usr/share/doc")));
        assert!(is_whiteout(&p.join("top/gone-without-parent-entry")));
        assert!(!p.join("usr/share/.wh.doc").exists());
        assert_eq!(
            lgetxattr(&p.join("etc/x"), OPAQUE_XATTR)
                .unwrap()
                .as_deref(),
            Some(&b"y"[..])
        );
        assert!(!p.join("etc/x/.wh..wh..opq").exists());
        assert_eq!(std::fs::read(p.join("etc/x/new")).unwrap(), b"n");
        assert!(!p.join(".wh..wh.plnk").exists());
        assert_eq!(lgetxattr(&p.join("usr"), OPAQUE_XATTR).unwrap(), None);
    }

    #[test]
    fn whiteouts_without_root_are_unsupported() {
        let tmp = tempfile::tempdir().unwrap();
        let tar = TarBuilder::default().file("a/.wh.b", 0o644, b"").bytes();
        let r = extract_layer(&tar[..], tmp.path(), ExtractOptions { privileged: false });
        assert!(matches!(r, Err(ImageError::Unsupported(_))), "{r:?}");
    }

    #[test]
    fn overlay_xattrs_in_content_are_ignored() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..])])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_path("d/").unwrap();
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
        let tar = b.into_inner().unwrap();
        extract_layer(&tar[..], tmp.path(), root_opts()).unwrap();
        assert_eq!(
            lgetxattr(&tmp.path().join("d"), OPAQUE_XATTR).unwrap(),
            None
        );
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time("12.123456789123"), Some((12, 123_456_789)));
        assert_eq!(parse_pax_time("x"), None);
    }

    #[test]
    fn empty_stream_is_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let r = extract_layer(&b""[..], tmp.path(), root_opts());
        assert!(matches!(r, Err(ImageError::Corrupt(_))), "{r:?}");
        // An empty layer (just the end-of-archive blocks) is fine.
        let empty = TarBuilder::default().bytes();
        let out = extract_layer(&empty[..], tmp.path(), root_opts()).unwrap();
        assert_eq!(out.entries, 0);
    }

    #[test]
    fn truncated_tar_is_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let tar = TarBuilder::default().file("a", 0o644, &[7u8; 5000]).bytes();
        let r = extract_layer(&tar[..1000], tmp.path(), root_opts());
        assert!(matches!(r, Err(ImageError::Corrupt(_))), "{r:?}");
    }
}
