//! `openai`: streams from any OpenAI-compatible chat completions server
//! (OpenAI, vLLM, llama.cpp server, Ollama's `/v1`, LM Studio, ...).
//!
//! The upstream's SSE is parsed with the crate's spec parser (lines and
//! UTF-8 sequences cut across network reads, comments, `data: [DONE]`,
//! error objects), and only text is handed on: the engine re-chunks it into
//! grapheme clusters like any generator's. Before the first byte, failures
//! are retried (bounded, with backoff) and then the next fallback upstream
//! is tried; after it, a failure ends the stream with an `error` whose code
//! says what happened. Dropping the stream drops the HTTP request, so an
//! upstream stops generating (and billing) as soon as nobody reads.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use reqwest::StatusCode;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, sleep_until, timeout_at};

use super::http1::{self, SendFailure};
use super::upstream::Upstream;
use super::{Chunk, GenerateRequest, Generator, GeneratorError, TextStream, Usage};
use crate::sse::{EventRef, Parser};

/// One upstream plus its fallbacks, as one generator.
#[derive(Debug, Clone)]
pub struct OpenAiGenerator {
    chain: Vec<(Arc<Upstream>, Transport)>,
    description: String,
}

fn upstream_error(code: &'static str, message: impl Into<String>) -> GeneratorError {
    // TEMPORARY until the generator split lands: the literals become ErrorCode variants.
    GeneratorError::Upstream {
        code: crate::event::ErrorCode::parse(code).unwrap_or(crate::event::ErrorCode::UpstreamError),
        message: message.into(),
    }
}

/// Most upstream bytes gathered into one chunk of text.
const MAX_READY_BYTES: usize = 256 * 1024;

/// What ended an upstream stream, in band.
#[derive(Debug, PartialEq)]
enum End {
    /// `data: [DONE]`.
    Done,
    /// A frame that is not JSON.
    Malformed,
    /// An error object, with its message.
    Error(String),
}

/// What a run of upstream bytes carried: all its text, the usage report,
/// and what ended the stream, if anything (frames after that are ignored).
#[derive(Debug, Default)]
struct Absorbed {
    text: String,
    finished: bool,
    usage: Option<Usage>,
    end: Option<End>,
}

impl Absorbed {
    /// Parses `bytes` (frames borrowed from the parser: no allocation per
    /// frame) and takes in what they say.
    fn absorb(&mut self, parser: &mut Parser, bytes: &[u8]) {
        parser.feed_with(bytes, |item| {
            if self.end.is_some() {
                return;
            }
            let EventRef::Message { data, .. } = item else { return };
            if data.trim() == "[DONE]" {
                self.end = Some(End::Done);
                return;
            }
            let Some(frame) = Frame::parse(data) else {
                self.end = Some(End::Malformed);
                return;
            };
            self.text.push_str(&frame.text);
            self.finished |= frame.finished;
            if frame.usage.is_some() {
                self.usage = frame.usage;
            }
            if let Some(message) = frame.error {
                self.end = Some(End::Error(message));
            }
        });
    }
}

/// What the gateway takes from one upstream `chat.completion.chunk`.
#[derive(Debug, Default, PartialEq)]
struct Frame<'a> {
    text: Cow<'a, str>,
    finished: bool,
    usage: Option<Usage>,
    error: Option<String>,
}

/// The fields of a chunk that matter, typed and borrowed: one pass over the
/// JSON with no tree built (the hot path of proxying, once per upstream
/// frame). Unknown fields are skipped.
#[derive(Deserialize)]
struct WireChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<WireChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<WireDelta<'a>>,
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct WireDelta<'a> {
    #[serde(default, borrow)]
    content: Option<WireText<'a>>,
}

/// serde borrows a `Cow<str>` only as a field of its own, not inside an
/// `Option`: this newtype makes text without escapes a borrow.
#[derive(Deserialize)]
struct WireText<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'a> Frame<'a> {
    /// `None` when `data` is not JSON. A chunk of an unexpected shape is
    /// read leniently (a missing or odd field is no text), as before typed
    /// parsing existed.
    fn parse(data: &'a str) -> Option<Self> {
        if let Ok(chunk) = serde_json::from_str::<WireChunk<'a>>(data) {
            let mut frame = Frame { usage: chunk.usage, ..Frame::default() };
            if let Some(error) = chunk.error {
                frame.error = Some(error_message(&error));
            }
            if let Some(choice) = chunk.choices.into_iter().next() {
                frame.finished = choice.finish_reason.is_some();
                if let Some(WireText(content)) = choice.delta.and_then(|d| d.content) {
                    frame.text = content;
                }
            }
            return Some(frame);
        }
        let value: Value = serde_json::from_str(data).ok()?;
        let mut frame = Frame::default();
        if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
            frame.error = Some(error_message(error));
            return Some(frame);
        }
        let choice = value.get("choices").and_then(|c| c.get(0));
        let text = choice.and_then(|c| c.pointer("/delta/content")).and_then(Value::as_str).unwrap_or("");
        frame.text = Cow::Owned(text.to_owned());
        frame.finished = choice.and_then(|c| c.get("finish_reason")).is_some_and(|r| !r.is_null());
        frame.usage =
            value.get("usage").filter(|u| !u.is_null()).and_then(|u| serde_json::from_value::<Usage>(u.clone()).ok());
        Some(frame)
    }
}

fn error_message(error: &Value) -> String {
    error.get("message").and_then(Value::as_str).unwrap_or("unknown error").to_owned()
}

/// A pre-first-byte failure, and whether retrying the same upstream may help.
struct Attempt {
    error: GeneratorError,
    retry: bool,
}

impl OpenAiGenerator {
    /// A generator for `primary`, falling back to `fallbacks` in order.
    pub fn new(primary: Arc<Upstream>, fallbacks: Vec<Arc<Upstream>>) -> Result<Self, reqwest::Error> {
        let description = format!("OpenAI-compatible upstream `{}` (model {})", primary.name, primary.model);
        let chain = std::iter::once(primary)
            .chain(fallbacks)
            .map(|u| {
                let transport = Transport::for_upstream(&u)?;
                Ok((u, transport))
            })
            .collect::<Result<_, reqwest::Error>>()?;
        Ok(Self { chain, description })
    }
}

fn messages_for(request: &GenerateRequest) -> Vec<Value> {
    let mut messages: Vec<Value> =
        request.messages.iter().map(|m| json!({ "role": m.role, "content": m.content })).collect();
    if !request.prompt.is_empty() {
        messages.push(json!({ "role": "user", "content": request.prompt }));
    }
    messages
}

/// How requests reach one upstream.
#[derive(Debug, Clone)]
enum Transport {
    /// Plain `http://`: hyper driven by the task reading the body (see
    /// [`http1`]), so a burst of frames is taken in one go.
    Driven,
    /// `https://`: reqwest, with its connection pool, TLS and proxy support.
    Pooled(reqwest::Client),
}

impl Transport {
    fn for_upstream(upstream: &Upstream) -> Result<Self, reqwest::Error> {
        if !upstream.pooled && http1::serves(&upstream.url) {
            return Ok(Transport::Driven);
        }
        Ok(Transport::Pooled(reqwest::Client::builder().connect_timeout(upstream.connect_timeout).build()?))
    }
}

/// An upstream response body, as the pieces it arrives in.
type Pieces = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// A response head and its body.
struct Head {
    status: StatusCode,
    retry_after: Option<String>,
    body: Pieces,
}

async fn send(upstream: &Upstream, transport: &Transport, body: &Value) -> Result<Head, SendFailure> {
    let key = upstream.api_key.as_ref().map(|k| k.expose());
    match transport {
        Transport::Driven => {
            let json = Bytes::from(serde_json::to_vec(body).map_err(|_| SendFailure::Disconnected)?);
            let (parts, body) =
                http1::post_json(&upstream.url, &upstream.headers, key, json, upstream.connect_timeout).await?;
            Ok(Head {
                status: parts.status,
                retry_after: retry_after(&parts.headers),
                body: Box::pin(body.map(|piece| piece.map_err(|e| e.to_string()))),
            })
        }
        Transport::Pooled(client) => {
            let mut req = client.post(&upstream.url).headers(upstream.headers.clone()).json(body);
            if let Some(key) = key {
                req = req.bearer_auth(String::from_utf8_lossy(key));
            }
            let response = req.send().await.map_err(|e| {
                if e.is_timeout() {
                    SendFailure::ConnectTimeout
                } else if e.is_connect() {
                    SendFailure::ConnectFailed
                } else {
                    SendFailure::Disconnected
                }
            })?;
            Ok(Head {
                status: response.status(),
                retry_after: retry_after(response.headers()),
                body: Box::pin(response.bytes_stream().map(|piece| piece.map_err(|e| e.to_string()))),
            })
        }
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<String> {
    headers.get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// The start of an error body, as text (bounded in size; the caller bounds
/// the time).
async fn error_text(mut body: Pieces) -> String {
    let mut text = Vec::new();
    while let Some(Ok(piece)) = body.next().await {
        text.extend_from_slice(&piece);
        if text.len() > 64 * 1024 {
            break;
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

async fn start(upstream: &Upstream, transport: &Transport, body: &Value, deadline: Instant) -> Result<Pieces, Attempt> {
    let head_deadline = deadline.min(Instant::now() + upstream.first_byte_timeout);
    let response = match timeout_at(head_deadline, send(upstream, transport, body)).await {
        Err(_) => {
            return Err(Attempt {
                error: upstream_error(
                    "upstream_first_byte_timeout",
                    format!("upstream `{}` did not answer in time", upstream.name),
                ),
                retry: true,
            });
        }
        Ok(Err(failure @ (SendFailure::ConnectTimeout | SendFailure::ConnectFailed))) => {
            let code = if failure == SendFailure::ConnectTimeout {
                "upstream_connect_timeout"
            } else {
                "upstream_connect_failed"
            };
            return Err(Attempt {
                error: upstream_error(code, format!("cannot reach upstream `{}`", upstream.name)),
                retry: true,
            });
        }
        Ok(Err(SendFailure::Disconnected)) => {
            return Err(Attempt {
                error: upstream_error(
                    "upstream_disconnected",
                    format!("upstream `{}` failed before answering", upstream.name),
                ),
                retry: true,
            });
        }
        Ok(Ok(response)) => response,
    };
    let status = response.status;
    if status.is_success() {
        return Ok(response.body);
    }
    let retry_after = response.retry_after;
    // The body may explain. Only a JSON error message is passed on, short,
    // and with anything key-like masked: some upstreams quote the key they
    // were sent.
    let detail = match tokio::time::timeout(Duration::from_secs(2), error_text(response.body)).await {
        Ok(text) => serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned))
            .map(|m| mask_keys(&m, upstream).chars().take(200).collect::<String>())
            .unwrap_or_default(),
        _ => String::new(),
    };
    let name = &upstream.name;
    let (code, retry) = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ("upstream_unauthorized", false),
        StatusCode::NOT_FOUND => ("upstream_not_found", false),
        StatusCode::TOO_MANY_REQUESTS => ("upstream_rate_limited", false),
        s if s.is_server_error() => ("upstream_unavailable", true),
        _ => ("upstream_bad_request", false),
    };
    let mut message = format!("upstream `{name}` answered {status}");
    if let Some(after) = retry_after {
        message.push_str(&format!("; retry after {after} s"));
    }
    if !detail.is_empty() {
        message.push_str(&format!(": {detail}"));
    }
    Err(Attempt { error: upstream_error(code, message), retry })
}

/// Masks the configured key and any `sk-...`-like word in upstream text.
fn mask_keys(text: &str, upstream: &Upstream) -> String {
    let mut text = text.to_owned();
    if let Some(key) = &upstream.api_key {
        let key = String::from_utf8_lossy(key.expose()).into_owned();
        if !key.is_empty() {
            text = text.replace(&key, "[redacted]");
        }
    }
    text.split(' ')
        .map(|word| if word.starts_with("sk-") || word.len() > 40 { "[redacted]" } else { word })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Generator for OpenAiGenerator {
    fn description(&self) -> &str {
        &self.description
    }

    fn generate(&self, request: GenerateRequest) -> TextStream {
        let chain = self.chain.clone();
        Box::pin(async_stream::stream! {
            let total = chain.first().map_or(super::upstream::DEFAULT_TOTAL_TIMEOUT, |(u, _)| u.total_timeout);
            let deadline = Instant::now() + total;
            let mut last_error = upstream_error("upstream_unavailable", "no upstream configured");
            let mut started = None;
            'chain: for (upstream, transport) in &chain {
                let mut body = json!({
                    "model": upstream.model,
                    "messages": messages_for(&request),
                    "stream": true,
                    "stream_options": { "include_usage": true },
                });
                if let (Value::Object(map), Ok(Value::Object(options))) = (&mut body, serde_json::to_value(&request.options)) {
                    map.extend(options);
                }
                for attempt in 0..=upstream.retries {
                    match start(upstream, transport, &body, deadline).await {
                        Ok(response) => {
                            started = Some((upstream.clone(), response));
                            break 'chain;
                        }
                        Err(failed) => {
                            tracing::info!(upstream = %upstream.name, attempt, code = failed.error.code().as_str(), "upstream attempt failed");
                            last_error = failed.error;
                            if !failed.retry || attempt == upstream.retries {
                                break;
                            }
                            // 100 ms, 200 ms, 400 ms, ... within the total deadline.
                            let backoff = Duration::from_millis(100 << attempt.min(6));
                            if Instant::now() + backoff >= deadline {
                                break 'chain;
                            }
                            sleep(backoff).await;
                        }
                    }
                }
            }
            let Some((upstream, response)) = started else {
                yield Err(last_error);
                return;
            };
            let mut body = response;
            let mut parser = Parser::new();
            let mut finished = false;
            let mut deferred = None;
            // One timer for the whole body, moved only when it fires: arming
            // a fresh timeout for every frame cost a timer-wheel insert and
            // removal per character. `last_frame` says when it should fire.
            let mut last_frame = Instant::now();
            let timer = sleep_until(deadline.min(last_frame + upstream.idle_timeout));
            tokio::pin!(timer);
            loop {
                let next = if let Some(end) = deferred.take() {
                    Ok(end)
                } else {
                    loop {
                        tokio::select! {
                            biased;
                            next = body.next() => break Ok(next),
                            () = &mut timer => {
                                let due = deadline.min(last_frame + upstream.idle_timeout);
                                if Instant::now() >= due {
                                    break Err(());
                                }
                                timer.as_mut().reset(due);
                            }
                        }
                    }
                };
                last_frame = Instant::now();
                let next = match next {
                    Ok(next) => next,
                    Err(_) if Instant::now() >= deadline => {
                        yield Err(upstream_error("upstream_total_timeout", format!("upstream `{}` exceeded {}", upstream.name, humantime::format_duration(total))));
                        return;
                    }
                    Err(_) => {
                        yield Err(upstream_error("upstream_idle_timeout", format!("upstream `{}` sent nothing for {}", upstream.name, humantime::format_duration(upstream.idle_timeout))));
                        return;
                    }
                };
                let bytes = match next {
                    Some(Ok(bytes)) => bytes,
                    Some(Err(_)) | None if finished => return,
                    Some(Err(_)) | None => {
                        yield Err(upstream_error("upstream_disconnected", format!("upstream `{}` closed the stream before finishing", upstream.name)));
                        return;
                    }
                };
                // The body yields one piece per HTTP chunk, and upstreams
                // send one chunk per frame: take every piece that is already
                // here (one network read holds hundreds) and hand the text of
                // all of them on as one chunk. The engine then has it ready
                // at once, and the client gets it in one write rather than
                // one per frame. Nothing waits for a piece not yet here.
                let mut read = Absorbed::default();
                read.absorb(&mut parser, &bytes);
                let mut taken = bytes.len();
                while taken < MAX_READY_BYTES && read.end.is_none() {
                    match body.next().now_or_never() {
                        Some(Some(Ok(more))) => {
                            taken += more.len();
                            read.absorb(&mut parser, &more);
                        }
                        Some(end) => {
                            // An error or the end: handled once this text is.
                            deferred = Some(end);
                            break;
                        }
                        None => break,
                    }
                }
                finished |= read.finished;
                if !read.text.is_empty() {
                    yield Ok(Chunk::Text(read.text));
                }
                if let Some(usage) = read.usage {
                    yield Ok(Chunk::Usage(usage));
                }
                match read.end {
                    None => {}
                    Some(End::Done) => return,
                    Some(End::Malformed) => {
                        yield Err(upstream_error("upstream_malformed", format!("upstream `{}` sent a chunk that is not JSON", upstream.name)));
                        return;
                    }
                    Some(End::Error(message)) => {
                        yield Err(upstream_error("upstream_error", format!("upstream `{}`: {message}", upstream.name)));
                        return;
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_frames_borrow_plain_text_and_read_the_rest() {
        let frame = Frame::parse(r#"{"id":"x","choices":[{"index":0,"delta":{"content":"hé"},"finish_reason":null}]}"#);
        let frame = frame.unwrap_or_default();
        assert!(matches!(frame.text, Cow::Borrowed("hé")), "{frame:?}");
        assert!(!frame.finished);
        let escaped = Frame::parse(r#"{"choices":[{"delta":{"content":"a\"\n\u4f60"}}]}"#).unwrap_or_default();
        assert_eq!(escaped.text, "a\"\n你");
        let last = Frame::parse(
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
        )
        .unwrap_or_default();
        assert!(last.finished);
        assert_eq!(last.usage, Some(Usage { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 }));
        let error = Frame::parse(r#"{"error":{"message":"overloaded"}}"#).unwrap_or_default();
        assert_eq!(error.error.as_deref(), Some("overloaded"));
        assert_eq!(Frame::parse(r#"{"error":null,"choices":[]}"#), Some(Frame::default()));
    }

    #[test]
    fn odd_shapes_are_read_leniently_and_non_json_is_refused() {
        // A number where text belongs: no text, not a failure.
        let odd = Frame::parse(r#"{"choices":[{"delta":{"content":5}}],"usage":{"total_tokens":"many"}}"#);
        assert_eq!(odd, Some(Frame::default()));
        let odd_error = Frame::parse(r#"{"error":"plain string","choices":null}"#).unwrap_or_default();
        assert_eq!(odd_error.error.as_deref(), Some("unknown error"));
        assert_eq!(Frame::parse("not json"), None);
    }
}
