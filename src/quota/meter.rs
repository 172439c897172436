//! One stream's draw on its subject's budget. Characters are taken from a
//! local allowance, one integer decrement per character; the allowance is
//! refilled by reserving a small chunk from the subject's counters in the
//! store (one Redis script call per chunk with Redis), and what is left of
//! it when the stream ends is given back, so a stream is charged exactly
//! what it delivered. A replica that dies loses at most the unused part of
//! each of its streams' chunks.
//!
//! The subject's streams on this replica share an [`Account`]: when one
//! finds the budget used up, all of them end at once. Streams on other
//! replicas find out at their next reservation.

use std::sync::Arc;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::plan::{Limit, Unit};
use super::unix_now;
use crate::metrics::Metrics;
use crate::store::{QuotaCounter, Store, StoreError};

/// A subject's streams on this replica.
#[derive(Debug, Default)]
pub(super) struct Account {
    /// Fired when the subject's budget runs out.
    exhausted: CancellationToken,
}

impl Account {
    /// Ends every stream of the subject here.
    pub(super) fn exhaust(&self) {
        self.exhausted.cancel();
    }

    /// Whether the budget has run out for the streams that share this
    /// account (a new stream, admitted later, gets a fresh one).
    pub(super) fn is_exhausted(&self) -> bool {
        self.exhausted.is_cancelled()
    }
}

/// A stream's meter (see the module docs).
#[derive(Debug)]
pub struct Meter {
    subject: String,
    chars: Vec<Limit>,
    tokens: Vec<Limit>,
    /// Characters reserved and not yet delivered.
    allowance: u64,
    /// The counters the allowance was reserved on: given back there even
    /// if a window has ended since.
    reserved_on: Vec<QuotaCounter>,
    chunk: u64,
    store: Store,
    account: Arc<Account>,
    metrics: Arc<Metrics>,
}

impl Meter {
    pub(super) fn new(
        subject: String,
        limits: &[Limit],
        chunk: u64,
        store: Store,
        account: Arc<Account>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (chars, tokens) = limits.iter().partition(|l| l.unit == Unit::Chars);
        Self { subject, chars, tokens, allowance: 0, reserved_on: Vec::new(), chunk, store, account, metrics }
    }

    /// Takes one character from the allowance: the per-character path, no
    /// call out. False when it is empty and [`Meter::refill`] must run.
    #[inline]
    pub fn try_take(&mut self) -> bool {
        if self.chars.is_empty() {
            return true;
        }
        if self.allowance == 0 {
            return false;
        }
        self.allowance -= 1;
        true
    }

    /// Reserves the next chunk. `Ok(false)`: the budget is used up, and the
    /// subject's other streams here are told to end too.
    pub async fn refill(&mut self) -> Result<bool, StoreError> {
        if self.account.is_exhausted() {
            return Ok(false);
        }
        let counters: Vec<QuotaCounter> = self.chars.iter().map(|l| l.counter(unix_now())).collect();
        let granted = self.store.quota_reserve(&self.subject, &counters, self.chunk).await?;
        self.metrics.quota_reserved(granted);
        if granted == 0 {
            self.account.exhaust();
            return Ok(false);
        }
        self.allowance += granted;
        self.reserved_on = counters;
        Ok(true)
    }

    /// Charges model tokens the generator reported (known only after the
    /// fact, so they are added whatever the budget; a token budget that is
    /// now full ends the subject's other streams and refuses new ones).
    pub async fn charge_tokens(&mut self, tokens: u64) -> Result<(), StoreError> {
        if self.tokens.is_empty() || tokens == 0 {
            return Ok(());
        }
        let counters: Vec<QuotaCounter> = self.tokens.iter().map(|l| l.counter(unix_now())).collect();
        self.metrics.quota_charged(Unit::Tokens.as_str(), tokens);
        if self.store.quota_add(&self.subject, &counters, tokens).await? {
            self.account.exhaust();
        }
        Ok(())
    }

    /// Resolves when the subject's budget runs out, wherever on this
    /// replica that was found.
    pub fn exhausted(&self) -> WaitForCancellationFutureOwned {
        self.account.exhausted.clone().cancelled_owned()
    }

    /// Gives back the unused allowance. `delivered` is the stream's
    /// character count, for the metric.
    pub async fn finish(mut self, delivered: u64) -> Result<(), StoreError> {
        if !self.chars.is_empty() {
            self.metrics.quota_charged(Unit::Chars.as_str(), delivered);
        }
        let unused = std::mem::take(&mut self.allowance);
        if unused > 0 {
            self.store.quota_release(&self.subject, &self.reserved_on, unused).await?;
        }
        Ok(())
    }
}
