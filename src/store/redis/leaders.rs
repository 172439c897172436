//! One replica at a time for cluster-wide duties (the demo feeds): a lease
//! key per role ([`keys::leader`]) holding the replica id, taken with
//! `SET NX PX` and renewed by its holder, in one script so that a renewal
//! never extends another replica's lease. A dead leader's lease lapses and
//! another replica takes over.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::super::keys;
use super::RedisStore;
use crate::store::StoreError;

/// KEYS[1]: the lease; ARGV: this replica's id, the TTL in ms. 1 when this
/// replica holds the lease now.
const LEAD: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
";

static LEAD_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LEAD));

impl RedisStore {
    /// See [`crate::store::Store::lead`].
    pub(in crate::store) async fn lead(&self, role: &str, replica: &str, ttl: Duration) -> Result<bool, StoreError> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let held: i64 = LEAD_SCRIPT.key(keys::leader(role)).arg(replica).arg(ms).invoke_async(&mut self.conn()).await?;
        Ok(held == 1)
    }
}
