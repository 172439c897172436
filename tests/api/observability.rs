//! Metrics, request ids and structured logs.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn metrics_cover_streams_deltas_bytes_and_latencies() {
    let app = spawn_app().await;
    let events = read_events(app.stream("generator=echo&prompt=hello").await, Duration::from_secs(10)).await;
    assert_eq!(delta_text(&events), "hello");
    eventually(Duration::from_secs(5), "stream accounted", || app.state.slots.open() == 0).await;
    let text = app.get("/metrics", None).await.text().await.unwrap();
    for series in [
        "tokengate_streams_total{outcome=\"done\"} 1",
        "tokengate_deltas_sent_total 5",
        "tokengate_open_streams 0",
        "tokengate_time_to_first_delta_seconds_count 1",
        "tokengate_stream_duration_seconds_count 1",
        "tokengate_time_to_first_delta_seconds_bucket{le=\"0.005\"}",
    ] {
        assert!(text.contains(series), "missing `{series}` in:\n{text}");
    }
    assert!(app.metric("tokengate_stream_bytes_sent_total").await > 100.0);
}

#[tokio::test]
async fn a_finished_stream_gets_the_heap_trimmed_and_counted() {
    let app = spawn_app().await;
    let events = read_events(app.stream("generator=echo&prompt=hello").await, Duration::from_secs(10)).await;
    assert_eq!(delta_text(&events), "hello");
    // The trimmer waits for a tick without releases, and the other tests of
    // this process end streams and connections all the time: then it trims
    // once BUSY_TRIM_EVERY has passed. Bounded at that plus 10 s.
    let limit = tokengate::heap_trim::BUSY_TRIM_EVERY + Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let trims = app.metric("tokengate_heap_trims_total{released=\"true\"}").await
            + app.metric("tokengate_heap_trims_total{released=\"false\"}").await;
        if trims >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no heap trim counted after a stream ended");
        // Each look is a connection that ends (a release): looking less
        // often than every two ticks leaves the trimmer a quiet one.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_keeps_the_callers() {
    let app = spawn_app().await;
    let resp = app.get("/healthz", None).await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    let resp = app
        .client
        .get(format!("{}/v1/stream", app.base))
        .header("x-request-id", "from-the-proxy-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["x-request-id"], "from-the-proxy-42");
}
