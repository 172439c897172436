//! HTTP/1.1 on one raw connection: tokengate answers bodiless `GET`s
//! itself (`server/h1.rs`) and hands the connection to hyper at the first
//! other request. Keep-alive, pipelining, `Connection: close` and the hand
//! over must all hold, byte for byte as a client reads them.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(10);

/// Reads from `conn` into `buf` until it holds `what` `count` times
/// (bounded by `LIMIT`).
async fn read_until(conn: &mut TcpStream, buf: &mut Vec<u8>, what: &str, count: usize) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while String::from_utf8_lossy(buf).matches(what).count() < count {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!("timed out waiting for {count} x {what:?} in:\n{}", String::from_utf8_lossy(buf))
            })
            .unwrap();
        assert!(n > 0, "closed early:\n{}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn get(path: &str, token: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n{extra}\r\n")
}

/// The `delta` texts of an event-stream body that arrived chunked.
fn deltas(response: &str) -> String {
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let mut text = String::new();
    for line in body.lines() {
        if let Some(data) = line.strip_prefix("data: ")
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(data)
            && let Some(t) = v["text"].as_str()
        {
            text.push_str(t);
        }
    }
    text
}

#[tokio::test]
async fn streams_follow_each_other_on_one_connection_and_hyper_takes_over_at_a_post() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    let mut buf = Vec::new();
    for (i, prompt) in ["hello", "again"].into_iter().enumerate() {
        conn.write_all(get(&format!("/v1/stream?generator=echo&prompt={prompt}"), &token, "").as_bytes())
            .await
            .unwrap();
        read_until(&mut conn, &mut buf, "\r\n0\r\n\r\n", i + 1).await;
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let responses: Vec<&str> = text.split("HTTP/1.1 ").filter(|r| !r.is_empty()).collect();
    assert_eq!(responses.len(), 2, "{text}");
    for (response, prompt) in responses.iter().zip(["hello", "again"]) {
        assert!(response.starts_with("200 OK\r\n"), "{response}");
        let head = response.split_once("\r\n\r\n").map(|(h, _)| h).unwrap_or_default();
        assert!(head.contains("\r\ntransfer-encoding: chunked"), "{head}");
        assert!(head.contains("\r\ncontent-type: text/event-stream"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        // Each event in its own chunk: dechunked by hand, the text is whole.
        assert_eq!(deltas(&dechunked(response)), prompt);
    }

    // A request with a body: hyper serves it, and the rest of the connection.
    let body = r#"{"generator":"echo","prompt":"posted"}"#;
    let post = format!(
        "POST /v1/stream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(post.as_bytes()).await.unwrap();
    read_until(&mut conn, &mut buf, "\r\n0\r\n\r\n", 3).await;
    conn.write_all(get("/v1/stream?generator=echo&prompt=after", &token, "").as_bytes()).await.unwrap();
    read_until(&mut conn, &mut buf, "\r\n0\r\n\r\n", 4).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let responses: Vec<&str> = text.split("HTTP/1.1 ").filter(|r| !r.is_empty()).collect();
    assert_eq!(responses.len(), 4, "{text}");
    assert_eq!(deltas(&dechunked(responses[2])), "posted");
    assert_eq!(deltas(&dechunked(responses[3])), "after");
    // This connection, and the one of the `/metrics` request itself.
    assert_eq!(app.metric("tokengate_connections_total{protocol=\"http1\"}").await, 2.0, "one connection for all");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_errors_keep_the_connection() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    let both = get("/v1/stream?generator=echo&prompt=first", &token, "")
        + &get("/v1/nowhere", &token, "")
        + &get("/v1/stream?generator=echo&prompt=second", &token, "");
    conn.write_all(both.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    read_until(&mut conn, &mut buf, "\r\n0\r\n\r\n", 2).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let responses: Vec<&str> = text.split("HTTP/1.1 ").filter(|r| !r.is_empty()).collect();
    assert_eq!(responses.len(), 3, "{text}");
    assert_eq!(deltas(&dechunked(responses[0])), "first");
    assert!(responses[1].starts_with("404 Not Found\r\n"), "{}", responses[1]);
    let (head, body) = responses[1].split_once("\r\n\r\n").unwrap_or_default();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("a known-length body says so: {head}"));
    assert_eq!(body.len(), length, "{body}");
    assert_eq!(deltas(&dechunked(responses[2])), "second");
}

#[tokio::test]
async fn connection_close_is_honoured_and_said() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    conn.write_all(get("/v1/stream?generator=echo&prompt=bye", &token, "connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(LIMIT, conn.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server did not close the connection");
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n0\r\n\r\n"), "{text}");
    assert_eq!(deltas(&dechunked(&text)), "bye");
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_detaches_it() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    // Paced: 100 characters at 200 ms would run for 20 s.
    let prompt = "a".repeat(100);
    conn.write_all(get(&format!("/v1/stream?generator=echo&prompt={prompt}&pace_ms=200"), &token, "").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    read_until(&mut conn, &mut buf, "event: delta", 1).await;
    assert_eq!(app.state.slots.open(), 1);
    drop(conn);
    // No detach grace in the test settings: gone is cancelled at once.
    eventually(Duration::from_secs(5), "the stream ends when its only client hangs up", || app.state.slots.open() == 0)
        .await;
}

#[tokio::test]
async fn a_get_streams_from_its_connections_task_and_a_post_from_a_task_of_its_own() {
    let app = spawn_app().await;
    let token = app.token("alice", "stream");
    // A GET is served on tokengate's own path, which polls the producer.
    let resp = app.stream("generator=echo&prompt=inline").await;
    assert_eq!(delta_text(&read_events(resp, LIMIT).await), "inline");
    // A POST is hyper's: its producer is spawned.
    let resp = app
        .client
        .post(format!("{}/v1/stream", app.base))
        .bearer_auth(&token)
        .json(&serde_json::json!({"generator": "echo", "prompt": "spawned"}))
        .send()
        .await
        .unwrap();
    assert_eq!(delta_text(&read_events(resp, LIMIT).await), "spawned");
    assert_eq!(app.metric("tokengate_producers_total{driven=\"connection\"}").await, 1.0);
    assert_eq!(app.metric("tokengate_producers_total{driven=\"task\"}").await, 1.0);
    // Both ran to their end where they started.
    assert_eq!(app.metric("tokengate_producers_moved_total").await, 0.0);
}

/// A chunked response with its chunk framing removed (the head kept).
fn dechunked(response: &str) -> String {
    let Some((head, mut body)) = response.split_once("\r\n\r\n") else { return response.to_owned() };
    if !head.contains("transfer-encoding: chunked") {
        return response.to_owned();
    }
    let mut out = format!("{head}\r\n\r\n");
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest.get(size + 2..).unwrap_or_default();
    }
    out
}
