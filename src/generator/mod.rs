//! Text sources. A [`Generator`] is the only thing a text source implements:
//! given a request it returns a stream of text chunks; the stream engine does
//! the rest (grapheme splitting, pacing, ids, framing). Generators are held
//! as `Arc<dyn Generator>` in a [`Registry`] and chosen by name per request.

mod demo;
mod echo;
mod registry;

use std::pin::Pin;

use futures_util::Stream;
use serde::{Deserialize, Serialize};

pub use demo::{DemoGenerator, Prompt};
pub use echo::EchoGenerator;
pub use registry::{Entry, Registry};

/// A chat message as clients send it (`role` is free text: `system`,
/// `user`, `assistant`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who said it.
    pub role: String,
    /// What was said.
    pub content: String,
}

/// What a generator is asked for.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    /// The prompt text (may be empty when `messages` carries the chat).
    pub prompt: String,
    /// Optional chat history, oldest first.
    pub messages: Vec<ChatMessage>,
}

impl GenerateRequest {
    /// The prompt, or else the last user message: what a single-turn
    /// generator should answer.
    pub fn effective_prompt(&self) -> &str {
        if !self.prompt.is_empty() {
            return &self.prompt;
        }
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or("", |m| m.content.as_str())
    }
}

/// Why a generator failed mid-stream. Each variant has a stable `code` that
/// ends the client's stream as a terminal `error` event.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GeneratorError {
    /// Any failure of the text source itself.
    #[error("generator failed: {0}")]
    Failed(String),
}

impl GeneratorError {
    /// Machine-readable code for the terminal `error` event.
    pub fn code(&self) -> &'static str {
        match self {
            GeneratorError::Failed(_) => "generator_failed",
        }
    }
}

/// The chunks a generator yields. Chunks may be cut anywhere between code
/// points; an `Err` ends the stream.
pub type TextStream = Pin<Box<dyn Stream<Item = Result<String, GeneratorError>> + Send + 'static>>;

/// A source of text. Object-safe so the registry can hold any mix of them.
///
/// `generate` must be cheap and do no work by itself: the work happens when
/// the returned stream is polled, and dropping the stream must cancel it
/// (an `async_stream::stream!` body or a future-driven stream does this for
/// free).
pub trait Generator: Send + Sync + 'static {
    /// One line for `/v1/models` and the demo page's picker.
    fn description(&self) -> &str;

    /// Starts producing text for `request`.
    fn generate(&self, request: GenerateRequest) -> TextStream;
}
