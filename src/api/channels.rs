//! Broadcast channels, the production form of the seeds' `/sse` +
//! `/trigger`: `GET /v1/channels/{name}` subscribes (scope `stream`),
//! `POST /v1/channels/{name}` publishes (scope `publish`).
//!
//! A subscriber first gets `event: connected` with its subscriber id, then
//! every published event (`id:` = its position, `event:` = the published
//! name or `message`), heartbeats while idle, and after a reconnect with
//! `Last-Event-ID` whatever it missed that the channel still holds. If it
//! missed more than that, it gets `event: gap` first: never a silent skip.

use std::sync::Arc;

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

use super::json::JsonObject;
use super::stream::last_event_id;
use crate::app::AppState;
use crate::auth::{Principal, Scope};
use crate::error::ApiError;
use crate::sse::{push_comment, push_event, push_retry};
use crate::store::{ChannelEvent, RedisStore, Start, Subscription, TailGuard};
use crate::stream::StreamId;

/// Longest channel name.
pub const MAX_CHANNEL_NAME: usize = 64;
/// Event names the server sends itself; publishers may not use them.
pub const RESERVED_EVENTS: &[&str] = &["connected", "gap", "shutdown"];
/// Longest event name.
pub const MAX_EVENT_NAME: usize = 64;

/// A channel name: 1 to 64 of `A-Z a-z 0-9 _ - . :`.
fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CHANNEL_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "channel names are 1 to {MAX_CHANNEL_NAME} characters of A-Z, a-z, 0-9, `_`, `-`, `.` and `:`"
        )))
    }
}

/// Shared mode: the channel stays tailed and this subscriber counted while
/// the response streams.
type SharedGuards = (TailGuard, CountedSubscriber);

/// This replica's share of a channel's subscriber count in Redis.
struct CountedSubscriber {
    redis: Arc<RedisStore>,
    name: String,
    replica: String,
}

impl Drop for CountedSubscriber {
    fn drop(&mut self) {
        let (redis, name, replica) =
            (self.redis.clone(), std::mem::take(&mut self.name), std::mem::take(&mut self.replica));
        tokio::spawn(async move {
            let _ = redis.count_subscriber(&name, &replica, -1).await;
        });
    }
}

/// A Redis stream entry id: `<ms>-<seq>`.
fn is_redis_id(s: &str) -> bool {
    s.split_once('-').is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok())
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
    // Either form in either mode (a number, or a Redis entry id); the header
    // wins, but a malformed query value is refused all the same.
    let well_formed = |id: &str| id.bytes().all(|b| b.is_ascii_digit()) || is_redis_id(id);
    for id in [q.last_event_id.as_deref(), last_event_id(&headers, None)?].into_iter().flatten() {
        let id = id.trim();
        if !id.is_empty() && !well_formed(id) {
            return Err(ApiError::BadRequest(format!("`{id}` is not a channel event id")));
        }
    }
    let last = last_event_id(&headers, q.last_event_id.as_deref())?.map(str::to_owned);
    let subscriber_id = StreamId::random().map_err(|e| ApiError::Internal(format!("OS RNG failed: {e}")))?;
    let cfg = &state.config;
    let retry_ms = cfg.stream.retry.as_millis() as u64;
    let shutdown_retry_ms = cfg.shutdown_retry.as_millis() as u64;
    let mut first = BytesMut::new();
    push_retry(&mut first, retry_ms);
    let connected = json!({ "subscriber_id": subscriber_id.to_string(), "channel": name });
    push_event(&mut first, None, Some("connected"), &connected.to_string());
    let closing = state.shutdown.closing().clone();
    let heartbeat = cfg.stream.heartbeat;
    let (history, guards, events): (Vec<Subscription>, Option<SharedGuards>, _) = match (&state.redis, &state.tail) {
        (Some(redis), Some(tail)) => {
            // Shared: history from Redis, then live events as this
            // replica's tail feeds them into the local log.
            // A plain number `n` (memory-mode form) means `n-0`; `0`, from
            // the oldest kept.
            let last = last.map(|id| if id.bytes().all(|b| b.is_ascii_digit()) { format!("{id}-0") } else { id });
            let (history, start_id) = match &last {
                Some(after) => {
                    if !is_redis_id(after) {
                        return Err(ApiError::BadRequest(format!("`{after}` is not a channel event id")));
                    }
                    let (entries, gap) = redis.channel_read(&name, after, cfg.store.channel_max_events).await?;
                    let mut items = Vec::new();
                    if gap {
                        let first_id = entries.first().map(|(id, _)| id.clone()).unwrap_or_default();
                        items.push(Subscription::Gap { first_id });
                    }
                    let mut newest = after.clone();
                    for (id, mut fields) in entries {
                        newest = id.clone();
                        let data = fields.remove("d").unwrap_or_else(|| "null".to_owned());
                        let event = ChannelEvent::new(0, id, fields.remove("e"), data);
                        items.push(Subscription::Event(std::sync::Arc::new(event)));
                    }
                    (items, newest)
                }
                None => (Vec::new(), redis.channel_last_id(&name).await?),
            };
            let tail_guard = tail.watch(&name, &start_id);
            redis.count_subscriber(&name, &state.replica_id, 1).await?;
            let counted =
                CountedSubscriber { redis: redis.clone(), name: name.clone(), replica: state.replica_id.clone() };
            let events = state.channels.subscribe(&name, Start::AfterId(start_id), heartbeat, closing);
            (history, Some((tail_guard, counted)), events)
        }
        _ => {
            let start = match &last {
                None => Start::New,
                // A Redis entry id (shared-mode form) names no position this
                // process issued: treated as from the future, so a gap.
                Some(id) if is_redis_id(id) => Start::AfterSeq(u64::MAX),
                Some(id) => Start::AfterSeq(
                    id.parse::<u64>()
                        .map_err(|_| ApiError::BadRequest(format!("`{id}` is not a channel event id (a number)")))?,
                ),
            };
            (Vec::new(), None, state.channels.subscribe(&name, start, heartbeat, closing))
        }
    };
    // Like streams, a subscription is bounded in time: at the limit the
    // response ends, and EventSource reconnects with Last-Event-ID and
    // continues without missing an event.
    let max_duration = cfg.limits.max_stream_duration;
    let events = futures_util::stream::iter(history)
        .chain(events)
        .map(move |item| {
            // Keeps the tail and the shared subscriber count while streaming.
            let _ = &guards;
            item
        })
        .take_until(tokio::time::sleep(max_duration));
    let body = futures_util::stream::once(async move { first.freeze() })
        .chain(events.map(move |item| {
            let mut buf = BytesMut::new();
            match item {
                // Encoded once at publish, shared by every subscriber.
                Subscription::Event(e) => return e.wire.clone(),
                Subscription::Gap { first_id } => {
                    let data = json!({
                        "code": "resume_gap",
                        "first_id": first_id,
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
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
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
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    super::require(&principal, Scope::Publish)?;
    check_name(&name)?;
    let JsonObject::<PublishBody>(body) =
        body.map_err(|r| ApiError::from_json_rejection(r, state.config.max_body_bytes))?.try_into()?;
    if let Some(event) = &body.event {
        let ok = !event.is_empty()
            && event.len() <= MAX_EVENT_NAME
            && !event.chars().any(|c| c == '\r' || c == '\n' || c == '\0');
        if !ok {
            return Err(ApiError::BadRequest(format!(
                "`event` must be 1 to {MAX_EVENT_NAME} bytes without CR, LF or NUL"
            )));
        }
        if RESERVED_EVENTS.contains(&event.as_str()) {
            return Err(ApiError::BadRequest(format!("`{event}` is reserved for the server's own events")));
        }
    }
    let data = body.data.to_string();
    let limit = state.config.store.max_publish_bytes;
    if data.len() > limit {
        return Err(ApiError::TooLarge { what: "`data`", limit });
    }
    let (id, subscribers) = match &state.redis {
        // Shared: Redis orders and stores it; every replica's tail (this
        // one's included) delivers it to local subscribers.
        Some(redis) => {
            let id = redis.channel_publish(&name, body.event.as_deref(), &data).await?;
            (id, redis.channel_subscribers(&name).await?)
        }
        None => {
            let (seq, subscribers) = state.channels.publish(&name, body.event, data);
            (seq.to_string(), subscribers)
        }
    };
    tracing::debug!(channel = %name, subject = %principal.subject, %id, subscribers, "published");
    Ok(Json(json!({ "id": id, "subscribers": subscribers })))
}
