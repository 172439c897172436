//! A mock OpenAI-compatible upstream: a real HTTP server on 127.0.0.1:0
//! whose behaviour is chosen by the request's `model`, counting requests and
//! noticing when a client drops its streamed response.

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
}

/// A running mock.
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
}

impl MockUpstream {
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

pub async fn start() -> MockUpstream {
    let seen = Arc::new(Seen::default());
    seen.flaky_failures.store(1, Ordering::SeqCst);
    let app = Router::new().route("/v1/chat/completions", post(handle)).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    MockUpstream { addr, seen }
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
            let bytes = raw.into_bytes();
            let mut parts = Vec::new();
            let (mut i, mut size) = (0, 1);
            while i < bytes.len() {
                let end = (i + size).min(bytes.len());
                parts.push(bytes[i..end].to_vec());
                i = end;
                size = size % 7 + 1;
            }
            streamed(seen, parts, Duration::from_micros(300), false)
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
