//! The in-process agent of one mock sandbox: the agent protocol (see
//! [`stacyvm_agent_proto`]) over HTTP/1.1 on the sandbox's Unix socket,
//! with the real agent's routes, JSON shapes and error codes. Files live
//! under the sandbox's root directory; exec is interpreted
//! ([`super::shell`]); the tunnel answers `502 port_closed` (nothing can
//! listen inside a mock sandbox).

use super::error::ApiError;
use super::exec::{self, BodySender, Sink};
use super::fs::{self, Root, Upload, DEFAULT_FILE_MODE};
use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use stacyvm_agent_proto::{
    parse_mode, path, ChmodRequest, ExecRequest, ExecResult, Health, MoveRequest, Stats, Status,
    WriteResult, TUNNEL_UPGRADE,
};
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Largest JSON request body accepted.
const JSON_BODY_LIMIT: usize = 8 * 1024 * 1024;
/// An oversized JSON body is read and discarded up to this size before the
/// 413 answer.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;
/// Size of one chunk of a file download.
const READ_CHUNK: usize = 256 * 1024;
/// Lines kept for `GET /v1/logs`.
const LOG_CAPACITY: usize = 1000;
/// Default number of lines `GET /v1/logs` answers.
const DEFAULT_LOG_LINES: usize = 100;
/// Most lines `GET /v1/logs` accepts to be asked for.
const MAX_LOG_LINES: usize = 10_000;

/// What the mock agent of one sandbox knows.
pub(crate) struct SandboxCtx {
    pub id: String,
    pub root: Root,
    /// The sandbox's environment (every exec starts from it).
    pub env: BTreeMap<String, String>,
    pub memory_mb: u64,
    logs: Mutex<VecDeque<String>>,
    running: AtomicU64,
    stop: watch::Receiver<bool>,
}

impl SandboxCtx {
    /// Add a diagnostic line (served by `GET /v1/logs`).
    pub fn log(&self, msg: &str) {
        tracing::debug!(sandbox = %self.id, "{msg}");
        let line = format!("{} {msg}", fs::rfc3339_millis(SystemTime::now()));
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        if logs.len() >= LOG_CAPACITY {
            logs.pop_front();
        }
        logs.push_back(line);
    }

    /// The last `n` log lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let skip = logs.len().saturating_sub(n);
        logs.iter().skip(skip).cloned().collect()
    }

    fn log_exec(&self, req: &ExecRequest, result: Option<&ExecResult>) {
        let argv0 = req.argv.first().map(String::as_str).unwrap_or("");
        match result {
            Some(r) => self.log(&format!(
                "exec {argv0:?} exit={} duration={:.3}ms{} (interpreted by the mock provider)",
                r.exit_code,
                r.duration_ns as f64 / 1e6,
                if r.timed_out { " timed_out" } else { "" }
            )),
            None => self.log(&format!("exec {argv0:?} abandoned: the client went away")),
        }
    }
}

/// Counts an exec as running while it lives (`pids` of `GET /v1/stats`).
struct Running(Arc<SandboxCtx>);

impl Running {
    fn new(ctx: &Arc<SandboxCtx>) -> Self {
        ctx.running.fetch_add(1, Ordering::Relaxed);
        Running(Arc::clone(ctx))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A sandbox being served. Dropping it stops the listener and every open
/// connection and exec.
pub(crate) struct Served {
    pub ctx: Arc<SandboxCtx>,
    pub socket: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Served {
    /// Whether the listener still runs.
    pub fn alive(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stop serving and remove the socket (if it is still ours: a socket).
    pub fn shut_down(self) {
        let socket = self.socket.clone();
        drop(self);
        if std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
            if let Err(e) = std::fs::remove_file(&socket) {
                tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the mock agent socket");
            }
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

/// Remove a stale socket, bind, and restrict the socket to its owner.
fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Start serving a sandbox on `socket`. Must be called inside a tokio
/// runtime.
pub(crate) fn serve(
    id: &str,
    root: Root,
    env: BTreeMap<String, String>,
    memory_mb: u64,
    socket: &Path,
) -> io::Result<Served> {
    let listener = bind(socket)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(SandboxCtx {
        id: id.to_string(),
        root,
        env,
        memory_mb,
        logs: Mutex::new(VecDeque::new()),
        running: AtomicU64::new(0),
        stop: stop_rx.clone(),
    });
    ctx.log(&format!(
        "mock agent serving {} (root {}); it runs no programs",
        socket.display(),
        ctx.root.dir().display()
    ));
    let task = tokio::spawn(accept_loop(listener, Arc::clone(&ctx), stop_rx));
    Ok(Served {
        ctx,
        socket: socket.to_path_buf(),
        stop: stop_tx,
        task,
    })
}

async fn accept_loop(
    listener: UnixListener,
    ctx: Arc<SandboxCtx>,
    mut stop: watch::Receiver<bool>,
) {
    // Dropping the set (when this task ends or is aborted) aborts every
    // connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    conns.spawn(serve_conn(stream, Arc::clone(&ctx)));
                }
                Err(e) => {
                    tracing::warn!(sandbox = %ctx.id, error = %e, "mock agent: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
}

async fn serve_conn(stream: UnixStream, ctx: Arc<SandboxCtx>) {
    let svc = service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, Infallible>(handle(ctx, req).await) }
    });
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    if let Err(e) = conn.await {
        if !e.is_incomplete_message() && !e.is_canceled() {
            tracing::debug!(error = %e, "mock agent connection ended with an error");
        }
    }
}

// ----- HTTP plumbing ------------------------------------------------------------

/// A response body: in memory, or fed through a channel (streamed exec
/// output, file downloads).
pub(crate) enum Body {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<io::Result<Bytes>>),
}

impl Body {
    fn channel(depth: usize) -> (BodySender, Body) {
        let (tx, rx) = mpsc::channel(depth);
        (tx, Body::Channel(rx))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Channel(rx) => match rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Channel(_) => SizeHint::default(),
        }
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(v) => {
            let mut resp = Response::new(Body::Full(Some(Bytes::from(v))));
            *resp.status_mut() = status;
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Err(e) => error_response(&ApiError::internal(format!("cannot encode answer: {e}"))),
    }
}

fn ok<T: Serialize>(value: &T) -> Response<Body> {
    json(StatusCode::OK, value)
}

fn status(s: &str) -> Response<Body> {
    ok(&Status {
        status: s.to_string(),
    })
}

fn error_response(err: &ApiError) -> Response<Body> {
    json(err.status, &err.body())
}

/// Read a JSON request body of at most [`JSON_BODY_LIMIT`] bytes.
async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT) {
        return Err(ApiError::too_large(JSON_BODY_LIMIT));
    }
    let mut body = req.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::invalid(format!("cannot read request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > DRAIN_LIMIT {
                return Err(ApiError::too_large(JSON_BODY_LIMIT));
            }
            if total <= JSON_BODY_LIMIT as u64 {
                buf.extend_from_slice(&data);
            }
        }
    }
    if total > JSON_BODY_LIMIT as u64 {
        return Err(ApiError::too_large(JSON_BODY_LIMIT));
    }
    serde_json::from_slice(&buf).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

/// Decode `%XX` escapes (`+` stays a plus); malformed input is refused.
fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::invalid("malformed percent-encoding in query"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::invalid("query is not valid UTF-8"))
}

fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, ApiError> {
    let Some(q) = query else { return Ok(None) };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k)? == name {
            return percent_decode(v).map(Some);
        }
    }
    Ok(None)
}

fn required_param(query: Option<&str>, name: &str) -> Result<String, ApiError> {
    query_param(query, name)?
        .ok_or_else(|| ApiError::invalid(format!("missing query parameter `{name}`")))
}

fn bool_param(query: Option<&str>, name: &str) -> Result<bool, ApiError> {
    match query_param(query, name)?.as_deref() {
        None | Some("") | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "query parameter `{name}` must be true or false, not {other:?}"
        ))),
    }
}

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

fn normalize(p: &str) -> Result<String, ApiError> {
    Ok(path::normalize(p)?)
}

// ----- routes -----------------------------------------------------------------------

async fn handle(ctx: Arc<SandboxCtx>, req: Request<Incoming>) -> Response<Body> {
    match route(ctx, req).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}

async fn route(ctx: Arc<SandboxCtx>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let q = query.as_deref();
    let wrong_method = || ApiError::method_not_allowed(&method, &path);
    match path.as_str() {
        "/v1/health" => match method {
            Method::GET => Ok(ok(&Health {
                status: "ok".to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
            })),
            _ => Err(wrong_method()),
        },
        "/v1/exec" => match method {
            Method::POST => exec_route(ctx, read_json(req).await?).await,
            _ => Err(wrong_method()),
        },
        "/v1/files" => match method {
            Method::GET => read_file(&ctx, &required_param(q, "path")?).await,
            Method::PUT => {
                let p = required_param(q, "path")?;
                let mode = query_param(q, "mode")?;
                write_file(&ctx, &p, mode.as_deref(), req.into_body()).await
            }
            Method::DELETE => {
                let p = normalize(&required_param(q, "path")?)?;
                if p == "/" {
                    return Err(ApiError::invalid("refusing to delete /"));
                }
                let recursive = bool_param(q, "recursive")?;
                let root = ctx.root.clone();
                blocking(move || fs::delete(&root, &p, recursive)).await?;
                Ok(status("deleted"))
            }
            _ => Err(wrong_method()),
        },
        "/v1/files/list" => match method {
            Method::GET => {
                let p = normalize(&required_param(q, "path")?)?;
                let root = ctx.root.clone();
                Ok(ok(&blocking(move || fs::list(&root, &p)).await?))
            }
            _ => Err(wrong_method()),
        },
        "/v1/files/stat" => match method {
            Method::GET => {
                let p = normalize(&required_param(q, "path")?)?;
                let root = ctx.root.clone();
                Ok(ok(&blocking(move || fs::stat(&root, &p)).await?))
            }
            _ => Err(wrong_method()),
        },
        "/v1/files/glob" => match method {
            Method::GET => {
                let pat = normalize(&required_param(q, "pattern")?)?;
                let root = ctx.root.clone();
                Ok(ok(&blocking(move || Ok(fs::glob(&root, &pat))).await?))
            }
            _ => Err(wrong_method()),
        },
        "/v1/files/move" => match method {
            Method::POST => {
                let m: MoveRequest = read_json(req).await?;
                let from = normalize(&m.old_path)?;
                let to = normalize(&m.new_path)?;
                let root = ctx.root.clone();
                blocking(move || fs::rename(&root, &from, &to)).await?;
                Ok(status("moved"))
            }
            _ => Err(wrong_method()),
        },
        "/v1/files/chmod" => match method {
            Method::POST => {
                let c: ChmodRequest = read_json(req).await?;
                let p = normalize(&c.path)?;
                let mode = parse_mode(&c.mode).ok_or_else(|| {
                    ApiError::invalid(format!("invalid mode {:?}: expected octal digits", c.mode))
                })?;
                let root = ctx.root.clone();
                blocking(move || fs::chmod(&root, &p, mode)).await?;
                Ok(status("chmod applied"))
            }
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
                Ok(ok(&ctx.tail(n)))
            }
            _ => Err(wrong_method()),
        },
        "/v1/stats" => match method {
            Method::GET => Ok(ok(&Stats {
                cpu_pct: 0.0,
                mem_bytes: 0,
                mem_limit_bytes: ctx.memory_mb.saturating_mul(1024 * 1024),
                pids: ctx.running.load(Ordering::Relaxed),
            })),
            _ => Err(wrong_method()),
        },
        "/v1/tunnel" => match method {
            Method::GET => tunnel(&req),
            _ => Err(wrong_method()),
        },
        _ => Err(ApiError::no_route(&path)),
    }
}

async fn exec_route(ctx: Arc<SandboxCtx>, req: ExecRequest) -> Result<Response<Body>, ApiError> {
    let plan = exec::validate(&ctx.root, req)?;
    if !plan.req.stream {
        let _running = Running::new(&ctx);
        let mut sink = Sink::collect(plan.limit);
        let result = exec::run(&ctx.root, &ctx.env, &plan, &mut sink).await;
        ctx.log_exec(&plan.req, Some(&result));
        return Ok(ok(&result));
    }
    let (tx, body) = Body::channel(16);
    let running = Running::new(&ctx);
    tokio::spawn(async move {
        let _running = running;
        let watch_client = tx.clone();
        let mut stop = ctx.stop.clone();
        let mut sink = Sink::streaming(plan.limit, tx);
        let result = tokio::select! {
            r = exec::run(&ctx.root, &ctx.env, &plan, &mut sink) => Some(r),
            _ = watch_client.closed() => None,
            _ = stop.changed() => None,
        };
        match result {
            Some(r) => {
                sink.finish(&r).await;
                ctx.log_exec(&plan.req, Some(&r));
            }
            None => ctx.log_exec(&plan.req, None),
        }
    });
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

async fn read_file(ctx: &SandboxCtx, raw: &str) -> Result<Response<Body>, ApiError> {
    let p = normalize(raw)?;
    let root = ctx.root.clone();
    let (file, meta) = blocking(move || fs::open_read(&root, &p)).await?;
    let known_len = (meta.len() > 0).then_some(meta.len());
    let (tx, body) = Body::channel(4);
    tokio::task::spawn_blocking(move || send_chunks(file, known_len, &tx));
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

/// Blocking: stream `file` into `tx` in chunks.
fn send_chunks(mut file: std::fs::File, len: Option<u64>, tx: &BodySender) {
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
                return;
            }
        };
        buf.truncate(n);
        left -= n as u64;
        if tx.blocking_send(Ok(buf.freeze())).is_err() {
            return; // the client went away
        }
    }
}

async fn write_file(
    ctx: &SandboxCtx,
    raw: &str,
    raw_mode: Option<&str>,
    mut body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let p = normalize(raw)?;
    if p == "/" {
        return Err(ApiError::invalid("/ is a directory"));
    }
    let mode = match raw_mode {
        None | Some("") => DEFAULT_FILE_MODE,
        Some(m) => parse_mode(m).ok_or_else(|| {
            ApiError::invalid(format!("invalid mode {m:?}: expected octal digits"))
        })?,
    };
    let root = ctx.root.clone();
    let target = p.clone();
    let mut upload = blocking(move || Upload::start(&root, &target)).await?;
    let Some(std_file) = upload.file.take() else {
        return Err(ApiError::internal("upload file missing"));
    };
    let mut file = tokio::fs::File::from_std(std_file);
    let mut size = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::invalid(format!("upload interrupted: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        file.write_all(&data)
            .await
            .map_err(|e| ApiError::from_io(&e, &p))?;
        size += data.len() as u64;
    }
    file.flush().await.map_err(|e| ApiError::from_io(&e, &p))?;
    let std_file = file.into_std().await;
    blocking(move || upload.commit(std_file, mode)).await?;
    Ok(ok(&WriteResult { size }))
}

/// Whether a header holds `token` in its comma-separated list.
fn has_token(req: &Request<Incoming>, name: http::header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Parse `port` (1–65535, digits only).
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// `GET /v1/tunnel`: checked like the real agent's, then refused: no
/// program runs in a mock sandbox, so no port can be listening.
fn tunnel(req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let port_s = query_param(req.uri().query(), "port")?.unwrap_or_default();
    let port = parse_port(&port_s)
        .ok_or_else(|| ApiError::invalid(format!("port must be 1 to 65535, not {port_s:?}")))?;
    if !has_token(req, CONNECTION, "upgrade") || !has_token(req, UPGRADE, TUNNEL_UPGRADE) {
        return Err(ApiError::invalid(format!(
            "the tunnel needs `Connection: Upgrade` and `Upgrade: {TUNNEL_UPGRADE}`"
        )));
    }
    Err(ApiError::port_closed(format!(
        "cannot connect to port {port} in the sandbox: the mock provider runs no programs, \
         so nothing listens inside its sandboxes"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_ports() {
        let q = Some("path=/a%20b/c%26d&flag");
        assert_eq!(query_param(q, "path").unwrap().unwrap(), "/a b/c&d");
        assert_eq!(query_param(q, "flag").unwrap().unwrap(), "");
        assert_eq!(query_param(q, "nope").unwrap(), None);
        assert!(percent_decode("%zz").is_err());
        assert!(bool_param(Some("recursive=true"), "recursive").unwrap());
        assert!(bool_param(Some("recursive=maybe"), "recursive").is_err());
        assert_eq!(parse_port("80"), Some(80));
        for bad in ["", "0", "65536", "+80", "0x50"] {
            assert_eq!(parse_port(bad), None, "{bad}");
        }
    }
}
