//! The producer: runs a stream's engine in its own task and appends every
//! event to the stream's log, decoupled from any HTTP connection.
//!
//! - Backpressure: the producer stays at most `window` events ahead of the
//!   slowest attached reader, so a client that stops reading stops the
//!   generator from being polled.
//! - Slow consumers: a window that stays full past `max_lag` ends the
//!   stream with `error: slow_consumer`; the generator is dropped and the
//!   slot freed at once, whether or not the client ever reads again.
//! - Detach: with no reader attached, generation continues into the log for
//!   `detach_grace` (so a reconnect can resume), then ends (`client_gone`).
//! - Cancel (`DELETE`) ends it with `error: cancelled`; server shutdown with
//!   `error: generator_lost`, which a resume on another replica delivers.
//! - The slot permit lives in the task: freed exactly when the stream ends.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{OnlyWhenWoken, StreamEvent};
use crate::limits::{SlotPermit, StreamSlots};
use crate::metrics::Metrics;
use crate::store::{LiveStream, Replicator, Wait};

/// Flow-control bounds for one stream.
#[derive(Debug, Clone, Copy)]
pub struct RunSettings {
    /// Events the producer may be ahead of its slowest reader.
    pub window: usize,
    /// Longest the producer waits on a full window.
    pub max_lag: Duration,
    /// How long generation continues with no reader attached.
    pub detach_grace: Duration,
    /// Take every event the engine has ready at once into one batch. Worth
    /// it for unpaced streams (a fast generator, an upstream read carrying
    /// many frames); a paced engine never has two ready, so it would only
    /// cost a poll.
    pub batch_ready: bool,
}

/// Most events appended per batch before readers are woken.
const MAX_BATCH: usize = 256;

/// Accounting for one stream.
pub struct RunContext {
    /// The token subject.
    pub subject: String,
    /// The slot, freed when the task ends.
    pub permit: SlotPermit,
    /// The slot table (for the open-streams gauge).
    pub slots: Arc<StreamSlots>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Fired when the server stops streams for shutdown.
    pub closing: CancellationToken,
    /// Copies the log to the shared store, when there is one.
    pub replicator: Option<Replicator>,
}

enum Stop {
    StoreFailed,
    Cancelled,
    Closing,
    SlowConsumer,
    Abandoned,
}

/// Before giving up on a stream nobody reads here, a last look for a reader
/// on another replica (its periodic announcement may not have arrived yet);
/// if there is one, the stream is held for it.
async fn reader_elsewhere(stream: &LiveStream, replicator: Option<&Replicator>) -> bool {
    let Some(replicator) = replicator else { return false };
    if let Ok(true) = replicator.store().remote_reader(&stream.id).await {
        stream.hold_for_remote(Instant::now() + crate::store::REMOTE_READER);
        return true;
    }
    false
}

/// Spawns the producer of `stream`. Attach the first reader before calling.
pub fn spawn(
    engine: impl Stream<Item = StreamEvent> + Send + 'static,
    stream: Arc<LiveStream>,
    ctx: RunContext,
    settings: RunSettings,
) {
    ctx.metrics.set_open_streams(ctx.slots.open());
    // The end-of-stream line is logged in the request's span (it carries
    // the request id); entering the span on every poll would cost on the
    // hot path, so it is entered once, at the end.
    let span = tracing::Span::current();
    tokio::spawn(produce(engine, stream, ctx, settings, span));
}

async fn produce(
    engine: impl Stream<Item = StreamEvent> + Send + 'static,
    stream: Arc<LiveStream>,
    mut ctx: RunContext,
    settings: RunSettings,
    span: tracing::Span,
) {
    let replicator = ctx.replicator.take();
    let store_failed = replicator.as_ref().map_or_else(CancellationToken::new, |r| r.failed.clone());
    let started = Instant::now();
    // Boxed (not stack-pinned) so it can be dropped before the slot is freed.
    let mut engine = Box::pin(engine);
    let mut first_delta_seen = false;
    let mut outcome: Cow<'static, str> = Cow::Borrowed("internal");
    // The reasons to stop other than the engine's own end, as one future
    // made once: building fresh `cancelled()` futures for every event would
    // lock and register on three tokens per character.
    let stop = {
        // Both watches are polled only when their own wakers fire (see
        // `OnlyWhenWoken`), not on every event.
        let mut stopping = OnlyWhenWoken::new(async {
            // One token covers all three (see `LiveStream::cancelled`).
            stream.cancelled().cancelled().await;
            if store_failed.is_cancelled() {
                Stop::StoreFailed
            } else if stream.deleted() {
                Stop::Cancelled
            } else {
                Stop::Closing
            }
        });
        let mut abandoned = OnlyWhenWoken::new(stream.abandoned(settings.detach_grace));
        // Readers are woken once per batch, not per event. For unpaced
        // streams "a batch" is everything that arrives before the runtime
        // gets round to other work: the wake is deferred with `yield_now`
        // (which fires after the scheduler has run the other ready tasks and
        // polled I/O), so an upstream that hands over one frame per task
        // hop still reaches the client in a few writes, not one per
        // character, and nothing waits for an event that is not already on
        // its way.
        let mut unannounced = false;
        let mut announce = std::pin::pin!(futures_util::future::Fuse::terminated());
        let stop = loop {
            let room = stream.has_room(settings.window);
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
                    wait = stream.wait_for_room(settings.window, settings.max_lag, settings.detach_grace) => wait,
                }
            };
            match wait {
                Wait::Go => {}
                Wait::SlowConsumer => break Some(Stop::SlowConsumer),
                Wait::Abandoned if !reader_elsewhere(&stream, replicator.as_ref()).await => {
                    break Some(Stop::Abandoned);
                }
                Wait::Abandoned => continue,
            }
            // The engine before the abandon watch: that watch only matters
            // while the engine is quiet, and is polled (registered) then.
            let event = tokio::select! {
                biased;
                stop = &mut stopping => break Some(stop),
                event = engine.next() => event,
                () = &mut abandoned => {
                    if reader_elsewhere(&stream, replicator.as_ref()).await {
                        // Held for a reader elsewhere: watch afresh.
                        abandoned = OnlyWhenWoken::new(stream.abandoned(settings.detach_grace));
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
            // This event and every one the engine has ready right now (up
            // to the window) are appended without waking anyone in between.
            let mut next = Some(event);
            let mut batch = 0;
            let mut ended = false;
            while let Some(event) = next.take() {
                if !first_delta_seen && matches!(event, StreamEvent::Delta { .. }) {
                    first_delta_seen = true;
                    ctx.metrics.first_delta(started.elapsed());
                }
                let finished = event.outcome();
                let logged = stream.append_quietly(event);
                if let Some(replicator) = &replicator {
                    replicator.push(logged);
                }
                if let Some(finished) = finished {
                    outcome = finished;
                    ended = true;
                    break;
                }
                batch += 1;
                // A stop request (one atomic load) ends the batch too.
                if settings.batch_ready
                    && batch < MAX_BATCH
                    && !stopping.may_be_ready()
                    && stream.has_room(settings.window)
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
    };
    if let Some(stop) = stop {
        let (code, message) = match stop {
            Stop::StoreFailed => {
                ("store_unavailable", "the shared store failed; the stream cannot continue".to_owned())
            }
            Stop::Cancelled => ("cancelled", "the stream was cancelled".to_owned()),
            Stop::Closing => ("generator_lost", "the server generating this stream shut down".to_owned()),
            Stop::SlowConsumer => (
                "slow_consumer",
                format!("the client did not read for {}", humantime::format_duration(settings.max_lag)),
            ),
            Stop::Abandoned => ("client_gone", "no client was connected for the detach grace period".to_owned()),
        };
        outcome = Cow::Borrowed(code);
        let logged = stream.append(StreamEvent::Error {
            stream_id: stream.id,
            seq: stream.next_seq(),
            code: code.into(),
            message,
        });
        if let Some(replicator) = &replicator {
            replicator.push(logged);
        }
    }
    // Generator first, then the slot: nothing runs on a freed slot.
    drop(engine);
    // Everything, the terminal event included, reaches the shared store (and
    // the lease is released) before the stream counts as ended: readers on
    // other replicas see `cancelled` or `generator_lost` at once, and
    // shutdown waits for it.
    if let Some(replicator) = replicator {
        replicator.finish().await;
    }
    drop(ctx.permit);
    ctx.metrics.set_open_streams(ctx.slots.open());
    ctx.metrics.observe_queue_depth(stream.deepest_lag() as usize);
    if outcome == "slow_consumer" {
        ctx.metrics.refused("slow_consumer");
    }
    if outcome.starts_with("upstream_") {
        ctx.metrics.upstream_error(&outcome);
    }
    if outcome == "store_unavailable" {
        ctx.metrics.store_error("replicate");
    }
    ctx.metrics.stream_duration(started.elapsed());
    let _entered = span.enter();
    tracing::info!(
        stream_id = %stream.id,
        subject = %ctx.subject,
        generator = %stream.generator,
        outcome = %outcome,
        chars = stream.next_seq().saturating_sub(2),
        duration_ms = started.elapsed().as_millis() as u64,
        "stream ended"
    );
    ctx.metrics.stream_ended(outcome);
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::task::Poll;

    use super::*;
    use crate::dialect::{native::Native, sse_body};
    use crate::generator::TextStream;
    use crate::limits::StreamSlots;
    use crate::sse::{Event, Parser};
    use crate::store::{HubSettings, StreamHub, follow};
    use crate::stream::{EngineSettings, StreamId, events};

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

    /// A stream with one reader attached, and the accounting for it.
    fn setup() -> (StreamId, Arc<LiveStream>, crate::store::Reader, RunContext) {
        let hub = StreamHub::new(HubSettings { max_events: 10_000, ttl: Duration::from_secs(60) });
        let id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!());
        let stream = hub.create(id, "s", "t", &CancellationToken::new());
        let reader = stream.attach(0);
        let slots = StreamSlots::new(10, 10);
        let permit = slots.try_acquire("s").unwrap_or_else(|_| unreachable!());
        let ctx = RunContext {
            subject: "s".into(),
            permit,
            slots,
            metrics: Arc::new(Metrics::new()),
            closing: CancellationToken::new(),
            replicator: None,
        };
        (id, stream, reader, ctx)
    }

    /// Runs one stream and returns (body chunks written, text received).
    async fn run(text: &str, batch_ready: bool) -> (usize, String) {
        let (id, stream, reader, ctx) = setup();
        let metrics = ctx.metrics.clone();
        let engine = events(
            id,
            "t".into(),
            one_per_hop(text),
            EngineSettings { pace: Duration::ZERO, max_duration: Duration::from_secs(60) },
        );
        let settings =
            RunSettings { window: 256, max_lag: Duration::from_secs(30), detach_grace: Duration::ZERO, batch_ready };
        spawn(engine, stream, ctx, settings);
        let events = follow(reader, Duration::from_secs(60), CancellationToken::new(), 1000);
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

    // Multi-threaded: a spinning producer must not take the test's own
    // thread with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_engine_that_ends_without_a_terminal_event_frees_its_slot() {
        let (id, stream, _reader, ctx) = setup();
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
        spawn(engine, stream, ctx, settings);
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
