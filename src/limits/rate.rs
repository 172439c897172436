//! Request rate limits: one GCRA limiter keyed by subject and one keyed by
//! client IP. Keys whose buckets are full again carry no information and are
//! pruned periodically, so state stays proportional to recently active keys.
//!
//! With a shared store the same GCRA runs there instead, one atomic step per
//! check, so a subject's or an IP's budget holds across replicas; the local
//! limiters are then what the fail-open policy falls back to.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use super::shared::SharedLimits;
use crate::store::RateKey;

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

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateRefused {
    /// Over the rate.
    #[error("too many requests")]
    Limited(RateLimited),
    /// The cluster-wide rate could not be asked and the policy is to fail
    /// closed.
    #[error("rate limits cannot be checked right now")]
    Unavailable,
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
        Quota::with_period(self.interval()).map(|q| q.allow_burst(self.burst))
    }

    /// The time one request's cell takes to come back.
    fn interval(self) -> Duration {
        Duration::from_secs(60) / self.per_minute.get()
    }
}

/// One limiter and the burst its quota was built with, which a refusal
/// reports (`RateLimit-Limit`).
struct Limiter<K: Hash + Eq + Clone> {
    limiter: Keyed<K>,
    burst: u32,
    /// The rate again, for the shared store's GCRA.
    rate: Rate,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn new(rate: Rate) -> Option<Self> {
        Some(Self {
            limiter: RateLimiter::keyed(rate.quota()?).with_middleware::<StateInformationMiddleware>(),
            burst: rate.burst.get(),
            rate,
        })
    }

    /// Counts one request of `key` in the cluster (`Ok(Some)`), or `Ok(None)`
    /// when the store failed and the policy says to count it here instead.
    async fn check_shared(
        &self,
        shared: &SharedLimits,
        key: RateKey<'_>,
        scope: RateScope,
    ) -> Result<Option<()>, RateRefused> {
        let store = shared.store();
        let limit = match scope {
            RateScope::Subject => "rate_subject",
            RateScope::Ip => "rate_ip",
        };
        let answer = shared.ask(limit, store.rate(key, self.rate.interval(), self.burst)).await;
        match answer.map_err(|_| RateRefused::Unavailable)? {
            None => Ok(None),
            Some(None) => Ok(Some(())),
            Some(Some(retry_after)) => Err(RateRefused::Limited(RateLimited { scope, limit: self.burst, retry_after })),
        }
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
    /// The cluster-wide limits, with a shared store.
    shared: Option<Arc<SharedLimits>>,
}

impl RateLimits {
    /// Limiters for the given rates (`None` disables one), in this process.
    pub fn new(subject: Option<Rate>, ip: Option<Rate>) -> Self {
        Self { subject: subject.and_then(Limiter::new), ip: ip.and_then(Limiter::new), shared: None }
    }

    /// The same limits held cluster-wide through `shared` (when given).
    pub fn with_shared(self, shared: Option<Arc<SharedLimits>>) -> Self {
        Self { shared, ..self }
    }

    /// Counts one request from `ip`.
    pub async fn check_ip(&self, ip: IpAddr) -> Result<(), RateRefused> {
        let Some(l) = &self.ip else { return Ok(()) };
        if let Some(shared) = &self.shared
            && let Some(()) = l.check_shared(shared, RateKey::Ip(ip), RateScope::Ip).await?
        {
            return Ok(());
        }
        l.check(&ip, RateScope::Ip).map_err(RateRefused::Limited)
    }

    /// Counts one request from `subject`. The key is copied into a `String`
    /// because governor looks keys up by `&K` of the map's own key type.
    pub async fn check_subject(&self, subject: &str) -> Result<(), RateRefused> {
        let Some(l) = &self.subject else { return Ok(()) };
        if let Some(shared) = &self.shared
            && let Some(()) = l.check_shared(shared, RateKey::Subject(subject), RateScope::Subject).await?
        {
            return Ok(());
        }
        l.check(&subject.to_owned(), RateScope::Subject).map_err(RateRefused::Limited)
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
    use futures_util::FutureExt;

    use super::*;

    /// Checks resolve at once without a shared store: the memory path
    /// never waits (`now_or_never` would give `None` otherwise).
    fn subject(limits: &RateLimits, key: &str) -> Option<Result<(), RateRefused>> {
        limits.check_subject(key).now_or_never()
    }

    fn ip(limits: &RateLimits, key: IpAddr) -> Option<Result<(), RateRefused>> {
        limits.check_ip(key).now_or_never()
    }

    fn rate(per_minute: u32, burst: u32) -> Option<Rate> {
        Some(Rate { per_minute: NonZeroU32::new(per_minute)?, burst: NonZeroU32::new(burst)? })
    }

    #[test]
    fn burst_then_refusal_with_retry_time() {
        let limits = RateLimits::new(rate(60, 2), None);
        assert_eq!(subject(&limits, "a"), Some(Ok(())));
        assert_eq!(subject(&limits, "a"), Some(Ok(())));
        let refused = match subject(&limits, "a") {
            Some(Err(RateRefused::Limited(r))) => {
                Some((r.scope, r.limit, r.retry_after > Duration::ZERO && r.retry_after <= Duration::from_secs(1)))
            }
            _ => None,
        };
        assert_eq!(refused, Some((RateScope::Subject, 2, true)));
        // Other keys are independent; the disabled IP limiter allows all.
        assert_eq!(subject(&limits, "b"), Some(Ok(())));
        assert_eq!(ip(&limits, IpAddr::from([127, 0, 0, 1])), Some(Ok(())));
    }

    #[test]
    fn state_is_pruned_back_after_many_distinct_keys() {
        // 60 000/min = one cell per millisecond: a used bucket is full again
        // 1 ms later, so after a short sleep every key is prunable.
        let limits = RateLimits::new(rate(60_000, 1), rate(60_000, 1));
        for i in 0..50_000u32 {
            let _ = subject(&limits, &format!("subject-{i}"));
            let _ = ip(&limits, IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(limits.tracked_keys(), (50_000, 50_000));
        std::thread::sleep(Duration::from_millis(20));
        limits.prune();
        assert_eq!(limits.tracked_keys(), (0, 0));
    }
}
