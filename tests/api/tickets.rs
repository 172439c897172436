//! Stream tickets (`POST /v1/tickets`, `?ticket=`): one use, then only a
//! reconnect to what the ticket opened; expiry; the token's subject and
//! scopes; never in a log; and, on a real `redis-server` with two
//! replicas, exactly one winner when the same ticket reaches both at once.

use std::time::Duration;

use serde_json::{Value, json};
use tokengate::sse::{Event, Parser};

use crate::helpers::*;
use crate::redis::{RedisServer, ready, shared};

const LIMIT: Duration = Duration::from_secs(15);

/// Mints a ticket on `base` for `token`.
async fn mint_on(client: &reqwest::Client, base: &str, token: &str) -> String {
    let resp = client.post(format!("{base}/v1/tickets")).bearer_auth(token).send().await.unwrap();
    assert_eq!(resp.status(), 200, "mint: {:?}", resp.text().await);
    let body: Value = resp.json().await.unwrap();
    body["ticket"].as_str().unwrap().to_owned()
}

async fn mint(app: &TestApp, sub: &str, scope: &str) -> String {
    mint_on(&app.client, &app.base, &app.token(sub, scope)).await
}

/// Asserts a 401 problem with `code` that does not echo `ticket`.
async fn refused(resp: reqwest::Response, code: &str, ticket: &str) {
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.contains(r#"error="invalid_token""#), "{challenge}");
    assert!(!challenge.contains(ticket));
    let body = resp.text().await.unwrap();
    assert!(!body.contains(ticket), "the ticket is echoed: {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    // problem+json, or a dialect's shape (OpenAI's `error.code`).
    let got = body["code"].as_str().or(body["error"]["code"].as_str());
    assert_eq!(got, Some(code), "{body}");
}

fn stream_url(app: &TestApp, query: &str, ticket: &str) -> String {
    format!("{}/v1/stream?{query}&ticket={ticket}", app.base)
}

/// The stream id of a `start` event.
fn stream_id(events: &[Event]) -> String {
    let (name, data, _) = messages(events).into_iter().next().unwrap();
    assert_eq!(name, "start");
    data["stream_id"].as_str().unwrap().to_owned()
}

fn is_delta(e: &Event) -> bool {
    matches!(e, Event::Message { event, .. } if event == "delta")
}

#[tokio::test]
async fn a_ticket_is_opaque_short_lived_and_minted_only_with_a_token() {
    let app = spawn_app().await;
    let resp = app.client.post(format!("{}/v1/tickets", app.base)).bearer_auth(app.token("alice", "stream")).send();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["expires_in"], 30, "the default ttl");
    let ticket = body["ticket"].as_str().unwrap();
    // At least 128 bits, URL-safe, and not the token.
    assert!(ticket.len() >= 22 && ticket.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert_ne!(ticket, mint(&app, "alice", "stream").await);

    let none = app.client.post(format!("{}/v1/tickets", app.base)).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(none.headers()["www-authenticate"], r#"Bearer realm="tokengate""#);
    // A ticket cannot mint a ticket (it is spent trying).
    let fresh = mint(&app, "alice", "stream").await;
    let resp = app.client.post(format!("{}/v1/tickets?ticket={fresh}", app.base)).send().await.unwrap();
    refused(resp, "ticket_not_accepted", &fresh).await;
    let unknown = "A".repeat(43);
    refused(app.client.get(stream_url(&app, "prompt=x", &unknown)).send().await.unwrap(), "invalid_ticket", &unknown)
        .await;
}

#[tokio::test]
async fn a_used_ticket_is_refused_on_replay() {
    let app = spawn_app().await;
    let ticket = mint(&app, "alice", "stream").await;
    let url = stream_url(&app, "generator=echo&prompt=hello", &ticket);
    let resp = app.client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(delta_text(&read_events(resp, LIMIT).await), "hello");
    // The same URL again, as a new request (no Last-Event-ID): another
    // generation, which the ticket may not start.
    refused(app.client.get(&url).send().await.unwrap(), "ticket_used", &ticket).await;
    refused(app.client.get(&url).send().await.unwrap(), "ticket_used", &ticket).await;
    assert_eq!(app.state.store.local_streams(), 1);
}

#[tokio::test]
async fn an_expired_ticket_is_refused() {
    let mut settings = base_settings();
    settings.ticket_ttl = Some("1s".into());
    let app = spawn_app_with(settings).await;
    let resp = app.client.post(format!("{}/v1/tickets", app.base)).bearer_auth(app.token("alice", "stream"));
    let body: Value = resp.send().await.unwrap().json().await.unwrap();
    assert_eq!(body["expires_in"], 1);
    let ticket = body["ticket"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let url = stream_url(&app, "generator=echo&prompt=late", &ticket);
    refused(app.client.get(&url).send().await.unwrap(), "ticket_expired", &ticket).await;
    // Still expired (not "used") when it comes back.
    refused(app.client.get(&url).send().await.unwrap(), "ticket_expired", &ticket).await;
    assert_eq!(app.state.store.local_streams(), 0, "nothing was opened");
    // A ticket used in time keeps working for its reconnects after its ttl.
    let ticket = mint(&app, "alice", "stream").await;
    let resp = app.client.get(stream_url(&app, "generator=echo&prompt=ok", &ticket)).send().await.unwrap();
    let events = read_events(resp, LIMIT).await;
    let first_delta = messages(&events).into_iter().find(|(name, _, _)| name == "delta").unwrap().2.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let resp = app
        .client
        .get(stream_url(&app, "generator=echo&prompt=ok", &ticket))
        .header("last-event-id", first_delta)
        .send()
        .await
        .unwrap();
    assert_eq!(delta_text(&read_events(resp, LIMIT).await), "k");
}

#[tokio::test]
async fn a_ticket_opens_one_stream_and_nothing_else() {
    let app = spawn_app().await;
    let alice = app.token("alice", "stream publish");
    let ticket = mint_on(&app.client, &app.base, &alice).await;
    let resp = app.client.get(stream_url(&app, "generator=echo&prompt=one", &ticket)).send().await.unwrap();
    let sid = stream_id(&read_events(resp, LIMIT).await);
    let c = &app.client;
    // Another stream, by either method.
    refused(
        c.get(stream_url(&app, "generator=echo&prompt=two", &ticket)).send().await.unwrap(),
        "ticket_used",
        &ticket,
    )
    .await;
    let post = c.post(format!("{}/v1/stream?ticket={ticket}", app.base)).json(&json!({"prompt": "two"}));
    refused(post.send().await.unwrap(), "ticket_used", &ticket).await;
    // A channel, a publish, a cancel, the explicit resume route, a
    // dialect, a ticket.
    let base = &app.base;
    refused(c.get(format!("{base}/v1/channels/news?ticket={ticket}")).send().await.unwrap(), "ticket_used", &ticket)
        .await;
    let publish = c.post(format!("{base}/v1/channels/news?ticket={ticket}")).json(&json!({"data": 1}));
    refused(publish.send().await.unwrap(), "ticket_used", &ticket).await;
    refused(c.delete(format!("{base}/v1/streams/{sid}?ticket={ticket}")).send().await.unwrap(), "ticket_used", &ticket)
        .await;
    let explicit =
        c.get(format!("{base}/v1/streams/{sid}?ticket={ticket}")).header("last-event-id", format!("{sid}.0"));
    refused(explicit.send().await.unwrap(), "ticket_used", &ticket).await;
    let chat = c
        .post(format!("{base}/v1/chat/completions?ticket={ticket}"))
        .json(&json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}));
    refused(chat.send().await.unwrap(), "ticket_used", &ticket).await;
    refused(c.post(format!("{base}/v1/tickets?ticket={ticket}")).send().await.unwrap(), "ticket_used", &ticket).await;
    assert_eq!(app.state.store.local_streams(), 1);

    // A ticket that subscribed to a channel reconnects to that channel
    // only: no stream, no other channel.
    let ticket = mint_on(c, base, &alice).await;
    let resp = c.get(format!("{base}/v1/channels/news?ticket={ticket}")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let again = c.get(format!("{base}/v1/channels/news?ticket={ticket}")).header("last-event-id", "0");
    assert_eq!(again.send().await.unwrap().status(), 200, "the same channel reconnects");
    refused(c.get(format!("{base}/v1/channels/other?ticket={ticket}")).send().await.unwrap(), "ticket_used", &ticket)
        .await;
    refused(c.get(stream_url(&app, "generator=echo&prompt=x", &ticket)).send().await.unwrap(), "ticket_used", &ticket)
        .await;
    let resume = c.get(stream_url(&app, "prompt=x", &ticket)).header("last-event-id", format!("{sid}.0"));
    refused(resume.send().await.unwrap(), "ticket_used", &ticket).await;
    assert_eq!(app.state.store.local_streams(), 1);
}

#[tokio::test]
async fn the_same_url_reconnect_resumes_and_only_its_own_stream() {
    let mut settings = base_settings();
    settings.detach_grace = Some("10s".into());
    let app = spawn_app_with(settings).await;
    let text = "Ticket resume: 你好 👩‍👩‍👧 e\u{301} — the end.";
    let ticket = mint(&app, "alice", "stream").await;
    let url = stream_url(&app, &format!("generator=echo&pace_ms=20&prompt={}", urlencode(text)), &ticket);
    let resp = app.client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let mut first = Vec::new();
    while delta_text(&first).chars().count() < 5 {
        first.extend(read_until(&mut body, &mut parser, LIMIT, is_delta).await);
    }
    drop(body);
    let sid = stream_id(&first);
    let last = parser.last_event_id().unwrap().to_owned();
    // What an EventSource does: the same URL, with Last-Event-ID.
    let resp = app.client.get(&url).header("last-event-id", &last).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let rest = read_events(resp, LIMIT).await;
    assert_eq!(format!("{}{}", delta_text(&first), delta_text(&rest)), text, "no gap, no repeat");
    // Again, by the query form, after the end: everything was delivered.
    let done = parser_last_id(&rest);
    let resp = app.client.get(format!("{url}&last_event_id={done}")).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(app.state.store.local_streams(), 1, "the reconnects started no generation");

    // Another stream of the same subject: not this ticket's.
    let other = app.get("/v1/stream?generator=echo&prompt=other", Some(&app.token("alice", "stream"))).await;
    let other = stream_id(&read_events(other, LIMIT).await);
    assert_ne!(other, sid);
    let resp = app.client.get(&url).header("last-event-id", format!("{other}.0")).send().await.unwrap();
    refused(resp, "ticket_used", &ticket).await;
    // A fresh ticket resuming the stream (say, after the first one's token
    // was renewed) becomes that stream's, and reconnects to it only.
    let renewed = mint(&app, "alice", "stream").await;
    let url2 = stream_url(&app, "prompt=anything", &renewed);
    let first_delta = messages(&first).into_iter().find(|(name, _, _)| name == "delta").unwrap().2.unwrap();
    for _ in 0..2 {
        let resp = app.client.get(&url2).header("last-event-id", &first_delta).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(delta_text(&read_events(resp, LIMIT).await), text.chars().skip(1).collect::<String>());
    }
    refused(
        app.client.get(&url2).header("last-event-id", format!("{other}.0")).send().await.unwrap(),
        "ticket_used",
        &renewed,
    )
    .await;
    // Two resume points that disagree name nothing.
    let resp = app.client.get(format!("{url}&last_event_id={sid}.0&last_event_id={other}.0")).send().await.unwrap();
    refused(resp, "ticket_used", &ticket).await;
}

fn parser_last_id(events: &[Event]) -> String {
    messages(events).into_iter().filter_map(|(_, _, id)| id).next_back().unwrap()
}

#[tokio::test]
async fn a_ticket_carries_its_tokens_subject_and_scopes() {
    let mut settings = base_settings();
    settings.detach_grace = Some("10s".into());
    let app = spawn_app_with(settings).await;
    let c = &app.client;
    let base = &app.base;
    // Without `publish` in the token, its ticket cannot publish.
    let ticket = mint(&app, "alice", "stream").await;
    let publish = c.post(format!("{base}/v1/channels/news?ticket={ticket}")).json(&json!({"data": 1}));
    let resp = publish.send().await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "insufficient_scope");
    // With it, it can (once).
    let ticket = mint(&app, "alice", "publish").await;
    let publish = || c.post(format!("{base}/v1/channels/news?ticket={ticket}")).json(&json!({"data": 1}));
    assert_eq!(publish().send().await.unwrap().status(), 200);
    refused(publish().send().await.unwrap(), "ticket_used", &ticket).await;
    // A publish-only token's ticket opens no stream.
    let ticket = mint(&app, "alice", "publish").await;
    assert_eq!(c.get(stream_url(&app, "generator=echo&prompt=x", &ticket)).send().await.unwrap().status(), 403);

    // Alice's ticket cannot resume Bob's stream, fresh or bound.
    let bob = app.get("/v1/stream?generator=probe&prompt=bob", Some(&app.token("bob", "stream"))).await;
    let mut bob_body = bob.bytes_stream();
    let mut parser = Parser::new();
    let bob_events = read_until(&mut bob_body, &mut parser, LIMIT, is_delta).await;
    let bob_sid = stream_id(&bob_events);
    let fresh = mint(&app, "alice", "stream").await;
    let resp = c.get(stream_url(&app, "prompt=x", &fresh)).header("last-event-id", format!("{bob_sid}.0")).send();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "stream_not_found");
    let bound = mint(&app, "alice", "stream").await;
    let resp = c.get(stream_url(&app, "generator=echo&prompt=mine", &bound)).send().await.unwrap();
    let mine = stream_id(&read_events(resp, LIMIT).await);
    let resp =
        c.get(stream_url(&app, "generator=echo&prompt=mine", &bound)).header("last-event-id", format!("{mine}.0"));
    assert_eq!(resp.send().await.unwrap().status(), 200, "its own stream resumes");
    let resp =
        c.get(stream_url(&app, "generator=echo&prompt=mine", &bound)).header("last-event-id", format!("{bob_sid}.0"));
    refused(resp.send().await.unwrap(), "ticket_used", &bound).await;
    // Bob's ticket does resume Bob's stream.
    let bobs = mint(&app, "bob", "stream").await;
    let resp = c.get(stream_url(&app, "prompt=x", &bobs)).header("last-event-id", format!("{bob_sid}.0")).send();
    assert_eq!(resp.await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_bearer_token_wins_over_a_ticket_and_leaves_it_unused() {
    let app = spawn_app().await;
    let ticket = mint(&app, "alice", "stream").await;
    let url = stream_url(&app, "generator=echo&prompt=hi", &ticket);
    let resp = app.client.get(&url).bearer_auth(app.token("bob", "stream")).send().await.unwrap();
    assert_eq!(delta_text(&read_events(resp, LIMIT).await), "hi");
    // The ticket was not looked at: it still opens its one stream.
    let resp = app.client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // The bearer token's stream was Bob's; the ticket's is Alice's.
    let sid = stream_id(&read_events(resp, LIMIT).await);
    let located = app.get(&format!("/v1/streams/{sid}"), Some(&app.token("alice", "stream"))).await;
    assert_eq!(located.status(), 200);
}

#[test]
fn logged_queries_have_the_ticket_redacted() {
    let params = ["access_token".to_owned(), "ticket".to_owned()];
    let redacted = tokengate::app::redact_query("prompt=hi&ticket=SECRET-T&access_token=SECRET-A", &params);
    assert!(!redacted.contains("SECRET"), "{redacted}");
    assert!(redacted.contains("ticket=%5Bredacted%5D") && redacted.contains("prompt=hi"), "{redacted}");
}

#[tokio::test]
async fn tickets_never_reach_the_logs() {
    let server = crate::binary::start(&["--jwt-secret", SECRET], &[("RUST_LOG", "debug")], "listening on");
    let client = reqwest::Client::new();
    let token = hs256(json!({"sub": "alice", "exp": now() + 600, "scope": "stream"}));
    let ticket = mint_on(&client, &server.base, &token).await;
    let url = format!("{}/v1/stream?generator=echo&prompt=hi&ticket={ticket}", server.base);
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(delta_text(&read_events(resp, LIMIT).await), "hi");
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    let mut server = server;
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut server.child.stderr.take().unwrap(), &mut logs).unwrap();
    assert!(logs.contains("ticket=%5Bredacted%5D") || logs.contains("ticket=[redacted]"), "{logs}");
    assert!(logs.contains("ticket_used"), "the refusal is logged by its code: {logs}");
    assert!(!logs.contains(&ticket), "a ticket was logged: {logs}");
}

#[tokio::test]
async fn two_replicas_given_the_same_ticket_at_once_let_exactly_one_win() {
    let redis = RedisServer::start();
    let a = spawn_app_with(shared(&redis)).await;
    let b = spawn_app_with(shared(&redis)).await;
    ready(&a).await;
    ready(&b).await;
    let token = a.token("alice", "stream");
    for round in 0..20 {
        // Minted on one replica, presented to both at the same moment.
        let ticket = mint_on(&a.client, &a.base, &token).await;
        let query = format!("generator=echo&prompt=race{round}");
        let (ra, rb) = tokio::join!(
            a.client.get(stream_url(&a, &query, &ticket)).send(),
            b.client.get(stream_url(&b, &query, &ticket)).send(),
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let statuses = [ra.status().as_u16(), rb.status().as_u16()];
        assert!(statuses == [200, 401] || statuses == [401, 200], "round {round}: {statuses:?}");
        let (winner, loser) = if statuses[0] == 200 { (ra, rb) } else { (rb, ra) };
        refused(loser, "ticket_used", &ticket).await;
        assert_eq!(delta_text(&read_events(winner, LIMIT).await), format!("race{round}"));
    }
    assert_eq!(a.state.store.local_streams() + b.state.store.local_streams(), 20, "one stream per ticket");

    // A ticket used on A reconnects on B to the stream A produces.
    let ticket = mint_on(&b.client, &b.base, &token).await;
    let url_a = stream_url(&a, "generator=echo&pace_ms=20&prompt=across-replicas", &ticket);
    let resp = a.client.get(&url_a).send().await.unwrap();
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let first = read_until(&mut body, &mut parser, LIMIT, is_delta).await;
    drop(body);
    let last = parser.last_event_id().unwrap().to_owned();
    let url_b = stream_url(&b, "generator=echo&pace_ms=20&prompt=across-replicas", &ticket);
    let resp = b.client.get(&url_b).header("last-event-id", &last).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let rest = read_events(resp, LIMIT).await;
    assert_eq!(format!("{}{}", delta_text(&first), delta_text(&rest)), "across-replicas");
    // And on B, as on A, it opens nothing else.
    refused(b.client.get(stream_url(&b, "prompt=x", &ticket)).send().await.unwrap(), "ticket_used", &ticket).await;
}
