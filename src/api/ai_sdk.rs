//! The Vercel AI SDK surface, for `useChat` and its `DefaultChatTransport`:
//! `POST /v1/ui/chat` answers a chat in the UI message stream protocol v1
//! ([`crate::dialect::ai_sdk`]); `GET /v1/ui/chat/{chatId}/stream` resumes
//! the chat's running stream from its start (what `useChat({ resume: true })`
//! asks on load), or answers 204 when none runs; `POST /v1/ui/chat/{chatId}/stop`
//! stops it (with resume on, a closed tab is only a disconnect, so stopping
//! has to be said). Errors are problem+json: the transport throws the
//! response text.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::json::json_body;
use super::sse::sse_response_with;
use crate::auth::{Principal, Scope};
use crate::dialect::ai_sdk::{HEADER, UiMessageStream};
use crate::error::ApiError;
use crate::event::Protocol;
use crate::generator::{ChatMessage, GenerateRequest};
use crate::state::AppState;
use crate::stream::{EventStream, OpenRequest, Resumed};

/// The longest chat id accepted, in characters (the SDK's are 16).
const MAX_CHAT_ID_CHARS: usize = 256;

/// One part of a UI message; only `text` parts are read, whatever else a
/// part carries (tools, files, reasoning, data) is ignored.
#[derive(Debug, Deserialize)]
pub struct UiPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<Value>,
}

/// One UI message as `useChat` sends it.
#[derive(Debug, Deserialize)]
pub struct UiMessage {
    role: String,
    #[serde(default)]
    parts: Vec<UiPart>,
}

/// What `useChat`'s transport sends (with the app's own body fields, of
/// which `model` is read and the rest ignored).
#[derive(Debug, Deserialize)]
pub struct UiChatRequest {
    /// The chat id: the key a resume finds the chat's stream by.
    id: String,
    messages: Vec<UiMessage>,
    /// `submit-message` or `regenerate-message`: either way the messages
    /// are the conversation to answer (the SDK has already dropped the
    /// message being regenerated).
    #[serde(default)]
    trigger: Option<String>,
    /// The generator; the default one without it.
    #[serde(default)]
    model: Option<String>,
}

impl UiMessage {
    fn into_chat(self) -> Result<ChatMessage, ApiError> {
        if !matches!(self.role.as_str(), "user" | "assistant" | "system") {
            return Err(ApiError::BadRequest(format!("unknown message role `{}`", self.role)));
        }
        let content = self
            .parts
            .into_iter()
            .filter(|p| p.kind == "text")
            .filter_map(|p| match p.text {
                Some(Value::String(text)) => Some(text),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("");
        Ok(ChatMessage { role: self.role, content })
    }
}

fn chat_id(id: &str) -> Result<&str, ApiError> {
    let chars = id.chars().count();
    if chars == 0 || chars > MAX_CHAT_ID_CHARS {
        return Err(ApiError::BadRequest(format!("a chat id has 1 to {MAX_CHAT_ID_CHARS} characters")));
    }
    Ok(id)
}

/// The events as a UI message stream, with the protocol header.
fn ui_stream(state: &AppState, events: EventStream) -> Response {
    sse_response_with(events, UiMessageStream::new(), state.metrics.clone(), &[HEADER])
}

/// `POST /v1/ui/chat`
pub async fn chat(
    State(state): State<AppState>,
    principal: Principal,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    let req: UiChatRequest = json_body(body, state.config.max_body_bytes)?;
    let chat = chat_id(&req.id)?;
    if let Some(trigger) = req.trigger.as_deref()
        && !matches!(trigger, "submit-message" | "regenerate-message")
    {
        return Err(ApiError::BadRequest(format!("unknown trigger `{trigger}`")));
    }
    if req.messages.is_empty() {
        return Err(ApiError::BadRequest("`messages` must not be empty".into()));
    }
    let messages = req.messages.into_iter().map(UiMessage::into_chat).collect::<Result<Vec<_>, _>>()?;
    let open = OpenRequest {
        generate: GenerateRequest { prompt: String::new(), messages, options: Default::default() },
        generator: req.model,
        pace_ms: None,
        // `useChat` can resume: a closed tab keeps generating for the
        // configured grace (stop is `POST .../stop`).
        detach_grace: None,
        protocol: Protocol::AiSdkUi,
        drive: None,
    };
    let opened = state.streams.open(&principal, open).await.map_err(ApiError::for_model)?;
    if let Err(e) = state.streams.bind_chat(&principal, chat, opened.stream_id).await {
        // A stream nobody could resume or stop by its chat: end it now.
        if let Ok(located) = state.streams.locate(&principal, &opened.stream_id).await {
            let _ = state.streams.cancel(&principal, located).await;
        }
        return Err(e.into());
    }
    Ok(ui_stream(&state, opened.events))
}

/// `GET /v1/ui/chat/{chatId}/stream`: the running stream from its start,
/// then live; 204 when the chat has none running.
pub async fn resume_chat(
    State(state): State<AppState>,
    principal: Principal,
    Path(chat): Path<String>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    let Some(located) = state.streams.chat_stream(&principal, chat_id(&chat)?).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    Ok(match state.streams.resume(&principal, located, 0).await? {
        Resumed::Complete => StatusCode::NO_CONTENT.into_response(),
        Resumed::Events(events) => ui_stream(&state, events),
    })
}

/// `POST /v1/ui/chat/{chatId}/stop`: stops the chat's running stream
/// (its readers get `abort`); 204 whether one was running or not. A
/// `POST` to an action, not a `DELETE`: the chat stays (its resume answers
/// 204 afterwards, as `useChat` needs), only its generation ends.
pub async fn stop_chat(
    State(state): State<AppState>,
    principal: Principal,
    Path(chat): Path<String>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    if let Some(located) = state.streams.chat_stream(&principal, chat_id(&chat)?).await? {
        state.streams.cancel(&principal, located).await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
