//! The Vercel AI SDK UI message stream, protocol v1 (what `useChat` and
//! its `DefaultChatTransport` read, announced by the response header
//! [`HEADER`]). Every part is one `data:` line holding a JSON object with
//! exactly the fields of the SDK's `uiMessageChunkSchema` (it validates
//! every chunk), and the stream closes with `data: [DONE]`:
//!
//! ```text
//! data: {"type":"start","messageId":"<stream_id>"}
//! data: {"type":"start-step"}
//! data: {"type":"text-start","id":"text-0"}          (before the first delta)
//! data: {"type":"text-delta","id":"text-0","delta":"你"}   (one grapheme cluster)
//! data: {"type":"text-end","id":"text-0"}
//! data: {"type":"finish-step"}
//! data: {"type":"finish","finishReason":"stop"}      ("length" for max_duration)
//! data: {"type":"abort"}                             (instead of the finish, on cancel)
//! data: {"type":"error","errorText":"<code>: ..."}   (instead of the finish, on failure or shutdown)
//! data: [DONE]
//! : keep-alive
//! ```
//!
//! Exactly one terminal part (`finish`, `abort` or `error`) per stream. A
//! stream cut by `max_duration` is a complete answer that a limit
//! shortened, as a model's `max_tokens` is: `finish` with `length`. A
//! cancel (`POST /v1/ui/chat/{chatId}/stop`) is the user's stop:
//! `abort`. Shutdown is an `error` (code `shutdown`): the answer is
//! incomplete, not the user's doing, and `useChat` then shows its error
//! state so the app can offer to send again. `error` and `abort` leave the
//! text part open, as the SDK's own server does: the text stopped short.

use bytes::{BufMut, BytesMut};

use super::Dialect;
use crate::event::{ErrorCode, Outcome, StreamEvent};
use crate::sse::{push_comment, push_json_string};

/// The response header that tells the SDK which protocol the body speaks.
pub const HEADER: (&str, &str) = ("x-vercel-ai-ui-message-stream", "v1");

/// The id of the one text part of an answer.
const TEXT_ID: &str = "text-0";

/// Renders one stream as UI message chunks.
#[derive(Debug, Default)]
pub struct UiMessageStream {
    /// A `text-start` was sent and no `text-end` yet.
    text_open: bool,
}

impl UiMessageStream {
    /// A renderer for one answer.
    pub fn new() -> Self {
        Self::default()
    }

    fn part(buf: &mut BytesMut, json: &[u8]) {
        buf.put_slice(b"data: ");
        buf.put_slice(json);
        buf.put_slice(b"\n\n");
    }

    fn text_end(&mut self, buf: &mut BytesMut) {
        if std::mem::take(&mut self.text_open) {
            Self::part(buf, b"{\"type\":\"text-end\",\"id\":\"text-0\"}");
        }
    }

    fn finish(&mut self, buf: &mut BytesMut, reason: &str) {
        self.text_end(buf);
        Self::part(buf, b"{\"type\":\"finish-step\"}");
        buf.put_slice(b"data: {\"type\":\"finish\",\"finishReason\":");
        push_json_string(buf, reason);
        buf.put_slice(b"}\n\n");
        Self::done(buf);
    }

    fn error(buf: &mut BytesMut, code: &str, message: &str) {
        buf.put_slice(b"data: {\"type\":\"error\",\"errorText\":");
        push_json_string(buf, &format!("{code}: {message}"));
        buf.put_slice(b"}\n\n");
        Self::done(buf);
    }

    fn done(buf: &mut BytesMut) {
        buf.put_slice(b"data: [DONE]\n\n");
    }
}

impl Dialect for UiMessageStream {
    type Event = StreamEvent;

    fn render(&mut self, event: &StreamEvent, buf: &mut BytesMut) {
        match event {
            StreamEvent::Start { stream_id, .. } => {
                // The stream id: a resume replays the same start, so the
                // SDK keeps one message across reconnects.
                buf.put_slice(b"data: {\"type\":\"start\",\"messageId\":\"");
                buf.put_slice(&stream_id.to_hex());
                buf.put_slice(b"\"}\n\n");
                Self::part(buf, b"{\"type\":\"start-step\"}");
            }
            StreamEvent::Delta { text, .. } => {
                if !self.text_open {
                    self.text_open = true;
                    Self::part(buf, b"{\"type\":\"text-start\",\"id\":\"text-0\"}");
                }
                buf.put_slice(b"data: {\"type\":\"text-delta\",\"id\":\"");
                buf.put_slice(TEXT_ID.as_bytes());
                buf.put_slice(b"\",\"delta\":");
                push_json_string(buf, text);
                buf.put_slice(b"}\n\n");
            }
            StreamEvent::Done { finish_reason, .. } => self.finish(buf, finish_reason.as_str()),
            StreamEvent::Error { code: ErrorCode::MaxDuration, .. } => self.finish(buf, "length"),
            // A `length` finish; the message's metadata says why, where
            // `useChat` shows it (`message.metadata.tokengate`).
            StreamEvent::Error { code: code @ ErrorCode::QuotaExceeded, message, .. } => {
                self.text_end(buf);
                Self::part(buf, b"{\"type\":\"finish-step\"}");
                let finish = serde_json::json!({
                    "type": "finish",
                    "finishReason": "length",
                    "messageMetadata": { "tokengate": super::stop_note(*code, message) },
                });
                buf.put_slice(b"data: ");
                buf.put_slice(finish.to_string().as_bytes());
                buf.put_slice(b"\n\n");
                Self::done(buf);
            }
            StreamEvent::Error { code: ErrorCode::Cancelled, .. } => {
                Self::part(buf, b"{\"type\":\"abort\"}");
                Self::done(buf);
            }
            StreamEvent::Error { code, message, .. } => Self::error(buf, code.as_str(), message),
            StreamEvent::Shutdown { .. } => {
                Self::error(buf, Outcome::Shutdown.as_str(), "the server is shutting down; send the message again");
            }
            StreamEvent::Heartbeat => push_comment(buf, "keep-alive"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{FinishReason, StreamId};

    fn render(events: &[StreamEvent]) -> Vec<serde_json::Value> {
        let mut dialect = UiMessageStream::new();
        let mut buf = BytesMut::new();
        for e in events {
            dialect.render(e, &mut buf);
        }
        let text = String::from_utf8(buf.to_vec()).unwrap_or_default();
        text.split("\n\n")
            .filter_map(|line| line.strip_prefix("data: "))
            .map(
                |d| {
                    if d == "[DONE]" {
                        serde_json::json!("[DONE]")
                    } else {
                        serde_json::from_str(d).unwrap_or_default()
                    }
                },
            )
            .collect()
    }

    #[test]
    fn text_start_precedes_deltas_and_each_ending_has_one_terminal_part() {
        let Some(id) = StreamId::parse("0123456789abcdef0123456789abcdef") else { panic!("a valid id") };
        let start = StreamEvent::Start { stream_id: id, generator: "echo".into() };
        let delta = StreamEvent::Delta { stream_id: id, seq: 1, text: "e\u{301}\r\n".into() };
        let done =
            StreamEvent::Done { stream_id: id, seq: 2, finish_reason: FinishReason::Stop, chars: 1, usage: None };
        let parts = render(&[start.clone(), delta.clone(), done]);
        let types: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap_or("[DONE]")).collect();
        assert_eq!(
            types,
            ["start", "start-step", "text-start", "text-delta", "text-end", "finish-step", "finish", "[DONE]"]
        );
        assert_eq!(parts[3]["delta"], "e\u{301}\r\n");
        assert_eq!(parts[6]["finishReason"], "stop");
        for (code, last) in
            [(ErrorCode::MaxDuration, "finish"), (ErrorCode::Cancelled, "abort"), (ErrorCode::Internal, "error")]
        {
            let end = StreamEvent::Error { stream_id: id, seq: 2, code, message: "m".into() };
            let parts = render(&[start.clone(), delta.clone(), end]);
            let n = parts.len();
            assert_eq!(parts[n - 1], "[DONE]");
            assert_eq!(parts[n - 2]["type"], last, "{code}");
        }
    }
}
