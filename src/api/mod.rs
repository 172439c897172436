//! HTTP handlers, one module per resource. Handlers stay lean: they
//! authenticate (via the [`Principal`] extractor), validate input, and hand
//! the work to the stream service ([`crate::stream::StreamService`]) or
//! the store; every failure is an [`ApiError`]. Handler modules do not
//! import each other: what two of them share lives in [`json`], [`resume`]
//! and [`sse`] (the one place an SSE response is built).

pub mod ai_sdk;
pub mod channels;
pub mod demo;
pub mod health;
pub mod json;
pub mod openai;
pub mod resume;
pub mod spec;
pub mod sse;
pub mod stream;
pub mod streams;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::auth::{AuthError, Principal, Scope};
use crate::error::ApiError;
use crate::state::AppState;

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = &state.config.auth;
        let token = auth.extract(&parts.headers, parts.uri.query()).ok_or(AuthError::Missing)?;
        let principal = auth.authenticate(&token)?;
        state.rates.check_subject(&principal.subject).map_err(ApiError::RateLimited)?;
        Ok(principal)
    }
}

/// Refuses with 403 unless the caller holds `scope`.
pub fn require(principal: &Principal, scope: Scope) -> Result<(), ApiError> {
    if principal.has(scope) { Ok(()) } else { Err(ApiError::MissingScope(scope)) }
}

/// 404 for every unknown path, as problem+json.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// 405 for a known path with the wrong method, as problem+json (or in the
/// OpenAI shape on the OpenAI-compatible routes).
pub async fn method_not_allowed(uri: axum::http::Uri) -> axum::response::Response {
    use axum::response::IntoResponse;
    if crate::error::wants_openai_errors(uri.path()) {
        crate::error::OpenAiError(ApiError::MethodNotAllowed).into_response()
    } else {
        ApiError::MethodNotAllowed.into_response()
    }
}
