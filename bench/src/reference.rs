//! The reference server: what a competent developer writes in an afternoon
//! with axum, and what tokengate is compared against.
//!
//! - `GET /v1/stream?prompt=...&chars=N&pace_ms=...` (and `POST /v1/stream`
//!   with `{"prompt", "pace_ms"}`): axum's `Sse` over a stream, one
//!   `event: delta` per `char` (`{"text":"x"}`), paced by a tokio
//!   `interval`, then `event: done`; `KeepAlive` comments while idle.
//! - `GET /v1/channels/{name}`: `event: connected`, then every publish, from
//!   a tokio `broadcast` channel.
//! - `POST /v1/channels/{name}` with `{"data": ...}`: publishes.
//!
//! No authentication, no limits, no resume, no per-stream task or log: all
//! of that is in tokengate's bill and not in this one.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use futures_util::stream::{self, BoxStream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_stream::wrappers::{BroadcastStream, IntervalStream};

use crate::Result;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// KeepAlive comment interval, in seconds.
    #[arg(long, default_value_t = 15)]
    heartbeat_secs: u64,
    /// Runtime worker threads (0 = one per core, like `#[tokio::main]`).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Clone)]
struct AppState {
    heartbeat: Duration,
    channels: Arc<Mutex<HashMap<String, broadcast::Sender<String>>>>,
}

#[derive(Deserialize)]
struct StreamQuery {
    prompt: Option<String>,
    chars: Option<usize>,
    pace_ms: Option<u64>,
}

#[derive(Deserialize)]
struct StreamBody {
    #[serde(default)]
    prompt: String,
    pace_ms: Option<u64>,
}

#[derive(Deserialize)]
struct PublishBody {
    data: Value,
}

type EventStream = BoxStream<'static, Result<Event, Infallible>>;

pub fn main(args: Args) -> Result<()> {
    let (soft, hard) = crate::raise_nofile();
    let runtime = crate::server_runtime(args.threads)?;
    runtime.block_on(async move {
        let state = AppState {
            heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
            channels: Arc::new(Mutex::new(HashMap::new())),
        };
        let app = Router::new()
            .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
            .route("/v1/stream", get(stream_get).post(stream_post))
            .route("/v1/channels/{name}", get(subscribe).post(publish))
            .with_state(state);
        // TCP_NODELAY, as axum's own docs show for `serve` (and as tokengate
        // does): without it Nagle holds small SSE writes back until the
        // previous segment is acknowledged.
        let listener = tokio::net::TcpListener::bind(args.listen).await?.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        eprintln!("reference listening on http://{} (nofile {soft}/{hard})", args.listen);
        axum::serve(listener, app).await?;
        Ok(())
    })
}

async fn stream_get(State(state): State<AppState>, Query(q): Query<StreamQuery>) -> impl IntoResponse {
    let text = match (q.prompt, q.chars) {
        (Some(p), _) => p,
        (None, Some(n)) => crate::text::generate(n, 0),
        (None, None) => "hello".to_owned(),
    };
    deltas(&state, text, q.pace_ms.unwrap_or(0))
}

async fn stream_post(State(state): State<AppState>, Json(b): Json<StreamBody>) -> impl IntoResponse {
    deltas(&state, b.prompt, b.pace_ms.unwrap_or(0))
}

fn deltas(state: &AppState, text: String, pace_ms: u64) -> impl IntoResponse + use<> {
    let chars: Vec<char> = text.chars().collect();
    let count = chars.len();
    let events = stream::iter(chars).map(|c| Event::default().event("delta").data(json!({ "text": c }).to_string()));
    let done = stream::once(async move {
        Event::default().event("done").data(json!({ "chars": count, "finish_reason": "stop" }).to_string())
    });
    let body: BoxStream<'static, Event> = if pace_ms == 0 {
        events.chain(done).boxed()
    } else {
        let ticks = IntervalStream::new(tokio::time::interval(Duration::from_millis(pace_ms)));
        ticks.zip(events).map(|(_, e)| e).chain(done).boxed()
    };
    Sse::new(body.map(Ok::<_, Infallible>)).keep_alive(KeepAlive::new().interval(state.heartbeat))
}

fn channel(state: &AppState, name: &str) -> broadcast::Sender<String> {
    let mut channels = state.channels.lock().unwrap_or_else(|e| e.into_inner());
    channels.entry(name.to_owned()).or_insert_with(|| broadcast::channel(1024).0).clone()
}

async fn subscribe(State(state): State<AppState>, Path(name): Path<String>) -> impl IntoResponse {
    let rx = channel(&state, &name).subscribe();
    let connected = Event::default().event("connected").data(json!({ "channel": name }).to_string());
    let events: EventStream = stream::once(async move { connected })
        .chain(
            BroadcastStream::new(rx)
                .filter_map(|m| async move { m.ok().map(|d| Event::default().event("message").data(d)) }),
        )
        .map(Ok::<_, Infallible>)
        .boxed();
    Sse::new(events).keep_alive(KeepAlive::new().interval(state.heartbeat))
}

async fn publish(State(state): State<AppState>, Path(name): Path<String>, Json(b): Json<PublishBody>) -> Json<Value> {
    let subscribers = channel(&state, &name).send(b.data.to_string()).unwrap_or(0);
    Json(json!({ "subscribers": subscribers }))
}
