//! Who is alive and who is reading, across replicas: the producer's lease
//! (a stream neither finished nor leased lost its generator), remote
//! readers' holds (a reader on another replica keeps the producer going
//! past its local detach grace) and cancels over pub/sub. The leases are
//! refreshed by the replica's writer ([`super::Replication`]).
//!
//! Pub/sub does not queue: a cancel or attach announcement published while a replica's
//! listener is reconnecting never reaches it. The listener's state is therefore part of the
//! store's health (`listening`), and attachments are also found by polling the reader key
//! once a second, so a lost announcement only delays the hold.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::{AsyncCommands, RedisError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::keys;
use super::super::memory::StreamHub;
use super::{LEASE, RedisStore};
use crate::event::StreamId;
use crate::store::StoreError;

/// How long a remote reader's announcement lasts (renewed every second), and how long a hold
/// it causes lasts: longer than the renewal period, so that a renewal arriving a little late
/// neither lets the key expire nor the producer's hold run out in between.
pub(in crate::store) const REMOTE_READER: Duration = Duration::from_secs(3);

impl RedisStore {
    /// Adds to `pipe` the commands that refresh a producer's lease, keep the running stream's
    /// keys from expiring however long it runs, and ask whether a reader on another replica
    /// follows it; four replies, the last of which is that answer (`1` or `0`). The replica's
    /// writer ([`super::Replication`]) refreshes every stream it produces in one pipeline.
    ///
    /// No transaction is needed, as each only pushes an expiry forward. `EXPIRE` on the log key
    /// is a no-op before the first append has created it.
    pub(super) fn lease_commands(&self, pipe: &mut redis::Pipeline, id: &StreamId) -> usize {
        let keep = self.settings.running_ttl_secs();
        pipe.set_ex(keys::lease(id), 1, LEASE.as_secs())
            .expire(keys::meta(id), keep)
            .expire(keys::stream(id), keep)
            .exists(keys::remote_reader(id));
        4
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
