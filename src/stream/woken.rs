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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

struct Flag {
    /// The inner future's waker fired since it was last polled.
    woken: AtomicBool,
    /// The owner's task, woken along with the flag.
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Polls `F` on its first poll and afterwards only after `F`'s own waker
/// fired. `F` must register its waker whenever it returns `Pending`, as
/// every well-behaved future does.
pub struct OnlyWhenWoken<F> {
    inner: Pin<Box<F>>,
    flag: Arc<Flag>,
    waker: Waker,
    /// The owner's waker as last registered in `flag.task`.
    registered: Option<Waker>,
}

impl<F: Future> OnlyWhenWoken<F> {
    /// Wraps `inner`.
    pub fn new(inner: F) -> Self {
        let flag = Arc::new(Flag { woken: AtomicBool::new(true), task: AtomicWaker::new() });
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
        // The common case: one load and a pointer comparison. Not woken
        // since the owner's (same) waker was registered, so that waker is
        // still in place (a wake-up sets the flag before taking it).
        if !this.flag.woken.load(Ordering::Acquire) && this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        this.flag.woken.store(false, Ordering::Release);
        this.flag.task.register(cx.waker());
        if !this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            this.registered = Some(cx.waker().clone());
        }
        let mut inner_cx = Context::from_waker(&this.waker);
        let poll = this.inner.as_mut().poll(&mut inner_cx);
        if poll.is_pending() && this.flag.woken.load(Ordering::Acquire) {
            // Woken while being polled (the wake-up may have found no
            // owner's waker to take): look again.
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
}
