//! Graceful shutdown in two phases, shared by the server and every stream.
//!
//! 1. *Draining* (on SIGTERM/SIGINT): stop accepting, `/readyz` answers 503,
//!    new streams are refused, streams in flight keep going.
//! 2. *Closing* (when the grace period is over): every stream still open
//!    sends `event: shutdown` with a `retry:` hint and ends, so the server
//!    can exit instead of waiting forever on endless streams.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Cloneable handle to the shutdown state.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    draining: CancellationToken,
    closing: CancellationToken,
}

impl Shutdown {
    /// A handle in the running state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enters phase 1 now and phase 2 after `grace`. Idempotent.
    pub fn begin(&self, grace: Duration) {
        if self.draining.is_cancelled() {
            return;
        }
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "draining: no new streams, open streams get the grace period"
        );
        self.draining.cancel();
        let closing = self.closing.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(grace) => {
                    tracing::info!("grace period over: closing open streams");
                    closing.cancel();
                }
                () = closing.cancelled() => {}
            }
        });
    }

    /// Skips the rest of the grace period.
    pub fn close_now(&self) {
        self.draining.cancel();
        self.closing.cancel();
    }

    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Token cancelled when draining starts.
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    /// Token cancelled when open streams must end.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }
}
