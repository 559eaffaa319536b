//! The `/v1/files*` routes: read, write, delete, list, stat, glob, move,
//! chmod. Every path goes through [`stacyvm_agent_proto::path::normalize`];
//! the checks of the requests are the protocol crate's
//! ([`stacyvm_agent_proto::request`]).
//!
//! Blocking filesystem work runs on tokio's blocking pool so a slow disk or a
//! big tree never stalls the event loop (and with it every running exec).

use crate::body::{self, status, Body};
use crate::error::ApiError;
use crate::glob;
use crate::mem;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::Response;
use stacyvm_agent_proto::path::{base_name, join, parent_of};
use stacyvm_agent_proto::request::{
    chmod_target, delete_target, move_needed, move_paths, normalize, write_target,
};
use stacyvm_agent_proto::{ChmodRequest, FileEntry, MoveRequest, WriteResult};
use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use tokio::sync::mpsc;

/// Size of one chunk of a file download.
const READ_CHUNK: usize = 256 * 1024;
/// Body frames queued for the upload writer.
const WRITE_QUEUE: usize = 32;
/// The upload writer gathers up to this many bytes into one vectored write.
const WRITE_BATCH: usize = 1024 * 1024;

/// Run blocking filesystem work off the event loop.
async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("file task failed: {e}"))))
}

/// `GET /v1/files?path=`: stream the file's bytes.
pub async fn read(raw_path: &str) -> Result<Response<Body>, ApiError> {
    let p = normalize(raw_path)?;
    let (file, meta) = blocking(move || {
        // O_NONBLOCK so opening a FIFO cannot hang; refused below anyway.
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
            .map_err(|e| ApiError::from_io(&e, &p))?;
        let meta = file.metadata().map_err(|e| ApiError::from_io(&e, &p))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(ApiError::invalid(format!("{p} is a directory")));
        }
        if ft.is_fifo() || ft.is_socket() {
            return Err(ApiError::invalid(format!("{p} is not a regular file")));
        }
        // Back to blocking reads (matters for character devices).
        // SAFETY: fcntl on a file descriptor we own.
        unsafe {
            let fd = file.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
        Ok((file, meta))
    })
    .await?;
    // Regular files announce their length; special files (/proc, pipes)
    // report 0 or lie, so they are sent chunked until EOF.
    let known_len = (meta.is_file() && meta.len() > 0).then_some(meta.len());
    let (tx, body) = Body::channel(4);
    tokio::task::spawn_blocking(move || send_file(file, known_len, tx));
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(len) = known_len {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok(resp)
}

/// Blocking: read `file` in chunks into the body channel.
fn send_file(file: File, len: Option<u64>, tx: mpsc::Sender<io::Result<Bytes>>) {
    let sent = send_chunks(file, len, &tx);
    mem::transferred(sent);
}

/// Blocking: stream `file` into `tx`; returns how many bytes were queued.
fn send_chunks(mut file: File, len: Option<u64>, tx: &mpsc::Sender<io::Result<Bytes>>) -> u64 {
    let mut sent = 0u64;
    let mut left = len.unwrap_or(u64::MAX);
    while left > 0 {
        let want = READ_CHUNK.min(usize::try_from(left).unwrap_or(READ_CHUNK));
        let mut buf = BytesMut::zeroed(want);
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return sent;
            }
        };
        buf.truncate(n);
        left -= n as u64;
        sent += n as u64;
        if tx.blocking_send(Ok(buf.freeze())).is_err() {
            return sent; // client went away
        }
    }
    sent
}

/// A random hex suffix for temporary file names.
fn random_suffix() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `len` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        bytes = (nanos ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn create_parents(dir: &str) -> Result<(), ApiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| ApiError::from_create_dirs_io(&e, dir))
}

/// Write every buffer in `bufs` (emptying it), with vectored writes.
fn write_all_bufs(file: &mut File, bufs: &mut VecDeque<Bytes>) -> io::Result<()> {
    while !bufs.is_empty() {
        let slices: Vec<IoSlice<'_>> = bufs.iter().take(64).map(|b| IoSlice::new(b)).collect();
        let mut n = match file.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while n > 0 {
            let Some(front) = bufs.front_mut() else { break };
            if n >= front.len() {
                n -= front.len();
                bufs.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}

/// `PUT /v1/files?path=&mode=`: write the streamed body atomically.
pub async fn write(
    raw_path: &str,
    raw_mode: Option<&str>,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let (p, mode) = write_target(raw_path, raw_mode)?;
    let target = p.clone();
    let (file, tmp) = blocking(move || {
        if fs::metadata(&target).is_ok_and(|m| m.is_dir()) {
            return Err(ApiError::invalid(format!("{target} is a directory")));
        }
        let dir = parent_of(&target);
        create_parents(dir)?;
        let name = base_name(&target);
        loop {
            let tmp = join(dir, &format!(".{name}.stacyvm-tmp-{}", random_suffix()));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
            {
                Ok(f) => return Ok((f, tmp)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ApiError::from_io(&e, &target)),
            }
        }
    })
    .await?;

    // Removes the temporary file unless it was renamed into place, also when
    // the client hangs up and this future is dropped.
    let mut guard = TempFile {
        path: tmp,
        keep: false,
    };

    // A blocking writer drains a channel of body frames while the event loop
    // reads the request, so network and disk overlap. Frames are written as
    // they are (no copying), gathered into vectored writes.
    let (tx, mut rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let writer = tokio::task::spawn_blocking(move || -> io::Result<(File, u64)> {
        let mut file = file;
        let mut size = 0u64;
        let mut bufs: VecDeque<Bytes> = VecDeque::new();
        while let Some(first) = rx.blocking_recv() {
            let mut batch = first.len();
            bufs.push_back(first);
            while batch < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(b) => {
                        batch += b.len();
                        bufs.push_back(b);
                    }
                    Err(_) => break,
                }
            }
            write_all_bufs(&mut file, &mut bufs)?;
            size += batch as u64;
        }
        Ok((file, size))
    });

    let mut body = body;
    let mut received = 0u64;
    let mut upload_err: Option<ApiError> = None;
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(f) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            Err(e) => {
                upload_err = Some(ApiError::invalid(format!("upload interrupted: {e}")));
                break;
            }
        };
        if data.is_empty() {
            continue;
        }
        received += data.len() as u64;
        if tx.send(data).await.is_err() {
            break; // the writer failed; its error is reported below
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ApiError::internal(format!("write task failed: {e}")))
        .and_then(|r| r.map_err(|e| ApiError::from_io(&e, &p)));

    let (target, tmp2) = (p.clone(), guard.path.clone());
    let finished = blocking(move || {
        if let Some(e) = upload_err {
            return Err(e);
        }
        let (file, size) = written?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| ApiError::from_io(&e, &target))?;
        drop(file);
        fs::rename(&tmp2, &target).map_err(|e| ApiError::from_io(&e, &target))?;
        Ok(size)
    })
    .await;
    mem::transferred(received);
    let size = finished?;
    guard.keep = true;
    Ok(body::ok(&WriteResult { size }))
}

/// A temporary upload file, removed on drop unless `keep` is set.
struct TempFile {
    path: String,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `DELETE /v1/files?path=&recursive=`.
pub async fn delete(raw_path: &str, recursive: bool) -> Result<Response<Body>, ApiError> {
    let p = delete_target(raw_path)?;
    blocking(move || {
        let meta = fs::symlink_metadata(&p).map_err(|e| ApiError::from_io(&e, &p))?;
        let res = if !meta.is_dir() {
            fs::remove_file(&p)
        } else if recursive {
            // Does not follow symlinks inside the tree.
            fs::remove_dir_all(&p)
        } else {
            fs::remove_dir(&p)
        };
        res.map_err(|e| ApiError::from_delete_io(&e, &p))
    })
    .await?;
    Ok(status("deleted"))
}

/// `GET /v1/files/list?path=`: one directory level, sorted by name.
pub async fn list(raw_path: &str) -> Result<Response<Body>, ApiError> {
    let p = normalize(raw_path)?;
    let entries = blocking(move || {
        let meta = fs::metadata(&p).map_err(|e| ApiError::from_io(&e, &p))?;
        if !meta.is_dir() {
            return Err(ApiError::invalid(format!("{p} is not a directory")));
        }
        let dir = fs::read_dir(&p).map_err(|e| ApiError::from_io(&e, &p))?;
        // DirEntry::metadata does not follow symlinks.
        FileEntry::listing(
            &p,
            dir.map(|ent| {
                ent.map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        e.metadata().ok(),
                    )
                })
            }),
        )
    })
    .await?;
    Ok(body::ok(&entries))
}

/// `GET /v1/files/stat?path=`.
pub async fn stat(raw_path: &str) -> Result<Response<Body>, ApiError> {
    let p = normalize(raw_path)?;
    let e = blocking(move || {
        let m = fs::symlink_metadata(&p).map_err(|e| ApiError::from_io(&e, &p))?;
        let name = base_name(&p);
        Ok(FileEntry::from_metadata(p, name, &m))
    })
    .await?;
    Ok(body::ok(&e))
}

/// `GET /v1/files/glob?pattern=`.
pub async fn glob(pattern: &str) -> Result<Response<Body>, ApiError> {
    let pat = normalize(pattern)?;
    let found = blocking(move || Ok(glob::glob(&pat))).await?;
    Ok(body::ok(&found))
}

/// `POST /v1/files/move`.
pub async fn rename(req: MoveRequest) -> Result<Response<Body>, ApiError> {
    let (from, to) = move_paths(&req)?;
    blocking(move || {
        fs::symlink_metadata(&from).map_err(|e| ApiError::from_io(&e, &from))?;
        if !move_needed(&from, &to)? {
            return Ok(());
        }
        create_parents(parent_of(&to))?;
        match fs::rename(&from, &to) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                copy_tree(Path::new(&from), Path::new(&to))
                    .map_err(|e| ApiError::from_io(&e, &to))?;
                let meta = fs::symlink_metadata(&from).map_err(|e| ApiError::from_io(&e, &from))?;
                if meta.is_dir() {
                    fs::remove_dir_all(&from)
                } else {
                    fs::remove_file(&from)
                }
                .map_err(|e| ApiError::from_io(&e, &from))
            }
            Err(e) => Err(ApiError::from_io(&e, &to)),
        }
    })
    .await?;
    Ok(status("moved"))
}

/// Copy a file, symlink or directory tree (for moves across filesystems).
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(from)?;
        std::os::unix::fs::symlink(target, to)
    } else if ft.is_dir() {
        match fs::create_dir(to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && to.is_dir() => {}
            Err(e) => return Err(e),
        }
        for ent in fs::read_dir(from)? {
            let ent = ent?;
            copy_tree(&ent.path(), &to.join(ent.file_name()))?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
    } else {
        fs::copy(from, to).map(|_| ())
    }
}

/// `POST /v1/files/chmod`.
pub async fn chmod(req: ChmodRequest) -> Result<Response<Body>, ApiError> {
    let (p, mode) = chmod_target(&req)?;
    blocking(move || {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .map_err(|e| ApiError::from_io(&e, &p))
    })
    .await?;
    Ok(status("chmod applied"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_suffixes_differ() {
        let a = random_suffix();
        assert_eq!(a.len(), 16);
        assert_ne!(a, random_suffix());
    }
}
