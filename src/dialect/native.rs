//! tokengate's own wire format (DESIGN.md, "Wire format"):
//!
//! ```text
//! retry: 3000
//! id: <stream>.0   event: start   data: {"stream_id":"..","generator":".."}
//! id: <stream>.<n> event: delta   data: {"text":"你"}
//! id: <stream>.<n> event: done    data: {"finish_reason":"stop","chars":n}
//! id: <stream>.<n> event: error   data: {"code":"..","message":".."}
//! retry: 1000      event: shutdown data: {"reason":"..","retry_ms":1000}
//! : keep-alive
//! ```

use bytes::{BufMut, BytesMut};

use super::Dialect;
use crate::event::{ErrorCode, StreamEvent, StreamId};
use crate::sse::{push_comment, push_event, push_json_string, push_retry};

/// Renders the native dialect.
#[derive(Debug, Clone)]
pub struct Native {
    /// `retry:` hint sent first, in milliseconds.
    pub retry_ms: u64,
}

fn push_id(buf: &mut BytesMut, stream_id: StreamId, seq: u64) {
    // The id is hex plus digits: no CR/LF/NUL possible, so written directly.
    buf.put_slice(b"id: ");
    buf.put_slice(&stream_id.to_hex());
    buf.put_u8(b'.');
    crate::sse::push_u64(buf, seq);
    buf.put_u8(b'\n');
}

impl Dialect for Native {
    type Event = StreamEvent;

    fn preamble(&mut self, buf: &mut BytesMut) {
        push_retry(buf, self.retry_ms);
    }

    fn render(&mut self, event: &StreamEvent, buf: &mut BytesMut) {
        match event {
            StreamEvent::Delta { stream_id, seq, text } => {
                // Hot path: one per character. Pre-shaped, no serializer.
                push_id(buf, *stream_id, *seq);
                buf.put_slice(b"event: delta\ndata: {\"text\":");
                push_json_string(buf, text);
                buf.put_slice(b"}\n\n");
            }
            StreamEvent::Start { stream_id, generator } => {
                // Once per stream, but every stream: pre-shaped like a
                // delta, in the order serde_json's sorted map writes it.
                push_id(buf, *stream_id, 0);
                buf.put_slice(b"event: start\ndata: {\"generator\":");
                push_json_string(buf, generator);
                buf.put_slice(b",\"stream_id\":\"");
                buf.put_slice(&stream_id.to_hex());
                buf.put_slice(b"\"}\n\n");
            }
            StreamEvent::Done { stream_id, seq, finish_reason, chars, usage: None } => {
                push_id(buf, *stream_id, *seq);
                buf.put_slice(b"event: done\ndata: {\"chars\":");
                crate::sse::push_u64(buf, *chars);
                buf.put_slice(b",\"finish_reason\":");
                push_json_string(buf, finish_reason.as_str());
                buf.put_slice(b"}\n\n");
            }
            StreamEvent::Done { stream_id, seq, finish_reason, chars, usage } => {
                let mut data = serde_json::json!({ "finish_reason": finish_reason.as_str(), "chars": chars });
                if let (Some(usage), Some(map)) = (usage, data.as_object_mut()) {
                    map.insert("usage".into(), serde_json::json!(usage));
                }
                push_id(buf, *stream_id, *seq);
                push_event(buf, None, Some("done"), &data.to_string());
            }
            StreamEvent::Error { stream_id, seq, code, message } => {
                let data = serde_json::json!({ "code": code, "message": message });
                if *code == ErrorCode::ResumeGap {
                    // Not a position: reconnecting with it answers 204, so
                    // EventSource stops rather than skipping the gap.
                    buf.put_slice(b"id: ");
                    buf.put_slice(&stream_id.to_hex());
                    buf.put_slice(b".gap\n");
                } else if *code == ErrorCode::TokenExpired {
                    // The connection's end, not the stream's: no id, so
                    // EventSource's Last-Event-ID stays at the last event
                    // delivered, which the reconnect resumes from.
                } else {
                    push_id(buf, *stream_id, *seq);
                }
                push_event(buf, None, Some("error"), &data.to_string());
            }
            StreamEvent::Shutdown { retry_ms } => {
                push_retry(buf, *retry_ms);
                let data = serde_json::json!({ "reason": "server shutting down", "retry_ms": retry_ms });
                push_event(buf, None, Some("shutdown"), &data.to_string());
            }
            StreamEvent::Heartbeat => push_comment(buf, "keep-alive"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::FinishReason;

    fn rendered(event: &StreamEvent) -> String {
        let mut buf = BytesMut::new();
        Native { retry_ms: 1000 }.render(event, &mut buf);
        String::from_utf8(buf.to_vec()).unwrap_or_default()
    }

    /// What the serializer writes, for the pre-shaped events to match.
    fn serialized(stream_id: StreamId, seq: u64, event: &str, data: serde_json::Value) -> String {
        let mut buf = BytesMut::new();
        push_id(&mut buf, stream_id, seq);
        push_event(&mut buf, None, Some(event), &data.to_string());
        String::from_utf8(buf.to_vec()).unwrap_or_default()
    }

    #[test]
    fn start_and_done_are_written_as_the_serializer_would() {
        let id = StreamId::random().unwrap_or_else(|e| panic!("{e}"));
        for generator in ["demo", "openai", "my \"model\" \\ é 你\n\t\u{1}"] {
            let start = StreamEvent::Start { stream_id: id, generator: generator.into() };
            let expected =
                serialized(id, 0, "start", serde_json::json!({ "stream_id": id.to_string(), "generator": generator }));
            assert_eq!(rendered(&start), expected);
        }
        for chars in [0, 8, u64::MAX] {
            let done = StreamEvent::Done {
                stream_id: id,
                seq: chars / 2,
                finish_reason: FinishReason::Stop,
                chars,
                usage: None,
            };
            let expected = serialized(
                id,
                chars / 2,
                "done",
                serde_json::json!({ "finish_reason": FinishReason::Stop.as_str(), "chars": chars }),
            );
            assert_eq!(rendered(&done), expected);
        }
    }
}
