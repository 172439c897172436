//! Stream tickets in memory (the store without Redis): a bounded, expiring
//! table from a ticket's digest to its entry. The entries are opaque text
//! to the store; what they mean, and whether a use is allowed, is
//! `crate::tickets`'s. What the store guarantees is the one thing that
//! must be atomic: of all the requests taking a ticket, exactly one is its
//! first use. With a shared store the same entries live in Redis
//! (`store/redis/tickets.rs`), which is what every replica takes from.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::TakenTicket;

/// Most tickets held at once. A ticket entry is a few hundred bytes; at
/// the cap, new tickets are refused (never are older ones evicted: that
/// would let one client break others' reconnects).
pub(super) const MAX_TICKETS: usize = 100_000;

#[derive(Debug)]
struct Entry {
    record: String,
    first_use: Option<String>,
    binding: Option<String>,
    expires: Instant,
}

/// Ticket digest → entry.
#[derive(Debug)]
pub(super) struct TicketTable {
    entries: Mutex<HashMap<String, Entry>>,
    max: usize,
}

impl Default for TicketTable {
    fn default() -> Self {
        Self::with_capacity(MAX_TICKETS)
    }
}

impl TicketTable {
    /// A table holding at most `max` tickets.
    pub(super) fn with_capacity(max: usize) -> Self {
        Self { entries: Mutex::default(), max }
    }

    /// Records a new ticket for `ttl`; false when the table is full.
    pub(super) fn issue(&self, key: &str, record: String, ttl: Duration) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if entries.len() >= self.max {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= self.max {
                return false;
            }
        }
        entries.insert(key.to_owned(), Entry { record, first_use: None, binding: None, expires: now + ttl });
        true
    }

    /// The ticket's entry; if it was never used, it is marked used by
    /// `first_use` and kept `keep` from now, and this call is the first.
    pub(super) fn take(&self, key: &str, first_use: String, keep: Duration) -> Option<TakenTicket> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let entry = entries.get_mut(key).filter(|e| e.expires > now)?;
        let first = entry.first_use.is_none();
        if first {
            entry.first_use = Some(first_use);
            entry.expires = now + keep;
        }
        Some(TakenTicket {
            record: entry.record.clone(),
            first_use: entry.first_use.clone().unwrap_or_default(),
            binding: entry.binding.clone(),
            first,
        })
    }

    /// Records what the ticket's first use opened (once: a later binding
    /// does not replace it).
    pub(super) fn bind(&self, key: &str, binding: String) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries.get_mut(key)
            && entry.binding.is_none()
        {
            entry.binding = Some(binding);
        }
    }

    /// Forgets expired tickets.
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, e| e.expires > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn exactly_the_first_take_is_first_and_the_binding_sticks() {
        let table = TicketTable::default();
        assert!(table.issue("k", "rec".into(), LONG));
        assert!(table.take("other", "u".into(), LONG).is_none());
        let Some(first) = table.take("k", "use-1".into(), LONG) else { panic!("issued") };
        assert!(first.first);
        assert_eq!((first.record.as_str(), first.first_use.as_str(), first.binding), ("rec", "use-1", None));
        table.bind("k", "stream:a".into());
        table.bind("k", "stream:b".into());
        let Some(again) = table.take("k", "use-2".into(), LONG) else { panic!("kept") };
        assert!(!again.first);
        assert_eq!(again.first_use, "use-1", "the first use is kept");
        assert_eq!(again.binding.as_deref(), Some("stream:a"), "the first binding is kept");
    }

    #[tokio::test(start_paused = true)]
    async fn tickets_expire_and_the_table_is_bounded() {
        let table = TicketTable::with_capacity(2);
        assert!(table.issue("a", "r".into(), Duration::from_secs(1)));
        assert!(table.issue("b", "r".into(), LONG));
        assert!(!table.issue("c", "r".into(), LONG), "full");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(table.take("a", "u".into(), LONG).is_none(), "expired");
        assert!(table.issue("c", "r".into(), LONG), "the expired one made room");
        table.sweep();
        assert_eq!(table.entries.lock().map(|e| e.len()).unwrap_or(0), 2);
    }
}
