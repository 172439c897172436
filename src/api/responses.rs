//! The OpenAI Responses API: `POST /v1/responses` (streaming and not),
//! `GET /v1/responses/{id}` (the response object, or with `stream=true`
//! its events replayed from the stream log and followed live;
//! `starting_after=N` skips those up to N) and
//! `POST /v1/responses/{id}/cancel`. Errors use the OpenAI shape.
//!
//! A response is a stream: `resp_<stream id>`. Its events are numbered from
//! the log, so a replay numbers them as the first delivery did, which is
//! what the SDK's `responses.stream(response_id=..., starting_after=N)`
//! relies on (it asks for the whole replay and drops what it has).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;

use super::gather::unix_now;
use super::json::read_json_body;
use super::sse::sse_response;
use crate::auth::{Principal, Scope};
use crate::dialect::responses::{ResponseState, Responses, stream_of};
use crate::error::{ApiError, OpenAiError};
use crate::event::Protocol;
use crate::generator::{ChatMessage, GenerateRequest, SamplingOptions};
use crate::state::AppState;
use crate::store::Located;
use crate::stream::{EventStream, OpenRequest, Resumed};

/// The request body. Fields tokengate does not use (`tools`, `store`,
/// `reasoning`, ...) are accepted and ignored, as the SDKs send many.
#[derive(Debug, Deserialize)]
pub struct CreateResponse {
    model: String,
    /// A string, or a list of input items (messages; other items ignored).
    input: Value,
    instructions: Option<String>,
    #[serde(default, deserialize_with = "crate::json::opt_int")]
    max_output_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    #[serde(default)]
    stream: bool,
}

/// Query of `GET /v1/responses/{id}`; other parameters (`include`, ...)
/// are ignored.
#[derive(Debug, Deserialize)]
pub struct RetrieveQuery {
    #[serde(default)]
    stream: bool,
    starting_after: Option<u64>,
}

/// The text of one input item's `content`: a string, or the text of its
/// `input_text` / `output_text` / `text` parts.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| matches!(p["type"].as_str(), Some("input_text" | "output_text" | "text")))
            .filter_map(|p| p["text"].as_str())
            .collect(),
        _ => String::new(),
    }
}

/// `input` as chat messages, `instructions` first as the system message.
fn messages(input: &Value, instructions: Option<String>) -> Result<Vec<ChatMessage>, ApiError> {
    let mut messages: Vec<ChatMessage> =
        instructions.into_iter().map(|content| ChatMessage { role: "system".into(), content }).collect();
    match input {
        Value::String(text) => messages.push(ChatMessage { role: "user".into(), content: text.clone() }),
        Value::Array(items) => {
            for item in items {
                if !item.is_object() {
                    return Err(ApiError::BadRequest("every `input` item must be an object".into()));
                }
                let is_message = item["type"].as_str().is_none_or(|t| t == "message");
                if let (true, Some(role)) = (is_message, item["role"].as_str()) {
                    messages.push(ChatMessage { role: role.to_owned(), content: content_text(&item["content"]) });
                }
            }
        }
        _ => return Err(ApiError::BadRequest("`input` must be a string or a list of input items".into())),
    }
    Ok(messages)
}

/// `POST /v1/responses`
pub async fn create_response(
    State(state): State<AppState>,
    principal: Result<Principal, ApiError>,
    request: Request,
) -> Result<Response, OpenAiError> {
    let principal = principal?;
    super::require(&principal, Scope::Stream)?;
    let req: CreateResponse = read_json_body(request, state.config.max_body_bytes).await?;
    let messages = messages(&req.input, req.instructions)?;
    let options = SamplingOptions {
        temperature: req.temperature,
        top_p: req.top_p,
        max_tokens: req.max_output_tokens,
        ..SamplingOptions::default()
    };
    // Resumable (GET ...?stream=true): the configured detach grace applies.
    let open = OpenRequest {
        generate: GenerateRequest { prompt: String::new(), messages, options },
        generator: Some(req.model.clone()),
        pace_ms: None,
        detach_grace: None,
        protocol: Protocol::OpenAiResponses,
        drive: None,
    };
    let opened = state.streams.open(&principal, open).await.map_err(ApiError::for_model)?;
    let response = ResponseState::new(opened.stream_id, req.model, unix_now());
    if req.stream {
        return Ok(events_response(&state, opened.events, response, None));
    }
    Ok(Json(gather(opened.events, response).await.object()).into_response())
}

/// Events rendered as Responses API events.
fn events_response(state: &AppState, events: EventStream, response: ResponseState, after: Option<u64>) -> Response {
    let dialect = Responses::new(response, state.config.openai_chunk_graphemes, after);
    sse_response(events, dialect, state.metrics.clone())
}

/// Reads a stream to its end into the response object's state.
async fn gather(events: EventStream, mut response: ResponseState) -> ResponseState {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        response.apply(&event);
        if event.is_terminal() {
            break;
        }
    }
    response
}

/// The stream behind a `resp_...` id, if the caller may see it.
async fn locate(state: &AppState, principal: &Principal, id: &str) -> Result<Located, ApiError> {
    let stream_id = stream_of(id).ok_or(ApiError::StreamNotFound)?;
    Ok(state.streams.locate(principal, &stream_id).await?)
}

/// `GET /v1/responses/{id}`: the response object once it has finished
/// (a running response is waited for), or with `stream=true` its events
/// from `response.created` on (after `starting_after`), then live.
pub async fn retrieve_response(
    State(state): State<AppState>,
    principal: Result<Principal, ApiError>,
    Path(id): Path<String>,
    query: Result<Query<RetrieveQuery>, QueryRejection>,
) -> Result<Response, OpenAiError> {
    let principal = principal?;
    super::require(&principal, Scope::Stream)?;
    let Query(q) = query.map_err(ApiError::from)?;
    let located = locate(&state, &principal, &id).await?;
    let response = ResponseState::new(located.id, String::new(), unix_now());
    // The whole log, from the start: sequence numbers count from there.
    let events = match state.streams.resume(&principal, located, 0).await.map_err(ApiError::from)? {
        Resumed::Events(events) => events,
        Resumed::Complete => return Err(ApiError::StreamNotFound.into()),
    };
    if q.stream {
        return Ok(events_response(&state, events, response, q.starting_after));
    }
    Ok(Json(gather(events, response).await.object()).into_response())
}

/// `POST /v1/responses/{id}/cancel`: stops the generation; answers the
/// response as it stands, with status `cancelled`.
pub async fn cancel_response(
    State(state): State<AppState>,
    principal: Result<Principal, ApiError>,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    let principal = principal?;
    super::require(&principal, Scope::Stream)?;
    let located = locate(&state, &principal, &id).await?;
    let stream_id = located.id;
    state.streams.cancel(&principal, located).await.map_err(ApiError::from)?;
    // The log now ends with `cancelled` (or with what ended it before).
    let located = state.streams.locate(&principal, &stream_id).await.map_err(ApiError::from)?;
    let response = ResponseState::new(stream_id, String::new(), unix_now());
    Ok(Json(match state.streams.resume(&principal, located, 0).await.map_err(ApiError::from)? {
        Resumed::Events(events) => gather(events, response).await.object(),
        Resumed::Complete => response.object(),
    }))
}
