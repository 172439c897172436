//! `loris`: a slow-loris flood. A normal client opens short streams at a
//! steady rate, each on a fresh connection (so accepting is part of what it
//! measures), from its own thread and runtime (so the flood's bookkeeping
//! does not delay its clock). After a baseline phase, `--loris` TCP
//! connections are opened that never send a byte (`--waves` times, one
//! after the other); the server's header timeout should close each of
//! them, and the normal client should not notice. Reported per wave: how
//! many the server closed and after how long (from the client's `connect`
//! call), any closed before the timeout or still open past it plus slack,
//! the most open at once, the normal client's time to first byte and first
//! delta per phase (baseline, each flood, after each), its errors, and the
//! server's RSS, CPU and file descriptors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::{RssTrace, fds, metric, peak_between, rss_at, s3, scrape};
use crate::Result;
use crate::client::{self, Item, Method, StreamSpec, Target};
use crate::loadgen::{Common, Errors, count, extend, resources, round3};
use crate::procfs::{self, Snapshot};
use crate::stats::{summary_ms, us};

#[derive(Debug, Clone, clap::Args)]
pub struct LorisArgs {
    #[command(flatten)]
    pub common: Common,
    /// Loris connections; 0 = the soft fd limit (raised to the hard limit)
    /// minus `--reserve`.
    #[arg(long, default_value_t = 0)]
    pub loris: usize,
    /// File descriptors left for the normal client and the runtime when
    /// `--loris 0`.
    #[arg(long, default_value_t = 200)]
    pub reserve: usize,
    /// The server's `header_timeout`, in seconds: what the closes are
    /// checked against (the run does not set it; the script passes both).
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout_secs: f64,
    /// Allowed beyond the header timeout (accept queue, timer wheel).
    #[arg(long, default_value_t = 5.0)]
    pub slack_secs: f64,
    /// How much longer a loris connection is watched after timeout plus
    /// slack, to tell "closed late" from "never closed".
    #[arg(long, default_value_t = 5.0)]
    pub watch_extra_secs: f64,
    /// Normal client: stream opens per second.
    #[arg(long, default_value_t = 40.0)]
    pub rate: f64,
    /// Normal client alone before the flood, in seconds.
    #[arg(long, default_value_t = 8.0)]
    pub baseline_secs: f64,
    /// Normal client alone after each wave's last loris connection closed.
    #[arg(long, default_value_t = 4.0)]
    pub after_secs: f64,
    /// Floods one after the other on the same server: RSS that a second
    /// wave reuses is the allocator keeping memory, not a leak.
    #[arg(long, default_value_t = 1)]
    pub waves: usize,
    /// Characters per normal stream.
    #[arg(long, default_value_t = 16)]
    pub chars: usize,
    /// Bound on one normal open (connect to `done`), in seconds.
    #[arg(long, default_value_t = 10)]
    pub open_timeout_secs: u64,
    /// Token subjects of the normal client, round robin.
    #[arg(long, default_value_t = 16)]
    pub subjects: usize,
    #[arg(long, value_enum, default_value = "get")]
    pub method: Method,
    #[arg(long, default_value = "echo")]
    pub generator: String,
}

/// One open of the normal client; times in microseconds from its start
/// (before connecting).
#[derive(Debug, Default)]
struct Open {
    /// When it was scheduled, seconds after t0.
    sched_s: f64,
    connect: Option<u32>,
    /// Response head received.
    ttfb: Option<u32>,
    /// First delta received.
    ttfd: Option<u32>,
    error: Option<String>,
}

/// How one loris connection ended.
#[derive(Debug)]
enum End {
    /// The server closed it (FIN).
    Eof,
    /// The server reset it.
    Reset,
    /// Still open when the watch ended.
    Watched,
}

#[derive(Debug)]
struct Loris {
    /// Connect error, if the connection was never made.
    failed: Option<String>,
    /// When `connect` was called, seconds after t0.
    called_s: f64,
    /// Seconds from the call until connected.
    connect_s: f64,
    /// Seconds from the call to the end below: at least the header timeout
    /// if the server's timer (which starts once it has accepted) is right.
    lasted_s: f64,
    end: End,
    /// First bytes the server sent, if any (a 408 would show here).
    answer: Option<Vec<u8>>,
}

struct Normal {
    addr: SocketAddr,
    target: Target,
    method: Method,
    generator: String,
    prompt: String,
    rate: f64,
    timeout: Duration,
    tokens: Arc<Vec<String>>,
}

pub async fn run(a: LorisArgs, soft_limit: u64) -> Result<Value> {
    let c = &a.common;
    let n = if a.loris == 0 { (soft_limit as usize).saturating_sub(a.reserve) } else { a.loris };
    let tokens = c.tokens(a.subjects.max(1))?;

    let t0 = Instant::now();
    let trace = RssTrace::start(c.server_pid, t0, Duration::from_millis(100));
    let (stop_tx, stop_rx) = watch::channel(false);
    let normal = Normal {
        addr: c.addr,
        target: c.target,
        method: a.method,
        generator: a.generator.clone(),
        prompt: crate::text::generate(a.chars, 5),
        rate: a.rate.max(0.1),
        timeout: Duration::from_secs(a.open_timeout_secs.max(1)),
        tokens,
    };
    let normal = std::thread::spawn(move || normal_client(normal, t0, stop_rx));

    tokio::time::sleep(Duration::from_secs_f64(a.baseline_secs)).await;
    let mut waves = Vec::new();
    for w in 0..a.waves.max(1) {
        let wave = flood(&a, n, t0, w + 1).await;
        // The normal client alone again before the next wave, or the end.
        let until = t0 + Duration::from_secs_f64(wave.end + a.after_secs);
        tokio::time::sleep_until(until.into()).await;
        waves.push(wave);
    }
    let _ = stop_tx.send(true);
    let opens = match tokio::task::spawn_blocking(move || normal.join()).await {
        Ok(Ok(Ok(opens))) => opens,
        Ok(Ok(Err(e))) => return Err(e.into()),
        _ => return Err("the normal client's thread failed".into()),
    };
    let end = t0.elapsed().as_secs_f64();
    let at_end = Snapshot::take(c.server_pid);
    let samples = trace.finish().await;

    // Normal client figures per phase (by scheduled time): the baseline,
    // each wave's flood (opening the connections, then the rest until the
    // last close), the quiet after each wave.
    let phase = |from: f64, to: f64| {
        let mut set: Vec<&Open> = opens.iter().filter(|o| o.sched_s >= from && o.sched_s < to).collect();
        phase_figures(&mut set, from, to)
    };
    let mut phases = vec![("baseline".to_owned(), phase(0.0, waves[0].start))];
    for (i, w) in waves.iter().enumerate() {
        let next = waves.get(i + 1).map_or(end + 1.0, |x| x.start);
        phases.push((format!("flood_{}", w.number), phase(w.start, w.end)));
        phases.push((format!("flood_{}_opening", w.number), phase(w.start, w.ramp_done.min(w.end))));
        phases.push((format!("flood_{}_rest", w.number), phase(w.ramp_done.min(w.end), w.end)));
        phases.push((format!("after_{}", w.number), phase(w.end, next)));
    }
    let phases: serde_json::Map<String, Value> = phases.into_iter().collect();
    let ratio = |key: &str, q: &str| {
        let f = phases.get(key)?["ttfd_ms"][q].as_f64()?;
        let b = phases.get("baseline")?["ttfd_ms"][q].as_f64()?;
        (b > 0.0).then(|| round3(f / b))
    };
    let mut waves_json = Vec::new();
    for w in &waves {
        let mut j = w.figures.clone();
        let key = format!("flood_{}", w.number);
        extend(
            &mut j,
            json!({
                "server_rss_kib_before": rss_at(&samples, w.start),
                "server_rss_kib_peak": peak_between(&samples, w.start, w.end),
                "server_rss_kib_after": rss_at(&samples, w.end + a.after_secs),
                "ttfd_ratio_to_baseline": { "p50": ratio(&key, "p50"), "p99": ratio(&key, "p99") },
            }),
        );
        waves_json.push(j);
    }
    let first = &waves[0];
    let mut report = json!({
        "mode": "loris",
        "loris_requested": n,
        "fd_soft_limit": soft_limit,
        "reserve": a.reserve,
        "header_timeout_s": a.header_timeout_secs,
        "slack_s": a.slack_secs,
        "waves": waves_json,
        "normal": {
            "rate": a.rate,
            "chars": a.chars,
            "fresh_connection_per_open": true,
            "phases": phases,
        },
        "server_rss_kib_before_flood": rss_at(&samples, first.start),
        "server_rss_kib_end": at_end.server_rss,
        "errors": Errors::new(),
    });
    extend(&mut report, resources(&first.at_start, &at_end, peak_between(&samples, 0.0, end)));
    for w in &report["waves"].as_array().cloned().unwrap_or_default() {
        let p = &report["normal"]["phases"];
        let k = format!("flood_{}", w["wave"]);
        eprintln!(
            "loris wave {}: {}/{n} connected, peak {} at once; closed by the server {} (in time {}, late {}), open at \
             watch end {}; connect call to close min {} p50 {} max {} ms; normal ttfd p50/p99 baseline {}/{} flood {}/{} ms, \
             errors {}; RSS {} -> peak {} -> after {} KiB",
            w["wave"],
            w["connected"],
            w["peak_concurrent"],
            w["closed_by_server"],
            w["closed_within_timeout_plus_slack"],
            w["closed_late"],
            w["open_at_watch_end"],
            w["close_after_connect_call_min_ms"],
            w["close_after_connect_call_ms"]["p50"],
            w["close_after_connect_call_ms"]["max"],
            p["baseline"]["ttfd_ms"]["p50"],
            p["baseline"]["ttfd_ms"]["p99"],
            p[&k]["ttfd_ms"]["p50"],
            p[&k]["ttfd_ms"]["p99"],
            p[&k]["errors"],
            w["server_rss_kib_before"],
            w["server_rss_kib_peak"],
            w["server_rss_kib_after"],
        );
    }
    Ok(report)
}

/// One wave of the flood, its figures and timeline (seconds after t0).
struct Wave {
    number: usize,
    start: f64,
    ramp_done: f64,
    end: f64,
    at_start: Snapshot,
    figures: Value,
}

/// Opens `n` connections that never send a byte and watches each until the
/// server closes it or the watch ends.
async fn flood(a: &LorisArgs, n: usize, t0: Instant, number: usize) -> Wave {
    let c = &a.common;
    let refusals =
        |m: Option<String>| m.and_then(|t| metric(&t, "tokengate_refusals_total", "reason=\"header_timeout\""));
    let refusals_before = refusals(scrape(c.addr).await);
    let start = t0.elapsed().as_secs_f64();
    let at_start = Snapshot::take(c.server_pid);
    eprintln!("loris wave {number}: at {start:.1} s, opening {n} connections that send nothing");
    let watch_for = Duration::from_secs_f64(a.header_timeout_secs + a.slack_secs + a.watch_extra_secs);
    let sem = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let (tried_tx, mut tried_rx) = mpsc::unbounded_channel::<()>();
    let mut set = JoinSet::new();
    for _ in 0..n {
        let (sem, tried, addr) = (sem.clone(), tried_tx.clone(), c.addr);
        set.spawn(async move {
            let permit = sem.acquire_owned().await;
            let called = Instant::now();
            let called_s = (called - t0).as_secs_f64();
            let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await;
            drop(permit);
            let _ = tried.send(());
            match tcp {
                Ok(Ok(tcp)) => hold(tcp, called, called_s, watch_for).await,
                Ok(Err(e)) => Loris::failed(format!("connect_{:?}", e.kind()), called_s),
                Err(_) => Loris::failed("connect_timeout".into(), called_s),
            }
        });
    }
    drop(tried_tx);

    // Until every connect was tried: the server's descriptors now and then.
    let mut server_fds_peak: Option<u64> = None;
    let mut tried = 0usize;
    let ramp_bound = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut fd_tick = tokio::time::interval(Duration::from_millis(500));
    fd_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while tried < n {
        tokio::select! {
            r = tokio::time::timeout_at(ramp_bound, tried_rx.recv()) => match r {
                Ok(Some(())) => tried += 1,
                _ => break,
            },
            _ = fd_tick.tick() => {
                let f = c.server_pid.and_then(fds);
                server_fds_peak = server_fds_peak.max(f);
            }
        }
    }
    let ramp_done = t0.elapsed().as_secs_f64();
    server_fds_peak = server_fds_peak.max(c.server_pid.and_then(fds));
    let server_threads = c.server_pid.and_then(procfs::threads);
    eprintln!("loris wave {number}: {tried}/{n} connect attempts done after {:.1} s", ramp_done - start);

    let mut lorises = Vec::with_capacity(n);
    let mut errors = Errors::new();
    let bound = tokio::time::Instant::now() + watch_for + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(bound, set.join_next()).await {
            Ok(Some(Ok(l))) => lorises.push(l),
            Ok(Some(Err(_))) => count(&mut errors, "task_panic"),
            Ok(None) => break,
            Err(_) => {
                count(&mut errors, "watch_bound");
                set.abort_all();
                break;
            }
        }
    }
    let closes: Vec<f64> = lorises
        .iter()
        .filter(|l| l.failed.is_none() && !matches!(l.end, End::Watched))
        .map(|l| l.called_s + l.lasted_s)
        .collect();
    let first_close = closes.iter().copied().fold(f64::INFINITY, f64::min);
    let last_close = closes.iter().copied().fold(start, f64::max);
    let end =
        if lorises.iter().any(|l| matches!(l.end, End::Watched)) { t0.elapsed().as_secs_f64() } else { last_close };
    let at_end = Snapshot::take(c.server_pid);
    let refusals_after = refusals(scrape(c.addr).await);

    let mut failed = Errors::new();
    let (mut eof, mut reset, mut watched, mut answered) = (0u64, 0u64, 0u64, 0u64);
    let (mut in_time, mut late, mut early) = (0u64, 0u64, 0u64);
    let (mut lasted, mut connect): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
    let mut answers = Errors::new();
    // Open at once: +1 at each connect, -1 at each close, swept in order.
    let mut steps: Vec<(f64, i32)> = Vec::new();
    let limit = a.header_timeout_secs + a.slack_secs;
    for l in &lorises {
        if let Some(e) = &l.failed {
            count(&mut failed, e.clone());
            continue;
        }
        connect.push(us(Duration::from_secs_f64(l.connect_s)));
        steps.push((l.called_s + l.connect_s, 1));
        match l.end {
            End::Eof => eof += 1,
            End::Reset => reset += 1,
            End::Watched => watched += 1,
        }
        if let Some(bytes) = &l.answer {
            answered += 1;
            let status = super::status_of(bytes).map_or_else(|| "bytes".to_owned(), |s| format!("status_{s}"));
            count(&mut answers, status);
        }
        if !matches!(l.end, End::Watched) {
            steps.push((l.called_s + l.lasted_s, -1));
            lasted.push(us(Duration::from_secs_f64(l.lasted_s)));
            if l.lasted_s > limit {
                late += 1;
            } else {
                in_time += 1;
            }
            if l.lasted_s < a.header_timeout_secs {
                early += 1;
            }
        }
    }
    steps.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    let (mut open, mut peak, mut peak_at) = (0i64, 0i64, start);
    for (t, d) in steps {
        open += i64::from(d);
        if open > peak {
            (peak, peak_at) = (open, t);
        }
    }
    let connected = lorises.iter().filter(|l| l.failed.is_none()).count();
    let figures = json!({
        "wave": number,
        "connected": connected,
        "connect_failed": failed,
        "ramp_s": round3(ramp_done - start),
        "connect_ms": summary_ms(&mut connect),
        "peak_concurrent": peak,
        "peak_concurrent_after_wave_start_s": round3(peak_at - start),
        "server_fds_peak_sampled": server_fds_peak,
        "server_threads": server_threads,
        "closed_by_server": eof + reset,
        "closed_fin": eof,
        "closed_reset": reset,
        "answered_before_close": answered,
        "answers": answers,
        "closed_before_header_timeout": early,
        "closed_within_timeout_plus_slack": in_time,
        "closed_late": late,
        "open_at_watch_end": watched,
        "watch_s": s3(watch_for),
        "close_after_connect_call_min_ms": lasted.iter().min().map(|&m| round3(f64::from(m) / 1000.0)),
        "close_after_connect_call_ms": summary_ms(&mut lasted),
        "first_close_after_wave_start_s": first_close.is_finite().then(|| round3(first_close - start)),
        "last_close_after_wave_start_s": round3(last_close - start),
        // The counter only appears once something was refused.
        "server_header_timeout_refusals": refusals_after.map(|a| a - refusals_before.unwrap_or(0.0)),
        "server_cpu_s": cpu(&at_start, &at_end),
        "errors": errors,
        "timeline_s": { "start": round3(start), "ramp_done": round3(ramp_done), "end": round3(end) },
    });
    Wave { number, start, ramp_done, end, at_start, figures }
}

fn cpu(a: &Snapshot, b: &Snapshot) -> Option<f64> {
    Some(round3(b.server_cpu? - a.server_cpu?))
}

impl Loris {
    fn failed(kind: String, called_s: f64) -> Self {
        Self { failed: Some(kind), called_s, connect_s: 0.0, lasted_s: 0.0, end: End::Watched, answer: None }
    }
}

/// Holds one connection without writing, until the server closes it or
/// `watch_for` has passed; times from `called`, just before `connect`.
async fn hold(mut tcp: TcpStream, called: Instant, called_s: f64, watch_for: Duration) -> Loris {
    let connect_s = called.elapsed().as_secs_f64();
    let deadline = tokio::time::Instant::from_std(called) + watch_for;
    let mut buf = [0u8; 64];
    let mut answer: Option<Vec<u8>> = None;
    let end = loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => break End::Watched,
            Ok(Ok(0)) => break End::Eof,
            Ok(Ok(k)) => {
                let a = answer.get_or_insert_with(Vec::new);
                if a.len() < 64 {
                    a.extend_from_slice(&buf[..k.min(64 - a.len())]);
                }
            }
            Ok(Err(_)) => break End::Reset,
        }
    };
    Loris { failed: None, called_s, connect_s, lasted_s: called.elapsed().as_secs_f64(), end, answer }
}

/// The normal client: an open-loop schedule of `rate` opens per second
/// from t0 until stopped, each on a fresh connection, in a runtime of its
/// own on this thread.
fn normal_client(n: Normal, t0: Instant, mut stop: watch::Receiver<bool>) -> std::result::Result<Vec<Open>, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let host = n.addr.to_string();
        let interval = Duration::from_secs_f64(1.0 / n.rate);
        let mut tasks = JoinSet::new();
        let mut done = Vec::new();
        let mut k: u32 = 0;
        loop {
            let sched = t0 + interval * k;
            tokio::select! {
                _ = tokio::time::sleep_until(sched.into()) => {}
                _ = stop.changed() => break,
            }
            let token = n.tokens.get(k as usize % n.tokens.len().max(1)).map(String::as_str);
            let req = client::stream_request(&StreamSpec {
                target: n.target,
                method: n.method,
                host: &host,
                generator: &n.generator,
                text: &n.prompt,
                pace_ms: Some(0),
                token,
            });
            let sched_s = (sched - t0).as_secs_f64();
            tasks.spawn(open_one(n.addr, n.target, req, sched_s, n.timeout));
            k += 1;
            while let Some(r) = tasks.try_join_next() {
                done.extend(r.ok());
            }
        }
        let bound = tokio::time::Instant::now() + n.timeout + Duration::from_secs(2);
        while let Ok(Some(r)) = tokio::time::timeout_at(bound, tasks.join_next()).await {
            done.extend(r.ok());
        }
        tasks.abort_all();
        Ok(done)
    })
}

/// One normal open: connect, request, read to `done`, within `timeout`.
async fn open_one(
    addr: SocketAddr,
    target: Target,
    req: Request<Full<Bytes>>,
    sched_s: f64,
    timeout: Duration,
) -> Open {
    let start = Instant::now();
    let mut o = Open { sched_s, ..Open::default() };
    let run = async {
        let mut sender = client::connect(addr).await.map_err(|_| "connect".to_owned())?;
        o.connect = Some(us(start.elapsed()));
        let resp = sender.send_request(req).await.map_err(|_| "http".to_owned())?;
        o.ttfb = Some(us(start.elapsed()));
        if resp.status() != 200 {
            return Err(format!("status_{}", resp.status().as_u16()));
        }
        let mut body = resp.into_body();
        let (mut first, mut finished, mut failure) = (None, false, None);
        client::read_events(&mut body, None, |event, now| {
            match client::classify(target, &event) {
                Item::Delta(_) => {
                    first.get_or_insert(now);
                }
                Item::Done => finished = true,
                Item::Error(code) => failure = Some(format!("event_{code}")),
                _ => {}
            }
            !finished
        })
        .await;
        o.ttfd = first.map(|f: Instant| us(f - start));
        match (failure, finished) {
            (Some(e), _) => Err(e),
            (None, false) => Err("no_done".to_owned()),
            (None, true) => Ok(()),
        }
    };
    let result = tokio::time::timeout(timeout, run).await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => o.error = Some(e),
        Err(_) => o.error = Some("timeout".to_owned()),
    }
    o
}

/// Counts, errors and latency summaries of the opens scheduled in a phase.
fn phase_figures(opens: &mut [&Open], from: f64, to: f64) -> Value {
    let mut errors = Errors::new();
    let (mut connect, mut ttfb, mut ttfd) = (Vec::new(), Vec::new(), Vec::new());
    for o in opens.iter() {
        match &o.error {
            Some(e) => count(&mut errors, e.clone()),
            None => {
                connect.extend(o.connect);
                ttfb.extend(o.ttfb);
                ttfd.extend(o.ttfd);
            }
        }
    }
    json!({
        "from_s": round3(from),
        "to_s": round3(to.max(from)),
        "opens": opens.len(),
        "ok": opens.iter().filter(|o| o.error.is_none()).count(),
        "errors": errors,
        "connect_ms": summary_ms(&mut connect),
        "ttfb_ms": summary_ms(&mut ttfb),
        "ttfd_ms": summary_ms(&mut ttfd),
    })
}
