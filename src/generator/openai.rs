//! `openai`: streams from any OpenAI-compatible chat completions server
//! (OpenAI, vLLM, llama.cpp server, Ollama's `/v1`, LM Studio, ...), or,
//! for an upstream of `kind = "anthropic"`, from the Anthropic Messages API
//! (its body and frames are in [`super::anthropic`]; all the rest is
//! shared).
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
use tokio::time::{Instant, Sleep, sleep, sleep_until, timeout_at};

use super::anthropic::{self, Frames};
use super::http1::{self, SendFailure};
use super::upstream::{Upstream, UpstreamKind};
use super::{Chunk, ErrorCode, GenerateRequest, Generator, GeneratorError, TextStream, Usage};
use crate::sse::{EventRef, Parser};

/// One upstream plus its fallbacks, as one generator.
#[derive(Debug, Clone)]
pub struct OpenAiGenerator {
    chain: Vec<(Arc<Upstream>, Transport)>,
    description: String,
}

fn upstream_error(code: ErrorCode, message: impl Into<String>) -> GeneratorError {
    GeneratorError::Upstream { code, message: message.into() }
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
    /// frame) and takes in what they say; `anthropic` reads them as an
    /// Anthropic stream instead of chat completion chunks.
    fn absorb(&mut self, parser: &mut Parser, bytes: &[u8], mut anthropic: Option<&mut Frames>) {
        parser.feed_with(bytes, |item| {
            if self.end.is_some() {
                return;
            }
            let EventRef::Message { data, .. } = item else { return };
            if let Some(frames) = anthropic.as_deref_mut() {
                self.take_anthropic(frames.read(data));
                return;
            }
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

impl Absorbed {
    fn take_anthropic(&mut self, read: Option<anthropic::Read>) {
        let Some(read) = read else {
            self.end = Some(End::Malformed);
            return;
        };
        self.text.push_str(&read.text);
        self.finished |= read.finished;
        if read.usage.is_some() {
            self.usage = read.usage;
        }
        if let Some(message) = read.error {
            self.end = Some(End::Error(message));
        } else if read.stop {
            self.end = Some(End::Done);
        }
    }
}

/// What the body reader makes of upstream bytes that arrive in `reads`
/// (one slice per network read): each read's text, then the usage, the
/// finish and the in-band end, as [`BodyReader::take_ready`] absorbs them
/// with one parser for the whole body. For the fuzz targets, which check
/// that where the reads are cut changes none of it.
pub(crate) fn read_upstream(reads: &[&[u8]], anthropic: bool) -> UpstreamRead {
    let mut parser = Parser::new();
    let mut frames = anthropic.then(Frames::default);
    let mut out = UpstreamRead::default();
    for bytes in reads {
        let mut read = Absorbed::default();
        read.absorb(&mut parser, bytes, frames.as_mut());
        out.texts.push(read.text);
        out.finished |= read.finished;
        if read.usage.is_some() {
            out.usage = read.usage;
        }
        if let Some(end) = read.end {
            out.end = Some(match end {
                End::Done => UpstreamEnd::Done,
                End::Malformed => UpstreamEnd::Malformed,
                End::Error(message) => UpstreamEnd::Error(message),
            });
            break;
        }
    }
    out
}

/// How an upstream stream ended in band, as the body reader saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpstreamEnd {
    /// `[DONE]`, or Anthropic's `message_stop`.
    Done,
    /// A frame that is not JSON.
    Malformed,
    /// An error object, with its message.
    Error(String),
}

/// What the upstream body reader made of a stream (see
/// [`read_upstream`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UpstreamRead {
    /// The text each read handed on, in order (possibly empty).
    pub(crate) texts: Vec<String>,
    /// The last usage reported.
    pub(crate) usage: Option<Usage>,
    /// A frame carried a finish reason.
    pub(crate) finished: bool,
    /// What ended the stream in band, if anything did.
    pub(crate) end: Option<UpstreamEnd>,
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
        let api = match primary.kind {
            UpstreamKind::Openai => "OpenAI-compatible",
            UpstreamKind::Anthropic => "Anthropic",
        };
        let description = format!("{api} upstream `{}` (model {})", primary.name, primary.model);
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
        let mut client = reqwest::Client::builder().connect_timeout(upstream.connect_timeout);
        if let Some(ca) = &upstream.ca {
            client = client.tls_certs_merge(reqwest::Certificate::from_pem_bundle(ca)?);
        }
        Ok(Transport::Pooled(client.build()?))
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

/// The headers and the bearer key of a request: an Anthropic upstream
/// gets its key as `x-api-key` (marked sensitive) instead.
fn auth(upstream: &Upstream) -> (Cow<'_, reqwest::header::HeaderMap>, Option<&[u8]>) {
    let key = upstream.api_key.as_ref().map(|k| k.expose());
    match (upstream.kind, key) {
        (UpstreamKind::Anthropic, Some(key)) => {
            let mut headers = upstream.headers.clone();
            // Checked when the upstream was configured.
            if let Ok(mut value) = reqwest::header::HeaderValue::from_bytes(key) {
                value.set_sensitive(true);
                headers.insert("x-api-key", value);
            }
            (Cow::Owned(headers), None)
        }
        (UpstreamKind::Anthropic, None) => (Cow::Borrowed(&upstream.headers), None),
        (UpstreamKind::Openai, key) => (Cow::Borrowed(&upstream.headers), key),
    }
}

async fn send(upstream: &Upstream, transport: &Transport, body: &Value) -> Result<Head, SendFailure> {
    let (headers, key) = auth(upstream);
    match transport {
        Transport::Driven => {
            let json = Bytes::from(serde_json::to_vec(body).map_err(|_| SendFailure::Disconnected)?);
            let (parts, body) = http1::post_json(&upstream.url, &headers, key, json, upstream.connect_timeout).await?;
            Ok(Head {
                status: parts.status,
                retry_after: retry_after(&parts.headers),
                body: Box::pin(body.map(|piece| piece.map_err(|e| e.to_string()))),
            })
        }
        Transport::Pooled(client) => {
            let mut req = client.post(&upstream.url).headers(headers.into_owned()).json(body);
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
                    ErrorCode::UpstreamFirstByteTimeout,
                    format!("upstream `{}` did not answer in time", upstream.name),
                ),
                retry: true,
            });
        }
        Ok(Err(failure @ (SendFailure::ConnectTimeout | SendFailure::ConnectFailed))) => {
            let code = if failure == SendFailure::ConnectTimeout {
                ErrorCode::UpstreamConnectTimeout
            } else {
                ErrorCode::UpstreamConnectFailed
            };
            return Err(Attempt {
                error: upstream_error(code, format!("cannot reach upstream `{}`", upstream.name)),
                retry: true,
            });
        }
        Ok(Err(SendFailure::Disconnected)) => {
            return Err(Attempt {
                error: upstream_error(
                    ErrorCode::UpstreamDisconnected,
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
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => (ErrorCode::UpstreamUnauthorized, false),
        StatusCode::NOT_FOUND => (ErrorCode::UpstreamNotFound, false),
        StatusCode::TOO_MANY_REQUESTS => (ErrorCode::UpstreamRateLimited, false),
        s if s.is_server_error() => (ErrorCode::UpstreamUnavailable, true),
        _ => (ErrorCode::UpstreamBadRequest, false),
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

/// The request body for `upstream`: the chat, streaming with usage, and
/// the request's sampling options as they are.
fn request_body(upstream: &Upstream, request: &GenerateRequest) -> Value {
    if upstream.kind == UpstreamKind::Anthropic {
        return anthropic::request_body(&upstream.model, request);
    }
    let mut body = json!({
        "model": upstream.model,
        "messages": messages_for(request),
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    if let (Value::Object(map), Ok(Value::Object(options))) = (&mut body, serde_json::to_value(&request.options)) {
        map.extend(options);
    }
    body
}

/// Gets a response head from the first upstream of `chain` that gives one
/// before `deadline`: each is tried up to `1 + retries` times while its
/// failure is worth retrying (with backoff), then the next one. Returns
/// the upstream that answered with its body, or the last failure.
async fn connect(
    chain: &[(Arc<Upstream>, Transport)],
    request: &GenerateRequest,
    deadline: Instant,
) -> Result<(Arc<Upstream>, Pieces), GeneratorError> {
    let mut last_error = upstream_error(ErrorCode::UpstreamUnavailable, "no upstream configured");
    'chain: for (upstream, transport) in chain {
        let body = request_body(upstream, request);
        for attempt in 0..=upstream.retries {
            match start(upstream, transport, &body, deadline).await {
                Ok(response) => return Ok((upstream.clone(), response)),
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
    Err(last_error)
}

/// What one read of an upstream body came to.
enum Step {
    /// Text, usage and perhaps the in-band end, of every piece that was
    /// ready (see [`BodyReader::take_ready`]).
    Read(Absorbed),
    /// The body ended after the upstream said it had finished.
    Finished,
    /// The body failed, timed out or ended before finishing.
    Failed(GeneratorError),
}

/// An upstream response body after its head: the SSE parser that spans
/// reads, and the idle and total timeouts.
struct BodyReader {
    upstream: Arc<Upstream>,
    body: Pieces,
    parser: Parser,
    /// The whole generation's deadline (`total_timeout` from the start).
    deadline: Instant,
    /// `total_timeout`, for the message when the deadline passes.
    total: Duration,
    /// A frame carried a `finish_reason`: a close after that is the end,
    /// not a failure (some upstreams send no `[DONE]`).
    finished: bool,
    /// The end of the body (or its error) met while taking ready pieces;
    /// handled on the next read, once the text before it is handed on.
    deferred: Option<Option<Result<Bytes, String>>>,
    /// When the last piece came; the idle timeout counts from here.
    last_frame: Instant,
    /// For an Anthropic upstream, the reader of its events.
    anthropic: Option<Frames>,
}

impl BodyReader {
    fn new(upstream: Arc<Upstream>, body: Pieces, deadline: Instant, total: Duration) -> Self {
        let upstream_kind = upstream.kind;
        Self {
            upstream,
            body,
            parser: Parser::new(),
            deadline,
            total,
            finished: false,
            deferred: None,
            last_frame: Instant::now(),
            anthropic: (upstream_kind == UpstreamKind::Anthropic).then(Frames::default),
        }
    }

    /// When the idle or the total timeout is due, whichever is first.
    fn due(&self) -> Instant {
        self.deadline.min(self.last_frame + self.upstream.idle_timeout)
    }

    /// The next piece of the body, or `None` at its end; `Err` when a
    /// timeout passed first. `timer` is the one timer of the whole body,
    /// moved only when it fires: arming a fresh timeout for every frame
    /// cost a timer-wheel insert and removal per character.
    async fn next_piece(&mut self, mut timer: Pin<&mut Sleep>) -> Result<Option<Result<Bytes, String>>, ()> {
        loop {
            tokio::select! {
                biased;
                next = self.body.next() => return Ok(next),
                () = &mut timer => {
                    let due = self.due();
                    if Instant::now() >= due {
                        return Err(());
                    }
                    timer.as_mut().reset(due);
                }
            }
        }
    }

    /// Reads on: everything that is ready now, or how the body ended.
    async fn read(&mut self, timer: Pin<&mut Sleep>) -> Step {
        let next = match self.deferred.take() {
            Some(end) => Ok(end),
            None => self.next_piece(timer).await,
        };
        self.last_frame = Instant::now();
        let name = &self.upstream.name;
        let bytes = match next {
            Ok(Some(Ok(bytes))) => bytes,
            Err(()) if Instant::now() >= self.deadline => {
                let total = humantime::format_duration(self.total);
                return Step::Failed(upstream_error(
                    ErrorCode::UpstreamTotalTimeout,
                    format!("upstream `{name}` exceeded {total}"),
                ));
            }
            Err(()) => {
                let idle = humantime::format_duration(self.upstream.idle_timeout);
                return Step::Failed(upstream_error(
                    ErrorCode::UpstreamIdleTimeout,
                    format!("upstream `{name}` sent nothing for {idle}"),
                ));
            }
            Ok(Some(Err(_)) | None) if self.finished => return Step::Finished,
            Ok(Some(Err(_)) | None) => {
                return Step::Failed(upstream_error(
                    ErrorCode::UpstreamDisconnected,
                    format!("upstream `{name}` closed the stream before finishing"),
                ));
            }
        };
        let read = self.take_ready(&bytes);
        self.finished |= read.finished;
        Step::Read(read)
    }

    /// The body yields one piece per HTTP chunk, and upstreams send one
    /// chunk per frame: take every piece that is already here (one network
    /// read holds hundreds) and hand the text of all of them on as one
    /// chunk. The engine then has it ready at once, and the client gets it
    /// in one write rather than one per frame. Nothing waits for a piece
    /// not yet here.
    fn take_ready(&mut self, first: &[u8]) -> Absorbed {
        let mut read = Absorbed::default();
        read.absorb(&mut self.parser, first, self.anthropic.as_mut());
        let mut taken = first.len();
        while taken < MAX_READY_BYTES && read.end.is_none() {
            match self.body.next().now_or_never() {
                Some(Some(Ok(more))) => {
                    taken += more.len();
                    read.absorb(&mut self.parser, &more, self.anthropic.as_mut());
                }
                Some(end) => {
                    // An error or the end: handled once this text is.
                    self.deferred = Some(end);
                    break;
                }
                None => break,
            }
        }
        read
    }

    /// The error an in-band end stands for (`None` for `[DONE]`).
    fn end_error(&self, end: End) -> Option<GeneratorError> {
        let name = &self.upstream.name;
        match end {
            End::Done => None,
            End::Malformed => Some(upstream_error(
                ErrorCode::UpstreamMalformed,
                format!("upstream `{name}` sent a chunk that is not JSON"),
            )),
            End::Error(message) => {
                Some(upstream_error(ErrorCode::UpstreamError, format!("upstream `{name}`: {message}")))
            }
        }
    }
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
            let (upstream, body) = match connect(&chain, &request, deadline).await {
                Ok(started) => started,
                Err(error) => {
                    yield Err(error);
                    return;
                }
            };
            let mut reader = BodyReader::new(upstream, body, deadline, total);
            let timer = sleep_until(reader.due());
            tokio::pin!(timer);
            loop {
                let read = match reader.read(timer.as_mut()).await {
                    Step::Read(read) => read,
                    Step::Finished => return,
                    Step::Failed(error) => {
                        yield Err(error);
                        return;
                    }
                };
                if !read.text.is_empty() {
                    yield Ok(Chunk::Text(read.text));
                }
                if let Some(usage) = read.usage {
                    yield Ok(Chunk::Usage(usage));
                }
                if let Some(end) = read.end {
                    if let Some(error) = reader.end_error(end) {
                        yield Err(error);
                    }
                    return;
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
