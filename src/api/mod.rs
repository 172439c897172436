//! HTTP handlers, one module per resource. Handlers stay lean: they
//! authenticate (via the [`Principal`] extractor), validate input, and hand
//! the work to the stream service ([`crate::stream::StreamService`]) or
//! the store; every failure is an [`ApiError`]. Handler modules do not
//! import each other: what two of them share lives in [`json`], [`resume`],
//! [`gather`] and [`sse`] (the one place an SSE response is built).

pub mod ai_sdk;
pub mod anthropic;
pub mod channels;
pub mod demo;
pub mod gather;
pub mod health;
pub mod json;
pub mod openai;
pub mod responses;
pub mod resume;
pub mod spec;
pub mod sse;
pub mod stream;
pub mod streams;
pub mod tickets;
pub mod usage;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::auth::{AuthError, Principal, Scope};
use crate::error::{ApiError, ErrorShape};
use crate::state::AppState;

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = state.config.auth.extract(&parts.headers, parts.uri.query());
        // A ticket counts only without a token (see `tickets::redeem`).
        if token.is_none()
            && let Some(principal) = tickets::redeem(parts, state).await?
        {
            return Ok(principal);
        }
        authenticate(token, state).await
    }
}

/// The caller of a route that also takes its token in `x-api-key` (the
/// Anthropic route; see [`crate::auth::AuthConfig::extract_with_api_key`]
/// for the order of the sources). Otherwise the same checks as
/// [`Principal`].
#[derive(Debug, Clone)]
pub struct ApiKeyPrincipal(pub Principal);

impl FromRequestParts<AppState> for ApiKeyPrincipal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = state.config.auth.extract_with_api_key(&parts.headers, parts.uri.query());
        if token.is_none()
            && let Some(principal) = tickets::redeem(parts, state).await?
        {
            return Ok(ApiKeyPrincipal(principal));
        }
        authenticate(token, state).await.map(ApiKeyPrincipal)
    }
}

/// Validates the token found and applies the subject's request rate.
async fn authenticate(token: Option<String>, state: &AppState) -> Result<Principal, ApiError> {
    let token = token.ok_or(AuthError::Missing)?;
    let principal = state.config.auth.authenticate(&token).await?;
    state.rates.check_subject(&principal.subject).await?;
    Ok(principal)
}

/// Refuses with 403 unless the caller holds `scope`.
pub fn require(principal: &Principal, scope: Scope) -> Result<(), ApiError> {
    if principal.has(scope) { Ok(()) } else { Err(ApiError::MissingScope(scope)) }
}

/// 404 for every unknown path, as problem+json (or in a dialect's shape
/// under its routes, see [`ErrorShape::for_path`]).
pub async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    ErrorShape::for_path(uri.path()).respond(ApiError::NotFound)
}

/// 405 for a known path with the wrong method, as problem+json (or in the
/// shape of the dialect the route belongs to).
pub async fn method_not_allowed(uri: axum::http::Uri) -> axum::response::Response {
    ErrorShape::for_path(uri.path()).respond(ApiError::MethodNotAllowed)
}
