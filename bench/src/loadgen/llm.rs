//! `llm`: the LLM-shaped scenario's client. N streams at once, each on its
//! own connection, each asking for one answer that the mock upstream (in
//! `llm` mode) streams as `--tokens` tokens of `--token-chars` characters,
//! through tokengate (`/v1/stream` with an upstream generator, or
//! `/v1/chat/completions`) or the naive proxy. Every answer is checked
//! against [`crate::mock::llm_text`] of its prompt.
//!
//! Timing per stream, all at the client: time to first delta; the gap
//! between consecutive delta events (tokengate sends one event per grapheme
//! cluster, so four per token, mostly in one read: its p50 is ~0); the
//! *token gap*, from the first character of one upstream token to the first
//! of the next (the same measure whatever the server's events are); and
//! the *token lag*, from the first character of a token to its last.
//!
//! Resources: the server's CPU (utime+stime) over the streaming phase per
//! upstream token and per delivered character; its RSS per stream (peak
//! while streaming minus the fresh server's, before any connection, over
//! the streams); the mock upstream's CPU over the same phase, apart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::ValueEnum;
use http_body_util::Full;
use hyper::{Request, header};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Common, Errors, count, merge, round3, rss_sampler, secs};
use crate::Result;
use crate::client::{self, Item, ReadEnd, Sender, Target};
use crate::procfs::{self, Snapshot};
use crate::stats::{summary_ms, us};

/// Which API the streams are opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// `GET /v1/stream?prompt=...` (tokengate with `generator=`, or the
    /// naive proxy), native `delta`/`done` events.
    Native,
    /// `POST /v1/chat/completions` (tokengate with `model=`, or the mock
    /// directly), `chat.completion.chunk`s and `[DONE]`.
    Chat,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LlmArgs {
    #[command(flatten)]
    pub common: Common,
    /// Concurrent streams (one connection each).
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// API to open them with.
    #[arg(long, value_enum, default_value = "native")]
    pub route: Route,
    /// tokengate's generator (`/v1/stream`) or model (`/v1/chat/completions`).
    #[arg(long, default_value = "openai")]
    pub generator: String,
    /// Tokens per answer (the mock's `--tokens`).
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Characters per token (the mock's `--token-chars`).
    #[arg(long, default_value_t = 4)]
    pub token_chars: usize,
    /// PID of the mock upstream, for its CPU seconds.
    #[arg(long)]
    pub upstream_pid: Option<u32>,
}

#[derive(Default)]
struct Totals {
    ok: u64,
    failed: u64,
    chars: u64,
    bytes: u64,
    ttfd: Vec<u32>,
    gaps: Vec<u32>,
    token_gaps: Vec<u32>,
    token_lags: Vec<u32>,
    errors: Errors,
    first_mismatch: Option<String>,
    finished: Option<Instant>,
}

impl Totals {
    fn add(&mut self, t: Totals) {
        self.ok += t.ok;
        self.failed += t.failed;
        self.chars += t.chars;
        self.bytes += t.bytes;
        self.ttfd.extend(t.ttfd);
        self.gaps.extend(t.gaps);
        self.token_gaps.extend(t.token_gaps);
        self.token_lags.extend(t.token_lags);
        merge(&mut self.errors, t.errors);
        if self.first_mismatch.is_none() {
            self.first_mismatch = t.first_mismatch;
        }
        self.finished = match (self.finished, t.finished) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (x, y) => x.or(y),
        };
    }

    fn mismatch(&mut self, kind: &str, detail: String) {
        count(&mut self.errors, kind);
        if self.first_mismatch.is_none() {
            self.first_mismatch = Some(detail);
        }
    }
}

/// The prompt of stream `i` (its answer is `llm_text` of it).
fn prompt(i: usize) -> String {
    format!("Stream {i} of the LLM-shaped benchmark: say something.")
}

/// What a process did, from /proc: user and system CPU seconds, and its
/// read and write system calls (`syscr`/`syscw` of /proc/<pid>/io: read,
/// readv, write, writev; tokio reads sockets with `recv`, which `syscr`
/// does not count, while hyper writes with `writev`, which `syscw` does).
#[derive(Debug, Clone, Copy)]
struct Work {
    user_s: f64,
    sys_s: f64,
    reads: u64,
    writes: u64,
}

impl Work {
    fn take(pid: Option<u32>) -> Option<Self> {
        let pid = pid?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).map(|t| t / procfs::CLK_TCK);
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
        let field =
            |name: &str| io.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok());
        Some(Self { user_s: tick(11)?, sys_s: tick(12)?, reads: field("syscr:")?, writes: field("syscw:")? })
    }

    /// The difference `after - before`, as JSON, with the system calls per
    /// upstream token.
    fn delta(before: Option<Self>, after: Option<Self>, tokens: u64) -> Value {
        let (Some(a), Some(b)) = (before, after) else { return Value::Null };
        let per_token = |n: u64| (tokens > 0).then(|| round3(n as f64 / tokens as f64));
        json!({
            "user_s": round3(b.user_s - a.user_s),
            "sys_s": round3(b.sys_s - a.sys_s),
            "read_calls": b.reads - a.reads,
            "write_calls": b.writes - a.writes,
            "read_calls_per_token": per_token(b.reads - a.reads),
            "write_calls_per_token": per_token(b.writes - a.writes),
        })
    }
}

fn cpu_delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(round3(b? - a?))
}

fn per(cpu: Option<f64>, n: u64) -> Option<f64> {
    cpu.filter(|_| n > 0).map(|c| round3(c * 1e6 / n as f64))
}

pub async fn run(a: LlmArgs) -> Result<Value> {
    let c = &a.common;
    let tokens = c.tokens(a.streams)?;
    let host = c.host();
    let token_chars = a.token_chars.max(1);
    let prompts: Vec<String> = (0..a.streams).map(prompt).collect();
    let expected: Vec<Arc<str>> =
        prompts.iter().map(|p| Arc::from(crate::mock::llm_text(p, a.tokens, token_chars).as_str())).collect();
    // The fresh server, before any connection.
    let rss_baseline = c.server_pid.and_then(procfs::rss_kib);

    // Phase 1: every connection up.
    let t_connect = Instant::now();
    let sem = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let mut connecting = JoinSet::new();
    for i in 0..a.streams {
        let sem = sem.clone();
        let addr = c.addr;
        connecting.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (i, client::connect(addr).await.map_err(|e| e.to_string()))
        });
    }
    let mut senders: Vec<Option<Sender>> = (0..a.streams).map(|_| None).collect();
    let mut totals = Totals::default();
    while let Some(joined) = connecting.join_next().await {
        match joined {
            Ok((i, Ok(s))) => senders[i] = Some(s),
            Ok((_, Err(e))) => totals.mismatch("connect", format!("connect: {e}")),
            Err(_) => count(&mut totals.errors, "connect_panic"),
        }
    }
    let connect_s = t_connect.elapsed().as_secs_f64();
    let rss_connected = c.server_pid.and_then(procfs::rss_kib);

    // Phase 2: all streams at once.
    let before = Snapshot::take(c.server_pid);
    let work_before = Work::take(c.server_pid);
    let upstream_before = a.upstream_pid.and_then(procfs::cpu_seconds);
    let (stop_sampler, sampler) = rss_sampler(c.server_pid, Duration::from_millis(100));
    let t0 = Instant::now();
    let parse_as = match a.route {
        Route::Native => Target::Reference,
        Route::Chat => Target::Openai,
    };
    let mut tasks = JoinSet::new();
    for (i, sender) in senders.into_iter().enumerate() {
        let Some(sender) = sender else {
            totals.failed += 1;
            continue;
        };
        let req = request(&a, &host, &prompts[i], tokens.get(i).map(String::as_str));
        tasks.spawn(run_stream(sender, req, parse_as, expected[i].clone(), token_chars));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(c.max_secs);
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok(t))) => totals.add(t),
            Ok(Some(Err(_))) => count(&mut totals.errors, "task_panic"),
            Err(_) => {
                let left = tasks.len() as u64;
                *totals.errors.entry("timeout".into()).or_default() += left;
                totals.failed += left;
                tasks.abort_all();
                totals.finished = Some(Instant::now());
                break;
            }
        }
    }
    let end = totals.finished.unwrap_or_else(Instant::now);
    let after = Snapshot::take(c.server_pid);
    let work_after = Work::take(c.server_pid);
    let upstream_after = a.upstream_pid.and_then(procfs::cpu_seconds);
    let _ = stop_sampler.send(true);
    let peak = sampler.await.ok().flatten();

    let streams = a.streams as u64;
    let chars_expected: u64 = expected.iter().map(|t| t.chars().count() as u64).sum();
    // Upstream tokens that reached the client (all of them on a clean run).
    let up_tokens = totals.chars / token_chars as u64;
    let server_cpu = cpu_delta(before.server_cpu, after.server_cpu);
    let upstream_cpu = cpu_delta(upstream_before, upstream_after);
    let loadgen_cpu = cpu_delta(before.self_cpu, after.self_cpu);
    let other_cpu = match (before.machine, after.machine) {
        (Some((b0, _)), Some((b1, _))) => Some(round3(
            ((b1 - b0) as f64 / procfs::CLK_TCK
                - server_cpu.unwrap_or(0.0)
                - upstream_cpu.unwrap_or(0.0)
                - loadgen_cpu.unwrap_or(0.0))
            .max(0.0),
        )),
        _ => None,
    };
    let rss_per_stream = match (rss_baseline, peak) {
        (Some(b), Some(p)) if streams > 0 => Some(round3(p.saturating_sub(b) as f64 / streams as f64)),
        _ => None,
    };
    let report = json!({
        "mode": "llm",
        "route": a.route,
        "generator": a.generator,
        "streams": streams,
        "tokens_per_stream": a.tokens,
        "token_chars": token_chars,
        "connect_s": round3(connect_s),
        "wall_s": secs(t0, end),
        "streams_ok": totals.ok,
        "streams_failed": streams - totals.ok.min(streams),
        "errors": totals.errors,
        "first_mismatch": totals.first_mismatch,
        "chars_delivered": totals.chars,
        "chars_expected": chars_expected,
        "upstream_tokens": up_tokens,
        "bytes_delivered": totals.bytes,
        "ttfd_ms": summary_ms(&mut totals.ttfd),
        "gap_ms": summary_ms(&mut totals.gaps),
        "token_gap_ms": summary_ms(&mut totals.token_gaps),
        "token_lag_ms": summary_ms(&mut totals.token_lags),
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_token": per(server_cpu, up_tokens),
        "server_cpu_us_per_char": per(server_cpu, totals.chars),
        "server_work": Work::delta(work_before, work_after, up_tokens),
        "server_rss_kib_baseline": rss_baseline,
        "server_rss_kib_connected": rss_connected,
        "server_rss_kib_peak": peak,
        "server_rss_kib_after": after.server_rss,
        "server_rss_kib_per_stream": rss_per_stream,
        "server_threads": c.server_pid.and_then(procfs::threads),
        "upstream_cpu_s": upstream_cpu,
        "upstream_cpu_us_per_token": per(upstream_cpu, up_tokens),
        "upstream_rss_kib_after": a.upstream_pid.and_then(procfs::rss_kib),
        "loadgen_cpu_s": loadgen_cpu,
        "other_cpu_s": other_cpu,
        "machine_busy_pct": procfs::busy_pct(&before, &after).map(round3),
    });
    eprintln!(
        "llm {:?} {:?}: {}/{} streams ok, {}/{} chars; server cpu {:?} s = {:?} us/token, {:?} us/char; rss/stream {:?} KiB; token gap p50 {} p99 {} ms; event gap p50 {} p99 {} ms; token lag p50 {} ms; mock cpu {:?} s; busy {}%; errors {}",
        c.target,
        a.route,
        totals.ok,
        streams,
        totals.chars,
        chars_expected,
        server_cpu,
        report["server_cpu_us_per_token"],
        report["server_cpu_us_per_char"],
        rss_per_stream,
        report["token_gap_ms"]["p50"],
        report["token_gap_ms"]["p99"],
        report["gap_ms"]["p50"],
        report["gap_ms"]["p99"],
        report["token_lag_ms"]["p50"],
        upstream_cpu,
        report["machine_busy_pct"],
        report["errors"],
    );
    Ok(report)
}

/// The request that opens stream `prompt` on `a.route`.
fn request(a: &LlmArgs, host: &str, prompt: &str, token: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::builder().header(header::HOST, host).header(header::ACCEPT, "text/event-stream");
    if let Some(token) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match a.route {
        Route::Native => {
            let mut uri = String::from("/v1/stream?prompt=");
            uri.extend(form_urlencoded::byte_serialize(prompt.as_bytes()));
            if a.common.target == Target::Tokengate {
                uri.push_str("&generator=");
                uri.extend(form_urlencoded::byte_serialize(a.generator.as_bytes()));
            }
            b = b.method("GET").uri(uri);
            Bytes::new()
        }
        Route::Chat => {
            let body = json!({
                "model": a.generator,
                "messages": [{ "role": "user", "content": prompt }],
                "stream": true,
            });
            b = b.method("POST").uri("/v1/chat/completions").header(header::CONTENT_TYPE, "application/json");
            Bytes::from(body.to_string())
        }
    };
    b.body(Full::new(body)).unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

async fn run_stream(
    mut sender: Sender,
    req: Request<Full<Bytes>>,
    parse_as: Target,
    expected: Arc<str>,
    token_chars: usize,
) -> Totals {
    let mut t = Totals::default();
    let sent = Instant::now();
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            t.mismatch("http", format!("http error: {e}"));
            t.failed += 1;
            return t;
        }
    };
    let status = resp.status().as_u16();
    if status != 200 {
        let body = client::body_text(resp).await;
        t.mismatch(&format!("status_{status}"), format!("status {status}: {body}"));
        t.failed += 1;
        return t;
    }
    let mut body = resp.into_body();
    let mut text = String::with_capacity(expected.len());
    let mut last: Option<Instant> = None;
    let mut token_start: Option<Instant> = None;
    let mut chars = 0usize;
    let mut done = false;
    let mut error: Option<String> = None;
    let mut malformed = 0u64;
    let (end, bytes) = client::read_events(&mut body, None, |event, now| {
        match client::classify(parse_as, &event) {
            Item::Delta(d) => {
                match last {
                    None => t.ttfd.push(us(now - sent)),
                    Some(prev) => t.gaps.push(us(now - prev)),
                }
                last = Some(now);
                for _ in d.chars() {
                    let at = chars % token_chars;
                    if at == 0 {
                        if let Some(prev) = token_start {
                            t.token_gaps.push(us(now - prev));
                        }
                        token_start = Some(now);
                    }
                    if at == token_chars - 1
                        && let Some(start) = token_start
                    {
                        t.token_lags.push(us(now - start));
                    }
                    chars += 1;
                }
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
    t.chars = chars as u64;
    t.bytes = bytes;
    t.finished = Some(Instant::now());
    if malformed > 0 {
        *t.errors.entry("malformed_event".into()).or_default() += malformed;
    }
    if let ReadEnd::Error(e) = &end {
        t.mismatch("read", format!("read error: {e}"));
    }
    match (done, error) {
        (_, Some(code)) => {
            t.mismatch(&format!("event_{code}"), format!("error event: {code}"));
            t.failed += 1;
        }
        (false, None) => {
            t.mismatch("no_terminal", format!("no terminal event after {chars} chars"));
            t.failed += 1;
        }
        (true, None) if *text == *expected => t.ok += 1,
        (true, None) => {
            let n = text.chars().zip(expected.chars()).take_while(|(a, b)| a == b).count();
            t.mismatch(
                "mismatch",
                format!("text differs at char {n} (got {chars} chars, expected {})", expected.chars().count()),
            );
            t.failed += 1;
        }
    }
    t
}
