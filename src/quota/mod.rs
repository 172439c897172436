//! Usage quotas, enforced while streaming: per subject, budgets of
//! characters delivered and of model tokens reported, per calendar minute,
//! hour or day ([`plan`]). A subject with no budget left is refused before
//! its stream starts (`429 quota_exceeded`, `Retry-After` at the window's
//! reset); a running stream draws on the budget as it delivers
//! ([`Meter`]) and ends with `quota_exceeded` the moment it runs out, with
//! every other stream of the subject on this replica. The counters are the
//! store's: in memory, or in Redis for the whole cluster.

mod meter;
pub mod plan;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use self::meter::Account;
pub use self::meter::Meter;
use self::plan::{Limit, PlanBook, Unit, Window};
use crate::auth::Principal;
use crate::metrics::Metrics;
use crate::store::{QuotaCounter, Store, StoreError};

/// Why a stream may not start.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// A budget of the subject is used up.
    #[error("the {} budget of {max} {} per {} is used up; it resets in {} s", .unit.as_str(), .unit.as_str(), .window.as_str(), .retry_after.as_secs())]
    Exceeded {
        /// The window that is full (the one that resets last, if several).
        window: Window,
        /// Its unit.
        unit: Unit,
        /// Its budget.
        max: u64,
        /// Until it resets.
        retry_after: Duration,
    },
    /// The counters could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A subject's use of one budget, for `GET /v1/usage`.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetUse {
    /// `minute`, `hour` or `day`.
    pub window: &'static str,
    /// `chars` or `tokens`.
    pub unit: &'static str,
    /// The budget.
    pub limit: u64,
    /// Used (characters reserved by running streams count as used).
    pub used: u64,
    /// `limit - used`, never below zero.
    pub remaining: u64,
    /// Unix second of the window's reset.
    pub resets_at: u64,
    /// Seconds until then.
    pub reset_in: u64,
}

/// A subject's usage report.
#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    /// The subject.
    pub subject: String,
    /// Whether any budget applies.
    pub limited: bool,
    /// The plan in force (`default`, `scope:NAME`, `class:VALUE`), or
    /// `null` with quotas off.
    pub plan: Option<String>,
    /// One entry per budget.
    pub budgets: Vec<BudgetUse>,
}

/// The quota service. Cheap to clone.
#[derive(Clone)]
pub struct Quotas(Arc<Inner>);

struct Inner {
    book: Option<PlanBook>,
    store: Store,
    metrics: Arc<Metrics>,
    /// Subjects with streams on this replica; entries whose streams have
    /// all ended are pruned as the map grows.
    accounts: Mutex<HashMap<String, Weak<Account>>>,
}

impl Quotas {
    /// Quotas under `book` (`None`: off, every call is free).
    pub fn new(book: Option<PlanBook>, store: Store, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Inner { book, store, metrics, accounts: Mutex::new(HashMap::new()) }))
    }

    /// Whether any budget is configured.
    pub fn enabled(&self) -> bool {
        self.0.book.is_some()
    }

    /// Admits a stream of `who`, or says which budget is used up. The meter
    /// is `None` when no budget applies to the subject.
    pub async fn admit(&self, who: &Principal) -> Result<Option<Meter>, QuotaError> {
        let Some(book) = &self.0.book else { return Ok(None) };
        let plan = book.plan_for(who);
        if plan.limits.is_empty() {
            return Ok(None);
        }
        let now = unix_now();
        let counters: Vec<QuotaCounter> = plan.limits.iter().map(|l| l.counter(now)).collect();
        let used = self.0.store.quota_used(&who.subject, &counters).await?;
        if let Some(full) = plan
            .limits
            .iter()
            .zip(&used)
            .filter(|(limit, used)| **used >= limit.max)
            .map(|(limit, _)| *limit)
            .max_by_key(|limit| limit.window)
        {
            return Err(exceeded(full, now));
        }
        let account = self.account(&who.subject);
        let (store, metrics) = (self.0.store.clone(), self.0.metrics.clone());
        Ok(Some(Meter::new(who.subject.clone(), &plan.limits, book.reservation, store, account, metrics)))
    }

    /// What `who` has used and has left of each budget.
    pub async fn report(&self, who: &Principal) -> Result<UsageReport, StoreError> {
        let mut report = UsageReport { subject: who.subject.clone(), limited: false, plan: None, budgets: Vec::new() };
        let Some(book) = &self.0.book else { return Ok(report) };
        let plan = book.plan_for(who);
        let now = unix_now();
        let counters: Vec<QuotaCounter> = plan.limits.iter().map(|l| l.counter(now)).collect();
        let used = self.0.store.quota_used(&who.subject, &counters).await?;
        report.limited = !plan.limits.is_empty();
        report.plan = Some(plan.name.clone());
        report.budgets = plan
            .limits
            .iter()
            .zip(used)
            .map(|(limit, used)| {
                let resets_at = limit.window.resets_at(now);
                BudgetUse {
                    window: limit.window.as_str(),
                    unit: limit.unit.as_str(),
                    limit: limit.max,
                    used,
                    remaining: limit.max.saturating_sub(used),
                    resets_at,
                    reset_in: resets_at - now,
                }
            })
            .collect();
        Ok(report)
    }

    /// The subject's account here: the live one, or a fresh one if it has
    /// none or its budget ran out (a stream admitted now found room, so the
    /// window has reset or budget was given back).
    fn account(&self, subject: &str) -> Arc<Account> {
        let mut accounts = self.0.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(account) = accounts.get(subject).and_then(Weak::upgrade)
            && !account.is_exhausted()
        {
            return account;
        }
        let account = Arc::new(Account::default());
        if accounts.len() >= 1024 && accounts.len().is_power_of_two() {
            accounts.retain(|_, a| a.strong_count() > 0);
        }
        accounts.insert(subject.to_owned(), Arc::downgrade(&account));
        account
    }
}

fn exceeded(limit: Limit, now: u64) -> QuotaError {
    QuotaError::Exceeded {
        window: limit.window,
        unit: limit.unit,
        max: limit.max,
        retry_after: Duration::from_secs(limit.window.resets_at(now) - now),
    }
}

/// Seconds since the Unix epoch: windows are calendar windows, the same on
/// every replica.
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
