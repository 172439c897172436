//! Channels in Redis: each channel's events as a Redis Stream (its entry
//! ids are the SSE ids), per-replica subscriber counts, and the
//! [`ChannelTail`] that feeds every channel a local subscriber follows into
//! the local [`ChannelHub`] with one blocking `XREAD` per replica.
//!
//! Redis assigns the entry ids (`XADD *`), so publishes from every replica get one order, and a
//! subscriber's `Last-Event-ID` means the same position on whichever replica it reconnects to.
//! Subscribers never read Redis per event: history comes from one `XRANGE`, live events from
//! the local hub that this replica's tail feeds.
//!
//! Which channels exist, for the bounds on creating them, is one registry for the cluster
//! ([`keys::CHANNELS_LIVE`] and its two hashes), changed only by one Lua script
//! ([`ADMIT_LUA`]), so two replicas cannot both let a subject past its bound.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use redis::{AsyncCommands, Script};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use super::super::channels::ChannelHub;
use super::super::keys;
use super::{Entries, RedisStore};
use crate::store::{ChannelLimits, ChannelRefused, ChannelScope, StoreError};

/// Admits a channel into the registry, or renews one there. `KEYS`: [`keys::CHANNELS_LIVE`]
/// (name → expiry, ms of Redis time), [`keys::CHANNELS_CREATOR`] (name → subject),
/// [`keys::CHANNELS_CREATED`] (subject → count). `ARGV`: the name, the subject (empty: only
/// renew, never create), the ttl in ms, the total bound, the per-subject bound.
///
/// Channels past their expiry are forgotten first (a few per call; all of them before a
/// refusal, so that a bound counts live channels only), each giving its creator's count back.
/// A live channel is renewed for the ttl (0). An absent one is created for the subject (1)
/// unless the subject's bound (3) or the total (2) is reached, checked in that order as in
/// memory; a renewal of an absent channel does nothing (4). The keys expire a minute after their longest-lived member could.
const ADMIT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function forget(name)
  local by = redis.call('HGET', KEYS[2], name)
  redis.call('ZREM', KEYS[1], name)
  redis.call('HDEL', KEYS[2], name)
  if by and redis.call('HINCRBY', KEYS[3], by, -1) <= 0 then
    redis.call('HDEL', KEYS[3], by)
  end
end
local function purge(count)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now), 'LIMIT', 0, count)
  for _, name in ipairs(expired) do forget(name) end
  return #expired
end
local name, subject, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function keep()
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), name)
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], string.format('%.0f', ttl + 60000)) end
end
purge(64)
local score = redis.call('ZSCORE', KEYS[1], name)
if score and tonumber(score) > now then
  keep()
  return 0
end
if score then forget(name) end
if subject == '' then return 4 end
local function full()
  if (tonumber(redis.call('HGET', KEYS[3], subject)) or 0) >= tonumber(ARGV[5]) then return 3 end
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 2 end
  return 0
end
if full() ~= 0 then
  while purge(256) > 0 do end
  local refused = full()
  if refused ~= 0 then return refused end
end
redis.call('HSET', KEYS[2], name, subject)
redis.call('HINCRBY', KEYS[3], subject, 1)
keep()
return 1
";

static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(ADMIT_LUA));

/// A channel entry's event name and data.
///
/// Fields are read leniently: an entry without a data field (not one this code writes) carries
/// JSON `null`, so it is delivered in a valid form rather than dropped or failing the read.
pub(in crate::store) struct Entry {
    /// The entry id (the SSE id).
    pub(in crate::store) id: String,
    /// The published event name (`None`: `message`).
    pub(in crate::store) event: Option<String>,
    /// The published data, as JSON text.
    pub(in crate::store) data: String,
}

impl Entry {
    fn from_fields(id: String, mut fields: HashMap<String, String>) -> Self {
        let data = fields.remove(keys::DATA).unwrap_or_else(|| "null".to_owned());
        Self { id, event: fields.remove(keys::EVENT_NAME), data }
    }
}

impl RedisStore {
    /// Publishes to a channel; returns the event's id.
    ///
    /// `XADD` and `EXPIRE` are two commands: if the second fails, the event is published yet the
    /// caller gets an error (a client that retries publishes it twice). The log's TTL is renewed
    /// only here, so a channel nobody publishes to loses its Redis history after `channel_ttl`
    /// even while subscribed; the next publish starts a new log.
    pub(in crate::store) async fn channel_publish(
        &self,
        name: &str,
        event: Option<&str>,
        data: &str,
    ) -> Result<String, StoreError> {
        let key = keys::channel(name);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&key).arg("MAXLEN").arg("~").arg(self.settings.channel_max_events).arg("*").arg(keys::DATA).arg(data);
        if let Some(event) = event {
            cmd.arg(keys::EVENT_NAME).arg(event);
        }
        let mut conn = self.conn();
        let id: String = cmd.query_async(&mut conn).await?;
        conn.expire::<_, ()>(&key, self.settings.channel_ttl_secs()).await?;
        Ok(id)
    }

    /// Lets `subject`'s request use channel `name`: renews it in the cluster's registry, or
    /// creates it there unless a bound in `limits` is reached (then nothing is created and
    /// the refusal says which bound).
    pub(in crate::store) async fn channel_admit(
        &self,
        name: &str,
        subject: &str,
        limits: ChannelLimits,
    ) -> Result<(), StoreError> {
        let scope = match self.run_admit(name, subject, limits).await? {
            2 => ChannelScope::Total,
            3 => ChannelScope::Subject,
            _ => return Ok(()),
        };
        let limit = match scope {
            ChannelScope::Total => limits.max_channels,
            ChannelScope::Subject => limits.max_per_subject,
        };
        Err(ChannelRefused { scope, limit, retry_after: self.settings.channel_ttl }.into())
    }

    /// Renews channel `name` in the registry if it is there (a subscriber left, or is still
    /// there: the channel's unused time starts again); never creates it.
    pub(in crate::store) async fn channel_touch(&self, name: &str) -> Result<(), StoreError> {
        self.run_admit(name, "", ChannelLimits::UNBOUNDED).await.map(|_| ())
    }

    /// Runs [`ADMIT_LUA`]; its answer code.
    async fn run_admit(&self, name: &str, subject: &str, limits: ChannelLimits) -> Result<i64, StoreError> {
        let ttl_ms = u64::try_from(self.settings.channel_ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        Ok(ADMIT
            .key(keys::CHANNELS_LIVE)
            .key(keys::CHANNELS_CREATOR)
            .key(keys::CHANNELS_CREATED)
            .arg(name)
            .arg(subject)
            .arg(ttl_ms)
            .arg(limits.max_channels as u64)
            .arg(limits.max_per_subject as u64)
            .invoke_async(&mut self.conn())
            .await?)
    }

    /// Subscribers of a channel on all replicas (each replica keeps its own
    /// count in a hash; a replica that died keeps its count until the key
    /// expires, which live replicas' refreshes of the same key postpone).
    ///
    /// Only positive counts are added up: the tail's `refresh` field is always 0, and a replica's
    /// count goes negative when its decrements land after the hash had expired.
    pub(in crate::store) async fn channel_subscribers(&self, name: &str) -> Result<usize, StoreError> {
        let counts: Vec<i64> = self.conn().hvals(keys::subscribers(name)).await?;
        Ok(counts.into_iter().filter(|n| *n > 0).sum::<i64>() as usize)
    }

    /// Adds `delta` to this replica's subscriber count for a channel, and renews the hash's TTL
    /// (a `delta` of 0 only renews it). Replica ids are random per process start: a restarted
    /// replica counts under a new field, and its old count lingers like a dead replica's.
    pub(in crate::store) async fn count_subscriber(
        &self,
        name: &str,
        replica: &str,
        delta: i64,
    ) -> Result<(), StoreError> {
        let key = keys::subscribers(name);
        redis::pipe()
            .hincr(&key, replica, delta)
            .ignore()
            .expire(&key, self.settings.channel_ttl_secs())
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// A channel's events after `after` (exclusive), oldest first, and
    /// whether any event after `after` was already trimmed away.
    ///
    /// The gap is told by `max-deleted-entry-id`, which only Redis 7 and later report: on older
    /// servers, and when the channel's key no longer exists, no gap can be seen and none is
    /// reported. The two reads are not atomic; a trim between them can only add a gap report,
    /// never hide one. `count` caps the history; anything after it comes to the subscriber
    /// from the local log, which the tail feeds.
    pub(in crate::store) async fn channel_read(
        &self,
        name: &str,
        after: &str,
        count: usize,
    ) -> Result<(Vec<Entry>, bool), StoreError> {
        let mut conn = self.conn();
        let entries: Entries = redis::cmd("XRANGE")
            .arg(keys::channel(name))
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        // Redis 7 records the newest id it ever trimmed.
        let info: redis::Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(keys::channel(name))
            .query_async(&mut conn)
            .await
            .unwrap_or(redis::Value::Nil);
        let max_deleted = max_deleted_entry_id(info).unwrap_or_else(|| "0-0".to_owned());
        let entries = entries.into_iter().map(|(id, fields)| Entry::from_fields(id, fields)).collect();
        Ok((entries, id_after(&max_deleted, after)))
    }

    /// Waits (up to `block`) for entries after the given ids in any of the
    /// channels; one call per replica tails all of them.
    ///
    /// `conn` must be a dedicated connection: `XREAD BLOCK` holds it for up to `block`, which
    /// would stall every command queued on the shared one. With nothing to tail it just sleeps
    /// (an `XREAD` without streams is an error). At most 256 entries per channel come back per
    /// call; the rest follows on the next one.
    async fn channel_tail(
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
            cmd.arg(keys::channel(name));
        }
        for (_, id) in positions {
            cmd.arg(id);
        }
        let reply: Option<Vec<(String, Entries)>> = cmd.query_async(conn).await?;
        Ok(reply
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(key, entries)| key.strip_prefix(keys::CHANNEL_PREFIX).map(|name| (name.to_owned(), entries)))
            .collect())
    }

    /// The id of the newest entry of a channel (`0-0` when empty), where a subscriber without
    /// `Last-Event-ID` starts: `0-0` precedes any id Redis assigns, so nothing published after
    /// it is missed.
    pub(in crate::store) async fn channel_last_id(&self, name: &str) -> Result<String, StoreError> {
        Ok(self.newest(&keys::channel(name)).await?.map_or_else(|| "0-0".to_owned(), |(id, _)| id))
    }
}

/// `max-deleted-entry-id` from an `XINFO STREAM` reply (RESP2 or RESP3). RESP2 gives a flat
/// array of alternating names and values, RESP3 a map; `None` when the field is absent (Redis
/// before 7) or the reply is not a stream's info.
fn max_deleted_entry_id(info: redis::Value) -> Option<String> {
    let is_key = |k: &redis::Value| matches!(k, redis::Value::BulkString(k) if k == b"max-deleted-entry-id");
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(v) => Some(String::from_utf8_lossy(v).into_owned()),
        _ => None,
    };
    match info {
        redis::Value::Array(items) => {
            items.chunks(2).find_map(|kv| if is_key(&kv[0]) { kv.get(1).and_then(text) } else { None })
        }
        redis::Value::Map(items) => items.iter().find_map(|(k, v)| if is_key(k) { text(v) } else { None }),
        _ => None,
    }
}

/// Compares Redis stream ids `a > b`.
///
/// Numerically, by milliseconds then sequence: as text `10-0` would sort before `9-0`. An id
/// without `-seq` counts as `<ms>-0`, and unparsable parts count as 0.
pub(in crate::store) fn id_after(a: &str, b: &str) -> bool {
    fn parts(id: &str) -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    }
    parts(a) > parts(b)
}

/// What the tail follows for one channel, and for how many local subscribers.
#[derive(Debug)]
struct Want {
    /// The newest id ingested (or the start position).
    last: String,
    /// Local subscribers that need it: live [`TailGuard`]s. At zero the entry is removed and
    /// the channel no longer tailed; a later watcher starts from its own position.
    watchers: usize,
}

/// One per replica: tails, with a single blocking `XREAD`, every channel
/// that has a local subscriber, and feeds new events into the local
/// [`ChannelHub`], from which all local subscribers fan out.
#[derive(Debug)]
pub(in crate::store) struct ChannelTail {
    redis: Arc<RedisStore>,
    /// Where ingested events go; every local subscriber reads them there.
    hub: Arc<ChannelHub>,
    /// The channels to tail, by name. A plain mutex: held only briefly (to register a watcher,
    /// copy positions out or ingest one reply), never across an `.await`.
    wanted: Mutex<HashMap<String, Want>>,
}

/// Keeps a channel tailed while it lives; held by the subscriber's feed, so the channel stops
/// being tailed when its last local subscriber goes.
#[derive(Debug)]
pub(in crate::store) struct TailGuard {
    tail: Arc<ChannelTail>,
    name: String,
}

impl Drop for TailGuard {
    fn drop(&mut self) {
        let mut wanted = self.tail.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(want) = wanted.get_mut(&self.name) {
            want.watchers -= 1;
            if want.watchers == 0 {
                wanted.remove(&self.name);
            }
        }
    }
}

/// How long one `XREAD` blocks; also the longest a newly watched channel
/// waits for its first tail round.
const TAIL_BLOCK: Duration = Duration::from_millis(100);

impl ChannelTail {
    /// A tail feeding `hub`.
    pub(in crate::store) fn new(redis: Arc<RedisStore>, hub: Arc<ChannelHub>) -> Arc<Self> {
        Arc::new(Self { redis, hub, wanted: Mutex::new(HashMap::new()) })
    }

    /// Tails `name` from after `from` (an id) while the guard lives. A newly watched channel is
    /// included from the next `XREAD` round (within [`TAIL_BLOCK`]).
    ///
    /// A limit to know: if the tail has not yet ingested everything up to `from` (an entry
    /// just published, or the tail reconnecting), those entries reach the local log after the
    /// new subscriber's live feed has started, so one that got them as history sees them twice.
    pub(in crate::store) fn watch(self: &Arc<Self>, name: &str, from: &str) -> TailGuard {
        let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        // A channel already tailed keeps its position: what it ingested
        // after `from` is in the local log, where the subscriber starts.
        let want = wanted.entry(name.to_owned()).or_insert_with(|| Want { last: from.to_owned(), watchers: 0 });
        want.watchers += 1;
        TailGuard { tail: self.clone(), name: name.to_owned() }
    }

    /// Runs until `stop`, reconnecting after failures.
    ///
    /// The positions live in `wanted`, not in the connection, so after a reconnect the tail
    /// resumes where it was and nothing still held in Redis is lost. Every 30 s (or a third of
    /// `channel_ttl`, if shorter) it renews the subscriber counts of the channels it tails and
    /// their entries in the channel registry: a channel with subscribers is never swept.
    pub(in crate::store) async fn run(self: Arc<Self>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let mut conn = match self.redis.dedicated().await {
                Ok(conn) => conn,
                Err(_) => {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            let mut counted_refresh = Instant::now();
            let refresh_every = (self.redis.settings.channel_ttl / 3).min(Duration::from_secs(30));
            loop {
                // Subscriber counts and registry entries live with a TTL; keep
                // those of channels with local subscribers from expiring.
                if counted_refresh.elapsed() >= refresh_every {
                    counted_refresh = Instant::now();
                    let names: Vec<String> =
                        self.wanted.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
                    for name in names {
                        let _ = self.redis.count_subscriber(&name, "refresh", 0).await;
                        let _ = self.redis.channel_touch(&name).await;
                    }
                }
                let positions: Vec<(String, String)> = {
                    let wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
                    wanted.iter().map(|(name, want)| (name.clone(), want.last.clone())).collect()
                };
                let result = tokio::select! {
                    () = stop.cancelled() => return,
                    result = self.redis.channel_tail(&mut conn, &positions, TAIL_BLOCK) => result,
                };
                match result {
                    Ok(batches) => self.ingest(batches),
                    Err(e) => {
                        tracing::debug!(error = %e, "channel tail lost redis; reconnecting");
                        break;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Feeds what one `XREAD` returned into the local hub, skipping what a
    /// channel's position already covers.
    ///
    /// The positions may have changed since the `XREAD` was sent: a channel whose watchers all
    /// left is dropped from the reply, and one watched afresh from a later id skips what its
    /// subscriber already had as history.
    fn ingest(&self, batches: Vec<(String, Entries)>) {
        for (name, entries) in batches {
            let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(want) = wanted.get_mut(&name) else { continue };
            for (id, fields) in entries {
                if !id_after(&id, &want.last) {
                    continue;
                }
                want.last = id.clone();
                let entry = Entry::from_fields(id, fields);
                self.hub.ingest(&name, entry.id, entry.event, entry.data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_ids_compare_by_time_then_sequence() {
        assert!(id_after("2-0", "1-9"));
        assert!(id_after("1-10", "1-9"));
        assert!(!id_after("1-9", "1-9"));
        assert!(!id_after("0-0", "1-0"));
    }

    #[test]
    fn the_newest_trimmed_id_is_found_in_both_reply_shapes() {
        let key = redis::Value::BulkString(b"max-deleted-entry-id".to_vec());
        let value = redis::Value::BulkString(b"5-1".to_vec());
        let resp2 = redis::Value::Array(vec![
            redis::Value::BulkString(b"length".to_vec()),
            redis::Value::Int(3),
            key.clone(),
            value.clone(),
        ]);
        assert_eq!(max_deleted_entry_id(resp2).as_deref(), Some("5-1"));
        let resp3 = redis::Value::Map(vec![(key, value)]);
        assert_eq!(max_deleted_entry_id(resp3).as_deref(), Some("5-1"));
        assert_eq!(max_deleted_entry_id(redis::Value::Nil), None);
    }
}
