//! Client for the in-sandbox agent: HTTP/1.1 over the Unix socket that the
//! provider exposes on the host, or over TCP with a bearer token for
//! runtimes whose sandboxes live elsewhere (the `custom` provider). One
//! connection per call keeps the client stateless; a Unix-socket connect
//! plus handshake costs tens of microseconds.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
pub use hyper::body::Incoming;
pub use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use stacyvm_agent_proto::{
    ChmodRequest, ErrorBody, ExecRequest, ExecResult, FileEntry, Health, MoveRequest, Stats,
    Status, WriteResult,
};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Bound on a TCP connect to an agent (a Unix connect answers at once).
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Boxed error type for request bodies streamed to the agent.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body the agent client can send (JSON, or a streamed upload).
pub type AgentBody = UnsyncBoxBody<Bytes, BoxError>;
/// An open `GET /v1/tunnel` connection: a raw byte pipe to a TCP port on the
/// sandbox's loopback (tokio `AsyncRead + AsyncWrite`).
pub type Tunnel = TokioIo<Upgraded>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent answered with an error; `code` is an API error code.
    #[error("{message}")]
    Status {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// The socket could not be reached or the connection broke.
    #[error("agent unreachable: {0}")]
    Unreachable(String),
    /// The agent answered something that is not the protocol.
    #[error("agent protocol error: {0}")]
    Protocol(String),
}

/// How the server reaches one agent.
#[derive(Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A Unix socket on this host (what every local provider exposes).
    Unix(PathBuf),
    /// `host:port` of an agent started with `--listen tcp:…`; every request
    /// carries `Authorization: Bearer <token>`.
    Tcp { addr: String, token: String },
}

impl fmt::Display for AgentEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentEndpoint::Unix(p) => write!(f, "{}", p.display()),
            AgentEndpoint::Tcp { addr, .. } => write!(f, "tcp:{addr}"),
        }
    }
}

/// Never prints the token.
impl fmt::Debug for AgentEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentEndpoint::Unix(p) => f.debug_tuple("Unix").field(p).finish(),
            AgentEndpoint::Tcp { addr, .. } => f
                .debug_struct("Tcp")
                .field("addr", addr)
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentClient {
    endpoint: Arc<AgentEndpoint>,
    /// `Bearer <token>` for TCP endpoints.
    authorization: Option<http::HeaderValue>,
}

/// A connection to an agent over either transport.
enum AgentStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsyncRead for AgentStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            AgentStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            AgentStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_flush(cx),
            AgentStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            AgentStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            AgentStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            AgentStream::Unix(s) => s.is_write_vectored(),
            AgentStream::Tcp(s) => s.is_write_vectored(),
        }
    }
}

/// Build `path?k=v&…` with every value percent-encoded.
pub fn with_query(path: &str, params: &[(&str, &str)]) -> String {
    let mut s = path.to_string();
    for (i, (k, v)) in params.iter().enumerate() {
        s.push(if i == 0 { '?' } else { '&' });
        s.push_str(k);
        s.push('=');
        s.push_str(&stacyvm_agent_proto::percent_encode(v));
    }
    s
}

fn empty() -> AgentBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync()
}

/// A request body from bytes in memory.
pub fn full_body(data: Bytes) -> AgentBody {
    Full::new(data).map_err(|e| match e {}).boxed_unsync()
}

fn json_body<T: serde::Serialize>(v: &T) -> Result<AgentBody, AgentError> {
    let bytes = serde_json::to_vec(v).map_err(|e| AgentError::Protocol(e.to_string()))?;
    Ok(Full::new(Bytes::from(bytes))
        .map_err(|e| match e {})
        .boxed_unsync())
}

impl AgentClient {
    /// A client of the agent listening on the Unix socket `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        AgentClient {
            endpoint: Arc::new(AgentEndpoint::Unix(socket.into())),
            authorization: None,
        }
    }

    /// A client of an agent listening on TCP at `addr` (`host:port`) that
    /// requires `token`.
    pub fn tcp(addr: impl Into<String>, token: impl Into<String>) -> Result<Self, AgentError> {
        Self::from_endpoint(AgentEndpoint::Tcp {
            addr: addr.into(),
            token: token.into(),
        })
    }

    /// A client of `endpoint`; fails for a token that cannot be sent in a
    /// header.
    pub fn from_endpoint(endpoint: AgentEndpoint) -> Result<Self, AgentError> {
        let authorization = match &endpoint {
            AgentEndpoint::Unix(_) => None,
            AgentEndpoint::Tcp { token, .. } => {
                let mut v =
                    http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                        AgentError::Protocol("the agent token is not a valid header value".into())
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(AgentClient {
            endpoint: Arc::new(endpoint),
            authorization,
        })
    }

    pub fn endpoint(&self) -> &AgentEndpoint {
        &self.endpoint
    }

    /// The agent's Unix socket, `None` for a TCP endpoint.
    pub fn socket(&self) -> Option<&Path> {
        match &*self.endpoint {
            AgentEndpoint::Unix(p) => Some(p),
            AgentEndpoint::Tcp { .. } => None,
        }
    }

    /// Open a fresh HTTP/1.1 connection to the agent (the one connect path
    /// of requests and tunnels).
    async fn connect(
        &self,
    ) -> Result<
        (
            hyper::client::conn::http1::SendRequest<AgentBody>,
            hyper::client::conn::http1::Connection<TokioIo<AgentStream>, AgentBody>,
        ),
        AgentError,
    > {
        let unreachable =
            |e: &dyn fmt::Display| AgentError::Unreachable(format!("{}: {e}", self.endpoint));
        let stream = match &*self.endpoint {
            AgentEndpoint::Unix(path) => AgentStream::Unix(
                UnixStream::connect(path)
                    .await
                    .map_err(|e| unreachable(&e))?,
            ),
            AgentEndpoint::Tcp { addr, .. } => {
                let s =
                    tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(addr.as_str()))
                        .await
                        .map_err(|_| {
                            unreachable(&format_args!(
                                "no connection within {}s",
                                TCP_CONNECT_TIMEOUT.as_secs()
                            ))
                        })?
                        .map_err(|e| unreachable(&e))?;
                let _ = s.set_nodelay(true);
                AgentStream::Tcp(s)
            }
        };
        hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))
    }

    /// A request to the agent with the headers every call carries.
    fn request(&self, method: Method, path_and_query: &str) -> http::request::Builder {
        let mut b = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, "agent");
        if let Some(auth) = &self.authorization {
            b = b.header(http::header::AUTHORIZATION, auth.clone());
        }
        b
    }

    /// Send one request; the answer's body streams from the connection.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: AgentBody,
    ) -> Result<http::Response<Incoming>, AgentError> {
        let (mut sender, conn) = self.connect().await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "agent connection ended with an error");
            }
        });
        let req = self
            .request(method, path_and_query)
            .body(body)
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| AgentError::Unreachable(e.to_string()))
    }

    /// Turn a non-2xx answer into [`AgentError::Status`].
    pub async fn check(
        resp: http::Response<Incoming>,
    ) -> Result<http::Response<Incoming>, AgentError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| AgentError::Unreachable(e.to_string()))?
            .to_bytes();
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => (e.code, e.message),
            Err(_) => (
                "internal".to_string(),
                format!(
                    "agent answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            ),
        };
        Err(AgentError::Status {
            status,
            code,
            message,
        })
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: AgentBody,
    ) -> Result<T, AgentError> {
        let resp = Self::check(self.send(method, path, body).await?).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| AgentError::Unreachable(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Protocol(e.to_string()))
    }

    /// `GET /v1/health`, bounded: an agent that accepts but never answers
    /// is reported unreachable after two seconds.
    pub async fn health(&self) -> Result<Health, AgentError> {
        match tokio::time::timeout(
            Duration::from_secs(2),
            self.call_json(Method::GET, "/v1/health", empty()),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(AgentError::Unreachable(format!(
                "{}: no answer within 2s",
                self.endpoint
            ))),
        }
    }

    /// Poll until the agent answers `/v1/health`, or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Health, AgentError> {
        let start = Instant::now();
        let mut delay = Duration::from_micros(500);
        loop {
            match self.health().await {
                Ok(h) => return Ok(h),
                Err(e) if start.elapsed() >= timeout => return Err(e),
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(10));
                }
            }
        }
    }

    /// Run a command and wait for its whole result.
    pub async fn exec(&self, req: &ExecRequest) -> Result<ExecResult, AgentError> {
        debug_assert!(!req.stream);
        self.call_json(Method::POST, "/v1/exec", json_body(req)?)
            .await
    }

    /// Run a command with `stream: true`; the answer's body is NDJSON
    /// [`stacyvm_agent_proto::ExecEvent`] lines.
    pub async fn exec_stream(&self, req: &ExecRequest) -> Result<Incoming, AgentError> {
        let resp = Self::check(self.send(Method::POST, "/v1/exec", json_body(req)?).await?).await?;
        Ok(resp.into_body())
    }

    /// Stream a file's bytes. Returns the body and its length when known.
    pub async fn read_file(&self, path: &str) -> Result<(Incoming, Option<u64>), AgentError> {
        let resp = Self::check(
            self.send(
                Method::GET,
                &with_query("/v1/files", &[("path", path)]),
                empty(),
            )
            .await?,
        )
        .await?;
        let len = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok((resp.into_body(), len))
    }

    /// Write a file from a (possibly streamed) body, atomically.
    pub async fn write_file(
        &self,
        path: &str,
        mode: Option<&str>,
        body: AgentBody,
    ) -> Result<WriteResult, AgentError> {
        let mut q = vec![("path", path)];
        if let Some(m) = mode {
            q.push(("mode", m));
        }
        self.call_json(Method::PUT, &with_query("/v1/files", &q), body)
            .await
    }

    pub async fn write_bytes(
        &self,
        path: &str,
        mode: Option<&str>,
        data: Bytes,
    ) -> Result<WriteResult, AgentError> {
        self.write_file(path, mode, full_body(data)).await
    }

    pub async fn delete(&self, path: &str, recursive: bool) -> Result<Status, AgentError> {
        let r = if recursive { "true" } else { "false" };
        self.call_json(
            Method::DELETE,
            &with_query("/v1/files", &[("path", path), ("recursive", r)]),
            empty(),
        )
        .await
    }

    pub async fn list(&self, path: &str) -> Result<Vec<FileEntry>, AgentError> {
        self.call_json(
            Method::GET,
            &with_query("/v1/files/list", &[("path", path)]),
            empty(),
        )
        .await
    }

    pub async fn stat(&self, path: &str) -> Result<FileEntry, AgentError> {
        self.call_json(
            Method::GET,
            &with_query("/v1/files/stat", &[("path", path)]),
            empty(),
        )
        .await
    }

    pub async fn glob(&self, pattern: &str) -> Result<Vec<String>, AgentError> {
        self.call_json(
            Method::GET,
            &with_query("/v1/files/glob", &[("pattern", pattern)]),
            empty(),
        )
        .await
    }

    pub async fn rename(&self, old_path: &str, new_path: &str) -> Result<Status, AgentError> {
        let req = MoveRequest {
            old_path: old_path.to_string(),
            new_path: new_path.to_string(),
        };
        self.call_json(Method::POST, "/v1/files/move", json_body(&req)?)
            .await
    }

    pub async fn chmod(&self, path: &str, mode: &str) -> Result<Status, AgentError> {
        let req = ChmodRequest {
            path: path.to_string(),
            mode: mode.to_string(),
        };
        self.call_json(Method::POST, "/v1/files/chmod", json_body(&req)?)
            .await
    }

    pub async fn logs(&self, lines: usize) -> Result<Vec<String>, AgentError> {
        let n = lines.to_string();
        self.call_json(
            Method::GET,
            &with_query("/v1/logs", &[("lines", &n)]),
            empty(),
        )
        .await
    }

    pub async fn stats(&self) -> Result<Stats, AgentError> {
        self.call_json(Method::GET, "/v1/stats", empty()).await
    }

    /// `GET /v1/tunnel?port=`: a byte pipe to `127.0.0.1:port` inside the
    /// sandbox. A port nobody listens on is [`AgentError::Status`] with code
    /// `port_closed` (502).
    pub async fn tunnel(&self, port: u16) -> Result<Tunnel, AgentError> {
        let (mut sender, conn) = self.connect().await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "agent tunnel connection ended with an error");
            }
        });
        let req = self
            .request(Method::GET, &format!("/v1/tunnel?port={port}"))
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, stacyvm_agent_proto::TUNNEL_UPGRADE)
            .body(empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| AgentError::Unreachable(e.to_string()))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let resp = Self::check(resp).await?;
            return Err(AgentError::Protocol(format!(
                "the agent answered {} instead of switching to the tunnel",
                resp.status()
            )));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| AgentError::Unreachable(format!("tunnel upgrade failed: {e}")))?;
        Ok(TokioIo::new(upgraded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            with_query("/v1/files", &[("path", "/a b/c&d=%"), ("mode", "644")]),
            "/v1/files?path=/a%20b/c%26d%3D%25&mode=644"
        );
        assert_eq!(with_query("/v1/health", &[]), "/v1/health");
    }
}
