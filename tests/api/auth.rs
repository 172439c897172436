//! Authentication: every token transport, every refusal, scopes, and that a
//! refused request never starts a generator.

use std::sync::atomic::Ordering;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use crate::helpers::*;

async fn expect_401(resp: reqwest::Response, code: &str) {
    assert_eq!(resp.status(), 401, "expected 401 {code}");
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let www = resp.headers()["www-authenticate"].to_str().unwrap().to_owned();
    if code == "missing_token" {
        // RFC 6750 §3.1: no credentials, no `error` attribute.
        assert_eq!(www, r#"Bearer realm="tokengate""#);
    } else {
        assert!(www.starts_with(r#"Bearer realm="tokengate", "#), "{www}");
        assert!(www.contains(r#"error="invalid_token""#), "{www}");
        assert!(www.contains("error_description=\""), "{www}");
    }
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], 401);
    assert_eq!(body["type"], format!("urn:tokengate:problem:{code}"));
    assert!(!body["detail"].as_str().unwrap().is_empty());
}

async fn probe_with(app: &TestApp, token: &str) -> reqwest::Response {
    app.get("/v1/stream?generator=probe&prompt=x", Some(token)).await
}

#[tokio::test]
async fn each_transport_is_accepted() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let url = format!("{}/v1/stream?generator=echo&prompt=ok", app.base);
    let bearer = app.client.get(&url).bearer_auth(&token).send().await.unwrap();
    let cookie =
        app.client.get(&url).header("cookie", format!("theme=dark; tokengate_token={token}")).send().await.unwrap();
    let query = app.client.get(format!("{url}&access_token={token}")).send().await.unwrap();
    for resp in [bearer, cookie, query] {
        assert_eq!(resp.status(), 200);
        assert_eq!(delta_text(&read_events(resp, std::time::Duration::from_secs(5)).await), "ok");
    }
}

#[tokio::test]
async fn first_present_source_wins() {
    let app = spawn_app().await;
    let good = app.token("alice", "stream");
    let url = format!("{}/v1/stream?generator=echo&prompt=ok", app.base);
    // Bearer first: a bad cookie behind a good bearer does not matter ...
    let r = app.client.get(&url).bearer_auth(&good).header("cookie", "tokengate_token=junk").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // ... and a bad bearer is not rescued by a good cookie or query token.
    let r = app
        .client
        .get(format!("{url}&access_token={good}"))
        .bearer_auth("junk")
        .header("cookie", format!("tokengate_token={good}"))
        .send()
        .await
        .unwrap();
    expect_401(r, "malformed_token").await;
    // Cookie before query.
    let r = app
        .client
        .get(format!("{url}&access_token={good}"))
        .header("cookie", "tokengate_token=junk")
        .send()
        .await
        .unwrap();
    expect_401(r, "malformed_token").await;
    // Another Authorization scheme is not ours: the cookie is used.
    let r = app
        .client
        .get(&url)
        .header("authorization", "Basic Zm9vOmJhcg==")
        .header("cookie", format!("tokengate_token={good}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn configured_source_names_replace_the_defaults() {
    let mut settings = base_settings();
    settings.token_cookie = Some("sess".into());
    settings.token_query = Some("t".into());
    let app = spawn_app_with(settings).await;
    let token = app.token("alice", "stream");
    let url = format!("{}/v1/stream?generator=echo&prompt=ok", app.base);
    assert_eq!(app.client.get(&url).header("cookie", format!("sess={token}")).send().await.unwrap().status(), 200);
    assert_eq!(app.client.get(format!("{url}&t={token}")).send().await.unwrap().status(), 200);
    expect_401(app.client.get(format!("{url}&access_token={token}")).send().await.unwrap(), "missing_token").await;
    expect_401(
        app.client.get(&url).header("cookie", format!("tokengate_token={token}")).send().await.unwrap(),
        "missing_token",
    )
    .await;
}

#[tokio::test]
async fn every_bad_token_is_refused_and_starts_nothing() {
    let app = spawn_app().await;
    let now = now();
    let other_key = EncodingKey::from_secret(b"another-secret-that-is-long-enough-000");
    let none_token = {
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT"})),
            b64(json!({"sub": "alice", "exp": now + 3600, "scope": "stream"}))
        )
    };
    let cases: Vec<(String, &str)> = vec![
        ("not-a-jwt".into(), "malformed_token"),
        ("a.b.c".into(), "malformed_token"),
        (hs256(json!({"sub": "alice", "exp": now - 3600, "scope": "stream"})), "token_expired"),
        (
            hs256(json!({"sub": "alice", "exp": now + 3600, "nbf": now + 3600, "scope": "stream"})),
            "token_not_yet_valid",
        ),
        (
            sign(Algorithm::HS256, &other_key, json!({"sub": "alice", "exp": now + 3600, "scope": "stream"})),
            "bad_signature",
        ),
        (none_token, "algorithm_not_allowed"),
        (
            sign(
                Algorithm::HS384,
                &EncodingKey::from_secret(SECRET.as_bytes()),
                json!({"sub": "alice", "exp": now + 3600, "scope": "stream"}),
            ),
            "algorithm_not_allowed",
        ),
        (hs256(json!({"exp": now + 3600, "scope": "stream"})), "missing_claim"),
        (hs256(json!({"sub": "alice", "scope": "stream"})), "missing_claim"),
        (hs256(json!({"sub": "alice", "exp": "tomorrow", "scope": "stream"})), "invalid_claims"),
    ];
    for (token, code) in &cases {
        expect_401(probe_with(&app, token).await, code).await;
    }
    expect_401(app.get("/v1/stream?generator=probe", None).await, "missing_token").await;
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn missing_scope_is_403() {
    let app = spawn_app().await;
    for scope in ["", "publish", "streaming"] {
        let resp = probe_with(&app, &app.token("alice", scope)).await;
        assert_eq!(resp.status(), 403);
        assert!(resp.headers()["www-authenticate"].to_str().unwrap().contains("insufficient_scope"));
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "insufficient_scope");
        assert!(body["detail"].as_str().unwrap().contains("stream"));
    }
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 0);
    // `admin` may do everything; scope may also be a JSON array.
    let admin = app.get("/v1/stream?generator=echo&prompt=a", Some(&app.token("root", "admin"))).await;
    assert_eq!(admin.status(), 200);
    let array = hs256(json!({"sub": "bob", "exp": now() + 60, "scope": ["publish", "stream"]}));
    assert_eq!(app.get("/v1/stream?generator=echo&prompt=a", Some(&array)).await.status(), 200);
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let mut settings = base_settings();
    settings.jwt_issuer = Some("https://issuer.test".into());
    settings.jwt_audience = Some("tokengate".into());
    let app = spawn_app_with(settings).await;
    let exp = now() + 3600;
    let ok =
        hs256(json!({"sub": "a", "exp": exp, "scope": "stream", "iss": "https://issuer.test", "aud": "tokengate"}));
    assert_eq!(app.get("/v1/stream?generator=echo&prompt=a", Some(&ok)).await.status(), 200);
    let cases = [
        (
            json!({"sub": "a", "exp": exp, "scope": "stream", "iss": "https://evil.test", "aud": "tokengate"}),
            "invalid_issuer",
        ),
        (
            json!({"sub": "a", "exp": exp, "scope": "stream", "iss": "https://issuer.test", "aud": "other"}),
            "invalid_audience",
        ),
        (json!({"sub": "a", "exp": exp, "scope": "stream", "aud": "tokengate"}), "missing_claim"),
        (json!({"sub": "a", "exp": exp, "scope": "stream", "iss": "https://issuer.test"}), "missing_claim"),
    ];
    for (claims, code) in cases {
        expect_401(probe_with(&app, &hs256(claims)).await, code).await;
    }
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 0);
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("tests/fixtures/{name}")).unwrap()
}

async fn public_key_app(public: &str) -> TestApp {
    let mut settings = base_settings();
    settings.jwt_secret = None;
    settings.jwt_public_key_file = Some(format!("tests/fixtures/{public}").into());
    spawn_app_with(settings).await
}

#[tokio::test]
async fn asymmetric_algorithms_verify_with_pem_public_keys() {
    let claims = || json!({"sub": "alice", "exp": now() + 3600, "scope": "stream"});
    let cases = [
        ("rsa_public.pem", Algorithm::RS256, EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).unwrap()),
        ("ec_public.pem", Algorithm::ES256, EncodingKey::from_ec_pem(&fixture("ec_private.pem")).unwrap()),
        ("ed_public.pem", Algorithm::EdDSA, EncodingKey::from_ed_pem(&fixture("ed_private.pem")).unwrap()),
    ];
    for (public, alg, key) in cases {
        let app = public_key_app(public).await;
        let good = sign(alg, &key, claims());
        assert_eq!(app.get("/v1/stream?generator=echo&prompt=a", Some(&good)).await.status(), 200, "{alg:?}");
        // An HS256 token is not accepted by an asymmetric server.
        expect_401(probe_with(&app, &hs256(claims())).await, "algorithm_not_allowed").await;
    }
}

#[tokio::test]
async fn algorithm_confusion_is_rejected() {
    // The classic attack: sign HS256 with the server's RSA *public* key as
    // the HMAC secret, hoping the server verifies HS256 with that key.
    let app = public_key_app("rsa_public.pem").await;
    let public_pem = fixture("rsa_public.pem");
    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&public_pem),
        json!({"sub": "mallory", "exp": now() + 3600, "scope": "stream admin"}),
    );
    expect_401(probe_with(&app, &forged).await, "algorithm_not_allowed").await;
    // And a token for another RSA key fails its signature.
    let ok_alg_wrong_sig = {
        let key = EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).unwrap();
        let t = sign(Algorithm::RS256, &key, json!({"sub": "a", "exp": now() + 3600, "scope": "stream"}));
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let sig = parts[2].clone();
        parts[2] = format!("{}{}", if sig.starts_with('A') { "B" } else { "A" }, &sig[1..]);
        parts.join(".")
    };
    expect_401(probe_with(&app, &ok_alg_wrong_sig).await, "bad_signature").await;
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 0);
}
