//! HTTP plumbing shared by the routes: the response body type, JSON
//! answers and bounded JSON request bodies.

use crate::error::{self, ApiError};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use stacyvm_agent_proto::request::{body_read_error, JsonBody};
use stacyvm_agent_proto::Status;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

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
        Ok(v) => json_bytes(status, v),
        Err(e) => error_response(&ApiError::internal(format!("cannot encode answer: {e}"))),
    }
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Body::Full(Some(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A 200 JSON answer.
pub fn ok<T: Serialize>(value: &T) -> Response<Body> {
    json(StatusCode::OK, value)
}

/// A 200 [`Status`] answer.
pub fn status(status: &str) -> Response<Body> {
    ok(&Status {
        status: status.to_string(),
    })
}

/// The answer for an error.
pub fn error_response(err: &ApiError) -> Response<Body> {
    json_bytes(error::status(err), err.body_json())
}

/// Read a JSON request body, bounded by [`JsonBody`].
pub async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok());
    let mut json = JsonBody::start(declared)?;
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(body_read_error)?.into_data() {
            json.push(&data)?;
        }
    }
    json.finish()
}
