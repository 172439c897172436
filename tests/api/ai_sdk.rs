//! The Vercel AI SDK UI message stream (`/v1/ui/chat`): the raw part
//! sequence for each way a stream ends, the chat resume and stop routes,
//! and the `ai` npm package's own client (`DefaultChatTransport`,
//! `readUIMessageStream`) driven from Node.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tokengate::generator::upstream::UpstreamSettings;
use unicode_segmentation::UnicodeSegmentation;

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(15);

fn body(chat: &str, model: &str, text: &str) -> Value {
    json!({
        "id": chat,
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}, {"type": "step-start"}]}],
        "trigger": "submit-message",
        "messageId": null,
        "model": model,
        "someAppField": {"ignored": true},
    })
}

async fn post_chat(app: &TestApp, token: &str, body: &Value) -> reqwest::Response {
    app.client.post(format!("{}/v1/ui/chat", app.base)).bearer_auth(token).json(body).send().await.unwrap()
}

/// The `data:` payloads of a UI message stream, parsed (`[DONE]` as a string).
async fn read_parts(resp: reqwest::Response) -> Vec<Value> {
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-vercel-ai-ui-message-stream"], "v1");
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    read_events(resp, LIMIT)
        .await
        .into_iter()
        .filter_map(|e| match e {
            tokengate::sse::Event::Message { data, id, event, .. } => {
                assert!(id.is_none() && event == "message", "only data lines");
                Some(if data == "[DONE]" { json!("[DONE]") } else { serde_json::from_str(&data).unwrap() })
            }
            _ => None,
        })
        .collect()
}

/// The parts after the text, and checks every stream's common shape: one
/// `start` (with `messageId`) and `start-step` first, one terminal part,
/// then `[DONE]`, nothing after it.
fn ending(parts: &[Value]) -> Vec<Value> {
    assert_eq!(parts[0]["type"], "start");
    assert_eq!(parts[0].as_object().unwrap().len(), 2, "{}", parts[0]);
    assert!(parts[0]["messageId"].is_string());
    assert_eq!(parts[1], json!({"type": "start-step"}));
    assert_eq!(parts.last(), Some(&json!("[DONE]")));
    assert_eq!(parts.iter().filter(|p| *p == "[DONE]").count(), 1);
    let terminal = parts.iter().filter(|p| matches!(p["type"].as_str(), Some("finish" | "error" | "abort"))).count();
    assert_eq!(terminal, 1, "exactly one terminal part: {parts:?}");
    parts.iter().skip(2).filter(|p| !matches!(p["type"].as_str(), Some("text-delta"))).cloned().collect()
}

fn text(parts: &[Value]) -> Vec<String> {
    parts.iter().filter(|p| p["type"] == "text-delta").map(|p| p["delta"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn a_done_stream_is_the_exact_part_sequence() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let prompt = "你好 👩‍👩‍👧 e\u{301}\r\n!";
    let parts = read_parts(post_chat(&app, &token, &body("c1", "echo", prompt)).await).await;
    assert_eq!(text(&parts), prompt.graphemes(true).collect::<Vec<_>>(), "one grapheme cluster per delta");
    for p in parts.iter().filter(|p| p["type"] == "text-delta") {
        assert_eq!(p.as_object().unwrap().len(), 3, "{p}");
        assert_eq!(p["id"], "text-0");
    }
    assert_eq!(
        ending(&parts),
        [
            json!({"type": "text-start", "id": "text-0"}),
            json!({"type": "text-end", "id": "text-0"}),
            json!({"type": "finish-step"}),
            json!({"type": "finish", "finishReason": "stop"}),
            json!("[DONE]"),
        ]
    );
    // The default generator answers without `model`.
    let mut no_model = body("c2", "echo", "x");
    no_model.as_object_mut().unwrap().remove("model");
    let parts = read_parts(post_chat(&app, &token, &no_model).await).await;
    assert_eq!(ending(&parts).last(), Some(&json!("[DONE]")));
}

#[tokio::test]
async fn failures_end_with_one_error_part_and_limits_with_length() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let gone = UpstreamSettings {
        base_url: format!("http://127.0.0.1:{port}/v1"),
        model: "m".into(),
        retries: Some(0),
        ..UpstreamSettings::default()
    };
    let mut settings = base_settings();
    settings.upstreams = Some(BTreeMap::from([("gone".to_owned(), gone)]));
    settings.max_stream_duration = Some("300ms".into());
    settings.pace_ms = Some(50);
    let app = spawn_app_with(settings).await;
    let token = app.token("alice", "stream");

    let parts = read_parts(post_chat(&app, &token, &body("c1", "gone", "x")).await).await;
    let end = ending(&parts);
    assert_eq!(end.len(), 2, "{end:?}");
    assert_eq!(end[0]["type"], "error");
    assert_eq!(end[0].as_object().unwrap().len(), 2, "{}", end[0]);
    assert!(end[0]["errorText"].as_str().unwrap().starts_with("upstream_connect_failed: "), "{}", end[0]);

    // max_duration cuts the answer: a finish with `length`.
    let parts = read_parts(post_chat(&app, &token, &body("c2", "echo", &"a".repeat(100))).await).await;
    let end = ending(&parts);
    assert!(!text(&parts).is_empty() && text(&parts).len() < 100);
    assert_eq!(end[end.len() - 2], json!({"type": "finish", "finishReason": "length"}));
    assert_eq!(end[end.len() - 3], json!({"type": "finish-step"}));
}

#[tokio::test]
async fn resume_replays_a_running_chat_and_stop_aborts_it() {
    let mut settings = base_settings();
    settings.pace_ms = Some(20);
    settings.detach_grace = Some("10s".into());
    let app = spawn_app_with(settings).await;
    let token = app.token("alice", "stream");
    let resume = |chat: &str, token: &str| {
        app.client.get(format!("{}/v1/ui/chat/{chat}/stream", app.base)).bearer_auth(token).send()
    };

    // No stream for an unknown chat.
    assert_eq!(resume("nobody", &token).await.unwrap().status(), 204);

    // A cut connection: the generation goes on; the resume replays it all.
    let prompt = "resumable 👩‍👩‍👧 text";
    let first = post_chat(&app, &token, &body("chat-r", "echo", prompt)).await;
    assert_eq!(first.status(), 200);
    drop(first);
    let replay = read_parts(resume("chat-r", &token).await.unwrap()).await;
    assert_eq!(text(&replay).concat(), prompt);
    assert_eq!(ending(&replay)[3], json!({"type": "finish", "finishReason": "stop"}));
    assert_eq!(resume("chat-r", &token).await.unwrap().status(), 204, "a finished chat answers 204");

    // Another subject's chat of the same id is not found, nor stopped.
    let long = "z".repeat(200);
    let running = post_chat(&app, &token, &body("chat-s", "echo", &long)).await;
    let bob = app.token("bob", "stream");
    assert_eq!(resume("chat-s", &bob).await.unwrap().status(), 204);
    let stop = |chat: &str, token: &str| {
        app.client.post(format!("{}/v1/ui/chat/{chat}/stop", app.base)).bearer_auth(token).send()
    };
    assert_eq!(stop("chat-s", &bob).await.unwrap().status(), 204);
    // The owner stops it: every reader ends with `abort`.
    let follower = resume("chat-s", &token).await.unwrap();
    assert_eq!(stop("chat-s", &token).await.unwrap().status(), 204);
    for resp in [running, follower] {
        let parts = read_parts(resp).await;
        assert!(text(&parts).len() < 200);
        let end = ending(&parts);
        assert_eq!(end[end.len() - 2], json!({"type": "abort"}));
    }
    assert_eq!(resume("chat-s", &token).await.unwrap().status(), 204);
}

#[tokio::test]
async fn requests_are_checked_before_anything_starts() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let cases = [
        (body("c", "gpt-9", "x"), 404, "model_not_found"),
        (json!({"id": "c", "messages": []}), 400, "bad_request"),
        (json!({"messages": [{"role": "user", "parts": []}]}), 400, "bad_request"),
        (json!({"id": "", "messages": [{"role": "user", "parts": []}]}), 400, "bad_request"),
        (json!({"id": "c", "messages": [{"role": "tool", "parts": []}]}), 400, "bad_request"),
        (
            json!({"id": "c", "trigger": "resume-stream", "messages": [{"role": "user", "parts": []}]}),
            400,
            "bad_request",
        ),
    ];
    for (body, status, code) in cases {
        let resp = post_chat(&app, &token, &body).await;
        assert_eq!(resp.status(), status, "{body}");
        let problem: Value = resp.json().await.unwrap();
        assert_eq!(problem["code"], code, "{body}");
    }
    let resp = post_chat(&app, &app.token("alice", "publish"), &body("c", "echo", "x")).await;
    assert_eq!(resp.status(), 403);
    let resp = app.client.post(format!("{}/v1/ui/chat", app.base)).json(&body("c", "echo", "x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

/// `node` and the `ai` package that `scripts/test.sh` installs in
/// `tests/node` (`npm ci --prefix tests/node`).
fn node() -> String {
    let node = std::env::var("TOKENGATE_TEST_NODE").unwrap_or_else(|_| "node".to_owned());
    let version = std::process::Command::new(&node).arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "`{node}` (Node.js 18 or later) is required for the AI SDK test: install it (scripts/test.sh does), or set TOKENGATE_TEST_NODE"
    );
    assert!(
        std::path::Path::new("tests/node/node_modules/ai/package.json").exists(),
        "the `ai` npm package is required in tests/node: run scripts/test.sh, or `npm ci --prefix tests/node`"
    );
    node
}

#[tokio::test]
async fn the_ai_sdk_client_reads_and_resumes_through_tokengate() {
    let node = node();
    let mut settings = base_settings();
    // Paced, so that the client can cut a stream and resume it while it
    // runs; heartbeats between deltas show that the SDK skips comments.
    settings.pace_ms = Some(25);
    settings.heartbeat = Some("10ms".into());
    settings.detach_grace = Some("10s".into());
    let app = spawn_app_with(settings).await;
    let expected = "CJK 你好世界, ZWJ 👩‍👩‍👧 and 🏳️‍🌈, combining e\u{301} a\u{308}\u{332}, CRLF \r\nend.";
    let token = app.token("sdk-user", "stream");
    run_client_check(&node, "tests/node/ai_sdk_check.mjs", &app, &token, &[("EXPECTED_TEXT", expected)], "ai sdk ok")
        .await;
}

#[tokio::test]
async fn with_redis_a_chat_opened_on_one_replica_resumes_and_stops_on_another() {
    let redis = crate::redis::RedisServer::start();
    let settings = || {
        let mut s = base_settings();
        s.redis_url = Some(redis.url());
        s.detach_grace = Some("10s".into());
        s.pace_ms = Some(20);
        s
    };
    let (a, b) = (spawn_app_with(settings()).await, spawn_app_with(settings()).await);
    for app in [&a, &b] {
        let mut tries = 0;
        while app.get("/readyz", None).await.status() != 200 {
            tries += 1;
            assert!(tries < 200, "replica never became ready");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let token = a.token("alice", "stream");
    // A replica may still refuse while its cancel listener connects (503).
    let post = |app: &TestApp, chat: &str, text: &str| {
        let (client, url, body) = (app.client.clone(), format!("{}/v1/ui/chat", app.base), body(chat, "echo", text));
        let token = token.clone();
        async move {
            for _ in 0..200 {
                let resp = client.post(&url).bearer_auth(&token).json(&body).send().await.unwrap();
                if resp.status() == 200 {
                    return resp;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("the replica never accepted the chat");
        }
    };
    let on = |app: &TestApp, chat: &str, action: &str| {
        let url = format!("{}/v1/ui/chat/{chat}/{action}", app.base);
        let req = if action == "stop" { app.client.post(url) } else { app.client.get(url) };
        req.bearer_auth(&token).send()
    };

    let prompt = "across replicas 你好 👩‍👩‍👧 e\u{301}";
    drop(post(&a, "chat-x", prompt).await);
    let replay = read_parts(on(&b, "chat-x", "stream").await.unwrap()).await;
    assert_eq!(text(&replay).concat(), prompt);
    assert_eq!(ending(&replay)[3], json!({"type": "finish", "finishReason": "stop"}));
    assert_eq!(on(&b, "chat-x", "stream").await.unwrap().status(), 204, "finished: 204 on any replica");

    let running = post(&a, "chat-y", &"y".repeat(300)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(on(&b, "chat-y", "stop").await.unwrap().status(), 204);
    let parts = read_parts(running).await;
    let end = ending(&parts);
    assert_eq!(end[end.len() - 2], json!({"type": "abort"}), "stopped from the other replica");
}
