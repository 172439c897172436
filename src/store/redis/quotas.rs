//! Quota counters in Redis, so that every replica draws on one budget per
//! subject: one integer key per counter ([`keys::quota`]) expiring with its
//! window. A reservation is one Lua script, so checking the room left on
//! every counter and adding the grant is atomic: concurrent requests on
//! any number of replicas cannot together take more than the budget.

use std::sync::LazyLock;

use redis::Script;

use super::super::keys;
use super::RedisStore;
use crate::store::{QuotaCounter, StoreError};

/// KEYS: the counters; ARGV: the amount wanted, then each counter's limit
/// and TTL in seconds. Grants what the fullest counter has room for and
/// adds it to all; a counter that is new gets its TTL.
const RESERVE: &str = r"
local grant = tonumber(ARGV[1])
for i = 1, #KEYS do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  local room = tonumber(ARGV[2 * i]) - used
  if room < grant then grant = room end
end
if grant <= 0 then return 0 end
for i = 1, #KEYS do
  if redis.call('INCRBY', KEYS[i], grant) == grant then
    redis.call('EXPIRE', KEYS[i], ARGV[2 * i + 1])
  end
end
return grant
";

/// KEYS and ARGV as for [`RESERVE`]; adds ARGV[1] whatever the limits and
/// returns 1 when a counter is now full.
const ADD: &str = r"
local n = tonumber(ARGV[1])
local full = 0
for i = 1, #KEYS do
  local used = redis.call('INCRBY', KEYS[i], n)
  if used == n then redis.call('EXPIRE', KEYS[i], ARGV[2 * i + 1]) end
  if used >= tonumber(ARGV[2 * i]) then full = 1 end
end
return full
";

/// KEYS: the counters; ARGV[1]: the amount to give back, to counters that
/// still exist (an ended window is not recreated), never below zero.
const RELEASE: &str = r"
local n = tonumber(ARGV[1])
for i = 1, #KEYS do
  local used = tonumber(redis.call('GET', KEYS[i]) or '-1')
  if used >= 0 then
    if used > n then redis.call('DECRBY', KEYS[i], n) else redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 0
";

/// Each script is hashed once; `invoke_async` runs `EVALSHA` and falls
/// back to `EVAL` when a Redis (or a restarted one) has not seen it.
static RESERVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RESERVE));
static ADD_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ADD));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));

/// The invocation of `script` over a subject's counters with amount `n`.
fn invocation(
    script: &'static Script,
    subject: &str,
    counters: &[QuotaCounter],
    n: u64,
) -> redis::ScriptInvocation<'static> {
    let mut invocation = script.prepare_invoke();
    invocation.arg(n);
    for c in counters {
        invocation.key(keys::quota(subject, &c.name)).arg(c.limit).arg(c.ttl.as_secs().max(1));
    }
    invocation
}

impl RedisStore {
    /// See [`crate::store::Store::quota_reserve`].
    pub(in crate::store) async fn quota_reserve(
        &self,
        subject: &str,
        counters: &[QuotaCounter],
        want: u64,
    ) -> Result<u64, StoreError> {
        let granted: i64 = invocation(&RESERVE_SCRIPT, subject, counters, want).invoke_async(&mut self.conn()).await?;
        Ok(u64::try_from(granted).unwrap_or(0))
    }

    /// See [`crate::store::Store::quota_add`].
    pub(in crate::store) async fn quota_add(
        &self,
        subject: &str,
        counters: &[QuotaCounter],
        n: u64,
    ) -> Result<bool, StoreError> {
        let full: i64 = invocation(&ADD_SCRIPT, subject, counters, n).invoke_async(&mut self.conn()).await?;
        Ok(full == 1)
    }

    /// See [`crate::store::Store::quota_release`].
    pub(in crate::store) async fn quota_release(
        &self,
        subject: &str,
        counters: &[QuotaCounter],
        n: u64,
    ) -> Result<(), StoreError> {
        let _: i64 = invocation(&RELEASE_SCRIPT, subject, counters, n).invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    /// See [`crate::store::Store::quota_used`]: one `MGET`.
    pub(in crate::store) async fn quota_used(
        &self,
        subject: &str,
        counters: &[QuotaCounter],
    ) -> Result<Vec<u64>, StoreError> {
        if counters.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = counters.iter().map(|c| keys::quota(subject, &c.name)).collect();
        let values: Vec<Option<u64>> = redis::cmd("MGET").arg(&keys).query_async(&mut self.conn()).await?;
        Ok(values.into_iter().map(Option::unwrap_or_default).collect())
    }
}
