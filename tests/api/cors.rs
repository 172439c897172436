//! CORS: an allow-list with credentials, `*` only without credentials.

use crate::helpers::*;

async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.client
        .request(reqwest::Method::OPTIONS, format!("{}/v1/stream", app.base))
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization, last-event-id")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn allow_list_with_credentials() {
    let mut settings = base_settings();
    settings.cors_origins = Some(vec!["https://chat.example.com".into(), "http://localhost:5173".into()]);
    let app = spawn_app_with(settings).await;
    let resp = preflight(&app, "https://chat.example.com").await;
    assert!(resp.status().is_success());
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "https://chat.example.com");
    assert_eq!(h["access-control-allow-credentials"], "true");
    let allowed = h["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("last-event-id"), "{allowed}");
    // A real request from an allowed origin carries the headers too.
    let resp =
        app.client.get(format!("{}/healthz", app.base)).header("origin", "http://localhost:5173").send().await.unwrap();
    assert_eq!(resp.headers()["access-control-allow-origin"], "http://localhost:5173");
    // Another origin gets nothing.
    let resp = preflight(&app, "https://evil.example").await;
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn wildcard_never_comes_with_credentials() {
    let mut settings = base_settings();
    settings.cors_origins = Some(vec!["*".into()]);
    let app = spawn_app_with(settings).await;
    let resp = preflight(&app, "https://anyone.example").await;
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    assert!(resp.headers().get("access-control-allow-credentials").is_none());
}

#[tokio::test]
async fn no_cors_headers_unless_configured() {
    let app = spawn_app().await;
    let resp = app
        .client
        .get(format!("{}/healthz", app.base))
        .header("origin", "https://chat.example.com")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[test]
fn wildcard_mixed_with_origins_is_a_config_error() {
    let mut settings = base_settings();
    settings.cors_origins = Some(vec!["*".into(), "https://a.example".into()]);
    let err = tokengate::config::Config::from_settings(settings).unwrap_err();
    assert_eq!(err.setting(), "cors_origins");
    let mut settings = base_settings();
    settings.cors_origins = Some(vec!["chat.example.com".into()]);
    assert_eq!(tokengate::config::Config::from_settings(settings).unwrap_err().setting(), "cors_origins");
}
