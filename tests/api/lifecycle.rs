//! Stream lifecycle: heartbeats, client disconnect, graceful shutdown, and
//! the health endpoints.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokengate::sse::{Event, Parser};

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(10);

fn is_delta(e: &Event) -> bool {
    matches!(e, Event::Message { event, .. } if event == "delta")
}

#[tokio::test]
async fn heartbeats_flow_while_the_generator_is_silent() {
    let mut settings = base_settings();
    settings.heartbeat = Some("150ms".into());
    let app = spawn_app_with(settings).await;
    let resp = app.stream("generator=probe&prompt=ab").await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.extend(read_until(&mut body, &mut parser, LIMIT, |e| *e == Event::Comment("keep-alive".into())).await);
    }
    let beats = seen.iter().filter(|e| **e == Event::Comment("keep-alive".into())).count();
    assert!(beats >= 3);
    // The probe said "ab" and went silent: "a" is sent, "b" is held back
    // (a combining mark could still follow it).
    assert_eq!(delta_text(&seen), "a");
}

#[tokio::test]
async fn client_disconnect_drops_the_generator() {
    let app = spawn_app().await;
    let resp = app.stream("generator=probe&prompt=xy").await;
    let mut body = resp.bytes_stream();
    read_until(&mut body, &mut Parser::new(), LIMIT, is_delta).await;
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 1);
    assert_eq!(app.probe.dropped.load(Ordering::SeqCst), 0);
    drop(body);
    eventually(LIMIT, "generator dropped after the client left", || app.probe.dropped.load(Ordering::SeqCst) == 1)
        .await;
    eventually(LIMIT, "stream un-counted", || app.state.slots.open() == 0).await;
}

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let resp = app.get("/healthz", None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap()["status"], "ok");
    let resp = app.get("/readyz", None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap()["status"], "ready");
}

#[tokio::test]
async fn shutdown_drains_then_sends_shutdown_and_stops() {
    let mut settings = base_settings();
    settings.shutdown_grace = Some("400ms".into());
    settings.shutdown_retry = Some("1500ms".into());
    let mut app = spawn_app_with(settings).await;
    let resp = app.stream("generator=probe&prompt=hello").await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    read_until(&mut body, &mut parser, LIMIT, is_delta).await;

    app.signal_shutdown();
    eventually(LIMIT, "draining", || app.shutdown.is_draining()).await;
    // While draining: not ready, no new streams, the open one still runs.
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<serde_json::Value>().await.unwrap()["code"], "draining");
    let refused = app.stream("generator=probe&prompt=late").await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 1);
    assert_eq!(app.probe.dropped.load(Ordering::SeqCst), 0);

    // After the grace period: a retry hint, `shutdown`, end of stream.
    let mut rest = Vec::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        rest.extend(parser.feed(&chunk.unwrap()));
    }
    let tail: Vec<&Event> = rest.iter().filter(|e| !matches!(e, Event::Comment(_))).collect();
    assert_eq!(tail.len(), 2, "{rest:?}");
    assert_eq!(*tail[0], Event::Retry(1500));
    let Event::Message { event, data, .. } = tail[1] else { panic!("{tail:?}") };
    assert_eq!(event, "shutdown");
    assert_eq!(serde_json::from_str::<serde_json::Value>(data).unwrap()["retry_ms"], 1500);
    assert_eq!(app.probe.dropped.load(Ordering::SeqCst), 1);

    let result = tokio::time::timeout(LIMIT, &mut app.server).await.expect("server stopped").unwrap();
    assert!(result.is_ok());
    // The listener is closed.
    assert!(tokio::net::TcpStream::connect(app.addr).await.is_err());
}

#[tokio::test]
async fn shutdown_does_not_wait_out_the_grace_when_nothing_is_open() {
    let mut settings = base_settings();
    settings.shutdown_grace = Some("1h".into());
    let mut app = spawn_app_with(settings).await;
    // A stream that finishes on its own during the drain.
    let resp = app.stream("generator=echo&prompt=bye&pace_ms=50").await;
    app.signal_shutdown();
    let events = read_events(resp, LIMIT).await;
    assert_eq!(delta_text(&events), "bye");
    assert_eq!(messages(&events).pop().unwrap().0, "done");
    let result =
        tokio::time::timeout(LIMIT, &mut app.server).await.expect("server stopped well before the 1 h grace").unwrap();
    assert!(result.is_ok());
}
