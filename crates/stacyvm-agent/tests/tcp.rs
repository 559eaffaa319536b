//! The TCP transport (`--listen tcp:IP:PORT`) against the real agent binary:
//! a token is required to start, every request (tunnels included) must
//! carry it, and commands never see it in their environment.

mod common;

use bytes::Bytes;
use common::TempDir;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use stacyvm_agent_proto::{ErrorBody, ExecResult, Health};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "tcp-test-token-0123456789abcdef";

fn agent_bin() -> PathBuf {
    std::env::var_os("STACYVM_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_stacyvm-agent")))
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The pid an agent on `addr` reports on `/v1/health`, `None` while
/// nothing answers there.
fn pid_listening_at(addr: SocketAddr) -> Option<u32> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /v1/health HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split_once("\r\n\r\n")?.1;
    // The body may be chunked: the JSON object is between the braces.
    let json = &body[body.find('{')?..=body.rfind('}')?];
    serde_json::from_str::<Health>(json).ok().map(|h| h.pid)
}

/// An agent listening on TCP; killed on drop.
struct TcpAgent {
    child: Child,
    addr: SocketAddr,
    work: TempDir,
}

impl TcpAgent {
    fn start() -> TcpAgent {
        let work = TempDir::new("tcp");
        // A few attempts: another process may take the port between the
        // probe and the agent's bind.
        for _ in 0..5 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut child = Command::new(agent_bin())
                .arg("--listen")
                .arg(format!("tcp:{addr}"))
                .arg("--no-create-workdir")
                .env("STACYVM_AGENT_TOKEN", TOKEN)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start agent");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                // Whoever answers must be this agent: had another process
                // taken the port first, this one exits and the other answers.
                if let Some(pid) = pid_listening_at(addr) {
                    if pid == child.id() {
                        return TcpAgent { child, addr, work };
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        panic!("the agent did not start listening on TCP");
    }

    async fn conn(
        &self,
    ) -> hyper::client::conn::http1::SendRequest<
        http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
    > {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender
    }

    /// One request with an optional `Authorization` header value.
    async fn call(
        &self,
        method: Method,
        uri: &str,
        auth: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, hyper::HeaderMap, Bytes) {
        let mut sender = self.conn().await;
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "agent");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let req = b
            .body(Full::new(Bytes::copy_from_slice(body)).boxed())
            .unwrap();
        let resp = sender.send_request(req).await.expect("send");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, bytes)
    }

    async fn exec(&self, argv: &[&str]) -> ExecResult {
        let body = serde_json::to_vec(&json!({"argv": argv, "workdir": self.work.str()})).unwrap();
        let (status, _, bytes) = self
            .call(Method::POST, "/v1/exec", Some(&bearer()), &body)
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        serde_json::from_slice(&bytes).unwrap()
    }
}

impl Drop for TcpAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

fn assert_unauthorized(status: StatusCode, headers: &hyper::HeaderMap, bytes: &[u8]) {
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "{}",
        String::from_utf8_lossy(bytes)
    );
    assert_eq!(headers["www-authenticate"], "Bearer");
    let e: ErrorBody = serde_json::from_slice(bytes).expect("JSON error body");
    assert_eq!(e.code, "unauthorized");
    assert!(!e.message.contains(TOKEN));
}

#[test]
fn tcp_without_a_token_refuses_to_start() {
    for token in [None, Some("short")] {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--listen")
            .arg(format!("tcp:127.0.0.1:{}", free_port()))
            .arg("--no-create-workdir")
            .env_remove("STACYVM_AGENT_TOKEN")
            .stdin(Stdio::null());
        if let Some(t) = token {
            cmd.env("STACYVM_AGENT_TOKEN", t);
        }
        let out = cmd.output().expect("run agent");
        assert_eq!(out.status.code(), Some(2), "{token:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("STACYVM_AGENT_TOKEN"), "{err}");
    }
}

#[tokio::test]
async fn every_request_needs_the_token() {
    let a = TcpAgent::start();
    let wrong = format!("Bearer {TOKEN}x");
    let short = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    for auth in [
        None,
        Some("Bearer"),
        Some(wrong.as_str()),
        Some(short.as_str()),
        Some("Basic dXNlcjpwYXNz"),
    ] {
        let (s, h, b) = a.call(Method::GET, "/v1/health", auth, b"").await;
        assert_unauthorized(s, &h, &b);
    }
    // A refused exec runs nothing.
    let marker = a.work.path().join("ran");
    let body = serde_json::to_vec(&json!({
        "argv": ["touch", marker.to_str().unwrap()],
        "workdir": a.work.str(),
    }))
    .unwrap();
    let (s, h, b) = a.call(Method::POST, "/v1/exec", None, &body).await;
    assert_unauthorized(s, &h, &b);
    let (s, h, b) = a
        .call(Method::PUT, "/v1/files?path=/tmp/x", Some(&wrong), b"data")
        .await;
    assert_unauthorized(s, &h, &b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!marker.exists(), "an unauthorized exec ran");

    // With the token everything works, whatever the scheme's case.
    let (s, _, b) = a
        .call(Method::GET, "/v1/health", Some(&bearer()), b"")
        .await;
    assert_eq!(s, StatusCode::OK);
    let h: Health = serde_json::from_slice(&b).unwrap();
    assert_eq!(h.pid, a.child.id());
    let lower = format!("bearer {TOKEN}");
    let (s, _, _) = a.call(Method::GET, "/v1/health", Some(&lower), b"").await;
    assert_eq!(s, StatusCode::OK);
    let r = a.exec(&["touch", marker.to_str().unwrap()]).await;
    assert_eq!(r.exit_code, 0);
    assert!(marker.exists());
}

#[tokio::test]
async fn commands_never_see_the_token() {
    let a = TcpAgent::start();
    let r = a.exec(&["/usr/bin/env"]).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(r.stdout.contains("PATH="), "{}", r.stdout);
    assert!(!r.stdout.contains("STACYVM_AGENT_TOKEN"), "{}", r.stdout);
    assert!(!r.stdout.contains(TOKEN), "{}", r.stdout);
    // Nor can a process of the sandbox read it from the agent's initial
    // environment block.
    let environ = std::fs::read(format!("/proc/{}/environ", a.child.id())).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains(TOKEN),
        "the token is visible in /proc/<agent>/environ"
    );
}

#[tokio::test]
async fn tunnels_need_the_token_too() {
    let a = TcpAgent::start();
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let upgrade = |auth: Option<String>| {
        let mut b = Request::builder()
            .uri(format!("/v1/tunnel?port={port}"))
            .header("host", "agent")
            .header("connection", "upgrade")
            .header("upgrade", "tcp");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed())
            .unwrap()
    };
    // Without the token: refused, no upgrade.
    let mut sender = a.conn().await;
    let resp = sender.send_request(upgrade(None)).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_unauthorized(status, &headers, &bytes);

    // With it: a byte pipe to the port.
    let mut sender = a.conn().await;
    let resp = sender.send_request(upgrade(Some(bearer()))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut t = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    t.write_all(b"over tcp").await.unwrap();
    let mut got = [0u8; 8];
    t.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"over tcp");
}

#[tokio::test]
async fn garbage_before_http_does_not_kill_the_agent() {
    let a = TcpAgent::start();
    let mut s = TcpStream::connect(a.addr).await.unwrap();
    s.write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let (st, _, _) = a
        .call(Method::GET, "/v1/health", Some(&bearer()), b"")
        .await;
    assert_eq!(st, StatusCode::OK);
    let _: Value = serde_json::from_slice(
        &a.call(Method::GET, "/v1/stats", Some(&bearer()), b"")
            .await
            .2,
    )
    .unwrap();
}
