//! The listener (Unix socket, or TCP with a bearer token), signal handling
//! and request routing.

use crate::alog;
use crate::body::{self, read_json, Body};
use crate::error::ApiError;
use crate::reaper::{self, Reaper};
use crate::{exec, files, logbuf, stats, tunnel};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use stacyvm_agent_proto::query::{bool_param, query_param, required_param};
use stacyvm_agent_proto::request::log_lines;
use stacyvm_agent_proto::{Health, Route, DEFAULT_WORKDIR};
use std::convert::Infallible;
use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket (the default; the provider exposes it on the host).
    Unix(PathBuf),
    /// A TCP address, for runtimes whose sandboxes the server reaches over
    /// the network. Requires [`Config::token`].
    Tcp(SocketAddr),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Startup options.
#[derive(Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: Listen,
    /// Bearer token every request must carry (TCP only).
    pub token: Option<String>,
    /// Create [`DEFAULT_WORKDIR`] at start.
    pub create_workdir: bool,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("create_workdir", &self.create_workdir)
            .finish()
    }
}

/// Shared state of all connections.
#[derive(Clone)]
struct State {
    reaper: Reaper,
    /// The bearer token requests must carry, when set.
    token: Option<Arc<[u8]>>,
}

/// A bound listener of either kind.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    async fn bind(listen: &Listen) -> io::Result<Listener> {
        match listen {
            Listen::Unix(path) => bind(path).map(Listener::Unix),
            Listen::Tcp(addr) => TcpListener::bind(addr).await.map(Listener::Tcp),
        }
    }

    /// The address actually bound (a TCP port 0 becomes the chosen port).
    fn local(&self, listen: &Listen) -> String {
        match self {
            Listener::Unix(_) => listen.to_string(),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => listen.to_string(),
            },
        }
    }

    /// Accept one connection and serve it on its own task.
    async fn accept_and_serve(&self, state: &State) -> io::Result<()> {
        match self {
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                tokio::spawn(serve(stream, state.clone()));
            }
            Listener::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, state.clone()));
            }
        }
        Ok(())
    }
}

/// Serve HTTP/1.1 (with upgrades, for tunnels) on one connection.
async fn serve<S>(stream: S, state: State)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
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
}

/// Compare two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Whether the request carries `Authorization: Bearer <token>`.
fn authorized<B>(req: &Request<B>, token: &[u8]) -> bool {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some(scheme) = value.get(..7) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let given = value[7..].trim_ascii();
    constant_time_eq(given, token)
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
        "stacyvm-agent {} starting (pid {pid}, {})",
        env!("CARGO_PKG_VERSION"),
        cfg.listen
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
    let listener = match Listener::bind(&cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            alog!("cannot listen on {}: {e}", cfg.listen);
            return 1;
        }
    };
    let token = match (&cfg.listen, cfg.token) {
        (Listen::Tcp(_), Some(t)) => Some(Arc::from(t.into_bytes())),
        (Listen::Tcp(_), None) => {
            alog!("refusing to listen on {} without a token", cfg.listen);
            return 1;
        }
        (Listen::Unix(_), _) => None,
    };
    alog!(
        "listening on {}{}",
        listener.local(&cfg.listen),
        if token.is_some() {
            " (bearer token required)"
        } else {
            ""
        }
    );
    let state = State { reaper, token };
    loop {
        tokio::select! {
            conn = listener.accept_and_serve(&state) => match conn {
                Ok(()) => {}
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
    if let Listen::Unix(path) = &cfg.listen {
        let _ = fs::remove_file(path);
    }
    0
}

/// Route one request; every error becomes an [`ErrorBody`](stacyvm_agent_proto::ErrorBody) answer.
async fn handle(state: State, req: Request<Incoming>) -> Response<Body> {
    if let Some(token) = &state.token {
        if !authorized(&req, token) {
            let mut resp = body::error_response(&ApiError::unauthorized(
                "missing or wrong bearer token (Authorization: Bearer <token>)",
            ));
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    match route(state, req).await {
        Ok(resp) => resp,
        Err(e) => body::error_response(&e),
    }
}

async fn route(state: State, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let route = Route::of(req.method().as_str(), req.uri().path())?;
    let query = req.uri().query().map(str::to_string);
    let q = query.as_deref();
    match route {
        Route::Health => Ok(body::ok(&Health::ok(
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
        ))),
        Route::Exec => exec::handle(state.reaper, read_json(req).await?).await,
        Route::ReadFile => files::read(&required_param(q, "path")?).await,
        Route::WriteFile => {
            let p = required_param(q, "path")?;
            let mode = query_param(q, "mode")?;
            files::write(&p, mode.as_deref(), req.into_body()).await
        }
        Route::DeleteFile => {
            let p = required_param(q, "path")?;
            files::delete(&p, bool_param(q, "recursive")?).await
        }
        Route::ListFiles => files::list(&required_param(q, "path")?).await,
        Route::StatFile => files::stat(&required_param(q, "path")?).await,
        Route::Glob => files::glob(&required_param(q, "pattern")?).await,
        Route::MoveFile => files::rename(read_json(req).await?).await,
        Route::Chmod => files::chmod(read_json(req).await?).await,
        Route::Logs => Ok(body::ok(&logbuf::tail(log_lines(q)?))),
        Route::Stats => Ok(body::ok(&stats::collect().await)),
        Route::Tunnel => tunnel::handle(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri("/v1/health");
        if let Some(a) = auth {
            b = b.header(AUTHORIZATION, a);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn bearer_tokens_are_checked() {
        let t = b"0123456789abcdef";
        assert!(authorized(&req(Some("Bearer 0123456789abcdef")), t));
        assert!(authorized(&req(Some("bearer  0123456789abcdef ")), t));
        assert!(!authorized(&req(None), t));
        assert!(!authorized(&req(Some("Bearer")), t));
        assert!(!authorized(&req(Some("Bearer ")), t));
        assert!(!authorized(&req(Some("Basic 0123456789abcdef")), t));
        assert!(!authorized(&req(Some("Bearer 0123456789abcdeF")), t));
        assert!(!authorized(&req(Some("Bearer 0123456789abcde")), t));
        assert!(!authorized(&req(Some("Bearer 0123456789abcdef0")), t));
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab\0", b"ab"));
    }
}
