//! The one place where failures become HTTP: [`ApiError`] gathers every
//! layer's error and its `IntoResponse` picks the status and writes the
//! RFC 9457 `application/problem+json` body (plus `WWW-Authenticate` or
//! `Retry-After` where they apply).

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::{AuthError, Scope};
use crate::event::ErrorCode;
use crate::limits::{RateLimited, RateRefused, RateScope, SlotRefused};
use crate::store::{ChannelRefused, ChannelScope};

/// Media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Everything a request can fail with, across layers.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Not authenticated.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Authenticated, but the token lacks a scope.
    #[error("this request needs the `{}` scope", .0.as_str())]
    MissingScope(Scope),
    /// The requested generator does not exist.
    #[error("unknown generator `{name}`; available: {}", .available.join(", "))]
    UnknownGenerator {
        /// What was asked for.
        name: String,
        /// What exists.
        available: Vec<String>,
    },
    /// A malformed request (bad JSON, bad query, invalid field).
    #[error("{0}")]
    BadRequest(String),
    /// The body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The request body did not arrive within `body_timeout` of the request head (a client
    /// that trickles its body, or stopped sending it).
    #[error("the request body was not received within {} s", retry_after_secs(*.0))]
    BodyTimeout(std::time::Duration),
    /// The prompt or body exceeds its limit.
    #[error("{what} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Which input.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Too many requests from this subject or client IP.
    #[error("too many requests; retry in {} s", retry_after_secs(.0.retry_after))]
    RateLimited(RateLimited),
    /// No stream slot free.
    #[error(transparent)]
    NoSlot(#[from] SlotRefused),
    /// The subject's usage budget is used up until `retry_after`.
    #[error("{detail}")]
    QuotaExceeded {
        /// Which budget, and when it resets.
        detail: String,
        /// Until the window resets.
        retry_after: std::time::Duration,
    },
    /// Creating the channel would pass a bound on channels (the subject's or the server's).
    #[error(transparent)]
    TooManyChannels(ChannelRefused),
    /// A cluster-wide limit could not be checked (the shared store failed)
    /// and the policy is to fail closed.
    #[error("limits cannot be checked right now; retry shortly")]
    LimitsUnavailable,
    /// More chat messages than allowed.
    #[error("{count} chat messages exceed the limit of {limit}")]
    TooManyMessages {
        /// Messages sent.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// No such stream for this subject (unknown, expired, or another
    /// subject's: the answer does not tell which).
    #[error("no such stream (unknown, expired, or not yours)")]
    StreamNotFound,
    /// The OpenAI `model` names no generator or upstream.
    #[error("the model `{name}` does not exist; available: {}", .available.join(", "))]
    ModelNotFound {
        /// What was asked for.
        name: String,
        /// What exists.
        available: Vec<String>,
    },
    /// A non-streaming generation failed (upstream error, timeout, ...).
    #[error("generation failed ({code}): {message}")]
    GenerationFailed {
        /// The stream error code.
        code: ErrorCode,
        /// Its detail.
        message: String,
    },
    /// The shared store (Redis) cannot be reached.
    #[error("the shared store is unavailable; retry shortly")]
    StoreUnavailable,
    /// The server is draining for shutdown.
    #[error("the server is shutting down; retry on another instance")]
    Draining,
    /// The in-memory stream ticket table is full.
    #[error("too many stream tickets are outstanding; retry shortly")]
    TicketsFull,
    /// No such route.
    #[error("no such resource")]
    NotFound,
    /// The route exists but not for this method.
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    /// A bug or an exhausted OS resource.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// Status, stable code and short title.
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            // The identity provider's keys could not be loaded: the server
            // cannot judge the token, so it does not call it invalid.
            ApiError::Auth(e @ AuthError::KeysUnavailable { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, e.code(), "Service unavailable")
            }
            ApiError::Auth(e) => (StatusCode::UNAUTHORIZED, e.code(), "Unauthorized"),
            ApiError::MissingScope(_) => (StatusCode::FORBIDDEN, "insufficient_scope", "Forbidden"),
            ApiError::UnknownGenerator { .. } => (StatusCode::BAD_REQUEST, "unknown_generator", "Unknown generator"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", "Bad request"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "Unsupported media type")
            }
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout", "Request timeout"),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "Payload too large"),
            ApiError::RateLimited(r) => match r.scope {
                RateScope::Subject => (StatusCode::TOO_MANY_REQUESTS, "rate_limited_subject", "Too many requests"),
                RateScope::Ip => (StatusCode::TOO_MANY_REQUESTS, "rate_limited_ip", "Too many requests"),
            },
            ApiError::NoSlot(SlotRefused::Subject { .. }) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_streams", "Too many streams")
            }
            ApiError::NoSlot(SlotRefused::Global { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_busy", "Service unavailable")
            }
            ApiError::TooManyChannels(ChannelRefused { scope: ChannelScope::Subject, .. }) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_channels", "Too many channels")
            }
            ApiError::TooManyChannels(ChannelRefused { scope: ChannelScope::Total, .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "too_many_channels", "Service unavailable")
            }
            ApiError::NoSlot(SlotRefused::Unavailable) | ApiError::LimitsUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "limits_unavailable", "Service unavailable")
            }
            ApiError::TooManyMessages { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_many_messages", "Payload too large")
            }
            ApiError::QuotaExceeded { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, ErrorCode::QuotaExceeded.as_str(), "Quota exceeded")
            }
            ApiError::StreamNotFound => (StatusCode::NOT_FOUND, "stream_not_found", "Not found"),
            ApiError::ModelNotFound { .. } => (StatusCode::NOT_FOUND, "model_not_found", "Not found"),
            ApiError::GenerationFailed { .. } => (StatusCode::BAD_GATEWAY, "generation_failed", "Bad gateway"),
            ApiError::StoreUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::StoreUnavailable.as_str(), "Service unavailable")
            }
            ApiError::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining", "Service unavailable"),
            ApiError::TicketsFull => (StatusCode::SERVICE_UNAVAILABLE, "server_busy", "Service unavailable"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found", "Not found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "Method not allowed"),
            ApiError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal.as_str(), "Internal server error")
            }
        }
    }
}

/// A quoted-string for an auth-param: no quotes, backslashes or controls.
fn auth_param(text: &str) -> String {
    text.chars().filter(|c| *c != '"' && *c != '\\' && !c.is_control()).collect()
}

impl ApiError {
    /// The human-readable detail; internals are logged, never echoed.
    fn detail(&self) -> String {
        match self {
            ApiError::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// Status, body and content type in one of the two shapes, with the
    /// headers every shape shares (`WWW-Authenticate`, `Retry-After`,
    /// `RateLimit-*`) and the refusal marker.
    fn respond(self, body: Value, content_type: &'static str) -> Response {
        let (status, code, _) = self.parts();
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        match &self {
            // RFC 6750 §3.1: a request with no credentials at all gets a
            // bare challenge; `error` is for credentials that failed.
            ApiError::Auth(AuthError::Missing) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(r#"Bearer realm="tokengate""#));
            }
            ApiError::Auth(AuthError::KeysUnavailable { retry_after }) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(*retry_after)));
            }
            ApiError::Auth(e) => {
                let value = format!(
                    r#"Bearer realm="tokengate", error="invalid_token", error_description="{}""#,
                    auth_param(&e.to_string())
                );
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            ApiError::MissingScope(scope) => {
                let value =
                    format!(r#"Bearer realm="tokengate", error="insufficient_scope", scope="{}""#, scope.as_str());
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            ApiError::RateLimited(r) => {
                let secs = HeaderValue::from(retry_after_secs(r.retry_after));
                headers.insert(header::RETRY_AFTER, secs.clone());
                headers.insert("ratelimit-limit", HeaderValue::from(r.limit));
                headers.insert("ratelimit-remaining", HeaderValue::from_static("0"));
                headers.insert("ratelimit-reset", secs);
            }
            ApiError::QuotaExceeded { retry_after, .. }
            | ApiError::TooManyChannels(ChannelRefused { retry_after, .. }) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(*retry_after)));
            }
            // The body was not read to its end: the connection cannot carry another request.
            ApiError::BodyTimeout(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::Draining
            | ApiError::NoSlot(_)
            | ApiError::StoreUnavailable
            | ApiError::LimitsUnavailable
            | ApiError::TicketsFull => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response.extensions_mut().insert(Refusal { code, auth: matches!(self, ApiError::Auth(_)) });
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, title) = self.parts();
        let mut body = json!({
            "type": format!("urn:tokengate:problem:{code}"),
            "title": title,
            "status": status.as_u16(),
            "detail": self.detail(),
            "code": code,
        });
        if let (ApiError::UnknownGenerator { available, .. }, Value::Object(map)) = (&self, &mut body) {
            map.insert("available".into(), json!(available));
        }
        self.respond(body, PROBLEM_JSON)
    }
}

/// The same errors in the shape OpenAI SDKs parse,
/// `{"error": {"message", "type", "code", "param"}}`, for the
/// OpenAI-compatible routes. Status and headers are the problem+json ones.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let (status, code, _) = self.0.parts();
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({ "error": { "message": self.0.detail(), "type": kind, "code": code, "param": null } });
        self.0.respond(body, "application/json")
    }
}

/// The same errors in the shape the Anthropic SDKs parse,
/// `{"type": "error", "error": {"type", "message"}}`, for
/// `POST /v1/messages`, with tokengate's problem `code` beside them in
/// `error.code`. Status and headers are the problem+json ones.
#[derive(Debug)]
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

impl AnthropicError {
    /// Anthropic's error `type`: by status, except that the server being
    /// unable to take the request now (draining, no free slot, the shared
    /// store or the JWKS down) is `overloaded_error`, which the SDKs retry.
    fn kind(&self) -> &'static str {
        let (status, _, _) = self.0.parts();
        match (&self.0, status.as_u16()) {
            (
                ApiError::Draining
                | ApiError::StoreUnavailable
                | ApiError::NoSlot(SlotRefused::Global { .. })
                | ApiError::Auth(AuthError::KeysUnavailable { .. }),
                _,
            ) => "overloaded_error",
            (_, 401) => "authentication_error",
            (_, 403) => "permission_error",
            (_, 404) => "not_found_error",
            (_, 429) => "rate_limit_error",
            (_, s) if s >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let (_, code, _) = self.0.parts();
        let kind = self.kind();
        let body = json!({ "type": "error", "error": { "type": kind, "message": self.0.detail(), "code": code } });
        self.0.respond(body, "application/json")
    }
}

/// Which shape a route's errors take, so that the fallbacks (404, 405) and
/// the middleware (the per-IP rate limit) answer a dialect's clients in
/// the shape their SDK parses, like the route's own handler does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// RFC 9457 `application/problem+json` (the native routes).
    Problem,
    /// [`OpenAiError`].
    OpenAi,
    /// [`AnthropicError`].
    Anthropic,
}

impl ErrorShape {
    /// The shape for a request path. `/v1/messages/...` is Anthropic's too,
    /// so an SDK call tokengate does not serve (`messages/count_tokens`,
    /// `messages/batches`) gets a 404 its SDK can read.
    pub fn for_path(path: &str) -> ErrorShape {
        match path {
            "/v1/chat/completions" | "/v1/models" | "/v1/responses" => ErrorShape::OpenAi,
            p if p.starts_with("/v1/responses/") => ErrorShape::OpenAi,
            "/v1/messages" => ErrorShape::Anthropic,
            p if p.starts_with("/v1/messages/") => ErrorShape::Anthropic,
            _ => ErrorShape::Problem,
        }
    }

    /// The media type of an error body in this shape.
    pub fn content_type(self) -> &'static str {
        match self {
            ErrorShape::Problem => PROBLEM_JSON,
            ErrorShape::OpenAi | ErrorShape::Anthropic => "application/json",
        }
    }

    /// `error` as a response in this shape.
    pub fn respond(self, error: ApiError) -> Response {
        match self {
            ErrorShape::Problem => error.into_response(),
            ErrorShape::OpenAi => OpenAiError(error).into_response(),
            ErrorShape::Anthropic => AnthropicError(error).into_response(),
        }
    }
}

/// Marks an error response so the refusal middleware can count and log it
/// once, with the request's context, without the handler doing so.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    /// The problem `code`.
    pub code: &'static str,
    /// True for authentication failures.
    pub auth: bool,
}

/// Whole seconds to wait, rounded up and at least 1 (`Retry-After: 0`
/// invites an immediate retry storm).
pub fn retry_after_secs(d: std::time::Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl ApiError {
    /// Maps a JSON body rejection; `body_limit` is named in the 413 detail. A body that did
    /// not arrive in time is a 408: the server's body deadline fails the read with a
    /// [`BodyDeadline`], found here among the rejection's sources.
    pub fn from_json_rejection(rejection: JsonRejection, body_limit: usize) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::TooLarge { what: "request body", limit: body_limit };
        }
        if let Some(deadline) = body_deadline(&rejection) {
            return ApiError::BodyTimeout(deadline.0);
        }
        match rejection {
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::UnsupportedMediaType("expected `Content-Type: application/json`".into())
            }
            other => ApiError::BadRequest(other.body_text()),
        }
    }
}

/// What a request body that missed its deadline fails with: the `body_timeout` it missed. The
/// server raises it, [`ApiError::from_json_rejection`] finds it however the HTTP layers wrapped
/// it (as an error source, or inside an [`std::io::Error`]).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body was not received within {}", humantime::format_duration(*.0))]
pub struct BodyDeadline(pub std::time::Duration);

/// The [`BodyDeadline`] among an error's sources, if there is one.
fn body_deadline(error: &(dyn std::error::Error + 'static)) -> Option<BodyDeadline> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(deadline) = e.downcast_ref::<BodyDeadline>() {
            return Some(*deadline);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(deadline) = io.get_ref().and_then(|inner| inner.downcast_ref::<BodyDeadline>())
        {
            return Some(*deadline);
        }
        source = e.source();
    }
    None
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<crate::tickets::TicketError> for ApiError {
    fn from(e: crate::tickets::TicketError) -> Self {
        use crate::tickets::TicketError;
        match e {
            TicketError::Refused(e) => ApiError::Auth(e),
            TicketError::Store(e) => e.into(),
            TicketError::Full => ApiError::TicketsFull,
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::TooManyChannels(refused) => ApiError::TooManyChannels(refused),
            e @ crate::store::StoreError::Redis(_) => {
                tracing::warn!(error = %e, "shared store request failed");
                // Counted by the refusal middleware as `store_unavailable`.
                ApiError::StoreUnavailable
            }
        }
    }
}

impl ApiError {
    /// A stream service refusal on a route where the generator is named
    /// `model` (the OpenAI and Anthropic dialects, the AI SDK route): an
    /// unknown one is that API's "model not found".
    pub fn for_model(e: crate::stream::StreamError) -> Self {
        match e {
            crate::stream::StreamError::UnknownGenerator { name, available } => {
                ApiError::ModelNotFound { name, available }
            }
            other => other.into(),
        }
    }
}

impl From<RateRefused> for ApiError {
    fn from(e: RateRefused) -> Self {
        match e {
            RateRefused::Limited(limited) => ApiError::RateLimited(limited),
            RateRefused::Unavailable => ApiError::LimitsUnavailable,
        }
    }
}

impl From<crate::stream::StreamError> for ApiError {
    fn from(e: crate::stream::StreamError) -> Self {
        use crate::stream::StreamError;
        match e {
            StreamError::TooManyMessages { count, limit } => ApiError::TooManyMessages { count, limit },
            StreamError::PromptTooLarge { limit } => ApiError::TooLarge { what: "prompt", limit },
            StreamError::UnknownGenerator { name, available } => ApiError::UnknownGenerator { name, available },
            StreamError::Draining => ApiError::Draining,
            StreamError::NoSlot(refused) => ApiError::NoSlot(refused),
            StreamError::Quota(crate::quota::QuotaError::Store(e)) => e.into(),
            StreamError::Quota(e @ crate::quota::QuotaError::Exceeded { retry_after, .. }) => {
                ApiError::QuotaExceeded { detail: e.to_string(), retry_after }
            }
            StreamError::NotFound => ApiError::StreamNotFound,
            StreamError::StoreUnavailable => ApiError::StoreUnavailable,
            StreamError::Store(e) => e.into(),
            StreamError::Rng(e) => ApiError::Internal(format!("OS RNG failed: {e}")),
        }
    }
}
