//! `GET /v1/tunnel?port=N`: a raw TCP pipe to `127.0.0.1:N` inside the
//! sandbox (see the protocol crate's docs). The agent runs in the sandbox's
//! network namespace, so its loopback is the sandbox's own.

use crate::alog;
use crate::body::Body;
use crate::error::{io_message, ApiError};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use stacyvm_agent_proto::request::tunnel_port;
use stacyvm_agent_proto::TUNNEL_UPGRADE;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpStream;

/// A connect on loopback answers at once; this only bounds odd cases (a
/// firewall rule inside the sandbox that drops SYNs).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Copy buffer per direction: large enough for bulk transfers.
const COPY_BUF: usize = 64 * 1024;

/// The values of a header that are text.
fn header_values(req: &Request<Incoming>, name: HeaderName) -> impl Iterator<Item = &str> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
}

/// Connect to the port on the IPv4 loopback, then the IPv6 one (dev servers
/// that listen on `localhost` sometimes bind `::1` only).
async fn connect(port: u16) -> io::Result<TcpStream> {
    let mut last = None;
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        let addr = SocketAddr::new(ip, port);
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
                ))
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no address to connect to")))
}

pub async fn handle(mut req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let port = tunnel_port(
        req.uri().query(),
        header_values(&req, CONNECTION),
        header_values(&req, UPGRADE),
    )?;
    let tcp = connect(port).await.map_err(|e| {
        ApiError::port_closed(format!(
            "cannot connect to port {port} in the sandbox: {}",
            io_message(&e)
        ))
    })?;
    let _ = tcp.set_nodelay(true);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                alog!("tunnel to port {port}: upgrade failed: {e}");
                return;
            }
        };
        let mut client = TokioIo::new(upgraded);
        let mut tcp = tcp;
        // Errors here are ordinary hang-ups of either side.
        let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut tcp, COPY_BUF, COPY_BUF)
            .await;
    });
    let mut resp = Response::new(Body::Full(None));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static(TUNNEL_UPGRADE));
    Ok(resp)
}
