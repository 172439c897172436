//! What the client tasks, the chaos schedule and the checks share: the
//! replicas' addresses, the tokens, live counters, and the chaos epochs that
//! tell a stream whether some failure happened while it ran (and so which
//! terminal errors it may legitimately end with).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How a soak client paces and cuts its streams.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Pieces per prompt (see `text::hostile`).
    pub pieces: (u64, u64),
    /// `pace_ms` range asked for.
    pub pace_ms: (u64, u64),
    /// Chance that a connection is cut (else it is read to the end).
    pub cut_chance: f64,
    /// A cut comes after `1..=cut_max_bytes` bytes of the connection.
    pub cut_max_bytes: u64,
    /// Chance that a stream is cancelled with DELETE part-way.
    pub cancel_chance: f64,
    /// A stream with no terminal event after this long is hung.
    pub stream_deadline: Duration,
    /// A connection that delivers no byte for this long is given up
    /// (heartbeats come every second) and the stream resumed.
    pub stall: Duration,
}

/// A pair of counters for one kind of chaos, bumped when the failure
/// starts and again once the system is back (plus a margin): odd means
/// "in progress". A stream saw that kind of chaos if the value changed
/// while it ran, or was odd when it started.
#[derive(Debug, Default)]
pub struct Epoch(AtomicU64);

impl Epoch {
    /// Marks the start or the end of a failure.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// The current value (for [`Epoch::touched`]).
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Whether a failure overlapped the interval since `since` was read.
    pub fn touched(&self, since: u64) -> bool {
        since % 2 == 1 || self.get() != since
    }
}

/// Live counters (atomics: the client tasks update them concurrently).
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections cut by the client on purpose.
    pub disconnects: AtomicU64,
    /// ... of which inside the response head.
    pub cut_in_head: AtomicU64,
    /// ... inside chunk framing.
    pub cut_in_framing: AtomicU64,
    /// ... inside an SSE event (some of its bytes delivered, not all).
    pub cut_in_event: AtomicU64,
    /// ... inside a multi-byte UTF-8 sequence (a subset of the above).
    pub cut_in_utf8: AtomicU64,
    /// Resume requests sent.
    pub resumes: AtomicU64,
    /// DELETEs that were answered 204.
    pub cancels: AtomicU64,
    /// Connections given up for silence (no byte, not even a heartbeat).
    pub stalls: AtomicU64,
    /// Connections the server ended with `shutdown` (drain).
    pub shutdowns: AtomicU64,
    /// Connections that broke without a cut by the client (replica killed).
    pub broken: AtomicU64,
    /// Retried answers, by reason (`open 503 draining`, `resume connect`...).
    pub retries: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    /// Adds one to an atomic counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a retried answer.
    pub fn retry(&self, why: String) {
        let mut m = self.retries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry(why).or_default() += 1;
    }
}

/// Everything shared by one round's tasks.
#[derive(Debug)]
pub struct Shared {
    /// The two replicas.
    pub addrs: [SocketAddr; 2],
    /// One token per client (subject `soak-<i>`).
    pub tokens: Vec<String>,
    /// Client behaviour.
    pub behaviour: Behaviour,
    /// Live counters.
    pub counters: Counters,
    /// Replica kills and drains.
    pub replica_chaos: Epoch,
    /// Redis restarts.
    pub redis_chaos: Epoch,
    /// Clients start no new stream once this is set.
    pub stop: AtomicBool,
}
