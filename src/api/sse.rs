//! The one place an SSE response is built: any dialect's events become the
//! body, with the headers every event stream needs.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures_util::Stream;

use crate::dialect::{Dialect, sse_body};
use crate::metrics::Metrics;

/// A `text/event-stream` response rendering `events` in `dialect`:
/// `no-cache` so that no cache holds a live stream, and
/// `X-Accel-Buffering: no` so that nginx passes each event on at once.
pub fn sse_response<S, D>(events: S, dialect: D, metrics: Arc<Metrics>) -> Response
where
    S: Stream + Unpin + Send + 'static,
    S::Item: AsRef<D::Event>,
    D: Dialect,
{
    let mut response = Response::new(Body::from_stream(sse_body(events, dialect, metrics)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
