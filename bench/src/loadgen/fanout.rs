//! `fanout`: N subscribers on one channel, then M publishes `--interval-ms`
//! apart; every subscriber timestamps each delivery against the instant the
//! publisher sent it (same process, same monotonic clock).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::{Common, Errors, count, extend, resources, round3, rss_sampler};
use crate::Result;
use crate::client;
use crate::procfs::Snapshot;
use crate::stats::{summary_ms, us};

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscribers.
    #[arg(long, default_value_t = 5000)]
    pub subscribers: usize,
    /// Publishes.
    #[arg(long, default_value_t = 100)]
    pub publishes: u64,
    /// Time between publishes, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
    /// Channel name.
    #[arg(long, default_value = "bench")]
    pub channel: String,
    /// How long to wait for late deliveries after the last publish, in ms.
    #[arg(long, default_value_t = 3000)]
    pub linger_ms: u64,
    /// Bound on subscribing everyone, in seconds.
    #[arg(long, default_value_t = 60)]
    pub ramp_secs: u64,
}

#[derive(Deserialize)]
struct Payload {
    seq: u64,
    t_us: u64,
}

struct Sub {
    latencies: Vec<u32>,
    received: u64,
    duplicates: u64,
}

pub async fn run(a: FanoutArgs) -> Result<Value> {
    let c = &a.common;
    // Index `subscribers` is the publisher's token.
    let tokens = c.tokens(a.subscribers + 1)?;
    let host = c.host();
    let path = format!("/v1/channels/{}", a.channel);
    let base = Instant::now();
    let sem = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let t_ramp = Instant::now();
    for i in 0..a.subscribers {
        let req = client::simple_request("GET", &host, &path, tokens.get(i).map(String::as_str), None);
        let sem = sem.clone();
        let ready = ready_tx.clone();
        let mut stop = stop_rx.clone();
        let addr = c.addr;
        let last = a.publishes.saturating_sub(1);
        let publishes = a.publishes;
        tasks.spawn(async move {
            let mut sub = Sub { latencies: Vec::with_capacity(publishes as usize), received: 0, duplicates: 0 };
            let permit = sem.acquire_owned().await;
            let mut body = match client::open_stream(addr, req).await {
                Ok(body) => body,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return sub;
                }
            };
            let mut permit = Some(permit);
            let mut seen = vec![false; publishes as usize];
            let (_end, _) = client::read_events(&mut body, Some(&mut stop), |event, now| {
                let tokengate::sse::EventRef::Message { event, data, .. } = event else { return true };
                if event == "connected" {
                    if permit.take().is_some() {
                        let _ = ready.send(Ok(()));
                    }
                    return true;
                }
                let Ok(p) = serde_json::from_str::<Payload>(data) else { return true };
                let now_us = now.saturating_duration_since(base).as_micros() as u64;
                sub.latencies.push(u32::try_from(now_us.saturating_sub(p.t_us)).unwrap_or(u32::MAX));
                match seen.get_mut(p.seq as usize) {
                    Some(s) if *s => sub.duplicates += 1,
                    Some(s) => {
                        *s = true;
                        sub.received += 1;
                    }
                    None => {}
                }
                p.seq < last || sub.received < publishes
            })
            .await;
            if permit.is_some() {
                let _ = ready.send(Err("no_connected_event".into()));
            }
            sub
        });
    }
    drop(ready_tx);
    let mut subscribed = 0usize;
    let mut errors = Errors::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.ramp_secs);
    let mut seen = 0;
    while seen < a.subscribers {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => subscribed += 1,
            Ok(Some(Err(e))) => count(&mut errors, e),
            Ok(None) => break,
            Err(_) => {
                count(&mut errors, "ramp_timeout");
                break;
            }
        }
        seen += 1;
    }
    let ramp_s = t_ramp.elapsed().as_secs_f64();
    eprintln!("fanout: {subscribed}/{} subscribed after {ramp_s:.1} s", a.subscribers);

    // Publish.
    let before = Snapshot::take(c.server_pid);
    let (stop_sampler, sampler) = rss_sampler(c.server_pid, Duration::from_millis(200));
    let mut publisher = client::connect(c.addr).await?;
    let mut publish_rtt = Vec::with_capacity(a.publishes as usize);
    let mut tick = tokio::time::interval(Duration::from_millis(a.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let t0 = Instant::now();
    for seq in 0..a.publishes {
        tick.tick().await;
        if publisher.ready().await.is_err() {
            publisher = client::connect(c.addr).await?;
        }
        let sent = Instant::now();
        let t_us = sent.saturating_duration_since(base).as_micros() as u64;
        let body = json!({ "data": { "seq": seq, "t_us": t_us } }).to_string();
        let req =
            client::simple_request("POST", &host, &path, tokens.get(a.subscribers).map(String::as_str), Some(body));
        match publisher.send_request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let _ = resp.into_body().collect().await;
                publish_rtt.push(us(sent.elapsed()));
                if status != 200 {
                    count(&mut errors, format!("publish_status_{status}"));
                }
            }
            Err(_) => count(&mut errors, "publish_http"),
        }
    }
    let published_s = t0.elapsed().as_secs_f64();
    // Wait for everyone to have seen the last publish, within the linger.
    let mut lat = Vec::with_capacity(subscribed * a.publishes as usize);
    let mut received = 0u64;
    let mut duplicates = 0u64;
    let mut complete = 0usize;
    let linger = tokio::time::Instant::now() + Duration::from_millis(a.linger_ms);
    let mut stopped = false;
    loop {
        let next = if stopped {
            tokio::time::timeout(Duration::from_secs(10), tasks.join_next()).await
        } else {
            tokio::time::timeout_at(linger, tasks.join_next()).await
        };
        match next {
            Ok(Some(Ok(s))) => {
                if s.received == a.publishes {
                    complete += 1;
                }
                received += s.received;
                duplicates += s.duplicates;
                lat.extend(s.latencies);
            }
            Ok(Some(Err(_))) => count(&mut errors, "task_panic"),
            Ok(None) => break,
            Err(_) if !stopped => {
                let _ = stop_tx.send(true);
                stopped = true;
            }
            Err(_) => {
                tasks.abort_all();
                break;
            }
        }
    }
    let after = Snapshot::take(c.server_pid);
    let _ = stop_sampler.send(true);
    let peak = sampler.await.ok().flatten();
    let expected = subscribed as u64 * a.publishes;
    let mut report = json!({
        "mode": "fanout",
        "subscribers": a.subscribers,
        "subscribed": subscribed,
        "publishes": a.publishes,
        "interval_ms": a.interval_ms,
        "ramp_s": round3(ramp_s),
        "publish_s": round3(published_s),
        "deliveries_expected": expected,
        "deliveries": received,
        "duplicates": duplicates,
        "subscribers_complete": complete,
        "errors": errors,
        "latency_ms": summary_ms(&mut lat),
        "publish_rtt_ms": summary_ms(&mut publish_rtt),
    });
    extend(&mut report, resources(&before, &after, peak));
    eprintln!(
        "fanout {:?}: {subscribed} subscribers, {received}/{expected} deliveries; latency p50 {} p99 {} max {} ms; errors {}",
        c.target,
        report["latency_ms"]["p50"],
        report["latency_ms"]["p99"],
        report["latency_ms"]["max"],
        report["errors"],
    );
    Ok(report)
}
