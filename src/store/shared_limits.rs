//! [`LimitStore`]: the shared store's part in cluster-wide limits, as plain
//! atomic operations (a GCRA step, take / renew / release stream leases).
//! What to do with an answer, or without one, is the limits module's
//! policy ([`crate::limits`]); this holds none.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::StoreError;
use super::keys;
use super::redis::RedisStore;

/// Whose request rate a GCRA step counts.
#[derive(Debug, Clone, Copy)]
pub enum RateKey<'a> {
    /// A token subject.
    Subject(&'a str),
    /// A client IP.
    Ip(IpAddr),
}

/// Cluster-wide limit operations on the shared store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LimitStore(pub(super) Arc<RedisStore>);

impl LimitStore {
    /// Whether the store answered its last health probe: a caller that
    /// knows it is down applies its failure policy at once instead of
    /// waiting for a timeout on every request.
    pub fn is_reachable(&self) -> bool {
        self.0.is_reachable()
    }

    /// Counts one request of `key` against a rate of one per `interval`
    /// with bursts of `burst`: `None` when admitted, else how long until a
    /// request would be.
    pub async fn rate(&self, key: RateKey<'_>, interval: Duration, burst: u32) -> Result<Option<Duration>, StoreError> {
        let key = match key {
            RateKey::Subject(subject) => keys::rate_subject(subject),
            RateKey::Ip(ip) => keys::rate_ip(&ip),
        };
        let (interval_us, tolerance_us) = gcra_args(interval, burst);
        Ok(self.0.gcra(&key, interval_us, tolerance_us).await?.map(Duration::from_micros))
    }

    /// Takes lease `lease` for one of `subject`'s streams unless `cap` are
    /// live; it lapses after `ttl` unless renewed.
    pub async fn acquire_lease(
        &self,
        subject: &str,
        lease: &str,
        cap: usize,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.0.acquire_lease(subject, lease, cap, millis(ttl)).await
    }

    /// Renews `(subject, lease)` pairs for another `ttl`, in one round trip;
    /// returns how many had lapsed and were added back.
    pub async fn renew_leases(&self, leases: &[(String, String)], ttl: Duration) -> Result<u64, StoreError> {
        self.0.renew_leases(leases, millis(ttl)).await
    }

    /// Releases `(subject, lease)` pairs, in one round trip.
    pub async fn release_leases(&self, leases: &[(String, String)]) -> Result<(), StoreError> {
        self.0.release_leases(leases).await
    }
}

/// Whole milliseconds, at least 1 (Redis refuses a zero expiry).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The GCRA script's arguments in µs: the emission interval (at least 1 µs)
/// and the tolerance, `interval × (burst − 1)`, which lets `burst` requests
/// through at once, as governor does.
fn gcra_args(interval: Duration, burst: u32) -> (u64, u64) {
    let interval_us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX).max(1);
    (interval_us, interval_us.saturating_mul(u64::from(burst.saturating_sub(1))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_arguments_admit_the_burst_at_once() {
        // 60/min: one per second; a burst of 3 tolerates two intervals.
        assert_eq!(gcra_args(Duration::from_secs(1), 3), (1_000_000, 2_000_000));
        // A burst of 1 tolerates nothing: requests are spaced by the interval.
        assert_eq!(gcra_args(Duration::from_millis(500), 1), (500_000, 0));
        // The fastest configurable rate (60 000 000/min) is 1 µs, never 0.
        assert_eq!(gcra_args(Duration::from_nanos(1000), 5), (1, 4));
        assert_eq!(gcra_args(Duration::from_nanos(10), 2), (1, 1));
        assert_eq!(gcra_args(Duration::from_secs(1), 0), (1_000_000, 0));
    }

    #[test]
    fn lease_ttls_are_whole_milliseconds_above_zero() {
        assert_eq!(millis(Duration::from_secs(15)), 15_000);
        assert_eq!(millis(Duration::from_micros(10)), 1);
    }
}
