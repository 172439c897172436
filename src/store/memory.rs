//! In-memory stream logs: the [`StreamHub`] of streams produced by this
//! process, each a bounded, expiring [`LiveStream`] log with its attached
//! readers. The log keeps events and facts (who reads where, since when
//! nobody does) and wakes whoever waits on them; what to do about those
//! facts (backpressure, detach grace, slow consumers) is the lifecycle's
//! business, in [`crate::stream`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::compact::CompactLog;
use super::cursor::Read;
use crate::event::{StreamEvent, StreamId};

/// Retention of stream logs.
#[derive(Debug, Clone, Copy)]
pub(super) struct HubSettings {
    /// Events kept per stream; older ones are dropped (resuming before them
    /// is a `resume_gap`).
    pub max_events: usize,
    /// How long a finished stream stays resumable.
    pub ttl: Duration,
}

/// The streams produced by this process, by id.
#[derive(Debug)]
pub(super) struct StreamHub {
    streams: Mutex<HashMap<StreamId, Arc<LiveStream>>>,
    settings: HubSettings,
}

#[derive(Debug)]
struct LogState {
    /// The retained events, stored compactly (text once, plus offsets).
    events: CompactLog,
    finished_at: Option<Instant>,
    /// Each attached local reader: the next sequence it needs, and how to
    /// wake it.
    readers: Vec<Arc<ReaderSlot>>,
    /// Since when no reader is attached.
    detached_since: Option<Instant>,
    /// A reader on another replica was seen; until then the stream counts
    /// as attached (shared store only).
    remote_until: Option<Instant>,
    /// The most events the producer has been ahead of its slowest reader.
    deepest_lag: u64,
}

impl LogState {
    fn next_seq(&self) -> u64 {
        self.events.next_seq()
    }

    /// How far the next append is ahead of the slowest attached reader.
    fn lag(&self) -> u64 {
        let next = self.next_seq();
        self.readers.iter().map(|r| next.saturating_sub(r.position.load(Ordering::SeqCst))).max().unwrap_or(0)
    }
}

/// One attached reader, as the log sees it.
#[derive(Debug)]
struct ReaderSlot {
    position: AtomicU64,
    /// Registered while the reader waits for the next append. A waker per
    /// reader (not one `Notify` for all) makes the per-event wake lock-free.
    waker: AtomicWaker,
}

/// One stream's log, owner and stop token.
#[derive(Debug)]
pub struct LiveStream {
    /// The stream's id.
    pub id: StreamId,
    /// The subject that created it.
    pub owner: String,
    /// Its generator.
    pub generator: String,
    max_events: usize,
    state: Mutex<LogState>,
    /// Woken when readers attach, detach or advance (the producer waits).
    progress: Notify,
    /// The producer waits on a full window: only then do readers' advances
    /// need to wake it (saves a wake-up per event on the hot path).
    producer_waiting: AtomicBool,
    /// Fires on `DELETE /v1/streams/{id}`, on server shutdown (a child of
    /// the closing token) and when replication fails: everything that
    /// stops the producer, in one token it can poll cheaply per event.
    cancel: CancellationToken,
    /// Set by [`LiveStream::cancel`].
    deleted: AtomicBool,
}

/// The producer's view of its readers, taken under one lock before every
/// append (see [`LiveStream::flow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// No local reader is attached.
    pub detached: bool,
    /// Events the next append is ahead of the slowest attached reader.
    pub lag: u64,
}

/// Since when nobody reads a stream here, and until when a reader on
/// another replica holds it (see [`LiveStream::attachment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment {
    /// `None` while a local reader is attached.
    pub detached_since: Option<Instant>,
    /// The hold of the latest reader seen on another replica.
    pub remote_until: Option<Instant>,
}

fn lock(m: &Mutex<LogState>) -> MutexGuard<'_, LogState> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StreamHub {
    /// An empty hub.
    pub(super) fn new(settings: HubSettings) -> Arc<Self> {
        Arc::new(Self { streams: Mutex::new(HashMap::new()), settings })
    }

    /// Registers a new stream. Its stop token ([`LiveStream::stopped`]) is
    /// a child of `closing`, so the producer waits on one token for cancel,
    /// shutdown and store failure alike.
    pub(super) fn create(
        &self,
        id: StreamId,
        owner: &str,
        generator: &str,
        closing: &CancellationToken,
    ) -> Arc<LiveStream> {
        let stream = Arc::new(LiveStream {
            id,
            owner: owner.to_owned(),
            generator: generator.to_owned(),
            max_events: self.settings.max_events.max(1),
            state: Mutex::new(LogState {
                events: CompactLog::new(id),
                finished_at: None,
                readers: Vec::new(),
                detached_since: Some(Instant::now()),
                remote_until: None,
                deepest_lag: 0,
            }),
            progress: Notify::new(),
            producer_waiting: AtomicBool::new(false),
            cancel: closing.child_token(),
            deleted: AtomicBool::new(false),
        });
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).insert(id, stream.clone());
        stream
    }

    /// A stream produced here, if it is still retained.
    pub(super) fn get(&self, id: &StreamId) -> Option<Arc<LiveStream>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned()
    }

    /// Streams retained (running or finished within the TTL).
    pub(super) fn len(&self) -> usize {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Forgets finished streams older than the TTL.
    pub(super) fn sweep(&self) {
        let ttl = self.settings.ttl;
        let now = Instant::now();
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, s| {
            let keep = lock(&s.state).finished_at.is_none_or(|at| now.duration_since(at) < ttl);
            if !keep {
                crate::heap_trim::released();
            }
            keep
        });
    }
}

impl LiveStream {
    /// Appends the next event (the producer only) without waking the
    /// readers: the producer appends a batch of events that were ready
    /// together, then wakes them once ([`Self::wake_readers`]), so they read
    /// the batch in one go. Past `max_events` the oldest is dropped. A delta
    /// is copied into the log's text (readers get it rebuilt); `shared`, the
    /// caller's `Arc` of the same event if it has one (the replicated
    /// terminal event), is kept instead of a copy for the other events.
    pub fn append_quietly(&self, event: &StreamEvent, shared: Option<&Arc<StreamEvent>>) {
        let terminal = event.is_terminal();
        let mut state = lock(&self.state);
        state.events.push(event, shared);
        if state.events.len() > self.max_events {
            state.events.pop_front();
        }
        if terminal {
            state.finished_at = Some(Instant::now());
            // Nothing more comes: the log keeps only what it holds, and
            // what it grew through can go back to the OS.
            state.events.shrink();
            crate::heap_trim::released();
        }
    }

    /// Wakes readers waiting for events appended since they last looked.
    pub fn wake_readers(&self) {
        for reader in &lock(&self.state).readers {
            reader.waker.wake();
        }
    }

    /// The most events the producer was ever ahead of its slowest reader.
    pub fn deepest_lag(&self) -> u64 {
        lock(&self.state).deepest_lag
    }

    /// Whether a reader is attached and how far behind the slowest one is,
    /// in one lock. The producer asks before every append, so this is also
    /// where the lag is noted for [`Self::deepest_lag`] (reading the
    /// readers' positions once per event, not twice).
    pub fn flow(&self) -> Flow {
        let mut state = lock(&self.state);
        if state.detached_since.is_some() {
            return Flow { detached: true, lag: 0 };
        }
        let lag = state.lag();
        state.deepest_lag = state.deepest_lag.max(lag);
        Flow { detached: false, lag }
    }

    /// How far ahead the producer is of its slowest attached reader.
    pub fn lag(&self) -> u64 {
        lock(&self.state).lag()
    }

    /// Since when nobody reads here, and any hold by a remote reader.
    pub fn attachment(&self) -> Attachment {
        let state = lock(&self.state);
        Attachment { detached_since: state.detached_since, remote_until: state.remote_until }
    }

    /// Resolves at the next change of readers (attach, detach, or an
    /// advance while [`Self::set_producer_waiting`] is up). Enable it
    /// before looking at the facts, so a change in between is not missed.
    pub fn progress(&self) -> Notified<'_> {
        self.progress.notified()
    }

    /// Whether readers' advances should wake the producer: only while it
    /// waits on a full window. Raise it, then look at the lag again.
    pub fn set_producer_waiting(&self, waiting: bool) {
        self.producer_waiting.store(waiting, Ordering::SeqCst);
    }

    /// The next sequence number to be appended.
    pub fn next_seq(&self) -> u64 {
        lock(&self.state).next_seq()
    }

    /// Cancels the stream (`DELETE`): the producer ends it with
    /// `error: cancelled`.
    pub fn cancel(&self) {
        self.deleted.store(true, Ordering::SeqCst);
        self.cancel.cancel();
    }

    /// Whether [`Self::cancel`] was called (tells a `DELETE` apart from the
    /// other reasons the stop token fires).
    pub fn deleted(&self) -> bool {
        self.deleted.load(Ordering::SeqCst)
    }

    /// Fires when the producer must stop: cancelled, shutting down or
    /// replication failed (the producer tells which apart).
    pub fn stopped(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Adds events from `from` on (at most `max`) to `out`.
    fn read_from(&self, from: u64, max: usize, out: &mut VecDeque<Arc<StreamEvent>>) -> Read {
        let state = lock(&self.state);
        let first_kept = state.events.first_seq();
        if from < first_kept {
            return Read::Gap { first_kept };
        }
        let before = out.len();
        state.events.read(from, max, out);
        if out.len() > before { Read::Events } else { Read::CaughtUp }
    }

    /// Resolves once there is something for a reader at `from` (an event,
    /// or a gap to report). Level-triggered: the waker is registered before
    /// the log is looked at, so an append in between is never missed.
    fn readable(&self, slot: &ReaderSlot, from: u64) -> impl std::future::Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            slot.waker.register(cx.waker());
            let state = lock(&self.state);
            if from < state.next_seq() || from < state.events.first_seq() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    /// Whether the terminal event is logged.
    pub fn is_finished(&self) -> bool {
        lock(&self.state).finished_at.is_some()
    }

    /// Whether the stream is finished and a reader that has seen everything
    /// before `from` has nothing left to read.
    pub fn is_complete_at(&self, from: u64) -> bool {
        let state = lock(&self.state);
        state.finished_at.is_some() && from >= state.next_seq()
    }

    /// Attaches a reader that needs events from `from` on. Attach before the
    /// producer starts, so a new stream never looks abandoned.
    pub fn attach(self: &Arc<Self>, from: u64) -> Reader {
        let slot = Arc::new(ReaderSlot { position: AtomicU64::new(from), waker: AtomicWaker::new() });
        {
            let mut state = lock(&self.state);
            state.readers.push(slot.clone());
            state.detached_since = None;
        }
        self.progress.notify_waiters();
        Reader { stream: self.clone(), slot, from }
    }

    /// A reader on another replica follows this stream: keep generating
    /// until `until` even with no local reader.
    pub fn hold_for_remote(&self, until: Instant) {
        lock(&self.state).remote_until = Some(until);
        self.progress.notify_waiters();
    }
}

/// An attached reader of a local log; dropping it detaches (which may start
/// the detach grace).
#[derive(Debug)]
pub struct Reader {
    stream: Arc<LiveStream>,
    slot: Arc<ReaderSlot>,
    from: u64,
}

impl Reader {
    /// The stream read.
    pub fn stream_id(&self) -> StreamId {
        self.stream.id
    }

    /// Where the reader started.
    pub fn from(&self) -> u64 {
        self.from
    }

    /// Adds events from `from` on (at most `max`) to `out`; never waits.
    pub fn read(&self, from: u64, max: usize, out: &mut VecDeque<Arc<StreamEvent>>) -> Read {
        self.stream.read_from(from, max, out)
    }

    /// Resolves when there may be something to read at `from`.
    pub fn changed(&self, from: u64) -> impl std::future::Future<Output = ()> + '_ {
        self.stream.readable(&self.slot, from)
    }

    /// Drops the waker registered by [`Self::changed`].
    pub fn unwatch(&self) {
        drop(self.slot.waker.take());
    }

    /// The reader's client took everything before `next`.
    pub fn advance(&self, next: u64) {
        // SeqCst pairs with the producer's flag-then-recheck: one of the two
        // sides always sees the other's store, so no wake-up is lost.
        self.slot.position.store(next, Ordering::SeqCst);
        if self.stream.producer_waiting.load(Ordering::SeqCst) {
            self.stream.progress.notify_waiters();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.stream.state);
            state.readers.retain(|r| !Arc::ptr_eq(r, &self.slot));
            if state.readers.is_empty() {
                state.detached_since = Some(Instant::now());
            }
        }
        self.stream.progress.notify_waiters();
    }
}
