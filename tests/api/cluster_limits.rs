//! Limits that hold across replicas: two replicas share a real
//! `redis-server` on loopback, and a subject's stream cap and request rate,
//! and an IP's rate, are one budget for both. A replica killed with SIGKILL
//! (the real binary) gives its slots back when its leases lapse, and with
//! Redis down the configured failure policy applies, counted in metrics.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokengate::sse::{Event, Parser};

use crate::helpers::*;
use crate::redis::{RedisServer, ready};

const LIMIT: Duration = Duration::from_secs(10);

/// Settings of a replica on `redis`: clients that leave free their stream
/// at once (no detach grace), rate limits off unless a test sets them.
fn replica(redis: &RedisServer) -> tokengate::config::Settings {
    let mut s = base_settings();
    s.redis_url = Some(redis.url());
    s
}

/// A direct connection to the test's Redis, to look at the keys.
async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// The same refusal in the OpenAI shape (`/v1/models`, an authenticated
/// route that costs nothing, answers in it).
async fn openai_refusal(resp: reqwest::Response, status: u16, code: &str) -> reqwest::header::HeaderMap {
    assert_eq!(resp.status(), status, "expected {status} {code}");
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    headers
}

fn is_delta(e: &Event) -> bool {
    matches!(e, Event::Message { event, .. } if event == "delta")
}

type Body = std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// Opens a probe stream (it stays open until dropped) and waits for its
/// first delta, so its slot is surely taken.
async fn open_probe(app: &TestApp, token: &str) -> Body {
    let resp = app.get("/v1/stream?generator=probe&prompt=xy", Some(token)).await;
    assert_eq!(resp.status(), 200);
    let mut body: Body = Box::pin(resp.bytes_stream());
    read_until(&mut body, &mut Parser::new(), LIMIT, is_delta).await;
    body
}

#[tokio::test]
async fn the_per_subject_stream_cap_holds_across_replicas() {
    let redis = RedisServer::start();
    let mut settings = replica(&redis);
    settings.max_streams_per_subject = Some(3);
    let a = spawn_app_with(settings.clone()).await;
    let b = spawn_app_with(settings).await;
    ready(&a).await;
    ready(&b).await;
    let alice = a.token("alice", "stream");
    let first = open_probe(&a, &alice).await;
    let _second = open_probe(&b, &alice).await;
    let _third = open_probe(&a, &alice).await;
    // Three across both replicas: the fourth is refused on either.
    for app in [&a, &b] {
        let headers = problem(app.get("/v1/stream?generator=probe", Some(&alice)).await, 429, "too_many_streams").await;
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(app.metric("tokengate_refusals_total{reason=\"too_many_streams\"}").await, 1.0);
    }
    assert_eq!(a.probe.started.load(Ordering::SeqCst) + b.probe.started.load(Ordering::SeqCst), 3);
    // B holds one stream locally: without the shared cap it would admit two more.
    assert_eq!(b.state.slots.open(), 1);
    // Another subject has its own cap.
    let _bob = open_probe(&b, &b.token("bob", "stream")).await;
    // The leases are in Redis, with an expiry.
    let mut conn = redis_conn(&redis).await;
    let held: usize = redis::cmd("ZCARD").arg("tg:slots:alice").query_async(&mut conn).await.unwrap();
    assert_eq!(held, 3);
    let pttl: i64 = redis::cmd("PTTL").arg("tg:slots:alice").query_async(&mut conn).await.unwrap();
    assert!(pttl > 0 && pttl <= 15_000, "the set expires with its last lease (default ttl 15 s): {pttl}");
    // A stream that ends on A frees its slot for B.
    drop(first);
    let deadline = Instant::now() + LIMIT;
    let _fourth = loop {
        let resp = b.get("/v1/stream?generator=probe&prompt=xy", Some(&alice)).await;
        if resp.status() == 200 {
            break resp;
        }
        assert_eq!(resp.status(), 429);
        assert!(Instant::now() < deadline, "A's released slot never reached B");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
}

#[tokio::test]
async fn the_per_subject_rate_limit_holds_across_replicas() {
    let redis = RedisServer::start();
    let mut settings = replica(&redis);
    settings.rate_subject_per_min = Some(60);
    settings.rate_subject_burst = Some(4);
    let a = spawn_app_with(settings.clone()).await;
    let b = spawn_app_with(settings).await;
    ready(&a).await;
    ready(&b).await;
    let alice = a.token("alice", "stream");
    // A burst of 4 spread over both replicas.
    for app in [&a, &b, &a, &b] {
        assert_eq!(app.get("/v1/models", Some(&alice)).await.status(), 200);
    }
    // The fifth is refused on either, with the cluster's wait.
    for app in [&a, &b] {
        let headers = openai_refusal(app.get("/v1/models", Some(&alice)).await, 429, "rate_limited_subject").await;
        assert_eq!(headers["ratelimit-limit"], "4");
        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=2).contains(&retry), "one request per second refills: {retry}");
    }
    assert_eq!(a.metric("tokengate_refusals_total{reason=\"rate_limited_subject\"}").await, 1.0);
    assert_eq!(b.metric("tokengate_refusals_total{reason=\"rate_limited_subject\"}").await, 1.0);
    // Another subject has its own budget.
    assert_eq!(b.get("/v1/models", Some(&b.token("bob", "stream"))).await.status(), 200);
    // The GCRA state expires once the bucket would be full again (at most
    // four intervals from now).
    let mut conn = redis_conn(&redis).await;
    let pttl: i64 = redis::cmd("PTTL").arg("tg:rate:s:alice").query_async(&mut conn).await.unwrap();
    assert!(pttl > 0 && pttl <= 4_000, "{pttl}");
    // One interval later, one more request is admitted, on either replica.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(b.get("/v1/models", Some(&alice)).await.status(), 200);
    assert_eq!(a.get("/v1/models", Some(&alice)).await.status(), 429);
}

#[tokio::test]
async fn the_per_ip_rate_limit_holds_across_replicas() {
    let redis = RedisServer::start();
    let mut settings = replica(&redis);
    settings.rate_ip_per_min = Some(60);
    settings.rate_ip_burst = Some(3);
    let a = spawn_app_with(settings.clone()).await;
    let b = spawn_app_with(settings).await;
    ready(&a).await;
    ready(&b).await;
    // Token guesses on A and B use up one budget for 127.0.0.1.
    assert_eq!(a.get("/v1/models", Some("guess-1")).await.status(), 401);
    assert_eq!(b.get("/v1/models", Some("guess-2")).await.status(), 401);
    assert_eq!(a.get("/v1/models", Some(&a.token("alice", "stream"))).await.status(), 200);
    for app in [&b, &a] {
        let headers =
            openai_refusal(app.get("/v1/models", Some(&app.token("alice", "stream"))).await, 429, "rate_limited_ip")
                .await;
        assert_eq!(headers["ratelimit-limit"], "3");
    }
    let mut conn = redis_conn(&redis).await;
    let exists: bool = redis::cmd("EXISTS").arg("tg:rate:ip:127.0.0.1").query_async(&mut conn).await.unwrap();
    assert!(exists);
}

/// Opens a demo stream on the replica binary, retrying while it is still
/// connecting to Redis (its first requests may get 503).
async fn open_demo_on(server: &crate::binary::Server, token: &str) -> reqwest::Response {
    let client = reqwest::Client::new();
    for _ in 0..200 {
        let resp = client
            .get(format!("{}/v1/stream?generator=demo&prompt=english", server.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            return resp;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the replica binary never accepted the stream");
}

#[tokio::test]
async fn a_killed_replicas_slots_come_back_within_the_lease_time() {
    let redis = RedisServer::start();
    let url = redis.url();
    // A: the real binary, so it can be killed without a goodbye.
    let mut a = crate::binary::start(
        &[
            "--jwt-secret",
            SECRET,
            "--redis-url",
            &url,
            "--max-streams-per-subject",
            "2",
            "--stream-lease-ttl",
            "2s",
            "--pace-ms",
            "500",
            "--detach-grace",
            "30s",
        ],
        &[],
        "listening on",
    );
    let mut settings = replica(&redis);
    settings.max_streams_per_subject = Some(2);
    settings.stream_lease_ttl = Some("2s".into());
    let b = spawn_app_with(settings).await;
    ready(&b).await;
    let alice = b.token("alice", "stream");
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let mut body: Body = Box::pin(open_demo_on(&a, &alice).await.bytes_stream());
        read_until(&mut body, &mut Parser::new(), LIMIT, is_delta).await;
        bodies.push(body);
    }
    // Both of alice's slots are A's now: B refuses her, also after more
    // than a lease ttl (A renews its leases while its streams run).
    problem(b.get("/v1/stream?generator=probe", Some(&alice)).await, 429, "too_many_streams").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    problem(b.get("/v1/stream?generator=probe", Some(&alice)).await, 429, "too_many_streams").await;
    // SIGKILL: A neither ends its streams nor releases their leases.
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let killed = Instant::now();
    drop(bodies);
    // The leases outlive A by up to their ttl: still refused right after.
    problem(b.get("/v1/stream?generator=probe", Some(&alice)).await, 429, "too_many_streams").await;
    let _stream = loop {
        let resp = b.get("/v1/stream?generator=probe&prompt=xy", Some(&alice)).await;
        if resp.status() == 200 {
            break resp;
        }
        assert_eq!(resp.status(), 429);
        assert!(killed.elapsed() < Duration::from_secs(6), "A's slots did not come back within the lease ttl");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let after = killed.elapsed();
    // A renewed every ~0.67 s, so its last leases lived at least ~1.3 s more.
    assert!(after >= Duration::from_secs(1), "freed before the leases could have lapsed: {after:?}");
    assert_eq!(b.probe.started.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_replica_stopped_with_sigterm_releases_its_slots_before_it_exits() {
    let redis = RedisServer::start();
    let url = redis.url();
    // The default lease ttl (15 s): a slot back at once was released.
    let mut a = crate::binary::start(
        &[
            "--jwt-secret",
            SECRET,
            "--redis-url",
            &url,
            "--max-streams-per-subject",
            "1",
            "--pace-ms",
            "500",
            "--shutdown-grace",
            "200ms",
        ],
        &[],
        "listening on",
    );
    let mut settings = replica(&redis);
    settings.max_streams_per_subject = Some(1);
    let b = spawn_app_with(settings).await;
    ready(&b).await;
    let alice = b.token("alice", "stream");
    let mut body: Body = Box::pin(open_demo_on(&a, &alice).await.bytes_stream());
    read_until(&mut body, &mut Parser::new(), LIMIT, is_delta).await;
    problem(b.get("/v1/stream?generator=probe", Some(&alice)).await, 429, "too_many_streams").await;
    let pid = a.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert_eq!(a.child.wait().unwrap().code(), Some(0));
    drop(body);
    let resp = b.get("/v1/stream?generator=probe&prompt=xy", Some(&alice)).await;
    assert_eq!(resp.status(), 200, "A's slot was not released when A stopped");
}

#[tokio::test]
async fn with_redis_down_the_failure_policy_applies_and_is_counted() {
    let mut redis = RedisServer::start();
    let mut settings = replica(&redis);
    settings.rate_ip_per_min = Some(60);
    settings.rate_ip_burst = Some(2);
    settings.rate_subject_per_min = Some(60);
    settings.rate_subject_burst = Some(10);
    let mut closed = settings.clone();
    closed.limits_on_store_failure = Some("closed".into());
    let mut open = settings;
    open.limits_on_store_failure = Some("open".into());
    let (a, b) = (spawn_app_with(closed).await, spawn_app_with(open).await);
    ready(&a).await;
    ready(&b).await;
    let alice = a.token("alice", "stream");
    assert_eq!(a.get("/v1/models", Some(&alice)).await.status(), 200);
    redis.kill();
    eventually(LIMIT, "both replicas see Redis down", || !a.state.store.is_healthy() && !b.state.store.is_healthy())
        .await;
    // Fail closed: refused, with the code and a retry hint.
    let headers = problem(a.get("/v1/stream?generator=probe", Some(&alice)).await, 503, "limits_unavailable").await;
    assert_eq!(headers["retry-after"], "1");
    let headers = openai_refusal(a.get("/v1/models", Some(&alice)).await, 503, "limits_unavailable").await;
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(a.metric("tokengate_refusals_total{reason=\"limits_unavailable\"}").await, 2.0);
    assert_eq!(a.metric("tokengate_limit_store_failures_total{policy=\"closed\"}").await, 2.0);
    assert_eq!(a.probe.started.load(Ordering::SeqCst), 0);
    // Fail open: B's own limits apply (an IP burst of 2 here).
    assert_eq!(b.get("/v1/models", Some(&alice)).await.status(), 200);
    assert_eq!(b.get("/v1/models", Some(&alice)).await.status(), 200);
    openai_refusal(b.get("/v1/models", Some(&alice)).await, 429, "rate_limited_ip").await;
    // Each request asked for the IP rate, the two admitted also for the
    // subject's: five failures, all counted under the open policy.
    assert_eq!(b.metric("tokengate_limit_store_failures_total{policy=\"open\"}").await, 5.0);
    assert_eq!(b.metric("tokengate_limit_store_failures_total{policy=\"closed\"}").await, 0.0);
    // Back to the cluster's limits once Redis is.
    redis.restart();
    ready(&a).await;
    assert_eq!(a.get("/v1/models", Some(&alice)).await.status(), 200);
}
