//! The OpenAI Responses API streaming dialect (`POST /v1/responses` with
//! `stream: true`, and `GET /v1/responses/{id}?stream=true`). Every event
//! is `event: <type>` with a `data` object carrying the same `type` and a
//! strictly increasing `sequence_number`, in the order openai-python's
//! `ResponseStreamState` requires:
//!
//! ```text
//! response.created, response.in_progress              (from the stream's start)
//! response.output_item.added, response.content_part.added
//! response.output_text.delta ...                      (N grapheme clusters each, 1 by default)
//! response.output_text.done, response.content_part.done, response.output_item.done
//! response.completed                                  (the whole response, with usage)
//! ```
//!
//! A stream cut by a limit (`max_duration`) ends with `response.incomplete`,
//! any other failure with `response.failed` (the tokengate code in
//! `response.error.code`), a server shutdown with an `error` event (code
//! `shutdown`). There is no `[DONE]`.
//!
//! Sequence numbers are a function of the stream log alone (a replay from the
//! start numbers every event as the first delivery did), which is what lets
//! `starting_after=N` skip exactly what a client already has.

use bytes::{BufMut, BytesMut};
use serde_json::{Value, json};

use super::Dialect;
use crate::event::{ErrorCode, Outcome, StreamEvent, StreamId, Usage};
use crate::sse::{push_comment, push_event, push_json_string, push_u64};

/// The `resp_...` id of the response a stream serves.
pub fn response_id(stream_id: StreamId) -> String {
    format!("resp_{stream_id}")
}

/// The stream a `resp_...` id names.
pub fn stream_of(response_id: &str) -> Option<StreamId> {
    StreamId::parse(response_id.strip_prefix("resp_")?)
}

/// How a response stands, in the Responses API's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Still generating.
    InProgress,
    /// The generator finished.
    Completed,
    /// Cut short by a limit (`incomplete_details.reason` says which).
    Incomplete(ErrorCode),
    /// Cancelled with `POST /v1/responses/{id}/cancel` (or `DELETE` on the stream).
    Cancelled,
    /// Failed; `error.code` is the tokengate code.
    Failed(ErrorCode),
}

impl Status {
    /// The status an error code ends a response with.
    pub fn of_error(code: ErrorCode) -> Self {
        match code {
            // Limits on how much is generated: the response is cut short,
            // `incomplete_details.reason` names which.
            ErrorCode::MaxDuration | ErrorCode::QuotaExceeded => Status::Incomplete(code),
            ErrorCode::Cancelled => Status::Cancelled,
            other => Status::Failed(other),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Incomplete(_) => "incomplete",
            // The Responses API's word is tokengate's code.
            Status::Cancelled => ErrorCode::Cancelled.as_str(),
            Status::Failed(_) => "failed",
        }
    }
}

/// Everything a response object says, gathered from a stream's events.
#[derive(Debug, Clone)]
pub struct ResponseState {
    /// `resp_...`.
    pub id: String,
    /// The `model` asked for (the generator's name).
    pub model: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The text so far.
    pub text: String,
    /// Grapheme clusters so far.
    pub chars: u64,
    /// Usage an upstream reported.
    pub usage: Option<Usage>,
    /// Where it stands.
    pub status: Status,
    /// The failure's message, for `Failed` and `Incomplete`.
    pub message: Option<String>,
}

impl ResponseState {
    /// A response that has just started.
    pub fn new(stream_id: StreamId, model: String, created_at: u64) -> Self {
        Self {
            id: response_id(stream_id),
            model,
            created_at,
            text: String::new(),
            chars: 0,
            usage: None,
            status: Status::InProgress,
            message: None,
        }
    }

    /// Takes one event into the state (what a non-streaming answer does
    /// with every event of the stream).
    pub fn apply(&mut self, event: &StreamEvent) {
        match event {
            StreamEvent::Start { generator, .. } if self.model.is_empty() => self.model = generator.clone(),
            StreamEvent::Delta { text, .. } => {
                self.text.push_str(text);
                self.chars += 1;
            }
            StreamEvent::Done { usage, .. } => {
                self.usage = *usage;
                self.status = Status::Completed;
            }
            StreamEvent::Error { code, message, .. } => {
                self.status = Status::of_error(*code);
                self.message = Some(message.clone());
            }
            _ => {}
        }
    }

    fn item_id(&self) -> String {
        format!("msg_{}", self.id.trim_start_matches("resp_"))
    }

    fn part(&self) -> Value {
        json!({ "type": "output_text", "text": self.text, "annotations": [], "logprobs": [] })
    }

    /// The message output item.
    fn item(&self) -> Value {
        let status = match self.status {
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            _ => "incomplete",
        };
        json!({
            "id": self.item_id(),
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [self.part()],
        })
    }

    /// The response object, as `GET /v1/responses/{id}` and the lifecycle
    /// events carry it.
    pub fn object(&self) -> Value {
        let output = match self.status {
            Status::InProgress if self.text.is_empty() => json!([]),
            _ => json!([self.item()]),
        };
        let usage = match self.status {
            Status::InProgress => Value::Null,
            _ => {
                let (input, output) = self.usage.map_or((0, self.chars), |u| (u.prompt_tokens, u.completion_tokens));
                json!({
                    "input_tokens": input,
                    "input_tokens_details": { "cached_tokens": 0 },
                    "output_tokens": output,
                    "output_tokens_details": { "reasoning_tokens": 0 },
                    // Upstream numbers: saturate rather than overflow.
                    "total_tokens": input.saturating_add(output),
                })
            }
        };
        let error = match (self.status, &self.message) {
            (Status::Failed(code), message) => {
                json!({ "code": code.as_str(), "message": message.clone().unwrap_or_default() })
            }
            _ => Value::Null,
        };
        let incomplete = match self.status {
            Status::Incomplete(code) => json!({ "reason": code.as_str() }),
            _ => Value::Null,
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "model": self.model,
            "status": self.status.as_str(),
            "output": output,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": null,
            "metadata": {},
            "parallel_tool_calls": false,
            "temperature": null,
            "top_p": null,
            "tool_choice": "none",
            "tools": [],
            "usage": usage,
        })
    }
}

/// Renders one stream as Responses API events.
#[derive(Debug)]
pub struct Responses {
    state: ResponseState,
    /// `event: response.output_text.delta\ndata: {"type":..,"item_id":..,..,"delta":`
    delta_prefix: Vec<u8>,
    per_chunk: usize,
    pending: String,
    pending_count: usize,
    /// The next event's `sequence_number`.
    seq: u64,
    /// Events up to this sequence number are not sent (`starting_after`).
    skip_through: Option<u64>,
    ended: bool,
}

impl Responses {
    /// A renderer for the response of `stream_id`, `per_chunk` grapheme
    /// clusters per delta, skipping events numbered up to `starting_after`.
    pub fn new(state: ResponseState, per_chunk: usize, starting_after: Option<u64>) -> Self {
        let mut delta_prefix = BytesMut::new();
        delta_prefix.put_slice(
            b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":",
        );
        push_json_string(&mut delta_prefix, &state.item_id());
        delta_prefix.put_slice(b",\"output_index\":0,\"content_index\":0,\"delta\":");
        Self {
            state,
            delta_prefix: delta_prefix.to_vec(),
            per_chunk: per_chunk.max(1),
            pending: String::new(),
            pending_count: 0,
            seq: 0,
            skip_through: starting_after,
            ended: false,
        }
    }

    /// Takes the next sequence number; whether that event is to be sent.
    fn next(&mut self) -> (u64, bool) {
        let seq = self.seq;
        self.seq += 1;
        (seq, self.skip_through.is_none_or(|after| seq > after))
    }

    /// One event with its `type` and `sequence_number` added to `body`.
    fn event(&mut self, buf: &mut BytesMut, kind: &str, mut body: Value) {
        let (seq, send) = self.next();
        if !send {
            return;
        }
        if let Value::Object(map) = &mut body {
            map.insert("type".into(), json!(kind));
            map.insert("sequence_number".into(), json!(seq));
        }
        push_event(buf, None, Some(kind), &body.to_string());
    }

    fn flush(&mut self, buf: &mut BytesMut) {
        if self.pending_count == 0 {
            return;
        }
        let (seq, send) = self.next();
        if send {
            // Hot path: pre-shaped, no serializer.
            buf.put_slice(&self.delta_prefix);
            push_json_string(buf, &self.pending);
            buf.put_slice(b",\"logprobs\":[],\"sequence_number\":");
            push_u64(buf, seq);
            buf.put_slice(b"}\n\n");
        }
        self.pending.clear();
        self.pending_count = 0;
    }

    /// The three `*.done` events that close the message before `response.completed`.
    fn close_message(&mut self, buf: &mut BytesMut) {
        let item_id = self.state.item_id();
        let text = self.state.text.clone();
        let part = self.state.part();
        let item = self.state.item();
        let at = json!({ "item_id": item_id, "output_index": 0, "content_index": 0 });
        let mut done = at.clone();
        if let Value::Object(map) = &mut done {
            map.insert("text".into(), json!(text));
            map.insert("logprobs".into(), json!([]));
        }
        self.event(buf, "response.output_text.done", done);
        let mut part_done = at;
        if let Value::Object(map) = &mut part_done {
            map.insert("part".into(), part);
        }
        self.event(buf, "response.content_part.done", part_done);
        self.event(buf, "response.output_item.done", json!({ "output_index": 0, "item": item }));
    }
}

impl Dialect for Responses {
    type Event = StreamEvent;

    fn render(&mut self, event: &StreamEvent, buf: &mut BytesMut) {
        if self.ended {
            return;
        }
        match event {
            StreamEvent::Start { .. } => {
                self.state.apply(event);
                let response = self.state.object();
                self.event(buf, "response.created", json!({ "response": response }));
                self.event(buf, "response.in_progress", json!({ "response": response }));
                let mut item = self.state.item();
                if let Value::Object(map) = &mut item {
                    map.insert("content".into(), json!([]));
                }
                self.event(buf, "response.output_item.added", json!({ "output_index": 0, "item": item }));
                let part = json!({ "type": "output_text", "text": "", "annotations": [], "logprobs": [] });
                let added =
                    json!({ "item_id": self.state.item_id(), "output_index": 0, "content_index": 0, "part": part });
                self.event(buf, "response.content_part.added", added);
            }
            StreamEvent::Delta { text, .. } => {
                self.state.apply(event);
                self.pending.push_str(text);
                self.pending_count += 1;
                if self.pending_count >= self.per_chunk {
                    self.flush(buf);
                }
            }
            StreamEvent::Done { .. } => {
                self.flush(buf);
                self.state.apply(event);
                self.close_message(buf);
                let response = self.state.object();
                self.event(buf, "response.completed", json!({ "response": response }));
                self.ended = true;
            }
            // The connection's end, not the response's: like a shutdown,
            // an `error` event, and the response stays as it is (resume it
            // with fresh credentials and `starting_after`).
            StreamEvent::Error { code: code @ ErrorCode::TokenExpired, message, .. } => {
                self.flush(buf);
                self.event(buf, "error", json!({ "code": code.as_str(), "message": message, "param": null }));
                self.ended = true;
            }
            StreamEvent::Error { .. } => {
                self.flush(buf);
                self.state.apply(event);
                let kind = match self.state.status {
                    Status::Incomplete(_) => "response.incomplete",
                    _ => "response.failed",
                };
                let response = self.state.object();
                self.event(buf, kind, json!({ "response": response }));
                self.ended = true;
            }
            StreamEvent::Shutdown { retry_ms } => {
                self.flush(buf);
                let message = format!(
                    "the server is shutting down; resume with GET /v1/responses/{}?stream=true after {retry_ms} ms",
                    self.state.id
                );
                let error = json!({ "code": Outcome::Shutdown.as_str(), "message": message, "param": null });
                self.event(buf, "error", error);
                self.ended = true;
            }
            StreamEvent::Heartbeat => push_comment(buf, "keep-alive"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::FinishReason;
    use crate::sse::{Event, Parser};

    fn id() -> StreamId {
        StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!())
    }

    fn render(events: &[StreamEvent], starting_after: Option<u64>) -> Vec<(String, Value)> {
        let mut dialect = Responses::new(ResponseState::new(id(), "echo".into(), 1), 1, starting_after);
        let mut buf = BytesMut::new();
        for event in events {
            dialect.render(event, &mut buf);
        }
        Parser::new()
            .feed(&buf)
            .into_iter()
            .filter_map(|e| match e {
                Event::Message { event, data, .. } => Some((event, serde_json::from_str(&data).unwrap_or_default())),
                _ => None,
            })
            .collect()
    }

    fn stream(texts: &[&str], end: StreamEvent) -> Vec<StreamEvent> {
        let mut events = vec![StreamEvent::Start { stream_id: id(), generator: "echo".into() }];
        for (i, t) in texts.iter().enumerate() {
            events.push(StreamEvent::Delta { stream_id: id(), seq: i as u64 + 1, text: (*t).into() });
        }
        events.push(end);
        events
    }

    /// The Anthropic overflow the `upstream_stream` fuzz target found has a
    /// twin here: an upstream's usage whose sum passes `u64::MAX`.
    #[test]
    fn huge_upstream_usage_saturates_the_total() {
        let mut state = ResponseState::new(id(), "echo".into(), 1);
        let usage = Usage { prompt_tokens: u64::MAX, completion_tokens: 3, total_tokens: 0 };
        state.apply(&StreamEvent::Done {
            stream_id: id(),
            seq: 1,
            finish_reason: FinishReason::Stop,
            chars: 0,
            usage: Some(usage),
        });
        assert_eq!(state.object()["usage"]["total_tokens"], u64::MAX);
    }

    #[test]
    fn a_finished_stream_has_the_order_the_sdk_requires() {
        let done =
            StreamEvent::Done { stream_id: id(), seq: 3, finish_reason: FinishReason::Stop, chars: 2, usage: None };
        let events = render(&stream(&["你", "👩‍👩‍👧"], done), None);
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, (kind, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], kind.as_str());
            assert_eq!(data["sequence_number"], i as u64);
        }
        assert_eq!(events[6].1["text"], "你👩‍👩‍👧");
        let completed = &events[9].1["response"];
        assert_eq!(completed["status"], "completed");
        assert_eq!(completed["id"], response_id(id()));
        assert_eq!(completed["output"][0]["content"][0]["text"], "你👩‍👩‍👧");
        assert_eq!(completed["usage"]["output_tokens"], 2);
    }

    #[test]
    fn starting_after_skips_exactly_what_was_delivered() {
        let done =
            StreamEvent::Done { stream_id: id(), seq: 4, finish_reason: FinishReason::Stop, chars: 3, usage: None };
        let all = render(&stream(&["a", "b", "c"], done.clone()), None);
        let rest = render(&stream(&["a", "b", "c"], done), Some(4));
        assert_eq!(rest.len(), all.len() - 5);
        assert_eq!(rest[0].1["sequence_number"], 5);
        assert_eq!(rest[0].1["delta"], "b");
    }

    #[test]
    fn every_ending_is_one_terminal_event() {
        let error = |code| StreamEvent::Error { stream_id: id(), seq: 2, code, message: "m".into() };
        for (end, terminal) in [
            (error(ErrorCode::MaxDuration), "response.incomplete"),
            (error(ErrorCode::UpstreamRateLimited), "response.failed"),
            (error(ErrorCode::Cancelled), "response.failed"),
            (error(ErrorCode::SlowConsumer), "response.failed"),
            (StreamEvent::Shutdown { retry_ms: 1000 }, "error"),
        ] {
            let mut events = stream(&["x"], end);
            // Nothing after a terminal event is rendered.
            events.push(StreamEvent::Heartbeat);
            let rendered = render(&events, None);
            let last = rendered.last().map(|(k, _)| k.as_str());
            assert_eq!(last, Some(terminal));
            let terminals = rendered
                .iter()
                .filter(|(k, _)| {
                    matches!(k.as_str(), "response.completed" | "response.failed" | "response.incomplete" | "error")
                })
                .count();
            assert_eq!(terminals, 1);
        }
        let failed = render(&stream(&["x"], error(ErrorCode::UpstreamRateLimited)), None);
        let response = &failed.last().map(|(_, d)| d.clone()).unwrap_or_default()["response"];
        assert_eq!(response["error"]["code"], "upstream_rate_limited");
        assert_eq!(response["output"][0]["content"][0]["text"], "x");
        let cut = render(&stream(&["x"], error(ErrorCode::MaxDuration)), None);
        let response = &cut.last().map(|(_, d)| d.clone()).unwrap_or_default()["response"];
        assert_eq!(response["incomplete_details"]["reason"], "max_duration");
    }
}
