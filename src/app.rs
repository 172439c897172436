//! The router and its layer stack, built in one place and used by both the
//! server and the tests. [`route_table`] is the single list of routes: the
//! router is built from it, and a test compares it with `openapi.yaml`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderName, HeaderValue, Method, Request, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tracing::Instrument;

use crate::api;
use crate::error::{ApiError, ErrorShape, Refusal};
use crate::limits::client_ip;
use crate::request_line;
use crate::state::AppState;

/// One route: path, the methods it answers (besides HEAD for GET), handler.
pub type RouteEntry = (&'static str, &'static [&'static str], MethodRouter<AppState>);

/// Every route the server serves.
pub fn route_table() -> Vec<RouteEntry> {
    vec![
        ("/", &["GET"], get(api::demo::page)),
        ("/dashboard", &["GET"], get(api::demo::dashboard)),
        ("/healthz", &["GET"], get(api::health::healthz)),
        ("/readyz", &["GET"], get(api::health::readyz)),
        ("/metrics", &["GET"], get(api::health::metrics)),
        ("/openapi.yaml", &["GET"], get(api::spec::openapi)),
        ("/v1/stream", &["GET", "POST"], get(api::stream::open_stream_get).post(api::stream::open_stream_post)),
        ("/v1/tickets", &["POST"], post(api::tickets::mint_ticket)),
        ("/v1/streams/{id}", &["GET", "DELETE"], get(api::streams::resume_stream).delete(api::streams::cancel_stream)),
        ("/v1/channels/{name}", &["GET", "POST"], get(api::channels::subscribe).post(api::channels::publish)),
        ("/v1/chat/completions", &["POST"], post(api::openai::chat_completions)),
        ("/v1/models", &["GET"], get(api::openai::models)),
        ("/v1/usage", &["GET"], get(api::usage::usage)),
        ("/v1/responses", &["POST"], post(api::responses::create_response)),
        ("/v1/responses/{id}", &["GET"], get(api::responses::retrieve_response)),
        ("/v1/responses/{id}/cancel", &["POST"], post(api::responses::cancel_response)),
        ("/v1/messages", &["POST"], post(api::anthropic::create_message)),
        ("/v1/ui/chat", &["POST"], post(api::ai_sdk::chat)),
        ("/v1/ui/chat/{chatId}/stream", &["GET"], get(api::ai_sdk::resume_chat)),
        ("/v1/ui/chat/{chatId}/stop", &["POST"], post(api::ai_sdk::stop_chat)),
    ]
}

/// `(method, path)` of every route, for the spec check.
pub fn routes() -> Vec<(String, String)> {
    route_table()
        .into_iter()
        .flat_map(|(path, methods, _)| methods.iter().map(move |m| ((*m).to_owned(), path.to_owned())))
        .collect()
}

/// The query string with the credential parameters' values (the token's
/// and the stream ticket's) replaced, for logs.
///
/// A query of printable ASCII whose parameter names are not
/// percent-encoded (what clients send) is copied pair by pair, with only
/// the credentials' values replaced; decoding and re-encoding every query
/// showed in the profile of stream opens. Anything else (an encoded name
/// could spell a credential's) is decoded, and re-encoded, in full.
pub fn redact_query(query: &str, secret_params: &[String]) -> String {
    let is_secret = |name: &str| secret_params.iter().any(|p| p == name) || name.eq_ignore_ascii_case("access_token");
    let plain = query.bytes().all(|b| b.is_ascii_graphic())
        && query.split('&').all(|pair| !pair.split('=').next().unwrap_or("").contains(['%', '+']));
    if plain {
        let mut out = String::with_capacity(query.len());
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            if !out.is_empty() {
                out.push('&');
            }
            let name = pair.split('=').next().unwrap_or("");
            if is_secret(name) {
                out.push_str(name);
                out.push_str("=%5Bredacted%5D");
            } else {
                out.push_str(pair);
            }
        }
        return out;
    }
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if is_secret(&name) {
            out.append_pair(&name, "[redacted]");
        } else {
            out.append_pair(&name, &value);
        }
    }
    out.finish()
}

/// Header carrying the request id (kept when the client or a proxy sent a
/// sensible one, else 128 random bits), echoed on the response and logged.
pub const REQUEST_ID: &str = "x-request-id";

/// Makes request ids for requests that arrive without one (an id from the
/// client or a proxy is kept).
#[derive(Debug, Clone, Copy)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        let id = crate::event::StreamId::random().ok()?;
        HeaderValue::from_str(&id.to_string()).ok().map(RequestId::new)
    }
}

/// The full application: routes plus layers, outermost first:
/// 1. sensitive headers: `Authorization`, `Cookie` and `x-api-key` (the
///    Anthropic route's token) are marked before anything can log them;
///    then the request id is set (or kept) and propagated to the response;
/// 2. trace: one span per request with the query redacted, one line per
///    response, nothing per body chunk (that would be a line per character);
/// 3. refusals: every error response is counted by reason and logged once,
///    inside the request's span;
/// 4. CORS, when configured, answering preflights before limits and auth;
/// 5. per-IP rate limit on `/v1/*`, before authentication, so token
///    guessing is throttled too;
/// 6. body limit for JSON bodies.
pub fn router(state: AppState) -> Router {
    let sources = state.config.auth.sources();
    let secret_params: Arc<[String]> = [sources.query.clone(), sources.ticket.clone()].into();
    let mut router = Router::new();
    for (path, _, method_router) in route_table() {
        router = router.route(path, method_router);
    }
    let router = router.fallback(api::not_found).method_not_allowed_fallback(api::method_not_allowed);

    let trace = middleware::from_fn(move |request: Request<Body>, next: Next| {
        log_request(secret_params.clone(), request, next)
    });

    let cors = state.config.cors_origins.as_ref().map(|origins| cors_layer(origins));
    let body_limit = state.config.max_body_bytes;

    router
        .layer(
            ServiceBuilder::new()
                .layer(SetSensitiveRequestHeadersLayer::new([
                    header::AUTHORIZATION,
                    header::COOKIE,
                    HeaderName::from_static(crate::auth::API_KEY_HEADER),
                ]))
                .layer(SetRequestIdLayer::new(HeaderName::from_static(REQUEST_ID), RandomRequestId))
                .layer(PropagateRequestIdLayer::new(HeaderName::from_static(REQUEST_ID)))
                .layer(trace)
                .layer(middleware::from_fn_with_state(state.clone(), record_refusals))
                .option_layer(cors)
                .layer(middleware::from_fn_with_state(state.clone(), limit_ip_rate))
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .with_state(state)
}

/// Runs the request in its span (request id, method, path, and the query
/// with the token redacted) and logs one line when the response head is
/// ready, unless the request opened a stream and succeeded: that stream's
/// `stream ended` line is then the request's line (see
/// [`crate::request_line`]). Unlike tower-http's `TraceLayer` it does not wrap the response
/// body: that wrapper entered the span and read the clock twice on every
/// body poll, which on a stream is every event.
async fn log_request(secret_params: Arc<[String]>, request: Request<Body>, next: Next) -> Response {
    let span = {
        let query = request.uri().query().map(|q| redact_query(q, &secret_params)).unwrap_or_default();
        let request_id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
        tracing::info_span!(
            "request",
            request_id = %request_id,
            method = %request.method(),
            path = %request.uri().path(),
            query = %query
        )
    };
    let started = std::time::Instant::now();
    let (response, opened_stream) = request_line::watch(next.run(request).instrument(span.clone())).await;
    if opened_stream && response.status().is_success() {
        return response;
    }
    let _entered = span.enter();
    tracing::info!(
        latency = %format_args!("{} ms", started.elapsed().as_millis()),
        status = response.status().as_u16(),
        "finished processing request"
    );
    response
}

/// Counts and logs each refusal once: 5xx at warn, 4xx at info (they are the
/// clients' doing), with the problem code and never the token.
async fn record_refusals(State(state): State<AppState>, request: Request<Body>, next: Next) -> Response {
    let response = next.run(request).await;
    if let Some(refusal) = response.extensions().get::<Refusal>() {
        if refusal.auth {
            state.metrics.auth_failed(refusal.code);
        } else {
            state.metrics.refused(refusal.code);
        }
        let status = response.status().as_u16();
        if response.status().is_server_error() {
            tracing::warn!(status, code = refusal.code, "refused");
        } else {
            tracing::info!(status, code = refusal.code, "refused");
        }
    }
    response
}

/// The per-client-IP rate limit for the API routes.
async fn limit_ip_rate(State(state): State<AppState>, request: Request<Body>, next: Next) -> Response {
    if request.uri().path().starts_with("/v1/")
        && let Some(ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>()
    {
        let ip = client_ip(peer.ip(), request.headers(), &state.config.limits.trusted_proxies);
        if let Err(refused) = state.rates.check_ip(ip).await {
            return ErrorShape::for_path(request.uri().path()).respond(ApiError::from(refused));
        }
    }
    next.run(request).await
}

fn cors_layer(origins: &[String]) -> CorsLayer {
    let base = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static(crate::auth::API_KEY_HEADER),
            HeaderName::from_static("anthropic-version"),
        ])
        // Cross-origin `fetch` clients may read when to retry.
        .expose_headers([
            header::RETRY_AFTER,
            HeaderName::from_static("ratelimit-limit"),
            HeaderName::from_static("ratelimit-remaining"),
            HeaderName::from_static("ratelimit-reset"),
        ])
        .max_age(std::time::Duration::from_secs(600));
    if origins.iter().any(|o| o == "*") {
        // Any origin, but then never with credentials (browsers forbid it
        // and it would hand cookies to every site).
        return base.allow_origin(AllowOrigin::any());
    }
    let list: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    base.allow_origin(AllowOrigin::list(list)).allow_credentials(true)
}

#[cfg(test)]
mod tests {
    use super::redact_query;

    fn redact(query: &str) -> String {
        redact_query(query, &["token".to_owned(), "ticket".to_owned()])
    }

    #[test]
    fn a_plain_query_is_copied_with_only_the_credentials_replaced() {
        assert_eq!(
            redact("prompt=%28hi%29&token=SECRET&pace_ms=5&ticket=T1&Access_Token=A2&flag"),
            "prompt=%28hi%29&token=%5Bredacted%5D&pace_ms=5&ticket=%5Bredacted%5D&Access_Token=%5Bredacted%5D&flag"
        );
        assert_eq!(redact("a=1&&token=x="), "a=1&token=%5Bredacted%5D");
        assert_eq!(redact(""), "");
    }

    #[test]
    fn an_encoded_name_cannot_smuggle_a_credential_past_the_redaction() {
        for query in ["tok%65n=SECRET", "ticke%74=SECRET&a=1", "access%5Ftoken=SECRET", "a=1&tick+et=x&ticket=SECRET"] {
            let out = redact(query);
            assert!(!out.contains("SECRET"), "{query} -> {out}");
        }
        // Bytes outside printable ASCII are decoded and re-encoded too, so a
        // log line never carries them raw.
        let out = redact("prompt=caf\u{e9} x&token=SECRET");
        assert!(!out.contains("SECRET") && out.is_ascii() && !out.contains(' '), "{out}");
    }
}
