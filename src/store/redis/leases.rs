//! Who is alive and who is reading, across replicas: the producer's lease
//! (a stream neither finished nor leased lost its generator), remote
//! readers' holds (a reader on another replica keeps the producer going
//! past its local detach grace), cancels over pub/sub, and the
//! [`Replicator`] that copies a local log to Redis and keeps its lease.
//!
//! Pub/sub does not queue: a cancel or attach announcement published while a replica's
//! listener is reconnecting never reaches it. The listener's state is therefore part of the
//! store's health (`listening`), and attachments are also found by polling the reader key
//! once a second, so a lost announcement only delays the hold.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::{AsyncCommands, RedisError};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::keys;
use super::super::memory::{LiveStream, StreamHub};
use super::{LEASE, LEASE_REFRESH, RESPONSE_TIMEOUT, RedisStore};
use crate::event::{StreamEvent, StreamId};
use crate::store::StoreError;

/// How long a remote reader's announcement lasts (renewed every second), and how long a hold
/// it causes lasts: longer than the renewal period, so that a renewal arriving a little late
/// neither lets the key expire nor the producer's hold run out in between.
pub(in crate::store) const REMOTE_READER: Duration = Duration::from_secs(3);

impl RedisStore {
    /// Refreshes the producer's lease, and keeps the running stream's keys
    /// from expiring however long it runs.
    ///
    /// Three commands in one round trip; no transaction is needed, as each only pushes an expiry
    /// forward. `EXPIRE` on the log key is a no-op before the first append has created it.
    async fn refresh_lease(&self, id: &StreamId) -> Result<(), StoreError> {
        let keep = self.settings.running_ttl_secs();
        redis::pipe()
            .set_ex(keys::lease(id), 1, LEASE.as_secs())
            .ignore()
            .expire(keys::meta(id), keep)
            .ignore()
            .expire(keys::stream(id), keep)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Announces a reader of `id` on this replica (so the producing replica
    /// keeps generating for it); lives a few seconds unless renewed.
    pub(in crate::store) async fn mark_remote_reader(&self, id: &StreamId, first: bool) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.pset_ex(keys::remote_reader(id), 1, REMOTE_READER.as_millis() as u64).ignore();
        if first {
            // The producer hears of a new reader at once (its own check runs
            // once a second, which could come after the detach grace).
            pipe.publish(keys::ATTACH_CHANNEL, id.to_string()).ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    /// Whether a reader on another replica announced itself within the last
    /// [`REMOTE_READER`]. One key per stream, whatever the number of such readers: any of them
    /// renewing it keeps the stream held.
    pub(in crate::store) async fn remote_reader(&self, id: &StreamId) -> Result<bool, StoreError> {
        Ok(self.conn().exists(keys::remote_reader(id)).await?)
    }

    /// Whether the producer's lease is alive. It is deleted together with the terminal event,
    /// so a log that stops growing without a lease and without a terminal event has lost its
    /// producer (the remote cursor reads once more to be sure).
    pub(in crate::store) async fn leased(&self, id: &StreamId) -> Result<bool, StoreError> {
        Ok(self.conn().exists(keys::lease(id)).await?)
    }

    /// Asks whichever replica produces `id` to cancel it. Every replica hears it and ignores ids
    /// it does not produce; nothing confirms delivery, and if the producer is gone the message
    /// is lost (its readers then see the lease lapse instead).
    pub(in crate::store) async fn publish_cancel(&self, id: &StreamId) -> Result<(), StoreError> {
        self.conn().publish::<_, _, ()>(keys::CANCEL_CHANNEL, id.to_string()).await?;
        Ok(())
    }

    /// Listens for cancels and for readers attaching on other replicas, and
    /// applies those for streams produced here; resubscribes after outages.
    ///
    /// Runs on its own pub/sub connection (a subscribed connection can do nothing else). The
    /// health flag is raised only once the subscription is in place and lowered as soon as the
    /// session ends, so `/readyz` reports a lost subscription as soon as the listener notices.
    pub(in crate::store) async fn listen_for_cancels(self: Arc<Self>, hub: Arc<StreamHub>, stop: CancellationToken) {
        use futures_util::StreamExt;
        loop {
            let session = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&[keys::CANCEL_CHANNEL, keys::ATTACH_CHANNEL]).await?;
                self.listening.store(true, Ordering::Release);
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Ok(text) = msg.get_payload::<String>() else { continue };
                    let Some(stream) = StreamId::parse(&text).and_then(|id| hub.get(&id)) else { continue };
                    if msg.get_channel_name() == keys::ATTACH_CHANNEL {
                        stream.hold_for_remote(Instant::now() + REMOTE_READER);
                    } else {
                        stream.cancel();
                    }
                }
                Ok::<(), RedisError>(())
            };
            tokio::select! {
                () = stop.cancelled() => return,
                result = session => {
                    self.listening.store(false, Ordering::Release);
                    if let Err(e) = result {
                        tracing::debug!(error = %StoreError::from(e), "cancel listener lost redis; retrying");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

/// Replicates one stream's events to Redis in order, batching whatever is
/// queued, and keeps its lease alive. Reports the first failure through
/// `failed` and the stream's stop token (the producer then ends the stream
/// with `store_unavailable`).
///
/// Any failure ends the stream rather than being retried later: an event written after a lost
/// one would leave a hole that a remote reader reading across it skips without noticing, and a
/// lease that cannot be refreshed soon lapses, after which such readers report the producer
/// lost anyway.
#[derive(Debug)]
pub(in crate::store) struct Replicator {
    /// For the last-moment look for remote readers (the task has its own handle).
    store: Arc<RedisStore>,
    /// Bounded queue to the task; dropping it tells the task to drain and end.
    tx: mpsc::Sender<Arc<StreamEvent>>,
    /// The writing task, awaited (with a bound) by [`Replicator::finish`].
    task: tokio::task::JoinHandle<()>,
    /// Cancelled when replication failed (the stream's stop token fires
    /// too; this one says why).
    failed: CancellationToken,
    /// The local log: its stop token is fired on failure, and remote holds are noted on it.
    stream: Arc<LiveStream>,
    /// The sequence number of the last event written to Redis.
    written: watch::Receiver<u64>,
}

impl Replicator {
    /// Starts replicating `stream`; `capacity` bounds what may queue. Every
    /// lease refresh also looks for readers on other replicas and holds the
    /// stream for them (the detach grace counts only local readers).
    ///
    /// One task does both, one command at a time, so appends stay in order; each `append`
    /// takes whatever has queued meanwhile (up to 512 events) as one transaction.
    pub(in crate::store) fn start(store: Arc<RedisStore>, stream: Arc<LiveStream>, capacity: usize) -> Self {
        let id = stream.id;
        let (tx, mut rx) = mpsc::channel::<Arc<StreamEvent>>(capacity.max(1));
        let failed = CancellationToken::new();
        let flag = failed.clone();
        let handle = store.clone();
        let watched = stream.clone();
        let (written_tx, written) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut first = true;
            let mut lease = tokio::time::interval(LEASE_REFRESH);
            loop {
                tokio::select! {
                    n = rx.recv_many(&mut batch, 512) => {
                        if n == 0 {
                            return;
                        }
                        if let Err(e) = store.append(&id, &batch, first).await {
                            tracing::warn!(stream_id = %id, error = %e, "replication to redis failed");
                            flag.cancel();
                            stream.stopped().cancel();
                            return;
                        }
                        first = false;
                        if let Some(seq) = batch.iter().rev().find_map(|e| e.seq()) {
                            written_tx.send_replace(seq);
                        }
                        batch.clear();
                    }
                    _ = lease.tick() => {
                        if store.refresh_lease(&id).await.is_err() {
                            flag.cancel();
                            stream.stopped().cancel();
                            return;
                        }
                        if let Ok(true) = store.remote_reader(&id).await {
                            stream.hold_for_remote(Instant::now() + REMOTE_READER);
                        }
                    }
                }
            }
        });
        Self { store: handle, tx, task, failed, stream: watched, written }
    }

    /// Queues an event; a full queue counts as a failure.
    ///
    /// Never waits: the producer calls it per event on its hot path. A queue holding `capacity`
    /// events means Redis is that far behind; the stream ends rather than buffer without bound
    /// or drop an event.
    pub(in crate::store) fn push(&self, event: Arc<StreamEvent>) {
        if self.tx.try_send(event).is_err() {
            self.failed.cancel();
            self.stream.stopped().cancel();
        }
    }

    /// Waits (bounded, as [`Replicator::finish`]) until Redis holds the
    /// event numbered `seq`, or replication has failed; whether Redis holds
    /// it.
    pub(in crate::store) async fn written_through(&self, seq: u64) -> bool {
        let mut written = self.written.clone();
        let wait = async {
            while *written.borrow_and_update() < seq && !self.failed.is_cancelled() {
                if written.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(RESPONSE_TIMEOUT * 2, wait).await;
        *self.written.borrow() >= seq
    }

    /// Whether replication failed (and so stopped the stream).
    pub(in crate::store) fn has_failed(&self) -> bool {
        self.failed.is_cancelled()
    }

    /// Looks for a reader on another replica (its periodic announcement may
    /// not have arrived yet); if there is one, holds the stream for it.
    /// A failed lookup counts as no reader.
    pub(in crate::store) async fn hold_for_remote_reader(&self) -> bool {
        if let Ok(true) = self.store.remote_reader(&self.stream.id).await {
            self.stream.hold_for_remote(Instant::now() + REMOTE_READER);
            return true;
        }
        false
    }

    /// Waits (bounded) until everything queued is written.
    ///
    /// Closing the queue lets the task write what is left and end. After `2 × RESPONSE_TIMEOUT`
    /// it stops waiting, but the task is not aborted: it goes on writing in the background,
    /// while the caller frees the stream's slot.
    pub(in crate::store) async fn finish(self) {
        drop(self.tx);
        let _ = tokio::time::timeout(RESPONSE_TIMEOUT * 2, self.task).await;
    }
}
