//! Stream tickets in Redis, so that a ticket is used once across all
//! replicas: one hash per ticket ([`keys::ticket`]). Taking a ticket is one
//! Lua script, which Redis runs atomically: of concurrent takes on any
//! replicas, exactly one finds the use field empty and fills it. A
//! read-then-write from the client would let two replicas both see an
//! unused ticket.

use super::super::keys;
use super::RedisStore;
use crate::store::{StoreError, TakenTicket};

/// KEYS[1]: the ticket. ARGV: the record, use and binding field names, this
/// use, and how long a used ticket is kept (ms). Answers nil for no ticket,
/// else the record, the first use, the binding (empty: none) and `1` when
/// this call made the first use.
const TAKE: &str = r"
local v = redis.call('HMGET', KEYS[1], ARGV[1], ARGV[2], ARGV[3])
if not v[1] then return false end
if v[2] then return {v[1], v[2], v[3] or '', 0} end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {v[1], ARGV[4], '', 1}
";

/// KEYS[1]: the ticket. ARGV: the binding field, the binding. Sets it only
/// on a ticket that still exists and has none (a missing key is not
/// recreated, which would leave it without an expiry).
const BIND: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
end
return 1
";

impl RedisStore {
    /// Records a new ticket for `ttl_ms`.
    pub(in crate::store) async fn issue_ticket(&self, key: &str, record: &str, ttl_ms: u64) -> Result<(), StoreError> {
        let key = keys::ticket(key);
        redis::pipe()
            .atomic()
            .hset(&key, keys::TICKET_RECORD, record)
            .ignore()
            .pexpire(&key, ttl_ms as i64)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// The ticket's entry, marking it used by `first_use` (kept `keep_ms`
    /// from now) if nobody had used it.
    pub(in crate::store) async fn take_ticket(
        &self,
        key: &str,
        first_use: &str,
        keep_ms: u64,
    ) -> Result<Option<TakenTicket>, StoreError> {
        let reply: Option<(String, String, String, i64)> = redis::cmd("EVAL")
            .arg(TAKE)
            .arg(1)
            .arg(keys::ticket(key))
            .arg(keys::TICKET_RECORD)
            .arg(keys::TICKET_USE)
            .arg(keys::TICKET_BINDING)
            .arg(first_use)
            .arg(keep_ms)
            .query_async(&mut self.conn())
            .await?;
        Ok(reply.map(|(record, first_use, binding, first)| TakenTicket {
            record,
            first_use,
            binding: (!binding.is_empty()).then_some(binding),
            first: first == 1,
        }))
    }

    /// Records what the ticket's first use opened.
    pub(in crate::store) async fn bind_ticket(&self, key: &str, binding: &str) -> Result<(), StoreError> {
        redis::cmd("EVAL")
            .arg(BIND)
            .arg(1)
            .arg(keys::ticket(key))
            .arg(keys::TICKET_BINDING)
            .arg(binding)
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }
}
