//! JWKS: tokens verified with an identity provider's rotating keys, served
//! by a real HTTP server on loopback whose answers each test changes at
//! run time (key sets, 500, garbage, down) and which counts its requests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokengate::config::Settings;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::helpers::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwks");

/// A signing key of the test identity provider and its public JWK.
#[derive(Clone)]
struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

/// The key in `tests/fixtures/jwks/{file}`, published under `kid` with its
/// `alg` (as identity providers do).
fn key(file: &str, alg: Algorithm, kid: &str) -> TestKey {
    let pem = std::fs::read(format!("{FIXTURES}/{file}")).unwrap();
    let encoding = match alg.family() {
        jsonwebtoken::AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(&pem),
        jsonwebtoken::AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_ed_pem(&pem),
    }
    .unwrap();
    let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&encoding, alg).unwrap()).unwrap();
    jwk["kid"] = json!(kid);
    jwk["use"] = json!("sig");
    TestKey { kid: kid.to_owned(), alg, encoding, jwk }
}

fn rsa_a() -> TestKey {
    key("rsa-a.pem", Algorithm::RS256, "rsa-a")
}

fn rsa_b() -> TestKey {
    key("rsa-b.pem", Algorithm::RS256, "rsa-b")
}

fn jwks(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn claims() -> Value {
    json!({ "sub": "alice", "exp": now() + 600, "scope": "stream" })
}

/// A token signed by `key`, naming `kid` and `alg` in its header.
fn token_as(key: &TestKey, alg: Algorithm, kid: &str, claims: Value) -> String {
    let header = Header { kid: Some(kid.to_owned()), ..Header::new(alg) };
    jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap()
}

fn token(key: &TestKey) -> String {
    token_as(key, key.alg, &key.kid, claims())
}

/// What the identity provider answers.
#[derive(Clone)]
enum Answer {
    Keys { body: String, cache_control: Option<&'static str> },
    Status(u16),
    Garbage,
}

impl Answer {
    fn keys(keys: &[&TestKey]) -> Self {
        Answer::Keys { body: jwks(keys), cache_control: None }
    }
}

#[derive(Clone)]
struct IdpState {
    hits: Arc<AtomicUsize>,
    answer: Arc<Mutex<Answer>>,
}

/// The test identity provider: `GET /jwks` answers what the test set.
struct Idp {
    addr: SocketAddr,
    state: IdpState,
    task: Option<JoinHandle<()>>,
}

async fn answer(State(idp): State<IdpState>) -> Response {
    idp.hits.fetch_add(1, Ordering::SeqCst);
    let answer = idp.answer.lock().unwrap().clone();
    match answer {
        Answer::Keys { body, cache_control } => {
            let mut response = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
            if let Some(cc) = cache_control {
                response.headers_mut().insert(header::CACHE_CONTROL, cc.parse().unwrap());
            }
            response
        }
        Answer::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Answer::Garbage => ([(header::CONTENT_TYPE, "text/html")], "<html>502 Bad Gateway</html>").into_response(),
    }
}

impl Idp {
    async fn start(answer: Answer) -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let state = IdpState { hits: Arc::default(), answer: Arc::new(Mutex::new(answer)) };
        let mut idp = Idp { addr: listener.local_addr().unwrap(), state, task: None };
        idp.serve(listener);
        idp
    }

    /// An identity provider whose address is known but that does not
    /// listen yet ([`Idp::come_up`] starts it).
    fn down(answer: Answer) -> Idp {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        Idp { addr, state: IdpState { hits: Arc::default(), answer: Arc::new(Mutex::new(answer)) }, task: None }
    }

    async fn come_up(&mut self) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).unwrap();
        self.serve(socket.listen(64).unwrap());
    }

    /// Serves connections in tasks owned by the accept task, so that
    /// [`Idp::go_down`] closes kept-alive connections too, not only the
    /// listener.
    fn serve(&mut self, listener: TcpListener) {
        let router = axum::Router::new().route("/jwks", axum::routing::get(answer)).with_state(self.state.clone());
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let service = TowerToHyperService::new(router.clone());
                connections.spawn(async move {
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
                });
            }
        }));
    }

    fn go_down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    fn url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    fn set(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = answer;
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.go_down();
    }
}

/// A server verifying with `idp`'s keys; refresh bounds as given.
fn settings(url: &str, refresh: &str, min: &str, max: &str) -> Settings {
    Settings {
        jwt_secret: None,
        jwks_url: Some(url.to_owned()),
        jwt_algorithms: Some(["RS256", "PS256", "ES256", "ES384", "EdDSA"].map(str::to_owned).to_vec()),
        jwks_refresh: Some(refresh.into()),
        jwks_refresh_min: Some(min.into()),
        jwks_refresh_max: Some(max.into()),
        ..base_settings()
    }
}

/// One series from the server's metrics, read synchronously (for
/// [`eventually`]).
fn metric(app: &TestApp, series: &str) -> f64 {
    let text = app.state.metrics.render();
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

const OK: &str = "tokengate_jwks_refreshes_total{result=\"ok\"}";
const FAILED: &str = "tokengate_jwks_refreshes_total{result=\"failed\"}";

async fn loaded(app: &TestApp, at_least: f64) {
    eventually(Duration::from_secs(10), "a JWKS load", || metric(app, OK) >= at_least).await;
}

async fn failed(app: &TestApp, at_least: f64) {
    eventually(Duration::from_secs(10), "a failed JWKS load", || metric(app, FAILED) >= at_least).await;
}

/// `GET /v1/models` (any valid token) with `token`: status and code.
async fn call(app: &TestApp, token: &str) -> (u16, String) {
    let resp = app.get("/v1/models", Some(token)).await;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body["error"]["code"].as_str().or(body["code"].as_str()).unwrap_or_default().to_owned())
}

async fn accepted(app: &TestApp, token: &str) {
    let (status, code) = call(app, token).await;
    assert_eq!(status, 200, "refused: {code}");
}

async fn refused(app: &TestApp, token: &str, expected: &str) {
    let (status, code) = call(app, token).await;
    assert_eq!((status, code.as_str()), (401, expected));
}

#[tokio::test]
async fn rsa_ec_and_ed_keys_verify_their_algorithms() {
    let rs = rsa_a();
    let mut ps = key("rsa-b.pem", Algorithm::PS256, "rsa-b-pss");
    ps.jwk.as_object_mut().unwrap().remove("alg");
    let es256 = key("ec-p256.pem", Algorithm::ES256, "p256");
    let es384 = key("ec-p384.pem", Algorithm::ES384, "p384");
    let ed = key("ed25519.pem", Algorithm::EdDSA, "ed");
    let idp = Idp::start(Answer::keys(&[&rs, &ps, &es256, &es384, &ed])).await;
    let app = spawn_app_with(settings(&idp.url(), "1h", "1h", "1h")).await;
    loaded(&app, 1.0).await;
    assert_eq!(metric(&app, "tokengate_jwks_keys"), 5.0);
    for key in [&rs, &ps, &es256, &es384, &ed] {
        accepted(&app, &token(key)).await;
    }
    // A key without `alg` serves every algorithm of its type that is allowed.
    accepted(&app, &token_as(&ps, Algorithm::RS256, "rsa-b-pss", claims())).await;
    assert_eq!(idp.hits(), 1, "known kids need no refresh");
}

#[tokio::test]
async fn rotation_accepts_the_new_key_and_refuses_the_removed_one() {
    let (a, b) = (rsa_a(), rsa_b());
    let idp = Idp::start(Answer::Keys { body: jwks(&[&a]), cache_control: Some("max-age=1") }).await;
    let app = spawn_app_with(settings(&idp.url(), "1h", "200ms", "1h")).await;
    loaded(&app, 1.0).await;
    accepted(&app, &token(&a)).await;
    refused(&app, &token(&b), "unknown_key").await;
    // The identity provider publishes B beside A: a token with B's kid is
    // accepted (its unknown kid triggers a refresh, or the max-age one
    // already ran).
    idp.set(Answer::Keys { body: jwks(&[&a, &b]), cache_control: Some("max-age=1") });
    tokio::time::sleep(Duration::from_millis(250)).await;
    accepted(&app, &token(&b)).await;
    accepted(&app, &token(&a)).await;
    // Then retires A: once a refresh saw that, A's tokens are refused.
    idp.set(Answer::Keys { body: jwks(&[&b]), cache_control: Some("max-age=1") });
    let now = metric(&app, OK);
    // Two loads later, at least one fetched after the change.
    loaded(&app, now + 2.0).await;
    refused(&app, &token(&a), "unknown_key").await;
    accepted(&app, &token(&b)).await;
}

#[tokio::test]
async fn forged_kids_trigger_at_most_one_refresh_per_interval() {
    let (a, b) = (rsa_a(), rsa_b());
    let idp = Idp::start(Answer::keys(&[&a])).await;
    let app = spawn_app_with(settings(&idp.url(), "1h", "1h", "1h")).await;
    loaded(&app, 1.0).await;
    assert_eq!(idp.hits(), 1);
    // A burst of tokens with made-up kids (signed with a real key), at once.
    let tokens: Vec<String> =
        (0..30).map(|i| token_as(&a, Algorithm::RS256, &format!("forged-{i}"), claims())).collect();
    let answers = futures_util::future::join_all(tokens.iter().map(|t| call(&app, t))).await;
    for (status, code) in answers {
        assert_eq!((status, code.as_str()), (401, "unknown_key"));
    }
    assert_eq!(idp.hits(), 2, "one refresh for the whole burst");
    assert_eq!(metric(&app, "tokengate_jwks_kid_refreshes_total"), 1.0);
    // Within the interval even a real new key waits for the next refresh:
    // that is the price of not letting forged kids drive the fetches.
    idp.set(Answer::keys(&[&a, &b]));
    refused(&app, &token(&b), "unknown_key").await;
    accepted(&app, &token(&a)).await;
    assert_eq!(idp.hits(), 2);
}

#[tokio::test]
async fn before_the_first_fetch_tokens_are_refused_with_503_then_accepted() {
    let a = rsa_a();
    let mut idp = Idp::down(Answer::keys(&[&a]));
    let app = spawn_app_with(settings(&idp.url(), "1h", "200ms", "1h")).await;
    failed(&app, 1.0).await;
    let resp = app.get("/v1/models", Some(&token(&a))).await;
    assert_eq!(resp.status(), 503);
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "{retry}");
    assert!(resp.headers().get("www-authenticate").is_none(), "the token is not called invalid");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "jwks_unavailable", "{body}");
    // The native problem+json route answers the same.
    let resp = app.get("/v1/streams/0123456789abcdef0123456789abcdef", Some(&token(&a))).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "jwks_unavailable");
    // The identity provider comes up: the retries find it.
    idp.come_up().await;
    loaded(&app, 1.0).await;
    accepted(&app, &token(&a)).await;
}

#[tokio::test]
async fn a_failing_identity_provider_keeps_the_last_good_set() {
    let a = rsa_a();
    // `max-age=0` is raised to the 200 ms lower bound: frequent refreshes.
    let idp_answer = Answer::Keys { body: jwks(&[&a]), cache_control: Some("max-age=0") };
    let mut idp = Idp::start(idp_answer).await;
    let app = spawn_app_with(settings(&idp.url(), "1h", "200ms", "1h")).await;
    loaded(&app, 1.0).await;
    accepted(&app, &token(&a)).await;
    let bad = [
        Answer::Status(500),
        Answer::Garbage,
        Answer::Keys { body: "{\"keys\": []}".into(), cache_control: None },
        Answer::Keys {
            body: "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\", \"kid\": \"x\"}]}".into(),
            cache_control: None,
        },
    ];
    for answer in bad {
        idp.set(answer);
        failed(&app, metric(&app, FAILED) + 2.0).await;
        accepted(&app, &token(&a)).await;
    }
    idp.go_down();
    failed(&app, metric(&app, FAILED) + 2.0).await;
    accepted(&app, &token(&a)).await;
    // A set was loaded once, so an unknown kid is the token's problem.
    refused(&app, &token_as(&a, Algorithm::RS256, "nope", claims()), "unknown_key").await;
    assert_eq!(metric(&app, "tokengate_jwks_keys"), 1.0);
}

#[tokio::test]
async fn cache_control_max_age_is_honoured_within_bounds() {
    let a = rsa_a();
    let keys = |cc| Answer::Keys { body: jwks(&[&a]), cache_control: Some(cc) };
    // max-age=1 shortens the 1 h default interval.
    let short = Idp::start(keys("public, max-age=1")).await;
    let _app = spawn_app_with(settings(&short.url(), "1h", "100ms", "1h")).await;
    eventually(Duration::from_secs(10), "refreshes after max-age", || short.hits() >= 3).await;
    // max-age=3600 is lowered to the 500 ms upper bound.
    let long = Idp::start(keys("max-age=3600")).await;
    let _app = spawn_app_with(settings(&long.url(), "1h", "100ms", "500ms")).await;
    eventually(Duration::from_secs(10), "refreshes at the upper bound", || long.hits() >= 3).await;
    // max-age=0 is raised to the lower bound (1 h here): no refetch loop.
    let zero = Idp::start(keys("max-age=0")).await;
    let app = spawn_app_with(settings(&zero.url(), "1h", "1h", "1h")).await;
    loaded(&app, 1.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(zero.hits(), 1);
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    let rs = rsa_a();
    let es = key("ec-p256.pem", Algorithm::ES256, "p256");
    let idp = Idp::start(Answer::keys(&[&rs, &es])).await;
    let mut s = settings(&idp.url(), "1h", "1h", "1h");
    s.jwt_algorithms = Some(vec!["RS256".into(), "PS256".into(), "ES256".into()]);
    let app = spawn_app_with(s).await;
    loaded(&app, 1.0).await;
    accepted(&app, &token(&rs)).await;
    // HS256 "signed" with the RSA public key as the HMAC secret, naming
    // the RSA key's kid: the classic confusion.
    let public_pem = std::fs::read(format!("{FIXTURES}/rsa-a.pub.pem")).unwrap();
    let hs = TestKey { encoding: EncodingKey::from_secret(&public_pem), ..rs.clone() };
    refused(&app, &token_as(&hs, Algorithm::HS256, "rsa-a", claims()), "algorithm_not_allowed").await;
    // An ES256 token naming the RSA key, and an RS256 token naming the EC key.
    refused(&app, &token_as(&es, Algorithm::ES256, "rsa-a", claims()), "algorithm_not_allowed").await;
    refused(&app, &token_as(&rs, Algorithm::RS256, "p256", claims()), "algorithm_not_allowed").await;
    // PS256 is allowed, but the RSA key's JWK says `alg: RS256`.
    refused(&app, &token_as(&rs, Algorithm::PS256, "rsa-a", claims()), "algorithm_not_allowed").await;
    // ES384 fits no allowed algorithm.
    let es384 = key("ec-p384.pem", Algorithm::ES384, "p256");
    refused(&app, &token_as(&es384, Algorithm::ES384, "p256", claims()), "algorithm_not_allowed").await;
    // `alg: none`.
    let none = format!("{}.{}.", base64_url(&json!({"alg": "none", "kid": "rsa-a"})), base64_url(&claims()));
    refused(&app, &none, "algorithm_not_allowed").await;
    // The right kid and alg, the wrong key.
    refused(&app, &token_as(&rsa_b(), Algorithm::RS256, "rsa-a", claims()), "bad_signature").await;
    assert_eq!(idp.hits(), 1, "no refusal above triggered a refresh");
}

fn base64_url(value: &Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test]
async fn issuer_and_an_array_audience_are_checked() {
    let a = rsa_a();
    let idp = Idp::start(Answer::keys(&[&a])).await;
    let mut s = settings(&idp.url(), "1h", "1h", "1h");
    s.jwt_issuer = Some("https://idp.example.com/".into());
    s.jwt_audience = Some("tokengate".into());
    let app = spawn_app_with(s).await;
    loaded(&app, 1.0).await;
    let with = |iss: &str, aud: Value| {
        let mut c = claims();
        c["iss"] = json!(iss);
        c["aud"] = aud;
        token_as(&a, Algorithm::RS256, "rsa-a", c)
    };
    // Keycloak and Auth0 send `aud` as an array.
    accepted(&app, &with("https://idp.example.com/", json!(["account", "tokengate"]))).await;
    accepted(&app, &with("https://idp.example.com/", json!("tokengate"))).await;
    refused(&app, &with("https://idp.example.com/", json!(["account"])), "invalid_audience").await;
    refused(&app, &with("https://evil.example.com/", json!("tokengate")), "invalid_issuer").await;
}

#[tokio::test]
async fn a_jwks_file_is_used_and_reread() {
    let (a, b) = (rsa_a(), rsa_b());
    let dir = std::env::temp_dir().join(format!("tokengate-jwks-{}-{}", std::process::id(), now()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwks(&[&a])).unwrap();
    let mut s = settings("unused", "200ms", "100ms", "1h");
    s.jwks_url = None;
    s.jwks_file = Some(path.clone());
    let app = spawn_app_with(s).await;
    accepted(&app, &token(&a)).await;
    refused(&app, &token(&b), "unknown_key").await;
    // Rewritten (as configuration management would): picked up without a
    // restart; a broken rewrite keeps the last good set.
    std::fs::write(&path, jwks(&[&b])).unwrap();
    loaded(&app, metric(&app, OK) + 2.0).await;
    accepted(&app, &token(&b)).await;
    refused(&app, &token(&a), "unknown_key").await;
    std::fs::write(&path, "not json").unwrap();
    failed(&app, 1.0).await;
    accepted(&app, &token(&b)).await;
    let _ = std::fs::remove_dir_all(&dir);
}
