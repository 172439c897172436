//! Who polls a stream's producer.
//!
//! A producer in a task of its own costs two task wake-ups per event, one
//! of them across threads: the producer's when its pace timer (or its
//! upstream) fires, then the connection's when the event is logged. In the
//! common case, one client reading the stream it opened, that second task
//! is not needed: the connection's own task can poll the producer whenever
//! it wakes, and the event is logged and written in one wake-up.
//!
//! So a connection that promises to poll the producer on every one of its
//! wake-ups, writes included, offers a [`DriveHook`] with its request (the
//! HTTP/1.1 path does; hyper's connections, whose writes tokengate does not
//! see, do not). The stream it opens then runs *inline*: its first reader
//! polls the producer each time it waits for events, and the connection
//! polls it while a write is pending, so a slow client still meets the
//! producer's backpressure and `max_lag` as before. When that reader goes
//! (the client hung up, the response ended or was aborted), the producer
//! moves to a task of its own and runs on exactly as a spawned one would:
//! detach grace, resume, replicas. Nothing else about the stream changes;
//! only who polls it.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};

use crate::metrics::Metrics;

/// A producer's future, boxed so that it can move to a task of its own.
pub(super) type ProducerFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The slot a connection offers for the producer of the stream its request
/// opens (see the module docs). One per request; a request that opens no
/// stream leaves it empty.
#[derive(Clone, Default)]
pub struct DriveHook(Arc<Slot>);

/// The producer while it runs inline; empty before it is adopted, once it
/// has ended, and once it has moved to its own task.
#[derive(Default)]
struct Slot(Mutex<Option<ProducerFuture>>, OnceLock<Arc<Metrics>>);

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Option<ProducerFuture>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Polls the producer if it runs inline here; it is dropped once ended.
    fn poll(&self, cx: &mut Context<'_>) {
        let mut slot = self.lock();
        if let Some(producer) = slot.as_mut()
            && producer.as_mut().poll(cx).is_ready()
        {
            *slot = None;
        }
    }
}

impl fmt::Debug for DriveHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriveHook").field("inline", &self.0.lock().is_some()).finish()
    }
}

impl DriveHook {
    /// An empty hook, for one request.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `producer` to run inline, unless the hook already drives one;
    /// `Err` gives it back, to be spawned.
    pub(super) fn adopt(&self, producer: ProducerFuture, metrics: Arc<Metrics>) -> Result<Inline, ProducerFuture> {
        let mut slot = self.0.lock();
        if slot.is_some() {
            return Err(producer);
        }
        *slot = Some(producer);
        // Counts the move, if there is one.
        let _ = self.0.1.set(metrics);
        Ok(Inline(self.0.clone()))
    }

    /// Polls the producer on the caller's wake-ups, for as long as it runs
    /// inline; never completes. The connection awaits this alongside a
    /// pending write, so the producer (its window, its `max_lag`, a
    /// cancel) is not held up by a client that reads slowly.
    pub async fn drive(&self) {
        poll_fn(|cx| {
            self.0.poll(cx);
            Poll::<()>::Pending
        })
        .await;
    }
}

/// The first reader's hold on an inline producer. Dropping it (the reader
/// detaches) moves a producer that has not ended to a task of its own.
pub(super) struct Inline(Arc<Slot>);

impl Inline {
    /// Polls the producer with the reader's context.
    pub(super) fn poll(&self, cx: &mut Context<'_>) {
        self.0.poll(cx);
    }
}

impl Drop for Inline {
    fn drop(&mut self) {
        let Some(producer) = self.0.lock().take() else { return };
        // A producer that panicked is not polled again (dropping it frees
        // its slot); nor can one move once the runtime is gone.
        if std::thread::panicking() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Its first poll in the new task registers that task's waker
            // everywhere the producer waits: a future must only be woken
            // through the waker of its latest poll.
            runtime.spawn(producer);
            if let Some(metrics) = self.0.1.get() {
                metrics.producer_moved();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A producer that counts its polls and ends once `release` fires.
    fn producer(polls: Arc<AtomicUsize>, release: tokio::sync::oneshot::Receiver<()>) -> ProducerFuture {
        Box::pin(async move {
            let mut release = release;
            poll_fn(|cx| {
                polls.fetch_add(1, Ordering::SeqCst);
                Pin::new(&mut release).poll(cx).map(|_| ())
            })
            .await;
        })
    }

    #[tokio::test]
    async fn a_hook_adopts_one_producer_and_gives_back_a_second() {
        let hook = DriveHook::new();
        let (_tx, rx) = tokio::sync::oneshot::channel();
        let first = hook.adopt(producer(Arc::default(), rx), Arc::default());
        assert!(first.is_ok());
        let (_tx2, rx2) = tokio::sync::oneshot::channel();
        assert!(hook.adopt(producer(Arc::default(), rx2), Arc::default()).is_err(), "a second producer is spawned");
    }

    #[tokio::test]
    async fn a_producer_left_by_its_reader_runs_on_in_a_task_of_its_own() {
        let hook = DriveHook::new();
        let metrics = Arc::new(Metrics::new());
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let counted = polls.clone();
        let body = producer(polls.clone(), rx);
        let inline = hook
            .adopt(
                Box::pin(async move {
                    body.await;
                    let _ = ended_tx.send(counted.load(Ordering::SeqCst));
                }),
                metrics.clone(),
            )
            .unwrap_or_else(|_| unreachable!());
        poll_fn(|cx| {
            inline.poll(cx);
            Poll::Ready(())
        })
        .await;
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled inline");
        drop(inline);
        // Nothing polls it inline any more: only its own task can end it.
        assert_eq!(format!("{hook:?}"), "DriveHook { inline: false }");
        let _ = tx.send(());
        let polled = tokio::time::timeout(Duration::from_secs(5), ended).await;
        assert!(matches!(polled, Ok(Ok(n)) if n >= 2), "the producer did not end on its own: {polled:?}");
        assert!(metrics.render().contains("tokengate_producers_moved_total 1"), "the move is counted");
    }

    #[tokio::test]
    async fn an_ended_producer_is_dropped_and_not_spawned() {
        let hook = DriveHook::new();
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inline = hook.adopt(producer(polls.clone(), rx), Arc::default()).unwrap_or_else(|_| unreachable!());
        let _ = tx.send(());
        tokio::time::timeout(Duration::from_secs(1), async {
            // `drive` never completes; one poll ends the producer.
            let _ = futures_util::poll!(Box::pin(hook.drive()));
        })
        .await
        .unwrap_or_else(|_| unreachable!());
        assert_eq!(format!("{hook:?}"), "DriveHook { inline: false }", "ended and dropped");
        drop(inline);
        assert_eq!(polls.load(Ordering::SeqCst), 1);
    }
}
