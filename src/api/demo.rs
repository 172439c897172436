//! `GET /` and `GET /dashboard`: small self-contained pages (no CDN, no
//! build step). `/` is a chat page that streams from `/v1/stream` with
//! `EventSource`. The token comes from the URL fragment (`#token=...`), which
//! browsers never send to the server, so it stays out of access logs; the
//! page sends it only in headers, and opens each stream with a fresh stream
//! ticket (`POST /v1/tickets`) in the `EventSource` URL. `/dashboard` shows
//! the demo feeds ([`crate::feeds`]) and two chat streams live, seven
//! `EventSource`s at once, each with its own ticket.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("demo.html");
const DASHBOARD: &str = include_str!("dashboard.html");

/// Serves the demo page.
pub async fn page() -> impl IntoResponse {
    html(PAGE)
}

/// Serves the live dashboard.
pub async fn dashboard() -> impl IntoResponse {
    html(DASHBOARD)
}

/// A page with a policy that allows only its own inline script and style
/// and requests to this origin.
fn html(page: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        page,
    )
}
