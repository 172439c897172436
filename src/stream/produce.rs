//! The producer: runs a stream's engine in its own task and appends every
//! event to the stream's log through its [`StreamWriter`], decoupled from
//! any HTTP connection. Flow control and the detach policy are in
//! [`super::flow`]; this file is the loop that applies them and how a
//! stream's end is accounted:
//!
//! - Cancel (`DELETE`) ends it with `error: cancelled`; server shutdown with
//!   `error: generator_lost`, which a resume on another replica delivers;
//!   a failing shared store with `store_unavailable`.
//! - The slot permit lives in the task: freed exactly when the stream ends,
//!   after the generator is dropped and the log is flushed to the store.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use tokio::time::Instant;

use super::OnlyWhenWoken;
use super::drive::{DriveHook, Inline};
use super::flow::{Wait, abandoned, has_room, wait_for_room};
use crate::event::{ErrorCode, Outcome, StreamEvent};
use crate::limits::{SlotPermit, StreamSlots};
use crate::metrics::Metrics;
use crate::quota::Meter;
use crate::store::{LiveStream, StreamWriter};

/// Flow-control bounds for one stream.
#[derive(Debug, Clone, Copy)]
pub(super) struct RunSettings {
    /// Events the producer may be ahead of its slowest reader.
    /// Counted in events not yet taken by a local reader's consumer (the configured send
    /// queue); readers on other replicas do not hold it back.
    pub window: usize,
    /// Longest the producer waits on a full window.
    /// One continuous wait: the clock starts again whenever room appears. Past it the stream
    /// ends with `slow_consumer`, so one stuck client cannot hold a generator (and a slot)
    /// open without bound.
    pub max_lag: Duration,
    /// How long generation continues with no reader attached.
    /// Zero for dialects whose clients cannot resume: the stream is abandoned as soon as its
    /// reader goes, unless a reader on another replica holds it.
    pub detach_grace: Duration,
    /// Take every event the engine has ready at once into one batch. Worth
    /// it for unpaced streams (a fast generator, an upstream read carrying
    /// many frames); a paced engine never has two ready, so it would only
    /// cost a poll.
    pub batch_ready: bool,
}

/// Most events appended per batch before readers are woken: with an engine that always has
/// an event ready, this bounds how long readers wait for the batch's wake-up.
const MAX_BATCH: usize = 256;

/// Accounting for one stream.
///
/// Moved into the producer task: the slot permit in it is freed by that task, only after the
/// generator is dropped and the log flushed.
pub(super) struct RunContext {
    /// The token subject.
    pub subject: String,
    /// The slot, freed when the task ends.
    pub permit: SlotPermit,
    /// The slot table (for the open-streams gauge).
    pub slots: Arc<StreamSlots>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The subject's usage budget, when one applies: every delta is taken
    /// from it before it is logged.
    /// Boxed: most deployments run without quotas, and inline the meter
    /// would size every producer's future for it (twice: here, and where
    /// the producer takes it out).
    pub meter: Option<Box<Meter>>,
}

/// Why the producer stopped before the engine's own end.
enum Stop {
    /// Replication to the shared store failed. Told first: a failure also fires the stop
    /// token that a cancel and a shutdown fire.
    StoreFailed,
    /// `DELETE` of the stream, on whichever replica it arrived.
    Cancelled,
    /// Server shutdown: the stop token fired for neither reason above.
    Closing,
    /// The slowest reader left the window full for `max_lag`.
    SlowConsumer,
    /// No reader was attached for the detach grace, and (with a shared store) a last look found
    /// none on another replica either.
    Abandoned,
    /// The subject's usage budget ran out (found by this stream or by another of the subject's
    /// streams on this replica).
    QuotaExceeded,
}

impl Stop {
    /// The terminal event's code and message.
    fn error(self, settings: &RunSettings) -> (ErrorCode, String) {
        match self {
            Stop::StoreFailed => {
                (ErrorCode::StoreUnavailable, "the shared store failed; the stream cannot continue".to_owned())
            }
            Stop::Cancelled => (ErrorCode::Cancelled, "the stream was cancelled".to_owned()),
            Stop::Closing => (ErrorCode::GeneratorLost, "the server generating this stream shut down".to_owned()),
            Stop::SlowConsumer => (
                ErrorCode::SlowConsumer,
                format!("the client did not read for {}", humantime::format_duration(settings.max_lag)),
            ),
            Stop::Abandoned => {
                (ErrorCode::ClientGone, "no client was connected for the detach grace period".to_owned())
            }
            Stop::QuotaExceeded => (
                ErrorCode::QuotaExceeded,
                "the usage quota of this subject is used up; GET /v1/usage says when it resets".to_owned(),
            ),
        }
    }
}

/// Starts the producer of a stream. Attach the first reader before calling
/// ([`crate::store::Store::create`] does).
///
/// With a `hook` from the reader's connection the producer runs inline
/// there (see [`super::drive`]), and the returned [`Inline`] goes to that
/// reader; otherwise it is spawned. Either way nothing joins it, and it
/// ends by itself (the engine's end or a `Stop`). The open-streams gauge is
/// set here because the caller has just taken the slot; the producer sets
/// it again once it frees it.
pub(super) fn start(
    engine: impl Stream<Item = StreamEvent> + Send + 'static,
    writer: StreamWriter,
    ctx: RunContext,
    settings: RunSettings,
    hook: Option<&DriveHook>,
) -> Option<Inline> {
    ctx.metrics.set_open_streams(ctx.slots.open());
    // The end-of-stream line is logged in the request's span (it carries
    // the request id); entering the span on every poll would cost on the
    // hot path, so it is entered once, at the end.
    let span = tracing::Span::current();
    // Boxed (not stack-pinned) so that it can be dropped before the slot is
    // freed, and boxed here, not in the future: an async fn keeps its
    // arguments in its future for its whole life, so an engine moved in by
    // value and boxed there would take its room twice.
    let metrics = ctx.metrics.clone();
    let producer = produce(Box::pin(engine), writer, ctx, settings, span);
    let inline = match hook {
        Some(hook) => match hook.adopt(Box::pin(producer), metrics.clone()) {
            Ok(inline) => Some(inline),
            Err(producer) => {
                tokio::spawn(producer);
                None
            }
        },
        None => {
            // Spawned unboxed: the task holds the future itself.
            tokio::spawn(producer);
            None
        }
    };
    metrics.producer_started(inline.is_some());
    inline
}

/// The producer task: produce until the engine ends or something stops
/// the stream, append the terminal event, then account for the stream.
///
/// A stop appends an `error` numbered right after the last logged event, so a resuming
/// client sees no hole before it. The end runs in a fixed order: drop the generator, flush the
/// log to the shared store, free the slot, then metrics and the log line. If the engine ends
/// without a terminal event (not its contract), none is logged and the outcome counts as
/// `internal`.
async fn produce(
    mut engine: std::pin::Pin<Box<impl Stream<Item = StreamEvent> + Send + 'static>>,
    writer: StreamWriter,
    mut ctx: RunContext,
    settings: RunSettings,
    span: tracing::Span,
) {
    let started = Instant::now();
    let mut outcome = Outcome::Error(ErrorCode::Internal);
    let mut meter = ctx.meter.take();
    if let Some(stop) = run(&mut engine, &writer, &ctx, &settings, started, &mut outcome, &mut meter).await {
        let (code, message) = stop.error(&settings);
        outcome = Outcome::Error(code);
        let log = writer.log();
        // The end's waits are boxed, like the loop's rare ones: inline they
        // would size every producer's future, idle ones included.
        let ended =
            writer.append_terminal(StreamEvent::Error { stream_id: log.id, seq: log.next_seq(), code, message });
        outcome = Box::pin(ended).await.unwrap_or(outcome);
    }
    // Generator first, then the slot: nothing runs on a freed slot.
    drop(engine);
    let (id, generator, chars, deepest_lag) = {
        let log = writer.log();
        (log.id, log.generator.clone(), log.next_seq().saturating_sub(2), log.deepest_lag())
    };
    // Everything, the terminal event included, reaches the shared store (and
    // the lease is released) before the stream counts as ended: readers on
    // other replicas see `cancelled` or `generator_lost` at once, and
    // shutdown waits for it.
    Box::pin(writer.finish()).await;
    // What was reserved and not delivered goes back before the slot is
    // freed, so the subject's next stream sees it.
    if let Some(meter) = meter
        && let Err(e) = Box::pin(meter.finish(chars)).await
    {
        tracing::warn!(stream_id = %id, error = %e, "could not give back an unused quota reservation");
    }
    drop(ctx.permit);
    let metrics = &ctx.metrics;
    metrics.set_open_streams(ctx.slots.open());
    metrics.observe_queue_depth(deepest_lag as usize);
    metrics.stream_ended(outcome);
    metrics.stream_duration(started.elapsed());
    let _entered = span.enter();
    tracing::info!(
        stream_id = %id,
        subject = %ctx.subject,
        generator = %generator,
        outcome = %outcome,
        chars,
        duration_ms = started.elapsed().as_millis() as u64,
        "stream ended"
    );
}

/// Produces until the engine ends (its terminal event is then in the log
/// and in `outcome`) or a reason to stop comes first, which is returned.
///
/// Both selects are biased towards the stop future, so a cancel or shutdown is honoured even
/// when the engine always has an event ready; a stop noticed mid-batch ends the batch.
///
/// Over 80 lines because it is one select loop on the per-character hot
/// path: its state (the batch, the deferred wake, the watches made once)
/// lives across iterations, and splitting it would mean rebuilding the
/// watches or passing all of it around per event.
async fn run(
    engine: &mut std::pin::Pin<Box<impl Stream<Item = StreamEvent> + Send + 'static>>,
    writer: &StreamWriter,
    ctx: &RunContext,
    settings: &RunSettings,
    started: Instant,
    outcome: &mut Outcome,
    meter: &mut Option<Box<Meter>>,
) -> Option<Stop> {
    let stream: &LiveStream = writer.log();
    let mut first_delta_seen = false;
    // The reasons to stop other than the engine's own end, as one future
    // made once: building fresh `cancelled()` futures for every event would
    // lock and register on several tokens per character. Both watches are
    // polled only when their own wakers fire (see `OnlyWhenWoken`), not on
    // every event.
    // Boxed: without a quota (the common case) it takes no room in the
    // stop watch that every stream holds.
    let exhausted = meter.as_deref().map(|meter| Box::pin(meter.exhausted()));
    let mut stopping = OnlyWhenWoken::new(async {
        // One token covers cancel, shutdown and store failure (see
        // `LiveStream::stopped`); the quota's is the subject's.
        let stopped = stream.stopped().cancelled();
        match exhausted {
            None => stopped.await,
            Some(exhausted) => tokio::select! {
                biased;
                () = stopped => {}
                () = exhausted => return Stop::QuotaExceeded,
            },
        }
        if writer.store_failed() {
            Stop::StoreFailed
        } else if stream.deleted() {
            Stop::Cancelled
        } else {
            Stop::Closing
        }
    });
    let mut abandon_watch = OnlyWhenWoken::new(abandoned(stream, settings.detach_grace));
    // Readers are woken once per batch, not per event. For unpaced streams
    // "a batch" is everything that arrives before the runtime gets round to
    // other work: the wake is deferred with `yield_now` (which fires after
    // the scheduler has run the other ready tasks and polled I/O), so an
    // upstream that hands over one frame per task hop still reaches the
    // client in a few writes, not one per character, and nothing waits for
    // an event that is not already on its way.
    let mut unannounced = false;
    let mut announce = std::pin::pin!(futures_util::future::Fuse::terminated());
    // The waits that are not on the per-event path (a full window, the
    // terminal event's replication, a reader elsewhere, Redis catching up)
    // are boxed where they are awaited: inline, each would size every
    // producer's future, idle ones included, for itself (2,240 -> 1,840
    // bytes in a debug build).
    let stop = 'produce: loop {
        let room = has_room(stream, settings.window);
        if unannounced && !room {
            // Readers must see what is there before we wait for them.
            stream.wake_readers();
            unannounced = false;
        }
        // The common case, room in the window, costs one lock and no
        // polling of the stop future (the event select below polls it).
        let wait = if room {
            Wait::Go
        } else {
            tokio::select! {
                biased;
                stop = &mut stopping => break Some(stop),
                wait = Box::pin(wait_for_room(stream, settings.window, settings.max_lag, settings.detach_grace)) => wait,
            }
        };
        match wait {
            Wait::Go => {}
            Wait::SlowConsumer => break Some(Stop::SlowConsumer),
            Wait::Abandoned if !Box::pin(writer.reader_elsewhere()).await => break Some(Stop::Abandoned),
            Wait::Abandoned => continue,
        }
        // The engine before the abandon watch: that watch only matters
        // while the engine is quiet, and is polled (registered) then.
        let event = tokio::select! {
            biased;
            stop = &mut stopping => break Some(stop),
            event = engine.next() => event,
            () = &mut abandon_watch => {
                if Box::pin(writer.reader_elsewhere()).await {
                    // Held for a reader elsewhere: watch afresh.
                    abandon_watch = OnlyWhenWoken::new(abandoned(stream, settings.detach_grace));
                    continue;
                }
                break Some(Stop::Abandoned);
            }
            () = &mut announce, if unannounced => {
                stream.wake_readers();
                unannounced = false;
                continue;
            }
        };
        let Some(event) = event else { break None };
        // This event and every one the engine has ready right now (up to
        // the window) are appended without waking anyone in between.
        let mut next = Some(event);
        let mut batch = 0;
        let mut ended = false;
        let mut behind = false;
        while let Some(event) = next.take() {
            // Without a budget nothing is built or awaited per event.
            if meter.is_some()
                && let Some(stop) = charge(meter, &event).await
            {
                break 'produce Some(stop);
            }
            if !first_delta_seen && matches!(event, StreamEvent::Delta { .. }) {
                first_delta_seen = true;
                ctx.metrics.first_delta(started.elapsed());
            }
            if let Some(finished) = event.outcome() {
                // What this batch appended is announced with it (and the
                // end may be `store_unavailable` if Redis did not take it).
                *outcome = Box::pin(writer.append_terminal(event)).await.unwrap_or(finished);
                ended = true;
                break;
            }
            behind = writer.append_quietly(event);
            batch += 1;
            // A stop request (one atomic load) ends the batch too, and so
            // does a shared store that has fallen behind.
            if settings.batch_ready
                && !behind
                && batch < MAX_BATCH
                && !stopping.may_be_ready()
                && has_room(stream, settings.window)
            {
                match engine.next().now_or_never() {
                    Some(Some(event)) => next = Some(event),
                    Some(None) => ended = true,
                    None => {}
                }
            }
        }
        if ended {
            break None;
        }
        if behind {
            // Redis is half a queue behind: readers here get what there is,
            // and the stream waits for Redis (bounded) rather than outrun it.
            stream.wake_readers();
            unannounced = false;
            tokio::select! {
                biased;
                stop = &mut stopping => break Some(stop),
                () = Box::pin(writer.replicated()) => {}
            }
            continue;
        }
        if !settings.batch_ready {
            stream.wake_readers();
        } else if !unannounced {
            unannounced = true;
            announce.set(tokio::task::yield_now().fuse());
        }
    };
    // Whatever was appended last is announced, however the loop ended.
    stream.wake_readers();
    stop
}

/// Takes what `event` costs from the subject's budget: a delta one
/// character (from the local allowance; the store only when it is empty),
/// a finish its reported model tokens. A delta the budget cannot pay for
/// stops the stream before it is logged.
async fn charge(meter: &mut Option<Box<Meter>>, event: &StreamEvent) -> Option<Stop> {
    let meter = meter.as_mut()?;
    match event {
        // The store's futures are boxed: inline they would size every
        // producer for them, and they run once per allowance.
        StreamEvent::Delta { .. } if !meter.try_take() => match Box::pin(meter.refill()).await {
            Ok(true) => {
                let taken = meter.try_take();
                debug_assert!(taken, "a refill grants at least one character");
                None
            }
            Ok(false) => Some(Stop::QuotaExceeded),
            Err(e) => {
                tracing::warn!(error = %e, "quota reservation failed");
                Some(Stop::StoreFailed)
            }
        },
        StreamEvent::Done { usage: Some(usage), .. } => {
            if let Err(e) = Box::pin(meter.charge_tokens(usage.total_tokens)).await {
                tracing::warn!(error = %e, "could not charge reported tokens to the quota");
            }
            None
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::task::Poll;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::dialect::{native::Native, sse_body};
    use crate::event::StreamId;
    use crate::generator::TextStream;
    use crate::limits::StreamSlots;
    use crate::sse::{Event, Parser};
    use crate::store::{Cursor, Store, StoreSettings};
    use crate::stream::reader::{FollowSettings, follow};
    use crate::stream::{EngineSettings, events};

    /// Hands over one character per task hop, as an HTTP/1 upstream body
    /// does (its connection task passes one frame per wake-up).
    fn one_per_hop(text: &str) -> TextStream {
        let chars: Vec<String> = text.chars().map(String::from).collect();
        Box::pin(async_stream::stream! {
            for c in chars {
                let mut hopped = false;
                poll_fn(|cx| {
                    if hopped {
                        return Poll::Ready(());
                    }
                    hopped = true;
                    cx.waker().wake_by_ref();
                    Poll::Pending
                })
                .await;
                yield Ok(c.into());
            }
        })
    }

    /// A stream in a memory store with one reader attached, and the
    /// accounting for it.
    async fn setup() -> (StreamId, StreamWriter, Cursor, RunContext) {
        let store = Store::memory(StoreSettings {
            stream_max_events: 10_000,
            replication_window: Duration::from_millis(50),
            stream_ttl: Duration::from_secs(60),
            channel_max_events: 10,
            channel_ttl: Duration::from_secs(60),
        });
        let id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!());
        let (writer, cursor) =
            store.create(id, "s", "t", &CancellationToken::new()).await.unwrap_or_else(|_| unreachable!());
        let slots = StreamSlots::new(10, 10);
        let permit = slots.try_acquire("s").unwrap_or_else(|_| unreachable!());
        let ctx = RunContext { subject: "s".into(), permit, slots, metrics: Arc::new(Metrics::new()), meter: None };
        (id, writer, cursor, ctx)
    }

    /// Runs one stream and returns (body chunks written, text received).
    async fn run(text: &str, batch_ready: bool) -> (usize, String) {
        let (id, writer, cursor, ctx) = setup().await;
        let metrics = ctx.metrics.clone();
        let engine = events(
            id,
            "t".into(),
            one_per_hop(text),
            EngineSettings { pace: Duration::ZERO, max_duration: Duration::from_secs(60) },
        );
        let settings =
            RunSettings { window: 256, max_lag: Duration::from_secs(30), detach_grace: Duration::ZERO, batch_ready };
        start(engine, writer, ctx, settings, None);
        let follow_settings = FollowSettings {
            heartbeat: Duration::from_secs(60),
            closing: CancellationToken::new(),
            shutdown_retry_ms: 1000,
            token_deadline: None,
        };
        let events = Box::pin(follow(cursor, follow_settings));
        let mut body = Box::pin(sse_body(events, Native { retry_ms: 1000 }, metrics));
        // A task of its own, like a connection (the test's own future is
        // polled on a different schedule).
        let client = tokio::spawn(async move {
            let (mut writes, mut received, mut parser) = (0, String::new(), Parser::new());
            while let Some(Ok(chunk)) = body.next().await {
                writes += 1;
                for event in parser.feed(&chunk) {
                    if let Event::Message { event, data, .. } = event
                        && event == "delta"
                    {
                        let delta: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                        received.push_str(delta["text"].as_str().unwrap_or_default());
                    }
                }
            }
            (writes, received)
        });
        client.await.unwrap_or_default()
    }

    /// Every open stream holds its producer's future (inline, or in its
    /// task), so its size is memory per idle stream. The bound catches a
    /// change that inlines the meter or a large wait again.
    #[tokio::test]
    async fn a_producers_state_stays_small() {
        let (id, writer, _cursor, ctx) = setup().await;
        let engine = futures_util::stream::iter([StreamEvent::Start { stream_id: id, generator: "t".into() }]);
        let settings = RunSettings {
            window: 8,
            max_lag: Duration::from_secs(1),
            detach_grace: Duration::ZERO,
            batch_ready: false,
        };
        let producer = produce(Box::pin(engine), writer, ctx, settings, tracing::Span::none());
        // 1,296 bytes in a debug build (1,840 with the meter inline).
        let size = std::mem::size_of_val(&producer);
        assert!(size <= 1400, "a producer's future is {size} bytes");
    }

    // Multi-threaded: a spinning producer must not take the test's own
    // thread with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_engine_that_ends_without_a_terminal_event_frees_its_slot() {
        let (id, writer, _cursor, ctx) = setup().await;
        let slots = ctx.slots.clone();
        let settings = RunSettings {
            window: 8,
            max_lag: Duration::from_secs(30),
            detach_grace: Duration::from_secs(30),
            // The end then arrives through the select, not a batch drain.
            batch_ready: false,
        };
        // Start, then nothing: not the engine's contract, but the producer
        // must end (and free the slot), not spin.
        let engine = futures_util::stream::iter([StreamEvent::Start { stream_id: id, generator: "t".into() }]);
        start(engine, writer, ctx, settings, None);
        for _ in 0..200 {
            if slots.open() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the producer did not end");
    }

    #[tokio::test]
    async fn events_arriving_one_per_hop_reach_the_client_in_few_writes() {
        let text: String = "streams, 流れ, ストリーム; ".repeat(80);
        let chars = text.chars().count();
        let (writes, received) = run(&text, true).await;
        assert_eq!(received, text);
        // Everything that arrives while the runtime is busy goes out together
        // (the readers are woken once the runtime has run the other ready
        // tasks), not one write per character.
        assert!(writes * 4 <= chars, "{writes} writes for {chars} characters");
        // Control: waking readers on every event (what paced streams do)
        // writes each character on its own here.
        let (writes, received) = run(&text, false).await;
        assert_eq!(received, text);
        assert!(writes * 2 >= chars, "{writes} writes for {chars} characters without batching");
    }
}
