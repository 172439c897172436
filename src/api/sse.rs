//! The one place an SSE response is built: any dialect's events become the
//! body, with the headers every event stream needs (and those a dialect
//! adds, such as the AI SDK's protocol marker).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, header};
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
    sse_response_with(events, dialect, metrics, &[])
}

/// [`sse_response`] plus `extra` headers a dialect's protocol requires
/// (static names and values: protocol markers, not per-request data).
pub fn sse_response_with<S, D>(
    events: S,
    dialect: D,
    metrics: Arc<Metrics>,
    extra: &[(&'static str, &'static str)],
) -> Response
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
    for (name, value) in extra {
        headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    response
}
