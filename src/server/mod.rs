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
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use self::stall::StallGuard;

use crate::app::router;
use crate::config::{Config, ConfigError};
use crate::generator::{self, Registry};
use crate::limits::{Leases, RateLimits, SharedLimits, StreamSlots};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::state::{AppState, Inner};
use crate::store::{Store, StoreSettings};
use crate::stream::{ServiceParts, ServiceSettings, StreamService};

mod stall;

/// How often idle rate-limiter keys, expired streams and unused channels
/// are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// TCP keepalive idle time and probe interval (finds half-open peers).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Concurrent tasks answering connections over the cap; beyond, they are
/// just closed.
const MAX_REFUSERS: usize = 64;

/// Once the listener closed, connections still open this much later (a
/// client that stopped reading, say) no longer hold the process up.
const FORCE_EXIT_AFTER: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
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
        stream_ttl: store_config.stream_ttl,
        channel_max_events: store_config.channel_max_events,
        channel_ttl: store_config.channel_ttl,
    };
    let store = match &store_config.redis_url {
        None => Store::memory(retention),
        Some(url) => Store::shared(&String::from_utf8_lossy(url.expose()), retention)
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
        let addr = config.listen;
        let bind_err = |source| ServerError::Bind { addr, source };
        let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(bind_err)?;
        socket.set_reuseaddr(true).map_err(bind_err)?;
        socket.bind(addr).map_err(bind_err)?;
        let listener = socket.listen(config.listen_backlog).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let state = build_state(config, generators)?;
        Ok(Self { listener, local_addr, state })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The shared state (configuration, generators, shutdown handle).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `signal` resolves, then runs the sequence in
    /// [`crate::shutdown`]: draining (new streams and `/readyz` 503), the
    /// grace period, `shutdown` events, listener closed, return.
    ///
    /// Connections are HTTP/1.1 (what `EventSource` and reverse proxies use
    /// for SSE), each with a header read timeout (slow-loris; it also closes
    /// idle kept-alive connections), a bounded head/write buffer, TCP
    /// keepalive for half-open peers, and a stalled-write cutoff. Beyond
    /// `max_connections`, new connections get a 503 and are closed.
    pub async fn run_until_stopped(self, signal: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let state = self.state;
        let leases = spawn_background(&state, signal);
        let graceful = GracefulShutdown::new();
        accept_until_stopped(self.listener, &state, &graceful).await;
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(FORCE_EXIT_AFTER) => {
                tracing::warn!("connections still open after the listener closed; exiting anyway");
            }
        }
        // The last streams' leases are released before the process exits
        // (bounded inside), so their slots are free at once, not after the ttl.
        let _ = leases.await;
        Ok(())
    }
}

/// What runs beside the listener until the server stops: the shutdown
/// sequence once `signal` fires, the periodic pruning of limiter keys,
/// expired streams and unused channels, the store's own tasks, the JWKS
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
            loop {
                tokio::select! {
                    () = state.shutdown.stopped().cancelled() => break,
                    _ = tick.tick() => {
                        state.rates.prune();
                        state.store.sweep();
                    }
                }
            }
        });
    }
    state.store.spawn_background(state.shutdown.stopped());
    if let Some(every) = state.config.demo_feeds {
        tokio::spawn(crate::feeds::run(state.store.clone(), every, state.shutdown.stopped().clone()));
    }
    state.config.auth.start_key_refresh(state.metrics.clone(), state.shutdown.stopped().clone());
    let (slots, stop) = (state.slots.clone(), state.shutdown.stopped().clone());
    tokio::spawn(async move { slots.keep_leases(stop).await })
}

/// Per-connection settings and caps shared by the accept loop.
struct Connections {
    http: http1::Builder,
    write_stall: Duration,
    open: Arc<Semaphore>,
    refusers: Arc<Semaphore>,
}

/// Accepts connections until the shutdown sequence stops the listener,
/// then drops it (closing the port).
async fn accept_until_stopped(listener: TcpListener, state: &AppState, graceful: &GracefulShutdown) {
    let limits = &state.config.limits;
    let app = router(state.clone());
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    let connections = Connections {
        http,
        write_stall: limits.max_lag.saturating_mul(2),
        open: Arc::new(Semaphore::new(limits.max_connections)),
        refusers: Arc::new(Semaphore::new(MAX_REFUSERS)),
    };
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
            if let Ok(refuser) = connections.refusers.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse_connection(tcp).await;
                    drop(refuser);
                });
            }
            continue;
        };
        serve_connection(tcp, peer, permit, &app, &connections, state, graceful);
    }
}

/// Serves one accepted connection in a task of its own: TCP options, the
/// stalled-write guard, the peer address for the handlers, and one log
/// line or refusal count for how it ended.
fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    app: &axum::Router,
    connections: &Connections,
    state: &AppState,
    graceful: &GracefulShutdown,
) {
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(&tcp)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE).with_interval(TCP_KEEPALIVE));
    let io = TokioIo::new(StallGuard::new(tcp, connections.write_stall));
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    let service = app.clone().map_request(move |mut request: Request<Incoming>| {
        counter.fetch_add(1, Ordering::Relaxed);
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    });
    let connection = graceful.watch(connections.http.serve_connection(io, TowerToHyperService::new(service)));
    let metrics = state.metrics.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            // Connection-level refusals never reach the router, so they are
            // counted and logged here, once.
            if e.is_timeout() && served.load(Ordering::Relaxed) == 0 {
                metrics.refused("header_timeout");
                tracing::info!(%peer, "request headers not received in time; connection closed");
            } else if e.is_timeout() {
                // The same timer closes kept-alive connections that sit
                // idle after a request: routine, not a refusal.
                tracing::debug!(%peer, "idle connection closed");
            } else if e.is_parse_too_large() {
                metrics.refused("header_too_large");
                tracing::info!(%peer, "request head too large; answered 431");
            } else {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        }
        drop(permit);
    });
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
