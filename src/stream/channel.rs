//! Following a channel: a store's [`ChannelFeed`] plus what belongs to the
//! connection, as for streams: heartbeats while quiet, `shutdown` when the
//! server closes, `token_expired` when the subscriber's token runs out,
//! and the end of the response at the maximum duration (`EventSource`
//! then reconnects with `Last-Event-ID` and misses nothing).
//!
//! A subscriber that falls out of its channel's log (it read slower than the channel was
//! published to, for longer than the log holds) is a slow consumer. If its response is still
//! being written, its last event is `error` with `slow_consumer`; if its client stopped
//! reading altogether (nothing takes more of its response), its HTTP/1.1 connection is closed
//! as the events it missed are dropped ([`ConnectionAbort`]). Either way a reconnect with its
//! `Last-Event-ID` is told of the gap. Nothing else waits for it: every subscriber reads the
//! shared log at its own pace, so a slow one never delays a publish or another subscriber.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::OnlyWhenWoken;
use super::reader::{FollowSettings, far_future};
use crate::store::{ChannelEvent, ChannelFeed, ChannelItem};

/// Closes the connection that carries a request, when cancelled. The server puts one in the
/// extensions of every HTTP/1.1 request (one per connection, which carries one request at a
/// time); a channel subscription hands it to the store, which cancels it when the subscriber
/// falls out of the log, so a client that stopped reading is dropped although nothing polls its
/// response any more. HTTP/2 requests carry none: closing their connection would end its other
/// streams too (a stalled HTTP/2 client is dropped by the stalled-write cutoff and the ping
/// timeout instead).
#[derive(Debug, Clone, Default)]
pub struct ConnectionAbort(pub CancellationToken);

/// What a channel subscriber's connection carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelMessage {
    /// A published event.
    Event(Arc<ChannelEvent>),
    /// Events were missed that the channel no longer holds. Not terminal, unlike a stream's
    /// `resume_gap`: the subscriber is told, and the subscription goes on with the oldest event
    /// kept.
    Gap {
        /// The id of the oldest event still kept.
        first_id: String,
    },
    /// Nothing was sent for the heartbeat interval (keeps proxies from closing the connection).
    Heartbeat,
    /// The subscriber fell out of the channel's log: it did not read for as long as the log
    /// holds publishes. Last on the connection; a reconnect with its `Last-Event-ID` is told of
    /// the gap.
    SlowConsumer,
    /// The token that opened the subscription expired (past its grace). Last on the
    /// connection; the client reconnects with fresh credentials and its `Last-Event-ID`.
    TokenExpired,
    /// The server is going away; reconnect after `retry_ms`. Last on the connection; sent even
    /// when events are waiting, which a reconnect with `Last-Event-ID` gets while they are kept.
    Shutdown {
        /// Reconnect hint in milliseconds.
        retry_ms: u64,
    },
}

impl AsRef<ChannelMessage> for ChannelMessage {
    fn as_ref(&self) -> &ChannelMessage {
        self
    }
}

/// Follows `feed` for at most `max_duration`, adding heartbeats and the
/// shutdown message.
///
/// At `max_duration` the response simply ends, with no message: the feed itself never ends, so
/// this is what bounds one connection, and the client's reconnect (`EventSource` does it by
/// itself) resumes from its `Last-Event-ID`. Dropping the stream drops the feed, which stops
/// counting the subscriber.
pub fn follow_channel(
    mut feed: ChannelFeed,
    settings: FollowSettings,
    max_duration: Duration,
) -> impl Stream<Item = ChannelMessage> + Send + 'static {
    async_stream::stream! {
        // A child token of our own, watched only when it fires (see
        // `OnlyWhenWoken`): the shared one would be a lock per event.
        let closing = settings.closing.child_token();
        let mut closing_watch = OnlyWhenWoken::new(closing.clone().cancelled_owned());
        // One timer for both ends of the connection: the maximum duration
        // and the token's deadline, whichever comes first.
        let deadline = settings.token_deadline.unwrap_or_else(far_future);
        let ends = sleep_until((Instant::now() + max_duration).min(deadline));
        tokio::pin!(ends);
        // One heartbeat timer, moved only when it fires: silence is
        // measured from the last event, without a timer per event.
        let mut last_sent = Instant::now();
        let heartbeat_timer = sleep_until(last_sent + settings.heartbeat);
        tokio::pin!(heartbeat_timer);
        loop {
            tokio::select! {
                biased;
                () = &mut closing_watch => {
                    yield ChannelMessage::Shutdown { retry_ms: settings.shutdown_retry_ms };
                    return;
                }
                () = &mut ends => {
                    if Instant::now() >= deadline {
                        yield ChannelMessage::TokenExpired;
                    }
                    return;
                }
                item = feed.next() => {
                    match item {
                        Some(ChannelItem::Event(event)) => yield ChannelMessage::Event(event),
                        Some(ChannelItem::Gap { first_id }) => yield ChannelMessage::Gap { first_id },
                        Some(ChannelItem::Overrun) => {
                            yield ChannelMessage::SlowConsumer;
                            return;
                        }
                        None => return,
                    }
                    last_sent = Instant::now();
                }
                () = &mut heartbeat_timer => {
                    if Instant::now() >= last_sent + settings.heartbeat {
                        yield ChannelMessage::Heartbeat;
                        last_sent = Instant::now();
                    }
                    heartbeat_timer.as_mut().reset(last_sent + settings.heartbeat);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::Dialect;
    use crate::dialect::channel::ChannelSse;

    #[tokio::test]
    async fn an_overrun_feed_ends_the_subscription_as_a_slow_consumer() {
        let event = Arc::new(ChannelEvent::new(1, "1".into(), None, "1".into()));
        let feed: ChannelFeed = Box::pin(futures_util::stream::iter([
            ChannelItem::Event(event.clone()),
            ChannelItem::Overrun,
            ChannelItem::Event(event.clone()),
        ]));
        let settings = FollowSettings {
            heartbeat: Duration::from_secs(60),
            closing: CancellationToken::new(),
            shutdown_retry_ms: 1,
            token_deadline: None,
        };
        let messages: Vec<ChannelMessage> = follow_channel(feed, settings, Duration::from_secs(60)).collect().await;
        assert_eq!(messages, [ChannelMessage::Event(event), ChannelMessage::SlowConsumer]);
        let mut dialect = ChannelSse { retry_ms: 1, subscriber_id: "s".into(), channel: "c".into() };
        let mut buf = bytes::BytesMut::new();
        dialect.render(&ChannelMessage::SlowConsumer, &mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("event: error\ndata: {\"code\":\"slow_consumer\""), "{text}");
    }
}
