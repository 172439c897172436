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

use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::StreamEvent;
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
}

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
    let mut deepest: u64 = 0;
    let mut first_delta_seen = false;
    let mut outcome: Cow<'static, str> = Cow::Borrowed("internal");
    // The reasons to stop other than the engine's own end, as one future
    // made once: building fresh `cancelled()` futures for every event would
    // lock and register on three tokens per character.
    let stop = {
        let stopping = async {
            tokio::select! {
                biased;
                () = store_failed.cancelled() => Stop::StoreFailed,
                () = stream.cancelled().cancelled() => Stop::Cancelled,
                () = ctx.closing.cancelled() => Stop::Closing,
            }
        };
        tokio::pin!(stopping);
        let abandoned = stream.abandoned(settings.detach_grace);
        tokio::pin!(abandoned);
        loop {
            let wait = tokio::select! {
                biased;
                stop = &mut stopping => break Some(stop),
                wait = stream.wait_for_room(settings.window, settings.max_lag, settings.detach_grace) => wait,
            };
            match wait {
                Wait::Go => {}
                Wait::SlowConsumer => break Some(Stop::SlowConsumer),
                Wait::Abandoned if !reader_elsewhere(&stream, replicator.as_ref()).await => {
                    break Some(Stop::Abandoned);
                }
                Wait::Abandoned => continue,
            }
            let event = tokio::select! {
                biased;
                stop = &mut stopping => break Some(stop),
                () = &mut abandoned => {
                    if reader_elsewhere(&stream, replicator.as_ref()).await {
                        // Held for a reader elsewhere: watch afresh.
                        abandoned.set(stream.abandoned(settings.detach_grace));
                        continue;
                    }
                    break Some(Stop::Abandoned);
                }
                event = engine.next() => event,
            };
            let Some(event) = event else { break None };
            if !first_delta_seen && matches!(event, StreamEvent::Delta { .. }) {
                first_delta_seen = true;
                ctx.metrics.first_delta(started.elapsed());
            }
            deepest = deepest.max(stream.lag());
            let finished = event.outcome();
            let logged = stream.append(event);
            if let Some(replicator) = &replicator {
                replicator.push(logged);
            }
            if let Some(finished) = finished {
                outcome = finished;
                break None;
            }
        }
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
    ctx.metrics.observe_queue_depth(deepest as usize);
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
