//! Connections outlive their token's `exp` only by `token_grace`: then a
//! stream's or a subscription's connection ends with `token_expired`
//! (without an event id), and a reconnect with a fresh token and
//! `Last-Event-ID` continues where it stopped.

use std::time::Duration;

use serde_json::json;
use tokengate::sse::Event;

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(15);

fn short_lived(sub: &str, scope: &str, secs: u64) -> String {
    hs256(json!({ "sub": sub, "exp": now() + secs, "scope": scope }))
}

fn settings() -> tokengate::config::Settings {
    let mut s = base_settings();
    s.token_grace = Some("1s".into());
    // The stream keeps going while its client reconnects.
    s.detach_grace = Some("10s".into());
    s.pace_max_ms = Some(1000);
    s
}

#[tokio::test]
async fn a_stream_connection_ends_at_exp_plus_grace_and_resumes_with_a_fresh_token() {
    let app = spawn_app_with(settings()).await;
    let text = "abcdefghijklmnopqrstuvwxyz0123456789";
    let token = short_lived("alice", "stream", 2);
    // 36 clusters at 150 ms: about 5.4 s, longer than exp (2 s) + grace (1 s).
    let resp = app.get(&format!("/v1/stream?generator=echo&pace_ms=150&prompt={text}"), Some(&token)).await;
    assert_eq!(resp.status(), 200);
    let first = read_events(resp, LIMIT).await;
    let all = messages(&first);
    let (kind, data, id) = all.last().cloned().unwrap();
    assert_eq!((kind.as_str(), data["code"].as_str()), ("error", Some("token_expired")), "{all:?}");
    let got = delta_text(&first);
    assert!(!got.is_empty() && got.len() < text.len(), "cut mid-stream: {got:?}");
    let last_id = all.iter().rev().find_map(|(k, _, id)| (k == "delta").then(|| id.clone().unwrap())).unwrap();
    // The parser reports the last event id in force (as EventSource keeps
    // it): the expiry set none of its own.
    assert_eq!(id.as_deref(), Some(last_id.as_str()), "Last-Event-ID stays at the last delivered event");
    let stream_id = last_id.split('.').next().unwrap().to_owned();

    // The old token is refused now; a fresh one resumes exactly there.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = app.token("alice", "stream");
    let resumed = app
        .client
        .get(format!("{}/v1/streams/{stream_id}", app.base))
        .bearer_auth(&fresh)
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    let rest = read_events(resumed, LIMIT).await;
    assert_eq!(format!("{got}{}", delta_text(&rest)), text, "nothing lost or repeated across the expiry");
    assert_eq!(messages(&rest).last().unwrap().0, "done");
}

#[tokio::test]
async fn a_subscription_ends_with_token_expired() {
    let app = spawn_app_with(settings()).await;
    let token = short_lived("alice", "stream", 1);
    let resp = app.get("/v1/channels/news", Some(&token)).await;
    assert_eq!(resp.status(), 200);
    let events = read_events(resp, LIMIT).await;
    let (kind, data, id) = messages(&events).last().cloned().unwrap();
    assert_eq!((kind.as_str(), data["code"].as_str(), id), ("error", Some("token_expired"), None), "{events:?}");
    // (No event was published, so no id is in force either.)
    assert!(events.iter().any(|e| matches!(e, Event::Message { event, .. } if event == "connected")));
}

#[tokio::test]
async fn a_long_lived_token_is_not_cut() {
    let app = spawn_app_with(settings()).await;
    let events = read_events(app.stream("generator=echo&pace_ms=100&prompt=abcdefghijklmnopqrst").await, LIMIT).await;
    assert_eq!(delta_text(&events), "abcdefghijklmnopqrst");
    assert_eq!(messages(&events).last().unwrap().0, "done");
}
