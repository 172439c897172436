//! In-memory broadcast channels: each a bounded, expiring log of published
//! events that subscribers follow, so a subscriber that reconnects with
//! `Last-Event-ID` gets what it missed (within the log) and nothing twice.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

/// Retention of channel logs.
#[derive(Debug, Clone, Copy)]
pub struct ChannelSettings {
    /// Events kept per channel.
    pub max_events: usize,
    /// A channel with no subscriber and no publish for this long is dropped.
    pub ttl: Duration,
}

/// One published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelEvent {
    /// Position in the channel (1-based); the SSE id.
    pub seq: u64,
    /// The SSE event name (`message` when `None`).
    pub event: Option<String>,
    /// The payload, as compact JSON text.
    pub data: String,
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    /// A published event.
    Event(Arc<ChannelEvent>),
    /// The requested position is older than the log: some events are lost.
    Gap {
        /// The oldest position still kept.
        first_kept: u64,
    },
    /// Nothing happened for a while.
    Heartbeat,
    /// The server is going away.
    Shutdown,
}

#[derive(Debug)]
struct Log {
    events: VecDeque<Arc<ChannelEvent>>,
    next_seq: u64,
    last_activity: Instant,
}

#[derive(Debug)]
struct Channel {
    log: Mutex<Log>,
    appended: Notify,
    subscribers: AtomicUsize,
}

/// All channels of this process.
#[derive(Debug)]
pub struct ChannelHub {
    channels: Mutex<HashMap<String, Arc<Channel>>>,
    settings: ChannelSettings,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts a subscriber while it lives.
struct Subscriber(Arc<Channel>);

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::AcqRel);
        lock(&self.0.log).last_activity = Instant::now();
    }
}

impl ChannelHub {
    /// No channels yet.
    pub fn new(settings: ChannelSettings) -> Arc<Self> {
        Arc::new(Self {
            channels: Mutex::new(HashMap::new()),
            settings,
        })
    }

    fn channel(&self, name: &str) -> Arc<Channel> {
        lock(&self.channels)
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Channel {
                    log: Mutex::new(Log {
                        events: VecDeque::new(),
                        next_seq: 1,
                        last_activity: Instant::now(),
                    }),
                    appended: Notify::new(),
                    subscribers: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// Publishes; returns the event's position and how many subscribers are
    /// connected to receive it.
    pub fn publish(&self, name: &str, event: Option<String>, data: String) -> (u64, usize) {
        let channel = self.channel(name);
        let seq = {
            let mut log = lock(&channel.log);
            let seq = log.next_seq;
            log.next_seq += 1;
            log.events.push_back(Arc::new(ChannelEvent { seq, event, data }));
            if log.events.len() > self.settings.max_events.max(1) {
                log.events.pop_front();
            }
            log.last_activity = Instant::now();
            seq
        };
        channel.appended.notify_waiters();
        (seq, channel.subscribers.load(Ordering::Acquire))
    }

    /// Subscribes: events after position `after` (all retained history when
    /// `Some(0)`, only new ones when `None`), then live ones.
    pub fn subscribe(
        &self,
        name: &str,
        after: Option<u64>,
        heartbeat: Duration,
        closing: CancellationToken,
    ) -> impl Stream<Item = Subscription> + Send + 'static {
        let channel = self.channel(name);
        channel.subscribers.fetch_add(1, Ordering::AcqRel);
        let guard = Subscriber(channel.clone());
        let mut next = after.map_or_else(|| lock(&channel.log).next_seq, |a| a + 1);
        async_stream::stream! {
            let _guard = guard;
            loop {
                if closing.is_cancelled() {
                    yield Subscription::Shutdown;
                    return;
                }
                let appended = channel.appended.notified();
                tokio::pin!(appended);
                appended.as_mut().enable();
                let (batch, first_kept) = {
                    let log = lock(&channel.log);
                    let first_kept = log.events.front().map_or(log.next_seq, |e| e.seq);
                    let batch: Vec<Arc<ChannelEvent>> = log.events.iter().filter(|e| e.seq >= next).take(256).cloned().collect();
                    (batch, first_kept)
                };
                if next < first_kept {
                    yield Subscription::Gap { first_kept };
                    next = first_kept;
                    continue;
                }
                if batch.is_empty() {
                    tokio::select! {
                        biased;
                        () = closing.cancelled() => {}
                        () = &mut appended => {}
                        () = sleep(heartbeat) => yield Subscription::Heartbeat,
                    }
                    continue;
                }
                for event in batch {
                    next = event.seq + 1;
                    yield Subscription::Event(event);
                }
            }
        }
    }

    /// Channels held.
    pub fn len(&self) -> usize {
        lock(&self.channels).len()
    }

    /// True when no channel is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops channels without subscribers and idle past the TTL.
    pub fn sweep(&self) {
        let ttl = self.settings.ttl;
        lock(&self.channels)
            .retain(|_, c| c.subscribers.load(Ordering::Acquire) > 0 || lock(&c.log).last_activity.elapsed() < ttl);
    }
}
