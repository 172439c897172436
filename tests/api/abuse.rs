//! Abuse that must stay bounded (issue 16), in memory: a request body sent
//! one byte at a time.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(10);

/// `POST /v1/channels/{channel}` as `subject`.
pub async fn publish_as(app: &TestApp, subject: &str, channel: &str, data: Value) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/channels/{channel}", app.base))
        .bearer_auth(app.token(subject, "publish"))
        .json(&json!({ "data": data }))
        .send()
        .await
        .unwrap()
}

/// Writes `head` and then the body one byte every 100 ms (until the
/// answer arrives), and returns what the server answered before it closed
/// the connection (bounded).
async fn drip_body(app: &TestApp, head: String) -> String {
    let tcp = TcpStream::connect(app.addr).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    write.write_all(head.as_bytes()).await.unwrap();
    let dripping = tokio::spawn(async move {
        for _ in 0..1000 {
            if write.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, read.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                dripping.abort();
            }
            Err(_) => panic!("no answer and no close: {}", String::from_utf8_lossy(&out)),
        }
    }
    dripping.abort();
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body of a raw HTTP/1.1 answer with a `content-length`.
fn json_of(answer: &str) -> Value {
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[tokio::test]
async fn a_body_sent_byte_by_byte_is_answered_408_in_the_routes_shape_and_the_connection_closed() {
    let mut settings = base_settings();
    settings.body_timeout = Some("1s".into());
    let app = spawn_app_with(settings).await;
    let head = |path: &str, scope: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n",
            app.token("alice", scope)
        )
    };
    let answer = drip_body(&app, head("/v1/channels/room", "publish")).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("content-type: application/problem+json"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    let problem = json_of(&answer);
    assert_eq!((problem["status"].as_u64(), problem["code"].as_str()), (Some(408), Some("body_timeout")), "{problem}");
    // The OpenAI route answers in the shape its SDK parses.
    let answer = drip_body(&app, head("/v1/chat/completions", "stream")).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(json_of(&answer)["error"]["code"], "body_timeout", "{answer}");
    assert_eq!(app.metric("tokengate_refusals_total{reason=\"body_timeout\"}").await, 2.0);
    // A body that arrives in time is unaffected.
    assert_eq!(publish_as(&app, "alice", "room", json!(1)).await.status(), 200);
}
