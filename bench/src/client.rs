//! The load generator's HTTP/1.1 client: one hand-driven hyper connection
//! per socket (no pool, so N streams are exactly N sockets), request
//! building for each target, and an SSE reader that runs every byte through
//! tokengate's WHATWG parser and timestamps each read.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::ValueEnum;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, header};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokengate::sse::{EventRef, Parser};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::Result;

pub type Sender = SendRequest<Full<Bytes>>;

/// Opens one HTTP/1.1 connection (TCP_NODELAY, like any SSE client should).
pub async fn connect(addr: SocketAddr) -> Result<Sender> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Opens one event stream on a connection of its own (idle streams, channel
/// subscribers): the response body, or why not, as the modes count it
/// (`connect: ...`, `http: ...`, `status_NNN`). The connection stays up as
/// long as the body is read.
pub async fn open_stream(addr: SocketAddr, req: Request<Full<Bytes>>) -> std::result::Result<Incoming, String> {
    let mut sender = connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| format!("http: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("status_{}", resp.status().as_u16()));
    }
    Ok(resp.into_body())
}

/// The kept-alive connection when it can take another request, else a new one.
pub async fn reuse_or_connect(sender: Option<Sender>, addr: SocketAddr) -> Result<Sender> {
    if let Some(mut s) = sender
        && s.ready().await.is_ok()
    {
        return Ok(s);
    }
    connect(addr).await
}

/// What the load generator talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// tokengate: `/v1/stream` with a JWT, native events.
    Tokengate,
    /// The reference server: `/v1/stream`, native events, no auth.
    Reference,
    /// An OpenAI-compatible server (the mock upstream, directly):
    /// `POST /v1/chat/completions`, chunks and `[DONE]`.
    Openai,
}

/// GET (query parameters) or POST (JSON body) for `/v1/stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Get,
    Post,
}

/// One streaming request.
pub struct StreamSpec<'a> {
    pub target: Target,
    pub method: Method,
    pub host: &'a str,
    pub generator: &'a str,
    pub text: &'a str,
    pub pace_ms: Option<u64>,
    pub token: Option<&'a str>,
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Builds the request that opens one stream on `spec.target`.
pub fn stream_request(spec: &StreamSpec<'_>) -> Request<Full<Bytes>> {
    let mut b = Request::builder().header(header::HOST, spec.host).header(header::ACCEPT, "text/event-stream");
    if let Some(token) = spec.token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match (spec.target, spec.method) {
        (Target::Openai, _) => {
            let body = serde_json::json!({
                "model": "m",
                "messages": [{ "role": "user", "content": spec.text }],
                "stream": true,
            });
            b = b.method("POST").uri("/v1/chat/completions").header(header::CONTENT_TYPE, "application/json");
            Bytes::from(body.to_string())
        }
        (target, Method::Get) => {
            let mut uri = String::with_capacity(64 + spec.text.len() * 3);
            uri.push_str("/v1/stream?prompt=");
            uri.push_str(&enc(spec.text));
            if target == Target::Tokengate {
                uri.push_str("&generator=");
                uri.push_str(&enc(spec.generator));
            }
            if let Some(p) = spec.pace_ms {
                uri.push_str(&format!("&pace_ms={p}"));
            }
            b = b.method("GET").uri(uri);
            Bytes::new()
        }
        (target, Method::Post) => {
            let mut body = serde_json::json!({ "prompt": spec.text });
            if target == Target::Tokengate {
                body["generator"] = spec.generator.into();
            }
            if let Some(p) = spec.pace_ms {
                body["pace_ms"] = p.into();
            }
            b = b.method("POST").uri("/v1/stream").header(header::CONTENT_TYPE, "application/json");
            Bytes::from(body.to_string())
        }
    };
    b.body(Full::new(body)).unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

/// A plain request with a JSON body (publishing) or none (subscribing).
pub fn simple_request(
    method: &str,
    host: &str,
    path: &str,
    token: Option<&str>,
    json: Option<String>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path).header(header::HOST, host);
    if let Some(token) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match json {
        Some(j) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            Bytes::from(j)
        }
        None => Bytes::new(),
    };
    b.body(Full::new(body)).unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

/// How a read loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEnd {
    /// The response body ended.
    Eof,
    /// The handler asked to stop.
    Handler,
    /// The stop signal fired.
    Stopped,
    /// Transport error while reading.
    Error(String),
}

/// Reads a response body as an event stream, calling `on_event` with every
/// item (borrowed from the parser: the client allocates nothing per event,
/// so it costs as little as it can against either server) and the time its
/// bytes were read; `on_event` returns false to stop.
pub async fn read_events<F>(
    body: &mut Incoming,
    mut stop: Option<&mut watch::Receiver<bool>>,
    mut on_event: F,
) -> (ReadEnd, u64)
where
    F: FnMut(EventRef<'_>, Instant) -> bool,
{
    let mut parser = Parser::new();
    let mut bytes = 0u64;
    loop {
        let frame = match stop.as_deref_mut() {
            Some(stop) => {
                if *stop.borrow() {
                    return (ReadEnd::Stopped, bytes);
                }
                tokio::select! {
                    f = body.frame() => f,
                    _ = stop.changed() => return (ReadEnd::Stopped, bytes),
                }
            }
            None => body.frame().await,
        };
        match frame {
            None => return (ReadEnd::Eof, bytes),
            Some(Err(e)) => return (ReadEnd::Error(e.to_string()), bytes),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                let now = Instant::now();
                bytes += data.len() as u64;
                let mut stopped = false;
                parser.feed_with(&data, |event| {
                    if !stopped && !on_event(event, now) {
                        stopped = true;
                    }
                });
                if stopped {
                    return (ReadEnd::Handler, bytes);
                }
            }
        }
    }
}

/// Reads a whole (short) body as text, for error answers.
pub async fn body_text(resp: Response<Incoming>) -> String {
    match tokio::time::timeout(Duration::from_secs(2), resp.into_body().collect()).await {
        Ok(Ok(c)) => String::from_utf8_lossy(&c.to_bytes()).chars().take(200).collect(),
        _ => String::new(),
    }
}

#[derive(Deserialize)]
struct NativeDelta<'a> {
    #[serde(borrow)]
    text: Cow<'a, str>,
}

#[derive(Deserialize)]
struct OpenAiChunk<'a> {
    #[serde(borrow, default)]
    choices: Vec<OpenAiChoice<'a>>,
}

#[derive(Deserialize)]
struct OpenAiChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<OpenAiDelta<'a>>,
}

#[derive(Deserialize)]
struct OpenAiDelta<'a> {
    #[serde(borrow, default)]
    content: Option<Text<'a>>,
}

/// serde borrows a `Cow<str>` only as a field of its own, not inside an
/// `Option`: this newtype makes text without escapes a borrow.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// What one delta-bearing event means for the reassembled text.
pub enum Item<'a> {
    /// Text to append (one delta).
    Delta(Cow<'a, str>),
    /// The stream finished normally.
    Done,
    /// A terminal error (its code, or the data).
    Error(String),
    /// Anything else (start, role chunk, comments, retry).
    Other,
    /// A data line that should have parsed but did not.
    Malformed,
}

/// Interprets one parsed SSE item per the target's wire format.
pub fn classify<'a>(target: Target, event: &EventRef<'a>) -> Item<'a> {
    let EventRef::Message { event, data, .. } = *event else { return Item::Other };
    match target {
        Target::Openai => {
            if data.trim() == "[DONE]" {
                return Item::Done;
            }
            match serde_json::from_str::<OpenAiChunk<'_>>(data) {
                Ok(chunk) => match chunk.choices.into_iter().next().and_then(|c| c.delta).and_then(|d| d.content) {
                    Some(Text(text)) if !text.is_empty() => Item::Delta(text),
                    _ => Item::Other,
                },
                Err(_) => Item::Malformed,
            }
        }
        Target::Tokengate | Target::Reference => match event {
            "delta" => match serde_json::from_str::<NativeDelta<'_>>(data) {
                Ok(d) => Item::Delta(d.text),
                Err(_) => Item::Malformed,
            },
            "done" => Item::Done,
            "error" | "shutdown" => {
                let code = serde_json::from_str::<serde_json::Value>(data)
                    .ok()
                    .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| event.to_owned());
                Item::Error(code)
            }
            _ => Item::Other,
        },
    }
}

/// Mints an HS256 token: sub, scope "stream publish", exp ten years ahead.
pub fn mint(secret: &str, sub: &str) -> Result<String> {
    #[derive(Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        scope: &'a str,
        iat: u64,
        exp: u64,
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = Claims { sub, scope: "stream publish", iat: now, exp: now + 10 * 365 * 86_400 };
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    Ok(jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key)?)
}
