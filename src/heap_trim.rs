//! Gives freed heap back to the operating system after streams and
//! connections end.
//!
//! glibc's allocator keeps what a program frees: only the top of each arena
//! shrinks on its own. A burst of streams leaves free pages between the
//! logs that stay resumable for `stream_ttl`: after 1,000 finished streams
//! of 2,000 characters, RSS stayed 33 bytes per retained character above
//! where it was, though the sealed logs hold about 2. `malloc_trim(0)` returns
//! every free page of every arena. It walks the arenas' free lists with
//! each arena locked, and after that burst it took 220 ms (7-30 ms on a
//! heap in use), so it runs off the async workers, only when something
//! ended since the last time, and at most one part in [`COST_SHARE`] of the
//! time: after a trim that took `t`, the next waits `COST_SHARE * t`, and at
//! least [`TRIM_EVERY`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often, at most, the trimmer looks for released memory.
pub const TRIM_EVERY: Duration = Duration::from_secs(1);

/// A trim that took `t` is followed by `COST_SHARE * t` without one: the
/// trimmer's share of one core stays below 1%.
pub const COST_SHARE: u32 = 100;

/// How long to wait after a trim that took `took`.
pub fn wait_after(took: Duration) -> Duration {
    took.saturating_mul(COST_SHARE).max(TRIM_EVERY)
}

/// Bumped whenever something that held heap memory ends.
static RELEASES: AtomicU64 = AtomicU64::new(0);

/// Notes that a stream, log or connection ended, so that the next tick
/// trims. Cheap: one relaxed atomic add.
pub fn released() {
    RELEASES.fetch_add(1, Ordering::Relaxed);
}

/// Decides when a trim is worth its cost: only after a release.
#[derive(Debug, Default)]
pub struct Trigger {
    seen: u64,
}

impl Trigger {
    /// Whether anything was released since the last time this said yes.
    pub fn due(&mut self) -> bool {
        let now = RELEASES.load(Ordering::Relaxed);
        let due = now != self.seen;
        self.seen = now;
        due
    }
}

/// Returns free heap pages to the OS now; whether any were returned.
/// Does nothing (and says `false`) where the allocator is not glibc's.
pub fn trim_now() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers and only rearranges the
        // allocator's own free memory, under its own locks. The crate's one
        // unsafe block.
        #[allow(unsafe_code)]
        let returned = unsafe { libc::malloc_trim(0) };
        returned == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Runs until `stop`: a trim on a blocking thread when something was
/// released, [`wait_after`] the previous one, counted in `metrics`.
pub async fn run(metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut trigger = Trigger::default();
    let mut wait = TRIM_EVERY;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        if !trigger.due() {
            wait = TRIM_EVERY;
            continue;
        }
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(trim_now).await {
            Ok(returned) => {
                metrics.heap_trimmed(returned);
                tracing::debug!(returned, took_us = started.elapsed().as_micros() as u64, "heap trimmed");
            }
            Err(e) => tracing::debug!(error = %e, "heap trim did not run"),
        }
        wait = wait_after(started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{TRIM_EVERY, Trigger, released, trim_now, wait_after};

    #[test]
    fn a_costly_trim_puts_the_next_off_a_hundred_times_as_long() {
        assert_eq!(wait_after(Duration::from_millis(220)), Duration::from_secs(22));
        assert_eq!(wait_after(Duration::from_millis(2)), TRIM_EVERY);
        assert_eq!(wait_after(Duration::MAX), Duration::MAX);
    }

    #[test]
    fn a_trim_is_due_only_after_a_release() {
        let mut trigger = Trigger::default();
        released();
        assert!(trigger.due());
        // Other tests in this process may release too; none can un-release.
        released();
        assert!(trigger.due());
    }

    /// Resident pages of this process, from `/proc/self/statm`.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn resident_pages() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0)
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_pages_between_live_blocks_go_back_to_the_os() {
        // 64 MiB in 4 KiB blocks, touched; then every block but one in 64
        // freed. The survivors pin the heap's pages around them, so glibc
        // keeps the free pages until it is told to trim.
        let mut blocks: Vec<Option<Box<[u8; 4096]>>> = (0..16_384).map(|_| Some(Box::new([1u8; 4096]))).collect();
        for (i, block) in blocks.iter_mut().enumerate() {
            if i % 64 != 63 {
                *block = None;
            }
        }
        let before = resident_pages();
        assert!(trim_now(), "malloc_trim returned nothing");
        let after = resident_pages();
        // 63 of 64 blocks, about 63 MiB = 16,000 pages of 4 KiB, were free.
        assert!(before.saturating_sub(after) > 8_000, "resident pages {before} -> {after}");
        assert_eq!(blocks.iter().flatten().map(|b| b[0] as usize).sum::<usize>(), 256);
    }
}
