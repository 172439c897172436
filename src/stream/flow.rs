//! The producer's flow-control and detach policy, over the facts a stream
//! log keeps ([`LiveStream::flow`], [`LiveStream::attachment`]):
//!
//! - Backpressure: the producer stays fewer than `window` events ahead of
//!   the slowest attached reader, so a client that stops reading stops the
//!   generator from being polled.
//! - Slow consumers: a window that stays full past `max_lag` ends the
//!   stream (`slow_consumer`), whether or not the client ever reads again.
//! - Detach: with no reader attached, generation continues into the log
//!   for the detach grace (so a reconnect can resume), and not before a
//!   reader on another replica lets go; then the stream is abandoned.

use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use crate::store::{Attachment, Flow, LiveStream};

/// What the producer should do next (see [`wait_for_room`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// Room in every attached reader's window: produce.
    Go,
    /// The slowest reader left its window full longer than allowed.
    SlowConsumer,
    /// No reader came back within the detach grace.
    Abandoned,
}

/// Whether the producer may append now without waiting: a reader is
/// attached and every attached reader is fewer than `window` events
/// behind. The common case of [`wait_for_room`], one lock per event.
pub(super) fn has_room(stream: &LiveStream, window: usize) -> bool {
    let Flow { detached, lag } = stream.flow();
    !detached && lag < window as u64
}

/// When generation may be abandoned if nobody attaches: the detach grace
/// after the last local reader left, and not before a remote reader's hold
/// ends. `None` while a local reader is attached.
fn abandon_at(attachment: Attachment, grace: Duration) -> Option<Instant> {
    let since = attachment.detached_since?;
    Some(attachment.remote_until.map_or(since + grace, |until| (since + grace).max(until)))
}

/// Waits until the producer may append another event: every attached
/// reader is fewer than `window` events behind. Gives up with
/// [`Wait::SlowConsumer`] after `max_lag` of a full window, and with
/// [`Wait::Abandoned`] when no reader has been attached for `grace`.
pub(super) async fn wait_for_room(stream: &LiveStream, window: usize, max_lag: Duration, grace: Duration) -> Wait {
    let mut full_since: Option<Instant> = None;
    loop {
        let notified = stream.progress();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let deadline = {
            match abandon_at(stream.attachment(), grace) {
                Some(at) if Instant::now() >= at => return Wait::Abandoned,
                // Nobody reading here: generation continues into the log
                // (bounded by max_events) for the grace period.
                Some(_) => return Wait::Go,
                None => {}
            }
            if stream.lag() < window as u64 {
                return Wait::Go;
            }
            let since = *full_since.get_or_insert_with(Instant::now);
            if Instant::now() >= since + max_lag {
                return Wait::SlowConsumer;
            }
            since + max_lag
        };
        // Readers wake us only while this flag is up; it is raised before
        // the window is checked again, so no advance is missed.
        stream.set_producer_waiting(true);
        let room = stream.lag() < window as u64;
        if !room {
            tokio::select! {
                () = &mut notified => {}
                () = sleep_until(deadline) => {}
            }
        }
        stream.set_producer_waiting(false);
    }
}

/// Resolves when no reader has been attached for `grace` (the producer
/// races this against the generator, which may be slow or silent).
pub(super) async fn abandoned(stream: &LiveStream, grace: Duration) {
    loop {
        let notified = stream.progress();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match abandon_at(stream.attachment(), grace) {
            Some(at) => {
                // Boxed: this future lives as long as its stream, which is
                // almost always attached and needs no timer.
                tokio::select! {
                    () = &mut notified => {}
                    () = Box::pin(sleep_until(at)) => {
                        if abandon_at(stream.attachment(), grace).is_some_and(|at| Instant::now() >= at) {
                            return;
                        }
                    }
                }
            }
            None => notified.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    #[test]
    fn an_attached_stream_is_never_abandoned() {
        let attached = Attachment { detached_since: None, remote_until: Some(at(5)) };
        assert_eq!(abandon_at(attached, Duration::from_secs(1)), None);
    }

    #[test]
    fn a_remote_reader_extends_the_detach_grace() {
        let since = Instant::now();
        let grace = Duration::from_secs(2);
        let alone = Attachment { detached_since: Some(since), remote_until: None };
        assert_eq!(abandon_at(alone, grace), Some(since + grace));
        let held = Attachment { detached_since: Some(since), remote_until: Some(since + Duration::from_secs(9)) };
        assert_eq!(abandon_at(held, grace), Some(since + Duration::from_secs(9)));
        // A hold that ends before the grace does not shorten it.
        let short = Attachment { detached_since: Some(since), remote_until: Some(since) };
        assert_eq!(abandon_at(short, grace), Some(since + grace));
    }
}
