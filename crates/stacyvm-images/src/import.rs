//! Turning a root filesystem directory into a tar stream, deterministically
//! (entries sorted by name, full metadata), so that importing the same tree
//! twice gives the same layer digest.

use crate::error::IoContext;
use crate::ImageError;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// The reading end of a directory being archived by a background thread.
pub struct DirTarStream {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    worker: Option<JoinHandle<Result<(), ImageError>>>,
}

impl DirTarStream {
    /// Start archiving `dir` (which must be a directory).
    pub fn new(dir: &Path) -> Result<DirTarStream, ImageError> {
        let meta = std::fs::metadata(dir).ctx("reading", dir)?;
        if !meta.is_dir() {
            return Err(ImageError::io_path(
                "importing",
                dir,
                io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
            ));
        }
        let (tx, rx) = sync_channel::<Vec<u8>>(8);
        let root = dir.to_path_buf();
        let worker = std::thread::Builder::new()
            .name("image-import-tar".to_string())
            .spawn(move || write_tar(&root, tx))
            .map_err(|e| ImageError::io("starting the archiver thread", e))?;
        Ok(DirTarStream {
            rx,
            buf: Vec::new(),
            pos: 0,
            worker: Some(worker),
        })
    }

    /// Wait for the archiver and return its error, if any.
    pub fn finish(mut self) -> Result<(), ImageError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), ImageError> {
        match self.worker.take() {
            Some(h) => match h.join() {
                Ok(r) => r,
                Err(_) => Err(ImageError::Corrupt(
                    "the directory archiver panicked".to_string(),
                )),
            },
            None => Ok(()),
        }
    }
}

impl Read for DirTarStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                // The writer is gone: either done, or failed.
                Err(_) => {
                    return match self.join() {
                        Ok(()) => Ok(0),
                        Err(e) => Err(io::Error::other(e.to_string())),
                    };
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

struct ChanWriter(SyncSender<Vec<u8>>);

impl Write for ChanWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0
            .send(data.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "reader went away"))?;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn write_tar(root: &Path, tx: SyncSender<Vec<u8>>) -> Result<(), ImageError> {
    let w = io::BufWriter::with_capacity(256 * 1024, ChanWriter(tx));
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    b.sparse(false);
    b.mode(tar::HeaderMode::Complete);
    // The root directory itself, for its mode and owner.
    b.append_path_with_name(root, ".").ctx("archiving", root)?;
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .ctx("reading", &dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .ctx("reading", &dir)?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let rel_path = rel.join(&name);
            let full = root.join(&rel_path);
            let ft = std::fs::symlink_metadata(&full)
                .ctx("reading", &full)?
                .file_type();
            if ft.is_socket() {
                tracing::debug!(path = %full.display(), "skipping socket");
                continue;
            }
            b.append_path_with_name(&full, &rel_path)
                .ctx("archiving", &full)?;
            if ft.is_dir() {
                subdirs.push(rel_path);
            }
        }
        // A directory's entries, then its subdirectories, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    let mut w = b
        .into_inner()
        .map_err(|e| ImageError::io("finishing the archive", e))?;
    w.flush()
        .map_err(|e| ImageError::io("finishing the archive", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(dir: &Path) -> String {
        let mut s = DirTarStream::new(dir).unwrap();
        let mut h = crate::extract::HashingReader::new(&mut s);
        io::copy(&mut h, &mut io::sink()).unwrap();
        h.finish().0
    }

    #[test]
    fn archives_deterministically() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir_all(d.join("b/c")).unwrap();
        std::fs::write(d.join("b/c/f"), b"1").unwrap();
        std::fs::write(d.join("a"), b"2").unwrap();
        std::os::unix::fs::symlink("/nowhere", d.join("l")).unwrap();
        let one = digest_of(d);
        assert_eq!(one, digest_of(d));
        std::fs::write(d.join("a"), b"3").unwrap();
        assert_ne!(one, digest_of(d));

        let mut s = DirTarStream::new(d).unwrap();
        let mut a = tar::Archive::new(&mut s);
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, [".", "a", "b", "l", "b/c", "b/c/f"]);
    }

    #[test]
    fn missing_dir_is_an_error() {
        assert!(DirTarStream::new(Path::new("/nonexistent/dir")).is_err());
    }
}
