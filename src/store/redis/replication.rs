//! Copying the streams this replica produces to Redis: one writer per
//! replica ([`Replication`]) and a handle per stream ([`Replicator`]).
//!
//! One writer, rather than a task per stream, because what costs at many
//! concurrent streams is the round trips, not the bytes: a task per stream
//! sent a pipeline per stream per batch through the shared connection, each
//! with its own wake-ups, encoding and reply parse (12.5% of the server's
//! samples at 500 paced streams). The writer sends every stream's pending
//! events in one pipeline, at most once per window (`replication_window`,
//! a stream's end at once), and refreshes every stream's lease in one pipeline per second.
//! Order holds because one task sends one pipeline at a time, and a
//! stream's events are taken in the order they were queued.
//!
//! Any failure ends the stream rather than being retried later: an event written after a lost
//! one would leave a hole that a remote reader reading across it skips without noticing, and a
//! lease that cannot be refreshed soon lapses, after which such readers report the producer
//! lost anyway.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use redis::Value;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::memory::LiveStream;
use super::leases::REMOTE_READER;
use super::{LEASE_REFRESH, RESPONSE_TIMEOUT, RedisStore};
use crate::event::StreamEvent;
use crate::store::StoreError;

/// Most events of one stream in one pipeline (the rest go in the next).
const PER_STREAM: usize = 512;
/// Most events in one pipeline, over all streams (the rest go in the next,
/// sent at once).
const PER_PIPELINE: usize = 8192;

/// The replica's writer: what streams have pending, and the streams whose
/// leases it keeps. Started by [`Replication::run`].
#[derive(Debug)]
pub(in crate::store) struct Replication {
    store: Arc<RedisStore>,
    /// The longest an event waits before the writer sends it, so that a
    /// paced stream's deltas reach Redis as runs of several (one `XADD`
    /// each) rather than one command per grapheme cluster; it is also what
    /// replication adds to a reader's latency on another replica. A
    /// terminal event is sent at once.
    window: Duration,
    state: Mutex<Pending>,
    /// Something was queued.
    wake: Notify,
    /// A terminal event was queued: send without waiting out the window.
    urgent: Notify,
}

#[derive(Debug, Default)]
struct Pending {
    /// Streams with queued events, in the order they first queued one.
    dirty: VecDeque<Arc<StreamState>>,
    /// Every stream produced here whose lease the writer refreshes.
    live: Vec<Weak<StreamState>>,
}

/// One stream's replication: shared by its [`Replicator`] and the writer.
#[derive(Debug)]
struct StreamState {
    stream: Arc<LiveStream>,
    /// Most events that may wait; a queue this long means Redis is that far behind.
    capacity: usize,
    queue: Mutex<Queue>,
    /// Cancelled when replication failed (the stream's stop token fires
    /// too; this one says why).
    failed: CancellationToken,
    /// The sequence number of the last event Redis holds.
    written: watch::Sender<u64>,
    /// The terminal batch is written (the lease is gone), or the producer
    /// has finished: no more lease refreshes.
    ended: AtomicBool,
}

#[derive(Debug, Default)]
struct Queue {
    events: Vec<Arc<StreamEvent>>,
    /// In the writer's `dirty` list.
    listed: bool,
    /// The log key exists (the first append gives it its TTL).
    created: bool,
    /// The sequence number of the last event queued.
    last_queued: u64,
}

/// One stream's part of a pipeline: its state, the events taken from its
/// queue, and whether they are its first append.
type Taken = (Arc<StreamState>, Vec<Arc<StreamEvent>>, bool);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StreamState {
    fn fail(&self) {
        self.failed.cancel();
        self.stream.stopped().cancel();
    }
}

/// Whether a reply, or anything inside it (`EXEC`'s array), is an error.
fn has_error(value: &Value) -> bool {
    match value {
        Value::ServerError(_) => true,
        Value::Array(items) => items.iter().any(has_error),
        _ => false,
    }
}

impl Replication {
    /// The writer for `store`; it writes nothing until [`Self::run`] runs.
    pub(in crate::store) fn new(store: Arc<RedisStore>, window: Duration) -> Arc<Self> {
        Arc::new(Self { store, window, state: Mutex::default(), wake: Notify::new(), urgent: Notify::new() })
    }

    /// Starts replicating `stream`; `capacity` bounds what may queue. Every
    /// lease refresh also looks for readers on other replicas and holds the
    /// stream for them (the detach grace counts only local readers).
    pub(in crate::store) fn start(self: &Arc<Self>, stream: Arc<LiveStream>, capacity: usize) -> Replicator {
        let state = Arc::new(StreamState {
            stream,
            capacity: capacity.max(1),
            queue: Mutex::default(),
            failed: CancellationToken::new(),
            written: watch::channel(0).0,
            ended: AtomicBool::new(false),
        });
        lock(&self.state).live.push(Arc::downgrade(&state));
        Replicator { writer: self.clone(), state }
    }

    /// Writes until `stop`, and after it until no stream produced here is
    /// left to write (the last streams' ends reach Redis during shutdown).
    pub(in crate::store) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut lease = tokio::time::interval(LEASE_REFRESH);
        lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_send = Instant::now();
        loop {
            tokio::select! {
                () = self.wake.notified() => {
                    // Gather for the rest of the window, unless an end is waiting.
                    tokio::select! {
                        () = tokio::time::sleep_until(last_send + self.window) => {}
                        () = self.urgent.notified() => {}
                    }
                    last_send = Instant::now();
                    self.send_pending().await;
                }
                _ = lease.tick() => {
                    self.refresh_leases().await;
                    if stop.is_cancelled() && self.is_idle() {
                        return;
                    }
                }
            }
        }
    }

    /// Nothing queued and no stream left whose lease needs keeping.
    fn is_idle(&self) -> bool {
        let state = lock(&self.state);
        state.dirty.is_empty() && state.live.iter().all(|w| w.upgrade().is_none_or(|s| s.ended.load(Ordering::Acquire)))
    }

    /// Lists a stream that has just queued its first pending event.
    fn list(&self, stream: Arc<StreamState>) {
        lock(&self.state).dirty.push_back(stream);
        self.wake.notify_one();
    }

    /// Sends everything pending, one pipeline of at most [`PER_PIPELINE`]
    /// events (at most [`PER_STREAM`] of each stream) after another.
    async fn send_pending(&self) {
        loop {
            let mut batch = Vec::new();
            let mut events = 0;
            // Streams with more than their share pending go back to the end
            // of the list after this take, so one backlog does not fill the
            // pipeline while other streams wait.
            let mut again = Vec::new();
            {
                let mut state = lock(&self.state);
                while events < PER_PIPELINE {
                    let Some(stream) = state.dirty.pop_front() else { break };
                    let mut queue = lock(&stream.queue);
                    let n = queue.events.len().min(PER_STREAM);
                    let taken: Vec<_> = queue.events.drain(..n).collect();
                    let first = !queue.created;
                    queue.created = true;
                    let more = !queue.events.is_empty();
                    queue.listed = more;
                    drop(queue);
                    if stream.failed.is_cancelled() || taken.is_empty() {
                        continue;
                    }
                    events += taken.len();
                    if more {
                        again.push(stream.clone());
                    }
                    batch.push((stream, taken, first));
                }
                state.dirty.extend(again.iter().cloned());
            }
            if batch.is_empty() {
                return;
            }
            self.send(&batch).await;
            // A backlog (a full pipeline, or a stream with more than its
            // share) is sent at once, not a window later: a fast stream
            // would otherwise outgrow its queue's capacity.
            if events < PER_PIPELINE && again.is_empty() {
                return;
            }
        }
    }

    /// One pipeline with every stream's appends; each stream learns how far
    /// Redis holds it, or fails alone if only its commands did.
    async fn send(&self, batch: &[Taken]) {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let counts: Vec<usize> = batch
            .iter()
            .map(|(s, events, first)| self.store.append_commands(&mut pipe, &s.stream.id, events, *first))
            .collect();
        let replies = pipe.query_async::<Vec<Value>>(&mut self.store.conn()).await;
        let replies = match replies {
            Ok(replies) if replies.len() == counts.iter().sum::<usize>() => replies,
            result => {
                let error = result.err().map_or("a reply is missing".to_owned(), |e| StoreError::from(e).to_string());
                tracing::warn!(streams = batch.len(), %error, "replication to redis failed");
                batch.iter().for_each(|(s, _, _)| s.fail());
                return;
            }
        };
        let mut replies = replies.iter();
        for ((stream, events, _), count) in batch.iter().zip(counts) {
            if replies.by_ref().take(count).fold(false, |bad, r| bad | has_error(r)) {
                tracing::warn!(stream_id = %stream.stream.id, "replication to redis failed: an append was refused");
                stream.fail();
                continue;
            }
            if let Some(seq) = events.iter().rev().find_map(|e| e.seq()) {
                stream.written.send_replace(seq);
            }
            if events.iter().any(|e| e.is_terminal()) {
                stream.ended.store(true, Ordering::Release);
            }
        }
    }

    /// Refreshes the lease of every stream produced here that has not
    /// ended, in one pipeline, and holds those that a reader on another
    /// replica follows. A stream whose refresh failed fails (its lease
    /// would lapse).
    async fn refresh_leases(&self) {
        let streams: Vec<Arc<StreamState>> = {
            let mut state = lock(&self.state);
            state.live.retain(|w| w.upgrade().is_some_and(|s| !s.ended.load(Ordering::Acquire)));
            state.live.iter().filter_map(Weak::upgrade).filter(|s| !s.failed.is_cancelled()).collect()
        };
        if streams.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for s in &streams {
            self.store.lease_commands(&mut pipe, &s.stream.id);
        }
        let replies = match pipe.query_async::<Vec<Value>>(&mut self.store.conn()).await {
            Ok(replies) if replies.len() == 4 * streams.len() => replies,
            _ => {
                tracing::warn!(streams = streams.len(), "stream lease refresh in redis failed");
                streams.iter().for_each(|s| s.fail());
                return;
            }
        };
        let until = Instant::now() + REMOTE_READER;
        for (s, replies) in streams.iter().zip(replies.chunks(4)) {
            if replies.iter().any(has_error) {
                s.fail();
            } else if matches!(replies.get(3), Some(Value::Int(1))) {
                s.stream.hold_for_remote(until);
            }
        }
    }
}

/// One stream's handle on the replica's writer: queues its events and
/// reports the first failure through [`Replicator::has_failed`] and the
/// stream's stop token (the producer then ends the stream with
/// `store_unavailable`).
#[derive(Debug)]
pub(in crate::store) struct Replicator {
    writer: Arc<Replication>,
    state: Arc<StreamState>,
}

impl Replicator {
    /// Queues an event; a full queue counts as a failure. Returns whether the queue is at least
    /// half full: the producer then waits for [`Self::caught_up`].
    ///
    /// Never waits: the producer calls it per event on its hot path. A queue holding `capacity`
    /// events means Redis is that far behind (the producer did not wait, or Redis did not answer
    /// within the wait's bound); the stream ends rather than buffer without bound or drop an
    /// event.
    pub(in crate::store) fn push(&self, event: Arc<StreamEvent>) -> bool {
        let state = &self.state;
        if state.failed.is_cancelled() {
            return false;
        }
        let terminal = event.is_terminal();
        let (list, full, behind) = {
            let mut queue = lock(&state.queue);
            if queue.events.len() >= state.capacity {
                drop(queue);
                state.fail();
                return false;
            }
            if let Some(seq) = event.seq() {
                queue.last_queued = seq;
            }
            queue.events.push(event);
            let queued = queue.events.len();
            (!std::mem::replace(&mut queue.listed, true), queued == PER_STREAM, queued * 2 >= state.capacity)
        };
        if list {
            self.writer.list(state.clone());
        }
        // An end, or a stream with a pipeline's share waiting (an unpaced
        // one outgrows its queue in a window), is sent without waiting out
        // the window.
        if terminal || full || behind {
            self.writer.urgent.notify_one();
        }
        behind
    }

    /// Waits (bounded, as [`Replicator::written_through`]) until at most a quarter of the queue
    /// waits for Redis, or replication has failed.
    pub(in crate::store) async fn caught_up(&self) {
        let state = &self.state;
        self.wait_for(|_| lock(&state.queue).events.len() * 4 <= state.capacity).await;
    }

    /// Waits (bounded, as [`Replicator::finish`]) until Redis holds the
    /// event numbered `seq`, or replication has failed; whether Redis holds
    /// it.
    pub(in crate::store) async fn written_through(&self, seq: u64) -> bool {
        self.wait_for(|written| written >= seq).await;
        *self.state.written.borrow() >= seq
    }

    /// Waits until `done` (given the sequence number Redis holds through) or a failure, checking
    /// again each time Redis takes more of this stream; at most twice the response timeout.
    async fn wait_for(&self, done: impl Fn(u64) -> bool) {
        let state = &self.state;
        let mut written = state.written.subscribe();
        let wait = async {
            while !done(*written.borrow_and_update()) && !state.failed.is_cancelled() {
                tokio::select! {
                    changed = written.changed() => if changed.is_err() { return },
                    () = state.failed.cancelled() => return,
                }
            }
        };
        let _ = tokio::time::timeout(RESPONSE_TIMEOUT * 2, wait).await;
    }

    /// Whether replication failed (and so stopped the stream).
    pub(in crate::store) fn has_failed(&self) -> bool {
        self.state.failed.is_cancelled()
    }

    /// Looks for a reader on another replica (its periodic announcement may
    /// not have arrived yet); if there is one, holds the stream for it.
    /// A failed lookup counts as no reader.
    pub(in crate::store) async fn hold_for_remote_reader(&self) -> bool {
        if let Ok(true) = self.writer.store.remote_reader(&self.state.stream.id).await {
            self.state.stream.hold_for_remote(Instant::now() + REMOTE_READER);
            return true;
        }
        false
    }

    /// Waits (bounded) until everything queued is written, then stops the
    /// lease refreshes.
    ///
    /// After `2 × RESPONSE_TIMEOUT` it stops waiting, but what is queued is not dropped: the
    /// writer goes on sending it in the background, while the caller frees the stream's slot.
    pub(in crate::store) async fn finish(self) {
        let last = lock(&self.state.queue).last_queued;
        self.written_through(last).await;
        self.state.ended.store(true, Ordering::Release);
    }
}
