//! `opens`: an open-loop schedule of short streams, `--rate` per second for
//! `--duration-secs`, over `--conns` kept-alive connections, each request
//! with the token of the next of `--subjects` subjects. Latency is measured
//! from the scheduled start (so a server that falls behind shows it) and
//! from the actual send.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Common, Errors, count, extend_resources, merge, resources, round3, rss_sampler};
use crate::Result;
use crate::client::{self, Item, Method, ReadEnd, Sender, StreamSpec};
use crate::procfs::Snapshot;
use crate::stats::{summary_ms, us};
use crate::text;

#[derive(Debug, Clone, clap::Args)]
pub struct OpensArgs {
    #[command(flatten)]
    pub common: Common,
    /// Stream opens per second (all connections together).
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Length of the schedule, in seconds.
    #[arg(long, default_value_t = 3.0)]
    pub duration_secs: f64,
    /// Distinct token subjects, used round robin.
    #[arg(long, default_value_t = 1000)]
    pub subjects: usize,
    /// Kept-alive connections carrying the opens.
    #[arg(long, default_value_t = 500)]
    pub conns: usize,
    /// Characters per stream.
    #[arg(long, default_value_t = 8)]
    pub chars: usize,
    #[arg(long, value_enum, default_value = "get")]
    pub method: Method,
    #[arg(long, default_value = "echo")]
    pub generator: String,
}

#[derive(Default)]
struct Totals {
    ok: u64,
    attempted: u64,
    chars: u64,
    late_sends: u64,
    latency_sched: Vec<u32>,
    latency_sent: Vec<u32>,
    ttfd: Vec<u32>,
    errors: Errors,
    last_done: Option<Instant>,
}

pub async fn run(a: OpensArgs) -> Result<Value> {
    let c = &a.common;
    let tokens = c.tokens(a.subjects)?;
    let host = Arc::new(c.host());
    let prompt: Arc<str> = Arc::from(text::generate(a.chars, 3).as_str());
    let conns = a.conns.max(1);

    let sem = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let mut connecting = JoinSet::new();
    for i in 0..conns {
        let sem = sem.clone();
        let addr = c.addr;
        connecting.spawn(async move {
            let _p = sem.acquire_owned().await;
            (i, client::connect(addr).await.ok())
        });
    }
    let mut senders: Vec<Option<Sender>> = (0..conns).map(|_| None).collect();
    while let Some(Ok((i, s))) = connecting.join_next().await {
        senders[i] = s;
    }

    let interval = Duration::from_secs_f64(conns as f64 / a.rate);
    let scheduled = (a.rate * a.duration_secs).round() as u64;
    let duration = Duration::from_secs_f64(a.duration_secs);
    let before = Snapshot::take(c.server_pid);
    let (stop_sampler, sampler) = rss_sampler(c.server_pid, Duration::from_millis(200));
    let t0 = Instant::now() + Duration::from_millis(20);
    let mut tasks = JoinSet::new();
    for (ci, sender) in senders.into_iter().enumerate() {
        let tokens = tokens.clone();
        let host = host.clone();
        let prompt = prompt.clone();
        let generator = a.generator.clone();
        let (target, method, addr, subjects) = (c.target, a.method, c.addr, a.subjects.max(1));
        tasks.spawn(async move {
            let mut t = Totals::default();
            let mut sender = sender;
            let offset = interval.mul_f64(ci as f64 / conns as f64);
            let mut k: u32 = 0;
            loop {
                // Request number `ci + k * conns` of `scheduled` in all.
                if ci + k as usize * conns >= scheduled as usize {
                    break;
                }
                let sched = t0 + offset + interval * k;
                let subject = (ci + k as usize * conns) % subjects;
                k += 1;
                tokio::time::sleep_until(sched.into()).await;
                t.attempted += 1;
                let mut s = match client::reuse_or_connect(sender.take(), addr).await {
                    Ok(s) => s,
                    Err(_) => {
                        count(&mut t.errors, "connect");
                        continue;
                    }
                };
                let req = client::stream_request(&StreamSpec {
                    target,
                    method,
                    host: &host,
                    generator: &generator,
                    text: &prompt,
                    pace_ms: Some(0),
                    token: tokens.get(subject).map(String::as_str),
                });
                let sent = Instant::now();
                if sent > sched + Duration::from_millis(1) {
                    t.late_sends += 1;
                }
                let resp = match s.send_request(req).await {
                    Ok(r) => r,
                    Err(_) => {
                        count(&mut t.errors, "http");
                        continue;
                    }
                };
                let status = resp.status().as_u16();
                if status != 200 {
                    count(&mut t.errors, format!("status_{status}"));
                    let _ = client::body_text(resp).await;
                    sender = Some(s);
                    continue;
                }
                let mut body = resp.into_body();
                let mut text = String::new();
                let mut done = false;
                let mut first: Option<Instant> = None;
                let mut error = None;
                let (end, _) = client::read_events(&mut body, None, |event, now| {
                    match client::classify(target, &event) {
                        Item::Delta(d) => {
                            first.get_or_insert(now);
                            text.push_str(&d);
                        }
                        Item::Done => done = true,
                        Item::Error(code) => error = Some(code),
                        _ => {}
                    }
                    true
                })
                .await;
                let now = Instant::now();
                t.last_done = Some(now);
                if let Some(f) = first {
                    t.ttfd.push(us(f - sent));
                }
                match (done, error, *text == *prompt) {
                    (true, None, true) => {
                        t.ok += 1;
                        t.chars += text.chars().count() as u64;
                        t.latency_sched.push(us(now.saturating_duration_since(sched)));
                        t.latency_sent.push(us(now - sent));
                    }
                    (_, Some(code), _) => count(&mut t.errors, format!("event_{code}")),
                    (false, None, _) => count(&mut t.errors, "no_terminal"),
                    (true, None, false) => count(&mut t.errors, "mismatch"),
                }
                if end == ReadEnd::Eof {
                    sender = Some(s);
                }
            }
            t
        });
    }
    let mut totals = Totals::default();
    let deadline = tokio::time::Instant::now() + duration + Duration::from_secs(c.max_secs);
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(t))) => {
                totals.ok += t.ok;
                totals.attempted += t.attempted;
                totals.chars += t.chars;
                totals.late_sends += t.late_sends;
                totals.latency_sched.extend(t.latency_sched);
                totals.latency_sent.extend(t.latency_sent);
                totals.ttfd.extend(t.ttfd);
                merge(&mut totals.errors, t.errors);
                totals.last_done = match (totals.last_done, t.last_done) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (x, y) => x.or(y),
                };
            }
            Ok(Some(Err(_))) => count(&mut totals.errors, "task_panic"),
            Ok(None) => break,
            Err(_) => {
                count(&mut totals.errors, "timeout");
                tasks.abort_all();
                break;
            }
        }
    }
    let after = Snapshot::take(c.server_pid);
    let _ = stop_sampler.send(true);
    let peak = sampler.await.ok().flatten();
    let end = totals.last_done.unwrap_or_else(Instant::now);
    let wall = end.saturating_duration_since(t0).as_secs_f64();
    let achieved = if wall > 0.0 { totals.ok as f64 / wall } else { 0.0 };
    let mut report = json!({
        "mode": "opens",
        "rate_target": a.rate,
        "duration_s": a.duration_secs,
        "subjects": a.subjects,
        "conns": conns,
        "chars_per_stream": a.chars,
        "opens_scheduled": scheduled,
        "opens_attempted": totals.attempted,
        "opens_ok": totals.ok,
        "late_sends": totals.late_sends,
        "errors": totals.errors,
        "wall_s": round3(wall),
        "opens_per_s": achieved.round(),
        "latency_from_schedule_ms": summary_ms(&mut totals.latency_sched),
        "latency_from_send_ms": summary_ms(&mut totals.latency_sent),
        "ttfd_ms": summary_ms(&mut totals.ttfd),
    });
    extend_resources(&mut report, resources(&before, &after, peak), "open", totals.ok);
    eprintln!(
        "opens {:?}: {}/{} ok in {:.2} s = {:.0}/s (target {}); latency from schedule p50 {} p99 {} ms; server cpu {} s; errors {}",
        c.target,
        totals.ok,
        scheduled,
        wall,
        achieved,
        a.rate,
        report["latency_from_schedule_ms"]["p50"],
        report["latency_from_schedule_ms"]["p99"],
        report["server_cpu_s"],
        report["errors"],
    );
    Ok(report)
}
