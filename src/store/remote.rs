//! The replica side of the shared store: following a stream produced by
//! another replica, and tailing the channels local subscribers follow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::Stream;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use super::ChannelHub;
use super::redis::{REMOTE_POLL, RedisStore, id_after};
use crate::stream::{StreamEvent, StreamId};

/// Follows a stream produced elsewhere from sequence `from`: replays what
/// Redis holds, then polls for more. If the producer's lease lapses before
/// the terminal event, the reader gets a terminal `error` with code
/// `generator_lost` (its replica died): never a hang. A Redis failure ends
/// the reader with `store_unavailable`.
pub fn follow_remote(
    redis: Arc<RedisStore>,
    stream_id: StreamId,
    from: u64,
    heartbeat: Duration,
    closing: CancellationToken,
    shutdown_retry_ms: u64,
) -> impl Stream<Item = Arc<StreamEvent>> + Send + 'static {
    async_stream::stream! {
        let mut next = from;
        // A child token of our own: `is_cancelled` locks the token's mutex,
        // and the shared shutdown token would be one lock contended by every
        // reader on every event.
        let closing = closing.child_token();
        let mut last_sent = Instant::now();
        let mut lease_missing = false;
        let mut announced: Option<Instant> = None;
        loop {
            // Tell the producing replica someone reads here, once a second.
            if announced.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                let _ = redis.mark_remote_reader(&stream_id, announced.is_none()).await;
                announced = Some(Instant::now());
            }
            if closing.is_cancelled() {
                yield Arc::new(StreamEvent::Shutdown { retry_ms: shutdown_retry_ms });
                return;
            }
            let error = |code: &'static str, message: String, seq: u64| {
                Arc::new(StreamEvent::Error { stream_id, seq, code: code.into(), message })
            };
            match redis.read(&stream_id, next, 256).await {
                Err(e) => {
                    yield error("store_unavailable", format!("the shared store failed: {e}"), next);
                    return;
                }
                Ok(Err(first_kept)) => {
                    yield error("resume_gap", format!("events from {next} on are no longer retained (oldest kept: {first_kept}); start a new stream"), next);
                    return;
                }
                Ok(Ok(events)) if !events.is_empty() => {
                    lease_missing = false;
                    for event in events {
                        let terminal = event.is_terminal();
                        next = event.seq().map_or(next, |s| s + 1);
                        yield Arc::new(event);
                        if terminal {
                            return;
                        }
                    }
                    last_sent = Instant::now();
                    continue;
                }
                Ok(Ok(_)) => {}
            }
            match redis.leased(&stream_id).await {
                Ok(true) => lease_missing = false,
                // Read once more after noticing: the terminal event and the
                // lease's removal are written together.
                Ok(false) if !lease_missing => {
                    lease_missing = true;
                    continue;
                }
                Ok(false) => {
                    yield error("generator_lost", "the replica generating this stream is gone".into(), next);
                    return;
                }
                Err(e) => {
                    yield error("store_unavailable", format!("the shared store failed: {e}"), next);
                    return;
                }
            }
            if last_sent.elapsed() >= heartbeat {
                yield Arc::new(StreamEvent::Heartbeat);
                last_sent = Instant::now();
            }
            tokio::select! {
                () = closing.cancelled() => {}
                () = sleep(REMOTE_POLL) => {}
            }
        }
    }
}

#[derive(Debug)]
struct Want {
    /// The newest id ingested (or the start position).
    last: String,
    /// Local subscribers that need it.
    watchers: usize,
}

/// One per replica: tails, with a single blocking `XREAD`, every channel
/// that has a local subscriber, and feeds new events into the local
/// [`ChannelHub`], from which all local subscribers fan out.
#[derive(Debug)]
pub struct ChannelTail {
    redis: Arc<RedisStore>,
    hub: Arc<ChannelHub>,
    wanted: Mutex<HashMap<String, Want>>,
}

/// Keeps a channel tailed while it lives.
#[derive(Debug)]
pub struct TailGuard {
    tail: Arc<ChannelTail>,
    name: String,
}

impl Drop for TailGuard {
    fn drop(&mut self) {
        let mut wanted = self.tail.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(want) = wanted.get_mut(&self.name) {
            want.watchers -= 1;
            if want.watchers == 0 {
                wanted.remove(&self.name);
            }
        }
    }
}

/// How long one `XREAD` blocks; also the longest a newly watched channel
/// waits for its first tail round.
const TAIL_BLOCK: Duration = Duration::from_millis(100);

impl ChannelTail {
    /// A tail feeding `hub`.
    pub fn new(redis: Arc<RedisStore>, hub: Arc<ChannelHub>) -> Arc<Self> {
        Arc::new(Self { redis, hub, wanted: Mutex::new(HashMap::new()) })
    }

    /// Tails `name` from after `from` (an id) while the guard lives.
    pub fn watch(self: &Arc<Self>, name: &str, from: &str) -> TailGuard {
        let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        // A channel already tailed keeps its position: what it ingested
        // after `from` is in the local log, where the subscriber starts.
        let want = wanted.entry(name.to_owned()).or_insert_with(|| Want { last: from.to_owned(), watchers: 0 });
        want.watchers += 1;
        TailGuard { tail: self.clone(), name: name.to_owned() }
    }

    /// Runs until `stop`, reconnecting after failures.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let mut conn = match self.redis.dedicated().await {
                Ok(conn) => conn,
                Err(_) => {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            let mut counted_refresh = Instant::now();
            loop {
                // Subscriber counts live with a TTL; keep those of channels
                // with local subscribers from expiring.
                if counted_refresh.elapsed() >= Duration::from_secs(30) {
                    counted_refresh = Instant::now();
                    let names: Vec<String> =
                        self.wanted.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
                    for name in names {
                        let _ = self.redis.count_subscriber(&name, "refresh", 0).await;
                    }
                }
                let positions: Vec<(String, String)> = {
                    let wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
                    wanted.iter().map(|(name, want)| (name.clone(), want.last.clone())).collect()
                };
                let result = tokio::select! {
                    () = stop.cancelled() => return,
                    result = self.redis.channel_tail(&mut conn, &positions, TAIL_BLOCK) => result,
                };
                match result {
                    Ok(batches) => {
                        for (name, entries) in batches {
                            let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
                            let Some(want) = wanted.get_mut(&name) else { continue };
                            for (id, mut fields) in entries {
                                if !id_after(&id, &want.last) {
                                    continue;
                                }
                                want.last = id.clone();
                                let data = fields.remove("d").unwrap_or_else(|| "null".to_owned());
                                self.hub.ingest(&name, id, fields.remove("e"), data);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "channel tail lost redis; reconnecting");
                        break;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}
