//! What differs for a `kind = "anthropic"` upstream: the Messages request
//! body and the reading of its event stream. The transport, retries,
//! fallbacks, timeouts and cancellation are the OpenAI generator's
//! ([`super::OpenAiGenerator`]), which calls these two.

use serde_json::{Value, json};

use super::{GenerateRequest, Stop, Usage};

/// `max_tokens` sent when the client gave none: Anthropic's API requires
/// one, and the native and OpenAI routes do not.
pub(super) const DEFAULT_MAX_TOKENS: u32 = 4096;

/// The request body for `model`: `system` messages joined into `system`,
/// the rest as the conversation, streaming, with the sampling options
/// Anthropic knows (`max_tokens`, `stop` as `stop_sequences`,
/// `temperature`, `top_p`).
pub(super) fn request_body(model: &str, request: &GenerateRequest) -> Value {
    let system: Vec<&str> =
        request.messages.iter().filter(|m| m.role == "system").map(|m| m.content.as_str()).collect();
    let mut messages: Vec<Value> = request
        .messages
        .iter()
        .filter(|m| m.role != "system")
        .map(|m| json!({ "role": m.role, "content": m.content }))
        .collect();
    if !request.prompt.is_empty() {
        messages.push(json!({ "role": "user", "content": request.prompt }));
    }
    let options = &request.options;
    let mut body = json!({
        "model": model,
        "max_tokens": options.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "messages": messages,
        "stream": true,
    });
    if let Value::Object(map) = &mut body {
        if !system.is_empty() {
            map.insert("system".into(), json!(system.join("\n\n")));
        }
        match &options.stop {
            Some(Stop::One(s)) => {
                map.insert("stop_sequences".into(), json!([s]));
            }
            Some(Stop::Many(list)) => {
                map.insert("stop_sequences".into(), json!(list));
            }
            None => {}
        }
        if let Some(t) = options.temperature {
            map.insert("temperature".into(), json!(t));
        }
        if let Some(p) = options.top_p {
            map.insert("top_p".into(), json!(p));
        }
    }
    body
}

/// What one event of an Anthropic stream says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Read {
    /// Text of a `text_delta`.
    pub(super) text: String,
    /// Usage so far (`message_delta`).
    pub(super) usage: Option<Usage>,
    /// A stop reason arrived: a close after it is the end, not a failure.
    pub(super) finished: bool,
    /// `message_stop`: the stream is complete.
    pub(super) stop: bool,
    /// An `error` event's message.
    pub(super) error: Option<String>,
}

/// Reads one Anthropic stream, event by event, keeping the input tokens of
/// `message_start` for the usage that `message_delta` completes.
#[derive(Debug, Default)]
pub(super) struct Frames {
    input_tokens: u64,
}

impl Frames {
    /// What the event with this `data` says; `None` when it is not JSON.
    /// Events of other kinds (`ping`, block starts and stops, tool input)
    /// say nothing.
    pub(super) fn read(&mut self, data: &str) -> Option<Read> {
        let value: Value = serde_json::from_str(data).ok()?;
        let mut read = Read::default();
        match value.get("type").and_then(Value::as_str).unwrap_or_default() {
            "message_start" => {
                if let Some(n) = value.pointer("/message/usage/input_tokens").and_then(Value::as_u64) {
                    self.input_tokens = n;
                }
            }
            "content_block_delta" if value.pointer("/delta/type").and_then(Value::as_str) == Some("text_delta") => {
                read.text = value.pointer("/delta/text").and_then(Value::as_str).unwrap_or_default().to_owned();
            }
            "message_delta" => {
                if let Some(n) = value.pointer("/usage/input_tokens").and_then(Value::as_u64) {
                    self.input_tokens = n;
                }
                if let Some(out) = value.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    read.usage = Some(Usage {
                        prompt_tokens: self.input_tokens,
                        completion_tokens: out,
                        // Upstream numbers: a sum past u64 saturates instead of panicking
                        // (debug) or wrapping to a small total (release).
                        total_tokens: self.input_tokens.saturating_add(out),
                    });
                }
                read.finished = value.pointer("/delta/stop_reason").is_some_and(|r| !r.is_null());
            }
            "message_stop" => read.stop = true,
            "error" => {
                let message = value.pointer("/error/message").and_then(Value::as_str).unwrap_or("unknown error");
                read.error = Some(message.to_owned());
            }
            _ => {}
        }
        Some(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::{ChatMessage, SamplingOptions};

    #[test]
    fn the_body_moves_system_out_and_renames_stop() {
        let request = GenerateRequest {
            prompt: String::new(),
            messages: vec![
                ChatMessage { role: "system".into(), content: "be brief".into() },
                ChatMessage { role: "user".into(), content: "hi".into() },
            ],
            options: SamplingOptions {
                stop: Some(Stop::One("END".into())),
                temperature: Some(0.5),
                ..SamplingOptions::default()
            },
        };
        let body = request_body("claude", &request);
        assert_eq!(
            body,
            json!({"model": "claude", "max_tokens": DEFAULT_MAX_TOKENS, "stream": true, "system": "be brief",
                   "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["END"], "temperature": 0.5})
        );
    }

    #[test]
    fn frames_give_text_usage_and_the_end() {
        let mut frames = Frames::default();
        let start = r#"{"type":"message_start","message":{"usage":{"input_tokens":5,"output_tokens":1}}}"#;
        assert_eq!(frames.read(start), Some(Read::default()));
        let delta = r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"你"}}"#;
        assert_eq!(frames.read(delta).map(|r| r.text), Some("你".to_owned()));
        let end = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}"#;
        let read = frames.read(end).unwrap_or_default();
        assert!(read.finished);
        assert_eq!(read.usage, Some(Usage { prompt_tokens: 5, completion_tokens: 7, total_tokens: 12 }));
        assert!(frames.read(r#"{"type":"message_stop"}"#).is_some_and(|r| r.stop));
        let error = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(frames.read(error).and_then(|r| r.error), Some("Overloaded".to_owned()));
        assert_eq!(frames.read("not json"), None);
    }

    /// Found by the `upstream_stream` fuzz target (its input is in
    /// `fuzz/corpus/upstream_stream/crash-anthropic-usage-overflow`): token
    /// counts whose sum passes `u64::MAX` overflowed the total.
    #[test]
    fn huge_token_counts_saturate_the_total() {
        let mut frames = Frames::default();
        let start = format!(r#"{{"type":"message_start","message":{{"usage":{{"input_tokens":{}}}}}}}"#, u64::MAX);
        assert_eq!(frames.read(&start), Some(Read::default()));
        let end = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":2}}"#;
        let usage = frames.read(end).and_then(|r| r.usage);
        assert_eq!(usage, Some(Usage { prompt_tokens: u64::MAX, completion_tokens: 2, total_tokens: u64::MAX }));
    }
}
