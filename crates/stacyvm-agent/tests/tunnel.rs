//! Integration tests of `GET /v1/tunnel` (the live-preview TCP tunnel)
//! against the real agent binary. The agent runs in the test's network
//! namespace here, so its loopback is the test's.

mod common;

use bytes::Bytes;
use common::Agent;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

/// Open a tunnel to `port`; the raw stream after the `101`.
async fn tunnel(a: &Agent, port: u16) -> TokioIo<hyper::upgrade::Upgraded> {
    let stream = UnixStream::connect(&a.sock).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let req = Request::builder()
        .uri(format!("/v1/tunnel?port={port}"))
        .header("host", "agent")
        .header("connection", "upgrade")
        .header("upgrade", "tcp")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("send");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["upgrade"], "tcp");
    TokioIo::new(hyper::upgrade::on(resp).await.expect("upgrade"))
}

/// A TCP server that echoes one connection, then reports how many bytes
/// it saw before the client's end of stream.
async fn echo_server(addr: &str) -> Option<(SocketAddr, tokio::task::JoinHandle<usize>)> {
    let l = TcpListener::bind(addr).await.ok()?;
    let local = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            s.write_all(&buf[..n]).await.unwrap();
        }
        s.shutdown().await.unwrap();
        total
    });
    Some((local, h))
}

#[tokio::test]
async fn bytes_flow_both_ways_and_eof_is_passed_on() {
    let a = Agent::start();
    let (addr, server) = echo_server("127.0.0.1:0").await.unwrap();
    let mut t = tunnel(&a, addr.port()).await;
    t.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    t.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");

    // A megabyte each way, written and read concurrently.
    let data: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(t);
    let expect = data.clone();
    let reader = tokio::spawn(async move {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    });
    w.write_all(&data).await.unwrap();
    // Half-close: the app sees EOF, closes, and the tunnel ends.
    w.shutdown().await.unwrap();
    let back = reader.await.unwrap();
    assert_eq!(back.len(), expect.len());
    assert!(back == expect);
    assert_eq!(server.await.unwrap(), 5 + data.len());
}

#[tokio::test]
async fn ipv6_only_listeners_are_reached() {
    let a = Agent::start();
    // Hosts without IPv6 loopback cannot have such listeners; nothing to check there.
    let Some((addr, server)) = echo_server("[::1]:0").await else {
        return;
    };
    let mut t = tunnel(&a, addr.port()).await;
    t.write_all(b"six").await.unwrap();
    let mut got = [0u8; 3];
    t.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"six");
    drop(t);
    assert_eq!(server.await.unwrap(), 3);
}

#[tokio::test]
async fn refusals_are_ordinary_answers() {
    let a = Agent::start();
    // A port nobody listens on: bind and drop to find one.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let t0 = std::time::Instant::now();
    let stream = UnixStream::connect(&a.sock).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let req = Request::builder()
        .uri(format!("/v1/tunnel?port={port}"))
        .header("host", "agent")
        .header("connection", "Upgrade")
        .header("upgrade", "TCP")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(t0.elapsed() < std::time::Duration::from_secs(1));
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let e: stacyvm_agent_proto::ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(e.code, "port_closed");
    assert!(e.message.contains(&port.to_string()), "{}", e.message);

    for bad in ["0", "65536", "abc", "+80", ""] {
        a.err(
            Method::GET,
            &format!("/v1/tunnel?port={bad}"),
            Bytes::new(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
    }
    // No upgrade headers.
    let msg = a
        .err(
            Method::GET,
            &format!("/v1/tunnel?port={port}"),
            Bytes::new(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
    assert!(msg.contains("Upgrade"), "{msg}");
    let (status, _) = a
        .call(
            Method::POST,
            &format!("/v1/tunnel?port={port}"),
            Bytes::new(),
        )
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}
