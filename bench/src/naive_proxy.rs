//! The naive proxy: what a team writes by hand to put an LLM behind an SSE
//! endpoint, and the baseline of the LLM-shaped scenario.
//!
//! `GET /v1/stream?prompt=...` posts the prompt to an OpenAI-compatible
//! upstream with reqwest (`"stream": true`, usage asked for, as a team that
//! bills would), parses the upstream's SSE with `eventsource-stream`, reads
//! each chunk into typed structs with owned strings (the way OpenAI client
//! crates model them), and answers through axum's `Sse` with one
//! `event: delta` (`{"text": ...}`, the delta's content as it came) per
//! upstream chunk, then `event: done` — the reference server's wire
//! format, so the load generator reads both the same way. A failure is a
//! terminal `event: error`. No auth, no limits, no log, no resume, no
//! re-chunking: that is tokengate's bill, not this one's.

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::serve::ListenerExt;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::Result;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8091")]
    listen: SocketAddr,
    /// The upstream's base URL, up to `/v1`.
    #[arg(long, default_value = "http://127.0.0.1:8099/v1")]
    upstream: String,
    /// Model name sent upstream.
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// Runtime worker threads (0 = one per core, like `#[tokio::main]`).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Clone)]
struct AppState {
    client: reqwest::Client,
    url: String,
    model: String,
}

#[derive(Deserialize)]
struct StreamQuery {
    #[serde(default)]
    prompt: String,
}

/// An upstream `chat.completion.chunk`, the parts a proxy reads.
#[derive(Deserialize)]
struct ChatChunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: ChunkDelta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Default, Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
}

pub fn main(args: Args) -> Result<()> {
    let (soft, hard) = crate::raise_nofile();
    let runtime = crate::server_runtime(args.threads)?;
    runtime.block_on(async move {
        let state = AppState {
            client: reqwest::Client::new(),
            url: format!("{}/chat/completions", args.upstream.trim_end_matches('/')),
            model: args.model,
        };
        let app =
            Router::new().route("/healthz", get(|| async { "ok" })).route("/v1/stream", get(stream)).with_state(state);
        // TCP_NODELAY, as axum's docs show for `serve` (and as the reference
        // server does).
        let listener = tokio::net::TcpListener::bind(args.listen).await?.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        eprintln!("naive proxy listening on http://{} -> {} (nofile {soft}/{hard})", args.listen, args.upstream);
        axum::serve(listener, app).await?;
        Ok(())
    })
}

fn error_event(message: String) -> Event {
    Event::default().event("error").data(json!({ "code": "upstream_failed", "message": message }).to_string())
}

async fn stream(State(state): State<AppState>, Query(q): Query<StreamQuery>) -> impl IntoResponse {
    let body = json!({
        "model": state.model,
        "messages": [{ "role": "user", "content": q.prompt }],
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let events = async_stream::stream! {
        let response = match state.client.post(&state.url).json(&body).send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                yield error_event(format!("upstream answered {}", r.status()));
                return;
            }
            Err(e) => {
                yield error_event(e.to_string());
                return;
            }
        };
        let mut upstream = response.bytes_stream().eventsource();
        let mut chars = 0usize;
        let mut finish = None;
        while let Some(event) = upstream.next().await {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    yield error_event(e.to_string());
                    return;
                }
            };
            if event.data == "[DONE]" {
                break;
            }
            let chunk: ChatChunk = match serde_json::from_str(&event.data) {
                Ok(chunk) => chunk,
                Err(e) => {
                    yield error_event(format!("bad chunk: {e}"));
                    return;
                }
            };
            for choice in chunk.choices {
                if let Some(reason) = choice.finish_reason {
                    finish = Some(reason);
                }
                if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                    chars += text.chars().count();
                    yield Event::default().event("delta").data(json!({ "text": text }).to_string());
                }
            }
        }
        let finish = finish.unwrap_or_else(|| "stop".to_owned());
        yield Event::default().event("done").data(json!({ "chars": chars, "finish_reason": finish }).to_string());
    };
    Sse::new(events.map(Ok::<_, Infallible>)).keep_alive(KeepAlive::default())
}
