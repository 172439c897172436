//! Configuration: one set of settings read from CLI flags, `TOKENGATE_*`
//! environment variables and a TOML file (in that order of precedence),
//! then validated once into the typed [`Config`] the server runs with.
//!
//! [`Settings`] is both the clap argument group and the TOML table, so a
//! setting has the same name everywhere: `--pace-ms`, `TOKENGATE_PACE_MS`,
//! `pace_ms`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{AuthConfig, KeyMaterial, Secret, TokenSources};

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
pub const DEFAULT_PACE_MS: u64 = 20;
/// Default lowest pace a request may ask for.
pub const DEFAULT_PACE_MIN_MS: u64 = 0;
/// Default highest pace a request may ask for.
pub const DEFAULT_PACE_MAX_MS: u64 = 1000;
/// Default generator when a request names none.
pub const DEFAULT_GENERATOR: &str = "demo";
/// Default time streams get to finish after SIGTERM before `shutdown`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default `retry:` hint sent with the `shutdown` event.
pub const DEFAULT_SHUTDOWN_RETRY: Duration = Duration::from_secs(1);
/// Default JWT clock-skew leeway.
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);
/// Default cookie carrying the token.
pub const DEFAULT_TOKEN_COOKIE: &str = "tokengate_token";
/// Default query parameter carrying the token.
pub const DEFAULT_TOKEN_QUERY: &str = "access_token";
/// Default largest request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;
/// Default largest prompt.
pub const DEFAULT_MAX_PROMPT_BYTES: usize = 64 * 1024;
/// Shortest HMAC secret accepted (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_BYTES: usize = 32;

/// Every setting, all optional, as read from one source. The same struct is
/// the clap argument group (flags and env) and the TOML file's table.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, global = true, env = "TOKENGATE_LISTEN")]
    pub listen: Option<String>,
    /// TCP listen backlog (pending connections the kernel queues).
    #[arg(long, global = true, env = "TOKENGATE_LISTEN_BACKLOG")]
    pub listen_backlog: Option<u32>,
    /// HMAC secret for HS256/384/512 (at least 32 bytes). Without any key a
    /// random per-process secret is generated and a demo token printed.
    #[arg(
        long,
        global = true,
        env = "TOKENGATE_JWT_SECRET",
        hide_env_values = true
    )]
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
    #[arg(
        long,
        global = true,
        env = "TOKENGATE_JWT_ALGORITHMS",
        value_delimiter = ','
    )]
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
    /// Origins allowed by CORS, comma separated (`*` = any origin, without
    /// credentials).
    #[arg(
        long,
        global = true,
        env = "TOKENGATE_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Option<Vec<String>>,
    /// Heartbeat comment interval (e.g. `15s`).
    #[arg(long, global = true, env = "TOKENGATE_HEARTBEAT")]
    pub heartbeat: Option<String>,
    /// `retry:` reconnect hint sent first on every stream (e.g. `3s`).
    #[arg(long, global = true, env = "TOKENGATE_RETRY")]
    pub retry: Option<String>,
    /// Default milliseconds between deltas.
    #[arg(long, global = true, env = "TOKENGATE_PACE_MS")]
    pub pace_ms: Option<u64>,
    /// Lowest `pace_ms` a request may ask for.
    #[arg(long, global = true, env = "TOKENGATE_PACE_MIN_MS")]
    pub pace_min_ms: Option<u64>,
    /// Highest `pace_ms` a request may ask for.
    #[arg(long, global = true, env = "TOKENGATE_PACE_MAX_MS")]
    pub pace_max_ms: Option<u64>,
    /// Per-generator default pace, `name=ms`, comma separated.
    #[arg(
        long,
        global = true,
        env = "TOKENGATE_GENERATOR_PACE",
        value_delimiter = ','
    )]
    pub generator_pace: Option<Vec<String>>,
    /// Generator used when a request names none.
    #[arg(long, global = true, env = "TOKENGATE_DEFAULT_GENERATOR")]
    pub default_generator: Option<String>,
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
    /// Log format: `text` or `json`.
    #[arg(long, global = true, env = "TOKENGATE_LOG_FORMAT")]
    pub log_format: Option<String>,
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
            token_cookie, token_query, cors_origins, heartbeat, retry, pace_ms, pace_min_ms,
            pace_max_ms, generator_pace, default_generator, prompts_dir, max_body_bytes,
            max_prompt_bytes, shutdown_grace, shutdown_retry, log_format)
    }

    /// Reads a TOML settings file.
    pub fn from_toml_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::invalid("config", format!("cannot read {}: {e}", path.display()))
        })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::invalid("config", format!("{}: {e}", path.display())))
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
        Self {
            setting,
            flag: setting.replace('_', "-"),
            env: setting.to_ascii_uppercase(),
            reason: reason.into(),
        }
    }

    /// The TOML name of the offending setting.
    pub fn setting(&self) -> &'static str {
        self.setting
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
    pub fn resolve(&self, generator_default: Duration, requested_ms: Option<u64>) -> Duration {
        match requested_ms {
            Some(ms) => Duration::from_millis(ms).clamp(self.min, self.max),
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

/// Validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Listen backlog.
    pub listen_backlog: u32,
    /// Authentication.
    pub auth: AuthConfig,
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
}

fn duration(
    setting: &'static str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v.trim()).map_err(|e| {
            ConfigError::invalid(
                setting,
                format!("`{v}` is not a duration like `15s` or `500ms` ({e})"),
            )
        }),
    }
}

fn read_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::invalid(setting, format!("cannot read {}: {e}", path.display())))
}

impl Config {
    /// Validates settings into a runtime config. `random_secret` is used when
    /// no key is configured (the no-config demo start).
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let listen_text = s.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|e| {
            ConfigError::invalid(
                "listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:8080 ({e})"),
            )
        })?;
        let listen_backlog = s.listen_backlog.unwrap_or(DEFAULT_LISTEN_BACKLOG);
        if listen_backlog == 0 {
            return Err(ConfigError::invalid("listen_backlog", "must be at least 1"));
        }

        let key = key_material(&s)?;
        let auth = AuthConfig::new(
            key,
            s.jwt_algorithms.as_deref(),
            s.jwt_issuer.clone(),
            s.jwt_audience.clone(),
            duration("jwt_leeway", s.jwt_leeway.as_deref(), DEFAULT_JWT_LEEWAY)?,
            TokenSources {
                cookie: s
                    .token_cookie
                    .clone()
                    .unwrap_or_else(|| DEFAULT_TOKEN_COOKIE.to_owned()),
                query: s
                    .token_query
                    .clone()
                    .unwrap_or_else(|| DEFAULT_TOKEN_QUERY.to_owned()),
            },
        )?;
        if s.jwt_private_key_file.is_some() && auth.key_is_secret() {
            return Err(ConfigError::invalid(
                "jwt_private_key_file",
                "only meaningful with jwt_public_key_file",
            ));
        }

        let pace = PaceConfig {
            default: Duration::from_millis(s.pace_ms.unwrap_or(DEFAULT_PACE_MS)),
            min: Duration::from_millis(s.pace_min_ms.unwrap_or(DEFAULT_PACE_MIN_MS)),
            max: Duration::from_millis(s.pace_max_ms.unwrap_or(DEFAULT_PACE_MAX_MS)),
            per_generator: s
                .generator_pace
                .iter()
                .flatten()
                .map(|item| {
                    let (name, ms) = item.split_once('=').ok_or_else(|| {
                        ConfigError::invalid("generator_pace", format!("`{item}` is not `name=ms`"))
                    })?;
                    let ms: u64 = ms.trim().parse().map_err(|_| {
                        ConfigError::invalid(
                            "generator_pace",
                            format!("`{item}`: `{ms}` is not a number of milliseconds"),
                        )
                    })?;
                    Ok((name.trim().to_owned(), Duration::from_millis(ms)))
                })
                .collect::<Result<_, _>>()?,
        };
        if pace.min > pace.max {
            return Err(ConfigError::invalid("pace_min_ms", "is above pace_max_ms"));
        }
        let heartbeat = duration("heartbeat", s.heartbeat.as_deref(), DEFAULT_HEARTBEAT)?;
        if heartbeat.is_zero() {
            return Err(ConfigError::invalid("heartbeat", "must be above zero"));
        }

        let cors_origins = match &s.cors_origins {
            None => None,
            Some(list) => {
                let list: Vec<String> = list
                    .iter()
                    .map(|o| o.trim().to_owned())
                    .filter(|o| !o.is_empty())
                    .collect();
                if list.iter().any(|o| o == "*") && list.len() > 1 {
                    return Err(ConfigError::invalid(
                        "cors_origins",
                        "`*` cannot be combined with explicit origins",
                    ));
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
                Some(list)
            }
        };

        let log_json = match s.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "log_format",
                    format!("`{other}` is neither `text` nor `json`"),
                ));
            }
        };

        if let Some(dir) = &s.prompts_dir
            && !dir.is_dir()
        {
            return Err(ConfigError::invalid(
                "prompts_dir",
                format!("{} is not a directory", dir.display()),
            ));
        }

        Ok(Config {
            listen,
            listen_backlog,
            auth,
            stream: StreamConfig {
                heartbeat,
                retry: duration("retry", s.retry.as_deref(), DEFAULT_RETRY)?,
                pace,
                default_generator: s
                    .default_generator
                    .clone()
                    .unwrap_or_else(|| DEFAULT_GENERATOR.to_owned()),
                max_prompt_bytes: s.max_prompt_bytes.unwrap_or(DEFAULT_MAX_PROMPT_BYTES),
            },
            cors_origins,
            prompts_dir: s.prompts_dir.clone(),
            max_body_bytes: s.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            shutdown_grace: duration(
                "shutdown_grace",
                s.shutdown_grace.as_deref(),
                DEFAULT_SHUTDOWN_GRACE,
            )?,
            shutdown_retry: duration(
                "shutdown_retry",
                s.shutdown_retry.as_deref(),
                DEFAULT_SHUTDOWN_RETRY,
            )?,
            log_json,
        })
    }
}

fn key_material(s: &Settings) -> Result<KeyMaterial, ConfigError> {
    let configured = [
        s.jwt_secret.is_some(),
        s.jwt_secret_file.is_some(),
        s.jwt_public_key_file.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if configured > 1 {
        return Err(ConfigError::invalid(
            "jwt_secret",
            "set only one of jwt_secret, jwt_secret_file and jwt_public_key_file",
        ));
    }
    let secret = |setting: &'static str, bytes: Vec<u8>| {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::invalid(
                setting,
                format!(
                    "the secret is {} bytes; at least {MIN_SECRET_BYTES} are required",
                    bytes.len()
                ),
            ));
        }
        Ok(KeyMaterial::Secret {
            secret: Secret::new(bytes),
            generated: false,
        })
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
        return Ok(KeyMaterial::PublicKey {
            public_pem,
            private_pem,
        });
    }
    let mut bytes = vec![0u8; MIN_SECRET_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| {
        ConfigError::invalid(
            "jwt_secret",
            format!("no key configured and the OS RNG failed: {e}"),
        )
    })?;
    Ok(KeyMaterial::Secret {
        secret: Secret::new(bytes),
        generated: true,
    })
}
