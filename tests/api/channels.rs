//! Channels: subscribe, publish, history replay, gaps, validation, scopes.

use std::time::Duration;

use serde_json::{Value, json};
use tokengate::sse::{Event, Parser};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(10);

async fn publish(app: &TestApp, channel: &str, body: Value) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/channels/{channel}", app.base))
        .bearer_auth(app.token("publisher", "publish"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn is_named(name: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Message { event, .. } if event == name)
}

#[tokio::test]
async fn subscribers_get_connected_then_every_published_event() {
    let app = spawn_app().await;
    let resp = app.get("/v1/channels/news", Some(&app.token("alice", "stream"))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream; charset=utf-8");
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let first = read_until(&mut body, &mut parser, LIMIT, is_named("connected")).await;
    let (_, connected, id) = messages(&first).pop().unwrap();
    assert_eq!(connected["channel"], "news");
    assert_eq!(connected["subscriber_id"].as_str().unwrap().len(), 32);
    assert_eq!(id, None, "connected carries no id");

    let resp = publish(&app, "news", json!({"event": "alert", "data": {"level": "high", "text": "多行\nline"}})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"id": "1", "subscribers": 1}));
    let resp = publish(&app, "news", json!({"data": "plain"})).await;
    assert_eq!(resp.json::<Value>().await.unwrap()["id"], "2");

    let got = read_until(&mut body, &mut parser, LIMIT, is_named("message")).await;
    let msgs = messages(&got);
    assert_eq!(msgs[0], ("alert".to_owned(), json!({"level": "high", "text": "多行\nline"}), Some("1".to_owned())));
    assert_eq!(msgs[1], ("message".to_owned(), json!("plain"), Some("2".to_owned())));
    // Nobody on another channel.
    assert_eq!(publish(&app, "other", json!({"data": 1})).await.json::<Value>().await.unwrap()["subscribers"], 0);
}

#[tokio::test]
async fn last_event_id_replays_missed_history_and_gaps_are_announced() {
    let mut settings = base_settings();
    settings.channel_max_events = Some(3);
    let app = spawn_app_with(settings).await;
    for i in 1..=3 {
        publish(&app, "feed", json!({"data": i})).await;
    }
    let token = app.token("alice", "stream");
    let resp = app
        .client
        .get(format!("{}/v1/channels/feed", app.base))
        .bearer_auth(&token)
        .header("last-event-id", "1")
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let got =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { id: Some(id), .. } if id == "3"))
            .await;
    let data: Vec<Value> = messages(&got).into_iter().filter(|m| m.0 == "message").map(|m| m.1).collect();
    assert_eq!(data, [json!(2), json!(3)]);
    drop(body);
    // Three more: the log (3 events) no longer holds 2..3 for a client at 1.
    for i in 4..=6 {
        publish(&app, "feed", json!({"data": i})).await;
    }
    let resp = app.get("/v1/channels/feed?last_event_id=1", Some(&token)).await;
    let mut body = resp.bytes_stream();
    let got = read_until(
        &mut body,
        &mut Parser::new(),
        LIMIT,
        |e| matches!(e, Event::Message { id: Some(id), .. } if id == "6"),
    )
    .await;
    let msgs = messages(&got);
    let kinds: Vec<&str> = msgs.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(kinds, ["connected", "gap", "message", "message", "message"]);
    assert_eq!(msgs[1].1["code"], "resume_gap");
    assert_eq!(msgs[1].1["first_id"], "4");
}

#[tokio::test]
async fn heartbeats_while_idle() {
    let mut settings = base_settings();
    settings.heartbeat = Some("100ms".into());
    let app = spawn_app_with(settings).await;
    let resp = app.get("/v1/channels/quiet", Some(&app.token("alice", "stream"))).await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    for _ in 0..2 {
        read_until(&mut body, &mut parser, LIMIT, |e| *e == Event::Comment("keep-alive".into())).await;
    }
}

#[tokio::test]
async fn validation_and_scopes() {
    let mut settings = base_settings();
    settings.max_publish_bytes = Some(100);
    let app = spawn_app_with(settings).await;
    let cases = [
        ("bad name!", json!({"data": 1}), 400, "bad_request"),
        (&"x".repeat(65), json!({"data": 1}), 400, "bad_request"),
        ("ok", json!({"event": "a\nb", "data": 1}), 400, "bad_request"),
        ("ok", json!({"event": "", "data": 1}), 400, "bad_request"),
        ("ok", json!({"event": "x"}), 400, "bad_request"),
        ("ok", json!({"event": "connected", "data": 1}), 400, "bad_request"),
        ("ok", json!({"data": "y".repeat(200)}), 413, "payload_too_large"),
    ];
    for (channel, body, status, code) in cases {
        let resp = publish(&app, &urlencode(channel), body.clone()).await;
        assert_eq!(resp.status(), status, "{channel} {body}");
        assert_eq!(resp.json::<Value>().await.unwrap()["code"], code);
    }
    // Publishing needs `publish`; subscribing needs `stream`.
    let resp = app
        .client
        .post(format!("{}/v1/channels/ok", app.base))
        .bearer_auth(app.token("a", "stream"))
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(app.get("/v1/channels/ok", Some(&app.token("a", "publish"))).await.status(), 403);
    assert_eq!(app.get("/v1/channels/ok", None).await.status(), 401);
    assert_eq!(app.get("/v1/channels/ok?last_event_id=abc", Some(&app.token("a", "stream"))).await.status(), 400);
}

#[tokio::test]
async fn subscriptions_end_at_the_maximum_duration_and_resume_without_loss() {
    let mut settings = base_settings();
    settings.max_stream_duration = Some("400ms".into());
    let app = spawn_app_with(settings).await;
    let token = app.token("alice", "stream");
    publish(&app, "timed", json!({"data": "one"})).await;
    let events = read_events(app.get("/v1/channels/timed?last_event_id=0", Some(&token)).await, LIMIT).await;
    let last = messages(&events).last().unwrap().2.clone().unwrap();
    assert_eq!(last, "1");
    publish(&app, "timed", json!({"data": "two"})).await;
    let events =
        read_events(app.get(&format!("/v1/channels/timed?last_event_id={last}"), Some(&token)).await, LIMIT).await;
    let data: Vec<Value> = messages(&events).into_iter().filter(|m| m.0 == "message").map(|m| m.1).collect();
    assert_eq!(data, [json!("two")]);
}

/// Fuzz finding: `.` and `..` passed the name check, though URL handling
/// resolves them away (an HTTP client library cannot even send them: raw TCP).
#[tokio::test]
async fn dot_segment_channel_names_are_refused() {
    let app = spawn_app().await;
    for name in [".", ".."] {
        for (method, scope) in [("GET", "stream"), ("POST", "publish")] {
            let mut tcp = TcpStream::connect(app.addr).await.unwrap();
            let request = format!(
                "{method} /v1/channels/{name} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 10\r\nconnection: close\r\n\r\n{{\"data\":1}}",
                app.token("alice", scope)
            );
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(LIMIT, tcp.read_to_end(&mut out)).await.unwrap().unwrap();
            let answer = String::from_utf8_lossy(&out);
            assert!(answer.starts_with("HTTP/1.1 400"), "{method} {name}: {answer}");
            assert!(answer.contains("\"code\":\"bad_request\""), "{answer}");
        }
    }
}

/// Fuzz finding: an empty `Last-Event-ID` header hid the query's position.
#[tokio::test]
async fn an_empty_last_event_id_header_leaves_the_channel_query_position() {
    let app = spawn_app().await;
    for i in 1..=3 {
        publish(&app, "feed", json!({"data": i})).await;
    }
    let resp = app
        .client
        .get(format!("{}/v1/channels/feed?last_event_id=1", app.base))
        .bearer_auth(app.token("alice", "stream"))
        .header("last-event-id", "")
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let got = read_until(
        &mut body,
        &mut Parser::new(),
        LIMIT,
        |e| matches!(e, Event::Message { id: Some(id), .. } if id == "3"),
    )
    .await;
    let data: Vec<Value> = messages(&got).into_iter().filter(|m| m.0 == "message").map(|m| m.1).collect();
    assert_eq!(data, [json!(2), json!(3)]);
}
