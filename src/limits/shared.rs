//! Limits that hold for the whole cluster: the shared store decides (one
//! atomic operation per check, see [`crate::store::LimitStore`]), and when
//! it cannot be asked, the configured [`OnStoreFailure`] policy does. Every
//! such failure is counted (`tokengate_limit_store_failures_total{policy}`)
//! and logged at most once per [`LOG_EVERY`], with how many were left out.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::log_throttle::LogThrottle;
use crate::metrics::Metrics;
use crate::store::{LimitStore, StoreError};

/// Longest a limit check waits for the shared store before the failure
/// policy applies: admission latency matters more than an exact answer, and
/// a lost network would otherwise hold every request for the store's own
/// (longer) timeout.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);
/// At most one warning per this long about a failing shared store.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// What a limit does when the shared store cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStoreFailure {
    /// Refuse with 503 `limits_unavailable`: no request gets past a limit
    /// that cannot be checked.
    Closed,
    /// Apply this process's own limits instead (the behaviour without a
    /// shared store): the service stays up, each replica enforcing its own
    /// budget until the store is back.
    #[default]
    Open,
}

impl OnStoreFailure {
    /// Parses the setting's value (`closed` or `open`).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "closed" => Some(Self::Closed),
            "open" => Some(Self::Open),
            _ => None,
        }
    }

    /// The setting's value, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }
}

/// A limit could not be checked against the shared store and the policy is
/// to fail closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared limits store is unavailable")]
pub struct LimitsUnavailable;

/// The shared store with the failure policy around it.
pub struct SharedLimits {
    store: LimitStore,
    policy: OnStoreFailure,
    metrics: Arc<Metrics>,
    log: LogThrottle,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl SharedLimits {
    /// Cluster-wide limits on `store`, failing as `policy` says.
    pub fn new(store: LimitStore, policy: OnStoreFailure, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { store, policy, metrics, log: LogThrottle::new(LOG_EVERY) })
    }

    /// The store, for the lease keeper's renewals and releases.
    pub(super) fn store(&self) -> &LimitStore {
        &self.store
    }

    /// The metrics, for the lease keeper's failures.
    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Runs `op` on the store: `Ok(Some)` with its answer, `Ok(None)` when
    /// it failed and the policy is to fall back to local limits, `Err` when
    /// it failed and the policy is to refuse. A store known to be down is
    /// not asked at all.
    pub(super) async fn ask<T>(
        &self,
        limit: &'static str,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<Option<T>, LimitsUnavailable> {
        let error = if !self.store.is_reachable() {
            "unreachable (health probe failing)".to_owned()
        } else {
            match tokio::time::timeout(ASK_TIMEOUT, op).await {
                Ok(Ok(answer)) => return Ok(Some(answer)),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} ms", ASK_TIMEOUT.as_millis()),
            }
        };
        self.metrics.limit_store_failure(self.policy.as_str());
        self.warn(limit, &error);
        match self.policy {
            OnStoreFailure::Closed => Err(LimitsUnavailable),
            OnStoreFailure::Open => Ok(None),
        }
    }

    /// A throttled warning about the shared store (never its URL: store
    /// errors carry only the kind and text).
    pub(super) fn warn(&self, limit: &'static str, error: &str) {
        if let Some(suppressed) = self.log.admit() {
            let policy = self.policy.as_str();
            tracing::warn!(limit, policy, error, suppressed, "cluster limits: the shared store failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_round_trips_its_setting() {
        for policy in [OnStoreFailure::Closed, OnStoreFailure::Open] {
            assert_eq!(OnStoreFailure::parse(policy.as_str()), Some(policy));
        }
        assert_eq!(OnStoreFailure::parse("maybe"), None);
    }
}
