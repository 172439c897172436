//! Drives one generation: pulls text from the generator, splits it into
//! grapheme clusters, numbers and paces the deltas, and ends with `done`,
//! `error` or `max_duration`.
//!
//! The engine only pulls the next chunk from the generator once every
//! cluster of the previous one has been handed on, and only produces an
//! event when asked for one, so whoever drives it controls backpressure.
//! Dropping it drops the generator, which cancels its work. Heartbeats and
//! shutdown are per connection and live with the readers
//! ([`crate::stream::follow`]), not here.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::time::{Instant, sleep_until};

use super::GraphemeSplitter;
use super::graphemes::next_cluster;
use crate::event::{DeltaText, ErrorCode, FinishReason, StreamEvent, StreamId};
use crate::generator::{Chunk, TextStream};

/// Per-generation settings resolved from config and the request.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Time between two deltas; zero sends them as fast as they are taken. A cadence: each
    /// delta is due one pace after the previous one was due. When the timer fires late or the
    /// consumer pauses, the overdue deltas go at once, but never more than `CATCH_UP_DELTAS`
    /// paces' worth; the time spent waiting for the generator is not caught up on.
    pub pace: Duration,
    /// The stream ends with an `error` (`max_duration`) after this long, counted from when the
    /// event after `Start` is first asked for. The limit is noticed while the engine waits (for
    /// the pace or for the generator): a generator that never makes it wait is stopped at its
    /// next pause.
    pub max_duration: Duration,
}

/// How many paces a stream may fall behind its cadence and still catch up.
///
/// On a saturated machine every timer fires late; restarting the cadence from each late
/// wake-up would deliver fewer characters per second the busier the box, one write each,
/// while catching up hands the reader the overdue deltas together, for one write. The bound
/// keeps a long stall (a suspended process, a consumer that stopped reading) from ending in
/// a flood instead of typed text.
pub(super) const CATCH_UP_DELTAS: u32 = 8;

/// The event sequence of one generation: `Start` (sequence 0), `Delta`s
/// (1..=n), then `Done` or `Error` (n+1).
///
/// Exactly one terminal event, always last, and the sequence numbers have no hole: the
/// producer logs them as they come, and a resume by sequence number depends on both. `Done`
/// carries the last usage the generator reported. On a generator error the clusters already
/// received are delivered first, unpaced, so the client keeps all the text that was produced.
pub fn events(
    stream_id: StreamId,
    generator: String,
    mut text: TextStream,
    settings: EngineSettings,
) -> impl Stream<Item = StreamEvent> + Send + 'static {
    async_stream::stream! {
        yield StreamEvent::Start { stream_id, generator };
        let deadline = Instant::now() + settings.max_duration;
        let mut next_delta = Instant::now();
        // One timer for the whole stream, for both waits: the pace (due at
        // the next delta, or the deadline if sooner) and the generator
        // (due at the deadline). A fresh timer per event would be a
        // timer-wheel insert and removal per character, and a second one
        // would take its room in every open stream.
        let timer = sleep_until(deadline);
        tokio::pin!(timer);
        let mut splitter = GraphemeSplitter::new();
        // Whole clusters received and not yet sent, in one buffer, taken
        // one cluster at a time from `at`: a large chunk (a long prompt to
        // echo, say) costs its bytes, not a heap string per cluster before
        // the first is sent.
        let mut ready = String::new();
        let mut at = 0;
        let mut seq: u64 = 0;
        let mut text_ended = false;
        let mut usage = None;
        loop {
            if let Some(cluster) = next_cluster(&ready[at..]).map(DeltaText::from) {
                at += cluster.len();
                if Instant::now() < next_delta {
                    timer.as_mut().reset(next_delta.min(deadline));
                    (&mut timer).await;
                    if Instant::now() >= deadline {
                        yield max_duration_error(stream_id, seq, settings.max_duration);
                        return;
                    }
                }
                seq += 1;
                yield StreamEvent::Delta { stream_id, seq, text: cluster };
                if !settings.pace.is_zero() {
                    // Keep the cadence after a late timer or a paused
                    // consumer, catching up at most `CATCH_UP_DELTAS`.
                    let now = Instant::now();
                    let floor = now.checked_sub(settings.pace * CATCH_UP_DELTAS).unwrap_or(now);
                    next_delta = (next_delta + settings.pace).max(floor);
                }
                continue;
            }
            if text_ended {
                yield StreamEvent::Done { stream_id, seq: seq + 1, finish_reason: FinishReason::Stop, chars: seq, usage };
                return;
            }
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let asked = Instant::now();
            tokio::select! {
                biased;
                chunk = text.next() => match chunk {
                    Some(Ok(Chunk::Text(chunk))) => {
                        ready = splitter.push_complete(&chunk);
                        at = 0;
                        // The time spent waiting for the generator is not
                        // caught up on (a slow generator's text starts a new
                        // cadence when it comes); deltas overdue before it
                        // was asked still are. Most chunks are ready at once.
                        let now = Instant::now();
                        next_delta = (next_delta + (now - asked)).min(now.max(next_delta));
                    }
                    Some(Ok(Chunk::Usage(reported))) => usage = Some(reported),
                    Some(Err(err)) => {
                        // Everything the generator produced before failing is
                        // delivered, then the error.
                        ready.drain(..at);
                        ready.extend(splitter.finish());
                        let mut rest = ready.as_str();
                        while let Some(cluster) = next_cluster(rest) {
                            rest = &rest[cluster.len()..];
                            seq += 1;
                            yield StreamEvent::Delta { stream_id, seq, text: cluster.into() };
                        }
                        yield StreamEvent::Error { stream_id, seq: seq + 1, code: err.code(), message: err.to_string() };
                        return;
                    }
                    None => {
                        ready = splitter.finish().unwrap_or_default();
                        at = 0;
                        text_ended = true;
                    }
                },
                () = &mut timer => {
                    yield max_duration_error(stream_id, seq, settings.max_duration);
                    return;
                }
            }
        }
    }
}

/// The terminal error when the duration limit strikes after `seq` deltas; clusters received
/// but not yet sent are dropped with it.
fn max_duration_error(stream_id: StreamId, seq: u64, limit: Duration) -> StreamEvent {
    StreamEvent::Error {
        stream_id,
        seq: seq + 1,
        code: ErrorCode::MaxDuration,
        message: format!("the stream reached its maximum duration of {}", humantime::format_duration(limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::GeneratorError;
    use futures_util::stream;

    fn settings(pace_ms: u64) -> EngineSettings {
        EngineSettings { pace: Duration::from_millis(pace_ms), max_duration: Duration::from_secs(3600) }
    }

    fn id() -> StreamId {
        StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!())
    }

    fn texts(events: &[StreamEvent]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Delta { text, .. } => Some(text.to_string()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn paced_deltas_are_spaced_by_the_pace() {
        let text: TextStream = Box::pin(stream::iter(vec![Ok("ab".into()), Ok("c".into())]));
        let mut s = Box::pin(events(id(), "t".into(), text, settings(100)));
        let start = Instant::now();
        let mut times = Vec::new();
        while let Some(ev) = s.next().await {
            if matches!(ev, StreamEvent::Delta { .. }) {
                times.push(Instant::now() - start);
            }
        }
        assert_eq!(times, [Duration::ZERO, Duration::from_millis(100), Duration::from_millis(200)]);
    }

    /// Pulls every event of `text` paced at `pace_ms`, pausing `pause` before asking for delta
    /// `at`; returns when each delta came, in milliseconds from the start.
    async fn delta_times(text: TextStream, pace_ms: u64, pause: Duration, at: u64) -> Vec<u64> {
        let mut s = Box::pin(events(id(), "t".into(), text, settings(pace_ms)));
        let start = Instant::now();
        let mut times = Vec::new();
        let mut next = 1;
        loop {
            if next == at {
                tokio::time::sleep(pause).await;
            }
            match s.next().await {
                Some(StreamEvent::Delta { .. }) => times.push((Instant::now() - start).as_millis() as u64),
                Some(_) => continue,
                None => return times,
            }
            next += 1;
        }
    }

    fn text_of(chunk: &'static str) -> TextStream {
        Box::pin(stream::iter([Ok(chunk.into())]))
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_consumer_gets_the_overdue_deltas_at_once_and_the_cadence_holds() {
        // Deltas due at 0, 10, 20, ...; the consumer asks for the second at
        // 35 ms: the ones due at 10, 20 and 30 come at once, then 40, 50.
        let times = delta_times(text_of("abcdef"), 10, Duration::from_millis(35), 2).await;
        assert_eq!(times, [0, 35, 35, 35, 40, 50]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_catch_up_goes_on_across_chunks_the_generator_had_ready() {
        // Chunks as the demo generator makes them, all ready at once: the
        // pause spans their boundaries, and the overdue deltas still go
        // together.
        let text: TextStream = Box::pin(stream::iter(["ab", "cd", "ef", "gh"].map(|c| Ok(c.into()))));
        let times = delta_times(text, 10, Duration::from_millis(35), 2).await;
        assert_eq!(times, [0, 35, 35, 35, 40, 50, 60, 70]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_stall_catches_up_only_a_bounded_burst() {
        // A pause of a second is 100 paces; only `CATCH_UP_DELTAS` of them
        // (plus the one due now) are caught up, then the cadence goes on.
        let text = text_of("abcdefghijklmnopqrstuvwxyz");
        let times = delta_times(text, 10, Duration::from_millis(1000), 2).await;
        let burst = CATCH_UP_DELTAS as usize + 1;
        assert_eq!(times[0], 0);
        assert!(times[1..=burst].iter().all(|&t| t == 1000), "{times:?}");
        assert_eq!(times[burst + 1], 1010, "{times:?}");
        assert_eq!(times[burst + 2], 1020, "{times:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_generator_restarts_the_cadence_instead_of_bursting() {
        let text: TextStream = Box::pin(stream::iter(["ab", "cd"]).then(|chunk| async move {
            if chunk == "cd" {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(chunk.into())
        }));
        let times = delta_times(text, 100, Duration::ZERO, 0).await;
        // "cd" comes at 500 ms. The splitter held "b" back (a combining mark
        // could follow it), so "b" goes then, and "c" and "d" a pace apart
        // after it: not "b" and "c" at once, as a cadence restarted only
        // after the first delta would.
        assert_eq!(times, [0, 500, 600, 700]);
    }

    #[tokio::test(start_paused = true)]
    async fn generator_error_is_terminal_error_event() {
        let text: TextStream =
            Box::pin(stream::iter(vec![Ok("hi".into()), Err(GeneratorError::Failed("boom".into()))]));
        let all: Vec<StreamEvent> = events(id(), "t".into(), text, settings(0)).collect().await;
        assert_eq!(texts(&all), ["h", "i"]);
        assert!(
            matches!(all.last(), Some(StreamEvent::Error { code, seq: 3, .. }) if *code == ErrorCode::GeneratorFailed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_duration_ends_with_an_error() {
        let mut s = settings(1000);
        s.max_duration = Duration::from_millis(2500);
        let text: TextStream = Box::pin(stream::iter(vec![Ok("abcdefgh".into())]));
        let all: Vec<StreamEvent> = events(id(), "t".into(), text, s).collect().await;
        // Deltas at 0, 1 and 2 s; the limit strikes at 2.5 s.
        assert_eq!(texts(&all), ["a", "b", "c"]);
        assert!(
            matches!(all.last(), Some(StreamEvent::Error { code, seq: 4, .. }) if *code == ErrorCode::MaxDuration),
            "{all:?}"
        );
    }

    /// Every open stream holds its engine, so its size is memory per idle
    /// stream: one timer (112 bytes) serves both of its waits.
    #[test]
    fn an_engines_state_stays_small() {
        let text: TextStream = Box::pin(stream::iter(vec![Ok("ab".into())]));
        let engine = events(id(), "t".into(), text, settings(5));
        let size = std::mem::size_of_val(&engine);
        assert!(size <= 640, "an engine is {size} bytes");
    }
}
