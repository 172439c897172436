//! The `openai` generator end to end against the mock upstream: exact text
//! through awkward network chunking, usage, forwarded messages and options,
//! every failure mode as a terminal error, retries, fallback, and
//! cancellation reaching the upstream.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};
use tokengate::generator::upstream::UpstreamSettings;
use tokengate::sse::{Event, Parser};

use crate::helpers::*;
use crate::mock_upstream::{self, MockUpstream};

const LIMIT: Duration = Duration::from_secs(15);
const KEY: &str = "sk-test-0123456789-secret";

fn key_file() -> String {
    let path = std::env::temp_dir().join(format!("tokengate-key-{}", std::process::id()));
    std::fs::write(&path, format!("{KEY}\n")).unwrap();
    path.to_string_lossy().into_owned()
}

fn upstream(mock: &MockUpstream, mode: &str) -> UpstreamSettings {
    upstream_via(mock, mode, false)
}

/// `pooled`: through the pooled client (reqwest) instead of the connection
/// driven by the stream's task; the tests that matter run both ways.
fn upstream_via(mock: &MockUpstream, mode: &str, pooled: bool) -> UpstreamSettings {
    UpstreamSettings {
        pooled: Some(pooled),
        base_url: mock.base_url(),
        model: mode.to_owned(),
        api_key_file: Some(key_file().into()),
        first_byte_timeout: Some("500ms".into()),
        idle_timeout: Some("500ms".into()),
        retries: Some(0),
        ..UpstreamSettings::default()
    }
}

async fn app_with(upstreams: Vec<(&str, UpstreamSettings)>) -> TestApp {
    let mut settings = base_settings();
    settings.upstreams = Some(upstreams.into_iter().map(|(n, u)| (n.to_owned(), u)).collect::<BTreeMap<_, _>>());
    spawn_app_with(settings).await
}

async fn post_stream(app: &TestApp, body: Value) -> Vec<Event> {
    let resp = app
        .client
        .post(format!("{}/v1/stream", app.base))
        .bearer_auth(app.token("alice", "stream"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    read_events(resp, LIMIT).await
}

fn terminal(events: &[Event]) -> (String, Value) {
    let (kind, data, _) = messages(events).pop().unwrap();
    (kind, data)
}

#[tokio::test]
async fn streams_exact_text_with_usage_and_forwards_the_request() {
    for pooled in [false, true] {
        streams_exact_text_via(pooled).await;
    }
}

async fn streams_exact_text_via(pooled: bool) {
    let mock = mock_upstream::start().await;
    let app = app_with(vec![("up", upstream_via(&mock, "normal", pooled))]).await;
    let text = "Hi 你好 👩‍👩‍👧 e\u{301}!";
    let events = post_stream(
        &app,
        json!({"generator": "up", "messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": text}]}),
    )
    .await;
    assert_eq!(delta_text(&events), text);
    let (kind, done) = terminal(&events);
    assert_eq!(kind, "done");
    assert_eq!(done["usage"], json!({"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}));
    let sent = mock.seen.last_body.lock().unwrap().clone();
    assert_eq!(sent["model"], "normal");
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["messages"][0], json!({"role": "system", "content": "be kind"}));
    assert_eq!(mock.seen.last_auth.lock().unwrap().as_deref(), Some(format!("Bearer {KEY}").as_str()));
}

#[tokio::test]
async fn sampling_options_reach_the_upstream_through_the_openai_api() {
    let mock = mock_upstream::start().await;
    let app = app_with(vec![("up", upstream(&mock, "normal"))]).await;
    let resp = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .bearer_auth(app.token("alice", "stream"))
        .json(&json!({"model": "up", "messages": [{"role": "user", "content": "ok"}], "temperature": 0.25, "max_tokens": 7, "stop": ["\n"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "ok");
    assert_eq!(body["usage"]["total_tokens"], 33);
    let sent = mock.seen.last_body.lock().unwrap().clone();
    assert_eq!((sent["temperature"].as_f64(), sent["max_tokens"].as_u64()), (Some(0.25), Some(7)));
    assert_eq!(sent["stop"], json!(["\n"]));
}

#[tokio::test]
async fn chunks_cut_inside_utf8_and_lines_reassemble_exactly() {
    let mock = mock_upstream::start().await;
    for pooled in [false, true] {
        let app = app_with(vec![("up", upstream_via(&mock, "cut", pooled))]).await;
        let text = "日本語テキスト 🇯🇵🇫🇷 👨‍👩‍👧‍👦 Zalgo Z\u{324}\u{354}a\u{308}\u{356}";
        let events = post_stream(&app, json!({"generator": "up", "prompt": text})).await;
        assert_eq!(delta_text(&events), text, "pooled: {pooled}");
        assert_eq!(terminal(&events).0, "done");
    }
}

#[tokio::test]
async fn every_failure_is_a_terminal_error_with_its_code() {
    for pooled in [false, true] {
        every_failure_via(pooled).await;
    }
}

async fn every_failure_via(pooled: bool) {
    let mock = mock_upstream::start().await;
    let modes = [
        ("status-401", "upstream_unauthorized"),
        ("status-404", "upstream_not_found"),
        ("status-429", "upstream_rate_limited"),
        ("status-500", "upstream_unavailable"),
        ("drop", "upstream_disconnected"),
        ("garbage", "upstream_malformed"),
        ("error-object", "upstream_error"),
        ("idle", "upstream_idle_timeout"),
        ("hang", "upstream_first_byte_timeout"),
    ];
    let app = app_with(modes.iter().map(|(mode, _)| (*mode, upstream_via(&mock, mode, pooled))).collect()).await;
    for (mode, code) in modes {
        let events = post_stream(&app, json!({"generator": mode, "prompt": "hello"})).await;
        let (kind, data) = terminal(&events);
        assert_eq!((kind.as_str(), data["code"].as_str()), ("error", Some(code)), "{mode} (pooled: {pooled}): {data}");
        let message = data["message"].as_str().unwrap();
        assert!(!message.contains(KEY), "the API key leaked into an error");
        if mode == "status-429" {
            assert!(message.contains("retry after 7"), "{message}");
        }
    }
    // Text that came before a mid-stream failure was delivered.
    let events = post_stream(&app, json!({"generator": "drop", "prompt": "hello"})).await;
    assert_eq!(delta_text(&events), "hel");
    // Counted by code.
    assert!(app.metric("tokengate_streams_total{outcome=\"upstream_unauthorized\"}").await >= 1.0);
}

#[tokio::test]
async fn connect_failures_are_retried_then_reported() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for pooled in [false, true] {
        let settings = UpstreamSettings {
            base_url: format!("http://127.0.0.1:{port}/v1"),
            model: "m".into(),
            retries: Some(2),
            pooled: Some(pooled),
            ..UpstreamSettings::default()
        };
        let app = app_with(vec![("gone", settings)]).await;
        let events = post_stream(&app, json!({"generator": "gone", "prompt": "x"})).await;
        assert_eq!(terminal(&events).1["code"], "upstream_connect_failed", "pooled: {pooled}");
    }
}

#[tokio::test]
async fn retries_before_the_first_byte_then_falls_back_in_order() {
    let mock = mock_upstream::start().await;
    // flaky: one 503, then fine; retried on the same upstream.
    let mut flaky = upstream(&mock, "flaky");
    flaky.retries = Some(2);
    let app = app_with(vec![("flaky", flaky)]).await;
    let events = post_stream(&app, json!({"generator": "flaky", "prompt": "retried"})).await;
    assert_eq!(delta_text(&events), "retried");
    assert_eq!(mock.seen.requests.load(Ordering::SeqCst), 2);

    // A primary that keeps failing falls back to the next upstream.
    let mock = mock_upstream::start().await;
    let mut primary = upstream(&mock, "status-500");
    primary.retries = Some(1);
    primary.fallbacks = vec!["backup".into()];
    let app = app_with(vec![("primary", primary), ("backup", upstream(&mock, "normal"))]).await;
    let events = post_stream(&app, json!({"generator": "primary", "prompt": "fallback"})).await;
    assert_eq!(delta_text(&events), "fallback");
    assert_eq!(mock.seen.requests.load(Ordering::SeqCst), 3, "2 tries on the primary, 1 on the backup");
    // Not retried after the first byte: a mid-stream drop is final.
    let mock = mock_upstream::start().await;
    let mut dropper = upstream(&mock, "drop");
    dropper.retries = Some(3);
    let app = app_with(vec![("d", dropper)]).await;
    let events = post_stream(&app, json!({"generator": "d", "prompt": "abcdef"})).await;
    assert_eq!(terminal(&events).1["code"], "upstream_disconnected");
    assert_eq!(mock.seen.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_that_leaves_drops_the_upstream_request() {
    for pooled in [false, true] {
        client_leaves_via(pooled).await;
    }
}

async fn client_leaves_via(pooled: bool) {
    let mock = mock_upstream::start().await;
    let app = app_with(vec![("up", upstream_via(&mock, "slow", pooled))]).await;
    let text = "a".repeat(200);
    let resp = app
        .client
        .post(format!("{}/v1/stream", app.base))
        .bearer_auth(app.token("alice", "stream"))
        .json(&json!({"generator": "up", "prompt": text}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    read_until(&mut body, &mut Parser::new(), LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "delta"))
        .await;
    assert_eq!(mock.seen.dropped.load(Ordering::SeqCst), 0);
    drop(body);
    // 200 chars at 30 ms would take 6 s; the upstream sees its request
    // dropped long before that.
    eventually(Duration::from_secs(3), "upstream request dropped", || mock.seen.dropped.load(Ordering::SeqCst) == 1)
        .await;
}

#[tokio::test]
async fn configuration_errors_name_the_upstream() {
    let mut settings = base_settings();
    let mut bad = BTreeMap::new();
    bad.insert(
        "u".to_owned(),
        UpstreamSettings { base_url: "ftp://x".into(), model: "m".into(), ..UpstreamSettings::default() },
    );
    settings.upstreams = Some(bad);
    let err = tokengate::config::Config::from_settings(settings).unwrap_err().to_string();
    assert!(err.contains("upstreams") && err.contains("`u`"), "{err}");
    let mut settings = base_settings();
    let mut missing = BTreeMap::new();
    missing.insert(
        "u".to_owned(),
        UpstreamSettings {
            base_url: "http://x".into(),
            model: "m".into(),
            api_key_env: Some("TOKENGATE_TEST_NO_SUCH_VAR".into()),
            ..UpstreamSettings::default()
        },
    );
    settings.upstreams = Some(missing);
    let err = tokengate::config::Config::from_settings(settings).unwrap_err().to_string();
    assert!(err.contains("TOKENGATE_TEST_NO_SUCH_VAR"), "{err}");
}

#[tokio::test]
async fn frames_that_arrive_together_are_handed_on_together() {
    use futures_util::StreamExt;
    use tokengate::generator::upstream::Upstream;
    use tokengate::generator::{Chunk, GenerateRequest, Generator, OpenAiGenerator};

    let mock = mock_upstream::start().await;
    // 2,000 one-character frames sent as fast as the mock can.
    let text: String = "fast 速い ".chars().cycle().take(2000).collect();
    for pooled in [false, true] {
        let up = Upstream::from_settings("up", &upstream_via(&mock, "normal", pooled)).unwrap();
        let generator = OpenAiGenerator::new(std::sync::Arc::new(up), Vec::new()).unwrap();
        let mut chunks = generator.generate(GenerateRequest { prompt: text.clone(), ..GenerateRequest::default() });
        let (mut pieces, mut got) = (0, String::new());
        while let Some(chunk) = chunks.next().await {
            if let Ok(Chunk::Text(t)) = chunk {
                pieces += 1;
                got.push_str(&t);
            }
        }
        assert_eq!(got, text, "pooled: {pooled}");
        if !pooled {
            // The connection is driven by the reading task, which takes
            // every frame a network read brought (the mock writes up to 16
            // per write) as one chunk; the pooled client hands frames over
            // one per wake-up of its connection task.
            assert!(pieces * 4 <= 2000, "{pieces} chunks for 2,000 frames");
        }
    }
}
