//! The OpenAI Responses API: the event sequence on the wire, its endings,
//! replay by sequence number, the non-streaming object, cancel, errors in
//! the OpenAI shape, and the official `openai` Python SDK as a client.

use std::time::Duration;

use serde_json::{Value, json};
use unicode_segmentation::UnicodeSegmentation;

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(15);
const HOSTILE: &str = "你好, 👩‍👩‍👧 and e\u{301}\r\nok";

async fn create(app: &TestApp, token: &str, body: Value) -> reqwest::Response {
    app.client.post(format!("{}/v1/responses", app.base)).bearer_auth(token).json(&body).send().await.unwrap()
}

/// `(event name, data)` of an SSE body.
async fn events(resp: reqwest::Response) -> Vec<(String, Value)> {
    messages(&read_events(resp, LIMIT).await).into_iter().map(|(e, d, _)| (e, d)).collect()
}

fn deltas(events: &[(String, Value)]) -> Vec<String> {
    events
        .iter()
        .filter(|(e, _)| e == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap().to_owned())
        .collect()
}

const TERMINALS: [&str; 4] = ["response.completed", "response.failed", "response.incomplete", "error"];

fn terminal(events: &[(String, Value)]) -> &(String, Value) {
    let terminals: Vec<_> = events.iter().filter(|(e, _)| TERMINALS.contains(&e.as_str())).collect();
    assert_eq!(terminals.len(), 1, "exactly one terminal event: {events:?}");
    assert_eq!(events.last(), terminals.first().copied(), "the terminal event is the last");
    terminals[0]
}

#[tokio::test]
async fn a_streamed_response_has_the_sdk_order_and_the_exact_text() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let resp = create(&app, &token, json!({"model": "echo", "input": HOSTILE, "stream": true, "store": true})).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = events(resp).await;
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i as u64, "strictly increasing from 0");
    }
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names[..4],
        ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    );
    assert_eq!(
        names[names.len() - 4..],
        ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    );
    assert_eq!(deltas(&events), HOSTILE.graphemes(true).collect::<Vec<_>>(), "one grapheme cluster per delta");
    let (_, completed) = terminal(&events);
    let response = &completed["response"];
    assert_eq!(response["status"], "completed");
    assert!(response["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(response["id"], events[0].1["response"]["id"], "one response id throughout");
    assert_eq!(response["output"][0]["content"][0]["text"], HOSTILE);
    assert_eq!(response["usage"]["output_tokens"], HOSTILE.graphemes(true).count());
    // Streams are counted by the protocol they were opened with.
    assert_eq!(app.metric("tokengate_streams_opened_total{dialect=\"openai_responses\"}").await, 1.0);
    let native = app.stream("generator=echo&prompt=hi").await;
    read_events(native, LIMIT).await;
    assert_eq!(app.metric("tokengate_streams_opened_total{dialect=\"native\"}").await, 1.0);
}

#[tokio::test]
async fn a_replay_numbers_events_as_the_first_delivery_and_starting_after_skips() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let first = events(create(&app, &token, json!({"model": "echo", "input": HOSTILE, "stream": true})).await).await;
    let id = first[0].1["response"]["id"].as_str().unwrap().to_owned();
    let replay = events(app.get(&format!("/v1/responses/{id}?stream=true"), Some(&token)).await).await;
    assert_eq!(replay.len(), first.len());
    for ((a, da), (b, db)) in first.iter().zip(&replay) {
        assert_eq!((a, &da["sequence_number"]), (b, &db["sequence_number"]));
    }
    let rest = events(app.get(&format!("/v1/responses/{id}?stream=true&starting_after=5"), Some(&token)).await).await;
    assert_eq!(rest[0].1["sequence_number"], 6);
    assert_eq!(rest.len(), first.len() - 6);
    // The object, and another subject's view of it.
    let object: Value = app.get(&format!("/v1/responses/{id}"), Some(&token)).await.json().await.unwrap();
    assert_eq!(object["output"][0]["content"][0]["text"], HOSTILE);
    let foreign = app.get(&format!("/v1/responses/{id}"), Some(&app.token("mallory", "stream"))).await;
    assert_eq!(foreign.status(), 404);
    assert_eq!(foreign.json::<Value>().await.unwrap()["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn a_stream_cut_by_a_limit_ends_incomplete_and_a_cancel_fails_it() {
    let mut settings = base_settings();
    settings.pace_ms = Some(50);
    settings.max_stream_duration = Some("300ms".into());
    let app = spawn_app_with(settings).await;
    let token = app.token("alice", "stream");
    let long = "a".repeat(100);
    let cut = events(create(&app, &token, json!({"model": "echo", "input": long, "stream": true})).await).await;
    let (name, data) = terminal(&cut);
    assert_eq!(name, "response.incomplete");
    assert_eq!(data["response"]["incomplete_details"]["reason"], "max_duration");
    assert!(!deltas(&cut).is_empty() && deltas(&cut).len() < 100);

    let mut settings = base_settings();
    settings.pace_ms = Some(50);
    let app = spawn_app_with(settings).await;
    let resp = create(&app, &token, json!({"model": "echo", "input": long, "stream": true})).await;
    let mut body = resp.bytes_stream();
    let mut parser = tokengate::sse::Parser::new();
    let seen = read_until(
        &mut body,
        &mut parser,
        LIMIT,
        |e| matches!(e, tokengate::sse::Event::Message { event, .. } if event == "response.output_text.delta"),
    )
    .await;
    let id = messages(&seen)[0].1["response"]["id"].as_str().unwrap().to_owned();
    let cancelled =
        app.client.post(format!("{}/v1/responses/{id}/cancel", app.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(cancelled.status(), 200);
    assert_eq!(cancelled.json::<Value>().await.unwrap()["status"], "cancelled");
    let mut rest = Vec::new();
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout(LIMIT, futures_util::StreamExt::next(&mut body)).await {
        rest.extend(parser.feed(&chunk));
    }
    let all: Vec<(String, Value)> = messages(&[seen, rest].concat()).into_iter().map(|(e, d, _)| (e, d)).collect();
    let (name, data) = terminal(&all);
    assert_eq!(name, "response.failed");
    assert_eq!(data["response"]["status"], "cancelled");
}

#[tokio::test]
async fn the_non_streaming_answer_and_errors_use_the_openai_shapes() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let body = json!({"model": "echo", "instructions": "be exact", "max_output_tokens": 64, "temperature": 0.5,
                      "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": HOSTILE}]}]});
    let resp = create(&app, &token, body).await;
    assert_eq!(resp.status(), 200);
    let object: Value = resp.json().await.unwrap();
    assert_eq!(object["object"], "response");
    assert_eq!(object["status"], "completed");
    assert_eq!(object["model"], "echo");
    assert_eq!(object["output"][0]["content"][0]["text"], HOSTILE);

    let unknown = create(&app, &token, json!({"model": "nope", "input": "x"})).await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.json::<Value>().await.unwrap()["error"]["code"], "model_not_found");
    let bad = create(&app, &token, json!({"model": "echo", "input": 5})).await;
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.json::<Value>().await.unwrap()["error"]["type"], "invalid_request_error");
    let not_items = create(&app, &token, json!({"model": "echo", "input": [[null]], "stream": true})).await;
    assert_eq!(not_items.status(), 400, "input items are objects");
    let unauthorized = create(&app, "not-a-jwt", json!({"model": "echo", "input": "x"})).await;
    assert_eq!(unauthorized.status(), 401);
    assert_eq!(unauthorized.json::<Value>().await.unwrap()["error"]["type"], "authentication_error");
    let no_scope = create(&app, &app.token("alice", "publish"), json!({"model": "echo", "input": "x"})).await;
    assert_eq!(no_scope.status(), 403);
    let missing = app.get("/v1/responses/resp_0123456789abcdef0123456789abcdef", Some(&token)).await;
    assert_eq!(missing.status(), 404);
    let method = app.client.delete(format!("{}/v1/responses", app.base)).send().await.unwrap();
    assert_eq!(method.status(), 405);
    assert!(method.json::<Value>().await.unwrap()["error"].is_object(), "405 in the OpenAI shape too");
}

#[tokio::test]
async fn the_official_openai_python_sdk_uses_the_responses_api_through_tokengate() {
    let python = python_with("openai");
    let mut settings = base_settings();
    // Paced, and resumable after a cut.
    settings.pace_ms = Some(10);
    settings.detach_grace = Some("30s".into());
    let app = spawn_app_with(settings).await;
    let token = app.token("sdk-user", "stream");
    let env = [("EXPECTED_TEXT", HOSTILE)];
    run_client_check(&python, "tests/python/responses_sdk_check.py", &app, &token, &env, "responses sdk ok").await;
}
