//! The built-in demo feeds: publishers that keep the seeds' live
//! dashboards running on channels, so that `/dashboard` (and anyone with a
//! token) can subscribe to them:
//!
//! | channel | events | like the seed's |
//! |---|---|---|
//! | `demo.counter` | `count` every tick | `/dynamic-counter` |
//! | `demo.status` | `status` (`connected`, `pause`, `done`) and `update` values, `retry: 5000` | `/sse-data` |
//! | `demo.metrics` | `metric` readings, `alert` over the threshold | `/stream-json` |
//! | `demo.clock` | `update` with the time | seed 000's broadcast |
//!
//! They publish through the store like any publisher, so channel history
//! works: a late subscriber replays what it missed with `Last-Event-ID`.
//! With Redis, one replica publishes (it holds the `demo-feeds` lease,
//! [`crate::store::Store::lead`]); another takes over if it dies. Ticks are
//! numbered from the clock (from midnight UTC), not per process, so a new leader continues the
//! same sequence. On by default; `demo_feeds = false` turns them off.

pub mod sources;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// The counter's channel.
pub const COUNTER: &str = "demo.counter";
/// The status stream's channel.
pub const STATUS: &str = "demo.status";
/// The metrics stream's channel.
pub const METRICS: &str = "demo.metrics";
/// The clock's channel.
pub const CLOCK: &str = "demo.clock";
/// Every demo channel.
pub const CHANNELS: [&str; 4] = [COUNTER, STATUS, METRICS, CLOCK];

/// The reconnect hint `demo.status` subscribers get, as `/sse-data` sends
/// (`retry: 5000`), instead of the server's default.
pub const STATUS_RETRY_MS: u64 = 5000;

/// The `retry:` hint for a subscription to `channel`, when its feed has
/// its own.
pub fn retry_for(channel: &str) -> Option<u64> {
    (channel == STATUS).then_some(STATUS_RETRY_MS)
}

/// The lease role the publishing replica holds.
const ROLE: &str = "demo-feeds";

/// Publishes every feed every `every` until `stop`. The metrics feed ticks
/// at 1.5 times that, as the seed's does.
pub async fn run(store: Store, every: Duration, stop: CancellationToken) {
    let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
    // Long enough to survive a slow tick, short enough that a dead
    // leader's duty moves on within a few ticks.
    let lease = (every * 3).max(Duration::from_secs(3));
    // Ticks fire in the middle of their clock window (the tick number is
    // the window's), so a tick that runs late or early by up to half the
    // interval still publishes its own number: a timer with an arbitrary
    // phase published a number twice, or skipped one, whenever scheduling
    // jitter crossed a window's edge.
    let first = Duration::from_millis(mid_window_in(unix_ms(), every_ms));
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_error_log: Option<tokio::time::Instant> = None;
    let mut last_window = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = timer.tick() => {}
        }
        let now_ms = unix_ms();
        // Never the same number twice (a very late tick then an early one).
        if last_window.replace(now_ms / every_ms) == Some(now_ms / every_ms) {
            continue;
        }
        let result = async {
            if !store.lead(ROLE, lease).await? {
                return Ok(());
            }
            publish_tick(&store, now_ms, every_ms).await
        }
        .await;
        if let Err(e) = result {
            // A store outage would log every tick otherwise.
            if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                tracing::warn!(error = %e, "demo feeds could not publish");
                last_error_log = Some(tokio::time::Instant::now());
            }
        }
    }
}

/// The messages of the tick at `now_ms`.
async fn publish_tick(store: &Store, now_ms: u64, every_ms: u64) -> Result<(), crate::store::StoreError> {
    // Ticks counted from midnight UTC: readable numbers, the same on every
    // replica.
    let day_ms = now_ms % 86_400_000;
    let of_day = day_ms / every_ms;
    let ts = iso8601(now_ms);
    let mut messages = vec![
        (COUNTER, sources::counter(of_day, &ts)),
        (STATUS, sources::status(of_day, &ts)),
        (CLOCK, sources::clock(now_ms, &ts)),
    ];
    // 1.5 ticks apart: on two ticks of every three.
    let metrics_every = every_ms * 3 / 2;
    if now_ms % metrics_every < every_ms {
        messages.push((METRICS, sources::metrics(day_ms / metrics_every, &ts)));
    }
    for (channel, message) in messages {
        // The server's own channels: no subject created them, none is charged for them.
        store.publish(channel, None, Some(message.event.to_owned()), message.data.to_string()).await?;
    }
    Ok(())
}

/// Milliseconds from `now_ms` to the middle of the next window of `every_ms`
/// (the current one's middle if it is still ahead).
fn mid_window_in(now_ms: u64, every_ms: u64) -> u64 {
    let into = now_ms % every_ms;
    let half = every_ms / 2;
    if into < half { half - into } else { every_ms - into + half }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `2026-12-01T12:00:00.000Z` from Unix milliseconds (the civil-from-days
/// algorithm; no date crate for one timestamp format).
fn iso8601(ms: u64) -> String {
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso8601_utc() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso8601(1_796_126_400_000), "2026-12-01T12:00:00.000Z");
    }

    #[test]
    fn ticks_are_aimed_at_the_middle_of_their_window() {
        assert_eq!(mid_window_in(1_000, 100), 50);
        assert_eq!(mid_window_in(1_049, 100), 1);
        assert_eq!(mid_window_in(1_050, 100), 100);
        assert_eq!(mid_window_in(1_099, 100), 51);
        for now in 0..300 {
            let at = now + mid_window_in(now, 100);
            assert_eq!(at % 100, 50, "from {now}");
            assert!(at > now);
        }
    }

    #[test]
    fn only_the_status_feed_has_its_own_retry() {
        assert_eq!(retry_for(STATUS), Some(5000));
        assert_eq!(retry_for(COUNTER), None);
    }
}
