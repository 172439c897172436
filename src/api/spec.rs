//! `GET /openapi.yaml`: the API description, compiled into the binary.

use axum::http::header;
use axum::response::IntoResponse;

/// The OpenAPI 3.1 document of everything this server serves.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// Serves [`OPENAPI_YAML`].
pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml; charset=utf-8")], OPENAPI_YAML)
}
