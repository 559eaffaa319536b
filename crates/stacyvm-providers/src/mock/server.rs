//! The in-process agent of one mock sandbox: the agent protocol (see
//! [`stacyvm_agent_proto`]) over HTTP/1.1 on the sandbox's Unix socket,
//! with the real agent's routes, JSON shapes and error codes. Files live
//! under the sandbox's root directory; exec is interpreted
//! ([`super::shell`]); the tunnel answers `502 port_closed` (nothing can
//! listen inside a mock sandbox).

use super::exec::{self, BodySender, Sink};
use super::fs::{self, Root, Upload};
use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, UPGRADE};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use stacyvm_agent_proto::error::ApiError;
use stacyvm_agent_proto::query::{bool_param, query_param, required_param};
use stacyvm_agent_proto::request::{
    body_read_error, chmod_target, delete_target, log_lines, move_paths, normalize, tunnel_port,
    write_target, JsonBody,
};
use stacyvm_agent_proto::timestamp::rfc3339_millis;
use stacyvm_agent_proto::{
    ChmodRequest, ExecRequest, ExecResult, Health, MoveRequest, Route, Stats, Status, WriteResult,
};
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Size of one chunk of a file download.
const READ_CHUNK: usize = 256 * 1024;
/// Lines kept for `GET /v1/logs`.
const LOG_CAPACITY: usize = 1000;

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
        let line = format!("{} {msg}", rfc3339_millis(SystemTime::now()));
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

/// A response body: in memory, or a stream (streamed exec output, file
/// downloads).
type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A body holding `data`.
fn full(data: Vec<u8>) -> Body {
    Full::new(Bytes::from(data))
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body fed through a channel holding up to `depth` chunks in flight.
fn channel(depth: usize) -> (BodySender, Body) {
    let (tx, mut rx) = mpsc::channel::<io::Result<Bytes>>(depth);
    let chunks = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map_ok(Frame::data);
    (tx, StreamBody::new(chunks).boxed_unsync())
}

/// The body of a file download: its first `len` bytes (all of it when
/// unknown), read in chunks as the client takes them.
fn file_body(file: std::fs::File, len: Option<u64>) -> Body {
    let reader = tokio::fs::File::from_std(file).take(len.unwrap_or(u64::MAX));
    let chunks = futures_util::stream::try_unfold(reader, |mut reader| async move {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let n = reader.read_buf(&mut buf).await?;
        Ok((n > 0).then(|| (Frame::data(buf.freeze()), reader)))
    });
    StreamBody::new(chunks).boxed_unsync()
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(v) => json_bytes(status, v),
        Err(e) => error_response(&ApiError::internal(format!("cannot encode answer: {e}"))),
    }
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
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
    let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_bytes(status, err.body_json())
}

/// Read a JSON request body, bounded like the real agent's.
async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok());
    let mut json = JsonBody::start(declared)?;
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(body_read_error)?.into_data() {
            json.push(&data)?;
        }
    }
    json.finish()
}

/// Run blocking filesystem work on the sandbox's root off the event loop.
async fn on_root<T, F>(ctx: &SandboxCtx, f: F) -> Result<T, ApiError>
where
    F: FnOnce(&Root) -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    let root = ctx.root.clone();
    tokio::task::spawn_blocking(move || f(&root))
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("file task failed: {e}"))))
}

// ----- routes -----------------------------------------------------------------------

async fn handle(ctx: Arc<SandboxCtx>, req: Request<Incoming>) -> Response<Body> {
    match route(ctx, req).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}

async fn route(ctx: Arc<SandboxCtx>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let route = Route::of(req.method().as_str(), req.uri().path())?;
    let query = req.uri().query().map(str::to_string);
    let q = query.as_deref();
    match route {
        Route::Health => Ok(ok(&Health::ok(
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
        ))),
        Route::Exec => exec_route(ctx, read_json(req).await?).await,
        Route::ReadFile => read_file(&ctx, &required_param(q, "path")?).await,
        Route::WriteFile => {
            let p = required_param(q, "path")?;
            let mode = query_param(q, "mode")?;
            write_file(&ctx, &p, mode.as_deref(), req.into_body()).await
        }
        Route::DeleteFile => {
            let p = delete_target(&required_param(q, "path")?)?;
            let recursive = bool_param(q, "recursive")?;
            on_root(&ctx, move |root| fs::delete(root, &p, recursive)).await?;
            Ok(status("deleted"))
        }
        Route::ListFiles => {
            let p = normalize(&required_param(q, "path")?)?;
            Ok(ok(&on_root(&ctx, move |root| fs::list(root, &p)).await?))
        }
        Route::StatFile => {
            let p = normalize(&required_param(q, "path")?)?;
            Ok(ok(&on_root(&ctx, move |root| fs::stat(root, &p)).await?))
        }
        Route::Glob => {
            let pat = normalize(&required_param(q, "pattern")?)?;
            Ok(ok(
                &on_root(&ctx, move |root| Ok(fs::glob(root, &pat))).await?
            ))
        }
        Route::MoveFile => {
            let (from, to) = move_paths(&read_json::<MoveRequest>(req).await?)?;
            on_root(&ctx, move |root| fs::rename(root, &from, &to)).await?;
            Ok(status("moved"))
        }
        Route::Chmod => {
            let (p, mode) = chmod_target(&read_json::<ChmodRequest>(req).await?)?;
            on_root(&ctx, move |root| fs::chmod(root, &p, mode)).await?;
            Ok(status("chmod applied"))
        }
        Route::Logs => Ok(ok(&ctx.tail(log_lines(q)?))),
        Route::Stats => Ok(ok(&Stats {
            cpu_pct: 0.0,
            mem_bytes: 0,
            mem_limit_bytes: ctx.memory_mb.saturating_mul(1024 * 1024),
            pids: ctx.running.load(Ordering::Relaxed),
        })),
        Route::Tunnel => tunnel(&req),
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
    let (tx, body) = channel(16);
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
    let (file, meta) = on_root(ctx, move |root| fs::open_read(root, &p)).await?;
    let known_len = (meta.len() > 0).then_some(meta.len());
    let mut resp = Response::new(file_body(file, known_len));
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

async fn write_file(
    ctx: &SandboxCtx,
    raw: &str,
    raw_mode: Option<&str>,
    mut body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let (p, mode) = write_target(raw, raw_mode)?;
    let target = p.clone();
    let mut upload = on_root(ctx, move |root| Upload::start(root, &target)).await?;
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
    on_root(ctx, move |_| upload.commit(std_file, mode)).await?;
    Ok(ok(&WriteResult { size }))
}

/// The values of a header that are text.
fn header_values(req: &Request<Incoming>, name: HeaderName) -> impl Iterator<Item = &str> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
}

/// `GET /v1/tunnel`: checked like the real agent's, then refused: no
/// program runs in a mock sandbox, so no port can be listening.
fn tunnel(req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let port = tunnel_port(
        req.uri().query(),
        header_values(req, CONNECTION),
        header_values(req, UPGRADE),
    )?;
    Err(ApiError::port_closed(format!(
        "cannot connect to port {port} in the sandbox: the mock provider runs no programs, \
         so nothing listens inside its sandboxes"
    )))
}
