//! Binding, serving (connection handling and its limits) and the shutdown
//! sequence. [`Application::build`] binds
//! (port 0 works, for tests) and [`Application::run_until_stopped`] serves
//! until the given signal, then drains as described in [`crate::shutdown`].

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

use crate::app::{AppState, Inner, router};
use crate::config::{Config, ConfigError};
use crate::generator::{self, Registry};
use crate::limits::{RateLimits, StreamSlots};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::{ChannelHub, ChannelSettings, ChannelTail, HubSettings, RedisSettings, RedisStore, StreamHub};
use crate::stream::StreamId;

mod stall;

/// How often idle rate-limiter keys, expired streams and unused channels
/// are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// How often Redis health is probed (feeds `/readyz` and admission).
const REDIS_PROBE_EVERY: Duration = Duration::from_millis(500);
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
        let limits = &config.limits;
        let rates = RateLimits::new(limits.rate_subject, limits.rate_ip);
        let slots = StreamSlots::new(limits.max_streams, limits.max_streams_per_subject);
        let metrics = Arc::new(Metrics::new());
        let store = &config.store;
        let hub = StreamHub::new(HubSettings { max_events: store.stream_max_events, ttl: store.stream_ttl });
        let channels =
            ChannelHub::new(ChannelSettings { max_events: store.channel_max_events, ttl: store.channel_ttl });
        let redis = match &store.redis_url {
            None => None,
            Some(url) => {
                let url = String::from_utf8_lossy(url.expose()).into_owned();
                let settings = RedisSettings {
                    stream_max_events: store.stream_max_events,
                    stream_ttl: store.stream_ttl,
                    channel_max_events: store.channel_max_events,
                    channel_ttl: store.channel_ttl,
                };
                Some(
                    RedisStore::connect(&url, settings)
                        .map_err(|e| ConfigError::invalid("redis_url", e.to_string()))?,
                )
            }
        };
        let tail = redis.as_ref().map(|r| ChannelTail::new(r.clone(), channels.clone()));
        let replica_id = StreamId::random().map(|id| id.to_string()).unwrap_or_else(|_| "replica".to_owned());
        let state = AppState::new(Inner {
            config,
            generators,
            shutdown: Shutdown::new(),
            rates,
            slots,
            metrics,
            hub,
            channels,
            redis,
            tail,
            replica_id,
        });
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
        let state = self.state.clone();
        let shutdown = state.shutdown.clone();
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
                            state.hub.sweep();
                            state.channels.sweep();
                        }
                    }
                }
            });
        }
        if let Some(redis) = &state.redis {
            let stop = shutdown.stopped().clone();
            tokio::spawn(redis.clone().probe(REDIS_PROBE_EVERY, stop.clone()));
            tokio::spawn(redis.clone().listen_for_cancels(state.hub.clone(), stop.clone()));
            if let Some(tail) = &state.tail {
                tokio::spawn(tail.clone().run(stop));
            }
        }
        let limits = &state.config.limits;
        let app = router(state.clone());
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes)
            .keep_alive(true);
        let write_stall = limits.max_lag.saturating_mul(2);
        let connections = Arc::new(Semaphore::new(limits.max_connections));
        let refusers = Arc::new(Semaphore::new(MAX_REFUSERS));
        let graceful = GracefulShutdown::new();
        let listener = self.listener;
        loop {
            let (tcp, peer) = tokio::select! {
                biased;
                () = shutdown.stopped().cancelled() => break,
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
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                state.metrics.refused("connection_limit");
                if let Ok(refuser) = refusers.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse_connection(tcp).await;
                        drop(refuser);
                    });
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let _ = socket2::SockRef::from(&tcp)
                .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE).with_interval(TCP_KEEPALIVE));
            let io = TokioIo::new(StallGuard::new(tcp, write_stall));
            let served = Arc::new(AtomicUsize::new(0));
            let counter = served.clone();
            let service = app.clone().map_request(move |mut request: Request<Incoming>| {
                counter.fetch_add(1, Ordering::Relaxed);
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            });
            let connection = graceful.watch(http.serve_connection(io, TowerToHyperService::new(service)));
            let metrics = state.metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    // Connection-level refusals never reach the router, so
                    // they are counted and logged here, once.
                    if e.is_timeout() && served.load(Ordering::Relaxed) == 0 {
                        metrics.refused("header_timeout");
                        tracing::info!(%peer, "request headers not received in time; connection closed");
                    } else if e.is_timeout() {
                        // The same timer closes kept-alive connections that
                        // sit idle after a request: routine, not a refusal.
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
        drop(listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(FORCE_EXIT_AFTER) => {
                tracing::warn!("connections still open after the listener closed; exiting anyway");
            }
        }
        Ok(())
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
