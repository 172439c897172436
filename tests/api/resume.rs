//! Resume (in memory): `Last-Event-ID` by header and query, the same-URL
//! `EventSource` reconnect, 204 after completion, unknown/foreign streams,
//! detach grace, cancel, the retained window, and many random reconnects.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokengate::sse::{Event, Parser};

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(10);

/// (id, seq, event, data) of each dispatched message.
fn parsed(events: &[Event]) -> Vec<(String, u64, String, Value)> {
    messages(events)
        .into_iter()
        .map(|(event, data, id)| {
            let id = id.unwrap_or_default();
            let (sid, seq) = id.split_once('.').map(|(a, b)| (a.to_owned(), b.parse().unwrap())).unwrap_or_default();
            (sid, seq, event, data)
        })
        .collect()
}

fn settings_with_grace(grace: &str) -> tokengate::config::Settings {
    let mut s = base_settings();
    s.detach_grace = Some(grace.into());
    s
}

/// Reads until `n` deltas arrived, then returns the events (the caller
/// drops the connection by dropping the body).
async fn read_deltas(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    parser: &mut Parser,
    n: usize,
) -> Vec<Event> {
    let mut out = Vec::new();
    while delta_text(&out).chars().count() < n {
        out.extend(
            read_until(
                body,
                parser,
                LIMIT,
                |e| matches!(e, Event::Message { event, .. } if event == "delta" || event == "done"),
            )
            .await,
        );
        if messages(&out).iter().any(|(e, _, _)| e == "done") {
            break;
        }
    }
    out
}

#[tokio::test]
async fn same_url_reconnect_with_last_event_id_resumes_without_a_second_generation() {
    let app = spawn_app_with(settings_with_grace("5s")).await;
    let text = "Hello, 世界! 👩‍👩‍👧 ok";
    let url = format!("{}/v1/stream?generator=echo&pace_ms=20&prompt={}", app.base, urlencode(text));
    let token = app.token("alice", "stream");
    let resp = app.client.get(&url).bearer_auth(&token).send().await.unwrap();
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let first = read_deltas(&mut body, &mut parser, 5).await;
    drop(body);
    let last_id = parser.last_event_id().unwrap().to_owned();
    // EventSource reconnects to the same URL with Last-Event-ID.
    let resp = app.client.get(&url).bearer_auth(&token).header("last-event-id", &last_id).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let second = read_events(resp, LIMIT).await;
    assert_eq!(format!("{}{}", delta_text(&first), delta_text(&second)), text);
    // Sequence numbers continue exactly: no duplicate, no gap.
    let seqs: Vec<u64> = parsed(&first).iter().chain(parsed(&second).iter()).map(|m| m.1).collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "{seqs:?}");
    assert_eq!(parsed(&second).last().unwrap().2, "done");
    assert_eq!(app.state.store.local_streams(), 1, "one generation only");
    // The producer ran in the first connection's task, and moved to a task
    // of its own when that connection went: the detach grace, then the
    // resume, found it running.
    assert_eq!(app.metric("tokengate_producers_total{driven=\"connection\"}").await, 1.0);
    assert_eq!(app.metric("tokengate_producers_moved_total").await, 1.0);
}

#[tokio::test]
async fn resume_by_query_parameter_and_explicit_endpoint() {
    let app = spawn_app_with(settings_with_grace("5s")).await;
    let text = "abcdefghijklmnopqrstuvwxyz";
    let resp = app.stream(&format!("generator=echo&pace_ms=20&prompt={text}")).await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let first = read_deltas(&mut body, &mut parser, 3).await;
    drop(body);
    let last_id = parser.last_event_id().unwrap().to_owned();
    let stream_id = last_id.split('.').next().unwrap().to_owned();
    let token = app.token("alice", "stream");
    // Query form, for clients that cannot set headers.
    let resp = app.get(&format!("/v1/streams/{stream_id}?last_event_id={last_id}"), Some(&token)).await;
    assert_eq!(resp.status(), 200);
    let second = read_events(resp, LIMIT).await;
    assert_eq!(format!("{}{}", delta_text(&first), delta_text(&second)), text);
    // Without a position the explicit endpoint replays everything.
    let all = read_events(app.get(&format!("/v1/streams/{stream_id}"), Some(&token)).await, LIMIT).await;
    assert_eq!(delta_text(&all), text);
    assert_eq!(parsed(&all)[0].2, "start");
}

#[tokio::test]
async fn a_finished_and_fully_delivered_stream_answers_204() {
    let app = spawn_app_with(settings_with_grace("5s")).await;
    let events = read_events(app.stream("generator=echo&prompt=hey").await, LIMIT).await;
    let msgs = parsed(&events);
    let (sid, done_seq, kind, _) = msgs.last().unwrap().clone();
    assert_eq!(kind, "done");
    let token = app.token("alice", "stream");
    let resp = app
        .client
        .get(format!("{}/v1/stream?prompt=hey", app.base))
        .bearer_auth(&token)
        .header("last-event-id", format!("{sid}.{done_seq}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    // From the last delta: only `done` is left.
    let resp = app
        .client
        .get(format!("{}/v1/stream?prompt=hey", app.base))
        .bearer_auth(&token)
        .header("last-event-id", format!("{sid}.{}", done_seq - 1))
        .send()
        .await
        .unwrap();
    let rest = parsed(&read_events(resp, LIMIT).await);
    assert_eq!(rest.iter().map(|m| m.2.as_str()).collect::<Vec<_>>(), ["done"]);
}

#[tokio::test]
async fn unknown_foreign_and_malformed_ids() {
    let app = spawn_app_with(settings_with_grace("5s")).await;
    let events = read_events(app.stream("generator=echo&prompt=mine").await, LIMIT).await;
    let sid = parsed(&events)[0].0.clone();
    let bob = app.token("bob", "stream");
    let cases = [
        (format!("/v1/streams/{sid}"), bob.clone(), 404, "stream_not_found"),
        (format!("/v1/streams/{}", "0".repeat(32)), app.token("alice", "stream"), 404, "stream_not_found"),
        ("/v1/streams/not-an-id".to_owned(), app.token("alice", "stream"), 404, "stream_not_found"),
        (format!("/v1/stream?last_event_id={sid}.x"), app.token("alice", "stream"), 400, "bad_request"),
        (format!("/v1/stream?last_event_id={sid}.1"), bob.clone(), 404, "stream_not_found"),
    ];
    for (path, token, status, code) in cases {
        let resp = app.get(&path, Some(&token)).await;
        assert_eq!(resp.status(), status, "{path}");
        assert_eq!(resp.json::<Value>().await.unwrap()["code"], code, "{path}");
    }
    // Bob cannot cancel it either; an admin can see and cancel any stream.
    let resp = app.client.delete(format!("{}/v1/streams/{sid}", app.base)).bearer_auth(&bob).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let admin = app.token("root", "admin");
    assert_eq!(
        delta_text(&read_events(app.get(&format!("/v1/streams/{sid}"), Some(&admin)).await, LIMIT).await),
        "mine"
    );
    let resp = app.client.delete(format!("{}/v1/streams/{sid}", app.base)).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(resp.status(), 204);
}

#[tokio::test]
async fn detach_grace_keeps_generating_then_cancels() {
    let app = spawn_app_with(settings_with_grace("400ms")).await;
    let resp = app.stream("generator=probe&prompt=ab").await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    read_deltas(&mut body, &mut parser, 1).await;
    drop(body);
    // Within the grace a reconnect resumes the same generation.
    let last = parser.last_event_id().unwrap().to_owned();
    let sid = last.split('.').next().unwrap().to_owned();
    let token = app.token("alice", "stream");
    let resp = app
        .client
        .get(format!("{}/v1/stream", app.base))
        .bearer_auth(&token)
        .header("last-event-id", &last)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 1);
    assert_eq!(app.probe.dropped.load(Ordering::SeqCst), 0);
    drop(resp);
    // Past the grace with nobody attached, the generator is dropped and the
    // slot freed; a late resume gets the terminal error.
    eventually(LIMIT, "generator dropped after the grace", || app.probe.dropped.load(Ordering::SeqCst) == 1).await;
    eventually(LIMIT, "slot freed", || app.state.slots.open() == 0).await;
    let late =
        read_events(app.get(&format!("/v1/streams/{sid}?last_event_id={last}"), Some(&token)).await, LIMIT).await;
    let (_, _, kind, data) = parsed(&late).pop().unwrap();
    assert_eq!((kind.as_str(), data["code"].as_str()), ("error", Some("client_gone")));
}

#[tokio::test]
async fn delete_cancels_for_every_reader() {
    let app = spawn_app_with(settings_with_grace("5s")).await;
    let resp = app.stream("generator=probe&prompt=xy").await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let seen = read_deltas(&mut body, &mut parser, 1).await;
    let sid = parsed(&seen)[0].0.clone();
    let resp = app
        .client
        .delete(format!("{}/v1/streams/{sid}", app.base))
        .bearer_auth(app.token("alice", "stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let rest =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "error"))
            .await;
    let (_, _, _, data) = parsed(&rest).pop().unwrap();
    assert_eq!(data["code"], "cancelled");
    eventually(LIMIT, "generator dropped", || app.probe.dropped.load(Ordering::SeqCst) == 1).await;
    eventually(LIMIT, "slot freed", || app.state.slots.open() == 0).await;
}

#[tokio::test]
async fn resuming_before_the_retained_window_is_a_resume_gap() {
    let mut settings = settings_with_grace("5s");
    settings.stream_max_events = Some(10);
    settings.send_queue = Some(4);
    let app = spawn_app_with(settings).await;
    let resp = app.stream("generator=echo&prompt=0123456789abcdefghijklmnopqrstuvwxyz").await;
    let events = read_events(resp, LIMIT).await;
    let sid = parsed(&events)[0].0.clone();
    let token = app.token("alice", "stream");
    let resp = app.get(&format!("/v1/streams/{sid}?last_event_id={sid}.2"), Some(&token)).await;
    let msgs = messages(&read_events(resp, LIMIT).await);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].0, "error");
    assert_eq!(msgs[0].1["code"], "resume_gap");
    // Its id is no position: an EventSource reconnecting with it is told
    // 204 (stop) instead of silently resuming past the gap.
    let gap_id = msgs[0].2.clone().unwrap();
    assert_eq!(gap_id, format!("{sid}.gap"));
    let resp = app
        .client
        .get(format!("{}/v1/stream", app.base))
        .bearer_auth(&token)
        .header("last-event-id", &gap_id)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
}

#[tokio::test]
async fn twenty_random_reconnects_reassemble_the_exact_text() {
    let app = spawn_app_with(settings_with_grace("5s")).await;
    let text = std::fs::read_to_string("prompts/mixed.txt").unwrap();
    let token = app.token("alice", "stream");
    let resp = app
        .client
        .post(format!("{}/v1/stream", app.base))
        .bearer_auth(&token)
        .json(&json!({"generator": "echo", "prompt": text, "pace_ms": 2}))
        .send()
        .await
        .unwrap();
    let mut assembled: Vec<(u64, String)> = Vec::new();
    let mut parser = Parser::new();
    let mut body = resp.bytes_stream();
    let mut reconnects = 0;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    loop {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let take = 1 + (seed % 9) as usize;
        let mut got = 0;
        let mut finished = false;
        while got < take && !finished {
            let chunk = tokio::time::timeout(LIMIT, body.next()).await.expect("bounded").expect("open").unwrap();
            for e in parser.feed(&chunk) {
                if let Event::Message { event, data, id } = e {
                    let seq: u64 = id.unwrap().rsplit('.').next().unwrap().parse().unwrap();
                    match event.as_str() {
                        "delta" => {
                            assembled.push((
                                seq,
                                serde_json::from_str::<Value>(&data).unwrap()["text"].as_str().unwrap().to_owned(),
                            ));
                            got += 1;
                        }
                        "done" => finished = true,
                        _ => {}
                    }
                }
            }
        }
        if finished {
            break;
        }
        drop(body);
        reconnects += 1;
        assert!(reconnects < 500, "bounded");
        let last = parser.last_event_id().unwrap().to_owned();
        let sid = last.split('.').next().unwrap().to_owned();
        let resp = app
            .client
            .get(format!("{}/v1/streams/{sid}", app.base))
            .bearer_auth(&token)
            .header("last-event-id", last)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        body = resp.bytes_stream();
    }
    assert!(reconnects >= 20, "only {reconnects} reconnects");
    let seqs: Vec<u64> = assembled.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no duplicate, no gap");
    assert_eq!(assembled.into_iter().map(|(_, t)| t).collect::<String>(), text);
}

/// Fuzz findings: an empty `Last-Event-ID` header hid a valid
/// `last_event_id` query value, and `<id>.18446744073709551615` (the gap
/// marker spelled as a number) was answered 204 as if a gap had been seen.
#[tokio::test]
async fn an_empty_header_leaves_the_query_position_and_the_gap_marker_is_no_number() {
    let app = spawn_app_with(settings_with_grace("5s")).await;
    let events = read_events(app.stream("generator=echo&prompt=abcdef").await, LIMIT).await;
    let msgs = parsed(&events);
    let sid = msgs[0].0.clone();
    let token = app.token("alice", "stream");
    let get = |path: String, header: &'static str| {
        app.client.get(format!("{}{path}", app.base)).bearer_auth(&token).header("last-event-id", header).send()
    };
    // After delta 3 (seq 3: start is 0): the rest, from the query, despite the empty header.
    let resp = get(format!("/v1/streams/{sid}?last_event_id={sid}.3"), "").await.unwrap();
    assert_eq!(resp.status(), 200);
    let rest = read_events(resp, LIMIT).await;
    assert_eq!(delta_text(&rest), "def");
    assert_eq!(parsed(&rest)[0].1, 4);
    for number in ["18446744073709551615", "18446744073709551614"] {
        let resp = app
            .client
            .get(format!("{}/v1/streams/{sid}", app.base))
            .bearer_auth(&token)
            .header("last-event-id", format!("{sid}.{number}"))
            .send()
            .await
            .unwrap();
        problem(resp, 400, "bad_request").await;
    }
    // The marker itself still means "told of a gap".
    let resp = app
        .client
        .get(format!("{}/v1/streams/{sid}", app.base))
        .bearer_auth(&token)
        .header("last-event-id", format!("{sid}.gap"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
}
