//! The mock upstream's `llm` mode: a model server's answers, at the least
//! cost per chunk this harness can manage, so that it is not what limits
//! the proxies it feeds.
//!
//! `POST /v1/chat/completions` with `"stream": true` answers a role chunk
//! at once, then one `token_chars`-character token every `every` (one
//! `chat.completion.chunk` each, in the JSON shape and field order OpenAI
//! sends, with `"usage":null` in every chunk when
//! `stream_options.include_usage` is set), `tokens` of them, then the finish
//! chunk, the usage chunk if asked for, and `data: [DONE]`, these three in
//! one write. The text is [`llm_text`] of the last user message, so a
//! client can check every character it gets. (OpenAI also pads each chunk
//! with an `obfuscation` field nowadays; left out.)
//!
//! HTTP/1.1 is spoken by hand (the request head and a `Content-Length`
//! body in; a chunked response out, keep-alive): each token is one
//! pre-built prefix, the token and a pre-built suffix copied into one
//! buffer and written with one `write` call, driven by the stream's own
//! tokio `interval`. With axum and hyper in between, a third of the mock's
//! CPU per token went to the framework (perf: dispatcher, body stream
//! adapters); what is left is the timer, one system call, and the
//! loopback TCP stack, which is most of it. `GET /healthz` answers `ok`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::MissedTickBehavior;

/// The shape of every answer.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Time between tokens.
    pub every: Duration,
    /// Tokens per answer.
    pub tokens: usize,
    /// Characters per token.
    pub token_chars: usize,
}

/// Largest request head or body taken.
const MAX_REQUEST: usize = 1 << 20;

/// The answer the `llm` mode gives to `prompt`: `tokens * token_chars`
/// characters of [`crate::text::generate`] seeded by the prompt (ASCII and
/// CJK, every character one grapheme cluster, nothing that JSON escapes).
pub fn llm_text(prompt: &str, tokens: usize, token_chars: usize) -> String {
    crate::text::generate(tokens * token_chars, fnv(prompt))
}

/// FNV-1a: the same prompt always gets the same answer.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Accepts connections until the process ends.
pub async fn serve(listener: TcpListener, shape: Shape) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                // Without TCP_NODELAY, Nagle holds each small write back
                // until the previous one is acknowledged.
                let _ = tcp.set_nodelay(true);
                tokio::spawn(connection(tcp, shape));
            }
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                eprintln!("mock upstream: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One request, as far as this server reads it.
struct Request {
    method: String,
    path: String,
    close: bool,
    body: BytesMut,
}

/// Reads the next request on `tcp` (`None` at a clean end, or when it is
/// not one this server can read: the connection is then dropped).
async fn read_request(tcp: &mut TcpStream, buf: &mut BytesMut) -> Option<Request> {
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_REQUEST || tcp.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    };
    let head = std::str::from_utf8(&buf[..head_len]).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
    let mut length = 0usize;
    let mut close = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked request bodies: not spoken here (no client of the
            // bench sends one).
            return None;
        }
    }
    if length > MAX_REQUEST {
        return None;
    }
    while buf.len() < head_len + length {
        if tcp.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
    let mut request = buf.split_to(head_len + length);
    let body = request.split_off(head_len);
    Some(Request { method, path, close, body })
}

async fn connection(mut tcp: TcpStream, shape: Shape) {
    let mut buf = BytesMut::with_capacity(4096);
    while let Some(request) = read_request(&mut tcp, &mut buf).await {
        let done = match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/healthz") => tcp.write_all(&plain(200, "OK", "ok")).await,
            ("POST", "/v1/chat/completions") => match serde_json::from_slice::<Value>(&request.body) {
                Ok(body) => answer(&mut tcp, &body, shape).await,
                Err(e) => tcp.write_all(&plain(400, "Bad Request", &e.to_string())).await,
            },
            _ => tcp.write_all(&plain(404, "Not Found", "not found")).await,
        };
        if done.is_err() || request.close {
            return;
        }
    }
}

fn plain(status: u16, reason: &str, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

/// The frames of one answer, built once.
pub(super) struct Frames {
    /// The role chunk.
    pub role: String,
    /// A content chunk up to its `"content":` value.
    pub prefix: String,
    /// A content chunk after its value, through the blank line.
    pub suffix: String,
    /// Finish chunk, usage chunk if asked for, `[DONE]`.
    pub tail: String,
    /// The whole answer's text.
    pub text: String,
}

impl Frames {
    pub fn new(body: &Value, shape: Shape) -> Self {
        let prompt = body["messages"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .unwrap_or("");
        let usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
        let model = Value::from(body["model"].as_str().unwrap_or("gpt-4o-mini"));
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        // An id as OpenAI's look: `chatcmpl-` and 29 characters.
        let id = format!("chatcmpl-B{:028x}", u128::from(created) << 64 | u128::from(fnv(prompt)));
        // The fields in OpenAI's order (a `json!` map would sort them), up
        // to `choices`.
        let open = format!(
            r#"{{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":{model},"service_tier":"default","system_fingerprint":"fp_b1e5c0ffee""#
        );
        let usage_null = if usage { r#","usage":null"# } else { "" };
        let frame = |choices: &str, rest: &str| format!("data: {open},\"choices\":{choices}{rest}}}\n\n");
        let role = frame(
            r#"[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]"#,
            usage_null,
        );
        let prefix = format!("data: {open},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":");
        let suffix = format!("}},\"logprobs\":null,\"finish_reason\":null}}]{usage_null}}}\n\n");
        let mut tail = frame(r#"[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]"#, usage_null);
        if usage {
            let prompt_tokens = prompt.len().div_ceil(4);
            let completion = shape.tokens;
            let total = prompt_tokens + completion;
            tail.push_str(&frame(
                "[]",
                &format!(
                    r#","usage":{{"prompt_tokens":{prompt_tokens},"completion_tokens":{completion},"total_tokens":{total},"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}"#
                ),
            ));
        }
        tail.push_str("data: [DONE]\n\n");
        let text = llm_text(prompt, shape.tokens, shape.token_chars);
        Self { role, prefix, suffix, tail, text }
    }

    /// The content chunk carrying `token`, as one HTTP/1.1 chunk.
    pub fn token(&self, token: &str, out: &mut BytesMut) {
        out.clear();
        // The bench's texts need no escaping; anything else is escaped.
        let plain = token.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
        let escaped = (!plain).then(|| Value::from(token).to_string());
        let value_len = escaped.as_deref().map_or(token.len() + 2, str::len);
        http_chunk_head(self.prefix.len() + value_len + self.suffix.len(), out);
        out.put_slice(self.prefix.as_bytes());
        match escaped {
            Some(v) => out.put_slice(v.as_bytes()),
            None => {
                out.put_u8(b'"');
                out.put_slice(token.as_bytes());
                out.put_u8(b'"');
            }
        }
        out.put_slice(self.suffix.as_bytes());
        out.put_slice(b"\r\n");
    }
}

fn http_chunk_head(len: usize, out: &mut BytesMut) {
    out.put_slice(format!("{len:x}\r\n").as_bytes());
}

fn http_chunk(data: &str, out: &mut BytesMut) {
    http_chunk_head(data.len(), out);
    out.put_slice(data.as_bytes());
    out.put_slice(b"\r\n");
}

/// Streams one answer; `Err` when the client went away.
async fn answer(tcp: &mut TcpStream, body: &Value, shape: Shape) -> std::io::Result<()> {
    let frames = Frames::new(body, shape);
    let mut out = BytesMut::with_capacity(1024);
    out.put_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    http_chunk(&frames.role, &mut out);
    tcp.write_all(&out).await?;
    // The first tick of an interval is immediate: start one period on, so
    // the first token comes `every` after the role chunk. A late tick
    // delays the rest (as a busy model server does) instead of bursting.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + shape.every, shape.every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut rest = frames.text.as_str();
    while !rest.is_empty() {
        ticks.tick().await;
        let len = rest.char_indices().nth(shape.token_chars).map_or(rest.len(), |(i, _)| i);
        let (token, after) = rest.split_at(len);
        frames.token(token, &mut out);
        tcp.write_all(&out).await?;
        rest = after;
    }
    out.clear();
    http_chunk(&frames.tail, &mut out);
    out.put_slice(b"0\r\n\r\n");
    tcp.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One short answer over a real socket, read back as a client does.
    #[tokio::test]
    async fn answer_is_well_formed_and_complete() {
        let Ok(listener) = TcpListener::bind("127.0.0.1:0").await else { return };
        let Ok(addr) = listener.local_addr() else { return };
        let shape = Shape { every: Duration::from_millis(1), tokens: 5, token_chars: 4 };
        tokio::spawn(serve(listener, shape));
        let body = r#"{"model":"gpt-x","messages":[{"role":"user","content":"p1"}],"stream":true,"stream_options":{"include_usage":true}}"#;
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut tcp = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("{e}"));
        tcp.write_all(request.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw)).await;
        assert!(matches!(read, Ok(Ok(_))), "{read:?}");
        let raw = String::from_utf8_lossy(&raw);
        let (head, chunked) = raw.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 200 OK") && head.contains("transfer-encoding: chunked"), "{head}");
        // Undo the chunked encoding.
        let mut sse = String::new();
        let mut rest = chunked;
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap_or_default();
            let size = usize::from_str_radix(size, 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            sse.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        let frames: Vec<&str> = sse.split("\n\n").filter(|f| !f.is_empty()).collect();
        // role, 5 tokens, finish, usage, [DONE]
        assert_eq!(frames.len(), 9, "{sse}");
        let mut content = String::new();
        for f in &frames[..8] {
            let v: Value = serde_json::from_str(f.trim_start_matches("data: ")).unwrap_or_default();
            assert_eq!(v["object"], "chat.completion.chunk", "{f}");
            assert_eq!(v["model"], "gpt-x");
            content.push_str(v.pointer("/choices/0/delta/content").and_then(Value::as_str).unwrap_or(""));
        }
        assert!(frames[0].starts_with(r#"data: {"id":"chatcmpl-"#), "{}", frames[0]);
        assert_eq!(content, llm_text("p1", 5, 4));
        assert_eq!(content.chars().count(), 20);
        assert!(frames[6].contains(r#""finish_reason":"stop""#));
        assert!(frames[7].contains(r#""completion_tokens":5"#));
        assert_eq!(frames[8], "data: [DONE]");
    }

    #[test]
    fn tokens_that_need_escaping_are_escaped() {
        let shape = Shape { every: Duration::from_millis(1), tokens: 1, token_chars: 4 };
        let frames = Frames::new(&serde_json::json!({ "messages": [] }), shape);
        let mut out = BytesMut::new();
        frames.token("a\"\\\n", &mut out);
        let text = String::from_utf8_lossy(&out);
        let (size, chunk) = text.split_once("\r\n").unwrap_or_default();
        assert_eq!(usize::from_str_radix(size, 16).ok(), Some(chunk.len() - 2));
        let v: Value = serde_json::from_str(chunk.trim_end().trim_start_matches("data: ")).unwrap_or_default();
        assert_eq!(v.pointer("/choices/0/delta/content"), Some(&Value::from("a\"\\\n")));
    }
}
