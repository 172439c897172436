//! Runs a stream's producer inside its first reader's connection task while
//! that reader keeps taking events: the common case (one client, reading)
//! then costs one task per stream and no cross-thread wake-up per event.
//!
//! The producer is an ordinary future and never learns where it runs. It
//! moves to a task of its own:
//! - when the connection goes (the [`Inline`] stream is dropped): generation
//!   continues for the detach grace, as before;
//! - when it has work but the connection stops polling it, because the
//!   client stopped reading and the socket is full (hyper then stops asking
//!   the body for more): the [`Supervisor`] notices within a few ticks, and
//!   backpressure and `slow_consumer` then work as with any reader.
//!
//! Nothing else changes: the producer still appends to the log, other
//! readers (resumes, replicas) still follow the log, and a moved producer
//! wakes its readers as it always did.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::Stream;
use futures_util::task::AtomicWaker;

use super::service::EventStream;
use crate::event::StreamEvent;
use crate::store::first_reader_polls_next;

/// A stream's producer: appends the stream's events to its log until it ends.
pub(super) type Producer = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// How often the supervisor looks for stalled inline producers.
const TICK: Duration = Duration::from_millis(25);
/// Ticks a woken producer may wait for its connection before it is moved to
/// a task of its own (75-100 ms: long against a poll, short against the
/// `max_lag` a stuck client is given).
const STALL_TICKS: u64 = 3;

/// The shared state of one inline producer.
struct Handoff {
    /// The producer while it runs inline; taken when it moves or ends.
    producer: Mutex<Option<Producer>>,
    /// The supervisor tick (plus one) at which the producer was woken and
    /// not polled since; 0 when it has not been woken.
    woken_at: AtomicU64,
    /// The connection's task, woken with the producer.
    task: AtomicWaker,
    /// The supervisor's clock.
    ticks: Arc<AtomicU64>,
}

impl Wake for Handoff {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let now = self.ticks.load(Ordering::Relaxed) + 1;
        let _ = self.woken_at.compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
        self.task.wake();
    }
}

impl Handoff {
    /// Moves the producer, if it still runs inline, to a task of its own.
    fn release(&self) {
        let producer = self.producer.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(producer) = producer {
            spawn(producer);
        }
    }

    /// [`Self::release`] when the producer was woken `STALL_TICKS` ago and
    /// its connection has not polled it since; false once it is no longer
    /// inline (to be forgotten).
    fn release_if_stalled(&self, now: u64) -> bool {
        let Ok(mut slot) = self.producer.try_lock() else { return true };
        if slot.is_none() {
            return false;
        }
        let woken_at = self.woken_at.load(Ordering::Acquire);
        if woken_at == 0 || now + 1 < woken_at + STALL_TICKS {
            return true;
        }
        if let Some(producer) = slot.take() {
            drop(slot);
            spawn(producer);
        }
        false
    }
}

/// Spawns a producer on the current runtime. Outside one (the runtime is
/// gone) it is dropped, which ends it as its generator's cancellation does.
fn spawn(producer: Producer) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(producer);
    }
}

/// Watches the inline producers of one stream service for stalls. Its task
/// starts with the first inline producer and ends with the service.
pub(crate) struct Supervisor {
    ticks: Arc<AtomicU64>,
    inline: Mutex<Vec<Weak<Handoff>>>,
    started: std::sync::Once,
}

impl Supervisor {
    /// A supervisor with nothing to watch yet.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            ticks: Arc::new(AtomicU64::new(0)),
            inline: Mutex::new(Vec::new()),
            started: std::sync::Once::new(),
        })
    }

    /// Runs `producer` inside the connection task that polls `events`
    /// while it does (see the module docs).
    pub(super) fn drive(self: &Arc<Self>, producer: Producer, events: EventStream) -> EventStream {
        let handoff = Arc::new(Handoff {
            producer: Mutex::new(Some(producer)),
            // Woken: the first poll runs it.
            woken_at: AtomicU64::new(self.ticks.load(Ordering::Relaxed) + 1),
            task: AtomicWaker::new(),
            ticks: self.ticks.clone(),
        });
        self.inline.lock().unwrap_or_else(PoisonError::into_inner).push(Arc::downgrade(&handoff));
        self.started.call_once(|| {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(watch(Arc::downgrade(self)));
            }
        });
        let waker = Waker::from(handoff.clone());
        Box::pin(Inline { events, handoff: Some(handoff), waker })
    }
}

/// The supervisor's task: every tick, moves stalled producers out and
/// forgets those no longer inline.
async fn watch(supervisor: Weak<Supervisor>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(supervisor) = supervisor.upgrade() else { return };
        let now = supervisor.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let mut inline = supervisor.inline.lock().unwrap_or_else(PoisonError::into_inner);
        inline.retain(|h| h.upgrade().is_some_and(|h| h.release_if_stalled(now)));
    }
}

/// A reader's events with its stream's producer polled first, on the
/// reader's own task.
struct Inline {
    events: EventStream,
    handoff: Option<Arc<Handoff>>,
    /// The producer's waker (the handoff's), made once.
    waker: Waker,
}

impl Stream for Inline {
    type Item = Arc<StreamEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut gone = false;
        if let Some(handoff) = &this.handoff {
            // Contended only while the supervisor moves it out.
            if let Ok(mut slot) = handoff.producer.try_lock() {
                if let Some(producer) = slot.as_mut() {
                    // Registered before the flag is looked at, so a wake-up
                    // in between reaches this task. Polled only when its own
                    // waker fired (or first): it is the connection's to
                    // drive, not to re-poll on every write.
                    handoff.task.register(cx.waker());
                    if handoff.woken_at.swap(0, Ordering::AcqRel) != 0
                        && first_reader_polls_next(|| producer.as_mut().poll(&mut Context::from_waker(&this.waker)))
                            .is_ready()
                    {
                        *slot = None;
                    }
                }
                gone = slot.is_none();
            }
        }
        if gone {
            this.handoff = None;
        }
        this.events.as_mut().poll_next(cx)
    }
}

impl Drop for Inline {
    fn drop(&mut self) {
        // The reader first: the moved producer then finds it detached.
        self.events = Box::pin(futures_util::stream::empty());
        if let Some(handoff) = self.handoff.take() {
            handoff.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use futures_util::StreamExt;
    use tokio::task::Id;

    use super::*;

    /// A producer that records the task of each of its polls and finishes
    /// after `ticks` timer ticks of 1 ms.
    fn producer(ticks: usize, seen: Arc<Mutex<Vec<Option<Id>>>>) -> Producer {
        Box::pin(async move {
            for _ in 0..ticks {
                seen.lock().unwrap_or_else(PoisonError::into_inner).push(tokio::task::try_id());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    }

    /// Events that end once `ticks` reads found the producer has gone on.
    fn events(seen: Arc<Mutex<Vec<Option<Id>>>>, until: usize) -> EventStream {
        Box::pin(futures_util::stream::poll_fn(move |cx| {
            if seen.lock().unwrap_or_else(PoisonError::into_inner).len() >= until {
                return Poll::Ready(None);
            }
            // The test's own producer wakes this task through the handoff.
            let _ = cx;
            Poll::Pending
        }))
    }

    #[tokio::test]
    async fn a_reading_connection_drives_its_producer_on_its_own_task() {
        let supervisor = Supervisor::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stream = supervisor.drive(producer(20, seen.clone()), events(seen.clone(), 20));
        let reader = tokio::spawn(async move {
            let mut stream = stream;
            while stream.next().await.is_some() {}
            tokio::task::try_id()
        });
        let reader_task = tokio::time::timeout(Duration::from_secs(10), reader).await.ok().and_then(Result::ok);
        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(seen.len(), 20, "the producer ran to its end");
        assert!(reader_task.is_some());
        assert!(seen.iter().all(|task| *task == reader_task.flatten()), "every producer poll on the reader's task");
    }

    #[tokio::test]
    async fn a_producer_whose_connection_stops_polling_moves_to_a_task_of_its_own() {
        let supervisor = Supervisor::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut stream = supervisor.drive(producer(40, seen.clone()), events(seen.clone(), usize::MAX));
        // Polled once (the producer starts inline), then never again: the
        // client stopped reading.
        assert!(futures_util::FutureExt::now_or_never(stream.next()).is_none());
        for _ in 0..500 {
            if seen.lock().unwrap_or_else(PoisonError::into_inner).len() >= 40 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(seen.len(), 40, "the stalled producer was moved and ran to its end");
        assert!(seen.last().is_some_and(Option::is_some), "on a task of its own");
        drop(stream);
    }

    #[tokio::test]
    async fn a_dropped_connection_hands_its_producer_to_a_task_of_its_own() {
        let supervisor = Supervisor::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut stream = supervisor.drive(producer(30, seen.clone()), events(seen.clone(), usize::MAX));
        assert!(futures_util::FutureExt::now_or_never(stream.next()).is_none());
        drop(stream);
        for _ in 0..500 {
            if seen.lock().unwrap_or_else(PoisonError::into_inner).len() >= 30 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen.lock().unwrap_or_else(PoisonError::into_inner).len(), 30, "generation went on");
    }
}
