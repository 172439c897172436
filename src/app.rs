//! The router and its layer stack, built in one place and used by both the
//! server and the tests. [`route_table`] is the single list of routes: the
//! router is built from it, and a test compares it with `openapi.yaml`.

use std::ops::Deref;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, Request, header};
use axum::routing::{MethodRouter, get};
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::api;
use crate::config::Config;
use crate::generator::Registry;
use crate::shutdown::Shutdown;

/// Everything a handler may need, shared by all requests.
pub struct Inner {
    /// Validated configuration (keys included).
    pub config: Config,
    /// Generators by name.
    pub generators: Registry,
    /// Shutdown phases.
    pub shutdown: Shutdown,
}

/// Cheaply cloneable application state.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    /// Wraps the shared state.
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// One route: path, the methods it answers (besides HEAD for GET), handler.
pub type RouteEntry = (
    &'static str,
    &'static [&'static str],
    MethodRouter<AppState>,
);

/// Every route the server serves.
pub fn route_table() -> Vec<RouteEntry> {
    vec![
        ("/", &["GET"], get(api::demo::page)),
        ("/healthz", &["GET"], get(api::health::healthz)),
        ("/readyz", &["GET"], get(api::health::readyz)),
        ("/openapi.yaml", &["GET"], get(api::spec::openapi)),
        (
            "/v1/stream",
            &["GET", "POST"],
            get(api::stream::open_stream_get).post(api::stream::open_stream_post),
        ),
    ]
}

/// `(method, path)` of every route, for the spec check.
pub fn routes() -> Vec<(String, String)> {
    route_table()
        .into_iter()
        .flat_map(|(path, methods, _)| {
            methods
                .iter()
                .map(move |m| ((*m).to_owned(), path.to_owned()))
        })
        .collect()
}

/// The query string with the token parameter's value replaced, for logs.
pub fn redact_query(query: &str, token_param: &str) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name == token_param || name.eq_ignore_ascii_case("access_token") {
            out.append_pair(&name, "[redacted]");
        } else {
            out.append_pair(&name, &value);
        }
    }
    out.finish()
}

/// The full application: routes plus layers, outermost first:
/// 1. sensitive headers: `Authorization` and `Cookie` are marked before
///    anything can log them;
/// 2. trace: one span per request with the query redacted, one line per
///    response, nothing per body chunk (that would be a line per character);
/// 3. CORS, when configured, answering preflights before auth runs;
/// 4. body limit for JSON bodies.
pub fn router(state: AppState) -> Router {
    let token_param = state.config.auth.sources().query.clone();
    let mut router = Router::new();
    for (path, _, method_router) in route_table() {
        router = router.route(path, method_router);
    }
    let router = router
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed);

    let trace = TraceLayer::new_for_http()
        .make_span_with(move |req: &Request<_>| {
            let query = req.uri().query().map(|q| redact_query(q, &token_param)).unwrap_or_default();
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), query = %query)
        })
        .on_request(())
        .on_body_chunk(())
        .on_eos(())
        .on_response(DefaultOnResponse::new().level(Level::INFO));

    let cors = state
        .config
        .cors_origins
        .as_ref()
        .map(|origins| cors_layer(origins));
    let body_limit = state.config.max_body_bytes;

    router
        .layer(
            ServiceBuilder::new()
                .layer(SetSensitiveRequestHeadersLayer::new([
                    header::AUTHORIZATION,
                    header::COOKIE,
                ]))
                .layer(trace)
                .option_layer(cors)
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .with_state(state)
}

fn cors_layer(origins: &[String]) -> CorsLayer {
    let base = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
        ])
        .max_age(std::time::Duration::from_secs(600));
    if origins.iter().any(|o| o == "*") {
        // Any origin, but then never with credentials (browsers forbid it
        // and it would hand cookies to every site).
        return base.allow_origin(AllowOrigin::any());
    }
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    base.allow_origin(AllowOrigin::list(list))
        .allow_credentials(true)
}
