//! The `tokengate` binary: parse the command line, set up logging, build the
//! configuration and run (or mint a token).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokengate::cli::{Cli, Command};
use tokengate::config::Config;
use tokengate::log_writer::LogWriter;
use tokengate::server::Application;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How long the log thread waits after a batch's first line for the rest
/// of it: log lines appear at most this late.
const LOG_LINGER: Duration = Duration::from_millis(20);

/// Log bytes held for the log thread before new lines are dropped.
const LOG_MAX_PENDING_BYTES: usize = 8 * 1024 * 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.effective_settings().and_then(Config::from_settings) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tokengate: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Token { sub, scope, ttl }) => mint(&config, &sub, &scope, &ttl),
        Some(Command::Healthcheck { path }) => healthcheck(&config, &path),
        None | Some(Command::Serve) => serve(config),
    }
}

#[allow(clippy::print_stdout)]
fn mint(config: &Config, sub: &str, scope: &str, ttl: &str) -> ExitCode {
    if config.auth.generated_secret() {
        eprintln!(
            "tokengate: no key configured (set --jwt-secret, --jwt-secret-file, or --jwt-public-key-file with --jwt-private-key-file): a token signed with a random secret would be useless"
        );
        return ExitCode::from(2);
    }
    let ttl = match humantime::parse_duration(ttl) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("tokengate: --ttl `{ttl}` is not a duration like 1h ({e})");
            return ExitCode::from(2);
        }
    };
    match config.auth.mint(sub, scope, ttl) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tokengate: {e}");
            ExitCode::from(2)
        }
    }
}

/// A minimal HTTP/1.0 GET over loopback: container images need no curl.
/// With TLS it goes over TLS, trusting exactly the configured certificate.
fn healthcheck(config: &Config, path: &str) -> ExitCode {
    use std::io::{Read, Write};
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let timeout = Duration::from_secs(3);
    fn exchange(mut io: impl Read + Write, path: &str) -> std::io::Result<bool> {
        io.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
        let mut head = [0u8; 12];
        io.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
    }
    let result = (|| -> std::io::Result<bool> {
        let tcp = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        let Some(tls) = &config.tls else { return exchange(tcp, path) };
        let client = tokengate::server::probe_config(&tls.cert).map_err(std::io::Error::other)?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(client), name).map_err(std::io::Error::other)?;
        exchange(rustls::StreamOwned::new(conn, tcp), path)
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("tokengate: {path} on {addr} is not 200");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tokengate: cannot reach {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter for `RUST_LOG` (`info` when unset or unparsable). Levels
/// per target, the usual case, need only a [`Targets`] filter; an
/// [`EnvFilter`] also tracks every span to match span and field directives,
/// which cost a lock on each span's entry and exit (BENCHMARKS.md, scenario
/// 6), so it is used only when the directives need it.
fn log_filter(directives: Option<String>) -> (Option<Targets>, Option<EnvFilter>) {
    let directives = directives.filter(|d| !d.trim().is_empty()).unwrap_or_else(|| "info".to_owned());
    // Targets would take `target[span]` for a target's name and never match.
    let per_target = !directives.contains(['[', ']', '{', '}']);
    match directives.parse::<Targets>() {
        Ok(targets) if per_target => (Some(targets), None),
        _ => (None, Some(EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info")))),
    }
}

fn serve(config: Config) -> ExitCode {
    let (targets, env_filter) = log_filter(std::env::var("RUST_LOG").ok());
    // Colour only on a terminal: escape codes in a log file or a collector
    // are noise (and cost formatting on every line).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Log lines are written by a thread of their own (`log_writer`): a slow
    // or stalled stderr reader must not block the runtime's workers, and a
    // burst of lines costs one wake-up and one write. When too much is
    // pending, new lines are dropped (and counted) rather than waited for.
    // The guard writes what is pending when `serve` returns.
    let (writer, _flush_on_exit) = match LogWriter::spawn(std::io::stderr(), LOG_LINGER, LOG_MAX_PENDING_BYTES) {
        Ok(spawned) => spawned,
        Err(e) => {
            eprintln!("tokengate: cannot start the log writer: {e}");
            return ExitCode::FAILURE;
        }
    };
    let layer = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(targets).with(env_filter);
    if config.log_json {
        registry.with(layer.json()).init();
    } else {
        registry.with(layer).init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokengate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let app = match Application::build(config).await {
            Ok(app) => app,
            Err(e) => {
                eprintln!("tokengate: {e}");
                return ExitCode::from(2);
            }
        };
        print_banner(&app);
        match app.run_until_stopped(shutdown_signal()).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Tells a first-time user what to do next. The demo token is printed only
/// with the random per-process secret: with a real key, a long-lived token
/// in stdout (and so in log collectors) would be a leak.
#[allow(clippy::print_stdout)]
fn print_banner(app: &Application) {
    let addr = app.local_addr();
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { addr.ip().to_string() };
    let scheme = app.scheme();
    let base = if addr.is_ipv6() && !addr.ip().is_unspecified() {
        format!("{scheme}://[{host}]:{}", addr.port())
    } else {
        format!("{scheme}://{host}:{}", addr.port())
    };
    println!("tokengate listening on {base}");
    let auth = &app.state().config.auth;
    if !auth.generated_secret() {
        println!("mint a token with: tokengate token --sub alice --scope \"stream publish\" --ttl 1h");
        return;
    }
    match auth.mint("demo", "stream publish", Duration::from_secs(24 * 3600)) {
        Ok(token) => {
            println!("no key configured: using a random per-process HS256 secret (tokens die with this process)");
            println!("demo token (sub \"demo\", scope \"stream publish\", valid 24 h):\n\n  {token}\n");
            println!("try it:\n\n  curl -N -H \"Authorization: Bearer {token}\" \"{base}/v1/stream?prompt=hello\"\n");
            println!("or open {base}/#token={token}");
            println!("and the live dashboard: {base}/dashboard#token={token}");
        }
        Err(e) => eprintln!("tokengate: could not mint the demo token: {e}"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::log_filter;

    #[test]
    fn levels_per_target_need_no_span_tracking_filter() {
        let (targets, env) = log_filter(Some("warn,tokengate::stream=debug".into()));
        let targets = targets.unwrap_or_else(|| panic!("plain directives are a Targets filter"));
        assert!(env.is_none());
        assert!(targets.would_enable("tokengate::stream::produce", &Level::DEBUG));
        assert!(!targets.would_enable("tokengate::server", &Level::INFO));
        assert!(targets.would_enable("hyper", &Level::WARN));
        for unset in [None, Some(String::new()), Some("  ".into())] {
            let (targets, _) = log_filter(unset);
            let targets = targets.unwrap_or_else(|| panic!("info by default"));
            assert!(
                targets.would_enable("tokengate", &Level::INFO) && !targets.would_enable("tokengate", &Level::DEBUG)
            );
        }
    }

    #[test]
    fn span_and_field_directives_keep_the_env_filter() {
        for directives in ["tokengate[request]=debug", "info,[request{path=/v1/stream}]=trace"] {
            let (targets, env) = log_filter(Some(directives.into()));
            assert!(targets.is_none() && env.is_some(), "{directives}");
        }
    }
}
