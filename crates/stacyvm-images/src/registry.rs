//! A minimal client of the Distribution API v2 / OCI distribution spec:
//! manifests and blobs by GET, bearer-token and basic authentication,
//! redirects to blob CDNs, and digests verified on everything fetched.

use crate::manifest::{Descriptor, MANIFEST_ACCEPT};
use crate::reference::{host_of, is_loopback_host, Reference, DOCKER_HUB};
use crate::{Credentials, ImageError, StoreOptions};
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, USER_AGENT, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Until the response headers arrive.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// Between two chunks of a body.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_REDIRECTS: usize = 10;
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
pub const MAX_CONFIG_BYTES: u64 = 32 * 1024 * 1024;
const MAX_ERROR_BODY: u64 = 64 * 1024;
const USER_AGENT_VALUE: &str = concat!("stacyvm/", env!("CARGO_PKG_VERSION"));

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Where one repository is reached.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `https` or `http`.
    pub scheme: &'static str,
    /// `host[:port]` actually connected to (`registry-1.docker.io` for
    /// `docker.io`).
    pub authority: String,
    /// Registry name of the reference (`docker.io`), for credentials.
    pub domain: String,
    /// Repository path (`library/python`).
    pub path: String,
}

impl Endpoint {
    fn url(&self, kind: &str, object: &str) -> String {
        format!(
            "{}://{}/v2/{}/{kind}/{object}",
            self.scheme, self.authority, self.path
        )
    }
}

/// A fetched manifest (or index), its bytes verified against its digest.
#[derive(Debug)]
pub struct FetchedManifest {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub digest: String,
}

pub struct Registry {
    client: HttpClient,
    insecure: Vec<String>,
    default_registry: String,
    credentials: HashMap<String, Credentials>,
    /// `authority|repository` → value of the `Authorization` header.
    tokens: Mutex<HashMap<String, String>>,
    requests: Arc<AtomicU64>,
}

impl Registry {
    pub fn new(opts: &StoreOptions) -> Result<Registry, ImageError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ImageError::Network(format!("TLS setup failed: {e}")))?
            .with_root_certificates(roots)
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
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Registry {
            client,
            insecure: opts.insecure_registries.clone(),
            default_registry: opts.default_registry.clone(),
            credentials: opts.credentials.clone(),
            tokens: Mutex::new(HashMap::new()),
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    /// HTTP requests sent so far (token requests and redirects included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn endpoint(&self, r: &Reference) -> Endpoint {
        let authority = if r.domain == DOCKER_HUB {
            self.default_registry.clone()
        } else {
            r.domain.clone()
        };
        let plain = is_loopback_host(&authority)
            || self
                .insecure
                .iter()
                .any(|i| i == &authority || i == &r.domain || i == host_of(&authority));
        Endpoint {
            scheme: if plain { "http" } else { "https" },
            authority,
            domain: r.domain.clone(),
            path: r.path.clone(),
        }
    }

    /// GET a manifest by tag or digest. With a digest, the body must hash to it.
    pub async fn manifest(
        &self,
        ep: &Endpoint,
        object: &str,
    ) -> Result<FetchedManifest, ImageError> {
        let what = format!("manifest {}/{}:{object}", ep.domain, ep.path);
        let resp = self
            .send(ep, &ep.url("manifests", object), Some(MANIFEST_ACCEPT))
            .await?;
        if !resp.status().is_success() {
            return Err(error_for(resp, &what).await);
        }
        let content_type = header_str(&resp, CONTENT_TYPE);
        let header_digest = header_str(&resp, "docker-content-digest");
        let body = read_limited(resp.into_body(), MAX_MANIFEST_BYTES, &what).await?;
        let actual = sha256_digest(&body);
        let expected = if object.starts_with("sha256:") {
            Some(object.to_string())
        } else {
            header_digest.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != actual {
                return Err(ImageError::DigestMismatch { expected, actual });
            }
        }
        Ok(FetchedManifest {
            body,
            content_type,
            digest: actual,
        })
    }

    /// GET a small blob (a config) into memory, verified.
    pub async fn blob_bytes(
        &self,
        ep: &Endpoint,
        desc: &Descriptor,
        limit: u64,
    ) -> Result<Vec<u8>, ImageError> {
        let what = format!("blob {}", desc.digest);
        if desc.size > limit {
            return Err(ImageError::Corrupt(format!(
                "{what} is {} bytes, more than the {limit} allowed",
                desc.size
            )));
        }
        let resp = self.send(ep, &ep.url("blobs", &desc.digest), None).await?;
        if !resp.status().is_success() {
            return Err(error_for(resp, &what).await);
        }
        let body = read_limited(resp.into_body(), limit, &what).await?;
        let actual = sha256_digest(&body);
        if actual != desc.digest {
            return Err(ImageError::DigestMismatch {
                expected: desc.digest.clone(),
                actual,
            });
        }
        Ok(body)
    }

    /// Stream a blob into `dest` (created), verifying its digest and size.
    /// On any error `dest` is removed.
    pub async fn download_blob(
        &self,
        ep: &Endpoint,
        desc: &Descriptor,
        dest: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64, ImageError> {
        let r = self.download_blob_inner(ep, desc, dest, progress).await;
        if r.is_err() {
            let _ = tokio::fs::remove_file(dest).await;
        }
        r
    }

    async fn download_blob_inner(
        &self,
        ep: &Endpoint,
        desc: &Descriptor,
        dest: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64, ImageError> {
        let what = format!("blob {}", desc.digest);
        let resp = self.send(ep, &ep.url("blobs", &desc.digest), None).await?;
        if !resp.status().is_success() {
            return Err(error_for(resp, &what).await);
        }
        let file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| ImageError::io_path("creating", dest, e))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut n: u64 = 0;
        let mut body = resp.into_body();
        // A blob longer than its descriptor cannot match; stop reading early.
        let cap = if desc.size > 0 { desc.size } else { u64::MAX };
        while let Some(frame) = next_frame(&mut body, &what).await? {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            hasher.update(&data);
            n += data.len() as u64;
            out.write_all(&data)
                .await
                .map_err(|e| ImageError::io_path("writing", dest, e))?;
            progress(n);
            if n > cap {
                break;
            }
        }
        out.flush()
            .await
            .map_err(|e| ImageError::io_path("writing", dest, e))?;
        let actual = format!("sha256:{:x}", hasher.finalize());
        if actual != desc.digest {
            return Err(ImageError::DigestMismatch {
                expected: desc.digest.clone(),
                actual,
            });
        }
        Ok(n)
    }

    /// GET with the cached credentials of the repository; on 401 answer the
    /// challenge once and retry.
    async fn send(
        &self,
        ep: &Endpoint,
        url: &str,
        accept: Option<&str>,
    ) -> Result<Response<Incoming>, ImageError> {
        let key = format!("{}|{}", ep.authority, ep.path);
        let mut answered = false;
        loop {
            let auth = self.tokens.lock().ok().and_then(|t| t.get(&key).cloned());
            let resp = self
                .get_following(url, accept, auth.as_deref(), &ep.authority)
                .await?;
            if resp.status() != StatusCode::UNAUTHORIZED || answered {
                return Ok(resp);
            }
            answered = true;
            let challenge = header_str(&resp, WWW_AUTHENTICATE).unwrap_or_default();
            drop(resp);
            let header = self.authenticate(ep, &challenge).await?;
            if let Ok(mut t) = self.tokens.lock() {
                t.insert(key.clone(), header);
            }
        }
    }

    /// One GET, following redirects. `Authorization` is only sent to
    /// `auth_authority` (registries redirect blobs to CDNs with pre-signed
    /// URLs, which must not receive the registry token).
    async fn get_following(
        &self,
        url: &str,
        accept: Option<&str>,
        auth: Option<&str>,
        auth_authority: &str,
    ) -> Result<Response<Incoming>, ImageError> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let uri: Uri = url.parse().map_err(|e| ImageError::Registry {
                status: 0,
                message: format!("bad URL {url:?}: {e}"),
            })?;
            let mut req = Request::get(uri.clone()).header(USER_AGENT, USER_AGENT_VALUE);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some(a) = auth {
                if uri.authority().map(|x| x.as_str()) == Some(auth_authority) {
                    req = req.header(AUTHORIZATION, a);
                }
            }
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|e| ImageError::Network(format!("building a request for {url}: {e}")))?;
            self.requests.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%url, "GET");
            let resp = match tokio::time::timeout(RESPONSE_TIMEOUT, self.client.request(req)).await
            {
                Err(_) => {
                    return Err(ImageError::Network(format!(
                        "{url}: no response within {RESPONSE_TIMEOUT:?}"
                    )))
                }
                Ok(Err(e)) => {
                    return Err(ImageError::Network(format!("{url}: {}", error_chain(&e))))
                }
                Ok(Ok(r)) => r,
            };
            let s = resp.status();
            let is_redirect = matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308);
            if is_redirect {
                if let Some(loc) = header_str(&resp, LOCATION) {
                    url = resolve_location(&uri, &loc)?;
                    tracing::trace!(to = %url, "redirect");
                    continue;
                }
            }
            return Ok(resp);
        }
        Err(ImageError::Network(format!(
            "more than {MAX_REDIRECTS} redirects for {url}"
        )))
    }

    /// Answer a `WWW-Authenticate` challenge: an (anonymous or credentialed)
    /// bearer token, or basic credentials.
    async fn authenticate(&self, ep: &Endpoint, challenge: &str) -> Result<String, ImageError> {
        let creds = self
            .credentials
            .get(&ep.domain)
            .or_else(|| self.credentials.get(&ep.authority));
        let basic = creds.map(|c| {
            use base64::Engine;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.username, c.password))
            )
        });
        let Some((scheme, params)) = parse_challenge(challenge) else {
            return Err(ImageError::Auth(format!(
                "{} answered 401 without a usable WWW-Authenticate challenge",
                ep.authority
            )));
        };
        if scheme.eq_ignore_ascii_case("basic") {
            return basic.ok_or_else(|| {
                ImageError::Auth(format!("{} requires a username and password", ep.domain))
            });
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ImageError::Auth(format!(
                "unsupported authentication scheme {scheme:?} of {}",
                ep.authority
            )));
        }
        let realm = params
            .get("realm")
            .ok_or_else(|| ImageError::Auth("bearer challenge without realm".to_string()))?;
        let default_scope = format!("repository:{}:pull", ep.path);
        let scope = params.get("scope").unwrap_or(&default_scope);
        let mut url = realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        if let Some(service) = params.get("service") {
            url.push(sep);
            url.push_str("service=");
            url.push_str(&query_escape(service));
            sep = '&';
        }
        url.push(sep);
        url.push_str("scope=");
        url.push_str(&query_escape(scope));
        let realm_authority = url
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let resp = self
            .get_following(&url, None, basic.as_deref(), &realm_authority)
            .await?;
        let status = resp.status();
        let body = read_limited(resp.into_body(), MAX_ERROR_BODY * 16, "token").await?;
        if !status.is_success() {
            return Err(ImageError::Auth(format!(
                "token request to {realm} failed with HTTP {}: {}",
                status.as_u16(),
                registry_message(&body)
            )));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| ImageError::Auth(format!("token response of {realm} is not JSON: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ImageError::Auth(format!("token response of {realm} has no token")))?;
        tracing::debug!(registry = %ep.authority, repository = %ep.path, "obtained bearer token");
        Ok(format!("Bearer {token}"))
    }
}

fn header_str<B>(resp: &Response<B>, name: impl http::header::AsHeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

async fn next_frame(
    body: &mut Incoming,
    what: &str,
) -> Result<Option<hyper::body::Frame<Bytes>>, ImageError> {
    match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
        Err(_) => Err(ImageError::Network(format!(
            "{what}: no data for {IDLE_TIMEOUT:?}"
        ))),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(ImageError::Network(format!("{what}: {}", error_chain(&e)))),
        Ok(Some(Ok(f))) => Ok(Some(f)),
    }
}

async fn read_limited(mut body: Incoming, limit: u64, what: &str) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    while let Some(frame) = next_frame(&mut body, what).await? {
        if let Ok(data) = frame.into_data() {
            if out.len() as u64 + data.len() as u64 > limit {
                return Err(ImageError::Corrupt(format!(
                    "{what} is larger than {limit} bytes"
                )));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// Turn an error response into a typed error.
async fn error_for(resp: Response<Incoming>, what: &str) -> ImageError {
    let status = resp.status();
    let body = read_limited(resp.into_body(), MAX_ERROR_BODY, what)
        .await
        .unwrap_or_default();
    let code = registry_code(&body);
    let message = registry_message(&body);
    let detail = if message.is_empty() {
        status.canonical_reason().unwrap_or("").to_string()
    } else {
        message
    };
    match (status.as_u16(), code.as_deref()) {
        (404, _) | (_, Some("MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "BLOB_UNKNOWN")) => {
            ImageError::NotFound(format!("{what}: {detail}"))
        }
        (401 | 403, _) => ImageError::Auth(format!(
            "{what}: {detail} (the repository may not exist, or may need credentials)"
        )),
        (s, _) => ImageError::Registry {
            status: s,
            message: format!("{what}: {detail}"),
        },
    }
}

/// `{"errors":[{"code":"…","message":"…"}]}` → first code.
fn registry_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("errors")?
        .get(0)?
        .get("code")?
        .as_str()
        .map(str::to_string)
}

fn registry_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(errs) = v.get("errors").and_then(|e| e.as_array()) {
            let msgs: Vec<String> = errs
                .iter()
                .map(|e| {
                    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
                    let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
                    format!("{code} {msg}").trim().to_string()
                })
                .collect();
            return msgs.join("; ");
        }
        for k in ["details", "message", "error"] {
            if let Some(m) = v.get(k).and_then(|m| m.as_str()) {
                return m.to_string();
            }
        }
    }
    String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_string()
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Resolve a `Location` header against the URL that answered it.
fn resolve_location(base: &Uri, loc: &str) -> Result<String, ImageError> {
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    let url = if loc.starts_with("http://") || loc.starts_with("https://") {
        loc.to_string()
    } else if let Some(rest) = loc.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if loc.starts_with('/') {
        format!("{scheme}://{authority}{loc}")
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map(|i| i + 1).unwrap_or(0)];
        format!("{scheme}://{authority}{dir}{loc}")
    };
    url.parse::<Uri>().map_err(|e| ImageError::Registry {
        status: 0,
        message: format!("bad redirect location {loc:?}: {e}"),
    })?;
    Ok(url)
}

/// Percent-encode a query value.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `Bearer realm="…",service="…",scope="…"` → ("Bearer", params).
fn parse_challenge(h: &str) -> Option<(String, HashMap<String, String>)> {
    let h = h.trim();
    if h.is_empty() {
        return None;
    }
    let (scheme, rest) = match h.find(char::is_whitespace) {
        Some(i) => (&h[..i], &h[i..]),
        None => (h, ""),
    };
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    Some((scheme.to_string(), params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull,push""#,
        )
        .unwrap();
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/python:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(s, "Basic");
        assert_eq!(p["realm"], "Registry Realm");
        let (_, p) = parse_challenge(r#"Bearer realm=https://x/t, service=a"#).unwrap();
        assert_eq!(p["realm"], "https://x/t");
        assert_eq!(p["service"], "a");
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn locations() {
        let base: Uri = "https://registry-1.docker.io/v2/library/python/blobs/sha256:ab"
            .parse()
            .unwrap();
        assert_eq!(
            resolve_location(&base, "https://cdn.example/x?sig=1").unwrap(),
            "https://cdn.example/x?sig=1"
        );
        assert_eq!(
            resolve_location(&base, "/v2/other").unwrap(),
            "https://registry-1.docker.io/v2/other"
        );
        assert_eq!(
            resolve_location(&base, "//cdn.example/y").unwrap(),
            "https://cdn.example/y"
        );
        assert_eq!(
            resolve_location(&base, "sha256:cd").unwrap(),
            "https://registry-1.docker.io/v2/library/python/blobs/sha256:cd"
        );
    }

    #[test]
    fn escaping() {
        assert_eq!(
            query_escape("repository:library/python:pull"),
            "repository%3Alibrary%2Fpython%3Apull"
        );
    }

    #[test]
    fn endpoints() {
        let opts = StoreOptions {
            insecure_registries: vec!["myreg.lan:5000".to_string()],
            ..StoreOptions::default()
        };
        let r = Registry::new(&opts).unwrap();
        let ep = r.endpoint(&Reference::parse("python:3.12").unwrap());
        assert_eq!(
            (ep.scheme, ep.authority.as_str(), ep.path.as_str()),
            ("https", "registry-1.docker.io", "library/python")
        );
        assert_eq!(
            ep.url("manifests", "3.12"),
            "https://registry-1.docker.io/v2/library/python/manifests/3.12"
        );
        let ep = r.endpoint(&Reference::parse("127.0.0.1:5000/a/b").unwrap());
        assert_eq!(ep.scheme, "http");
        let ep = r.endpoint(&Reference::parse("myreg.lan:5000/a/b").unwrap());
        assert_eq!(ep.scheme, "http");
        let ep = r.endpoint(&Reference::parse("ghcr.io/a/b").unwrap());
        assert_eq!((ep.scheme, ep.authority.as_str()), ("https", "ghcr.io"));
    }

    #[test]
    fn error_messages() {
        let body =
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(registry_code(body).as_deref(), Some("MANIFEST_UNKNOWN"));
        assert_eq!(registry_message(body), "MANIFEST_UNKNOWN manifest unknown");
        assert_eq!(registry_message(b"plain text"), "plain text");
    }
}
