//! `GET /`: a small self-contained page that streams from `/v1/stream` with
//! `EventSource`. The token comes from the URL fragment (`#token=...`), which
//! browsers never send to the server, so it stays out of access logs; the
//! page sends it only in headers, and opens each stream with a fresh stream
//! ticket (`POST /v1/tickets`) in the `EventSource` URL.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("demo.html");

/// Serves the demo page.
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        PAGE,
    )
}
