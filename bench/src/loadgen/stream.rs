//! `stream` (and `proxy`): N connections, each running `--streams-per-conn`
//! streams one after the other (keep-alive), all started at once after every
//! connection is up. Each stream's deltas are reassembled and compared with
//! the text that was sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Common, Errors, count, extend, extend_resources, merge, resources, round3, rss_sampler, secs};
use crate::Result;
use crate::client::{self, Item, Method, ReadEnd, Sender, StreamSpec, Target};
use crate::procfs::Snapshot;
use crate::stats::{summary_ms, us};
use crate::text;

#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    #[command(flatten)]
    pub common: Common,
    /// Concurrent connections (= concurrent streams).
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// Streams each connection runs one after the other.
    #[arg(long, default_value_t = 1)]
    pub streams_per_conn: usize,
    /// Characters per stream (generated ASCII + CJK text, one per stream).
    #[arg(long, default_value_t = 2000)]
    pub chars: usize,
    /// Use this text for every stream instead of generated ones.
    #[arg(long)]
    pub text: Option<String>,
    /// `pace_ms` to ask for (omitted when not given).
    #[arg(long)]
    pub pace_ms: Option<u64>,
    /// GET with query parameters or POST with a JSON body.
    #[arg(long, value_enum, default_value = "get")]
    pub method: Method,
    /// tokengate generator (`echo`; `openai` for the proxy scenario).
    #[arg(long, default_value = "echo")]
    pub generator: String,
}

#[derive(Default)]
struct Totals {
    ok: u64,
    failed: u64,
    chars: u64,
    bytes: u64,
    ttfd: Vec<u32>,
    gaps: Vec<u32>,
    errors: Errors,
    first_mismatch: Option<String>,
    finished: Option<Instant>,
}

/// How long after the last stream the retained memory is read again: the
/// connections have closed, and the server's heap trimmer has had its
/// quiet second after them and run.
const RETAINED_SETTLE: Duration = Duration::from_secs(4);

pub async fn run(mode: &str, a: StreamArgs) -> Result<Value> {
    let c = &a.common;
    let tokens = c.tokens(a.conns)?;
    let host = c.host();
    // Per-connection texts, generated before anything is timed.
    let texts: Vec<Arc<str>> = (0..a.conns)
        .map(|i| Arc::from(a.text.clone().unwrap_or_else(|| text::generate(a.chars, i as u64)).as_str()))
        .collect();
    let chars_each: Vec<usize> = texts.iter().map(|t| t.chars().count()).collect();

    // Phase 1: every connection up.
    let t_connect = Instant::now();
    let sem = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let mut connecting = JoinSet::new();
    for i in 0..a.conns {
        let sem = sem.clone();
        let addr = c.addr;
        connecting.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (i, client::connect(addr).await.map_err(|e| e.to_string()))
        });
    }
    let mut senders: Vec<Option<Sender>> = (0..a.conns).map(|_| None).collect();
    let mut errors = Errors::new();
    while let Some(joined) = connecting.join_next().await {
        match joined {
            Ok((i, Ok(s))) => senders[i] = Some(s),
            Ok((_, Err(e))) => {
                count(&mut errors, "connect");
                eprintln!("connect: {e}");
            }
            Err(_) => count(&mut errors, "connect_panic"),
        }
    }
    let connect_s = t_connect.elapsed().as_secs_f64();

    // Phase 2: all streams at once.
    let before = Snapshot::take(c.server_pid);
    let (stop_sampler, sampler) = rss_sampler(c.server_pid, Duration::from_millis(100));
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, sender) in senders.into_iter().enumerate() {
        let Some(sender) = sender else { continue };
        let spec = ConnSpec {
            target: c.target,
            method: a.method,
            host: host.clone(),
            generator: a.generator.clone(),
            text: texts[i].clone(),
            pace_ms: a.pace_ms,
            token: tokens.get(i).cloned(),
            streams: a.streams_per_conn,
            addr: c.addr,
        };
        tasks.spawn(run_conn(sender, spec));
    }
    let mut totals = Totals::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(c.max_secs);
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok(t))) => {
                totals.ok += t.ok;
                totals.failed += t.failed;
                totals.chars += t.chars;
                totals.bytes += t.bytes;
                totals.ttfd.extend(t.ttfd);
                totals.gaps.extend(t.gaps);
                merge(&mut totals.errors, t.errors);
                if totals.first_mismatch.is_none() {
                    totals.first_mismatch = t.first_mismatch;
                }
                totals.finished = match (totals.finished, t.finished) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (x, y) => x.or(y),
                };
            }
            Ok(Some(Err(_))) => count(&mut totals.errors, "task_panic"),
            Err(_) => {
                let left = tasks.len() as u64;
                *totals.errors.entry("timeout".into()).or_default() += left * a.streams_per_conn as u64;
                totals.failed += left * a.streams_per_conn as u64;
                tasks.abort_all();
                totals.finished = Some(Instant::now());
                break;
            }
        }
    }
    let end = totals.finished.unwrap_or_else(Instant::now);
    let after = Snapshot::take(c.server_pid);
    let _ = stop_sampler.send(true);
    let peak = sampler.await.ok().flatten();
    merge(&mut totals.errors, errors);

    let wall = end.saturating_duration_since(t0).as_secs_f64();
    let chars_per_s = if wall > 0.0 { totals.chars as f64 / wall } else { 0.0 };
    let expected_streams = (a.conns * a.streams_per_conn) as u64;
    let mut report = json!({
        "mode": mode,
        "conns": a.conns,
        "streams_per_conn": a.streams_per_conn,
        "streams": expected_streams,
        "chars_per_stream": chars_each.first().copied().unwrap_or(0),
        "pace_ms": a.pace_ms,
        "method": a.method,
        "generator": a.generator,
        "connect_s": round3(connect_s),
        "wall_s": secs(t0, end),
        "streams_ok": totals.ok,
        "streams_failed": expected_streams - totals.ok,
        "errors": totals.errors,
        "first_mismatch": totals.first_mismatch,
        "chars_delivered": totals.chars,
        "chars_per_s": chars_per_s.round(),
        "bytes_delivered": totals.bytes,
        "ttfd_ms": summary_ms(&mut totals.ttfd),
        "gap_ms": summary_ms(&mut totals.gaps),
    });
    extend_resources(&mut report, resources(&before, &after, peak), "char", totals.chars);
    // Every stream has finished: what the server still holds is mostly the
    // logs it keeps resumable for `stream_ttl`.
    if let (Some(b), Some(a)) = (before.server_rss, after.server_rss)
        && totals.chars > 0
    {
        let per_char = a.saturating_sub(b) as f64 * 1024.0 / totals.chars as f64;
        extend(&mut report, json!({ "server_rss_bytes_per_char_retained": round3(per_char) }));
        // Right after the last stream the server is still closing the
        // connections and has not yet given back what the burst freed;
        // what a retained log costs over its `stream_ttl` is what stays.
        tokio::time::sleep(RETAINED_SETTLE).await;
        if let Some(settled) = Snapshot::take(c.server_pid).server_rss {
            let per_char = settled.saturating_sub(b) as f64 * 1024.0 / totals.chars as f64;
            extend(&mut report, json!({ "server_rss_bytes_per_char_retained_settled": round3(per_char) }));
        }
    }
    eprintln!(
        "{mode} {:?}: {} conns x {} streams, {}/{} ok, {} chars in {:.3} s = {:.0} chars/s; ttfd p50 {} ms; gap p50 {} p99 {} ms; server cpu {} s; errors {}",
        c.target,
        a.conns,
        a.streams_per_conn,
        totals.ok,
        expected_streams,
        totals.chars,
        wall,
        chars_per_s,
        report["ttfd_ms"]["p50"],
        report["gap_ms"]["p50"],
        report["gap_ms"]["p99"],
        report["server_cpu_s"],
        report["errors"],
    );
    Ok(report)
}

struct ConnSpec {
    target: Target,
    method: Method,
    host: String,
    generator: String,
    text: Arc<str>,
    pace_ms: Option<u64>,
    token: Option<String>,
    streams: usize,
    addr: std::net::SocketAddr,
}

async fn run_conn(sender: Sender, spec: ConnSpec) -> Totals {
    let mut t = Totals::default();
    let mut sender = Some(sender);
    for _ in 0..spec.streams {
        let req = client::stream_request(&StreamSpec {
            target: spec.target,
            method: spec.method,
            host: &spec.host,
            generator: &spec.generator,
            text: &spec.text,
            pace_ms: spec.pace_ms,
            token: spec.token.as_deref(),
        });
        // Reuse the kept-alive connection; reconnect when it is gone.
        let mut s = match client::reuse_or_connect(sender.take(), spec.addr).await {
            Ok(s) => s,
            Err(_) => {
                count(&mut t.errors, "connect");
                t.failed += 1;
                continue;
            }
        };
        let sent = Instant::now();
        let resp = match s.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                count(&mut t.errors, "http");
                if t.first_mismatch.is_none() {
                    t.first_mismatch = Some(format!("http error: {e}"));
                }
                t.failed += 1;
                continue;
            }
        };
        let status = resp.status().as_u16();
        if status != 200 {
            count(&mut t.errors, format!("status_{status}"));
            let body = client::body_text(resp).await;
            if t.first_mismatch.is_none() {
                t.first_mismatch = Some(format!("status {status}: {body}"));
            }
            t.failed += 1;
            sender = Some(s);
            continue;
        }
        let mut body = resp.into_body();
        let mut text = String::with_capacity(spec.text.len());
        let mut last: Option<Instant> = None;
        let mut chars = 0u64;
        let mut done = false;
        let mut error: Option<String> = None;
        let mut malformed = 0u64;
        let target = spec.target;
        let (end, bytes) = client::read_events(&mut body, None, |event, now| {
            match client::classify(target, &event) {
                Item::Delta(d) => {
                    match last {
                        None => t.ttfd.push(us(now - sent)),
                        Some(prev) => t.gaps.push(us(now - prev)),
                    }
                    last = Some(now);
                    chars += d.chars().count() as u64;
                    text.push_str(&d);
                }
                Item::Done => done = true,
                Item::Error(code) => error = Some(code),
                Item::Malformed => malformed += 1,
                Item::Other => {}
            }
            true
        })
        .await;
        t.chars += chars;
        t.bytes += bytes;
        t.finished = Some(Instant::now());
        if malformed > 0 {
            *t.errors.entry("malformed_event".into()).or_default() += malformed;
        }
        if let ReadEnd::Error(e) = &end {
            count(&mut t.errors, "read");
            if t.first_mismatch.is_none() {
                t.first_mismatch = Some(format!("read error: {e}"));
            }
        }
        match (done, error) {
            (_, Some(code)) => {
                count(&mut t.errors, format!("event_{code}"));
                t.failed += 1;
            }
            (false, None) => {
                count(&mut t.errors, "no_terminal");
                t.failed += 1;
            }
            (true, None) if *text == *spec.text => t.ok += 1,
            (true, None) => {
                count(&mut t.errors, "mismatch");
                if t.first_mismatch.is_none() {
                    let n = text.chars().zip(spec.text.chars()).take_while(|(a, b)| a == b).count();
                    t.first_mismatch = Some(format!(
                        "text differs at char {n} (got {} chars, sent {})",
                        text.chars().count(),
                        spec.text.chars().count()
                    ));
                }
                t.failed += 1;
            }
        }
        if end == ReadEnd::Eof {
            sender = Some(s);
        }
    }
    t
}
