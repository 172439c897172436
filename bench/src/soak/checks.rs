//! The checks after each round: nothing left open (the open-streams gauge
//! back to 0 on both replicas, and a full per-subject cap of streams opens
//! again, cluster-wide, with one more refused), resident memory, and the
//! replicas' logs (no token, no panic, no warning or error that the chaos
//! does not explain).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokengate::sse::{EventRef, Parser};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::setup::CAP;
use super::wire::{self, Decoder};

/// `tokengate_open_streams` of one replica.
pub async fn open_streams(addr: SocketAddr) -> Result<u64, String> {
    let req = wire::Request { method: "GET", path: "/metrics", token: None, last_event_id: None, json: None };
    let (status, body) = wire::call(addr, &req, Duration::from_secs(5)).await?;
    if status != 200 {
        return Err(format!("/metrics answered {status}"));
    }
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| l.strip_prefix("tokengate_open_streams "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| "no tokengate_open_streams in /metrics".to_owned())
}

/// Waits (up to `limit`) until both gauges read 0; returns the last values.
pub async fn gauges_to_zero(addrs: &[SocketAddr; 2], limit: Duration) -> Result<[u64; 2], String> {
    let deadline = Instant::now() + limit;
    loop {
        let a = open_streams(addrs[0]).await?;
        let b = open_streams(addrs[1]).await?;
        if (a, b) == (0, 0) || Instant::now() > deadline {
            return Ok([a, b]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens a long paced stream and reads up to its `start` event: the status,
/// and the stream id with the connection held open (the slot is taken as
/// long as it runs).
async fn hold(addr: SocketAddr, token: &str) -> Result<(u16, Option<(String, TcpStream)>), String> {
    let body = serde_json::json!({ "prompt": "slot ".repeat(100), "generator": "echo", "pace_ms": 200 }).to_string();
    let req = wire::Request {
        method: "POST",
        path: "/v1/stream",
        token: Some(token),
        last_event_id: None,
        json: Some(&body),
    };
    let mut tcp = wire::send(addr, &req).await.map_err(|e| format!("connect: {e}"))?;
    let mut dec = Decoder::new();
    let mut parser = Parser::new();
    let mut buf = vec![0u8; 4096];
    let work = async {
        loop {
            let n = tcp.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed".to_owned());
            }
            let mut sid = None;
            dec.feed(&buf[..n], |b| {
                parser.feed_with(b, |ev| {
                    if let EventRef::Message { event: "start", data, .. } = ev {
                        sid = serde_json::from_str::<serde_json::Value>(data)
                            .ok()
                            .and_then(|v| v.get("stream_id").and_then(|s| s.as_str()).map(str::to_owned));
                    }
                });
            })?;
            match dec.head().map(|h| h.status) {
                Some(200) => {
                    if let Some(sid) = sid {
                        return Ok(Some(sid));
                    }
                }
                Some(s) => return Err(format!("status {s}")),
                None => {}
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), work).await {
        Ok(Ok(Some(sid))) => Ok((200, Some((sid, tcp)))),
        Ok(Ok(None)) => Err("no start".into()),
        Ok(Err(e)) => match e.strip_prefix("status ").and_then(|s| s.parse().ok()) {
            Some(s) => Ok((s, None)),
            None => Err(e),
        },
        Err(_) => Err("timed out".into()),
    }
}

/// For every token: [`CAP`] streams open (alternating replicas, so the cap
/// is the cluster's), then one more is refused with 429; then all are
/// cancelled. Returns the problems found (empty: every slot was free).
pub async fn slots_free(addrs: &[SocketAddr; 2], tokens: &[String]) -> Vec<String> {
    let per_subject = tokens.iter().enumerate().map(|(i, token)| async move {
        let mut problems = Vec::new();
        let mut held = Vec::new();
        for k in 0..CAP {
            match hold(addrs[(i + k) % 2], token).await {
                Ok((200, Some(h))) => held.push(h),
                Ok((s, _)) => problems.push(format!("soak-{i}: stream {} of {CAP} refused with {s}", k + 1)),
                Err(e) => problems.push(format!("soak-{i}: stream {} of {CAP}: {e}", k + 1)),
            }
        }
        if problems.is_empty() {
            match hold(addrs[(i + CAP) % 2], token).await {
                Ok((429, _)) => {}
                Ok((s, h)) => {
                    problems.push(format!("soak-{i}: stream {} over the cap of {CAP} answered {s}", CAP + 1));
                    held.extend(h);
                }
                Err(e) => problems.push(format!("soak-{i}: stream over the cap: {e}")),
            }
        }
        for (k, (sid, tcp)) in held.into_iter().enumerate() {
            let path = format!("/v1/streams/{sid}");
            let req =
                wire::Request { method: "DELETE", path: &path, token: Some(token), last_event_id: None, json: None };
            match wire::call(addrs[(i + k + 1) % 2], &req, Duration::from_secs(5)).await {
                Ok((204, _)) => {}
                Ok((s, _)) => problems.push(format!("soak-{i}: DELETE answered {s}")),
                Err(e) => problems.push(format!("soak-{i}: DELETE: {e}")),
            }
            drop(tcp);
        }
        problems
    });
    join_all(per_subject).await.into_iter().flatten().collect()
}

/// Which failures the round injected (they explain some log lines).
#[derive(Debug, Clone, Copy, Default)]
pub struct Causes {
    /// A replica was drained.
    pub drain: bool,
    /// Redis was restarted.
    pub redis: bool,
}

/// Whether the round's causes explain a log line.
type Explains = fn(Causes) -> bool;

/// Warning and error lines the chaos explains, with the cause that
/// explains each. Anything else at WARN or ERROR is unexpected, and in the
/// quiet rounds (no chaos) every WARN or ERROR line is.
const EXPECTED: &[(&str, Explains)] = &[
    ("redis unreachable: new streams are refused", |c| c.redis),
    ("replication to redis failed", |c| c.redis),
    ("cluster limits: the shared store failed", |c| c.redis),
    ("shared store request failed", |c| c.redis),
    ("demo feeds could not publish", |c| c.redis),
    ("stream leases had lapsed", |c| c.redis),
    ("code=\"store_unavailable\"", |c| c.redis),
    ("code=store_unavailable", |c| c.redis),
    ("code=\"draining\"", |c| c.drain),
    ("code=draining", |c| c.drain),
];

/// One log file and where its quiet part starts (byte offset: lines from
/// there on were written during the rounds without chaos).
#[derive(Debug, Clone)]
pub struct LogFile {
    /// The file.
    pub path: PathBuf,
    /// Offset of the quiet part (`u64::MAX`: none).
    pub quiet_from: u64,
}

/// What the log scan found.
#[derive(Debug, Default)]
pub struct LogReport {
    /// Lines read.
    pub lines: u64,
    /// Expected WARN/ERROR lines, by pattern.
    pub expected: BTreeMap<&'static str, u64>,
    /// Lines with a token (`eyJ`) or the secret in them.
    pub leaks: Vec<String>,
    /// Lines with `panicked`.
    pub panics: Vec<String>,
    /// WARN/ERROR lines nothing explains.
    pub unexpected: Vec<String>,
}

impl LogReport {
    /// Nothing wrong.
    pub fn clean(&self) -> bool {
        self.leaks.is_empty() && self.panics.is_empty() && self.unexpected.is_empty()
    }
}

/// Scans the replicas' log files.
pub fn scan_logs(files: &[LogFile], causes: Causes, secret: &str) -> LogReport {
    let mut r = LogReport::default();
    for f in files {
        let Ok(bytes) = std::fs::read(&f.path) else {
            r.unexpected.push(format!("{}: unreadable", f.path.display()));
            continue;
        };
        let mut offset = 0u64;
        for line in String::from_utf8_lossy(&bytes).lines() {
            let quiet = offset >= f.quiet_from;
            offset += line.len() as u64 + 1;
            r.lines += 1;
            let short = || {
                format!(
                    "{}: {}",
                    f.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                    line.chars().take(300).collect::<String>()
                )
            };
            if line.contains("eyJ") || line.contains(secret) {
                r.leaks.push(short());
            }
            if line.contains("panicked") {
                r.panics.push(short());
            }
            if !(line.contains(" WARN ") || line.contains(" ERROR ")) {
                continue;
            }
            match EXPECTED.iter().find(|(pat, _)| line.contains(pat)) {
                Some((pat, cause)) if !quiet && cause(causes) => *r.expected.entry(pat).or_default() += 1,
                _ => r.unexpected.push(short()),
            }
        }
    }
    r
}
