//! The mock sandbox's filesystem: a host directory that plays the role of
//! `/`, and the file operations of the agent protocol on it.
//!
//! Every sandbox path is mapped into the root by [`Root::resolve`], which
//! resolves symlinks itself, as if the root were `/` (like `chroot`): an
//! absolute link target starts again at the root and `..` stops at the root,
//! so no path, link or `..` reaches a host file outside the root. Paths from
//! the file API are first checked with [`stacyvm_agent_proto::path`] (so
//! `..` above `/` and the reserved `/.stacyvm` tree are refused with the
//! agent's 400s).
//!
//! The functions here are blocking; the server runs them on tokio's
//! blocking pool. The checks and error answers are the protocol crate's,
//! as for the real agent.

use stacyvm_agent_proto::error::{errno, ApiError};
use stacyvm_agent_proto::glob::{self, DirItem, EntryKind, GlobFs};
use stacyvm_agent_proto::path::{base_name, parent_of};
use stacyvm_agent_proto::FileEntry;
use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Most symlinks followed while resolving one path (Linux's limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// The directory that is a mock sandbox's `/`.
#[derive(Debug, Clone)]
pub(crate) struct Root {
    dir: PathBuf,
}

impl Root {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Root { dir: dir.into() }
    }

    /// The host directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn host(&self, comps: &[OsString]) -> PathBuf {
        let mut p = self.dir.clone();
        for c in comps {
            p.push(c);
        }
        p
    }

    /// The host path of the sandbox path `path` (absolute; relative paths
    /// are taken from `/`). Symlinks met on the way are resolved inside the
    /// root; the last component is followed only when `follow_last` is set.
    /// Components that do not exist are kept as they are, so the result can
    /// be used to create them. Fails only on a symlink loop (`ELOOP`) or an
    /// unreadable link.
    pub fn resolve(&self, path: &str, follow_last: bool) -> io::Result<PathBuf> {
        let mut todo: VecDeque<OsString> = split(OsStr::new(path));
        let mut done: Vec<OsString> = Vec::new();
        let mut hops = 0usize;
        while let Some(comp) = todo.pop_front() {
            if comp == ".." {
                done.pop();
                continue;
            }
            let candidate = self.host(&done).join(&comp);
            if !todo.is_empty() || follow_last {
                let is_link = fs::symlink_metadata(&candidate)
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false);
                if is_link {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(io::Error::from_raw_os_error(errno::ELOOP));
                    }
                    let target = fs::read_link(&candidate)?;
                    if target.as_os_str().as_bytes().starts_with(b"/") {
                        done.clear();
                    }
                    let mut next = split(target.as_os_str());
                    next.extend(todo);
                    todo = next;
                    continue;
                }
            }
            done.push(comp);
        }
        Ok(self.host(&done))
    }

    /// Create a directory and its missing parents (mode 755), inside the root.
    pub fn create_dirs(&self, path: &str) -> io::Result<()> {
        let host = self.resolve(path, true)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(host)
    }
}

/// The components of a path, without empty ones and `.`.
fn split(p: &OsStr) -> VecDeque<OsString> {
    p.as_bytes()
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| OsStr::from_bytes(c).to_os_string())
        .collect()
}

fn resolved(root: &Root, p: &str, follow_last: bool) -> Result<PathBuf, ApiError> {
    root.resolve(p, follow_last)
        .map_err(|e| ApiError::from_io(&e, p))
}

/// Open a regular file for reading. `p` is normalized.
pub(crate) fn open_read(root: &Root, p: &str) -> Result<(File, Metadata), ApiError> {
    let host = resolved(root, p, true)?;
    let meta = fs::metadata(&host).map_err(|e| ApiError::from_io(&e, p))?;
    if meta.is_dir() {
        return Err(ApiError::invalid(format!("{p} is a directory")));
    }
    if !meta.is_file() {
        return Err(ApiError::invalid(format!("{p} is not a regular file")));
    }
    let file = File::open(&host).map_err(|e| ApiError::from_io(&e, p))?;
    Ok((file, meta))
}

/// Create the missing parents of a file's directory `dir` (normalized).
fn create_parents(root: &Root, dir: &str) -> Result<(), ApiError> {
    root.create_dirs(dir)
        .map_err(|e| ApiError::from_create_dirs_io(&e, dir))
}

/// A random hex suffix for temporary file names.
fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:016x}", h.finish())
}

/// An upload in progress: a temporary file beside its target, removed on
/// drop unless [`Upload::commit`] renamed it into place.
pub(crate) struct Upload {
    pub file: Option<File>,
    tmp: PathBuf,
    target: PathBuf,
    path: String,
    done: bool,
}

impl Upload {
    /// Start writing the file `p` (normalized, not `/`): parents are
    /// created, a temporary file is opened next to the target.
    pub fn start(root: &Root, p: &str) -> Result<Upload, ApiError> {
        let dir = parent_of(p);
        let name = base_name(p);
        if resolved(root, p, true)?.is_dir() {
            return Err(ApiError::invalid(format!("{p} is a directory")));
        }
        create_parents(root, dir)?;
        let host_dir = resolved(root, dir, true)?;
        loop {
            let tmp = host_dir.join(format!(".{name}.stacyvm-tmp-{}", random_suffix()));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
            {
                Ok(f) => {
                    return Ok(Upload {
                        file: Some(f),
                        tmp,
                        target: host_dir.join(&name),
                        path: p.to_string(),
                        done: false,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ApiError::from_io(&e, p)),
            }
        }
    }

    /// Give the file its mode and move it into place.
    pub fn commit(mut self, file: File, mode: u32) -> Result<(), ApiError> {
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| ApiError::from_io(&e, &self.path))?;
        drop(file);
        fs::rename(&self.tmp, &self.target).map_err(|e| ApiError::from_io(&e, &self.path))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// `DELETE /v1/files`. `p` is normalized and not `/`.
pub(crate) fn delete(root: &Root, p: &str, recursive: bool) -> Result<(), ApiError> {
    let host = resolved(root, p, false)?;
    let meta = fs::symlink_metadata(&host).map_err(|e| ApiError::from_io(&e, p))?;
    let res = if !meta.is_dir() {
        fs::remove_file(&host)
    } else if recursive {
        // Does not follow symlinks inside the tree.
        fs::remove_dir_all(&host)
    } else {
        fs::remove_dir(&host)
    };
    res.map_err(|e| ApiError::from_delete_io(&e, p))
}

/// `GET /v1/files/list`: one directory level, sorted by name.
pub(crate) fn list(root: &Root, p: &str) -> Result<Vec<FileEntry>, ApiError> {
    let host = resolved(root, p, true)?;
    let meta = fs::metadata(&host).map_err(|e| ApiError::from_io(&e, p))?;
    if !meta.is_dir() {
        return Err(ApiError::invalid(format!("{p} is not a directory")));
    }
    let dir = fs::read_dir(&host).map_err(|e| ApiError::from_io(&e, p))?;
    // DirEntry::metadata does not follow symlinks.
    FileEntry::listing(
        p,
        dir.map(|ent| {
            ent.map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().ok(),
                )
            })
        }),
    )
}

/// `GET /v1/files/stat` (does not follow a final symlink).
pub(crate) fn stat(root: &Root, p: &str) -> Result<FileEntry, ApiError> {
    let host = resolved(root, p, false)?;
    let m = fs::symlink_metadata(&host).map_err(|e| ApiError::from_io(&e, p))?;
    Ok(FileEntry::from_metadata(p.to_string(), base_name(p), &m))
}

/// `POST /v1/files/move`. Both paths are normalized and neither is `/`
/// ([`stacyvm_agent_proto::request::move_paths`]).
pub(crate) fn rename(root: &Root, from: &str, to: &str) -> Result<(), ApiError> {
    let host_from = resolved(root, from, false)?;
    fs::symlink_metadata(&host_from).map_err(|e| ApiError::from_io(&e, from))?;
    if !stacyvm_agent_proto::request::move_needed(from, to)? {
        return Ok(());
    }
    create_parents(root, parent_of(to))?;
    let host_to = resolved(root, to, false)?;
    fs::rename(&host_from, &host_to).map_err(|e| ApiError::from_io(&e, to))
}

/// `POST /v1/files/chmod` (follows symlinks, inside the root).
pub(crate) fn chmod(root: &Root, p: &str, mode: u32) -> Result<(), ApiError> {
    let host = resolved(root, p, true)?;
    fs::set_permissions(&host, fs::Permissions::from_mode(mode))
        .map_err(|e| ApiError::from_io(&e, p))
}

// ----- glob -----------------------------------------------------------------

/// The sandbox's files for [`glob::glob`]: nodes are host paths inside the
/// root. The walk never follows a host symlink (it could point anywhere on
/// the host): only the pattern's literal prefix is resolved, by
/// [`Root::resolve`], and symlinked directories below it are not entered.
impl GlobFs for Root {
    type Node = PathBuf;

    fn start(&self, path: &str, follow_last: bool) -> Option<PathBuf> {
        self.resolve(path, follow_last).ok()
    }

    fn child(&self, dir: &PathBuf, name: &str) -> PathBuf {
        dir.join(name)
    }

    fn read_dir(&self, host: &PathBuf) -> Option<Box<dyn Iterator<Item = DirItem> + '_>> {
        let rd = fs::read_dir(host).ok()?;
        Some(Box::new(rd.flatten().map(|ent| {
            let kind = EntryKind::from(ent.file_type().ok()?);
            Some((ent.file_name().to_string_lossy().into_owned(), kind))
        })))
    }

    fn exists(&self, host: &PathBuf) -> bool {
        fs::symlink_metadata(host).is_ok()
    }

    /// A real directory only.
    fn is_dir(&self, host: &PathBuf) -> bool {
        fs::symlink_metadata(host).is_ok_and(|m| m.is_dir())
    }
}

/// `GET /v1/files/glob`: existing paths matching the normalized absolute
/// `pattern`, sorted.
pub(crate) fn glob(root: &Root, pattern: &str) -> Vec<String> {
    glob::glob(root, pattern)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fresh empty directory under /tmp, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "stacyvm-mock-{tag}-{}-{}",
                std::process::id(),
                random_suffix()
            ));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn resolution_stays_inside_the_root() {
        let t = TempDir::new("resolve");
        let root = Root::new(t.0.join("root"));
        let r = root.dir().to_path_buf();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::write(r.join("a/b/f"), b"in").unwrap();
        fs::write(t.0.join("secret"), b"out").unwrap();
        // Plain paths, `..` clamped at the root.
        assert_eq!(root.resolve("/a/b/f", true).unwrap(), r.join("a/b/f"));
        assert_eq!(
            root.resolve("/../../secret", true).unwrap(),
            r.join("secret")
        );
        assert_eq!(root.resolve("/a/../../b", true).unwrap(), r.join("b"));
        assert_eq!(root.resolve("/", true).unwrap(), r);
        // An absolute link target starts again at the root.
        symlink("/a/b", r.join("abs")).unwrap();
        assert_eq!(root.resolve("/abs/f", true).unwrap(), r.join("a/b/f"));
        // A link to the host's copy of the root's parent is re-rooted.
        symlink(t.0.join("secret"), r.join("host")).unwrap();
        let h = root.resolve("/host", true).unwrap();
        assert!(h.starts_with(&r), "{h:?}");
        assert!(fs::read(&h).is_err());
        // Relative links climbing out stop at the root.
        symlink("../../../../secret", r.join("a/up")).unwrap();
        assert_eq!(root.resolve("/a/up", true).unwrap(), r.join("secret"));
        symlink("../..", r.join("a/b/top")).unwrap();
        assert_eq!(root.resolve("/a/b/top/a", true).unwrap(), r.join("a"));
        // The last component is kept as it is unless followed.
        assert_eq!(root.resolve("/abs", false).unwrap(), r.join("abs"));
        // Loops end with ELOOP.
        symlink("/loop2", r.join("loop1")).unwrap();
        symlink("/loop1", r.join("loop2")).unwrap();
        let e = root.resolve("/loop1/x", true).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(errno::ELOOP));
    }

    #[test]
    fn file_operations_cannot_reach_the_host() {
        let t = TempDir::new("ops");
        let root = Root::new(t.0.join("root"));
        let r = root.dir().to_path_buf();
        fs::create_dir_all(&r).unwrap();
        fs::write(t.0.join("secret"), b"host data").unwrap();
        symlink(t.0.join("secret"), r.join("to-secret")).unwrap();
        symlink("../secret", r.join("up-secret")).unwrap();
        symlink(&t.0, r.join("to-outside")).unwrap();
        for p in ["/to-secret", "/up-secret"] {
            let e = open_read(&root, p).unwrap_err();
            assert_eq!(e.code, "file_not_found", "{p}");
        }
        assert_eq!(
            list(&root, "/to-outside").unwrap_err().code,
            "file_not_found"
        );
        // Writing through a link that points out creates the file inside.
        let up = Upload::start(&root, "/to-outside/new").unwrap();
        let file = fs::File::create(&up.tmp).unwrap();
        up.commit(file, 0o600).unwrap();
        assert!(!t.0.join("new").exists());
        assert!(r.join(t.0.strip_prefix("/").unwrap()).join("new").exists());
        // chmod, delete and move of links act inside the root only.
        assert!(chmod(&root, "/to-secret", 0o600).is_err());
        delete(&root, "/to-secret", false).unwrap();
        assert!(t.0.join("secret").exists());
        assert!(r.join("up-secret").exists());
        rename(&root, "/up-secret", "/moved").unwrap();
        assert!(t.0.join("secret").exists());
        assert!(stat(&root, "/moved").unwrap().is_symlink);
        assert_eq!(fs::read(t.0.join("secret")).unwrap(), b"host data");
    }

    #[test]
    fn entries_and_errors() {
        let t = TempDir::new("entries");
        let root = Root::new(&t.0);
        fs::create_dir_all(t.0.join("d/sub")).unwrap();
        fs::write(t.0.join("d/b.txt"), b"bb").unwrap();
        fs::write(t.0.join("d/a.txt"), b"a").unwrap();
        let l = list(&root, "/d").unwrap();
        let names: Vec<_> = l.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a.txt", "b.txt", "sub"]);
        assert_eq!(l[1].path, "/d/b.txt");
        assert_eq!(l[1].size, 2);
        assert!(l[2].is_dir);
        assert_eq!(list(&root, "/d/a.txt").unwrap_err().code, "invalid_request");
        assert_eq!(list(&root, "/nope").unwrap_err().code, "file_not_found");
        assert_eq!(
            open_read(&root, "/d").unwrap_err().message,
            "/d is a directory"
        );
        assert_eq!(delete(&root, "/d", false).unwrap_err().code, "conflict");
        assert_eq!(
            rename(&root, "/d", "/d/sub/x").unwrap_err().code,
            "invalid_request"
        );
        rename(&root, "/d/a.txt", "/e/f/a.txt").unwrap();
        assert_eq!(fs::read(t.0.join("e/f/a.txt")).unwrap(), b"a");
        assert_eq!(
            Upload::start(&root, "/e/f/a.txt/x").err().unwrap().code,
            "invalid_request"
        );
        delete(&root, "/d", true).unwrap();
        assert!(!t.0.join("d").exists());
        let s = stat(&root, "/e").unwrap();
        assert_eq!((s.name.as_str(), s.is_dir), ("e", true));
    }

    #[test]
    fn globbing() {
        let t = TempDir::new("glob");
        let root = Root::new(&t.0);
        for f in ["a.py", "b.txt", "x/c.py", "x/y/d.py", ".h/f.py"] {
            let p = t.0.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, b"").unwrap();
        }
        symlink("/x", t.0.join("link")).unwrap();
        assert_eq!(glob(&root, "/*.py"), ["/a.py"]);
        assert_eq!(
            glob(&root, "/**/*.py"),
            ["/.h/f.py", "/a.py", "/x/c.py", "/x/y/d.py"]
        );
        assert_eq!(glob(&root, "/x/**"), ["/x", "/x/c.py", "/x/y", "/x/y/d.py"]);
        assert_eq!(glob(&root, "/[ab].*"), ["/a.py", "/b.txt"]);
        assert_eq!(glob(&root, "/link/c.py"), ["/link/c.py"]);
        assert_eq!(glob(&root, "/link/*.py"), ["/link/c.py"]);
        assert!(glob(&root, "/nope/*").is_empty());
    }
}
