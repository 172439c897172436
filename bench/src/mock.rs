//! A local OpenAI-compatible upstream for the proxy scenario:
//! `POST /v1/chat/completions` with `"stream": true` streams the last user
//! message back, one character per `chat.completion.chunk` (one SSE event,
//! one body frame each), then a `finish_reason: "stop"` chunk and
//! `data: [DONE]`.

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

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8099")]
    listen: SocketAddr,
    /// Milliseconds between chunks (0 = as fast as the socket takes them).
    #[arg(long, default_value_t = 0)]
    pace_ms: u64,
    /// Runtime worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub fn main(args: Args) -> Result<()> {
    crate::raise_nofile();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        builder.worker_threads(args.threads);
    }
    let runtime = builder.enable_all().build()?;
    let pace = args.pace_ms;
    runtime.block_on(async move {
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/chat/completions", post(move |body: Json<Value>| completions(body, pace)));
        // TCP_NODELAY, as axum's own docs show for `serve` (and as tokengate
        // does): without it Nagle holds small SSE writes back until the
        // previous segment is acknowledged.
        let listener = tokio::net::TcpListener::bind(args.listen).await?.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        eprintln!("mock upstream listening on http://{}/v1", args.listen);
        axum::serve(listener, app).await?;
        Ok(())
    })
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

async fn completions(Json(body): Json<Value>, pace_ms: u64) -> Response {
    let text = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_owned();
    let chars: Vec<char> = text.chars().collect();
    let head = stream::once(async { chunk(json!({ "role": "assistant", "content": "" }), None) });
    let deltas = stream::iter(chars).map(|c| chunk(json!({ "content": c }), None));
    let tail = stream::iter([chunk(json!({}), Some("stop")), Bytes::from_static(b"data: [DONE]\n\n")]);
    let frames = if pace_ms == 0 {
        head.chain(deltas).chain(tail).boxed()
    } else {
        let ticks = IntervalStream::new(tokio::time::interval(Duration::from_millis(pace_ms)));
        head.chain(ticks.zip(deltas).map(|(_, d)| d)).chain(tail).boxed()
    };
    let mut response = Response::new(Body::from_stream(frames.map(Ok::<_, std::convert::Infallible>)));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
