//! Resuming a native stream: reading the position a client sent
//! (`Last-Event-ID` header, or `last_event_id` query for clients that
//! cannot set headers) and answering with the rest of the stream. Shared
//! by `/v1/stream` (an `EventSource` reconnecting to the same URL) and
//! `/v1/streams/{id}`.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::sse::sse_response;
use crate::auth::Principal;
use crate::dialect::native::Native;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::Located;
use crate::stream::{EventStream, Resumed, StreamId};

/// The request's `Last-Event-ID` header (the first, as
/// [`HeaderMap::get`] sees it) and no other: all a resume reads. axum's
/// `HeaderMap` extractor copies every header, a handful of allocations on
/// each stream open.
#[derive(Debug, Default)]
pub struct ResumeHeaders(pub HeaderMap);

impl<S: Send + Sync> FromRequestParts<S> for ResumeHeaders {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        let mut headers = HeaderMap::new();
        if let Some(value) = parts.headers.get(LAST_EVENT_ID) {
            headers.insert(LAST_EVENT_ID, value.clone());
        }
        Ok(Self(headers))
    }
}

const LAST_EVENT_ID: &str = "last-event-id";

/// The resume position a client sent: the header wins over the query; an
/// empty (or blank) value counts as absent, so an empty header leaves the
/// query's value in force (an `EventSource` that has seen no id yet sends
/// none, but a proxy or client library may send the header empty); one that
/// is not plain text is refused.
pub fn last_event_id<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Result<Option<&'a str>, ApiError> {
    let header = match headers.get(LAST_EVENT_ID) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| ApiError::BadRequest("`Last-Event-ID` is not plain text".into()))?),
    };
    let given = |v: Option<&'a str>| v.map(str::trim).filter(|v| !v.is_empty());
    Ok(given(header).or_else(|| given(query)))
}

/// Splits `<stream_id>.<seq>`. The `resume_gap` error's id,
/// `<stream_id>.gap`, parses to [`GAP_SEEN`]. Numbers from [`GAP_SEEN`]` - 1`
/// on are refused: no stream issues them (a stream is bounded far below),
/// and the resume point after one would be [`GAP_SEEN`], so a client could
/// spell the gap marker as a position and be answered `204` as if it had
/// been told of a gap.
pub fn parse_event_id(value: &str) -> Result<(StreamId, u64), ApiError> {
    let bad = || ApiError::BadRequest(format!("`{value}` is not a stream event id (`<stream_id>.<seq>`)"));
    let (id, seq) = value.split_once('.').ok_or_else(bad)?;
    let seq = if seq == "gap" {
        GAP_SEEN
    } else {
        seq.parse::<u64>().ok().filter(|seq| seq.saturating_add(1) < GAP_SEEN).ok_or_else(bad)?
    };
    Ok((StreamId::parse(id).ok_or_else(bad)?, seq))
}

/// The position of a client that was told its resume point is gone: it
/// gets `204` so that `EventSource` stops instead of reconnecting past the
/// gap as if nothing was missing. Only `<stream_id>.gap` means it.
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn with_header(value: &'static str) -> HeaderMap {
        HeaderMap::from_iter([(axum::http::HeaderName::from_static("last-event-id"), HeaderValue::from_static(value))])
    }

    #[test]
    fn a_blank_header_leaves_the_query_value_in_force() {
        let query = format!("{ID}.4");
        for blank in ["", "  "] {
            assert_eq!(last_event_id(&with_header(blank), Some(&query)).ok().flatten(), Some(query.as_str()));
            let point = resume_point(&with_header(blank), Some(&query)).ok().flatten();
            assert_eq!(point.map(|(id, from)| (id.to_string(), from)), Some((ID.to_owned(), 5)));
        }
        // A header with a value still wins.
        let point = resume_point(&with_header("0123456789abcdef0123456789abcdef.1"), Some(&query)).ok().flatten();
        assert_eq!(point.map(|(_, from)| from), Some(2));
        assert_eq!(last_event_id(&with_header(""), None).ok().flatten(), None);
    }

    #[tokio::test]
    async fn a_resume_reads_the_first_last_event_id_and_copies_no_other_header() {
        let request = axum::http::Request::builder()
            .header("authorization", "Bearer t")
            .header("Last-Event-ID", format!("{ID}.3"))
            .header("last-event-id", format!("{ID}.9"))
            .header("cookie", "c=1")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        let (mut parts, ()) = request.into_parts();
        let Ok(ResumeHeaders(headers)) = ResumeHeaders::from_request_parts(&mut parts, &()).await;
        assert_eq!(headers.len(), 1, "{headers:?}");
        let point = resume_point(&headers, None).ok().flatten();
        assert_eq!(point.map(|(id, from)| (id.to_string(), from)), Some((ID.to_owned(), 4)));
        let (mut parts, ()) = axum::http::Request::new(()).into_parts();
        let Ok(ResumeHeaders(headers)) = ResumeHeaders::from_request_parts(&mut parts, &()).await;
        assert!(headers.is_empty());
    }

    #[test]
    fn the_gap_marker_is_only_spelled_gap() {
        assert_eq!(parse_event_id(&format!("{ID}.gap")).ok().map(|(_, seq)| seq), Some(GAP_SEEN));
        for number in ["18446744073709551615", "18446744073709551614"] {
            assert!(parse_event_id(&format!("{ID}.{number}")).is_err(), "{number}");
        }
        let highest = parse_event_id(&format!("{ID}.18446744073709551613")).ok();
        assert_eq!(highest.map(|(_, seq)| seq.saturating_add(1) < GAP_SEEN), Some(true));
    }
}
