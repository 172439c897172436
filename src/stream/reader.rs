//! The one reader: follows a stream's log through a [`Cursor`], in memory
//! or in the shared store alike, and adds what belongs to a connection
//! rather than to the stream: heartbeats while quiet, `shutdown` when the
//! server closes, `token_expired` when the credentials that opened the
//! connection run out (the stream goes on; the client resumes with fresh
//! ones), and a terminal error instead of a silent skip when the log
//! cannot continue (`resume_gap`, `generator_lost`, `store_unavailable`).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::Stream;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::OnlyWhenWoken;
use super::drive::Inline;
use crate::event::{ErrorCode, StreamEvent};
use crate::store::{Cursor, Read};

/// Most events handed on per log read. Also how late a shutdown can be noticed during a long
/// replay: it is looked at between batches.
const BATCH: usize = 256;

/// How a reader behaves on its connection.
#[derive(Debug, Clone)]
pub struct FollowSettings {
    /// Silence after which a heartbeat is sent.
    pub heartbeat: Duration,
    /// Fires when the server closes streams for shutdown. The server's shared token, watched
    /// only when it fires (see `OnlyWhenWoken`), so per-event checks never contend on it.
    pub closing: CancellationToken,
    /// The `retry:` hint sent with `shutdown`.
    pub shutdown_retry_ms: u64,
    /// When the connection's token (plus its grace) expires: the reader then ends with
    /// `token_expired`. `None` for readers not opened by a caller.
    pub token_deadline: Option<Instant>,
}

/// The terminal event of a connection whose token expired. Not the stream's end: its sequence
/// is the next one not delivered, and dialects render it without an event id, so the client's
/// `Last-Event-ID` stays at the last event it got.
pub(super) fn token_expired(stream_id: crate::event::StreamId, next: u64) -> Arc<StreamEvent> {
    Arc::new(StreamEvent::Error { stream_id, seq: next, code: ErrorCode::TokenExpired, message: TOKEN_EXPIRED.into() })
}

/// What a connection ended by its token's expiry is told.
pub const TOKEN_EXPIRED: &str = "the token that opened this connection has expired; reconnect with a fresh token or ticket and Last-Event-ID to continue";

/// A deadline that never comes, for connections without one (a timer still has to exist for
/// the select).
pub(super) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 86_400)
}

/// Follows a stream's log from the cursor's position on: replays what is
/// logged, then waits for more, until the terminal event.
///
/// Shutdown is watched with [`OnlyWhenWoken`]: looked at per event only as
/// an atomic flag, not a lock.
///
/// An event counts as delivered, and the cursor advances past it, only when the consumer
/// polls for the next one: for a local cursor that is what moves the producer's window, so a
/// connection that stops taking events stops the generator (remote readers do not hold the
/// window). The stream ends after the first terminal event: the log's own (`done`, `error`),
/// a `shutdown` of this connection, or an `error` the reader makes itself, numbered with the
/// sequence it could not read. Dropping it drops the cursor (a local reader detaches).
///
/// One generator body (about 80 lines): the batch, the timer and the watch live across its
/// yields, on the per-event path.
pub fn follow(cursor: Cursor, settings: FollowSettings) -> impl Stream<Item = Arc<StreamEvent>> + Send + 'static {
    follow_driving(cursor, settings, None)
}

/// [`follow`] by the first reader of a stream whose producer runs inline
/// (see [`super::drive`]): the reader polls it whenever it waits for
/// events, before it looks at the log, so an event produced on this
/// wake-up is read on it too.
pub(super) fn follow_driving(
    mut cursor: Cursor,
    settings: FollowSettings,
    inline: Option<Inline>,
) -> impl Stream<Item = Arc<StreamEvent>> + Send + 'static {
    // Taken apart before the generator: it then holds only what it uses
    // (every open stream holds one, so its size is memory per connection).
    let FollowSettings { heartbeat, closing, shutdown_retry_ms, token_deadline } = settings;
    // The server's own token, not a child: it is looked at (`is_cancelled`
    // locks its mutex) only once its watch fired, never per event, and a
    // child would cost every open stream a node of its own.
    // The heartbeat timer also fires at the token's deadline: a second
    // timer would grow every connection's state by a timer entry.
    let deadline = token_deadline.unwrap_or_else(far_future);
    async_stream::stream! {
        let stream_id = cursor.stream_id();
        let shutdown = || Arc::new(StreamEvent::Shutdown { retry_ms: shutdown_retry_ms });
        let mut closing_watch = OnlyWhenWoken::new(closing.clone().cancelled_owned());
        let mut next = cursor.from();
        // Reused for every read: no allocation per event.
        let mut batch = VecDeque::with_capacity(16);
        // One heartbeat timer, moved only when it fires: silence is
        // measured from the last write, without a timer per event.
        let mut last_write = Instant::now();
        let next_tick = |last_write: Instant| (last_write + heartbeat).min(deadline);
        let heartbeat_timer = sleep_until(next_tick(last_write));
        tokio::pin!(heartbeat_timer);
        'wake: loop {
            if closing_watch.may_be_ready() && closing.is_cancelled() {
                yield shutdown();
                return;
            }
            // Everything there is, batch after batch.
            loop {
                let read = match cursor.read_now(next, BATCH, &mut batch) {
                    Some(read) => Ok(read),
                    None => cursor.read(next, BATCH, &mut batch).await,
                };
                let ended = move |code: ErrorCode, message: String| {
                    Arc::new(StreamEvent::Error { stream_id, seq: next, code, message })
                };
                match read {
                    Ok(Read::Events) => {}
                    Ok(Read::CaughtUp) => break,
                    Ok(Read::Gap { first_kept }) => {
                        yield ended(ErrorCode::ResumeGap, format!("events from {next} on are no longer retained (oldest kept: {first_kept}); start a new stream"));
                        return;
                    }
                    Ok(Read::ProducerLost) => {
                        yield ended(ErrorCode::GeneratorLost, "the replica generating this stream is gone".into());
                        return;
                    }
                    Err(e) => {
                        yield ended(ErrorCode::StoreUnavailable, format!("the shared store failed: {e}"));
                        return;
                    }
                }
                while let Some(event) = batch.pop_front() {
                    let terminal = event.is_terminal();
                    next = event.seq().map_or(next, |s| s + 1);
                    yield event;
                    // Reached only once the consumer asked for more: the
                    // event was taken.
                    cursor.advance(next);
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
                    yield shutdown();
                    return;
                }
                // Before new events, so that a busy stream cannot starve the
                // token's deadline (a heartbeat is not due while it is busy).
                () = &mut heartbeat_timer => {
                    let now = Instant::now();
                    if now >= deadline {
                        yield token_expired(stream_id, next);
                        return;
                    }
                    if now >= last_write + heartbeat {
                        yield Arc::new(StreamEvent::Heartbeat);
                        last_write = Instant::now();
                    }
                    heartbeat_timer.as_mut().reset(next_tick(last_write));
                }
                // The producer's append would wake this very task: the
                // reader's waker is taken first (`unwatch`), and the log
                // is looked at right after.
                () = poll_fn(|cx| {
                    cursor.unwatch();
                    if let Some(inline) = &inline {
                        inline.poll(cx);
                    }
                    Poll::<()>::Pending
                }), if inline.is_some() => {}
                () = cursor.changed(next) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::{FollowSettings, follow};
    use crate::event::StreamId;
    use crate::store::{Store, StoreSettings};

    /// Every open stream holds one reader future, so its size is memory per
    /// connection. 488 bytes when written (368 before the Redis cursor
    /// shared it: the remote read is boxed so that local readers do not
    /// carry its state), 528 with the token deadline (which shares the
    /// heartbeat's timer rather than adding one); the bound catches a
    /// change that inlines a large future again.
    #[tokio::test]
    async fn a_readers_state_stays_small() {
        let retention = Duration::from_secs(1);
        let settings = StoreSettings {
            stream_max_events: 10,
            replication_window: Duration::from_millis(50),
            stream_ttl: retention,
            channel_max_events: 1,
            channel_ttl: retention,
        };
        let store = Store::memory(settings);
        let id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!());
        let closing = CancellationToken::new();
        let (_writer, cursor) = store.create(id, "a", "b", &closing).await.unwrap_or_else(|_| unreachable!());
        let reader = follow(
            cursor,
            FollowSettings { heartbeat: retention, closing, shutdown_retry_ms: 1, token_deadline: None },
        );
        let size = std::mem::size_of_val(&reader);
        assert!(size <= 544, "a reader's future is {size} bytes");
    }
}
