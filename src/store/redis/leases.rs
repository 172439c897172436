//! Who is alive and who is reading, across replicas: the producer's lease
//! (a stream neither finished nor leased lost its generator), remote
//! readers' holds (a reader on another replica keeps the producer going
//! past its local detach grace), cancels over pub/sub, and the
//! [`Replicator`] that copies a local log to Redis and keeps its lease.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::{AsyncCommands, RedisError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::keys;
use super::super::memory::{LiveStream, StreamHub};
use super::{LEASE, LEASE_REFRESH, RESPONSE_TIMEOUT, RedisStore};
use crate::event::{StreamEvent, StreamId};
use crate::store::StoreError;

/// How long a remote reader's announcement lasts (renewed every second).
pub(in crate::store) const REMOTE_READER: Duration = Duration::from_secs(3);

impl RedisStore {
    /// Refreshes the producer's lease, and keeps the running stream's keys
    /// from expiring however long it runs.
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

    /// Whether a reader on another replica announced itself recently.
    pub(in crate::store) async fn remote_reader(&self, id: &StreamId) -> Result<bool, StoreError> {
        Ok(self.conn().exists(keys::remote_reader(id)).await?)
    }

    /// Whether the producer's lease is alive.
    pub(in crate::store) async fn leased(&self, id: &StreamId) -> Result<bool, StoreError> {
        Ok(self.conn().exists(keys::lease(id)).await?)
    }

    /// Asks whichever replica produces `id` to cancel it.
    pub(in crate::store) async fn publish_cancel(&self, id: &StreamId) -> Result<(), StoreError> {
        self.conn().publish::<_, _, ()>(keys::CANCEL_CHANNEL, id.to_string()).await?;
        Ok(())
    }

    /// Listens for cancels and for readers attaching on other replicas, and
    /// applies those for streams produced here; resubscribes after outages.
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
#[derive(Debug)]
pub(in crate::store) struct Replicator {
    store: Arc<RedisStore>,
    tx: mpsc::Sender<Arc<StreamEvent>>,
    task: tokio::task::JoinHandle<()>,
    /// Cancelled when replication failed (the stream's stop token fires
    /// too; this one says why).
    failed: CancellationToken,
    stream: Arc<LiveStream>,
}

impl Replicator {
    /// Starts replicating `stream`; `capacity` bounds what may queue. Every
    /// lease refresh also looks for readers on other replicas and holds the
    /// stream for them (the detach grace counts only local readers).
    pub(in crate::store) fn start(store: Arc<RedisStore>, stream: Arc<LiveStream>, capacity: usize) -> Self {
        let id = stream.id;
        let (tx, mut rx) = mpsc::channel::<Arc<StreamEvent>>(capacity.max(1));
        let failed = CancellationToken::new();
        let flag = failed.clone();
        let handle = store.clone();
        let watched = stream.clone();
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut lease = tokio::time::interval(LEASE_REFRESH);
            loop {
                tokio::select! {
                    n = rx.recv_many(&mut batch, 512) => {
                        if n == 0 {
                            return;
                        }
                        if let Err(e) = store.append(&id, &batch).await {
                            tracing::warn!(stream_id = %id, error = %e, "replication to redis failed");
                            flag.cancel();
                            stream.stopped().cancel();
                            return;
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
        Self { store: handle, tx, task, failed, stream: watched }
    }

    /// Queues an event; a full queue counts as a failure.
    pub(in crate::store) fn push(&self, event: Arc<StreamEvent>) {
        if self.tx.try_send(event).is_err() {
            self.failed.cancel();
            self.stream.stopped().cancel();
        }
    }

    /// Whether replication failed (and so stopped the stream).
    pub(in crate::store) fn has_failed(&self) -> bool {
        self.failed.is_cancelled()
    }

    /// Looks for a reader on another replica (its periodic announcement may
    /// not have arrived yet); if there is one, holds the stream for it.
    pub(in crate::store) async fn hold_for_remote_reader(&self) -> bool {
        if let Ok(true) = self.store.remote_reader(&self.stream.id).await {
            self.stream.hold_for_remote(Instant::now() + REMOTE_READER);
            return true;
        }
        false
    }

    /// Waits (bounded) until everything queued is written.
    pub(in crate::store) async fn finish(self) {
        drop(self.tx);
        let _ = tokio::time::timeout(RESPONSE_TIMEOUT * 2, self.task).await;
    }
}
