//! Upstream model servers (OpenAI-compatible chat completions, or with
//! `kind = "anthropic"` the Anthropic Messages API): their settings as
//! written in the TOML file, validated into [`Upstream`]s.
//!
//! ```toml
//! [upstreams.local]
//! base_url = "http://127.0.0.1:8000/v1"
//! model = "llama3.1"
//! api_key_env = "LOCAL_API_KEY"      # or api_key_file = "/run/secrets/key"
//! aliases = ["gpt-4o-mini"]          # request names that pick this upstream
//! fallbacks = ["backup"]             # tried in order, before the first byte
//! headers = { "X-Org" = "acme" }
//! connect_timeout = "5s"
//! first_byte_timeout = "60s"
//! idle_timeout = "60s"
//! total_timeout = "10m"
//! retries = 2
//!
//! [upstreams.private]
//! base_url = "https://llm.internal:8443/v1"
//! model = "m"
//! ca_file = "/etc/tokengate/internal-ca.pem" # trusted besides the system roots
//!
//! [upstreams.claude]
//! kind = "anthropic"                 # POST {base_url}/messages, key as x-api-key
//! base_url = "https://api.anthropic.com/v1"
//! model = "claude-sonnet-4-5"
//! api_key_env = "ANTHROPIC_API_KEY"
//! anthropic_version = "2023-06-01"   # the default
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::secret::Secret;

/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default wait for the response head.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default longest silence between two chunks.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default longest whole generation.
pub const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(600);
/// Default retries before the first byte.
pub const DEFAULT_RETRIES: u32 = 2;
/// Most retries accepted in configuration.
pub const MAX_RETRIES: u32 = 5;
/// `anthropic-version` sent to `kind = "anthropic"` upstreams by default.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Which API an upstream speaks; the generator's request body, headers and
/// stream parsing follow it, everything else (retries, fallbacks,
/// timeouts, cancellation) is the same.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// OpenAI-compatible chat completions (`/chat/completions`, bearer key).
    #[default]
    Openai,
    /// The Anthropic Messages API (`/messages`, `x-api-key`,
    /// `anthropic-version`).
    Anthropic,
}

/// One `[upstreams.NAME]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// The API it speaks (`openai`, the default, or `anthropic`).
    pub kind: Option<UpstreamKind>,
    /// Base URL up to `/v1` (the path `/chat/completions`, or `/messages`
    /// for `anthropic`, is appended).
    pub base_url: String,
    /// The upstream's model name.
    pub model: String,
    /// Environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// File holding the API key.
    pub api_key_file: Option<std::path::PathBuf>,
    /// Other names that select this upstream.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Upstreams tried, in order, when this one fails before the first byte.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Connect timeout (e.g. `5s`).
    pub connect_timeout: Option<String>,
    /// Wait for the response head (e.g. `60s`).
    pub first_byte_timeout: Option<String>,
    /// Longest silence between chunks (e.g. `60s`).
    pub idle_timeout: Option<String>,
    /// Longest whole generation (e.g. `10m`).
    pub total_timeout: Option<String>,
    /// Retries before the first byte (connect errors, 5xx, timeouts).
    pub retries: Option<u32>,
    /// Default pace for this upstream's deltas in ms (0: as they come).
    pub pace_ms: Option<u32>,
    /// Reuse connections through a pool (and honour `HTTP_PROXY`) for an
    /// `http://` upstream too; `https://` ones always are.
    pub pooled: Option<bool>,
    /// `anthropic-version` for `kind = "anthropic"` (default
    /// [`DEFAULT_ANTHROPIC_VERSION`]).
    pub anthropic_version: Option<String>,
    /// PEM CA certificate(s) trusted for this `https://` upstream besides
    /// the system roots (a model server behind a private CA).
    pub ca_file: Option<std::path::PathBuf>,
}

/// A validated upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Its name (a generator name).
    pub name: String,
    /// The API it speaks.
    pub kind: UpstreamKind,
    /// `.../chat/completions` (or `.../messages`).
    pub url: String,
    /// The upstream's model name.
    pub model: String,
    /// The API key, if any.
    pub api_key: Option<Secret>,
    /// Extra headers (for `anthropic`, with `anthropic-version`).
    pub headers: HeaderMap,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Wait for the response head.
    pub first_byte_timeout: Duration,
    /// Longest silence between chunks.
    pub idle_timeout: Duration,
    /// Longest whole generation.
    pub total_timeout: Duration,
    /// Retries before the first byte.
    pub retries: u32,
    /// Aliases.
    pub aliases: Vec<String>,
    /// Fallback upstream names, in order.
    pub fallbacks: Vec<String>,
    /// Default pace.
    pub pace: Option<Duration>,
    /// Requests go through reqwest's pool rather than a connection of their
    /// own driven by the reading task.
    pub pooled: bool,
    /// Extra CA certificates (PEM) for its TLS, read at start-up.
    pub ca: Option<Vec<u8>>,
}

/// Why an `[upstreams.NAME]` table cannot be used. Every variant names the
/// upstream, since a file may hold many; the caller (`config`) adds which
/// setting (`upstreams`) it was.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    /// `base_url` is not an http(s) URL.
    #[error("upstream `{upstream}`: base_url `{base_url}` must start with http:// or https://")]
    BaseUrl {
        /// The upstream's name.
        upstream: String,
        /// The URL as written.
        base_url: String,
    },
    /// `model` is empty.
    #[error("upstream `{upstream}`: model is required")]
    MissingModel {
        /// The upstream's name.
        upstream: String,
    },
    /// Both `api_key_env` and `api_key_file`: which one wins would be a guess.
    #[error("upstream `{upstream}`: set api_key_env or api_key_file, not both")]
    TwoKeys {
        /// The upstream's name.
        upstream: String,
    },
    /// `api_key_env` names an unset variable.
    #[error("upstream `{upstream}`: environment variable `{var}` (api_key_env) is not set")]
    KeyEnvUnset {
        /// The upstream's name.
        upstream: String,
        /// The variable's name.
        var: String,
    },
    /// `api_key_file` cannot be read.
    #[error("upstream `{upstream}`: cannot read api_key_file {}: {source}", path.display())]
    KeyFile {
        /// The upstream's name.
        upstream: String,
        /// The file.
        path: std::path::PathBuf,
        /// Why not.
        source: std::io::Error,
    },
    /// A `headers` key that is no HTTP header name.
    #[error("upstream `{upstream}`: header name `{header}` is invalid")]
    HeaderName {
        /// The upstream's name.
        upstream: String,
        /// The name as written.
        header: String,
    },
    /// A `headers` value that cannot be sent (control characters, say).
    #[error("upstream `{upstream}`: header `{header}` has an invalid value")]
    HeaderValue {
        /// The upstream's name.
        upstream: String,
        /// The header's name.
        header: String,
    },
    /// `ca_file` cannot be read, or is set for a plain `http://` upstream.
    #[error("upstream `{upstream}`: ca_file {}: {reason}", path.display())]
    CaFile {
        /// The upstream's name.
        upstream: String,
        /// The file.
        path: std::path::PathBuf,
        /// Why not.
        reason: String,
    },
    /// `retries` above [`MAX_RETRIES`].
    #[error("upstream `{upstream}`: retries must be at most {MAX_RETRIES}")]
    TooManyRetries {
        /// The upstream's name.
        upstream: String,
    },
    /// A timeout that is not a duration.
    #[error("upstream `{upstream}`: {setting} `{value}`: {source}")]
    Timeout {
        /// The upstream's name.
        upstream: String,
        /// Which timeout (`connect_timeout`, ...).
        setting: &'static str,
        /// The value as written.
        value: String,
        /// Why it does not parse.
        source: humantime::DurationError,
    },
    /// A fallback that names no other upstream.
    #[error("upstream `{upstream}`: fallback `{fallback}` is not another upstream")]
    Fallback {
        /// The upstream's name.
        upstream: String,
        /// The fallback as written.
        fallback: String,
    },
}

fn dur(
    upstream: &str,
    setting: &'static str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, UpstreamConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v).map_err(|source| UpstreamConfigError::Timeout {
            upstream: upstream.to_owned(),
            setting,
            value: v.to_owned(),
            source,
        }),
    }
}

impl Upstream {
    /// Validates one table. Reads the API key now, so a missing key stops
    /// start-up instead of failing the first request.
    pub fn from_settings(name: &str, s: &UpstreamSettings) -> Result<Self, UpstreamConfigError> {
        let upstream = || name.to_owned();
        let base = s.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(UpstreamConfigError::BaseUrl { upstream: upstream(), base_url: s.base_url.clone() });
        }
        if s.model.is_empty() {
            return Err(UpstreamConfigError::MissingModel { upstream: upstream() });
        }
        let api_key = match (&s.api_key_env, &s.api_key_file) {
            (Some(_), Some(_)) => return Err(UpstreamConfigError::TwoKeys { upstream: upstream() }),
            (Some(var), None) => Some(Secret::new(
                std::env::var(var)
                    .map_err(|_| UpstreamConfigError::KeyEnvUnset { upstream: upstream(), var: var.clone() })?
                    .into_bytes(),
            )),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|source| UpstreamConfigError::KeyFile {
                    upstream: upstream(),
                    path: path.clone(),
                    source,
                })?;
                Some(Secret::new(text.trim().as_bytes().to_vec()))
            }
            (None, None) => None,
        };
        let mut headers = HeaderMap::new();
        for (k, v) in &s.headers {
            let header = || k.clone();
            let name = HeaderName::try_from(k.as_str())
                .map_err(|_| UpstreamConfigError::HeaderName { upstream: upstream(), header: header() })?;
            let value = HeaderValue::try_from(v.as_str())
                .map_err(|_| UpstreamConfigError::HeaderValue { upstream: upstream(), header: header() })?;
            headers.insert(name, value);
        }
        let kind = s.kind.unwrap_or_default();
        if kind == UpstreamKind::Anthropic {
            let version = s.anthropic_version.as_deref().unwrap_or(DEFAULT_ANTHROPIC_VERSION);
            let value = HeaderValue::try_from(version).map_err(|_| UpstreamConfigError::HeaderValue {
                upstream: upstream(),
                header: "anthropic_version".into(),
            })?;
            headers.entry("anthropic-version").or_insert(value);
            // The key goes in a header: refuse one that cannot, now.
            if api_key.as_ref().is_some_and(|k| HeaderValue::from_bytes(k.expose()).is_err()) {
                return Err(UpstreamConfigError::HeaderValue { upstream: upstream(), header: "x-api-key".into() });
            }
        }
        let path = match kind {
            UpstreamKind::Openai => "chat/completions",
            UpstreamKind::Anthropic => "messages",
        };
        let ca = match &s.ca_file {
            None => None,
            Some(path) => {
                let ca_error =
                    |reason: String| UpstreamConfigError::CaFile { upstream: upstream(), path: path.clone(), reason };
                if !base.starts_with("https://") {
                    return Err(ca_error("only meaningful with an https:// base_url".into()));
                }
                Some(std::fs::read(path).map_err(|e| ca_error(e.to_string()))?)
            }
        };
        let retries = s.retries.unwrap_or(DEFAULT_RETRIES);
        if retries > MAX_RETRIES {
            return Err(UpstreamConfigError::TooManyRetries { upstream: upstream() });
        }
        Ok(Self {
            name: name.to_owned(),
            kind,
            url: format!("{base}/{path}"),
            model: s.model.clone(),
            api_key,
            headers,
            connect_timeout: dur(name, "connect_timeout", s.connect_timeout.as_deref(), DEFAULT_CONNECT_TIMEOUT)?,
            first_byte_timeout: dur(
                name,
                "first_byte_timeout",
                s.first_byte_timeout.as_deref(),
                DEFAULT_FIRST_BYTE_TIMEOUT,
            )?,
            idle_timeout: dur(name, "idle_timeout", s.idle_timeout.as_deref(), DEFAULT_IDLE_TIMEOUT)?,
            total_timeout: dur(name, "total_timeout", s.total_timeout.as_deref(), DEFAULT_TOTAL_TIMEOUT)?,
            retries,
            aliases: s.aliases.clone(),
            fallbacks: s.fallbacks.clone(),
            pace: s.pace_ms.map(|ms| Duration::from_millis(u64::from(ms))),
            pooled: s.pooled.unwrap_or(false),
            ca,
        })
    }
}

/// Validates every upstream and their fallback references.
pub fn validate(upstreams: &BTreeMap<String, UpstreamSettings>) -> Result<Vec<Upstream>, UpstreamConfigError> {
    let list: Vec<Upstream> =
        upstreams.iter().map(|(name, s)| Upstream::from_settings(name, s)).collect::<Result<_, _>>()?;
    for u in &list {
        for f in &u.fallbacks {
            if !upstreams.contains_key(f) || f == &u.name {
                return Err(UpstreamConfigError::Fallback { upstream: u.name.clone(), fallback: f.clone() });
            }
        }
    }
    Ok(list)
}
