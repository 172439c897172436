//! Stream leases: the per-subject stream cap for the whole cluster. Each
//! open stream holds a lease in the shared store that lapses after the
//! lease ttl unless renewed, so the slots of a replica that dies come back
//! by themselves within the ttl.
//!
//! One [`Leases`] per process keeps them: it takes a lease when a stream
//! opens (one script run, see [`crate::store::LimitStore`]), renews all of
//! its leases in one batch every third of the ttl, and releases the lease
//! of an ended stream in the background (a permit's drop cannot wait on
//! the store). Renewals and releases run in one task, one after the other,
//! so a release always lands after a renewal that still carried its lease.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::shared::SharedLimits;
use super::slots::SlotRefused;

/// Leases renewed (or released) per store round trip.
const BATCH: usize = 256;
/// How long a stopping process waits to release what is left.
const FINAL_RELEASE: Duration = Duration::from_secs(1);

/// `(subject, lease id)`, as the store takes them.
type Pair = (String, String);

/// This process's stream leases.
pub struct Leases {
    shared: Arc<SharedLimits>,
    ttl: Duration,
    /// Leases taken and not yet released: id → subject. What each renewal
    /// sends.
    held: Mutex<HashMap<String, String>>,
    /// Ended streams' leases, for the keeper task to release.
    released: mpsc::UnboundedSender<Pair>,
    /// The keeper's end of `released`, until the keeper starts.
    queue: Mutex<Option<mpsc::UnboundedReceiver<Pair>>>,
    /// Random per process, so ids never collide across replicas.
    prefix: String,
    next: AtomicU64,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases").field("ttl", &self.ttl).field("held", &self.held_count()).finish_non_exhaustive()
    }
}

/// One stream's lease; released when dropped (with the stream's slot).
#[derive(Debug)]
pub struct Lease {
    leases: Arc<Leases>,
    id: String,
    subject: String,
    /// In `held` (renewed) until dropped.
    registered: bool,
    /// The store may hold it: release it on drop. Off only when the store
    /// said it did not take it.
    armed: bool,
}

impl Leases {
    /// Leases on `shared` that live `ttl` without a renewal.
    pub fn new(shared: Arc<SharedLimits>, ttl: Duration) -> Arc<Self> {
        let (released, queue) = mpsc::unbounded_channel();
        let mut bytes = [0u8; 8];
        let prefix = match getrandom::fill(&mut bytes) {
            Ok(()) => hex::encode(bytes),
            // Only uniqueness matters; the start time is a fair fallback.
            Err(_) => format!("{:x}", std::time::UNIX_EPOCH.elapsed().unwrap_or_default().as_nanos()),
        };
        Arc::new(Self {
            shared,
            ttl,
            held: Mutex::new(HashMap::new()),
            released,
            queue: Mutex::new(Some(queue)),
            prefix,
            next: AtomicU64::new(0),
        })
    }

    /// Takes a lease for one more of `subject`'s streams, or says why not.
    ///
    /// The guard exists before the store is asked, so a request dropped
    /// mid-call still releases what the store may have taken. It joins the
    /// renewals only once taken: a renewal adds lapsed leases back, and must
    /// not add one the cap refused. When the store cannot be asked and the
    /// policy is to fail open, the lease is kept anyway: the stream runs
    /// (under the local cap), and the next renewal that reaches the store
    /// counts it cluster-wide.
    pub(super) async fn acquire(self: &Arc<Self>, subject: &str, cap: usize) -> Result<Lease, SlotRefused> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut lease = Lease {
            leases: self.clone(),
            id: format!("{}:{n}", self.prefix),
            subject: subject.to_owned(),
            registered: false,
            armed: true,
        };
        // A store known to be down is not asked, so there is nothing to release.
        lease.armed = self.shared.store().is_reachable();
        let taken = self
            .shared
            .ask("streams_per_subject", self.shared.store().acquire_lease(subject, &lease.id, cap, self.ttl))
            .await
            .map_err(|_| SlotRefused::Unavailable)?;
        if taken.is_none() {
            // Failing open: the stream runs, and a renewal will count it.
            lease.armed = true;
        }
        if taken == Some(false) {
            lease.armed = false;
            return Err(SlotRefused::Subject { limit: cap });
        }
        self.held.lock().unwrap_or_else(PoisonError::into_inner).insert(lease.id.clone(), lease.subject.clone());
        lease.registered = true;
        Ok(lease)
    }

    /// Leases held now.
    pub fn held_count(&self) -> usize {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Renews and releases until `stop`, then releases what is left (a
    /// stopping replica gives its slots back at once rather than after the
    /// ttl). Runs once: a second call returns at once.
    pub async fn keep(self: Arc<Self>, stop: CancellationToken) {
        let Some(mut queue) = self.queue.lock().unwrap_or_else(PoisonError::into_inner).take() else { return };
        let mut renew = tokio::time::interval((self.ttl / 3).max(Duration::from_millis(10)));
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    while let Ok(pair) = queue.try_recv() {
                        batch.push(pair);
                    }
                    let _ = tokio::time::timeout(FINAL_RELEASE, self.release(&batch)).await;
                    return;
                }
                n = queue.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return;
                    }
                    self.release(&batch).await;
                    batch.clear();
                }
                _ = renew.tick() => self.renew().await,
            }
        }
    }

    /// One renewal of every held lease, [`BATCH`] per round trip.
    async fn renew(&self) {
        let all: Vec<Pair> = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, subject)| (subject.clone(), id.clone()))
            .collect();
        for chunk in all.chunks(BATCH) {
            match self.shared.store().renew_leases(chunk, self.ttl).await {
                Ok(0) => {}
                Ok(lapsed) => tracing::warn!(
                    lapsed,
                    "stream leases had lapsed (renewals failed for a whole lease ttl) and were added back; \
                     subjects may hold more than their cap until those streams end"
                ),
                Err(e) => {
                    self.shared.metrics().store_error("lease_renew");
                    self.shared.warn("lease_renew", &e.to_string());
                }
            }
        }
    }

    /// Releases ended streams' leases; on failure they lapse by themselves.
    async fn release(&self, pairs: &[Pair]) {
        for chunk in pairs.chunks(BATCH) {
            if let Err(e) = self.shared.store().release_leases(chunk).await {
                self.shared.metrics().store_error("lease_release");
                self.shared.warn("lease_release", &e.to_string());
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.registered {
            self.leases.held.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
        }
        if self.armed {
            // Fails only once the keeper has stopped with the process.
            let _ = self.leases.released.send((std::mem::take(&mut self.subject), std::mem::take(&mut self.id)));
        }
    }
}
