//! Preview: a web server inside the sandbox, fetched through the server's
//! preview proxy by `Host: {port}-{id}.localhost:{server port}` (previews
//! are public on localhost by default).

use super::{snippet, Ctx};
use crate::client::{empty, ReqBody};
use anyhow::{bail, Context, Result};
use http::{header, Request};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, Instant};

const PORT: u16 = 8731;

pub(super) async fn http(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let dir = format!("/workspace/certify-www-{}", c.token);
    let content = format!("served from the sandbox {}\n", c.token);
    c.sh_ok(
        &id,
        &format!(
            "mkdir -p {dir} && printf '%s' '{content}' > {dir}/certify.txt && cd {dir} && \
             (nohup python3 -m http.server {PORT} --bind 127.0.0.1 >/dev/null 2>&1 &) && \
             for i in $(seq 100); do \
               python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {PORT}), 1)' 2>/dev/null && exit 0; \
               sleep 0.1; \
             done; echo 'http.server did not start' >&2; exit 1"
        ),
        "30s",
    )
    .await
    .context("starting python3 -m http.server in the sandbox")?;

    let (server_port, server_url) = {
        let s = c.server.lock().await;
        (s.port(), s.url().to_string())
    };
    let host = format!("{PORT}-{id}.localhost:{server_port}");
    let http: HyperClient<HttpConnector, ReqBody> =
        HyperClient::builder(TokioExecutor::new()).build(HttpConnector::new());
    let t = Instant::now();
    let req = Request::get(format!("{server_url}/certify.txt"))
        .header(header::HOST, &host)
        .body(empty())?;
    let resp = tokio::time::timeout(Duration::from_secs(15), http.request(req))
        .await
        .context("no answer from the preview proxy within 15s")?
        .context("requesting the preview")?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let took = t.elapsed();
    if status.as_u16() != 200 {
        bail!(
            "GET /certify.txt with Host {host}: {} {}",
            status.as_u16(),
            snippet(&String::from_utf8_lossy(&body))
        );
    }
    if body != content.as_bytes() {
        bail!(
            "GET /certify.txt answered other content: {:?}",
            snippet(&String::from_utf8_lossy(&body))
        );
    }
    // The same host name for a closed port is a clear answer, not a hang.
    let closed = format!("{}-{id}.localhost:{server_port}", PORT + 1);
    let req = Request::get(format!("{server_url}/"))
        .header(header::HOST, &closed)
        .body(empty())?;
    let resp = tokio::time::timeout(Duration::from_secs(15), http.request(req))
        .await
        .context("no answer for a closed port within 15s")??;
    let closed_status = resp.status().as_u16();
    if !matches!(closed_status, 404 | 502) {
        bail!("a closed port answered {closed_status}, not 404/502");
    }
    Ok(format!(
        "200 with the file through Host {host} in {:.0} ms; closed port {closed_status}",
        took.as_secs_f64() * 1000.0
    ))
}
