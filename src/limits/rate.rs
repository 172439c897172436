//! Request rate limits: one GCRA limiter keyed by subject and one keyed by
//! client IP. Keys whose buckets are full again carry no information and are
//! pruned periodically, so state stays proportional to recently active keys.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// A governor limiter keyed by `K` (one GCRA state per key) on governor's
/// default clock.
type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// Which limiter refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope {
    /// The per-subject limiter.
    Subject,
    /// The per-client-IP limiter.
    Ip,
}

/// A refusal, with what the `RateLimit-*` and `Retry-After` headers need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    /// Which limiter.
    pub scope: RateScope,
    /// The burst size (`RateLimit-Limit`).
    pub limit: u32,
    /// Time until the next request would be allowed.
    pub retry_after: Duration,
}

/// A rate: `per_minute` requests on average, bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained requests per minute.
    pub per_minute: NonZeroU32,
    /// Requests allowed at once.
    pub burst: NonZeroU32,
}

impl Rate {
    /// An `Option` only because governor refuses a zero period: 60 s over a
    /// `u32` never is one (config caps the rate at one per microsecond), and
    /// a limiter left out is better than a panic if that ever changed.
    fn quota(self) -> Option<Quota> {
        Quota::with_period(Duration::from_secs(60) / self.per_minute.get()).map(|q| q.allow_burst(self.burst))
    }
}

/// One limiter and the burst its quota was built with, which a refusal
/// reports (`RateLimit-Limit`).
struct Limiter<K: Hash + Eq + Clone> {
    limiter: Keyed<K>,
    burst: u32,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn new(rate: Rate) -> Option<Self> {
        Some(Self {
            limiter: RateLimiter::keyed(rate.quota()?).with_middleware::<StateInformationMiddleware>(),
            burst: rate.burst.get(),
        })
    }

    /// `retry_after` is read on governor's clock type: its instants are not
    /// `std::time::Instant`s and only compare with their own kind.
    fn check(&self, key: &K, scope: RateScope) -> Result<(), RateLimited> {
        self.limiter.check_key(key).map(|_| ()).map_err(|not_until| RateLimited {
            scope,
            limit: self.burst,
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }

    /// `shrink_to_fit` as well as `retain_recent`: after a burst of distinct
    /// keys (a scan, many clients reconnecting) the map would otherwise keep
    /// its peak capacity for good.
    fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Both request-rate limiters; either may be disabled.
pub struct RateLimits {
    subject: Option<Limiter<String>>,
    ip: Option<Limiter<IpAddr>>,
}

impl RateLimits {
    /// Limiters for the given rates (`None` disables one).
    pub fn new(subject: Option<Rate>, ip: Option<Rate>) -> Self {
        Self { subject: subject.and_then(Limiter::new), ip: ip.and_then(Limiter::new) }
    }

    /// Counts one request from `ip`.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), RateLimited> {
        self.ip.as_ref().map_or(Ok(()), |l| l.check(&ip, RateScope::Ip))
    }

    /// Counts one request from `subject`. The key is copied into a `String`
    /// because governor looks keys up by `&K` of the map's own key type.
    pub fn check_subject(&self, subject: &str) -> Result<(), RateLimited> {
        match &self.subject {
            None => Ok(()),
            Some(l) => l.check(&subject.to_owned(), RateScope::Subject),
        }
    }

    /// Forgets keys whose buckets are full again (they would behave exactly
    /// like a new key), and returns the memory.
    pub fn prune(&self) {
        if let Some(l) = &self.subject {
            l.prune();
        }
        if let Some(l) = &self.ip {
            l.prune();
        }
    }

    /// Keys currently held: (subjects, IPs).
    pub fn tracked_keys(&self) -> (usize, usize) {
        (self.subject.as_ref().map_or(0, |l| l.limiter.len()), self.ip.as_ref().map_or(0, |l| l.limiter.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_minute: u32, burst: u32) -> Option<Rate> {
        Some(Rate { per_minute: NonZeroU32::new(per_minute)?, burst: NonZeroU32::new(burst)? })
    }

    #[test]
    fn burst_then_refusal_with_retry_time() {
        let limits = RateLimits::new(rate(60, 2), None);
        assert!(limits.check_subject("a").is_ok());
        assert!(limits.check_subject("a").is_ok());
        let refused = limits.check_subject("a").err();
        let refused = refused
            .as_ref()
            .map(|r| (r.scope, r.limit, r.retry_after > Duration::ZERO && r.retry_after <= Duration::from_secs(1)));
        assert_eq!(refused, Some((RateScope::Subject, 2, true)));
        // Other keys are independent; the disabled IP limiter allows all.
        assert!(limits.check_subject("b").is_ok());
        assert!(limits.check_ip("127.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))).is_ok());
    }

    #[test]
    fn state_is_pruned_back_after_many_distinct_keys() {
        // 60 000/min = one cell per millisecond: a used bucket is full again
        // 1 ms later, so after a short sleep every key is prunable.
        let limits = RateLimits::new(rate(60_000, 1), rate(60_000, 1));
        for i in 0..50_000u32 {
            let _ = limits.check_subject(&format!("subject-{i}"));
            let _ = limits.check_ip(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(limits.tracked_keys(), (50_000, 50_000));
        std::thread::sleep(Duration::from_millis(20));
        limits.prune();
        assert_eq!(limits.tracked_keys(), (0, 0));
    }
}
