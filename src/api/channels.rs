//! Broadcast channels, the production form of the seeds' `/sse` +
//! `/trigger`: `GET /v1/channels/{name}` subscribes (scope `stream`),
//! `POST /v1/channels/{name}` publishes (scope `publish`).
//!
//! A subscriber first gets `event: connected` with its subscriber id, then
//! every published event (`id:` = its position, `event:` = the published
//! name or `message`), heartbeats while idle, and after a reconnect with
//! `Last-Event-ID` whatever it missed that the channel still holds. If it
//! missed more than that, it gets `event: gap` first: never a silent skip.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use bytes::BytesMut;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::stream::last_event_id;
use crate::app::AppState;
use crate::auth::{Principal, Scope};
use crate::error::ApiError;
use crate::sse::{push_comment, push_event, push_retry};
use crate::store::Subscription;
use crate::stream::StreamId;

/// Longest channel name.
pub const MAX_CHANNEL_NAME: usize = 64;
/// Longest event name.
pub const MAX_EVENT_NAME: usize = 64;

/// A channel name: 1 to 64 of `A-Z a-z 0-9 _ - . :`.
fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CHANNEL_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "channel names are 1 to {MAX_CHANNEL_NAME} characters of A-Z, a-z, 0-9, `_`, `-`, `.` and `:`"
        )))
    }
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

/// `GET /v1/channels/{name}`
pub async fn subscribe(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    headers: HeaderMap,
    query: Result<Query<SubscribeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    check_name(&name)?;
    let Query(q) = query?;
    let after = match last_event_id(&headers, q.last_event_id.as_deref()) {
        None => None,
        Some(id) => Some(
            id.parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("`{id}` is not a channel event id (a number)")))?,
        ),
    };
    let subscriber_id = StreamId::random().map_err(|e| ApiError::Internal(format!("OS RNG failed: {e}")))?;
    let cfg = &state.config;
    let retry_ms = cfg.stream.retry.as_millis() as u64;
    let shutdown_retry_ms = cfg.shutdown_retry.as_millis() as u64;
    let mut first = BytesMut::new();
    push_retry(&mut first, retry_ms);
    let connected = json!({ "subscriber_id": subscriber_id.to_string(), "channel": name });
    push_event(&mut first, None, Some("connected"), &connected.to_string());
    let events = state
        .channels
        .subscribe(&name, after, cfg.stream.heartbeat, state.shutdown.closing().clone());
    let body = futures_util::stream::once(async move { first.freeze() })
        .chain(events.map(move |item| {
            let mut buf = BytesMut::new();
            match item {
                Subscription::Event(e) => push_event(
                    &mut buf,
                    Some(&e.seq.to_string()),
                    Some(e.event.as_deref().unwrap_or("message")),
                    &e.data,
                ),
                Subscription::Gap { first_kept } => {
                    let data = json!({
                        "code": "resume_gap",
                        "first_id": first_kept.to_string(),
                        "message": "some events are no longer retained; continuing with the oldest kept",
                    });
                    push_event(&mut buf, None, Some("gap"), &data.to_string());
                }
                Subscription::Heartbeat => push_comment(&mut buf, "keep-alive"),
                Subscription::Shutdown => {
                    push_retry(&mut buf, shutdown_retry_ms);
                    let data = json!({ "reason": "server shutting down", "retry_ms": shutdown_retry_ms });
                    push_event(&mut buf, None, Some("shutdown"), &data.to_string());
                }
            }
            buf.freeze()
        }))
        .map(Ok::<_, std::convert::Infallible>);
    let mut response = Response::new(Body::from_stream(body));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// `POST /v1/channels/{name}` with `{"event"?: "...", "data": <any JSON>}`:
/// answers `{"id": "...", "subscribers": n}`.
pub async fn publish(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    body: Result<Json<PublishBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    super::require(&principal, Scope::Publish)?;
    check_name(&name)?;
    let Json(body) = body.map_err(|r| ApiError::from_json_rejection(r, state.config.max_body_bytes))?;
    if let Some(event) = &body.event {
        let ok = !event.is_empty()
            && event.len() <= MAX_EVENT_NAME
            && !event.chars().any(|c| c == '\r' || c == '\n' || c == '\0');
        if !ok {
            return Err(ApiError::BadRequest(format!(
                "`event` must be 1 to {MAX_EVENT_NAME} bytes without CR, LF or NUL"
            )));
        }
    }
    let data = body.data.to_string();
    let limit = state.config.store.max_publish_bytes;
    if data.len() > limit {
        return Err(ApiError::TooLarge { what: "`data`", limit });
    }
    let (seq, subscribers) = state.channels.publish(&name, body.event, data);
    tracing::debug!(channel = %name, subject = %principal.subject, seq, subscribers, "published");
    Ok(Json(json!({ "id": seq.to_string(), "subscribers": subscribers })))
}
