//! The machine-readable codes a stream can end with. They are the `code`
//! of a terminal `error` event on every dialect, the `outcome` label of the
//! `tokengate_streams_total` metric and the value stored in the shared
//! store, so they are one enum whose serde names are the wire strings:
//! nothing else spells them.

use serde::{Deserialize, Serialize};

/// Why a stream ended with an error. The serde name is the wire code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A built-in generator failed.
    GeneratorFailed,
    /// The stream reached `max_stream_duration`.
    MaxDuration,
    /// `DELETE /v1/streams/{id}`.
    Cancelled,
    /// No client was attached for the detach grace period.
    ClientGone,
    /// The client left its send window full for longer than `max_lag`.
    SlowConsumer,
    /// The replica generating the stream shut down or died.
    GeneratorLost,
    /// The shared store failed while the stream ran.
    StoreUnavailable,
    /// The requested resume position is no longer retained.
    ResumeGap,
    /// A bug: the stream ended without saying why.
    Internal,
    /// The subject's usage budget ran out while the stream ran.
    QuotaExceeded,
    /// The token (or ticket) that opened the connection expired, past its
    /// grace; reconnect with a fresh one and resume.
    TokenExpired,
    /// The upstream did not accept a connection in time.
    UpstreamConnectTimeout,
    /// The upstream refused or dropped the connection.
    UpstreamConnectFailed,
    /// The upstream sent no response head in time.
    UpstreamFirstByteTimeout,
    /// The upstream sent nothing for `idle_timeout`.
    UpstreamIdleTimeout,
    /// The upstream stream exceeded `total_timeout`.
    UpstreamTotalTimeout,
    /// The upstream closed the stream before finishing.
    UpstreamDisconnected,
    /// The upstream refused the API key (401/403).
    UpstreamUnauthorized,
    /// The upstream does not know the model (404).
    UpstreamNotFound,
    /// The upstream rate-limited the request (429).
    UpstreamRateLimited,
    /// The upstream failed (5xx) or none could be reached.
    UpstreamUnavailable,
    /// The upstream refused the request (other 4xx).
    UpstreamBadRequest,
    /// The upstream sent a chunk that is not valid JSON.
    UpstreamMalformed,
    /// The upstream sent an error object mid-stream.
    UpstreamError,
}

impl ErrorCode {
    /// Every code, for exhaustive tests and documentation.
    pub const ALL: [ErrorCode; 24] = [
        ErrorCode::GeneratorFailed,
        ErrorCode::MaxDuration,
        ErrorCode::Cancelled,
        ErrorCode::ClientGone,
        ErrorCode::SlowConsumer,
        ErrorCode::GeneratorLost,
        ErrorCode::StoreUnavailable,
        ErrorCode::ResumeGap,
        ErrorCode::Internal,
        ErrorCode::QuotaExceeded,
        ErrorCode::TokenExpired,
        ErrorCode::UpstreamConnectTimeout,
        ErrorCode::UpstreamConnectFailed,
        ErrorCode::UpstreamFirstByteTimeout,
        ErrorCode::UpstreamIdleTimeout,
        ErrorCode::UpstreamTotalTimeout,
        ErrorCode::UpstreamDisconnected,
        ErrorCode::UpstreamUnauthorized,
        ErrorCode::UpstreamNotFound,
        ErrorCode::UpstreamRateLimited,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::UpstreamBadRequest,
        ErrorCode::UpstreamMalformed,
        ErrorCode::UpstreamError,
    ];

    /// The wire code (the serde name), without allocating.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::GeneratorFailed => "generator_failed",
            ErrorCode::MaxDuration => "max_duration",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::ClientGone => "client_gone",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::GeneratorLost => "generator_lost",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::ResumeGap => "resume_gap",
            ErrorCode::Internal => "internal",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::UpstreamConnectTimeout => "upstream_connect_timeout",
            ErrorCode::UpstreamConnectFailed => "upstream_connect_failed",
            ErrorCode::UpstreamFirstByteTimeout => "upstream_first_byte_timeout",
            ErrorCode::UpstreamIdleTimeout => "upstream_idle_timeout",
            ErrorCode::UpstreamTotalTimeout => "upstream_total_timeout",
            ErrorCode::UpstreamDisconnected => "upstream_disconnected",
            ErrorCode::UpstreamUnauthorized => "upstream_unauthorized",
            ErrorCode::UpstreamNotFound => "upstream_not_found",
            ErrorCode::UpstreamRateLimited => "upstream_rate_limited",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::UpstreamBadRequest => "upstream_bad_request",
            ErrorCode::UpstreamMalformed => "upstream_malformed",
            ErrorCode::UpstreamError => "upstream_error",
        }
    }

    /// The code a wire string names, if any (codes stored by another
    /// replica's version may be unknown here).
    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == code)
    }

    /// Whether the upstream model server caused it (counted in
    /// `tokengate_upstream_errors_total`).
    pub const fn is_upstream(self) -> bool {
        matches!(
            self,
            ErrorCode::UpstreamConnectTimeout
                | ErrorCode::UpstreamConnectFailed
                | ErrorCode::UpstreamFirstByteTimeout
                | ErrorCode::UpstreamIdleTimeout
                | ErrorCode::UpstreamTotalTimeout
                | ErrorCode::UpstreamDisconnected
                | ErrorCode::UpstreamUnauthorized
                | ErrorCode::UpstreamNotFound
                | ErrorCode::UpstreamRateLimited
                | ErrorCode::UpstreamUnavailable
                | ErrorCode::UpstreamBadRequest
                | ErrorCode::UpstreamMalformed
                | ErrorCode::UpstreamError
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a stream (or one connection to it) ended: the `outcome` label of
/// the stream metrics and the end-of-stream log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The generator ran to its end (`event: done`).
    Done,
    /// A terminal `error` with this code.
    Error(ErrorCode),
    /// The server went away (`event: shutdown`).
    Shutdown,
}

impl Outcome {
    /// The metrics label: `done`, `shutdown` or the error code.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Shutdown => "shutdown",
            Outcome::Error(code) => code.as_str(),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_code_is_the_serde_name_and_parses_back() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            assert_eq!(code.is_upstream(), code.as_str().starts_with("upstream_"), "{code}");
        }
        assert_eq!(ErrorCode::parse("no_such_code"), None);
    }

    #[test]
    fn every_code_is_listed_once() {
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }
}
