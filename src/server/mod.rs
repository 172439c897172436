//! Binding, serving (connection handling and its limits) and the shutdown
//! sequence. [`Application::build`] binds
//! (port 0 works, for tests) and [`Application::run_until_stopped`] serves
//! until the given signal, then drains as described in [`crate::shutdown`].

use crate::quota::Quotas;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use self::stall::StallGuard;
use self::tls::Tls;
pub use self::tls::{TlsError, probe_config};

use crate::app::router;
use crate::config::{Config, ConfigError};
use crate::event::ErrorCode;
use crate::generator::{self, Registry};
use crate::limits::{Leases, RateLimits, SharedLimits, StreamSlots};
use crate::log_throttle::LogThrottle;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::state::{AppState, Inner};
use crate::store::{ChannelLimits, Store, StoreSettings};
use crate::stream::{ConnectionAbort, ServiceParts, ServiceSettings, StreamService};

use self::body::DeadlineBody;

mod body;
mod h1;
mod h2c;
mod stall;
mod tls;

/// How often idle rate-limiter keys, expired streams and unused channels
/// are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// How often the histograms' raw samples are folded into their buckets
/// (see [`Metrics::upkeep`]): at 10,000 streams a second, about a megabyte
/// of samples waits between two upkeeps.
const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// TCP keepalive idle time and probe interval (finds half-open peers).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Concurrent tasks answering connections over the cap; beyond, they are
/// just closed.
const MAX_REFUSERS: usize = 64;

/// At most one log line per this long for each kind of refused connection
/// (they come by the thousand in a flood; the metrics count every one).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Once the listener closed, connections still open this much later (a
/// client that stopped reading, say) no longer hold the process up.
const FORCE_EXIT_AFTER: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS certificate or key cannot be used.
    #[error("TLS (tls_cert / tls_key): {0}")]
    Tls(#[from] TlsError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The built-in generators (`demo`, `echo`) at the configured default pace,
/// and one `openai` generator per configured upstream (under its name and
/// aliases); see [`crate::generator::builtin_generators`].
pub fn builtin_generators(config: &Config) -> Result<Registry, ConfigError> {
    Ok(generator::builtin_generators(config.prompts_dir.as_deref(), config.stream.pace.default, &config.upstreams)?)
}

/// The shared state: limits, metrics, the store and the stream service
/// over it.
fn build_state(config: Config, generators: Registry) -> Result<AppState, ConfigError> {
    let limits = &config.limits;
    let metrics = Arc::new(Metrics::new());
    let store_config = &config.store;
    let retention = StoreSettings {
        stream_max_events: store_config.stream_max_events,
        replication_window: store_config.replication_window,
        stream_ttl: store_config.stream_ttl,
        channel_max_events: store_config.channel_max_events,
        channel_ttl: store_config.channel_ttl,
    };
    let channel_limits =
        ChannelLimits { max_channels: limits.max_channels, max_per_subject: limits.max_channels_per_subject };
    let store = match &store_config.redis_url {
        None => Store::memory_with_limits(retention, channel_limits),
        Some(url) => Store::shared(
            &String::from_utf8_lossy(url.expose()),
            store_config.redis_ca.as_deref(),
            retention,
            channel_limits,
        )
        .map_err(|e| ConfigError::invalid("redis_url", e.to_string()))?,
    };
    // With a shared store, rates and the per-subject stream cap hold for the
    // cluster; the global stream cap stays this process's.
    let shared = store.limit_store().map(|s| SharedLimits::new(s, limits.on_store_failure, metrics.clone()));
    let rates = RateLimits::new(limits.rate_subject, limits.rate_ip).with_shared(shared.clone());
    let leases = shared.map(|shared| Leases::new(shared, limits.stream_lease_ttl));
    let slots = StreamSlots::with_leases(limits.max_streams, limits.max_streams_per_subject, leases);
    let shutdown = Shutdown::new();
    let settings = ServiceSettings {
        stream: config.stream.clone(),
        limits: config.limits.clone(),
        detach_grace: store_config.detach_grace,
        shutdown_retry: config.shutdown_retry,
        token_grace: config.token_grace,
    };
    let streams = StreamService::new(ServiceParts {
        settings,
        generators,
        store: store.clone(),
        slots: slots.clone(),
        quotas: Quotas::new(config.quota.clone(), store.clone(), metrics.clone()),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    });
    Ok(AppState::new(Inner { config, shutdown, rates, slots, metrics, store, streams }))
}

/// A bound, ready-to-run server.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
    tls: Option<Tls>,
}

impl Application {
    /// Binds with the built-in generators.
    pub async fn build(config: Config) -> Result<Self, ServerError> {
        let registry = builtin_generators(&config)?;
        Self::build_with(config, registry).await
    }

    /// Binds with the given generators (tests add their own), applying the
    /// per-generator pace settings and checking the default generator.
    pub async fn build_with(config: Config, mut generators: Registry) -> Result<Self, ServerError> {
        for (name, pace) in &config.stream.pace.per_generator {
            if !generators.set_pace(name, *pace) {
                return Err(ConfigError::invalid(
                    "generator_pace",
                    format!("unknown generator `{name}` (available: {})", generators.names().join(", ")),
                )
                .into());
            }
        }
        if generators.get(&config.stream.default_generator).is_none() {
            return Err(ConfigError::invalid(
                "default_generator",
                format!(
                    "unknown generator `{}` (available: {})",
                    config.stream.default_generator,
                    generators.names().join(", ")
                ),
            )
            .into());
        }
        // One process-wide TLS provider, so that libraries building their
        // rustls configs from the default (the Redis client) find one.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let tls = config.tls.as_ref().map(Tls::new).transpose()?;
        let addr = config.listen;
        let bind_err = |source| ServerError::Bind { addr, source };
        let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(bind_err)?;
        socket.set_reuseaddr(true).map_err(bind_err)?;
        socket.bind(addr).map_err(bind_err)?;
        let listener = socket.listen(config.listen_backlog).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let state = build_state(config, generators)?;
        Ok(Self { listener, local_addr, state, tls })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `https` with native TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The shared state (configuration, generators, shutdown handle).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `signal` resolves, then runs the sequence in
    /// [`crate::shutdown`]: draining (new streams and `/readyz` 503), the
    /// grace period, `shutdown` events, listener closed, return.
    ///
    /// Connections are HTTP/1.1, or HTTP/2 where TLS negotiated `h2` (or
    /// with `h2c`, where the client sent the HTTP/2 preface), so a browser
    /// page can hold more than 6 streams to one origin. Each has a header
    /// read timeout (slow-loris; it also bounds the TLS handshake and closes
    /// idle connections), bounded head and write buffers, TCP keepalive for
    /// half-open peers, and a stalled-write cutoff. Beyond `max_connections`,
    /// new connections get a 503 (plain) or are closed (TLS).
    pub async fn run_until_stopped(self, signal: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let state = self.state;
        let leases = spawn_background(&state, signal);
        if let Some(tls) = &self.tls {
            tls.spawn_reload(state.metrics.clone(), state.shutdown.stopped().clone());
        }
        let connections = accept_until_stopped(self.listener, &state, self.tls).await;
        connections.close.cancel();
        if !connections.drained(state.config.limits.max_connections, FORCE_EXIT_AFTER).await {
            tracing::warn!("connections still open after the listener closed; exiting anyway");
        }
        // The last streams' leases are released before the process exits
        // (bounded inside), so their slots are free at once, not after the ttl.
        let _ = leases.await;
        Ok(())
    }
}

/// What runs beside the listener until the server stops: the shutdown
/// sequence once `signal` fires, the periodic pruning of limiter keys,
/// expired streams and unused channels, the store's own tasks, the heap
/// trimmer, the JWKS
/// refresh when one is configured, and (with a shared store) the renewal
/// and release of stream leases, whose task is returned.
fn spawn_background(
    state: &AppState,
    signal: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    {
        let state = state.clone();
        tokio::spawn(async move {
            signal.await;
            state.shutdown.begin(state.config.shutdown_grace, &state.slots).await;
        });
    }
    {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_EVERY);
            let mut upkeep = tokio::time::interval(METRICS_UPKEEP_EVERY);
            loop {
                tokio::select! {
                    () = state.shutdown.stopped().cancelled() => break,
                    _ = tick.tick() => {
                        state.rates.prune();
                        state.store.sweep();
                    }
                    _ = upkeep.tick() => state.metrics.upkeep(),
                }
            }
        });
    }
    state.store.spawn_background(state.shutdown.stopped());
    tokio::spawn(crate::heap_trim::run(state.metrics.clone(), state.shutdown.stopped().clone()));
    if let Some(every) = state.config.demo_feeds {
        tokio::spawn(crate::feeds::run(state.store.clone(), every, state.shutdown.stopped().clone()));
    }
    state.config.auth.start_key_refresh(state.metrics.clone(), state.shutdown.stopped().clone());
    let (slots, stop) = (state.slots.clone(), state.shutdown.stopped().clone());
    tokio::spawn(async move { slots.keep_leases(stop).await })
}

/// Per-connection settings and caps shared by the accept loop.
struct Connections {
    /// HTTP/1.1 only (plain connections, and TLS without `h2` in ALPN).
    http1: hyper::server::conn::http1::Builder,
    /// HTTP/2 only (TLS with `h2` in ALPN, h2c with the preface).
    http2: auto::Builder<TokioExecutor>,
    /// Native TLS, if configured.
    tls: Option<Tls>,
    /// Plain connections may also be h2c with prior knowledge.
    h2c: bool,
    /// Bounds the TLS handshake and the h2c preface, like request headers.
    header_timeout: Duration,
    /// Bounds each request body, from the end of its head.
    body_timeout: Duration,
    /// The longest request head (HTTP/1.1: longer is answered 431).
    max_header_bytes: usize,
    write_stall: Duration,
    /// `SO_SNDBUF` for each accepted socket, if bounded.
    send_buffer: Option<usize>,
    open: Arc<Semaphore>,
    refusers: Arc<Semaphore>,
    /// Throttles the log lines of connections refused before a request.
    logs: RefusalLogs,
    /// Cancelled once the listener is closed: every connection then shuts
    /// down gracefully (HTTP/1.1 closes after its response, HTTP/2 sends
    /// GOAWAY and finishes its open streams).
    close: CancellationToken,
}

/// HTTP/2 stream receive window: request bodies up to
/// [`crate::config::DEFAULT_MAX_BODY_BYTES`] need no window update.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// HTTP/2 connection receive window (a few bodies in flight at once).
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Bytes HTTP/2 buffers per stream beyond what the client's window lets
/// out. A stream whose client stops reading stops being polled once this
/// is full, so with every stream of a connection stalled the buffered
/// total stays below `max_concurrent_streams` times this (plus each
/// stream's send queue), as HTTP/1.1's is below its write buffer.
const H2_MAX_SEND_BUF: usize = 64 * 1024;
/// Idle HTTP/2 connections are pinged this often; a peer that does not
/// answer within as long is gone, and its connection is closed.
const H2_PING_EVERY: Duration = Duration::from_secs(20);

impl Connections {
    fn new(state: &AppState, tls: Option<Tls>) -> Self {
        let limits = &state.config.limits;
        // HTTP/1.1 through hyper's own builder, not the auto one: its
        // connection future is only HTTP/1's, where the auto connection
        // carries room for an HTTP/2 one in every connection task.
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes)
            .keep_alive(true);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(state.config.http2.max_concurrent_streams)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_MAX_SEND_BUF)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(H2_PING_EVERY)
            .keep_alive_timeout(H2_PING_EVERY);
        Self {
            http1,
            http2: builder.http2_only(),
            tls,
            h2c: state.config.http2.h2c,
            header_timeout: limits.header_timeout,
            body_timeout: limits.body_timeout,
            max_header_bytes: limits.max_header_bytes,
            write_stall: limits.max_lag.saturating_mul(2),
            send_buffer: limits.send_buffer,
            open: Arc::new(Semaphore::new(limits.max_connections)),
            refusers: Arc::new(Semaphore::new(MAX_REFUSERS)),
            logs: RefusalLogs::default(),
            close: CancellationToken::new(),
        }
    }

    /// Waits (at most `limit`) until every connection has ended: all their
    /// permits are back.
    async fn drained(&self, max_connections: usize, limit: Duration) -> bool {
        let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
        tokio::time::timeout(limit, self.open.acquire_many(all)).await.is_ok()
    }
}

/// Accepts connections until the shutdown sequence stops the listener,
/// then drops it (closing the port) and returns the connections, which
/// are still being served.
async fn accept_until_stopped(listener: TcpListener, state: &AppState, tls: Option<Tls>) -> Arc<Connections> {
    let app = router(state.clone());
    let connections = Arc::new(Connections::new(state, tls));
    let stopped = state.shutdown.stopped();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = stopped.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.open.clone().try_acquire_owned() else {
            state.metrics.refused("connection_limit");
            // A TLS client cannot read a plain 503: it is just closed.
            if connections.tls.is_none()
                && let Ok(refuser) = connections.refusers.clone().try_acquire_owned()
            {
                tokio::spawn(async move {
                    refuse_connection(tcp).await;
                    drop(refuser);
                });
            }
            continue;
        };
        serve_connection(tcp, peer, permit, &app, &connections, state);
    }
    connections
}

/// One [`LogThrottle`] per kind of connection a client can have refused by
/// the thousand.
#[derive(Debug)]
struct RefusalLogs {
    header_timeout: LogThrottle,
    tls_handshake_timeout: LogThrottle,
    header_too_large: LogThrottle,
    slow_subscriber: LogThrottle,
}

impl Default for RefusalLogs {
    fn default() -> Self {
        Self {
            header_timeout: LogThrottle::new(REFUSAL_LOG_EVERY),
            tls_handshake_timeout: LogThrottle::new(REFUSAL_LOG_EVERY),
            header_too_large: LogThrottle::new(REFUSAL_LOG_EVERY),
            slow_subscriber: LogThrottle::new(REFUSAL_LOG_EVERY),
        }
    }
}

impl RefusalLogs {
    /// Counts a connection closed before its request head arrived, and logs
    /// it if the throttle lets it.
    fn header_timeout(&self, metrics: &Metrics, peer: SocketAddr) {
        metrics.refused("header_timeout");
        if let Some(suppressed) = self.header_timeout.admit() {
            tracing::info!(%peer, suppressed, "request headers not received in time; connection closed");
        }
    }
}

/// What a connection's requests have in common: how many it has served,
/// how many are open (until their response bodies end) and a counter that
/// moves with each start and end, which is how an HTTP/2 connection with
/// nothing open for a while is noticed.
#[derive(Debug, Default)]
struct Activity {
    served: AtomicUsize,
    open: AtomicUsize,
    changes: AtomicUsize,
}

impl Activity {
    fn started(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    fn ended(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.changes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Marks its request ended when the response body is done or dropped.
struct OpenRequest(Arc<Activity>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.ended();
    }
}

/// A response body that carries its request's [`OpenRequest`].
struct Tracked {
    body: axum::body::Body,
    _open: OpenRequest,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves one accepted connection in a task of its own: TCP options, the
/// stalled-write guard, TLS or the h2c look at the first bytes (both
/// bounded by the header timeout), the protocol, the peer address for the
/// handlers, and one log line or refusal count for how it ended.
fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    app: &axum::Router,
    connections: &Arc<Connections>,
    state: &AppState,
) {
    let _ = tcp.set_nodelay(true);
    let socket = socket2::SockRef::from(&tcp);
    let _ =
        socket.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE).with_interval(TCP_KEEPALIVE));
    if let Some(bytes) = connections.send_buffer
        && let Err(e) = socket.set_send_buffer_size(bytes)
    {
        tracing::debug!(error = %e, %peer, "SO_SNDBUF not set");
    }
    let io = StallGuard::new(tcp, connections.write_stall);
    let activity = Arc::new(Activity::default());
    let connections = connections.clone();
    let metrics = state.metrics.clone();
    let app = app.clone();
    // Each way of serving is boxed: the task then holds only the one this
    // connection takes, not room for the largest (a TLS handshake, with
    // rustls' connection state inline, made every task 8 KB).
    tokio::spawn(async move {
        let conn = Conn { app: &app, peer, connections: &connections, activity: &activity, metrics: &metrics };
        let ended = match &connections.tls {
            Some(tls) => Box::pin(serve_tls(io, tls, conn)).await,
            None if connections.h2c => Box::pin(serve_h2c(io, conn)).await,
            None => Some(serve_protocol(io, false, conn).await),
        };
        if let Some(Err(e)) = ended {
            report_end(&*e, peer, &activity, &metrics, &connections.logs);
        }
        drop(permit);
        crate::heap_trim::released();
    });
}

/// The TLS handshake (bounded like a request head), then HTTP/2 or
/// HTTP/1.1 as ALPN chose. `None`: the connection ended before a request,
/// and that has been counted and logged.
async fn serve_tls(io: StallGuard<TcpStream>, tls: &Tls, conn: Conn<'_>) -> Option<Result<(), BoxError>> {
    let Conn { peer, connections, metrics, .. } = conn;
    match tokio::time::timeout(connections.header_timeout, tls.acceptor().accept(io)).await {
        Err(_) => {
            metrics.refused("tls_handshake_timeout");
            if let Some(suppressed) = connections.logs.tls_handshake_timeout.admit() {
                tracing::info!(%peer, suppressed, "TLS handshake not finished in time; connection closed");
            }
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, %peer, "TLS handshake failed");
            None
        }
        Ok(Ok(stream)) => {
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Some(serve_protocol(stream, h2, conn).await)
        }
    }
}

/// A plain connection that may be h2c with prior knowledge: its first
/// bytes (bounded like a request head) tell, and are replayed to the
/// protocol that serves it. `None` as for [`serve_tls`].
async fn serve_h2c(mut io: StallGuard<TcpStream>, conn: Conn<'_>) -> Option<Result<(), BoxError>> {
    let Conn { peer, connections, metrics, .. } = conn;
    match tokio::time::timeout(connections.header_timeout, h2c::sniff(&mut io)).await {
        Err(_) => {
            connections.logs.header_timeout(metrics, peer);
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, %peer, "connection failed before a request");
            None
        }
        Ok(Ok((prefix, h2))) => {
            let io = h2c::Replay::new(prefix, io);
            Some(serve_protocol(io, h2, conn).await)
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every way of serving one connection works with.
#[derive(Clone, Copy)]
struct Conn<'a> {
    app: &'a axum::Router,
    peer: SocketAddr,
    connections: &'a Connections,
    activity: &'a Arc<Activity>,
    metrics: &'a Metrics,
}

/// Counts the connection by protocol and serves it: HTTP/2 through hyper,
/// HTTP/1.1 through [`h1`] (which hands it to hyper at the first request
/// it does not serve itself). Each way is boxed: the connection's task then
/// holds only the one it takes, not room for the largest.
async fn serve_protocol<I>(io: I, h2: bool, conn: Conn<'_>) -> Result<(), BoxError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    conn.metrics.connection_opened(if h2 { "h2" } else { "http1" });
    if h2 { Box::pin(serve_http(io, true, conn)).await } else { Box::pin(h1::serve(io, conn)).await }
}

/// Serves HTTP/1.1 or HTTP/2 on an established connection until it ends:
/// closed by the peer, idle, or shut down gracefully once the listener is
/// closed. An HTTP/2 connection with no open request for a header timeout
/// is closed (GOAWAY) the way an idle kept-alive HTTP/1.1 one is.
///
/// Every request body must arrive within `body_timeout` of its head
/// ([`DeadlineBody`]). An HTTP/1.1 connection is also dropped at once when
/// its [`ConnectionAbort`] is cancelled (a channel subscriber that fell out of
/// its log while nothing read the connection).
async fn serve_http<I>(io: I, h2: bool, conn: Conn<'_>) -> Result<(), BoxError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Conn { app, peer, connections, activity, metrics } = conn;
    let counter = activity.clone();
    // HTTP/1.1 carries one request at a time: aborting the connection ends
    // only that one. HTTP/2 requests get none (it would end their siblings).
    let abort = (!h2).then(CancellationToken::new);
    let request_abort = abort.clone();
    let body_timeout = connections.body_timeout;
    let service = app.clone().map_request(move |mut request: Request<Incoming>| {
        counter.started();
        request.extensions_mut().insert(ConnectInfo(peer));
        if let Some(abort) = &request_abort {
            request.extensions_mut().insert(ConnectionAbort(abort.clone()));
        }
        request.map(|body| DeadlineBody::new(body, body_timeout))
    });
    let counter = activity.clone();
    let service = service.map_response(move |response: axum::response::Response| {
        let open = OpenRequest(counter.clone());
        response.map(|body| axum::body::Body::new(Tracked { body, _open: open }))
    });
    let service = TowerToHyperService::new(service);
    if h2 {
        let conn = connections.http2.serve_connection(TokioIo::new(io), service);
        drive(conn, true, peer, connections, activity, metrics, abort).await
    } else {
        let conn = connections.http1.serve_connection(TokioIo::new(io), service);
        drive(conn, false, peer, connections, activity, metrics, abort).await.map_err(Into::into)
    }
}

/// Runs a connection until it ends, shutting it down gracefully once the
/// listener closes (or, for HTTP/2, once it sat idle), and dropping it when
/// its [`ConnectionAbort`] fires.
async fn drive<C>(
    conn: C,
    h2: bool,
    peer: SocketAddr,
    connections: &Connections,
    activity: &Arc<Activity>,
    metrics: &Metrics,
    abort: Option<CancellationToken>,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    // Only HTTP/2 needs the idle check (HTTP/1.1's header timer does it),
    // so an HTTP/1.1 connection carries no extra timer.
    let mut idle_check = h2.then(|| {
        let every = connections.header_timeout;
        tokio::time::interval_at(tokio::time::Instant::now() + every, every)
    });
    let mut changes = activity.changes.load(Ordering::Relaxed);
    let aborted = async {
        match &abort {
            Some(abort) => abort.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let mut aborted = std::pin::pin!(aborted);
    loop {
        tokio::select! {
            ended = conn.as_mut() => return ended,
            () = &mut aborted => {
                slow_subscriber_dropped(connections, metrics, peer);
                return Ok(());
            }
            () = connections.close.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            Some(_) = async { Some(idle_check.as_mut()?.tick().await) }, if idle_check.is_some() && !closing => {
                let now = activity.changes.load(Ordering::Relaxed);
                if activity.open.load(Ordering::Relaxed) == 0 && now == changes {
                    tracing::debug!(%peer, "idle HTTP/2 connection closed");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                changes = now;
            }
        }
    }
}

/// Counts and logs a connection dropped by its [`ConnectionAbort`].
fn slow_subscriber_dropped(connections: &Connections, metrics: &Metrics, peer: SocketAddr) {
    metrics.refused(ErrorCode::SlowConsumer.as_str());
    if let Some(suppressed) = connections.logs.slow_subscriber.admit() {
        tracing::info!(%peer, suppressed, "slow channel subscriber dropped: it fell out of the log; connection closed");
    }
}

/// Logs and counts how a connection ended with an error. Connection-level
/// refusals never reach the router, so they are counted here, once.
fn report_end(
    e: &(dyn std::error::Error + 'static),
    peer: SocketAddr,
    activity: &Activity,
    metrics: &Metrics,
    logs: &RefusalLogs,
) {
    let hyper = e.downcast_ref::<hyper::Error>();
    let served = activity.served.load(Ordering::Relaxed);
    if hyper.is_some_and(hyper::Error::is_timeout) && served == 0 {
        logs.header_timeout(metrics, peer);
    } else if hyper.is_some_and(hyper::Error::is_timeout) {
        // The same timer closes kept-alive connections that sit idle after
        // a request: routine, not a refusal.
        tracing::debug!(%peer, "idle connection closed");
    } else if hyper.is_some_and(hyper::Error::is_parse_too_large) {
        metrics.refused("header_too_large");
        if let Some(suppressed) = logs.header_too_large.admit() {
            tracing::info!(%peer, suppressed, "request head too large; answered 431");
        }
    } else {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// Answers a connection over the cap with a 503 and closes it. The request
/// is read first (briefly, bounded) so that closing does not reset the
/// connection before the client sees the answer.
async fn refuse_connection(mut tcp: TcpStream) {
    const BODY: &str = r#"{"type":"urn:tokengate:problem:connection_limit","title":"Service unavailable","status":503,"detail":"the server is at its connection limit","code":"connection_limit"}"#;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await;
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            BODY.len()
        );
        let _ = tcp.write_all(head.as_bytes()).await;
        let _ = tcp.write_all(BODY.as_bytes()).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}
