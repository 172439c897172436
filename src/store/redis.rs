//! The shared store: stream logs, leases, cancels and channels in Redis, so
//! that several replicas serve the same streams and channels.
//!
//! Data model (all keys under the `tg:` prefix, all with TTLs):
//! - `tg:s:{id}`: the stream's events, a Redis Stream with entry ids
//!   `0-{seq+1}` (so `XRANGE` by sequence number is exact), trimmed with
//!   `MAXLEN ~`; `tg:m:{id}`: a hash with owner and generator.
//! - `tg:l:{id}`: the producer's lease, refreshed every second while it
//!   runs; a stream that is neither finished nor leased lost its generator
//!   (its replica died).
//! - `tg:cancel`: a pub/sub channel; `DELETE` on any replica reaches the
//!   one producing the stream.
//! - `tg:c:{name}`: a channel's events, a Redis Stream (its ids are the SSE
//!   ids); each replica tails the channels its subscribers follow.
//!
//! Every command has a response timeout, so a Redis outage fails requests
//! quickly instead of hanging them; the connection manager reconnects by
//! itself, and a health probe feeds `/readyz`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, RedisError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::StreamHub;
use crate::generator::Usage;
use crate::stream::{FinishReason, StreamEvent, StreamId};

/// How long a producer's lease lives without a refresh.
pub(super) const LEASE: Duration = Duration::from_secs(3);
/// How often a producer refreshes its lease.
const LEASE_REFRESH: Duration = Duration::from_secs(1);
/// How long a remote reader's announcement lasts (renewed every second).
pub const REMOTE_READER: Duration = Duration::from_secs(3);
/// Longest any Redis command may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often readers on other replicas poll a stream that has no news.
pub(super) const REMOTE_POLL: Duration = Duration::from_millis(25);

/// A failure talking to Redis.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct StoreError(String);

impl From<RedisError> for StoreError {
    fn from(e: RedisError) -> Self {
        // Only the kind and text; never the URL (it may hold a password).
        StoreError(format!("{:?}: {}", e.kind(), e.detail().unwrap_or("request failed")))
    }
}

/// Retention in Redis.
#[derive(Debug, Clone, Copy)]
pub struct RedisSettings {
    /// Events kept per stream (approximately: `MAXLEN ~`).
    pub stream_max_events: usize,
    /// How long a finished stream stays resumable.
    pub stream_ttl: Duration,
    /// Events kept per channel.
    pub channel_max_events: usize,
    /// How long an unused channel is kept.
    pub channel_ttl: Duration,
}

/// A stream's owner and generator, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMeta {
    /// Owning subject.
    pub owner: String,
    /// Generator name.
    pub generator: String,
}

/// The stored form of a logged event (compact field names: one per char).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t")]
enum Stored {
    #[serde(rename = "s")]
    Start { g: String },
    #[serde(rename = "d")]
    Delta { x: String },
    #[serde(rename = "f")]
    Done {
        n: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        u: Option<Usage>,
    },
    #[serde(rename = "e")]
    Error { c: String, m: String },
}

fn encode(event: &StreamEvent) -> Option<String> {
    let stored = match event {
        StreamEvent::Start { generator, .. } => Stored::Start { g: generator.clone() },
        StreamEvent::Delta { text, .. } => Stored::Delta { x: text.clone() },
        StreamEvent::Done { chars, usage, .. } => Stored::Done { n: *chars, u: *usage },
        StreamEvent::Error { code, message, .. } => Stored::Error { c: code.to_string(), m: message.clone() },
        StreamEvent::Shutdown { .. } | StreamEvent::Heartbeat => return None,
    };
    serde_json::to_string(&stored).ok()
}

fn decode(stream_id: StreamId, seq: u64, json: &str) -> Option<StreamEvent> {
    Some(match serde_json::from_str::<Stored>(json).ok()? {
        Stored::Start { g } => StreamEvent::Start { stream_id, generator: g },
        Stored::Delta { x } => StreamEvent::Delta { stream_id, seq, text: x },
        Stored::Done { n, u } => {
            StreamEvent::Done { stream_id, seq, finish_reason: FinishReason::Stop, chars: n, usage: u }
        }
        Stored::Error { c, m } => StreamEvent::Error { stream_id, seq, code: c.into(), message: m },
    })
}

fn stream_key(id: &StreamId) -> String {
    format!("tg:s:{id}")
}
fn meta_key(id: &StreamId) -> String {
    format!("tg:m:{id}")
}
fn lease_key(id: &StreamId) -> String {
    format!("tg:l:{id}")
}
fn channel_key(name: &str) -> String {
    format!("tg:c:{name}")
}
const CANCEL_CHANNEL: &str = "tg:cancel";
const ATTACH_CHANNEL: &str = "tg:attach";

/// Parsed `XRANGE` reply: entry id and its fields.
type Entries = Vec<(String, HashMap<String, String>)>;

fn seq_of(entry_id: &str) -> Option<u64> {
    entry_id.strip_prefix("0-")?.parse::<u64>().ok()?.checked_sub(1)
}

/// The Redis-backed store.
pub struct RedisStore {
    client: Client,
    conn: ConnectionManager,
    healthy: AtomicBool,
    /// The cancel/attach subscription is live (part of readiness: without
    /// it cancels from other replicas would be missed).
    listening: AtomicBool,
    settings: RedisSettings,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("healthy", &self.is_healthy()).finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects lazily (the server may start before Redis is up; `/readyz`
    /// says so meanwhile).
    pub fn connect(url: &str, settings: RedisSettings) -> Result<Arc<Self>, StoreError> {
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(1);
        let conn = client.get_connection_manager_lazy(config)?;
        Ok(Arc::new(Self {
            client,
            conn,
            healthy: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            settings,
        }))
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Whether the last probe reached Redis and the cancel/attach
    /// subscription is live.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire) && self.listening.load(Ordering::Acquire)
    }

    /// Probes Redis every `every` until `stop`, logging changes.
    pub async fn probe(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        loop {
            let mut conn = self.conn();
            let ok = matches!(
                tokio::time::timeout(RESPONSE_TIMEOUT, redis::cmd("PING").query_async::<String>(&mut conn)).await,
                Ok(Ok(_))
            );
            let was = self.healthy.swap(ok, Ordering::AcqRel);
            if was != ok {
                if ok {
                    tracing::info!("redis reachable");
                } else {
                    tracing::warn!("redis unreachable: new streams are refused until it returns");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// The newest entry of a Redis stream, if any.
    async fn newest(&self, key: &str) -> Result<Option<(String, HashMap<String, String>)>, StoreError> {
        let entries: Entries = redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn())
            .await?;
        Ok(entries.into_iter().next())
    }

    /// The last logged event's sequence number and whether it is terminal.
    pub async fn last_event(&self, id: &StreamId) -> Result<Option<(u64, bool)>, StoreError> {
        Ok(self.newest(&stream_key(id)).await?.and_then(|(entry_id, fields)| {
            let seq = seq_of(&entry_id)?;
            let event = fields.get("e").and_then(|json| decode(*id, seq, json))?;
            Some((seq, event.is_terminal()))
        }))
    }

    /// Records a new stream and takes its lease.
    pub async fn create_stream(&self, id: &StreamId, owner: &str, generator: &str) -> Result<(), StoreError> {
        let ttl = self.settings.stream_ttl.as_secs().max(1) as i64;
        redis::pipe()
            .atomic()
            .hset_multiple(meta_key(id), &[("owner", owner), ("generator", generator)])
            .ignore()
            .expire(meta_key(id), ttl + 3600)
            .ignore()
            .set_ex(lease_key(id), 1, LEASE.as_secs())
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Appends events (consecutive, in order) to a stream's log.
    pub async fn append(&self, id: &StreamId, events: &[std::sync::Arc<StreamEvent>]) -> Result<(), StoreError> {
        let key = stream_key(id);
        // Atomic: the terminal event and the lease's removal are seen
        // together, so a reader never mistakes a finished stream for a
        // lost one.
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut finished = false;
        for event in events {
            let (Some(seq), Some(json)) = (event.seq(), encode(event)) else {
                continue;
            };
            finished |= event.is_terminal();
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.settings.stream_max_events)
                .arg(format!("0-{}", seq + 1))
                .arg("e")
                .arg(json)
                .ignore();
        }
        let ttl = self.settings.stream_ttl.as_secs().max(1) as i64;
        if finished {
            // Finished: resumable for the TTL, no lease needed any more.
            pipe.expire(&key, ttl).ignore().expire(meta_key(id), ttl).ignore().del(lease_key(id)).ignore();
        } else {
            // Running: kept while the producer lives (lease) plus the TTL.
            pipe.expire(&key, ttl + 3600).ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    /// Refreshes the producer's lease, and keeps the running stream's keys
    /// from expiring however long it runs.
    pub async fn refresh_lease(&self, id: &StreamId) -> Result<(), StoreError> {
        let keep = self.settings.stream_ttl.as_secs().max(1) as i64 + 3600;
        redis::pipe()
            .set_ex(lease_key(id), 1, LEASE.as_secs())
            .ignore()
            .expire(meta_key(id), keep)
            .ignore()
            .expire(stream_key(id), keep)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// The stream's owner and generator, if Redis still holds it.
    pub async fn meta(&self, id: &StreamId) -> Result<Option<RemoteMeta>, StoreError> {
        let map: HashMap<String, String> = self.conn().hgetall(meta_key(id)).await?;
        Ok(match (map.get("owner"), map.get("generator")) {
            (Some(owner), Some(generator)) => Some(RemoteMeta { owner: owner.clone(), generator: generator.clone() }),
            _ => None,
        })
    }

    /// Events from `from` on (up to `count`); `Err(Some(first))` when `from`
    /// was trimmed away.
    pub async fn read(
        &self,
        id: &StreamId,
        from: u64,
        count: usize,
    ) -> Result<Result<Vec<StreamEvent>, u64>, StoreError> {
        let entries: Entries = redis::cmd("XRANGE")
            .arg(stream_key(id))
            .arg(format!("0-{}", from + 1))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn())
            .await?;
        let mut out = Vec::with_capacity(entries.len());
        for (entry_id, fields) in entries {
            let Some(seq) = seq_of(&entry_id) else { continue };
            if out.is_empty() && seq > from {
                return Ok(Err(seq));
            }
            if let Some(event) = fields.get("e").and_then(|json| decode(*id, seq, json)) {
                out.push(event);
            }
        }
        Ok(Ok(out))
    }

    /// Announces a reader of `id` on this replica (so the producing replica
    /// keeps generating for it); lives a few seconds unless renewed.
    pub async fn mark_remote_reader(&self, id: &StreamId, first: bool) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.pset_ex(format!("tg:r:{id}"), 1, REMOTE_READER.as_millis() as u64).ignore();
        if first {
            // The producer hears of a new reader at once (its own check runs
            // once a second, which could come after the detach grace).
            pipe.publish(ATTACH_CHANNEL, id.to_string()).ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    /// Whether a reader on another replica announced itself recently.
    pub async fn remote_reader(&self, id: &StreamId) -> Result<bool, StoreError> {
        Ok(self.conn().exists(format!("tg:r:{id}")).await?)
    }

    /// Whether the producer's lease is alive.
    pub async fn leased(&self, id: &StreamId) -> Result<bool, StoreError> {
        Ok(self.conn().exists(lease_key(id)).await?)
    }

    /// Asks whichever replica produces `id` to cancel it.
    pub async fn publish_cancel(&self, id: &StreamId) -> Result<(), StoreError> {
        self.conn().publish::<_, _, ()>(CANCEL_CHANNEL, id.to_string()).await?;
        Ok(())
    }

    /// Listens for cancels and for readers attaching on other replicas, and
    /// applies those for streams produced here; resubscribes after outages.
    pub async fn listen_for_cancels(self: Arc<Self>, hub: Arc<StreamHub>, stop: CancellationToken) {
        use futures_util::StreamExt;
        loop {
            let session = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&[CANCEL_CHANNEL, ATTACH_CHANNEL]).await?;
                self.listening.store(true, Ordering::Release);
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Ok(text) = msg.get_payload::<String>() else { continue };
                    let Some(stream) = StreamId::parse(&text).and_then(|id| hub.get(&id)) else { continue };
                    if msg.get_channel_name() == ATTACH_CHANNEL {
                        stream.hold_for_remote(tokio::time::Instant::now() + REMOTE_READER);
                    } else {
                        stream.cancel();
                    }
                }
                Ok::<(), RedisError>(())
            };
            tokio::select! {
                () = stop.cancelled() => return,
                result = session => {
                    self.listening.store(false, Ordering::Release);
                    if let Err(e) = result {
                        tracing::debug!(error = %StoreError::from(e), "cancel listener lost redis; retrying");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Publishes to a channel; returns the event's id.
    pub async fn channel_publish(&self, name: &str, event: Option<&str>, data: &str) -> Result<String, StoreError> {
        let key = channel_key(name);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&key).arg("MAXLEN").arg("~").arg(self.settings.channel_max_events).arg("*").arg("d").arg(data);
        if let Some(event) = event {
            cmd.arg("e").arg(event);
        }
        let mut conn = self.conn();
        let id: String = cmd.query_async(&mut conn).await?;
        conn.expire::<_, ()>(&key, self.settings.channel_ttl.as_secs().max(1) as i64).await?;
        Ok(id)
    }

    /// Subscribers of a channel on all replicas (each replica keeps its own
    /// count in a hash; a replica that died keeps its count until the key
    /// expires).
    pub async fn channel_subscribers(&self, name: &str) -> Result<usize, StoreError> {
        let counts: Vec<i64> = self.conn().hvals(format!("tg:n:{name}")).await?;
        Ok(counts.into_iter().filter(|n| *n > 0).sum::<i64>() as usize)
    }

    /// Adds `delta` to this replica's subscriber count for a channel.
    pub async fn count_subscriber(&self, name: &str, replica: &str, delta: i64) -> Result<(), StoreError> {
        let key = format!("tg:n:{name}");
        redis::pipe()
            .hincr(&key, replica, delta)
            .ignore()
            .expire(&key, self.settings.channel_ttl.as_secs().max(1) as i64)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// A channel's events after `after` (exclusive), oldest first, and
    /// whether any event after `after` was already trimmed away.
    pub async fn channel_read(&self, name: &str, after: &str, count: usize) -> Result<(Entries, bool), StoreError> {
        let mut conn = self.conn();
        let entries: Entries = redis::cmd("XRANGE")
            .arg(channel_key(name))
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        // Redis 7 records the newest id it ever trimmed.
        let info: redis::Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(channel_key(name))
            .query_async(&mut conn)
            .await
            .unwrap_or(redis::Value::Nil);
        let max_deleted = match info {
            redis::Value::Array(items) => items
                .chunks(2)
                .find_map(|kv| match (&kv[0], kv.get(1)) {
                    (redis::Value::BulkString(k), Some(redis::Value::BulkString(v)))
                        if k == b"max-deleted-entry-id" =>
                    {
                        Some(String::from_utf8_lossy(v).into_owned())
                    }
                    _ => None,
                })
                .unwrap_or_else(|| "0-0".to_owned()),
            redis::Value::Map(items) => items
                .iter()
                .find_map(|(k, v)| match (k, v) {
                    (redis::Value::BulkString(k), redis::Value::BulkString(v)) if k == b"max-deleted-entry-id" => {
                        Some(String::from_utf8_lossy(v).into_owned())
                    }
                    _ => None,
                })
                .unwrap_or_else(|| "0-0".to_owned()),
            _ => "0-0".to_owned(),
        };
        Ok((entries, id_after(&max_deleted, after)))
    }

    /// Waits (up to `block`) for entries after the given ids in any of the
    /// channels; one call per replica tails all of them.
    pub async fn channel_tail(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        positions: &[(String, String)],
        block: Duration,
    ) -> Result<Vec<(String, Entries)>, StoreError> {
        if positions.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(256).arg("BLOCK").arg(block.as_millis() as u64).arg("STREAMS");
        for (name, _) in positions {
            cmd.arg(channel_key(name));
        }
        for (_, id) in positions {
            cmd.arg(id);
        }
        let reply: Option<Vec<(String, Entries)>> = cmd.query_async(conn).await?;
        Ok(reply
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(key, entries)| key.strip_prefix("tg:c:").map(|name| (name.to_owned(), entries)))
            .collect())
    }

    /// A dedicated connection for blocking reads (a blocking command would
    /// stall every other command on the shared one).
    pub async fn dedicated(&self) -> Result<redis::aio::MultiplexedConnection, StoreError> {
        Ok(self.client.get_multiplexed_async_connection().await?)
    }

    /// The id of the newest entry of a channel (`0-0` when empty).
    pub async fn channel_last_id(&self, name: &str) -> Result<String, StoreError> {
        Ok(self.newest(&channel_key(name)).await?.map_or_else(|| "0-0".to_owned(), |(id, _)| id))
    }
}

/// Compares Redis stream ids `a > b`.
pub(super) fn id_after(a: &str, b: &str) -> bool {
    fn parts(id: &str) -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    }
    parts(a) > parts(b)
}

/// Replicates one stream's events to Redis in order, batching whatever is
/// queued, and keeps its lease alive. Reports the first failure through
/// `failed` and the stream's stop token (the producer then ends the stream
/// with `store_unavailable`).
pub struct Replicator {
    store: Arc<RedisStore>,
    tx: mpsc::Sender<std::sync::Arc<StreamEvent>>,
    task: tokio::task::JoinHandle<()>,
    /// Cancelled when replication failed (the stream's stop token fires
    /// too; this one says why).
    pub failed: CancellationToken,
    stream: Arc<super::LiveStream>,
}

impl Replicator {
    /// Starts replicating `stream`; `capacity` bounds what may queue. Every
    /// lease refresh also looks for readers on other replicas and holds the
    /// stream for them (the detach grace counts only local readers).
    pub fn start(store: Arc<RedisStore>, stream: Arc<super::LiveStream>, capacity: usize) -> Self {
        let id = stream.id;
        let (tx, mut rx) = mpsc::channel::<std::sync::Arc<StreamEvent>>(capacity.max(1));
        let failed = CancellationToken::new();
        let flag = failed.clone();
        let handle = store.clone();
        let watched = stream.clone();
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut lease = tokio::time::interval(LEASE_REFRESH);
            loop {
                tokio::select! {
                    n = rx.recv_many(&mut batch, 512) => {
                        if n == 0 {
                            return;
                        }
                        if let Err(e) = store.append(&id, &batch).await {
                            tracing::warn!(stream_id = %id, error = %e, "replication to redis failed");
                            flag.cancel();
                            stream.cancelled().cancel();
                            return;
                        }
                        batch.clear();
                    }
                    _ = lease.tick() => {
                        if store.refresh_lease(&id).await.is_err() {
                            flag.cancel();
                            stream.cancelled().cancel();
                            return;
                        }
                        if let Ok(true) = store.remote_reader(&id).await {
                            stream.hold_for_remote(tokio::time::Instant::now() + REMOTE_READER);
                        }
                    }
                }
            }
        });
        Self { store: handle, tx, task, failed, stream: watched }
    }

    /// Queues an event; a full queue counts as a failure.
    pub fn push(&self, event: std::sync::Arc<StreamEvent>) {
        if self.tx.try_send(event).is_err() {
            self.failed.cancel();
            self.stream.cancelled().cancel();
        }
    }

    /// The store it writes to.
    pub fn store(&self) -> &Arc<RedisStore> {
        &self.store
    }

    /// Waits (bounded) until everything queued is written.
    pub async fn finish(self) {
        drop(self.tx);
        let _ = tokio::time::timeout(RESPONSE_TIMEOUT * 2, self.task).await;
    }
}
