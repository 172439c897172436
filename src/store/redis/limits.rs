//! Cluster-wide limits in Redis: request rates (GCRA) and per-subject stream
//! leases, each decision one Lua script run atomically by Redis (one
//! `EVALSHA`; the script is loaded again by itself after a Redis restart).
//! A check-then-write from Rust would let two replicas both pass the check.
//!
//! Every script reads the clock with `TIME`, so the replicas' own clocks
//! never enter a decision (Redis 5+ replicates scripts by effects, which
//! allows it). Numbers written back are formatted with `%.0f`: Redis may
//! render a Lua number in exponent notation, which `PX`/`PEXPIREAT` refuse.

use std::sync::LazyLock;

use redis::Script;

use super::super::keys;
use super::RedisStore;
use crate::store::StoreError;

/// GCRA (the algorithm governor runs locally). `ARGV[1]`: the emission
/// interval, `ARGV[2]`: the tolerance (interval × (burst − 1)), both in µs.
/// Returns 0 when admitted, else the µs until a request would be. The key
/// holds the theoretical arrival time and expires when the bucket is full
/// again, so idle subjects and IPs cost nothing.
const GCRA_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return wait end
local new_tat = tat + interval
local ttl_ms = math.max(1, math.ceil((new_tat - now) / 1000))
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl_ms))
return 0
";

/// Takes a stream lease if the subject holds fewer than the cap: drops the
/// expired members, counts, adds. `ARGV`: lease id, cap, ttl in ms. Returns
/// 1 when taken, 0 when the cap is reached. The key expires with its
/// longest-lived lease.
const ACQUIRE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[3])), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', tonumber(last[2])))
return 1
";

/// Renews a batch of leases: `KEYS[i]` holds lease `ARGV[i + 1]`, `ARGV[1]`
/// is the ttl in ms. A lease that lapsed meanwhile (renewals failed for a
/// whole ttl, or Redis restarted empty) is added back, since its stream
/// still runs; the count of those is returned.
const RENEW_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = string.format('%.0f', now + tonumber(ARGV[1]))
local added = 0
for i, key in ipairs(KEYS) do
  added = added + redis.call('ZADD', key, expires, ARGV[i + 1])
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', key, string.format('%.0f', tonumber(last[2])))
end
return added
";

static GCRA: LazyLock<Script> = LazyLock::new(|| Script::new(GCRA_LUA));
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE_LUA));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LUA));

impl RedisStore {
    /// Whether the last probe reached Redis. Limits ask only this, not the
    /// pub/sub listener's state that readiness also needs.
    pub(in crate::store) fn is_reachable(&self) -> bool {
        self.healthy.load(std::sync::atomic::Ordering::Acquire)
    }

    /// One GCRA step on `key`: `None` when admitted, else the µs to wait.
    pub(in crate::store) async fn gcra(
        &self,
        key: &str,
        interval_us: u64,
        tolerance_us: u64,
    ) -> Result<Option<u64>, StoreError> {
        let wait: u64 = GCRA.key(key).arg(interval_us).arg(tolerance_us).invoke_async(&mut self.conn()).await?;
        Ok((wait > 0).then_some(wait))
    }

    /// Adds lease `lease` to `subject`'s set unless it holds `cap` live ones.
    pub(in crate::store) async fn acquire_lease(
        &self,
        subject: &str,
        lease: &str,
        cap: usize,
        ttl_ms: u64,
    ) -> Result<bool, StoreError> {
        let taken: u8 = ACQUIRE
            .key(keys::stream_slots(subject))
            .arg(lease)
            .arg(cap)
            .arg(ttl_ms)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(taken == 1)
    }

    /// Pushes the expiry of every `(subject, lease)` to now + ttl, in one
    /// script run; returns how many had lapsed and were added back.
    pub(in crate::store) async fn renew_leases(
        &self,
        leases: &[(String, String)],
        ttl_ms: u64,
    ) -> Result<u64, StoreError> {
        if leases.is_empty() {
            return Ok(0);
        }
        let mut invocation = RENEW.prepare_invoke();
        invocation.arg(ttl_ms);
        for (subject, lease) in leases {
            invocation.key(keys::stream_slots(subject)).arg(lease);
        }
        Ok(invocation.invoke_async(&mut self.conn()).await?)
    }

    /// Removes every `(subject, lease)`, in one round trip. A lease that is
    /// already gone (expired) costs nothing.
    pub(in crate::store) async fn release_leases(&self, leases: &[(String, String)]) -> Result<(), StoreError> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (subject, lease) in leases {
            pipe.zrem(keys::stream_slots(subject), lease).ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }
}
