//! The Anthropic Messages API: `POST /v1/messages` (streaming and not), so
//! the official Anthropic SDKs work with a tokengate JWT as their API key
//! (sent as `x-api-key` or `Authorization: Bearer`). Errors use the
//! Anthropic shape ([`AnthropicError`]).

use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::ApiKeyPrincipal;
use super::gather::{Gathered, gather};
use super::json::{TextContent, read_json_body};
use super::sse::sse_response;
use crate::auth::Scope;
use crate::dialect::anthropic::{AnthropicEvents, stop_reason};
use crate::dialect::stop_note;
use crate::error::{AnthropicError, ApiError};
use crate::event::{ErrorCode, Protocol};
use crate::generator::{ChatMessage, GenerateRequest, SamplingOptions, Stop};
use crate::state::AppState;
use crate::stream::OpenRequest;

/// Grapheme clusters per `content_block_delta`.
const DELTA_GRAPHEMES: usize = 1;

/// One message as Anthropic clients send it (`user` or `assistant`).
#[derive(Debug, Deserialize)]
pub struct Message {
    role: String,
    content: TextContent,
}

/// The request body. Fields tokengate does not use (`metadata`, `top_k`,
/// `tools`, `tool_choice`, `thinking`, ...) are accepted and ignored.
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    model: String,
    /// Required, as Anthropic's API requires it; `Option` only so that its
    /// absence is a clear 400 instead of serde's wording.
    #[serde(default, deserialize_with = "super::json::opt_int")]
    max_tokens: Option<u32>,
    messages: Vec<Message>,
    system: Option<TextContent>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    #[serde(default)]
    stream: bool,
}

impl MessagesRequest {
    /// The generator's request: `system` first as a `system` message, then
    /// the conversation; `max_tokens`, `stop_sequences` (as `stop`),
    /// `temperature` and `top_p` as the sampling options.
    fn into_generate(self) -> Result<GenerateRequest, ApiError> {
        let max_tokens = self.max_tokens.ok_or_else(|| ApiError::BadRequest("max_tokens: field required".into()))?;
        if max_tokens == 0 {
            return Err(ApiError::BadRequest("max_tokens: must be at least 1".into()));
        }
        if self.messages.is_empty() {
            return Err(ApiError::BadRequest("messages: at least one message is required".into()));
        }
        let system = self.system.map(TextContent::into_text).filter(|s| !s.is_empty());
        let messages = system
            .map(|content| ChatMessage { role: "system".into(), content })
            .into_iter()
            .chain(self.messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content.into_text() }))
            .collect();
        let stop = self.stop_sequences.filter(|s| !s.is_empty()).map(Stop::Many);
        let options = SamplingOptions {
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: Some(max_tokens),
            stop,
            ..SamplingOptions::default()
        };
        Ok(GenerateRequest { prompt: String::new(), messages, options })
    }
}

/// `POST /v1/messages`
pub async fn create_message(
    State(state): State<AppState>,
    principal: Result<ApiKeyPrincipal, ApiError>,
    request: Request,
) -> Result<Response, AnthropicError> {
    let ApiKeyPrincipal(principal) = principal?;
    super::require(&principal, Scope::Stream)?;
    let req: MessagesRequest = read_json_body(request, state.config.max_body_bytes).await?;
    let stream = req.stream;
    let model = req.model.clone();
    let generate = req.into_generate()?;
    // Anthropic clients cannot resume: a client that leaves cancels at once.
    let open = OpenRequest {
        generate,
        generator: Some(model.clone()),
        pace_ms: None,
        detach_grace: Some(Duration::ZERO),
        protocol: Protocol::AnthropicMessages,
        drive: None,
    };
    let opened = state.streams.open(&principal, open).await.map_err(ApiError::for_model)?;
    let id = format!("msg_{}", opened.stream_id);
    if stream {
        let dialect = AnthropicEvents::new(id, model, DELTA_GRAPHEMES);
        return Ok(sse_response(opened.events, dialect, state.metrics.clone()));
    }
    // Not streaming: the whole message from the same engine.
    let Gathered { text, chars, usage, finish_reason, quota_cut } = gather(opened.events).await?;
    let usage = usage.map_or_else(
        || json!({ "input_tokens": 0, "output_tokens": chars }),
        |u| json!({ "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens }),
    );
    let stop = if quota_cut.is_some() { "max_tokens" } else { stop_reason(finish_reason) };
    let mut message = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{ "type": "text", "text": text }],
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": usage,
    });
    if let Some(why) = quota_cut {
        message["tokengate"] = stop_note(ErrorCode::QuotaExceeded, &why);
    }
    Ok(Json(message).into_response())
}
