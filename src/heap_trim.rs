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
//! ended since the last time and then a second passed without more (see
//! [`Trigger`]), and at most one part in [`COST_SHARE`] of the time: after a
//! trim that took `t`, the next waits `COST_SHARE * t`, and at least
//! [`TRIM_EVERY`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// A trim waits for a quiet second after releases (the end of a burst,
/// when most is free), but no longer than this while they go on.
pub const BUSY_TRIM_EVERY: Duration = Duration::from_secs(10);

/// Decides when a trim is worth its cost: after releases, once a tick
/// passes without new ones (or [`BUSY_TRIM_EVERY`] after the last trim
/// while they keep coming). Trimming in the middle of a burst gives back
/// pages the burst is about to take again.
#[derive(Debug)]
pub struct Trigger {
    /// The release count at the last trim.
    trimmed_at: u64,
    /// The release count at the last tick.
    ticked_at: u64,
    last_trim: Instant,
}

impl Trigger {
    /// A trigger that has seen `releases` and trimmed at `now`.
    pub fn new(releases: u64, now: Instant) -> Self {
        Self { trimmed_at: releases, ticked_at: releases, last_trim: now }
    }

    /// At a tick, with the release count `releases`: whether to trim now.
    pub fn due(&mut self, releases: u64, now: Instant) -> bool {
        let quiet = releases == self.ticked_at;
        self.ticked_at = releases;
        let due = releases != self.trimmed_at && (quiet || now.duration_since(self.last_trim) >= BUSY_TRIM_EVERY);
        if due {
            self.trimmed_at = releases;
            self.last_trim = now;
        }
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
    let mut trigger = Trigger::new(RELEASES.load(Ordering::Relaxed), Instant::now());
    let mut wait = TRIM_EVERY;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        if !trigger.due(RELEASES.load(Ordering::Relaxed), Instant::now()) {
            wait = TRIM_EVERY;
            continue;
        }
        let started = Instant::now();
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

    use super::{BUSY_TRIM_EVERY, TRIM_EVERY, Trigger, trim_now, wait_after};
    use std::time::Instant;

    #[test]
    fn a_costly_trim_puts_the_next_off_a_hundred_times_as_long() {
        assert_eq!(wait_after(Duration::from_millis(220)), Duration::from_secs(22));
        assert_eq!(wait_after(Duration::from_millis(2)), TRIM_EVERY);
        assert_eq!(wait_after(Duration::MAX), Duration::MAX);
    }

    #[test]
    fn a_trim_waits_for_a_quiet_tick_after_releases() {
        let t0 = Instant::now();
        let tick = |n: u64| t0 + TRIM_EVERY * n as u32;
        let mut trigger = Trigger::new(5, t0);
        assert!(!trigger.due(5, tick(1)), "nothing released");
        assert!(!trigger.due(9, tick(2)), "releases this tick: the burst goes on");
        assert!(trigger.due(9, tick(3)), "a quiet tick after releases");
        assert!(!trigger.due(9, tick(4)), "trimmed already");
        // Releases every tick: once BUSY_TRIM_EVERY after the last trim.
        let ticks = BUSY_TRIM_EVERY.as_secs() / TRIM_EVERY.as_secs();
        let due: Vec<u64> = (1..=ticks).filter(|&i| trigger.due(9 + i, tick(3 + i))).collect();
        assert_eq!(due, [ticks]);
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
