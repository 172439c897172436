//! Channels through the one store handle: publishing, and subscribing from
//! a position with history. In memory a channel is a local log; with a
//! shared store Redis orders and keeps the events, every replica's tail
//! feeds them into its local log, and each replica counts its subscribers
//! in Redis so that a publish reports the cluster's total.
//!
//! Creating a channel (the first publish or subscribe to a name) is bounded per subject and in
//! total ([`ChannelLimits`]): in memory by the hub, under the lock that creates the channel;
//! with a shared store by one Redis script, for the whole cluster.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::channels::{ChannelEvent, ChannelItem, Start};
use super::redis::RedisStore;
use super::{Shared, Store, StoreError};

/// A subscriber's events: history first, then live ones. The subscriber is
/// counted (and, shared, its channel tailed) until the feed is dropped.
pub type ChannelFeed = Pin<Box<dyn Stream<Item = ChannelItem> + Send + 'static>>;

/// Where a subscriber resumes, from its `Last-Event-ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelPosition {
    /// A position in this process's log (the in-memory store's ids). With a
    /// shared store `n` means the entry `n-0`.
    Seq(u64),
    /// A shared store's entry id, `<ms>-<seq>`. In memory it names no
    /// position this process issued: the subscriber is told of a gap.
    Entry(String),
}

impl ChannelPosition {
    /// Parses a channel event id in either form, whichever store runs: an id issued by the other
    /// kind of store (a server restarted with or without Redis) still parses, and is answered
    /// as the variants say rather than refused. `None` (a bad request) for anything else,
    /// including digits beyond `u64`.
    pub fn parse(id: &str) -> Option<Self> {
        if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
            return id.parse().ok().map(ChannelPosition::Seq);
        }
        let (ms, seq) = id.split_once('-')?;
        (ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok()).then(|| ChannelPosition::Entry(id.to_owned()))
    }
}

/// Bounds on creating channels: a publish or subscribe that would bring a new channel into
/// existence beyond either is refused ([`ChannelRefused`]); channels that exist stay usable by
/// anyone. A channel counts against the subject whose request created it until it is swept
/// (`channel_ttl` without subscribers or publishes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelLimits {
    /// Channels created by subjects that may exist at once, server-wide (cluster-wide with a
    /// shared store).
    pub max_channels: usize,
    /// Channels one subject's requests may have created that exist at once.
    pub max_per_subject: usize,
}

impl ChannelLimits {
    /// No bound: for embedding and unit tests (the server always sets its configured bounds).
    pub const UNBOUNDED: ChannelLimits = ChannelLimits { max_channels: usize::MAX, max_per_subject: usize::MAX };
}

/// Which bound on channel creation was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelScope {
    /// The subject's own.
    Subject,
    /// The server's (or cluster's) total.
    Total,
}

/// A channel could not be created: a bound in [`ChannelLimits`] is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", refusal_text(.scope, .limit))]
pub struct ChannelRefused {
    /// Which bound.
    pub scope: ChannelScope,
    /// Its value.
    pub limit: usize,
    /// A retry hint: `channel_ttl`, the longest a channel nobody uses is kept.
    pub retry_after: Duration,
}

/// [`ChannelRefused`]'s message: which bound, and what still works.
fn refusal_text(scope: &ChannelScope, limit: &usize) -> String {
    match scope {
        ChannelScope::Subject => format!(
            "you have created {limit} channels that still exist, the most allowed; existing channels stay usable, and one of yours is freed once nobody has used it for channel_ttl"
        ),
        ChannelScope::Total => {
            format!("the server holds {limit} channels, the most allowed; existing channels stay usable, retry later")
        }
    }
}

/// The answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event's id (what subscribers see as `id:`).
    pub id: String,
    /// Subscribers connected to receive it (across replicas when shared).
    pub subscribers: usize,
}

/// This replica's share of a channel's subscriber count in Redis, given
/// back when the subscription ends.
///
/// `Drop` cannot wait, so the decrement runs in a spawned task (a Tokio runtime must be
/// current) and is best effort: if it fails, the count stays one too high until the hash
/// expires.
struct CountedSubscriber {
    redis: Arc<RedisStore>,
    name: String,
    replica: String,
}

impl Drop for CountedSubscriber {
    fn drop(&mut self) {
        let (redis, name, replica) =
            (self.redis.clone(), std::mem::take(&mut self.name), std::mem::take(&mut self.replica));
        tokio::spawn(async move {
            let _ = redis.count_subscriber(&name, &replica, -1).await;
            // The channel's idle time runs from its last subscriber's departure, as in memory.
            let _ = redis.channel_touch(&name).await;
        });
    }
}

impl Store {
    /// Publishes `data` (JSON text) as `event` (`None`: `message`) on behalf of `creator`: the
    /// subject whose request this is, `None` for the server's own publishers (the demo feeds),
    /// whose channels are not counted. Creating the channel may be refused
    /// ([`StoreError::TooManyChannels`]). With a shared store the count is read after the
    /// publish, as a second command: it is the cluster's subscribers at about that moment, not a
    /// list of who received the event.
    pub async fn publish(
        &self,
        name: &str,
        creator: Option<&str>,
        event: Option<String>,
        data: String,
    ) -> Result<Published, StoreError> {
        match &self.0.shared {
            // Shared: Redis orders and stores it; every replica's tail (this
            // one's included) delivers it to local subscribers.
            Some(shared) => {
                if let Some(subject) = creator {
                    shared.redis.channel_admit(name, subject, self.0.channel_limits).await?;
                }
                let id = shared.redis.channel_publish(name, event.as_deref(), &data).await?;
                Ok(Published { id, subscribers: shared.redis.channel_subscribers(name).await? })
            }
            None => {
                let (seq, subscribers) = self.0.channels.publish(name, creator, event, data)?;
                Ok(Published { id: seq.to_string(), subscribers })
            }
        }
    }

    /// Subscribes to channel `name` after `after` (only new events when `None`), on behalf of
    /// `creator` (as for [`Store::publish`]). Missed events the channel no longer holds are
    /// announced as one [`ChannelItem::Gap`] first: never a silent skip. A subscriber that
    /// later falls out of the channel's log gets [`ChannelItem::Overrun`], last, when its feed
    /// is next polled; if nothing polls it (its client stopped reading, so the connection does
    /// not take more), `on_overrun` is cancelled as the events it missed are dropped.
    pub async fn subscribe(
        &self,
        name: &str,
        creator: Option<&str>,
        after: Option<ChannelPosition>,
        on_overrun: Option<CancellationToken>,
    ) -> Result<ChannelFeed, StoreError> {
        let Some(shared) = &self.0.shared else {
            let start = match after {
                None => Start::New,
                Some(ChannelPosition::Seq(seq)) => Start::AfterSeq(seq),
                Some(ChannelPosition::Entry(_)) => Start::AfterSeq(u64::MAX),
            };
            return Ok(Box::pin(self.0.channels.subscribe(name, creator, start, on_overrun)?));
        };
        if let Some(subject) = creator {
            shared.redis.channel_admit(name, subject, self.0.channel_limits).await?;
        }
        self.subscribe_shared(shared, name, after, on_overrun).await
    }

    /// Shared subscription: history from Redis, then live events as this
    /// replica's tail feeds them into the local log.
    ///
    /// History, tail and live feed meet at one id: any history ends there, the tail ingests
    /// after it and the live feed starts after it in the local log, so the hand-over has no hole
    /// (for the repeats possible when the tail is behind it, see `ChannelTail::watch`). If Redis
    /// fails on the way, the guards made so far are dropped with the error.
    async fn subscribe_shared(
        &self,
        shared: &Shared,
        name: &str,
        after: Option<ChannelPosition>,
        on_overrun: Option<CancellationToken>,
    ) -> Result<ChannelFeed, StoreError> {
        let redis = &shared.redis;
        let after = after.map(|position| match position {
            ChannelPosition::Seq(seq) => format!("{seq}-0"),
            ChannelPosition::Entry(id) => id,
        });
        let (history, start_id) = match after {
            Some(after) => {
                let (entries, gap) = redis.channel_read(name, &after, self.0.settings.channel_max_events).await?;
                let mut items = Vec::with_capacity(entries.len() + 1);
                if gap {
                    let first_id = entries.first().map(|e| e.id.clone()).unwrap_or_default();
                    items.push(ChannelItem::Gap { first_id });
                }
                let newest = entries.last().map_or(after, |e| e.id.clone());
                items.extend(
                    entries
                        .into_iter()
                        .map(|e| ChannelItem::Event(Arc::new(ChannelEvent::new(0, e.id, e.event, e.data)))),
                );
                (items, newest)
            }
            None => (Vec::new(), redis.channel_last_id(name).await?),
        };
        let tail = shared.tail.watch(name, &start_id);
        redis.count_subscriber(name, &shared.replica_id, 1).await?;
        let counted =
            CountedSubscriber { redis: redis.clone(), name: name.to_owned(), replica: shared.replica_id.clone() };
        // The local copy is uncounted: Redis admitted the channel above.
        let live = self.0.channels.subscribe(name, None, Start::AfterId(start_id), on_overrun)?;
        let guards = (tail, counted);
        Ok(Box::pin(futures_util::stream::iter(history).chain(live).map(move |item| {
            // Keeps the channel tailed and this subscriber counted while the
            // feed lives.
            let _ = &guards;
            item
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_positions_parse_in_both_forms_and_nothing_else() {
        assert_eq!(ChannelPosition::parse("42"), Some(ChannelPosition::Seq(42)));
        assert_eq!(ChannelPosition::parse("1700000000000-3"), Some(ChannelPosition::Entry("1700000000000-3".into())));
        for bad in ["", "-", "1-", "-1", "a-1", "1-2-3", "1.5", "99999999999999999999999"] {
            assert_eq!(ChannelPosition::parse(bad), None, "{bad:?}");
        }
    }
}
