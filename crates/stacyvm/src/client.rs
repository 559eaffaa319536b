//! A small HTTP client for the StacyVM API (used by the CLI and the benchmark).

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub use stacyvm_agent_proto::percent_encode as enc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ReqBody = BoxBody<Bytes, BoxError>;

#[derive(Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    http: HyperClient<HttpConnector, ReqBody>,
}

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub body: Value,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code,
            self.status.as_u16(),
            self.message
        )
    }
}

impl std::error::Error for ApiFailure {}

pub fn empty() -> ReqBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed()
}

pub fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

impl Client {
    pub fn new(base: &str, key: Option<String>) -> Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            bail!("server URL must start with http:// (got {base:?})");
        }
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        let http = HyperClient::builder(TokioExecutor::new()).build(conn);
        Ok(Client { base, key, http })
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: ReqBody,
        json: bool,
    ) -> Result<Response<Incoming>> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if let Some(k) = &self.key {
            req = req.header("x-api-key", k);
        }
        if json {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(body).context("building the request")?;
        self.http
            .request(req)
            .await
            .with_context(|| format!("cannot reach the StacyVM server at {}", self.base))
    }

    /// Fail with [`ApiFailure`] unless the answer is 2xx.
    pub async fn check(resp: Response<Incoming>) -> Result<Response<Incoming>> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Err(anyhow!(ApiFailure {
            status,
            code: body["code"].as_str().unwrap_or("unknown").to_string(),
            message: body["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()),
            body,
        }))
    }

    pub async fn json(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let b = match body {
            Some(v) => full(serde_json::to_vec(v)?),
            None => empty(),
        };
        let resp = Self::check(self.send(method, path, b, body.is_some()).await?).await?;
        let bytes = resp.into_body().collect().await?.to_bytes();
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).context("the server answered invalid JSON")
    }
}
