//! Text sources. A [`Generator`] is the only thing a text source implements:
//! given a request it returns a stream of text chunks; the stream engine does
//! the rest (grapheme splitting, pacing, ids, framing). Generators are held
//! as `Arc<dyn Generator>` in a [`Registry`] and chosen by name per request.

mod anthropic;
mod demo;
mod echo;
mod http1;
mod openai;
mod registry;
pub mod upstream;

use std::pin::Pin;

use futures_util::Stream;
use serde::{Deserialize, Serialize};

pub use demo::{DemoGenerator, Prompt};
pub use echo::EchoGenerator;
pub use openai::OpenAiGenerator;
pub(crate) use openai::{UpstreamEnd, UpstreamRead, read_upstream};
pub use registry::{Entry, Registry, RegistryError, builtin_generators};

pub use crate::event::{ErrorCode, Usage};

/// A chat message as clients send it (`role` is free text: `system`,
/// `user`, `assistant`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who said it.
    pub role: String,
    /// What was said.
    pub content: String,
}

/// Common sampling options, passed to upstreams that understand them and
/// ignored by the built-in generators.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingOptions {
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Most tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::opt_int")]
    pub max_tokens: Option<u32>,
    /// Stop sequence(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Presence penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    /// Frequency penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::opt_int")]
    pub seed: Option<i64>,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop sequence.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// What a generator is asked for.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    /// The prompt text (may be empty when `messages` carries the chat).
    pub prompt: String,
    /// Optional chat history, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Sampling options.
    pub options: SamplingOptions,
}

/// What a generator yields: text, or (once, usually last) token usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Some text; may end anywhere between code points.
    Text(String),
    /// Token usage for the whole generation.
    Usage(Usage),
}

impl From<String> for Chunk {
    fn from(text: String) -> Self {
        Chunk::Text(text)
    }
}

impl From<&str> for Chunk {
    fn from(text: &str) -> Self {
        Chunk::Text(text.to_owned())
    }
}

impl GenerateRequest {
    /// The prompt, or else the last user message: what a single-turn
    /// generator should answer.
    pub fn effective_prompt(&self) -> &str {
        if !self.prompt.is_empty() {
            return &self.prompt;
        }
        self.messages.iter().rev().find(|m| m.role == "user").map_or("", |m| m.content.as_str())
    }
}

/// Why a generator failed mid-stream. Each variant has a stable `code` that
/// ends the client's stream as a terminal `error` event.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GeneratorError {
    /// Any failure of the text source itself.
    #[error("generator failed: {0}")]
    Failed(String),
    /// An upstream model server failed; `code` says how (e.g.
    /// `upstream_rate_limited`, `upstream_idle_timeout`).
    #[error("{message}")]
    Upstream {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable detail (never the API key).
        message: String,
    },
}

impl GeneratorError {
    /// Machine-readable code for the terminal `error` event.
    pub fn code(&self) -> ErrorCode {
        match self {
            GeneratorError::Failed(_) => ErrorCode::GeneratorFailed,
            GeneratorError::Upstream { code, .. } => *code,
        }
    }
}

/// The chunks a generator yields. Chunks may be cut anywhere between code
/// points; an `Err` ends the stream.
pub type TextStream = Pin<Box<dyn Stream<Item = Result<Chunk, GeneratorError>> + Send + 'static>>;

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
