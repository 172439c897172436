//! `GET /v1/stream` (EventSource) and `POST /v1/stream` (JSON body): open a
//! stream, or, when the request carries `Last-Event-ID` (header, or
//! `last_event_id` query for clients that cannot set headers), resume the
//! stream that id names. A browser `EventSource` reconnecting to the same URL
//! therefore resumes; it never starts a second generation.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::{Extension, Json};
use serde::Deserialize;

use super::json::json_body;
use super::resume::{ResumeHeaders, native_response, resume_at, resume_point};
use crate::auth::{Principal, Scope};
use crate::error::ApiError;
use crate::event::Protocol;
use crate::generator::{ChatMessage, GenerateRequest};
use crate::state::AppState;
use crate::stream::{DriveHook, OpenRequest};

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
///
/// A connection that can poll the producer itself (tokengate's HTTP/1.1
/// path) offers a [`DriveHook`]; the stream then runs in its task.
pub async fn open_stream_get(
    State(state): State<AppState>,
    principal: Principal,
    ResumeHeaders(headers): ResumeHeaders,
    drive: Option<Extension<DriveHook>>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    let Query(q) = query?;
    if let Some((id, from)) = resume_point(&headers, q.last_event_id.as_deref())? {
        return resume_at(&state, &principal, id, from).await;
    }
    let request = GenerateRequest { prompt: q.prompt.unwrap_or_default(), ..GenerateRequest::default() };
    open(&state, &principal, request, q.generator, q.pace_ms, drive.map(|Extension(hook)| hook)).await
}

/// `POST /v1/stream` with `{"prompt", "messages"?, "generator"?, "pace_ms"?}`.
pub async fn open_stream_post(
    State(state): State<AppState>,
    principal: Principal,
    ResumeHeaders(headers): ResumeHeaders,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    if let Some((id, from)) = resume_point(&headers, None)? {
        return resume_at(&state, &principal, id, from).await;
    }
    let b: StreamBody = json_body(body, state.config.max_body_bytes)?;
    let request = GenerateRequest { prompt: b.prompt, messages: b.messages, ..GenerateRequest::default() };
    open(&state, &principal, request, b.generator, b.pace_ms, None).await
}

/// Opens a native stream and answers it.
async fn open(
    state: &AppState,
    principal: &Principal,
    generate: GenerateRequest,
    generator: Option<String>,
    pace_ms: Option<u32>,
    drive: Option<DriveHook>,
) -> Result<Response, ApiError> {
    let request = OpenRequest { generate, generator, pace_ms, detach_grace: None, protocol: Protocol::Native, drive };
    let opened = state.streams.open(principal, request).await?;
    Ok(native_response(state, opened.events))
}
