//! The Anthropic Messages endpoint: the event sequence on the wire for a
//! finished and a failed stream, the non-streaming answer, `x-api-key`,
//! errors in the Anthropic shape (also from the fallbacks and the per-IP
//! limit), the official `anthropic` Python SDK as a client, and an upstream
//! of `kind = "anthropic"` against the mock upstream.

use std::time::Duration;

use serde_json::{Value, json};
use unicode_segmentation::UnicodeSegmentation;

use crate::helpers::*;
use crate::mock_upstream;

const LIMIT: Duration = Duration::from_secs(15);

/// A text that breaks naive splitting: CJK, a ZWJ family, combining marks,
/// a flag, CRLF.
const HOSTILE: &str = "你好, 👩\u{200d}👩\u{200d}👧 e\u{301}a\u{308}\u{323} 🇯🇵\r\nend";

async fn post(app: &TestApp, token: Option<&str>, body: Value) -> reqwest::Response {
    let mut req = app.client.post(format!("{}/v1/messages", app.base)).header("anthropic-version", "2023-06-01");
    if let Some(t) = token {
        req = req.header("x-api-key", t);
    }
    req.json(&body).send().await.unwrap()
}

/// `(event name, data)` of every event, pings included.
async fn events(resp: reqwest::Response) -> Vec<(String, Value)> {
    messages(&read_events(resp, LIMIT).await).into_iter().map(|(name, data, _)| (name, data)).collect()
}

fn is_terminal(name: &str) -> bool {
    name == "message_stop" || name == "error"
}

#[tokio::test]
async fn a_finished_stream_is_the_anthropic_event_sequence() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let resp = post(
        &app,
        Some(&token),
        json!({"model": "echo", "max_tokens": 1024, "stream": true, "system": [{"type": "text", "text": "be brief"}],
               "messages": [{"role": "user", "content": [{"type": "text", "text": HOSTILE}, {"type": "image", "source": {}}]}],
               "metadata": {"user_id": "u1"}, "top_k": 3, "temperature": 0.5, "stop_sequences": ["\n\nHuman:"]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = events(resp).await;
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str(), "every data's type is its event name");
    }
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let clusters: Vec<&str> = HOSTILE.graphemes(true).collect();
    let mut expected = vec!["message_start", "content_block_start"];
    expected.extend(std::iter::repeat_n("content_block_delta", clusters.len()));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    assert_eq!(names.iter().filter(|n| is_terminal(n)).count(), 1, "exactly one terminal event");

    let message = &events[0].1["message"];
    let id = message["id"].as_str().unwrap();
    assert!(id.starts_with("msg_") && id.len() == 36, "{id}");
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["content"], json!([]));
    assert_eq!(message["model"], "echo");
    assert_eq!(message["stop_reason"], Value::Null);
    assert_eq!(message["stop_sequence"], Value::Null);
    assert_eq!(message["usage"], json!({"input_tokens": 0, "output_tokens": 0}));
    assert_eq!(
        events[1].1,
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    );
    let deltas: Vec<&str> = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["index"], 0);
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(deltas, clusters, "one grapheme cluster per delta");
    let n = events.len();
    assert_eq!(events[n - 3].1, json!({"type": "content_block_stop", "index": 0}));
    assert_eq!(
        events[n - 2].1,
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": clusters.len()}})
    );
    assert_eq!(events[n - 1].1, json!({"type": "message_stop"}));
}

#[tokio::test]
async fn max_duration_ends_with_one_error_event_after_pings() {
    let mut settings = base_settings();
    settings.max_stream_duration = Some("600ms".into());
    settings.heartbeat = Some("100ms".into());
    let app = spawn_app_with(settings).await;
    let token = app.token("alice", "stream");
    // `probe` says nothing after its (here empty) prompt, until dropped.
    let resp = post(
        &app,
        Some(&token),
        json!({"model": "probe", "max_tokens": 16, "stream": true, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let events = events(resp).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..2], ["message_start", "content_block_start"], "{names:?}");
    assert_eq!(names.last(), Some(&"error"), "{names:?}");
    assert_eq!(names.iter().filter(|n| is_terminal(n)).count(), 1, "exactly one terminal event: {names:?}");
    let pings: Vec<&(String, Value)> = events.iter().filter(|(n, _)| n == "ping").collect();
    assert!(!pings.is_empty(), "pings keep the stream alive: {names:?}");
    assert!(pings.iter().all(|(_, d)| *d == json!({"type": "ping"})));
    assert!(
        !names.contains(&"message_delta") && !names.contains(&"content_block_stop"),
        "a limit is not a normal stop: {names:?}"
    );
    let error = &events.last().unwrap().1;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "timeout_error", "{error}");
    assert_eq!(error["error"]["code"], "max_duration", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("max_duration"), "{error}");
    eventually(Duration::from_secs(5), "the probe generation is dropped", || {
        app.probe.dropped.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_an_open_stream_with_an_overloaded_error() {
    let mut app = spawn_app().await;
    let token = app.token("alice", "stream");
    let resp = post(
        &app,
        Some(&token),
        json!({"model": "probe", "max_tokens": 16, "stream": true, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    eventually(Duration::from_secs(5), "the probe runs", || {
        app.probe.started.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    app.signal_shutdown();
    let events = events(resp).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["message_start", "content_block_start", "error"]);
    let error = &events[2].1["error"];
    assert_eq!(error["type"], "overloaded_error", "{error}");
    assert_eq!(error["code"], "shutdown", "{error}");
}

#[tokio::test]
async fn not_streaming_answers_one_message() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let resp = post(
        &app,
        Some(&token),
        json!({"model": "echo", "max_tokens": 1024, "system": "sys", "messages": [{"role": "user", "content": HOSTILE}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["model"], "echo");
    assert_eq!(body["content"], json!([{"type": "text", "text": HOSTILE}]));
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["stop_sequence"], Value::Null);
    assert_eq!(body["usage"], json!({"input_tokens": 0, "output_tokens": HOSTILE.graphemes(true).count()}));
}

#[tokio::test]
async fn the_token_may_come_as_x_api_key_here_and_bearer_wins() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let body = json!({"model": "echo", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
    let url = format!("{}/v1/messages", app.base);
    // Bearer alone, x-api-key alone, the cookie alone: all accepted.
    let resp = app.client.post(&url).bearer_auth(&token).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(post(&app, Some(&token), body.clone()).await.status(), 200);
    let resp =
        app.client.post(&url).header("cookie", format!("tokengate_token={token}")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // Bearer first, then x-api-key, then the cookie: the first present wins.
    let resp =
        app.client.post(&url).bearer_auth("not-a-jwt").header("x-api-key", &token).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = app
        .client
        .post(&url)
        .header("x-api-key", "not-a-jwt")
        .header("cookie", format!("tokengate_token={token}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Only this route reads x-api-key.
    let resp = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .header("x-api-key", &token)
        .json(&json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn errors_are_in_the_anthropic_shape() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let ok = json!({"model": "echo", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]});
    let cases = [
        (None, ok.clone(), 401, "authentication_error", "missing_token"),
        (Some("not-a-jwt".to_owned()), ok.clone(), 401, "authentication_error", "malformed_token"),
        (Some(app.token("alice", "publish")), ok.clone(), 403, "permission_error", "insufficient_scope"),
        (
            Some(token.clone()),
            json!({"model": "claude-9", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}),
            404,
            "not_found_error",
            "model_not_found",
        ),
        (
            Some(token.clone()),
            json!({"model": "echo", "messages": [{"role": "user", "content": "x"}]}),
            400,
            "invalid_request_error",
            "bad_request",
        ),
        (
            Some(token.clone()),
            json!({"model": "echo", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
            400,
            "invalid_request_error",
            "bad_request",
        ),
        (
            Some(token.clone()),
            json!({"model": "echo", "max_tokens": 8, "messages": []}),
            400,
            "invalid_request_error",
            "bad_request",
        ),
        (
            Some(token.clone()),
            json!({"max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}),
            400,
            "invalid_request_error",
            "bad_request",
        ),
        (Some(token.clone()), json!([1, 2]), 400, "invalid_request_error", "bad_request"),
        (
            Some(token.clone()),
            json!({"model": "echo", "max_tokens": 8, "messages": [{"role": "user", "content": "x".repeat(70_000)}]}),
            413,
            "invalid_request_error",
            "payload_too_large",
        ),
    ];
    for (token, body, status, kind, code) in cases {
        let resp = post(&app, token.as_deref(), body.clone()).await;
        assert_error(resp, status, kind, code, &body.to_string()).await;
    }
    // Not JSON.
    let resp = app.client.post(format!("{}/v1/messages", app.base)).header("x-api-key", &token).body("hi").send();
    assert_error(resp.await.unwrap(), 415, "invalid_request_error", "unsupported_media_type", "text body").await;
    // The fallbacks: a wrong method, and an Anthropic route tokengate does not serve.
    let resp = app.get("/v1/messages", Some(&token)).await;
    assert_error(resp, 405, "invalid_request_error", "method_not_allowed", "GET").await;
    let resp = app.client.post(format!("{}/v1/messages/count_tokens", app.base)).json(&ok).send().await.unwrap();
    assert_error(resp, 404, "not_found_error", "not_found", "count_tokens").await;
    // Elsewhere problem+json stays.
    let resp = app.get("/v1/nope", Some(&token)).await;
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
}

async fn assert_error(resp: reqwest::Response, status: u16, kind: &str, code: &str, what: &str) {
    assert_eq!(resp.status(), status, "{what}");
    assert_eq!(resp.headers()["content-type"], "application/json", "{what}");
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["error"]["type"], kind, "{what}: {err}");
    assert_eq!(err["error"]["code"], code, "{what}: {err}");
    assert!(!err["error"]["message"].as_str().unwrap().is_empty(), "{err}");
}

#[tokio::test]
async fn the_per_ip_rate_limit_and_a_full_server_answer_in_the_anthropic_shape() {
    let mut settings = base_settings();
    settings.rate_ip_per_min = Some(1);
    settings.rate_ip_burst = Some(1);
    let app = spawn_app_with(settings).await;
    let token = app.token("alice", "stream");
    let body = json!({"model": "echo", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(post(&app, Some(&token), body.clone()).await.status(), 200);
    let resp = post(&app, Some(&token), body).await;
    assert!(resp.headers().contains_key("retry-after"));
    assert_error(resp, 429, "rate_limit_error", "rate_limited_ip", "second request").await;

    let mut settings = base_settings();
    settings.max_streams = Some(1);
    let app = spawn_app_with(settings).await;
    let body =
        json!({"model": "probe", "max_tokens": 8, "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let held = post(&app, Some(&token), body.clone()).await;
    assert_eq!(held.status(), 200);
    let resp = post(&app, Some(&app.token("bob", "stream")), body).await;
    assert_error(resp, 503, "overloaded_error", "server_busy", "no slot").await;
    drop(held);
}

#[tokio::test]
async fn the_official_anthropic_python_sdk_streams_through_tokengate() {
    let python = python_with("anthropic");
    let app = spawn_app().await;
    let (token, publish) = (app.token("sdk-user", "stream"), app.token("sdk-user", "publish"));
    let env = [("TOKENGATE_PUBLISH_TOKEN", publish.as_str()), ("EXPECTED_TEXT", HOSTILE)];
    run_client_check(&python, "tests/python/anthropic_sdk_check.py", &app, &token, &env, "anthropic sdk ok").await;
}

const UPSTREAM_KEY: &str = "sk-ant-test-0123456789-secret";

async fn anthropic_upstream_app(pooled: bool) -> (TestApp, mock_upstream::MockUpstream) {
    let mock = mock_upstream::start().await;
    let key = std::env::temp_dir().join(format!("tokengate-anthropic-key-{}-{pooled}", std::process::id()));
    std::fs::write(&key, format!("{UPSTREAM_KEY}\n")).unwrap();
    let upstream = |model: &str| tokengate::generator::upstream::UpstreamSettings {
        kind: Some(tokengate::generator::upstream::UpstreamKind::Anthropic),
        base_url: mock.base_url(),
        model: model.to_owned(),
        api_key_file: Some(key.clone()),
        first_byte_timeout: Some("500ms".into()),
        idle_timeout: Some("500ms".into()),
        retries: Some(0),
        pooled: Some(pooled),
        ..Default::default()
    };
    let mut settings = base_settings();
    settings.upstreams = Some(
        [
            ("claude", upstream("normal")),
            ("claude-error", upstream("error-event")),
            ("claude-401", upstream("status-401")),
            ("claude-cut", upstream("cut")),
            ("claude-drop", upstream("drop")),
            ("claude-garbage", upstream("garbage")),
            ("claude-idle", upstream("idle")),
        ]
        .into_iter()
        .map(|(n, u)| (n.to_owned(), u))
        .collect(),
    );
    (spawn_app_with(settings).await, mock)
}

#[tokio::test]
async fn an_anthropic_upstream_streams_exact_text_with_its_usage() {
    for pooled in [false, true] {
        let (app, mock) = anthropic_upstream_app(pooled).await;
        let token = app.token("alice", "stream");
        let resp = post(
            &app,
            Some(&token),
            json!({"model": "claude", "max_tokens": 64, "stream": true, "system": "be brief",
                   "stop_sequences": ["END"], "temperature": 0.25, "top_p": 0.5,
                   "messages": [{"role": "user", "content": HOSTILE}]}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let events = events(resp).await;
        let text: String = events
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(text, HOSTILE, "pooled: {pooled}");
        let deltas = events.iter().filter(|(n, _)| n == "content_block_delta").count();
        assert_eq!(deltas, HOSTILE.graphemes(true).count(), "re-chunked into grapheme clusters");
        let (name, last_delta) = &events[events.len() - 2];
        assert_eq!(name, "message_delta");
        assert_eq!(last_delta["usage"], json!({"input_tokens": 11, "output_tokens": 22}));
        assert_eq!(events.last().unwrap().0, "message_stop");
        // What the upstream got: the Messages shape, its key as x-api-key.
        let body = mock.seen.last_body.lock().unwrap().clone();
        assert_eq!(
            body,
            json!({"model": "normal", "max_tokens": 64, "stream": true, "system": "be brief",
                   "messages": [{"role": "user", "content": HOSTILE}], "stop_sequences": ["END"],
                   "temperature": 0.25, "top_p": 0.5})
        );
        let (key, version) = mock.seen.last_anthropic_headers.lock().unwrap().clone();
        assert_eq!(key.as_deref(), Some(UPSTREAM_KEY));
        assert_eq!(version.as_deref(), Some("2023-06-01"));
        assert_eq!(*mock.seen.last_auth.lock().unwrap(), None, "no bearer header to an Anthropic upstream");
    }
}

#[tokio::test]
async fn an_anthropic_upstreams_failures_are_terminal_errors() {
    let (app, _mock) = anthropic_upstream_app(false).await;
    let token = app.token("alice", "stream");
    let open = |model: &str| json!({"model": model, "max_tokens": 8, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let got = events(post(&app, Some(&token), open("claude-error")).await).await;
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["message_start", "content_block_start", "content_block_delta", "error"]);
    let error = &got[3].1["error"];
    assert_eq!(error["type"], "api_error", "{error}");
    assert_eq!(error["code"], "upstream_error", "{error}");
    assert!(error["message"].as_str().unwrap().contains("Overloaded"), "{error}");

    let got = events(post(&app, Some(&token), open("claude-401")).await).await;
    let error = &got.last().unwrap().1["error"];
    assert_eq!(error["code"], "upstream_unauthorized", "{error}");
    assert!(!error["message"].as_str().unwrap().contains(UPSTREAM_KEY), "{error}");
    // Through the native route too: an upstream is a generator like any.
    let resp = app
        .client
        .post(format!("{}/v1/stream", app.base))
        .bearer_auth(&token)
        .json(&json!({"generator": "claude", "prompt": "héllo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(delta_text(&read_events(resp, LIMIT).await), "héllo");
}

#[tokio::test]
async fn an_anthropic_upstream_cut_dropped_garbled_or_silent_is_exact_or_a_terminal_error() {
    for pooled in [false, true] {
        let (app, _mock) = anthropic_upstream_app(pooled).await;
        let token = app.token("alice", "stream");
        let native = |generator: &str, prompt: &str| {
            app.client
                .post(format!("{}/v1/stream", app.base))
                .bearer_auth(&token)
                .json(&json!({"generator": generator, "prompt": prompt}))
                .send()
        };
        // Cut inside UTF-8 sequences and lines, with CRLF: the exact text.
        let text = "你好 👩‍👩‍👧 e\u{301} ok";
        let events = read_events(native("claude-cut", text).await.unwrap(), LIMIT).await;
        assert_eq!(delta_text(&events), text, "pooled {pooled}");
        for (generator, code) in [
            ("claude-drop", "upstream_disconnected"),
            ("claude-garbage", "upstream_malformed"),
            ("claude-idle", "upstream_idle_timeout"),
        ] {
            let events = read_events(native(generator, "héllo").await.unwrap(), LIMIT).await;
            let all = messages(&events);
            let (last, data, _) = all.last().unwrap();
            assert_eq!(
                (last.as_str(), data["code"].as_str()),
                ("error", Some(code)),
                "{generator}, pooled {pooled}: {all:?}"
            );
            assert_eq!(all.iter().filter(|(e, _, _)| e == "error" || e == "done").count(), 1, "one terminal event");
        }
    }
}
