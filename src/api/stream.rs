//! `GET /v1/stream` (EventSource) and `POST /v1/stream` (JSON body): open a
//! stream, or, when the request carries `Last-Event-ID` (header, or
//! `last_event_id` query for clients that cannot set headers), resume the
//! stream that id names. A browser `EventSource` reconnecting to the same URL
//! therefore resumes; it never starts a second generation.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;

use super::json::JsonObject;
use crate::app::AppState;
use crate::auth::{Principal, Scope};
use crate::dialect::{native::Native, sse_body};
use crate::error::ApiError;
use crate::generator::{ChatMessage, GenerateRequest};
use crate::store::{Attach, LiveStream, Reader, Replicator, follow, follow_remote};
use crate::stream::{EngineSettings, RunContext, RunSettings, StreamEvent, StreamId, events, spawn};

/// Query of `GET /v1/stream`. Other parameters (the token) are allowed and
/// ignored here.
#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    prompt: Option<String>,
    generator: Option<String>,
    pace_ms: Option<u32>,
    last_event_id: Option<String>,
}

/// Body of `POST /v1/stream`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamBody {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    generator: Option<String>,
    #[serde(default, deserialize_with = "super::json::opt_int")]
    pace_ms: Option<u32>,
}

/// `GET /v1/stream?prompt=...&generator=...&pace_ms=...`
pub async fn open_stream_get(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    let Query(q) = query?;
    if let Some((id, from)) = resume_point(&headers, q.last_event_id.as_deref())? {
        return resume_at(&state, &principal, id, from).await;
    }
    let request = GenerateRequest { prompt: q.prompt.unwrap_or_default(), ..GenerateRequest::default() };
    open(&state, &principal, request, q.generator, q.pace_ms).await
}

/// `POST /v1/stream` with `{"prompt", "messages"?, "generator"?, "pace_ms"?}`.
pub async fn open_stream_post(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    if let Some((id, from)) = resume_point(&headers, None)? {
        return resume_at(&state, &principal, id, from).await;
    }
    let JsonObject::<StreamBody>(b) =
        body.map_err(|r| ApiError::from_json_rejection(r, state.config.max_body_bytes))?.try_into()?;
    let request = GenerateRequest { prompt: b.prompt, messages: b.messages, ..GenerateRequest::default() };
    open(&state, &principal, request, b.generator, b.pace_ms).await
}

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

async fn resume_at(state: &AppState, principal: &Principal, id: StreamId, from: u64) -> Result<Response, ApiError> {
    let located = locate(state, principal, &id).await?;
    resume(state, located, from).await
}

/// Where a stream the caller may see lives.
pub enum Located {
    /// Produced by this process.
    Local(Arc<LiveStream>),
    /// Produced by another replica; readable through the shared store.
    Remote(StreamId),
}

/// Finds a stream the caller may see: its own, or any with `admin`.
/// Another subject's stream is reported exactly like an unknown one.
pub async fn locate(state: &AppState, principal: &Principal, id: &StreamId) -> Result<Located, ApiError> {
    let allowed = |owner: &str| owner == principal.subject || principal.is_admin();
    if let Some(stream) = state.hub.get(id) {
        return if allowed(&stream.owner) { Ok(Located::Local(stream)) } else { Err(ApiError::StreamNotFound) };
    }
    let Some(redis) = &state.redis else {
        return Err(ApiError::StreamNotFound);
    };
    match redis.meta(id).await? {
        Some(meta) if allowed(&meta.owner) => Ok(Located::Remote(*id)),
        _ => Err(ApiError::StreamNotFound),
    }
}

/// Replays a stream from sequence `from` and follows it live; `204 No
/// Content` when the client already has everything (it makes `EventSource`
/// stop reconnecting).
pub async fn resume(state: &AppState, located: Located, from: u64) -> Result<Response, ApiError> {
    let cfg = &state.config;
    let closing = state.shutdown.closing().clone();
    let retry_ms = cfg.shutdown_retry.as_millis() as u64;
    if from == GAP_SEEN {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    match located {
        Located::Local(stream) => {
            if stream.attach_check(from) == Attach::Complete {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
            Ok(sse_response(state, follow(stream.attach(from), cfg.stream.heartbeat, closing, retry_ms)))
        }
        Located::Remote(id) => {
            let redis = state.redis.clone().ok_or(ApiError::StreamNotFound)?;
            if let Some((last, true)) = redis.last_event(&id).await?
                && from > last
            {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
            Ok(sse_response(state, follow_remote(redis, id, from, cfg.stream.heartbeat, closing, retry_ms)))
        }
    }
}

fn sse_response(state: &AppState, events: impl Stream<Item = Arc<StreamEvent>> + Send + 'static) -> Response {
    let body =
        sse_body(events, Native { retry_ms: state.config.stream.retry.as_millis() as u64 }, state.metrics.clone());
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Opens a native stream and answers it.
async fn open(
    state: &AppState,
    principal: &Principal,
    request: GenerateRequest,
    generator: Option<String>,
    pace_ms: Option<u32>,
) -> Result<Response, ApiError> {
    let started = start_stream(state, principal, request, generator, pace_ms, state.config.store.detach_grace).await?;
    let cfg = &state.config;
    let events = follow(
        started.reader,
        cfg.stream.heartbeat,
        state.shutdown.closing().clone(),
        cfg.shutdown_retry.as_millis() as u64,
    );
    Ok(sse_response(state, events))
}

/// A generation that has started, with its first reader attached.
pub struct Started {
    /// The stream's id.
    pub stream_id: StreamId,
    /// The generator's name.
    pub generator: String,
    /// The first reader (attached before the producer started).
    pub reader: Reader,
}

/// Starts a generation for any dialect. Everything is checked before the
/// generator is asked for anything, so a refused request never starts
/// work; callers check the scope first.
pub async fn start_stream(
    state: &AppState,
    principal: &Principal,
    request: GenerateRequest,
    generator: Option<String>,
    pace_ms: Option<u32>,
    detach_grace: std::time::Duration,
) -> Result<Started, ApiError> {
    let cfg = &state.config.stream;
    let limits = &state.config.limits;
    if request.messages.len() > limits.max_messages {
        return Err(ApiError::TooManyMessages { count: request.messages.len(), limit: limits.max_messages });
    }
    let prompt_bytes = request.prompt.len() + request.messages.iter().map(|m| m.content.len()).sum::<usize>();
    if prompt_bytes > cfg.max_prompt_bytes {
        return Err(ApiError::TooLarge { what: "prompt", limit: cfg.max_prompt_bytes });
    }
    let name = generator.unwrap_or_else(|| cfg.default_generator.clone());
    let entry = state
        .generators
        .get(&name)
        .ok_or_else(|| ApiError::UnknownGenerator { name: name.clone(), available: state.generators.names() })?;
    if state.shutdown.is_draining() {
        return Err(ApiError::Draining);
    }
    if state.redis.as_ref().is_some_and(|r| !r.is_healthy()) {
        return Err(ApiError::StoreUnavailable);
    }
    let permit = state.slots.try_acquire(&principal.subject)?;
    let stream_id = StreamId::random().map_err(|e| ApiError::Internal(format!("OS RNG failed: {e}")))?;
    let settings =
        EngineSettings { pace: cfg.pace.resolve(entry.pace, pace_ms), max_duration: limits.max_stream_duration };
    tracing::debug!(subject = %principal.subject, generator = %name, %stream_id, "stream opened");
    if let Some(redis) = &state.redis {
        redis.create_stream(&stream_id, &principal.subject, &name).await?;
    }
    // A child token: polled on every event, it must not be the lock all
    // streams share.
    let closing = state.shutdown.closing().child_token();
    let stream = state.hub.create(stream_id, &principal.subject, &name, &closing);
    let replicator = state
        .redis
        .as_ref()
        .map(|r| Replicator::start(r.clone(), stream.clone(), state.config.store.stream_max_events));
    // The first reader is attached before the producer starts.
    let reader = stream.attach(0);
    let batch_ready = settings.pace.is_zero();
    let engine = events(stream_id, name.clone(), entry.generator.generate(request), settings);
    let ctx = RunContext {
        subject: principal.subject.clone(),
        permit,
        slots: state.slots.clone(),
        metrics: state.metrics.clone(),
        closing,
        replicator,
    };
    let run = RunSettings { window: limits.send_queue, max_lag: limits.max_lag, detach_grace, batch_ready };
    spawn(engine, stream, ctx, run);
    Ok(Started { stream_id, generator: name, reader })
}
