//! `stalled`: `--streams` echo streams of a `--chars`-character prompt
//! (ASCII, one byte per character), each posted on a raw connection whose
//! receive buffer is made small before connecting; the client reads the
//! response head and never reads again. Once they have settled, the
//! server's RSS growth per stalled stream, what the server handed to those
//! connections (its own counters), the open-streams gauge and the kernel's
//! TCP buffer memory; optionally again after `--after-lag-secs`, to see the
//! slow-consumer cut (`max_lag`) end them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::{RssTrace, ascii_text, metric, peak_between, request_head, s3, scrape, status_of, tcp_mem_kib};
use crate::Result;
use crate::loadgen::{Common, Errors, count, extend, resources, round3};
use crate::procfs::Snapshot;

#[derive(Debug, Clone, clap::Args)]
pub struct StalledArgs {
    #[command(flatten)]
    pub common: Common,
    /// Stalled streams.
    #[arg(long, default_value_t = 20)]
    pub streams: usize,
    /// Characters (= bytes) in each stream's echo prompt.
    #[arg(long, default_value_t = 1_000_000)]
    pub chars: usize,
    /// SO_RCVBUF of the stalled client sockets, set before connecting (the
    /// kernel doubles it and applies its minimum).
    #[arg(long, default_value_t = 4096)]
    pub rcvbuf: u32,
    /// Wait after the last stream opened before measuring, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub settle_secs: f64,
    /// If above zero, wait this much longer (past the server's `max_lag`)
    /// and measure again.
    #[arg(long, default_value_t = 0.0)]
    pub after_lag_secs: f64,
    #[arg(long, default_value = "echo")]
    pub generator: String,
}

/// Server counters that explain the memory, read from `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    open_streams: Option<f64>,
    deltas_sent: Option<f64>,
    bytes_sent: Option<f64>,
    slow_consumer: Option<f64>,
    high_water: Option<f64>,
}

async fn counters(addr: SocketAddr) -> Counters {
    let Some(text) = scrape(addr).await else { return Counters::default() };
    Counters {
        open_streams: metric(&text, "tokengate_open_streams", ""),
        deltas_sent: metric(&text, "tokengate_deltas_sent_total", ""),
        bytes_sent: metric(&text, "tokengate_stream_bytes_sent_total", ""),
        slow_consumer: metric(&text, "tokengate_streams_total", "outcome=\"slow_consumer\""),
        high_water: metric(&text, "tokengate_send_queue_high_water_events", ""),
    }
}

/// `(a - b) / n`; a counter the server has not incremented yet is absent
/// from its text, i.e. zero.
fn per(a: Option<f64>, b: Option<f64>, n: usize) -> Option<f64> {
    let d = a.unwrap_or(0.0) - b.unwrap_or(0.0);
    (n > 0).then(|| round3(d / n as f64))
}

pub async fn run(a: StalledArgs) -> Result<Value> {
    let c = &a.common;
    let tokens = c.tokens(a.streams.max(1))?;
    let host = c.host();
    let body = json!({ "prompt": ascii_text(a.chars), "generator": a.generator, "pace_ms": 0 }).to_string();

    let before = Snapshot::take(c.server_pid);
    let counters_before = counters(c.addr).await;
    let tcp_before = tcp_mem_kib();
    let t0 = Instant::now();
    let trace = RssTrace::start(c.server_pid, t0, Duration::from_millis(250));

    // One at a time, so the figures are what stalled streams hold, not the
    // transient cost of parsing many large bodies at once.
    let mut held: Vec<TcpStream> = Vec::with_capacity(a.streams);
    let mut errors = Errors::new();
    let mut statuses = Errors::new();
    for i in 0..a.streams {
        let head = request_head("POST", "/v1/stream", &host, tokens.get(i).map(String::as_str), Some(body.len()));
        match tokio::time::timeout(Duration::from_secs(30), open(c.addr, a.rcvbuf, &head, body.as_bytes())).await {
            Ok(Ok((tcp, status))) => {
                count(&mut statuses, status.map_or_else(|| "unparsed".to_owned(), |s| s.to_string()));
                if status == Some(200) {
                    held.push(tcp);
                }
            }
            Ok(Err(e)) => count(&mut errors, e),
            Err(_) => count(&mut errors, "open_timeout"),
        }
    }
    let opened_s = t0.elapsed().as_secs_f64();
    let n = held.len();
    eprintln!("stalled: {n}/{} streams of {} chars open and unread after {opened_s:.1} s", a.streams, a.chars);

    tokio::time::sleep(Duration::from_secs_f64(a.settle_secs)).await;
    let settled = Snapshot::take(c.server_pid);
    let settled_s = t0.elapsed().as_secs_f64();
    let counters_settled = counters(c.addr).await;
    let tcp_settled = tcp_mem_kib();

    let mut after_lag = Value::Null;
    if a.after_lag_secs > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(a.after_lag_secs)).await;
        let s = Snapshot::take(c.server_pid);
        let k = counters(c.addr).await;
        after_lag = json!({
            "at_s": round3(t0.elapsed().as_secs_f64()),
            "open_streams": k.open_streams,
            "slow_consumer_ended": per(k.slow_consumer, counters_before.slow_consumer, 1),
            "send_queue_high_water_events": k.high_water,
            "server_rss_kib": s.server_rss,
            "tcp_mem_kib": tcp_mem_kib(),
        });
    }
    let samples = trace.finish().await;
    drop(held);

    let delta = match (before.server_rss, settled.server_rss) {
        (Some(b), Some(s)) => Some(s.saturating_sub(b)),
        _ => None,
    };
    let per_stream = delta.filter(|_| n > 0).map(|d| round3(d as f64 / n as f64));
    let prompt_kib = round3(a.chars as f64 / 1024.0);
    let tcp_delta = match (tcp_before, tcp_settled) {
        (Some(b), Some(s)) => Some(s as i64 - b as i64),
        _ => None,
    };
    let mut report = json!({
        "mode": "stalled",
        "streams": a.streams,
        "stalled": n,
        "chars": a.chars,
        "prompt_kib": prompt_kib,
        "body_bytes": body.len(),
        "rcvbuf": a.rcvbuf,
        "statuses": statuses,
        "errors": errors,
        "opened_after_s": round3(opened_s),
        "settle_s": a.settle_secs,
        "server_rss_kib_before": before.server_rss,
        "server_rss_kib_settled": settled.server_rss,
        "server_rss_kib_peak_while_opening": peak_between(&samples, 0.0, opened_s),
        "server_rss_kib_peak": peak_between(&samples, 0.0, settled_s),
        "server_rss_kib_delta": delta,
        "rss_kib_per_stream": per_stream,
        "rss_per_stream_over_prompt": per_stream.map(|p| round3(p / prompt_kib.max(1e-9))),
        "open_streams_gauge": counters_settled.open_streams,
        "deltas_sent_per_stream": per(counters_settled.deltas_sent, counters_before.deltas_sent, n),
        "bytes_sent_per_stream": per(counters_settled.bytes_sent, counters_before.bytes_sent, n),
        "tcp_mem_kib_delta": tcp_delta,
        "tcp_mem_kib_per_stream": tcp_delta.filter(|_| n > 0).map(|d| round3(d as f64 / n as f64)),
        "after_lag": after_lag,
        "wall_s": s3(t0.elapsed()),
    });
    extend(&mut report, resources(&before, &settled, peak_between(&samples, 0.0, settled_s)));
    eprintln!(
        "stalled {} chars: {n} streams; RSS {} -> {} KiB = {} KiB/stream ({} x prompt); deltas handed out per stream {}; kernel TCP mem +{} KiB; after lag {}",
        a.chars,
        report["server_rss_kib_before"],
        report["server_rss_kib_settled"],
        report["rss_kib_per_stream"],
        report["rss_per_stream_over_prompt"],
        report["deltas_sent_per_stream"],
        report["tcp_mem_kib_delta"],
        report["after_lag"],
    );
    Ok(report)
}

/// Connects with a small receive buffer, sends the whole request, reads
/// the response head (and whatever came in the same reads), and returns
/// the connection, never to be read again.
async fn open(
    addr: SocketAddr,
    rcvbuf: u32,
    head: &[u8],
    body: &[u8],
) -> std::result::Result<(TcpStream, Option<u16>), String> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(|e| e.to_string())?;
    socket.set_recv_buffer_size(rcvbuf).map_err(|e| format!("rcvbuf: {e}"))?;
    let mut tcp = socket.connect(addr).await.map_err(|e| format!("connect_{:?}", e.kind()))?;
    let _ = tcp.set_nodelay(true);
    tcp.write_all(head).await.map_err(|e| format!("write_{:?}", e.kind()))?;
    tcp.write_all(body).await.map_err(|e| format!("write_{:?}", e.kind()))?;
    let mut got = Vec::with_capacity(1024);
    let mut buf = [0u8; 256];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 8192 {
        let k = tcp.read(&mut buf).await.map_err(|e| format!("read_{:?}", e.kind()))?;
        if k == 0 {
            return Err(format!("eof_{}", status_of(&got).map_or_else(|| "before_head".to_owned(), |s| s.to_string())));
        }
        got.extend_from_slice(&buf[..k]);
    }
    Ok((tcp, status_of(&got)))
}
