//! Reading a stream that another replica produces, through the shared
//! store: [`RemoteCursor`] replays what Redis holds and says when to look
//! again. It also tells the producing replica, once a second, that someone
//! reads here (so its detach grace does not end the stream), and notices
//! when the producer's lease lapsed without a terminal event.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::StoreError;
use super::cursor::Read;
use super::redis::{REMOTE_POLL, RedisStore};
use crate::event::{StreamEvent, StreamId};

/// How often a remote reader renews its announcement.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

/// A reader's position in a stream produced elsewhere.
#[derive(Debug)]
pub struct RemoteCursor {
    redis: Arc<RedisStore>,
    stream_id: StreamId,
    from: u64,
    announced: Option<Instant>,
    /// The lease was seen missing once: the next empty read confirms the
    /// producer is gone (the terminal event and the lease's removal are
    /// written together, so one more read tells a finish from a death).
    lease_missing: bool,
}

impl RemoteCursor {
    /// A cursor at `from` of `stream_id`.
    pub(super) fn new(redis: Arc<RedisStore>, stream_id: StreamId, from: u64) -> Self {
        Self { redis, stream_id, from, announced: None, lease_missing: false }
    }

    /// The stream read.
    pub fn stream_id(&self) -> StreamId {
        self.stream_id
    }

    /// Where the reader started.
    pub fn from(&self) -> u64 {
        self.from
    }

    /// Adds events from `from` on (at most `max`) to `out`.
    pub async fn read(
        &mut self,
        from: u64,
        max: usize,
        out: &mut VecDeque<Arc<StreamEvent>>,
    ) -> Result<Read, StoreError> {
        if self.announced.is_none_or(|at| at.elapsed() >= ANNOUNCE_EVERY) {
            // Best effort: a failed announcement shows as a failed read.
            let _ = self.redis.mark_remote_reader(&self.stream_id, self.announced.is_none()).await;
            self.announced = Some(Instant::now());
        }
        loop {
            match self.redis.read(&self.stream_id, from, max).await? {
                Err(first_kept) => return Ok(Read::Gap { first_kept }),
                Ok(events) if !events.is_empty() => {
                    self.lease_missing = false;
                    out.extend(events.into_iter().map(Arc::new));
                    return Ok(Read::Events);
                }
                Ok(_) => {}
            }
            if self.redis.leased(&self.stream_id).await? {
                self.lease_missing = false;
                return Ok(Read::CaughtUp);
            }
            if self.lease_missing {
                return Ok(Read::ProducerLost);
            }
            // Read once more after noticing.
            self.lease_missing = true;
        }
    }

    /// Resolves when it is worth reading again (Redis is polled).
    pub async fn changed(&self) {
        tokio::time::sleep(REMOTE_POLL).await;
    }
}
