//! [`OnlyWhenWoken`]: a future that its owner may poll on every wake-up but
//! that is itself polled only when its own waker fired.
//!
//! A stream's producer and readers race the per-event work against futures
//! that almost never complete (cancellation, shutdown, abandonment).
//! `select!` polls every branch on every wake-up, and polling those (a
//! `CancellationToken` check locks a mutex, a `Notified` poll another) was a
//! measurable share of the per-event cost. Behind this wrapper such a
//! branch costs one atomic swap until it is actually woken.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

struct Flag {
    /// The inner future's waker fired since it was last polled.
    woken: AtomicBool,
    /// The owner's task, woken along with the flag. Kept (not taken) by a
    /// wake-up, so the owner need not register it again after one; both
    /// sides lock only after an actual wake-up or a change of owner waker.
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = self.task.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            task.wake_by_ref();
        }
    }
}

/// Polls `F` on its first poll and afterwards only after `F`'s own waker
/// fired. `F` must register its waker whenever it returns `Pending`, as
/// every well-behaved future does.
pub struct OnlyWhenWoken<F> {
    inner: Pin<Box<F>>,
    flag: Arc<Flag>,
    waker: Waker,
    /// A copy of the owner's waker in `flag.task` (only this side writes
    /// it), compared without the lock.
    registered: Option<Waker>,
}

impl<F: Future> OnlyWhenWoken<F> {
    /// Wraps `inner`.
    pub fn new(inner: F) -> Self {
        let flag = Arc::new(Flag { woken: AtomicBool::new(true), task: Mutex::new(None) });
        let waker = Waker::from(flag.clone());
        Self { inner: Box::pin(inner), flag, waker, registered: None }
    }

    /// Whether the inner future may have progressed since its last poll
    /// (true before the first): when false, it is certainly still pending.
    pub fn may_be_ready(&self) -> bool {
        self.flag.woken.load(Ordering::Acquire)
    }
}

impl<F: Future> Future for OnlyWhenWoken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // The common case: one load and a pointer comparison. Not woken,
        // and the owner's waker in place is the one to wake.
        let same_owner = this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if same_owner && !this.flag.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        if !same_owner {
            *this.flag.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
            this.registered = Some(cx.waker().clone());
        }
        this.flag.woken.store(false, Ordering::Release);
        let mut inner_cx = Context::from_waker(&this.waker);
        let poll = this.inner.as_mut().poll(&mut inner_cx);
        if poll.is_pending() && this.flag.woken.load(Ordering::Acquire) {
            // Woken while being polled: look again.
            cx.waker().wake_by_ref();
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test]
    async fn polls_the_inner_future_only_after_its_waker_fired() {
        let polls = Arc::new(AtomicUsize::new(0));
        let notify = Arc::new(tokio::sync::Notify::new());
        let counted = {
            let (polls, notify) = (polls.clone(), notify.clone());
            async move {
                let notified = notify.notified();
                tokio::pin!(notified);
                std::future::poll_fn(|cx| {
                    polls.fetch_add(1, Ordering::SeqCst);
                    notified.as_mut().poll(cx)
                })
                .await
            }
        };
        let mut watch = OnlyWhenWoken::new(counted);
        assert!(watch.may_be_ready());
        // Polled by its owner many times: the inner future only once.
        for _ in 0..100 {
            assert!(futures_util::FutureExt::now_or_never(&mut watch).is_none());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        assert!(!watch.may_be_ready());
        notify.notify_waiters();
        assert!(watch.may_be_ready());
        let finished = tokio::time::timeout(std::time::Duration::from_secs(5), &mut watch).await;
        assert!(finished.is_ok(), "not woken");
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_wake_up_reaches_the_owners_latest_waker() {
        let notify = Arc::new(tokio::sync::Notify::new());
        // Woken many times, never ready: the abandon watch's shape.
        let never_ready = {
            let notify = notify.clone();
            async move {
                loop {
                    notify.notified().await;
                }
            }
        };
        let mut watch = std::pin::pin!(OnlyWhenWoken::new(never_ready));
        let (first, second) = (Arc::new(Counter(AtomicUsize::new(0))), Arc::new(Counter(AtomicUsize::new(0))));
        let (first_waker, second_waker) = (Waker::from(first.clone()), Waker::from(second.clone()));
        assert!(watch.as_mut().poll(&mut Context::from_waker(&first_waker)).is_pending());
        for round in 1..=3 {
            notify.notify_waiters();
            assert_eq!(first.0.load(Ordering::SeqCst), round, "wake-up {round} lost");
            // Polled after each wake-up, the owner's waker stays registered.
            assert!(watch.as_mut().poll(&mut Context::from_waker(&first_waker)).is_pending());
        }
        // The owner's waker changes: the next wake-up reaches the new one.
        assert!(watch.as_mut().poll(&mut Context::from_waker(&second_waker)).is_pending());
        notify.notify_waiters();
        assert_eq!((first.0.load(Ordering::SeqCst), second.0.load(Ordering::SeqCst)), (3, 1));
    }
}
