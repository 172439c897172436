//! Reading a whole stream for the non-streaming answers of the dialect
//! routes (`stream: false`): the same engine runs, and its events are
//! gathered instead of rendered.

use futures_util::StreamExt;

use crate::error::ApiError;
use crate::event::ErrorCode;
use crate::generator::Usage;
use crate::stream::{EventStream, FinishReason, StreamEvent};

/// Unix seconds, for the `created` / `created_at` of the dialects' objects.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A whole generation, as a non-streaming answer reports it.
#[derive(Debug)]
pub struct Gathered {
    /// All the text.
    pub text: String,
    /// Its length in grapheme clusters.
    pub chars: u64,
    /// The usage an upstream reported.
    pub usage: Option<Usage>,
    /// Why it finished.
    pub finish_reason: FinishReason,
    /// Set when the subject's quota cut the generation short: what was
    /// delivered until then is the answer (it is what was charged), and
    /// this says why it stops there.
    pub quota_cut: Option<String>,
}

/// Reads a whole stream for a non-streaming answer; a stream that ends with
/// an error or a shutdown is that error, except the quota's (see
/// [`Gathered::quota_cut`]).
pub async fn gather(events: EventStream) -> Result<Gathered, ApiError> {
    let mut events = std::pin::pin!(events);
    let mut text = String::new();
    let mut chars = 0;
    while let Some(event) = events.next().await {
        match event.as_ref() {
            StreamEvent::Delta { text: t, .. } => {
                text.push_str(t);
                chars += 1;
            }
            StreamEvent::Done { chars, usage, finish_reason, .. } => {
                let (chars, usage, finish_reason) = (*chars, *usage, *finish_reason);
                return Ok(Gathered { text, chars, usage, finish_reason, quota_cut: None });
            }
            StreamEvent::Error { code: ErrorCode::QuotaExceeded, message, .. } => {
                let quota_cut = Some(message.clone());
                return Ok(Gathered { text, chars, usage: None, finish_reason: FinishReason::Stop, quota_cut });
            }
            StreamEvent::Error { code, message, .. } => {
                return Err(ApiError::GenerationFailed { code: *code, message: message.clone() });
            }
            StreamEvent::Shutdown { .. } => return Err(ApiError::Draining),
            StreamEvent::Start { .. } | StreamEvent::Heartbeat => {}
        }
    }
    Err(ApiError::Internal("stream ended without a result".into()))
}
