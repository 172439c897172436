//! In-memory broadcast channels: each a bounded, expiring log of published
//! events that subscribers follow, so a subscriber that reconnects with
//! `Last-Event-ID` gets what it missed (within the log) and nothing twice.
//!
//! With a shared store these are the replica's local copies: Redis orders and keeps the events,
//! and the channel tail ingests them here (with their Redis ids), so live fan-out to many
//! subscribers never touches Redis per subscriber.
//!
//! The hub also keeps two facts the rest of the server acts on: who created each channel (so
//! that creation can be bounded per subject and in total, [`ChannelLimits`]), and where each
//! subscriber reads (so that one that falls out of the log is told, [`ChannelItem::Overrun`],
//! even while nobody polls its feed).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::redis::id_after;
use super::subscriptions::{ChannelLimits, ChannelRefused, ChannelScope};
use crate::sse::push_event;

/// Retention of channel logs, and the bounds on creating channels.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChannelSettings {
    /// Events kept per channel.
    pub max_events: usize,
    /// A channel with no subscriber and no publish for this long is dropped.
    pub ttl: Duration,
    /// Bounds on the channels subjects create here. `None` for a shared store's local copies:
    /// Redis bounds creation there, for the whole cluster.
    pub limits: Option<ChannelLimits>,
}

/// One published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelEvent {
    /// Position in this process's log of the channel (1-based). Consecutive within a log, which
    /// is what lets a subscriber index straight to its position. Events replayed as history
    /// from Redis carry 0: they are in no local log.
    pub seq: u64,
    /// The SSE id: the position in memory mode, the Redis entry id with a
    /// shared store.
    pub id: String,
    /// The SSE event name (`message` when `None`).
    pub event: Option<String>,
    /// The payload, as compact JSON text.
    pub data: String,
    /// The event's SSE block, encoded once and shared by every subscriber
    /// (fan-out costs a reference count per subscriber, not an encoding).
    pub wire: Bytes,
}

impl ChannelEvent {
    /// An event and its encoded SSE block.
    pub fn new(seq: u64, id: String, event: Option<String>, data: String) -> Self {
        let mut buf = BytesMut::with_capacity(data.len() + id.len() + 32);
        push_event(&mut buf, Some(&id), Some(event.as_deref().unwrap_or("message")), &data);
        Self { seq, id, event, data, wire: buf.freeze() }
    }
}

/// What a subscriber's feed carries (heartbeats and shutdown are added by
/// the lifecycle, [`crate::stream::follow_channel`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelItem {
    /// A published event.
    Event(Arc<ChannelEvent>),
    /// The requested position is older than the log: some events are lost. Only ever first,
    /// for a subscription that starts (resumes) before the log.
    Gap {
        /// The id of the oldest event still kept.
        first_id: String,
    },
    /// The subscriber fell so far behind that events it had not taken yet were dropped from
    /// the log. Last: the feed ends after it.
    Overrun,
}

/// One channel's retained events.
#[derive(Debug)]
struct Log {
    /// At most `max_events`, oldest first; the oldest is dropped on overflow.
    events: VecDeque<Arc<ChannelEvent>>,
    /// The position of the next event; counts dropped events too, so positions are never reused.
    next_seq: u64,
    /// The last publish, ingest or subscriber leaving: what the sweep's TTL counts from.
    last_activity: Instant,
}

/// A channel: its log, and how its subscribers learn of new events.
#[derive(Debug)]
struct Channel {
    log: Mutex<Log>,
    /// `notify_waiters` after every push: it wakes only subscribers already waiting, so a
    /// subscriber enables its `Notified` before looking at the log.
    appended: Notify,
    /// Live subscribers here: what a memory-store publish reports, and what keeps the sweep off.
    subscribers: AtomicUsize,
    /// The subject whose publish or subscribe created the channel, when creation is counted
    /// (given back to its count when the sweep drops the channel).
    creator: Option<String>,
    /// Where each subscriber reads, by subscriber key: looked at when the log drops events.
    places: Mutex<HashMap<u64, Arc<Place>>>,
    /// The next subscriber key.
    next_key: AtomicU64,
}

/// A subscriber's position as the publishing side sees it, so that a subscriber whose task is
/// not running (its client stopped reading, so nothing polls its feed) still learns it fell
/// out of the log.
#[derive(Debug)]
struct Place {
    /// The next position the subscriber takes: everything before it is in its hands.
    next: AtomicU64,
    /// Cancelled by the publishing side when it drops an event the subscriber had not taken
    /// (a subscriber whose feed is polled notices by itself, and ends).
    on_overrun: Option<CancellationToken>,
}

/// The channels, and what subjects created.
#[derive(Debug, Default)]
struct Channels {
    by_name: HashMap<String, Arc<Channel>>,
    /// Live channels each subject created (only counted ones; no entry at zero).
    created: HashMap<String, usize>,
    /// All counted channels (the sum of `created`).
    counted: usize,
}

/// All channels of this process.
#[derive(Debug)]
pub(super) struct ChannelHub {
    channels: Mutex<Channels>,
    settings: ChannelSettings,
}

/// Locks, ignoring poison, so that one task panicking while it held a lock does not turn every
/// later publish and subscribe of the process into a panic as well.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Start {
    /// Only events published from now on.
    New,
    /// After the event at this position (memory mode ids).
    AfterSeq(u64),
    /// After the event with this id (shared-store ids); events already in
    /// the local log with a later id are delivered.
    AfterId(String),
}

/// Counts a subscriber and keeps its place while it lives. Leaving stamps the channel's
/// activity, so an idle channel's TTL runs from its last subscriber's departure.
struct Subscriber {
    channel: Arc<Channel>,
    key: u64,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        lock(&self.channel.places).remove(&self.key);
        self.channel.subscribers.fetch_sub(1, Ordering::AcqRel);
        lock(&self.channel.log).last_activity = Instant::now();
    }
}

impl Channels {
    /// Whether `subject` may create one more channel under `limits`. The subject's own bound is
    /// checked first, so that one subject's excess never looks like the server being full.
    fn admits(&self, subject: &str, limits: ChannelLimits) -> Result<(), ChannelScope> {
        if self.created.get(subject).copied().unwrap_or(0) >= limits.max_per_subject {
            return Err(ChannelScope::Subject);
        }
        if self.counted >= limits.max_channels {
            return Err(ChannelScope::Total);
        }
        Ok(())
    }

    /// Drops channels without subscribers and idle for `ttl`, giving their creators' counts back.
    fn sweep(&mut self, ttl: Duration) {
        let mut freed = Vec::new();
        self.by_name.retain(|_, c| {
            let keep = c.subscribers.load(Ordering::Acquire) > 0 || lock(&c.log).last_activity.elapsed() < ttl;
            if !keep && let Some(creator) = &c.creator {
                freed.push(creator.clone());
            }
            keep
        });
        for creator in freed {
            self.counted -= 1;
            if let Some(n) = self.created.get_mut(&creator) {
                *n -= 1;
                if *n == 0 {
                    self.created.remove(&creator);
                }
            }
        }
    }
}

/// One look at a log from a subscriber's position.
enum Look {
    /// Events from the position on (up to 256).
    Events(Vec<Arc<ChannelEvent>>),
    /// Nothing new yet.
    Nothing,
    /// The position is older than the log.
    Behind,
}

impl ChannelHub {
    /// No channels yet.
    pub(super) fn new(settings: ChannelSettings) -> Arc<Self> {
        Arc::new(Self { channels: Mutex::new(Channels::default()), settings })
    }

    /// The channel `name`, created empty on first use (by a publish, an ingest or a subscribe);
    /// the sweep forgets it again. `creator` is the subject whose request this is, `None` for
    /// the server's own publishers and a shared store's local copies: only a subject's creation
    /// is bounded and counted. When a bound is reached, channels past their TTL are swept first,
    /// so that the bound counts live channels only. `subscribing` counts a subscriber under the
    /// same lock, so that the sweep cannot drop a channel between its lookup and its subscriber.
    fn channel(&self, name: &str, creator: Option<&str>, subscribing: bool) -> Result<Arc<Channel>, ChannelRefused> {
        let mut channels = lock(&self.channels);
        let channel = match channels.by_name.get(name) {
            Some(channel) => channel.clone(),
            None => {
                let counted = match (self.settings.limits, creator) {
                    (Some(limits), Some(subject)) => {
                        if channels.admits(subject, limits).is_err() {
                            channels.sweep(self.settings.ttl);
                        }
                        channels.admits(subject, limits).map_err(|scope| self.refused(scope, limits))?;
                        channels.counted += 1;
                        *channels.created.entry(subject.to_owned()).or_default() += 1;
                        Some(subject.to_owned())
                    }
                    _ => None,
                };
                let channel = Arc::new(Channel {
                    log: Mutex::new(Log { events: VecDeque::new(), next_seq: 1, last_activity: Instant::now() }),
                    appended: Notify::new(),
                    subscribers: AtomicUsize::new(0),
                    creator: counted,
                    places: Mutex::new(HashMap::new()),
                    next_key: AtomicU64::new(0),
                });
                channels.by_name.insert(name.to_owned(), channel.clone());
                channel
            }
        };
        if subscribing {
            channel.subscribers.fetch_add(1, Ordering::AcqRel);
        }
        Ok(channel)
    }

    /// The refusal for a bound reached.
    fn refused(&self, scope: ChannelScope, limits: ChannelLimits) -> ChannelRefused {
        let limit = match scope {
            ChannelScope::Total => limits.max_channels,
            ChannelScope::Subject => limits.max_per_subject,
        };
        ChannelRefused { scope, limit, retry_after: self.settings.ttl }
    }

    /// Publishes on behalf of `creator` (see [`Self::channel`]); returns the event's position
    /// and how many subscribers are connected to receive it (a count at that moment; each still
    /// reads at its own pace).
    pub(super) fn publish(
        &self,
        name: &str,
        creator: Option<&str>,
        event: Option<String>,
        data: String,
    ) -> Result<(u64, usize), ChannelRefused> {
        let channel = self.channel(name, creator, false)?;
        let seq = self.push(&channel, None, event, data);
        Ok((seq, channel.subscribers.load(Ordering::Acquire)))
    }

    /// Adds an event read from the shared store (ids in store order).
    pub(super) fn ingest(&self, name: &str, id: String, event: Option<String>, data: String) {
        // Uncounted (no creator), so never refused.
        if let Ok(channel) = self.channel(name, None, false) {
            self.push(&channel, Some(id), event, data);
        }
    }

    /// Appends under the log's lock, wakes the subscribers waiting, and tells those whose next
    /// event fell out of the log; returns the position. `id` defaults to the position (memory
    /// mode). The SSE block is encoded here, once per event, inside the lock.
    ///
    /// Telling is a look at every subscriber's place, so it is done every `max_events / 8`
    /// dropped events rather than on each: a subscriber is told at most that many events late.
    fn push(&self, channel: &Channel, id: Option<String>, event: Option<String>, data: String) -> u64 {
        let max_events = self.settings.max_events.max(1);
        let (seq, dropped) = {
            let mut log = lock(&channel.log);
            let seq = log.next_seq;
            log.next_seq += 1;
            let id = id.unwrap_or_else(|| seq.to_string());
            log.events.push_back(Arc::new(ChannelEvent::new(seq, id, event, data)));
            let dropped = if log.events.len() > max_events { log.events.pop_front().map(|e| e.seq) } else { None };
            log.last_activity = Instant::now();
            (seq, dropped)
        };
        channel.appended.notify_waiters();
        let stride = (max_events as u64 / 8).max(1);
        if let Some(dropped) = dropped.filter(|d| d % stride == 0) {
            for place in lock(&channel.places).values() {
                if place.next.load(Ordering::Acquire) <= dropped
                    && let Some(token) = &place.on_overrun
                {
                    token.cancel();
                }
            }
        }
        seq
    }

    /// A subscriber's look at the log from `next`.
    fn look(channel: &Channel, next: u64) -> Look {
        let log = lock(&channel.log);
        let first_kept = log.events.front().map_or(log.next_seq, |e| e.seq);
        if next < first_kept {
            return Look::Behind;
        }
        // Positions are consecutive: index straight to `next`.
        let skip = (next - first_kept) as usize;
        let batch: Vec<Arc<ChannelEvent>> = log.events.iter().skip(skip).take(256).cloned().collect();
        if batch.is_empty() { Look::Nothing } else { Look::Events(batch) }
    }

    /// Subscribes from `start` on behalf of `creator` (see [`Self::channel`]), then follows
    /// live events; the subscriber is counted until the feed is dropped.
    ///
    /// A position this log never issued (`AfterSeq` at or past the next position: the channel
    /// was swept or the process restarted) is answered with a gap, as is one already dropped;
    /// after a gap the feed continues from the oldest event kept. A subscriber that later falls
    /// out of the log gets [`ChannelItem::Overrun`] when it next looks, and its feed ends; if it
    /// is not looking (nothing polls its feed), the publishing side cancels `on_overrun` when it
    /// drops the events. Otherwise the feed never ends by itself. Each look at the log takes up to 256 events
    /// under one lock, then hands them on without it.
    pub(super) fn subscribe(
        &self,
        name: &str,
        creator: Option<&str>,
        start: Start,
        on_overrun: Option<CancellationToken>,
    ) -> Result<impl Stream<Item = ChannelItem> + Send + 'static, ChannelRefused> {
        let channel = self.channel(name, creator, true)?;
        let (mut next, gap) = {
            let log = lock(&channel.log);
            let first_kept = log.events.front().map_or(log.next_seq, |e| e.seq);
            let next = match start {
                Start::New => log.next_seq,
                // An id from the future (the channel expired or the process
                // restarted since) is announced as a gap.
                Start::AfterSeq(after) if after >= log.next_seq => 0,
                Start::AfterSeq(after) => after + 1,
                Start::AfterId(after) => {
                    log.events.iter().find(|e| id_after(&e.id, &after)).map_or(log.next_seq, |e| e.seq)
                }
            };
            if next < first_kept {
                let first_id = log.events.front().map(|e| e.id.clone()).unwrap_or_default();
                (first_kept, Some(first_id))
            } else {
                (next, None)
            }
        };
        let place = Arc::new(Place { next: AtomicU64::new(next), on_overrun });
        let key = channel.next_key.fetch_add(1, Ordering::Relaxed);
        lock(&channel.places).insert(key, place.clone());
        let guard = Subscriber { channel: channel.clone(), key };
        Ok(async_stream::stream! {
            let _guard = guard;
            if let Some(first_id) = gap {
                yield ChannelItem::Gap { first_id };
            }
            loop {
                let appended = channel.appended.notified();
                tokio::pin!(appended);
                appended.as_mut().enable();
                match Self::look(&channel, next) {
                    // Noticed here first: the feed ends itself, and its
                    // connection stays up to carry the news (the publishing
                    // side no longer looks at this place).
                    Look::Behind => {
                        lock(&channel.places).remove(&key);
                        yield ChannelItem::Overrun;
                        return;
                    }
                    Look::Nothing => appended.await,
                    Look::Events(batch) => {
                        // The batch is in hand: dropping those events from the log loses nothing.
                        next = batch.last().map_or(next, |e| e.seq + 1);
                        place.next.store(next, Ordering::Release);
                        for event in batch {
                            yield ChannelItem::Event(event);
                        }
                    }
                }
            }
        })
    }

    /// Drops channels without subscribers and idle past the TTL; what their creators had
    /// created counts no more.
    pub(super) fn sweep(&self) {
        lock(&self.channels).sweep(self.settings.ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn hub(max_events: usize, limits: Option<ChannelLimits>) -> Arc<ChannelHub> {
        ChannelHub::new(ChannelSettings { max_events, ttl: Duration::from_secs(60), limits })
    }

    const TWO_EACH_THREE_IN_ALL: ChannelLimits = ChannelLimits { max_channels: 3, max_per_subject: 2 };

    fn publish(hub: &ChannelHub, name: &str, by: Option<&str>) -> Result<u64, ChannelScope> {
        hub.publish(name, by, None, "1".into()).map(|(seq, _)| seq).map_err(|r| r.scope)
    }

    #[test]
    fn creation_is_bounded_per_subject_and_in_total_and_existing_channels_stay_usable() {
        let hub = hub(10, Some(TWO_EACH_THREE_IN_ALL));
        assert_eq!(publish(&hub, "a1", Some("alice")), Ok(1));
        assert!(hub.subscribe("a2", Some("alice"), Start::New, None).is_ok());
        assert_eq!(publish(&hub, "a3", Some("alice")), Err(ChannelScope::Subject));
        assert_eq!(
            hub.subscribe("a3", Some("alice"), Start::New, None).err().map(|r| r.scope),
            Some(ChannelScope::Subject)
        );
        // Existing channels: anyone, uncharged.
        assert_eq!(publish(&hub, "a1", Some("alice")), Ok(2));
        assert_eq!(publish(&hub, "a2", Some("bob")), Ok(1));
        assert_eq!(publish(&hub, "b1", Some("bob")), Ok(1));
        assert_eq!(publish(&hub, "c1", Some("carol")), Err(ChannelScope::Total));
        // Both reached: the subject's own bound is the answer.
        assert_eq!(publish(&hub, "a4", Some("alice")), Err(ChannelScope::Subject));
        assert_eq!(publish(&hub, "a1", Some("carol")), Ok(3));
        // The server's own publishers are not counted, nor refused.
        assert_eq!(publish(&hub, "demo.clock", None), Ok(1));
        let refused = hub.publish("c1", Some("carol"), None, "1".into()).err();
        assert_eq!(refused.map(|r| (r.limit, r.retry_after)), Some((3, Duration::from_secs(60))));
    }

    #[test]
    fn a_hub_without_limits_counts_nothing() {
        let hub = hub(10, None);
        for i in 0..50 {
            assert!(publish(&hub, &format!("c{i}"), Some("alice")).is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_swept_channel_frees_its_creators_slot_and_a_subscribed_one_is_kept() {
        let hub = hub(10, Some(ChannelLimits { max_channels: 10, max_per_subject: 2 }));
        let held = hub.subscribe("held", Some("alice"), Start::New, None).ok();
        assert_eq!(publish(&hub, "idle", Some("alice")), Ok(1));
        assert_eq!(publish(&hub, "third", Some("alice")), Err(ChannelScope::Subject));
        tokio::time::advance(Duration::from_secs(61)).await;
        // Not swept yet by the timer, but a refusal sweeps first: `idle` is gone,
        // `held` (subscribed) stays counted.
        assert_eq!(publish(&hub, "third", Some("alice")), Ok(1));
        assert_eq!(publish(&hub, "fourth", Some("alice")), Err(ChannelScope::Subject));
        drop(held);
        tokio::time::advance(Duration::from_secs(61)).await;
        hub.sweep();
        assert_eq!(lock(&hub.channels).created.get("alice"), None);
        assert_eq!(lock(&hub.channels).counted, 0);
        assert_eq!(publish(&hub, "fourth", Some("alice")), Ok(1));
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_out_of_the_log_is_told_even_unpolled_and_its_feed_ends() {
        let hub = hub(8, None);
        let overrun = CancellationToken::new();
        let slow = hub.subscribe("room", None, Start::New, Some(overrun.clone())).ok();
        let fast = hub.subscribe("room", None, Start::New, Some(CancellationToken::new())).ok();
        let (Some(slow), Some(fast)) = (slow, fast) else { panic!("subscribe refused") };
        tokio::pin!(slow);
        tokio::pin!(fast);
        for i in 1..=8 {
            hub.publish("room", None, None, i.to_string()).ok();
            assert!(matches!(fast.next().await, Some(ChannelItem::Event(e)) if e.seq == i));
        }
        assert!(!overrun.is_cancelled(), "the log still holds everything");
        // The 9th drops event 1, which `slow` never took (nothing polled it).
        hub.publish("room", None, None, "9".into()).ok();
        assert!(overrun.is_cancelled(), "told by the publishing side");
        assert_eq!(slow.next().await, Some(ChannelItem::Overrun));
        assert_eq!(slow.next().await, None);
        assert!(matches!(fast.next().await, Some(ChannelItem::Event(e)) if e.seq == 9));
    }

    #[tokio::test]
    async fn a_resume_from_before_the_log_is_a_gap_not_an_overrun() {
        let hub = hub(3, None);
        for i in 1..=6 {
            hub.publish("room", None, None, i.to_string()).ok();
        }
        let overrun = CancellationToken::new();
        let Ok(feed) = hub.subscribe("room", None, Start::AfterSeq(1), Some(overrun.clone())) else { panic!() };
        tokio::pin!(feed);
        assert_eq!(feed.next().await, Some(ChannelItem::Gap { first_id: "4".into() }));
        for seq in 4..=6 {
            assert!(matches!(feed.next().await, Some(ChannelItem::Event(e)) if e.seq == seq));
        }
        hub.publish("room", None, None, "7".into()).ok();
        assert!(matches!(feed.next().await, Some(ChannelItem::Event(e)) if e.seq == 7));
        assert!(!overrun.is_cancelled());
    }
}
