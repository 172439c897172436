//! tokengate: a token streaming gateway. Clients connect with a JWT and
//! receive generated text as Server-Sent Events, one extended grapheme
//! cluster per event.
//!
//! # Layout
//! Each layer uses only the layers below it (`ARCHITECTURE.md` shows the
//! path of one character and of a resume through them):
//! - [`api`]: HTTP handlers per resource, thin: parse, authorize, call the
//!   stream service or the store, render; [`api::sse`] builds every SSE
//!   response.
//! - [`app`]: the route table and the layer stack; [`state`]: the state
//!   every handler gets.
//! - [`dialect`]: one renderer per wire protocol (native, OpenAI chat
//!   completions and Responses, Anthropic Messages, the Vercel AI SDK UI
//!   message stream, channel subscriptions), from typed events.
//! - [`stream`]: the engine (grapheme splitting, pacing, ids), the
//!   producer and its flow control (backpressure, detach, slow consumers),
//!   the one reader that follows a log (heartbeats, shutdown, resume gaps),
//!   and the [`stream::StreamService`] every route calls.
//! - [`store`]: one handle over the memory and Redis logs and channels; it
//!   keeps events and says when new ones arrive, and holds no policy.
//! - [`generator`]: the `Generator` trait, its registry, `demo`, `echo` and
//!   the OpenAI-compatible and Anthropic upstreams.
//! - [`event`]: the vocabulary all of them share: stream events, ids,
//!   outcome codes, usage.
//! - [`auth`]: token extraction (bearer, `x-api-key` on the Anthropic
//!   route, cookie, query), JWT validation (static key or a cached,
//!   refreshed JWKS), scopes, minting.
//! - [`tickets`]: stream tickets, single-use stand-ins for a token in an
//!   `EventSource` URL: minting, the one check of every use, binding.
//! - [`secret`]: [`secret::Secret`], bytes whose `Debug` never shows them.
//! - [`json`]: JSON details where JSON Schema and serde disagree (`3.0` as an integer).
//! - [`limits`]: request rates, stream slots, client IP behind proxies;
//!   with a shared store, rates and per-subject slots for the whole cluster.
//! - `fuzzing` (hidden): the bodies of the fuzz targets in `fuzz/`, also
//!   replayed over their corpora by the test suite.
//! - [`feeds`]: the built-in demo feeds behind `/dashboard` (the seeds' live dashboards).
//! - [`quota`]: usage budgets per subject, drawn on while streaming.
//! - [`sse`]: the event-stream wire format (encoder and spec parser).
//! - [`config`]: settings from flags, env and TOML, validated into
//!   [`config::Config`]; [`cli`]: the command line (serve, token,
//!   healthcheck).
//! - [`error`]: [`error::ApiError`], the one mapping of failures to HTTP.
//! - [`metrics`]: Prometheus counters and gauges, per application.
//! - [`heap_trim`]: gives the heap that ended streams and connections
//!   freed back to the OS.
//! - [`shutdown`]: the drain-then-close sequence.
//! - [`server`]: binding, connections and their limits, serving HTTP/1.1
//!   and HTTP/2 (native TLS with certificate reload, or h2c).

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod dialect;
pub mod error;
pub mod event;
pub mod feeds;
#[doc(hidden)]
pub mod fuzzing;
pub mod generator;
pub mod heap_trim;
pub mod json;
pub mod limits;
pub mod log_throttle;
pub mod log_writer;
pub mod metrics;
pub mod quota;
pub mod request_line;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod sse;
pub mod state;
pub mod store;
pub mod stream;
pub mod tickets;
