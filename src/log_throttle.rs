//! At most one log line per interval for messages a client can cause by the
//! thousand (a flood of connections that never send a request head, a
//! failing shared store): each line says how many like it were left out, so
//! the log stays readable and cheap while the metrics keep the exact counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lets one message through per `every`, counting the others.
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// A throttle that admits one message per `every`.
    pub const fn new(every: Duration) -> Self {
        Self { every, last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// `Some(left out since the last one)` if a message may be logged now.
    pub fn admit(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < self.every) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_throttle_lets_one_through_and_counts_the_rest() {
        let every = Duration::from_secs(10);
        let throttle = LogThrottle::new(every);
        assert_eq!(throttle.admit(), Some(0));
        assert_eq!(throttle.admit(), None);
        assert_eq!(throttle.admit(), None);
        *throttle.last.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now().checked_sub(every);
        assert_eq!(throttle.admit(), Some(2));
        assert_eq!(throttle.admit(), None);
    }
}
