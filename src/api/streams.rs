//! `GET /v1/streams/{id}` resumes a stream explicitly (from `Last-Event-ID`
//! or `last_event_id`, else from its start); `DELETE /v1/streams/{id}`
//! cancels it: the generator (and any upstream request) is dropped and
//! every connected reader gets a terminal `error` with code `cancelled`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::resume::{ResumeHeaders, resume, resume_point};
use crate::auth::{Principal, Scope};
use crate::error::ApiError;
use crate::state::AppState;
use crate::stream::StreamId;

/// Query of `GET /v1/streams/{id}`.
#[derive(Debug, Deserialize)]
pub struct ResumeQuery {
    last_event_id: Option<String>,
}

fn stream_id(id: &str) -> Result<StreamId, ApiError> {
    StreamId::parse(id).ok_or(ApiError::StreamNotFound)
}

/// `GET /v1/streams/{id}`
pub async fn resume_stream(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ResumeHeaders(headers): ResumeHeaders,
    query: Result<Query<ResumeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    let Query(q) = query?;
    let id = stream_id(&id)?;
    let located = state.streams.locate(&principal, &id).await?;
    let from = match resume_point(&headers, q.last_event_id.as_deref())? {
        None => 0,
        Some((last_id, _)) if last_id != id => {
            return Err(ApiError::BadRequest("Last-Event-ID names another stream".into()));
        }
        Some((_, from)) => from,
    };
    resume(&state, &principal, located, from).await
}

/// `DELETE /v1/streams/{id}`: 204 whether it was running or had finished.
pub async fn cancel_stream(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    super::require(&principal, Scope::Stream)?;
    let id = stream_id(&id)?;
    let located = state.streams.locate(&principal, &id).await?;
    state.streams.cancel(&principal, located).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
