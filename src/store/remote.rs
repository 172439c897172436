//! Reading a stream that another replica produces, through the shared
//! store: [`RemoteCursor`] replays what Redis holds, then follows the
//! stream's live end through this replica's
//! [`StreamFollower`](super::redis::StreamFollower), which wakes it when
//! new events are in and hands them over. It also tells the producing
//! replica, once a second, that someone reads here (so its detach grace
//! does not end the stream), and notices when the producer's lease lapsed
//! without a terminal event.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::StoreError;
use super::cursor::Read;
use super::redis::{FollowGuard, RedisStore, StreamFollower, TailRead};
use crate::event::{StreamEvent, StreamId};

/// How often the readers of a stream here renew their announcement.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

/// How long a caught-up reader trusts the follower alone: after this long
/// without news it reads Redis itself, which notices a lapsed lease
/// (`generator_lost`), a failing store, or anything the follower missed.
/// With the follower down (reconnecting), also how often it polls Redis.
const VERIFY_AFTER: Duration = Duration::from_secs(1);

/// A reader's position in a stream produced elsewhere.
///
/// Small and boxed inside: every open stream's reader holds a cursor, and
/// local ones should not pay for the remote one's state.
#[derive(Debug)]
pub struct RemoteCursor {
    stream_id: StreamId,
    from: u64,
    state: Box<State>,
}

#[derive(Debug)]
struct State {
    redis: Arc<RedisStore>,
    follower: Arc<StreamFollower>,
    /// When this cursor last announced itself (before it follows a tail,
    /// which then keeps the stream's announcement).
    announced: Option<Instant>,
    /// The lease was seen missing once: the next empty read confirms the
    /// producer is gone (the terminal event and the lease's removal are
    /// written together, so one more read tells a finish from a death).
    lease_missing: bool,
    /// The stream's tail at this replica's follower, taken once the cursor
    /// has caught up with Redis (history is replayed from Redis).
    tail: Option<FollowGuard>,
    /// The tail's version at the last read: [`RemoteCursor::changed`]
    /// returns at once if it moved since.
    seen: u64,
    /// When the cursor reads Redis itself again unless events come first.
    verify_at: Instant,
}

impl RemoteCursor {
    /// A cursor at `from` of `stream_id`.
    pub(super) fn new(redis: Arc<RedisStore>, follower: Arc<StreamFollower>, stream_id: StreamId, from: u64) -> Self {
        let state = State {
            redis,
            follower,
            announced: None,
            lease_missing: false,
            tail: None,
            seen: 0,
            verify_at: Instant::now(),
        };
        Self { stream_id, from, state: Box::new(state) }
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
    ///
    /// From the tail when it holds them or knows there are none yet (no
    /// Redis command), else, and when a check is due, from Redis.
    pub async fn read(
        &mut self,
        from: u64,
        max: usize,
        out: &mut VecDeque<Arc<StreamEvent>>,
    ) -> Result<Read, StoreError> {
        let id = self.stream_id;
        let s = &mut *self.state;
        let due = match &s.tail {
            Some(tail) => tail.tail().announce_due(ANNOUNCE_EVERY),
            None => s.announced.is_none_or(|at| at.elapsed() >= ANNOUNCE_EVERY),
        };
        if due {
            // Best effort: a failed announcement shows as a failed read.
            let _ = s.redis.mark_remote_reader(&id, s.announced.is_none()).await;
            s.announced = Some(Instant::now());
        }
        loop {
            if let Some(tail) = &s.tail {
                let tail = tail.tail();
                // Before looking: what comes in meanwhile moves it.
                s.seen = tail.version();
                if s.follower.is_following() {
                    match tail.read(from, max, out) {
                        TailRead::Events => {
                            s.lease_missing = false;
                            s.verify_at = Instant::now() + VERIFY_AFTER;
                            return Ok(Read::Events);
                        }
                        TailRead::CaughtUp if Instant::now() < s.verify_at => return Ok(Read::CaughtUp),
                        TailRead::CaughtUp | TailRead::Behind => {}
                    }
                }
            }
            match s.redis.read(&id, from, max).await? {
                Err(first_kept) => return Ok(Read::Gap { first_kept }),
                Ok(events) if !events.is_empty() => {
                    s.lease_missing = false;
                    s.verify_at = Instant::now() + VERIFY_AFTER;
                    out.extend(events.into_iter().map(Arc::new));
                    return Ok(Read::Events);
                }
                Ok(_) => {}
            }
            if s.redis.leased(&id).await? {
                s.lease_missing = false;
                s.verify_at = Instant::now() + VERIFY_AFTER;
                if s.tail.is_none() {
                    // Caught up: follow from here. The stream's tail may
                    // exist already and hold more: look at it once.
                    s.tail = Some(s.follower.follow(id, from));
                    if s.follower.is_following() {
                        continue;
                    }
                }
                return Ok(Read::CaughtUp);
            }
            if s.lease_missing {
                return Ok(Read::ProducerLost);
            }
            // Read once more after noticing.
            s.lease_missing = true;
        }
    }

    /// Resolves when it is worth reading again: the follower read something
    /// for this stream (or lost or regained Redis), or a check of Redis is
    /// due.
    pub async fn changed(&self) {
        let s = &*self.state;
        match &s.tail {
            Some(tail) => tail.tail().changed(s.seen, s.verify_at).await,
            None => tokio::time::sleep_until(s.verify_at).await,
        }
    }
}
