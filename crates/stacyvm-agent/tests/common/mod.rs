//! Test harness: starts the real agent binary on a temporary socket and talks
//! to it with a small hyper client.

#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::Value;
use stacyvm_agent_proto::{ErrorBody, ExecResult};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under /tmp, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = PathBuf::from(format!(
            "/tmp/stacyvm-agent-test-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The directory as a string, for JSON requests.
    pub fn str(&self) -> String {
        self.0.to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running agent; killed on drop.
pub struct Agent {
    child: Child,
    pub sock: PathBuf,
    /// Scratch space for the test (not containing the socket).
    pub work: TempDir,
    _run: TempDir,
}

impl Agent {
    pub fn start() -> Agent {
        let run = TempDir::new("run");
        let work = TempDir::new("work");
        let sock = run.path().join("a.sock");
        // STACYVM_AGENT_BIN runs the suite against another build (e.g. the
        // static release binary).
        let bin = std::env::var_os("STACYVM_AGENT_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_stacyvm-agent")));
        let child = Command::new(bin)
            .arg("--socket")
            .arg(&sock)
            .arg("--no-create-workdir")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "agent did not start listening");
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent {
            child,
            sock,
            work,
            _run: run,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open a connection and send one request; the answer streams.
    pub async fn send(&self, method: Method, uri: &str, body: Bytes) -> Response<Incoming> {
        self.send_on_conn(method, uri, body).await.0
    }

    /// Like [`Agent::send`], also returning the connection task (abort it to
    /// hang up).
    pub async fn send_on_conn(
        &self,
        method: Method,
        uri: &str,
        body: Bytes,
    ) -> (Response<Incoming>, tokio::task::JoinHandle<()>) {
        let stream = UnixStream::connect(&self.sock).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "agent")
            .body(Full::new(body))
            .unwrap();
        let resp = sender.send_request(req).await.expect("send request");
        (resp, conn)
    }

    /// Send one request and collect the whole answer.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Bytes) {
        let resp = self.send(method, uri, body.into()).await;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("read body")
            .to_bytes();
        (status, bytes)
    }

    /// A request whose answer must be 200 with JSON `T`.
    pub async fn ok<T: DeserializeOwned>(
        &self,
        method: Method,
        uri: &str,
        body: impl Into<Bytes>,
    ) -> T {
        let (status, bytes) = self.call(method, uri, body).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{uri}: {}",
            String::from_utf8_lossy(&bytes)
        );
        serde_json::from_slice(&bytes).expect("JSON answer")
    }

    /// A request that must fail with `status` and error `code`; returns the message.
    pub async fn err(
        &self,
        method: Method,
        uri: &str,
        body: impl Into<Bytes>,
        status: StatusCode,
        code: &str,
    ) -> String {
        let (got, bytes) = self.call(method, uri, body).await;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        assert_eq!(got, status, "{uri}: {text}");
        let e: ErrorBody = serde_json::from_slice(&bytes).expect("ErrorBody");
        assert_eq!(e.code, code, "{uri}: {text}");
        e.message
    }

    /// Run a (non-streamed) exec.
    pub async fn exec(&self, req: Value) -> ExecResult {
        self.ok(Method::POST, "/v1/exec", serde_json::to_vec(&req).unwrap())
            .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(unused_imports)] // not every test binary uses it
pub use stacyvm_agent_proto::percent_encode as enc;

/// True while `/proc/<pid>` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next());
            state != Some(Some('Z'))
        }
        Err(_) => false,
    }
}

/// Wait up to `timeout` for `/proc/<pid>` to disappear entirely.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::metadata(format!("/proc/{pid}")).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// SIGKILL a leftover process started by a test.
pub fn kill(pid: i32) {
    // SAFETY: kill(2) on a pid the test itself started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}
