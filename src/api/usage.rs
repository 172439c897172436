//! `GET /v1/usage`: the caller's use of each of its quota budgets and
//! what is left, so a client can show it before a stream is refused.

use axum::Json;
use axum::extract::State;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::quota::UsageReport;
use crate::state::AppState;

/// The caller's own usage (any valid token: a subject may always see its
/// own budget).
pub async fn usage(State(state): State<AppState>, principal: Principal) -> Result<Json<UsageReport>, ApiError> {
    Ok(Json(state.streams.quotas().report(&principal).await?))
}
