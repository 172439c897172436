//! The Anthropic Messages streaming dialect: named events whose `data` is
//! a JSON object with the same `type`, in the order the official SDKs
//! accumulate them: `message_start`, `content_block_start` (one text block,
//! index 0), one `content_block_delta` per grapheme cluster,
//! `content_block_stop`, `message_delta` (the stop reason and output
//! usage) and `message_stop`. A failure is one `event: error` in the
//! Anthropic error shape instead of the closing events (the SDKs raise it);
//! the keep-alive is `event: ping`.

use bytes::{BufMut, BytesMut};
use serde_json::json;

use super::Dialect;
use crate::event::{ErrorCode, FinishReason, Outcome, StreamEvent};
use crate::sse::push_json_string;

/// Anthropic's error `type` for a terminal stream error: the server being
/// unable to keep serving is `overloaded_error` (the SDKs' advice is to
/// retry), a limit on time is `timeout_error`, an upstream's rate limit
/// `rate_limit_error` (and so is the subject's own quota), an expired
/// token `authentication_error`, and every other failure of the generator, the
/// upstream or the gateway itself `api_error`. tokengate's own code is in
/// the error's `code` field and its message.
pub fn stream_error_type(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::StoreUnavailable | ErrorCode::GeneratorLost => "overloaded_error",
        ErrorCode::MaxDuration
        | ErrorCode::UpstreamConnectTimeout
        | ErrorCode::UpstreamFirstByteTimeout
        | ErrorCode::UpstreamIdleTimeout
        | ErrorCode::UpstreamTotalTimeout => "timeout_error",
        ErrorCode::UpstreamRateLimited | ErrorCode::QuotaExceeded => "rate_limit_error",
        ErrorCode::TokenExpired => "authentication_error",
        ErrorCode::GeneratorFailed
        | ErrorCode::Cancelled
        | ErrorCode::ClientGone
        | ErrorCode::SlowConsumer
        | ErrorCode::ResumeGap
        | ErrorCode::Internal
        | ErrorCode::UpstreamConnectFailed
        | ErrorCode::UpstreamDisconnected
        | ErrorCode::UpstreamUnauthorized
        | ErrorCode::UpstreamNotFound
        | ErrorCode::UpstreamUnavailable
        | ErrorCode::UpstreamBadRequest
        | ErrorCode::UpstreamMalformed
        | ErrorCode::UpstreamError => "api_error",
    }
}

/// Anthropic's `stop_reason` for how a generation finished. Exhaustive, so
/// that a new [`FinishReason`] (a length or stop-sequence stop reported by
/// an upstream) must choose `max_tokens` or `stop_sequence` here.
pub fn stop_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "end_turn",
    }
}

/// Renders one stream as Anthropic Messages events.
#[derive(Debug)]
pub struct AnthropicEvents {
    /// `msg_<stream id>`.
    id: String,
    /// The requested model, repeated in `message_start`.
    model: String,
    /// Grapheme clusters per `content_block_delta` (at least 1).
    per_delta: usize,
    /// Clusters waiting for a full delta.
    pending: String,
    /// How many clusters `pending` holds.
    pending_count: usize,
    /// Whether `message_start` and the block's start were sent.
    started: bool,
    /// Clusters rendered, for the usage of a stream cut short.
    delivered: u64,
}

impl AnthropicEvents {
    /// A renderer for message `id` of `model`, `per_delta` grapheme
    /// clusters per text delta.
    pub fn new(id: String, model: String, per_delta: usize) -> Self {
        Self {
            id,
            model,
            per_delta: per_delta.max(1),
            pending: String::new(),
            pending_count: 0,
            started: false,
            delivered: 0,
        }
    }

    /// `event: <name>` and `data: <json>`; `json` must be one line.
    fn event(buf: &mut BytesMut, name: &str, json: &[u8]) {
        buf.put_slice(b"event: ");
        buf.put_slice(name.as_bytes());
        buf.put_slice(b"\ndata: ");
        buf.put_slice(json);
        buf.put_slice(b"\n\n");
    }

    fn start(&mut self, buf: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({
            "type": "message_start",
            "message": {
                "id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.model,
                "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": 0, "output_tokens": 0 },
            },
        });
        Self::event(buf, "message_start", message.to_string().as_bytes());
        Self::event(
            buf,
            "content_block_start",
            br#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        );
    }

    fn flush(&mut self, buf: &mut BytesMut) {
        if self.pending_count == 0 {
            return;
        }
        buf.put_slice(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":");
        push_json_string(buf, &self.pending);
        buf.put_slice(b"}}\n\n");
        self.pending.clear();
        self.pending_count = 0;
    }

    /// The normal end: the block's stop, `message_delta` (the stop reason
    /// and usage) and `message_stop`.
    fn end(&mut self, buf: &mut BytesMut, delta: &serde_json::Value) {
        self.start(buf);
        self.flush(buf);
        Self::event(buf, "content_block_stop", br#"{"type":"content_block_stop","index":0}"#);
        Self::event(buf, "message_delta", delta.to_string().as_bytes());
        Self::event(buf, "message_stop", br#"{"type":"message_stop"}"#);
    }

    /// The terminal `event: error`, with tokengate's `code` beside
    /// Anthropic's `type` and in the message.
    fn error(buf: &mut BytesMut, kind: &str, code: &str, message: &str) {
        let body = json!({
            "type": "error",
            "error": { "type": kind, "message": format!("{code}: {message}"), "code": code },
        });
        Self::event(buf, "error", body.to_string().as_bytes());
    }
}

impl Dialect for AnthropicEvents {
    type Event = StreamEvent;

    fn render(&mut self, event: &StreamEvent, buf: &mut BytesMut) {
        match event {
            StreamEvent::Start { .. } => self.start(buf),
            StreamEvent::Delta { text, .. } => {
                self.start(buf);
                self.pending.push_str(text);
                self.pending_count += 1;
                self.delivered += 1;
                if self.pending_count >= self.per_delta {
                    self.flush(buf);
                }
            }
            StreamEvent::Done { chars, usage, finish_reason, .. } => {
                // Built-in generators count no tokens; report clusters.
                let usage = usage.map_or_else(
                    || json!({ "output_tokens": chars }),
                    |u| json!({ "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens }),
                );
                let delta = json!({
                    "type": "message_delta",
                    "delta": { "stop_reason": stop_reason(*finish_reason), "stop_sequence": null },
                    "usage": usage,
                });
                self.end(buf, &delta);
            }
            // The quota ends the message as a token limit would, and says
            // why in a `tokengate` member the SDKs keep as an extra field.
            StreamEvent::Error { code: code @ ErrorCode::QuotaExceeded, message, .. } => {
                let delta = json!({
                    "type": "message_delta",
                    "delta": { "stop_reason": "max_tokens", "stop_sequence": null },
                    "usage": { "output_tokens": self.delivered },
                    "tokengate": super::stop_note(*code, message),
                });
                self.end(buf, &delta);
            }
            StreamEvent::Error { code, message, .. } => {
                self.flush(buf);
                Self::error(buf, stream_error_type(*code), code.as_str(), message);
            }
            StreamEvent::Shutdown { .. } => {
                self.flush(buf);
                Self::error(
                    buf,
                    "overloaded_error",
                    Outcome::Shutdown.as_str(),
                    "the server is shutting down; retry the request",
                );
            }
            StreamEvent::Heartbeat => Self::event(buf, "ping", br#"{"type":"ping"}"#),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::StreamId;

    fn render(events: &[StreamEvent]) -> String {
        let mut dialect = AnthropicEvents::new("msg_x".into(), "echo".into(), 1);
        let mut buf = BytesMut::new();
        dialect.preamble(&mut buf);
        for e in events {
            dialect.render(e, &mut buf);
        }
        String::from_utf8(buf.to_vec()).unwrap_or_default()
    }

    fn names(wire: &str) -> Vec<&str> {
        wire.lines().filter_map(|l| l.strip_prefix("event: ")).collect()
    }

    #[test]
    fn a_done_stream_closes_the_block_and_the_message() {
        let stream_id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| panic!("id"));
        let wire = render(&[
            StreamEvent::Start { stream_id, generator: "echo".into() },
            StreamEvent::Delta { stream_id, seq: 1, text: "e\u{301}".into() },
            StreamEvent::Heartbeat,
            StreamEvent::Done { stream_id, seq: 2, finish_reason: FinishReason::Stop, chars: 1, usage: None },
        ]);
        assert_eq!(
            names(&wire),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "ping",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        for block in wire.split("\n\n").filter(|b| !b.is_empty()) {
            let mut lines = block.lines();
            let name = lines.next().and_then(|l| l.strip_prefix("event: ")).unwrap_or_default();
            let data: serde_json::Value =
                serde_json::from_str(lines.next().and_then(|l| l.strip_prefix("data: ")).unwrap_or_default())
                    .unwrap_or_default();
            assert_eq!(data["type"], name, "{block}");
        }
        assert!(wire.contains(r#""stop_reason":"end_turn""#), "{wire}");
    }

    #[test]
    fn every_error_code_is_one_error_event() {
        let stream_id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| panic!("id"));
        for code in ErrorCode::ALL.into_iter().filter(|c| *c != ErrorCode::QuotaExceeded) {
            let wire = render(&[
                StreamEvent::Start { stream_id, generator: "echo".into() },
                StreamEvent::Error { stream_id, seq: 1, code, message: "m".into() },
            ]);
            assert_eq!(names(&wire), ["message_start", "content_block_start", "error"], "{code}");
            assert!(wire.contains(&format!(r#""code":"{code}""#)), "{wire}");
        }
        let wire = render(&[StreamEvent::Shutdown { retry_ms: 1000 }]);
        assert_eq!(names(&wire), ["error"]);
        assert!(wire.contains("overloaded_error"), "{wire}");
    }

    #[test]
    fn the_quota_ends_the_message_like_a_token_limit_and_says_why() {
        let stream_id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| panic!("id"));
        let wire = render(&[
            StreamEvent::Start { stream_id, generator: "echo".into() },
            StreamEvent::Delta { stream_id, seq: 1, text: "a".into() },
            StreamEvent::Delta { stream_id, seq: 2, text: "b".into() },
            StreamEvent::Error { stream_id, seq: 3, code: ErrorCode::QuotaExceeded, message: "used up".into() },
        ]);
        let names = names(&wire);
        assert_eq!(names.last(), Some(&"message_stop"), "{wire}");
        assert!(!names.contains(&"error"), "{wire}");
        assert!(wire.contains(r#""stop_reason":"max_tokens""#), "{wire}");
        assert!(wire.contains(r#""output_tokens":2"#), "{wire}");
        assert!(wire.contains(r#""tokengate":{"code":"quota_exceeded","message":"used up"}"#), "{wire}");
    }
}
