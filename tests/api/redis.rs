//! The shared store against a real `redis-server` started by the test on a
//! free loopback port: two replicas, cross-replica resume and channels,
//! cancel across replicas, Redis killed and restarted, a replica killed
//! mid-stream. A missing `redis-server` fails these tests; it never skips.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokengate::sse::{Event, Parser};

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(15);

/// A `redis-server` on 127.0.0.1, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// Extra `redis-server` arguments, kept for restarts.
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let extra = extra.iter().map(|a| (*a).to_owned()).collect();
        let mut server = Self { child: None, port, extra };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port and waits until it answers.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): install it (Debian: apt-get install redis-server) or run scripts/test.sh, which does")
            });
        self.child = Some(child);
        for _ in 0..200 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG")) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// Freezes it (SIGSTOP): connections stay up, nothing is answered.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Thaws a frozen one (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
            assert!(status.success(), "kill {signal}");
        }
    }

    /// Kills it (SIGKILL: an outage, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Test settings for a replica of the shared store `redis`, with a detach
/// grace long enough to resume elsewhere.
pub fn shared(redis: &RedisServer) -> tokengate::config::Settings {
    let mut s = base_settings();
    s.redis_url = Some(redis.url());
    s.detach_grace = Some("10s".into());
    s
}

/// Waits (bounded) until the replica answers `/readyz`: it reached Redis.
pub async fn ready(app: &TestApp) {
    for _ in 0..200 {
        if app.get("/readyz", None).await.status() == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("replica never became ready");
}

/// Opens a demo stream on a replica binary, retrying while it is still
/// connecting to Redis (its first requests may get 503).
async fn open_demo_on(a: &crate::binary::Server, token: &str, prompt: &str) -> reqwest::Response {
    let client = reqwest::Client::new();
    for _ in 0..100 {
        let r = client
            .get(format!("{}/v1/stream?generator=demo&prompt={prompt}", a.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("replica A never accepted the stream");
}

/// `events` (what was read so far) and the rest of the body, until it ends
/// (bounded by [`LIMIT`]).
async fn read_to_end(
    mut body: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
    mut parser: Parser,
    mut events: Vec<Event>,
) -> Vec<Event> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while let Ok(Some(Ok(bytes))) = tokio::time::timeout_at(deadline, body.next()).await {
        events.extend(parser.feed(&bytes));
    }
    events
}

fn seq_of(id: &Option<String>) -> u64 {
    id.as_deref().and_then(|i| i.rsplit('.').next()).and_then(|s| s.parse().ok()).unwrap_or(u64::MAX)
}

#[tokio::test]
async fn a_stream_generated_on_a_resumes_on_b_with_the_exact_text() {
    let redis = RedisServer::start();
    let a = spawn_app_with(shared(&redis)).await;
    let b = spawn_app_with(shared(&redis)).await;
    ready(&a).await;
    ready(&b).await;
    let text = "Cross-replica: 你好 👩‍👩‍👧 e\u{301} 🇯🇵 — the end.";
    let path = format!("/v1/stream?generator=echo&pace_ms=15&prompt={}", urlencode(text));
    let token = a.token("alice", "stream");
    let resp = a.get(&path, Some(&token)).await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let mut first = Vec::new();
    while delta_text(&first).chars().count() < 8 {
        first.extend(
            read_until(
                &mut body,
                &mut parser,
                LIMIT,
                |e| matches!(e, Event::Message { event, .. } if event == "delta"),
            )
            .await,
        );
    }
    drop(body);
    let last = parser.last_event_id().unwrap().to_owned();
    // Same URL, other replica: B replays A's events and follows live ones.
    let resp = b
        .client
        .get(format!("{}{path}", b.base))
        .bearer_auth(&token)
        .header("last-event-id", &last)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let second = read_events(resp, LIMIT).await;
    assert_eq!(format!("{}{}", delta_text(&first), delta_text(&second)), text);
    let seqs: Vec<u64> = messages(&first).iter().chain(messages(&second).iter()).map(|m| seq_of(&m.2)).collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(messages(&second).last().unwrap().0, "done");
    assert_eq!(b.state.store.local_streams(), 0, "B generated nothing");
    // Fully delivered: 204 on B too; another subject sees nothing.
    let done_id = messages(&second).last().unwrap().2.clone().unwrap();
    let resp = b
        .client
        .get(format!("{}{path}", b.base))
        .bearer_auth(&token)
        .header("last-event-id", &done_id)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let sid = done_id.split('.').next().unwrap();
    assert_eq!(b.get(&format!("/v1/streams/{sid}"), Some(&b.token("mallory", "stream"))).await.status(), 404);
}

#[tokio::test]
async fn a_publish_on_a_reaches_subscribers_on_b_and_history_replays() {
    let redis = RedisServer::start();
    let a = spawn_app_with(shared(&redis)).await;
    let b = spawn_app_with(shared(&redis)).await;
    ready(&a).await;
    ready(&b).await;
    let resp = b.get("/v1/channels/room", Some(&b.token("bob", "stream"))).await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "connected"))
        .await;
    let publish = |data: Value| {
        a.client
            .post(format!("{}/v1/channels/room", a.base))
            .bearer_auth(a.token("pub", "publish"))
            .json(&json!({"event": "note", "data": data}))
            .send()
    };
    let reply: Value = publish(json!({"n": 1})).await.unwrap().json().await.unwrap();
    assert_eq!(reply["subscribers"], 1, "{reply}");
    let first_id = reply["id"].as_str().unwrap().to_owned();
    publish(json!({"n": 2})).await.unwrap();
    let got = read_until(
        &mut body,
        &mut parser,
        LIMIT,
        |e| matches!(e, Event::Message { data, .. } if data.contains("\"n\":2")),
    )
    .await;
    let notes: Vec<(String, Value, Option<String>)> = messages(&got).into_iter().filter(|m| m.0 == "note").collect();
    assert_eq!(notes.len(), 2);
    assert_eq!(notes[0].1, json!({"n": 1}));
    assert_eq!(notes[0].2.as_deref(), Some(first_id.as_str()));
    drop(body);
    // Reconnect to A with the first id: only the second is replayed.
    let resp = a
        .client
        .get(format!("{}/v1/channels/room", a.base))
        .bearer_auth(a.token("bob", "stream"))
        .header("last-event-id", &first_id)
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let got = read_until(
        &mut body,
        &mut Parser::new(),
        LIMIT,
        |e| matches!(e, Event::Message { event, .. } if event == "note"),
    )
    .await;
    let notes: Vec<Value> = messages(&got).into_iter().filter(|m| m.0 == "note").map(|m| m.1).collect();
    assert_eq!(notes, [json!({"n": 2})]);
}

#[tokio::test]
async fn delete_on_b_cancels_the_generation_on_a() {
    let redis = RedisServer::start();
    let a = spawn_app_with(shared(&redis)).await;
    let b = spawn_app_with(shared(&redis)).await;
    ready(&a).await;
    ready(&b).await;
    let resp = a.stream("generator=probe&prompt=xy").await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let seen =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "delta"))
            .await;
    let sid = messages(&seen)[0].1["stream_id"].as_str().unwrap().to_owned();
    let resp = b
        .client
        .delete(format!("{}/v1/streams/{sid}", b.base))
        .bearer_auth(b.token("alice", "stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let rest =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "error"))
            .await;
    assert_eq!(messages(&rest).pop().unwrap().1["code"], "cancelled");
    eventually(LIMIT, "A's generator dropped", || a.probe.dropped.load(Ordering::SeqCst) == 1).await;
}

#[tokio::test]
async fn redis_outage_refuses_new_streams_ends_open_ones_and_recovers() {
    let mut redis = RedisServer::start();
    let app = spawn_app_with(shared(&redis)).await;
    ready(&app).await;
    let resp = app.stream("generator=probe&prompt=ab").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "delta")).await;

    redis.kill();
    // The open stream ends with a terminal error, never a hang.
    let rest =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "error"))
            .await;
    assert_eq!(messages(&rest).pop().unwrap().1["code"], "store_unavailable");
    eventually(LIMIT, "generator dropped", || app.probe.dropped.load(Ordering::SeqCst) == 1).await;
    // Not ready, and new streams are refused with a clear 503.
    let mut status = 0;
    for _ in 0..200 {
        status = app.get("/readyz", None).await.status().as_u16();
        if status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, 503);
    let refused = tokio::time::timeout(LIMIT, app.stream("generator=probe&prompt=x")).await.expect("no hang");
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.json::<Value>().await.unwrap()["code"], "store_unavailable");
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 1);

    // Redis returns: the service recovers by itself.
    redis.restart();
    ready(&app).await;
    let events = read_events(app.stream("generator=echo&prompt=back").await, LIMIT).await;
    assert_eq!(delta_text(&events), "back");
}

#[tokio::test]
async fn a_replica_killed_mid_stream_gives_everything_logged_then_generator_lost() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut a = crate::binary::start(
        &["--jwt-secret", SECRET, "--redis-url", &url, "--pace-ms", "40", "--detach-grace", "30s"],
        &[],
        "listening on",
    );
    let b = spawn_app_with(shared(&redis)).await;
    ready(&b).await;
    let token = b.token("alice", "stream");
    let mut body = open_demo_on(&a, &token, "english").await.bytes_stream();
    let mut parser = Parser::new();
    let mut first = Vec::new();
    while delta_text(&first).chars().count() < 5 {
        first.extend(
            read_until(
                &mut body,
                &mut parser,
                LIMIT,
                |e| matches!(e, Event::Message { event, .. } if event == "delta"),
            )
            .await,
        );
    }
    // SIGKILL: no goodbye, the lease just stops being refreshed.
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let _ = tokio::time::timeout(Duration::from_secs(2), body.next()).await;
    let last = parser.last_event_id().unwrap().to_owned();
    let resp = b
        .client
        .get(format!("{}/v1/stream", b.base))
        .bearer_auth(&token)
        .header("last-event-id", &last)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rest = read_events(resp, LIMIT).await;
    let msgs = messages(&rest);
    let (kind, data, _) = msgs.last().unwrap();
    assert_eq!((kind.as_str(), data["code"].as_str()), ("error", Some("generator_lost")));
    // What arrived is exactly the start of the text, with no gap.
    let expected = std::fs::read_to_string("prompts/english.txt").unwrap();
    let got = format!("{}{}", delta_text(&first), delta_text(&rest));
    assert!(expected.starts_with(&got), "{got:?}");
    let seqs: Vec<u64> = messages(&first).iter().chain(msgs[..msgs.len() - 1].iter()).map(|m| seq_of(&m.2)).collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn sigterm_on_a_sends_shutdown_and_the_client_resumes_on_b_without_losing_a_character() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut a = crate::binary::start(
        &["--jwt-secret", SECRET, "--redis-url", &url, "--pace-ms", "30", "--shutdown-grace", "200ms"],
        &[],
        "listening on",
    );
    let b = spawn_app_with(shared(&redis)).await;
    ready(&b).await;
    let token = b.token("alice", "stream");
    let mut body = open_demo_on(&a, &token, "chinese").await.bytes_stream();
    let mut parser = Parser::new();
    let mut first =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "delta"))
            .await;
    let pid = a.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    first.extend(
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "shutdown"))
            .await,
    );
    assert_eq!(a.child.wait().unwrap().code(), Some(0));
    let last = parser.last_event_id().unwrap().to_owned();
    let resp = b
        .client
        .get(format!("{}/v1/stream", b.base))
        .bearer_auth(&token)
        .header("last-event-id", &last)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rest = read_events(resp, LIMIT).await;
    let msgs = messages(&rest);
    assert_eq!(msgs.last().unwrap().1["code"], "generator_lost");
    let expected = std::fs::read_to_string("prompts/chinese.txt").unwrap();
    let got = format!("{}{}", delta_text(&first), delta_text(&rest));
    assert!(expected.starts_with(&got) && got.chars().count() >= 2, "{got:?}");
    let seqs: Vec<u64> = messages(&first)
        .iter()
        .filter(|m| m.0 != "shutdown")
        .chain(msgs[..msgs.len() - 1].iter())
        .map(|m| seq_of(&m.2))
        .collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "no duplicate, no gap");
}

#[tokio::test]
async fn a_reader_on_b_keeps_a_generating_past_the_detach_grace_and_sees_cancel() {
    let redis = RedisServer::start();
    let mut settings = shared(&redis);
    settings.detach_grace = Some("1s".into());
    let a = spawn_app_with(settings.clone()).await;
    let b = spawn_app_with(settings).await;
    ready(&a).await;
    ready(&b).await;
    let token = a.token("alice", "stream");
    // 60 characters at 50 ms: 3 s, well past A's 1 s detach grace.
    let text: String = "resume-me-".repeat(6);
    let resp = a.get(&format!("/v1/stream?generator=echo&pace_ms=50&prompt={text}"), Some(&token)).await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let first =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "delta"))
            .await;
    drop(body);
    let last = parser.last_event_id().unwrap().to_owned();
    let resp = b
        .client
        .get(format!("{}/v1/stream", b.base))
        .bearer_auth(&token)
        .header("last-event-id", &last)
        .send()
        .await
        .unwrap();
    let rest = read_events(resp, LIMIT).await;
    assert_eq!(messages(&rest).last().unwrap().0, "done", "{:?}", messages(&rest).last());
    assert_eq!(format!("{}{}", delta_text(&first), delta_text(&rest)), text);

    // A DELETE on B reaches A, and B's remote reader gets `cancelled` (the
    // terminal event is replicated), not a lost-generator guess.
    let resp = a.stream("generator=probe&prompt=xy").await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "delta")).await;
    drop(body);
    let last = parser.last_event_id().unwrap().to_owned();
    let sid = last.split('.').next().unwrap().to_owned();
    let resp = b
        .client
        .get(format!("{}/v1/streams/{sid}", b.base))
        .bearer_auth(&token)
        .header("last-event-id", &last)
        .send()
        .await
        .unwrap();
    let mut follower = resp.bytes_stream();
    let mut parser = Parser::new();
    let resp = b.client.delete(format!("{}/v1/streams/{sid}", b.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    let got = read_until(
        &mut follower,
        &mut parser,
        LIMIT,
        |e| matches!(e, Event::Message { event, .. } if event == "error"),
    )
    .await;
    assert_eq!(messages(&got).pop().unwrap().1["code"], "cancelled");
}

#[tokio::test]
async fn channel_creation_bounds_hold_across_two_replicas_and_a_swept_channel_frees_its_slot() {
    use crate::abuse::{publish_as, subscribe_as, too_many_channels};
    let redis = RedisServer::start();
    let settings = || {
        let mut s = shared(&redis);
        s.max_channels = Some(3);
        s.max_channels_per_subject = Some(2);
        // Subscribed channels are renewed every third of it.
        s.channel_ttl = Some("3s".into());
        s
    };
    let a = spawn_app_with(settings()).await;
    let b = spawn_app_with(settings()).await;
    ready(&a).await;
    ready(&b).await;
    // Alice's two, one on each replica: the bound is the cluster's.
    assert_eq!(publish_as(&a, "alice", "r1", json!(1)).await.status(), 200);
    assert_eq!(publish_as(&b, "alice", "r2", json!(1)).await.status(), 200);
    too_many_channels(publish_as(&a, "alice", "r3", json!(1)).await, 429).await;
    too_many_channels(subscribe_as(&b, "alice", "r3").await, 429).await;
    assert_eq!(publish_as(&b, "bob", "r4", json!(1)).await.status(), 200);
    too_many_channels(publish_as(&a, "carol", "r5", json!(1)).await, 503).await;
    too_many_channels(subscribe_as(&b, "carol", "r5").await, 503).await;
    too_many_channels(publish_as(&b, "alice", "r5", json!(1)).await, 429).await;
    // Existing channels stay usable from either replica.
    let resp = subscribe_as(&b, "carol", "r1").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "connected"))
        .await;
    assert_eq!(publish_as(&a, "carol", "r1", json!("across")).await.status(), 200);
    let got =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "message"))
            .await;
    assert_eq!(messages(&got).last().unwrap().1, json!("across"));
    // r2 goes unused for the ttl and is swept; r1 is kept by its subscriber.
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let resp = publish_as(&b, "alice", "r3", json!(1)).await;
        if resp.status() == 200 {
            break;
        }
        // Alice's own bound is checked first, whatever the total.
        assert_eq!(resp.status(), 429);
        assert!(tokio::time::Instant::now() < deadline, "the unused channel never freed its slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    too_many_channels(publish_as(&a, "alice", "r6", json!(1)).await, 429).await;
    drop(body);
}

/// `redis-cli`-free: one RESP command on a fresh connection, its reply's
/// first line (an integer reply: `:<n>`).
fn redis_integer(redis: &RedisServer, args: &[&str]) -> i64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(cmd.as_bytes()).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    reply.trim().strip_prefix(':').and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("reply {reply:?}"))
}

#[tokio::test]
async fn runs_of_deltas_replicate_in_few_entries_trim_by_sequence_and_resume_exactly_from_inside_a_run() {
    let redis = RedisServer::start();
    let mut settings = shared(&redis);
    settings.stream_max_events = Some(300);
    let a = spawn_app_with(settings.clone()).await;
    let b = spawn_app_with(settings).await;
    ready(&a).await;
    ready(&b).await;
    let token = a.token("alice", "stream");
    let letters = |n: usize| -> String { (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect() };
    // Opens a stream on A and returns its id once B can read all of it.
    let replicated = |query: String, text: String| {
        let (a, b, token) = (&a, &b, token.clone());
        async move {
            let events = read_events(a.stream(&query).await, LIMIT).await;
            assert_eq!(messages(&events).last().map(|m| m.0.clone()), Some("done".into()), "{:?}", messages(&events));
            assert_eq!(delta_text(&events), text);
            let sid = messages(&events)[0].1["stream_id"].as_str().unwrap().to_owned();
            let last = text.len();
            for _ in 0..100 {
                let resp = b.get(&format!("/v1/streams/{sid}?last_event_id={sid}.{last}"), Some(&token)).await;
                if resp.status() == 200
                    && messages(&read_events(resp, LIMIT).await).first().is_some_and(|m| m.0 == "done")
                {
                    return sid;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("stream {sid} never fully replicated");
        }
    };
    // Resumes on B after `from` and checks exactly what follows.
    let resumed_exactly = |sid: String, text: String, from: usize| {
        let (b, token) = (&b, token.clone());
        async move {
            let resp = b.get(&format!("/v1/streams/{sid}?last_event_id={sid}.{from}"), Some(&token)).await;
            assert_eq!(resp.status(), 200);
            let msgs = messages(&read_events(resp, LIMIT).await);
            let seqs: Vec<u64> = msgs.iter().map(|m| seq_of(&m.2)).collect();
            assert_eq!(seqs, (from as u64 + 1..=text.len() as u64 + 1).collect::<Vec<_>>(), "from {from}");
            let got: String = msgs.iter().filter(|m| m.0 == "delta").map(|m| m.1["text"].as_str().unwrap()).collect();
            assert_eq!(got, text[from..], "from {from}");
        }
    };
    // 280 characters, unpaced: the replicator gets them in a few batches,
    // and each batch's deltas are runs of up to 64.
    let text = letters(280);
    let sid = replicated(format!("generator=echo&prompt={text}"), text.clone()).await;
    let entries = redis_integer(&redis, &["XLEN", &format!("tg:s:{sid}")]);
    assert!((6..=40).contains(&entries), "{entries} entries for 282 events");
    for from in [0, 1, 63, 64, 65, 200, 279] {
        resumed_exactly(sid.clone(), text.clone(), from).await;
    }
    // 700 characters, paced: Redis keeps the newest 300 sequence numbers
    // (MINID, approximately), so position 10 is a resume gap on B, never a
    // silent skip, and 650 resumes exactly.
    let text = letters(700);
    let sid = replicated(format!("generator=echo&pace_ms=1&prompt={text}"), text.clone()).await;
    let resp = b.get(&format!("/v1/streams/{sid}?last_event_id={sid}.10"), Some(&token)).await;
    let msgs = messages(&read_events(resp, LIMIT).await);
    assert_eq!(
        (msgs.len(), msgs[0].0.as_str(), msgs[0].1["code"].as_str()),
        (1, "error", Some("resume_gap")),
        "{msgs:?}"
    );
    resumed_exactly(sid, text, 650).await;
}

#[tokio::test]
async fn a_running_streams_log_in_redis_has_its_ttl_from_the_first_append_and_the_finished_ttl_at_the_end() {
    let redis = RedisServer::start();
    let mut settings = shared(&redis);
    settings.stream_ttl = Some("120s".into());
    let a = spawn_app_with(settings).await;
    ready(&a).await;
    let resp = a.stream("generator=echo&pace_ms=100&prompt=abcdefghijklmnopqrst").await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let first =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "delta"))
            .await;
    let sid = messages(&first)[0].1["stream_id"].as_str().unwrap().to_owned();
    let key = format!("tg:s:{sid}");
    let mut ttl = -2;
    for _ in 0..100 {
        ttl = redis_integer(&redis, &["TTL", &key]);
        if ttl != -2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Running: stream_ttl plus an hour, from the append that created it (a
    // key without one, -1, would outlive a replica that died just then).
    assert!(ttl > 3600 && ttl <= 3720, "TTL {ttl} while running");
    read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "done")).await;
    let mut ttl = 0;
    for _ in 0..100 {
        ttl = redis_integer(&redis, &["TTL", &key]);
        if ttl <= 120 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ttl > 0 && ttl <= 120, "TTL {ttl} once finished");
}

#[tokio::test]
async fn a_stream_whose_end_redis_never_confirms_ends_store_unavailable_not_done() {
    let redis = RedisServer::start();
    let a = spawn_app_with(shared(&redis)).await;
    ready(&a).await;
    let resp = a.stream("generator=echo&pace_ms=40&prompt=abcdefghijklmnopqrst").await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let first =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "delta"))
            .await;
    // Redis stops answering while the last characters and the end are made:
    // the end cannot be replicated, so other replicas could never see it.
    redis.freeze();
    let all = read_to_end(body, parser, first).await;
    redis.thaw();
    let last = messages(&all).pop().unwrap();
    assert_eq!(last.0, "error", "the end: {last:?}");
    assert_eq!(last.1["code"], "store_unavailable", "{last:?}");
    // What came before it is a contiguous prefix of the text.
    assert!("abcdefghijklmnopqrst".starts_with(&delta_text(&all)), "{}", delta_text(&all));
    let seqs: Vec<u64> = messages(&all).iter().map(|m| seq_of(&m.2)).collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_refused_append_ends_only_its_own_stream_though_the_replica_sends_all_streams_together() {
    let redis = RedisServer::start();
    let a = spawn_app_with(shared(&redis)).await;
    ready(&a).await;
    let text = "abcdefghijklmnopqrstuvwxyz0123456789";
    let open = || async {
        let resp = a.stream(&format!("generator=echo&pace_ms=30&prompt={text}")).await;
        let mut body = resp.bytes_stream();
        let mut parser = Parser::new();
        let first = read_until(
            &mut body,
            &mut parser,
            LIMIT,
            |e| matches!(e, Event::Message { event, .. } if event == "delta"),
        )
        .await;
        let sid = messages(&first)[0].1["stream_id"].as_str().unwrap().to_owned();
        (body, parser, first, sid)
    };
    let (broken, kept) = (open().await, open().await);
    // The first stream's log key becomes a string: its next XADD is refused
    // (WRONGTYPE) inside the pipeline that carries the other's appends too.
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("tg:s:{}", broken.3);
    ::redis::pipe().del(&key).set(&key, "not a stream").query_async::<()>(&mut conn).await.unwrap();
    let (broken, kept) = tokio::join!(read_to_end(broken.0, broken.1, broken.2), read_to_end(kept.0, kept.1, kept.2));
    let last = messages(&broken).pop().unwrap();
    assert_eq!((last.0.as_str(), last.1["code"].as_str()), ("error", Some("store_unavailable")), "{last:?}");
    assert!(text.starts_with(&delta_text(&broken)), "{}", delta_text(&broken));
    // The other stream, in the same pipelines, is untouched.
    assert_eq!(messages(&kept).pop().map(|m| m.0), Some("done".to_owned()));
    assert_eq!(delta_text(&kept), text);
}

#[tokio::test]
async fn an_unpaced_stream_faster_than_one_pipeline_per_window_replicates_without_overflowing() {
    let redis = RedisServer::start();
    let mut settings = shared(&redis);
    // At most 600 events may wait for Redis: an unpaced 12,000-character
    // stream outruns Redis by far more, so the producer must wait for it
    // (without that wait this stream ends `store_unavailable`: checked).
    settings.stream_max_events = Some(600);
    let a = spawn_app_with(settings).await;
    ready(&a).await;
    let text: String = (0..12_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let events = read_events(a.stream(&format!("generator=echo&pace_ms=0&prompt={text}")).await, LIMIT).await;
    let last = messages(&events).pop().unwrap();
    assert_eq!(last.0, "done", "{:?}", last.1);
    assert_eq!(delta_text(&events), text);
}
