//! A local OpenAI-compatible upstream, `POST /v1/chat/completions` with
//! `"stream": true`, in one of two modes:
//!
//! - `echo` (scenario 5): streams the last user message back, one
//!   character per `chat.completion.chunk` (one SSE event, one body frame
//!   each), then a `finish_reason: "stop"` chunk and `data: [DONE]`.
//! - `llm` (the LLM-shaped scenario, in [`llm`]): answers like a model
//!   server does, one `--token-chars`-character token every `--token-ms`,
//!   `--tokens` of them, in OpenAI's chunk shape; the text is
//!   [`llm_text`] of the last user message, so a client can check it.

mod llm;

pub use llm::llm_text;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use serde_json::{Value, json};
use tokio_stream::wrappers::IntervalStream;

use crate::Result;

/// What the mock answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The last user message back, one character per chunk.
    Echo,
    /// Model-server shaped: fixed-size tokens at a fixed rate.
    Llm,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8099")]
    listen: SocketAddr,
    /// What to stream.
    #[arg(long, value_enum, default_value = "echo")]
    mode: Mode,
    /// Milliseconds between chunks in `echo` mode (0 = as fast as the
    /// socket takes them).
    #[arg(long, default_value_t = 0)]
    pace_ms: u64,
    /// `llm` mode: milliseconds between tokens.
    #[arg(long, default_value_t = 25)]
    token_ms: u64,
    /// `llm` mode: tokens per answer.
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// `llm` mode: characters per token.
    #[arg(long, default_value_t = 4)]
    token_chars: usize,
    /// Runtime worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub fn main(args: Args) -> Result<()> {
    crate::raise_nofile();
    let runtime = crate::server_runtime(args.threads)?;
    let pace = args.pace_ms;
    let shape = llm::Shape {
        every: Duration::from_millis(args.token_ms.max(1)),
        tokens: args.tokens,
        token_chars: args.token_chars.max(1),
    };
    let mode = args.mode;
    runtime.block_on(async move {
        if mode == Mode::Llm {
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            eprintln!("mock upstream (llm: {shape:?}) listening on http://{}/v1", args.listen);
            llm::serve(listener, shape).await;
            return Ok(());
        }
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/chat/completions", post(move |Json(body): Json<Value>| async move { completions(body, pace) }));
        // TCP_NODELAY, as axum's own docs show for `serve` (and as tokengate
        // does): without it Nagle holds small SSE writes back until the
        // previous segment is acknowledged.
        let listener = tokio::net::TcpListener::bind(args.listen).await?.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        eprintln!("mock upstream (echo) listening on http://{}/v1", args.listen);
        axum::serve(listener, app).await?;
        Ok(())
    })
}

fn last_user_message(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_owned()
}

fn sse(frames: impl futures_util::Stream<Item = Bytes> + Send + 'static) -> Response {
    let mut response = Response::new(Body::from_stream(frames.map(Ok::<_, Infallible>)));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn chunk(delta: Value, finish: Option<&str>) -> Bytes {
    let v = json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
    });
    Bytes::from(format!("data: {v}\n\n"))
}

fn completions(body: Value, pace_ms: u64) -> Response {
    let chars: Vec<char> = last_user_message(&body).chars().collect();
    let head = stream::once(async { chunk(json!({ "role": "assistant", "content": "" }), None) });
    let deltas = stream::iter(chars).map(|c| chunk(json!({ "content": c }), None));
    let tail = stream::iter([chunk(json!({}), Some("stop")), Bytes::from_static(b"data: [DONE]\n\n")]);
    if pace_ms == 0 {
        sse(head.chain(deltas).chain(tail))
    } else {
        let ticks = IntervalStream::new(tokio::time::interval(Duration::from_millis(pace_ms)));
        sse(head.chain(ticks.zip(deltas).map(|(_, d)| d)).chain(tail))
    }
}
