//! In-memory stream logs: the [`StreamHub`] of streams produced by this
//! process, each a bounded, expiring [`LiveStream`] log that readers follow.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::Stream;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::stream::{OnlyWhenWoken, StreamEvent, StreamId};

/// Retention and flow-control settings of stream logs.
#[derive(Debug, Clone, Copy)]
pub struct HubSettings {
    /// Events kept per stream; older ones are dropped (resuming before them
    /// is a `resume_gap`).
    pub max_events: usize,
    /// How long a finished stream stays resumable.
    pub ttl: Duration,
}

/// The streams produced by this process, by id.
#[derive(Debug)]
pub struct StreamHub {
    streams: Mutex<HashMap<StreamId, Arc<LiveStream>>>,
    settings: HubSettings,
}

#[derive(Debug)]
struct LogState {
    events: VecDeque<Arc<StreamEvent>>,
    /// Sequence number of `events[0]`.
    first_seq: u64,
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
        self.first_seq + self.events.len() as u64
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

/// One stream's log, owner and controls.
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
    producer_waiting: std::sync::atomic::AtomicBool,
    /// Fires on `DELETE /v1/streams/{id}`, on server shutdown (a child of
    /// the closing token) and when replication fails: everything that
    /// stops the producer, in one token it can poll cheaply per event.
    cancel: CancellationToken,
    /// Set by [`LiveStream::cancel`].
    deleted: std::sync::atomic::AtomicBool,
}

/// Why a reader could not attach at the requested position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Attached; events will follow.
    Attached,
    /// The stream is finished and the reader has seen its last event.
    Complete,
}

/// What the producer should do next (see [`LiveStream::wait_for_room`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Room in every attached reader's window: produce.
    Go,
    /// The slowest reader left its window full longer than allowed.
    SlowConsumer,
    /// No reader came back within the detach grace.
    Abandoned,
}

fn lock(m: &Mutex<LogState>) -> MutexGuard<'_, LogState> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StreamHub {
    /// An empty hub.
    pub fn new(settings: HubSettings) -> Arc<Self> {
        Arc::new(Self { streams: Mutex::new(HashMap::new()), settings })
    }

    /// Registers a new stream. Its stop token ([`LiveStream::cancelled`])
    /// is a child of `closing`, so the producer waits on one token for
    /// cancel, shutdown and store failure alike.
    pub fn create(&self, id: StreamId, owner: &str, generator: &str, closing: &CancellationToken) -> Arc<LiveStream> {
        let stream = Arc::new(LiveStream {
            id,
            owner: owner.to_owned(),
            generator: generator.to_owned(),
            max_events: self.settings.max_events.max(1),
            state: Mutex::new(LogState {
                events: VecDeque::new(),
                first_seq: 0,
                finished_at: None,
                readers: Vec::new(),
                detached_since: Some(Instant::now()),
                remote_until: None,
                deepest_lag: 0,
            }),
            progress: Notify::new(),
            producer_waiting: std::sync::atomic::AtomicBool::new(false),
            cancel: closing.child_token(),
            deleted: std::sync::atomic::AtomicBool::new(false),
        });
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).insert(id, stream.clone());
        stream
    }

    /// A stream produced here, if it is still retained.
    pub fn get(&self, id: &StreamId) -> Option<Arc<LiveStream>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned()
    }

    /// Streams retained (running or finished within the TTL).
    pub fn len(&self) -> usize {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// True when no stream is retained.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets finished streams older than the TTL.
    pub fn sweep(&self) {
        let ttl = self.settings.ttl;
        let now = Instant::now();
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, s| lock(&s.state).finished_at.is_none_or(|at| now.duration_since(at) < ttl));
    }
}

impl LiveStream {
    /// Appends the next event (the producer only) and wakes the readers.
    /// Past `max_events` the oldest is dropped.
    pub fn append(&self, event: StreamEvent) -> Arc<StreamEvent> {
        let event = self.append_quietly(event);
        self.wake_readers();
        event
    }

    /// Appends without waking the readers: the producer appends a batch of
    /// events that were ready together, then wakes them once
    /// ([`Self::wake_readers`]), so they read the batch in one go.
    pub fn append_quietly(&self, event: StreamEvent) -> Arc<StreamEvent> {
        let terminal = event.is_terminal();
        let event = Arc::new(event);
        let mut state = lock(&self.state);
        state.events.push_back(event.clone());
        if state.events.len() > self.max_events {
            state.events.pop_front();
            state.first_seq += 1;
        }
        if terminal {
            state.finished_at = Some(Instant::now());
        }
        event
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

    /// Whether the producer may append now without waiting: a reader is
    /// attached and every attached reader is fewer than `window` events
    /// behind. One lock; the common case of [`Self::wait_for_room`]. The
    /// producer asks before every append, so this is also where the lag is
    /// noted for [`Self::deepest_lag`] (reading the readers' positions once
    /// per event, not twice).
    pub fn has_room(&self, window: usize) -> bool {
        let mut state = lock(&self.state);
        if state.detached_since.is_some() {
            return false;
        }
        let lag = state.lag();
        state.deepest_lag = state.deepest_lag.max(lag);
        lag < window as u64
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
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Adds events from `from` on (at most `max`) to `out`, or gives
    /// `Err(first_kept)` when `from` was already dropped from the log.
    fn read_from(&self, from: u64, max: usize, out: &mut VecDeque<Arc<StreamEvent>>) -> Result<(), u64> {
        let state = lock(&self.state);
        if from < state.first_seq {
            return Err(state.first_seq);
        }
        let skip = (from - state.first_seq) as usize;
        out.extend(state.events.range(skip.min(state.events.len())..).take(max).cloned());
        Ok(())
    }

    /// Resolves once there is something for a reader at `from` (an event,
    /// or a gap to report). Level-triggered: the waker is registered before
    /// the log is looked at, so an append in between is never missed.
    fn readable(&self, slot: &ReaderSlot, from: u64) -> impl std::future::Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            slot.waker.register(cx.waker());
            let state = lock(&self.state);
            if from < state.next_seq() || from < state.first_seq {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    /// Checks whether a reader that has seen everything before `from` has
    /// anything left to read.
    pub fn attach_check(&self, from: u64) -> Attach {
        let state = lock(&self.state);
        let next = state.first_seq + state.events.len() as u64;
        if state.finished_at.is_some() && from >= next { Attach::Complete } else { Attach::Attached }
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

    /// When generation may be abandoned if nobody attaches: the detach grace
    /// after the last local reader left, and not before a remote reader's
    /// hold ends. `None` while a local reader is attached.
    fn abandon_at(&self, grace: Duration) -> Option<Instant> {
        let state = lock(&self.state);
        let since = state.detached_since?;
        Some(state.remote_until.map_or(since + grace, |until| (since + grace).max(until)))
    }

    /// How far ahead the producer is of its slowest attached reader.
    fn lag(&self) -> u64 {
        lock(&self.state).lag()
    }

    /// Waits until the producer may append another event: every attached
    /// reader is fewer than `window` events behind. Gives up with
    /// [`Wait::SlowConsumer`] after `max_lag` of a full window, and with
    /// [`Wait::Abandoned`] when no reader has been attached for `grace`.
    pub async fn wait_for_room(&self, window: usize, max_lag: Duration, grace: Duration) -> Wait {
        let mut full_since: Option<Instant> = None;
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                match self.abandon_at(grace) {
                    Some(at) if Instant::now() >= at => return Wait::Abandoned,
                    // Nobody reading here: generation continues into the log
                    // (bounded by max_events) for the grace period.
                    Some(_) => return Wait::Go,
                    None => {}
                }
                if self.lag() < window as u64 {
                    return Wait::Go;
                }
                let since = *full_since.get_or_insert_with(Instant::now);
                if Instant::now() >= since + max_lag {
                    return Wait::SlowConsumer;
                }
                since + max_lag
            };
            // Readers wake us only while this flag is up; it is raised
            // before the window is checked again, so no advance is missed.
            self.producer_waiting.store(true, Ordering::SeqCst);
            let room = self.lag() < window as u64;
            if !room {
                tokio::select! {
                    () = &mut notified => {}
                    () = sleep_until(deadline) => {}
                }
            }
            self.producer_waiting.store(false, Ordering::SeqCst);
        }
    }

    /// Resolves when no reader has been attached for `grace` (the producer
    /// races this against the generator, which may be slow or silent).
    pub async fn abandoned(&self, grace: Duration) {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.abandon_at(grace) {
                Some(at) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = sleep_until(at) => {
                            if self.abandon_at(grace).is_some_and(|at| Instant::now() >= at) {
                                return;
                            }
                        }
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// An attached reader; dropping it detaches (which may start the detach
/// grace).
#[derive(Debug)]
pub struct Reader {
    stream: Arc<LiveStream>,
    slot: Arc<ReaderSlot>,
    from: u64,
}

impl Reader {
    fn advance(&self, next: u64) {
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

/// Most events handed on per log read.
const BATCH: usize = 256;

/// Follows a stream's log from sequence `from` on: replays what is logged,
/// then waits for more, until the terminal event. Adds heartbeats while
/// quiet and ends with `shutdown` when `closing` fires. A `from` already
/// dropped from the log gives a terminal `error` with code `resume_gap`:
/// never a silent skip.
///
/// Shutdown is watched with [`OnlyWhenWoken`]: looked at per event only as
/// an atomic flag, not a lock.
pub fn follow(
    reader: Reader,
    heartbeat: Duration,
    closing: CancellationToken,
    shutdown_retry_ms: u64,
) -> impl Stream<Item = Arc<StreamEvent>> + Send + 'static {
    async_stream::stream! {
        let stream = reader.stream.clone();
        // A child token of our own: `is_cancelled` locks the token's mutex,
        // and the shared shutdown token would be one lock contended by every
        // reader.
        let closing = closing.child_token();
        let mut closing_watch = OnlyWhenWoken::new(closing.clone().cancelled_owned());
        let mut next = reader.from;
        // Reused for every read: no allocation per event.
        let mut batch = VecDeque::with_capacity(16);
        // One heartbeat timer, moved only when it fires: silence is
        // measured from the last write, without a timer per event.
        let mut last_write = Instant::now();
        let heartbeat_timer = sleep_until(last_write + heartbeat);
        tokio::pin!(heartbeat_timer);
        'wake: loop {
            if closing_watch.may_be_ready() && closing.is_cancelled() {
                yield Arc::new(StreamEvent::Shutdown { retry_ms: shutdown_retry_ms });
                return;
            }
            // Everything there is, batch after batch.
            loop {
                if let Err(first_kept) = stream.read_from(next, BATCH, &mut batch) {
                    yield Arc::new(StreamEvent::Error {
                        stream_id: stream.id,
                        seq: next,
                        code: "resume_gap".into(),
                        message: format!("events from {next} on are no longer retained (oldest kept: {first_kept}); start a new stream"),
                    });
                    return;
                }
                if batch.is_empty() {
                    break;
                }
                while let Some(event) = batch.pop_front() {
                    let terminal = event.is_terminal();
                    next = event.seq().map_or(next, |s| s + 1);
                    yield event;
                    // Reached only once the consumer asked for more: the
                    // event was taken.
                    reader.advance(next);
                    if terminal {
                        return;
                    }
                }
                last_write = Instant::now();
                if closing_watch.may_be_ready() && closing.is_cancelled() {
                    continue 'wake;
                }
            }
            tokio::select! {
                biased;
                () = &mut closing_watch => {
                    yield Arc::new(StreamEvent::Shutdown { retry_ms: shutdown_retry_ms });
                    return;
                }
                () = stream.readable(&reader.slot, next) => {}
                () = &mut heartbeat_timer => {
                    let due = last_write + heartbeat;
                    if Instant::now() >= due {
                        yield Arc::new(StreamEvent::Heartbeat);
                        last_write = Instant::now();
                    }
                    heartbeat_timer.as_mut().reset(last_write + heartbeat);
                }
            }
        }
    }
}
