//! Usage quotas: charged as characters are delivered, enforced while
//! streaming in every dialect, shared by replicas through a real
//! redis-server, and reported by `GET /v1/usage`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tokengate::config::Settings;
use tokengate::quota::plan::{PlanSettings, QuotaSettings};
use tokengate::sse::Parser;

use crate::helpers::*;
use crate::redis::RedisServer;

const LIMIT: Duration = Duration::from_secs(10);

fn chars_per_hour(n: u64, reservation: u64) -> QuotaSettings {
    QuotaSettings {
        reservation: Some(reservation),
        default: PlanSettings { chars_per_hour: Some(n), ..PlanSettings::default() },
        ..QuotaSettings::default()
    }
}

fn with_quota(quota: QuotaSettings) -> Settings {
    let mut s = base_settings();
    s.quota = Some(quota);
    s
}

async fn usage(app: &TestApp, token: &str) -> Value {
    let r = app.get("/v1/usage", Some(token)).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn used(report: &Value) -> u64 {
    report["budgets"][0]["used"].as_u64().unwrap()
}

/// The kinds of the messages in a native stream, and its delta count.
fn outline(events: &[tokengate::sse::Event]) -> (usize, String, Value) {
    let all = messages(events);
    let deltas = all.iter().filter(|(e, _, _)| e == "delta").count();
    let (kind, data, _) = all.last().cloned().unwrap();
    (deltas, kind, data)
}

#[tokio::test]
async fn a_stream_ends_the_moment_the_budget_runs_out_and_the_next_is_refused() {
    let app = spawn_app_with(with_quota(chars_per_hour(50, 8))).await;
    let token = app.token("alice", "stream");
    let prompt = "x".repeat(80);
    let events =
        read_events(app.get(&format!("/v1/stream?generator=echo&prompt={prompt}"), Some(&token)).await, LIMIT).await;
    let (deltas, kind, data) = outline(&events);
    assert_eq!((deltas, kind.as_str(), data["code"].as_str()), (50, "error", Some("quota_exceeded")), "{data}");

    let report = usage(&app, &token).await;
    assert_eq!(report["limited"], true);
    assert_eq!(report["plan"], "default");
    assert_eq!(report["budgets"][0]["window"], "hour");
    assert_eq!(report["budgets"][0]["unit"], "chars");
    assert_eq!((used(&report), report["budgets"][0]["remaining"].as_u64()), (50, Some(0)));
    let reset_in = report["budgets"][0]["reset_in"].as_u64().unwrap();
    assert!((1..=3600).contains(&reset_in), "{report}");

    let refused = app.get("/v1/stream?generator=echo&prompt=hi", Some(&token)).await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry_after), "{retry_after}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "quota_exceeded");
    assert!(body["detail"].as_str().unwrap().contains("chars"), "{body}");
    // Another subject has its own budget.
    let bob = app.token("bob", "stream");
    let events = read_events(app.get("/v1/stream?generator=echo&prompt=hello", Some(&bob)).await, LIMIT).await;
    assert_eq!(delta_text(&events), "hello");
    assert_eq!(app.metric(r#"tokengate_streams_total{outcome="quota_exceeded"}"#).await, 1.0);
}

#[tokio::test]
async fn cut_and_cancelled_streams_are_charged_what_they_delivered() {
    // The reservation (64) is larger than what the streams deliver: only
    // what was delivered may stay charged.
    let app = spawn_app_with(with_quota(chars_per_hour(1000, 64))).await;
    let token = app.token("alice", "stream");
    // Cancelled: the probe yields its prompt (7 clusters), then waits; the
    // last cluster stays with the splitter (more text could extend it), so
    // 6 are delivered before the cancel.
    let resp = app
        .get(
            "/v1/stream?generator=probe&prompt=ab%F0%9F%91%A9%E2%80%8D%F0%9F%91%A9%E2%80%8D%F0%9F%91%A7cdef",
            Some(&token),
        )
        .await;
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let mut seen = read_until(
        &mut body,
        &mut parser,
        LIMIT,
        |e| matches!(e, tokengate::sse::Event::Message { data, .. } if data.contains("\"e\"")),
    )
    .await;
    let id = messages(&seen)
        .iter()
        .find_map(|(e, d, _)| (e == "start").then(|| d["stream_id"].as_str().unwrap().to_owned()))
        .unwrap();
    let r = app.client.delete(format!("{}/v1/streams/{id}", app.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 204);
    seen.extend(
        read_until(
            &mut body,
            &mut parser,
            LIMIT,
            |e| matches!(e, tokengate::sse::Event::Message { event, .. } if event == "error"),
        )
        .await,
    );
    let (delivered, _, end) = outline(&seen);
    assert_eq!((delivered, end["code"].as_str()), (6, Some("cancelled")));
    drop(body);
    let app_ref = &app;
    let token_ref = &token;
    let mut charged = 0;
    for _ in 0..100 {
        charged = used(&usage(app_ref, token_ref).await);
        if charged == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(charged, 6, "a cancelled stream is charged its 6 delivered clusters, not its reservation of 64");

    // Cut: the client leaves mid-stream (no detach grace): charged what was
    // produced before the generator stopped, which is at most the text.
    let resp = app.get("/v1/stream?generator=choppy&prompt=hello", Some(&token)).await;
    let events = read_events(resp, LIMIT).await;
    let delivered = messages(&events).iter().filter(|(e, _, _)| e == "delta").count() as u64;
    for _ in 0..100 {
        charged = used(&usage(app_ref, token_ref).await);
        if charged == 6 + delivered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(charged, 6 + delivered);
}

#[tokio::test]
async fn when_one_stream_exhausts_the_budget_the_subjects_other_streams_end_too() {
    let app = spawn_app_with(with_quota(chars_per_hour(20, 4))).await;
    let token = app.token("alice", "stream");
    // A waits after 4 clusters (the splitter keeps the 5th until more text
    // or the end); B then uses the rest of the budget.
    let a = app.get("/v1/stream?generator=probe&prompt=abcde", Some(&token)).await;
    let mut a_body = a.bytes_stream();
    let mut a_parser = Parser::new();
    read_until(
        &mut a_body,
        &mut a_parser,
        LIMIT,
        |e| matches!(e, tokengate::sse::Event::Message { data, .. } if data.contains("\"d\"")),
    )
    .await;
    let b = read_events(
        app.get(&format!("/v1/stream?generator=echo&prompt={}", "y".repeat(40)), Some(&token)).await,
        LIMIT,
    )
    .await;
    let (b_deltas, b_kind, b_data) = outline(&b);
    assert_eq!((b_kind.as_str(), b_data["code"].as_str()), ("error", Some("quota_exceeded")));
    let rest = read_until(
        &mut a_body,
        &mut a_parser,
        LIMIT,
        |e| matches!(e, tokengate::sse::Event::Message { event, .. } if event == "error"),
    )
    .await;
    let (_, kind, data) = outline(&rest);
    assert_eq!((kind.as_str(), data["code"].as_str()), ("error", Some("quota_exceeded")), "A ends at once too");
    // Nothing more was charged than delivered: A's unused allowance is back.
    eventually(LIMIT, "the probe was dropped", || app.probe.dropped.load(std::sync::atomic::Ordering::SeqCst) == 1)
        .await;
    let mut charged = 0;
    for _ in 0..100 {
        charged = used(&usage(&app, &token).await);
        if charged == 4 + b_deltas as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(charged, 4 + b_deltas as u64);
    assert!(b_deltas >= 20 - 4 - 4, "B got the budget A had not reserved: {b_deltas}");
}

#[tokio::test]
async fn plans_follow_the_class_claim_then_the_scope() {
    let mut quota = chars_per_hour(5, 2);
    quota.claim = Some("tier".into());
    quota.classes =
        BTreeMap::from([("pro".to_owned(), PlanSettings { chars_per_day: Some(100), ..PlanSettings::default() })]);
    quota.scopes = BTreeMap::from([("admin".to_owned(), PlanSettings::default())]);
    let app = spawn_app_with(with_quota(quota)).await;
    let pro = hs256(json!({ "sub": "p", "exp": now() + 600, "scope": "stream", "tier": "pro" }));
    let report = usage(&app, &pro).await;
    assert_eq!((report["plan"].as_str(), report["budgets"][0]["window"].as_str()), (Some("class:pro"), Some("day")));
    let events = read_events(app.get("/v1/stream?generator=echo&prompt=abcdefghij", Some(&pro)).await, LIMIT).await;
    assert_eq!(delta_text(&events), "abcdefghij", "the pro plan allows 100 a day");
    let admin = app.token("root", "stream admin");
    let report = usage(&app, &admin).await;
    assert_eq!((report["plan"].as_str(), report["limited"].as_bool()), (Some("scope:admin"), Some(false)));
    let events = read_events(app.get("/v1/stream?generator=echo&prompt=abcdefghij", Some(&admin)).await, LIMIT).await;
    assert_eq!(delta_text(&events), "abcdefghij", "an empty plan is unlimited");
    let free = hs256(json!({ "sub": "f", "exp": now() + 600, "scope": "stream", "tier": "free" }));
    let events = read_events(app.get("/v1/stream?generator=echo&prompt=abcdefghij", Some(&free)).await, LIMIT).await;
    assert_eq!(outline(&events).0, 5, "an unknown class gets the default plan");
}

#[tokio::test]
async fn quotas_off_report_unlimited() {
    let app = spawn_app().await;
    let report = usage(&app, &app.token("alice", "stream")).await;
    assert_eq!(report, json!({ "subject": "alice", "limited": false, "plan": null, "budgets": [] }));
    assert_eq!(app.get("/v1/usage", None).await.status(), 401);
}

/// Each dialect ends a stream the quota cut in its own form, and the
/// upstream request is dropped.
#[tokio::test]
async fn every_dialect_ends_in_its_own_form_and_the_upstream_is_dropped() {
    let mock = crate::mock_upstream::start().await;
    let mut settings = with_quota(chars_per_hour(6, 2));
    let up = tokengate::generator::upstream::UpstreamSettings {
        base_url: mock.base_url(),
        model: "slow".into(),
        first_byte_timeout: Some("2s".into()),
        idle_timeout: Some("2s".into()),
        retries: Some(0),
        ..Default::default()
    };
    settings.upstreams = Some(BTreeMap::from([("up".to_owned(), up)]));
    let app = spawn_app_with(settings).await;
    let long = "z".repeat(30);

    // Chat completions: finish_reason length, and why in `tokengate`.
    let token = app.token("chat", "stream");
    let r = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .bearer_auth(&token)
        .json(&json!({ "model": "up", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": long}] }))
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    let chunks: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "zzzzzz");
    let finish = chunks.iter().find(|c| c["choices"][0]["finish_reason"].is_string()).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(finish["tokengate"]["code"], "quota_exceeded");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
    assert!(body.ends_with("data: [DONE]\n\n"));
    assert!(!body.contains("\"error\""), "{body}");
    eventually(LIMIT, "the upstream request was dropped", || {
        mock.seen.dropped.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;

    // Chat completions without streaming: the delivered text, a length finish.
    let token = app.token("chat2", "stream");
    let r = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .bearer_auth(&token)
        .json(&json!({ "model": "up", "messages": [{"role": "user", "content": long}] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let completion: Value = r.json().await.unwrap();
    assert_eq!(completion["choices"][0]["message"]["content"], "zzzzzz");
    assert_eq!(completion["choices"][0]["finish_reason"], "length");
    assert_eq!(completion["tokengate"]["code"], "quota_exceeded");

    // Anthropic Messages: stop_reason max_tokens.
    let token = app.token("msg", "stream");
    let r = app
        .client
        .post(format!("{}/v1/messages", app.base))
        .header("x-api-key", &token)
        .json(&json!({ "model": "up", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": long}] }))
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    assert!(body.contains(r#""stop_reason":"max_tokens""#), "{body}");
    assert!(body.contains(r#""code":"quota_exceeded""#), "{body}");
    assert!(body.trim_end().ends_with(r#"data: {"type":"message_stop"}"#), "{body}");

    // Responses: incomplete, with the reason.
    let token = app.token("resp", "stream");
    let r = app
        .client
        .post(format!("{}/v1/responses", app.base))
        .bearer_auth(&token)
        .json(&json!({ "model": "up", "stream": true, "input": long }))
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    assert!(body.contains("event: response.incomplete"), "{body}");
    assert!(body.contains(r#""reason":"quota_exceeded""#), "{body}");

    // AI SDK: a length finish whose metadata says why.
    let token = app.token("ui", "stream");
    let r = app
        .client
        .post(format!("{}/v1/ui/chat", app.base))
        .bearer_auth(&token)
        .json(&json!({ "id": "c1", "model": "up", "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": long}]}] }))
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    assert!(body.contains(r#""finishReason":"length""#), "{body}");
    assert!(body.contains(r#""code":"quota_exceeded""#), "{body}");
    assert!(!body.contains(r#""type":"error""#), "{body}");
}

/// Reported model tokens are charged as they are reported; a token budget
/// used up refuses the next stream.
#[tokio::test]
async fn reported_tokens_are_charged() {
    let mock = crate::mock_upstream::start().await;
    let mut quota = QuotaSettings::default();
    quota.default.tokens_per_day = Some(40);
    let mut settings = with_quota(quota);
    let up = tokengate::generator::upstream::UpstreamSettings {
        base_url: mock.base_url(),
        model: "normal".into(),
        retries: Some(0),
        ..Default::default()
    };
    settings.upstreams = Some(BTreeMap::from([("up".to_owned(), up)]));
    let app = spawn_app_with(settings).await;
    let token = app.token("alice", "stream");
    let events = read_events(app.get("/v1/stream?generator=up&prompt=hello", Some(&token)).await, LIMIT).await;
    assert_eq!(outline(&events).1, "done");
    let report = usage(&app, &token).await;
    assert_eq!((report["budgets"][0]["unit"].as_str(), used(&report)), (Some("tokens"), 33), "{report}");
    // 33 of 40: admitted, and its 33 more fill the budget.
    let events = read_events(app.get("/v1/stream?generator=up&prompt=hello", Some(&token)).await, LIMIT).await;
    assert_eq!(outline(&events).1, "done");
    let refused = app.get("/v1/stream?generator=up&prompt=hello", Some(&token)).await;
    assert_eq!(refused.status(), 429);
    assert!(app.metric(r#"tokengate_quota_charged_total{unit="tokens"}"#).await >= 66.0);
}

/// With Redis, replicas share one budget: concurrent streams of one
/// subject on two replicas never deliver more than it, and what they
/// delivered is exactly what is charged.
#[tokio::test]
async fn replicas_share_the_budget_without_overshoot() {
    let redis = RedisServer::start();
    let settings = || {
        let mut s = with_quota(chars_per_hour(100, 10));
        s.redis_url = Some(redis.url());
        s
    };
    let a = spawn_app_with(settings()).await;
    let b = spawn_app_with(settings()).await;
    crate::redis::ready(&a).await;
    crate::redis::ready(&b).await;
    let token = a.token("alice", "stream");
    let prompt = "q".repeat(40);
    let opens = (0..8).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let (token, prompt) = (token.clone(), prompt.clone());
        async move {
            let r = app.get(&format!("/v1/stream?generator=echo&prompt={prompt}"), Some(&token)).await;
            if r.status() != 200 {
                return (0, r.status().as_u16().to_string());
            }
            let events = read_events(r, LIMIT).await;
            let (deltas, kind, data) = outline(&events);
            (deltas as u64, if kind == "error" { data["code"].as_str().unwrap().to_owned() } else { kind })
        }
    });
    let results = futures_util::future::join_all(opens).await;
    let delivered: u64 = results.iter().map(|(n, _)| n).sum();
    assert!(delivered <= 100, "the replicas together delivered {delivered} of a budget of 100: {results:?}");
    assert!(delivered >= 100 - 8 * 10, "at most one reservation per stream is left unused: {results:?}");
    for (_, end) in &results {
        assert!(["done", "quota_exceeded", "429"].contains(&end.as_str()), "{results:?}");
    }
    let mut charged = 0;
    for _ in 0..100 {
        charged = used(&usage(&b, &token).await);
        if charged == delivered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(charged, delivered, "both replicas see one counter, equal to what was delivered");
}

/// The official `openai` and `anthropic` Python SDKs read a quota cut as
/// their protocol's length stop, with the explanation, and the next
/// request as a rate-limit error.
#[tokio::test]
async fn the_official_sdks_see_a_length_stop_and_then_a_rate_limit() {
    let python = python_with("openai, anthropic");
    let app = spawn_app_with(with_quota(chars_per_hour(12, 4))).await;
    let token = app.token("sdk-openai", "stream");
    let token2 = app.token("sdk-anthropic", "stream");
    let env = [("EXPECTED_CHARS", "12"), ("TOKENGATE_TOKEN_2", token2.as_str())];
    run_client_check(&python, "tests/python/quota_sdk_check.py", &app, &token, &env, "quota sdk ok").await;
}

/// A replica killed mid-stream loses at most its stream's unused
/// reservation: the budget stays charged for it, never for more.
#[tokio::test]
async fn a_killed_replica_costs_at_most_its_unused_reservation() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("tokengate-quota-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tokengate.toml");
    std::fs::write(&config, "[quota]\nreservation = 50\n[quota.default]\nchars_per_hour = 1000\n").unwrap();
    let url = redis.url();
    let mut a = crate::binary::start(
        &["--config", config.to_str().unwrap(), "--jwt-secret", SECRET, "--redis-url", &url, "--detach-grace", "30s"],
        &[],
        "listening on",
    );
    let b = spawn_app_with({
        let mut s = with_quota(QuotaSettings {
            reservation: Some(50),
            default: PlanSettings { chars_per_hour: Some(1000), ..PlanSettings::default() },
            ..QuotaSettings::default()
        });
        s.redis_url = Some(url.clone());
        s
    })
    .await;
    let token = b.token("alice", "stream");
    let client = reqwest::Client::new();
    let mut resp = None;
    for _ in 0..100 {
        let r = client
            .get(format!("{}/v1/stream?generator=echo&pace_ms=100&prompt={}", a.base, "k".repeat(40)))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            resp = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut body = resp.expect("replica A accepted the stream").bytes_stream();
    let mut parser = Parser::new();
    let seen = read_until(
        &mut body,
        &mut parser,
        LIMIT,
        |e| matches!(e, tokengate::sse::Event::Message { id: Some(id), .. } if id.ends_with(".3")),
    )
    .await;
    assert!(outline(&seen).0 >= 3);
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let report = usage(&b, &token).await;
    assert_eq!(used(&report), 50, "the dead replica's reservation stays charged, and nothing more: {report}");
}
