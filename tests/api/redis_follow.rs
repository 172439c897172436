//! Readers on one replica following a stream produced on another, against a
//! real `redis-server`: they get every event in order with the exact text,
//! and what they cost Redis grows with the stream's events, not with the
//! number of readers times a polling tick. Redis's own `INFO commandstats`
//! counts the commands; nothing here asserts on latency (it is printed).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokengate::sse::{Event, Parser};
use tokio::time::Instant;

use crate::helpers::*;
use crate::redis::{RedisServer, ready, shared};

const LIMIT: Duration = Duration::from_secs(30);
/// Remote readers in the command-count test.
const READERS: usize = 20;
/// The paced stream's delay between characters.
const PACE_MS: u64 = 200;
/// How long Redis's command counters run while the readers follow.
const WINDOW: Duration = Duration::from_secs(2);

/// `calls` of every command in an `INFO commandstats` reply, by lowercase name.
fn command_calls(info: &str) -> Vec<(String, u64)> {
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

fn calls_of(stats: &[(String, u64)], name: &str) -> u64 {
    stats.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c)
}

/// Arrival times of each delta (by sequence number) and the whole text read.
struct Followed {
    arrivals: Vec<(u64, Instant)>,
    text: String,
    seqs: Vec<u64>,
    last: String,
}

/// Reads a stream to its end (after `seen`, its events read so far),
/// noting when each event arrived; `first` is counted up once the first
/// delta is in (the reader is then following).
async fn follow(
    mut body: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
    mut parser: Parser,
    seen: Vec<Event>,
    first: Arc<AtomicUsize>,
) -> Followed {
    use futures_util::StreamExt;
    let mut out = Followed { arrivals: Vec::new(), text: String::new(), seqs: Vec::new(), last: String::new() };
    let deadline = Instant::now() + LIMIT;
    let mut counted = false;
    let mut events = seen;
    loop {
        let now = Instant::now();
        for event in events.drain(..) {
            let Event::Message { event, data, id } = &event else { continue };
            let seq = id.as_deref().and_then(|i| i.rsplit('.').next()).and_then(|s| s.parse::<u64>().ok());
            if let Some(seq) = seq {
                out.seqs.push(seq);
            }
            out.last.clone_from(event);
            if event == "delta" {
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                out.text.push_str(v["text"].as_str().unwrap());
                out.arrivals.push((seq.unwrap(), now));
                if !counted {
                    counted = true;
                    first.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(bytes))) => events = parser.feed(&bytes),
            Ok(None) => return out,
            Ok(Some(Err(e))) => panic!("body error: {e}"),
            Err(_) => panic!("stream did not end within {LIMIT:?}"),
        }
    }
}

/// A whole response, followed as [`follow`] does.
async fn follow_response(resp: reqwest::Response, first: Arc<AtomicUsize>) -> Followed {
    assert_eq!(resp.status(), 200);
    follow(resp.bytes_stream(), Parser::new(), Vec::new(), first).await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test]
async fn remote_readers_cost_redis_per_event_not_per_reader_and_tick() {
    let redis = RedisServer::start();
    let a = spawn_app_with(shared(&redis)).await;
    let b = spawn_app_with(shared(&redis)).await;
    ready(&a).await;
    ready(&b).await;
    let token = a.token("alice", "stream");
    // 30 characters at 200 ms: about 6 s, of which the counters watch 2 s
    // in the middle.
    let text = "follow 你好 👩‍👩‍👧 e\u{301} across…";
    let text = format!("{text}{}", "-".repeat(30 - text.chars().count()));
    let resp =
        a.get(&format!("/v1/stream?generator=echo&pace_ms={PACE_MS}&prompt={}", urlencode(&text)), Some(&token)).await;
    assert_eq!(resp.status(), 200);
    // The local reader on A: the reference for cross-replica latency.
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let seen =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "start"))
            .await;
    let sid = messages(&seen)[0].1["stream_id"].as_str().unwrap().to_owned();
    let local = tokio::spawn(follow(body, parser, seen, Arc::new(AtomicUsize::new(0))));

    let following = Arc::new(AtomicUsize::new(0));
    let mut remote = Vec::new();
    for _ in 0..READERS {
        let resp = b.get(&format!("/v1/streams/{sid}"), Some(&token)).await;
        remote.push(tokio::spawn(follow_response(resp, following.clone())));
    }
    eventually(LIMIT, "every reader on B follows", || following.load(Ordering::SeqCst) == READERS).await;
    // Latency is taken of what was produced from now on (the readers
    // replayed what came before).
    let live = Instant::now();

    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    ::redis::cmd("CONFIG").arg("RESETSTAT").query_async::<()>(&mut conn).await.unwrap();
    tokio::time::sleep(WINDOW).await;
    let info: String = ::redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    let stats = command_calls(&info);
    let (xrange, xread) = (calls_of(&stats, "xrange"), calls_of(&stats, "xread"));
    let total: u64 = stats.iter().filter(|(n, _)| n != "info" && n != "config|resetstat").map(|(_, c)| c).sum();
    eprintln!(
        "{READERS} remote readers, pace {PACE_MS} ms, {WINDOW:?}: xrange {xrange}, xread {xread}, all commands {total}: {stats:?}"
    );

    let local = local.await.unwrap();
    assert_eq!(local.text, text);
    let mut latencies = Vec::new();
    for reader in remote {
        let got = reader.await.unwrap();
        assert_eq!(got.text, text, "exact text, in order");
        assert_eq!(got.seqs, (0..got.seqs.len() as u64).collect::<Vec<_>>(), "no gap, no duplicate");
        assert_eq!(got.last, "done");
        for (seq, at) in &got.arrivals {
            if let Some((_, local_at)) = local.arrivals.iter().find(|(s, at)| s == seq && *at > live) {
                latencies.push(at.saturating_duration_since(*local_at));
            }
        }
    }
    latencies.sort();
    eprintln!(
        "cross-replica delivery of live events, after the local reader: p50 {:?}, p90 {:?}, max {:?} ({} deliveries)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 1.0),
        latencies.len()
    );
    // Polling every 25 ms would be READERS x 80 reads in the window
    // (1600), plus as many lease checks; following costs about a read per
    // event for the replica, whatever the number of its readers.
    let polls = READERS as u64 * (WINDOW.as_millis() as u64 / 25);
    assert!(xrange + xread < polls / 8, "{xrange} XRANGE + {xread} XREAD in {WINDOW:?} (polling: {polls})");
}

/// `INFO commandstats` of the server at `url`.
async fn command_stats(url: &str) -> Vec<(String, u64)> {
    let client = ::redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = ::redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    command_calls(&info)
}

/// Opens a paced echo stream of `text` on `app` and reads up to its start;
/// returns the body (with its parser and what it read) and the stream id.
async fn open_echo(
    app: &TestApp,
    token: &str,
    text: &str,
    pace_ms: u64,
) -> (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin + use<>, Parser, Vec<Event>, String) {
    let resp =
        app.get(&format!("/v1/stream?generator=echo&pace_ms={pace_ms}&prompt={}", urlencode(text)), Some(token)).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let seen =
        read_until(&mut body, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "start"))
            .await;
    let sid = messages(&seen)[0].1["stream_id"].as_str().unwrap().to_owned();
    (body, parser, seen, sid)
}

#[tokio::test]
async fn a_stream_followed_while_the_follower_blocks_on_another_is_watched_at_once() {
    let redis = RedisServer::start();
    let a = spawn_app_with(shared(&redis)).await;
    let b = spawn_app_with(shared(&redis)).await;
    ready(&a).await;
    ready(&b).await;
    let token = a.token("alice", "stream");
    // A slow stream keeps B's follower blocked on its key.
    let slow_text = "s".repeat(20);
    let (body, parser, seen, slow) = open_echo(&a, &token, &slow_text, 500).await;
    let slow_local = tokio::spawn(follow(body, parser, seen, Arc::new(AtomicUsize::new(0))));
    let following = Arc::new(AtomicUsize::new(0));
    let slow_remote =
        tokio::spawn(follow_response(b.get(&format!("/v1/streams/{slow}"), Some(&token)).await, following.clone()));
    eventually(LIMIT, "the slow stream is followed on B", || following.load(Ordering::SeqCst) == 1).await;
    // A second stream, followed on B from its start while the follower
    // blocks on the first: the follower is interrupted to watch it too.
    let text = "second: 你好 👩‍👩‍👧 e\u{301} 🇯🇵 end";
    let (body, parser, seen, fast) = open_echo(&a, &token, text, 40).await;
    let fast_local = tokio::spawn(follow(body, parser, seen, Arc::new(AtomicUsize::new(0))));
    let got = follow_response(b.get(&format!("/v1/streams/{fast}"), Some(&token)).await, following.clone()).await;
    assert_eq!(got.text, text);
    assert_eq!(got.seqs, (0..got.seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(got.last, "done");
    let stats = command_stats(&redis.url()).await;
    eprintln!("two streams followed on B: {stats:?}");
    assert!(calls_of(&stats, "client|unblock") >= 1, "the follower was never interrupted: {stats:?}");
    assert_eq!(fast_local.await.unwrap().text, text);
    let slow_got = slow_remote.await.unwrap();
    assert_eq!(slow_got.text, slow_text);
    assert_eq!(slow_got.last, "done");
    assert_eq!(slow_local.await.unwrap().text, slow_text);
}

#[tokio::test]
async fn a_remote_reader_gets_store_unavailable_when_redis_dies_and_following_resumes_after_restart() {
    let mut redis = RedisServer::start();
    let a = spawn_app_with(shared(&redis)).await;
    let b = spawn_app_with(shared(&redis)).await;
    ready(&a).await;
    ready(&b).await;
    let token = a.token("alice", "stream");
    let (body, parser, seen, sid) = open_echo(&a, &token, &"x".repeat(200), 100).await;
    let local = tokio::spawn(follow(body, parser, seen, Arc::new(AtomicUsize::new(0))));
    let resp = b.get(&format!("/v1/streams/{sid}"), Some(&token)).await;
    let mut remote = resp.bytes_stream();
    let mut parser = Parser::new();
    read_until(&mut remote, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "delta"))
        .await;

    redis.kill();
    // B's reader is waiting on the follower, which loses its connection:
    // the reader looks at Redis itself and ends, never hangs.
    let rest =
        read_until(&mut remote, &mut parser, LIMIT, |e| matches!(e, Event::Message { event, .. } if event == "error"))
            .await;
    assert_eq!(messages(&rest).pop().unwrap().1["code"], "store_unavailable");
    assert_eq!(local.await.unwrap().last, "error");

    redis.restart();
    ready(&a).await;
    ready(&b).await;
    let text = "after the restart: 你好 👩‍👩‍👧";
    let (body, parser, seen, sid) = open_echo(&a, &token, text, 40).await;
    let local = tokio::spawn(follow(body, parser, seen, Arc::new(AtomicUsize::new(0))));
    let got = follow_response(b.get(&format!("/v1/streams/{sid}"), Some(&token)).await, Arc::default()).await;
    assert_eq!(got.text, text);
    assert_eq!(got.seqs, (0..got.seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(got.last, "done");
    assert_eq!(local.await.unwrap().text, text);
    // The restarted server's counters: B's follower is back on XREAD.
    let stats = command_stats(&redis.url()).await;
    eprintln!("after the restart: {stats:?}");
    assert!(calls_of(&stats, "xread") >= 1, "{stats:?}");
}

#[tokio::test]
async fn without_client_commands_remote_readers_still_follow_every_event() {
    // `CLIENT` renamed away (as some managed Redis services restrict it):
    // the follower cannot interrupt its block, and is slower to watch a new
    // stream, but nothing is lost.
    let redis = RedisServer::start_with(&["--rename-command", "CLIENT", ""]);
    let a = spawn_app_with(shared(&redis)).await;
    let b = spawn_app_with(shared(&redis)).await;
    ready(&a).await;
    ready(&b).await;
    let token = a.token("alice", "stream");
    let text = "no CLIENT: 你好 👩‍👩‍👧 e\u{301} 🇯🇵";
    let (body, parser, seen, sid) = open_echo(&a, &token, text, 60).await;
    let local = tokio::spawn(follow(body, parser, seen, Arc::new(AtomicUsize::new(0))));
    let got = follow_response(b.get(&format!("/v1/streams/{sid}"), Some(&token)).await, Arc::default()).await;
    assert_eq!(got.text, text);
    assert_eq!(got.seqs, (0..got.seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(got.last, "done");
    assert_eq!(local.await.unwrap().text, text);
}
