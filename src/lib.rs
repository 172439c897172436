//! tokengate: a token streaming gateway. Clients connect with a JWT and
//! receive generated text as Server-Sent Events, one extended grapheme
//! cluster per event.
//!
//! # Layout
//! - [`config`]: settings from flags, env and TOML, validated into [`config::Config`].
//! - [`cli`]: the command line (serve, token).
//! - [`auth`]: token extraction, JWT validation, scopes, minting.
//! - [`secret`]: [`secret::Secret`], bytes whose `Debug` never shows them.
//! - [`json`]: JSON details where JSON Schema and serde disagree (`3.0` as an integer).
//! - [`error`]: [`error::ApiError`], the one mapping of failures to problem+json.
//! - [`sse`]: the event-stream wire format (encoder and spec parser).
//! - [`stream`]: the engine (grapheme splitting, pacing, ids, heartbeats)
//!   and the per-stream task with its bounded queue.
//! - [`store`]: stream logs (resume) and channel logs (broadcast).
//! - [`dialect`]: renders engine events on the wire (native; OpenAI next).
//! - [`generator`]: the `Generator` trait, registry, `demo` and `echo`.
//! - [`limits`]: request rates, stream slots, client IP behind proxies.
//! - [`metrics`]: Prometheus counters and gauges, per application.
//! - [`api`]: HTTP handlers per resource.
//! - [`app`]: state, route table and layer stack.
//! - [`shutdown`]: the drain-then-close sequence.
//! - [`server`]: binding, connections and their limits, serving.

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod dialect;
pub mod error;
pub mod generator;
pub mod json;
pub mod limits;
pub mod metrics;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod sse;
pub mod store;
pub mod stream;
