//! `GET /v1/stream` (EventSource) and `POST /v1/stream` (JSON body): open a
//! stream and answer it as Server-Sent Events in the native dialect.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde::Deserialize;

use crate::app::AppState;
use crate::auth::{Principal, Scope};
use crate::dialect::{native::Native, sse_body};
use crate::error::ApiError;
use crate::generator::{ChatMessage, GenerateRequest};
use crate::stream::{EngineSettings, RunContext, RunSettings, StreamId, events, spawn};

/// Query of `GET /v1/stream`. Other parameters (the token, later
/// `last_event_id`) are allowed and ignored here.
#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    prompt: Option<String>,
    generator: Option<String>,
    pace_ms: Option<u64>,
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
    pace_ms: Option<u64>,
}

/// `GET /v1/stream?prompt=...&generator=...&pace_ms=...`
pub async fn open_stream_get(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    let Query(q) = query?;
    let request = GenerateRequest {
        prompt: q.prompt.unwrap_or_default(),
        messages: Vec::new(),
    };
    open(&state, &principal, request, q.generator, q.pace_ms)
}

/// `POST /v1/stream` with `{"prompt", "messages"?, "generator"?, "pace_ms"?}`.
pub async fn open_stream_post(
    State(state): State<AppState>,
    principal: Principal,
    body: Result<Json<StreamBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    let Json(b) = body.map_err(|r| ApiError::from_json_rejection(r, state.config.max_body_bytes))?;
    let request = GenerateRequest {
        prompt: b.prompt,
        messages: b.messages,
    };
    open(&state, &principal, request, b.generator, b.pace_ms)
}

/// Everything is checked before the generator is asked for anything, so a
/// refused request never starts work. Callers check the scope first, so a
/// token without `stream` learns nothing about input validation.
fn open(
    state: &AppState,
    principal: &Principal,
    request: GenerateRequest,
    generator: Option<String>,
    pace_ms: Option<u64>,
) -> Result<Response, ApiError> {
    let cfg = &state.config.stream;
    let limits = &state.config.limits;
    if request.messages.len() > limits.max_messages {
        return Err(ApiError::TooManyMessages {
            count: request.messages.len(),
            limit: limits.max_messages,
        });
    }
    let prompt_bytes = request.prompt.len() + request.messages.iter().map(|m| m.content.len()).sum::<usize>();
    if prompt_bytes > cfg.max_prompt_bytes {
        return Err(ApiError::TooLarge {
            what: "prompt",
            limit: cfg.max_prompt_bytes,
        });
    }
    let name = generator.unwrap_or_else(|| cfg.default_generator.clone());
    let entry = state.generators.get(&name).ok_or_else(|| ApiError::UnknownGenerator {
        name: name.clone(),
        available: state.generators.names(),
    })?;
    if state.shutdown.is_draining() {
        return Err(ApiError::Draining);
    }
    let permit = state.slots.try_acquire(&principal.subject)?;
    let stream_id = StreamId::random().map_err(|e| ApiError::Internal(format!("OS RNG failed: {e}")))?;
    let settings = EngineSettings {
        pace: cfg.pace.resolve(entry.pace, pace_ms),
        heartbeat: cfg.heartbeat,
        closing: state.shutdown.closing().clone(),
        shutdown_retry_ms: state.config.shutdown_retry.as_millis() as u64,
        max_duration: limits.max_stream_duration,
    };
    tracing::debug!(subject = %principal.subject, generator = %name, %stream_id, "stream opened");
    let text = entry.generator.generate(request);
    let engine = events(stream_id, name.clone(), text, settings);
    let ctx = RunContext {
        stream_id,
        subject: principal.subject.clone(),
        generator: name,
        permit,
        slots: state.slots.clone(),
        metrics: state.metrics.clone(),
    };
    let run = RunSettings {
        queue: limits.send_queue,
        max_lag: limits.max_lag,
    };
    let body = sse_body(
        spawn(engine, ctx, run),
        Native {
            retry_ms: cfg.retry.as_millis() as u64,
        },
    );
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}
