//! The abuse scenarios of issue 16, "abuse that must stay bounded": each
//! bound the server claims becomes a measured figure.
//!
//! - `loris` ([`loris`]): thousands of connections that never send a request
//!   head, while a normal client keeps opening streams; when the header
//!   timeout closes them and what the normal client's latency does meanwhile.
//! - `slowbody` ([`slowbody`]): request heads and bodies sent one byte at a
//!   time (or not at all); what the server answers and when it closes.
//! - `stalled` ([`stalled`]): streams of a large echo prompt whose client
//!   never reads; the server's memory per stalled stream.
//! - idle channel subscribers are the existing `idle --kind channel` mode.
//! - [`report`]: the generated section of BENCHMARKS.md for all four.
//!
//! This file holds what they share: scraping the server's `/metrics`, the
//! kernel's TCP memory, an RSS trace, and raw request bytes for clients that
//! must control every byte they send (or do not send).

pub mod loris;
pub mod report;
pub mod slowbody;
pub mod stalled;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tokio::sync::watch;

use crate::client;
use crate::procfs;

/// Fetches `GET /metrics` (tokengate's Prometheus text; public) on a
/// connection of its own; `None` if the server does not answer in 5 s.
pub async fn scrape(addr: SocketAddr) -> Option<String> {
    let fetch = async {
        let mut sender = client::connect(addr).await.ok()?;
        let req = client::simple_request("GET", &addr.to_string(), "/metrics", None, None);
        let resp = sender.send_request(req).await.ok()?;
        if resp.status() != 200 {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch).await.ok().flatten()
}

/// The sum of every sample of `name` whose labels contain `label` (e.g.
/// `reason="header_timeout"`, or "" for all) in Prometheus text.
pub fn metric(text: &str, name: &str, label: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        // `name{labels} value` or `name value`, not `name_suffix ...`.
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        if !labels.contains(label) {
            continue;
        }
        if let Some(v) = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// Kernel memory used by TCP buffers machine-wide, in KiB (the `mem` pages
/// of the `TCP:` line of /proc/net/sockstat, 4 KiB each). Socket buffers are
/// not in any process's RSS, so a server that leaves data in them shows here.
pub fn tcp_mem_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut fields = line.split_whitespace();
    while let Some(f) = fields.next() {
        if f == "mem" {
            return fields.next()?.parse::<u64>().ok().map(|pages| pages * 4);
        }
    }
    None
}

/// Open file descriptors of a process (entries of /proc/<pid>/fd).
pub fn fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The server's RSS sampled every `every` until stopped: `(seconds since
/// t0, KiB)` pairs, so phases can be cut out of it afterwards.
pub struct RssTrace {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<Vec<(f64, u64)>>,
}

impl RssTrace {
    pub fn start(pid: Option<u32>, t0: Instant, every: Duration) -> Self {
        let (stop, mut rx) = watch::channel(false);
        let handle = tokio::spawn(async move {
            let mut samples = Vec::new();
            let Some(pid) = pid else { return samples };
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Some(r) = procfs::rss_kib(pid) {
                            samples.push((t0.elapsed().as_secs_f64(), r));
                        }
                    }
                    _ = rx.changed() => return samples,
                }
            }
        });
        Self { stop, handle }
    }

    pub async fn finish(self) -> Vec<(f64, u64)> {
        let _ = self.stop.send(true);
        self.handle.await.unwrap_or_default()
    }
}

/// Peak of the samples within `[from, to]` seconds.
pub fn peak_between(samples: &[(f64, u64)], from: f64, to: f64) -> Option<u64> {
    samples.iter().filter(|(t, _)| *t >= from && *t <= to).map(|&(_, r)| r).max()
}

/// The last sample at or before `at` seconds.
pub fn rss_at(samples: &[(f64, u64)], at: f64) -> Option<u64> {
    samples.iter().take_while(|(t, _)| *t <= at).last().map(|&(_, r)| r)
}

/// `n` ASCII characters, each one grapheme cluster and one byte (so a
/// prompt of a million characters is a million bytes, at the limit the
/// scenarios set), letters and spaces, never a space at either end.
pub fn ascii_text(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..n)
        .map(|i| {
            let b = ALPHABET[(i * 7 + i / 13) % ALPHABET.len()];
            if b == b' ' && (i == 0 || i + 1 == n) { 'x' } else { b as char }
        })
        .collect()
}

/// A request head, byte for byte: request line, `Host`, the bearer token
/// when given, `Content-Type: application/json` and `Content-Length` when a
/// body follows, and the blank line.
pub fn request_head(method: &str, path: &str, host: &str, token: Option<&str>, body_len: Option<usize>) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(len) = body_len {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {len}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// The status code of an HTTP/1.1 response that starts with `bytes`.
pub fn status_of(bytes: &[u8]) -> Option<u16> {
    let line = bytes.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.strip_prefix("HTTP/1.")?.split_whitespace().nth(1)?.parse().ok()
}

/// Seconds as a JSON-friendly rounded float.
pub fn s3(d: Duration) -> f64 {
    super::round3(d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_matching_samples_only() {
        let text = "# TYPE tokengate_refusals_total counter\n\
            tokengate_refusals_total{reason=\"header_timeout\"} 19800\n\
            tokengate_refusals_total{reason=\"rate_limited\"} 3\n\
            tokengate_refusals_total_other 7\n\
            tokengate_open_streams 20\n";
        assert_eq!(metric(text, "tokengate_refusals_total", "reason=\"header_timeout\""), Some(19800.0));
        assert_eq!(metric(text, "tokengate_refusals_total", ""), Some(19803.0));
        assert_eq!(metric(text, "tokengate_open_streams", ""), Some(20.0));
        assert_eq!(metric(text, "tokengate_missing", ""), None);
    }

    #[test]
    fn ascii_text_is_one_byte_per_char() {
        let t = ascii_text(10_000);
        assert_eq!(t.len(), 10_000);
        assert!(t.is_ascii() && !t.starts_with(' ') && !t.ends_with(' '));
    }

    #[test]
    fn status_line() {
        assert_eq!(status_of(b"HTTP/1.1 408 Request Timeout\r\n"), Some(408));
        assert_eq!(status_of(b"garbage"), None);
    }
}
