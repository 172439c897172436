//! `idle`: open as many streams as asked (by default as many as the fd
//! limit allows), hold them with nothing to send but heartbeats, and measure
//! the server's RSS per open stream and the heartbeats each stream got.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::{Common, Errors, count, extend, resources, round3};
use crate::Result;
use crate::client::{self, Item, Method, ReadEnd, StreamSpec};
use crate::procfs::{self, Snapshot};
use crate::text;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `/v1/stream` with a very slow pace: a generation that has started
    /// and is waiting for its next character.
    Stream,
    /// `/v1/channels/{name}` subscriptions nobody publishes to.
    Channel,
}

#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Streams to hold; 0 = the soft fd limit (raised to the hard limit)
    /// minus `--reserve`.
    #[arg(long, default_value_t = 0)]
    pub conns: usize,
    /// File descriptors left unused when `--conns 0`.
    #[arg(long, default_value_t = 1000)]
    pub reserve: usize,
    /// What an open stream is.
    #[arg(long, value_enum, default_value = "stream")]
    pub kind: Kind,
    /// How long to hold every stream open once all are up, in seconds.
    #[arg(long, default_value_t = 12)]
    pub hold_secs: u64,
    /// Server heartbeat interval (for the expected count), in seconds.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_secs: u64,
    /// Pace of the idle streams (the server must allow it).
    #[arg(long, default_value_t = 60_000)]
    pub pace_ms: u64,
    /// Characters per idle stream.
    #[arg(long, default_value_t = 16)]
    pub chars: usize,
    #[arg(long, value_enum, default_value = "get")]
    pub method: Method,
    #[arg(long, default_value = "echo")]
    pub generator: String,
    /// Bound on opening every stream, in seconds.
    #[arg(long, default_value_t = 90)]
    pub ramp_secs: u64,
}

struct Held {
    heartbeats: Vec<Instant>,
    events: u64,
    ended_early: Option<String>,
}

pub async fn run(a: IdleArgs, soft_limit: u64) -> Result<Value> {
    let c = &a.common;
    let conns = if a.conns == 0 { (soft_limit as usize).saturating_sub(a.reserve) } else { a.conns };
    let tokens = c.tokens(conns)?;
    let host = c.host();
    let prompt = text::generate(a.chars, 1);
    let before = Snapshot::take(c.server_pid);
    let sem = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let (stop_tx, stop_rx) = watch::channel(false);
    let t_ramp = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..conns {
        let req = match a.kind {
            Kind::Stream => client::stream_request(&StreamSpec {
                target: c.target,
                method: a.method,
                host: &host,
                generator: &a.generator,
                text: &prompt,
                pace_ms: Some(a.pace_ms),
                token: tokens.get(i).map(String::as_str),
            }),
            Kind::Channel => client::simple_request(
                "GET",
                &host,
                &format!("/v1/channels/idle-{}", i % 100),
                tokens.get(i).map(String::as_str),
                None,
            ),
        };
        let sem = sem.clone();
        let opened = opened_tx.clone();
        let mut stop = stop_rx.clone();
        let addr = c.addr;
        let target = c.target;
        tasks.spawn(async move {
            let mut held = Held { heartbeats: Vec::new(), events: 0, ended_early: None };
            let permit = sem.acquire_owned().await;
            let mut body = match client::open_stream(addr, req).await {
                Ok(body) => body,
                Err(e) => {
                    let _ = opened.send(Err(e));
                    return held;
                }
            };
            let mut permit = Some(permit);
            let (end, _) = client::read_events(&mut body, Some(&mut stop), |event, now| {
                if let tokengate::sse::EventRef::Comment(_) = event {
                    held.heartbeats.push(now);
                    return true;
                }
                if let tokengate::sse::EventRef::Message { .. } = &event {
                    held.events += 1;
                    if permit.take().is_some() {
                        let _ = opened.send(Ok(()));
                    }
                    if let Item::Error(code) = client::classify(target, &event) {
                        held.ended_early = Some(format!("event_{code}"));
                    }
                }
                true
            })
            .await;
            if permit.is_some() {
                let _ = opened.send(Err("no_first_event".into()));
            }
            match end {
                ReadEnd::Stopped => {}
                ReadEnd::Eof => {
                    held.ended_early.get_or_insert_with(|| "eof".into());
                }
                ReadEnd::Error(_) => held.ended_early = Some("read_error".into()),
                ReadEnd::Handler => {}
            }
            held
        });
    }
    drop(opened_tx);

    // Wait until every stream is open (or failed), within the ramp bound.
    let mut opened = 0usize;
    let mut errors = Errors::new();
    let ramp_deadline = tokio::time::Instant::now() + Duration::from_secs(a.ramp_secs);
    let mut seen = 0usize;
    while seen < conns {
        match tokio::time::timeout_at(ramp_deadline, opened_rx.recv()).await {
            Ok(Some(Ok(()))) => opened += 1,
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
    eprintln!("idle: {opened}/{conns} streams open after {ramp_s:.1} s; holding {} s", a.hold_secs);

    // Hold.
    let hold_start_snapshot = Snapshot::take(c.server_pid);
    let hold_start = Instant::now();
    let mut peak = hold_start_snapshot.server_rss;
    let hold_end = tokio::time::Instant::now() + Duration::from_secs(a.hold_secs);
    while tokio::time::Instant::now() < hold_end {
        tokio::time::sleep_until(hold_end.min(tokio::time::Instant::now() + Duration::from_millis(500))).await;
        if let Some(r) = c.server_pid.and_then(procfs::rss_kib) {
            peak = Some(peak.map_or(r, |p| p.max(r)));
        }
    }
    let held_snapshot = Snapshot::take(c.server_pid);
    let held_at = Instant::now();
    let threads = c.server_pid.and_then(procfs::threads);
    let _ = stop_tx.send(true);

    let mut per_stream: Vec<u32> = Vec::with_capacity(opened);
    let mut ended_early = Errors::new();
    let mut events = 0u64;
    let close_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(close_deadline, tasks.join_next()).await {
            Ok(Some(Ok(h))) => {
                events += h.events;
                if h.events > 0 {
                    let n = h.heartbeats.iter().filter(|&&t| t >= hold_start && t <= held_at).count();
                    per_stream.push(n as u32);
                }
                if let Some(e) = h.ended_early {
                    count(&mut ended_early, e);
                }
            }
            Ok(Some(Err(_))) => count(&mut errors, "task_panic"),
            Ok(None) => break,
            Err(_) => {
                tasks.abort_all();
                break;
            }
        }
    }
    per_stream.sort_unstable();
    let hold = held_at - hold_start;
    let expected = (hold.as_secs_f64() / a.heartbeat_secs as f64).floor() as u32;
    let with_none = per_stream.iter().filter(|&&n| n == 0).count();
    let below_expected = per_stream.iter().filter(|&&n| n + 1 < expected.max(1)).count();
    let rss_delta = match (before.server_rss, held_snapshot.server_rss) {
        (Some(b), Some(h)) => Some(h.saturating_sub(b)),
        _ => None,
    };
    let per_stream_kib = rss_delta.filter(|_| opened > 0).map(|d| round3(d as f64 / opened as f64));
    let hold_cpu = match (hold_start_snapshot.server_cpu, held_snapshot.server_cpu) {
        (Some(a), Some(b)) => Some(round3(b - a)),
        _ => None,
    };
    let mut report = json!({
        "mode": "idle",
        "kind": a.kind,
        "conns": conns,
        "open_streams": opened,
        "ramp_s": round3(ramp_s),
        "hold_s": round3(hold.as_secs_f64()),
        "errors": errors,
        "ended_early": ended_early,
        "events_received": events,
        "server_rss_kib_held": held_snapshot.server_rss,
        "server_rss_kib_delta": rss_delta,
        "rss_kib_per_stream": per_stream_kib,
        "server_threads": threads,
        "server_cpu_s_during_hold": hold_cpu,
        "heartbeats": {
            "expected_per_stream": expected,
            "min": per_stream.first(),
            "p50": per_stream.get(per_stream.len() / 2),
            "max": per_stream.last(),
            "streams_with_none": with_none,
            "streams_below_expected": below_expected,
        },
        "heartbeats_flowing": opened > 0 && with_none == 0 && below_expected == 0,
    });
    extend(&mut report, resources(&before, &held_snapshot, peak));
    eprintln!(
        "idle {:?}: {opened} open; server RSS {:?} -> {:?} KiB = {:?} KiB/stream; heartbeats per stream min {:?} p50 {:?} (expected {expected}); errors {:?}",
        c.target,
        before.server_rss,
        held_snapshot.server_rss,
        per_stream_kib,
        per_stream.first(),
        per_stream.get(per_stream.len() / 2),
        report["errors"],
    );
    Ok(report)
}
