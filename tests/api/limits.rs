//! Limits against the real server: rates, stream caps, slow consumers,
//! input and connection bounds, and a bounded stress run. Every refusal is
//! checked for status, headers and body, and that no generator ran.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokengate::sse::{Event, Parser};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(10);

fn is_delta(e: &Event) -> bool {
    matches!(e, Event::Message { event, .. } if event == "delta")
}

#[tokio::test]
async fn subject_rate_limit_is_429_with_ratelimit_headers() {
    let mut settings = base_settings();
    settings.rate_subject_per_min = Some(60);
    settings.rate_subject_burst = Some(3);
    let app = spawn_app_with(settings).await;
    let alice = app.token("alice", "stream");
    for _ in 0..3 {
        let resp = app.get("/v1/stream?generator=echo&prompt=a", Some(&alice)).await;
        assert_eq!(resp.status(), 200);
        read_events(resp, LIMIT).await;
    }
    let headers =
        problem(app.get("/v1/stream?generator=probe&prompt=a", Some(&alice)).await, 429, "rate_limited_subject").await;
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "one request per second refills: {retry}");
    assert_eq!(headers["ratelimit-limit"], "3");
    assert_eq!(headers["ratelimit-remaining"], "0");
    assert_eq!(headers["ratelimit-reset"].to_str().unwrap(), retry.to_string());
    // Other subjects have their own budget; no generator ran for the refusal.
    assert_eq!(app.get("/v1/stream?generator=echo&prompt=a", Some(&app.token("bob", "stream"))).await.status(), 200);
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 0);
    assert_eq!(app.metric("tokengate_refusals_total{reason=\"rate_limited_subject\"}").await, 1.0);
}

#[tokio::test]
async fn ip_rate_limit_also_throttles_token_guessing() {
    let mut settings = base_settings();
    settings.rate_ip_per_min = Some(60);
    settings.rate_ip_burst = Some(3);
    let app = spawn_app_with(settings).await;
    for guess in ["a.b.c", "x", "y"] {
        assert_eq!(app.get("/v1/stream?generator=probe", Some(guess)).await.status(), 401);
    }
    // Even a good token is refused now: the guesses used the IP's budget.
    let headers = problem(app.stream("generator=probe&prompt=x").await, 429, "rate_limited_ip").await;
    assert!(headers.contains_key("retry-after"));
    assert_eq!(headers["ratelimit-limit"], "3");
    // Probes and metrics are not API routes and stay reachable.
    assert_eq!(app.get("/healthz", None).await.status(), 200);
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 0);
    assert_eq!(app.metric("tokengate_auth_failures_total{reason=\"malformed_token\"}").await, 3.0);
    assert_eq!(app.metric("tokengate_refusals_total{reason=\"rate_limited_ip\"}").await, 1.0);
}

async fn get_from(app: &TestApp, header: (&str, &str)) -> u16 {
    app.client
        .get(format!("{}/v1/stream?generator=echo&prompt=a", app.base))
        .bearer_auth(app.token("alice", "stream"))
        .header(header.0, header.1)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn forwarded_addresses_count_only_behind_trusted_proxies() {
    let mut settings = base_settings();
    settings.rate_ip_per_min = Some(60);
    settings.rate_ip_burst = Some(2);
    let untrusting = spawn_app_with(settings.clone()).await;
    assert_eq!(get_from(&untrusting, ("x-forwarded-for", "1.1.1.1")).await, 200);
    assert_eq!(get_from(&untrusting, ("x-forwarded-for", "2.2.2.2")).await, 200);
    // Spoofed headers do not buy a fresh budget: all three are 127.0.0.1.
    assert_eq!(get_from(&untrusting, ("x-forwarded-for", "3.3.3.3")).await, 429);

    settings.trusted_proxies = Some(vec!["127.0.0.1".into()]);
    let behind_proxy = spawn_app_with(settings).await;
    assert_eq!(get_from(&behind_proxy, ("x-forwarded-for", "1.1.1.1")).await, 200);
    assert_eq!(get_from(&behind_proxy, ("x-forwarded-for", "1.1.1.1")).await, 200);
    assert_eq!(get_from(&behind_proxy, ("x-forwarded-for", "1.1.1.1")).await, 429);
    assert_eq!(get_from(&behind_proxy, ("x-forwarded-for", "2.2.2.2")).await, 200);
    assert_eq!(get_from(&behind_proxy, ("forwarded", "for=\"[2001:db8::7]:443\";proto=https")).await, 200);
}

/// Opens a probe stream and waits for its first delta, so it is surely open.
async fn open_probe(
    app: &TestApp,
    sub: &str,
) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin {
    let resp = app.get("/v1/stream?generator=probe&prompt=xy", Some(&app.token(sub, "stream"))).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    read_until(&mut body, &mut Parser::new(), LIMIT, is_delta).await;
    body
}

#[tokio::test]
async fn per_subject_stream_cap_frees_its_slot_when_a_client_leaves() {
    let mut settings = base_settings();
    settings.max_streams_per_subject = Some(2);
    let app = spawn_app_with(settings).await;
    let first = open_probe(&app, "alice").await;
    let _second = open_probe(&app, "alice").await;
    let headers = problem(
        app.get("/v1/stream?generator=probe", Some(&app.token("alice", "stream"))).await,
        429,
        "too_many_streams",
    )
    .await;
    assert!(headers.contains_key("retry-after"));
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 2, "no generator for the refused stream");
    // Another subject is not affected.
    let _bob = open_probe(&app, "bob").await;
    // Dropping a client connection frees its slot.
    drop(first);
    eventually(LIMIT, "alice's slot freed", || app.state.slots.open() == 2).await;
    let _third = open_probe(&app, "alice").await;
    assert_eq!(app.metric("tokengate_refusals_total{reason=\"too_many_streams\"}").await, 1.0);
}

#[tokio::test]
async fn global_stream_cap_is_503() {
    let mut settings = base_settings();
    settings.max_streams = Some(2);
    let app = spawn_app_with(settings).await;
    let _a = open_probe(&app, "a").await;
    let _b = open_probe(&app, "b").await;
    let headers =
        problem(app.get("/v1/stream?generator=probe", Some(&app.token("c", "stream"))).await, 503, "server_busy").await;
    assert!(headers.contains_key("retry-after"));
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 2);
    assert_eq!(app.metric("tokengate_open_streams").await, 2.0);
}

#[tokio::test]
async fn a_reader_that_stops_is_backpressured_then_ended_as_slow_consumer() {
    let mut settings = base_settings();
    settings.send_queue = Some(8);
    settings.max_lag = Some("1s".into());
    let app = spawn_app_with(settings).await;
    let resp = app.stream("generator=firehose").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    read_until(&mut body, &mut parser, LIMIT, is_delta).await;
    // Stop reading. The queue, hyper's buffer and the sockets fill up; the
    // generator stops being polled; after max_lag the stream is ended.
    eventually(LIMIT, "slow consumer ended", || app.firehose.dropped.load(Ordering::SeqCst) == 1).await;
    assert_eq!(app.state.slots.open(), 0, "slot freed without the client reading");
    let pulls = app.firehose_pulls.load(Ordering::SeqCst);
    // Reading again at once (the connection's own stalled-write cutoff,
    // 2 x max_lag, is not far off): everything queued, then the terminal
    // error, no gap. The metrics are looked at afterwards.
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        events.extend(parser.feed(&chunk.unwrap()));
    }
    eprintln!("firehose chunks pulled before the end: {pulls}");
    // 10 deltas of ~60 bytes per chunk: the socket buffers hold a few MB at
    // most, so a bounded pipeline pulls at most tens of thousands of chunks.
    assert!(pulls < 200_000, "generator kept running for a client that did not read: {pulls} chunks");
    assert!(app.metric("tokengate_send_queue_high_water_events").await <= 8.0);
    assert_eq!(app.metric("tokengate_refusals_total{reason=\"slow_consumer\"}").await, 1.0);
    let msgs = messages(&events);
    let (last, data, _) = msgs.last().unwrap();
    assert_eq!(last, "error");
    assert_eq!(data["code"], "slow_consumer");
    assert_eq!(app.firehose_pulls.load(Ordering::SeqCst), pulls, "nothing pulled after the end");
}

#[tokio::test]
async fn message_count_and_stream_duration_are_bounded() {
    let mut settings = base_settings();
    settings.max_messages = Some(3);
    settings.max_stream_duration = Some("300ms".into());
    let app = spawn_app_with(settings).await;
    let messages: Vec<Value> = (0..4).map(|i| json!({"role": "user", "content": format!("m{i}")})).collect();
    let resp = app
        .client
        .post(format!("{}/v1/stream", app.base))
        .bearer_auth(app.token("alice", "stream"))
        .json(&json!({"generator": "probe", "messages": messages}))
        .send()
        .await
        .unwrap();
    problem(resp, 413, "too_many_messages").await;
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 0);

    let events = read_events(app.stream("generator=probe&prompt=ab").await, LIMIT).await;
    let msgs = crate::helpers::messages(&events);
    let (last, data, _) = msgs.last().unwrap();
    assert_eq!(last, "error");
    assert_eq!(data["code"], "max_duration");
    eventually(LIMIT, "generator dropped", || app.probe.dropped.load(Ordering::SeqCst) == 1).await;
    eventually(LIMIT, "slot freed", || app.state.slots.open() == 0).await;
}

async fn raw_request(app: &TestApp, head: &str) -> String {
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let mut settings = base_settings();
    settings.max_header_bytes = Some(8192);
    let app = spawn_app_with(settings).await;
    let ok = raw_request(&app, "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let big = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\nconnection: close\r\n\r\n", "a".repeat(10_000));
    let answer = raw_request(&app, &big).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(app.metric("tokengate_refusals_total{reason=\"header_too_large\"}").await, 1.0);
}

#[tokio::test]
async fn slow_loris_headers_are_cut_off() {
    let mut settings = base_settings();
    settings.header_timeout = Some("300ms".into());
    let app = spawn_app_with(settings).await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    // Trickle one header byte every 100 ms; the server must hang up.
    let started = tokio::time::Instant::now();
    let mut closed = false;
    for _ in 0..50 {
        if tcp.write_all(b"x").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {} // an error response (408) may precede the close
            Err(_) => {}
        }
    }
    assert!(closed, "connection still open after {:?}", started.elapsed());
    assert_eq!(app.metric("tokengate_refusals_total{reason=\"header_timeout\"}").await, 1.0);
    // A kept-alive connection that sits idle after a request is closed by
    // the same timer, and that is not counted as a refusal.
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let read = tokio::time::timeout(LIMIT, idle.read(&mut buf)).await.expect("idle connection closed");
    assert!(matches!(read, Ok(0) | Err(_)));
    assert_eq!(app.metric("tokengate_refusals_total{reason=\"header_timeout\"}").await, 1.0);
}

#[tokio::test]
async fn connections_over_the_cap_get_503_until_one_closes() {
    let mut settings = base_settings();
    settings.max_connections = Some(2);
    let app = spawn_app_with(settings).await;
    let idle1 = TcpStream::connect(app.addr).await.unwrap();
    let _idle2 = TcpStream::connect(app.addr).await.unwrap();
    // Let the server accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = raw_request(&app, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("connection_limit"), "{refused}");
    assert!(refused.to_ascii_lowercase().contains("retry-after: 1"));
    drop(idle1);
    let mut served = String::new();
    for _ in 0..50 {
        served = raw_request(&app, "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        if served.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert!(app.metric("tokengate_refusals_total{reason=\"connection_limit\"}").await >= 1.0);
}

#[tokio::test]
async fn stress_more_streams_than_slots_with_abrupt_disconnects() {
    let mut settings = base_settings();
    settings.max_streams = Some(20);
    settings.max_streams_per_subject = Some(3);
    let app = std::sync::Arc::new(spawn_app_with(settings).await);
    let mut tasks = Vec::new();
    for i in 0..240u64 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let sub = format!("user{}", i % 40);
            let token = app.token(&sub, "stream");
            let fut = app.get("/v1/stream?generator=probe&prompt=hello", Some(&token));
            match i % 4 {
                // Abandon the request before (or while) it is answered.
                0 => {
                    let _ = tokio::time::timeout(Duration::from_millis(i % 7), fut).await;
                    0
                }
                _ => {
                    let resp = fut.await;
                    let status = resp.status().as_u16();
                    if status == 200 {
                        let mut body = resp.bytes_stream();
                        let _ = tokio::time::timeout(Duration::from_millis(5 * (i % 10)), body.next()).await;
                        // Dropped here: an abrupt disconnect mid-stream.
                    } else {
                        let code = resp.json::<Value>().await.unwrap()["code"].as_str().unwrap().to_owned();
                        assert!(code == "too_many_streams" || code == "server_busy", "{status} {code}");
                    }
                    status
                }
            }
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(tokio::time::timeout(LIMIT * 3, t).await.expect("bounded").unwrap());
    }
    assert!(statuses.contains(&200));
    assert!(statuses.iter().any(|s| *s == 429 || *s == 503), "the caps were reached: {statuses:?}");
    eventually(LIMIT, "all slots free", || app.state.slots.open() == 0).await;
    eventually(LIMIT, "every generator dropped", || {
        app.probe.dropped.load(Ordering::SeqCst) == app.probe.started.load(Ordering::SeqCst)
    })
    .await;
    assert_eq!(app.state.slots.subjects(), 0, "per-subject table emptied");
    assert_eq!(app.metric("tokengate_open_streams").await, 0.0);
}
