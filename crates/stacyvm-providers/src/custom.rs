//! The `custom` provider: sandboxes made by an operator's own backend,
//! reached through a small HTTP contract (docs/CUSTOM_PROVIDER.md and
//! docs/custom-provider.openapi.yaml).
//!
//! The backend only creates, lists and removes sandboxes; each one runs the
//! StacyVM agent, and the server talks to that agent directly: over a Unix
//! socket on this host (a same-host backend that bind-mounts the sandbox's
//! run directory) or over TCP with a per-sandbox bearer token (a backend
//! anywhere). The provider remembers each sandbox's agent endpoint and asks
//! the backend again after a server restart.
//!
//! Every call is bounded by a timeout. Errors map as follows: an
//! unreachable backend, a timeout, `503` or refused credentials →
//! [`ProviderError::Unavailable`]; other `5xx` → [`ProviderError::Runtime`];
//! any `4xx` whose code is `image_not_found` → [`ProviderError::Image`];
//! other `4xx` → [`ProviderError::Invalid`] (the request cannot be met).

use crate::agent::{AgentClient, AgentEndpoint};
use crate::{error_chain, Isolation, Provider, ProviderError, RuntimeInfo, SandboxSpec};
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The provider's name in the API and the configuration.
pub const NAME: &str = "custom";

/// Bound on a TCP connect to the backend.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on `GET /v1/health`.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on `GET /v1/sandboxes/{id}` and the logs call.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on `GET /v1/sandboxes?instance_id=`.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on `DELETE /v1/sandboxes/{id}`.
const DELETE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on the clean-up delete after a failed create.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer body read from the backend.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Lines of the backend's sandbox log added to a failed create's message.
const FAILURE_LOG_LINES: usize = 20;
/// Most capability words taken from the backend.
const MAX_CAPABILITIES: usize = 64;

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How to reach the backend.
#[derive(Clone)]
pub struct CustomOptions {
    /// Base URL, `http://host:port` or `https://host[:port]`, optionally
    /// with a path prefix (`http://host:7500/stacyvm`).
    pub url: String,
    /// Sent as `Authorization: Bearer <token>` on every call when set.
    pub token: Option<String>,
    /// This server's instance id; every sandbox is created with it and
    /// reconciliation lists only this instance's sandboxes.
    pub instance_id: String,
}

impl std::fmt::Debug for CustomOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomOptions")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("instance_id", &self.instance_id)
            .finish()
    }
}

// ----- wire types ----------------------------------------------------------

/// `POST /v1/sandboxes` body.
#[derive(Debug, Serialize)]
struct CreateRequest<'a> {
    id: &'a str,
    instance_id: &'a str,
    image: &'a str,
    memory_mb: u64,
    vcpus: u32,
    pids_limit: u64,
    network: &'a str,
    env: &'a BTreeMap<String, String>,
    hostname: String,
    run_dir: String,
    start_timeout_ms: u64,
}

/// How the backend says its agent is reached.
#[derive(Debug, Clone, Default, Deserialize)]
struct AgentWire {
    #[serde(default)]
    unix: Option<String>,
    #[serde(default)]
    tcp: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

impl AgentWire {
    fn endpoint(&self) -> Result<AgentEndpoint, String> {
        match (&self.unix, &self.tcp) {
            (Some(path), None) => {
                if !path.starts_with('/') {
                    return Err(format!("agent.unix {path:?} is not an absolute path"));
                }
                Ok(AgentEndpoint::Unix(path.into()))
            }
            (None, Some(addr)) => {
                let ok = match addr.rsplit_once(':') {
                    Some((host, port)) => {
                        !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
                    }
                    None => false,
                };
                if !ok {
                    return Err(format!("agent.tcp {addr:?} is not host:port"));
                }
                match &self.token {
                    Some(t) if !t.is_empty() => Ok(AgentEndpoint::Tcp {
                        addr: addr.clone(),
                        token: t.clone(),
                    }),
                    _ => Err("agent.tcp needs agent.token".to_string()),
                }
            }
            (Some(_), Some(_)) => Err("agent has both unix and tcp".to_string()),
            (None, None) => Err("agent has neither unix nor tcp".to_string()),
        }
    }
}

/// A sandbox as the backend describes it.
#[derive(Debug, Clone, Deserialize)]
struct SandboxWire {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default)]
    runtime_id: Option<String>,
    #[serde(default)]
    running: Option<bool>,
    #[serde(default)]
    agent: Option<AgentWire>,
}

#[derive(Debug, Deserialize)]
struct ListWire {
    sandboxes: Vec<SandboxWire>,
}

#[derive(Debug, Deserialize)]
struct HealthWire {
    status: String,
    isolation: String,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct LogsWire {
    #[serde(default)]
    lines: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorInner {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// `{"error":{"code","message"}}`; the flat `{"code","message"}` of the
/// StacyVM API is understood too.
#[derive(Debug, Deserialize)]
struct ErrorWire {
    #[serde(default)]
    error: Option<ErrorInner>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Code and message of an error answer (`None` when the body says nothing).
fn error_parts(body: &[u8]) -> (Option<String>, Option<String>) {
    match serde_json::from_slice::<ErrorWire>(body) {
        Ok(ErrorWire {
            error: Some(inner), ..
        }) => (inner.code, inner.message),
        Ok(ErrorWire { code, message, .. }) => (code, message),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let short: String = text.chars().take(300).collect();
            (None, (!short.is_empty()).then_some(short))
        }
    }
}

/// Parse an isolation word of the contract.
pub fn parse_isolation(s: &str) -> Option<Isolation> {
    Some(match s {
        "container" => Isolation::Container,
        "namespaces" => Isolation::Namespaces,
        "microvm" => Isolation::Microvm,
        "ptrace" => Isolation::Ptrace,
        "none" => Isolation::None,
        _ => return None,
    })
}

/// A capability word the server shows: `[a-z0-9_]`, 1-64 characters.
fn valid_capability(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The error for a non-2xx answer of the backend to `what` (a create of
/// `image` when given).
fn error_for(status: StatusCode, body: &[u8], what: &str, image: Option<&str>) -> ProviderError {
    let (code, message) = error_parts(body);
    let code = code.unwrap_or_default();
    let message = message
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
    let detail = if code.is_empty() {
        format!("{} {message}", status.as_u16())
    } else {
        format!("{} {code}: {message}", status.as_u16())
    };
    let unavailable = |message: String| ProviderError::Unavailable {
        provider: NAME.to_string(),
        message,
    };
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return unavailable(format!(
            "the backend refused the server's credentials on {what} ({detail}); check custom.token"
        ));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        return unavailable(format!("the backend is unavailable ({what}: {detail})"));
    }
    if status.is_server_error() {
        return ProviderError::Runtime(format!("the custom backend failed to {what}: {detail}"));
    }
    if code == "image_not_found" {
        return ProviderError::Image {
            image: image.unwrap_or("?").to_string(),
            message: format!("the custom backend does not have it ({message})"),
        };
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::CONFLICT {
        return ProviderError::Runtime(format!("the custom backend could not {what}: {detail}"));
    }
    if status.is_client_error() {
        return ProviderError::Invalid(format!("the custom backend refused to {what}: {message}"));
    }
    ProviderError::Runtime(format!(
        "the custom backend answered {what} unexpectedly: {detail}"
    ))
}

/// Validate a base URL into `scheme://authority[/prefix]` without a
/// trailing slash.
fn parse_base_url(url: &str) -> Result<String, ProviderError> {
    let invalid = |why: &str| ProviderError::Invalid(format!("custom.url {url:?}: {why}"));
    let uri: http::Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(invalid("must start with http:// or https://")),
    }
    let authority = uri.authority().ok_or_else(|| invalid("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid(
            "must not carry credentials; set custom.token instead",
        ));
    }
    if uri.query().is_some() {
        return Err(invalid("must not have a query"));
    }
    let path = uri.path().trim_end_matches('/');
    Ok(format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("http"),
        authority,
        path
    ))
}

struct BackendInfo {
    isolation: Isolation,
    capabilities: Vec<String>,
}

/// The HTTP side of the contract: base URL, credentials, pooled client.
/// Cheap to clone (for clean-ups that outlive a call).
#[derive(Clone)]
struct Backend {
    /// `scheme://authority[/prefix]`.
    base: String,
    authorization: Option<HeaderValue>,
    client: HttpClient,
}

pub struct CustomProvider {
    backend: Backend,
    instance_id: String,
    /// What the backend last reported in `GET /v1/health`.
    info: RwLock<BackendInfo>,
    /// Agent endpoints of the sandboxes this server knows, by sandbox id.
    agents: RwLock<HashMap<String, AgentClient>>,
}

impl Backend {
    fn unavailable(&self, message: String) -> ProviderError {
        ProviderError::Unavailable {
            provider: NAME.to_string(),
            message,
        }
    }

    /// One call to the backend, bounded by `timeout` (body included).
    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ProviderError> {
        let url = format!("{}{path_and_query}", self.base);
        let mut b = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(http::header::ACCEPT, "application/json");
        if let Some(auth) = &self.authorization {
            b = b.header(http::header::AUTHORIZATION, auth.clone());
        }
        let req = match body {
            Some(bytes) => b
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(bytes))),
            None => b.body(Full::new(Bytes::new())),
        }
        .map_err(|e| ProviderError::Invalid(format!("bad request to the backend: {e}")))?;
        let started = Instant::now();
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| {
                self.unavailable(format!(
                    "backend {} is unreachable: {}",
                    self.base,
                    error_chain(&e)
                ))
            })?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    self.unavailable(format!(
                        "backend {} broke off its answer to {method} {path_and_query}: {e}",
                        self.base
                    ))
                })?
                .to_bytes();
            Ok((status, body))
        };
        let out = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(self.unavailable(format!(
                "backend {} did not answer {method} {path_and_query} within {} ms",
                self.base,
                timeout.as_millis()
            ))),
        };
        match &out {
            Ok((status, _)) => {
                tracing::debug!(%method, path = path_and_query, status = status.as_u16(),
                ms = started.elapsed().as_millis() as u64, "custom backend call")
            }
            Err(e) => {
                tracing::debug!(%method, path = path_and_query, error = %e, "custom backend call failed")
            }
        }
        out
    }

    /// Best-effort removal of a sandbox whose create failed.
    async fn cleanup(&self, sandbox_id: &str) {
        match self
            .call(
                Method::DELETE,
                &CustomProvider::sandbox_path(sandbox_id),
                None,
                CLEANUP_TIMEOUT,
            )
            .await
        {
            Ok((s, _)) if s.is_success() || s == StatusCode::NOT_FOUND => {}
            Ok((s, body)) => tracing::warn!(sandbox = %sandbox_id, status = s.as_u16(),
                body = %String::from_utf8_lossy(&body[..body.len().min(300)]),
                "the custom backend refused to remove a failed sandbox"),
            Err(e) => tracing::warn!(sandbox = %sandbox_id, error = %e,
                "could not remove a failed sandbox from the custom backend"),
        }
    }
}

impl CustomProvider {
    /// Build the provider without calling the backend.
    pub fn new(opts: CustomOptions) -> Result<CustomProvider, ProviderError> {
        let base = parse_base_url(&opts.url)?;
        let authorization = match opts.token.as_deref() {
            None | Some("") => None,
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    ProviderError::Invalid(
                        "custom.token contains characters that cannot be sent in a header"
                            .to_string(),
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ProviderError::Invalid(format!("TLS setup failed: {e}")))?
        .with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(15))
            .build(connector);
        Ok(CustomProvider {
            backend: Backend {
                base,
                authorization,
                client,
            },
            instance_id: opts.instance_id,
            info: RwLock::new(BackendInfo {
                isolation: Isolation::None,
                capabilities: Vec::new(),
            }),
            agents: RwLock::new(HashMap::new()),
        })
    }

    /// Build the provider and ask the backend for its isolation and
    /// capabilities. A backend that is down is not an error here: the
    /// provider reports it unhealthy until it answers.
    pub async fn connect(opts: CustomOptions) -> Result<CustomProvider, ProviderError> {
        let p = CustomProvider::new(opts)?;
        match p.health().await {
            Ok(()) => tracing::info!(url = %p.backend.base, isolation = p.isolation().as_str(),
                capabilities = %p.capabilities().join(","), "custom backend connected"),
            Err(e) => tracing::warn!(url = %p.backend.base, error = %e,
                "the custom backend is not usable yet; the provider is unhealthy until it answers"),
        }
        Ok(p)
    }

    /// The backend's base URL.
    pub fn url(&self) -> &str {
        &self.backend.base
    }

    fn unavailable(&self, message: String) -> ProviderError {
        self.backend.unavailable(message)
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ProviderError> {
        self.backend
            .call(method, path_and_query, body, timeout)
            .await
    }

    fn sandbox_path(id: &str) -> String {
        format!("/v1/sandboxes/{}", stacyvm_agent_proto::percent_encode(id))
    }

    fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ProviderError> {
        serde_json::from_slice(bytes).map_err(|e| {
            ProviderError::Runtime(format!(
                "the custom backend's answer to {what} is not the contract's JSON: {e}"
            ))
        })
    }

    /// Remember (or forget) a sandbox's agent from the backend's view of it.
    fn learn(&self, sb: &SandboxWire, sandbox_id: &str) -> Option<AgentClient> {
        let client = sb
            .agent
            .as_ref()
            .ok_or_else(|| "no agent".to_string())
            .and_then(|a| a.endpoint())
            .and_then(|e| AgentClient::from_endpoint(e).map_err(|e| e.to_string()));
        let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
        match client {
            Ok(c) => {
                agents.insert(sandbox_id.to_string(), c.clone());
                Some(c)
            }
            Err(why) => {
                tracing::warn!(sandbox = %sandbox_id, why, "the custom backend describes no usable agent");
                agents.remove(sandbox_id);
                None
            }
        }
    }

    fn forget(&self, sandbox_id: &str) {
        self.agents
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sandbox_id);
    }

    fn info_of(sb: &SandboxWire, sandbox_id: &str) -> RuntimeInfo {
        RuntimeInfo {
            sandbox_id: sandbox_id.to_string(),
            runtime_id: sb.runtime_id.clone().unwrap_or_default(),
            running: sb.running.unwrap_or(true),
        }
    }

    async fn create_inner(
        &self,
        spec: &SandboxSpec,
        deadline: Instant,
    ) -> Result<RuntimeInfo, ProviderError> {
        let req = CreateRequest {
            id: &spec.id,
            instance_id: &self.instance_id,
            image: &spec.image,
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            pids_limit: spec.pids_limit,
            network: spec.network.as_str(),
            env: &spec.env,
            hostname: crate::hostname_for(&spec.id),
            run_dir: spec.run_dir.to_string_lossy().into_owned(),
            start_timeout_ms: spec.start_timeout.as_millis() as u64,
        };
        let body = serde_json::to_vec(&req)
            .map_err(|e| ProviderError::Runtime(format!("cannot encode the request: {e}")))?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let (status, bytes) = self
            .call(Method::POST, "/v1/sandboxes", Some(body), remaining)
            .await?;
        if !status.is_success() {
            return Err(error_for(
                status,
                &bytes,
                "create the sandbox",
                Some(&spec.image),
            ));
        }
        let sb: SandboxWire = Self::parse(&bytes, "the create")?;
        if let Some(id) = sb.id.as_deref().filter(|id| *id != spec.id) {
            return Err(ProviderError::Runtime(format!(
                "the custom backend answered the create of {} with sandbox {id}",
                spec.id
            )));
        }
        let endpoint = sb
            .agent
            .as_ref()
            .ok_or_else(|| "no agent".to_string())
            .and_then(|a| a.endpoint())
            .map_err(|why| {
                ProviderError::Runtime(format!("the custom backend's create answer: {why}"))
            })?;
        let agent = AgentClient::from_endpoint(endpoint)
            .map_err(|e| ProviderError::Runtime(format!("the custom backend's agent: {e}")))?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let ready = tokio::time::timeout(remaining, agent.wait_ready(remaining)).await;
        let err = match ready {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("no answer".to_string()),
        };
        if let Some(err) = err {
            let mut msg = format!(
                "agent at {} did not answer within {} ms: {err}",
                agent.endpoint(),
                spec.start_timeout.as_millis()
            );
            let lines = self.logs(&spec.id, FAILURE_LOG_LINES).await;
            if !lines.is_empty() {
                msg.push_str("; backend log:\n");
                msg.push_str(&lines.join("\n"));
            }
            return Err(ProviderError::AgentStart(msg));
        }
        self.agents
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.id.clone(), agent);
        Ok(RuntimeInfo {
            sandbox_id: spec.id.clone(),
            runtime_id: sb.runtime_id.unwrap_or_default(),
            running: true,
        })
    }
}

#[async_trait]
impl Provider for CustomProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn isolation(&self) -> Isolation {
        self.info
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .isolation
    }

    fn capabilities(&self) -> Vec<String> {
        self.info
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .capabilities
            .clone()
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, ProviderError> {
        let t0 = Instant::now();
        let deadline = t0 + spec.start_timeout;
        match self.create_inner(spec, deadline).await {
            Ok(info) => {
                tracing::debug!(sandbox = %spec.id, runtime = %info.runtime_id,
                    ms = t0.elapsed().as_millis() as u64, "custom sandbox ready");
                Ok(info)
            }
            Err(e) => {
                // Whatever the backend may have started goes again. A
                // refused request (4xx) made nothing; a backend that did
                // not answer is asked in the background, so that the
                // failure is reported now (the server's own destroy and
                // orphan sweeps follow up).
                self.forget(&spec.id);
                match &e {
                    ProviderError::Invalid(_) | ProviderError::Image { .. } => {}
                    ProviderError::Unavailable { .. } => {
                        let backend = self.backend.clone();
                        let id = spec.id.clone();
                        tokio::spawn(async move { backend.cleanup(&id).await });
                    }
                    _ => self.backend.cleanup(&spec.id).await,
                }
                Err(e)
            }
        }
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        self.forget(sandbox_id);
        let (status, bytes) = self
            .call(
                Method::DELETE,
                &Self::sandbox_path(sandbox_id),
                None,
                DELETE_TIMEOUT,
            )
            .await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(error_for(status, &bytes, "remove the sandbox", None))
        }
    }

    async fn inspect(&self, sandbox_id: &str) -> Result<Option<RuntimeInfo>, ProviderError> {
        let (status, bytes) = self
            .call(
                Method::GET,
                &Self::sandbox_path(sandbox_id),
                None,
                INSPECT_TIMEOUT,
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            self.forget(sandbox_id);
            return Ok(None);
        }
        if !status.is_success() {
            return Err(error_for(status, &bytes, "describe the sandbox", None));
        }
        let sb: SandboxWire = Self::parse(&bytes, "a sandbox lookup")?;
        self.learn(&sb, sandbox_id);
        Ok(Some(Self::info_of(&sb, sandbox_id)))
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>, ProviderError> {
        let path = crate::agent::with_query("/v1/sandboxes", &[("instance_id", &self.instance_id)]);
        let (status, bytes) = self.call(Method::GET, &path, None, LIST_TIMEOUT).await?;
        if !status.is_success() {
            return Err(error_for(status, &bytes, "list its sandboxes", None));
        }
        let list: ListWire = Self::parse(&bytes, "the sandbox list")?;
        let mut out = Vec::new();
        for sb in &list.sandboxes {
            let Some(id) = sb.id.as_deref().filter(|id| !id.is_empty()) else {
                tracing::warn!("the custom backend listed a sandbox without an id");
                continue;
            };
            if sb
                .instance_id
                .as_deref()
                .is_some_and(|i| i != self.instance_id)
            {
                continue;
            }
            self.learn(sb, id);
            out.push(Self::info_of(sb, id));
        }
        Ok(out)
    }

    async fn health(&self) -> Result<(), ProviderError> {
        let (status, bytes) = self
            .call(Method::GET, "/v1/health", None, HEALTH_TIMEOUT)
            .await?;
        if !status.is_success() {
            return Err(match error_for(status, &bytes, "report its health", None) {
                e @ ProviderError::Unavailable { .. } => e,
                other => self.unavailable(other.to_string()),
            });
        }
        let h: HealthWire =
            Self::parse(&bytes, "the health check").map_err(|e| self.unavailable(e.to_string()))?;
        let isolation = parse_isolation(&h.isolation).ok_or_else(|| {
            self.unavailable(format!(
                "the backend reports an unknown isolation {:?} (expected container, namespaces, microvm, ptrace or none)",
                h.isolation
            ))
        })?;
        let mut caps: Vec<String> = Vec::new();
        for c in h.capabilities {
            if !valid_capability(&c) {
                tracing::warn!(capability = %c, "ignoring a malformed capability word of the custom backend");
            } else if !caps.contains(&c) && caps.len() < MAX_CAPABILITIES {
                caps.push(c);
            }
        }
        {
            let mut info = self.info.write().unwrap_or_else(|p| p.into_inner());
            info.isolation = isolation;
            info.capabilities = caps;
        }
        if h.status != "ok" {
            return Err(self.unavailable(format!("the backend reports status {:?}", h.status)));
        }
        Ok(())
    }

    async fn logs(&self, sandbox_id: &str, lines: usize) -> Vec<String> {
        let n = lines.to_string();
        let path = crate::agent::with_query(
            &format!("{}/logs", Self::sandbox_path(sandbox_id)),
            &[("lines", &n)],
        );
        match self.call(Method::GET, &path, None, INSPECT_TIMEOUT).await {
            Ok((s, bytes)) if s.is_success() => serde_json::from_slice::<LogsWire>(&bytes)
                .map(|l| {
                    let skip = l.lines.len().saturating_sub(lines);
                    l.lines.into_iter().skip(skip).collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    async fn agent(&self, sandbox_id: &str, _socket: &Path) -> Result<AgentClient, ProviderError> {
        if let Some(a) = self
            .agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(sandbox_id)
        {
            return Ok(a.clone());
        }
        // Not known to this process (a server restart): ask the backend.
        if self.inspect(sandbox_id).await?.is_none() {
            return Err(ProviderError::Runtime(format!(
                "the custom backend has no sandbox {sandbox_id}"
            )));
        }
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(sandbox_id)
            .cloned()
            .ok_or_else(|| {
                ProviderError::Runtime(format!(
                    "the custom backend describes no usable agent for sandbox {sandbox_id}"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn bytes(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn backend_errors_map_to_provider_errors() {
        let img = Some("img:1");
        let e = error_for(
            StatusCode::NOT_FOUND,
            &bytes(json!({"error": {"code": "image_not_found", "message": "no image img:1"}})),
            "create the sandbox",
            img,
        );
        assert!(
            matches!(&e, ProviderError::Image { image, message } if image == "img:1" && message.contains("no image img:1")),
            "{e:?}"
        );
        // image_not_found is recognised with any 4xx and in the flat form.
        let e = error_for(
            StatusCode::BAD_REQUEST,
            &bytes(json!({"code": "image_not_found", "message": "nope"})),
            "create the sandbox",
            img,
        );
        assert!(matches!(e, ProviderError::Image { .. }), "{e:?}");
        let e = error_for(
            StatusCode::BAD_REQUEST,
            &bytes(
                json!({"error": {"code": "invalid_request", "message": "memory_mb 512 is over 256"}}),
            ),
            "create the sandbox",
            img,
        );
        assert!(
            matches!(&e, ProviderError::Invalid(m) if m.contains("memory_mb 512 is over 256")),
            "{e:?}"
        );
        let e = error_for(
            StatusCode::UNPROCESSABLE_ENTITY,
            b"",
            "create the sandbox",
            img,
        );
        assert!(matches!(e, ProviderError::Invalid(_)), "{e:?}");
        for s in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN] {
            let e = error_for(
                s,
                &bytes(json!({"error": {"code": "unauthorized", "message": "bad token"}})),
                "list",
                None,
            );
            assert!(
                matches!(&e, ProviderError::Unavailable { message, .. } if message.contains("custom.token")),
                "{e:?}"
            );
        }
        let e = error_for(
            StatusCode::SERVICE_UNAVAILABLE,
            b"",
            "create the sandbox",
            img,
        );
        assert!(matches!(e, ProviderError::Unavailable { .. }), "{e:?}");
        let e = error_for(
            StatusCode::INTERNAL_SERVER_ERROR,
            b"<html>boom</html>",
            "create the sandbox",
            img,
        );
        assert!(
            matches!(&e, ProviderError::Runtime(m) if m.contains("500") && m.contains("boom")),
            "{e:?}"
        );
        // An image_not_found code with a 5xx is still a backend failure.
        let e = error_for(
            StatusCode::BAD_GATEWAY,
            &bytes(json!({"error": {"code": "image_not_found", "message": "registry down"}})),
            "create the sandbox",
            img,
        );
        assert!(matches!(e, ProviderError::Runtime(_)), "{e:?}");
        for s in [StatusCode::CONFLICT, StatusCode::TOO_MANY_REQUESTS] {
            let e = error_for(s, b"{}", "create the sandbox", img);
            assert!(matches!(e, ProviderError::Runtime(_)), "{e:?}");
        }
    }

    #[test]
    fn agent_endpoints_are_validated() {
        let w = |v: serde_json::Value| serde_json::from_value::<AgentWire>(v).unwrap().endpoint();
        assert_eq!(
            w(json!({"unix": "/run/a.sock"})).unwrap(),
            AgentEndpoint::Unix("/run/a.sock".into())
        );
        assert_eq!(
            w(json!({"tcp": "192.0.2.2:7000", "token": "t"})).unwrap(),
            AgentEndpoint::Tcp {
                addr: "192.0.2.2:7000".into(),
                token: "t".into()
            }
        );
        assert!(w(json!({"tcp": "[::1]:7000", "token": "t"})).is_ok());
        assert!(w(json!({"tcp": "host.example:7000", "token": "t"})).is_ok());
        assert!(w(json!({"unix": "rel.sock"})).is_err());
        assert!(w(json!({"tcp": "192.0.2.2:7000"})).is_err());
        assert!(w(json!({"tcp": "192.0.2.2:7000", "token": ""})).is_err());
        assert!(w(json!({"tcp": "192.0.2.2", "token": "t"})).is_err());
        assert!(w(json!({"tcp": "192.0.2.2:0", "token": "t"})).is_err());
        assert!(w(json!({"tcp": "a:1", "token": "t", "unix": "/x"})).is_err());
        assert!(w(json!({})).is_err());
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base_url("http://127.0.0.1:7500").unwrap(),
            "http://127.0.0.1:7500"
        );
        assert_eq!(
            parse_base_url("http://127.0.0.1:7500/").unwrap(),
            "http://127.0.0.1:7500"
        );
        assert_eq!(
            parse_base_url("https://backend.example/stacyvm/").unwrap(),
            "https://backend.example/stacyvm"
        );
        for bad in [
            "ftp://x",
            "127.0.0.1:7500",
            "http://u:p@host",
            "http://h/?a=b",
            "",
        ] {
            assert!(parse_base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn isolation_and_capability_words() {
        assert_eq!(parse_isolation("namespaces"), Some(Isolation::Namespaces));
        assert_eq!(parse_isolation("microvm"), Some(Isolation::Microvm));
        assert_eq!(parse_isolation("vm"), None);
        assert!(valid_capability("exec"));
        assert!(valid_capability("network_none"));
        assert!(!valid_capability("Exec"));
        assert!(!valid_capability("a b"));
        assert!(!valid_capability(""));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let o = CustomOptions {
            url: "http://127.0.0.1:1".into(),
            token: Some("backend-secret".into()),
            instance_id: "i".into(),
        };
        assert!(!format!("{o:?}").contains("backend-secret"));
        let a = AgentClient::tcp("127.0.0.1:1", "agent-secret").unwrap();
        assert!(!format!("{a:?}").contains("agent-secret"));
    }

    /// A one-connection HTTP server on loopback that answers `status` and
    /// `body` and hands back the request head it saw.
    async fn one_shot(
        status: u16,
        body: &'static str,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let answer = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&head).into_owned()
        });
        (url, h)
    }

    fn provider(url: &str) -> CustomProvider {
        CustomProvider::new(CustomOptions {
            url: url.to_string(),
            token: Some("backend-token".into()),
            instance_id: "inst1".into(),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn health_is_cached_and_the_token_sent() {
        let (url, seen) = one_shot(
            200,
            r#"{"status":"ok","isolation":"microvm","capabilities":["exec","files","Bad Word","exec"]}"#,
        )
        .await;
        let p = provider(&url);
        assert_eq!(p.isolation(), Isolation::None);
        assert!(p.capabilities().is_empty());
        p.health().await.unwrap();
        assert_eq!(p.isolation(), Isolation::Microvm);
        assert_eq!(p.capabilities(), ["exec", "files"]);
        let head = seen.await.unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /v1/health http/1.1"), "{head}");
        assert!(
            head.contains("authorization: bearer backend-token"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn unreachable_and_silent_backends_are_unavailable() {
        // A port that refuses.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let p = provider(&format!("http://127.0.0.1:{port}"));
        let e = p.health().await.unwrap_err();
        assert!(
            matches!(&e, ProviderError::Unavailable { message, .. } if message.contains("unreachable")),
            "{e:?}"
        );
        let e = p.list().await.unwrap_err();
        assert!(matches!(e, ProviderError::Unavailable { .. }), "{e:?}");

        // A backend that accepts but never answers: bounded.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let p = provider(&url);
        let t0 = Instant::now();
        let e = p
            .call(Method::GET, "/v1/health", None, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(
            matches!(&e, ProviderError::Unavailable { message, .. } if message.contains("did not answer")),
            "{e:?}"
        );
        hold.abort();
    }

    #[tokio::test]
    async fn list_learns_agent_endpoints() {
        let (url, seen) = one_shot(
            200,
            r#"{"sandboxes":[
                {"id":"sb_a","instance_id":"inst1","runtime_id":"r1","running":true,"agent":{"tcp":"127.0.0.1:9","token":"tok-a"}},
                {"id":"sb_b","instance_id":"other","runtime_id":"r2","running":true,"agent":{"unix":"/x.sock"}},
                {"id":"sb_c","runtime_id":"r3","running":false,"agent":{"unix":"/c.sock"}}
            ]}"#,
        )
        .await;
        let p = provider(&url);
        let rts = p.list().await.unwrap();
        assert_eq!(
            rts,
            vec![
                RuntimeInfo {
                    sandbox_id: "sb_a".into(),
                    runtime_id: "r1".into(),
                    running: true
                },
                RuntimeInfo {
                    sandbox_id: "sb_c".into(),
                    runtime_id: "r3".into(),
                    running: false
                },
            ]
        );
        let head = seen.await.unwrap();
        assert!(
            head.starts_with("GET /v1/sandboxes?instance_id=inst1 "),
            "{head}"
        );
        // Known endpoints answer without another call (the server is gone).
        let a = p.agent("sb_a", Path::new("/unused")).await.unwrap();
        assert_eq!(
            a.endpoint(),
            &AgentEndpoint::Tcp {
                addr: "127.0.0.1:9".into(),
                token: "tok-a".into()
            }
        );
        let c = p.agent("sb_c", Path::new("/unused")).await.unwrap();
        assert_eq!(c.socket(), Some(Path::new("/c.sock")));
        // Another instance's sandbox is neither listed nor learnt.
        assert!(p.agent("sb_b", Path::new("/unused")).await.is_err());
    }
}
