//! The OpenAI chat completions streaming dialect: `chat.completion.chunk`
//! objects as `data:` lines, the first carrying `role`, then `content` (N
//! grapheme clusters per chunk, 1 by default), one with `finish_reason`,
//! the usage chunk when asked for, and `data: [DONE]`. Errors mid-stream
//! are `data: {"error": {...}}`, which the official SDKs raise; a stream
//! cut by the subject's quota ends like one cut by `max_tokens`, with
//! `finish_reason: "length"`, and says why in the chunk's `tokengate`
//! member (`code`, `message`), which the SDKs keep as an extra field.

use bytes::{BufMut, BytesMut};
use serde_json::json;

use super::Dialect;
use crate::event::{ErrorCode, Outcome, StreamEvent};
use crate::sse::{push_comment, push_json_string};

/// Renders one stream as chat completion chunks.
#[derive(Debug)]
pub struct OpenAiChunks {
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[{"index":0,"delta":`
    prefix: Vec<u8>,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    per_chunk: usize,
    pending: String,
    pending_count: usize,
    /// Deltas rendered, for the usage chunk of a stream cut short.
    delivered: u64,
}

impl OpenAiChunks {
    /// A renderer for completion `id` of `model`.
    pub fn new(id: String, created: u64, model: String, include_usage: bool, per_chunk: usize) -> Self {
        let mut prefix = BytesMut::new();
        prefix.put_slice(b"data: {\"id\":");
        push_json_string(&mut prefix, &id);
        prefix.put_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        crate::sse::push_u64(&mut prefix, created);
        prefix.put_slice(b",\"model\":");
        push_json_string(&mut prefix, &model);
        prefix.put_slice(b",\"choices\":[{\"index\":0,\"delta\":");
        Self {
            prefix: prefix.to_vec(),
            id,
            created,
            model,
            include_usage,
            per_chunk: per_chunk.max(1),
            pending: String::new(),
            pending_count: 0,
            delivered: 0,
        }
    }

    fn flush(&mut self, buf: &mut BytesMut) {
        if self.pending_count == 0 {
            return;
        }
        buf.put_slice(&self.prefix);
        buf.put_slice(b"{\"content\":");
        push_json_string(buf, &self.pending);
        buf.put_slice(b"},\"finish_reason\":null}]}\n\n");
        self.pending.clear();
        self.pending_count = 0;
    }

    fn data(buf: &mut BytesMut, value: &serde_json::Value) {
        buf.put_slice(b"data: ");
        buf.put_slice(value.to_string().as_bytes());
        buf.put_slice(b"\n\n");
    }

    /// The usage chunk, when the client asked for one.
    fn usage(&self, buf: &mut BytesMut, usage: serde_json::Value) {
        if self.include_usage {
            let chunk = json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": usage,
            });
            Self::data(buf, &chunk);
        }
    }

    /// Characters as tokens, for streams whose generator counts none.
    fn char_usage(chars: u64) -> serde_json::Value {
        json!({ "prompt_tokens": 0, "completion_tokens": chars, "total_tokens": chars })
    }

    /// The end of a stream the quota cut: a `length` finish that says why.
    fn quota_end(&mut self, buf: &mut BytesMut, message: &str) {
        self.flush(buf);
        let chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{ "index": 0, "delta": {}, "finish_reason": "length" }],
            "tokengate": super::stop_note(ErrorCode::QuotaExceeded, message),
        });
        Self::data(buf, &chunk);
        self.usage(buf, Self::char_usage(self.delivered));
        buf.put_slice(b"data: [DONE]\n\n");
    }

    fn error(buf: &mut BytesMut, code: &str, message: &str) {
        Self::data(
            buf,
            &json!({ "error": { "message": message, "type": "server_error", "code": code, "param": null } }),
        );
    }
}

impl Dialect for OpenAiChunks {
    type Event = StreamEvent;

    fn render(&mut self, event: &StreamEvent, buf: &mut BytesMut) {
        match event {
            StreamEvent::Start { .. } => {
                buf.put_slice(&self.prefix);
                buf.put_slice(b"{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n");
            }
            StreamEvent::Delta { text, .. } => {
                self.pending.push_str(text);
                self.pending_count += 1;
                self.delivered += 1;
                if self.pending_count >= self.per_chunk {
                    self.flush(buf);
                }
            }
            StreamEvent::Done { chars, usage, finish_reason, .. } => {
                self.flush(buf);
                buf.put_slice(&self.prefix);
                buf.put_slice(b"{},\"finish_reason\":");
                push_json_string(buf, finish_reason.as_str());
                buf.put_slice(b"}]}\n\n");
                // Built-in generators count no tokens; report characters.
                self.usage(buf, usage.map_or_else(|| Self::char_usage(*chars), |u| json!(u)));
                buf.put_slice(b"data: [DONE]\n\n");
            }
            StreamEvent::Error { code: ErrorCode::QuotaExceeded, message, .. } => self.quota_end(buf, message),
            StreamEvent::Error { code, message, .. } => {
                self.flush(buf);
                Self::error(buf, code.as_str(), message);
            }
            StreamEvent::Shutdown { .. } => {
                self.flush(buf);
                Self::error(buf, Outcome::Shutdown.as_str(), "the server is shutting down; retry the request");
            }
            StreamEvent::Heartbeat => push_comment(buf, "keep-alive"),
        }
    }
}
