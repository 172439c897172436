//! Concurrent stream slots: a global cap and a per-subject cap. A slot is an
//! RAII permit taken before the generator starts and moved into the stream's
//! task, so it is freed the moment the stream ends for any reason (done,
//! error, client gone, cancel, shutdown). The count doubles as "streams
//! open", which shutdown waits on.
//!
//! With a shared store the per-subject cap holds for the whole cluster: the
//! permit also carries a [`Lease`] (see [`super::leases`]). The local
//! counts are kept all the same: they are checked first (a subject at its
//! cap here is at it everywhere), and they are the cap that applies when
//! the store fails and the policy is to fail open. The global cap stays
//! per process: it protects this process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::leases::{Lease, Leases};

/// Why no slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SlotRefused {
    /// The subject already holds its maximum.
    #[error("this subject already has {limit} streams open")]
    Subject {
        /// The per-subject cap.
        limit: usize,
    },
    /// The server holds its maximum.
    #[error("the server is at its limit of {limit} open streams")]
    Global {
        /// The global cap.
        limit: usize,
    },
    /// The cluster-wide count could not be asked and the policy is to fail
    /// closed.
    #[error("stream limits cannot be checked right now")]
    Unavailable,
}

/// The slot table.
#[derive(Debug)]
pub struct StreamSlots {
    /// An `Arc` so a permit can be owned (`'static`) and moved into the
    /// stream's task with the stream.
    global: Arc<Semaphore>,
    /// Kept for the refusal's message: a semaphore does not say its size.
    max_global: usize,
    max_per_subject: usize,
    /// Open streams per subject; an entry is removed at zero, so the map
    /// holds only subjects with open streams.
    per_subject: Mutex<HashMap<String, usize>>,
    /// Streams open, for metrics and shutdown, read without taking the lock.
    open: AtomicUsize,
    /// Woken when `open` drops to zero, so shutdown waits without polling.
    idle: Notify,
    /// Cluster-wide per-subject leases, with a shared store.
    leases: Option<Arc<Leases>>,
}

/// One open stream's slot.
#[derive(Debug)]
pub struct SlotPermit {
    slots: Arc<StreamSlots>,
    /// Which per-subject count to take back on drop.
    subject: String,
    /// Returned to the semaphore by its own drop, after ours.
    _global: OwnedSemaphorePermit,
    /// The cluster-wide lease, released by its own drop.
    _lease: Option<Lease>,
}

impl StreamSlots {
    /// A table with the given caps, for this process alone.
    pub fn new(max_global: usize, max_per_subject: usize) -> Arc<Self> {
        Self::with_leases(max_global, max_per_subject, None)
    }

    /// A table whose per-subject cap also holds cluster-wide through
    /// `leases` (when given).
    pub fn with_leases(max_global: usize, max_per_subject: usize, leases: Option<Arc<Leases>>) -> Arc<Self> {
        Arc::new(Self {
            global: Arc::new(Semaphore::new(max_global)),
            max_global,
            max_per_subject,
            per_subject: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
            idle: Notify::new(),
            leases,
        })
    }

    /// Takes a slot for `subject`: [`Self::try_acquire`] here, then, with a
    /// shared store, a lease within the cluster-wide cap. A refused lease
    /// drops the local slot again.
    pub async fn acquire(self: &Arc<Self>, subject: &str) -> Result<SlotPermit, SlotRefused> {
        let mut permit = self.try_acquire(subject)?;
        if let Some(leases) = &self.leases {
            permit._lease = Some(leases.acquire(subject, self.max_per_subject).await?);
        }
        Ok(permit)
    }

    /// Keeps the leases (renewals, releases) until `stop`; returns at once
    /// without a shared store.
    pub async fn keep_leases(&self, stop: CancellationToken) {
        if let Some(leases) = &self.leases {
            leases.clone().keep(stop).await;
        }
    }

    /// Takes a slot for `subject` in this process, or says which cap is in
    /// the way (the subject's first: its own excess should not look like
    /// server load).
    ///
    /// The table stays locked while the global permit is taken, so two
    /// requests of one subject cannot both pass its check.
    pub fn try_acquire(self: &Arc<Self>, subject: &str) -> Result<SlotPermit, SlotRefused> {
        let mut table = self.per_subject.lock().unwrap_or_else(PoisonError::into_inner);
        let held = table.get(subject).copied().unwrap_or(0);
        if held >= self.max_per_subject {
            return Err(SlotRefused::Subject { limit: self.max_per_subject });
        }
        let global =
            self.global.clone().try_acquire_owned().map_err(|_| SlotRefused::Global { limit: self.max_global })?;
        table.insert(subject.to_owned(), held + 1);
        self.open.fetch_add(1, Ordering::AcqRel);
        Ok(SlotPermit { slots: self.clone(), subject: subject.to_owned(), _global: global, _lease: None })
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Subjects with at least one open stream.
    pub fn subjects(&self) -> usize {
        self.per_subject.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Resolves once no stream is open. The `Notified` future is made
    /// before the count is read, so a last stream ending in between still
    /// wakes it.
    pub async fn until_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        let mut table = self.slots.per_subject.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = table.get_mut(&self.subject) {
            *held -= 1;
            if *held == 0 {
                table.remove(&self.subject);
            }
        }
        drop(table);
        if self.slots.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.slots.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_release() {
        let slots = StreamSlots::new(3, 2);
        let a1 = slots.try_acquire("a");
        let a2 = slots.try_acquire("a");
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(slots.try_acquire("a").err(), Some(SlotRefused::Subject { limit: 2 }));
        let b1 = slots.try_acquire("b");
        assert!(b1.is_ok());
        assert_eq!(slots.try_acquire("c").err(), Some(SlotRefused::Global { limit: 3 }));
        assert_eq!((slots.open(), slots.subjects()), (3, 2));
        drop(a1);
        assert!(slots.try_acquire("c").is_ok());
        drop((a2, b1));
        assert_eq!((slots.open(), slots.subjects()), (0, 0));
    }

    #[test]
    fn without_a_shared_store_acquire_is_the_local_table_and_never_waits() {
        use futures_util::FutureExt;
        let slots = StreamSlots::new(3, 1);
        let first = slots.acquire("a").now_or_never();
        assert!(matches!(first, Some(Ok(_))));
        let second = slots.acquire("a").now_or_never().map(|r| r.err());
        assert_eq!(second, Some(Some(SlotRefused::Subject { limit: 1 })));
        drop(first);
        assert_eq!(slots.open(), 0);
    }
}
