//! `stacyvm image …`: the local OCI image store (`<data_dir>/images`) that
//! image-based providers build sandbox root filesystems from. Works on the
//! store directly (no server needed); safe to use while the server runs.

use anyhow::Context;
use clap::Subcommand;
use stacyvm_images::{ImageInfo, ImageStore, PullProgress, StoreOptions};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Pull an image from a registry: `python:3.12`, `ghcr.io/org/img:tag`,
    /// `127.0.0.1:5000/team/app@sha256:…`.
    Pull { reference: String },
    /// Import a root filesystem as a single-layer image: a tarball (plain or
    /// gzip; `-` reads stdin) or a directory.
    Import {
        /// Tarball, `-` for stdin, or directory.
        source: String,
        /// Image name, e.g. `stacyvm-test/python:bookworm`.
        name: String,
    },
    /// List stored images.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image and every layer no other image uses.
    Rm { reference: String },
}

/// Run an `image` subcommand against `<data_dir>/images`.
pub async fn run(
    cmd: ImageCmd,
    root: PathBuf,
    insecure_registries: Vec<String>,
) -> anyhow::Result<i32> {
    let store = ImageStore::open(
        &root,
        StoreOptions {
            insecure_registries,
            ..StoreOptions::default()
        },
    )
    .with_context(|| format!("opening the image store at {}", root.display()))?;
    match cmd {
        ImageCmd::Pull { reference } => {
            let bars = Bars::new(std::io::stderr().is_terminal());
            let info = store
                .pull(&reference, &|p: &PullProgress| bars.event(p))
                .await;
            bars.finish();
            let info = info?;
            println!(
                "{} {} ({})",
                info.reference,
                info.digest,
                human_bytes(info.size)
            );
            Ok(0)
        }
        ImageCmd::Import { source, name } => {
            let started = Instant::now();
            let info = tokio::task::spawn_blocking(move || import(&store, &source, &name))
                .await
                .context("the import task failed")??;
            eprintln!("imported in {:.1}s", started.elapsed().as_secs_f64());
            println!(
                "{} {} ({})",
                info.reference,
                info.digest,
                human_bytes(info.size)
            );
            Ok(0)
        }
        ImageCmd::Ls { json } => {
            let images = store.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else {
                print!("{}", table(&images));
            }
            Ok(0)
        }
        ImageCmd::Rm { reference } => {
            let r = reference.clone();
            tokio::task::spawn_blocking(move || store.remove(&r))
                .await
                .context("the remove task failed")??;
            println!("removed {reference}");
            Ok(0)
        }
    }
}

fn import(store: &ImageStore, source: &str, name: &str) -> anyhow::Result<ImageInfo> {
    if source == "-" {
        let stdin = std::io::stdin();
        return Ok(store.import_tar(name, stdin.lock())?);
    }
    let path = Path::new(source);
    let meta = std::fs::metadata(path).with_context(|| format!("reading {source}"))?;
    if meta.is_dir() {
        Ok(store.import_dir(name, path)?)
    } else {
        let f = std::fs::File::open(path).with_context(|| format!("opening {source}"))?;
        Ok(store.import_tar(name, std::io::BufReader::with_capacity(1 << 20, f))?)
    }
}

fn short_digest(d: &str) -> &str {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    &hex[..hex.len().min(12)]
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn table(images: &[ImageInfo]) -> String {
    let rows: Vec<[String; 4]> = images
        .iter()
        .map(|i| {
            [
                i.reference.clone(),
                short_digest(&i.digest).to_string(),
                human_bytes(i.size),
                i.created_at
                    .replace('T', " ")
                    .trim_end_matches('Z')
                    .to_string(),
            ]
        })
        .collect();
    let header = ["REFERENCE", "DIGEST", "SIZE", "CREATED"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 4]| {
        let s = format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3]]);
    }
    out
}

// ---------------------------------------------------------------- progress

#[derive(Debug, Clone, Copy, PartialEq)]
enum LayerState {
    Waiting,
    Downloading { done: u64, total: u64 },
    Extracting,
    Done,
    Stored,
}

struct BarsInner {
    order: Vec<String>,
    layers: HashMap<String, LayerState>,
    /// Lines of the last redraw (TTY), to move back over.
    drawn: usize,
    last_draw: Option<Instant>,
    finished: bool,
}

/// Per-layer progress on stderr: redrawn in place on a terminal, periodic
/// plain lines otherwise.
struct Bars {
    tty: bool,
    inner: Mutex<BarsInner>,
}

const TTY_REDRAW: Duration = Duration::from_millis(100);
const PLAIN_INTERVAL: Duration = Duration::from_secs(2);
const BAR_WIDTH: usize = 30;

impl Bars {
    fn new(tty: bool) -> Bars {
        Bars {
            tty,
            inner: Mutex::new(BarsInner {
                order: Vec::new(),
                layers: HashMap::new(),
                drawn: 0,
                last_draw: None,
                finished: false,
            }),
        }
    }

    fn event(&self, p: &PullProgress) {
        let Ok(mut st) = self.inner.lock() else {
            return;
        };
        let mut err = std::io::stderr().lock();
        let set = |st: &mut BarsInner, digest: &str, s: LayerState| {
            if !st.layers.contains_key(digest) {
                st.order.push(digest.to_string());
            }
            let changed = st
                .layers
                .insert(digest.to_string(), s)
                .map(|old| std::mem::discriminant(&old) != std::mem::discriminant(&s));
            changed.unwrap_or(true)
        };
        let force;
        match p {
            PullProgress::Resolving { reference } => {
                let _ = writeln!(err, "Pulling {reference}");
                return;
            }
            PullProgress::Resolved {
                digest,
                layers,
                download_bytes,
                ..
            } => {
                let _ = writeln!(
                    err,
                    "Digest {digest}: {layers} layer{}, {} to download",
                    if *layers == 1 { "" } else { "s" },
                    human_bytes(*download_bytes)
                );
                return;
            }
            PullProgress::LayerExists { digest, .. } => {
                force = set(&mut st, digest, LayerState::Stored);
                if !self.tty {
                    let _ = writeln!(err, "  {}: already stored", short_digest(digest));
                }
            }
            PullProgress::Layer {
                digest,
                downloaded,
                total,
            } => {
                let first = set(
                    &mut st,
                    digest,
                    LayerState::Downloading {
                        done: *downloaded,
                        total: *total,
                    },
                );
                force = first;
                if !self.tty && first {
                    let _ = writeln!(
                        err,
                        "  {}: downloading {}",
                        short_digest(digest),
                        human_bytes(*total)
                    );
                }
            }
            PullProgress::Extracting { digest } => {
                force = set(&mut st, digest, LayerState::Extracting);
                if !self.tty {
                    let _ = writeln!(err, "  {}: extracting", short_digest(digest));
                }
            }
            PullProgress::LayerDone { digest } => {
                force = set(&mut st, digest, LayerState::Done);
                if !self.tty {
                    let _ = writeln!(err, "  {}: done", short_digest(digest));
                }
            }
            PullProgress::Done {
                downloaded,
                elapsed,
                ..
            } => {
                self.redraw(&mut st, &mut err);
                let _ = writeln!(
                    err,
                    "Downloaded {} in {:.1}s",
                    human_bytes(*downloaded),
                    elapsed.as_secs_f64()
                );
                // The bars are final; never move back over this line.
                st.finished = true;
                return;
            }
            _ => return,
        }
        let due = st
            .last_draw
            .is_none_or(|t| t.elapsed() >= if self.tty { TTY_REDRAW } else { PLAIN_INTERVAL });
        if self.tty && (force || due) {
            self.redraw(&mut st, &mut err);
        } else if !self.tty && due {
            // A plain progress line for the layers being downloaded.
            let parts: Vec<String> = st
                .order
                .iter()
                .filter_map(|d| match st.layers.get(d) {
                    Some(LayerState::Downloading { done, total }) if done < total => Some(format!(
                        "{} {}/{}",
                        short_digest(d),
                        human_bytes(*done),
                        human_bytes(*total)
                    )),
                    _ => None,
                })
                .collect();
            if !parts.is_empty() {
                let _ = writeln!(err, "  downloading: {}", parts.join(", "));
            }
            st.last_draw = Some(Instant::now());
        }
    }

    fn redraw(&self, st: &mut BarsInner, err: &mut impl Write) {
        if !self.tty || st.finished {
            return;
        }
        let mut out = String::new();
        if st.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", st.drawn));
        }
        for d in &st.order {
            let state = st.layers.get(d).copied().unwrap_or(LayerState::Waiting);
            out.push_str("\r\x1b[2K");
            out.push_str(&line(d, state));
            out.push('\n');
        }
        st.drawn = st.order.len();
        st.last_draw = Some(Instant::now());
        let _ = err.write_all(out.as_bytes());
        let _ = err.flush();
    }

    fn finish(&self) {
        if let Ok(mut st) = self.inner.lock() {
            let mut err = std::io::stderr().lock();
            self.redraw(&mut st, &mut err);
        }
    }
}

fn line(digest: &str, s: LayerState) -> String {
    let d = short_digest(digest);
    match s {
        LayerState::Waiting => format!("{d}  waiting"),
        LayerState::Stored => format!("{d}  already stored"),
        LayerState::Extracting => format!("{d}  [{}]  extracting", "=".repeat(BAR_WIDTH)),
        LayerState::Done => format!("{d}  [{}]  done", "=".repeat(BAR_WIDTH)),
        LayerState::Downloading { done, total } => {
            let frac = if total == 0 {
                0.0
            } else {
                (done as f64 / total as f64).min(1.0)
            };
            let filled = (frac * BAR_WIDTH as f64) as usize;
            let bar = if filled >= BAR_WIDTH {
                "=".repeat(BAR_WIDTH)
            } else {
                format!(
                    "{}>{}",
                    "=".repeat(filled),
                    " ".repeat(BAR_WIDTH - filled - 1)
                )
            };
            format!(
                "{d}  [{bar}]  {} / {}",
                human_bytes(done),
                human_bytes(total)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(45_881_298), "45.9 MB");
        assert_eq!(human_bytes(1_200_000_000), "1.2 GB");
    }

    #[test]
    fn bars() {
        let l = line(
            "sha256:c9ab42d400e6fdcfb22ede22dc2fa3906395a314defc52a1bde80ffd1f1fc59d",
            LayerState::Downloading {
                done: 50,
                total: 100,
            },
        );
        assert!(
            l.starts_with(&format!("c9ab42d400e6  [{}>", "=".repeat(15))),
            "{l}"
        );
        assert!(l.ends_with("50 B / 100 B"), "{l}");
    }

    #[test]
    fn tables() {
        let t = table(&[ImageInfo {
            reference: "docker.io/library/python:3.12".into(),
            digest: "sha256:0123456789abcdef".into(),
            layers: vec![],
            config: Default::default(),
            size: 1_500_000,
            created_at: "2026-01-02T03:04:05Z".into(),
            source: stacyvm_images::ImageSource::Registry,
        }]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("REFERENCE "), "{t}");
        assert_eq!(
            lines[1],
            "docker.io/library/python:3.12  0123456789ab  1.5 MB  2026-01-02 03:04:05"
        );
    }
}
