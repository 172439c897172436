//! Broadcast channels, the production form of the seeds' `/sse` +
//! `/trigger`: `GET /v1/channels/{name}` subscribes (scope `stream`),
//! `POST /v1/channels/{name}` publishes (scope `publish`).
//!
//! A subscriber first gets `event: connected` with its subscriber id, then
//! every published event (`id:` = its position, `event:` = the published
//! name or `message`), heartbeats while idle, and after a reconnect with
//! `Last-Event-ID` whatever it missed that the channel still holds. If it
//! missed more than that, it gets `event: gap` first: never a silent skip.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::{Extension, Json};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::json::json_body;
use super::resume::last_event_id;
use super::sse::sse_response;
use crate::auth::{Principal, Scope};
use crate::dialect::channel::ChannelSse;
use crate::error::ApiError;
use crate::event::ErrorCode;
use crate::state::AppState;
use crate::store::{ChannelPosition, Published};
use crate::stream::{ChannelMessage, ConnectionAbort, StreamId, follow_channel};
use crate::tickets::{self, Target};

/// Longest channel name.
pub const MAX_CHANNEL_NAME: usize = 64;
/// Event names the server sends itself; publishers may not use them.
pub const RESERVED_EVENTS: &[&str] = &["connected", "gap", "shutdown"];
/// Longest event name.
pub const MAX_EVENT_NAME: usize = 64;

/// A channel name: 1 to 64 of `A-Z a-z 0-9 _ - . :`, so that it needs no
/// escaping in a URL path, a Redis key or a log line; but not `.` or `..`,
/// which a URL path, a proxy or a client library takes for the current or
/// parent segment (`/v1/channels/..` may reach the server as `/v1`).
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CHANNEL_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "channel names are 1 to {MAX_CHANNEL_NAME} characters of A-Z, a-z, 0-9, `_`, `-`, `.` and `:`, other than `.` and `..`"
        )))
    }
}

/// Who a request creates channel `name` for, if it does: the caller, except on the server's
/// own demo channels while the demo feeds run (they publish there, so the channel belongs to
/// no subject and is charged to none).
fn creator<'a>(state: &AppState, principal: &'a Principal, name: &str) -> Option<&'a str> {
    let demo = state.config.demo_feeds.is_some() && crate::feeds::CHANNELS.contains(&name);
    (!demo).then_some(principal.subject.as_str())
}

/// A published event name: 1 to 64 bytes without CR, LF or NUL (which
/// would end or cut its `event:` line), and none of [`RESERVED_EVENTS`], so
/// a publisher cannot pass for the server.
pub fn check_event_name(event: &str) -> Result<(), ApiError> {
    let ok = !event.is_empty()
        && event.len() <= MAX_EVENT_NAME
        && !event.chars().any(|c| c == '\r' || c == '\n' || c == '\0');
    if !ok {
        return Err(ApiError::BadRequest(format!("`event` must be 1 to {MAX_EVENT_NAME} bytes without CR, LF or NUL")));
    }
    if RESERVED_EVENTS.contains(&event) {
        return Err(ApiError::BadRequest(format!("`{event}` is reserved for the server's own events")));
    }
    Ok(())
}

/// Query of `GET /v1/channels/{name}`.
#[derive(Debug, Deserialize)]
pub struct SubscribeQuery {
    last_event_id: Option<String>,
}

/// Body of `POST /v1/channels/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    event: Option<String>,
    data: Value,
}

/// `GET /v1/channels/{name}`. `abort` closes the connection when the subscriber falls out of
/// the channel's log (HTTP/1.1; see [`ConnectionAbort`]).
pub async fn subscribe(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    headers: HeaderMap,
    abort: Option<Extension<ConnectionAbort>>,
    query: Result<Query<SubscribeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    check_name(&name)?;
    let Query(q) = query?;
    // Either id form in either store mode (a number, or a shared store's
    // entry id); the header wins, but a malformed query value is refused
    // all the same.
    let position = |id: &str| {
        ChannelPosition::parse(id).ok_or_else(|| ApiError::BadRequest(format!("`{id}` is not a channel event id")))
    };
    for id in [q.last_event_id.as_deref(), last_event_id(&headers, None)?].into_iter().flatten() {
        let id = id.trim();
        if !id.is_empty() {
            position(id)?;
        }
    }
    let after = last_event_id(&headers, q.last_event_id.as_deref())?.map(position).transpose()?;
    tickets::bind(&state.store, &principal, Target::Channel(name.clone())).await?;
    let subscriber_id = StreamId::random().map_err(|e| ApiError::Internal(format!("OS RNG failed: {e}")))?;
    let on_overrun = abort.map(|Extension(ConnectionAbort(token))| token);
    let on_overrun_seen = on_overrun.clone();
    let feed = state.store.subscribe(&name, creator(&state, &principal, &name), after, on_overrun).await?;
    // Like streams, a subscription is bounded in time: at the limit the
    // response ends, and EventSource reconnects with Last-Event-ID and
    // continues without missing an event.
    let metrics = state.metrics.clone();
    let aborted = on_overrun_seen;
    let messages = Box::pin(
        follow_channel(feed, state.streams.follow_settings_for(&principal), state.config.limits.max_stream_duration)
            .inspect(move |message| {
                // Counted like a stream ended as a slow consumer, once: a
                // subscriber the publishing side told (its connection is
                // being closed) is counted by the server instead.
                if *message == ChannelMessage::SlowConsumer && !aborted.as_ref().is_some_and(|t| t.is_cancelled()) {
                    metrics.refused(ErrorCode::SlowConsumer.as_str());
                }
            }),
    );
    let dialect = ChannelSse {
        // A demo feed may have its own reconnect hint (`demo.status`).
        retry_ms: crate::feeds::retry_for(&name).unwrap_or(state.config.stream.retry.as_millis() as u64),
        subscriber_id: subscriber_id.to_string(),
        channel: name,
    };
    Ok(sse_response(messages, dialect, state.metrics.clone()))
}

/// `POST /v1/channels/{name}` with `{"event"?: "...", "data": <any JSON>}`:
/// answers `{"id": "...", "subscribers": n}`.
pub async fn publish(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    super::require(&principal, Scope::Publish)?;
    check_name(&name)?;
    let body: PublishBody = json_body(body, state.config.max_body_bytes)?;
    if let Some(event) = &body.event {
        check_event_name(event)?;
    }
    let data = body.data.to_string();
    let limit = state.config.store.max_publish_bytes;
    if data.len() > limit {
        return Err(ApiError::TooLarge { what: "`data`", limit });
    }
    let Published { id, subscribers } =
        state.store.publish(&name, creator(&state, &principal, &name), body.event, data).await?;
    tracing::debug!(channel = %name, subject = %principal.subject, %id, subscribers, "published");
    Ok(Json(json!({ "id": id, "subscribers": subscribers })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_not_channel_names() {
        for bad in [".", "..", "", "a/b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for ok in ["...", ".a", "a.", "demo.clock", "a..b", "x:y-z_1"] {
            assert!(check_name(ok).is_ok(), "{ok:?}");
        }
    }
}
