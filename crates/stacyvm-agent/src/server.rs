//! The Unix-socket listener, signal handling and request routing.

use crate::alog;
use crate::body::{self, bool_param, query_param, read_json, required_param, Body};
use crate::error::ApiError;
use crate::reaper::{self, Reaper};
use crate::{exec, files, logbuf, stats, tunnel};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use stacyvm_agent_proto::{Health, DEFAULT_WORKDIR};
use std::convert::Infallible;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

/// Startup options.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub socket: PathBuf,
    /// Create [`DEFAULT_WORKDIR`] at start.
    pub create_workdir: bool,
}

/// Default number of lines `GET /v1/logs` answers.
const DEFAULT_LOG_LINES: usize = 100;
/// Most lines `GET /v1/logs` accepts to be asked for.
const MAX_LOG_LINES: usize = 10_000;

/// Shared state of all connections.
#[derive(Clone)]
struct State {
    reaper: Reaper,
}

/// Remove a stale socket, bind, and restrict the socket to its owner.
fn bind(path: &Path) -> io::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    // Create the socket owner-only from the start; nothing else runs yet, so
    // changing the process umask briefly is safe.
    // SAFETY: umask has no preconditions.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Run the agent until SIGTERM/SIGINT. Returns the process exit code.
pub async fn run(cfg: Config) -> i32 {
    let pid = std::process::id();
    alog!(
        "stacyvm-agent {} starting (pid {pid}, socket {})",
        env!("CARGO_PKG_VERSION"),
        cfg.socket.display()
    );
    if pid != 1 {
        reaper::become_subreaper();
    }
    if cfg.create_workdir {
        if let Err(e) = fs::create_dir_all(DEFAULT_WORKDIR) {
            alog!("cannot create {DEFAULT_WORKDIR}: {e}");
        }
    }
    let reaper = match Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            alog!("cannot install the SIGCHLD handler: {e}");
            return 1;
        }
    };
    let (mut sigterm, mut sigint) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            alog!("cannot install signal handlers: {e}");
            return 1;
        }
    };
    let listener = match bind(&cfg.socket) {
        Ok(l) => l,
        Err(e) => {
            alog!("cannot listen on {}: {e}", cfg.socket.display());
            return 1;
        }
    };
    alog!("listening on {}", cfg.socket.display());
    let state = State { reaper };
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(handle(state, req).await) }
                        });
                        let conn = http1::Builder::new()
                            .keep_alive(true)
                            .serve_connection(TokioIo::new(stream), svc)
                            .with_upgrades();
                        if let Err(e) = conn.await {
                            if !e.is_incomplete_message() && !e.is_canceled() {
                                alog!("connection error: {e}");
                            }
                        }
                    });
                }
                Err(e) => {
                    alog!("accept failed: {e}");
                    // Typically EMFILE; don't spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = sigterm.recv() => {
                alog!("SIGTERM received; exiting");
                break;
            }
            _ = sigint.recv() => {
                alog!("SIGINT received; exiting");
                break;
            }
        }
    }
    let _ = fs::remove_file(&cfg.socket);
    0
}

/// Route one request; every error becomes an [`ErrorBody`](stacyvm_agent_proto::ErrorBody) answer.
async fn handle(state: State, req: Request<Incoming>) -> Response<Body> {
    match route(state, req).await {
        Ok(resp) => resp,
        Err(e) => body::error_response(&e),
    }
}

async fn route(state: State, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let q = query.as_deref();
    let wrong_method = || ApiError::method_not_allowed(&method, &path);
    match path.as_str() {
        "/v1/health" => match method {
            Method::GET => Ok(body::ok(&Health {
                status: "ok".to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
            })),
            _ => Err(wrong_method()),
        },
        "/v1/exec" => match method {
            Method::POST => exec::handle(state.reaper, read_json(req).await?).await,
            _ => Err(wrong_method()),
        },
        "/v1/files" => match method {
            Method::GET => files::read(&required_param(q, "path")?).await,
            Method::PUT => {
                let p = required_param(q, "path")?;
                let mode = query_param(q, "mode")?;
                files::write(&p, mode.as_deref(), req.into_body()).await
            }
            Method::DELETE => {
                let p = required_param(q, "path")?;
                files::delete(&p, bool_param(q, "recursive")?).await
            }
            _ => Err(wrong_method()),
        },
        "/v1/files/list" => match method {
            Method::GET => files::list(&required_param(q, "path")?).await,
            _ => Err(wrong_method()),
        },
        "/v1/files/stat" => match method {
            Method::GET => files::stat(&required_param(q, "path")?).await,
            _ => Err(wrong_method()),
        },
        "/v1/files/glob" => match method {
            Method::GET => files::glob(&required_param(q, "pattern")?).await,
            _ => Err(wrong_method()),
        },
        "/v1/files/move" => match method {
            Method::POST => files::rename(read_json(req).await?).await,
            _ => Err(wrong_method()),
        },
        "/v1/files/chmod" => match method {
            Method::POST => files::chmod(read_json(req).await?).await,
            _ => Err(wrong_method()),
        },
        "/v1/logs" => match method {
            Method::GET => {
                let n = match query_param(q, "lines")?.as_deref() {
                    None | Some("") => DEFAULT_LOG_LINES,
                    Some(s) => match s.parse::<usize>() {
                        Ok(n) if n <= MAX_LOG_LINES => n,
                        _ => {
                            return Err(ApiError::invalid(format!(
                                "lines must be a number from 0 to {MAX_LOG_LINES}"
                            )))
                        }
                    },
                };
                Ok(body::ok(&logbuf::tail(n)))
            }
            _ => Err(wrong_method()),
        },
        "/v1/stats" => match method {
            Method::GET => Ok(body::ok(&stats::collect().await)),
            _ => Err(wrong_method()),
        },
        "/v1/tunnel" => match method {
            Method::GET => tunnel::handle(req).await,
            _ => Err(wrong_method()),
        },
        _ => Err(ApiError::no_route(&path)),
    }
}
