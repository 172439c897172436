//! Graceful shutdown, shared by the server and every stream.
//!
//! On SIGTERM/SIGINT ([`Shutdown::begin`]):
//! 1. *Draining*: new streams are refused (503 + `Retry-After`) and
//!    `/readyz` answers 503, while the listener keeps answering so load
//!    balancers see the 503 and move traffic away; open streams continue.
//! 2. *Closing*, when every stream has ended or the grace period is over:
//!    streams still open send `event: shutdown` with a `retry:` hint and end
//!    (so endless streams cannot hold the process forever).
//! 3. *Stopped*, once no stream is open (or a short deadline passed): the
//!    listener closes, idle connections are closed, the process exits.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::limits::StreamSlots;

/// How long streams get after `closing` to flush their `shutdown` event.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

/// Cloneable handle to the shutdown state.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    draining: CancellationToken,
    closing: CancellationToken,
    stopped: CancellationToken,
}

impl Shutdown {
    /// A handle in the running state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs the whole sequence (draining, closing after `grace` or when idle,
    /// stopped). Idempotent: a second call waits for the first's outcome.
    pub async fn begin(&self, grace: Duration, streams: &StreamSlots) {
        if self.draining.is_cancelled() {
            self.stopped.cancelled().await;
            return;
        }
        tracing::info!(grace_ms = grace.as_millis() as u64, open_streams = streams.open(), "draining");
        self.draining.cancel();
        tokio::select! {
            () = streams.until_idle() => {}
            () = tokio::time::sleep(grace) => {}
            () = self.closing.cancelled() => {}
        }
        if streams.open() > 0 {
            tracing::info!(open_streams = streams.open(), "grace period over: closing open streams");
        }
        self.closing.cancel();
        let _ = tokio::time::timeout(CLOSE_DEADLINE, streams.until_idle()).await;
        self.stopped.cancel();
    }

    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Cancelled when open streams must end.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// Cancelled when the listener should close.
    pub fn stopped(&self) -> &CancellationToken {
        &self.stopped
    }
}
