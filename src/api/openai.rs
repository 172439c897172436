//! The OpenAI-compatible surface: `POST /v1/chat/completions` (streaming
//! and not) and `GET /v1/models`, so the official OpenAI SDKs work
//! unchanged with a tokengate JWT as their API key. Errors use the OpenAI
//! shape ([`OpenAiError`]).

use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::gather::{gather, unix_now};
use super::json::{TextContent, read_json_body};
use super::sse::sse_response;
use crate::auth::{Principal, Scope};
use crate::dialect::openai::OpenAiChunks;
use crate::dialect::stop_note;
use crate::error::{ApiError, OpenAiError};
use crate::event::{ErrorCode, Protocol};
use crate::generator::{ChatMessage, GenerateRequest, SamplingOptions};
use crate::state::AppState;
use crate::stream::OpenRequest;

/// One chat message as OpenAI clients send it.
#[derive(Debug, Deserialize)]
pub struct Message {
    role: String,
    content: Option<TextContent>,
}

impl Message {
    /// The message as a generator gets it: the text parts joined, other
    /// parts (images, audio) left out.
    fn into_chat(self) -> ChatMessage {
        ChatMessage { role: self.role, content: self.content.map(TextContent::into_text).unwrap_or_default() }
    }
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The request body; fields tokengate does not use are accepted and
/// ignored, as the SDKs send many.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "super::json::opt_int")]
    max_completion_tokens: Option<u32>,
    #[serde(default, deserialize_with = "super::json::opt_int")]
    n: Option<u32>,
    #[serde(flatten)]
    options: SamplingOptions,
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(state): State<AppState>,
    principal: Result<Principal, ApiError>,
    request: Request,
) -> Result<Response, OpenAiError> {
    let principal = principal?;
    super::require(&principal, Scope::Stream)?;
    let req: ChatRequest = read_json_body(request, state.config.max_body_bytes).await?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::BadRequest("only n = 1 is supported".into()).into());
    }
    let messages: Vec<ChatMessage> = req.messages.into_iter().map(Message::into_chat).collect();
    if messages.is_empty() {
        return Err(ApiError::BadRequest("`messages` must not be empty".into()).into());
    }
    let mut options = req.options;
    options.max_tokens = options.max_tokens.or(req.max_completion_tokens);
    let request = GenerateRequest { prompt: String::new(), messages, options };
    let model = req.model;
    // OpenAI clients cannot resume: a client that leaves cancels at once.
    let open = OpenRequest {
        generate: request,
        generator: Some(model.clone()),
        pace_ms: None,
        detach_grace: Some(Duration::ZERO),
        protocol: Protocol::OpenAiChat,
        drive: None,
    };
    let opened = state.streams.open(&principal, open).await.map_err(ApiError::for_model)?;
    let id = format!("chatcmpl-{}", opened.stream_id);
    let created = unix_now();
    let events = opened.events;
    if req.stream {
        let include_usage = req.stream_options.unwrap_or_default().include_usage;
        let dialect = OpenAiChunks::new(id, created, model, include_usage, state.config.openai_chunk_graphemes);
        return Ok(sse_response(events, dialect, state.metrics.clone()));
    }
    // Not streaming: the whole answer from the same engine.
    let super::gather::Gathered { text, chars, usage, quota_cut, .. } = gather(events).await?;
    let usage = usage
        .map_or_else(|| json!({ "prompt_tokens": 0, "completion_tokens": chars, "total_tokens": chars }), |u| json!(u));
    let finish_reason = if quota_cut.is_some() { "length" } else { "stop" };
    let mut completion = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": finish_reason }],
        "usage": usage,
    });
    if let Some(message) = quota_cut {
        completion["tokengate"] = stop_note(ErrorCode::QuotaExceeded, &message);
    }
    Ok(Json(completion).into_response())
}

/// `GET /v1/models`: every generator and upstream alias, as OpenAI models.
pub async fn models(
    State(state): State<AppState>,
    principal: Result<Principal, ApiError>,
) -> Result<Json<Value>, OpenAiError> {
    principal?;
    let data: Vec<Value> = state
        .streams
        .generators()
        .iter()
        .map(|(name, entry)| {
            json!({
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "tokengate",
                "description": entry.generator.description(),
            })
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}
