//! The OpenAI-compatible endpoints: the chunk stream on the wire, the
//! non-streaming answer, models, errors in the OpenAI shape, and the
//! official `openai` Python SDK as a client.

use std::time::Duration;

use serde_json::{Value, json};
use unicode_segmentation::UnicodeSegmentation;

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(15);

async fn completions(app: &TestApp, token: &str, body: Value) -> reqwest::Response {
    app.client.post(format!("{}/v1/chat/completions", app.base)).bearer_auth(token).json(&body).send().await.unwrap()
}

/// The `data:` payloads of an SSE body.
async fn data_lines(resp: reqwest::Response) -> Vec<String> {
    read_events(resp, LIMIT)
        .await
        .into_iter()
        .filter_map(|e| match e {
            tokengate::sse::Event::Message { data, .. } => Some(data),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn streaming_chunks_follow_the_openai_shape() {
    let app = spawn_app().await;
    let text = "héllo 👋🏽 世界";
    let token = app.token("alice", "stream");
    let resp = completions(
        &app,
        &token,
        json!({"model": "echo", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}], "user": "u1", "logprobs": false}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let data = data_lines(resp).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "echo");
        assert!(c["created"].as_u64().unwrap() > 1_600_000_000);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let contents: Vec<&str> =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).filter(|s| !s.is_empty()).collect();
    assert_eq!(contents, text.graphemes(true).collect::<Vec<_>>(), "one grapheme cluster per chunk");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], text.graphemes(true).count());
}

#[tokio::test]
async fn chunk_size_is_configurable_and_non_streaming_returns_one_completion() {
    let mut settings = base_settings();
    settings.openai_chunk_graphemes = Some(4);
    let app = spawn_app_with(settings).await;
    let token = app.token("alice", "stream");
    let text = "abcdefghij";
    let resp = completions(
        &app,
        &token,
        json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": text}]}),
    )
    .await;
    let data = data_lines(resp).await;
    let contents: Vec<String> = data
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(contents, ["abcd", "efgh", "ij"]);
    // No usage chunk unless asked for.
    assert!(!data.iter().any(|d| d.contains("\"usage\"")));

    let resp =
        completions(&app, &token, json!({"model": "echo", "messages": [{"role": "user", "content": text}]})).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"], json!({"role": "assistant", "content": text}));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn models_and_errors_in_the_openai_shape() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let models: Value = app.get("/v1/models", Some(&token)).await.json().await.unwrap();
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"demo") && ids.contains(&"echo"), "{ids:?}");
    assert_eq!(models["data"][0]["object"], "model");

    let cases = [
        (
            None,
            json!({"model": "echo", "messages": [{"role": "user", "content": "x"}]}),
            401,
            "authentication_error",
            "missing_token",
        ),
        (
            Some(app.token("alice", "publish")),
            json!({"model": "echo", "messages": [{"role": "user", "content": "x"}]}),
            403,
            "permission_error",
            "insufficient_scope",
        ),
        (
            Some(token.clone()),
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
            404,
            "not_found_error",
            "model_not_found",
        ),
        (Some(token.clone()), json!({"model": "echo", "messages": []}), 400, "invalid_request_error", "bad_request"),
        (
            Some(token.clone()),
            json!({"model": "echo", "n": 2, "messages": [{"role": "user", "content": "x"}]}),
            400,
            "invalid_request_error",
            "bad_request",
        ),
        (
            Some(token.clone()),
            json!({"messages": [{"role": "user", "content": "x"}]}),
            400,
            "invalid_request_error",
            "bad_request",
        ),
    ];
    for (token, body, status, kind, code) in cases {
        let mut req = app.client.post(format!("{}/v1/chat/completions", app.base)).json(&body);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), status, "{body}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["type"], kind, "{err}");
        assert_eq!(err["error"]["code"], code, "{err}");
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    let resp = app.get("/v1/models", None).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["type"], "authentication_error");
}

#[tokio::test]
async fn the_official_openai_python_sdk_streams_through_tokengate() {
    let python = python_with("openai");
    let app = spawn_app().await;
    let expected = "The SDK says: 你好, 👩‍👩‍👧 and e\u{301}.";
    let token = app.token("sdk-user", "stream");
    let env = [("EXPECTED_TEXT", expected)];
    run_client_check(&python, "tests/python/openai_sdk_check.py", &app, &token, &env, "openai sdk ok").await;
}
