//! `slowbody`: requests sent one byte at a time, or stopped halfway, on raw
//! TCP connections (every byte is the client's choice). For each case,
//! `--per-case` connections at once; each is watched for `--observe-secs`:
//! what the server answers (status line), when, when it closes, and how
//! many bytes it had taken by then. A case the server never ends shows up as
//! "open at the end of observation", which is the finding, not a failure of
//! the run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::{fds, request_head, status_of};
use crate::Result;
use crate::loadgen::{Common, Errors, count, extend, resources, round3};
use crate::procfs::Snapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Case {
    /// `POST /v1/stream` whose request head itself arrives one byte per
    /// interval (the classic slow loris; the header timeout's case).
    HeadTrickle,
    /// `POST /v1/stream` with a valid token: the head at once, then the
    /// JSON body one byte per interval.
    BodyTrickle,
    /// The same without a token.
    BodyTrickleNoauth,
    /// `POST /v1/stream` with a valid token: the head, then no body byte.
    BodyStall,
    /// `POST /v1/stream` with a valid token: the head and all of a
    /// `--big-body-bytes` body but its last byte at once, then nothing
    /// (`--big-per-case` connections): what the server buffers meanwhile.
    BodyNearlyAll,
    /// `POST /v1/chat/completions` without a token: like `body-nearly-all`
    /// (and as many connections).
    ChatNearlyAllNoauth,
    /// `POST /v1/chat/completions` with a valid token, body one byte per
    /// interval.
    ChatTrickle,
    /// The same without a token.
    ChatTrickleNoauth,
}

impl Case {
    /// Sends all of a large body but its last byte.
    fn nearly_all(self) -> bool {
        matches!(self, Case::BodyNearlyAll | Case::ChatNearlyAllNoauth)
    }

    /// The case's key in the report (snake case, as serialized).
    fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct SlowBodyArgs {
    #[command(flatten)]
    pub common: Common,
    /// Cases to run, all at once (comma separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [
        Case::HeadTrickle, Case::BodyTrickle, Case::BodyTrickleNoauth,
        Case::BodyStall, Case::BodyNearlyAll, Case::ChatTrickle, Case::ChatTrickleNoauth,
        Case::ChatNearlyAllNoauth,
    ])]
    pub cases: Vec<Case>,
    /// Connections per case.
    #[arg(long, default_value_t = 3)]
    pub per_case: usize,
    /// Time between two trickled bytes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// How long each connection is watched, in seconds.
    #[arg(long, default_value_t = 40)]
    pub observe_secs: u64,
    /// The body's `Content-Length` (below the server's body limit, so that
    /// the server has to read it; long enough never to finish in time).
    #[arg(long, default_value_t = 4096)]
    pub body_bytes: usize,
    /// `Content-Length` of the `body-nearly-all` case (under the server's
    /// body limit, 256 KiB by default).
    #[arg(long, default_value_t = 250_000)]
    pub big_body_bytes: usize,
    /// Connections of the `body-nearly-all` case (enough for their memory
    /// to stand out of the server's RSS).
    #[arg(long, default_value_t = 100)]
    pub big_per_case: usize,
    /// The server's `header_timeout`, in seconds (for the report only).
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout_secs: f64,
}

/// What happened on one connection; times in seconds from just before its
/// `connect` call.
#[derive(Debug, Default)]
struct Conn {
    failed: Option<String>,
    status: Option<u16>,
    answered_s: Option<f64>,
    closed_s: Option<f64>,
    reset: bool,
    head_sent: usize,
    body_sent: usize,
    body_sent_at_answer: Option<usize>,
    write_error: Option<String>,
}

pub async fn run(a: SlowBodyArgs) -> Result<Value> {
    let c = &a.common;
    let tokens = c.tokens(1)?;
    let token = tokens.first().cloned();
    let host = c.host();
    let before = Snapshot::take(c.server_pid);
    let interval = Duration::from_millis(a.interval_ms.max(1));
    let observe = Duration::from_secs(a.observe_secs);
    let mut set = JoinSet::new();
    for &case in &a.cases {
        let (n, body_bytes) =
            if case.nearly_all() { (a.big_per_case, a.big_body_bytes) } else { (a.per_case, a.body_bytes) };
        for _ in 0..n.max(1) {
            let (host, token, addr) = (host.clone(), token.clone(), c.addr);
            set.spawn(
                async move { (case, one(case, addr, &host, token.as_deref(), body_bytes, interval, observe).await) },
            );
        }
    }
    // Server file descriptors while everything is held (half-way through).
    let fds_at = tokio::time::Instant::now() + observe / 2;
    let mut server_fds_mid = None;
    let mut server_rss_mid = None;
    let mut conns: Vec<(Case, Conn)> = Vec::new();
    let bound = tokio::time::Instant::now() + observe + Duration::from_secs(15);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(fds_at), if server_fds_mid.is_none() && c.server_pid.is_some() => {
                server_fds_mid = c.server_pid.and_then(fds);
                server_rss_mid = c.server_pid.and_then(crate::procfs::rss_kib);
            }
            r = tokio::time::timeout_at(bound, set.join_next()) => match r {
                Ok(Some(Ok(x))) => conns.push(x),
                Ok(Some(Err(_))) => {}
                Ok(None) => break,
                Err(_) => { set.abort_all(); break; }
            }
        }
    }
    let after = Snapshot::take(c.server_pid);

    let big = a.cases.iter().filter(|c| c.nearly_all()).count() * a.big_per_case;
    let mut cases = Map::new();
    for &case in &a.cases {
        let mine: Vec<&Conn> = conns.iter().filter(|(k, _)| *k == case).map(|(_, c)| c).collect();
        cases.insert(case.name(), case_figures(&mine));
    }
    let mut report = json!({
        "mode": "slowbody",
        "interval_ms": a.interval_ms,
        "observe_s": a.observe_secs,
        "body_bytes": a.body_bytes,
        "per_case": a.per_case,
        "header_timeout_s": a.header_timeout_secs,
        "cases": cases,
        "server_fds_mid_observation": server_fds_mid,
        "server_rss_kib_mid_observation": server_rss_mid,
        "big_body_bytes": a.big_body_bytes,
        "big_per_case": a.big_per_case,
        // Nearly all of the growth is the big bodies' (every other case
        // holds a few hundred bytes per connection).
        "nearly_all_conns": big,
        "rss_kib_per_nearly_all_body": match (before.server_rss, server_rss_mid) {
            (Some(b), Some(m)) if big > 0 => Some(round3(m.saturating_sub(b) as f64 / big as f64)),
            _ => None,
        },
    });
    extend(&mut report, resources(&before, &after, None));
    for (name, f) in report["cases"].as_object().into_iter().flatten() {
        eprintln!(
            "slowbody {name}: answered {} after {} s; closed by the server {} after {} s; open at {} s: {}; body bytes taken {}",
            f["answers"],
            f["answered_after_s"]["max"],
            f["closed_by_server"],
            f["closed_after_s"]["max"],
            a.observe_secs,
            f["open_at_end"],
            f["body_bytes_sent"]["max"],
        );
    }
    Ok(report)
}

/// The bytes of one case's request: what is written at once, and what is
/// trickled one byte per interval.
fn request(case: Case, host: &str, token: Option<&str>, body_bytes: usize) -> (Vec<u8>, Vec<u8>) {
    let (path, prefix) = match case {
        Case::ChatTrickle | Case::ChatTrickleNoauth | Case::ChatNearlyAllNoauth => {
            ("/v1/chat/completions", r#"{"model":"m","stream":true,"messages":[{"role":"user","content":""#)
        }
        _ => ("/v1/stream", r#"{"generator":"echo","prompt":""#),
    };
    let token = match case {
        Case::BodyTrickleNoauth | Case::ChatTrickleNoauth | Case::ChatNearlyAllNoauth => None,
        _ => token,
    };
    let head = request_head("POST", path, host, token, Some(body_bytes));
    let mut body = prefix.as_bytes().to_vec();
    body.resize(body_bytes.max(body.len()), b'a');
    match case {
        Case::HeadTrickle => {
            let mut all = head;
            all.extend_from_slice(&body);
            (Vec::new(), all)
        }
        Case::BodyStall => (head, Vec::new()),
        Case::BodyNearlyAll | Case::ChatNearlyAllNoauth => {
            let mut all = head;
            all.extend_from_slice(&body[..body.len() - 1]);
            (all, Vec::new())
        }
        _ => (head, body),
    }
}

async fn one(
    case: Case,
    addr: SocketAddr,
    host: &str,
    token: Option<&str>,
    body_bytes: usize,
    interval: Duration,
    observe: Duration,
) -> Conn {
    let mut conn = Conn::default();
    let (burst, trickle) = request(case, host, token, body_bytes);
    let head_len = match case {
        Case::HeadTrickle => trickle.len() - body_bytes,
        Case::BodyNearlyAll | Case::ChatNearlyAllNoauth => burst.len() + 1 - body_bytes,
        _ => burst.len(),
    };
    let start = Instant::now();
    let tcp = match TcpStream::connect(addr).await {
        Ok(t) => t,
        Err(e) => {
            conn.failed = Some(format!("connect_{:?}", e.kind()));
            return conn;
        }
    };
    let _ = tcp.set_nodelay(true);
    let deadline = tokio::time::Instant::from_std(start) + observe;
    let (mut rd, mut wr) = tcp.into_split();
    let mut written = 0usize;
    if !burst.is_empty() {
        match wr.write_all(&burst).await {
            Ok(()) => written = burst.len(),
            Err(e) => conn.write_error = Some(format!("{:?}", e.kind())),
        }
    }
    let mut sent = 0usize;
    let mut next = tokio::time::Instant::now() + interval;
    let mut buf = [0u8; 512];
    loop {
        let trickling = sent < trickle.len() && conn.write_error.is_none();
        tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) => {
                    conn.closed_s = Some(start.elapsed().as_secs_f64());
                    break;
                }
                Ok(k) => {
                    if conn.answered_s.is_none() {
                        conn.answered_s = Some(start.elapsed().as_secs_f64());
                        conn.status = status_of(&buf[..k]);
                        conn.body_sent_at_answer = Some((written + sent).saturating_sub(head_len));
                    }
                }
                Err(_) => {
                    conn.closed_s = Some(start.elapsed().as_secs_f64());
                    conn.reset = true;
                    break;
                }
            },
            _ = tokio::time::sleep_until(next), if trickling => {
                match wr.write_all(&trickle[sent..sent + 1]).await {
                    Ok(()) => sent += 1,
                    Err(e) => conn.write_error = Some(format!("{:?}", e.kind())),
                }
                next += interval;
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let total = written + sent;
    conn.head_sent = total.min(head_len);
    conn.body_sent = total.saturating_sub(head_len);
    conn
}

fn min_max(v: &[f64]) -> Value {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.is_empty() { json!({ "min": null, "max": null }) } else { json!({ "min": round3(min), "max": round3(max) }) }
}

fn case_figures(conns: &[&Conn]) -> Value {
    let mut answers = Errors::new();
    let mut failed = Errors::new();
    let mut write_errors = Errors::new();
    let (mut answered, mut closed) = (Vec::new(), Vec::new());
    let mut resets = 0;
    for c in conns {
        if let Some(f) = &c.failed {
            count(&mut failed, f.clone());
            continue;
        }
        if let Some(t) = c.answered_s {
            answered.push(t);
            count(&mut answers, c.status.map_or_else(|| "unparsed".to_owned(), |s| s.to_string()));
        }
        if let Some(t) = c.closed_s {
            closed.push(t);
            resets += u64::from(c.reset);
        }
        if let Some(e) = &c.write_error {
            count(&mut write_errors, e.clone());
        }
    }
    let body: Vec<f64> = conns.iter().filter(|c| c.failed.is_none()).map(|c| c.body_sent as f64).collect();
    let head: Vec<f64> = conns.iter().filter(|c| c.failed.is_none()).map(|c| c.head_sent as f64).collect();
    let at_answer: Vec<f64> = conns.iter().filter_map(|c| c.body_sent_at_answer).map(|b| b as f64).collect();
    json!({
        "conns": conns.len(),
        "connect_failed": failed,
        "answers": answers,
        "answered_after_s": min_max(&answered),
        "body_bytes_at_answer": min_max(&at_answer),
        "closed_by_server": closed.len(),
        "closed_reset": resets,
        "closed_after_s": min_max(&closed),
        "open_at_end": conns.iter().filter(|c| c.failed.is_none() && c.closed_s.is_none()).count(),
        "head_bytes_sent": min_max(&head),
        "body_bytes_sent": min_max(&body),
        "write_errors": write_errors,
    })
}
