//! Test harness: the real server on 127.0.0.1:0, test generators that report
//! what happened to them, token makers and an SSE reader.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokengate::config::{Config, Settings};
use tokengate::generator::{GenerateRequest, Generator, Registry, TextStream};
use tokengate::server::{Application, builtin_generators};
use tokengate::shutdown::Shutdown;
use tokengate::sse::{Event, Parser};
use tokengate::state::AppState;
use tokio::task::JoinHandle;

/// The HS256 secret every test server uses unless told otherwise.
pub const SECRET: &str = "test-secret-0123456789-abcdefghijklmnop";

/// Counts what the `probe` generator saw.
#[derive(Debug, Default)]
pub struct ProbeStats {
    /// Times `generate` was called.
    pub started: AtomicUsize,
    /// Times a generation was dropped (cancelled or finished).
    pub dropped: AtomicUsize,
}

/// Yields its prompt once, then stays silent forever, until dropped; a drop
/// is counted. This lets tests see heartbeats, cancellation and shutdown.
pub struct Probe(pub Arc<ProbeStats>);

struct DropCounter(Arc<ProbeStats>);
impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

impl Generator for Probe {
    fn description(&self) -> &str {
        "test probe"
    }
    fn generate(&self, request: GenerateRequest) -> TextStream {
        self.0.started.fetch_add(1, Ordering::SeqCst);
        let counter = DropCounter(self.0.clone());
        let text = request.prompt;
        Box::pin(async_stream::stream! {
            let _counter = counter;
            yield Ok(text.into());
            std::future::pending::<()>().await;
        })
    }
}

/// Produces text as fast as it is pulled, forever, counting pulls and drops:
/// shows whether a stream whose client stopped reading still polls it.
pub struct Firehose(pub Arc<ProbeStats>, pub Arc<AtomicUsize>);

impl Generator for Firehose {
    fn description(&self) -> &str {
        "endless fast text"
    }
    fn generate(&self, _request: GenerateRequest) -> TextStream {
        self.0.started.fetch_add(1, Ordering::SeqCst);
        let counter = DropCounter(self.0.clone());
        let pulls = self.1.clone();
        Box::pin(async_stream::stream! {
            let _counter = counter;
            loop {
                pulls.fetch_add(1, Ordering::SeqCst);
                yield Ok("0123456789".into());
            }
        })
    }
}

/// Echoes the prompt cut into chunks of 1, 2, 3, ... chars (cycling to 1
/// after 5), so cuts fall inside grapheme clusters: between the parts of a
/// ZWJ sequence, before combining marks, between regional indicators, and
/// between CR and LF.
pub struct Choppy;

impl Generator for Choppy {
    fn description(&self) -> &str {
        "echo in awkward chunks"
    }
    fn generate(&self, request: GenerateRequest) -> TextStream {
        let chars: Vec<char> = request.prompt.chars().collect();
        let mut chunks = Vec::new();
        let (mut i, mut size) = (0, 1);
        while i < chars.len() {
            let end = (i + size).min(chars.len());
            chunks.push(Ok(chars[i..end].iter().collect::<String>().into()));
            i = end;
            size = size % 5 + 1;
        }
        Box::pin(futures_util::stream::iter(chunks))
    }
}

/// A running test server.
pub struct TestApp {
    /// Its address.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// A client without connection pooling surprises.
    pub client: reqwest::Client,
    /// What the probe generator saw.
    pub probe: Arc<ProbeStats>,
    /// What the firehose generator saw, and how many chunks it gave.
    pub firehose: Arc<ProbeStats>,
    /// Chunks the firehose produced.
    pub firehose_pulls: Arc<AtomicUsize>,
    /// The server's shutdown handle.
    pub shutdown: Shutdown,
    /// The server's state (slots, limiters, metrics).
    pub state: AppState,
    /// The server task; resolves when the server stopped.
    pub server: JoinHandle<std::io::Result<()>>,
    /// Triggers the server's shutdown signal.
    signal: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Settings every test server starts from: loopback port 0, fixed secret,
/// no pacing, and rate limits out of the way (tests of limits set their own).
pub fn base_settings() -> Settings {
    Settings {
        listen: Some("127.0.0.1:0".into()),
        jwt_secret: Some(SECRET.into()),
        pace_ms: Some(0),
        rate_subject_per_min: Some(0),
        rate_ip_per_min: Some(0),
        // A client that leaves cancels at once unless a test wants resume.
        detach_grace: Some("0s".into()),
        // Quiet channels unless a test is about the demo feeds.
        demo_feeds: Some(false),
        ..Settings::default()
    }
}

/// A server with default test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(base_settings()).await
}

/// A server with the given settings plus the `probe` and `choppy` generators.
pub async fn spawn_app_with(settings: Settings) -> TestApp {
    let config = Config::from_settings(settings).unwrap_or_else(|e| panic!("test config: {e}"));
    let probe = Arc::new(ProbeStats::default());
    let mut registry: Registry = builtin_generators(&config).unwrap_or_else(|e| panic!("{e}"));
    registry.register("probe", Arc::new(Probe(probe.clone())), Duration::ZERO);
    registry.register("choppy", Arc::new(Choppy), Duration::ZERO);
    let firehose = Arc::new(ProbeStats::default());
    let firehose_pulls = Arc::new(AtomicUsize::new(0));
    registry.register("firehose", Arc::new(Firehose(firehose.clone(), firehose_pulls.clone())), Duration::ZERO);
    let app = Application::build_with(config, registry).await.unwrap_or_else(|e| panic!("build: {e}"));
    let addr = app.local_addr();
    let state = app.state().clone();
    let shutdown = state.shutdown.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        base: format!("http://{addr}"),
        client: reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap_or_else(|e| panic!("{e}")),
        probe,
        firehose,
        firehose_pulls,
        shutdown,
        state,
        server,
        signal: Some(tx),
    }
}

impl TestApp {
    /// Sends the shutdown signal (what SIGTERM does in the binary).
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.signal.take() {
            let _ = tx.send(());
        }
    }

    /// A valid HS256 token for `sub` with `scope`.
    pub fn token(&self, sub: &str, scope: &str) -> String {
        hs256(json!({ "sub": sub, "exp": now() + 3600, "scope": scope }))
    }

    /// `GET path` with a bearer token.
    pub async fn get(&self, path_and_query: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(format!("{}{path_and_query}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"))
    }

    /// The value of one Prometheus series from `/metrics` (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics", None).await.text().await.unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
    }

    /// Opens `GET /v1/stream` with a stream-scoped token.
    pub async fn stream(&self, query: &str) -> reqwest::Response {
        let token = self.token("alice", "stream");
        self.get(&format!("/v1/stream?{query}"), Some(&token)).await
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Signs `claims` with the test secret.
pub fn hs256(claims: Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET.as_bytes()), claims)
}

/// Signs `claims` with any algorithm and key.
pub fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap_or_else(|e| panic!("sign: {e}"))
}

/// Reads a whole SSE response (bounded by `limit`) into events.
pub async fn read_events(resp: reqwest::Response, limit: Duration) -> Vec<Event> {
    let mut parser = Parser::new();
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(bytes))) => out.extend(parser.feed(&bytes)),
            Ok(Some(Err(e))) => panic!("body error: {e}"),
            Ok(None) => return out,
            Err(_) => panic!("stream did not end within {limit:?}; got {out:?}"),
        }
    }
}

/// Reads until `pred` holds for an event (bounded), returning all so far.
pub async fn read_until(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    parser: &mut Parser,
    limit: Duration,
    pred: impl Fn(&Event) -> bool,
) -> Vec<Event> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(bytes))) => {
                let evs = parser.feed(&bytes);
                let hit = evs.iter().any(&pred);
                out.extend(evs);
                if hit {
                    return out;
                }
            }
            Ok(Some(Err(e))) => panic!("body error: {e}"),
            Ok(None) => panic!("stream ended before the expected event; got {out:?}"),
            Err(_) => panic!("no expected event within {limit:?}; got {out:?}"),
        }
    }
}

/// `(event, data)` of dispatched messages only.
pub fn messages(events: &[Event]) -> Vec<(String, Value, Option<String>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { event, data, id } => {
                Some((event.clone(), serde_json::from_str(data).unwrap_or(Value::String(data.clone())), id.clone()))
            }
            _ => None,
        })
        .collect()
}

/// The concatenated `delta` texts.
pub fn delta_text(events: &[Event]) -> String {
    messages(events)
        .into_iter()
        .filter(|(e, _, _)| e == "delta")
        .map(|(_, d, _)| d["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Waits (bounded) until `cond` holds.
pub async fn eventually(limit: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Percent-encodes a query value.
pub fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The Python the README test command prepares (a `.venv`), checked to
/// import `module` (an official SDK the tests use as a client).
pub fn python_with(module: &str) -> String {
    let python = std::env::var("TOKENGATE_TEST_PYTHON").unwrap_or_else(|_| ".venv/bin/python".to_owned());
    let ok = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{python} with the `{module}` package is required: run scripts/test.sh (it creates .venv and installs it), or set TOKENGATE_TEST_PYTHON"
    );
    python
}

/// Runs an official client's check script against `app` (at most 60 s),
/// with `TOKENGATE_BASE_URL`, `TOKENGATE_TOKEN` and `env` in its
/// environment, and asserts that it succeeded and printed `marker`.
pub async fn run_client_check(
    program: &str,
    script: &str,
    app: &TestApp,
    token: &str,
    env: &[(&str, &str)],
    marker: &str,
) {
    let mut command = tokio::process::Command::new(program);
    command.arg(script).env("TOKENGATE_BASE_URL", &app.base).env("TOKENGATE_TOKEN", token);
    for (name, value) in env {
        command.env(name, value);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), command.output()).await.expect("bounded").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(marker), "{script} did not print `{marker}`:\n{stdout}");
}

/// Asserts a problem+json refusal with `status` and `code`; its headers,
/// for the `Retry-After` / `RateLimit-*` checks.
pub async fn problem(resp: reqwest::Response, status: u16, code: &str) -> reqwest::header::HeaderMap {
    assert_eq!(resp.status(), status, "expected {status} {code}");
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    headers
}

/// Kills `child` and every process of its group (spawn it with
/// `process_group(0)`), then reaps it. Servers that fork (nginx's workers,
/// Chromium's processes) outlive a SIGKILL of their parent alone, orphaned.
pub fn kill_group(child: &mut std::process::Child) {
    let group = format!("-{}", child.id());
    let _ =
        std::process::Command::new("kill").args(["-KILL", "--", &group]).stderr(std::process::Stdio::null()).status();
    let _ = child.kill();
    let _ = child.wait();
}

/// Every process `pid` started, directly or not (`pgrep -P`).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut parents = vec![pid];
    while let Some(parent) = parents.pop() {
        let out = std::process::Command::new("pgrep").args(["-P", &parent.to_string()]).output();
        let children: Vec<u32> = out
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default();
        parents.extend(&children);
        found.extend(children);
    }
    found
}

/// Whether process `pid` still runs (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()).map(|s| s != "Z"))
        .unwrap_or(false)
}
