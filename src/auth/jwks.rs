//! The identity provider's key set, cached: loaded from a URL and/or a
//! file, refreshed in the background on an interval that honours the
//! answer's `Cache-Control: max-age` within bounds, and once more when a
//! token names a `kid` the cache does not know — at most once per
//! `refresh_min`, so that tokens with forged `kid`s cannot make tokengate
//! hammer the identity provider.
//!
//! A failed load (the server down, a 500, garbage, a document without one
//! usable key) keeps the last good set; it is logged, without any key
//! material, and counted. Until a first load succeeds no token is accepted:
//! [`AuthError::KeysUnavailable`] (503 on the wire).
//!
//! With both a URL and a file, the served set is the union of each source's
//! last good set (the file's keys first), and the file is re-read on every
//! refresh, so a key file rewritten by configuration management needs no
//! restart either.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use axum::http::HeaderMap;
use jsonwebtoken::Algorithm;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::keyset::{KeyEntry, KeySet, KeySetError, Selection};
use super::{AuthError, AuthSetupError};
use crate::metrics::Metrics;

/// Longest wait for the identity provider to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a whole fetch may take; a token whose `kid` triggered it waits
/// at most this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read (real ones are a few KiB).
pub(super) const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Where the key set comes from and how often it is refreshed, as
/// configured.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// The identity provider's JWKS endpoint (`http://` or `https://`).
    pub url: Option<String>,
    /// A local JWKS document (read at start, where an unreadable one is a
    /// configuration error, and re-read on every refresh).
    pub file: Option<PathBuf>,
    /// Refresh interval when the answer has no `max-age`.
    pub refresh: Duration,
    /// Lower bound of the interval; also the shortest time between two
    /// refreshes triggered by unknown `kid`s, and the retry delay after a
    /// failed fetch.
    pub refresh_min: Duration,
    /// Upper bound of the interval.
    pub refresh_max: Duration,
}

/// Why one load of a source failed. Display never includes the URL (it may
/// carry credentials) nor any key.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("request failed: {0}")]
    Request(reqwest::Error),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("answer larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("cannot read the file: {0}")]
    File(std::io::Error),
    #[error(transparent)]
    KeySet(#[from] KeySetError),
}

/// The last good set of each source, and when the next scheduled refresh
/// is due.
struct Loaded {
    file: Option<KeySet>,
    url: Option<KeySet>,
    /// Both, as served.
    merged: Arc<KeySet>,
    next_refresh: Instant,
}

/// What the cache says about a token's key.
enum Lookup {
    Found(Arc<KeyEntry>),
    WrongAlgorithm,
    NotFound,
    /// The URL was never fetched successfully, so a key missing from the
    /// (file's, or empty) set may well exist.
    Incomplete,
}

/// The cached key set; shared by every clone of the `AuthConfig`.
pub(super) struct Jwks {
    url: Option<reqwest::Url>,
    file: Option<PathBuf>,
    settings: JwksSettings,
    /// Keys serving none of these are dropped when a document is read.
    algorithms: Vec<Algorithm>,
    client: reqwest::Client,
    loaded: RwLock<Loaded>,
    /// Held for the duration of a refresh: one at a time, and a token that
    /// missed its `kid` while one runs waits for it instead of starting
    /// another.
    refreshing: tokio::sync::Mutex<()>,
    /// When the last `kid`-triggered refresh started (the rate limit).
    last_kid_refresh: Mutex<Option<Instant>>,
    /// Set when the background refresh starts; before (a router without a
    /// running server) loads are simply not counted.
    metrics: OnceLock<Arc<Metrics>>,
    started: AtomicBool,
}

impl Jwks {
    /// Checks the URL, builds the HTTP client and reads the file (an
    /// unreadable or useless file is refused at start, where the operator
    /// sees it). The URL is fetched by [`Jwks::spawn_refresh`], not here:
    /// configuration is synchronous and must not wait on the network.
    pub(super) fn new(settings: JwksSettings, algorithms: Vec<Algorithm>) -> Result<Self, AuthSetupError> {
        let url = match &settings.url {
            None => None,
            Some(text) => {
                let url = reqwest::Url::parse(text).map_err(|e| AuthSetupError::JwksUrl(e.to_string()))?;
                if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
                    return Err(AuthSetupError::JwksUrl(format!("scheme `{}`", url.scheme())));
                }
                Some(url)
            }
        };
        let file = match &settings.file {
            None => None,
            Some(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| AuthSetupError::JwksFile(format!("cannot read {}: {e}", path.display())))?;
                Some(KeySet::parse(&bytes, &algorithms).map_err(|e| AuthSetupError::JwksFile(e.to_string()))?)
            }
        };
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("tokengate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AuthSetupError::JwksClient(e.to_string()))?;
        let merged = Arc::new(KeySet::merged(file.as_ref(), None));
        let loaded = Loaded { file, url: None, merged, next_refresh: Instant::now() };
        Ok(Self {
            url,
            file: settings.file.clone(),
            settings,
            algorithms,
            client,
            loaded: RwLock::new(loaded),
            refreshing: tokio::sync::Mutex::new(()),
            last_kid_refresh: Mutex::new(None),
            metrics: OnceLock::new(),
            started: AtomicBool::new(false),
        })
    }

    /// The key for a token's header, refreshing once (rate-limited) when
    /// its `kid` is unknown or nothing could be loaded yet.
    pub(super) async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<KeyEntry>, AuthError> {
        match self.lookup(kid, alg) {
            Lookup::Found(key) => return Ok(key),
            Lookup::WrongAlgorithm => return Err(AuthError::Algorithm(format!("{alg:?}"))),
            // Without a kid there is nothing a refresh could bring.
            Lookup::NotFound if kid.is_none() => return Err(AuthError::UnknownKey),
            Lookup::NotFound | Lookup::Incomplete => {}
        }
        self.refresh_for_unknown_kid().await;
        match self.lookup(kid, alg) {
            Lookup::Found(key) => Ok(key),
            Lookup::WrongAlgorithm => Err(AuthError::Algorithm(format!("{alg:?}"))),
            Lookup::NotFound => Err(AuthError::UnknownKey),
            Lookup::Incomplete => Err(AuthError::KeysUnavailable { retry_after: self.next_kid_refresh_in() }),
        }
    }

    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup {
        let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
        match loaded.merged.select(kid, alg) {
            Selection::Found(key) => Lookup::Found(key),
            Selection::WrongAlgorithm => Lookup::WrongAlgorithm,
            Selection::NotFound if self.url.is_some() && loaded.url.is_none() => Lookup::Incomplete,
            Selection::NotFound => Lookup::NotFound,
        }
    }

    /// One refresh unless one was triggered this way less than
    /// `refresh_min` ago; then only waits for a refresh under way, if any.
    async fn refresh_for_unknown_kid(&self) {
        let due = {
            let mut last = self.last_kid_refresh.lock().unwrap_or_else(PoisonError::into_inner);
            let due = last.is_none_or(|at| at.elapsed() >= self.settings.refresh_min);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            if let Some(metrics) = self.metrics.get() {
                metrics.jwks_kid_refresh();
            }
            self.refresh().await;
        } else {
            drop(self.refreshing.lock().await);
        }
    }

    /// How long until an unknown `kid` may trigger a refresh again (at
    /// least a second: it becomes a `Retry-After`).
    fn next_kid_refresh_in(&self) -> Duration {
        let last = *self.last_kid_refresh.lock().unwrap_or_else(PoisonError::into_inner);
        let wait = last.map_or(Duration::ZERO, |at| self.settings.refresh_min.saturating_sub(at.elapsed()));
        wait.max(Duration::from_secs(1))
    }

    /// Loads every source once, keeping each one's last good set on
    /// failure, and schedules the next refresh: after the answer's
    /// `max-age` (else `refresh`) within the bounds, or `refresh_min` after
    /// a failed fetch. Counted only once the new set is served, so that a
    /// count seen in the metrics means the keys are in use.
    async fn refresh(&self) {
        let _one = self.refreshing.lock().await;
        let mut results = Vec::with_capacity(2);
        let file = match &self.file {
            None => None,
            Some(path) => log_load(path.display().to_string(), load_file(path, &self.algorithms).await),
        };
        results.extend(self.file.as_ref().map(|_| file.is_some()));
        let bounds = |d: Duration| d.clamp(self.settings.refresh_min, self.settings.refresh_max);
        let (url, next) = match &self.url {
            None => (None, bounds(self.settings.refresh)),
            Some(url) => match log_load(url.origin().ascii_serialization(), self.fetch(url).await) {
                Some((set, max_age)) => (Some(set), bounds(max_age.unwrap_or(self.settings.refresh))),
                None => (None, self.settings.refresh_min),
            },
        };
        results.extend(self.url.as_ref().map(|_| url.is_some()));
        let keys = {
            let mut loaded = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(set) = file {
                loaded.file = Some(set);
            }
            if let Some(set) = url {
                loaded.url = Some(set);
            }
            loaded.merged = Arc::new(KeySet::merged(loaded.file.as_ref(), loaded.url.as_ref()));
            loaded.next_refresh = Instant::now() + next;
            loaded.merged.len()
        };
        if let Some(metrics) = self.metrics.get() {
            metrics.set_jwks_keys(keys);
            for ok in results {
                metrics.jwks_refreshed(ok);
            }
        }
    }

    /// One GET of the JWKS URL: the key set and the answer's `max-age`.
    async fn fetch(&self, url: &reqwest::Url) -> Result<(KeySet, Option<Duration>), LoadError> {
        let mut response = self
            .client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/jwk-set+json, application/json")
            .send()
            .await
            .map_err(|e| LoadError::Request(e.without_url()))?;
        if !response.status().is_success() {
            return Err(LoadError::Status(response.status().as_u16()));
        }
        let max_age = max_age(response.headers());
        if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
            return Err(LoadError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| LoadError::Request(e.without_url()))? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(LoadError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok((KeySet::parse(&body, &self.algorithms)?, max_age))
    }

    fn next_refresh(&self) -> Instant {
        self.loaded.read().unwrap_or_else(PoisonError::into_inner).next_refresh
    }

    /// Starts the background refresh (once, however often it is called):
    /// the first load at once, then as [`Jwks::refresh`] schedules, until
    /// `stop`.
    pub(super) fn spawn_refresh(self: &Arc<Self>, metrics: Arc<Metrics>, stop: CancellationToken) {
        if self.metrics.set(metrics).is_ok() {
            let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(metrics) = self.metrics.get() {
                metrics.set_jwks_keys(loaded.merged.len());
            }
        }
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let jwks = self.clone();
        tokio::spawn(async move {
            loop {
                let next = jwks.next_refresh();
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep_until(next) => {
                        // A refresh for an unknown kid may have run (and
                        // rescheduled) meanwhile: then this one is not due.
                        if Instant::now() >= jwks.next_refresh() {
                            jwks.refresh().await;
                        }
                    }
                }
            }
        });
    }
}

/// Logs one load's result; the value on success. `source` is the file's
/// path or the URL's origin (scheme, host and port): the URL's path or
/// query may carry a tenant secret, and no key is ever logged.
fn log_load<T>(source: String, result: Result<T, LoadError>) -> Option<T> {
    match result {
        Ok(value) => {
            tracing::debug!(%source, "JWKS loaded");
            Some(value)
        }
        Err(e) => {
            tracing::warn!(%source, error = %e, "JWKS refresh failed; keeping the last good key set");
            None
        }
    }
}

async fn load_file(path: &std::path::Path, algorithms: &[Algorithm]) -> Result<KeySet, LoadError> {
    let bytes = tokio::fs::read(path).await.map_err(LoadError::File)?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(LoadError::TooLarge);
    }
    Ok(KeySet::parse(&bytes, algorithms)?)
}

/// The `max-age` of a `Cache-Control` header, if it has one. `no-cache`
/// and `no-store` are not taken as "refetch constantly": the key set is
/// then refreshed on the configured interval, like without the header.
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(axum::http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|directive| {
            let (name, value) = directive.trim().split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("max-age") {
                return None;
            }
            value.trim().trim_matches('"').parse::<u64>().ok().map(Duration::from_secs)
        })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(axum::http::header::CACHE_CONTROL, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn max_age_is_read_from_cache_control() {
        assert_eq!(max_age(&headers(&["public, max-age=300"])), Some(Duration::from_secs(300)));
        assert_eq!(max_age(&headers(&["no-transform", "Max-Age = \"60\""])), Some(Duration::from_secs(60)));
        assert_eq!(max_age(&headers(&["s-maxage=10, must-revalidate"])), None);
        assert_eq!(max_age(&headers(&["no-cache"])), None);
        assert_eq!(max_age(&headers(&["max-age=-1"])), None);
        assert_eq!(max_age(&headers(&[])), None);
    }

    fn settings(url: Option<&str>) -> JwksSettings {
        JwksSettings {
            url: url.map(str::to_owned),
            file: None,
            refresh: Duration::from_secs(300),
            refresh_min: Duration::from_secs(30),
            refresh_max: Duration::from_secs(3600),
        }
    }

    #[test]
    fn only_http_and_https_urls_are_accepted() {
        for good in ["http://127.0.0.1:9/jwks", "https://idp.example.com/.well-known/jwks.json"] {
            assert!(Jwks::new(settings(Some(good)), vec![Algorithm::RS256]).is_ok(), "{good}");
        }
        for bad in ["file:///etc/jwks.json", "idp.example.com/jwks", "ftp://idp/jwks"] {
            let err = Jwks::new(settings(Some(bad)), vec![Algorithm::RS256]).err();
            assert!(matches!(err, Some(AuthSetupError::JwksUrl(_))), "{bad}");
        }
    }

    #[tokio::test]
    async fn before_any_fetch_tokens_are_refused_as_unavailable() {
        // Port 9 (discard) on loopback: nothing listens; the fetch fails.
        let Ok(jwks) = Jwks::new(settings(Some("http://127.0.0.1:9/jwks")), vec![Algorithm::RS256]) else {
            panic!("setup")
        };
        let result = jwks.key_for(Some("kid"), Algorithm::RS256).await;
        assert!(
            matches!(result, Err(AuthError::KeysUnavailable { retry_after }) if retry_after >= Duration::from_secs(1))
        );
        // A second miss within `refresh_min` does not fetch again.
        assert!(jwks.last_kid_refresh.lock().is_ok_and(|l| l.is_some()));
        let result = jwks.key_for(Some("other"), Algorithm::RS256).await;
        assert!(matches!(result, Err(AuthError::KeysUnavailable { .. })));
    }
}
