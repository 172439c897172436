//! Following stream logs that other replicas produce: one [`StreamFollower`]
//! per replica waits for new entries in every log that a local
//! [`RemoteCursor`](crate::store::RemoteCursor) has caught up with, with one
//! blocking `XREAD` on a connection of its own, and hands what it read to
//! those cursors through a [`Tail`] per stream (its newest events and a
//! wake-up).
//!
//! A reader following the live end of a stream so costs Redis nothing per
//! event and nothing per tick: the follower reads each new entry once,
//! however many local readers follow the stream, and wakes them as soon as
//! it is in. A cursor still reads Redis itself to replay history (`XRANGE`),
//! and once after a second without news, as a safety net
//! ([`RemoteCursor`](crate::store::RemoteCursor) says what it catches).
//!
//! The follower's positions are explicit entry ids kept in the tails, not
//! in the connection: an `XREAD` after a reconnect, or one sent a moment
//! after an append, still returns every entry after them. What a tail holds
//! is contiguous: an entry that does not follow the tail's newest one (the
//! follower fell behind a trim) or does not decode empties it, so a cursor
//! at such a position reads Redis, which reports the gap.
//!
//! A blocked `XREAD` watches only the streams it was sent with. When a
//! stream is added, the follower interrupts it with `CLIENT UNBLOCK` from
//! the shared connection, retried briefly (the `XREAD` may not have reached
//! Redis yet); should `CLIENT` be refused (an ACL, a renamed command), the
//! block's bound, [`FOLLOW_BLOCK`], is the longest a new stream waits to be
//! watched (its cursors meanwhile wait too, up to their own check).
//!
//! Known limit: every round sends every followed key, so a round costs Redis
//! in proportion to the streams followed here, and rounds come as often as
//! entries do (at most one per round trip).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::future::pending;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use super::super::keys;
use super::{Entries, RedisStore, logs};
use crate::event::{StreamEvent, StreamId};
use crate::store::StoreError;

/// Longest one `XREAD` blocks (an idle round costs one command per replica
/// per block).
const FOLLOW_BLOCK: Duration = Duration::from_secs(1);
/// Newest events a tail keeps for its cursors: a cursor further behind
/// reads Redis. The follower reads as many per stream and round.
const RECENT: usize = 256;
/// `CLIENT UNBLOCK` attempts per added stream, [`UNBLOCK_RETRY`] apart.
const UNBLOCK_TRIES: usize = 20;
/// See [`UNBLOCK_TRIES`].
const UNBLOCK_RETRY: Duration = Duration::from_millis(5);
/// Pause before reconnecting after the follower's connection failed.
const RECONNECT: Duration = Duration::from_millis(250);

/// One stream's entries from one `XREAD`, by sequence number; `None` for an
/// entry that does not decode.
type Logged = Vec<(u64, Option<StreamEvent>)>;

/// One per replica: follows, with a single blocking `XREAD`, every stream
/// a local remote cursor has caught up with, and feeds each stream's
/// [`Tail`].
pub(in crate::store) struct StreamFollower {
    redis: Arc<RedisStore>,
    /// The streams followed, by id. A plain mutex: held only to add or
    /// drop a cursor, copy the positions out or find a tail, never across
    /// an `.await`.
    followed: Mutex<HashMap<StreamId, Followed>>,
    /// Rung when a stream is added: the blocked `XREAD` does not watch it.
    added: Notify,
    /// The follower is connected and following. Before it first connects
    /// and while it reconnects, tails do not know what is new, and cursors
    /// read Redis themselves.
    following: AtomicBool,
}

/// A followed stream's tail and how many local cursors use it.
struct Followed {
    tail: Arc<Tail>,
    /// Live [`FollowGuard`]s; at zero the stream is no longer followed.
    cursors: usize,
}

impl std::fmt::Debug for StreamFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let followed = self.followed.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("StreamFollower")
            .field("followed", &followed)
            .field("following", &self.following.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// What the follower knows of one stream: its newest events, contiguous,
/// and a wake-up for the cursors that wait for more.
pub(in crate::store) struct Tail {
    window: Mutex<Window>,
    /// Moves after every change a cursor could wait for (entries read, the
    /// follower lost or back); a cursor that saw an older value looks again.
    version: AtomicU64,
    /// Wakes the waiting cursors after each move of `version`.
    changed: Notify,
    /// When one of the stream's local cursors last announced a reader here
    /// (one announcement per stream and period does for all of them).
    announced: Mutex<Instant>,
}

/// Events `start..next` of a stream, in order (`events.len() == next -
/// start`). `next` is where the follower reads on from.
struct Window {
    start: u64,
    next: u64,
    events: VecDeque<Arc<StreamEvent>>,
}

/// What a tail knows at a cursor's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::store) enum TailRead {
    /// Events were added to the cursor's batch.
    Events,
    /// Nothing after the position has been read from Redis yet.
    CaughtUp,
    /// The position is before what the tail keeps: read Redis.
    Behind,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail").field("version", &self.version()).finish_non_exhaustive()
    }
}

impl Tail {
    fn new(from: u64) -> Self {
        Self {
            window: Mutex::new(Window { start: from, next: from, events: VecDeque::new() }),
            version: AtomicU64::new(0),
            changed: Notify::new(),
            // Made by a cursor's first catch-up, after its first read
            // announced it.
            announced: Mutex::new(Instant::now()),
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current version: read it before [`Self::read`], and give it to
    /// [`Self::changed`].
    pub(in crate::store) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Adds what the tail holds from `from` on (at most `max`) to `out`.
    pub(in crate::store) fn read(&self, from: u64, max: usize, out: &mut VecDeque<Arc<StreamEvent>>) -> TailRead {
        let window = self.window();
        if from >= window.next {
            return TailRead::CaughtUp;
        }
        if from < window.start {
            return TailRead::Behind;
        }
        out.extend(window.events.iter().skip((from - window.start) as usize).take(max).cloned());
        TailRead::Events
    }

    /// Resolves once the version is no longer `seen`, or at `until`.
    pub(in crate::store) async fn changed(&self, seen: u64, until: Instant) {
        let mut notified = pin!(self.changed.notified());
        // Registered before the version is compared: a move in between
        // still wakes it.
        notified.as_mut().enable();
        if self.version() != seen {
            return;
        }
        let _ = tokio::time::timeout_at(until, notified).await;
    }

    /// Whether the stream's announcement is due (at most once per `every`
    /// whichever of its cursors asks); a true answer counts as made.
    pub(in crate::store) fn announce_due(&self, every: Duration) -> bool {
        let mut announced = self.announced.lock().unwrap_or_else(PoisonError::into_inner);
        if announced.elapsed() < every {
            return false;
        }
        *announced = Instant::now();
        true
    }

    /// Takes entries the follower read, then wakes the cursors. Entries
    /// before `next` were taken already; one after it, or one that does not
    /// decode, breaks the window off (cursors before it read Redis).
    fn ingest(&self, entries: Logged) {
        {
            let mut window = self.window();
            for (seq, event) in entries {
                if seq < window.next {
                    continue;
                }
                if seq > window.next || event.is_none() {
                    window.events.clear();
                    window.start = seq + u64::from(event.is_none());
                }
                if let Some(event) = event {
                    window.events.push_back(Arc::new(event));
                    if window.events.len() > RECENT {
                        window.events.pop_front();
                        window.start += 1;
                    }
                }
                window.next = seq + 1;
            }
        }
        self.touch();
    }

    /// Moves the version and wakes every waiting cursor.
    fn touch(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    fn next(&self) -> u64 {
        self.window().next
    }
}

/// A cursor's use of a followed stream's tail; the stream stays followed
/// while any lives.
pub(in crate::store) struct FollowGuard {
    follower: Arc<StreamFollower>,
    id: StreamId,
    tail: Arc<Tail>,
}

impl std::fmt::Debug for FollowGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowGuard").field("id", &self.id).field("tail", &self.tail).finish_non_exhaustive()
    }
}

impl FollowGuard {
    /// The stream's tail.
    pub(in crate::store) fn tail(&self) -> &Tail {
        &self.tail
    }
}

impl Drop for FollowGuard {
    fn drop(&mut self) {
        let mut followed = self.follower.followed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = followed.get_mut(&self.id)
            && Arc::ptr_eq(&entry.tail, &self.tail)
        {
            entry.cursors -= 1;
            if entry.cursors == 0 {
                followed.remove(&self.id);
            }
        }
    }
}

impl StreamFollower {
    /// A follower reading through `redis` (started by [`Self::run`]).
    pub(in crate::store) fn new(redis: Arc<RedisStore>) -> Arc<Self> {
        Arc::new(Self {
            redis,
            followed: Mutex::new(HashMap::new()),
            added: Notify::new(),
            following: AtomicBool::new(false),
        })
    }

    /// Whether tails are being fed now: connected, and every followed
    /// stream is or is about to be watched.
    pub(in crate::store) fn is_following(&self) -> bool {
        self.following.load(Ordering::Acquire)
    }

    /// Follows stream `id` while the guard lives: from `from` on if no local
    /// cursor follows it yet (the caller found nothing there in Redis),
    /// else from wherever its tail is.
    pub(in crate::store) fn follow(self: &Arc<Self>, id: StreamId, from: u64) -> FollowGuard {
        let mut followed = self.followed.lock().unwrap_or_else(PoisonError::into_inner);
        let tail = match followed.entry(id) {
            Entry::Occupied(mut entry) => {
                entry.get_mut().cursors += 1;
                entry.get().tail.clone()
            }
            Entry::Vacant(entry) => {
                let tail = Arc::new(Tail::new(from));
                entry.insert(Followed { tail: tail.clone(), cursors: 1 });
                // A permit if the follower is between rounds: its next
                // round then starts over at once.
                self.added.notify_one();
                tail
            }
        };
        FollowGuard { follower: self.clone(), id, tail }
    }

    /// Runs until `stop`, reconnecting after failures.
    ///
    /// While it reconnects, every tail is woken (its cursors read Redis
    /// themselves then, and report an outage as a failed read), and again
    /// once it follows.
    pub(in crate::store) async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let failure = tokio::select! {
                () = stop.cancelled() => break,
                failure = self.session() => failure,
            };
            self.set_following(false);
            tracing::debug!(error = %failure, "stream follower lost redis; reconnecting");
            tokio::select! {
                () = stop.cancelled() => break,
                () = sleep(RECONNECT) => {}
            }
        }
        // Any cursor left polls Redis by itself.
        self.set_following(false);
    }

    /// Follows on one connection until it fails.
    async fn session(&self) -> StoreError {
        let mut conn = match self.redis.blocking(FOLLOW_BLOCK).await {
            Ok(conn) => conn,
            Err(e) => return e,
        };
        // Refused by the server (an ACL, a renamed command): follow without
        // interrupts, new streams then wait for the current block to end.
        let client_id = match redis::cmd("CLIENT").arg("ID").query_async::<i64>(&mut conn).await {
            Ok(id) => Some(id),
            Err(e) if e.code().is_some() => {
                tracing::warn!(error = %StoreError::from(e), "CLIENT ID refused: a newly followed stream may wait up to 1 s to be watched");
                None
            }
            Err(e) => return e.into(),
        };
        self.set_following(true);
        loop {
            let mut added = pin!(self.added.notified());
            // Before the positions are copied: a stream added later rings.
            added.as_mut().enable();
            let positions: Vec<(StreamId, u64)> = {
                let followed = self.followed.lock().unwrap_or_else(PoisonError::into_inner);
                followed.iter().map(|(id, f)| (*id, f.tail.next())).collect()
            };
            if positions.is_empty() {
                added.await;
                continue;
            }
            let interrupt = async {
                added.as_mut().await;
                for _ in 0..UNBLOCK_TRIES {
                    let Some(client_id) = client_id else { break };
                    match self.redis.unblock(client_id).await {
                        // Not blocked (yet): the XREAD may still be on its way.
                        Ok(false) => sleep(UNBLOCK_RETRY).await,
                        Ok(true) | Err(_) => break,
                    }
                }
                pending::<()>().await;
            };
            let read = tokio::select! {
                read = self.redis.follow_read(&mut conn, &positions, FOLLOW_BLOCK) => read,
                () = interrupt => continue,
            };
            match read {
                Ok(batches) => self.ingest(batches),
                Err(e) => return e,
            }
        }
    }

    /// Feeds one `XREAD` reply to the tails (a stream no longer followed is
    /// skipped).
    fn ingest(&self, batches: Vec<(StreamId, Logged)>) {
        for (id, entries) in batches {
            let tail = self.followed.lock().unwrap_or_else(PoisonError::into_inner).get(&id).map(|f| f.tail.clone());
            if let Some(tail) = tail {
                tail.ingest(entries);
            }
        }
    }

    fn set_following(&self, following: bool) {
        self.following.store(following, Ordering::Release);
        let tails: Vec<Arc<Tail>> =
            self.followed.lock().unwrap_or_else(PoisonError::into_inner).values().map(|f| f.tail.clone()).collect();
        for tail in tails {
            tail.touch();
        }
    }
}

impl RedisStore {
    /// Waits (up to `block`) for entries at or after the given sequence
    /// numbers in any of the streams' logs; at most [`RECENT`] per stream.
    ///
    /// `conn` must be a connection of its own, with a response timeout
    /// above `block` ([`RedisStore::blocking`]).
    async fn follow_read(
        &self,
        conn: &mut MultiplexedConnection,
        positions: &[(StreamId, u64)],
        block: Duration,
    ) -> Result<Vec<(StreamId, Logged)>, StoreError> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(RECENT).arg("BLOCK").arg(block.as_millis() as u64).arg("STREAMS");
        for (id, _) in positions {
            cmd.arg(keys::stream(id));
        }
        for (_, next) in positions {
            cmd.arg(keys::entry_id_before(*next));
        }
        let reply: Option<Vec<(String, Entries)>> = cmd.query_async(conn).await?;
        Ok(reply
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(key, entries)| {
                let id = keys::stream_id_of(&key)?;
                // A run entry is its events, one by one; one that does not
                // decode is its last sequence number without an event.
                let logged = entries
                    .into_iter()
                    .filter_map(|(entry_id, fields)| {
                        let last = keys::seq_of(&entry_id)?;
                        Some(match fields.get(keys::EVENT).and_then(|json| logs::decode_entry(id, last, json)) {
                            Some(events) => events.into_iter().map(|e| (e.seq().unwrap_or(0), Some(e))).collect(),
                            None => vec![(last, None)],
                        })
                    })
                    .flatten()
                    .collect();
                Some((id, logged))
            })
            .collect())
    }

    /// Interrupts connection `client`'s blocking command, if it is blocked
    /// (the command then answers as if its block ran out).
    async fn unblock(&self, client: i64) -> Result<bool, StoreError> {
        let n: i64 = redis::cmd("CLIENT").arg("UNBLOCK").arg(client).query_async(&mut self.conn()).await?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(seq: u64) -> StreamEvent {
        let stream_id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!());
        StreamEvent::Delta { stream_id, seq, text: seq.to_string().into() }
    }

    fn seqs(out: &VecDeque<Arc<StreamEvent>>) -> Vec<u64> {
        out.iter().filter_map(|e| e.seq()).collect()
    }

    #[test]
    fn a_tail_serves_its_window_and_nothing_across_a_hole() {
        let tail = Tail::new(5);
        let mut out = VecDeque::new();
        assert_eq!(tail.read(5, 10, &mut out), TailRead::CaughtUp);
        let v = tail.version();
        tail.ingest(vec![(4, Some(delta(4))), (5, Some(delta(5))), (6, Some(delta(6)))]);
        assert_ne!(tail.version(), v);
        assert_eq!(tail.read(4, 10, &mut out), TailRead::Behind);
        assert_eq!(tail.read(6, 10, &mut out), TailRead::Events);
        assert_eq!(seqs(&out), [6]);
        // A trimmed stretch (7, 8 never read): the window starts over at 9.
        tail.ingest(vec![(9, Some(delta(9)))]);
        out.clear();
        assert_eq!(tail.read(7, 10, &mut out), TailRead::Behind);
        assert_eq!(tail.read(9, 10, &mut out), TailRead::Events);
        assert_eq!(seqs(&out), [9]);
        // An entry that does not decode is not skipped over either.
        tail.ingest(vec![(10, None), (11, Some(delta(11)))]);
        out.clear();
        assert_eq!(tail.read(10, 10, &mut out), TailRead::Behind);
        assert_eq!(tail.read(11, 1, &mut out), TailRead::Events);
        assert_eq!(tail.read(12, 1, &mut out), TailRead::CaughtUp);
        assert_eq!(seqs(&out), [11]);
    }

    #[test]
    fn a_tail_keeps_only_its_newest_events() {
        let tail = Tail::new(0);
        tail.ingest((0..RECENT as u64 + 10).map(|s| (s, Some(delta(s)))).collect());
        let mut out = VecDeque::new();
        assert_eq!(tail.read(9, 1, &mut out), TailRead::Behind);
        assert_eq!(tail.read(10, 2, &mut out), TailRead::Events);
        assert_eq!(seqs(&out), [10, 11]);
    }

    #[tokio::test]
    async fn a_version_moved_before_the_wait_is_not_missed() {
        let tail = Tail::new(0);
        let seen = tail.version();
        tail.ingest(vec![(0, Some(delta(0)))]);
        let far = Instant::now() + Duration::from_secs(3600);
        let woke = tokio::time::timeout(Duration::from_secs(5), tail.changed(seen, far)).await;
        assert!(woke.is_ok());
    }
}
