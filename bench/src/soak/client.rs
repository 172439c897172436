//! One soak client: runs streams one after another, each a hostile prompt
//! through `echo`, paced; cuts its connections at random byte offsets,
//! resumes with `Last-Event-ID` on the other replica, sometimes cancels with
//! DELETE, and records everything it saw for `verify`.
//!
//! Reading is raw TCP through `wire` (the cut lands at an exact byte of the
//! server's output, inside the head, chunk framing, an event or a UTF-8
//! sequence), then tokengate's WHATWG parser: an event cut short is never
//! dispatched, so the client resumes from the last *complete* event, as an
//! `EventSource` would.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokengate::sse::{EventRef, Parser};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::rng::Rng;
use super::shared::{Counters, Shared};
use super::summary::Judged;
use super::text::{self, Expected};
use super::verify::{self, Verdict};
use super::wire::{self, Decoder, Phase};

/// One event as the client saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which connection of the stream delivered it (0 = the opening one).
    pub conn: u32,
    /// The sequence number from the id in force (`<stream_id>.<seq>`).
    pub seq: Option<u64>,
    /// What it was.
    pub kind: Kind,
}

/// The event types the native dialect sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `start`, with the stream id.
    Start(String),
    /// One delta's text.
    Delta(String),
    /// `done`, with its `chars`.
    Done(Option<u64>),
    /// Terminal `error`, with its code.
    Error(String),
    /// `shutdown` (the replica drains; not terminal for the stream).
    Shutdown,
    /// Anything else (a bug, reported as such).
    Other(String),
}

impl Kind {
    /// `done` or `error`: the stream's one terminal event.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Kind::Done(_) | Kind::Error(_))
    }
}

/// Everything one stream's connections delivered, in order.
#[derive(Debug, Default)]
pub struct Log {
    /// Events up to and including the terminal one.
    pub events: Vec<Seen>,
    /// Events that arrived after the terminal one (must stay empty).
    pub after_terminal: Vec<Seen>,
    /// The id of the last complete event (what a resume sends).
    pub last_id: Option<String>,
    /// From the `start` event.
    pub stream_id: Option<String>,
    /// Whether the terminal event arrived.
    pub terminal: bool,
    /// Deltas seen so far.
    pub deltas: usize,
}

/// How the client finished with a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The terminal event arrived.
    Terminal,
    /// A resume answered 404 `stream_not_found`.
    NotFound,
    /// A resume answered 204 although no terminal event had arrived.
    NoContent,
    /// An answer the client has no business getting (status, code).
    Refused(u16, String),
    /// No terminal event within the stream deadline.
    Hung,
    /// Never opened within the deadline (last refusal).
    NeverOpened(String),
    /// The connection broke before `start`, so there is no id to resume.
    NoStart,
    /// Malformed HTTP or SSE.
    Protocol(String),
}

/// What a resume from the terminal event's id answered (it must be 204:
/// nothing left, no second terminal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Final {
    /// Not tried (no terminal event).
    NotTried,
    /// 204.
    NoContent,
    /// 404 (possible only after Redis lost the stream).
    NotFound,
    /// 200 and these events with their sequence numbers (a second
    /// terminal, or more).
    Replayed(Vec<(Option<u64>, Kind)>),
    /// Anything else.
    Failed(String),
}

/// One stream, for `verify`.
#[derive(Debug)]
pub struct Transcript {
    /// Client index.
    pub client: usize,
    /// Stream number within the client.
    pub n: u64,
    /// What it must deliver.
    pub expected: Expected,
    /// What it delivered.
    pub log: Log,
    /// How it ended.
    pub end: End,
    /// A DELETE was sent for it.
    pub cancel_sent: bool,
    /// A replica was killed or drained while it ran.
    pub replica_chaos: bool,
    /// Redis was restarted while it ran.
    pub redis_chaos: bool,
    /// The check after the terminal event.
    pub final_resume: Final,
    /// Connections it took.
    pub connections: u32,
}

/// How one connection ended.
#[derive(Debug)]
enum ConnEnd {
    /// The terminal event arrived (and the response ended).
    Terminal,
    /// The client cut it.
    Cut,
    /// `shutdown`: the replica drains.
    Shutdown,
    /// Closed or reset by the server without a terminal event.
    Broken(String),
    /// Silent for the stall bound.
    Stalled,
    /// Not a 200: status and problem code.
    Status(u16, String),
    /// Malformed.
    Protocol(String),
    /// The stream's deadline passed.
    Deadline,
}

/// Per-stream state the reading loop needs.
struct Ctx<'a> {
    shared: &'a Shared,
    token: &'a str,
    rng: &'a mut Rng,
    deadline: Instant,
    /// Cancel once this many deltas have arrived.
    cancel_at: Option<usize>,
    cancel_sent: bool,
}

/// Runs client `client`'s streams until the round says stop (or `limit`
/// streams are done), judging each as it ends (a transcript is dropped
/// once judged, so memory stays flat however long the soak runs).
pub async fn run(shared: Arc<Shared>, client: usize, mut rng: Rng, limit: Option<u64>) -> Vec<Judged> {
    let mut out = Vec::new();
    let mut n = 0;
    while !shared.stop.load(Ordering::SeqCst) && limit.is_none_or(|l| n < l) {
        let t = one_stream(&shared, client, n, &mut rng).await;
        let (v, note) = verify::verdict(&t);
        let detail = v.failed().then(|| describe(&t, &v));
        out.push(Judged { verdict: v, note, redis_chaos: t.redis_chaos, connections: t.connections, detail });
        n += 1;
    }
    out
}

/// A failed stream in full enough to reproduce and read: who, the verdict,
/// how it ended, what it lived through, the prompt and the events.
fn describe(t: &Transcript, v: &Verdict) -> String {
    let mut events = String::new();
    for s in t.log.events.iter().take(120) {
        let what = match &s.kind {
            Kind::Delta(text) => format!("{text:?}"),
            k => format!("{k:?}"),
        };
        events.push_str(&format!(" [c{} #{} {what}]", s.conn, s.seq.map_or("-".to_owned(), |q| q.to_string())));
    }
    format!(
        "client {} stream {} id {}: {v:?}; end {:?}; after terminal {:?}; final resume {:?}; {} connection(s); \
         replica chaos {}, redis chaos {}, cancel sent {}; {} clusters; prompt {:?}; events:{events}",
        t.client,
        t.n,
        t.log.stream_id.as_deref().unwrap_or("?"),
        t.end,
        t.log.after_terminal.iter().map(|s| &s.kind).collect::<Vec<_>>(),
        t.final_resume,
        t.connections,
        t.replica_chaos,
        t.redis_chaos,
        t.cancel_sent,
        t.expected.clusters.len(),
        t.expected.prompt,
    )
}

fn other(r: usize) -> usize {
    1 - r
}

async fn backoff(attempt: u32) {
    let ms = (25u64 << attempt.min(5)).min(1000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

async fn one_stream(shared: &Shared, client: usize, n: u64, rng: &mut Rng) -> Transcript {
    let b = &shared.behaviour;
    let expected = text::hostile(rng, b.pieces.0, b.pieces.1);
    let pace = rng.range(b.pace_ms.0, b.pace_ms.1);
    let cancel_at = rng.chance(b.cancel_chance).then(|| rng.range(0, expected.clusters.len() as u64) as usize);
    let (replica_epoch, redis_epoch) = (shared.replica_chaos.get(), shared.redis_chaos.get());
    let token = shared.tokens.get(client).map_or("", String::as_str);
    let deadline = Instant::now() + b.stream_deadline;
    let mut ctx = Ctx { shared, token, rng, deadline, cancel_at, cancel_sent: false };
    let mut log = Log::default();
    let body = serde_json::json!({ "prompt": expected.prompt, "generator": "echo", "pace_ms": pace }).to_string();
    let mut replica = ctx.rng.range(0, 1) as usize;
    let mut conn = 0u32;
    let mut attempt = 0u32;

    // Open: retried while refused for a reason chaos explains.
    let mut end = loop {
        if Instant::now() > deadline {
            break Err(End::NeverOpened("deadline".into()));
        }
        let req = wire::Request {
            method: "POST",
            path: "/v1/stream",
            token: Some(token),
            last_event_id: None,
            json: Some(&body),
        };
        let tcp = match wire::send(shared.addrs[replica], &req).await {
            Ok(tcp) => tcp,
            Err(e) => {
                shared.counters.retry(format!("open connect {:?}", e.kind()));
                replica = other(replica);
                backoff(attempt).await;
                attempt += 1;
                continue;
            }
        };
        let budget = ctx.rng.chance(b.cut_chance).then(|| ctx.rng.range(1, b.cut_max_bytes));
        match follow(&mut ctx, tcp, &mut log, conn, budget, true).await {
            ConnEnd::Status(s @ (429 | 503), code) => {
                shared.counters.retry(format!("open {s} {code}"));
                replica = other(replica);
                backoff(attempt).await;
                attempt += 1;
            }
            ConnEnd::Status(s, code) => break Err(End::Refused(s, code)),
            e => break Ok(e),
        }
    };
    // Resume until a terminal event, alternating replicas.
    attempt = 0;
    let mut path_style = ctx.rng.range(0, 1);
    loop {
        let last = match end {
            Err(_) => break,
            Ok(ConnEnd::Terminal) => break,
            Ok(ConnEnd::Deadline) => {
                end = Err(End::Hung);
                break;
            }
            Ok(ConnEnd::Protocol(ref e)) => {
                end = Err(End::Protocol(e.clone()));
                break;
            }
            Ok(ConnEnd::Status(204, _)) => {
                end = Err(End::NoContent);
                break;
            }
            Ok(ConnEnd::Status(404, _)) => {
                end = Err(End::NotFound);
                break;
            }
            Ok(ConnEnd::Status(s @ (429 | 503), ref code)) => {
                shared.counters.retry(format!("resume {s} {code}"));
                backoff(attempt).await;
                attempt += 1;
                log.last_id.clone()
            }
            Ok(ConnEnd::Status(s, ref code)) => {
                end = Err(End::Refused(s, code.clone()));
                break;
            }
            Ok(ConnEnd::Cut) => log.last_id.clone(),
            Ok(ConnEnd::Shutdown) => {
                Counters::inc(&shared.counters.shutdowns);
                log.last_id.clone()
            }
            Ok(ConnEnd::Stalled) => {
                Counters::inc(&shared.counters.stalls);
                log.last_id.clone()
            }
            Ok(ConnEnd::Broken(ref why)) => {
                Counters::inc(&shared.counters.broken);
                shared.counters.retry(format!("resume after broken connection: {why}"));
                // The replica is likely going away: give it a moment.
                backoff(attempt).await;
                attempt += 1;
                log.last_id.clone()
            }
        };
        let (Some(last), Some(sid)) = (last, log.stream_id.clone()) else {
            end = Err(End::NoStart);
            break;
        };
        if Instant::now() > deadline {
            end = Err(End::Hung);
            break;
        }
        replica = other(replica);
        conn += 1;
        // Both ways a client resumes: the stream's own URL, and the
        // EventSource way (the opening URL again, with the header).
        path_style = 1 - path_style;
        let path = if path_style == 0 { format!("/v1/streams/{sid}") } else { "/v1/stream".to_owned() };
        let req =
            wire::Request { method: "GET", path: &path, token: Some(token), last_event_id: Some(&last), json: None };
        Counters::inc(&shared.counters.resumes);
        end = match wire::send(shared.addrs[replica], &req).await {
            Ok(tcp) => {
                let budget = ctx.rng.chance(b.cut_chance).then(|| ctx.rng.range(1, b.cut_max_bytes));
                Ok(follow(&mut ctx, tcp, &mut log, conn, budget, false).await)
            }
            // Counted and backed off as a refusal, on the other replica.
            Err(e) => Ok(ConnEnd::Status(503, format!("connect {:?}", e.kind()))),
        };
    }
    let end = match end {
        Ok(_) => End::Terminal,
        Err(e) => e,
    };
    let final_resume =
        if end == End::Terminal { check_after_terminal(&mut ctx, &log, replica).await } else { Final::NotTried };
    Transcript {
        client,
        n,
        expected,
        log,
        end,
        cancel_sent: ctx.cancel_sent,
        replica_chaos: shared.replica_chaos.touched(replica_epoch),
        redis_chaos: shared.redis_chaos.touched(redis_epoch),
        final_resume,
        connections: conn + 1,
    }
}

/// A resume from the terminal event's id, on the replica that did not
/// deliver it: must answer 204 (nothing left; the terminal is not repeated).
async fn check_after_terminal(ctx: &mut Ctx<'_>, log: &Log, last_replica: usize) -> Final {
    let (Some(last), Some(sid)) = (log.last_id.clone(), log.stream_id.clone()) else {
        return Final::Failed("no id".into());
    };
    let path = format!("/v1/streams/{sid}");
    let mut replica = other(last_replica);
    let mut why = String::new();
    for attempt in 0..8 {
        let req = wire::Request {
            method: "GET",
            path: &path,
            token: Some(ctx.token),
            last_event_id: Some(&last),
            json: None,
        };
        let tcp = match wire::send(ctx.shared.addrs[replica], &req).await {
            Ok(t) => t,
            Err(e) => {
                why = format!("connect: {e}");
                replica = other(replica);
                backoff(attempt).await;
                continue;
            }
        };
        let mut replay = Log { stream_id: log.stream_id.clone(), ..Log::default() };
        // No cancel from here on.
        ctx.cancel_at = None;
        match follow(ctx, tcp, &mut replay, 0, None, false).await {
            ConnEnd::Status(204, _) => return Final::NoContent,
            ConnEnd::Status(404, _) => return Final::NotFound,
            ConnEnd::Status(s, code) if s == 503 || s == 429 => {
                why = format!("{s} {code}");
                backoff(attempt).await;
            }
            ConnEnd::Status(s, code) => return Final::Failed(format!("{s} {code}")),
            // A replica going away under the request: ask again.
            ConnEnd::Broken(e) if replay.events.is_empty() => {
                why = e;
                replica = other(replica);
                backoff(attempt).await;
            }
            ConnEnd::Stalled if replay.events.is_empty() => why = "stalled".into(),
            _ => {
                let all = replay.events.into_iter().chain(replay.after_terminal);
                return Final::Replayed(all.map(|s| (s.seq, s.kind)).collect());
            }
        }
    }
    Final::Failed(why)
}

/// Where a cut landed, tracked over the body bytes delivered so far.
#[derive(Default)]
struct CutPosition {
    /// Body bytes since the last blank line (an event boundary).
    pending: usize,
    last: u8,
    /// The last up to 4 body bytes.
    tail: Vec<u8>,
}

impl CutPosition {
    fn feed(&mut self, body: &[u8]) {
        for &b in body {
            if b == b'\n' && self.last == b'\n' {
                self.pending = 0;
            } else {
                self.pending += 1;
            }
            self.last = b;
        }
        self.tail.extend_from_slice(&body[body.len().saturating_sub(4)..]);
        let drop = self.tail.len().saturating_sub(4);
        self.tail.drain(..drop);
    }

    /// The delivered bytes end inside a multi-byte UTF-8 sequence.
    fn inside_utf8(&self) -> bool {
        let Some(start) = self.tail.iter().rposition(|&b| b & 0xC0 != 0x80) else { return false };
        let lead = self.tail[start];
        let need = match lead {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        self.tail.len() - start < need
    }
}

fn seq_of(id: Option<&str>) -> Option<u64> {
    id?.rsplit_once('.')?.1.parse().ok()
}

fn kind_of(event: &str, data: &str) -> Kind {
    let v: serde_json::Value = serde_json::from_str(data).unwrap_or(serde_json::Value::Null);
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    match event {
        "start" => Kind::Start(s("stream_id").unwrap_or_default()),
        "delta" => match s("text") {
            Some(t) => Kind::Delta(t),
            None => Kind::Other(format!("delta without text: {data}")),
        },
        "done" => Kind::Done(v.get("chars").and_then(serde_json::Value::as_u64)),
        "error" => Kind::Error(s("code").unwrap_or_else(|| format!("no code: {data}"))),
        "shutdown" => Kind::Shutdown,
        other => Kind::Other(format!("{other}: {data}")),
    }
}

/// Reads one connection: the response head, then events into `log`, until
/// the terminal event, a cut after `budget` bytes, a `shutdown`, a break, a
/// stall or the deadline. With `after_start`, the budget only starts once
/// the `start` event has arrived (so the client always learns the id).
async fn follow(
    ctx: &mut Ctx<'_>,
    mut tcp: TcpStream,
    log: &mut Log,
    conn: u32,
    mut budget: Option<u64>,
    after_start: bool,
) -> ConnEnd {
    let shared = ctx.shared;
    let mut dec = Decoder::new();
    let mut parser = Parser::new();
    let mut pos = CutPosition::default();
    let mut problem = Vec::new();
    let mut counting = !after_start;
    let mut buf = vec![0u8; 8 * 1024];
    let mut shutdown = false;
    loop {
        let now = Instant::now();
        if now > ctx.deadline {
            return ConnEnd::Deadline;
        }
        // After the terminal event only the end of the response is awaited.
        let wait = if log.terminal { Duration::from_secs(2) } else { shared.behaviour.stall };
        let wait = wait.min(ctx.deadline - now);
        let n = match tokio::time::timeout(wait, tcp.read(&mut buf)).await {
            Err(_) if log.terminal => return ConnEnd::Protocol("response not ended after the terminal event".into()),
            Err(_) if Instant::now() >= ctx.deadline => return ConnEnd::Deadline,
            Err(_) => return ConnEnd::Stalled,
            Ok(Err(e)) if log.terminal => return ConnEnd::Protocol(format!("reset after the terminal event: {e}")),
            Ok(Err(e)) => return ConnEnd::Broken(e.to_string()),
            Ok(Ok(0)) => {
                return match (dec.head().map(|h| h.status), log.terminal) {
                    (Some(200), true) => ConnEnd::Protocol("closed before the end of the chunked body".into()),
                    (Some(200), false) if shutdown => ConnEnd::Shutdown,
                    _ => ConnEnd::Broken("closed".into()),
                };
            }
            Ok(Ok(n)) => n,
        };
        let mut data = &buf[..n];
        let mut cut = false;
        let is_ok = dec.head().is_none_or(|h| h.status == 200);
        if counting
            && is_ok
            && let Some(left) = budget.as_mut()
        {
            if (n as u64) >= *left {
                data = &buf[..*left as usize];
                cut = true;
            } else {
                *left -= n as u64;
            }
        }
        let mut items: Vec<(String, String, Option<String>)> = Vec::new();
        let fed = dec.feed(data, |body| {
            pos.feed(body);
            problem.extend_from_slice(&body[..body.len().min(4096usize.saturating_sub(problem.len()))]);
            parser.feed_with(body, |ev| {
                if let EventRef::Message { event, data, id } = ev {
                    items.push((event.to_owned(), data.to_owned(), id.map(str::to_owned)));
                }
            });
        });
        if let Err(e) = fed {
            return ConnEnd::Protocol(e);
        }
        if let Some(h) = dec.head()
            && h.status != 200
        {
            if dec.phase() == Phase::Done {
                let code = serde_json::from_slice::<serde_json::Value>(&problem)
                    .ok()
                    .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                return ConnEnd::Status(h.status, code);
            }
            continue;
        }
        problem.clear();
        for (event, data, id) in items {
            let seen = Seen { conn, seq: seq_of(id.as_deref()), kind: kind_of(&event, &data) };
            if log.terminal {
                log.after_terminal.push(seen);
                continue;
            }
            if let Kind::Start(sid) = &seen.kind
                && log.stream_id.is_none()
            {
                log.stream_id = Some(sid.clone());
                counting = true;
            }
            match seen.kind {
                Kind::Shutdown => shutdown = true,
                Kind::Delta(_) => log.deltas += 1,
                ref k if k.is_terminal() => log.terminal = true,
                _ => {}
            }
            if seen.kind != Kind::Shutdown {
                log.last_id = id;
            }
            log.events.push(seen);
        }
        if cut {
            record_cut(&shared.counters, &dec, &pos);
            return if log.terminal { ConnEnd::Terminal } else { ConnEnd::Cut };
        }
        if dec.phase() == Phase::Done {
            return match (log.terminal, shutdown) {
                (true, _) => ConnEnd::Terminal,
                (false, true) => ConnEnd::Shutdown,
                (false, false) => ConnEnd::Broken("response ended without a terminal event".into()),
            };
        }
        if let Some(at) = ctx.cancel_at
            && log.deltas >= at
            && !log.terminal
            && let Some(sid) = log.stream_id.clone()
        {
            ctx.cancel_at = None;
            cancel(ctx, &sid).await;
        }
    }
}

fn record_cut(c: &Counters, dec: &Decoder, pos: &CutPosition) {
    Counters::inc(&c.disconnects);
    match dec.phase() {
        Phase::Head => Counters::inc(&c.cut_in_head),
        Phase::Framing => Counters::inc(&c.cut_in_framing),
        Phase::Body | Phase::Done => {}
    }
    if dec.phase() != Phase::Head && pos.pending > 0 {
        Counters::inc(&c.cut_in_event);
        if pos.inside_utf8() {
            Counters::inc(&c.cut_in_utf8);
        }
    }
}

/// DELETE on a random replica (the other one if that one is down).
async fn cancel(ctx: &mut Ctx<'_>, sid: &str) {
    ctx.cancel_sent = true;
    let path = format!("/v1/streams/{sid}");
    let mut replica = ctx.rng.range(0, 1) as usize;
    for attempt in 0..4 {
        let req =
            wire::Request { method: "DELETE", path: &path, token: Some(ctx.token), last_event_id: None, json: None };
        match wire::call(ctx.shared.addrs[replica], &req, Duration::from_secs(5)).await {
            Ok((204, _)) => {
                Counters::inc(&ctx.shared.counters.cancels);
                return;
            }
            Ok((status, _)) => ctx.shared.counters.retry(format!("cancel {status}")),
            Err(e) => ctx.shared.counters.retry(format!("cancel {}", e.split(':').next().unwrap_or_default())),
        }
        replica = other(replica);
        backoff(attempt).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_position_sees_events_and_utf8() {
        let mut p = CutPosition::default();
        p.feed(b"id: x.1\nevent: delta\ndata: {\"text\":\"");
        assert!(p.pending > 0 && !p.inside_utf8());
        p.feed(&"你".as_bytes()[..2]);
        assert!(p.inside_utf8());
        p.feed(&"你".as_bytes()[2..]);
        assert!(!p.inside_utf8());
        p.feed(b"\"}\n\n");
        assert_eq!(p.pending, 0);
        assert_eq!(seq_of(Some("abc.17")), Some(17));
        assert_eq!(seq_of(Some("abc.gap")), None);
    }
}
