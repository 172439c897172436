//! The shared store: stream logs, leases, cancels and channels in Redis, so
//! that several replicas serve the same streams and channels. The keys are
//! named in [`super::keys`]; this module holds the connection and its
//! health, and one file per concern:
//! - [`logs`]: stream logs and their metadata;
//! - [`replication`]: the per-replica [`Replication`] writer that copies
//!   every local stream's log to Redis and keeps its lease, and each
//!   stream's [`Replicator`] handle on it;
//! - [`leases`]: producer leases, remote-reader holds and cancels;
//! - [`follow`]: the per-replica [`StreamFollower`] that waits for new
//!   entries of every log local remote readers follow (one blocking
//!   `XREAD`) and hands them over;
//! - [`channels`]: channel logs, subscriber counts and the per-replica
//!   [`ChannelTail`];
//! - [`chats`]: which stream answers a UI chat now;
//! - [`limits`]: cluster-wide request rates and stream leases (Lua
//!   scripts).
//! - [`tickets`]: stream tickets, taken atomically by one Lua script.
//!
//! Every command has a response timeout, so a Redis outage fails requests
//! quickly instead of hanging them; the connection manager reconnects by
//! itself, and a health probe feeds `/readyz`.

mod channels;
mod chats;
mod follow;
mod leaders;
mod leases;
mod limits;
mod logs;
mod quotas;
mod replication;
mod tickets;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, RedisError};
use tokio_util::sync::CancellationToken;

use super::StoreError;

pub(super) use channels::{ChannelTail, id_after};
pub(super) use follow::{FollowGuard, StreamFollower, TailRead};
pub(super) use replication::{Replication, Replicator};

/// How long a producer's lease lives without a refresh.
const LEASE: Duration = Duration::from_secs(3);
/// How often a producer refreshes its lease.
const LEASE_REFRESH: Duration = Duration::from_secs(1);
/// Longest any Redis command may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

impl From<RedisError> for StoreError {
    fn from(e: RedisError) -> Self {
        // Only the kind and text; never the URL (it may hold a password).
        StoreError::new(format!("{:?}: {}", e.kind(), e.detail().unwrap_or("request failed")))
    }
}

/// Retention in Redis.
#[derive(Debug, Clone, Copy)]
pub(super) struct RedisSettings {
    /// Events kept per stream (`MINID` by sequence number).
    pub stream_max_events: usize,
    /// How long a finished stream stays resumable.
    pub stream_ttl: Duration,
    /// Events kept per channel.
    pub channel_max_events: usize,
    /// How long an unused channel is kept.
    pub channel_ttl: Duration,
}

impl RedisSettings {
    /// The TTL of a finished stream's keys, in whole seconds (at least 1).
    fn stream_ttl_secs(&self) -> i64 {
        self.stream_ttl.as_secs().max(1) as i64
    }

    /// The TTL of a running stream's keys: kept while the producer lives
    /// (its lease renews them), plus the finished TTL.
    fn running_ttl_secs(&self) -> i64 {
        self.stream_ttl_secs() + 3600
    }

    /// The TTL of a channel's keys, in whole seconds (at least 1).
    fn channel_ttl_secs(&self) -> i64 {
        self.channel_ttl.as_secs().max(1) as i64
    }
}

/// Parsed `XRANGE` reply: entry id and its fields.
type Entries = Vec<(String, HashMap<String, String>)>;

/// The Redis-backed store.
pub(super) struct RedisStore {
    client: Client,
    conn: ConnectionManager,
    healthy: AtomicBool,
    /// The cancel/attach subscription is live (part of readiness: without
    /// it cancels from other replicas would be missed).
    listening: AtomicBool,
    settings: RedisSettings,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("healthy", &self.is_healthy()).finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects lazily (the server may start before Redis is up; `/readyz`
    /// says so meanwhile).
    pub(super) fn connect(url: &str, ca: Option<&[u8]>, settings: RedisSettings) -> Result<Arc<Self>, StoreError> {
        let client = match ca {
            None => Client::open(url)?,
            Some(ca) => {
                Client::build_with_tls(url, redis::TlsCertificates { client_tls: None, root_cert: Some(ca.to_vec()) })?
            }
        };
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(1);
        let conn = client.get_connection_manager_lazy(config)?;
        Ok(Arc::new(Self {
            client,
            conn,
            healthy: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            settings,
        }))
    }

    /// The shared, multiplexed connection (cheap to clone per command).
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// A dedicated connection for blocking reads (a blocking command would
    /// stall every other command on the shared one).
    async fn dedicated(&self) -> Result<MultiplexedConnection, StoreError> {
        Ok(self.client.get_multiplexed_async_connection().await?)
    }

    /// A dedicated connection whose commands may block for up to `block`
    /// (the default response timeout, half a second, would cut them off).
    async fn blocking(&self, block: Duration) -> Result<MultiplexedConnection, StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(block + RESPONSE_TIMEOUT));
        Ok(self.client.get_multiplexed_async_connection_with_config(&config).await?)
    }

    /// Whether the last probe reached Redis and the cancel/attach
    /// subscription is live.
    pub(super) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire) && self.listening.load(Ordering::Acquire)
    }

    /// Probes Redis every `every` until `stop`, logging changes.
    pub(super) async fn probe(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        loop {
            let mut conn = self.conn();
            let ok = matches!(
                tokio::time::timeout(RESPONSE_TIMEOUT, redis::cmd("PING").query_async::<String>(&mut conn)).await,
                Ok(Ok(_))
            );
            let was = self.healthy.swap(ok, Ordering::AcqRel);
            if was != ok {
                if ok {
                    tracing::info!("redis reachable");
                } else {
                    tracing::warn!("redis unreachable: new streams are refused until it returns");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// The newest entry of a Redis stream, if any.
    async fn newest(&self, key: &str) -> Result<Option<(String, HashMap<String, String>)>, StoreError> {
        let entries: Entries = redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn())
            .await?;
        Ok(entries.into_iter().next())
    }
}
