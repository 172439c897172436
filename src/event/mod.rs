//! The vocabulary every layer shares: the typed events of one stream
//! before any dialect renders them, stream ids, the codes a stream ends
//! with, and token usage. It depends on nothing else in the crate, so the
//! generators, the store, the stream lifecycle and the dialects can all use
//! it without reaching up or sideways.

mod code;
mod id;
mod protocol;
mod text;

use serde::{Deserialize, Serialize};

pub use code::{ErrorCode, Outcome};
pub use id::StreamId;
pub use protocol::Protocol;
pub use text::DeltaText;

/// Token counts an upstream reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
}

/// Why a stream finished normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The generator ran to its end.
    Stop,
}

impl FinishReason {
    /// The wire name (`finish_reason` in `done`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
        }
    }
}

/// One event of a stream, in the order the engine produces them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// First event: which stream this is and who generates it (sequence 0).
    Start {
        /// The stream's id.
        stream_id: StreamId,
        /// The generator's registry name.
        generator: String,
    },
    /// One extended grapheme cluster of text.
    Delta {
        /// The stream's id (for the event id).
        stream_id: StreamId,
        /// 1-based sequence number of this delta.
        seq: u64,
        /// Exactly one grapheme cluster.
        text: DeltaText,
    },
    /// Terminal: the generator finished.
    Done {
        /// The stream's id.
        stream_id: StreamId,
        /// Sequence number (one past the last delta).
        seq: u64,
        /// Why it finished.
        finish_reason: FinishReason,
        /// Number of deltas (grapheme clusters) sent.
        chars: u64,
        /// Token usage, when the generator reported it.
        usage: Option<Usage>,
    },
    /// Terminal: the stream failed; `code` is stable and machine-readable.
    Error {
        /// The stream's id.
        stream_id: StreamId,
        /// Sequence number (one past the last delta).
        seq: u64,
        /// Machine-readable code, e.g. `generator_failed`.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Terminal for this connection: the server is going away; reconnect
    /// after `retry_ms`.
    Shutdown {
        /// Reconnect hint in milliseconds.
        retry_ms: u64,
    },
    /// Nothing else was sent for a while; keeps proxies from timing out.
    Heartbeat,
}

impl StreamEvent {
    /// True for the events after which nothing more is sent on a stream.
    pub fn is_terminal(&self) -> bool {
        matches!(self, StreamEvent::Done { .. } | StreamEvent::Error { .. } | StreamEvent::Shutdown { .. })
    }

    /// How a terminal event ends the stream (`None` for the others).
    pub fn outcome(&self) -> Option<Outcome> {
        match self {
            StreamEvent::Done { .. } => Some(Outcome::Done),
            StreamEvent::Error { code, .. } => Some(Outcome::Error(*code)),
            StreamEvent::Shutdown { .. } => Some(Outcome::Shutdown),
            _ => None,
        }
    }

    /// The sequence number of a logged event (`None` for heartbeat and
    /// shutdown, which belong to a connection, not to the stream).
    pub fn seq(&self) -> Option<u64> {
        match self {
            StreamEvent::Start { .. } => Some(0),
            StreamEvent::Delta { seq, .. } | StreamEvent::Done { seq, .. } | StreamEvent::Error { seq, .. } => {
                Some(*seq)
            }
            StreamEvent::Shutdown { .. } | StreamEvent::Heartbeat => None,
        }
    }
}

impl AsRef<StreamEvent> for StreamEvent {
    fn as_ref(&self) -> &StreamEvent {
        self
    }
}
