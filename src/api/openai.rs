//! The OpenAI-compatible surface: `POST /v1/chat/completions` (streaming
//! and not) and `GET /v1/models`, so the official OpenAI SDKs work
//! unchanged with a tokengate JWT as their API key. Errors use the OpenAI
//! shape ([`OpenAiError`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::gather::gather;
use super::json::JsonObject;
use super::sse::sse_response;
use crate::auth::{Principal, Scope};
use crate::dialect::openai::OpenAiChunks;
use crate::error::{ApiError, OpenAiError};
use crate::event::Protocol;
use crate::generator::{ChatMessage, GenerateRequest, SamplingOptions};
use crate::state::AppState;
use crate::stream::OpenRequest;

/// A message's content: a string, or a list of parts of which the text
/// parts are used.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": ...}`; others ignored).
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// One chat message as OpenAI clients send it.
#[derive(Debug, Deserialize)]
pub struct Message {
    role: String,
    content: Option<Content>,
}

impl Message {
    /// The message as a generator gets it: the text parts joined, other
    /// parts (images, audio) left out.
    fn into_chat(self) -> ChatMessage {
        let content = match self.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                parts.into_iter().filter(|p| p.kind == "text").filter_map(|p| p.text).collect::<Vec<_>>().join("")
            }
        };
        ChatMessage { role: self.role, content }
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

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(state): State<AppState>,
    principal: Result<Principal, ApiError>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    let principal = principal?;
    super::require(&principal, Scope::Stream)?;
    let JsonObject::<ChatRequest>(req) =
        body.map_err(|r| ApiError::from_json_rejection(r, state.config.max_body_bytes))?.try_into()?;
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
    };
    let opened = state.streams.open(&principal, open).await.map_err(ApiError::for_model)?;
    let id = format!("chatcmpl-{}", opened.stream_id);
    let created = now();
    let events = opened.events;
    if req.stream {
        let include_usage = req.stream_options.unwrap_or_default().include_usage;
        let dialect = OpenAiChunks::new(id, created, model, include_usage, state.config.openai_chunk_graphemes);
        return Ok(sse_response(events, dialect, state.metrics.clone()));
    }
    // Not streaming: the whole answer from the same engine.
    let super::gather::Gathered { text, chars, usage, .. } = gather(events).await?;
    let usage = usage
        .map_or_else(|| json!({ "prompt_tokens": 0, "completion_tokens": chars, "total_tokens": chars }), |u| json!(u));
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": "stop" }],
        "usage": usage,
    }))
    .into_response())
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
