//! Binding, serving and the shutdown sequence. [`Application::build`] binds
//! (port 0 works, for tests) and [`Application::run_until_stopped`] serves
//! until the given signal, then drains as described in [`crate::shutdown`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpSocket};

use crate::app::{AppState, Inner, router};
use crate::config::{Config, ConfigError};
use crate::generator::{DemoGenerator, EchoGenerator, Registry};
use crate::shutdown::Shutdown;

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

/// The built-in generators (`demo`, `echo`) at the configured default pace.
pub fn builtin_generators(config: &Config) -> Result<Registry, ConfigError> {
    let demo = match &config.prompts_dir {
        Some(dir) => DemoGenerator::from_dir(dir)
            .map_err(|e| ConfigError::invalid("prompts_dir", format!("{}: {e}", dir.display())))?,
        None => DemoGenerator::shipped(),
    };
    let mut registry = Registry::new();
    registry.register("demo", Arc::new(demo), config.stream.pace.default);
    registry.register("echo", Arc::new(EchoGenerator), config.stream.pace.default);
    Ok(registry)
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
                    format!(
                        "unknown generator `{name}` (available: {})",
                        generators.names().join(", ")
                    ),
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
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(bind_err)?;
        socket.set_reuseaddr(true).map_err(bind_err)?;
        socket.bind(addr).map_err(bind_err)?;
        let listener = socket.listen(config.listen_backlog).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let state = AppState::new(Inner {
            config,
            generators,
            shutdown: Shutdown::new(),
        });
        Ok(Self {
            listener,
            local_addr,
            state,
        })
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
    pub async fn run_until_stopped(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let shutdown = self.state.shutdown.clone();
        let grace = self.state.config.shutdown_grace;
        {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                signal.await;
                shutdown.begin(grace).await;
            });
        }
        let app = router(self.state.clone());
        let listener = self.listener.tap_io(|tcp| {
            // One small write per character: Nagle would hold them back.
            let _ = tcp.set_nodelay(true);
        });
        let stopped = shutdown.stopped().clone();
        let serve = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stopped.cancelled().await });
        let stopped = shutdown.stopped().clone();
        tokio::select! {
            result = serve => result,
            () = async { stopped.cancelled().await; tokio::time::sleep(FORCE_EXIT_AFTER).await } => {
                tracing::warn!("connections still open after the listener closed; exiting anyway");
                Ok(())
            }
        }
    }
}
