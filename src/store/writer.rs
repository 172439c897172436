//! [`StreamWriter`]: the producer's handle on its stream's log. Appends go
//! to the local log, which readers here follow, and, with a shared store,
//! are copied to Redis in order for readers on other replicas. The
//! producer never learns which store runs.

use std::sync::Arc;

use super::memory::LiveStream;
use super::redis::Replicator;
use crate::event::{ErrorCode, Outcome, StreamEvent};

/// Writes one stream's log; made by [`super::Store::create`].
#[derive(Debug)]
pub struct StreamWriter {
    log: Arc<LiveStream>,
    replicator: Option<Replicator>,
}

impl StreamWriter {
    pub(super) fn new(log: Arc<LiveStream>, replicator: Option<Replicator>) -> Self {
        Self { log, replicator }
    }

    /// The local log: its facts drive the producer's flow control.
    pub fn log(&self) -> &LiveStream {
        &self.log
    }

    /// Appends without waking the readers (the producer wakes them once per
    /// batch, [`LiveStream::wake_readers`]). Returns whether the shared
    /// store is far behind (half its queue): the producer should then wait
    /// for [`Self::replicated`] before appending more, or an unpaced stream
    /// would outrun Redis and end with `store_unavailable`.
    pub fn append_quietly(&self, event: StreamEvent) -> bool {
        match &self.replicator {
            Some(replicator) => {
                let event = Arc::new(event);
                self.log.append_quietly(&event, Some(&event));
                replicator.push(event)
            }
            // The common case allocates nothing per event: the log copies
            // the text into its buffer.
            None => {
                self.log.append_quietly(&event, None);
                false
            }
        }
    }

    /// Appends and wakes the readers.
    pub fn append(&self, event: StreamEvent) {
        let _behind = self.append_quietly(event);
        self.log.wake_readers();
    }

    /// Waits until the shared store has caught up to a quarter of its queue
    /// (bounded, as the terminal event's wait), or replication has failed.
    /// Returns at once without one.
    pub async fn replicated(&self) {
        if let Some(replicator) = &self.replicator {
            replicator.caught_up().await;
        }
    }

    /// Appends the terminal event so that no reader sees it before the
    /// shared store holds it: with Redis it is replicated first, then logged
    /// here. Otherwise a client could get `done` from this replica, lose it
    /// with this replica, and resume elsewhere into a log without it.
    /// Costs one Redis round trip per stream, at its end.
    ///
    /// If Redis does not confirm it (replication failed, or no answer within
    /// the bound), the stream ends here with `store_unavailable` instead: a
    /// `done` that other replicas may never see would be contradicted by
    /// their `generator_lost` on a resume. Returns how the stream ended.
    pub async fn append_terminal(&self, event: StreamEvent) -> Option<Outcome> {
        let mut event = Arc::new(event);
        if let Some(replicator) = &self.replicator {
            let seq = event.seq().unwrap_or(0);
            let confirmed = !replicator.has_failed() && {
                replicator.push(event.clone());
                replicator.written_through(seq).await
            };
            let already = matches!(*event, StreamEvent::Error { code: ErrorCode::StoreUnavailable, .. });
            if !confirmed && !already {
                event = Arc::new(StreamEvent::Error {
                    stream_id: self.log.id,
                    seq,
                    code: ErrorCode::StoreUnavailable,
                    message: "the shared store did not confirm the end of the stream".to_owned(),
                });
            }
        }
        self.log.append_quietly(&event, Some(&event));
        self.log.wake_readers();
        event.outcome()
    }

    /// Whether the stream was stopped because the shared store failed.
    pub fn store_failed(&self) -> bool {
        self.replicator.as_ref().is_some_and(Replicator::has_failed)
    }

    /// Before giving up on a stream nobody reads here: a last look for a
    /// reader on another replica (its periodic announcement may not have
    /// arrived yet); if there is one, the stream is held for it.
    pub async fn reader_elsewhere(&self) -> bool {
        match &self.replicator {
            Some(replicator) => replicator.hold_for_remote_reader().await,
            None => false,
        }
    }

    /// Waits (bounded) until everything appended, the terminal event
    /// included, has reached the shared store and the lease is released.
    pub async fn finish(self) {
        if let Some(replicator) = self.replicator {
            replicator.finish().await;
        }
    }
}
