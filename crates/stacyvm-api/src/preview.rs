//! Live previews (API.md §7): the built-in reverse proxy, and
//! `GET /api/v1/sandboxes/{id}/preview/{port}`.
//!
//! A request whose host is `{port}-{id}.{preview_domain}` never reaches the
//! API routes: it is answered here, on the main listener (picked out by its
//! `Host`) and on the dedicated `preview_listen` listener. Each upstream
//! connection is the sandbox agent's TCP tunnel (`GET /v1/tunnel`) to
//! `127.0.0.1:{port}` inside the sandbox; hyper speaks HTTP/1.1 to the app
//! through it, and idle tunnels are pooled per sandbox and port, so a
//! keep-alive client costs one tunnel, not one per request. A `101`
//! (WebSocket, or any other upgrade) turns both connections into a raw
//! byte pipe. Bodies stream both ways unbuffered (chunked answers,
//! Server-Sent Events, large uploads and downloads).
//!
//! Access: a sandbox is `public` or `token` (its create field / metadata
//! `preview`, else the configured default). A token is accepted from
//! `?stacyvm_token=` (a GET/HEAD page load then gets a host-only cookie and a
//! 302 to the same URL without it), from `X-Preview-Token`, or from that
//! cookie. API keys are never needed or accepted here; `X-API-Key` and an
//! `Authorization: Bearer` carrying one of the server's keys are removed
//! before the request goes to the app, as are the token, its header and
//! its cookie.
//! Every other header reaches the app unchanged, plus `X-Forwarded-For`,
//! `-Host`, `-Proto` and `-Port`.
//!
//! Failures are small HTML pages (JSON `{"code","message"}` when the client
//! asks for `application/json`): 400 bad preview host, 401 missing or
//! expired token, 403 a token that is forged or for another sandbox or port,
//! 404 unknown or destroyed sandbox, 502 `port_closed` when nothing listens
//! on the port, 503 sandbox not running, 504 `gateway_timeout` when the app
//! sends no response headers within `preview_timeout`.

use crate::ctx::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::extract::Query;
use crate::AppState;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode, Uri, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Deserialize;
use stacyvm_core::engine::{PreviewGrant, TunnelError};
use stacyvm_core::preview::{self as pv, Domain, HostMatch, PreviewAccess, TokenError};
use stacyvm_core::{Engine, ErrorCode};
use stacyvm_providers::agent::Upgraded;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;

/// Query parameter that carries a token once.
const TOKEN_PARAM: &str = "stacyvm_token";
/// Header that carries a token on every request.
const TOKEN_HEADER: &str = "x-preview-token";
/// Host-only cookie set after a `?stacyvm_token=` page load.
const COOKIE: &str = "stacyvm_preview";
/// Idle tunnels kept per sandbox port, and for how long: less than the
/// 5 s after which common dev servers (Node, uvicorn) drop idle keep-alive
/// connections, so a pooled tunnel is not reused just as the app closes it.
const POOL_IDLE: usize = 16;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Suffix of the pool keys (`{port}-{id}.tunnel`); never resolved.
const POOL_SUFFIX: &str = ".tunnel";

// ---------------------------------------------------------------------------
// the proxy

/// The preview proxy shared by the listeners: the engine, the domain and
/// the pool of open tunnels.
#[derive(Clone)]
pub struct Previews {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<Engine>,
    domain: Domain,
    client: Client<Connector, Tracked>,
}

impl Previews {
    pub fn new(engine: Arc<Engine>) -> Previews {
        let domain = Domain::parse(&engine.config().preview_domain).unwrap_or(Domain {
            host: engine.config().preview_domain.to_ascii_lowercase(),
            port: None,
        });
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            .build(Connector(engine.clone()));
        Previews {
            inner: Arc::new(Inner {
                engine,
                domain,
                client,
            }),
        }
    }

    /// The service of a dedicated preview listener: previews only; any
    /// other host gets a 404 page (never the API).
    pub fn router(&self) -> Router {
        Router::new()
            .fallback(only_previews)
            .with_state(self.clone())
    }

    fn classify(&self, req: &Request) -> HostMatch {
        match request_host(req) {
            Some(h) => pv::match_host(h, &self.inner.domain),
            None => HostMatch::Api,
        }
    }
}

/// The host a request is for: the authority of an absolute-form target,
/// else the `Host` header.
fn request_host(req: &Request) -> Option<&str> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
}

/// Middleware of the main listener: preview hosts are answered here and
/// never reach the API routes (nor their auth).
pub async fn intercept(State(p): State<Previews>, req: Request, next: Next) -> Response {
    match p.classify(&req) {
        HostMatch::Api => next.run(req).await,
        m => p.handle(m, req).await,
    }
}

async fn only_previews(State(p): State<Previews>, req: Request) -> Response {
    match p.classify(&req) {
        HostMatch::Api => {
            let domain = &p.inner.domain.host;
            Failure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "this address serves live previews only: use a host name like {{port}}-{{sandbox id}}.{domain}"
                ),
            )
            .respond(&req)
        }
        m => p.handle(m, req).await,
    }
}

impl Previews {
    async fn handle(&self, m: HostMatch, req: Request) -> Response {
        match m {
            HostMatch::Preview { port, id } => match self.serve(req, port, &id).await {
                Ok(r) => r,
                Err((f, req_head)) => f.respond_head(&req_head),
            },
            HostMatch::Invalid { not_found, reason } => {
                let (status, code) = if not_found {
                    (StatusCode::NOT_FOUND, "not_found")
                } else {
                    (StatusCode::BAD_REQUEST, "invalid_request")
                };
                Failure::new(status, code, reason).respond(&req)
            }
            HostMatch::Api => Failure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "not a preview host".to_string(),
            )
            .respond(&req),
        }
    }

    /// Check access and forward one request to port `port` of sandbox `id`.
    async fn serve(
        &self,
        mut req: Request,
        port: u16,
        id: &str,
    ) -> Result<Response, (Failure, ReqHead)> {
        let engine = &self.inner.engine;
        let head = ReqHead::of(&req);
        let fail = |f: Failure| Err((f, head.clone()));

        // 1. The sandbox must exist and run.
        let access = match engine.preview_access(id).await {
            Ok(a) => a,
            Err(e) => return fail(Failure::from_engine(e, id)),
        };

        // 2. Access.
        let (query_token, rest_query) = split_token(req.uri().query());
        let upgrade = wants_upgrade(req.headers());
        if access == PreviewAccess::Token {
            let mut tokens: Vec<(Source, String)> = Vec::new();
            if let Some(t) = query_token {
                tokens.push((Source::Query, t));
            }
            for v in req.headers().get_all(TOKEN_HEADER) {
                if let Ok(v) = v.to_str() {
                    tokens.push((Source::Header, v.trim().to_string()));
                }
            }
            for c in cookie_values(req.headers(), COOKIE) {
                tokens.push((Source::Cookie, c));
            }
            if tokens.is_empty() {
                return fail(Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    format!(
                        "this preview needs a token: get one with GET /api/v1/sandboxes/{id}/preview/{port} \
                         and open the page once with ?{TOKEN_PARAM}=<token> (or send it as X-Preview-Token)"
                    ),
                ));
            }
            let mut first_err: Option<TokenError> = None;
            let mut granted: Option<(Source, String, u64)> = None;
            for (src, t) in tokens {
                match engine.check_preview_token(&t, id, port) {
                    Ok(exp) => {
                        granted = Some((src, t, exp));
                        break;
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            let Some((src, token, exp)) = granted else {
                return fail(Failure::token(first_err.unwrap_or(TokenError::Malformed)));
            };
            let navigation = matches!(*req.method(), Method::GET | Method::HEAD) && !upgrade;
            if src == Source::Query && navigation {
                return Ok(cookie_redirect(&req, &rest_query, &token, exp));
            }
        }

        // 3. Forward.
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let target = match &rest_query {
            Some(q) => format!("http://{port}-{id}{POOL_SUFFIX}{path}?{q}"),
            None => format!("http://{port}-{id}{POOL_SUFFIX}{path}"),
        };
        let Ok(uri) = target.parse::<Uri>() else {
            return fail(Failure::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request target is not a valid path".to_string(),
            ));
        };
        let headers = upstream_headers(&parts.headers, upgrade, &head.host, peer, &|k| {
            is_server_key(engine, k)
        });
        let (done_tx, done_rx) = oneshot::channel();
        let mut up = hyper::Request::new(Tracked {
            inner: body,
            _done: done_tx,
        });
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = headers;

        // Response headers are due `preview_timeout` after the request
        // body is through (a slow upload is not the app's delay).
        let timeout = engine.config().preview_timeout;
        let send = self.inner.client.request(up);
        let deadline = async {
            let _ = done_rx.await;
            tokio::time::sleep(timeout).await;
        };
        let resp = tokio::select! {
            r = send => r,
            _ = deadline => {
                return fail(Failure::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "gateway_timeout",
                    format!(
                        "the app on port {port} of sandbox {id} did not answer within {}",
                        stacyvm_core::duration::format(timeout)
                    ),
                ));
            }
        };
        let mut resp = match resp {
            Ok(r) => r,
            Err(e) => return fail(Failure::from_client(&e, id, port)),
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return fail(Failure::new(
                    StatusCode::BAD_GATEWAY,
                    "provider_error",
                    format!("the app on port {port} switched protocols unasked"),
                ));
            };
            let app_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (Ok(client), Ok(app)) = tokio::join!(client_upgrade, app_upgrade) else {
                    return;
                };
                let (mut client, mut app) = (TokioIo::new(client), TokioIo::new(app));
                let _ = tokio::io::copy_bidirectional(&mut client, &mut app).await;
            });
            let (mut parts, _) = resp.into_parts();
            parts.version = Version::HTTP_11;
            return Ok(Response::from_parts(parts, axum::body::Body::empty()));
        }
        let (mut parts, body) = resp.into_parts();
        // The client's connection keeps its own HTTP version and framing.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(parts, axum::body::Body::new(body)))
    }
}

// ---------------------------------------------------------------------------
// the route that issues tokens

#[derive(Deserialize)]
pub struct GrantQuery {
    ttl: Option<String>,
}

/// `GET /api/v1/sandboxes/{id}/preview/{port}` → `{url, token, expires_at, …}`.
pub async fn grant(
    State(s): State<AppState>,
    ctx: Ctx,
    Path((id, port)): Path<(String, String)>,
    Query(q): Query<GrantQuery>,
) -> ApiResult<Json<PreviewGrant>> {
    let port = pv::parse_port(&port).ok_or_else(|| {
        ApiError::invalid(format!(
            "port must be a number from 1 to 65535, not {port:?}"
        ))
    })?;
    let r = s
        .engine
        .issue_preview_token(&id, port, q.ttl.as_deref())
        .await;
    s.engine.audit(
        ctx.event("preview.token", &id)
            .detail("port", port)
            .outcome(&r),
    );
    Ok(Json(r?))
}

// ---------------------------------------------------------------------------
// tokens, cookies and headers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Query,
    Header,
    Cookie,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Take `stacyvm_token` out of a query string: (its value, the rest of the
/// query unchanged, `None` when nothing is left).
fn split_token(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(q) = query else {
        return (None, None);
    };
    let mut token = None;
    let mut rest: Vec<&str> = Vec::new();
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k) == TOKEN_PARAM {
            if token.is_none() {
                token = Some(percent_decode(v));
            }
        } else {
            rest.push(pair);
        }
    }
    if token.is_none() {
        return (None, Some(q.to_string()));
    }
    let rest = rest.join("&");
    (token, (!rest.is_empty()).then_some(rest))
}

/// Values of cookie `name` in the request's `Cookie` headers.
fn cookie_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for c in v.split(';') {
            if let Some((k, val)) = c.trim().split_once('=') {
                if k.trim() == name {
                    out.push(val.trim().trim_matches('"').to_string());
                }
            }
        }
    }
    out
}

/// The `Cookie` header without our own cookie (`None` when nothing is left).
fn cookies_without_ours(v: &HeaderValue) -> Option<HeaderValue> {
    let Ok(s) = v.to_str() else {
        return Some(v.clone());
    };
    let kept: Vec<&str> = s
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .filter(|c| c.split_once('=').map_or(c.trim(), |(k, _)| k.trim()) != COOKIE)
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join("; ")).ok()
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// A protocol upgrade (WebSocket, …): `Connection: upgrade` and `Upgrade`.
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && has_token(headers, header::CONNECTION, "upgrade")
}

/// Remove the hop-by-hop headers (RFC 9110 §7.6.1), those named by
/// `Connection` included; an upgrade keeps `Connection` and `Upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        h.remove(n);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// Whether `k` is one of this server's API keys (the bootstrap key or a
/// created one).
fn is_server_key(engine: &Engine, k: &str) -> bool {
    engine.authenticate(k).is_some()
}

/// Whether an `Authorization` value is `Bearer <one of the server's keys>`.
fn is_bearer_key(v: &HeaderValue, is_key: &dyn Fn(&str) -> bool) -> bool {
    let Ok(s) = v.to_str() else { return false };
    let s = s.trim();
    match s.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("bearer ") => is_key(s[7..].trim()),
        _ => false,
    }
}

/// The headers the app gets.
fn upstream_headers(
    incoming: &HeaderMap,
    upgrade: bool,
    host: &str,
    peer: Option<std::net::IpAddr>,
    is_key: &dyn Fn(&str) -> bool,
) -> HeaderMap {
    let mut h = incoming.clone();
    strip_hop_by_hop(&mut h, upgrade);
    h.remove(TOKEN_HEADER);
    // 100-continue was already answered to the client by this server.
    h.remove(header::EXPECT);
    // API keys never reach sandboxed code.
    h.remove("x-api-key");
    let auth: Vec<HeaderValue> = h.get_all(header::AUTHORIZATION).iter().cloned().collect();
    if auth.iter().any(|v| is_bearer_key(v, is_key)) {
        h.remove(header::AUTHORIZATION);
        for v in auth.into_iter().filter(|v| !is_bearer_key(v, is_key)) {
            h.append(header::AUTHORIZATION, v);
        }
    }
    let cookies: Vec<HeaderValue> = h.get_all(header::COOKIE).iter().cloned().collect();
    h.remove(header::COOKIE);
    for c in cookies.iter().filter_map(cookies_without_ours) {
        h.append(header::COOKIE, c);
    }
    if let Ok(v) = HeaderValue::from_str(host) {
        h.insert(header::HOST, v);
    }
    if let Some(ip) = peer {
        let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => format!("{}, {ip}", prev.trim()),
            _ => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
    }
    // A front proxy's word on the original request wins; otherwise ours.
    let proto = match h.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        _ => "http",
    };
    h.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if !h.contains_key("x-forwarded-host") {
        if let Ok(v) = HeaderValue::from_str(host) {
            h.insert("x-forwarded-host", v);
        }
    }
    if !h.contains_key("x-forwarded-port") {
        let port = host
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or(if proto == "https" { 443 } else { 80 });
        h.insert("x-forwarded-port", HeaderValue::from(port));
    }
    h
}

/// 302 to the same URL without the token, setting the token as a cookie
/// for this host only.
fn cookie_redirect(req: &Request, rest_query: &Option<String>, token: &str, exp: u64) -> Response {
    let path = req.uri().path();
    let location = match rest_query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secure = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{COOKIE}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
        exp.saturating_sub(now),
        if secure { "; Secure" } else { "" }
    );
    let mut resp = (
        StatusCode::FOUND,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        format!(
            "<!doctype html><title>Redirecting</title><a href=\"{}\">Continue to the preview</a>\n",
            html_escape(&location)
        ),
    )
        .into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        h.insert(header::SET_COOKIE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

// ---------------------------------------------------------------------------
// failure pages

/// What is needed of the request to answer a failure.
#[derive(Clone)]
struct ReqHead {
    host: String,
    json: bool,
    has_body: bool,
}

impl ReqHead {
    fn of(req: &Request) -> ReqHead {
        let h = req.headers();
        ReqHead {
            host: request_host(req).unwrap_or_default().to_string(),
            json: h
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/json")),
            has_body: h.contains_key(header::TRANSFER_ENCODING)
                || h.get(header::CONTENT_LENGTH)
                    .is_some_and(|v| v.as_bytes() != b"0"),
        }
    }
}

struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, code: &'static str, message: String) -> Failure {
        Failure {
            status,
            code,
            message,
        }
    }

    fn from_engine(e: stacyvm_core::Error, id: &str) -> Failure {
        match e.code {
            ErrorCode::NotFound => Failure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("sandbox {id} does not exist (or was destroyed)"),
            ),
            ErrorCode::Conflict => {
                Failure::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.message)
            }
            ErrorCode::InvalidRequest => {
                Failure::new(StatusCode::BAD_REQUEST, "invalid_request", e.message)
            }
            _ => Failure::new(StatusCode::BAD_GATEWAY, "provider_error", e.message),
        }
    }

    fn token(e: TokenError) -> Failure {
        let (status, code) = match e {
            TokenError::Expired => (StatusCode::UNAUTHORIZED, "unauthorized"),
            _ => (StatusCode::FORBIDDEN, "forbidden"),
        };
        let hint = match e {
            TokenError::Expired => "; ask for a new one",
            TokenError::OtherTarget { .. } => "; this is another preview",
            _ => "",
        };
        Failure::new(status, code, format!("{e}{hint}"))
    }

    fn from_client(e: &hyper_util::client::legacy::Error, id: &str, port: u16) -> Failure {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = src {
            if let Some(t) = err.downcast_ref::<TunnelError>() {
                return match t {
                    TunnelError::PortClosed { .. } => Failure::new(
                        StatusCode::BAD_GATEWAY,
                        "port_closed",
                        format!(
                            "nothing is listening on port {port} in sandbox {id}; start a server on 0.0.0.0:{port} or 127.0.0.1:{port}"
                        ),
                    ),
                    TunnelError::Sandbox(e) => Failure::from_engine(e.clone(), id),
                };
            }
            src = err.source();
        }
        tracing::debug!(sandbox = %id, port, error = ?e, "preview upstream failed");
        Failure::new(
            StatusCode::BAD_GATEWAY,
            "provider_error",
            format!(
                "the app on port {port} of sandbox {id} closed the connection without an answer"
            ),
        )
    }

    fn respond(self, req: &Request) -> Response {
        self.respond_head(&ReqHead::of(req))
    }

    fn respond_head(self, head: &ReqHead) -> Response {
        let mut resp = if head.json {
            (
                self.status,
                Json(serde_json::json!({"code": self.code, "message": self.message})),
            )
                .into_response()
        } else {
            let title = format!(
                "{} {}",
                self.status.as_u16(),
                self.status.canonical_reason().unwrap_or("Error")
            );
            let page = format!(
                "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
                 <meta name=\"viewport\" content=\"width=device-width\">\
                 <title>{title}</title><style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40em;\
                 margin:4em auto;padding:0 1em;color:#222}}code{{background:#f2f2f2;padding:0 .2em}}\
                 small{{color:#777}}</style></head><body>\n<h1>{title}</h1>\n<p>{}</p>\n\
                 <p><small>StacyVM live preview · <code>{}</code> · {}</small></p>\n</body></html>\n",
                html_escape(&sentence(&self.message)),
                self.code,
                html_escape(&shorten(&head.host, 120)),
            );
            (
                self.status,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                page,
            )
                .into_response()
        };
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if head.has_body {
            // The request body was not read; don't reuse the connection.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// A message as a sentence: capitalised, with a full stop.
fn sentence(m: &str) -> String {
    let mut c = m.chars();
    let mut out: String = match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => return String::new(),
    };
    if !out.ends_with(['.', '!', '?', ')']) {
        out.push('.');
    }
    out
}

/// At most `max` characters of `s` (an echoed host name may be huge).
fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// upstream plumbing

/// Opens tunnels for the connection pool: the pool key
/// `{port}-{id}.tunnel` names the sandbox port.
#[derive(Clone)]
struct Connector(Arc<Engine>);

type ConnectFuture = Pin<Box<dyn Future<Output = Result<TunnelConn, TunnelError>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = TunnelConn;
    type Error = TunnelError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let engine = self.0.clone();
        Box::pin(async move {
            let target = dst
                .host()
                .and_then(|h| h.strip_suffix(POOL_SUFFIX))
                .and_then(|h| h.split_once('-'))
                .and_then(|(p, id)| Some((pv::parse_port(p)?, id.to_string())));
            let Some((port, id)) = target else {
                return Err(TunnelError::Sandbox(stacyvm_core::Error::internal(
                    format!("bad preview pool key {dst}"),
                )));
            };
            let tunnel = engine.open_tunnel(&id, port).await?;
            Ok(TunnelConn(tunnel.into_inner()))
        })
    }
}

/// A tunnel as a connection of the pool.
struct TunnelConn(Upgraded);

impl hyper::rt::Read for TunnelConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TunnelConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

impl Connection for TunnelConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// The client's request body on its way to the app; dropping it (hyper
/// does once it is sent) starts the response-header timeout.
struct Tracked {
    inner: axum::body::Body,
    _done: oneshot::Sender<()>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_taken_out_of_the_query() {
        assert_eq!(split_token(None), (None, None));
        assert_eq!(
            split_token(Some("a=1&b=2")),
            (None, Some("a=1&b=2".to_string()))
        );
        assert_eq!(
            split_token(Some("stacyvm_token=v1.x&a=1")),
            (Some("v1.x".to_string()), Some("a=1".to_string()))
        );
        assert_eq!(
            split_token(Some("a=1&stacyvm_token=v1.y%2Dz")),
            (Some("v1.y-z".to_string()), Some("a=1".to_string()))
        );
        assert_eq!(
            split_token(Some("stacyvm_token=t")),
            (Some("t".to_string()), None)
        );
    }

    #[test]
    fn headers_for_the_app() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-api-key", HeaderValue::from_static("k"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert(TOKEN_HEADER, HeaderValue::from_static("v1.t"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; stacyvm_preview=v1.t; b=2"),
        );
        h.insert("x-app", HeaderValue::from_static("kept"));
        let out = upstream_headers(
            &h,
            false,
            "3000-sb_abcdefghijkl.preview.test:7423",
            Some("127.0.0.1".parse().unwrap()),
            &|k| k == "k",
        );
        for gone in [
            "connection",
            "x-hop",
            "keep-alive",
            "x-api-key",
            "authorization",
            TOKEN_HEADER,
        ] {
            assert!(!out.contains_key(gone), "{gone} kept");
        }
        assert_eq!(out["cookie"], "a=1; b=2");
        assert_eq!(out["x-app"], "kept");
        assert_eq!(out["host"], "3000-sb_abcdefghijkl.preview.test:7423");
        assert_eq!(out["x-forwarded-for"], "127.0.0.1");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert_eq!(out["x-forwarded-port"], "7423");
        assert_eq!(
            out["x-forwarded-host"],
            "3000-sb_abcdefghijkl.preview.test:7423"
        );

        // The app's own bearer tokens pass; an upgrade keeps its headers.
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer app"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("stacyvm_preview=x"),
        );
        let out = upstream_headers(
            &h,
            true,
            "h.test",
            Some("127.0.0.1".parse().unwrap()),
            &|k| k == "k",
        );
        assert_eq!(out["authorization"], "Bearer app");
        assert_eq!(out["connection"], "upgrade");
        assert_eq!(out["upgrade"], "websocket");
        assert_eq!(out["x-forwarded-for"], "192.0.2.1, 127.0.0.1");
        assert_eq!(out["x-forwarded-port"], "80");
        assert!(!out.contains_key("cookie"));
    }

    #[test]
    fn pages_escape_what_they_echo() {
        assert_eq!(
            html_escape("<script>alert('x')</script>&\u{0}"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;\u{fffd}"
        );
    }
}
