//! A mock OpenAI-compatible upstream: a real HTTP server on 127.0.0.1:0
//! whose behaviour is chosen by the request's `model`, counting requests and
//! noticing when a client drops its streamed response. It also answers
//! `/v1/messages` as an Anthropic upstream ([`handle_anthropic`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// What the mock saw.
#[derive(Default)]
pub struct Seen {
    /// Requests received.
    pub requests: AtomicUsize,
    /// Streamed bodies the client dropped before their end.
    pub dropped: AtomicUsize,
    /// Streamed bodies started.
    pub streams: AtomicUsize,
    /// The last request body.
    pub last_body: Mutex<Value>,
    /// The last Authorization header.
    pub last_auth: Mutex<Option<String>>,
    /// `flaky` failures left.
    pub flaky_failures: AtomicUsize,
    /// The last `x-api-key` and `anthropic-version` headers.
    pub last_anthropic_headers: Mutex<(Option<String>, Option<String>)>,
}

/// A running mock.
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    /// `http`, or `https` for [`start_tls`].
    pub scheme: &'static str,
}

impl MockUpstream {
    pub fn base_url(&self) -> String {
        format!("{}://{}/v1", self.scheme, self.addr)
    }
}

fn router() -> (Router, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    seen.flaky_failures.store(1, Ordering::SeqCst);
    let app = Router::new()
        .route("/v1/chat/completions", post(handle))
        .route("/v1/messages", post(handle_anthropic))
        .with_state(seen.clone());
    (app, seen)
}

pub async fn start() -> MockUpstream {
    let (app, seen) = router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    MockUpstream { addr, seen, scheme: "http" }
}

/// The same mock over TLS with the given PEM chain and key (ALPN `h2` and
/// `http/1.1`, as a hosted model API offers).
pub async fn start_tls(cert_pem: &str, key_pem: &str) -> MockUpstream {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (app, seen) = router();
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate just ends here.
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
            });
        }
    });
    MockUpstream { addr, seen, scheme: "https" }
}

struct DropGuard {
    seen: Arc<Seen>,
    finished: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.seen.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn chunk(content: &str) -> String {
    let c = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
    format!("data: {c}\n\n")
}

fn finish() -> String {
    let c = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
    let u = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
        "usage": {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}});
    format!("data: {c}\n\ndata: {u}\n\ndata: [DONE]\n\n")
}

/// A streamed body from parts, with a delay before each, noticing drops.
fn streamed(seen: Arc<Seen>, parts: Vec<Vec<u8>>, delay: Duration, then_hang: bool) -> Response {
    seen.streams.fetch_add(1, Ordering::SeqCst);
    let body = async_stream::stream! {
        let mut guard = DropGuard { seen, finished: false };
        for part in parts {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            yield Ok::<_, Infallible>(Bytes::from(part));
        }
        if then_hang {
            std::future::pending::<()>().await;
        }
        guard.finished = true;
    };
    ([("content-type", "text/event-stream")], Body::from_stream(body)).into_response()
}

async fn handle(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: String) -> Response {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    *seen.last_auth.lock().unwrap() = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    *seen.last_body.lock().unwrap() = request.clone();
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    let text = request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let per_char = |t: &str| -> Vec<Vec<u8>> {
        let mut parts: Vec<Vec<u8>> = t.chars().map(|c| chunk(&c.to_string()).into_bytes()).collect();
        parts.push(finish().into_bytes());
        parts
    };
    match model.as_str() {
        "normal" => streamed(seen, per_char(&text), Duration::ZERO, false),
        "slow" => streamed(seen, per_char(&text), Duration::from_millis(30), false),
        "cut" => {
            // The whole response with CRLF line ends and comments, cut into
            // 1..=7-byte writes: inside UTF-8 sequences and inside lines.
            let mut raw = String::from(": hello\r\n\r\n");
            for c in text.chars() {
                raw.push_str(&chunk(&c.to_string()).replace("\n\n", "\r\n\r\n"));
                raw.push_str(": ping\r\n\r\n");
            }
            raw.push_str(&finish().replace("\n\n", "\r\n\r\n"));
            streamed(seen, small_writes(&raw.into_bytes()), Duration::from_micros(300), false)
        }
        "status-401" => (StatusCode::UNAUTHORIZED, "{\"error\":{\"message\":\"bad key\"}}").into_response(),
        "status-404" => (StatusCode::NOT_FOUND, "{\"error\":{\"message\":\"no such model\"}}").into_response(),
        "status-500" => (StatusCode::INTERNAL_SERVER_ERROR, "oops").into_response(),
        "status-429" => (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "7")], "slow down").into_response(),
        "flaky" => {
            if seen.flaky_failures.load(Ordering::SeqCst) > 0 {
                seen.flaky_failures.fetch_sub(1, Ordering::SeqCst);
                (StatusCode::SERVICE_UNAVAILABLE, "warming up").into_response()
            } else {
                streamed(seen, per_char(&text), Duration::ZERO, false)
            }
        }
        "drop" => {
            // A few chunks, then the connection closes mid-stream.
            let parts = text.chars().take(3).map(|c| chunk(&c.to_string()).into_bytes()).collect();
            streamed(seen, parts, Duration::ZERO, false)
        }
        "garbage" => {
            streamed(seen, vec![chunk("a").into_bytes(), b"data: {not json\n\n".to_vec()], Duration::ZERO, false)
        }
        "error-object" => streamed(
            seen,
            vec![
                chunk("a").into_bytes(),
                b"data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n".to_vec(),
            ],
            Duration::ZERO,
            false,
        ),
        "idle" => streamed(seen, vec![chunk("a").into_bytes()], Duration::ZERO, true),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        _ => (StatusCode::BAD_REQUEST, "unknown mode").into_response(),
    }
}

/// `bytes` cut into writes of 1, 2, ..., 7, 1, ... bytes: inside UTF-8
/// sequences and inside lines.
fn small_writes(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    let (mut i, mut size) = (0, 1);
    while i < bytes.len() {
        let end = (i + size).min(bytes.len());
        parts.push(bytes[i..end].to_vec());
        i = end;
        size = size % 7 + 1;
    }
    parts
}

fn anthropic_event(name: &str, data: Value) -> Vec<u8> {
    format!("event: {name}\ndata: {data}\n\n").into_bytes()
}

/// `/v1/messages`: an Anthropic stream of the last user message, one event
/// per character (so cuts fall inside grapheme clusters), with usage; or,
/// by `model`, the same cut into 1..=7-byte writes with CRLF, a drop before
/// the end, garbage, silence, an `event: error` after one delta, or a 401.
async fn handle_anthropic(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: String) -> Response {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    *seen.last_auth.lock().unwrap() = header("authorization");
    *seen.last_anthropic_headers.lock().unwrap() = (header("x-api-key"), header("anthropic-version"));
    *seen.last_body.lock().unwrap() = request.clone();
    let text = request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let delta = |t: &str| {
        anthropic_event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}),
        )
    };
    let mut parts = vec![
        anthropic_event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                   "content": [], "model": "m", "stop_reason": null, "stop_sequence": null,
                   "usage": {"input_tokens": 11, "output_tokens": 1}}}),
        ),
        anthropic_event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        anthropic_event("ping", json!({"type": "ping"})),
    ];
    match request["model"].as_str().unwrap_or_default() {
        "normal" => {
            parts.extend(text.chars().map(|c| delta(&c.to_string())));
            parts.push(anthropic_event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
            parts.push(anthropic_event(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                       "usage": {"output_tokens": 22}}),
            ));
            parts.push(anthropic_event("message_stop", json!({"type": "message_stop"})));
            streamed(seen, parts, Duration::ZERO, false)
        }
        "cut" => {
            // The whole stream with CRLF line ends, cut into 1..=7-byte
            // writes: inside UTF-8 sequences and inside lines.
            parts.extend(text.chars().map(|c| delta(&c.to_string())));
            parts.push(anthropic_event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
            parts.push(anthropic_event("message_stop", json!({"type": "message_stop"})));
            let raw = String::from_utf8(parts.concat()).unwrap().replace("\n\n", "\r\n\r\n").into_bytes();
            streamed(seen, small_writes(&raw), Duration::from_micros(300), false)
        }
        // A few deltas, then the connection closes before `message_stop`.
        "drop" => {
            parts.extend(text.chars().take(3).map(|c| delta(&c.to_string())));
            streamed(seen, parts, Duration::ZERO, false)
        }
        "garbage" => {
            parts.push(delta("a"));
            parts.push(b"event: content_block_delta\ndata: {not json\n\n".to_vec());
            streamed(seen, parts, Duration::ZERO, false)
        }
        "idle" => {
            parts.push(delta("a"));
            streamed(seen, parts, Duration::ZERO, true)
        }
        "error-event" => {
            parts.push(delta("a"));
            parts.push(anthropic_event(
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ));
            streamed(seen, parts, Duration::ZERO, false)
        }
        "status-401" => (
            StatusCode::UNAUTHORIZED,
            r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
        )
            .into_response(),
        _ => (StatusCode::BAD_REQUEST, "unknown mode").into_response(),
    }
}
