//! Drives one stream: pulls text from the generator, splits it into grapheme
//! clusters, paces the deltas, interleaves heartbeats and honours shutdown.
//!
//! The engine only pulls the next chunk from the generator once every
//! cluster of the previous one has been handed on, and it only produces an
//! event when its consumer asks for one; a client that stops reading
//! therefore stops the generator from being polled (backpressure). Dropping
//! the returned stream drops the generator, which cancels its work.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::{FinishReason, GraphemeSplitter, StreamEvent, StreamId};
use crate::generator::TextStream;

/// Per-stream settings resolved from config and the request.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Minimum time between two deltas; zero sends them as fast as the
    /// client reads.
    pub pace: Duration,
    /// Send a heartbeat comment after this long without any other event.
    pub heartbeat: Duration,
    /// Fired when the shutdown grace period is over: the stream ends with a
    /// `shutdown` event.
    pub closing: CancellationToken,
    /// The `retry:` hint sent with `shutdown`, in milliseconds.
    pub shutdown_retry_ms: u64,
    /// The stream ends with an `error` (`max_duration`) after this long.
    pub max_duration: Duration,
}

/// The event sequence of one stream: `Start`, `Delta`s, then `Done` or
/// `Error` (or `Shutdown`), with `Heartbeat`s wherever the stream is quiet.
pub fn events(
    stream_id: StreamId,
    generator: String,
    mut text: TextStream,
    settings: EngineSettings,
) -> impl Stream<Item = StreamEvent> + Send + 'static {
    async_stream::stream! {
        yield StreamEvent::Start { stream_id, generator };
        let deadline = Instant::now() + settings.max_duration;
        let mut last_sent = Instant::now();
        let mut next_delta = Instant::now();
        let mut splitter = GraphemeSplitter::new();
        let mut ready: VecDeque<String> = VecDeque::new();
        let mut seq: u64 = 0;
        let mut text_ended = false;
        loop {
            let heartbeat_at = last_sent + settings.heartbeat;
            if let Some(cluster) = ready.pop_front() {
                // Wait for the pace slot (heartbeats may be due meanwhile).
                loop {
                    if Instant::now() >= next_delta {
                        break;
                    }
                    tokio::select! {
                        biased;
                        () = settings.closing.cancelled() => {
                            yield StreamEvent::Shutdown { retry_ms: settings.shutdown_retry_ms };
                            return;
                        }
                        () = sleep_until(deadline) => {
                            yield max_duration_error(stream_id, seq, settings.max_duration);
                            return;
                        }
                        () = sleep_until(next_delta) => {}
                        () = sleep_until(last_sent + settings.heartbeat) => {
                            yield StreamEvent::Heartbeat;
                            last_sent = Instant::now();
                        }
                    }
                }
                seq += 1;
                yield StreamEvent::Delta { stream_id, seq, text: cluster };
                let now = Instant::now();
                last_sent = now;
                if !settings.pace.is_zero() {
                    // Keep the cadence after a late timer, but never burst
                    // to catch up after a slow generator.
                    next_delta = (next_delta + settings.pace).max(now);
                }
                continue;
            }
            if text_ended {
                yield StreamEvent::Done {
                    stream_id,
                    seq: seq + 1,
                    finish_reason: FinishReason::Stop,
                    chars: seq,
                };
                return;
            }
            tokio::select! {
                biased;
                () = settings.closing.cancelled() => {
                    yield StreamEvent::Shutdown { retry_ms: settings.shutdown_retry_ms };
                    return;
                }
                chunk = text.next() => match chunk {
                    Some(Ok(chunk)) => splitter.push(&chunk, |g| ready.push_back(g.to_owned())),
                    Some(Err(err)) => {
                        // Everything the generator produced before failing is
                        // delivered, then the error.
                        ready.extend(splitter.finish());
                        for cluster in ready.drain(..) {
                            seq += 1;
                            yield StreamEvent::Delta { stream_id, seq, text: cluster };
                        }
                        yield StreamEvent::Error {
                            stream_id,
                            seq: seq + 1,
                            code: err.code(),
                            message: err.to_string(),
                        };
                        return;
                    }
                    None => {
                        ready.extend(splitter.finish());
                        text_ended = true;
                    }
                },
                () = sleep_until(deadline) => {
                    yield max_duration_error(stream_id, seq, settings.max_duration);
                    return;
                }
                () = sleep_until(heartbeat_at) => {
                    yield StreamEvent::Heartbeat;
                    last_sent = Instant::now();
                }
            }
        }
    }
}

fn max_duration_error(stream_id: StreamId, seq: u64, limit: Duration) -> StreamEvent {
    StreamEvent::Error {
        stream_id,
        seq: seq + 1,
        code: "max_duration",
        message: format!(
            "the stream reached its maximum duration of {}",
            humantime::format_duration(limit)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::GeneratorError;
    use futures_util::stream;

    fn settings(pace_ms: u64) -> EngineSettings {
        EngineSettings {
            pace: Duration::from_millis(pace_ms),
            heartbeat: Duration::from_secs(15),
            closing: CancellationToken::new(),
            shutdown_retry_ms: 1000,
            max_duration: Duration::from_secs(3600),
        }
    }

    fn id() -> StreamId {
        StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!())
    }

    fn texts(events: &[StreamEvent]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Delta { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn paced_deltas_are_spaced_by_the_pace() {
        let text: TextStream = Box::pin(stream::iter(vec![Ok("ab".to_owned()), Ok("c".to_owned())]));
        let mut s = Box::pin(events(id(), "t".into(), text, settings(100)));
        let start = Instant::now();
        let mut times = Vec::new();
        while let Some(ev) = s.next().await {
            if matches!(ev, StreamEvent::Delta { .. }) {
                times.push(Instant::now() - start);
            }
        }
        assert_eq!(
            times,
            [Duration::ZERO, Duration::from_millis(100), Duration::from_millis(200)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_while_generator_is_silent() {
        let text: TextStream = Box::pin(async_stream::stream! {
            tokio::time::sleep(Duration::from_secs(40)).await;
            yield Ok::<_, GeneratorError>("x".to_owned());
        });
        let all: Vec<StreamEvent> = events(id(), "t".into(), text, settings(0)).collect().await;
        let beats = all.iter().filter(|e| **e == StreamEvent::Heartbeat).count();
        assert_eq!(beats, 2, "{all:?}");
        assert_eq!(texts(&all), ["x"]);
        assert!(matches!(all.last(), Some(StreamEvent::Done { chars: 1, seq: 2, .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn generator_error_is_terminal_error_event() {
        let text: TextStream = Box::pin(stream::iter(vec![
            Ok("hi".to_owned()),
            Err(GeneratorError::Failed("boom".into())),
        ]));
        let all: Vec<StreamEvent> = events(id(), "t".into(), text, settings(0)).collect().await;
        assert_eq!(texts(&all), ["h", "i"]);
        assert!(matches!(
            all.last(),
            Some(StreamEvent::Error {
                code: "generator_failed",
                seq: 3,
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn max_duration_ends_with_an_error() {
        let mut s = settings(1000);
        s.max_duration = Duration::from_millis(2500);
        let text: TextStream = Box::pin(stream::iter(vec![Ok("abcdefgh".to_owned())]));
        let all: Vec<StreamEvent> = events(id(), "t".into(), text, s).collect().await;
        // Deltas at 0, 1 and 2 s; the limit strikes at 2.5 s.
        assert_eq!(texts(&all), ["a", "b", "c"]);
        assert!(
            matches!(
                all.last(),
                Some(StreamEvent::Error {
                    code: "max_duration",
                    seq: 4,
                    ..
                })
            ),
            "{all:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closing_ends_with_shutdown() {
        let s = settings(1000);
        let closing = s.closing.clone();
        let text: TextStream = Box::pin(stream::iter(vec![Ok("abcdef".to_owned())]));
        let mut st = Box::pin(events(id(), "t".into(), text, s));
        assert!(matches!(st.next().await, Some(StreamEvent::Start { .. })));
        assert!(matches!(st.next().await, Some(StreamEvent::Delta { seq: 1, .. })));
        closing.cancel();
        assert_eq!(st.next().await, Some(StreamEvent::Shutdown { retry_ms: 1000 }));
        assert_eq!(st.next().await, None);
    }
}
