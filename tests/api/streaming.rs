//! The stream endpoints: headers, wire format, generators, input errors.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn get_stream_speaks_the_wire_format() {
    let app = spawn_app().await;
    let resp = app.stream("prompt=hi&generator=echo").await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["content-type"], "text/event-stream; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    let raw = resp.text().await.unwrap();
    assert!(raw.starts_with("retry: 3000\n\n"), "{raw}");
    let events = tokengate::sse::Parser::new().feed(raw.as_bytes());
    assert_eq!(events[0], tokengate::sse::Event::Retry(3000));
    let msgs = messages(&events);
    let kinds: Vec<&str> = msgs.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(kinds, ["start", "delta", "delta", "done"]);
    let stream_id = msgs[0].1["stream_id"].as_str().unwrap().to_owned();
    assert_eq!(stream_id.len(), 32);
    assert!(stream_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(msgs[0].1["generator"], "echo");
    let ids: Vec<String> = msgs.iter().map(|(_, _, id)| id.clone().unwrap()).collect();
    assert_eq!(ids, (0..4).map(|i| format!("{stream_id}.{i}")).collect::<Vec<_>>());
    assert_eq!(msgs[1].1, json!({"text": "h"}));
    assert_eq!(msgs[2].1, json!({"text": "i"}));
    assert_eq!(msgs[3].1, json!({"finish_reason": "stop", "chars": 2}));
}

#[tokio::test]
async fn stream_ids_are_unique() {
    let app = spawn_app().await;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..20 {
        let events = read_events(app.stream("prompt=x&generator=echo").await, LIMIT).await;
        ids.insert(messages(&events)[0].1["stream_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 20);
}

#[tokio::test]
async fn post_stream_uses_chat_messages() {
    let app = spawn_app().await;
    let resp = app
        .client
        .post(format!("{}/v1/stream", app.base))
        .bearer_auth(app.token("alice", "stream"))
        .json(&json!({"generator": "echo", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "你好，世界"}
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(delta_text(&read_events(resp, LIMIT).await), "你好，世界");
}

#[tokio::test]
async fn demo_streams_the_selected_shipped_text() {
    let app = spawn_app().await;
    for name in ["chinese", "emoji", "combining", "english", "mixed"] {
        let expected = std::fs::read_to_string(format!("prompts/{name}.txt")).unwrap();
        let events = read_events(app.stream(&format!("prompt={name}")).await, LIMIT).await;
        assert_eq!(messages(&events)[0].1["generator"], "demo");
        assert_eq!(delta_text(&events), expected, "{name}");
        let done = messages(&events).pop().unwrap();
        let clusters = unicode_segmentation::UnicodeSegmentation::graphemes(expected.as_str(), true).count();
        assert_eq!(done.1["chars"], clusters);
    }
    // Any prompt picks one of them, the same one every time.
    let a = delta_text(&read_events(app.stream("prompt=what%20is%20sse").await, LIMIT).await);
    let b = delta_text(&read_events(app.stream("prompt=what%20is%20sse").await, LIMIT).await);
    assert_eq!(a, b);
    assert!(!a.is_empty());
}

#[tokio::test]
async fn unknown_generator_is_400_listing_the_available_ones() {
    let app = spawn_app().await;
    let resp = app.stream("prompt=x&generator=gpt-9").await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "unknown_generator");
    assert_eq!(body["status"], 400);
    assert_eq!(body["available"], json!(["choppy", "demo", "echo", "firehose", "probe"]));
    assert!(body["detail"].as_str().unwrap().contains("gpt-9"));
}

#[tokio::test]
async fn bad_bodies_are_clear_problems() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let post = |body: &'static str, ctype: &'static str| {
        app.client
            .post(format!("{}/v1/stream", app.base))
            .bearer_auth(&token)
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    let cases = [
        ("{not json", "application/json", 400),
        (r#"{"prompt": 5}"#, "application/json", 400),
        (r#"{"prompt": "x", "tempreature": 1}"#, "application/json", 400),
        (r#"{"prompt": "x"}"#, "text/plain", 415),
    ];
    for (body, ctype, status) in cases {
        let resp = post(body, ctype).await.unwrap();
        assert_eq!(resp.status(), status, "{body}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let problem: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(problem["status"], status);
    }
    // pace_ms must be a number.
    assert_eq!(app.stream("prompt=x&pace_ms=fast").await.status(), 400);
    assert_eq!(app.probe.started.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn oversized_prompt_and_body_are_413() {
    let mut settings = base_settings();
    settings.max_prompt_bytes = Some(100);
    settings.max_body_bytes = Some(1000);
    let app = spawn_app_with(settings).await;
    let resp = app.stream(&format!("generator=probe&prompt={}", "a".repeat(101))).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap()["code"], "payload_too_large");
    let resp = app
        .client
        .post(format!("{}/v1/stream", app.base))
        .bearer_auth(app.token("alice", "stream"))
        .json(&json!({"generator": "probe", "prompt": "b".repeat(2000)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("1000"), "{body}");
    assert_eq!(app.probe.started.load(std::sync::atomic::Ordering::SeqCst), 0);
    // At the limit is fine.
    assert_eq!(app.stream(&format!("generator=echo&prompt={}", "a".repeat(100))).await.status(), 200);
}

#[tokio::test]
async fn request_pace_is_clamped_to_the_configured_bounds() {
    let mut settings = base_settings();
    settings.pace_max_ms = Some(40);
    let app = spawn_app_with(settings).await;
    let started = Instant::now();
    // Asking for 100 s per delta gets 40 ms: 4 deltas take >= 120 ms, and the
    // read would time out if the clamp were missing.
    let events = read_events(app.stream("generator=echo&prompt=abcd&pace_ms=100000").await, LIMIT).await;
    assert_eq!(delta_text(&events), "abcd");
    assert!(started.elapsed() >= Duration::from_millis(120));
}

#[tokio::test]
async fn generator_default_pace_applies_without_a_request_override() {
    let mut settings = base_settings();
    settings.generator_pace = Some(vec!["echo=30".into()]);
    let app = spawn_app_with(settings).await;
    let started = Instant::now();
    let events = read_events(app.stream("generator=echo&prompt=abcde").await, LIMIT).await;
    assert_eq!(delta_text(&events), "abcde");
    assert!(started.elapsed() >= Duration::from_millis(120));
}
