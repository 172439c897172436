//! Configuration: one set of settings read from CLI flags, `TOKENGATE_*`
//! environment variables and a TOML file (in that order of precedence),
//! then validated once into the typed [`Config`] the server runs with.
//!
//! [`Settings`] is both the clap argument group and what the TOML file is
//! read into, so a setting has the same name everywhere: `--pace-ms`,
//! `TOKENGATE_PACE_MS`, `pace_ms`.
//!
//! The file groups settings in sections by concern (see `src/config/file.rs` for the
//! reading rules); a key keeps its flat name inside its section:
//!
//! | section | keys |
//! |---|---|
//! | `[server]` (or the top level) | `listen`, `listen_backlog`, `cors_origins`, `log_format`, `shutdown_grace`, `shutdown_retry`, `tls_cert`, `tls_key`, `tls_reload_interval`, `h2c`, `max_concurrent_streams` |
//! | `[auth]` | `jwt_*`, `token_cookie`, `token_query`, `token_grace`, `jwks_*`, `ticket_query`, `ticket_ttl` |
//! | `[limits]` | `rate_*`, `trusted_proxies`, `max_streams`, `max_streams_per_subject`, `send_queue`, `max_lag`, `max_body_bytes`, `max_prompt_bytes`, `max_messages`, `max_stream_duration`, `max_header_bytes`, `header_timeout`, `body_timeout`, `max_connections`, `send_buffer_bytes`, `limits_on_store_failure`, `stream_lease_ttl`, `max_channels`, `max_channels_per_subject` |
//! | `[stream]` | `heartbeat`, `retry`, `pace_ms`, `pace_min_ms`, `pace_max_ms`, `generator_pace`, `default_generator`, `demo_feeds`, `demo_feeds_every`, `prompts_dir`, `openai_chunk_graphemes`, `upstream_url`, `upstream_model`, `upstream_api_key_env` |
//! | `[store]` | `redis_url`, `redis_ca_file`, `detach_grace`, `stream_ttl`, `stream_max_events`, `replication_window`, `channel_max_events`, `channel_ttl`, `max_publish_bytes` |
//! | `[upstreams.NAME]` | one upstream model server each ([`UpstreamSettings`]) |
//!
//! Every key is also accepted at the top level (the flat files of earlier
//! versions keep working); the same key both at the top level and in its
//! section is an error, as are unknown keys and keys in the wrong section.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use ipnet::IpNet;

use crate::auth::{AuthConfig, AuthSetupError, JwksSettings, KeyMaterial, TokenSources};
use crate::generator::RegistryError;
use crate::generator::upstream::{Upstream, UpstreamConfigError, UpstreamSettings};
use crate::limits::{OnStoreFailure, Rate};
use crate::quota::plan::{PlanBook, QuotaSettings};
use crate::secret::Secret;

mod file;

/// Default listen address: loopback only, so a first run exposes nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default listen backlog, sized for reconnect bursts (the OS default, 128,
/// drops connection attempts when thousands of clients reconnect at once).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;
/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// Default `retry:` hint sent at the start of every stream.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(3);
/// Default time between deltas.
pub const DEFAULT_PACE_MS: u32 = 20;
/// Default lowest pace a request may ask for.
pub const DEFAULT_PACE_MIN_MS: u32 = 0;
/// Default highest pace a request may ask for.
pub const DEFAULT_PACE_MAX_MS: u32 = 1000;
/// Default log format.
pub const DEFAULT_LOG_FORMAT: &str = "text";
/// Default graphemes per `chat.completion.chunk`.
pub const DEFAULT_OPENAI_CHUNK_GRAPHEMES: usize = 1;
/// Default generator when a request names none.
pub const DEFAULT_GENERATOR: &str = "demo";
/// Default time streams get to finish after SIGTERM before `shutdown`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default `retry:` hint sent with the `shutdown` event.
pub const DEFAULT_SHUTDOWN_RETRY: Duration = Duration::from_secs(1);
/// Default JWT clock-skew leeway.
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);
/// How often the demo feeds publish unless configured: the seeds' pace.
pub const DEFAULT_DEMO_FEEDS_EVERY: Duration = Duration::from_secs(1);
/// How long a connection may outlive its token's `exp` unless configured:
/// long enough that a client refreshing its token just before `exp` is
/// not cut mid-answer, short enough that a revoked user's hours-long
/// subscription does not outlive their last token by much.
pub const DEFAULT_TOKEN_GRACE: Duration = Duration::from_secs(60);
/// Default cookie carrying the token.
pub const DEFAULT_TOKEN_COOKIE: &str = "tokengate_token";
/// Default query parameter carrying the token.
pub const DEFAULT_TOKEN_QUERY: &str = "access_token";
/// Default JWKS refresh interval when the answer has no `max-age`.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Default lower bound of the JWKS refresh interval; also the shortest time
/// between two refreshes triggered by unknown `kid`s.
pub const DEFAULT_JWKS_REFRESH_MIN: Duration = Duration::from_secs(30);
/// Default upper bound of the JWKS refresh interval.
pub const DEFAULT_JWKS_REFRESH_MAX: Duration = Duration::from_secs(3600);
/// Default query parameter carrying a stream ticket.
pub const DEFAULT_TICKET_QUERY: &str = "ticket";
/// Default time a stream ticket may wait for its first use: long enough to
/// open an `EventSource`, short enough that a leaked URL is soon useless.
pub const DEFAULT_TICKET_TTL: Duration = Duration::from_secs(30);
/// Longest `ticket_ttl` accepted: a ticket is meant to be short-lived.
pub const MAX_TICKET_TTL: Duration = Duration::from_secs(3600);
/// Default largest request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;
/// Default largest prompt.
pub const DEFAULT_MAX_PROMPT_BYTES: usize = 64 * 1024;
/// Default sustained requests per minute per subject.
pub const DEFAULT_RATE_SUBJECT_PER_MIN: u32 = 120;
/// Default burst per subject.
pub const DEFAULT_RATE_SUBJECT_BURST: u32 = 20;
/// Default sustained requests per minute per client IP.
pub const DEFAULT_RATE_IP_PER_MIN: u32 = 600;
/// Default burst per client IP.
pub const DEFAULT_RATE_IP_BURST: u32 = 100;
/// Default cap on open streams, server-wide.
pub const DEFAULT_MAX_STREAMS: usize = 10_000;
/// Default cap on open streams per subject.
pub const DEFAULT_MAX_STREAMS_PER_SUBJECT: usize = 16;
/// Default per-stream send queue, in events.
pub const DEFAULT_SEND_QUEUE: usize = 256;
/// Default time a stream may wait on a full send queue before its client is
/// declared a slow consumer.
pub const DEFAULT_MAX_LAG: Duration = Duration::from_secs(30);
/// Default cap on chat messages per request.
pub const DEFAULT_MAX_MESSAGES: usize = 256;
/// Default longest stream.
pub const DEFAULT_MAX_STREAM_DURATION: Duration = Duration::from_secs(30 * 60);
/// Default largest request head (request line plus headers).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default time a client gets to send its request headers (and the longest a
/// kept-alive connection may sit idle).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client gets to send a request body, counted from its
/// request head: a 256 KiB body (`max_body_bytes`) needs only about 70 kbit/s
/// for it, while a client dripping its body byte by byte is cut off.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default kernel send buffer asked for each accepted connection
/// (`SO_SNDBUF`; Linux doubles it for its bookkeeping). Left to autotuning
/// it grows to `tcp_wmem`'s maximum (4 MiB on common kernels) once a client
/// stops reading, which is what a stalled reader would then pin. A chat
/// stream is a few KB/s, so 64 KiB still covers a long, fast path.
pub const DEFAULT_SEND_BUFFER_BYTES: usize = 64 * 1024;
/// Default cap on channels that subjects created, server-wide (cluster-wide
/// with Redis). Each keeps up to `channel_max_events` events.
pub const DEFAULT_MAX_CHANNELS: usize = 10_000;
/// Default cap on channels one subject's publishes and subscribes created
/// that exist at once.
pub const DEFAULT_MAX_CHANNELS_PER_SUBJECT: usize = 100;
/// Default cap on open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 25_000;
/// Default policy of cluster-wide limits when Redis fails: this process's
/// own limits (the service stays up; limits still apply, per replica).
pub const DEFAULT_LIMITS_ON_STORE_FAILURE: OnStoreFailure = OnStoreFailure::Open;
/// Default stream lease ttl: a dead replica's slots are back within it.
pub const DEFAULT_STREAM_LEASE_TTL: Duration = Duration::from_secs(15);
/// Shortest stream lease ttl: renewals run every third of it, and each may
/// take a few hundred milliseconds on a busy Redis.
pub const MIN_STREAM_LEASE_TTL: Duration = Duration::from_secs(1);
/// Smallest request-head buffer hyper accepts.
pub const MIN_HEADER_BYTES: usize = 8192;
/// Default time generation continues after its client left, so a reconnect
/// can resume.
pub const DEFAULT_DETACH_GRACE: Duration = Duration::from_secs(15);
/// Default time a finished stream stays resumable.
pub const DEFAULT_STREAM_TTL: Duration = Duration::from_secs(300);
/// Default events kept per stream log.
pub const DEFAULT_STREAM_MAX_EVENTS: usize = 20_000;
/// Default longest wait before a produced event is sent to Redis: long
/// enough that a paced stream's deltas go as runs of about ten per entry
/// (at 500 streams of 5 ms, Redis CPU per character 0.8 against 1.3 µs at
/// 20 ms; BENCHMARKS.md), short enough not to be seen by a reader on
/// another replica.
pub const DEFAULT_REPLICATION_WINDOW: Duration = Duration::from_millis(50);
/// Longest `replication_window` accepted.
pub const MAX_REPLICATION_WINDOW: Duration = Duration::from_secs(1);
/// Default events kept per channel log.
pub const DEFAULT_CHANNEL_MAX_EVENTS: usize = 1000;
/// Default time an unused channel (no subscriber, no publish) is kept.
pub const DEFAULT_CHANNEL_TTL: Duration = Duration::from_secs(3600);
/// Default largest published `data` (as JSON text).
pub const DEFAULT_MAX_PUBLISH_BYTES: usize = 64 * 1024;
/// Default time between two looks at the TLS certificate and key files
/// (modification time and size) for a rotation.
pub const DEFAULT_TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Default cap on concurrent HTTP/2 streams per connection: above the 100
/// browsers need for a page full of `EventSource`s, low enough that one
/// connection cannot hold more than a small share of `max_streams`.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 250;
/// Shortest HMAC secret accepted (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_BYTES: usize = 32;

/// Every setting, all optional, as read from one source. The same struct is
/// the clap argument group (flags and env) and what the TOML file is read
/// into (its sections are only grouping).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(mut_args = help_with_default)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, global = true, env = "TOKENGATE_LISTEN")]
    pub listen: Option<String>,
    /// TCP listen backlog (pending connections the kernel queues).
    #[arg(long, global = true, env = "TOKENGATE_LISTEN_BACKLOG")]
    pub listen_backlog: Option<u32>,
    /// HMAC secret for HS256/384/512 (at least 32 bytes). Without any key a
    /// random per-process secret is generated and a demo token printed.
    #[arg(long, global = true, env = "TOKENGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the HMAC secret (trailing newline ignored).
    #[arg(long, global = true, env = "TOKENGATE_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key (RSA, EC P-256 or Ed25519) that verifies tokens.
    #[arg(long, global = true, env = "TOKENGATE_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// PEM private key `tokengate token` signs with when a public key is used.
    #[arg(long, global = true, env = "TOKENGATE_JWT_PRIVATE_KEY_FILE")]
    pub jwt_private_key_file: Option<PathBuf>,
    /// Allowed JWT algorithms, comma separated (default: HS256 with a
    /// secret, the key's algorithm with a public key).
    #[arg(long, global = true, env = "TOKENGATE_JWT_ALGORITHMS", value_delimiter = ',')]
    pub jwt_algorithms: Option<Vec<String>>,
    /// Required `iss` claim.
    #[arg(long, global = true, env = "TOKENGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, global = true, env = "TOKENGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock-skew leeway for `exp`/`nbf` (e.g. `30s`).
    #[arg(long, global = true, env = "TOKENGATE_JWT_LEEWAY")]
    pub jwt_leeway: Option<String>,
    /// Cookie name that carries the token.
    #[arg(long, global = true, env = "TOKENGATE_TOKEN_COOKIE")]
    pub token_cookie: Option<String>,
    /// Query parameter name that carries the token.
    #[arg(long, global = true, env = "TOKENGATE_TOKEN_QUERY")]
    pub token_query: Option<String>,
    /// How long a stream or subscription may outlive the `exp` of the
    /// token that opened it before it ends with `token_expired` (e.g.
    /// `5m`; `0s` ends it at `exp`).
    #[arg(long, global = true, env = "TOKENGATE_TOKEN_GRACE")]
    pub token_grace: Option<String>,
    /// JWKS URL (http or https) of the identity provider whose keys verify
    /// tokens, selected by `kid`; instead of a secret or public key.
    #[arg(long, global = true, env = "TOKENGATE_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Local JWKS file (alone, or beside `jwks_url`: the union is used);
    /// re-read on every refresh.
    #[arg(long, global = true, env = "TOKENGATE_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// JWKS refresh interval when the answer has no `Cache-Control: max-age`
    /// (e.g. `5m`).
    #[arg(long, global = true, env = "TOKENGATE_JWKS_REFRESH")]
    pub jwks_refresh: Option<String>,
    /// Shortest JWKS refresh interval (a lower `max-age` is raised to it);
    /// also the shortest time between refreshes triggered by unknown `kid`s,
    /// and the retry delay after a failed fetch.
    #[arg(long, global = true, env = "TOKENGATE_JWKS_REFRESH_MIN")]
    pub jwks_refresh_min: Option<String>,
    /// Longest JWKS refresh interval (a higher `max-age` is lowered to it).
    #[arg(long, global = true, env = "TOKENGATE_JWKS_REFRESH_MAX")]
    pub jwks_refresh_max: Option<String>,
    /// Query parameter name that carries a stream ticket (from
    /// `POST /v1/tickets`).
    #[arg(long, global = true, env = "TOKENGATE_TICKET_QUERY")]
    pub ticket_query: Option<String>,
    /// How long a stream ticket is valid before its first use (e.g. `30s`).
    #[arg(long, global = true, env = "TOKENGATE_TICKET_TTL")]
    pub ticket_ttl: Option<String>,
    /// Origins allowed by CORS, comma separated (`*` = any origin, without
    /// credentials).
    #[arg(long, global = true, env = "TOKENGATE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Option<Vec<String>>,
    /// Heartbeat comment interval (e.g. `15s`).
    #[arg(long, global = true, env = "TOKENGATE_HEARTBEAT")]
    pub heartbeat: Option<String>,
    /// `retry:` reconnect hint sent first on every stream (e.g. `3s`).
    #[arg(long, global = true, env = "TOKENGATE_RETRY")]
    pub retry: Option<String>,
    /// Default milliseconds between deltas.
    #[arg(long, global = true, env = "TOKENGATE_PACE_MS")]
    pub pace_ms: Option<u32>,
    /// Lowest `pace_ms` a request may ask for.
    #[arg(long, global = true, env = "TOKENGATE_PACE_MIN_MS")]
    pub pace_min_ms: Option<u32>,
    /// Highest `pace_ms` a request may ask for.
    #[arg(long, global = true, env = "TOKENGATE_PACE_MAX_MS")]
    pub pace_max_ms: Option<u32>,
    /// Per-generator default pace, `name=ms`, comma separated.
    #[arg(long, global = true, env = "TOKENGATE_GENERATOR_PACE", value_delimiter = ',')]
    pub generator_pace: Option<Vec<String>>,
    /// Generator used when a request names none.
    #[arg(long, global = true, env = "TOKENGATE_DEFAULT_GENERATOR")]
    pub default_generator: Option<String>,
    /// Run the built-in demo feeds (`demo.counter`, `demo.status`,
    /// `demo.metrics`, `demo.clock`) behind `/dashboard` (default true).
    #[arg(long, global = true, env = "TOKENGATE_DEMO_FEEDS")]
    pub demo_feeds: Option<bool>,
    /// How often the demo feeds publish (e.g. `1s`).
    #[arg(long, global = true, env = "TOKENGATE_DEMO_FEEDS_EVERY")]
    pub demo_feeds_every: Option<String>,
    /// Directory of `*.txt` texts for the `demo` generator (default: the
    /// texts shipped in the binary).
    #[arg(long, global = true, env = "TOKENGATE_PROMPTS_DIR")]
    pub prompts_dir: Option<PathBuf>,
    /// Largest request body in bytes.
    #[arg(long, global = true, env = "TOKENGATE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest prompt in bytes.
    #[arg(long, global = true, env = "TOKENGATE_MAX_PROMPT_BYTES")]
    pub max_prompt_bytes: Option<usize>,
    /// Time streams get to finish after SIGTERM/SIGINT (e.g. `10s`).
    #[arg(long, global = true, env = "TOKENGATE_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// `retry:` hint sent with the `shutdown` event (e.g. `1s`).
    #[arg(long, global = true, env = "TOKENGATE_SHUTDOWN_RETRY")]
    pub shutdown_retry: Option<String>,
    /// PEM certificate chain (leaf first) to serve TLS with; needs
    /// `tls_key`. With TLS, ALPN offers `h2` and `http/1.1`.
    #[arg(long, global = true, env = "TOKENGATE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    #[arg(long, global = true, env = "TOKENGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// How often the TLS files are checked for a rotation (e.g. `5s`; `0s`:
    /// only on SIGHUP).
    #[arg(long, global = true, env = "TOKENGATE_TLS_RELOAD_INTERVAL")]
    pub tls_reload_interval: Option<String>,
    /// Also accept HTTP/2 with prior knowledge (h2c) on a plain listener,
    /// beside HTTP/1.1 (for proxies and meshes that speak h2c to backends).
    #[arg(long, global = true, env = "TOKENGATE_H2C")]
    pub h2c: Option<bool>,
    /// Concurrent HTTP/2 streams allowed per connection (the client queues
    /// beyond).
    #[arg(long, global = true, env = "TOKENGATE_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Sustained requests per minute per token subject (0 = no limit).
    #[arg(long, global = true, env = "TOKENGATE_RATE_SUBJECT_PER_MIN")]
    pub rate_subject_per_min: Option<u32>,
    /// Requests a subject may make at once before the rate applies.
    #[arg(long, global = true, env = "TOKENGATE_RATE_SUBJECT_BURST")]
    pub rate_subject_burst: Option<u32>,
    /// Sustained requests per minute per client IP (0 = no limit).
    #[arg(long, global = true, env = "TOKENGATE_RATE_IP_PER_MIN")]
    pub rate_ip_per_min: Option<u32>,
    /// Requests an IP may make at once before the rate applies.
    #[arg(long, global = true, env = "TOKENGATE_RATE_IP_BURST")]
    pub rate_ip_burst: Option<u32>,
    /// Proxies (IPs or CIDRs, comma separated) whose X-Forwarded-For /
    /// Forwarded headers are believed.
    #[arg(long, global = true, env = "TOKENGATE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Open streams allowed server-wide (503 beyond).
    #[arg(long, global = true, env = "TOKENGATE_MAX_STREAMS")]
    pub max_streams: Option<usize>,
    /// Open streams allowed per subject (429 beyond).
    #[arg(long, global = true, env = "TOKENGATE_MAX_STREAMS_PER_SUBJECT")]
    pub max_streams_per_subject: Option<usize>,
    /// Events a stream may have waiting for its client.
    #[arg(long, global = true, env = "TOKENGATE_SEND_QUEUE")]
    pub send_queue: Option<usize>,
    /// How long a stream may wait on a full send queue before the client is
    /// ended as a slow consumer (e.g. `30s`).
    #[arg(long, global = true, env = "TOKENGATE_MAX_LAG")]
    pub max_lag: Option<String>,
    /// Chat messages allowed per request.
    #[arg(long, global = true, env = "TOKENGATE_MAX_MESSAGES")]
    pub max_messages: Option<usize>,
    /// Longest a stream may run (e.g. `30m`).
    #[arg(long, global = true, env = "TOKENGATE_MAX_STREAM_DURATION")]
    pub max_stream_duration: Option<String>,
    /// Largest request head (request line and headers) in bytes.
    #[arg(long, global = true, env = "TOKENGATE_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Time allowed to send the request headers; also how long a kept-alive
    /// connection may sit idle (e.g. `10s`).
    #[arg(long, global = true, env = "TOKENGATE_HEADER_TIMEOUT")]
    pub header_timeout: Option<String>,
    /// Time allowed to send a request body, from the end of its head (e.g.
    /// `30s`); a body not complete by then is answered 408 and the
    /// connection closed.
    #[arg(long, global = true, env = "TOKENGATE_BODY_TIMEOUT")]
    pub body_timeout: Option<String>,
    /// Open connections allowed (503 and close beyond).
    #[arg(long, global = true, env = "TOKENGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Kernel send buffer per connection in bytes (`SO_SNDBUF`): bounds what
    /// a client that stops reading holds in the kernel; 0 leaves it to the
    /// kernel's autotuning.
    #[arg(long, global = true, env = "TOKENGATE_SEND_BUFFER_BYTES")]
    pub send_buffer_bytes: Option<usize>,
    /// Channels created by subjects that may exist at once, server-wide
    /// (cluster-wide with Redis); creating one more is refused (503
    /// `too_many_channels`), existing ones stay usable.
    #[arg(long, global = true, env = "TOKENGATE_MAX_CHANNELS")]
    pub max_channels: Option<usize>,
    /// Channels one subject's publishes or subscribes may have created that
    /// exist at once (429 `too_many_channels` beyond); a channel counts until
    /// it is swept (`channel_ttl` unused).
    #[arg(long, global = true, env = "TOKENGATE_MAX_CHANNELS_PER_SUBJECT")]
    pub max_channels_per_subject: Option<usize>,
    /// With Redis, what the cluster-wide limits do when Redis cannot be
    /// asked: `closed` refuses (503 `limits_unavailable`), `open` applies
    /// this process's own limits.
    #[arg(long, global = true, env = "TOKENGATE_LIMITS_ON_STORE_FAILURE")]
    pub limits_on_store_failure: Option<String>,
    /// With Redis, how long a stream's cluster-wide slot outlives its
    /// replica (renewed every third of it), e.g. `15s`.
    #[arg(long, global = true, env = "TOKENGATE_STREAM_LEASE_TTL")]
    pub stream_lease_ttl: Option<String>,
    /// How long generation continues after its client left, so a reconnect
    /// can resume (e.g. `15s`; `0s` cancels at once).
    #[arg(long, global = true, env = "TOKENGATE_DETACH_GRACE")]
    pub detach_grace: Option<String>,
    /// How long a finished stream stays resumable (e.g. `5m`).
    #[arg(long, global = true, env = "TOKENGATE_STREAM_TTL")]
    pub stream_ttl: Option<String>,
    /// Events kept per stream for resume; older ones are dropped.
    #[arg(long, global = true, env = "TOKENGATE_STREAM_MAX_EVENTS")]
    pub stream_max_events: Option<usize>,
    /// With Redis, the longest a produced event waits before it is sent to
    /// Redis (e.g. `50ms`; `0s` sends as soon as the previous write is done).
    #[arg(long, global = true, env = "TOKENGATE_REPLICATION_WINDOW")]
    pub replication_window: Option<String>,
    /// Events kept per channel for `Last-Event-ID` replay.
    #[arg(long, global = true, env = "TOKENGATE_CHANNEL_MAX_EVENTS")]
    pub channel_max_events: Option<usize>,
    /// How long a channel without subscribers or publishes is kept (e.g. `1h`).
    #[arg(long, global = true, env = "TOKENGATE_CHANNEL_TTL")]
    pub channel_ttl: Option<String>,
    /// Largest published `data`, in bytes of JSON.
    #[arg(long, global = true, env = "TOKENGATE_MAX_PUBLISH_BYTES")]
    pub max_publish_bytes: Option<usize>,
    /// Redis URL (`redis://host:6379/0`): stream logs and channels shared by
    /// all replicas. Without it everything is in this process's memory.
    #[arg(long, global = true, env = "TOKENGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// PEM CA certificate(s) that a `rediss://` server's certificate must
    /// chain to, instead of the system roots (a private CA).
    #[arg(long, global = true, env = "TOKENGATE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// Shortcut for one upstream named `openai`: its base URL (up to `/v1`).
    #[arg(long, global = true, env = "TOKENGATE_UPSTREAM_URL")]
    pub upstream_url: Option<String>,
    /// Model name for the `--upstream-url` upstream.
    #[arg(long, global = true, env = "TOKENGATE_UPSTREAM_MODEL")]
    pub upstream_model: Option<String>,
    /// Environment variable holding the `--upstream-url` upstream's API key.
    #[arg(long, global = true, env = "TOKENGATE_UPSTREAM_API_KEY_ENV")]
    pub upstream_api_key_env: Option<String>,
    /// Upstream model servers, by name (TOML only: `[upstreams.NAME]`).
    #[arg(skip)]
    pub upstreams: Option<BTreeMap<String, UpstreamSettings>>,
    /// Usage quotas (TOML only: the `[quota]` table, see
    /// [`crate::quota::plan::QuotaSettings`]).
    #[arg(skip)]
    pub quota: Option<QuotaSettings>,
    /// Graphemes per `chat.completion.chunk` on `/v1/chat/completions`.
    #[arg(long, global = true, env = "TOKENGATE_OPENAI_CHUNK_GRAPHEMES")]
    pub openai_chunk_graphemes: Option<usize>,
    /// Log format: `text` or `json`.
    #[arg(long, global = true, env = "TOKENGATE_LOG_FORMAT")]
    pub log_format: Option<String>,
}

/// Each setting's default as `--help` shows it, from the `DEFAULT_*`
/// constants the validation uses, so the two cannot drift apart. Settings
/// without one fixed default (a random secret, the key's algorithm, the
/// shipped texts, none) are not listed; their help says what happens.
pub fn help_defaults() -> Vec<(&'static str, String)> {
    let time = |d: Duration| humantime::format_duration(d).to_string();
    vec![
        ("listen", DEFAULT_LISTEN.to_owned()),
        ("listen_backlog", DEFAULT_LISTEN_BACKLOG.to_string()),
        ("jwt_leeway", time(DEFAULT_JWT_LEEWAY)),
        ("token_cookie", DEFAULT_TOKEN_COOKIE.to_owned()),
        ("token_query", DEFAULT_TOKEN_QUERY.to_owned()),
        ("jwks_refresh", time(DEFAULT_JWKS_REFRESH)),
        ("jwks_refresh_min", time(DEFAULT_JWKS_REFRESH_MIN)),
        ("jwks_refresh_max", time(DEFAULT_JWKS_REFRESH_MAX)),
        ("ticket_query", DEFAULT_TICKET_QUERY.to_owned()),
        ("ticket_ttl", time(DEFAULT_TICKET_TTL)),
        ("heartbeat", time(DEFAULT_HEARTBEAT)),
        ("retry", time(DEFAULT_RETRY)),
        ("pace_ms", DEFAULT_PACE_MS.to_string()),
        ("pace_min_ms", DEFAULT_PACE_MIN_MS.to_string()),
        ("pace_max_ms", DEFAULT_PACE_MAX_MS.to_string()),
        ("default_generator", DEFAULT_GENERATOR.to_owned()),
        ("demo_feeds", "true".to_owned()),
        ("demo_feeds_every", time(DEFAULT_DEMO_FEEDS_EVERY)),
        ("max_body_bytes", DEFAULT_MAX_BODY_BYTES.to_string()),
        ("max_prompt_bytes", DEFAULT_MAX_PROMPT_BYTES.to_string()),
        ("shutdown_grace", time(DEFAULT_SHUTDOWN_GRACE)),
        ("shutdown_retry", time(DEFAULT_SHUTDOWN_RETRY)),
        ("rate_subject_per_min", DEFAULT_RATE_SUBJECT_PER_MIN.to_string()),
        ("rate_subject_burst", DEFAULT_RATE_SUBJECT_BURST.to_string()),
        ("rate_ip_per_min", DEFAULT_RATE_IP_PER_MIN.to_string()),
        ("rate_ip_burst", DEFAULT_RATE_IP_BURST.to_string()),
        ("max_streams", DEFAULT_MAX_STREAMS.to_string()),
        ("max_streams_per_subject", DEFAULT_MAX_STREAMS_PER_SUBJECT.to_string()),
        ("send_queue", DEFAULT_SEND_QUEUE.to_string()),
        ("max_lag", time(DEFAULT_MAX_LAG)),
        ("max_messages", DEFAULT_MAX_MESSAGES.to_string()),
        ("max_stream_duration", time(DEFAULT_MAX_STREAM_DURATION)),
        ("max_header_bytes", DEFAULT_MAX_HEADER_BYTES.to_string()),
        ("header_timeout", time(DEFAULT_HEADER_TIMEOUT)),
        ("body_timeout", time(DEFAULT_BODY_TIMEOUT)),
        ("max_connections", DEFAULT_MAX_CONNECTIONS.to_string()),
        ("send_buffer_bytes", DEFAULT_SEND_BUFFER_BYTES.to_string()),
        ("max_channels", DEFAULT_MAX_CHANNELS.to_string()),
        ("max_channels_per_subject", DEFAULT_MAX_CHANNELS_PER_SUBJECT.to_string()),
        ("limits_on_store_failure", DEFAULT_LIMITS_ON_STORE_FAILURE.as_str().to_owned()),
        ("stream_lease_ttl", time(DEFAULT_STREAM_LEASE_TTL)),
        ("detach_grace", time(DEFAULT_DETACH_GRACE)),
        ("stream_ttl", time(DEFAULT_STREAM_TTL)),
        ("stream_max_events", DEFAULT_STREAM_MAX_EVENTS.to_string()),
        ("replication_window", time(DEFAULT_REPLICATION_WINDOW)),
        ("channel_max_events", DEFAULT_CHANNEL_MAX_EVENTS.to_string()),
        ("channel_ttl", time(DEFAULT_CHANNEL_TTL)),
        ("max_publish_bytes", DEFAULT_MAX_PUBLISH_BYTES.to_string()),
        ("tls_reload_interval", time(DEFAULT_TLS_RELOAD_INTERVAL)),
        ("max_concurrent_streams", DEFAULT_MAX_CONCURRENT_STREAMS.to_string()),
        ("openai_chunk_graphemes", DEFAULT_OPENAI_CHUNK_GRAPHEMES.to_string()),
        ("log_format", DEFAULT_LOG_FORMAT.to_owned()),
    ]
}

/// Appends `[default: ...]` (clap's own notation) to a flag's help without
/// giving clap the default: a clap default would fill the field, and the
/// layering ([`Settings::or`]) needs a flag that was not given to stay
/// `None` so that env and file can still supply it.
fn help_with_default(arg: clap::Arg) -> clap::Arg {
    let Some((_, default)) = help_defaults().into_iter().find(|(id, _)| arg.get_id() == *id) else { return arg };
    let help = arg.get_help().map(|help| format!("{help} [default: {default}]"));
    let long_help = arg.get_long_help().map(|help| format!("{help}\n\n[default: {default}]"));
    let arg = match help {
        Some(help) => arg.help(help),
        None => arg,
    };
    match long_help {
        Some(long_help) => arg.long_help(long_help),
        None => arg,
    }
}

macro_rules! layer_fields {
    ($high:ident, $low:ident; $($field:ident),* $(,)?) => {
        Settings { $($field: $high.$field.or($low.$field)),* }
    };
}

impl Settings {
    /// Fills every setting missing here from `lower` (e.g. flags over file).
    pub fn or(self, lower: Settings) -> Settings {
        let high = self;
        layer_fields!(high, lower;
            listen, listen_backlog, jwt_secret, jwt_secret_file, jwt_public_key_file,
            jwt_private_key_file, jwt_algorithms, jwt_issuer, jwt_audience, jwt_leeway,
            token_cookie, token_query, token_grace, ticket_query, ticket_ttl, cors_origins, heartbeat, retry, pace_ms, pace_min_ms,
            pace_max_ms, generator_pace, default_generator, demo_feeds, demo_feeds_every, prompts_dir, max_body_bytes,
            max_prompt_bytes, shutdown_grace, shutdown_retry, log_format, rate_subject_per_min,
            rate_subject_burst, rate_ip_per_min, rate_ip_burst, trusted_proxies, max_streams,
            max_streams_per_subject, send_queue, max_lag, max_messages, max_stream_duration,
            max_header_bytes, header_timeout, body_timeout, max_connections, send_buffer_bytes, max_channels,
            max_channels_per_subject, limits_on_store_failure,
            stream_lease_ttl, detach_grace, stream_ttl,
            stream_max_events, replication_window, channel_max_events, channel_ttl, max_publish_bytes, redis_url, upstream_url,
            upstream_model, upstream_api_key_env, upstreams, quota, openai_chunk_graphemes,
            jwks_url, jwks_file, jwks_refresh, jwks_refresh_min, jwks_refresh_max,
            tls_cert, tls_key, tls_reload_interval, h2c, max_concurrent_streams, redis_ca_file)
    }

    /// Reads a TOML settings file (flat keys, or grouped in sections).
    pub fn from_toml_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::invalid("config", format!("cannot read {}: {e}", path.display())))?;
        file::parse(path, &text)
    }

    /// Reads TOML settings from text, as [`Settings::from_toml_file`] reads
    /// a file (errors name it `<string>`): for callers that already hold
    /// the text, such as the config fuzz target.
    pub fn from_toml_str(text: &str) -> Result<Settings, ConfigError> {
        file::parse(Path::new("<string>"), text)
    }
}

/// A setting that cannot be used, named the way the user wrote it.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{setting}` (--{flag} / TOKENGATE_{env}): {reason}")]
pub struct ConfigError {
    setting: &'static str,
    flag: String,
    env: String,
    reason: String,
}

impl ConfigError {
    /// An error about `setting` (its TOML name).
    pub fn invalid(setting: &'static str, reason: impl Into<String>) -> Self {
        Self { setting, flag: setting.replace('_', "-"), env: setting.to_ascii_uppercase(), reason: reason.into() }
    }

    /// The TOML name of the offending setting.
    pub fn setting(&self) -> &'static str {
        self.setting
    }
}

// The layers below report what is wrong; which setting it came from is
// known only here, so the mapping to a setting name lives here too.

impl From<AuthSetupError> for ConfigError {
    fn from(e: AuthSetupError) -> Self {
        let setting = match e {
            AuthSetupError::PublicKey => "jwt_public_key_file",
            AuthSetupError::PrivateKey(_) => "jwt_private_key_file",
            AuthSetupError::UnknownAlgorithm(_) | AuthSetupError::AlgorithmMismatch(_) => "jwt_algorithms",
            AuthSetupError::JwksUrl(_) | AuthSetupError::JwksClient(_) => "jwks_url",
            AuthSetupError::JwksFile(_) => "jwks_file",
        };
        ConfigError::invalid(setting, e.to_string())
    }
}

impl From<UpstreamConfigError> for ConfigError {
    fn from(e: UpstreamConfigError) -> Self {
        ConfigError::invalid("upstreams", e.to_string())
    }
}

impl From<RegistryError> for ConfigError {
    fn from(e: RegistryError) -> Self {
        let setting = match e {
            RegistryError::PromptsDir { .. } => "prompts_dir",
            RegistryError::Client { .. } | RegistryError::NameTaken(_) => "upstreams",
        };
        ConfigError::invalid(setting, e.to_string())
    }
}

/// How deltas are paced.
#[derive(Debug, Clone)]
pub struct PaceConfig {
    /// Default for generators without their own.
    pub default: Duration,
    /// Lowest a request may ask for.
    pub min: Duration,
    /// Highest a request may ask for.
    pub max: Duration,
    /// Per-generator defaults.
    pub per_generator: Vec<(String, Duration)>,
}

impl PaceConfig {
    /// The pace for one request: its own wish clamped to the bounds, or the
    /// generator's default.
    pub fn resolve(&self, generator_default: Duration, requested_ms: Option<u32>) -> Duration {
        match requested_ms {
            Some(ms) => millis(ms).clamp(self.min, self.max),
            None => generator_default,
        }
    }
}

/// Stream behaviour.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// `retry:` hint at the start of each stream.
    pub retry: Duration,
    /// Pacing.
    pub pace: PaceConfig,
    /// Generator used when a request names none.
    pub default_generator: String,
    /// Largest prompt (bytes, counting chat message contents).
    pub max_prompt_bytes: usize,
}

/// Limits, validated.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Per-subject request rate (`None`: unlimited).
    pub rate_subject: Option<Rate>,
    /// Per-IP request rate (`None`: unlimited).
    pub rate_ip: Option<Rate>,
    /// Proxies whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Server-wide open stream cap.
    pub max_streams: usize,
    /// Per-subject open stream cap.
    pub max_streams_per_subject: usize,
    /// Per-stream send queue (events).
    pub send_queue: usize,
    /// Longest wait on a full send queue.
    pub max_lag: Duration,
    /// Chat messages per request.
    pub max_messages: usize,
    /// Longest stream.
    pub max_stream_duration: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Header read time and keep-alive idle time.
    pub header_timeout: Duration,
    /// Time to send a request body, from the end of its head.
    pub body_timeout: Duration,
    /// Open connection cap.
    pub max_connections: usize,
    /// `SO_SNDBUF` for accepted connections; `None` leaves it to the kernel.
    pub send_buffer: Option<usize>,
    /// Cap on channels subjects created, server-wide (cluster-wide with a shared store).
    pub max_channels: usize,
    /// Cap on channels one subject created.
    pub max_channels_per_subject: usize,
    /// With a shared store: what cluster-wide limits do when it fails.
    pub on_store_failure: OnStoreFailure,
    /// With a shared store: how long a stream lease lives unrenewed.
    pub stream_lease_ttl: Duration,
}

/// Stream and channel retention, validated.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Generation continues this long without a client.
    pub detach_grace: Duration,
    /// A finished stream stays resumable this long.
    pub stream_ttl: Duration,
    /// Events kept per stream.
    pub stream_max_events: usize,
    /// With Redis, the longest an event waits to be replicated.
    pub replication_window: Duration,
    /// Events kept per channel.
    pub channel_max_events: usize,
    /// Unused channels are dropped after this long.
    pub channel_ttl: Duration,
    /// Largest published `data`.
    pub max_publish_bytes: usize,
    /// The shared store, if any (the URL may carry a password: never logged).
    pub redis_url: Option<Secret>,
    /// CA certificates (PEM) a `rediss://` server must chain to, read at
    /// start-up; `None`: the system roots.
    pub redis_ca: Option<Vec<u8>>,
}

/// Native TLS, validated: the files exist; their contents are read (and
/// re-read on rotation) by the server.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// The PEM certificate chain.
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
    /// How often the files are checked for a change (`None`: SIGHUP only).
    pub reload_every: Option<Duration>,
}

/// HTTP/2: which listeners speak it and its per-connection stream cap.
#[derive(Debug, Clone)]
pub struct Http2Config {
    /// A plain listener also takes h2c with prior knowledge.
    pub h2c: bool,
    /// Concurrent streams per connection.
    pub max_concurrent_streams: u32,
}

/// Validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Listen backlog.
    pub listen_backlog: u32,
    /// Authentication.
    pub auth: AuthConfig,
    /// How long a stream ticket waits for its first use.
    pub ticket_ttl: Duration,
    /// Streams.
    pub stream: StreamConfig,
    /// CORS: `None` = no CORS headers, `Some(["*"])` = any origin without
    /// credentials, else the exact origins, with credentials.
    pub cors_origins: Option<Vec<String>>,
    /// Where the `demo` texts come from (`None`: shipped ones).
    pub prompts_dir: Option<PathBuf>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Time streams get after SIGTERM.
    pub shutdown_grace: Duration,
    /// `retry:` hint with `shutdown`.
    pub shutdown_retry: Duration,
    /// Emit JSON log lines.
    pub log_json: bool,
    /// Limits.
    pub limits: LimitsConfig,
    /// Stream and channel retention.
    pub store: StoreConfig,
    /// Upstream model servers.
    pub upstreams: Vec<Upstream>,
    /// Graphemes per OpenAI chunk.
    pub openai_chunk_graphemes: usize,
    /// Usage quotas; `None` when no budget is configured.
    pub quota: Option<PlanBook>,
    /// How long a connection may outlive its token's `exp`.
    pub token_grace: Duration,
    /// How often the demo feeds publish; `None` when they are off.
    pub demo_feeds: Option<Duration>,
    /// Native TLS; `None`: plain TCP.
    pub tls: Option<TlsConfig>,
    /// HTTP/2 settings (used with TLS, or on a plain listener with h2c).
    pub http2: Http2Config,
}

fn duration(setting: &'static str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v.trim())
            .map_err(|e| ConfigError::invalid(setting, format!("`{v}` is not a duration like `15s` or `500ms` ({e})"))),
    }
}

/// At most [`MAX_REPLICATION_WINDOW`]: longer, the terminal event aside,
/// readers on other replicas would lag by more than a lease refresh.
fn replication_window(value: Option<&str>) -> Result<Duration, ConfigError> {
    let window = duration("replication_window", value, DEFAULT_REPLICATION_WINDOW)?;
    if window > MAX_REPLICATION_WINDOW {
        return Err(ConfigError::invalid(
            "replication_window",
            format!("must be at most {}", humantime::format_duration(MAX_REPLICATION_WINDOW)),
        ));
    }
    Ok(window)
}

fn read_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::invalid(setting, format!("cannot read {}: {e}", path.display())))
}

impl Config {
    /// Validates settings into a runtime config, one group at a time (each
    /// step below reads the settings of one concern). With no key
    /// configured, a random per-process secret is generated (the no-config
    /// demo start).
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let (listen, listen_backlog) = listen(&s)?;
        let quota = quota(&s)?;
        let auth = auth(&s)?.with_class_claim(quota.as_ref().and_then(|q| q.claim.clone()));
        let ticket_ttl = ticket_ttl(&s)?;
        let stream = stream(&s)?;
        let cors_origins = cors_origins(s.cors_origins.as_deref())?;
        let log_json = log_json(s.log_format.as_deref())?;
        let prompts_dir = prompts_dir(s.prompts_dir.as_deref())?;
        Ok(Config {
            listen,
            listen_backlog,
            auth,
            ticket_ttl,
            stream,
            cors_origins,
            prompts_dir,
            max_body_bytes: s.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            shutdown_grace: duration("shutdown_grace", s.shutdown_grace.as_deref(), DEFAULT_SHUTDOWN_GRACE)?,
            shutdown_retry: duration("shutdown_retry", s.shutdown_retry.as_deref(), DEFAULT_SHUTDOWN_RETRY)?,
            log_json,
            limits: limits(&s)?,
            upstreams: upstreams(&s)?,
            openai_chunk_graphemes: at_least_one(
                "openai_chunk_graphemes",
                s.openai_chunk_graphemes,
                DEFAULT_OPENAI_CHUNK_GRAPHEMES,
            )?,
            store: store(&s)?,
            quota,
            token_grace: duration("token_grace", s.token_grace.as_deref(), DEFAULT_TOKEN_GRACE)?,
            demo_feeds: demo_feeds(&s)?,
            tls: tls(&s)?,
            http2: http2(&s)?,
        })
    }
}

fn demo_feeds(s: &Settings) -> Result<Option<Duration>, ConfigError> {
    let every = duration("demo_feeds_every", s.demo_feeds_every.as_deref(), DEFAULT_DEMO_FEEDS_EVERY)?;
    if every < Duration::from_millis(10) {
        return Err(ConfigError::invalid("demo_feeds_every", "must be at least 10ms"));
    }
    Ok(s.demo_feeds.unwrap_or(true).then_some(every))
}

fn quota(s: &Settings) -> Result<Option<PlanBook>, ConfigError> {
    match &s.quota {
        None => Ok(None),
        Some(q) => PlanBook::new(q).map_err(|e| ConfigError::invalid("quota", e.to_string())),
    }
}

fn listen(s: &Settings) -> Result<(SocketAddr, u32), ConfigError> {
    let text = s.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen: SocketAddr = text
        .parse()
        .map_err(|e| ConfigError::invalid("listen", format!("`{text}` is not an address like 127.0.0.1:8080 ({e})")))?;
    let backlog = s.listen_backlog.unwrap_or(DEFAULT_LISTEN_BACKLOG);
    if backlog == 0 {
        return Err(ConfigError::invalid("listen_backlog", "must be at least 1"));
    }
    Ok((listen, backlog))
}

fn auth(s: &Settings) -> Result<AuthConfig, ConfigError> {
    let key = key_material(s)?;
    let auth = AuthConfig::new(
        key,
        s.jwt_algorithms.as_deref(),
        s.jwt_issuer.clone(),
        s.jwt_audience.clone(),
        duration("jwt_leeway", s.jwt_leeway.as_deref(), DEFAULT_JWT_LEEWAY)?,
        TokenSources {
            cookie: s.token_cookie.clone().unwrap_or_else(|| DEFAULT_TOKEN_COOKIE.to_owned()),
            query: s.token_query.clone().unwrap_or_else(|| DEFAULT_TOKEN_QUERY.to_owned()),
            ticket: ticket_query(s)?,
        },
    )?;
    if s.jwt_private_key_file.is_some() && auth.key_is_secret() {
        return Err(ConfigError::invalid("jwt_private_key_file", "only meaningful with jwt_public_key_file"));
    }
    Ok(auth)
}

/// The ticket parameter must differ from the token one, or a ticket would
/// be read as a (malformed) token.
fn ticket_query(s: &Settings) -> Result<String, ConfigError> {
    let name = s.ticket_query.clone().unwrap_or_else(|| DEFAULT_TICKET_QUERY.to_owned());
    if name.is_empty() || name == s.token_query.as_deref().unwrap_or(DEFAULT_TOKEN_QUERY) {
        return Err(ConfigError::invalid("ticket_query", "must be non-empty and differ from token_query"));
    }
    Ok(name)
}

fn ticket_ttl(s: &Settings) -> Result<Duration, ConfigError> {
    let ttl = duration("ticket_ttl", s.ticket_ttl.as_deref(), DEFAULT_TICKET_TTL)?;
    if ttl < Duration::from_secs(1) || ttl > MAX_TICKET_TTL {
        return Err(ConfigError::invalid("ticket_ttl", "must be between 1s and 1h"));
    }
    Ok(ttl)
}

fn stream(s: &Settings) -> Result<StreamConfig, ConfigError> {
    let pace = pace(s)?;
    let heartbeat = duration("heartbeat", s.heartbeat.as_deref(), DEFAULT_HEARTBEAT)?;
    if heartbeat.is_zero() {
        return Err(ConfigError::invalid("heartbeat", "must be above zero"));
    }
    Ok(StreamConfig {
        heartbeat,
        retry: duration("retry", s.retry.as_deref(), DEFAULT_RETRY)?,
        pace,
        default_generator: s.default_generator.clone().unwrap_or_else(|| DEFAULT_GENERATOR.to_owned()),
        max_prompt_bytes: s.max_prompt_bytes.unwrap_or(DEFAULT_MAX_PROMPT_BYTES),
    })
}

fn millis(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms))
}

fn pace(s: &Settings) -> Result<PaceConfig, ConfigError> {
    let pace = PaceConfig {
        default: millis(s.pace_ms.unwrap_or(DEFAULT_PACE_MS)),
        min: millis(s.pace_min_ms.unwrap_or(DEFAULT_PACE_MIN_MS)),
        max: millis(s.pace_max_ms.unwrap_or(DEFAULT_PACE_MAX_MS)),
        per_generator: s.generator_pace.iter().flatten().map(|item| generator_pace(item)).collect::<Result<_, _>>()?,
    };
    if pace.min > pace.max {
        return Err(ConfigError::invalid("pace_min_ms", "is above pace_max_ms"));
    }
    Ok(pace)
}

/// One `name=ms` item of `generator_pace`.
fn generator_pace(item: &str) -> Result<(String, Duration), ConfigError> {
    let (name, ms) = item
        .split_once('=')
        .ok_or_else(|| ConfigError::invalid("generator_pace", format!("`{item}` is not `name=ms`")))?;
    let ms: u32 = ms.trim().parse().map_err(|_| {
        ConfigError::invalid(
            "generator_pace",
            format!("`{item}`: `{ms}` is not a number of milliseconds (0 to {})", u32::MAX),
        )
    })?;
    Ok((name.trim().to_owned(), millis(ms)))
}

fn cors_origins(origins: Option<&[String]>) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(list) = origins else { return Ok(None) };
    let list: Vec<String> = list.iter().map(|o| o.trim().to_owned()).filter(|o| !o.is_empty()).collect();
    if list.iter().any(|o| o == "*") && list.len() > 1 {
        return Err(ConfigError::invalid("cors_origins", "`*` cannot be combined with explicit origins"));
    }
    for origin in list.iter().filter(|o| *o != "*") {
        let ok = (origin.starts_with("http://") || origin.starts_with("https://"))
            && !origin.ends_with('/')
            && axum::http::HeaderValue::from_str(origin).is_ok();
        if !ok {
            return Err(ConfigError::invalid(
                "cors_origins",
                format!("`{origin}` is not an origin like https://chat.example.com"),
            ));
        }
    }
    Ok(Some(list))
}

fn log_json(format: Option<&str>) -> Result<bool, ConfigError> {
    match format.unwrap_or(DEFAULT_LOG_FORMAT) {
        "text" => Ok(false),
        "json" => Ok(true),
        other => Err(ConfigError::invalid("log_format", format!("`{other}` is neither `text` nor `json`"))),
    }
}

fn prompts_dir(dir: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    match dir {
        Some(dir) if !dir.is_dir() => {
            Err(ConfigError::invalid("prompts_dir", format!("{} is not a directory", dir.display())))
        }
        dir => Ok(dir.map(Path::to_owned)),
    }
}

fn store(s: &Settings) -> Result<StoreConfig, ConfigError> {
    Ok(StoreConfig {
        detach_grace: duration("detach_grace", s.detach_grace.as_deref(), DEFAULT_DETACH_GRACE)?,
        stream_ttl: duration("stream_ttl", s.stream_ttl.as_deref(), DEFAULT_STREAM_TTL)?,
        stream_max_events: at_least_one("stream_max_events", s.stream_max_events, DEFAULT_STREAM_MAX_EVENTS)?,
        replication_window: replication_window(s.replication_window.as_deref())?,
        channel_max_events: at_least_one("channel_max_events", s.channel_max_events, DEFAULT_CHANNEL_MAX_EVENTS)?,
        channel_ttl: duration("channel_ttl", s.channel_ttl.as_deref(), DEFAULT_CHANNEL_TTL)?,
        max_publish_bytes: at_least_one("max_publish_bytes", s.max_publish_bytes, DEFAULT_MAX_PUBLISH_BYTES)?,
        redis_url: redis_url(s.redis_url.as_deref())?,
        redis_ca: redis_ca(s)?,
    })
}

fn redis_ca(s: &Settings) -> Result<Option<Vec<u8>>, ConfigError> {
    let Some(path) = &s.redis_ca_file else { return Ok(None) };
    if !s.redis_url.as_deref().is_some_and(|u| u.starts_with("rediss://")) {
        return Err(ConfigError::invalid("redis_ca_file", "only meaningful with a rediss:// redis_url"));
    }
    read_file("redis_ca_file", path).map(Some)
}

fn tls(s: &Settings) -> Result<Option<TlsConfig>, ConfigError> {
    let (cert, key) = match (&s.tls_cert, &s.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        (Some(_), None) => return Err(ConfigError::invalid("tls_key", "required with tls_cert")),
        (None, Some(_)) => return Err(ConfigError::invalid("tls_cert", "required with tls_key")),
        (None, None) => {
            if s.tls_reload_interval.is_some() {
                return Err(ConfigError::invalid("tls_reload_interval", "only meaningful with tls_cert and tls_key"));
            }
            return Ok(None);
        }
    };
    for (setting, path) in [("tls_cert", &cert), ("tls_key", &key)] {
        if !path.is_file() {
            return Err(ConfigError::invalid(setting, format!("{} is not a readable file", path.display())));
        }
    }
    let every = duration("tls_reload_interval", s.tls_reload_interval.as_deref(), DEFAULT_TLS_RELOAD_INTERVAL)?;
    Ok(Some(TlsConfig { cert, key, reload_every: (!every.is_zero()).then_some(every) }))
}

fn http2(s: &Settings) -> Result<Http2Config, ConfigError> {
    let max_concurrent_streams = s.max_concurrent_streams.unwrap_or(DEFAULT_MAX_CONCURRENT_STREAMS);
    if max_concurrent_streams == 0 {
        return Err(ConfigError::invalid("max_concurrent_streams", "must be at least 1"));
    }
    let h2c = s.h2c.unwrap_or(false);
    if h2c && s.tls_cert.is_some() {
        // One listener: with TLS, HTTP/2 is chosen by ALPN, never assumed.
        return Err(ConfigError::invalid("h2c", "is for plain listeners; with tls_cert, HTTP/2 is negotiated by ALPN"));
    }
    Ok(Http2Config { h2c, max_concurrent_streams })
}

fn redis_url(url: Option<&str>) -> Result<Option<Secret>, ConfigError> {
    match url {
        None => Ok(None),
        Some(url)
            if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://") =>
        {
            Ok(Some(Secret::new(url.to_owned().into_bytes())))
        }
        Some(_) => Err(ConfigError::invalid("redis_url", "must start with redis://, rediss:// or redis+unix://")),
    }
}

fn rate(
    per_min_setting: &'static str,
    per_min: Option<u32>,
    default_per_min: u32,
    burst: Option<u32>,
    default_burst: u32,
) -> Result<Option<Rate>, ConfigError> {
    let per_minute = per_min.unwrap_or(default_per_min);
    let Some(per_minute) = NonZeroU32::new(per_minute) else {
        return Ok(None);
    };
    let burst = NonZeroU32::new(burst.unwrap_or(default_burst))
        .ok_or_else(|| ConfigError::invalid(per_min_setting, "its burst must be at least 1"))?;
    if per_minute.get() > 60_000_000 {
        return Err(ConfigError::invalid(per_min_setting, "at most 60000000 per minute"));
    }
    Ok(Some(Rate { per_minute, burst }))
}

fn at_least_one(setting: &'static str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::invalid(setting, "must be at least 1")),
        n => Ok(n),
    }
}

fn limits(s: &Settings) -> Result<LimitsConfig, ConfigError> {
    let trusted_proxies = s
        .trusted_proxies
        .iter()
        .flatten()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<IpNet>().or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from)).map_err(|_| {
                ConfigError::invalid("trusted_proxies", format!("`{p}` is not an IP address or CIDR like 10.0.0.0/8"))
            })
        })
        .collect::<Result<_, _>>()?;
    let max_header_bytes = s.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    if max_header_bytes < MIN_HEADER_BYTES {
        return Err(ConfigError::invalid("max_header_bytes", format!("must be at least {MIN_HEADER_BYTES}")));
    }
    let send_queue = s.send_queue.unwrap_or(DEFAULT_SEND_QUEUE);
    if s.stream_max_events.unwrap_or(DEFAULT_STREAM_MAX_EVENTS) <= send_queue {
        // Otherwise the producer may trim events a reader has not had yet.
        return Err(ConfigError::invalid("stream_max_events", format!("must be above send_queue ({send_queue})")));
    }
    let max_lag = duration("max_lag", s.max_lag.as_deref(), DEFAULT_MAX_LAG)?;
    let header_timeout = duration("header_timeout", s.header_timeout.as_deref(), DEFAULT_HEADER_TIMEOUT)?;
    let body_timeout = duration("body_timeout", s.body_timeout.as_deref(), DEFAULT_BODY_TIMEOUT)?;
    let max_stream_duration =
        duration("max_stream_duration", s.max_stream_duration.as_deref(), DEFAULT_MAX_STREAM_DURATION)?;
    for (setting, d) in [
        ("max_lag", max_lag),
        ("header_timeout", header_timeout),
        ("body_timeout", body_timeout),
        ("max_stream_duration", max_stream_duration),
    ] {
        if d.is_zero() {
            return Err(ConfigError::invalid(setting, "must be above zero"));
        }
    }
    Ok(LimitsConfig {
        rate_subject: rate(
            "rate_subject_per_min",
            s.rate_subject_per_min,
            DEFAULT_RATE_SUBJECT_PER_MIN,
            s.rate_subject_burst,
            DEFAULT_RATE_SUBJECT_BURST,
        )?,
        rate_ip: rate(
            "rate_ip_per_min",
            s.rate_ip_per_min,
            DEFAULT_RATE_IP_PER_MIN,
            s.rate_ip_burst,
            DEFAULT_RATE_IP_BURST,
        )?,
        trusted_proxies,
        max_streams: at_least_one("max_streams", s.max_streams, DEFAULT_MAX_STREAMS)?,
        max_streams_per_subject: at_least_one(
            "max_streams_per_subject",
            s.max_streams_per_subject,
            DEFAULT_MAX_STREAMS_PER_SUBJECT,
        )?,
        send_queue: at_least_one("send_queue", s.send_queue, DEFAULT_SEND_QUEUE)?,
        max_lag,
        max_messages: s.max_messages.unwrap_or(DEFAULT_MAX_MESSAGES),
        max_stream_duration,
        max_header_bytes,
        header_timeout,
        body_timeout,
        max_connections: at_least_one("max_connections", s.max_connections, DEFAULT_MAX_CONNECTIONS)?,
        send_buffer: Some(s.send_buffer_bytes.unwrap_or(DEFAULT_SEND_BUFFER_BYTES)).filter(|&n| n > 0),
        max_channels: at_least_one("max_channels", s.max_channels, DEFAULT_MAX_CHANNELS)?,
        max_channels_per_subject: at_least_one(
            "max_channels_per_subject",
            s.max_channels_per_subject,
            DEFAULT_MAX_CHANNELS_PER_SUBJECT,
        )?,
        on_store_failure: on_store_failure(s.limits_on_store_failure.as_deref())?,
        stream_lease_ttl: stream_lease_ttl(s.stream_lease_ttl.as_deref())?,
    })
}

fn on_store_failure(value: Option<&str>) -> Result<OnStoreFailure, ConfigError> {
    let Some(text) = value else { return Ok(DEFAULT_LIMITS_ON_STORE_FAILURE) };
    OnStoreFailure::parse(text.trim()).ok_or_else(|| {
        ConfigError::invalid("limits_on_store_failure", format!("`{text}` is neither `closed` nor `open`"))
    })
}

fn stream_lease_ttl(value: Option<&str>) -> Result<Duration, ConfigError> {
    let ttl = duration("stream_lease_ttl", value, DEFAULT_STREAM_LEASE_TTL)?;
    if ttl < MIN_STREAM_LEASE_TTL {
        return Err(ConfigError::invalid(
            "stream_lease_ttl",
            format!("must be at least {}", humantime::format_duration(MIN_STREAM_LEASE_TTL)),
        ));
    }
    Ok(ttl)
}

fn upstreams(s: &Settings) -> Result<Vec<Upstream>, ConfigError> {
    let mut all = s.upstreams.clone().unwrap_or_default();
    match (&s.upstream_url, &s.upstream_model) {
        (Some(url), Some(model)) => {
            all.insert(
                "openai".to_owned(),
                UpstreamSettings {
                    base_url: url.clone(),
                    model: model.clone(),
                    api_key_env: s.upstream_api_key_env.clone(),
                    ..UpstreamSettings::default()
                },
            );
        }
        (Some(_), None) => return Err(ConfigError::invalid("upstream_model", "required with upstream_url")),
        (None, Some(_)) => return Err(ConfigError::invalid("upstream_url", "required with upstream_model")),
        (None, None) => {}
    }
    Ok(crate::generator::upstream::validate(&all)?)
}

fn key_material(s: &Settings) -> Result<KeyMaterial, ConfigError> {
    let configured = [s.jwt_secret.is_some(), s.jwt_secret_file.is_some(), s.jwt_public_key_file.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if configured > 1 {
        return Err(ConfigError::invalid(
            "jwt_secret",
            "set only one of jwt_secret, jwt_secret_file and jwt_public_key_file",
        ));
    }
    if let Some(jwks) = jwks(s)? {
        return Ok(jwks);
    }
    let secret = |setting: &'static str, bytes: Vec<u8>| {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::invalid(
                setting,
                format!("the secret is {} bytes; at least {MIN_SECRET_BYTES} are required", bytes.len()),
            ));
        }
        Ok(KeyMaterial::Secret { secret: Secret::new(bytes), generated: false })
    };
    if let Some(text) = &s.jwt_secret {
        return secret("jwt_secret", text.as_bytes().to_vec());
    }
    if let Some(path) = &s.jwt_secret_file {
        let mut bytes = read_file("jwt_secret_file", path)?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        return secret("jwt_secret_file", bytes);
    }
    if let Some(path) = &s.jwt_public_key_file {
        let public_pem = read_file("jwt_public_key_file", path)?;
        let private_pem = match &s.jwt_private_key_file {
            Some(p) => Some(Secret::new(read_file("jwt_private_key_file", p)?)),
            None => None,
        };
        return Ok(KeyMaterial::PublicKey { public_pem, private_pem });
    }
    let mut bytes = vec![0u8; MIN_SECRET_BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|e| ConfigError::invalid("jwt_secret", format!("no key configured and the OS RNG failed: {e}")))?;
    Ok(KeyMaterial::Secret { secret: Secret::new(bytes), generated: true })
}

/// The JWKS key source, when `jwks_url` or `jwks_file` is set. It replaces
/// the static keys rather than adding to them: one place decides which keys
/// sign valid tokens, and a forgotten secret cannot stay valid beside it.
fn jwks(s: &Settings) -> Result<Option<KeyMaterial>, ConfigError> {
    let setting = if s.jwks_url.is_some() { "jwks_url" } else { "jwks_file" };
    if s.jwks_url.is_none() && s.jwks_file.is_none() {
        for (name, set) in [
            ("jwks_refresh", s.jwks_refresh.is_some()),
            ("jwks_refresh_min", s.jwks_refresh_min.is_some()),
            ("jwks_refresh_max", s.jwks_refresh_max.is_some()),
        ] {
            if set {
                return Err(ConfigError::invalid(name, "only meaningful with jwks_url or jwks_file"));
            }
        }
        return Ok(None);
    }
    let static_key = s.jwt_secret.is_some()
        || s.jwt_secret_file.is_some()
        || s.jwt_public_key_file.is_some()
        || s.jwt_private_key_file.is_some();
    if static_key {
        return Err(ConfigError::invalid(
            setting,
            "a JWKS replaces jwt_secret, jwt_secret_file, jwt_public_key_file and jwt_private_key_file; set one key source",
        ));
    }
    let refresh = duration("jwks_refresh", s.jwks_refresh.as_deref(), DEFAULT_JWKS_REFRESH)?;
    let refresh_min = duration("jwks_refresh_min", s.jwks_refresh_min.as_deref(), DEFAULT_JWKS_REFRESH_MIN)?;
    let refresh_max = duration("jwks_refresh_max", s.jwks_refresh_max.as_deref(), DEFAULT_JWKS_REFRESH_MAX)?;
    if refresh_min.is_zero() {
        // Zero would let every forged `kid` trigger a fetch.
        return Err(ConfigError::invalid("jwks_refresh_min", "must be above zero"));
    }
    if refresh_min > refresh_max {
        return Err(ConfigError::invalid("jwks_refresh_min", "is above jwks_refresh_max"));
    }
    Ok(Some(KeyMaterial::Jwks(JwksSettings {
        url: s.jwks_url.clone(),
        file: s.jwks_file.clone(),
        refresh,
        refresh_min,
        refresh_max,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_help_default_names_a_flag_and_reaches_its_help() {
        let command = <Settings as clap::Args>::augment_args(clap::Command::new("t"));
        for (id, default) in help_defaults() {
            let arg = command.get_arguments().find(|a| a.get_id() == id);
            let help = arg.and_then(|a| a.get_help()).map(|h| h.to_string()).unwrap_or_default();
            assert!(help.ends_with(&format!("[default: {default}]")), "`{id}`: {help:?}");
        }
    }

    #[test]
    fn help_defaults_are_what_an_empty_config_runs_with() {
        // The help shows the constants; the validated config must use them.
        let config = Config::from_settings(Settings::default()).map_err(|e| e.to_string());
        let Ok(config) = config else { panic!("{config:?}") };
        let shown: BTreeMap<_, _> = help_defaults().into_iter().collect();
        assert_eq!(shown["listen"], config.listen.to_string());
        assert_eq!(shown["max_stream_duration"], "30m");
        assert_eq!(shown["heartbeat"], humantime::format_duration(config.stream.heartbeat).to_string());
        assert_eq!(shown["pace_ms"], config.stream.pace.default.as_millis().to_string());
        assert_eq!(shown["max_streams"], config.limits.max_streams.to_string());
        assert_eq!(shown["channel_ttl"], "1h");
        assert_eq!(shown["log_format"], if config.log_json { "json" } else { "text" });
        assert_eq!(shown["limits_on_store_failure"], config.limits.on_store_failure.as_str());
        assert_eq!(shown["stream_lease_ttl"], "15s");
    }

    #[test]
    fn channel_bounds_and_the_body_timeout_are_validated() {
        let config = Config::from_settings(Settings::default()).map_err(|e| e.to_string());
        let Ok(config) = config else { panic!("{config:?}") };
        assert_eq!(config.limits.max_channels, DEFAULT_MAX_CHANNELS);
        assert_eq!(config.limits.max_channels_per_subject, DEFAULT_MAX_CHANNELS_PER_SUBJECT);
        assert_eq!(config.limits.body_timeout, DEFAULT_BODY_TIMEOUT);
        assert_eq!(config.limits.send_buffer, Some(DEFAULT_SEND_BUFFER_BYTES));
        let autotuned = Config::from_settings(Settings { send_buffer_bytes: Some(0), ..Settings::default() });
        assert_eq!(autotuned.map(|c| c.limits.send_buffer).ok(), Some(None));
        let err = |s: Settings| Config::from_settings(s).err().map(|e| e.setting());
        assert_eq!(err(Settings { max_channels: Some(0), ..Settings::default() }), Some("max_channels"));
        assert_eq!(
            err(Settings { max_channels_per_subject: Some(0), ..Settings::default() }),
            Some("max_channels_per_subject")
        );
        assert_eq!(err(Settings { body_timeout: Some("0s".into()), ..Settings::default() }), Some("body_timeout"));
        assert_eq!(err(Settings { body_timeout: Some("soon".into()), ..Settings::default() }), Some("body_timeout"));
        let file = Settings::from_toml_str(
            "[limits]\nmax_channels = 5\nmax_channels_per_subject = 2\nbody_timeout = \"5s\"\n",
        );
        let limits = file.and_then(Config::from_settings).map(|c| c.limits).map_err(|e| e.to_string());
        let Ok(limits) = limits else { panic!("{limits:?}") };
        assert_eq!((limits.max_channels, limits.max_channels_per_subject), (5, 2));
        assert_eq!(limits.body_timeout, Duration::from_secs(5));
    }

    #[test]
    fn cluster_limit_settings_are_validated() {
        let with = |policy: Option<&str>, ttl: Option<&str>| {
            Config::from_settings(Settings {
                limits_on_store_failure: policy.map(str::to_owned),
                stream_lease_ttl: ttl.map(str::to_owned),
                ..Settings::default()
            })
            .map(|c| (c.limits.on_store_failure, c.limits.stream_lease_ttl))
            .map_err(|e| e.setting())
        };
        assert_eq!(with(Some("closed"), Some("2s")), Ok((OnStoreFailure::Closed, Duration::from_secs(2))));
        assert_eq!(with(None, None), Ok((OnStoreFailure::Open, DEFAULT_STREAM_LEASE_TTL)));
        assert_eq!(with(Some("shut"), None), Err("limits_on_store_failure"));
        assert_eq!(with(None, Some("500ms")), Err("stream_lease_ttl"));
        assert_eq!(with(None, Some("soon")), Err("stream_lease_ttl"));
    }

    #[test]
    fn the_replication_window_defaults_to_50ms_and_is_at_most_a_second() {
        let with = |window: Option<&str>| {
            Config::from_settings(Settings { replication_window: window.map(str::to_owned), ..Settings::default() })
                .map(|c| c.store.replication_window)
                .map_err(|e| e.setting())
        };
        assert_eq!(with(None), Ok(Duration::from_millis(50)));
        assert_eq!(with(Some("0s")), Ok(Duration::ZERO));
        assert_eq!(with(Some("1s")), Ok(Duration::from_secs(1)));
        assert_eq!(with(Some("1001ms")), Err("replication_window"));
        assert_eq!(with(Some("soon")), Err("replication_window"));
    }

    #[test]
    fn a_jwks_excludes_static_keys_and_needs_sane_bounds() {
        let jwks = || Settings { jwks_url: Some("https://idp.example.com/jwks".into()), ..Settings::default() };
        let err = |s: Settings| Config::from_settings(s).err().map(|e| e.setting());
        assert_eq!(err(Settings { jwt_secret: Some("x".repeat(40)), ..jwks() }), Some("jwks_url"));
        assert_eq!(err(Settings { jwt_private_key_file: Some("k.pem".into()), ..jwks() }), Some("jwks_url"));
        assert_eq!(err(Settings { jwt_algorithms: Some(vec!["HS256".into()]), ..jwks() }), Some("jwt_algorithms"));
        assert_eq!(err(Settings { jwks_refresh_min: Some("0s".into()), ..jwks() }), Some("jwks_refresh_min"));
        let inverted = Settings { jwks_refresh_min: Some("2h".into()), jwks_refresh_max: Some("1h".into()), ..jwks() };
        assert_eq!(err(inverted), Some("jwks_refresh_min"));
        assert_eq!(err(Settings { jwks_url: Some("ftp://idp/jwks".into()), ..Settings::default() }), Some("jwks_url"));
        assert_eq!(
            err(Settings { jwks_file: Some("/nonexistent/jwks.json".into()), ..Settings::default() }),
            Some("jwks_file")
        );
        assert_eq!(err(Settings { jwks_refresh: Some("1m".into()), ..Settings::default() }), Some("jwks_refresh"));
        let config = Config::from_settings(jwks()).map_err(|e| e.to_string());
        assert!(config.is_ok_and(|c| c.auth.algorithms() == ["RS256"] && !c.auth.generated_secret()));
    }
}
