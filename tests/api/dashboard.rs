//! The seeds' dashboards: the built-in demo feeds publish named JSON events
//! to `demo.*` channels (with history, so a late subscriber replays with
//! `Last-Event-ID`), one replica publishes when several share Redis, they
//! can be switched off, and `/dashboard` shows them.

use std::time::Duration;

use serde_json::Value;
use tokengate::sse::{Event, Parser};

use crate::helpers::*;
use crate::redis::RedisServer;

const LIMIT: Duration = Duration::from_secs(15);

fn feeds_every(ms: u64) -> tokengate::config::Settings {
    let mut s = base_settings();
    s.demo_feeds = Some(true);
    s.demo_feeds_every = Some(format!("{ms}ms"));
    s
}

fn named(events: &[Event], name: &str) -> Vec<(Value, Option<String>)> {
    messages(events).into_iter().filter(|(e, _, _)| e == name).map(|(_, d, id)| (d, id)).collect()
}

async fn subscribe(app: &TestApp, channel: &str, last_event_id: Option<&str>) -> reqwest::Response {
    let mut req =
        app.client.get(format!("{}/v1/channels/{channel}", app.base)).bearer_auth(app.token("viewer", "stream"));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

async fn read_until_count(resp: reqwest::Response, name: &str, n: usize) -> Vec<Event> {
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let mut all = Vec::new();
    while named(&all, name).len() < n {
        all.extend(
            read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == name))
                .await,
        );
    }
    all
}

#[tokio::test]
async fn each_feed_publishes_its_named_events() {
    let app = spawn_app_with(feeds_every(40)).await;
    let counter = read_until_count(subscribe(&app, "demo.counter", None).await, "count", 3).await;
    let counts: Vec<u64> = named(&counter, "count").iter().map(|(d, _)| d["counter"].as_u64().unwrap()).collect();
    assert!(counts.windows(2).all(|w| w[1] == w[0] + 1), "the counter goes up by one: {counts:?}");

    let status_resp = subscribe(&app, "demo.status", None).await;
    let mut body = status_resp.bytes_stream();
    let mut parser = Parser::new();
    let status = read_until(
        &mut body,
        &mut parser,
        LIMIT,
        |e| matches!(e, Event::Message { event, data, .. } if event == "status" && data.contains("\"done\"")),
    )
    .await;
    assert!(status.iter().any(|e| matches!(e, Event::Retry(5000))), "demo.status has its own retry hint: {status:?}");
    assert!(named(&status, "update").iter().all(|(d, _)| d["value"].is_number()));

    let metrics = read_until_count(subscribe(&app, "demo.metrics", None).await, "alert", 1).await;
    let (alert, _) = named(&metrics, "alert").pop().unwrap();
    assert_eq!(alert["status"], "alert");
    assert!(alert["value"].as_f64().unwrap() >= 90.0, "{alert}");
    assert!(named(&metrics, "metric").iter().all(|(d, _)| d["status"] == "ok"));

    let clock = read_until_count(subscribe(&app, "demo.clock", None).await, "update", 1).await;
    let (update, _) = named(&clock, "update").pop().unwrap();
    assert!(update["timestamp"].as_str().unwrap().ends_with('Z'), "{update}");
}

#[tokio::test]
async fn a_late_subscriber_replays_what_it_missed() {
    let app = spawn_app_with(feeds_every(40)).await;
    let first = read_until_count(subscribe(&app, "demo.counter", None).await, "count", 4).await;
    let seen = named(&first, "count");
    let (second, id) = seen[1].clone();
    // Back with the id of the second: the third and fourth come again,
    // exactly, before anything newer.
    let again = read_until_count(subscribe(&app, "demo.counter", id.as_deref()).await, "count", 2).await;
    let replayed: Vec<Value> = named(&again, "count").into_iter().take(2).map(|(d, _)| d).collect();
    assert_eq!(replayed, vec![seen[2].0.clone(), seen[3].0.clone()], "after {second}");
}

#[tokio::test]
async fn the_feeds_can_be_switched_off() {
    let app = spawn_app_with(base_settings()).await;
    let resp = subscribe(&app, "demo.counter", None).await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(600);
    while let Ok(Some(Ok(bytes))) = tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut body)).await {
        got.extend(parser.feed(&bytes));
    }
    assert!(named(&got, "count").is_empty(), "{got:?}");
}

#[tokio::test]
async fn with_redis_one_replica_publishes() {
    let redis = RedisServer::start();
    let settings = || {
        let mut s = feeds_every(100);
        s.redis_url = Some(redis.url());
        s
    };
    let a = spawn_app_with(settings()).await;
    let b = spawn_app_with(settings()).await;
    crate::redis::ready(&a).await;
    crate::redis::ready(&b).await;
    let events = read_until_count(subscribe(&b, "demo.counter", None).await, "count", 8).await;
    let counts: Vec<u64> = named(&events, "count").iter().map(|(d, _)| d["counter"].as_u64().unwrap()).collect();
    let mut unique = counts.clone();
    unique.dedup();
    assert_eq!(unique, counts, "each tick is published once, not once per replica: {counts:?}");
}

#[tokio::test]
async fn the_dashboard_page_is_served() {
    let app = spawn_app().await;
    let resp = app.get("/dashboard", None).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(resp.headers()["content-security-policy"].to_str().unwrap().contains("default-src 'self'"));
    let html = resp.text().await.unwrap();
    for panel in ["counter", "status", "metrics", "alerts", "clock", "chat-a", "chat-b"] {
        assert!(html.contains(&format!("data-panel=\"{panel}\"")), "{panel}");
    }
    assert!(!html.contains("access_token"), "the page puts tickets in URLs, never the token");
}

/// Per panel: its name, whether its `EventSource` is open, and the
/// updates it has shown, read from the page.
pub async fn panels(client: &fantoccini::Client) -> Vec<(String, bool, u64)> {
    let v = client
        .execute(
            "return [...document.querySelectorAll('[data-panel]')].map(p => [p.dataset.panel, p.dataset.open === '1', Number(p.dataset.count || 0)])",
            vec![],
        )
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_owned(), p[1].as_bool().unwrap(), p[2].as_u64().unwrap()))
        .collect()
}

/// Over HTTP/1.1 a browser opens at most six connections per origin: the
/// dashboard's seven `EventSource`s show it, six panels live and one
/// waiting. That states the browser's limit (HTTP/2 lifts it); it is not a
/// failure of tokengate.
#[tokio::test]
async fn over_http1_the_seventh_event_source_waits() {
    let mut settings = feeds_every(300);
    settings.rate_subject_per_min = Some(6000);
    settings.rate_subject_burst = Some(200);
    let app = spawn_app_with(settings).await;
    let token = app.token("viewer", "stream");
    let browser = crate::browser::browser_with(&[]).await;
    let client = browser.client.as_ref().unwrap();
    client.goto(&format!("{}/dashboard#token={token}", app.base)).await.unwrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let now = panels(client).await;
        if now.iter().filter(|(_, open, _)| *open).count() >= 6 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "six panels never connected: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Two seconds more (several ticks of every feed): still one waiting.
    // The chat streams take far longer than that to end and free theirs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = panels(client).await;
    let waiting: Vec<&String> = now.iter().filter(|(_, open, _)| !open).map(|(p, _, _)| p).collect();
    assert_eq!(waiting.len(), 1, "exactly one of seven waits for a connection: {now:?}");
    let (_, _, updates) = now.iter().find(|(p, _, _)| p == waiting[0]).unwrap();
    assert_eq!(*updates, 0, "the waiting panel got nothing: {now:?}");
    assert!(
        now.iter().filter(|(p, open, _)| *open && p != "alerts").all(|(_, _, n)| *n > 0),
        "every connected panel updates (alerts come every seventh reading): {now:?}"
    );
    // The session was never closed: dropping the browser still ends every
    // Chromium process it started.
    let started = browser.descendants();
    assert!(!started.is_empty(), "chromedriver started no Chromium?");
    drop(browser);
    eventually(LIMIT, "no Chromium left behind", || !started.iter().any(|&pid| alive(pid))).await;
}
