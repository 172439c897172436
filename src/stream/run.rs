//! Runs a stream's engine in its own task, decoupled from the HTTP body by a
//! bounded queue.
//!
//! - Backpressure: when the client stops reading, the queue fills and the
//!   task stops pulling from the engine, so the generator is not polled
//!   further; memory per stream is bounded by the queue.
//! - Slow consumers: a client that leaves the queue full for longer than
//!   `max_lag` is ended with a terminal `error` (`slow_consumer`) delivered
//!   after what is queued; the generator is dropped and the slot freed at
//!   once, whether or not the client ever reads again.
//! - Client gone: the task notices the body was dropped even while waiting
//!   on the generator, and drops the generator promptly.
//! - The slot permit lives in the task: it is freed exactly when the stream
//!   ends, for whatever reason.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::{StreamEvent, StreamId};
use crate::limits::{SlotPermit, StreamSlots};
use crate::metrics::Metrics;

/// Queue and lag bounds for one stream.
#[derive(Debug, Clone, Copy)]
pub struct RunSettings {
    /// Events that may wait for the client.
    pub queue: usize,
    /// Longest the task waits on a full queue.
    pub max_lag: Duration,
}

/// Who and what a stream is, for accounting and the end-of-stream log line.
pub struct RunContext {
    /// The stream's id.
    pub stream_id: StreamId,
    /// The token subject.
    pub subject: String,
    /// The generator's name.
    pub generator: String,
    /// The slot, freed when the task ends.
    pub permit: SlotPermit,
    /// Where the slot table lives (for the open-streams gauge).
    pub slots: Arc<StreamSlots>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// Spawns the engine's task and returns the events for the HTTP body.
pub fn spawn(
    events: impl Stream<Item = StreamEvent> + Send + 'static,
    ctx: RunContext,
    settings: RunSettings,
) -> impl Stream<Item = StreamEvent> + Send + 'static {
    let (tx, rx) = mpsc::channel(settings.queue);
    let (tail_tx, tail_rx) = oneshot::channel::<StreamEvent>();
    ctx.metrics.set_open_streams(ctx.slots.open());
    tokio::spawn(produce(events, tx, tail_tx, ctx, settings));
    ReceiverStream::new(rx).chain(futures_util::stream::once(tail_rx).filter_map(|tail| async move { tail.ok() }))
}

async fn produce(
    events: impl Stream<Item = StreamEvent> + Send + 'static,
    tx: mpsc::Sender<StreamEvent>,
    tail: oneshot::Sender<StreamEvent>,
    ctx: RunContext,
    settings: RunSettings,
) {
    let started = Instant::now();
    // Boxed (not stack-pinned) so it can be dropped before the slot is freed.
    let mut events = Box::pin(events);
    let mut outcome = "client_gone";
    let mut last_seq = 0;
    let mut deepest = 0;
    loop {
        let event = tokio::select! {
            biased;
            () = tx.closed() => break,
            event = events.next() => event,
        };
        let Some(event) = event else { break };
        let delta_seq = match &event {
            StreamEvent::Delta { seq, .. } => Some(*seq),
            _ => None,
        };
        let finished = event.outcome();
        match tokio::time::timeout(settings.max_lag, tx.send(event)).await {
            Ok(Ok(())) => {
                deepest = deepest.max(settings.queue.saturating_sub(tx.capacity()));
                last_seq = delta_seq.unwrap_or(last_seq);
            }
            Ok(Err(_)) => break,
            Err(_) => {
                outcome = "slow_consumer";
                let _ = tail.send(StreamEvent::Error {
                    stream_id: ctx.stream_id,
                    seq: last_seq + 1,
                    code: "slow_consumer",
                    message: format!(
                        "the client did not read for {}",
                        humantime::format_duration(settings.max_lag)
                    ),
                });
                break;
            }
        }
        if let Some(finished) = finished {
            outcome = finished;
            break;
        }
    }
    // Generator first, then the slot: nothing runs on a freed slot.
    drop(events);
    drop(ctx.permit);
    ctx.metrics.set_open_streams(ctx.slots.open());
    ctx.metrics.observe_queue_depth(deepest);
    ctx.metrics.stream_ended(outcome);
    if outcome == "slow_consumer" {
        ctx.metrics.refused("slow_consumer");
    }
    tracing::info!(
        stream_id = %ctx.stream_id,
        subject = %ctx.subject,
        generator = %ctx.generator,
        outcome,
        chars = last_seq,
        duration_ms = started.elapsed().as_millis() as u64,
        "stream ended"
    );
}
