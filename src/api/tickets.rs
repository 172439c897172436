//! `POST /v1/tickets` mints a stream ticket for the caller's token, and
//! [`redeem`] is how the [`Principal`] extractor accepts one: every
//! authenticated route goes through it, so no route can forget the
//! single-use rule (see [`crate::tickets`] for a ticket's life).

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::resume::{last_event_id, parse_event_id};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::event::StreamId;
use crate::state::AppState;
use crate::tickets::{self, Presented};

/// `POST /v1/tickets`: `{"ticket": "...", "expires_in": 30}`, for a token
/// only (a ticket cannot mint a ticket). Any token may mint one: the
/// ticket carries the token's own subject and scopes, no more.
pub async fn mint_ticket(State(state): State<AppState>, principal: Principal) -> Result<Response, ApiError> {
    let minted = tickets::mint(&state.store, &principal, state.config.ticket_ttl).await?;
    let body = Json(json!({ "ticket": minted.ticket, "expires_in": minted.expires_in }));
    // A credential: no cache may keep it (RFC 6749 §5.1 asks the same).
    Ok(([(header::CACHE_CONTROL, "no-store")], body).into_response())
}

/// The principal of a request that authenticates with a ticket (`None`
/// when it carries none), after the single-use check and the subject's
/// request rate.
pub async fn redeem(parts: &Parts, state: &AppState) -> Result<Option<Principal>, ApiError> {
    let Some(ticket) = state.config.auth.ticket(parts.uri.query()) else { return Ok(None) };
    let presented = Presented { route: format!("{} {}", parts.method, parts.uri.path()), resumes: resumes(parts) };
    // A used ticket lives as long as what it opened can be resumed.
    let keep = state.config.limits.max_stream_duration + state.config.store.stream_ttl;
    let principal = tickets::redeem(&state.store, &ticket, presented, keep).await?;
    state.rates.check_subject(&principal.subject).await?;
    Ok(Some(principal))
}

/// The stream a request's resume point names, read exactly as the stream
/// routes read it (the `Last-Event-ID` header wins over the `last_event_id`
/// query parameter). A query naming it twice names nothing: the routes
/// would not agree on which one counts.
fn resumes(parts: &Parts) -> Option<StreamId> {
    let mut values = form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
        .filter(|(name, _)| name == "last_event_id")
        .map(|(_, value)| value.into_owned());
    let query = values.next();
    if values.next().is_some() {
        return None;
    }
    let last = last_event_id(&parts.headers, query.as_deref()).ok()??;
    parse_event_id(last).ok().map(|(id, _)| id)
}
