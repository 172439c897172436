//! Resuming a native stream: reading the position a client sent
//! (`Last-Event-ID` header, or `last_event_id` query for clients that
//! cannot set headers) and answering with the rest of the stream. Shared
//! by `/v1/stream` (an `EventSource` reconnecting to the same URL) and
//! `/v1/streams/{id}`.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::sse::sse_response;
use crate::auth::Principal;
use crate::dialect::native::Native;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::Located;
use crate::stream::{EventStream, Resumed, StreamId};

/// The resume position a client sent: the header wins over the query; an
/// empty value counts as absent, one that is not plain text is refused.
pub fn last_event_id<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Result<Option<&'a str>, ApiError> {
    let header = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| ApiError::BadRequest("`Last-Event-ID` is not plain text".into()))?),
    };
    Ok(header.or(query).map(str::trim).filter(|v| !v.is_empty()))
}

/// Splits `<stream_id>.<seq>`. The `resume_gap` error's id,
/// `<stream_id>.gap`, parses to [`GAP_SEEN`].
pub fn parse_event_id(value: &str) -> Result<(StreamId, u64), ApiError> {
    let bad = || ApiError::BadRequest(format!("`{value}` is not a stream event id (`<stream_id>.<seq>`)"));
    let (id, seq) = value.split_once('.').ok_or_else(bad)?;
    let seq = if seq == "gap" { GAP_SEEN } else { seq.parse().map_err(|_| bad())? };
    Ok((StreamId::parse(id).ok_or_else(bad)?, seq))
}

/// The position of a client that was told its resume point is gone: it
/// gets `204` so that `EventSource` stops instead of reconnecting past the
/// gap as if nothing was missing.
pub const GAP_SEEN: u64 = u64::MAX;

/// The resume point a stream request carries, as the stream and the first
/// sequence number to send. Both the header and the query value must be
/// well-formed; the header wins.
pub fn resume_point(headers: &HeaderMap, query: Option<&str>) -> Result<Option<(StreamId, u64)>, ApiError> {
    if let Some(query_id) = query.map(str::trim).filter(|v| !v.is_empty()) {
        parse_event_id(query_id)?;
    }
    last_event_id(headers, query)?
        .map(|last| parse_event_id(last).map(|(id, seq)| (id, seq.saturating_add(1))))
        .transpose()
}

/// Resumes stream `id` for `principal` from sequence `from`.
pub async fn resume_at(state: &AppState, principal: &Principal, id: StreamId, from: u64) -> Result<Response, ApiError> {
    let located = state.streams.locate(principal, &id).await?;
    resume(state, principal, located, from).await
}

/// Replays a located stream from sequence `from` and follows it live;
/// `204 No Content` when the client already has everything (it makes
/// `EventSource` stop reconnecting), or was told its position is gone.
pub async fn resume(
    state: &AppState,
    principal: &Principal,
    located: Located,
    from: u64,
) -> Result<Response, ApiError> {
    if from == GAP_SEEN {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok(match state.streams.resume(principal, located, from).await? {
        Resumed::Complete => StatusCode::NO_CONTENT.into_response(),
        Resumed::Events(events) => native_response(state, events),
    })
}

/// Events in the native dialect.
pub fn native_response(state: &AppState, events: EventStream) -> Response {
    let dialect = Native { retry_ms: state.config.stream.retry.as_millis() as u64 };
    sse_response(events, dialect, state.metrics.clone())
}
