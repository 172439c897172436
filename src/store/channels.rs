//! In-memory broadcast channels: each a bounded, expiring log of published
//! events that subscribers follow, so a subscriber that reconnects with
//! `Last-Event-ID` gets what it missed (within the log) and nothing twice.
//!
//! With a shared store these are the replica's local copies: Redis orders and keeps the events,
//! and the channel tail ingests them here (with their Redis ids), so live fan-out to many
//! subscribers never touches Redis per subscriber.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::redis::id_after;
use crate::sse::push_event;

/// Retention of channel logs.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChannelSettings {
    /// Events kept per channel.
    pub max_events: usize,
    /// A channel with no subscriber and no publish for this long is dropped.
    pub ttl: Duration,
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
    /// The requested position is older than the log: some events are lost.
    Gap {
        /// The id of the oldest event still kept.
        first_id: String,
    },
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
}

/// All channels of this process.
#[derive(Debug)]
pub(super) struct ChannelHub {
    channels: Mutex<HashMap<String, Arc<Channel>>>,
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

/// Counts a subscriber while it lives. Leaving stamps the channel's activity, so an idle
/// channel's TTL runs from its last subscriber's departure.
struct Subscriber(Arc<Channel>);

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::AcqRel);
        lock(&self.0.log).last_activity = Instant::now();
    }
}

impl ChannelHub {
    /// No channels yet.
    pub(super) fn new(settings: ChannelSettings) -> Arc<Self> {
        Arc::new(Self { channels: Mutex::new(HashMap::new()), settings })
    }

    /// The channel `name`, created empty on first use (by a publish, an ingest or a subscribe);
    /// the sweep forgets it again.
    fn channel(&self, name: &str) -> Arc<Channel> {
        lock(&self.channels)
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Channel {
                    log: Mutex::new(Log { events: VecDeque::new(), next_seq: 1, last_activity: Instant::now() }),
                    appended: Notify::new(),
                    subscribers: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// Publishes; returns the event's position and how many subscribers are
    /// connected to receive it (a count at that moment; each still reads at its own pace).
    pub(super) fn publish(&self, name: &str, event: Option<String>, data: String) -> (u64, usize) {
        let channel = self.channel(name);
        let seq = Self::push(&channel, self.settings.max_events, None, event, data);
        channel.appended.notify_waiters();
        (seq, channel.subscribers.load(Ordering::Acquire))
    }

    /// Adds an event read from the shared store (ids in store order).
    pub(super) fn ingest(&self, name: &str, id: String, event: Option<String>, data: String) {
        let channel = self.channel(name);
        Self::push(&channel, self.settings.max_events, Some(id), event, data);
        channel.appended.notify_waiters();
    }

    /// Appends under the log's lock and returns the position; the caller wakes subscribers
    /// after the lock is released. `id` defaults to the position (memory mode). The SSE block is
    /// encoded here, once per event, inside the lock.
    fn push(channel: &Channel, max_events: usize, id: Option<String>, event: Option<String>, data: String) -> u64 {
        {
            let mut log = lock(&channel.log);
            let seq = log.next_seq;
            log.next_seq += 1;
            let id = id.unwrap_or_else(|| seq.to_string());
            log.events.push_back(Arc::new(ChannelEvent::new(seq, id, event, data)));
            if log.events.len() > max_events.max(1) {
                log.events.pop_front();
            }
            log.last_activity = Instant::now();
            seq
        }
    }

    /// Subscribes from `start`, then follows live events; the subscriber
    /// is counted until the feed is dropped. The feed never ends by itself.
    ///
    /// A position this log never issued (`AfterSeq` at or past the next position: the channel
    /// was swept or the process restarted) is answered with a gap, as is one already dropped;
    /// after a gap the feed continues from the oldest event kept. Each look at the log takes up
    /// to 256 events under one lock, then hands them on without it.
    pub(super) fn subscribe(&self, name: &str, start: Start) -> impl Stream<Item = ChannelItem> + Send + 'static {
        let channel = self.channel(name);
        channel.subscribers.fetch_add(1, Ordering::AcqRel);
        let guard = Subscriber(channel.clone());
        let mut next = {
            let log = lock(&channel.log);
            match start {
                Start::New => log.next_seq,
                // An id from the future (the channel expired or the process
                // restarted since) is announced as a gap below.
                Start::AfterSeq(after) if after >= log.next_seq => 0,
                Start::AfterSeq(after) => after + 1,
                Start::AfterId(after) => {
                    log.events.iter().find(|e| id_after(&e.id, &after)).map_or(log.next_seq, |e| e.seq)
                }
            }
        };
        async_stream::stream! {
            let _guard = guard;
            loop {
                let appended = channel.appended.notified();
                tokio::pin!(appended);
                appended.as_mut().enable();
                let (batch, first_kept) = {
                    let log = lock(&channel.log);
                    let first_kept = log.events.front().map_or(log.next_seq, |e| e.seq);
                    // Positions are consecutive: index straight to `next`.
                    let skip = next.saturating_sub(first_kept) as usize;
                    let batch: Vec<Arc<ChannelEvent>> = log.events.iter().skip(skip).take(256).cloned().collect();
                    (batch, first_kept)
                };
                if next < first_kept {
                    let first_id = lock(&channel.log).events.front().map(|e| e.id.clone()).unwrap_or_default();
                    yield ChannelItem::Gap { first_id };
                    next = first_kept;
                    continue;
                }
                if batch.is_empty() {
                    appended.await;
                    continue;
                }
                for event in batch {
                    next = event.seq + 1;
                    yield ChannelItem::Event(event);
                }
            }
        }
    }

    /// Drops channels without subscribers and idle past the TTL.
    pub(super) fn sweep(&self) {
        let ttl = self.settings.ttl;
        lock(&self.channels)
            .retain(|_, c| c.subscribers.load(Ordering::Acquire) > 0 || lock(&c.log).last_activity.elapsed() < ttl);
    }
}
