//! Usage counters for quotas, in memory: one number per (subject, counter
//! name), kept until its window ends. The policy (which counters a subject
//! has, what their limits are, what to do when one is full) is the quota
//! module's; this is the arithmetic, done under one lock so that a
//! reservation checks and adds in one step, exactly as the Redis script
//! does (`store/redis/quotas.rs`).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One usage counter a quota checks: a subject's use of one unit in one
/// fixed window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaCounter {
    /// Names the unit and the window (e.g. `c:3600:493021`); with the
    /// subject it identifies the counter.
    pub name: String,
    /// The most the counter may reach.
    pub limit: u64,
    /// How long the counter must be kept: to the end of its window.
    pub ttl: Duration,
}

/// A count and when it may be forgotten.
#[derive(Debug, Clone, Copy)]
struct Count {
    used: u64,
    until: Instant,
}

/// Every subject's counters on this process.
#[derive(Debug, Default)]
pub(super) struct QuotaCounters {
    counts: Mutex<HashMap<(String, String), Count>>,
}

impl QuotaCounters {
    /// Grants up to `want` on every counter at once: as much as the fullest
    /// counter still has room for, added to all of them.
    pub(super) fn reserve(&self, subject: &str, counters: &[QuotaCounter], want: u64) -> u64 {
        let now = Instant::now();
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let grant = counters.iter().fold(want, |grant, c| {
            let used = current(&counts, subject, c, now);
            grant.min(c.limit.saturating_sub(used))
        });
        if grant > 0 {
            for c in counters {
                add(&mut counts, subject, c, now, grant);
            }
        }
        grant
    }

    /// Adds `n` to every counter whatever its limit (use reported after
    /// the fact: model tokens); says whether any is now full.
    pub(super) fn add(&self, subject: &str, counters: &[QuotaCounter], n: u64) -> bool {
        let now = Instant::now();
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        // Every counter is added to: no short-circuit.
        let mut full = false;
        for c in counters {
            full |= add(&mut counts, subject, c, now, n) >= c.limit;
        }
        full
    }

    /// Gives back `n` of a reservation that was not used. Only to counters
    /// that still exist: a window that has ended is not reopened.
    pub(super) fn release(&self, subject: &str, counters: &[QuotaCounter], n: u64) {
        let now = Instant::now();
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        for c in counters {
            if let Some(count) = counts.get_mut(&(subject.to_owned(), c.name.clone()))
                && count.until > now
            {
                count.used = count.used.saturating_sub(n);
            }
        }
    }

    /// Each counter's use, in order.
    pub(super) fn used(&self, subject: &str, counters: &[QuotaCounter]) -> Vec<u64> {
        let now = Instant::now();
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counters.iter().map(|c| current(&counts, subject, c, now)).collect()
    }

    /// Forgets counters whose window has ended.
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.retain(|_, c| c.until > now);
        counts.shrink_to_fit();
    }

    /// Counters held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

fn current(counts: &HashMap<(String, String), Count>, subject: &str, c: &QuotaCounter, now: Instant) -> u64 {
    // Keys are owned pairs; a borrowed lookup would need a key type of two
    // borrowed strings, not worth it for a few lookups per reservation.
    counts.get(&(subject.to_owned(), c.name.clone())).filter(|count| count.until > now).map_or(0, |count| count.used)
}

fn add(counts: &mut HashMap<(String, String), Count>, subject: &str, c: &QuotaCounter, now: Instant, n: u64) -> u64 {
    let count = counts.entry((subject.to_owned(), c.name.clone())).or_insert(Count { used: 0, until: now + c.ttl });
    if count.until <= now {
        *count = Count { used: 0, until: now + c.ttl };
    }
    count.used = count.used.saturating_add(n);
    count.used
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(name: &str, limit: u64, ttl_ms: u64) -> QuotaCounter {
        QuotaCounter { name: name.into(), limit, ttl: Duration::from_millis(ttl_ms) }
    }

    #[test]
    fn a_reservation_is_bounded_by_the_fullest_counter() {
        let q = QuotaCounters::default();
        let both = [counter("minute", 10, 60_000), counter("hour", 25, 60_000)];
        assert_eq!(q.reserve("a", &both, 8), 8);
        assert_eq!(q.reserve("a", &both, 8), 2, "the minute counter has 2 left");
        assert_eq!(q.reserve("a", &both, 8), 0);
        assert_eq!(q.used("a", &both), vec![10, 10]);
        assert_eq!(q.reserve("b", &both, 3), 3, "subjects are independent");
        q.release("a", &both, 4);
        assert_eq!(q.used("a", &both), vec![6, 6]);
        assert!(!q.add("a", &both, 3));
        assert!(q.add("a", &both, 1), "the minute counter is full at 10");
    }

    #[test]
    fn an_ended_window_starts_from_zero_and_is_swept() {
        let q = QuotaCounters::default();
        let short = [counter("w", 5, 5)];
        assert_eq!(q.reserve("a", &short, 5), 5);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(q.used("a", &short), vec![0]);
        q.release("a", &short, 5);
        assert_eq!(q.reserve("a", &short, 9), 5);
        std::thread::sleep(Duration::from_millis(20));
        q.sweep();
        assert_eq!(q.len(), 0);
    }
}
