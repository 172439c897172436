//! Where events live between the task that produces them and the readers
//! that deliver them: per-stream event logs (for resume after a dropped
//! connection) and per-channel logs (broadcast with history).
//!
//! [`Store`] is the one handle the rest of the server uses. It keeps
//! events and says when new ones arrive; it holds no policy (backpressure,
//! detach grace, heartbeats and shutdown are the lifecycle's, in
//! [`crate::stream`]). Which store runs is its own business:
//! - in memory (the default): [`LiveStream`] logs that the producer
//!   appends to and readers here follow;
//! - shared (`--redis-url`): the same local logs, each also replicated to
//!   Redis, so readers on other replicas follow it there; cancels reach
//!   the producing replica over pub/sub; channels are published through
//!   Redis and fanned out locally by one tail per replica; cluster-wide
//!   limits get atomic operations ([`LimitStore`]). The Redis keys are
//!   named in one place, `store/keys.rs`.
//!
//! A reader's position in any log is a [`Cursor`]; the producer's handle
//! is a [`StreamWriter`].
//!
//! It also keeps stream tickets (in memory, or in Redis so that a ticket is
//! used once across replicas), as opaque entries whose first use is
//! decided atomically; see [`Store::take_ticket`].

mod channels;
mod chats;
mod compact;
mod cursor;
mod keys;
mod memory;
mod quotas;
mod redis;
mod remote;
mod shared_limits;
mod subscriptions;
mod tickets;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use self::channels::ChannelHub;
use self::chats::ChatIndex;
use self::memory::StreamHub;
use self::quotas::QuotaCounters;
use self::redis::{ChannelTail, RedisSettings, RedisStore, Replication, StreamFollower};
use self::tickets::TicketTable;
use crate::event::StreamId;

pub use channels::{ChannelEvent, ChannelItem};
pub use cursor::{Cursor, Read};
pub use memory::{Attachment, Flow, LiveStream, Reader};
pub use quotas::QuotaCounter;
pub use remote::RemoteCursor;
pub use shared_limits::{LimitStore, RateKey};
pub use subscriptions::{ChannelFeed, ChannelLimits, ChannelPosition, ChannelRefused, ChannelScope, Published};
pub use writer::StreamWriter;

/// How long a resume ahead of Redis waits for the producer's replication
/// (which sends every `replication_window`, 50 ms by default, at most 1 s):
/// at most 50 polls of 20 ms. A
/// producer that died meanwhile leaves the log short, and the remote
/// cursor then says `generator_lost`.
const CATCH_UP_POLLS: usize = 50;
/// See [`CATCH_UP_POLLS`].
const CATCH_UP_POLL: Duration = Duration::from_millis(20);

/// How often Redis health is probed (feeds `/readyz` and admission).
const REDIS_PROBE_EVERY: Duration = Duration::from_millis(500);

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The shared store failed (the detail never carries its URL).
    #[error("redis: {0}")]
    Redis(String),
    /// The operation would have created a channel beyond a bound on channels; nothing was
    /// created or published.
    #[error(transparent)]
    TooManyChannels(#[from] ChannelRefused),
}

impl StoreError {
    fn new(detail: String) -> Self {
        Self::Redis(detail)
    }
}

/// Retention of stream and channel logs.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    /// Events kept per stream; resuming before them is a `resume_gap`.
    pub stream_max_events: usize,
    /// With Redis, the longest a produced event waits before it is sent
    /// (the replica's writer sends all its streams' events together).
    pub replication_window: Duration,
    /// How long a finished stream stays resumable.
    pub stream_ttl: Duration,
    /// Events kept per channel.
    pub channel_max_events: usize,
    /// How long a channel without subscribers or publishes is kept.
    pub channel_ttl: Duration,
}

/// A stream that exists somewhere, with its owner (the caller's right to
/// it is the stream service's to decide).
#[derive(Debug)]
pub struct Located {
    /// The stream's id.
    pub id: StreamId,
    /// The subject that created it.
    pub owner: String,
    place: Place,
}

#[derive(Debug)]
enum Place {
    /// Produced by this process.
    Local(Arc<LiveStream>),
    /// Produced by another replica; readable through the shared store.
    Remote,
}

/// The one store handle: memory, or memory plus Redis. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    streams: Arc<StreamHub>,
    channels: Arc<ChannelHub>,
    /// UI chats' current streams (with Redis, Redis holds the binding
    /// every replica reads).
    chats: ChatIndex,
    /// Quota counters (with Redis, Redis holds them for every replica).
    quotas: QuotaCounters,
    /// Stream tickets (unused with Redis, which holds them then).
    tickets: TicketTable,
    settings: StoreSettings,
    /// Bounds on creating channels (enforced by the hub in memory, by Redis when shared).
    channel_limits: ChannelLimits,
    shared: Option<Shared>,
}

/// The parts that exist only with a shared store.
#[derive(Debug)]
struct Shared {
    redis: Arc<RedisStore>,
    tail: Arc<ChannelTail>,
    /// Follows, for every remote reader here, the streams they read.
    follower: Arc<StreamFollower>,
    /// Writes the streams produced here to Redis and keeps their leases.
    replication: Arc<Replication>,
    /// This process's id among replicas (random per start).
    replica_id: String,
}

impl Store {
    /// An in-memory store: streams and channels live in this process. Channel creation is not
    /// bounded (for embedding and unit tests; see [`Store::memory_with_limits`]).
    pub fn memory(settings: StoreSettings) -> Self {
        Self::with(settings, ChannelLimits::UNBOUNDED, None)
    }

    /// An in-memory store whose channel creation is bounded by `limits`.
    pub fn memory_with_limits(settings: StoreSettings, limits: ChannelLimits) -> Self {
        Self::with(settings, limits, None)
    }

    /// A shared store on the Redis at `url`, its channel creation bounded by `limits` for the
    /// whole cluster. Connects lazily: the server may start before Redis is up (it is not ready
    /// meanwhile). With `rediss://`, the server's certificate must chain to `ca` (PEM) when
    /// given, else to the system roots.
    pub fn shared(
        url: &str,
        ca: Option<&[u8]>,
        settings: StoreSettings,
        limits: ChannelLimits,
    ) -> Result<Self, StoreError> {
        let redis = RedisStore::connect(
            url,
            ca,
            RedisSettings {
                stream_max_events: settings.stream_max_events,
                stream_ttl: settings.stream_ttl,
                channel_max_events: settings.channel_max_events,
                channel_ttl: settings.channel_ttl,
            },
        )?;
        Ok(Self::with(settings, limits, Some(redis)))
    }

    fn with(settings: StoreSettings, channel_limits: ChannelLimits, redis: Option<Arc<RedisStore>>) -> Self {
        let streams =
            StreamHub::new(memory::HubSettings { max_events: settings.stream_max_events, ttl: settings.stream_ttl });
        let channels = ChannelHub::new(channels::ChannelSettings {
            max_events: settings.channel_max_events,
            ttl: settings.channel_ttl,
            // With Redis, Redis bounds creation for the cluster; the local copies are not counted.
            limits: redis.is_none().then_some(channel_limits),
        });
        let shared = redis.map(|redis| Shared {
            tail: ChannelTail::new(redis.clone(), channels.clone()),
            follower: StreamFollower::new(redis.clone()),
            replication: Replication::new(redis.clone(), settings.replication_window),
            redis,
            replica_id: StreamId::random().map(|id| id.to_string()).unwrap_or_else(|_| "replica".to_owned()),
        });
        Self(Arc::new(Inner {
            streams,
            channels,
            chats: ChatIndex::default(),
            quotas: QuotaCounters::default(),
            tickets: TicketTable::default(),
            settings,
            channel_limits,
            shared,
        }))
    }

    /// Whether new streams and subscriptions can be served: always in
    /// memory; with Redis, while it answers and cancels are heard.
    pub fn is_healthy(&self) -> bool {
        self.0.shared.as_ref().is_none_or(|s| s.redis.is_healthy())
    }

    /// The operations cluster-wide limits run on, with a shared store;
    /// `None` in memory (limits then stay per process).
    pub fn limit_store(&self) -> Option<LimitStore> {
        self.0.shared.as_ref().map(|s| LimitStore(s.redis.clone()))
    }

    /// Starts what a shared store runs in the background until `stop`: the
    /// health probe, the cancel and attach listener, the channel tail, the
    /// stream follower, and the writer that replicates local streams (which
    /// goes on after `stop` until the last of them has ended). Without it,
    /// nothing produced here reaches Redis.
    pub fn spawn_background(&self, stop: &CancellationToken) {
        if let Some(shared) = &self.0.shared {
            tokio::spawn(shared.redis.clone().probe(REDIS_PROBE_EVERY, stop.clone()));
            tokio::spawn(shared.redis.clone().listen_for_cancels(self.0.streams.clone(), stop.clone()));
            tokio::spawn(shared.tail.clone().run(stop.clone()));
            tokio::spawn(shared.follower.clone().run(stop.clone()));
            tokio::spawn(shared.replication.clone().run(stop.clone()));
        }
    }

    /// Forgets expired streams and unused channels (called periodically).
    pub fn sweep(&self) {
        self.0.streams.sweep();
        self.0.channels.sweep();
        let streams = &self.0.streams;
        self.0.chats.sweep(|id| streams.get(id).is_some());
        self.0.quotas.sweep();
        self.0.tickets.sweep();
    }

    /// Streams produced by this process and still retained.
    pub fn local_streams(&self) -> usize {
        self.0.streams.len()
    }

    /// Records a new stream owned by `owner` and attaches its first reader
    /// at the start, before anything is produced (so it never looks
    /// abandoned). The stream's stop token is a child of `closing`.
    pub async fn create(
        &self,
        id: StreamId,
        owner: &str,
        generator: &str,
        closing: &CancellationToken,
    ) -> Result<(StreamWriter, Cursor), StoreError> {
        if let Some(shared) = &self.0.shared {
            shared.redis.create_stream(&id, owner, generator).await?;
        }
        let log = self.0.streams.create(id, owner, generator, closing);
        let replicator =
            self.0.shared.as_ref().map(|s| s.replication.start(log.clone(), self.0.settings.stream_max_events));
        let reader = log.attach(0);
        Ok((StreamWriter::new(log, replicator), Cursor::Local(reader)))
    }

    /// Where stream `id` is, if any store still holds it.
    pub async fn locate(&self, id: &StreamId) -> Result<Option<Located>, StoreError> {
        if let Some(log) = self.0.streams.get(id) {
            return Ok(Some(Located { id: *id, owner: log.owner.clone(), place: Place::Local(log) }));
        }
        let Some(shared) = &self.0.shared else { return Ok(None) };
        Ok(shared.redis.meta(id).await?.map(|meta| Located { id: *id, owner: meta.owner, place: Place::Remote }))
    }

    /// A reader of a located stream from sequence `from` on; `None` when
    /// the stream is finished and the reader has seen all of it.
    pub async fn cursor(&self, located: &Located, from: u64) -> Result<Option<Cursor>, StoreError> {
        match &located.place {
            Place::Local(log) => {
                // The client may be ahead of this log: with Redis, a
                // terminal event reaches Redis (and readers elsewhere)
                // before it is logged here. Wait for it, so that a resume
                // after it is told "complete".
                for _ in 0..CATCH_UP_POLLS {
                    if from <= log.next_seq() || log.is_finished() {
                        break;
                    }
                    tokio::time::sleep(CATCH_UP_POLL / 4).await;
                }
                Ok((!log.is_complete_at(from)).then(|| Cursor::Local(log.attach(from))))
            }
            Place::Remote => {
                let Some(shared) = &self.0.shared else { return Ok(None) };
                // A client that saw more than Redis holds yet (it read the
                // producer's replica directly, which replicates a moment
                // later) waits for Redis to catch up, so that a resume after
                // the terminal event is told "complete" (204), not answered
                // with a stream the producer is just leaving.
                for _ in 0..CATCH_UP_POLLS {
                    match shared.redis.last_event(&located.id).await? {
                        Some((last, true)) if from > last => return Ok(None),
                        Some((last, false)) if from > last + 1 => tokio::time::sleep(CATCH_UP_POLL).await,
                        _ => break,
                    }
                }
                let follower = shared.follower.clone();
                Ok(Some(Cursor::Remote(RemoteCursor::new(shared.redis.clone(), follower, located.id, from))))
            }
        }
    }

    /// Whether a located stream has ended (its terminal event is logged).
    pub async fn is_finished(&self, located: &Located) -> Result<bool, StoreError> {
        match &located.place {
            Place::Local(log) => Ok(log.is_finished()),
            Place::Remote => {
                let Some(shared) = &self.0.shared else { return Ok(true) };
                Ok(matches!(shared.redis.last_event(&located.id).await?, Some((_, true))))
            }
        }
    }

    /// Records stream `id` as the one answering `owner`'s chat `chat` now
    /// (replacing the chat's earlier stream).
    pub async fn bind_chat(&self, owner: &str, chat: &str, id: StreamId) -> Result<(), StoreError> {
        if let Some(shared) = &self.0.shared {
            shared.redis.bind_chat(owner, chat, &id).await?;
        }
        self.0.chats.bind(owner, chat, id);
        Ok(())
    }

    /// The stream last bound to `owner`'s chat `chat`, if the binding is
    /// still kept. With Redis, Redis answers: another replica may have
    /// opened the chat's newest stream.
    pub async fn chat_stream(&self, owner: &str, chat: &str) -> Result<Option<StreamId>, StoreError> {
        match &self.0.shared {
            Some(shared) => shared.redis.chat_stream(owner, chat).await,
            None => Ok(self.0.chats.get(owner, chat)),
        }
    }

    /// Whether this replica holds the cluster-wide duty `role` for the
    /// next `ttl` (taking or renewing its lease). Without Redis there is
    /// one replica, and it always does.
    pub async fn lead(&self, role: &str, ttl: Duration) -> Result<bool, StoreError> {
        match &self.0.shared {
            Some(shared) => shared.redis.lead(role, &shared.replica_id, ttl).await,
            None => Ok(true),
        }
    }

    /// Grants up to `want` on all of `subject`'s `counters` at once (as
    /// much as the fullest has room for, added to each): a quota
    /// reservation. Atomic across replicas with Redis.
    pub async fn quota_reserve(&self, subject: &str, counters: &[QuotaCounter], want: u64) -> Result<u64, StoreError> {
        match &self.0.shared {
            Some(shared) => shared.redis.quota_reserve(subject, counters, want).await,
            None => Ok(self.0.quotas.reserve(subject, counters, want)),
        }
    }

    /// Adds `n` to the counters whatever their limits (use that is only
    /// known after the fact, such as model tokens); true when one is now
    /// full.
    pub async fn quota_add(&self, subject: &str, counters: &[QuotaCounter], n: u64) -> Result<bool, StoreError> {
        match &self.0.shared {
            Some(shared) => shared.redis.quota_add(subject, counters, n).await,
            None => Ok(self.0.quotas.add(subject, counters, n)),
        }
    }

    /// Gives back `n` of a reservation that went unused.
    pub async fn quota_release(&self, subject: &str, counters: &[QuotaCounter], n: u64) -> Result<(), StoreError> {
        match &self.0.shared {
            Some(shared) => shared.redis.quota_release(subject, counters, n).await,
            None => {
                self.0.quotas.release(subject, counters, n);
                Ok(())
            }
        }
    }

    /// Each counter's use, in order.
    pub async fn quota_used(&self, subject: &str, counters: &[QuotaCounter]) -> Result<Vec<u64>, StoreError> {
        match &self.0.shared {
            Some(shared) => shared.redis.quota_used(subject, counters).await,
            None => Ok(self.0.quotas.used(subject, counters)),
        }
    }

    /// Cancels a located stream on whichever replica produces it.
    pub async fn cancel(&self, located: &Located) -> Result<(), StoreError> {
        match &located.place {
            Place::Local(log) => log.cancel(),
            Place::Remote => {
                if let Some(shared) = &self.0.shared {
                    shared.redis.publish_cancel(&located.id).await?;
                }
            }
        }
        Ok(())
    }
}

/// A stream ticket as [`Store::take_ticket`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenTicket {
    /// What the ticket grants, as issued.
    pub record: String,
    /// Its first use (this take's, if `first`).
    pub first_use: String,
    /// What its first use opened, once that was recorded.
    pub binding: Option<String>,
    /// True for exactly one take of each ticket, across replicas.
    pub first: bool,
}

// Stream tickets. The store keeps their entries as text and decides one
// thing: which take is a ticket's first use, atomically (with Redis, in one
// script, across replicas). What the entries mean is `crate::tickets`'s.
impl Store {
    /// Records a new ticket under `key` (its digest) for `ttl`. False when
    /// the in-memory table is full.
    pub async fn issue_ticket(&self, key: &str, record: String, ttl: Duration) -> Result<bool, StoreError> {
        match &self.0.shared {
            Some(shared) => shared.redis.issue_ticket(key, &record, ttl.as_millis().max(1) as u64).await.map(|()| true),
            None => Ok(self.0.tickets.issue(key, record, ttl)),
        }
    }

    /// The ticket under `key`, if it exists. If it was never used, it is
    /// marked used by `first_use` and kept `keep` from now; of any number of
    /// concurrent takes, exactly one sees `first`.
    pub async fn take_ticket(
        &self,
        key: &str,
        first_use: String,
        keep: Duration,
    ) -> Result<Option<TakenTicket>, StoreError> {
        match &self.0.shared {
            Some(shared) => shared.redis.take_ticket(key, &first_use, keep.as_millis().max(1) as u64).await,
            None => Ok(self.0.tickets.take(key, first_use, keep)),
        }
    }

    /// Records what the ticket's first use opened; an existing binding is
    /// kept.
    pub async fn bind_ticket(&self, key: &str, binding: String) -> Result<(), StoreError> {
        match &self.0.shared {
            Some(shared) => shared.redis.bind_ticket(key, &binding).await,
            None => {
                self.0.tickets.bind(key, binding);
                Ok(())
            }
        }
    }
}
