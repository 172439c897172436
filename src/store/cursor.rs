//! [`Cursor`]: one reader's position in one stream's log, whichever store
//! holds it. The lifecycle's reader ([`crate::stream::follow`]) is written
//! once against it; the memory and Redis logs differ only in how a read is
//! done and how a reader learns that there is more.

use std::collections::VecDeque;
use std::sync::Arc;

use super::StoreError;
use super::memory::Reader;
use super::remote::RemoteCursor;
use crate::event::{StreamEvent, StreamId};

/// What a reader found at its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Events were added to the reader's batch.
    Events,
    /// Nothing new yet.
    CaughtUp,
    /// The position was already dropped from the log.
    Gap {
        /// The oldest sequence number still kept.
        first_kept: u64,
    },
    /// The stream will never continue: its producer is gone without a
    /// terminal event (its replica died).
    ProducerLost,
}

/// A reader's position in a stream's log.
#[derive(Debug)]
pub enum Cursor {
    /// A stream produced by this process: reads lock-free of I/O, and the
    /// producer wakes the reader on append.
    Local(Reader),
    /// A stream produced by another replica, read from the shared store.
    Remote(RemoteCursor),
}

impl Cursor {
    /// The stream read.
    pub fn stream_id(&self) -> StreamId {
        match self {
            Cursor::Local(r) => r.stream_id(),
            Cursor::Remote(r) => r.stream_id(),
        }
    }

    /// The first sequence number this reader asked for.
    pub fn from(&self) -> u64 {
        match self {
            Cursor::Local(r) => r.from(),
            Cursor::Remote(r) => r.from(),
        }
    }

    /// Adds the events from `from` on (at most `max`) to `out`, or says why
    /// there are none.
    pub async fn read(
        &mut self,
        from: u64,
        max: usize,
        out: &mut VecDeque<Arc<StreamEvent>>,
    ) -> Result<Read, StoreError> {
        match self {
            Cursor::Local(r) => Ok(r.read(from, max, out)),
            // Boxed: inline, the Redis round trip's state would make every
            // reader's future larger, local ones included.
            Cursor::Remote(r) => Box::pin(r.read(from, max, out)).await,
        }
    }

    /// [`Self::read`] when it needs no I/O (a local log), without making a
    /// future; `None` for a remote log, which must be read with
    /// [`Self::read`]. The reader's hot path: once per batch of events.
    pub fn read_now(&mut self, from: u64, max: usize, out: &mut VecDeque<Arc<StreamEvent>>) -> Option<Read> {
        match self {
            Cursor::Local(r) => Some(r.read(from, max, out)),
            Cursor::Remote(_) => None,
        }
    }

    /// Resolves when a read at `from` may find something new.
    pub async fn changed(&self, from: u64) {
        match self {
            Cursor::Local(r) => r.changed(from).await,
            // Boxed for the same reason (a timer is larger than a waker).
            Cursor::Remote(r) => Box::pin(r.changed()).await,
        }
    }

    /// Forgets the waker [`Self::changed`] registered, so that an append
    /// wakes no one until it is polled again: for a reader that polls the
    /// producer in its own task, and looks at the log right after.
    pub fn unwatch(&self) {
        if let Cursor::Local(r) = self {
            r.unwatch();
        }
    }

    /// The client took everything before `next` (local readers hold the
    /// producer's window open; remote ones are not counted).
    pub fn advance(&self, next: u64) {
        if let Cursor::Local(r) = self {
            r.advance(next);
        }
    }
}
