//! HTTP plumbing shared by the routes: the response body type, JSON
//! answers, bounded JSON request bodies and query-string parsing.

use crate::error::ApiError;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Largest JSON request body accepted.
pub const JSON_BODY_LIMIT: usize = 8 * 1024 * 1024;
/// An oversized JSON body is read and discarded up to this size before the
/// 413 answer; beyond it the connection is simply closed.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

/// Sending half of a streamed response body.
pub type BodySender = mpsc::Sender<io::Result<Bytes>>;

/// A response body: either fully in memory or fed chunk by chunk through a
/// channel (streamed exec output, file downloads).
pub enum Body {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<io::Result<Bytes>>),
}

impl Body {
    /// A body backed by a channel holding up to `depth` chunks in flight.
    pub fn channel(depth: usize) -> (BodySender, Body) {
        let (tx, rx) = mpsc::channel(depth);
        (tx, Body::Channel(rx))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Channel(rx) => match rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Channel(_) => SizeHint::default(),
        }
    }
}

/// A JSON answer with the given status.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(v) => {
            let mut resp = Response::new(Body::Full(Some(Bytes::from(v))));
            *resp.status_mut() = status;
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Err(e) => error_response(&ApiError::internal(format!("cannot encode answer: {e}"))),
    }
}

/// A 200 JSON answer.
pub fn ok<T: Serialize>(value: &T) -> Response<Body> {
    json(StatusCode::OK, value)
}

/// The answer for an error.
pub fn error_response(err: &ApiError) -> Response<Body> {
    let body = serde_json::to_vec(&err.body()).unwrap_or_default();
    let mut resp = Response::new(Body::Full(Some(Bytes::from(body))));
    *resp.status_mut() = err.status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Read a JSON request body of at most [`JSON_BODY_LIMIT`] bytes.
pub async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT) {
        return Err(ApiError::too_large(JSON_BODY_LIMIT));
    }
    let mut body = req.into_body();
    let capacity = declared.map_or(0, |n| n.min(JSON_BODY_LIMIT as u64) as usize);
    let mut buf: Vec<u8> = Vec::with_capacity(capacity);
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::invalid(format!("cannot read request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > DRAIN_LIMIT {
                return Err(ApiError::too_large(JSON_BODY_LIMIT));
            }
            // Past the limit keep reading (and discarding) so the client
            // gets to read the 413 instead of a broken pipe.
            if total <= JSON_BODY_LIMIT as u64 {
                buf.extend_from_slice(&data);
            }
        }
    }
    if total > JSON_BODY_LIMIT as u64 {
        return Err(ApiError::too_large(JSON_BODY_LIMIT));
    }
    serde_json::from_slice(&buf).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

/// Decode `%XX` escapes. `+` stays a literal plus (clients percent-encode
/// spaces). Malformed escapes and non-UTF-8 results are refused.
pub fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::invalid("malformed percent-encoding in query"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::invalid("query is not valid UTF-8"))
}

/// The decoded value of query parameter `name` (the first occurrence).
pub fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, ApiError> {
    let Some(q) = query else { return Ok(None) };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k)? == name {
            return percent_decode(v).map(Some);
        }
    }
    Ok(None)
}

/// Like [`query_param`] but the parameter must be present.
pub fn required_param(query: Option<&str>, name: &str) -> Result<String, ApiError> {
    query_param(query, name)?
        .ok_or_else(|| ApiError::invalid(format!("missing query parameter `{name}`")))
}

/// A boolean query parameter (`true`/`false`/`1`/`0`), `false` when absent.
pub fn bool_param(query: Option<&str>, name: &str) -> Result<bool, ApiError> {
    match query_param(query, name)?.as_deref() {
        None | Some("") | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "query parameter `{name}` must be true or false, not {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries() {
        let q = Some("path=/a%20b/c%26d%3D%25&mode=644&flag");
        assert_eq!(query_param(q, "path").unwrap().unwrap(), "/a b/c&d=%");
        assert_eq!(query_param(q, "mode").unwrap().unwrap(), "644");
        assert_eq!(query_param(q, "flag").unwrap().unwrap(), "");
        assert_eq!(query_param(q, "nope").unwrap(), None);
        assert_eq!(query_param(None, "path").unwrap(), None);
        assert_eq!(percent_decode("a+b").unwrap(), "a+b");
        assert_eq!(percent_decode("/x%00y").unwrap(), "/x\0y");
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%ff").is_err());
        assert!(bool_param(Some("recursive=true"), "recursive").unwrap());
        assert!(!bool_param(Some("recursive=false"), "recursive").unwrap());
        assert!(bool_param(Some("recursive=maybe"), "recursive").is_err());
        assert!(required_param(Some("a=1"), "path").is_err());
    }
}
